//! Masked-LM inference, what `taper generate` does with an encoder: each mask token of a
//! prompt predicted, the text with every mask filled by its most likely ordinary token, and
//! each mask's top k.

use crate::source::Source;
use crate::{Result, TrainError};
use candle_core::{DType, Tensor};
use taper_data::tokenizer;
use taper_model::{Bert, Weights};

/// One mask's predictions.
#[derive(Debug, Clone, PartialEq)]
pub struct MaskGuesses {
    /// The mask's token position in the prompt.
    pub position: usize,
    /// The k most likely ordinary tokens as text, with their probabilities, best first.
    pub top: Vec<(String, f32)>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Filled {
    /// The prompt with every mask replaced by its best guess.
    pub text: String,
    /// The tokenizer's mask token (`[MASK]`, `<mask>`).
    pub mask_token: String,
    pub masks: Vec<MaskGuesses>,
}

/// Predicts the mask tokens of `prompt` with the encoder `src`; `k` guesses per mask.
pub fn fill_mask(src: &Source, prompt: &str, k: usize) -> Result<Filled> {
    src.expect_kind(taper_model::ModelKind::Encoder)?;
    let tok = &src.tokenizer;
    let invalid = |m: String| TrainError::Invalid(m);
    let mask = tokenizer::mask_id(tok).ok_or_else(|| {
        invalid(format!("{}: the tokenizer has no mask token ([MASK] or <mask>) to fill", src.tokenizer_path.display()))
    })?;
    let mask_token = tok.id_to_token(mask).unwrap_or_default();
    let enc = tokenizer::encode(tok, prompt, true)?;
    let mut ids = enc.get_ids().to_vec();
    let at: Vec<usize> = (0..ids.len()).filter(|&i| ids[i] == mask).collect();
    if at.is_empty() {
        return Err(invalid(format!(
            "the prompt has no {mask_token} token: an encoder model fills masks, e.g. --prompt \"ROMEO: Good \
             {mask_token}orrow\""
        )));
    }
    if ids.len() > src.config.block_size {
        return Err(invalid(format!(
            "the prompt is {} tokens, past the model's context of {}",
            ids.len(),
            src.config.block_size
        )));
    }
    let model = Bert::load(&Weights::new(src.weights.clone()).detached(), &src.config)?;
    let x = Tensor::new(ids.as_slice(), model.device())?.unsqueeze(0)?;
    let logits = model.forward(&x, None, None, None)?.squeeze(0)?.to_dtype(DType::F32)?; // (T, V)
    let special = tokenizer::special_ids(tok);
    let mut masks = Vec::new();
    for &i in &at {
        let probs: Vec<f32> = taper_model::nn::softmax(&logits.get(i)?)?.to_vec1()?;
        // Only ordinary tokens fill a mask: a special token is never a masked-LM target.
        let mut order: Vec<usize> = (0..probs.len())
            .filter(|&t| !special.contains(&(t as u32)) && tok.id_to_token(t as u32).is_some())
            .collect();
        order.sort_by(|&p, &q| probs[q].total_cmp(&probs[p]));
        ids[i] = order[0] as u32;
        let top = order
            .iter()
            .take(k.max(1))
            .map(|&t| Ok((tokenizer::decode(tok, &[t as u32])?, probs[t])))
            .collect::<Result<Vec<_>>>()?;
        masks.push(MaskGuesses { position: i, top });
    }
    let text = tok.decode(&ids, true).map_err(|e| invalid(format!("decoding the filled prompt: {e}")))?;
    Ok(Filled { text, mask_token, masks })
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    fn bert() -> Source {
        let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/../taper-model/tests/fixtures/hf/bert");
        crate::source::load(dir, &Device::Cpu).unwrap()
    }

    /// Each mask is filled with the ordinary token the model ranks first; the guesses are
    /// probabilities, best first; the rest of the prompt is kept.
    #[test]
    fn masks_are_filled_with_the_most_likely_ordinary_token() -> Result<()> {
        let src = bert();
        let f = fill_mask(&src, "be [MASK] or b[MASK]", 5)?;
        assert_eq!(f.mask_token, "[MASK]");
        assert_eq!(f.masks.len(), 2);
        for m in &f.masks {
            assert_eq!(m.top.len(), 5);
            assert!(m.top.windows(2).all(|w| w[0].1 >= w[1].1), "{:?}", m.top);
            assert!(m.top.iter().all(|(t, p)| *p > 0.0 && *p < 1.0 && !t.starts_with('[')), "{:?}", m.top);
        }
        assert!(!f.text.contains("[MASK]"), "{}", f.text);
        let best = |i: usize| f.masks[i].top[0].0.clone();
        assert!(f.text.contains(&format!("be {} or b{}", best(0), best(1))), "{}", f.text);
        Ok(())
    }

    #[test]
    fn a_prompt_without_a_mask_or_a_decoder_is_one_clear_error() {
        let err = fill_mask(&bert(), "no masks here", 3).unwrap_err().to_string();
        assert!(err.contains("the prompt has no [MASK] token"), "{err}");
        let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/../taper-model/tests/fixtures/hf/llama");
        let llama = crate::source::load(dir, &Device::Cpu).unwrap();
        let err = fill_mask(&llama, "a [MASK]", 3).unwrap_err().to_string();
        assert!(err.contains("needs an encoder"), "{err}");
    }
}
