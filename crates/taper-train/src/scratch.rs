//! What the from-scratch recipes (causal and masked LM pretraining, sequence-to-sequence)
//! share: token shards and the tokenizer prepared from the config's data, the model's
//! vocabulary taken from that tokenizer, and weights drawn fresh or taken from the checkpoint
//! being resumed.

use crate::checkpoint::{Checkpoint, Contents};
use crate::config::{DataConfig, RunConfig};
use crate::observe::{Observer, Summary};
use crate::trainer::{self, Built, Evaluation, Micro, Recipe, RunSpec, StepReport};
use crate::{io_err, Result, TrainError};
use candle_core::{Device, Tensor, Var};
use std::path::{Path, PathBuf};
use taper_data::{datasets, prepare, tokenizer, Batch, Shard, WindowSampler};
use taper_model::{ModelConfig, Rng, Weights};

pub struct PreparedData {
    pub dir: PathBuf,
    pub tokenizer: PathBuf,
    pub meta: prepare::Meta,
}

/// Finds or builds the token shards the config asks for. Built shards go to `run_dir/data`
/// and are reused while the data settings are unchanged.
pub fn prepare_data(cfg: &DataConfig, run_dir: &Path, obs: &mut dyn Observer) -> Result<PreparedData> {
    if let Some(dir) = &cfg.shards {
        let dir = PathBuf::from(dir);
        let meta = prepare::read_meta(&dir)?;
        return Ok(PreparedData { tokenizer: dir.join("tokenizer.json"), dir, meta });
    }
    let dir = run_dir.join("data");
    let key = serde_json::to_string(cfg).expect("data config serialises");
    let key_path = dir.join("prepared_from.json");
    if std::fs::read_to_string(&key_path).ok().as_deref() == Some(key.as_str()) {
        if let Ok(meta) = prepare::read_meta(&dir) {
            return Ok(PreparedData { tokenizer: dir.join("tokenizer.json"), dir, meta });
        }
    }
    let files: Vec<PathBuf> = match &cfg.dataset {
        Some(name) => {
            let b = datasets::find(name).ok_or_else(|| TrainError::Invalid(format!("unknown dataset {name:?}")))?;
            vec![datasets::resolve(b, |d, t| obs.download(d, t))?]
        }
        None => cfg.files.iter().map(PathBuf::from).collect(),
    };
    for f in &files {
        if !f.exists() {
            return Err(TrainError::Invalid(format!("data file {} does not exist", f.display())));
        }
    }
    let text_files: Vec<PathBuf> =
        files.iter().filter(|f| f.extension().is_none_or(|e| e != "jsonl")).cloned().collect();
    let tok = match cfg.tokenizer.as_str() {
        kind @ ("char" | "bpe") => {
            let kind = if kind == "char" { tokenizer::TokenizerKind::Char } else { tokenizer::TokenizerKind::Bpe };
            obs.message(&format!("training a {kind:?} tokenizer on {} file(s)", files.len()));
            let train_on = if text_files.is_empty() { dump_jsonl_text(&files, &dir)? } else { text_files };
            tokenizer::train(kind, &train_on, cfg.tokenizer_vocab_size, &cfg.special_tokens)?
        }
        path => tokenizer::load(Path::new(path))?,
    };
    let docs = prepare::read_documents(&files)?;
    let sources: Vec<String> = files.iter().map(|f| f.display().to_string()).collect();
    let meta = prepare::prepare(&tok, &docs, &sources, &dir, cfg.val_fraction)?;
    std::fs::write(&key_path, key).map_err(io_err(&key_path))?;
    obs.message(&format!(
        "prepared {} train and {} val tokens in {}",
        meta.train_tokens,
        meta.val_tokens,
        dir.display()
    ));
    Ok(PreparedData { tokenizer: dir.join("tokenizer.json"), dir, meta })
}

/// Tokenizer training reads plain text files; JSONL documents are written out as one.
fn dump_jsonl_text(files: &[PathBuf], dir: &Path) -> Result<Vec<PathBuf>> {
    std::fs::create_dir_all(dir).map_err(io_err(dir))?;
    let p = dir.join("tokenizer_corpus.txt");
    let docs = prepare::read_documents(files)?;
    std::fs::write(&p, docs.join("\n")).map_err(io_err(&p))?;
    Ok(vec![p])
}

/// The model config with `vocab_size` taken from (and checked against) the tokenizer.
pub fn resolve_vocab(cfg: &mut RunConfig, tokenizer_path: &Path, tok_vocab: usize) -> Result<()> {
    if cfg.model.vocab_size == 0 {
        cfg.model.vocab_size = tok_vocab;
    } else if cfg.model.vocab_size < tok_vocab {
        return Err(TrainError::Invalid(format!(
            "tokenizer {} has {tok_vocab} tokens but model.vocab_size = {} (set it to 0 to follow the tokenizer)",
            tokenizer_path.display(),
            cfg.model.vocab_size
        )));
    }
    Ok(())
}

/// The trainable weights of a from-scratch run: drawn from the seed, or the checkpoint's.
pub fn weights(model: &ModelConfig, seed: u64, ck: Option<&Checkpoint>, dev: &Device) -> Result<Vec<(String, Var)>> {
    let named = match ck {
        None => taper_model::init_weights(model, seed, dev)?,
        Some(ck) => taper_model::param_specs(model)
            .into_iter()
            .map(|(name, _, _)| {
                let t = ck.model.get(&name).ok_or_else(|| TrainError::Checkpoint {
                    path: ck.dir.display().to_string(),
                    reason: format!("tensor `{name}` is missing"),
                })?;
                Ok((name, t.clone()))
            })
            .collect::<Result<_>>()?,
    };
    named.into_iter().map(|(n, t)| Ok((n, Var::from_tensor(&t)?))).collect()
}

/// A language-modelling corpus ready to train on: the prepared shards, their tokenizer, and
/// windows of `model.block_size + 1` tokens drawn from the train and validation splits.
pub struct Windows {
    pub data: PreparedData,
    pub tokenizer: tokenizers::Tokenizer,
    pub train: WindowSampler,
    pub val: WindowSampler,
}

impl Windows {
    /// Prepares (or reuses) the config's data and fills `model.vocab_size` from its tokenizer.
    pub fn open(cfg: &mut RunConfig, run_dir: &Path, obs: &mut dyn Observer) -> Result<Self> {
        let data = prepare_data(&cfg.data, run_dir, obs)?;
        let tok = tokenizer::load(&data.tokenizer)?;
        resolve_vocab(cfg, &data.tokenizer, tokenizer::vocab_size(&tok))?;
        let (t, b) = (cfg.model.block_size, cfg.train.batch_size);
        let train = WindowSampler::new(Shard::open(&data.dir.join("train.bin"))?, t, b, cfg.seed)?;
        // Validation windows come from a stream of their own, the same at every evaluation.
        let val = WindowSampler::new(Shard::open(&data.dir.join("val.bin"))?, t, b, cfg.seed ^ 0x5641_4C49_4441_5445)?;
        Ok(Self { data, tokenizer: tok, train, val })
    }
}

/// What a language-modelling objective on corpus windows supplies: the loss of a batch of
/// windows and the held-out evaluation. Causal LM (the decoder) and masked LM (the encoder)
/// are the two.
pub trait WindowObjective {
    /// The loss of micro-batch `at`, holding `batch`; `rng` draws dropout when it is on.
    fn loss(&mut self, batch: &Batch, at: Micro, rng: Option<&mut Rng>) -> Result<Tensor>;
    /// The held-out evaluation over the first `n` validation batches of `val`.
    fn evaluate(&mut self, val: &WindowSampler, n: usize, step: u64, obs: &mut dyn Observer) -> Result<Evaluation>;
    /// Samples for the sinks (see [`crate::trainer::Recipe::samples`]); `windows` gives the
    /// default prompts.
    fn samples(&mut self, _windows: &Windows, _prompts: &[String], _max_new: usize) -> Result<Vec<(String, String)>> {
        Ok(Vec::new())
    }
}

/// Trains the objective `make` builds (over the run's weights) on windows of the config's
/// corpus: each step reads one seeded stream of windows, micro-batch slot k (over all replicas)
/// its k-th run of `batch_size`, a pure function of (seed, step, k).
pub fn train_on_windows<O: WindowObjective>(
    cfg: RunConfig,
    run: RunSpec,
    obs: &mut dyn Observer,
    make: impl FnOnce(&RunConfig, &Windows, &Weights) -> Result<O>,
) -> Result<Summary> {
    trainer::train(cfg, run, obs, |cfg, env| {
        let windows = Windows::open(cfg, env.run_dir, env.obs)?;
        let params = weights(&cfg.model, cfg.seed, env.checkpoint, &env.device)?;
        let objective = make(cfg, &windows, &Weights::from_vars(&params))?;
        let (contents, meta) = (Contents::scratch(&windows.data.tokenizer), windows.data.meta.clone());
        let recipe = OnWindows {
            objective,
            windows,
            seed: cfg.seed,
            dropout: cfg.model.dropout > 0.0,
            eval_batches: cfg.train.eval_batches,
            tokens: 0,
        };
        let (vocab_size, train_tokens, val_tokens) = (cfg.model.vocab_size, meta.train_tokens, meta.val_tokens);
        Ok(Built { recipe, params, contents, vocab_size, train_tokens, val_tokens })
    })
}

struct OnWindows<O> {
    objective: O,
    windows: Windows,
    seed: u64,
    dropout: bool,
    eval_batches: usize,
    /// Trained on in the current step.
    tokens: u64,
}

impl<O: WindowObjective> Recipe for OnWindows<O> {
    type Error = TrainError;

    fn loss(&mut self, at: Micro) -> Result<Tensor> {
        let b = self.windows.train.batch_size() as u64;
        let batch = self.windows.train.batch_at(at.step, at.slot() as u64 * b);
        self.tokens += (batch.batch * batch.seq) as u64;
        let mut rng = at.dropout_rng(self.seed);
        self.objective.loss(&batch, at, self.dropout.then_some(&mut rng))
    }

    fn end_step(&mut self, _step: u64) -> Result<StepReport> {
        Ok(StepReport { tokens: std::mem::take(&mut self.tokens), ..Default::default() })
    }

    fn evaluate(&mut self, step: u64, obs: &mut dyn Observer) -> Result<Evaluation> {
        self.objective.evaluate(&self.windows.val, self.eval_batches, step, obs)
    }

    fn samples(&mut self, _step: u64, prompts: &[String], max_new: usize) -> Result<Vec<(String, String)>> {
        self.objective.samples(&self.windows, prompts, max_new)
    }
}
