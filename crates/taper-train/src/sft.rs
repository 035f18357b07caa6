//! The SFT recipe, top to bottom: a model source, chat data rendered with its template and
//! masked to the responses, packed rows, full or LoRA fine-tuning, exact-match evaluation.

use crate::config::{TrainConfig, Validate};
use crate::finetune::{load_resume, resume_optimizer, trainable, Progress, Saver};
use crate::optim::{OptimConfig, Optimizer};
use crate::pretrain::{select_device, Observer, RunInfo, StepLog, Summary};
use crate::schedule::ScheduleConfig;
use crate::source::{self, Source};
use crate::steps::{accumulate, guarded_update, Metrics};
use crate::{io_err, Result, TrainError};
use candle_core::{DType, Device, Tensor};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use std::time::Instant;
use taper_data::chat::ChatTemplate;
use taper_data::packing::{collate, pack, padded_batches, Row};
use taper_data::sft::{read_sft, EncodeOptions, Example, OnBadRecord, Overflow, SftEncoder, Tokenized};
use taper_model::lora::LoraConfig;
use taper_model::{Decoder, Rng, Sampling, Weights};

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
}

impl Default for EvalConfig {
    fn default() -> Self {
        Self { max_new_tokens: 32, max_examples: 0 }
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
            train: TrainConfig::default(),
            optim: OptimConfig::default(),
            schedule: ScheduleConfig::default(),
            eval: EvalConfig::default(),
        }
    }
}

impl Validate for SftConfig {
    fn validate(&self) -> Vec<String> {
        let mut e = Vec::new();
        if self.init.is_empty() {
            e.push("init: name the model to fine-tune (a checkpoint, run dir, HF dir or hf://Org/Name)".into());
        }
        if self.data.train.is_empty() {
            e.push("data.train: give one or more JSONL files".into());
        }
        if !matches!(self.data.on_bad_record.as_str(), "stop" | "skip") {
            e.push(format!("data.on_bad_record = {:?}: expected \"stop\" or \"skip\"", self.data.on_bad_record));
        }
        if !matches!(self.data.overflow.as_str(), "truncate" | "drop") {
            e.push(format!("data.overflow = {:?}: expected \"truncate\" or \"drop\"", self.data.overflow));
        }
        if let Some(l) = &self.lora {
            e.extend(l.validate());
        }
        e.extend(self.optim.validate());
        e.extend(self.schedule.validate(self.train.max_steps));
        e
    }
}

impl SftConfig {
    pub fn to_toml(&self) -> String {
        toml::to_string(self).expect("SftConfig serialises to TOML")
    }
}

/// Local files for data specs: paths, or hub datasets (`hf://datasets/Org/Name[/prefix]`) fetched.
fn files(specs: &[String]) -> Result<Vec<PathBuf>> {
    Ok(taper_data::hub::resolve_data(specs)?)
}

/// The chat template the config asks for.
pub fn template_for(spec: Option<&str>, src: &Source) -> Result<ChatTemplate> {
    Ok(match spec {
        Some("chatml") => ChatTemplate::chatml(),
        Some(p) if p.ends_with(".json") => ChatTemplate::from_tokenizer_config(Path::new(p))?,
        Some(p) => {
            let text = std::fs::read_to_string(p).map_err(io_err(p))?;
            let specials =
                src.tokenizer_config.as_ref().map(taper_data::chat::special_tokens_from_config).unwrap_or_default();
            ChatTemplate::new(&text, specials)?
        }
        None if src.chat_template.is_some() => ChatTemplate::from_model_dir(&src.dir)?,
        None => ChatTemplate::chatml(),
    })
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

/// The mean masked loss of a collated batch, and its number of counted tokens.
fn batch_loss(model: &Decoder, rows: &[Row], dev: &Device, rng: Option<&mut Rng>) -> Result<(Tensor, usize)> {
    let b = collate(rows)?;
    let ids = Tensor::from_vec(b.input_ids.clone(), (b.rows, b.seq_len), dev)?;
    let h = model.forward_hidden_packed(&ids, &b.position_ids, &b.segment_ids, rng)?; // (B, T, C)
    let targets = shifted_targets(&b.labels, &b.segment_ids, b.rows, b.seq_len);
    let y = Tensor::from_vec(targets, b.rows * b.seq_len, dev)?;
    Ok(model.head_loss(&h, &y, -100)?)
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

/// The units (packed rows or padded batches) of global micro-batch `g`: each epoch is a fresh
/// seeded permutation, so every example is seen once per epoch and a batch mixes lengths and
/// tasks. It depends on (seed, g) alone, so a resumed run draws the same batches.
pub fn epoch_pick(seed: u64, units: usize, per_batch: usize, g: u64) -> Vec<usize> {
    let per_epoch = (units / per_batch).max(1) as u64;
    let (epoch, k) = (g / per_epoch, (g % per_epoch) as usize);
    let mut perm: Vec<usize> = (0..units).collect();
    Rng::derive(seed, &[epoch, 0x5348_5546]).shuffle(&mut perm);
    perm[k * per_batch..((k + 1) * per_batch).min(units)].to_vec()
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

/// Exact match: greedy continuations of each held-out prompt against its reference answer.
pub fn exact_match(
    model: &Decoder,
    src: &Source,
    template: &ChatTemplate,
    examples: &[Example],
    max_new: usize,
    limit: usize,
) -> Result<(usize, usize)> {
    let (mut hits, mut total) = (0, 0);
    let greedy = Sampling { temperature: 0.0, ..Default::default() };
    let mut stop = src.eos_ids.clone();
    for t in ["<|im_end|>", "<|eot_id|>", "<|endoftext|>"] {
        stop.extend(src.tokenizer.token_to_id(t));
    }
    for ex in examples {
        if limit > 0 && total >= limit {
            break;
        }
        let Some((prompt, answer)) = ex.split_prompt() else { continue };
        let prompt = prompt.render(template)?;
        let enc =
            src.tokenizer.encode(prompt.as_str(), false).map_err(|e| TrainError::Invalid(format!("prompt: {e}")))?;
        let out = model.generate(enc.get_ids(), max_new, &greedy, &stop, &mut Rng::new(0), |_| {})?;
        let ids: Vec<u32> = out.into_iter().filter(|t| !stop.contains(t)).collect();
        let text = taper_data::tokenizer::decode(&src.tokenizer, &ids)?;
        total += 1;
        if text.trim() == answer.trim() {
            hits += 1;
        }
    }
    Ok((hits, total))
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

pub fn sft(cfg: SftConfig, run_dir: &Path, resume: crate::pretrain::Resume, obs: &mut dyn Observer) -> Result<Summary> {
    let started = Instant::now();
    let device = select_device(&cfg.device)?;
    std::fs::create_dir_all(run_dir).map_err(io_err(run_dir))?;
    let ck_root = run_dir.join("checkpoints");
    let src = source::load(&cfg.init, &device)?;
    src.expect_kind(taper_model::ModelKind::Decoder)?;
    let template = template_for(cfg.data.chat_template.as_deref(), &src)?;
    let seq_len =
        if cfg.data.max_length == 0 { src.config.block_size } else { cfg.data.max_length.min(src.config.block_size) };
    let on_bad = if cfg.data.on_bad_record == "skip" { OnBadRecord::Skip } else { OnBadRecord::Error };
    let opts = EncodeOptions {
        max_len: Some(seq_len),
        overflow: if cfg.data.overflow == "drop" { Overflow::Drop } else { Overflow::Truncate },
        train_on_all: cfg.data.train_on_all,
        on_bad,
    };
    let enc = SftEncoder::new(&src.tokenizer, &template, opts)?;
    let pad = enc.eos_id().or(src.eos_ids.first().copied()).unwrap_or(0);
    let (_, train_tok) = load_examples(&cfg.data.train, &enc, on_bad, obs)?;
    if train_tok.is_empty() {
        return Err(TrainError::Invalid("no training examples left after reading and tokenising".into()));
    }
    let tc = cfg.train.clone();
    // Packed rows are shuffled one by one; padded batches (rows of similar length) as wholes.
    let per_batch = if cfg.data.packing { tc.batch_size } else { 1 };
    let train_units =
        make_rows(&train_tok, seq_len, cfg.data.packing, if cfg.data.packing { 1 } else { tc.batch_size }, pad)?;
    let (eval_examples, eval_batches) = if cfg.data.eval.is_empty() {
        (Vec::new(), Vec::new())
    } else {
        let (ex, tok) = load_examples(&cfg.data.eval, &enc, on_bad, obs)?;
        (ex, make_rows(&tok, seq_len, cfg.data.packing, tc.batch_size, pad)?)
    };

    let ck = load_resume(&resume, &ck_root, &device)?;
    let (vars, weights) = trainable(&src, cfg.lora.as_ref(), cfg.seed, Vec::new(), ck.as_ref())?;
    let model = Decoder::load(&weights, &src.config)?;
    let eval_model = Decoder::load(&weights.detached(), &src.config)?;
    let n_trainable: usize = vars.iter().map(|(_, v)| v.elem_count()).sum();
    let mut opt = Optimizer::new(cfg.optim.clone(), vars)?;
    let (mut step, mut tokens, mut skipped) = resume_optimizer(&mut opt, ck, obs)?;
    let cfg_path = run_dir.join("config.toml");
    std::fs::write(&cfg_path, cfg.to_toml()).map_err(io_err(&cfg_path))?;
    let mut metrics = Metrics::open(run_dir, step, started)?;
    let end = tc.end_step();
    obs.started(&RunInfo {
        start_step: step,
        end_step: end,
        params: n_trainable,
        vocab_size: src.config.vocab_size,
        train_tokens: train_tok.iter().map(|t| t.len()).sum(),
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
        let mut step_tokens = 0u64;
        let (loss, grads) = accumulate(opt.params(), tc.grad_accum_steps, |micro| {
            let g = step * tc.grad_accum_steps as u64 + micro as u64;
            let rows: Vec<Row> = epoch_pick(cfg.seed, train_units.len(), per_batch, g)
                .into_iter()
                .flat_map(|u| train_units[u].clone())
                .collect();
            step_tokens += rows.iter().map(|r| r.len() as u64).sum::<u64>();
            let mut rng = Rng::derive(cfg.seed, &[step, micro as u64]);
            Ok::<_, TrainError>(batch_loss(&model, &rows, &device, dropout.then_some(&mut rng))?.0)
        })?;
        let norm = guarded_update(&mut opt, grads, loss, lr, &tc, step, &mut skipped, obs)?;
        step += 1;
        tokens += step_tokens;
        metrics.add_tokens(step_tokens);
        last_loss = loss;
        let val_loss = if !eval_batches.is_empty() && tc.eval_due(step) {
            let v = eval_loss(&eval_model, &eval_batches, &device)?;
            obs.eval(step, v);
            last_val = Some(v);
            Some(v)
        } else {
            None
        };
        if step % tc.log_every == 0 || val_loss.is_some() || step == end {
            metrics.step(StepLog::new(step, loss, lr, norm, tokens, skipped, val_loss), None, obs)?;
        }
        if tc.checkpoint_due(step) {
            let at = Progress { step, tokens, skipped, val_loss: last_val };
            last_ck = Some(saver.save(&opt, cfg.to_toml(), at, None, obs)?);
        }
    }
    if !eval_examples.is_empty() {
        let (hits, total) =
            exact_match(&eval_model, &src, &template, &eval_examples, cfg.eval.max_new_tokens, cfg.eval.max_examples)?;
        obs.message(&format!(
            "exact match on held-out prompts: {hits}/{total} = {:.1}%",
            100.0 * hits as f64 / total.max(1) as f64
        ));
        metrics.write(
            &serde_json::json!({"step": step, "exact_match": hits as f64 / total.max(1) as f64, "exact_match_n": total}),
        )?;
    }
    Ok(Summary {
        step,
        train_loss: last_loss,
        val_loss: last_val,
        elapsed_s: started.elapsed().as_secs_f64(),
        checkpoint: last_ck,
    })
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_epoch_sees_every_unit_once_in_a_fresh_order() {
        let (units, per_batch) = (10, 3);
        let epoch =
            |e: u64| -> Vec<usize> { (3 * e..3 * e + 3).flat_map(|g| epoch_pick(5, units, per_batch, g)).collect() };
        let (a, b) = (epoch(0), epoch(1));
        assert_eq!(a.len(), 9);
        let mut sorted = a.clone();
        sorted.sort();
        sorted.dedup();
        assert_eq!(sorted.len(), 9, "no unit twice in an epoch: {a:?}");
        assert_ne!(a, b);
        assert_eq!(epoch_pick(5, units, per_batch, 4), epoch_pick(5, units, per_batch, 4));
        assert_eq!(epoch_pick(5, 2, 3, 0).len(), 2, "fewer units than a batch");
    }
}
