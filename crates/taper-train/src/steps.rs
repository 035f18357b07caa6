//! The two halves of an optimizer update: gradients accumulated over micro-batches, and the
//! guarded update (non-finite check, clipping, the optimizer step).

use crate::config::{OnNonFinite, TrainConfig};
use crate::data_parallel::{Gradients, Updater};
use crate::observe::Observer;
use crate::optim::Param;
use crate::{Result, TrainError};
use candle_core::Tensor;

/// The mean of `n` micro-batch losses and, for each parameter, the gradient of that mean:
/// each micro-batch backpropagates loss / n and the gradients add up, so accumulation over
/// micro-batches equals one big batch.
pub fn accumulate<E: From<candle_core::Error> + From<TrainError>>(
    params: &[Param],
    n: usize,
    mut micro_loss: impl FnMut(usize) -> std::result::Result<Tensor, E>,
) -> std::result::Result<(f64, Vec<Tensor>), E> {
    let mut grads: Vec<Option<Tensor>> = vec![None; params.len()];
    let mut loss_sum = 0.0;
    for i in 0..n {
        let loss = micro_loss(i)?;
        loss_sum += loss.to_dtype(candle_core::DType::F64)?.to_scalar::<f64>()?;
        let store = (loss / n as f64)?.backward()?;
        for (acc, p) in grads.iter_mut().zip(params) {
            let g = store
                .get(p.var.as_tensor())
                .ok_or_else(|| TrainError::Invalid(format!("no gradient reached `{}`", p.name)))?;
            *acc = Some(match acc.take() {
                Some(a) => (a + g)?,
                None => g.clone(),
            });
        }
    }
    Ok((loss_sum / n as f64, grads.into_iter().map(|g| g.expect("every micro-batch fills every slot")).collect()))
}

/// Checks the step's loss and gradients (complete, reduced across replicas), clips, and applies
/// the update. A non-finite loss or gradient norm stops the run or, with `on_nonfinite =
/// "skip"`, leaves the weights as they are and counts the step in `skipped`. Returns the
/// gradient norm before clipping.
#[allow(clippy::too_many_arguments)]
pub fn guarded_update(
    opt: &mut Updater,
    grads: Gradients,
    loss: f64,
    lr: f64,
    tc: &TrainConfig,
    step: u64,
    skipped: &mut u64,
    obs: &mut dyn Observer,
) -> Result<f64> {
    let norm = opt.norm(&grads)?;
    let bad = if !loss.is_finite() {
        Some(("loss", loss))
    } else if !norm.is_finite() {
        Some(("gradient norm", norm))
    } else {
        None
    };
    match (bad, tc.on_nonfinite) {
        (Some((what, value)), OnNonFinite::Stop) => return Err(TrainError::NonFinite { step: step + 1, what, value }),
        (Some((what, value)), OnNonFinite::Skip) => {
            *skipped += 1;
            obs.message(&format!("step {}: {what} is {value}; skipped ({skipped} so far)", step + 1));
        }
        (None, _) => {
            let clip = (tc.grad_clip > 0.0 && norm > tc.grad_clip).then(|| tc.grad_clip / (norm + 1e-6));
            opt.apply(grads, lr, clip)?;
        }
    }
    Ok(norm)
}
