//! One test per defaulted field: a config that sets every field to something other than
//! transformers' default, with that one field left out, resolves to the default.
use super::defaults::{clip, llama, video_llava};
use super::*;

/// Every field set, none to its default.
fn odd() -> serde_json::Value {
    serde_json::json!({
        "architectures": ["VideoLlavaForConditionalGeneration"], "model_type": "video_llava",
        "image_token_index": 10, "video_token_index": 11, "projector_hidden_act": "quick_gelu",
        "vision_feature_layer": [-1], "vision_feature_select_strategy": "full", "image_seq_length": 16,
        "video_seq_length": 136, "multimodal_projector_bias": false,
        "text_config": {"model_type": "llama", "hidden_size": 64, "intermediate_size": 96,
            "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 32,
            "hidden_act": "swish", "max_position_embeddings": 512, "rms_norm_eps": 1e-5, "vocab_size": 389,
            "bos_token_id": 5, "eos_token_id": [6, 7], "pad_token_id": 8, "tie_word_embeddings": true,
            "attention_bias": true, "mlp_bias": true, "rope_theta": 5000.0},
        "vision_config": {"model_type": "clip_vision_model", "hidden_size": 48, "intermediate_size": 64,
            "num_hidden_layers": 3, "num_attention_heads": 4, "image_size": 64, "patch_size": 16,
            "hidden_act": "gelu", "layer_norm_eps": 1e-6, "num_channels": 1}
    })
}

fn without(pointer: &str) -> Result<ModelConfig> {
    let mut v = odd();
    let (parent, key) = pointer.rsplit_once('/').unwrap_or(("", pointer));
    let removed = v.pointer_mut(parent).and_then(|p| p.as_object_mut()).and_then(|o| o.remove(key));
    assert!(removed.is_some(), "{pointer} is not in the test config");
    ModelConfig::parse(&v.to_string(), Path::new("config.json"))
}

#[test]
fn test_config_sets_no_default() -> Result<()> {
    let c = ModelConfig::parse(&odd().to_string(), Path::new("config.json"))?;
    assert_eq!((c.text.head_dim, c.vision.channels, c.select), (32, 1, SelectStrategy::Full));
    Ok(())
}

macro_rules! defaults {
    ($($name:ident: $pointer:literal => |$c:ident| $got:expr, $want:expr;)*) => {$(
        #[test]
        fn $name() -> Result<()> {
            let $c = without($pointer)?;
            assert_eq!($got, $want, "{} left out", $pointer);
            Ok(())
        }
    )*};
}

defaults! {
    text_hidden_size: "/text_config/hidden_size" => |c| c.text.hidden, llama::HIDDEN_SIZE;
    text_intermediate_size: "/text_config/intermediate_size" => |c| c.text.intermediate, llama::INTERMEDIATE_SIZE;
    text_num_hidden_layers: "/text_config/num_hidden_layers" => |c| c.text.layers, llama::NUM_HIDDEN_LAYERS;
    text_num_attention_heads: "/text_config/num_attention_heads" => |c| c.text.heads, llama::NUM_ATTENTION_HEADS;
    text_num_key_value_heads_follows_heads: "/text_config/num_key_value_heads" => |c| c.text.kv_heads, c.text.heads;
    text_head_dim_is_hidden_over_heads: "/text_config/head_dim" => |c| c.text.head_dim, 64 / 4;
    text_hidden_act: "/text_config/hidden_act" => |c| c.text.hidden, 64;
    text_max_position_embeddings: "/text_config/max_position_embeddings" => |c| c.text.max_positions, llama::MAX_POSITION_EMBEDDINGS;
    text_rms_norm_eps: "/text_config/rms_norm_eps" => |c| c.text.rms_eps, llama::RMS_NORM_EPS as f32;
    text_vocab_size: "/text_config/vocab_size" => |c| c.text.vocab, llama::VOCAB_SIZE;
    text_bos_token_id: "/text_config/bos_token_id" => |c| c.text.bos, llama::BOS_TOKEN_ID;
    text_eos_token_id: "/text_config/eos_token_id" => |c| c.text.eos, llama::EOS_TOKEN_ID;
    text_pad_token_id: "/text_config/pad_token_id" => |c| c.text.pad, None;
    text_tie_word_embeddings: "/text_config/tie_word_embeddings" => |c| c.text.tie_embeddings, llama::TIE_WORD_EMBEDDINGS;
    text_attention_bias: "/text_config/attention_bias" => |c| c.text.attention_bias, false;
    text_mlp_bias: "/text_config/mlp_bias" => |c| c.text.mlp_bias, false;
    text_rope_theta: "/text_config/rope_theta" => |c| c.text.rope.theta, llama::ROPE_THETA;
    text_model_type_is_llama: "/text_config/model_type" => |c| c.text.hidden, 64;
    vision_hidden_size: "/vision_config/hidden_size" => |c| c.vision.hidden, clip::HIDDEN_SIZE;
    vision_intermediate_size: "/vision_config/intermediate_size" => |c| c.vision.intermediate, clip::INTERMEDIATE_SIZE;
    vision_num_hidden_layers: "/vision_config/num_hidden_layers" => |c| c.vision.layers, clip::NUM_HIDDEN_LAYERS;
    vision_num_attention_heads: "/vision_config/num_attention_heads" => |c| c.vision.heads, clip::NUM_ATTENTION_HEADS;
    vision_image_size: "/vision_config/image_size" => |c| c.vision.image_size, clip::IMAGE_SIZE;
    vision_patch_size: "/vision_config/patch_size" => |c| c.vision.patch_size, clip::PATCH_SIZE;
    vision_hidden_act: "/vision_config/hidden_act" => |c| c.vision.act, Activation::QuickGelu;
    vision_layer_norm_eps: "/vision_config/layer_norm_eps" => |c| c.vision.ln_eps, clip::LAYER_NORM_EPS as f32;
    vision_num_channels: "/vision_config/num_channels" => |c| c.vision.channels, clip::NUM_CHANNELS;
    vision_model_type_is_clip: "/vision_config/model_type" => |c| c.vision.hidden, 48;
    image_token_index: "/image_token_index" => |c| c.image_token, video_llava::IMAGE_TOKEN_INDEX;
    video_token_index: "/video_token_index" => |c| c.video_token, video_llava::VIDEO_TOKEN_INDEX;
    projector_hidden_act: "/projector_hidden_act" => |c| c.projector_act, Activation::Gelu;
    vision_feature_layer: "/vision_feature_layer" => |c| c.feature_layers, vec![video_llava::VISION_FEATURE_LAYER];
    vision_feature_select_strategy: "/vision_feature_select_strategy" => |c| c.select, SelectStrategy::Default;
    image_seq_length: "/image_seq_length" => |c| c.image_seq_length, video_llava::IMAGE_SEQ_LENGTH;
    video_seq_length: "/video_seq_length" => |c| c.video_seq_length, video_llava::VIDEO_SEQ_LENGTH;
    multimodal_projector_bias: "/multimodal_projector_bias" => |c| c.projector_bias, video_llava::MULTIMODAL_PROJECTOR_BIAS;
    architectures_is_video_llava: "/architectures" => |c| c.architecture, HF_ARCHITECTURE;
}

/// No `text_config` at all: `LlamaConfig()`.
#[test]
fn missing_text_config_is_llama_config() -> Result<()> {
    let c = without("/text_config")?;
    let t = &c.text;
    assert_eq!((t.hidden, t.intermediate, t.layers, t.heads, t.kv_heads, t.head_dim), (4096, 11008, 32, 32, 32, 128));
    assert_eq!((t.vocab, t.max_positions, t.bos, t.eos, t.pad), (32000, 2048, 1, 2, None));
    assert_eq!(t.rms_eps, 1e-6);
    Ok(())
}

/// No `vision_config` at all: the ViT-L/14 of `VideoLlavaConfig.__init__`, not `CLIPVisionConfig()`.
#[test]
fn missing_vision_config_is_vit_l14() -> Result<()> {
    let c = without("/vision_config")?;
    let v = &c.vision;
    assert_eq!(
        (v.hidden, v.intermediate, v.layers, v.heads, v.image_size, v.patch_size),
        (1024, 4096, 24, 16, 224, 14)
    );
    assert_eq!((v.act, v.ln_eps, v.channels), (Activation::QuickGelu, 1e-5, 3));
    Ok(())
}

/// `tie_word_embeddings` left out of `text_config` falls back to the top-level one.
#[test]
fn tie_word_embeddings_falls_back_to_top_level() -> Result<()> {
    let mut v = odd();
    v["text_config"].as_object_mut().map(|o| o.remove("tie_word_embeddings"));
    v["tie_word_embeddings"] = serde_json::json!(true);
    assert!(ModelConfig::parse(&v.to_string(), Path::new("config.json"))?.text.tie_embeddings);
    Ok(())
}
