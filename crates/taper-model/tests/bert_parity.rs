//! Parity of taper's encoder with transformers' `BertForMaskedLM` on tiny random models
//! (scripts/golden/bert.py): logits within 1e-5 at every position of a batch with padding and
//! two token types, the MLM loss, every parameter's gradient; and HF -> taper -> HF names.

use candle_core::{DType, Device, Tensor, Var};
use std::collections::HashMap;
use std::path::PathBuf;
use taper_model::hf::{load_dir, Family};
use taper_model::{nn::cross_entropy, Bert, Decoder, ModelKind, Weights};

fn dir(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/hf").join(name)
}

fn max_abs(t: &Tensor) -> f32 {
    t.abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap()
}

/// Logits, loss and every gradient against transformers, through the fused kernels (attention
/// with key padding, norms, GELU) and through the composed ops.
fn parity(name: &str) {
    for kernels in [true, false] {
        parity_with(name, kernels);
    }
}

fn parity_with(name: &str, kernels: bool) {
    let mut m = load_dir(&dir(name), &Device::Cpu).unwrap();
    assert!(m.config.kernels, "HF configs load with the kernels on");
    m.config.kernels = kernels;
    assert_eq!((m.family, m.config.kind), (Family::Bert, ModelKind::Encoder));
    let g = candle_core::safetensors::load(dir(name).join("golden.safetensors"), &Device::Cpu).unwrap();
    let vars: Vec<(String, Var)> = m.weights.iter().map(|(n, t)| (n.clone(), Var::from_tensor(t).unwrap())).collect();
    let w = Weights::from_pairs(vars.iter().map(|(n, v)| (n.clone(), v.as_tensor().clone())));
    let model = Bert::load(&w, &m.config).unwrap();
    let u32s = |k: &str| g[k].to_dtype(DType::U32).unwrap();
    let (ids, types, mask) = (u32s("ids"), u32s("token_type_ids"), u32s("attention_mask"));
    let logits = model.forward(&ids, Some(&types), Some(&mask), None).unwrap(); // (B, T, V)
    let diff = max_abs(&(&logits - &g["logits"]).unwrap());
    assert!(diff < 1e-5, "{name}: logits differ by {diff}");
    // The fixtures' logits are O(1): the bound above is meaningful.
    assert!(max_abs(&g["logits"]) > 0.1);

    let v = m.config.vocab_size;
    let targets = g["targets"].flatten_all().unwrap();
    assert_eq!(targets.to_vec1::<i64>().unwrap().iter().filter(|&&t| t != -100).count(), 4);
    let loss = cross_entropy(&logits.reshape(((), v)).unwrap(), &targets, -100).unwrap();
    let (ours, theirs) = (loss.to_scalar::<f32>().unwrap(), g["loss"].to_vec1::<f32>().unwrap()[0]);
    assert!((ours - theirs).abs() < 1e-5 * theirs.abs(), "{name}: loss {ours} vs {theirs}");

    // Gradients under HF's names, through the export mapping.
    let store = loss.backward().unwrap();
    let grads: HashMap<String, Tensor> =
        vars.iter().map(|(n, v)| (n.clone(), store.get(v.as_tensor()).expect("gradient").clone())).collect();
    let hf = m.family.weights_to_hf(&m.config, &grads).unwrap();
    let mut checked = 0;
    for (hf_name, ours) in &hf {
        // The bias is one tensor in taper; transformers uses one of its two names.
        let Some(want) = g.get(&format!("grad.{hf_name}")) else { continue };
        let diff = max_abs(&(ours - want).unwrap());
        assert!(diff <= 1e-4 * max_abs(want).max(1e-3), "{name}: gradient of {hf_name} differs by {diff}");
        checked += 1;
    }
    let n_golden = g.keys().filter(|k| k.starts_with("grad.")).count();
    assert_eq!(checked, n_golden, "{name}: every HF parameter's gradient compared");
}

#[test]
fn bert_gelu_tied_matches_transformers() {
    parity("bert");
}

#[test]
fn bert_relu_untied_matches_transformers() {
    parity("bert_relu_untied");
}

/// HF -> taper -> HF gives back every tensor transformers saved, bit for bit.
#[test]
fn bert_round_trips_through_taper_names() {
    for name in ["bert", "bert_relu_untied"] {
        let m = load_dir(&dir(name), &Device::Cpu).unwrap();
        let raw = candle_core::safetensors::load(dir(name).join("model.safetensors"), &Device::Cpu).unwrap();
        let back: HashMap<String, Tensor> =
            m.family.weights_to_hf(&m.config, &m.weights).unwrap().into_iter().collect();
        for (k, t) in &raw {
            // Untied, transformers computes with `decoder.bias`; `cls.predictions.bias` is unused.
            if k == "cls.predictions.bias" && !m.config.tie_embeddings {
                continue;
            }
            let b = back.get(k).unwrap_or_else(|| panic!("{name}: {k} not written back"));
            assert_eq!(max_abs(&(b - t).unwrap()), 0.0, "{name}: {k}");
        }
    }
}

/// A BERT checkpoint where a decoder is expected: one clear error, no panic.
#[test]
fn bert_refused_as_a_decoder() {
    let m = load_dir(&dir("bert"), &Device::Cpu).unwrap();
    let err = Decoder::load(&Weights::new(m.weights), &m.config).err().unwrap().to_string();
    assert!(err.contains("encoder (BERT-style masked LM)") && err.contains("needs a decoder"), "{err}");
}
