//! What a training run reports as it goes (the CLI draws a progress bar from it) and at its end.

use serde::Serialize;
use std::path::{Path, PathBuf};

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

/// The loop's fields of one line of `metrics.jsonl`; a recipe's metrics follow them.
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
    /// f16 runs: the loss scale the next update starts at.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub loss_scale: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub val_loss: Option<f64>,
}

#[derive(Debug, Clone)]
pub struct Summary {
    pub step: u64,
    pub train_loss: f64,
    /// What the recipe's evaluation reports ("val loss", "held-out reward") and its last value.
    pub eval_name: &'static str,
    pub eval: Option<f64>,
    pub elapsed_s: f64,
    pub checkpoint: Option<PathBuf>,
}

impl Summary {
    /// The run's closing line.
    pub fn line(&self, run_dir: &Path) -> String {
        format!(
            "done: step {} train loss {:.4} {} {} in {:.1}s; run dir {}",
            self.step,
            self.train_loss,
            self.eval_name,
            self.eval.map_or("-".into(), |v| format!("{v:.4}")),
            self.elapsed_s,
            run_dir.display()
        )
    }
}
