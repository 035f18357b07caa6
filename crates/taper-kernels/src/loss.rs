//! Cross-entropy over rows of logits, computing each row's softmax normaliser once.

use crate::float::{dispatch, exp_row_in_place, fused, rows_per_task, simd, slice, twin, Float};
use candle_core::{CpuStorage, CustomOp2, CustomOp3, DType, Layout, Result, Shape, Tensor, D};
use rayon::prelude::*;

/// The CUDA twins' module, cuda/loss.cu.
#[cfg(feature = "cuda")]
const LOSS_PTX: (&str, &str) = ("taper_loss", crate::ptx::LOSS);

/// Mean cross-entropy over the targets that are not `ignore_index`, and their count.
/// logits: (N, V); targets: (N,) i64. f32 and f64 logits keep their dtype on the CPU; anything
/// else (and other devices) is computed in f32 by composed ops, as taper-model's
/// `nn::cross_entropy` does. The CUDA twin (f32, bf16 or f16 logits, i64 targets on the same
/// device) returns an f32 loss whatever the logits, as the composed ops do.
pub fn cross_entropy(logits: &Tensor, targets: &Tensor, ignore_index: i64) -> Result<(Tensor, usize)> {
    let (n, v) = logits.dims2()?;
    let on_cpu = fused(&[logits]) && crate::fused_on(targets.device());
    // Other target dtypes keep the composed path on the GPU, which takes them, where the CPU
    // kernel would refuse them.
    let on_gpu = twin(&[logits]) && targets.device().same_device(logits.device()) && targets.dtype() == DType::I64;
    if !on_cpu && !on_gpu {
        if targets.dims() != [n] {
            return Err(crate::bad("cross-entropy", format!("targets must be ({n},), got {:?}", targets.dims())));
        }
        return composed(logits, targets, ignore_index);
    }
    let (_, count) = check_targets(targets, n, v, ignore_index)?;
    let out = logits.contiguous()?.apply_op2(&targets.contiguous()?, CrossEntropy { ignore_index, count })?;
    Ok((out.get(0)?, count))
}

/// Each row's loss and, with `grad`, the gradient of its logits, for the chunked LM head on
/// CUDA with the kernels on: f32 logits (m, V) and i64 targets (m,) give nll (m,) and dlogits
/// (m, V) = softmax - onehot, both 0 on ignored rows, from two launches (the row pass of the
/// cross-entropy twin and its backward) instead of a dozen composed ops and their (m, V)
/// temporaries. None where the twin does not take them.
pub(crate) fn rows_nll_and_grad(
    logits: &Tensor,
    targets: &Tensor,
    ignore_index: i64,
    grad: bool,
) -> Result<Option<(Tensor, Option<Tensor>)>> {
    let usable = twin(&[logits])
        && logits.dtype() == DType::F32
        && targets.dtype() == DType::I64
        && targets.device().same_device(logits.device());
    if !usable {
        return Ok(None);
    }
    let (m, v) = logits.dims2()?;
    let packed = logits.contiguous()?.apply_op2_no_bwd(&targets.contiguous()?, &RowsNll { ignore_index, grad })?;
    let dlogits = match grad {
        true => Some(packed.narrow(0, m, m * v)?.reshape((m, v))?),
        false => None,
    };
    Ok(Some((packed.narrow(0, 0, m)?, dlogits)))
}

/// nll (m), then with `grad` dlogits (m, V), flattened; see [`rows_nll_and_grad`]. CUDA only.
#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
struct RowsNll {
    ignore_index: i64,
    grad: bool,
}

impl CustomOp2 for RowsNll {
    fn name(&self) -> &'static str {
        "cross-entropy-rows"
    }

    fn cpu_fwd(&self, _: &CpuStorage, _: &Layout, _: &CpuStorage, _: &Layout) -> Result<(CpuStorage, Shape)> {
        Err(crate::bad(self.name(), "runs on CUDA only (the CPU has the fused linear + cross-entropy)"))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        ls: &candle_core::CudaStorage,
        ll: &Layout,
        ts: &candle_core::CudaStorage,
        tl: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        use crate::cuda::{output, per_element, per_row, view};
        use candle_core::backend::BackendStorage;
        use candle_core::cuda_backend::cudarc::driver::PushKernelArg;
        use candle_core::cuda_backend::WrapErr;
        let op = self.name();
        let dev = ls.device().clone();
        let (m, v) = ll.shape().dims2()?;
        if tl.shape().elem_count() != m {
            return Err(crate::bad(op, format!("{} targets for {m} rows", tl.shape().elem_count())));
        }
        let len = if self.grad { m * (v + 1) } else { m };
        let mut packed = crate::cuda::zeros::<f32>(&dev, len)?;
        if m > 0 && v > 0 {
            let rows_f = dev.get_or_load_custom_func("ce_rows_f32", LOSS_PTX.0, LOSS_PTX.1)?;
            let bwd_f = dev.get_or_load_custom_func("ce_bwd_f32", LOSS_PTX.0, LOSS_PTX.1)?;
            let (x, targets) = (view::<f32>(op, ls, ll)?, view::<i64>(op, ts, tl)?);
            let mut lse = output::<f32>(&dev, m + 1)?; // [unused; lse (m)], as ce_rows writes it
                                                       // Unscaled: the chunked head applies f16's loss scale itself.
            let (m64, v64, ignore, scale) = (m as u64, v as u64, self.ignore_index, 1f32);
            let (mut nll, mut dlogits) = packed.split_at_mut(m);
            let mut b = rows_f.builder();
            b.arg(&x).arg(&targets).arg(&mut lse).arg(&mut nll).arg(&m64).arg(&v64).arg(&ignore);
            // SAFETY: ce_rows takes (x, targets, out, loss, n, v, ignore) and writes out[1..=m]
            // and the m losses.
            unsafe { b.launch(per_row(op, m, 256)?) }.w()?;
            if self.grad {
                let lse_rows = lse.slice(1..);
                let mut b = bwd_f.builder();
                b.arg(&x).arg(&targets).arg(&lse_rows).arg(&mut dlogits).arg(&m64).arg(&v64).arg(&ignore).arg(&scale);
                // SAFETY: ce_bwd takes (x, targets, lse, dx, n, v, ignore, scale) and writes all
                // m x V of dx.
                unsafe { b.launch(per_element(op, m * v)?) }.w()?;
            }
        }
        Ok((candle_core::CudaStorage::wrap_cuda_slice(packed, dev), Shape::from(len)))
    }
}

pub(crate) fn composed(logits: &Tensor, targets: &Tensor, ignore_index: i64) -> Result<(Tensor, usize)> {
    let logits = logits.to_dtype(DType::F32)?;
    let valid = targets.ne(ignore_index)?; // (N,) u8
    let safe = valid.where_cond(targets, &targets.zeros_like()?)?.to_dtype(DType::U32)?;
    let max = logits.max_keepdim(D::Minus1)?.detach();
    let shifted = logits.broadcast_sub(&max)?;
    let lse = shifted.exp()?.sum_keepdim(D::Minus1)?.log()?;
    let logp = shifted.broadcast_sub(&lse)?;
    let picked = logp.gather(&safe.unsqueeze(1)?, 1)?.squeeze(1)?; // (N,)
    let validf = valid.to_dtype(DType::F32)?;
    let count = validf.sum_all()?.to_scalar::<f32>()? as usize;
    let total = (picked * validf)?.sum_all()?.neg()?;
    Ok(((total / count.max(1) as f64)?, count))
}

/// Output (N + 1,): the mean loss, then each row's log-sum-exp for the backward, so that the
/// backward needs no second pass to normalise. On the CPU in the logits' dtype; on the GPU in
/// f32 whatever the logits, so that a bf16 or f16 loss and its normalisers keep f32 precision.
pub(crate) struct CrossEntropy {
    pub(crate) ignore_index: i64,
    /// The divisor of the summed loss.
    pub(crate) count: usize,
}

impl CrossEntropy {
    fn fwd<T: Float>(&self, ls: &CpuStorage, ll: &Layout, ts: &CpuStorage, tl: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = slice::<T>(self.name(), ls, ll)?;
        let targets = targets(ts, tl)?;
        let (n, v) = ll.shape().dims2()?;
        let mut out = vec![T::ZERO; n + 1];
        // Per-row losses, summed in order afterwards so that the total does not depend on the
        // thread count.
        let mut losses = vec![0f64; n];
        if v > 0 {
            let per = rows_per_task(v);
            out[1..]
                .par_chunks_mut(per)
                .zip(losses.par_chunks_mut(per))
                .zip(x.par_chunks(per * v).zip(targets.par_chunks(per)))
                .for_each(|((lse_c, loss_c), (xc, tc))| {
                    simd!(<T: Float> (lse_c: &mut [T] = lse_c, loss_c: &mut [f64] = loss_c, xc: &[T] = xc, tc: &[i64] = tc,
                        v: usize = v, ignore: i64 = self.ignore_index) {
                        let mut scratch = vec![T::ZERO; v];
                        for (((lse, loss), xr), &t) in lse_c.iter_mut().zip(loss_c).zip(xc.chunks(v)).zip(tc) {
                            scratch.copy_from_slice(xr);
                            let (max, sum) = exp_row_in_place(&mut scratch);
                            *lse = max + sum.ln();
                            if t != ignore {
                                *loss = (*lse - xr[t as usize]).to_f64();
                            }
                        }
                    })
                });
        }
        out[0] = T::from_f64(losses.iter().sum::<f64>() / self.count.max(1) as f64);
        Ok((T::storage(out), Shape::from(n + 1)))
    }
}

/// The targets as i64 after checking their shape (N,) and range: (values, counted targets).
pub(crate) fn check_targets(targets: &Tensor, n: usize, v: usize, ignore_index: i64) -> Result<(Vec<i64>, usize)> {
    if targets.dims() != [n] || targets.dtype() != DType::I64 {
        return Err(crate::bad(
            "cross-entropy",
            format!("targets must be ({n},) i64, got {:?} {:?}", targets.dims(), targets.dtype()),
        ));
    }
    let ts = targets.to_vec1::<i64>()?;
    if let Some(t) = ts.iter().find(|&&t| t != ignore_index && !(0..v as i64).contains(&t)) {
        return Err(crate::bad("cross-entropy", format!("target {t} outside the vocabulary of {v}")));
    }
    let count = ts.iter().filter(|&&t| t != ignore_index).count();
    Ok((ts, count))
}

fn targets<'a>(s: &'a CpuStorage, l: &Layout) -> Result<&'a [i64]> {
    let (start, end) = l.contiguous_offsets().ok_or_else(|| crate::bad("cross-entropy", "targets not contiguous"))?;
    match s {
        CpuStorage::I64(t) => Ok(&t[start..end]),
        _ => Err(crate::bad("cross-entropy", "targets must be i64")),
    }
}

impl CustomOp2 for CrossEntropy {
    fn name(&self) -> &'static str {
        "taper-cross-entropy"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> Result<(CpuStorage, Shape)> {
        dispatch!(self.name(), s1, T => self.fwd::<T>(s1, l1, s2, l2))
    }

    /// One block per row for the log-sum-exps and the rows' losses, then one block for their
    /// mean, added in a fixed order.
    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        ls: &candle_core::CudaStorage,
        ll: &Layout,
        ts: &candle_core::CudaStorage,
        tl: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        use crate::cuda::{cuda_dispatch, output, per_row, suffix, view, zeros};
        use candle_core::backend::BackendStorage;
        use candle_core::cuda_backend::cudarc::driver::PushKernelArg;
        use candle_core::cuda_backend::WrapErr;
        let op = self.name();
        let (dev, dt) = (ls.device().clone(), ls.dtype());
        let (n, v) = ll.shape().dims2()?;
        if tl.shape().elem_count() != n {
            return Err(crate::bad(op, format!("{} targets for {n} rows", tl.shape().elem_count())));
        }
        let rows_f = dev.get_or_load_custom_func(&format!("ce_rows_{}", suffix(op, dt)?), LOSS_PTX.0, LOSS_PTX.1)?;
        let mean_f = dev.get_or_load_custom_func("ce_mean", LOSS_PTX.0, LOSS_PTX.1)?;
        let targets = view::<i64>(op, ts, tl)?;
        // Zeros stay where there is nothing to compute: no rows, or rows of no logits (whose
        // targets are then all ignored), as on the CPU.
        let mut out = zeros::<f32>(&dev, n + 1)?; // (N + 1,)
        if n > 0 && v > 0 {
            cuda_dispatch!(op, dt, T => {
                let x = view::<T>(op, ls, ll)?;
                let mut loss = output::<f32>(&dev, n)?; // (N,)
                let (n64, v64, ignore, count) = (n as u64, v as u64, self.ignore_index, self.count as u64);
                let mut b = rows_f.builder();
                b.arg(&x).arg(&targets).arg(&mut out).arg(&mut loss).arg(&n64).arg(&v64).arg(&ignore);
                // SAFETY: ce_rows takes (x, targets, out, loss, n, v, ignore) and writes out[1..=N]
                // and all of loss.
                unsafe { b.launch(per_row(op, n, 256)?) }.w()?;
                let mut b = mean_f.builder();
                b.arg(&loss).arg(&mut out).arg(&n64).arg(&count);
                // SAFETY: ce_mean takes (loss, out, n, count), one block of 256 threads, and writes out[0].
                unsafe { b.launch(per_row(op, 1, 256)?) }.w()?;
                Ok(())
            })?;
        }
        Ok((candle_core::CudaStorage::wrap_cuda_slice(out, dev.clone()), Shape::from(n + 1)))
    }

    fn bwd(
        &self,
        logits: &Tensor,
        targets: &Tensor,
        out: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        // Only the loss (element 0) leaves this module; the rows' log-sum-exps get no gradient.
        let g = grad.get(0)?.to_dtype(DType::F64)?.to_scalar::<f64>()?;
        let scale = g / self.count.max(1) as f64;
        let op = CrossEntropyBwd { ignore_index: self.ignore_index, scale, lse_at: 1 };
        Ok((Some(logits.apply_op3_no_bwd(targets, out, &op)?), None))
    }
}

/// dlogits = (softmax - onehot(target)) * grad / count on counted rows, 0 on ignored ones.
/// The third operand holds the rows' log-sum-exps from element `lse_at` on.
pub(crate) struct CrossEntropyBwd {
    pub(crate) ignore_index: i64,
    /// grad / count.
    pub(crate) scale: f64,
    pub(crate) lse_at: usize,
}

impl CrossEntropyBwd {
    fn run<T: Float>(
        &self,
        ls: &CpuStorage,
        ll: &Layout,
        ts: &CpuStorage,
        tl: &Layout,
        os: &CpuStorage,
        ol: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let x = slice::<T>(self.name(), ls, ll)?;
        let targets = targets(ts, tl)?;
        let lse = &slice::<T>(self.name(), os, ol)?[self.lse_at..];
        let (_, v) = ll.shape().dims2()?;
        let scale = T::from_f64(self.scale);
        let mut dx = vec![T::ZERO; x.len()];
        if v > 0 {
            let per = rows_per_task(v);
            dx.par_chunks_mut(per * v)
                .zip(x.par_chunks(per * v).zip(targets.par_chunks(per).zip(lse.par_chunks(per))))
                .for_each(|(dc, (xc, (tc, lc)))| {
                    simd!(<T: Float> (dc: &mut [T] = dc, xc: &[T] = xc, tc: &[i64] = tc, lc: &[T] = lc, v: usize = v,
                        ignore: i64 = self.ignore_index, scale: T = scale) {
                        for (((dr, xr), &t), &l) in dc.chunks_mut(v).zip(xc.chunks(v)).zip(tc).zip(lc) {
                            if t == ignore {
                                continue;
                            }
                            dr.copy_from_slice(xr);
                            T::exp_shifted(dr, l);
                            dr.iter_mut().for_each(|o| *o = *o * scale);
                            dr[t as usize] = dr[t as usize] - scale;
                        }
                    })
                });
        }
        Ok((T::storage(dx), ll.shape().clone()))
    }
}

impl CustomOp3 for CrossEntropyBwd {
    fn name(&self) -> &'static str {
        "taper-cross-entropy-bwd"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        dispatch!(self.name(), s1, T => self.run::<T>(s1, l1, s2, l2, s3, l3))
    }

    /// One thread per logit; the log-sum-exps are read in f32 (the CUDA forward's dtype), after
    /// a conversion where they come in another.
    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        ls: &candle_core::CudaStorage,
        ll: &Layout,
        ts: &candle_core::CudaStorage,
        tl: &Layout,
        os: &candle_core::CudaStorage,
        ol: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        use crate::cuda::{cuda_dispatch, output, suffix, view};
        use candle_core::backend::BackendStorage;
        use candle_core::cuda_backend::cudarc::driver::PushKernelArg;
        use candle_core::cuda_backend::WrapErr;
        let op = self.name();
        let (dev, dt) = (ls.device().clone(), ls.dtype());
        let (n, v) = ll.shape().dims2()?;
        if tl.shape().elem_count() != n {
            return Err(crate::bad(op, format!("{} targets for {n} rows", tl.shape().elem_count())));
        }
        let converted;
        let (os, ol) = if os.dtype() == DType::F32 {
            (os, ol.clone())
        } else {
            converted = os.to_dtype(ol, DType::F32)?;
            (&converted, Layout::contiguous(ol.shape()))
        };
        let all = view::<f32>(op, os, &ol)?;
        let lse = all
            .try_slice(self.lse_at..self.lse_at + n)
            .ok_or_else(|| crate::bad(op, format!("no {n} log-sum-exps from {} in {}", self.lse_at, all.len())))?;
        let targets = view::<i64>(op, ts, tl)?;
        let cfg = crate::cuda::per_element(op, n * v)?;
        let func = dev.get_or_load_custom_func(&format!("ce_bwd_{}", suffix(op, dt)?), LOSS_PTX.0, LOSS_PTX.1)?;
        cuda_dispatch!(op, dt, T => {
            let x = view::<T>(op, ls, ll)?;
            let mut dx = output::<T>(&dev, n * v)?;
            if n * v > 0 {
                let (n64, v64, ignore, scale) = (n as u64, v as u64, self.ignore_index, self.scale as f32);
                let mut b = func.builder();
                b.arg(&x).arg(&targets).arg(&lse).arg(&mut dx).arg(&n64).arg(&v64).arg(&ignore).arg(&scale);
                // SAFETY: ce_bwd takes (x, targets, lse, dx, n, v, ignore, scale) and writes all N x V of dx.
                unsafe { b.launch(cfg) }.w()?;
            }
            Ok((candle_core::CudaStorage::wrap_cuda_slice(dx, dev.clone()), ll.shape().clone()))
        })
    }
}
