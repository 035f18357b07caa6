//! What every fine-tuning recipe (SFT, reward model, DPO, PPO, GRPO) sets up and saves the
//! same way: the trainable parameters (full or LoRA, plus new heads), resuming them, and
//! checkpoints that are complete model sources (tokenizer files, PEFT adapter files).

use crate::checkpoint::{self, Checkpoint, TrainerState, FORMAT_VERSION};
use crate::optim::Optimizer;
use crate::pretrain::{Observer, Resume};
use crate::source::Source;
use crate::steps::save_checkpoint;
use crate::{io_err, Result, TrainError};
use candle_core::{Device, Tensor, Var};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use taper_model::lora::{self, LoraConfig};
use taper_model::Weights;

/// The parameters a fine-tuning run trains, and the weights its model reads: every weight of
/// `src` (full fine-tuning), or LoRA adapters over the frozen base (detached, so no gradient
/// is computed or stored for it); plus `heads`, new trainable tensors such as a reward head.
/// Values come from `ck` when resuming.
pub fn trainable(
    src: &Source,
    lora: Option<&LoraConfig>,
    seed: u64,
    heads: Vec<(String, Tensor)>,
    ck: Option<&Checkpoint>,
) -> Result<(Vec<(String, Var)>, Weights)> {
    trainable_except(src, lora, seed, heads, ck, &[])
}

/// [`trainable`] with the weights named in `frozen` kept fixed in full fine-tuning: those a
/// recipe never uses (a reward model's LM head) would get no gradient.
pub fn trainable_except(
    src: &Source,
    lora: Option<&LoraConfig>,
    seed: u64,
    heads: Vec<(String, Tensor)>,
    ck: Option<&Checkpoint>,
    frozen: &[&str],
) -> Result<(Vec<(String, Var)>, Weights)> {
    let mut fresh: Vec<(String, Tensor)> = match lora {
        Some(l) => {
            lora::init_lora(&src.config, l, seed, src.weights.values().next().map_or(&Device::Cpu, |t| t.device()))?
        }
        None => src
            .weights
            .iter()
            .filter(|(k, _)| !frozen.contains(&k.as_str()))
            .map(|(k, t)| (k.clone(), t.clone()))
            .collect(),
    };
    // A head replaces the source's tensor of the same name (a reward model trained on).
    fresh.retain(|(k, _)| !heads.iter().any(|(h, _)| h == k));
    fresh.extend(heads);
    fresh.sort_by(|a, b| a.0.cmp(&b.0));
    let named: Vec<(String, Tensor)> = match ck {
        Some(ck) => fresh
            .into_iter()
            .map(|(n, _)| {
                let t = ck.model.get(&n).ok_or_else(|| TrainError::Checkpoint {
                    path: ck.dir.display().to_string(),
                    reason: format!("tensor `{n}` is missing"),
                })?;
                Ok((n, t.clone()))
            })
            .collect::<Result<_>>()?,
        None => fresh,
    };
    let vars: Vec<(String, Var)> =
        named.into_iter().map(|(n, t)| Ok((n, Var::from_tensor(&t)?))).collect::<Result<_>>()?;
    let trained = vars.iter().map(|(n, v)| (n.clone(), v.as_tensor().clone()));
    let weights = match lora {
        Some(l) => Weights::new(src.weights.iter().map(|(k, t)| (k.clone(), t.detach())).collect())
            .with_lora(trained, l.clone()),
        None => Weights::from_pairs(
            trained.chain(frozen.iter().filter_map(|&k| src.weights.get(k).map(|t| (k.to_string(), t.detach())))),
        ),
    };
    Ok((vars, weights))
}

/// The checkpoint to resume from (loaded), if `resume` asks for one.
pub fn load_resume(resume: &Resume, ck_root: &Path, device: &Device) -> Result<Option<Checkpoint>> {
    Ok(match resume.dir(ck_root)? {
        Some(d) => Some(checkpoint::load(&d, device)?),
        None => None,
    })
}

/// Loads the optimizer state of a resumed run; returns (step, tokens seen, skipped steps).
pub fn resume_optimizer(
    opt: &mut Optimizer,
    ck: Option<Checkpoint>,
    obs: &mut dyn Observer,
) -> Result<(u64, u64, u64)> {
    let Some(ck) = ck else { return Ok((0, 0, 0)) };
    opt.load_state(ck.optimizer, ck.state.step - ck.state.skipped_steps, &ck.dir.display().to_string())?;
    obs.message(&format!("resumed from {} at step {}", ck.dir.display(), ck.state.step));
    Ok((ck.state.step, ck.state.tokens_seen, ck.state.skipped_steps))
}

/// Where a fine-tuning run stands, for its checkpoint.
pub struct Progress {
    pub step: u64,
    pub tokens: u64,
    pub skipped: u64,
    pub val_loss: Option<f64>,
}

/// How a fine-tuning recipe writes its checkpoints: complete model sources (the source's
/// tokenizer files beside the weights), with LoRA adapters also in PEFT's layout.
pub struct Saver<'a> {
    pub ck_root: &'a Path,
    pub src: &'a Source,
    /// The starting model's spec, a LoRA checkpoint's base.
    pub init: &'a str,
    pub lora: Option<&'a LoraConfig>,
    pub seed: u64,
    pub keep: usize,
    /// Trained tensors that are not adapters (a reward or value head): kept out of the PEFT files.
    pub heads: &'a [&'a str],
    /// Source weights held fixed in full fine-tuning, saved beside the trained ones.
    pub frozen: &'a [&'a str],
}

impl Saver<'_> {
    /// Writes the checkpoint of step `at`, with a recipe's own state (PPO's adaptive KL
    /// coefficient, say) as `recipe_state.json` for an exact resume.
    pub fn save(
        &self,
        opt: &Optimizer,
        config_toml: String,
        at: Progress,
        recipe_state: Option<&serde_json::Value>,
        obs: &mut dyn Observer,
    ) -> Result<PathBuf> {
        let src = self.src;
        let state = TrainerState {
            format_version: FORMAT_VERSION,
            step: at.step,
            tokens_seen: at.tokens,
            data_cursor: at.step,
            rng_seed: self.seed,
            skipped_steps: at.skipped,
            val_loss: at.val_loss,
            tokenizer_sha256: taper_data::tokenizer::sha256_file(&src.tokenizer_path)?,
            config: config_toml,
            files: Default::default(),
            model: Some(src.config.clone()),
            lora: self.lora.cloned(),
            base: self.lora.map(|_| self.init.to_string()),
        };
        let frozen: Vec<(String, Tensor)> = match self.lora {
            Some(_) => Vec::new(),
            None => {
                self.frozen.iter().filter_map(|&k| src.weights.get(k).map(|t| (k.to_string(), t.clone()))).collect()
            }
        };
        let extra = |tmp: &Path, tensors: &HashMap<String, Tensor>| {
            copy_model_files(src, tmp)?;
            if let Some(v) = recipe_state {
                let p = tmp.join("recipe_state.json");
                std::fs::write(&p, v.to_string()).map_err(io_err(&p))?;
            }
            match self.lora {
                Some(l) => {
                    let adapters: HashMap<String, Tensor> = tensors
                        .iter()
                        .filter(|(k, _)| !self.heads.contains(&k.as_str()))
                        .map(|(k, v)| (k.clone(), v.clone()))
                        .collect();
                    write_peft(tmp, &adapters, l, self.init)
                }
                None => Ok(()),
            }
        };
        save_checkpoint(self.ck_root, opt, frozen, state, &src.tokenizer_path, self.keep, extra, obs)
    }
}

/// The tokenizer's companions (special tokens, chat template, generation defaults), so the
/// checkpoint is a complete model source.
pub fn copy_model_files(src: &Source, dir: &Path) -> Result<()> {
    for f in ["tokenizer_config.json", "chat_template.jinja", "generation_config.json"] {
        let p = src.dir.join(f);
        if p.exists() {
            std::fs::copy(&p, dir.join(f)).map_err(io_err(&p))?;
        }
    }
    Ok(())
}

/// `adapter_model.safetensors` and `adapter_config.json` in PEFT's layout, so that
/// `PeftModel.from_pretrained(base, dir)` loads them (scripts/check_peft.py).
pub fn write_peft(dir: &Path, adapters: &HashMap<String, Tensor>, l: &LoraConfig, base: &str) -> Result<()> {
    let peft: HashMap<String, Tensor> = adapters.iter().map(|(k, t)| (lora::peft_key(k), t.clone())).collect();
    candle_core::safetensors::save(&peft, dir.join("adapter_model.safetensors"))?;
    let cfg = lora::adapter_config(l, base)?;
    let p = dir.join("adapter_config.json");
    std::fs::write(&p, serde_json::to_string_pretty(&cfg).expect("json")).map_err(io_err(&p))
}
