//! How fresh weights come to be: each parameter's initialiser, drawn in spec order from one
//! seeded stream, and the check every architecture runs on its config before it builds.

use crate::config::{ModelConfig, ModelKind};
use crate::rng::Rng;
use crate::{ModelError, Result};
use candle_core::{Device, Tensor};

/// How a parameter is initialised.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Init {
    Normal(f64),
    Zeros,
    Ones,
}

/// Tensors for `specs`, drawn in order from one RNG stream seeded by `seed`.
pub(crate) fn draw(specs: Vec<(String, Vec<usize>, Init)>, seed: u64, dev: &Device) -> Result<Vec<(String, Tensor)>> {
    let mut rng = Rng::new(seed);
    specs
        .into_iter()
        .map(|(name, shape, init)| {
            let n: usize = shape.iter().product();
            let data: Vec<f32> = match init {
                Init::Normal(s) => (0..n).map(|_| (rng.normal() * s) as f32).collect(),
                Init::Zeros => vec![0.0; n],
                Init::Ones => vec![1.0; n],
            };
            Ok((name, Tensor::from_vec(data, shape, dev)?))
        })
        .collect()
}

/// A config an architecture of `kind` can be built from: the config's own rules, the right
/// kind, and a vocabulary.
pub(crate) fn check(cfg: &ModelConfig, kind: ModelKind) -> Result<()> {
    if cfg.kind != kind {
        return Err(ModelError::WrongKind { found: cfg.kind, needed: kind });
    }
    let mut errs = cfg.validate();
    if cfg.vocab_size == 0 {
        errs.push("model.vocab_size is 0 (it should have been taken from the tokenizer)".into());
    }
    if errs.is_empty() {
        Ok(())
    } else {
        Err(ModelError::Config(errs.join("; ")))
    }
}
