//! Sequence-to-sequence data: one `{"source": "...", "target": "..."}` record per JSONL line
//! (or Parquet row), tokenised with eos appended on both sides (Marian's convention), length
//! limits applied by truncation or dropping, and padded batches for teacher forcing.

use crate::sft::{read_records, OnBadRecord, Overflow, Records, IGNORE_INDEX};
use crate::{DataError, Result};
use std::path::PathBuf;
use tokenizers::Tokenizer;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pair {
    pub source: String,
    pub target: String,
}

/// Parses one record; a missing or non-string field is an error naming file, line and field.
pub fn parse_pair(v: &serde_json::Value, path: &str, line: usize) -> Result<Pair> {
    let bad = |reason: String| DataError::BadLine { path: path.to_string(), line, reason };
    let obj = v.as_object().ok_or_else(|| bad("a record must be a JSON object".into()))?;
    let field = |name: &str| -> Result<String> {
        match obj.get(name) {
            None | Some(serde_json::Value::Null) => Err(bad(format!("missing field `{name}`"))),
            Some(serde_json::Value::String(s)) => Ok(s.clone()),
            Some(_) => Err(bad(format!("field `{name}` must be a string"))),
        }
    };
    Ok(Pair { source: field("source")?, target: field("target")? })
}

/// Reads pairs from JSONL / Parquet files or directories of them.
pub fn read_pairs(paths: &[PathBuf], on_bad: OnBadRecord) -> Result<Records<Pair>> {
    read_records(paths, on_bad, parse_pair)
}

/// One tokenised pair: source and target ids, each ending in eos.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Encoded {
    pub source: Vec<u32>,
    pub target: Vec<u32>,
}

#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Most source tokens, eos included.
    pub max_source_len: usize,
    /// Most target tokens, eos included.
    pub max_target_len: usize,
    pub overflow: Overflow,
}

/// What [`encode_pairs`] did, for the run's summary line.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct EncodeStats {
    pub kept: usize,
    pub truncated_source: usize,
    pub truncated_target: usize,
    pub dropped_source: usize,
    pub dropped_target: usize,
}

impl std::fmt::Display for EncodeStats {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} pairs kept; over the length limit: {} sources and {} targets truncated, {} sources and {} targets dropped",
            self.kept, self.truncated_source, self.truncated_target, self.dropped_source, self.dropped_target
        )
    }
}

fn ids(tok: &Tokenizer, text: &str, what: &str) -> Result<Vec<u32>> {
    let enc = crate::tokenizer::encode(tok, text, false).map_err(|e| DataError::Config(format!("a {what}: {e}")))?;
    Ok(enc.get_ids().to_vec())
}

/// Tokenises pairs, appending `eos` to each side; a side longer than its limit keeps its first
/// tokens (and its eos) or, under [`Overflow::Drop`], drops the pair. Counts both.
pub fn encode_pairs(
    tok: &Tokenizer,
    pairs: &[crate::sft::Located<Pair>],
    eos: u32,
    limits: &Limits,
) -> Result<(Vec<Encoded>, EncodeStats)> {
    let mut stats = EncodeStats::default();
    let mut out = Vec::with_capacity(pairs.len());
    for p in pairs {
        let wrap = |e: DataError| DataError::Example { path: p.path.clone(), line: p.line, err: Box::new(e) };
        let mut source = ids(tok, &p.example.source, "source").map_err(wrap)?;
        let mut target = ids(tok, &p.example.target, "target").map_err(wrap)?;
        source.push(eos);
        target.push(eos);
        let (src_over, tgt_over) = (source.len() > limits.max_source_len, target.len() > limits.max_target_len);
        if limits.overflow == Overflow::Drop && (src_over || tgt_over) {
            stats.dropped_source += src_over as usize;
            stats.dropped_target += tgt_over as usize;
            continue;
        }
        for (side, over, max, count) in [
            (&mut source, src_over, limits.max_source_len, &mut stats.truncated_source),
            (&mut target, tgt_over, limits.max_target_len, &mut stats.truncated_target),
        ] {
            if over {
                side.truncate(max.max(1) - 1);
                side.push(eos);
                *count += 1;
            }
        }
        stats.kept += 1;
        out.push(Encoded { source, target });
    }
    Ok((out, stats))
}

/// A padded teacher-forcing batch. Sources right-padded with `pad` (keep mask 1/0); decoder
/// inputs = start + target[..-1]; labels = target, padding ignored.
#[derive(Debug, Clone, PartialEq)]
pub struct Batch {
    pub rows: usize,
    pub src_len: usize,
    pub tgt_len: usize,
    /// (rows, src_len)
    pub src: Vec<u32>,
    /// (rows, src_len): 1 for a token, 0 for padding.
    pub src_keep: Vec<u32>,
    /// (rows, tgt_len)
    pub dec_in: Vec<u32>,
    /// (rows * tgt_len), [`IGNORE_INDEX`] on padding.
    pub labels: Vec<i64>,
    /// Target tokens counted by the loss.
    pub target_tokens: usize,
}

/// Builds the batch of `examples` (in order).
pub fn make_batch(examples: &[&Encoded], pad: u32, start: u32) -> Batch {
    let rows = examples.len();
    let src_len = examples.iter().map(|e| e.source.len()).max().unwrap_or(0);
    let tgt_len = examples.iter().map(|e| e.target.len()).max().unwrap_or(0);
    let mut b = Batch {
        rows,
        src_len,
        tgt_len,
        src: vec![pad; rows * src_len],
        src_keep: vec![0; rows * src_len],
        dec_in: vec![pad; rows * tgt_len],
        labels: vec![IGNORE_INDEX; rows * tgt_len],
        target_tokens: 0,
    };
    for (r, e) in examples.iter().enumerate() {
        for (i, &t) in e.source.iter().enumerate() {
            b.src[r * src_len + i] = t;
            b.src_keep[r * src_len + i] = 1;
        }
        for (i, &t) in e.target.iter().enumerate() {
            b.dec_in[r * tgt_len + i] = if i == 0 { start } else { e.target[i - 1] };
            b.labels[r * tgt_len + i] = t as i64;
        }
        b.target_tokens += e.target.len();
    }
    b
}
