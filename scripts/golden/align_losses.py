"""Golden values for taper-align's losses, from TRL's formulas in PyTorch.

TRL's loss code lives inside trainer methods that need a model, datasets and an accelerator, so each formula is
re-implemented here in torch line for line after TRL's source (huggingface/trl; file and function named on each
function below) rather than called. Inputs are drawn in float32 (what taper feeds) and the losses and their
gradients with respect to the policy inputs (torch autograd) are computed in float64 from those same values, so
the fixture holds the formulas' exact answers and the Rust test measures taper's own f32 error.

Writes crates/taper-align/tests/fixtures/align_losses.json.

    ~/.venvs/ref/bin/python scripts/golden/align_losses.py
"""
import json
import pathlib

import torch
import torch.nn.functional as F

torch.manual_seed(0)
OUT = pathlib.Path(__file__).resolve().parents[2] / "crates/taper-align/tests/fixtures/align_losses.json"
# TRL's PPOTrainer fills padded log-probs with this before any loss.
INVALID_LOGPROB = 1.0


def f32(*shape, scale=1.0, shift=0.0):
    return (torch.randn(*shape) * scale + shift).float()


def leaf(x):
    return x.double().clone().requires_grad_(True)


def flat(x):
    return x.detach().double().flatten().tolist()


def lengths_mask(lengths, t):
    return (torch.arange(t)[None, :] < torch.tensor(lengths)[:, None]).float()


# --- Reward model: trl/trainer/reward_trainer.py, RewardTrainer.compute_loss -------------------------------------
def reward_case(b, margin, center):
    chosen, rejected = f32(b), f32(b)
    m = f32(b, scale=0.5).abs() if margin else None
    c, r = leaf(chosen), leaf(rejected)
    if m is not None:
        loss = -F.logsigmoid(c - r - m.double()).mean()
    else:
        loss = -F.logsigmoid(c - r).mean()
    if center is not None:
        loss = loss + center * torch.mean((c + r) ** 2)
    loss.backward()
    return dict(
        chosen=flat(chosen), rejected=flat(rejected), margin=None if m is None else flat(m),
        center_coef=center or 0.0,
        loss=loss.item(), accuracy=(c > r).double().mean().item(), mean_margin=(c - r).mean().item(),
        grad_chosen=flat(c.grad), grad_rejected=flat(r.grad),
    )


# --- DPO family: trl/trainer/dpo_trainer.py DPOTrainer.dpo_loss (v0.27, with label smoothing) and
# --- trl/experimental/cpo/cpo_trainer.py CPOTrainer.cpo_loss (SimPO) -------------------------------------------------
def dpo_case(kind, beta, b, scale, shift):
    pc, pr = f32(b, scale=scale, shift=shift), f32(b, scale=scale, shift=shift)
    simpo = kind["kind"] == "simpo"
    rc = None if simpo else f32(b, scale=scale, shift=shift)
    rr = None if simpo else f32(b, scale=scale, shift=shift)
    c, r = leaf(pc), leaf(pr)
    if simpo:
        logits = c - r
        logits = logits - kind["gamma"] / beta
        losses = -F.logsigmoid(beta * logits)  # label_smoothing = 0
        chosen_rewards, rejected_rewards = beta * c.detach(), beta * r.detach()
    else:
        rcd, rrd = rc.double(), rr.double()
        pi_logratios = c - r
        ref_logratios = rcd - rrd
        logits = pi_logratios - ref_logratios
        if kind["kind"] == "sigmoid":
            ls = kind["label_smoothing"]
            losses = -F.logsigmoid(beta * logits) * (1 - ls) - F.logsigmoid(-beta * logits) * ls
        elif kind["kind"] == "hinge":
            losses = torch.relu(1 - beta * logits)
        elif kind["kind"] == "ipo":
            losses = (logits - 1 / (2 * beta)) ** 2
        else:
            raise ValueError(kind)
        chosen_rewards, rejected_rewards = beta * (c.detach() - rcd), beta * (r.detach() - rrd)
    loss = losses.mean()
    loss.backward()
    return dict(
        loss_kind=kind, beta=beta,
        policy_chosen=flat(pc), policy_rejected=flat(pr),
        ref_chosen=None if rc is None else flat(rc), ref_rejected=None if rr is None else flat(rr),
        losses=flat(losses), loss=loss.item(),
        chosen_rewards=flat(chosen_rewards), rejected_rewards=flat(rejected_rewards),
        accuracy=(chosen_rewards > rejected_rewards).double().mean().item(),
        margin=(chosen_rewards - rejected_rewards).mean().item(),
        grad_policy_chosen=flat(c.grad), grad_policy_rejected=flat(r.grad),
    )


# --- PPO: trl/experimental/ppo/ppo_trainer.py (masked_mean, masked_var, masked_whiten, PPOTrainer.train) -----------
def masked_mean(values, mask):
    return (values * mask).sum() / mask.sum()


def masked_var(values, mask, unbiased=True):
    mean = masked_mean(values, mask)
    variance = masked_mean((values - mean) ** 2, mask)
    if unbiased:
        mask_sum = mask.sum()
        variance = variance * (mask_sum / (mask_sum - 1))
    return variance


def masked_whiten(values, mask, shift_mean=True):
    mean, var = masked_mean(values, mask), masked_var(values, mask)
    whitened = (values - mean) * torch.rsqrt(var + 1e-8)
    if not shift_mean:
        whitened += mean
    return whitened


def gae_batch(rewards, values, gamma, lam):
    # PPOTrainer.train, "6. compute advantages and returns", before the whitening.
    lastgaelam = 0
    advantages_reversed = []
    gen_length = rewards.shape[1]
    for t in reversed(range(gen_length)):
        nextvalues = values[:, t + 1] if t < gen_length - 1 else 0.0
        delta = rewards[:, t] + gamma * nextvalues - values[:, t]
        lastgaelam = delta + gamma * lam * lastgaelam
        advantages_reversed.append(lastgaelam)
    advantages = torch.stack(advantages_reversed[::-1], axis=1)
    return advantages, advantages + values


def gae_cases(b, t, lengths, gamma, lam):
    rewards, values = f32(b, t), f32(b, t)
    mask = lengths_mask(lengths, t)
    # Garbage past each response, which TRL's masked_fill removes and taper's mask must too.
    rewards_in, values_in = rewards.clone(), values.clone()
    pad = mask == 0
    rewards_in[pad], values_in[pad] = 7.0, -3.0
    adv, ret = gae_batch(rewards.double().masked_fill(pad, 0), values.double().masked_fill(pad, 0), gamma, lam)
    return [dict(rewards=flat(rewards_in[i]), values=flat(values_in[i]), mask=flat(mask[i]), gamma=gamma, lam=lam,
                 advantages=flat(adv[i]), returns=flat(ret[i])) for i in range(b)]


def whiten_case(b, t, lengths, shift_mean):
    xs, mask = f32(b, t, scale=2.0, shift=0.5), lengths_mask(lengths, t)
    return dict(xs=flat(xs), mask=flat(mask), shift_mean=shift_mean,
                out=flat(masked_whiten(xs.double(), mask.double(), shift_mean)))


def kl_case(est, b, t):
    # PPOTrainer.train "4. compute rewards": logr = ref - logp; k1 = -logr; k3 = (exp(logr) - 1) - logr.
    logp = -f32(b, t).abs() - 0.5
    ref = logp + f32(b, t, scale=0.5)
    lp = leaf(logp)
    logr = ref.double() - lp
    kl = -logr if est == "k1" else (logr.exp() - 1) - logr
    kl.sum().backward()
    return dict(est=est, shape=[b, t], logp=flat(logp), ref_logp=flat(ref), out=flat(kl), grad_logp=flat(lp.grad))


def policy_case(b, t, lengths, clip):
    # PPOTrainer.train, the policy half of the minibatch loss.
    mask = lengths_mask(lengths, t)
    pad = mask == 0
    new = -f32(b, t).abs() - 0.5
    old = new + f32(b, t, scale=0.3)
    adv = f32(b, t)
    # Padding as a model leaves it: large log-ratios that would overflow exp() if not masked first.
    new[pad], old[pad], adv[pad] = 60.0, -60.0, 5.0
    lp = leaf(new)
    new_logprobs = torch.masked_fill(lp, pad, INVALID_LOGPROB)
    mb_logprobs = torch.masked_fill(old.double(), pad, INVALID_LOGPROB)
    mb_advantage = torch.masked_fill(adv.double(), pad, 0)
    logprobs_diff = new_logprobs - mb_logprobs
    ratio = torch.exp(logprobs_diff)
    pg_losses = -mb_advantage * ratio
    pg_losses2 = -mb_advantage * torch.clamp(ratio, 1.0 - clip, 1.0 + clip)
    pg_loss = masked_mean(torch.max(pg_losses, pg_losses2), mask.double())
    pg_loss.backward()
    clipfrac = masked_mean((pg_losses2 > pg_losses).double(), mask.double())
    # TRL averages approxkl over padding too; taper takes the masked mean.
    approxkl = masked_mean(0.5 * logprobs_diff.detach() ** 2, mask.double())
    return dict(shape=[b, t], logp_new=flat(new), logp_old=flat(old), advantages=flat(adv), mask=flat(mask),
                clip_eps=clip, loss=pg_loss.item(), clip_frac=clipfrac.item(), approx_kl=approxkl.item(),
                grad_logp_new=flat(lp.grad))


def value_case(b, t, lengths, clip):
    # PPOTrainer.train, the value half of the minibatch loss.
    mask = lengths_mask(lengths, t)
    pad = mask == 0
    v_old = f32(b, t)
    v_new = v_old + f32(b, t, scale=0.3)
    returns = f32(b, t)
    v_new[pad], v_old[pad], returns[pad] = 40.0, -40.0, 9.0
    vn = leaf(v_new)
    vpred = torch.masked_fill(vn, pad, 0)
    mb_values = torch.masked_fill(v_old.double(), pad, 0)
    mb_return = torch.masked_fill(returns.double(), pad, 0)
    vpredclipped = torch.clamp(vpred, mb_values - clip, mb_values + clip)
    vf_losses1 = torch.square(vpred - mb_return)
    vf_losses2 = torch.square(vpredclipped - mb_return)
    vf_loss = 0.5 * masked_mean(torch.max(vf_losses1, vf_losses2), mask.double())
    vf_loss.backward()
    clipfrac = masked_mean((vf_losses2 > vf_losses1).double(), mask.double())
    return dict(shape=[b, t], v_new=flat(v_new), v_old=flat(v_old), returns=flat(returns), mask=flat(mask),
                clip=clip, loss=vf_loss.item(), clip_frac=clipfrac.item(), grad_v_new=flat(vn.grad))


# --- GRPO: trl/trainer/grpo_trainer.py (GRPOTrainer._generate_and_score_completions, _compute_loss) --------------
def group_adv(rewards, group, scale_std):
    rewards = rewards.double()
    mean_grouped = rewards.view(-1, group).mean(dim=1).repeat_interleave(group, dim=0)
    std_grouped = rewards.view(-1, group).std(dim=1).repeat_interleave(group, dim=0)  # unbiased
    advantages = rewards - mean_grouped
    if scale_std:
        advantages = advantages / (std_grouped + 1e-4)
    return advantages


def group_case(rewards, group, scale_std):
    return dict(rewards=flat(rewards), group=group, scale_std=scale_std,
                out=flat(group_adv(rewards, group, scale_std)))


def grpo_case(b, t, lengths, group, clip, beta, with_ref):
    mask = lengths_mask(lengths, t)
    pad = mask == 0
    logp = -f32(b, t).abs() - 0.5
    old = logp + f32(b, t, scale=0.3)
    ref = logp + f32(b, t, scale=0.5)
    rewards = torch.randint(0, 3, (b,)).float()
    adv = group_adv(rewards, group, True).float()
    logp[pad], old[pad], ref[pad] = 50.0, -50.0, -50.0
    lp = leaf(logp)
    m = mask.double()
    # Padding is masked out of the loss by multiplication in TRL; fill it first so that exp() stays finite in f64 too.
    per_token_logps = torch.masked_fill(lp, pad, 0)
    old_per_token_logps = torch.masked_fill(old.double(), pad, 0)
    ref_per_token_logps = torch.masked_fill(ref.double(), pad, 0)
    advantages = adv.double().unsqueeze(1)
    coef_1 = torch.exp(per_token_logps - old_per_token_logps)
    coef_2 = torch.clamp(coef_1, 1 - clip, 1 + clip)
    per_token_loss = -torch.min(coef_1 * advantages, coef_2 * advantages)
    kl = 0.0
    if with_ref:
        per_token_kl = torch.exp(ref_per_token_logps - per_token_logps) - (ref_per_token_logps - per_token_logps) - 1
        kl = ((per_token_kl * m).sum() / m.sum()).item()
        if beta != 0.0:
            per_token_loss = per_token_loss + beta * per_token_kl
    loss = (per_token_loss * m).sum() / m.sum().clamp(min=1.0)  # loss_type == "bnpo"
    loss.backward()
    is_low = (coef_1 < 1 - clip) & (advantages < 0)
    is_high = (coef_1 > 1 + clip) & (advantages > 0)
    clip_frac = ((is_low | is_high).double() * m).sum() / m.sum()
    return dict(shape=[b, t], logp=flat(logp), old_logp=flat(old), ref_logp=flat(ref) if with_ref else None,
                advantages=flat(adv), mask=flat(mask), clip_eps=clip, beta=beta,
                loss=loss.item(), kl=kl, clip_frac=clip_frac.item(), grad_logp=flat(lp.grad))


B, T = 4, 5
LENGTHS = [5, 3, 4, 1]
fixture = {
    "torch": torch.__version__,
    "bradley_terry": [reward_case(6, margin=False, center=None), reward_case(6, margin=True, center=0.01)],
    "dpo": [
        # Summed sequence log-probs for sigmoid/hinge, per-token averages for IPO/SimPO.
        dpo_case({"kind": "sigmoid", "label_smoothing": 0.0}, 0.1, B, 3.0, -12.0),
        dpo_case({"kind": "sigmoid", "label_smoothing": 0.1}, 0.1, B, 3.0, -12.0),
        dpo_case({"kind": "hinge"}, 0.3, B, 3.0, -12.0),
        dpo_case({"kind": "ipo"}, 0.1, B, 0.5, -1.5),
        dpo_case({"kind": "simpo", "gamma": 1.0}, 2.0, B, 0.5, -1.5),
    ],
    "gae": gae_cases(B, T, LENGTHS, 0.99, 0.95) + gae_cases(2, T, [5, 2], 1.0, 1.0),
    "whiten": [whiten_case(B, T, LENGTHS, True), whiten_case(B, T, LENGTHS, False)],
    "kl": [kl_case("k1", B, T), kl_case("k3", B, T)],
    "ppo_policy": [policy_case(B, T, LENGTHS, 0.2)],
    "ppo_value": [value_case(B, T, LENGTHS, 0.2)],
    "group_advantages": [
        group_case(f32(8), 4, True),
        group_case(f32(8), 4, False),
        # A group whose rewards all agree: no spread, advantage 0.
        group_case(torch.tensor([1.0, 1.0, 1.0, 1.0, 0.0, 1.0, 0.0, 0.0]), 4, True),
    ],
    "grpo": [
        grpo_case(8, T, LENGTHS * 2, 4, 0.2, 0.04, with_ref=True),
        grpo_case(8, T, LENGTHS * 2, 4, 0.2, 0.0, with_ref=False),
    ],
}
OUT.parent.mkdir(parents=True, exist_ok=True)
OUT.write_text(json.dumps(fixture, indent=1) + "\n")
print("wrote", OUT)
