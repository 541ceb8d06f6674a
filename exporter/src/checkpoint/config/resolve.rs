//! Defaults for every field `config.json` may leave out, as transformers resolves them, and the
//! checks that the resolved dimensions describe a model.
//!
//! Followed: transformers 4.46.3 (`LlamaConfig.__init__`, `CLIPVisionConfig.__init__`,
//! `VideoLlavaConfig.__init__`), checked against 4.42.4, 4.57.1 and 5.24.0, where they differ:
//! - `head_dim`: 4.42 has no field (always `hidden_size // num_attention_heads`); 4.46+ reads it,
//!   defaulting to that quotient.
//! - rotary base: 4.x `rope_theta` (default 10000.0) and `rope_scaling` (`type` or `rope_type`);
//!   5.x `rope_parameters` (`rope_theta` defaults to `default_theta` = 10000.0). Both are read; a
//!   `rope_parameters` wins.
//! - `multimodal_projector_bias`: added in 4.5x (default true); before, the projector always had
//!   biases, so the default reproduces every version.
//! - `image_seq_length`/`video_seq_length`: added in 4.46 (256 and 2056); informational.
//! - `hidden_size % num_attention_heads != 0`: 5.x rejects it always (`validate_architecture`);
//!   4.x only fails when `head_dim` is left out, as here.
//! - top-level `tie_word_embeddings`: 4.x `PretrainedConfig` defaults it to true but the 4.x
//!   model ties by `text_config.tie_word_embeddings` (LlamaConfig: false); 5.x defaults both
//!   to false. Here: the text config's value, else the top-level one, else false.
//!
//! `VideoLlavaConfig.__init__` (all versions above): a `text_config` dict without `model_type`
//! becomes `llama`; a missing `text_config` becomes `LlamaConfig()`; a `vision_config` dict
//! without `model_type` becomes `clip_vision_model` with `CLIPVisionConfig`'s own defaults
//! (ViT-B/32 widths: 768, 12 layers, patch 32); a missing `vision_config` becomes the ViT-L/14
//! spelled out in `__init__` (1024 wide, 4096 MLP, 24 layers, 16 heads, patch 14, 224 px).
use std::path::Path;

use super::raw::{RawConfig, RawRope, RawText, RawVision};
use super::{Activation, HF_ARCHITECTURE, ModelConfig, Rope, SelectStrategy, TextConfig, VisionConfig};
use crate::error::{Error, Result};

/// `LlamaConfig` defaults.
pub mod llama {
    /// `vocab_size`.
    pub const VOCAB_SIZE: usize = 32000;
    /// `hidden_size`.
    pub const HIDDEN_SIZE: usize = 4096;
    /// `intermediate_size`.
    pub const INTERMEDIATE_SIZE: usize = 11008;
    /// `num_hidden_layers`.
    pub const NUM_HIDDEN_LAYERS: usize = 32;
    /// `num_attention_heads` (`num_key_value_heads` defaults to it).
    pub const NUM_ATTENTION_HEADS: usize = 32;
    /// `hidden_act`.
    pub const HIDDEN_ACT: &str = "silu";
    /// `max_position_embeddings`.
    pub const MAX_POSITION_EMBEDDINGS: usize = 2048;
    /// `rms_norm_eps`.
    pub const RMS_NORM_EPS: f64 = 1e-6;
    /// `bos_token_id`.
    pub const BOS_TOKEN_ID: u32 = 1;
    /// `eos_token_id`.
    pub const EOS_TOKEN_ID: u32 = 2;
    /// `rope_theta` (5.x: `default_theta`).
    pub const ROPE_THETA: f64 = 10000.0;
    /// `tie_word_embeddings`, `attention_bias`, `mlp_bias`.
    pub const TIE_WORD_EMBEDDINGS: bool = false;
}

/// `CLIPVisionConfig` defaults (a `vision_config` dict that leaves fields out).
pub mod clip {
    /// `hidden_size`.
    pub const HIDDEN_SIZE: usize = 768;
    /// `intermediate_size`.
    pub const INTERMEDIATE_SIZE: usize = 3072;
    /// `num_hidden_layers`.
    pub const NUM_HIDDEN_LAYERS: usize = 12;
    /// `num_attention_heads`.
    pub const NUM_ATTENTION_HEADS: usize = 12;
    /// `num_channels`.
    pub const NUM_CHANNELS: usize = 3;
    /// `image_size`.
    pub const IMAGE_SIZE: usize = 224;
    /// `patch_size`.
    pub const PATCH_SIZE: usize = 32;
    /// `hidden_act`.
    pub const HIDDEN_ACT: &str = "quick_gelu";
    /// `layer_norm_eps`.
    pub const LAYER_NORM_EPS: f64 = 1e-5;
}

/// `VideoLlavaConfig` defaults.
pub mod video_llava {
    /// `image_token_index`.
    pub const IMAGE_TOKEN_INDEX: u32 = 32000;
    /// `video_token_index`.
    pub const VIDEO_TOKEN_INDEX: u32 = 32001;
    /// `projector_hidden_act`.
    pub const PROJECTOR_HIDDEN_ACT: &str = "gelu";
    /// `vision_feature_select_strategy`.
    pub const VISION_FEATURE_SELECT_STRATEGY: &str = "default";
    /// `vision_feature_layer`.
    pub const VISION_FEATURE_LAYER: i64 = -2;
    /// `image_seq_length`.
    pub const IMAGE_SEQ_LENGTH: usize = 256;
    /// `video_seq_length`.
    pub const VIDEO_SEQ_LENGTH: usize = 2056;
    /// `multimodal_projector_bias`.
    pub const MULTIMODAL_PROJECTOR_BIAS: bool = true;
}

/// The vision config `VideoLlavaConfig.__init__` builds when `vision_config` is missing.
pub(crate) fn default_vision_config() -> RawVision {
    RawVision {
        model_type: Some("clip_vision_model".into()),
        hidden_size: Some(1024),
        intermediate_size: Some(4096),
        num_hidden_layers: Some(24),
        num_attention_heads: Some(16),
        image_size: Some(224),
        patch_size: Some(14),
        ..RawVision::default()
    }
}

fn dims(path: &Path, message: String) -> Error {
    Error::ConfigDims { path: path.into(), message }
}

fn positive(path: &Path, prefix: &str, fields: &[(&str, usize)]) -> Result<()> {
    match fields.iter().find(|(_, n)| *n == 0) {
        Some((what, _)) => Err(dims(path, format!("{prefix}{what} must be positive"))),
        None => Ok(()),
    }
}

impl RawVision {
    /// The resolved tower; `prefix` names where the fields came from in errors.
    pub(crate) fn resolve(&self, path: &Path, prefix: &str) -> Result<VisionConfig> {
        if let Some(t) = self.model_type.as_deref().filter(|t| *t != "clip_vision_model") {
            return Err(Error::Config {
                path: path.into(),
                message: format!("{prefix}model_type {t:?} is not supported (clip_vision_model is)"),
            });
        }
        let hidden = self.hidden_size.unwrap_or(clip::HIDDEN_SIZE);
        let heads = self.num_attention_heads.unwrap_or(clip::NUM_ATTENTION_HEADS);
        let image_size = self.image_size.unwrap_or(clip::IMAGE_SIZE);
        let patch_size = self.patch_size.unwrap_or(clip::PATCH_SIZE);
        positive(path, prefix, &[("num_attention_heads", heads), ("patch_size", patch_size), ("hidden_size", hidden)])?;
        if !hidden.is_multiple_of(heads) {
            return Err(dims(
                path,
                format!("{prefix}hidden_size {hidden} is not a multiple of num_attention_heads {heads}"),
            ));
        }
        if !image_size.is_multiple_of(patch_size) {
            return Err(dims(
                path,
                format!("{prefix}image_size {image_size} is not a multiple of patch_size {patch_size}"),
            ));
        }
        let act = self.hidden_act.as_deref().unwrap_or(clip::HIDDEN_ACT);
        Ok(VisionConfig {
            hidden,
            intermediate: self.intermediate_size.unwrap_or(clip::INTERMEDIATE_SIZE),
            layers: self.num_hidden_layers.unwrap_or(clip::NUM_HIDDEN_LAYERS),
            heads,
            image_size,
            patch_size,
            channels: self.num_channels.unwrap_or(clip::NUM_CHANNELS),
            act: Activation::parse(act, path, &format!("{prefix}hidden_act"))?,
            ln_eps: self.layer_norm_eps.unwrap_or(clip::LAYER_NORM_EPS) as f32,
            temporal: None,
        })
    }
}

impl RawText {
    /// The resolved LLaMA; `prefix` names where the fields came from in errors, `tie_top` is a
    /// `tie_word_embeddings` found outside these fields.
    pub(crate) fn resolve(&self, path: &Path, prefix: &str, tie_top: Option<bool>) -> Result<TextConfig> {
        if let Some(t) = self.model_type.as_deref().filter(|t| *t != "llama") {
            return Err(Error::Config {
                path: path.into(),
                message: format!("{prefix}model_type {t:?} is not supported (llama is)"),
            });
        }
        let hidden = self.hidden_size.unwrap_or(llama::HIDDEN_SIZE);
        let heads = self.num_attention_heads.unwrap_or(llama::NUM_ATTENTION_HEADS);
        let layers = self.num_hidden_layers.unwrap_or(llama::NUM_HIDDEN_LAYERS);
        positive(
            path,
            prefix,
            &[("hidden_size", hidden), ("num_attention_heads", heads), ("num_hidden_layers", layers)],
        )?;
        let kv_heads = self.num_key_value_heads.unwrap_or(heads);
        if kv_heads == 0 || !heads.is_multiple_of(kv_heads) {
            return Err(dims(
                path,
                format!("{prefix}num_attention_heads {heads} is not a multiple of num_key_value_heads {kv_heads}"),
            ));
        }
        let head_dim = match self.head_dim {
            Some(d) => d,
            None if hidden.is_multiple_of(heads) => hidden / heads,
            None => {
                return Err(dims(
                    path,
                    format!(
                        "{prefix}hidden_size {hidden} is not a multiple of num_attention_heads {heads} (and no \
                         head_dim is given)"
                    ),
                ));
            }
        };
        if head_dim == 0 || !head_dim.is_multiple_of(2) {
            return Err(dims(path, format!("{prefix}head_dim {head_dim} must be even for rotary embeddings")));
        }
        let rope = resolve_rope(self, path, prefix)?;
        let act = self.hidden_act.as_deref().unwrap_or(llama::HIDDEN_ACT);
        if Activation::parse(act, path, &format!("{prefix}hidden_act"))? != Activation::Silu {
            return Err(Error::Config {
                path: path.into(),
                message: format!("{prefix}hidden_act {act:?}: LLaMA decoders use silu"),
            });
        }
        let eos = match self.eos_token_id.as_deref() {
            None => llama::EOS_TOKEN_ID,
            Some([first, ..]) => *first,
            Some([]) => {
                return Err(Error::Config {
                    path: path.into(),
                    message: format!("{prefix}eos_token_id is an empty list"),
                });
            }
        };
        Ok(TextConfig {
            hidden,
            intermediate: self.intermediate_size.unwrap_or(llama::INTERMEDIATE_SIZE),
            layers,
            heads,
            kv_heads,
            head_dim,
            rms_eps: self.rms_norm_eps.unwrap_or(llama::RMS_NORM_EPS) as f32,
            rope,
            vocab: self.vocab_size.unwrap_or(llama::VOCAB_SIZE),
            max_positions: self.max_position_embeddings.unwrap_or(llama::MAX_POSITION_EMBEDDINGS),
            tie_embeddings: self.tie_word_embeddings.or(tie_top).unwrap_or(llama::TIE_WORD_EMBEDDINGS),
            attention_bias: self.attention_bias.unwrap_or(false),
            mlp_bias: self.mlp_bias.unwrap_or(false),
            bos: self.bos_token_id.unwrap_or(llama::BOS_TOKEN_ID),
            eos,
            pad: self.pad_token_id,
        })
    }
}

fn resolve_rope(t: &RawText, path: &Path, prefix: &str) -> Result<Rope> {
    let params = t.rope_parameters.as_ref();
    let scaling: Option<&RawRope> = t.rope_scaling.as_ref().or(params);
    let theta = params.and_then(|p| p.rope_theta).or(t.rope_theta).unwrap_or(llama::ROPE_THETA);
    let kind = scaling.and_then(|s| s.rope_type.as_deref()).unwrap_or("default");
    let linear_factor = match kind {
        "default" => 1.0,
        "linear" => scaling.and_then(|s| s.factor).ok_or_else(|| Error::Config {
            path: path.into(),
            message: format!("{prefix}rope_scaling: linear scaling without a factor"),
        })?,
        other => {
            return Err(Error::Config {
                path: path.into(),
                message: format!("{prefix}rope type {other:?} is not supported (default and linear are)"),
            });
        }
    };
    Ok(Rope { theta, linear_factor })
}

impl RawConfig {
    /// The resolved config.
    pub(crate) fn resolve(self, path: &Path) -> Result<ModelConfig> {
        let bad = |message: String| Error::Config { path: path.into(), message };
        let text = self.text_config.unwrap_or_default().resolve(path, "text_config.", self.tie_word_embeddings)?;
        let vision = self.vision_config.unwrap_or_else(default_vision_config).resolve(path, "vision_config.")?;
        let feature_layers = self.vision_feature_layer.unwrap_or_else(|| vec![video_llava::VISION_FEATURE_LAYER]);
        if feature_layers.is_empty() {
            return Err(bad("vision_feature_layer is an empty list".into()));
        }
        let hs = vision.layers as i64 + 1;
        if let Some(l) = feature_layers.iter().find(|&&l| l >= hs || l < -hs) {
            return Err(dims(
                path,
                format!(
                    "vision_feature_layer {l} is outside the {hs} hidden states of a {}-layer tower",
                    vision.layers
                ),
            ));
        }
        let strategy =
            self.vision_feature_select_strategy.as_deref().unwrap_or(video_llava::VISION_FEATURE_SELECT_STRATEGY);
        let select = match strategy {
            "default" => SelectStrategy::Default,
            "full" => SelectStrategy::Full,
            other => return Err(bad(format!("vision_feature_select_strategy {other:?} (default or full)"))),
        };
        let projector_act = self.projector_hidden_act.as_deref().unwrap_or(video_llava::PROJECTOR_HIDDEN_ACT);
        Ok(ModelConfig {
            architecture: self.architectures.first().cloned().unwrap_or_else(|| HF_ARCHITECTURE.into()),
            image_vision: vision.clone(),
            vision,
            text,
            feature_layers,
            select,
            image_token: self.image_token_index.unwrap_or(video_llava::IMAGE_TOKEN_INDEX),
            video_token: self.video_token_index.unwrap_or(video_llava::VIDEO_TOKEN_INDEX),
            projector_act: Activation::parse(projector_act, path, "projector_hidden_act")?,
            projector_bias: self.multimodal_projector_bias.unwrap_or(video_llava::MULTIMODAL_PROJECTOR_BIAS),
            image_seq_length: self.image_seq_length.unwrap_or(video_llava::IMAGE_SEQ_LENGTH),
            video_seq_length: self.video_seq_length.unwrap_or(video_llava::VIDEO_SEQ_LENGTH),
        })
    }
}
