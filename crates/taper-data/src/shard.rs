//! Token shards: a 32-byte header then the tokens, little-endian.
//!
//! Header: magic `TAPERTOK` (8 bytes), format version u32, bytes per token u32 (2 or 4),
//! token count u64, 8 reserved bytes. Read through a memory map, so a shard of any size costs
//! no RAM up front.

use crate::{io_err, DataError, Result};
use memmap2::Mmap;
use std::io::Write;
use std::path::Path;

pub const MAGIC: &[u8; 8] = b"TAPERTOK";
pub const VERSION: u32 = 1;
const HEADER: usize = 32;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TokenDtype {
    U16,
    U32,
}

impl TokenDtype {
    /// The narrowest type that holds ids below `vocab_size`.
    pub fn for_vocab(vocab_size: usize) -> Self {
        if vocab_size <= 1 << 16 {
            TokenDtype::U16
        } else {
            TokenDtype::U32
        }
    }

    fn bytes(self) -> usize {
        match self {
            TokenDtype::U16 => 2,
            TokenDtype::U32 => 4,
        }
    }
}

/// Writes `tokens` to `path` atomically (temp file, then rename).
pub fn write_shard(path: &Path, tokens: &[u32], dtype: TokenDtype) -> Result<()> {
    let tmp = path.with_extension("bin.tmp");
    let mut buf = Vec::with_capacity(HEADER + tokens.len() * dtype.bytes());
    buf.extend_from_slice(MAGIC);
    buf.extend_from_slice(&VERSION.to_le_bytes());
    buf.extend_from_slice(&(dtype.bytes() as u32).to_le_bytes());
    buf.extend_from_slice(&(tokens.len() as u64).to_le_bytes());
    buf.extend_from_slice(&[0u8; 8]);
    for &t in tokens {
        match dtype {
            TokenDtype::U16 => {
                let t16 = u16::try_from(t).map_err(|_| DataError::BadShard {
                    path: path.display().to_string(),
                    reason: format!("token id {t} does not fit in u16"),
                })?;
                buf.extend_from_slice(&t16.to_le_bytes())
            }
            TokenDtype::U32 => buf.extend_from_slice(&t.to_le_bytes()),
        }
    }
    let mut f = std::fs::File::create(&tmp).map_err(io_err(&tmp))?;
    f.write_all(&buf).map_err(io_err(&tmp))?;
    f.sync_all().map_err(io_err(&tmp))?;
    std::fs::rename(&tmp, path).map_err(io_err(path))
}

/// A memory-mapped shard.
pub struct Shard {
    path: String,
    map: Mmap,
    dtype: TokenDtype,
    len: usize,
}

impl Shard {
    pub fn open(path: &Path) -> Result<Self> {
        let p = path.display().to_string();
        let bad = |reason: String| DataError::BadShard { path: p.clone(), reason };
        let f = std::fs::File::open(path).map_err(io_err(path))?;
        // SAFETY: the shard is read-only for the run; writers replace shards by rename, never
        // in place, so the mapped file does not change under us.
        let map = unsafe { Mmap::map(&f) }.map_err(io_err(path))?;
        if map.len() < HEADER || &map[..8] != MAGIC {
            return Err(bad("bad magic; write shards with `taper prepare`".into()));
        }
        let u32_at = |o: usize| u32::from_le_bytes(map[o..o + 4].try_into().unwrap());
        let version = u32_at(8);
        if version != VERSION {
            return Err(bad(format!("format version {version}, this taper reads {VERSION}")));
        }
        let dtype = match u32_at(12) {
            2 => TokenDtype::U16,
            4 => TokenDtype::U32,
            n => return Err(bad(format!("token size {n} bytes, expected 2 or 4"))),
        };
        let len = u64::from_le_bytes(map[16..24].try_into().unwrap()) as usize;
        let expected = HEADER + len * dtype.bytes();
        if map.len() != expected {
            return Err(bad(format!(
                "header says {len} tokens ({expected} bytes) but the file has {} bytes",
                map.len()
            )));
        }
        Ok(Self { path: p, map, dtype, len })
    }

    pub fn path(&self) -> &str {
        &self.path
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn dtype(&self) -> TokenDtype {
        self.dtype
    }

    pub fn get(&self, i: usize) -> u32 {
        let data = &self.map[HEADER..];
        match self.dtype {
            TokenDtype::U16 => u16::from_le_bytes([data[2 * i], data[2 * i + 1]]) as u32,
            TokenDtype::U32 => u32::from_le_bytes(data[4 * i..4 * i + 4].try_into().unwrap()),
        }
    }

    /// Tokens start..start+n.
    pub fn slice(&self, start: usize, n: usize) -> Vec<u32> {
        (start..start + n).map(|i| self.get(i)).collect()
    }

    pub fn max_token(&self) -> Option<u32> {
        (0..self.len).map(|i| self.get(i)).max()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_u16_and_u32() {
        let dir = std::env::temp_dir().join(format!("taper-shard-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        for (dtype, toks) in
            [(TokenDtype::U16, vec![0u32, 1, 65535, 42, 7]), (TokenDtype::U32, vec![0u32, 70000, u32::MAX, 3])]
        {
            let p = dir.join(format!("{dtype:?}.bin"));
            write_shard(&p, &toks, dtype).unwrap();
            let s = Shard::open(&p).unwrap();
            assert_eq!(s.dtype(), dtype);
            assert_eq!(s.slice(0, s.len()), toks);
            // A truncated file is refused with the sizes spelled out.
            let bytes = std::fs::read(&p).unwrap();
            std::fs::write(&p, &bytes[..bytes.len() - 1]).unwrap();
            let err = Shard::open(&p).err().unwrap().to_string();
            assert!(err.contains("header says"), "{err}");
        }
        let p = dir.join("big.bin");
        assert!(write_shard(&p, &[70000], TokenDtype::U16).is_err());
        std::fs::write(&p, b"hello world, this is not a shard at all").unwrap();
        assert!(Shard::open(&p).err().unwrap().to_string().contains("bad magic"));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
