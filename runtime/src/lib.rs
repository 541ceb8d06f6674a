//! vl-runtime: runs Video-LLaVA graphs exported by `vl-export`.
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

pub mod bench;
pub mod error;
pub mod generate;
pub mod graph;
pub mod kv_cache;
pub mod manifest;
pub mod ort_env;
pub mod pipeline;
pub mod preprocess;
pub mod prompt;
pub mod sampling;
pub mod stream;
pub mod verify;
pub mod video;

pub use error::{Error, Result};
pub use generate::{Answer, FinishReason, Flow, GenerateOptions, Timings, TokenEvent};
pub use graph::SessionOptions;
pub use ort_env::Device;
pub use pipeline::{Conversation, Media, Pipeline, PipelineOptions};
pub use verify::Verify;
