//! The reward-model recipe, top to bottom: the decoder with a scalar head (`score.weight`, as
//! HF's `*ForSequenceClassification`) read at each sequence's last token, trained on preference
//! pairs with the Bradley-Terry loss, held-out pairwise accuracy as it goes.

use crate::losses::bradley_terry;
use crate::pairs::{pair_rows, scalar, EncodedPair, PairDataConfig, PairRun};
use crate::{AlignError, Result};
use candle_core::{Device, Tensor};
use serde::{Deserialize, Serialize};
use serde_json::Map;
use taper_data::chat::ChatTemplate;
use taper_data::packing::{collate, Row};
use taper_data::sft::{EncodeOptions, Example, OnBadRecord, Overflow, SftEncoder};
use taper_model::lora::LoraConfig;
use taper_model::{Decoder, Rng, Weights};
use taper_train::config::{LogConfig, RecipeConfig, TrainConfig};
use taper_train::finetune::{self, trainable_except};
use taper_train::loop_fields;
use taper_train::observe::{Observer, Summary};
use taper_train::optim::OptimConfig;
use taper_train::order::epoch_pick;
use taper_train::rules::Rules;
use taper_train::schedule::ScheduleConfig;
use taper_train::source::Source;
use taper_train::trainer::{self, Built, Evaluation, Micro, Recipe, RunSpec, StepReport};

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
    pub log: LogConfig,
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
            train: TrainConfig { batch_size: 8, eval_batches: 0, ..TrainConfig::default() },
            optim: OptimConfig { lr: 1e-5, weight_decay: 0.0, ..OptimConfig::default() },
            schedule: ScheduleConfig::default(),
            log: LogConfig::default(),
        }
    }
}

impl RecipeConfig for RmConfig {
    const RECIPE: &'static str = "rm";

    loop_fields!();

    fn validate(&self) -> Vec<String> {
        let mut e = Rules::new();
        e.required("init", &self.init, "the model to start from (a checkpoint, run dir, HF dir or hf://Org/Name)");
        e.extend(self.data.validate());
        e.non_negative("rm.center_coef", self.rm.center_coef);
        if let Some(l) = &self.lora {
            e.extend(l.validate());
        }
        e.into_vec()
    }

    fn free_on_resume(&self) -> &'static [&'static str] {
        &["data.eval"]
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
    batch: usize,
) -> Result<(f64, f64, f64)> {
    let (mut loss, mut acc, mut margin, mut n) = (0.0, 0.0, 0.0, 0.0);
    for chunk in pairs.chunks(batch) {
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

/// Trains a reward model from `cfg.init` on preference pairs.
pub fn rm(cfg: RmConfig, run: RunSpec, obs: &mut dyn Observer) -> Result<Summary> {
    trainer::train(cfg, run, obs, |cfg, env| {
        let (eval_batches, batch) = (cfg.train.eval_batches, cfg.train.batch_size);
        let PairRun { src, template, pad, train, eval } =
            PairRun::setup(&cfg.init, &cfg.data, eval_batches, batch, env)?;
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
                Tensor::from_vec(head, (1, c), &env.device)?
            }
        };
        let heads = vec![(SCORE.to_string(), head)];
        // The LM head plays no part in a reward: it stays as it was.
        let frozen = ["lm_head.weight"];
        let lora = cfg.lora.as_ref();
        let (params, weights) = trainable_except(&src, lora, cfg.seed, heads, env.checkpoint, &frozen)?;
        let score = params.iter().find(|(n, _)| n == SCORE).map(|(_, v)| v.as_tensor().clone()).expect("trainable");
        let recipe = Rm {
            model: Decoder::load(&weights, &src.config)?.with_checkpointing(cfg.train.activation_checkpointing),
            eval_model: Decoder::load(&weights.detached(), &src.config)?,
            score,
            dropout: finetune::uses_dropout(&src, lora),
            train,
            eval,
            pad,
            settings: cfg.rm.clone(),
            seed: cfg.seed,
            batch,
            acc: 0.0,
            margin: 0.0,
            tokens: 0,
        };
        let (vocab_size, train_tokens) = (src.config.vocab_size, recipe.train.iter().map(EncodedPair::tokens).sum());
        let contents = finetune::contents(&src, &template, lora, &cfg.init, &[SCORE], &frozen);
        Ok(Built { recipe, params, contents, vocab_size, train_tokens, val_tokens: 0 })
    })
}

struct Rm {
    model: Decoder,
    eval_model: Decoder,
    /// The trained head, (1, C).
    score: Tensor,
    dropout: bool,
    train: Vec<EncodedPair>,
    eval: Vec<EncodedPair>,
    pad: u32,
    settings: RmSettings,
    seed: u64,
    batch: usize,
    /// The step's mean pairwise accuracy and margin so far.
    acc: f64,
    margin: f64,
    tokens: u64,
}

impl Recipe for Rm {
    type Error = AlignError;
    const SCORE_NAME: &'static str = "eval loss";

    fn loss(&mut self, at: Micro) -> Result<Tensor> {
        let idx = epoch_pick(self.seed, self.train.len(), self.batch, at.global());
        let batch: Vec<&EncodedPair> = idx.iter().map(|&i| &self.train[i]).collect();
        self.tokens += batch.iter().map(|p| p.tokens() as u64).sum::<u64>();
        let mut rng = at.dropout_rng(self.seed);
        let dev = self.model.device().clone();
        let r =
            rewards(&self.model, &self.score, &pair_rows(&batch, self.pad), &dev, self.dropout.then_some(&mut rng))?;
        let k = batch.len();
        let m = margins(&batch, self.settings.use_margin, &dev)?;
        let out = bradley_terry(&r.narrow(0, 0, k)?, &r.narrow(0, k, k)?, m.as_ref(), self.settings.center_coef)?;
        self.acc += out.accuracy / at.count as f64;
        self.margin += out.margin / at.count as f64;
        Ok(out.loss)
    }

    fn end_step(&mut self, _step: u64) -> Result<StepReport> {
        let mut metrics = Map::new();
        metrics.insert("accuracy".into(), std::mem::take(&mut self.acc).into());
        metrics.insert("margin".into(), std::mem::take(&mut self.margin).into());
        Ok(StepReport { tokens: std::mem::take(&mut self.tokens), metrics, device_metrics: None })
    }

    fn evaluate(&mut self, step: u64, obs: &mut dyn Observer) -> Result<Evaluation> {
        if self.eval.is_empty() {
            return Ok(Evaluation::default());
        }
        let (l, a, m) =
            eval_pairs(&self.eval_model, &self.score.detach(), &self.eval, &self.settings, self.pad, self.batch)?;
        obs.message(&format!("step {step}: held-out pairs loss {l:.4}, accuracy {a:.3}, margin {m:.3}"));
        let mut e = Evaluation::of_loss(l);
        e.metrics.insert("eval/accuracy".into(), a.into());
        e.metrics.insert("eval/margin".into(), m.into());
        Ok(e)
    }
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
