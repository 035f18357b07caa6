//! Elementwise MLP activations: GELU (erf and tanh forms, as candle computes them) and SwiGLU.

use crate::float::{dispatch, fused, simd, slice, twin, Float, MIN_TASK_ELEMS};
use candle_core::{CpuStorage, CustomOp1, CustomOp2, CustomOp3, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

const SQRT_2_OVER_PI: f64 = 0.797_884_560_802_865_4;
const INV_SQRT_2PI: f64 = 0.398_942_280_401_432_7;
const GELU_C: f64 = 0.044715;

/// The CUDA twins' module, cuda/act.cu.
#[cfg(feature = "cuda")]
const ACT_PTX: (&str, &str) = ("taper_act", crate::ptx::ACT);

/// x Φ(x), as `Tensor::gelu_erf`.
pub fn gelu_erf(x: &Tensor) -> Result<Tensor> {
    if !fused(&[x]) && !twin(&[x]) {
        return x.gelu_erf();
    }
    x.contiguous()?.apply_op1(Gelu { tanh: false })
}

/// GELU's tanh approximation, as `Tensor::gelu`.
pub fn gelu_tanh(x: &Tensor) -> Result<Tensor> {
    if !fused(&[x]) && !twin(&[x]) {
        return x.gelu();
    }
    x.contiguous()?.apply_op1(Gelu { tanh: true })
}

/// silu(gate) * up (Shazeer 2020), for gate and up of one shape.
pub fn swiglu(gate: &Tensor, up: &Tensor) -> Result<Tensor> {
    if !(fused(&[gate, up]) || twin(&[gate, up])) || gate.shape() != up.shape() {
        return gate.silu()? * up;
    }
    gate.contiguous()?.apply_op2(&up.contiguous()?, Swiglu)
}

/// Elementwise y = f(a, b) into a fresh vector, in parallel chunks, each chunk's loop built for
/// the widest vectors the CPU has ([`simd`]); `$f` names an `inline(always)` function.
macro_rules! map2 {
    ($a:expr, $b:expr, $f:ident) => {{
        let (a, b) = ($a, $b);
        let mut y = vec![T::ZERO; a.len()];
        let k = crate::float::MIN_TASK_ELEMS;
        y.par_chunks_mut(k).zip(a.par_chunks(k).zip(b.par_chunks(k))).for_each(|(yc, (ac, bc))| {
            simd!(<T: Float> (y: &mut [T] = yc, a: &[T] = ac, b: &[T] = bc) {
                for ((o, &av), &bv) in y.iter_mut().zip(a).zip(b) {
                    *o = $f(av, bv);
                }
            })
        });
        y
    }};
}

pub(crate) struct Gelu {
    pub(crate) tanh: bool,
}

impl Gelu {
    /// GELU over `x`, the form picked once outside the element loop so that it vectorises.
    pub(crate) fn map<T: Float>(&self, x: &[T]) -> Vec<T> {
        if self.tanh {
            map2!(x, x, gelu_tanh_fwd)
        } else {
            map2!(x, x, gelu_erf_fwd)
        }
    }

    /// grad * GELU'(x).
    pub(crate) fn map_grad<T: Float>(&self, x: &[T], grad: &[T]) -> Vec<T> {
        if self.tanh {
            map2!(x, grad, gelu_tanh_bwd)
        } else {
            map2!(x, grad, gelu_erf_bwd)
        }
    }

    fn fwd<T: Float>(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = slice::<T>(self.name(), s, l)?;
        Ok((T::storage(self.map(x)), l.shape().clone()))
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

    #[cfg(feature = "cuda")]
    fn cuda_fwd(&self, s: &candle_core::CudaStorage, l: &Layout) -> Result<(candle_core::CudaStorage, Shape)> {
        let name = if self.tanh { "gelu_tanh_fwd" } else { "gelu_erf_fwd" };
        Ok((crate::cuda::map(self.name(), ACT_PTX, name, &[(s, l)], 1, None)?, l.shape().clone()))
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
            Ok((T::storage(gelu.map_grad(x, g)), l1.shape().clone()))
        })
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        let name = if self.tanh { "gelu_tanh_bwd" } else { "gelu_erf_bwd" };
        Ok((crate::cuda::map(self.name(), ACT_PTX, name, &[(s1, l1), (s2, l2)], 1, None)?, l1.shape().clone()))
    }
}

// candle's expressions, with an exp and erf that vectorise (within a few f32 ulps of candle's);
// the tanh form as v σ(2u) = v (1 + tanh u) / 2: one exp, and no cancellation in 1 + tanh.

#[inline(always)]
fn gelu_erf_f<T: Float>(v: T) -> T {
    ((v * T::from_f64(std::f64::consts::FRAC_1_SQRT_2)).erf() + T::ONE) * T::from_f64(0.5) * v
}

#[inline(always)]
fn gelu_erf_df<T: Float>(v: T) -> T {
    let half = T::from_f64(0.5);
    let cdf = half * (T::ONE + (v * T::from_f64(std::f64::consts::FRAC_1_SQRT_2)).erf());
    cdf + v * T::from_f64(INV_SQRT_2PI) * (-half * v * v).exp()
}

#[inline(always)]
fn gelu_tanh_f<T: Float>(v: T) -> T {
    v * sigmoid(T::from_f64(2.0) * tanh_arg(v))
}

/// d/dv v σ(2u) = σ + v σ (1 - σ) 2u', with u' = k (1 + 3 c v²).
#[inline(always)]
fn gelu_tanh_df<T: Float>(v: T) -> T {
    let (k, c) = (T::from_f64(SQRT_2_OVER_PI), T::from_f64(GELU_C));
    let s = sigmoid(T::from_f64(2.0) * tanh_arg(v));
    s + v * s * (T::ONE - s) * T::from_f64(2.0) * k * (T::ONE + T::from_f64(3.0) * c * v * v)
}

// The (x, grad) -> value forms map2! takes: named functions, since only those can be marked
// inline(always), and a closure left out of line stays 4 wide.

#[inline(always)]
fn gelu_erf_fwd<T: Float>(v: T, _: T) -> T {
    gelu_erf_f(v)
}

#[inline(always)]
fn gelu_erf_bwd<T: Float>(v: T, g: T) -> T {
    g * gelu_erf_df(v)
}

#[inline(always)]
fn gelu_tanh_fwd<T: Float>(v: T, _: T) -> T {
    gelu_tanh_f(v)
}

#[inline(always)]
fn gelu_tanh_bwd<T: Float>(v: T, g: T) -> T {
    g * gelu_tanh_df(v)
}

#[inline(always)]
fn swiglu_fwd<T: Float>(gate: T, up: T) -> T {
    sigmoid_silu(gate).1 * up
}

/// The argument of the tanh in GELU's tanh form, √(2/π) (v + 0.044715 v³).
#[inline(always)]
fn tanh_arg<T: Float>(v: T) -> T {
    T::from_f64(SQRT_2_OVER_PI) * v * (T::ONE + T::from_f64(GELU_C) * v * v)
}

#[inline(always)]
fn sigmoid<T: Float>(v: T) -> T {
    T::ONE / (T::ONE + (-v).exp())
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
            Ok((T::storage(map2!(gate, up, swiglu_fwd)), l1.shape().clone()))
        })
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        Ok((crate::cuda::map(self.name(), ACT_PTX, "swiglu_fwd", &[(s1, l1), (s2, l2)], 1, None)?, l1.shape().clone()))
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
                simd!(<T: Float> (dg: &mut [T] = dg, du: &mut [T] = du, gc: &[T] = gc, uc: &[T] = uc, oc: &[T] = oc) {
                    for ((((dgv, duv), &g), &u), &o) in dg.iter_mut().zip(du.iter_mut()).zip(gc).zip(uc).zip(oc) {
                        let (s, silu) = sigmoid_silu(g);
                        *dgv = o * u * s * (T::ONE + g * (T::ONE - s));
                        *duv = o * silu;
                    }
                })
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
        let out = crate::cuda::map(self.name(), ACT_PTX, "swiglu_bwd", &[(s1, l1), (s2, l2), (s3, l3)], 2, None)?;
        let mut dims = vec![2];
        dims.extend_from_slice(l1.dims());
        Ok((out, Shape::from(dims)))
    }
}
