//! The JSON files of a checkpoint: `config.json` as transformers 5 writes it, and the
//! tokenizer and processor configs that `VideoLlavaProcessor.from_pretrained` reads.
use std::path::Path;

use serde_json::json;
use vl_runtime::manifest::CheckpointLayout;

use super::tokenizer::SpecialIds;
use super::{SynthSpec, SynthTokenizer};
use crate::error::{Error, Result};

pub(super) const CLIP_MEAN: [f64; 3] = [0.48145466, 0.4578275, 0.40821073];
pub(super) const CLIP_STD: [f64; 3] = [0.26862954, 0.26130258, 0.27577711];

pub(super) fn write_json(dir: &Path, name: &str, value: &serde_json::Value) -> Result<()> {
    let path = dir.join(name);
    let text = serde_json::to_string_pretty(value).map_err(|e| Error::Invalid(e.to_string()))?;
    std::fs::write(&path, text + "\n").map_err(|e| Error::io(&path, e))
}

fn feature_layer(s: &SynthSpec) -> serde_json::Value {
    match s.feature_layers.as_slice() {
        [one] => json!(one),
        many => json!(many),
    }
}

/// Writes `config.json` and the tokenizer/processor configs.
pub fn write_configs(s: &SynthSpec, ids: &SpecialIds, vocab: usize, out: &Path) -> Result<()> {
    if s.layout == CheckpointLayout::Original {
        return write_original_configs(s, ids, vocab, out);
    }
    let rope = match s.rope_linear {
        Some(f) => json!({"rope_theta": 10000.0, "rope_type": "linear", "factor": f}),
        None => json!({"rope_theta": 10000.0, "rope_type": "default"}),
    };
    let mut text = json!({
        "model_type": "llama", "hidden_act": "silu", "hidden_size": s.text_hidden,
        "intermediate_size": s.text_intermediate, "num_hidden_layers": s.text_layers,
        "num_attention_heads": s.heads, "num_key_value_heads": s.kv_heads,
        "head_dim": s.text_hidden / s.heads, "rms_norm_eps": 1e-5, "vocab_size": vocab,
        "max_position_embeddings": s.max_positions, "tie_word_embeddings": s.tie_embeddings,
        "attention_bias": false, "mlp_bias": false, "bos_token_id": ids.bos, "eos_token_id": ids.eos,
        "pad_token_id": ids.pad,
    });
    if s.layout == CheckpointLayout::HfV4 {
        text["rope_theta"] = json!(10000.0);
        if let Some(f) = s.rope_linear {
            text["rope_scaling"] = json!({"type": "linear", "factor": f});
        }
    } else {
        text["rope_parameters"] = rope;
    }
    let tokens_per_frame = (s.image_size / s.patch_size).pow(2) + 1;
    let mut config = json!({
        "architectures": ["VideoLlavaForConditionalGeneration"],
        "model_type": "video_llava",
        "dtype": match s.dtype { super::WeightDtype::F32 => "float32", super::WeightDtype::F16 => "float16", super::WeightDtype::Bf16 => "bfloat16" },
        "image_token_index": ids.image,
        "video_token_index": ids.video,
        "image_seq_length": tokens_per_frame - 1,
        "video_seq_length": tokens_per_frame * 8,
        "projector_hidden_act": "gelu",
        "multimodal_projector_bias": true,
        "tie_word_embeddings": s.tie_embeddings,
        "vision_feature_layer": feature_layer(s),
        "vision_feature_select_strategy": if s.keep_cls { "full" } else { "default" },
        "text_config": text,
        "vision_config": {
            "model_type": "clip_vision_model", "hidden_act": "quick_gelu",
            "hidden_size": s.vision_hidden, "intermediate_size": s.vision_intermediate,
            "num_hidden_layers": s.vision_layers, "num_attention_heads": s.vision_heads,
            "image_size": s.image_size, "patch_size": s.patch_size, "layer_norm_eps": 1e-5,
            "num_channels": 3, "projection_dim": s.vision_hidden,
        },
    });
    if s.published {
        config = super::published::sparse_config(&config);
        write_json(out, "config.json", &config)?;
        super::published::write_processor_and_generation(s, ids, out)?;
        return tokenizer_files(s, ids, out);
    }
    write_json(out, "config.json", &config)?;
    processor_files(s, ids, out)
}

/// Where the original layout's tower configs go: `mm_*_tower` names a hub repository, whose last
/// component `vl-export build` looks for inside the checkpoint directory.
pub const ORIGINAL_VIDEO_TOWER: &str = "LanguageBind/LanguageBind_Video_merge";
/// The image tower's hub name in the original config.
pub const ORIGINAL_IMAGE_TOWER: &str = "LanguageBind/LanguageBind_Image";

/// The original Video-LLaVA layout: a `LlavaLlamaForCausalLM` config with the LLaMA fields at the
/// top level and `mm_*` fields, plus each LanguageBind tower's own config in a directory named
/// after its hub repository (`LanguageBind_Video_merge/config.json`, `LanguageBind_Image/...`).
fn write_original_configs(s: &SynthSpec, ids: &SpecialIds, vocab: usize, out: &Path) -> Result<()> {
    let select_layer = match s.feature_layers.as_slice() {
        [one] => *one,
        many => return Err(Error::Invalid(format!("the original layout selects one vision layer, not {many:?}"))),
    };
    let config = json!({
        "_name_or_path": "vl-export-synth/Video-LLaVA-7B",
        "architectures": ["LlavaLlamaForCausalLM"],
        "model_type": "llava",
        "torch_dtype": dtype_name(s),
        "hidden_act": "silu", "hidden_size": s.text_hidden, "intermediate_size": s.text_intermediate,
        "num_hidden_layers": s.text_layers, "num_attention_heads": s.heads, "num_key_value_heads": s.kv_heads,
        "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "rope_scaling": null, "vocab_size": vocab,
        "max_position_embeddings": s.max_positions, "tie_word_embeddings": s.tie_embeddings,
        "bos_token_id": ids.bos, "eos_token_id": ids.eos, "pad_token_id": ids.unk,
        "mm_video_tower": ORIGINAL_VIDEO_TOWER, "mm_image_tower": ORIGINAL_IMAGE_TOWER,
        "mm_projector_type": "mlp2x_gelu", "mm_hidden_size": s.vision_hidden,
        "mm_vision_select_layer": select_layer,
        "mm_vision_select_feature": if s.keep_cls { "cls_patch" } else { "patch" },
        "image_aspect_ratio": "pad", "mm_use_im_start_end": false, "mm_use_im_patch_token": false,
        "use_mm_proj": true, "freeze_mm_mlp_adapter": false, "tune_mm_mlp_adapter": false,
        "tokenizer_padding_side": "right",
    });
    write_json(out, "config.json", &config)?;
    for (name, temporal) in [(ORIGINAL_VIDEO_TOWER, true), (ORIGINAL_IMAGE_TOWER, false)] {
        let dir = out.join(name.rsplit('/').next().unwrap_or(name));
        std::fs::create_dir_all(&dir).map_err(|e| Error::io(&dir, e))?;
        write_json(&dir, "config.json", &languagebind_tower_config(s, temporal))?;
    }
    tokenizer_files(s, ids, out)
}

/// A LanguageBind tower's `config.json` (`LanguageBindVideoConfig` / `LanguageBindImageConfig`:
/// the vision fields under `vision_config`; exact GELU as LanguageBind's ViT-L/14).
fn languagebind_tower_config(s: &SynthSpec, temporal: bool) -> serde_json::Value {
    json!({
        "model_type": if temporal { "LanguageBindVideo" } else { "LanguageBindImage" },
        "vision_config": {
            "model_type": "clip_vision_model", "hidden_act": "gelu",
            "hidden_size": s.vision_hidden, "intermediate_size": s.vision_intermediate,
            "num_hidden_layers": s.vision_layers, "num_attention_heads": s.vision_heads,
            "image_size": s.image_size, "patch_size": s.patch_size, "layer_norm_eps": 1e-5,
            "num_channels": 3, "projection_dim": s.vision_hidden,
            "add_time_attn": temporal, "num_frames": if temporal { crate::contract::NUM_FRAMES } else { 1 },
            "video_decode_backend": "decord", "force_patch_dropout": 0.0,
        },
    })
}

fn dtype_name(s: &SynthSpec) -> &'static str {
    match s.dtype {
        super::WeightDtype::F32 => "float32",
        super::WeightDtype::F16 => "float16",
        super::WeightDtype::Bf16 => "bfloat16",
    }
}

fn processor_files(s: &SynthSpec, ids: &SpecialIds, out: &Path) -> Result<()> {
    let side = s.image_size;
    let image_processor = json!({
        "image_processor_type": "CLIPImageProcessor",
        "do_resize": true, "size": {"shortest_edge": side}, "resample": 3,
        "do_center_crop": true, "crop_size": {"height": side, "width": side},
        "do_rescale": true, "rescale_factor": 1.0 / 255.0,
        "do_normalize": true, "image_mean": CLIP_MEAN, "image_std": CLIP_STD,
        "do_convert_rgb": true,
    });
    write_json(out, "preprocessor_config.json", &image_processor)?;
    let mut video_processor = image_processor.clone();
    video_processor["video_processor_type"] = json!("VideoLlavaVideoProcessor");
    if let Some(obj) = video_processor.as_object_mut() {
        obj.remove("image_processor_type");
    }
    write_json(out, "video_preprocessor_config.json", &video_processor)?;
    write_json(
        out,
        "processor_config.json",
        &json!({
            "processor_class": "VideoLlavaProcessor", "patch_size": s.patch_size,
            "vision_feature_select_strategy": if s.keep_cls { "full" } else { "default" },
            "num_additional_image_tokens": 1,
        }),
    )?;
    tokenizer_files(s, ids, out)
}

fn tokenizer_files(s: &SynthSpec, ids: &SpecialIds, out: &Path) -> Result<()> {
    let class = match s.tokenizer {
        SynthTokenizer::Json => "PreTrainedTokenizerFast",
        // The original checkpoint ships tokenizer.model alone.
        SynthTokenizer::SentencePiece if s.layout == CheckpointLayout::Original => return Ok(()),
        SynthTokenizer::SentencePiece => {
            let added = json!({"<image>": ids.image, "<video>": ids.video, "<pad>": ids.pad});
            write_json(out, "added_tokens.json", &added)?;
            "LlamaTokenizer"
        }
    };
    let mut config = json!({
        "tokenizer_class": class, "bos_token": "<s>", "eos_token": "</s>",
        "unk_token": "<unk>", "pad_token": "<pad>", "model_max_length": s.max_positions,
        "add_bos_token": true, "add_eos_token": false, "clean_up_tokenization_spaces": false,
    });
    if s.tokenizer == SynthTokenizer::SentencePiece {
        // As the published port's config has them: the conversion script adds the placeholders
        // with `AddedToken(..., special=True, normalized=False)`, so that the processor's
        // repeated placeholders tokenize to one id each.
        let token = |content: &str| {
            json!({"content": content, "lstrip": false, "normalized": false, "rstrip": false,
                   "single_word": false, "special": true})
        };
        config["added_tokens_decoder"] = json!({
            "0": token("<unk>"), "1": token("<s>"), "2": token("</s>"),
            ids.image.to_string(): token("<image>"), ids.video.to_string(): token("<video>"),
            ids.pad.to_string(): token("<pad>"),
        });
    }
    write_json(out, "tokenizer_config.json", &config)?;
    write_json(
        out,
        "special_tokens_map.json",
        &json!({"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "pad_token": "<pad>"}),
    )
}
