//! The integer formats quantized weights are stored in: `MatMulNBits` blocks (4 and 8 bits,
//! symmetric or with zero points, rounded to nearest or by GPTQ) and per-channel symmetric
//! int8 for QDQ graphs. Pure arithmetic: graph code and calibration both use it, and it
//! depends on nothing else in the crate.
pub mod blocks;
pub mod cholesky;
pub mod gptq;
pub mod grid;
pub mod int8;
