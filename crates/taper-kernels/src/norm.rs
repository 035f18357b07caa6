//! LayerNorm and RMSNorm over the last dim. The backward recomputes each row's statistics
//! from x (one extra read of a row already in cache) rather than keeping them from the forward.

use crate::float::{dispatch, fused, rows_per_task, simd, slice, twin, Float};
use candle_core::{CpuStorage, CustomOp2, CustomOp3, Layout, Result, Shape, Tensor, D};
use rayon::prelude::*;

/// The CUDA twins' module, cuda/norm.cu.
#[cfg(feature = "cuda")]
const NORM_PTX: (&str, &str) = ("taper_norm", crate::ptx::NORM);

/// Threads per row of the CUDA kernels.
#[cfg(feature = "cuda")]
const NORM_THREADS: u32 = 256;

/// Rows per partial sum of dw and db in the CUDA backward (NORM_GRAD_ROWS in cuda/norm.cu).
#[cfg(feature = "cuda")]
const NORM_GRAD_ROWS: usize = 64;

/// LayerNorm over the last dim with PyTorch's biased variance: (x - mean) / sqrt(var + eps) * w + b.
pub fn layer_norm(x: &Tensor, w: &Tensor, b: Option<&Tensor>, eps: f64) -> Result<Tensor> {
    let mut all = vec![x, w];
    all.extend(b);
    if !(fused(&all) || twin(&all)) || x.rank() == 0 {
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
    if !(fused(&[x, w]) || twin(&[x, w])) || x.rank() == 0 {
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

    /// The forward on the GPU: one block per row.
    #[cfg(feature = "cuda")]
    fn cuda_run(
        &self,
        xs: &candle_core::CudaStorage,
        xl: &Layout,
        ws: &candle_core::CudaStorage,
        wl: &Layout,
        b: Option<(&candle_core::CudaStorage, &Layout)>,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        use crate::cuda::{cuda_dispatch, output, per_row, suffix, view};
        use candle_core::backend::BackendStorage;
        use candle_core::cuda_backend::cudarc::driver::PushKernelArg;
        use candle_core::cuda_backend::WrapErr;
        let op = NormOp::name(self);
        let (dev, dt) = (xs.device().clone(), xs.dtype());
        let c = wl.shape().elem_count();
        let len = xl.shape().elem_count();
        let rows = cuda_rows(op, len, c)?;
        if b.is_some_and(|(_, l)| l.shape().elem_count() != c) {
            return Err(crate::bad(op, "bias and weight of different sizes"));
        }
        let func = dev.get_or_load_custom_func(&format!("norm_fwd_{}", suffix(op, dt)?), NORM_PTX.0, NORM_PTX.1)?;
        cuda_dispatch!(op, dt, T => {
            let x = view::<T>(op, xs, xl)?;
            let w = view::<T>(op, ws, wl)?;
            let bv = b.map(|(s, l)| view::<T>(op, s, l)).transpose()?;
            let mut y = output::<T>(&dev, len)?;
            if len > 0 {
                let (rows64, c64, eps) = (rows as u64, c as u64, self.eps as f32);
                let (rms, has_b) = (self.rms as i32, bv.is_some() as i32);
                let mut bld = func.builder();
                // Without a bias the kernel reads none, and w stands in for the pointer.
                bld.arg(&x).arg(&w).arg(bv.as_ref().unwrap_or(&w)).arg(&mut y);
                bld.arg(&rows64).arg(&c64).arg(&rms).arg(&has_b).arg(&eps);
                // SAFETY: norm_fwd takes (x, w, b, y, rows, c, rms, has_b, eps) and writes all rows x c of y.
                unsafe { bld.launch(per_row(op, rows, NORM_THREADS)?) }.w()?;
            }
            Ok((candle_core::CudaStorage::wrap_cuda_slice(y, dev.clone()), xl.shape().clone()))
        })
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

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        self.cuda_run(s1, l1, s2, l2, None)
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

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
        s3: &candle_core::CudaStorage,
        l3: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        self.cuda_run(s1, l1, s2, l2, Some((s3, l3)))
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

    /// The backward on the GPU, packed as on the CPU: dx row by row (which also leaves each
    /// row's mean and rstd in an f32 scratch), then dw and db in two passes, partial sums over
    /// fixed chunks of rows and their sum in chunk order, so that a run is reproducible.
    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        xs: &candle_core::CudaStorage,
        xl: &Layout,
        ws: &candle_core::CudaStorage,
        wl: &Layout,
        gs: &candle_core::CudaStorage,
        gl: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        use crate::cuda::{cuda_dispatch, output, per_element, per_row, suffix, view};
        use candle_core::backend::BackendStorage;
        use candle_core::cuda_backend::cudarc::driver::{LaunchConfig, PushKernelArg};
        use candle_core::cuda_backend::WrapErr;
        let op = self.name();
        let (dev, dt) = (xs.device().clone(), xs.dtype());
        let c = wl.shape().elem_count();
        let len = xl.shape().elem_count();
        let n = cuda_rows(op, len, c)?;
        if gl.shape().elem_count() != len {
            return Err(crate::bad(op, "x and its gradient of different sizes"));
        }
        let sfx = suffix(op, dt)?;
        let load = |name: &str| dev.get_or_load_custom_func(&format!("{name}_{sfx}"), NORM_PTX.0, NORM_PTX.1);
        let (rows_f, partial_f, cols_f) = (load("norm_bwd_rows")?, load("norm_bwd_partial")?, load("norm_bwd_cols")?);
        let chunks = n.div_ceil(NORM_GRAD_ROWS);
        let (n64, c64, chunks64, rms, eps) = (n as u64, c as u64, chunks as u64, self.rms as i32, self.eps as f32);
        cuda_dispatch!(op, dt, T => {
            let x = view::<T>(op, xs, xl)?;
            let w = view::<T>(op, ws, wl)?;
            let g = view::<T>(op, gs, gl)?;
            let mut out = output::<T>(&dev, (n + 2) * c)?; // (N + 2, C)
            if c > 0 {
                let mut stats = output::<f32>(&dev, 2 * n)?; // (N, 2)
                let mut partial = output::<f32>(&dev, chunks * 2 * c)?; // (chunks, 2, C)
                if n > 0 {
                    let mut bld = rows_f.builder();
                    bld.arg(&x).arg(&w).arg(&g).arg(&mut out).arg(&mut stats);
                    bld.arg(&n64).arg(&c64).arg(&rms).arg(&eps);
                    // SAFETY: norm_bwd_rows takes (x, w, g, dx, stats, rows, c, rms, eps) and writes
                    // the first N x C of out and all of stats.
                    unsafe { bld.launch(per_row(op, n, NORM_THREADS)?) }.w()?;
                    let cfg = LaunchConfig {
                        grid_dim: (chunks as u32, c.div_ceil(NORM_THREADS as usize) as u32, 1),
                        block_dim: (NORM_THREADS, 1, 1),
                        shared_mem_bytes: 0,
                    };
                    let mut bld = partial_f.builder();
                    bld.arg(&x).arg(&g).arg(&stats).arg(&mut partial).arg(&n64).arg(&c64);
                    // SAFETY: norm_bwd_partial takes (x, g, stats, partial, rows, c) and writes
                    // every (chunk, 2, column) of partial.
                    unsafe { bld.launch(cfg) }.w()?;
                }
                let mut tail = out.slice_mut(n * c..);
                let mut bld = cols_f.builder();
                bld.arg(&partial).arg(&mut tail).arg(&chunks64).arg(&c64);
                // SAFETY: norm_bwd_cols takes (partial, out, chunks, c) and writes the 2 x C of
                // [dw; db] (zeros when there are no rows).
                unsafe { bld.launch(per_element(op, 2 * c)?) }.w()?;
            }
            Ok((candle_core::CudaStorage::wrap_cuda_slice(out, dev.clone()), Shape::from((n + 2, c))))
        })
    }
}

/// The rows of `len` elements of width `c`, for the CUDA kernels (0 when c is 0, as on the CPU).
#[cfg(feature = "cuda")]
fn cuda_rows(op: &'static str, len: usize, c: usize) -> Result<usize> {
    let n = len.checked_div(c).unwrap_or(0);
    if n * c != len {
        return Err(crate::bad(op, format!("{len} elements are not rows of {c}")));
    }
    Ok(n)
}
