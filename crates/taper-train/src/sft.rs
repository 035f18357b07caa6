//! The SFT recipe, top to bottom: a model source, chat data rendered with its template and
//! masked to the responses, packed rows, full or LoRA fine-tuning, exact-match evaluation.

use crate::chat::{self, exact_match, template_for};
use crate::config::{LogConfig, RecipeConfig, TrainConfig};
use crate::finetune::{self, trainable};
use crate::loop_fields;
use crate::multiple_choice::{prefix_id, McModel, TaskEval};
use crate::observe::{Observer, Summary};
use crate::optim::OptimConfig;
use crate::order::epoch_pick;
use crate::rules::Rules;
use crate::schedule::ScheduleConfig;
use crate::source::{self, Source};
use crate::trainer::{self, Built, Evaluation, Micro, Recipe, RunSpec, StepReport};
use crate::{Result, TrainError};
use candle_core::{DType, Device, Tensor};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use std::path::PathBuf;
use taper_data::chat::ChatTemplate;
use taper_data::packing::{collate, pack, padded_batches, Row};
use taper_data::sft::{read_sft, EncodeOptions, Example, OnBadRecord, Overflow, SftEncoder, Tokenized};
use taper_model::lora::LoraConfig;
use taper_model::{Decoder, Rng, Weights};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SftDataConfig {
    /// JSONL (or Parquet) files or directories in TRL's formats: messages, prompt/completion, text.
    pub train: Vec<String>,
    /// Held-out data for eval loss and exact match.
    pub eval: Vec<String>,
    /// Longest example in tokens; 0 means the model's context.
    pub max_length: usize,
    /// Pack examples into full rows (segment ids keep them apart); otherwise pad per batch.
    pub packing: bool,
    /// Loss on every token instead of only the responses.
    pub train_on_all: bool,
    /// "stop" or "skip" on a bad record (bad JSON, unknown role, no assistant turn).
    pub on_bad_record: String,
    /// "truncate" or "drop" an example longer than max_length.
    pub overflow: String,
    /// "chatml", a path to a tokenizer_config.json or .jinja file; default: the model's own
    /// template, else ChatML.
    pub chat_template: Option<String>,
}

impl Default for SftDataConfig {
    fn default() -> Self {
        Self {
            train: Vec::new(),
            eval: Vec::new(),
            max_length: 0,
            packing: true,
            train_on_all: false,
            on_bad_record: "stop".into(),
            overflow: "truncate".into(),
            chat_template: None,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct EvalConfig {
    /// Greedy tokens generated per prompt for exact match.
    pub max_new_tokens: usize,
    /// Held-out examples scored for exact match (0 = all).
    pub max_examples: usize,
    /// Multiple-choice task files scored at every evaluation, logged as
    /// `tasks/<file stem>/acc` and `tasks/<file stem>/acc_norm`.
    pub tasks: Vec<String>,
}

impl Default for EvalConfig {
    fn default() -> Self {
        Self { max_new_tokens: 32, max_examples: 0, tasks: Vec::new() }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SftConfig {
    pub seed: u64,
    pub device: String,
    /// The model to fine-tune: a taper checkpoint or run dir, an HF dir, or hf://Org/Name.
    pub init: String,
    pub data: SftDataConfig,
    /// Present: train LoRA adapters on a frozen base. Absent: full fine-tuning.
    pub lora: Option<LoraConfig>,
    pub train: TrainConfig,
    pub optim: OptimConfig,
    pub schedule: ScheduleConfig,
    pub log: LogConfig,
    pub eval: EvalConfig,
}

impl Default for SftConfig {
    fn default() -> Self {
        Self {
            seed: 1337,
            device: "auto".into(),
            init: String::new(),
            data: SftDataConfig::default(),
            lora: None,
            train: TrainConfig { eval_batches: 0, ..TrainConfig::default() },
            optim: OptimConfig::default(),
            schedule: ScheduleConfig::default(),
            log: LogConfig::default(),
            eval: EvalConfig::default(),
        }
    }
}

impl RecipeConfig for SftConfig {
    const RECIPE: &'static str = "sft";

    loop_fields!();

    fn validate(&self) -> Vec<String> {
        let mut e = Rules::new();
        e.required("init", &self.init, "the model to fine-tune (a checkpoint, run dir, HF dir or hf://Org/Name)");
        if self.data.train.is_empty() {
            e.push("data.train: give one or more JSONL files");
        }
        e.one_of("data.on_bad_record", &self.data.on_bad_record, &["stop", "skip"]);
        e.one_of("data.overflow", &self.data.overflow, &["truncate", "drop"]);
        if let Some(l) = &self.lora {
            e.extend(l.validate());
        }
        e.extend(crate::multiple_choice::validate_paths("eval.tasks", &self.eval.tasks));
        e.into_vec()
    }

    fn free_on_resume(&self) -> &'static [&'static str] {
        &["eval.", "data.eval"]
    }
}

/// Local files for data specs: paths, or hub datasets (`hf://datasets/Org/Name[/prefix]`) fetched.
fn files(specs: &[String]) -> Result<Vec<PathBuf>> {
    Ok(taper_data::hub::resolve_data(specs)?)
}

/// Next-token targets for packed rows: position i predicts labels[i + 1] of the same segment.
fn shifted_targets(labels: &[i64], seg: &[u32], rows: usize, t: usize) -> Vec<i64> {
    let mut out = vec![-100i64; rows * t];
    for r in 0..rows {
        for i in 0..t - 1 {
            let (a, b) = (r * t + i, r * t + i + 1);
            if seg[a] != 0 && seg[a] == seg[b] {
                out[a] = labels[b];
            }
        }
    }
    out
}

/// The mean masked loss of a collated batch, and its number of counted tokens (known on the
/// host: nothing is read back).
fn batch_loss(model: &Decoder, rows: &[Row], dev: &Device, rng: Option<&mut Rng>) -> Result<(Tensor, usize)> {
    let b = collate(rows)?;
    let ids = Tensor::from_vec(b.input_ids.clone(), (b.rows, b.seq_len), dev)?;
    let h = model.forward_hidden_packed(&ids, &b.position_ids, &b.segment_ids, rng)?; // (B, T, C)
    let targets = shifted_targets(&b.labels, &b.segment_ids, b.rows, b.seq_len);
    let count = targets.iter().filter(|&&t| t != -100).count();
    let y = Tensor::from_vec(targets, b.rows * b.seq_len, dev)?;
    Ok((model.head_loss(&h, &y, -100)?, count))
}

/// Rows for training or eval: packed, or one example per row padded in length groups.
fn make_rows(examples: &[Tokenized], seq_len: usize, packing: bool, batch: usize, pad: u32) -> Result<Vec<Vec<Row>>> {
    if packing {
        let rows = pack(examples, seq_len, pad)?;
        Ok(rows.chunks(batch.max(1)).map(|c| c.to_vec()).collect())
    } else {
        Ok(padded_batches(examples, batch, pad, 8)?)
    }
}

/// Reads and tokenises `paths` as the config says; logs what was skipped, truncated, dropped.
fn load_examples(
    paths: &[String],
    enc: &SftEncoder,
    on_bad: OnBadRecord,
    obs: &mut dyn Observer,
) -> Result<(Vec<Example>, Vec<Tokenized>)> {
    let data = read_sft(&files(paths)?, on_bad)?;
    let (tok, stats) = enc.encode_all(&data.examples)?;
    obs.message(&format!(
        "{}: {} examples ({} skipped as bad records, {} truncated, {} dropped as too long, {} with no loss tokens); {} tokens, {} in the loss",
        paths.join(", "),
        stats.kept,
        data.skipped + stats.skipped_errors,
        stats.truncated,
        stats.dropped_too_long,
        stats.dropped_no_loss,
        stats.tokens,
        stats.loss_tokens
    ));
    for r in data.skip_reasons.iter().take(3) {
        obs.message(&format!("  skipped: {r}"));
    }
    Ok((data.examples.into_iter().map(|e| e.example).collect(), tok))
}

/// Mean masked loss over eval batches, without a graph.
fn eval_loss(model: &Decoder, batches: &[Vec<Row>], dev: &Device) -> Result<f64> {
    let (mut sum, mut n) = (0.0, 0usize);
    for rows in batches {
        let (loss, count) = batch_loss(model, rows, dev, None)?;
        sum += loss.to_dtype(DType::F64)?.to_scalar::<f64>()? * count as f64;
        n += count;
    }
    Ok(sum / n.max(1) as f64)
}

/// Fine-tunes `cfg.init` on chat data, fully or with LoRA adapters.
pub fn sft(cfg: SftConfig, run: RunSpec, obs: &mut dyn Observer) -> Result<Summary> {
    trainer::train(cfg, run, obs, |cfg, env| {
        let src = source::load(&cfg.init, &env.device)?;
        src.expect_kind(taper_model::ModelKind::Decoder)?;
        let template = template_for(cfg.data.chat_template.as_deref(), &src)?;
        let d = &cfg.data;
        let seq_len = if d.max_length == 0 { src.config.block_size } else { d.max_length.min(src.config.block_size) };
        let on_bad = if d.on_bad_record == "skip" { OnBadRecord::Skip } else { OnBadRecord::Error };
        let opts = EncodeOptions {
            max_len: Some(seq_len),
            overflow: if d.overflow == "drop" { Overflow::Drop } else { Overflow::Truncate },
            train_on_all: d.train_on_all,
            on_bad,
        };
        let enc = SftEncoder::new(&src.tokenizer, &template, opts)?;
        let pad = enc.eos_id().or(src.eos_ids.first().copied()).unwrap_or(0);
        let (_, train_tok) = load_examples(&d.train, &enc, on_bad, env.obs)?;
        if train_tok.is_empty() {
            return Err(TrainError::Invalid("no training examples left after reading and tokenising".into()));
        }
        let b = cfg.train.batch_size;
        // Packed rows are shuffled one by one; padded batches (rows of similar length) as wholes.
        let (units, per_batch) = match d.packing {
            true => (make_rows(&train_tok, seq_len, true, 1, pad)?, b),
            false => (make_rows(&train_tok, seq_len, false, b, pad)?, 1),
        };
        let (eval_examples, mut eval_batches) = match d.eval.is_empty() {
            true => (Vec::new(), Vec::new()),
            false => {
                let (ex, tok) = load_examples(&d.eval, &enc, on_bad, env.obs)?;
                (ex, make_rows(&tok, seq_len, d.packing, b, pad)?)
            }
        };
        if cfg.train.eval_batches > 0 {
            eval_batches.truncate(cfg.train.eval_batches);
        }
        let (params, weights) = trainable(&src, cfg.lora.as_ref(), cfg.seed, Vec::new(), env.checkpoint)?;
        let contents = finetune::contents(&src, &template, cfg.lora.as_ref(), &cfg.init, &[], &[]);
        let tasks = TaskEval::load(&cfg.eval.tasks)?;
        let prefix_id = if tasks.is_empty() { 0 } else { prefix_id(&src)? };
        let recipe = Sft {
            tasks,
            prefix_id,
            model: Decoder::load(&weights, &src.config)?.with_checkpointing(cfg.train.activation_checkpointing),
            eval_model: Decoder::load(&weights.detached(), &src.config)?,
            dropout: finetune::uses_dropout(&src, cfg.lora.as_ref()),
            train_tokens: train_tok.iter().map(|t| t.len()).sum(),
            vocab_size: src.config.vocab_size,
            units,
            per_batch,
            eval_batches,
            eval_examples,
            template,
            seed: cfg.seed,
            eval: cfg.eval.clone(),
            tokens: 0,
            src,
        };
        let (vocab_size, train_tokens) = (recipe.vocab_size, recipe.train_tokens);
        Ok(Built { recipe, params, contents, vocab_size, train_tokens, val_tokens: 0 })
    })
}

struct Sft {
    /// `eval.tasks`, scored at each evaluation.
    tasks: TaskEval,
    prefix_id: u32,
    model: Decoder,
    eval_model: Decoder,
    src: Source,
    template: ChatTemplate,
    dropout: bool,
    train_tokens: usize,
    vocab_size: usize,
    /// Packed rows, or padded batches of rows: what the batch order shuffles.
    units: Vec<Vec<Row>>,
    per_batch: usize,
    eval_batches: Vec<Vec<Row>>,
    /// Held-out records, for exact match after the last step.
    eval_examples: Vec<Example>,
    seed: u64,
    eval: EvalConfig,
    tokens: u64,
}

impl Recipe for Sft {
    type Error = TrainError;
    const SCORE_NAME: &'static str = "eval loss";

    fn loss(&mut self, at: Micro) -> Result<Tensor> {
        let rows: Vec<Row> = epoch_pick(self.seed, self.units.len(), self.per_batch, at.global())
            .into_iter()
            .flat_map(|u| self.units[u].clone())
            .collect();
        self.tokens += rows.iter().map(|r| r.len() as u64).sum::<u64>();
        let mut rng = at.dropout_rng(self.seed);
        Ok(batch_loss(&self.model, &rows, self.model.device(), self.dropout.then_some(&mut rng))?.0)
    }

    fn end_step(&mut self, _step: u64) -> Result<StepReport> {
        Ok(StepReport { tokens: std::mem::take(&mut self.tokens), ..Default::default() })
    }

    fn samples(&mut self, _step: u64, prompts: &[String], max_new: usize) -> Result<Vec<(String, String)>> {
        chat::samples(
            &self.eval_model,
            &self.src,
            &self.template,
            prompts,
            chat::prompts_of(&self.eval_examples),
            max_new,
        )
    }

    fn evaluate(&mut self, _step: u64, _obs: &mut dyn Observer) -> Result<Evaluation> {
        let mut e = match self.eval_batches.is_empty() {
            true => Evaluation::default(),
            false => Evaluation::of_loss(eval_loss(&self.eval_model, &self.eval_batches, self.eval_model.device())?),
        };
        let m = McModel { model: &self.eval_model, tokenizer: &self.src.tokenizer, prefix_id: self.prefix_id };
        self.tasks.add_metrics(&m, &mut e.metrics)?;
        Ok(e)
    }

    fn finish(&mut self, _step: u64, obs: &mut dyn Observer) -> Result<Option<Map<String, Value>>> {
        if self.eval_examples.is_empty() {
            return Ok(None);
        }
        let (m, e) = (&self.eval_model, &self.eval);
        let (hits, total) =
            exact_match(m, &self.src, &self.template, &self.eval_examples, e.max_new_tokens, e.max_examples)?;
        Ok(Some(exact_match_line(hits, total, obs)))
    }
}

/// The end-of-run line of a held-out exact match, also shown as a message.
pub fn exact_match_line(hits: usize, total: usize, obs: &mut dyn Observer) -> Map<String, Value> {
    let share = hits as f64 / total.max(1) as f64;
    obs.message(&format!("exact match on held-out prompts: {hits}/{total} = {:.1}%", 100.0 * share));
    let mut line = Map::new();
    line.insert("exact_match".into(), share.into());
    line.insert("exact_match_n".into(), total.into());
    line
}

/// What `taper eval` reports.
#[derive(Debug, Clone, Serialize)]
pub struct EvalReport {
    pub examples: usize,
    pub loss_tokens: usize,
    pub loss: f64,
    pub perplexity: f64,
    /// (hits, scored) when the data has reference answers.
    pub exact_match: Option<(usize, usize)>,
}

/// Masked loss, perplexity and exact match of a model source on SFT-format data.
pub fn evaluate_source(
    src: &Source,
    data: &[String],
    chat_template: Option<&str>,
    max_new_tokens: usize,
    limit: usize,
    obs: &mut dyn Observer,
) -> Result<EvalReport> {
    let template = template_for(chat_template, src)?;
    let seq_len = src.config.block_size;
    let opts = EncodeOptions {
        max_len: Some(seq_len),
        overflow: Overflow::Truncate,
        train_on_all: false,
        on_bad: OnBadRecord::Error,
    };
    let enc = SftEncoder::new(&src.tokenizer, &template, opts)?;
    let pad = enc.eos_id().or(src.eos_ids.first().copied()).unwrap_or(0);
    let (examples, tok) = load_examples(data, &enc, OnBadRecord::Error, obs)?;
    if tok.is_empty() {
        return Err(TrainError::Invalid(format!("{}: no examples to evaluate", data.join(", "))));
    }
    let model = Decoder::load(&Weights::new(src.weights.clone()).detached(), &src.config)?;
    let device = model.device().clone();
    let batches = make_rows(&tok, seq_len, true, 8, pad)?;
    let loss = eval_loss(&model, &batches, &device)?;
    let has_answers = examples.iter().any(|e| !matches!(e, Example::Text(_)));
    let exact_match =
        if has_answers { Some(exact_match(&model, src, &template, &examples, max_new_tokens, limit)?) } else { None };
    Ok(EvalReport {
        examples: tok.len(),
        loss_tokens: tok.iter().map(|t| t.loss_tokens()).sum(),
        loss,
        perplexity: loss.exp(),
        exact_match,
    })
}
