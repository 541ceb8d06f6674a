//! The JSON the two halves of the benchmark write: one [`SystemRun`] per system (an engine
//! precision, or the PyTorch baseline) and the machine's [`Limits`].
//!
//! `tools/bench_torch.py` writes the same schema; change both together.
use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// Raw measurements of one system on one checkpoint.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SystemRun {
    /// `vl` or `pytorch`.
    pub system: String,
    /// Human label, e.g. `vl fp32`.
    pub label: String,
    /// Numeric precision of the weights.
    pub precision: String,
    /// Engine directory (vl only).
    #[serde(default)]
    pub engine: Option<String>,
    /// Intra-op threads.
    pub threads: usize,
    /// Library versions.
    #[serde(default)]
    pub versions: BTreeMap<String, String>,
    /// Loading time (sessions or model), not part of any stage.
    pub load_ms: f64,
    /// Warm-up answers run before measuring.
    pub warmup: usize,
    /// Measured answers.
    pub reps: usize,
    /// Prompt length of the measured answers (visual tokens included).
    pub prompt_tokens: usize,
    /// Tokens per measured answer.
    pub new_tokens: usize,
    /// Video frames.
    pub frames: usize,
    /// Per-repetition samples.
    pub samples: Samples,
    /// Peak resident memory after the measured answers (before the scaling curves).
    pub peak_rss_mb: f64,
    /// Bytes of weights one decode step reads (the decoder without the embedding table).
    pub decode_weight_bytes: u64,
    /// KV-cache bytes per position (all layers, keys and values).
    pub kv_bytes_per_position: u64,
    /// Greedy tokens of the last measured answer.
    #[serde(default)]
    pub tokens: Vec<u32>,
    /// Scaling curves, if run.
    #[serde(default)]
    pub scaling: Option<Scaling>,
    /// Anything a reader must know (reduced repetitions, budget cuts, ...).
    #[serde(default)]
    pub notes: Vec<String>,
}

/// One value per repetition, for each stage.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Samples {
    /// Decoding the clip and preprocessing the sampled frames.
    #[serde(default)]
    pub preprocess_ms: Vec<f64>,
    /// The vision tower and projector.
    #[serde(default)]
    pub vision_ms: Vec<f64>,
    /// The prefill (embedding, splice, decoder over the prompt).
    #[serde(default)]
    pub prefill_ms: Vec<f64>,
    /// From pixel values to the first token (vision, prefill, first sample).
    #[serde(default)]
    pub ttft_ms: Vec<f64>,
    /// Mean decode step after the first token.
    #[serde(default)]
    pub decode_ms_per_token: Vec<f64>,
    /// The whole answer from pixel values (vision, prefill, all tokens).
    #[serde(default)]
    pub answer_ms: Vec<f64>,
}

/// How cost grows with the work.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Scaling {
    /// Vision time against frame count.
    #[serde(default)]
    pub vision_vs_frames: Vec<Point>,
    /// Prefill time of a text-only prompt against its length (fresh cache).
    #[serde(default)]
    pub prefill_vs_prompt: Vec<Point>,
    /// Decode ms per token against the context held in the cache.
    #[serde(default)]
    pub decode_vs_context: Vec<Point>,
}

/// One point of a curve.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq)]
pub struct Point {
    /// Frames, prompt tokens or context positions.
    pub x: usize,
    /// Milliseconds.
    pub ms: f64,
}

/// The machine's limits, measured in the same run.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Limits {
    /// Threads the measurements used.
    pub threads: usize,
    /// What measured them.
    pub tool: String,
    /// Best read bandwidth (GB/s): bounds decode.
    pub bandwidth_read_gbs: f64,
    /// All read samples.
    #[serde(default)]
    pub bandwidth_read_samples_gbs: Vec<f64>,
    /// Best copy bandwidth (read + write bytes, GB/s).
    pub bandwidth_copy_gbs: f64,
    /// All copy samples.
    #[serde(default)]
    pub bandwidth_copy_samples_gbs: Vec<f64>,
    /// Buffer size of the bandwidth runs.
    #[serde(default)]
    pub bandwidth_buffer_gib: f64,
    /// 4096³ GEMM rate.
    pub gemm_square_4096_gflops: f64,
    /// 2079×4096×11008 GEMM rate (a prefill's MLP shape).
    pub gemm_prefill_shape_gflops: f64,
    /// The best of the two: bounds vision and prefill.
    pub gemm_peak_gflops: f64,
    /// CPU model.
    #[serde(default)]
    pub cpu: String,
}
