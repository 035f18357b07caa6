//! Repositories on the Hugging Face hub, fetched into the standard HF cache (`$HF_HOME/hub`,
//! default `~/.cache/huggingface/hub`) with hf-hub: models as `hf://Org/Name[@revision]`,
//! datasets as `hf://datasets/Org/Name[@revision][/path/prefix]`. `HF_HUB_OFFLINE=1` reads the
//! cache only; `HF_TOKEN` authenticates gated repos.

use crate::{DataError, Result};
use std::path::{Path, PathBuf};

/// A parsed `hf://Org/Name[@revision]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HubRef {
    pub repo: String,
    pub revision: String,
}

impl HubRef {
    pub fn parse(spec: &str) -> Option<Self> {
        let rest = spec.strip_prefix("hf://")?;
        let (repo, revision) = match rest.split_once('@') {
            Some((r, v)) => (r.to_string(), v.to_string()),
            None => (rest.to_string(), "main".to_string()),
        };
        Some(Self { repo, revision })
    }
}

fn err(r: &HubRef, reason: impl Into<String>) -> DataError {
    DataError::HubModel { name: format!("hf://{}@{}", r.repo, r.revision), reason: reason.into() }
}

pub fn offline() -> bool {
    std::env::var("HF_HUB_OFFLINE").is_ok_and(|v| matches!(v.as_str(), "1" | "true" | "TRUE" | "yes" | "ON" | "on"))
}

pub fn cache_dir() -> PathBuf {
    hf_hub::Cache::from_env().path().clone()
}

/// The snapshot directory of `r` in the cache, if its revision is known there.
fn cached_snapshot(r: &HubRef) -> Option<PathBuf> {
    cached_snapshot_of("models", r)
}

fn cached_snapshot_of(kind: &str, r: &HubRef) -> Option<PathBuf> {
    let repo_dir = cache_dir().join(format!("{kind}--{}", r.repo.replace('/', "--")));
    let commit = std::fs::read_to_string(repo_dir.join("refs").join(&r.revision))
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| r.revision.clone());
    let snap = repo_dir.join("snapshots").join(commit);
    snap.is_dir().then_some(snap)
}

/// Fetches `required` files (and `optional` ones when they exist), plus the shards a
/// `model.safetensors.index.json` lists, and returns the local snapshot directory.
pub fn fetch(r: &HubRef, required: &[&str], optional: &[&str]) -> Result<PathBuf> {
    if offline() {
        let snap = cached_snapshot(r).ok_or_else(|| {
            err(r, format!("not in the HF cache at {} and HF_HUB_OFFLINE is set", cache_dir().display()))
        })?;
        for f in required {
            if !snap.join(f).exists() {
                return Err(err(
                    r,
                    format!("{f} is not in the cached snapshot {} (HF_HUB_OFFLINE is set)", snap.display()),
                ));
            }
        }
        check_shards(r, &snap, |f| {
            if snap.join(f).exists() {
                Ok(())
            } else {
                Err(err(r, format!("shard {f} is not cached")))
            }
        })?;
        return Ok(snap);
    }
    let api = hf_hub::api::sync::ApiBuilder::from_env()
        .with_token(std::env::var("HF_TOKEN").ok())
        .with_progress(true)
        .build()
        .map_err(|e| err(r, e.to_string()))?;
    let repo = api.repo(hf_hub::Repo::with_revision(r.repo.clone(), hf_hub::RepoType::Model, r.revision.clone()));
    let mut dir: Option<PathBuf> = None;
    for f in required {
        let p = repo.get(f).map_err(|e| err(r, format!("{f}: {e}")))?;
        dir = p.parent().map(Path::to_path_buf);
    }
    for f in optional {
        if let Ok(p) = repo.get(f) {
            dir = dir.or_else(|| p.parent().map(Path::to_path_buf));
        }
    }
    let dir = dir.ok_or_else(|| err(r, "nothing was fetched"))?;
    check_shards(r, &dir, |f| repo.get(f).map(|_| ()).map_err(|e| err(r, format!("{f}: {e}"))))?;
    Ok(dir)
}

fn check_shards(r: &HubRef, dir: &Path, mut get: impl FnMut(&str) -> Result<()>) -> Result<()> {
    let index = dir.join("model.safetensors.index.json");
    if !index.exists() {
        return Ok(());
    }
    let text = std::fs::read_to_string(&index).map_err(crate::io_err(&index))?;
    let j: serde_json::Value =
        serde_json::from_str(&text).map_err(|e| err(r, format!("model.safetensors.index.json: {e}")))?;
    let mut files: Vec<&str> =
        j["weight_map"].as_object().map(|m| m.values().filter_map(|v| v.as_str()).collect()).unwrap_or_default();
    files.sort();
    files.dedup();
    files.into_iter().try_for_each(&mut get)
}

/// Fetches what a causal LM needs: config, weights (single or sharded), tokenizer files and
/// generation defaults.
pub fn fetch_model(r: &HubRef) -> Result<PathBuf> {
    let optional =
        ["generation_config.json", "tokenizer_config.json", "chat_template.jinja", "special_tokens_map.json"];
    // One of the two weight layouts: the single file first, then the index.
    match fetch(r, &["config.json", "tokenizer.json", "model.safetensors"], &optional) {
        Ok(d) => Ok(d),
        Err(first) => {
            fetch(r, &["config.json", "tokenizer.json", "model.safetensors.index.json"], &optional).map_err(|_| first)
        }
    }
}

/// A parsed `hf://datasets/Org/Name[@revision][/path/prefix]`: the prefix selects the data
/// files whose repo path starts with it (`data/train` for the train split's shards).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DatasetRef {
    pub repo: HubRef,
    pub prefix: String,
}

impl DatasetRef {
    pub fn parse(spec: &str) -> Option<Self> {
        let rest = spec.strip_prefix("hf://datasets/")?;
        let mut parts = rest.splitn(3, '/');
        let (org, name) = (parts.next()?, parts.next()?);
        let prefix = parts.next().unwrap_or("").trim_end_matches('/').to_string();
        let (name, revision) = match name.split_once('@') {
            Some((n, v)) => (n, v.to_string()),
            None => (name, "main".to_string()),
        };
        Some(Self { repo: HubRef { repo: format!("{org}/{name}"), revision }, prefix })
    }
}

fn is_data_file(path: &str) -> bool {
    [".jsonl", ".json", ".parquet"].iter().any(|e| path.ends_with(e))
        && !path.rsplit('/').next().is_some_and(|f| f.starts_with('.') || f == "dataset_infos.json")
}

/// The local paths of a hub dataset's data files (JSONL, JSON Lines, Parquet) under its prefix,
/// fetched (or, offline, found in the cache), in path order.
pub fn fetch_dataset(d: &DatasetRef) -> Result<Vec<PathBuf>> {
    let r = &d.repo;
    let name = format!("hf://datasets/{}@{}", r.repo, r.revision);
    let derr = |reason: String| DataError::Dataset { name: name.clone(), reason };
    let mut files: Vec<PathBuf> = if offline() {
        let snap = cached_snapshot_of("datasets", r).ok_or_else(|| {
            derr(format!("not in the HF cache at {} and HF_HUB_OFFLINE is set", cache_dir().display()))
        })?;
        let mut all = Vec::new();
        walk(&snap, &snap, &mut all)?;
        all.into_iter().filter(|(rel, _)| rel.starts_with(&d.prefix) && is_data_file(rel)).map(|(_, p)| p).collect()
    } else {
        let api = hf_hub::api::sync::ApiBuilder::from_env()
            .with_token(std::env::var("HF_TOKEN").ok())
            .with_progress(true)
            .build()
            .map_err(|e| derr(e.to_string()))?;
        let repo = api.repo(hf_hub::Repo::with_revision(r.repo.clone(), hf_hub::RepoType::Dataset, r.revision.clone()));
        let info = repo.info().map_err(|e| derr(e.to_string()))?;
        let mut wanted: Vec<String> = info
            .siblings
            .into_iter()
            .map(|s| s.rfilename)
            .filter(|f| f.starts_with(&d.prefix) && is_data_file(f))
            .collect();
        wanted.sort();
        wanted.iter().map(|f| repo.get(f).map_err(|e| derr(format!("{f}: {e}")))).collect::<Result<_>>()?
    };
    files.sort();
    if files.is_empty() {
        let under = if d.prefix.is_empty() { String::new() } else { format!(" under {:?}", d.prefix) };
        return Err(derr(format!("no .jsonl, .json or .parquet files{under}")));
    }
    Ok(files)
}

/// Files below `dir` as (path relative to `root` with `/`, path).
fn walk(root: &Path, dir: &Path, out: &mut Vec<(String, PathBuf)>) -> Result<()> {
    for e in std::fs::read_dir(dir).map_err(crate::io_err(dir))? {
        let p = e.map_err(crate::io_err(dir))?.path();
        if p.is_dir() {
            walk(root, &p, out)?;
        } else if let Ok(rel) = p.strip_prefix(root) {
            out.push((rel.to_string_lossy().replace('\\', "/"), p));
        }
    }
    Ok(())
}

/// Local data files for each spec: a path as is, a hub dataset fetched.
pub fn resolve_data(specs: &[String]) -> Result<Vec<PathBuf>> {
    let mut out = Vec::new();
    for s in specs {
        match DatasetRef::parse(s) {
            Some(d) => out.extend(fetch_dataset(&d)?),
            None => out.push(PathBuf::from(s)),
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_hub_refs() {
        assert_eq!(
            HubRef::parse("hf://Qwen/Qwen2.5-0.5B"),
            Some(HubRef { repo: "Qwen/Qwen2.5-0.5B".into(), revision: "main".into() })
        );
        assert_eq!(HubRef::parse("hf://a/b@v1.0"), Some(HubRef { repo: "a/b".into(), revision: "v1.0".into() }));
        assert_eq!(HubRef::parse("runs/x"), None);
        let d = DatasetRef::parse("hf://datasets/trl-lib/Capybara@v2/data/train").unwrap();
        assert_eq!(
            (d.repo.repo.as_str(), d.repo.revision.as_str(), d.prefix.as_str()),
            ("trl-lib/Capybara", "v2", "data/train")
        );
        assert_eq!(DatasetRef::parse("hf://datasets/a/b").unwrap().prefix, "");
        assert!(is_data_file("data/train-00000-of-00001.parquet") && !is_data_file("README.md"));
    }
}
