//! Activation checkpointing (Chen et al. 2016, "Training Deep Nets with Sublinear Memory
//! Cost"): a checkpointed block keeps only its input for the backward. Its forward runs on a
//! detached input and lets go of every intermediate; the backward runs the same forward again
//! (the same ops in the same order, its dropout replayed from the same RNG state) and
//! backpropagates through that copy.
//!
//! Candle's custom ops return gradients for their inputs only, while a block's weights are
//! inside it: the recomputing backward hands their gradients to a per-thread stash, and
//! [`backward`] (which every training step calls instead of `Tensor::backward`) adds them to the
//! store. A checkpointed graph backpropagated by plain `Tensor::backward` lacks the blocks'
//! weight gradients, which the training loop reports as a parameter no gradient reached.

use crate::rng::Rng;
use candle_core::backprop::GradStore;
use candle_core::{Tensor, Var};
use serde::{Deserialize, Serialize};
use std::cell::RefCell;
use std::sync::{Arc, Mutex};

/// `train.activation_checkpointing`: which transformer blocks recompute their forward in the
/// backward. `"none"`, `"blocks"` (all of them), or N: every N-th block, the first included
/// (torchtune's selective checkpointing), trading memory for compute in between.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ActivationCheckpointing {
    #[default]
    None,
    /// Every N-th block (N >= 1; 1 is every block).
    Every(usize),
}

impl ActivationCheckpointing {
    /// Whether block `i` (0-based) is checkpointed.
    pub fn covers(&self, i: usize) -> bool {
        match *self {
            Self::None => false,
            Self::Every(n) => i.is_multiple_of(n),
        }
    }

    pub fn is_on(&self) -> bool {
        *self != Self::None
    }
}

const EXPECTED: &str = "\"none\", \"blocks\" or a number of blocks N >= 1";

impl Serialize for ActivationCheckpointing {
    fn serialize<S: serde::Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        match *self {
            Self::None => s.serialize_str("none"),
            Self::Every(1) => s.serialize_str("blocks"),
            Self::Every(n) => s.serialize_u64(n as u64),
        }
    }
}

impl<'de> Deserialize<'de> for ActivationCheckpointing {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        struct Spelling;
        impl serde::de::Visitor<'_> for Spelling {
            type Value = ActivationCheckpointing;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str(EXPECTED)
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> std::result::Result<Self::Value, E> {
                match v {
                    "none" => Ok(ActivationCheckpointing::None),
                    "blocks" => Ok(ActivationCheckpointing::Every(1)),
                    _ => Err(E::custom(format!("expected {EXPECTED}, found \"{v}\""))),
                }
            }
            fn visit_i64<E: serde::de::Error>(self, v: i64) -> std::result::Result<Self::Value, E> {
                match usize::try_from(v) {
                    Ok(n) if n >= 1 => Ok(ActivationCheckpointing::Every(n)),
                    _ => Err(E::custom(format!("expected {EXPECTED}, found {v}"))),
                }
            }
            fn visit_u64<E: serde::de::Error>(self, v: u64) -> std::result::Result<Self::Value, E> {
                self.visit_i64(i64::try_from(v).unwrap_or(-1))
            }
        }
        d.deserialize_any(Spelling)
    }
}

/// A block's forward over its inputs: the same ops each time it is called (a closure that
/// draws random numbers starts from a copy of the same RNG state each call).
pub type Body = dyn Fn(&[Tensor]) -> candle_core::Result<Tensor> + Send + Sync;

thread_local! {
    /// Weight gradients found by recomputing backwards, (weight, gradient), until [`backward`]
    /// adds them to its store.
    static STASH: RefCell<Vec<(Tensor, Tensor)>> = const { RefCell::new(Vec::new()) };
}

/// `body(inputs)` as one node of the graph that keeps only `inputs` (one or two tensors) for
/// the backward. `weights`: the tensors inside the body that may be trained (variables are
/// picked out of them); their gradients reach the store through [`backward`].
pub fn checkpoint(inputs: &[&Tensor], weights: &[Tensor], body: Arc<Body>) -> candle_core::Result<Tensor> {
    let detached: Vec<Tensor> = inputs.iter().map(|t| t.detach()).collect();
    // Detached, the output holds no graph: the body's intermediates are freed here.
    let out = body(&detached)?.detach();
    let trained: Vec<Tensor> = weights.iter().filter(|w| w.is_variable()).cloned().collect();
    // The node must be in the graph whenever the body has trained weights, even when no input
    // carries a gradient (frozen embeddings under LoRA): the first such weight anchors it.
    let anchor = trained.first().cloned().unwrap_or_else(|| inputs[0].clone());
    let n = inputs.len();
    let recompute = move |ins: &[Tensor], grad: &Tensor| -> candle_core::Result<Vec<Option<Tensor>>> {
        let vars = ins.iter().map(Var::from_tensor).collect::<candle_core::Result<Vec<_>>>()?;
        let again: Vec<Tensor> = vars.iter().map(|v| v.as_tensor().clone()).collect();
        // d(sum(y * g))/dy is g itself, bit for bit: the block's backward sees the gradient the
        // uncheckpointed graph would have given its output.
        let store = (body(&again)? * grad)?.sum_all()?.backward()?;
        STASH.with(|s| {
            let mut s = s.borrow_mut();
            for w in &trained {
                if let Some(g) = store.get(w) {
                    s.push((w.clone(), g.clone()));
                }
            }
        });
        Ok(vars.iter().map(|v| store.get(v.as_tensor()).cloned()).collect())
    };
    match n {
        1 => taper_kernels::precomputed::attach2(inputs[0], &anchor, "checkpointed block", out, move |x, _, g| {
            let mut grads = recompute(std::slice::from_ref(x), g)?;
            Ok((grads.remove(0), None))
        }),
        2 => taper_kernels::precomputed::attach3(
            inputs[0],
            inputs[1],
            &anchor,
            "checkpointed block",
            out,
            move |a, b, _, g| {
                let mut grads = recompute(&[a.clone(), b.clone()], g)?;
                let gb = grads.pop().flatten();
                Ok((grads.pop().flatten(), gb, None))
            },
        ),
        _ => Err(candle_core::Error::Msg(format!("a checkpointed block takes one or two inputs, not {n}"))),
    }
}

/// [`checkpoint`] for a block that may draw dropout from `rng`: its forward runs once now and
/// again in the backward, both from a copy of the state `rng` has here, and `rng` is left where
/// the block alone would leave it.
pub fn checkpoint_block<F>(
    inputs: &[&Tensor],
    weights: &[Tensor],
    rng: Option<&mut Rng>,
    block: F,
) -> crate::Result<Tensor>
where
    F: Fn(&[Tensor], Option<&mut Rng>) -> crate::Result<Tensor> + Send + Sync + 'static,
{
    let start = rng.as_deref().cloned();
    let end = Arc::new(Mutex::new(start.clone()));
    let after = end.clone();
    let body = move |ins: &[Tensor]| -> candle_core::Result<Tensor> {
        let mut r = start.clone();
        let y = block(ins, r.as_mut());
        *after.lock().expect("a block runs on one thread") = r;
        y.map_err(candle_core::Error::wrap)
    };
    let y = checkpoint(inputs, weights, Arc::new(body))?;
    if let Some(r) = rng {
        *r = end.lock().expect("a block runs on one thread").clone().expect("the body kept its RNG");
    }
    Ok(y)
}

/// `loss.backward()`, with the gradients of checkpointed blocks' weights added.
pub fn backward(loss: &Tensor) -> candle_core::Result<GradStore> {
    STASH.with(|s| s.borrow_mut().clear());
    let mut store = loss.backward()?;
    let stashed = STASH.with(|s| std::mem::take(&mut *s.borrow_mut()));
    for (w, g) in stashed {
        let sum = match store.remove(&w) {
            Some(other) => (other + g)?,
            None => g,
        };
        store.insert(&w, sum);
    }
    Ok(store)
}
