//! y = x Wᵀ + b as one graph node, with x of any rank (.., in), W (out, in) and b (out).
//!
//! Composed, a linear is reshape -> transpose W -> matmul -> broadcast b -> add -> reshape: six
//! nodes, and candle's backward pays a zero-filled gradient buffer plus an add for every input
//! of every node, several activation-sized passes per linear. Here the forward is one GEMM
//! writing onto the broadcast bias, and the backward three: dx = dy W, dW = dyᵀ x, db = Σ dy.

use crate::act::Gelu;
use crate::float::{dispatch, fused, slice, Float};
use crate::lowp_gemm::{gemm_acc_in, gemm_new_in};
use crate::precision::Precision;
use candle_core::{CpuStorage, CustomOp2, CustomOp3, Layout, Result, Shape, Tensor};
use gemm::Parallelism;
use rayon::prelude::*;
use std::sync::Mutex;

/// x Wᵀ + b. On the CPU in f32/f64 one fused op; elsewhere the composed candle ops.
pub fn linear(x: &Tensor, w: &Tensor, b: Option<&Tensor>) -> Result<Tensor> {
    apply(x, w, b, None)
}

/// GELU(x Wᵀ + b), the erf form or (`tanh`) the tanh approximation, as one graph node: the
/// pre-activation stays inside the op for the backward instead of being a node of its own with
/// its own gradient buffer. Same numbers as [`linear`] then [`crate::gelu_erf`] /
/// [`crate::gelu_tanh`]. On CUDA with the kernels on and a bias, cuBLAS forms x Wᵀ and one
/// kernel adds the bias and applies the GELU (and one more its backward).
pub fn linear_gelu(x: &Tensor, w: &Tensor, b: Option<&Tensor>, tanh: bool) -> Result<Tensor> {
    apply(x, w, b, Some(Gelu { tanh }))
}

/// The fused op when the kernels take these tensors, else the composed ops.
fn apply(x: &Tensor, w: &Tensor, b: Option<&Tensor>, gelu: Option<Gelu>) -> Result<Tensor> {
    let shapes_ok = w.rank() == 2
        && x.rank() >= 1
        && x.dims().last() == Some(&w.dims()[1])
        && b.is_none_or(|b| b.dims() == [w.dims()[0]]);
    let tensors: Vec<&Tensor> = [Some(x), Some(w), b].into_iter().flatten().collect();
    #[cfg(feature = "cuda")]
    if let (true, Some(gelu), Some(b)) = (shapes_ok && w.dims()[0] > 0 && crate::float::twin(&tensors), &gelu, b) {
        // cuBLAS forms the product (under the matmul precision, as composed); the bias and
        // the GELU then take one pass, where composed they take two.
        let u = linear_composed(x, w, None)?;
        return u.contiguous()?.apply_op2(&b.contiguous()?, cuda::BiasGelu { tanh: gelu.tanh });
    }
    if !shapes_ok || !fused(&tensors) {
        let u = linear_composed(x, w, b)?;
        return match gelu {
            None => Ok(u),
            Some(Gelu { tanh: true }) => crate::gelu_tanh(&u),
            Some(Gelu { tanh: false }) => crate::gelu_erf(&u),
        };
    }
    let (x, w) = (x.contiguous()?, w.contiguous()?);
    let op = Linear { gelu, pre: Mutex::new(None), precision: crate::matmul_precision() };
    match b {
        None => x.apply_op2(&w, op),
        Some(b) => x.apply_op3(&w, &b.contiguous()?, op),
    }
}

/// The same linear from candle's primitives.
pub fn linear_composed(x: &Tensor, w: &Tensor, b: Option<&Tensor>) -> Result<Tensor> {
    let dims = x.dims().to_vec();
    let (last, lead) = dims.split_last().ok_or_else(|| crate::bad("linear", "x is a scalar"))?;
    let n: usize = lead.iter().product();
    let y = crate::precision::matmul(&x.reshape((n, *last))?, &w.t()?)?; // (N, out)
    let y = match b {
        Some(b) => y.broadcast_add(b)?,
        None => y,
    };
    let mut out = lead.to_vec();
    out.push(w.dim(0)?);
    y.reshape(out)
}

/// Rows each thread must get before a GEMM is split by rows rather than by gemm itself.
const ROWS_PER_THREAD: usize = 64;

/// `gemm_raw` on as many threads as pay. Below 2^18 flops a GEMM finishes before threads would
/// have started. With enough rows, the rows are split into one block per thread, each a
/// single-threaded GEMM (each thread packs its own rows of lhs, all read rhs): at the shapes of
/// small models (768 x 128 operands) this measured 144 GFLOP/s against 124 for gemm's own
/// two-thread split, and the same at the reference config's. Each element is the same sum in
/// the same order either way: the split is over output rows, never over k.
///
/// # Safety
/// As [`gemm_raw`].
#[allow(clippy::too_many_arguments)]
unsafe fn gemm_threaded<T: Copy + Send + Sync + 'static>(
    dst: *mut T,
    ldd: usize,
    (m, n, k): (usize, usize, usize),
    accumulate: bool,
    lhs: &[T],
    ls: (usize, usize),
    rhs: &[T],
    rs: (usize, usize),
    one: T,
) {
    struct Dst<T>(*mut T);
    // SAFETY: each task writes only its own rows of dst, which no other task touches.
    unsafe impl<T> Send for Dst<T> {}
    unsafe impl<T> Sync for Dst<T> {}
    let threads = rayon::current_num_threads();
    let parallel = threads > 1 && 2 * m * n * k >= 1 << 18;
    if !parallel || m < ROWS_PER_THREAD * threads {
        let par = if parallel { Parallelism::Rayon(threads) } else { Parallelism::None };
        // SAFETY: the caller vouches for dst.
        unsafe { gemm_raw(dst, ldd, (m, n, k), accumulate, lhs, ls, rhs, rs, one, par) }
    } else {
        let per = m.div_ceil(threads);
        let out = Dst(dst);
        (0..threads).into_par_iter().for_each(|t| {
            let r0 = t * per;
            if r0 < m {
                let rows = per.min(m - r0);
                let at = &out;
                // SAFETY: rows r0.. of dst start r0 * ldd elements in, of lhs r0 * ls.0 in; the
                // caller vouches for dst over all m rows.
                unsafe {
                    gemm_raw(
                        at.0.add(r0 * ldd),
                        ldd,
                        (rows, n, k),
                        accumulate,
                        &lhs[r0 * ls.0..],
                        ls,
                        rhs,
                        rs,
                        one,
                        Parallelism::None,
                    )
                }
            }
        });
    }
}

/// dst (m, n, row stride `ldd`) = [dst +] lhs (m, k) · rhs (k, n), each operand given by its row
/// and column strides in elements, for m, n, k > 0; `one` is T's 1.
///
/// # Safety
/// `dst` must be valid for writes of (m - 1) * ldd + n elements (and for reads too when
/// `accumulate`), and alias neither operand.
#[allow(clippy::too_many_arguments)]
pub(crate) unsafe fn gemm_raw<T: Copy + 'static>(
    dst: *mut T,
    ldd: usize,
    (m, n, k): (usize, usize, usize),
    accumulate: bool,
    lhs: &[T],
    (lhs_rs, lhs_cs): (usize, usize),
    rhs: &[T],
    (rhs_rs, rhs_cs): (usize, usize),
    one: T,
    par: Parallelism,
) {
    assert!(m > 0 && n > 0 && k > 0, "gemm: empty product");
    assert!(lhs.len() > (m - 1) * lhs_rs + (k - 1) * lhs_cs, "gemm: lhs out of bounds");
    assert!(rhs.len() > (k - 1) * rhs_rs + (n - 1) * rhs_cs, "gemm: rhs out of bounds");
    // SAFETY: the asserts keep every read inside lhs and rhs; the caller vouches for dst.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst,
            1,
            ldd as isize,
            accumulate,
            lhs.as_ptr(),
            lhs_cs as isize,
            lhs_rs as isize,
            rhs.as_ptr(),
            rhs_cs as isize,
            rhs_rs as isize,
            one,
            one,
            false,
            false,
            false,
            par,
        )
    }
}

/// dst (m, n) += lhs (m, k) · rhs (k, n), threaded when it is big enough to pay.
pub(crate) fn gemm_acc<T: Float>(
    dst: &mut [T],
    mnk: (usize, usize, usize),
    lhs: &[T],
    ls: (usize, usize),
    rhs: &[T],
    rs: (usize, usize),
) {
    let (m, n, k) = mnk;
    if m * n * k == 0 {
        return;
    }
    assert!(dst.len() >= m * n, "linear: destination too small");
    // SAFETY: dst is a live, exclusively borrowed slice of at least m * n elements.
    unsafe { gemm_threaded(dst.as_mut_ptr(), n, mnk, true, lhs, ls, rhs, rs, T::ONE) }
}

/// dst (m, n, row stride `ldd`) = [dst +] lhs · rhs into a slice, its bounds checked; nothing
/// to do when m, n or k is 0 (dst is left as it is). `Parallelism::None` for callers that are
/// rayon tasks already.
#[allow(clippy::too_many_arguments)]
pub(crate) fn gemm_into<T: Copy + 'static>(
    dst: &mut [T],
    ldd: usize,
    mnk: (usize, usize, usize),
    accumulate: bool,
    lhs: &[T],
    ls: (usize, usize),
    rhs: &[T],
    rs: (usize, usize),
    one: T,
    par: Parallelism,
) {
    let (m, n, k) = mnk;
    if m * n * k == 0 {
        return;
    }
    assert!(n <= ldd && dst.len() >= (m - 1) * ldd + n, "gemm: destination too small");
    // SAFETY: dst is a live, exclusively borrowed slice covering every element written.
    unsafe { gemm_raw(dst.as_mut_ptr(), ldd, mnk, accumulate, lhs, ls, rhs, rs, one, par) }
}

/// A fresh (m, n) product lhs · rhs. gemm writes every element of the destination without
/// reading it (`read_dst` false), so the buffer skips the zero fill a `vec![0; m * n]` would
/// spend a full memory pass on.
pub(crate) fn gemm_new<T: Float>(
    mnk: (usize, usize, usize),
    lhs: &[T],
    ls: (usize, usize),
    rhs: &[T],
    rs: (usize, usize),
) -> Vec<T> {
    let (m, n, k) = mnk;
    if m * n * k == 0 {
        return vec![T::ZERO; m * n];
    }
    let mut out: Vec<T> = Vec::with_capacity(m * n);
    // SAFETY: the capacity holds m * n elements; with read_dst false gemm writes all of them
    // (row stride n, column stride 1) and reads none, so each is initialised before the length
    // covers it.
    unsafe {
        gemm_threaded(out.as_mut_ptr(), n, mnk, false, lhs, ls, rhs, rs, T::ONE);
        out.set_len(m * n);
    }
    out
}

const NAME: &str = "taper-linear";

/// The op of [`linear`] and [`linear_gelu`]; with a GELU the forward leaves the pre-activation
/// here for the backward.
struct Linear {
    gelu: Option<Gelu>,
    pre: Mutex<Option<CpuStorage>>,
    /// The GEMMs' precision when the op was made, for its forward and backward alike.
    precision: Precision,
}

impl Linear {
    fn fwd<T: Float>(
        &self,
        x: &[T],
        xl: &Layout,
        w: &[T],
        wl: &Layout,
        b: Option<&[T]>,
    ) -> Result<(CpuStorage, Shape)> {
        let (o, c) = (wl.dims()[0], wl.dims()[1]);
        let n = x.len() / c.max(1);
        // u (n, o) = x (n, c) · Wᵀ (c, o), Wᵀ read in place from W's rows.
        let u = match b {
            None => gemm_new_in(self.precision, (n, o, c), x, (c, 1), w, (1, c)),
            Some(b) => {
                let mut u = vec![T::ZERO; n * o];
                u.par_chunks_mut(o.max(1) * crate::float::rows_per_task(o)).for_each(|rows| {
                    for row in rows.chunks_mut(o) {
                        row.copy_from_slice(b);
                    }
                });
                gemm_acc_in(self.precision, &mut u, (n, o, c), x, (c, 1), w, (1, c));
                u
            }
        };
        let mut dims = xl.dims().to_vec();
        *dims.last_mut().expect("rank >= 1") = o;
        let y = match &self.gelu {
            None => u,
            Some(gelu) => {
                let y = gelu.map(&u);
                *self.pre.lock().unwrap_or_else(|e| e.into_inner()) = Some(T::storage(u));
                y
            }
        };
        Ok((T::storage(y), Shape::from(dims)))
    }

    /// (dx, dW, db) from the incoming gradient, through GELU' of the kept pre-activation first
    /// when there is a GELU.
    fn grads(
        &self,
        x: &Tensor,
        w: &Tensor,
        with_bias: bool,
        grad: &Tensor,
    ) -> Result<(Tensor, Tensor, Option<Tensor>)> {
        let grad = grad.contiguous()?;
        let grad = match &self.gelu {
            None => grad,
            Some(gelu) => {
                let guard = self.pre.lock().unwrap_or_else(|e| e.into_inner());
                let pre = guard
                    .as_ref()
                    .ok_or_else(|| crate::bad(NAME, "no saved pre-activation: the forward did not run on the CPU"))?;
                let (g, gl) = grad.storage_and_layout();
                let candle_core::Storage::Cpu(g) = &*g else {
                    return Err(crate::bad(NAME, "the gradient is not on the CPU"));
                };
                dispatch!(NAME, g, T => {
                    let gs = slice::<T>(NAME, g, gl)?;
                    let us = T::slice(pre).ok_or_else(|| crate::bad(NAME, "pre-activation dtype"))?;
                    Tensor::from_vec(gelu.map_grad(us, gs), grad.shape(), &candle_core::Device::Cpu)
                })?
            }
        };
        let dx = grad.apply_op2_no_bwd(w, &LinearBwd::Dx(self.precision))?;
        let dw = grad.apply_op2_no_bwd(x, &LinearBwd::Dw(self.precision))?;
        let db = if with_bias { Some(grad.apply_op2_no_bwd(w, &LinearBwd::Db)?) } else { None };
        Ok((dx, dw, db))
    }
}

impl CustomOp2 for Linear {
    fn name(&self) -> &'static str {
        NAME
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> Result<(CpuStorage, Shape)> {
        dispatch!(NAME, s1, T => self.fwd::<T>(slice(NAME, s1, l1)?, l1, slice(NAME, s2, l2)?, l2, None))
    }

    fn bwd(&self, x: &Tensor, w: &Tensor, _y: &Tensor, grad: &Tensor) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let (dx, dw, _) = self.grads(x, w, false, grad)?;
        Ok((Some(dx), Some(dw)))
    }
}

impl CustomOp3 for Linear {
    fn name(&self) -> &'static str {
        NAME
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
        dispatch!(NAME, s1, T => self.fwd::<T>(
            slice(NAME, s1, l1)?, l1, slice(NAME, s2, l2)?, l2, Some(slice(NAME, s3, l3)?)))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _b: &Tensor,
        _y: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (dx, dw, db) = self.grads(x, w, true, grad)?;
        Ok((Some(dx), Some(dw), db))
    }
}

/// The backward GEMMs, each on (dy, other operand).
enum LinearBwd {
    /// dx (.., c) = dy (n, o) · W (o, c).
    Dx(Precision),
    /// dW (o, c) = dyᵀ (o, n) · x (n, c).
    Dw(Precision),
    /// db (o) = Σ_rows dy; the second operand (W) only gives the width.
    Db,
}

impl LinearBwd {
    fn run<T: Float>(&self, dy: &[T], dyl: &Layout, other: &[T], ol: &Layout) -> Result<(CpuStorage, Shape)> {
        let o = *dyl.dims().last().expect("rank >= 1");
        let n = dy.len() / o.max(1);
        match self {
            LinearBwd::Dx(p) => {
                let c = ol.dims()[1];
                let dx = gemm_new_in(*p, (n, c, o), dy, (o, 1), other, (c, 1));
                let mut dims = dyl.dims().to_vec();
                *dims.last_mut().expect("rank >= 1") = c;
                Ok((T::storage(dx), Shape::from(dims)))
            }
            LinearBwd::Dw(p) => {
                let c = *ol.dims().last().expect("rank >= 1");
                let dw = gemm_new_in(*p, (o, c, n), dy, (1, o), other, (c, 1));
                Ok((T::storage(dw), Shape::from((o, c))))
            }
            LinearBwd::Db => {
                // Column sums over row blocks, the blocks' partial sums added in a fixed order
                // so that the result does not depend on the thread count.
                const ROWS: usize = 256;
                let parts: Vec<Vec<T>> = dy
                    .par_chunks(ROWS * o.max(1))
                    .map(|block| {
                        let mut acc = vec![T::ZERO; o];
                        for row in block.chunks(o) {
                            for (a, &v) in acc.iter_mut().zip(row) {
                                *a += v;
                            }
                        }
                        acc
                    })
                    .collect();
                let mut db = vec![T::ZERO; o];
                for p in parts {
                    for (a, v) in db.iter_mut().zip(p) {
                        *a += v;
                    }
                }
                Ok((T::storage(db), Shape::from(o)))
            }
        }
    }
}

impl CustomOp2 for LinearBwd {
    fn name(&self) -> &'static str {
        "taper-linear-bwd"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> Result<(CpuStorage, Shape)> {
        dispatch!(self.name(), s1, T => self.run::<T>(slice(self.name(), s1, l1)?, l1, slice(self.name(), s2, l2)?, l2))
    }
}

/// GELU(u + b) over a linear's product u (.., o) and its bias b (o) in one kernel, the CUDA
/// path of [`linear_gelu`] with a bias (cuda/linear.cu).
#[cfg(feature = "cuda")]
mod cuda {
    use candle_core::{CpuStorage, CudaStorage, CustomOp2, CustomOp3, Layout, Result, Shape, Tensor};

    const LINEAR_PTX: (&str, &str) = ("taper_linear", crate::ptx::LINEAR);

    pub(super) struct BiasGelu {
        pub(super) tanh: bool,
    }

    /// du = grad GELU'(u + b), of u's shape.
    struct BiasGeluBwd {
        tanh: bool,
    }

    fn form(tanh: bool) -> &'static str {
        if tanh {
            "tanh"
        } else {
            "erf"
        }
    }

    impl CustomOp2 for BiasGelu {
        fn name(&self) -> &'static str {
            "taper-bias-gelu"
        }

        fn cpu_fwd(&self, _: &CpuStorage, _: &Layout, _: &CpuStorage, _: &Layout) -> Result<(CpuStorage, Shape)> {
            Err(crate::bad(self.name(), "the CUDA path only (the CPU's linear_gelu is one op of its own)"))
        }

        fn cuda_fwd(
            &self,
            s1: &CudaStorage,
            l1: &Layout,
            s2: &CudaStorage,
            l2: &Layout,
        ) -> Result<(CudaStorage, Shape)> {
            let name = format!("bias_gelu_{}_fwd", form(self.tanh));
            Ok((
                crate::cuda::map(self.name(), LINEAR_PTX, &name, &[(s1, l1), (s2, l2)], 1, Some(1))?,
                l1.shape().clone(),
            ))
        }

        fn bwd(&self, u: &Tensor, b: &Tensor, _y: &Tensor, grad: &Tensor) -> Result<(Option<Tensor>, Option<Tensor>)> {
            let du = u.apply_op3_no_bwd(b, &grad.contiguous()?, &BiasGeluBwd { tanh: self.tanh })?;
            let o = b.elem_count();
            let db = du.reshape((du.elem_count() / o, o))?.sum(0)?; // (o)
            Ok((Some(du), Some(db)))
        }
    }

    impl CustomOp3 for BiasGeluBwd {
        fn name(&self) -> &'static str {
            "taper-bias-gelu-bwd"
        }

        fn cpu_fwd(
            &self,
            _: &CpuStorage,
            _: &Layout,
            _: &CpuStorage,
            _: &Layout,
            _: &CpuStorage,
            _: &Layout,
        ) -> Result<(CpuStorage, Shape)> {
            Err(crate::bad(self.name(), "the CUDA path only"))
        }

        fn cuda_fwd(
            &self,
            s1: &CudaStorage,
            l1: &Layout,
            s2: &CudaStorage,
            l2: &Layout,
            s3: &CudaStorage,
            l3: &Layout,
        ) -> Result<(CudaStorage, Shape)> {
            let name = format!("bias_gelu_{}_bwd", form(self.tanh));
            Ok((
                crate::cuda::map(self.name(), LINEAR_PTX, &name, &[(s1, l1), (s2, l2), (s3, l3)], 1, Some(1))?,
                l1.shape().clone(),
            ))
        }
    }
}
