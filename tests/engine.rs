//! The serving engine on the tiny fixture engines: batching must not change answers.
//!
//! Every sequence decoded in a batch (mixed lengths, joins and leaves mid-stream, cancels,
//! follow-ups, evicted conversations, small prefill chunks) gives the greedy tokens of the same
//! request run alone, with logits within 1e-4; both decoders are covered: the in-place
//! (`GroupQueryAttention`, batched calls) and the standard-ONNX one (a call per sequence).
//! Admission: a full queue and the reject policy give `Overloaded`, a request that can never
//! fit is refused before any work, and the KV budget is never exceeded. A first answer that
//! ends at its first token keeps its question for the follow-up.
#![allow(clippy::unwrap_used)]

use std::path::Path;
use std::sync::Arc;

use vl_e2e::batching::{
    Outcome, alone, argmax_rows_match_the_logits, assert_same, batched_equals_alone, collect, greedy,
    joins_leaves_cancels_and_follow_ups, randomized_schedule,
};
use vl_e2e::{built, built_for, fixture_video, settled};
use vl_runtime::engine::{Done, Engine, EngineOptions, Event, FollowUp, Handle, Pace, Request, WhenFull};
use vl_runtime::manifest::{KvLayout, Target};
use vl_runtime::model::{DecoderChoice, Media, Model, ModelOptions};
use vl_runtime::{Error, FinishReason};

fn pool_engine() -> &'static Path {
    &built_for("tiny", Some(Target::OnnxRuntime)).engine
}

fn concat_engine() -> &'static Path {
    &built("tiny").engine
}

/// `decoder.onnx` of `dir`, whichever attention it has.
fn model(dir: &Path) -> Arc<Model> {
    model_with(dir, DecoderChoice::Standard)
}

/// An engine with the default options.
fn default_engine(model: Arc<Model>) -> Engine {
    Engine::start(model, EngineOptions::default()).unwrap()
}

fn model_with(dir: &Path, decoder: DecoderChoice) -> Arc<Model> {
    Arc::new(Model::load(dir, ModelOptions { decoder, ..ModelOptions::default() }).unwrap())
}

/// The `i`-th request of a test: videos and texts, questions of different lengths.
fn request(i: usize, pace: Pace) -> Request {
    let questions = [
        "What happens in this video?",
        "Describe it.",
        "What does the horse on the beach do next, and why does it look at the sea?",
        "Who?",
        "Tell me everything you see, in order, from the first frame to the last one.",
    ];
    let media = if i % 3 == 2 { Media::Text } else { fixture_video() };
    Request {
        options: greedy(6 + (i * 5) % 17),
        pace,
        logits: true,
        ..Request::new(media, questions[i % questions.len()])
    }
}

#[test]
fn batched_sequences_match_each_alone_in_place_decoder() {
    batched_equals_alone(&default_engine(model(pool_engine())), &request, 8);
}

#[test]
fn greedy_rows_take_the_decoders_argmax_with_the_same_tokens() {
    argmax_rows_match_the_logits(&default_engine(model(pool_engine())), &request, 6);
}

#[test]
fn batched_sequences_match_each_alone_standard_decoder() {
    batched_equals_alone(&default_engine(model(concat_engine())), &request, 8);
}

/// The default engine directory holds both decoders; on the CPU the engine runs its in-place
/// twin, batched, and answers as `decoder.onnx` does.
#[test]
fn default_engine_runs_its_in_place_twin_batched_with_the_standard_decoders_answers() {
    let twin = model_with(concat_engine(), DecoderChoice::Auto);
    assert_eq!(twin.manifest().model.kv_layout, KvLayout::SharedBuffer);
    let standard = Engine::start(model(concat_engine()), EngineOptions::default()).unwrap();
    let engine = Engine::start(twin, EngineOptions::default()).unwrap();
    for i in 0..4 {
        assert_same(
            &format!("request {i}"),
            &alone(&engine, request(i, Pace::Free)),
            &alone(&standard, request(i, Pace::Free)),
        );
    }
    batched_equals_alone(&default_engine(model_with(concat_engine(), DecoderChoice::InPlace)), &request, 8);
}

/// KV slots allocated up front by the session's allocator (what a GPU gets, there in device
/// memory) answer as the host mappings do, batched, with follow-ups reusing a slot. The
/// allocated memory starts as NaN on the CPU, so a read of a position never written would
/// show in the logits.
#[test]
fn allocated_kv_slots_answer_as_host_mapped_ones() {
    use vl_runtime::engine::KvPlacement;
    let host = Engine::start(model(pool_engine()), EngineOptions::default()).unwrap();
    let options = EngineOptions { kv_placement: KvPlacement::Allocated, slots: 4, max_active: 4, ..Default::default() };
    let allocated = Engine::start(model(pool_engine()), options).unwrap();
    let reference: Vec<Outcome> = (0..8).map(|i| alone(&host, request(i, Pace::Free))).collect();
    // More requests than slots: slots are reused by later sequences.
    let handles: Vec<Handle> = (0..8).map(|i| allocated.submit(request(i, Pace::Free)).unwrap()).collect();
    for (i, h) in handles.into_iter().enumerate() {
        assert_same(&format!("request {i}"), &collect(h), &reference[i]);
    }
    let stats = allocated.stats();
    assert!(stats.decode_rows > stats.decode_calls, "no decode call carried more than one sequence: {stats:?}");
}

#[test]
fn small_prefill_chunks_give_the_same_answers() {
    let whole = Engine::start(model(pool_engine()), EngineOptions::default()).unwrap();
    let chunked =
        Engine::start(model(pool_engine()), EngineOptions { prefill_chunk_tokens: 7, ..Default::default() }).unwrap();
    for i in 0..4 {
        assert_same(
            &format!("request {i}"),
            &alone(&chunked, request(i, Pace::Free)),
            &alone(&whole, request(i, Pace::Free)),
        );
    }
    assert!(chunked.stats().prefill_tokens > 0);
}

/// Joins and leaves mid-stream, a cancel, and follow-ups, on a fixed schedule: the driver
/// acks lockstep requests one token at a time, so the batch changes at known points.
#[test]
fn joins_leaves_cancels_and_follow_ups_match_alone() {
    joins_leaves_cancels_and_follow_ups(&default_engine(model(pool_engine())), &request);
}

/// Requests arrive, advance and cancel in an order drawn from a fixed seed.
#[test]
fn randomized_schedule_matches_alone() {
    let engine =
        Engine::start(model(pool_engine()), EngineOptions { max_active: 4, slots: 6, ..Default::default() }).unwrap();
    let cancelled = randomized_schedule(&engine, &request, 14, 7);
    assert!(cancelled > 0, "the seed drew no cancellation");
}

#[test]
fn an_evicted_conversation_answers_its_follow_up_the_same() {
    // Two slots: a third conversation evicts the least recently used idle one.
    let opts = EngineOptions { max_active: 1, slots: 2, ..Default::default() };
    let engine = Engine::start(model(pool_engine()), opts).unwrap();
    let keep = |i| Request { keep: true, ..request(i, Pace::Free) };
    let follow = |d: &Done| FollowUp {
        conversation: d.conversation.unwrap(),
        question: "And then?".into(),
        options: greedy(9),
        pace: Pace::Free,
        logits: true,
    };
    let first = alone(&engine, keep(0));
    let expected = collect(engine.follow_up(follow(&first.done)).unwrap());
    let first = alone(&engine, keep(0));
    alone(&engine, keep(1));
    alone(&engine, keep(3));
    assert!(engine.stats().evictions >= 1, "nothing was evicted: {:?}", engine.stats());
    let again = collect(engine.follow_up(follow(&first.done)).unwrap());
    assert_same("follow-up after eviction", &again, &expected);
}

/// A kept conversation whose first answer ended at its first token (sampled from the prompt's
/// last chunk) keeps its question: the follow-up continues from the whole first prompt.
fn a_one_token_answer_keeps_its_question(dir: &Path) {
    let engine = Engine::start(model(dir), EngineOptions::default()).unwrap();
    let first = alone(&engine, Request { keep: true, options: greedy(1), ..request(0, Pace::Free) });
    // A fresh engine: what it prefilled is the first prompt.
    let prompt = settled(&engine).prefill_tokens as usize;
    assert_eq!(first.done.context_len, prompt, "the first prompt's KV went");
    let follow = FollowUp {
        conversation: first.done.conversation.unwrap(),
        question: "And then?".into(),
        options: greedy(9),
        pace: Pace::Free,
        logits: true,
    };
    let follow = collect(engine.follow_up(follow).unwrap());
    let prefilled = settled(&engine).prefill_tokens as usize - prompt;
    // The first answer's token and the new turn are fed, the first prompt is not.
    assert!(prefilled < 40, "the follow-up prefilled {prefilled} tokens");
    assert_eq!(follow.done.context_len, prompt + prefilled + 9 - 1);
}

#[test]
fn a_one_token_answer_keeps_its_question_in_place_decoder() {
    a_one_token_answer_keeps_its_question(pool_engine());
}

#[test]
fn a_one_token_answer_keeps_its_question_standard_decoder() {
    a_one_token_answer_keeps_its_question(concat_engine());
}

#[test]
fn a_full_queue_and_the_reject_policy_refuse_with_overloaded() {
    let opts =
        EngineOptions { max_active: 1, slots: 1, when_full: WhenFull::Queue { max_waiting: 1 }, ..Default::default() };
    let engine = Engine::start(model(pool_engine()), opts).unwrap();
    let slow = |i| Request { options: greedy(20), ..request(i, Pace::Lockstep) };
    let running = engine.submit(slow(0)).unwrap();
    // Wait until it runs (its first token), so the next one waits in the queue.
    assert!(matches!(running.recv(), Some(Event::Token { .. })));
    let queued = engine.submit(slow(1)).unwrap();
    let err = engine.submit(slow(3)).err().expect("a third request was accepted");
    assert!(matches!(err, Error::Overloaded(_)), "{err:?}");
    running.cancel();
    collect_any(running);
    assert!(matches!(collect_any(queued), Event::Done(_)));

    let opts = EngineOptions { max_active: 1, slots: 1, when_full: WhenFull::Reject, ..Default::default() };
    let engine = Engine::start(model(pool_engine()), opts).unwrap();
    let running = engine.submit(slow(0)).unwrap();
    assert!(matches!(running.recv(), Some(Event::Token { .. })));
    let refused = engine.submit(slow(1)).unwrap();
    assert!(matches!(collect_any(refused), Event::Failed(Error::Overloaded(_))));
}

/// The last event of a handle (acking tokens along the way).
fn collect_any(handle: Handle) -> Event {
    loop {
        match handle.recv().unwrap() {
            Event::Token { .. } => handle.ack(),
            other => return other,
        }
    }
}

#[test]
fn the_kv_budget_bounds_what_runs_at_once() {
    let m = model(pool_engine());
    let dims = &m.manifest().model;
    let per_position = (2 * dims.num_layers * dims.num_kv_heads * dims.head_dim * 4) as u64;
    // Room for about 1.5 requests of at most 200 positions: they must take turns.
    let budget = 300 * per_position;
    let engine = Engine::start(m, EngineOptions { kv_budget_bytes: Some(budget), ..Default::default() }).unwrap();
    let handles: Vec<Handle> = (0..6).map(|i| engine.submit(request(i, Pace::Free)).unwrap()).collect();
    for h in handles {
        collect(h);
    }
    let stats = engine.stats();
    assert!(stats.kv_bytes_peak <= budget, "held {} bytes of KV over a budget of {budget}", stats.kv_bytes_peak);
    assert!(stats.kv_bytes_peak > 0);
    // A request that could never fit the budget is refused before any work.
    let huge = Request { options: greedy(400), ..request(0, Pace::Free) };
    let err = engine.submit(huge).err().expect("a request larger than the budget was accepted");
    assert!(matches!(err, Error::ContextOverflow { limit: 300, .. }), "{err:?}");
}

#[test]
fn max_new_tokens_beyond_the_context_is_refused_before_any_work() {
    let engine = Engine::start(model(pool_engine()), EngineOptions::default()).unwrap();
    let missing = Media::VideoFile("/nonexistent/clip.mp4".into());
    let err = engine.submit(Request { media: missing, options: greedy(600), ..request(0, Pace::Free) }).err().unwrap();
    assert!(matches!(err, Error::ContextOverflow { max_new: 600, limit: 512, .. }), "{err:?}");
}

#[test]
fn dropping_a_handle_frees_its_slot() {
    let opts = EngineOptions { max_active: 1, slots: 1, ..Default::default() };
    let engine = Engine::start(model(pool_engine()), opts).unwrap();
    let first = engine.submit(Request { options: greedy(200), ..request(0, Pace::Lockstep) }).unwrap();
    assert!(matches!(first.recv(), Some(Event::Token { .. })));
    drop(first);
    // The only slot comes free: the next request runs to its end.
    let out = collect(engine.submit(request(1, Pace::Free)).unwrap());
    assert_eq!(out.done.answer.finish, FinishReason::MaxTokens);
}
