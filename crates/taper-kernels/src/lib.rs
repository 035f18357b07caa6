//! Fused CPU kernels for training, each a candle custom op with a forward and a backward.
//!
//! On CPU every op runs its own kernel; on other devices it falls back to the composed candle
//! version with the same math, so CUDA and Metal keep working until they get kernels of their own.

mod act;
mod attention;
mod attention_chunked;
mod attention_cuda;
mod attention_opts;
#[cfg(feature = "cuda")]
mod cuda;
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
pub use optim::{adamw_step, adamw_step_many, lion_step, lion_step_many, AdamW, Lion};
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

/// Whether taper's CUDA kernels (the twins of the CPU ones, under cuda/) run on `dev`: on a
/// CUDA device, with the `cuda` feature, when switched on. They are opt-in until
/// `scripts/gpu-check.sh` has passed on a real GPU: `TAPER_CUDA_KERNELS=1` switches them on
/// (read once per process); [`with_cuda_kernels`] overrides that on one thread, so that a test
/// can set them against the composed path in one process. Off, CUDA takes the composed ops.
pub fn cuda_kernels_on(dev: &candle_core::Device) -> bool {
    static ENV: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    if !cfg!(feature = "cuda") || !dev.is_cuda() {
        return false;
    }
    CUDA_KERNELS.with(|o| o.get()).unwrap_or_else(|| {
        *ENV.get_or_init(|| std::env::var("TAPER_CUDA_KERNELS").is_ok_and(|v| !v.is_empty() && v != "0"))
    })
}

thread_local! {
    static CUDA_KERNELS: std::cell::Cell<Option<bool>> = const { std::cell::Cell::new(None) };
}

/// Runs `f` with the CUDA kernels switched on or off on this thread, whatever the environment
/// says; the ops `f` builds keep their choice for their backward.
pub fn with_cuda_kernels<R>(on: bool, f: impl FnOnce() -> R) -> R {
    let before = CUDA_KERNELS.with(|o| o.replace(Some(on)));
    let r = f();
    CUDA_KERNELS.with(|o| o.set(before));
    r
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
