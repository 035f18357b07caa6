//! LayerNorm and RMSNorm over the last dim. The backward recomputes each row's statistics
//! from x (one extra read of a row already in cache) rather than keeping them from the forward.

use crate::float::{dispatch, fused, rows_per_task, simd, slice, Float};
use candle_core::{CpuStorage, CustomOp2, CustomOp3, Layout, Result, Shape, Tensor, D};
use rayon::prelude::*;

/// LayerNorm over the last dim with PyTorch's biased variance: (x - mean) / sqrt(var + eps) * w + b.
pub fn layer_norm(x: &Tensor, w: &Tensor, b: Option<&Tensor>, eps: f64) -> Result<Tensor> {
    let mut all = vec![x, w];
    all.extend(b);
    if !fused(&all) || x.rank() == 0 {
        let mean = x.mean_keepdim(D::Minus1)?;
        let xc = x.broadcast_sub(&mean)?;
        let var = xc.sqr()?.mean_keepdim(D::Minus1)?;
        let y = xc.broadcast_div(&(var + eps)?.sqrt()?)?.broadcast_mul(w)?;
        return match b {
            Some(b) => y.broadcast_add(b),
            None => Ok(y),
        };
    }
    let op = NormOp { rms: false, eps };
    let x2 = rows(x, w, b)?;
    let y = match b {
        Some(b) => x2.apply_op3(&w.contiguous()?, &b.contiguous()?, op)?,
        None => x2.apply_op2(&w.contiguous()?, op)?,
    };
    y.reshape(x.shape())
}

/// RMSNorm over the last dim as in HF's LlamaRMSNorm: x / sqrt(mean(x^2) + eps) * w.
pub fn rms_norm(x: &Tensor, w: &Tensor, eps: f64) -> Result<Tensor> {
    if !fused(&[x, w]) || x.rank() == 0 {
        let ms = x.sqr()?.mean_keepdim(D::Minus1)?;
        return x.broadcast_div(&(ms + eps)?.sqrt()?)?.broadcast_mul(w);
    }
    let x2 = rows(x, w, None)?;
    x2.apply_op2(&w.contiguous()?, NormOp { rms: true, eps })?.reshape(x.shape())
}

/// x as contiguous rows (N, C), after checking the gain (and bias) are (C,).
fn rows(x: &Tensor, w: &Tensor, b: Option<&Tensor>) -> Result<Tensor> {
    let c = x.dim(D::Minus1)?;
    for (what, t) in [("weight", Some(w)), ("bias", b)] {
        if let Some(t) = t {
            if t.dims() != [c] {
                return Err(crate::bad("norm", format!("{what} of shape {:?} for rows of {c}", t.dims())));
            }
        }
    }
    x.contiguous()?.reshape(((), c))
}

struct NormOp {
    rms: bool,
    eps: f64,
}

/// (mean, 1 / sqrt(var + eps)) of one row; the mean is 0 for RMSNorm. Sums run in f64 so that
/// long rows of f32 keep their precision, over 8 lanes in a fixed order so that they vectorise.
#[inline(always)]
fn stats<T: Float>(row: &[T], rms: bool, eps: f64) -> (T, T) {
    let n = row.len() as f64;
    let mean = if rms { 0.0 } else { lane_sum(row, |v| v.to_f64()) / n };
    let var = lane_sum(row, |v| {
        let d = v.to_f64() - mean;
        d * d
    }) / n;
    (T::from_f64(mean), T::from_f64(1.0 / (var + eps).sqrt()))
}

/// Σ f(v) over the row in 8 f64 lanes, added up in a fixed order.
#[inline(always)]
fn lane_sum<T: Float>(row: &[T], f: impl Fn(T) -> f64) -> f64 {
    let mut lanes = [0f64; 8];
    let mut chunks = row.chunks_exact(8);
    for ch in &mut chunks {
        for (l, &v) in lanes.iter_mut().zip(ch) {
            *l += f(v);
        }
    }
    chunks.remainder().iter().fold(lanes.iter().sum::<f64>(), |s, &v| s + f(v))
}

impl NormOp {
    fn name(&self) -> &'static str {
        if self.rms {
            "taper-rms-norm"
        } else {
            "taper-layer-norm"
        }
    }

    fn fwd<T: Float>(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        ws: &CpuStorage,
        wl: &Layout,
        b: Option<(&CpuStorage, &Layout)>,
    ) -> Result<(CpuStorage, Shape)> {
        let x = slice::<T>(self.name(), xs, xl)?;
        let w = slice::<T>(self.name(), ws, wl)?;
        let b = b.map(|(s, l)| slice::<T>(self.name(), s, l)).transpose()?;
        let c = w.len();
        let mut y = vec![T::ZERO; x.len()];
        if c > 0 {
            let chunk = rows_per_task(c) * c;
            let (rms, eps) = (self.rms, self.eps);
            y.par_chunks_mut(chunk).zip(x.par_chunks(chunk)).for_each(|(yc, xc)| {
                simd!(<T: Float> (yc: &mut [T] = yc, xc: &[T] = xc, w: &[T] = w, b: Option<&[T]> = b,
                    rms: bool = rms, eps: f64 = eps) {
                    let c = w.len();
                    for (yr, xr) in yc.chunks_mut(c).zip(xc.chunks(c)) {
                        let (mean, rstd) = stats(xr, rms, eps);
                        match b {
                            Some(b) => {
                                for (((o, &v), &wv), &bv) in yr.iter_mut().zip(xr).zip(w).zip(b) {
                                    *o = (v - mean) * rstd * wv + bv;
                                }
                            }
                            None => {
                                for ((o, &v), &wv) in yr.iter_mut().zip(xr).zip(w) {
                                    *o = (v - mean) * rstd * wv;
                                }
                            }
                        }
                    }
                })
            });
        }
        Ok((T::storage(y), xl.shape().clone()))
    }

    /// (dx, dw, db) for the rows of x (N, C) and their incoming gradient, packed as (N + 2, C).
    fn backward(&self, x: &Tensor, w: &Tensor, grad: &Tensor) -> Result<(Tensor, Tensor, Tensor)> {
        let n = x.dim(0)?;
        let packed = x.apply_op3_no_bwd(w, &grad.contiguous()?, &NormBwd { rms: self.rms, eps: self.eps })?;
        Ok((packed.narrow(0, 0, n)?, packed.get(n)?, packed.get(n + 1)?))
    }
}

impl CustomOp2 for NormOp {
    fn name(&self) -> &'static str {
        NormOp::name(self)
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> Result<(CpuStorage, Shape)> {
        dispatch!(NormOp::name(self), s1, T => self.fwd::<T>(s1, l1, s2, l2, None))
    }

    fn bwd(&self, x: &Tensor, w: &Tensor, _y: &Tensor, grad: &Tensor) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let (dx, dw, _) = self.backward(x, w, grad)?;
        Ok((Some(dx), Some(dw)))
    }
}

impl CustomOp3 for NormOp {
    fn name(&self) -> &'static str {
        NormOp::name(self)
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
        dispatch!(NormOp::name(self), s1, T => self.fwd::<T>(s1, l1, s2, l2, Some((s3, l3))))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _b: &Tensor,
        _y: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (dx, dw, db) = self.backward(x, w, grad)?;
        Ok((Some(dx), Some(dw), Some(db)))
    }
}

/// Rows per partial sum of dw and db: fixed, not tied to the thread count, so that the sums
/// are added in the same order on every machine and a run is reproducible bit for bit.
const GRAD_ROWS: usize = 32;

struct NormBwd {
    rms: bool,
    eps: f64,
}

impl NormBwd {
    fn run<T: Float>(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        ws: &CpuStorage,
        wl: &Layout,
        gs: &CpuStorage,
        gl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let name = "taper-norm-bwd";
        let x = slice::<T>(name, xs, xl)?;
        let w = slice::<T>(name, ws, wl)?;
        let g = slice::<T>(name, gs, gl)?;
        let c = w.len();
        let n = x.len().checked_div(c).unwrap_or(0);
        let mut out = vec![T::ZERO; (n + 2) * c];
        if c == 0 {
            return Ok((T::storage(out), Shape::from((n + 2, c))));
        }
        let (dx, tail) = out.split_at_mut(n * c);
        let chunk = GRAD_ROWS * c;
        let partials: Vec<Vec<f64>> = dx
            .par_chunks_mut(chunk)
            .zip(x.par_chunks(chunk).zip(g.par_chunks(chunk)))
            .map(|(dc, (xc, gc))| {
                // [dw; db] over this chunk's rows.
                let mut acc = vec![0f64; 2 * c];
                simd!(<T: Float> (acc: &mut [f64] = &mut acc, dc: &mut [T] = dc, xc: &[T] = xc, gc: &[T] = gc,
                    w: &[T] = w, rms: bool = self.rms, eps: f64 = self.eps) {
                    let c = w.len();
                    let (adw, adb) = acc.split_at_mut(c);
                    for ((dr, xr), gr) in dc.chunks_mut(c).zip(xc.chunks(c)).zip(gc.chunks(c)) {
                        let (mean, rstd) = stats(xr, rms, eps);
                        // dw, db, and Σ g w, Σ g w xhat over the row in 8 lanes.
                        let (mut l1, mut l2) = ([0f64; 8], [0f64; 8]);
                        for (j, (((&xv, &gv), &wv), (dw, db))) in
                            xr.iter().zip(gr).zip(w).zip(adw.iter_mut().zip(adb.iter_mut())).enumerate()
                        {
                            let xhat = ((xv - mean) * rstd).to_f64();
                            let gw = (gv * wv).to_f64();
                            l1[j % 8] += gw;
                            l2[j % 8] += gw * xhat;
                            *dw += gv.to_f64() * xhat;
                            *db += gv.to_f64();
                        }
                        let (s1, s2) = (l1.iter().sum::<f64>(), l2.iter().sum::<f64>());
                        let (m1, m2) = (T::from_f64(s1 / c as f64), T::from_f64(s2 / c as f64));
                        let m1 = if rms { T::ZERO } else { m1 };
                        for (((o, &xv), &gv), &wv) in dr.iter_mut().zip(xr).zip(gr).zip(w) {
                            let xhat = (xv - mean) * rstd;
                            *o = rstd * (gv * wv - m1 - xhat * m2);
                        }
                    }
                });
                acc
            })
            .collect();
        let mut sums = vec![0f64; 2 * c];
        for p in &partials {
            sums.iter_mut().zip(p).for_each(|(s, v)| *s += v);
        }
        tail.iter_mut().zip(&sums).for_each(|(o, &v)| *o = T::from_f64(v));
        Ok((T::storage(out), Shape::from((n + 2, c))))
    }
}

impl CustomOp3 for NormBwd {
    fn name(&self) -> &'static str {
        "taper-norm-bwd"
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
