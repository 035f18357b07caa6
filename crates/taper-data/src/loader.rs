//! Random (input, target) windows from a shard, as in nanoGPT's `get_batch`, but keyed by
//! (seed, step, micro-batch) rather than a running RNG: any step's batch can be recomputed
//! directly, so a resumed run sees exactly the batches an uninterrupted one would.

use crate::{DataError, Result, Shard};

/// A batch of `batch` rows of `seq` tokens each, row-major.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Batch {
    pub inputs: Vec<u32>,
    pub targets: Vec<u32>,
    pub batch: usize,
    pub seq: usize,
}

pub struct WindowSampler {
    shard: Shard,
    block_size: usize,
    batch_size: usize,
    seed: u64,
}

/// A counter-based hash (the finaliser of MurmurHash3's 64-bit variant, applied in a chain):
/// a pure function of its inputs, so no generator state needs saving.
fn hash(seed: u64, a: u64, b: u64, c: u64) -> u64 {
    let mut h = seed ^ 0x243F_6A88_85A3_08D3;
    for x in [a, b, c] {
        h ^= x.wrapping_mul(0xC2B2_AE3D_27D4_EB4F);
        h ^= h >> 33;
        h = h.wrapping_mul(0xFF51_AFD7_ED55_8CCD);
        h ^= h >> 33;
        h = h.wrapping_mul(0xC4CE_B9FE_1A85_EC53);
        h ^= h >> 33;
    }
    h
}

impl WindowSampler {
    pub fn new(shard: Shard, block_size: usize, batch_size: usize, seed: u64) -> Result<Self> {
        if shard.len() < block_size + 1 {
            return Err(DataError::TooShort {
                path: shard.path().to_string(),
                tokens: shard.len(),
                needed: block_size + 1,
            });
        }
        Ok(Self { shard, block_size, batch_size, seed })
    }

    pub fn shard(&self) -> &Shard {
        &self.shard
    }

    pub fn batch_size(&self) -> usize {
        self.batch_size
    }

    /// The batch for optimizer step `step` and micro-batch `micro`.
    pub fn batch(&self, step: u64, micro: u64) -> Batch {
        self.windows(step, micro, 0)
    }

    /// `batch_size` windows of step `step`'s stream of samples, from sample `first` on: how
    /// training draws, so that micro-batches and replicas share out one sequence of samples
    /// (micro-batch k of B samples reads samples k B .. (k + 1) B).
    pub fn batch_at(&self, step: u64, first: u64) -> Batch {
        self.windows(step, 0, first)
    }

    fn windows(&self, step: u64, micro: u64, first: u64) -> Batch {
        let (bs, t) = (self.batch_size, self.block_size);
        let starts = (self.shard.len() - t) as u128; // windows start in [0, len - T - 1]
        let mut inputs = Vec::with_capacity(bs * t);
        let mut targets = Vec::with_capacity(bs * t);
        for row in first..first + bs as u64 {
            // Multiply-shift maps 64 random bits to [0, starts) with negligible bias.
            let start = ((hash(self.seed, step, micro, row) as u128 * starts) >> 64) as usize;
            let w = self.shard.slice(start, t + 1);
            inputs.extend_from_slice(&w[..t]);
            targets.extend_from_slice(&w[1..]);
        }
        Batch { inputs, targets, batch: bs, seq: t }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::shard::{write_shard, TokenDtype};

    #[test]
    fn batches_are_keyed_windows() {
        let dir = std::env::temp_dir().join(format!("taper-loader-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join("t.bin");
        let toks: Vec<u32> = (0..1000).collect();
        write_shard(&p, &toks, TokenDtype::U16).unwrap();
        let s = WindowSampler::new(Shard::open(&p).unwrap(), 8, 4, 42).unwrap();
        let b = s.batch(3, 1);
        assert_eq!(b, s.batch(3, 1));
        assert_ne!(b, s.batch(4, 1));
        for r in 0..4 {
            let row = &b.inputs[r * 8..r * 8 + 8];
            assert!(row.windows(2).all(|w| w[1] == w[0] + 1));
            assert_eq!(b.targets[r * 8], row[0] + 1);
        }
        write_shard(&p, &toks[..8], TokenDtype::U16).unwrap();
        let err = WindowSampler::new(Shard::open(&p).unwrap(), 8, 4, 42).err().unwrap().to_string();
        assert!(err.contains("fewer than one window of 9"), "{err}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
