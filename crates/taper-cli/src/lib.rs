//! Library half of the `taper` command: pieces that examples and other tools reuse.

pub mod gguf_export;
pub mod plot;
