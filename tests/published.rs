//! The checkpoints as they are published, made by `synth` at small sizes: the HF port's sparse
//! `config.json` with transformers-4 names in safetensors shards and only a SentencePiece
//! `tokenizer.model`, and the original layout in PyTorch `.bin` shards.
//!
//! Each must export and answer; and each must give the same graphs, byte for byte, as its twin
//! in the layout the reference tests already check against transformers (the HF port) or the
//! original-layout reference (`tests/original.rs`), so it answers with the reference's tokens.
#![allow(clippy::unwrap_used)]

use std::path::Path;

use vl_e2e::case_spec;
use vl_export::export::{BuildOptions, build};
use vl_export::synth::{SynthSpec, SynthTokenizer, WeightsFormat, synthesize};
use vl_runtime::manifest::{CheckpointLayout, Manifest};
use vl_runtime::{Flow, GenerateOptions, Media, Pipeline, PipelineOptions};

fn export(spec: &SynthSpec, dir: &Path, name: &str) -> Manifest {
    let (ckpt, engine) = (dir.join(format!("{name}-ckpt")), dir.join(format!("{name}-engine")));
    synthesize(spec, &ckpt).unwrap();
    build(&BuildOptions::new(ckpt, engine.clone())).unwrap();
    Manifest::load(&engine).unwrap()
}

/// Greedy tokens for a text question, then for a question about the tiny fixture's video (its
/// prompt repeats the video placeholder once per visual token).
fn answer(engine: &Path) -> Vec<u32> {
    let p = Pipeline::load(engine, PipelineOptions::default()).unwrap();
    let opts = GenerateOptions { max_new_tokens: 8, ignore_eos: true, ..GenerateOptions::default() };
    let mut chat = p.conversation(Media::Text).unwrap();
    let mut tokens = chat.ask("What is in the video?", &opts, &mut |_| Flow::Continue).unwrap().token_ids;
    let video = Media::PixelValuesFile(vl_e2e::fixture_dir("tiny").join("pixel_values_videos.npy"));
    let mut chat = p.conversation(video).unwrap();
    tokens.extend(chat.ask("What is in the video?", &opts, &mut |_| Flow::Continue).unwrap().token_ids);
    tokens
}

/// A tokenizer whose placeholders are normalized, non-special added tokens (repeated, they do
/// not tokenize to one id each) fails the export, naming the tokenizer, instead of the first
/// video question.
#[test]
fn a_tokenizer_that_merges_repeated_placeholders_fails_the_export() {
    let dir = tempfile::tempdir().unwrap();
    let spec = SynthSpec {
        layout: CheckpointLayout::HfV4,
        published: true,
        tokenizer: SynthTokenizer::SentencePiece,
        ..case_spec("tiny")
    };
    let ckpt = dir.path().join("ckpt");
    synthesize(&spec, &ckpt).unwrap();
    let config = ckpt.join("tokenizer_config.json");
    let mut json: serde_json::Value = serde_json::from_slice(&std::fs::read(&config).unwrap()).unwrap();
    json.as_object_mut().unwrap().remove("added_tokens_decoder");
    std::fs::write(&config, serde_json::to_vec(&json).unwrap()).unwrap();
    let engine = dir.path().join("engine");
    let err = build(&BuildOptions::new(ckpt, engine.clone())).unwrap_err().to_string();
    assert!(err.contains("tokenizer.json") && err.contains("tokenize to 1 placeholder ids"), "{err}");
    assert!(!engine.exists(), "an engine was written");
}

fn same_graphs(a: &Manifest, b: &Manifest) {
    for ((role, x), (_, y)) in a.graphs.iter().into_iter().zip(b.graphs.iter()) {
        assert_eq!(x.sha256, y.sha256, "{role} graph differs");
        assert_eq!(x.data.as_ref().map(|d| &d.sha256), y.data.as_ref().map(|d| &d.sha256), "{role} weights differ");
    }
}

#[test]
fn published_hf_port_with_sparse_config_and_tokenizer_model_exports_like_the_full_config() {
    let dir = tempfile::tempdir().unwrap();
    let base = SynthSpec { layout: CheckpointLayout::HfV4, ..case_spec("tiny") };
    let published = SynthSpec { published: true, tokenizer: SynthTokenizer::SentencePiece, ..base.clone() };
    let spelled = SynthSpec { tokenizer: SynthTokenizer::SentencePiece, ..base };
    let ckpt = dir.path().join("published-ckpt");
    let m = export(&published, dir.path(), "published");
    assert!(!ckpt.join("tokenizer.json").exists(), "the published shape ships tokenizer.model only");
    assert!(ckpt.join("tokenizer.model").exists());
    assert!(ckpt.join("model.safetensors.index.json").exists());
    same_graphs(&m, &export(&spelled, dir.path(), "spelled"));
    let tokens = answer(&dir.path().join("published-engine"));
    assert_eq!(tokens, answer(&dir.path().join("spelled-engine")));
}

#[test]
fn original_layout_in_bin_shards_exports_like_its_safetensors_twin() {
    let dir = tempfile::tempdir().unwrap();
    let safetensors = case_spec("tiny-original");
    let bin = SynthSpec { weights_format: WeightsFormat::TorchBin, ..safetensors.clone() };
    let m = export(&bin, dir.path(), "bin");
    assert!(dir.path().join("bin-ckpt/pytorch_model.bin.index.json").exists());
    same_graphs(&m, &export(&safetensors, dir.path(), "safetensors"));
    assert_eq!(answer(&dir.path().join("bin-engine")), answer(&dir.path().join("safetensors-engine")));
}
