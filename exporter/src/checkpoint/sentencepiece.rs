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

    mod properties {
        #![allow(clippy::unwrap_used)]
        use proptest::prelude::*;

        use super::*;
        use crate::checkpoint::tokenizer_convert::{SpmSettings, convert};
        use proto::model_proto::SentencePiece;

        fn fixture() -> Vec<u8> {
            let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/spm").join(SPM_FILE);
            std::fs::read(path).unwrap()
        }

        /// Never a panic: decoding gives a model or an error naming the file, and a model
        /// converts to a tokenizer (that encodes and decodes) or gives an error.
        fn total(bytes: &[u8]) -> std::result::Result<(), TestCaseError> {
            let path = Path::new("ck/tokenizer.model");
            match decode(bytes, path) {
                Ok(model) => converts(&model)?,
                Err(e) => prop_assert!(e.to_string().contains("ck/tokenizer.model"), "{}", e),
            }
            Ok(())
        }

        fn converts(model: &ModelProto) -> std::result::Result<(), TestCaseError> {
            if let Ok(tok) = convert(model, Path::new("ck/tokenizer.model"), &SpmSettings::default()) {
                let ids = tok.encode("a café 🎬 <s>", true).map(|e| e.get_ids().to_vec()).unwrap_or_default();
                let _ = tok.decode(&ids, false);
            }
            Ok(())
        }

        fn piece() -> impl Strategy<Value = SentencePiece> {
            let text = prop_oneof![
                "[ab▁<>s/]{0,4}",
                (0u8..=255).prop_map(|b| format!("<0x{b:02X}>")),
                prop::sample::select(vec!["<unk>", "<s>", "</s>", "▁", "▁a", "ab"]).prop_map(String::from),
            ];
            let score = prop_oneof![any::<f32>(), Just(f32::NAN), Just(f32::INFINITY), -10.0f32..0.0];
            (text, score, 0i32..8).prop_map(|(piece, score, kind)| SentencePiece {
                piece: Some(piece),
                score: Some(score),
                r#type: Some(kind),
            })
        }

        proptest! {
            #![proptest_config(crate::proptest_cases::config(256))]

            #[test]
            fn arbitrary_bytes_never_panic(data in prop::collection::vec(any::<u8>(), 0..256)) {
                total(&data)?;
            }

            #[test]
            fn flipped_bytes_never_panic(flips in prop::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..4)) {
                let mut data = fixture();
                for (at, byte) in flips {
                    let i = at.index(data.len());
                    data[i] = byte;
                }
                total(&data)?;
            }

            #[test]
            fn huge_length_fields_never_panic(at in any::<prop::sample::Index>()) {
                // A varint length of 2^63 - 1 spliced in at any byte.
                let data = fixture();
                let i = at.index(data.len());
                let mut p = data[..i].to_vec();
                p.extend([0x0a, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x7f]);
                p.extend(&data[i..]);
                total(&p)?;
            }

            #[test]
            fn arbitrary_models_convert_or_fail(pieces in prop::collection::vec(piece(), 0..40), bpe in any::<bool>(), unk in "(<unk>|x|)") {
                let mut model = ModelProto { pieces, ..Default::default() };
                let mut trainer = proto::TrainerSpec { unk_piece: Some(unk), ..Default::default() };
                trainer.set_model_type(if bpe { ModelType::Bpe } else { ModelType::Unigram });
                model.trainer_spec = Some(trainer);
                total(&model.encode_to_vec())?;
            }
        }

        #[test]
        fn every_truncation_is_an_error_or_a_smaller_model() {
            // Protobuf has no end marker: a cut between fields reads as a model with fewer.
            let data = fixture();
            let whole = decode(&data, Path::new("t")).unwrap();
            for end in 0..data.len() {
                if let Ok(m) = decode(&data[..end], Path::new("t")) {
                    assert!(m.pieces.len() <= whole.pieces.len());
                }
            }
        }
    }
}
