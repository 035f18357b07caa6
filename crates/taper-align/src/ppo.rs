//! The PPO recipe for RLHF (Ziegler et al. 2019; Ouyang et al. 2022; the conventions of TRL's
//! PPOTrainer and "The N Implementation Details of RLHF with PPO"), top to bottom: per step,
//! one sampled response per prompt (KV cache); a score from the reward model or a verifiable
//! reward; per-token rewards = -kl_coef * KL(policy || reference) plus the score on the last
//! token; values from a value head on the policy's hidden states; GAE; whitened advantages;
//! then epochs of updates over minibatches of `train.batch_size` x `train.grad_accum_steps`
//! rollouts with the clipped policy loss + vf_coef * the clipped value loss (the value head a
//! linear probe on the policy's hidden states, which its loss does not train).
//! The KL coefficient is fixed or adapted towards a target (Ziegler et al. 2019, eq. 2).

use crate::losses::{gae, kl_per_token, ppo_policy_loss, ppo_value_loss, KlEstimator};
use crate::rl::{
    mean_entropy, mean_std_across, minibatch_rules, object, rl_settings, sum_across, token_forward, whiten_across,
    Minibatches, PromptDataConfig, RewardSpec, Rl, RlAlgorithm, RlCore, RolloutConfig, Sampled, TokenOut,
};
use crate::Result;
use candle_core::{Device, Tensor, D};
use serde::{Deserialize, Serialize};
use taper_data::packing::Row;
use taper_dist::Comm;
use taper_model::lora::LoraConfig;
use taper_model::Rng;
use taper_train::config::{LogConfig, RecipeConfig, TasksConfig, TrainConfig};
use taper_train::loop_fields;
use taper_train::observe::{Observer, Summary};
use taper_train::optim::OptimConfig;
use taper_train::rules::Rules;
use taper_train::schedule::ScheduleConfig;
use taper_train::source::Source;
use taper_train::trainer::{self, Built, Micro, Plan, RunSpec, StepReport};

/// The value head's names: a linear map from the final hidden state to a scalar.
pub const V_HEAD: &str = "v_head.weight";
pub const V_BIAS: &str = "v_head.bias";

#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdaptiveKl {
    /// The KL (summed over a response) the coefficient steers towards.
    pub target: f64,
    /// How many rollouts the correction takes to act in full.
    pub horizon: f64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PpoSettings {
    /// Prompts per step, one response each. Each pass over them makes optimizer updates of
    /// `train.batch_size` rollouts per forward and `train.grad_accum_steps` forwards.
    pub rollouts_per_step: usize,
    /// Passes over each batch of rollouts.
    pub epochs: usize,
    /// Replaced by `train.batch_size` and `train.grad_accum_steps`; kept only to say so.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub minibatches: Option<usize>,
    pub clip_eps: f64,
    /// The value loss's clip range.
    pub vf_clip: f64,
    pub vf_coef: f64,
    pub gamma: f64,
    pub lam: f64,
    /// The KL penalty's initial (or fixed) coefficient.
    pub kl_coef: f64,
    pub kl_estimator: KlEstimator,
    /// Adapt kl_coef towards a target KL; absent keeps it fixed.
    pub adaptive_kl: Option<AdaptiveKl>,
    /// Whiten the scores across the batch before they enter the rewards.
    pub whiten_rewards: bool,
}

impl Default for PpoSettings {
    fn default() -> Self {
        Self {
            rollouts_per_step: 32,
            epochs: 4,
            minibatches: None,
            clip_eps: 0.2,
            vf_clip: 0.2,
            vf_coef: 0.1,
            gamma: 1.0,
            lam: 0.95,
            kl_coef: 0.05,
            kl_estimator: KlEstimator::K1,
            adaptive_kl: None,
            whiten_rewards: false,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PpoConfig {
    pub seed: u64,
    pub device: String,
    /// The starting policy (also the reference).
    pub init: String,
    pub data: PromptDataConfig,
    pub rollout: RolloutConfig,
    pub reward: RewardSpec,
    pub ppo: PpoSettings,
    pub lora: Option<LoraConfig>,
    pub train: TrainConfig,
    pub optim: OptimConfig,
    pub schedule: ScheduleConfig,
    pub log: LogConfig,
    pub eval: TasksConfig,
}

impl Default for PpoConfig {
    fn default() -> Self {
        Self {
            seed: 1337,
            device: "auto".into(),
            init: String::new(),
            data: PromptDataConfig::default(),
            rollout: RolloutConfig::default(),
            reward: RewardSpec::default(),
            ppo: PpoSettings::default(),
            lora: None,
            train: TrainConfig { batch_size: 8, eval_batches: 0, ..TrainConfig::default() },
            optim: OptimConfig { lr: 1e-5, weight_decay: 0.0, ..OptimConfig::default() },
            schedule: ScheduleConfig::default(),
            log: LogConfig::default(),
            eval: TasksConfig::default(),
        }
    }
}

impl RecipeConfig for PpoConfig {
    const RECIPE: &'static str = "ppo";

    loop_fields!();

    fn validate(&self) -> Vec<String> {
        let mut e = Rules::new();
        e.extend(rl_settings!(self).validate("ppo", &self.train));
        let p = &self.ppo;
        e.at_least_one("ppo.rollouts_per_step", p.rollouts_per_step as u64);
        e.at_least_one("ppo.epochs", p.epochs as u64);
        if let Some(m) = p.minibatches {
            e.push(format!(
                "ppo.minibatches = {m}: replaced by train.batch_size (rollouts per forward) and \
                 train.grad_accum_steps (forwards per optimizer update); {m} minibatches of one forward each \
                 are train.batch_size = {}",
                p.rollouts_per_step / m.max(1)
            ));
        }
        e.extend(minibatch_rules("ppo", "ppo.rollouts_per_step", p.rollouts_per_step, &self.train));
        e.unit("ppo.gamma", p.gamma, true);
        e.unit("ppo.lam", p.lam, true);
        e.non_negative("ppo.kl_coef", p.kl_coef);
        e.non_negative("ppo.vf_coef", p.vf_coef);
        e.positive("ppo.clip_eps", p.clip_eps);
        e.positive("ppo.vf_clip", p.vf_clip);
        if let Some(a) = p.adaptive_kl {
            e.positive("ppo.adaptive_kl.target", a.target);
            e.positive("ppo.adaptive_kl.horizon", a.horizon);
        }
        e.into_vec()
    }

    fn free_on_resume(&self) -> &'static [&'static str] {
        &["data.eval", "rollout.eval_samples", "eval."]
    }
}

/// Values (N, T) from the value head over final hidden states (N, T, C).
fn values(hidden: &Tensor, w: &Tensor, b: &Tensor) -> Result<Tensor> {
    Ok(hidden.broadcast_matmul(&w.t()?)?.squeeze(D::Minus1)?.broadcast_add(b)?)
}

/// Per-token rewards, advantages and returns of a batch, from the frozen policy's outputs.
struct Batch {
    rows: Vec<Row>,
    old_logp: Tensor,
    old_values: Tensor,
    advantages: Tensor,
    returns: Tensor,
    kl: f64,
    entropy: f64,
}

#[allow(clippy::too_many_arguments)]
fn prepare(
    comm: &dyn Comm,
    rows: Vec<Row>,
    old: &TokenOut,
    old_values: Tensor,
    ref_logp: &Tensor,
    scores: &[f32],
    p: &PpoSettings,
    kl_coef: f64,
    dev: &Device,
) -> Result<Batch> {
    let (n, t) = old.logp.dims2()?;
    let mask: Vec<Vec<f32>> = old.mask.to_vec2()?;
    let kl: Vec<Vec<f32>> = kl_per_token(&old.logp, ref_logp, p.kl_estimator)?.to_vec2()?;
    let v: Vec<Vec<f32>> = old_values.to_vec2()?;
    let scores =
        if p.whiten_rewards { whiten_across(comm, scores, &vec![1.0; scores.len()], false)? } else { scores.to_vec() };
    let (mut adv, mut ret) = (vec![0f32; n * t], vec![0f32; n * t]);
    let mut kl_sum = 0.0;
    for r in 0..n {
        // The response occupies one contiguous run of masked positions.
        let pos: Vec<usize> = (0..t).filter(|&i| mask[r][i] > 0.0).collect();
        let Some(&last) = pos.last() else { continue };
        let mut rewards: Vec<f32> = pos.iter().map(|&i| -(kl_coef as f32) * kl[r][i]).collect();
        *rewards.last_mut().expect("non-empty") += scores[r];
        kl_sum += pos.iter().map(|&i| kl[r][i] as f64).sum::<f64>();
        let vals: Vec<f32> = pos.iter().map(|&i| v[r][i]).collect();
        let (a, rt) = gae(&rewards, &vals, &vec![1.0; pos.len()], p.gamma, p.lam)?;
        for (k, &i) in pos.iter().enumerate() {
            adv[r * t + i] = a[k];
            ret[r * t + i] = rt[k];
        }
        debug_assert!(last < t);
    }
    let flat_mask: Vec<f32> = mask.concat();
    let adv = whiten_across(comm, &adv, &flat_mask, true)?;
    // The mean summed KL per response, over every replica's responses.
    let mut kl_n = [kl_sum, n as f64];
    sum_across(comm, &mut kl_n)?;
    let adv: Vec<f32> = adv.iter().zip(&flat_mask).map(|(a, m)| a * m).collect();
    Ok(Batch {
        rows,
        old_logp: old.logp.clone(),
        old_values,
        advantages: Tensor::from_vec(adv, (n, t), dev)?,
        returns: Tensor::from_vec(ret, (n, t), dev)?,
        kl: kl_n[0] / kl_n[1],
        entropy: mean_entropy(&old.logits, &old.mask)?,
    })
}

/// Trains the policy `cfg.init` with PPO against the configured reward.
pub fn ppo(cfg: PpoConfig, run: RunSpec, obs: &mut dyn Observer) -> Result<Summary> {
    trainer::train(cfg, run, obs, |cfg, env| {
        let seed = cfg.seed;
        // The value head: a fresh linear probe on the final hidden state.
        let heads = |src: &Source, dev: &Device| {
            let c = src.config.n_embd;
            let mut rng = Rng::derive(seed, &[0x5648_4541]);
            let head: Vec<f32> = (0..c).map(|_| (rng.normal() * 0.02) as f32).collect();
            Ok(vec![
                (V_HEAD.to_string(), Tensor::from_vec(head, (1, c), dev)?),
                (V_BIAS.to_string(), Tensor::zeros(1, candle_core::DType::F32, dev)?),
            ])
        };
        let s = rl_settings!(cfg);
        let (core, params, contents) = RlCore::build(s, heads, env)?;
        let head_of = |name: &str| params.iter().find(|(n, _)| n == name).map(|(_, v)| v.as_tensor().clone());
        let (vw, vb) = (head_of(V_HEAD).expect("trainable"), head_of(V_BIAS).expect("trainable"));
        let vocab_size = core.src.config.vocab_size;
        let algorithm = Ppo {
            vw,
            vb,
            kl_coef: cfg.ppo.kl_coef,
            settings: cfg.ppo.clone(),
            batch: cfg.train.batch_size,
            step: None,
            stats: UpdateStats::default(),
        };
        let recipe = Rl { core, algorithm };
        Ok(Built { recipe, params, contents, vocab_size, train_tokens: 0, val_tokens: 0 })
    })
}

struct Ppo {
    /// The value head, (1, C) and (1,).
    vw: Tensor,
    vb: Tensor,
    /// The KL penalty's coefficient, adapted as the run goes when asked.
    kl_coef: f64,
    settings: PpoSettings,
    batch: usize,
    /// The current step's rollouts, prepared for its updates.
    step: Option<StepData>,
    stats: UpdateStats,
}

/// A step's rollouts and what its updates read.
struct StepData {
    batch: Batch,
    minibatches: Minibatches,
    sampled: Sampled,
    /// The mean and standard deviation of the step's scores, over every replica's.
    stats: (f64, f64),
}

/// The updates' losses and clip fractions, summed over micro-batches.
#[derive(Default)]
struct UpdateStats {
    policy_loss: f64,
    value_loss: f64,
    clip: f64,
    vclip: f64,
    approx_kl: f64,
    micro_batches: f64,
}

impl RlAlgorithm for Ppo {
    /// One sampled response per prompt from the current policy, scored; then the per-token
    /// rewards, values, advantages and returns its updates read.
    fn plan(&mut self, rl: &RlCore, step: u64, accum: usize) -> Result<Plan> {
        let pp = &self.settings;
        let dev = rl.policy.device();
        let sampled = rl.sample(step, pp.rollouts_per_step, 1, 0x5050_4F00)?;
        let old = token_forward(&rl.frozen, &sampled.rows, dev, None)?;
        let old_values = values(&old.hidden, &self.vw.detach(), &self.vb.detach())?;
        let ref_logp = token_forward(&rl.reference, &sampled.rows, dev, None)?.logp;
        let rows = sampled.rows.clone();
        let batch = prepare(&*rl.comm, rows, &old, old_values, &ref_logp, &sampled.scores, pp, self.kl_coef, dev)?;
        let stats = mean_std_across(&*rl.comm, &sampled.scores)?;
        let seed = rl.seed;
        let minibatches = Minibatches::new(batch.rows.len(), pp.epochs, self.batch, accum, |epoch| {
            Some(Rng::derive(seed, &[step, epoch as u64, 0x4D42]))
        });
        let updates = minibatches.updates();
        self.step = Some(StepData { batch, minibatches, sampled, stats });
        Ok(Plan { updates, micro_batches: accum })
    }

    fn loss(&mut self, rl: &RlCore, at: Micro) -> Result<Tensor> {
        let d = self.step.as_ref().expect("plan() prepared the step");
        let pp = &self.settings;
        let dev = rl.policy.device();
        let m = d.minibatches.micro(at.update, at.index, &d.batch.rows, dev)?;
        let pick = |t: &Tensor| t.index_select(&m.idx, 0);
        let mut rng = m.dropout_rng(rl.seed, at.step);
        let out = token_forward(&rl.policy, &m.rows, dev, rl.dropout.then_some(&mut rng))?;
        // The value head reads the policy's features but does not train them: with one
        // shared trunk the value loss's gradient would pull the LM off course.
        let v = values(&out.hidden.detach(), &self.vw, &self.vb)?;
        let adv = pick(&d.batch.advantages)?;
        let pol = ppo_policy_loss(&out.logp, &pick(&d.batch.old_logp)?, &adv, &out.mask, pp.clip_eps)?;
        let (vloss, vclip) =
            ppo_value_loss(&v, &pick(&d.batch.old_values)?, &pick(&d.batch.returns)?, &out.mask, pp.vf_clip)?;
        let st = &mut self.stats;
        st.policy_loss += crate::pairs::scalar(&pol.loss)?;
        st.value_loss += crate::pairs::scalar(&vloss)?;
        (st.clip, st.vclip, st.approx_kl) = (st.clip + pol.clip_frac, st.vclip + vclip, st.approx_kl + pol.approx_kl);
        st.micro_batches += 1.0;
        Ok((pol.loss + (vloss * pp.vf_coef)?)?)
    }

    fn end_step(&mut self, _step: u64) -> Result<StepReport> {
        let d = self.step.take().expect("plan() prepared the step");
        let n = self.settings.rollouts_per_step;
        // Ziegler et al.'s proportional controller, its error clipped to +-20%.
        if let Some(a) = self.settings.adaptive_kl {
            let err = ((d.batch.kl - a.target) / a.target).clamp(-0.2, 0.2);
            self.kl_coef *= 1.0 + err * n as f64 / a.horizon;
        }
        let st = std::mem::take(&mut self.stats);
        let k = st.micro_batches.max(1.0);
        let (mean, std) = d.stats;
        let metrics = object(serde_json::json!({"objective/scores": mean, "objective/scores_std": std,
            "objective/kl": d.batch.kl, "objective/kl_coef": self.kl_coef, "objective/entropy": d.batch.entropy,
            "loss/policy_avg": st.policy_loss / k, "loss/value_avg": st.value_loss / k,
            "policy/clipfrac_avg": st.clip / k, "val/clipfrac_avg": st.vclip / k,
            "policy/approxkl_avg": st.approx_kl / k, "completions/mean_length": d.sampled.response_length}));
        Ok(StepReport { tokens: d.sampled.tokens, metrics, device_metrics: None })
    }

    fn state(&self) -> Option<serde_json::Value> {
        // The bits too: JSON floats do not read back exactly, and resume must.
        Some(serde_json::json!({ "kl_coef": self.kl_coef, "kl_coef_bits": self.kl_coef.to_bits() }))
    }

    fn restore(&mut self, state: &serde_json::Value) -> Result<()> {
        if let Some(bits) = state["kl_coef_bits"].as_u64() {
            self.kl_coef = f64::from_bits(bits);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Per-token rewards are -kl_coef * KL plus the score on the response's last token; with
    /// gamma = lam = 1 and zero values the returns are the rewards still to come.
    #[test]
    fn rewards_carry_the_kl_penalty_and_the_score_at_the_end() -> Result<()> {
        let dev = Device::Cpu;
        let mask = Tensor::new(&[[0f32, 1., 1., 0.], [0., 1., 1., 1.]], &dev)?;
        let logp = Tensor::new(&[[0f32, -1.0, -2.0, 0.], [0., -0.5, -0.5, -0.5]], &dev)?;
        let ref_logp = Tensor::new(&[[0f32, -1.5, -1.0, 0.], [0., -0.5, -1.5, -0.5]], &dev)?;
        let old = TokenOut { logp: logp.clone(), mask, hidden: logp.clone(), logits: logp.unsqueeze(2)? };
        let p = PpoSettings { gamma: 1.0, lam: 1.0, ..Default::default() };
        let zeros = Tensor::zeros((2, 4), candle_core::DType::F32, &dev)?;
        let b = prepare(&taper_dist::Single, Vec::new(), &old, zeros, &ref_logp, &[2.0, -1.0], &p, 0.5, &dev)?;
        // k1 = logp - ref: row 0 [0.5, -1.0], row 1 [0, 1, 0].
        let want = [[0.0, -0.25 + 0.5 + 2.0, 0.5 + 2.0, 0.0], [0.0, -0.5 - 1.0, -0.5 - 1.0, -1.0]];
        let got: Vec<Vec<f32>> = b.returns.to_vec2()?;
        for (g, w) in got.iter().zip(want) {
            for (a, b) in g.iter().zip(w) {
                assert!((a - b as f32).abs() < 1e-6, "{got:?}");
            }
        }
        assert!((b.kl - (-0.5 + 1.0) / 2.0).abs() < 1e-6, "mean summed KL per response: {}", b.kl);
        Ok(())
    }
}
