//! Hostile and unusual video inputs: each ends in a typed [`VideoError`] naming the file, or
//! in the right frames when the input is valid; never a panic, an abort or a hang.
//!
//! Every input is generated with ffmpeg into a temp dir (tiny clips, except one 4K and one
//! 8K clip of two frames). The hanging-decoder cases use fake `ffmpeg`/`ffprobe` scripts
//! through [`DecodeOptions`]. Needs `ffmpeg` and `ffprobe` on PATH.

// Test inputs are made here; a failed setup step should just stop the test.
#![allow(clippy::unwrap_used)]

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use vl_runtime::video::{
    DecodeOptions, FrameSampling, SampledVideo, VideoError, load_video, load_video_with, probe, sample_indices,
};

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

/// A 32x24 source whose every frame differs (its brightness is 40 × the frame number, mod 256).
const DISTINCT_FRAMES: &str = "nullsrc=s=32x24:r=25,geq=lum='mod(N*40\\,256)':cb=128:cr=128";

/// A `frames`-frame testsrc2 clip of `size` (even sides) as h264 in mp4.
fn make_clip(out: &Path, size: &str, frames: u32, extra: &[&str]) {
    let src = format!("testsrc2=size={size}:rate=25");
    let n = frames.to_string();
    let base = ["-f", "lavfi", "-i", &src, "-frames:v", &n, "-c:v", "libx264", "-preset", "ultrafast"];
    let pix: &[&str] = if extra.contains(&"-pix_fmt") { &[] } else { &["-pix_fmt", "yuv420p"] };
    make_media(out, &[&base[..], pix, extra].concat());
}

fn load8(path: &Path) -> Result<SampledVideo, VideoError> {
    load_video(path, FrameSampling::Uniform, 8)
}

/// Checks that `err` names `path` and prints it (the message a user would see).
fn names_file(err: &VideoError, path: &Path) {
    eprintln!("{}: {err}", path.file_name().unwrap_or_default().to_string_lossy());
    assert!(err.to_string().contains(&*path.to_string_lossy()), "error does not name the file: {err}");
}

/// Checks a valid result: 8 frames of `size`, from the `linspace` indices.
fn check_ok(video: &SampledVideo, n_frames: usize, size: (u32, u32)) {
    assert_eq!(video.info.n_frames, n_frames);
    assert_eq!(video.indices, sample_indices(n_frames, 8));
    assert_eq!(video.frames.len(), 8);
    for f in &video.frames {
        assert_eq!((f.width(), f.height()), size);
        assert_eq!(f.data().len(), size.0 as usize * size.1 as usize * 3);
    }
}

/// Writes an executable shell script.
fn script(path: &Path, body: &str) {
    std::fs::write(path, format!("#!/bin/sh\n{body}\n")).expect("write script");
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o755)).expect("chmod");
}

/// Whether process `pid` still exists (running or a zombie).
fn process_exists(pid: u32) -> bool {
    Path::new(&format!("/proc/{pid}")).exists()
}

/// Reads the pid a fake tool wrote before it `exec`ed into `sleep`.
fn read_pid(path: &Path) -> u32 {
    std::fs::read_to_string(path).expect("pid file").trim().parse().expect("pid")
}

#[test]
fn zero_bytes() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("zero.mp4");
    std::fs::write(&path, b"").unwrap();
    let err = load8(&path).unwrap_err();
    assert!(matches!(err, VideoError::EmptyFile { .. }), "{err}");
    names_file(&err, &path);
}

#[test]
fn truncated_mid_stream() {
    let dir = tempfile::tempdir().unwrap();
    // moov at the end (ffmpeg's default): the first half has no index at all.
    let full = dir.path().join("full.mp4");
    make_clip(&full, "64x48", 50, &[]);
    // moov first: the index promises 50 frames, the data stops half way.
    let fast = dir.path().join("fast.mp4");
    make_clip(&fast, "64x48", 50, &["-movflags", "+faststart"]);
    let mkv = dir.path().join("full.mkv");
    make_clip(&mkv, "64x48", 50, &[]);
    for src in [&full, &fast, &mkv] {
        let bytes = std::fs::read(src).unwrap();
        let name = format!("half_{}", src.file_name().unwrap().to_string_lossy());
        let path = dir.path().join(name);
        std::fs::write(&path, &bytes[..bytes.len() / 2]).unwrap();
        match load8(&path) {
            Ok(video) => {
                // What survives is decoded, sampled over the frames that are really there.
                eprintln!("{}: {} frames decodable", path.display(), video.info.n_frames);
                assert!(video.info.n_frames > 0 && video.info.n_frames < 50, "{:?}", video.info);
                check_ok(&video, video.info.n_frames, (64, 48));
            }
            Err(err) => {
                assert!(
                    matches!(err, VideoError::NotAVideo { .. } | VideoError::Decode { .. }),
                    "{}: {err}",
                    path.display()
                );
                names_file(&err, &path);
            }
        }
    }
    // The index-less half can only be refused.
    let bytes = std::fs::read(&full).unwrap();
    let path = dir.path().join("moov_lost.mp4");
    std::fs::write(&path, &bytes[..bytes.len() / 2]).unwrap();
    let err = load8(&path).unwrap_err();
    assert!(matches!(err, VideoError::NotAVideo { .. }), "{err}");
    names_file(&err, &path);
}

#[test]
fn text_file_is_not_a_video() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("notes.mp4");
    std::fs::write(&path, "just some text, not a video\n".repeat(20)).unwrap();
    let err = load8(&path).unwrap_err();
    assert!(matches!(err, VideoError::NotAVideo { .. }), "{err}");
    names_file(&err, &path);
}

#[test]
fn png_renamed_mp4_is_read_as_a_one_frame_video() {
    // ffmpeg probes contents, not names: a PNG is a valid one-picture input.
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("picture.mp4");
    let png = dir.path().join("picture.png");
    make_media(&png, &["-f", "lavfi", "-i", "testsrc2=size=40x30", "-frames:v", "1"]);
    std::fs::rename(&png, &path).unwrap();
    let video = load8(&path).unwrap();
    check_ok(&video, 1, (40, 30));
    assert!(video.frames.iter().all(|f| *f == video.frames[0]));
}

#[test]
fn garbage_bytes_are_not_a_video() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("noise.mp4");
    let bytes: Vec<u8> = (0u32..4096).map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8).collect();
    std::fs::write(&path, bytes).unwrap();
    let err = load8(&path).unwrap_err();
    assert!(matches!(err, VideoError::NotAVideo { .. } | VideoError::NoVideoStream { .. }), "{err}");
    names_file(&err, &path);
}

#[test]
fn audio_only() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tone.mp4");
    make_media(&path, &["-f", "lavfi", "-i", "sine=frequency=440:duration=0.3"]);
    let err = load8(&path).unwrap_err();
    match &err {
        VideoError::NoVideoStream { found, .. } => assert_eq!(found, "audio"),
        other => panic!("expected NoVideoStream, got {other}"),
    }
    names_file(&err, &path);
}

#[test]
fn one_frame() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("one.mp4");
    make_clip(&path, "32x24", 1, &[]);
    let video = load8(&path).unwrap();
    check_ok(&video, 1, (32, 24));
    assert_eq!(video.indices, vec![0; 8]);
    assert!(video.frames.iter().all(|f| *f == video.frames[0]));
}

#[test]
fn fewer_frames_than_samples_repeat_by_linspace() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("three.mkv");
    // Lossless, so the three source frames stay distinct.
    make_media(&path, &["-f", "lavfi", "-i", DISTINCT_FRAMES, "-frames:v", "3", "-c:v", "ffv1"]);
    let video = load8(&path).unwrap();
    check_ok(&video, 3, (32, 24));
    // numpy.linspace(0, 2, 8).astype(int)
    assert_eq!(video.indices, vec![0, 0, 0, 0, 1, 1, 1, 2]);
    for (a, b) in video.indices.iter().zip(&video.frames) {
        for (c, d) in video.indices.iter().zip(&video.frames) {
            assert_eq!(a == c, b == d, "frames {a} and {c}");
        }
    }
}

#[test]
fn four_k_frames_come_back_full_size() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("uhd.mp4");
    make_clip(&path, "3840x2160", 2, &[]);
    let video = load8(&path).unwrap();
    check_ok(&video, 2, (3840, 2160));
}

#[test]
fn eight_k_frames_are_scaled_down_in_ffmpeg() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("8k.mp4");
    make_clip(&path, "7680x4320", 2, &[]);
    let video = load8(&path).unwrap();
    assert_eq!((video.info.width, video.info.height), (7680, 4320));
    // At most DEFAULT_MAX_FRAME_PIXELS (4K) per frame: 8 frames stay under 200 MB.
    check_ok(&video, 2, (3840, 2160));
}

#[test]
fn frame_size_limit_is_configurable() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("small.mp4");
    make_clip(&path, "64x48", 4, &[]);
    let opts = DecodeOptions { max_frame_pixels: 32 * 24, ..DecodeOptions::default() };
    let video = load_video_with(&path, FrameSampling::Uniform, 8, &opts).unwrap();
    check_ok(&video, 4, (32, 24));
}

#[test]
fn long_video_keeps_only_the_sampled_frames() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("long.mp4");
    make_media(
        &path,
        &[
            "-f",
            "lavfi",
            "-i",
            "testsrc2=size=16x16:rate=100",
            "-frames:v",
            "2000",
            "-c:v",
            "libx264",
            "-preset",
            "ultrafast",
            "-g",
            "250",
            "-pix_fmt",
            "yuv420p",
        ],
    );
    let video = load8(&path).unwrap();
    // ffmpeg's select filter drops the other 1,992 frames before they reach the pipe.
    check_ok(&video, 2000, (16, 16));
    assert_eq!(video.indices, vec![0, 285, 571, 856, 1142, 1427, 1713, 1999]);
}

#[test]
fn rotated_by_metadata_matches_transposed_pixels() {
    let dir = tempfile::tempdir().unwrap();
    let src = ["-f", "lavfi", "-i", "testsrc2=size=48x32:rate=25", "-frames:v", "3"];
    // Lossless rgb, so the two routes can be compared exactly.
    let codec = ["-c:v", "libx264rgb", "-qp", "0", "-preset", "ultrafast"];
    let plain = dir.path().join("plain.mp4");
    make_media(&plain, &[&src[..], &codec].concat());
    // ffmpeg 5.1 writes a display matrix from the `rotate` tag only on a stream copy.
    let tagged = dir.path().join("tagged.mp4");
    make_media(&tagged, &["-i", &plain.to_string_lossy(), "-c", "copy", "-metadata:s:v:0", "rotate=90"]);
    let info = probe(&tagged).unwrap();
    assert_eq!((info.width, info.height, info.rotation), (48, 32, 90));
    let video = load8(&tagged).unwrap();
    check_ok(&video, 3, (32, 48));
    // The display matrix's 90° is counter-clockwise: autorotate applies `transpose=cclock`.
    let turned = dir.path().join("turned.mp4");
    make_media(&turned, &[&src[..], &codec, &["-vf", "transpose=cclock"]].concat());
    let want = load8(&turned).unwrap();
    assert_eq!(want.info.rotation, 0);
    assert_eq!(video.frames, want.frames);
}

#[test]
fn variable_frame_rate() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("vfr.mkv");
    make_media(
        &path,
        &[
            "-f",
            "lavfi",
            "-i",
            DISTINCT_FRAMES,
            "-frames:v",
            "20",
            "-vf",
            "setpts='(N+N*N/4)/25/TB'",
            "-fps_mode",
            "vfr",
            "-c:v",
            "ffv1",
        ],
    );
    let video = load8(&path).unwrap();
    check_ok(&video, 20, (32, 24));
    // Indices count frames, not time: frame 19 is the last one whatever its timestamp.
    assert_eq!(video.indices, vec![0, 2, 5, 8, 10, 13, 16, 19]);
    assert_ne!(video.frames[6], video.frames[7]);
}

#[test]
fn ten_bit() {
    let encoders = Command::new("ffmpeg").args(["-hide_banner", "-h", "encoder=libx264"]).output().unwrap();
    if !String::from_utf8_lossy(&encoders.stdout).contains("yuv420p10le") {
        eprintln!("note: this ffmpeg's libx264 has no yuv420p10le; 10-bit case skipped");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("ten.mp4");
    make_clip(&path, "32x24", 5, &["-pix_fmt", "yuv420p10le"]);
    let video = load8(&path).unwrap();
    check_ok(&video, 5, (32, 24));
    // Not black: the 10-bit samples were converted, not truncated to zero.
    assert!(video.frames[0].data().iter().any(|&v| v > 64));
}

#[test]
fn odd_dimensions() {
    let dir = tempfile::tempdir().unwrap();
    let src = ["-f", "lavfi", "-i", "testsrc2=size=34x18:rate=25,format=rgb24,crop=33:17", "-frames:v", "4"];
    for (file, codec) in [("odd.mkv", &["-c:v", "ffv1"][..]), ("odd.mp4", &["-c:v", "libx264", "-pix_fmt", "yuv444p"])]
    {
        let path = dir.path().join(file);
        make_media(&path, &[&src[..], codec].concat());
        let video = load8(&path).unwrap_or_else(|e| panic!("{e}"));
        check_ok(&video, 4, (33, 17));
    }
}

#[test]
fn names_with_spaces_and_non_ascii() {
    let dir = tempfile::tempdir().unwrap();
    for name in ["clip with spaces.mp4", "vidéo ünïcødé 视频.mp4", "-starts-with-dash.mp4", "a:colon.mp4"] {
        let path = dir.path().join(name);
        make_clip(&path, "32x24", 3, &[]);
        let video = load8(&path).unwrap_or_else(|e| panic!("{name}: {e}"));
        check_ok(&video, 3, (32, 24));
    }
    // Errors keep the name intact.
    let path = dir.path().join("leer ünïcødé.mp4");
    std::fs::write(&path, "not a video").unwrap();
    let err = load8(&path).unwrap_err();
    names_file(&err, &path);
}

#[test]
fn directory_passed_as_the_video() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("looks_like.mp4");
    std::fs::create_dir(&path).unwrap();
    let err = load8(&path).unwrap_err();
    assert!(matches!(err, VideoError::NotAFile { .. }), "{err}");
    names_file(&err, &path);
}

#[test]
fn missing_file() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("gone.mp4");
    let err = load8(&path).unwrap_err();
    assert!(matches!(err, VideoError::FileMissing { .. }), "{err}");
    names_file(&err, &path);
}

/// Options whose `ffmpeg` runs `before` (shell) and then the real ffmpeg: the file changes
/// between the probe and the decode.
fn ffmpeg_that_first(dir: &Path, before: &str) -> DecodeOptions {
    let fake = dir.join("ffmpeg-wrapper");
    script(&fake, &format!("{before}\nexec ffmpeg \"$@\""));
    DecodeOptions { ffmpeg: fake, ..DecodeOptions::default() }
}

fn shell_quote(path: &Path) -> String {
    format!("'{}'", path.to_string_lossy().replace('\'', r"'\''"))
}

#[test]
fn file_deleted_between_probe_and_decode() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("vanishing.mp4");
    make_clip(&path, "32x24", 10, &[]);
    let opts = ffmpeg_that_first(dir.path(), &format!("rm -f {}", shell_quote(&path)));
    let err = load_video_with(&path, FrameSampling::Uniform, 8, &opts).unwrap_err();
    assert!(matches!(err, VideoError::Decode { .. }), "{err}");
    names_file(&err, &path);
}

#[test]
fn file_replaced_between_probe_and_decode() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("swapped.mp4");
    make_clip(&path, "32x24", 30, &[]);
    // By text: ffmpeg fails.
    let junk = dir.path().join("junk.txt");
    std::fs::write(&junk, "not a video").unwrap();
    let opts = ffmpeg_that_first(dir.path(), &format!("cp {} {}", shell_quote(&junk), shell_quote(&path)));
    let err = load_video_with(&path, FrameSampling::Uniform, 8, &opts).unwrap_err();
    assert!(matches!(err, VideoError::Decode { .. }), "{err}");
    names_file(&err, &path);

    // By a shorter video of another size: the frames are checked, never trusted.
    make_clip(&path, "32x24", 30, &[]);
    let other = dir.path().join("other.mp4");
    make_clip(&other, "48x32", 30, &[]);
    let opts = ffmpeg_that_first(dir.path(), &format!("cp {} {}", shell_quote(&other), shell_quote(&path)));
    let err = load_video_with(&path, FrameSampling::Uniform, 8, &opts).unwrap_err();
    assert!(matches!(err, VideoError::UnexpectedFrame { .. }), "{err}");
    names_file(&err, &path);

    // By a shorter video of the same size: frames go missing, the frames are counted again.
    make_clip(&path, "32x24", 30, &[]);
    let short = dir.path().join("short.mp4");
    make_clip(&short, "32x24", 5, &[]);
    let opts = ffmpeg_that_first(dir.path(), &format!("cp {} {}", shell_quote(&short), shell_quote(&path)));
    match load_video_with(&path, FrameSampling::Uniform, 8, &opts) {
        Ok(video) => check_ok(&video, 5, (32, 24)),
        Err(err) => {
            assert!(matches!(err, VideoError::MissingFrames { .. }), "{err}");
            names_file(&err, &path);
        }
    }
}

#[test]
fn hanging_ffprobe_is_killed_and_reaped() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("clip.mp4");
    make_clip(&path, "32x24", 3, &[]);
    let pid_file = dir.path().join("ffprobe.pid");
    let fake = dir.path().join("ffprobe");
    script(&fake, &format!("echo $$ > {}\nexec sleep 60", shell_quote(&pid_file)));
    let opts = DecodeOptions { ffprobe: fake, timeout: Duration::from_secs(1), ..DecodeOptions::default() };
    let err = load_video_with(&path, FrameSampling::Uniform, 8, &opts).unwrap_err();
    assert!(matches!(err, VideoError::Timeout { tool: "ffprobe", .. }), "{err}");
    names_file(&err, &path);
    let pid = read_pid(&pid_file);
    assert!(!process_exists(pid), "ffprobe {pid} is still there (running or a zombie)");
}

#[test]
fn hanging_ffmpeg_is_killed_and_reaped() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("clip.mp4");
    make_clip(&path, "32x24", 3, &[]);
    for (name, body) in [
        ("silent", "exec sleep 60"),
        // Starts like ffmpeg, then stalls.
        ("chatty", "echo \"ffmpeg version 5.1 Copyright (c) the FFmpeg developers\" >&2\nexec sleep 60"),
    ] {
        let pid_file = dir.path().join(format!("{name}.pid"));
        let fake = dir.path().join(format!("ffmpeg-{name}"));
        script(&fake, &format!("echo $$ > {}\n{body}", shell_quote(&pid_file)));
        let opts = DecodeOptions { ffmpeg: fake, timeout: Duration::from_secs(1), ..DecodeOptions::default() };
        let err = load_video_with(&path, FrameSampling::Uniform, 8, &opts).unwrap_err();
        assert!(matches!(err, VideoError::Timeout { tool: "ffmpeg", .. }), "{name}: {err}");
        names_file(&err, &path);
        let pid = read_pid(&pid_file);
        assert!(!process_exists(pid), "{name}: ffmpeg {pid} is still there (running or a zombie)");
    }
}

#[test]
fn missing_programs_are_reported() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("clip.mp4");
    make_clip(&path, "32x24", 3, &[]);
    let nowhere = PathBuf::from("/nonexistent/bin/ffprobe");
    let opts = DecodeOptions { ffprobe: nowhere, ..DecodeOptions::default() };
    let err = load_video_with(&path, FrameSampling::Uniform, 8, &opts).unwrap_err();
    assert!(matches!(err, VideoError::FfprobeMissing), "{err}");
    let opts = DecodeOptions { ffmpeg: PathBuf::from("/nonexistent/bin/ffmpeg"), ..DecodeOptions::default() };
    let err = load_video_with(&path, FrameSampling::Uniform, 8, &opts).unwrap_err();
    assert!(matches!(err, VideoError::FfmpegMissing), "{err}");
}
