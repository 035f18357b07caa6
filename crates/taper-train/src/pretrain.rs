//! The pretraining recipe, top to bottom: data, model, optimizer, then the loop
//! (forward, backward, accumulate, clip, update, log, eval, checkpoint).

use crate::checkpoint::{self, TrainerState};
use crate::config::{DataConfig, Objective, RunConfig};
use crate::mlm::{self, Masker};
use crate::optim::{Optimizer, Param};
use crate::steps::{accumulate, guarded_update, save_checkpoint, Metrics};
use crate::{io_err, Result, TrainError};
use candle_core::{DType, Device, Tensor, Var};
use serde::Serialize;
use std::path::{Path, PathBuf};
use std::time::Instant;
use taper_data::{datasets, prepare, tokenizer, Shard, WindowSampler};
use taper_model::{init_weights, Bert, Decoder, ModelKind, Rng, Weights};

/// What the loop reports as it goes; the CLI draws a progress bar from it.
pub trait Observer {
    fn started(&mut self, _info: &RunInfo) {}
    fn step(&mut self, _log: &StepLog) {}
    fn eval(&mut self, _step: u64, _val_loss: f64) {}
    fn checkpoint(&mut self, _dir: &Path) {}
    fn message(&mut self, _msg: &str) {}
    fn download(&mut self, _done: u64, _total: u64) {}
}

/// An observer that ignores everything (tests, library use).
pub struct Quiet;
impl Observer for Quiet {}

#[derive(Debug, Clone)]
pub struct RunInfo {
    pub start_step: u64,
    pub end_step: u64,
    pub params: usize,
    pub vocab_size: usize,
    pub train_tokens: usize,
    pub val_tokens: usize,
    pub device: String,
}

/// One line of `metrics.jsonl`.
#[derive(Debug, Clone, Serialize)]
pub struct StepLog {
    pub step: u64,
    pub loss: f64,
    pub lr: f64,
    pub grad_norm: f64,
    pub tokens_per_sec: f64,
    pub tokens: u64,
    pub elapsed_s: f64,
    pub skipped_steps: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub val_loss: Option<f64>,
}

impl StepLog {
    /// A line whose throughput and elapsed time [`crate::steps::Metrics::step`] fills in.
    pub fn new(step: u64, loss: f64, lr: f64, grad_norm: f64, tokens: u64, skipped: u64, val: Option<f64>) -> Self {
        Self {
            step,
            loss,
            lr,
            grad_norm,
            tokens_per_sec: 0.0,
            tokens,
            elapsed_s: 0.0,
            skipped_steps: skipped,
            val_loss: val,
        }
    }
}

#[derive(Debug, Clone)]
pub struct Summary {
    pub step: u64,
    pub train_loss: f64,
    pub val_loss: Option<f64>,
    pub elapsed_s: f64,
    pub checkpoint: Option<PathBuf>,
}

#[derive(Debug, Clone, PartialEq)]
pub enum Resume {
    No,
    /// The newest checkpoint in the run dir.
    Latest,
    Dir(PathBuf),
}

impl Resume {
    /// The checkpoint to resume from, if any.
    pub fn dir(&self, ck_root: &Path) -> Result<Option<PathBuf>> {
        Ok(match self {
            Resume::No => None,
            Resume::Latest => Some(checkpoint::latest(ck_root).ok_or_else(|| {
                TrainError::Invalid(format!("--resume: no complete checkpoint in {}", ck_root.display()))
            })?),
            Resume::Dir(d) => Some(d.clone()),
        })
    }
}

/// `metrics.jsonl` opened for appending, cut back to the lines of steps up to `step` (the
/// resumed step; 0 starts it afresh), so a resumed run's log reads as one run.
pub fn open_metrics(path: &Path, step: u64) -> Result<std::fs::File> {
    let kept: String = match std::fs::read_to_string(path) {
        Ok(s) if step > 0 => s
            .lines()
            .filter(|l| {
                serde_json::from_str::<serde_json::Value>(l)
                    .ok()
                    .and_then(|v| v["step"].as_u64())
                    .is_some_and(|s| s <= step)
            })
            .map(|l| format!("{l}\n"))
            .collect(),
        _ => String::new(),
    };
    std::fs::write(path, kept).map_err(io_err(path))?;
    std::fs::OpenOptions::new().append(true).open(path).map_err(io_err(path))
}

/// "auto" picks CUDA, then Metal, then the CPU.
pub fn select_device(spec: &str) -> Result<Device> {
    let dev = match spec {
        "cpu" => Device::Cpu,
        "metal" => Device::new_metal(0)?,
        "auto" => {
            if candle_core::utils::cuda_is_available() {
                Device::new_cuda(0)?
            } else if candle_core::utils::metal_is_available() {
                Device::new_metal(0)?
            } else {
                Device::Cpu
            }
        }
        s => {
            let n = s.strip_prefix("cuda").map(|r| r.trim_start_matches(':')).unwrap_or("x");
            let n: usize = if n.is_empty() {
                0
            } else {
                n.parse().map_err(|_| TrainError::Invalid(format!("device {s:?}: expected cuda:N")))?
            };
            Device::new_cuda(n)?
        }
    };
    Ok(dev)
}

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

/// Batch (B, T) ids and (B*T,) targets as tensors.
fn batch_tensors(b: &taper_data::Batch, dev: &Device) -> Result<(Tensor, Tensor)> {
    let inputs = Tensor::from_vec(b.inputs.clone(), (b.batch, b.seq), dev)?;
    let targets: Vec<i64> = b.targets.iter().map(|&t| t as i64).collect();
    Ok((inputs, Tensor::from_vec(targets, b.batch * b.seq, dev)?))
}

/// The mean loss over micro-batches (input (B, T), targets (B*T,)) and, for each parameter, the
/// gradient of that mean: each micro-batch backpropagates loss / n and the gradients add up.
/// `rngs` (one per micro-batch) turns dropout on.
pub fn loss_and_grads(
    model: &Decoder,
    params: &[Param],
    micro: &[(Tensor, Tensor)],
    mut rngs: Option<Vec<Rng>>,
) -> Result<(f64, Vec<Tensor>)> {
    accumulate(params, micro.len(), |i| {
        let (x, y) = &micro[i];
        let rng = rngs.as_mut().map(|r| &mut r[i]);
        let h = model.forward_hidden(x, 0, None, rng)?; // (B, T, C)
        Ok::<_, TrainError>(model.head_loss(&h, y, -100)?.0)
    })
}

/// Mean loss over `n` fixed validation batches, with no backward graph.
pub fn evaluate(model: &Decoder, sampler: &WindowSampler, n: usize) -> Result<f64> {
    let mut total = 0.0;
    for i in 0..n {
        let (x, y) = batch_tensors(&sampler.batch(i as u64, 0), model.device())?;
        let (loss, _) = model.head_loss(&model.forward_hidden(&x, 0, None, None)?, &y, -100)?;
        total += loss.to_dtype(DType::F64)?.to_scalar::<f64>()?;
    }
    Ok(total / n as f64)
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

/// What the loop trains: the training model (over the optimizer's variables) and its detached
/// twin for evaluation.
enum Task {
    // Boxed, both: the two model structs differ in size by hundreds of bytes.
    Clm {
        model: Box<Decoder>,
        eval: Box<Decoder>,
    },
    Mlm {
        model: Box<Bert>,
        eval: Box<Bert>,
        masker: Masker,
        /// The most frequent training token: the accuracy baseline.
        unigram: u32,
    },
}

pub fn pretrain(mut cfg: RunConfig, run_dir: &Path, resume: Resume, obs: &mut dyn Observer) -> Result<Summary> {
    if cfg.model.kind == taper_model::ModelKind::EncoderDecoder {
        return crate::seq2seq::train(cfg, run_dir, resume, obs);
    }
    let started = Instant::now();
    let device = select_device(&cfg.device)?;
    std::fs::create_dir_all(run_dir).map_err(io_err(run_dir))?;
    let ck_root = run_dir.join("checkpoints");
    let resume_dir = resume.dir(&ck_root)?;

    // Data and tokenizer.
    let data = prepare_data(&cfg.data, run_dir, obs)?;
    let tok = tokenizer::load(&data.tokenizer)?;
    let tok_sha = tokenizer::sha256_file(&data.tokenizer)?;
    resolve_vocab(&mut cfg, &data.tokenizer, tokenizer::vocab_size(&tok))?;
    let t = cfg.model.block_size;
    let train = WindowSampler::new(Shard::open(&data.dir.join("train.bin"))?, t, cfg.train.batch_size, cfg.seed)?;
    let val = WindowSampler::new(
        Shard::open(&data.dir.join("val.bin"))?,
        t,
        cfg.train.batch_size,
        cfg.seed ^ 0x5641_4C49_4441_5445,
    )?;

    // Model and optimizer: fresh, or from the checkpoint.
    let ck = match &resume_dir {
        Some(d) => Some(checkpoint::load(d, &device)?),
        None => None,
    };
    let encoder = cfg.model.kind == ModelKind::Encoder;
    let named: Vec<(String, Tensor)> = match &ck {
        None if encoder => taper_model::bert::init_weights(&cfg.model, cfg.seed, &device)?,
        None => init_weights(&cfg.model, cfg.seed, &device)?,
        Some(ck) => {
            let saved: RunConfig = toml::from_str(&ck.state.config).map_err(|e| TrainError::Checkpoint {
                path: ck.dir.display().to_string(),
                reason: format!("saved config: {e}"),
            })?;
            if saved.model != cfg.model {
                return Err(TrainError::Checkpoint {
                    path: ck.dir.display().to_string(),
                    reason: "its [model] config differs from this run's".into(),
                });
            }
            if ck.state.tokenizer_sha256 != tok_sha {
                return Err(TrainError::Checkpoint {
                    path: ck.dir.display().to_string(),
                    reason: format!("trained with another tokenizer than {}", data.tokenizer.display()),
                });
            }
            let specs = match encoder {
                true => taper_model::bert::param_specs(&cfg.model),
                false => taper_model::param_specs(&cfg.model),
            };
            specs
                .into_iter()
                .map(|(name, _, _)| {
                    let t = ck.model.get(&name).ok_or_else(|| TrainError::Checkpoint {
                        path: ck.dir.display().to_string(),
                        reason: format!("tensor `{name}` is missing"),
                    })?;
                    Ok((name, t.clone()))
                })
                .collect::<Result<_>>()?
        }
    };
    let vars: Vec<(String, Var)> =
        named.into_iter().map(|(n, t)| Ok((n, Var::from_tensor(&t)?))).collect::<Result<_>>()?;
    let weights = Weights::from_pairs(vars.iter().map(|(n, v)| (n.clone(), v.as_tensor().clone())));
    let task = match cfg.objective {
        Objective::Clm => Task::Clm {
            model: Box::new(Decoder::load(&weights, &cfg.model)?),
            eval: Box::new(Decoder::load(&weights.detached(), &cfg.model)?),
        },
        Objective::Mlm => {
            let masker = Masker::from_tokenizer(&tok, &data.tokenizer, cfg.mlm_probability)?;
            let unigram = masker.most_frequent(train.shard());
            Task::Mlm {
                model: Box::new(Bert::load(&weights, &cfg.model)?),
                eval: Box::new(Bert::load(&weights.detached(), &cfg.model)?),
                masker,
                unigram,
            }
        }
    };
    let n_params: usize = vars.iter().map(|(_, v)| v.elem_count()).sum();
    let mut opt = Optimizer::new(cfg.optim.clone(), vars)?;
    // From-scratch checkpoints keep the data cursor at the step, so the step is where to go on.
    let (mut step, mut tokens, mut skipped) = crate::finetune::resume_optimizer(&mut opt, ck, obs)?;

    // The run dir: resolved config and metrics (cut back to the resumed step).
    let cfg_path = run_dir.join("config.toml");
    std::fs::write(&cfg_path, cfg.to_toml()).map_err(io_err(&cfg_path))?;
    let mut metrics = Metrics::open(run_dir, step, started)?;

    let tc = cfg.train.clone();
    let end = tc.end_step();
    obs.started(&RunInfo {
        start_step: step,
        end_step: end,
        params: n_params,
        vocab_size: cfg.model.vocab_size,
        train_tokens: data.meta.train_tokens,
        val_tokens: data.meta.val_tokens,
        device: format!("{device:?}"),
    });

    let tokens_per_step = (tc.batch_size * tc.grad_accum_steps * t) as u64;
    let (mut last_loss, mut last_val, mut last_ck) = (f64::NAN, None, None);
    while step < end {
        let lr = cfg.schedule.lr(step, cfg.optim.lr, tc.max_steps);
        let micro: Vec<(Tensor, Tensor)> = (0..tc.grad_accum_steps as u64)
            .map(|m| match &task {
                Task::Mlm { masker, .. } => {
                    masker.batch_tensors(&train.batch(step, m), &mut Masker::rng(cfg.seed, step, m), &device)
                }
                Task::Clm { .. } => batch_tensors(&train.batch(step, m), &device),
            })
            .collect::<Result<_>>()?;
        let rngs: Vec<Rng> = (0..tc.grad_accum_steps as u64).map(|m| Rng::derive(cfg.seed, &[step, m])).collect();
        let dropout = (cfg.model.dropout > 0.0).then_some(rngs);
        let (loss, grads) = match &task {
            Task::Clm { model, .. } => loss_and_grads(model, opt.params(), &micro, dropout)?,
            Task::Mlm { model, .. } => mlm::loss_and_grads(model, opt.params(), &micro, dropout)?,
        };
        let norm = guarded_update(&mut opt, grads, loss, lr, &tc, step, &mut skipped, obs)?;
        step += 1;
        tokens += tokens_per_step;
        metrics.add_tokens(tokens_per_step);
        last_loss = loss;

        let (mut val_loss, mut extra) = (None, None);
        if tc.eval_due(step) {
            let v = match &task {
                Task::Clm { eval, .. } => evaluate(eval, &val, tc.eval_batches)?,
                Task::Mlm { eval, masker, unigram, .. } => {
                    let e = mlm::evaluate(eval, &val, tc.eval_batches, masker, cfg.seed, *unigram)?;
                    obs.message(&format!(
                        "step {step}: masked-token accuracy {:.2}% on {} val tokens (unigram baseline, always the \
                         most frequent training token: {:.2}%)",
                        100.0 * e.accuracy,
                        e.masked,
                        100.0 * e.unigram_accuracy
                    ));
                    extra = Some(serde_json::json!({"val_mlm_accuracy": e.accuracy,
                        "val_unigram_accuracy": e.unigram_accuracy, "val_masked_tokens": e.masked}));
                    e.loss
                }
            };
            obs.eval(step, v);
            last_val = Some(v);
            val_loss = Some(v);
        }
        if step % tc.log_every == 0 || val_loss.is_some() || step == end {
            let log = StepLog::new(step, loss, lr, norm, tokens, skipped, val_loss);
            metrics.step(log, extra, obs)?;
        }
        if tc.checkpoint_due(step) {
            let state = TrainerState::scratch(step, tokens, cfg.seed, skipped, last_val, &tok_sha, cfg.to_toml());
            let keep = tc.keep_checkpoints;
            last_ck =
                Some(save_checkpoint(&ck_root, &opt, Vec::new(), state, &data.tokenizer, keep, |_, _| Ok(()), obs)?);
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
    use crate::optim::OptimConfig;
    use taper_model::ModelConfig;

    /// 4 micro-batches of B/4 rows give the gradients of one batch of B rows.
    #[test]
    fn grad_accumulation_equals_one_big_batch() -> Result<()> {
        let cfg =
            ModelConfig { vocab_size: 23, n_layer: 2, n_head: 2, n_embd: 16, block_size: 8, ..Default::default() };
        let dev = Device::Cpu;
        let vars: Vec<(String, Var)> = init_weights(&cfg, 3, &dev)?
            .into_iter()
            .map(|(n, t)| Ok((n, Var::from_tensor(&t)?)))
            .collect::<Result<_>>()?;
        let w = Weights::from_pairs(vars.iter().map(|(n, v)| (n.clone(), v.as_tensor().clone())));
        let model = Decoder::load(&w, &cfg)?;
        let opt = Optimizer::new(OptimConfig::default(), vars)?;
        let mut rng = Rng::new(9);
        let ids: Vec<u32> = (0..8 * 8).map(|_| rng.below(23) as u32).collect();
        let tg: Vec<i64> = (0..8 * 8).map(|_| rng.below(23) as i64).collect();
        let x = Tensor::from_vec(ids, (8, 8), &dev)?;
        let y = Tensor::from_vec(tg, 64, &dev)?;
        let (big_loss, big) = loss_and_grads(&model, opt.params(), &[(x.clone(), y.clone())], None)?;
        let micro: Vec<(Tensor, Tensor)> =
            (0..4).map(|i| Ok((x.narrow(0, 2 * i, 2)?, y.narrow(0, 16 * i, 16)?))).collect::<Result<_>>()?;
        let (acc_loss, acc) = loss_and_grads(&model, opt.params(), &micro, None)?;
        assert!((big_loss - acc_loss).abs() < 1e-6, "{big_loss} vs {acc_loss}");
        for ((a, b), p) in big.iter().zip(&acc).zip(opt.params()) {
            let diff = (a - b)?.abs()?.max_all()?.to_scalar::<f32>()?;
            let scale = a.abs()?.max_all()?.to_scalar::<f32>()?;
            assert!(diff <= 1e-6 * scale.max(1.0), "{}: max diff {diff} (scale {scale})", p.name);
        }
        Ok(())
    }
}
