//! Hostile clients over HTTP, against the tiny fixture engine served in-process on 127.0.0.1
//! port 0: bodies that are not JSON, media URLs at and past `--max-body`, bad base64, paths out of
//! the media root, schemes it does not serve, a flood of small requests, a client that never
//! sends its body, one that dribbles its headers (slowloris), a flood of idle connections past
//! `--max-connections`, and clients that hang up at every stage. Each gets its status and OpenAI's
//! error object (or just a closed connection), and after each a good request still gets a 200
//! while `/metrics` shows no active sequence.
//!
//! Raw sockets (tokio's `TcpStream`) play the clients reqwest cannot: half-sent requests. Every
//! wait is bounded (a minute) as a guard against a hang, never as a measurement.
#![allow(clippy::unwrap_used)]

mod support;

use std::time::{Duration, Instant};

use base64::Engine as _;
use serde_json::{Value, json};
use support::{PATIENCE, metrics, settled, start};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

fn chat(question: &str, max_tokens: usize, stream: bool) -> Value {
    json!({
        "messages": [{"role": "user", "content": question}],
        "max_tokens": max_tokens,
        "temperature": 0,
        "ignore_eos": true,
        "stream": stream,
    })
}

fn with_video(url: &str) -> Value {
    json!({"max_tokens": 2, "messages": [{"role": "user", "content": [
        {"type": "video_url", "video_url": {"url": url}}, {"type": "text", "text": "What?"}]}]})
}

async fn post(url: &str, body: &Value) -> reqwest::Response {
    reqwest::Client::new().post(format!("{url}/v1/chat/completions")).json(body).send().await.unwrap()
}

/// Posts `body` as it is, with `content_type` (none: no such header).
async fn post_raw(url: &str, content_type: Option<&str>, body: Vec<u8>) -> reqwest::Response {
    let mut r = reqwest::Client::new().post(format!("{url}/v1/chat/completions")).body(body);
    if let Some(t) = content_type {
        r = r.header("content-type", t);
    }
    r.send().await.unwrap()
}

async fn assert_error(response: reqwest::Response, status: u16, needle: &str) {
    assert_eq!(response.status().as_u16(), status, "expected {status} for {needle:?}");
    let v: Value = response.json().await.unwrap();
    let message = v["error"]["message"].as_str().unwrap_or_else(|| panic!("not an error object: {v}"));
    assert!(message.contains(needle), "{message:?} does not mention {needle:?}");
    assert!(v["error"]["type"].is_string(), "{v}");
}

/// A good request still gets its answer.
async fn still_serves(url: &str) {
    let r = post(url, &chat("What happens next?", 3, false)).await;
    assert_eq!(r.status(), 200);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["usage"]["completion_tokens"], 3, "{v}");
}

async fn connect(url: &str) -> TcpStream {
    TcpStream::connect(url.strip_prefix("http://").unwrap()).await.unwrap()
}

/// The head of a POST to the chat route announcing `len` body bytes.
fn head(len: usize) -> String {
    format!(
        "POST /v1/chat/completions HTTP/1.1\r\nhost: localhost\r\ncontent-type: application/json\r\n\
         content-length: {len}\r\n\r\n"
    )
}

/// Everything the server sends until it closes the connection.
async fn read_to_close(stream: &mut TcpStream) -> String {
    let mut reply = Vec::new();
    tokio::time::timeout(PATIENCE, stream.read_to_end(&mut reply))
        .await
        .expect("the server kept the connection open")
        .unwrap();
    String::from_utf8_lossy(&reply).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bodies_that_are_not_json() {
    let url = start(&[]).await;
    let body = serde_json::to_vec(&chat("What?", 2, false)).unwrap();
    for content_type in [Some("text/plain"), Some("application/x-www-form-urlencoded"), None] {
        let r = post_raw(&url, content_type, body.clone()).await;
        assert_error(r, 415, "application/json").await;
        still_serves(&url).await;
    }
    // Parameters and case do not matter.
    let r = post_raw(&url, Some("Application/JSON; charset=utf-8"), body).await;
    assert_eq!(r.status(), 200);
    for bad in [&b"{"[..], b"", b"null", b"[]", b"{\"messages\": 5}", b"\xff\xfe{}", b"{\"messages\": []}"] {
        let r = post_raw(&url, Some("application/json"), bad.to_vec()).await;
        assert_eq!(r.status(), 400, "{:?}", String::from_utf8_lossy(bad));
        still_serves(&url).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn data_urls_at_the_body_limit_and_bad_base64() {
    const MAX: usize = 64 << 10;
    let url = start(&["--max-body", &MAX.to_string()]).await;
    // A body of `size` bytes: a base64 data: URL (of bytes that are no video), padded with spaces.
    let body_of = |size: usize| {
        let fill = |n: usize| base64::engine::general_purpose::STANDARD.encode(vec![7u8; n / 4 * 3]);
        let skeleton = serde_json::to_vec(&with_video(&format!("data:video/mp4;base64,{}", fill(0)))).unwrap();
        let data = fill(size - skeleton.len());
        let mut body = serde_json::to_vec(&with_video(&format!("data:video/mp4;base64,{data}"))).unwrap();
        assert!(body.len() <= size);
        body.resize(size, b' ');
        body
    };
    // Just under the limit: read whole; the media then fail to decode (400, not 413).
    let r = post_raw(&url, Some("application/json"), body_of(MAX - 16)).await;
    assert_eq!(r.status(), 400);
    still_serves(&url).await;
    let r = post_raw(&url, Some("application/json"), body_of(MAX + 16)).await;
    assert_error(r, 413, "max-body").await;
    still_serves(&url).await;

    for bad in ["data:video/mp4;base64,@@@@", "data:video/mp4;base64,AAA", "data:video/mp4;base64,AA=A"] {
        assert_error(post(&url, &with_video(bad)).await, 400, "base64").await;
        still_serves(&url).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn paths_out_of_the_media_root_and_other_schemes() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("media");
    std::fs::create_dir(&root).unwrap();
    std::fs::write(dir.path().join("secret.mp4"), b"not for clients").unwrap();
    let url = start(&["--media-root", root.to_str().unwrap()]).await;
    let root = root.display();
    for outside in [
        format!("file://{root}/../secret.mp4"),
        format!("file://{root}/../../../../../../etc/passwd"),
        "file:///proc/self/environ".to_string(),
        "file:///proc/self/cmdline".to_string(),
        "file://localhost/etc/passwd".to_string(),
    ] {
        assert_error(post(&url, &with_video(&outside)).await, 400, "media root").await;
        still_serves(&url).await;
    }
    for other in ["ftp://example.com/a.mp4", "http://127.0.0.1:1/a.mp4", "gopher://x", "/etc/passwd", "a.mp4"] {
        assert_error(post(&url, &with_video(other)).await, 400, "scheme").await;
        still_serves(&url).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_of_small_requests_is_all_answered() {
    let url = start(&[]).await;
    let mut tasks = Vec::new();
    for _ in 0..4 {
        let url = url.clone();
        // One client per task: its requests share a keep-alive connection or a few.
        tasks.push(tokio::spawn(async move {
            let client = reqwest::Client::new();
            for i in 0..550 {
                if i % 11 == 10 {
                    let r = client
                        .post(format!("{url}/v1/chat/completions"))
                        .header("content-type", "application/json")
                        .body("{\"messages\": [")
                        .send()
                        .await
                        .unwrap();
                    assert_eq!(r.status(), 400);
                    r.bytes().await.unwrap();
                } else {
                    let r = client.get(format!("{url}/health")).send().await.unwrap();
                    assert_eq!(r.status(), 200);
                    r.bytes().await.unwrap();
                }
            }
        }));
    }
    for t in tasks {
        tokio::time::timeout(PATIENCE * 5, t).await.expect("the flood did not finish").unwrap();
    }
    let m = metrics(&url).await;
    assert_eq!(m.get("vl_requests_total{status=\"400\"}"), Some(&200.0), "{m:?}");
    still_serves(&url).await;
    settled(&url, "the flood").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_body_that_never_comes_times_out() {
    let url = start(&["--read-timeout", "1"]).await;
    let mut stalled = connect(&url).await;
    stalled.write_all(format!("{}{{\"messa", head(100)).as_bytes()).await.unwrap();
    // The server answers the others meanwhile.
    still_serves(&url).await;
    let reply = read_to_close(&mut stalled).await;
    assert!(reply.starts_with("HTTP/1.1 408"), "{reply}");
    assert!(reply.contains("read-timeout"), "{reply}");
    // A client sending no body byte at all, too.
    let mut silent = connect(&url).await;
    silent.write_all(head(10).as_bytes()).await.unwrap();
    assert!(read_to_close(&mut silent).await.starts_with("HTTP/1.1 408"));
    still_serves(&url).await;
    settled(&url, "stalled bodies").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_that_hang_up_at_every_stage_leave_nothing_running() {
    let url = start(&[]).await;
    let long = serde_json::to_string(&chat("Tell me everything about it.", 300, false)).unwrap();
    let streamed = serde_json::to_string(&chat("Tell me everything about it.", 300, true)).unwrap();

    // Before the headers are complete.
    let mut s = connect(&url).await;
    s.write_all(b"POST /v1/chat/completions HTTP/1.1\r\nhost: local").await.unwrap();
    drop(s);
    still_serves(&url).await;
    settled(&url, "a hang-up mid-headers").await;

    // Mid-body.
    let mut s = connect(&url).await;
    s.write_all(format!("{}{}", head(long.len()), &long[..long.len() / 2]).as_bytes()).await.unwrap();
    drop(s);
    still_serves(&url).await;
    settled(&url, "a hang-up mid-body").await;

    // Right after sending the whole request, plain and streamed.
    for body in [&long, &streamed] {
        let mut s = connect(&url).await;
        s.write_all(format!("{}{body}", head(body.len())).as_bytes()).await.unwrap();
        s.flush().await.unwrap();
        drop(s);
        still_serves(&url).await;
        settled(&url, "a hang-up after sending").await;
    }

    // Mid-stream: after the first token's event.
    let mut s = connect(&url).await;
    s.write_all(format!("{}{streamed}", head(streamed.len())).as_bytes()).await.unwrap();
    let mut seen = Vec::new();
    let started = Instant::now();
    while String::from_utf8_lossy(&seen).matches("data:").count() < 2 {
        assert!(started.elapsed() < PATIENCE, "no token streamed: {}", String::from_utf8_lossy(&seen));
        let mut buf = [0u8; 4096];
        let n = tokio::time::timeout(PATIENCE, s.read(&mut buf)).await.unwrap().unwrap();
        assert!(n > 0, "closed before streaming: {}", String::from_utf8_lossy(&seen));
        seen.extend_from_slice(&buf[..n]);
    }
    assert!(seen.starts_with(b"HTTP/1.1 200"), "{}", String::from_utf8_lossy(&seen));
    drop(s);
    still_serves(&url).await;
    settled(&url, "a hang-up mid-stream").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn odd_questions_are_answered_or_refused_by_name() {
    let url = start(&[]).await;
    for question in ["What is <video>?", "<image>"] {
        assert_error(post(&url, &chat(question, 2, false)).await, 400, "placeholder").await;
        still_serves(&url).await;
    }
    let words = ["what", "does", "the", "horse", "do", "next"];
    let long = (0..2000).map(|i| words[i % words.len()]).collect::<Vec<_>>().join(" ");
    assert_error(post(&url, &chat(&long, 2, false)).await, 400, "context").await;
    for question in ["", "\0\u{1b}[2J\u{7}\r\n", "\u{feff}\u{202e}\u{fffd}"] {
        let r = post(&url, &chat(question, 2, false)).await;
        assert_eq!(r.status(), 200, "{question:?}");
    }
    settled(&url, "odd questions").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn headers_dribbled_byte_by_byte_time_out() {
    const HEADER_TIMEOUT: Duration = Duration::from_secs(1);
    let url = start(&["--header-timeout", "1"]).await;
    let (mut reader, mut writer) = connect(&url).await.into_split();
    let started = Instant::now();
    // A slowloris: the request line and a header, then a byte of another header every 100 ms.
    writer.write_all(b"GET /health HTTP/1.1\r\nHost: x\r\n").await.unwrap();
    let dribble = tokio::spawn(async move {
        for byte in b"X-Slow: ".iter().cycle() {
            if writer.write_all(&[*byte]).await.is_err() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    });
    let mut reply = Vec::new();
    let read = tokio::time::timeout(PATIENCE, reader.read_to_end(&mut reply)).await;
    let closed_after = started.elapsed();
    dribble.abort();
    assert!(read.is_ok(), "the server kept a dribbling client's connection for {PATIENCE:?}");
    // Closed (hyper answers 408 first), not at once, and well before three timeouts.
    let reply = String::from_utf8_lossy(&reply);
    assert!(reply.is_empty() || reply.starts_with("HTTP/1.1 408"), "{reply}");
    assert!(closed_after >= HEADER_TIMEOUT / 2, "closed after {closed_after:?}, before --header-timeout");
    assert!(closed_after < 3 * HEADER_TIMEOUT, "closed only after {closed_after:?}");
    still_serves(&url).await;

    // A client that connects and sends nothing is closed too.
    let mut silent = connect(&url).await;
    let reply = read_to_close(&mut silent).await;
    assert!(reply.is_empty() || reply.starts_with("HTTP/1.1 408"), "{reply}");
    still_serves(&url).await;
    settled(&url, "dribbled headers").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_connections_past_the_limit_wait_and_time_out() {
    const MAX: usize = 4;
    let url = start(&["--max-connections", &MAX.to_string(), "--header-timeout", "1"]).await;
    let addr = url.strip_prefix("http://").unwrap();
    // A flood of idle connections: the first MAX are accepted, the rest wait in the backlog.
    let idle: Vec<std::net::TcpStream> = (0..4 * MAX).map(|_| std::net::TcpStream::connect(addr).unwrap()).collect();
    // Served only once the header timeout has closed idle ones: at most MAX are open at once.
    still_serves(&url).await;
    let closed = idle.iter().filter(|s| closed(s)).count();
    assert!(closed >= MAX, "only {closed} idle connections were closed before a request was served");
    settled(&url, "idle connections").await;
}

/// Whether the server closed `s` (its end of file or a reset is there to read).
fn closed(s: &std::net::TcpStream) -> bool {
    use std::io::Read;
    s.set_nonblocking(true).unwrap();
    !matches!((&*s).read(&mut [0u8; 1]), Err(e) if e.kind() == std::io::ErrorKind::WouldBlock)
}
