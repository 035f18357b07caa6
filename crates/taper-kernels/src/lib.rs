//! Fused CPU kernels for training, each a candle custom op with a forward and a backward.
//!
//! On CPU every op runs its own kernel; on other devices it falls back to the composed candle
//! version with the same math, so CUDA and Metal keep working until they get kernels of their own.

mod act;
mod attention;
mod attention_chunked;
mod attention_opts;
mod float;
mod linear;
mod linear_loss;
mod linear_loss_chunked;
mod loss;
mod lowp_gemm;
mod norm;
mod optim;
pub mod precision;
pub mod precomputed;
pub mod random;
mod rope;
mod softmax;

pub use act::{gelu_erf, gelu_tanh, swiglu};
pub use attention::{
    attention, attention_bias, attention_bthd, attention_composed, attention_packed, attention_packed_rope,
};
pub use attention_opts::{AttentionError, AttnOpts};
pub use linear::{linear, linear_composed, linear_gelu};
pub use linear_loss::linear_cross_entropy;
pub use linear_loss_chunked::linear_cross_entropy_chunked;
pub use loss::cross_entropy;
pub use lowp_gemm::bf16_native;
pub use norm::{layer_norm, rms_norm};
pub use optim::{adamw_step, lion_step, AdamW, Lion};
pub use precision::{loss_scale, matmul_precision, set_loss_scale, set_matmul_precision, Precision};
pub use rope::rope;
pub use softmax::{log_softmax, softmax_last_dim};

/// Whether taper's own kernels run on `dev`: on the CPU, unless `TAPER_DEVICE_GENERIC` is set
/// (to anything but 0), which makes the CPU take the composed path every other device takes,
/// so that CI exercises it. Read once per process.
pub fn fused_on(dev: &candle_core::Device) -> bool {
    static GENERIC: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    let generic =
        *GENERIC.get_or_init(|| std::env::var("TAPER_DEVICE_GENERIC").is_ok_and(|v| !v.is_empty() && v != "0"));
    dev.is_cpu() && !generic
}

/// Input a kernel cannot take.
#[derive(Debug, thiserror::Error)]
pub enum KernelError {
    #[error("{op}: {reason}")]
    BadInput { op: &'static str, reason: String },
}

/// The PTX that build.rs compiled from cuda/.
#[cfg(feature = "cuda")]
mod ptx {
    include!(concat!(env!("OUT_DIR"), "/ptx.rs"));
}

pub(crate) fn bad(op: &'static str, reason: impl Into<String>) -> candle_core::Error {
    candle_core::Error::wrap(KernelError::BadInput { op, reason: reason.into() })
}
