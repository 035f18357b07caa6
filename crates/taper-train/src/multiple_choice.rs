//! Multiple-choice tasks scored as lm-evaluation-harness (0.4.9) scores `output_type:
//! multiple_choice` with its `hf` model: each choice's summed log-likelihood as a continuation
//! of the context, `acc` from the best of them, `acc_norm` from the best per character.
//!
//! A task is JSONL, one question a line: `{"context": str, "choices": [str, ...], "label": int,
//! "id": optional}`. `scripts/convert_mc.py` writes HellaSwag, PIQA and ARC in this form with
//! lm_eval's own prompts, so the context is already the rendered `doc_to_text`.

use crate::{Result, TrainError};
use candle_core::{DType, Tensor};
use serde::Serialize;
use serde_json::Value;
use std::path::{Path, PathBuf};
use taper_model::Decoder;
use tokenizers::Tokenizer;

/// lm_eval's default `target_delimiter`: what goes between the context and each choice.
pub const TARGET_DELIMITER: &str = " ";

/// One question of a task file.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Question {
    /// The record's `id`, or its line number when it has none.
    pub id: Value,
    pub context: String,
    pub choices: Vec<String>,
    pub label: usize,
    /// Its line in the task file, for errors.
    pub line: usize,
}

/// A task: its name (the file stem, as metrics name it) and its questions.
#[derive(Debug, Clone)]
pub struct Task {
    pub name: String,
    pub path: PathBuf,
    pub questions: Vec<Question>,
}

fn bad_line(path: &Path, line: usize, reason: impl Into<String>) -> TrainError {
    TrainError::BadRecord { path: path.display().to_string(), line, reason: reason.into() }
}

/// Parses one JSONL line (1-based `line`) of a task file.
fn parse_question(path: &Path, line: usize, text: &str) -> Result<Question> {
    let v: Value = serde_json::from_str(text).map_err(|e| bad_line(path, line, format!("not valid JSON: {e}")))?;
    let Value::Object(o) = v else {
        return Err(bad_line(path, line, "expected a JSON object with context, choices and label"));
    };
    let context = match o.get("context") {
        Some(Value::String(s)) => s.clone(),
        Some(other) => return Err(bad_line(path, line, format!("context: expected a string, found {other}"))),
        None => return Err(bad_line(path, line, "missing key `context`")),
    };
    let choices = match o.get("choices") {
        Some(Value::Array(a)) => a
            .iter()
            .enumerate()
            .map(|(i, c)| match c {
                Value::String(s) => Ok(s.clone()),
                other => Err(bad_line(path, line, format!("choices[{i}]: expected a string, found {other}"))),
            })
            .collect::<Result<Vec<_>>>()?,
        Some(other) => return Err(bad_line(path, line, format!("choices: expected a list of strings, found {other}"))),
        None => return Err(bad_line(path, line, "missing key `choices`")),
    };
    if choices.is_empty() {
        return Err(bad_line(path, line, "choices is empty"));
    }
    let label = match o.get("label") {
        Some(Value::Number(n)) => match n.as_u64() {
            Some(l) if (l as usize) < choices.len() => l as usize,
            _ => {
                return Err(bad_line(
                    path,
                    line,
                    format!("label = {n}: out of range for {} choices (0..={})", choices.len(), choices.len() - 1),
                ))
            }
        },
        Some(other) => return Err(bad_line(path, line, format!("label: expected an integer, found {other}"))),
        None => return Err(bad_line(path, line, "missing key `label`")),
    };
    let id = o.get("id").cloned().unwrap_or_else(|| Value::from(line));
    Ok(Question { id, context, choices, label, line })
}

/// Reads a task file; the first bad line is an error naming it. Blank lines are skipped.
pub fn load_task(path: &Path) -> Result<Task> {
    if !path.is_file() {
        return Err(TrainError::Invalid(format!("{}: no such file", path.display())));
    }
    let text = std::fs::read_to_string(path).map_err(crate::io_err(path))?;
    let mut questions = Vec::new();
    for (i, l) in text.lines().enumerate() {
        if !l.trim().is_empty() {
            questions.push(parse_question(path, i + 1, l)?);
        }
    }
    if questions.is_empty() {
        return Err(TrainError::Invalid(format!("{}: no questions", path.display())));
    }
    let name = path.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_else(|| "task".into());
    Ok(Task { name, path: path.to_path_buf(), questions })
}

/// What scoring needs of a model: the decoder, its tokenizer, and the token an empty context
/// is replaced by (lm_eval's `prefix_token_id`: BOS, else EOS).
pub struct McModel<'a> {
    pub model: &'a Decoder,
    pub tokenizer: &'a Tokenizer,
    pub prefix_id: u32,
}

/// One log-likelihood request: the context's and the continuation's tokens.
#[derive(Debug, Clone, PartialEq)]
pub struct Request {
    pub context: Vec<u32>,
    pub continuation: Vec<u32>,
}

fn encode(tok: &Tokenizer, text: &str) -> Result<Vec<u32>> {
    // lm_eval's HFLM encodes with add_special_tokens=False for causal models (no BOS).
    Ok(taper_data::tokenizer::encode(tok, text, false)?.get_ids().to_vec())
}

/// lm_eval's request for (context, continuation): an empty context becomes the prefix token;
/// otherwise the context's trailing whitespace moves to the continuation, and the
/// continuation's tokens are those of the whole text after the context's own tokens
/// (`TemplateLM._encode_pair`), so a merge across the boundary is scored as the whole text
/// tokenises.
pub fn request(tok: &Tokenizer, prefix_id: u32, context: &str, continuation: &str) -> Result<Request> {
    if context.is_empty() {
        return Ok(Request { context: vec![prefix_id], continuation: encode(tok, continuation)? });
    }
    // Python's str.isspace(): Unicode White_Space and the separators U+001C..U+001F.
    let kept = context.trim_end_matches(|c: char| c.is_whitespace() || ('\u{1c}'..='\u{1f}').contains(&c));
    let moved = &context[kept.len()..];
    let cont = format!("{moved}{continuation}");
    let whole = encode(tok, &format!("{kept}{cont}"))?;
    let ctx = encode(tok, kept)?;
    let continuation = whole.get(ctx.len()..).unwrap_or_default().to_vec();
    // lm_eval asserts both are non-empty; say which text is at fault instead.
    if ctx.is_empty() {
        return Err(TrainError::Invalid(format!("context {context:?}: only whitespace, which lm_eval cannot score")));
    }
    Ok(Request { context: ctx, continuation })
}

/// Input ids and the number of scored positions (the last ones) of a request for a model of
/// context `max_len`: the last max_len + 1 tokens of context + continuation, less the final one
/// (lm_eval's left truncation).
fn model_input(r: &Request, max_len: usize) -> Result<(Vec<u32>, usize)> {
    if r.continuation.is_empty() {
        return Err(TrainError::Invalid("a choice adds no tokens to its context (lm_eval cannot score it)".into()));
    }
    let whole: Vec<u32> = r.context.iter().chain(&r.continuation).copied().collect();
    let start = whole.len().saturating_sub(max_len + 1);
    let input = whole[start..whole.len() - 1].to_vec();
    if r.continuation.len() > input.len() {
        return Err(TrainError::Invalid(format!(
            "a continuation of {} tokens does not fit the model's context of {max_len}",
            r.continuation.len()
        )));
    }
    Ok((input, r.continuation.len()))
}

/// Summed log-likelihoods of `requests`, `batch_size` rows per padded forward (longest first,
/// so rows of a batch are of similar length; right padding cannot reach earlier positions under
/// causal attention, as in lm_eval).
pub fn loglikelihoods(model: &Decoder, requests: &[Request], batch_size: usize) -> Result<Vec<f64>> {
    let max_len = model.config().block_size;
    let inputs = requests.iter().map(|r| model_input(r, max_len)).collect::<Result<Vec<_>>>()?;
    let mut order: Vec<usize> = (0..requests.len()).collect();
    order.sort_by_key(|&i| std::cmp::Reverse(inputs[i].0.len()));
    let dev = model.device();
    let mut out = vec![0.0f64; requests.len()];
    for chunk in order.chunks(batch_size.max(1)) {
        let t = chunk.iter().map(|&i| inputs[i].0.len()).max().unwrap_or(0);
        if t == 0 {
            continue;
        }
        let mut ids = vec![0u32; chunk.len() * t];
        // Flat (row * t + position) of each scored position, and the token it must predict.
        let (mut at, mut target) = (Vec::new(), Vec::new());
        for (row, &i) in chunk.iter().enumerate() {
            let (input, n) = &inputs[i];
            ids[row * t..row * t + input.len()].copy_from_slice(input);
            let cont = &requests[i].continuation;
            for (k, &tok) in cont.iter().enumerate() {
                at.push((row * t + input.len() - n + k) as u32);
                target.push(tok);
            }
        }
        if at.is_empty() {
            continue;
        }
        let x = Tensor::from_vec(ids, (chunk.len(), t), dev)?;
        let h = model.forward_hidden(&x, 0, None, None)?; // (B, T, C)
        let c = h.dim(2)?;
        let picked = h.reshape((chunk.len() * t, c))?.index_select(&Tensor::new(at.as_slice(), dev)?, 0)?; // (N, C)
        let logits = model.head(&picked.unsqueeze(0)?)?.squeeze(0)?.to_dtype(DType::F32)?; // (N, V)
        let lp = taper_model::nn::log_softmax(&logits)?;
        let lp = lp.gather(&Tensor::new(target.as_slice(), dev)?.unsqueeze(1)?, 1)?.squeeze(1)?.to_vec1::<f32>()?;
        let mut k = 0;
        for &i in chunk {
            let n = requests[i].continuation.len();
            out[i] = lp[k..k + n].iter().map(|&x| x as f64).sum();
            k += n;
        }
    }
    Ok(out)
}

/// numpy's argmax: the first maximum, or the first NaN when there is one.
pub fn argmax(xs: &[f64]) -> usize {
    if let Some(i) = xs.iter().position(|x| x.is_nan()) {
        return i;
    }
    let mut best = 0;
    for (i, &x) in xs.iter().enumerate() {
        if x > xs[best] {
            best = i;
        }
    }
    best
}

/// lm_eval's `mean_stderr`: the sample standard deviation over sqrt(n); None below two items
/// (lm_eval reports "N/A").
pub fn mean_stderr(xs: &[f64]) -> Option<f64> {
    let n = xs.len();
    if n < 2 {
        return None;
    }
    let mu = xs.iter().sum::<f64>() / n as f64;
    let var = xs.iter().map(|x| (x - mu).powi(2)).sum::<f64>() / (n - 1) as f64;
    Some(var.sqrt() / (n as f64).sqrt())
}

/// One question's scores.
#[derive(Debug, Clone, Serialize)]
pub struct Scored {
    pub id: Value,
    pub label: usize,
    /// Summed log-likelihood of each choice (after the target delimiter).
    pub lls: Vec<f64>,
    pub pred: usize,
    pub pred_norm: usize,
    pub acc: f64,
    pub acc_norm: f64,
}

/// A task's result.
#[derive(Debug, Clone, Serialize)]
pub struct TaskResult {
    pub task: String,
    pub questions: usize,
    pub acc: f64,
    pub acc_stderr: Option<f64>,
    pub acc_norm: f64,
    pub acc_norm_stderr: Option<f64>,
    pub scored: Vec<Scored>,
}

/// lm_eval's `process_results` for a multiple-choice question with log-likelihoods `lls`:
/// `acc_norm` divides by each choice's length in characters (Python's `len`: code points),
/// without the delimiter.
pub fn judge(q: &Question, lls: Vec<f64>) -> Scored {
    let pred = argmax(&lls);
    let norm: Vec<f64> = lls.iter().zip(&q.choices).map(|(ll, c)| ll / c.chars().count() as f64).collect();
    let pred_norm = argmax(&norm);
    Scored {
        id: q.id.clone(),
        label: q.label,
        lls,
        pred,
        pred_norm,
        acc: f64::from(u8::from(pred == q.label)),
        acc_norm: f64::from(u8::from(pred_norm == q.label)),
    }
}

/// The summary of scored questions.
pub fn summarise(task: &str, scored: Vec<Scored>) -> TaskResult {
    let acc: Vec<f64> = scored.iter().map(|s| s.acc).collect();
    let acc_norm: Vec<f64> = scored.iter().map(|s| s.acc_norm).collect();
    let mean = |xs: &[f64]| xs.iter().sum::<f64>() / xs.len().max(1) as f64;
    TaskResult {
        task: task.to_string(),
        questions: scored.len(),
        acc: mean(&acc),
        acc_stderr: mean_stderr(&acc),
        acc_norm: mean(&acc_norm),
        acc_norm_stderr: mean_stderr(&acc_norm),
        scored,
    }
}

/// Scores `questions` of the task file `path` (every choice of several questions in each padded
/// forward); a question the model cannot score is an error naming its line.
pub fn score_questions(m: &McModel, path: &Path, questions: &[Question], batch_size: usize) -> Result<Vec<Scored>> {
    let max_len = m.model.config().block_size;
    let mut requests = Vec::new();
    for q in questions {
        for c in &q.choices {
            let r = request(m.tokenizer, m.prefix_id, &q.context, &format!("{TARGET_DELIMITER}{c}"))
                .and_then(|r| model_input(&r, max_len).map(|_| r))
                .map_err(|e| bad_line(path, q.line, e.to_string()))?;
            requests.push(r);
        }
    }
    let lls = loglikelihoods(m.model, &requests, batch_size)?;
    let mut k = 0;
    Ok(questions
        .iter()
        .map(|q| {
            let n = q.choices.len();
            k += n;
            judge(q, lls[k - n..k].to_vec())
        })
        .collect())
}

/// Scores the first `limit` questions of a task (0 = all).
pub fn score_task(m: &McModel, task: &Task, batch_size: usize, limit: usize) -> Result<TaskResult> {
    let n = if limit == 0 { task.questions.len() } else { limit.min(task.questions.len()) };
    let scored = score_questions(m, &task.path, &task.questions[..n], batch_size)?;
    Ok(summarise(&task.name, scored))
}

/// lm_eval's `prefix_token_id` for a model source: its BOS token, else its EOS.
pub fn prefix_id(src: &crate::source::Source) -> Result<u32> {
    src.bos_id.or_else(|| src.eos_ids.first().copied()).ok_or_else(|| {
        TrainError::Invalid(format!(
            "{}: the tokenizer has no BOS or EOS token to stand for an empty context",
            src.dir.display()
        ))
    })
}

/// Continuations per padded forward when tasks run at a training run's evaluations.
pub const TRAINING_BATCH: usize = 16;

/// `eval.tasks` of a training run: the tasks, read once at the start, scored at each
/// evaluation.
pub struct TaskEval {
    tasks: Vec<Task>,
}

impl TaskEval {
    /// Reads the task files (a bad line stops the run before any training).
    pub fn load(paths: &[String]) -> Result<Self> {
        Ok(Self { tasks: paths.iter().map(|p| load_task(Path::new(p))).collect::<Result<_>>()? })
    }

    pub fn is_empty(&self) -> bool {
        self.tasks.is_empty()
    }

    /// `tasks/<file stem>/acc` and `tasks/<file stem>/acc_norm` of every task, added to `metrics`.
    pub fn add_metrics(&self, m: &McModel, metrics: &mut serde_json::Map<String, Value>) -> Result<()> {
        for t in &self.tasks {
            let r = score_task(m, t, TRAINING_BATCH, 0)?;
            metrics.insert(format!("tasks/{}/acc", t.name), r.acc.into());
            metrics.insert(format!("tasks/{}/acc_norm", t.name), r.acc_norm.into());
        }
        Ok(())
    }
}

/// The rules of `eval.tasks`: every file exists, and no two share a stem (their metrics would
/// collide).
pub fn validate_paths(key: &str, paths: &[String]) -> Vec<String> {
    let mut errors = Vec::new();
    let mut stems = std::collections::HashSet::new();
    for p in paths {
        let path = Path::new(p);
        if !path.is_file() {
            errors.push(format!("{key}: {p}: no such file"));
        } else if let Some(s) = path.file_stem() {
            if !stems.insert(s.to_owned()) {
                errors.push(format!("{key}: {p}: another task file has the stem {:?}", s.to_string_lossy()));
            }
        }
    }
    errors
}

#[cfg(test)]
mod tests {
    use super::*;

    fn q(choices: &[&str], label: usize) -> Question {
        Question {
            id: Value::from(1),
            context: "c".into(),
            choices: choices.iter().map(|s| s.to_string()).collect(),
            label,
            line: 1,
        }
    }

    #[test]
    fn argmax_is_numpys() {
        assert_eq!(argmax(&[1.0, 3.0, 3.0]), 1);
        assert_eq!(argmax(&[1.0, f64::NAN, 5.0, f64::NAN]), 1);
        assert_eq!(argmax(&[f64::NEG_INFINITY, -2.0]), 1);
    }

    #[test]
    fn acc_norm_divides_by_characters_not_bytes() {
        // -6 over "é" (1 char, 2 bytes) is -6; -4 over "ab" is -2: per character "ab" wins.
        let s = judge(&q(&["é", "ab"], 1), vec![-6.0, -4.0]);
        assert_eq!((s.pred, s.pred_norm, s.acc, s.acc_norm), (1, 1, 1.0, 1.0));
        let s = judge(&q(&["abcdef", "a"], 0), vec![-6.0, -4.0]);
        assert_eq!((s.pred, s.pred_norm, s.acc, s.acc_norm), (1, 0, 0.0, 1.0));
    }

    #[test]
    fn stderr_is_the_sample_deviation_over_root_n() {
        let e = mean_stderr(&[1.0, 0.0, 1.0, 1.0]).unwrap();
        // mean 0.75, squared deviations 0.0625 * 3 + 0.5625 = 0.75, / 3 = 0.25, sqrt 0.5, / 2.
        assert!((e - 0.25).abs() < 1e-15);
        assert_eq!(mean_stderr(&[1.0]), None);
    }

    #[test]
    fn bad_lines_name_the_file_line_and_problem() {
        let p = Path::new("t.jsonl");
        let err = |s: &str| parse_question(p, 7, s).unwrap_err().to_string();
        assert_eq!(err("{"), "t.jsonl:7: not valid JSON: EOF while parsing an object at line 1 column 1");
        assert_eq!(err(r#"{"choices":["a"],"label":0}"#), "t.jsonl:7: missing key `context`");
        assert_eq!(err(r#"{"context":"x","choices":[],"label":0}"#), "t.jsonl:7: choices is empty");
        assert_eq!(
            err(r#"{"context":"x","choices":["a","b"],"label":2}"#),
            "t.jsonl:7: label = 2: out of range for 2 choices (0..=1)"
        );
        assert_eq!(
            err(r#"{"context":"x","choices":["a"],"label":-1}"#),
            "t.jsonl:7: label = -1: out of range for 1 choices (0..=0)"
        );
        let ok = parse_question(p, 3, r#"{"context":"x","choices":["a","b"],"label":1}"#).unwrap();
        assert_eq!((ok.id, ok.label), (Value::from(3), 1));
    }
}
