//! Preference pairs for the reward-model and DPO recipes: config, reading, tokenising with the
//! response mask, batching chosen and rejected into one forward, and sequence log-probs.

use crate::{AlignError, Result};
use candle_core::{DType, Device, Tensor, D};
use serde::{Deserialize, Serialize};
use taper_data::chat::ChatTemplate;
use taper_data::packing::{collate, Row};
use taper_data::preference::{read_pairs, Pair};
use taper_data::sft::{EncodeOptions, Located, OnBadRecord, Overflow, SftEncoder, Tokenized, IGNORE_INDEX};
use taper_model::{nn, Decoder, Rng};
use taper_train::observe::Observer;
use taper_train::rules::Rules;
use taper_train::source::Source;
use taper_train::trainer::Env;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PairDataConfig {
    /// Preference JSONL or Parquet files (or directories) in TRL's formats.
    pub train: Vec<String>,
    /// Held-out pairs: loss, reward accuracy and margin.
    pub eval: Vec<String>,
    /// Held-out prompts with reference answers (prompt/answer or SFT records): exact match of
    /// greedy generations after training.
    pub prompts: Vec<String>,
    /// Longest prompt + response in tokens; 0 means the model's context.
    pub max_length: usize,
    /// "stop" or "skip" on a bad record (bad JSON, identical chosen and rejected, ...).
    pub on_bad_record: String,
    /// A response running past max_length: "truncate" it or "drop" the pair. A prompt alone
    /// longer than max_length is an error unless "drop".
    pub overflow: String,
    /// As in SFT: "chatml", a tokenizer_config.json or .jinja file; default the model's own.
    pub chat_template: Option<String>,
}

impl Default for PairDataConfig {
    fn default() -> Self {
        Self {
            train: Vec::new(),
            eval: Vec::new(),
            prompts: Vec::new(),
            max_length: 0,
            on_bad_record: "stop".into(),
            overflow: "truncate".into(),
            chat_template: None,
        }
    }
}

impl PairDataConfig {
    pub fn validate(&self) -> Vec<String> {
        let mut e = Rules::new();
        if self.train.is_empty() {
            e.push("data.train: give one or more preference files");
        }
        e.one_of("data.on_bad_record", &self.on_bad_record, &["stop", "skip"]);
        e.one_of("data.overflow", &self.overflow, &["truncate", "drop"]);
        e.into_vec()
    }

    pub fn on_bad(&self) -> OnBadRecord {
        if self.on_bad_record == "skip" {
            OnBadRecord::Skip
        } else {
            OnBadRecord::Error
        }
    }

    /// The sequence length for `src`.
    pub fn seq_len(&self, src: &Source) -> usize {
        if self.max_length == 0 {
            src.config.block_size
        } else {
            self.max_length.min(src.config.block_size)
        }
    }
}

/// A tokenised pair, with the per-pair margin of the record if it has one.
#[derive(Debug, Clone)]
pub struct EncodedPair {
    pub chosen: Tokenized,
    pub rejected: Tokenized,
    pub margin: Option<f64>,
}

impl EncodedPair {
    /// Tokens of both sides.
    pub fn tokens(&self) -> usize {
        self.chosen.len() + self.rejected.len()
    }
}

/// Reads and tokenises preference files, reporting what was skipped, truncated or dropped.
pub fn load_pairs(
    paths: &[String],
    src: &Source,
    template: &ChatTemplate,
    cfg: &PairDataConfig,
    obs: &mut dyn Observer,
) -> Result<Vec<EncodedPair>> {
    let files = taper_data::hub::resolve_data(paths)?;
    let data = read_pairs(&files, cfg.on_bad())?;
    let opts = EncodeOptions { max_len: None, overflow: Overflow::Truncate, train_on_all: false, on_bad: cfg.on_bad() };
    let enc = SftEncoder::new(&src.tokenizer, template, opts)?;
    let max = cfg.seq_len(src);
    let drop = cfg.overflow == "drop";
    let (mut out, mut truncated, mut dropped) = (Vec::new(), 0, 0);
    for Located { path, line, example: Pair { chosen, rejected, margin } } in &data.examples {
        let named = |e: taper_data::DataError| AlignError::Invalid(format!("{path}:{line}: {e}"));
        let (mut c, mut r) = (enc.encode(chosen).map_err(named)?, enc.encode(rejected).map_err(named)?);
        let prompt = prompt_len(&c).min(prompt_len(&r));
        if c.len() > max || r.len() > max {
            if drop {
                dropped += 1;
                continue;
            }
            if prompt >= max {
                return Err(AlignError::Invalid(format!(
                    "{path}:{line}: the prompt is {prompt} tokens, as long as the context of {max} or longer \
                     (set data.overflow = \"drop\" to leave such pairs out)"
                )));
            }
            for t in [&mut c, &mut r] {
                t.input_ids.truncate(max);
                t.labels.truncate(max);
            }
            truncated += 1;
        }
        out.push(EncodedPair { chosen: c, rejected: r, margin: *margin });
    }
    obs.message(&format!(
        "{}: {} pairs ({} skipped as bad records, {} truncated, {} dropped as too long)",
        paths.join(", "),
        out.len(),
        data.skipped,
        truncated,
        dropped
    ));
    for r in data.skip_reasons.iter().take(3) {
        obs.message(&format!("  skipped: {r}"));
    }
    Ok(out)
}

/// Tokens before the first response token.
fn prompt_len(t: &Tokenized) -> usize {
    t.labels.iter().skip(1).position(|&l| l != IGNORE_INDEX).map_or(t.len(), |p| p + 1)
}

/// Rows for a batch of pairs: every chosen, then every rejected, padded to one length, so one
/// forward serves both sides.
pub fn pair_rows(pairs: &[&EncodedPair], pad: u32) -> Vec<Row> {
    let len = pairs.iter().map(|p| p.chosen.len().max(p.rejected.len())).max().unwrap_or(1).div_ceil(8) * 8;
    let sides = pairs.iter().map(|p| &p.chosen).chain(pairs.iter().map(|p| &p.rejected));
    sides
        .enumerate()
        .map(|(i, t)| {
            let mut row = Row::default();
            row.push(i, t);
            row.pad_to(len, pad);
            row
        })
        .collect()
}

/// Per-row sums of the log-probs the model gives each response token (B,), and the number of
/// response tokens per row. Each row holds one example.
pub fn sequence_logps(
    model: &Decoder,
    rows: &[Row],
    dev: &Device,
    rng: Option<&mut Rng>,
) -> Result<(Tensor, Vec<usize>)> {
    let b = collate(rows)?;
    let ids = Tensor::from_vec(b.input_ids.clone(), (b.rows, b.seq_len), dev)?;
    let logits = model.forward_packed(&ids, &b.position_ids, &b.segment_ids, rng)?; // (B, T, V)
    token_logps(&logits, &b.labels, b.rows, b.seq_len, dev)
}

/// Log-probs of the next-token labels, summed per row: position t predicts labels[t + 1].
pub fn token_logps(
    logits: &Tensor,
    labels: &[i64],
    rows: usize,
    t: usize,
    dev: &Device,
) -> Result<(Tensor, Vec<usize>)> {
    let (targets, mask, counts) = shifted(labels, rows, t);
    let lp = nn::log_softmax(logits)?; // (B, T, V)
    let targets = Tensor::from_vec(targets, (rows, t, 1), dev)?;
    let picked = lp.gather(&targets, 2)?.squeeze(2)?; // (B, T)
    let mask = Tensor::from_vec(mask, (rows, t), dev)?.to_dtype(picked.dtype())?;
    Ok(((picked * mask)?.sum(D::Minus1)?, counts))
}

/// (targets, mask, response tokens per row) for next-token prediction over `labels`.
pub fn shifted(labels: &[i64], rows: usize, t: usize) -> (Vec<u32>, Vec<f32>, Vec<usize>) {
    let mut targets = vec![0u32; rows * t];
    let mut mask = vec![0f32; rows * t];
    let mut counts = vec![0usize; rows];
    for r in 0..rows {
        for i in 0..t - 1 {
            let l = labels[r * t + i + 1];
            if l != IGNORE_INDEX {
                targets[r * t + i] = l as u32;
                mask[r * t + i] = 1.0;
                counts[r] += 1;
            }
        }
    }
    (targets, mask, counts)
}

/// A scalar f64 from a one-element tensor.
pub fn scalar(t: &Tensor) -> Result<f64> {
    Ok(t.to_dtype(DType::F64)?.to_scalar::<f64>()?)
}

/// What the pair recipes (reward model, DPO) set up alike: the starting model, its chat
/// template and pad id, and the train and held-out pairs.
pub struct PairRun {
    pub src: Source,
    pub template: ChatTemplate,
    pub pad: u32,
    pub train: Vec<EncodedPair>,
    pub eval: Vec<EncodedPair>,
}

impl PairRun {
    pub fn setup(init: &str, data: &PairDataConfig, eval_batches: usize, batch: usize, env: &mut Env) -> Result<Self> {
        let src = taper_train::source::load(init, &env.device)?;
        src.expect_kind(taper_model::ModelKind::Decoder)?;
        let template = taper_train::chat::template_for(data.chat_template.as_deref(), &src)?;
        let pad = src.eos_ids.first().copied().unwrap_or(0);
        let train = load_pairs(&data.train, &src, &template, data, env.obs)?;
        if train.is_empty() {
            return Err(AlignError::Invalid("no preference pairs left after reading and tokenising".into()));
        }
        let mut eval =
            if data.eval.is_empty() { Vec::new() } else { load_pairs(&data.eval, &src, &template, data, env.obs)? };
        if eval_batches > 0 {
            eval.truncate(eval_batches * batch);
        }
        Ok(Self { src, template, pad, train, eval })
    }

    /// Tokens of the training pairs, both sides.
    pub fn train_tokens(&self) -> usize {
        self.train.iter().map(EncodedPair::tokens).sum()
    }
}
