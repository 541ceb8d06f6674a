//! What the serve tests share: the tiny fixture engine served in-process on 127.0.0.1 port 0,
//! and `/metrics` read back. Every wait is bounded by [`PATIENCE`], as a guard against a hang,
//! never as a measurement.
// Each test binary uses part of this module.
#![allow(dead_code, clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::Parser;
use vl_runtime::manifest::Target;
use vl_serve::{App, Args, Server};

/// The bound on every wait: far past anything a healthy server takes.
pub const PATIENCE: Duration = Duration::from_secs(60);

/// The tiny fixture engine (built once per test run by vl-e2e).
pub fn engine_dir() -> String {
    vl_e2e::built_for("tiny", Some(Target::OnnxRuntime)).engine.display().to_string()
}

/// The id the server gives the engine (its directory's name).
pub fn model_id() -> String {
    std::fs::canonicalize(engine_dir()).unwrap().file_name().unwrap().to_string_lossy().into_owned()
}

/// Starts a server over the tiny engine with `extra` flags in this test's runtime; returns its
/// base URL.
pub async fn start(extra: &[&str]) -> String {
    start_app(extra).await.0
}

/// Like [`start`], with the server's shared state (its engine).
pub async fn start_app(extra: &[&str]) -> (String, Arc<App>) {
    let engine = tokio::task::spawn_blocking(engine_dir).await.unwrap();
    let mut argv = vec!["vl-serve", "--engine", &engine, "--port", "0", "--threads", "1"];
    argv.extend_from_slice(extra);
    let server = Server::bind(&Args::parse_from(argv)).await.unwrap();
    let url = format!("http://{}", server.local_addr());
    let app = server.app().clone();
    tokio::spawn(server.run_until(std::future::pending()));
    (url, app)
}

/// The samples of `/metrics` by name (labels included).
pub async fn metrics(url: &str) -> BTreeMap<String, f64> {
    let r = reqwest::get(format!("{url}/metrics")).await.unwrap();
    assert_eq!(r.status(), 200);
    let text = r.text().await.unwrap();
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| l.rsplit_once(' '))
        .filter_map(|(name, value)| Some((name.to_string(), value.parse().ok()?)))
        .collect()
}

/// Polls `/metrics` until no sequence is active or waiting and no KV is in use by one; returns
/// the last scrape. Fails, naming `after`, if that takes longer than [`PATIENCE`].
pub async fn settled(url: &str, after: &str) -> BTreeMap<String, f64> {
    let started = Instant::now();
    loop {
        let m = metrics(url).await;
        let busy = ["vl_active_sequences", "vl_queue_depth", "vl_kv_in_use_bytes"]
            .map(|name| *m.get(name).unwrap_or_else(|| panic!("no {name} in /metrics: {m:?}")));
        if busy == [0.0; 3] {
            return m;
        }
        assert!(started.elapsed() < PATIENCE, "still busy after {after}: {busy:?}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}
