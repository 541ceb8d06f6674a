//! One module per graph of an engine.
pub mod decoder;
pub mod embed;
pub mod nn;
pub mod vision;

use vl_runtime::manifest::KvLayout;

use crate::checkpoint::Checkpoint;
use crate::error::Result;
use crate::onnx::GraphBuilder;

/// The graphs of an engine, in the order they are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GraphKind {
    /// Video tower + projector.
    Vision,
    /// Image tower + projector.
    Image,
    /// Token embeddings.
    Embed,
    /// LLaMA decoder with KV cache.
    Decoder,
}

impl GraphKind {
    /// All graphs.
    pub const ALL: [GraphKind; 4] = [GraphKind::Vision, GraphKind::Image, GraphKind::Embed, GraphKind::Decoder];

    /// Role name, also the file stem.
    pub fn name(self) -> &'static str {
        match self {
            GraphKind::Vision => "vision",
            GraphKind::Image => "image",
            GraphKind::Embed => "embed",
            GraphKind::Decoder => "decoder",
        }
    }

    /// Adds this graph's nodes and weights to `b`; `kv` says how the decoder's KV cache
    /// crosses its interface.
    pub fn build(self, b: &mut GraphBuilder, ck: &Checkpoint, kv: KvLayout) -> Result<()> {
        match self {
            GraphKind::Vision => vision::build_video(b, ck),
            GraphKind::Image => vision::build_image(b, ck),
            GraphKind::Embed => embed::build(b, ck),
            GraphKind::Decoder => decoder::build(b, ck, kv),
        }
    }
}
