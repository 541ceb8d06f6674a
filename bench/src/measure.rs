//! Measures one engine through the public runtime API, the way a user's request runs: a
//! conversation about the pixel values asks the question and streams a fixed number of tokens.
use std::hint::black_box;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use ndarray::{Array5, Axis, s};

use crate::Result;
use crate::schema::{Point, Samples, Scaling, SystemRun};
use vl_runtime::generate::ms;
use vl_runtime::kv_cache::KvCache;
use vl_runtime::manifest::DType;
use vl_runtime::memory::peak_rss_mb;
use vl_runtime::preprocess::{load_pixel_values_npy, preprocess_video};
use vl_runtime::prompt::{PromptBuilder, VisualSlot};
use vl_runtime::video::{FrameSampling, load_video};
use vl_runtime::{Answer, Flow, GenerateOptions, Media, Pipeline, PipelineOptions, SessionOptions, Verify};

/// Which scaling curves to measure, and where.
#[derive(Debug, Clone)]
pub struct ScalingPlan {
    /// Frame counts for vision time against frames.
    pub frames: Vec<usize>,
    /// Text-only prompt lengths for prefill time against prompt length (fresh cache each).
    pub prefill_lengths: Vec<usize>,
    /// Context lengths at which decode is timed (a prefill of that length, or the previous
    /// cache extended in chunks).
    pub decode_contexts: Vec<usize>,
    /// Decode steps per context point (the median is kept).
    pub decode_steps: usize,
}

impl ScalingPlan {
    /// Prompt tokens the plan prefills in all (fresh prefills plus the chunks that extend the
    /// cache to the longer decode contexts): what the curves cost.
    pub fn prefill_tokens(&self) -> usize {
        let longest_fresh = self.prefill_lengths.iter().copied().max().unwrap_or(0);
        let longest = self.decode_contexts.iter().copied().max().unwrap_or(0);
        self.prefill_lengths.iter().sum::<usize>() + longest.saturating_sub(longest_fresh)
    }
}

/// How to measure one engine.
#[derive(Debug, Clone)]
pub struct EnginePlan {
    /// Engine directory.
    pub engine: PathBuf,
    /// Pixel values `.npy` shared with the baseline.
    pub pixels: PathBuf,
    /// The clip, for the decode + preprocessing stage.
    pub video: PathBuf,
    /// The question.
    pub question: String,
    /// Intra-op threads.
    pub threads: usize,
    /// Warm-up answers (not measured).
    pub warmup: usize,
    /// Tokens per warm-up answer.
    pub warmup_tokens: usize,
    /// Measured answers wanted.
    pub reps: usize,
    /// Time for the measured answers and the curves together; repetitions are cut to fit (one
    /// at least), and the cut is written into the notes.
    pub budget: Option<Duration>,
    /// Measured decode + preprocessing runs.
    pub preprocess_reps: usize,
    /// Tokens per measured answer.
    pub new_tokens: usize,
    /// Curves, if wanted.
    pub scaling: Option<ScalingPlan>,
}

/// Text-only prompt ids for the curves: BOS then a fixed pattern of ordinary tokens below half
/// the vocabulary (the same formula as `tools/bench_torch.py`, so both systems see the same ids).
pub fn filler_ids(n: usize, bos: u32, vocab: usize) -> Vec<u32> {
    let span = (vocab / 2).clamp(1, 997);
    std::iter::once(bos).chain((1..n).map(|i| 3 + ((i * 7919) % span) as u32)).take(n).collect()
}

fn dtype_bytes(d: DType) -> u64 {
    match d {
        DType::F16 => 2,
        DType::F32 => 4,
        DType::I64 => 8,
    }
}

/// One answer and when its tokens reached the caller.
struct Asked {
    answer: Answer,
    /// The whole `ask`, conversation creation included.
    wall_ms: f64,
    /// When each token reached the streaming callback, from the start of the request.
    arrivals_ms: Vec<f64>,
}

impl Asked {
    /// Time to first token and mean time between tokens, as the caller sees them (the same
    /// definitions as the baseline's, which timestamps `generate()`'s streamer).
    fn token_times(&self) -> (f64, f64) {
        match self.arrivals_ms.as_slice() {
            [] => (f64::NAN, f64::NAN),
            [first] => (*first, f64::NAN),
            [first, .., last] => (*first, (last - first) / (self.arrivals_ms.len() - 1) as f64),
        }
    }
}

/// The first `frames` frames of `pixels` (frame 0 repeated when more are asked than exist).
fn first_frames(pixels: &Array5<f32>, frames: usize) -> Array5<f32> {
    let have = pixels.shape()[1];
    if frames <= have {
        return pixels.slice(s![.., ..frames, .., .., ..]).to_owned();
    }
    let first = pixels.slice(s![.., ..1, .., .., ..]);
    let views: Vec<_> = (0..frames).map(|_| first.view()).collect();
    ndarray::concatenate(Axis(1), &views).unwrap_or_else(|_| pixels.clone())
}

/// The first turn's ids for a video of `frames` frames: what `Conversation::ask` feeds, and
/// what the baseline is given.
pub fn prompt_ids(pipeline: &Pipeline, frames: usize, question: &str) -> Result<Vec<u32>> {
    let m = pipeline.manifest();
    let builder = PromptBuilder::new(pipeline.tokenizer(), &m.chat_template, &m.tokens);
    Ok(builder.first_turn(VisualSlot::Video { tokens: frames * m.model.tokens_per_frame }, question)?)
}

/// Runs the plan on one engine. `log` receives one line per step of progress.
pub fn measure_engine(plan: &EnginePlan, log: &dyn Fn(&str)) -> Result<SystemRun> {
    let started = Instant::now();
    let options = PipelineOptions {
        session: SessionOptions { threads: Some(plan.threads), ..SessionOptions::default() },
        verify: Verify::Cached,
        // Every answer must run the vision graph: no reuse of features across repetitions.
        feature_cache_entries: 0,
        ..PipelineOptions::default()
    };
    let t0 = Instant::now();
    let pipeline = Pipeline::load(&plan.engine, options)?;
    let load_ms = ms(t0.elapsed());
    let manifest = pipeline.manifest().clone();
    let precision = manifest.precision.to_string();
    let label = format!("vl {precision}");
    log(&format!("[{label}] loaded {} in {:.1} s", plan.engine.display(), load_ms / 1000.0));
    let pixels = Arc::new(load_pixel_values_npy(&plan.pixels)?);
    let frames = pixels.shape()[1];
    let mut notes = Vec::new();
    let mut samples = Samples::default();

    for i in 0..plan.warmup.min(1) + plan.preprocess_reps {
        let t = Instant::now();
        let video = load_video(&plan.video, FrameSampling::Uniform, frames)?;
        black_box(preprocess_video(&video.frames, &manifest.preprocess.image)?);
        if i >= plan.warmup.min(1) {
            samples.preprocess_ms.push(ms(t.elapsed()));
        }
    }

    let ask = |tokens: usize| -> Result<Asked> {
        let opts = GenerateOptions { max_new_tokens: tokens, ignore_eos: true, ..GenerateOptions::default() };
        let t = Instant::now();
        let mut arrivals = Vec::with_capacity(tokens);
        let mut chat = pipeline.conversation(Media::VideoPixels(pixels.clone()))?;
        let answer = chat.ask(&plan.question, &opts, &mut |event| {
            if event.id.is_some() {
                arrivals.push(ms(t.elapsed()));
            }
            Flow::Continue
        })?;
        Ok(Asked { answer, wall_ms: ms(t.elapsed()), arrivals_ms: arrivals })
    };
    let mut estimate = None;
    for i in 0..plan.warmup {
        let asked = ask(plan.warmup_tokens)?;
        let (a, wall) = (&asked.answer, asked.wall_ms);
        let t = &a.timings;
        log(&format!(
            "[{label}] warm-up {}/{}: vision {:.0} ms, prefill {:.0} ms, {:.1} ms/token, {:.1} s",
            i + 1,
            plan.warmup,
            t.vision_ms,
            t.prefill_ms,
            t.ms_per_token(),
            wall / 1000.0
        ));
        estimate = Some(a.timings.clone());
    }
    let prompt_tokens = prompt_ids(&pipeline, frames, &plan.question)?.len();

    let mut reps = plan.reps;
    if let (Some(budget), Some(t)) = (plan.budget, &estimate) {
        let per_rep = t.vision_ms + t.prefill_ms + (plan.new_tokens.saturating_sub(1)) as f64 * t.ms_per_token();
        let curves = plan.scaling.as_ref().map_or(0.0, |sp| {
            let prefill = sp.prefill_tokens() as f64 / prompt_tokens.max(1) as f64 * t.prefill_ms * 1.3;
            let decode = (sp.decode_contexts.len() * sp.decode_steps) as f64 * t.ms_per_token() * 1.5;
            let vision = sp.frames.iter().sum::<usize>() as f64 / frames.max(1) as f64 * t.vision_ms;
            prefill + decode + vision
        });
        let left = budget.as_secs_f64() * 1000.0 - ms(started.elapsed()) - curves;
        let fit = (left / per_rep.max(1.0)).floor().max(0.0) as usize;
        if fit < reps {
            reps = fit.max(1);
            notes.push(format!(
                "{reps} measured answers instead of {} to fit the time budget ({:.0} s for this engine, \
                 {:.0} s an answer)",
                plan.reps,
                budget.as_secs_f64(),
                per_rep / 1000.0
            ));
        }
    }

    let mut tokens = Vec::new();
    for i in 0..reps {
        let asked = ask(plan.new_tokens)?;
        let t = &asked.answer.timings;
        let (ttft, per_token) = asked.token_times();
        samples.vision_ms.push(t.vision_ms);
        samples.prefill_ms.push(t.prefill_ms);
        samples.ttft_ms.push(ttft);
        samples.decode_ms_per_token.push(per_token);
        samples.answer_ms.push(asked.wall_ms);
        log(&format!(
            "[{label}] rep {}/{reps}: vision {:.0} ms, prefill {:.0} ms, {per_token:.1} ms/token, answer {:.1} s",
            i + 1,
            t.vision_ms,
            t.prefill_ms,
            asked.wall_ms / 1000.0
        ));
        tokens = asked.answer.token_ids;
    }
    let peak = peak_rss_mb().unwrap_or(f64::NAN);

    let scaling = match &plan.scaling {
        Some(sp) => Some(measure_scaling(&pipeline, &pixels, sp, &label, log)?),
        None => None,
    };

    let decoder = &manifest.graphs.decoder;
    let m = &manifest.model;
    Ok(SystemRun {
        system: "vl".into(),
        label,
        precision,
        engine: Some(plan.engine.display().to_string()),
        threads: plan.threads,
        versions: [
            ("vl-runtime".to_string(), env!("CARGO_PKG_VERSION").to_string()),
            (
                "onnxruntime".to_string(),
                vl_runtime::ort_env::find_library().map(|p| p.display().to_string()).unwrap_or_default(),
            ),
        ]
        .into(),
        load_ms,
        warmup: plan.warmup,
        reps,
        prompt_tokens,
        new_tokens: plan.new_tokens,
        frames,
        samples,
        peak_rss_mb: peak,
        decode_weight_bytes: decoder.bytes + decoder.data.as_ref().map_or(0, |d| d.bytes),
        kv_bytes_per_position: 2 * (m.num_layers * m.num_kv_heads * m.head_dim) as u64 * dtype_bytes(m.kv_dtype),
        tokens,
        scaling,
        notes,
    })
}

/// Vision time against frames, prefill time against prompt length, decode against context.
fn measure_scaling(
    pipeline: &Pipeline,
    pixels: &Array5<f32>,
    plan: &ScalingPlan,
    label: &str,
    log: &dyn Fn(&str),
) -> Result<Scaling> {
    let mut out = Scaling::default();
    for &f in &plan.frames {
        let media = Media::VideoPixels(Arc::new(first_frames(pixels, f)));
        let visual = pipeline.visual(&media)?;
        out.vision_vs_frames.push(Point { x: f, ms: visual.map_or(f64::NAN, |v| v.vision_ms) });
    }
    log(&format!(
        "[{label}] scaling: vision {:?}",
        out.vision_vs_frames.iter().map(|p| p.ms.round()).collect::<Vec<_>>()
    ));

    let lm = pipeline.language_model();
    let dims = &pipeline.manifest().model;
    let bos = pipeline.manifest().tokens.bos;
    let vocab = dims.vocab_size;
    let decode_point = |kv: &mut KvCache, x: usize| -> Result<Point> {
        let mut times = Vec::with_capacity(plan.decode_steps);
        for _ in 0..plan.decode_steps {
            let t = Instant::now();
            black_box(lm.forward(kv, &[42], None)?);
            times.push(ms(t.elapsed()));
        }
        let median = crate::stats::Summary::of(&times).map_or(f64::NAN, |s| s.median);
        Ok(Point { x, ms: median })
    };

    let mut fresh = plan.prefill_lengths.clone();
    fresh.sort_unstable();
    fresh.dedup();
    let mut contexts = plan.decode_contexts.clone();
    contexts.sort_unstable();
    let mut kv = KvCache::new(dims)?;
    for &n in &fresh {
        kv = KvCache::new(dims)?;
        let t = Instant::now();
        black_box(lm.forward_logits(&mut kv, &filler_ids(n, bos, vocab), None, 1)?);
        out.prefill_vs_prompt.push(Point { x: n, ms: ms(t.elapsed()) });
        log(&format!("[{label}] scaling: prefill {n} tokens {:.0} ms", ms(t.elapsed())));
        if contexts.contains(&n) {
            out.decode_vs_context.push(decode_point(&mut kv, n)?);
        }
    }
    for &c in contexts.iter().filter(|c| !fresh.contains(c)) {
        if c < kv.len() {
            kv = KvCache::new(dims)?;
        }
        if c > kv.len() {
            let chunk: Vec<u32> = filler_ids(c - kv.len() + 1, bos, vocab).into_iter().skip(1).collect();
            black_box(lm.forward_logits(&mut kv, &chunk, None, 1)?);
        }
        let p = decode_point(&mut kv, c)?;
        log(&format!("[{label}] scaling: decode at {c}: {:.1} ms/token", p.ms));
        out.decode_vs_context.push(p);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn filler_ids_start_with_bos_and_avoid_special_ids() {
        let ids = filler_ids(2000, 1, 32064);
        assert_eq!(ids.len(), 2000);
        assert_eq!(ids[0], 1);
        assert!(ids[1..].iter().all(|&i| (3..1000).contains(&i)));
        assert!(filler_ids(300, 1, 608)[1..].iter().all(|&i| (3..307).contains(&i)));
        assert!(filler_ids(0, 1, 608).is_empty());
    }

    #[test]
    fn scaling_cost_counts_the_chunks_to_the_longest_context() {
        let plan = ScalingPlan {
            frames: vec![1, 8],
            prefill_lengths: vec![128, 2048],
            decode_contexts: vec![512, 4088],
            decode_steps: 8,
        };
        assert_eq!(plan.prefill_tokens(), 128 + 2048 + (4088 - 2048));
    }

    #[test]
    fn more_frames_than_held_repeat_the_first() {
        let px = Array5::from_shape_fn((1, 2, 3, 2, 2), |(_, f, _, _, _)| f as f32);
        let four = first_frames(&px, 4);
        assert_eq!(four.shape(), &[1, 4, 3, 2, 2]);
        assert!(four.iter().all(|&v| v == 0.0));
        assert_eq!(first_frames(&px, 1).shape(), &[1, 1, 3, 2, 2]);
    }
}
