//! The fields of `config.json` as written, each `None` where the file leaves it out (or spells
//! it `null`, as transformers writes unset optional fields). Reading checks every field's JSON
//! type and names the field at fault (`text_config.hidden_size: expected an integer, found
//! "4096"`); defaults are applied later, once, in `resolve`.
use std::path::Path;

use serde_json::{Map, Value};

use crate::error::{Error, Result};

/// One JSON object of the config and where it sits, for error messages.
#[derive(Clone, Copy)]
pub(crate) struct Fields<'a> {
    obj: &'a Map<String, Value>,
    /// `"text_config."`, `"vision_config."` or `""`.
    prefix: &'a str,
    path: &'a Path,
}

impl<'a> Fields<'a> {
    /// The fields of `value`, which must be an object (`what` names it in the error).
    pub(crate) fn of(value: &'a Value, prefix: &'a str, path: &'a Path) -> Result<Self> {
        match value.as_object() {
            Some(obj) => Ok(Self { obj, prefix, path }),
            None => Err(Error::ConfigType {
                path: path.into(),
                field: prefix.trim_end_matches('.').to_string(),
                expected: "an object",
                found: value.to_string(),
            }),
        }
    }

    fn present(&self, key: &str) -> Option<&'a Value> {
        self.obj.get(key).filter(|v| !v.is_null())
    }

    fn wrong(&self, key: &str, expected: &'static str, found: &Value) -> Error {
        Error::ConfigType {
            path: self.path.into(),
            field: format!("{}{key}", self.prefix),
            expected,
            found: found.to_string(),
        }
    }

    /// A non-negative integer.
    pub(crate) fn usize(&self, key: &str) -> Result<Option<usize>> {
        self.present(key)
            .map(|v| v.as_u64().and_then(|n| usize::try_from(n).ok()).ok_or_else(|| self.wrong(key, "an integer", v)))
            .transpose()
    }

    /// A token id.
    pub(crate) fn u32(&self, key: &str) -> Result<Option<u32>> {
        self.present(key)
            .map(|v| v.as_u64().and_then(|n| u32::try_from(n).ok()).ok_or_else(|| self.wrong(key, "a token id", v)))
            .transpose()
    }

    /// A number (integers too: `"rope_theta": 10000`).
    pub(crate) fn f64(&self, key: &str) -> Result<Option<f64>> {
        self.present(key).map(|v| v.as_f64().ok_or_else(|| self.wrong(key, "a number", v))).transpose()
    }

    /// `true` or `false`.
    pub(crate) fn bool(&self, key: &str) -> Result<Option<bool>> {
        self.present(key).map(|v| v.as_bool().ok_or_else(|| self.wrong(key, "true or false", v))).transpose()
    }

    /// A string.
    pub(crate) fn string(&self, key: &str) -> Result<Option<String>> {
        self.present(key)
            .map(|v| v.as_str().map(str::to_string).ok_or_else(|| self.wrong(key, "a string", v)))
            .transpose()
    }

    /// One token id or a list of them (`eos_token_id`).
    pub(crate) fn ids(&self, key: &str) -> Result<Option<Vec<u32>>> {
        self.ints(key, "a token id or a list of them")?
            .map(|v| {
                v.into_iter().map(|n| u32::try_from(n).map_err(|_| self.wrong(key, "a token id", &n.into()))).collect()
            })
            .transpose()
    }

    /// One integer or a list of them (`vision_feature_layer`).
    pub(crate) fn ints(&self, key: &str, expected: &'static str) -> Result<Option<Vec<i64>>> {
        let Some(v) = self.present(key) else { return Ok(None) };
        let one = |x: &Value| x.as_i64().ok_or_else(|| self.wrong(key, expected, v));
        match v {
            Value::Array(items) => items.iter().map(one).collect::<Result<Vec<_>>>().map(Some),
            other => one(other).map(|n| Some(vec![n])),
        }
    }

    /// A nested object (`rope_scaling`, `text_config`).
    pub(crate) fn object(&self, key: &str) -> Result<Option<Value>> {
        match self.present(key) {
            Some(v @ Value::Object(_)) => Ok(Some(v.clone())),
            Some(other) => Err(self.wrong(key, "an object", other)),
            None => Ok(None),
        }
    }
}

/// `rope_scaling` (transformers 4) or `rope_parameters` (transformers 5).
#[derive(Debug, Default, Clone, PartialEq)]
pub(crate) struct RawRope {
    pub rope_theta: Option<f64>,
    /// `rope_type`, or `type` as older configs spell it.
    pub rope_type: Option<String>,
    pub factor: Option<f64>,
}

impl RawRope {
    fn read(f: &Fields<'_>) -> Result<Self> {
        let rope_type = match f.string("rope_type")? {
            Some(t) => Some(t),
            None => f.string("type")?,
        };
        Ok(Self { rope_theta: f.f64("rope_theta")?, rope_type, factor: f.f64("factor")? })
    }
}

/// `text_config` of the Hugging Face port, or the LLaMA fields at the top level of an original
/// `LlavaLlamaForCausalLM` config (both are `LlamaConfig` fields).
#[derive(Debug, Default, Clone, PartialEq)]
pub(crate) struct RawText {
    pub model_type: Option<String>,
    pub hidden_size: Option<usize>,
    pub intermediate_size: Option<usize>,
    pub num_hidden_layers: Option<usize>,
    pub num_attention_heads: Option<usize>,
    pub num_key_value_heads: Option<usize>,
    pub head_dim: Option<usize>,
    pub rms_norm_eps: Option<f64>,
    pub rope_theta: Option<f64>,
    pub rope_scaling: Option<RawRope>,
    pub rope_parameters: Option<RawRope>,
    pub vocab_size: Option<usize>,
    pub max_position_embeddings: Option<usize>,
    pub tie_word_embeddings: Option<bool>,
    pub attention_bias: Option<bool>,
    pub mlp_bias: Option<bool>,
    pub hidden_act: Option<String>,
    pub bos_token_id: Option<u32>,
    pub eos_token_id: Option<Vec<u32>>,
    pub pad_token_id: Option<u32>,
}

fn rope(f: &Fields<'_>, key: &str, path: &Path) -> Result<Option<RawRope>> {
    let prefix = format!("{}{key}.", f.prefix);
    f.object(key)?.map(|v| RawRope::read(&Fields::of(&v, &prefix, path)?)).transpose()
}

impl RawText {
    /// Reads the LLaMA fields of `f`.
    pub(crate) fn read(f: &Fields<'_>) -> Result<Self> {
        Ok(Self {
            model_type: f.string("model_type")?,
            hidden_size: f.usize("hidden_size")?,
            intermediate_size: f.usize("intermediate_size")?,
            num_hidden_layers: f.usize("num_hidden_layers")?,
            num_attention_heads: f.usize("num_attention_heads")?,
            num_key_value_heads: f.usize("num_key_value_heads")?,
            head_dim: f.usize("head_dim")?,
            rms_norm_eps: f.f64("rms_norm_eps")?,
            rope_theta: f.f64("rope_theta")?,
            rope_scaling: rope(f, "rope_scaling", f.path)?,
            rope_parameters: rope(f, "rope_parameters", f.path)?,
            vocab_size: f.usize("vocab_size")?,
            max_position_embeddings: f.usize("max_position_embeddings")?,
            tie_word_embeddings: f.bool("tie_word_embeddings")?,
            attention_bias: f.bool("attention_bias")?,
            mlp_bias: f.bool("mlp_bias")?,
            hidden_act: f.string("hidden_act")?,
            bos_token_id: f.u32("bos_token_id")?,
            eos_token_id: f.ids("eos_token_id")?,
            pad_token_id: f.u32("pad_token_id")?,
        })
    }
}

/// `vision_config` of the Hugging Face port (`CLIPVisionConfig` fields), or a LanguageBind
/// tower's vision fields.
#[derive(Debug, Default, Clone, PartialEq)]
pub(crate) struct RawVision {
    pub model_type: Option<String>,
    pub hidden_size: Option<usize>,
    pub intermediate_size: Option<usize>,
    pub num_hidden_layers: Option<usize>,
    pub num_attention_heads: Option<usize>,
    pub image_size: Option<usize>,
    pub patch_size: Option<usize>,
    pub hidden_act: Option<String>,
    pub layer_norm_eps: Option<f64>,
    pub num_channels: Option<usize>,
}

impl RawVision {
    /// Reads the CLIP vision fields of `f`.
    pub(crate) fn read(f: &Fields<'_>) -> Result<Self> {
        Ok(Self {
            model_type: f.string("model_type")?,
            hidden_size: f.usize("hidden_size")?,
            intermediate_size: f.usize("intermediate_size")?,
            num_hidden_layers: f.usize("num_hidden_layers")?,
            num_attention_heads: f.usize("num_attention_heads")?,
            image_size: f.usize("image_size")?,
            patch_size: f.usize("patch_size")?,
            hidden_act: f.string("hidden_act")?,
            layer_norm_eps: f.f64("layer_norm_eps")?,
            num_channels: f.usize("num_channels")?,
        })
    }
}

/// The top level of a `VideoLlavaConfig`.
#[derive(Debug, Default, Clone, PartialEq)]
pub(crate) struct RawConfig {
    pub architectures: Vec<String>,
    /// `None`: no `text_config` at all (transformers builds `LlamaConfig()`).
    pub text_config: Option<RawText>,
    /// `None`: no `vision_config` at all (transformers builds the CLIP ViT-L/14 of its
    /// `__init__`, not `CLIPVisionConfig()`).
    pub vision_config: Option<RawVision>,
    pub vision_feature_layer: Option<Vec<i64>>,
    pub vision_feature_select_strategy: Option<String>,
    /// `image_token_index`, or `image_token_id` (its `attribute_map` alias).
    pub image_token_index: Option<u32>,
    /// `video_token_index`, or `video_token_id`.
    pub video_token_index: Option<u32>,
    pub projector_hidden_act: Option<String>,
    pub multimodal_projector_bias: Option<bool>,
    pub tie_word_embeddings: Option<bool>,
    pub image_seq_length: Option<usize>,
    pub video_seq_length: Option<usize>,
}

fn first<T>(a: Option<T>, b: impl FnOnce() -> Result<Option<T>>) -> Result<Option<T>> {
    match a {
        Some(a) => Ok(Some(a)),
        None => b(),
    }
}

impl RawConfig {
    /// Reads a parsed `config.json`.
    pub(crate) fn read(value: &Value, path: &Path) -> Result<Self> {
        let f = Fields::of(value, "", path)?;
        let architectures = match f.present("architectures") {
            Some(Value::Array(a)) => a
                .iter()
                .map(|x| x.as_str().map(str::to_string).ok_or_else(|| f.wrong("architectures", "a list of strings", x)))
                .collect::<Result<_>>()?,
            Some(other) => return Err(f.wrong("architectures", "a list of strings", other)),
            None => Vec::new(),
        };
        let text_config =
            f.object("text_config")?.map(|v| RawText::read(&Fields::of(&v, "text_config.", path)?)).transpose()?;
        let vision_config = f
            .object("vision_config")?
            .map(|v| RawVision::read(&Fields::of(&v, "vision_config.", path)?))
            .transpose()?;
        Ok(Self {
            architectures,
            text_config,
            vision_config,
            vision_feature_layer: f.ints("vision_feature_layer", "an integer or a list of integers")?,
            vision_feature_select_strategy: f.string("vision_feature_select_strategy")?,
            image_token_index: first(f.u32("image_token_index")?, || f.u32("image_token_id"))?,
            video_token_index: first(f.u32("video_token_index")?, || f.u32("video_token_id"))?,
            projector_hidden_act: f.string("projector_hidden_act")?,
            multimodal_projector_bias: f.bool("multimodal_projector_bias")?,
            tie_word_embeddings: f.bool("tie_word_embeddings")?,
            image_seq_length: f.usize("image_seq_length")?,
            video_seq_length: f.usize("video_seq_length")?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn err(v: serde_json::Value) -> String {
        match RawConfig::read(&v, Path::new("config.json")) {
            Err(e) => e.to_string(),
            Ok(_) => panic!("{v} was accepted"),
        }
    }

    #[test]
    fn wrong_types_name_the_field() {
        let e = err(serde_json::json!({"text_config": {"hidden_size": "4096"}}));
        assert_eq!(e, r#"config.json: text_config.hidden_size: expected an integer, found "4096""#);
        let e = err(serde_json::json!({"vision_config": {"layer_norm_eps": true}}));
        assert_eq!(e, "config.json: vision_config.layer_norm_eps: expected a number, found true");
        let e = err(serde_json::json!({"text_config": {"rope_scaling": {"factor": "2"}}}));
        assert_eq!(e, r#"config.json: text_config.rope_scaling.factor: expected a number, found "2""#);
        let e = err(serde_json::json!({"vision_feature_layer": [-2, "x"]}));
        assert!(e.contains("vision_feature_layer: expected an integer or a list of integers"), "{e}");
        let e = err(serde_json::json!({"text_config": {"num_hidden_layers": -1}}));
        assert!(e.contains("text_config.num_hidden_layers: expected an integer, found -1"), "{e}");
        let e = err(serde_json::json!({"text_config": 3}));
        assert!(e.contains("text_config: expected an object, found 3"), "{e}");
    }

    #[test]
    fn nulls_are_absent_and_aliases_read() -> Result<()> {
        let v = serde_json::json!({"image_token_id": 7, "video_token_index": 8,
            "text_config": {"pad_token_id": null, "rope_scaling": null, "eos_token_id": [2, 5]}});
        let raw = RawConfig::read(&v, Path::new("config.json"))?;
        assert_eq!(raw.image_token_index, Some(7));
        assert_eq!(raw.video_token_index, Some(8));
        let t = raw.text_config.unwrap_or_default();
        assert_eq!((t.pad_token_id, t.rope_scaling), (None, None));
        assert_eq!(t.eos_token_id, Some(vec![2, 5]));
        assert!(raw.vision_config.is_none());
        Ok(())
    }
}
