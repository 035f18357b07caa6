//! Sequence-to-sequence pairs: reading, errors that name file, line and field, length limits
//! (truncate or drop, counted), and teacher-forcing batches.

use std::path::PathBuf;
use taper_data::seq2seq::{encode_pairs, make_batch, read_pairs, Limits};
use taper_data::sft::{OnBadRecord, Overflow, IGNORE_INDEX};
use taper_data::tokenizer::{self, TokenizerKind};

struct TempDir(PathBuf);

impl TempDir {
    fn new(name: &str) -> Self {
        let p = std::env::temp_dir().join(format!("taper-s2s-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).unwrap();
        Self(p)
    }

    fn write(&self, rel: &str, text: &str) -> PathBuf {
        let p = self.0.join(rel);
        std::fs::write(&p, text).unwrap();
        p
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

const PAIRS: &str = r#"{"source": "abc", "target": "xy"}
{"source": "abcdefgh", "target": "x"}

{"source": "a", "target": "xyzxyzxyz"}
"#;

#[test]
fn a_missing_field_names_file_line_and_field() {
    let d = TempDir::new("missing");
    let f = d.write("bad.jsonl", "{\"source\": \"a\", \"target\": \"b\"}\n{\"source\": \"abc\"}\n");
    let err = read_pairs(std::slice::from_ref(&f), OnBadRecord::Error).unwrap_err().to_string();
    assert_eq!(err, format!("{}:2: missing field `target`", f.display()));
    let f = d.write("num.jsonl", "{\"source\": 3, \"target\": \"b\"}\n");
    let err = read_pairs(std::slice::from_ref(&f), OnBadRecord::Error).unwrap_err().to_string();
    assert_eq!(err, format!("{}:1: field `source` must be a string", f.display()));
    // Skipping counts the bad record instead.
    let f = d.write("mixed.jsonl", "{\"source\": \"a\", \"target\": \"b\"}\n{\"target\": \"b\"}\nnot json\n");
    let r = read_pairs(&[f], OnBadRecord::Skip).unwrap();
    assert_eq!((r.examples.len(), r.skipped), (1, 2));
}

#[test]
fn over_long_sides_are_truncated_or_dropped_and_counted() {
    let d = TempDir::new("limits");
    let f = d.write("pairs.jsonl", PAIRS);
    let corpus = d.write("corpus.txt", "abcdefghxyz");
    let tok = tokenizer::train(TokenizerKind::Char, &[corpus], 0, &["<pad>".into(), "</s>".into()]).unwrap();
    let (pad, eos) = (tok.token_to_id("<pad>").unwrap(), tok.token_to_id("</s>").unwrap());
    let pairs = read_pairs(&[f], OnBadRecord::Error).unwrap().examples;
    assert_eq!(pairs.len(), 3);

    let limits = Limits { max_source_len: 5, max_target_len: 6, overflow: Overflow::Truncate };
    let (enc, stats) = encode_pairs(&tok, &pairs, eos, &limits).unwrap();
    assert_eq!(enc.len(), 3);
    assert_eq!((stats.truncated_source, stats.truncated_target, stats.dropped_source), (1, 1, 0));
    // "abcdefgh" keeps its first 4 characters and its eos.
    let abcd: Vec<u32> = "abcd".chars().map(|c| tok.token_to_id(&c.to_string()).unwrap()).collect();
    assert_eq!(enc[1].source, [abcd, vec![eos]].concat());
    assert_eq!(enc[2].target.len(), 6);
    assert_eq!(*enc[2].target.last().unwrap(), eos);
    assert!(stats.to_string().contains("1 sources and 1 targets truncated"), "{stats}");

    let limits = Limits { overflow: Overflow::Drop, ..limits };
    let (enc, stats) = encode_pairs(&tok, &pairs, eos, &limits).unwrap();
    assert_eq!(enc.len(), 1);
    assert_eq!((stats.kept, stats.dropped_source, stats.dropped_target, stats.truncated_source), (1, 1, 1, 0));

    // Teacher forcing: decoder input = start + target[..-1], labels = target, padding ignored.
    let all = Limits { max_source_len: 99, max_target_len: 99, overflow: Overflow::Drop };
    let (enc, _) = encode_pairs(&tok, &pairs, eos, &all).unwrap();
    let b = make_batch(&[&enc[0], &enc[1]], pad, pad);
    assert_eq!((b.rows, b.src_len, b.tgt_len), (2, 9, 3));
    assert_eq!(&b.src_keep[..9], &[1, 1, 1, 1, 0, 0, 0, 0, 0]);
    assert_eq!(&b.src[4..9], &[pad; 5]);
    let x = tok.token_to_id("x").unwrap();
    let y = tok.token_to_id("y").unwrap();
    assert_eq!(&b.dec_in[..3], &[pad, x, y]);
    assert_eq!(&b.labels[..3], &[x as i64, y as i64, eos as i64]);
    assert_eq!(&b.dec_in[3..], &[pad, x, pad]);
    assert_eq!(&b.labels[3..], &[x as i64, eos as i64, IGNORE_INDEX]);
    assert_eq!(b.target_tokens, 5);
}
