//! How each `--precision` is realized per graph, and what the manifest says about it.
use std::sync::Arc;

use vl_runtime::manifest::{DType, KvLayout, Precision, Target};

use crate::error::{Error, Result};
use crate::graphs::GraphKind;
use crate::graphs::decoder::HEAD_BITS;
use crate::onnx::{Numerics, WeightFormat};
use crate::quant::QuantParams;
use crate::quant::calibrate::Calibration;
use crate::quant::gptq_codes::{GptqRequest, GraphCodes};
use crate::quant::table::FoldKind;
use crate::weight_codes::grid::GridFit;

/// How the weight-only precisions choose their codes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum WeightMethod {
    /// Round to nearest, symmetric (implicit zero point 2^(bits-1)), no calibration.
    RtnSymmetric,
    /// Round to nearest on each block's asymmetric grid (a zero point per block), no calibration.
    RtnAsymmetric,
    /// GPTQ on asymmetric grids, from the calibration set's Hessians, columns left to right,
    /// each group's grid fitted when it starts.
    Gptq,
    /// GPTQ with act-order: columns in decreasing order of the Hessian's diagonal, each group's
    /// grid fitted beforehand (static groups) (the default).
    #[default]
    GptqActOrder,
}

impl WeightMethod {
    /// Its name on the command line and in the manifest.
    pub fn label(self) -> &'static str {
        match self {
            WeightMethod::RtnSymmetric => "rtn-sym",
            WeightMethod::RtnAsymmetric => "rtn-asym",
            WeightMethod::Gptq => "gptq",
            WeightMethod::GptqActOrder => "gptq-act-order",
        }
    }

    /// Whether it is GPTQ (which calibrates).
    pub fn gptq(self) -> bool {
        matches!(self, WeightMethod::Gptq | WeightMethod::GptqActOrder)
    }

    /// Whether blocks carry zero points.
    pub fn zero_points(self) -> bool {
        self != WeightMethod::RtnSymmetric
    }
}

/// The numeric plan of an export.
#[derive(Debug, Clone)]
pub struct Plan {
    /// The precision asked for.
    pub precision: Precision,
    /// Weights per quantization block (weight-only precisions).
    pub block: usize,
    /// How the weight-only precisions choose their codes.
    pub method: WeightMethod,
    /// How GPTQ chooses each block's range.
    pub grid: GridFit,
    /// The calibration table of an int8 build (or of an fp32 build with SmoothQuant folded).
    pub calibration: Option<Calibration>,
    /// The target asked for (`None`: the one the precision needs).
    pub target: Option<Target>,
}

impl Plan {
    /// A plan for `precision` with `block` weights per quantization block. An int8 plan needs
    /// [`Self::with_calibration`] before graphs are built.
    pub fn new(precision: Precision, block: usize) -> Result<Self> {
        if !(16..=256).contains(&block) || !block.is_power_of_two() {
            return Err(Error::Invalid(format!("block size {block}: a power of two from 16 to 256")));
        }
        Ok(Self {
            precision,
            block,
            method: WeightMethod::default(),
            grid: GridFit::default(),
            calibration: None,
            target: None,
        })
    }

    /// Whether the precision stores weights alone quantized (`MatMulNBits`).
    pub fn weight_only(&self) -> bool {
        matches!(self.precision, Precision::Int8Weight | Precision::Int4Weight)
    }

    /// Chooses how weight-only codes are made (ignored by the other precisions).
    pub fn with_method(mut self, method: WeightMethod) -> Self {
        self.method = method;
        self
    }

    /// Chooses how GPTQ fits each block's range.
    pub fn with_grid(mut self, grid: GridFit) -> Self {
        self.grid = grid;
        self
    }

    /// Whether this plan needs a calibration before graphs are built.
    pub fn needs_calibration(&self) -> bool {
        self.precision == Precision::Int8 || (self.weight_only() && self.method.gptq())
    }

    /// What GPTQ should produce during calibration, if this plan uses it.
    pub fn gptq_request(&self) -> Option<GptqRequest> {
        (self.weight_only() && self.method.gptq()).then(|| {
            let bits = if self.precision == Precision::Int8Weight { 8 } else { 4 };
            let act_order = self.method == WeightMethod::GptqActOrder;
            GptqRequest { bits, head_bits: HEAD_BITS, block: self.block, act_order, grid: self.grid }
        })
    }

    /// Attaches a calibration: int8 takes its scales and SmoothQuant factors; fp32 takes the
    /// SmoothQuant factors alone (a check that smoothing leaves the model unchanged); the
    /// weight-only precisions take GPTQ's codes.
    pub fn with_calibration(mut self, calibration: Calibration) -> Result<Self> {
        let gptq = self.weight_only() && self.method.gptq();
        if !(matches!(self.precision, Precision::Int8 | Precision::Fp32) || gptq) {
            return Err(Error::Invalid(format!(
                "a calibration applies to --precision int8, to fp32 (to fold SmoothQuant alone) and to the \
                 weight-only precisions with --weight-method gptq-act-order or gptq, not {} with {}",
                self.precision,
                self.method.label()
            )));
        }
        if gptq && calibration.codes.is_none() {
            return Err(Error::Invalid("the calibration made no GPTQ codes (CalibOptions::gptq unset)".into()));
        }
        self.calibration = Some(calibration);
        Ok(self)
    }

    /// Numerics of one graph.
    pub fn numerics(&self, kind: GraphKind) -> Numerics {
        let zero_points = self.method.zero_points();
        let blocks =
            |bits| Numerics { act: DType::F32, weights: WeightFormat::Blocks { bits, block: self.block, zero_points } };
        match self.precision {
            Precision::Fp32 => Numerics::FP32,
            Precision::Fp16 => Numerics { act: DType::F16, weights: WeightFormat::Float },
            // The embedding table is a gather, not a matmul: it stays fp32.
            _ if kind == GraphKind::Embed => Numerics::FP32,
            Precision::Int8 => Numerics {
                act: DType::F32,
                weights: WeightFormat::Int8Qdq { unsigned_act: self.target() == Target::OnnxRuntime },
            },
            Precision::Int8Weight => blocks(8),
            Precision::Int4Weight => blocks(4),
        }
    }

    /// Numerics of the twin of graph `kind` that ONNX Runtime's own providers (CPU, CUDA) run,
    /// where it differs from [`Self::numerics`]: a TensorRT-form int8 graph (int8 activation
    /// codes, zero point 0) gets a twin with uint8 activation codes and zero point 128, the
    /// same grid, which ONNX Runtime's x86 integer kernels run fast (its signed-activation
    /// kernels are slow without AVX-VNNI-INT8). The twin reads the same weights.
    pub fn uint8_twin(&self, kind: GraphKind) -> Option<Numerics> {
        match self.numerics(kind) {
            n @ Numerics { weights: WeightFormat::Int8Qdq { unsigned_act: false }, .. } => {
                Some(Numerics { weights: WeightFormat::Int8Qdq { unsigned_act: true }, ..n })
            }
            _ => None,
        }
    }

    /// SmoothQuant factors and activation scales graph `kind` looks up, if calibrated.
    pub fn quant_params(&self, kind: GraphKind) -> Option<Arc<QuantParams>> {
        let c = self.calibration.as_ref()?;
        if self.weight_only() {
            let dir = c.codes.clone()?;
            let codes = GraphCodes { dir, graph: kind.name().to_string() };
            return Some(Arc::new(QuantParams { block_codes: Some(Arc::new(codes)), ..Default::default() }));
        }
        Some(Arc::new(c.table.params(kind.name(), self.precision == Precision::Int8)))
    }

    /// Asks for `target`; the weight-only precisions need ONNX Runtime (`MatMulNBits`).
    pub fn with_target(mut self, target: Target) -> Result<Self> {
        if target == Target::Standard && self.implied_target() == Target::OnnxRuntime {
            return Err(Error::Invalid(format!(
                "--precision {} needs --target onnxruntime (its MatMulNBits is an ONNX Runtime operator)",
                self.precision
            )));
        }
        self.target = Some(target);
        Ok(self)
    }

    fn implied_target(&self) -> Target {
        match self.precision {
            Precision::Int8Weight | Precision::Int4Weight => Target::OnnxRuntime,
            _ => Target::Standard,
        }
    }

    /// The operator set the graphs need.
    pub fn target(&self) -> Target {
        self.target.unwrap_or_else(|| self.implied_target())
    }

    /// How the decoder passes its KV cache: in a shared buffer through ONNX Runtime's
    /// `GroupQueryAttention` when `--target onnxruntime` was asked for, else concatenated.
    pub fn kv_layout(&self) -> KvLayout {
        match self.target {
            Some(Target::OnnxRuntime) => KvLayout::SharedBuffer,
            _ => KvLayout::Concat,
        }
    }

    /// The KV cache's element type.
    pub fn kv_dtype(&self) -> DType {
        self.numerics(GraphKind::Decoder).act
    }

    fn calibration_note(&self) -> Option<String> {
        let c = self.calibration.as_ref()?;
        let t = &c.table;
        let file = c.path.file_name().map(|f| f.to_string_lossy().into_owned()).unwrap_or_default();
        Some(format!(
            "calibration: {} samples of {}, thresholds by {}, table {file} (key {})",
            t.samples,
            t.spec,
            t.method,
            &t.key[..16]
        ))
    }

    fn smoothing_note(&self) -> Option<String> {
        let t = &self.calibration.as_ref()?.table;
        if t.smoothing.is_empty() {
            return None;
        }
        let norms = t.smoothing.iter().filter(|s| s.kind == FoldKind::Norm).count();
        let rows = t.smoothing.len() - norms;
        let mut note = format!(
            "SmoothQuant (alpha {}) folded into the RMSNorm weights before q/k/v, gate/up and lm_head ({norms} norms)",
            t.smoothquant_alpha
        );
        if rows > 0 {
            note.push_str(&format!(", and into up_proj's rows before down_proj ({rows} layers)"));
        }
        Some(note)
    }

    fn excluded_note(&self) -> Option<String> {
        let t = &self.calibration.as_ref()?.table;
        if t.excluded.is_empty() {
            return None;
        }
        let shown: Vec<&str> = t.excluded.iter().take(8).map(String::as_str).collect();
        let more = t.excluded.len().saturating_sub(shown.len());
        let more = if more > 0 { format!(" and {more} more") } else { String::new() };
        Some(format!("kept in fp32 (calibration spec's exclusions and sensitivity scan): {}{more}", shown.join(", ")))
    }

    fn sensitivity_note(&self) -> Option<String> {
        let t = &self.calibration.as_ref()?.table;
        if t.sensitivity.is_empty() {
            return None;
        }
        let mut errors: Vec<f64> = t.sensitivity.iter().map(|b| b.error).collect();
        errors.sort_by(f64::total_cmp);
        let median = errors[errors.len() / 2];
        let kept: Vec<String> = t
            .sensitivity
            .iter()
            .filter(|b| b.kept_float)
            .map(|b| {
                let head = if b.head { " and the head" } else { "" };
                let layers = if b.end_layer == b.first_layer + 1 {
                    format!("layer {}", b.first_layer)
                } else {
                    format!("layers {}..{}", b.first_layer, b.end_layer)
                };
                format!("{layers}{head} ({:.2e})", b.error)
            })
            .collect();
        Some(format!(
            "sensitivity scan (each decoder block run again in int8 on the calibration set; relative change of \
             its output, median {median:.2e}): kept in fp32 {}",
            if kept.is_empty() { "none".to_string() } else { kept.join(", ") }
        ))
    }

    /// Lines for the manifest's `numerics`.
    pub fn notes(&self) -> Vec<String> {
        let mut notes = self.precision_notes();
        if self.kv_layout() == KvLayout::SharedBuffer {
            notes.push(
                "decoder attention: ONNX Runtime GroupQueryAttention (rotary inside, cos/sin caches as initializers); \
                 past_key_values.* and present.* share one buffer per layer [batch, kv_heads, capacity, head_dim] \
                 written in place"
                    .into(),
            );
        }
        notes
    }

    fn precision_notes(&self) -> Vec<String> {
        match self.precision {
            Precision::Fp32 => {
                let mut notes = vec!["fp32 weights and activations".to_string()];
                if self.calibration.is_some() {
                    notes.extend(self.smoothing_note());
                    notes.extend(self.calibration_note());
                }
                notes
            }
            Precision::Int8 => {
                let mut notes = vec![
                    "W8A8: the linears (vision q/k/v/out/fc1/fc2, projector, LLM q/k/v/o/gate/up/down, lm_head) read \
                     int8 activations, symmetric per tensor with zero point 0 and a static calibrated scale, and \
                     int8 weights, symmetric per output channel in [-127, 127]"
                        .to_string(),
                    if self.target() == Target::OnnxRuntime {
                        "explicit QDQ: QuantizeLinear/DequantizeLinear on each linear's input (uint8 codes, zero point \
                         128: the int8 grid shifted, the fast path of ONNX Runtime's x86 integer kernels) and \
                         DequantizeLinear(axis 1) on its weight, before an fp32 MatMul; ONNX Runtime's CPU provider \
                         fuses each into MatMulIntegerToFloat"
                            .to_string()
                    } else {
                        "explicit QDQ: QuantizeLinear/DequantizeLinear on each linear's input (int8 codes, zero point 0) \
                         and DequantizeLinear(axis 1) on its weight, before an fp32 MatMul (standard ONNX, TensorRT \
                         explicit quantization); ONNX Runtime's CPU provider fuses each into MatMulIntegerToFloat \
                         (with session.qdqisint8allowed, which vl-runtime sets); for ONNX Runtime's own providers \
                         (CPU, CUDA) vision_uint8.onnx, image_uint8.onnx and decoder_in_place.onnx read the same weights \
                         with uint8 activation codes (zero point 128, the same grid), the fast path of its x86 integer \
                         kernels, which the runtime picks on those devices"
                            .to_string()
                    },
                    "fp32: embeddings, patch convolution, norms, softmax, attention matmuls, residual stream, biases \
                     and the KV cache"
                        .to_string(),
                ];
                notes.extend(self.excluded_note());
                notes.extend(self.sensitivity_note());
                notes.extend(self.smoothing_note());
                notes.extend(self.calibration_note());
                notes
            }
            Precision::Fp16 => vec![
                "fp16 weights, activations and KV cache; graph inputs and outputs stay fp32".into(),
                "LayerNorm and RMSNorm statistics and attention softmax (with its mask) are computed in fp32, \
                 as transformers does in half precision; the residual stream is fp16"
                    .into(),
            ],
            Precision::Int8Weight | Precision::Int4Weight => {
                let bits = if self.precision == Precision::Int8Weight { 8 } else { 4 };
                let head = if bits == HEAD_BITS { String::new() } else { format!(" (lm_head {HEAD_BITS}-bit)") };
                let scheme = if self.method.zero_points() {
                    "asymmetric: one fp32 scale and one uint8 zero point per block (the block's range widened to \
                     include 0; MatMulNBits' zero_points input)"
                } else {
                    "symmetric: one fp32 scale per block, implicit zero point 2^(bits-1)"
                };
                let grid = if self.grid == GridFit::Mse && self.method.gptq() {
                    "; each block's range by the reference's MSE search (shrunk by up to 20%, least sum |error|^2.4)"
                } else {
                    ""
                };
                let method = match self.method {
                    WeightMethod::Gptq => {
                        "codes by GPTQ (Frantar et al. 2022, as IST-DASLab's fasterquant: Hessians 2/n X^T X of each \
                         linear's fp32 input over the calibration set, 1% dampening, lazy batches of 128 columns, \
                         columns in order, each group's grid fitted when it starts)"
                    }
                    WeightMethod::GptqActOrder => {
                        "codes by GPTQ (Frantar et al. 2022, as IST-DASLab's fasterquant: Hessians 2/n X^T X of each \
                         linear's fp32 input over the calibration set, 1% dampening, lazy batches of 128 columns, \
                         act-order: columns by decreasing Hessian diagonal, static groups fitted on the original \
                         weights)"
                    }
                    _ => "codes rounded to nearest",
                };
                let mut notes = vec![
                    format!(
                        "linear weights (vision, projector, LLM, lm_head) {bits}-bit{head} per block of {} inputs, \
                         {scheme}, through ONNX Runtime's MatMulNBits",
                        self.block
                    ),
                    format!("weight method {}: {method}{grid}", self.method.label()),
                    "MatMulNBits accuracy_level 4: activations are quantized to int8 per block inside the kernel"
                        .into(),
                    "embeddings, patch convolution, norms, softmax and the KV cache stay fp32".into(),
                    "target onnxruntime: runs on ONNX Runtime's CPU and CUDA providers, not TensorRT".into(),
                ];
                if self.method.gptq() {
                    notes.extend(self.calibration_note());
                }
                notes
            }
        }
    }
}
