//! Fingerprints of what a cached result was computed from (weights, token ids, settings), so
//! that a cache is used only while its inputs are unchanged.

use crate::Result;
use candle_core::{DType, Tensor};
use sha2::{Digest, Sha256};
use std::collections::HashMap;

#[derive(Default)]
pub struct Fingerprint(Sha256);

impl Fingerprint {
    pub fn new() -> Self {
        Self::default()
    }

    /// A labelled field, so that two inputs cannot run into each other.
    pub fn text(&mut self, label: &str, value: &str) -> &mut Self {
        for part in [label, value] {
            self.0.update((part.len() as u64).to_le_bytes());
            self.0.update(part.as_bytes());
        }
        self
    }

    pub fn ids(&mut self, label: &str, ids: impl IntoIterator<Item = i64>) -> &mut Self {
        self.text(label, "");
        let mut n = 0u64;
        for id in ids {
            self.0.update(id.to_le_bytes());
            n += 1;
        }
        self.0.update(n.to_le_bytes());
        self
    }

    /// Every tensor's name, shape and values, in name order.
    pub fn tensors(&mut self, label: &str, tensors: &HashMap<String, Tensor>) -> Result<&mut Self> {
        let mut names: Vec<&String> = tensors.keys().collect();
        names.sort();
        self.text(label, "");
        for name in names {
            let t = &tensors[name];
            self.text("tensor", name).text("shape", &format!("{:?}", t.dims()));
            for v in t.flatten_all()?.to_dtype(DType::F32)?.to_vec1::<f32>()? {
                self.0.update(v.to_le_bytes());
            }
        }
        Ok(self)
    }

    pub fn hex(&self) -> String {
        format!("{:x}", self.0.clone().finalize())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn any_change_of_input_changes_the_fingerprint() -> Result<()> {
        let dev = candle_core::Device::Cpu;
        let w = |v: f32| HashMap::from([("w".to_string(), Tensor::new(&[1f32, v], &dev).unwrap())]);
        let of = |t: &HashMap<String, Tensor>, ids: &[i64], s: &str| -> Result<String> {
            Ok(Fingerprint::new().tensors("m", t)?.ids("ids", ids.iter().copied()).text("loss", s).hex())
        };
        let base = of(&w(2.0), &[1, 2], "sigmoid")?;
        assert_eq!(base, of(&w(2.0), &[1, 2], "sigmoid")?);
        assert_ne!(base, of(&w(2.5), &[1, 2], "sigmoid")?);
        assert_ne!(base, of(&w(2.0), &[1, 3], "sigmoid")?);
        assert_ne!(base, of(&w(2.0), &[1, 2], "ipo")?);
        Ok(())
    }
}
