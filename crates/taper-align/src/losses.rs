//! Alignment losses as pure functions over candle tensors.
//!
//! Each one follows the formula of its paper as TRL implements it (the TRL trainer and method are named on each function),
//! and `tests/losses_golden.rs` checks values and gradients against `scripts/golden/align_losses.py`. Everything is
//! built from differentiable candle-core ops so that `backward` reaches the policy inputs; tensors are f32 on any
//! device. Inputs that only condition the loss (reference and old log-probs, advantages, returns, masks) are
//! detached, as TRL computes them under `no_grad`.
//!
//! The scalar statistics (`accuracy`, `clip_frac`, ...) are read back to the host, one small sync each, because a
//! caller logs them every step anyway.

use candle_core::{DType, Tensor};
use serde::{Deserialize, Serialize};

use crate::{AlignError, Result};

fn invalid<T>(msg: impl Into<String>) -> Result<T> {
    Err(AlignError::Invalid(msg.into()))
}

fn check_vector(what: &str, t: &Tensor) -> Result<usize> {
    match t.dims() {
        [n] if *n > 0 => Ok(*n),
        dims => invalid(format!("{what}: expected a non-empty (B,) tensor, got shape {dims:?}")),
    }
}

fn check_same(what: &str, a: &Tensor, b: &Tensor) -> Result<()> {
    if a.dims() != b.dims() {
        return invalid(format!("{what}: shape {:?} does not match {:?}", b.dims(), a.dims()));
    }
    Ok(())
}

fn check_matrix(what: &str, t: &Tensor) -> Result<(usize, usize)> {
    match t.dims() {
        [b, n] if *b > 0 && *n > 0 => Ok((*b, *n)),
        dims => invalid(format!("{what}: expected a non-empty (B, T) tensor, got shape {dims:?}")),
    }
}

fn scalar(t: &Tensor) -> Result<f64> {
    Ok(t.to_dtype(DType::F32)?.to_scalar::<f32>()? as f64)
}

/// Replaces `x` by 0 where `mask` is 0.
///
/// Padding positions may hold anything (TRL fills them with `INVALID_LOGPROB`, a model gives garbage): a product
/// `x * mask` would turn an `inf` there into NaN in both the loss and the gradient, `where_cond` does not.
fn zero_masked(x: &Tensor, mask: &Tensor) -> Result<Tensor> {
    Ok(mask.gt(0.0)?.where_cond(x, &x.zeros_like()?)?)
}

/// `softplus(x) = log(1 + exp(x))`, computed as `relu(x) + log(1 + exp(-|x|))` so that `exp` never overflows.
///
/// candle has no `log1p`; `log(1 + e)` loses the relative precision of tiny `e`, but the result is then tiny next
/// to `relu(x)` or below f32 resolution of the losses, and its gradient (`e / (1 + e)`) is exact.
pub fn softplus(x: &Tensor) -> Result<Tensor> {
    let tail = (x.abs()?.neg()?.exp()? + 1.0)?.log()?;
    Ok((x.relu()? + tail)?)
}

/// `log_sigmoid(x) = -softplus(-x)`, numerically stable for any `x` (torch's `F.logsigmoid`).
pub fn log_sigmoid(x: &Tensor) -> Result<Tensor> {
    Ok(softplus(&x.neg()?)?.neg()?)
}

/// `sum(x * mask) / max(sum(mask), 1)` over all elements, a scalar.
///
/// TRL's `masked_mean` divides by `sum(mask)` unclamped; the clamp only changes an all-padding batch, which gives
/// 0 instead of NaN. `x` must be finite where `mask` is 0 (the losses here zero those positions first).
pub fn masked_mean(x: &Tensor, mask: &Tensor) -> Result<Tensor> {
    check_same("masked_mean mask", x, mask)?;
    let mask = mask.detach();
    let den = mask.sum_all()?.maximum(1.0)?;
    Ok((x * &mask)?.sum_all()?.div(&den)?)
}

/// Reward-model output: the loss and the statistics TRL's `RewardTrainer` logs.
#[derive(Debug, Clone)]
pub struct RmOut {
    /// Scalar loss.
    pub loss: Tensor,
    /// Fraction of pairs with `r_chosen > r_rejected`.
    pub accuracy: f64,
    /// Mean of `r_chosen - r_rejected`.
    pub margin: f64,
}

/// Bradley–Terry pairwise reward-model loss, as in InstructGPT (Ouyang et al. 2022,
/// <https://arxiv.org/abs/2203.02155>, eq. 1) and TRL's `RewardTrainer.compute_loss`.
///
/// `loss = mean(-log_sigmoid(r_c - r_r - margin)) + center_coef * mean((r_c + r_r)^2)`.
/// The optional per-pair `margin` is Llama 2's (Touvron et al. 2023, <https://arxiv.org/abs/2307.09288>); the
/// centering term is the auxiliary loss of Eisenstein et al. 2023 (<https://arxiv.org/abs/2312.09244>), TRL's
/// `center_rewards_coefficient` (0 turns it off). `chosen`, `rejected` and `margin` are (B,).
pub fn bradley_terry(chosen: &Tensor, rejected: &Tensor, margin: Option<&Tensor>, center_coef: f64) -> Result<RmOut> {
    check_vector("bradley_terry chosen", chosen)?;
    check_same("bradley_terry rejected", chosen, rejected)?;
    if !center_coef.is_finite() || center_coef < 0.0 {
        return invalid(format!("bradley_terry: center_coef must be finite and >= 0, got {center_coef}"));
    }
    let diff = (chosen - rejected)?;
    let z = match margin {
        Some(m) => {
            check_same("bradley_terry margin", chosen, m)?;
            (&diff - m.detach())?
        }
        None => diff.clone(),
    };
    let mut loss = log_sigmoid(&z)?.neg()?.mean_all()?;
    if center_coef != 0.0 {
        loss = (loss + ((chosen + rejected)?.sqr()?.mean_all()? * center_coef)?)?;
    }
    let diff = diff.detach();
    let accuracy = scalar(&diff.gt(0.0)?.to_dtype(DType::F32)?.mean_all()?)?;
    let margin = scalar(&diff.mean_all()?)?;
    Ok(RmOut { loss, accuracy, margin })
}

/// The preference-optimisation losses of TRL's `DPOTrainer.dpo_loss` and `CPOTrainer.cpo_loss` that taper offers.
///
/// In config files: `{ kind = "sigmoid", label_smoothing = 0.1 }`, `{ kind = "ipo" }`, `{ kind = "hinge" }`,
/// `{ kind = "simpo", gamma = 0.5 }`.
///
/// A field that the kind does not use is an error (serde's `deny_unknown_fields` lets it through on the unit
/// variants of an internally tagged enum, so configs are read through a flat struct that checks them).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", try_from = "DpoLossRepr")]
pub enum DpoLoss {
    /// DPO (Rafailov et al. 2023, <https://arxiv.org/abs/2305.18290>, eq. 7), with conservative DPO's label
    /// smoothing (Mitchell 2023, <https://ericmitchell.ai/cdpo.pdf>): the label is flipped with probability
    /// `label_smoothing`, in [0, 0.5] (above it the labels would mostly point the other way; 0 when a config omits
    /// it, plain DPO). Sequence log-probs are summed over the completion.
    Sigmoid { label_smoothing: f64 },
    /// IPO (Azar et al. 2023, <https://arxiv.org/abs/2310.12036>, eq. 17). TRL feeds it length-AVERAGED log-probs
    /// (policy and reference alike: sum over the completion / its token count), so the caller must pass averages;
    /// see [`DpoLoss::length_normalised`].
    Ipo,
    /// SLiC's hinge loss (Zhao et al. 2023, <https://arxiv.org/abs/2305.10425>, eq. 3 with the reference
    /// log-ratio of DPO), summed log-probs.
    Hinge,
    /// SimPO (Meng et al. 2024, <https://arxiv.org/abs/2405.14734>, eq. 6): reference-free, on length-AVERAGED
    /// log-probs, with target reward margin `gamma` (TRL's `simpo_gamma`; 0.5 when a config omits it).
    Simpo { gamma: f64 },
}

/// The on-disk form of [`DpoLoss`]: every field any kind takes, checked against the kind on conversion.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct DpoLossRepr {
    kind: DpoKind,
    label_smoothing: Option<f64>,
    gamma: Option<f64>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "snake_case")]
enum DpoKind {
    Sigmoid,
    Ipo,
    Hinge,
    Simpo,
}

impl TryFrom<DpoLossRepr> for DpoLoss {
    type Error = String;

    fn try_from(r: DpoLossRepr) -> std::result::Result<Self, String> {
        let unused = |field: &str, set: bool| {
            if set {
                return Err(format!("`{field}` does not apply to the {:?} loss", r.kind));
            }
            Ok(())
        };
        Ok(match r.kind {
            DpoKind::Sigmoid => {
                unused("gamma", r.gamma.is_some())?;
                DpoLoss::Sigmoid { label_smoothing: r.label_smoothing.unwrap_or(0.0) }
            }
            DpoKind::Simpo => {
                unused("label_smoothing", r.label_smoothing.is_some())?;
                // TRL's CPOConfig.simpo_gamma default.
                DpoLoss::Simpo { gamma: r.gamma.unwrap_or(0.5) }
            }
            DpoKind::Ipo | DpoKind::Hinge => {
                unused("label_smoothing", r.label_smoothing.is_some())?;
                unused("gamma", r.gamma.is_some())?;
                match r.kind {
                    DpoKind::Ipo => DpoLoss::Ipo,
                    _ => DpoLoss::Hinge,
                }
            }
        })
    }
}

impl DpoLoss {
    /// Whether the loss expects per-token-averaged sequence log-probs rather than sums (TRL's `average_log_prob`,
    /// set for IPO and SimPO).
    pub fn length_normalised(&self) -> bool {
        matches!(self, DpoLoss::Ipo | DpoLoss::Simpo { .. })
    }

    /// Whether the loss compares against a reference model.
    pub fn needs_reference(&self) -> bool {
        !matches!(self, DpoLoss::Simpo { .. })
    }
}

/// DPO-family output: per-example and mean loss, and the implicit rewards TRL logs.
#[derive(Debug, Clone)]
pub struct DpoOut {
    /// Per-pair losses, (B,).
    pub losses: Tensor,
    /// Scalar mean of `losses`.
    pub loss: Tensor,
    /// `beta * (policy_chosen - ref_chosen)` (SimPO: `beta * policy_chosen`), (B,) f32.
    pub chosen_rewards: Tensor,
    /// `beta * (policy_rejected - ref_rejected)` (SimPO: `beta * policy_rejected`), (B,) f32.
    pub rejected_rewards: Tensor,
    /// (4,) f64: the fraction of pairs with `chosen_reward > rejected_reward`, the mean of
    /// `chosen_reward - rejected_reward`, the mean chosen and the mean rejected reward. A tensor,
    /// so that a training step reads nothing back; see [`DpoOut::STATS`].
    pub stats: Tensor,
}

impl DpoOut {
    /// The names of [`DpoOut::stats`], as TRL logs them.
    pub const STATS: [&'static str; 4] =
        ["rewards/accuracies", "rewards/margins", "rewards/chosen", "rewards/rejected"];
}

/// The DPO family over per-example sequence log-probs (B,), following TRL's `DPOTrainer.dpo_loss` (0.x; 1.x
/// dropped the label smoothing from `sigmoid`) and `CPOTrainer.cpo_loss` for SimPO.
///
/// With `logits = (pc - pr) - (rc - rr)` (SimPO: `pc - pr - gamma / beta`):
/// - sigmoid: `-log_sigmoid(beta * logits) * (1 - ls) - log_sigmoid(-beta * logits) * ls`
/// - hinge: `relu(1 - beta * logits)`
/// - ipo: `(logits - 1 / (2 * beta))^2`
/// - simpo: `-log_sigmoid(beta * logits)`
///
/// `reference` is `(ref_chosen, ref_rejected)`: required for all but SimPO, and an error for SimPO so that a
/// wasted reference forward cannot go unnoticed. See [`DpoLoss`] for which kinds want averaged log-probs.
pub fn dpo_loss(
    kind: DpoLoss,
    beta: f64,
    policy_chosen: &Tensor,
    policy_rejected: &Tensor,
    reference: Option<(&Tensor, &Tensor)>,
) -> Result<DpoOut> {
    check_vector("dpo_loss policy_chosen", policy_chosen)?;
    check_same("dpo_loss policy_rejected", policy_chosen, policy_rejected)?;
    if !beta.is_finite() || beta <= 0.0 {
        return invalid(format!("dpo_loss: beta must be finite and > 0, got {beta}"));
    }
    let reference = match (kind.needs_reference(), reference) {
        (true, Some((rc, rr))) => {
            check_same("dpo_loss ref_chosen", policy_chosen, rc)?;
            check_same("dpo_loss ref_rejected", policy_chosen, rr)?;
            Some((rc.detach(), rr.detach()))
        }
        (true, None) => return invalid(format!("dpo_loss: {kind:?} needs reference log-probs")),
        (false, Some(_)) => return invalid(format!("dpo_loss: {kind:?} is reference-free; got reference log-probs")),
        (false, None) => None,
    };
    let pi_logratios = (policy_chosen - policy_rejected)?;
    let logits = match &reference {
        Some((rc, rr)) => (&pi_logratios - (rc - rr)?)?,
        None => pi_logratios,
    };
    let losses = match kind {
        DpoLoss::Sigmoid { label_smoothing: ls } => {
            if !(0.0..=0.5).contains(&ls) {
                return invalid(format!("dpo_loss: label_smoothing must lie in [0, 0.5], got {ls}"));
            }
            let z = (&logits * beta)?;
            let clean = (log_sigmoid(&z)?.neg()? * (1.0 - ls))?;
            if ls == 0.0 {
                clean
            } else {
                (clean - (log_sigmoid(&z.neg()?)? * ls)?)?
            }
        }
        DpoLoss::Hinge => (&logits * -beta)?.affine(1.0, 1.0)?.relu()?,
        DpoLoss::Ipo => (&logits - 1.0 / (2.0 * beta))?.sqr()?,
        DpoLoss::Simpo { gamma } => {
            if !gamma.is_finite() {
                return invalid(format!("dpo_loss: simpo gamma must be finite, got {gamma}"));
            }
            log_sigmoid(&((&logits - gamma / beta)? * beta)?)?.neg()?
        }
    };
    let loss = losses.mean_all()?;

    let (chosen, rejected) = match &reference {
        Some((rc, rr)) => ((policy_chosen.detach() - rc)?, (policy_rejected.detach() - rr)?),
        None => (policy_chosen.detach(), policy_rejected.detach()),
    };
    let chosen_rewards = (chosen * beta)?.to_dtype(DType::F32)?;
    let rejected_rewards = (rejected * beta)?.to_dtype(DType::F32)?;
    let (c, r) = (chosen_rewards.to_dtype(DType::F64)?, rejected_rewards.to_dtype(DType::F64)?);
    let stats = Tensor::stack(
        &[
            chosen_rewards.gt(&rejected_rewards)?.to_dtype(DType::F64)?.mean_all()?,
            (&c - &r)?.mean_all()?,
            c.mean_all()?,
            r.mean_all()?,
        ],
        0,
    )?;
    Ok(DpoOut { losses, loss, chosen_rewards, rejected_rewards, stats })
}

fn check_lengths(what: &str, n: usize, others: &[(&str, usize)]) -> Result<()> {
    for (name, len) in others {
        if *len != n {
            return invalid(format!("{what}: {name} has {len} entries, expected {n}"));
        }
    }
    Ok(())
}

/// Generalised advantage estimation (Schulman et al. 2016, <https://arxiv.org/abs/1506.02438>, eq. 16) for ONE
/// response of T tokens, as TRL's `PPOTrainer.train` computes it.
///
/// `delta_t = r_t + gamma * V_{t+1} - V_t`, `A_t = delta_t + gamma * lam * A_{t+1}`, `V_T = 0`; returns are
/// `A_t + V_t`. `mask` is 1 for the response's positions and 0 for the padding after it; rewards and values there
/// count as 0, as TRL `masked_fill`s them (so padding gets 0 advantage and return). Use TRL's value mask (one
/// position past the last token, `padding_mask_p1`) to reproduce it exactly. Accumulates in f64.
pub fn gae(rewards: &[f32], values: &[f32], mask: &[f32], gamma: f64, lam: f64) -> Result<(Vec<f32>, Vec<f32>)> {
    let n = rewards.len();
    check_lengths("gae", n, &[("values", values.len()), ("mask", mask.len())])?;
    let keep = |x: f32, m: f32| if m > 0.0 { x as f64 } else { 0.0 };
    let mut advantages = vec![0f32; n];
    let mut returns = vec![0f32; n];
    let mut last = 0f64;
    for t in (0..n).rev() {
        let next = if t + 1 < n { keep(values[t + 1], mask[t + 1]) } else { 0.0 };
        let value = keep(values[t], mask[t]);
        let delta = keep(rewards[t], mask[t]) + gamma * next - value;
        last = delta + gamma * lam * last;
        advantages[t] = last as f32;
        returns[t] = (last + value) as f32;
    }
    Ok((advantages, returns))
}

/// Masked whitening, TRL's `masked_whiten`: `(x - mean) / sqrt(var + 1e-8)` with the mean and the unbiased
/// (Bessel-corrected, TRL's `masked_var(unbiased=True)`) variance over the masked entries; `shift_mean = false`
/// adds the mean back (TRL whitens rewards that way).
///
/// Like TRL, every entry is transformed, padding included; callers zero the padding afterwards. Needs a mask sum
/// above 1: TRL raises at 0 and divides by zero at 1.
pub fn whiten(xs: &[f32], mask: &[f32], shift_mean: bool) -> Result<Vec<f32>> {
    check_lengths("whiten", xs.len(), &[("mask", mask.len())])?;
    let count: f64 = mask.iter().map(|&m| m as f64).sum();
    if count <= 1.0 {
        return invalid(format!("whiten: the mask sums to {count}; the unbiased variance needs more than 1"));
    }
    let mean = xs.iter().zip(mask).map(|(&x, &m)| x as f64 * m as f64).sum::<f64>() / count;
    let var = xs.iter().zip(mask).map(|(&x, &m)| (x as f64 - mean).powi(2) * m as f64).sum::<f64>() / count;
    let var = var * count / (count - 1.0);
    let scale = 1.0 / (var + 1e-8).sqrt();
    let back = if shift_mean { 0.0 } else { mean };
    Ok(xs.iter().map(|&x| ((x as f64 - mean) * scale + back) as f32).collect())
}

/// Per-token estimators of KL(policy || reference) from samples of the policy (Schulman 2020, "Approximating KL
/// Divergence", <http://joschu.net/blog/kl-approx.html>), TRL's `kl_estimator`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum KlEstimator {
    /// `logp - ref_logp`: unbiased, high variance, can be negative.
    K1,
    /// `exp(ref_logp - logp) - (ref_logp - logp) - 1`: unbiased, lower variance, never negative.
    K3,
}

/// Per-token KL estimate (same shape as the inputs); see [`KlEstimator`]. Differentiable in `logp`.
pub fn kl_per_token(logp: &Tensor, ref_logp: &Tensor, est: KlEstimator) -> Result<Tensor> {
    check_same("kl_per_token ref_logp", logp, ref_logp)?;
    let ref_logp = ref_logp.detach();
    Ok(match est {
        KlEstimator::K1 => (logp - ref_logp)?,
        KlEstimator::K3 => k3(&(ref_logp - logp)?)?,
    })
}

/// k3 from the log-ratio `logr = ref - logp`.
fn k3(logr: &Tensor) -> Result<Tensor> {
    Ok(((logr.exp()? - logr)? - 1.0)?)
}

/// PPO policy-loss output.
#[derive(Debug, Clone)]
pub struct PolicyOut {
    /// Scalar clipped surrogate loss.
    pub loss: Tensor,
    /// Fraction of real tokens where the clipped term is the larger one (the gradient is cut).
    pub clip_frac: f64,
    /// Masked mean of `0.5 * (logp_new - logp_old)^2`.
    pub approx_kl: f64,
}

/// PPO's clipped surrogate objective (Schulman et al. 2017, <https://arxiv.org/abs/1707.06347>, eq. 7) as TRL's
/// `PPOTrainer` and "The N Implementation Details of RLHF with PPO" (Huang et al. 2024) write it.
///
/// `ratio = exp(logp_new - logp_old)`, `pg = max(-A * ratio, -A * clamp(ratio, 1 - eps, 1 + eps))`, loss = masked
/// mean over all tokens. All inputs are (B, T). TRL's `approxkl` averages over padding too (its padding has a zero
/// log-ratio), diluting it; here it is the masked mean.
pub fn ppo_policy_loss(
    logp_new: &Tensor,
    logp_old: &Tensor,
    advantages: &Tensor,
    mask: &Tensor,
    clip_eps: f64,
) -> Result<PolicyOut> {
    check_matrix("ppo_policy_loss logp_new", logp_new)?;
    for (what, t) in [("logp_old", logp_old), ("advantages", advantages), ("mask", mask)] {
        check_same(&format!("ppo_policy_loss {what}"), logp_new, t)?;
    }
    check_clip("ppo_policy_loss clip_eps", clip_eps)?;
    let mask = mask.detach();
    let (logp_old, advantages) = (logp_old.detach(), zero_masked(&advantages.detach(), &mask)?);
    let diff = zero_masked(&(logp_new - logp_old)?, &mask)?;
    let ratio = diff.exp()?;
    let neg_adv = advantages.neg()?;
    let pg1 = (&neg_adv * &ratio)?;
    let pg2 = (&neg_adv * ratio.clamp(1.0 - clip_eps, 1.0 + clip_eps)?)?;
    let loss = masked_mean(&pg1.maximum(&pg2)?, &mask)?;
    let clipped = pg2.detach().gt(&pg1.detach())?.to_dtype(DType::F32)?;
    let clip_frac = scalar(&masked_mean(&clipped, &mask)?)?;
    let approx_kl = scalar(&masked_mean(&(diff.detach().sqr()? * 0.5)?, &mask)?)?;
    Ok(PolicyOut { loss, clip_frac, approx_kl })
}

fn check_clip(what: &str, eps: f64) -> Result<()> {
    if !eps.is_finite() || eps < 0.0 {
        return invalid(format!("{what} must be finite and >= 0, got {eps}"));
    }
    Ok(())
}

/// PPO's clipped value loss, as TRL's `PPOTrainer` (and OpenAI's baselines) compute it:
/// `v_clip = v_old + clamp(v_new - v_old, -clip, clip)`, loss `0.5 * masked_mean(max((v_new - R)^2, (v_clip - R)^2))`.
///
/// All inputs are (B, T). Returns the scalar loss and the fraction of real tokens where the clipped error is the
/// larger one.
pub fn ppo_value_loss(
    v_new: &Tensor,
    v_old: &Tensor,
    returns: &Tensor,
    mask: &Tensor,
    clip: f64,
) -> Result<(Tensor, f64)> {
    check_matrix("ppo_value_loss v_new", v_new)?;
    for (what, t) in [("v_old", v_old), ("returns", returns), ("mask", mask)] {
        check_same(&format!("ppo_value_loss {what}"), v_new, t)?;
    }
    check_clip("ppo_value_loss clip", clip)?;
    let mask = mask.detach();
    let v_old = zero_masked(&v_old.detach(), &mask)?;
    let returns = zero_masked(&returns.detach(), &mask)?;
    let v_new = zero_masked(v_new, &mask)?;
    let v_clipped = (&v_old + (&v_new - &v_old)?.clamp(-clip, clip)?)?;
    let l1 = (&v_new - &returns)?.sqr()?;
    let l2 = (v_clipped - &returns)?.sqr()?;
    let loss = (masked_mean(&l1.maximum(&l2)?, &mask)? * 0.5)?;
    let clipped = l2.detach().gt(&l1.detach())?.to_dtype(DType::F32)?;
    let clip_frac = scalar(&masked_mean(&clipped, &mask)?)?;
    Ok((loss, clip_frac))
}

/// GRPO's group-relative advantages (Shao et al. 2024, DeepSeekMath, <https://arxiv.org/abs/2402.03300>, §4.1.2),
/// as TRL's `GRPOTrainer` computes them: `(r - mean_group) / (std_group + 1e-4)`, with torch's unbiased std.
///
/// `rewards` holds consecutive groups of `group` completions of the same prompt. `scale_std = false` only centres
/// (Dr. GRPO, Liu et al. 2025, <https://arxiv.org/abs/2503.20783>; TRL's `scale_rewards = "none"`). A group of 1
/// has no spread: its advantage is 0, as in TRL.
pub fn group_advantages(rewards: &[f32], group: usize, scale_std: bool) -> Result<Vec<f32>> {
    if group == 0 || !rewards.len().is_multiple_of(group) {
        return invalid(format!("group_advantages: {} rewards do not split into groups of {group}", rewards.len()));
    }
    let mut out = Vec::with_capacity(rewards.len());
    for g in rewards.chunks(group) {
        let n = g.len() as f64;
        let mean = g.iter().map(|&r| r as f64).sum::<f64>() / n;
        let std = if g.len() > 1 {
            (g.iter().map(|&r| (r as f64 - mean).powi(2)).sum::<f64>() / (n - 1.0)).sqrt()
        } else {
            0.0
        };
        let scale = if scale_std { 1.0 / (std + 1e-4) } else { 1.0 };
        out.extend(g.iter().map(|&r| ((r as f64 - mean) * scale) as f32));
    }
    Ok(out)
}

/// GRPO loss output.
#[derive(Debug, Clone)]
pub struct GrpoOut {
    /// Scalar loss.
    pub loss: Tensor,
    /// Masked mean of the k3 KL to the reference (0 without one).
    pub kl: f64,
    /// Fraction of real tokens whose ratio is clipped on the side that cuts the gradient (TRL's
    /// `clip_ratio/region_mean`).
    pub clip_frac: f64,
}

/// GRPO's clipped objective with a k3 KL penalty (Shao et al. 2024, <https://arxiv.org/abs/2402.03300>, eq. 3),
/// as TRL's `GRPOTrainer._compute_loss` with token-level importance sampling and `loss_type = "bnpo"`.
///
/// `ratio = exp(logp - old_logp)`, per token `-min(ratio * A, clamp(ratio, 1 - eps, 1 + eps) * A) + beta * k3`
/// with `k3 = exp(ref - logp) - (ref - logp) - 1`, loss `sum(per_token * mask) / max(sum(mask), 1)`: every real
/// token of the batch weighs the same (GRPO's paper averages per sequence first). `logp`, `old_logp`, `ref_logp`
/// and `mask` are (B, T), `advantages` (B,). `ref_logp` is needed when `beta != 0`; with `beta = 0` it only feeds
/// the `kl` statistic.
pub fn grpo_loss(
    logp: &Tensor,
    old_logp: &Tensor,
    ref_logp: Option<&Tensor>,
    advantages: &Tensor,
    mask: &Tensor,
    clip_eps: f64,
    beta: f64,
) -> Result<GrpoOut> {
    let (b, t) = check_matrix("grpo_loss logp", logp)?;
    check_same("grpo_loss old_logp", logp, old_logp)?;
    check_same("grpo_loss mask", logp, mask)?;
    if advantages.dims() != [b] {
        return invalid(format!("grpo_loss advantages: expected shape [{b}], got {:?}", advantages.dims()));
    }
    check_clip("grpo_loss clip_eps", clip_eps)?;
    if !beta.is_finite() || beta < 0.0 {
        return invalid(format!("grpo_loss: beta must be finite and >= 0, got {beta}"));
    }
    if beta != 0.0 && ref_logp.is_none() {
        return invalid(format!("grpo_loss: beta = {beta} needs reference log-probs"));
    }
    let mask = mask.detach();
    let adv = advantages.detach().unsqueeze(1)?.broadcast_as((b, t))?;
    let coef1 = zero_masked(&(logp - old_logp.detach())?, &mask)?.exp()?;
    let coef2 = coef1.clamp(1.0 - clip_eps, 1.0 + clip_eps)?;
    let mut per_token = (&coef1 * &adv)?.minimum(&(&coef2 * &adv)?)?.neg()?;
    let mut kl = 0.0;
    if let Some(r) = ref_logp {
        check_same("grpo_loss ref_logp", logp, r)?;
        let per_token_kl = k3(&zero_masked(&(r.detach() - logp)?, &mask)?)?;
        kl = scalar(&masked_mean(&per_token_kl.detach(), &mask)?)?;
        if beta != 0.0 {
            per_token = (per_token + (per_token_kl * beta)?)?;
        }
    }
    let loss = masked_mean(&per_token, &mask)?;
    let (coef1, f32s) = (coef1.detach(), |t: Tensor| t.to_dtype(DType::F32));
    let low = (f32s(coef1.lt(1.0 - clip_eps)?)? * f32s(adv.lt(0.0)?)?)?;
    let high = (f32s(coef1.gt(1.0 + clip_eps)?)? * f32s(adv.gt(0.0)?)?)?;
    let clip_frac = scalar(&masked_mean(&(low + high)?, &mask)?)?;
    Ok(GrpoOut { loss, kl, clip_frac })
}
