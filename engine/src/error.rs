//! The engine's one error type. Every failure a user can cause (a bad file, a prompt that does not fit)
//! ends up here with a message that names what was wrong; nothing in the engine panics on bad input.

use crate::format::gguf::GgufError;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("invalid GGUF file: {0}")]
    Gguf(#[from] GgufError),
    #[error("tensor '{tensor}': {reason}")]
    Tensor { tensor: String, reason: String },
    #[error("missing tensor '{0}'")]
    MissingTensor(String),
    #[error("metadata key '{key}': {reason}")]
    Metadata { key: String, reason: String },
    #[error("unsupported model: {0}")]
    Unsupported(String),
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    #[error("chat template: {0}")]
    Template(String),
    #[error("context full: {needed} tokens needed, the context holds {ctx}")]
    ContextFull { needed: usize, ctx: usize },
    #[error("invalid input: {0}")]
    Invalid(String),
    #[error("conversion: {0}")]
    Convert(String),
    /// The GPU backend: no adapter, a device error, a model too large for the device's limits.
    #[error("GPU: {0}")]
    Gpu(String),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
