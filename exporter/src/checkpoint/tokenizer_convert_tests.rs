//! The conversion against `tests/fixtures/spm/goldens.json`, made by `tools/tokenizer_goldens.py`
//! (`make tokenizer-goldens`): ids from transformers' `LlamaTokenizerFast` (converted from the
//! `.model`) per config variant, and from the slow `LlamaTokenizer` for the original layout.
use super::*;

fn fixture() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/spm")
}

fn json_file(name: &str) -> Value {
    let path = fixture().join(name);
    serde_json::from_str(&std::fs::read_to_string(&path).expect("fixture")).expect("fixture json")
}

/// The settings a golden variant was recorded with: the fixture's files, the config overridden.
fn settings(variant: &Value) -> Result<SpmSettings> {
    if variant["semantics"] == "slow" {
        return Ok(SpmSettings::default());
    }
    let mut config = json_file("tokenizer_config.json");
    for (k, v) in variant["overrides"].as_object().expect("overrides") {
        config[k] = v.clone();
    }
    SpmSettings::from_values(
        Some(&config),
        Some(&json_file("special_tokens_map.json")),
        Some(&json_file("added_tokens.json")),
        &fixture(),
    )
}

#[test]
fn ids_equal_transformers_for_every_variant() -> Result<()> {
    let goldens = json_file("goldens.json");
    let path = fixture().join(SPM_FILE);
    let model = sentencepiece::read(&path)?;
    let variants = goldens["variants"].as_object().expect("variants");
    assert!(variants.len() >= 7);
    let mut failures = Vec::new();
    for (name, variant) in variants {
        let tok = convert(&model, &path, &settings(variant)?)?;
        for case in variant["texts"].as_array().expect("texts") {
            let text = case["text"].as_str().expect("text");
            for (key, special) in [("ids", true), ("ids_plain", false)] {
                let want: Vec<u32> = serde_json::from_value(case[key].clone()).expect("ids");
                let got = tok.encode(text, special).map_err(|e| Error::Tokenizer(e.to_string()))?.get_ids().to_vec();
                if got != want {
                    failures.push(format!("{name} {key} {text:?}:\n  got  {got:?}\n  want {want:?}"));
                }
            }
        }
    }
    assert!(failures.is_empty(), "{} mismatches:\n{}", failures.len(), failures.join("\n"));
    Ok(())
}

#[test]
fn added_tokens_keep_their_ids_and_flags() -> Result<()> {
    let goldens = json_file("goldens.json");
    let s = settings(&goldens["variants"]["hf_legacy"])?;
    let path = fixture().join(SPM_FILE);
    let tok = convert(&sentencepiece::read(&path)?, &path, &s)?;
    let pieces = goldens["pieces"].as_u64().expect("pieces") as u32;
    assert_eq!(tok.token_to_id("<image>"), Some(pieces));
    assert_eq!(tok.token_to_id("<video>"), Some(pieces + 1));
    assert_eq!(tok.token_to_id("<pad>"), Some(pieces + 2));
    assert_eq!(tok.get_vocab_size(true), pieces as usize + 3);
    let ids = tok.encode("hello world", true).map_err(|e| Error::Tokenizer(e.to_string()))?;
    assert_eq!(tok.decode(ids.get_ids(), true).map_err(|e| Error::Tokenizer(e.to_string()))?, "hello world");
    Ok(())
}

#[test]
fn a_unigram_model_is_refused() -> Result<()> {
    let path = fixture().join(SPM_FILE);
    let mut model = sentencepiece::read(&path)?;
    let mut trainer = model.trainer_spec.clone().unwrap_or_default();
    trainer.set_model_type(ModelType::Unigram);
    model.trainer_spec = Some(trainer);
    let err = convert(&model, &path, &SpmSettings::default()).expect_err("unigram");
    assert!(matches!(err, Error::UnsupportedSentencePiece { ref model_type, .. } if model_type == "UNIGRAM"), "{err}");
    Ok(())
}

#[test]
fn tokenizer_json_wins_over_tokenizer_model() -> Result<()> {
    let dir = tempfile::tempdir().map_err(|e| Error::io("tempdir", e))?;
    let spm = dir.path().join(SPM_FILE);
    std::fs::copy(fixture().join(SPM_FILE), &spm).map_err(|e| Error::io(&spm, e))?;
    assert_eq!(
        TokenizerSource::find(dir.path(), SpmSemantics::Fast)?,
        TokenizerSource::SentencePiece(spm, SpmSemantics::Fast)
    );
    let dst = dir.path().join(TOKENIZER_JSON);
    assert!(TokenizerSource::find(dir.path(), SpmSemantics::Fast)?.write_engine_file(&dst)?.is_some());
    assert_eq!(TokenizerSource::find(dir.path(), SpmSemantics::Fast)?, TokenizerSource::Json(dst));
    let empty = tempfile::tempdir().map_err(|e| Error::io("tempdir", e))?;
    assert!(TokenizerSource::find(empty.path(), SpmSemantics::Slow).is_err());
    Ok(())
}
