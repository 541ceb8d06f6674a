//! vl-export: turns Video-LLaVA checkpoints into ONNX graphs and a manifest for `vl-runtime`.
//!
//! ```no_run
//! use vl_export::export::{BuildOptions, build};
//! let report = build(&BuildOptions::new("checkpoint/".into(), "engines/".into()))?;
//! println!("wrote {} graphs", report.graphs.len());
//! # Ok::<(), vl_export::Error>(())
//! ```
#![warn(clippy::unwrap_used)]

pub mod checkpoint;
pub mod error;
pub mod eval;
pub mod export;
pub mod graphs;
pub mod onnx;
pub mod precision;
pub mod quant;
pub mod synth;

pub use error::{Error, Result};
