//! The work a stage needs, from the checkpoint's `config.json`: FLOPs for vision and prefill
//! (bounded by the GEMM rate) and bytes per decode step (bounded by memory bandwidth).
//!
//! FLOPs count the useful work only: the vision layers up to `vision_feature_layer` (a system
//! that also runs the unused last layer pays for it), causal attention as half the square, and
//! the LM head for the one position whose logits are kept.
use std::path::Path;

use serde::Serialize;
use serde_json::Value;

use super::{BenchError, Result, read_json};

/// Widths of the vision tower and projector.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct VisionDims {
    /// Tower width.
    pub hidden: usize,
    /// Tower MLP width.
    pub intermediate: usize,
    /// Layers whose output is needed (up to the feature layer).
    pub layers_needed: usize,
    /// Layers in the checkpoint.
    pub layers_total: usize,
    /// Frame side.
    pub image_size: usize,
    /// Patch side.
    pub patch_size: usize,
    /// Feature layers concatenated into the projector.
    pub feature_layers: usize,
}

/// Widths of the language model.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct TextDims {
    /// Model width.
    pub hidden: usize,
    /// MLP width.
    pub intermediate: usize,
    /// Decoder layers.
    pub layers: usize,
    /// Query heads.
    pub heads: usize,
    /// Key/value heads.
    pub kv_heads: usize,
    /// Head width.
    pub head_dim: usize,
    /// Rows of the LM head.
    pub vocab: usize,
}

/// What the checkpoint's work costs.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct ModelCost {
    /// Vision tower and projector.
    pub vision: VisionDims,
    /// Language model.
    pub text: TextDims,
}

fn field(obj: &Value, key: &str) -> Result<usize> {
    obj.get(key)
        .and_then(Value::as_u64)
        .map(|v| v as usize)
        .ok_or_else(|| BenchError::Plan(format!("config.json: no integer `{key}`")))
}

fn feature_layers(cfg: &Value, total: usize) -> Result<(usize, usize)> {
    let resolve = |v: i64| if v < 0 { (total as i64 + 1 + v).max(0) as usize } else { v as usize };
    match cfg.get("vision_feature_layer") {
        Some(Value::Number(n)) => Ok((resolve(n.as_i64().unwrap_or(-2)), 1)),
        Some(Value::Array(items)) => {
            let layers: Vec<usize> = items.iter().filter_map(Value::as_i64).map(resolve).collect();
            Ok((layers.iter().copied().max().unwrap_or(total), layers.len().max(1)))
        }
        _ => Ok((resolve(-2), 1)),
    }
}

impl ModelCost {
    /// Reads `config.json` of a Video-LLaVA checkpoint directory.
    pub fn from_checkpoint(dir: &Path) -> Result<Self> {
        let cfg: Value = read_json(&dir.join("config.json"))?;
        Self::from_config(&cfg)
    }

    /// From a parsed `config.json`.
    pub fn from_config(cfg: &Value) -> Result<Self> {
        let missing = |k: &str| BenchError::Plan(format!("config.json: no `{k}`"));
        let v = cfg.get("vision_config").ok_or_else(|| missing("vision_config"))?;
        let t = cfg.get("text_config").ok_or_else(|| missing("text_config"))?;
        let layers_total = field(v, "num_hidden_layers")?;
        let (layers_needed, n_features) = feature_layers(cfg, layers_total)?;
        let heads = field(t, "num_attention_heads")?;
        let hidden = field(t, "hidden_size")?;
        Ok(Self {
            vision: VisionDims {
                hidden: field(v, "hidden_size")?,
                intermediate: field(v, "intermediate_size")?,
                layers_needed,
                layers_total,
                image_size: field(v, "image_size")?,
                patch_size: field(v, "patch_size")?,
                feature_layers: n_features,
            },
            text: TextDims {
                hidden,
                intermediate: field(t, "intermediate_size")?,
                layers: field(t, "num_hidden_layers")?,
                heads,
                kv_heads: field(t, "num_key_value_heads").unwrap_or(heads),
                head_dim: field(t, "head_dim").unwrap_or(hidden / heads.max(1)),
                vocab: field(t, "vocab_size")?,
            },
        })
    }

    /// Visual tokens per frame (patches + CLS).
    pub fn tokens_per_frame(&self) -> usize {
        let side = self.vision.image_size / self.vision.patch_size.max(1);
        side * side + 1
    }

    /// FLOPs of the vision tower (needed layers) and projector for `frames` frames.
    pub fn vision_flops(&self, frames: usize) -> f64 {
        let v = &self.vision;
        let (d, i) = (v.hidden as f64, v.intermediate as f64);
        let t = self.tokens_per_frame() as f64;
        let patches = t - 1.0;
        let patch_embed = 2.0 * patches * (3 * v.patch_size * v.patch_size) as f64 * d;
        let layer = 2.0 * t * (4.0 * d * d + 2.0 * d * i) + 4.0 * t * t * d;
        let text = self.text.hidden as f64;
        let feature_width = d * v.feature_layers as f64;
        let projector = 2.0 * t * (feature_width * text + text * text);
        frames as f64 * (patch_embed + v.layers_needed as f64 * layer + projector)
    }

    /// FLOPs of a decoder call on `tokens` new positions after `past` cached ones, with logits
    /// for the last position only.
    pub fn prefill_flops(&self, tokens: usize, past: usize) -> f64 {
        let t = &self.text;
        let (d, n) = (t.hidden as f64, tokens as f64);
        let q = (t.heads * t.head_dim) as f64;
        let kv = (t.kv_heads * t.head_dim) as f64;
        let linear = 2.0 * n * (d * q + 2.0 * d * kv + q * d + 3.0 * d * t.intermediate as f64);
        // Each query attends to the past and to itself and the new positions before it.
        let pairs = n * past as f64 + n * (n + 1.0) / 2.0;
        let attention = 4.0 * q * pairs;
        t.layers as f64 * (linear + attention) + 2.0 * d * t.vocab as f64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vl7b_slice() -> Value {
        serde_json::json!({
            "vision_feature_layer": -2,
            "vision_config": {"hidden_size": 1024, "intermediate_size": 4096, "num_hidden_layers": 3,
                              "image_size": 224, "patch_size": 14},
            "text_config": {"hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 2,
                            "num_attention_heads": 32, "num_key_value_heads": 32, "vocab_size": 32064}
        })
    }

    #[test]
    fn feature_layer_minus_two_needs_all_but_the_last_layer() {
        let c = ModelCost::from_config(&vl7b_slice()).expect("config");
        assert_eq!((c.vision.layers_needed, c.vision.layers_total), (2, 3));
        assert_eq!(c.tokens_per_frame(), 257);
        assert_eq!(c.text.head_dim, 128);
    }

    #[test]
    fn prefill_flops_are_about_two_per_weight_per_token() {
        let c = ModelCost::from_config(&vl7b_slice()).expect("config");
        // 2 layers × 202 M weights; 2,079 tokens; attention adds a few percent.
        let weights = 2.0 * (4.0 * 4096.0 * 4096.0 + 3.0 * 4096.0 * 11008.0);
        let f = c.prefill_flops(2079, 0);
        let linear = 2.0 * 2079.0 * weights;
        assert!(f > linear && f < 1.06 * linear, "{f} vs {linear}");
        // A chunk after a past attends to the past too.
        assert!(c.prefill_flops(100, 1000) > c.prefill_flops(100, 0));
    }

    #[test]
    fn vision_flops_scale_with_frames() {
        let c = ModelCost::from_config(&vl7b_slice()).expect("config");
        let one = c.vision_flops(1);
        assert!((c.vision_flops(8) / one - 8.0).abs() < 1e-9);
        // Two CLIP-L layers and the 1024→4096→4096 projector on 257 tokens: ~24 GFLOP a frame.
        assert!(one > 20e9 && one < 30e9, "{one}");
    }
}
