//! Every architecture's parameters, chosen by the config's kind: what a from-scratch run
//! draws, what a checkpoint must hold, what an export writes.

use crate::config::{ModelConfig, ModelKind};
use crate::init::{check, draw, Init};
use crate::{bert, decoder, marian, Result};
use candle_core::{Device, Tensor};

/// Every parameter of the model `cfg` describes: (name, shape, init), in a fixed order.
pub fn param_specs(cfg: &ModelConfig) -> Vec<(String, Vec<usize>, Init)> {
    match cfg.kind {
        ModelKind::Decoder => decoder::param_specs(cfg),
        ModelKind::Encoder => bert::param_specs(cfg),
        ModelKind::EncoderDecoder => marian::param_specs(cfg),
    }
}

/// Fresh weights drawn from our seeded RNG, in [`param_specs`] order.
pub fn init_weights(cfg: &ModelConfig, seed: u64, dev: &Device) -> Result<Vec<(String, Tensor)>> {
    check(cfg, cfg.kind)?;
    draw(param_specs(cfg), seed, dev)
}
