//! Where every logged metric and text sample goes. `metrics.jsonl` is one sink; other writers
//! (TensorBoard's event files) implement [`Sink`] and join the loop's list.

use crate::observe::StepLog;
use crate::{io_err, Result};
use serde_json::{Map, Value};
use std::io::Write;
use std::path::{Path, PathBuf};

pub trait Sink {
    /// A logged step: the loop's fields, then the recipe's metrics.
    fn step(&mut self, log: &StepLog, metrics: &Map<String, Value>) -> Result<()>;
    /// A line that is not a training step's: an evaluation before the first step or after the last.
    fn record(&mut self, step: u64, metrics: &Map<String, Value>) -> Result<()>;
    /// A text sample, such as a generation at an eval step.
    fn text(&mut self, _step: u64, _tag: &str, _text: &str) -> Result<()> {
        Ok(())
    }
}

/// `metrics.jsonl`: one JSON object per line.
pub struct Jsonl {
    file: std::fs::File,
    path: PathBuf,
}

impl Jsonl {
    /// Opens the run's log for appending, cut back to the lines of steps up to `step` (the
    /// resumed step; 0 starts it afresh), so a resumed run's log reads as one run.
    pub fn open(run_dir: &Path, step: u64) -> Result<Self> {
        let path = run_dir.join("metrics.jsonl");
        let kept: String = match std::fs::read_to_string(&path) {
            Ok(s) if step > 0 => s
                .lines()
                .filter(|l| {
                    serde_json::from_str::<Value>(l).ok().and_then(|v| v["step"].as_u64()).is_some_and(|s| s <= step)
                })
                .map(|l| format!("{l}\n"))
                .collect(),
            _ => String::new(),
        };
        std::fs::write(&path, kept).map_err(io_err(&path))?;
        let file = std::fs::OpenOptions::new().append(true).open(&path).map_err(io_err(&path))?;
        Ok(Self { file, path })
    }

    fn write(&mut self, line: &Value) -> Result<()> {
        writeln!(self.file, "{line}").map_err(io_err(&self.path))
    }
}

impl Sink for Jsonl {
    fn step(&mut self, log: &StepLog, metrics: &Map<String, Value>) -> Result<()> {
        let mut line = serde_json::to_value(log).expect("a step log serialises");
        if let Some(obj) = line.as_object_mut() {
            obj.extend(metrics.clone());
        }
        self.write(&line)
    }

    fn record(&mut self, step: u64, metrics: &Map<String, Value>) -> Result<()> {
        let mut line = Map::new();
        line.insert("step".into(), step.into());
        line.extend(metrics.clone());
        self.write(&Value::Object(line))
    }
}
