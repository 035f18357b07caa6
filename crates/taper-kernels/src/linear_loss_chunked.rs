//! The LM head and cross-entropy from candle primitives, for every device without the fused
//! CPU kernel: rows go through the head a chunk at a time, so the (N, V) logits never exist
//! whole. As in the fused kernel (and Liger-Kernel), the forward forms the gradients of each
//! chunk while its logits are at hand, dh = dlogits W and dW += dlogitsᵀ h, because the loss is
//! the graph's last node: its backward only scales them by the incoming scalar. The count of
//! counted targets stays on the device, so nothing is read back.

use candle_core::{DType, Tensor, D};

/// Logits per chunk: 16 MB of f32, whatever N and V are.
const CHUNK_ELEMS: usize = 1 << 22;
const NAME: &str = "linear-cross-entropy-chunked";

/// Mean cross-entropy of `hidden Wᵀ` against `targets`, skipping `ignore_index`: hidden (N, C),
/// weight (V, C), targets (N,) i64; a scalar in hidden's dtype, computed in f32.
pub fn linear_cross_entropy_chunked(
    hidden: &Tensor,
    weight: &Tensor,
    targets: &Tensor,
    ignore_index: i64,
) -> candle_core::Result<Tensor> {
    let (n, c) = hidden.dims2()?;
    let (v, wc) = weight.dims2()?;
    if wc != c || targets.dims() != [n] {
        return Err(crate::bad(
            NAME,
            format!(
                "hidden {:?}, weight {:?} and targets {:?} do not fit",
                hidden.dims(),
                weight.dims(),
                targets.dims()
            ),
        ));
    }
    let rows = (CHUNK_ELEMS / v.max(1)).clamp(1, n.max(1));
    let grad_scale = crate::precision::loss_scale();
    let want = hidden.track_op() || weight.track_op();
    let (h, w) = (hidden.detach(), weight.detach().to_dtype(DType::F32)?);
    let valid = targets.ne(ignore_index)?; // (N,) u8
    let safe = valid.where_cond(targets, &targets.zeros_like()?)?.to_dtype(DType::U32)?;
    let count = valid.to_dtype(DType::F32)?.sum_all()?.maximum(1f64)?;
    let classes = Tensor::arange(0u32, v as u32, hidden.device())?.reshape((1, v))?;
    let (mut total, mut dhs, mut dw) = (Tensor::zeros((), DType::F32, hidden.device())?, Vec::new(), None::<Tensor>);
    for r0 in (0..n).step_by(rows) {
        let m = rows.min(n - r0);
        let hc = h.narrow(0, r0, m)?.to_dtype(DType::F32)?; // (m, C)
        let logits = crate::precision::matmul(&hc, &w.t()?)?; // (m, V)
        let tc = targets.narrow(0, r0, m)?;
        // Each row's loss, and with `want` the gradient of its logits (unscaled), from the
        // cross-entropy twin on CUDA, else from composed ops.
        let (nll, dlogits) = match crate::loss::rows_nll_and_grad(&logits, &tc, ignore_index, want)? {
            Some(rows) => rows,
            None => {
                let max = logits.max_keepdim(D::Minus1)?;
                let shifted = logits.broadcast_sub(&max)?;
                let e = shifted.exp()?;
                let sum = e.sum_keepdim(D::Minus1)?; // (m, 1)
                let tc = safe.narrow(0, r0, m)?.unsqueeze(1)?; // (m, 1)
                let vc = valid.narrow(0, r0, m)?.to_dtype(DType::F32)?; // (m,)
                let picked = shifted.gather(&tc, 1)?.squeeze(1)?; // (m,)
                let nll = ((sum.squeeze(1)?.log()? - picked)? * &vc)?;
                // dlogits = (softmax - onehot) over counted rows; divided by the count below.
                let dlogits = match want {
                    true => {
                        let onehot = tc.broadcast_eq(&classes)?.to_dtype(DType::F32)?;
                        Some(e.broadcast_div(&sum)?.sub(&onehot)?.broadcast_mul(&vc.unsqueeze(1)?)?)
                    }
                    false => None,
                };
                (nll, dlogits)
            }
        };
        total = (total + nll.sum_all()?)?;
        if let Some(dlogits) = dlogits {
            // At the loss scale, as the rest of the backward sees its gradients (f16).
            let dlogits = if grad_scale == 1.0 { dlogits } else { (dlogits * grad_scale)? };
            dhs.push(crate::precision::matmul(&dlogits, &w)?); // (m, C)
            let dwc = crate::precision::matmul(&dlogits.t()?, &hc)?; // (V, C)
            dw = Some(match dw {
                Some(acc) => (acc + dwc)?,
                None => dwc,
            });
        }
    }
    let loss = total.div(&count)?.to_dtype(hidden.dtype())?;
    if !want {
        return Ok(loss);
    }
    let dh = Tensor::cat(&dhs, 0)?.broadcast_div(&count)?.to_dtype(hidden.dtype())?;
    let dw = dw.map_or_else(|| weight.zeros_like(), |d| d.broadcast_div(&count)?.to_dtype(weight.dtype()))?;
    // The loss is the graph's last node: its incoming gradient is a scalar.
    let bwd = move |_: &Tensor, _: &Tensor, g: &Tensor| {
        let g = if grad_scale == 1.0 { g.clone() } else { (g / grad_scale)? };
        Ok((Some(dh.broadcast_mul(&g)?), Some(dw.broadcast_mul(&g)?)))
    };
    crate::precomputed::attach2(hidden, weight, NAME, loss, bwd)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    /// Against the logits formed whole (log-softmax, gather, mean over counted rows) in f64:
    /// the loss and both gradients, with ignored rows, over several chunks.
    #[test]
    fn matches_the_whole_logits() {
        let (n, c, v) = (61, 6, 150_000);
        let dev = Device::Cpu;
        let h = Var::from_vec((0..n * c).map(|i| ((i as f64) * 0.31).sin()).collect::<Vec<_>>(), (n, c), &dev).unwrap();
        let w = Var::from_vec((0..v * c).map(|i| ((i as f64) * 0.17).cos()).collect::<Vec<_>>(), (v, c), &dev).unwrap();
        let t: Vec<i64> = (0..n as i64).map(|i| if i % 7 == 3 { -100 } else { (i * 131) % v as i64 }).collect();
        let targets = Tensor::new(t.as_slice(), &dev).unwrap();
        let got = linear_cross_entropy_chunked(&h, &w, &targets, -100).unwrap();
        assert!(super::CHUNK_ELEMS / v < n, "several chunks");
        let g1 = got.backward().unwrap();

        let logits = h.matmul(&w.t().unwrap()).unwrap();
        let max = logits.max_keepdim(1).unwrap().detach();
        let sh = logits.broadcast_sub(&max).unwrap();
        let logp = sh.broadcast_sub(&sh.exp().unwrap().sum_keepdim(1).unwrap().log().unwrap()).unwrap();
        let valid: Vec<f64> = t.iter().map(|&x| f64::from(u8::from(x >= 0))).collect();
        let safe: Vec<u32> = t.iter().map(|&x| x.max(0) as u32).collect();
        let picked = logp.gather(&Tensor::new(safe.as_slice(), &dev).unwrap().unsqueeze(1).unwrap(), 1).unwrap();
        let k = valid.iter().sum::<f64>();
        let want = (picked.squeeze(1).unwrap() * Tensor::new(valid.as_slice(), &dev).unwrap())
            .unwrap()
            .sum_all()
            .unwrap()
            .neg()
            .unwrap()
            / k;
        let want = want.unwrap();
        let g2 = want.backward().unwrap();
        let close = |a: &Tensor, b: &Tensor| -> f64 {
            let d = (a.to_dtype(DType::F64).unwrap() - b.to_dtype(DType::F64).unwrap()).unwrap().abs().unwrap();
            d.flatten_all().unwrap().max(0).unwrap().to_scalar::<f64>().unwrap()
        };
        // Computed in f32: agreement to f32 rounding.
        assert!(close(&got, &want) < 1e-5, "loss {got} vs {want}");
        assert!(close(g1.get(&h).unwrap(), g2.get(&h).unwrap()) < 1e-6, "dh");
        assert!(close(g1.get(&w).unwrap(), g2.get(&w).unwrap()) < 1e-6, "dw");
    }
}
