//! Sampling responses to prompts, what `taper sample` does: K responses per prompt record,
//! on-policy data for preference pairs (`scripts/make_onpolicy_pairs.py`) or rejection sampling.

use crate::{AlignError, Result};
use serde_json::{json, Value};
use std::path::PathBuf;
use taper_data::preference::{read_prompts, Prompt};
use taper_model::{Decoder, Rng, Sampling, Weights};
use taper_train::chat::{stop_ids, template_for};
use taper_train::source::Source;

pub struct SampleOptions {
    /// Responses per prompt.
    pub n: usize,
    pub max_new_tokens: usize,
    pub sampling: Sampling,
    /// Response k of prompt i draws from `Rng::derive(seed, [i, k])`.
    pub seed: u64,
    /// "chatml" or a template file; default the model's own.
    pub chat_template: Option<String>,
}

/// One JSON object per prompt record: its `prompt`, `answer` and `samples`.
pub fn sample_prompts(src: &Source, prompts: &[PathBuf], o: &SampleOptions) -> Result<Vec<Value>> {
    src.expect_kind(taper_model::ModelKind::Decoder)?;
    let template = template_for(o.chat_template.as_deref(), src)?;
    let model = Decoder::load(&Weights::new(src.weights.clone()).detached(), &src.config)?;
    let records = read_prompts(prompts, taper_data::sft::OnBadRecord::Error)?;
    let stop = stop_ids(src);
    let mut prompt_ids = Vec::with_capacity(records.examples.len());
    for rec in &records.examples {
        let at = format!("{}:{}", rec.path, rec.line);
        let text = rec.example.prompt.render(&template)?;
        let enc = taper_data::tokenizer::encode(&src.tokenizer, text.as_str(), false)
            .map_err(|e| AlignError::Invalid(format!("{at}: {e}")))?;
        let ids = enc.get_ids().to_vec();
        if ids.len() + o.max_new_tokens > src.config.block_size {
            return Err(AlignError::Invalid(format!(
                "{at}: the prompt is {} tokens; with --max-new-tokens {} it passes the context of {}",
                ids.len(),
                o.max_new_tokens,
                src.config.block_size
            )));
        }
        prompt_ids.push(ids);
    }
    // Every response at once, in batches; response k of prompt i keeps its own stream.
    let mut rows: Vec<(&[u32], Rng)> = prompt_ids
        .iter()
        .enumerate()
        .flat_map(|(i, ids)| (0..o.n).map(move |k| (ids.as_slice(), Rng::derive(o.seed, &[i as u64, k as u64]))))
        .collect();
    let got = model.generate_in_batches(&mut rows, o.max_new_tokens, &o.sampling, &stop)?;
    let texts = got
        .into_iter()
        .map(|ids| {
            let kept: Vec<u32> = ids.into_iter().filter(|t| !stop.contains(t)).collect();
            Ok(taper_data::tokenizer::decode(&src.tokenizer, &kept)?)
        })
        .collect::<Result<Vec<String>>>()?;
    let mut out = Vec::new();
    for (i, rec) in records.examples.iter().enumerate() {
        let samples = &texts[i * o.n..(i + 1) * o.n];
        let prompt = match &rec.example.prompt {
            Prompt::Text(t) => json!(t),
            Prompt::Chat(m) => {
                json!(m.iter().map(|m| json!({"role": m.role.as_str(), "content": m.content})).collect::<Vec<_>>())
            }
        };
        out.push(json!({"prompt": prompt, "answer": rec.example.answer, "samples": samples}));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    fn setup(name: &str, lines: &str) -> (Source, PathBuf) {
        let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/../taper-model/tests/fixtures/hf/llama");
        let src = taper_train::source::load(dir, &Device::Cpu).unwrap();
        let tmp = std::env::temp_dir().join(format!("taper-sample-{name}-{}", std::process::id()));
        std::fs::create_dir_all(&tmp).unwrap();
        let f = tmp.join("prompts.jsonl");
        std::fs::write(&f, lines).unwrap();
        (src, f)
    }

    fn opts(seed: u64, max_new_tokens: usize) -> SampleOptions {
        let sampling = Sampling { temperature: 1.0, top_k: 0, top_p: 1.0 };
        SampleOptions { n: 3, max_new_tokens, sampling, seed, chat_template: Some("chatml".into()) }
    }

    /// K samples per prompt, the same for the same seed, different for another.
    #[test]
    fn samples_are_a_function_of_the_seed() -> Result<()> {
        let (src, f) = setup("seed", "{\"prompt\": \"Say hi\", \"answer\": \"hi\"}\n{\"prompt\": \"Say yo\"}\n");
        let a = sample_prompts(&src, std::slice::from_ref(&f), &opts(5, 6))?;
        assert_eq!(a.len(), 2);
        assert_eq!(a[0]["samples"].as_array().unwrap().len(), 3);
        assert_eq!(a[0]["answer"], "hi");
        assert_eq!(a, sample_prompts(&src, std::slice::from_ref(&f), &opts(5, 6))?);
        assert_ne!(a, sample_prompts(&src, std::slice::from_ref(&f), &opts(6, 6))?);
        Ok(())
    }

    #[test]
    fn a_prompt_too_long_for_the_context_is_named() {
        let (src, f) = setup("long", "{\"prompt\": \"Say hi\"}\n");
        let err = sample_prompts(&src, &[f], &opts(5, 200)).unwrap_err().to_string();
        assert!(err.contains("prompts.jsonl:1") && err.contains("passes the context of"), "{err}");
    }
}
