//! Resolution of whole configs: rope variants, feature layers, the published sparse config
//! against transformers' own resolution (`tools/config_defaults.py`).
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
    assert!(matches!(parse(&v), Err(Error::ConfigDims { .. })));
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

fn fixture(name: &str) -> serde_json::Value {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/config").join(name);
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// `published_sparse.json` (the fields `LanguageBind/Video-LLaVA-7B-hf` spells out) resolves to
/// what transformers 4.46.3 and 5.24.0 resolve it to (`tools/config_defaults.py`).
#[test]
fn published_sparse_config_matches_transformers() -> Result<()> {
    let c = parse(&fixture("published_sparse.json"))?;
    for golden in ["resolved_transformers4.json", "resolved_transformers5.json"] {
        let g = fixture(golden);
        let (t, v) = (&g["text_config"], &g["vision_config"]);
        let n = |x: &serde_json::Value| x.as_u64().unwrap_or(u64::MAX) as usize;
        let f = |x: &serde_json::Value| x.as_f64().unwrap_or(f64::NAN);
        let text = [
            (c.text.hidden, n(&t["hidden_size"])),
            (c.text.intermediate, n(&t["intermediate_size"])),
            (c.text.layers, n(&t["num_hidden_layers"])),
            (c.text.heads, n(&t["num_attention_heads"])),
            (c.text.kv_heads, n(&t["num_key_value_heads"])),
            (c.text.head_dim, n(&t["head_dim"])),
            (c.text.max_positions, n(&t["max_position_embeddings"])),
            (c.text.vocab, n(&t["vocab_size"])),
            (c.text.bos as usize, n(&t["bos_token_id"])),
            (c.text.eos as usize, n(&t["eos_token_id"])),
            (c.vision.hidden, n(&v["hidden_size"])),
            (c.vision.intermediate, n(&v["intermediate_size"])),
            (c.vision.layers, n(&v["num_hidden_layers"])),
            (c.vision.heads, n(&v["num_attention_heads"])),
            (c.vision.image_size, n(&v["image_size"])),
            (c.vision.patch_size, n(&v["patch_size"])),
            (c.vision.channels, n(&v["num_channels"])),
            (c.image_token as usize, n(&g["image_token_index"])),
            (c.video_token as usize, n(&g["video_token_index"])),
            (c.image_seq_length, n(&g["image_seq_length"])),
            (c.video_seq_length, n(&g["video_seq_length"])),
        ];
        for (i, (ours, theirs)) in text.iter().enumerate() {
            assert_eq!(ours, theirs, "{golden}: value {i}");
        }
        assert_eq!(c.text.pad.map(|p| p as u64), t["pad_token_id"].as_u64(), "{golden}");
        assert_eq!(c.text.rms_eps, f(&t["rms_norm_eps"]) as f32, "{golden}");
        assert_eq!(c.text.rope.theta, f(&t["rope_theta"]), "{golden}");
        assert_eq!(c.vision.ln_eps, f(&v["layer_norm_eps"]) as f32, "{golden}");
        assert_eq!(t["hidden_act"], "silu", "{golden}");
        assert_eq!(c.vision.act, Activation::parse(v["hidden_act"].as_str().unwrap_or(""), Path::new(""), "")?);
        assert_eq!(
            c.projector_act,
            Activation::parse(g["projector_hidden_act"].as_str().unwrap_or(""), Path::new(""), "")?
        );
        assert_eq!(c.feature_layers, vec![g["vision_feature_layer"].as_i64().unwrap_or(0)], "{golden}");
        assert_eq!(c.select, SelectStrategy::Default, "{golden}");
        assert_eq!(g["vision_feature_select_strategy"], "default", "{golden}");
        assert_eq!(Some(c.projector_bias), g["multimodal_projector_bias"].as_bool(), "{golden}");
        assert_eq!(Some(c.text.tie_embeddings), t["tie_word_embeddings"].as_bool(), "{golden}");
        assert_eq!(Some(c.text.attention_bias), t["attention_bias"].as_bool(), "{golden}");
        assert_eq!(Some(c.text.mlp_bias), t["mlp_bias"].as_bool(), "{golden}");
        assert_eq!(c.text.rope.linear_factor, 1.0);
    }
    Ok(())
}

/// The published fields alone resolve to the same config as every field spelled out (the
/// transformers-5 golden's values).
#[test]
fn sparse_and_spelled_out_configs_resolve_alike() -> Result<()> {
    let g = fixture("resolved_transformers5.json");
    let mut full =
        serde_json::json!({"architectures": ["VideoLlavaForConditionalGeneration"], "model_type": "video_llava"});
    for key in [
        "image_token_index",
        "video_token_index",
        "projector_hidden_act",
        "vision_feature_layer",
        "vision_feature_select_strategy",
        "image_seq_length",
        "video_seq_length",
        "multimodal_projector_bias",
        "tie_word_embeddings",
        "text_config",
        "vision_config",
    ] {
        full[key] = g[key].clone();
    }
    full["text_config"]["rope_parameters"] =
        serde_json::json!({"rope_theta": g["text_config"]["rope_theta"], "rope_type": "default"});
    let sparse = parse(&fixture("published_sparse.json"))?;
    assert_eq!(sparse, parse(&full)?);
    assert_eq!(sparse, parse(&spelled_out_published())?);
    Ok(())
}

/// The published 7B config with every field written out by hand (no defaults left to fill).
pub(crate) fn spelled_out_published() -> serde_json::Value {
    serde_json::json!({
        "architectures": ["VideoLlavaForConditionalGeneration"], "model_type": "video_llava",
        "image_token_index": 32000, "video_token_index": 32001, "projector_hidden_act": "gelu",
        "vision_feature_layer": -2, "vision_feature_select_strategy": "default", "image_seq_length": 256,
        "video_seq_length": 2056, "multimodal_projector_bias": true, "tie_word_embeddings": false,
        "text_config": {"model_type": "llama", "hidden_size": 4096, "intermediate_size": 11008,
            "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 32, "head_dim": 128,
            "hidden_act": "silu", "max_position_embeddings": 4096, "rms_norm_eps": 1e-5, "vocab_size": 32064,
            "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0, "tie_word_embeddings": false,
            "attention_bias": false, "mlp_bias": false, "rope_theta": 10000.0, "rope_scaling": null},
        "vision_config": {"model_type": "clip_vision_model", "hidden_size": 1024, "intermediate_size": 4096,
            "num_hidden_layers": 24, "num_attention_heads": 16, "image_size": 224, "patch_size": 14,
            "hidden_act": "quick_gelu", "layer_norm_eps": 1e-5, "num_channels": 3}
    })
}

#[test]
fn impossible_dimensions_are_named() {
    let cases = [
        (
            "/text_config/num_attention_heads",
            serde_json::json!(6),
            "text_config.hidden_size 64 is not a multiple of num_attention_heads 6",
        ),
        (
            "/text_config/num_key_value_heads",
            serde_json::json!(3),
            "num_attention_heads 4 is not a multiple of num_key_value_heads 3",
        ),
        (
            "/vision_config/num_attention_heads",
            serde_json::json!(5),
            "vision_config.hidden_size 32 is not a multiple of num_attention_heads 5",
        ),
        (
            "/vision_config/patch_size",
            serde_json::json!(15),
            "vision_config.image_size 56 is not a multiple of patch_size 15",
        ),
        ("/text_config/num_hidden_layers", serde_json::json!(0), "text_config.num_hidden_layers must be positive"),
    ];
    for (pointer, value, want) in cases {
        let mut v = base();
        if let Some(slot) = v.pointer_mut(pointer) {
            *slot = value;
        }
        match parse(&v) {
            Err(e @ Error::ConfigDims { .. }) => assert!(e.to_string().contains(want), "{pointer}: {e}"),
            other => panic!("{pointer}: {other:?}"),
        }
    }
}

#[test]
fn wrong_type_error_reads_as_documented() {
    let mut v = base();
    v["text_config"]["hidden_size"] = serde_json::json!("4096");
    let e = parse(&v).err().map(|e| e.to_string()).unwrap_or_default();
    assert_eq!(e, r#"config.json: text_config.hidden_size: expected an integer, found "4096""#);
}

#[test]
fn other_sub_model_types_are_refused() {
    let mut v = base();
    v["text_config"]["model_type"] = serde_json::json!("mistral");
    assert!(matches!(parse(&v), Err(Error::Config { .. })));
    let mut v = base();
    v["vision_config"]["model_type"] = serde_json::json!("siglip_vision_model");
    assert!(matches!(parse(&v), Err(Error::Config { .. })));
}
