//! Causal-LM pretraining, the recipe: windows of the prepared token shards, the decoder's
//! next-token loss (LM head and loss fused, so the (N, V) logits are never kept), and the
//! held-out loss on fixed validation windows.

use crate::config::RunConfig;
use crate::multiple_choice::{McModel, TaskEval};
use crate::observe::{Observer, Summary};
use crate::samples;
use crate::scratch::{self, WindowObjective, Windows};
use crate::trainer::{Evaluation, Micro, RunSpec};
use crate::{Result, TrainError};
use candle_core::{DType, Device, Tensor};
use taper_data::{Batch, WindowSampler};
use taper_model::{Decoder, Rng};

/// Trains a decoder from scratch on the config's data.
pub fn pretrain(cfg: RunConfig, run: RunSpec, obs: &mut dyn Observer) -> Result<Summary> {
    scratch::train_on_windows(cfg, run, obs, |cfg, windows, w| {
        let tasks = TaskEval::load(&cfg.eval.tasks)?;
        // lm_eval's empty-context token: taper's tokenizers have no BOS, so their EOS.
        let prefix_id = match taper_data::tokenizer::eos_id(&windows.tokenizer) {
            Some(id) => id,
            None if tasks.is_empty() => 0,
            None => {
                return Err(TrainError::Invalid(
                    "eval.tasks: the tokenizer has no end-of-text token to stand for an empty context".into(),
                ))
            }
        };
        Ok(Clm {
            model: Decoder::load(w, &cfg.model)?.with_checkpointing(cfg.train.activation_checkpointing),
            eval_model: Decoder::load(&w.detached(), &cfg.model)?,
            tasks,
            tokenizer: windows.tokenizer.clone(),
            prefix_id,
        })
    })
}

struct Clm {
    /// Over the optimizer's variables.
    model: Decoder,
    /// The same weights, detached: evaluation records no graph.
    eval_model: Decoder,
    /// `eval.tasks`, scored at each evaluation.
    tasks: TaskEval,
    tokenizer: tokenizers::Tokenizer,
    prefix_id: u32,
}

/// Batch (B, T) ids and (B*T,) next-token targets as tensors.
pub fn batch_tensors(b: &Batch, dev: &Device) -> Result<(Tensor, Tensor)> {
    let inputs = Tensor::from_vec(b.inputs.clone(), (b.batch, b.seq), dev)?;
    let targets: Vec<i64> = b.targets.iter().map(|&t| t as i64).collect();
    Ok((inputs, Tensor::from_vec(targets, b.batch * b.seq, dev)?))
}

/// The mean next-token loss of ids (B, T) against targets (B*T,).
pub fn clm_loss(model: &Decoder, x: &Tensor, y: &Tensor, rng: Option<&mut Rng>) -> Result<Tensor> {
    let h = model.forward_hidden(x, 0, None, rng)?; // (B, T, C)
    Ok(model.head_loss(&h, y, -100)?)
}

impl WindowObjective for Clm {
    /// Continuations of the prompts; by default of the first held-out windows' first tokens.
    fn samples(&mut self, windows: &Windows, prompts: &[String], max_new: usize) -> Result<Vec<(String, String)>> {
        let prompts = match prompts.is_empty() {
            false => prompts.to_vec(),
            true => (0..samples::DEFAULT_PROMPTS as u64)
                .map(|i| {
                    let w = windows.val.batch(i, 0);
                    let head = &w.inputs[..w.seq.min(16).min(w.inputs.len())];
                    taper_data::tokenizer::decode(&windows.tokenizer, head).map_err(Into::into)
                })
                .collect::<Result<Vec<_>>>()?,
        };
        samples::continuations(&self.eval_model, &windows.tokenizer, &prompts, &[], max_new)
    }

    fn loss(&mut self, batch: &Batch, _at: Micro, rng: Option<&mut Rng>) -> Result<Tensor> {
        let (x, y) = batch_tensors(batch, self.model.device())?;
        clm_loss(&self.model, &x, &y, rng)
    }

    /// Mean loss over the first `n` validation batches, with no backward graph.
    fn evaluate(&mut self, val: &WindowSampler, n: usize, _step: u64, _obs: &mut dyn Observer) -> Result<Evaluation> {
        let mut total = 0.0;
        for i in 0..n {
            let (x, y) = batch_tensors(&val.batch(i as u64, 0), self.eval_model.device())?;
            total += clm_loss(&self.eval_model, &x, &y, None)?.to_dtype(DType::F64)?.to_scalar::<f64>()?;
        }
        let mut e = Evaluation::of_loss(total / n as f64);
        let m = McModel { model: &self.eval_model, tokenizer: &self.tokenizer, prefix_id: self.prefix_id };
        self.tasks.add_metrics(&m, &mut e.metrics)?;
        Ok(e)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::optim::{OptimConfig, Optimizer};
    use crate::steps::accumulate;
    use candle_core::Var;
    use taper_model::{init_weights, ModelConfig, Weights};

    /// 4 micro-batches of B/4 rows give the gradients of one batch of B rows.
    #[test]
    fn grad_accumulation_equals_one_big_batch() -> Result<()> {
        let cfg =
            ModelConfig { vocab_size: 23, n_layer: 2, n_head: 2, n_embd: 16, block_size: 8, ..Default::default() };
        let dev = Device::Cpu;
        let vars: Vec<(String, Var)> = init_weights(&cfg, 3, &dev)?
            .into_iter()
            .map(|(n, t)| Ok((n, Var::from_tensor(&t)?)))
            .collect::<Result<_>>()?;
        let model = Decoder::load(&Weights::from_vars(&vars), &cfg)?;
        let opt = Optimizer::new(OptimConfig::default(), vars)?;
        let mut rng = Rng::new(9);
        let ids: Vec<u32> = (0..8 * 8).map(|_| rng.below(23) as u32).collect();
        let tg: Vec<i64> = (0..8 * 8).map(|_| rng.below(23) as i64).collect();
        let x = Tensor::from_vec(ids, (8, 8), &dev)?;
        let y = Tensor::from_vec(tg, 64, &dev)?;
        let (big_loss, big) = accumulate(opt.params(), 1, |_| clm_loss(&model, &x, &y, None))?;
        let (acc_loss, acc) = accumulate(opt.params(), 4, |i| {
            clm_loss(&model, &x.narrow(0, 2 * i, 2)?, &y.narrow(0, 16 * i, 16)?, None)
        })?;
        let (big_loss, acc_loss) = (big_loss.to_scalar::<f64>()?, acc_loss.to_scalar::<f64>()?);
        assert!((big_loss - acc_loss).abs() < 1e-6, "{big_loss} vs {acc_loss}");
        for ((a, b), p) in big.iter().zip(&acc).zip(opt.params()) {
            let diff = (a - b)?.abs()?.max_all()?.to_scalar::<f32>()?;
            let scale = a.abs()?.max_all()?.to_scalar::<f32>()?;
            assert!(diff <= 1e-6 * scale.max(1.0), "{}: max diff {diff} (scale {scale})", p.name);
        }
        Ok(())
    }
}
