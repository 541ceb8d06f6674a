//! vl-export: turns Video-LLaVA checkpoints into ONNX graphs and a manifest for `vl-runtime`.
//!
//! It may depend on `vl-runtime` (the manifest contract, preprocessing and prompt rules it
//! shares with the runtime, ONNX Runtime for calibration and evaluation); the runtime never
//! depends on it. Inside, imports point one way
//! (tested by no module importing one that imports it back): `checkpoint` ← `contract`;
//! `weight_codes`, `onnx` ← `graphs` ← `quant` (calibration) ← `precision` ← `export`;
//! `staging` (leftovers of killed runs) ← `quant`, `export`.
//!
//! ```no_run
//! use vl_export::export::{BuildOptions, build};
//! let report = build(&BuildOptions::new("checkpoint/".into(), "engines/".into()))?;
//! println!("wrote {} graphs", report.graphs.len());
//! # Ok::<(), vl_export::Error>(())
//! ```
#![warn(clippy::unwrap_used)]

pub mod checkpoint;
pub mod contract;
pub mod error;
pub mod eval;
pub mod export;
pub mod graphs;
pub mod onnx;
pub mod precision;
pub mod quant;
pub mod staging;
pub mod synth;
pub mod weight_codes;

#[cfg(test)]
#[path = "../../tests/proptest_cases.rs"]
mod proptest_cases;

pub use error::{Error, Result};
