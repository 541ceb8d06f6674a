//! The engine's `tokenizer.json` from a checkpoint that ships only SentencePiece's
//! `tokenizer.model`, built so that ids equal what transformers produces.
//!
//! Followed: transformers 4.57.6 — `convert_slow_tokenizer.py` (`LlamaConverter`,
//! `SpmConverter.tokenizer`, `generate_merges`, `_get_prepend_scheme`),
//! `tokenization_llama_fast.py` (`update_post_processor`), `tokenization_utils_fast.py` and
//! `tokenization_utils_base.py` (how `added_tokens_decoder`, `added_tokens.json` and
//! `special_tokens_map.json` become added tokens). `tests/fixtures/spm/goldens.json`
//! (`tools/tokenizer_goldens.py`) holds the ids both semantics must reproduce.
use std::collections::HashMap;
use std::path::{Path, PathBuf};

use serde_json::{Value, json};
use tokenizers::Tokenizer;

use super::sentencepiece::{self, ModelProto, ModelType, PieceType, SPM_FILE};
use crate::error::{Error, Result};

/// SentencePiece's word-boundary marker.
const SPIECE_UNDERLINE: &str = "\u{2581}";
/// The tokenizer file name transformers' fast tokenizers read.
const TOKENIZER_JSON: &str = "tokenizer.json";

/// Which tokenizer of transformers the engine's tokenizer must agree with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SpmSemantics {
    /// `LlamaTokenizerFast.from_pretrained` converting the `.model` (the Hugging Face port's
    /// processor): `legacy`, `add_prefix_space` and the added tokens from the configs.
    Fast,
    /// The slow SentencePiece `LlamaTokenizer` the original Video-LLaVA code uses (legacy
    /// behaviour). On text, legacy slow and legacy fast agree (the goldens check it), so the
    /// same conversion serves; the prompt is split on `<image>` by the runtime as the original's
    /// `tokenizer_image_token` does, each chunk encoded on its own.
    Slow,
}

/// One added token as transformers records it (`AddedToken`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AddedSpec {
    /// Its text.
    pub content: String,
    /// Matched on the normalized text rather than the raw input.
    pub normalized: bool,
    /// Special (skipped when decoding with `skip_special_tokens`).
    pub special: bool,
    /// Strip whitespace on its left.
    pub lstrip: bool,
    /// Strip whitespace on its right.
    pub rstrip: bool,
    /// Only match whole words.
    pub single_word: bool,
}

/// The tokenizer settings of a checkpoint, resolved with transformers' defaults.
#[derive(Debug, Clone)]
pub struct SpmSettings {
    /// `legacy` (transformers treats a missing one as `true`).
    pub legacy: bool,
    /// `add_prefix_space` (the slow tokenizer's default `true`).
    pub add_prefix_space: bool,
    /// `add_bos_token`.
    pub add_bos: bool,
    /// `add_eos_token`.
    pub add_eos: bool,
    /// BOS, EOS and UNK token strings.
    pub bos: String,
    /// EOS token string.
    pub eos: String,
    /// UNK token string.
    pub unk: String,
    /// Special token strings (bos, eos, unk, pad, additional), as `all_special_tokens`.
    pub specials: Vec<String>,
    /// Added tokens by the id the files give them, in id order.
    pub added: Vec<(u32, AddedSpec)>,
}

impl Default for SpmSettings {
    /// What `LlamaTokenizer(vocab_file)` uses when a checkpoint ships `tokenizer.model` alone.
    fn default() -> Self {
        Self {
            legacy: true,
            add_prefix_space: true,
            add_bos: true,
            add_eos: false,
            bos: "<s>".into(),
            eos: "</s>".into(),
            unk: "<unk>".into(),
            specials: vec!["<s>".into(), "</s>".into(), "<unk>".into()],
            added: Vec::new(),
        }
    }
}

fn read_json(path: &Path) -> Result<Option<Value>> {
    if !path.is_file() {
        return Ok(None);
    }
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    serde_json::from_str(&text)
        .map(Some)
        .map_err(|e| Error::Config { path: path.to_path_buf(), message: e.to_string() })
}

/// A token given as a string or as an `AddedToken` object (`{"content": ...}`).
fn token_text(v: &Value) -> Option<String> {
    v.as_str().map(str::to_string).or_else(|| v.get("content")?.as_str().map(str::to_string))
}

fn flag(v: &Value, key: &str, default: bool) -> bool {
    v.get(key).and_then(Value::as_bool).unwrap_or(default)
}

impl SpmSettings {
    /// Reads `tokenizer_config.json`, `special_tokens_map.json` and `added_tokens.json` in `dir`
    /// (each optional).
    pub fn read(dir: &Path) -> Result<Self> {
        let config = read_json(&dir.join("tokenizer_config.json"))?;
        let map = read_json(&dir.join("special_tokens_map.json"))?;
        let added = read_json(&dir.join("added_tokens.json"))?;
        Self::from_values(config.as_ref(), map.as_ref(), added.as_ref(), dir)
    }

    /// Settings from the parsed files, as `PreTrainedTokenizerBase._from_pretrained` merges
    /// them: `added_tokens_decoder` when the config has one, otherwise `special_tokens_map.json`
    /// over the config's special tokens and `added_tokens.json` (normalized unless special).
    pub fn from_values(config: Option<&Value>, map: Option<&Value>, added: Option<&Value>, dir: &Path) -> Result<Self> {
        let empty = json!({});
        let config = config.unwrap_or(&empty);
        let bad = |message: String| Error::Config { path: dir.join("tokenizer_config.json"), message };
        let mut s = Self {
            legacy: config.get("legacy").and_then(Value::as_bool).unwrap_or(true),
            add_prefix_space: config.get("add_prefix_space").and_then(Value::as_bool).unwrap_or(true),
            add_bos: flag(config, "add_bos_token", true),
            add_eos: flag(config, "add_eos_token", false),
            ..Self::default()
        };
        let mut special: HashMap<&str, Option<String>> = HashMap::new();
        for (key, default) in [("bos_token", "<s>"), ("eos_token", "</s>"), ("unk_token", "<unk>")] {
            special
                .insert(key, Some(config.get(key).map_or(Some(default.to_string()), token_text).unwrap_or_default()));
        }
        special.insert("pad_token", config.get("pad_token").and_then(token_text));
        let mut additional: Vec<String> = config
            .get("additional_special_tokens")
            .and_then(Value::as_array)
            .map(|a| a.iter().filter_map(token_text).collect())
            .unwrap_or_default();
        let decoder = config.get("added_tokens_decoder").and_then(Value::as_object);
        if let Some(decoder) = decoder {
            for (id, t) in decoder {
                let id: u32 =
                    id.parse().map_err(|_| bad(format!("added_tokens_decoder: id {id:?} is not a number")))?;
                let content = token_text(t).ok_or_else(|| bad(format!("added_tokens_decoder {id}: no content")))?;
                let spec = AddedSpec {
                    content,
                    normalized: flag(t, "normalized", true),
                    special: flag(t, "special", false),
                    lstrip: flag(t, "lstrip", false),
                    rstrip: flag(t, "rstrip", false),
                    single_word: flag(t, "single_word", false),
                };
                s.added.push((id, spec));
            }
        } else {
            if let Some(map) = map.and_then(Value::as_object) {
                for (key, value) in map {
                    if key == "additional_special_tokens" {
                        for t in value.as_array().into_iter().flatten().filter_map(token_text) {
                            if !additional.contains(&t) {
                                additional.push(t);
                            }
                        }
                    } else if let Some(slot) = special.get_mut(key.as_str()) {
                        *slot = token_text(value);
                    }
                }
            }
            let names: Vec<String> = special.values().flatten().cloned().chain(additional.iter().cloned()).collect();
            for (content, id) in added.and_then(Value::as_object).into_iter().flatten() {
                let id = id
                    .as_u64()
                    .and_then(|i| u32::try_from(i).ok())
                    .ok_or_else(|| bad(format!("added_tokens.json: {content}: id is not a number")))?;
                let is_special = names.contains(content);
                let spec = AddedSpec {
                    content: content.clone(),
                    normalized: !is_special,
                    special: is_special,
                    lstrip: false,
                    rstrip: false,
                    single_word: false,
                };
                s.added.push((id, spec));
            }
        }
        s.added.sort_by_key(|(id, _)| *id);
        let get = |k: &str| special.get(k).cloned().flatten();
        s.bos = get("bos_token").unwrap_or_default();
        s.eos = get("eos_token").unwrap_or_default();
        s.unk = get("unk_token").unwrap_or_default();
        // SPECIAL_TOKENS_ATTRIBUTES order: bos, eos, unk, sep, pad, cls, mask, additional.
        s.specials = ["bos_token", "eos_token", "unk_token", "pad_token"]
            .iter()
            .filter_map(|k| get(k))
            .filter(|t| !t.is_empty())
            .chain(additional)
            .collect();
        Ok(s)
    }
}

/// A BPE merge: left and right halves.
type Merge = (String, String);

/// The vocabulary and merges `LlamaConverter` derives from the pieces: the first three pieces
/// scored 0, merges from every split of every piece into two pieces (`generate_merges` with
/// scores: ordered by the merged piece's score, then the left and right lengths, descending,
/// stably; splits of one piece ordered by the ids of their halves).
fn vocab_and_merges(model: &ModelProto) -> (Vec<(String, f32)>, Vec<Merge>) {
    let vocab: Vec<(String, f32)> = model
        .pieces
        .iter()
        .enumerate()
        .map(|(i, p)| (p.piece().to_string(), if i < 3 { 0.0 } else { p.score() }))
        .collect();
    let ids: HashMap<&str, usize> = vocab.iter().enumerate().map(|(i, (p, _))| (p.as_str(), i)).collect();
    let mut merges: Vec<(&str, &str, f32)> = Vec::new();
    for (piece, score) in &vocab {
        let mut local: Vec<(&str, &str, f32)> = piece
            .char_indices()
            .skip(1)
            .map(|(at, _)| piece.split_at(at))
            .filter(|(l, r)| ids.contains_key(l) && ids.contains_key(r))
            .map(|(l, r)| (l, r, *score))
            .collect();
        local.sort_by_key(|(l, r, _)| (ids[l], ids[r]));
        merges.extend(local);
    }
    let chars = |s: &str| s.chars().count();
    merges.sort_by(|a, b| {
        b.2.total_cmp(&a.2).then_with(|| chars(b.0).cmp(&chars(a.0))).then_with(|| chars(b.1).cmp(&chars(a.1)))
    });
    let merges = merges.into_iter().map(|(l, r, _)| (l.to_string(), r.to_string())).collect();
    (vocab, merges)
}

/// The tokenizer transformers builds from `model` (read from `path`) with `settings`.
pub fn convert(model: &ModelProto, path: &Path, settings: &SpmSettings) -> Result<Tokenizer> {
    let trainer = model.trainer_spec.clone().unwrap_or_default();
    if trainer.model_type() != ModelType::Bpe {
        return Err(Error::UnsupportedSentencePiece {
            path: path.to_path_buf(),
            model_type: trainer.model_type().as_str_name().to_string(),
        });
    }
    let (vocab, merges) = vocab_and_merges(model);
    let bpe_vocab: serde_json::Map<String, Value> =
        vocab.iter().enumerate().map(|(i, (p, _))| (p.clone(), json!(i))).collect();
    let vocab_ids: HashMap<&str, u32> = vocab.iter().enumerate().map(|(i, (p, _))| (p.as_str(), i as u32)).collect();

    // SpmConverter: CONTROL pieces as special added tokens, USER_DEFINED ones as plain ones.
    let mut added: Vec<AddedSpec> = model
        .pieces
        .iter()
        .filter(|p| matches!(p.r#type(), PieceType::Control | PieceType::UserDefined))
        .map(|p| AddedSpec {
            content: p.piece().to_string(),
            normalized: false,
            special: p.r#type() == PieceType::Control,
            lstrip: false,
            rstrip: false,
            single_word: false,
        })
        .collect();
    // PreTrainedTokenizerFast.__init__: the files' added tokens in id order, then the special
    // tokens not yet present; special when flagged or among the special token strings.
    let is_special = |t: &AddedSpec| t.special || settings.specials.contains(&t.content);
    for (_, spec) in &settings.added {
        if added.contains(spec) {
            continue;
        }
        let spec = AddedSpec { special: is_special(spec), ..spec.clone() };
        match added.iter_mut().find(|t| t.content == spec.content) {
            Some(existing) => *existing = spec,
            None => added.push(spec),
        }
    }
    for name in &settings.specials {
        if !added.iter().any(|t| &t.content == name) {
            let t = AddedSpec {
                content: name.clone(),
                normalized: false,
                special: true,
                lstrip: false,
                rstrip: false,
                single_word: false,
            };
            added.push(t);
        }
    }
    // tokenizers' AddedVocabulary: a token in the model keeps its id, a new one takes the next.
    let mut next = vocab.len() as u32;
    let mut added_json = Vec::with_capacity(added.len());
    let mut ids = HashMap::new();
    for t in &added {
        let id = match vocab_ids.get(t.content.as_str()) {
            Some(&id) => id,
            None => {
                next += 1;
                next - 1
            }
        };
        ids.insert(t.content.clone(), id);
        added_json.push(json!({
            "id": id, "content": t.content, "single_word": t.single_word, "lstrip": t.lstrip,
            "rstrip": t.rstrip, "normalized": t.normalized, "special": t.special,
        }));
    }
    let sentencepiece_path = path.display();
    for (want, t) in &settings.added {
        if ids.get(&t.content) != Some(want) {
            return Err(Error::Tokenizer(format!(
                "{sentencepiece_path}: added token {:?} is declared as id {want} but transformers gives it {:?} \
                 (added tokens must follow the vocabulary in order)",
                t.content,
                ids.get(&t.content)
            )));
        }
    }

    let (normalizer, pre_tokenizer) = if settings.legacy {
        let mut seq = Vec::new();
        if settings.add_prefix_space {
            seq.push(json!({"type": "Prepend", "prepend": SPIECE_UNDERLINE}));
        }
        seq.push(json!({"type": "Replace", "pattern": {"String": " "}, "content": SPIECE_UNDERLINE}));
        (json!({"type": "Sequence", "normalizers": seq}), Value::Null)
    } else {
        let scheme = if settings.add_prefix_space { "first" } else { "never" };
        let pre =
            json!({"type": "Metaspace", "replacement": SPIECE_UNDERLINE, "prepend_scheme": scheme, "split": false});
        (Value::Null, pre)
    };
    let mut decoders = vec![
        json!({"type": "Replace", "pattern": {"String": SPIECE_UNDERLINE}, "content": " "}),
        json!({"type": "ByteFallback"}),
        json!({"type": "Fuse"}),
    ];
    if settings.add_prefix_space {
        decoders.push(json!({"type": "Strip", "content": " ", "start": 1, "stop": 0}));
    }
    let post_processor = template(settings, &ids, path)?;
    let tokenizer = json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": added_json,
        "normalizer": normalizer,
        "pre_tokenizer": pre_tokenizer,
        "post_processor": post_processor,
        "decoder": {"type": "Sequence", "decoders": decoders},
        "model": {
            "type": "BPE", "dropout": null, "unk_token": trainer.unk_piece(), "continuing_subword_prefix": null,
            "end_of_word_suffix": null, "fuse_unk": true, "byte_fallback": true, "ignore_merges": false,
            "vocab": bpe_vocab, "merges": merges,
        },
    });
    let text = tokenizer.to_string();
    let tok: Tokenizer = text.parse().map_err(|e| Error::Tokenizer(format!("{sentencepiece_path}: converted: {e}")))?;
    for (content, id) in &ids {
        if tok.token_to_id(content) != Some(*id) {
            return Err(Error::Tokenizer(format!("{sentencepiece_path}: {content:?} did not keep id {id}")));
        }
    }
    Ok(tok)
}

/// `LlamaTokenizerFast.update_post_processor`: `<s>` before and/or `</s>` after each sequence.
fn template(s: &SpmSettings, ids: &HashMap<String, u32>, path: &Path) -> Result<Value> {
    let id_of = |t: &str| {
        ids.get(t)
            .copied()
            .ok_or_else(|| Error::Tokenizer(format!("{}: special token {t:?} has no id", path.display())))
    };
    let mut special_tokens = serde_json::Map::new();
    let seq = |name: &str, type_id: u32| json!({"Sequence": {"id": name, "type_id": type_id}});
    let tok = |t: &str, type_id: u32| json!({"SpecialToken": {"id": t, "type_id": type_id}});
    let mut single = Vec::new();
    let mut pair = Vec::new();
    for (name, type_id) in [("A", 0), ("B", 1)] {
        let part = if type_id == 0 { &mut single } else { &mut pair };
        if s.add_bos {
            part.push(tok(&s.bos, type_id));
        }
        part.push(seq(name, type_id));
        if s.add_eos {
            part.push(tok(&s.eos, type_id));
        }
    }
    if s.add_bos {
        special_tokens.insert(s.bos.clone(), json!({"id": s.bos, "ids": [id_of(&s.bos)?], "tokens": [s.bos]}));
    }
    if s.add_eos {
        special_tokens.insert(s.eos.clone(), json!({"id": s.eos, "ids": [id_of(&s.eos)?], "tokens": [s.eos]}));
    }
    let pair: Vec<Value> = single.iter().cloned().chain(pair).collect();
    Ok(json!({"type": "TemplateProcessing", "single": single, "pair": pair, "special_tokens": special_tokens}))
}

/// Where an engine's tokenizer comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TokenizerSource {
    /// The checkpoint's `tokenizer.json`, copied as is (transformers prefers it too).
    Json(PathBuf),
    /// Converted from `tokenizer.model` with the given semantics.
    SentencePiece(PathBuf, SpmSemantics),
}

impl TokenizerSource {
    /// The tokenizer file of the checkpoint in `dir`: `tokenizer.json` when present, else
    /// `tokenizer.model` read with `semantics`; an error naming both when neither is there.
    pub fn find(dir: &Path, semantics: SpmSemantics) -> Result<Self> {
        let json = dir.join(TOKENIZER_JSON);
        let spm = dir.join(SPM_FILE);
        if json.is_file() {
            Ok(Self::Json(json))
        } else if spm.is_file() {
            Ok(Self::SentencePiece(spm, semantics))
        } else {
            Err(Error::Invalid(format!(
                "{}: neither {TOKENIZER_JSON} nor {SPM_FILE} is there (the engine needs the tokenizer)",
                dir.display()
            )))
        }
    }

    /// The tokenizer this source gives.
    pub fn load(&self) -> Result<Tokenizer> {
        match self {
            Self::Json(path) => {
                Tokenizer::from_file(path).map_err(|e| Error::Tokenizer(format!("{}: {e}", path.display())))
            }
            Self::SentencePiece(path, semantics) => {
                let model = sentencepiece::read(path)?;
                let dir = path.parent().unwrap_or(Path::new("."));
                let settings = match semantics {
                    SpmSemantics::Fast => SpmSettings::read(dir)?,
                    SpmSemantics::Slow => SpmSettings { added: Vec::new(), ..SpmSettings::read(dir)? },
                };
                convert(&model, path, &settings)
            }
        }
    }

    /// Writes the engine's `tokenizer.json` to `dst`: a copy, or the conversion. Returns one
    /// line for the manifest's assumptions when converted.
    pub fn write_engine_file(&self, dst: &Path) -> Result<Option<String>> {
        match self {
            Self::Json(path) => {
                std::fs::copy(path, dst).map_err(|e| Error::io(dst, e))?;
                Ok(None)
            }
            Self::SentencePiece(path, semantics) => {
                let tok = self.load()?;
                tok.save(dst, false).map_err(|e| Error::Tokenizer(format!("{}: {e}", dst.display())))?;
                let how = match semantics {
                    SpmSemantics::Fast => "as LlamaTokenizerFast converts it (transformers 4.57)",
                    SpmSemantics::Slow => {
                        "with the slow SentencePiece LlamaTokenizer's ids (legacy), as the original code"
                    }
                };
                Ok(Some(format!(
                    "tokenizer: no {TOKENIZER_JSON}; {TOKENIZER_JSON} converted from {} {how}",
                    path.display()
                )))
            }
        }
    }
}

#[cfg(test)]
#[path = "tokenizer_convert_tests.rs"]
mod tests;
