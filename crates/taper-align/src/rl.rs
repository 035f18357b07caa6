//! What the RL recipes (PPO, GRPO) share: prompt data, rollouts with the KV cache and sampling,
//! rewards (a reward model or a verifiable check against the prompt's answer), per-token
//! log-probs of the sampled responses, and the held-out evaluation.

use crate::losses::whiten;
use crate::pairs::shifted;
use crate::rm::RewardModel;
use crate::{AlignError, Result};
use candle_core::{DType, Device, Tensor, D};
use serde::{Deserialize, Serialize};
use serde_json::Map;
use std::rc::Rc;
use taper_data::chat::ChatTemplate;
use taper_data::packing::{collate, Row};
use taper_data::preference::{read_prompts, Prompt};
use taper_data::sft::{Example, OnBadRecord, Tokenized, IGNORE_INDEX};
use taper_dist::Comm;
use taper_model::lora::LoraConfig;
use taper_model::{nn, Decoder, Rng, Sampling, Weights};
use taper_train::chat::stop_ids;
use taper_train::checkpoint::Contents;
use taper_train::finetune::{self, trainable};
use taper_train::multiple_choice::{prefix_id, McModel, TaskEval};
use taper_train::observe::Observer;
use taper_train::order::epoch_pick;
use taper_train::rules::Rules;
use taper_train::source::Source;
use taper_train::trainer::{Env, Evaluation, Micro, Params, Plan, Recipe, StepReport};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PromptDataConfig {
    /// Prompt records (`prompt`, optional `answer`) or SFT records, JSONL or Parquet.
    pub train: Vec<String>,
    /// Held-out prompts: mean reward of greedy answers (and exact match when they have answers).
    pub eval: Vec<String>,
    /// "stop" or "skip" on a bad record.
    pub on_bad_record: String,
    /// A prompt leaving no room for `max_new_tokens` in the context: "truncate" it from the
    /// left (TRL's truncation side) or "drop" it; either is counted.
    pub overflow: String,
    pub chat_template: Option<String>,
}

impl Default for PromptDataConfig {
    fn default() -> Self {
        Self {
            train: Vec::new(),
            eval: Vec::new(),
            on_bad_record: "stop".into(),
            overflow: "truncate".into(),
            chat_template: None,
        }
    }
}

impl PromptDataConfig {
    pub fn validate(&self) -> Vec<String> {
        let mut e = Rules::new();
        if self.train.is_empty() {
            e.push("data.train: give one or more prompt files");
        }
        e.one_of("data.on_bad_record", &self.on_bad_record, &["stop", "skip"]);
        e.one_of("data.overflow", &self.overflow, &["truncate", "drop"]);
        e.into_vec()
    }
}

/// Sampling for rollouts.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RolloutConfig {
    pub max_new_tokens: usize,
    pub temperature: f64,
    pub top_k: usize,
    pub top_p: f64,
    /// Sampled answers per held-out prompt for the policy's mean reward (0: greedy only).
    pub eval_samples: usize,
}

impl Default for RolloutConfig {
    fn default() -> Self {
        Self { max_new_tokens: 32, temperature: 1.0, top_k: 0, top_p: 1.0, eval_samples: 0 }
    }
}

impl RolloutConfig {
    pub fn validate(&self) -> Vec<String> {
        let mut e = Rules::new();
        e.at_least_one("rollout.max_new_tokens", self.max_new_tokens as u64);
        // RL samples: greedy rollouts never explore.
        e.positive("rollout.temperature", self.temperature);
        e.open_unit("rollout.top_p", self.top_p, true);
        e.into_vec()
    }
}

/// Where rewards come from.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum RewardSpec {
    /// 1 when the response (trimmed) equals the prompt's `answer`, else 0.
    #[default]
    ExactMatch,
    /// 1 when the response matches the regular expression, else 0.
    Regex { pattern: String },
    /// 1 - |length - target| / target in characters: a response-length target.
    Length { target: usize },
    /// A reward model trained by `taper rm` (its tokenizer must be the policy's).
    Model { path: String },
}

impl RewardSpec {
    pub fn validate(&self) -> Vec<String> {
        let mut e = Rules::new();
        match self {
            RewardSpec::Regex { pattern } => {
                if let Err(err) = regex::Regex::new(pattern) {
                    let why = err.to_string().split_whitespace().collect::<Vec<_>>().join(" ");
                    e.push(format!("reward.pattern = {pattern:?}: not a regular expression ({why})"));
                }
            }
            RewardSpec::Length { target } => e.at_least_one("reward.target", *target as u64),
            RewardSpec::Model { path } => e.required("reward.path", path, "the reward model (a `taper rm` run)"),
            RewardSpec::ExactMatch => {}
        }
        e.into_vec()
    }
}

/// A loaded reward: the spec's parts made ready.
pub enum Reward {
    ExactMatch,
    Regex(regex::Regex),
    Length(usize),
    Model(Box<RewardModel>),
}

impl Reward {
    /// `template` renders prompt + response for a reward model (the RL run's own).
    pub fn load(spec: &RewardSpec, policy: &Source, template: ChatTemplate, dev: &Device) -> Result<Self> {
        Ok(match spec {
            RewardSpec::ExactMatch => Reward::ExactMatch,
            RewardSpec::Regex { pattern } => Reward::Regex(
                regex::Regex::new(pattern).map_err(|e| AlignError::Invalid(format!("reward.pattern: {e}")))?,
            ),
            RewardSpec::Length { target } if *target == 0 => {
                return Err(AlignError::Invalid("reward.target must be > 0".into()))
            }
            RewardSpec::Length { target } => Reward::Length(*target),
            RewardSpec::Model { path } => {
                let rm = RewardModel::load(path, template, dev)?;
                if rm.src.tokenizer.get_vocab(true) != policy.tokenizer.get_vocab(true) {
                    return Err(AlignError::Invalid(format!(
                        "reward model {path}: its tokenizer ({} tokens) differs from the policy's ({} tokens); \
                         a reward model must read the policy's token ids",
                        rm.src.tokenizer.get_vocab_size(true),
                        policy.tokenizer.get_vocab_size(true)
                    )));
                }
                Reward::Model(Box::new(rm))
            }
        })
    }

    /// Rewards of rollouts (each prompt ids + response ids, the response's text, the answer).
    pub fn score(&self, rollouts: &[Rollout], prompts: &[RlPrompt], pad: u32) -> Result<Vec<f32>> {
        Ok(match self {
            Reward::ExactMatch => rollouts
                .iter()
                .map(|r| match &prompts[r.prompt].answer {
                    Some(a) => f32::from(u8::from(r.text.trim() == a.trim())),
                    None => 0.0,
                })
                .collect(),
            Reward::Regex(re) => rollouts.iter().map(|r| f32::from(u8::from(re.is_match(&r.text)))).collect(),
            Reward::Length(t) => {
                rollouts.iter().map(|r| 1.0 - (r.text.chars().count() as f32 - *t as f32).abs() / *t as f32).collect()
            }
            Reward::Model(rm) => {
                let examples: Vec<Example> =
                    rollouts.iter().map(|r| prompts[r.prompt].prompt.with_response(&r.text)).collect();
                rm.score_examples(&examples, pad)?
            }
        })
    }
}

/// A tokenised prompt and its reference answer.
#[derive(Debug, Clone)]
pub struct RlPrompt {
    pub ids: Vec<u32>,
    pub answer: Option<String>,
    /// The record's prompt, so that a reward model reads prompt + response rendered as in its
    /// own training pairs.
    pub prompt: Prompt,
}

/// Reads, renders and tokenises prompt files; prompts too long for `max_new` new tokens in the
/// context are truncated from the left or dropped, and counted.
pub fn load_prompts(
    paths: &[String],
    src: &Source,
    template: &ChatTemplate,
    cfg: &PromptDataConfig,
    max_new: usize,
    obs: &mut dyn Observer,
) -> Result<Vec<RlPrompt>> {
    let files = taper_data::hub::resolve_data(paths)?;
    let on_bad = if cfg.on_bad_record == "skip" { OnBadRecord::Skip } else { OnBadRecord::Error };
    let data = read_prompts(&files, on_bad)?;
    let room = src.config.block_size.checked_sub(max_new).filter(|&r| r > 0).ok_or_else(|| {
        AlignError::Invalid(format!(
            "rollout.max_new_tokens = {max_new} leaves no room for a prompt in the context of {}",
            src.config.block_size
        ))
    })?;
    let (mut out, mut truncated, mut dropped) = (Vec::new(), 0, 0);
    for rec in &data.examples {
        let text = rec.example.prompt.render(template)?;
        let enc = taper_data::tokenizer::encode(&src.tokenizer, text.as_str(), false)
            .map_err(|e| AlignError::Invalid(format!("{}:{}: {e}", rec.path, rec.line)))?;
        let mut ids = enc.get_ids().to_vec();
        if ids.is_empty() {
            return Err(AlignError::Invalid(format!("{}:{}: the prompt is empty", rec.path, rec.line)));
        }
        if ids.len() > room {
            if cfg.overflow == "drop" {
                dropped += 1;
                continue;
            }
            ids.drain(..ids.len() - room);
            truncated += 1;
        }
        out.push(RlPrompt { ids, answer: rec.example.answer.clone(), prompt: rec.example.prompt.clone() });
    }
    obs.message(&format!(
        "{}: {} prompts ({} skipped as bad records, {} truncated and {} dropped as longer than {room} tokens)",
        paths.join(", "),
        out.len(),
        data.skipped,
        truncated,
        dropped
    ));
    Ok(out)
}

/// One sampled response.
#[derive(Debug, Clone)]
pub struct Rollout {
    /// Index into the prompts.
    pub prompt: usize,
    /// Response ids, with the stop token when one ended it.
    pub response: Vec<u32>,
    /// The response's text without stop tokens.
    pub text: String,
}

/// Samples one response per (prompt index, rng), in batches on the model's device.
///
/// Each response draws from its own rng, so rollouts stay reproducible and a resumed run draws
/// what the uninterrupted one did; they are not those of one-at-a-time generation, though
/// (padding changes float sums, and the draw runs on the device in f32).
pub fn rollouts(
    model: &Decoder,
    src: &Source,
    prompts: &[RlPrompt],
    which: &[(usize, Rng)],
    sampling: &Sampling,
    max_new: usize,
) -> Result<Vec<Rollout>> {
    let stop = stop_ids(src);
    let mut rows: Vec<(&[u32], Rng)> = which.iter().map(|(p, rng)| (prompts[*p].ids.as_slice(), rng.clone())).collect();
    let responses = model.generate_in_batches(&mut rows, max_new, sampling, &stop)?;
    which
        .iter()
        .zip(responses)
        .map(|((p, _), response)| {
            let kept: Vec<u32> = response.iter().copied().filter(|t| !stop.contains(t)).collect();
            let text = taper_data::tokenizer::decode(&src.tokenizer, &kept)?;
            Ok(Rollout { prompt: *p, response, text })
        })
        .collect()
}

/// Rows of prompt + response, labels on the response, padded to one length.
pub fn rollout_rows(rollouts: &[Rollout], prompts: &[RlPrompt], pad: u32) -> Vec<Row> {
    let seqs: Vec<Tokenized> = rollouts
        .iter()
        .map(|r| {
            let p = &prompts[r.prompt].ids;
            let mut labels = vec![IGNORE_INDEX; p.len()];
            labels.extend(r.response.iter().map(|&t| i64::from(t)));
            Tokenized { input_ids: [p.as_slice(), &r.response].concat(), labels }
        })
        .collect();
    let len = seqs.iter().map(Tokenized::len).max().unwrap_or(1);
    seqs.iter()
        .enumerate()
        .map(|(i, t)| {
            let mut row = Row::default();
            row.push(i, t);
            row.pad_to(len, pad);
            row
        })
        .collect()
}

/// Per-token outputs of a forward over rollout rows: log-probs of the response tokens (N, T),
/// their mask (N, T) (position t predicts token t + 1), the final hidden states (N, T, C),
/// and the logits (N, T, V).
pub struct TokenOut {
    pub logp: Tensor,
    pub mask: Tensor,
    pub hidden: Tensor,
    pub logits: Tensor,
}

pub fn token_forward(model: &Decoder, rows: &[Row], dev: &Device, rng: Option<&mut Rng>) -> Result<TokenOut> {
    let b = collate(rows)?;
    let ids = Tensor::from_vec(b.input_ids.clone(), (b.rows, b.seq_len), dev)?;
    let hidden = model.forward_hidden_packed(&ids, &b.position_ids, &b.segment_ids, rng)?; // (N, T, C)
    let logits = model.head(&hidden)?; // (N, T, V)
    let (targets, mask, _) = shifted(&b.labels, b.rows, b.seq_len);
    let targets = Tensor::from_vec(targets, (b.rows, b.seq_len, 1), dev)?;
    let logp = nn::log_softmax(&logits)?.gather(&targets, 2)?.squeeze(2)?; // (N, T)
    let mask = Tensor::from_vec(mask, (b.rows, b.seq_len), dev)?.to_dtype(logp.dtype())?;
    Ok(TokenOut { logp, mask, hidden, logits })
}

/// Mean entropy of the policy's next-token distribution over response positions (a metric).
pub fn mean_entropy(logits: &Tensor, mask: &Tensor) -> Result<f64> {
    let (total, n) = entropy_sum(logits, mask)?;
    Ok(total / n.max(1.0))
}

/// The entropy summed over response positions, and their count: for a mean over micro-batches.
pub fn entropy_sum(logits: &Tensor, mask: &Tensor) -> Result<(f64, f64)> {
    let logits = logits.detach();
    let lp = nn::log_softmax(&logits)?;
    let ent = (lp.exp()? * &lp)?.sum(D::Minus1)?.neg()?; // (N, T)
    let total = (ent * mask)?.sum_all()?.to_dtype(DType::F64)?;
    let n = mask.sum_all()?.to_dtype(DType::F64)?;
    let v = taper_model::host::values(&Tensor::stack(&[total, n], 0)?)?;
    Ok((v[0], v[1]))
}

/// The response-token mask (N, T) of `rows` as [`token_forward`] returns it, without a forward.
pub fn response_mask(rows: &[Row], dev: &Device) -> Result<Tensor> {
    let b = collate(rows)?;
    let (_, mask, _) = shifted(&b.labels, b.rows, b.seq_len);
    Ok(Tensor::from_vec(mask, (b.rows, b.seq_len), dev)?)
}

/// A held-out evaluation: greedy answers' mean reward and exact match, and the policy's mean
/// reward over sampled answers (what RL maximises) when asked for.
#[derive(Debug, Clone)]
pub struct Eval {
    pub greedy_reward: f64,
    pub hits: usize,
    pub with_answers: usize,
    pub sampled_reward: Option<f64>,
    /// The share of sampled answers that equal the reference answer: the task's own reward,
    /// tracked beside a reward model's so that reward hacking shows.
    pub sampled_exact_match: Option<f64>,
    /// Exact match of the best-rewarded sample per prompt: whether the reward picks the right
    /// answer out of the policy's own samples (best-of-n), the signal RL climbs.
    pub best_of_n_exact_match: Option<f64>,
}

impl Eval {
    /// The metrics keys and the progress line of this evaluation at `step`.
    pub fn report(&self, step: u64, extra: &mut Map<String, serde_json::Value>, obs: &mut dyn Observer) {
        let em = self.hits as f64 / self.with_answers.max(1) as f64;
        extra.insert("eval/reward".into(), self.greedy_reward.into());
        extra.insert("eval/exact_match".into(), em.into());
        let sampled = match self.sampled_reward {
            Some(r) => {
                extra.insert("eval/sampled_reward".into(), r.into());
                format!(", sampled mean reward {r:.4}")
            }
            None => String::new(),
        };
        let sampled = match self.sampled_exact_match {
            Some(m) => {
                extra.insert("eval/sampled_exact_match".into(), m.into());
                format!("{sampled}, sampled exact match {m:.4}")
            }
            None => sampled,
        };
        let sampled = match self.best_of_n_exact_match {
            Some(m) => {
                extra.insert("eval/best_of_n_exact_match".into(), m.into());
                format!("{sampled}, best-of-n exact match {m:.4}")
            }
            None => sampled,
        };
        obs.message(&format!(
            "step {step}: held-out mean reward {:.4} (exact match {}/{}){sampled}",
            self.greedy_reward, self.hits, self.with_answers
        ));
    }
}

/// Greedy answers to held-out prompts, and `samples` sampled ones per prompt (fixed seeds, so
/// every evaluation draws alike).
pub fn evaluate(
    model: &Decoder,
    src: &Source,
    prompts: &[RlPrompt],
    reward: &Reward,
    rollout: &RolloutConfig,
    pad: u32,
) -> Result<Eval> {
    let mean = |r: &[f32]| r.iter().map(|&x| x as f64).sum::<f64>() / r.len().max(1) as f64;
    let greedy = Sampling { temperature: 0.0, ..Default::default() };
    let which: Vec<(usize, Rng)> = (0..prompts.len()).map(|i| (i, Rng::new(0))).collect();
    let outs = rollouts(model, src, prompts, &which, &greedy, rollout.max_new_tokens)?;
    let greedy_reward = mean(&reward.score(&outs, prompts, pad)?);
    let with_answers = prompts.iter().filter(|p| p.answer.is_some()).count();
    let right = |r: &Rollout| prompts[r.prompt].answer.as_deref().is_some_and(|a| a.trim() == r.text.trim());
    let hits = outs.iter().filter(|r| right(r)).count();
    let (sampled_reward, sampled_exact_match, best_of_n_exact_match) = if rollout.eval_samples > 0 {
        let s = Sampling { temperature: rollout.temperature, top_k: rollout.top_k, top_p: rollout.top_p };
        let which: Vec<(usize, Rng)> = (0..prompts.len())
            .flat_map(|i| (0..rollout.eval_samples).map(move |k| (i, Rng::derive(0x4556_414C, &[i as u64, k as u64]))))
            .collect();
        let outs = rollouts(model, src, prompts, &which, &s, rollout.max_new_tokens)?;
        let answered: Vec<&Rollout> = outs.iter().filter(|r| prompts[r.prompt].answer.is_some()).collect();
        let em =
            (!answered.is_empty()).then(|| answered.iter().filter(|r| right(r)).count() as f64 / answered.len() as f64);
        let rewards = reward.score(&outs, prompts, pad)?;
        // Samples come grouped by prompt; the first of equal rewards wins.
        let n = rollout.eval_samples;
        let best = outs.chunks(n).zip(rewards.chunks(n)).filter(|(o, _)| prompts[o[0].prompt].answer.is_some());
        let (mut picked, mut right_picks) = (0usize, 0usize);
        for (o, r) in best {
            let k = (1..n).fold(0, |b, k| if r[k] > r[b] { k } else { b });
            picked += 1;
            right_picks += usize::from(right(&o[k]));
        }
        let best = (picked > 0).then(|| right_picks as f64 / picked as f64);
        (Some(mean(&rewards)), em, best)
    } else {
        (None, None, None)
    };
    Ok(Eval { greedy_reward, hits, with_answers, sampled_reward, sampled_exact_match, best_of_n_exact_match })
}

/// The settings both RL configs have, which [`RlCore::build`] reads.
pub struct RlSettings<'a> {
    pub init: &'a str,
    pub data: &'a PromptDataConfig,
    pub rollout: &'a RolloutConfig,
    pub reward: &'a RewardSpec,
    pub lora: Option<&'a LoraConfig>,
    pub seed: u64,
    /// `eval.tasks`: multiple-choice task files scored by the policy at each evaluation.
    pub tasks: &'a [String],
    pub checkpointing: taper_model::ActivationCheckpointing,
}

/// The [`RlSettings`] of a PPO or GRPO config, whose shared sections go by the same names.
macro_rules! rl_settings {
    ($cfg:expr) => {
        $crate::rl::RlSettings {
            init: &$cfg.init,
            data: &$cfg.data,
            rollout: &$cfg.rollout,
            reward: &$cfg.reward,
            lora: $cfg.lora.as_ref(),
            seed: $cfg.seed,
            tasks: &$cfg.eval.tasks,
            checkpointing: $cfg.train.activation_checkpointing,
        }
    };
}
pub(crate) use rl_settings;

impl RlSettings<'_> {
    /// The rules PPO and GRPO share: a policy to start from, valid prompt data, rollouts,
    /// reward, `eval.tasks` and LoRA, and no `train.eval_batches` (every held-out prompt is
    /// evaluated).
    pub fn validate(&self, recipe: &str, train: &taper_train::config::TrainConfig) -> Vec<String> {
        let mut e = Rules::new();
        e.required("init", self.init, "the policy to start from");
        e.extend(taper_train::multiple_choice::validate_paths("eval.tasks", self.tasks));
        e.extend(self.data.validate());
        e.extend(self.rollout.validate());
        e.extend(self.reward.validate());
        if train.eval_batches > 0 {
            e.push(format!(
                "train.eval_batches = {}: {recipe} evaluates every prompt of data.eval; leave it unset",
                train.eval_batches
            ));
        }
        if let Some(l) = self.lora {
            e.extend(l.validate());
        }
        e.into_vec()
    }
}

/// What both RL recipes hold: the policy being trained, its detached twin (rollouts and old
/// log-probs record no graph), the frozen reference, the prompts, the reward and how to sample.
pub struct RlCore {
    pub policy: Decoder,
    pub frozen: Decoder,
    pub reference: Decoder,
    pub dropout: bool,
    pub rollout: RolloutConfig,
    pub seed: u64,
    pub src: Source,
    pub template: ChatTemplate,
    pub train: Vec<RlPrompt>,
    pub eval: Vec<RlPrompt>,
    pub reward: Reward,
    pub pad: u32,
    /// The replicas: each samples its share of a step's prompts.
    pub comm: Rc<dyn Comm>,
    pub tasks: TaskEval,
    /// lm_eval's empty-context token for the tasks.
    pub prefix_id: u32,
}

/// What an RL algorithm (PPO, GRPO) supplies over the rollouts, reward and evaluation it
/// shares with the others ([`RlCore`]): a step's plan (its rollouts and what its updates
/// read), the loss of a micro-batch, its metrics, and any state of its own.
pub trait RlAlgorithm {
    fn plan(&mut self, core: &RlCore, step: u64, accum: usize) -> Result<Plan>;
    fn loss(&mut self, core: &RlCore, at: Micro) -> Result<Tensor>;
    fn end_step(&mut self, step: u64) -> Result<StepReport>;
    fn state(&self) -> Option<serde_json::Value> {
        None
    }
    fn restore(&mut self, _state: &serde_json::Value) -> Result<()> {
        Ok(())
    }
}

/// An RL recipe: the shared machinery and an algorithm.
pub struct Rl<A> {
    pub core: RlCore,
    pub algorithm: A,
}

impl<A: RlAlgorithm> Recipe for Rl<A> {
    type Error = AlignError;
    const SCORE_NAME: &'static str = "held-out reward";

    fn plan(&mut self, step: u64, accum: usize) -> Result<Plan> {
        self.algorithm.plan(&self.core, step, accum)
    }

    fn loss(&mut self, at: Micro) -> Result<Tensor> {
        self.algorithm.loss(&self.core, at)
    }

    fn end_step(&mut self, step: u64) -> Result<StepReport> {
        self.algorithm.end_step(step)
    }

    fn samples(&mut self, _step: u64, prompts: &[String], max_new: usize) -> Result<Vec<(String, String)>> {
        let c = &self.core;
        let defaults = c.eval.iter().chain(&c.train).map(|p| p.prompt.clone());
        Ok(taper_train::chat::samples(&c.frozen, &c.src, &c.template, prompts, defaults, max_new)?)
    }

    fn evaluate(&mut self, step: u64, obs: &mut dyn Observer) -> Result<Evaluation> {
        self.core.evaluate(step, obs)
    }

    /// The starting policy's reward, the baseline the run is judged against.
    fn evaluates_at_start(&self) -> bool {
        !self.core.eval.is_empty()
    }

    fn state(&self) -> Option<serde_json::Value> {
        self.algorithm.state()
    }

    fn restore(&mut self, state: &serde_json::Value) -> Result<()> {
        self.algorithm.restore(state)
    }
}

/// A step's rollouts: responses, their scores, and rows of prompt + response.
pub struct Sampled {
    pub outs: Vec<Rollout>,
    pub scores: Vec<f32>,
    pub rows: Vec<Row>,
    pub tokens: u64,
    pub response_length: f64,
}

impl RlCore {
    /// The policy from `s.init` (full or LoRA) with the trained `heads` that `make_heads`
    /// draws; returns the core, the trainable parameters and what checkpoints hold.
    pub fn build(
        s: RlSettings,
        make_heads: impl FnOnce(&Source, &candle_core::Device) -> Result<Vec<(String, Tensor)>>,
        env: &mut Env,
    ) -> Result<(Self, Params, Contents)> {
        let src = taper_train::source::load(s.init, &env.device)?;
        src.expect_kind(taper_model::ModelKind::Decoder)?;
        let template = taper_train::chat::template_for(s.data.chat_template.as_deref(), &src)?;
        let pad = src.eos_ids.first().copied().unwrap_or(0);
        let max_new = s.rollout.max_new_tokens;
        let train = load_prompts(&s.data.train, &src, &template, s.data, max_new, env.obs)?;
        if train.is_empty() {
            return Err(AlignError::Invalid("no prompts left after reading and tokenising".into()));
        }
        let eval = match s.data.eval.is_empty() {
            true => Vec::new(),
            false => load_prompts(&s.data.eval, &src, &template, s.data, max_new, env.obs)?,
        };
        let heads = make_heads(&src, &env.device)?;
        let head_names: Vec<String> = heads.iter().map(|(n, _)| n.clone()).collect();
        let (params, weights) = trainable(&src, s.lora, s.seed, heads, env.checkpoint)?;
        let names: Vec<&str> = head_names.iter().map(String::as_str).collect();
        let contents = finetune::contents(&src, &template, s.lora, s.init, &names, &[]);
        // A template of its own (templates are not Clone): the reward model renders with it.
        let reward_template = taper_train::chat::template_for(s.data.chat_template.as_deref(), &src)?;
        let reward = Reward::load(s.reward, &src, reward_template, &env.device)?;
        let tasks = TaskEval::load(s.tasks)?;
        let prefix_id = if tasks.is_empty() { 0 } else { prefix_id(&src)? };
        let core = Self {
            tasks,
            prefix_id,
            policy: Decoder::load(&weights, &src.config)?.with_checkpointing(s.checkpointing),
            frozen: Decoder::load(&weights.detached(), &src.config)?,
            reference: Decoder::load(&Weights::new(src.weights.clone()).detached(), &src.config)?,
            dropout: finetune::uses_dropout(&src, s.lora),
            rollout: s.rollout.clone(),
            seed: s.seed,
            src,
            template,
            train,
            eval,
            reward,
            pad,
            comm: env.dist.clone(),
        };
        Ok((core, params, contents))
    }

    /// This rank's share of step `step`'s rollouts from the current policy: of `per_step`
    /// training prompts (a fresh order each epoch), the rank's equal share, `copies` responses
    /// each, response i of the step sampled from the stream (seed, step, i, salt), whichever
    /// rank samples it; scored by the reward.
    pub fn sample(&self, step: u64, per_step: usize, copies: usize, salt: u64) -> Result<Sampled> {
        let (rank, world) = (self.comm.rank(), self.comm.world());
        if !per_step.is_multiple_of(world) {
            return Err(AlignError::Invalid(format!(
                "{per_step} prompts a step do not split evenly over {world} replicas: make the prompts per step a \
                 multiple of the number of processes"
            )));
        }
        let picked = epoch_pick(self.seed, self.train.len(), per_step, step);
        let share = per_step / world;
        let which: Vec<(usize, Rng)> = picked
            .iter()
            .flat_map(|&p| std::iter::repeat_n(p, copies))
            .enumerate()
            .skip(rank * share * copies)
            .take(share * copies)
            .map(|(i, p)| (p, Rng::derive(self.seed, &[step, i as u64, salt])))
            .collect();
        let r = &self.rollout;
        let outs = rollouts(&self.frozen, &self.src, &self.train, &which, &sampling(r), r.max_new_tokens)?;
        let scores = self.reward.score(&outs, &self.train, self.pad)?;
        let rows = rollout_rows(&outs, &self.train, self.pad);
        let tokens = rows.iter().map(|r| r.segment_ids.iter().filter(|&&s| s > 0).count() as u64).sum();
        let response_length = outs.iter().map(|o| o.response.len() as f64).sum::<f64>() / outs.len().max(1) as f64;
        Ok(Sampled { outs, scores, rows, tokens, response_length })
    }

    /// The held-out evaluation at `step`: greedy and sampled rewards reported, the sampled
    /// mean reward (or the greedy one) as the score.
    pub fn evaluate(&self, step: u64, obs: &mut dyn Observer) -> Result<Evaluation> {
        let (mut metrics, mut score) = (Map::new(), None);
        if !self.eval.is_empty() {
            let e = evaluate(&self.frozen, &self.src, &self.eval, &self.reward, &self.rollout, self.pad)?;
            e.report(step, &mut metrics, obs);
            score = Some(e.sampled_reward.unwrap_or(e.greedy_reward));
        }
        let m = McModel { model: &self.frozen, tokenizer: &self.src.tokenizer, prefix_id: self.prefix_id };
        self.tasks.add_metrics(&m, &mut metrics)?;
        Ok(Evaluation { loss: None, score, metrics, samples: Vec::new() })
    }
}

/// Sums over the replicas, in place.
pub fn sum_across(comm: &dyn Comm, xs: &mut [f64]) -> Result<()> {
    comm.all_reduce_sum_f64(xs).map_err(|e| AlignError::Invalid(e.to_string()))
}

/// The mean and standard deviation of values spread over the replicas.
pub fn mean_std_across(comm: &dyn Comm, r: &[f32]) -> Result<(f64, f64)> {
    if comm.world() == 1 {
        return Ok(mean_std(r));
    }
    let mut m = [r.len() as f64, r.iter().map(|&x| x as f64).sum(), r.iter().map(|&x| (x as f64).powi(2)).sum()];
    sum_across(comm, &mut m)?;
    let mean = m[1] / m[0].max(1.0);
    Ok((mean, (m[2] / m[0].max(1.0) - mean * mean).max(0.0).sqrt()))
}

/// [`whiten`] over values spread across the replicas: the masked mean and unbiased variance
/// of all of them, in whiten's two passes.
pub fn whiten_across(comm: &dyn Comm, xs: &[f32], mask: &[f32], shift_mean: bool) -> Result<Vec<f32>> {
    if comm.world() == 1 {
        return whiten(xs, mask, shift_mean);
    }
    let mut m = [mask.iter().map(|&m| m as f64).sum(), xs.iter().zip(mask).map(|(&x, &m)| x as f64 * m as f64).sum()];
    sum_across(comm, &mut m)?;
    let (count, mean) = (m[0], m[1] / m[0]);
    if count <= 1.0 {
        return Err(AlignError::Invalid(format!(
            "whiten: the mask sums to {count}; the unbiased variance needs more than 1"
        )));
    }
    let mut v = [xs.iter().zip(mask).map(|(&x, &m)| (x as f64 - mean).powi(2) * m as f64).sum::<f64>()];
    sum_across(comm, &mut v)?;
    let var = v[0] / count * count / (count - 1.0);
    let scale = 1.0 / (var + 1e-8).sqrt();
    let back = if shift_mean { 0.0 } else { mean };
    Ok(xs.iter().map(|&x| ((x as f64 - mean) * scale + back) as f32).collect())
}

/// The mean and standard deviation of a step's rewards.
pub fn mean_std(r: &[f32]) -> (f64, f64) {
    let n = r.len().max(1) as f64;
    let mean = r.iter().map(|&x| x as f64).sum::<f64>() / n;
    (mean, (r.iter().map(|&x| (x as f64 - mean).powi(2)).sum::<f64>() / n).sqrt())
}

/// A JSON object's map (`json!({...})` of the metrics a step reports).
pub fn object(v: serde_json::Value) -> Map<String, serde_json::Value> {
    match v {
        serde_json::Value::Object(m) => m,
        other => Map::from_iter([("value".to_string(), other)]),
    }
}

/// The sampling settings of rollouts.
pub fn sampling(r: &RolloutConfig) -> Sampling {
    Sampling { temperature: r.temperature, top_k: r.top_k, top_p: r.top_p }
}

/// The rollouts of an RL step, `batch` rows per forward, `accum` forwards per optimizer
/// update: which rollouts each update's micro-batch holds. The rollouts are shuffled afresh
/// for each epoch by `seed`.
pub struct Minibatches {
    /// Per epoch, the rollout order.
    orders: Vec<Vec<usize>>,
    batch: usize,
    accum: usize,
}

impl Minibatches {
    pub fn new(n: usize, epochs: usize, batch: usize, accum: usize, shuffle: impl Fn(usize) -> Option<Rng>) -> Self {
        let orders = (0..epochs)
            .map(|e| {
                let mut order: Vec<usize> = (0..n).collect();
                if let Some(mut rng) = shuffle(e) {
                    rng.shuffle(&mut order);
                }
                order
            })
            .collect();
        Self { orders, batch, accum }
    }

    /// Optimizer updates per epoch.
    pub fn per_epoch(&self) -> usize {
        self.orders.first().map_or(0, |o| o.len() / (self.batch * self.accum))
    }

    /// Updates in all.
    pub fn updates(&self) -> usize {
        self.per_epoch() * self.orders.len()
    }

    /// Micro-batch `micro` of update `update`: its (epoch, forward within the epoch), the
    /// indices of its rollouts as a tensor (to pick their rows of per-rollout tensors), and
    /// their rows.
    pub fn micro(&self, update: usize, micro: usize, rows: &[Row], dev: &Device) -> Result<MicroRows> {
        let (epoch, u) = (update / self.per_epoch(), update % self.per_epoch());
        let slot = u * self.accum + micro;
        let chunk = &self.orders[epoch][slot * self.batch..(slot + 1) * self.batch];
        let idx = Tensor::from_vec(chunk.iter().map(|&i| i as u32).collect::<Vec<u32>>(), chunk.len(), dev)?;
        Ok(MicroRows { epoch, slot, idx, rows: chunk.iter().map(|&i| rows[i].clone()).collect() })
    }
}

/// One micro-batch of an RL step's rollouts.
pub struct MicroRows {
    pub epoch: usize,
    /// The forward's place within its epoch.
    pub slot: usize,
    /// The rollouts' indices, (N,).
    pub idx: Tensor,
    pub rows: Vec<Row>,
}

impl MicroRows {
    /// Its dropout stream: (seed, step, epoch, slot).
    pub fn dropout_rng(&self, seed: u64, step: u64) -> Rng {
        Rng::derive(seed, &[step, self.epoch as u64, self.slot as u64])
    }
}

/// The rule the RL recipes put on `train.batch_size` and `train.grad_accum_steps`: an epoch
/// over a step's `n` rollouts splits into whole updates of batch x accumulation rollouts.
pub fn minibatch_rules(recipe: &str, what: &str, n: usize, train: &taper_train::config::TrainConfig) -> Vec<String> {
    let per_update = train.batch_size * train.grad_accum_steps;
    if per_update == 0 || n.is_multiple_of(per_update) {
        return Vec::new();
    }
    vec![format!(
        "train.batch_size = {}: {recipe} trains on {what} = {n} rollouts per step, which must split into whole \
         optimizer updates of train.batch_size x train.grad_accum_steps = {per_update} rollouts (rows per \
         forward x forwards per update)",
        train.batch_size
    )]
}
