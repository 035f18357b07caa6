//! Tokenizers, token shards, built-in datasets and seeded window loaders.

pub mod chat;
pub mod datasets;
pub mod hub;
pub mod loader;
pub mod packing;
pub mod preference;
pub mod prepare;
pub mod seq2seq;
pub mod sft;
pub mod shard;
pub mod tokenizer;

pub use loader::{Batch, WindowSampler};
pub use shard::{Shard, TokenDtype};

/// Errors from the data layer; each names the file (and line) it is about.
#[derive(Debug, thiserror::Error)]
pub enum DataError {
    // The io error is part of the message and not a `source`: a `{:#}` chain would print it twice.
    #[error("{path}: {err}")]
    Io { path: String, err: std::io::Error },
    #[error("{path}: not a taper token shard ({reason})")]
    BadShard { path: String, reason: String },
    #[error("{path}:{line}: {reason}")]
    BadLine { path: String, line: usize, reason: String },
    #[error("tokenizer {path}: {reason}")]
    Tokenizer { path: String, reason: String },
    #[error("{path} holds {tokens} tokens, fewer than one window of {needed} (block_size + 1)")]
    TooShort { path: String, tokens: usize, needed: usize },
    #[error("dataset {name}: {reason}")]
    Dataset { name: String, reason: String },
    #[error("model {name}: {reason}")]
    HubModel { name: String, reason: String },
    /// A chat template that does not compile or render.
    #[error("chat template: {reason}")]
    Template { reason: String },
    /// The template's own `raise_exception(message)`.
    #[error("chat template raised: {message}")]
    TemplateRaised { message: String },
    #[error("{path}:{line}: role {role:?} is not one of system, user, assistant")]
    BadRole { path: String, line: usize, role: String },
    #[error("{path}:{line}: conversation has no assistant turn to train on")]
    NoAssistant { path: String, line: usize },
    /// An example that reads fine but cannot be tokenised (its template fails, say).
    #[error("{path}:{line}: {err}")]
    Example { path: String, line: usize, err: Box<DataError> },
    #[error("{0}")]
    Config(String),
}

pub type Result<T> = std::result::Result<T, DataError>;

pub(crate) fn io_err(path: impl AsRef<std::path::Path>) -> impl FnOnce(std::io::Error) -> DataError {
    let path = path.as_ref().display().to_string();
    move |err| DataError::Io { path, err }
}
