//! Video and image decoding through the system `ffmpeg`/`ffprobe`, and frame sampling.
//!
//! Frames are picked by their decode index with ffmpeg's `select` filter and come back as
//! full-size rgb24 ([`RgbFrame`]); resizing happens in [`crate::preprocess`] so that the
//! result matches the Hugging Face processor. Only the selected frames are ever held in
//! memory, so a 4K video costs about `frames × width × height × 3` bytes; frames larger than
//! [`DecodeOptions::max_frame_pixels`] are scaled down inside ffmpeg first. Every `ffprobe`
//! and `ffmpeg` run is killed (and reaped) after [`DecodeOptions::timeout`].
//!
//! ```no_run
//! use vl_runtime::video::{load_video, FrameSampling};
//! let video = load_video("clip.mp4", FrameSampling::Uniform, 8)?;
//! println!("{} frames, sampled {:?}", video.info.n_frames, video.indices);
//! # Ok::<(), vl_runtime::video::VideoError>(())
//! ```

use std::collections::{BTreeSet, HashMap, VecDeque};
use std::ffi::OsString;
use std::fmt;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::sync::mpsc::{RecvTimeoutError, sync_channel};
use std::time::{Duration, Instant};

use ffmpeg_sidecar::command::{FfmpegCommand, ffmpeg_is_installed};
use ffmpeg_sidecar::event::{FfmpegEvent, LogLevel, OutputVideoFrame};
use serde::Deserialize;

/// How to install the tools when they are missing.
const INSTALL_HINT: &str = "install it with `apt-get install ffmpeg` (or `make setup`)";
/// Lines of ffmpeg's stderr kept for error messages.
const STDERR_TAIL_LINES: usize = 12;
/// Most bytes of ffprobe's stdout or stderr read (its JSON for one stream is about 1 kB).
const PROBE_OUTPUT_LIMIT: u64 = 1 << 20;

/// How long one `ffprobe` or `ffmpeg` run may take by default before it is killed.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(60);
/// Largest decoded frame by default, in pixels: 3840 × 2160 (4K UHD).
pub const DEFAULT_MAX_FRAME_PIXELS: u64 = 3840 * 2160;

/// How videos and images are decoded: the programs, a time limit and a frame-size limit.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DecodeOptions {
    /// Longest one `ffprobe` or `ffmpeg` run may take; it is then killed and reaped and the
    /// call fails with [`VideoError::Timeout`]. Default [`DEFAULT_TIMEOUT`] (60 s).
    pub timeout: Duration,
    /// Frames with more pixels than this (after rotation) are scaled down inside ffmpeg,
    /// keeping the aspect ratio, so that memory stays bounded whatever the input; smaller
    /// frames come back at full size. Default [`DEFAULT_MAX_FRAME_PIXELS`] (4K UHD).
    pub max_frame_pixels: u64,
    /// The `ffmpeg` program (default: next to the executable, else `ffmpeg` on `PATH`).
    pub ffmpeg: PathBuf,
    /// The `ffprobe` program (default: next to the executable, else `ffprobe` on `PATH`).
    pub ffprobe: PathBuf,
}

impl Default for DecodeOptions {
    fn default() -> Self {
        Self {
            timeout: DEFAULT_TIMEOUT,
            max_frame_pixels: DEFAULT_MAX_FRAME_PIXELS,
            ffmpeg: ffmpeg_sidecar::paths::ffmpeg_path(),
            ffprobe: ffmpeg_sidecar::ffprobe::ffprobe_path(),
        }
    }
}

/// Everything that can go wrong while decoding or preprocessing a video or an image.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum VideoError {
    /// The `ffmpeg` program is not on `PATH` (it is never downloaded).
    #[error("ffmpeg was not found on PATH; {INSTALL_HINT}")]
    FfmpegMissing,
    /// The `ffprobe` program is not on `PATH`.
    #[error("ffprobe was not found on PATH; {INSTALL_HINT}")]
    FfprobeMissing,
    /// `ffmpeg` or `ffprobe` could not be started.
    #[error("{path}: could not run {tool}")]
    Spawn {
        /// The input file.
        path: PathBuf,
        /// `ffmpeg` or `ffprobe`.
        tool: &'static str,
        /// What the OS said.
        #[source]
        source: std::io::Error,
    },
    /// The input file does not exist.
    #[error("{path}: no such file")]
    FileMissing {
        /// The input file.
        path: PathBuf,
    },
    /// The input path exists but is not a regular file (a directory, for example).
    #[error("{path}: not a file")]
    NotAFile {
        /// The input path.
        path: PathBuf,
    },
    /// The input file could not be read.
    #[error("{path}")]
    Io {
        /// The input file.
        path: PathBuf,
        /// What the OS said.
        #[source]
        source: std::io::Error,
    },
    /// The input file is empty.
    #[error("{path}: the file is empty")]
    EmptyFile {
        /// The input file.
        path: PathBuf,
    },
    /// ffprobe could not read the file as a media container (not a video or an image).
    #[error("{path}: not a video or image ffmpeg can read: {detail}")]
    NotAVideo {
        /// The input file.
        path: PathBuf,
        /// ffprobe's message.
        detail: String,
    },
    /// The file is a media file but has no video stream (audio only, for example).
    #[error("{path}: no video stream (streams found: {found})")]
    NoVideoStream {
        /// The input file.
        path: PathBuf,
        /// The kinds of the streams that are there, e.g. `audio`.
        found: String,
    },
    /// The video stream has no frames.
    #[error("{path}: the video stream has no frames")]
    ZeroFrames {
        /// The input file.
        path: PathBuf,
    },
    /// ffprobe's output could not be understood.
    #[error("{path}: unexpected ffprobe output: {detail}")]
    Probe {
        /// The input file.
        path: PathBuf,
        /// What was wrong.
        detail: String,
    },
    /// A requested frame index is past the end of the video.
    #[error("{path}: frame {index} requested but the video has {n_frames} frames")]
    FrameOutOfRange {
        /// The input file.
        path: PathBuf,
        /// The requested index.
        index: usize,
        /// Frames in the video.
        n_frames: usize,
    },
    /// `ffprobe` or `ffmpeg` ran past [`DecodeOptions::timeout`] and was killed.
    #[error("{path}: {tool} did not finish within {}s and was stopped", timeout.as_secs_f64())]
    Timeout {
        /// The input file.
        path: PathBuf,
        /// `ffmpeg` or `ffprobe`.
        tool: &'static str,
        /// The limit it ran into.
        timeout: Duration,
    },
    /// ffmpeg failed while decoding.
    #[error("{path}: ffmpeg failed ({status}); its last messages:\n{stderr_tail}")]
    Decode {
        /// The input file.
        path: PathBuf,
        /// How ffmpeg ended.
        status: String,
        /// The last lines ffmpeg wrote to stderr.
        stderr_tail: String,
    },
    /// ffmpeg ended without producing every selected frame.
    #[error(
        "{path}: ffmpeg returned {got} of {wanted} selected frames (the container's frame count \
         may be wrong); its last messages:\n{stderr_tail}"
    )]
    MissingFrames {
        /// The input file.
        path: PathBuf,
        /// Distinct frames selected.
        wanted: usize,
        /// Frames received.
        got: usize,
        /// The last lines ffmpeg wrote to stderr.
        stderr_tail: String,
    },
    /// ffmpeg produced a frame of an unexpected size or format.
    #[error("{path}: unexpected frame from ffmpeg: {detail}")]
    UnexpectedFrame {
        /// The input file.
        path: PathBuf,
        /// What was wrong.
        detail: String,
    },
    /// An [`RgbFrame`] was built from a buffer that does not hold `width × height × 3` bytes.
    #[error("an rgb24 frame of {width}x{height} needs {expected} bytes, got {got}")]
    FrameBuffer {
        /// Frame width.
        width: u32,
        /// Frame height.
        height: u32,
        /// `width × height × 3`.
        expected: usize,
        /// Bytes given.
        got: usize,
    },
    /// A [`crate::preprocess::PreprocessConfig`] cannot be applied.
    #[error("invalid preprocessing config: {0}")]
    InvalidConfig(&'static str),
    /// The output buffer given to [`crate::preprocess::preprocess_frame`] has the wrong length.
    #[error("preprocessing output buffer holds {got} values, expected 3×{crop}×{crop} = {expected}")]
    OutputBuffer {
        /// Crop size.
        crop: u32,
        /// `3 × crop × crop`.
        expected: usize,
        /// The buffer's length.
        got: usize,
    },
    /// [`crate::preprocess::preprocess_video`] was given no frames.
    #[error("no frames to preprocess")]
    NoFrames,
    /// Resizing failed inside `fast_image_resize`.
    #[error("resize failed: {0}")]
    Resize(#[from] fast_image_resize::ResizeError),
    /// A resize buffer had the wrong size (a bug: sizes are checked before).
    #[error("resize buffer: {0}")]
    ResizeBuffer(#[from] fast_image_resize::ImageBufferError),
    /// A `--pixel-values` file could not be read as a float32 `.npy` array.
    #[error("{path}: not a readable float32 .npy array")]
    PixelValuesRead {
        /// The `.npy` file.
        path: PathBuf,
        /// What ndarray-npy said (a wrong dtype shows up as a descriptor mismatch).
        #[source]
        source: ndarray_npy::ReadNpyError,
    },
    /// A `--pixel-values` array has the wrong shape.
    #[error("{path}: pixel values of shape {shape:?}; expected [F, 3, H, W] or [1, F, 3, H, W]")]
    PixelValuesShape {
        /// The `.npy` file.
        path: PathBuf,
        /// The shape found.
        shape: Vec<usize>,
    },
    /// A `--pixel-values` array holds NaN or infinite values.
    #[error("{path}: pixel values contain NaN or infinite values")]
    PixelValuesNotFinite {
        /// The `.npy` file.
        path: PathBuf,
    },
}

/// One decoded picture: tightly packed rgb24, row-major, `width × height × 3` bytes.
#[derive(Clone, PartialEq, Eq)]
pub struct RgbFrame {
    width: u32,
    height: u32,
    data: Vec<u8>,
}

impl RgbFrame {
    /// Wraps rgb24 bytes; fails unless `data.len() == width × height × 3` and both sides are > 0.
    pub fn new(width: u32, height: u32, data: Vec<u8>) -> Result<Self, VideoError> {
        let expected = width as usize * height as usize * 3;
        if width == 0 || height == 0 || data.len() != expected {
            return Err(VideoError::FrameBuffer { width, height, expected, got: data.len() });
        }
        Ok(Self { width, height, data })
    }

    /// Width in pixels.
    pub fn width(&self) -> u32 {
        self.width
    }

    /// Height in pixels.
    pub fn height(&self) -> u32 {
        self.height
    }

    /// The rgb24 bytes.
    pub fn data(&self) -> &[u8] {
        &self.data
    }

    /// The rgb24 bytes, owned.
    pub fn into_data(self) -> Vec<u8> {
        self.data
    }
}

impl fmt::Debug for RgbFrame {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "RgbFrame({}x{} rgb24)", self.width, self.height)
    }
}

/// What `ffprobe` says about a file's video stream.
#[derive(Debug, Clone, PartialEq)]
pub struct VideoInfo {
    /// Frames in the stream (packets counted by demuxing, as decord's index does).
    pub n_frames: usize,
    /// Stored width of the stream, before rotation.
    pub width: u32,
    /// Stored height of the stream, before rotation.
    pub height: u32,
    /// Display rotation in degrees from the display matrix (or the old `rotate` tag),
    /// normalized to `0..360`; ffmpeg applies it while decoding.
    pub rotation: u32,
    /// Duration in seconds, when the container says.
    pub duration_s: Option<f64>,
    /// Index of the stream in the container (what `-map 0:N` takes).
    pub stream_index: usize,
    /// Codec name, e.g. `h264`.
    pub codec: String,
}

impl VideoInfo {
    /// Width and height of the decoded frames: the stored size, swapped for 90/270° rotations.
    pub fn display_size(&self) -> (u32, u32) {
        if self.rotation == 90 || self.rotation == 270 { (self.height, self.width) } else { (self.width, self.height) }
    }
}

/// Which frames of a video the model sees.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FrameSampling {
    /// `numpy.linspace(0, n - 1, k).astype(int)`, as the original Video-LLaVA code.
    #[default]
    Uniform,
}

impl FrameSampling {
    /// The frame indices to decode for a video of `n_frames` when `n_wanted` are needed.
    pub fn indices(self, n_frames: usize, n_wanted: usize) -> Vec<usize> {
        match self {
            FrameSampling::Uniform => sample_indices(n_frames, n_wanted),
        }
    }
}

/// `numpy.linspace(0, n_frames - 1, n_wanted).astype(int)`, bit for bit.
///
/// numpy computes `i * step` with `step = (stop - start) / (num - 1)` in float64 (or
/// `i / div * delta` when the step is zero), sets the last element to `stop` exactly, and
/// `astype(int)` truncates. Short videos repeat indices (`n_frames = 1` gives all zeros).
/// `n_frames = 0` gives an empty list: there is nothing to sample.
pub fn sample_indices(n_frames: usize, n_wanted: usize) -> Vec<usize> {
    if n_frames == 0 || n_wanted == 0 {
        return Vec::new();
    }
    if n_wanted == 1 {
        return vec![0];
    }
    let delta = (n_frames - 1) as f64;
    let div = (n_wanted - 1) as f64;
    let step = delta / div;
    let mut out: Vec<usize> = (0..n_wanted)
        .map(|i| {
            let y = if step == 0.0 { i as f64 / div * delta } else { i as f64 * step };
            y as usize
        })
        .collect();
    if let Some(last) = out.last_mut() {
        *last = n_frames - 1;
    }
    out
}

/// A video's sampled frames with the indices they came from.
#[derive(Debug, Clone)]
pub struct SampledVideo {
    /// What ffprobe said about the video.
    pub info: VideoInfo,
    /// Source frame index of each entry of `frames` (repeats for short videos).
    pub indices: Vec<usize>,
    /// The decoded frames, one per index, all of [`VideoInfo::display_size`].
    pub frames: Vec<RgbFrame>,
}

/// Probes `path`, samples `n_wanted` frame indices and decodes them, with the default
/// [`DecodeOptions`].
///
/// If the container's packet count overstates the decodable frames (edit lists, broken
/// files), the frames are counted by decoding once and the sampling is redone.
pub fn load_video(
    path: impl AsRef<Path>,
    sampling: FrameSampling,
    n_wanted: usize,
) -> Result<SampledVideo, VideoError> {
    load_video_with(path, sampling, n_wanted, &DecodeOptions::default())
}

/// [`load_video`] with explicit [`DecodeOptions`] (programs, time limit, frame-size limit).
pub fn load_video_with(
    path: impl AsRef<Path>,
    sampling: FrameSampling,
    n_wanted: usize,
    opts: &DecodeOptions,
) -> Result<SampledVideo, VideoError> {
    let path = path.as_ref();
    let info = probe_inner(path, false, opts)?;
    let indices = sampling.indices(info.n_frames, n_wanted);
    match decode_frames_inner(path, &info, &indices, opts) {
        Ok(frames) => Ok(SampledVideo { info, indices, frames }),
        Err(VideoError::MissingFrames { .. }) => {
            let info = probe_inner(path, true, opts)?;
            let indices = sampling.indices(info.n_frames, n_wanted);
            let frames = decode_frames_inner(path, &info, &indices, opts)?;
            Ok(SampledVideo { info, indices, frames })
        }
        Err(e) => Err(e),
    }
}

/// Reads a file's first video stream with `ffprobe`: frame count, size, rotation, duration.
pub fn probe(path: impl AsRef<Path>) -> Result<VideoInfo, VideoError> {
    probe_inner(path.as_ref(), false, &DecodeOptions::default())
}

/// [`probe`] with explicit [`DecodeOptions`].
pub fn probe_with(path: impl AsRef<Path>, opts: &DecodeOptions) -> Result<VideoInfo, VideoError> {
    probe_inner(path.as_ref(), false, opts)
}

/// Decodes the frames at `indices` (decode order, as decord counts them) as full-size rgb24.
///
/// Each distinct index is decoded once; duplicates share the decoded picture. Rotation
/// metadata is applied (ffmpeg's autorotate), so frames have [`VideoInfo::display_size`]
/// (scaled down if larger than [`DecodeOptions::max_frame_pixels`]).
pub fn decode_frames(path: impl AsRef<Path>, indices: &[usize]) -> Result<Vec<RgbFrame>, VideoError> {
    decode_frames_with(path, indices, &DecodeOptions::default())
}

/// [`decode_frames`] with explicit [`DecodeOptions`].
pub fn decode_frames_with(
    path: impl AsRef<Path>,
    indices: &[usize],
    opts: &DecodeOptions,
) -> Result<Vec<RgbFrame>, VideoError> {
    let path = path.as_ref();
    let info = probe_inner(path, false, opts)?;
    decode_frames_inner(path, &info, indices, opts)
}

/// Decodes a still image (jpg, png, webp, bmp, the first frame of a gif) as rgb24.
///
/// An alpha channel is dropped, like Pillow's `convert("RGB")`; EXIF orientation is not
/// applied (ffmpeg 5 ignores it).
pub fn load_image(path: impl AsRef<Path>) -> Result<RgbFrame, VideoError> {
    load_image_with(path, &DecodeOptions::default())
}

/// [`load_image`] with explicit [`DecodeOptions`].
pub fn load_image_with(path: impl AsRef<Path>, opts: &DecodeOptions) -> Result<RgbFrame, VideoError> {
    let path = path.as_ref();
    let info = probe_inner(path, false, opts)?;
    let mut frames = decode_frames_inner(path, &info, &[0], opts)?;
    frames.pop().ok_or_else(|| VideoError::MissingFrames {
        path: path.to_path_buf(),
        wanted: 1,
        got: 0,
        stderr_tail: String::new(),
    })
}

/// Fails with [`VideoError::FfmpegMissing`] unless `ffmpeg` runs (checked once per process).
pub fn ensure_ffmpeg() -> Result<(), VideoError> {
    static FOUND: OnceLock<()> = OnceLock::new();
    if FOUND.get().is_some() {
        return Ok(());
    }
    if !ffmpeg_is_installed() {
        return Err(VideoError::FfmpegMissing);
    }
    let _ = FOUND.set(());
    Ok(())
}

/// Checks that `path` is a non-empty regular file.
fn check_file(path: &Path) -> Result<(), VideoError> {
    let meta = std::fs::metadata(path).map_err(|source| match source.kind() {
        std::io::ErrorKind::NotFound => VideoError::FileMissing { path: path.to_path_buf() },
        _ => VideoError::Io { path: path.to_path_buf(), source },
    })?;
    if !meta.is_file() {
        return Err(VideoError::NotAFile { path: path.to_path_buf() });
    }
    if meta.len() == 0 {
        return Err(VideoError::EmptyFile { path: path.to_path_buf() });
    }
    Ok(())
}

/// `file:` + path, so ffmpeg never reads a path as a protocol (`a:b.mp4`) or an option (`-x`).
fn ffmpeg_url(path: &Path) -> OsString {
    let mut url = OsString::from("file:");
    url.push(path.as_os_str());
    url
}

/// ffprobe's JSON, the parts we read.
#[derive(Debug, Deserialize)]
struct ProbeJson {
    #[serde(default)]
    streams: Vec<ProbeStream>,
    format: Option<ProbeFormat>,
}

/// One stream in ffprobe's JSON.
#[derive(Debug, Deserialize)]
struct ProbeStream {
    index: usize,
    codec_type: Option<String>,
    codec_name: Option<String>,
    width: Option<u32>,
    height: Option<u32>,
    duration: Option<String>,
    nb_read_packets: Option<String>,
    nb_read_frames: Option<String>,
    #[serde(default)]
    disposition: HashMap<String, i64>,
    #[serde(default)]
    tags: HashMap<String, String>,
    #[serde(default)]
    side_data_list: Vec<serde_json::Value>,
}

/// The container part of ffprobe's JSON.
#[derive(Debug, Deserialize)]
struct ProbeFormat {
    duration: Option<String>,
}

/// Runs ffprobe; `count_frames` decodes the stream to count frames instead of packets.
fn probe_inner(path: &Path, count_frames: bool, opts: &DecodeOptions) -> Result<VideoInfo, VideoError> {
    check_file(path)?;
    let json = run_ffprobe(path, count_frames, opts)?;
    let parsed: ProbeJson = serde_json::from_slice(&json)
        .map_err(|e| VideoError::Probe { path: path.to_path_buf(), detail: e.to_string() })?;
    video_info(path, parsed, count_frames)
}

/// Runs ffprobe and returns its JSON output.
fn run_ffprobe(path: &Path, count_frames: bool, opts: &DecodeOptions) -> Result<Vec<u8>, VideoError> {
    let (count_flag, count_field) =
        if count_frames { ("-count_frames", "nb_read_frames") } else { ("-count_packets", "nb_read_packets") };
    let entries = format!(
        "stream=index,codec_type,codec_name,width,height,duration,{count_field}\
         :stream_disposition=attached_pic:stream_tags=rotate:stream_side_data=rotation\
         :format=duration"
    );
    let mut command = Command::new(&opts.ffprobe);
    command.args(["-v", "error", count_flag, "-show_entries", &entries, "-of", "json"]).arg(ffmpeg_url(path));
    let output = run_with_timeout(command, path, opts.timeout)?;
    if !output.success {
        let stderr = String::from_utf8_lossy(&output.stderr);
        let detail = stderr.lines().rev().find(|l| !l.trim().is_empty()).unwrap_or("").trim();
        let detail = detail.strip_prefix(&*ffmpeg_url(path).to_string_lossy()).unwrap_or(detail);
        let detail = detail.trim_start_matches(':').trim().to_string();
        let detail = if detail.is_empty() { format!("ffprobe ended with {}", output.status) } else { detail };
        return Err(VideoError::NotAVideo { path: path.to_path_buf(), detail });
    }
    Ok(output.stdout)
}

/// What a finished ffprobe run left: its exit status and (capped) output.
struct ProbeOutput {
    success: bool,
    status: String,
    stdout: Vec<u8>,
    stderr: Vec<u8>,
}

/// Runs `command` (ffprobe) with no stdin, reading at most [`PROBE_OUTPUT_LIMIT`] bytes of
/// each of stdout and stderr; kills and reaps it once `timeout` has passed.
fn run_with_timeout(mut command: Command, path: &Path, timeout: Duration) -> Result<ProbeOutput, VideoError> {
    let tool = "ffprobe";
    command.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped());
    let mut child = command.spawn().map_err(|source| match source.kind() {
        std::io::ErrorKind::NotFound => VideoError::FfprobeMissing,
        _ => VideoError::Spawn { path: path.to_path_buf(), tool, source },
    })?;
    let readers = (child.stdout.take().map(read_capped), child.stderr.take().map(read_capped));
    let status = wait_until(&mut child, Instant::now() + timeout);
    // The pipes close once the child is gone, so the readers finish.
    let stdout = readers.0.map(join_reader).unwrap_or_default();
    let stderr = readers.1.map(join_reader).unwrap_or_default();
    match status {
        Ok(Some(status)) => Ok(ProbeOutput { success: status.success(), status: status.to_string(), stdout, stderr }),
        Ok(None) => Err(VideoError::Timeout { path: path.to_path_buf(), tool, timeout }),
        Err(source) => Err(VideoError::Spawn { path: path.to_path_buf(), tool, source }),
    }
}

/// Reads a pipe to its end on a thread, keeping the first [`PROBE_OUTPUT_LIMIT`] bytes and
/// draining the rest so the child never blocks on a full pipe.
fn read_capped(pipe: impl Read + Send + 'static) -> std::thread::JoinHandle<Vec<u8>> {
    std::thread::spawn(move || {
        let mut pipe = pipe;
        let mut kept = Vec::new();
        let _ = pipe.by_ref().take(PROBE_OUTPUT_LIMIT).read_to_end(&mut kept);
        let _ = std::io::copy(&mut pipe, &mut std::io::sink());
        kept
    })
}

/// The bytes a [`read_capped`] thread read (none if it panicked).
fn join_reader(handle: std::thread::JoinHandle<Vec<u8>>) -> Vec<u8> {
    handle.join().unwrap_or_default()
}

/// Waits for `child` until `deadline`; past it, kills and reaps it and returns `None`.
fn wait_until(child: &mut Child, deadline: Instant) -> std::io::Result<Option<std::process::ExitStatus>> {
    let mut pause = Duration::from_millis(1);
    loop {
        if let Some(status) = child.try_wait()? {
            return Ok(Some(status));
        }
        let now = Instant::now();
        if now >= deadline {
            // It may have exited in between: kill fails then, and wait reaps it either way.
            let _ = child.kill();
            child.wait()?;
            return Ok(None);
        }
        std::thread::sleep(pause.min(deadline - now));
        pause = (pause * 2).min(Duration::from_millis(20));
    }
}

/// Picks the first real video stream (not cover art) and turns it into a [`VideoInfo`].
fn video_info(path: &Path, probe: ProbeJson, counted: bool) -> Result<VideoInfo, VideoError> {
    let is_video = |s: &&ProbeStream| {
        s.codec_type.as_deref() == Some("video") && s.disposition.get("attached_pic").copied().unwrap_or(0) == 0
    };
    let Some(stream) = probe.streams.iter().find(is_video) else {
        let found: Vec<&str> = probe.streams.iter().map(|s| s.codec_type.as_deref().unwrap_or("unknown")).collect();
        let found = if found.is_empty() { "none".to_string() } else { found.join(", ") };
        return Err(VideoError::NoVideoStream { path: path.to_path_buf(), found });
    };
    let probe_err = |detail: String| VideoError::Probe { path: path.to_path_buf(), detail };
    let count = if counted { &stream.nb_read_frames } else { &stream.nb_read_packets };
    let n_frames: usize = match count.as_deref().map(str::parse) {
        Some(Ok(n)) => n,
        _ => return Err(probe_err(format!("no frame count in {count:?}"))),
    };
    if n_frames == 0 {
        return Err(VideoError::ZeroFrames { path: path.to_path_buf() });
    }
    let (Some(width), Some(height)) = (stream.width, stream.height) else {
        return Err(probe_err("video stream without width/height".into()));
    };
    if width == 0 || height == 0 {
        return Err(probe_err(format!("video stream of size {width}x{height}")));
    }
    let duration_s = stream
        .duration
        .as_deref()
        .or(probe.format.as_ref().and_then(|f| f.duration.as_deref()))
        .and_then(|d| d.parse::<f64>().ok());
    Ok(VideoInfo {
        n_frames,
        width,
        height,
        rotation: rotation_of(stream),
        duration_s,
        stream_index: stream.index,
        codec: stream.codec_name.clone().unwrap_or_default(),
    })
}

/// The display rotation in degrees, `0..360`, from the display matrix or the `rotate` tag.
fn rotation_of(stream: &ProbeStream) -> u32 {
    let from_matrix = stream.side_data_list.iter().find_map(|sd| sd.get("rotation")?.as_f64());
    let from_tag = || stream.tags.get("rotate").and_then(|r| r.trim().parse::<f64>().ok());
    let degrees = from_matrix.or_else(from_tag).unwrap_or(0.0);
    // ffmpeg's autorotate acts on multiples of 90 (within a degree); so do we.
    let quarter = (degrees / 90.0).round() as i64;
    (quarter.rem_euclid(4) * 90) as u32
}

/// Builds `select='eq(n\,a)+eq(n\,b)+...'` for sorted distinct indices.
fn select_filter(distinct: &[usize]) -> String {
    let terms: Vec<String> = distinct.iter().map(|i| format!("eq(n\\,{i})")).collect();
    format!("select='{}'", terms.join("+"))
}

/// Decodes `indices` of the stream described by `info`.
fn decode_frames_inner(
    path: &Path,
    info: &VideoInfo,
    indices: &[usize],
    opts: &DecodeOptions,
) -> Result<Vec<RgbFrame>, VideoError> {
    if let Some(&index) = indices.iter().find(|&&i| i >= info.n_frames) {
        return Err(VideoError::FrameOutOfRange { path: path.to_path_buf(), index, n_frames: info.n_frames });
    }
    if indices.is_empty() {
        return Ok(Vec::new());
    }
    let distinct: Vec<usize> = indices.iter().copied().collect::<BTreeSet<_>>().into_iter().collect();
    let decoded = run_ffmpeg_select(path, info, &distinct, opts)?;
    Ok(spread(&distinct, decoded, indices))
}

/// The size frames come out of ffmpeg: the display size, scaled down (aspect kept, each side
/// at least 1) when it has more than `max_pixels` pixels.
fn output_size(info: &VideoInfo, max_pixels: u64) -> (u32, u32) {
    let (w, h) = info.display_size();
    let pixels = u64::from(w) * u64::from(h);
    if pixels <= max_pixels.max(1) {
        return (w, h);
    }
    let scale = (max_pixels.max(1) as f64 / pixels as f64).sqrt();
    let side = |x: u32| ((f64::from(x) * scale).floor() as u32).max(1);
    let (mut sw, mut sh) = (side(w), side(h));
    while u64::from(sw) * u64::from(sh) > max_pixels.max(1) && (sw > 1 || sh > 1) {
        if sw >= sh { sw -= 1 } else { sh -= 1 }
    }
    (sw, sh)
}

/// Maps frames decoded for the sorted `distinct` indices back onto `indices`, moving each
/// frame into its last use and cloning only for repeats (a 4K frame is 25 MB).
fn spread(distinct: &[usize], decoded: Vec<RgbFrame>, indices: &[usize]) -> Vec<RgbFrame> {
    let mut uses = vec![0usize; distinct.len()];
    let slot_of: Vec<usize> = indices.iter().map(|i| distinct.binary_search(i).unwrap_or_default()).collect();
    for &k in &slot_of {
        uses[k] += 1;
    }
    let mut slots: Vec<Option<RgbFrame>> = decoded.into_iter().map(Some).collect();
    slot_of
        .iter()
        .filter_map(|&k| {
            uses[k] -= 1;
            if uses[k] == 0 { slots[k].take() } else { slots[k].clone() }
        })
        .collect()
}

/// Runs ffmpeg once, returning the frames at `distinct` (sorted, unique) in that order.
///
/// ffmpeg is killed and reaped on every path: errors, a frame of the wrong size, and the
/// time limit.
fn run_ffmpeg_select(
    path: &Path,
    info: &VideoInfo,
    distinct: &[usize],
    opts: &DecodeOptions,
) -> Result<Vec<RgbFrame>, VideoError> {
    let size = output_size(info, opts.max_frame_pixels);
    let mut filter = select_filter(distinct);
    if size != info.display_size() {
        filter.push_str(&format!(",scale={}:{}:flags=area", size.0, size.1));
    }
    let mut command = FfmpegCommand::new_with_path(&opts.ffmpeg);
    command
        .hide_banner()
        .arg("-nostdin")
        .input(ffmpeg_url(path))
        .map(format!("0:{}", info.stream_index))
        .filter(filter)
        .fps_mode("passthrough")
        .frames(u32::try_from(distinct.len()).unwrap_or(u32::MAX))
        .rawvideo();
    let mut child = command.spawn().map_err(|source| match source.kind() {
        std::io::ErrorKind::NotFound => VideoError::FfmpegMissing,
        _ => VideoError::Spawn { path: path.to_path_buf(), tool: "ffmpeg", source },
    })?;
    let deadline = Instant::now() + opts.timeout;
    let collected = collect_frames(path, info, size, &mut child, distinct.len(), deadline, opts.timeout);
    if collected.is_err() {
        // Stop ffmpeg so it does not block on a full pipe; it may already have exited.
        let _ = child.kill();
    }
    // `wait` drains stderr only if it was not taken (it was, by `iter`), so this cannot block
    // on a pipe; after a kill it only reaps.
    let status =
        child.wait().map_err(|source| VideoError::Spawn { path: path.to_path_buf(), tool: "ffmpeg", source })?;
    let (frames, tail) = collected?;
    if !status.success() {
        return Err(VideoError::Decode {
            path: path.to_path_buf(),
            status: status.to_string(),
            stderr_tail: tail_hint(tail),
        });
    }
    if frames.len() != distinct.len() {
        return Err(VideoError::MissingFrames {
            path: path.to_path_buf(),
            wanted: distinct.len(),
            got: frames.len(),
            stderr_tail: tail_hint(tail),
        });
    }
    Ok(frames)
}

/// Reads ffmpeg's events until it ends or `deadline` passes: the output frames, and the tail
/// of its log for error messages.
///
/// The events are read on a helper thread and handed over one at a time (a rendezvous
/// channel), so at most one frame is in flight besides those kept.
fn collect_frames(
    path: &Path,
    info: &VideoInfo,
    size: (u32, u32),
    child: &mut ffmpeg_sidecar::child::FfmpegChild,
    wanted: usize,
    deadline: Instant,
    timeout: Duration,
) -> Result<(Vec<RgbFrame>, VecDeque<String>), VideoError> {
    let iter = child.iter().map_err(|e| VideoError::Decode {
        path: path.to_path_buf(),
        status: "no output".into(),
        stderr_tail: e.to_string(),
    })?;
    let (tx, rx) = sync_channel::<FfmpegEvent>(0);
    // Ends when ffmpeg's pipes close (it exited or was killed) or `rx` is dropped.
    std::thread::spawn(move || {
        for event in iter {
            if tx.send(event).is_err() {
                break;
            }
        }
    });
    let mut frames = Vec::with_capacity(wanted);
    let mut tail = VecDeque::with_capacity(STDERR_TAIL_LINES);
    let mut remember = |line: String| {
        if tail.len() == STDERR_TAIL_LINES {
            tail.pop_front();
        }
        tail.push_back(line);
    };
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let event = match rx.recv_timeout(left) {
            Ok(event) => event,
            Err(RecvTimeoutError::Disconnected) => break,
            Err(RecvTimeoutError::Timeout) => {
                return Err(VideoError::Timeout { path: path.to_path_buf(), tool: "ffmpeg", timeout });
            }
        };
        match event {
            FfmpegEvent::OutputFrame(frame) if frames.len() < wanted => {
                frames.push(check_frame(path, info, size, frame)?);
            }
            FfmpegEvent::Log(level, line) => remember(format!("{}{line}", level_prefix(&level))),
            FfmpegEvent::Error(line) => remember(format!("error: {line}")),
            _ => {}
        }
    }
    Ok((frames, tail))
}

/// A short tag for a log line's level.
fn level_prefix(level: &LogLevel) -> &'static str {
    match level {
        LogLevel::Fatal => "fatal: ",
        LogLevel::Error => "error: ",
        LogLevel::Warning => "warning: ",
        _ => "",
    }
}

/// Joins the stderr tail, adding a hint for ffmpeg builds older than 5.1.
fn tail_hint(tail: VecDeque<String>) -> String {
    let text = Vec::from(tail).join("\n");
    if text.contains("fps_mode") { format!("{text}\n(`-fps_mode` needs ffmpeg 5.1 or newer)") } else { text }
}

/// Checks one output frame against the expected size and format.
fn check_frame(
    path: &Path,
    info: &VideoInfo,
    (width, height): (u32, u32),
    frame: OutputVideoFrame,
) -> Result<RgbFrame, VideoError> {
    let unexpected = |detail: String| VideoError::UnexpectedFrame { path: path.to_path_buf(), detail };
    if frame.pix_fmt != "rgb24" {
        return Err(unexpected(format!("pixel format {} instead of rgb24", frame.pix_fmt)));
    }
    if (frame.width, frame.height) != (width, height) {
        return Err(unexpected(format!(
            "{}x{} frame, expected {width}x{height} (stored {}x{}, rotation {})",
            frame.width, frame.height, info.width, info.height, info.rotation
        )));
    }
    RgbFrame::new(frame.width, frame.height, frame.data)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `numpy.linspace(0, n - 1, k).astype(int).tolist()`, computed with numpy 2.4.6.
    const NUMPY_TABLE: &[(usize, usize, &[usize])] = &[
        (1, 8, &[0, 0, 0, 0, 0, 0, 0, 0]),
        (2, 8, &[0, 0, 0, 0, 0, 0, 0, 1]),
        (7, 8, &[0, 0, 1, 2, 3, 4, 5, 6]),
        (8, 8, &[0, 1, 2, 3, 4, 5, 6, 7]),
        (9, 8, &[0, 1, 2, 3, 4, 5, 6, 8]),
        (30, 8, &[0, 4, 8, 12, 16, 20, 24, 29]),
        (300, 8, &[0, 42, 85, 128, 170, 213, 256, 299]),
        (1001, 8, &[0, 142, 285, 428, 571, 714, 857, 1000]),
    ];

    #[test]
    fn sample_indices_match_numpy_for_eight_frames() {
        for &(n, k, want) in NUMPY_TABLE {
            assert_eq!(sample_indices(n, k), want, "n={n} k={k}");
        }
    }

    #[test]
    fn sample_indices_edge_cases() {
        assert!(sample_indices(0, 8).is_empty());
        assert!(sample_indices(10, 0).is_empty());
        assert_eq!(sample_indices(10, 1), vec![0]);
        assert_eq!(sample_indices(5, 2), vec![0, 4]);
        assert_eq!(FrameSampling::Uniform.indices(30, 8), sample_indices(30, 8));
    }

    #[test]
    fn rotation_is_normalized_to_quarter_turns() {
        let stream = |rot: serde_json::Value, tag: Option<&str>| ProbeStream {
            index: 0,
            codec_type: Some("video".into()),
            codec_name: None,
            width: Some(4),
            height: Some(2),
            duration: None,
            nb_read_packets: Some("1".into()),
            nb_read_frames: None,
            disposition: HashMap::new(),
            tags: tag.map(|t| HashMap::from([("rotate".to_string(), t.to_string())])).unwrap_or_default(),
            side_data_list: if rot.is_null() { vec![] } else { vec![serde_json::json!({ "rotation": rot })] },
        };
        assert_eq!(rotation_of(&stream(serde_json::json!(90), None)), 90);
        assert_eq!(rotation_of(&stream(serde_json::json!(-90), None)), 270);
        assert_eq!(rotation_of(&stream(serde_json::json!(-180), None)), 180);
        assert_eq!(rotation_of(&stream(serde_json::json!(89.6), None)), 90);
        assert_eq!(rotation_of(&stream(serde_json::Value::Null, Some("270"))), 270);
        assert_eq!(rotation_of(&stream(serde_json::Value::Null, None)), 0);
    }

    #[test]
    fn display_size_swaps_for_quarter_turns() {
        let mut info = VideoInfo {
            n_frames: 1,
            width: 240,
            height: 136,
            rotation: 90,
            duration_s: None,
            stream_index: 0,
            codec: String::new(),
        };
        assert_eq!(info.display_size(), (136, 240));
        info.rotation = 180;
        assert_eq!(info.display_size(), (240, 136));
    }

    #[test]
    fn output_size_caps_pixels_keeping_aspect() {
        let info = |width, height, rotation| VideoInfo {
            n_frames: 1,
            width,
            height,
            rotation,
            duration_s: None,
            stream_index: 0,
            codec: String::new(),
        };
        assert_eq!(output_size(&info(3840, 2160, 0), DEFAULT_MAX_FRAME_PIXELS), (3840, 2160));
        assert_eq!(output_size(&info(7680, 4320, 0), DEFAULT_MAX_FRAME_PIXELS), (3840, 2160));
        assert_eq!(output_size(&info(7680, 4320, 90), DEFAULT_MAX_FRAME_PIXELS), (2160, 3840));
        let (w, h) = output_size(&info(33, 17, 0), 100);
        assert!(u64::from(w) * u64::from(h) <= 100 && w >= 1 && h >= 1, "{w}x{h}");
        assert_eq!(output_size(&info(16384, 1, 0), 4), (4, 1));
        assert_eq!(output_size(&info(5, 5, 0), 0), (1, 1));
    }

    #[test]
    fn spread_repeats_and_moves_frames() {
        let f = |v: u8| RgbFrame::new(1, 1, vec![v; 3]).expect("frame");
        let out = spread(&[0, 5], vec![f(0), f(5)], &[5, 0, 0, 5, 5]);
        let firsts: Vec<u8> = out.iter().map(|fr| fr.data()[0]).collect();
        assert_eq!(firsts, vec![5, 0, 0, 5, 5]);
    }

    #[test]
    fn stderr_tail_hints_at_old_ffmpeg() {
        let tail = VecDeque::from(["error: Unrecognized option 'fps_mode'.".to_string()]);
        assert!(tail_hint(tail).contains("ffmpeg 5.1 or newer"));
        assert_eq!(tail_hint(VecDeque::from(["a".to_string(), "b".to_string()])), "a\nb");
    }

    #[test]
    fn select_filter_escapes_commas() {
        assert_eq!(select_filter(&[0, 10]), "select='eq(n\\,0)+eq(n\\,10)'");
    }

    #[test]
    fn rgb_frame_checks_its_buffer() {
        assert!(RgbFrame::new(2, 2, vec![0; 12]).is_ok());
        assert!(matches!(RgbFrame::new(2, 2, vec![0; 11]), Err(VideoError::FrameBuffer { .. })));
        assert!(matches!(RgbFrame::new(0, 2, vec![]), Err(VideoError::FrameBuffer { .. })));
    }
}
