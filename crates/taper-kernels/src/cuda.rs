//! The CUDA twins' shared plumbing: typed views of candle's device storage, fresh outputs and
//! kernel launches. The kernels themselves are CUDA C under cuda/, compiled to PTX by build.rs
//! (one module per file, its text in `crate::ptx::<FILE>`); each is instantiated for f32, bf16
//! and f16 as `<name>_f32`, `<name>_bf16`, `<name>_f16`, computing in f32 whatever it stores.

use candle_core::cuda_backend::cudarc::driver::{CudaSlice, CudaView, DeviceRepr, LaunchConfig};
use candle_core::cuda_backend::{CudaDType, CudaDevice};
use candle_core::{CudaStorage, DType, Layout, Result};

/// The suffix of a kernel's instance for elements of `dt`.
pub(crate) fn suffix(op: &'static str, dt: DType) -> Result<&'static str> {
    match dt {
        DType::F32 => Ok("f32"),
        DType::BF16 => Ok("bf16"),
        DType::F16 => Ok("f16"),
        dt => Err(crate::bad(op, format!("the CUDA kernels take f32, bf16 or f16, not {dt:?}"))),
    }
}

/// The elements of a contiguous operand (the public functions make their inputs contiguous
/// before applying an op, as on the CPU).
pub(crate) fn view<'a, T: CudaDType>(op: &'static str, s: &'a CudaStorage, l: &Layout) -> Result<CudaView<'a, T>> {
    let (start, end) = l.contiguous_offsets().ok_or_else(|| crate::bad(op, "operand is not contiguous"))?;
    Ok(s.as_cuda_slice::<T>()?.slice(start..end))
}

/// A fresh buffer of `n` elements (at least one, as CUDA allocations must be) that the kernel
/// about to run writes in full.
pub(crate) fn output<T: DeviceRepr>(dev: &CudaDevice, n: usize) -> Result<CudaSlice<T>> {
    // SAFETY: every caller launches a kernel that writes all n elements before anything reads them.
    unsafe { dev.alloc::<T>(n.max(1)) }
}

/// A zeroed buffer, for kernels that accumulate into their output.
pub(crate) fn zeros<T: DeviceRepr + candle_core::cuda_backend::cudarc::driver::ValidAsZeroBits>(
    dev: &CudaDevice,
    n: usize,
) -> Result<CudaSlice<T>> {
    dev.alloc_zeros::<T>(n.max(1))
}

/// One thread per element, 256 to a block; an error past the grid's limit (2^31 - 1 blocks),
/// where a u32 count of elements would have wrapped long before (an (N, V) of logits passes
/// 2^32 soon enough).
pub(crate) fn per_element(op: &'static str, n: usize) -> Result<LaunchConfig> {
    let blocks = n.div_ceil(256).max(1);
    if blocks > i32::MAX as usize {
        return Err(crate::bad(op, format!("{n} elements are too many for one launch")));
    }
    Ok(LaunchConfig { grid_dim: (blocks as u32, 1, 1), block_dim: (256, 1, 1), shared_mem_bytes: 0 })
}

/// One block of `threads` per row (rows of a norm, a softmax, a cross-entropy); an error past
/// the grid's limit rather than rows left unwritten.
pub(crate) fn per_row(op: &'static str, rows: usize, threads: u32) -> Result<LaunchConfig> {
    if rows > i32::MAX as usize {
        return Err(crate::bad(op, format!("{rows} rows are too many for one launch")));
    }
    Ok(LaunchConfig { grid_dim: (rows.max(1) as u32, 1, 1), block_dim: (threads, 1, 1), shared_mem_bytes: 0 })
}

/// Runs `$body` with `$T` bound to the Rust element type of `$dt` (f32, bf16 or f16).
#[allow(unused_macros)]
macro_rules! cuda_dispatch {
    ($op:expr, $dt:expr, $T:ident => $body:expr) => {
        match $dt {
            candle_core::DType::F32 => {
                type $T = f32;
                $body
            }
            candle_core::DType::BF16 => {
                type $T = half::bf16;
                $body
            }
            candle_core::DType::F16 => {
                type $T = half::f16;
                $body
            }
            dt => Err(crate::bad($op, format!("the CUDA kernels take f32, bf16 or f16, not {dt:?}"))),
        }
    };
}
#[allow(unused_imports)]
pub(crate) use cuda_dispatch;

/// Runs the element-wise kernel `<name>_<suffix>` of `module` (its PTX `ptx`): one thread per
/// element of the n-element inputs (all contiguous, one dtype), which writes `outputs` x n
/// elements of one fresh buffer; the kernel's arguments are the inputs, the output and n. With
/// `bias = Some(i)`, input i is instead one row of o elements repeated along the n (o dividing
/// n), and the kernel takes o after n.
pub(crate) fn map(
    op: &'static str,
    (module, ptx): (&'static str, &'static str),
    name: &str,
    inputs: &[(&CudaStorage, &Layout)],
    outputs: usize,
    bias: Option<usize>,
) -> Result<CudaStorage> {
    use candle_core::backend::BackendStorage;
    use candle_core::cuda_backend::cudarc::driver::PushKernelArg;
    use candle_core::cuda_backend::WrapErr;
    let (first, l0) = inputs.first().ok_or_else(|| crate::bad(op, "no inputs"))?;
    let (dev, dt, n) = (first.device().clone(), first.dtype(), l0.shape().elem_count());
    let o = match bias {
        Some(i) => {
            let (_, bl) = inputs.get(i).ok_or_else(|| crate::bad(op, "no bias input"))?;
            let o = bl.shape().elem_count();
            if o == 0 || n % o != 0 {
                return Err(crate::bad(op, format!("a bias of {o} for a product of {n} elements")));
            }
            Some(o)
        }
        None => None,
    };
    let func = dev.get_or_load_custom_func(&format!("{name}_{}", suffix(op, dt)?), module, ptx)?;
    cuda_dispatch!(op, dt, T => {
        let views = inputs.iter().map(|(s, l)| view::<T>(op, s, l)).collect::<Result<Vec<_>>>()?;
        let want = |i: usize| if bias == Some(i) { o.unwrap_or(n) } else { n };
        if views.iter().enumerate().any(|(i, v)| v.len() != want(i)) {
            return Err(crate::bad(op, "inputs of different sizes"));
        }
        let mut out = output::<T>(&dev, outputs * n)?;
        let (n64, o64) = (n as u64, o.unwrap_or(0) as u64);
        let mut b = func.builder();
        for v in &views {
            b.arg(v);
        }
        b.arg(&mut out).arg(&n64);
        if o.is_some() {
            b.arg(&o64);
        }
        // SAFETY: the kernels `map` launches take (inputs..., out, n[, o]), read the bias at
        // i % o < o and the other inputs at i < n, and write outputs x n elements.
        unsafe { b.launch(per_element(op, n)?) }.w()?;
        Ok(CudaStorage::wrap_cuda_slice(out, dev))
    })
}
