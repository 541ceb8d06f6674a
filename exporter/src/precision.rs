//! How each `--precision` is realized per graph, and what the manifest says about it.
use std::sync::Arc;

use vl_runtime::manifest::{DType, Precision, Target};

use crate::error::{Error, Result};
use crate::graphs::GraphKind;
use crate::onnx::{Numerics, WeightFormat};
use crate::quant::QuantParams;
use crate::quant::calibrate::Calibration;

/// The numeric plan of an export.
#[derive(Debug, Clone)]
pub struct Plan {
    /// The precision asked for.
    pub precision: Precision,
    /// Weights per quantization block (weight-only precisions).
    pub block: usize,
    /// The calibration table of an int8 build (or of an fp32 build with SmoothQuant folded).
    pub calibration: Option<Calibration>,
}

impl Plan {
    /// A plan for `precision` with `block` weights per quantization block. An int8 plan needs
    /// [`Self::with_calibration`] before graphs are built.
    pub fn new(precision: Precision, block: usize) -> Result<Self> {
        if !(16..=256).contains(&block) || !block.is_power_of_two() {
            return Err(Error::Invalid(format!("block size {block}: a power of two from 16 to 256")));
        }
        Ok(Self { precision, block, calibration: None })
    }

    /// Attaches a calibration: int8 takes its scales and SmoothQuant factors; fp32 takes the
    /// SmoothQuant factors alone (a check that smoothing leaves the model unchanged).
    pub fn with_calibration(mut self, calibration: Calibration) -> Result<Self> {
        if !matches!(self.precision, Precision::Int8 | Precision::Fp32) {
            return Err(Error::Invalid(format!(
                "a calibration applies to --precision int8 (or fp32, to fold SmoothQuant alone), not {}",
                self.precision
            )));
        }
        self.calibration = Some(calibration);
        Ok(self)
    }

    /// Numerics of one graph.
    pub fn numerics(&self, kind: GraphKind) -> Numerics {
        let blocks = |bits| Numerics { act: DType::F32, weights: WeightFormat::Blocks { bits, block: self.block } };
        match self.precision {
            Precision::Fp32 => Numerics::FP32,
            Precision::Fp16 => Numerics { act: DType::F16, weights: WeightFormat::Float },
            // The embedding table is a gather, not a matmul: it stays fp32.
            _ if kind == GraphKind::Embed => Numerics::FP32,
            Precision::Int8 => Numerics { act: DType::F32, weights: WeightFormat::Int8Qdq },
            Precision::Int8Weight => blocks(8),
            Precision::Int4Weight => blocks(4),
        }
    }

    /// SmoothQuant factors and activation scales graph `kind` looks up, if calibrated.
    pub fn quant_params(&self, kind: GraphKind) -> Option<Arc<QuantParams>> {
        let c = self.calibration.as_ref()?;
        Some(Arc::new(c.table.params(kind.name(), self.precision == Precision::Int8)))
    }

    /// The operator set the graphs need.
    pub fn target(&self) -> Target {
        match self.precision {
            Precision::Int8Weight | Precision::Int4Weight => Target::OnnxRuntime,
            _ => Target::Standard,
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
        Some(format!(
            "SmoothQuant (alpha {}) folded into the RMSNorm weights before q/k/v, gate/up and lm_head ({} groups)",
            t.smoothquant_alpha,
            t.smoothing.len()
        ))
    }

    /// Lines for the manifest's `numerics`.
    pub fn notes(&self) -> Vec<String> {
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
                    "explicit QDQ: QuantizeLinear/DequantizeLinear on each linear's input and DequantizeLinear(axis 1) \
                     on its weight, before an fp32 MatMul (standard ONNX, TensorRT explicit quantization); ONNX \
                     Runtime's CPU provider fuses each into MatMulIntegerToFloat when session.qdqisint8allowed is set"
                        .to_string(),
                    "fp32: embeddings, patch convolution, norms, softmax, attention matmuls, residual stream, biases \
                     and the KV cache"
                        .to_string(),
                ];
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
                vec![
                    format!(
                        "linear weights (vision, projector, LLM, lm_head) {bits}-bit symmetric per block of {} \
                         inputs, one fp32 scale per block, through ONNX Runtime's MatMulNBits",
                        self.block
                    ),
                    "MatMulNBits accuracy_level 4: activations are quantized to int8 per block inside the kernel"
                        .into(),
                    "embeddings, patch convolution, norms, softmax and the KV cache stay fp32".into(),
                    "target onnxruntime: runs on ONNX Runtime's CPU and CUDA providers, not TensorRT".into(),
                ]
            }
        }
    }
}
