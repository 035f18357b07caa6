//! The element types the kernels run on (f32, f64) and access to contiguous CPU storage.

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, Layout, Result, Tensor};
use std::ops::{Add, AddAssign, Div, Mul, Neg, Sub};

/// Rows per rayon task, so that a task moves at least this many elements: smaller tasks cost
/// more to schedule than they save.
pub(crate) const MIN_TASK_ELEMS: usize = 16 * 1024;

pub(crate) trait Float:
    Copy
    + Send
    + Sync
    + PartialOrd
    + Add<Output = Self>
    + Sub<Output = Self>
    + Mul<Output = Self>
    + Div<Output = Self>
    + Neg<Output = Self>
    + AddAssign
    + 'static
{
    const ZERO: Self;
    const ONE: Self;
    fn from_f64(v: f64) -> Self;
    fn to_f64(self) -> f64;
    fn exp(self) -> Self;
    fn ln(self) -> Self;
    fn sqrt(self) -> Self;
    fn tanh(self) -> Self;
    /// candle's own erf, so that gelu_erf matches `Tensor::gelu_erf` bit for bit.
    fn erf(self) -> Self;
    fn slice(s: &CpuStorage) -> Option<&[Self]>;
    fn slice_mut(s: &mut CpuStorage) -> Option<&mut [Self]>;
    fn storage(v: Vec<Self>) -> CpuStorage;
}

macro_rules! impl_float {
    ($t:ty, $variant:ident, $erf:path) => {
        impl Float for $t {
            const ZERO: Self = 0.0;
            const ONE: Self = 1.0;
            #[inline(always)]
            fn from_f64(v: f64) -> Self {
                v as $t
            }
            #[inline(always)]
            fn to_f64(self) -> f64 {
                self as f64
            }
            #[inline(always)]
            fn exp(self) -> Self {
                <$t>::exp(self)
            }
            #[inline(always)]
            fn ln(self) -> Self {
                <$t>::ln(self)
            }
            #[inline(always)]
            fn sqrt(self) -> Self {
                <$t>::sqrt(self)
            }
            #[inline(always)]
            fn tanh(self) -> Self {
                <$t>::tanh(self)
            }
            #[inline(always)]
            fn erf(self) -> Self {
                $erf(self)
            }
            fn slice(s: &CpuStorage) -> Option<&[Self]> {
                match s {
                    CpuStorage::$variant(v) => Some(v),
                    _ => None,
                }
            }
            fn slice_mut(s: &mut CpuStorage) -> Option<&mut [Self]> {
                match s {
                    CpuStorage::$variant(v) => Some(v),
                    _ => None,
                }
            }
            fn storage(v: Vec<Self>) -> CpuStorage {
                CpuStorage::$variant(v)
            }
        }
    };
}

impl_float!(f32, F32, candle_core::cpu::erf::erf_f32);
impl_float!(f64, F64, candle_core::cpu::erf::erf_f64);

/// The elements of a contiguous operand; the public functions make their inputs contiguous
/// before applying an op, so anything else is a bug worth an error rather than a slow path.
pub(crate) fn slice<'a, T: Float>(op: &'static str, s: &'a CpuStorage, l: &Layout) -> Result<&'a [T]> {
    let (start, end) = l.contiguous_offsets().ok_or_else(|| crate::bad(op, "operand is not contiguous"))?;
    let v = T::slice(s).ok_or_else(|| crate::bad(op, format!("operands must share one dtype, got {:?}", s.dtype())))?;
    Ok(&v[start..end])
}

pub(crate) fn slice_mut<'a, T: Float>(op: &'static str, s: &'a mut CpuStorage, l: &Layout) -> Result<&'a mut [T]> {
    let (start, end) = l.contiguous_offsets().ok_or_else(|| crate::bad(op, "operand is not contiguous"))?;
    let dtype = s.dtype();
    let v = T::slice_mut(s).ok_or_else(|| crate::bad(op, format!("operands must share one dtype, got {dtype:?}")))?;
    Ok(&mut v[start..end])
}

/// Whether the fused kernels take these tensors: all on the CPU, all f32 or all f64.
pub(crate) fn fused(ts: &[&Tensor]) -> bool {
    let Some(first) = ts.first() else { return false };
    let dtype = first.dtype();
    matches!(dtype, candle_core::DType::F32 | candle_core::DType::F64)
        && ts.iter().all(|t| t.device().is_cpu() && t.dtype() == dtype)
}

/// Rows per rayon task for rows of `width` elements.
pub(crate) fn rows_per_task(width: usize) -> usize {
    MIN_TASK_ELEMS.div_ceil(width.max(1)).max(1)
}

/// Runs `$body` with `$T` bound to the element type of storage `$s`.
macro_rules! dispatch {
    ($op:expr, $s:expr, $T:ident => $body:expr) => {
        match $s {
            candle_core::CpuStorage::F32(_) => {
                type $T = f32;
                $body
            }
            candle_core::CpuStorage::F64(_) => {
                type $T = f64;
                $body
            }
            other => Err($crate::bad(
                $op,
                format!("f32 or f64 only, got {:?}", candle_core::backend::BackendStorage::dtype(other)),
            )),
        }
    };
}
pub(crate) use dispatch;
