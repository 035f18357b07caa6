//! The masked-LM objective (BERT, Devlin et al. 2019, 3.1): of the non-special tokens, each is
//! selected with probability `p` (15%); a selected token becomes the mask token 80% of the
//! time, a random ordinary token 10%, and stays as it is 10%. The loss is taken only at the
//! selected positions. Masks are drawn from taper's [`Rng`] keyed by (seed, step, micro-batch),
//! so a run's masks are a pure function of its seed and a resumed run is bit-exact.

use crate::config::RunConfig;
use crate::observe::{Observer, Summary};
use crate::samples;
use crate::scratch::{self, WindowObjective, Windows};
use crate::trainer::{Evaluation, Micro, RunSpec};
use crate::{Result, TrainError};
use candle_core::{DType, Device, Tensor};
use taper_data::{tokenizer, Batch, Shard, WindowSampler};
use taper_model::{nn::cross_entropy, Bert, Rng};

/// Keeps the masking streams apart from the dropout streams of the same (seed, step, micro).
const MASK_SALT: u64 = 0x4D4C_4D5F_4D41_534B;
/// The step slot of the validation masks: fixed, so every evaluation masks alike.
const EVAL_STEP: u64 = u64::MAX;

/// Chooses and corrupts the positions the model must restore.
#[derive(Debug, Clone)]
pub struct Masker {
    pub mask_id: u32,
    /// Indexed by token id: never selected.
    special: Vec<bool>,
    /// The random replacements: every non-special token.
    ordinary: Vec<u32>,
    pub probability: f64,
}

impl Masker {
    /// `specials` are never selected nor drawn as replacements; `vocab` counts every token id.
    pub fn new(mask_id: u32, specials: &[u32], vocab: usize, probability: f64) -> Result<Self> {
        let mut special = vec![false; vocab];
        for &s in specials.iter().chain([&mask_id]) {
            if let Some(slot) = special.get_mut(s as usize) {
                *slot = true;
            }
        }
        let ordinary: Vec<u32> = (0..vocab as u32).filter(|&i| !special[i as usize]).collect();
        if ordinary.is_empty() {
            return Err(TrainError::Invalid("masked LM: the tokenizer has no ordinary (non-special) tokens".into()));
        }
        Ok(Self { mask_id, special, ordinary, probability })
    }

    /// From a tokenizer: its mask token (a clear error without one) and its special tokens.
    pub fn from_tokenizer(tok: &tokenizers::Tokenizer, path: &std::path::Path, probability: f64) -> Result<Self> {
        let mask_id = tokenizer::mask_id(tok).ok_or_else(|| {
            TrainError::Invalid(format!(
                "objective = \"mlm\" needs a mask token, and tokenizer {} has none of {:?}: add \"[MASK]\" to \
                 data.special_tokens (or train one with `taper tokenizer train --special [MASK]`)",
                path.display(),
                tokenizer::MASK_TOKENS
            ))
        })?;
        Self::new(mask_id, &tokenizer::special_ids(tok), tokenizer::vocab_size(tok), probability)
    }

    pub fn is_special(&self, id: u32) -> bool {
        self.special.get(id as usize).copied().unwrap_or(false)
    }

    /// (corrupted inputs, labels): labels hold the original token at selected positions and
    /// `-100` (ignored) elsewhere. Every position draws the same number of values whatever it
    /// holds, so one token's fate does not shift the others'.
    pub fn mask(&self, ids: &[u32], rng: &mut Rng) -> (Vec<u32>, Vec<i64>) {
        let mut inputs = ids.to_vec();
        let mut labels = vec![-100i64; ids.len()];
        for (i, &id) in ids.iter().enumerate() {
            let (select, what, pick) = (rng.uniform_f64(), rng.uniform_f64(), rng.next_u64());
            if select >= self.probability || self.is_special(id) {
                continue;
            }
            labels[i] = id as i64;
            if what < 0.8 {
                inputs[i] = self.mask_id;
            } else if what < 0.9 {
                // Multiply-shift: 64 random bits to an index, negligible bias.
                let k = ((pick as u128 * self.ordinary.len() as u128) >> 64) as usize;
                inputs[i] = self.ordinary[k];
            }
        }
        (inputs, labels)
    }

    /// The stream for step `step`, micro-batch `micro` of a run seeded `seed`.
    pub fn rng(seed: u64, step: u64, micro: u64) -> Rng {
        Rng::derive(seed ^ MASK_SALT, &[step, micro])
    }

    /// A window batch's inputs, masked: ids (B, T) and labels (B*T,). On the fused CPU path
    /// the masks come from `rng` on the host ([`Self::mask`]); elsewhere they are drawn on the
    /// device ([`Self::mask_on_device`]) under the next value of `rng`.
    pub fn batch_tensors(&self, b: &Batch, rng: &mut Rng, dev: &Device) -> Result<(Tensor, Tensor)> {
        if !taper_kernels::fused_on(dev) {
            let ids = Tensor::from_slice(&b.inputs, (b.batch, b.seq), dev)?;
            let (inputs, labels) = self.mask_on_device(&ids, rng.next_u64())?;
            return Ok((inputs, labels.flatten_all()?));
        }
        let (inputs, labels) = self.mask(&b.inputs, rng);
        let n = labels.len();
        Ok((Tensor::from_vec(inputs, (b.batch, b.seq), dev)?, Tensor::from_vec(labels, n, dev)?))
    }

    /// [`Self::mask`] as tensor ops on the ids' device, from three Philox streams under `key`
    /// (selection, the 80/10/10 choice, the replacement): corrupted ids (u32) and labels (i64,
    /// -100 where not selected), both shaped like `ids`. Nothing is read back.
    pub fn mask_on_device(&self, ids: &Tensor, key: u64) -> Result<(Tensor, Tensor)> {
        let (dev, shape) = (ids.device(), ids.shape());
        let draw = |stream: u32| taper_kernels::random::uniform_stream(shape, key, stream, dev);
        let special = Tensor::from_iter(self.special.iter().map(|&s| u8::from(s)), dev)?;
        let is_special = special.index_select(&ids.flatten_all()?, 0)?.reshape(shape)?;
        let select = draw(0)?.lt(self.probability as f32)?.mul(&is_special.eq(0u8)?)?;
        let what = draw(1)?;
        let to_mask = select.mul(&what.lt(0.8f32)?)?;
        let to_random = select.mul(&what.ge(0.8f32)?)?.mul(&what.lt(0.9f32)?)?;
        let n = self.ordinary.len();
        let pick = (draw(2)? * n as f64)?.floor()?.clamp(0f32, (n - 1) as f32)?.to_dtype(DType::U32)?;
        let ordinary = Tensor::from_slice(&self.ordinary, n, dev)?;
        let random = ordinary.index_select(&pick.flatten_all()?, 0)?.reshape(shape)?;
        let mask_ids = Tensor::full(self.mask_id, shape, dev)?;
        let inputs = to_mask.where_cond(&mask_ids, &to_random.where_cond(&random, ids)?)?;
        let ignored = Tensor::full(-100i64, shape, dev)?;
        let labels = select.where_cond(&ids.to_dtype(DType::I64)?, &ignored)?;
        Ok((inputs, labels))
    }

    /// The most frequent ordinary token of a shard: the unigram baseline's one guess.
    pub fn most_frequent(&self, shard: &Shard) -> u32 {
        let mut counts = vec![0u64; self.special.len()];
        for i in 0..shard.len() {
            let t = shard.get(i) as usize;
            if t < counts.len() && !self.special[t] {
                counts[t] += 1;
            }
        }
        counts.iter().enumerate().max_by_key(|&(i, c)| (c, std::cmp::Reverse(i))).map_or(0, |(i, _)| i as u32)
    }
}

/// Trains a BERT-style encoder from scratch on the config's data with the masked-LM objective.
pub fn pretrain(cfg: RunConfig, run: RunSpec, obs: &mut dyn Observer) -> Result<Summary> {
    scratch::train_on_windows(cfg, run, obs, |cfg, windows, w| {
        let masker = Masker::from_tokenizer(&windows.tokenizer, &windows.data.tokenizer, cfg.mlm_probability)?;
        Ok(Mlm {
            model: Bert::load(w, &cfg.model)?.with_checkpointing(cfg.train.activation_checkpointing),
            eval_model: Bert::load(&w.detached(), &cfg.model)?,
            unigram: masker.most_frequent(windows.train.shard()),
            masker,
            seed: cfg.seed,
        })
    })
}

struct Mlm {
    model: Bert,
    eval_model: Bert,
    masker: Masker,
    /// The most frequent training token: the accuracy baseline.
    unigram: u32,
    seed: u64,
}

/// The mean MLM loss of masked ids (B, T) against labels (B*T,): the selected positions only.
pub fn mlm_loss(model: &Bert, x: &Tensor, y: &Tensor, rng: Option<&mut Rng>) -> Result<Tensor> {
    let logits = model.forward(x, None, None, rng)?; // (B, T, V)
    let v = logits.dim(2)?;
    Ok(cross_entropy(&logits.reshape(((), v))?, y, -100)?)
}

impl WindowObjective for Mlm {
    /// The prompts (by default the start of the first held-out windows), masked as in
    /// training with fixed streams, and the model's guess at every masked position.
    fn samples(&mut self, windows: &Windows, prompts: &[String], _max_new: usize) -> Result<Vec<(String, String)>> {
        let tok = &windows.tokenizer;
        let max = self.eval_model.config().block_size;
        let inputs: Vec<Vec<u32>> = match prompts.is_empty() {
            true => (0..samples::DEFAULT_PROMPTS as u64)
                .map(|i| windows.val.batch(i, 0).inputs.iter().copied().take(32.min(max)).collect())
                .collect(),
            false => prompts
                .iter()
                .map(|p| Ok(tokenizer::encode(tok, p.as_str(), false)?.get_ids().iter().copied().take(max).collect()))
                .collect::<Result<_>>()?,
        };
        let mut out = Vec::new();
        for (i, ids) in inputs.iter().enumerate().filter(|(_, ids)| !ids.is_empty()) {
            let (masked, labels) = self.masker.mask(ids, &mut Masker::rng(self.seed, EVAL_STEP, 1 << 32 | i as u64));
            let x = Tensor::from_slice(&masked, (1, masked.len()), self.eval_model.device())?;
            let guess: Vec<u32> = self.eval_model.forward(&x, None, None, None)?.squeeze(0)?.argmax(1)?.to_vec1()?;
            let filled: Vec<u32> = (0..ids.len()).map(|j| if labels[j] >= 0 { guess[j] } else { masked[j] }).collect();
            let (shown, answer) = (tokenizer::decode(tok, &masked)?, tokenizer::decode(tok, &filled)?);
            out.push((format!("samples/{i}"), samples::markdown(&shown, &answer)));
        }
        Ok(out)
    }

    fn loss(&mut self, batch: &Batch, at: Micro, rng: Option<&mut Rng>) -> Result<Tensor> {
        let mut masks = Masker::rng(self.seed, at.step, at.slot() as u64);
        let (x, y) = self.masker.batch_tensors(batch, &mut masks, self.model.device())?;
        mlm_loss(&self.model, &x, &y, rng)
    }

    fn evaluate(&mut self, val: &WindowSampler, n: usize, step: u64, obs: &mut dyn Observer) -> Result<Evaluation> {
        let e = evaluate(&self.eval_model, val, n, &self.masker, self.seed, self.unigram)?;
        obs.message(&format!(
            "step {step}: masked-token accuracy {:.2}% on {} val tokens (unigram baseline, always the most \
             frequent training token: {:.2}%)",
            100.0 * e.accuracy,
            e.masked,
            100.0 * e.unigram_accuracy
        ));
        let mut out = Evaluation::of_loss(e.loss);
        out.metrics.insert("val_mlm_accuracy".into(), e.accuracy.into());
        out.metrics.insert("val_unigram_accuracy".into(), e.unigram_accuracy.into());
        out.metrics.insert("val_masked_tokens".into(), e.masked.into());
        Ok(out)
    }
}

/// Masked-token prediction on validation windows.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct MlmEval {
    /// Mean cross-entropy at the selected positions.
    pub loss: f64,
    /// Share of selected positions whose argmax is the original token.
    pub accuracy: f64,
    /// The same share for always guessing the most frequent training token.
    pub unigram_accuracy: f64,
    pub masked: usize,
}

/// [`MlmEval`] over `n` fixed validation batches, masked the same way at every evaluation.
pub fn evaluate(
    model: &Bert,
    sampler: &WindowSampler,
    n: usize,
    masker: &Masker,
    seed: u64,
    unigram: u32,
) -> Result<MlmEval> {
    let (mut loss_sum, mut hits, mut base_hits, mut count) = (0.0, 0usize, 0usize, 0usize);
    for i in 0..n {
        let mut rng = Masker::rng(seed, EVAL_STEP, i as u64);
        let (x, y) = masker.batch_tensors(&sampler.batch(i as u64, 0), &mut rng, model.device())?;
        let logits = model.forward(&x, None, None, None)?;
        let v = logits.dim(2)?;
        let flat = logits.reshape(((), v))?;
        let loss = cross_entropy(&flat, &y, -100)?;
        let pred: Vec<u32> = flat.argmax(1)?.to_vec1()?;
        let labels: Vec<i64> = y.to_vec1()?;
        let k = labels.iter().filter(|&&l| l >= 0).count();
        loss_sum += loss.to_dtype(DType::F64)?.to_scalar::<f64>()? * k as f64;
        for (p, &l) in pred.iter().zip(&labels).filter(|&(_, &l)| l >= 0) {
            hits += (*p as i64 == l) as usize;
            base_hits += (unigram as i64 == l) as usize;
        }
        count += k;
    }
    let per = |x: f64| x / count.max(1) as f64;
    Ok(MlmEval {
        loss: per(loss_sum),
        accuracy: per(hits as f64),
        unigram_accuracy: per(base_hits as f64),
        masked: count,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn masker(p: f64) -> Masker {
        // 100 tokens: 0 is the mask, 1 and 2 are other specials.
        Masker::new(0, &[1, 2], 100, p).unwrap()
    }

    /// The host masks and the device masks of the same ids.
    fn both_ways(m: &Masker, ids: &[u32], seed: u64) -> [(Vec<u32>, Vec<i64>); 2] {
        let t = Tensor::from_slice(ids, ids.len(), &Device::Cpu).unwrap();
        let (inputs, labels) = m.mask_on_device(&t, seed).unwrap();
        [m.mask(ids, &mut Rng::new(seed)), (inputs.to_vec1().unwrap(), labels.to_vec1().unwrap())]
    }

    /// 15% selected; of those 80% masked, 10% random, 10% unchanged: on 400k tokens each share
    /// lands within a few standard errors of its target, on the host and on the device.
    #[test]
    fn proportions_are_15_80_10_10() {
        let m = masker(0.15);
        let mut r = Rng::new(1);
        let ids: Vec<u32> = (0..400_000).map(|_| 3 + r.below(97) as u32).collect();
        for (inputs, labels) in both_ways(&m, &ids, 42) {
            proportions(&ids, &inputs, &labels);
        }
        for (_, l) in both_ways(&masker(0.4), &ids, 42) {
            let sel = l.iter().filter(|&&x| x >= 0).count() as f64 / ids.len() as f64;
            assert!((sel - 0.4).abs() < 0.004, "selected {sel} at p = 0.4");
        }
        // The device masks are a function of their key.
        let t = Tensor::from_slice(&ids[..5000], 5000, &Device::Cpu).unwrap();
        let run = |key| m.mask_on_device(&t, key).unwrap().0.to_vec1::<u32>().unwrap();
        assert_eq!(run(5), run(5));
        assert_ne!(run(5), run(6));
    }

    fn proportions(ids: &[u32], inputs: &[u32], labels: &[i64]) {
        let selected: Vec<usize> = (0..ids.len()).filter(|&i| labels[i] >= 0).collect();
        let n = selected.len() as f64;
        let sel = n / ids.len() as f64;
        assert!((sel - 0.15).abs() < 0.003, "selected {sel}");
        let masked = selected.iter().filter(|&&i| inputs[i] == 0).count() as f64 / n;
        let kept = selected.iter().filter(|&&i| inputs[i] == ids[i]).count() as f64 / n;
        let replaced = selected.iter().filter(|&&i| inputs[i] != 0 && inputs[i] != ids[i]).count() as f64 / n;
        // A random replacement equals the original 1 time in 97: it counts as kept.
        assert!((masked - 0.8).abs() < 0.006, "masked {masked}");
        assert!((replaced - 0.1 * 96.0 / 97.0).abs() < 0.005, "replaced {replaced}");
        assert!((kept - (0.1 + 0.1 / 97.0)).abs() < 0.005, "kept {kept}");
        // Labels are the originals; unselected positions are untouched.
        assert!(selected.iter().all(|&i| labels[i] == ids[i] as i64));
        assert!((0..ids.len()).filter(|&i| labels[i] < 0).all(|i| inputs[i] == ids[i]));
        // Random replacements are ordinary tokens.
        assert!(inputs.iter().all(|&t| t == 0 || t >= 3));
    }

    #[test]
    fn masks_are_a_function_of_the_seed() {
        let m = masker(0.15);
        let ids: Vec<u32> = (0..5000).map(|i| 3 + (i * 7 % 97) as u32).collect();
        let a = m.mask(&ids, &mut Masker::rng(7, 3, 1));
        assert_eq!(a, m.mask(&ids, &mut Masker::rng(7, 3, 1)));
        assert_ne!(a, m.mask(&ids, &mut Masker::rng(8, 3, 1)));
        assert_ne!(a, m.mask(&ids, &mut Masker::rng(7, 4, 1)));
        assert_ne!(a, m.mask(&ids, &mut Masker::rng(7, 3, 2)));
        // Not the dropout stream of the same (seed, step, micro).
        assert_ne!(Masker::rng(7, 3, 1), Rng::derive(7, &[3, 1]));
    }

    #[test]
    fn specials_are_never_selected() {
        let m = masker(0.9);
        let ids: Vec<u32> = (0..30_000).map(|i| (i % 6) as u32).collect(); // 0, 1, 2 special
        for (inputs, labels) in both_ways(&m, &ids, 3) {
            for i in 0..ids.len() {
                if ids[i] < 3 {
                    assert_eq!((inputs[i], labels[i]), (ids[i], -100), "special token {} at {i}", ids[i]);
                }
            }
            assert!(labels.iter().filter(|&&l| l >= 0).count() > 12_000);
        }
    }

    #[test]
    fn a_tokenizer_without_a_mask_token_is_one_clear_error() {
        let dir = std::env::temp_dir().join(format!("taper-mlm-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let f = dir.join("t.txt");
        std::fs::write(&f, "To be, or not to be.\n").unwrap();
        let kind = tokenizer::TokenizerKind::Char;
        let plain = tokenizer::train(kind, std::slice::from_ref(&f), 0, &["<|endoftext|>".into()]).unwrap();
        let err = Masker::from_tokenizer(&plain, &f, 0.15).unwrap_err().to_string();
        assert!(err.contains("needs a mask token") && err.contains("[MASK]"), "{err}");
        let with = tokenizer::train(kind, std::slice::from_ref(&f), 0, &["<|endoftext|>".into(), "[MASK]".into()]);
        let m = Masker::from_tokenizer(&with.unwrap(), &f, 0.15).unwrap();
        assert_eq!(m.ordinary.len(), m.special.len() - 2);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
