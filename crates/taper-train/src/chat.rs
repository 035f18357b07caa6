//! What the chat recipes (SFT, DPO, PPO, GRPO) and the sampling commands share: the chat
//! template a run renders with, the tokens that end a turn, and greedy exact match on
//! held-out prompts.

use crate::source::Source;
use crate::{io_err, Result, TrainError};
use std::path::Path;
use taper_data::chat::ChatTemplate;
use taper_data::sft::Example;
use taper_model::{Decoder, Rng, Sampling};

/// The chat template a config asks for: "chatml", a tokenizer_config.json or a .jinja file;
/// by default the model's own, else ChatML.
pub fn template_for(spec: Option<&str>, src: &Source) -> Result<ChatTemplate> {
    Ok(match spec {
        Some("chatml") => ChatTemplate::chatml(),
        Some(p) if p.ends_with(".json") => ChatTemplate::from_tokenizer_config(Path::new(p))?,
        Some(p) => {
            let text = std::fs::read_to_string(p).map_err(io_err(p))?;
            let specials =
                src.tokenizer_config.as_ref().map(taper_data::chat::special_tokens_from_config).unwrap_or_default();
            ChatTemplate::new(&text, specials)?
        }
        None if src.chat_template.is_some() => ChatTemplate::from_model_dir(&src.dir)?,
        None => ChatTemplate::chatml(),
    })
}

/// Tokens that end a response: the model's eos ids and the chat end-of-turn markers.
pub fn stop_ids(src: &Source) -> Vec<u32> {
    let mut stop = src.eos_ids.clone();
    for t in ["<|im_end|>", "<|eot_id|>", "<|endoftext|>"] {
        stop.extend(src.tokenizer.token_to_id(t));
    }
    stop.sort_unstable();
    stop.dedup();
    stop
}

/// Exact match: greedy continuations of each held-out prompt against its reference answer.
/// Returns (hits, prompts scored); `limit` > 0 scores at most that many.
pub fn exact_match(
    model: &Decoder,
    src: &Source,
    template: &ChatTemplate,
    examples: &[Example],
    max_new: usize,
    limit: usize,
) -> Result<(usize, usize)> {
    let (mut hits, mut total) = (0, 0);
    let greedy = Sampling { temperature: 0.0, ..Default::default() };
    let stop = stop_ids(src);
    for ex in examples {
        if limit > 0 && total >= limit {
            break;
        }
        let Some((prompt, answer)) = ex.split_prompt() else { continue };
        let prompt = prompt.render(template)?;
        let enc =
            src.tokenizer.encode(prompt.as_str(), false).map_err(|e| TrainError::Invalid(format!("prompt: {e}")))?;
        let out = model.generate(enc.get_ids(), max_new, &greedy, &stop, &mut Rng::new(0), |_| {})?;
        let ids: Vec<u32> = out.into_iter().filter(|t| !stop.contains(t)).collect();
        let text = taper_data::tokenizer::decode(&src.tokenizer, &ids)?;
        total += 1;
        if text.trim() == answer.trim() {
            hits += 1;
        }
    }
    Ok((hits, total))
}
