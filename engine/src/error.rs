//! The engine's error type: one enum with structured fields, handled once by the caller.

use std::path::PathBuf;

/// Everything that can go wrong in the engine. Each variant names the file or tensor involved.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    // The cause is the `source`, shown by whoever prints the chain (handled once).
    #[error("{path}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    #[error("{path}: not a GGUF file (magic {got:#010x}, expected 0x46554747 \"GGUF\")")]
    BadMagic { path: PathBuf, got: u32 },

    #[error("{path}: GGUF version {version} is not supported (2 and 3 are)")]
    UnsupportedGgufVersion { path: PathBuf, version: u32 },

    #[error("{path}: file is truncated or corrupt at byte {offset}: {what}")]
    Truncated {
        path: PathBuf,
        offset: u64,
        what: String,
    },

    #[error("{path}: {what}")]
    Malformed { path: PathBuf, what: String },

    #[error("{path}: tensor `{tensor}`: {what}")]
    BadTensor {
        path: PathBuf,
        tensor: String,
        what: String,
    },

    #[error("tensor `{tensor}` not found in {path}")]
    MissingTensor { path: PathBuf, tensor: String },

    #[error("tensor `{tensor}`: expected shape {expected:?}, got {got:?}")]
    ShapeMismatch {
        tensor: String,
        expected: Vec<usize>,
        got: Vec<usize>,
    },

    #[error("tensor `{tensor}`: data type {dtype} is not supported ({why})")]
    UnsupportedDtype {
        tensor: String,
        dtype: String,
        why: String,
    },

    #[error("{path}: metadata key `{key}`: {what}")]
    Metadata {
        path: PathBuf,
        key: String,
        what: String,
    },

    #[error("{path}: architecture `{arch}` is not supported (supported: {supported})")]
    UnsupportedArchitecture {
        path: PathBuf,
        arch: String,
        supported: String,
    },

    #[error("{path}: invalid JSON")]
    Json {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },

    #[error("invalid model configuration: {0}")]
    Config(String),

    #[error("tokenizer from {path}: {what}")]
    Tokenizer { path: PathBuf, what: String },

    #[error("chat template: {0}")]
    ChatTemplate(String),

    #[error("no GPU adapter could be opened: {0}")]
    NoAdapter(String),

    /// The GPU device failed (an allocation that did not fit, a lost device): what the device
    /// computed since is void.
    #[error(
        "the GPU device failed: {fault}. {context}. Try a smaller model, fewer rows at once \
         (--batch), or `--device cpu`"
    )]
    DeviceFault { fault: String, context: String },

    #[error("fetching a model: {0}")]
    Fetch(String),

    #[error("checksum mismatch for {path}: expected {expected}, got {got}")]
    Checksum {
        path: PathBuf,
        expected: String,
        got: String,
    },

    #[error("cancelled")]
    Cancelled,

    /// Input the command was given that it cannot use (an empty prompt, data with no rows).
    #[error("invalid argument: {0}")]
    InvalidArgument(String),

    /// A setting out of its range or not one of its choices (a learning rate, a LoRA rank,
    /// a sampling parameter, a schedule's name).
    #[error("invalid setting: {0}")]
    Setting(String),

    /// A checkpoint or an adapter to start from that does not fit the run asked for.
    #[error("{path}: {what}")]
    Checkpoint { path: PathBuf, what: String },

    /// An outside program the engine runs (node, npm, the TypeScript transpiler) is missing or
    /// failed.
    #[error("{tool}: {what}")]
    Tool { tool: String, what: String },

    /// Training diverged: the gradient norm stopped being a number.
    #[error("the gradient norm is {norm}: training diverged (lower the learning rate)")]
    Diverged { norm: f64 },

    /// One replica of a data-parallel run failed: every replica stopped at the same step.
    #[error(
        "training stopped at step {step}: replica {replica} ({device}) failed: {what}; {}",
        resume_hint(.checkpoint)
    )]
    ReplicaFailed {
        step: usize,
        replica: usize,
        device: String,
        what: String,
        /// Where the checkpoint of the last whole step was written, when one could be.
        checkpoint: Option<PathBuf>,
    },

    /// A state the engine's own logic should never reach (a bug, to be reported).
    #[error("internal error: {0}")]
    Internal(String),

    /// Model-written programs run only inside a sandbox, and none could be set up here (the
    /// user did not pass the flag that accepts running them without one).
    #[error("no sandbox for model-written programs: {why}")]
    NoSandbox { why: String },

    /// A kernel's result differs from the reference product (a bug in a kernel or a driver).
    #[error("kernel check failed: {0}")]
    KernelCheck(String),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

fn resume_hint(checkpoint: &Option<PathBuf>) -> String {
    match checkpoint {
        Some(dir) => format!(
            "the last whole step is checkpointed in {}: `--resume` continues from it",
            dir.display()
        ),
        None => "the last checkpoint written continues with `--resume`".into(),
    }
}

impl Error {
    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Self::Io {
            path: path.into(),
            source,
        }
    }
}
