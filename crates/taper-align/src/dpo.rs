//! The DPO recipe, top to bottom: a policy source (usually an SFT run), preference pairs, the
//! frozen reference (the starting policy, run without a graph, or its log-probs precomputed
//! once into the run dir), one concatenated forward of chosen and rejected per batch, a loss of
//! the DPO family ([`DpoLoss`]), and held-out exact match at the end.

use crate::losses::{dpo_loss, DpoLoss, DpoOut};
use crate::pairs::{pair_rows, scalar, sequence_logps, EncodedPair, PairDataConfig, PairRun};
use crate::{AlignError, Result};
use candle_core::{Device, Tensor};
use serde::{Deserialize, Serialize};
use serde_json::Map;
use std::path::Path;
use taper_data::chat::ChatTemplate;
use taper_data::sft::{read_sft, Example};
use taper_model::lora::LoraConfig;
use taper_model::{Decoder, Rng, Weights};
use taper_train::chat::{self, exact_match};
use taper_train::config::{LogConfig, RecipeConfig, TrainConfig};
use taper_train::finetune::{self, trainable};
use taper_train::fingerprint::Fingerprint;
use taper_train::loop_fields;
use taper_train::multiple_choice::{prefix_id, McModel, TaskEval};
use taper_train::observe::{Observer, Summary};
use taper_train::optim::OptimConfig;
use taper_train::order::epoch_pick;
use taper_train::rules::Rules;
use taper_train::schedule::ScheduleConfig;
use taper_train::sft::{exact_match_line, EvalConfig};
use taper_train::source::Source;
use taper_train::trainer::{self, Built, Evaluation, Micro, Recipe, RunSpec, StepReport};

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
    pub log: LogConfig,
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
            log: LogConfig::default(),
            eval: EvalConfig::default(),
        }
    }
}

impl RecipeConfig for DpoConfig {
    const RECIPE: &'static str = "dpo";

    loop_fields!();

    fn validate(&self) -> Vec<String> {
        let mut e = Rules::new();
        e.required("init", &self.init, "the policy to start from (a checkpoint, run dir, HF dir or hf://Org/Name)");
        e.extend(self.data.validate());
        e.non_negative("dpo.rpo_alpha", self.dpo.rpo_alpha);
        e.positive("dpo.beta", self.dpo.beta);
        match self.dpo.loss {
            DpoLoss::Sigmoid { label_smoothing } => e.unit("dpo.loss.label_smoothing", label_smoothing, false),
            DpoLoss::Simpo { gamma } => e.non_negative("dpo.loss.gamma", gamma),
            DpoLoss::Ipo | DpoLoss::Hinge => {}
        }
        if self.dpo.precompute_ref && !self.dpo.loss.needs_reference() {
            e.push("dpo.precompute_ref: SimPO uses no reference");
        }
        if let Some(l) = &self.lora {
            e.extend(l.validate());
        }
        e.extend(taper_train::multiple_choice::validate_paths("eval.tasks", &self.eval.tasks));
        e.into_vec()
    }

    fn free_on_resume(&self) -> &'static [&'static str] {
        &["eval.", "data.eval", "data.prompts"]
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

/// Reference log-probs (chosen, rejected) of every pair, computed once into `path`, or read
/// back when that file was computed from the same reference weights, the same pairs (their
/// token ids, so the files, template and tokenizer) and the same averaging; else recomputed.
fn precompute(
    reference: &Source,
    model: &Decoder,
    pairs: &[EncodedPair],
    pad: u32,
    average: bool,
    path: &Path,
    obs: &mut dyn Observer,
) -> Result<(Vec<f32>, Vec<f32>)> {
    let dev = model.device();
    let mut f = Fingerprint::new();
    f.tensors("reference", &reference.weights)?.text("average", &average.to_string());
    for p in pairs {
        f.ids("chosen", p.chosen.input_ids.iter().map(|&t| i64::from(t)).chain(p.chosen.labels.iter().copied()));
        f.ids("rejected", p.rejected.input_ids.iter().map(|&t| i64::from(t)).chain(p.rejected.labels.iter().copied()));
    }
    let key = f.hex();
    let key_path = path.with_extension("key");
    if path.exists() {
        if std::fs::read_to_string(&key_path).is_ok_and(|k| k.trim() == key) {
            let t = candle_core::safetensors::load(path, dev)?;
            if let (Some(c), Some(r)) = (t.get("chosen"), t.get("rejected")) {
                return Ok((c.to_vec1()?, r.to_vec1()?));
            }
        }
        obs.message(&format!(
            "{}: computed from other pairs, another reference or another loss; computing it again",
            path.display()
        ));
    }
    let (mut c, mut r) = (Vec::new(), Vec::new());
    for chunk in pairs.chunks(16) {
        let batch: Vec<&EncodedPair> = chunk.iter().collect();
        let (lc, lr, _) = pair_logps(model, &batch, pad, average, dev, None)?;
        c.extend(lc.to_vec1::<f32>()?);
        r.extend(lr.to_vec1::<f32>()?);
    }
    let map = std::collections::HashMap::from([
        ("chosen".to_string(), Tensor::new(c.as_slice(), dev)?),
        ("rejected".to_string(), Tensor::new(r.as_slice(), dev)?),
    ]);
    let io = |p: &Path| {
        let at = p.display().to_string();
        move |e: std::io::Error| AlignError::Invalid(format!("{at}: {e}"))
    };
    // The key goes last: a crash in between leaves a cache that is computed again.
    let _ = std::fs::remove_file(&key_path);
    let tmp = path.with_extension("tmp");
    candle_core::safetensors::save(&map, &tmp)?;
    std::fs::rename(&tmp, path).map_err(io(path))?;
    std::fs::write(&key_path, &key).map_err(io(&key_path))?;
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
    batch: usize,
) -> Result<PairEval> {
    let avg = s.loss.length_normalised();
    let dev = policy.device();
    let (mut loss, mut acc, mut margin, mut chosen, mut rejected, mut n) = (0.0, 0.0, 0.0, 0.0, 0.0, 0.0);
    for chunk in pairs.chunks(batch) {
        let batch: Vec<&EncodedPair> = chunk.iter().collect();
        let (pc, pr, _) = pair_logps(policy, &batch, pad, avg, dev, None)?;
        let refs = match s.loss.needs_reference() {
            true => Some(pair_logps(reference, &batch, pad, avg, dev, None)?),
            false => None,
        };
        let out = dpo_loss(s.loss, s.beta, &pc, &pr, refs.as_ref().map(|(a, b, _)| (a, b)))?;
        let k = batch.len() as f64;
        let st = out.stats.to_vec1::<f64>()?;
        loss += scalar(&out.loss)? * k;
        acc += st[0] * k;
        margin += st[1] * k;
        chosen += st[2] * k;
        rejected += st[3] * k;
        n += k;
    }
    let n = f64::max(n, 1.0);
    Ok(PairEval { loss: loss / n, accuracy: acc / n, margin: margin / n, chosen: chosen / n, rejected: rejected / n })
}

/// Held-out prompts with reference answers, read for exact match after training.
fn read_prompts(files: &[String]) -> Result<Vec<Example>> {
    if files.is_empty() {
        return Ok(Vec::new());
    }
    let paths = taper_data::hub::resolve_data(files)?;
    Ok(read_sft(&paths, taper_data::sft::OnBadRecord::Error)?.examples.into_iter().map(|e| e.example).collect())
}

/// Trains the policy `cfg.init` on preference pairs with a loss of the DPO family.
pub fn dpo(cfg: DpoConfig, run: RunSpec, obs: &mut dyn Observer) -> Result<Summary> {
    trainer::train(cfg, run, obs, |cfg, env| {
        let (eval_batches, batch) = (cfg.train.eval_batches, cfg.train.batch_size);
        let PairRun { src, template, pad, train, eval } =
            PairRun::setup(&cfg.init, &cfg.data, eval_batches, batch, env)?;
        let lora = cfg.lora.as_ref();
        let (params, weights) = trainable(&src, lora, cfg.seed, Vec::new(), env.checkpoint)?;
        // The reference is the starting policy, frozen: detached weights never join a graph.
        let reference = Decoder::load(&Weights::new(src.weights.clone()).detached(), &src.config)?;
        let s = cfg.dpo.clone();
        let precomputed = if s.precompute_ref {
            let path = env.run_dir.join("ref_logps.safetensors");
            let average = s.loss.length_normalised();
            let p = precompute(&src, &reference, &train, pad, average, &path, env.obs)?;
            env.obs.message(&format!("reference log-probs of {} pairs precomputed", train.len()));
            Some(p)
        } else {
            None
        };
        let tasks = TaskEval::load(&cfg.eval.tasks)?;
        let prefix_id = if tasks.is_empty() { 0 } else { prefix_id(&src)? };
        let recipe = Dpo {
            tasks,
            prefix_id,
            policy: Decoder::load(&weights, &src.config)?.with_checkpointing(cfg.train.activation_checkpointing),
            eval_policy: Decoder::load(&weights.detached(), &src.config)?,
            reference,
            precomputed,
            dropout: finetune::uses_dropout(&src, lora),
            prompts: read_prompts(&cfg.data.prompts)?,
            template,
            train,
            eval,
            pad,
            settings: s,
            eval_settings: cfg.eval.clone(),
            seed: cfg.seed,
            batch,
            stats: None,
            tokens: 0,
            contents_src: src,
        };
        let (vocab_size, train_tokens) =
            (recipe.contents_src.config.vocab_size, recipe.train.iter().map(EncodedPair::tokens).sum());
        let contents = finetune::contents(&recipe.contents_src, &recipe.template, lora, &cfg.init, &[], &[]);
        Ok(Built { recipe, params, contents, vocab_size, train_tokens, val_tokens: 0 })
    })
}

struct Dpo {
    /// `eval.tasks`, scored by the policy at each evaluation.
    tasks: TaskEval,
    prefix_id: u32,
    policy: Decoder,
    eval_policy: Decoder,
    reference: Decoder,
    /// Reference log-probs (chosen, rejected) of every training pair, when precomputed.
    precomputed: Option<(Vec<f32>, Vec<f32>)>,
    dropout: bool,
    /// Held-out prompts for exact match after the last step.
    prompts: Vec<Example>,
    template: ChatTemplate,
    train: Vec<EncodedPair>,
    eval: Vec<EncodedPair>,
    pad: u32,
    settings: DpoSettings,
    eval_settings: EvalConfig,
    seed: u64,
    batch: usize,
    /// The step's implicit-reward statistics ([`DpoOut::STATS`]), averaged over its
    /// micro-batches on the device.
    stats: Option<Tensor>,
    tokens: u64,
    contents_src: Source,
}

impl Recipe for Dpo {
    type Error = AlignError;
    const SCORE_NAME: &'static str = "eval loss";

    fn loss(&mut self, at: Micro) -> Result<Tensor> {
        let s = &self.settings;
        let avg = s.loss.length_normalised();
        let dev = self.policy.device().clone();
        let idx = epoch_pick(self.seed, self.train.len(), self.batch, at.global());
        let batch: Vec<&EncodedPair> = idx.iter().map(|&i| &self.train[i]).collect();
        self.tokens += batch.iter().map(|p| p.tokens() as u64).sum::<u64>();
        let mut rng = at.dropout_rng(self.seed);
        let (pc, pr, nll) = pair_logps(&self.policy, &batch, self.pad, avg, &dev, self.dropout.then_some(&mut rng))?;
        let refs = match (&self.precomputed, s.loss.needs_reference()) {
            (_, false) => None,
            (Some((c, r)), true) => {
                let take =
                    |v: &Vec<f32>| Tensor::from_vec(idx.iter().map(|&i| v[i]).collect::<Vec<f32>>(), idx.len(), &dev);
                Some((take(c)?, take(r)?))
            }
            (None, true) => {
                let (c, r, _) = pair_logps(&self.reference, &batch, self.pad, avg, &dev, None)?;
                Some((c, r))
            }
        };
        let out = dpo_loss(s.loss, s.beta, &pc, &pr, refs.as_ref().map(|(a, b)| (a, b)))?;
        let share = (&out.stats / at.count as f64)?;
        self.stats = Some(match self.stats.take() {
            Some(st) => (st + share)?,
            None => share,
        });
        Ok(if s.rpo_alpha > 0.0 { (out.loss + (nll * s.rpo_alpha)?)? } else { out.loss })
    }

    fn end_step(&mut self, _step: u64) -> Result<StepReport> {
        let device_metrics = self.stats.take().map(|t| (DpoOut::STATS.to_vec(), t));
        Ok(StepReport { tokens: std::mem::take(&mut self.tokens), metrics: Map::new(), device_metrics })
    }

    fn samples(&mut self, _step: u64, prompts: &[String], max_new: usize) -> Result<Vec<(String, String)>> {
        let src = &self.contents_src;
        Ok(chat::samples(&self.eval_policy, src, &self.template, prompts, chat::prompts_of(&self.prompts), max_new)?)
    }

    fn evaluate(&mut self, step: u64, obs: &mut dyn Observer) -> Result<Evaluation> {
        let mut out = Evaluation::default();
        if !self.eval.is_empty() {
            let e = eval_pairs(&self.eval_policy, &self.reference, &self.eval, &self.settings, self.pad, self.batch)?;
            obs.message(&format!(
                "step {step}: held-out pairs loss {:.4}, reward accuracy {:.3}, margin {:.3}",
                e.loss, e.accuracy, e.margin
            ));
            out = Evaluation::of_loss(e.loss);
            out.metrics.insert("eval/rewards/accuracies".into(), e.accuracy.into());
            out.metrics.insert("eval/rewards/margins".into(), e.margin.into());
            out.metrics.insert("eval/rewards/chosen".into(), e.chosen.into());
            out.metrics.insert("eval/rewards/rejected".into(), e.rejected.into());
        }
        let m =
            McModel { model: &self.eval_policy, tokenizer: &self.contents_src.tokenizer, prefix_id: self.prefix_id };
        self.tasks.add_metrics(&m, &mut out.metrics)?;
        Ok(out)
    }

    fn finish(&mut self, _step: u64, obs: &mut dyn Observer) -> Result<Option<Map<String, serde_json::Value>>> {
        if self.prompts.is_empty() {
            return Ok(None);
        }
        let e = &self.eval_settings;
        let (hits, total) = exact_match(
            &self.eval_policy,
            &self.contents_src,
            &self.template,
            &self.prompts,
            e.max_new_tokens,
            e.max_examples,
        )?;
        Ok(Some(exact_match_line(hits, total, obs)))
    }
}
