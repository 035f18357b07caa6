//! The LM head and cross-entropy in one: rows of hidden states go through the head in chunks,
//! so the full (N, V) logits never exist, in the forward or the backward.

use crate::float::{dispatch, fused, Float};
use crate::loss::{check_targets, composed, CrossEntropy, CrossEntropyBwd};
use candle_core::{CpuStorage, CustomOp2, Layout, Result, Shape, Tensor};

/// Logits per chunk: a bounded working set (16 MiB of f32) whatever N and V are.
const CHUNK_ELEMS: usize = 1 << 22;

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
    if !fused(&[hidden, weight]) || !targets.device().is_cpu() {
        return composed(&hidden.matmul(&weight.t()?)?, targets, ignore_index);
    }
    let count = check_targets(targets, n, v, ignore_index)?;
    let rows = if chunk_rows > 0 { chunk_rows } else { (CHUNK_ELEMS / v.max(1)).max(1) };
    let (h, w) = (hidden.contiguous()?.detach(), weight.contiguous()?.detach());
    let targets = targets.contiguous()?;
    // Forward without a graph: per chunk, the rows' log-sum-exps and their summed loss.
    let mut lse = Vec::new();
    let mut total = 0f64;
    for s in (0..n).step_by(rows) {
        let len = rows.min(n - s);
        let logits = h.narrow(0, s, len)?.matmul(&w.t()?)?; // (len, V)
        let out = logits.apply_op2_no_bwd(&targets.narrow(0, s, len)?, &CrossEntropy { ignore_index, count: 1 })?;
        total += out.get(0)?.to_dtype(candle_core::DType::F64)?.to_scalar::<f64>()?;
        lse.push(out.narrow(0, 1, len)?);
    }
    let lse = if lse.is_empty() { Tensor::zeros(0, h.dtype(), h.device())? } else { Tensor::cat(&lse, 0)? }; // (N,)
    let op = LinearCrossEntropy { loss: total / count.max(1) as f64, targets, lse, ignore_index, count, rows };
    Ok((hidden.apply_op2(weight, op)?, count))
}

/// The graph node of the loss: its forward hands out the loss computed above; its backward
/// recomputes each chunk's logits and turns them into gradients for hidden and weight.
struct LinearCrossEntropy {
    loss: f64,
    targets: Tensor,
    /// (N,): each row's log-sum-exp from the forward.
    lse: Tensor,
    ignore_index: i64,
    count: usize,
    rows: usize,
}

impl CustomOp2 for LinearCrossEntropy {
    fn name(&self) -> &'static str {
        "taper-linear-cross-entropy"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, _: &Layout, _: &CpuStorage, _: &Layout) -> Result<(CpuStorage, Shape)> {
        dispatch!(self.name(), s1, T => Ok((T::storage(vec![T::from_f64(self.loss)]), Shape::from(()))))
    }

    fn bwd(&self, h: &Tensor, w: &Tensor, _loss: &Tensor, grad: &Tensor) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let (h, w) = (h.detach(), w.detach());
        let scale = grad.to_dtype(candle_core::DType::F64)?.to_scalar::<f64>()? / self.count.max(1) as f64;
        let n = h.dim(0)?;
        let op = CrossEntropyBwd { ignore_index: self.ignore_index, scale, lse_at: 0 };
        let mut dh = Vec::new();
        let mut dw = w.zeros_like()?;
        for s in (0..n).step_by(self.rows) {
            let len = self.rows.min(n - s);
            let hc = h.narrow(0, s, len)?; // (len, C)
            let logits = hc.matmul(&w.t()?)?; // (len, V)
            let dlogits =
                logits.apply_op3_no_bwd(&self.targets.narrow(0, s, len)?, &self.lse.narrow(0, s, len)?, &op)?;
            dh.push(dlogits.matmul(&w)?); // (len, C)
            dw = (dw + dlogits.t()?.matmul(&hc)?)?; // (V, C)
        }
        let dh = if dh.is_empty() { h.zeros_like()? } else { Tensor::cat(&dh, 0)? };
        Ok((Some(dh), Some(dw)))
    }
}
