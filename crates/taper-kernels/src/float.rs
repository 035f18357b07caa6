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
    /// f32: [`exp_f32`] (vectorises); f64: libm's.
    fn exp(self) -> Self;
    fn ln(self) -> Self;
    fn sqrt(self) -> Self;
    /// f32: [`erf_f32`] (vectorises); f64: candle's.
    fn erf(self) -> Self;
    fn slice(s: &CpuStorage) -> Option<&[Self]>;
    fn slice_mut(s: &mut CpuStorage) -> Option<&mut [Self]>;
    fn storage(v: Vec<Self>) -> CpuStorage;
    /// x <- exp(x - shift) over a slice: f32 through a polynomial that vectorises.
    fn exp_shifted(x: &mut [Self], shift: Self);
}

macro_rules! impl_float {
    ($t:ty, $variant:ident, $erf:path, $exp1:path, $exp:path) => {
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
                $exp1(self)
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

impl_float!(f32, F32, erf_f32, exp_f32, exp_shifted_f32);
impl_float!(f64, F64, candle_core::cpu::erf::erf_f64, f64::exp, exp_shifted_f64);

/// Runs `$body` over the named arguments compiled for AVX-512, or AVX2 + FMA, when the CPU has
/// them: the crate builds for baseline x86-64, where element loops vectorise only 4 f32 wide.
/// The body is a block in a function of its own, so whatever it calls that is `inline(always)`
/// is built with the wider features too (closures and `Fn` calls can stay out of line, and
/// narrow). Without fast-math there is no FMA contraction, so every copy rounds the same.
///
/// `simd!(<T: Float> (y: &mut [T] = out, x: &[T] = inp) { .. })`
macro_rules! simd {
    (<$T:ident: $bound:path> ($($arg:ident: $ty:ty = $val:expr),* $(,)?) $body:block) => {{
        #[allow(clippy::too_many_arguments)]
        #[inline(always)]
        fn body<$T: $bound>($($arg: $ty),*) $body
        #[allow(clippy::too_many_arguments)]
        fn run<$T: $bound>($($arg: $ty),*) {
            #[cfg(target_arch = "x86_64")]
            {
                #[allow(clippy::too_many_arguments)]
                #[target_feature(enable = "avx512f")]
                fn v4<$T: $bound>($($arg: $ty),*) {
                    body($($arg),*)
                }
                #[allow(clippy::too_many_arguments)]
                #[target_feature(enable = "avx2,fma")]
                fn v3<$T: $bound>($($arg: $ty),*) {
                    body($($arg),*)
                }
                if std::is_x86_feature_detected!("avx512f") {
                    // SAFETY: the CPU has just been checked for the features v4 is built with.
                    return unsafe { v4($($arg),*) };
                }
                if std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma") {
                    // SAFETY: as above, for v3.
                    return unsafe { v3($($arg),*) };
                }
            }
            body($($arg),*)
        }
        run($($val),*)
    }};
}
pub(crate) use simd;

/// exp(x - shift) for f32 in place, through [`exp_f32`].
#[inline(always)]
pub(crate) fn exp_shifted_f32(x: &mut [f32], shift: f32) {
    for v in x.iter_mut() {
        *v = exp_f32(*v - shift);
    }
}

/// exp for f32 in straight-line code that vectorises (libm's is a call per element): a = n ln2 +
/// r with |r| <= ln2 / 2, a degree-6 polynomial for exp(r) (about 1 ulp), and 2^n put into the
/// exponent bits. Below -87 (masked keys: -inf) gives 0, above 88.7 +inf; NaN stays NaN, since
/// the comparisons let it through.
#[inline(always)]
pub(crate) fn exp_f32(a: f32) -> f32 {
    let c = if a > 88.0 { 88.0 } else { a };
    let c = if c < -87.0 { -87.0 } else { c };
    // Round to nearest through the float adder: 1.5 * 2^23 pushes the fraction out and leaves n
    // in the low mantissa bits of t, read without a float-to-int conversion (whose saturation
    // handling stops the loop from vectorising).
    let t = c * std::f32::consts::LOG2_E + 12_582_912.0;
    let n = t - 12_582_912.0;
    let r = c - n * 0.693_359_4 - n * -2.121_944_4e-4;
    let p =
        ((((1.987_569_1e-4 * r + 1.398_2e-3) * r + 8.333_452e-3) * r + 4.166_579_6e-2) * r + 1.666_666_5e-1) * r + 0.5;
    let e = p * (r * r) + r + 1.0;
    let scale = f32::from_bits(t.to_bits().wrapping_sub(0x4B40_0000 - 127) << 23);
    let y = if a < -87.0 { 0.0 } else { e * scale };
    if a > 88.72 {
        f32::INFINITY
    } else {
        y
    }
}

/// erf for f32 in straight-line code that vectorises. |x| < 0.5: its Maclaurin series to x^13
/// (error < 2e-9); beyond, Abramowitz & Stegun 7.1.26, 1 - t (a1 + t (a2 + ..)) exp(-x^2) with
/// t = 1 / (1 + p |x|), absolute error below 1.5e-7 (a couple of f32 ulps of the GELU's 1 + erf,
/// which is what it feeds). Both are computed and one picked, so the loop has no branch.
#[inline(always)]
pub(crate) fn erf_f32(x: f32) -> f32 {
    let a = x.abs();
    let t = 1.0 / (1.0 + 0.327_591_1 * a);
    let poly = ((((1.061_405_4 * t - 1.453_152) * t + 1.421_413_7) * t - 0.284_496_74) * t + 0.254_829_6) * t;
    let far = (1.0 - poly * exp_f32(-a * a)).copysign(x);
    // 2/√π Σ (-1)^n x^(2n+1) / (n! (2n+1)), n = 0..6.
    let z = x * x;
    let near = x
        * ((((((1.205_533_3e-4 * z - 8.548_327e-4) * z + 5.223_977_6e-3) * z - 2.686_617e-2) * z + 0.112_837_92) * z
            - 0.376_126_39)
            * z
            + std::f32::consts::FRAC_2_SQRT_PI);
    if a < 0.5 {
        near
    } else {
        far
    }
}

fn exp_shifted_f64(x: &mut [f64], shift: f64) {
    x.iter_mut().for_each(|v| *v = (*v - shift).exp());
}

/// row <- exp(row - max(row)); returns (max, Σ exp), the max and the sum over 16 lanes in a fixed
/// order so that they vectorise and do not depend on the thread count.
#[inline(always)]
pub(crate) fn exp_row_in_place<T: Float>(row: &mut [T]) -> (T, T) {
    const L: usize = 16;
    let mut lanes = [T::from_f64(f64::NEG_INFINITY); L];
    let mut chunks = row.chunks_exact(L);
    for ch in &mut chunks {
        for (m, &v) in lanes.iter_mut().zip(ch) {
            *m = if v > *m { v } else { *m };
        }
    }
    let mut max = lanes.iter().fold(T::from_f64(f64::NEG_INFINITY), |m, &v| if v > m { v } else { m });
    for &v in chunks.remainder() {
        max = if v > max { v } else { max };
    }
    T::exp_shifted(row, max);
    let mut sums = [T::ZERO; L];
    let mut chunks = row.chunks_exact(L);
    for ch in &mut chunks {
        for (s, &v) in sums.iter_mut().zip(ch) {
            *s += v;
        }
    }
    let mut sum = sums.iter().fold(T::ZERO, |s, &v| s + v);
    for &v in chunks.remainder() {
        sum += v;
    }
    (max, sum)
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
        && ts.iter().all(|t| crate::fused_on(t.device()) && t.dtype() == dtype)
}

/// Whether the CUDA twins take these tensors: all on one CUDA device with the kernels switched
/// on ([`crate::cuda_kernels_on`]), all f32, all bf16 or all f16 (f64 takes the composed path).
pub(crate) fn twin(ts: &[&Tensor]) -> bool {
    let Some(first) = ts.first() else { return false };
    let (dtype, dev) = (first.dtype(), first.device());
    matches!(dtype, candle_core::DType::F32 | candle_core::DType::BF16 | candle_core::DType::F16)
        && crate::cuda_kernels_on(dev)
        && ts.iter().all(|t| t.dtype() == dtype && t.device().same_device(dev))
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fast_erf_and_exp_are_within_a_few_ulps() {
        let mut worst_erf = 0f64;
        for i in -120_000..=120_000 {
            let x = i as f32 * 1e-4; // -12 .. 12
            let want = candle_core::cpu::erf::erf_f64(x as f64);
            worst_erf = worst_erf.max((erf_f32(x) as f64 - want).abs());
        }
        assert!(worst_erf < 4e-7, "erf: worst absolute error {worst_erf:e}");
        for &x in &[f32::NEG_INFINITY, -1e30, 1e30, f32::INFINITY] {
            assert_eq!(erf_f32(x), x.signum());
        }
        assert!(erf_f32(f32::NAN).is_nan() && exp_f32(f32::NAN).is_nan());
        assert_eq!(erf_f32(0.0), 0.0);
        let mut worst_exp = 0f64;
        for i in -8_700..=8_800 {
            let x = i as f32 * 1e-2;
            let want = (x as f64).exp();
            worst_exp = worst_exp.max(((exp_f32(x) as f64 - want) / want).abs());
        }
        assert!(worst_exp < 3e-7, "exp: worst relative error {worst_exp:e}");
        assert_eq!(exp_f32(f32::NEG_INFINITY), 0.0);
        assert_eq!(exp_f32(f32::INFINITY), f32::INFINITY);
        assert_eq!(exp_f32(100.0), f32::INFINITY);
    }
}
