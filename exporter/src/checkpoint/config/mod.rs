//! `config.json` of the Hugging Face port: read field by field with their JSON types checked
//! (`raw`), then resolved once with transformers' defaults (`resolve`) into plain structs, so
//! that graph code never sees an `Option`.
mod raw;
mod resolve;

use std::path::Path;

pub(crate) use raw::{Fields, RawText, RawVision};
/// transformers' defaults for fields `config.json` leaves out.
pub mod defaults {
    pub use super::resolve::{clip, llama, video_llava};
}

use crate::error::{Error, Result};

/// The architecture this exporter reads.
pub const HF_ARCHITECTURE: &str = "VideoLlavaForConditionalGeneration";

/// Activation functions the graphs implement.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Activation {
    /// `x * sigmoid(1.702 x)` (CLIP).
    QuickGelu,
    /// Exact erf GELU.
    Gelu,
    /// `x * sigmoid(x)`.
    Silu,
}

impl Activation {
    pub(crate) fn parse(name: &str, path: &Path, field: &str) -> Result<Self> {
        match name {
            "quick_gelu" => Ok(Self::QuickGelu),
            "gelu" => Ok(Self::Gelu),
            "silu" | "swish" => Ok(Self::Silu),
            other => Err(Error::Config {
                path: path.to_path_buf(),
                message: format!("{field} = {other:?} is not supported (quick_gelu, gelu, silu are)"),
            }),
        }
    }
}

/// Which tokens of the vision tower's output images keep.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SelectStrategy {
    /// Drop CLS (images only; videos keep it either way).
    Default,
    /// Keep CLS.
    Full,
}

/// Temporal attention in every encoder layer of a LanguageBind video tower.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Temporal {
    /// Frames per clip: the rows of each layer's `temporal_embedding` (`num_frames`).
    pub frames: usize,
}

/// The CLIP vision tower.
#[derive(Debug, Clone, PartialEq)]
pub struct VisionConfig {
    /// Width.
    pub hidden: usize,
    /// MLP width.
    pub intermediate: usize,
    /// Layers in the checkpoint.
    pub layers: usize,
    /// Attention heads.
    pub heads: usize,
    /// Input side in pixels.
    pub image_size: usize,
    /// Patch side in pixels.
    pub patch_size: usize,
    /// Input channels.
    pub channels: usize,
    /// MLP activation.
    pub act: Activation,
    /// LayerNorm epsilon.
    pub ln_eps: f32,
    /// Temporal attention before each layer's spatial attention (the original video tower).
    pub temporal: Option<Temporal>,
}

impl VisionConfig {
    /// Patches per side.
    pub fn grid(&self) -> usize {
        self.image_size / self.patch_size
    }
    /// Tokens per frame: patches and CLS.
    pub fn tokens(&self) -> usize {
        self.grid() * self.grid() + 1
    }
}

/// Rotary position embedding settings.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Rope {
    /// Base θ.
    pub theta: f64,
    /// Linear scaling factor (1 = none): positions are divided by it.
    pub linear_factor: f64,
}

/// The LLaMA text model.
#[derive(Debug, Clone, PartialEq)]
pub struct TextConfig {
    /// Width.
    pub hidden: usize,
    /// MLP width.
    pub intermediate: usize,
    /// Decoder layers.
    pub layers: usize,
    /// Query heads.
    pub heads: usize,
    /// Key/value heads.
    pub kv_heads: usize,
    /// Width of one head.
    pub head_dim: usize,
    /// RMSNorm epsilon.
    pub rms_eps: f32,
    /// Rotary embedding.
    pub rope: Rope,
    /// Rows of the embedding table and the logits.
    pub vocab: usize,
    /// Context length.
    pub max_positions: usize,
    /// `lm_head` shares the embedding table.
    pub tie_embeddings: bool,
    /// q/k/v/o projections have biases.
    pub attention_bias: bool,
    /// MLP projections have biases.
    pub mlp_bias: bool,
    /// Beginning of sequence.
    pub bos: u32,
    /// End of sequence (the first if several).
    pub eos: u32,
    /// Padding, if set.
    pub pad: Option<u32>,
}

/// A resolved Video-LLaVA config.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelConfig {
    /// `architectures[0]`.
    pub architecture: String,
    /// The video tower (the Hugging Face port's single `vision_config`).
    pub vision: VisionConfig,
    /// The image tower (the same as `vision` in the Hugging Face port).
    pub image_vision: VisionConfig,
    /// Text model.
    pub text: TextConfig,
    /// Indices into `hidden_states` whose outputs are concatenated as features.
    pub feature_layers: Vec<i64>,
    /// Image token selection.
    pub select: SelectStrategy,
    /// Image placeholder id.
    pub image_token: u32,
    /// Video placeholder id.
    pub video_token: u32,
    /// Projector activation.
    pub projector_act: Activation,
    /// Projector linears have biases.
    pub projector_bias: bool,
    /// `image_seq_length` (informational: the processor's tokens per image).
    pub image_seq_length: usize,
    /// `video_seq_length` (informational: the processor's tokens per video).
    pub video_seq_length: usize,
}

impl ModelConfig {
    /// Reads and resolves `dir/config.json`.
    pub fn load(dir: &Path) -> Result<Self> {
        let path = dir.join("config.json");
        let text = std::fs::read_to_string(&path).map_err(|e| Error::io(&path, e))?;
        Self::parse(&text, &path)
    }

    /// Resolves a config from JSON text; `path` is only used in errors.
    pub fn parse(text: &str, path: &Path) -> Result<Self> {
        let value: serde_json::Value =
            serde_json::from_str(text).map_err(|e| Error::Config { path: path.into(), message: e.to_string() })?;
        let arch =
            value.get("architectures").and_then(|a| a.get(0)).and_then(|a| a.as_str()).unwrap_or_default().to_string();
        let model_type = value.get("model_type").and_then(|m| m.as_str()).unwrap_or_default();
        if arch != HF_ARCHITECTURE && model_type != "video_llava" {
            let found = if arch.is_empty() { format!("model_type {model_type:?}") } else { arch };
            return Err(Error::UnknownArchitecture { path: path.into(), found });
        }
        raw::RawConfig::read(&value, path)?.resolve(path)
    }

    /// The number of encoder layers that must run to produce every feature layer.
    pub fn vision_layers_needed(&self) -> usize {
        self.feature_indices().into_iter().max().unwrap_or(0)
    }

    /// Feature layers as non-negative indices into `hidden_states` (0 = embeddings).
    pub fn feature_indices(&self) -> Vec<usize> {
        self.feature_indices_for(&self.vision)
    }

    /// Feature layers of `tower` as non-negative indices into its `hidden_states`.
    pub fn feature_indices_for(&self, tower: &VisionConfig) -> Vec<usize> {
        let n = tower.layers as i64 + 1;
        self.feature_layers.iter().map(|&l| if l < 0 { (n + l) as usize } else { l as usize }).collect()
    }

    /// Checks that every feature layer exists in `tower` (`what` names it in the error).
    pub(super) fn check_feature_layers(&self, tower: &VisionConfig, what: &str, path: &Path) -> Result<()> {
        let hs = tower.layers as i64 + 1;
        match self.feature_layers.iter().find(|&&l| l >= hs || l < -hs) {
            Some(l) => Err(Error::Config {
                path: path.into(),
                message: format!(
                    "feature layer {l} is outside the {hs} hidden states of the {}-layer {what}",
                    tower.layers
                ),
            }),
            None => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests;
#[cfg(test)]
mod tests_defaults;
