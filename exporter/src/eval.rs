//! `vl-export eval`: how far an engine's outputs are from a reference engine's on the same
//! inputs, the accuracy side of every precision.
//!
//! Measured, each engine running end to end on its own graphs:
//! - **video features**: per-token cosine similarity (mean and min) on seeded random pixel
//!   values (and optionally real videos);
//! - **next-token distributions**, teacher-forced along the reference's greedy answers to the
//!   eval prompts and along the text set: KL(reference ‖ engine) and top-1 agreement;
//! - **perplexity** of each engine on the text set (chunked to fit the context);
//! - **greedy outputs**: the common prefix of both engines' greedy answers, per prompt.
//!
//! ```no_run
//! use vl_export::eval::{EvalOptions, evaluate};
//! let report = evaluate(&EvalOptions::new("engines/int8".into(), "engines/fp32".into()))?;
//! println!("{report}");
//! # Ok::<(), vl_export::Error>(())
//! ```
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use ndarray::{Array2, Array5};
use rand::{Rng, SeedableRng, rngs::StdRng};
use rand_distr::StandardNormal;
use serde::Serialize;
use sha2::{Digest, Sha256};
use vl_runtime::features::{Features, Splice};
use vl_runtime::kv_cache::KvCache;
use vl_runtime::prompt::{PromptBuilder, VisualSlot};
use vl_runtime::{Media, Pipeline, PipelineOptions, SessionOptions};

use crate::error::{Error, Result};

/// The text set shipped with the toolkit (`calib/eval_text.txt`): plain English prose.
pub const DEFAULT_TEXT: &str = include_str!("../../calib/eval_text.txt");
/// The eval prompts shipped with the toolkit (`calib/eval_prompts.txt`): questions about a video.
pub const DEFAULT_PROMPTS: &str = include_str!("../../calib/eval_prompts.txt");

/// What to compare and on which inputs.
#[derive(Debug, Clone)]
pub struct EvalOptions {
    /// The engine under test (e.g. a quantized one).
    pub engine: PathBuf,
    /// The engine it is measured against (e.g. fp32).
    pub reference: PathBuf,
    /// The text set for perplexity and teacher-forced comparison.
    pub text: String,
    /// Questions asked about the prompt video, one per entry.
    pub prompts: Vec<String>,
    /// Video files whose features are compared. The prompts ask about the first one, or about
    /// the first pixel input when there is none.
    pub videos: Vec<PathBuf>,
    /// Seeded random pixel inputs whose features are compared.
    pub pixel_inputs: usize,
    /// Seed of the random pixel values (input `i` uses `seed + i`).
    pub seed: u64,
    /// Most tokens of each greedy answer.
    pub max_new_tokens: usize,
    /// Tokens per forward pass over the text set (capped by the context length).
    pub chunk_tokens: usize,
    /// Use only the first this many tokens of the text set.
    pub max_text_tokens: Option<usize>,
    /// Sessions of both engines.
    pub session: SessionOptions,
    /// Print what is being measured to stderr.
    pub progress: bool,
}

impl EvalOptions {
    /// Defaults: the shipped text set and prompts, 3 pixel inputs, 32-token answers.
    pub fn new(engine: PathBuf, reference: PathBuf) -> Self {
        Self {
            engine,
            reference,
            text: DEFAULT_TEXT.to_string(),
            prompts: parse_prompts(DEFAULT_PROMPTS),
            videos: Vec::new(),
            pixel_inputs: 3,
            seed: 0,
            max_new_tokens: 32,
            chunk_tokens: 512,
            max_text_tokens: None,
            session: SessionOptions::default(),
            progress: false,
        }
    }
}

/// Prompts from a file's text: one per line; blank lines and `#` comments are skipped.
pub fn parse_prompts(text: &str) -> Vec<String> {
    text.lines().map(str::trim).filter(|l| !l.is_empty() && !l.starts_with('#')).map(String::from).collect()
}

/// Which engine a figure belongs to.
#[derive(Debug, Clone, Serialize)]
pub struct EngineInfo {
    /// Engine directory.
    pub path: String,
    /// Its precision as the manifest states it.
    pub precision: String,
}

/// Video features of one input compared token by token.
#[derive(Debug, Clone, Serialize)]
pub struct FeatureSimilarity {
    /// `random-{seed}` or the video file.
    pub input: String,
    /// Visual tokens compared.
    pub tokens: usize,
    /// Mean over tokens of the cosine similarity.
    pub cosine_mean: f64,
    /// Smallest per-token cosine similarity.
    pub cosine_min: f64,
    /// Largest absolute difference of any element.
    pub max_abs_diff: f64,
    /// `‖engine − reference‖ / ‖reference‖` over all elements.
    pub relative_l2: f64,
}

/// Video features over all inputs.
#[derive(Debug, Clone, Serialize)]
pub struct VisionReport {
    /// Per input.
    pub inputs: Vec<FeatureSimilarity>,
    /// Mean of the inputs' mean cosines.
    pub cosine_mean: f64,
    /// Smallest cosine over all inputs and tokens.
    pub cosine_min: f64,
}

/// Next-token distributions compared along a fixed (teacher-forced) sequence.
#[derive(Debug, Clone, Serialize)]
pub struct DistributionReport {
    /// Positions compared.
    pub positions: usize,
    /// Mean KL(reference ‖ engine), in nats.
    pub kl_mean: f64,
    /// Largest KL at one position.
    pub kl_max: f64,
    /// Fraction of positions where both engines' most likely token is the same.
    pub top1_agreement: f64,
}

/// Perplexity of both engines on the text set.
#[derive(Debug, Clone, Serialize)]
pub struct PerplexityReport {
    /// Tokens of the text set that were scored.
    pub tokens: usize,
    /// Forward passes (chunks) it took.
    pub chunks: usize,
    /// Tokens per chunk at most.
    pub chunk_tokens: usize,
    /// The engine's perplexity.
    pub engine: f64,
    /// The reference's perplexity.
    pub reference: f64,
    /// `engine / reference − 1`.
    pub relative_change: f64,
}

/// One prompt's greedy answers.
#[derive(Debug, Clone, Serialize)]
pub struct GreedyCase {
    /// The question.
    pub prompt: String,
    /// Tokens the reference generated (EOS included if it came).
    pub reference_tokens: usize,
    /// Tokens the engine generated.
    pub engine_tokens: usize,
    /// Leading tokens both answers share.
    pub common_prefix: usize,
    /// The reference's answer.
    pub reference_text: String,
    /// The engine's answer.
    pub engine_text: String,
}

/// Greedy answers over all prompts.
#[derive(Debug, Clone, Serialize)]
pub struct GreedyReport {
    /// Per prompt.
    pub cases: Vec<GreedyCase>,
    /// Mean common prefix, in tokens.
    pub common_prefix_mean: f64,
    /// Mean length of the reference's answers, in tokens.
    pub reference_tokens_mean: f64,
    /// Prompts whose answers are identical.
    pub identical: usize,
}

/// The inputs the figures were measured on, for reproducing them.
#[derive(Debug, Clone, Serialize)]
pub struct EvalSettings {
    /// Seed of the random pixel inputs.
    pub seed: u64,
    /// Random pixel inputs.
    pub pixel_inputs: usize,
    /// Video files.
    pub videos: Vec<String>,
    /// Eval prompts.
    pub prompts: usize,
    /// Most tokens per greedy answer.
    pub max_new_tokens: usize,
    /// SHA-256 of the text set.
    pub text_sha256: String,
    /// Tokens of the text set before any cap.
    pub text_tokens_total: usize,
}

/// Everything `vl-export eval` measures.
#[derive(Debug, Clone, Serialize)]
pub struct EvalReport {
    /// The engine under test.
    pub engine: EngineInfo,
    /// The engine it was measured against.
    pub reference: EngineInfo,
    /// Video features.
    pub vision: VisionReport,
    /// Next-token distributions along the reference's greedy answers to the prompts.
    pub prompts: DistributionReport,
    /// Next-token distributions along the text set.
    pub text: DistributionReport,
    /// Perplexity on the text set.
    pub perplexity: PerplexityReport,
    /// Greedy answers.
    pub greedy: GreedyReport,
    /// The inputs.
    pub settings: EvalSettings,
    /// Wall time of the whole evaluation.
    pub elapsed_s: f64,
}

/// A loaded engine with what the comparison reads from its manifest.
struct Side {
    pipeline: Pipeline,
    info: EngineInfo,
}

impl Side {
    fn load(dir: &Path, session: &SessionOptions) -> Result<Self> {
        let options = PipelineOptions { session: session.clone(), ..PipelineOptions::default() };
        let pipeline = Pipeline::load(dir, options)?;
        let info = EngineInfo { path: dir.display().to_string(), precision: pipeline.manifest().precision.to_string() };
        Ok(Self { pipeline, info })
    }

    fn encode(&self, text: &str, add_special: bool) -> Result<Vec<u32>> {
        let enc = self.pipeline.tokenizer().encode(text, add_special).map_err(|e| Error::Tokenizer(e.to_string()))?;
        Ok(enc.get_ids().to_vec())
    }

    fn decode(&self, ids: &[u32]) -> Result<String> {
        self.pipeline.tokenizer().decode(ids, true).map_err(|e| Error::Tokenizer(e.to_string()))
    }

    fn features(&self, media: &Media) -> Result<Arc<Features>> {
        let visual = self.pipeline.visual(media)?.ok_or_else(|| Error::Invalid("no visual input".into()))?;
        if !visual.is_video {
            return Err(Error::Invalid("eval compares video features; got an image".into()));
        }
        Ok(visual.features)
    }

    /// Logits of the last `keep` positions after feeding `ids` from an empty cache.
    fn logits(&self, ids: &[u32], splice: Option<&Splice<'_>>, keep: usize) -> Result<Vec<f32>> {
        let mut kv = KvCache::new(&self.pipeline.manifest().model)?;
        Ok(self.pipeline.language_model().forward_logits(&mut kv, ids, splice, keep)?)
    }

    /// Greedy answer (pure argmax) to `prompt`, EOS included when it comes.
    fn greedy(&self, prompt: &[u32], splice: &Splice<'_>, max_new: usize) -> Result<Vec<u32>> {
        let m = self.pipeline.manifest();
        let lm = self.pipeline.language_model();
        let mut kv = KvCache::new(&m.model)?;
        let mut logits = lm.forward(&mut kv, prompt, Some(splice))?;
        let mut out = Vec::with_capacity(max_new);
        while out.len() < max_new {
            let id = argmax(&logits);
            out.push(id);
            if id == m.tokens.eos || out.len() == max_new {
                break;
            }
            logits = lm.forward(&mut kv, &[id], None)?;
        }
        Ok(out)
    }

    fn vocab(&self) -> usize {
        self.pipeline.manifest().model.vocab_size
    }
}

/// Both engines must read the same inputs the same way for the comparison to mean anything.
fn check_compatible(a: &Side, b: &Side) -> Result<()> {
    let (ma, mb) = (a.pipeline.manifest(), b.pipeline.manifest());
    let pairs = [
        ("vocab_size", ma.model.vocab_size, mb.model.vocab_size),
        ("image_size", ma.model.image_size, mb.model.image_size),
        ("frames", ma.preprocess.frames, mb.preprocess.frames),
        ("tokens_per_frame", ma.model.tokens_per_frame, mb.model.tokens_per_frame),
        ("text_hidden", ma.model.text_hidden, mb.model.text_hidden),
    ];
    for (what, x, y) in pairs {
        if x != y {
            return Err(Error::Invalid(format!(
                "the engines differ in {what} ({x} vs {y}): they are not two builds of one model"
            )));
        }
    }
    if ma.tokens != mb.tokens || ma.chat_template != mb.chat_template {
        return Err(Error::Invalid("the engines differ in special tokens or chat template".into()));
    }
    Ok(())
}

/// Index of the largest finite value (NaN never wins; ties go to the first).
fn argmax(row: &[f32]) -> u32 {
    let mut best = (0usize, f32::NEG_INFINITY);
    for (i, &v) in row.iter().enumerate() {
        if v > best.1 {
            best = (i, v);
        }
    }
    best.0 as u32
}

/// `log_softmax(row)` in f64.
fn log_softmax(row: &[f32]) -> Vec<f64> {
    let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
    let sum: f64 = row.iter().map(|&v| (v as f64 - max).exp()).sum();
    let lse = max + sum.ln();
    row.iter().map(|&v| v as f64 - lse).collect()
}

/// Running sums of the per-position comparison.
#[derive(Default)]
struct Accum {
    positions: usize,
    kl_sum: f64,
    kl_max: f64,
    agree: usize,
    nll_engine: f64,
    nll_reference: f64,
}

impl Accum {
    /// Compares row-major `[rows, vocab]` logits; `targets[r]` (if given) is the token row `r`
    /// predicts, for perplexity.
    fn add(&mut self, reference: &[f32], engine: &[f32], vocab: usize, targets: Option<&[u32]>) {
        for (r, (rr, er)) in reference.chunks_exact(vocab).zip(engine.chunks_exact(vocab)).enumerate() {
            let (lr, le) = (log_softmax(rr), log_softmax(er));
            let kl: f64 = lr.iter().zip(&le).map(|(&p, &q)| if p.is_finite() { p.exp() * (p - q) } else { 0.0 }).sum();
            let kl = kl.max(0.0);
            self.kl_sum += kl;
            self.kl_max = self.kl_max.max(kl);
            self.agree += usize::from(argmax(rr) == argmax(er));
            self.positions += 1;
            if let Some(t) = targets.and_then(|t| t.get(r)) {
                self.nll_reference -= lr[*t as usize];
                self.nll_engine -= le[*t as usize];
            }
        }
    }

    fn report(&self) -> DistributionReport {
        let n = self.positions.max(1) as f64;
        DistributionReport {
            positions: self.positions,
            kl_mean: self.kl_sum / n,
            kl_max: self.kl_max,
            top1_agreement: self.agree as f64 / n,
        }
    }
}

/// Seeded normal pixel values × 0.5 (already "normalized"), `[1, frames, 3, side, side]`.
pub fn random_pixels(seed: u64, frames: usize, side: usize) -> Array5<f32> {
    let mut rng = StdRng::seed_from_u64(seed);
    Array5::from_shape_simple_fn((1, frames, 3, side, side), || rng.sample::<f32, _>(StandardNormal) * 0.5)
}

fn compare_features(input: String, reference: &Array2<f32>, engine: &Array2<f32>) -> Result<FeatureSimilarity> {
    if reference.dim() != engine.dim() {
        return Err(Error::Invalid(format!("video features of {input}: {:?} vs {:?}", engine.dim(), reference.dim())));
    }
    let (mut sum, mut min, mut max_abs, mut diff2, mut ref2) = (0.0f64, f64::INFINITY, 0.0f64, 0.0f64, 0.0f64);
    for (r, e) in reference.rows().into_iter().zip(engine.rows()) {
        let (mut dot, mut nr, mut ne) = (0.0f64, 0.0f64, 0.0f64);
        for (&x, &y) in r.iter().zip(e.iter()) {
            let (x, y) = (x as f64, y as f64);
            dot += x * y;
            nr += x * x;
            ne += y * y;
            diff2 += (x - y) * (x - y);
            max_abs = max_abs.max((x - y).abs());
        }
        ref2 += nr;
        let cos = match (nr > 0.0, ne > 0.0) {
            (true, true) => dot / (nr.sqrt() * ne.sqrt()),
            (false, false) => 1.0,
            _ => 0.0,
        };
        sum += cos;
        min = min.min(cos);
    }
    let tokens = reference.nrows();
    Ok(FeatureSimilarity {
        input,
        tokens,
        cosine_mean: sum / tokens.max(1) as f64,
        cosine_min: min,
        max_abs_diff: max_abs,
        relative_l2: if ref2 > 0.0 { (diff2 / ref2).sqrt() } else { diff2.sqrt() },
    })
}

fn common_prefix(a: &[u32], b: &[u32]) -> usize {
    a.iter().zip(b).take_while(|(x, y)| x == y).count()
}

/// Runs every comparison of `opts.engine` against `opts.reference`.
pub fn evaluate(opts: &EvalOptions) -> Result<EvalReport> {
    let started = Instant::now();
    let say = |msg: &str| {
        if opts.progress {
            eprintln!("[eval] {msg}");
        }
    };
    if opts.prompts.is_empty() {
        return Err(Error::Invalid("no eval prompts".into()));
    }
    if opts.pixel_inputs == 0 && opts.videos.is_empty() {
        return Err(Error::Invalid("no visual inputs: ask for pixel inputs or give a video".into()));
    }
    say(&format!("loading {} and {}", opts.engine.display(), opts.reference.display()));
    let engine = Side::load(&opts.engine, &opts.session)?;
    let reference = Side::load(&opts.reference, &opts.session)?;
    check_compatible(&engine, &reference)?;
    let m = reference.pipeline.manifest();
    let vocab = reference.vocab();

    // Video features.
    let mut media: Vec<(String, Media)> = opts
        .videos
        .iter()
        .map(|v| (v.display().to_string(), Media::VideoFile(v.clone())))
        .chain((0..opts.pixel_inputs as u64).map(|i| {
            let px = random_pixels(opts.seed + i, m.preprocess.frames, m.model.image_size);
            (format!("random-{}", opts.seed + i), Media::VideoPixels(Arc::new(px)))
        }))
        .collect();
    let mut inputs = Vec::with_capacity(media.len());
    for (name, medium) in &media {
        say(&format!("video features of {name}"));
        let (r, e) = (reference.features(medium)?, engine.features(medium)?);
        inputs.push(compare_features(name.clone(), &r.to_host()?, &e.to_host()?)?);
    }
    let vision = VisionReport {
        cosine_mean: inputs.iter().map(|i| i.cosine_mean).sum::<f64>() / inputs.len() as f64,
        cosine_min: inputs.iter().map(|i| i.cosine_min).fold(f64::INFINITY, f64::min),
        inputs,
    };

    // Prompts: greedy answers of both, then both teacher-forced along the reference's answer.
    let (_, prompt_media) = media.swap_remove(0);
    let (ref_feats, eng_feats) = (reference.features(&prompt_media)?, engine.features(&prompt_media)?);
    let ref_splice = Splice { token: m.tokens.video, features: &ref_feats, first: 0 };
    let eng_splice = Splice { token: m.tokens.video, features: &eng_feats, first: 0 };
    let slot = VisualSlot::Video { tokens: ref_feats.rows() };
    let mut prompt_acc = Accum::default();
    let mut cases = Vec::with_capacity(opts.prompts.len());
    for (i, question) in opts.prompts.iter().enumerate() {
        say(&format!("prompt {}/{}: {question}", i + 1, opts.prompts.len()));
        let ids = PromptBuilder::new(reference.pipeline.tokenizer(), &m.chat_template, &m.tokens)
            .first_turn(slot, question)?;
        let eng_m = engine.pipeline.manifest();
        let eng_ids = PromptBuilder::new(engine.pipeline.tokenizer(), &eng_m.chat_template, &eng_m.tokens)
            .first_turn(slot, question)?;
        if ids != eng_ids {
            return Err(Error::Invalid(format!("the engines tokenize the prompt {question:?} differently")));
        }
        if ids.len() + opts.max_new_tokens > m.max_sequence_length {
            return Err(Error::Invalid(format!(
                "prompt {question:?} takes {} tokens; with {} new ones it exceeds the context of {}",
                ids.len(),
                opts.max_new_tokens,
                m.max_sequence_length
            )));
        }
        let ref_answer = reference.greedy(&ids, &ref_splice, opts.max_new_tokens)?;
        let eng_answer = engine.greedy(&ids, &eng_splice, opts.max_new_tokens)?;
        // The prompt plus all but the last answer token: the last `n` rows predict the answer.
        let n = ref_answer.len();
        let mut forced = ids.clone();
        forced.extend_from_slice(&ref_answer[..n - 1]);
        let r = reference.logits(&forced, Some(&ref_splice), n)?;
        let e = engine.logits(&forced, Some(&eng_splice), n)?;
        prompt_acc.add(&r, &e, vocab, None);
        cases.push(GreedyCase {
            prompt: question.clone(),
            reference_tokens: n,
            engine_tokens: eng_answer.len(),
            common_prefix: common_prefix(&ref_answer, &eng_answer),
            reference_text: reference.decode(&ref_answer)?,
            engine_text: engine.decode(&eng_answer)?,
        });
    }
    let k = cases.len() as f64;
    let greedy = GreedyReport {
        common_prefix_mean: cases.iter().map(|c| c.common_prefix as f64).sum::<f64>() / k,
        reference_tokens_mean: cases.iter().map(|c| c.reference_tokens as f64).sum::<f64>() / k,
        identical: cases
            .iter()
            .filter(|c| c.common_prefix == c.reference_tokens && c.engine_tokens == c.reference_tokens)
            .count(),
        cases,
    };

    // Text set: chunks of at most `chunk_tokens`, each opened with the tokenizer's own prefix
    // (BOS for LLaMA-style tokenizers, nothing for those that add none).
    let prefix = reference.encode("", true)?;
    let text_ids = reference.encode(&opts.text, false)?;
    if engine.encode(&opts.text, false)? != text_ids {
        return Err(Error::Invalid("the engines tokenize the text set differently".into()));
    }
    let total = text_ids.len();
    let text_ids = &text_ids[..opts.max_text_tokens.map_or(total, |cap| cap.min(total))];
    let chunk = opts.chunk_tokens.min(m.max_sequence_length);
    if chunk < prefix.len() + 2 {
        return Err(Error::Invalid(format!("chunks of {chunk} tokens are too short")));
    }
    let body = chunk - prefix.len();
    let (mut text_acc, mut chunks) = (Accum::default(), 0);
    let pieces: Vec<&[u32]> = text_ids.chunks(body).filter(|c| prefix.len() + c.len() >= 2).collect();
    for (i, piece) in pieces.iter().enumerate() {
        say(&format!("text chunk {}/{} ({} tokens)", i + 1, pieces.len(), piece.len()));
        let ids: Vec<u32> = prefix.iter().chain(piece.iter()).copied().collect();
        let keep = ids.len() - 1;
        let r = reference.logits(&ids, None, ids.len())?;
        let e = engine.logits(&ids, None, ids.len())?;
        // Row j predicts ids[j + 1]; the last row predicts past the chunk and is not scored.
        text_acc.add(&r[..keep * vocab], &e[..keep * vocab], vocab, Some(&ids[1..]));
        chunks += 1;
    }
    let scored = text_acc.positions.max(1) as f64;
    let (ppl_e, ppl_r) = ((text_acc.nll_engine / scored).exp(), (text_acc.nll_reference / scored).exp());
    let perplexity = PerplexityReport {
        tokens: text_acc.positions,
        chunks,
        chunk_tokens: chunk,
        engine: ppl_e,
        reference: ppl_r,
        relative_change: ppl_e / ppl_r - 1.0,
    };

    Ok(EvalReport {
        engine: engine.info.clone(),
        reference: reference.info.clone(),
        vision,
        prompts: prompt_acc.report(),
        text: text_acc.report(),
        perplexity,
        greedy,
        settings: EvalSettings {
            seed: opts.seed,
            pixel_inputs: opts.pixel_inputs,
            videos: opts.videos.iter().map(|v| v.display().to_string()).collect(),
            prompts: opts.prompts.len(),
            max_new_tokens: opts.max_new_tokens,
            text_sha256: hex::encode(Sha256::digest(opts.text.as_bytes())),
            text_tokens_total: total,
        },
        elapsed_s: started.elapsed().as_secs_f64(),
    })
}

impl fmt::Display for EvalReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let (v, p, t, ppl, g) = (&self.vision, &self.prompts, &self.text, &self.perplexity, &self.greedy);
        writeln!(
            f,
            "{} ({}) against reference {} ({})",
            self.engine.path, self.engine.precision, self.reference.path, self.reference.precision
        )?;
        writeln!(f, "{:<44} value", "metric")?;
        let tokens = v.inputs.first().map_or(0, |i| i.tokens);
        writeln!(
            f,
            "{:<44} {:.6} / {:.6}  ({} inputs x {tokens} tokens)",
            "video features cosine, mean / min",
            v.cosine_mean,
            v.cosine_min,
            v.inputs.len()
        )?;
        for (name, d) in [("prompts", p), ("text", t)] {
            writeln!(
                f,
                "{:<44} {:.3e} / {:.3e}  ({} positions)",
                format!("{name}: KL(ref || engine), mean / max"),
                d.kl_mean,
                d.kl_max,
                d.positions
            )?;
            writeln!(f, "{:<44} {:.2}%", format!("{name}: top-1 agreement"), 100.0 * d.top1_agreement)?;
        }
        writeln!(
            f,
            "{:<44} {:.4} / {:.4}  ({:+.3}%, {} tokens in {} chunks)",
            "perplexity, engine / reference",
            ppl.engine,
            ppl.reference,
            100.0 * ppl.relative_change,
            ppl.tokens,
            ppl.chunks
        )?;
        writeln!(
            f,
            "{:<44} {:.1} of {:.1} tokens  ({} of {} answers identical)",
            "greedy common prefix, mean",
            g.common_prefix_mean,
            g.reference_tokens_mean,
            g.identical,
            g.cases.len()
        )?;
        for c in &g.cases {
            writeln!(f, "  {:>3}/{:<3} {}", c.common_prefix, c.reference_tokens, c.prompt)?;
            writeln!(f, "          reference: {:?}", c.reference_text)?;
            if c.engine_text != c.reference_text {
                writeln!(f, "          engine:    {:?}", c.engine_text)?;
            }
        }
        write!(f, "{:.1} s", self.elapsed_s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kl_is_zero_for_equal_rows_and_positive_otherwise() {
        let a = [1.0f32, 2.0, 3.0, 0.5, 0.0, -1.0];
        let mut acc = Accum::default();
        acc.add(&a, &a, 3, Some(&[2, 0]));
        assert_eq!(acc.kl_sum, 0.0);
        assert_eq!(acc.agree, 2);
        assert_eq!(acc.nll_engine, acc.nll_reference);
        let b = [3.0f32, 2.0, 1.0, 0.5, 0.0, -1.0];
        let mut acc = Accum::default();
        acc.add(&a, &b, 3, None);
        assert!(acc.kl_sum > 0.1);
        assert_eq!(acc.agree, 1);
    }

    #[test]
    fn log_softmax_sums_to_one_and_argmax_skips_nan() {
        let l = log_softmax(&[1000.0, 1000.0, -1000.0]);
        let total: f64 = l.iter().map(|x| x.exp()).sum();
        assert!((total - 1.0).abs() < 1e-12);
        assert_eq!(argmax(&[f32::NAN, 1.0, 3.0, 3.0]), 2);
    }

    #[test]
    fn cosine_of_scaled_features_is_one() -> Result<()> {
        let a = Array2::from_shape_fn((4, 8), |(i, j)| (i * 8 + j) as f32 - 10.0);
        let s = compare_features("x".into(), &a, &(&a * 2.0))?;
        assert!((s.cosine_mean - 1.0).abs() < 1e-12 && (s.cosine_min - 1.0).abs() < 1e-12);
        assert!((s.relative_l2 - 1.0).abs() < 1e-12);
        Ok(())
    }

    #[test]
    fn prompts_skip_blanks_and_comments() {
        assert_eq!(parse_prompts("# c\n\n a? \nb?\n"), vec!["a?".to_string(), "b?".to_string()]);
        assert!(!parse_prompts(DEFAULT_PROMPTS).is_empty());
        assert!(DEFAULT_TEXT.lines().count() >= 30);
    }
}
