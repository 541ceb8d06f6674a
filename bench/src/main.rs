//! `vl-bench`: vl against the PyTorch baseline on the same checkpoint, pixel values, prompt and
//! thread count, with the machine's bandwidth and GEMM limits measured in the same run.
//!
//! `vl-bench run` does everything (`make bench` calls it); `engine` measures one engine (run
//! as a child, so its peak memory is its own); `report` rebuilds the report from `raw/`;
//! `profile` shows where a decode step's time goes.
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand, ValueEnum};
use vl_bench::concurrency::{ConcurrencyPlan, Timed, measure_concurrency};
use vl_bench::driver::{self, RunPlan, ScalingChoice};
use vl_bench::measure::{EnginePlan, ScalingPlan, measure_engine};
use vl_bench::profile::{ProfilePlan, format_profile, profile_decode};
use vl_bench::serve::{ServePlan, measure_serve};
use vl_bench::write_json;

#[derive(Parser)]
#[command(version, about = "Benchmark vl engines against the PyTorch baseline")]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Clone, Copy, ValueEnum)]
enum ScalingArg {
    None,
    First,
    All,
}

#[derive(clap::Args, Clone)]
struct Curves {
    /// Frame counts for vision time against frames.
    #[arg(long, value_delimiter = ',', default_value = "1,2,4,8")]
    scaling_frames: Vec<usize>,
    /// Text-only prompt lengths for prefill time against prompt length.
    #[arg(long, value_delimiter = ',', default_value = "128,256,512,1024,2048")]
    prefill_lengths: Vec<usize>,
    /// Contexts for decode time against context (default: 512 to the engine's maximum).
    #[arg(long, value_delimiter = ',')]
    decode_contexts: Vec<usize>,
    /// Decode steps per context (median kept).
    #[arg(long, default_value_t = 8)]
    decode_steps: usize,
}

impl Curves {
    fn plan(&self) -> ScalingPlan {
        ScalingPlan {
            frames: self.scaling_frames.clone(),
            prefill_lengths: self.prefill_lengths.clone(),
            decode_contexts: self.decode_contexts.clone(),
            decode_steps: self.decode_steps,
        }
    }
}

#[derive(Subcommand)]
enum Cmd {
    /// Everything: inputs, limits, the baseline, each engine, report and plot.
    Run {
        /// The checkpoint (the baseline runs it; FLOPs come from its config.json).
        #[arg(long, default_value = "work/vl7b-slice")]
        model: PathBuf,
        /// Engine directories to measure, comma-separated; those not built are skipped.
        #[arg(long, value_delimiter = ',', default_value = "engines/vl7b-slice")]
        engines: Vec<PathBuf>,
        /// Output directory.
        #[arg(long, default_value = "bench")]
        out: PathBuf,
        /// Directory for the shared inputs (clip, pixel values, prompt ids).
        #[arg(long, default_value = "work/bench")]
        work: PathBuf,
        /// Python with torch + transformers (the baseline and the limits).
        #[arg(long, default_value = ".oracle/bin/python")]
        python: PathBuf,
        /// Skip the baseline and the limits.
        #[arg(long)]
        no_torch: bool,
        /// The Python half.
        #[arg(long, default_value = "tools/bench_torch.py")]
        script: PathBuf,
        /// Intra-op threads for every system.
        #[arg(long, default_value_t = 2)]
        threads: usize,
        /// Measured answers per engine.
        #[arg(long, default_value_t = 5)]
        reps: usize,
        /// Warm-up answers per system.
        #[arg(long, default_value_t = 1)]
        warmup: usize,
        /// Measured answers of the PyTorch baseline.
        #[arg(long, default_value_t = 3)]
        torch_reps: usize,
        /// Measured decode + preprocessing runs.
        #[arg(long, default_value_t = 5)]
        preprocess_reps: usize,
        /// Tokens per answer.
        #[arg(long, default_value_t = 64)]
        new_tokens: usize,
        /// Frames of the clip (default: the engine's).
        #[arg(long)]
        frames: Option<usize>,
        /// The question.
        #[arg(long, default_value = "What is happening in this video?")]
        question: String,
        /// Which systems get the scaling curves.
        #[arg(long, value_enum, default_value_t = ScalingArg::First)]
        scaling: ScalingArg,
        #[command(flatten)]
        curves: Curves,
        /// Wall-clock budget for the run (engines' repetitions are cut to fit).
        #[arg(long, default_value_t = 780)]
        budget_s: u64,
        /// Or an absolute end (Unix seconds), e.g. 14 minutes after `make bench` started, so that
        /// installing and exporting count against it.
        #[arg(long)]
        deadline_unix: Option<u64>,
        /// Smoke test: 1 repetition, no warm-up, 8 tokens, 2 frames, short curves; the outputs
        /// say the numbers are noisy. Overrides the counts above.
        #[arg(long)]
        smoke: bool,
    },
    /// Measures one engine and writes its raw JSON (what `run` starts for each engine).
    Engine {
        /// Engine directory.
        #[arg(long)]
        engine: PathBuf,
        /// Pixel values `.npy`.
        #[arg(long)]
        pixels: PathBuf,
        /// The clip.
        #[arg(long)]
        video: PathBuf,
        /// The question.
        #[arg(long, default_value = "What is happening in this video?")]
        question: String,
        /// Intra-op threads.
        #[arg(long, default_value_t = 2)]
        threads: usize,
        /// Warm-up answers.
        #[arg(long, default_value_t = 1)]
        warmup: usize,
        /// Tokens per warm-up answer.
        #[arg(long, default_value_t = 4)]
        warmup_tokens: usize,
        /// Measured answers.
        #[arg(long, default_value_t = 5)]
        reps: usize,
        /// Seconds for the measured answers and curves.
        #[arg(long)]
        budget_s: Option<u64>,
        /// Measured decode + preprocessing runs.
        #[arg(long, default_value_t = 5)]
        preprocess_reps: usize,
        /// Tokens per answer.
        #[arg(long, default_value_t = 64)]
        new_tokens: usize,
        /// Frame counts for the curves (none: no curves).
        #[arg(long, value_delimiter = ',')]
        scaling_frames: Vec<usize>,
        /// Prefill lengths for the curves.
        #[arg(long, value_delimiter = ',')]
        prefill_lengths: Vec<usize>,
        /// Decode contexts for the curves.
        #[arg(long, value_delimiter = ',')]
        decode_contexts: Vec<usize>,
        /// Decode steps per context.
        #[arg(long, default_value_t = 8)]
        decode_steps: usize,
        /// Output JSON.
        #[arg(long)]
        out: PathBuf,
    },
    /// Rebuilds results.json and results.md from `OUT/raw/`.
    Report {
        /// Output directory of a run.
        #[arg(long, default_value = "bench")]
        out: PathBuf,
    },
    /// Profiles decode steps of an engine's decoder with ONNX Runtime's profiler.
    Profile {
        /// Engine directory.
        #[arg(long, default_value = "engines/vl7b-slice")]
        engine: PathBuf,
        /// Intra-op threads.
        #[arg(long, default_value_t = 2)]
        threads: usize,
        /// Cache positions before the profiled steps.
        #[arg(long, default_value_t = 2079)]
        context: usize,
        /// Profiled steps.
        #[arg(long, default_value_t = 8)]
        steps: usize,
        /// Where the trace and the summary go.
        #[arg(long, default_value = "bench/profile")]
        out: PathBuf,
    },
    /// Many conversations at once through the serving engine: aggregate tokens/s, per-stream
    /// ms/token, time to first token, and the delay a video prompt's prefill adds to others.
    Concurrency {
        /// Engine directory (target onnxruntime batches decode steps).
        #[arg(long, default_value = "engines/vl7b-slice-ort")]
        engine: PathBuf,
        /// Concurrent conversations to measure.
        #[arg(long, value_delimiter = ',', default_value = "1,2,4,8,16")]
        streams: Vec<usize>,
        /// Tokens per answer.
        #[arg(long, default_value_t = 32)]
        new_tokens: usize,
        /// A video for video prompts; without it, text prompts.
        #[arg(long)]
        video: Option<PathBuf>,
        /// cpu, cuda[:N], tensorrt[:N], tensorrt-rtx[:N] or auto.
        #[arg(long, default_value = "cpu")]
        device: vl_runtime::Device,
        /// Intra-op threads.
        #[arg(long, default_value_t = 2)]
        threads: usize,
        /// Prompt tokens prefilled per engine step.
        #[arg(long, default_value_t = 512)]
        prefill_chunk_tokens: usize,
        /// Output JSON.
        #[arg(long, default_value = "bench/concurrency.json")]
        out: PathBuf,
    },
    /// What serving over HTTP costs: aggregate decode tokens/s, time to first token and
    /// ms/token through `vl-serve` (in-process, 127.0.0.1) and directly on the engine, at each
    /// client count; and a follow-up's time to first token with and without the prefix cache.
    Serve {
        /// Engine directory (target onnxruntime batches decode steps). HTTP clients time the
        /// tokens that come with text: vl7b-slice's synthetic tokenizer covers 664 of its 32,064
        /// ids, so there only end-to-end throughput compares.
        #[arg(long, default_value = "engines/vl7b-slice-ort")]
        engine: PathBuf,
        /// Concurrent clients to measure.
        #[arg(long, value_delimiter = ',', default_value = "1,4,8,16")]
        clients: Vec<usize>,
        /// Tokens per answer.
        #[arg(long, default_value_t = 32)]
        new_tokens: usize,
        /// Intra-op threads.
        #[arg(long, default_value_t = 2)]
        threads: usize,
        /// Prompt tokens prefilled per engine step.
        #[arg(long, default_value_t = 512)]
        prefill_chunk_tokens: usize,
        /// A video for the follow-up measurement; without it, none.
        #[arg(long)]
        video: Option<PathBuf>,
        /// Output JSON.
        #[arg(long, default_value = "bench/serve.json")]
        out: PathBuf,
    },
}

fn log(line: &str) {
    eprintln!("{line}");
}

fn run() -> Result<()> {
    let command_line = std::env::args().collect::<Vec<_>>().join(" ");
    match Cli::parse().command {
        Cmd::Run {
            model,
            engines,
            out,
            work,
            python,
            no_torch,
            script,
            threads,
            reps,
            warmup,
            torch_reps,
            preprocess_reps,
            new_tokens,
            frames,
            question,
            scaling,
            curves,
            budget_s,
            deadline_unix,
            smoke,
        } => {
            let budget = match deadline_unix {
                Some(end) => {
                    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH)?.as_secs();
                    Duration::from_secs(end.saturating_sub(now))
                }
                None => Duration::from_secs(budget_s),
            };
            let mut plan = RunPlan {
                model,
                engines,
                out,
                work,
                python: (!no_torch).then_some(python),
                script,
                exe: std::env::current_exe().context("finding this executable")?,
                threads,
                reps,
                warmup,
                torch_reps,
                preprocess_reps,
                new_tokens,
                frames,
                question,
                scaling: match scaling {
                    ScalingArg::None => ScalingChoice::None,
                    ScalingArg::First => ScalingChoice::First,
                    ScalingArg::All => ScalingChoice::All,
                },
                curves: curves.plan(),
                budget,
                smoke,
                command: command_line,
            };
            if smoke {
                plan = RunPlan {
                    reps: 1,
                    warmup: 0,
                    torch_reps: 1,
                    preprocess_reps: 1,
                    new_tokens: 8,
                    frames: Some(plan.frames.unwrap_or(2)),
                    curves: ScalingPlan {
                        frames: vec![1, 2],
                        prefill_lengths: vec![128, 512],
                        decode_contexts: vec![512, 1024],
                        decode_steps: 3,
                    },
                    ..plan
                };
            }
            let report = driver::run(&plan, &log)?;
            println!("{}", vl_bench::report::markdown(&report));
            println!("wrote {0}/results.json, {0}/results.md, {0}/bench.png", plan.out.display());
        }
        Cmd::Engine {
            engine,
            pixels,
            video,
            question,
            threads,
            warmup,
            warmup_tokens,
            reps,
            budget_s,
            preprocess_reps,
            new_tokens,
            scaling_frames,
            prefill_lengths,
            decode_contexts,
            decode_steps,
            out,
        } => {
            let scaling = (!scaling_frames.is_empty()).then_some(ScalingPlan {
                frames: scaling_frames,
                prefill_lengths,
                decode_contexts,
                decode_steps,
            });
            let plan = EnginePlan {
                engine,
                pixels,
                video,
                question,
                threads,
                warmup,
                warmup_tokens,
                reps,
                budget: budget_s.map(Duration::from_secs),
                preprocess_reps,
                new_tokens,
                scaling,
            };
            let run = measure_engine(&plan, &log).with_context(|| format!("measuring {}", plan.engine.display()))?;
            write_json(&out, &run)?;
        }
        Cmd::Report { out } => {
            let report = driver::write_report(&out)?;
            println!("{}", vl_bench::report::markdown(&report));
        }
        Cmd::Profile { engine, threads, context, steps, out } => {
            let plan = ProfilePlan { engine, threads, context, steps, out_dir: out.clone() };
            let p = profile_decode(&plan)?;
            let text = format_profile(&p);
            write_json(&out.join("decode_profile.json"), &p)?;
            std::fs::write(out.join("decode_profile.txt"), &text).context("writing the profile summary")?;
            print!("{text}");
        }
        Cmd::Concurrency { engine, streams, new_tokens, video, device, threads, prefill_chunk_tokens, out } => {
            let timed = Timed::Every;
            let plan =
                ConcurrencyPlan { engine, streams, new_tokens, video, device, threads, prefill_chunk_tokens, timed };
            let report = measure_concurrency(&plan, &|line| eprintln!("{line}"))?;
            write_json(&out, &report)?;
            println!("wrote {}", out.display());
        }
        Cmd::Serve { engine, clients, new_tokens, threads, prefill_chunk_tokens, video, out } => {
            let plan = ServePlan { engine, clients, new_tokens, threads, prefill_chunk_tokens, video };
            let report = measure_serve(&plan, &log)?;
            write_json(&out, &report)?;
            print!("{}", vl_bench::serve::markdown(&report));
            println!("wrote {}", out.display());
        }
    }
    Ok(())
}

/// Errors are printed as one chain (`error: what: why`), without a backtrace, and exit with 1.
fn main() -> std::process::ExitCode {
    vl_runtime::exit::exit_code(run())
}
