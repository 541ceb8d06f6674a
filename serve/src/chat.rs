//! `POST /v1/chat/completions`: the conversation mapped onto one engine request, answered as
//! one `chat.completion` or streamed as `chat.completion.chunk` events.
use std::collections::VecDeque;
use std::convert::Infallible;
use std::sync::Arc;
use std::time::Instant;

use axum::body::Bytes;
use axum::extract::State;
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Json, Response};
use tempfile::NamedTempFile;
use tokio::sync::mpsc;
use vl_runtime::GenerateOptions;
use vl_runtime::engine::{Done, Event, Handle, Request};
use vl_runtime::generate::FinishReason;
use vl_runtime::model::Media;
use vl_runtime::prompt::{Exchange, PromptBuilder};
use vl_runtime::sampling::SamplingParams;

use crate::App;
use crate::api::{
    AssistantMessage, ChatRequest, Choice, Chunk, ChunkChoice, Completion, Content, Delta, Part, Role, Usage,
};
use crate::error::ApiError;
use crate::media::{self, Kind, Resolved};

/// What the engine is asked: the media (its URL), the earlier exchanges and the question.
#[derive(Debug, PartialEq)]
pub struct Turn {
    /// The one media part, with its kind and URL.
    pub media: Option<(Kind, String)>,
    /// Earlier questions and the assistant's answers, oldest first.
    pub earlier: Vec<Exchange>,
    /// The question: the user's text (system text first, when it is the first question).
    pub question: String,
}

/// Maps OpenAI messages onto a conversation: system (and developer) messages are prepended to
/// the first question; consecutive user messages are one question, their texts joined by new
/// lines; each assistant message answers the question before it; the last message is the
/// user's. The one media item, if any, must be in the first question.
pub fn turn(messages: Vec<crate::api::Message>) -> Result<Turn, ApiError> {
    let mut system = Vec::new();
    let mut earlier = Vec::new();
    let mut user: Option<Vec<String>> = None;
    let mut media = None;
    for m in messages {
        match m.role {
            Role::Assistant => {
                let Some(texts) = user.take() else {
                    return Err(ApiError::invalid("an assistant message must answer a user message").param("messages"));
                };
                let mut question = texts.join("\n");
                if earlier.is_empty() {
                    question = with_system(&system, question);
                }
                earlier.push(Exchange { question, answer: text_only(m.content)? });
            }
            Role::System | Role::Developer => system.push(text_only(m.content)?),
            Role::User => {
                let first = earlier.is_empty();
                let texts = user.get_or_insert_with(Vec::new);
                for part in parts(m.content) {
                    let (kind, url) = match part {
                        Part::Text { text } => {
                            texts.push(text);
                            continue;
                        }
                        Part::ImageUrl { image_url } => (Kind::Image, image_url.url),
                        Part::VideoUrl { video_url } => (Kind::Video, video_url.url),
                    };
                    if media.is_some() {
                        return Err(ApiError::invalid("at most one image or video per conversation").param("messages"));
                    }
                    if !first {
                        return Err(
                            ApiError::invalid("the image or video must be in the first user message").param("messages")
                        );
                    }
                    media = Some((kind, url));
                }
            }
        }
    }
    let Some(texts) = user else {
        let what = if earlier.is_empty() {
            "messages must hold a user message"
        } else {
            "the last message must be the user's"
        };
        return Err(ApiError::invalid(what).param("messages"));
    };
    let mut question = texts.join("\n");
    if earlier.is_empty() {
        question = with_system(&system, question);
    }
    Ok(Turn { media, earlier, question })
}

/// System texts, then the question, separated by blank lines (empty ones left out).
fn with_system(system: &[String], question: String) -> String {
    let parts = system.iter().map(String::as_str).chain(std::iter::once(question.as_str()));
    parts.filter(|t| !t.is_empty()).collect::<Vec<_>>().join("\n\n")
}

fn parts(content: Option<Content>) -> Vec<Part> {
    match content {
        None => Vec::new(),
        Some(Content::Text(text)) => vec![Part::Text { text }],
        Some(Content::Parts(parts)) => parts,
    }
}

fn text_only(content: Option<Content>) -> Result<String, ApiError> {
    let mut texts = Vec::new();
    for part in parts(content) {
        match part {
            Part::Text { text } => texts.push(text),
            _ => return Err(ApiError::invalid("only user messages may hold media").param("messages")),
        }
    }
    Ok(texts.join("\n"))
}

/// The generation options of a request. OpenAI's default temperature is 1 (sampling).
fn options(r: &mut ChatRequest) -> Result<GenerateOptions, ApiError> {
    if r.n.is_some_and(|n| n != 1) {
        return Err(ApiError::invalid("only n = 1 is supported").param("n"));
    }
    let max_new_tokens = r.max_completion_tokens.or(r.max_tokens).unwrap_or(GenerateOptions::default().max_new_tokens);
    if max_new_tokens == 0 {
        return Err(ApiError::invalid("max_tokens must be at least 1").param("max_tokens"));
    }
    let sampling = SamplingParams {
        temperature: r.temperature.unwrap_or(1.0),
        top_p: r.top_p.unwrap_or(1.0),
        top_k: r.top_k.map_or(0, |k| usize::try_from(k).unwrap_or(0)),
        repetition_penalty: r.repetition_penalty.unwrap_or(1.0),
        frequency_penalty: r.frequency_penalty.unwrap_or(0.0),
        presence_penalty: r.presence_penalty.unwrap_or(0.0),
        seed: r.seed.unwrap_or_else(rand_seed),
    };
    sampling.validate().map_err(|e| ApiError::invalid(e.to_string()))?;
    Ok(GenerateOptions {
        sampling,
        max_new_tokens,
        stop: r.stop.take().map(|s| s.into_vec()).unwrap_or_default(),
        ignore_eos: r.ignore_eos,
    })
}

/// A seed for requests that give none, so that unseeded requests differ.
fn rand_seed() -> u64 {
    use std::hash::{BuildHasher, RandomState};
    RandomState::new().hash_one(std::time::SystemTime::now())
}

/// A submitted request and what its reply needs.
struct Submitted {
    handle: Handle,
    temp: Option<NamedTempFile>,
    stream: bool,
    include_usage: bool,
    prompt_tokens: usize,
}

/// A request body checked against everything but the engine: what to ask and how.
#[derive(Debug)]
struct Parsed {
    options: GenerateOptions,
    turn: Turn,
    stream: bool,
    include_usage: bool,
}

/// Parses and validates a request body for the model `model_id` (no media read, no engine).
fn parse(body: &[u8], model_id: &str) -> Result<Parsed, ApiError> {
    let mut r: ChatRequest =
        serde_json::from_slice(body).map_err(|e| ApiError::invalid(format!("invalid request body: {e}")))?;
    if let Some(model) = &r.model
        && model != model_id
    {
        return Err(ApiError {
            status: axum::http::StatusCode::NOT_FOUND,
            code: Some("model_not_found"),
            ..ApiError::invalid(format!("the model {model:?} does not exist; this server serves {model_id:?}"))
                .param("model")
        });
    }
    let options = options(&mut r)?;
    let turn = turn(std::mem::take(&mut r.messages))?;
    let include_usage = r.stream_options.is_some_and(|o| o.include_usage);
    Ok(Parsed { options, turn, stream: r.stream, include_usage })
}

/// Parses, validates and submits (blocking: decodes base64, tokenizes).
fn submit(app: &App, body: &[u8]) -> Result<Submitted, ApiError> {
    let Parsed { options, turn, stream, include_usage } = parse(body, &app.model_id)?;
    let Resolved { media, temp, key } = match &turn.media {
        Some((kind, url)) => media::resolve(*kind, url, app.media_root.as_deref())?,
        None => Resolved { media: Media::Text, temp: None, key: "text".into() },
    };
    let prompt_tokens = prompt_tokens(app, &media, &turn.earlier, &turn.question)?;
    let mut request = Request::new(media, turn.question);
    request.earlier = turn.earlier;
    request.cache_key = Some(key);
    request.options = options;
    let handle = app.engine.submit(request)?;
    Ok(Submitted { handle, temp, stream, include_usage, prompt_tokens })
}

/// Tokens of the prompt, visual tokens included (as the engine lays it out).
fn prompt_tokens(app: &App, media: &Media, earlier: &[Exchange], question: &str) -> Result<usize, ApiError> {
    let model = app.engine.model();
    let m = model.manifest();
    let ids = PromptBuilder::new(model.tokenizer(), &m.chat_template, &m.tokens).conversation(
        model.slot(media),
        earlier,
        question,
    )?;
    Ok(ids.len())
}

/// Forwards a handle's events into a tokio channel from a blocking thread, timing each token
/// (from `arrived`) for the metrics; the handle (and so the request) is dropped, which cancels
/// it, as soon as the receiver is gone.
fn forward(app: Arc<App>, arrived: Instant, handle: Handle, temp: Option<NamedTempFile>) -> mpsc::Receiver<Event> {
    let (tx, rx) = mpsc::channel(64);
    tokio::task::spawn_blocking(move || {
        let _temp = temp;
        let mut previous = None;
        while let Some(event) = handle.recv() {
            if let Event::Token { id: Some(_), .. } = event {
                let now = Instant::now();
                app.metrics.token(arrived, previous, now);
                previous = Some(now);
            }
            let last = matches!(event, Event::Done(_) | Event::Failed(_));
            if tx.blocking_send(event).is_err() || last {
                break;
            }
        }
    });
    rx
}

fn finish_reason(f: FinishReason) -> &'static str {
    match f {
        FinishReason::MaxTokens => "length",
        FinishReason::Eos | FinishReason::StopString | FinishReason::Cancelled => "stop",
    }
}

/// Unix seconds now.
pub(crate) fn now() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

fn completion_id() -> String {
    use std::sync::atomic::{AtomicU64, Ordering};
    static NEXT: AtomicU64 = AtomicU64::new(0);
    format!("chatcmpl-{:x}-{}", now(), NEXT.fetch_add(1, Ordering::Relaxed))
}

/// The handler of `POST /v1/chat/completions`.
pub async fn completions(State(app): State<Arc<App>>, request: axum::extract::Request) -> Response {
    let arrived = Instant::now();
    let response = match read_body(&app, request).await {
        Ok(body) => answer(app.clone(), arrived, body).await,
        Err(e) => Err(e),
    };
    let response = response.unwrap_or_else(IntoResponse::into_response);
    app.metrics.request(response.status().as_u16());
    response
}

/// The JSON body of `request`: refused with 415 unless it says it is JSON, with 413 past
/// `--max-body`, and with 408 when it takes longer than `--read-timeout` to arrive.
async fn read_body(app: &App, request: axum::extract::Request) -> Result<Bytes, ApiError> {
    let content_type = request.headers().get(axum::http::header::CONTENT_TYPE);
    let essence = content_type
        .and_then(|v| v.to_str().ok())
        .map(|v| v.split(';').next().unwrap_or("").trim().to_ascii_lowercase());
    if essence.as_deref() != Some("application/json") {
        let got = content_type.map_or("none".to_string(), |v| format!("{:?}", String::from_utf8_lossy(v.as_bytes())));
        return Err(ApiError {
            status: axum::http::StatusCode::UNSUPPORTED_MEDIA_TYPE,
            ..ApiError::invalid(format!("the request body must be JSON with Content-Type application/json; got {got}"))
        });
    }
    let read = <Bytes as axum::extract::FromRequest<()>>::from_request(request, &());
    match tokio::time::timeout(app.read_timeout, read).await {
        Ok(body) => body.map_err(ApiError::from),
        Err(_) => Err(ApiError {
            status: axum::http::StatusCode::REQUEST_TIMEOUT,
            ..ApiError::invalid(format!(
                "the request body did not arrive within the server's --read-timeout of {} s",
                app.read_timeout.as_secs()
            ))
        }),
    }
}

async fn answer(app: Arc<App>, arrived: Instant, body: Bytes) -> Result<Response, ApiError> {
    let a = app.clone();
    let submitted = tokio::task::spawn_blocking(move || submit(&a, &body))
        .await
        .map_err(|e| ApiError::internal(format!("request task failed: {e}")))??;
    let Submitted { handle, temp, stream, include_usage, prompt_tokens } = submitted;
    let mut events = forward(app.clone(), arrived, handle, temp);
    // The first event decides the status: a request refused or failed before its first token
    // (overloaded, bad media) gets an error reply, not a stream.
    let first = match events.recv().await {
        Some(Event::Failed(e)) => return Err(e.into()),
        Some(event) => event,
        None => return Err(vl_runtime::Error::EngineStopped.into()),
    };
    let meta = Meta { id: completion_id(), created: now(), model: app.model_id.clone(), prompt_tokens };
    if stream {
        return Ok(stream_reply(meta, first, events, include_usage).into_response());
    }
    let mut event = first;
    loop {
        match event {
            Event::Done(done) => return Ok(whole(&meta, &done)),
            Event::Failed(e) => return Err(e.into()),
            Event::Token { .. } => {}
        }
        event = events.recv().await.ok_or(ApiError::from(vl_runtime::Error::EngineStopped))?;
    }
}

/// What every object of a reply repeats.
struct Meta {
    id: String,
    created: u64,
    model: String,
    prompt_tokens: usize,
}

fn whole(meta: &Meta, done: &Done) -> Response {
    let a = &done.answer;
    let c = Completion {
        id: &meta.id,
        object: "chat.completion",
        created: meta.created,
        model: &meta.model,
        choices: [Choice {
            index: 0,
            message: AssistantMessage { role: "assistant", content: &a.text },
            finish_reason: finish_reason(a.finish),
        }],
        usage: Usage::new(meta.prompt_tokens, a.token_ids.len()),
    };
    Json(c).into_response()
}

/// A stream's state: events still to turn into chunks, and chunks ready to send.
struct ChunkStream {
    events: mpsc::Receiver<Event>,
    ready: VecDeque<String>,
    over: bool,
    meta: Meta,
    include_usage: bool,
}

impl ChunkStream {
    fn chunk(&self, delta: Delta<'_>, finish_reason: Option<&'static str>, usage: Option<Usage>) -> String {
        let choices = if usage.is_some() { Vec::new() } else { vec![ChunkChoice { index: 0, delta, finish_reason }] };
        let c = Chunk {
            id: &self.meta.id,
            object: "chat.completion.chunk",
            created: self.meta.created,
            model: &self.meta.model,
            choices,
            usage,
        };
        serde_json::to_string(&c).unwrap_or_default()
    }

    fn push(&mut self, event: Event) {
        match event {
            Event::Token { text, .. } => {
                if !text.is_empty() {
                    let c = self.chunk(Delta { role: None, content: Some(&text) }, None, None);
                    self.ready.push_back(c);
                }
            }
            Event::Done(done) => {
                let a = &done.answer;
                let c = self.chunk(Delta::default(), Some(finish_reason(a.finish)), None);
                self.ready.push_back(c);
                if self.include_usage {
                    let usage = Usage::new(self.meta.prompt_tokens, a.token_ids.len());
                    let c = self.chunk(Delta::default(), None, Some(usage));
                    self.ready.push_back(c);
                }
                self.ready.push_back("[DONE]".to_string());
                self.over = true;
            }
            Event::Failed(e) => {
                self.ready.push_back(ApiError::from(e).to_json());
                self.over = true;
            }
        }
    }
}

fn stream_reply(
    meta: Meta,
    first: Event,
    events: mpsc::Receiver<Event>,
    include_usage: bool,
) -> Sse<impl futures_util::Stream<Item = Result<SseEvent, Infallible>>> {
    let mut s = ChunkStream { events, ready: VecDeque::new(), over: false, meta, include_usage };
    let role = s.chunk(Delta { role: Some("assistant"), content: Some("") }, None, None);
    s.ready.push_back(role);
    s.push(first);
    // Dropping the stream (the client went away) drops `events`, which cancels the request.
    let stream = futures_util::stream::unfold(s, |mut s| async move {
        loop {
            if let Some(data) = s.ready.pop_front() {
                return Some((Ok(SseEvent::default().data(data)), s));
            }
            if s.over {
                return None;
            }
            match s.events.recv().await {
                Some(event) => s.push(event),
                None => {
                    let e = ApiError::from(vl_runtime::Error::EngineStopped);
                    s.ready.push_back(e.to_json());
                    s.over = true;
                }
            }
        }
    });
    Sse::new(stream).keep_alive(KeepAlive::default())
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn messages(json: &str) -> Vec<crate::api::Message> {
        serde_json::from_str(json).unwrap()
    }

    #[test]
    fn one_turn_with_system_text_and_media() {
        let t = turn(messages(
            r#"[{"role":"system","content":"Be brief."},
                {"role":"user","content":[{"type":"video_url","video_url":{"url":"file:///v.mp4"}},
                                          {"type":"text","text":"What happens?"}]}]"#,
        ))
        .unwrap();
        assert_eq!(t.media, Some((Kind::Video, "file:///v.mp4".to_string())));
        assert_eq!(t.question, "Be brief.\n\nWhat happens?");
        assert!(t.earlier.is_empty());
    }

    #[test]
    fn assistant_messages_answer_the_question_before_them() {
        let t = turn(messages(
            r#"[{"role":"system","content":"Be brief."},
                {"role":"user","content":[{"type":"image_url","image_url":{"url":"data:,"}},{"type":"text","text":"a"}]},
                {"role":"user","content":"a2"},
                {"role":"assistant","content":"b"},
                {"role":"user","content":"c"}]"#,
        ))
        .unwrap();
        assert_eq!(t.earlier, vec![Exchange { question: "Be brief.\n\na\na2".into(), answer: "b".into() }]);
        assert_eq!(t.question, "c");
        assert_eq!(t.media, Some((Kind::Image, "data:,".to_string())));
    }

    #[test]
    fn refuses_what_a_conversation_cannot_hold() {
        let assistant_first = r#"[{"role":"assistant","content":"b"},{"role":"user","content":"c"}]"#;
        let assistant_last = r#"[{"role":"user","content":"a"},{"role":"assistant","content":"b"}]"#;
        let media_later = r#"[{"role":"user","content":"a"},{"role":"assistant","content":"b"},
                              {"role":"user","content":[{"type":"image_url","image_url":{"url":"data:,"}}]}]"#;
        let two_media = r#"[{"role":"user","content":[{"type":"image_url","image_url":{"url":"data:,"}},
                                                     {"type":"image_url","image_url":{"url":"data:,"}}]}]"#;
        let system_only = r#"[{"role":"system","content":"x"}]"#;
        for bad in [assistant_first, assistant_last, media_later, two_media, system_only] {
            assert_eq!(turn(messages(bad)).unwrap_err().status, axum::http::StatusCode::BAD_REQUEST, "{bad}");
        }
    }

    #[test]
    fn openai_penalties_map_to_the_sampler_and_out_of_range_is_a_400() {
        let body = |f: f32, p: f32| {
            serde_json::to_vec(&serde_json::json!({"model": "m", "messages": [{"role": "user", "content": "x"}],
                "frequency_penalty": f, "presence_penalty": p}))
            .unwrap_or_default()
        };
        let ok = parse(&body(0.5, -0.25), "m").unwrap_or_else(|e| panic!("{}", e.message));
        assert_eq!((ok.options.sampling.frequency_penalty, ok.options.sampling.presence_penalty), (0.5, -0.25));
        for (f, p) in [(2.5, 0.0), (0.0, -3.0)] {
            let e = parse(&body(f, p), "m").err().unwrap_or_else(|| panic!("{f} {p} accepted"));
            assert_eq!(e.status, axum::http::StatusCode::BAD_REQUEST);
            assert!(e.message.contains("penalty"), "{}", e.message);
        }
    }

    mod properties {
        use proptest::prelude::*;
        use serde_json::{Value, json};

        use super::*;

        const VALID: &str = r#"{"model":"m","messages":[{"role":"system","content":"Be brief."},
            {"role":"user","content":[{"type":"text","text":"What?"},
                {"type":"video_url","video_url":{"url":"data:video/mp4;base64,AAAA"}}]},
            {"role":"assistant","content":"That."},{"role":"user","content":"Why?"}],
            "stream":true,"stream_options":{"include_usage":true},"max_tokens":5,"temperature":0.5,
            "top_p":0.9,"top_k":-1,"repetition_penalty":1.1,"frequency_penalty":0.5,
            "presence_penalty":-0.25,"stop":["\n"],"seed":3,"n":1}"#;

        /// Never a panic: parsed, or refused with a client error (4xx) that says something.
        fn total(body: &[u8]) -> std::result::Result<(), TestCaseError> {
            match parse(body, "m") {
                Ok(p) => {
                    prop_assert!(p.options.max_new_tokens > 0);
                    prop_assert!(p.options.sampling.validate().is_ok());
                }
                Err(e) => {
                    prop_assert!(e.status.is_client_error(), "{}: {}", e.status, e.message);
                    prop_assert!(!e.message.is_empty());
                }
            }
            Ok(())
        }

        fn number() -> impl Strategy<Value = Value> {
            prop_oneof![
                any::<i64>().prop_map(Value::from),
                any::<u64>().prop_map(Value::from),
                any::<f64>().prop_map(|f| json!(f)),
                Just(json!(u64::MAX)),
                Just(json!(-1)),
                Just(json!(0)),
                Just(json!(1e300)),
                Just(Value::Null),
                Just(json!("1")),
            ]
        }

        fn content() -> impl Strategy<Value = Value> {
            let part = prop_oneof![
                ".{0,8}".prop_map(|t| json!({"type": "text", "text": t})),
                "(data:|file://|https://)?[a-z/;,=A-Z0-9+]{0,16}"
                    .prop_map(|u| json!({"type": "image_url", "image_url": {"url": u}})),
                "(data:|file://)?[a-z/;,=A-Z0-9+]{0,16}"
                    .prop_map(|u| json!({"type": "video_url", "video_url": {"url": u}})),
                Just(json!({"type": "audio", "audio": {}})),
                Just(json!({"type": "text"})),
                Just(json!(42)),
            ];
            prop_oneof![
                ".{0,12}".prop_map(Value::from),
                prop::collection::vec(part, 0..4).prop_map(Value::from),
                Just(Value::Null),
                Just(json!({"text": "x"})),
            ]
        }

        fn message() -> impl Strategy<Value = Value> {
            let role = prop::sample::select(vec!["system", "developer", "user", "assistant", "tool", "USER", ""]);
            (role, content(), any::<bool>()).prop_map(|(role, content, has)| {
                if has { json!({"role": role, "content": content}) } else { json!({"role": role}) }
            })
        }

        fn request() -> impl Strategy<Value = Value> {
            (
                prop::collection::vec(message(), 0..5),
                prop::collection::vec(
                    (
                        prop::sample::select(vec![
                            "max_tokens",
                            "max_completion_tokens",
                            "temperature",
                            "top_p",
                            "top_k",
                            "repetition_penalty",
                            "frequency_penalty",
                            "presence_penalty",
                            "seed",
                            "n",
                            "stream",
                            "stop",
                            "model",
                            "stream_options",
                        ]),
                        number(),
                    ),
                    0..5,
                ),
            )
                .prop_map(|(messages, fields)| {
                    let mut r = json!({"messages": messages});
                    for (k, v) in fields {
                        r[k] = v;
                    }
                    r
                })
        }

        proptest! {
            #![proptest_config(crate::proptest_cases::config(1000))]

            #[test]
            fn arbitrary_bytes_never_panic(body in prop::collection::vec(any::<u8>(), 0..128)) {
                total(&body)?;
            }

            #[test]
            fn request_shaped_json_never_panics(r in request()) {
                total(r.to_string().as_bytes())?;
            }

            #[test]
            fn flipped_bytes_never_panic(flips in prop::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..4)) {
                let mut body = VALID.as_bytes().to_vec();
                for (at, byte) in flips {
                    let i = at.index(body.len());
                    body[i] = byte;
                }
                total(&body)?;
            }
        }

        proptest! {
            #![proptest_config(crate::proptest_cases::config(256))]

            #[test]
            fn media_urls_resolve_or_are_refused(url in "(data:|file://|)[a-zA-Z/;,=0-9+ ]{0,24}", video in any::<bool>()) {
                let kind = if video { Kind::Video } else { Kind::Image };
                if let Err(e) = media::resolve(kind, &url, None) {
                    prop_assert!(e.status.is_client_error(), "{}: {}", e.status, e.message);
                }
            }
        }

        #[test]
        fn the_valid_body_parses_and_every_truncation_is_refused() {
            let p = parse(VALID.as_bytes(), "m").expect("valid");
            assert_eq!(p.turn.earlier.len(), 1);
            assert!(p.stream && p.include_usage);
            for end in 0..VALID.len() {
                let e = parse(&VALID.as_bytes()[..end], "m").expect_err("truncated");
                assert_eq!(e.status, axum::http::StatusCode::BAD_REQUEST);
            }
        }
    }
}
