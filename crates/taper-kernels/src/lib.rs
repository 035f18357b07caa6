//! Fused CPU kernels for training, each a candle custom op with a forward and a backward.
//!
//! On CPU every op runs its own kernel; on other devices it falls back to the composed candle
//! version with the same math, so CUDA and Metal keep working until they get kernels of their own.

mod act;
mod attention;
mod float;
mod linear;
mod linear_loss;
mod loss;
mod norm;
mod optim;
mod rope;
mod softmax;

pub use act::{gelu_erf, gelu_tanh, swiglu};
pub use attention::{
    attention, attention_bthd, attention_composed, attention_packed, attention_packed_rope, AttentionError, AttnOpts,
};
pub use linear::{linear, linear_composed, linear_gelu};
pub use linear_loss::linear_cross_entropy;
pub use loss::cross_entropy;
pub use norm::{layer_norm, rms_norm};
pub use optim::{adamw_step, lion_step, AdamW, Lion};
pub use rope::rope;
pub use softmax::{log_softmax, softmax_last_dim};

/// Input a kernel cannot take.
#[derive(Debug, thiserror::Error)]
pub enum KernelError {
    #[error("{op}: {reason}")]
    BadInput { op: &'static str, reason: String },
}

pub(crate) fn bad(op: &'static str, reason: impl Into<String>) -> candle_core::Error {
    candle_core::Error::wrap(KernelError::BadInput { op, reason: reason.into() })
}
