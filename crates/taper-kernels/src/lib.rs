//! Fused CPU kernels for training, each a candle custom op with a forward and a backward.
//!
//! On CPU every op runs its own kernel; on other devices it falls back to the composed candle
//! version with the same math, so CUDA and Metal keep working until they get kernels of their own.

mod attention;
pub use attention::{attention, attention_composed, AttentionError, AttnOpts};
