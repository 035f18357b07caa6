//! The sequence-to-sequence recipe: `taper pretrain` with `model.kind = "encoder-decoder"`.
//! Pairs of `source` / `target` text, teacher forcing (decoder input = start token + target,
//! shifted; labels = target + eos) and label smoothing; evaluation reports held-out loss and
//! greedy exact match (and beam-search exact match at the end, if configured).

use crate::checkpoint::Contents;
use crate::config::{RunConfig, Seq2SeqConfig};
use crate::observe::{Observer, Summary};
use crate::order::epoch_pick;
use crate::samples;
use crate::scratch::{self, resolve_vocab};
use crate::source::Source;
use crate::trainer::{self, Built, Evaluation, Micro, Recipe, RunSpec, StepReport};
use crate::{io_err, Result, TrainError};
use candle_core::{DType, Device, Tensor};
use std::path::{Path, PathBuf};
use taper_data::seq2seq::{encode_pairs, make_batch, read_pairs, Batch, Encoded, Limits, Pair};
use taper_data::sft::{Located, OnBadRecord, Overflow};
use taper_data::tokenizer;
use taper_model::marian::{DecodeOptions, Seq2Seq};
use taper_model::nn::label_smoothed_cross_entropy;
use taper_model::{flatten_logits, ModelConfig, Rng, Weights};
use tokenizers::Tokenizer;

impl Seq2SeqConfig {
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
pub fn source_ids(src: &Source) -> Result<SpecialIds> {
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
    Ok(label_smoothed_cross_entropy(&flatten_logits(&logits)?, &labels, eps, -100)?)
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

/// Trains an encoder-decoder from scratch on the config's `source` / `target` pairs.
pub fn pretrain(cfg: RunConfig, run: RunSpec, obs: &mut dyn Observer) -> Result<Summary> {
    trainer::train(cfg, run, obs, |cfg, env| {
        let s = cfg.seq2seq.clone();
        if cfg.data.files.is_empty() {
            return Err(TrainError::Invalid("an encoder-decoder trains on data.files (JSONL or Parquet pairs)".into()));
        }
        let mut train_pairs = read_pairs(&paths(&cfg.data.files), OnBadRecord::Error)?.examples;
        let val_pairs = if s.val_files.is_empty() {
            let n_val = ((train_pairs.len() as f64 * cfg.data.val_fraction).round() as usize).max(1);
            train_pairs.split_off(train_pairs.len().saturating_sub(n_val))
        } else {
            read_pairs(&paths(&s.val_files), OnBadRecord::Error)?.examples
        };
        let tok_path = prepare_tokenizer(cfg, &train_pairs, env.run_dir, env.obs)?;
        let tok = tokenizer::load(&tok_path)?;
        resolve_vocab(cfg, &tok_path, tokenizer::vocab_size(&tok))?;
        let ids = special_ids(&tok, &tok_path, None, &s.pad_token)?;
        let limits = s.limits(&cfg.model);
        let (train, train_stats) = encode_pairs(&tok, &train_pairs, ids.eos, &limits)?;
        let (val, val_stats) = encode_pairs(&tok, &val_pairs, ids.eos, &limits)?;
        env.obs.message(&format!("training data: {train_stats}"));
        env.obs.message(&format!("held-out data: {val_stats}"));
        if train.is_empty() || val.is_empty() {
            return Err(TrainError::Invalid("no training or held-out pairs left after the length limits".into()));
        }
        let params = scratch::weights(&cfg.model, cfg.seed, env.checkpoint, &env.device)?;
        let w = Weights::from_vars(&params);
        let count = |v: &[Encoded]| v.iter().map(|e| e.target.len()).sum::<usize>();
        let (train_tokens, val_tokens) = (count(&train), count(&val));
        let held_out = if s.eval_examples == 0 { val.len() } else { s.eval_examples.min(val.len()) };
        let decode = DecodeOptions {
            beams: 1,
            length_penalty: s.length_penalty,
            max_new_tokens: limits.max_target_len,
            start: ids.start,
            eos: ids.eos,
        };
        let recipe = Seq2SeqRecipe {
            model: Seq2Seq::load(&w, &cfg.model)?.with_checkpointing(cfg.train.activation_checkpointing),
            eval_model: Seq2Seq::load(&w.detached(), &cfg.model)?,
            train,
            val,
            held_out,
            ids,
            decode,
            settings: s,
            seed: cfg.seed,
            batch_size: cfg.train.batch_size,
            eval_batches: cfg.train.eval_batches,
            dropout: cfg.model.dropout > 0.0,
            tokens: 0,
            tokenizer: tok,
        };
        Ok(Built {
            recipe,
            params,
            contents: Contents::scratch(&tok_path),
            vocab_size: cfg.model.vocab_size,
            train_tokens,
            val_tokens,
        })
    })
}

struct Seq2SeqRecipe {
    model: Seq2Seq,
    eval_model: Seq2Seq,
    train: Vec<Encoded>,
    val: Vec<Encoded>,
    /// How many of the held-out pairs are decoded for exact match.
    held_out: usize,
    ids: SpecialIds,
    decode: DecodeOptions,
    settings: Seq2SeqConfig,
    seed: u64,
    batch_size: usize,
    eval_batches: usize,
    dropout: bool,
    tokens: u64,
    tokenizer: Tokenizer,
}

/// Pairs decoded at once for exact match.
const DECODE_BATCH: usize = 64;

impl Recipe for Seq2SeqRecipe {
    type Error = TrainError;

    fn loss(&mut self, at: Micro) -> Result<Tensor> {
        let idx = epoch_pick(self.seed, self.train.len(), self.batch_size, at.global());
        let refs: Vec<&Encoded> = idx.iter().map(|&i| &self.train[i]).collect();
        let b = make_batch(&refs, self.ids.pad, self.ids.start);
        self.tokens += b.target_tokens as u64;
        let mut rng = at.dropout_rng(self.seed);
        batch_loss(&self.model, &b, self.settings.label_smoothing, self.dropout.then_some(&mut rng))
    }

    /// Greedy outputs for the prompts as sources, by default the first held-out sources.
    fn samples(&mut self, _step: u64, prompts: &[String], max_new: usize) -> Result<Vec<(String, String)>> {
        let sources: Vec<Vec<u32>> = match prompts.is_empty() {
            true => self.val.iter().take(samples::DEFAULT_PROMPTS).map(|e| e.source.clone()).collect(),
            false => prompts
                .iter()
                .map(|p| {
                    let mut ids = tokenizer::encode(&self.tokenizer, p.as_str(), false)?.get_ids().to_vec();
                    ids.truncate(self.eval_model.config().block_size - 1);
                    ids.push(self.ids.eos);
                    Ok(ids)
                })
                .collect::<Result<_>>()?,
        };
        let o = DecodeOptions { max_new_tokens: max_new, ..self.decode };
        let mut out = Vec::new();
        for (i, s) in sources.iter().enumerate() {
            let n = s.len();
            let input = Tensor::from_slice(s, (1, n), self.eval_model.device())?;
            let keep = Tensor::ones((1, n), DType::U32, self.eval_model.device())?;
            let mut ids = self.eval_model.greedy(&input, &keep, &o)?.pop().unwrap_or_default();
            ids.retain(|&t| t != self.ids.eos);
            let source: Vec<u32> = s.iter().copied().filter(|&t| t != self.ids.eos).collect();
            let (text, output) =
                (tokenizer::decode(&self.tokenizer, &source)?, tokenizer::decode(&self.tokenizer, &ids)?);
            out.push((format!("samples/{i}"), samples::markdown(&text, &output)));
        }
        Ok(out)
    }

    fn end_step(&mut self, _step: u64) -> Result<StepReport> {
        Ok(StepReport { tokens: std::mem::take(&mut self.tokens), ..Default::default() })
    }

    fn evaluate(&mut self, step: u64, obs: &mut dyn Observer) -> Result<Evaluation> {
        let n_val = self.val.len().min(self.eval_batches * self.batch_size);
        let v =
            eval_loss(&self.eval_model, &self.val[..n_val], self.batch_size, self.ids, self.settings.label_smoothing)?;
        let held_out = &self.val[..self.held_out];
        let hits = exact_match(&self.eval_model, held_out, DECODE_BATCH, &self.decode, self.ids.pad)?;
        let em = hits as f64 / held_out.len() as f64;
        obs.message(&format!(
            "step {step}: held-out loss {v:.4}, greedy exact match {hits}/{} = {:.1}%",
            held_out.len(),
            100.0 * em
        ));
        let mut out = Evaluation::of_loss(v);
        out.metrics.insert("val_exact_match".into(), em.into());
        out.metrics.insert("val_exact_match_n".into(), held_out.len().into());
        Ok(out)
    }

    fn finish(
        &mut self,
        _step: u64,
        obs: &mut dyn Observer,
    ) -> Result<Option<serde_json::Map<String, serde_json::Value>>> {
        let s = &self.settings;
        if s.beams <= 1 {
            return Ok(None);
        }
        let o = DecodeOptions { beams: s.beams, ..self.decode };
        let held_out = &self.val[..self.held_out];
        let hits = exact_match(&self.eval_model, held_out, DECODE_BATCH, &o, self.ids.pad)?;
        let em = hits as f64 / held_out.len() as f64;
        obs.message(&format!(
            "beam search ({} beams, length_penalty {}): held-out exact match {hits}/{} = {:.1}%",
            s.beams,
            s.length_penalty,
            held_out.len(),
            100.0 * em
        ));
        let mut line = serde_json::Map::new();
        line.insert("beam_exact_match".into(), em.into());
        line.insert("beams".into(), s.beams.into());
        Ok(Some(line))
    }
}

/// Encodes `text` (plus eos) and decodes it greedily (`beams` 1) or with beam search: what
/// `taper generate` prints for an encoder-decoder.
pub fn translate(src: &Source, text: &str, beams: usize, length_penalty: f64, max_new: usize) -> Result<String> {
    let model = Seq2Seq::load(&Weights::new(src.weights.clone()).detached(), &src.config)?;
    let ids = source_ids(src)?;
    let mut s: Vec<u32> = tokenizer::encode(&src.tokenizer, text, false)?.get_ids().to_vec();
    s.push(ids.eos);
    if s.len() > src.config.block_size {
        return Err(TrainError::Invalid(format!(
            "the source is {} tokens long; the model reads at most {}",
            s.len(),
            src.config.block_size
        )));
    }
    let n = s.len();
    let input = Tensor::from_vec(s, (1, n), model.device())?;
    let keep = Tensor::ones((1, n), DType::U32, model.device())?;
    let o = DecodeOptions { beams, length_penalty, max_new_tokens: max_new, start: ids.start, eos: ids.eos };
    let mut out = if beams > 1 {
        model.beam_search(&input, &keep, &o)?
    } else {
        model.greedy(&input, &keep, &o)?.pop().unwrap_or_default()
    };
    if out.last() == Some(&ids.eos) {
        out.pop();
    }
    Ok(tokenizer::decode(&src.tokenizer, &out)?)
}
