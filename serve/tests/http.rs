//! The server over HTTP: the tiny fixture engine (in-place decoder, batched) served in-process
//! on port 0 and driven with reqwest; the binary's start-up line; refusals as OpenAI's error
//! object with the right statuses.
#![allow(clippy::unwrap_used)]

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use clap::Parser;
use serde_json::{Value, json};
use vl_runtime::manifest::Target;
use vl_serve::{Args, Server};

fn engine_dir() -> String {
    vl_e2e::built_for("tiny", Some(Target::OnnxRuntime)).engine.display().to_string()
}

fn model_id() -> String {
    std::fs::canonicalize(engine_dir()).unwrap().file_name().unwrap().to_string_lossy().into_owned()
}

/// Starts a server in this test's runtime; returns its base URL.
async fn start(extra: &[&str]) -> String {
    let engine = tokio::task::spawn_blocking(engine_dir).await.unwrap();
    let mut argv = vec!["vl-serve", "--engine", &engine, "--port", "0", "--threads", "1"];
    argv.extend_from_slice(extra);
    let server = Server::bind(&Args::parse_from(argv)).await.unwrap();
    let url = format!("http://{}", server.local_addr());
    tokio::spawn(server.run_until(std::future::pending()));
    url
}

fn chat(question: &str, max_tokens: usize, stream: bool) -> Value {
    json!({
        "model": model_id(),
        "messages": [{"role": "user", "content": question}],
        "max_tokens": max_tokens,
        "temperature": 0,
        "ignore_eos": true,
        "stream": stream,
        "stream_options": {"include_usage": true},
        "some_future_field": [1, 2],
    })
}

async fn post(url: &str, body: &Value) -> reqwest::Response {
    reqwest::Client::new().post(format!("{url}/v1/chat/completions")).json(body).send().await.unwrap()
}

/// The `data:` payloads of a server-sent event stream.
fn sse_data(body: &str) -> Vec<String> {
    body.lines()
        .filter_map(|l| l.strip_prefix("data: ").or_else(|| l.strip_prefix("data:")))
        .map(String::from)
        .collect()
}

async fn assert_error(response: reqwest::Response, status: u16, needle: &str) -> Value {
    assert_eq!(response.status().as_u16(), status);
    let v: Value = response.json().await.unwrap();
    let message = v["error"]["message"].as_str().unwrap_or_else(|| panic!("not an error object: {v}"));
    assert!(message.contains(needle), "{message:?} does not mention {needle:?}");
    assert!(v["error"]["type"].is_string(), "{v}");
    assert!(v["error"].get("param").is_some() && v["error"].get("code").is_some(), "{v}");
    v
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn greedy_stream_gives_the_whole_answer() {
    let url = start(&[]).await;
    let r = post(&url, &chat("What happens in this video?", 12, false)).await;
    assert_eq!(r.status(), 200);
    let whole: Value = r.json().await.unwrap();
    assert_eq!(whole["object"], "chat.completion");
    assert_eq!(whole["model"], model_id());
    assert_eq!(whole["choices"][0]["message"]["role"], "assistant");
    assert_eq!(whole["choices"][0]["finish_reason"], "length");
    let text = whole["choices"][0]["message"]["content"].as_str().unwrap().to_string();
    let usage = &whole["usage"];
    assert_eq!(usage["completion_tokens"], 12);
    let prompt_tokens = usage["prompt_tokens"].as_u64().unwrap();
    assert!(prompt_tokens > 5, "{usage}");
    assert_eq!(usage["total_tokens"].as_u64().unwrap(), prompt_tokens + 12);

    let r = post(&url, &chat("What happens in this video?", 12, true)).await;
    assert_eq!(r.status(), 200);
    assert!(r.headers()["content-type"].to_str().unwrap().starts_with("text/event-stream"));
    let data = sse_data(&r.text().await.unwrap());
    assert_eq!(data.last().unwrap(), "[DONE]");
    let chunks: Vec<Value> = data[..data.len() - 1].iter().map(|d| serde_json::from_str(d).unwrap()).collect();
    assert!(chunks.iter().all(|c| c["object"] == "chat.completion.chunk" && c["id"] == chunks[0]["id"]));
    assert_eq!(chunks[0]["choices"][0]["delta"]["role"], "assistant");
    let streamed: String =
        chunks.iter().filter_map(|c| c["choices"][0]["delta"]["content"].as_str()).collect::<Vec<_>>().concat();
    assert_eq!(streamed, text);
    let n = chunks.len();
    assert_eq!(chunks[n - 2]["choices"][0]["finish_reason"], "length");
    assert!(chunks[..n - 2].iter().all(|c| c["choices"][0]["finish_reason"].is_null()));
    assert_eq!(chunks[n - 1]["choices"], json!([]));
    assert_eq!(chunks[n - 1]["usage"]["completion_tokens"], 12);
    assert_eq!(chunks[n - 1]["usage"]["prompt_tokens"].as_u64().unwrap(), prompt_tokens);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn models_health_ready() {
    let url = start(&[]).await;
    let models: Value = reqwest::get(format!("{url}/v1/models")).await.unwrap().json().await.unwrap();
    assert_eq!(models["object"], "list");
    assert_eq!(models["data"][0]["id"], model_id());
    assert_eq!(models["data"][0]["object"], "model");
    assert_eq!(reqwest::get(format!("{url}/health")).await.unwrap().status(), 200);
    let ready: Value = reqwest::get(format!("{url}/ready")).await.unwrap().json().await.unwrap();
    assert_eq!(ready["status"], "ready");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_requests_get_openai_errors() {
    let root = tempfile::tempdir().unwrap();
    let outside = tempfile::tempdir().unwrap();
    std::fs::write(outside.path().join("clip.mp4"), b"not a video").unwrap();
    std::os::unix::fs::symlink(outside.path().join("clip.mp4"), root.path().join("link.mp4")).unwrap();
    let url = start(&["--media-root", root.path().to_str().unwrap(), "--max-body", "4096"]).await;
    let with_video = |u: String| {
        json!({"messages": [{"role": "user", "content": [
            {"type": "video_url", "video_url": {"url": u}}, {"type": "text", "text": "What?"}]}]})
    };
    let out = format!("file://{}", outside.path().join("clip.mp4").display());
    let v = assert_error(post(&url, &with_video(out)).await, 400, "media root").await;
    assert_eq!(v["error"]["type"], "invalid_request_error");
    assert_eq!(v["error"]["param"], "video_url");
    let link = format!("file://{}", root.path().join("link.mp4").display());
    assert_error(post(&url, &with_video(link)).await, 400, "media root").await;
    assert_error(post(&url, &with_video("https://example.com/a.mp4".into())).await, 400, "scheme").await;

    let client = reqwest::Client::new();
    let raw = |body: Vec<u8>| {
        client.post(format!("{url}/v1/chat/completions")).header("content-type", "application/json").body(body).send()
    };
    assert_error(raw(b"{\"messages\": [".to_vec()).await.unwrap(), 400, "invalid request body").await;
    let big = format!(r#"{{"messages":[{{"role":"user","content":"{}"}}]}}"#, "a".repeat(8192));
    assert_error(raw(big.into_bytes()).await.unwrap(), 413, "max-body").await;

    let turns = json!({"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
                                    {"role": "user", "content": "c"}]});
    assert_error(post(&url, &turns).await, 400, "multi-turn").await;
    let wrong_model = json!({"model": "gpt-4o", "messages": [{"role": "user", "content": "a"}]});
    assert_error(post(&url, &wrong_model).await, 404, "does not exist").await;
    let bad_temperature = json!({"messages": [{"role": "user", "content": "a"}], "temperature": -1});
    assert_error(post(&url, &bad_temperature).await, 400, "temperature").await;
    let too_long = json!({"messages": [{"role": "user", "content": "a"}], "max_tokens": 100_000});
    let v = assert_error(post(&url, &too_long).await, 400, "context").await;
    assert_eq!(v["error"]["code"], "context_length_exceeded");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn overloaded_gets_429_and_a_dropped_stream_is_cancelled() {
    let url = start(&["--max-active", "1", "--max-waiting", "0"]).await;
    // Headers come once the first token is out, so the first request runs when they arrive.
    let first = post(&url, &chat("Tell me everything you see.", 400, true)).await;
    assert_eq!(first.status(), 200);
    let second = post(&url, &chat("And now?", 400, false)).await;
    assert_eq!(second.headers().get("retry-after").map(|v| v.to_str().unwrap()), Some("1"));
    let v = assert_error(second, 429, "limits").await;
    assert_eq!(v["error"]["code"], "rate_limit_exceeded");
    // The client goes away: its generation is cancelled and the slot freed.
    drop(first);
    let started = Instant::now();
    loop {
        let ready: Value = reqwest::get(format!("{url}/ready")).await.unwrap().json().await.unwrap();
        if ready["active"] == 0 {
            break;
        }
        assert!(started.elapsed() < Duration::from_secs(30), "the dropped stream still runs: {ready}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let r = post(&url, &chat("And now?", 4, false)).await;
    assert_eq!(r.status(), 200);
}

#[test]
fn binary_prints_the_bound_port() {
    let mut child = Command::new(env!("CARGO_BIN_EXE_vl-serve"))
        .args(["--engine", &engine_dir(), "--port", "0", "--threads", "1"])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap()).read_line(&mut line).unwrap();
    let result = (|| {
        let addr = line.trim().strip_prefix("listening on http://").ok_or("no listening line")?.to_string();
        let port: u16 = addr.rsplit(':').next().unwrap().parse().map_err(|_| "no port")?;
        assert_ne!(port, 0);
        let mut s = std::net::TcpStream::connect(&addr).map_err(|_| "cannot connect")?;
        use std::io::{Read, Write};
        s.write_all(b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").map_err(|_| "write")?;
        let mut reply = String::new();
        s.read_to_string(&mut reply).map_err(|_| "read")?;
        Ok::<_, &str>(reply)
    })();
    child.kill().unwrap();
    child.wait().unwrap();
    let reply = result.unwrap_or_else(|e| panic!("{e}: {line:?}"));
    assert!(reply.starts_with("HTTP/1.1 200"), "{reply}");
}
