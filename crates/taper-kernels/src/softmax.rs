//! Softmax and log-softmax over the last dim, one pass per row in, one out.

use crate::float::{dispatch, fused, rows_per_task, slice, twin, Float};
use candle_core::{CpuStorage, CustomOp1, CustomOp2, Layout, Result, Shape, Tensor, D};
use rayon::prelude::*;

/// The CUDA twins' module, cuda/softmax.cu.
#[cfg(feature = "cuda")]
const SOFTMAX_PTX: (&str, &str) = ("taper_softmax", crate::ptx::SOFTMAX);

/// softmax(x) over the last dim, with a backward.
pub fn softmax_last_dim(x: &Tensor) -> Result<Tensor> {
    if !(fused(&[x]) || twin(&[x])) || x.rank() == 0 {
        let max = x.max_keepdim(D::Minus1)?.detach();
        let e = x.broadcast_sub(&max)?.exp()?;
        return e.broadcast_div(&e.sum_keepdim(D::Minus1)?);
    }
    x.contiguous()?.apply_op1(Softmax { log: false })
}

/// log(softmax(x)) over the last dim, with a backward.
pub fn log_softmax(x: &Tensor) -> Result<Tensor> {
    if !(fused(&[x]) || twin(&[x])) || x.rank() == 0 {
        let max = x.max_keepdim(D::Minus1)?.detach();
        let shifted = x.broadcast_sub(&max)?;
        let lse = shifted.exp()?.sum_keepdim(D::Minus1)?.log()?;
        return shifted.broadcast_sub(&lse);
    }
    x.contiguous()?.apply_op1(Softmax { log: true })
}

struct Softmax {
    log: bool,
}

/// max and log(sum(exp(x - max))) of one row.
#[inline]
pub(crate) fn row_max_lse<T: Float>(row: &[T]) -> (T, T) {
    let max = row.iter().fold(T::from_f64(f64::NEG_INFINITY), |m, &v| if v > m { v } else { m });
    let sum = row.iter().fold(T::ZERO, |s, &v| s + (v - max).exp());
    (max, sum.ln())
}

impl Softmax {
    fn fwd<T: Float>(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = slice::<T>(self.name(), s, l)?;
        let c = l.dims()[l.dims().len() - 1];
        let mut y = vec![T::ZERO; x.len()];
        if c > 0 {
            let chunk = rows_per_task(c) * c;
            y.par_chunks_mut(chunk).zip(x.par_chunks(chunk)).for_each(|(yc, xc)| {
                for (yr, xr) in yc.chunks_mut(c).zip(xc.chunks(c)) {
                    let (max, lse) = row_max_lse(xr);
                    if self.log {
                        let shift = max + lse;
                        yr.iter_mut().zip(xr).for_each(|(o, &v)| *o = v - shift);
                    } else {
                        let mut sum = T::ZERO;
                        for (o, &v) in yr.iter_mut().zip(xr) {
                            *o = (v - max).exp();
                            sum += *o;
                        }
                        let inv = T::ONE / sum;
                        yr.iter_mut().for_each(|o| *o = *o * inv);
                    }
                }
            });
        }
        Ok((T::storage(y), l.shape().clone()))
    }
}

impl CustomOp1 for Softmax {
    fn name(&self) -> &'static str {
        if self.log {
            "taper-log-softmax"
        } else {
            "taper-softmax"
        }
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        dispatch!(self.name(), s, T => self.fwd::<T>(s, l))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(&self, s: &candle_core::CudaStorage, l: &Layout) -> Result<(candle_core::CudaStorage, Shape)> {
        Ok((cuda_rows(self.name(), "softmax_fwd", self.log, &[(s, l)])?, l.shape().clone()))
    }

    fn bwd(&self, _x: &Tensor, y: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(y.apply_op2_no_bwd(&grad.contiguous()?, &SoftmaxBwd { log: self.log })?))
    }
}

/// dx from (y, dy): softmax y (g - sum(g y)); log-softmax g - exp(y) sum(g).
struct SoftmaxBwd {
    log: bool,
}

impl SoftmaxBwd {
    fn run<T: Float>(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> Result<(CpuStorage, Shape)> {
        let y = slice::<T>(self.name(), s1, l1)?;
        let g = slice::<T>(self.name(), s2, l2)?;
        let c = l1.dims()[l1.dims().len() - 1];
        let mut dx = vec![T::ZERO; y.len()];
        if c > 0 {
            let chunk = rows_per_task(c) * c;
            dx.par_chunks_mut(chunk).zip(y.par_chunks(chunk).zip(g.par_chunks(chunk))).for_each(|(dc, (yc, gc))| {
                for ((dr, yr), gr) in dc.chunks_mut(c).zip(yc.chunks(c)).zip(gc.chunks(c)) {
                    if self.log {
                        let sum = gr.iter().fold(T::ZERO, |s, &v| s + v);
                        for ((o, &yv), &gv) in dr.iter_mut().zip(yr).zip(gr) {
                            *o = gv - yv.exp() * sum;
                        }
                    } else {
                        let dot = yr.iter().zip(gr).fold(T::ZERO, |s, (&a, &b)| s + a * b);
                        for ((o, &yv), &gv) in dr.iter_mut().zip(yr).zip(gr) {
                            *o = yv * (gv - dot);
                        }
                    }
                }
            });
        }
        Ok((T::storage(dx), l1.shape().clone()))
    }
}

impl CustomOp2 for SoftmaxBwd {
    fn name(&self) -> &'static str {
        "taper-softmax-bwd"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> Result<(CpuStorage, Shape)> {
        dispatch!(self.name(), s1, T => self.run::<T>(s1, l1, s2, l2))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        Ok((cuda_rows(self.name(), "softmax_bwd", self.log, &[(s1, l1), (s2, l2)])?, l1.shape().clone()))
    }
}

/// Runs the row kernel `<name>_<suffix>` of cuda/softmax.cu, one block per row of the last dim:
/// its arguments are the inputs (of one shape, contiguous), the output, rows, width and `log`.
#[cfg(feature = "cuda")]
fn cuda_rows(
    op: &'static str,
    name: &str,
    log: bool,
    inputs: &[(&candle_core::CudaStorage, &Layout)],
) -> Result<candle_core::CudaStorage> {
    use crate::cuda::{cuda_dispatch, output, per_row, suffix, view};
    use candle_core::backend::BackendStorage;
    use candle_core::cuda_backend::cudarc::driver::PushKernelArg;
    use candle_core::cuda_backend::WrapErr;
    let (first, l0) = inputs.first().ok_or_else(|| crate::bad(op, "no inputs"))?;
    let (dev, dt) = (first.device().clone(), first.dtype());
    let len = l0.shape().elem_count();
    let c = l0.dims().last().copied().unwrap_or(1);
    let rows = len.checked_div(c).unwrap_or(0);
    let func = dev.get_or_load_custom_func(&format!("{name}_{}", suffix(op, dt)?), SOFTMAX_PTX.0, SOFTMAX_PTX.1)?;
    cuda_dispatch!(op, dt, T => {
        let views = inputs.iter().map(|(s, l)| view::<T>(op, s, l)).collect::<Result<Vec<_>>>()?;
        if views.iter().any(|v| v.len() != len) {
            return Err(crate::bad(op, "inputs of different sizes"));
        }
        let mut out = output::<T>(&dev, len)?;
        if len > 0 {
            let (rows64, c64, log) = (rows as u64, c as u64, log as i32);
            let mut b = func.builder();
            for v in &views {
                b.arg(v);
            }
            b.arg(&mut out).arg(&rows64).arg(&c64).arg(&log);
            // SAFETY: the softmax kernels take (inputs..., out, rows, c, log) and write all rows x c of out.
            unsafe { b.launch(per_row(op, rows, 256)?) }.w()?;
        }
        Ok(candle_core::CudaStorage::wrap_cuda_slice(out, dev.clone()))
    })
}
