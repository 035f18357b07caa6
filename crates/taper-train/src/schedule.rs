//! Learning-rate schedules: linear warmup, then cosine, linear, constant or
//! warmup-stable-decay (Hu et al. 2024, MiniCPM) down to `min_lr`.

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Decay {
    Cosine,
    Linear,
    Constant,
    /// Warmup-stable-decay: hold the peak, then decay linearly over the last `wsd_decay_fraction`.
    Wsd,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ScheduleConfig {
    pub decay: Decay,
    pub warmup_steps: u64,
    pub min_lr: f64,
    /// Step at which the decay reaches `min_lr`; 0 means train.max_steps.
    pub decay_steps: u64,
    pub wsd_decay_fraction: f64,
}

impl Default for ScheduleConfig {
    fn default() -> Self {
        Self { decay: Decay::Cosine, warmup_steps: 0, min_lr: 0.0, decay_steps: 0, wsd_decay_fraction: 0.2 }
    }
}

impl ScheduleConfig {
    /// The LR for the update made at 0-based step `it`, with peak `lr` over `max_steps`.
    ///
    /// Warmup is lr * (it + 1) / warmup_steps, so the first update is not wasted at lr = 0
    /// and step warmup_steps - 1 reaches the peak.
    pub fn lr(&self, it: u64, lr: f64, max_steps: u64) -> f64 {
        let w = self.warmup_steps;
        if it < w {
            return lr * (it + 1) as f64 / w as f64;
        }
        let end = if self.decay_steps == 0 { max_steps } else { self.decay_steps };
        let min = self.min_lr;
        match self.decay {
            Decay::Constant => lr,
            Decay::Cosine | Decay::Linear => {
                let p = if end <= w { 1.0 } else { ((it - w) as f64 / (end - w) as f64).min(1.0) };
                let coeff = match self.decay {
                    Decay::Cosine => 0.5 * (1.0 + (std::f64::consts::PI * p).cos()),
                    _ => 1.0 - p,
                };
                min + coeff * (lr - min)
            }
            Decay::Wsd => {
                let decay_len = ((end as f64) * self.wsd_decay_fraction).round() as u64;
                let start = end.saturating_sub(decay_len).max(w);
                if it < start {
                    lr
                } else {
                    let p = ((it - start) as f64 / (end - start).max(1) as f64).min(1.0);
                    min + (1.0 - p) * (lr - min)
                }
            }
        }
    }

    pub fn validate(&self, max_steps: u64) -> Vec<String> {
        let mut r = crate::rules::Rules::new();
        r.non_negative("schedule.min_lr", self.min_lr);
        r.unit("schedule.wsd_decay_fraction", self.wsd_decay_fraction, true);
        if self.warmup_steps > max_steps {
            r.push(format!(
                "schedule.warmup_steps = {}: must be within the run (train.max_steps = {max_steps})",
                self.warmup_steps
            ));
        }
        if self.decay_steps > 0 && self.decay_steps < self.warmup_steps {
            r.push(format!(
                "schedule.decay_steps = {}: must be 0 (= train.max_steps) or at least schedule.warmup_steps = {}",
                self.decay_steps, self.warmup_steps
            ));
        }
        r.into_vec()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn close(a: f64, b: f64) {
        assert!((a - b).abs() < 1e-12, "{a} vs {b}");
    }

    #[test]
    fn schedule_values() {
        let s = ScheduleConfig {
            decay: Decay::Cosine,
            warmup_steps: 10,
            min_lr: 1e-4,
            decay_steps: 0,
            wsd_decay_fraction: 0.2,
        };
        close(s.lr(0, 1e-3, 110), 1e-4);
        close(s.lr(4, 1e-3, 110), 5e-4);
        close(s.lr(9, 1e-3, 110), 1e-3);
        close(s.lr(10, 1e-3, 110), 1e-3); // start of decay: the peak
        close(s.lr(60, 1e-3, 110), 1e-4 + 0.5 * 9e-4); // halfway: cos(pi/2) = 0
        close(s.lr(110, 1e-3, 110), 1e-4);
        close(s.lr(500, 1e-3, 110), 1e-4); // past the end: min_lr
        let lin = ScheduleConfig { decay: Decay::Linear, ..s.clone() };
        close(lin.lr(35, 1e-3, 110), 1e-4 + 0.75 * 9e-4);
        let c = ScheduleConfig { decay: Decay::Constant, ..s.clone() };
        close(c.lr(100, 1e-3, 110), 1e-3);
        let wsd = ScheduleConfig {
            decay: Decay::Wsd,
            warmup_steps: 10,
            min_lr: 0.0,
            decay_steps: 100,
            wsd_decay_fraction: 0.2,
        };
        close(wsd.lr(50, 1.0, 100), 1.0);
        close(wsd.lr(79, 1.0, 100), 1.0);
        close(wsd.lr(80, 1.0, 100), 1.0);
        close(wsd.lr(90, 1.0, 100), 0.5);
        close(wsd.lr(100, 1.0, 100), 0.0);
    }
}
