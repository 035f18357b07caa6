//! Text files or JSONL (`text` field) to token shards with a train/val split.

use crate::shard::{write_shard, TokenDtype};
use crate::tokenizer::{encode_text, eos_id, save, sha256_file, vocab_size};
use crate::{io_err, DataError, Result};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use tokenizers::Tokenizer;

/// Written beside the shards as `meta.json`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Meta {
    pub train_tokens: usize,
    pub val_tokens: usize,
    pub vocab_size: usize,
    pub tokenizer_sha256: String,
    pub val_fraction: f64,
    pub sources: Vec<String>,
}

/// Documents from text files (one document per file) and `.jsonl` files (one per line, its
/// `text` field). Bad lines are errors naming the file and line.
pub fn read_documents(files: &[PathBuf]) -> Result<Vec<String>> {
    let mut docs = Vec::new();
    for f in files {
        let text = std::fs::read_to_string(f).map_err(io_err(f))?;
        if f.extension().is_some_and(|e| e == "jsonl") {
            for (i, line) in text.lines().enumerate() {
                if line.trim().is_empty() {
                    continue;
                }
                let bad = |reason: String| DataError::BadLine { path: f.display().to_string(), line: i + 1, reason };
                let v: serde_json::Value =
                    serde_json::from_str(line).map_err(|e| bad(format!("not valid JSON: {e}")))?;
                match v.get("text") {
                    Some(serde_json::Value::String(s)) => docs.push(s.clone()),
                    Some(_) => return Err(bad("field `text` is not a string".into())),
                    None => return Err(bad("no `text` field".into())),
                }
            }
        } else {
            docs.push(text);
        }
    }
    Ok(docs)
}

/// Tokenizes `docs` (joined by the end-of-text token when there are several), splits the
/// stream into the first (1 - val_fraction) for training and the rest for validation, and
/// writes `train.bin`, `val.bin`, `tokenizer.json` and `meta.json` into `out`.
pub fn prepare(tok: &Tokenizer, docs: &[String], sources: &[String], out: &Path, val_fraction: f64) -> Result<Meta> {
    std::fs::create_dir_all(out).map_err(io_err(out))?;
    let eos = eos_id(tok);
    let mut ids = Vec::new();
    for (i, d) in docs.iter().enumerate() {
        ids.extend(encode_text(tok, d, sources.first().map_or("<input>", |s| s.as_str()))?);
        if docs.len() > 1 && i + 1 < docs.len() {
            ids.extend(eos);
        }
    }
    let n_val = ((ids.len() as f64) * val_fraction).round() as usize;
    let from = if sources.is_empty() { "the input".to_string() } else { sources.join(", ") };
    if ids.is_empty() {
        return Err(DataError::Config(format!("{from}: no text to prepare")));
    }
    if n_val == 0 || n_val == ids.len() {
        return Err(DataError::Config(format!(
            "{from}: {} tokens split at val_fraction {val_fraction} leave {} for validation and {} for training; \
             both need some",
            ids.len(),
            n_val,
            ids.len() - n_val
        )));
    }
    let (train, val) = ids.split_at(ids.len() - n_val);
    let vocab = vocab_size(tok);
    let dtype = TokenDtype::for_vocab(vocab);
    write_shard(&out.join("train.bin"), train, dtype)?;
    write_shard(&out.join("val.bin"), val, dtype)?;
    let tok_path = out.join("tokenizer.json");
    save(tok, &tok_path)?;
    let meta = Meta {
        train_tokens: train.len(),
        val_tokens: val.len(),
        vocab_size: vocab,
        tokenizer_sha256: sha256_file(&tok_path)?,
        val_fraction,
        sources: sources.to_vec(),
    };
    let p = out.join("meta.json");
    std::fs::write(&p, serde_json::to_string_pretty(&meta).expect("meta serialises")).map_err(io_err(&p))?;
    Ok(meta)
}

pub fn read_meta(dir: &Path) -> Result<Meta> {
    let p = dir.join("meta.json");
    let s = std::fs::read_to_string(&p).map_err(io_err(&p))?;
    serde_json::from_str(&s).map_err(|e| DataError::BadLine {
        path: p.display().to_string(),
        line: e.line(),
        reason: e.to_string(),
    })
}
