//! The GRPO recipe (Shao et al. 2024, DeepSeekMath), top to bottom: per step, a batch of
//! prompts, G sampled responses each (KV cache), rewards, advantages normalised within each
//! group (no critic), then `epochs` passes of updates (minibatches of `train.batch_size` x
//! `train.grad_accum_steps` responses) of the clipped-ratio loss with a k3 KL penalty to the
//! frozen reference, normalised over the response tokens.

use crate::losses::{group_advantages, grpo_loss};
use crate::rl::{
    entropy_sum, mean_entropy, mean_std_across, minibatch_rules, object, response_mask, rl_settings, token_forward,
    Minibatches, PromptDataConfig, RewardSpec, Rl, RlAlgorithm, RlCore, RolloutConfig, Sampled,
};
use crate::Result;
use candle_core::Tensor;
use serde::{Deserialize, Serialize};
use taper_model::lora::LoraConfig;
use taper_train::config::{LogConfig, RecipeConfig, TasksConfig, TrainConfig};
use taper_train::loop_fields;
use taper_train::observe::{Observer, Summary};
use taper_train::optim::OptimConfig;
use taper_train::rules::Rules;
use taper_train::schedule::ScheduleConfig;
use taper_train::trainer::{self, Built, Micro, Plan, RunSpec, StepReport};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct GrpoSettings {
    /// Responses sampled per prompt (G).
    pub group_size: usize,
    /// Prompts per step; a step trains on prompts x group_size responses, in optimizer
    /// updates of `train.batch_size` responses per forward and `train.grad_accum_steps` forwards.
    pub prompts_per_step: usize,
    /// Updates per batch of rollouts (TRL's num_iterations); 1 keeps the ratio at 1.
    pub epochs: usize,
    /// The ratio's clip range.
    pub clip_eps: f64,
    /// The k3 KL penalty's coefficient; 0 runs without a reference.
    pub beta: f64,
    /// Divide advantages by the group's standard deviation (false: Dr. GRPO).
    pub scale_rewards: bool,
    /// "token": every response token weighs the same (DAPO; TRL's default); "sequence": each
    /// response's tokens are averaged first, as in the GRPO paper, so long responses do not
    /// outweigh short ones.
    pub normalize: String,
}

impl Default for GrpoSettings {
    fn default() -> Self {
        Self {
            group_size: 8,
            prompts_per_step: 4,
            epochs: 1,
            clip_eps: 0.2,
            beta: 0.04,
            scale_rewards: true,
            normalize: "token".into(),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct GrpoConfig {
    pub seed: u64,
    pub device: String,
    /// The starting policy (also the reference).
    pub init: String,
    pub data: PromptDataConfig,
    pub rollout: RolloutConfig,
    pub reward: RewardSpec,
    pub grpo: GrpoSettings,
    pub lora: Option<LoraConfig>,
    pub train: TrainConfig,
    pub optim: OptimConfig,
    pub schedule: ScheduleConfig,
    pub log: LogConfig,
    pub eval: TasksConfig,
}

impl Default for GrpoConfig {
    fn default() -> Self {
        Self {
            seed: 1337,
            device: "auto".into(),
            init: String::new(),
            data: PromptDataConfig::default(),
            rollout: RolloutConfig::default(),
            reward: RewardSpec::default(),
            grpo: GrpoSettings::default(),
            lora: None,
            train: TrainConfig { batch_size: 32, eval_batches: 0, ..TrainConfig::default() },
            optim: OptimConfig { lr: 1e-5, weight_decay: 0.0, ..OptimConfig::default() },
            schedule: ScheduleConfig::default(),
            log: LogConfig::default(),
            eval: TasksConfig::default(),
        }
    }
}

impl RecipeConfig for GrpoConfig {
    const RECIPE: &'static str = "grpo";

    loop_fields!();

    fn validate(&self) -> Vec<String> {
        let mut e = Rules::new();
        e.extend(rl_settings!(self).validate("grpo", &self.train));
        let g = &self.grpo;
        if g.group_size < 2 {
            e.push(format!(
                "grpo.group_size = {}: must be at least 2 (advantages compare samples within a group)",
                g.group_size
            ));
        }
        e.at_least_one("grpo.prompts_per_step", g.prompts_per_step as u64);
        e.at_least_one("grpo.epochs", g.epochs as u64);
        let what = "grpo.prompts_per_step x grpo.group_size";
        e.extend(minibatch_rules("grpo", what, g.prompts_per_step * g.group_size, &self.train));
        e.one_of("grpo.normalize", &g.normalize, &["token", "sequence"]);
        e.non_negative("grpo.beta", g.beta);
        e.positive("grpo.clip_eps", g.clip_eps);
        e.into_vec()
    }

    fn free_on_resume(&self) -> &'static [&'static str] {
        &["data.eval", "rollout.eval_samples", "eval."]
    }
}

/// Trains the policy `cfg.init` with GRPO against the configured reward.
pub fn grpo(cfg: GrpoConfig, run: RunSpec, obs: &mut dyn Observer) -> Result<Summary> {
    trainer::train(cfg, run, obs, |cfg, env| {
        let s = rl_settings!(cfg);
        let (core, params, contents) = RlCore::build(s, |_, _| Ok(Vec::new()), env)?;
        let vocab_size = core.src.config.vocab_size;
        let algorithm = Grpo {
            settings: cfg.grpo.clone(),
            batch: cfg.train.batch_size,
            step: None,
            kl: 0.0,
            clip: 0.0,
            micro_batches: 0.0,
            entropy_sums: (0.0, 0.0),
        };
        let recipe = Rl { core, algorithm };
        Ok(Built { recipe, params, contents, vocab_size, train_tokens: 0, val_tokens: 0 })
    })
}

struct Grpo {
    settings: GrpoSettings,
    batch: usize,
    step: Option<StepData>,
    /// The updates' KL and clip fraction, summed over micro-batches.
    kl: f64,
    clip: f64,
    micro_batches: f64,
    /// Entropy summed over response positions, and their count, of the step's policy forwards.
    entropy_sums: (f64, f64),
}

/// A step's rollouts and what its updates read.
struct StepData {
    sampled: Sampled,
    advantages: Tensor,
    /// The sampling policy's log-probs; None when they are the updated policy's own (one update).
    old_logp: Option<Tensor>,
    ref_logp: Option<Tensor>,
    /// Sequence normalisation: the loss mask reweighted per response.
    weights: Option<Tensor>,
    minibatches: Minibatches,
    /// From the frozen forward; None: summed from the policy's forwards in `entropy_sums`.
    entropy: Option<f64>,
    /// The mean and standard deviation of the step's rewards, over every replica's.
    stats: (f64, f64),
}

impl RlAlgorithm for Grpo {
    /// G responses per prompt from the current policy; rewards; advantages within each group.
    fn plan(&mut self, rl: &RlCore, step: u64, accum: usize) -> Result<Plan> {
        let g = &self.settings;
        let dev = rl.policy.device();
        let sampled = rl.sample(step, g.prompts_per_step, g.group_size, 0x4752_504F)?;
        let adv = group_advantages(&sampled.scores, g.group_size, g.scale_rewards)?;
        let advantages = Tensor::from_vec(adv, sampled.outs.len(), dev)?;
        let ref_logp = match g.beta > 0.0 {
            true => Some(token_forward(&rl.reference, &sampled.rows, dev, None)?.logp),
            false => None,
        };
        // Every epoch takes the rollouts in order: with one update an epoch, all of them at once.
        let minibatches = Minibatches::new(sampled.rows.len(), g.epochs, self.batch, accum, |_| None);
        let updates = minibatches.updates();
        // One update on the rollouts just sampled: the policy it differentiates is the one that
        // sampled, so its own log-probs, detached, are the old ones (the ratio is 1, its
        // gradient the policy gradient) and a frozen forward would only repeat them, as TRL's
        // GRPOTrainer skips it at num_iterations = 1. Not with dropout, whose masks the policy
        // forward alone would see.
        let on_policy = updates == 1 && !rl.dropout;
        let (old_logp, mask, entropy) = match on_policy {
            true => (None, response_mask(&sampled.rows, dev)?, None),
            false => {
                let old = token_forward(&rl.frozen, &sampled.rows, dev, None)?;
                let entropy = mean_entropy(&old.logits, &old.mask)?;
                (Some(old.logp), old.mask, Some(entropy))
            }
        };
        // Sequence normalisation as a reweighted mask: each response's tokens scaled by
        // mean length / its length, so the token mean becomes the mean of per-response means.
        let weights = if g.normalize == "sequence" {
            let lens = mask.sum(1)?; // (N,)
            let scale = (lens.mean_all()?.broadcast_div(&lens.clamp(1.0, f64::MAX)?))?;
            Some(mask.broadcast_mul(&scale.unsqueeze(1)?)?)
        } else {
            None
        };
        let stats = mean_std_across(&*rl.comm, &sampled.scores)?;
        self.step = Some(StepData { sampled, advantages, old_logp, ref_logp, weights, minibatches, entropy, stats });
        Ok(Plan { updates, micro_batches: accum })
    }

    fn loss(&mut self, rl: &RlCore, at: Micro) -> Result<Tensor> {
        let d = self.step.as_ref().expect("plan() prepared the step");
        let g = &self.settings;
        let dev = rl.policy.device();
        let m = d.minibatches.micro(at.update, at.index, &d.sampled.rows, dev)?;
        let mut rng = m.dropout_rng(rl.seed, at.step);
        let out = token_forward(&rl.policy, &m.rows, dev, rl.dropout.then_some(&mut rng))?;
        // One update over every rollout reads the step's tensors as they are; a minibatch its rows.
        let whole = m.rows.len() == d.sampled.rows.len();
        let part = |t: &Tensor| if whole { Ok(t.clone()) } else { t.index_select(&m.idx, 0) };
        let weights = d.weights.as_ref().map(part).transpose()?;
        let mask = weights.as_ref().unwrap_or(&out.mask);
        let ref_logp = d.ref_logp.as_ref().map(part).transpose()?;
        let old = match &d.old_logp {
            Some(o) => part(o)?,
            None => {
                let (sum, n) = entropy_sum(&out.logits, &out.mask)?;
                self.entropy_sums = (self.entropy_sums.0 + sum, self.entropy_sums.1 + n);
                out.logp.detach()
            }
        };
        let adv = part(&d.advantages)?;
        let o = grpo_loss(&out.logp, &old, ref_logp.as_ref(), &adv, mask, g.clip_eps, g.beta)?;
        (self.kl, self.clip, self.micro_batches) = (self.kl + o.kl, self.clip + o.clip_frac, self.micro_batches + 1.0);
        Ok(o.loss)
    }

    fn end_step(&mut self, _step: u64) -> Result<StepReport> {
        let d = self.step.take().expect("plan() prepared the step");
        let k = std::mem::take(&mut self.micro_batches).max(1.0);
        let (kl, clip) = (std::mem::take(&mut self.kl) / k, std::mem::take(&mut self.clip) / k);
        let (mean, std) = d.stats;
        let (sum, n) = std::mem::take(&mut self.entropy_sums);
        let entropy = d.entropy.unwrap_or(sum / n.max(1.0));
        let metrics = object(serde_json::json!({"reward": mean, "reward_std": std, "kl": kl, "clip_ratio": clip,
            "entropy": entropy, "completions/mean_length": d.sampled.response_length}));
        Ok(StepReport { tokens: d.sampled.tokens, metrics, device_metrics: None })
    }
}
