//! Checkpoints: a directory per saved step, written atomically (a temp dir, then a rename),
//! holding `model.safetensors`, `optimizer.safetensors`, `tokenizer.json` and
//! `trainer_state.json`. The newest K are kept.

use crate::{io_err, Result, TrainError};
use candle_core::{Device, Tensor};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

pub const FORMAT_VERSION: u32 = 1;

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct TrainerState {
    pub format_version: u32,
    /// Optimizer steps completed.
    pub step: u64,
    pub tokens_seen: u64,
    /// The next step's batches are `sampler.batch(data_cursor, micro)`.
    pub data_cursor: u64,
    /// Dropout streams are `Rng::derive(rng_seed, [step, micro])`: the seed is the whole state.
    pub rng_seed: u64,
    pub skipped_steps: u64,
    pub val_loss: Option<f64>,
    pub tokenizer_sha256: String,
    /// The resolved run config, TOML.
    pub config: String,
    /// sha256 of every other file in the checkpoint.
    pub files: BTreeMap<String, String>,
    /// The model's architecture; for checkpoints whose run config is not a pretraining one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model: Option<taper_model::ModelConfig>,
    /// Set when `model.safetensors` holds LoRA adapters over the base model `base`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lora: Option<taper_model::LoraConfig>,
    /// The model source a fine-tuning run started from.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub base: Option<String>,
    /// The recipe that saved it (`pretrain`, `sft`, `dpo`, ...): only that recipe resumes it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub recipe: Option<String>,
    /// Config changes let through on resume (`--allow-config-change`), at the step each took effect.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub config_changes: Vec<ConfigChange>,
    /// Data-parallel replicas the run had when saved; a step's micro-batches are spread over them.
    #[serde(default = "one")]
    pub world_size: usize,
    /// The f16 loss scaler's state (f16 runs only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub loss_scale: Option<crate::loss_scale::LossScale>,
}

fn one() -> usize {
    1
}

/// A config change a resumed run was allowed to make.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ConfigChange {
    pub step: u64,
    /// `key: old -> new`
    pub changes: Vec<String>,
}

/// What a checkpoint holds besides the trained tensors and the optimizer, so that it is a
/// complete model source on its own.
#[derive(Default)]
pub struct Contents {
    /// The tokenizer, copied in.
    pub tokenizer: PathBuf,
    /// The architecture, for runs whose config does not describe it (fine-tuning).
    pub model: Option<taper_model::ModelConfig>,
    /// Weights the run reads but does not train, saved beside the trained ones.
    pub frozen: Vec<(String, Tensor)>,
    /// LoRA runs: the adapters' config and the base model's source; the checkpoint also holds
    /// the adapters in PEFT's layout.
    pub lora: Option<(taper_model::LoraConfig, String)>,
    /// Trained tensors that are not adapters (reward and value heads): kept out of the PEFT files.
    pub heads: Vec<String>,
    /// A model dir whose tokenizer companions (special tokens, chat template, generation
    /// defaults) are copied in.
    pub companions: Option<PathBuf>,
    /// A chat-tuned run's template, recorded so that the checkpoint renders and stops as trained.
    pub chat: Option<ChatTuned>,
}

/// What makes a checkpoint a chat model: the template it was trained with, and the token that
/// ends its turns, which becomes its end of sequence (`eos_token` in `tokenizer_config.json`,
/// first of `eos_token_id` in `generation_config.json`) so that taper, transformers and
/// llama.cpp (through the exports) stop where its turn ends.
#[derive(Debug, Clone, PartialEq)]
pub struct ChatTuned {
    pub template: String,
    pub end_of_turn: Option<(String, u32)>,
}

impl Contents {
    /// A from-scratch run's: the tokenizer, with the run config describing the model.
    pub fn scratch(tokenizer: &Path) -> Self {
        Self { tokenizer: tokenizer.to_path_buf(), ..Default::default() }
    }

    /// Writes the companions and the PEFT adapter files into `dir` (a checkpoint being
    /// written); `trained` are the run's trained tensors.
    pub fn write_extras(&self, dir: &Path, trained: &HashMap<String, Tensor>) -> Result<()> {
        if let Some(from) = &self.companions {
            for f in ["tokenizer_config.json", "chat_template.jinja", "generation_config.json"] {
                let p = from.join(f);
                if p.exists() {
                    std::fs::copy(&p, dir.join(f)).map_err(io_err(&p))?;
                }
            }
        }
        if let Some(chat) = &self.chat {
            chat.write(dir)?;
        }
        if let Some((l, base)) = &self.lora {
            let adapters: HashMap<String, Tensor> =
                trained.iter().filter(|(k, _)| !self.heads.contains(k)).map(|(k, t)| (k.clone(), t.clone())).collect();
            write_peft(dir, &adapters, l, base)?;
        }
        Ok(())
    }
}

impl ChatTuned {
    /// Sets the template and the end of turn in the (copied or new) tokenizer config and
    /// generation config of `dir`.
    fn write(&self, dir: &Path) -> Result<()> {
        let read = |p: &Path| -> Result<serde_json::Value> {
            match std::fs::read_to_string(p) {
                Ok(t) => serde_json::from_str(&t).map_err(|e| ck_err(p, format!("not valid JSON: {e}"))),
                Err(_) => Ok(serde_json::json!({})),
            }
        };
        let write = |p: &Path, v: &serde_json::Value| {
            std::fs::write(p, serde_json::to_string_pretty(v).expect("json")).map_err(io_err(p))
        };
        // The template lives in one place, the tokenizer config, as transformers writes it.
        let _ = std::fs::remove_file(dir.join("chat_template.jinja"));
        let tc_path = dir.join("tokenizer_config.json");
        let mut tc = read(&tc_path)?;
        tc["chat_template"] = self.template.clone().into();
        let gen_path = dir.join("generation_config.json");
        let mut gen = read(&gen_path)?;
        if let Some((token, id)) = &self.end_of_turn {
            tc["eos_token"] = token.clone().into();
            let mut ids: Vec<u64> = vec![u64::from(*id)];
            match &gen["eos_token_id"] {
                serde_json::Value::Number(n) => ids.extend(n.as_u64()),
                serde_json::Value::Array(a) => ids.extend(a.iter().filter_map(serde_json::Value::as_u64)),
                _ => {}
            }
            ids.dedup();
            gen["eos_token_id"] = ids.into();
        }
        write(&tc_path, &tc)?;
        write(&gen_path, &gen)
    }
}

/// `adapter_model.safetensors` and `adapter_config.json` in PEFT's layout, so that
/// `PeftModel.from_pretrained(base, dir)` loads them (scripts/check_peft.py).
pub fn write_peft(
    dir: &Path,
    adapters: &HashMap<String, Tensor>,
    l: &taper_model::LoraConfig,
    base: &str,
) -> Result<()> {
    let peft: HashMap<String, Tensor> =
        adapters.iter().map(|(k, t)| (taper_model::lora::peft_key(k), t.clone())).collect();
    candle_core::safetensors::save(&peft, dir.join("adapter_model.safetensors"))?;
    let cfg = taper_model::lora::adapter_config(l, base)?;
    let p = dir.join("adapter_config.json");
    std::fs::write(&p, serde_json::to_string_pretty(&cfg).expect("json")).map_err(io_err(&p))
}

pub struct Checkpoint {
    pub dir: PathBuf,
    pub model: HashMap<String, Tensor>,
    pub optimizer: HashMap<String, Tensor>,
    pub state: TrainerState,
}

fn ck_err(dir: &Path, reason: impl Into<String>) -> TrainError {
    TrainError::Checkpoint { path: dir.display().to_string(), reason: reason.into() }
}

pub fn step_dir_name(step: u64) -> String {
    format!("step_{step:08}")
}

/// Streamed, so hashing a large checkpoint does not hold it in memory.
fn sha256(path: &Path) -> Result<String> {
    use sha2::{Digest, Sha256};
    let mut f = std::fs::File::open(path).map_err(io_err(path))?;
    let mut h = Sha256::new();
    std::io::copy(&mut f, &mut h).map_err(io_err(path))?;
    Ok(format!("{:x}", h.finalize()))
}

fn fsync(path: &Path) -> Result<()> {
    std::fs::File::open(path).and_then(|f| f.sync_all()).map_err(io_err(path))
}

/// A fault-injection point for the crash tests: `TAPER_FAULT_KILL_IN_CHECKPOINT=<step>` makes
/// the process SIGKILL itself half-way through writing that step's checkpoint.
fn maybe_die_mid_write(step: u64) {
    if std::env::var("TAPER_FAULT_KILL_IN_CHECKPOINT").ok().and_then(|s| s.parse::<u64>().ok()) == Some(step) {
        #[cfg(unix)]
        // SAFETY: kill(2) on our own pid has no memory-safety preconditions.
        unsafe {
            libc::kill(libc::getpid(), libc::SIGKILL);
        }
        std::process::abort();
    }
}

/// Writes a checkpoint for `state.step` under `root` and returns its directory. `extra` may
/// write more files into the (still temporary) directory; they are hashed with the rest.
pub fn save(
    root: &Path,
    model: &HashMap<String, Tensor>,
    optimizer: &HashMap<String, Tensor>,
    tokenizer: &Path,
    mut state: TrainerState,
    extra: impl FnOnce(&Path) -> Result<()>,
) -> Result<PathBuf> {
    std::fs::create_dir_all(root).map_err(io_err(root))?;
    let name = step_dir_name(state.step);
    let tmp = root.join(format!(".tmp-{name}-{}", std::process::id()));
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp).map_err(io_err(&tmp))?;
    }
    std::fs::create_dir_all(&tmp).map_err(io_err(&tmp))?;
    let write_st = |file: &str, tensors: &HashMap<String, Tensor>| -> Result<String> {
        let p = tmp.join(file);
        candle_core::safetensors::save(tensors, &p)?;
        fsync(&p)?;
        sha256(&p)
    };
    state.files.insert("model.safetensors".into(), write_st("model.safetensors", model)?);
    maybe_die_mid_write(state.step);
    state.files.insert("optimizer.safetensors".into(), write_st("optimizer.safetensors", optimizer)?);
    let tok = tmp.join("tokenizer.json");
    std::fs::copy(tokenizer, &tok).map_err(io_err(&tok))?;
    fsync(&tok)?;
    state.files.insert("tokenizer.json".into(), sha256(&tok)?);
    extra(&tmp)?;
    for e in std::fs::read_dir(&tmp).map_err(io_err(&tmp))?.flatten() {
        let name = e.file_name().to_string_lossy().to_string();
        if let std::collections::btree_map::Entry::Vacant(slot) = state.files.entry(name) {
            fsync(&e.path())?;
            slot.insert(sha256(&e.path())?);
        }
    }
    let st = tmp.join("trainer_state.json");
    std::fs::write(&st, serde_json::to_string_pretty(&state).expect("state serialises")).map_err(io_err(&st))?;
    fsync(&st)?;
    let dest = root.join(&name);
    if dest.exists() {
        std::fs::remove_dir_all(&dest).map_err(io_err(&dest))?;
    }
    std::fs::rename(&tmp, &dest).map_err(io_err(&dest))?;
    fsync(root)?;
    Ok(dest)
}

/// Every `step_*` dir under `root`, complete or not, oldest first.
pub fn step_dirs(root: &Path) -> Vec<(u64, PathBuf)> {
    let mut out: Vec<(u64, PathBuf)> = std::fs::read_dir(root)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| Some((e.file_name().to_string_lossy().strip_prefix("step_")?.parse().ok()?, e.path())))
        .collect();
    out.sort();
    out
}

/// Complete checkpoints under `root`, oldest first. Half-written temp dirs are not listed.
pub fn list(root: &Path) -> Vec<(u64, PathBuf)> {
    step_dirs(root).into_iter().filter(|(_, p)| p.join("trainer_state.json").exists()).collect()
}

/// The newest complete checkpoint under `root`. A step dir newer than it without a
/// `trainer_state.json` (the atomic write never leaves one: it was cut short by hand or copied
/// in part) is an error naming it, not passed over in silence.
pub fn latest(root: &Path) -> Result<Option<PathBuf>> {
    let newest = list(root).pop();
    let newest_step = newest.as_ref().map(|(s, _)| *s);
    let broken = step_dirs(root)
        .into_iter()
        .find(|(step, p)| newest_step.is_none_or(|n| *step > n) && !p.join("trainer_state.json").exists())
        .map(|(_, p)| p);
    if let Some(b) = broken {
        let instead = match &newest {
            Some((_, p)) => format!("; to go on from the last complete one, pass --resume {}", p.display()),
            None => String::new(),
        };
        return Err(ck_err(
            &b,
            format!("has no trainer_state.json, so it is not a complete checkpoint (move it away{instead})"),
        ));
    }
    Ok(newest.map(|(_, p)| p))
}

/// Deletes all but the newest `keep` checkpoints, and temp dirs left by a crash.
pub fn prune(root: &Path, keep: usize) -> Result<()> {
    let all = list(root);
    for (_, p) in all.iter().take(all.len().saturating_sub(keep)) {
        std::fs::remove_dir_all(p).map_err(io_err(p))?;
    }
    for e in std::fs::read_dir(root).into_iter().flatten().flatten() {
        if e.file_name().to_string_lossy().starts_with(".tmp-") {
            let _ = std::fs::remove_dir_all(e.path());
        }
    }
    Ok(())
}

pub fn read_state(dir: &Path) -> Result<TrainerState> {
    let p = dir.join("trainer_state.json");
    if !dir.is_dir() {
        return Err(ck_err(dir, "not a directory"));
    }
    let s = std::fs::read_to_string(&p).map_err(|e| ck_err(dir, format!("trainer_state.json: {e}")))?;
    let state: TrainerState =
        serde_json::from_str(&s).map_err(|e| ck_err(dir, format!("trainer_state.json is corrupt: {e}")))?;
    if state.format_version != FORMAT_VERSION {
        return Err(ck_err(dir, format!("format version {}, this taper reads {FORMAT_VERSION}", state.format_version)));
    }
    Ok(state)
}

/// Loads and verifies (sha256 of every file) a checkpoint directory.
pub fn load(dir: &Path, device: &Device) -> Result<Checkpoint> {
    let state = read_state(dir)?;
    for (file, want) in &state.files {
        let p = dir.join(file);
        if !p.exists() {
            return Err(ck_err(dir, format!("{file} is missing")));
        }
        let got = sha256(&p)?;
        if &got != want {
            return Err(ck_err(dir, format!("{file} is corrupt (sha256 {got}, expected {want})")));
        }
    }
    let read = |file: &str| {
        candle_core::safetensors::load(dir.join(file), device).map_err(|e| ck_err(dir, format!("{file}: {e}")))
    };
    Ok(Checkpoint {
        dir: dir.to_path_buf(),
        model: read("model.safetensors")?,
        optimizer: read("optimizer.safetensors")?,
        state,
    })
}

/// A checkpoint directory, or the newest checkpoint of a run directory.
pub fn resolve(path: &Path) -> Result<PathBuf> {
    if path.join("trainer_state.json").exists() {
        return Ok(path.to_path_buf());
    }
    if !path.exists() {
        return Err(ck_err(path, "does not exist"));
    }
    latest(&path.join("checkpoints"))?.ok_or_else(|| {
        ck_err(path, "neither a checkpoint (no trainer_state.json) nor a run dir with complete checkpoints")
    })
}

/// What a checkpoint holds for inference: its model config and weights (verified), the LoRA
/// adapters' config and base source when it holds adapters, and the pretraining run config
/// when it came from `taper pretrain`.
pub struct ModelCheckpoint {
    pub model: taper_model::ModelConfig,
    pub weights: HashMap<String, Tensor>,
    pub lora: Option<(taper_model::LoraConfig, String)>,
    pub run: Option<crate::RunConfig>,
}

pub fn load_model_checkpoint(dir: &Path, device: &Device) -> Result<ModelCheckpoint> {
    let state = read_state(dir)?;
    let run: Option<crate::RunConfig> = match &state.model {
        Some(_) => None,
        None => Some(toml::from_str(&state.config).map_err(|e| ck_err(dir, format!("saved config: {e}")))?),
    };
    let model = match (&state.model, &run) {
        (Some(m), _) => m.clone(),
        (None, Some(r)) => r.model.clone(),
        (None, None) => unreachable!("one of the two is set above"),
    };
    let p = dir.join("model.safetensors");
    if let Some(want) = state.files.get("model.safetensors") {
        let got = sha256(&p).map_err(|_| ck_err(dir, "model.safetensors is missing"))?;
        if &got != want {
            return Err(ck_err(dir, format!("model.safetensors is corrupt (sha256 {got}, expected {want})")));
        }
    }
    let weights =
        candle_core::safetensors::load(&p, device).map_err(|e| ck_err(dir, format!("model.safetensors: {e}")))?;
    let lora = match (state.lora, state.base) {
        (Some(l), Some(b)) => Some((l, b)),
        (Some(_), None) => return Err(ck_err(dir, "holds LoRA adapters but names no base model")),
        _ => None,
    };
    Ok(ModelCheckpoint { model, weights, lora, run })
}

/// The run config and weights of a pretraining checkpoint, verified, without the optimizer state.
pub fn load_model(dir: &Path, device: &Device) -> Result<(crate::RunConfig, HashMap<String, Tensor>)> {
    let ck = load_model_checkpoint(dir, device)?;
    match ck.run {
        Some(run) => Ok((run, ck.weights)),
        None => Err(ck_err(dir, "is not a pretraining checkpoint")),
    }
}
