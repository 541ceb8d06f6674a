//! A small byte-level BPE tokenizer trained on a fixed corpus, with LLaMA's special tokens and
//! Video-LLaVA's placeholders, written as `tokenizer.json`.
use std::path::Path;

use tokenizers::models::bpe::{BPE, BpeTrainerBuilder};
use tokenizers::models::{ModelWrapper, TrainerWrapper};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::processors::template::TemplateProcessing;
use tokenizers::{AddedToken, Tokenizer, TokenizerBuilder};
use tokenizers::{DecoderWrapper, NormalizerWrapper, PostProcessorWrapper, PreTokenizerWrapper, TokenizerImpl};

use crate::error::{Error, Result};

/// Text the tokenizer is trained on: enough English for merges that read as words, plus
/// multi-byte characters so streaming tests see them.
pub const CORPUS: &[&str] = &[
    "USER: What happens in this video? ASSISTANT: A person walks across the room and sits down.",
    "The video shows a red ball rolling on a wooden floor while a cat watches it closely.",
    "Describe the video in detail. The camera pans slowly from left to right over a green field.",
    "What is the man doing? He is cooking dinner in the kitchen and talking to his friend.",
    "How many people are there? There are three people standing near the blue car.",
    "A chat between a curious human and an artificial intelligence assistant.",
    "The assistant gives helpful, detailed, and polite answers to the human's questions.",
    "Is it day or night? It is a sunny day and the sky is clear with a few white clouds.",
    "Café au lait, crème brûlée, naïve résumé; 日本語の動画です。 🎬 🎥 ✨ — “quotes” and ‘marks’.",
    "Numbers: 0 1 2 3 4 5 6 7 8 9 10 100 2024. Punctuation: ! ? . , ; : ( ) [ ] { } < > / \\ - _ + = * & ^ % $ # @",
];

/// Special token strings in id order: `<unk>`, `<s>`, `</s>` first, as in LLaMA.
pub const LEADING_SPECIALS: [&str; 3] = ["<unk>", "<s>", "</s>"];
/// Placeholders and padding, appended after the learned vocabulary.
pub const TRAILING_SPECIALS: [&str; 3] = ["<image>", "<video>", "<pad>"];

/// Ids of the special tokens of a synthesized tokenizer.
#[derive(Debug, Clone, Copy)]
pub struct SpecialIds {
    /// `<unk>`.
    pub unk: u32,
    /// `<s>`.
    pub bos: u32,
    /// `</s>`.
    pub eos: u32,
    /// `<image>`.
    pub image: u32,
    /// `<video>`.
    pub video: u32,
    /// `<pad>`.
    pub pad: u32,
    /// Tokens in the tokenizer.
    pub len: usize,
}

fn tok_err(e: impl std::fmt::Display) -> Error {
    Error::Tokenizer(e.to_string())
}

/// Trains the tokenizer with about `vocab` learned tokens and saves it to `path`.
pub fn write(path: &Path, vocab: usize) -> Result<SpecialIds> {
    let mut trainer: TrainerWrapper = BpeTrainerBuilder::new()
        .vocab_size(vocab)
        .min_frequency(1)
        .show_progress(false)
        .special_tokens(LEADING_SPECIALS.iter().map(|s| AddedToken::from(*s, true)).collect())
        .initial_alphabet(ByteLevel::alphabet().into_iter().collect())
        .build()
        .into();
    let byte_level = ByteLevel::new(false, true, true);
    let mut tokenizer: TokenizerImpl<
        ModelWrapper,
        NormalizerWrapper,
        PreTokenizerWrapper,
        PostProcessorWrapper,
        DecoderWrapper,
    > = TokenizerBuilder::new()
        .with_model(BPE::default().into())
        .with_normalizer(None)
        .with_pre_tokenizer(Some(byte_level.into()))
        .with_decoder(Some(byte_level.into()))
        .with_post_processor(Some(byte_level.into()))
        .build()
        .map_err(tok_err)?;
    tokenizer.train(&mut trainer, CORPUS.iter()).map_err(tok_err)?;
    let mut tokenizer: Tokenizer = tokenizer.into();
    tokenizer
        .add_special_tokens(TRAILING_SPECIALS.iter().map(|s| AddedToken::from(*s, true)).collect::<Vec<_>>())
        .map_err(tok_err)?;
    let id = |t: &str| tokenizer.token_to_id(t).ok_or_else(|| Error::Tokenizer(format!("{t} has no id")));
    let ids = SpecialIds {
        unk: id("<unk>")?,
        bos: id("<s>")?,
        eos: id("</s>")?,
        image: id("<image>")?,
        video: id("<video>")?,
        pad: id("<pad>")?,
        len: tokenizer.get_vocab_size(true),
    };
    let template = TemplateProcessing::builder()
        .try_single("<s> $A")
        .and_then(|t| t.try_pair("<s> $A <s> $B"))
        .map_err(tok_err)?
        .special_tokens(vec![("<s>", ids.bos)])
        .build()
        .map_err(tok_err)?;
    tokenizer.with_post_processor(Some(template));
    tokenizer.save(path, true).map_err(tok_err)?;
    Ok(ids)
}
