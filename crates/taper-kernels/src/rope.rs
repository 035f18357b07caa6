//! Rotary embedding in the rotate-half layout (HF Llama): y = x cos + rotate_half(x) sin,
//! rotate_half(x) = [-x2, x1] for the halves x1, x2 of each head vector.

use crate::float::{dispatch, fused, rows_per_task, slice, twin, Float};
use candle_core::{CpuStorage, CustomOp3, Layout, Result, Shape, Tensor, D};
use rayon::prelude::*;

/// The CUDA twins' module, cuda/rope.cu.
#[cfg(feature = "cuda")]
const ROPE_PTX: (&str, &str) = ("taper_rope", crate::ptx::ROPE);

/// x: (B, H, T, D); cos, sin: (T, D), or (B, 1, T, D) for rows with positions of their own
/// (packed sequences). cos and sin are constants: they get no gradient.
pub fn rope(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    let kernel = fused(&[x, cos, sin]) || twin(&[x, cos, sin]);
    let tables = if kernel && !cos.track_op() && !sin.track_op() { tables(x, cos)? } else { None };
    let Some(shape) = tables else {
        let d = x.dim(D::Minus1)?;
        let x1 = x.narrow(D::Minus1, 0, d / 2)?;
        let x2 = x.narrow(D::Minus1, d / 2, d / 2)?;
        let rotated = Tensor::cat(&[&x2.neg()?, &x1], D::Minus1)?;
        return x.broadcast_mul(cos)? + rotated.broadcast_mul(sin)?;
    };
    let cos = cos.contiguous()?.reshape(shape)?;
    let sin = sin.contiguous()?.reshape(shape)?;
    x.contiguous()?.apply_op3(&cos, &sin, Rope { backward: false })
}

/// The tables' shape as (Bc, T, D) with Bc 1 or B, when x and the tables fit the kernel.
fn tables(x: &Tensor, cos: &Tensor) -> Result<Option<(usize, usize, usize)>> {
    let Ok((b, _, t, d)) = x.dims4() else { return Ok(None) };
    Ok(table_shape((b, t, d), cos))
}

/// [`tables`] for heads of B rows, T positions and D dims.
pub(crate) fn table_shape((b, t, d): (usize, usize, usize), cos: &Tensor) -> Option<(usize, usize, usize)> {
    if d % 2 != 0 {
        return None;
    }
    match cos.dims() {
        [ct, cd] if (*ct, *cd) == (t, d) => Some((1, t, d)),
        [cb, 1, ct, cd] if (*cb == b || *cb == 1) && (*ct, *cd) == (t, d) => Some((*cb, t, d)),
        _ => None,
    }
}

/// The forward, or with `backward` its transpose: dx = g cos + rotate_half^T(g sin), where
/// rotate_half^T(u) = [u2, -u1].
struct Rope {
    backward: bool,
}

impl Rope {
    fn run<T: Float>(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        cs: &CpuStorage,
        cl: &Layout,
        ss: &CpuStorage,
        sl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let x = slice::<T>(self.name(), xs, xl)?;
        let cos = slice::<T>(self.name(), cs, cl)?;
        let sin = slice::<T>(self.name(), ss, sl)?;
        let (_, h, t, d) = xl.shape().dims4()?;
        let cb = cl.shape().dims3()?.0;
        let y = rotated(x, (h, t, d), cos, sin, cb, self.backward, T::ZERO);
        Ok((T::storage(y), xl.shape().clone()))
    }
}

/// What the rotation needs of an element type: both kernel families' f32 and f64 have it.
pub(crate) trait Rotatable:
    Copy + Send + Sync + std::ops::Add<Output = Self> + std::ops::Sub<Output = Self> + std::ops::Mul<Output = Self>
{
}
impl<T> Rotatable for T where
    T: Copy + Send + Sync + std::ops::Add<Output = T> + std::ops::Sub<Output = T> + std::ops::Mul<Output = T>
{
}

/// x (B, H, T, D) rotated by the tables (Bc, T, D), Bc 1 or B: the forward, or with `backward`
/// its transpose.
pub(crate) fn rotated<T: Rotatable>(
    x: &[T],
    (h, t, d): (usize, usize, usize),
    cos: &[T],
    sin: &[T],
    cb: usize,
    backward: bool,
    zero: T,
) -> Vec<T> {
    let half = d / 2;
    let mut y = vec![zero; x.len()];
    if d > 0 {
        let per = rows_per_task(d);
        y.par_chunks_mut(per * d).zip(x.par_chunks(per * d)).enumerate().for_each(|(ci, (yc, xc))| {
            for (ri, (yr, xr)) in yc.chunks_mut(d).zip(xc.chunks(d)).enumerate() {
                // Row r of x is (b, h, t); its table row is (b or 0, t).
                let r = ci * per + ri;
                let (bi, ti) = (r / (h * t), r % t);
                let tr = (if cb == 1 { 0 } else { bi }) * t + ti;
                let (cr, sr) = (&cos[tr * d..(tr + 1) * d], &sin[tr * d..(tr + 1) * d]);
                let (x1, x2) = xr.split_at(half);
                let (y1, y2) = yr.split_at_mut(half);
                rotate(backward, x1, x2, y1, y2, cr, sr);
            }
        });
    }
    y
}

/// One head vector: the forward, or its transpose. Eight slices run in step, clearer by index.
#[allow(clippy::needless_range_loop)]
#[inline(always)]
fn rotate<T: Rotatable>(backward: bool, x1: &[T], x2: &[T], y1: &mut [T], y2: &mut [T], cr: &[T], sr: &[T]) {
    let half = x1.len();
    if backward {
        for i in 0..half {
            y1[i] = x1[i] * cr[i] + x2[i] * sr[half + i];
            y2[i] = x2[i] * cr[half + i] - x1[i] * sr[i];
        }
    } else {
        for i in 0..half {
            y1[i] = x1[i] * cr[i] - x2[i] * sr[i];
            y2[i] = x2[i] * cr[half + i] + x1[i] * sr[half + i];
        }
    }
}

impl CustomOp3 for Rope {
    fn name(&self) -> &'static str {
        if self.backward {
            "taper-rope-bwd"
        } else {
            "taper-rope"
        }
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

    /// One thread per pair (i, i + D/2) of a head vector.
    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        xs: &candle_core::CudaStorage,
        xl: &Layout,
        cs: &candle_core::CudaStorage,
        cl: &Layout,
        ss: &candle_core::CudaStorage,
        sl: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        use crate::cuda::{cuda_dispatch, output, suffix, view};
        use candle_core::backend::BackendStorage;
        use candle_core::cuda_backend::cudarc::driver::PushKernelArg;
        use candle_core::cuda_backend::WrapErr;
        let op = self.name();
        let (dev, dt) = (xs.device().clone(), xs.dtype());
        let (b, h, t, d) = xl.shape().dims4()?;
        let (cb, ct, cd) = cl.shape().dims3()?;
        if d % 2 != 0 || (ct, cd) != (t, d) || !(cb == 1 || cb == b) || sl.shape() != cl.shape() {
            return Err(crate::bad(op, format!("tables {:?} for heads {:?}", cl.dims(), xl.dims())));
        }
        let len = xl.shape().elem_count();
        let rows = b * h * t;
        let cfg = crate::cuda::per_element(op, rows * (d / 2))?;
        let func = dev.get_or_load_custom_func(&format!("rope_{}", suffix(op, dt)?), ROPE_PTX.0, ROPE_PTX.1)?;
        cuda_dispatch!(op, dt, T => {
            let x = view::<T>(op, xs, xl)?;
            let cos = view::<T>(op, cs, cl)?;
            let sin = view::<T>(op, ss, sl)?;
            let mut y = output::<T>(&dev, len)?;
            if len > 0 {
                let (rows64, h64, t64, d64, cb64) = (rows as u64, h as u64, t as u64, d as u64, cb as u64);
                let backward = self.backward as i32;
                let mut bld = func.builder();
                bld.arg(&x).arg(&cos).arg(&sin).arg(&mut y);
                bld.arg(&rows64).arg(&h64).arg(&t64).arg(&d64).arg(&cb64).arg(&backward);
                // SAFETY: rope takes (x, cos, sin, y, rows, h, t, d, cb, backward); its rows x D/2
                // threads each write both elements of their pair, all of y.
                unsafe { bld.launch(cfg) }.w()?;
            }
            Ok((candle_core::CudaStorage::wrap_cuda_slice(y, dev.clone()), xl.shape().clone()))
        })
    }

    fn bwd(
        &self,
        _x: &Tensor,
        cos: &Tensor,
        sin: &Tensor,
        _y: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let dx = grad.contiguous()?.apply_op3_no_bwd(cos, sin, &Rope { backward: true })?;
        Ok((Some(dx), None, None))
    }
}
