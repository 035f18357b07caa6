//! The LM head and cross-entropy in one: rows of hidden states go through the head in chunks,
//! so the full (N, V) logits never exist, in the forward or the backward.
//!
//! When either input wants a gradient, the forward forms it too (as Liger-Kernel's fused linear
//! cross-entropy does): each chunk's logits turn into dlogits in place, and dh = dlogits W,
//! dW += dlogitsᵀ h follow while the chunk is in cache. The loss is the graph's last node, so
//! its incoming gradient is a scalar the backward only scales by; recomputing the logits there
//! would cost a fourth head-sized GEMM.

use crate::float::{dispatch, fused, rows_per_task, simd, slice, Float};
use crate::loss::{check_targets, composed};
use crate::lowp_gemm::{gemm_acc_in, gemm_new_in};
use crate::precision::{loss_scale, matmul_precision, Precision};
use candle_core::{CpuStorage, CustomOp2, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

/// Logits per chunk: a bounded working set (16 MiB of f32) whatever N and V are.
const CHUNK_ELEMS: usize = 1 << 22;
const NAME: &str = "taper-linear-cross-entropy";

/// Mean cross-entropy of `hidden W^T` against `targets`, skipping `ignore_index`, and the number
/// of counted targets. hidden: (N, C); weight: (V, C); targets: (N,) i64. `chunk_rows` rows go
/// through the head at a time (0 picks a size). Elsewhere than on the CPU in f32/f64 the logits
/// are formed whole and the composed cross-entropy runs on them.
pub fn linear_cross_entropy(
    hidden: &Tensor,
    weight: &Tensor,
    targets: &Tensor,
    ignore_index: i64,
    chunk_rows: usize,
) -> Result<(Tensor, usize)> {
    let (n, c) = hidden.dims2()?;
    let (v, wc) = weight.dims2()?;
    if wc != c {
        return Err(crate::bad("linear-cross-entropy", format!("weight ({v}, {wc}) for hidden states of width {c}")));
    }
    if !fused(&[hidden, weight]) || !crate::fused_on(targets.device()) {
        return composed(&hidden.matmul(&weight.t()?)?, targets, ignore_index);
    }
    let (ts, count) = check_targets(targets, n, v, ignore_index)?;
    let rows = if chunk_rows > 0 { chunk_rows } else { (CHUNK_ELEMS / v.max(1)).max(1) };
    let want = Want { dh: hidden.track_op(), dw: weight.track_op() };
    let (h, w) = (hidden.contiguous()?, weight.contiguous()?);
    let shape_scale = loss_scale();
    let pass = {
        let (hs, hl) = h.storage_and_layout();
        let (ws, wl) = w.storage_and_layout();
        let (candle_core::Storage::Cpu(hs), candle_core::Storage::Cpu(ws)) = (&*hs, &*ws) else {
            return Err(crate::bad(NAME, "operands are not on the CPU"));
        };
        let shape =
            Dims { n, c, v, rows, ignore_index, count, precision: matmul_precision(), grad_scale: loss_scale() };
        dispatch!(NAME, hs, T => {
            let (loss, dh, dw) = run::<T>(slice(NAME, hs, hl)?, slice(NAME, ws, wl)?, &ts, shape, want);
            let dev = hidden.device();
            let dh = dh.map(|d| Tensor::from_vec(d, (n, c), dev)).transpose()?;
            let dw = dw.map(|d| Tensor::from_vec(d, (v, c), dev)).transpose()?;
            Ok::<_, candle_core::Error>((loss, dh, dw))
        })?
    };
    let (loss, dh, dw) = pass;
    if !(want.dh || want.dw) {
        return Ok((Tensor::new(loss, hidden.device())?.to_dtype(hidden.dtype())?, count));
    }
    Ok((hidden.apply_op2(weight, LinearCrossEntropy { loss, dh, dw, grad_scale: shape_scale })?, count))
}

#[derive(Clone, Copy)]
struct Want {
    dh: bool,
    dw: bool,
}

#[derive(Clone, Copy)]
struct Dims {
    n: usize,
    c: usize,
    v: usize,
    rows: usize,
    ignore_index: i64,
    count: usize,
    precision: Precision,
    /// The incoming gradient the backward will bring (the loss scale): the gradients are
    /// formed at that size, so that low-precision GEMMs see them scaled as the rest of the
    /// backward does.
    grad_scale: f64,
}

/// The mean loss and, where wanted, its gradients dh (N, C) and dW (V, C) for an incoming
/// gradient of 1.
#[allow(clippy::type_complexity)]
fn run<T: Float>(h: &[T], w: &[T], ts: &[i64], d: Dims, want: Want) -> (f64, Option<Vec<T>>, Option<Vec<T>>) {
    let Dims { n, c, v, rows, ignore_index, count, precision: p, grad_scale } = d;
    let grads = want.dh || want.dw;
    let scale = T::from_f64(grad_scale / count.max(1) as f64);
    let mut dh = want.dh.then(|| vec![T::ZERO; n * c]);
    let mut dw = want.dw.then(|| vec![T::ZERO; v * c]);
    // Per-row losses, summed in order afterwards so that the total does not depend on the
    // thread count.
    let mut losses = vec![0f64; n];
    for s in (0..n).step_by(rows.max(1)) {
        let len = rows.min(n - s);
        let hc = &h[s * c..(s + len) * c];
        // (len, V) = hc (len, C) · Wᵀ (C, V), Wᵀ read in place from W's rows.
        let mut logits = gemm_new_in(p, (len, v, c), hc, (c, 1), w, (1, c));
        if v > 0 {
            let per = rows_per_task(v);
            logits
                .par_chunks_mut(per * v)
                .zip(losses[s..s + len].par_chunks_mut(per))
                .zip(ts[s..s + len].par_chunks(per))
                .for_each(|((lc, loss_c), tc)| {
                    simd!(<T: Float> (lc: &mut [T] = lc, loss_c: &mut [f64] = loss_c, tc: &[i64] = tc, v: usize = v,
                        ignore: i64 = ignore_index, grads: bool = grads, scale: T = scale) {
                        for ((row, loss), &t) in lc.chunks_mut(v).zip(loss_c.iter_mut()).zip(tc) {
                            let target = (t != ignore).then(|| row[t as usize]);
                            let (max, sum) = crate::float::exp_row_in_place(row);
                            let lse = max + sum.ln();
                            if let Some(x) = target {
                                *loss = (lse - x).to_f64();
                            }
                            if !grads {
                                continue;
                            }
                            // dlogits = (softmax - onehot(target)) / count; ignored rows 0.
                            match target {
                                Some(_) => {
                                    let k = scale / sum;
                                    row.iter_mut().for_each(|o| *o = *o * k);
                                    row[t as usize] = row[t as usize] - scale;
                                }
                                None => row.iter_mut().for_each(|o| *o = T::ZERO),
                            }
                        }
                    })
                });
        }
        if let Some(dh) = dh.as_mut() {
            // dh rows (len, C) = dlogits (len, V) · W (V, C).
            gemm_acc_in(p, &mut dh[s * c..(s + len) * c], (len, c, v), &logits, (v, 1), w, (c, 1));
        }
        if let Some(dw) = dw.as_mut() {
            // dW (V, C) += dlogitsᵀ (V, len) · hc (len, C).
            gemm_acc_in(p, dw, (v, c, len), &logits, (1, v), hc, (c, 1));
        }
    }
    (losses.iter().sum::<f64>() / count.max(1) as f64, dh, dw)
}

/// The graph node of the loss: its forward hands out the loss computed above; its backward
/// scales the gradients the forward formed (for an incoming gradient of `grad_scale`) to the
/// incoming one.
struct LinearCrossEntropy {
    loss: f64,
    dh: Option<Tensor>,
    dw: Option<Tensor>,
    grad_scale: f64,
}

impl CustomOp2 for LinearCrossEntropy {
    fn name(&self) -> &'static str {
        NAME
    }

    fn cpu_fwd(&self, s1: &CpuStorage, _: &Layout, _: &CpuStorage, _: &Layout) -> Result<(CpuStorage, Shape)> {
        dispatch!(self.name(), s1, T => Ok((T::storage(vec![T::from_f64(self.loss)]), Shape::from(()))))
    }

    fn bwd(&self, _h: &Tensor, _w: &Tensor, _loss: &Tensor, grad: &Tensor) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let g = grad.to_dtype(candle_core::DType::F64)?.to_scalar::<f64>()? / self.grad_scale;
        let scaled = |t: &Option<Tensor>| -> Result<Option<Tensor>> {
            match t {
                Some(t) if g == 1.0 => Ok(Some(t.clone())),
                Some(t) => Ok(Some(t.affine(g, 0.0)?)),
                None => Ok(None),
            }
        };
        Ok((scaled(&self.dh)?, scaled(&self.dw)?))
    }
}
