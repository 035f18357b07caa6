//! AdamW and Lion updates written into the parameter and state tensors in place: no tensor is
//! allocated per parameter per step. Each update repeats the composed candle expression
//! operation for operation (candle's scalar ops are `x * mul + add` in the tensor's dtype), so
//! the in-place and composed optimizers agree bit for bit.

use crate::float::{fused, simd, slice, slice_mut, Float, MIN_TASK_ELEMS};
use candle_core::{CpuStorage, Layout, Result, Tensor};
use rayon::prelude::*;

/// torch.optim.AdamW's hyper-parameters for one update; `step` counts from 1.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AdamW {
    pub lr: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
    pub step: u64,
}

/// Lion's hyper-parameters for one update.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Lion {
    pub lr: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub weight_decay: f64,
}

/// One AdamW update of parameter `w` with gradient `g`, updating the first and second moments
/// `m` and `v` too, all in place. w, m and v must be contiguous and of one shape.
pub fn adamw_step(w: &Tensor, m: &Tensor, v: &Tensor, g: &Tensor, h: &AdamW) -> Result<()> {
    check("adamw", &[w, m, v], g)?;
    let t = i32::try_from(h.step).map_err(|_| crate::bad("adamw", format!("step {} too large", h.step)))?;
    let bc1 = 1.0 - h.beta1.powi(t);
    let bc2_sqrt = (1.0 - h.beta2.powi(t)).sqrt();
    // The scalars as the composed version applies them: m + (g - m) (1 - b1),
    // v b2 + g^2 (1 - b2), sqrt(v) / bc2_sqrt + eps, w (1 - lr wd) - m / denom (lr / bc1).
    let k = AdamScalars {
        one_minus_b1: 1.0 - h.beta1,
        b2: h.beta2,
        one_minus_b2: 1.0 - h.beta2,
        inv_bc2_sqrt: 1.0 / bc2_sqrt,
        eps: h.eps,
        decay: 1.0 - h.lr * h.weight_decay,
        step_size: h.lr / bc1,
    };
    if !fused(&[w, m, v, g]) {
        let m_new = (m + ((g - m)? * k.one_minus_b1)?)?;
        let v_new = ((v * k.b2)? + (g.sqr()? * k.one_minus_b2)?)?;
        let denom = ((v_new.sqrt()? * k.inv_bc2_sqrt)? + k.eps)?;
        let w_new = ((w * k.decay)? - (m_new.div(&denom)? * k.step_size)?)?;
        return write(&[(m, &m_new), (v, &v_new), (w, &w_new)]);
    }
    let g = g.contiguous()?;
    m.inplace_op2(&g, &Moment::Lerp(k.one_minus_b1))?;
    v.inplace_op2(&g, &Moment::Square(k.b2, k.one_minus_b2))?;
    w.inplace_op3(m, v, &AdamUpdate(k))
}

/// One Lion update of parameter `w` with gradient `g` and momentum `m`, in place.
pub fn lion_step(w: &Tensor, m: &Tensor, g: &Tensor, h: &Lion) -> Result<()> {
    check("lion", &[w, m], g)?;
    let (decay, b1, one_minus_b1) = (1.0 - h.lr * h.weight_decay, h.beta1, 1.0 - h.beta1);
    if !fused(&[w, m, g]) {
        let update = ((m * b1)? + (g * one_minus_b1)?)?.sign()?;
        let w_new = ((w * decay)? - (update * h.lr)?)?;
        let m_new = ((m * h.beta2)? + (g * (1.0 - h.beta2))?)?;
        return write(&[(w, &w_new), (m, &m_new)]);
    }
    let g = g.contiguous()?;
    // The parameter first: its update reads the momentum from before this step.
    w.inplace_op3(m, &g, &LionUpdate { decay, b1, one_minus_b1, lr: h.lr })?;
    m.inplace_op2(&g, &Moment::Linear(h.beta2, 1.0 - h.beta2))
}

fn check(op: &'static str, state: &[&Tensor], g: &Tensor) -> Result<()> {
    for t in state {
        if t.shape() != g.shape() {
            return Err(crate::bad(op, format!("state of shape {:?} for a gradient of {:?}", t.dims(), g.dims())));
        }
        if !t.is_contiguous() {
            return Err(crate::bad(op, "parameter and state must be contiguous to be updated in place"));
        }
    }
    Ok(())
}

/// Copies each new value into its destination's storage (the composed fallback).
fn write(pairs: &[(&Tensor, &Tensor)]) -> Result<()> {
    for (dst, src) in pairs {
        let n = dst.elem_count();
        dst.reshape(n)?.slice_set(&src.contiguous()?.reshape(n)?, 0, 0)?;
    }
    Ok(())
}

#[derive(Clone, Copy)]
struct AdamScalars {
    one_minus_b1: f64,
    b2: f64,
    one_minus_b2: f64,
    inv_bc2_sqrt: f64,
    eps: f64,
    decay: f64,
    step_size: f64,
}

/// `x * a + 0`, candle's affine with a zero shift (which turns -0 into +0, kept for bit parity).
#[inline(always)]
fn scale<T: Float>(x: T, a: T) -> T {
    x * a + T::ZERO
}

/// A state tensor's update from the gradient g.
enum Moment {
    /// AdamW's first moment: m + (g - m) a.
    Lerp(f64),
    /// AdamW's second moment: v b + g^2 a.
    Square(f64, f64),
    /// Lion's momentum: m b + g a.
    Linear(f64, f64),
}

impl Moment {
    fn run<T: Float>(&self, dst: &mut CpuStorage, dl: &Layout, gs: &CpuStorage, gl: &Layout) -> Result<()> {
        let s = slice_mut::<T>("moment", dst, dl)?;
        let g = slice::<T>("moment", gs, gl)?;
        let k = MIN_TASK_ELEMS;
        let (b, a, square) = match *self {
            Moment::Lerp(a) => {
                let a = T::from_f64(a);
                s.par_chunks_mut(k).zip(g.par_chunks(k)).for_each(|(sc, gc)| {
                    simd!(<T: Float> (sc: &mut [T] = sc, gc: &[T] = gc, a: T = a) {
                        sc.iter_mut().zip(gc).for_each(|(m, &gv)| *m = *m + scale(gv - *m, a));
                    })
                });
                return Ok(());
            }
            Moment::Square(b, a) => (T::from_f64(b), T::from_f64(a), true),
            Moment::Linear(b, a) => (T::from_f64(b), T::from_f64(a), false),
        };
        s.par_chunks_mut(k).zip(g.par_chunks(k)).for_each(|(sc, gc)| {
            simd!(<T: Float> (sc: &mut [T] = sc, gc: &[T] = gc, b: T = b, a: T = a, square: bool = square) {
                if square {
                    sc.iter_mut().zip(gc).for_each(|(v, &gv)| *v = scale(*v, b) + scale(gv * gv, a));
                } else {
                    sc.iter_mut().zip(gc).for_each(|(v, &gv)| *v = scale(*v, b) + scale(gv, a));
                }
            })
        });
        Ok(())
    }
}

impl candle_core::InplaceOp2 for Moment {
    fn name(&self) -> &'static str {
        "taper-optim-moment"
    }

    fn cpu_fwd(&self, s1: &mut CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> Result<()> {
        match s1 {
            CpuStorage::F32(_) => self.run::<f32>(s1, l1, s2, l2),
            CpuStorage::F64(_) => self.run::<f64>(s1, l1, s2, l2),
            _ => Err(crate::bad("moment", "f32 or f64 only")),
        }
    }
}

struct AdamUpdate(AdamScalars);

impl AdamUpdate {
    fn run<T: Float>(
        &self,
        ws: &mut CpuStorage,
        wl: &Layout,
        ms: &CpuStorage,
        ml: &Layout,
        vs: &CpuStorage,
        vl: &Layout,
    ) -> Result<()> {
        let w = slice_mut::<T>("adamw", ws, wl)?;
        let m = slice::<T>("adamw", ms, ml)?;
        let v = slice::<T>("adamw", vs, vl)?;
        let k = &self.0;
        let (inv, eps, decay, step) =
            (T::from_f64(k.inv_bc2_sqrt), T::from_f64(k.eps), T::from_f64(k.decay), T::from_f64(k.step_size));
        let c = MIN_TASK_ELEMS;
        w.par_chunks_mut(c).zip(m.par_chunks(c).zip(v.par_chunks(c))).for_each(|(wc, (mc, vc))| {
            simd!(<T: Float> (wc: &mut [T] = wc, mc: &[T] = mc, vc: &[T] = vc, inv: T = inv, eps: T = eps,
                decay: T = decay, step: T = step) {
                for ((wv, &mv), &vv) in wc.iter_mut().zip(mc).zip(vc) {
                    let denom = scale(vv.sqrt(), inv) * T::ONE + eps;
                    *wv = scale(*wv, decay) - scale(mv / denom, step);
                }
            })
        });
        Ok(())
    }
}

impl candle_core::InplaceOp3 for AdamUpdate {
    fn name(&self) -> &'static str {
        "taper-adamw"
    }

    fn cpu_fwd(
        &self,
        s1: &mut CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<()> {
        match s1 {
            CpuStorage::F32(_) => self.run::<f32>(s1, l1, s2, l2, s3, l3),
            CpuStorage::F64(_) => self.run::<f64>(s1, l1, s2, l2, s3, l3),
            _ => Err(crate::bad("adamw", "f32 or f64 only")),
        }
    }
}

struct LionUpdate {
    decay: f64,
    b1: f64,
    one_minus_b1: f64,
    lr: f64,
}

impl LionUpdate {
    fn run<T: Float>(
        &self,
        ws: &mut CpuStorage,
        wl: &Layout,
        ms: &CpuStorage,
        ml: &Layout,
        gs: &CpuStorage,
        gl: &Layout,
    ) -> Result<()> {
        let w = slice_mut::<T>("lion", ws, wl)?;
        let m = slice::<T>("lion", ms, ml)?;
        let g = slice::<T>("lion", gs, gl)?;
        let (decay, b1, a, lr) =
            (T::from_f64(self.decay), T::from_f64(self.b1), T::from_f64(self.one_minus_b1), T::from_f64(self.lr));
        let c = MIN_TASK_ELEMS;
        w.par_chunks_mut(c).zip(m.par_chunks(c).zip(g.par_chunks(c))).for_each(|(wc, (mc, gc))| {
            simd!(<T: Float> (wc: &mut [T] = wc, mc: &[T] = mc, gc: &[T] = gc, decay: T = decay, b1: T = b1, a: T = a,
                lr: T = lr) {
                for ((wv, &mv), &gv) in wc.iter_mut().zip(mc).zip(gc) {
                    let u = scale(mv, b1) + scale(gv, a);
                    let sign = if u > T::ZERO {
                        T::ONE
                    } else if u < T::ZERO {
                        -T::ONE
                    } else {
                        T::ZERO
                    };
                    *wv = scale(*wv, decay) - scale(sign, lr);
                }
            })
        });
        Ok(())
    }
}

impl candle_core::InplaceOp3 for LionUpdate {
    fn name(&self) -> &'static str {
        "taper-lion"
    }

    fn cpu_fwd(
        &self,
        s1: &mut CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<()> {
        match s1 {
            CpuStorage::F32(_) => self.run::<f32>(s1, l1, s2, l2, s3, l3),
            CpuStorage::F64(_) => self.run::<f64>(s1, l1, s2, l2, s3, l3),
            _ => Err(crate::bad("lion", "f32 or f64 only")),
        }
    }
}
