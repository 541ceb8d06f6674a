//! The original Video-LLaVA checkpoint layout (LanguageBind video tower with temporal attention,
//! llava_v1 prompt split on `<image>` markers, the original preprocessing), exported by vl-export
//! and run by vl-runtime (ONNX Runtime, CPU), against the goldens of the PyTorch reference
//! `tools/oracle_original.py` (tests/fixtures/tiny-original/README.md says how they were made).
//! Features and logits within 1e-4 absolute; prompt ids and greedy tokens identical.
#![allow(clippy::unwrap_used)]

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;

use ndarray::{Array1, Array2, Array3, Array4, ArrayD, Ix2, Ix3, Ix4};
use ndarray_npy::read_npy;
use serde_json::Value;
use vl_e2e::{built, case_spec, fixture_dir, max_abs_diff};
use vl_export::checkpoint::{Checkpoint, TowerDirs};
use vl_export::export::{BuildOptions, build};
use vl_export::synth::{SynthSpec, synthesize};
use vl_runtime::generate::Splice;
use vl_runtime::kv_cache::KvCache;
use vl_runtime::manifest::{CheckpointLayout, PlaceholderStyle};
use vl_runtime::preprocess::{PreprocessRecipe, preprocess_image_original, preprocess_video_original};
use vl_runtime::prompt::{PromptBuilder, VisualSlot};
use vl_runtime::video::RgbFrame;
use vl_runtime::{Flow, GenerateOptions, Media, Pipeline, PipelineOptions};

const CASE: &str = "tiny-original";
const TOL: f32 = 1e-4;

fn golden() -> Value {
    serde_json::from_str(&std::fs::read_to_string(fixture_dir(CASE).join("golden.json")).unwrap()).unwrap()
}

fn npy<D: ndarray::Dimension>(file: &str) -> ndarray::Array<f32, D> {
    let arr: ArrayD<f32> = read_npy(fixture_dir(CASE).join(file)).unwrap();
    arr.into_dimensionality::<D>().unwrap()
}

fn ids(v: &Value) -> Vec<u32> {
    v.as_array().unwrap().iter().map(|x| x.as_u64().unwrap() as u32).collect()
}

fn greedy(n: usize) -> GenerateOptions {
    GenerateOptions { max_new_tokens: n, ignore_eos: true, ..GenerateOptions::default() }
}

/// The exported engine, checked to come from the checkpoint the goldens were made from.
fn pipeline() -> Pipeline {
    let b = built(CASE);
    let want = golden()["model_sha256"]["model.safetensors"].as_str().unwrap().to_string();
    let got = vl_runtime::verify::sha256_file(&b.checkpoint.join("model.safetensors")).unwrap();
    assert_eq!(got, want, "the synthesized checkpoint differs from the goldens' one; run tools/make_goldens.sh");
    Pipeline::load(&b.engine, PipelineOptions::default()).unwrap()
}

#[test]
fn manifest_records_the_original_layout_template_and_recipe() {
    let p = pipeline();
    let m = p.manifest();
    assert_eq!(m.source.layout, CheckpointLayout::Original);
    assert_eq!(m.source.architecture, "LlavaLlamaForCausalLM");
    assert_eq!(m.chat_template.placeholders, PlaceholderStyle::SplitOnMarker);
    assert_eq!(m.preprocess.recipe, PreprocessRecipe::Original);
    assert_eq!(m.model.num_frames, 8);
    assert!(m.chat_template.system.starts_with("A chat between a curious human"));
    assert!(m.assumptions.iter().any(|a| a.contains("temporal attention over 8 frames")), "{:?}", m.assumptions);
    let vision = &m.graphs.vision.inputs[0];
    assert_eq!(vision.shape[1], vl_runtime::manifest::Dim::Fixed(8), "temporal attention needs exactly 8 frames");
}

#[test]
fn prompt_ids_match_tokenizer_image_token() {
    let p = pipeline();
    let g = golden();
    let m = p.manifest();
    let builder = PromptBuilder::new(p.tokenizer(), &m.chat_template, &m.tokens);
    let video = VisualSlot::Video { tokens: m.preprocess.frames * m.model.tokens_per_frame };
    assert_eq!(builder.first_turn(video, g["prompt"].as_str().unwrap()).unwrap(), ids(&g["input_ids"]));
    let image = VisualSlot::Image { tokens: m.model.tokens_per_image };
    let img = &g["image_prompt"];
    assert_eq!(builder.first_turn(image, img["prompt"].as_str().unwrap()).unwrap(), ids(&img["input_ids"]));
    let text = &g["text_only"];
    assert_eq!(
        builder.first_turn(VisualSlot::None, text["prompt"].as_str().unwrap()).unwrap(),
        ids(&text["input_ids"])
    );
    let second = &g["second_turn"];
    assert_eq!(builder.next_turn(second["prompt"].as_str().unwrap()).unwrap(), ids(&second["appended_ids"]));
    // The markers are the template's: a question holding one is refused.
    assert!(builder.first_turn(video, "what is <image>?").is_err());
}

#[test]
fn features_and_logits_match_the_reference() {
    let p = pipeline();
    let g = golden();
    let px = Arc::new(npy::<ndarray::Ix5>("pixel_values_videos.npy"));
    let v = p.visual(&Media::VideoPixels(px)).unwrap().unwrap();
    let want: Array2<f32> = npy::<Ix3>("video_features.npy").index_axis_move(ndarray::Axis(0), 0);
    let features = v.features.to_host().unwrap();
    assert_eq!(features.shape(), want.shape());
    let d = max_abs_diff(features.as_slice().unwrap(), want.as_slice().unwrap());
    eprintln!("video features: max abs diff {d:.3e}");
    assert!(d <= TOL, "video features differ by {d}");

    let img: Array4<f32> = npy::<Ix4>("pixel_values.npy");
    let vi = p.visual(&Media::ImagePixels(Arc::new(img))).unwrap().unwrap();
    let want_i: Array2<f32> = npy::<Ix3>("image_features.npy").index_axis_move(ndarray::Axis(0), 0);
    let d = max_abs_diff(vi.features.to_host().unwrap().as_slice().unwrap(), want_i.as_slice().unwrap());
    eprintln!("image features: max abs diff {d:.3e}");
    assert!(d <= TOL, "image features differ by {d}");

    let prompt = ids(&g["input_ids"]);
    let splice = Splice { token: p.manifest().tokens.video, features: &v.features, first: 0 };
    let mut kv = KvCache::new(&p.manifest().model).unwrap();
    let logits = p.language_model().forward_logits(&mut kv, &prompt, Some(&splice), prompt.len()).unwrap();
    let want: Array2<f32> = npy::<Ix2>("logits.npy");
    let d = max_abs_diff(&logits, want.as_slice().unwrap());
    eprintln!("prefill logits ({} positions): max abs diff {d:.3e}", prompt.len());
    assert!(d <= TOL, "prefill logits differ by {d}");

    let text = &g["text_only"];
    let mut kv = KvCache::new(&p.manifest().model).unwrap();
    let last = p.language_model().forward(&mut kv, &ids(&text["input_ids"]), None).unwrap();
    let want: Array1<f32> = npy::<ndarray::Ix1>("text_only_last_logits.npy");
    let d = max_abs_diff(&last, want.as_slice().unwrap());
    assert!(d <= TOL, "text-only logits differ by {d}");
}

#[test]
fn greedy_answers_match_the_reference() {
    let p = pipeline();
    let g = golden();
    // The same path as `vl-run --pixel-values`.
    let mut chat = p.conversation(Media::PixelValuesFile(fixture_dir(CASE).join("pixel_values_videos.npy"))).unwrap();
    let first = chat.ask(g["prompt"].as_str().unwrap(), &greedy(32), &mut |_| Flow::Continue).unwrap();
    assert_eq!(first.token_ids, ids(&g["greedy_tokens"]), "turn 1 greedy tokens");
    let second = &g["second_turn"];
    let answer = chat.ask(second["prompt"].as_str().unwrap(), &greedy(32), &mut |_| Flow::Continue).unwrap();
    assert_eq!(answer.token_ids, ids(&second["greedy_tokens"]), "turn 2 greedy tokens");
    assert_eq!(chat.context_len(), ids(&second["input_ids"]).len() + 31);

    let img = &g["image_prompt"];
    let px: Array4<f32> = npy::<Ix4>("pixel_values.npy");
    let mut chat = p.conversation(Media::ImagePixels(Arc::new(px))).unwrap();
    let answer = chat.ask(img["prompt"].as_str().unwrap(), &greedy(16), &mut |_| Flow::Continue).unwrap();
    assert_eq!(answer.token_ids, ids(&img["greedy_tokens"]), "image greedy tokens");

    let text = &g["text_only"];
    let mut chat = p.conversation(Media::Text).unwrap();
    let answer = chat.ask(text["prompt"].as_str().unwrap(), &greedy(16), &mut |_| Flow::Continue).unwrap();
    assert_eq!(answer.token_ids, ids(&text["greedy_tokens"]), "text-only greedy tokens");
}

fn frame_of(pixels: ndarray::ArrayView3<u8>) -> RgbFrame {
    let (h, w, _) = pixels.dim();
    RgbFrame::new(w as u32, h as u32, pixels.iter().copied().collect()).unwrap()
}

#[test]
fn original_preprocessing_matches_the_reference_transforms() {
    let p = pipeline();
    let cfg = &p.manifest().preprocess.image;
    let g = golden();
    for (name, case) in g["preprocess"]["cases"].as_object().unwrap() {
        let (got, want): (Vec<f32>, ArrayD<f32>) = if name.starts_with("video") {
            let raw: Array4<u8> = read_npy(fixture_dir(CASE).join(case["frames"].as_str().unwrap())).unwrap();
            let frames: Vec<RgbFrame> = raw.outer_iter().map(frame_of).collect();
            let out = preprocess_video_original(&frames, cfg).unwrap();
            let want: ArrayD<f32> = read_npy(fixture_dir(CASE).join(case["pixel_values"].as_str().unwrap())).unwrap();
            assert_eq!(&out.shape()[1..], want.shape(), "{name}");
            (out.iter().copied().collect(), want)
        } else {
            let raw: Array3<u8> = read_npy(fixture_dir(CASE).join(case["frame"].as_str().unwrap())).unwrap();
            let out = preprocess_image_original(&frame_of(raw.view()), cfg).unwrap();
            let want: ArrayD<f32> = read_npy(fixture_dir(CASE).join(case["pixel_values"].as_str().unwrap())).unwrap();
            assert_eq!(out.shape(), want.shape(), "{name}");
            (out.iter().copied().collect(), want)
        };
        let d = max_abs_diff(&got, want.as_standard_layout().as_slice().unwrap());
        eprintln!("preprocess {name}: max abs diff {d:.3e}");
        assert!(d <= 1e-5, "{name}: pixel values differ by {d}");
    }
}

/// `target/<profile>/vl-run`, as tests/cli.rs finds it.
fn vl_run() -> Option<PathBuf> {
    let exe = std::env::current_exe().unwrap();
    let profile_dir = exe.parent().and_then(Path::parent)?.to_path_buf();
    let target = profile_dir.parent()?.to_path_buf();
    [profile_dir.join("vl-run"), target.join("release/vl-run"), target.join("debug/vl-run")]
        .into_iter()
        .find(|p| p.is_file())
}

#[test]
fn vl_run_pixel_values_answers_like_the_reference() {
    let Some(bin) = vl_run() else {
        eprintln!("skipped: build vl-run first (`cargo build --release -p vl-runtime --bin vl-run`)");
        return;
    };
    let _ = pipeline();
    let g = golden();
    let px = fixture_dir(CASE).join("pixel_values_videos.npy");
    let out = Command::new(bin)
        .arg("--engine")
        .arg(&built(CASE).engine)
        .args(["--pixel-values", px.to_str().unwrap(), "--prompt", g["prompt"].as_str().unwrap()])
        .args(["--max-new-tokens", "32", "--ignore-eos", "--json"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let stdout = String::from_utf8_lossy(&out.stdout);
    let answer: Value = serde_json::from_str(stdout.lines().last().unwrap()).unwrap();
    assert_eq!(ids(&answer["token_ids"]), ids(&g["greedy_tokens"]));
}

#[test]
fn hf_port_exports_say_their_video_tower_has_no_temporal_attention() {
    let b = built("tiny");
    let manifest = vl_runtime::manifest::Manifest::load(&b.engine).unwrap();
    let line = manifest.assumptions.iter().find(|a| a.contains("no temporal attention"));
    assert!(line.is_some(), "{:?}", manifest.assumptions);
    let ck = Checkpoint::open(&b.checkpoint).unwrap();
    assert!(ck.notice.contains("Hugging Face port of Video-LLaVA"), "{}", ck.notice);
    let towers = TowerDirs { video: Some(b.checkpoint.clone()), image: None };
    let err = Checkpoint::open_with(&b.checkpoint, &towers).err().unwrap();
    assert!(err.to_string().contains("--video-tower"), "{err}");
}

/// Tower configs from `--video-tower`/`--image-tower` and, without them, from the weights (a
/// 64-wide tower so that the assumed head width of 64 fits): the same graphs either way.
#[test]
fn tower_configs_from_flags_or_inferred_from_weights() {
    let dir = tempfile::tempdir().unwrap();
    let spec = SynthSpec { vision_hidden: 64, vision_heads: 1, ..case_spec(CASE) };
    let ckpt = dir.path().join("ckpt");
    synthesize(&spec, &ckpt).unwrap();
    let towers = dir.path().join("towers");
    std::fs::rename(&ckpt, &towers).unwrap();
    std::fs::create_dir(&ckpt).unwrap();
    for entry in std::fs::read_dir(&towers).unwrap() {
        let path = entry.unwrap().path();
        if path.is_file() {
            std::fs::rename(&path, ckpt.join(path.file_name().unwrap())).unwrap();
        }
    }
    let flags = TowerDirs {
        video: Some(towers.join("LanguageBind_Video_merge")),
        image: Some(towers.join("LanguageBind_Image")),
    };
    let with_flags = build(&BuildOptions { towers: flags, ..BuildOptions::new(ckpt.clone(), dir.path().join("a")) })
        .unwrap()
        .manifest;
    let inferred = build(&BuildOptions::new(ckpt.clone(), dir.path().join("b"))).unwrap().manifest;
    assert_eq!(with_flags.graphs.vision.data, inferred.graphs.vision.data, "same video tower weights and layout");
    assert_eq!(with_flags.graphs.vision.sha256, inferred.graphs.vision.sha256, "same video graph");
    assert_eq!(with_flags.graphs.image.sha256, inferred.graphs.image.sha256, "same image graph");
    assert!(inferred.assumptions.iter().any(|a| a.contains("assumed 1 heads of 64")), "{:?}", inferred.assumptions);
    let missing = TowerDirs { video: Some(dir.path().join("nowhere")), image: None };
    let err = build(&BuildOptions { towers: missing, ..BuildOptions::new(ckpt, dir.path().join("c")) }).unwrap_err();
    assert!(err.to_string().contains("--video-tower"), "{err}");
}
