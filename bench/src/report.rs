//! From raw runs to the report: per-stage summaries, pairwise speedups against the baseline,
//! the roofline ratios (decode against the bandwidth bound, vision and prefill against the peak
//! GEMM rate), the targets, and the Markdown table for the README.
use std::collections::BTreeMap;
use std::fmt::Write as _;

use serde::{Deserialize, Serialize};

use crate::cost::ModelCost;
use crate::schema::{Limits, Scaling, SystemRun};
use crate::stats::{Summary, pairwise_ratio, pairwise_sum};

/// The stages of one answer that are timed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stage {
    /// Video decode and preprocessing.
    Preprocess,
    /// Vision tower and projector.
    Vision,
    /// The prefill.
    Prefill,
    /// Pixel values to first token.
    TimeToFirstToken,
    /// One decode step.
    Decode,
    /// Decode throughput.
    TokensPerSecond,
    /// A whole answer from pixel values.
    Answer,
    /// The video file to the last token: preprocessing plus the answer.
    EndToEnd,
}

impl Stage {
    /// Every stage, in table order.
    pub const ALL: [Stage; 8] = [
        Stage::Preprocess,
        Stage::Vision,
        Stage::Prefill,
        Stage::TimeToFirstToken,
        Stage::Decode,
        Stage::TokensPerSecond,
        Stage::Answer,
        Stage::EndToEnd,
    ];

    /// Key in `results.json`.
    pub fn key(self) -> &'static str {
        match self {
            Stage::Preprocess => "preprocess_ms",
            Stage::Vision => "vision_ms",
            Stage::Prefill => "prefill_ms",
            Stage::TimeToFirstToken => "ttft_ms",
            Stage::Decode => "decode_ms_per_token",
            Stage::TokensPerSecond => "tokens_per_s",
            Stage::Answer => "answer_ms",
            Stage::EndToEnd => "e2e_ms",
        }
    }

    fn label(self, run: &SystemRun) -> String {
        match self {
            Stage::Preprocess => format!("video decode + preprocessing, {} frames (ms)", run.frames),
            Stage::Vision => "vision tower + projector (ms)".into(),
            Stage::Prefill => format!("prefill, {} tokens (ms)", run.prompt_tokens),
            Stage::TimeToFirstToken => "time to first token, from pixel values (ms)".into(),
            Stage::Decode => "decode (ms/token)".into(),
            Stage::TokensPerSecond => "decode (tokens/s)".into(),
            Stage::Answer => format!("{}-token answer, from pixel values (s)", run.new_tokens),
            Stage::EndToEnd => format!("{}-token answer, from the video file (s)", run.new_tokens),
        }
    }

    /// Per-repetition values of this stage.
    pub fn samples(self, run: &SystemRun) -> Vec<f64> {
        let s = &run.samples;
        match self {
            Stage::Preprocess => s.preprocess_ms.clone(),
            Stage::Vision => s.vision_ms.clone(),
            Stage::Prefill => s.prefill_ms.clone(),
            Stage::TimeToFirstToken => s.ttft_ms.clone(),
            Stage::Decode => s.decode_ms_per_token.clone(),
            Stage::TokensPerSecond => s.decode_ms_per_token.iter().map(|ms| 1000.0 / ms).collect(),
            Stage::Answer => s.answer_ms.clone(),
            Stage::EndToEnd => pairwise_sum(&s.preprocess_ms, &s.answer_ms),
        }
    }

    /// Whether the stage is a time (a speedup is baseline ÷ system) rather than a rate.
    fn is_time(self) -> bool {
        self != Stage::TokensPerSecond
    }

    fn format(self, s: &Summary) -> String {
        let (scale, digits) = match self {
            Stage::Answer | Stage::EndToEnd => (1e-3, 2),
            Stage::Decode => (1.0, 1),
            Stage::TokensPerSecond => (1.0, 2),
            _ => (1.0, 0),
        };
        let f = |v: f64| format!("{:.*}", digits, v * scale);
        format!("{} [{}–{}]", f(s.median), f(s.min), f(s.max))
    }
}

/// An engine that was asked for but not measured.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Skipped {
    /// What was asked for.
    pub what: String,
    /// Why it was skipped.
    pub reason: String,
}

/// One system's summary.
#[derive(Debug, Clone, Serialize)]
pub struct SystemSummary {
    /// Label.
    pub label: String,
    /// `vl` or `pytorch`.
    pub system: String,
    /// Weight precision.
    pub precision: String,
    /// Engine directory (vl).
    pub engine: Option<String>,
    /// Measured answers and warm-ups.
    pub reps: usize,
    /// Warm-up answers.
    pub warmup: usize,
    /// Stage summaries by key.
    pub stages: BTreeMap<&'static str, Summary>,
    /// Peak resident memory (MB).
    pub peak_rss_mb: f64,
    /// Bytes a decode step reads: weights plus the KV cache at the answer's mean context.
    pub decode_bytes_per_token: f64,
    /// Decode time if it ran at the measured read bandwidth.
    pub decode_bound_ms: Option<f64>,
    /// Decode time as a multiple of that bound (per repetition).
    pub decode_x_bound: Option<Summary>,
    /// Achieved vision rate (useful FLOPs ÷ time), GFLOP/s.
    pub vision_gflops: Option<Summary>,
    /// Vision rate as a share of the peak GEMM rate.
    pub vision_share_of_peak: Option<Summary>,
    /// Achieved prefill rate, GFLOP/s.
    pub prefill_gflops: Option<Summary>,
    /// Prefill rate as a share of the peak GEMM rate.
    pub prefill_share_of_peak: Option<Summary>,
    /// The curves.
    pub scaling: Option<Scaling>,
    /// Notes from the run.
    pub notes: Vec<String>,
}

/// One target of the issue and where it stands.
#[derive(Debug, Clone, Serialize)]
pub struct Target {
    /// What is measured.
    pub what: String,
    /// The goal, as text.
    pub goal: String,
    /// The median reached, as text.
    pub reached: String,
    /// Whether the median meets the goal.
    pub met: bool,
}

/// A system against the baseline.
#[derive(Debug, Clone, Serialize)]
pub struct Comparison {
    /// The system.
    pub system: String,
    /// The baseline.
    pub baseline: String,
    /// Baseline time ÷ system time per stage, pair by pair.
    pub speedup: BTreeMap<&'static str, Summary>,
    /// System peak memory ÷ baseline peak memory.
    pub memory_ratio: f64,
    /// Leading greedy tokens on which both agree (same pixel values and prompt).
    pub tokens_agree: usize,
    /// Tokens compared.
    pub tokens_compared: usize,
    /// The targets that apply to this precision.
    pub targets: Vec<Target>,
}

/// Everything `results.json` holds.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    /// The command that produced it.
    pub generated_by: String,
    /// Seconds since the Unix epoch when it was written.
    pub unix_time: u64,
    /// A smoke run (few repetitions: the numbers are not for the README).
    pub smoke: bool,
    /// The checkpoint.
    pub model: String,
    /// Threads every system used.
    pub threads: usize,
    /// The machine's limits.
    pub machine: Option<Limits>,
    /// The model's dimensions as the cost model reads them.
    pub cost: Option<ModelCost>,
    /// The baseline's label.
    pub baseline: Option<String>,
    /// Summaries, baseline first.
    pub systems: Vec<SystemSummary>,
    /// Each vl system against the baseline.
    pub comparisons: Vec<Comparison>,
    /// What was not measured and why.
    pub skipped: Vec<Skipped>,
    /// The raw runs.
    pub raw: Vec<SystemRun>,
}

/// What the report is made from.
pub struct ReportInput {
    /// The command line.
    pub command: String,
    /// A smoke run.
    pub smoke: bool,
    /// The checkpoint path.
    pub model: String,
    /// Its cost model, if `config.json` was readable.
    pub cost: Option<ModelCost>,
    /// The machine's limits, if measured.
    pub limits: Option<Limits>,
    /// The runs; the PyTorch one (if any) is the baseline.
    pub runs: Vec<SystemRun>,
    /// Skipped systems.
    pub skipped: Vec<Skipped>,
}

fn summarize(run: &SystemRun, cost: Option<&ModelCost>, limits: Option<&Limits>) -> SystemSummary {
    let stages = Stage::ALL.iter().filter_map(|s| Some((s.key(), Summary::of(&s.samples(run))?))).collect();
    let mean_context = run.prompt_tokens as f64 + run.new_tokens as f64 / 2.0;
    let bytes = run.decode_weight_bytes as f64 + run.kv_bytes_per_position as f64 * mean_context;
    let bound_ms = limits.filter(|l| l.bandwidth_read_gbs > 0.0).map(|l| bytes / (l.bandwidth_read_gbs * 1e9) * 1e3);
    let decode_x_bound =
        bound_ms.and_then(|b| Summary::of(&run.samples.decode_ms_per_token.iter().map(|d| d / b).collect::<Vec<_>>()));
    let rate = |flops: f64, samples: &[f64]| {
        Summary::of(&samples.iter().map(|ms| flops / (ms * 1e-3) / 1e9).collect::<Vec<_>>())
    };
    let vision_gflops = cost.and_then(|c| rate(c.vision_flops(run.frames), &run.samples.vision_ms));
    let prefill_gflops = cost.and_then(|c| rate(c.prefill_flops(run.prompt_tokens, 0), &run.samples.prefill_ms));
    let share = |g: Option<Summary>| {
        let peak = limits.map(|l| l.gemm_peak_gflops).filter(|p| *p > 0.0)?;
        g.map(|s| s.map(|v| v / peak))
    };
    SystemSummary {
        label: run.label.clone(),
        system: run.system.clone(),
        precision: run.precision.clone(),
        engine: run.engine.clone(),
        reps: run.reps,
        warmup: run.warmup,
        stages,
        peak_rss_mb: run.peak_rss_mb,
        decode_bytes_per_token: bytes,
        decode_bound_ms: bound_ms,
        decode_x_bound,
        vision_share_of_peak: share(vision_gflops),
        vision_gflops,
        prefill_share_of_peak: share(prefill_gflops),
        prefill_gflops,
        scaling: run.scaling.clone(),
        notes: run.notes.clone(),
    }
}

fn speedup_of(speedup: &BTreeMap<&'static str, Summary>, stage: Stage) -> Option<f64> {
    speedup.get(stage.key()).map(|s| s.median)
}

fn targets(
    precision: &str,
    summary: &SystemSummary,
    speedup: &BTreeMap<&'static str, Summary>,
    memory: f64,
) -> Vec<Target> {
    let mut out = Vec::new();
    let mut at_least = |what: &str, goal: f64, reached: Option<f64>, unit: &str| {
        if let Some(r) = reached {
            let fmt = |v: f64| if unit == "%" { format!("{:.1}%", v * 100.0) } else { format!("{v:.2}{unit}") };
            out.push(Target { what: what.into(), goal: format!("≥ {}", fmt(goal)), reached: fmt(r), met: r >= goal });
        }
    };
    match precision {
        "fp32" => {
            at_least("decode speedup", 2.0, speedup_of(speedup, Stage::Decode), "×");
            at_least("prefill share of peak GEMM", 0.9, summary.prefill_share_of_peak.map(|s| s.median), "%");
            at_least("vision speedup", 1.3, speedup_of(speedup, Stage::Vision), "×");
        }
        "int8-weight" => at_least("decode speedup", 3.0, speedup_of(speedup, Stage::Decode), "×"),
        "int8" => at_least("prefill speedup", 1.8, speedup_of(speedup, Stage::Prefill), "×"),
        _ => {}
    }
    if precision == "fp32" {
        if let Some(x) = summary.decode_x_bound.map(|s| s.median) {
            out.push(Target {
                what: "decode ÷ bandwidth bound".into(),
                goal: "≤ 1.30×".into(),
                reached: format!("{x:.2}×"),
                met: x <= 1.3,
            });
        }
        if memory.is_finite() {
            out.push(Target {
                what: "peak memory ÷ PyTorch".into(),
                goal: "≤ 0.60×".into(),
                reached: format!("{memory:.2}×"),
                met: memory <= 0.6,
            });
        }
    }
    out
}

/// Builds the report.
pub fn build(input: ReportInput) -> Report {
    let cost = input.cost.as_ref();
    let limits = input.limits.as_ref();
    let mut runs = input.runs;
    runs.sort_by_key(|r| r.system != "pytorch");
    let systems: Vec<SystemSummary> = runs.iter().map(|r| summarize(r, cost, limits)).collect();
    let baseline = runs.iter().position(|r| r.system == "pytorch");
    let mut comparisons = Vec::new();
    if let Some(b) = baseline {
        let base = &runs[b];
        for (run, summary) in runs.iter().zip(&systems).filter(|(r, _)| r.system != "pytorch") {
            let speedup: BTreeMap<&'static str, Summary> = Stage::ALL
                .iter()
                .filter(|s| s.is_time())
                .filter_map(|s| Some((s.key(), pairwise_ratio(&s.samples(base), &s.samples(run))?)))
                .collect();
            let memory_ratio = run.peak_rss_mb / base.peak_rss_mb;
            let compared = run.tokens.len().min(base.tokens.len());
            let agree = run.tokens.iter().zip(&base.tokens).take_while(|(a, b)| a == b).count();
            comparisons.push(Comparison {
                system: run.label.clone(),
                baseline: base.label.clone(),
                targets: targets(&run.precision, summary, &speedup, memory_ratio),
                speedup,
                memory_ratio,
                tokens_agree: agree,
                tokens_compared: compared,
            });
        }
    }
    let unix_time =
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or_default();
    Report {
        generated_by: input.command,
        unix_time,
        smoke: input.smoke,
        model: input.model,
        threads: runs.first().map_or(0, |r| r.threads),
        machine: input.limits,
        cost: input.cost,
        baseline: baseline.map(|b| runs[b].label.clone()),
        systems,
        comparisons,
        skipped: input.skipped,
        raw: runs,
    }
}

fn pct(s: &Summary) -> String {
    format!("{:.0}% [{:.0}–{:.0}]", s.median * 100.0, s.min * 100.0, s.max * 100.0)
}

fn times(s: &Summary) -> String {
    format!("{:.2}× [{:.2}–{:.2}]", s.median, s.min, s.max)
}

fn row(cells: impl IntoIterator<Item = String>) -> String {
    let cells: Vec<String> = cells.into_iter().collect();
    format!("| {} |\n", cells.join(" | "))
}

fn header(out: &mut String, first: &str, columns: &[String]) {
    out.push_str(&row(std::iter::once(first.to_string()).chain(columns.iter().cloned())));
    out.push_str(&row(std::iter::once("---".to_string()).chain(columns.iter().map(|_| "---:".to_string()))));
}

/// The Markdown for the README: machine, per-stage table, speedups, targets, curves, notes.
pub fn markdown(r: &Report) -> String {
    let mut out = String::new();
    let Some(first) = r.raw.first() else {
        return "No system was measured.\n".into();
    };
    if r.smoke {
        out.push_str(
            "> **Smoke run**: few repetitions on a busy machine; these numbers are noisy and not for the README.\n\n",
        );
    }
    let _ = writeln!(out, "Model `{}`, {} threads per system, CPU.", r.model, r.threads);
    if let Some(m) = &r.machine {
        let _ = writeln!(
            out,
            "Machine: {}; measured in the same run with {} threads ({}): read bandwidth {:.1} GB/s (copy {:.1} GB/s), \
             peak fp32 GEMM {:.0} GFLOP/s (4096³: {:.0}, 2079×4096×11008: {:.0}).",
            m.cpu,
            m.threads,
            m.tool,
            m.bandwidth_read_gbs,
            m.bandwidth_copy_gbs,
            m.gemm_peak_gflops,
            m.gemm_square_4096_gflops,
            m.gemm_prefill_shape_gflops
        );
    }
    let _ = writeln!(
        out,
        "Prompt: {} tokens ({} frames of visual tokens and the question); answers of {} tokens, greedy, EOS ignored; \
         the same pixel values and prompt ids for every system. Cells: median [min–max] over the n measured \
         repetitions (after warm-up). The bandwidth bound is the bytes a decode step must read (decoder weights \
         and the KV cache at the answer's mean context) at the measured read bandwidth; shares of peak GEMM count \
         useful FLOPs (layers up to the feature layer, causal attention as half the square).\n",
        first.prompt_tokens, first.frames, first.new_tokens
    );

    let labels: Vec<String> = r.systems.iter().map(|s| format!("{} (n={})", s.label, s.reps)).collect();
    header(&mut out, "stage", &labels);
    for stage in Stage::ALL {
        let cells = r.systems.iter().map(|s| s.stages.get(stage.key()).map_or("–".into(), |v| stage.format(v)));
        out.push_str(&row(std::iter::once(stage.label(first)).chain(cells)));
    }
    out.push_str(&row(std::iter::once("peak resident memory (MB)".to_string())
        .chain(r.systems.iter().map(|s| format!("{:.0}", s.peak_rss_mb)))));
    out.push_str(&row(std::iter::once("decode ÷ bandwidth-bound time".to_string()).chain(r.systems.iter().map(
        |s| match (s.decode_x_bound, s.decode_bound_ms) {
            (Some(x), Some(b)) => format!("{} (bound {b:.0} ms)", times(&x)),
            _ => "–".into(),
        },
    ))));
    out.push_str(&row(std::iter::once("vision, share of peak GEMM".to_string())
        .chain(r.systems.iter().map(|s| s.vision_share_of_peak.as_ref().map_or("–".into(), pct)))));
    out.push_str(&row(std::iter::once("prefill, share of peak GEMM".to_string())
        .chain(r.systems.iter().map(|s| s.prefill_share_of_peak.as_ref().map_or("–".into(), pct)))));
    out.push('\n');

    if !r.comparisons.is_empty() {
        let base = r.baseline.clone().unwrap_or_default();
        let _ = writeln!(out, "Speedup over {base} (its time ÷ vl's, repetition by repetition; > 1 is faster):\n");
        let cols: Vec<String> = r.comparisons.iter().map(|c| c.system.clone()).collect();
        header(&mut out, "stage", &cols);
        for stage in Stage::ALL.into_iter().filter(|s| s.is_time()) {
            let cells = r.comparisons.iter().map(|c| c.speedup.get(stage.key()).map_or("–".into(), times));
            out.push_str(&row(
                std::iter::once(stage.label(first).replace(" (ms)", "").replace(" (s)", "")).chain(cells)
            ));
        }
        out.push_str(&row(std::iter::once("peak memory, vl ÷ baseline".to_string())
            .chain(r.comparisons.iter().map(|c| format!("{:.2}×", c.memory_ratio)))));
        out.push_str(&row(std::iter::once("greedy tokens equal to the baseline's (leading)".to_string())
            .chain(r.comparisons.iter().map(|c| format!("{} of {}", c.tokens_agree, c.tokens_compared)))));
        out.push('\n');
        let targets: Vec<(&Comparison, &Target)> =
            r.comparisons.iter().flat_map(|c| c.targets.iter().map(move |t| (c, t))).collect();
        if !targets.is_empty() {
            out.push_str(
                "Targets (issue 6):\n\n| system | target | goal | reached | met |\n|---|---|---:|---:|:---:|\n",
            );
            for (c, t) in targets {
                let _ = writeln!(
                    out,
                    "| {} | {} | {} | {} | {} |",
                    c.system,
                    t.what,
                    t.goal,
                    t.reached,
                    if t.met { "yes" } else { "**no**" }
                );
            }
            out.push('\n');
        }
    }

    scaling_tables(&mut out, r);

    let mut notes: Vec<String> = Vec::new();
    for s in &r.systems {
        notes.extend(s.notes.iter().map(|n| format!("{}: {n}", s.label)));
    }
    notes.extend(r.skipped.iter().map(|s| format!("skipped {}: {}", s.what, s.reason)));
    if !notes.is_empty() {
        out.push_str("Notes:\n\n");
        for n in notes {
            let _ = writeln!(out, "- {n}");
        }
        out.push('\n');
    }
    let _ = writeln!(out, "Command: `{}`", r.generated_by);
    out
}

fn scaling_tables(out: &mut String, r: &Report) {
    type Curve = fn(&Scaling) -> &Vec<crate::schema::Point>;
    let curves: [(&str, &str, Curve, f64, usize); 3] = [
        ("decode ms/token against context length", "context", |s| &s.decode_vs_context, 1.0, 1),
        (
            "prefill time (ms) against prompt length (text only, fresh cache)",
            "prompt tokens",
            |s| &s.prefill_vs_prompt,
            1.0,
            0,
        ),
        ("vision time (ms) against frames", "frames", |s| &s.vision_vs_frames, 1.0, 0),
    ];
    let with: Vec<&SystemSummary> = r.systems.iter().filter(|s| s.scaling.is_some()).collect();
    if with.is_empty() {
        return;
    }
    for (title, axis, get, scale, digits) in curves {
        let mut xs: Vec<usize> = with
            .iter()
            .flat_map(|s| {
                s.scaling.as_ref().map(|c| get(c).iter().map(|p| p.x).collect::<Vec<_>>()).unwrap_or_default()
            })
            .collect();
        xs.sort_unstable();
        xs.dedup();
        if xs.is_empty() {
            continue;
        }
        let _ = writeln!(out, "Scaling: {title} (one run per point):\n");
        let cols: Vec<String> = with.iter().map(|s| s.label.clone()).collect();
        header(out, axis, &cols);
        for x in xs {
            let cells = with.iter().map(|s| {
                s.scaling
                    .as_ref()
                    .and_then(|c| get(c).iter().find(|p| p.x == x))
                    .map_or("–".into(), |p| format!("{:.*}", digits, p.ms * scale))
            });
            out.push_str(&row(std::iter::once(x.to_string()).chain(cells)));
        }
        out.push('\n');
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::schema::Samples;

    fn run(system: &str, decode: Vec<f64>, prefill: Vec<f64>) -> SystemRun {
        SystemRun {
            system: system.into(),
            label: format!("{system} fp32"),
            precision: "fp32".into(),
            engine: None,
            threads: 2,
            versions: BTreeMap::new(),
            load_ms: 0.0,
            warmup: 1,
            reps: decode.len(),
            prompt_tokens: 2079,
            new_tokens: 64,
            frames: 8,
            samples: Samples {
                preprocess_ms: vec![500.0; decode.len()],
                vision_ms: vec![2000.0; decode.len()],
                prefill_ms: prefill,
                ttft_ms: vec![17000.0; decode.len()],
                answer_ms: vec![30000.0; decode.len()],
                decode_ms_per_token: decode,
            },
            peak_rss_mb: if system == "vl" { 3000.0 } else { 5000.0 },
            decode_weight_bytes: 2_140_000_000,
            kv_bytes_per_position: 65536,
            tokens: vec![1, 2, 3],
            scaling: None,
            notes: vec![],
        }
    }

    fn limits() -> Limits {
        Limits {
            threads: 2,
            tool: "test".into(),
            bandwidth_read_gbs: 20.0,
            bandwidth_read_samples_gbs: vec![],
            bandwidth_copy_gbs: 25.0,
            bandwidth_copy_samples_gbs: vec![],
            bandwidth_buffer_gib: 1.0,
            gemm_square_4096_gflops: 130.0,
            gemm_prefill_shape_gflops: 120.0,
            gemm_peak_gflops: 130.0,
            cpu: "test cpu".into(),
        }
    }

    #[test]
    fn report_compares_against_the_baseline_pair_by_pair() {
        let input = ReportInput {
            command: "vl-bench run".into(),
            smoke: false,
            model: "work/vl7b-slice".into(),
            cost: None,
            limits: Some(limits()),
            runs: vec![
                run("vl", vec![90.0, 100.0, 110.0], vec![14000.0; 3]),
                run("pytorch", vec![180.0, 200.0, 220.0], vec![15700.0; 3]),
            ],
            skipped: vec![Skipped { what: "engines/x-int8".into(), reason: "not built".into() }],
        };
        let r = build(input);
        assert_eq!(r.systems[0].system, "pytorch", "baseline first");
        let c = &r.comparisons[0];
        let decode = c.speedup["decode_ms_per_token"];
        assert_eq!((decode.median, decode.min, decode.max), (2.0, 2.0, 2.0));
        assert!((c.memory_ratio - 0.6).abs() < 1e-12);
        assert_eq!(c.tokens_agree, 3);
        // 2.14 GB + KV at ~2,111 positions over 20 GB/s ≈ 114 ms.
        let bound = r.systems[1].decode_bound_ms.expect("bound");
        assert!((bound - 114.0).abs() < 1.0, "{bound}");
        let decode_target = c.targets.iter().find(|t| t.what == "decode speedup").expect("target");
        assert!(decode_target.met);
        let md = markdown(&r);
        assert!(md.contains("| decode (ms/token) | 200.0 [180.0–220.0] | 100.0 [90.0–110.0] |"), "{md}");
        assert!(md.contains("skipped engines/x-int8: not built"));
    }
}
