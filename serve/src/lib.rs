//! vl-serve: an OpenAI-compatible HTTP server over vl-runtime's serving engine.
//!
//! Routes: `GET /` (a page to ask about a video or an image, `static/index.html`),
//! `POST /v1/chat/completions` (OpenAI's schema; `stream: true` sends server-sent
//! `chat.completion.chunk` events), `GET /v1/models`, `GET /health`, `GET /ready`,
//! `GET /metrics` (OpenMetrics text). Media come as `image_url` / `video_url` content parts
//! (vLLM's schema) holding a base64 `data:` URL or a `file://` path under `--media-root`.
//! Errors are OpenAI's error object. A request whose messages extend an earlier one's (same
//! media, same tokens) continues from that conversation's KV cache (the engine's prefix cache).
//!
//! ```no_run
//! use clap::Parser;
//! # async fn run() -> Result<(), vl_serve::ServeError> {
//! let args = vl_serve::Args::parse_from(["vl-serve", "--engine", "engines/small", "--port", "0"]);
//! let server = vl_serve::Server::bind(&args).await?;
//! println!("listening on http://{}", server.local_addr());
//! server.run().await
//! # }
//! ```
#![warn(clippy::unwrap_used)]

pub mod api;
pub mod chat;
pub mod error;
pub mod media;
pub mod metrics;

#[cfg(test)]
#[path = "../../tests/proptest_cases.rs"]
mod proptest_cases;

use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use axum::Router;
use axum::extract::{DefaultBodyLimit, State};
use axum::response::Json;
use axum::routing::{get, post};
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use serde_json::{Value, json};
use vl_runtime::engine::{Engine, EngineOptions, WhenFull};
use vl_runtime::model::{Model, ModelOptions};

/// Command-line (and environment) settings of the server.
#[derive(Debug, Clone, clap::Parser)]
#[command(name = "vl-serve", version, about = "OpenAI-compatible HTTP server for a vl engine directory")]
pub struct Args {
    /// Engine directory written by vl-export; its name is the model id.
    #[arg(long, env = "VL_SERVE_ENGINE")]
    pub engine: PathBuf,
    /// Address to listen on.
    #[arg(long, env = "VL_SERVE_HOST", default_value = "127.0.0.1")]
    pub host: String,
    /// Port to listen on (0: any free port; the one bound is printed).
    #[arg(long, env = "VL_SERVE_PORT", default_value_t = 8080)]
    pub port: u16,
    /// Directory that file:// media URLs must lie under (none: file:// URLs are refused).
    #[arg(long, env = "VL_SERVE_MEDIA_ROOT")]
    pub media_root: Option<PathBuf>,
    /// Largest request body in bytes (base64 media included); larger ones get 413.
    #[arg(long, env = "VL_SERVE_MAX_BODY", default_value_t = 64 << 20)]
    pub max_body: usize,
    /// Seconds a client has to send the whole body of a request once its headers are in; a
    /// slower one gets 408 and its connection is closed, so stalled clients hold no connection.
    #[arg(long, env = "VL_SERVE_READ_TIMEOUT", default_value_t = 30)]
    pub read_timeout: u64,
    /// Seconds a client has to send a request's headers (counted from the connection's start
    /// or the end of its previous request); a slower or idle one is disconnected, so clients
    /// that dribble headers (slowloris) hold no connection.
    #[arg(long, env = "VL_SERVE_HEADER_TIMEOUT", default_value_t = 10)]
    pub header_timeout: u64,
    /// Connections open at once; further ones wait in the listen backlog until one closes (a
    /// flood of idle connections cannot exhaust file descriptors).
    #[arg(long, env = "VL_SERVE_MAX_CONNECTIONS", default_value_t = 512)]
    pub max_connections: usize,
    /// Seconds ffmpeg may take to read one request's video or image; a slower one is stopped
    /// and the request gets 400.
    #[arg(long, env = "VL_SERVE_DECODE_TIMEOUT", default_value_t = 60)]
    pub decode_timeout: u64,
    /// Sequences decoded at once.
    #[arg(long, env = "VL_SERVE_MAX_ACTIVE", default_value_t = 8)]
    pub max_active: usize,
    /// Requests waiting for room before new ones get 429 (0: refuse any that cannot start now).
    #[arg(long, env = "VL_SERVE_MAX_WAITING", default_value_t = 64)]
    pub max_waiting: usize,
    /// KV slots: the active sequences plus idle conversations kept for follow-ups (default:
    /// twice --max-active).
    #[arg(long, env = "VL_SERVE_SLOTS")]
    pub slots: Option<usize>,
    /// KV cache memory the engine may hold, in MiB (default: every slot at full context).
    #[arg(long, env = "VL_SERVE_KV_BUDGET_MB")]
    pub kv_budget_mb: Option<u64>,
    /// Prompt tokens prefilled per step besides the decode rows (chunked prefill).
    #[arg(long, env = "VL_SERVE_PREFILL_CHUNK", default_value_t = 512)]
    pub prefill_chunk: usize,
    /// Finished conversations kept for follow-ups and other questions about the same media
    /// (the prefix cache; 0: off).
    #[arg(long, env = "VL_SERVE_PREFIX_CACHE", default_value_t = 16)]
    pub prefix_cache: usize,
    /// On SIGTERM or Ctrl-C: seconds to let requests in flight finish before they are cancelled.
    #[arg(long, env = "VL_SERVE_SHUTDOWN_TIMEOUT", default_value_t = 30)]
    pub shutdown_timeout: u64,
    /// ONNX Runtime intra-op threads (default: one per core).
    #[arg(long, env = "VL_SERVE_THREADS")]
    pub threads: Option<usize>,
    /// Where the graphs run: cpu, cuda[:N], tensorrt[:N], tensorrt-rtx[:N] or auto (CUDA when
    /// usable, else the CPU; the log says which).
    #[arg(long, env = "VL_SERVE_DEVICE", default_value = "cpu")]
    pub device: vl_runtime::Device,
}

/// Why the server could not start or stopped.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ServeError {
    /// Loading the engine directory or starting the engine failed.
    #[error(transparent)]
    Runtime(#[from] vl_runtime::Error),
    /// A setting is invalid.
    #[error("{0}")]
    Config(String),
    /// Binding or serving the socket failed.
    #[error("{what}")]
    Io {
        /// What was being done.
        what: String,
        /// What the OS said.
        #[source]
        source: std::io::Error,
    },
}

/// What every handler shares: the engine and the server's settings.
pub struct App {
    /// The serving engine.
    pub engine: Engine,
    /// The model id (the engine directory's name).
    pub model_id: String,
    /// Canonical media root for file:// URLs.
    pub media_root: Option<PathBuf>,
    /// When the engine was loaded (Unix seconds).
    pub created: u64,
    /// Counters and histograms of `/metrics`.
    pub metrics: metrics::Metrics,
    /// Set once shutdown began: `/ready` answers 503 so load balancers stop sending.
    pub draining: AtomicBool,
    /// How long a request's body may take to arrive (`--read-timeout`).
    pub read_timeout: Duration,
}

impl App {
    /// Loads the engine directory and starts the engine (blocking).
    pub fn load(args: &Args) -> Result<Self, ServeError> {
        let media_root = match &args.media_root {
            Some(root) => Some(
                std::fs::canonicalize(root)
                    .map_err(|source| ServeError::Io { what: format!("--media-root {}", root.display()), source })?,
            ),
            None => None,
        };
        let model_id = std::fs::canonicalize(&args.engine)
            .ok()
            .and_then(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()))
            .unwrap_or_else(|| args.engine.display().to_string());
        let mut options = ModelOptions::default();
        options.session.threads = args.threads;
        options.session.device = args.device;
        // TensorRT's profiles cover the decode batches and prefill chunks this server runs.
        options.session.tensorrt.max_batch = args.max_active;
        options.session.tensorrt.opt_sequence = args.prefill_chunk;
        options.decode.timeout = Duration::from_secs(args.decode_timeout);
        let model = Arc::new(Model::load(&args.engine, options)?);
        eprintln!("vl-serve: graphs on {} ({})", model.device().device, model.device().reason);
        // The engine's queue refuses when `waiting >= max_waiting`, so no queue at all is its
        // reject policy.
        let when_full = match args.max_waiting {
            0 => WhenFull::Reject,
            max_waiting => WhenFull::Queue { max_waiting },
        };
        let engine_options = EngineOptions {
            max_active: args.max_active,
            slots: args.slots.unwrap_or(2 * args.max_active),
            kv_budget_bytes: args.kv_budget_mb.map(|mb| mb << 20),
            prefill_chunk_tokens: args.prefill_chunk,
            when_full,
            prefix_cache: args.prefix_cache,
            ..EngineOptions::default()
        };
        let engine = Engine::start(model, engine_options)?;
        Ok(Self {
            engine,
            model_id,
            media_root,
            created: chat::now(),
            metrics: metrics::Metrics::new(),
            draining: AtomicBool::new(false),
            read_timeout: Duration::from_secs(args.read_timeout),
        })
    }
}

/// The routes over `app`; bodies larger than `max_body` bytes get 413.
pub fn router(app: Arc<App>, max_body: usize) -> Router {
    Router::new()
        .route("/", get(page))
        .route("/v1/chat/completions", post(chat::completions))
        .route("/v1/models", get(models))
        .route("/health", get(health))
        .route("/ready", get(ready))
        .route("/metrics", get(metrics_text))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(DefaultBodyLimit::max(max_body))
        .with_state(app)
}

async fn models(State(app): State<Arc<App>>) -> Json<Value> {
    Json(json!({
        "object": "list",
        "data": [{"id": app.model_id, "object": "model", "created": app.created, "owned_by": "vl"}],
    }))
}

/// The page (one file, inline CSS and script; it only talks to this server).
const PAGE: &str = include_str!("../static/index.html");

/// What the page may load: only itself and this server (no other origin, no plugins).
const PAGE_CSP: &str = "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; \
    connect-src 'self'; img-src blob:; media-src blob:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'";

async fn page() -> impl axum::response::IntoResponse {
    use axum::http::header;
    let headers = [
        (header::CONTENT_TYPE, "text/html; charset=utf-8"),
        (header::CONTENT_SECURITY_POLICY, PAGE_CSP),
        (header::CACHE_CONTROL, "no-cache"),
    ];
    (headers, PAGE)
}

async fn not_found(uri: axum::http::Uri) -> error::ApiError {
    error::ApiError {
        status: axum::http::StatusCode::NOT_FOUND,
        ..error::ApiError::invalid(format!("no route {}", uri.path()))
    }
}

async fn method_not_allowed(method: axum::http::Method, uri: axum::http::Uri) -> error::ApiError {
    error::ApiError {
        status: axum::http::StatusCode::METHOD_NOT_ALLOWED,
        ..error::ApiError::invalid(format!("{method} is not allowed on {}", uri.path()))
    }
}

async fn health() -> Json<Value> {
    Json(json!({"status": "ok"}))
}

/// Ready once the engine is loaded (the socket is bound only then), with what it is doing;
/// 503 once shutdown began.
async fn ready(State(app): State<Arc<App>>) -> (axum::http::StatusCode, Json<Value>) {
    let s = app.engine.stats();
    if app.draining.load(Ordering::Acquire) {
        let body = json!({"status": "draining", "active": s.active, "waiting": s.waiting});
        return (axum::http::StatusCode::SERVICE_UNAVAILABLE, Json(body));
    }
    (axum::http::StatusCode::OK, Json(json!({"status": "ready", "active": s.active, "waiting": s.waiting})))
}

async fn metrics_text(State(app): State<Arc<App>>) -> impl axum::response::IntoResponse {
    let text = app.metrics.render(&app.engine.stats());
    ([(axum::http::header::CONTENT_TYPE, metrics::CONTENT_TYPE)], text)
}

/// A loaded engine and a bound socket, ready to serve.
pub struct Server {
    listener: tokio::net::TcpListener,
    router: Router,
    addr: SocketAddr,
    app: Arc<App>,
    shutdown_timeout: Duration,
    header_timeout: Duration,
    max_connections: usize,
}

impl Server {
    /// Loads the engine (on a blocking thread) and binds `--host:--port`.
    pub async fn bind(args: &Args) -> Result<Self, ServeError> {
        if args.max_active == 0 {
            return Err(ServeError::Config("--max-active must be at least 1".into()));
        }
        if args.read_timeout == 0 {
            return Err(ServeError::Config("--read-timeout must be at least 1 second".into()));
        }
        if args.header_timeout == 0 {
            return Err(ServeError::Config("--header-timeout must be at least 1 second".into()));
        }
        if args.decode_timeout == 0 {
            return Err(ServeError::Config("--decode-timeout must be at least 1 second".into()));
        }
        if args.max_connections == 0 {
            return Err(ServeError::Config("--max-connections must be at least 1".into()));
        }
        let a = args.clone();
        let app = tokio::task::spawn_blocking(move || App::load(&a))
            .await
            .map_err(|e| ServeError::Config(format!("loading the engine panicked: {e}")))??;
        let app = Arc::new(app);
        let listener = tokio::net::TcpListener::bind((args.host.as_str(), args.port))
            .await
            .map_err(|source| ServeError::Io { what: format!("binding {}:{}", args.host, args.port), source })?;
        let addr = listener
            .local_addr()
            .map_err(|source| ServeError::Io { what: "reading the bound address".into(), source })?;
        let shutdown_timeout = Duration::from_secs(args.shutdown_timeout);
        Ok(Self {
            listener,
            router: router(app.clone(), args.max_body),
            addr,
            app,
            shutdown_timeout,
            header_timeout: Duration::from_secs(args.header_timeout),
            max_connections: args.max_connections,
        })
    }

    /// The address bound (the real port when `--port 0`).
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// The shared state (the engine and its stats).
    pub fn app(&self) -> &Arc<App> {
        &self.app
    }

    /// Serves until Ctrl-C (or SIGTERM).
    pub async fn run(self) -> Result<(), ServeError> {
        self.run_until(shutdown_signal()).await
    }

    /// Serves until `shutdown` completes; then stops accepting, lets the requests in flight
    /// finish for at most `--shutdown-timeout` seconds, and cancels the rest.
    ///
    /// HTTP/1 over hyper directly (axum's `serve` has no header timeout): each connection has
    /// `--header-timeout` to send a request's headers, and at most `--max-connections` are open.
    pub async fn run_until(self, shutdown: impl Future<Output = ()> + Send + 'static) -> Result<(), ServeError> {
        let mut http = hyper::server::conn::http1::Builder::new();
        http.timer(TokioTimer::new()).header_read_timeout(self.header_timeout);
        let permits = Arc::new(tokio::sync::Semaphore::new(self.max_connections));
        let graceful = GracefulShutdown::new();
        // Dropping the set aborts the connections' tasks, which drops the handles of their
        // requests and so cancels them.
        let mut connections = tokio::task::JoinSet::new();
        let mut shutdown = std::pin::pin!(shutdown);
        loop {
            let accepted = tokio::select! {
                () = &mut shutdown => break,
                Some(_) = connections.join_next(), if !connections.is_empty() => continue,
                accepted = accept(&self.listener, &permits) => accepted,
            };
            let Some((stream, permit)) = accepted else { continue };
            let connection = http.serve_connection(TokioIo::new(stream), TowerToHyperService::new(self.router.clone()));
            let connection = graceful.watch(connection);
            connections.spawn(async move {
                // A connection's errors (a client gone, a header timeout) concern only it.
                let _ = connection.await;
                drop(permit);
            });
        }
        drop(self.listener);
        self.app.draining.store(true, Ordering::Release);
        let s = self.app.engine.stats();
        eprintln!("vl-serve: shutting down; {} active and {} waiting requests", s.active, s.waiting);
        let timeout = self.shutdown_timeout;
        if tokio::time::timeout(timeout, graceful.shutdown()).await.is_err() {
            eprintln!("vl-serve: shutdown deadline of {} s passed; cancelling what is left", timeout.as_secs());
        }
        drop(connections);
        Ok(())
    }
}

/// The next connection with its permit (waiting for one while `--max-connections` are open);
/// `None` when accepting failed (logged; after a pause if the process is out of descriptors or
/// memory, so that the loop does not spin).
async fn accept(
    listener: &tokio::net::TcpListener,
    permits: &Arc<tokio::sync::Semaphore>,
) -> Option<(tokio::net::TcpStream, tokio::sync::OwnedSemaphorePermit)> {
    // The semaphore is never closed.
    let permit = permits.clone().acquire_owned().await.ok()?;
    match listener.accept().await {
        Ok((stream, _)) => Some((stream, permit)),
        Err(e) => {
            use std::io::ErrorKind::{ConnectionAborted, ConnectionRefused, ConnectionReset};
            if !matches!(e.kind(), ConnectionAborted | ConnectionRefused | ConnectionReset) {
                eprintln!("vl-serve: accepting a connection failed: {e}");
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
            None
        }
    }
}

async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(s) => s,
            Err(_) => {
                let _ = ctrl_c.await;
                return;
            }
        };
        tokio::select! {
            _ = ctrl_c => {},
            _ = term.recv() => {},
        }
    }
    #[cfg(not(unix))]
    {
        let _ = ctrl_c.await;
    }
}
