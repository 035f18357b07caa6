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
    /// x <- exp(x - shift) over a slice: f32 through a polynomial that vectorises.
    fn exp_shifted(x: &mut [Self], shift: Self);
}

macro_rules! impl_float {
    ($t:ty, $variant:ident, $erf:path, $exp:path) => {
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
            fn exp_shifted(x: &mut [Self], shift: Self) {
                $exp(x, shift)
            }
        }
    };
}

impl_float!(f32, F32, candle_core::cpu::erf::erf_f32, exp_shifted_f32);
impl_float!(f64, F64, candle_core::cpu::erf::erf_f64, exp_shifted_f64);

/// exp(x - shift) for f32 in place: x = n ln2 + r with |r| <= ln2 / 2, a degree-6 polynomial for
/// exp(r) (about 1 ulp), and 2^n put into the exponent bits. Arguments below -87 (masked keys:
/// -inf) give 0; NaN stays NaN, since the comparisons let it through.
#[inline(always)]
pub(crate) fn exp_shifted_f32(x: &mut [f32], shift: f32) {
    for v in x.iter_mut() {
        let a = *v - shift;
        let c = if a > 88.0 { 88.0 } else { a };
        let c = if c < -87.0 { -87.0 } else { c };
        // Round to nearest through the float adder: 1.5 * 2^23 pushes the fraction out and
        // leaves n in the low mantissa bits of t, read without a float-to-int conversion
        // (whose saturation handling stops the loop from vectorising).
        let t = c * std::f32::consts::LOG2_E + 12_582_912.0;
        let n = t - 12_582_912.0;
        let r = c - n * 0.693_359_4 - n * -2.121_944_4e-4;
        let p = ((((1.987_569_1e-4 * r + 1.398_2e-3) * r + 8.333_452e-3) * r + 4.166_579_6e-2) * r + 1.666_666_5e-1)
            * r
            + 0.5;
        let e = p * (r * r) + r + 1.0;
        let scale = f32::from_bits(t.to_bits().wrapping_sub(0x4B40_0000 - 127) << 23);
        *v = if a < -87.0 { 0.0 } else { e * scale };
    }
}

fn exp_shifted_f64(x: &mut [f64], shift: f64) {
    x.iter_mut().for_each(|v| *v = (*v - shift).exp());
}

/// max and log(sum(exp(x - max))) of one row, the exponentials vectorised through `scratch`
/// (the row's length) and summed in 8 lanes in a fixed order.
pub(crate) fn row_max_lse_fast<T: Float>(row: &[T], scratch: &mut [T]) -> (T, T) {
    let max = row.iter().fold(T::from_f64(f64::NEG_INFINITY), |m, &v| if v > m { v } else { m });
    scratch.copy_from_slice(row);
    T::exp_shifted(scratch, max);
    let mut lanes = [T::ZERO; 8];
    let mut chunks = scratch.chunks_exact(8);
    for c in &mut chunks {
        for (l, &v) in lanes.iter_mut().zip(c) {
            *l += v;
        }
    }
    let mut sum = lanes.iter().fold(T::ZERO, |s, &v| s + v);
    for &v in chunks.remainder() {
        sum += v;
    }
    (max, sum.ln())
}

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
