//! What every attention path takes and how it fails: the masking options of a call and the
//! errors, shared by the fused CPU kernel (`attention`) and the composed path
//! (`attention_chunked`), so that neither imports the other's definitions.

use candle_core::DType;

/// Errors from [`crate::attention`] and [`crate::attention_composed`].
#[derive(Debug, thiserror::Error)]
pub enum AttentionError {
    #[error("attention: {0}")]
    Shape(String),
    #[error("attention: q, k and v must share one dtype, got {q:?}, {k:?}, {v:?}")]
    DType { q: DType, k: DType, v: DType },
    #[error("attention backward: {0}")]
    Backward(String),
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

pub(crate) type Result<T> = std::result::Result<T, AttentionError>;

/// Which keys each query may see, besides the scale.
///
/// Query `i` (0-based among Tq) sits at absolute position `p = Tk - Tq + i`, as when Tq new
/// queries follow a KV cache of Tk - Tq positions.
#[derive(Debug, Clone, PartialEq)]
pub struct AttnOpts {
    /// Multiplies q·k before the softmax, usually 1/sqrt(D).
    pub scale: f64,
    /// Query at position p sees keys j <= p.
    pub causal: bool,
    /// 0: no window; else a query at position p sees only keys with p - j < window (Mistral).
    pub window: usize,
    /// (B, Tk), row-major; `true` marks a padding key that no query attends (PyTorch's
    /// `key_padding_mask` convention).
    pub key_padding: Option<Vec<bool>>,
    /// Segment ids of the queries (B * Tq) and of the keys (B * Tk) of packed rows: a query sees
    /// only keys of its own segment. Segment 0 is padding and, as in taper's `segment_mask`,
    /// a padding query sees only the key at its own position, so that its row stays defined.
    pub segments: Option<(Vec<u32>, Vec<u32>)>,
    /// (p, key): inverted dropout on the probabilities, its masks drawn by Philox under `key`.
    /// Only the composed path has it, so it takes the call.
    pub dropout: Option<(f64, u64)>,
}

impl AttnOpts {
    /// No mask at all, `scale` on the scores.
    pub fn new(scale: f64) -> Self {
        Self { scale, causal: false, window: 0, key_padding: None, segments: None, dropout: None }
    }

    /// Causal (and windowed, with `window` > 0) with scale 1/sqrt(head_dim).
    pub fn causal(head_dim: usize, window: usize) -> Self {
        Self { causal: true, window, ..Self::new(1.0 / (head_dim as f64).sqrt()) }
    }
}
