//! SentencePiece `tokenizer.model` files: the protobuf types (generated from
//! `proto/sentencepiece_model.proto` at build time, without `protoc`), reading with typed errors,
//! and writing (for synthesized checkpoints).
use std::path::Path;

use prost::Message;

use crate::error::{Error, Result};

/// SentencePiece's protobuf messages (`ModelProto`, `TrainerSpec`, `NormalizerSpec`).
#[allow(clippy::all, missing_docs, rustdoc::all)]
pub mod proto {
    include!(concat!(env!("OUT_DIR"), "/sentencepiece.rs"));
}

pub use proto::ModelProto;
pub use proto::model_proto::sentence_piece::Type as PieceType;
pub use proto::trainer_spec::ModelType;

/// The SentencePiece model file name in checkpoints.
pub const SPM_FILE: &str = "tokenizer.model";

/// Reads and decodes the SentencePiece model at `path`; a file that is not one is
/// [`Error::SentencePiece`] naming it.
pub fn read(path: &Path) -> Result<ModelProto> {
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    decode(&bytes, path)
}

/// Decodes a serialized `ModelProto` read from `path` (named in errors).
pub fn decode(bytes: &[u8], path: &Path) -> Result<ModelProto> {
    let invalid = |message: String| Error::SentencePiece { path: path.to_path_buf(), message };
    let model = ModelProto::decode(bytes).map_err(|e| invalid(e.to_string()))?;
    if model.pieces.is_empty() {
        return Err(invalid("no pieces".into()));
    }
    for (i, p) in model.pieces.iter().enumerate() {
        if p.piece.as_deref().unwrap_or_default().is_empty() {
            return Err(invalid(format!("piece {i} is empty")));
        }
    }
    Ok(model)
}

/// Serializes `model` to `path`.
pub fn write(model: &ModelProto, path: &Path) -> Result<()> {
    std::fs::write(path, model.encode_to_vec()).map_err(|e| Error::io(path, e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_corrupt_model_is_a_typed_error_naming_the_file() {
        let path = Path::new("ck/tokenizer.model");
        let err = decode(b"\x0a\xff\xff\xff\xff\x0f garbage", path).expect_err("corrupt");
        assert!(matches!(&err, Error::SentencePiece { path: p, .. } if p == path), "{err}");
        assert!(err.to_string().contains("ck/tokenizer.model"), "{err}");
        let err = decode(b"", path).expect_err("empty");
        assert!(err.to_string().contains("no pieces"), "{err}");
    }

    #[test]
    fn the_fixture_reads_as_a_byte_fallback_bpe_model() -> Result<()> {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/spm").join(SPM_FILE);
        let model = read(&path)?;
        let trainer = model.trainer_spec.clone().unwrap_or_default();
        assert_eq!(trainer.model_type(), ModelType::Bpe);
        assert!(trainer.byte_fallback());
        assert_eq!(model.pieces[0].r#type(), PieceType::Unknown);
        assert_eq!(model.pieces[1].r#type(), PieceType::Control);
        assert_eq!(model.pieces.iter().filter(|p| p.r#type() == PieceType::Byte).count(), 256);
        let bytes = model.encode_to_vec();
        assert_eq!(decode(&bytes, &path)?, model);
        Ok(())
    }
}
