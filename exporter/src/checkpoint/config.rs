//! `config.json` of the Hugging Face port: a raw serde view with defaults, resolved once into
//! plain structs so that graph code never sees an `Option`.
use std::path::Path;

use serde::Deserialize;

use crate::error::{Error, Result};

/// The architecture this exporter reads.
pub const HF_ARCHITECTURE: &str = "VideoLlavaForConditionalGeneration";

#[derive(Deserialize)]
struct RawConfig {
    #[serde(default)]
    architectures: Vec<String>,
    text_config: RawText,
    vision_config: RawVision,
    #[serde(default = "default_feature_layer")]
    vision_feature_layer: FeatureLayer,
    #[serde(default = "default_strategy")]
    vision_feature_select_strategy: String,
    #[serde(alias = "image_token_id")]
    image_token_index: u32,
    #[serde(alias = "video_token_id")]
    video_token_index: u32,
    #[serde(default = "default_gelu")]
    projector_hidden_act: String,
    #[serde(default = "default_true")]
    multimodal_projector_bias: bool,
    #[serde(default)]
    tie_word_embeddings: Option<bool>,
}

#[derive(Deserialize, Clone)]
#[serde(untagged)]
enum FeatureLayer {
    One(i64),
    Many(Vec<i64>),
}

#[derive(Deserialize)]
pub(super) struct RawText {
    hidden_size: usize,
    intermediate_size: usize,
    num_hidden_layers: usize,
    num_attention_heads: usize,
    #[serde(default)]
    num_key_value_heads: Option<usize>,
    #[serde(default)]
    head_dim: Option<usize>,
    #[serde(default = "default_rms_eps")]
    rms_norm_eps: f64,
    #[serde(default)]
    rope_theta: Option<f64>,
    #[serde(default)]
    rope_scaling: Option<RawRope>,
    #[serde(default)]
    rope_parameters: Option<RawRope>,
    vocab_size: usize,
    #[serde(default = "default_max_pos")]
    max_position_embeddings: usize,
    #[serde(default)]
    tie_word_embeddings: Option<bool>,
    #[serde(default)]
    attention_bias: bool,
    #[serde(default)]
    mlp_bias: bool,
    #[serde(default = "default_silu")]
    hidden_act: String,
    #[serde(default = "default_bos")]
    bos_token_id: u32,
    #[serde(default = "default_eos")]
    eos_token_id: EosIds,
    #[serde(default)]
    pad_token_id: Option<u32>,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum EosIds {
    One(u32),
    Many(Vec<u32>),
}

#[derive(Deserialize, Default)]
struct RawRope {
    #[serde(default)]
    rope_theta: Option<f64>,
    #[serde(default, alias = "type")]
    rope_type: Option<String>,
    #[serde(default)]
    factor: Option<f64>,
}

#[derive(Deserialize)]
pub(super) struct RawVision {
    hidden_size: usize,
    intermediate_size: usize,
    num_hidden_layers: usize,
    num_attention_heads: usize,
    image_size: usize,
    patch_size: usize,
    #[serde(default = "default_quick_gelu")]
    hidden_act: String,
    #[serde(default = "default_ln_eps")]
    layer_norm_eps: f64,
    #[serde(default = "default_channels")]
    num_channels: usize,
}

fn default_feature_layer() -> FeatureLayer {
    FeatureLayer::One(-2)
}
fn default_strategy() -> String {
    "default".into()
}
fn default_gelu() -> String {
    "gelu".into()
}
fn default_true() -> bool {
    true
}
fn default_rms_eps() -> f64 {
    1e-6
}
fn default_max_pos() -> usize {
    4096
}
fn default_silu() -> String {
    "silu".into()
}
fn default_bos() -> u32 {
    1
}
fn default_eos() -> EosIds {
    EosIds::One(2)
}
fn default_quick_gelu() -> String {
    "quick_gelu".into()
}
fn default_ln_eps() -> f64 {
    1e-5
}
fn default_channels() -> usize {
    3
}

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
    pub(super) fn parse(name: &str, path: &Path, field: &str) -> Result<Self> {
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
#[derive(Debug, Clone)]
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
#[derive(Debug, Clone, Copy)]
pub struct Rope {
    /// Base θ.
    pub theta: f64,
    /// Linear scaling factor (1 = none): positions are divided by it.
    pub linear_factor: f64,
}

/// The LLaMA text model.
#[derive(Debug, Clone)]
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
#[derive(Debug, Clone)]
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
        let raw: RawConfig =
            serde_json::from_value(value).map_err(|e| Error::Config { path: path.into(), message: e.to_string() })?;
        raw.resolve(path)
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

impl RawVision {
    /// The resolved tower; `prefix` names where the fields came from in errors.
    pub(super) fn resolve(&self, path: &Path, prefix: &str) -> Result<VisionConfig> {
        let bad = |message: String| Error::Config { path: path.into(), message };
        let v = self;
        for (what, n) in [
            ("num_attention_heads", v.num_attention_heads),
            ("patch_size", v.patch_size),
            ("hidden_size", v.hidden_size),
        ] {
            if n == 0 {
                return Err(bad(format!("{prefix}{what} must be positive")));
            }
        }
        if !v.hidden_size.is_multiple_of(v.num_attention_heads) {
            return Err(bad(format!("{prefix}hidden_size is not a multiple of its heads")));
        }
        if !v.image_size.is_multiple_of(v.patch_size) {
            return Err(bad(format!("image_size {} is not a multiple of patch_size {}", v.image_size, v.patch_size)));
        }
        Ok(VisionConfig {
            hidden: v.hidden_size,
            intermediate: v.intermediate_size,
            layers: v.num_hidden_layers,
            heads: v.num_attention_heads,
            image_size: v.image_size,
            patch_size: v.patch_size,
            channels: v.num_channels,
            act: Activation::parse(&v.hidden_act, path, &format!("{prefix}hidden_act"))?,
            ln_eps: v.layer_norm_eps as f32,
            temporal: None,
        })
    }
}

impl RawText {
    /// The resolved LLaMA; `prefix` names where the fields came from in errors, `tie_top` is a
    /// `tie_word_embeddings` found outside these fields.
    pub(super) fn resolve(&self, path: &Path, prefix: &str, tie_top: Option<bool>) -> Result<TextConfig> {
        let bad = |message: String| Error::Config { path: path.into(), message };
        let t = self;
        for (what, n) in [
            ("hidden_size", t.hidden_size),
            ("num_attention_heads", t.num_attention_heads),
            ("num_hidden_layers", t.num_hidden_layers),
        ] {
            if n == 0 {
                return Err(bad(format!("{prefix}{what} must be positive")));
            }
        }
        let kv_heads = t.num_key_value_heads.unwrap_or(t.num_attention_heads);
        if kv_heads == 0 || !t.num_attention_heads.is_multiple_of(kv_heads) {
            return Err(bad(format!(
                "num_attention_heads {} is not a multiple of num_key_value_heads {kv_heads}",
                t.num_attention_heads
            )));
        }
        let head_dim = t.head_dim.unwrap_or(t.hidden_size / t.num_attention_heads);
        if !head_dim.is_multiple_of(2) {
            return Err(bad(format!("head_dim {head_dim} must be even for rotary embeddings")));
        }
        let rope = resolve_rope(t, path)?;
        if Activation::parse(&t.hidden_act, path, &format!("{prefix}hidden_act"))? != Activation::Silu {
            return Err(bad(format!("{prefix}hidden_act {:?}: LLaMA decoders use silu", t.hidden_act)));
        }
        let eos = match &t.eos_token_id {
            EosIds::One(e) => *e,
            EosIds::Many(es) => *es.first().ok_or_else(|| bad("eos_token_id is an empty list".into()))?,
        };
        Ok(TextConfig {
            hidden: t.hidden_size,
            intermediate: t.intermediate_size,
            layers: t.num_hidden_layers,
            heads: t.num_attention_heads,
            kv_heads,
            head_dim,
            rms_eps: t.rms_norm_eps as f32,
            rope,
            vocab: t.vocab_size,
            max_positions: t.max_position_embeddings,
            tie_embeddings: t.tie_word_embeddings.or(tie_top).unwrap_or(false),
            attention_bias: t.attention_bias,
            mlp_bias: t.mlp_bias,
            bos: t.bos_token_id,
            eos,
            pad: t.pad_token_id,
        })
    }
}

impl RawConfig {
    fn resolve(self, path: &Path) -> Result<ModelConfig> {
        let bad = |message: String| Error::Config { path: path.into(), message };
        let text = self.text_config.resolve(path, "text_config.", self.tie_word_embeddings)?;
        let vision = self.vision_config.resolve(path, "vision_config.")?;
        let v = &self.vision_config;
        let feature_layers = match &self.vision_feature_layer {
            FeatureLayer::One(l) => vec![*l],
            FeatureLayer::Many(ls) if !ls.is_empty() => ls.clone(),
            FeatureLayer::Many(_) => return Err(bad("vision_feature_layer is an empty list".into())),
        };
        let hs = v.num_hidden_layers as i64 + 1;
        if let Some(l) = feature_layers.iter().find(|&&l| l >= hs || l < -hs) {
            return Err(bad(format!(
                "vision_feature_layer {l} is outside the {hs} hidden states of a {}-layer tower",
                v.num_hidden_layers
            )));
        }
        let select = match self.vision_feature_select_strategy.as_str() {
            "default" => SelectStrategy::Default,
            "full" => SelectStrategy::Full,
            other => return Err(bad(format!("vision_feature_select_strategy {other:?} (default or full)"))),
        };
        Ok(ModelConfig {
            architecture: self.architectures.first().cloned().unwrap_or_else(|| HF_ARCHITECTURE.into()),
            image_vision: vision.clone(),
            vision,
            text,
            feature_layers,
            select,
            image_token: self.image_token_index,
            video_token: self.video_token_index,
            projector_act: Activation::parse(&self.projector_hidden_act, path, "projector_hidden_act")?,
            projector_bias: self.multimodal_projector_bias,
        })
    }
}

fn resolve_rope(t: &RawText, path: &Path) -> Result<Rope> {
    let params = t.rope_parameters.as_ref();
    let scaling = t.rope_scaling.as_ref().or(params);
    let theta = params.and_then(|p| p.rope_theta).or(t.rope_theta).unwrap_or(10000.0);
    let kind = scaling.and_then(|s| s.rope_type.clone()).unwrap_or_else(|| "default".into());
    let linear_factor = match kind.as_str() {
        "default" => 1.0,
        "linear" => scaling.and_then(|s| s.factor).ok_or_else(|| Error::Config {
            path: path.into(),
            message: "linear rope scaling without a factor".into(),
        })?,
        other => {
            return Err(Error::Config {
                path: path.into(),
                message: format!("rope type {other:?} is not supported (default and linear are)"),
            });
        }
    };
    Ok(Rope { theta, linear_factor })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn base() -> serde_json::Value {
        serde_json::json!({
            "architectures": ["VideoLlavaForConditionalGeneration"],
            "image_token_index": 10, "video_token_index": 11,
            "text_config": {"hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 2,
                "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 389,
                "rope_parameters": {"rope_theta": 5000.0, "rope_type": "default"}},
            "vision_config": {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 3,
                "num_attention_heads": 4, "image_size": 56, "patch_size": 14}
        })
    }

    fn parse(v: &serde_json::Value) -> Result<ModelConfig> {
        ModelConfig::parse(&v.to_string(), Path::new("config.json"))
    }

    #[test]
    fn resolves_v5_rope_parameters_and_gqa() -> Result<()> {
        let c = parse(&base())?;
        assert_eq!(c.text.rope.theta, 5000.0);
        assert_eq!(c.text.kv_heads, 2);
        assert_eq!(c.text.head_dim, 16);
        assert_eq!(c.feature_indices(), vec![2]);
        assert_eq!(c.vision.tokens(), 17);
        Ok(())
    }

    #[test]
    fn reads_v4_rope_theta_and_linear_scaling() -> Result<()> {
        let mut v = base();
        v["text_config"]["rope_parameters"] = serde_json::Value::Null;
        v["text_config"]["rope_theta"] = serde_json::json!(20000.0);
        v["text_config"]["rope_scaling"] = serde_json::json!({"type": "linear", "factor": 2.0});
        let c = parse(&v)?;
        assert_eq!(c.text.rope.theta, 20000.0);
        assert_eq!(c.text.rope.linear_factor, 2.0);
        Ok(())
    }

    #[test]
    fn feature_layer_list_and_bounds() -> Result<()> {
        let mut v = base();
        v["vision_feature_layer"] = serde_json::json!([-2, -1]);
        assert_eq!(parse(&v)?.feature_indices(), vec![2, 3]);
        v["vision_feature_layer"] = serde_json::json!(7);
        assert!(matches!(parse(&v), Err(Error::Config { .. })));
        Ok(())
    }

    #[test]
    fn rejects_unknown_architecture_and_rope() {
        let mut v = base();
        v["architectures"] = serde_json::json!(["BertModel"]);
        assert!(matches!(parse(&v), Err(Error::UnknownArchitecture { .. })));
        let mut v = base();
        v["text_config"]["rope_parameters"]["rope_type"] = serde_json::json!("yarn");
        assert!(matches!(parse(&v), Err(Error::Config { .. })));
    }
}
