//! The reward-model recipe, top to bottom: the decoder with a scalar head (`score.weight`, as
//! HF's `*ForSequenceClassification`) read at each sequence's last token, trained on preference
//! pairs with the Bradley-Terry loss, held-out pairwise accuracy as it goes.

use crate::losses::bradley_terry;
use crate::pairs::{pair_rows, scalar, EncodedPair, PairDataConfig, PairRun};
use crate::{AlignError, Result};
use candle_core::{Device, Tensor};
use serde::{Deserialize, Serialize};
use std::path::Path;
use std::time::Instant;
use taper_data::chat::ChatTemplate;
use taper_data::packing::{collate, Row};
use taper_data::sft::{EncodeOptions, Example, OnBadRecord, Overflow, SftEncoder};
use taper_model::lora::LoraConfig;
use taper_model::{Decoder, Rng, Weights};
use taper_train::config::{TrainConfig, Validate};
use taper_train::finetune::{load_resume, resume_optimizer, trainable_except, Progress, Saver};
use taper_train::optim::{OptimConfig, Optimizer};
use taper_train::pretrain::{Observer, Resume, RunInfo, StepLog, Summary};
use taper_train::schedule::ScheduleConfig;
use taper_train::sft::epoch_pick;
use taper_train::source::Source;
use taper_train::steps::{accumulate, guarded_update, Metrics};

/// The reward head's name: HF's sequence-classification head.
pub const SCORE: &str = "score.weight";

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RmSettings {
    /// Reward centering (Eisenstein et al. 2023): adds coef * mean((r_chosen + r_rejected)^2).
    pub center_coef: f64,
    /// Subtract each record's `margin` (when it has one) inside the sigmoid (Llama 2's margin loss).
    pub use_margin: bool,
}

impl Default for RmSettings {
    fn default() -> Self {
        Self { center_coef: 0.0, use_margin: true }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RmConfig {
    pub seed: u64,
    pub device: String,
    /// The model to start from (usually the SFT policy): checkpoint, run dir, HF dir, hf://.
    pub init: String,
    pub data: PairDataConfig,
    pub rm: RmSettings,
    pub lora: Option<LoraConfig>,
    pub train: TrainConfig,
    pub optim: OptimConfig,
    pub schedule: ScheduleConfig,
}

impl Default for RmConfig {
    fn default() -> Self {
        Self {
            seed: 1337,
            device: "auto".into(),
            init: String::new(),
            data: PairDataConfig::default(),
            rm: RmSettings::default(),
            lora: None,
            train: TrainConfig { batch_size: 8, ..TrainConfig::default() },
            optim: OptimConfig { lr: 1e-5, weight_decay: 0.0, ..OptimConfig::default() },
            schedule: ScheduleConfig::default(),
        }
    }
}

impl Validate for RmConfig {
    fn validate(&self) -> Vec<String> {
        let mut e = Vec::new();
        if self.init.is_empty() {
            e.push("init: name the model to start from (a checkpoint, run dir, HF dir or hf://Org/Name)".into());
        }
        e.extend(self.data.validate());
        if let Some(l) = &self.lora {
            e.extend(l.validate());
        }
        e.extend(self.optim.validate());
        e.extend(self.schedule.validate(self.train.max_steps));
        e
    }
}

impl RmConfig {
    pub fn to_toml(&self) -> String {
        toml::to_string(self).expect("RmConfig serialises to TOML")
    }
}

/// Scalar rewards (N,) for rows holding one sequence each: the head applied to the final
/// hidden state of each sequence's last token.
pub fn rewards(model: &Decoder, score: &Tensor, rows: &[Row], dev: &Device, rng: Option<&mut Rng>) -> Result<Tensor> {
    let b = collate(rows)?;
    let ids = Tensor::from_vec(b.input_ids.clone(), (b.rows, b.seq_len), dev)?;
    let h = model.forward_hidden_packed(&ids, &b.position_ids, &b.segment_ids, rng)?; // (N, T, C)
    let c = h.dim(2)?;
    let last: Vec<u32> = (0..b.rows)
        .map(|r| {
            let n = b.segment_ids[r * b.seq_len..(r + 1) * b.seq_len].iter().filter(|&&s| s > 0).count();
            (r * b.seq_len + n.max(1) - 1) as u32
        })
        .collect();
    let idx = Tensor::from_vec(last, b.rows, dev)?;
    let h_last = h.reshape((b.rows * b.seq_len, c))?.index_select(&idx, 0)?; // (N, C)
    Ok(h_last.matmul(&score.t()?)?.squeeze(1)?) // (N,)
}

/// The ids a reward model scores for one example: encoded as `taper rm` encodes a pair's side,
/// keeping the newest `max` tokens.
pub fn reward_ids(enc: &SftEncoder, example: &Example, max: usize) -> Result<Vec<u32>> {
    let mut ids = enc.encode(example)?.input_ids;
    if ids.len() > max {
        ids.drain(..ids.len() - max);
    }
    Ok(ids)
}

/// A trained reward model, loaded for scoring (PPO's reward, evaluation).
pub struct RewardModel {
    pub src: Source,
    model: Decoder,
    score: Tensor,
    /// Renders prompt + response as the reward model's training pairs were rendered.
    template: ChatTemplate,
}

impl RewardModel {
    pub fn load(spec: &str, template: ChatTemplate, dev: &Device) -> Result<Self> {
        let src = taper_train::source::load(spec, dev)?;
        let score = src.weights.get(SCORE).cloned().ok_or_else(|| {
            AlignError::Invalid(format!("{spec}: not a reward model (no `{SCORE}` head; train one with `taper rm`)"))
        })?;
        let model = Decoder::load(&Weights::new(src.weights.clone()).detached(), &src.config)?;
        Ok(Self { src, model, score, template })
    }

    /// Rewards of prompts answered with responses, each encoded exactly as `taper rm` encodes a
    /// pair's side: the full conversation through the template, so the reward is read at the
    /// same final token (the template's text after the end-of-turn marker included) as in
    /// training. Sampled ids would end at the stop token instead, where the head never learned.
    /// Too long a sequence loses its oldest tokens, as an RL prompt does.
    pub fn score_examples(&self, examples: &[Example], pad: u32) -> Result<Vec<f32>> {
        let opts = EncodeOptions {
            max_len: None,
            overflow: Overflow::Truncate,
            train_on_all: false,
            on_bad: OnBadRecord::Error,
        };
        let enc = SftEncoder::new(&self.src.tokenizer, &self.template, opts)?;
        let max = self.src.config.block_size;
        let seqs = examples.iter().map(|e| reward_ids(&enc, e, max)).collect::<Result<Vec<_>>>()?;
        self.score(&seqs, pad)
    }

    /// Rewards of tokenised sequences, in batches.
    pub fn score(&self, seqs: &[Vec<u32>], pad: u32) -> Result<Vec<f32>> {
        let mut out = Vec::with_capacity(seqs.len());
        for chunk in seqs.chunks(16) {
            let len = chunk.iter().map(Vec::len).max().unwrap_or(1);
            let rows: Vec<Row> = chunk
                .iter()
                .enumerate()
                .map(|(i, s)| {
                    let t = taper_data::sft::Tokenized { input_ids: s.clone(), labels: vec![-100; s.len()] };
                    let mut row = Row::default();
                    row.push(i, &t);
                    row.pad_to(len, pad);
                    row
                })
                .collect();
            out.extend(rewards(&self.model, &self.score, &rows, self.model.device(), None)?.to_vec1::<f32>()?);
        }
        Ok(out)
    }
}

fn margins(batch: &[&EncodedPair], use_margin: bool, dev: &Device) -> Result<Option<Tensor>> {
    if !use_margin || batch.iter().all(|p| p.margin.is_none()) {
        return Ok(None);
    }
    let m: Vec<f32> = batch.iter().map(|p| p.margin.unwrap_or(0.0) as f32).collect();
    Ok(Some(Tensor::from_vec(m, batch.len(), dev)?))
}

/// (loss, accuracy, margin) over held-out pairs.
fn eval_pairs(
    model: &Decoder,
    score: &Tensor,
    pairs: &[EncodedPair],
    s: &RmSettings,
    pad: u32,
) -> Result<(f64, f64, f64)> {
    let (mut loss, mut acc, mut margin, mut n) = (0.0, 0.0, 0.0, 0.0);
    for chunk in pairs.chunks(16) {
        let batch: Vec<&EncodedPair> = chunk.iter().collect();
        let r = rewards(model, score, &pair_rows(&batch, pad), model.device(), None)?;
        let k = batch.len();
        let m = margins(&batch, s.use_margin, model.device())?;
        let out = bradley_terry(&r.narrow(0, 0, k)?, &r.narrow(0, k, k)?, m.as_ref(), s.center_coef)?;
        loss += scalar(&out.loss)? * k as f64;
        acc += out.accuracy * k as f64;
        margin += out.margin * k as f64;
        n += k as f64;
    }
    let n = f64::max(n, 1.0);
    Ok((loss / n, acc / n, margin / n))
}

pub fn rm(cfg: RmConfig, run_dir: &Path, resume: Resume, obs: &mut dyn Observer) -> Result<Summary> {
    let started = Instant::now();
    let PairRun { device, ck_root, src, pad, train, eval, .. } =
        PairRun::setup(&cfg.device, &cfg.init, &cfg.data, run_dir, obs)?;
    let ck = load_resume(&resume, &ck_root, &device)?;
    // A reward model as `init` goes on with its own head (another round of training on new
    // pairs); otherwise a fresh head as HF initialises one: normal(0, 0.02), from our seeded RNG.
    let c = src.config.n_embd;
    let head = match src.weights.get(SCORE) {
        Some(h) if h.dims() == [1, c] => h.detach(),
        Some(h) => {
            return Err(AlignError::Invalid(format!(
                "{}: `{SCORE}` has shape {:?}, expected [1, {c}]",
                cfg.init,
                h.dims()
            )))
        }
        None => {
            let mut rng = Rng::derive(cfg.seed, &[0x5343_4F52]);
            let head: Vec<f32> = (0..c).map(|_| (rng.normal() * 0.02) as f32).collect();
            Tensor::from_vec(head, (1, c), &device)?
        }
    };
    let heads = vec![(SCORE.to_string(), head)];
    // The LM head plays no part in a reward: it stays as it was.
    let frozen = ["lm_head.weight"];
    let (vars, weights) = trainable_except(&src, cfg.lora.as_ref(), cfg.seed, heads, ck.as_ref(), &frozen)?;
    let score =
        vars.iter().find(|(n, _)| n == SCORE).map(|(_, v)| v.as_tensor().clone()).expect("the head is trainable");
    let model = Decoder::load(&weights, &src.config)?;
    let eval_model = Decoder::load(&weights.detached(), &src.config)?;
    let n_trainable: usize = vars.iter().map(|(_, v)| v.elem_count()).sum();
    let mut opt = Optimizer::new(cfg.optim.clone(), vars)?;
    let (mut step, mut tokens, mut skipped) = resume_optimizer(&mut opt, ck, obs)?;
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
        heads: &[SCORE],
        frozen: &frozen,
    };
    while step < end {
        let lr = cfg.schedule.lr(step, cfg.optim.lr, tc.max_steps);
        let (mut acc, mut margin, mut step_tokens) = (0.0, 0.0, 0u64);
        let micro_n = tc.grad_accum_steps;
        let (loss, grads) = accumulate(opt.params(), micro_n, |micro| {
            let g = step * micro_n as u64 + micro as u64;
            let idx = epoch_pick(cfg.seed, train.len(), tc.batch_size, g);
            let batch: Vec<&EncodedPair> = idx.iter().map(|&i| &train[i]).collect();
            step_tokens += batch.iter().map(|p| (p.chosen.len() + p.rejected.len()) as u64).sum::<u64>();
            let mut rng = Rng::derive(cfg.seed, &[step, micro as u64]);
            let r = rewards(&model, &score, &pair_rows(&batch, pad), &device, dropout.then_some(&mut rng))?;
            let k = batch.len();
            let m = margins(&batch, cfg.rm.use_margin, &device)?;
            let out = bradley_terry(&r.narrow(0, 0, k)?, &r.narrow(0, k, k)?, m.as_ref(), cfg.rm.center_coef)?;
            acc += out.accuracy / micro_n as f64;
            margin += out.margin / micro_n as f64;
            Ok::<_, AlignError>(out.loss)
        })?;
        let norm = guarded_update(&mut opt, grads, loss, lr, &tc, step, &mut skipped, obs)?;
        step += 1;
        tokens += step_tokens;
        metrics.add_tokens(step_tokens);
        last_loss = loss;
        let mut extra = serde_json::json!({"accuracy": acc, "margin": margin});
        let val_loss = if !eval.is_empty() && tc.eval_due(step) {
            let (l, a, m) = eval_pairs(&eval_model, &score.detach(), &eval, &cfg.rm, pad)?;
            obs.message(&format!("step {step}: held-out pairs loss {l:.4}, accuracy {a:.3}, margin {m:.3}"));
            extra["eval/accuracy"] = a.into();
            extra["eval/margin"] = m.into();
            last_val = Some(l);
            Some(l)
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
    use taper_data::chat::{Message, Role};
    use taper_data::preference::Prompt;

    /// A rollout's ids stop at the end-of-turn token, but `taper rm` trained the head on the
    /// full rendered turn (ChatML's newline after `<|im_end|>` included): the reward model must
    /// read that, one token past the sampled ids, or it scores at a token it never learned.
    #[test]
    fn reward_ids_are_the_rendered_turn_not_the_sampled_ids() -> Result<()> {
        let dir = std::env::temp_dir().join(format!("taper-rm-ids-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let text = dir.join("t.txt");
        std::fs::write(&text, "abcdefghijklmnopqrstuvwxyz: AB\n").unwrap();
        let specials: Vec<String> = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"].map(String::from).to_vec();
        let tok = taper_data::tokenizer::train(taper_data::tokenizer::TokenizerKind::Char, &[text], 0, &specials)?;
        let template = ChatTemplate::chatml();
        let prompt = Prompt::Chat(vec![Message::new(Role::User, "upper: ab")]);
        let opts = EncodeOptions {
            max_len: None,
            overflow: Overflow::Truncate,
            train_on_all: false,
            on_bad: OnBadRecord::Error,
        };
        let enc = SftEncoder::new(&tok, &template, opts)?;
        let id = |t: &str| tok.token_to_id(t).unwrap();
        let prompt_ids = tok.encode(prompt.render(&template)?.as_str(), false).unwrap().get_ids().to_vec();
        let sampled = [prompt_ids.as_slice(), &[id("A"), id("B"), id("<|im_end|>")]].concat();
        let ids = reward_ids(&enc, &prompt.with_response("AB"), 64)?;
        assert_eq!(ids, [sampled.as_slice(), &[id("\n")]].concat());
        // Too long: the oldest tokens go, the scored end stays.
        assert_eq!(reward_ids(&enc, &prompt.with_response("AB"), 5)?, ids[ids.len() - 5..]);
        std::fs::remove_dir_all(&dir).ok();
        Ok(())
    }
}
