//! The one error type of the runtime.
use std::path::PathBuf;

/// Everything that can go wrong when loading engines or answering requests.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A file could not be read or written.
    #[error("{path}")]
    Io {
        /// The file.
        path: PathBuf,
        /// What the OS said.
        #[source]
        source: std::io::Error,
    },
    /// The ONNX Runtime shared library could not be found or loaded.
    #[error("ONNX Runtime could not be loaded: {0}")]
    OrtLoad(String),
    /// An explicitly requested device cannot be used; `reason` names what is missing.
    #[error("device {device} cannot be used: {reason}")]
    DeviceUnavailable {
        /// The device asked for (`cuda`, `tensorrt:1`, ...).
        device: String,
        /// What is missing and how to get it.
        reason: String,
    },
    /// ONNX Runtime reported an error.
    #[error("ONNX Runtime: {0}")]
    Ort(#[from] ort::Error),
    /// `manifest.yaml` is missing fields, malformed, or from another schema.
    #[error("{path}: {message}")]
    Manifest {
        /// The manifest file.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
    /// A graph file disagrees with the manifest (inputs, outputs, types or shapes).
    #[error("{path}: does not match manifest.yaml: {message}")]
    GraphMismatch {
        /// The graph file.
        path: PathBuf,
        /// The difference.
        message: String,
    },
    /// A graph or data file's SHA-256 differs from the manifest's (altered or truncated).
    #[error("{path}: SHA-256 {found} differs from the manifest's {expected}; the engine was altered or is incomplete")]
    Checksum {
        /// The file.
        path: PathBuf,
        /// Hash in the manifest.
        expected: String,
        /// Hash of the file.
        found: String,
    },
    /// ONNX Runtime could not create a session for a graph.
    #[error("{path}: ONNX Runtime could not load it")]
    Session {
        /// The graph file.
        path: PathBuf,
        /// What ONNX Runtime said.
        #[source]
        source: ort::Error,
    },
    /// The tokenizer could not be loaded or failed on a text.
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    /// The prompt and answer would not fit the model's context.
    #[error("the prompt needs {needed} tokens (with up to {max_new} new ones) but the context holds {limit}")]
    ContextOverflow {
        /// Tokens the request would need.
        needed: usize,
        /// New tokens asked for.
        max_new: usize,
        /// The context length.
        limit: usize,
    },
    /// The request itself is invalid (bad sampling parameters, wrong pixel tensor shape, ...).
    #[error("{0}")]
    Request(String),
    /// Sampling parameters are invalid.
    #[error(transparent)]
    Sampling(#[from] crate::sampling::SamplingError),
    /// Incremental detokenization failed.
    #[error(transparent)]
    Stream(#[from] crate::stream::StreamError),
    /// Decoding or preprocessing a video or image failed.
    #[error(transparent)]
    Video(#[from] crate::video::VideoError),
    /// The serving engine is at its limits; the request did no work.
    #[error("the engine is at its limits: {0}; try again later")]
    Overloaded(Overload),
    /// A follow-up named a conversation the engine cannot continue.
    #[error("conversation: {0}")]
    Conversation(&'static str),
    /// A decoder call shared with other requests failed.
    #[error("a decoder step shared with other requests failed: {0}")]
    SharedStep(std::sync::Arc<Error>),
    /// The serving engine stopped before the request finished.
    #[error("the serving engine has stopped")]
    EngineStopped,
}

/// Which limit refused a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Overload {
    /// The queue of waiting requests is full.
    QueueFull {
        /// Requests waiting.
        waiting: usize,
    },
    /// No sequence slot or KV budget is free now and the engine refuses instead of queueing.
    NoRoom,
}

impl std::fmt::Display for Overload {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Overload::QueueFull { waiting } => write!(f, "{waiting} requests are waiting"),
            Overload::NoRoom => write!(f, "no sequence slot or KV memory is free"),
        }
    }
}

/// Result with the runtime's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    /// An I/O error on `path`.
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io { path: path.into(), source }
    }
}
