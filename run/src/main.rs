//! `vl-run`: ask a Video-LLaVA engine about a video, an image or pixel values; streams the answer.
//!
//! A thin binary over `vl-runtime`'s public API: it parses flags (clap), shows a spinner
//! (indicatif) and prints; it holds no logic of its own. Its end-to-end tests (`tests/cli.rs`)
//! live here so that cargo builds the binary they run.
use std::io::{BufRead, Write};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use clap::Parser;
use serde_json::json;
use vl_runtime::sampling::SamplingParams;
use vl_runtime::video::DecodeOptions;
use vl_runtime::{
    Answer, Device, Flow, GenerateOptions, Media, Pipeline, PipelineOptions, SessionOptions, TokenEvent, Verify,
};

#[derive(Parser)]
#[command(version, about = "Answer questions about a video with a Video-LLaVA engine exported by vl-export")]
struct Cli {
    /// Engine directory written by `vl-export build`.
    #[arg(long, env = "VL_ENGINE")]
    engine: PathBuf,
    /// Video file (mp4, mkv, webm, avi, mov, gif).
    #[arg(long, conflicts_with_all = ["image", "pixel_values"])]
    video: Option<PathBuf>,
    /// Image file (jpg, png, webp).
    #[arg(long, conflicts_with = "pixel_values")]
    image: Option<PathBuf>,
    /// Preprocessed video pixel values, float32 [frames, 3, H, W] or [1, frames, 3, H, W] (.npy).
    #[arg(long)]
    pixel_values: Option<PathBuf>,
    /// The question; without it, an interactive chat on stdin.
    #[arg(long)]
    prompt: Option<String>,
    /// Most tokens per answer.
    #[arg(long, default_value_t = 256)]
    max_new_tokens: usize,
    /// Sampling temperature (0 = greedy).
    #[arg(long, default_value_t = 0.0)]
    temperature: f32,
    /// Nucleus sampling threshold (1 = off).
    #[arg(long, default_value_t = 1.0)]
    top_p: f32,
    /// Keep the k most likely tokens (0 = off).
    #[arg(long, default_value_t = 0)]
    top_k: usize,
    /// Penalty for repeated tokens (1 = off).
    #[arg(long, default_value_t = 1.0)]
    repetition_penalty: f32,
    /// OpenAI's frequency penalty, in [-2, 2]: per time a token is in the answer (0 = off).
    #[arg(long, default_value_t = 0.0, allow_negative_numbers = true)]
    frequency_penalty: f32,
    /// OpenAI's presence penalty, in [-2, 2]: once for each token in the answer (0 = off).
    #[arg(long, default_value_t = 0.0, allow_negative_numbers = true)]
    presence_penalty: f32,
    /// Random seed for sampling.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Stop when the answer contains this text (repeatable).
    #[arg(long)]
    stop: Vec<String>,
    /// Generate past end-of-sequence until --max-new-tokens (for benchmarks).
    #[arg(long)]
    ignore_eos: bool,
    /// Where to run: cpu, cuda[:N], tensorrt[:N], tensorrt-rtx[:N] or auto (CUDA when usable, else the CPU;
    /// --stats says which).
    #[arg(long, default_value = "cpu")]
    device: Device,
    /// GPU ordinal (same as --device cuda:N).
    #[arg(long, default_value_t = 0)]
    device_id: i32,
    /// Intra-op threads (default: one per core).
    #[arg(long, env = "VL_THREADS")]
    threads: Option<usize>,
    /// Seconds ffmpeg may take to read the video or image before it is stopped.
    #[arg(long, default_value_t = 60)]
    decode_timeout: u64,
    /// Rehash every graph file instead of trusting the verification cache.
    #[arg(long)]
    verify_all: bool,
    /// One JSON object per line: tokens as they come, then the answer with timings.
    #[arg(long)]
    json: bool,
    /// Print timings and peak memory after each answer (stderr).
    #[arg(long)]
    stats: bool,
}

fn print_stats(answer: &Answer) {
    let t = &answer.timings;
    let rss = vl_runtime::memory::peak_rss_mb().map(|m| format!("{m:.0} MB")).unwrap_or_else(|| "n/a".into());
    eprintln!(
        "[stats] preprocess {:.1} ms | vision {:.1} ms | prefill {:.1} ms | time to first token {:.1} ms | \
         {:.2} ms/token ({:.1} tokens/s, {} tokens) | peak RSS {rss}",
        t.preprocess_ms,
        t.vision_ms,
        t.prefill_ms,
        t.time_to_first_token_ms,
        t.ms_per_token(),
        t.tokens_per_second(),
        answer.token_ids.len()
    );
}

fn run() -> Result<()> {
    let cli = Cli::parse();
    let device = match (cli.device, cli.device_id) {
        (device, 0) => device,
        (Device::Cuda { .. }, id) => Device::Cuda { device_id: id },
        (Device::TensorRt { .. }, id) => Device::TensorRt { device_id: id },
        (Device::TensorRtRtx { .. }, id) => Device::TensorRtRtx { device_id: id },
        (device, id) => anyhow::bail!("--device-id {id} given for --device {device}, which has no GPU ordinal"),
    };
    let options = PipelineOptions {
        session: SessionOptions { device, threads: cli.threads, ..SessionOptions::default() },
        verify: if cli.verify_all { Verify::Always } else { Verify::Cached },
        decode: DecodeOptions { timeout: Duration::from_secs(cli.decode_timeout), ..DecodeOptions::default() },
        ..PipelineOptions::default()
    };
    let spinner = loading_spinner();
    let pipeline = Pipeline::load(&cli.engine, options)
        .with_context(|| format!("loading the engine in {}", cli.engine.display()))?;
    spinner.finish_and_clear();
    if cli.stats || cli.device == Device::Auto {
        let chosen = pipeline.device();
        eprintln!("[device] {} ({})", chosen.device, chosen.reason);
    }
    let media = match (&cli.video, &cli.image, &cli.pixel_values) {
        (Some(v), _, _) => Media::VideoFile(v.clone()),
        (_, Some(i), _) => Media::ImageFile(i.clone()),
        (_, _, Some(p)) => Media::PixelValuesFile(p.clone()),
        _ => Media::Text,
    };
    let generate = GenerateOptions {
        sampling: SamplingParams {
            temperature: cli.temperature,
            top_k: cli.top_k,
            top_p: cli.top_p,
            repetition_penalty: cli.repetition_penalty,
            frequency_penalty: cli.frequency_penalty,
            presence_penalty: cli.presence_penalty,
            seed: cli.seed,
        },
        max_new_tokens: cli.max_new_tokens,
        stop: cli.stop.clone(),
        ignore_eos: cli.ignore_eos,
    };
    let mut chat = pipeline.conversation(media)?;
    let Some(prompt) = &cli.prompt else {
        eprintln!("Ask about the input; an empty line or end of input quits.");
        return interactive(&mut chat, &generate, &cli);
    };
    let answer = ask(&mut chat, prompt, &generate, cli.json)?;
    if cli.stats {
        print_stats(&answer);
    }
    Ok(())
}

/// Answers the lines of stdin until an empty one or its end. A line that is not UTF-8, or a
/// question the engine refuses (too long, a placeholder in it), is reported on stderr and
/// skipped; the conversation goes on as it was.
fn interactive(chat: &mut vl_runtime::Conversation<'_>, generate: &GenerateOptions, cli: &Cli) -> Result<()> {
    for (n, line) in std::io::stdin().lock().split(b'\n').enumerate() {
        let line = line.context("reading stdin")?;
        let line = line.strip_suffix(b"\r").unwrap_or(&line);
        let Ok(question) = std::str::from_utf8(line) else {
            eprintln!("vl-run: line {} of the input is not valid UTF-8; skipped", n + 1);
            continue;
        };
        if question.trim().is_empty() {
            break;
        }
        let answer = match ask(chat, question, generate, cli.json) {
            Ok(answer) => answer,
            Err(e) if refused_question(&e) => {
                eprintln!("vl-run: {e}; ask another question");
                continue;
            }
            Err(e) => return Err(e),
        };
        if cli.stats {
            print_stats(&answer);
        }
    }
    Ok(())
}

/// Whether `e` refuses the question itself (before any work), leaving the conversation usable.
fn refused_question(e: &anyhow::Error) -> bool {
    matches!(
        e.downcast_ref::<vl_runtime::Error>(),
        Some(vl_runtime::Error::Request(_) | vl_runtime::Error::ContextOverflow { .. })
    )
}

fn ask(
    chat: &mut vl_runtime::Conversation<'_>,
    question: &str,
    opts: &GenerateOptions,
    as_json: bool,
) -> Result<Answer> {
    let mut out = std::io::stdout().lock();
    let mut write_err: Option<std::io::Error> = None;
    let mut on_token = |t: TokenEvent<'_>| {
        let res = if as_json {
            writeln!(out, "{}", json!({"token": t.id, "text": t.text}))
        } else {
            write!(out, "{}", t.text).and_then(|_| out.flush())
        };
        match res {
            Ok(()) => Flow::Continue,
            Err(e) => {
                write_err = Some(e);
                Flow::Stop
            }
        }
    };
    let answer = chat.ask(question, opts, &mut on_token)?;
    if let Some(e) = write_err {
        bail!("writing the answer: {e}");
    }
    let mut out = std::io::stdout().lock();
    if as_json {
        writeln!(
            out,
            "{}",
            json!({"answer": answer.text, "token_ids": answer.token_ids, "finish": answer.finish, "timings": answer.timings, "peak_rss_mb": vl_runtime::memory::peak_rss_mb()})
        )?;
    } else {
        writeln!(out)?;
    }
    Ok(answer)
}

fn loading_spinner() -> Arc<indicatif::ProgressBar> {
    if !std::io::IsTerminal::is_terminal(&std::io::stderr()) {
        return Arc::new(indicatif::ProgressBar::hidden());
    }
    let bar = indicatif::ProgressBar::new_spinner().with_message("loading the engine");
    bar.enable_steady_tick(std::time::Duration::from_millis(120));
    Arc::new(bar)
}

/// Errors are printed as one chain (`error: what: why`), without a backtrace, and exit with 1.
fn main() -> std::process::ExitCode {
    vl_runtime::exit::exit_code(run())
}
