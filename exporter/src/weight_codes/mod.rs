//! The integer formats quantized weights are stored in: `MatMulNBits` blocks (4 and 8 bits) and
//! per-channel symmetric int8 for QDQ graphs. Pure arithmetic: graph code and calibration both
//! use it, and it depends on nothing else in the crate.
pub mod blocks;
pub mod int8;
