//! Continuing prompts with a [`Decoder`]: one prompt at a time with the tokens streamed
//! ([`Decoder::generate`], sampling on the host), or many at once ([`Decoder::generate_batch`]):
//! prompts left-padded to one length, a KV cache allocated once and written in place, and the
//! sampling on the logits' device, so that each step copies back only the chosen ids.

use crate::decoder::{Decoder, KvCache};
use crate::rng::Rng;
use crate::{ModelError, Result};
use candle_core::{DType, Device, Tensor, D};
use std::collections::HashMap;

/// Prompts that [`Decoder::generate_in_batches`] runs together: enough rows to fill each
/// step's matmuls (a GPU's too, for small models), while the padded batch and its cache stay
/// small next to the model.
pub const GENERATION_BATCH: usize = 64;

/// Sampling settings for [`Decoder::generate`] and [`Decoder::generate_batch`].
#[derive(Debug, Clone)]
pub struct Sampling {
    /// 0 is greedy.
    pub temperature: f64,
    /// 0 disables top-k.
    pub top_k: usize,
    /// 1.0 disables nucleus sampling.
    pub top_p: f64,
}

impl Default for Sampling {
    fn default() -> Self {
        Self { temperature: 1.0, top_k: 0, top_p: 1.0 }
    }
}

impl Sampling {
    pub fn greedy(&self) -> bool {
        self.temperature <= 0.0
    }
}

impl Decoder {
    /// Continues `prompt` by up to `max_new` tokens, stopping after any of `stop`. Uses the KV
    /// cache while the sequence fits the context; past it the window slides over the last
    /// block_size tokens (recomputed, as in nanoGPT).
    pub fn generate(
        &self,
        prompt: &[u32],
        max_new: usize,
        sampling: &Sampling,
        stop: &[u32],
        rng: &mut Rng,
        mut on_token: impl FnMut(u32),
    ) -> Result<Vec<u32>> {
        let bs = self.config().block_size;
        let mut tokens = prompt.to_vec();
        if tokens.is_empty() {
            return Err(ModelError::Config("generation needs a non-empty prompt".into()));
        }
        let mut cache = KvCache::new(self.config().n_layer);
        let mut out = Vec::new();
        for _ in 0..max_new {
            let logits = if tokens.len() <= bs {
                let fed = cache.len();
                let new = Tensor::new(&tokens[fed..], self.device())?.unsqueeze(0)?;
                self.forward(&new, fed, Some(&mut cache), None)?
            } else {
                let window = Tensor::new(&tokens[tokens.len() - bs..], self.device())?.unsqueeze(0)?;
                self.forward(&window, 0, None, None)?
            };
            let last = logits.squeeze(0)?.get(logits.dim(1)? - 1)?; // (V,)
            let last: Vec<f32> = last.to_dtype(DType::F32)?.to_vec1()?;
            let next = sample(&last, sampling, rng);
            tokens.push(next);
            out.push(next);
            on_token(next);
            if stop.contains(&next) {
                break;
            }
        }
        Ok(out)
    }

    /// Continues every prompt by up to `max_new` tokens at once, row `i` drawing from `rngs[i]`
    /// (one uniform per token it samples; none when greedy), and returns each row's new tokens,
    /// up to and including the first of `stop` it produced. A row that is done keeps its place
    /// in the batch until every row is.
    ///
    /// The prompts are left-padded to the longest, P tokens; each row's positions start at 0 at
    /// its first real token and its padding is hidden from every query. Each layer's keys and
    /// values live in one (B, KV, P + max_new, D) cache allocated up front. P + `max_new` must
    /// fit the context: no window slides here.
    pub fn generate_batch(
        &self,
        prompts: &[Vec<u32>],
        max_new: usize,
        sampling: &Sampling,
        stop: &[u32],
        rngs: &mut [Rng],
    ) -> Result<Vec<Vec<u32>>> {
        if rngs.len() != prompts.len() {
            return Err(ModelError::Config(format!("{} prompts need as many rngs, got {}", prompts.len(), rngs.len())));
        }
        if prompts.iter().any(Vec::is_empty) {
            return Err(ModelError::Config("generation needs a non-empty prompt".into()));
        }
        let p = prompts.iter().map(Vec::len).max().unwrap_or(0);
        if prompts.is_empty() || max_new == 0 {
            return Ok(vec![Vec::new(); prompts.len()]);
        }
        let max = self.config().block_size;
        if p + max_new > max {
            return Err(ModelError::GenerationTooLong { prompt: p, max_new, max });
        }
        let mut cache = KvCache::preallocated(self.config(), prompts.len(), p + max_new, self.dtype(), self.device())?;
        self.decode_batch(&mut cache, prompts, rngs, max_new, sampling, stop)
    }

    /// [`Self::generate_batch`] over any number of rows, each a prompt and the rng it draws from
    /// (left advanced as there): in batches of at most [`GENERATION_BATCH`] prompts of similar
    /// lengths (less padding), the results in the rows' order. A row's tokens do not depend on
    /// the batch it lands in, up to the rounding of sums that padding changes.
    pub fn generate_in_batches(
        &self,
        rows: &mut [(&[u32], Rng)],
        max_new: usize,
        sampling: &Sampling,
        stop: &[u32],
    ) -> Result<Vec<Vec<u32>>> {
        let mut order: Vec<usize> = (0..rows.len()).collect();
        order.sort_by_key(|&i| rows[i].0.len());
        let mut out = vec![Vec::new(); rows.len()];
        for chunk in order.chunks(GENERATION_BATCH) {
            let prompts: Vec<Vec<u32>> = chunk.iter().map(|&i| rows[i].0.to_vec()).collect();
            let mut rngs: Vec<Rng> = chunk.iter().map(|&i| rows[i].1.clone()).collect();
            let got = self.generate_batch(&prompts, max_new, sampling, stop, &mut rngs)?;
            for ((&i, tokens), rng) in chunk.iter().zip(got).zip(rngs) {
                (out[i], rows[i].1) = (tokens, rng);
            }
        }
        Ok(out)
    }

    /// Runs prompts of at most `p` tokens, left-padded to `p`, into the empty `cache`, and
    /// returns the logits (B, V) of each one's last token.
    fn prefill(
        &self,
        prompts: &[&[u32]],
        p: usize,
        rope: Option<&(Tensor, Tensor)>,
        cache: &mut KvCache,
    ) -> Result<Tensor> {
        let b = prompts.len();
        // Slot s of a row padded by `pad` holds position s - pad; padding (segment 0) sees only
        // itself.
        let (mut ids, mut pos, mut seg) =
            (Vec::with_capacity(b * p), Vec::with_capacity(b * p), Vec::with_capacity(b * p));
        for x in prompts {
            let pad = p - x.len();
            // Padding repeats the row's first token: any id the embedding has would do.
            ids.extend(std::iter::repeat_n(x[0], pad).chain(x.iter().copied()));
            pos.extend(std::iter::repeat_n(0, pad).chain(0..x.len() as u32));
            seg.extend(std::iter::repeat_n(0, pad).chain(std::iter::repeat_n(1, x.len())));
        }
        let ids = Tensor::from_vec(ids, (b, p), self.device())?;
        // (B, P, C); left padding puts every row's last token in the last slot, whose logits are
        // the only ones needed.
        let h = self.forward_hidden_rows(&ids, &pos, (&seg, &seg), rope, cache)?;
        let last = h.narrow(1, p - 1, 1)?; // (B, 1, C)
        Ok(self.head(&last)?.squeeze(1)?) // (B, V)
    }

    /// [`Self::generate_batch`]'s loop over a cache with room for every position.
    fn decode_batch(
        &self,
        cache: &mut KvCache,
        prompts: &[Vec<u32>],
        rngs: &mut [Rng],
        max_new: usize,
        sampling: &Sampling,
        stop: &[u32],
    ) -> Result<Vec<Vec<u32>>> {
        let (b, dev) = (prompts.len(), self.device());
        let p = prompts.iter().map(Vec::len).max().unwrap_or(0);
        let pads: Vec<usize> = prompts.iter().map(|x| p - x.len()).collect();
        let rope = self.rope_tables(p + max_new)?;
        // Rows with the same prompt (a GRPO group, several samples of one prompt) share one
        // prefill: each distinct prompt runs once, and its keys and values go to all its rows.
        let (mut index, mut distinct) = (HashMap::new(), Vec::new());
        let row_of: Vec<u32> = prompts
            .iter()
            .map(|x| {
                *index.entry(x.as_slice()).or_insert_with(|| {
                    distinct.push(x.as_slice());
                    distinct.len() as u32 - 1
                })
            })
            .collect();
        let mut logits = if distinct.len() == b {
            self.prefill(&distinct, p, rope.as_ref(), cache)?
        } else {
            let mut shared = KvCache::preallocated(self.config(), distinct.len(), p, self.dtype(), dev)?;
            let logits = self.prefill(&distinct, p, rope.as_ref(), &mut shared)?;
            let rows = Tensor::new(row_of.as_slice(), dev)?;
            cache.copy_rows(&shared, &rows)?;
            logits.index_select(&rows, 0)?
        }; // (B, V)
        let (mut out, mut done) = (vec![Vec::new(); b], vec![false; b]);
        let queries = vec![1u32; b];
        for step in 0..max_new {
            let uniforms: Vec<f32> = match sampling.greedy() {
                true => vec![0.0; b],
                false => rngs.iter_mut().zip(&done).map(|(r, &d)| if d { 0.0 } else { r.uniform() }).collect(),
            };
            let next = sample_rows(&logits, sampling, &uniforms)?;
            for ((o, d), &t) in out.iter_mut().zip(done.iter_mut()).zip(&next) {
                if !*d {
                    o.push(t);
                    *d = stop.contains(&t) || o.len() == max_new;
                }
            }
            if done.iter().all(|&d| d) {
                break;
            }
            // The new token sits in slot p + step of every row (done rows feed theirs too).
            let slot = p + step;
            let pos: Vec<u32> = pads.iter().map(|&pad| (slot - pad) as u32).collect();
            let keys: Vec<u32> = pads.iter().flat_map(|&pad| (0..=slot).map(move |s| u32::from(s >= pad))).collect();
            let ids = Tensor::from_vec(next, (b, 1), dev)?;
            let h = self.forward_hidden_rows(&ids, &pos, (&queries, &keys), rope.as_ref(), cache)?; // (B, 1, C)
            logits = self.head(&h)?.squeeze(1)?; // (B, V)
        }
        Ok(out)
    }
}

/// Draws a token from logits with temperature, top-k and top-p (nucleus) filtering.
pub fn sample(logits: &[f32], s: &Sampling, rng: &mut Rng) -> u32 {
    // Greedy draws nothing, so that a stream's numbers go only to the tokens sampled.
    let u = if s.greedy() { 0.0 } else { rng.uniform_f64() };
    sample_with(logits, s, u)
}

/// [`sample`] with its uniform `u` in [0, 1) given (unused when greedy): the tokens by falling
/// logit, cut to the top k, their softmax at the temperature cut to the smallest prefix whose
/// mass reaches top_p, then the token where the cumulative mass passes `u` times the kept mass.
pub fn sample_with(logits: &[f32], s: &Sampling, u: f64) -> u32 {
    let argmax = || {
        logits.iter().enumerate().fold((0, f32::NEG_INFINITY), |best, (i, &l)| if l > best.1 { (i, l) } else { best }).0
            as u32
    };
    if s.greedy() {
        return argmax();
    }
    let mut idx: Vec<usize> = (0..logits.len()).collect();
    idx.sort_by(|&a, &b| logits[b].total_cmp(&logits[a]));
    if s.top_k > 0 {
        idx.truncate(s.top_k);
    }
    let max = logits[idx[0]] as f64;
    let mut probs: Vec<f64> = idx.iter().map(|&i| ((logits[i] as f64 - max) / s.temperature).exp()).collect();
    let total: f64 = probs.iter().sum();
    probs.iter_mut().for_each(|p| *p /= total);
    if s.top_p < 1.0 {
        let mut acc = 0.0;
        let keep = probs
            .iter()
            .position(|p| {
                acc += p;
                acc >= s.top_p
            })
            .map_or(probs.len(), |k| k + 1);
        probs.truncate(keep);
        idx.truncate(keep);
    }
    let total: f64 = probs.iter().sum();
    let mut u = u * total;
    for (p, &i) in probs.iter().zip(&idx) {
        u -= p;
        if u < 0.0 {
            return i as u32;
        }
    }
    idx[idx.len() - 1] as u32
}

/// Draws one token per row of `logits` (B, V) on their device, as [`sample_with`] does on the
/// host with row `i`'s uniform `uniforms[i]`: a sort, masks for top-k and top-p, and the
/// inverse CDF, all tensor ops (in f32), so that only the B chosen ids are copied back.
pub fn sample_rows(logits: &Tensor, s: &Sampling, uniforms: &[f32]) -> Result<Vec<u32>> {
    let logits = logits.to_dtype(DType::F32)?.contiguous()?;
    let (b, v) = logits.dims2()?;
    if uniforms.len() != b {
        return Err(ModelError::Config(format!("{b} rows of logits need as many uniforms, got {}", uniforms.len())));
    }
    if s.greedy() {
        return Ok(logits.argmax(D::Minus1)?.to_vec1()?);
    }
    let dev = logits.device();
    if !sorts_on_device(dev, v) {
        let rows: Vec<Vec<f32>> = logits.to_vec2()?;
        return Ok(rows.iter().zip(uniforms).map(|(l, &u)| sample_with(l, s, u as f64)).collect());
    }
    let order = logits.arg_sort_last_dim(false)?; // (B, V) token ids by falling logit
    let sorted = logits.gather(&order, 1)?; // (B, V)
    let e = (sorted.broadcast_sub(&sorted.narrow(1, 0, 1)?)? / s.temperature)?.exp()?;
    let rank = Tensor::arange(0u32, v as u32, dev)?.unsqueeze(0)?; // (1, V)
    let k = if s.top_k > 0 { s.top_k.min(v) } else { v };
    let mut keep = rank.lt(k as u32)?.to_dtype(DType::F32)?.broadcast_as((b, v))?; // (B, V), 1 kept
    let mut probs = e.mul(&keep)?;
    probs = probs.broadcast_div(&probs.sum_keepdim(1)?)?;
    if s.top_p < 1.0 && v > 1 {
        // A token stays while the mass ranked above it is short of top_p: the smallest prefix
        // that reaches it.
        let above = Tensor::cat(&[&Tensor::zeros((b, 1), DType::F32, dev)?, &cumsum(&probs.narrow(1, 0, v - 1)?)?], 1)?;
        keep = keep.mul(&above.lt(s.top_p)?.to_dtype(DType::F32)?)?;
        probs = probs.mul(&keep)?;
    }
    let c = cumsum(&probs)?; // (B, V)
    let u = Tensor::from_slice(uniforms, (b, 1), dev)?;
    // u times the kept mass (B, 1); the token drawn is the first whose cumulative mass passes
    // it, the last kept one at worst.
    let target = u.mul(&c.narrow(1, v - 1, 1)?)?;
    let passed = c.broadcast_le(&target)?.to_dtype(DType::F32)?.sum_keepdim(1)?; // (B, 1)
    let last = (keep.sum_keepdim(1)? - 1.0)?;
    let at = passed.minimum(&last)?.to_dtype(DType::U32)?; // (B, 1)
    Ok(order.gather(&at, 1)?.squeeze(1)?.to_vec1()?)
}

/// Whether `arg_sort_last_dim` sorts rows of `v` values on `dev`: candle's CUDA kernel keeps a
/// row's u32 indices, padded to a power of two, in shared memory, at most 48 KiB by default.
/// Larger vocabularies sample on the host there, after one copy of the logits per step.
fn sorts_on_device(dev: &Device, v: usize) -> bool {
    !dev.is_cuda() || v.next_power_of_two() * 4 <= 48 * 1024
}

/// Columns summed by one triangular matmul in [`cumsum`].
const CUMSUM_BLOCK: usize = 256;

/// Inclusive cumulative sums along the rows of `x` (B, V). candle's `cumsum` multiplies by a
/// (V, V) triangular matrix, gigabytes for a large vocabulary; here blocks of
/// [`CUMSUM_BLOCK`] columns sum within themselves, then their totals across, both that way.
fn cumsum(x: &Tensor) -> Result<Tensor> {
    let (b, v) = x.dims2()?;
    let n = v.div_ceil(CUMSUM_BLOCK);
    if n <= 1 {
        return Ok(x.cumsum(1)?);
    }
    let padded = Tensor::cat(&[x, &Tensor::zeros((b, n * CUMSUM_BLOCK - v), x.dtype(), x.device())?], 1)?;
    let within = padded.reshape((b, n, CUMSUM_BLOCK))?.cumsum(2)?; // (B, n, block)
    let totals = within.narrow(2, CUMSUM_BLOCK - 1, 1)?; // (B, n, 1)
    let before = (totals.cumsum(1)? - &totals)?; // (B, n, 1): the mass of the earlier blocks
    Ok(within.broadcast_add(&before)?.reshape((b, n * CUMSUM_BLOCK))?.narrow(1, 0, v)?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::decoder::tests::tiny;
    use crate::{init_weights, ModelConfig, Weights};

    /// Prompts of five lengths, the longest first and last.
    fn prompts() -> Vec<Vec<u32>> {
        vec![vec![3, 9, 1, 4, 12], vec![1, 5, 9], vec![7], vec![16, 0], vec![8, 6, 3, 1, 2]]
    }

    /// A tiny decoder with a context for generation and weights large enough that its logits
    /// rarely tie.
    fn model(style: &str, kernels: bool) -> Result<Decoder> {
        let mut cfg = ModelConfig { block_size: 24, init_std: 0.3, kernels, ..tiny(style.trim_end_matches("-window")) };
        if style.ends_with("-window") {
            cfg.sliding_window = 3;
        }
        Decoder::load(&Weights::from_pairs(init_weights(&cfg, 11, &Device::Cpu)?), &cfg)
    }

    fn rngs(seed: u64, n: usize) -> Vec<Rng> {
        (0..n).map(|i| Rng::derive(seed, &[i as u64])).collect()
    }

    /// GPT-2 style, Llama style (RoPE, grouped-query attention) and Llama with a sliding window.
    fn models(kernels: bool) -> Result<Vec<(&'static str, Decoder)>> {
        ["gpt2", "llama", "llama-window"].into_iter().map(|style| Ok((style, model(style, kernels)?))).collect()
    }

    /// Greedy decoding of left-padded rows together gives what each prompt gives alone.
    #[test]
    fn greedy_batch_equals_one_at_a_time() -> Result<()> {
        let greedy = Sampling { temperature: 0.0, ..Default::default() };
        for kernels in [true, false] {
            for (style, m) in models(kernels)? {
                let got = m.generate_batch(&prompts(), 12, &greedy, &[], &mut rngs(0, 5))?;
                for (p, g) in prompts().iter().zip(&got) {
                    let alone = m.generate(p, 12, &greedy, &[], &mut Rng::new(0), |_| {})?;
                    assert_eq!(g, &alone, "{style}, kernels {kernels}: prompt {p:?}");
                }
            }
        }
        Ok(())
    }

    /// Sampled rows are a function of their own rng: the same seeds give the same rows, and a
    /// row comes out the same alone as among other prompts.
    #[test]
    fn sampled_rows_depend_only_on_their_rng() -> Result<()> {
        let s = Sampling { temperature: 1.0, top_k: 0, top_p: 0.9 };
        for (style, m) in models(true)? {
            let a = m.generate_batch(&prompts(), 12, &s, &[], &mut rngs(5, 5))?;
            assert_eq!(a, m.generate_batch(&prompts(), 12, &s, &[], &mut rngs(5, 5))?, "{style}");
            assert_ne!(a, m.generate_batch(&prompts(), 12, &s, &[], &mut rngs(6, 5))?, "{style}");
            for (i, p) in prompts().iter().enumerate() {
                let alone = m.generate_batch(std::slice::from_ref(p), 12, &s, &[], &mut rngs(5, 5)[i..=i])?;
                assert_eq!(alone[0], a[i], "{style}: prompt {p:?}");
            }
        }
        Ok(())
    }

    /// Rows that repeat a prompt share its prefill and still come out as each does alone.
    #[test]
    fn repeated_prompts_share_one_prefill() -> Result<()> {
        let s = Sampling { temperature: 1.0, top_k: 0, top_p: 0.95 };
        let ps = prompts();
        let rows = vec![ps[1].clone(), ps[0].clone(), ps[1].clone(), ps[1].clone(), ps[3].clone(), ps[0].clone()];
        for (style, m) in models(true)? {
            let got = m.generate_batch(&rows, 10, &s, &[], &mut rngs(4, rows.len()))?;
            for (i, p) in rows.iter().enumerate() {
                let alone = m.generate_batch(std::slice::from_ref(p), 10, &s, &[], &mut rngs(4, rows.len())[i..=i])?;
                assert_eq!(got[i], alone[0], "{style}: row {i}");
            }
            assert_ne!(got[0], got[2], "{style}: one prompt, two streams");
        }
        Ok(())
    }

    /// More prompts than one batch holds come back in their order, each as it comes alone.
    #[test]
    fn batches_keep_the_prompts_order() -> Result<()> {
        let m = model("llama", true)?;
        let s = Sampling { temperature: 1.0, top_k: 8, top_p: 0.95 };
        let many: Vec<Vec<u32>> = (0..GENERATION_BATCH + 6)
            .map(|i| (0..1 + i % 4).map(|j| ((i * 7 + j * 3) % 17) as u32).collect())
            .collect();
        let mut rows: Vec<(&[u32], Rng)> = many.iter().map(Vec::as_slice).zip(rngs(2, many.len())).collect();
        let got = m.generate_in_batches(&mut rows, 6, &s, &[])?;
        assert_eq!(got.len(), many.len());
        for (i, p) in many.iter().enumerate() {
            let mut alone = rngs(2, many.len())[i].clone();
            assert_eq!(
                got[i],
                m.generate_batch(std::slice::from_ref(p), 6, &s, &[], std::slice::from_mut(&mut alone))?[0]
            );
            assert_eq!(rows[i].1, alone, "prompt {i}: the rng comes back advanced as alone");
        }
        Ok(())
    }

    /// The device draw picks the host's token for the same uniform, for fixed logits and 2000
    /// uniforms, in several settings and across the blocks of the cumulative sum.
    #[test]
    fn device_sampling_matches_the_host() -> Result<()> {
        let mut rng = Rng::new(3);
        let settings = [(1.0, 0, 1.0), (0.7, 5, 1.0), (1.0, 0, 0.9), (1.5, 12, 0.75), (2.0, 4, 0.6), (0.0, 0, 1.0)];
        for v in [40, 1000] {
            let logits: Vec<f32> = (0..v).map(|_| (rng.normal() * 2.0) as f32).collect();
            let uniforms: Vec<f32> = (0..2000).map(|_| rng.uniform()).collect();
            let rows = Tensor::new(logits.as_slice(), &Device::Cpu)?.unsqueeze(0)?.repeat((2000, 1))?; // (2000, V)
            for (temperature, top_k, top_p) in settings {
                let s = Sampling { temperature, top_k, top_p };
                let device = sample_rows(&rows, &s, &uniforms)?;
                let host: Vec<u32> = uniforms.iter().map(|&u| sample_with(&logits, &s, u as f64)).collect();
                let off = device.iter().zip(&host).filter(|(a, b)| a != b).count();
                assert!(off <= 3, "V {v}, {s:?}: {off} of 2000 draws differ");
                // Every sampled setting draws among several tokens, greedy always the same one.
                let distinct = host.iter().collect::<std::collections::HashSet<_>>().len();
                assert_eq!(distinct == 1, temperature == 0.0, "{s:?}: {distinct} tokens drawn");
            }
        }
        Ok(())
    }

    /// The blocked cumulative sum equals a running sum.
    #[test]
    fn blocked_cumsum_is_a_running_sum() -> Result<()> {
        let x = Tensor::arange(0f32, 1300.0, &Device::Cpu)?.reshape((2, 650))?;
        let got: Vec<Vec<f32>> = cumsum(&x)?.to_vec2()?;
        for (r, row) in x.to_vec2::<f32>()?.iter().enumerate() {
            let mut acc = 0.0;
            for (j, &a) in row.iter().enumerate() {
                acc += a;
                assert_eq!(got[r][j], acc, "row {r}, column {j}");
            }
        }
        Ok(())
    }

    /// Each row ends with its first stop token, and only that row stops there.
    #[test]
    fn rows_stop_at_their_stop_token() -> Result<()> {
        let s = Sampling::default();
        for (style, m) in models(true)? {
            let free = m.generate_batch(&prompts(), 12, &s, &[], &mut rngs(9, 5))?;
            assert!(free.iter().all(|r| r.len() == 12), "{style}");
            let stop = [free[0][2]];
            let got = m.generate_batch(&prompts(), 12, &s, &stop, &mut rngs(9, 5))?;
            for (g, f) in got.iter().zip(&free) {
                let end = f.iter().position(|t| *t == stop[0]).map_or(f.len(), |i| i + 1);
                assert_eq!(g, &f[..end], "{style}");
            }
            assert!(got[0].len() <= 3 && got.iter().any(|g| g.len() > got[0].len()), "{style}: {got:?}");
        }
        Ok(())
    }

    /// The cache is allocated once: after every step its tensors are the ones allocated up
    /// front, holding the keys written since.
    #[test]
    fn the_kv_cache_is_allocated_once() -> Result<()> {
        let m = model("llama", true)?;
        let (p, max_new) = (5, 12);
        let mut cache = KvCache::preallocated(m.config(), 5, p + max_new, m.dtype(), m.device())?;
        let before = cache.slots();
        let greedy = Sampling { temperature: 0.0, ..Default::default() };
        // Two rows repeat a prompt: their prefill runs once, and is copied into this cache.
        let mut rows = prompts();
        rows[3] = rows[1].clone();
        let out = m.decode_batch(&mut cache, &rows, &mut rngs(0, 5), max_new, &greedy, &[])?;
        assert_eq!(out[1], out[3]);
        assert!(out.iter().all(|o| o.len() == max_new));
        assert_eq!(cache.len(), p + max_new - 1);
        let after = cache.slots();
        assert_eq!(after.len(), m.config().n_layer);
        for ((k0, v0), (k1, v1)) in before.iter().zip(&after) {
            assert!(k0.id() == k1.id() && v0.id() == v1.id());
            assert_eq!(k1.dims(), &[5, 2, p + max_new, 4]);
            // The last key fed went into the storage allocated first.
            let last = k0.narrow(2, p + max_new - 2, 1)?.abs()?.sum_all()?.to_scalar::<f32>()?;
            assert!(last > 0.0);
        }
        Ok(())
    }

    #[test]
    fn prompts_past_the_context_are_refused() -> Result<()> {
        let m = model("gpt2", true)?;
        let err = m.generate_batch(&prompts(), 20, &Sampling::default(), &[], &mut rngs(0, 5)).unwrap_err();
        assert!(matches!(err, ModelError::GenerationTooLong { prompt: 5, max_new: 20, max: 24 }), "{err}");
        Ok(())
    }

    #[test]
    fn sampling_respects_top_k_and_greedy() {
        let logits = [0.0f32, 5.0, 4.9, -1.0];
        let mut rng = Rng::new(0);
        assert_eq!(sample(&logits, &Sampling { temperature: 0.0, ..Default::default() }, &mut rng), 1);
        for _ in 0..100 {
            let t = sample(&logits, &Sampling { temperature: 1.0, top_k: 2, top_p: 1.0 }, &mut rng);
            assert!(t == 1 || t == 2);
        }
    }
}
