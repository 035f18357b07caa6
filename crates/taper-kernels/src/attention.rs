//! Fused scaled-dot-product attention with a backward pass (the FlashAttention-2 scheme of
//! Dao 2023, on CPU).
//!
//! The forward takes 64 query rows at a time over blocks of up to 512 keys with an online
//! softmax (a running max and sum per query row), the block products q kᵀ and P v as GEMMs, so
//! the (Tq, Tk) probability matrix never exists: it keeps the output and the per-row
//! logsumexp, and the backward recomputes each block's probabilities from q, k and that
//! logsumexp. Grouped-query attention reads each key/value head in place for its group of query
//! heads instead of repeating it.
//!
//! Elsewhere than CPU f32/f64, [`attention`] runs [`attention_composed`]: matmuls, an additive
//! mask and a softmax built from primitives, the same math with candle's own backward.

use crate::float::simd;
use crate::linear::gemm_into;
use candle_core::{CpuStorage, DType, Device, Layout, Shape, Tensor, WithDType};
use gemm::Parallelism;
use rayon::prelude::*;
use std::sync::Mutex;

use crate::attention_opts::{AttentionError, AttnOpts, Result};

/// Sizes of one call: q (B, Hq, Tq, D), k and v (B, Hkv, Tk, D).
#[derive(Debug, Clone, Copy)]
struct Dims {
    b: usize,
    hq: usize,
    hkv: usize,
    tq: usize,
    tk: usize,
    d: usize,
}

impl Dims {
    fn of(q: &Tensor, k: &Tensor, v: &Tensor, opts: &AttnOpts) -> Result<Self> {
        let shape = |t: &Tensor, name: &str| -> Result<(usize, usize, usize, usize)> {
            t.dims4().map_err(|_| AttentionError::Shape(format!("{name} must be (B, H, T, D), got {:?}", t.dims())))
        };
        let (b, hq, tq, d) = shape(q, "q")?;
        let (bk, hkv, tk, dk) = shape(k, "k")?;
        if v.dims() != k.dims() {
            return Err(AttentionError::Shape(format!("v {:?} must match k {:?}", v.dims(), k.dims())));
        }
        if bk != b || dk != d {
            return Err(AttentionError::Shape(format!(
                "q {:?} and k {:?} differ in batch or head dim",
                q.dims(),
                k.dims()
            )));
        }
        Self { b, hq, hkv, tq, tk, d }.checked(opts)
    }

    /// These sizes, if the heads group evenly and the masks in `opts` have one entry per
    /// (batch, position).
    fn checked(self, opts: &AttnOpts) -> Result<Self> {
        let Self { b, hq, hkv, tq, tk, .. } = self;
        if hkv == 0 || hq % hkv != 0 {
            return Err(AttentionError::Shape(format!("{hq} query heads are not a multiple of {hkv} key/value heads")));
        }
        if let Some(kp) = &opts.key_padding {
            if kp.len() != b * tk {
                return Err(AttentionError::Shape(format!(
                    "key_padding has {} entries, expected B*Tk = {}",
                    kp.len(),
                    b * tk
                )));
            }
        }
        if let Some((qs, ks)) = &opts.segments {
            if qs.len() != b * tq || ks.len() != b * tk {
                return Err(AttentionError::Shape(format!(
                    "segments have {} query and {} key ids, expected {} and {}",
                    qs.len(),
                    ks.len(),
                    b * tq,
                    b * tk
                )));
            }
        }
        Ok(self)
    }

    /// Query heads per key/value head.
    fn rep(&self) -> usize {
        self.hq / self.hkv
    }
}

/// [`attention`] on the projections' layout: q (B, Tq, Hq·D), k and v (B, Tk, Hkv·D), returning
/// (B, Tq, Hq·D), the input of the output projection. One graph node where the (B, H, T, D)
/// form needs a reshape, a transpose and a copy on each side, each with a backward of its own.
pub fn attention_bthd(q: &Tensor, k: &Tensor, v: &Tensor, hq: usize, hkv: usize, opts: &AttnOpts) -> Result<Tensor> {
    let split = |t: &Tensor, h: usize, name: &str| -> Result<Tensor> {
        let (b, n, c) =
            t.dims3().map_err(|_| AttentionError::Shape(format!("{name} must be (B, T, H*D), got {:?}", t.dims())))?;
        if h == 0 || c % h != 0 {
            return Err(AttentionError::Shape(format!("{name} width {c} is not a multiple of {h} heads")));
        }
        Ok(t.reshape((b, n, h, c / h))?.transpose(1, 2)?)
    };
    let (qh, kh, vh) = (split(q, hq, "q")?, split(k, hkv, "k")?, split(v, hkv, "v")?);
    let dims = Dims::of(&qh, &kh, &vh, opts)?;
    if q.dtype() != k.dtype() || q.dtype() != v.dtype() {
        return Err(AttentionError::DType { q: q.dtype(), k: k.dtype(), v: v.dtype() });
    }
    let fused = crate::fused_on(q.device()) && matches!(q.dtype(), DType::F32 | DType::F64) && opts.dropout.is_none();
    if !fused {
        let Dims { b, hq, hkv, tq, tk, d } = dims;
        if let Some(y) = crate::attention_cuda::attention(q, k, v, [b, hq, hkv, tq, tk, d], opts, true)? {
            return Ok(y);
        }
        let y = attention_composed(&qh.contiguous()?, &kh.contiguous()?, &vh.contiguous()?, opts)?; // (B, H, T, D)
        return Ok(y.transpose(1, 2)?.reshape(q.dims())?);
    }
    let op = FusedAttention { dims, opts: opts.clone(), lse: Mutex::new(None), bthd: true };
    Ok(q.contiguous()?.apply_op3(&k.contiguous()?, &v.contiguous()?, op)?)
}

/// Self-attention on one packed projection, q, k and v side by side in each row:
/// (B, T, (Hq + 2·Hkv)·D) -> (B, T, Hq·D). With the three projections' weights stacked into one
/// GEMM, their input gets a single gradient instead of three to add up.
pub fn attention_packed(qkv: &Tensor, hq: usize, hkv: usize, opts: &AttnOpts) -> Result<Tensor> {
    packed(qkv, hq, hkv, None, opts)
}

/// [`attention_packed`] with rotary embeddings on q and k, applied inside the op (rotate-half
/// layout, as [`crate::rope`]): cos and sin are (T, D), or (B, 1, T, D) for rows with positions
/// of their own, and constants. No (B, H, T, D) copies or rotation nodes in the graph.
pub fn attention_packed_rope(
    qkv: &Tensor,
    hq: usize,
    hkv: usize,
    cos: &Tensor,
    sin: &Tensor,
    opts: &AttnOpts,
) -> Result<Tensor> {
    packed(qkv, hq, hkv, Some((cos, sin)), opts)
}

fn packed(qkv: &Tensor, hq: usize, hkv: usize, rope: Option<(&Tensor, &Tensor)>, opts: &AttnOpts) -> Result<Tensor> {
    let (b, t, w) =
        qkv.dims3().map_err(|_| AttentionError::Shape(format!("qkv must be (B, T, W), got {:?}", qkv.dims())))?;
    let heads = hq + 2 * hkv;
    if hkv == 0 || w % heads != 0 {
        return Err(AttentionError::Shape(format!("qkv width {w} is not {hq} + 2 x {hkv} heads of one size")));
    }
    let d = w / heads;
    let fused =
        crate::fused_on(qkv.device()) && matches!(qkv.dtype(), DType::F32 | DType::F64) && opts.dropout.is_none();
    let tables = match rope {
        None => None,
        Some((cos, sin)) => {
            let shape = crate::rope::table_shape((b, t, d), cos).filter(|_| sin.dims() == cos.dims());
            let Some((cb, _, _)) = shape else {
                return Err(AttentionError::Shape(format!(
                    "rotary tables cos {:?} and sin {:?} for {b} rows of {t} positions and an even head dim {d}",
                    cos.dims(),
                    sin.dims()
                )));
            };
            let table = |x: &Tensor| -> candle_core::Result<Tensor> {
                x.detach().to_dtype(qkv.dtype())?.contiguous()?.reshape((cb, t, d))
            };
            Some(RopeTables { cos: table(cos)?, sin: table(sin)? })
        }
    };
    if !fused {
        // (B, H, T, D) heads out of the packed rows, rotated, through the plain attention.
        let part = |from: usize, h: usize| -> candle_core::Result<Tensor> {
            qkv.narrow(2, from * d, h * d)?.reshape((b, t, h, d))?.transpose(1, 2)
        };
        let (mut q, mut k, v) = (part(0, hq)?, part(hq, hkv)?, part(hq + hkv, hkv)?.contiguous()?);
        if let Some((cos, sin)) = rope {
            (q, k) = (crate::rope(&q, cos, sin)?, crate::rope(&k, cos, sin)?);
        }
        let y = attention(&q.contiguous()?, &k.contiguous()?, &v, opts)?; // (B, H, T, D)
        return Ok(y.transpose(1, 2)?.reshape((b, t, hq * d))?);
    }
    let dims = Dims { b, hq, hkv, tq: t, tk: t, d }.checked(opts)?;
    let inner = FusedAttention { dims, opts: opts.clone(), lse: Mutex::new(None), bthd: false };
    Ok(qkv.contiguous()?.apply_op1(PackedAttention { inner, rope: tables })?)
}

/// Attention softmax(scale · q kᵀ + mask) v over (B, Hq, Tq, D) queries and (B, Hkv, Tk, D)
/// keys and values, Hq a multiple of Hkv. Returns (B, Hq, Tq, D); a query that sees no key gets
/// a zero row (and no gradient). Fused on CPU in f32 and f64, composed elsewhere.
pub fn attention(q: &Tensor, k: &Tensor, v: &Tensor, opts: &AttnOpts) -> Result<Tensor> {
    let dims = Dims::of(q, k, v, opts)?;
    if q.dtype() != k.dtype() || q.dtype() != v.dtype() {
        return Err(AttentionError::DType { q: q.dtype(), k: k.dtype(), v: v.dtype() });
    }
    let fused = crate::fused_on(q.device()) && matches!(q.dtype(), DType::F32 | DType::F64) && opts.dropout.is_none();
    if !fused {
        let Dims { b, hq, hkv, tq, tk, d } = dims;
        if let Some(y) = crate::attention_cuda::attention(q, k, v, [b, hq, hkv, tq, tk, d], opts, false)? {
            return Ok(y);
        }
        return attention_composed(q, k, v, opts);
    }
    let op = FusedAttention { dims, opts: opts.clone(), lse: Mutex::new(None), bthd: false };
    Ok(q.contiguous()?.apply_op3(&k.contiguous()?, &v.contiguous()?, op)?)
}

/// The same attention from candle primitives, for any device and float dtype: query chunks
/// with recomputation in the backward, so the (B, Hq, Tq, Tk) probabilities are never kept
/// (see `attention_chunked`); masks built on the device and cached. The path every device
/// without a fused kernel takes, and the one that applies `opts.dropout`.
pub fn attention_composed(q: &Tensor, k: &Tensor, v: &Tensor, opts: &AttnOpts) -> Result<Tensor> {
    Dims::of(q, k, v, opts)?;
    crate::attention_chunked::attention_chunked(q, k, v, opts)
}

/// The additive mask (B or 1, 1, Tq, Tk), 0 where `opts` lets a query see a key and -inf
/// elsewhere (a row that sees no key is all 0), built on the device and cached: the same mask
/// the composed path adds to its scores.
pub fn attention_bias(b: usize, tq: usize, tk: usize, opts: &AttnOpts, dtype: DType, dev: &Device) -> Result<Tensor> {
    Ok(crate::attention_chunked::device_mask(b, tq, tk, opts, dtype, dev)?.bias)
}

/// The keys one query row may see: the contiguous range [lo, hi) left by causality, the window
/// and a padding segment, and the segment its keys must carry (None: any).
#[derive(Clone, Copy)]
struct RowKeys {
    lo: usize,
    hi: usize,
    seg: Option<u32>,
}

/// Per-key checks shared by the forward and backward kernels for one batch row.
struct RowMask<'a> {
    dims: Dims,
    opts: &'a AttnOpts,
    /// This batch row's key padding (Tk) and key segments (Tk).
    pad: Option<&'a [bool]>,
    kseg: Option<&'a [u32]>,
    qseg: Option<&'a [u32]>,
}

impl<'a> RowMask<'a> {
    fn new(dims: Dims, opts: &'a AttnOpts, r: usize) -> Self {
        let tk = dims.tk;
        Self {
            dims,
            opts,
            pad: opts.key_padding.as_ref().map(|kp| &kp[r * tk..(r + 1) * tk]),
            kseg: opts.segments.as_ref().map(|(_, ks)| &ks[r * tk..(r + 1) * tk]),
            qseg: opts.segments.as_ref().map(|(qs, _)| &qs[r * dims.tq..(r + 1) * dims.tq]),
        }
    }

    fn row(&self, i: usize) -> RowKeys {
        let Dims { tq, tk, .. } = self.dims;
        let p = (tk + i) as isize - tq as isize;
        let mut lo = 0isize;
        let mut hi = tk as isize;
        if self.opts.causal {
            hi = hi.min(p + 1);
        }
        if self.opts.window > 0 {
            lo = lo.max(p - self.opts.window as isize + 1);
        }
        let mut seg = None;
        if let Some(qs) = self.qseg {
            match qs[i] {
                0 => {
                    lo = lo.max(p);
                    hi = hi.min(p + 1);
                }
                s => seg = Some(s),
            }
        }
        let (lo, hi) = (lo.clamp(0, tk as isize) as usize, hi.clamp(0, tk as isize) as usize);
        RowKeys { lo, hi: hi.max(lo), seg }
    }

    #[inline(always)]
    fn keep(&self, row: RowKeys, j: usize) -> bool {
        if let Some(pad) = self.pad {
            if pad[j] {
                return false;
            }
        }
        match (row.seg, self.kseg) {
            (Some(s), Some(ks)) => ks[j] == s,
            _ => true,
        }
    }
}

/// The float operations the kernels need, for f32 and f64.
trait Float: WithDType {
    const NEG_INF: Self;
    const ZERO: Self;
    fn exp(self) -> Self;
    fn ln(self) -> Self;
    fn fmax(self, o: Self) -> Self;
    /// x <- exp(x - shift) over a slice.
    fn exp_shifted(x: &mut [Self], shift: Self);
}

macro_rules! float {
    ($t:ty, { $($exp:tt)* }) => {
        impl Float for $t {
            const NEG_INF: Self = <$t>::NEG_INFINITY;
            const ZERO: Self = 0.0;
            #[inline(always)]
            fn exp(self) -> Self {
                <$t>::exp(self)
            }
            #[inline(always)]
            fn ln(self) -> Self {
                <$t>::ln(self)
            }
            #[inline(always)]
            fn fmax(self, o: Self) -> Self {
                <$t>::max(self, o)
            }
            $($exp)*
        }
    };
}
float!(f32, {
    /// The polynomial exp that vectorises (libm's is a call per element, and was most of the
    /// forward's time).
    #[inline(always)]
    fn exp_shifted(x: &mut [f32], shift: f32) {
        crate::float::exp_shifted_f32(x, shift);
    }
});
float!(f64, {
    #[inline(always)]
    fn exp_shifted(x: &mut [f64], shift: f64) {
        x.iter_mut().for_each(|v| *v = (*v - shift).exp());
    }
});

/// Query rows per block: the height of the GEMM microkernel.
const BQ: usize = 64;
/// Keys per block of the online softmax, so that a block's (BQ, BKV) scores stay in L2.
const BKV: usize = 512;
/// Independent partial sums, so that the dot product vectorises without reassociation.
const LANES: usize = 16;

#[inline(always)]
fn dot<T: Float>(a: &[T], b: &[T]) -> T {
    let mut acc = [T::ZERO; LANES];
    let (ca, cb) = (a.chunks_exact(LANES), b.chunks_exact(LANES));
    let mut tail = T::ZERO;
    for (x, y) in ca.remainder().iter().zip(cb.remainder()) {
        tail += *x * *y;
    }
    for (x, y) in ca.zip(cb) {
        for l in 0..LANES {
            acc[l] += x[l] * y[l];
        }
    }
    let mut w = LANES / 2;
    while w > 0 {
        for l in 0..w {
            acc[l] += acc[l + w];
        }
        w /= 2;
    }
    acc[0] + tail
}

/// The custom op. The forward leaves the logsumexp of each query row (B, Hq, Tq) here for the
/// backward: a candle op has one output, and the op object lives in the graph with it.
struct FusedAttention {
    dims: Dims,
    opts: AttnOpts,
    lse: Mutex<Option<CpuStorage>>,
    /// Tensors in the projections' (B, T, H·D) layout: heads are gathered into (B, H, T, D)
    /// inside the op, so that the graph holds no reshape, transpose or copy around it.
    bthd: bool,
}

/// `f` over a tensor's CPU elements, read in place (a copy only if it is not contiguous).
fn in_place<T: Float, R>(t: &Tensor, f: impl FnOnce(&[T]) -> R) -> candle_core::Result<R> {
    let t = t.contiguous()?;
    let (s, l) = t.storage_and_layout();
    match &*s {
        candle_core::Storage::Cpu(c) => Ok(f(slice::<T>(c, l)?)),
        _ => Err(candle_core::Error::wrap(AttentionError::Backward("fused attention runs on the CPU".into()))),
    }
}

/// Heads `h` at column `off` of rows (B, T, width) gathered into (B, H, T, D).
fn gather_heads<T: Float>(x: &[T], t: usize, h: usize, d: usize, width: usize, off: usize) -> Vec<T> {
    let b = x.len() / (t * width).max(1);
    let mut out = vec![T::ZERO; b * h * t * d];
    if t * d == 0 {
        return out;
    }
    out.par_chunks_mut(t * d).enumerate().for_each(|(bh, chunk)| {
        let (bi, hi) = (bh / h, bh % h);
        for (ti, row) in chunk.chunks_mut(d).enumerate() {
            let at = (bi * t + ti) * width + off + hi * d;
            row.copy_from_slice(&x[at..at + d]);
        }
    });
    out
}

/// The inverse of [`gather_heads`]: (B, H, T, D) written into column `off` of rows (B, T, width).
fn scatter_heads<T: Float>(src: &[T], dst: &mut [T], t: usize, h: usize, d: usize, width: usize, off: usize) {
    if t * width == 0 {
        return;
    }
    dst.par_chunks_mut(width).enumerate().for_each(|(bt, row)| {
        let (bi, ti) = (bt / t, bt % t);
        for hi in 0..h {
            let at = ((bi * h + hi) * t + ti) * d;
            row[off + hi * d..off + (hi + 1) * d].copy_from_slice(&src[at..at + d]);
        }
    });
}

/// (B, H, T, D) -> (B, T, H·D).
fn heads_to_rows<T: Float>(src: &[T], t: usize, h: usize, d: usize) -> Vec<T> {
    let mut out = vec![T::ZERO; src.len()];
    scatter_heads(src, &mut out, t, h, d, h * d, 0);
    out
}

fn slice<'a, T: Float>(s: &'a CpuStorage, l: &Layout) -> candle_core::Result<&'a [T]> {
    let (start, end) = l.contiguous_offsets().ok_or_else(|| {
        candle_core::Error::wrap(AttentionError::Shape("fused attention needs contiguous inputs".into()))
    })?;
    Ok(&T::cpu_storage_as_slice(s)?[start..end])
}

impl FusedAttention {
    /// [`Self::fwd`] on the op's layout: (B, T, H·D) gathered into heads and the output
    /// scattered back.
    fn fwd_layout<T: Float>(&self, q: &[T], k: &[T], v: &[T]) -> (Vec<T>, Vec<T>) {
        if !self.bthd {
            return self.fwd(q, k, v);
        }
        let Dims { hq, hkv, tq, tk, d, .. } = self.dims;
        let rows = |x: &[T], t: usize, h: usize| gather_heads(x, t, h, d, h * d, 0);
        let (out, lse) = self.fwd(&rows(q, tq, hq), &rows(k, tk, hkv), &rows(v, tk, hkv));
        (heads_to_rows(&out, tq, hq, d), lse)
    }

    fn fwd<T: Float>(&self, q: &[T], k: &[T], v: &[T]) -> (Vec<T>, Vec<T>) {
        let Dims { hq, hkv, tq, tk, d, .. } = self.dims;
        let rep = self.dims.rep();
        let mut out = vec![T::ZERO; q.len()];
        let mut lse = vec![T::NEG_INF; q.len() / d.max(1)];
        if d == 0 || tq == 0 || tk == 0 {
            return (out, lse);
        }
        let scale = T::from_f64(self.opts.scale);
        out.par_chunks_mut(tq * d).zip(lse.par_chunks_mut(tq)).enumerate().for_each(|(bh, (out, lse))| {
            let (r, h) = (bh / hq, bh % hq);
            let g = r * hkv + h / rep;
            let (k, v) = (&k[g * tk * d..(g + 1) * tk * d], &v[g * tk * d..(g + 1) * tk * d]);
            let q = &q[bh * tq * d..(bh + 1) * tq * d];
            let mask = RowMask::new(self.dims, &self.opts, r);
            simd!(<T: Float> (mask: &RowMask = &mask, q: &[T] = q, k: &[T] = k, v: &[T] = v, out: &mut [T] = out,
                lse: &mut [T] = lse, scale: T = scale) {
                fwd_head(mask, q, k, v, out, lse, scale)
            })
        });
        (out, lse)
    }

    #[allow(clippy::too_many_arguments)]
    fn bwd<T: Float>(&self, q: &[T], k: &[T], v: &[T], o: &[T], g: &[T], lse: &[T]) -> (Vec<T>, Vec<T>, Vec<T>) {
        let Dims { hkv, tq, tk, d, .. } = self.dims;
        let rep = self.dims.rep();
        let mut dq = vec![T::ZERO; q.len()];
        let mut dk = vec![T::ZERO; k.len()];
        let mut dv = vec![T::ZERO; v.len()];
        if d == 0 || tq == 0 || tk == 0 {
            return (dq, dk, dv);
        }
        let scale = T::from_f64(self.opts.scale);
        // One task per (batch, kv head): it owns the dk, dv of that head and the dq of its group
        // of query heads, so no two tasks write the same gradient.
        let group = rep * tq * d;
        dq.par_chunks_mut(group).zip(dk.par_chunks_mut(tk * d)).zip(dv.par_chunks_mut(tk * d)).enumerate().for_each(
            |(bg, ((dq, dk), dv))| {
                let r = bg / hkv;
                let (k, v) = (&k[bg * tk * d..(bg + 1) * tk * d], &v[bg * tk * d..(bg + 1) * tk * d]);
                let mask = RowMask::new(self.dims, &self.opts, r);
                let heads = bg * group..(bg + 1) * group;
                let (q, o, g) = (&q[heads.clone()], &o[heads.clone()], &g[heads]);
                let lse = &lse[bg * rep * tq..(bg + 1) * rep * tq];
                // D_i = rowsum(dO ∘ O), the softmax Jacobian's correction term.
                let di: Vec<T> = o.chunks_exact(d).zip(g.chunks_exact(d)).map(|(o, g)| dot(o, g)).collect();
                for hh in 0..rep {
                    let rows = hh * tq..(hh + 1) * tq;
                    let span = rows.start * d..rows.end * d;
                    let head = HeadRows {
                        q: &q[span.clone()],
                        g: &g[span.clone()],
                        lse: &lse[rows.clone()],
                        di: &di[rows.clone()],
                    };
                    simd!(<T: Float> (mask: &RowMask = &mask, h: &HeadRows<T> = &head, k: &[T] = k, v: &[T] = v,
                        dq: &mut [T] = &mut dq[span], dk: &mut [T] = dk, dv: &mut [T] = dv, scale: T = scale) {
                        bwd_head(mask, h, k, v, dq, dk, dv, scale)
                    });
                }
            },
        );
        (dq, dk, dv)
    }
}

/// The keys [lo, hi) that some row of `rows` sees.
fn key_span(rows: &[RowKeys]) -> (usize, usize) {
    let live = rows.iter().filter(|r| r.lo < r.hi);
    let lo = live.clone().map(|r| r.lo).min().unwrap_or(0);
    let hi = live.map(|r| r.hi).max().unwrap_or(0);
    (lo, hi.max(lo))
}

/// One row of raw scores against keys k0.. : scaled where the row may look, -inf elsewhere.
/// Returns the row's largest score (-inf: it sees none of these keys).
#[inline(always)]
fn mask_row<T: Float>(mask: &RowMask, row: RowKeys, k0: usize, s: &mut [T], scale: T) -> T {
    let kn = s.len();
    let a = row.lo.clamp(k0, k0 + kn) - k0;
    let b = row.hi.clamp(k0 + a, k0 + kn) - k0;
    s[..a].fill(T::NEG_INF);
    s[b..].fill(T::NEG_INF);
    s[a..b].iter_mut().for_each(|x| *x *= scale);
    if mask.pad.is_some() || row.seg.is_some() {
        for (j, x) in (k0 + a..k0 + b).zip(&mut s[a..b]) {
            if !mask.keep(row, j) {
                *x = T::NEG_INF;
            }
        }
    }
    s[a..b].iter().fold(T::NEG_INF, |m, x| m.fmax(*x))
}

/// A zeroed block for one head's scores, (BQ, BKV) at most: on the heap, since that block of
/// f64 is 256 KiB, a lot for a rayon thread's stack; and no larger than the head's Tq x Tk,
/// since zeroing the whole block for each of B x H short heads (a decode step's one query, a
/// short training row) cost more than the attention itself.
fn scratch<T: Float>(tq: usize, tk: usize) -> Vec<T> {
    vec![T::ZERO; BQ.min(tq) * BKV.min(tk)]
}

/// Forward of one query head (Tq, D) against its key/value head (Tk, D): BQ query rows at a
/// time, over key blocks of BKV with an online softmax (a running max and sum per row). The
/// block's scores S = q kᵀ and its output P v are GEMMs; `out` gets the normalised output and
/// `lse` each row's logsumexp (-inf, and a zero row, where a row sees no key).
#[inline(always)]
fn fwd_head<T: Float>(mask: &RowMask, q: &[T], k: &[T], v: &[T], out: &mut [T], lse: &mut [T], scale: T) {
    let (tq, d) = (lse.len(), q.len() / lse.len().max(1));
    let one = T::from_f64(1.0);
    let mut s = scratch(tq, k.len() / d.max(1));
    for i0 in (0..tq).step_by(BQ) {
        let n = BQ.min(tq - i0);
        let rows: Vec<RowKeys> = (i0..i0 + n).map(|i| mask.row(i)).collect();
        let (lo, hi) = key_span(&rows);
        let (qb, ob) = (&q[i0 * d..(i0 + n) * d], &mut out[i0 * d..(i0 + n) * d]);
        let (mut m, mut l) = ([T::NEG_INF; BQ], [T::ZERO; BQ]);
        for k0 in (lo..hi).step_by(BKV) {
            let kn = BKV.min(hi - k0);
            let (kb, vb) = (&k[k0 * d..(k0 + kn) * d], &v[k0 * d..(k0 + kn) * d]);
            let sb = &mut s[..n * kn];
            // S (n, kn) = qb (n, D) · kbᵀ (D, kn), kbᵀ read in place.
            gemm_into(sb, kn, (n, kn, d), false, qb, (d, 1), kb, (1, d), one, Parallelism::None);
            for (r, srow) in sb.chunks_exact_mut(kn).enumerate() {
                let mx = mask_row(mask, rows[r], k0, srow, scale);
                if mx == T::NEG_INF {
                    srow.fill(T::ZERO);
                    continue;
                }
                if mx > m[r] {
                    // exp(-inf) = 0 drops nothing on the first visible block: the row and l
                    // are still 0.
                    let alpha = (m[r] - mx).exp();
                    ob[r * d..(r + 1) * d].iter_mut().for_each(|a| *a *= alpha);
                    l[r] *= alpha;
                    m[r] = mx;
                }
                T::exp_shifted(srow, m[r]);
                l[r] += srow.iter().fold(T::ZERO, |acc, x| acc + *x);
            }
            // ob (n, D) += P (n, kn) · vb (kn, D).
            gemm_into(ob, d, (n, d, kn), true, sb, (kn, 1), vb, (d, 1), one, Parallelism::None);
        }
        for r in 0..n {
            if l[r] > T::ZERO {
                let inv = one / l[r];
                ob[r * d..(r + 1) * d].iter_mut().for_each(|a| *a *= inv);
                lse[i0 + r] = m[r] + l[r].ln();
            }
        }
    }
}

/// One query head's rows in the backward: q, dO (Tq, D), logsumexp and D_i (Tq).
struct HeadRows<'a, T> {
    q: &'a [T],
    g: &'a [T],
    lse: &'a [T],
    di: &'a [T],
}

/// Backward of one query head against its key/value head, a (BQ, BKV) block at a time, as five
/// GEMMs: the probabilities P = exp(q kᵀ - lse) are rebuilt, dv += Pᵀ dO, dP = dO vᵀ,
/// dS = P ∘ (dP - D_i), dq += dS k and dk += dSᵀ q (the scale carried into both).
#[allow(clippy::too_many_arguments)]
#[inline(always)]
fn bwd_head<T: Float>(
    mask: &RowMask,
    h: &HeadRows<T>,
    k: &[T],
    v: &[T],
    dq: &mut [T],
    dk: &mut [T],
    dv: &mut [T],
    scale: T,
) {
    let (tq, d) = (h.lse.len(), h.q.len() / h.lse.len().max(1));
    let one = T::from_f64(1.0);
    let tk = k.len() / d.max(1);
    let (mut p, mut ds) = (scratch(tq, tk), scratch(tq, tk));
    for i0 in (0..tq).step_by(BQ) {
        let n = BQ.min(tq - i0);
        // Rows that saw no key have lse = -inf, an output fixed at 0 and no gradient.
        let rows: Vec<RowKeys> = (i0..i0 + n)
            .map(|i| if h.lse[i] == T::NEG_INF { RowKeys { lo: 0, hi: 0, seg: None } } else { mask.row(i) })
            .collect();
        let (lo, hi) = key_span(&rows);
        let (qb, gb) = (&h.q[i0 * d..(i0 + n) * d], &h.g[i0 * d..(i0 + n) * d]);
        let dqb = &mut dq[i0 * d..(i0 + n) * d];
        for k0 in (lo..hi).step_by(BKV) {
            let kn = BKV.min(hi - k0);
            let (kb, vb) = (&k[k0 * d..(k0 + kn) * d], &v[k0 * d..(k0 + kn) * d]);
            let (pb, dsb) = (&mut p[..n * kn], &mut ds[..n * kn]);
            gemm_into(pb, kn, (n, kn, d), false, qb, (d, 1), kb, (1, d), one, Parallelism::None); // S = qb kbᵀ
            for (r, prow) in pb.chunks_exact_mut(kn).enumerate() {
                let i = i0 + r;
                if mask_row(mask, rows[r], k0, prow, scale) == T::NEG_INF {
                    prow.fill(T::ZERO);
                } else {
                    T::exp_shifted(prow, h.lse[i]);
                }
            }
            // dv (kn, D) += Pᵀ (kn, n) · dO (n, D), Pᵀ read in place.
            gemm_into(
                &mut dv[k0 * d..(k0 + kn) * d],
                d,
                (kn, d, n),
                true,
                pb,
                (1, kn),
                gb,
                (d, 1),
                one,
                Parallelism::None,
            );
            // dP (n, kn) = dO (n, D) · vbᵀ (D, kn), then dS in place.
            gemm_into(dsb, kn, (n, kn, d), false, gb, (d, 1), vb, (1, d), one, Parallelism::None);
            for (r, (dsr, pr)) in dsb.chunks_exact_mut(kn).zip(pb.chunks_exact(kn)).enumerate() {
                let di = h.di[i0 + r];
                for (x, &pv) in dsr.iter_mut().zip(pr) {
                    *x = pv * (*x - di) * scale;
                }
            }
            // dq (n, D) += dS (n, kn) · kb (kn, D); dk (kn, D) += dSᵀ (kn, n) · qb (n, D).
            gemm_into(dqb, d, (n, d, kn), true, dsb, (kn, 1), kb, (d, 1), one, Parallelism::None);
            gemm_into(
                &mut dk[k0 * d..(k0 + kn) * d],
                d,
                (kn, d, n),
                true,
                dsb,
                (1, kn),
                qb,
                (d, 1),
                one,
                Parallelism::None,
            );
        }
    }
}

impl candle_core::CustomOp3 for FusedAttention {
    fn name(&self) -> &'static str {
        "fused-attention"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let Dims { b, hq, tq, d, .. } = self.dims;
        let (out, lse) = match candle_core::backend::BackendStorage::dtype(s1) {
            DType::F32 => {
                let (o, l) = self.fwd_layout::<f32>(slice(s1, l1)?, slice(s2, l2)?, slice(s3, l3)?);
                (CpuStorage::F32(o), CpuStorage::F32(l))
            }
            DType::F64 => {
                let (o, l) = self.fwd_layout::<f64>(slice(s1, l1)?, slice(s2, l2)?, slice(s3, l3)?);
                (CpuStorage::F64(o), CpuStorage::F64(l))
            }
            dt => return Err(candle_core::Error::UnsupportedDTypeForOp(dt, "fused-attention")),
        };
        *self.lse.lock().unwrap_or_else(|e| e.into_inner()) = Some(lse);
        let shape = if self.bthd { Shape::from((b, tq, hq * d)) } else { Shape::from((b, hq, tq, d)) };
        Ok((out, shape))
    }

    fn bwd(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        out: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let guard = self.lse.lock().unwrap_or_else(|e| e.into_inner());
        let lse = guard.as_ref().ok_or_else(|| {
            candle_core::Error::wrap(AttentionError::Backward(
                "no saved logsumexp: the forward did not run on CPU".into(),
            ))
        })?;
        let (dq, dk, dv) = match q.dtype() {
            DType::F32 => self.bwd_tensors::<f32>(q, k, v, out, grad, lse)?,
            DType::F64 => self.bwd_tensors::<f64>(q, k, v, out, grad, lse)?,
            dt => return Err(candle_core::Error::UnsupportedDTypeForOp(dt, "fused-attention")),
        };
        Ok((Some(dq), Some(dk), Some(dv)))
    }
}

impl FusedAttention {
    fn bwd_tensors<T: Float>(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        out: &Tensor,
        grad: &Tensor,
        lse: &CpuStorage,
    ) -> candle_core::Result<(Tensor, Tensor, Tensor)> {
        let Dims { hq, hkv, tq, tk, d, .. } = self.dims;
        let host = |t: &Tensor, tt: usize, h: usize| -> candle_core::Result<Vec<T>> {
            in_place(t, |v: &[T]| if self.bthd { gather_heads(v, tt, h, d, h * d, 0) } else { v.to_vec() })
        };
        let (qh, kh, vh) = (host(q, tq, hq)?, host(k, tk, hkv)?, host(v, tk, hkv)?);
        let (oh, gh) = (host(out, tq, hq)?, host(grad, tq, hq)?);
        let (dq, dk, dv) = self.bwd(&qh, &kh, &vh, &oh, &gh, T::cpu_storage_as_slice(lse)?);
        let (dq, dk, dv) = if self.bthd {
            (heads_to_rows(&dq, tq, hq, d), heads_to_rows(&dk, tk, hkv, d), heads_to_rows(&dv, tk, hkv, d))
        } else {
            (dq, dk, dv)
        };
        let cpu = &Device::Cpu;
        Ok((
            Tensor::from_vec(dq, q.shape(), cpu)?,
            Tensor::from_vec(dk, k.shape(), cpu)?,
            Tensor::from_vec(dv, v.shape(), cpu)?,
        ))
    }
}

/// [`FusedAttention`] reading q, k and v out of one packed (B, T, (Hq + 2·Hkv)·D) tensor and
/// writing (B, T, Hq·D); its gradient comes back packed the same way.
struct PackedAttention {
    inner: FusedAttention,
    rope: Option<RopeTables>,
}

/// Rotary tables (Bc, T, D), Bc 1 or B, in the op's dtype.
struct RopeTables {
    cos: Tensor,
    sin: Tensor,
}

impl PackedAttention {
    /// q, k, v as (B, H, T, D) from the packed rows, q and k rotated when there are tables.
    fn split<T: Float>(&self, x: &[T]) -> candle_core::Result<[Vec<T>; 3]> {
        let Dims { hq, hkv, tq: t, d, .. } = self.inner.dims;
        let w = (hq + 2 * hkv) * d;
        let (q, k) = (gather_heads(x, t, hq, d, w, 0), gather_heads(x, t, hkv, d, w, hq * d));
        let (q, k) = (self.rotate(q, hq, false)?, self.rotate(k, hkv, false)?);
        Ok([q, k, gather_heads(x, t, hkv, d, w, (hq + hkv) * d)])
    }

    /// (B, h, T, D) heads through the rotation, or with `backward` its transpose (the gradient
    /// of the unrotated heads from that of the rotated ones); as they are without tables.
    fn rotate<T: Float>(&self, x: Vec<T>, h: usize, backward: bool) -> candle_core::Result<Vec<T>> {
        let Some(r) = &self.rope else { return Ok(x) };
        let Dims { tq: t, d, .. } = self.inner.dims;
        let cb = r.cos.dim(0)?;
        in_place(&r.cos, |cos: &[T]| {
            in_place(&r.sin, |sin: &[T]| crate::rope::rotated(&x, (h, t, d), cos, sin, cb, backward, T::ZERO))
        })?
    }

    fn fwd<T: Float>(&self, x: &[T]) -> candle_core::Result<(Vec<T>, Vec<T>)> {
        let Dims { hq, tq, d, .. } = self.inner.dims;
        let [q, k, v] = self.split(x)?;
        let (out, lse) = self.inner.fwd(&q, &k, &v);
        Ok((heads_to_rows(&out, tq, hq, d), lse))
    }

    fn bwd_tensor<T: Float>(
        &self,
        x: &Tensor,
        out: &Tensor,
        grad: &Tensor,
        lse: &CpuStorage,
    ) -> candle_core::Result<Tensor> {
        let Dims { hq, hkv, tq: t, d, .. } = self.inner.dims;
        let [q, k, v] = in_place(x, |x: &[T]| self.split(x))??;
        let rows = |y: &Tensor| in_place(y, |y: &[T]| gather_heads(y, t, hq, d, hq * d, 0));
        let (o, g) = (rows(out)?, rows(grad)?);
        let (dq, dk, dv) = self.inner.bwd(&q, &k, &v, &o, &g, T::cpu_storage_as_slice(lse)?);
        let (dq, dk) = (self.rotate(dq, hq, true)?, self.rotate(dk, hkv, true)?);
        let w = (hq + 2 * hkv) * d;
        let mut dx = vec![T::ZERO; x.elem_count()];
        scatter_heads(&dq, &mut dx, t, hq, d, w, 0);
        scatter_heads(&dk, &mut dx, t, hkv, d, w, hq * d);
        scatter_heads(&dv, &mut dx, t, hkv, d, w, (hq + hkv) * d);
        Tensor::from_vec(dx, x.shape(), &Device::Cpu)
    }
}

impl candle_core::CustomOp1 for PackedAttention {
    fn name(&self) -> &'static str {
        "fused-attention-packed"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let Dims { b, hq, tq, d, .. } = self.inner.dims;
        let (out, lse) = match candle_core::backend::BackendStorage::dtype(s) {
            DType::F32 => {
                let (o, l) = self.fwd::<f32>(slice(s, l)?)?;
                (CpuStorage::F32(o), CpuStorage::F32(l))
            }
            DType::F64 => {
                let (o, l) = self.fwd::<f64>(slice(s, l)?)?;
                (CpuStorage::F64(o), CpuStorage::F64(l))
            }
            dt => return Err(candle_core::Error::UnsupportedDTypeForOp(dt, "fused-attention-packed")),
        };
        *self.inner.lse.lock().unwrap_or_else(|e| e.into_inner()) = Some(lse);
        Ok((out, Shape::from((b, tq, hq * d))))
    }

    fn bwd(&self, x: &Tensor, out: &Tensor, grad: &Tensor) -> candle_core::Result<Option<Tensor>> {
        let guard = self.inner.lse.lock().unwrap_or_else(|e| e.into_inner());
        let lse = guard.as_ref().ok_or_else(|| {
            candle_core::Error::wrap(AttentionError::Backward(
                "no saved logsumexp: the forward did not run on CPU".into(),
            ))
        })?;
        Ok(Some(match x.dtype() {
            DType::F32 => self.bwd_tensor::<f32>(x, out, grad, lse)?,
            DType::F64 => self.bwd_tensor::<f64>(x, out, grad, lse)?,
            dt => return Err(candle_core::Error::UnsupportedDTypeForOp(dt, "fused-attention-packed")),
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::{AttnOpts, Dims, Float};
    use candle_core::{DType, Device};

    /// The mask, stated directly from its definition: the device masks and, through the composed
    /// path, the kernels' key ranges are checked against it.
    fn allowed(dims: &Dims, opts: &AttnOpts, r: usize, i: usize, j: usize) -> bool {
        let p = (dims.tk + i) as isize - dims.tq as isize;
        let j = j as isize;
        if opts.causal && j > p {
            return false;
        }
        if opts.window > 0 && p - j >= opts.window as isize {
            return false;
        }
        if let Some(kp) = &opts.key_padding {
            if kp[r * dims.tk + j as usize] {
                return false;
            }
        }
        if let Some((qs, ks)) = &opts.segments {
            let s = qs[r * dims.tq + i];
            if s == 0 {
                return j == p;
            }
            return ks[r * dims.tk + j as usize] == s;
        }
        true
    }

    /// The masks the composed path builds on the device are the definition's, for every kind
    /// of option, with queries following a cache (Tq < Tk) and rows that see no key.
    #[test]
    fn device_masks_follow_the_definition() {
        let (b, tq, tk) = (2, 5, 8);
        let segs = |n: usize| -> Vec<u32> { (0..b * n).map(|i| [1, 1, 2, 0, 2, 3, 3, 1][i % 8]).collect() };
        let options = [
            AttnOpts::new(1.0),
            AttnOpts::causal(4, 0),
            AttnOpts { window: 3, ..AttnOpts::causal(4, 0) },
            AttnOpts { window: 2, ..AttnOpts::new(1.0) },
            AttnOpts {
                key_padding: Some((0..b * tk).map(|i| i % 3 == 0 || i >= tk).collect()),
                ..AttnOpts::causal(4, 0)
            },
            AttnOpts { segments: Some((segs(tq), segs(tk))), ..AttnOpts::causal(4, 2) },
        ];
        for opts in options {
            let dims = Dims { b, hq: 1, hkv: 1, tq, tk, d: 4 };
            let m = crate::attention_chunked::device_mask(b, tq, tk, &opts, DType::F32, &Device::Cpu).unwrap();
            let bias = m.bias.broadcast_as((b, 1, tq, tk)).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
            let alive = m.alive.broadcast_as((b, 1, tq, 1)).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
            for r in 0..b {
                for i in 0..tq {
                    let any = (0..tk).any(|j| allowed(&dims, &opts, r, i, j));
                    assert_eq!(alive[r * tq + i], f32::from(u8::from(any)), "{opts:?} row {r} query {i}");
                    for j in 0..tk {
                        let open = allowed(&dims, &opts, r, i, j) || !any;
                        let want = if open { 0.0 } else { f32::NEG_INFINITY };
                        assert_eq!(bias[(r * tq + i) * tk + j], want, "{opts:?} row {r} query {i} key {j}");
                    }
                }
            }
        }
    }

    /// The polynomial f32 exp within 2 ulp of the true value over the range softmax uses, 0 for
    /// masked (-inf) scores, NaN kept.
    #[test]
    fn f32_exp_is_accurate_and_masks() {
        let xs: Vec<f32> = (0..20_000).map(|i| -90.0 + i as f32 * 0.0047).chain([0.0, -0.0, 1e-8, 5.0]).collect();
        let mut ys = xs.clone();
        f32::exp_shifted(&mut ys, 0.0);
        for (x, y) in xs.iter().zip(&ys) {
            let want = (*x as f64).exp();
            if *x < -87.0 {
                assert_eq!(*y, 0.0, "exp({x})");
            } else {
                let err = (*y as f64 - want).abs() / want;
                assert!(err < 2.5e-7, "exp({x}) = {y}, want {want}: relative error {err:e}");
            }
        }
        let mut special = [f32::NEG_INFINITY, f32::NAN, 3.0];
        f32::exp_shifted(&mut special, 1.0);
        assert_eq!(special[0], 0.0);
        assert!(special[1].is_nan());
        assert!((special[2] - 2f32.exp()).abs() < 1e-6);
    }
}
