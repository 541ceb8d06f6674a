//! The one error type of the exporter.
use std::path::PathBuf;

/// Everything that can go wrong while reading a checkpoint or writing graphs.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A file could not be read or written.
    #[error("{path}")]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// What the OS said.
        #[source]
        source: std::io::Error,
    },
    /// The disk filled up while `what` was written (the export removes what it wrote).
    #[error("the disk is full: no space left writing {what} ({path})")]
    DiskFull {
        /// What was being written: the engine and its destination, or calibration scratch.
        what: String,
        /// The file whose write failed.
        path: PathBuf,
        /// What the OS said.
        #[source]
        source: std::io::Error,
    },
    /// `config.json` is missing fields or holds values the exporter cannot honour.
    #[error("{path}: {message}")]
    Config {
        /// The config file.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
    /// A `config.json` (or processor/generation config) field has the wrong JSON type.
    #[error("{path}: {field}: expected {expected}, found {found}")]
    ConfigType {
        /// The config file.
        path: PathBuf,
        /// The field, with its section (`text_config.hidden_size`).
        field: String,
        /// What the field must hold (`an integer`).
        expected: &'static str,
        /// The value found, as JSON.
        found: String,
    },
    /// The config's dimensions cannot describe a model (heads that do not divide the width,
    /// a patch that does not tile the image, zero layers).
    #[error("{path}: {message}")]
    ConfigDims {
        /// The config file.
        path: PathBuf,
        /// Which fields disagree, with their values.
        message: String,
    },
    /// The checkpoint is not a Video-LLaVA model this exporter knows.
    #[error("{path}: unsupported architecture {found:?} (expected VideoLlavaForConditionalGeneration)")]
    UnknownArchitecture {
        /// The config file.
        path: PathBuf,
        /// What the config names.
        found: String,
    },
    /// A safetensors file is malformed (truncated, bad header, offsets past the end).
    #[error("{path}: not a valid safetensors file: {message}")]
    Safetensors {
        /// The shard.
        path: PathBuf,
        /// What is wrong, naming the tensor at fault where one can be found.
        message: String,
    },
    /// A PyTorch `.bin` checkpoint is malformed or holds what the exporter cannot read
    /// (truncated zip, compressed entries, a bad pickle, non-contiguous strides).
    #[error("{path}: not a readable PyTorch checkpoint: {message}")]
    TorchCheckpoint {
        /// The `.bin` file.
        path: PathBuf,
        /// What is wrong, naming the entry or tensor at fault.
        message: String,
    },
    /// A PyTorch checkpoint's pickle names a global outside what `torch.load(weights_only=True)`
    /// accepts; it was refused before anything could run.
    #[error(
        "{path}: refused: its pickle calls {global}, which is not a tensor, storage or container type \
         (only what torch.load(weights_only=True) accepts is read; nothing was executed)"
    )]
    UnsafePickle {
        /// The `.bin` file.
        path: PathBuf,
        /// The refused global, as `module.name` (`posix.system`).
        global: String,
    },
    /// A shard index names a file that is not in the checkpoint directory.
    #[error("{index}: names shard {shard}, which does not exist")]
    MissingShard {
        /// The missing shard.
        shard: PathBuf,
        /// The index file naming it.
        index: PathBuf,
    },
    /// A tensor the model needs is not in the checkpoint.
    #[error("tensor {name} is missing from the checkpoint in {dir}")]
    MissingTensor {
        /// Full tensor name (as the checkpoint would spell it).
        name: String,
        /// The checkpoint directory.
        dir: PathBuf,
    },
    /// A tensor has a shape other than the config implies.
    #[error("tensor {name} has shape {found:?}, expected {expected:?} from config.json")]
    TensorShape {
        /// Full tensor name.
        name: String,
        /// Shape implied by the config.
        expected: Vec<usize>,
        /// Shape in the checkpoint.
        found: Vec<usize>,
    },
    /// A tensor's element type is not fp32, fp16 or bf16.
    #[error("tensor {name} has unsupported dtype {dtype}")]
    UnsupportedDtype {
        /// Full tensor name.
        name: String,
        /// Its dtype.
        dtype: String,
    },
    /// A weight holds NaN or an infinity: the checkpoint is corrupt, or was saved after training
    /// diverged; an engine built from it would answer with garbage.
    #[error(
        "{path}: tensor {name} holds a non-finite value ({value}) at element {index}; the checkpoint is corrupt or \
         was saved from a diverged run"
    )]
    NonFiniteWeight {
        /// The shard holding it.
        path: PathBuf,
        /// Full tensor name.
        name: String,
        /// Position of the first such element, in row-major order.
        index: usize,
        /// That element (NaN, inf or -inf).
        value: f32,
    },
    /// `tokenizer.model` is not a SentencePiece model (truncated, corrupt, no pieces).
    #[error("{path}: not a valid SentencePiece model: {message}")]
    SentencePiece {
        /// The model file.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
    /// `tokenizer.model` is a SentencePiece model of a kind the conversion does not handle
    /// (only BPE, as LLaMA's, is converted).
    #[error("{path}: SentencePiece {model_type} models are not supported (only BPE, as LLaMA uses)")]
    UnsupportedSentencePiece {
        /// The model file.
        path: PathBuf,
        /// Its `trainer_spec.model_type` (UNIGRAM, WORD, CHAR).
        model_type: String,
    },
    /// The tokenizer could not be built or read.
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    /// GPTQ could not factor the Hessian of a linear's input (calibration tokens too few or
    /// degenerate for it).
    #[error("GPTQ of {weight}: {source}")]
    Gptq {
        /// The linear's weight.
        weight: String,
        /// Where the factorization stopped.
        source: crate::weight_codes::cholesky::NotPositiveDefinite,
    },
    /// Anything else the user must fix, with the reason.
    #[error("{0}")]
    Invalid(String),
    /// An error from the runtime crate (manifest, ONNX Runtime).
    #[error(transparent)]
    Runtime(#[from] vl_runtime::Error),
}

impl Error {
    /// An I/O error on `path`.
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io { path: path.into(), source }
    }

    /// `self`, or [`Error::DiskFull`] naming `what` when it is a write that found no space left.
    pub fn on_full_disk(self, what: impl FnOnce() -> String) -> Self {
        match self {
            Error::Io { path, source } if is_full(&source) => Error::DiskFull { what: what(), path, source },
            e => e,
        }
    }
}

/// Whether `e` says the disk (or the user's quota on it) is full.
fn is_full(e: &std::io::Error) -> bool {
    use std::io::ErrorKind::{QuotaExceeded, StorageFull};
    matches!(e.kind(), StorageFull | QuotaExceeded)
}

/// Result with the exporter's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;
