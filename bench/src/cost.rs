//! The work a stage needs, from the model dimensions in an engine's manifest: FLOPs for vision and prefill
//! (bounded by the GEMM rate) and bytes per decode step (bounded by memory bandwidth).
//!
//! FLOPs count the useful work only: the vision layers up to `vision_feature_layer` (a system
//! that also runs the unused last layer pays for it), causal attention as half the square, and
//! the LM head for the one position whose logits are kept.
use std::path::Path;

use serde::Serialize;
use vl_runtime::manifest::{Manifest, ModelDims};

use crate::Result;

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

impl ModelCost {
    /// The resolved dimensions an engine's manifest records (the exporter resolved the
    /// checkpoint's config, transformers' defaults included).
    pub fn from_dims(m: &ModelDims) -> Self {
        Self {
            vision: VisionDims {
                hidden: m.vision_hidden,
                intermediate: m.vision_intermediate,
                layers_needed: m.vision_layers_run,
                layers_total: m.vision_layers,
                image_size: m.image_size,
                patch_size: m.patch_size,
                feature_layers: m.vision_feature_layers,
            },
            text: TextDims {
                hidden: m.text_hidden,
                intermediate: m.text_intermediate,
                layers: m.num_layers,
                heads: m.num_heads,
                kv_heads: m.num_kv_heads,
                head_dim: m.head_dim,
                vocab: m.vocab_size,
            },
        }
    }

    /// From the manifest of the engine in `engine_dir`.
    pub fn from_engine(engine_dir: &Path) -> Result<Self> {
        Ok(Self::from_dims(&Manifest::load(engine_dir)?.model))
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

    /// vl7b-slice: real 7B widths, 3 CLIP layers (2 run for feature layer -2), 2 LLaMA layers.
    fn vl7b_slice() -> ModelCost {
        ModelCost::from_dims(&ModelDims {
            num_frames: 8,
            tokens_per_frame: 257,
            tokens_per_image: 256,
            text_hidden: 4096,
            num_layers: 2,
            num_heads: 32,
            num_kv_heads: 32,
            head_dim: 128,
            vocab_size: 32064,
            image_size: 224,
            patch_size: 14,
            vision_hidden: 1024,
            vision_intermediate: 4096,
            vision_layers: 3,
            vision_layers_run: 2,
            vision_feature_layers: 1,
            text_intermediate: 11008,
            kv_dtype: vl_runtime::manifest::DType::F32,
            kv_layout: Default::default(),
        })
    }

    #[test]
    fn tokens_per_frame_are_the_patches_and_cls() {
        assert_eq!(vl7b_slice().tokens_per_frame(), 257);
    }

    #[test]
    fn prefill_flops_are_about_two_per_weight_per_token() {
        let c = vl7b_slice();
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
        let c = vl7b_slice();
        let one = c.vision_flops(1);
        assert!((c.vision_flops(8) / one - 8.0).abs() < 1e-9);
        // Two CLIP-L layers and the 1024→4096→4096 projector on 257 tokens: ~24 GFLOP a frame.
        assert!(one > 20e9 && one < 30e9, "{one}");
    }
}
