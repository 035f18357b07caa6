//! Dynamic loss scaling for f16 (Micikevicius et al. 2018, "Mixed Precision Training"; the
//! policy of PyTorch's `GradScaler`). Gradients small enough to underflow f16 are kept in range
//! by multiplying the loss by a scale before the backward and dividing the gradients by it
//! after; the scale is a power of two, so both are exact. An update whose gradients overflowed
//! (not finite while the loss is) is skipped and the scale halves; after `growth_interval` good
//! updates in a row it doubles. The state is saved in checkpoints, so a resumed run scales as
//! the uninterrupted one does.

use crate::config::TrainConfig;
use serde::{Deserialize, Serialize};
use taper_kernels::Precision;

/// What a checkpoint keeps of the scaler.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct LossScale {
    pub scale: f64,
    /// Good updates since the scale last changed.
    pub good_updates: u64,
}

/// The scaler of a run: active under f16 only (bf16 has f32's range, f32 needs none).
#[derive(Debug, Clone)]
pub struct LossScaler {
    state: Option<LossScale>,
    growth_interval: u64,
}

impl LossScaler {
    /// From the config, or from the state a checkpoint saved.
    pub fn new(tc: &TrainConfig, saved: Option<LossScale>) -> Self {
        let state = (tc.precision == Precision::F16)
            .then(|| saved.unwrap_or(LossScale { scale: tc.initial_loss_scale, good_updates: 0 }));
        Self { state, growth_interval: tc.loss_scale_growth_interval.max(1) }
    }

    pub fn active(&self) -> bool {
        self.state.is_some()
    }

    /// The factor the next update's loss is multiplied by (1 when inactive).
    pub fn scale(&self) -> f64 {
        self.state.map_or(1.0, |s| s.scale)
    }

    pub fn state(&self) -> Option<LossScale> {
        self.state
    }

    /// An update whose gradients overflowed: skipped by the caller; the scale halves.
    pub fn overflowed(&mut self) {
        if let Some(s) = self.state.as_mut() {
            s.scale *= 0.5;
            s.good_updates = 0;
        }
    }

    /// An update that was applied: after `growth_interval` of them the scale doubles.
    pub fn updated(&mut self) {
        if let Some(s) = self.state.as_mut() {
            s.good_updates += 1;
            if s.good_updates >= self.growth_interval {
                s.scale *= 2.0;
                s.good_updates = 0;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn halves_on_overflow_and_doubles_after_the_interval() {
        let tc = TrainConfig {
            precision: Precision::F16,
            initial_loss_scale: 1024.0,
            loss_scale_growth_interval: 3,
            ..Default::default()
        };
        let mut s = LossScaler::new(&tc, None);
        s.overflowed();
        assert_eq!(s.scale(), 512.0);
        s.updated();
        s.updated();
        assert_eq!(s.scale(), 512.0);
        s.updated();
        assert_eq!(s.state(), Some(LossScale { scale: 1024.0, good_updates: 0 }));
        s.updated();
        s.overflowed();
        assert_eq!(s.state(), Some(LossScale { scale: 512.0, good_updates: 0 }));
        let resumed = LossScaler::new(&tc, Some(LossScale { scale: 8.0, good_updates: 2 }));
        assert_eq!(resumed.scale(), 8.0);
        for p in [Precision::F32, Precision::Bf16] {
            let mut off = LossScaler::new(&TrainConfig { precision: p, ..tc.clone() }, None);
            off.overflowed();
            assert!(!off.active() && off.scale() == 1.0);
        }
    }
}
