//! The GRPO recipe (Shao et al. 2024, DeepSeekMath), top to bottom: per step, a batch of
//! prompts, G sampled responses each (KV cache), rewards, advantages normalised within each
//! group (no critic), then `epochs` updates of the clipped-ratio loss with a k3 KL penalty to
//! the frozen reference, normalised over all response tokens.

use crate::losses::{group_advantages, grpo_loss};
use crate::rl::{
    evaluate, mean_entropy, rollout_rows, rollouts, token_forward, PromptDataConfig, PromptRun, RewardSpec,
    RolloutConfig,
};
use crate::{AlignError, Result};
use candle_core::Tensor;
use serde::{Deserialize, Serialize};
use std::path::Path;
use std::time::Instant;
use taper_model::lora::LoraConfig;
use taper_model::{Decoder, Rng, Sampling, Weights};
use taper_train::config::{TrainConfig, Validate};
use taper_train::finetune::{load_resume, resume_optimizer, trainable, Progress, Saver};
use taper_train::optim::{OptimConfig, Optimizer};
use taper_train::pretrain::{Observer, Resume, RunInfo, StepLog, Summary};
use taper_train::schedule::ScheduleConfig;
use taper_train::sft::epoch_pick;
use taper_train::steps::{accumulate, guarded_update, Metrics};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct GrpoSettings {
    /// Responses sampled per prompt (G).
    pub group_size: usize,
    /// Prompts per step; a step trains on prompts x group_size responses.
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
            train: TrainConfig { batch_size: 1, ..TrainConfig::default() },
            optim: OptimConfig { lr: 1e-5, weight_decay: 0.0, ..OptimConfig::default() },
            schedule: ScheduleConfig::default(),
        }
    }
}

impl Validate for GrpoConfig {
    fn validate(&self) -> Vec<String> {
        let mut e = Vec::new();
        if self.init.is_empty() {
            e.push("init: name the policy to start from".into());
        }
        e.extend(self.data.validate());
        e.extend(self.rollout.validate());
        let g = &self.grpo;
        if g.group_size < 2 {
            e.push("grpo.group_size must be at least 2 (advantages compare samples within a group)".into());
        }
        if g.prompts_per_step == 0 || g.epochs == 0 {
            e.push("grpo.prompts_per_step and grpo.epochs must be > 0".into());
        }
        if !matches!(g.normalize.as_str(), "token" | "sequence") {
            e.push(format!("grpo.normalize = {:?}: expected \"token\" or \"sequence\"", g.normalize));
        }
        if g.beta < 0.0 || g.clip_eps <= 0.0 {
            e.push("grpo.beta must be >= 0 and grpo.clip_eps > 0".into());
        }
        if let Some(l) = &self.lora {
            e.extend(l.validate());
        }
        e.extend(self.optim.validate());
        e.extend(self.schedule.validate(self.train.max_steps));
        e
    }
}

impl GrpoConfig {
    pub fn to_toml(&self) -> String {
        toml::to_string(self).expect("GrpoConfig serialises to TOML")
    }
}

pub fn grpo(cfg: GrpoConfig, run_dir: &Path, resume: Resume, obs: &mut dyn Observer) -> Result<Summary> {
    let started = Instant::now();
    let PromptRun { device, ck_root, src, pad, train, eval, reward } =
        PromptRun::setup(&cfg.device, &cfg.init, &cfg.data, &cfg.rollout, &cfg.reward, run_dir, obs)?;
    let max_new = cfg.rollout.max_new_tokens;

    let ck = load_resume(&resume, &ck_root, &device)?;
    let (vars, weights) = trainable(&src, cfg.lora.as_ref(), cfg.seed, Vec::new(), ck.as_ref())?;
    let policy = Decoder::load(&weights, &src.config)?;
    let frozen = Decoder::load(&weights.detached(), &src.config)?;
    let reference = Decoder::load(&Weights::new(src.weights.clone()).detached(), &src.config)?;
    let n_trainable: usize = vars.iter().map(|(_, v)| v.elem_count()).sum();
    let mut opt = Optimizer::new(cfg.optim.clone(), vars)?;
    let (mut step, mut tokens, mut skipped) = resume_optimizer(&mut opt, ck, obs)?;
    crate::pairs::PairRun::save_config(run_dir, &cfg.to_toml())?;
    let mut metrics = Metrics::open(run_dir, step, started)?;
    let tc = cfg.train.clone();
    let end = tc.end_step();
    obs.started(&RunInfo {
        start_step: step,
        end_step: end,
        params: n_trainable,
        vocab_size: src.config.vocab_size,
        train_tokens: 0,
        val_tokens: 0,
        device: format!("{device:?}"),
    });
    if step == 0 && !eval.is_empty() {
        let e = evaluate(&frozen, &src, &eval, &reward, &cfg.rollout, pad)?;
        let mut line = serde_json::json!({"step": 0});
        e.report(0, &mut line, obs);
        metrics.write(&line)?;
    }
    let g = &cfg.grpo;
    let sampling =
        Sampling { temperature: cfg.rollout.temperature, top_k: cfg.rollout.top_k, top_p: cfg.rollout.top_p };
    let dropout = src.config.dropout > 0.0 || cfg.lora.as_ref().is_some_and(|l| l.dropout > 0.0);
    let (mut last_loss, mut last_val, mut last_ck) = (f64::NAN, None, None);
    let saver = Saver {
        ck_root: &ck_root,
        src: &src,
        init: &cfg.init,
        lora: cfg.lora.as_ref(),
        seed: cfg.seed,
        keep: tc.keep_checkpoints,
        heads: &[],
        frozen: &[],
    };
    while step < end {
        let lr = cfg.schedule.lr(step, cfg.optim.lr, tc.max_steps);
        // Rollouts from the current policy, each response's sampling stream fixed by (seed, step, i).
        let picked = epoch_pick(cfg.seed, train.len(), g.prompts_per_step, step);
        let which: Vec<(usize, Rng)> = picked
            .iter()
            .flat_map(|&p| std::iter::repeat_n(p, g.group_size))
            .enumerate()
            .map(|(i, p)| (p, Rng::derive(cfg.seed, &[step, i as u64, 0x4752_504F])))
            .collect();
        let outs = rollouts(&frozen, &src, &train, &which, &sampling, max_new)?;
        let rewards = reward.score(&outs, &train, pad)?;
        let adv = group_advantages(&rewards, g.group_size, g.scale_rewards)?;
        let rows = rollout_rows(&outs, &train, pad);
        let step_tokens: u64 = rows.iter().map(|r| r.segment_ids.iter().filter(|&&s| s > 0).count() as u64).sum();
        let adv_t = Tensor::from_vec(adv, outs.len(), &device)?;
        let ref_logp = if g.beta > 0.0 { Some(token_forward(&reference, &rows, &device, None)?.logp) } else { None };
        let old = token_forward(&frozen, &rows, &device, None)?;
        // Sequence normalisation as a reweighted mask: each response's tokens scaled by
        // mean length / its length, so the token mean becomes the mean of per-response means.
        let weights = if g.normalize == "sequence" {
            let lens = old.mask.sum(1)?; // (N,)
            let scale = (lens.mean_all()?.broadcast_div(&lens.clamp(1.0, f64::MAX)?))?;
            Some(old.mask.broadcast_mul(&scale.unsqueeze(1)?)?)
        } else {
            None
        };
        let entropy = mean_entropy(&old.logits, &old.mask)?;
        let (mut loss, mut norm, mut kl, mut clip) = (0.0, 0.0, 0.0, 0.0);
        for epoch in 0..g.epochs {
            let (l, grads) = accumulate(opt.params(), 1, |_| {
                let mut rng = Rng::derive(cfg.seed, &[step, epoch as u64]);
                let out = token_forward(&policy, &rows, &device, dropout.then_some(&mut rng))?;
                let mask = weights.as_ref().unwrap_or(&out.mask);
                let o = grpo_loss(&out.logp, &old.logp, ref_logp.as_ref(), &adv_t, mask, g.clip_eps, g.beta)?;
                kl = o.kl;
                clip = o.clip_frac;
                Ok::<_, AlignError>(o.loss)
            })?;
            loss = l;
            norm = guarded_update(&mut opt, grads, l, lr, &tc, step, &mut skipped, obs)?;
        }
        step += 1;
        tokens += step_tokens;
        metrics.add_tokens(step_tokens);
        last_loss = loss;
        let n = rewards.len() as f64;
        let mean = rewards.iter().map(|&r| r as f64).sum::<f64>() / n;
        let std = (rewards.iter().map(|&r| (r as f64 - mean).powi(2)).sum::<f64>() / n).sqrt();
        let len = outs.iter().map(|o| o.response.len() as f64).sum::<f64>() / n;
        let mut extra = serde_json::json!({"reward": mean, "reward_std": std, "kl": kl, "clip_frac": clip,
            "entropy": entropy, "response_length": len});
        let val = if !eval.is_empty() && tc.eval_due(step) {
            let e = evaluate(&frozen, &src, &eval, &reward, &cfg.rollout, pad)?;
            e.report(step, &mut extra, obs);
            let r = e.sampled_reward.unwrap_or(e.greedy_reward);
            last_val = Some(r);
            Some(r)
        } else {
            None
        };
        if step % tc.log_every == 0 || val.is_some() || step == end {
            metrics.step(StepLog::new(step, loss, lr, norm, tokens, skipped, None), Some(extra), obs)?;
        }
        if tc.checkpoint_due(step) {
            let at = Progress { step, tokens, skipped, val_loss: last_val };
            last_ck = Some(saver.save(&opt, cfg.to_toml(), at, None, obs)?);
        }
    }
    Ok(Summary {
        step,
        train_loss: last_loss,
        val_loss: last_val,
        elapsed_s: started.elapsed().as_secs_f64(),
        checkpoint: last_ck,
    })
}
