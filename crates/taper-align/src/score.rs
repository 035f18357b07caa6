//! Scoring texts, what `taper score` does: the log-probability a model gives each token of a
//! text after the first, and under a reward model (a `score` head) the text's reward, read at
//! its last token as `taper rm` trains it.

use crate::rm::SCORE;
use crate::{AlignError, Result};
use candle_core::{DType, Tensor};
use serde::Serialize;
use std::path::Path;
use taper_model::{Decoder, Weights};
use taper_train::source::Source;

/// One scored text.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Scored {
    pub text: String,
    /// The ids scored (the text's, cut to the context).
    pub tokens: Vec<u32>,
    /// log p(token i | tokens before it), for every token after the first.
    pub logprobs: Vec<f32>,
    pub sum_logprob: f64,
    pub n_scored: usize,
    /// The text was longer than the model's context and lost its end.
    pub truncated: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reward: Option<f32>,
}

pub struct Scorer<'a> {
    src: &'a Source,
    model: Decoder,
    /// A reward model's head, (1, C).
    reward_head: Option<Tensor>,
}

impl<'a> Scorer<'a> {
    pub fn new(src: &'a Source) -> Result<Self> {
        src.expect_kind(taper_model::ModelKind::Decoder)?;
        let model = Decoder::load(&Weights::new(src.weights.clone()).detached(), &src.config)?;
        Ok(Self { src, model, reward_head: src.weights.get(SCORE).map(Tensor::detach) })
    }

    pub fn score(&self, text: &str) -> Result<Scored> {
        let (src, dev) = (self.src, self.model.device());
        let enc = taper_data::tokenizer::encode(&src.tokenizer, text, true)?;
        let mut ids = enc.get_ids().to_vec();
        if ids.is_empty() {
            return Err(AlignError::Invalid("the text is empty after tokenization".into()));
        }
        let truncated = ids.len() > src.config.block_size;
        ids.truncate(src.config.block_size);
        let x = Tensor::new(ids.as_slice(), dev)?.unsqueeze(0)?;
        let h = self.model.forward_hidden(&x, 0, None, None)?.squeeze(0)?; // (T, C)
        let mut logprobs = Vec::new();
        if ids.len() > 1 {
            let logits = self.model.head(&h.unsqueeze(0)?)?.squeeze(0)?.to_dtype(DType::F32)?; // (T, V)
            let lp = taper_model::nn::log_softmax(&logits)?;
            let next = Tensor::new(&ids[1..], dev)?.unsqueeze(1)?;
            logprobs = lp.narrow(0, 0, ids.len() - 1)?.gather(&next, 1)?.squeeze(1)?.to_vec1::<f32>()?;
        }
        let reward = match &self.reward_head {
            Some(w) => {
                let last = h.get(ids.len() - 1)?.unsqueeze(0)?.to_dtype(w.dtype())?; // (1, C)
                Some(last.matmul(&w.t()?)?.flatten_all()?.to_dtype(DType::F32)?.to_vec1::<f32>()?[0])
            }
            None => None,
        };
        Ok(Scored {
            text: text.to_string(),
            sum_logprob: logprobs.iter().map(|&x| x as f64).sum(),
            n_scored: logprobs.len(),
            tokens: ids,
            logprobs,
            truncated,
            reward,
        })
    }
}

/// Scores the `text` of every non-blank line of a JSONL file; a bad line is an error naming it.
pub fn score_file(src: &Source, input: &Path) -> Result<Vec<Scored>> {
    let text = std::fs::read_to_string(input).map_err(|e| AlignError::Invalid(format!("{}: {e}", input.display())))?;
    let scorer = Scorer::new(src)?;
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let at = format!("{}:{}", input.display(), i + 1);
        let v: serde_json::Value =
            serde_json::from_str(line).map_err(|e| AlignError::Invalid(format!("{at}: not valid JSON ({e})")))?;
        let Some(t) = v.get("text").and_then(|t| t.as_str()) else {
            return Err(AlignError::Invalid(format!("{at}: no string field `text`")));
        };
        out.push(scorer.score(t).map_err(|e| AlignError::Invalid(format!("{at}: {e}")))?);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    fn llama() -> Source {
        let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/../taper-model/tests/fixtures/hf/llama");
        taper_train::source::load(dir, &Device::Cpu).unwrap()
    }

    /// The log-probs are those of the model's full forward, token by token, and a reward head
    /// reads the last token's final hidden state.
    #[test]
    fn logprobs_follow_the_forward_and_the_reward_reads_the_last_token() -> Result<()> {
        let mut src = llama();
        let s = Scorer::new(&src)?.score("Hello there")?;
        assert_eq!(s.n_scored, s.tokens.len() - 1);
        assert_eq!(s.reward, None);
        let model = Decoder::load(&Weights::new(src.weights.clone()).detached(), &src.config)?;
        let x = Tensor::new(s.tokens.as_slice(), &Device::Cpu)?.unsqueeze(0)?;
        let lp = taper_model::nn::log_softmax(&model.forward(&x, 0, None, None)?.squeeze(0)?)?;
        let lp: Vec<Vec<f32>> = lp.to_vec2()?;
        for (i, &got) in s.logprobs.iter().enumerate() {
            let want = lp[i][s.tokens[i + 1] as usize];
            assert!((got - want).abs() < 1e-5, "token {i}: {got} vs {want}");
        }
        let c = src.config.n_embd;
        let w: Vec<f32> = (0..c).map(|i| (i as f32 - 3.0) * 0.01).collect();
        src.weights.insert(SCORE.into(), Tensor::from_vec(w.clone(), (1, c), &Device::Cpu)?);
        let r = Scorer::new(&src)?.score("Hello there")?.reward.expect("a reward model");
        let h: Vec<Vec<f32>> = model.forward_hidden(&x, 0, None, None)?.squeeze(0)?.to_vec2()?;
        let want: f32 = h.last().unwrap().iter().zip(&w).map(|(a, b)| a * b).sum();
        assert!((r - want).abs() < 1e-5, "{r} vs {want}");
        Ok(())
    }

    #[test]
    fn bad_lines_are_named() {
        let dir = std::env::temp_dir().join(format!("taper-score-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let f = dir.join("in.jsonl");
        std::fs::write(&f, "{\"text\": \"Hi\"}\n\n{\"txt\": \"Hi\"}\n").unwrap();
        let err = score_file(&llama(), &f).unwrap_err().to_string();
        assert!(err.contains("in.jsonl:3: no string field `text`"), "{err}");
        std::fs::write(&f, "{\"text\": \"Hi\"}\nnot json\n").unwrap();
        let err = score_file(&llama(), &f).unwrap_err().to_string();
        assert!(err.contains("in.jsonl:2: not valid JSON"), "{err}");
        std::fs::remove_dir_all(&dir).ok();
    }
}
