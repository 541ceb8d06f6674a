//! What serving over HTTP costs: the same engine directory measured at several client counts
//! once through `vl-serve` (started in-process on 127.0.0.1, port 0; clients stream
//! server-sent events) and once directly on the serving engine ([`crate::concurrency`]), and the
//! time to first token of a follow-up about a video with and without the prefix cache.
//!
//! Figures come from the clients' side: an HTTP client timestamps each content chunk as it
//! reads it off the socket; the in-process client each token as it leaves the engine. Both time
//! only the tokens that come with text (the server sends no chunk for the others), and count
//! every token for the end-to-end throughput.
use std::future::Future;
use std::path::{Path, PathBuf};
use std::time::Instant;

use clap::Parser;
use serde::Serialize;
use serde_json::{Value, json};
use vl_serve::{Args, Server};

use crate::concurrency::{ConcurrencyPlan, Level, QUESTIONS, Stream, Timed, level, measure_concurrency};
use crate::{BenchError, Result};

/// What to measure.
#[derive(Debug, Clone)]
pub struct ServePlan {
    /// Engine directory.
    pub engine: PathBuf,
    /// Concurrent clients to try.
    pub clients: Vec<usize>,
    /// Tokens per answer (greedy, end-of-sequence ignored).
    pub new_tokens: usize,
    /// Intra-op threads.
    pub threads: usize,
    /// Prompt tokens prefilled per step.
    pub prefill_chunk_tokens: usize,
    /// A video for the follow-up measurement (`None`: not measured).
    pub video: Option<PathBuf>,
}

/// One client count, both ways.
#[derive(Debug, Clone, Serialize)]
pub struct ServeLevel {
    /// Concurrent clients.
    pub clients: usize,
    /// Through `vl-serve`, streaming over HTTP.
    pub http: Level,
    /// Directly on the engine.
    pub in_process: Level,
    /// HTTP's end-to-end tokens/s over the in-process one.
    pub end_to_end_ratio: f64,
    /// HTTP's aggregate decode tokens/s over the in-process one (`None` when either is unknown,
    /// or HTTP clients saw too few tokens one by one).
    pub throughput_ratio: Option<f64>,
    /// Tokens the HTTP clients saw one by one (content chunks).
    pub http_tokens_seen: usize,
    /// Tokens the server generated for them (its usage counts).
    pub http_tokens_generated: usize,
}

impl ServeLevel {
    /// Whether HTTP clients saw at least half the tokens one by one, so that the per-token
    /// figures (decode tokens/s, ms/token, first token, of tokens with text on both sides) are
    /// about most of the answer.
    pub fn http_timed(&self) -> bool {
        self.http_tokens_seen * 2 >= self.http_tokens_generated
    }
}

/// Time to first token of a follow-up that sends the whole conversation again. The follow-up's
/// answer is one token long, so that the time to the answer is the time to its first token
/// whatever the token's text; the first answer is two tokens long (one that ends at its first
/// token is kept in the prefix cache without its KV, which would measure nothing), and its
/// time is that of its first chunk with text or a finish reason.
#[derive(Debug, Clone, Serialize)]
pub struct FollowUpTtft {
    /// The video asked about.
    pub video: String,
    /// Prompt tokens of the first question.
    pub first_prompt_tokens: usize,
    /// Prompt tokens of the follow-up (the first question, its answer, the new question).
    pub follow_up_prompt_tokens: usize,
    /// Time to the first question's first chunk with text or a finish reason, prefix cache off
    /// (ms).
    pub first_ttft_ms_off: f64,
    /// Time to first token of the follow-up, prefix cache off (`--prefix-cache 0`; ms).
    pub follow_up_ttft_ms_off: f64,
    /// The same, prefix cache on (ms).
    pub first_ttft_ms_on: f64,
    /// Time to first token of the follow-up, prefix cache on (the default; ms).
    pub follow_up_ttft_ms_on: f64,
}

/// The whole measurement.
#[derive(Debug, Clone, Serialize)]
pub struct ServeReport {
    /// Engine measured.
    pub engine: String,
    /// Tokens per answer.
    pub new_tokens: usize,
    /// Intra-op threads.
    pub threads: usize,
    /// Each client count.
    pub levels: Vec<ServeLevel>,
    /// The follow-up measurement (when a video was given).
    pub follow_up: Option<FollowUpTtft>,
}

/// What one streamed HTTP answer brought.
struct Answer {
    /// Its content chunks' times (tokens whose text is empty, or not yet whole, send none),
    /// with the usage's token count and the time `[DONE]` came.
    stream: Stream,
    text: String,
    prompt_tokens: usize,
    /// When the first chunk with content or a finish reason came (with `max_tokens: 1`, the
    /// time to first token whatever the token's text).
    first_answer: Instant,
}

/// A server started in this process, and how to stop it.
struct Running {
    url: String,
    stop: tokio::sync::oneshot::Sender<()>,
    task: tokio::task::JoinHandle<std::result::Result<(), vl_serve::ServeError>>,
}

impl Running {
    /// Starts `vl-serve` with `flags` on 127.0.0.1, port 0.
    async fn start(engine: &Path, flags: &[String]) -> Result<Self> {
        let engine = engine.display().to_string();
        let argv = ["vl-serve", "--engine", &engine, "--host", "127.0.0.1", "--port", "0", "--shutdown-timeout", "5"];
        let argv = argv.iter().map(|s| s.to_string()).chain(flags.iter().cloned());
        let args = Args::try_parse_from(argv).map_err(|e| BenchError::Plan(format!("vl-serve arguments: {e}")))?;
        let server = Server::bind(&args).await?;
        let url = format!("http://{}", server.local_addr());
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(server.run_until(async move {
            let _ = stopped.await;
        }));
        Ok(Self { url, stop, task })
    }

    /// Stops the server and waits until it (and so its engine) is gone.
    async fn stop(self) -> Result<()> {
        let _ = self.stop.send(());
        self.task.await.map_err(|e| BenchError::Plan(format!("the server task failed: {e}")))??;
        Ok(())
    }
}

/// Streams one chat completion; every content chunk is a token, timed when read (the usage
/// says how many there were in all).
async fn ask(client: &reqwest::Client, url: &str, body: &Value) -> Result<Answer> {
    let submitted = Instant::now();
    let mut r = client.post(format!("{url}/v1/chat/completions")).json(body).send().await?;
    if !r.status().is_success() {
        let status = r.status();
        let text = r.text().await.unwrap_or_default();
        return Err(BenchError::Plan(format!("vl-serve answered {status}: {text}")));
    }
    let mut stream = Stream { submitted, tokens: Vec::new(), prefill_ms: 0.0, generated: 0, finished: submitted };
    let mut first_answer = None;
    let (mut pending, mut text, mut done) = (String::new(), String::new(), false);
    let (mut prompt_tokens, mut completion_tokens) = (0, 0);
    while let Some(bytes) = r.chunk().await? {
        let now = Instant::now();
        pending.push_str(&String::from_utf8_lossy(&bytes));
        // Events end with a blank line; a chunk may hold several, or part of one.
        while let Some(end) = pending.find("\n\n") {
            let event: String = pending.drain(..end + 2).collect();
            for data in event.lines().filter_map(|l| l.strip_prefix("data:")).map(str::trim) {
                if data == "[DONE]" {
                    done = true;
                    continue;
                }
                let v: Value = serde_json::from_str(data)
                    .map_err(|e| BenchError::Plan(format!("vl-serve sent an event that is not JSON ({e}): {data}")))?;
                if v.get("error").is_some() {
                    return Err(BenchError::Plan(format!("vl-serve failed mid-stream: {data}")));
                }
                let count = |field: &str| v["usage"][field].as_u64().and_then(|n| usize::try_from(n).ok());
                prompt_tokens = count("prompt_tokens").unwrap_or(prompt_tokens);
                completion_tokens = count("completion_tokens").unwrap_or(completion_tokens);
                if !v["choices"][0]["finish_reason"].is_null() {
                    first_answer.get_or_insert(now);
                }
                if let Some(piece) = v["choices"][0]["delta"]["content"].as_str().filter(|p| !p.is_empty()) {
                    stream.tokens.push(now);
                    first_answer.get_or_insert(now);
                    text.push_str(piece);
                }
            }
        }
    }
    if !done {
        return Err(BenchError::Plan("vl-serve's stream ended without [DONE]".into()));
    }
    stream.finished = Instant::now();
    stream.generated = completion_tokens;
    let first_answer = first_answer.unwrap_or(stream.finished);
    Ok(Answer { stream, text, prompt_tokens, first_answer })
}

/// A greedy streamed request of `tokens` tokens about `messages`.
fn body(messages: Value, tokens: usize) -> Value {
    json!({
        "messages": messages,
        "max_tokens": tokens,
        "temperature": 0,
        "ignore_eos": true,
        "stream": true,
        "stream_options": {"include_usage": true},
    })
}

fn text_body(i: usize, tokens: usize) -> Value {
    body(json!([{"role": "user", "content": QUESTIONS[i % QUESTIONS.len()]}]), tokens)
}

/// The client counts through HTTP: the same requests, warm-up and engine settings as
/// [`measure_concurrency`], with the prefix cache off so that both do the same work.
async fn http_levels(plan: &ServePlan, log: &dyn Fn(&str)) -> Result<Vec<(Level, usize, usize)>> {
    let most = plan.clients.iter().copied().max().unwrap_or(1).max(8);
    let flags = [
        format!("--max-active={most}"),
        format!("--slots={}", most + 1),
        format!("--threads={}", plan.threads),
        format!("--prefill-chunk={}", plan.prefill_chunk_tokens),
        "--prefix-cache=0".to_string(),
    ];
    let server = Running::start(&plan.engine, &flags).await?;
    let client = reqwest::Client::new();
    ask(&client, &server.url, &text_body(0, 4)).await?;
    let mut levels = Vec::new();
    for &n in &plan.clients {
        let tasks: Vec<_> = (0..n)
            .map(|i| {
                let (client, url, body) = (client.clone(), server.url.clone(), text_body(i, plan.new_tokens));
                tokio::spawn(async move { ask(&client, &url, &body).await })
            })
            .collect();
        let (mut streams, mut generated) = (Vec::new(), 0);
        for t in tasks {
            let answer = t.await.map_err(|e| BenchError::Plan(format!("a client task failed: {e}")))??;
            generated += answer.stream.generated;
            streams.push(answer.stream);
        }
        let seen: usize = streams.iter().map(|s| s.tokens.len()).sum();
        let l = level(&streams);
        log(&format!(
            "HTTP {n:>2} clients: {:.1} tokens/s end to end; {seen} of {generated} tokens seen one by one: {} tokens/s together, {:.1} ms/token (p95 {:.1}), first token p50 {:.0} ms",
            l.end_to_end_tokens_per_s,
            l.aggregate_tokens_per_s.map_or("-".to_string(), |t| format!("{t:.1}")),
            l.ms_per_token_p50,
            l.ms_per_token_p95,
            l.ttft_ms_p50
        ));
        levels.push((l, seen, generated));
    }
    drop(client);
    server.stop().await?;
    Ok(levels)
}

/// A question about `video`, then a follow-up carrying it and its answer, on a server with
/// `prefix_cache` conversations kept; the two times to first token and prompt lengths.
async fn follow_up_once(plan: &ServePlan, video: &Path, prefix_cache: usize) -> Result<[(f64, usize); 2]> {
    let video = std::fs::canonicalize(video).map_err(|e| BenchError::io(video, e))?;
    let root = video.parent().ok_or_else(|| BenchError::Plan(format!("{} has no directory", video.display())))?;
    let flags = [
        format!("--media-root={}", root.display()),
        format!("--threads={}", plan.threads),
        format!("--prefill-chunk={}", plan.prefill_chunk_tokens),
        format!("--prefix-cache={prefix_cache}"),
    ];
    let server = Running::start(&plan.engine, &flags).await?;
    let client = reqwest::Client::new();
    let first_message = json!({"role": "user", "content": [
        {"type": "video_url", "video_url": {"url": format!("file://{}", video.display())}},
        {"type": "text", "text": "What is happening in this video?"},
    ]});
    let first = ask(&client, &server.url, &body(json!([first_message]), 2)).await?;
    let messages = json!([
        first_message,
        {"role": "assistant", "content": first.text},
        {"role": "user", "content": "And what happens next?"},
    ]);
    let follow = ask(&client, &server.url, &body(messages, 1)).await?;
    drop(client);
    server.stop().await?;
    let ttft = |a: &Answer| vl_runtime::generate::ms(a.first_answer - a.stream.submitted);
    Ok([(ttft(&first), first.prompt_tokens), (ttft(&follow), follow.prompt_tokens)])
}

async fn follow_up(plan: &ServePlan, video: &Path, log: &dyn Fn(&str)) -> Result<FollowUpTtft> {
    let [(first_off, first_prompt), (follow_off, follow_prompt)] = follow_up_once(plan, video, 0).await?;
    log(&format!("prefix cache off: first question {first_off:.0} ms to first token, follow-up {follow_off:.0} ms"));
    let [(first_on, _), (follow_on, _)] = follow_up_once(plan, video, 16).await?;
    log(&format!("prefix cache on:  first question {first_on:.0} ms to first token, follow-up {follow_on:.0} ms"));
    Ok(FollowUpTtft {
        video: video.display().to_string(),
        first_prompt_tokens: first_prompt,
        follow_up_prompt_tokens: follow_prompt,
        first_ttft_ms_off: first_off,
        follow_up_ttft_ms_off: follow_off,
        first_ttft_ms_on: first_on,
        follow_up_ttft_ms_on: follow_on,
    })
}

/// Runs `f` on a fresh multi-threaded tokio runtime (the server's and the clients').
fn on_runtime<T>(f: impl Future<Output = Result<T>>) -> Result<T> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(|source| BenchError::Spawn { what: "a tokio runtime".into(), source })?;
    runtime.block_on(f)
}

/// Runs the plan; `log` gets one line per level and way.
pub fn measure_serve(plan: &ServePlan, log: &dyn Fn(&str)) -> Result<ServeReport> {
    let concurrency = ConcurrencyPlan {
        engine: plan.engine.clone(),
        streams: plan.clients.clone(),
        new_tokens: plan.new_tokens,
        video: None,
        device: vl_runtime::Device::Cpu,
        threads: plan.threads,
        prefill_chunk_tokens: plan.prefill_chunk_tokens,
        timed: Timed::WithText,
    };
    let in_process = measure_concurrency(&concurrency, &|line| log(&format!("in-process {line}")))?.levels;
    let http = on_runtime(http_levels(plan, log))?;
    let levels = http
        .into_iter()
        .zip(in_process)
        .map(|((http, seen, generated), in_process)| {
            let mut l = ServeLevel {
                clients: http.streams,
                end_to_end_ratio: http.end_to_end_tokens_per_s / in_process.end_to_end_tokens_per_s,
                throughput_ratio: http
                    .aggregate_tokens_per_s
                    .zip(in_process.aggregate_tokens_per_s)
                    .map(|(h, i)| h / i),
                http,
                in_process,
                http_tokens_seen: seen,
                http_tokens_generated: generated,
            };
            if !l.http_timed() {
                l.throughput_ratio = None;
            }
            l
        })
        .collect();
    let follow_up = match &plan.video {
        Some(video) => Some(on_runtime(follow_up(plan, video, log))?),
        None => None,
    };
    Ok(ServeReport {
        engine: plan.engine.display().to_string(),
        new_tokens: plan.new_tokens,
        threads: plan.threads,
        levels,
        follow_up,
    })
}

fn tokens_per_s(t: Option<f64>) -> String {
    t.map_or("-".to_string(), |t| format!("{t:.1}"))
}

/// The report as Markdown tables (the README's). Per-token figures are left out ("-") where
/// HTTP clients saw fewer than half the tokens.
pub fn markdown(r: &ServeReport) -> String {
    let mut s = String::from(
        "| clients | end-to-end tokens/s HTTP / in-process | HTTP ÷ in-process | decode tokens/s, all decoding: HTTP / in-process | HTTP ÷ in-process | first token p50 / p95 (ms): HTTP | in-process | ms/token p50 / p95: HTTP | in-process |\n\
         |---:|---:|---:|---:|---:|---:|---:|---:|---:|\n",
    );
    for l in &r.levels {
        let (h, i) = (&l.http, &l.in_process);
        let timed = l.http_timed();
        let pair = |timed: bool, a: f64, b: f64, digits: usize| {
            if timed { format!("{a:.digits$} / {b:.digits$}") } else { "-".to_string() }
        };
        s += &format!(
            "| {} | {:.1} / {:.1} | {:.3} | {} / {} | {} | {} | {} | {} | {} |\n",
            l.clients,
            h.end_to_end_tokens_per_s,
            i.end_to_end_tokens_per_s,
            l.end_to_end_ratio,
            if timed { tokens_per_s(h.aggregate_tokens_per_s) } else { "-".to_string() },
            if timed { tokens_per_s(i.aggregate_tokens_per_s) } else { "-".to_string() },
            l.throughput_ratio.map_or("-".to_string(), |x| format!("{x:.3}")),
            pair(timed, h.ttft_ms_p50, h.ttft_ms_p95, 0),
            pair(timed, i.ttft_ms_p50, i.ttft_ms_p95, 0),
            pair(timed, h.ms_per_token_p50, h.ms_per_token_p95, 1),
            pair(timed, i.ms_per_token_p50, i.ms_per_token_p95, 1),
        );
    }
    if let Some(f) = &r.follow_up {
        s += &format!(
            "\n| prefix cache | first question ({} prompt tokens): first chunk (ms) | follow-up ({} prompt tokens): first token (ms) |\n\
             |---|---:|---:|\n\
             | off (`--prefix-cache 0`) | {:.0} | {:.0} |\n\
             | on (default) | {:.0} | {:.0} |\n",
            f.first_prompt_tokens,
            f.follow_up_prompt_tokens,
            f.first_ttft_ms_off,
            f.follow_up_ttft_ms_off,
            f.first_ttft_ms_on,
            f.follow_up_ttft_ms_on,
        );
    }
    s
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn level(streams: usize, tokens_per_s: Option<f64>) -> Level {
        Level {
            streams,
            aggregate_tokens_per_s: tokens_per_s,
            ms_per_token_p50: 10.0,
            ms_per_token_p95: 12.0,
            ttft_ms_p50: 100.0,
            ttft_ms_p95: 120.0,
            end_to_end_tokens_per_s: 10.0,
        }
    }

    #[test]
    fn markdown_has_a_row_per_level_and_the_ratio() {
        let r = ServeReport {
            engine: "e".into(),
            new_tokens: 32,
            threads: 2,
            levels: vec![
                ServeLevel {
                    clients: 4,
                    http: level(4, Some(19.0)),
                    in_process: level(4, Some(20.0)),
                    end_to_end_ratio: 0.99,
                    throughput_ratio: Some(0.95),
                    http_tokens_seen: 128,
                    http_tokens_generated: 128,
                },
                ServeLevel {
                    clients: 8,
                    http: level(8, Some(1.0)),
                    in_process: level(8, Some(1.0)),
                    end_to_end_ratio: 0.98,
                    throughput_ratio: None,
                    http_tokens_seen: 10,
                    http_tokens_generated: 256,
                },
            ],
            follow_up: None,
        };
        let md = markdown(&r);
        assert!(md.contains("| 4 | 10.0 / 10.0 | 0.990 | 19.0 / 20.0 | 0.950 | 100 / 120 |"), "{md}");
        assert!(md.contains("| 8 | 10.0 / 10.0 | 0.980 | - / - | - | - | - | - | - |"), "{md}");
        assert!(!md.contains("prefix cache"));
    }
}
