//! Rows for SFT training from tokenised examples: packed into fixed-length rows by best-fit
//! decreasing, or one example per row in padded batches grouped by length.
//!
//! Every row carries `segment_ids` (1, 2, 3, ... per example, 0 on padding) so that attention
//! can be kept within an example, and `position_ids` restarting at 0 for each example.

use crate::sft::{Tokenized, IGNORE_INDEX};
use crate::{DataError, Result};
use std::collections::BTreeSet;

/// One training row; all four vectors have the same length.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Row {
    pub input_ids: Vec<u32>,
    /// [`IGNORE_INDEX`] on padding.
    pub labels: Vec<i64>,
    /// Position within the token's own example; 0 on padding.
    pub position_ids: Vec<u32>,
    /// 1-based index of the token's example within the row; 0 on padding.
    pub segment_ids: Vec<u32>,
    /// Indices (into the slice given) of the examples in this row, in row order.
    pub examples: Vec<usize>,
}

impl Row {
    pub fn len(&self) -> usize {
        self.input_ids.len()
    }

    pub fn is_empty(&self) -> bool {
        self.input_ids.is_empty()
    }

    pub fn push(&mut self, index: usize, ex: &Tokenized) {
        let segment = self.examples.len() as u32 + 1;
        self.input_ids.extend_from_slice(&ex.input_ids);
        self.labels.extend_from_slice(&ex.labels);
        self.position_ids.extend(0..ex.len() as u32);
        self.segment_ids.extend(std::iter::repeat_n(segment, ex.len()));
        self.examples.push(index);
    }

    pub fn pad_to(&mut self, len: usize, pad_id: u32) {
        self.input_ids.resize(len, pad_id);
        self.labels.resize(len, IGNORE_INDEX);
        self.position_ids.resize(len, 0);
        self.segment_ids.resize(len, 0);
    }
}

fn check(examples: &[Tokenized], max: usize) -> Result<()> {
    for (i, ex) in examples.iter().enumerate() {
        if ex.is_empty() || ex.len() > max || ex.labels.len() != ex.len() {
            return Err(DataError::Config(format!(
                "example {i} has {} tokens and {} labels; rows hold 1 to {max}",
                ex.len(),
                ex.labels.len()
            )));
        }
    }
    Ok(())
}

/// Packs `examples` into rows of exactly `seq_len` tokens by best-fit decreasing: longest
/// first, each into the row it leaves least space in. No example is split; an example longer
/// than `seq_len` is an error (truncate or drop it when tokenising). Rows come out roughly
/// longest-example first, so shuffle them for training.
pub fn pack(examples: &[Tokenized], seq_len: usize, pad_id: u32) -> Result<Vec<Row>> {
    if seq_len == 0 {
        return Err(DataError::Config("seq_len must be at least 1".into()));
    }
    check(examples, seq_len)?;
    let mut order: Vec<usize> = (0..examples.len()).collect();
    order.sort_by_key(|&i| std::cmp::Reverse(examples[i].len()));
    // (space left, row): the first entry at or above a length is the best fit.
    let mut space: BTreeSet<(usize, usize)> = BTreeSet::new();
    let mut rows: Vec<Vec<usize>> = Vec::new();
    for i in order {
        let n = examples[i].len();
        let row = match space.range((n, 0)..).next().copied() {
            Some(entry) => {
                space.remove(&entry);
                space.insert((entry.0 - n, entry.1));
                entry.1
            }
            None => {
                rows.push(Vec::new());
                space.insert((seq_len - n, rows.len() - 1));
                rows.len() - 1
            }
        };
        rows[row].push(i);
    }
    Ok(rows
        .into_iter()
        .map(|members| {
            let mut row = Row::default();
            for i in members {
                row.push(i, &examples[i]);
            }
            row.pad_to(seq_len, pad_id);
            row
        })
        .collect())
}

/// One example per row, in batches of up to `batch_size` rows of similar length, each batch
/// padded to its longest row rounded up to a multiple of `pad_multiple` (1 for none).
/// Batches come out longest first (a memory limit shows at once); shuffle them for training.
pub fn padded_batches(
    examples: &[Tokenized],
    batch_size: usize,
    pad_id: u32,
    pad_multiple: usize,
) -> Result<Vec<Vec<Row>>> {
    if batch_size == 0 || pad_multiple == 0 {
        return Err(DataError::Config("batch_size and pad_multiple must be at least 1".into()));
    }
    check(examples, usize::MAX)?;
    let mut order: Vec<usize> = (0..examples.len()).collect();
    order.sort_by_key(|&i| std::cmp::Reverse(examples[i].len()));
    Ok(order
        .chunks(batch_size)
        .map(|chunk| {
            let longest = examples[chunk[0]].len();
            let len = longest.div_ceil(pad_multiple) * pad_multiple;
            chunk
                .iter()
                .map(|&i| {
                    let mut row = Row::default();
                    row.push(i, &examples[i]);
                    row.pad_to(len, pad_id);
                    row
                })
                .collect()
        })
        .collect())
}

/// Rows of equal length stacked row-major, ready to become `[rows, seq_len]` tensors.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RowBatch {
    pub input_ids: Vec<u32>,
    pub labels: Vec<i64>,
    pub position_ids: Vec<u32>,
    pub segment_ids: Vec<u32>,
    pub rows: usize,
    pub seq_len: usize,
}

pub fn collate(rows: &[Row]) -> Result<RowBatch> {
    let seq_len = rows.first().map_or(0, Row::len);
    if rows.is_empty() || rows.iter().any(|r| r.len() != seq_len) {
        return Err(DataError::Config("collate needs one or more rows of equal length".into()));
    }
    let cat = |f: &dyn Fn(&Row) -> &[u32]| rows.iter().flat_map(|r| f(r).iter().copied()).collect::<Vec<u32>>();
    Ok(RowBatch {
        input_ids: cat(&|r| &r.input_ids),
        labels: rows.iter().flat_map(|r| r.labels.iter().copied()).collect(),
        position_ids: cat(&|r| &r.position_ids),
        segment_ids: cat(&|r| &r.segment_ids),
        rows: rows.len(),
        seq_len,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Example `i` holds the token `i` repeated, so rows show which example sits where.
    fn examples(lens: &[usize]) -> Vec<Tokenized> {
        lens.iter()
            .enumerate()
            .map(|(i, &n)| Tokenized {
                input_ids: vec![i as u32 + 10; n],
                labels: (0..n).map(|k| if k == 0 { IGNORE_INDEX } else { i as i64 + 10 }).collect(),
            })
            .collect()
    }

    /// A deterministic spread of lengths in 1..=max.
    fn lengths(n: usize, max: usize) -> Vec<usize> {
        let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
        (0..n)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                1 + (x % max as u64) as usize
            })
            .collect()
    }

    fn check_row(row: &Row, exs: &[Tokenized], pad: u32) {
        let n = row.len();
        assert!(row.labels.len() == n && row.position_ids.len() == n && row.segment_ids.len() == n);
        let mut at = 0;
        for (s, &i) in row.examples.iter().enumerate() {
            let ex = &exs[i];
            let r = at..at + ex.len();
            assert_eq!(row.input_ids[r.clone()], ex.input_ids[..]);
            assert_eq!(row.labels[r.clone()], ex.labels[..]);
            assert!(row.segment_ids[r.clone()].iter().all(|&x| x == s as u32 + 1));
            assert!(row.position_ids[r.clone()].iter().copied().eq(0..ex.len() as u32));
            at = r.end;
        }
        assert!(row.input_ids[at..].iter().all(|&t| t == pad));
        assert!(row.labels[at..].iter().all(|&l| l == IGNORE_INDEX));
        assert!(row.segment_ids[at..].iter().all(|&s| s == 0));
        assert!(row.position_ids[at..].iter().all(|&p| p == 0));
    }

    #[test]
    fn pack_places_every_example_once_without_splitting() {
        let seq = 64;
        let lens = lengths(500, seq);
        let exs = examples(&lens);
        let rows = pack(&exs, seq, 0).unwrap();
        let mut seen = vec![0; exs.len()];
        for row in &rows {
            assert_eq!(row.len(), seq);
            check_row(row, &exs, 0);
            assert!(row.examples.iter().map(|&i| lens[i]).sum::<usize>() <= seq);
            for &i in &row.examples {
                seen[i] += 1;
            }
        }
        assert!(seen.iter().all(|&c| c == 1));
        // Best-fit decreasing is within 11/9 OPT + 1 rows; OPT is at least the token total / seq.
        let total: usize = lens.iter().sum();
        let lower = total.div_ceil(seq);
        assert!(rows.len() * 9 <= lower * 11 + 9, "{} rows for a lower bound of {lower}", rows.len());
    }

    #[test]
    fn pack_best_fit_small_case() {
        // Longest first: 6 opens row 0, 5 opens row 1, 4 fills row 0 exactly, the other 4 goes
        // to row 1 (space 5), 3 fits nowhere and opens row 2, 2 joins it, 1 fills row 1.
        let exs = examples(&[4, 2, 6, 1, 5, 3, 4]);
        let rows = pack(&exs, 10, 99).unwrap();
        let members: Vec<Vec<usize>> = rows.iter().map(|r| r.examples.clone()).collect();
        assert_eq!(members, [vec![2, 0], vec![4, 6, 3], vec![5, 1]]);
        assert_eq!(rows[2].segment_ids, [1, 1, 1, 2, 2, 0, 0, 0, 0, 0]);
        assert_eq!(rows[2].position_ids, [0, 1, 2, 0, 1, 0, 0, 0, 0, 0]);
        assert_eq!(rows[2].input_ids, [15, 15, 15, 11, 11, 99, 99, 99, 99, 99]);
        assert_eq!(rows[2].labels[..6], [IGNORE_INDEX, 15, 15, IGNORE_INDEX, 11, IGNORE_INDEX]);
    }

    #[test]
    fn pack_rejects_bad_input() {
        assert!(pack(&examples(&[3, 11]), 10, 0).is_err());
        assert!(pack(&examples(&[3, 0]), 10, 0).is_err());
        assert!(pack(&examples(&[3]), 0, 0).is_err());
        assert!(pack(&[], 10, 0).unwrap().is_empty());
    }

    #[test]
    fn padded_batches_group_by_length() {
        let lens = lengths(103, 50);
        let exs = examples(&lens);
        let batches = padded_batches(&exs, 8, 7, 4).unwrap();
        assert_eq!(batches.len(), 103usize.div_ceil(8));
        let mut seen = vec![0; exs.len()];
        let mut prev_max = usize::MAX;
        for b in &batches {
            assert!(!b.is_empty() && b.len() <= 8);
            let longest = b.iter().map(|r| lens[r.examples[0]]).max().unwrap();
            assert!(longest <= prev_max, "batches come longest first");
            prev_max = b.iter().map(|r| lens[r.examples[0]]).min().unwrap();
            let width = b[0].len();
            assert!(width % 4 == 0 && width >= longest && width < longest + 4);
            for row in b {
                assert_eq!(row.len(), width);
                assert_eq!(row.examples.len(), 1);
                check_row(row, &exs, 7);
                seen[row.examples[0]] += 1;
            }
            let batch = collate(b).unwrap();
            assert_eq!((batch.rows, batch.seq_len), (b.len(), width));
            assert_eq!(batch.input_ids.len(), b.len() * width);
        }
        assert!(seen.iter().all(|&c| c == 1));
        assert!(padded_batches(&exs, 0, 0, 1).is_err());
        assert!(collate(&[]).is_err());
    }
}
