//! A run dir belongs to one run at a time, and no run loses another's work: a lock held for the
//! life of the run, a new run over an old one only when asked (the old one moved aside, never
//! deleted), and a resume from an older checkpoint keeping the newer ones in a branch folder.

use crate::checkpoint;
use crate::{io_err, Result, TrainError};
use std::fs::File;
use std::io::{Read, Seek, Write};
use std::path::{Path, PathBuf};

/// Which checkpoint of the run dir a run starts from (`--resume`, `--resume CKPT`, or none).
#[derive(Debug, Clone, PartialEq)]
pub enum Resume {
    No,
    /// The newest checkpoint in the run dir.
    Latest,
    Dir(PathBuf),
}

impl Resume {
    /// The checkpoint to resume from, if any.
    pub fn dir(&self, ck_root: &Path) -> Result<Option<PathBuf>> {
        Ok(match self {
            Resume::No => None,
            Resume::Latest => Some(checkpoint::latest(ck_root)?.ok_or_else(|| {
                TrainError::Invalid(format!("--resume: no complete checkpoint in {}", ck_root.display()))
            })?),
            Resume::Dir(d) => Some(checkpoint::resolve(d)?),
        })
    }
}

/// The run dir's lock file; the lock is released when the process ends, however it ends.
pub const LOCK_FILE: &str = ".lock";

/// A run dir claimed for one run: holds the lock until dropped.
#[derive(Debug)]
pub struct Claim {
    _lock: File,
    /// Where an `--overwrite` put the old run, or a branching resume the newer checkpoints.
    pub moved: Option<PathBuf>,
}

fn invalid(msg: String) -> TrainError {
    TrainError::Invalid(msg)
}

/// A UTC timestamp for folder names, to the second.
fn stamp() -> String {
    let secs = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs());
    let (days, rem) = (secs / 86_400, secs % 86_400);
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!("{y:04}{m:02}{d:02}T{:02}{:02}{:02}Z", rem / 3600, rem % 3600 / 60, rem % 60)
}

/// A name next to `base` that nothing holds yet.
fn fresh(base: PathBuf) -> PathBuf {
    if !base.exists() {
        return base;
    }
    (1..).map(|i| PathBuf::from(format!("{}-{i}", base.display()))).find(|p| !p.exists()).expect("a free name")
}

/// Takes the run dir's lock, failing at once (naming the holder's pid) when another run holds it.
fn lock(dir: &Path) -> Result<File> {
    let path = dir.join(LOCK_FILE);
    let mut f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(&path)
        .map_err(io_err(&path))?;
    #[cfg(unix)]
    {
        use std::os::unix::io::AsRawFd;
        // SAFETY: flock on a descriptor this File owns; no memory is shared with the kernel.
        let rc = unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
        if rc != 0 {
            let mut holder = String::new();
            let _ = f.read_to_string(&mut holder);
            let who = match holder.trim() {
                "" => "another taper run".to_string(),
                pid => format!("another taper run (pid {pid})"),
            };
            return Err(invalid(format!(
                "run dir {} is in use by {who}; wait for it to end, or give this run another --run-dir",
                dir.display()
            )));
        }
    }
    f.set_len(0).and_then(|_| f.rewind()).map_err(io_err(&path))?;
    write!(f, "{}", std::process::id()).map_err(io_err(&path))?;
    f.flush().map_err(io_err(&path))?;
    Ok(f)
}

/// What of an earlier run a dir holds: its newest checkpoint's step, or that it logged steps.
fn earlier_run(dir: &Path) -> Option<String> {
    if let Some((step, _)) = checkpoint::list(&dir.join("checkpoints")).pop() {
        return Some(format!("checkpoints up to step {step}"));
    }
    let logged = std::fs::metadata(dir.join("metrics.jsonl")).is_ok_and(|m| m.len() > 0);
    logged.then(|| "a metrics.jsonl".to_string())
}

/// Claims `dir` for a run: creates it, takes its lock, and makes sure nothing of an earlier run
/// is lost. A fresh run in a dir that holds a run needs `overwrite`, which moves the old run to
/// a sibling folder; resuming from a checkpoint older than the dir's newest moves the newer
/// ones (and the metrics as they were) into `branches/<time>/`.
pub fn claim(dir: &Path, resume: &Resume, overwrite: bool) -> Result<Claim> {
    if dir.exists() && !dir.is_dir() {
        return Err(invalid(format!("run dir {} is a file, not a directory; give another --run-dir", dir.display())));
    }
    std::fs::create_dir_all(dir).map_err(io_err(dir))?;
    let lock = lock(dir)?;
    let mut moved = None;
    match resume {
        Resume::No => {
            if let Some(what) = earlier_run(dir) {
                if !overwrite {
                    return Err(invalid(format!(
                        "run dir {} already holds a run ({what}): pass --resume to continue it, or --overwrite to \
                         start afresh (the old run is moved aside, not deleted)",
                        dir.display()
                    )));
                }
                let name = dir.file_name().map_or("run".into(), |n| n.to_string_lossy().to_string());
                let aside = fresh(dir.with_file_name(format!("{name}.overwritten-{}", stamp())));
                std::fs::create_dir_all(&aside).map_err(io_err(&aside))?;
                for e in std::fs::read_dir(dir).map_err(io_err(dir))?.flatten() {
                    if e.file_name() != LOCK_FILE {
                        let to = aside.join(e.file_name());
                        std::fs::rename(e.path(), &to).map_err(io_err(&to))?;
                    }
                }
                moved = Some(aside);
            }
        }
        Resume::Dir(from) => {
            let from_step = checkpoint::read_state(from)?.step;
            let ck_root = dir.join("checkpoints");
            let newer: Vec<PathBuf> =
                checkpoint::step_dirs(&ck_root).into_iter().filter(|(s, _)| *s > from_step).map(|(_, p)| p).collect();
            if !newer.is_empty() {
                let branch = fresh(dir.join("branches").join(stamp()));
                let to_root = branch.join("checkpoints");
                std::fs::create_dir_all(&to_root).map_err(io_err(&to_root))?;
                for p in newer {
                    let to = to_root.join(p.file_name().expect("a step dir"));
                    std::fs::rename(&p, &to).map_err(io_err(&to))?;
                }
                let metrics = dir.join("metrics.jsonl");
                if metrics.exists() {
                    let to = branch.join("metrics.jsonl");
                    std::fs::copy(&metrics, &to).map_err(io_err(&to))?;
                }
                moved = Some(branch);
            }
        }
        Resume::Latest => {}
    }
    Ok(Claim { _lock: lock, moved })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stamps_are_utc_dates() {
        let s = stamp();
        assert_eq!(s.len(), 16, "{s}");
        assert!(s.starts_with("20") && s.ends_with('Z') && s.as_bytes()[8] == b'T', "{s}");
    }

    #[test]
    fn a_second_claim_on_a_held_dir_names_the_holder() {
        let dir = std::env::temp_dir().join(format!("taper-lock-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let held = claim(&dir, &Resume::No, false).unwrap();
        let err = claim(&dir, &Resume::No, false).unwrap_err().to_string();
        assert!(
            err.contains("is in use by another taper run") && err.contains(&std::process::id().to_string()),
            "{err}"
        );
        drop(held);
        claim(&dir, &Resume::No, false).unwrap();
        std::fs::remove_dir_all(&dir).ok();
    }
}
