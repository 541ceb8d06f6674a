//! How each `--precision` is realized per graph, and what the manifest says about it.
use vl_runtime::manifest::{DType, Precision, Target};

use crate::error::{Error, Result};
use crate::graphs::GraphKind;
use crate::onnx::{Numerics, WeightFormat};

/// The numeric plan of an export.
#[derive(Debug, Clone)]
pub struct Plan {
    /// The precision asked for.
    pub precision: Precision,
    /// Weights per quantization block (weight-only precisions).
    pub block: usize,
}

impl Plan {
    /// A plan for `precision` with `block` weights per quantization block.
    pub fn new(precision: Precision, block: usize) -> Result<Self> {
        if !(16..=256).contains(&block) || !block.is_power_of_two() {
            return Err(Error::Invalid(format!("block size {block}: a power of two from 16 to 256")));
        }
        if precision == Precision::Int8 {
            return Err(Error::Invalid(
                "--precision int8 (W8A8 with calibration) is not available yet; use int8-weight".into(),
            ));
        }
        Ok(Self { precision, block })
    }

    /// Numerics of one graph.
    pub fn numerics(&self, kind: GraphKind) -> Numerics {
        let blocks = |bits| Numerics { act: DType::F32, weights: WeightFormat::Blocks { bits, block: self.block } };
        match self.precision {
            Precision::Fp32 | Precision::Int8 => Numerics::FP32,
            Precision::Fp16 => Numerics { act: DType::F16, weights: WeightFormat::Float },
            // The embedding table is a gather, not a matmul: it stays fp32.
            Precision::Int8Weight | Precision::Int4Weight if kind == GraphKind::Embed => Numerics::FP32,
            Precision::Int8Weight => blocks(8),
            Precision::Int4Weight => blocks(4),
        }
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

    /// Lines for the manifest's `numerics`.
    pub fn notes(&self) -> Vec<String> {
        match self.precision {
            Precision::Fp32 | Precision::Int8 => vec!["fp32 weights and activations".into()],
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
