//! vl-bench: benchmarks of vl engines against the PyTorch baseline; the library half of the
//! `vl-bench` binary.
//!
//! May depend on `vl-runtime` through its public API only (never the other way round), on
//! `vl-serve`'s library (which depends on `vl-runtime` only) to measure serving over HTTP, on
//! ONNX Runtime for profiling, and on CLI crates in the binary. Nothing depends on it.
//!
//! `vl-bench run` measures, on one checkpoint and with the same thread count, the PyTorch
//! baseline (`tools/bench_torch.py`, transformers eager fp32) and every engine precision that was
//! built, each in its own process so that peak memory is its own, together with the machine's
//! physical limits (memory bandwidth and peak fp32 GEMM rate, measured in the same run). It
//! writes `results.json` (machines), `results.md` (the README's table) and `bench.png` (plot).
//!
//! - [`schema`]: the JSON both halves write for one system, and the machine limits.
//! - [`measure`]: one engine through the public runtime API (`Pipeline`, `LanguageModel`).
//! - [`cost`]: FLOPs and bytes the work needs, for the roofline ratios.
//! - [`stats`]: medians, ranges, pairwise ratios.
//! - [`report`]: summaries, ratios, targets, the Markdown table.
//! - [`driver`]: inputs, child processes, the time budget.
//! - [`profile`]: where a decode step's time goes (ONNX Runtime's profiler).
//! - [`concurrency`]: many conversations at once through the serving engine.
//! - [`serve`]: the same over HTTP through `vl-serve`, and follow-ups with the prefix cache.
//!
//! Benchmarks are not tests: nothing here runs in `make test` beyond the unit tests of the
//! arithmetic.
use std::path::PathBuf;

pub mod concurrency;
pub mod cost;
pub mod driver;
pub mod measure;
pub mod profile;
pub mod report;
pub mod schema;
pub mod serve;
pub mod stats;

/// What can go wrong while benchmarking.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum BenchError {
    /// The runtime failed (loading, generation).
    #[error(transparent)]
    Runtime(#[from] vl_runtime::Error),
    /// Decoding or preprocessing the clip failed.
    #[error(transparent)]
    Video(#[from] vl_runtime::video::VideoError),
    /// ONNX Runtime failed outside the runtime's own sessions (profiling).
    #[error("ONNX Runtime: {0}")]
    Ort(#[from] ort::Error),
    /// A file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// What the OS said.
        #[source]
        source: std::io::Error,
    },
    /// A JSON file could not be parsed or written.
    #[error("{path}: {source}")]
    Json {
        /// The file.
        path: PathBuf,
        /// What serde said.
        #[source]
        source: serde_json::Error,
    },
    /// The pixel values could not be written.
    #[error("{path}: {source}")]
    Npy {
        /// The file.
        path: PathBuf,
        /// What ndarray-npy said.
        #[source]
        source: ndarray_npy::WriteNpyError,
    },
    /// A child process (the Python half, an engine run, ffmpeg) failed.
    #[error("{what} failed ({status})")]
    Child {
        /// The command.
        what: String,
        /// Its exit status.
        status: std::process::ExitStatus,
    },
    /// A child process could not be started.
    #[error("could not start {what}: {source}")]
    Spawn {
        /// The command.
        what: String,
        /// What the OS said.
        #[source]
        source: std::io::Error,
    },
    /// The in-process `vl-serve` could not start or failed.
    #[error(transparent)]
    Serve(#[from] vl_serve::ServeError),
    /// An HTTP request to the in-process `vl-serve` failed.
    #[error("HTTP: {0}")]
    Http(#[from] reqwest::Error),
    /// The benchmark's inputs or plan are inconsistent.
    #[error("{0}")]
    Plan(String),
}

/// Result with [`BenchError`].
pub type Result<T, E = BenchError> = std::result::Result<T, E>;

impl BenchError {
    /// An I/O error on `path`.
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        BenchError::Io { path: path.into(), source }
    }
}

/// Reads a JSON file into `T`.
pub fn read_json<T: serde::de::DeserializeOwned>(path: &std::path::Path) -> Result<T> {
    let text = std::fs::read_to_string(path).map_err(|e| BenchError::io(path, e))?;
    serde_json::from_str(&text).map_err(|source| BenchError::Json { path: path.to_path_buf(), source })
}

/// Writes `value` as pretty JSON, creating the parent directory.
pub fn write_json<T: serde::Serialize>(path: &std::path::Path, value: &T) -> Result<()> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(|e| BenchError::io(dir, e))?;
    }
    let text =
        serde_json::to_string_pretty(value).map_err(|source| BenchError::Json { path: path.to_path_buf(), source })?;
    std::fs::write(path, text + "\n").map_err(|e| BenchError::io(path, e))
}
