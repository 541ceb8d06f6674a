//! Quantization: block-wise weight quantization for `MatMulNBits`.
pub mod blocks;
