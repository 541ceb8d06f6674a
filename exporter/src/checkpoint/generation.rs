//! `generation_config.json`: the special tokens and default sampling a checkpoint ships.
//!
//! transformers loads it in `from_pretrained` and `generate()` reads its token ids rather than
//! the model config's; here a field it gives wins over `config.json`'s, one left out keeps
//! `config.json`'s (what `GenerationConfig.from_model_config` would fill in).
use std::path::Path;

use vl_runtime::manifest::GenerationDefaults;

use super::config::Fields;
use crate::error::{Error, Result};

/// The file name in a checkpoint.
pub const GENERATION_CONFIG_FILE: &str = "generation_config.json";

/// What a `generation_config.json` gives; `None` where it is silent.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct GenerationConfig {
    /// `bos_token_id`.
    pub bos: Option<u32>,
    /// `eos_token_id`: one id or several (any of them ends an answer).
    pub eos: Option<Vec<u32>>,
    /// `pad_token_id`.
    pub pad: Option<u32>,
    /// Default sampling.
    pub sampling: GenerationDefaults,
}

impl GenerationConfig {
    /// Reads `dir/generation_config.json`; `None` when the checkpoint has none.
    pub fn load(dir: &Path) -> Result<Option<Self>> {
        let path = dir.join(GENERATION_CONFIG_FILE);
        if !path.is_file() {
            return Ok(None);
        }
        let text = std::fs::read_to_string(&path).map_err(|e| Error::io(&path, e))?;
        Self::parse(&text, &path).map(Some)
    }

    /// Reads generation settings from JSON text; `path` is only used in errors.
    pub fn parse(text: &str, path: &Path) -> Result<Self> {
        let value: serde_json::Value =
            serde_json::from_str(text).map_err(|e| Error::Config { path: path.into(), message: e.to_string() })?;
        let f = Fields::of(&value, "", path)?;
        let eos = f.ids("eos_token_id")?;
        if eos.as_ref().is_some_and(Vec::is_empty) {
            return Err(Error::Config { path: path.into(), message: "eos_token_id is an empty list".into() });
        }
        Ok(Self {
            bos: f.u32("bos_token_id")?,
            eos,
            pad: f.u32("pad_token_id")?,
            sampling: GenerationDefaults {
                do_sample: f.bool("do_sample")?,
                temperature: f.f64("temperature")?.map(|t| t as f32),
                top_p: f.f64("top_p")?.map(|p| p as f32),
                top_k: f.usize("top_k")?,
                max_new_tokens: f.usize("max_new_tokens")?,
            },
        })
    }

    /// Whether it sets any sampling default (else the manifest records none).
    pub fn has_sampling(&self) -> bool {
        self.sampling != GenerationDefaults::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_tokens_and_sampling() -> Result<()> {
        let g = GenerationConfig::parse(
            r#"{"bos_token_id": 1, "eos_token_id": [2, 32002], "pad_token_id": 0, "do_sample": true,
                "temperature": 0.2, "top_p": 0.9, "max_new_tokens": 64, "transformers_version": "4.42.0"}"#,
            Path::new("generation_config.json"),
        )?;
        assert_eq!((g.bos, g.eos.clone(), g.pad), (Some(1), Some(vec![2, 32002]), Some(0)));
        assert_eq!(g.sampling.do_sample, Some(true));
        assert_eq!(g.sampling.temperature, Some(0.2));
        assert_eq!(g.sampling.top_p, Some(0.9));
        assert_eq!((g.sampling.top_k, g.sampling.max_new_tokens), (None, Some(64)));
        assert!(g.has_sampling());
        Ok(())
    }

    #[test]
    fn tokens_only_and_wrong_types() -> Result<()> {
        let g = GenerationConfig::parse(r#"{"bos_token_id": 1, "eos_token_id": 2}"#, Path::new("g.json"))?;
        assert!(!g.has_sampling());
        let e = GenerationConfig::parse(r#"{"temperature": "hot"}"#, Path::new("g.json"));
        assert_eq!(
            e.err().map(|e| e.to_string()).unwrap_or_default(),
            r#"g.json: temperature: expected a number, found "hot""#
        );
        Ok(())
    }
}
