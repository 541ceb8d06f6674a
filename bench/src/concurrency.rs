//! Many conversations at once through the serving engine: aggregate decode tokens/s, per-stream
//! ms/token and time to first token at each concurrency, and how much a video prompt arriving
//! mid-stream delays the tokens of those already decoding.
//!
//! Figures come from the clients' side: each stream timestamps its tokens as it receives them.
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::Serialize;
use vl_runtime::engine::{Engine, EngineOptions, Event, Handle, Pace, Request};
use vl_runtime::generate::ms;
use vl_runtime::model::{Media, Model, ModelOptions};
use vl_runtime::{GenerateOptions, SessionOptions};

use crate::Result;

/// What to measure.
#[derive(Debug, Clone)]
pub struct ConcurrencyPlan {
    /// Engine directory.
    pub engine: PathBuf,
    /// Concurrent conversations to try.
    pub streams: Vec<usize>,
    /// Tokens per answer.
    pub new_tokens: usize,
    /// A video file for video prompts (`None`: text prompts); decoded and run through the vision
    /// graph once (the feature cache serves the rest), as a service sees repeated videos.
    pub video: Option<PathBuf>,
    /// Intra-op threads.
    pub threads: usize,
    /// Prompt tokens prefilled per step.
    pub prefill_chunk_tokens: usize,
}

/// One concurrency level.
#[derive(Debug, Clone, Serialize)]
pub struct Level {
    /// Concurrent conversations.
    pub streams: usize,
    /// Decode tokens per second of all streams together, while all of them decode (`None`
    /// when they never decode at the same time: long prompts prefilled one after the other).
    pub aggregate_tokens_per_s: Option<f64>,
    /// Median time between two tokens of one stream.
    pub ms_per_token_p50: f64,
    /// 95th percentile of the same.
    pub ms_per_token_p95: f64,
    /// Time to first token, median over streams.
    pub ttft_ms_p50: f64,
    /// Time to first token, 95th percentile.
    pub ttft_ms_p95: f64,
}

/// A video prompt arriving while others decode.
#[derive(Debug, Clone, Serialize)]
pub struct Arrival {
    /// Streams decoding when it arrives.
    pub decoding: usize,
    /// Their median gap between tokens before it arrived.
    pub gap_before_ms: f64,
    /// The longest gap any of them saw while it was prefilled.
    pub max_gap_during_ms: f64,
    /// Its prompt length.
    pub prompt_tokens: usize,
    /// Prompt tokens per prefill chunk.
    pub chunk_tokens: usize,
    /// Mean time of one of its prefill chunks (the bound on the added delay is one chunk plus
    /// one decode step).
    pub chunk_ms: f64,
}

/// The whole measurement.
#[derive(Debug, Clone, Serialize)]
pub struct ConcurrencyReport {
    /// Engine measured.
    pub engine: String,
    /// Whether decode calls batch sequences (the in-place decoder).
    pub batched: bool,
    /// Video or text prompts.
    pub prompts: &'static str,
    /// Each level.
    pub levels: Vec<Level>,
    /// The arrival test (when video pixels were given).
    pub arrival: Option<Arrival>,
    /// Peak KV bytes held.
    pub kv_bytes_peak: u64,
    /// The KV budget.
    pub kv_budget_bytes: u64,
}

struct Stream {
    submitted: Instant,
    tokens: Vec<Instant>,
    prefill_ms: f64,
}

fn request(media: Media, new_tokens: usize, i: usize) -> Request {
    let questions = ["What is happening in this video?", "Describe the scene.", "What do you see?", "Who is there?"];
    let options = GenerateOptions { max_new_tokens: new_tokens, ignore_eos: true, ..GenerateOptions::default() };
    Request { options, pace: Pace::Free, ..Request::new(media, questions[i % questions.len()]) }
}

fn drain(handles: Vec<(Instant, Handle)>) -> Result<Vec<Stream>> {
    // Receivers run on their own threads so every timestamp is taken when the token arrives.
    let threads: Vec<_> = handles
        .into_iter()
        .map(|(submitted, h)| {
            std::thread::spawn(move || {
                let mut s = Stream { submitted, tokens: Vec::new(), prefill_ms: 0.0 };
                while let Some(e) = h.recv() {
                    match e {
                        Event::Token { id: Some(_), .. } => s.tokens.push(Instant::now()),
                        Event::Token { .. } => {}
                        Event::Done(done) => {
                            s.prefill_ms = done.answer.timings.prefill_ms;
                            return Ok(s);
                        }
                        Event::Failed(e) => return Err(e),
                    }
                }
                Err(vl_runtime::Error::EngineStopped)
            })
        })
        .collect();
    threads.into_iter().map(|t| t.join().map_err(|_| vl_runtime::Error::EngineStopped)?.map_err(Into::into)).collect()
}

fn percentile(values: &mut [f64], p: f64) -> f64 {
    if values.is_empty() {
        return 0.0;
    }
    values.sort_by(f64::total_cmp);
    let rank = ((values.len() - 1) as f64 * p).round() as usize;
    values[rank]
}

fn level(streams: &[Stream]) -> Level {
    let start = streams.iter().filter_map(|s| s.tokens.first()).max().copied();
    let end = streams.iter().filter_map(|s| s.tokens.last()).min().copied();
    let aggregate = match (start, end) {
        (Some(a), Some(b)) if b > a => {
            let n = streams.iter().flat_map(|s| &s.tokens).filter(|t| **t > a && **t <= b).count();
            Some(n as f64 / (b - a).as_secs_f64())
        }
        _ => None,
    };
    let mut gaps: Vec<f64> =
        streams.iter().flat_map(|s| s.tokens.windows(2).map(|w| ms(w[1] - w[0])).collect::<Vec<_>>()).collect();
    let mut ttft: Vec<f64> = streams.iter().filter_map(|s| s.tokens.first().map(|t| ms(*t - s.submitted))).collect();
    Level {
        streams: streams.len(),
        aggregate_tokens_per_s: aggregate,
        ms_per_token_p50: percentile(&mut gaps, 0.5),
        ms_per_token_p95: percentile(&mut gaps, 0.95),
        ttft_ms_p50: percentile(&mut ttft, 0.5),
        ttft_ms_p95: percentile(&mut ttft, 0.95),
    }
}

/// Runs the plan; `log` gets one line per level.
pub fn measure_concurrency(plan: &ConcurrencyPlan, log: &dyn Fn(&str)) -> Result<ConcurrencyReport> {
    let options = ModelOptions {
        session: SessionOptions { threads: Some(plan.threads), ..SessionOptions::default() },
        ..ModelOptions::default()
    };
    let model = Arc::new(Model::load(&plan.engine, options)?);
    let most = plan.streams.iter().copied().max().unwrap_or(1).max(8);
    let engine_options = EngineOptions {
        max_active: most,
        slots: most + 1,
        prefill_chunk_tokens: plan.prefill_chunk_tokens,
        ..EngineOptions::default()
    };
    let engine = Engine::start(model, engine_options)?;
    let media = || plan.video.as_ref().map_or(Media::Text, |v| Media::VideoFile(v.clone()));
    // Warm-up: one answer (sessions, arena, the feature cache for the video).
    drain(vec![(Instant::now(), engine.submit(request(media(), 4, 0))?)])?;
    let mut levels = Vec::new();
    for &n in &plan.streams {
        let handles = (0..n)
            .map(|i| Ok((Instant::now(), engine.submit(request(media(), plan.new_tokens, i))?)))
            .collect::<Result<Vec<_>>>()?;
        let l = level(&drain(handles)?);
        let together =
            l.aggregate_tokens_per_s.map_or("never all decoding".to_string(), |t| format!("{t:7.1} tokens/s"));
        log(&format!(
            "{n:>2} streams: {together} together, {:6.1} ms/token per stream (p95 {:.1}), first token p50 {:.0} ms",
            l.ms_per_token_p50, l.ms_per_token_p95, l.ttft_ms_p50
        ));
        levels.push(l);
    }
    let arrival = match &plan.video {
        Some(video) => Some(arrival(&engine, video.clone(), plan)?),
        None => None,
    };
    if let Some(a) = &arrival {
        log(&format!(
            "video prompt ({} tokens, chunks of {} taking {:.0} ms each) arriving while {} decode: their gap {:.1} ms before, at most {:.1} ms during",
            a.prompt_tokens, a.chunk_tokens, a.chunk_ms, a.decoding, a.gap_before_ms, a.max_gap_during_ms
        ));
    }
    let stats = engine.stats();
    Ok(ConcurrencyReport {
        engine: plan.engine.display().to_string(),
        batched: stats.batched,
        prompts: if plan.video.is_some() { "video" } else { "text" },
        levels,
        arrival,
        kv_bytes_peak: stats.kv_bytes_peak,
        kv_budget_bytes: stats.kv_budget_bytes,
    })
}

/// Seven text streams decode; a video prompt arrives once they are under way.
fn arrival(engine: &Engine, video: PathBuf, plan: &ConcurrencyPlan) -> Result<Arrival> {
    let decoding = 7;
    let long = plan.new_tokens.max(48);
    let handles = (0..decoding)
        .map(|i| Ok((Instant::now(), engine.submit(request(Media::Text, long, i))?)))
        .collect::<Result<Vec<_>>>()?;
    let rows_before = engine.stats().decode_rows;
    let receivers = std::thread::spawn(move || drain(handles));
    // Wait until every one of them has decoded a few tokens.
    let t_wait = Instant::now();
    while engine.stats().decode_rows < rows_before + 4 * decoding as u64 && t_wait.elapsed() < Duration::from_secs(120)
    {
        std::thread::sleep(Duration::from_millis(5));
    }
    let before = engine.stats().prefill_tokens;
    let arrived = Instant::now();
    let video_stream = drain(vec![(arrived, engine.submit(request(Media::VideoFile(video), 2, 0))?)])?;
    let prefilled = Instant::now();
    let prompt_tokens = (engine.stats().prefill_tokens - before) as usize;
    let streams = receivers.join().map_err(|_| vl_runtime::Error::EngineStopped)??;
    let first_video_token = video_stream.first().and_then(|s| s.tokens.first()).copied().unwrap_or(prefilled);
    let video_prefill_ms = video_stream.first().map_or(0.0, |s| s.prefill_ms);
    let mut before_gaps = Vec::new();
    let mut during = 0.0f64;
    for s in &streams {
        for w in s.tokens.windows(2) {
            let gap = ms(w[1] - w[0]);
            if w[1] <= arrived {
                before_gaps.push(gap);
            } else if w[0] < first_video_token {
                during = during.max(gap);
            }
        }
    }
    Ok(Arrival {
        decoding,
        gap_before_ms: percentile(&mut before_gaps, 0.5),
        max_gap_during_ms: during,
        prompt_tokens,
        chunk_tokens: plan.prefill_chunk_tokens,
        chunk_ms: video_prefill_ms / prompt_tokens.div_ceil(plan.prefill_chunk_tokens.max(1)).max(1) as f64,
    })
}
