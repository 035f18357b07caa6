//! Supervised fine-tuning data in TRL's dataset formats, and its tokenisation with a loss mask.
//!
//! One record per JSONL line (or Parquet row), in one of:
//! - `{"messages": [{"role": ..., "content": ...}, ...]}`: a conversation; loss on assistant turns.
//! - `{"prompt": "...", "completion": "..."}`: loss on the completion (plus eos).
//! - `{"prompt": [messages], "completion": [messages]}`: a conversation; loss on the
//!   completion's assistant turns only.
//! - `{"text": "..."}`: language modelling; loss on every token.
//!
//! Roles are `system`, `user` and `assistant`.

use crate::chat::{ChatTemplate, Message, Role};
use crate::{io_err, tokenizer, DataError, Result};
use std::ops::Range;
use std::path::{Path, PathBuf};
use tokenizers::Tokenizer;

/// The label of a token that the loss ignores (PyTorch's `ignore_index` default).
pub const IGNORE_INDEX: i64 = -100;

/// At most this many skipped records keep their error in [`SftData::skip_reasons`].
const MAX_SKIP_REASONS: usize = 32;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Example {
    /// Language modelling: every token counts.
    Text(String),
    /// Plain strings: only the completion (and the eos appended after it) counts.
    PromptCompletion { prompt: String, completion: String },
    /// A conversation. Assistant messages at index `train_from` or later count: 0 for a
    /// `messages` record, the prompt's length for a conversational prompt-completion.
    Conversation { messages: Vec<Message>, train_from: usize },
}

/// A record and where it was read from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Located<T> {
    pub path: String,
    /// 1-based line of a JSONL file, or 1-based row of a Parquet file.
    pub line: usize,
    pub example: T,
}

pub type SftExample = Located<Example>;

/// What to do with a record that cannot be used (bad JSON, unknown role, no assistant turn,
/// a template error while tokenising).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum OnBadRecord {
    /// Stop with the record's error.
    #[default]
    Error,
    /// Skip it and count it.
    Skip,
}

/// The records read from a set of files, and what was skipped.
#[derive(Debug)]
pub struct Records<T> {
    pub examples: Vec<Located<T>>,
    /// Records skipped under [`OnBadRecord::Skip`].
    pub skipped: usize,
    /// The errors of the first skipped records (at most 32).
    pub skip_reasons: Vec<DataError>,
}

pub type SftData = Records<Example>;

impl<T> Default for Records<T> {
    fn default() -> Self {
        Self { examples: Vec::new(), skipped: 0, skip_reasons: Vec::new() }
    }
}

impl<T> Records<T> {
    fn skip(&mut self, e: DataError) {
        self.skipped += 1;
        if self.skip_reasons.len() < MAX_SKIP_REASONS {
            self.skip_reasons.push(e);
        }
    }

    fn keep(&mut self, on_bad: OnBadRecord, path: &str, line: usize, r: Result<T>) -> Result<()> {
        match r {
            Ok(example) => self.examples.push(Located { path: path.to_string(), line, example }),
            Err(e) if on_bad == OnBadRecord::Skip => self.skip(e),
            Err(e) => return Err(e),
        }
        Ok(())
    }
}

/// Reads SFT records from files and directories. A directory contributes every `.jsonl`,
/// `.json` (JSON Lines) and `.parquet` file below it, in path order.
pub fn read_sft(paths: &[PathBuf], on_bad: OnBadRecord) -> Result<SftData> {
    read_records(paths, on_bad, parse_record)
}

/// Reads records of any kind, each JSON object (JSONL line or Parquet row) parsed by `parse`
/// with its file and line for error messages.
pub fn read_records<T>(
    paths: &[PathBuf],
    on_bad: OnBadRecord,
    parse: impl Fn(&serde_json::Value, &str, usize) -> Result<T>,
) -> Result<Records<T>> {
    let mut files = Vec::new();
    for p in paths {
        if p.is_dir() {
            collect_files(p, &mut files)?;
        } else if p.exists() {
            files.push(p.clone());
        } else {
            return Err(DataError::Io {
                path: p.display().to_string(),
                err: std::io::Error::new(std::io::ErrorKind::NotFound, "no such file or directory"),
            });
        }
    }
    if files.is_empty() {
        let names: Vec<String> = paths.iter().map(|p| p.display().to_string()).collect();
        return Err(DataError::Dataset { name: names.join(", "), reason: "no .jsonl, .json or .parquet files".into() });
    }
    let mut data = Records::default();
    for f in &files {
        if f.extension().is_some_and(|e| e == "parquet") {
            read_parquet(f, on_bad, &mut data, &parse)?;
        } else {
            read_jsonl(f, on_bad, &mut data, &parse)?;
        }
    }
    Ok(data)
}

fn collect_files(dir: &Path, out: &mut Vec<PathBuf>) -> Result<()> {
    let mut entries: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(io_err(dir))?
        .map(|e| e.map(|e| e.path()))
        .collect::<std::io::Result<_>>()
        .map_err(io_err(dir))?;
    entries.sort();
    for p in entries {
        if p.is_dir() {
            collect_files(&p, out)?;
        } else if p.extension().is_some_and(|e| e == "jsonl" || e == "json" || e == "parquet") {
            out.push(p);
        }
    }
    Ok(())
}

type Parse<'a, T> = &'a dyn Fn(&serde_json::Value, &str, usize) -> Result<T>;

fn read_jsonl<T>(f: &Path, on_bad: OnBadRecord, data: &mut Records<T>, parse: Parse<T>) -> Result<()> {
    let text = std::fs::read_to_string(f).map_err(io_err(f))?;
    let path = f.display().to_string();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let r = serde_json::from_str::<serde_json::Value>(line)
            .map_err(|e| DataError::BadLine { path: path.clone(), line: i + 1, reason: format!("not valid JSON: {e}") })
            .and_then(|v| parse(&v, &path, i + 1));
        data.keep(on_bad, &path, i + 1, r)?;
    }
    Ok(())
}

#[cfg(feature = "parquet")]
fn read_parquet<T>(f: &Path, on_bad: OnBadRecord, data: &mut Records<T>, parse: Parse<T>) -> Result<()> {
    use parquet::file::reader::{FileReader, SerializedFileReader};
    let path = f.display().to_string();
    let bad = |reason: String| DataError::Dataset { name: path.clone(), reason };
    let file = std::fs::File::open(f).map_err(io_err(f))?;
    let reader = SerializedFileReader::new(file).map_err(|e| bad(format!("not a Parquet file: {e}")))?;
    let rows = reader.get_row_iter(None).map_err(|e| bad(e.to_string()))?;
    for (i, row) in rows.enumerate() {
        let row = row.map_err(|e| bad(format!("row {}: {e}", i + 1)))?;
        let r = parse(&row.to_json_value(), &path, i + 1);
        data.keep(on_bad, &path, i + 1, r)?;
    }
    Ok(())
}

#[cfg(not(feature = "parquet"))]
fn read_parquet<T>(f: &Path, _on_bad: OnBadRecord, _data: &mut Records<T>, _parse: Parse<T>) -> Result<()> {
    Err(DataError::Dataset {
        name: f.display().to_string(),
        reason: "Parquet support is not compiled in (taper-data's `parquet` feature)".into(),
    })
}

/// Parses one record (a JSON object) into an [`Example`]; `path` and `line` name it in errors.
pub fn parse_record(v: &serde_json::Value, path: &str, line: usize) -> Result<Example> {
    let bad = |reason: String| DataError::BadLine { path: path.to_string(), line, reason };
    let obj = v.as_object().ok_or_else(|| bad("a record must be a JSON object".into()))?;
    let field = |name: &str| obj.get(name).filter(|v| !v.is_null());
    if let Some(m) = field("messages") {
        let messages = parse_messages(m, "messages", path, line)?;
        if !messages.iter().any(|m| m.role == Role::Assistant) {
            return Err(DataError::NoAssistant { path: path.to_string(), line });
        }
        return Ok(Example::Conversation { messages, train_from: 0 });
    }
    match (field("prompt"), field("completion")) {
        (Some(serde_json::Value::String(p)), Some(serde_json::Value::String(c))) => {
            return Ok(Example::PromptCompletion { prompt: p.clone(), completion: c.clone() })
        }
        (Some(p @ serde_json::Value::Array(_)), Some(c @ serde_json::Value::Array(_))) => {
            let mut messages = parse_messages(p, "prompt", path, line)?;
            let completion = parse_messages(c, "completion", path, line)?;
            if !completion.iter().any(|m| m.role == Role::Assistant) {
                return Err(DataError::NoAssistant { path: path.to_string(), line });
            }
            let train_from = messages.len();
            messages.extend(completion);
            return Ok(Example::Conversation { messages, train_from });
        }
        (Some(_), Some(_)) => {
            return Err(bad("`prompt` and `completion` must both be strings or both be message lists".into()))
        }
        (Some(_), None) => return Err(bad("`prompt` without `completion`".into())),
        (None, Some(_)) => return Err(bad("`completion` without `prompt`".into())),
        (None, None) => {}
    }
    match field("text") {
        Some(serde_json::Value::String(t)) => Ok(Example::Text(t.clone())),
        Some(_) => Err(bad("field `text` is not a string".into())),
        None => Err(bad("no `messages`, `prompt`/`completion` or `text` field".into())),
    }
}

pub fn parse_messages(v: &serde_json::Value, field: &str, path: &str, line: usize) -> Result<Vec<Message>> {
    let bad = |reason: String| DataError::BadLine { path: path.to_string(), line, reason };
    let list = v.as_array().ok_or_else(|| bad(format!("`{field}` is not a list of messages")))?;
    if list.is_empty() {
        return Err(bad(format!("`{field}` is empty")));
    }
    list.iter()
        .enumerate()
        .map(|(i, m)| {
            let role =
                m.get("role").and_then(|r| r.as_str()).ok_or_else(|| bad(format!("{field}[{i}] has no role")))?;
            let role = Role::parse(role).ok_or_else(|| DataError::BadRole {
                path: path.to_string(),
                line,
                role: role.to_string(),
            })?;
            let content = match m.get("content") {
                Some(serde_json::Value::String(s)) => s.clone(),
                _ => return Err(bad(format!("{field}[{i}] content is not a string"))),
            };
            Ok(Message { role, content })
        })
        .collect()
}

/// What happens to an example longer than [`EncodeOptions::max_len`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Overflow {
    /// Keep its first `max_len` tokens.
    #[default]
    Truncate,
    /// Leave it out.
    Drop,
}

#[derive(Debug, Clone, Default)]
pub struct EncodeOptions {
    /// Longest example in tokens; `None` keeps every length.
    pub max_len: Option<usize>,
    pub overflow: Overflow,
    /// Loss on every token (prompts and template markup too), not only on responses.
    pub train_on_all: bool,
    /// A record whose template fails (e.g. its `raise_exception`) stops or is skipped.
    pub on_bad: OnBadRecord,
}

/// One tokenised example. `labels[i]` is `input_ids[i]` where the loss counts and
/// [`IGNORE_INDEX`] elsewhere; labels are not shifted (position `i` predicts `labels[i + 1]`).
/// `labels[0]` is always ignored: nothing predicts the first token, and when examples are
/// packed into one row this keeps the shift from training across the boundary.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Tokenized {
    pub input_ids: Vec<u32>,
    pub labels: Vec<i64>,
}

impl Tokenized {
    pub fn len(&self) -> usize {
        self.input_ids.len()
    }

    pub fn is_empty(&self) -> bool {
        self.input_ids.is_empty()
    }

    /// How many tokens the loss counts.
    pub fn loss_tokens(&self) -> usize {
        self.labels.iter().filter(|&&l| l != IGNORE_INDEX).count()
    }
}

/// Counts from [`SftEncoder::encode_all`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct EncodeStats {
    pub kept: usize,
    /// Kept, but cut to `max_len`.
    pub truncated: usize,
    /// Longer than `max_len` under [`Overflow::Drop`].
    pub dropped_too_long: usize,
    /// No token left for the loss (e.g. truncation cut every response token).
    pub dropped_no_loss: usize,
    /// Template errors skipped under [`OnBadRecord::Skip`].
    pub skipped_errors: usize,
    pub tokens: usize,
    pub loss_tokens: usize,
}

/// Tokenises [`Example`]s with a tokenizer and a chat template.
pub struct SftEncoder<'a> {
    tok: &'a Tokenizer,
    template: &'a ChatTemplate,
    opts: EncodeOptions,
    eos: Option<u32>,
    /// Special tokens, longest first, for extending a response span over the end-of-turn token.
    specials: Vec<String>,
}

impl<'a> SftEncoder<'a> {
    /// The eos appended to plain examples is the template's `eos_token` if the tokenizer knows
    /// it, else the tokenizer's usual end-of-text token ([`tokenizer::eos_id`]).
    pub fn new(tok: &'a Tokenizer, template: &'a ChatTemplate, opts: EncodeOptions) -> Result<Self> {
        if opts.max_len == Some(0) {
            return Err(DataError::Config("max_len must be at least 1".into()));
        }
        let eos =
            template.special_token("eos_token").and_then(|t| tok.token_to_id(t)).or_else(|| tokenizer::eos_id(tok));
        let mut specials: Vec<String> =
            tok.get_added_tokens_decoder().into_values().filter(|t| t.special).map(|t| t.content).collect();
        specials.sort_by_key(|s| std::cmp::Reverse(s.len()));
        Ok(Self { tok, template, opts, eos, specials })
    }

    /// Overrides the eos appended to `text` and plain prompt-completion examples.
    pub fn with_eos(mut self, eos: Option<u32>) -> Self {
        self.eos = eos;
        self
    }

    pub fn eos_id(&self) -> Option<u32> {
        self.eos
    }

    /// Tokenises one example at full length, with its loss mask.
    pub fn encode(&self, ex: &Example) -> Result<Tokenized> {
        let (mut input_ids, mut labels) = match ex {
            Example::Text(text) => {
                let enc = crate::tokenizer::encode(self.tok, text.as_str(), true)?;
                let ids = enc.get_ids().to_vec();
                let labels = ids.iter().map(|&i| i64::from(i)).collect();
                self.append_eos(ids, labels)
            }
            Example::PromptCompletion { prompt, completion } => {
                // One encoding of the joined string, masked by the completion's byte range: a
                // token straddling the join counts, as it is part of what the model must write.
                let text = format!("{prompt}{completion}");
                let enc = crate::tokenizer::encode(self.tok, text.as_str(), true)?;
                let ids = enc.get_ids().to_vec();
                let completion_span = prompt.len()..text.len();
                let labels = mask(&ids, enc.get_offsets(), std::slice::from_ref(&completion_span));
                self.append_eos(ids, labels)
            }
            Example::Conversation { messages, train_from } => {
                let r = self.template.render_with_spans(messages, false)?;
                // As apply_chat_template: the template writes any bos itself.
                let enc = crate::tokenizer::encode(self.tok, r.text.as_str(), false)?;
                let spans: Vec<Range<usize>> = r
                    .content_spans
                    .iter()
                    .enumerate()
                    .filter(|(i, _)| i >= train_from)
                    .filter_map(|(_, s)| s.clone())
                    .map(|s| s.start..s.end + self.end_token_len(&r.text[s.end..]))
                    .collect();
                let ids = enc.get_ids().to_vec();
                let labels = mask(&ids, enc.get_offsets(), &spans);
                (ids, labels)
            }
        };
        if self.opts.train_on_all {
            labels = input_ids.iter().map(|&i| i64::from(i)).collect();
        }
        if let Some(l) = labels.first_mut() {
            *l = IGNORE_INDEX;
        }
        input_ids.shrink_to_fit();
        Ok(Tokenized { input_ids, labels })
    }

    /// The byte length of the end-of-turn marker after a response: a special token at the
    /// start of `rest`, after any whitespace (Llama 2 writes `answer </s>`). The model must
    /// learn to emit it to stop.
    fn end_token_len(&self, rest: &str) -> usize {
        let ws = rest.len() - rest.trim_start().len();
        self.specials.iter().find(|s| rest[ws..].starts_with(s.as_str())).map_or(0, |s| ws + s.len())
    }

    fn append_eos(&self, mut ids: Vec<u32>, mut labels: Vec<i64>) -> (Vec<u32>, Vec<i64>) {
        if let Some(eos) = self.eos {
            if ids.last() != Some(&eos) {
                ids.push(eos);
                labels.push(i64::from(eos));
            }
        }
        (ids, labels)
    }

    /// Tokenises every example, applying `max_len`/`overflow` and dropping examples left with
    /// no loss token. Template errors name the example's file and line.
    pub fn encode_all(&self, examples: &[SftExample]) -> Result<(Vec<Tokenized>, EncodeStats)> {
        let mut out = Vec::with_capacity(examples.len());
        let mut stats = EncodeStats::default();
        for ex in examples {
            let mut t = match self.encode(&ex.example) {
                Ok(t) => t,
                Err(e) => {
                    if self.opts.on_bad == OnBadRecord::Skip {
                        stats.skipped_errors += 1;
                        continue;
                    }
                    return Err(DataError::Example { path: ex.path.clone(), line: ex.line, err: Box::new(e) });
                }
            };
            if let Some(max) = self.opts.max_len.filter(|&m| t.len() > m) {
                match self.opts.overflow {
                    Overflow::Drop => {
                        stats.dropped_too_long += 1;
                        continue;
                    }
                    Overflow::Truncate => {
                        t.input_ids.truncate(max);
                        t.labels.truncate(max);
                        stats.truncated += 1;
                    }
                }
            }
            let loss = t.loss_tokens();
            if loss == 0 {
                stats.dropped_no_loss += 1;
                continue;
            }
            stats.kept += 1;
            stats.tokens += t.len();
            stats.loss_tokens += loss;
            out.push(t);
        }
        Ok((out, stats))
    }
}

/// Labels for `ids`: the id where the token's byte range overlaps a span, ignored elsewhere.
fn mask(ids: &[u32], offsets: &[(usize, usize)], spans: &[Range<usize>]) -> Vec<i64> {
    ids.iter()
        .zip(offsets)
        .map(|(&id, &(a, b))| if spans.iter().any(|s| a < s.end && b > s.start) { i64::from(id) } else { IGNORE_INDEX })
        .collect()
}

/// The example's text with the loss-counted parts in `[[...]]`, for eyeballing a mask.
pub fn show_mask(tok: &Tokenizer, t: &Tokenized) -> Result<String> {
    let mut out = String::new();
    let mut start = 0;
    while start < t.len() {
        let counted = t.labels[start] != IGNORE_INDEX;
        let mut end = start + 1;
        while end < t.len() && (t.labels[end] != IGNORE_INDEX) == counted {
            end += 1;
        }
        // Decoding runs rather than single tokens keeps multi-byte characters whole.
        let piece = tokenizer::decode(tok, &t.input_ids[start..end])?;
        if counted {
            out.push_str(&format!("[[{piece}]]"));
        } else {
            out.push_str(&piece);
        }
        start = end;
    }
    Ok(out)
}
