//! Ops composed from candle primitives, each with a backward pass.
//!
//! candle-nn's `ops::softmax_last_dim`, `ops::rms_norm`, `ops::layer_norm` and
//! `rotary_emb::rope*` are forward-only kernels: a graph through them silently loses its
//! gradients. Everything here is built from primitives candle can differentiate.

use crate::rng::Rng;
use candle_core::{DType, Result, Tensor, D};
use taper_kernels::AttnOpts;

/// y = x W^T + b through the fused kernel when `kernels` and W takes a gradient or none is
/// being taken (a frozen W under a trained x keeps [`linear`]'s dx-only op).
pub fn linear_k(x: &Tensor, w: &Tensor, b: Option<&Tensor>, kernels: bool) -> Result<Tensor> {
    if kernels && (w.track_op() || !x.track_op()) {
        taper_kernels::linear(x, w, b)
    } else {
        linear(x, w, b)
    }
}

/// y = x W^T + b, for x of any rank (.., in) and W of shape (out, in).
///
/// For a weight that takes no gradient (a frozen base under LoRA, a fixed head) while `x`
/// does, candle's matmul backward would compute and keep dW regardless, a weight-sized tensor
/// per layer per step: there the product is one node whose backward forms dx alone.
pub fn linear(x: &Tensor, w: &Tensor, b: Option<&Tensor>) -> Result<Tensor> {
    let frozen = !w.track_op() && x.track_op() && matches!(x.dtype(), DType::F32 | DType::F64);
    if !frozen {
        return taper_kernels::linear_composed(x, w, b);
    }
    let dims = x.dims().to_vec();
    let (last, lead) = dims.split_last().expect("linear on a scalar");
    let n: usize = lead.iter().product();
    let x = x.reshape((n, *last))?.contiguous()?;
    let wt = w.t()?.to_dtype(x.dtype())?;
    let y = taper_kernels::precision::matmul(&x.detach(), &wt)?; // (N, out)
                                                                 // The backward runs under the precision the forward saw.
    let p = taper_kernels::matmul_precision();
    let y = taper_kernels::precomputed::attach1(&x, "frozen-matmul", y, move |_, g| {
        let _p = taper_kernels::set_matmul_precision(p);
        Ok(Some(taper_kernels::precision::matmul(g, &wt.t()?)?)) // (N, out) x (out, in)
    })?;
    let y = match b {
        Some(b) => y.broadcast_add(b)?,
        None => y,
    };
    let mut out = lead.to_vec();
    out.push(w.dim(0)?);
    y.reshape(out)
}

/// Softmax over the last dim. The max is detached: softmax is shift-invariant, so the
/// subtraction only guards against overflow and needs no gradient.
pub fn softmax(x: &Tensor) -> Result<Tensor> {
    let max = x.max_keepdim(D::Minus1)?.detach();
    let e = x.broadcast_sub(&max)?.exp()?;
    e.broadcast_div(&e.sum_keepdim(D::Minus1)?)
}

/// log(softmax(x)) over the last dim, without forming the softmax.
pub fn log_softmax(x: &Tensor) -> Result<Tensor> {
    let max = x.max_keepdim(D::Minus1)?.detach();
    let shifted = x.broadcast_sub(&max)?;
    let lse = shifted.exp()?.sum_keepdim(D::Minus1)?.log()?;
    shifted.broadcast_sub(&lse)
}

/// LayerNorm over the last dim (Ba, Kiros & Hinton 2016), biased variance as in PyTorch.
pub fn layer_norm(x: &Tensor, w: &Tensor, b: Option<&Tensor>, eps: f64) -> Result<Tensor> {
    let mean = x.mean_keepdim(D::Minus1)?;
    let xc = x.broadcast_sub(&mean)?;
    let var = xc.sqr()?.mean_keepdim(D::Minus1)?;
    let y = xc.broadcast_div(&(var + eps)?.sqrt()?)?.broadcast_mul(w)?;
    match b {
        Some(b) => y.broadcast_add(b),
        None => Ok(y),
    }
}

/// RMSNorm over the last dim (Zhang & Sennrich 2019), as in HF's LlamaRMSNorm.
pub fn rms_norm(x: &Tensor, w: &Tensor, eps: f64) -> Result<Tensor> {
    let ms = x.sqr()?.mean_keepdim(D::Minus1)?;
    x.broadcast_div(&(ms + eps)?.sqrt()?)?.broadcast_mul(w)
}

/// Rotary embedding in the rotate-half layout of HF's Llama: x * cos + rotate_half(x) * sin.
/// x: (B, H, T, D); cos, sin: (T, D), each half repeating the same frequencies.
pub fn rope(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    let d = x.dim(D::Minus1)?;
    let x1 = x.narrow(D::Minus1, 0, d / 2)?;
    let x2 = x.narrow(D::Minus1, d / 2, d / 2)?;
    let rotated = Tensor::cat(&[&x2.neg()?, &x1], D::Minus1)?;
    x.broadcast_mul(cos)? + rotated.broadcast_mul(sin)?
}

/// RoPE inverse frequencies theta^(-2i/d), in f32 as HF computes them, with Llama 3's
/// wavelength-dependent scaling when configured (HF `_compute_llama3_parameters`).
pub fn rope_inv_freq(cfg: &crate::ModelConfig) -> Vec<f32> {
    let d = cfg.head_dim();
    let base: Vec<f32> = (0..d / 2).map(|i| (1.0 / cfg.rope_theta.powf((2 * i) as f64 / d as f64)) as f32).collect();
    let Some(r) = &cfg.rope_scaling else { return base };
    let old = r.original_max_position_embeddings as f64;
    let (low_wavelen, high_wavelen) = (old / r.low_freq_factor, old / r.high_freq_factor);
    base.iter()
        .map(|&f| {
            let f = f as f64;
            let wavelen = 2.0 * std::f64::consts::PI / f;
            let out = if wavelen < high_wavelen {
                f
            } else if wavelen > low_wavelen {
                f / r.factor
            } else {
                let smooth = (old / wavelen - r.low_freq_factor) / (r.high_freq_factor - r.low_freq_factor);
                (1.0 - smooth) * f / r.factor + smooth * f
            };
            out as f32
        })
        .collect()
}

/// cos and sin tables (T, head_dim) for positions offset..offset+T, each half repeating the
/// frequencies. The angle is an f32 product, as in HF, so positions far out round alike.
pub fn rope_tables(inv_freq: &[f32], offset: usize, t: usize, dev: &candle_core::Device) -> Result<(Tensor, Tensor)> {
    let d = inv_freq.len() * 2;
    let mut cos = Vec::with_capacity(t * d);
    let mut sin = Vec::with_capacity(t * d);
    for p in offset..offset + t {
        for _half in 0..2 {
            for f in inv_freq {
                let a = (p as f32 * f) as f64;
                cos.push(a.cos() as f32);
                sin.push(a.sin() as f32);
            }
        }
    }
    Ok((Tensor::from_vec(cos, (t, d), dev)?, Tensor::from_vec(sin, (t, d), dev)?))
}

/// The fixed sinusoidal table of "Attention Is All You Need" (3.5): (max_pos, d).
pub fn sinusoidal_table(d: usize, max_pos: usize, dev: &candle_core::Device) -> Result<Tensor> {
    let mut v = Vec::with_capacity(max_pos * d);
    for p in 0..max_pos {
        for i in 0..d {
            let a = p as f64 / 10_000f64.powf((2 * (i / 2)) as f64 / d as f64);
            v.push(if i % 2 == 0 { a.sin() } else { a.cos() } as f32);
        }
    }
    Tensor::from_vec(v, (max_pos, d), dev)
}

/// Additive causal mask (T, L) for T queries at positions offset..offset+T over L = offset+T
/// keys: 0 where a query may look, -inf in the future and, with a sliding `window` > 0, at
/// `window` or more positions back (Mistral). Built on the device and cached per shape.
pub fn causal_mask(t: usize, offset: usize, window: usize, dev: &candle_core::Device) -> Result<Tensor> {
    let opts = AttnOpts { window, ..AttnOpts::causal(1, 0) };
    taper_kernels::attention_bias(1, t, offset + t, &opts, DType::F32, dev)
        .map_err(candle_core::Error::wrap)?
        .reshape((t, offset + t))
}

/// Additive mask (B, 1, T, T) for packed rows: a query sees earlier keys of its own segment
/// (and within the sliding `window`, if any). Padding (segment 0) sees only itself, so its
/// softmax stays finite. Built on the device from the (B * T) ids and cached.
pub fn segment_mask(seg: &[u32], b: usize, t: usize, window: usize, dev: &candle_core::Device) -> Result<Tensor> {
    cached_segment_mask(seg, seg, b, t, window, dev)
}

/// [`segment_mask`] for T queries that follow cached keys: query segments (B * T), key segments
/// (B * L) for the L >= T keys, the queries at the last T of those positions. (B, 1, T, L),
/// built on the device from the ids and cached.
pub fn cached_segment_mask(
    q_seg: &[u32],
    k_seg: &[u32],
    b: usize,
    t: usize,
    window: usize,
    dev: &candle_core::Device,
) -> Result<Tensor> {
    let l = k_seg.len() / b.max(1);
    if q_seg.len() != b * t || k_seg.len() != b * l || l < t {
        candle_core::bail!(
            "segment mask: {} query and {} key ids for {b} rows of {t} queries",
            q_seg.len(),
            k_seg.len()
        )
    }
    let opts = AttnOpts { window, segments: Some((q_seg.to_vec(), k_seg.to_vec())), ..AttnOpts::causal(1, 0) };
    taper_kernels::attention_bias(b, t, l, &opts, DType::F32, dev).map_err(candle_core::Error::wrap)
}

/// Inverted dropout. Off the fused CPU path the mask is drawn on the device by Philox, keyed by
/// the next value of `rng` (one per call site); on the CPU from `rng` itself, one value per
/// element, as taper always has (candle's CPU RNG cannot be seeded).
pub fn dropout(x: &Tensor, p: f64, rng: &mut Rng) -> Result<Tensor> {
    if p <= 0.0 {
        return Ok(x.clone());
    }
    if !taper_kernels::fused_on(x.device()) {
        return x.mul(&taper_kernels::random::dropout_mask(x, p, rng.next_u64())?);
    }
    let scale = (1.0 / (1.0 - p)) as f32;
    let mask: Vec<f32> = (0..x.elem_count()).map(|_| if (rng.uniform() as f64) < p { 0.0 } else { scale }).collect();
    let mask = Tensor::from_vec(mask, x.shape(), x.device())?.to_dtype(x.dtype())?;
    x.mul(&mask)
}

/// Mean cross-entropy over the targets that are not `ignore_index`.
/// logits: (N, V) any float dtype; targets: (N,) i64.
pub fn cross_entropy(logits: &Tensor, targets: &Tensor, ignore_index: i64) -> Result<Tensor> {
    let logits = logits.to_dtype(DType::F32)?;
    let valid = targets.ne(ignore_index)?; // (N,) u8
    let safe = valid.where_cond(targets, &targets.zeros_like()?)?.to_dtype(DType::U32)?;
    let picked = log_softmax(&logits)?.gather(&safe.unsqueeze(1)?, 1)?.squeeze(1)?; // (N,)
    let validf = valid.to_dtype(DType::F32)?;
    // The count stays on the device: dividing by it reads nothing back.
    let count = validf.sum_all()?.maximum(1f64)?;
    (picked * validf)?.sum_all()?.neg()?.div(&count)
}

/// Cross-entropy with label smoothing as PyTorch's `CrossEntropyLoss(label_smoothing = eps)`:
/// (1 - eps) * nll + eps * the mean over classes of -log p, averaged over the targets that are
/// not `ignore_index`. logits: (N, V); targets: (N,) i64.
pub fn label_smoothed_cross_entropy(logits: &Tensor, targets: &Tensor, eps: f64, ignore_index: i64) -> Result<Tensor> {
    let nll = cross_entropy(logits, targets, ignore_index)?;
    if eps == 0.0 {
        return Ok(nll);
    }
    let lp = log_softmax(&logits.to_dtype(DType::F32)?)?;
    let valid = targets.ne(ignore_index)?.to_dtype(DType::F32)?;
    let count = valid.sum_all()?.maximum(1f64)?;
    let uniform = (lp.mean(D::Minus1)? * &valid)?.sum_all()?.neg()?.div(&count)?;
    (nll * (1.0 - eps))? + (uniform * eps)?
}

#[cfg(test)]
mod tests {
    /// The frozen-weight matmul computes what matmul does, forward and dx, in f32 and f64.
    #[test]
    fn frozen_linear_matches_matmul_and_leaves_the_weight_alone() -> Result<()> {
        use candle_core::{Device, Var};
        for dtype in [DType::F32, DType::F64] {
            let dev = Device::Cpu;
            let w = Tensor::arange(0f32, 15., &dev)?.reshape((5, 3))?.affine(0.1, -0.7)?.to_dtype(dtype)?;
            let x = Var::from_tensor(
                &Tensor::arange(0f32, 24., &dev)?.reshape((2, 4, 3))?.affine(0.05, -0.3)?.to_dtype(dtype)?,
            )?;
            let b = Tensor::new(&[0.1f32, 0.2, 0.3, 0.4, 0.5], &dev)?.to_dtype(dtype)?;
            let y = linear(x.as_tensor(), &w, Some(&b))?;
            let grads = (y.sqr()?.sum_all()?).backward()?;
            let dx = grads.get(x.as_tensor()).unwrap().clone();
            assert!(grads.get_ids().all(|id| grads.get_id(*id).unwrap().dims() != [3, 5]), "no dW^T kept");
            let plain = x.as_tensor().reshape((8, 3))?.matmul(&w.t()?)?.broadcast_add(&b)?.reshape((2, 4, 5))?;
            let g2 = (plain.sqr()?.sum_all()?).backward()?;
            let err = |a: &Tensor, b: &Tensor| -> Result<f64> {
                (a - b)?.abs()?.max_all()?.to_dtype(DType::F64)?.to_scalar::<f64>()
            };
            assert!(err(&y, &plain)? < 1e-6);
            assert!(err(&dx, g2.get(x.as_tensor()).unwrap())? < 1e-5);
        }
        Ok(())
    }

    use super::*;
    use candle_core::{Device, Var};

    fn close(a: &[f32], b: &[f32], tol: f32) {
        assert_eq!(a.len(), b.len());
        for (x, y) in a.iter().zip(b) {
            assert!((x - y).abs() <= tol * (1.0 + y.abs()), "{x} vs {y}");
        }
    }

    #[test]
    fn composed_ops_match_candle_nn_forward() -> Result<()> {
        let dev = Device::Cpu;
        let mut r = Rng::new(3);
        let x: Vec<f32> = (0..2 * 3 * 8).map(|_| r.normal() as f32 * 3.0).collect();
        let x = Tensor::from_vec(x, (2, 3, 8), &dev)?;
        let w = Tensor::from_vec((0..8).map(|i| 0.5 + i as f32 * 0.1).collect(), 8, &dev)?;
        let b = Tensor::from_vec((0..8).map(|i| i as f32 * -0.05).collect(), 8, &dev)?;
        let f = |t: Tensor| t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        close(&f(softmax(&x)?), &f(candle_nn::ops::softmax_last_dim(&x)?), 1e-6);
        close(&f(log_softmax(&x)?.exp()?), &f(candle_nn::ops::softmax_last_dim(&x)?), 1e-6);
        close(&f(layer_norm(&x, &w, Some(&b), 1e-5)?), &f(candle_nn::ops::layer_norm(&x, &w, &b, 1e-5)?), 1e-5);
        close(&f(rms_norm(&x, &w, 1e-5)?), &f(candle_nn::ops::rms_norm(&x, &w, 1e-5)?), 1e-5);
        // rope against candle's (forward-only) kernel on a (B, H, T, D) input.
        let q = x.reshape((1, 2, 3, 8))?;
        let cfg = crate::ModelConfig { n_embd: 16, n_head: 2, pos_emb: crate::PosEmb::Rope, ..Default::default() };
        let (cos, sin) = rope_tables(&rope_inv_freq(&cfg), 0, 3, &dev)?;
        let ours = rope(&q, &cos, &sin)?;
        let theirs =
            candle_nn::rotary_emb::rope(&q, &cos.narrow(1, 0, 4)?.contiguous()?, &sin.narrow(1, 0, 4)?.contiguous()?)?;
        close(&f(ours), &f(theirs), 1e-5);
        Ok(())
    }

    #[test]
    fn cross_entropy_ignores_and_matches_hand_value() -> Result<()> {
        let dev = Device::Cpu;
        let logits = Tensor::new(&[[1.0f32, 2.0, 3.0], [0.0, 0.0, 0.0], [5.0, 1.0, 1.0]], &dev)?;
        let targets = Tensor::new(&[2i64, -100, 0], &dev)?;
        let loss = cross_entropy(&logits, &targets, -100)?;
        let l0 = -(3f64.exp() / (1f64.exp() + 2f64.exp() + 3f64.exp())).ln();
        let l2 = -(5f64.exp() / (5f64.exp() + 2.0 * 1f64.exp())).ln();
        assert!((loss.to_scalar::<f32>()? as f64 - (l0 + l2) / 2.0).abs() < 1e-6);
        Ok(())
    }

    /// Finite differences in f64 for the composed ops' gradients.
    #[test]
    fn composed_ops_gradients_match_finite_differences() -> Result<()> {
        let dev = Device::Cpu;
        let mut r = Rng::new(11);
        let xs: Vec<f64> = (0..2 * 2 * 3 * 4).map(|_| r.normal()).collect();
        let w: Vec<f64> = (0..4).map(|_| 1.0 + 0.3 * r.normal()).collect();
        let wt = Tensor::from_vec(w, 4, &dev)?;
        let bt = wt.affine(0.5, -0.2)?;
        let cfg = crate::ModelConfig { n_embd: 8, n_head: 2, rope_theta: 100.0, ..Default::default() };
        let (cos, sin) = rope_tables(&rope_inv_freq(&cfg), 0, 3, &dev)?;
        let (cos, sin) = (cos.to_dtype(DType::F64)?, sin.to_dtype(DType::F64)?);
        let probe =
            Tensor::from_vec((0..xs.len()).map(|i| (i as f64 * 0.37).sin()).collect::<Vec<_>>(), (2, 2, 3, 4), &dev)?;
        type F = Box<dyn Fn(&Tensor) -> Result<Tensor>>;
        let (w2, b2, w3) = (wt.clone(), bt.clone(), wt.clone());
        let ops: Vec<(&str, F)> = vec![
            ("softmax", Box::new(softmax)),
            ("log_softmax", Box::new(log_softmax)),
            ("layer_norm", Box::new(move |x| layer_norm(x, &w2, Some(&b2), 1e-5))),
            ("rms_norm", Box::new(move |x| rms_norm(x, &w3, 1e-5))),
            ("rope", Box::new(move |x| rope(x, &cos, &sin))),
        ];
        for (name, op) in ops {
            let x = Var::from_tensor(&Tensor::from_vec(xs.clone(), (2, 2, 3, 4), &dev)?)?;
            let loss = |t: &Tensor| -> Result<f64> { op(t)?.mul(&probe)?.sum_all()?.to_scalar::<f64>() };
            let g = op(x.as_tensor())?.mul(&probe)?.sum_all()?.backward()?;
            let g = g.get(x.as_tensor()).expect("grad").flatten_all()?.to_vec1::<f64>()?;
            for i in 0..xs.len() {
                let h = 1e-6;
                let mut p = xs.clone();
                p[i] += h;
                let mut m = xs.clone();
                m[i] -= h;
                let fd = (loss(&Tensor::from_vec(p, (2, 2, 3, 4), &dev)?)?
                    - loss(&Tensor::from_vec(m, (2, 2, 3, 4), &dev)?)?)
                    / (2.0 * h);
                assert!((fd - g[i]).abs() < 1e-6 * (1.0 + fd.abs()), "{name}[{i}]: fd {fd} vs {}", g[i]);
            }
        }
        Ok(())
    }
}
