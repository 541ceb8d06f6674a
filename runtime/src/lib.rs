//! vl-runtime: runs Video-LLaVA graphs exported by `vl-export`; the library services embed.
//!
//! It may depend on ONNX Runtime (`ort`), tensors (`ndarray`, `half`), the tokenizer, ffmpeg
//! (through `ffmpeg-sidecar`), image resizing and serialization; never on command-line, progress
//! bar or benchmark code, nor on any other package of this workspace. The binaries (`vl-run`,
//! `vl-serve`), the exporter and the benchmarks depend on it.
//!
//! Quick start (load once, ask, stream):
//! ```no_run
//! use vl_runtime::{GenerateOptions, Media, Pipeline, PipelineOptions, Flow};
//! let pipeline = Pipeline::load("engines/small", PipelineOptions::default())?;
//! let mut chat = pipeline.conversation(Media::VideoFile("clip.mp4".into()))?;
//! let answer = chat.ask("What happens in this video?", &GenerateOptions::default(), &mut |t| {
//!     print!("{}", t.text);
//!     Flow::Continue
//! })?;
//! println!("\n{} tokens, {:.1} ms/token", answer.token_ids.len(), answer.timings.ms_per_token());
//! # Ok::<(), vl_runtime::Error>(())
//! ```
#![warn(clippy::unwrap_used)]

pub mod device;
pub mod engine;
pub mod error;
pub mod exit;
pub mod features;
pub mod generate;
pub mod graph;
pub mod kv_cache;
pub mod manifest;
pub mod memory;
pub mod model;
pub mod ort_env;
pub mod pipeline;
pub mod preprocess;
pub mod prompt;
pub mod sampling;
pub mod stream;
pub mod verify;
pub mod video;

#[cfg(test)]
#[path = "../../tests/proptest_cases.rs"]
mod proptest_cases;

pub use device::Device;
pub use engine::{Engine, EngineOptions};
pub use error::{Error, Result};
pub use generate::{Answer, FinishReason, Flow, GenerateOptions, Timings, TokenEvent};
pub use graph::SessionOptions;
pub use model::DecoderChoice;
pub use pipeline::{Conversation, Media, Pipeline, PipelineOptions};
pub use verify::Verify;
