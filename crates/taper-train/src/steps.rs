//! The parts of a training loop every recipe shares, so each recipe keeps only its own
//! forward pass: the guarded optimizer update, the metrics log and the checkpoint write.

use crate::checkpoint::{self, TrainerState};
use crate::config::{OnNonFinite, TrainConfig};
use crate::optim::{global_norm, Optimizer, Param};
use crate::pretrain::{open_metrics, Observer, StepLog};
use crate::{io_err, Result, TrainError};
use candle_core::Tensor;
use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

impl TrainConfig {
    /// The last step this invocation runs (`stop_at_step` cuts a run short, schedule unchanged).
    pub fn end_step(&self) -> u64 {
        if self.stop_at_step > 0 {
            self.stop_at_step.min(self.max_steps)
        } else {
            self.max_steps
        }
    }

    fn due(&self, step: u64, every: u64) -> bool {
        (every > 0 && step.is_multiple_of(every)) || step == self.end_step()
    }

    pub fn eval_due(&self, step: u64) -> bool {
        self.due(step, self.eval_every)
    }

    pub fn checkpoint_due(&self, step: u64) -> bool {
        self.due(step, self.checkpoint_every)
    }
}

/// The mean of `n` micro-batch losses and, for each parameter, the gradient of that mean:
/// each micro-batch backpropagates loss / n and the gradients add up, so accumulation over
/// micro-batches equals one big batch.
pub fn accumulate<E: From<candle_core::Error> + From<TrainError>>(
    params: &[Param],
    n: usize,
    mut micro_loss: impl FnMut(usize) -> std::result::Result<Tensor, E>,
) -> std::result::Result<(f64, Vec<Tensor>), E> {
    let mut grads: Vec<Option<Tensor>> = vec![None; params.len()];
    let mut loss_sum = 0.0;
    for i in 0..n {
        let loss = micro_loss(i)?;
        loss_sum += loss.to_dtype(candle_core::DType::F64)?.to_scalar::<f64>()?;
        let store = (loss / n as f64)?.backward()?;
        for (acc, p) in grads.iter_mut().zip(params) {
            let g = store
                .get(p.var.as_tensor())
                .ok_or_else(|| TrainError::Invalid(format!("no gradient reached `{}`", p.name)))?;
            *acc = Some(match acc.take() {
                Some(a) => (a + g)?,
                None => g.clone(),
            });
        }
    }
    Ok((loss_sum / n as f64, grads.into_iter().map(|g| g.expect("every micro-batch fills every slot")).collect()))
}

/// Checks the step's loss and gradients, clips, and applies the update. A non-finite loss or
/// gradient norm stops the run or, with `on_nonfinite = "skip"`, leaves the weights as they
/// are and counts the step in `skipped`. Returns the gradient norm before clipping.
#[allow(clippy::too_many_arguments)]
pub fn guarded_update(
    opt: &mut Optimizer,
    mut grads: Vec<Tensor>,
    loss: f64,
    lr: f64,
    tc: &TrainConfig,
    step: u64,
    skipped: &mut u64,
    obs: &mut dyn Observer,
) -> Result<f64> {
    let norm = global_norm(&grads)?;
    let bad = if !loss.is_finite() {
        Some(("loss", loss))
    } else if !norm.is_finite() {
        Some(("gradient norm", norm))
    } else {
        None
    };
    match (bad, tc.on_nonfinite) {
        (Some((what, value)), OnNonFinite::Stop) => return Err(TrainError::NonFinite { step: step + 1, what, value }),
        (Some((what, value)), OnNonFinite::Skip) => {
            *skipped += 1;
            obs.message(&format!("step {}: {what} is {value}; skipped ({skipped} so far)", step + 1));
        }
        (None, _) => {
            if tc.grad_clip > 0.0 && norm > tc.grad_clip {
                let scale = tc.grad_clip / (norm + 1e-6);
                grads = grads.iter().map(|g| g * scale).collect::<candle_core::Result<_>>()?;
            }
            opt.step(&grads, lr)?;
        }
    }
    Ok(norm)
}

/// `metrics.jsonl` and the throughput window behind its tokens/s.
pub struct Metrics {
    file: std::fs::File,
    path: PathBuf,
    started: Instant,
    window: (Instant, u64),
}

impl Metrics {
    /// Opens the run's log, cut back to `step` (see [`open_metrics`]).
    pub fn open(run_dir: &Path, step: u64, started: Instant) -> Result<Self> {
        let path = run_dir.join("metrics.jsonl");
        let file = open_metrics(&path, step)?;
        Ok(Self { file, path, started, window: (Instant::now(), 0) })
    }

    /// Counts tokens towards the current throughput window.
    pub fn add_tokens(&mut self, n: u64) {
        self.window.1 += n;
    }

    /// The step's line with throughput since the last line; `extra` (an object) adds
    /// recipe-specific keys. Reported to `obs` and a new window started.
    pub fn step(
        &mut self,
        mut log: StepLog,
        extra: Option<serde_json::Value>,
        obs: &mut dyn Observer,
    ) -> Result<StepLog> {
        log.tokens_per_sec = self.window.1 as f64 / self.window.0.elapsed().as_secs_f64().max(1e-9);
        log.elapsed_s = self.started.elapsed().as_secs_f64();
        let mut line = serde_json::to_value(&log).expect("log serialises");
        if let (Some(serde_json::Value::Object(extra)), Some(obj)) = (extra, line.as_object_mut()) {
            obj.extend(extra);
        }
        self.write(&line)?;
        obs.step(&log);
        self.window = (Instant::now(), 0);
        Ok(log)
    }

    /// Any other line (an end-of-run evaluation).
    pub fn write(&mut self, line: &serde_json::Value) -> Result<()> {
        writeln!(self.file, "{line}").map_err(io_err(&self.path))
    }
}

/// Writes the optimizer's parameters (and `frozen` weights beside them) and its state as the
/// next checkpoint (atomically), keeps the newest `keep`, and reports it. `extra` adds files to
/// the checkpoint before it is sealed; it sees the trained tensors.
#[allow(clippy::too_many_arguments)]
pub fn save_checkpoint(
    ck_root: &Path,
    opt: &Optimizer,
    frozen: Vec<(String, Tensor)>,
    state: TrainerState,
    tokenizer: &Path,
    keep: usize,
    extra: impl FnOnce(&Path, &HashMap<String, Tensor>) -> Result<()>,
    obs: &mut dyn Observer,
) -> Result<PathBuf> {
    let trained: HashMap<String, Tensor> =
        opt.params().iter().map(|p| (p.name.clone(), p.var.as_tensor().clone())).collect();
    let mut model = trained.clone();
    model.extend(frozen);
    let dir = checkpoint::save(ck_root, &model, &opt.state_tensors(), tokenizer, state, |tmp| extra(tmp, &trained))?;
    checkpoint::prune(ck_root, keep)?;
    obs.checkpoint(&dir);
    Ok(dir)
}
