//! The server over HTTP: the tiny fixture engine (in-place decoder, batched) served in-process
//! on port 0 and driven with reqwest; the binary's start-up line; refusals as OpenAI's error
//! object with the right statuses.
#![allow(clippy::unwrap_used)]

mod support;

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use support::{engine_dir, model_id, start, start_app};
use vl_serve::App;

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
    assert_error(reqwest::get(format!("{url}/v1/completions")).await.unwrap(), 404, "no route").await;
    assert_error(reqwest::get(format!("{url}/v1/chat/completions")).await.unwrap(), 405, "not allowed").await;
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

    let answered = json!({"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]});
    assert_error(post(&url, &answered).await, 400, "last message").await;
    let wrong_model = json!({"model": "gpt-4o", "messages": [{"role": "user", "content": "a"}]});
    assert_error(post(&url, &wrong_model).await, 404, "does not exist").await;
    let bad_temperature = json!({"messages": [{"role": "user", "content": "a"}], "temperature": -1});
    assert_error(post(&url, &bad_temperature).await, 400, "temperature").await;
    let too_long = json!({"messages": [{"role": "user", "content": "a"}], "max_tokens": 100_000});
    let v = assert_error(post(&url, &too_long).await, 400, "context").await;
    assert_eq!(v["error"]["code"], "context_length_exceeded");
    // Regression: prompt length + usize::MAX wrapped past the engine's context check.
    let huge = json!({"messages": [{"role": "user", "content": "a"}], "max_tokens": u64::MAX});
    let v = assert_error(post(&url, &huge).await, 400, "context").await;
    assert_eq!(v["error"]["code"], "context_length_exceeded");
}

/// Waits until the engine runs no request.
async fn idle(app: &App) {
    let started = Instant::now();
    while app.engine.stats().active > 0 || app.engine.stats().waiting > 0 {
        assert!(started.elapsed() < Duration::from_secs(30), "a request still runs");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn overloaded_gets_429_with_retry_after() {
    let (url, app) = start_app(&["--max-active", "1", "--max-waiting", "0"]).await;
    // Headers come once the first token is out, so the first request runs when they arrive;
    // it may still finish before the second one comes (the tiny engine is fast): try again.
    for attempt in 0.. {
        // A dropped request frees its slot at the engine's next step.
        idle(&app).await;
        let first = post(&url, &chat("Tell me everything you see.", 400, true)).await;
        assert_eq!(first.status(), 200);
        let second = post(&url, &chat("And now?", 400, false)).await;
        if second.status() == 200 && attempt < 20 {
            continue;
        }
        assert_eq!(second.headers().get("retry-after").map(|v| v.to_str().unwrap()), Some("1"));
        let v = assert_error(second, 429, "limits").await;
        assert_eq!(v["error"]["code"], "rate_limit_exceeded");
        break;
    }
    idle(&app).await;
    let r = post(&url, &chat("And now?", 4, false)).await;
    assert_eq!(r.status(), 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_goes_away_cancels_its_generation() {
    let (url, app) = start_app(&[]).await;
    let idle = || idle(&app);
    // Calibration: a whole 400-token answer decodes about 400 rows.
    let before = app.engine.stats().decode_rows;
    let whole = post(&url, &chat("Tell me everything you see.", 400, true)).await.text().await.unwrap();
    assert!(whole.ends_with("data: [DONE]\n\n"));
    idle().await;
    let full = app.engine.stats().decode_rows - before;
    assert!(full >= 399, "{full} rows");
    // Dropping the response right after its headers closes the connection; the stream (and
    // the engine handle) is dropped and the request cancelled at the next step. A stalled
    // client could miss that window (400 tiny tokens take ~50 ms): try a few times.
    for _ in 0..5 {
        let before = app.engine.stats().decode_rows;
        let r = post(&url, &chat("Tell me everything you see.", 400, true)).await;
        assert_eq!(r.status(), 200);
        drop(r);
        idle().await;
        if app.engine.stats().decode_rows - before < full / 2 {
            return;
        }
    }
    panic!("dropped streams decoded their whole answers");
}

/// The python used by the `openai` package test: `VL_SERVE_TEST_PYTHON`, else the workspace's
/// `.venv`.
fn python() -> std::path::PathBuf {
    std::env::var_os("VL_SERVE_TEST_PYTHON")
        .map(Into::into)
        .unwrap_or_else(|| std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../.venv/bin/python"))
}

/// OpenAI's own Python client against the server: plain and streamed greedy answers agree, a
/// follow-up with the history is answered, and a refused media URL raises its
/// `BadRequestError`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_openai_python_client_works() {
    let python = python();
    let has_openai = Command::new(&python).args(["-c", "import openai"]).output().is_ok_and(|o| o.status.success());
    if !has_openai {
        eprintln!(
            "note: {} cannot import openai (pip install openai, or set VL_SERVE_TEST_PYTHON); skipping",
            python.display()
        );
        return;
    }
    let (url, _) = start_app(&[]).await;
    let script = r#"
import json, sys, openai
c = openai.OpenAI(base_url=sys.argv[1] + "/v1", api_key="unused")
model = c.models.list().data[0].id
msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What happens?"}]
kw = dict(model=model, messages=msgs, max_tokens=10, temperature=0, extra_body={"ignore_eos": True})
r = c.chat.completions.create(**kw)
text = ""
usage = None
for chunk in c.chat.completions.create(stream=True, stream_options={"include_usage": True}, **kw):
    if chunk.usage:
        usage = chunk.usage.completion_tokens
    for ch in chunk.choices:
        text += ch.delta.content or ""
try:
    c.chat.completions.create(model=model, messages=[{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "http://example.com/a.png"}}]}])
    refused = False
except openai.BadRequestError as e:
    refused = e.status_code == 400
follow = c.chat.completions.create(model=model, max_tokens=10, temperature=0, extra_body={"ignore_eos": True},
    messages=msgs + [{"role": "assistant", "content": r.choices[0].message.content},
                     {"role": "user", "content": "And then?"}])
print(json.dumps({"model": model, "follow_tokens": follow.usage.completion_tokens,
                  "follow_prompt": follow.usage.prompt_tokens, "prompt": r.usage.prompt_tokens, "text": r.choices[0].message.content, "finish": r.choices[0].finish_reason,
                  "tokens": r.usage.completion_tokens, "streamed": text, "streamed_tokens": usage,
                  "refused": refused}))
"#;
    let out = tokio::task::spawn_blocking(move || Command::new(python).args(["-c", script, &url]).output().unwrap())
        .await
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["model"], model_id());
    assert_eq!(v["finish"], "length");
    assert_eq!(v["tokens"], 10);
    assert_eq!(v["streamed_tokens"], 10);
    assert_eq!(v["text"], v["streamed"]);
    assert_eq!(v["refused"], true);
    assert_eq!(v["follow_tokens"], 10);
    assert!(v["follow_prompt"].as_u64() > v["prompt"].as_u64(), "{v}");
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

/// Writes `name` under `dir` with ffmpeg's test source; `None` (with a note) without ffmpeg.
fn ffmpeg_clip(dir: &std::path::Path, name: &str, frames: usize) -> Option<std::path::PathBuf> {
    let path = dir.join(name);
    let status = Command::new("ffmpeg")
        .args(["-v", "error", "-y", "-f", "lavfi", "-i", "testsrc=size=64x48:rate=8", "-frames:v"])
        .arg(frames.to_string())
        .args(["-pix_fmt", if name.ends_with(".mp4") { "yuv420p" } else { "rgb24" }])
        .arg(&path)
        .status();
    match status {
        Ok(s) if s.success() => Some(path),
        _ => {
            eprintln!("note: ffmpeg is not available; skipping the media test");
            None
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn image_data_url_and_video_file_url() {
    use base64::Engine as _;
    let root = tempfile::tempdir().unwrap();
    let (Some(png), Some(mp4)) = (ffmpeg_clip(root.path(), "frame.png", 1), ffmpeg_clip(root.path(), "clip.mp4", 16))
    else {
        return;
    };
    let url = start(&["--media-root", root.path().to_str().unwrap()]).await;
    let text_only: Value = post(&url, &chat("What is it?", 3, false)).await.json().await.unwrap();
    let text_tokens = text_only["usage"]["prompt_tokens"].as_u64().unwrap();
    let ask = |part: Value| {
        json!({"model": model_id(), "max_tokens": 3, "temperature": 0, "ignore_eos": true,
               "messages": [{"role": "user", "content": [part, {"type": "text", "text": "What is it?"}]}]})
    };
    let data = format!(
        "data:image/png;base64,{}",
        base64::engine::general_purpose::STANDARD.encode(std::fs::read(png).unwrap())
    );
    let r = post(&url, &ask(json!({"type": "image_url", "image_url": {"url": data}}))).await;
    assert_eq!(r.status(), 200);
    let image: Value = r.json().await.unwrap();
    assert!(image["usage"]["prompt_tokens"].as_u64().unwrap() > text_tokens, "{image}");
    let file = format!("file://{}", mp4.display());
    let r = post(&url, &ask(json!({"type": "video_url", "video_url": {"url": file}}))).await;
    assert_eq!(r.status(), 200);
    let video: Value = r.json().await.unwrap();
    assert!(video["usage"]["prompt_tokens"].as_u64().unwrap() > image["usage"]["prompt_tokens"].as_u64().unwrap());
    assert_eq!(video["usage"]["completion_tokens"], 3);
    // Not a video: decoding fails before the first token, so the reply is a 400.
    std::fs::write(root.path().join("junk.mp4"), b"not a video").unwrap();
    let junk = format!("file://{}", root.path().join("junk.mp4").display());
    assert_error(post(&url, &ask(json!({"type": "video_url", "video_url": {"url": junk}}))).await, 400, "").await;
}
