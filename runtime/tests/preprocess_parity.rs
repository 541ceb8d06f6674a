//! Decoding and preprocessing against the transformers Video-LLaVA processors.
//!
//! Fixtures in `tests/fixtures/preprocess/` were made by `tools/preprocess_golden.py` (its
//! README there says how): two small videos, the pixel values the Hugging Face processor
//! computes from their 8 sampled frames, and `golden.json` with the sampled indices and a
//! hash of every decoded frame. The error cases build their inputs with ffmpeg in a tempdir.
//! Needs `ffmpeg` and `ffprobe` on PATH.

use std::path::{Path, PathBuf};
use std::process::Command;

use ndarray::{Array5, ArrayView4};
use serde::Deserialize;
use sha2::{Digest, Sha256};
use vl_runtime::preprocess::{PreprocessConfig, load_pixel_values_npy, preprocess_image, preprocess_video};
use vl_runtime::video::{FrameSampling, VideoError, decode_frames, load_image, load_video, probe, sample_indices};

/// Largest accepted |rust - transformers| on normalized pixel values (one u8 level is
/// 1 / 255 / std ≈ 0.015).
const TOLERANCE: f32 = 0.02;

#[derive(Debug, Deserialize)]
struct Golden {
    frames: usize,
    versions: Versions,
    videos: std::collections::BTreeMap<String, GoldenVideo>,
    images: std::collections::BTreeMap<String, GoldenImage>,
}

#[derive(Debug, Deserialize)]
struct Versions {
    ffmpeg: String,
}

#[derive(Debug, Deserialize)]
struct GoldenVideo {
    file: String,
    n_frames: usize,
    width: u32,
    height: u32,
    rotation: u32,
    indices: Vec<usize>,
    frame_sha256: Vec<String>,
}

#[derive(Debug, Deserialize)]
struct GoldenImage {
    file: String,
    width: u32,
    height: u32,
}

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/preprocess")
}

fn golden() -> Golden {
    let text = std::fs::read_to_string(fixtures().join("golden.json")).expect("golden.json");
    serde_json::from_str(&text).expect("golden.json parses")
}

fn ffmpeg_version_line() -> String {
    let out = Command::new("ffmpeg").arg("-version").output().expect("ffmpeg runs");
    String::from_utf8_lossy(&out.stdout).lines().next().unwrap_or_default().to_string()
}

/// Runs ffmpeg with `args` (inputs from lavfi) writing `out`.
fn make_media(out: &Path, args: &[&str]) {
    let status = Command::new("ffmpeg")
        .args(["-hide_banner", "-loglevel", "error", "-nostdin", "-y"])
        .args(args)
        .arg(out)
        .status()
        .expect("ffmpeg runs");
    assert!(status.success(), "ffmpeg failed making {}", out.display());
}

/// Max |a - b| and how many values differ by more than half a u8 level.
fn compare(rust: ArrayView4<f32>, want: ArrayView4<f32>) -> (f32, usize) {
    assert_eq!(rust.shape(), want.shape());
    let mut max = 0.0f32;
    let mut off_by_level = 0;
    for (a, b) in rust.iter().zip(want.iter()) {
        let d = (a - b).abs();
        max = max.max(d);
        if d > 0.007 {
            off_by_level += 1;
        }
    }
    (max, off_by_level)
}

fn sha256_hex(bytes: &[u8]) -> String {
    Sha256::digest(bytes).iter().map(|b| format!("{b:02x}")).collect()
}

fn check_video(name: &str) {
    let golden = golden();
    let g = &golden.videos[name];
    let path = fixtures().join(&g.file);

    let video = load_video(&path, FrameSampling::Uniform, golden.frames).expect("decode");
    assert_eq!(video.info.n_frames, g.n_frames, "{name}: frame count");
    assert_eq!(video.info.display_size(), (g.width, g.height), "{name}: decoded size");
    assert_eq!(video.info.rotation, g.rotation, "{name}: rotation");
    assert_eq!(video.indices, g.indices, "{name}: sampled indices");
    assert_eq!(video.indices, sample_indices(g.n_frames, golden.frames));

    let hashes: Vec<String> = video.frames.iter().map(|f| sha256_hex(f.data())).collect();
    if golden.versions.ffmpeg == ffmpeg_version_line() {
        assert_eq!(hashes, g.frame_sha256, "{name}: decoded pixels differ from the Python decode");
    } else if hashes != g.frame_sha256 {
        eprintln!("{name}: decoded frames differ from the fixtures' (other ffmpeg build)");
    }

    let pixels = preprocess_video(&video.frames, &PreprocessConfig::video_llava()).expect("preprocess");
    let want: Array5<f32> =
        load_pixel_values_npy(fixtures().join(format!("pixel_values_{name}.npy"))).expect("golden npy");
    let (max, off) = compare(pixels.index_axis(ndarray::Axis(0), 0), want.index_axis(ndarray::Axis(0), 0));
    eprintln!("{name}: max |rust - transformers| = {max:.3e}, {off} of {} values off by a u8 level", want.len());
    assert!(max <= TOLERANCE, "{name}: max abs diff {max} > {TOLERANCE}");
}

#[test]
fn landscape_vfr_odd_size_matches_transformers() {
    check_video("landscape_vfr");
}

#[test]
fn portrait_rotated_matches_transformers() {
    check_video("portrait_rot90");
}

#[test]
fn still_image_matches_transformers() {
    let golden = golden();
    for (name, g) in &golden.images {
        let frame = load_image(fixtures().join(&g.file)).expect("load image");
        assert_eq!((frame.width(), frame.height()), (g.width, g.height), "{name}");
        let pixels = preprocess_image(&frame, &PreprocessConfig::video_llava()).expect("preprocess");
        let want = load_pixel_values_npy(fixtures().join(format!("pixel_values_{name}.npy"))).expect("npy");
        let (max, off) = compare(pixels.view(), want.index_axis(ndarray::Axis(0), 0));
        eprintln!("{name}: max |rust - transformers| = {max:.3e}, {off} values off by a u8 level");
        assert!(max <= TOLERANCE, "{name}: max abs diff {max} > {TOLERANCE}");
    }
}

#[test]
fn duplicate_indices_decode_once_and_repeat() {
    let path = fixtures().join("landscape_vfr.webm");
    let frames = decode_frames(&path, &[3, 0, 3]).expect("decode");
    assert_eq!(frames.len(), 3);
    assert_eq!(frames[0], frames[2]);
    assert_ne!(frames[0], frames[1]);
    let err = decode_frames(&path, &[0, 30]).expect_err("index past the end");
    assert!(matches!(err, VideoError::FrameOutOfRange { index: 30, n_frames: 30, .. }), "{err}");
}

#[test]
fn one_frame_video_gives_eight_copies() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("one.mp4");
    make_media(&path, &["-f", "lavfi", "-i", "testsrc2=size=96x64:rate=25", "-frames:v", "1", "-pix_fmt", "yuv420p"]);
    let video = load_video(&path, FrameSampling::Uniform, 8).expect("decode");
    assert_eq!(video.info.n_frames, 1);
    assert_eq!(video.indices, vec![0; 8]);
    assert_eq!(video.frames.len(), 8);
    assert!(video.frames.iter().all(|f| *f == video.frames[0]));
    assert_eq!((video.frames[0].width(), video.frames[0].height()), (96, 64));
}

#[test]
fn containers_decode() {
    let dir = tempfile::tempdir().expect("tempdir");
    let src = ["-f", "lavfi", "-i", "testsrc2=size=66x38:rate=10", "-frames:v", "12"];
    let cases: [(&str, &[&str]); 6] = [
        ("a.mp4", &["-pix_fmt", "yuv420p"]),
        ("a.mkv", &["-c:v", "ffv1"]),
        ("a.webm", &["-c:v", "libvpx-vp9"]),
        ("a.avi", &["-c:v", "mpeg4"]),
        ("a.mov", &["-c:v", "mjpeg"]),
        ("a.gif", &[]),
    ];
    for (file, codec) in cases {
        let path = dir.path().join(file);
        make_media(&path, &[&src[..], codec].concat());
        let video = load_video(&path, FrameSampling::Uniform, 8).unwrap_or_else(|e| panic!("{file}: {e}"));
        assert_eq!(video.info.n_frames, 12, "{file}");
        assert_eq!(video.indices, sample_indices(12, 8), "{file}");
        assert!(video.frames.iter().all(|f| (f.width(), f.height()) == (66, 38)), "{file}");
    }
}

#[test]
fn image_formats_load() {
    let dir = tempfile::tempdir().expect("tempdir");
    for file in ["a.jpg", "a.png", "a.webp", "a.bmp"] {
        let path = dir.path().join(file);
        // testsrc2 rounds to even sizes; crop in rgb24 for an odd one.
        make_media(&path, &["-f", "lavfi", "-i", "testsrc2=size=76x52,format=rgb24,crop=75:51", "-frames:v", "1"]);
        let frame = load_image(&path).unwrap_or_else(|e| panic!("{file}: {e}"));
        assert_eq!((frame.width(), frame.height()), (75, 51), "{file}");
    }
}

#[test]
fn missing_file_is_reported() {
    let err = probe("/nonexistent/clip.mp4").expect_err("missing");
    eprintln!("{err}");
    assert!(matches!(err, VideoError::FileMissing { .. }), "{err}");
    assert!(err.to_string().contains("/nonexistent/clip.mp4"), "{err}");
}

#[test]
fn empty_file_is_reported() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("empty.mp4");
    std::fs::write(&path, b"").expect("write");
    let err = load_video(&path, FrameSampling::Uniform, 8).expect_err("empty");
    eprintln!("{err}");
    assert!(matches!(err, VideoError::EmptyFile { .. }), "{err}");
}

#[test]
fn text_file_named_mp4_is_not_a_video() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("notes.mp4");
    std::fs::write(&path, "this is not a video\n").expect("write");
    let err = load_video(&path, FrameSampling::Uniform, 8).expect_err("text");
    eprintln!("{err}");
    assert!(matches!(err, VideoError::NotAVideo { .. }), "{err}");
    assert!(err.to_string().contains("notes.mp4"), "{err}");
}

#[test]
fn audio_only_file_has_no_video_stream() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("tone.m4a");
    make_media(&path, &["-f", "lavfi", "-i", "sine=frequency=440:duration=0.5"]);
    let err = load_video(&path, FrameSampling::Uniform, 8).expect_err("audio only");
    eprintln!("{err}");
    match &err {
        VideoError::NoVideoStream { found, .. } => assert_eq!(found, "audio"),
        other => panic!("expected NoVideoStream, got {other}"),
    }
}

#[test]
fn directory_is_not_a_file() {
    let dir = tempfile::tempdir().expect("tempdir");
    let err = probe(dir.path()).expect_err("directory");
    assert!(matches!(err, VideoError::NotAFile { .. }), "{err}");
}

/// Peak resident memory of this process in kB (Linux `VmHWM`).
fn peak_rss_kb() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

/// A 4K video: only the 8 selected frames cross the pipe, so memory stays near
/// 8 × 3840 × 2160 × 3 ≈ 200 MB. Slow (makes a 4K clip): `cargo test -- --ignored`.
#[test]
#[ignore = "makes a 4K clip: ~20 s"]
fn decode_4k_keeps_memory_bounded() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("uhd.mp4");
    make_media(
        &path,
        &[
            "-f",
            "lavfi",
            "-i",
            "testsrc2=size=3840x2160:rate=30",
            "-frames:v",
            "120",
            "-c:v",
            "libx264",
            "-preset",
            "ultrafast",
            "-pix_fmt",
            "yuv420p",
        ],
    );
    let start = std::time::Instant::now();
    let video = load_video(&path, FrameSampling::Uniform, 8).expect("decode");
    let decoded = start.elapsed();
    let pixels = preprocess_video(&video.frames, &PreprocessConfig::video_llava()).expect("preprocess");
    eprintln!(
        "4K: decode {decoded:?}, decode+preprocess {:?}, peak RSS {:?} kB, indices {:?}",
        start.elapsed(),
        peak_rss_kb(),
        video.indices
    );
    assert_eq!(pixels.shape(), &[1, 8, 3, 224, 224]);
    if let Some(kb) = peak_rss_kb() {
        assert!(kb < 600 * 1024, "peak RSS {kb} kB");
    }
}
