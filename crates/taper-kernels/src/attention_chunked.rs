//! Attention from candle primitives for every device without a fused kernel, in query chunks
//! with recomputation, so that the (B, H, Tq, Tk) probabilities are never kept for the backward
//! nor formed whole (the memory scheme of FlashAttention, Dao et al. 2022, at the granularity
//! of tensor ops).
//!
//! The forward runs chunk by chunk without a graph and keeps the output and the per-row
//! logsumexp; one node then stands for the whole attention in the graph ([`crate::precomputed`]),
//! and its backward recomputes each chunk's probabilities from q, k and that logsumexp:
//! dV = Pᵀ dO, dP = dO Vᵀ, dS = P ∘ (dP - rowsum(dO ∘ O)), dQ = dS K, dK = dSᵀ Q (times the
//! scale). Dropout on the probabilities draws each chunk's mask from Philox keyed by (key,
//! chunk), so the backward redraws it instead of keeping it.
//!
//! The masks are built on the device from the options (comparisons of position ranges, and of
//! the (B, T) padding and segment ids) and cached, so the layers of one forward share them.

use crate::attention_opts::{AttnOpts, Result};
use candle_core::{DType, Device, Tensor, D};
use std::sync::Mutex;

/// At most this many score elements (B·Hq·rows·Tk) in flight per chunk: 16 MB in f32.
const CHUNK_ELEMS: usize = 1 << 22;

/// Query rows per chunk for these sizes: a pure function of them, so a resumed or repeated
/// run chunks (and draws dropout) alike.
fn chunk_rows(b: usize, hq: usize, tq: usize, tk: usize) -> usize {
    (CHUNK_ELEMS / (b * hq * tk).max(1)).clamp(1, tq.max(1))
}

/// The additive mask (B or 1, 1, Tq, Tk), 0 or -inf, and which rows see any key at all
/// (B or 1, 1, Tq, 1), 1 or 0; a row that sees none is left unmasked (so its softmax stays
/// finite) and zeroed by `alive`.
#[derive(Clone)]
pub(crate) struct DeviceMask {
    pub bias: Tensor,
    pub alive: Tensor,
}

/// What a mask is a function of.
#[derive(Clone, PartialEq)]
struct MaskKey {
    b: usize,
    tq: usize,
    tk: usize,
    causal: bool,
    window: usize,
    key_padding: Option<Vec<bool>>,
    segments: Option<(Vec<u32>, Vec<u32>)>,
    dtype: DType,
}

/// The last few masks built, newest first: the layers of a forward and its backward reuse one.
static MASKS: Mutex<Vec<(MaskKey, Device, DeviceMask)>> = Mutex::new(Vec::new());
const MASKS_KEPT: usize = 8;

pub(crate) fn device_mask(
    b: usize,
    tq: usize,
    tk: usize,
    opts: &AttnOpts,
    dtype: DType,
    dev: &Device,
) -> Result<DeviceMask> {
    let key = MaskKey {
        b,
        tq,
        tk,
        causal: opts.causal,
        window: opts.window,
        key_padding: opts.key_padding.clone(),
        segments: opts.segments.clone(),
        dtype,
    };
    let mut kept = MASKS.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(i) = kept.iter().position(|(k, d, _)| *k == key && d.same_device(dev)) {
        let hit = kept.remove(i);
        let mask = hit.2.clone();
        kept.insert(0, hit);
        return Ok(mask);
    }
    let mask = build_mask(&key, dev)?;
    kept.insert(0, (key, dev.clone(), mask.clone()));
    kept.truncate(MASKS_KEPT);
    Ok(mask)
}

/// The mask of [`crate::attention`]'s definition (`allowed`), from comparisons on the device:
/// query i sits at position p = Tk - Tq + i; causal keeps j <= p, the window p - j < window,
/// padding drops padded keys, segments keep keys of the query's segment (a padding query,
/// segment 0, only its own position).
fn build_mask(key: &MaskKey, dev: &Device) -> Result<DeviceMask> {
    let MaskKey { b, tq, tk, .. } = *key;
    let p = Tensor::arange(tk as i64 - tq as i64, tk as i64, dev)?.reshape((tq, 1))?; // (Tq, 1)
    let j = Tensor::arange(0i64, tk as i64, dev)?.reshape((1, tk))?; // (1, Tk)
    let mut ok = Tensor::ones((tq, tk), DType::U8, dev)?;
    if key.causal {
        ok = ok.mul(&j.broadcast_le(&p)?)?;
    }
    if key.window > 0 {
        ok = ok.mul(&p.broadcast_sub(&j)?.lt(key.window as i64)?)?;
    }
    let mut ok = ok.reshape((1, 1, tq, tk))?;
    if let Some(kp) = &key.key_padding {
        let keep: Vec<u8> = kp.iter().map(|&pad| u8::from(!pad)).collect();
        ok = ok.broadcast_mul(&Tensor::from_vec(keep, (b, 1, 1, tk), dev)?)?;
    }
    if let Some((qs, ks)) = &key.segments {
        let qs = Tensor::new(qs.as_slice(), dev)?.reshape((b, 1, tq, 1))?;
        let ks = Tensor::new(ks.as_slice(), dev)?.reshape((b, 1, 1, tk))?;
        let same = qs.broadcast_eq(&ks)?; // (B, 1, Tq, Tk)
        let own = j.broadcast_eq(&p)?.reshape((1, 1, tq, tk))?;
        let pad_q = qs.eq(0u32)?; // (B, 1, Tq, 1)
        let seg_ok = pad_q.broadcast_mul(&own)?.broadcast_add(&pad_q.eq(0u8)?.broadcast_mul(&same)?)?;
        ok = ok.broadcast_mul(&seg_ok)?;
    }
    let alive = ok.max_keepdim(D::Minus1)?; // (B|1, 1, Tq, 1)
    let open = ok.broadcast_maximum(&alive.eq(0u8)?)?;
    let zero = Tensor::zeros(open.shape(), key.dtype, dev)?;
    let ninf = Tensor::full(f32::NEG_INFINITY, open.shape(), dev)?.to_dtype(key.dtype)?;
    Ok(DeviceMask { bias: open.where_cond(&zero, &ninf)?, alive: alive.to_dtype(key.dtype)? })
}

/// (B, KV, L, D) -> (B, KV * n_rep, L, D), each key/value head serving n_rep query heads.
pub(crate) fn repeat_kv(x: &Tensor, n_rep: usize) -> candle_core::Result<Tensor> {
    if n_rep == 1 {
        return Ok(x.clone());
    }
    let (b, kv, l, d) = x.dims4()?;
    x.unsqueeze(2)?.broadcast_as((b, kv, n_rep, l, d))?.contiguous()?.reshape((b, kv * n_rep, l, d))
}

/// (B, KV * n_rep, L, D) -> (B, KV, L, D): the gradients of the repeated heads summed back.
fn sum_kv(x: &Tensor, n_rep: usize) -> candle_core::Result<Tensor> {
    if n_rep == 1 {
        return Ok(x.clone());
    }
    let (b, h, l, d) = x.dims4()?;
    x.reshape((b, h / n_rep, n_rep, l, d))?.sum(2)
}

/// Everything the forward and the backward share.
struct Plan {
    scale: f64,
    rep: usize,
    rows: usize,
    mask: DeviceMask,
    /// (p, key): dropout on the probabilities.
    dropout: Option<(f64, u64)>,
}

impl Plan {
    fn chunks(&self, tq: usize) -> impl Iterator<Item = (u32, usize, usize)> + '_ {
        (0..tq.div_ceil(self.rows)).map(move |c| {
            let r0 = c * self.rows;
            (c as u32, r0, self.rows.min(tq - r0))
        })
    }

    /// Scores of query rows [r0, r0 + n): (B, Hq, n, Tk), masked.
    fn scores(&self, q: &Tensor, k: &Tensor, r0: usize, n: usize) -> candle_core::Result<Tensor> {
        let bias = self.mask.bias.narrow(2, r0, n)?;
        (q.narrow(2, r0, n)?.contiguous()?.matmul(&k.t()?)? * self.scale)?.broadcast_add(&bias)
    }

    /// The inverted-dropout multiplier of chunk `c`, shaped like its probabilities.
    fn drop_mask(&self, p: &Tensor, c: u32) -> candle_core::Result<Option<Tensor>> {
        let Some((rate, key)) = self.dropout else { return Ok(None) };
        let u = crate::random::uniform_stream(p.shape(), key, c, p.device())?;
        Ok(Some((u.ge(rate as f32)?.to_dtype(p.dtype())? * (1.0 / (1.0 - rate)))?))
    }
}

/// Attention for any device and float dtype, chunked over query rows (see the module doc),
/// with `opts.dropout` on the probabilities.
pub(crate) fn attention_chunked(q: &Tensor, k: &Tensor, v: &Tensor, opts: &AttnOpts) -> Result<Tensor> {
    let (b, hq, tq, _) = q.dims4()?;
    let tk = k.dim(2)?;
    in_chunks(q, k, v, opts, opts.dropout, chunk_rows(b, hq, tq, tk))
}

fn in_chunks(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    opts: &AttnOpts,
    dropout: Option<(f64, u64)>,
    rows: usize,
) -> Result<Tensor> {
    let (b, hq, tq, _) = q.dims4()?;
    let (_, hkv, tk, _) = k.dims4()?;
    let mask = device_mask(b, tq, tk, opts, q.dtype(), q.device())?;
    let plan = Plan { scale: opts.scale, rep: hq / hkv, rows, mask, dropout: dropout.filter(|(p, _)| *p > 0.0) };
    let (qd, kr, vr) = (q.detach(), repeat_kv(&k.detach(), plan.rep)?, repeat_kv(&v.detach(), plan.rep)?);
    let (mut outs, mut lses) = (Vec::new(), Vec::new());
    for (c, r0, n) in plan.chunks(tq) {
        let s = plan.scores(&qd, &kr, r0, n)?; // (B, Hq, n, Tk)
        let m = s.max_keepdim(D::Minus1)?;
        let e = s.broadcast_sub(&m)?.exp()?;
        let l = e.sum_keepdim(D::Minus1)?;
        let mut p = e.broadcast_div(&l)?.broadcast_mul(&plan.mask.alive.narrow(2, r0, n)?)?;
        if let Some(d) = plan.drop_mask(&p, c)? {
            p = p.mul(&d)?;
        }
        outs.push(p.matmul(&vr)?); // (B, Hq, n, D)
        lses.push((m + l.log()?)?); // (B, Hq, n, 1)
    }
    let out = Tensor::cat(&outs, 2)?;
    let lse = Tensor::cat(&lses, 2)?;
    let kept = out.clone();
    let bwd = move |q: &Tensor, k: &Tensor, v: &Tensor, dout: &Tensor| backward(&plan, &lse, &kept, q, k, v, dout);
    Ok(crate::precomputed::attach3(q, k, v, "attention-chunked", out, bwd)?)
}

/// Each chunk's probabilities recomputed from q, k and the logsumexp, then dQ, dK and dV.
fn backward(
    plan: &Plan,
    lse: &Tensor,
    out: &Tensor,
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    dout: &Tensor,
) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
    let tq = q.dim(2)?;
    let (kr, vr) = (repeat_kv(k, plan.rep)?, repeat_kv(v, plan.rep)?);
    let dout = dout.contiguous()?;
    let (mut dqs, mut dk, mut dv) = (Vec::new(), kr.zeros_like()?, vr.zeros_like()?);
    for (c, r0, n) in plan.chunks(tq) {
        let s = plan.scores(q, &kr, r0, n)?; // (B, Hq, n, Tk)
        let alive = plan.mask.alive.narrow(2, r0, n)?;
        let p = s.broadcast_sub(&lse.narrow(2, r0, n)?)?.exp()?.broadcast_mul(&alive)?;
        let drop = plan.drop_mask(&p, c)?;
        let pd = match &drop {
            Some(m) => p.mul(m)?,
            None => p.clone(),
        };
        let do_c = dout.narrow(2, r0, n)?; // (B, Hq, n, D)
        dv = (dv + pd.t()?.matmul(&do_c)?)?;
        let mut dp = do_c.matmul(&vr.t()?)?; // (B, Hq, n, Tk)
        if let Some(m) = &drop {
            dp = dp.mul(m)?;
        }
        let delta = (&do_c * out.narrow(2, r0, n)?)?.sum_keepdim(D::Minus1)?; // (B, Hq, n, 1)
        let ds = (p * dp.broadcast_sub(&delta)?)?;
        dqs.push((ds.matmul(&kr)? * plan.scale)?);
        let qc = q.narrow(2, r0, n)?.contiguous()?;
        dk = (dk + (ds.t()?.matmul(&qc)? * plan.scale)?)?;
    }
    let dq = Tensor::cat(&dqs, 2)?;
    Ok((Some(dq), Some(sum_kv(&dk, plan.rep)?), Some(sum_kv(&dv, plan.rep)?)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Var;

    /// The full composition, straight from the definition, with an optional dropout multiplier
    /// on the probabilities: the reference the chunks must match.
    fn reference(q: &Tensor, k: &Tensor, v: &Tensor, opts: &AttnOpts, drop: Option<&Tensor>) -> Tensor {
        let (b, hq, tq, _) = q.dims4().unwrap();
        let (_, hkv, tk, _) = k.dims4().unwrap();
        let m = device_mask(b, tq, tk, opts, q.dtype(), q.device()).unwrap();
        let (k, v) = (repeat_kv(k, hq / hkv).unwrap(), repeat_kv(v, hq / hkv).unwrap());
        let s = (q.matmul(&k.t().unwrap()).unwrap() * opts.scale).unwrap().broadcast_add(&m.bias).unwrap();
        let max = s.max_keepdim(D::Minus1).unwrap().detach();
        let e = s.broadcast_sub(&max).unwrap().exp().unwrap();
        let mut p = e.broadcast_div(&e.sum_keepdim(D::Minus1).unwrap()).unwrap().broadcast_mul(&m.alive).unwrap();
        if let Some(d) = drop {
            p = p.mul(d).unwrap();
        }
        p.matmul(&v).unwrap()
    }

    fn max_diff(a: &Tensor, b: &Tensor) -> f64 {
        let d = (a - b).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap();
        d.to_dtype(DType::F64).unwrap().to_scalar().unwrap()
    }

    fn inputs(b: usize, hq: usize, hkv: usize, t: usize, d: usize) -> (Var, Var, Var) {
        let var = |h: usize, seed: f64| {
            let x: Vec<f64> = (0..b * h * t * d).map(|i| (i as f64 * 0.37 + seed).sin()).collect();
            Var::from_vec(x, (b, h, t, d), &Device::Cpu).unwrap()
        };
        (var(hq, 0.1), var(hkv, 0.7), var(hkv, 1.3))
    }

    /// Chunks of one row, of three rows and of all rows give the reference's output and
    /// gradients, with GQA, a window, key padding (a query seeing no key at all among them),
    /// and packed segments with padding queries.
    #[test]
    fn chunks_match_the_full_composition() {
        let (b, hq, hkv, t, d) = (2, 4, 2, 7, 8);
        let (q, k, v) = inputs(b, hq, hkv, t, d);
        let segs = vec![1u32, 1, 2, 2, 2, 0, 0, 1, 1, 1, 1, 2, 2, 3];
        let options = [
            AttnOpts::causal(d, 0),
            AttnOpts { window: 3, ..AttnOpts::causal(d, 0) },
            AttnOpts { key_padding: Some((0..b * t).map(|i| i % 5 == 4 || i < 2).collect()), ..AttnOpts::causal(d, 0) },
            AttnOpts { key_padding: Some((0..b * t).map(|i| i % 3 == 1).collect()), ..AttnOpts::new(0.3) },
            AttnOpts { segments: Some((segs.clone(), segs)), ..AttnOpts::causal(d, 0) },
        ];
        for opts in options {
            let want = reference(&q, &k, &v, &opts, None);
            let gw = (&want * &want).unwrap().sum_all().unwrap().backward().unwrap();
            for rows in [1, 3, t] {
                let got = in_chunks(&q, &k, &v, &opts, None, rows).unwrap();
                assert!(max_diff(&got, &want) < 1e-12, "{opts:?} rows {rows}: output");
                let gg = (&got * &got).unwrap().sum_all().unwrap().backward().unwrap();
                for (name, x) in [("q", &q), ("k", &k), ("v", &v)] {
                    let diff = max_diff(gg.get(x).unwrap(), gw.get(x).unwrap());
                    assert!(diff < 1e-12, "{opts:?} rows {rows}: d{name} off by {diff}");
                }
            }
        }
    }

    /// With dropout, one chunk equals the reference under the same Philox mask; in three-row
    /// chunks (each with a mask of its own) the gradient matches central differences, so the
    /// backward redraws exactly the forward's masks.
    #[test]
    fn dropout_masks_are_redrawn_in_the_backward() {
        let (b, hq, hkv, t, d) = (1, 2, 1, 6, 4);
        let (q, k, v) = inputs(b, hq, hkv, t, d);
        let opts = AttnOpts::causal(d, 0);
        let (rate, key) = (0.3, 99);
        let u = crate::random::uniform_stream((b, hq, t, t), key, 0, &Device::Cpu).unwrap();
        let m = (u.ge(rate as f32).unwrap().to_dtype(DType::F64).unwrap() * (1.0 / (1.0 - rate))).unwrap();
        let want = reference(&q, &k, &v, &opts, Some(&m));
        let got = in_chunks(&q, &k, &v, &opts, Some((rate, key)), t).unwrap();
        assert!(max_diff(&got, &want) < 1e-12);

        let loss = |q: &Tensor, k: &Tensor, v: &Tensor| -> Tensor {
            let y = in_chunks(q, k, v, &opts, Some((rate, key)), 3).unwrap();
            (&y * &y).unwrap().sum_all().unwrap()
        };
        let grads = loss(&q, &k, &v).backward().unwrap();
        let at = |x: &Tensor, i: usize, h: f64| -> Tensor {
            let mut flat: Vec<f64> = x.flatten_all().unwrap().to_vec1().unwrap();
            flat[i] += h;
            Tensor::from_vec(flat, x.shape(), &Device::Cpu).unwrap()
        };
        let value = |t: Tensor| t.to_scalar::<f64>().unwrap();
        for (which, x) in [(0, &q), (1, &k), (2, &v)] {
            let g: Vec<f64> = grads.get(x).unwrap().flatten_all().unwrap().to_vec1().unwrap();
            for i in (0..x.elem_count()).step_by(5) {
                let h = 1e-5;
                let f = |s: f64| {
                    let (mut a, mut bb, mut c) = (q.as_tensor().clone(), k.as_tensor().clone(), v.as_tensor().clone());
                    match which {
                        0 => a = at(&a, i, s * h),
                        1 => bb = at(&bb, i, s * h),
                        _ => c = at(&c, i, s * h),
                    }
                    value(loss(&a.detach(), &bb.detach(), &c.detach()))
                };
                let fd = (f(1.0) - f(-1.0)) / (2.0 * h);
                assert!((fd - g[i]).abs() < 1e-6 * (1.0 + fd.abs()), "input {which} element {i}: {fd} vs {}", g[i]);
            }
        }
    }

    /// The masks for the same options on the same device are built once.
    #[test]
    fn masks_are_cached() {
        let opts = AttnOpts { window: 2, ..AttnOpts::causal(4, 0) };
        let a = device_mask(1, 5, 5, &opts, DType::F32, &Device::Cpu).unwrap();
        let b = device_mask(1, 5, 5, &opts, DType::F32, &Device::Cpu).unwrap();
        assert!(a.bias.id() == b.bias.id());
    }
}
