//! Building blocks shared by the graphs: linear layers, norms, activations.
use vl_runtime::manifest::DType;

use crate::checkpoint::{Activation, Weights};
use crate::error::Result;
use crate::onnx::{Attr, GraphBuilder, WeightFormat};
use crate::weight_codes::blocks::{self, BlockShape};
use crate::weight_codes::int8;

/// ONNX `TensorProto.DataType` codes used by `Cast`.
const FLOAT: i64 = 1;
const FLOAT16: i64 = 10;

/// Transposes a row-major `[rows, cols]` matrix.
pub fn transpose(values: &[f32], rows: usize, cols: usize) -> Vec<f32> {
    let mut out = vec![0.0f32; values.len()];
    const BLOCK: usize = 64;
    for r0 in (0..rows).step_by(BLOCK) {
        for c0 in (0..cols).step_by(BLOCK) {
            for r in r0..(r0 + BLOCK).min(rows) {
                for c in c0..(c0 + BLOCK).min(cols) {
                    out[c * rows + r] = values[r * cols + c];
                }
            }
        }
    }
    out
}

/// Options of a linear layer.
#[derive(Clone, Copy)]
pub struct LinearOpts {
    /// Input features.
    pub inp: usize,
    /// Output features.
    pub out: usize,
    /// Whether a `bias` tensor exists.
    pub bias: bool,
    /// A factor folded into weight and bias (attention scaling).
    pub scale: f32,
}

impl LinearOpts {
    /// A linear layer `inp → out`.
    pub fn new(inp: usize, out: usize, bias: bool) -> Self {
        Self { inp, out, bias, scale: 1.0 }
    }
}

/// `x @ W^T + b` for a PyTorch `Linear` stored as `[out, in]` under `w`, with the weight
/// stored as the builder's numerics say (float in the activation type, quantized blocks, or
/// int8 QDQ). SmoothQuant factors the builder holds for this weight multiply its columns.
pub fn linear(b: &mut GraphBuilder, w: &Weights, x: &str, o: LinearOpts) -> Result<String> {
    let weight_name = w.name("weight");
    b.tap(x, &weight_name, o.inp);
    let quant = b.quant();
    let row_divisors = quant.as_ref().and_then(|q| q.row_divisors.get(&weight_name).cloned());
    let mut format = b.numerics().weights;
    if matches!(format, WeightFormat::Int8Qdq { .. })
        && quant.as_ref().is_some_and(|q| q.float_linears.contains(&weight_name))
    {
        format = WeightFormat::Float;
    }
    // The weight as stored: scaled, with SmoothQuant's factors folded in. Computed only when
    // this data file does not hold it yet (a second graph on the same file reuses it).
    let load = || -> Result<Vec<f32>> {
        let mut weight = w.f32("weight", &[o.out, o.inp])?;
        if o.scale != 1.0 {
            weight.iter_mut().for_each(|v| *v *= o.scale);
        }
        if let Some(s) = quant.as_ref().and_then(|q| q.column_factors.get(&weight_name)) {
            for row in weight.chunks_exact_mut(o.inp) {
                row.iter_mut().zip(s.iter()).for_each(|(v, f)| *v *= f);
            }
        }
        if let Some(d) = &row_divisors {
            for (row, d) in weight.chunks_exact_mut(o.inp).zip(d.iter()) {
                row.iter_mut().for_each(|v| *v /= d);
            }
        }
        Ok(weight)
    };
    let (inp, out) = (o.inp as i64, o.out as i64);
    let y = match format {
        WeightFormat::Float => {
            let dims = [inp, out];
            let wt = if b.holds(&weight_name) {
                b.reuse_act(&weight_name, &dims)?
            } else {
                let t = transpose(&load()?, o.out, o.inp);
                b.weight_act(&weight_name, &dims, &t)?
            };
            b.op("MatMul", &[x, &wt], vec![])
        }
        WeightFormat::Blocks { bits, block, zero_points } => {
            let s = BlockShape { n: o.out, k: o.inp, bits, block };
            let (kb, blob) = (s.k_blocks() as i64, s.blob() as i64);
            let names = [w.name("weight.codes"), w.name("weight.scales"), w.name("weight.zero_points")];
            let (codes_dims, scales_dims, zeros_dims) =
                ([out, kb, blob], [out * kb], [(o.out * s.zero_row_bytes()) as i64]);
            let mut inputs = vec![x.to_string()];
            if b.holds(&names[0]) && b.holds(&names[1]) && (!zero_points || b.holds(&names[2])) {
                inputs.push(b.reuse_u8(&names[0], &codes_dims)?);
                inputs.push(b.reuse_act(&names[1], &scales_dims)?);
                if zero_points {
                    inputs.push(b.reuse_u8(&names[2], &zeros_dims)?);
                }
            } else {
                let mut q = match quant.as_ref().and_then(|q| q.block_codes.clone()) {
                    Some(codes) => codes.read(&weight_name, s)?,
                    None if zero_points => blocks::quantize_asym(&load()?, o.out, o.inp, bits, block),
                    None => blocks::quantize(&load()?, o.out, o.inp, bits, block),
                };
                // GPTQ quantized the checkpoint's weight: a folded factor scales its scales.
                if quant.as_ref().is_some_and(|q| q.block_codes.is_some()) && o.scale != 1.0 {
                    q.scales.iter_mut().for_each(|v| *v *= o.scale);
                }
                inputs.push(b.weight_u8(&names[0], &codes_dims, &q.codes)?);
                inputs.push(b.weight_act(&names[1], &scales_dims, &q.scales)?);
                match (&q.zero_points, zero_points) {
                    (Some(z), true) => inputs.push(b.weight_u8(&names[2], &zeros_dims, z)?),
                    (None, false) => {}
                    _ => {
                        return Err(crate::error::Error::Invalid(format!(
                            "{weight_name}: codes with{} zero points for a graph that wants them{}",
                            if q.zero_points.is_some() { "" } else { "out" },
                            if zero_points { "" } else { " not" }
                        )));
                    }
                }
            }
            let inputs: Vec<&str> = inputs.iter().map(String::as_str).collect();
            b.ms_op(
                "MatMulNBits",
                &inputs,
                vec![
                    ("K", Attr::Int(inp)),
                    ("N", Attr::Int(out)),
                    ("bits", Attr::Int(i64::from(bits))),
                    ("block_size", Attr::Int(block as i64)),
                    ("accuracy_level", Attr::Int(MATMUL_NBITS_ACCURACY)),
                ],
            )
        }
        WeightFormat::Int8Qdq { .. } => {
            let xq = b.fake_quant_int8(x, b.act_scale(&weight_name)?);
            let (codes_name, scale_name) = (w.name("weight.int8"), w.name("weight.scale"));
            let (codes, scales) = if b.holds(&codes_name) && b.holds(&scale_name) {
                (b.reuse_i8(&codes_name, &[inp, out])?, b.reuse(&scale_name, DType::F32, &[out])?)
            } else {
                let q = int8::quantize(&load()?, o.out, o.inp);
                (b.weight_i8(&codes_name, &[inp, out], &q.codes)?, b.weight_f32(&scale_name, &[out], &q.scales)?)
            };
            let zero = b.weight_i8(&w.name("weight.zero_point"), &[out], &vec![0i8; o.out])?;
            let wq = b.op("DequantizeLinear", &[&codes, &scales, &zero], vec![("axis", Attr::Int(1))]);
            b.op("MatMul", &[&xq, &wq], vec![])
        }
    };
    if !o.bias {
        return Ok(y);
    }
    let mut bias = w.f32("bias", &[o.out])?;
    if o.scale != 1.0 {
        bias.iter_mut().for_each(|v| *v *= o.scale);
    }
    if let Some(d) = &row_divisors {
        bias.iter_mut().zip(d.iter()).for_each(|(v, d)| *v /= d);
    }
    let bn = b.weight_act(&w.name("bias"), &[o.out as i64], &bias)?;
    Ok(b.op("Add", &[&y, &bn], vec![]))
}

/// `MatMulNBits` accuracy level: 4 lets ONNX Runtime's CPU kernel quantize activations to int8
/// per block and use integer dot products (its fastest path on AVX2).
pub const MATMUL_NBITS_ACCURACY: i64 = 4;

/// `x` cast to the activation type (a no-op in fp32 graphs).
pub fn to_act(b: &mut GraphBuilder, x: &str) -> String {
    match b.numerics().act {
        DType::F16 => b.op("Cast", &[x], vec![("to", Attr::Int(FLOAT16))]),
        _ => x.to_string(),
    }
}

/// `x` (in the activation type) cast to f32 (a no-op in fp32 graphs).
pub fn to_f32(b: &mut GraphBuilder, x: &str) -> String {
    match b.numerics().act {
        DType::F16 => b.op("Cast", &[x], vec![("to", Attr::Int(FLOAT))]),
        _ => x.to_string(),
    }
}

/// Softmax over the last axis, computed in f32 whatever the activation type.
pub fn softmax(b: &mut GraphBuilder, x: &str) -> String {
    let x32 = to_f32(b, x);
    let p = b.op("Softmax", &[&x32], vec![("axis", Attr::Int(-1))]);
    to_act(b, &p)
}

/// `LayerNormalization` over the last axis with `weight` and `bias` under `w`; statistics and
/// parameters in f32 whatever the activation type.
pub fn layer_norm(b: &mut GraphBuilder, w: &Weights, x: &str, dim: usize, eps: f32) -> Result<String> {
    let g = b.weight_f32(&w.name("weight"), &[dim as i64], &w.f32("weight", &[dim])?)?;
    let beta = b.weight_f32(&w.name("bias"), &[dim as i64], &w.f32("bias", &[dim])?)?;
    let x32 = to_f32(b, x);
    let y =
        b.op("LayerNormalization", &[&x32, &g, &beta], vec![("axis", Attr::Int(-1)), ("epsilon", Attr::Float(eps))]);
    Ok(to_act(b, &y))
}

/// LLaMA's RMSNorm, in the pattern ONNX Runtime fuses into `SimplifiedLayerNormalization`.
/// As transformers does, the statistics are f32 and the weight multiplies the result cast back
/// to the activation type.
/// SmoothQuant divisors the builder holds for this norm divide its weight.
pub fn rms_norm(b: &mut GraphBuilder, w: &Weights, x: &str, dim: usize, eps: f32) -> Result<String> {
    let name = w.name("weight");
    let mut gamma = w.f32("weight", &[dim])?;
    if let Some(s) = b.quant().and_then(|q| q.norm_divisors.get(&name).cloned()) {
        gamma.iter_mut().zip(s.iter()).for_each(|(g, d)| *g /= d);
    }
    let g = b.weight_act(&name, &[dim as i64], &gamma)?;
    let x = to_f32(b, x);
    let x = x.as_str();
    let two = b.const_f32(&[2.0], &[]);
    let sq = b.op("Pow", &[x, &two], vec![]);
    let mean = b.op("ReduceMean", &[&sq], vec![("axes", Attr::Ints(vec![-1])), ("keepdims", Attr::Int(1))]);
    let e = b.const_f32(&[eps], &[]);
    let var = b.op("Add", &[&mean, &e], vec![]);
    let std = b.op("Sqrt", &[&var], vec![]);
    let normed = b.op("Div", &[x, &std], vec![]);
    let normed = to_act(b, &normed);
    let out = b.op("Mul", &[&normed, &g], vec![]);
    b.note_norm_output(&out, &name);
    Ok(out)
}

/// An activation function, from standard operators only.
pub fn activation(b: &mut GraphBuilder, x: &str, act: Activation) -> String {
    match act {
        Activation::QuickGelu => {
            let k = b.const_act(&[1.702], &[]);
            let kx = b.op("Mul", &[x, &k], vec![]);
            let s = b.op("Sigmoid", &[&kx], vec![]);
            b.op("Mul", &[x, &s], vec![])
        }
        Activation::Gelu => {
            let inv_sqrt2 = b.const_act(&[std::f32::consts::FRAC_1_SQRT_2], &[]);
            let one = b.const_act(&[1.0], &[]);
            let half = b.const_act(&[0.5], &[]);
            let scaled = b.op("Mul", &[x, &inv_sqrt2], vec![]);
            let erf = b.op("Erf", &[&scaled], vec![]);
            let plus = b.op("Add", &[&erf, &one], vec![]);
            let xh = b.op("Mul", &[x, &half], vec![]);
            b.op("Mul", &[&xh, &plus], vec![])
        }
        Activation::Silu => {
            let s = b.op("Sigmoid", &[x], vec![]);
            b.op("Mul", &[x, &s], vec![])
        }
    }
}

/// `Shape(x)[axis]` as a 1-element int64 tensor.
pub fn dim_of(b: &mut GraphBuilder, x: &str, axis: i64) -> String {
    b.op("Shape", &[x], vec![("start", Attr::Int(axis)), ("end", Attr::Int(axis + 1))])
}
