//! Where every logged metric and text sample goes: `metrics.jsonl`, and TensorBoard's event
//! files in the run dir's `tb/`. Other writers implement [`Sink`] and join the loop's list.

use crate::observe::StepLog;
use crate::tensorboard::EventWriter;
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
    /// The values of one tensor, for a histogram.
    fn histogram(&mut self, _step: u64, _tag: &str, _values: &[f32]) -> Result<()> {
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

/// TensorBoard event files in `<run dir>/tb/`, one per session: every number of a
/// `metrics.jsonl` line as a scalar of the same name at the same step, text samples, the
/// resolved config, histograms.
pub struct TensorBoard {
    w: EventWriter,
}

impl TensorBoard {
    /// A new event file for a session that starts after `step` (0: a fresh run). It opens with
    /// TensorBoard's restart marker, `SessionLog START`, at `step + 1`: TensorBoard drops the
    /// points an earlier session left at or after that step (the tail a resume abandons), as
    /// `metrics.jsonl` is cut back to `step`. The config is written as text at `step`.
    pub fn open(run_dir: &Path, step: u64, config_toml: &str) -> Result<Self> {
        let dir = run_dir.join("tb");
        let w = EventWriter::create(&dir).map_err(io_err(&dir))?;
        let mut tb = Self { w };
        tb.w.session_start(if step == 0 { 0 } else { step + 1 }).map_err(io_err(tb.w.path()))?;
        tb.text(step, "config", &format!("```toml\n{config_toml}\n```"))?;
        Ok(tb)
    }

    /// Every number in `line` but the step: a scalar; a list (a config change): text.
    fn scalars(&mut self, step: u64, line: &Map<String, Value>) -> Result<()> {
        for (k, v) in line {
            match v {
                Value::Number(n) if k != "step" => {
                    let x = n.as_f64().unwrap_or(f64::NAN);
                    self.w.scalar(k, step, x).map_err(io_err(self.w.path()))?;
                }
                Value::Array(items) => {
                    let text: Vec<String> =
                        items.iter().map(|i| i.as_str().map_or(i.to_string(), String::from)).collect();
                    self.text(step, k, &text.join("\n\n"))?;
                }
                _ => {}
            }
        }
        Ok(())
    }
}

impl Sink for TensorBoard {
    fn step(&mut self, log: &StepLog, metrics: &Map<String, Value>) -> Result<()> {
        let line = serde_json::to_value(log).expect("a step log serialises");
        let mut all = line.as_object().cloned().unwrap_or_default();
        all.extend(metrics.clone());
        self.scalars(log.step, &all)
    }

    fn record(&mut self, step: u64, metrics: &Map<String, Value>) -> Result<()> {
        self.scalars(step, metrics)
    }

    fn text(&mut self, step: u64, tag: &str, text: &str) -> Result<()> {
        self.w.text(tag, step, text).map_err(io_err(self.w.path()))
    }

    fn histogram(&mut self, step: u64, tag: &str, values: &[f32]) -> Result<()> {
        self.w.histogram(tag, step, values).map_err(io_err(self.w.path()))
    }
}
