//! The DPO recipe, top to bottom: a policy source (usually an SFT run), preference pairs, the
//! frozen reference (the starting policy, run without a graph, or its log-probs precomputed
//! once into the run dir), one concatenated forward of chosen and rejected per batch, a loss of
//! the DPO family ([`DpoLoss`]), and held-out exact match at the end.

use crate::losses::{dpo_loss, DpoLoss};
use crate::pairs::{pair_rows, scalar, sequence_logps, EncodedPair, PairDataConfig, PairRun};
use crate::{AlignError, Result};
use candle_core::{Device, Tensor};
use serde::{Deserialize, Serialize};
use std::path::Path;
use std::time::Instant;
use taper_data::sft::read_sft;
use taper_model::lora::LoraConfig;
use taper_model::{Decoder, Rng, Weights};
use taper_train::config::{TrainConfig, Validate};
use taper_train::finetune::{load_resume, resume_optimizer, trainable, Progress, Saver};
use taper_train::optim::{OptimConfig, Optimizer};
use taper_train::pretrain::{Observer, Resume, RunInfo, StepLog, Summary};
use taper_train::schedule::ScheduleConfig;
use taper_train::sft::{epoch_pick, exact_match, EvalConfig};
use taper_train::source::Source;
use taper_train::steps::{accumulate, guarded_update, Metrics};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DpoSettings {
    /// `{ kind = "sigmoid", label_smoothing = 0.0 }`, `{ kind = "ipo" }`, `{ kind = "hinge" }`
    /// or `{ kind = "simpo", gamma = 0.5 }` (reference-free).
    pub loss: DpoLoss,
    /// The strength of the implicit KL constraint (inverse temperature).
    pub beta: f64,
    /// RPO (Pang et al. 2024, "Iterative Reasoning Preference Optimization",
    /// <https://arxiv.org/abs/2404.19733>; TRL's `rpo_alpha`): adds alpha times the chosen
    /// responses' per-token NLL, so the chosen answers' likelihood cannot fall as DPO pushes
    /// the rejected ones down. 0 is plain DPO.
    pub rpo_alpha: f64,
    /// Compute the reference's log-probs of every pair once, into `ref_logps.safetensors` in
    /// the run dir, instead of a reference forward per step.
    pub precompute_ref: bool,
}

impl Default for DpoSettings {
    fn default() -> Self {
        Self { loss: DpoLoss::Sigmoid { label_smoothing: 0.0 }, beta: 0.1, rpo_alpha: 0.0, precompute_ref: false }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DpoConfig {
    pub seed: u64,
    pub device: String,
    /// The starting policy, also the reference: a checkpoint, run dir, HF dir or hf://Org/Name.
    pub init: String,
    pub data: PairDataConfig,
    pub dpo: DpoSettings,
    pub lora: Option<LoraConfig>,
    pub train: TrainConfig,
    pub optim: OptimConfig,
    pub schedule: ScheduleConfig,
    pub eval: EvalConfig,
}

impl Default for DpoConfig {
    fn default() -> Self {
        Self {
            seed: 1337,
            device: "auto".into(),
            init: String::new(),
            data: PairDataConfig::default(),
            dpo: DpoSettings::default(),
            lora: None,
            train: TrainConfig { batch_size: 8, eval_batches: 0, ..TrainConfig::default() },
            optim: OptimConfig { lr: 5e-6, weight_decay: 0.0, ..OptimConfig::default() },
            schedule: ScheduleConfig::default(),
            eval: EvalConfig::default(),
        }
    }
}

impl Validate for DpoConfig {
    fn validate(&self) -> Vec<String> {
        let mut e = Vec::new();
        if self.init.is_empty() {
            e.push("init: name the policy to start from (a checkpoint, run dir, HF dir or hf://Org/Name)".into());
        }
        e.extend(self.data.validate());
        if self.dpo.rpo_alpha < 0.0 {
            e.push(format!("dpo.rpo_alpha = {} must be >= 0", self.dpo.rpo_alpha));
        }
        if self.dpo.beta <= 0.0 {
            e.push(format!("dpo.beta = {} must be > 0", self.dpo.beta));
        }
        if self.dpo.precompute_ref && !self.dpo.loss.needs_reference() {
            e.push("dpo.precompute_ref: SimPO uses no reference".into());
        }
        if let Some(l) = &self.lora {
            e.extend(l.validate());
        }
        e.extend(self.optim.validate());
        e.extend(self.schedule.validate(self.train.max_steps));
        e
    }
}

impl DpoConfig {
    pub fn to_toml(&self) -> String {
        toml::to_string(self).expect("DpoConfig serialises to TOML")
    }
}

/// Policy log-probs of a batch of pairs: chosen and rejected, each (B,), length-averaged when
/// the loss asks for it, and the mean per-token NLL of the chosen responses (RPO's term). One
/// forward over 2B rows.
fn pair_logps(
    model: &Decoder,
    batch: &[&EncodedPair],
    pad: u32,
    average: bool,
    dev: &Device,
    rng: Option<&mut Rng>,
) -> Result<(Tensor, Tensor, Tensor)> {
    let rows = pair_rows(batch, pad);
    let (sums, counts) = sequence_logps(model, &rows, dev, rng)?; // (2B,)
    let b = batch.len();
    let chosen_tokens: usize = counts[..b].iter().sum();
    let nll = (sums.narrow(0, 0, b)?.sum_all()?.neg()? / chosen_tokens.max(1) as f64)?;
    let lp = if average {
        let n: Vec<f32> = counts.iter().map(|&c| c.max(1) as f32).collect();
        (sums / Tensor::from_vec(n, counts.len(), dev)?)?
    } else {
        sums
    };
    Ok((lp.narrow(0, 0, b)?, lp.narrow(0, b, b)?, nll))
}

/// Reference log-probs (chosen, rejected) of every pair, computed once, or read back from the
/// run dir when the same pairs were precomputed before (a resumed run).
fn precompute(
    reference: &Decoder,
    pairs: &[EncodedPair],
    pad: u32,
    average: bool,
    path: &Path,
    dev: &Device,
) -> Result<(Vec<f32>, Vec<f32>)> {
    if path.exists() {
        let t = candle_core::safetensors::load(path, dev)?;
        if let (Some(c), Some(r)) = (t.get("chosen"), t.get("rejected")) {
            if c.dims1()? == pairs.len() {
                return Ok((c.to_vec1()?, r.to_vec1()?));
            }
        }
    }
    let (mut c, mut r) = (Vec::new(), Vec::new());
    for chunk in pairs.chunks(16) {
        let batch: Vec<&EncodedPair> = chunk.iter().collect();
        let (lc, lr, _) = pair_logps(reference, &batch, pad, average, dev, None)?;
        c.extend(lc.to_vec1::<f32>()?);
        r.extend(lr.to_vec1::<f32>()?);
    }
    let map = std::collections::HashMap::from([
        ("chosen".to_string(), Tensor::new(c.as_slice(), dev)?),
        ("rejected".to_string(), Tensor::new(r.as_slice(), dev)?),
    ]);
    let tmp = path.with_extension("tmp");
    candle_core::safetensors::save(&map, &tmp)?;
    std::fs::rename(&tmp, path).map_err(|e| AlignError::Invalid(format!("{}: {e}", path.display())))?;
    Ok((c, r))
}

/// Held-out loss and reward statistics over pairs, without a graph.
struct PairEval {
    loss: f64,
    accuracy: f64,
    margin: f64,
    chosen: f64,
    rejected: f64,
}

fn eval_pairs(
    policy: &Decoder,
    reference: &Decoder,
    pairs: &[EncodedPair],
    s: &DpoSettings,
    pad: u32,
    dev: &Device,
) -> Result<PairEval> {
    let avg = s.loss.length_normalised();
    let (mut loss, mut acc, mut margin, mut chosen, mut rejected, mut n) = (0.0, 0.0, 0.0, 0.0, 0.0, 0.0);
    for chunk in pairs.chunks(16) {
        let batch: Vec<&EncodedPair> = chunk.iter().collect();
        let (pc, pr, _) = pair_logps(policy, &batch, pad, avg, dev, None)?;
        let refs = match s.loss.needs_reference() {
            true => Some(pair_logps(reference, &batch, pad, avg, dev, None)?),
            false => None,
        };
        let out = dpo_loss(s.loss, s.beta, &pc, &pr, refs.as_ref().map(|(a, b, _)| (a, b)))?;
        let k = batch.len() as f64;
        loss += scalar(&out.loss)? * k;
        acc += out.accuracy * k;
        margin += out.margin * k;
        chosen += out.chosen_rewards.iter().map(|&x| x as f64).sum::<f64>();
        rejected += out.rejected_rewards.iter().map(|&x| x as f64).sum::<f64>();
        n += k;
    }
    let n = f64::max(n, 1.0);
    Ok(PairEval { loss: loss / n, accuracy: acc / n, margin: margin / n, chosen: chosen / n, rejected: rejected / n })
}

/// Exact match of greedy answers on held-out prompts, logged and written to the metrics.
pub(crate) fn prompts_exact_match(
    model: &Decoder,
    src: &Source,
    template: &taper_data::chat::ChatTemplate,
    files: &[String],
    eval: &EvalConfig,
    obs: &mut dyn Observer,
) -> Result<Option<(usize, usize)>> {
    if files.is_empty() {
        return Ok(None);
    }
    let paths = taper_data::hub::resolve_data(files)?;
    let examples: Vec<_> =
        read_sft(&paths, taper_data::sft::OnBadRecord::Error)?.examples.into_iter().map(|e| e.example).collect();
    let (hits, total) = exact_match(model, src, template, &examples, eval.max_new_tokens, eval.max_examples)?;
    obs.message(&format!(
        "exact match on held-out prompts: {hits}/{total} = {:.1}%",
        100.0 * hits as f64 / total.max(1) as f64
    ));
    Ok(Some((hits, total)))
}

pub fn dpo(cfg: DpoConfig, run_dir: &Path, resume: Resume, obs: &mut dyn Observer) -> Result<Summary> {
    let started = Instant::now();
    let PairRun { device, ck_root, src, template, pad, train, eval } =
        PairRun::setup(&cfg.device, &cfg.init, &cfg.data, run_dir, obs)?;
    let ck = load_resume(&resume, &ck_root, &device)?;
    let (vars, weights) = trainable(&src, cfg.lora.as_ref(), cfg.seed, Vec::new(), ck.as_ref())?;
    let policy = Decoder::load(&weights, &src.config)?;
    let eval_policy = Decoder::load(&weights.detached(), &src.config)?;
    // The reference is the starting policy, frozen: detached weights never join a graph.
    let reference = Decoder::load(&Weights::new(src.weights.clone()).detached(), &src.config)?;
    let n_trainable: usize = vars.iter().map(|(_, v)| v.elem_count()).sum();
    let mut opt = Optimizer::new(cfg.optim.clone(), vars)?;
    let (mut step, mut tokens, mut skipped) = resume_optimizer(&mut opt, ck, obs)?;
    let s = &cfg.dpo;
    let avg = s.loss.length_normalised();
    let pre = if s.precompute_ref {
        let p = precompute(&reference, &train, pad, avg, &run_dir.join("ref_logps.safetensors"), &device)?;
        obs.message(&format!("reference log-probs of {} pairs precomputed", train.len()));
        Some(p)
    } else {
        None
    };

    PairRun::save_config(run_dir, &cfg.to_toml())?;
    let mut metrics = Metrics::open(run_dir, step, started)?;
    let tc = cfg.train.clone();
    let end = tc.end_step();
    obs.started(&RunInfo {
        start_step: step,
        end_step: end,
        params: n_trainable,
        vocab_size: src.config.vocab_size,
        train_tokens: train.iter().map(|p| p.chosen.len() + p.rejected.len()).sum(),
        val_tokens: 0,
        device: format!("{device:?}"),
    });
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
        let (mut acc, mut margin, mut chosen, mut rejected, mut step_tokens) = (0.0, 0.0, 0.0, 0.0, 0u64);
        let micro_n = tc.grad_accum_steps;
        let (loss, grads) = accumulate(opt.params(), micro_n, |micro| {
            let g = step * micro_n as u64 + micro as u64;
            let idx = epoch_pick(cfg.seed, train.len(), tc.batch_size, g);
            let batch: Vec<&EncodedPair> = idx.iter().map(|&i| &train[i]).collect();
            step_tokens += batch.iter().map(|p| (p.chosen.len() + p.rejected.len()) as u64).sum::<u64>();
            let mut rng = Rng::derive(cfg.seed, &[step, micro as u64]);
            let (pc, pr, nll) = pair_logps(&policy, &batch, pad, avg, &device, dropout.then_some(&mut rng))?;
            let refs = match (&pre, s.loss.needs_reference()) {
                (_, false) => None,
                (Some((c, r)), true) => {
                    let take = |v: &Vec<f32>| {
                        Tensor::from_vec(idx.iter().map(|&i| v[i]).collect::<Vec<f32>>(), idx.len(), &device)
                    };
                    Some((take(c)?, take(r)?))
                }
                (None, true) => {
                    let (c, r, _) = pair_logps(&reference, &batch, pad, avg, &device, None)?;
                    Some((c, r))
                }
            };
            let out = dpo_loss(s.loss, s.beta, &pc, &pr, refs.as_ref().map(|(a, b)| (a, b)))?;
            let k = micro_n as f64;
            acc += out.accuracy / k;
            margin += out.margin / k;
            chosen += out.chosen_rewards.iter().map(|&x| x as f64).sum::<f64>() / (batch.len() as f64 * k);
            rejected += out.rejected_rewards.iter().map(|&x| x as f64).sum::<f64>() / (batch.len() as f64 * k);
            Ok::<_, AlignError>(if s.rpo_alpha > 0.0 { (out.loss + (nll * s.rpo_alpha)?)? } else { out.loss })
        })?;
        let norm = guarded_update(&mut opt, grads, loss, lr, &tc, step, &mut skipped, obs)?;
        step += 1;
        tokens += step_tokens;
        metrics.add_tokens(step_tokens);
        last_loss = loss;
        let mut extra = serde_json::json!({"rewards/chosen": chosen, "rewards/rejected": rejected,
            "rewards/accuracy": acc, "rewards/margin": margin});
        let val_loss = if !eval.is_empty() && tc.eval_due(step) {
            let e = eval_pairs(&eval_policy, &reference, &eval, s, pad, &device)?;
            obs.message(&format!(
                "step {step}: held-out pairs loss {:.4}, reward accuracy {:.3}, margin {:.3}",
                e.loss, e.accuracy, e.margin
            ));
            extra["eval/rewards/accuracy"] = e.accuracy.into();
            extra["eval/rewards/margin"] = e.margin.into();
            extra["eval/rewards/chosen"] = e.chosen.into();
            extra["eval/rewards/rejected"] = e.rejected.into();
            last_val = Some(e.loss);
            Some(e.loss)
        } else {
            None
        };
        if step % tc.log_every == 0 || val_loss.is_some() || step == end {
            metrics.step(StepLog::new(step, loss, lr, norm, tokens, skipped, val_loss), Some(extra), obs)?;
        }
        if tc.checkpoint_due(step) {
            let at = Progress { step, tokens, skipped, val_loss: last_val };
            last_ck = Some(saver.save(&opt, cfg.to_toml(), at, None, obs)?);
        }
    }
    if let Some((hits, total)) = prompts_exact_match(&eval_policy, &src, &template, &cfg.data.prompts, &cfg.eval, obs)?
    {
        metrics.write(&serde_json::json!({"step": step, "exact_match": hits as f64 / total.max(1) as f64, "exact_match_n": total}))?;
    }
    Ok(Summary {
        step,
        train_loss: last_loss,
        val_loss: last_val,
        elapsed_s: started.elapsed().as_secs_f64(),
        checkpoint: last_ck,
    })
}
