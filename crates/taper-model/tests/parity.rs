//! The decoder against an independent PyTorch implementation (scripts/golden/tiny_decoder.py):
//! logits, loss and the gradient of every parameter, for a GPT-2-style and a Llama-style
//! config, as llm.c's test does.

use candle_core::{DType, Device, Tensor, Var};
use std::collections::HashMap;
use taper_model::{flatten_logits, Decoder, ModelConfig, Weights};

fn max_rel(a: &Tensor, b: &Tensor) -> f32 {
    let diff = (a - b).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
    let scale = b.abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
    diff / scale.max(1e-12)
}

/// With `kernels`, through taper-kernels' fused ops; without, through the composed ones.
fn check(style: &str, kernels: bool) {
    let path = format!("{}/tests/fixtures/tiny_{style}.safetensors", env!("CARGO_MANIFEST_DIR"));
    let bytes = std::fs::read(&path).unwrap();
    let (_, meta) = safetensors::SafeTensors::read_metadata(&bytes).unwrap();
    let mut cfg: ModelConfig = serde_json::from_str(&meta.metadata().as_ref().unwrap()["config"]).unwrap();
    cfg.kernels = kernels;
    let dev = Device::Cpu;
    let all: HashMap<String, Tensor> = candle_core::safetensors::load(&path, &dev).unwrap();
    let vars: Vec<(String, Var)> = all
        .iter()
        .filter_map(|(k, t)| k.strip_prefix("param.").map(|n| (n.to_string(), Var::from_tensor(t).unwrap())))
        .collect();
    let w = Weights::from_pairs(vars.iter().map(|(n, v)| (n.clone(), v.as_tensor().clone())));
    let model = Decoder::load(&w, &cfg).unwrap();
    let ids = all["ids"].to_dtype(DType::U32).unwrap();
    let logits = model.forward(&ids, 0, None, None).unwrap();
    let rel = max_rel(&logits, &all["logits"]);
    assert!(rel < 1e-5, "{style}: logits differ by {rel} (relative)");
    let targets = all["targets"].flatten_all().unwrap();
    let n = targets.to_vec1::<i64>().unwrap().iter().filter(|&&t| t != -100).count();
    assert_eq!(n, 21, "one target of 22 is ignored");
    let loss = model.loss(&flatten_logits(&logits).unwrap(), &targets, -100).unwrap();
    let (ours, theirs) = (loss.to_scalar::<f32>().unwrap(), all["loss"].to_vec1::<f32>().unwrap()[0]);
    assert!(((ours - theirs) / theirs).abs() < 1e-5, "{style}: loss {ours} vs {theirs}");
    let grads = loss.backward().unwrap();
    assert!(!vars.is_empty());
    for (name, var) in &vars {
        let g = grads.get(var.as_tensor()).unwrap_or_else(|| panic!("{style}: no gradient for {name}"));
        let want = &all[&format!("grad.{name}")];
        let rel = max_rel(g, want);
        // The key bias's true gradient is zero (softmax ignores a shift shared by a row), so
        // both sides hold float noise there: an absolute floor covers it.
        let abs = (g - want).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
        assert!(rel < 1e-4 || abs < 1e-7, "{style}: gradient of {name} differs by {rel} (relative), {abs} (absolute)");
    }
}

#[test]
fn gpt2_style_matches_pytorch() {
    check("gpt2", true);
    check("gpt2", false);
}

#[test]
fn llama_style_matches_pytorch() {
    check("llama", true);
    check("llama", false);
}
