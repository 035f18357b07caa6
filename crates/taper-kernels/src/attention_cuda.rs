//! The CUDA twin of the fused attention (cuda/attention.cu): a tiled forward that keeps the
//! output and one f32 logsumexp per query row, and a backward that rebuilds the probabilities
//! from q, k and that logsumexp (D_i = rowsum(dO ∘ O), then dq per query tile and dk, dv per
//! key tile, each gradient owned by one block, so nothing is added atomically).
//!
//! It takes head sizes 64 and 128 without dropout; [`attention`] answers None for anything
//! else, and the caller takes the composed path.

use crate::attention_opts::AttnOpts;
use candle_core::{Result, Tensor};

/// Sizes of one call: b, hq, hkv, tq, tk, d, as `attention::Dims` (already checked).
pub(crate) type Sizes = [usize; 6];

/// CUDA's limit on a grid's y and z (the kernels' heads and batch rows).
const GRID_YZ: usize = 65_535;

/// Attention on the CUDA kernels when they take these tensors: q (B, Hq, Tq, D), k and v
/// (B, Hkv, Tk, D), or with `bthd` the projections' layout (B, Tq, Hq·D) and (B, Tk, Hkv·D),
/// returning the output in q's layout. None: the caller takes the composed path (the kernels
/// are off, or this head size or dropout has no kernel, which is said once per process).
pub(crate) fn attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    sizes: Sizes,
    opts: &AttnOpts,
    bthd: bool,
) -> Result<Option<Tensor>> {
    if !crate::float::twin(&[q, k, v]) {
        return Ok(None);
    }
    let [b, hq, hkv, tq, tk, d] = sizes;
    // Nothing for a kernel to do (and no empty grids to launch): the composed path's zeros; or
    // more batch rows or heads than a grid's y and z take.
    // Grids' x dims (query rows, key tiles) are u32 counts of blocks, capped at 2^31 - 1.
    let too_long = (b * hq * tq).max(tk) > i32::MAX as usize;
    if b * hq * tq * d == 0 || tk == 0 || b.max(hq).max(hkv) > GRID_YZ || too_long {
        return Ok(None);
    }
    // Dropout at p = 0 drops nothing: the kernel takes it.
    if !matches!(d, 64 | 128) || opts.dropout.is_some_and(|(p, _)| p > 0.0) {
        static SAID: std::sync::Once = std::sync::Once::new();
        SAID.call_once(|| {
            eprintln!(
                "taper: the CUDA attention kernel takes head sizes 64 and 128 without dropout; this call (head size \
                 {d}, dropout {:?}) and others like it take the composed path",
                opts.dropout.map(|(p, _)| p)
            )
        });
        return Ok(None);
    }
    run(q, k, v, sizes, opts, bthd).map(Some)
}

#[cfg(not(feature = "cuda"))]
fn run(_q: &Tensor, _k: &Tensor, _v: &Tensor, _sizes: Sizes, _opts: &AttnOpts, _bthd: bool) -> Result<Tensor> {
    Err(crate::bad("flash-attention", "built without the cuda feature"))
}

#[cfg(feature = "cuda")]
fn run(q: &Tensor, k: &Tensor, v: &Tensor, sizes: Sizes, opts: &AttnOpts, bthd: bool) -> Result<Tensor> {
    imp::run(q, k, v, sizes, opts, bthd)
}

#[cfg(feature = "cuda")]
mod imp {
    use super::Sizes;
    use crate::attention_opts::AttnOpts;
    use crate::cuda::{cuda_dispatch, output, suffix, view};
    use candle_core::backend::BackendStorage;
    use candle_core::cuda_backend::cudarc::driver::{CudaSlice, DeviceRepr, LaunchArgs, LaunchConfig, PushKernelArg};
    use candle_core::cuda_backend::WrapErr;
    use candle_core::{CudaStorage, Device, Layout, Result, Shape, Tensor};
    use std::sync::{Arc, Mutex};

    const NAME: &str = "flash-attention";
    const MODULE: &str = "taper_attention";
    const PTX: &str = crate::ptx::ATTENTION;
    /// Query rows per block of the forward and of dq, and their threads (4 per row).
    const BQ: usize = 64;
    const THREADS: u32 = 256;
    /// Keys per block of dk, dv (8 threads per key).
    const BKV: usize = 32;
    /// Rows of D_i per block (a warp each).
    const DI_ROWS: usize = 8;

    /// The kernels' `AttnDims`, field for field.
    #[repr(C)]
    #[derive(Clone, Copy, Debug)]
    struct AttnDims {
        b: i64,
        hq: i64,
        hkv: i64,
        tq: i64,
        tk: i64,
        /// Strides of a head and of a position in q, o, dO and dq (elements).
        q_sh: i64,
        q_st: i64,
        /// The same in k, v, dk and dv.
        k_sh: i64,
        k_st: i64,
        window: i64,
        causal: i32,
        scale: f32,
    }

    // SAFETY: a plain #[repr(C)] struct of integers and a float, passed by value, laid out as
    // the kernels' `AttnDims`.
    unsafe impl DeviceRepr for AttnDims {}

    /// The masks on the device: key padding (B·Tk, 1 = padding), query and key segments.
    struct Masks {
        pad: Option<CudaSlice<u8>>,
        qseg: Option<CudaSlice<u32>>,
        kseg: Option<CudaSlice<u32>>,
    }

    /// What the forward and the backward launch with.
    struct Call {
        dims: AttnDims,
        d: usize,
        masks: Arc<Masks>,
    }

    /// A null device pointer, for an absent mask.
    const NULL: u64 = 0;

    fn push_mask<'a, T>(b: &mut LaunchArgs<'a>, m: &'a Option<CudaSlice<T>>) {
        match m {
            Some(s) => b.arg(s),
            None => b.arg(&NULL),
        };
    }

    impl Call {
        fn push_masks<'a>(&'a self, b: &mut LaunchArgs<'a>) {
            push_mask(b, &self.masks.pad);
            push_mask(b, &self.masks.qseg);
            push_mask(b, &self.masks.kseg);
        }

        fn sizes(&self) -> (usize, usize, usize, usize, usize) {
            let AttnDims { b, hq, hkv, tq, tk, .. } = self.dims;
            (b as usize, hq as usize, hkv as usize, tq as usize, tk as usize)
        }

        /// The instance of `kernel` for this head size and `dt`, e.g. flash_fwd_d128_bf16.
        fn kernel(&self, kernel: &str, dt: candle_core::DType) -> Result<String> {
            Ok(format!("{kernel}_d{}_{}", self.d, suffix(NAME, dt)?))
        }

        /// One block per (query tile, query head, batch row).
        fn per_query_tile(&self) -> LaunchConfig {
            let (b, hq, _, tq, _) = self.sizes();
            LaunchConfig {
                grid_dim: (tq.div_ceil(BQ) as u32, hq as u32, b as u32),
                block_dim: (THREADS, 1, 1),
                shared_mem_bytes: 0,
            }
        }
    }

    pub(super) fn run(q: &Tensor, k: &Tensor, v: &Tensor, sizes: Sizes, opts: &AttnOpts, bthd: bool) -> Result<Tensor> {
        let [b, hq, hkv, tq, tk, d] = sizes;
        let Device::Cuda(dev) = q.device() else {
            return Err(crate::bad(NAME, "the CUDA attention takes CUDA tensors"));
        };
        let masks = Masks {
            pad: match &opts.key_padding {
                Some(kp) => Some(dev.clone_htod(&kp.iter().map(|&p| u8::from(p)).collect::<Vec<u8>>())?),
                None => None,
            },
            qseg: match &opts.segments {
                Some((qs, _)) => Some(dev.clone_htod(qs.as_slice())?),
                None => None,
            },
            kseg: match &opts.segments {
                Some((_, ks)) => Some(dev.clone_htod(ks.as_slice())?),
                None => None,
            },
        };
        // (B, H, T, D): a head is T·D apart and a position D; (B, T, H·D): a head D, a position H·D.
        let (q_sh, q_st, k_sh, k_st) = if bthd { (d, hq * d, d, hkv * d) } else { (tq * d, d, tk * d, d) };
        let dims = AttnDims {
            b: b as i64,
            hq: hq as i64,
            hkv: hkv as i64,
            tq: tq as i64,
            tk: tk as i64,
            q_sh: q_sh as i64,
            q_st: q_st as i64,
            k_sh: k_sh as i64,
            k_st: k_st as i64,
            // A window past any position is none, as on the CPU.
            window: opts.window.min(i64::MAX as usize) as i64,
            causal: i32::from(opts.causal),
            scale: opts.scale as f32,
        };
        let op = FlashAttention { call: Call { dims, d, masks: Arc::new(masks) }, lse: Mutex::new(None) };
        q.contiguous()?.apply_op3(&k.contiguous()?, &v.contiguous()?, op)
    }

    /// The forward op; it keeps the logsumexp (B, Hq, Tq) for its backward.
    struct FlashAttention {
        call: Call,
        lse: Mutex<Option<CudaSlice<f32>>>,
    }

    impl candle_core::CustomOp3 for FlashAttention {
        fn name(&self) -> &'static str {
            NAME
        }

        fn cpu_fwd(
            &self,
            _: &candle_core::CpuStorage,
            _: &Layout,
            _: &candle_core::CpuStorage,
            _: &Layout,
            _: &candle_core::CpuStorage,
            _: &Layout,
        ) -> Result<(candle_core::CpuStorage, Shape)> {
            Err(crate::bad(NAME, "the CUDA attention runs on CUDA tensors only"))
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
            let c = &self.call;
            let (b, hq, _, tq, _) = c.sizes();
            let (dev, dt) = (s1.device().clone(), s1.dtype());
            let func = dev.get_or_load_custom_func(&c.kernel("flash_fwd", dt)?, MODULE, PTX)?;
            cuda_dispatch!(NAME, dt, T => {
                let (q, k, v) = (view::<T>(NAME, s1, l1)?, view::<T>(NAME, s2, l2)?, view::<T>(NAME, s3, l3)?);
                let mut o = output::<T>(&dev, q.len())?;
                let mut lse = output::<f32>(&dev, b * hq * tq)?;
                let mut a = func.builder();
                a.arg(&q).arg(&k).arg(&v);
                c.push_masks(&mut a);
                a.arg(&mut o).arg(&mut lse).arg(&c.dims);
                // SAFETY: flash_fwd takes (q, k, v, pad, qseg, kseg, o, lse, dims) and writes every
                // element of o and lse: a block per 64 query rows of each (head, batch row).
                unsafe { a.launch(c.per_query_tile()) }.w()?;
                *self.lse.lock().unwrap_or_else(|e| e.into_inner()) = Some(lse);
                Ok((CudaStorage::wrap_cuda_slice(o, dev.clone()), l1.shape().clone()))
            })
        }

        fn bwd(
            &self,
            q: &Tensor,
            k: &Tensor,
            v: &Tensor,
            out: &Tensor,
            grad: &Tensor,
        ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
            let guard = self.lse.lock().unwrap_or_else(|e| e.into_inner());
            let lse = guard.as_ref().ok_or_else(|| crate::bad(NAME, "no saved logsumexp: the forward did not run"))?;
            // A custom op takes three tensors: k with v and O with dO go in side by side (copies of
            // T·D per head, small beside the T²·D of the backward itself).
            let kv = Tensor::cat(&[&k.flatten_all()?, &v.flatten_all()?], 0)?;
            let og = Tensor::cat(&[&out.contiguous()?.flatten_all()?, &grad.contiguous()?.flatten_all()?], 0)?;
            let all = q.contiguous()?.apply_op3_no_bwd(&kv, &og, &FlashBackward { call: &self.call, lse })?;
            let (nq, nk) = (q.elem_count(), k.elem_count());
            let dq = all.narrow(0, 0, nq)?.reshape(q.shape())?;
            let dk = all.narrow(0, nq, nk)?.reshape(k.shape())?;
            let dv = all.narrow(0, nq + nk, nk)?.reshape(v.shape())?;
            Ok((Some(dq), Some(dk), Some(dv)))
        }
    }

    /// The backward over (q, [k; v], [O; dO]), all contiguous, writing [dq; dk; dv] flat.
    struct FlashBackward<'a> {
        call: &'a Call,
        lse: &'a CudaSlice<f32>,
    }

    impl candle_core::CustomOp3 for FlashBackward<'_> {
        fn name(&self) -> &'static str {
            "flash-attention-bwd"
        }

        fn cpu_fwd(
            &self,
            _: &candle_core::CpuStorage,
            _: &Layout,
            _: &candle_core::CpuStorage,
            _: &Layout,
            _: &candle_core::CpuStorage,
            _: &Layout,
        ) -> Result<(candle_core::CpuStorage, Shape)> {
            Err(crate::bad(NAME, "the CUDA attention runs on CUDA tensors only"))
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
            let c = self.call;
            let (b, hq, hkv, tq, tk) = c.sizes();
            let (dev, dt) = (s1.device().clone(), s1.dtype());
            let (nq, nk, rows) = (b * hq * tq * c.d, b * hkv * tk * c.d, b * hq * tq);
            let f_di = dev.get_or_load_custom_func(&c.kernel("flash_di", dt)?, MODULE, PTX)?;
            let f_dq = dev.get_or_load_custom_func(&c.kernel("flash_dq", dt)?, MODULE, PTX)?;
            let f_dkdv = dev.get_or_load_custom_func(&c.kernel("flash_dkdv", dt)?, MODULE, PTX)?;
            cuda_dispatch!(NAME, dt, T => {
                let (q, kv, og) = (view::<T>(NAME, s1, l1)?, view::<T>(NAME, s2, l2)?, view::<T>(NAME, s3, l3)?);
                if q.len() != nq || kv.len() != 2 * nk || og.len() != 2 * nq || self.lse.len() < rows {
                    return Err(crate::bad(NAME, "backward operands of unexpected sizes"));
                }
                let (k, v) = (kv.slice(..nk), kv.slice(nk..));
                let (o, g) = (og.slice(..nq), og.slice(nq..));
                let mut di = output::<f32>(&dev, rows)?;
                let mut all = output::<T>(&dev, nq + 2 * nk)?;
                {
                    let mut a = f_di.builder();
                    a.arg(&o).arg(&g).arg(&mut di).arg(&c.dims);
                    let cfg = LaunchConfig {
                        grid_dim: (rows.div_ceil(DI_ROWS) as u32, 1, 1),
                        block_dim: (32 * DI_ROWS as u32, 1, 1),
                        shared_mem_bytes: 0,
                    };
                    // SAFETY: flash_di takes (o, g, di, dims) and writes di for every one of the
                    // B·Hq·Tq rows, a warp each.
                    unsafe { a.launch(cfg) }.w()?;
                }
                let (mut dq, mut dkv) = all.split_at_mut(nq);
                {
                    let mut a = f_dq.builder();
                    a.arg(&q).arg(&k).arg(&v).arg(&g).arg(self.lse).arg(&di);
                    c.push_masks(&mut a);
                    a.arg(&mut dq).arg(&c.dims);
                    // SAFETY: flash_dq takes (q, k, v, dO, lse, di, pad, qseg, kseg, dq, dims) and
                    // writes every element of dq, its blocks laid out as the forward's.
                    unsafe { a.launch(c.per_query_tile()) }.w()?;
                }
                {
                    let mut a = f_dkdv.builder();
                    a.arg(&q).arg(&k).arg(&v).arg(&g).arg(self.lse).arg(&di);
                    c.push_masks(&mut a);
                    a.arg(&mut dkv).arg(&c.dims);
                    let cfg = LaunchConfig {
                        grid_dim: (tk.div_ceil(BKV) as u32, hkv as u32, b as u32),
                        block_dim: (THREADS, 1, 1),
                        shared_mem_bytes: 0,
                    };
                    // SAFETY: flash_dkdv takes (q, k, v, dO, lse, di, pad, qseg, kseg, dkv, dims) and
                    // writes dk then dv (2·B·Hkv·Tk·D elements): a block per 32 keys of each
                    // (key/value head, batch row).
                    unsafe { a.launch(cfg) }.w()?;
                }
                Ok((CudaStorage::wrap_cuda_slice(all, dev.clone()), Shape::from(nq + 2 * nk)))
            })
        }
    }
}
