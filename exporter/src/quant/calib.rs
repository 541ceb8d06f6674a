//! Calibration set specs (`calib/*.yaml`): which videos, images and prompts, how many samples,
//! how thresholds are chosen. The YAML is read into a raw struct with defaults and resolved
//! once into [`CalibSpec`], where every choice is an enum and every path is absolute.
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::Command;

use serde::Deserialize;

use super::stats::Method;
use crate::error::{Error, Result};

/// The built-in spec (`calib/default.yaml`), used when no `--calib` is given.
pub const DEFAULT_SPEC: &str = include_str!("../../../calib/default.yaml");

/// Seconds of a generated video when the spec does not say.
const DEFAULT_SECONDS: f64 = 3.0;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSpec {
    #[serde(default = "default_samples")]
    samples: usize,
    #[serde(default)]
    method: RawMethod,
    #[serde(default = "default_percentile")]
    percentile: f64,
    #[serde(default = "default_true")]
    smoothquant: bool,
    #[serde(default = "default_alpha")]
    smoothquant_alpha: f32,
    #[serde(default)]
    smoothquant_down_proj: bool,
    #[serde(default)]
    videos: Vec<RawMedia>,
    #[serde(default)]
    images: Vec<RawMedia>,
    prompts: Vec<String>,
    #[serde(default)]
    texts: Vec<String>,
    #[serde(default = "default_trt_version")]
    trt_cache_version: u32,
    #[serde(default)]
    exclude: Vec<String>,
    #[serde(default)]
    keep_float_layers: usize,
}

fn default_samples() -> usize {
    8
}
fn default_percentile() -> f64 {
    99.99
}
fn default_true() -> bool {
    true
}
fn default_alpha() -> f32 {
    0.5
}
fn default_trt_version() -> u32 {
    101300
}

#[derive(Deserialize, Default, Clone, Copy)]
#[serde(rename_all = "snake_case")]
enum RawMethod {
    #[default]
    Max,
    Percentile,
    Entropy,
    Mse,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawMedia {
    path: Option<PathBuf>,
    generated: Option<String>,
    seconds: Option<f64>,
}

/// Where a calibration video or image comes from.
#[derive(Debug, Clone, PartialEq)]
pub enum MediaSource {
    /// A file (absolute, or relative to the working directory for the built-in spec).
    File(PathBuf),
    /// An ffmpeg `lavfi` source, rendered at calibration time.
    Generated {
        /// The source, e.g. `testsrc2=size=320x240:rate=10`.
        lavfi: String,
        /// Length of a video, in seconds (images take the first frame).
        seconds: f64,
    },
}

/// A resolved calibration spec.
#[derive(Debug, Clone)]
pub struct CalibSpec {
    /// Where it was read from (a path, or `built-in`), for reports.
    pub origin: String,
    /// File stem used to name the tables it produces.
    pub stem: String,
    /// Number of (media, prompt) samples through the language model.
    pub samples: usize,
    /// How thresholds are chosen.
    pub method: Method,
    /// Whether SmoothQuant is applied to the language model.
    pub smoothquant: bool,
    /// SmoothQuant migration strength.
    pub alpha: f32,
    /// Whether SmoothQuant also smooths `down_proj`'s input, folded into `up_proj`'s rows.
    pub smooth_down_proj: bool,
    /// Videos (vision tower, and video samples).
    pub videos: Vec<MediaSource>,
    /// Images (image tower, and image samples).
    pub images: Vec<MediaSource>,
    /// Questions.
    pub prompts: Vec<String>,
    /// Plain text passages, each one more text-only sample through the language model.
    pub texts: Vec<String>,
    /// TensorRT version in the calibration caches' header.
    pub trt_version: u32,
    /// Linears whose weight name contains one of these stay in float.
    pub exclude: Vec<String>,
    /// Decoder layers kept in float by the sensitivity scan (0: no scan).
    pub keep_float_layers: usize,
}

impl CalibSpec {
    /// Reads and resolves the spec at `path` (relative media paths are taken from its directory).
    pub fn load(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        let base = path.parent().map(Path::to_path_buf).unwrap_or_default();
        let stem = path.file_stem().and_then(|s| s.to_str()).unwrap_or("calib").to_string();
        Self::parse(&text, &path.display().to_string(), &stem, &base)
    }

    /// The built-in spec (`calib/default.yaml`).
    pub fn builtin() -> Result<Self> {
        Self::parse(DEFAULT_SPEC, "built-in calib/default.yaml", "default", Path::new(""))
    }

    /// Resolves spec `text`; `origin` names it in errors, relative paths are under `base`.
    pub fn parse(text: &str, origin: &str, stem: &str, base: &Path) -> Result<Self> {
        let bad = |message: String| Error::Config { path: PathBuf::from(origin), message };
        let raw: RawSpec = serde_norway::from_str(text).map_err(|e| bad(e.to_string()))?;
        let method = match raw.method {
            RawMethod::Max => Method::Max,
            RawMethod::Entropy => Method::Entropy,
            RawMethod::Mse => Method::Mse,
            RawMethod::Percentile if raw.percentile > 0.0 && raw.percentile <= 100.0 => {
                Method::Percentile(raw.percentile)
            }
            RawMethod::Percentile => return Err(bad(format!("percentile {}: must be in (0, 100]", raw.percentile))),
        };
        check_alpha(raw.smoothquant_alpha).map_err(bad)?;
        if raw.samples == 0 {
            return Err(bad("samples: at least 1".into()));
        }
        if raw.prompts.is_empty() || raw.prompts.iter().any(|p| p.trim().is_empty()) {
            return Err(bad("prompts: at least one, none empty".into()));
        }
        if raw.videos.is_empty() {
            return Err(bad("videos: at least one (the vision tower is calibrated on them)".into()));
        }
        let media = |list: Vec<RawMedia>, what: &str| -> Result<Vec<MediaSource>> {
            list.into_iter()
                .enumerate()
                .map(|(i, m)| match (m.path, m.generated) {
                    (Some(p), None) if m.seconds.is_none() => Ok(MediaSource::File(base.join(p))),
                    (None, Some(lavfi)) if !lavfi.trim().is_empty() => {
                        let seconds = m.seconds.unwrap_or(DEFAULT_SECONDS);
                        if !(seconds > 0.0 && seconds <= 600.0) {
                            return Err(bad(format!("{what}[{i}]: seconds {seconds} not in (0, 600]")));
                        }
                        Ok(MediaSource::Generated { lavfi, seconds })
                    }
                    _ => Err(bad(format!(
                        "{what}[{i}]: give either `path` or `generated` (with optional `seconds`), not both"
                    ))),
                })
                .collect()
        };
        Ok(Self {
            origin: origin.to_string(),
            stem: stem.to_string(),
            samples: raw.samples,
            method,
            smoothquant: raw.smoothquant,
            alpha: raw.smoothquant_alpha,
            smooth_down_proj: raw.smoothquant_down_proj,
            videos: media(raw.videos, "videos")?,
            images: media(raw.images, "images")?,
            prompts: raw.prompts,
            texts: raw.texts,
            trt_version: raw.trt_cache_version,
            exclude: raw.exclude,
            keep_float_layers: raw.keep_float_layers,
        })
    }

    /// A canonical description of everything that affects the computed scales (the media by
    /// source; see [`super::fingerprint`] for the file contents).
    pub fn canonical(&self) -> String {
        let mut s = String::new();
        let alpha = match (self.smoothquant, self.smooth_down_proj) {
            (false, _) => "off".to_string(),
            (true, false) => self.alpha.to_string(),
            (true, true) => format!("{} down_proj", self.alpha),
        };
        let _ = writeln!(s, "samples={} method={} smoothquant={alpha}", self.samples, self.method.label());
        for (kind, list) in [("video", &self.videos), ("image", &self.images)] {
            for m in list {
                let _ = match m {
                    MediaSource::File(p) => writeln!(s, "{kind} file {}", p.display()),
                    MediaSource::Generated { lavfi, seconds } => writeln!(s, "{kind} lavfi {lavfi} {seconds}s"),
                };
            }
        }
        for p in &self.prompts {
            let _ = writeln!(s, "prompt {p:?}");
        }
        for t in &self.texts {
            let _ = writeln!(s, "text {t:?}");
        }
        for e in &self.exclude {
            let _ = writeln!(s, "exclude {e:?}");
        }
        if self.keep_float_layers > 0 {
            let _ = writeln!(s, "keep_float_layers {}", self.keep_float_layers);
        }
        s
    }
}

/// Checks a SmoothQuant migration strength.
pub fn check_alpha(alpha: f32) -> std::result::Result<(), String> {
    if (0.0..=1.0).contains(&alpha) { Ok(()) } else { Err(format!("smoothquant_alpha {alpha}: must be in [0, 1]")) }
}

/// The spec's media as files: paths as given, generated ones rendered with ffmpeg into `dir`.
/// Returns (videos, images).
pub fn materialize(spec: &CalibSpec, dir: &Path) -> Result<(Vec<PathBuf>, Vec<PathBuf>)> {
    let render = |list: &[MediaSource], video: bool| -> Result<Vec<PathBuf>> {
        let mut out = Vec::new();
        for (i, m) in list.iter().enumerate() {
            match m {
                MediaSource::File(p) => {
                    if !p.is_file() {
                        return Err(Error::Invalid(format!("{}: calibration media not found", p.display())));
                    }
                    out.push(p.clone());
                }
                MediaSource::Generated { lavfi, seconds } => {
                    let file = dir.join(if video { format!("video{i}.mp4") } else { format!("image{i}.png") });
                    let mut cmd = Command::new("ffmpeg");
                    cmd.args(["-hide_banner", "-loglevel", "error", "-y", "-f", "lavfi", "-i", lavfi]);
                    if video {
                        cmd.args(["-t", &seconds.to_string(), "-pix_fmt", "yuv420p"]);
                    } else {
                        cmd.args(["-frames:v", "1"]);
                    }
                    let done = cmd.arg(&file).output().map_err(|e| {
                        Error::Invalid(format!("running ffmpeg to render calibration media {lavfi:?}: {e}"))
                    })?;
                    if !done.status.success() {
                        return Err(Error::Invalid(format!(
                            "{}: ffmpeg could not render calibration media {lavfi:?}: {}",
                            file.display(),
                            String::from_utf8_lossy(&done.stderr).trim()
                        )));
                    }
                    out.push(file);
                }
            }
        }
        Ok(out)
    };
    Ok((render(&spec.videos, true)?, render(&spec.images, false)?))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn the_builtin_spec_resolves() {
        let s = CalibSpec::builtin().unwrap();
        assert!(s.samples >= 1 && !s.prompts.is_empty() && !s.videos.is_empty());
        assert!(s.videos.iter().all(|m| matches!(m, MediaSource::Generated { .. })), "works on a fresh machine");
        assert_eq!(s.alpha, 0.75);
    }

    #[test]
    fn methods_paths_and_mistakes() {
        let base = Path::new("/specs");
        let ok = "method: percentile\npercentile: 99.9\nvideos: [{path: a.mp4}]\nprompts: [q]\n";
        let s = CalibSpec::parse(ok, "t.yaml", "t", base).unwrap();
        assert_eq!(s.method, Method::Percentile(99.9));
        assert_eq!(s.videos, vec![MediaSource::File(PathBuf::from("/specs/a.mp4"))]);
        let entropy = "method: entropy\nvideos: [{generated: testsrc, seconds: 2}]\nprompts: [q]\n";
        let s = CalibSpec::parse(entropy, "t.yaml", "t", base).unwrap();
        assert_eq!(s.method, Method::Entropy);
        assert_eq!(s.videos, vec![MediaSource::Generated { lavfi: "testsrc".into(), seconds: 2.0 }]);
        for bad in [
            "videos: [{path: a, generated: b}]\nprompts: [q]\n",
            "videos: [{path: a}]\nprompts: []\n",
            "videos: []\nprompts: [q]\n",
            "method: percentile\npercentile: 0\nvideos: [{path: a}]\nprompts: [q]\n",
            "smoothquant_alpha: 1.5\nvideos: [{path: a}]\nprompts: [q]\n",
            "method: minmax\nvideos: [{path: a}]\nprompts: [q]\n",
            "sample: 3\nvideos: [{path: a}]\nprompts: [q]\n",
        ] {
            assert!(CalibSpec::parse(bad, "t.yaml", "t", base).is_err(), "{bad}");
        }
    }
}
