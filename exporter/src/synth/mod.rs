//! `vl-export synth`: complete checkpoints (Hugging Face port or original layout) with random weights, for
//! tests, demos and benchmarks (real weights cannot be downloaded here).
mod files;
mod published;
mod spm;
pub mod tokenizer;
pub mod torch_bin;
#[cfg(test)]
mod torch_tests;
mod torch_zip_writer;
mod weights;

use std::path::Path;

use vl_runtime::manifest::CheckpointLayout;

pub use crate::checkpoint::WeightsFormat;
use crate::error::{Error, Result};

/// A tensor to write: name, shape, little-endian bytes.
pub type NamedTensor = (String, Vec<usize>, Vec<u8>);

/// Named sizes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Preset {
    /// Small enough for CI: 56 px frames, 17 tokens each, a 2-layer 64-wide LLaMA.
    Tiny,
    /// For demos: 112 px frames, 65 tokens each, a 4-layer 256-wide LLaMA.
    Small,
    /// The real 7B widths with only a few layers, for benchmarks.
    Vl7bSlice,
}

/// Element type of the synthesized weights.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WeightDtype {
    /// 32-bit float.
    F32,
    /// IEEE half.
    F16,
    /// bfloat16 (what the published checkpoints use).
    Bf16,
}

/// The tokenizer file a synthesized checkpoint ships.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum SynthTokenizer {
    /// `tokenizer.json` (byte-level BPE).
    #[default]
    Json,
    /// SentencePiece's `tokenizer.model` only, as the published checkpoints may ship it (with
    /// `added_tokens.json` for the placeholders in the Hugging Face layout).
    SentencePiece,
}

/// Everything that defines a synthesized checkpoint.
#[derive(Debug, Clone)]
pub struct SynthSpec {
    /// Vision width.
    pub vision_hidden: usize,
    /// Vision MLP width.
    pub vision_intermediate: usize,
    /// Vision layers.
    pub vision_layers: usize,
    /// Vision heads.
    pub vision_heads: usize,
    /// Frame side in pixels.
    pub image_size: usize,
    /// Patch side in pixels.
    pub patch_size: usize,
    /// Text width.
    pub text_hidden: usize,
    /// Text MLP width.
    pub text_intermediate: usize,
    /// Decoder layers.
    pub text_layers: usize,
    /// Query heads.
    pub heads: usize,
    /// Key/value heads.
    pub kv_heads: usize,
    /// Context length.
    pub max_positions: usize,
    /// Rows of the embedding table; `None` = tokenizer size plus 5 (deliberately odd).
    pub vocab_size: Option<usize>,
    /// Learned tokens of the synthesized tokenizer.
    pub tokenizer_vocab: usize,
    /// `vision_feature_layer`: one index or several to concatenate.
    pub feature_layers: Vec<i64>,
    /// `vision_feature_select_strategy` is `full` rather than `default`.
    pub keep_cls: bool,
    /// Tie `lm_head` to the embeddings (and omit it from the file).
    pub tie_embeddings: bool,
    /// Linear rope scaling factor, if any.
    pub rope_linear: Option<f64>,
    /// Weight type.
    pub dtype: WeightDtype,
    /// Tensor-name layout.
    pub layout: CheckpointLayout,
    /// File format of the weights: `model.safetensors`, or two `.bin` shards with
    /// `pytorch_model.bin.index.json` (as the original Video-LLaVA release ships them).
    pub weights_format: WeightsFormat,
    /// RNG seed.
    pub seed: u64,
    /// The published `LanguageBind/Video-LLaVA-7B-hf` shape: sparse `config.json`,
    /// transformers-4 names in two shards with an index, no `video_preprocessor_config.json`,
    /// a `generation_config.json` (forces the `HfV4` layout).
    pub published: bool,
    /// Which tokenizer file to write.
    pub tokenizer: SynthTokenizer,
}

impl SynthSpec {
    /// The spec of a preset.
    pub fn preset(p: Preset) -> Self {
        let base = SynthSpec {
            vision_hidden: 32,
            vision_intermediate: 64,
            vision_layers: 3,
            vision_heads: 4,
            image_size: 56,
            patch_size: 14,
            text_hidden: 64,
            text_intermediate: 96,
            text_layers: 2,
            heads: 4,
            kv_heads: 4,
            max_positions: 512,
            vocab_size: None,
            tokenizer_vocab: 600,
            feature_layers: vec![-2],
            keep_cls: false,
            tie_embeddings: false,
            rope_linear: None,
            dtype: WeightDtype::F32,
            layout: CheckpointLayout::HfV5,
            weights_format: WeightsFormat::Safetensors,
            seed: 0,
            published: false,
            tokenizer: SynthTokenizer::Json,
        };
        match p {
            Preset::Tiny => base,
            Preset::Small => SynthSpec {
                vision_hidden: 128,
                vision_intermediate: 256,
                vision_layers: 4,
                image_size: 112,
                text_hidden: 256,
                text_intermediate: 512,
                text_layers: 4,
                heads: 8,
                kv_heads: 8,
                max_positions: 2048,
                tokenizer_vocab: 1000,
                ..base
            },
            Preset::Vl7bSlice => SynthSpec {
                vision_hidden: 1024,
                vision_intermediate: 4096,
                vision_layers: 3,
                vision_heads: 16,
                image_size: 224,
                text_hidden: 4096,
                text_intermediate: 11008,
                text_layers: 2,
                heads: 32,
                kv_heads: 32,
                max_positions: 4096,
                vocab_size: Some(32064),
                tokenizer_vocab: 1000,
                dtype: WeightDtype::Bf16,
                ..base
            },
        }
    }

    fn validate(&self) -> Result<()> {
        let bad = |m: String| Err(Error::Invalid(m));
        if self.heads == 0 || self.kv_heads == 0 || !self.heads.is_multiple_of(self.kv_heads) {
            return bad(format!("heads {} must be a multiple of kv heads {}", self.heads, self.kv_heads));
        }
        if !self.text_hidden.is_multiple_of(self.heads) || !(self.text_hidden / self.heads).is_multiple_of(2) {
            return bad(format!("text width {} must split into {} heads of even width", self.text_hidden, self.heads));
        }
        if self.vision_heads == 0 || !self.vision_hidden.is_multiple_of(self.vision_heads) {
            return bad(format!("vision width {} must split into {} heads", self.vision_hidden, self.vision_heads));
        }
        if self.patch_size == 0 || !self.image_size.is_multiple_of(self.patch_size) {
            return bad(format!("image size {} must be a multiple of patch {}", self.image_size, self.patch_size));
        }
        if self.published && self.layout != CheckpointLayout::HfV4 {
            return bad("the published shape uses transformers 4 names (the HfV4 layout)".into());
        }
        if self.vision_layers == 0 || self.text_layers == 0 {
            return bad("at least one vision and one text layer".into());
        }
        Ok(())
    }
}

/// Writes a complete checkpoint for `spec` into `out` (created if needed).
pub fn synthesize(spec: &SynthSpec, out: &Path) -> Result<()> {
    spec.validate()?;
    std::fs::create_dir_all(out).map_err(|e| Error::io(out, e))?;
    let ids = match spec.tokenizer {
        SynthTokenizer::Json => tokenizer::write(&out.join("tokenizer.json"), spec.tokenizer_vocab)?,
        SynthTokenizer::SentencePiece => {
            spm::write(out, spec.tokenizer_vocab, spec.layout != CheckpointLayout::Original)?
        }
    };
    let vocab = spec.vocab_size.unwrap_or(ids.len + 5);
    if vocab < ids.len {
        return Err(Error::Invalid(format!("vocab size {vocab} is smaller than the tokenizer's {}", ids.len)));
    }
    files::write_configs(spec, &ids, vocab, out)?;
    let tensors = weights::generate(spec, vocab);
    match spec.weights_format {
        WeightsFormat::Safetensors if spec.published => weights::write_sharded_safetensors(spec, tensors, out, 2),
        WeightsFormat::Safetensors => weights::write_safetensors(spec, tensors, &out.join("model.safetensors")),
        WeightsFormat::TorchBin => torch_bin::write_sharded(out, tensors, weights::dtype(spec), 2),
    }
}
