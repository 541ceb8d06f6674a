//! vl-serve's page (`GET /`) in a real browser: Debian's headless Chromium driven by
//! Playwright (`browser.py`) against the tiny fixture engine served in-process on port 0. It
//! uploads an ffmpeg clip, asks, waits for the streamed answer and its figures, asks a
//! follow-up, shows a server error, and starts over with an image dropped on the page. Chromium, Playwright or ffmpeg missing is a
//! failure (`make setup` installs them) unless `VL_SKIP_BROWSER=1`.
#![allow(clippy::unwrap_used)]

mod support;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;
use support::{model_id, start};

/// Longest the browser script may run (it bounds each of its own waits at 60 s).
const BROWSER_DEADLINE: Duration = Duration::from_secs(300);

/// The python with Playwright: `VL_SERVE_TEST_PYTHON`, else the workspace's `.venv`.
fn python() -> PathBuf {
    std::env::var_os("VL_SERVE_TEST_PYTHON")
        .map(Into::into)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../.venv/bin/python"))
}

/// Chromium: `VL_CHROMIUM`, else Debian's `/usr/bin/chromium`.
fn chromium() -> PathBuf {
    std::env::var_os("VL_CHROMIUM").map_or_else(|| "/usr/bin/chromium".into(), Into::into)
}

/// `true` (after a note) when `VL_SKIP_BROWSER=1` lets the test skip over what is missing;
/// otherwise the test fails, naming it.
fn missing(what: &str) -> bool {
    if std::env::var("VL_SKIP_BROWSER").is_ok_and(|v| v == "1") {
        eprintln!("note: {what}; skipping the browser test (VL_SKIP_BROWSER=1)");
        return true;
    }
    panic!("{what}: run `make setup`, or set VL_SKIP_BROWSER=1 to skip the browser test");
}

/// Writes `frames` 64x48 frames of ffmpeg's test source at 8 fps: a video, or a PNG image.
fn ffmpeg_clip(path: &Path, frames: usize) -> bool {
    Command::new("ffmpeg")
        .args(["-v", "error", "-y", "-f", "lavfi", "-i", "testsrc=size=64x48:rate=8", "-frames:v"])
        .arg(frames.to_string())
        .args(["-pix_fmt", if frames == 1 { "rgb24" } else { "yuv420p" }])
        .arg(path)
        .status()
        .is_ok_and(|s| s.success())
}

/// Runs `command` to its end or the deadline (then kills it); its exit status, stdout and
/// stderr (kept in files, so that a chatty child cannot fill a pipe and stall).
fn run_bounded(mut command: Command, deadline: Duration) -> (std::process::ExitStatus, String, String) {
    let dir = tempfile::tempdir().unwrap();
    let (out, err) = (dir.path().join("stdout"), dir.path().join("stderr"));
    let mut child = command
        .stdin(Stdio::null())
        .stdout(std::fs::File::create(&out).unwrap())
        .stderr(std::fs::File::create(&err).unwrap())
        .spawn()
        .unwrap();
    let started = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if started.elapsed() > deadline {
            child.kill().unwrap();
            child.wait().unwrap();
            let stderr = std::fs::read_to_string(&err).unwrap_or_default();
            panic!("the browser script did not finish within {} s; stderr:\n{stderr}", deadline.as_secs());
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    (status, std::fs::read_to_string(out).unwrap(), std::fs::read_to_string(err).unwrap())
}

/// The page is HTML with a policy that keeps it to this server; unknown routes are still
/// OpenAI's 404 error object.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_page_is_served_beside_the_api() {
    let url = start(&[]).await;
    let r = reqwest::get(format!("{url}/")).await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["content-type"], "text/html; charset=utf-8");
    let csp = r.headers()["content-security-policy"].to_str().unwrap().to_string();
    assert!(csp.contains("default-src 'none'") && csp.contains("connect-src 'self'"), "{csp}");
    let html = r.text().await.unwrap();
    assert!(html.starts_with("<!doctype html>") && html.contains("/v1/chat/completions"));
    assert!(!html.contains("http://") && !html.contains("https://"), "the page names another origin");
    for path in ["/index.htm", "/v1", "/static/index.html"] {
        let r = reqwest::get(format!("{url}{path}")).await.unwrap();
        assert_eq!(r.status(), 404, "{path}");
        let v: Value = r.json().await.unwrap();
        assert!(v["error"]["message"].as_str().unwrap().contains("no route"), "{v}");
    }
    let r = reqwest::Client::new().post(format!("{url}/")).send().await.unwrap();
    assert_eq!(r.status(), 405);
}

/// The page in headless Chromium: a video uploaded, a question and a follow-up streamed with
/// their time to first token and tokens/s, the requests it sent, an error shown, a new
/// conversation about a dropped image (the checks are in `browser.py`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_page_asks_about_a_video_in_chromium() {
    let (python, chromium) = (python(), chromium());
    if !chromium.is_file() && missing(&format!("no Chromium at {}", chromium.display())) {
        return;
    }
    let has_playwright =
        Command::new(&python).args(["-c", "import playwright.sync_api"]).output().is_ok_and(|o| o.status.success());
    if !has_playwright && missing(&format!("{} cannot import playwright", python.display())) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (clip, png) = (dir.path().join("clip.mp4"), dir.path().join("frame.png"));
    if !(ffmpeg_clip(&clip, 16) && ffmpeg_clip(&png, 1)) && missing("ffmpeg could not make the test media") {
        return;
    }
    let url = start(&[]).await;
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/browser.py");
    let mut command = Command::new(python);
    command.arg(script).arg(&url).arg(&clip).arg(&png).arg(&chromium);
    let (status, stdout, stderr) =
        tokio::task::spawn_blocking(move || run_bounded(command, BROWSER_DEADLINE)).await.unwrap();
    assert!(status.success(), "the browser script failed ({status}):\n{stderr}");
    let v: Value = serde_json::from_str(stdout.trim()).unwrap_or_else(|e| panic!("{e}: {stdout:?}"));
    assert_eq!(v["model"], model_id());
    assert_eq!(v["content_type"], "text/html; charset=utf-8");
    eprintln!("browser: {v}");
}
