//! What every fine-tuning recipe (SFT, reward model, DPO, PPO, GRPO) sets up the same way:
//! the trainable parameters (full or LoRA, plus new heads), fresh or from the checkpoint being
//! resumed, and what its checkpoints hold to be complete model sources.

use crate::checkpoint::{ChatTuned, Checkpoint, Contents};
use crate::source::Source;
use crate::{Result, TrainError};
use candle_core::{Device, Tensor, Var};
use taper_data::chat::ChatTemplate;
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

/// What a fine-tuning run's checkpoints hold besides the trained tensors: the source's
/// tokenizer and its companions, the chat template it trains with, the architecture, the
/// weights held fixed in full fine-tuning (`frozen`), and for LoRA the adapters' PEFT files
/// over the base `init`.
pub fn contents(
    src: &Source,
    template: &ChatTemplate,
    lora: Option<&LoraConfig>,
    init: &str,
    heads: &[&str],
    frozen: &[&str],
) -> Contents {
    let frozen = match lora {
        Some(_) => Vec::new(),
        None => frozen.iter().filter_map(|&k| src.weights.get(k).map(|t| (k.to_string(), t.clone()))).collect(),
    };
    Contents {
        tokenizer: src.tokenizer_path.clone(),
        model: Some(src.config.clone()),
        frozen,
        lora: lora.map(|l| (l.clone(), init.to_string())),
        heads: heads.iter().map(|h| h.to_string()).collect(),
        companions: Some(src.dir.clone()),
        chat: Some(ChatTuned {
            template: template.source().to_string(),
            end_of_turn: crate::chat::end_of_turn(template, &src.tokenizer),
        }),
    }
}

/// Whether the model or its adapters draw dropout masks.
pub fn uses_dropout(src: &Source, lora: Option<&LoraConfig>) -> bool {
    src.config.dropout > 0.0 || lora.is_some_and(|l| l.dropout > 0.0)
}
