//! Parity with transformers: the exported graphs, run by vl-runtime on ONNX Runtime (CPU),
//! against goldens written by `tools/oracle.py goldens` (see tests/fixtures/*/README.md).
//! Features and logits within 1e-4 absolute; greedy tokens identical.
#![allow(clippy::unwrap_used)]

use std::sync::Arc;

use ndarray::{Array1, Array2, Array4, Array5, ArrayD};
use ndarray_npy::read_npy;
use serde_json::Value;
use vl_e2e::{built_for, fixture_dir, max_abs_diff};
use vl_runtime::generate::Splice;
use vl_runtime::kv_cache::KvCache;
use vl_runtime::manifest::{KvLayout, Target};
use vl_runtime::{DecoderChoice, Flow, GenerateOptions, Media, Pipeline, PipelineOptions};

const TOL: f32 = 1e-4;

struct Case {
    golden: Value,
    pipeline: Pipeline,
    name: &'static str,
}

/// Case `name` on the default engine's `decoder.onnx` (standard operators: what TensorRT runs).
fn case(name: &'static str) -> Case {
    case_for(name, None)
}

/// Case `name` exported for `target` (`None`: the default target), on its `decoder.onnx`.
fn case_for(name: &'static str, target: Option<Target>) -> Case {
    case_with(name, target, DecoderChoice::Standard)
}

/// Case `name` exported for `target`, running the decoder `decoder` picks.
fn case_with(name: &'static str, target: Option<Target>, decoder: DecoderChoice) -> Case {
    let b = built_for(name, target);
    let golden: Value =
        serde_json::from_str(&std::fs::read_to_string(fixture_dir(name).join("golden.json")).unwrap()).unwrap();
    let want = golden["model_sha256"]["model.safetensors"].as_str().unwrap();
    let got = vl_runtime::verify::sha256_file(&b.checkpoint.join("model.safetensors")).unwrap();
    assert_eq!(got, want, "{name}: the synthesized checkpoint differs from the goldens' one; run `make goldens`");
    let pipeline = Pipeline::load(&b.engine, PipelineOptions { decoder, ..PipelineOptions::default() }).unwrap();
    Case { golden, pipeline, name }
}

fn npy<D: ndarray::Dimension>(case: &str, file: &str) -> ndarray::Array<f32, D> {
    let arr: ArrayD<f32> = read_npy(fixture_dir(case).join(file)).unwrap();
    arr.into_dimensionality::<D>().unwrap()
}

fn ids(v: &Value) -> Vec<u32> {
    v.as_array().unwrap().iter().map(|x| x.as_u64().unwrap() as u32).collect()
}

fn video_pixels(c: &Case) -> Arc<Array5<f32>> {
    Arc::new(npy::<ndarray::Ix5>(c.name, "pixel_values_videos.npy"))
}

fn greedy(n: usize) -> GenerateOptions {
    GenerateOptions { max_new_tokens: n, ignore_eos: true, ..GenerateOptions::default() }
}

fn check_features(c: &Case) {
    let v = c.pipeline.visual(&Media::VideoPixels(video_pixels(c))).unwrap().unwrap();
    let want: Array2<f32> = npy::<ndarray::Ix3>(c.name, "video_features.npy").index_axis_move(ndarray::Axis(0), 0);
    let features = v.features.to_host().unwrap();
    assert_eq!(features.shape(), want.shape(), "{}: video features shape", c.name);
    let d = max_abs_diff(features.as_slice().unwrap(), want.as_slice().unwrap());
    assert!(d <= TOL, "{}: video features differ by {d}", c.name);

    let px: Array4<f32> = npy::<ndarray::Ix4>(c.name, "pixel_values.npy");
    let v = c.pipeline.visual(&Media::ImagePixels(Arc::new(px))).unwrap().unwrap();
    let want: Array2<f32> = npy::<ndarray::Ix3>(c.name, "image_features.npy").index_axis_move(ndarray::Axis(0), 0);
    let features = v.features.to_host().unwrap();
    assert_eq!(features.shape(), want.shape(), "{}: image features shape", c.name);
    let d = max_abs_diff(features.as_slice().unwrap(), want.as_slice().unwrap());
    assert!(d <= TOL, "{}: image features differ by {d}", c.name);
}

fn check_prefill_logits(c: &Case) {
    let prompt = ids(&c.golden["input_ids"]);
    let visual = c.pipeline.visual(&Media::VideoPixels(video_pixels(c))).unwrap().unwrap();
    let splice = Splice { token: c.pipeline.manifest().tokens.video, features: &visual.features, first: 0 };
    let mut kv = KvCache::new(&c.pipeline.manifest().model).unwrap();
    let logits = c.pipeline.language_model().forward_logits(&mut kv, &prompt, Some(&splice), prompt.len()).unwrap();
    let want: Array2<f32> = npy::<ndarray::Ix2>(c.name, "logits.npy");
    let d = max_abs_diff(&logits, want.as_slice().unwrap());
    assert!(d <= TOL, "{}: prefill logits differ by {d} over {} positions", c.name, prompt.len());
    assert_eq!(kv.len(), prompt.len());
}

fn run_turns(c: &Case) {
    let mut chat = c.pipeline.conversation(Media::VideoPixels(video_pixels(c))).unwrap();
    let question = c.golden["prompt"].as_str().unwrap();
    let first = chat.ask(question, &greedy(32), &mut |_| Flow::Continue).unwrap();
    assert_eq!(first.token_ids, ids(&c.golden["greedy_tokens"]), "{}: turn 1 greedy tokens", c.name);
    let turn1_len = ids(&c.golden["input_ids"]).len();
    assert_eq!(chat.context_len(), turn1_len + 31, "{}: the last sampled token is fed with the next turn", c.name);

    let second = &c.golden["second_turn"];
    let answer = chat.ask(second["prompt"].as_str().unwrap(), &greedy(32), &mut |_| Flow::Continue).unwrap();
    assert_eq!(answer.token_ids, ids(&second["greedy_tokens"]), "{}: turn 2 greedy tokens", c.name);
    assert_eq!(answer.timings.vision_ms, 0.0, "{}: turn 2 must not run vision", c.name);
    assert_eq!(chat.context_len(), ids(&second["input_ids"]).len() + 31, "{}: turn 2 context", c.name);
}

fn run_image_and_text(c: &Case) {
    let px: Array4<f32> = npy::<ndarray::Ix4>(c.name, "pixel_values.npy");
    let img = &c.golden["image_prompt"];
    let mut chat = c.pipeline.conversation(Media::ImagePixels(Arc::new(px))).unwrap();
    let answer = chat.ask(img["prompt"].as_str().unwrap(), &greedy(16), &mut |_| Flow::Continue).unwrap();
    assert_eq!(answer.token_ids, ids(&img["greedy_tokens"]), "{}: image greedy tokens", c.name);

    let text = &c.golden["text_only"];
    let mut kv = KvCache::new(&c.pipeline.manifest().model).unwrap();
    let last = c.pipeline.language_model().forward(&mut kv, &ids(&text["input_ids"]), None).unwrap();
    let want: Array1<f32> = npy::<ndarray::Ix1>(c.name, "text_only_last_logits.npy");
    let d = max_abs_diff(&last, want.as_slice().unwrap());
    assert!(d <= TOL, "{}: text-only logits differ by {d}", c.name);
    let mut chat = c.pipeline.conversation(Media::Text).unwrap();
    let answer = chat.ask("hello", &greedy(16), &mut |_| Flow::Continue).unwrap();
    assert_eq!(answer.token_ids, ids(&text["greedy_tokens"]), "{}: text-only greedy tokens", c.name);
}

fn parity(name: &'static str) {
    parity_for(name, None);
}

fn parity_for(name: &'static str, target: Option<Target>) {
    check_all(&case_for(name, target));
}

fn check_all(c: &Case) {
    check_features(c);
    check_prefill_logits(c);
    run_turns(c);
    run_image_and_text(c);
}

#[test]
fn tiny_matches_transformers() {
    parity("tiny");
}

/// Grouped-query attention (2 kv heads for 4 query heads) and `vision_feature_layer` as a list.
#[test]
fn gqa_and_feature_layer_list_match_transformers() {
    parity("tiny-gqa");
}

/// The default engine's in-place twin (`decoder_in_place.onnx`, what the CPU runs by default).
#[test]
fn default_engines_in_place_twin_matches_transformers() {
    for name in ["tiny", "tiny-gqa"] {
        let c = case_with(name, None, DecoderChoice::Auto);
        assert_eq!(c.pipeline.manifest().model.kv_layout, KvLayout::SharedBuffer, "{name}");
        check_all(&c);
    }
}

#[test]
fn prompt_tokens_match_the_processor() {
    let c = case("tiny");
    let m = c.pipeline.manifest();
    let builder = vl_runtime::prompt::PromptBuilder::new(c.pipeline.tokenizer(), &m.chat_template, &m.tokens);
    let slot = vl_runtime::prompt::VisualSlot::Video { tokens: m.preprocess.frames * m.model.tokens_per_frame };
    let got = builder.first_turn(slot, c.golden["prompt"].as_str().unwrap()).unwrap();
    assert_eq!(got, ids(&c.golden["input_ids"]));
    let next = builder.next_turn(c.golden["second_turn"]["prompt"].as_str().unwrap()).unwrap();
    assert_eq!(next, ids(&c.golden["second_turn"]["appended_ids"]));
}

/// The `--target onnxruntime` engine: GroupQueryAttention with KV buffers shared in place.
fn onnxruntime_case(name: &'static str) -> Case {
    let c = case_for(name, Some(Target::OnnxRuntime));
    assert_eq!(c.pipeline.manifest().model.kv_layout, KvLayout::SharedBuffer);
    c
}

#[test]
fn tiny_onnxruntime_target_matches_transformers() {
    onnxruntime_case("tiny");
    parity_for("tiny", Some(Target::OnnxRuntime));
}

#[test]
fn gqa_onnxruntime_target_matches_transformers() {
    onnxruntime_case("tiny-gqa");
    parity_for("tiny-gqa", Some(Target::OnnxRuntime));
}

/// Shared buffers are sized once for the conversation (prompt + max_new_tokens) and grow,
/// keeping what they hold, when a later step needs more: the logits stay those of the
/// standard engine.
#[test]
fn shared_kv_buffers_grow_and_keep_their_contents() {
    let std = case("tiny");
    let ort = onnxruntime_case("tiny");
    let limit = ort.pipeline.manifest().max_sequence_length;
    let n = 300.min(limit);
    let vocab = ort.pipeline.manifest().model.vocab_size as u32;
    let ids: Vec<u32> = (0..n as u32).map(|i| 3 + (i * 7919) % (vocab - 3)).collect();
    let mut a = KvCache::new(&std.pipeline.manifest().model).unwrap();
    let mut b = KvCache::new(&ort.pipeline.manifest().model).unwrap();
    assert_eq!(b.layout(), KvLayout::SharedBuffer);
    let (lm_a, lm_b) = (std.pipeline.language_model(), ort.pipeline.language_model());
    let mut fed = 0;
    for chunk in [5, 1, 1, 40, 1, 200, 1, 1, 50] {
        let end = (fed + chunk).min(n);
        if end == fed {
            break;
        }
        let want = lm_a.forward_logits(&mut a, &ids[fed..end], None, end - fed).unwrap();
        let got = lm_b.forward_logits(&mut b, &ids[fed..end], None, end - fed).unwrap();
        let d = max_abs_diff(&got, &want);
        assert!(d <= TOL, "positions {fed}..{end}: logits differ by {d} (capacity {})", b.capacity());
        assert!(b.capacity() >= end && b.capacity() <= limit);
        fed = end;
    }
    assert_eq!(b.len(), fed);
}

/// Conversations with their own shared buffers, run from 8 threads at once, give the tokens
/// they give alone.
#[test]
fn onnxruntime_target_concurrent_conversations_match_sequential_ones() {
    let c = onnxruntime_case("tiny");
    let question = c.golden["prompt"].as_str().unwrap().to_string();
    let converse = |i: usize| {
        let mut chat = c.pipeline.conversation(Media::VideoPixels(video_pixels(&c))).unwrap();
        let opts = if i.is_multiple_of(2) {
            greedy(32)
        } else {
            let sampling = vl_runtime::sampling::SamplingParams {
                temperature: 0.8,
                top_k: 40,
                top_p: 0.9,
                repetition_penalty: 1.1,
                seed: 7 + i as u64,
                ..Default::default()
            };
            GenerateOptions { sampling, max_new_tokens: 24, ignore_eos: true, ..GenerateOptions::default() }
        };
        let first = chat.ask(&question, &opts, &mut |_| Flow::Continue).unwrap();
        let second = chat.ask("And then?", &GenerateOptions { max_new_tokens: 8, ..opts }, &mut |_| Flow::Continue);
        vec![first.token_ids, second.unwrap().token_ids]
    };
    let alone: Vec<_> = (0..8).map(converse).collect();
    assert_eq!(alone[0][0], ids(&c.golden["greedy_tokens"]), "greedy run alone differs from the golden");
    let together: Vec<_> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..8).map(|i| s.spawn(move || converse(i))).collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    for (i, (a, t)) in alone.iter().zip(&together).enumerate() {
        assert_eq!(a, t, "conversation {i} gives other tokens when run concurrently");
    }
}
