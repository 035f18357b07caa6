//! Cross-entropy over rows of logits, computing each row's softmax normaliser once.

use crate::float::{dispatch, exp_row_in_place, fused, rows_per_task, simd, slice, Float};
use candle_core::{CpuStorage, CustomOp2, CustomOp3, DType, Layout, Result, Shape, Tensor, D};
use rayon::prelude::*;

/// Mean cross-entropy over the targets that are not `ignore_index`, and their count.
/// logits: (N, V); targets: (N,) i64. f32 and f64 logits keep their dtype on the CPU; anything
/// else (and other devices) is computed in f32 by composed ops, as taper-model's
/// `nn::cross_entropy` does.
pub fn cross_entropy(logits: &Tensor, targets: &Tensor, ignore_index: i64) -> Result<(Tensor, usize)> {
    let (n, v) = logits.dims2()?;
    if !fused(&[logits]) || !crate::fused_on(targets.device()) {
        if targets.dims() != [n] {
            return Err(crate::bad("cross-entropy", format!("targets must be ({n},), got {:?}", targets.dims())));
        }
        return composed(logits, targets, ignore_index);
    }
    let (_, count) = check_targets(targets, n, v, ignore_index)?;
    let out = logits.contiguous()?.apply_op2(&targets.contiguous()?, CrossEntropy { ignore_index, count })?;
    Ok((out.get(0)?, count))
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
/// backward needs no second pass to normalise.
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
}
