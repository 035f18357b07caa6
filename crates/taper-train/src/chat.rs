//! What the chat recipes (SFT, DPO, PPO, GRPO) and the sampling commands share: the chat
//! template a run renders with, the tokens that end a turn, and greedy exact match on
//! held-out prompts.

use crate::source::Source;
use crate::{io_err, Result};
use std::path::Path;
use taper_data::chat::{ChatTemplate, Message, Role};
use taper_data::preference::Prompt;
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

/// The token a template closes an assistant turn with (ChatML's `<|im_end|>`, Llama 3's
/// `<|eot_id|>`), found by rendering a short conversation: the special token right after the
/// assistant's words. `None` when the template ends turns with plain text.
pub fn end_of_turn(template: &ChatTemplate, tok: &tokenizers::Tokenizer) -> Option<(String, u32)> {
    let reply = "ok";
    let chat = [Message::new(Role::User, "hi"), Message::new(Role::Assistant, reply)];
    let text = template.render(&chat, false).ok()?;
    let after = &text[text.rfind(reply)? + reply.len()..];
    let id = *tok.encode(after, false).ok()?.get_ids().first()?;
    let special = tok.get_added_tokens_decoder();
    special.get(&id).filter(|t| t.special || after.starts_with(t.content.as_str())).map(|t| (t.content.clone(), id))
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

/// Greedy answers for the sinks' samples: to the config's `given` prompts, each a user message,
/// or else to the first of the recipe's held-out prompts, `defaults`.
pub fn samples(
    model: &Decoder,
    src: &Source,
    template: &ChatTemplate,
    given: &[String],
    defaults: impl IntoIterator<Item = Prompt>,
    max_new: usize,
) -> Result<Vec<(String, String)>> {
    let prompts: Vec<Prompt> = match given.is_empty() {
        false => given.iter().map(|p| Prompt::Chat(vec![Message::new(Role::User, p.as_str())])).collect(),
        true => defaults.into_iter().take(crate::samples::DEFAULT_PROMPTS).collect(),
    };
    let rendered = prompts.iter().map(|p| p.render(template)).collect::<std::result::Result<Vec<_>, _>>()?;
    crate::samples::continuations(model, &src.tokenizer, &rendered, &stop_ids(src), max_new)
}

/// The prompts of held-out examples that have one (a prompt and a reference answer).
pub fn prompts_of(examples: &[Example]) -> impl Iterator<Item = Prompt> + '_ {
    examples.iter().filter_map(|e| e.split_prompt()).map(|(p, _)| p)
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
    let greedy = Sampling { temperature: 0.0, ..Default::default() };
    let stop = stop_ids(src);
    let mut scored = Vec::new();
    for ex in examples {
        if limit > 0 && scored.len() >= limit {
            break;
        }
        let Some((prompt, answer)) = ex.split_prompt() else { continue };
        let prompt = prompt.render(template)?;
        let enc = taper_data::tokenizer::encode(&src.tokenizer, prompt.as_str(), false)?;
        scored.push((enc.get_ids().to_vec(), answer));
    }
    // Prompts with room for max_new tokens in the context decode in batches; a longer one
    // alone, where generate slides its window.
    let room = |ids: &[u32]| ids.len() + max_new <= model.config().block_size;
    let (fit, long): (Vec<usize>, Vec<usize>) = (0..scored.len()).partition(|&i| room(&scored[i].0));
    let mut outs = vec![Vec::new(); scored.len()];
    let mut rows: Vec<(&[u32], Rng)> = fit.iter().map(|&i| (scored[i].0.as_slice(), Rng::new(0))).collect();
    for (&i, out) in fit.iter().zip(model.generate_in_batches(&mut rows, max_new, &greedy, &stop)?) {
        outs[i] = out;
    }
    for &i in &long {
        outs[i] = model.generate(&scored[i].0, max_new, &greedy, &stop, &mut Rng::new(0), |_| {})?;
    }
    let mut hits = 0;
    for ((_, answer), out) in scored.iter().zip(outs) {
        let ids: Vec<u32> = out.into_iter().filter(|t| !stop.contains(t)).collect();
        let text = taper_data::tokenizer::decode(&src.tokenizer, &ids)?;
        if text.trim() == answer.trim() {
            hits += 1;
        }
    }
    Ok((hits, scored.len()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_end_of_turn_token_is_what_closes_the_assistant_turn() {
        let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/../taper-model/tests/fixtures/hf/llama");
        let src = crate::source::load(dir, &candle_core::Device::Cpu).unwrap();
        let got = end_of_turn(&ChatTemplate::chatml(), &src.tokenizer);
        assert_eq!(got, Some(("<|im_end|>".to_string(), src.tokenizer.token_to_id("<|im_end|>").unwrap())));
        let plain = ChatTemplate::new("{% for m in messages %}{{ m.content }}\n{% endfor %}", [("eos_token", "</s>")]);
        assert_eq!(end_of_turn(&plain.unwrap(), &src.tokenizer), None);
    }
}
