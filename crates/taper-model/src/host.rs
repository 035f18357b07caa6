//! Reads of tensor values back to the host. On a GPU each one waits for the device to finish
//! its queued work, so the training step makes none except where it must (log steps,
//! evaluation, checkpoints); every read in the training path goes through here, where they are
//! counted, so a test can hold the step to that.

use crate::Result;
use candle_core::{DType, Tensor};
use std::sync::atomic::{AtomicU64, Ordering};

static READS: AtomicU64 = AtomicU64::new(0);

/// Reads made so far by this process.
pub fn reads() -> u64 {
    READS.load(Ordering::Relaxed)
}

fn count() {
    READS.fetch_add(1, Ordering::Relaxed);
}

/// A one-element tensor's value.
pub fn scalar(t: &Tensor) -> Result<f64> {
    count();
    Ok(t.flatten_all()?.to_dtype(DType::F64)?.get(0)?.to_scalar::<f64>()?)
}

/// A tensor's values, flattened, as f64.
pub fn values(t: &Tensor) -> Result<Vec<f64>> {
    count();
    Ok(t.flatten_all()?.to_dtype(DType::F64)?.to_vec1::<f64>()?)
}
