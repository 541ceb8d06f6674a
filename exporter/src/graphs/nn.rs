//! Building blocks shared by the graphs: linear layers, norms, activations.
use crate::checkpoint::{Activation, Weights};
use crate::error::Result;
use crate::onnx::{Attr, GraphBuilder};

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

/// `x @ W^T + b` for a PyTorch `Linear` stored as `[out, in]` under `w`.
pub fn linear(b: &mut GraphBuilder, w: &Weights, x: &str, o: LinearOpts) -> Result<String> {
    let mut weight = w.f32("weight", &[o.out, o.inp])?;
    if o.scale != 1.0 {
        weight.iter_mut().for_each(|v| *v *= o.scale);
    }
    let wt = b.weight_f32(&w.name("weight"), &[o.inp as i64, o.out as i64], &transpose(&weight, o.out, o.inp))?;
    drop(weight);
    let y = b.op("MatMul", &[x, &wt], vec![]);
    if !o.bias {
        return Ok(y);
    }
    let mut bias = w.f32("bias", &[o.out])?;
    if o.scale != 1.0 {
        bias.iter_mut().for_each(|v| *v *= o.scale);
    }
    let bn = b.weight_f32(&w.name("bias"), &[o.out as i64], &bias)?;
    Ok(b.op("Add", &[&y, &bn], vec![]))
}

/// `LayerNormalization` over the last axis with `weight` and `bias` under `w`.
pub fn layer_norm(b: &mut GraphBuilder, w: &Weights, x: &str, dim: usize, eps: f32) -> Result<String> {
    let g = b.weight_f32(&w.name("weight"), &[dim as i64], &w.f32("weight", &[dim])?)?;
    let beta = b.weight_f32(&w.name("bias"), &[dim as i64], &w.f32("bias", &[dim])?)?;
    Ok(b.op("LayerNormalization", &[x, &g, &beta], vec![("axis", Attr::Int(-1)), ("epsilon", Attr::Float(eps))]))
}

/// LLaMA's RMSNorm, in the pattern ONNX Runtime fuses into `SimplifiedLayerNormalization`.
pub fn rms_norm(b: &mut GraphBuilder, w: &Weights, x: &str, dim: usize, eps: f32) -> Result<String> {
    let g = b.weight_f32(&w.name("weight"), &[dim as i64], &w.f32("weight", &[dim])?)?;
    let two = b.const_f32(&[2.0], &[]);
    let sq = b.op("Pow", &[x, &two], vec![]);
    let mean = b.op("ReduceMean", &[&sq], vec![("axes", Attr::Ints(vec![-1])), ("keepdims", Attr::Int(1))]);
    let e = b.const_f32(&[eps], &[]);
    let var = b.op("Add", &[&mean, &e], vec![]);
    let std = b.op("Sqrt", &[&var], vec![]);
    let normed = b.op("Div", &[x, &std], vec![]);
    Ok(b.op("Mul", &[&normed, &g], vec![]))
}

/// An activation function, from standard operators only.
pub fn activation(b: &mut GraphBuilder, x: &str, act: Activation) -> String {
    match act {
        Activation::QuickGelu => {
            let k = b.const_f32(&[1.702], &[]);
            let kx = b.op("Mul", &[x, &k], vec![]);
            let s = b.op("Sigmoid", &[&kx], vec![]);
            b.op("Mul", &[x, &s], vec![])
        }
        Activation::Gelu => {
            let inv_sqrt2 = b.const_f32(&[std::f32::consts::FRAC_1_SQRT_2], &[]);
            let one = b.const_f32(&[1.0], &[]);
            let half = b.const_f32(&[0.5], &[]);
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
