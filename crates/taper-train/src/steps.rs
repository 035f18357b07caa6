//! The two halves of an optimizer update: gradients accumulated over micro-batches, and the
//! guarded update (non-finite check, clipping, the optimizer step). Neither reads a value back
//! from the device on the device-generic path: the loss and the gradient norm stay tensors, the
//! clipping scale is computed on the device, and a non-finite update is noted there until the
//! loop next reads (a log or checkpoint step).

use crate::config::{OnNonFinite, TrainConfig};
use crate::data_parallel::{Gradients, Updater};
use crate::loss_scale::LossScaler;
use crate::observe::Observer;
use crate::optim::Param;
use crate::{Result, TrainError};
use candle_core::{DType, Tensor};
use taper_model::host;

/// The mean of `n` micro-batch losses (an f64 scalar tensor) and, for each parameter, the
/// gradient of that mean: each micro-batch backpropagates loss / n and the gradients add up, so
/// accumulation over micro-batches equals one big batch.
pub fn accumulate<E: From<candle_core::Error> + From<TrainError>>(
    params: &[Param],
    n: usize,
    micro_loss: impl FnMut(usize) -> std::result::Result<Tensor, E>,
) -> std::result::Result<(Tensor, Vec<Tensor>), E> {
    accumulate_scaled(params, n, 1.0, micro_loss)
}

/// [`accumulate`] with each micro-batch's loss multiplied by `scale` before its backward and
/// the summed gradients divided by it after (f16 loss scaling; `scale` a power of two, so both
/// are exact unless a gradient overflowed).
pub fn accumulate_scaled<E: From<candle_core::Error> + From<TrainError>>(
    params: &[Param],
    n: usize,
    scale: f64,
    mut micro_loss: impl FnMut(usize) -> std::result::Result<Tensor, E>,
) -> std::result::Result<(Tensor, Vec<Tensor>), E> {
    let mut grads: Vec<Option<Tensor>> = vec![None; params.len()];
    let mut loss_sum: Option<Tensor> = None;
    for i in 0..n {
        let loss = micro_loss(i)?;
        let l = loss.detach().to_dtype(DType::F64)?;
        loss_sum = Some(match loss_sum {
            Some(s) => (s + l)?,
            None => l,
        });
        let seed = match scale == 1.0 {
            true => (loss / n as f64)?,
            false => ((loss * scale)? / n as f64)?,
        };
        let store = taper_model::checkpointing::backward(&seed)?;
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
    let loss = (loss_sum.ok_or_else(|| TrainError::Invalid("an update of no micro-batches".into()))? / n as f64)?;
    let grads = grads.into_iter().map(|g| g.expect("every micro-batch fills every slot"));
    let grads = match scale == 1.0 {
        true => grads.collect(),
        false => grads.map(|g| g.affine(1.0 / scale, 0.0)).collect::<candle_core::Result<_>>()?,
    };
    Ok((loss, grads))
}

/// The non-finite guard. Where reading is free (the CPU's own kernels) or bad updates are to be
/// skipped, the loss and norm are read at once and the update decided on the host. Elsewhere a
/// bad update under `on_nonfinite = "stop"` is noted on the device (the first bad step) and
/// found at the loop's next read, [`Guard::check`], before anything is logged or saved.
#[derive(Default)]
pub struct Guard {
    /// (first bad step + 1 or 0, its loss, its gradient norm): f64 on the device.
    first_bad: Option<Tensor>,
}

impl Guard {
    /// Fails when an update since the last check was not finite, naming which value was not.
    pub fn check(&mut self) -> Result<()> {
        let Some(t) = self.first_bad.take() else { return Ok(()) };
        let v = host::values(&t)?;
        if v[0] > 0.0 {
            let (what, value) = if v[1].is_finite() { ("gradient norm", v[2]) } else { ("loss", v[1]) };
            return Err(TrainError::NonFinite { step: v[0] as u64, what, value });
        }
        self.first_bad = Some(t);
        Ok(())
    }

    fn note(&mut self, step: u64, loss: &Tensor, norm: &Tensor) -> Result<()> {
        let loss = loss.to_dtype(DType::F64)?;
        let both = (&loss + norm)?;
        // |x| <= MAX is false for NaN and the infinities alone.
        let bad = both.abs()?.le(f64::MAX)?.eq(0u8)?; // u8 scalar
        let here = Tensor::stack(&[Tensor::new(step as f64 + 1.0, loss.device())?, loss, norm.clone()], 0)?;
        let first = match self.first_bad.take() {
            None => bad.broadcast_as(3)?.where_cond(&here, &here.zeros_like()?)?,
            // Keeps the first: a later bad step leaves it as it is. where_cond rather than
            // arithmetic, which would carry the NaN into the kept values.
            Some(f) => bad.mul(&f.get(0)?.eq(0f64)?)?.broadcast_as(3)?.where_cond(&here, &f)?,
        };
        self.first_bad = Some(first);
        Ok(())
    }
}

/// Checks the step's loss and gradients (complete, reduced across replicas), clips, and applies
/// the update. A non-finite loss or gradient norm stops the run or, with `on_nonfinite =
/// "skip"`, leaves the weights as they are and counts the step in `skipped`. Returns the
/// gradient norm before clipping, as a device scalar.
#[allow(clippy::too_many_arguments)]
pub fn guarded_update(
    opt: &mut Updater,
    grads: Gradients,
    loss: &Tensor,
    lr: f64,
    tc: &TrainConfig,
    step: u64,
    skipped: &mut u64,
    guard: &mut Guard,
    scaler: &mut LossScaler,
    obs: &mut dyn Observer,
) -> Result<Tensor> {
    let norm = opt.norm(&grads)?;
    // The scaler decides on the host whether an update overflowed.
    let on_host = tc.on_nonfinite == OnNonFinite::Skip || opt.reads_freely() || scaler.active();
    if !on_host {
        guard.note(step, loss, &norm)?;
        let clip = match tc.grad_clip > 0.0 {
            // min(1, clip / (norm + 1e-6)): 1 leaves the gradients as they are, bit for bit.
            true => Some((norm.affine(1.0, 1e-6)?.recip()? * tc.grad_clip)?.minimum(1f64)?),
            false => None,
        };
        opt.apply_scaled(grads, lr, clip.as_ref())?;
        return Ok(norm);
    }
    let read = host::values(&Tensor::stack(&[loss.to_dtype(DType::F64)?, norm.clone()], 0)?)?;
    let (loss_v, norm_v) = (read[0], read[1]);
    if scaler.active() && loss_v.is_finite() && !norm_v.is_finite() {
        let at = scaler.scale();
        scaler.overflowed();
        obs.message(&format!(
            "step {}: gradients overflowed f16 at loss scale {at}; update skipped, loss scale now {}",
            step + 1,
            scaler.scale()
        ));
        return Ok(norm);
    }
    let bad = if !loss_v.is_finite() {
        Some(("loss", loss_v))
    } else if !norm_v.is_finite() {
        Some(("gradient norm", norm_v))
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
            let clip = (tc.grad_clip > 0.0 && norm_v > tc.grad_clip).then(|| tc.grad_clip / (norm_v + 1e-6));
            opt.apply(grads, lr, clip)?;
            scaler.updated();
        }
    }
    Ok(norm)
}
