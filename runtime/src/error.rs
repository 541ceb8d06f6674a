//! The one error type of the runtime.
use std::path::PathBuf;

/// Everything that can go wrong when loading engines or answering requests.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A file could not be read or written.
    #[error("{path}: {source}")]
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
    /// Decoding or preprocessing a video or image failed.
    #[error(transparent)]
    Video(#[from] crate::video::VideoError),
}

/// Result with the runtime's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    /// An I/O error on `path`.
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io { path: path.into(), source }
    }
}
