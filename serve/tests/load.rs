//! Many clients at once over HTTP: 32 streaming clients against the tiny fixture engine served
//! in-process on 127.0.0.1 port 0, some of them hanging up after a chunk or two. Every answer
//! that completes equals the same question's answer asked alone (greedy), a queue smaller than
//! the load refuses the excess with 429 and `Retry-After` and fails nothing else, and once the
//! clients are gone `/metrics` shows no active sequence and no KV in use.
//!
//! Counts are bounded (32 clients, answers of at most 300 tokens of the tiny engine); nothing is
//! asserted about how long anything takes. The polls of `/metrics` give up after a minute, as a
//! bound on a hang, not as a measurement.
#![allow(clippy::unwrap_used)]

mod support;

use std::collections::BTreeMap;

use serde_json::{Value, json};
use support::{settled, start};

/// Clients sent at once.
const CLIENTS: usize = 32;

/// Distinct questions; client `i` asks `QUESTIONS[i % len]`.
const QUESTIONS: [&str; 8] = [
    "What happens in this video?",
    "Describe the scene.",
    "What do you see?",
    "Who is there?",
    "What colour is the sky?",
    "Count the people, please.",
    "Is it day or night?",
    "Tell me everything you see.",
];

/// Tokens asked of the question `q`: a few lengths, so that answers end at different steps.
fn max_tokens(q: usize) -> usize {
    6 + 5 * (q % 4)
}

fn chat(question: &str, max_tokens: usize) -> Value {
    json!({
        "messages": [{"role": "user", "content": question}],
        "max_tokens": max_tokens,
        "temperature": 0,
        "ignore_eos": true,
        "stream": true,
    })
}

async fn post(client: &reqwest::Client, url: &str, body: &Value) -> reqwest::Response {
    client.post(format!("{url}/v1/chat/completions")).json(body).send().await.unwrap()
}

/// The answer of a whole stream: its contents joined, after checking it ends as a complete
/// answer (`finish_reason` "length", then `[DONE]`) with no error event.
async fn streamed(r: reqwest::Response) -> String {
    assert_eq!(r.status(), 200);
    let body = r.text().await.unwrap();
    let data: Vec<&str> = body.lines().filter_map(|l| l.strip_prefix("data: ")).collect();
    assert_eq!(data.last(), Some(&"[DONE]"), "{body}");
    let chunks: Vec<Value> = data[..data.len() - 1].iter().map(|d| serde_json::from_str(d).unwrap()).collect();
    assert!(chunks.iter().all(|c| c.get("error").is_none()), "{body}");
    assert_eq!(chunks.last().unwrap()["choices"][0]["finish_reason"], "length", "{body}");
    chunks.iter().filter_map(|c| c["choices"][0]["delta"]["content"].as_str()).collect()
}

/// Each question's answer asked alone, one at a time, on the server at `url`.
async fn alone(url: &str) -> Vec<String> {
    let client = reqwest::Client::new();
    let mut answers = Vec::new();
    for (q, question) in QUESTIONS.iter().enumerate() {
        answers.push(streamed(post(&client, url, &chat(question, max_tokens(q))).await).await);
    }
    assert!(answers.iter().all(|a| !a.is_empty()), "{answers:?}");
    answers
}

/// What one client of the load saw.
enum Outcome {
    /// A whole answer to question `q`.
    Answered { q: usize, text: String },
    /// It hung up after `chunks` chunks.
    HungUp { chunks: usize },
    /// 429 with `Retry-After` and OpenAI's `rate_limit_exceeded`.
    Refused,
}

/// Client `i`: asks its question; when `hang_up` is `Some(n)`, a long answer of which it reads
/// `n` chunks of the body and then drops the response (closing the connection).
async fn client(url: String, i: usize, hang_up: Option<usize>) -> Outcome {
    let client = reqwest::Client::new();
    let q = i % QUESTIONS.len();
    let tokens = if hang_up.is_some() { 300 } else { max_tokens(q) };
    let mut r = post(&client, &url, &chat(QUESTIONS[q], tokens)).await;
    if r.status() == 429 {
        assert_eq!(r.headers().get("retry-after").map(|v| v.to_str().unwrap()), Some("1"));
        let v: Value = r.json().await.unwrap();
        assert_eq!(v["error"]["code"], "rate_limit_exceeded", "{v}");
        return Outcome::Refused;
    }
    assert_eq!(r.status(), 200, "client {i}");
    match hang_up {
        Some(n) => {
            let mut chunks = 0;
            while chunks < n && r.chunk().await.unwrap().is_some() {
                chunks += 1;
            }
            drop(r);
            Outcome::HungUp { chunks }
        }
        None => Outcome::Answered { q, text: streamed(r).await },
    }
}

/// Sends `CLIENTS` clients at once; client `i` hangs up as `hang_up(i)` says.
async fn load(url: &str, hang_up: impl Fn(usize) -> Option<usize>) -> Vec<Outcome> {
    let tasks: Vec<_> = (0..CLIENTS).map(|i| tokio::spawn(client(url.to_string(), i, hang_up(i)))).collect();
    let mut outcomes = Vec::new();
    for t in tasks {
        outcomes.push(t.await.unwrap());
    }
    outcomes
}

fn requests(m: &BTreeMap<String, f64>, status: u16) -> f64 {
    m.get(&format!("vl_requests_total{{status=\"{status}\"}}")).copied().unwrap_or(0.0)
}

/// The statuses `vl_requests_total` counts.
fn statuses(m: &BTreeMap<String, f64>) -> Vec<&str> {
    m.keys().filter_map(|k| k.strip_prefix("vl_requests_total{status=\"")?.strip_suffix("\"}")).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn thirty_two_streaming_clients_some_hanging_up() {
    let url = start(&["--max-active", "8"]).await;
    let expected = alone(&url).await;
    // Every fourth client hangs up, after one chunk (the role) or two (the first token).
    let outcomes = load(&url, |i| (i % 4 == 3).then_some(1 + i % 8 / 4)).await;
    let mut answered = 0;
    for o in &outcomes {
        match o {
            Outcome::Answered { q, text } => {
                assert_eq!(text, &expected[*q], "question {q} answered differently under load");
                answered += 1;
            }
            Outcome::HungUp { chunks } => assert!(*chunks >= 1),
            Outcome::Refused => panic!("refused with a queue of 64"),
        }
    }
    assert_eq!(answered, CLIENTS - CLIENTS / 4);
    let m = settled(&url, "the load").await;
    assert_eq!(requests(&m, 200), (QUESTIONS.len() + CLIENTS) as f64, "{m:?}");
    assert_eq!(statuses(&m), ["200"], "{m:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_queue_smaller_than_the_load_refuses_only_the_excess() {
    let (max_active, max_waiting) = (2, 2);
    let url = start(&["--max-active", &max_active.to_string(), "--max-waiting", &max_waiting.to_string()]).await;
    let expected = alone(&url).await;
    let (mut answered, mut refused) = (0, 0);
    // 32 clients against room for 4 are all but sure to overflow the queue; the tiny engine
    // answers fast, so a run where they trickled in and all fitted is sent again.
    for _attempt in 0..10 {
        for o in load(&url, |_| None).await {
            match o {
                Outcome::Answered { q, text } => {
                    assert_eq!(text, expected[q], "question {q} answered differently under load");
                    answered += 1;
                }
                Outcome::Refused => refused += 1,
                Outcome::HungUp { .. } => unreachable!("no client hangs up here"),
            }
        }
        settled(&url, "the load").await;
        if refused > 0 {
            break;
        }
    }
    assert!(refused > 0, "no client was refused");
    // The first `max_waiting` requests of a run find the queue empty and are never refused.
    assert!(answered >= max_waiting, "{answered} answered");
    let m = settled(&url, "the load").await;
    assert_eq!(requests(&m, 429), refused as f64, "{m:?}");
    assert_eq!(requests(&m, 200), (QUESTIONS.len() + answered) as f64, "{m:?}");
    assert_eq!(statuses(&m), ["200", "429"], "{m:?}");
}
