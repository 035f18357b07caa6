//! The sequence-to-sequence recipe: `taper pretrain` with `model.kind = "encoder-decoder"`.
//! Pairs of `source` / `target` text, teacher forcing (decoder input = start token + target,
//! shifted; labels = target + eos), label smoothing, and the pretrain loop's optimizer,
//! schedule, metrics, checkpoints and bit-exact resume; evaluation reports held-out loss and
//! greedy exact match (and beam-search exact match at the end, if configured).

use crate::checkpoint::{self, TrainerState};
use crate::config::RunConfig;
use crate::optim::Optimizer;
use crate::pretrain::{resolve_vocab, select_device, Observer, Resume, RunInfo, StepLog, Summary};
use crate::sft::epoch_pick;
use crate::steps::{accumulate, guarded_update, save_checkpoint, Metrics};
use crate::{io_err, Result, TrainError};
use candle_core::{DType, Device, Tensor, Var};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use std::time::Instant;
use taper_data::seq2seq::{encode_pairs, make_batch, read_pairs, Batch, Encoded, Limits, Pair};
use taper_data::sft::{Located, OnBadRecord, Overflow};
use taper_data::tokenizer;
use taper_model::marian::{DecodeOptions, Seq2Seq};
use taper_model::nn::label_smoothed_cross_entropy;
use taper_model::{flatten_logits, init_weights, ModelConfig, Rng, Weights};
use tokenizers::Tokenizer;

/// `[seq2seq]`: the encoder-decoder's data and evaluation settings.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Seq2SeqConfig {
    /// Held-out pairs (JSONL / Parquet); empty takes the last `data.val_fraction` of `data.files`.
    pub val_files: Vec<String>,
    /// Most source tokens, eos included (0 = model.block_size).
    pub max_source_len: usize,
    /// Most target tokens, eos included (0 = model.block_size).
    pub max_target_len: usize,
    /// "truncate" or "drop" a pair with a side over its limit.
    pub overflow: String,
    /// PyTorch's `CrossEntropyLoss(label_smoothing)`.
    pub label_smoothing: f64,
    /// Held-out pairs decoded greedily for exact match at each eval (0 = all).
    pub eval_examples: usize,
    /// Beam size for a beam-search exact match at the end of the run (0 or 1 = none).
    pub beams: usize,
    /// HF's `length_penalty` for that beam search.
    pub length_penalty: f64,
    /// The padding token, also the decoder's start token (Marian's convention).
    pub pad_token: String,
}

impl Default for Seq2SeqConfig {
    fn default() -> Self {
        Self {
            val_files: Vec::new(),
            max_source_len: 0,
            max_target_len: 0,
            overflow: "truncate".into(),
            label_smoothing: 0.0,
            eval_examples: 0,
            beams: 0,
            length_penalty: 1.0,
            pad_token: "<pad>".into(),
        }
    }
}

impl Seq2SeqConfig {
    pub fn validate(&self, model: &ModelConfig) -> Vec<String> {
        let mut e = Vec::new();
        if !matches!(self.overflow.as_str(), "truncate" | "drop") {
            e.push(format!("seq2seq.overflow = {:?}: expected \"truncate\" or \"drop\"", self.overflow));
        }
        if !(0.0..1.0).contains(&self.label_smoothing) {
            e.push(format!("seq2seq.label_smoothing = {} must be in [0, 1)", self.label_smoothing));
        }
        for (k, v) in [("max_source_len", self.max_source_len), ("max_target_len", self.max_target_len)] {
            if v > model.block_size {
                e.push(format!("seq2seq.{k} = {v} exceeds model.block_size = {}", model.block_size));
            }
        }
        e
    }

    fn limits(&self, model: &ModelConfig) -> Limits {
        let or_block = |v: usize| if v == 0 { model.block_size } else { v };
        Limits {
            max_source_len: or_block(self.max_source_len),
            max_target_len: or_block(self.max_target_len),
            overflow: if self.overflow == "drop" { Overflow::Drop } else { Overflow::Truncate },
        }
    }
}

/// The token ids an encoder-decoder needs besides its vocabulary.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SpecialIds {
    pub pad: u32,
    pub eos: u32,
    /// The decoder's first input.
    pub start: u32,
}

/// From an HF config.json (`pad_token_id`, `eos_token_id`, `decoder_start_token_id`) when
/// given, else from the tokenizer: `pad_token` and its end-of-text token, starting with pad.
pub fn special_ids(
    tok: &Tokenizer,
    tok_path: &Path,
    hf: Option<&serde_json::Value>,
    pad_token: &str,
) -> Result<SpecialIds> {
    let num = |k: &str| hf.and_then(|j| j.get(k)).and_then(serde_json::Value::as_u64).map(|v| v as u32);
    if let (Some(pad), Some(eos)) = (num("pad_token_id"), num("eos_token_id")) {
        return Ok(SpecialIds { pad, eos, start: num("decoder_start_token_id").unwrap_or(pad) });
    }
    let pad = tok.token_to_id(pad_token).ok_or_else(|| {
        TrainError::Invalid(format!(
            "tokenizer {}: no padding token {pad_token:?} (add it to data.special_tokens)",
            tok_path.display()
        ))
    })?;
    let eos = tokenizer::eos_id(tok).ok_or_else(|| {
        TrainError::Invalid(format!(
            "tokenizer {}: no end-of-text token (add \"</s>\" to data.special_tokens)",
            tok_path.display()
        ))
    })?;
    Ok(SpecialIds { pad, eos, start: pad })
}

/// The special ids of a loaded model source.
pub fn source_ids(src: &crate::source::Source) -> Result<SpecialIds> {
    let pad = src.run_config.as_ref().map_or("<pad>", |r| r.seq2seq.pad_token.as_str());
    special_ids(&src.tokenizer, &src.tokenizer_path, src.hf_config.as_ref(), pad)
}

fn paths(files: &[String]) -> Vec<PathBuf> {
    files.iter().map(PathBuf::from).collect()
}

/// Trains (or loads) the tokenizer on the pairs' text; returns its path.
fn prepare_tokenizer(
    cfg: &RunConfig,
    pairs: &[Located<Pair>],
    run_dir: &Path,
    obs: &mut dyn Observer,
) -> Result<PathBuf> {
    let d = &cfg.data;
    match d.tokenizer.as_str() {
        kind @ ("char" | "bpe") => {
            let dir = run_dir.join("data");
            std::fs::create_dir_all(&dir).map_err(io_err(&dir))?;
            let corpus = dir.join("tokenizer_corpus.txt");
            let text: String = pairs.iter().map(|p| format!("{}\n{}\n", p.example.source, p.example.target)).collect();
            std::fs::write(&corpus, text).map_err(io_err(&corpus))?;
            let kind = if kind == "char" { tokenizer::TokenizerKind::Char } else { tokenizer::TokenizerKind::Bpe };
            obs.message(&format!("training a {kind:?} tokenizer on the training pairs"));
            let tok = tokenizer::train(kind, &[corpus], d.tokenizer_vocab_size, &d.special_tokens)?;
            let path = dir.join("tokenizer.json");
            tokenizer::save(&tok, &path)?;
            Ok(path)
        }
        path => Ok(PathBuf::from(path)),
    }
}

fn batch_tensors(b: &Batch, dev: &Device) -> Result<(Tensor, Tensor, Tensor, Tensor)> {
    Ok((
        Tensor::from_vec(b.src.clone(), (b.rows, b.src_len), dev)?,
        Tensor::from_vec(b.src_keep.clone(), (b.rows, b.src_len), dev)?,
        Tensor::from_vec(b.dec_in.clone(), (b.rows, b.tgt_len), dev)?,
        Tensor::from_vec(b.labels.clone(), b.rows * b.tgt_len, dev)?,
    ))
}

/// The (label-smoothed) mean loss of one batch's target tokens.
pub fn batch_loss(model: &Seq2Seq, b: &Batch, eps: f64, rng: Option<&mut Rng>) -> Result<Tensor> {
    let (src, keep, dec, labels) = batch_tensors(b, model.device())?;
    let logits = model.forward(&src, &keep, &dec, rng)?; // (B, T, V)
    Ok(label_smoothed_cross_entropy(&flatten_logits(&logits)?, &labels, eps, -100)?.0)
}

/// Mean loss (with the training label smoothing) over `examples`, in batches, without a graph.
pub fn eval_loss(model: &Seq2Seq, examples: &[Encoded], batch: usize, ids: SpecialIds, eps: f64) -> Result<f64> {
    let (mut total, mut n) = (0.0, 0usize);
    for chunk in examples.chunks(batch.max(1)) {
        let refs: Vec<&Encoded> = chunk.iter().collect();
        let b = make_batch(&refs, ids.pad, ids.start);
        let loss = batch_loss(model, &b, eps, None)?.to_dtype(DType::F64)?.to_scalar::<f64>()?;
        total += loss * b.target_tokens as f64;
        n += b.target_tokens;
    }
    Ok(total / n.max(1) as f64)
}

/// Decodes each source (greedy, in batches, or beam search one by one) and counts the outputs
/// that equal their target (eos included).
pub fn exact_match(model: &Seq2Seq, examples: &[Encoded], batch: usize, o: &DecodeOptions, pad: u32) -> Result<usize> {
    let mut hits = 0;
    for chunk in examples.chunks(batch.max(1)) {
        let refs: Vec<&Encoded> = chunk.iter().collect();
        let b = make_batch(&refs, pad, o.start);
        let src = Tensor::from_vec(b.src.clone(), (b.rows, b.src_len), model.device())?;
        let keep = Tensor::from_vec(b.src_keep.clone(), (b.rows, b.src_len), model.device())?;
        let outs = if o.beams > 1 {
            (0..b.rows)
                .map(|r| model.beam_search(&src.narrow(0, r, 1)?, &keep.narrow(0, r, 1)?, o).map_err(TrainError::from))
                .collect::<Result<Vec<_>>>()?
        } else {
            model.greedy(&src, &keep, o)?
        };
        hits += outs.iter().zip(chunk).filter(|(out, e)| **out == e.target).count();
    }
    Ok(hits)
}

pub fn train(mut cfg: RunConfig, run_dir: &Path, resume: Resume, obs: &mut dyn Observer) -> Result<Summary> {
    let started = Instant::now();
    let device = select_device(&cfg.device)?;
    std::fs::create_dir_all(run_dir).map_err(io_err(run_dir))?;
    let ck_root = run_dir.join("checkpoints");
    let resume_dir = resume.dir(&ck_root)?;
    let s = cfg.seq2seq.clone();
    if cfg.data.files.is_empty() {
        return Err(TrainError::Invalid("an encoder-decoder trains on data.files (JSONL or Parquet pairs)".into()));
    }

    // Data and tokenizer.
    let mut train_pairs = read_pairs(&paths(&cfg.data.files), OnBadRecord::Error)?.examples;
    let val_pairs = if s.val_files.is_empty() {
        let n_val = ((train_pairs.len() as f64 * cfg.data.val_fraction).round() as usize).max(1);
        train_pairs.split_off(train_pairs.len().saturating_sub(n_val))
    } else {
        read_pairs(&paths(&s.val_files), OnBadRecord::Error)?.examples
    };
    let tok_path = prepare_tokenizer(&cfg, &train_pairs, run_dir, obs)?;
    let tok = tokenizer::load(&tok_path)?;
    let tok_sha = tokenizer::sha256_file(&tok_path)?;
    resolve_vocab(&mut cfg, &tok_path, tokenizer::vocab_size(&tok))?;
    let ids = special_ids(&tok, &tok_path, None, &s.pad_token)?;
    let limits = s.limits(&cfg.model);
    let (train, train_stats) = encode_pairs(&tok, &train_pairs, ids.eos, &limits)?;
    let (val, val_stats) = encode_pairs(&tok, &val_pairs, ids.eos, &limits)?;
    obs.message(&format!("training data: {train_stats}"));
    obs.message(&format!("held-out data: {val_stats}"));
    if train.is_empty() || val.is_empty() {
        return Err(TrainError::Invalid("no training or held-out pairs left after the length limits".into()));
    }

    // Model and optimizer: fresh, or from the checkpoint.
    let ck = match &resume_dir {
        Some(d) => Some(checkpoint::load(d, &device)?),
        None => None,
    };
    let named: Vec<(String, Tensor)> = match &ck {
        None => init_weights(&cfg.model, cfg.seed, &device)?,
        Some(ck) => {
            let bad = |reason: String| TrainError::Checkpoint { path: ck.dir.display().to_string(), reason };
            let saved: RunConfig = toml::from_str(&ck.state.config).map_err(|e| bad(format!("saved config: {e}")))?;
            if saved.model != cfg.model {
                return Err(bad("its [model] config differs from this run's".into()));
            }
            if ck.state.tokenizer_sha256 != tok_sha {
                return Err(bad(format!("trained with another tokenizer than {}", tok_path.display())));
            }
            taper_model::param_specs(&cfg.model)
                .into_iter()
                .map(|(name, _, _)| {
                    let t = ck.model.get(&name).ok_or_else(|| bad(format!("tensor `{name}` is missing")))?;
                    Ok((name, t.clone()))
                })
                .collect::<Result<_>>()?
        }
    };
    let vars: Vec<(String, Var)> =
        named.into_iter().map(|(n, t)| Ok((n, Var::from_tensor(&t)?))).collect::<Result<_>>()?;
    let weights = Weights::from_pairs(vars.iter().map(|(n, v)| (n.clone(), v.as_tensor().clone())));
    let model = Seq2Seq::load(&weights, &cfg.model)?;
    let eval_model = Seq2Seq::load(&weights.detached(), &cfg.model)?;
    let n_params: usize = vars.iter().map(|(_, v)| v.elem_count()).sum();
    let mut opt = Optimizer::new(cfg.optim.clone(), vars)?;
    // From-scratch checkpoints keep the data cursor at the step, so the step is where to go on.
    let (mut step, mut tokens, mut skipped) = crate::finetune::resume_optimizer(&mut opt, ck, obs)?;

    let cfg_path = run_dir.join("config.toml");
    std::fs::write(&cfg_path, cfg.to_toml()).map_err(io_err(&cfg_path))?;
    let mut metrics = Metrics::open(run_dir, step, started)?;
    let tc = cfg.train.clone();
    let end = tc.end_step();
    let count = |v: &[Encoded]| v.iter().map(|e| e.target.len()).sum::<usize>();
    obs.started(&RunInfo {
        start_step: step,
        end_step: end,
        params: n_params,
        vocab_size: cfg.model.vocab_size,
        train_tokens: count(&train),
        val_tokens: count(&val),
        device: format!("{device:?}"),
    });

    let held_out: &[Encoded] = if s.eval_examples == 0 { &val } else { &val[..s.eval_examples.min(val.len())] };
    let decode = DecodeOptions {
        beams: 1,
        length_penalty: s.length_penalty,
        max_new_tokens: limits.max_target_len,
        start: ids.start,
        eos: ids.eos,
    };
    let eval_batch = 64;
    let micros = tc.grad_accum_steps as u64;
    let (mut last_loss, mut last_val, mut last_ck) = (f64::NAN, None, None);
    while step < end {
        let lr = cfg.schedule.lr(step, cfg.optim.lr, tc.max_steps);
        let batches: Vec<Batch> = (0..micros)
            .map(|m| {
                let idx = epoch_pick(cfg.seed, train.len(), tc.batch_size, step * micros + m);
                let refs: Vec<&Encoded> = idx.iter().map(|&i| &train[i]).collect();
                make_batch(&refs, ids.pad, ids.start)
            })
            .collect();
        let mut rngs: Vec<Rng> = (0..micros).map(|m| Rng::derive(cfg.seed, &[step, m])).collect();
        let dropout = cfg.model.dropout > 0.0;
        let (loss, grads) = accumulate(opt.params(), batches.len(), |i| {
            let rng = if dropout { Some(&mut rngs[i]) } else { None };
            batch_loss(&model, &batches[i], s.label_smoothing, rng)
        })?;
        let norm = guarded_update(&mut opt, grads, loss, lr, &tc, step, &mut skipped, obs)?;
        step += 1;
        let step_tokens: u64 = batches.iter().map(|b| b.target_tokens as u64).sum();
        tokens += step_tokens;
        metrics.add_tokens(step_tokens);
        last_loss = loss;

        let (val_loss, extra) = if tc.eval_due(step) {
            let v = eval_loss(&eval_model, &val, tc.batch_size, ids, s.label_smoothing)?;
            let hits = exact_match(&eval_model, held_out, eval_batch, &decode, ids.pad)?;
            let em = hits as f64 / held_out.len() as f64;
            obs.eval(step, v);
            obs.message(&format!(
                "step {step}: held-out loss {v:.4}, greedy exact match {hits}/{} = {:.1}%",
                held_out.len(),
                100.0 * em
            ));
            last_val = Some(v);
            (Some(v), Some(serde_json::json!({"val_exact_match": em, "val_exact_match_n": held_out.len()})))
        } else {
            (None, None)
        };
        if step % tc.log_every == 0 || val_loss.is_some() || step == end {
            let log = StepLog::new(step, loss, lr, norm, tokens, skipped, val_loss);
            metrics.step(log, extra, obs)?;
        }
        if tc.checkpoint_due(step) {
            let state = TrainerState::scratch(step, tokens, cfg.seed, skipped, last_val, &tok_sha, cfg.to_toml());
            let keep = tc.keep_checkpoints;
            last_ck = Some(save_checkpoint(&ck_root, &opt, Vec::new(), state, &tok_path, keep, |_, _| Ok(()), obs)?);
        }
    }
    if s.beams > 1 && step == tc.max_steps {
        let o = DecodeOptions { beams: s.beams, ..decode };
        let hits = exact_match(&eval_model, held_out, eval_batch, &o, ids.pad)?;
        let em = hits as f64 / held_out.len() as f64;
        obs.message(&format!(
            "beam search ({} beams, length_penalty {}): held-out exact match {hits}/{} = {:.1}%",
            s.beams,
            s.length_penalty,
            held_out.len(),
            100.0 * em
        ));
        metrics.write(&serde_json::json!({"step": step, "beam_exact_match": em, "beams": s.beams}))?;
    }
    Ok(Summary {
        step,
        train_loss: last_loss,
        val_loss: last_val,
        elapsed_s: started.elapsed().as_secs_f64(),
        checkpoint: last_ck,
    })
}
