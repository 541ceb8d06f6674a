//! Parity with transformers: the exported graphs, run by vl-runtime on ONNX Runtime (CPU),
//! against goldens written by `tools/oracle.py goldens` (see tests/fixtures/*/README.md).
//! Features and logits within 1e-4 absolute; greedy tokens identical.
#![allow(clippy::unwrap_used)]

use std::sync::Arc;

use ndarray::{Array1, Array2, Array4, Array5, ArrayD};
use ndarray_npy::read_npy;
use serde_json::Value;
use vl_e2e::{built, fixture_dir, max_abs_diff};
use vl_runtime::generate::Splice;
use vl_runtime::kv_cache::KvCache;
use vl_runtime::{Flow, GenerateOptions, Media, Pipeline, PipelineOptions};

const TOL: f32 = 1e-4;

struct Case {
    golden: Value,
    pipeline: Pipeline,
    name: &'static str,
}

fn case(name: &'static str) -> Case {
    let b = built(name);
    let golden: Value =
        serde_json::from_str(&std::fs::read_to_string(fixture_dir(name).join("golden.json")).unwrap()).unwrap();
    let want = golden["model_sha256"]["model.safetensors"].as_str().unwrap();
    let got = vl_runtime::verify::sha256_file(&b.checkpoint.join("model.safetensors")).unwrap();
    assert_eq!(got, want, "{name}: the synthesized checkpoint differs from the goldens' one; run `make goldens`");
    let pipeline = Pipeline::load(&b.engine, PipelineOptions::default()).unwrap();
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
    assert_eq!(v.features.shape(), want.shape(), "{}: video features shape", c.name);
    let d = max_abs_diff(v.features.as_slice().unwrap(), want.as_slice().unwrap());
    assert!(d <= TOL, "{}: video features differ by {d}", c.name);

    let px: Array4<f32> = npy::<ndarray::Ix4>(c.name, "pixel_values.npy");
    let v = c.pipeline.visual(&Media::ImagePixels(Arc::new(px))).unwrap().unwrap();
    let want: Array2<f32> = npy::<ndarray::Ix3>(c.name, "image_features.npy").index_axis_move(ndarray::Axis(0), 0);
    assert_eq!(v.features.shape(), want.shape(), "{}: image features shape", c.name);
    let d = max_abs_diff(v.features.as_slice().unwrap(), want.as_slice().unwrap());
    assert!(d <= TOL, "{}: image features differ by {d}", c.name);
}

fn check_prefill_logits(c: &Case) {
    let prompt = ids(&c.golden["input_ids"]);
    let visual = c.pipeline.visual(&Media::VideoPixels(video_pixels(c))).unwrap().unwrap();
    let splice = Splice { token: c.pipeline.manifest().tokens.video, features: visual.features.view() };
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
    let c = case(name);
    check_features(&c);
    check_prefill_logits(&c);
    run_turns(&c);
    run_image_and_text(&c);
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
