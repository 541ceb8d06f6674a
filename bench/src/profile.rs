//! Where a decode step's time goes: the decoder graph run under ONNX Runtime's own profiler
//! (`SessionOptions` profiling), a prefill to the wanted context and then single-token steps,
//! with kernel time summed by operator type and by node over the decode steps only.
use std::borrow::Cow;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

use ort::session::builder::GraphOptimizationLevel;
use ort::session::{Session, SessionInputValue};
use ort::value::TensorRef;
use serde::{Deserialize, Serialize};

use crate::stats::Summary;
use crate::{BenchError, Result, read_json};
use vl_runtime::generate::ms;
use vl_runtime::kv_cache::KvCache;
use vl_runtime::manifest::Manifest;

/// What to profile.
#[derive(Debug, Clone)]
pub struct ProfilePlan {
    /// Engine directory.
    pub engine: PathBuf,
    /// Intra-op threads.
    pub threads: usize,
    /// Positions in the cache before the profiled steps.
    pub context: usize,
    /// Profiled decode steps.
    pub steps: usize,
    /// Where ONNX Runtime writes its trace.
    pub out_dir: PathBuf,
}

/// Kernel time of one operator type or node, per decode step.
#[derive(Debug, Clone, Serialize)]
pub struct OpTime {
    /// Operator type or node name.
    pub name: String,
    /// Milliseconds per step.
    pub ms_per_step: f64,
    /// Share of the kernel time.
    pub share: f64,
    /// Kernel calls per step.
    pub calls_per_step: f64,
}

/// The profile's summary.
#[derive(Debug, Clone, Serialize)]
pub struct ProfileReport {
    /// Engine directory.
    pub engine: String,
    /// Context before the steps.
    pub context: usize,
    /// Profiled steps.
    pub steps: usize,
    /// Wall time per step as the caller saw it.
    pub step_ms: Option<Summary>,
    /// Sum of kernel times per step.
    pub kernel_ms_per_step: f64,
    /// `model_run` time per step as ONNX Runtime saw it.
    pub run_ms_per_step: f64,
    /// Kernel time by operator type, largest first.
    pub by_op: Vec<OpTime>,
    /// The slowest nodes.
    pub top_nodes: Vec<OpTime>,
    /// Decoder weight bytes ÷ MatMul kernel time: the bandwidth the weight reads reached.
    pub matmul_weight_gbs: Option<f64>,
    /// The raw trace.
    pub trace: String,
}

#[derive(Deserialize)]
struct Event {
    #[serde(default)]
    cat: String,
    #[serde(default)]
    name: String,
    #[serde(default)]
    ts: u64,
    #[serde(default)]
    dur: u64,
    #[serde(default)]
    args: BTreeMap<String, serde_json::Value>,
}

fn session(dir: &Path, file: &str, threads: usize, trace: &Path) -> Result<Session> {
    let env = vl_runtime::ort_env::environment()?;
    let session = Session::builder(env)
        .and_then(|b| b.with_optimization_level(GraphOptimizationLevel::Level3).map_err(ort::Error::from))
        .and_then(|b| b.with_intra_threads(threads).map_err(ort::Error::from))
        .and_then(|b| b.with_profiling(trace).map_err(ort::Error::from))
        .and_then(|mut b| b.commit_from_file(dir.join(file)))?;
    Ok(session)
}

fn step(session: &mut Session, kv: &mut KvCache, hidden: usize, n: usize) -> Result<f64> {
    let past = kv.len();
    let total = past + n;
    let embeds: Vec<f32> = (0..n * hidden).map(|i| ((i % 97) as f32 * 0.37).sin()).collect();
    let mask = vec![1i64; total];
    let positions: Vec<i64> = (past as i64..total as i64).collect();
    let keep = [1i64];
    let mut inputs: Vec<(Cow<'_, str>, SessionInputValue<'_>)> = vec![
        ("inputs_embeds".into(), TensorRef::from_array_view(([1usize, n, hidden], embeds.as_slice()))?.into()),
        ("attention_mask".into(), TensorRef::from_array_view(([1usize, total], mask.as_slice()))?.into()),
        ("position_ids".into(), TensorRef::from_array_view(([1usize, n], positions.as_slice()))?.into()),
        ("logits_to_keep".into(), TensorRef::from_array_view(([1usize], &keep[..]))?.into()),
    ];
    for (name, value) in kv.inputs() {
        inputs.push((name.into(), value.into()));
    }
    let t = Instant::now();
    let mut outputs = session.run(inputs)?;
    let elapsed = ms(t.elapsed());
    kv.update(&mut outputs, n)?;
    Ok(elapsed)
}

/// Profiles `plan.steps` decode steps of the engine's decoder at `plan.context`.
pub fn profile_decode(plan: &ProfilePlan) -> Result<ProfileReport> {
    let manifest = Manifest::load(&plan.engine)?;
    let dims = &manifest.model;
    if plan.context + plan.steps > manifest.max_sequence_length || plan.steps == 0 {
        return Err(BenchError::Plan(format!(
            "context {} + {} steps does not fit the engine's {} positions",
            plan.context, plan.steps, manifest.max_sequence_length
        )));
    }
    std::fs::create_dir_all(&plan.out_dir).map_err(|e| BenchError::io(&plan.out_dir, e))?;
    let decoder = &manifest.graphs.decoder;
    let mut s = session(&plan.engine, &decoder.file, plan.threads, &plan.out_dir.join("decoder"))?;
    let mut kv = KvCache::new(dims)?;
    if plan.context > 0 {
        step(&mut s, &mut kv, dims.text_hidden, plan.context)?;
    }
    let step_times: Vec<f64> =
        (0..plan.steps).map(|_| step(&mut s, &mut kv, dims.text_hidden, 1)).collect::<Result<_>>()?;
    let trace = PathBuf::from(s.end_profiling()?);
    let events: Vec<Event> = read_json(&trace)?;

    // Runs in order; the first is the prefill when there is one.
    let mut runs: Vec<(u64, u64)> =
        events.iter().filter(|e| e.cat == "Session" && e.name == "model_run").map(|e| (e.ts, e.ts + e.dur)).collect();
    runs.sort_unstable();
    let decode_runs: Vec<(u64, u64)> = runs.iter().rev().take(plan.steps).copied().collect();
    let in_decode = |ts: u64| decode_runs.iter().any(|(a, b)| ts >= *a && ts <= *b);
    let mut by_op: BTreeMap<String, (u64, usize)> = BTreeMap::new();
    let mut by_node: BTreeMap<String, (u64, usize)> = BTreeMap::new();
    for e in events.iter().filter(|e| e.cat == "Node" && e.name.ends_with("_kernel_time") && in_decode(e.ts)) {
        let op = e.args.get("op_name").and_then(|v| v.as_str()).unwrap_or("?").to_string();
        let entry = by_op.entry(op).or_default();
        entry.0 += e.dur;
        entry.1 += 1;
        let node = e.name.trim_end_matches("_kernel_time").to_string();
        let entry = by_node.entry(node).or_default();
        entry.0 += e.dur;
        entry.1 += 1;
    }
    let steps = plan.steps as f64;
    let kernel_us: u64 = by_op.values().map(|(d, _)| d).sum();
    let to_times = |m: BTreeMap<String, (u64, usize)>, top: usize| {
        let mut v: Vec<OpTime> = m
            .into_iter()
            .map(|(name, (dur, calls))| OpTime {
                name,
                ms_per_step: dur as f64 / 1000.0 / steps,
                share: dur as f64 / kernel_us.max(1) as f64,
                calls_per_step: calls as f64 / steps,
            })
            .collect();
        v.sort_by(|a, b| b.ms_per_step.total_cmp(&a.ms_per_step));
        v.truncate(top);
        v
    };
    let matmul_ms = by_op.get("MatMul").map(|(d, _)| *d as f64 / 1000.0 / steps);
    let weight_bytes = decoder.bytes + decoder.data.as_ref().map_or(0, |d| d.bytes);
    let run_us: u64 = decode_runs.iter().map(|(a, b)| b - a).sum();
    Ok(ProfileReport {
        engine: plan.engine.display().to_string(),
        context: plan.context,
        steps: plan.steps,
        step_ms: Summary::of(&step_times),
        kernel_ms_per_step: kernel_us as f64 / 1000.0 / steps,
        run_ms_per_step: run_us as f64 / 1000.0 / steps,
        by_op: to_times(by_op, usize::MAX),
        top_nodes: to_times(by_node, 15),
        matmul_weight_gbs: matmul_ms.filter(|m| *m > 0.0).map(|m| weight_bytes as f64 / (m * 1e-3) / 1e9),
        trace: trace.display().to_string(),
    })
}

/// A short text table of the profile.
pub fn format_profile(p: &ProfileReport) -> String {
    use std::fmt::Write as _;
    let mut out = String::new();
    let _ = writeln!(
        out,
        "{}: {} decode steps at context {}: wall {} ms/step, ONNX Runtime run {:.1} ms, kernels {:.1} ms",
        p.engine,
        p.steps,
        p.context,
        p.step_ms.map_or("?".into(), |s| format!("{:.1} [{:.1}–{:.1}]", s.median, s.min, s.max)),
        p.run_ms_per_step,
        p.kernel_ms_per_step
    );
    if let Some(gbs) = p.matmul_weight_gbs {
        let _ = writeln!(out, "MatMul kernels read the decoder's weights at {gbs:.1} GB/s");
    }
    let _ = writeln!(out, "\nby operator (ms/step, share, calls/step):");
    for o in &p.by_op {
        let _ = writeln!(
            out,
            "  {:<28} {:>8.2} {:>6.1}% {:>6.1}",
            o.name,
            o.ms_per_step,
            o.share * 100.0,
            o.calls_per_step
        );
    }
    let _ = writeln!(out, "\nslowest nodes:");
    for o in &p.top_nodes {
        let _ = writeln!(out, "  {:<60} {:>8.2} {:>6.1}%", o.name, o.ms_per_step, o.share * 100.0);
    }
    let _ = writeln!(out, "\ntrace: {}", p.trace);
    out
}
