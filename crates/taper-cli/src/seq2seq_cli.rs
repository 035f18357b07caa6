//! `taper generate` for an encoder-decoder: source text in, target text out.

use anyhow::{Context, Result};
use candle_core::Tensor;
use taper_data::tokenizer;
use taper_model::marian::{DecodeOptions, Seq2Seq};
use taper_model::Weights;
use taper_train::seq2seq::source_ids;
use taper_train::source::Source;

/// Encodes `text` (plus eos) and decodes greedily (`beams` 1) or with beam search.
pub fn translate(src: &Source, text: &str, beams: usize, length_penalty: f64, max_new: usize) -> Result<String> {
    let model = Seq2Seq::load(&Weights::new(src.weights.clone()).detached(), &src.config)?;
    let ids = source_ids(src)?;
    let mut s: Vec<u32> =
        src.tokenizer.encode(text, false).map_err(|e| anyhow::anyhow!("source text: {e}"))?.get_ids().to_vec();
    s.push(ids.eos);
    if s.len() > src.config.block_size {
        anyhow::bail!("the source is {} tokens long; the model reads at most {}", s.len(), src.config.block_size);
    }
    let n = s.len();
    let input = Tensor::from_vec(s, (1, n), model.device())?;
    let keep = Tensor::ones((1, n), candle_core::DType::U32, model.device())?;
    let o = DecodeOptions { beams, length_penalty, max_new_tokens: max_new, start: ids.start, eos: ids.eos };
    let mut out = if beams > 1 {
        model.beam_search(&input, &keep, &o)?
    } else {
        model.greedy(&input, &keep, &o)?.pop().unwrap_or_default()
    };
    if out.last() == Some(&ids.eos) {
        out.pop();
    }
    tokenizer::decode(&src.tokenizer, &out).context("decoding the output")
}
