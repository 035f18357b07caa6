//! AdamW and Lion updates written into the parameter and state tensors in place: no tensor is
//! allocated per parameter per step. Each update repeats the composed candle expression
//! operation for operation (candle's scalar ops are `x * mul + add` in the tensor's dtype), so
//! the in-place and composed optimizers agree bit for bit. On CUDA (f32, kernels on) the same
//! updates run as kernels of cuda/optim.cu, per tensor or, through [`adamw_step_many`] and
//! [`lion_step_many`], over all of a model's parameters in one launch.

use crate::float::{fused, simd, slice, slice_mut, twin, Float, MIN_TASK_ELEMS};
use candle_core::{CpuStorage, DType, Layout, Result, Tensor};
use rayon::prelude::*;

/// The CUDA twins' module, cuda/optim.cu.
#[cfg(feature = "cuda")]
const OPTIM_PTX: (&str, &str) = ("taper_optim", crate::ptx::OPTIM);

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
    let k = AdamScalars::new(h)?;
    if !fused(&[w, m, v, g]) && !twin_f32(&[w, m, v, g]) {
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
    if !fused(&[w, m, g]) && !twin_f32(&[w, m, g]) {
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

/// [`adamw_step`] for many parameters `(w, m, v, g)` with one set of hyper-parameters (a group
/// with one weight decay). On CUDA in f32 with the kernels on, one kernel updates them all (the
/// same operations as [`adamw_step`], so the same bits); elsewhere, or when two of the tensors
/// share memory, it is [`adamw_step`] for each in turn. No other thread may use these tensors
/// while the step runs (as for any optimizer step).
pub fn adamw_step_many(params: &[(&Tensor, &Tensor, &Tensor, &Tensor)], h: &AdamW) -> Result<()> {
    for (w, m, v, g) in params {
        check("adamw", &[w, m, v], g)?;
    }
    #[cfg(feature = "cuda")]
    {
        let k = AdamScalars::new(h)?;
        let gs = params.iter().map(|p| p.3.contiguous()).collect::<Result<Vec<_>>>()?;
        let sets: Vec<Vec<&Tensor>> = params.iter().zip(&gs).map(|((w, m, v, _), g)| vec![*w, *m, *v, g]).collect();
        let s = [k.one_minus_b1, k.b2, k.one_minus_b2, k.inv_bc2_sqrt, k.eps, k.decay, k.step_size];
        if many::run("adamw", "adamw_many", &sets, 3, &s.map(|x| x as f32))? {
            return Ok(());
        }
    }
    for (w, m, v, g) in params {
        adamw_step(w, m, v, g, h)?;
    }
    Ok(())
}

/// [`lion_step`] for many parameters `(w, m, g)` with one set of hyper-parameters, as
/// [`adamw_step_many`]: one kernel on CUDA in f32 with the kernels on, else a loop.
pub fn lion_step_many(params: &[(&Tensor, &Tensor, &Tensor)], h: &Lion) -> Result<()> {
    for (w, m, g) in params {
        check("lion", &[w, m], g)?;
    }
    #[cfg(feature = "cuda")]
    {
        let gs = params.iter().map(|p| p.2.contiguous()).collect::<Result<Vec<_>>>()?;
        let sets: Vec<Vec<&Tensor>> = params.iter().zip(&gs).map(|((w, m, _), g)| vec![*w, *m, g]).collect();
        let s = [1.0 - h.lr * h.weight_decay, h.beta1, 1.0 - h.beta1, h.lr, h.beta2, 1.0 - h.beta2];
        if many::run("lion", "lion_many", &sets, 2, &s.map(|x| x as f32))? {
            return Ok(());
        }
    }
    for (w, m, g) in params {
        lion_step(w, m, g, h)?;
    }
    Ok(())
}

/// Whether the CUDA twins take these tensors: they are f32 only, as the CPU ops (bf16 and f16
/// parameters take the composed path).
fn twin_f32(ts: &[&Tensor]) -> bool {
    ts.first().is_some_and(|t| t.dtype() == DType::F32) && twin(ts)
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

impl AdamScalars {
    fn new(h: &AdamW) -> Result<Self> {
        let t = i32::try_from(h.step).map_err(|_| crate::bad("adamw", format!("step {} too large", h.step)))?;
        let bc1 = 1.0 - h.beta1.powi(t);
        let bc2_sqrt = (1.0 - h.beta2.powi(t)).sqrt();
        // The scalars as the composed version applies them: m + (g - m) (1 - b1),
        // v b2 + g^2 (1 - b2), sqrt(v) / bc2_sqrt + eps, w (1 - lr wd) - m / denom (lr / bc1).
        Ok(AdamScalars {
            one_minus_b1: 1.0 - h.beta1,
            b2: h.beta2,
            one_minus_b2: 1.0 - h.beta2,
            inv_bc2_sqrt: 1.0 / bc2_sqrt,
            eps: h.eps,
            decay: 1.0 - h.lr * h.weight_decay,
            step_size: h.lr / bc1,
        })
    }
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

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &mut candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
    ) -> Result<()> {
        let (name, b, a) = match *self {
            Moment::Lerp(a) => ("moment_lerp", None, a),
            Moment::Square(b, a) => ("moment_square", Some(b), a),
            Moment::Linear(b, a) => ("moment_linear", Some(b), a),
        };
        let scalars: Vec<f32> = b.into_iter().chain([a]).map(|x| x as f32).collect();
        many::in_place("moment", name, (s1, l1), &[(s2, l2)], &scalars)
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

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &mut candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
        s3: &candle_core::CudaStorage,
        l3: &Layout,
    ) -> Result<()> {
        let k = &self.0;
        let scalars = [k.inv_bc2_sqrt, k.eps, k.decay, k.step_size].map(|x| x as f32);
        many::in_place("adamw", "adamw_update", (s1, l1), &[(s2, l2), (s3, l3)], &scalars)
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

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &mut candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
        s3: &candle_core::CudaStorage,
        l3: &Layout,
    ) -> Result<()> {
        let scalars = [self.decay, self.b1, self.one_minus_b1, self.lr].map(|x| x as f32);
        many::in_place("lion", "lion_update", (s1, l1), &[(s2, l2), (s3, l3)], &scalars)
    }
}

/// The launches of cuda/optim.cu: one tensor updated in place, or many at once.
#[cfg(feature = "cuda")]
mod many {
    use super::OPTIM_PTX;
    use candle_core::backend::BackendStorage;
    use candle_core::cuda_backend::cudarc::driver::{DevicePtr, LaunchConfig, PushKernelArg};
    use candle_core::cuda_backend::WrapErr;
    use candle_core::{CudaStorage, DType, Layout, Result, Storage, Tensor};

    const THREADS: u32 = 256;
    /// Elements per chunk of the many-tensor kernels: 16 per thread of a block.
    const CHUNK: usize = 16 * THREADS as usize;
    /// The kernels loop over their elements (or chunks), so any grid covers them; this one
    /// stays within every GPU's limit.
    const MAX_BLOCKS: usize = 65_535;

    fn grid(units: usize) -> LaunchConfig {
        let blocks = units.clamp(1, MAX_BLOCKS) as u32;
        LaunchConfig { grid_dim: (blocks, 1, 1), block_dim: (THREADS, 1, 1), shared_mem_bytes: 0 }
    }

    /// Runs `<name>_f32(dst, srcs..., scalars..., n)`, which updates dst's n elements in place.
    pub(super) fn in_place(
        op: &'static str,
        name: &str,
        (dst, dl): (&mut CudaStorage, &Layout),
        srcs: &[(&CudaStorage, &Layout)],
        scalars: &[f32],
    ) -> Result<()> {
        if dst.dtype() != DType::F32 {
            return Err(crate::bad(op, format!("the CUDA kernels take f32 only, not {:?}", dst.dtype())));
        }
        let n = dl.shape().elem_count();
        if n == 0 {
            return Ok(());
        }
        let dev = dst.device().clone();
        let func = dev.get_or_load_custom_func(&format!("{name}_f32"), OPTIM_PTX.0, OPTIM_PTX.1)?;
        let views = srcs.iter().map(|(s, l)| crate::cuda::view::<f32>(op, s, l)).collect::<Result<Vec<_>>>()?;
        if views.iter().any(|v| v.len() != n) {
            return Err(crate::bad(op, "state and gradient of different sizes"));
        }
        let (start, end) = dl.contiguous_offsets().ok_or_else(|| crate::bad(op, "parameter is not contiguous"))?;
        let mut out = dst.as_cuda_slice_mut::<f32>()?.slice_mut(start..end);
        let n64 = n as u64;
        let mut b = func.builder();
        b.arg(&mut out);
        for v in &views {
            b.arg(v);
        }
        for s in scalars {
            b.arg(s);
        }
        b.arg(&n64);
        // SAFETY: the kernel takes (dst, srcs..., scalars..., n) and touches elements [0, n) of each.
        unsafe { b.launch(grid(n.div_ceil(THREADS as usize))) }.w()?;
        Ok(())
    }

    /// Runs `<name>_f32(table, p, c, chunk, scalars...)` over `sets`: per parameter its tensors
    /// (contiguous, f32, of one size, on one CUDA device), the first `written` of them updated
    /// in place, the rest read. Returns false, having launched nothing, when a written tensor
    /// shares memory with another tensor: the caller then updates them one by one.
    pub(super) fn run(
        op: &'static str,
        name: &str,
        sets: &[Vec<&Tensor>],
        written: usize,
        scalars: &[f32],
    ) -> Result<bool> {
        let all: Vec<&Tensor> = sets.iter().flatten().copied().collect();
        if !super::twin_f32(&all) {
            return Ok(false);
        }
        let (p, k) = (sets.len(), sets[0].len());
        // SAFETY of what follows: the kernel writes w and the states through pointers taken
        // under candle's read locks, since candle lends no write lock outside its crate. The
        // locks are held until the launch is queued; every candle op on this device runs on
        // the same stream, so each op queued later sees the update. The caller's contract (no
        // other thread uses these tensors during the step) stands in for the write lock.
        let locked: Vec<_> = all.iter().map(|t| t.storage_and_layout()).collect();
        let mut views = Vec::with_capacity(locked.len());
        let mut dev = None;
        for (s, l) in &locked {
            let Storage::Cuda(cs) = &**s else { return Ok(false) };
            dev.get_or_insert_with(|| cs.device().clone());
            views.push(crate::cuda::view::<f32>(op, cs, l)?);
        }
        let Some(dev) = dev else { return Ok(true) };
        let stream = dev.cuda_stream();
        let mut ptrs = Vec::with_capacity(views.len());
        let mut syncs = Vec::with_capacity(views.len());
        for v in &views {
            let (ptr, sync) = v.device_ptr(&stream);
            ptrs.push(ptr);
            syncs.push(sync);
        }
        // (start, end, written) of every tensor's bytes.
        let mut ranges: Vec<(u64, u64, bool)> = (0..p * k)
            .filter(|&i| !views[i].is_empty())
            .map(|i| (ptrs[i], ptrs[i] + 4 * views[i].len() as u64, i % k < written))
            .collect();
        ranges.sort_unstable();
        let (mut any_end, mut written_end) = (0u64, 0u64);
        for &(start, end, w) in &ranges {
            if start < written_end || (w && start < any_end) {
                return Ok(false);
            }
            any_end = any_end.max(end);
            if w {
                written_end = written_end.max(end);
            }
        }
        // The table cuda/optim.cu describes: pointers, sizes, each chunk's tensor and start.
        let sizes: Vec<usize> = sets.iter().map(|s| s[0].elem_count()).collect();
        let chunks: Vec<(u64, u64)> = sizes
            .iter()
            .enumerate()
            .flat_map(|(t, &n)| (0..n).step_by(CHUNK).map(move |s| (t as u64, s as u64)))
            .collect();
        let c = chunks.len();
        if c == 0 {
            return Ok(true);
        }
        let mut table = ptrs;
        table.extend(sizes.iter().map(|&n| n as u64));
        table.extend(chunks.iter().map(|&(t, _)| t));
        table.extend(chunks.iter().map(|&(_, s)| s));
        let table = dev.clone_htod(&table)?;
        let func = dev.get_or_load_custom_func(&format!("{name}_f32"), OPTIM_PTX.0, OPTIM_PTX.1)?;
        let (p64, c64, chunk64) = (p as u64, c as u64, CHUNK as u64);
        let mut b = func.builder();
        b.arg(&table).arg(&p64).arg(&c64).arg(&chunk64);
        for s in scalars {
            b.arg(s);
        }
        // SAFETY: the table holds p tensors' pointers and sizes and c chunks within them, as
        // the kernel reads it; the tensors' memory does not overlap where one is written.
        unsafe { b.launch(grid(c)) }.w()?;
        drop(syncs);
        Ok(true)
    }
}
