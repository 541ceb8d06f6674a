//! W8A8 post-training quantization: calibration (statistics of the graphs' activations),
//! SmoothQuant, and the tables they produce. The weight formats themselves are in
//! [`crate::weight_codes`]; the graphs read the result through [`QuantParams`].
pub mod calib;
pub mod calibrate;
pub mod fusion;
pub mod gptq_codes;
pub mod hessian;
pub mod sensitivity;
pub mod smooth;
pub mod stats;
pub mod stream;
pub mod table;

pub use crate::onnx::QuantParams;
