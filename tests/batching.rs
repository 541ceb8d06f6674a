//! "Batching must not change answers": the schedules that drive a serving engine and compare
//! every sequence with the same request run alone, shared by tests/engine.rs (random-weight
//! fixtures) and tests/real_weights.rs (a trained LLM).

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use vl_runtime::engine::{Done, Engine, Event, FollowUp, Handle, Pace, Request};
use vl_runtime::{FinishReason, GenerateOptions};

use crate::max_abs_diff;

/// Largest difference allowed between a batched sequence's logits and the same request's alone.
pub const TOLERANCE: f32 = 1e-4;

/// The `i`-th request of a test, at a pace.
pub type Requests<'a> = &'a dyn Fn(usize, Pace) -> Request;

/// Greedy decoding of exactly `max_new_tokens` tokens (EOS does not stop it).
pub fn greedy(max_new_tokens: usize) -> GenerateOptions {
    GenerateOptions { max_new_tokens, ignore_eos: true, ..GenerateOptions::default() }
}

/// What one request produced.
#[derive(Debug)]
pub struct Outcome {
    /// Generated ids.
    pub tokens: Vec<u32>,
    /// The logits each id was chosen from.
    pub logits: Vec<Vec<f32>>,
    /// The request's end.
    pub done: Done,
}

/// Reads a handle to its end (acking every token of a lockstep request).
pub fn collect(handle: Handle) -> Outcome {
    let (mut tokens, mut logits) = (Vec::new(), Vec::new());
    loop {
        match handle.recv().expect("the channel closed before Done") {
            Event::Token { id: Some(id), logits: l, .. } => {
                tokens.push(id);
                logits.push(l.expect("logits were asked for"));
                handle.ack();
            }
            Event::Token { id: None, .. } => {}
            Event::Done(done) => return Outcome { tokens, logits, done },
            Event::Failed(e) => panic!("request failed: {e}"),
        }
    }
}

/// `request` run to its end with nothing else submitted meanwhile.
pub fn alone(engine: &Engine, request: Request) -> Outcome {
    collect(engine.submit(request).unwrap())
}

/// Same tokens, and logits within [`TOLERANCE`] at every step.
pub fn assert_same(label: &str, got: &Outcome, want: &Outcome) {
    assert_eq!(got.tokens, want.tokens, "{label}: tokens differ from the request run alone");
    for (step, (g, w)) in got.logits.iter().zip(&want.logits).enumerate() {
        let d = max_abs_diff(g, w);
        assert!(d <= TOLERANCE, "{label}: step {step} logits differ by {d} from the request run alone");
    }
}

/// Requests `0..n` submitted at once equal each run alone; when the engine batches, some decode
/// call carried more than one sequence.
pub fn batched_equals_alone(engine: &Engine, requests: Requests, n: usize) {
    let reference: Vec<Outcome> = (0..n).map(|i| alone(engine, requests(i, Pace::Free))).collect();
    let handles: Vec<Handle> = (0..n).map(|i| engine.submit(requests(i, Pace::Free)).unwrap()).collect();
    for (i, h) in handles.into_iter().enumerate() {
        assert_same(&format!("request {i}"), &collect(h), &reference[i]);
    }
    let stats = engine.stats();
    if stats.batched {
        assert!(stats.decode_rows > stats.decode_calls, "no decode call carried more than one sequence: {stats:?}");
    }
}

/// The next generated id of `h` into `out`; false at its end.
fn next_token(h: &Handle, out: &mut Vec<u32>) -> bool {
    loop {
        match h.recv().unwrap() {
            Event::Token { id: Some(id), .. } => {
                out.push(id);
                return true;
            }
            Event::Token { .. } => {}
            Event::Done(_) => return false,
            Event::Failed(e) => panic!("{e}"),
        }
    }
}

/// Joins and leaves mid-stream, a cancel, and follow-ups, on a fixed schedule over requests 0, 1
/// and 2 (A, B, C): the driver acks lockstep requests one token at a time, so the batch changes
/// at known points. A decodes 3 tokens alone, then B joins, then C joins and is cancelled after 2
/// tokens; then the follow-ups of A and B run batched together. C needs at least 3 tokens.
pub fn joins_leaves_cancels_and_follow_ups(engine: &Engine, requests: Requests) {
    let keep = |i| Request { keep: true, ..requests(i, Pace::Lockstep) };
    let reference: Vec<Outcome> = (0..3).map(|i| alone(engine, keep(i))).collect();
    let a = engine.submit(keep(0)).unwrap();
    let mut a_tokens = Vec::new();
    for _ in 0..3 {
        assert!(next_token(&a, &mut a_tokens));
        a.ack();
    }
    let b = engine.submit(keep(1)).unwrap();
    let c = engine.submit(requests(2, Pace::Lockstep)).unwrap();
    let mut c_tokens = Vec::new();
    for _ in 0..2 {
        assert!(next_token(&c, &mut c_tokens));
        c.ack();
    }
    c.cancel();
    let a_rest = collect(a);
    let b_out = collect(b);
    a_tokens.extend(a_rest.tokens);
    assert_eq!(a_tokens, reference[0].tokens, "A, joined by B and C, differs from A alone");
    assert_same("B", &b_out, &reference[1]);
    assert_eq!(c_tokens, reference[2].tokens[..2], "C before its cancel differs from C alone");
    // Follow-ups of A and B, batched together, equal the same follow-ups of the runs alone.
    let follow = |h: &Done| FollowUp {
        conversation: h.conversation.unwrap(),
        question: "And then?".into(),
        options: greedy(7),
        pace: Pace::Free,
        logits: true,
    };
    let a2_ref = collect(engine.follow_up(follow(&reference[0].done)).unwrap());
    let b2_ref = collect(engine.follow_up(follow(&reference[1].done)).unwrap());
    let a2 = engine.follow_up(follow(&a_rest.done)).unwrap();
    let b2 = engine.follow_up(follow(&b_out.done)).unwrap();
    assert_same("A's follow-up", &collect(a2), &a2_ref);
    assert_same("B's follow-up", &collect(b2), &b2_ref);
}

/// Requests `0..n` arrive, advance and cancel in an order drawn from `seed`; every one gives the
/// tokens it gives alone (a cancelled one, a prefix of them). Returns how many were cancelled.
pub fn randomized_schedule(engine: &Engine, requests: Requests, n: usize, seed: u64) -> usize {
    let reference: Vec<Outcome> = (0..n).map(|i| alone(engine, requests(i, Pace::Free))).collect();
    let mut rng = StdRng::seed_from_u64(seed);
    let mut pending: Vec<usize> = (0..n).collect();
    let mut live: Vec<(usize, Handle, Vec<u32>, bool)> = Vec::new();
    let mut cancelled = 0;
    while !pending.is_empty() || !live.is_empty() {
        if !pending.is_empty() && (live.is_empty() || rng.random_bool(0.3)) {
            let i = pending.remove(0);
            live.push((i, engine.submit(requests(i, Pace::Lockstep)).unwrap(), Vec::new(), false));
            continue;
        }
        let k = rng.random_range(0..live.len());
        let (i, h, tokens, asked_cancel) = &mut live[k];
        if !*asked_cancel && rng.random_bool(0.05) {
            h.cancel();
            *asked_cancel = true;
            cancelled += 1;
        }
        // Never block on one request: it may wait for room that only the others' acks free.
        let Some(event) = h.try_recv() else {
            std::thread::sleep(std::time::Duration::from_micros(200));
            continue;
        };
        match event {
            Event::Token { id: Some(id), .. } => {
                tokens.push(id);
                h.ack();
            }
            Event::Token { .. } => {}
            Event::Done(done) => {
                let want = &reference[*i].tokens;
                if done.answer.finish == FinishReason::Cancelled {
                    assert_eq!(tokens[..], want[..tokens.len()], "request {i} (cancelled) diverged from alone");
                } else {
                    assert_eq!(tokens, want, "request {i} differs from alone");
                }
                live.remove(k);
            }
            Event::Failed(e) => panic!("request {i}: {e}"),
        }
    }
    cancelled
}

/// Greedy requests that ask for no logits take the decoder's own `ArgMax` (`next_token`), one
/// id per row instead of the vocabulary's logits: requests `0..n` submitted at once that way
/// get the tokens they get with their logits, and the engine counts the rows it took so.
pub fn argmax_rows_match_the_logits(engine: &Engine, requests: Requests, n: usize) {
    let submit = |logits: bool| -> Vec<Handle> {
        (0..n).map(|i| engine.submit(Request { logits, ..requests(i, Pace::Free) }).unwrap()).collect()
    };
    let before = crate::settled(engine).argmax_rows;
    let with_logits: Vec<Outcome> = submit(true).into_iter().map(collect).collect();
    assert_eq!(crate::settled(engine).argmax_rows, before, "rows that ask for logits are given logits");
    for (i, h) in submit(false).into_iter().enumerate() {
        let mut tokens = Vec::new();
        while next_token(&h, &mut tokens) {}
        assert_eq!(tokens, with_logits[i].tokens, "request {i}: the decoder's argmax chose other tokens");
    }
    let stats = crate::settled(engine);
    assert!(stats.argmax_rows > before, "no decode row took the decoder's argmax: {stats:?}");
}
