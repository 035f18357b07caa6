//! Built-in datasets, resolved from `$TAPER_DATA_DIR`, then `data/` under the current
//! directory (a checkout of the repository carries tinyshakespeare there), then the user's
//! cache, then downloaded from their canonical public URL with the checksum verified.

use crate::{io_err, DataError, Result};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};

pub struct Builtin {
    pub name: &'static str,
    pub file: &'static str,
    pub url: &'static str,
    pub bytes: u64,
    pub md5: &'static str,
}

pub const TINYSHAKESPEARE: Builtin = Builtin {
    name: "tinyshakespeare",
    file: "tinyshakespeare.txt",
    url: "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt",
    bytes: 1_115_394,
    md5: "6fb458f1232090904fb40fe944165e91",
};

pub const BUILTINS: &[Builtin] = &[TINYSHAKESPEARE];

pub fn find(name: &str) -> Option<&'static Builtin> {
    BUILTINS.iter().find(|b| b.name == name)
}

/// `$XDG_CACHE_HOME/taper` or `~/.cache/taper`.
pub fn cache_dir() -> Option<PathBuf> {
    std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))
        .map(|d| d.join("taper"))
}

fn md5_hex(bytes: &[u8]) -> String {
    use md5::{Digest, Md5};
    format!("{:x}", Md5::digest(bytes))
}

fn verify(b: &Builtin, path: &Path) -> Result<()> {
    let bytes = std::fs::read(path).map_err(io_err(path))?;
    let sum = md5_hex(&bytes);
    if sum != b.md5 {
        return Err(DataError::Dataset {
            name: b.name.into(),
            reason: format!(
                "{}: md5 {sum}, expected {} ({} bytes, expected {})",
                path.display(),
                b.md5,
                bytes.len(),
                b.bytes
            ),
        });
    }
    Ok(())
}

/// The local path of a built-in dataset, downloading it into the cache if needed.
/// `progress` is told (bytes so far, total) during a download.
pub fn resolve(b: &Builtin, mut progress: impl FnMut(u64, u64)) -> Result<PathBuf> {
    let local = std::env::var_os("TAPER_DATA_DIR").map(PathBuf::from).into_iter().chain([PathBuf::from("data")]);
    for dir in local {
        let p = dir.join(b.file);
        if p.exists() {
            verify(b, &p)?;
            return Ok(p);
        }
    }
    let cache = cache_dir()
        .ok_or_else(|| DataError::Dataset {
            name: b.name.into(),
            reason: "no TAPER_DATA_DIR and no HOME for a cache".into(),
        })?
        .join("datasets");
    let p = cache.join(b.file);
    if p.exists() {
        verify(b, &p)?;
        return Ok(p);
    }
    std::fs::create_dir_all(&cache).map_err(io_err(&cache))?;
    let url = std::env::var("TAPER_TINYSHAKESPEARE_URL").ok().filter(|_| b.name == "tinyshakespeare");
    download(url.as_deref().unwrap_or(b.url), &p, b, &mut progress)?;
    Ok(p)
}

fn download(url: &str, dest: &Path, b: &Builtin, progress: &mut impl FnMut(u64, u64)) -> Result<()> {
    let fail = |reason: String| DataError::Dataset { name: b.name.into(), reason };
    let resp = ureq::get(url).call().map_err(|e| {
        fail(format!("download from {url} failed: {e} (set TAPER_DATA_DIR to a folder holding {})", b.file))
    })?;
    let mut reader = resp.into_reader();
    let mut bytes = Vec::with_capacity(b.bytes as usize);
    let mut buf = [0u8; 1 << 16];
    loop {
        let n = reader.read(&mut buf).map_err(|e| fail(format!("download from {url} failed: {e}")))?;
        if n == 0 {
            break;
        }
        bytes.extend_from_slice(&buf[..n]);
        progress(bytes.len() as u64, b.bytes);
    }
    let sum = md5_hex(&bytes);
    if sum != b.md5 {
        return Err(fail(format!("download from {url}: md5 {sum}, expected {}; nothing was saved", b.md5)));
    }
    let tmp = dest.with_extension("part");
    let mut f = std::fs::File::create(&tmp).map_err(io_err(&tmp))?;
    f.write_all(&bytes).map_err(io_err(&tmp))?;
    f.sync_all().map_err(io_err(&tmp))?;
    std::fs::rename(&tmp, dest).map_err(io_err(dest))
}
