//! The `vl-run` binary on the tiny fixture engine: golden tokens from `--pixel-values`, clear
//! errors for bad input, odd videos, and a demo-style run on a real video.
//!
//! These tests live in the package that owns the binary, so cargo builds the `vl-run` they run
//! from the current sources (`CARGO_BIN_EXE_vl-run`). Videos are made with the system `ffmpeg`.
#![allow(clippy::unwrap_used)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use serde_json::Value;
use vl_e2e::{built, fixture_dir};

/// The `vl-run` that cargo built for this test from the current sources.
fn vl_run() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_vl-run"))
}

fn engine() -> &'static Path {
    &built("tiny").engine
}

fn golden() -> Value {
    serde_json::from_str(&std::fs::read_to_string(fixture_dir("tiny").join("golden.json")).unwrap()).unwrap()
}

/// `vl-run` as a user runs it: no backtraces asked for, no progress bars (stderr is a pipe).
fn vl_run_command() -> Command {
    let mut cmd = Command::new(vl_run());
    cmd.env_remove("RUST_BACKTRACE").env_remove("RUST_LIB_BACKTRACE").env_remove("VL_ENGINE");
    cmd
}

fn run(args: &[&str]) -> Output {
    let out = vl_run_command().arg("--engine").arg(engine()).args(args).output().unwrap();
    eprintln!(
        "vl-run {args:?}: {}\n--- stderr\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr).chars().take(2000).collect::<String>()
    );
    out
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// The last line of `--json` output: the answer with timings.
fn final_json(out: &Output) -> Value {
    let stdout = String::from_utf8_lossy(&out.stdout);
    let line = stdout.lines().rev().find(|l| !l.trim().is_empty()).expect("no output");
    let v: Value = serde_json::from_str(line).unwrap_or_else(|e| panic!("{e}: {line}"));
    assert!(v.get("token_ids").is_some(), "the last line is not the answer: {line}");
    v
}

/// Fails unless `out` is a clean failure whose message mentions every one of `needles`.
fn assert_clear_error(out: &Output, needles: &[&str]) {
    let err = stderr(out);
    assert!(!out.status.success(), "expected a failure, got success; stderr:\n{err}");
    assert_eq!(out.status.code(), Some(1), "not a clean exit (killed or panicked?): {err}");
    assert!(!err.contains("panicked") && !err.contains("RUST_BACKTRACE"), "vl-run panicked:\n{err}");
    for needle in needles {
        assert!(err.contains(needle), "stderr does not mention {needle:?}:\n{err}");
    }
}

fn ffmpeg(args: &[&str]) {
    let out = Command::new("ffmpeg").args(["-loglevel", "error", "-y"]).args(args).output().unwrap();
    assert!(out.status.success(), "ffmpeg {args:?}: {}", String::from_utf8_lossy(&out.stderr));
}

fn testsrc(dir: &Path, name: &str, source: &str, extra: &[&str]) -> PathBuf {
    let path = dir.join(name);
    let mut args = vec!["-f", "lavfi", "-i", source];
    args.extend_from_slice(extra);
    args.push(path.to_str().unwrap());
    ffmpeg(&args);
    path
}

fn ids(v: &Value) -> Vec<u64> {
    v.as_array().unwrap().iter().map(|x| x.as_u64().unwrap()).collect()
}

#[test]
fn pixel_values_greedy_matches_the_golden() {
    let g = golden();
    let px = fixture_dir("tiny").join("pixel_values_videos.npy");
    let prompt = g["prompt"].as_str().unwrap();
    let out = run(&[
        "--pixel-values",
        px.to_str().unwrap(),
        "--prompt",
        prompt,
        "--json",
        "--ignore-eos",
        "--max-new-tokens",
        "32",
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    let answer = final_json(&out);
    assert_eq!(ids(&answer["token_ids"]), ids(&g["greedy_tokens"]));
    assert_eq!(answer["finish"], "max_tokens");
    // Every token was streamed as its own line before the answer.
    let stdout = String::from_utf8_lossy(&out.stdout);
    let streamed: Vec<u64> = stdout
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter_map(|v| v.get("token").and_then(Value::as_u64))
        .collect();
    assert_eq!(streamed, ids(&g["greedy_tokens"]));
}

#[test]
fn bad_video_files_are_clear_errors() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let ask = |video: &Path| run(&["--video", video.to_str().unwrap(), "--prompt", "What is this?"]);

    let missing = d.join("missing.mp4");
    assert_clear_error(&ask(&missing), &["missing.mp4"]);

    let empty = d.join("empty.mp4");
    std::fs::write(&empty, b"").unwrap();
    assert_clear_error(&ask(&empty), &["empty.mp4", "empty"]);

    let whole = testsrc(d, "whole.mp4", "testsrc2=size=64x48:rate=10:duration=1", &["-pix_fmt", "yuv420p"]);
    let bytes = std::fs::read(&whole).unwrap();
    let truncated = d.join("truncated.mp4");
    std::fs::write(&truncated, &bytes[..bytes.len() / 2]).unwrap();
    assert_clear_error(&ask(&truncated), &["truncated.mp4"]);

    // With the index at the front (faststart), ffprobe reads the header but frames are missing.
    let faststart = testsrc(
        d,
        "faststart.mp4",
        "testsrc2=size=64x48:rate=10:duration=1",
        &["-pix_fmt", "yuv420p", "-movflags", "+faststart"],
    );
    let bytes = std::fs::read(&faststart).unwrap();
    for (name, keep) in [("fs-half.mp4", bytes.len() / 2), ("fs-eighth.mp4", bytes.len() / 8)] {
        let cut = d.join(name);
        std::fs::write(&cut, &bytes[..keep]).unwrap();
        let out = ask(&cut);
        // Answering from the frames that decode would be fine too; a panic or a vague error is not.
        if !out.status.success() {
            assert_clear_error(&out, &[name]);
        }
    }

    let text = d.join("notes.mp4");
    std::fs::write(&text, "This is a text file, not a video.\n".repeat(20)).unwrap();
    assert_clear_error(&ask(&text), &["notes.mp4"]);

    let audio = testsrc(d, "a.m4a", "sine=duration=1", &["-vn"]);
    assert_clear_error(&ask(&audio), &["a.m4a", "audio"]);
}

#[test]
fn missing_engine_directory_is_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("no-engine");
    let px = fixture_dir("tiny").join("pixel_values_videos.npy");
    let out = vl_run_command()
        .arg("--engine")
        .arg(&missing)
        .args(["--pixel-values", px.to_str().unwrap(), "--prompt", "Hi"])
        .output()
        .unwrap();
    assert_clear_error(&out, &["no-engine", "manifest.yaml"]);
}

#[test]
fn prompt_longer_than_the_context_is_a_clear_error() {
    let px = fixture_dir("tiny").join("pixel_values_videos.npy");
    let words = ["what", "does", "the", "horse", "on", "beach", "do", "next", "and", "why"];
    let question = (0..600).map(|i| words[i % words.len()]).collect::<Vec<_>>().join(" ");
    let out = run(&["--pixel-values", px.to_str().unwrap(), "--prompt", &question, "--max-new-tokens", "8"]);
    assert_clear_error(&out, &["context", "512"]);
}

#[test]
fn one_frame_video_works() {
    let dir = tempfile::tempdir().unwrap();
    let video =
        testsrc(dir.path(), "one.mp4", "testsrc2=size=64x48:rate=10", &["-frames:v", "1", "-pix_fmt", "yuv420p"]);
    let out =
        run(&["--video", video.to_str().unwrap(), "--prompt", "What is this?", "--json", "--max-new-tokens", "4"]);
    assert!(out.status.success(), "{}", stderr(&out));
    final_json(&out);
}

#[test]
fn video_in_4k_keeps_memory_bounded() {
    let dir = tempfile::tempdir().unwrap();
    let video = testsrc(dir.path(), "uhd.mp4", "testsrc2=size=3840x2160:rate=2:duration=1", &["-pix_fmt", "yuv420p"]);
    let out =
        run(&["--video", video.to_str().unwrap(), "--prompt", "What is this?", "--json", "--max-new-tokens", "4"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let peak = final_json(&out)["peak_rss_mb"].as_f64().expect("peak_rss_mb in the answer line");
    eprintln!("peak RSS {peak:.0} MB on a 4K video");
    assert!(peak < 1500.0, "peak RSS {peak:.0} MB on a 4K video");
}

#[test]
fn demo_on_a_real_video_prints_an_answer_and_stats() {
    let dir = tempfile::tempdir().unwrap();
    let video = testsrc(dir.path(), "demo.mp4", "testsrc2=size=160x120:rate=25:duration=2", &["-pix_fmt", "yuv420p"]);
    let out = run(&[
        "--video",
        video.to_str().unwrap(),
        "--prompt",
        "What happens in this video?",
        "--max-new-tokens",
        "16",
        "--ignore-eos",
        "--stats",
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.trim_end_matches('\n').chars().count() > 0, "no answer printed: {stdout:?}");
    let err = stderr(&out);
    assert!(err.contains("[stats]") && err.contains("vision") && err.contains("ms/token"), "no stats: {err}");
}

#[test]
fn interactive_mode_skips_lines_it_cannot_ask_and_answers_the_rest() {
    use std::io::Write;
    let px = fixture_dir("tiny").join("pixel_values_videos.npy");
    let mut child = vl_run_command()
        .arg("--engine")
        .arg(engine())
        .args(["--pixel-values", px.to_str().unwrap(), "--json", "--max-new-tokens", "3", "--ignore-eos"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    // Invalid UTF-8 (a lone continuation byte, an overlong NUL), a question with the video
    // placeholder in it, control characters, a good question, then the empty line that quits.
    stdin
        .write_all(b"what \x80 is this\n\xc0\x80\nwhat is <video>?\n\x1b[2J\x07\r\nWhat is this?\n\nnot asked\n")
        .unwrap();
    drop(stdin);
    let out = child.wait_with_output().unwrap();
    let err = stderr(&out);
    assert!(out.status.success(), "{err}");
    assert!(err.contains("line 1 of the input is not valid UTF-8") && err.contains("line 2 "), "{err}");
    assert!(err.contains("<video>") && err.contains("ask another question"), "{err}");
    assert!(!err.contains("panicked"), "{err}");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let answers: Vec<Value> = stdout
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter(|v| v.get("token_ids").is_some())
        .collect();
    // The control-character line and the good question are answered; nothing after the empty line.
    assert_eq!(answers.len(), 2, "{stdout}");
    assert!(answers.iter().all(|a| a["token_ids"].as_array().unwrap().len() == 3), "{stdout}");
}
