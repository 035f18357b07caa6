//! Alignment for taper: reward-model, DPO-family, PPO and GRPO losses.
//!
//! The losses in [`losses`] are pure functions over candle tensors, checked against golden values from TRL's
//! formulas (`scripts/golden/align_losses.py`), so that the recipes built on them can be compared with TRL runs.

pub mod dpo;
pub mod grpo;
pub mod losses;
pub mod pairs;
pub mod ppo;
pub mod rl;
pub mod rm;
pub mod sample;
pub mod score;

#[derive(Debug, thiserror::Error)]
pub enum AlignError {
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
    #[error(transparent)]
    Model(#[from] taper_model::ModelError),
    #[error(transparent)]
    Data(#[from] taper_data::DataError),
    #[error(transparent)]
    Train(#[from] taper_train::TrainError),
    #[error("{0}")]
    Invalid(String),
}

pub type Result<T> = std::result::Result<T, AlignError>;
