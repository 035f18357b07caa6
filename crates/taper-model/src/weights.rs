//! Named tensors: the one place a model looks its weights up, with errors that name the tensor.

use crate::{ModelError, Result};
use candle_core::Tensor;
use std::collections::HashMap;

/// A flat map from HF-style names (`model.layers.0.self_attn.q_proj.weight`) to tensors.
#[derive(Clone, Default)]
pub struct Weights {
    map: HashMap<String, Tensor>,
    /// Set when the map also holds LoRA adapters (`{linear}.lora_A.weight`, ...).
    lora: Option<crate::LoraConfig>,
}

/// What a parameter is, for choices such as weight decay.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ParamKind {
    Weight,
    Bias,
    Norm,
    Embedding,
}

impl ParamKind {
    pub fn of(name: &str) -> Self {
        // Norms first: BERT's `bert.embeddings.LayerNorm` sits under its embeddings.
        if name.contains("norm") || name.contains("LayerNorm") {
            ParamKind::Norm
        } else if name.contains("embed_") || name.contains("_embeddings.") || name == "model.shared.weight" {
            ParamKind::Embedding
        } else if name.ends_with(".bias") {
            ParamKind::Bias
        } else {
            ParamKind::Weight
        }
    }
}

impl Weights {
    pub fn new(map: HashMap<String, Tensor>) -> Self {
        Self { map, lora: None }
    }

    pub fn from_pairs(pairs: impl IntoIterator<Item = (String, Tensor)>) -> Self {
        Self { map: pairs.into_iter().collect(), lora: None }
    }

    /// The tensors of trainable variables: a model built over them records a graph to them.
    pub fn from_vars(vars: &[(String, candle_core::Var)]) -> Self {
        Self::from_pairs(vars.iter().map(|(n, v)| (n.clone(), v.as_tensor().clone())))
    }

    /// Adds LoRA adapters (see [`crate::lora`]) to be applied on top of the base weights.
    pub fn with_lora(mut self, adapters: impl IntoIterator<Item = (String, Tensor)>, cfg: crate::LoraConfig) -> Self {
        self.map.extend(adapters);
        self.lora = Some(cfg);
        self
    }

    pub fn lora(&self) -> Option<&crate::LoraConfig> {
        self.lora.as_ref()
    }

    /// The same weights cut off from any graph: for eval and generation, so no backward graph
    /// is recorded.
    pub fn detached(&self) -> Self {
        Self { map: self.map.iter().map(|(k, v)| (k.clone(), v.detach())).collect(), lora: self.lora.clone() }
    }

    pub fn get(&self, name: &str, shape: &[usize]) -> Result<Tensor> {
        let t = self.map.get(name).ok_or_else(|| ModelError::MissingTensor { name: name.to_string() })?;
        if t.dims() != shape {
            return Err(ModelError::ShapeMismatch {
                name: name.to_string(),
                expected: shape.to_vec(),
                found: t.dims().to_vec(),
            });
        }
        Ok(t.clone())
    }

    /// The trainable variables among the weights, in name order.
    pub fn trained(&self) -> Vec<Tensor> {
        let mut vars: Vec<(&String, &Tensor)> = self.map.iter().filter(|(_, t)| t.is_variable()).collect();
        vars.sort_by(|a, b| a.0.cmp(b.0));
        vars.into_iter().map(|(_, t)| t.clone()).collect()
    }

    pub fn contains(&self, name: &str) -> bool {
        self.map.contains_key(name)
    }

    pub fn map(&self) -> &HashMap<String, Tensor> {
        &self.map
    }

    pub fn into_map(self) -> HashMap<String, Tensor> {
        self.map
    }
}
