//! AdamW, Lion and SGD with momentum, with PyTorch's update rules, and their state as named
//! tensors for checkpoints.

use crate::{Result, TrainError};
use candle_core::{DType, Tensor, Var};
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use taper_kernels::{adamw_step_many, lion_step_many, AdamW, Lion};
use taper_model::ParamKind;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OptimKind {
    /// Loshchilov & Hutter 2019, decoupled weight decay; `torch.optim.AdamW`.
    Adamw,
    /// Chen et al. 2023, "Symbolic Discovery of Optimization Algorithms".
    Lion,
    /// `torch.optim.SGD` with momentum, dampening 0, optional Nesterov; L2 weight decay.
    Sgd,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct OptimConfig {
    pub name: OptimKind,
    /// Peak learning rate.
    pub lr: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
    pub momentum: f64,
    pub nesterov: bool,
    /// Decay embeddings too (nanoGPT does); off by default, as in most recipes.
    pub decay_embeddings: bool,
    /// Decay biases and norm gains too.
    pub decay_biases_and_norms: bool,
}

impl Default for OptimConfig {
    fn default() -> Self {
        Self {
            name: OptimKind::Adamw,
            lr: 1e-3,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.0,
            momentum: 0.9,
            nesterov: false,
            decay_embeddings: false,
            decay_biases_and_norms: false,
        }
    }
}

impl OptimConfig {
    pub fn validate(&self) -> Vec<String> {
        let mut r = crate::rules::Rules::new();
        r.positive("optim.lr", self.lr);
        r.unit("optim.beta1", self.beta1, false);
        r.unit("optim.beta2", self.beta2, false);
        r.unit("optim.momentum", self.momentum, false);
        // AdamW divides by sqrt(v) + eps: at 0 a parameter with no gradient yet divides by 0.
        r.positive("optim.eps", self.eps);
        r.non_negative("optim.weight_decay", self.weight_decay);
        r.into_vec()
    }

    pub(crate) fn decays(&self, name: &str) -> bool {
        match ParamKind::of(name) {
            ParamKind::Weight => true,
            ParamKind::Embedding => self.decay_embeddings,
            ParamKind::Bias | ParamKind::Norm => self.decay_biases_and_norms,
        }
    }
}

/// A trainable parameter.
pub struct Param {
    pub name: String,
    pub var: Var,
    pub decay: bool,
}

pub struct Optimizer {
    cfg: OptimConfig,
    params: Vec<Param>,
    /// Per parameter: AdamW [exp_avg, exp_avg_sq]; Lion [exp_avg]; SGD [momentum_buffer].
    slots: Vec<Vec<Tensor>>,
    /// Updates applied so far.
    step: u64,
}

fn slot_names(kind: OptimKind) -> &'static [&'static str] {
    match kind {
        OptimKind::Adamw => &["exp_avg", "exp_avg_sq"],
        OptimKind::Lion => &["exp_avg"],
        OptimKind::Sgd => &["momentum_buffer"],
    }
}

impl Optimizer {
    pub fn new(cfg: OptimConfig, vars: Vec<(String, Var)>) -> Result<Self> {
        let params: Vec<Param> =
            vars.into_iter().map(|(name, var)| Param { decay: cfg.decays(&name), name, var }).collect();
        Self::with_params(cfg, params)
    }

    /// An optimizer over parameters whose weight decay is already decided (the shards of a
    /// sharded optimizer take their whole parameter's).
    pub fn with_params(cfg: OptimConfig, params: Vec<Param>) -> Result<Self> {
        let slots = params
            .iter()
            .map(|p| {
                slot_names(cfg.name)
                    .iter()
                    .map(|_| p.var.as_tensor().zeros_like())
                    .collect::<candle_core::Result<Vec<_>>>()
            })
            .collect::<candle_core::Result<Vec<_>>>()?;
        Ok(Self { cfg, params, slots, step: 0 })
    }

    pub fn params(&self) -> &[Param] {
        &self.params
    }

    pub fn step_count(&self) -> u64 {
        self.step
    }

    /// One update with `grads[i]` for `params()[i]` at learning rate `lr`.
    pub fn step(&mut self, grads: &[Tensor], lr: f64) -> Result<()> {
        self.step += 1;
        let c = &self.cfg;
        let t = self.step as i32;
        // On the CPU in f32, and on CUDA with taper's kernels switched on, AdamW and Lion are
        // written in place by taper-kernels (same operations, bit for bit): no new parameter or
        // state tensor per step, and on CUDA one launch for all the parameters of a decay group.
        let in_place: Vec<bool> = self
            .params
            .iter()
            .zip(grads)
            .zip(&self.slots)
            .map(|((p, g), slots)| {
                let w = p.var.as_tensor();
                matches!(c.name, OptimKind::Adamw | OptimKind::Lion)
                    && (taper_kernels::fused_on(w.device()) || taper_kernels::cuda_kernels_on(w.device()))
                    && w.dtype() == DType::F32
                    && g.dtype() == DType::F32
                    && w.is_contiguous()
                    && slots.iter().all(|s| s.is_contiguous() && s.dtype() == DType::F32)
            })
            .collect();
        for decay in [true, false] {
            let wd = if decay { c.weight_decay } else { 0.0 };
            let group = (self.params.iter().zip(grads).zip(&self.slots).zip(&in_place))
                .filter(|(((p, _), _), &fast)| fast && p.decay == decay)
                .map(|(((p, g), slots), _)| (p.var.as_tensor(), g, slots));
            match c.name {
                OptimKind::Adamw => {
                    let h = AdamW { lr, beta1: c.beta1, beta2: c.beta2, eps: c.eps, weight_decay: wd, step: self.step };
                    let group: Vec<_> = group.map(|(w, g, s)| (w, &s[0], &s[1], g)).collect();
                    adamw_step_many(&group, &h)?;
                }
                OptimKind::Lion => {
                    let h = Lion { lr, beta1: c.beta1, beta2: c.beta2, weight_decay: wd };
                    let group: Vec<_> = group.map(|(w, g, s)| (w, &s[0], g)).collect();
                    lion_step_many(&group, &h)?;
                }
                OptimKind::Sgd => {}
            }
        }
        for (((p, g), slots), _) in
            self.params.iter().zip(grads).zip(self.slots.iter_mut()).zip(&in_place).filter(|(_, &fast)| !fast)
        {
            let wd = if p.decay { c.weight_decay } else { 0.0 };
            let w = p.var.as_tensor();
            match c.name {
                OptimKind::Adamw => {
                    // torch.optim.AdamW (single-tensor path), term for term.
                    let m = (&slots[0] + ((g - &slots[0])? * (1.0 - c.beta1))?)?;
                    let v = ((&slots[1] * c.beta2)? + (g.sqr()? * (1.0 - c.beta2))?)?;
                    let bc1 = 1.0 - c.beta1.powi(t);
                    let bc2_sqrt = (1.0 - c.beta2.powi(t)).sqrt();
                    let denom = ((v.sqrt()? / bc2_sqrt)? + c.eps)?;
                    let w_new = ((w * (1.0 - lr * wd))? - (m.div(&denom)? * (lr / bc1))?)?;
                    p.var.set(&w_new)?;
                    slots[0] = m;
                    slots[1] = v;
                }
                OptimKind::Lion => {
                    let update = ((&slots[0] * c.beta1)? + (g * (1.0 - c.beta1))?)?.sign()?;
                    let w_new = ((w * (1.0 - lr * wd))? - (update * lr)?)?;
                    p.var.set(&w_new)?;
                    slots[0] = ((&slots[0] * c.beta2)? + (g * (1.0 - c.beta2))?)?;
                }
                OptimKind::Sgd => {
                    let g = if wd > 0.0 { (g + (w * wd)?)? } else { g.clone() };
                    let dir = if c.momentum > 0.0 {
                        let buf = if self.step == 1 { g.clone() } else { ((&slots[0] * c.momentum)? + &g)? };
                        slots[0] = buf.clone();
                        if c.nesterov {
                            (g + (buf * c.momentum)?)?
                        } else {
                            buf
                        }
                    } else {
                        g
                    };
                    p.var.set(&(w - (dir * lr)?)?)?;
                }
            }
        }
        Ok(())
    }

    /// The state as named tensors (`{param}.{slot}`, and the update count as `updates`), for a
    /// safetensors file. On the CPU (and on CUDA with taper's kernels on) the tensors share
    /// storage with the live state, which the next step updates in place: write them out (or copy them) before stepping again.
    /// The names of the state slots each parameter has (`exp_avg`, ...).
    pub fn slot_names(&self) -> &'static [&'static str] {
        slot_names(self.cfg.name)
    }

    /// Parameter i's state slots.
    pub fn slots(&self, i: usize) -> &[Tensor] {
        &self.slots[i]
    }

    pub fn config(&self) -> &OptimConfig {
        &self.cfg
    }

    pub fn state_tensors(&self) -> HashMap<String, Tensor> {
        let names = slot_names(self.cfg.name);
        let mut map: HashMap<String, Tensor> = self
            .params
            .iter()
            .zip(&self.slots)
            .flat_map(|(p, s)| names.iter().zip(s).map(move |(n, t)| (format!("{}.{n}", p.name), t.clone())))
            .collect();
        // Recipes that update several times per step (PPO's minibatches) need the true count.
        if let Some(dev) = self.params.first().map(|p| p.var.device().clone()) {
            if let Ok(t) = Tensor::new(&[self.step as i64], &dev) {
                map.insert(UPDATES.into(), t);
            }
        }
        map
    }

    /// Restores what [`Self::state_tensors`] saved; `step` updates unless it saved its count.
    pub fn load_state(&mut self, mut map: HashMap<String, Tensor>, step: u64, origin: &str) -> Result<()> {
        let step = match map.remove(UPDATES) {
            Some(t) => t.flatten_all()?.to_vec1::<i64>()?.first().map_or(step, |&n| n as u64),
            None => step,
        };
        let names = slot_names(self.cfg.name);
        for (p, slots) in self.params.iter().zip(self.slots.iter_mut()) {
            for (n, slot) in names.iter().zip(slots.iter_mut()) {
                let key = format!("{}.{n}", p.name);
                let bad = |reason: String| TrainError::Checkpoint { path: origin.to_string(), reason };
                let t = map.remove(&key).ok_or_else(|| {
                    bad(format!("optimizer state `{key}` is missing (was it saved by another optimizer?)"))
                })?;
                if t.dims() != slot.dims() {
                    return Err(bad(format!(
                        "optimizer state `{key}`: expected shape {:?}, found {:?}",
                        slot.dims(),
                        t.dims()
                    )));
                }
                // A tensor of its own: steps update the slot in place, and the loaded tensor may
                // share storage with the caller's.
                *slot = t.to_device(slot.device())?.to_dtype(slot.dtype())?.copy()?;
            }
        }
        self.step = step;
        Ok(())
    }
}

const UPDATES: &str = "updates";

/// The global L2 norm of all gradients.
/// The global L2 norm of all gradients, an f64 scalar on their device (read by nobody here).
/// Squares are summed in f64, element by element, so that the norm does not depend on how the
/// gradients are cut (a sharded optimizer sums its slice, then the ranks' sums).
pub fn global_norm(grads: &[Tensor]) -> Result<Tensor> {
    let mut total: Option<Tensor> = None;
    for g in grads {
        let s = g.to_dtype(DType::F64)?.sqr()?.sum_all()?;
        total = Some(match total {
            Some(t) => (t + s)?,
            None => s,
        });
    }
    match total {
        Some(t) => Ok(t.sqrt()?),
        None => Err(TrainError::Invalid("no gradients to take the norm of".into())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    fn run(kind: OptimKind, wd: f64, steps: usize) -> Vec<f32> {
        let cfg = OptimConfig {
            name: kind,
            lr: 0.1,
            beta1: 0.9,
            beta2: 0.99,
            eps: 1e-8,
            weight_decay: wd,
            ..Default::default()
        };
        let w = Var::new(&[1.0f32, -2.0, 0.5], &Device::Cpu).unwrap();
        let mut opt = Optimizer::new(cfg, vec![("w.weight".into(), w.clone())]).unwrap();
        for s in 0..steps {
            let g = Tensor::new(&[0.5f32, -1.0 + s as f32, 0.25], &Device::Cpu).unwrap();
            opt.step(&[g], 0.1).unwrap();
        }
        w.as_tensor().to_vec1().unwrap()
    }

    fn close(a: &[f32], b: &[f64]) {
        for (x, y) in a.iter().zip(b) {
            assert!((*x as f64 - y).abs() < 1e-6 * (1.0 + y.abs()), "{a:?} vs {b:?}");
        }
    }

    #[test]
    fn adamw_step_matches_hand_computation() {
        // Step 1, by hand: m = 0.1 g, v = 0.01 g^2, m_hat = g, v_hat = g^2, so the update is
        // lr * g / (|g| + eps) = 0.1 * sign(g), after decoupled decay w * (1 - 0.1 * 0.1).
        let w = run(OptimKind::Adamw, 0.1, 1);
        close(&w, &[1.0 * 0.99 - 0.1, -2.0 * 0.99 + 0.1, 0.5 * 0.99 - 0.1]);
        // Step 2 against the same formulas in f64.
        let (b1, b2, lr, eps) = (0.9f64, 0.99f64, 0.1f64, 1e-8f64);
        let mut expect = vec![];
        for (w0, g1, g2) in [(1.0f64, 0.5f64, 0.5f64), (-2.0, -1.0, 0.0), (0.5, 0.25, 0.25)] {
            let mut w = w0;
            let (mut m, mut v) = (0.0, 0.0);
            for (t, g) in [(1, g1), (2, g2)] {
                w *= 1.0 - lr * 0.1;
                m = b1 * m + (1.0 - b1) * g;
                v = b2 * v + (1.0 - b2) * g * g;
                let mh = m / (1.0 - b1.powi(t));
                let vh = v / (1.0 - b2.powi(t));
                w -= lr * mh / (vh.sqrt() + eps);
            }
            expect.push(w);
        }
        close(&run(OptimKind::Adamw, 0.1, 2), &expect);
    }

    #[test]
    fn lion_and_sgd_steps_match_hand_computation() {
        // Lion step 1: update = sign(0.1 g) = sign(g); w = w (1 - lr wd) - lr sign(g).
        close(&run(OptimKind::Lion, 0.1, 1), &[0.99 - 0.1, -1.98 + 0.1, 0.495 - 0.1]);
        // Lion step 2: m = 0.01 g1; update = sign(0.9 * 0.01 g1 + 0.1 g2).
        let w2 = run(OptimKind::Lion, 0.0, 2);
        // The middle weight: g2 = 0, so sign(0.9 * 0.01 * -1) = -1 moves it up again.
        close(&w2, &[0.8, -1.8, 0.3]);
        // SGD with momentum 0.9: buf1 = g1, buf2 = 0.9 g1 + g2; w -= lr * buf.
        close(
            &run(OptimKind::Sgd, 0.0, 2),
            &[1.0 - 0.1 * 0.5 - 0.1 * 0.95, -2.0 + 0.1 - 0.1 * -0.9, 0.5 - 0.025 - 0.1 * 0.475],
        );
    }
}
