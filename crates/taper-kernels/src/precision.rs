//! The precision the fused kernels' matrix products run in.
//!
//! Mixed precision keeps every tensor f32 (master weights, activations, gradients, optimizer
//! state) and rounds the operands of the GEMMs to bf16 or f16, accumulating in f32: products
//! of two bf16 or f16 values are exact in f32, so the only error is the operands' rounding.
//! Norms, softmax, log-sum-exp, the loss and the optimizer stay f32 throughout. The setting is
//! per thread, like PyTorch's autocast: the training loop sets it once (its precision seam) and
//! every fused linear made while it holds keeps it, for its backward too.

use candle_core::{DType, Result, Tensor};
use std::cell::Cell;

/// What a GEMM's operands are rounded to; `train.precision` in a config.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Precision {
    #[default]
    F32,
    /// bfloat16: f32's range, 8 bits of mantissa.
    Bf16,
    /// IEEE half: 11 bits of mantissa, values beyond 65504 overflow to infinity (hence loss
    /// scaling).
    F16,
}

impl Precision {
    pub fn name(&self) -> &'static str {
        match self {
            Precision::F32 => "f32",
            Precision::Bf16 => "bf16",
            Precision::F16 => "f16",
        }
    }

    /// `x` rounded to this precision (to nearest, ties to even), as an f32.
    pub fn round(&self, x: f32) -> f32 {
        match self {
            Precision::F32 => x,
            Precision::Bf16 => half::bf16::from_f32(x).to_f32(),
            Precision::F16 => half::f16::from_f32(x).to_f32(),
        }
    }
}

thread_local! {
    static MATMUL: Cell<Precision> = const { Cell::new(Precision::F32) };
    static LOSS_SCALE: Cell<f64> = const { Cell::new(1.0) };
}

/// The factor the loss is multiplied by before its backward on this thread (f16 loss scaling):
/// ops that form gradients in their forward form them at this size.
pub fn loss_scale() -> f64 {
    LOSS_SCALE.with(|s| s.get())
}

/// Sets this thread's loss scale until the returned guard drops.
pub fn set_loss_scale(scale: f64) -> LossScaleGuard {
    LossScaleGuard { before: LOSS_SCALE.with(|c| c.replace(scale)) }
}

/// Restores the loss scale that held before [`set_loss_scale`].
#[must_use = "the scale holds only while the guard lives"]
pub struct LossScaleGuard {
    before: f64,
}

impl Drop for LossScaleGuard {
    fn drop(&mut self) {
        LOSS_SCALE.with(|c| c.set(self.before));
    }
}

/// The precision fused GEMMs made on this thread run in.
pub fn matmul_precision() -> Precision {
    MATMUL.with(|p| p.get())
}

/// Sets this thread's GEMM precision until the returned guard drops (then the previous one
/// holds again).
pub fn set_matmul_precision(p: Precision) -> PrecisionGuard {
    let before = MATMUL.with(|c| c.replace(p));
    PrecisionGuard { before }
}

/// Restores the precision that held before [`set_matmul_precision`].
#[must_use = "the precision holds only while the guard lives"]
pub struct PrecisionGuard {
    before: Precision,
}

impl Drop for PrecisionGuard {
    fn drop(&mut self) {
        MATMUL.with(|c| c.set(self.before));
    }
}

/// a · b through candle's matmul (cuBLAS on CUDA) with both operands cast to this thread's
/// matmul precision and the product cast back to f32, as PyTorch's autocast does: the composed
/// paths' form of the policy (the product itself is rounded there, unlike the fused CPU GEMMs'
/// f32 output). Non-f32 operands and f32 precision multiply as they are.
pub fn matmul(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    let low = match matmul_precision() {
        Precision::F32 => None,
        Precision::Bf16 => Some(DType::BF16),
        Precision::F16 => Some(DType::F16),
    };
    match low {
        Some(d) if a.dtype() == DType::F32 && b.dtype() == DType::F32 => {
            a.to_dtype(d)?.matmul(&b.to_dtype(d)?)?.to_dtype(DType::F32)
        }
        _ => a.matmul(b),
    }
}
