//! Elementwise MLP activations: GELU (erf and tanh forms, as candle computes them) and SwiGLU.

use crate::float::{dispatch, fused, slice, Float, MIN_TASK_ELEMS};
use candle_core::{CpuStorage, CustomOp1, CustomOp2, CustomOp3, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

const SQRT_2_OVER_PI: f64 = 0.797_884_560_802_865_4;
const INV_SQRT_2PI: f64 = 0.398_942_280_401_432_7;
const GELU_C: f64 = 0.044715;

/// x Φ(x), as `Tensor::gelu_erf`.
pub fn gelu_erf(x: &Tensor) -> Result<Tensor> {
    if !fused(&[x]) {
        return x.gelu_erf();
    }
    x.contiguous()?.apply_op1(Gelu { tanh: false })
}

/// GELU's tanh approximation, as `Tensor::gelu`.
pub fn gelu_tanh(x: &Tensor) -> Result<Tensor> {
    if !fused(&[x]) {
        return x.gelu();
    }
    x.contiguous()?.apply_op1(Gelu { tanh: true })
}

/// silu(gate) * up (Shazeer 2020), for gate and up of one shape.
pub fn swiglu(gate: &Tensor, up: &Tensor) -> Result<Tensor> {
    if !fused(&[gate, up]) || gate.shape() != up.shape() {
        return gate.silu()? * up;
    }
    gate.contiguous()?.apply_op2(&up.contiguous()?, Swiglu)
}

/// Elementwise y = f(a, b) into a fresh vector, in parallel chunks.
pub(crate) fn map2<T: Float>(a: &[T], b: &[T], f: impl Fn(T, T) -> T + Sync) -> Vec<T> {
    let mut y = vec![T::ZERO; a.len()];
    y.par_chunks_mut(MIN_TASK_ELEMS).zip(a.par_chunks(MIN_TASK_ELEMS).zip(b.par_chunks(MIN_TASK_ELEMS))).for_each(
        |(yc, (ac, bc))| {
            for ((o, &av), &bv) in yc.iter_mut().zip(ac).zip(bc) {
                *o = f(av, bv);
            }
        },
    );
    y
}

pub(crate) struct Gelu {
    pub(crate) tanh: bool,
}

impl Gelu {
    /// The forward exactly as candle writes it, so that the fused and composed models agree.
    #[inline(always)]
    pub(crate) fn f<T: Float>(&self, v: T) -> T {
        let half = T::from_f64(0.5);
        if self.tanh {
            let k = T::from_f64(SQRT_2_OVER_PI);
            half * v * (T::ONE + (k * v * (T::ONE + T::from_f64(GELU_C) * v * v)).tanh())
        } else {
            ((v * T::from_f64(std::f64::consts::FRAC_1_SQRT_2)).erf() + T::ONE) * half * v
        }
    }

    #[inline(always)]
    pub(crate) fn df<T: Float>(&self, v: T) -> T {
        let half = T::from_f64(0.5);
        if self.tanh {
            let k = T::from_f64(SQRT_2_OVER_PI);
            let c = T::from_f64(GELU_C);
            let t = (k * v * (T::ONE + c * v * v)).tanh();
            half * (T::ONE + t) + half * v * (T::ONE - t * t) * k * (T::ONE + T::from_f64(3.0) * c * v * v)
        } else {
            let cdf = half * (T::ONE + (v * T::from_f64(std::f64::consts::FRAC_1_SQRT_2)).erf());
            cdf + v * T::from_f64(INV_SQRT_2PI) * (-half * v * v).exp()
        }
    }

    fn fwd<T: Float>(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = slice::<T>(self.name(), s, l)?;
        Ok((T::storage(map2(x, x, |v, _| self.f(v))), l.shape().clone()))
    }
}

impl CustomOp1 for Gelu {
    fn name(&self) -> &'static str {
        if self.tanh {
            "taper-gelu-tanh"
        } else {
            "taper-gelu-erf"
        }
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        dispatch!(self.name(), s, T => self.fwd::<T>(s, l))
    }

    fn bwd(&self, x: &Tensor, _y: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(x.apply_op2_no_bwd(&grad.contiguous()?, &GeluBwd { tanh: self.tanh })?))
    }
}

struct GeluBwd {
    tanh: bool,
}

impl CustomOp2 for GeluBwd {
    fn name(&self) -> &'static str {
        "taper-gelu-bwd"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> Result<(CpuStorage, Shape)> {
        let gelu = Gelu { tanh: self.tanh };
        dispatch!(self.name(), s1, T => {
            let x = slice::<T>(self.name(), s1, l1)?;
            let g = slice::<T>(self.name(), s2, l2)?;
            Ok((T::storage(map2(x, g, |v, gv| gv * gelu.df(v))), l1.shape().clone()))
        })
    }
}

/// The logistic sigmoid and silu = x sigmoid(x), the latter as candle writes it.
#[inline(always)]
fn sigmoid_silu<T: Float>(v: T) -> (T, T) {
    let e = T::ONE + (-v).exp();
    (T::ONE / e, v / e)
}

struct Swiglu;

impl CustomOp2 for Swiglu {
    fn name(&self) -> &'static str {
        "taper-swiglu"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> Result<(CpuStorage, Shape)> {
        dispatch!(self.name(), s1, T => {
            let gate = slice::<T>(self.name(), s1, l1)?;
            let up = slice::<T>(self.name(), s2, l2)?;
            Ok((T::storage(map2(gate, up, |g, u| sigmoid_silu(g).1 * u)), l1.shape().clone()))
        })
    }

    fn bwd(&self, gate: &Tensor, up: &Tensor, _y: &Tensor, grad: &Tensor) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let packed = gate.apply_op3_no_bwd(up, &grad.contiguous()?, &SwigluBwd)?; // (2, ..)
        Ok((Some(packed.get(0)?), Some(packed.get(1)?)))
    }
}

/// [dgate; dup] stacked on a new leading dim of 2.
struct SwigluBwd;

impl SwigluBwd {
    fn run<T: Float>(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let gate = slice::<T>(self.name(), s1, l1)?;
        let up = slice::<T>(self.name(), s2, l2)?;
        let grad = slice::<T>(self.name(), s3, l3)?;
        let n = gate.len();
        let mut out = vec![T::ZERO; 2 * n];
        let (dgate, dup) = out.split_at_mut(n);
        let k = MIN_TASK_ELEMS;
        dgate
            .par_chunks_mut(k)
            .zip(dup.par_chunks_mut(k))
            .zip(gate.par_chunks(k).zip(up.par_chunks(k)).zip(grad.par_chunks(k)))
            .for_each(|((dg, du), ((gc, uc), oc))| {
                for ((((dgv, duv), &g), &u), &o) in dg.iter_mut().zip(du.iter_mut()).zip(gc).zip(uc).zip(oc) {
                    let (s, silu) = sigmoid_silu(g);
                    *dgv = o * u * s * (T::ONE + g * (T::ONE - s));
                    *duv = o * silu;
                }
            });
        let mut dims = vec![2];
        dims.extend_from_slice(l1.dims());
        Ok((T::storage(out), Shape::from(dims)))
    }
}

impl CustomOp3 for SwigluBwd {
    fn name(&self) -> &'static str {
        "taper-swiglu-bwd"
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
