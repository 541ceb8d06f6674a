//! OpenAI's own Python client (`openai`, installed into `.venv` by `make setup`) against a
//! running vl-serve: for a video (as a `data:` URL and as a file under `--media-root`), an
//! image, and text alone, the plain and the streamed answers equal the greedy answer of the
//! same engine through vl-runtime's `Pipeline` (what `vl-run` prints), stop strings cut the
//! answer where `Pipeline` cuts it, a follow-up that resends the conversation answers as the
//! engine's stateless follow-up does, and bad media, a file outside the media root and too long
//! a prompt raise the client's `BadRequestError` while unknown fields are tolerated.
#![allow(clippy::unwrap_used)]

mod support;

use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::{Value, json};
use support::{engine_dir, start};
use vl_runtime::engine::{Event, Request};
use vl_runtime::prompt::Exchange;
use vl_runtime::{Flow, GenerateOptions, Media, Pipeline, PipelineOptions};

const MAX_TOKENS: usize = 10;

fn python() -> PathBuf {
    std::env::var_os("VL_SERVE_TEST_PYTHON")
        .map(Into::into)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../.venv/bin/python"))
}

fn ffmpeg(path: &Path, frames: usize) {
    let status = Command::new("ffmpeg")
        .args(["-v", "error", "-y", "-f", "lavfi", "-i", "testsrc=size=64x48:rate=8", "-frames:v"])
        .arg(frames.to_string())
        .args(["-pix_fmt", if frames == 1 { "rgb24" } else { "yuv420p" }])
        .arg(path)
        .status()
        .expect("ffmpeg runs (make setup installs it)");
    assert!(status.success(), "ffmpeg could not write {}", path.display());
}

fn greedy(stop: &[&str]) -> GenerateOptions {
    GenerateOptions {
        max_new_tokens: MAX_TOKENS,
        ignore_eos: true,
        stop: stop.iter().map(|s| s.to_string()).collect(),
        ..GenerateOptions::default()
    }
}

/// `Pipeline`'s greedy answer (the text `vl-run` prints).
fn reference(p: &Pipeline, media: Media, question: &str, stop: &[&str]) -> String {
    p.conversation(media).unwrap().ask(question, &greedy(stop), &mut |_| Flow::Continue).unwrap().text
}

/// The engine's answer to a question that follows `earlier` (a stateless follow-up).
fn follow_up(p: &Pipeline, media: Media, earlier: Vec<Exchange>, question: &str) -> String {
    let request = Request { earlier, options: greedy(&[]), ..Request::new(media, question) };
    let handle = p.engine().submit(request).unwrap();
    loop {
        match handle.recv().expect("the answer's channel closed early") {
            Event::Done(done) => return done.answer.text,
            Event::Failed(e) => panic!("follow-up failed: {e}"),
            _ => {}
        }
    }
}

const SCRIPT: &str = r#"
import base64, json, sys, openai
url, video, image, root, stop = sys.argv[1:6]
c = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)
model = c.models.list().data[0].id
def data_url(path, mime):
    return "data:%s;base64,%s" % (mime, base64.b64encode(open(path, "rb").read()).decode())
def user(part, text):
    return [{"role": "user", "content": ([part] if part else []) + [{"type": "text", "text": text}]}]
kw = dict(model=model, max_tokens=%MAX%, temperature=0, extra_body={"ignore_eos": True})
def both(messages, **extra):
    plain = c.chat.completions.create(messages=messages, **kw, **extra).choices[0].message.content
    streamed = ""
    for chunk in c.chat.completions.create(messages=messages, stream=True, **kw, **extra):
        for ch in chunk.choices:
            streamed += ch.delta.content or ""
    return {"plain": plain, "streamed": streamed}
parts = {
    "video_data": {"type": "video_url", "video_url": {"url": data_url(video, "video/mp4")}},
    "video_file": {"type": "video_url", "video_url": {"url": "file://" + video}},
    "image_data": {"type": "image_url", "image_url": {"url": data_url(image, "image/png")}},
    "text": None,
}
out = {name: both(user(part, "What is it?")) for name, part in parts.items()}
out["stop"] = both(user(parts["video_file"], "What is it?"), stop=[stop])
first = out["video_file"]["plain"]
out["follow_up"] = both(user(parts["video_file"], "What is it?") + [
    {"role": "assistant", "content": first}, {"role": "user", "content": "And then?"}])
out["unknown_fields"] = c.chat.completions.create(messages=user(None, "Hi"), **{**kw, "extra_body":
    {"ignore_eos": True, "some_future_field": [1, 2], "another": {"x": 1}}}).choices[0].finish_reason
errors = {}
bad = {
    "junk_media": dict(messages=user({"type": "video_url", "video_url": {"url": "file://" + root + "/junk.mp4"}}, "?")),
    "outside_root": dict(messages=user({"type": "video_url", "video_url": {"url": "file:///etc/passwd"}}, "?")),
    "dotdot": dict(messages=user({"type": "video_url", "video_url": {"url": "file://" + root + "/../x.mp4"}}, "?")),
    "http_scheme": dict(messages=user({"type": "image_url", "image_url": {"url": "http://example.com/a.png"}}, "?")),
    "too_long": dict(messages=user(None, "?"), max_tokens=1000000),
}
for name, req in bad.items():
    args = {**kw, **req}
    try:
        c.chat.completions.create(**args)
        errors[name] = None
    except openai.BadRequestError as e:
        errors[name] = {"status": e.status_code, "message": e.message}
out["errors"] = errors
print(json.dumps(out))
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn answers_equal_the_pipelines_for_every_media_and_errors_are_openai_errors() {
    let python = python();
    let has_openai = Command::new(&python).args(["-c", "import openai"]).output().is_ok_and(|o| o.status.success());
    assert!(has_openai, "{} cannot import openai: run `make setup`", python.display());
    let root = tempfile::tempdir().unwrap();
    let root_path = root.path().canonicalize().unwrap();
    let (video, image) = (root_path.join("clip.mp4"), root_path.join("frame.png"));
    ffmpeg(&video, 16);
    ffmpeg(&image, 1);
    std::fs::write(root_path.join("junk.mp4"), b"not a video").unwrap();

    let dir = engine_dir();
    let (p, want) = tokio::task::spawn_blocking({
        let (dir, video, image) = (dir.clone(), video.clone(), image.clone());
        move || {
            let p = Pipeline::load(&dir, PipelineOptions::default()).unwrap();
            let q = "What is it?";
            let mut want = serde_json::Map::new();
            let video_answer = reference(&p, Media::VideoFile(video.clone()), q, &[]);
            want.insert("video_data".into(), json!(video_answer));
            want.insert("video_file".into(), json!(video_answer));
            want.insert("image_data".into(), json!(reference(&p, Media::ImageFile(image), q, &[])));
            want.insert("text".into(), json!(reference(&p, Media::Text, q, &[])));
            (p, want)
        }
    })
    .await
    .unwrap();
    // A stop string from the middle of the video's answer: the answer ends before it.
    let video_answer = want["video_file"].as_str().unwrap().to_string();
    let chars: Vec<char> = video_answer.chars().collect();
    assert!(chars.len() >= 4, "the video's answer is too short to cut: {video_answer:?}");
    let stop: String = chars[chars.len() / 2..chars.len() / 2 + 2].iter().collect();

    let url = start(&["--media-root", root_path.to_str().unwrap()]).await;

    let script = SCRIPT.replace("%MAX%", &MAX_TOKENS.to_string());
    let args =
        [url, video.display().to_string(), image.display().to_string(), root_path.display().to_string(), stop.clone()];
    let out =
        tokio::task::spawn_blocking(move || Command::new(python).arg("-c").arg(script).args(args).output().unwrap())
            .await
            .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let got: Value = serde_json::from_slice(&out.stdout).unwrap();

    for (name, answer) in &want {
        assert_eq!(got[name]["plain"], *answer, "{name}: the plain answer differs from Pipeline's");
        assert_eq!(got[name]["streamed"], *answer, "{name}: the streamed answer differs from Pipeline's");
    }
    let (stopped, follow) = tokio::task::spawn_blocking({
        let (video, first, stop) = (video.clone(), video_answer.clone(), stop.clone());
        move || {
            let stopped = reference(&p, Media::VideoFile(video.clone()), "What is it?", &[&stop]);
            let earlier = vec![Exchange { question: "What is it?".into(), answer: first }];
            (stopped, follow_up(&p, Media::VideoFile(video), earlier, "And then?"))
        }
    })
    .await
    .unwrap();
    assert!(!stopped.contains(&stop) && video_answer.starts_with(&stopped), "{stopped:?} vs {video_answer:?}");
    assert_eq!(got["stop"]["plain"], json!(stopped));
    assert_eq!(got["stop"]["streamed"], json!(stopped));
    assert_eq!(got["follow_up"]["plain"], json!(follow));
    assert_eq!(got["follow_up"]["streamed"], json!(follow));
    assert_eq!(got["unknown_fields"], "length");
    for name in ["junk_media", "outside_root", "dotdot", "http_scheme", "too_long"] {
        let e = &got["errors"][name];
        assert_eq!(e["status"], 400, "{name}: {e}");
    }
    let too_long = got["errors"]["too_long"]["message"].as_str().unwrap();
    assert!(too_long.contains("context"), "{too_long}");
}
