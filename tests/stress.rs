//! Many threads, many requests, one engine (the tiny fixture, in-place decoder, batched):
//! mixed videos and text, some cancelled after their first token. Every finished answer equals
//! the same request run alone, the engine ends idle (no active sequence, no KV in use), nothing
//! deadlocks (every wait is bounded), and anonymous memory comes back near its level after a
//! warm-up round (printed; bounded loosely, since the allocator keeps some).
//!
//! CI runs `VL_STRESS_REQUESTS` (default 200) requests over 16 threads; `make stress` runs 5,000.
#![allow(clippy::unwrap_used)]

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use ndarray::Array5;
use ndarray_npy::read_npy;
use vl_e2e::{built_for, fixture_dir, settled};
use vl_runtime::GenerateOptions;
use vl_runtime::engine::{Engine, EngineOptions, Event, Request};
use vl_runtime::manifest::Target;
use vl_runtime::memory::rss_anon_mb;
use vl_runtime::model::{Media, Model, ModelOptions};

const THREADS: usize = 16;
/// The distinct requests the load is made of.
const KINDS: usize = 6;
/// No single answer may take longer than this (a deadlock fails the test instead of hanging).
const ANSWER_DEADLINE: Duration = Duration::from_secs(120);

fn video() -> Media {
    static PIXELS: OnceLock<Arc<Array5<f32>>> = OnceLock::new();
    let px = PIXELS.get_or_init(|| Arc::new(read_npy(fixture_dir("tiny").join("pixel_values_videos.npy")).unwrap()));
    Media::VideoPixels(px.clone())
}

fn request(kind: usize) -> Request {
    let questions = ["What happens?", "Describe every frame of it, in order.", "Why?"];
    let media = if kind.is_multiple_of(2) { video() } else { Media::Text };
    let options = GenerateOptions { max_new_tokens: 4 + 3 * kind, ignore_eos: true, ..GenerateOptions::default() };
    Request { options, ..Request::new(media, questions[kind % questions.len()]) }
}

/// The answer's token ids, or `None` when it was cancelled; `cancel` cancels after the first
/// token.
fn run(engine: &Engine, kind: usize, cancel: bool) -> Option<Vec<u32>> {
    let handle = engine.submit(request(kind)).unwrap();
    let started = Instant::now();
    let mut ids = Vec::new();
    loop {
        assert!(started.elapsed() < ANSWER_DEADLINE, "an answer took over {ANSWER_DEADLINE:?}: deadlock?");
        let Some(event) = handle.try_recv() else {
            std::thread::sleep(Duration::from_millis(1));
            continue;
        };
        match event {
            Event::Token { id: Some(id), .. } => {
                ids.push(id);
                if cancel {
                    handle.cancel();
                    return None;
                }
            }
            Event::Token { id: None, .. } => {}
            Event::Done(done) => return Some(done.answer.token_ids),
            Event::Failed(e) => panic!("request of kind {kind} failed: {e}"),
        }
    }
}

fn load(engine: &Arc<Engine>, requests: usize, reference: &Arc<Vec<Vec<u32>>>) -> (usize, usize) {
    let next = Arc::new(AtomicUsize::new(0));
    let threads: Vec<_> = (0..THREADS)
        .map(|_| {
            let (engine, next, reference) = (engine.clone(), next.clone(), reference.clone());
            std::thread::spawn(move || {
                let (mut finished, mut cancelled) = (0, 0);
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    if i >= requests {
                        return (finished, cancelled);
                    }
                    let kind = (i * 7) % KINDS;
                    match run(&engine, kind, i % 5 == 3) {
                        Some(ids) => {
                            assert_eq!(ids, reference[kind], "request {i} (kind {kind}) differs from its answer alone");
                            finished += 1;
                        }
                        None => cancelled += 1,
                    }
                }
            })
        })
        .collect();
    threads.into_iter().map(|t| t.join().unwrap()).fold((0, 0), |a, b| (a.0 + b.0, a.1 + b.1))
}

#[test]
fn sixteen_threads_share_one_engine_and_every_answer_is_its_answer_alone() {
    let requests: usize = std::env::var("VL_STRESS_REQUESTS").ok().and_then(|v| v.parse().ok()).unwrap_or(200);
    let dir = &built_for("tiny", Some(Target::OnnxRuntime)).engine;
    let model = Arc::new(Model::load(dir, ModelOptions::default()).unwrap());
    let engine = Arc::new(Engine::start(model, EngineOptions { max_active: 8, ..EngineOptions::default() }).unwrap());
    let reference: Arc<Vec<Vec<u32>>> = Arc::new((0..KINDS).map(|k| run(&engine, k, false).unwrap()).collect());

    // A warm-up round sets the level memory should come back to.
    load(&engine, THREADS, &reference);
    settled(&engine);
    let baseline = rss_anon_mb();
    let (finished, cancelled) = load(&engine, requests, &reference);
    settled(&engine);
    let after = rss_anon_mb();
    eprintln!("{finished} finished, {cancelled} cancelled; RssAnon {baseline:?} MB after warm-up, {after:?} MB after");
    assert_eq!(finished + cancelled, requests);
    assert!(cancelled > 0 && finished > cancelled);
    let s = engine.stats();
    assert_eq!((s.active, s.waiting, s.kv_bytes_active), (0, 0, 0), "{s:?}");
    if let (Some(b), Some(a)) = (baseline, after) {
        assert!(a < b + 64.0, "anonymous memory grew from {b:.0} to {a:.0} MB over the run");
    }
}
