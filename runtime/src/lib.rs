//! vl-runtime: runs Video-LLaVA graphs exported by `vl-export`.
#![warn(clippy::unwrap_used)]

pub mod error;
pub mod manifest;
pub mod ort_env;
pub mod preprocess;
pub mod sampling;
pub mod stream;
pub mod video;

pub use error::{Error, Result};
