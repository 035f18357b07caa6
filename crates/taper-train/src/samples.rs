//! Generations written beside the metrics at evaluation steps (`[log] samples_every`,
//! `sample_prompts`): what the model makes of a few fixed prompts as it trains.

use crate::Result;
use taper_data::tokenizer;
use taper_model::{Decoder, Rng, Sampling};

/// Prompts a recipe picks when the config gives none.
pub const DEFAULT_PROMPTS: usize = 2;

/// Greedy continuations of `rendered` prompts (the text the model continues, templates
/// applied) up to `max_new` tokens or a `stop` id, as ("samples/<i>", Markdown: the prompt,
/// then the continuation). A prompt longer than the context keeps its last tokens.
pub fn continuations(
    model: &Decoder,
    tok: &tokenizers::Tokenizer,
    rendered: &[String],
    stop: &[u32],
    max_new: usize,
) -> Result<Vec<(String, String)>> {
    let keep = model.config().block_size.saturating_sub(max_new).max(1);
    let mut ids = Vec::new();
    for p in rendered {
        let enc = tokenizer::encode(tok, p.as_str(), false)?;
        let all = enc.get_ids();
        ids.push(all[all.len().saturating_sub(keep)..].to_vec());
    }
    let max_new = max_new.min(model.config().block_size - 1);
    let greedy = Sampling { temperature: 0.0, ..Default::default() };
    let nonempty: Vec<usize> = (0..ids.len()).filter(|&i| !ids[i].is_empty()).collect();
    let mut rows: Vec<(&[u32], Rng)> = nonempty.iter().map(|&i| (ids[i].as_slice(), Rng::new(0))).collect();
    let outs = model.generate_in_batches(&mut rows, max_new, &greedy, stop)?;
    let mut samples = Vec::new();
    for (&i, out) in nonempty.iter().zip(outs) {
        let out: Vec<u32> = out.into_iter().filter(|t| !stop.contains(t)).collect();
        let text = tokenizer::decode(tok, &out)?;
        samples.push((format!("samples/{i}"), markdown(&rendered[i], &text)));
    }
    Ok(samples)
}

/// A prompt and what followed, each in a code block so TensorBoard shows them verbatim.
pub fn markdown(prompt: &str, output: &str) -> String {
    format!("**prompt**\n\n```\n{prompt}\n```\n\n**sample**\n\n```\n{output}\n```")
}
