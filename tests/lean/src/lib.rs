//! vl-lean: a service's view of `vl-runtime`, built with `default-features = false`.
//!
//! It exists so that the workspace build proves the lean library is enough to embed: load an
//! engine once, converse about a video, stream the tokens. It may depend on `vl-runtime` alone.
#![warn(clippy::unwrap_used)]

use std::path::Path;

use vl_runtime::{Flow, GenerateOptions, Media, Pipeline, PipelineOptions, Result};

/// Answers `question` about the video at `video` with the engine in `engine`, passing each
/// token's text to `sink` as it is generated.
pub fn answer(engine: &Path, video: &Path, question: &str, sink: &mut dyn FnMut(&str)) -> Result<String> {
    let pipeline = Pipeline::load(engine, PipelineOptions::default())?;
    let mut chat = pipeline.conversation(Media::VideoFile(video.to_path_buf()))?;
    let answer = chat.ask(question, &GenerateOptions::default(), &mut |t| {
        sink(t.text);
        Flow::Continue
    })?;
    Ok(answer.text)
}
