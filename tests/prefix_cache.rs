//! The engine's prefix cache on the tiny fixture engines: a request that carries its history
//! (a stateless API's follow-up) or asks something else about the same media continues from a
//! cached conversation, prefills only what it does not share, and answers exactly as the same
//! request without the cache (tokens equal, logits within 1e-4).
#![allow(clippy::unwrap_used)]

use std::path::Path;
use std::sync::{Arc, OnceLock};

use ndarray::Array5;
use ndarray_npy::read_npy;
use vl_e2e::{built, built_for, fixture_dir, max_abs_diff, settled};
use vl_runtime::engine::{Engine, EngineOptions, Event, Handle, Request};
use vl_runtime::manifest::Target;
use vl_runtime::model::{DecoderChoice, Media, Model, ModelOptions};
use vl_runtime::prompt::Exchange;
use vl_runtime::{Answer, GenerateOptions};

const TOLERANCE: f32 = 1e-4;

fn engine(dir: &Path, prefix_cache: usize) -> Engine {
    // `decoder.onnx` of `dir`, whichever attention it has.
    let options = ModelOptions { decoder: DecoderChoice::Standard, ..ModelOptions::default() };
    let model = Arc::new(Model::load(dir, options).unwrap());
    Engine::start(model, EngineOptions { prefix_cache, ..Default::default() }).unwrap()
}

fn pool_engine() -> &'static Path {
    &built_for("tiny", Some(Target::OnnxRuntime)).engine
}

fn video() -> Media {
    static PIXELS: OnceLock<Arc<Array5<f32>>> = OnceLock::new();
    let px = PIXELS.get_or_init(|| Arc::new(read_npy(fixture_dir("tiny").join("pixel_values_videos.npy")).unwrap()));
    Media::VideoPixels(px.clone())
}

fn request(media: Media, earlier: &[Exchange], question: &str, key: Option<&str>) -> Request {
    Request {
        earlier: earlier.to_vec(),
        cache_key: key.map(String::from),
        options: GenerateOptions { max_new_tokens: 9, ignore_eos: true, ..GenerateOptions::default() },
        logits: true,
        ..Request::new(media, question)
    }
}

struct Outcome {
    logits: Vec<Vec<f32>>,
    answer: Answer,
}

fn collect(handle: Handle) -> Outcome {
    let mut logits = Vec::new();
    loop {
        match handle.recv().expect("the channel closed before Done") {
            Event::Token { id: Some(_), logits: l, .. } => logits.push(l.expect("logits were asked for")),
            Event::Token { id: None, .. } => {}
            Event::Done(done) => {
                assert!(done.conversation.is_none(), "a cached conversation was handed out");
                return Outcome { logits, answer: done.answer };
            }
            Event::Failed(e) => panic!("request failed: {e}"),
        }
    }
}

fn run(engine: &Engine, request: Request) -> Outcome {
    collect(engine.submit(request).unwrap())
}

fn assert_same(label: &str, got: &Outcome, want: &Outcome) {
    assert_eq!(got.answer.token_ids, want.answer.token_ids, "{label}: tokens differ from the uncached request");
    for (step, (g, w)) in got.logits.iter().zip(&want.logits).enumerate() {
        let d = max_abs_diff(g, w);
        assert!(d <= TOLERANCE, "{label}: step {step} logits differ by {d} from the uncached request");
    }
}

fn follow_ups_match(dir: &Path) {
    let cached = engine(dir, 8);
    let plain = engine(dir, 0);
    let key = Some("video-1");
    let first = run(&cached, request(video(), &[], "What happens in this video?", key));
    let before = settled(&cached);
    assert_eq!(before.prefix_cached, 1, "{before:?}");
    let earlier = [Exchange { question: "What happens in this video?".into(), answer: first.answer.text.clone() }];
    let follow = run(&cached, request(video(), &earlier, "And then?", key));
    let after = settled(&cached);
    let uncached = run(&plain, request(video(), &earlier, "And then?", key));
    assert_same("follow-up", &follow, &uncached);
    assert_eq!(after.prefix_hits, 1, "{after:?}");
    let reused = (after.prefix_tokens_reused - before.prefix_tokens_reused) as usize;
    let prefilled = (after.prefill_tokens - before.prefill_tokens) as usize;
    // The first turn's prompt (visual tokens included) at least is not prefilled again.
    let visual = cached.model().manifest().preprocess.frames * cached.model().manifest().model.tokens_per_frame;
    assert!(reused > visual, "only {reused} tokens reused: {after:?}");
    assert!(prefilled < 40, "the follow-up prefilled {prefilled} tokens: {after:?}");
    assert_eq!(plain.stats().prefix_hits, 0);

    // Another question about the same video shares the visual prefix.
    let other = run(&cached, request(video(), &[], "Describe the colors.", key));
    let stats = settled(&cached);
    assert_eq!(stats.prefix_hits, 2, "{stats:?}");
    assert_same("another question", &other, &run(&plain, request(video(), &[], "Describe the colors.", key)));
    // A different key never matches, even with the same pixels.
    run(&cached, request(video(), &[], "Describe the colors.", Some("video-2")));
    assert_eq!(settled(&cached).prefix_hits, 2);
}

#[test]
fn a_stateless_follow_up_continues_from_the_cache_in_place_decoder() {
    follow_ups_match(pool_engine());
}

#[test]
fn a_stateless_follow_up_continues_from_the_cache_standard_decoder() {
    follow_ups_match(&built("tiny").engine);
}

/// A first answer that ends at its first token (sampled from the prompt's last chunk, before
/// any decode step) keeps its prompt's KV: the follow-up that carries it reuses the whole first
/// prompt, visual tokens included, and answers as without the cache.
fn a_one_token_answer_keeps_its_prompt(dir: &Path) {
    let plain = engine(dir, 0);
    let question = "What happens in this video?";
    let one = GenerateOptions { max_new_tokens: 1, ignore_eos: true, ..GenerateOptions::default() };
    let first_token = run(&plain, Request { options: one.clone(), ..request(video(), &[], question, None) });
    let mut endings = vec![("max_new_tokens 1", one)];
    // The same first token, ended by a stop string (when it has text to stop at).
    let text = first_token.answer.text.trim();
    if text.is_empty() {
        eprintln!("the first token has no text to stop at");
    } else {
        let stop = GenerateOptions { stop: vec![text.to_string()], ignore_eos: true, ..GenerateOptions::default() };
        endings.push(("a stop at the first token", stop));
    }
    for (label, options) in endings {
        let cached = engine(dir, 8);
        let key = Some("video-1");
        let first = run(&cached, Request { options, ..request(video(), &[], question, key) });
        assert_eq!(first.answer.token_ids.len(), 1, "{label}: {:?}", first.answer);
        let before = settled(&cached);
        // A fresh engine: what it prefilled is the first prompt.
        let prompt = before.prefill_tokens as usize;
        assert_eq!(before.prefix_cached, 1, "{label}: {before:?}");
        assert!(before.kv_bytes_held > 0 && before.kv_bytes_active == 0, "{label}: the prompt's KV went: {before:?}");
        let earlier = [Exchange { question: question.into(), answer: first.answer.text.clone() }];
        let follow = run(&cached, request(video(), &earlier, "And then?", key));
        let after = settled(&cached);
        assert_same(label, &follow, &run(&plain, request(video(), &earlier, "And then?", key)));
        assert_eq!(after.prefix_hits, 1, "{label}: {after:?}");
        let reused = (after.prefix_tokens_reused - before.prefix_tokens_reused) as usize;
        let prefilled = (after.prefill_tokens - before.prefill_tokens) as usize;
        assert!(reused >= prompt, "{label}: {reused} of the first prompt's {prompt} tokens reused: {after:?}");
        assert!(prefilled < 40, "{label}: the follow-up prefilled {prefilled} tokens: {after:?}");
    }
}

#[test]
fn a_one_token_answer_keeps_its_prompt_in_place_decoder() {
    a_one_token_answer_keeps_its_prompt(pool_engine());
}

#[test]
fn a_one_token_answer_keeps_its_prompt_standard_decoder() {
    a_one_token_answer_keeps_its_prompt(&built("tiny").engine);
}

#[test]
fn an_evicted_text_conversation_is_a_miss() {
    // Two slots: the third conversation evicts the first, which keeps its ids but not their KV.
    let model = Arc::new(Model::load(pool_engine(), ModelOptions::default()).unwrap());
    let cached =
        Engine::start(model, EngineOptions { max_active: 1, slots: 2, prefix_cache: 8, ..Default::default() }).unwrap();
    let plain = engine(pool_engine(), 0);
    let question = "Here is a long passage about the harbor before dawn, the boats, the gulls, the market \
                    stalls and an old man with a cart of empty crates. What does he do next?";
    let first = run(&cached, request(Media::Text, &[], question, Some("text-0")));
    run(&cached, request(Media::Text, &[], "Count to ten.", Some("text-1")));
    run(&cached, request(Media::Text, &[], "Name three colors.", Some("text-2")));
    let before = settled(&cached);
    assert!(before.evictions >= 1, "nothing was evicted: {before:?}");
    let earlier = [Exchange { question: question.into(), answer: first.answer.text }];
    let follow = run(&cached, request(Media::Text, &earlier, "Go on.", Some("text-0")));
    let after = settled(&cached);
    assert_same("after eviction", &follow, &run(&plain, request(Media::Text, &earlier, "Go on.", None)));
    // Its ids would all be prefilled again: nothing reused, no hit.
    assert_eq!(after.prefix_hits, 0, "{after:?}");
    assert_eq!(after.prefix_tokens_reused, 0, "{after:?}");
}

#[test]
fn text_follow_ups_and_the_capacity_bound() {
    let cached = engine(pool_engine(), 2);
    let plain = engine(pool_engine(), 0);
    let tokenizer = cached.model().tokenizer();
    // Long enough that the shared question alone is worth continuing from, whether or not the
    // answer's text tokenizes back to the generated ids (random weights rarely give such text).
    let context = "Here is a long passage about the harbor before dawn, the boats, the gulls, the market \
                   stalls and an old man with a cart of empty crates who stops to light his pipe.";
    let mut whole = 0;
    for (i, q) in ["Tell me a story.", "Count to ten.", "Name three colors.", "Why is the sky blue?"].iter().enumerate()
    {
        let key = format!("text-{i}");
        let q = format!("{context} {q}");
        let first = run(&cached, request(Media::Text, &[], &q, Some(&key)));
        let again = tokenizer.encode(first.answer.text.as_str(), false).unwrap();
        whole += usize::from(again.get_ids() == first.answer.token_ids.as_slice());
        let earlier = [Exchange { question: q.to_string(), answer: first.answer.text.clone() }];
        let follow = run(&cached, request(Media::Text, &earlier, "Go on.", Some(&key)));
        assert_same(
            &format!("text follow-up {i}"),
            &follow,
            &run(&plain, request(Media::Text, &earlier, "Go on.", None)),
        );
    }
    let s = settled(&cached);
    eprintln!("{whole} of 4 answers tokenize back to their ids");
    assert_eq!(s.prefix_hits, 4, "{s:?}");
    assert_eq!(s.prefix_cached, 2, "{s:?}");
    assert_eq!(s.conversations, 2, "dropped conversations are still held: {s:?}");
    assert_eq!(s.kv_bytes_active, 0, "{s:?}");
}

#[test]
fn concurrent_requests_never_share_a_cached_conversation() {
    let cached = engine(pool_engine(), 8);
    let plain = engine(pool_engine(), 0);
    let key = Some("video-1");
    let first = run(&cached, request(video(), &[], "What happens in this video?", key));
    settled(&cached);
    let earlier = [Exchange { question: "What happens in this video?".into(), answer: first.answer.text }];
    let questions = ["And then?", "Why?", "Who is there?"];
    let handles: Vec<Handle> =
        questions.iter().map(|q| cached.submit(request(video(), &earlier, q, key)).unwrap()).collect();
    for (q, h) in questions.iter().zip(handles) {
        assert_same(q, &collect(h), &run(&plain, request(video(), &earlier, q, key)));
    }
    let s = settled(&cached);
    assert!(s.prefix_hits >= 1, "{s:?}");
    assert!(s.prefix_cached <= 3 && s.kv_bytes_active == 0, "{s:?}");
}
