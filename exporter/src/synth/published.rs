//! The shape of the published `LanguageBind/Video-LLaVA-7B-hf` (saved by transformers 4.4x):
//! a sparse `config.json` that leaves to transformers' defaults every field the model does not
//! change, `torch_dtype` rather than `dtype`, no `video_preprocessor_config.json` (videos follow
//! `preprocessor_config.json`, a `VideoLlavaImageProcessor`), a `generation_config.json`, and
//! transformers-4 tensor names in safetensors shards with `model.safetensors.index.json`.
use std::path::Path;

use serde_json::{Value, json};

use super::SynthSpec;
use super::tokenizer::SpecialIds;
use crate::checkpoint::defaults::{clip, llama, video_llava};
use crate::error::{Error, Result};

/// Fields the published config writes even where they equal the default.
const KEEP_TOP: &[&str] = &[
    "_name_or_path",
    "architectures",
    "ignore_index",
    "image_token_index",
    "model_type",
    "pad_token_id",
    "text_config",
    "torch_dtype",
    "transformers_version",
    "video_token_index",
    "vision_config",
];
const KEEP_TEXT: &[&str] =
    &["model_type", "max_position_embeddings", "rms_norm_eps", "vocab_size", "pad_token_id", "torch_dtype"];
const KEEP_VISION: &[&str] = &[
    "hidden_size",
    "intermediate_size",
    "model_type",
    "num_attention_heads",
    "num_hidden_layers",
    "patch_size",
    "projection_dim",
    "vocab_size",
];

/// Removes from `obj` the fields that equal `defaults` and are not in `keep`.
fn drop_defaults(obj: &mut Value, defaults: &Value, keep: &[&str]) {
    let (Some(obj), Some(defaults)) = (obj.as_object_mut(), defaults.as_object()) else { return };
    obj.retain(|k, v| keep.contains(&k.as_str()) || defaults.get(k).is_none_or(|d| !same(d, v)));
}

fn same(a: &Value, b: &Value) -> bool {
    match (a.as_f64(), b.as_f64()) {
        (Some(x), Some(y)) => x == y,
        _ => a == b,
    }
}

/// The sparse form of a spelled-out transformers-4 `config.json`: what the published one would
/// write for the same model.
pub fn sparse_config(full: &Value) -> Value {
    let mut c = full.clone();
    if let Some(obj) = c.as_object_mut() {
        if let Some(d) = obj.remove("dtype") {
            obj.insert("torch_dtype".into(), d);
        }
        obj.insert("_name_or_path".into(), json!("vl-export-synth/Video-LLaVA-7B-hf"));
        obj.insert("ignore_index".into(), json!(-100));
        obj.insert("transformers_version".into(), json!("4.42.0.dev0"));
        let pad = obj.get("text_config").and_then(|t| t.get("pad_token_id")).cloned();
        obj.insert("pad_token_id".into(), pad.unwrap_or(Value::Null));
    }
    let torch_dtype = c["torch_dtype"].clone();
    let text = &mut c["text_config"];
    text["torch_dtype"] = torch_dtype;
    let heads = text["num_attention_heads"].clone();
    let derived = json!({
        "num_key_value_heads": heads,
        "head_dim": text["hidden_size"].as_u64().zip(heads.as_u64()).map(|(h, n)| h / n.max(1)),
    });
    let text_defaults = json!({
        "hidden_size": llama::HIDDEN_SIZE, "intermediate_size": llama::INTERMEDIATE_SIZE,
        "num_hidden_layers": llama::NUM_HIDDEN_LAYERS, "num_attention_heads": llama::NUM_ATTENTION_HEADS,
        "hidden_act": llama::HIDDEN_ACT, "max_position_embeddings": llama::MAX_POSITION_EMBEDDINGS,
        "rms_norm_eps": llama::RMS_NORM_EPS, "vocab_size": llama::VOCAB_SIZE, "bos_token_id": llama::BOS_TOKEN_ID,
        "eos_token_id": llama::EOS_TOKEN_ID, "tie_word_embeddings": llama::TIE_WORD_EMBEDDINGS,
        "attention_bias": false, "mlp_bias": false, "rope_theta": llama::ROPE_THETA,
    });
    drop_defaults(text, &derived, KEEP_TEXT);
    drop_defaults(text, &text_defaults, KEEP_TEXT);
    let vision_defaults = json!({
        "hidden_size": clip::HIDDEN_SIZE, "intermediate_size": clip::INTERMEDIATE_SIZE,
        "num_hidden_layers": clip::NUM_HIDDEN_LAYERS, "num_attention_heads": clip::NUM_ATTENTION_HEADS,
        "num_channels": clip::NUM_CHANNELS, "image_size": clip::IMAGE_SIZE, "patch_size": clip::PATCH_SIZE,
        "hidden_act": clip::HIDDEN_ACT, "layer_norm_eps": clip::LAYER_NORM_EPS,
    });
    drop_defaults(&mut c["vision_config"], &vision_defaults, KEEP_VISION);
    c["vision_config"]["vocab_size"] = json!(32000);
    let top_defaults = json!({
        "projector_hidden_act": video_llava::PROJECTOR_HIDDEN_ACT,
        "vision_feature_layer": video_llava::VISION_FEATURE_LAYER,
        "vision_feature_select_strategy": video_llava::VISION_FEATURE_SELECT_STRATEGY,
        "image_seq_length": video_llava::IMAGE_SEQ_LENGTH, "video_seq_length": video_llava::VIDEO_SEQ_LENGTH,
        "multimodal_projector_bias": video_llava::MULTIMODAL_PROJECTOR_BIAS, "tie_word_embeddings": false,
    });
    drop_defaults(&mut c, &top_defaults, KEEP_TOP);
    c
}

/// The processor and generation files of the published checkpoint (tokenizer files aside).
pub fn write_processor_and_generation(s: &SynthSpec, ids: &SpecialIds, out: &Path) -> Result<()> {
    let side = s.image_size;
    super::files::write_json(
        out,
        "preprocessor_config.json",
        &json!({
            "image_processor_type": "VideoLlavaImageProcessor", "processor_class": "VideoLlavaProcessor",
            "do_resize": true, "size": {"shortest_edge": side}, "resample": 3,
            "do_center_crop": true, "crop_size": {"height": side, "width": side},
            "do_rescale": true, "rescale_factor": 1.0 / 255.0, "do_normalize": true,
            "image_mean": super::files::CLIP_MEAN, "image_std": super::files::CLIP_STD, "do_convert_rgb": true,
        }),
    )?;
    super::files::write_json(
        out,
        "generation_config.json",
        &json!({"_from_model_config": true, "bos_token_id": ids.bos, "eos_token_id": ids.eos,
                "pad_token_id": ids.pad, "transformers_version": "4.42.0.dev0"}),
    )
}

/// Splits the checkpoint's tensors over `shards` files named as transformers names them, with
/// `model.safetensors.index.json`.
pub fn write_index(out: &Path, weight_map: &[(String, String)], total_size: u64) -> Result<()> {
    let map: serde_json::Map<String, Value> = weight_map.iter().map(|(t, f)| (t.clone(), json!(f))).collect();
    let path = out.join("model.safetensors.index.json");
    let text = serde_json::to_string_pretty(&json!({"metadata": {"total_size": total_size}, "weight_map": map}))
        .map_err(|e| Error::Invalid(e.to_string()))?;
    std::fs::write(&path, text + "\n").map_err(|e| Error::io(&path, e))
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use vl_runtime::manifest::CheckpointLayout;

    use super::super::{Preset, SynthSpec, WeightDtype, synthesize};
    use crate::checkpoint::{Checkpoint, ModelConfig};
    use crate::contract::MediaContract;
    use crate::error::Result;

    fn keys(v: &serde_json::Value) -> BTreeSet<String> {
        v.as_object().map(|o| o.keys().cloned().collect()).unwrap_or_default()
    }

    fn read(dir: &std::path::Path, name: &str) -> serde_json::Value {
        let text = std::fs::read_to_string(dir.join(name)).unwrap_or_default();
        serde_json::from_str(&text).unwrap_or_default()
    }

    /// With the real 7B dimensions, the published shape leaves out exactly what the published
    /// config leaves out, and resolves to the spelled-out config.
    #[test]
    fn seven_b_dims_write_only_the_published_fields() -> Result<()> {
        let spec = SynthSpec {
            text_layers: 32,
            vision_layers: 24,
            layout: CheckpointLayout::HfV4,
            dtype: WeightDtype::F16,
            ..SynthSpec::preset(Preset::Vl7bSlice)
        };
        let ids = super::super::tokenizer::SpecialIds {
            bos: 1,
            eos: 2,
            pad: 0,
            unk: 0,
            image: 32000,
            video: 32001,
            len: 1000,
        };
        let (sparse_dir, full_dir) = (
            tempfile::tempdir().map_err(|e| crate::error::Error::io("tmp", e))?,
            tempfile::tempdir().map_err(|e| crate::error::Error::io("tmp", e))?,
        );
        super::super::files::write_configs(
            &SynthSpec { published: true, ..spec.clone() },
            &ids,
            32064,
            sparse_dir.path(),
        )?;
        super::super::files::write_configs(&spec, &ids, 32064, full_dir.path())?;
        let c = read(sparse_dir.path(), "config.json");
        let want_text: BTreeSet<String> = super::KEEP_TEXT.iter().map(|k| k.to_string()).collect();
        assert_eq!(keys(&c["text_config"]), want_text);
        let want_vision: BTreeSet<String> = super::KEEP_VISION.iter().map(|k| k.to_string()).collect();
        assert_eq!(keys(&c["vision_config"]), want_vision);
        assert!(c.get("vision_feature_layer").is_none() && c.get("projector_hidden_act").is_none());
        let sparse = ModelConfig::load(sparse_dir.path())?;
        let full = ModelConfig::load(full_dir.path())?;
        assert_eq!(sparse, full);
        assert!(!sparse_dir.path().join("video_preprocessor_config.json").exists());
        Ok(())
    }

    /// A tiny published-shape checkpoint opens (shards, index, v4 names) and resolves to the
    /// same config as the spelled-out one; videos follow the image processor; the generation
    /// config's tokens are read.
    #[test]
    fn published_tiny_opens_like_the_spelled_out_one() -> Result<()> {
        let spec = SynthSpec { layout: CheckpointLayout::HfV4, ..SynthSpec::preset(Preset::Tiny) };
        let tmp = tempfile::tempdir().map_err(|e| crate::error::Error::io("tmp", e))?;
        let (published, full) = (tmp.path().join("published"), tmp.path().join("full"));
        synthesize(&SynthSpec { published: true, ..spec.clone() }, &published)?;
        synthesize(&spec, &full)?;
        assert!(published.join("model.safetensors.index.json").is_file());
        assert!(published.join("model-00002-of-00002.safetensors").is_file());
        assert!(!published.join("model.safetensors").exists());
        let (p, f) = (Checkpoint::open(&published)?, Checkpoint::open(&full)?);
        assert_eq!(p.config, f.config);
        assert_eq!((p.layout, p.roots.text_body.as_str()), (CheckpointLayout::HfV4, "language_model.model."));
        assert_eq!(p.roots.lm_head, "language_model.lm_head.");
        let (mut pa, mut fa) = (Vec::new(), Vec::new());
        let (pm, fm) = (MediaContract::of(&p, &mut pa)?, MediaContract::of(&f, &mut fa)?);
        assert_eq!(pm.preprocess, fm.preprocess);
        assert_eq!(pm.tokens, fm.tokens);
        assert!(pm.generation.is_none());
        assert!(pa.iter().any(|a| a.contains("no video_preprocessor_config.json")), "{pa:?}");
        assert!(!fa.iter().any(|a| a.contains("video_preprocessor_config.json")), "{fa:?}");
        Ok(())
    }

    /// The published shape and the spelled-out one export byte-identical graphs.
    #[test]
    fn published_and_spelled_out_export_identical_graphs() -> Result<()> {
        let spec = SynthSpec { layout: CheckpointLayout::HfV4, ..SynthSpec::preset(Preset::Tiny) };
        let tmp = tempfile::tempdir().map_err(|e| crate::error::Error::io("tmp", e))?;
        let mut manifests = Vec::new();
        for (name, published) in [("published", true), ("full", false)] {
            let ck = tmp.path().join(name);
            synthesize(&SynthSpec { published, ..spec.clone() }, &ck)?;
            let opts = crate::export::BuildOptions::new(ck, tmp.path().join(format!("{name}-engine")));
            manifests.push((opts.out.clone(), crate::export::build(&opts)?.manifest));
        }
        let [(pdir, pm), (fdir, fm)] =
            <[_; 2]>::try_from(manifests).map_err(|_| crate::error::Error::Invalid("two builds".into()))?;
        assert_eq!(pm.model, fm.model);
        assert_eq!(pm.graphs, fm.graphs);
        for (_, g) in pm.graphs.iter() {
            let mut files = vec![g.file.clone()];
            files.extend(g.data.iter().map(|d| d.file.clone()));
            for f in files {
                let (a, b) = (std::fs::read(pdir.join(&f)), std::fs::read(fdir.join(&f)));
                assert!(a.is_ok() && a.ok() == b.ok(), "{f} differs");
            }
        }
        Ok(())
    }

    /// Sampling defaults and extra eos ids from `generation_config.json` reach the contract; a
    /// `video_preprocessor_config.json` that disagrees with the image processor is refused.
    #[test]
    fn generation_defaults_and_video_processor_mismatch() -> Result<()> {
        let spec = SynthSpec { layout: CheckpointLayout::HfV4, published: true, ..SynthSpec::preset(Preset::Tiny) };
        let tmp = tempfile::tempdir().map_err(|e| crate::error::Error::io("tmp", e))?;
        let dir = tmp.path().join("ck");
        synthesize(&spec, &dir)?;
        let gen_path = dir.join("generation_config.json");
        let mut g = read(&dir, "generation_config.json");
        let eos = g["eos_token_id"].as_u64().unwrap_or(0);
        g["eos_token_id"] = serde_json::json!([eos, 7]);
        g["do_sample"] = serde_json::json!(true);
        g["temperature"] = serde_json::json!(0.5);
        g["max_new_tokens"] = serde_json::json!(40);
        std::fs::write(&gen_path, g.to_string()).map_err(|e| crate::error::Error::io(&gen_path, e))?;
        let ck = Checkpoint::open(&dir)?;
        let mut assumptions = Vec::new();
        let m = MediaContract::of(&ck, &mut assumptions)?;
        let sampling = m.generation.unwrap_or_default();
        assert_eq!(
            (sampling.do_sample, sampling.temperature, sampling.max_new_tokens),
            (Some(true), Some(0.5), Some(40))
        );
        assert_eq!(m.tokens.eos as u64, eos);
        assert!(assumptions.iter().any(|a| a.contains("answers end at")), "{assumptions:?}");
        let mut video = read(&dir, "preprocessor_config.json");
        video["size"] = serde_json::json!({"shortest_edge": 64});
        let vpath = dir.join("video_preprocessor_config.json");
        std::fs::write(&vpath, video.to_string()).map_err(|e| crate::error::Error::io(&vpath, e))?;
        let e = MediaContract::of(&ck, &mut Vec::new()).err().map(|e| e.to_string()).unwrap_or_default();
        assert!(e.contains("differs from preprocessor_config.json"), "{e}");
        Ok(())
    }
}
