//! TensorRT settings generated from the manifest: optimization profiles covering every shape
//! the runtime feeds a graph (so TensorRT never rebuilds an engine mid-conversation), engine and
//! timing caches under the engine directory, and the precision flags the graph's types call for.
use std::path::{Path, PathBuf};

use crate::error::{Error, Result};
use crate::manifest::{Dim, GraphEntry, Manifest, Precision};

/// User settings of the TensorRT devices.
#[derive(Debug, Clone)]
pub struct TensorRtOptions {
    /// Where engines, timing caches and TensorRT-RTX runtime caches go (default: `trt_cache/`
    /// in the engine directory).
    pub cache_dir: Option<PathBuf>,
    /// Sequences per decoder call the profile covers (the serving engine's `max_active`).
    pub max_batch: usize,
    /// Videos per vision call the profile covers.
    pub max_vision_batch: usize,
    /// The prompt length TensorRT tunes for (the serving engine's prefill chunk).
    pub opt_sequence: usize,
    /// CUDA graphs (TensorRT provider option; pays off with fixed shapes).
    pub cuda_graph: bool,
    /// What to do with compiled (EP-context) graphs made for another GPU or version.
    pub compiled: super::CompiledPolicy,
}

impl Default for TensorRtOptions {
    fn default() -> Self {
        Self {
            cache_dir: None,
            max_batch: 8,
            max_vision_batch: 1,
            opt_sequence: 512,
            cuda_graph: false,
            compiled: super::CompiledPolicy::Rebuild,
        }
    }
}

/// The range of every symbolic dimension the runtime uses, from the manifest and the options.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ShapeLimits {
    /// Decoder rows per call.
    pub max_batch: usize,
    /// Vision rows per call.
    pub max_vision_batch: usize,
    /// Frames per video.
    pub frames: usize,
    /// Visual rows of one video or image (`embed.onnx`'s `visual_rows`).
    pub max_visual_rows: usize,
    /// Longest context.
    pub max_sequence: usize,
    /// Prompt length to tune for.
    pub opt_sequence: usize,
}

impl ShapeLimits {
    /// The limits of `manifest`'s graphs under `options`.
    pub fn new(manifest: &Manifest, options: &TensorRtOptions) -> Self {
        Self {
            max_batch: options.max_batch.max(1),
            max_vision_batch: options.max_vision_batch.max(1),
            frames: manifest.preprocess.frames,
            max_visual_rows: (manifest.preprocess.frames * manifest.model.tokens_per_frame)
                .max(manifest.model.tokens_per_image),
            max_sequence: manifest.max_sequence_length,
            opt_sequence: options.opt_sequence.clamp(1, manifest.max_sequence_length.max(1)),
        }
    }

    /// `(min, opt, max)` of the symbolic dimension `name` in graph `role`.
    fn range(&self, role: &str, name: &str) -> Option<(usize, usize, usize)> {
        let s = self.max_sequence;
        Some(match name {
            "batch" if role == "vision" || role == "image" => (1, 1, self.max_vision_batch),
            "batch" => (1, 1, self.max_batch),
            "frames" => (1, self.frames, self.frames),
            "visual_batch" => (1, 1, self.max_vision_batch),
            // Text-only and decode steps bind no rows.
            "visual_rows" => (0, self.max_visual_rows, self.max_visual_rows),
            "sequence" => (1, self.opt_sequence, s),
            // The first prompt chunk has no past; a decode step of a long conversation has s - 1.
            "past_sequence" => (0, self.opt_sequence, s.saturating_sub(1)),
            "total_sequence" => (1, self.opt_sequence + 1, s),
            "kv_capacity" => (s + 1, s + 1, s + 1),
            _ => return None,
        })
    }
}

/// The three profile strings of one graph (`name:1x4x0x16,...`, TensorRT's syntax).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Profile {
    /// Smallest shapes.
    pub min: String,
    /// Shapes TensorRT tunes for.
    pub opt: String,
    /// Largest shapes.
    pub max: String,
}

/// The optimization profile of `entry` (graph `role`): every input with a symbolic dimension,
/// each dimension over the range the runtime feeds. A dimension the limits do not know is an
/// error: the profile must cover every shape, or TensorRT rebuilds mid-run.
pub fn profile(role: &str, entry: &GraphEntry, limits: &ShapeLimits) -> Result<Option<Profile>> {
    let (mut min, mut opt, mut max) = (Vec::new(), Vec::new(), Vec::new());
    for input in &entry.inputs {
        if input.shape.iter().all(|d| matches!(d, Dim::Fixed(_))) {
            continue;
        }
        let mut dims = [Vec::new(), Vec::new(), Vec::new()];
        for dim in &input.shape {
            let (lo, mid, hi) = match dim {
                Dim::Fixed(n) => {
                    let n = usize::try_from(*n).unwrap_or(0);
                    (n, n, n)
                }
                Dim::Symbolic(name) => limits.range(role, name).ok_or_else(|| Error::Manifest {
                    path: PathBuf::from(&entry.file),
                    message: format!(
                        "input {} has a dimension {name:?} that no TensorRT profile range is defined for",
                        input.name
                    ),
                })?,
            };
            for (out, v) in dims.iter_mut().zip([lo, mid, hi]) {
                out.push(v.to_string());
            }
        }
        let [a, b, c] = dims;
        min.push(format!("{}:{}", input.name, a.join("x")));
        opt.push(format!("{}:{}", input.name, b.join("x")));
        max.push(format!("{}:{}", input.name, c.join("x")));
    }
    if min.is_empty() {
        return Ok(None);
    }
    Ok(Some(Profile { min: min.join(","), opt: opt.join(","), max: max.join(",") }))
}

/// Where a device's caches go: `options.cache_dir` or `<engine>/trt_cache`, then one directory
/// per device kind (engines of the two TensorRT builds are not interchangeable).
pub fn cache_dir(engine_dir: &Path, options: &TensorRtOptions, kind: &str) -> PathBuf {
    options.cache_dir.clone().unwrap_or_else(|| engine_dir.join("trt_cache")).join(kind)
}

/// TensorRT precision flags the engine's precision calls for: fp16 graphs build fp16 kernels,
/// INT8 graphs (explicit Q/DQ) build int8 ones; weight-only graphs dequantize in the graph.
pub fn precision_flags(precision: Precision) -> (bool, bool) {
    match precision {
        Precision::Fp16 => (true, false),
        Precision::Int8 => (false, true),
        _ => (false, false),
    }
}

/// The classic TensorRT provider for graph `role`, with its profile, caches and precision.
pub fn classic_provider(
    device_id: i32,
    role: &str,
    entry: &GraphEntry,
    limits: &ShapeLimits,
    precision: Precision,
    cache: &Path,
    options: &TensorRtOptions,
) -> Result<ort::ep::ExecutionProviderDispatch> {
    let (fp16, int8) = precision_flags(precision);
    let cache = cache.to_string_lossy().into_owned();
    let mut trt = ort::ep::TensorRT::default()
        .with_device_id(device_id)
        .with_fp16(fp16)
        .with_int8(int8)
        .with_engine_cache(true)
        .with_engine_cache_path(&cache)
        .with_engine_cache_prefix(role)
        .with_timing_cache(true)
        .with_timing_cache_path(&cache)
        .with_cuda_graph(options.cuda_graph);
    if let Some(p) = profile(role, entry, limits)? {
        trt = trt.with_profile_min_shapes(p.min).with_profile_opt_shapes(p.opt).with_profile_max_shapes(p.max);
    }
    Ok(trt.build().error_on_failure())
}

/// The TensorRT for RTX plugin's options for graph `role` (keys of
/// `tensorrt_rtx_provider_options.h`).
pub fn rtx_options(
    role: &str,
    entry: &GraphEntry,
    limits: &ShapeLimits,
    cache: &Path,
    options: &TensorRtOptions,
) -> Result<Vec<(String, String)>> {
    let mut out = vec![
        ("nv_runtime_cache_path".to_string(), cache.join(role).to_string_lossy().into_owned()),
        ("enable_cuda_graph".to_string(), if options.cuda_graph { "1" } else { "0" }.to_string()),
    ];
    if let Some(p) = profile(role, entry, limits)? {
        out.push(("nv_profile_min_shapes".into(), p.min));
        out.push(("nv_profile_opt_shapes".into(), p.opt));
        out.push(("nv_profile_max_shapes".into(), p.max));
    }
    Ok(out)
}
