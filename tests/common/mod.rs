//! What the end-to-end tests share: the `taper` binary with the repository's data, scratch
//! folders, and assertions on how a command ended.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// The repository's root.
pub fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..").canonicalize().unwrap()
}

/// `$TAPER_DATA_DIR` (relative paths are taken from the repository root), else its `data/`.
pub fn data_dir() -> PathBuf {
    let d = std::env::var("TAPER_DATA_DIR").map(PathBuf::from).unwrap_or_else(|_| PathBuf::from("data"));
    let d = if d.is_absolute() { d } else { root().join(d) };
    assert!(d.join("tinyshakespeare.txt").exists(), "no tinyshakespeare.txt in {}", d.display());
    d.canonicalize().unwrap()
}

/// The binary, reading built-in datasets from [`data_dir`], with no fault injected.
pub fn taper() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_taper"));
    c.env("TAPER_DATA_DIR", data_dir()).env_remove("TAPER_FAULT_KILL_IN_CHECKPOINT");
    c
}

/// An empty folder of this test process's own.
pub fn scratch(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("taper-test-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

pub fn ok(out: Output) -> Output {
    assert!(
        out.status.success(),
        "taper failed:\nstdout: {}\nstderr: {}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// Exit code 1, no panic, `error:` lines closing the output, each needle in them; returns
/// the error lines.
pub fn fails_with(out: Output, needles: &[&str]) -> String {
    let err = String::from_utf8_lossy(&out.stderr).to_string();
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(!err.contains("panicked") && !err.contains("backtrace") && !err.contains("internal error"), "{err}");
    // Progress lines may come first; the error lines close the output.
    let errors: Vec<&str> = err.lines().skip_while(|l| !l.starts_with("error: ")).collect();
    assert!(!errors.is_empty() && errors.iter().all(|l| l.starts_with("error: ")), "{err}");
    for n in needles {
        assert!(err.contains(n), "expected {n:?} in: {err}");
    }
    errors.join("\n")
}

/// [`fails_with`], and the error is one line.
pub fn fails_once(out: Output, needles: &[&str]) -> String {
    let err = fails_with(out, needles);
    assert_eq!(err.lines().count(), 1, "expected one error line, got:\n{err}");
    err
}

/// (step, loss bits) of every step line of a run's metrics (end-of-run evaluations left out).
pub fn losses(run: &Path) -> Vec<(u64, u64)> {
    std::fs::read_to_string(run.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .filter_map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).unwrap();
            Some((v["step"].as_u64().unwrap(), v.get("loss")?.as_f64().unwrap().to_bits()))
        })
        .collect()
}

/// Every line of a run's metrics.
pub fn metrics(run: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(run.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

/// `taper CMD --config CFG --run-dir RUN EXTRA...`
pub fn train(cmd: &str, cfg: &Path, run: &Path, extra: &[&str]) -> Output {
    taper().arg(cmd).arg("--config").arg(cfg).arg("--run-dir").arg(run).args(extra).output().unwrap()
}
