//! A synthesized SentencePiece `tokenizer.model` (BPE with byte fallback, laid out as LLaMA's:
//! `<unk>`, `<s>`, `</s>`, the 256 byte pieces, merged pieces by falling score, then single
//! characters), for checkpoints that ship no `tokenizer.json`, as the published one may not.
use std::path::Path;

use tokenizers::models::bpe::{BPE, BpeTrainerBuilder};
use tokenizers::models::{ModelWrapper, TrainerWrapper};
use tokenizers::pre_tokenizers::metaspace::{Metaspace, PrependScheme};
use tokenizers::{DecoderWrapper, NormalizerWrapper, PostProcessorWrapper, PreTokenizerWrapper, TokenizerImpl};
use tokenizers::{Model, TokenizerBuilder};

use super::tokenizer::{CORPUS, LEADING_SPECIALS, SpecialIds};
use crate::checkpoint::sentencepiece::proto::model_proto::SentencePiece;
use crate::checkpoint::sentencepiece::proto::{NormalizerSpec, TrainerSpec};
use crate::checkpoint::sentencepiece::{self, ModelProto, ModelType, PieceType, SPM_FILE};
use crate::error::{Error, Result};

fn tok_err(e: impl std::fmt::Display) -> Error {
    Error::Tokenizer(e.to_string())
}

fn piece(text: &str, score: f32, kind: PieceType) -> SentencePiece {
    let mut p = SentencePiece { piece: Some(text.into()), score: Some(score), ..Default::default() };
    p.set_type(kind);
    p
}

/// The model: BPE learned on the synth corpus with about `vocab` tokens, words marked by `▁`.
pub fn model(vocab: usize) -> Result<ModelProto> {
    let mut trainer: TrainerWrapper =
        BpeTrainerBuilder::new().vocab_size(vocab).min_frequency(1).show_progress(false).build().into();
    let metaspace = Metaspace::new('\u{2581}', PrependScheme::Always, true);
    let mut tokenizer: TokenizerImpl<
        ModelWrapper,
        NormalizerWrapper,
        PreTokenizerWrapper,
        PostProcessorWrapper,
        DecoderWrapper,
    > = TokenizerBuilder::new()
        .with_model(BPE::default().into())
        .with_normalizer(None)
        .with_pre_tokenizer(Some(metaspace.into()))
        .with_decoder(None)
        .with_post_processor(None)
        .build()
        .map_err(tok_err)?;
    tokenizer.train(&mut trainer, CORPUS.iter()).map_err(tok_err)?;
    let mut learned: Vec<(String, u32)> = tokenizer.get_model().get_vocab().into_iter().collect();
    learned.sort_by_key(|(_, id)| *id);
    let (merged, chars): (Vec<_>, Vec<_>) = learned.into_iter().partition(|(t, _)| t.chars().count() > 1);

    let mut pieces = vec![piece(LEADING_SPECIALS[0], 0.0, PieceType::Unknown)];
    pieces.extend(LEADING_SPECIALS[1..].iter().map(|s| piece(s, 0.0, PieceType::Control)));
    pieces.extend((0..=255u8).map(|b| piece(&format!("<0x{b:02X}>"), 0.0, PieceType::Byte)));
    let normal = merged.iter().chain(&chars).enumerate();
    pieces.extend(normal.map(|(rank, (t, _))| piece(t, -(rank as f32), PieceType::Normal)));

    let mut trainer = TrainerSpec {
        vocab_size: Some(pieces.len() as i32),
        byte_fallback: Some(true),
        split_digits: Some(true),
        allow_whitespace_only_pieces: Some(true),
        ..Default::default()
    };
    trainer.set_model_type(ModelType::Bpe);
    let normalizer = NormalizerSpec {
        name: Some("identity".into()),
        add_dummy_prefix: Some(true),
        remove_extra_whitespaces: Some(false),
        escape_whitespaces: Some(true),
        ..Default::default()
    };
    Ok(ModelProto { pieces, trainer_spec: Some(trainer), normalizer_spec: Some(normalizer), ..Default::default() })
}

/// Writes `tokenizer.model` into `out`; the placeholders and `<pad>` follow the pieces (the
/// checkpoint's `added_tokens.json` declares them). `placeholders` is false for the original
/// layout, whose vocabulary has none.
pub fn write(out: &Path, vocab: usize, placeholders: bool) -> Result<SpecialIds> {
    let model = model(vocab)?;
    sentencepiece::write(&model, &out.join(SPM_FILE))?;
    let n = model.pieces.len() as u32;
    let (image, video, pad, len) = if placeholders { (n, n + 1, n + 2, n as usize + 3) } else { (0, 0, 0, n as usize) };
    Ok(SpecialIds { unk: 0, bos: 1, eos: 2, image, video, pad, len })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::checkpoint::tokenizer_convert::{SpmSettings, convert};

    #[test]
    fn synth_checkpoints_with_tokenizer_model_only_convert_to_their_ids() -> Result<()> {
        use crate::checkpoint::Checkpoint;
        use crate::checkpoint::tokenizer_convert::TokenizerSource;
        use crate::synth::{Preset, SynthSpec, SynthTokenizer, synthesize};
        use vl_runtime::manifest::CheckpointLayout;
        for layout in [CheckpointLayout::HfV5, CheckpointLayout::Original] {
            let dir = tempfile::tempdir().map_err(|e| Error::io("tempdir", e))?;
            let spec =
                SynthSpec { layout, tokenizer: SynthTokenizer::SentencePiece, ..SynthSpec::preset(Preset::Tiny) };
            synthesize(&spec, dir.path())?;
            assert!(!dir.path().join("tokenizer.json").exists());
            let ck = Checkpoint::open(dir.path())?;
            let source = ck.tokenizer_source()?;
            assert!(matches!(source, TokenizerSource::SentencePiece(..)), "{source:?}");
            let tok = source.load()?;
            let t = &ck.config.text;
            assert_eq!((tok.token_to_id("<s>"), tok.token_to_id("</s>")), (Some(t.bos), Some(t.eos)));
            if layout != CheckpointLayout::Original {
                assert_eq!(tok.token_to_id("<video>"), Some(ck.config.video_token));
                assert_eq!(tok.token_to_id("<image>"), Some(ck.config.image_token));
            }
            let out = dir.path().join("engine-tokenizer.json");
            assert!(source.write_engine_file(&out)?.is_some());
            assert_eq!(
                tokenizers::Tokenizer::from_file(&out).map_err(tok_err)?.get_vocab_size(true),
                tok.get_vocab_size(true)
            );
        }
        Ok(())
    }

    #[test]
    fn the_synth_model_converts_and_round_trips_text() -> Result<()> {
        let model = model(300)?;
        assert!(model.pieces.len() > 259 + 50, "{} pieces", model.pieces.len());
        let tok = convert(&model, Path::new("synth/tokenizer.model"), &SpmSettings::default())?;
        for text in CORPUS.iter().chain(&["unseen ẞ 🎈 text", "  two\n\tlines"]) {
            let ids = tok.encode(*text, true).map_err(tok_err)?;
            assert_eq!(ids.get_ids()[0], 1, "BOS first");
            assert!(!ids.get_ids().contains(&0), "no <unk> for {text:?} (byte fallback)");
            assert_eq!(tok.decode(ids.get_ids(), true).map_err(tok_err)?, *text);
        }
        let words = tok.encode("The video shows a cat", false).map_err(tok_err)?;
        assert!(words.get_ids().len() <= 8, "merges apply: {:?}", words.get_tokens());
        Ok(())
    }
}
