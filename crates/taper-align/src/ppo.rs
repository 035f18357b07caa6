//! The PPO recipe for RLHF (Ziegler et al. 2019; Ouyang et al. 2022; the conventions of TRL's
//! PPOTrainer and "The N Implementation Details of RLHF with PPO"), top to bottom: per step,
//! one sampled response per prompt (KV cache); a score from the reward model or a verifiable
//! reward; per-token rewards = -kl_coef * KL(policy || reference) plus the score on the last
//! token; values from a value head on the policy's hidden states; GAE; whitened advantages;
//! then epochs x minibatches of the clipped policy loss + vf_coef * the clipped value loss (the
//! value head a linear probe on the policy's hidden states, which its loss does not train).
//! The KL coefficient is fixed or adapted towards a target (Ziegler et al. 2019, eq. 2).

use crate::losses::{gae, kl_per_token, ppo_policy_loss, ppo_value_loss, whiten, KlEstimator};
use crate::rl::{
    evaluate, mean_entropy, rollout_rows, rollouts, token_forward, PromptDataConfig, PromptRun, RewardSpec,
    RolloutConfig, TokenOut,
};
use crate::{AlignError, Result};
use candle_core::{Device, Tensor, D};
use serde::{Deserialize, Serialize};
use std::path::Path;
use std::time::Instant;
use taper_data::packing::Row;
use taper_model::lora::LoraConfig;
use taper_model::{Decoder, Rng, Sampling, Weights};
use taper_train::config::{TrainConfig, Validate};
use taper_train::finetune::{load_resume, resume_optimizer, trainable, Progress, Saver};
use taper_train::optim::{OptimConfig, Optimizer};
use taper_train::pretrain::{Observer, Resume, RunInfo, StepLog, Summary};
use taper_train::schedule::ScheduleConfig;
use taper_train::sft::epoch_pick;
use taper_train::steps::{accumulate, guarded_update, Metrics};

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
    /// Prompts per step, one response each.
    pub rollouts_per_step: usize,
    /// Passes over each batch of rollouts.
    pub epochs: usize,
    /// Minibatches per pass (one optimizer step each).
    pub minibatches: usize,
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
            minibatches: 4,
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
            train: TrainConfig { batch_size: 1, ..TrainConfig::default() },
            optim: OptimConfig { lr: 1e-5, weight_decay: 0.0, ..OptimConfig::default() },
            schedule: ScheduleConfig::default(),
        }
    }
}

impl Validate for PpoConfig {
    fn validate(&self) -> Vec<String> {
        let mut e = Vec::new();
        if self.init.is_empty() {
            e.push("init: name the policy to start from".into());
        }
        e.extend(self.data.validate());
        e.extend(self.rollout.validate());
        let p = &self.ppo;
        if p.rollouts_per_step == 0 || p.epochs == 0 || p.minibatches == 0 || p.minibatches > p.rollouts_per_step {
            e.push(
                "ppo: rollouts_per_step, epochs and minibatches must be > 0, minibatches <= rollouts_per_step".into(),
            );
        }
        if !(0.0..=1.0).contains(&p.gamma) || !(0.0..=1.0).contains(&p.lam) {
            e.push("ppo.gamma and ppo.lam must be in [0, 1]".into());
        }
        if p.kl_coef < 0.0 || p.clip_eps <= 0.0 || p.vf_clip <= 0.0 || p.vf_coef < 0.0 {
            e.push("ppo: kl_coef and vf_coef must be >= 0, clip_eps and vf_clip > 0".into());
        }
        if let Some(a) = p.adaptive_kl {
            if a.target <= 0.0 || a.horizon <= 0.0 {
                e.push("ppo.adaptive_kl: target and horizon must be > 0".into());
            }
        }
        if let Some(l) = &self.lora {
            e.extend(l.validate());
        }
        e.extend(self.optim.validate());
        e.extend(self.schedule.validate(self.train.max_steps));
        e
    }
}

impl PpoConfig {
    pub fn to_toml(&self) -> String {
        toml::to_string(self).expect("PpoConfig serialises to TOML")
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
    let scores = if p.whiten_rewards { whiten(scores, &vec![1.0; scores.len()], false)? } else { scores.to_vec() };
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
    let adv = whiten(&adv, &flat_mask, true)?;
    let adv: Vec<f32> = adv.iter().zip(&flat_mask).map(|(a, m)| a * m).collect();
    Ok(Batch {
        rows,
        old_logp: old.logp.clone(),
        old_values,
        advantages: Tensor::from_vec(adv, (n, t), dev)?,
        returns: Tensor::from_vec(ret, (n, t), dev)?,
        kl: kl_sum / n as f64,
        entropy: mean_entropy(&old.logits, &old.mask)?,
    })
}

pub fn ppo(cfg: PpoConfig, run_dir: &Path, resume: Resume, obs: &mut dyn Observer) -> Result<Summary> {
    let started = Instant::now();
    let PromptRun { device, ck_root, src, pad, train, eval, reward } =
        PromptRun::setup(&cfg.device, &cfg.init, &cfg.data, &cfg.rollout, &cfg.reward, run_dir, obs)?;
    let max_new = cfg.rollout.max_new_tokens;

    let ck = load_resume(&resume, &ck_root, &device)?;
    let c = src.config.n_embd;
    let mut rng = Rng::derive(cfg.seed, &[0x5648_4541]);
    let head: Vec<f32> = (0..c).map(|_| (rng.normal() * 0.02) as f32).collect();
    let heads = vec![
        (V_HEAD.to_string(), Tensor::from_vec(head, (1, c), &device)?),
        (V_BIAS.to_string(), Tensor::zeros(1, candle_core::DType::F32, &device)?),
    ];
    let (vars, weights) = trainable(&src, cfg.lora.as_ref(), cfg.seed, heads, ck.as_ref())?;
    let head_of = |name: &str| vars.iter().find(|(n, _)| n == name).map(|(_, v)| v.as_tensor().clone());
    let (vw, vb) = (head_of(V_HEAD).expect("trainable"), head_of(V_BIAS).expect("trainable"));
    let policy = Decoder::load(&weights, &src.config)?;
    let frozen = Decoder::load(&weights.detached(), &src.config)?;
    let reference = Decoder::load(&Weights::new(src.weights.clone()).detached(), &src.config)?;
    let n_trainable: usize = vars.iter().map(|(_, v)| v.elem_count()).sum();
    let mut kl_coef = cfg.ppo.kl_coef;
    if let Some(ck) = &ck {
        if let Some(k) = std::fs::read_to_string(ck.dir.join("recipe_state.json"))
            .ok()
            .and_then(|s| serde_json::from_str::<serde_json::Value>(&s).ok())
            .and_then(|v| v["kl_coef_bits"].as_u64())
        {
            kl_coef = f64::from_bits(k);
        }
    }
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
    let pp = &cfg.ppo;
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
        heads: &[V_HEAD, V_BIAS],
        frozen: &[],
    };
    while step < end {
        let lr = cfg.schedule.lr(step, cfg.optim.lr, tc.max_steps);
        let picked = epoch_pick(cfg.seed, train.len(), pp.rollouts_per_step, step);
        let which: Vec<(usize, Rng)> = picked
            .iter()
            .enumerate()
            .map(|(i, &p)| (p, Rng::derive(cfg.seed, &[step, i as u64, 0x5050_4F00])))
            .collect();
        let outs = rollouts(&frozen, &src, &train, &which, &sampling, max_new)?;
        let scores = reward.score(&outs, &train, pad)?;
        let rows = rollout_rows(&outs, &train, pad);
        let step_tokens: u64 = rows.iter().map(|r| r.segment_ids.iter().filter(|&&s| s > 0).count() as u64).sum();
        let old = token_forward(&frozen, &rows, &device, None)?;
        let old_values = values(&old.hidden, &vw.detach(), &vb.detach())?;
        let ref_logp = token_forward(&reference, &rows, &device, None)?.logp;
        let batch = prepare(rows, &old, old_values, &ref_logp, &scores, pp, kl_coef, &device)?;

        let n = batch.rows.len();
        let mb = n.div_ceil(pp.minibatches);
        let (mut pl_sum, mut vl_sum, mut clip_sum, mut vclip_sum, mut akl_sum, mut k, mut norm) =
            (0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0);
        let mut loss = 0.0;
        for epoch in 0..pp.epochs {
            let mut order: Vec<usize> = (0..n).collect();
            Rng::derive(cfg.seed, &[step, epoch as u64, 0x4D42]).shuffle(&mut order);
            for (m, chunk) in order.chunks(mb).enumerate() {
                let idx =
                    Tensor::from_vec(chunk.iter().map(|&i| i as u32).collect::<Vec<u32>>(), chunk.len(), &device)?;
                let rows: Vec<Row> = chunk.iter().map(|&i| batch.rows[i].clone()).collect();
                let pick = |t: &Tensor| t.index_select(&idx, 0);
                let (mut pl, mut vl, mut cf, mut vcf, mut akl) = (0.0, 0.0, 0.0, 0.0, 0.0);
                let (l, grads) = accumulate(opt.params(), 1, |_| {
                    let mut rng = Rng::derive(cfg.seed, &[step, epoch as u64, m as u64]);
                    let out = token_forward(&policy, &rows, &device, dropout.then_some(&mut rng))?;
                    // The value head reads the policy's features but does not train them: with
                    // one shared trunk the value loss's gradient would pull the LM off course.
                    let v = values(&out.hidden.detach(), &vw, &vb)?;
                    let adv = pick(&batch.advantages)?;
                    let pol = ppo_policy_loss(&out.logp, &pick(&batch.old_logp)?, &adv, &out.mask, pp.clip_eps)?;
                    let (vloss, vclip) =
                        ppo_value_loss(&v, &pick(&batch.old_values)?, &pick(&batch.returns)?, &out.mask, pp.vf_clip)?;
                    pl = crate::pairs::scalar(&pol.loss)?;
                    vl = crate::pairs::scalar(&vloss)?;
                    (cf, vcf, akl) = (pol.clip_frac, vclip, pol.approx_kl);
                    Ok::<_, AlignError>((pol.loss + (vloss * pp.vf_coef)?)?)
                })?;
                norm = guarded_update(&mut opt, grads, l, lr, &tc, step, &mut skipped, obs)?;
                loss = l;
                (pl_sum, vl_sum, clip_sum, vclip_sum, akl_sum, k) =
                    (pl_sum + pl, vl_sum + vl, clip_sum + cf, vclip_sum + vcf, akl_sum + akl, k + 1.0);
            }
        }
        // Ziegler et al.'s proportional controller, its error clipped to +-20%.
        if let Some(a) = pp.adaptive_kl {
            let err = ((batch.kl - a.target) / a.target).clamp(-0.2, 0.2);
            kl_coef *= 1.0 + err * n as f64 / a.horizon;
        }
        step += 1;
        tokens += step_tokens;
        metrics.add_tokens(step_tokens);
        last_loss = loss;
        let nf = scores.len() as f64;
        let mean = scores.iter().map(|&r| r as f64).sum::<f64>() / nf;
        let std = (scores.iter().map(|&r| (r as f64 - mean).powi(2)).sum::<f64>() / nf).sqrt();
        let len = outs.iter().map(|o| o.response.len() as f64).sum::<f64>() / nf;
        let mut extra = serde_json::json!({"reward": mean, "reward_std": std, "kl": batch.kl, "kl_coef": kl_coef,
            "entropy": batch.entropy, "policy_loss": pl_sum / k, "value_loss": vl_sum / k,
            "clip_frac": clip_sum / k, "vf_clip_frac": vclip_sum / k, "approx_kl": akl_sum / k,
            "response_length": len});
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
            // The bits too: JSON floats do not read back exactly, and resume must.
            let state = serde_json::json!({ "kl_coef": kl_coef, "kl_coef_bits": kl_coef.to_bits() });
            last_ck = Some(saver.save(&opt, cfg.to_toml(), at, Some(&state), obs)?);
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
        let b = prepare(Vec::new(), &old, zeros, &ref_logp, &[2.0, -1.0], &p, 0.5, &dev)?;
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
