//! Tokenizers through the `tokenizers` crate, saved as standard `tokenizer.json` files.

use crate::{io_err, DataError, Result};
use std::path::{Path, PathBuf};
use tokenizers::models::bpe::{BpeTrainerBuilder, BPE};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::{AddedToken, Tokenizer};

pub const DEFAULT_EOS: &str = "<|endoftext|>";

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TokenizerKind {
    /// Byte-level BPE as in GPT-2: never an unknown token.
    Bpe,
    /// One token per Unicode character seen in training (nanoGPT's shakespeare_char).
    Char,
}

fn tok_err(path: impl AsRef<Path>, e: impl std::fmt::Display) -> DataError {
    DataError::Tokenizer { path: path.as_ref().display().to_string(), reason: e.to_string() }
}

fn read_texts(files: &[PathBuf]) -> Result<Vec<String>> {
    files.iter().map(|f| std::fs::read_to_string(f).map_err(io_err(f))).collect()
}

/// Trains a tokenizer on text files. `vocab_size` is the target for BPE (special tokens
/// included) and ignored for char-level, whose vocabulary is the set of characters seen.
pub fn train(kind: TokenizerKind, files: &[PathBuf], vocab_size: usize, specials: &[String]) -> Result<Tokenizer> {
    let label = files.first().map(|f| f.display().to_string()).unwrap_or_default();
    if files.is_empty() {
        return Err(tok_err("<none>", "no training files given"));
    }
    if files.iter().all(|f| std::fs::metadata(f).is_ok_and(|m| m.len() == 0)) {
        let names: Vec<String> = files.iter().map(|f| f.display().to_string()).collect();
        return Err(DataError::Config(format!("{}: empty, nothing to train a tokenizer on", names.join(", "))));
    }
    match kind {
        TokenizerKind::Char => {
            let texts = read_texts(files)?;
            let mut chars: Vec<char> = texts.iter().flat_map(|t| t.chars()).collect();
            chars.sort_unstable();
            chars.dedup();
            char_tokenizer(&chars, specials).map_err(|e| tok_err(&label, e))
        }
        TokenizerKind::Bpe => {
            let min = 256 + specials.len();
            if vocab_size < min {
                return Err(tok_err(
                    &label,
                    format!(
                        "BPE vocab_size {vocab_size} is below the 256 bytes plus {} special tokens",
                        specials.len()
                    ),
                ));
            }
            let trainer = BpeTrainerBuilder::new()
                .vocab_size(vocab_size)
                .min_frequency(2)
                .show_progress(false)
                .special_tokens(specials.iter().map(|s| AddedToken::from(s.clone(), true)).collect())
                .initial_alphabet(ByteLevel::alphabet().into_iter().collect())
                .build();
            let mut trainer: tokenizers::models::TrainerWrapper = trainer.into();
            let mut tok = Tokenizer::new(BPE::default());
            tok.with_pre_tokenizer(Some(ByteLevel::default().add_prefix_space(false)));
            tok.with_decoder(Some(ByteLevel::default()));
            let names = files.iter().map(|f| f.display().to_string()).collect();
            tok.train_from_files(&mut trainer, names).map_err(|e| tok_err(&label, e))?;
            Ok(tok)
        }
    }
}

/// A WordLevel model over single characters, written as tokenizer.json so that any
/// `tokenizers` user (Python included) loads it.
fn char_tokenizer(chars: &[char], specials: &[String]) -> std::result::Result<Tokenizer, String> {
    let mut vocab = serde_json::Map::new();
    for (i, c) in chars.iter().enumerate() {
        vocab.insert(c.to_string(), (i as u32).into());
    }
    let added: Vec<serde_json::Value> = specials
        .iter()
        .enumerate()
        .map(|(j, s)| {
            let id = chars.len() + j;
            vocab.insert(s.clone(), (id as u32).into());
            serde_json::json!({"id": id, "content": s, "single_word": false, "lstrip": false,
                "rstrip": false, "normalized": false, "special": true})
        })
        .collect();
    let json = serde_json::json!({
        "version": "1.0", "truncation": null, "padding": null, "added_tokens": added,
        "normalizer": null,
        "pre_tokenizer": {"type": "Split", "pattern": {"Regex": "[\\s\\S]"}, "behavior": "Isolated", "invert": false},
        "post_processor": null,
        "decoder": {"type": "Fuse"},
        "model": {"type": "WordLevel", "vocab": vocab, "unk_token": "<unk>"},
    });
    json.to_string().parse::<Tokenizer>().map_err(|e| e.to_string())
}

pub fn load(path: &Path) -> Result<Tokenizer> {
    if !path.exists() {
        return Err(tok_err(path, "file not found"));
    }
    Tokenizer::from_file(path).map_err(|e| tok_err(path, e))
}

pub fn save(tok: &Tokenizer, path: &Path) -> Result<()> {
    tok.save(path, false).map_err(|e| tok_err(path, e))
}

/// Vocabulary size including added (special) tokens.
pub fn vocab_size(tok: &Tokenizer) -> usize {
    tok.get_vocab_size(true)
}

/// The end-of-text token, if the tokenizer has one of the usual names.
pub fn eos_id(tok: &Tokenizer) -> Option<u32> {
    [DEFAULT_EOS, "</s>", "<eos>", "<|end_of_text|>"].iter().find_map(|t| tok.token_to_id(t))
}

/// The names a mask token goes by (BERT's, RoBERTa's), in the order they are looked for.
pub const MASK_TOKENS: [&str; 2] = ["[MASK]", "<mask>"];

/// The masked-LM mask token, if the tokenizer has one of the usual names.
pub fn mask_id(tok: &Tokenizer) -> Option<u32> {
    MASK_TOKENS.iter().find_map(|t| tok.token_to_id(t))
}

/// Ids of the tokenizer's special tokens (end-of-text, mask, padding, ...), sorted.
pub fn special_ids(tok: &Tokenizer) -> Vec<u32> {
    let mut ids: Vec<u32> =
        tok.get_added_tokens_decoder().into_iter().filter(|(_, t)| t.special).map(|(i, _)| i).collect();
    ids.sort_unstable();
    ids
}

/// Encodes a long text in newline-aligned chunks (in parallel), without special tokens.
pub fn encode_text(tok: &Tokenizer, text: &str, label: &str) -> Result<Vec<u32>> {
    const CHUNK: usize = 1 << 16;
    let mut chunks = Vec::new();
    let mut rest = text;
    while !rest.is_empty() {
        let mut cut = rest.len().min(CHUNK);
        while !rest.is_char_boundary(cut) {
            cut += 1;
        }
        if cut < rest.len() {
            if let Some(nl) = rest[..cut].rfind('\n') {
                cut = nl + 1;
            }
        }
        chunks.push(&rest[..cut]);
        rest = &rest[cut..];
    }
    let encs = tok.encode_batch(chunks, false).map_err(|e| tok_err(label, e))?;
    Ok(encs.iter().flat_map(|e| e.get_ids().iter().copied()).collect())
}

/// The token ids of `text`. A character the vocabulary lacks (a char-level tokenizer has no
/// unknown token) is named, with where to look, instead of the library's bare message.
pub fn encode(tok: &Tokenizer, text: &str, add_special: bool) -> Result<tokenizers::Encoding> {
    match tok.encode(text, add_special) {
        Ok(e) => Ok(e),
        Err(e) => {
            let unknown = text.chars().find(|c| tok.encode(c.to_string().as_str(), false).is_err());
            Err(DataError::Config(match unknown {
                Some(c) => format!(
                    "the text has a character the tokenizer does not know: {c:?} (U+{:04X}); a char-level \
                     tokenizer knows only the characters of the text it was trained on",
                    c as u32
                ),
                None => format!("the text cannot be tokenised: {e}"),
            }))
        }
    }
}

pub fn decode(tok: &Tokenizer, ids: &[u32]) -> Result<String> {
    tok.decode(ids, false).map_err(|e| tok_err("<in memory>", e))
}

/// sha256 of a file, hex: ties checkpoints to the tokenizer they were trained with.
pub fn sha256_file(path: &Path) -> Result<String> {
    use sha2::{Digest, Sha256};
    let bytes = std::fs::read(path).map_err(io_err(path))?;
    Ok(format!("{:x}", Sha256::digest(&bytes)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn char_and_bpe_round_trip() {
        let dir = std::env::temp_dir().join(format!("taper-tok-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let f = dir.join("t.txt");
        let text = "First Citizen:\nBefore we proceed any further, hear me speak.\n\nAll:\nSpeak, speak.\n".repeat(20);
        std::fs::write(&f, &text).unwrap();
        let specials = vec![DEFAULT_EOS.to_string()];
        for kind in [TokenizerKind::Char, TokenizerKind::Bpe] {
            let tok = train(kind, std::slice::from_ref(&f), 300, &specials).unwrap();
            let p = dir.join(format!("{kind:?}.json"));
            save(&tok, &p).unwrap();
            let tok = load(&p).unwrap();
            let ids = encode_text(&tok, &text, "t").unwrap();
            assert_eq!(decode(&tok, &ids).unwrap(), text, "{kind:?}");
            assert!(eos_id(&tok).is_some());
            assert_eq!(special_ids(&tok), vec![eos_id(&tok).unwrap()]);
            assert_eq!(mask_id(&tok), None);
            if kind == TokenizerKind::Char {
                assert_eq!(ids.len(), text.chars().count());
                // Sorted characters, as in nanoGPT: '\n' first, then ' '.
                assert_eq!(tok.token_to_id("\n"), Some(0));
                assert_eq!(tok.token_to_id(" "), Some(1));
            } else {
                assert!(ids.len() < text.len() / 2, "BPE should compress: {}", ids.len());
            }
        }
        // A mask token among the specials is found, and stays one token inside text.
        let specials = vec![DEFAULT_EOS.to_string(), "[MASK]".to_string()];
        for kind in [TokenizerKind::Char, TokenizerKind::Bpe] {
            let tok = train(kind, std::slice::from_ref(&f), 300, &specials).unwrap();
            let m = mask_id(&tok).expect("mask token");
            assert_eq!(special_ids(&tok).len(), 2);
            let ids = encode_text(&tok, "All: [MASK] speak.", "t").unwrap();
            assert_eq!(ids.iter().filter(|&&i| i == m).count(), 1, "{kind:?}: {ids:?}");
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
