//! Decoder-only transformer language models that train.
//!
//! Unlike candle-transformers' inference models, every op here has a backward pass and the
//! forward returns full logits. The ops live in [`nn`], composed from candle primitives so that
//! gradients flow (candle-nn's fused softmax / norms / rope have no backward).

pub mod bert;
pub mod checkpointing;
pub mod config;
pub mod decoder;
pub mod generation;
pub mod gguf;
pub mod hf;
pub mod host;
mod init;
pub mod lora;
pub mod marian;
pub mod nn;
pub mod rng;
mod specs;
pub mod weights;

pub use bert::Bert;
pub use checkpointing::ActivationCheckpointing;
pub use config::{Mlp, ModelConfig, ModelKind, Norm, PosEmb};
pub use decoder::{flatten_logits, Decoder, KvCache};
pub use generation::{sample, sample_rows, sample_with, Sampling, GENERATION_BATCH};
pub use init::Init;
pub use lora::LoraConfig;
pub use rng::Rng;
pub use specs::{init_weights, param_specs};
pub use weights::{ParamKind, Weights};

/// Errors from building, loading or running a model.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    #[error("invalid model config: {0}")]
    Config(String),
    #[error("tensor `{name}` is missing")]
    MissingTensor { name: String },
    #[error("tensor `{name}`: expected shape {expected:?}, found {found:?}")]
    ShapeMismatch { name: String, expected: Vec<usize>, found: Vec<usize> },
    #[error("the model is {}, but this needs {}", .found.describe(), .needed.describe())]
    WrongKind { found: ModelKind, needed: ModelKind },
    #[error("input of {len} tokens exceeds the model's context of {max} positions")]
    TooLong { len: usize, max: usize },
    #[error("a prompt of {prompt} tokens and {max_new} new tokens pass the model's context of {max} positions")]
    GenerationTooLong { prompt: usize, max_new: usize, max: usize },
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
    #[error(transparent)]
    Attention(#[from] taper_kernels::AttentionError),
}

pub type Result<T> = std::result::Result<T, ModelError>;
