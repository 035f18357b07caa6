//! The training loop ([`trainer`]), written once, and the from-scratch and SFT recipes on it;
//! optimizers, LR schedules, checkpoints and model sources.

pub mod bench;
pub mod chat;
pub mod checkpoint;
pub mod config;
pub mod data_parallel;
pub mod device;
pub mod fill_mask;
pub mod finetune;
pub mod fingerprint;
pub mod loss_scale;
pub mod mlm;
pub mod multiple_choice;
pub mod observe;
pub mod optim;
pub mod order;
pub mod pretrain;
pub mod rules;
pub mod run_dir;
pub mod samples;
pub mod schedule;
pub mod scratch;
pub mod seq2seq;
pub mod sft;
pub mod sinks;
pub mod source;
pub mod steps;
pub mod tensorboard;
pub mod trainer;

pub use config::RunConfig;

#[derive(Debug, thiserror::Error)]
pub enum TrainError {
    /// Every problem found in a config, one per line.
    #[error("{}", .0.join("\n"))]
    Config(Vec<String>),
    #[error(transparent)]
    Data(#[from] taper_data::DataError),
    #[error(transparent)]
    Model(#[from] taper_model::ModelError),
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
    #[error("checkpoint {path}: {reason}")]
    Checkpoint { path: String, reason: String },
    #[error("step {step}: {what} is not finite ({value}); set train.on_nonfinite = \"skip\" to skip such steps")]
    NonFinite { step: u64, what: &'static str, value: f64 },
    // The io error is part of the message and not a `source`: a `{:#}` chain would print it twice.
    #[error(
        "{skipped} of {updates} updates were skipped as non-finite, more than train.max_skipped_fraction = {limit}: \
         the run did not train as configured (its checkpoints are kept; lower optim.lr, or raise the limit)"
    )]
    TooManySkipped { skipped: u64, updates: u64, limit: f64 },
    /// A bad line of an input file (a multiple-choice task), named by file and line.
    #[error("{path}:{line}: {reason}")]
    BadRecord { path: String, line: usize, reason: String },
    #[error("{path}: {err}")]
    Io { path: String, err: std::io::Error },
    #[error("{0}")]
    Invalid(String),
}

pub type Result<T> = std::result::Result<T, TrainError>;

pub(crate) fn io_err(path: impl AsRef<std::path::Path>) -> impl FnOnce(std::io::Error) -> TrainError {
    let path = path.as_ref().display().to_string();
    move |err| TrainError::Io { path, err }
}
