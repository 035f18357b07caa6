//! Parity with transformers on tiny random models of every supported family
//! (scripts/golden/hf_models.py): logits and loss within 1e-5 relative, every parameter's
//! gradient within 1e-4, 32 greedy tokens identical; plus shards, bf16 weights and the
//! HF -> taper -> HF round trip, bit for bit.

use candle_core::{DType, Device, Tensor, Var};
use std::collections::HashMap;
use std::path::PathBuf;
use taper_model::hf::{load_dir, read_safetensors, safetensors_files};
use taper_model::{flatten_logits, Decoder, Rng, Sampling, Weights};

fn dir(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/hf").join(name)
}

fn golden(name: &str) -> HashMap<String, Tensor> {
    candle_core::safetensors::load(dir(name).join("golden.safetensors"), &Device::Cpu).unwrap()
}

/// Where the parity tests run the model: the CPU, or with `TAPER_TEST_DEVICE=cuda` (as
/// `scripts/gpu-check.sh` sets it) the first GPU, against the same fixtures and tolerances.
fn test_device() -> Device {
    match std::env::var("TAPER_TEST_DEVICE").as_deref() {
        Ok("cuda") => Device::new_cuda(0).expect("TAPER_TEST_DEVICE=cuda: no CUDA device"),
        Ok("cpu") | Err(_) => Device::Cpu,
        Ok(other) => panic!("TAPER_TEST_DEVICE={other}: expected cpu or cuda"),
    }
}

fn max_abs(t: &Tensor) -> f32 {
    t.abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap()
}

/// max |a - b| / max |b|, on the CPU wherever a was computed.
fn rel(a: &Tensor, b: &Tensor) -> f32 {
    let a = a.to_device(&Device::Cpu).unwrap();
    max_abs(&(a - b).unwrap()) / max_abs(b).max(1e-12)
}

fn parity(arch: &str) {
    let dev = test_device();
    let m = load_dir(&dir(arch), &dev).unwrap();
    let g = golden(arch);
    assert!(m.config.kernels, "{arch}: an HF config loads with the fused kernels on");
    let vars: Vec<(String, Var)> = m.weights.iter().map(|(n, t)| (n.clone(), Var::from_tensor(t).unwrap())).collect();
    let w = Weights::from_pairs(vars.iter().map(|(n, v)| (n.clone(), v.as_tensor().clone())));
    let model = Decoder::load(&w, &m.config).unwrap();
    let ids = g["ids"].to_dtype(DType::U32).unwrap().to_device(&dev).unwrap();
    let logits = model.forward(&ids, 0, None, None).unwrap();
    let r = rel(&logits, &g["logits"]);
    assert!(r < 1e-5, "{arch}: logits differ by {r} relative");
    let targets = g["targets"].flatten_all().unwrap().to_device(&dev).unwrap();
    let loss = model.loss(&flatten_logits(&logits).unwrap(), &targets, -100).unwrap();
    let (ours, theirs) = (loss.to_scalar::<f32>().unwrap(), g["loss"].to_vec1::<f32>().unwrap()[0]);
    assert!(((ours - theirs) / theirs).abs() < 1e-5, "{arch}: loss {ours} vs {theirs}");

    // Gradients, mapped to HF's names and layouts by the same code that maps the weights.
    let store = loss.backward().unwrap();
    let grads: HashMap<String, Tensor> =
        vars.iter().map(|(n, v)| (n.clone(), store.get(v.as_tensor()).expect("gradient").clone())).collect();
    let hf_grads = m.family.weights_to_hf(&m.config, &grads).unwrap();
    let n_golden = g.keys().filter(|k| k.starts_with("grad.")).count();
    assert_eq!(hf_grads.len(), n_golden, "{arch}: one gradient per HF parameter");
    for (name, ours) in &hf_grads {
        let want = g.get(&format!("grad.{name}")).unwrap_or_else(|| panic!("{arch}: no golden gradient for {name}"));
        let r = rel(ours, want);
        // A key bias's true gradient is zero (a shift shared by a softmax row): float noise.
        let abs = max_abs(&(ours.to_device(&Device::Cpu).unwrap() - want).unwrap());
        assert!(r < 1e-4 || abs < 1e-7, "{arch}: gradient of {name} differs by {r} relative ({abs} absolute)");
    }

    // 32 greedy tokens, as transformers' generate(do_sample=False) gave them.
    let prompt: Vec<u32> = ids.get(0).unwrap().narrow(0, 0, 6).unwrap().to_vec1().unwrap();
    let eval = Decoder::load(&w.detached(), &m.config).unwrap();
    let greedy = Sampling { temperature: 0.0, ..Default::default() };
    let out = eval.generate(&prompt, 32, &greedy, &[], &mut Rng::new(0), |_| {}).unwrap();
    let want: Vec<u32> = g["generated"].to_vec1::<i64>().unwrap().iter().map(|&t| t as u32).collect();
    assert_eq!(out, want, "{arch}: greedy generation");
    // The same row batched beside a shorter prompt, left-padded to it, when the context allows.
    if prompt.len() + 32 <= m.config.block_size {
        let both = [prompt[..2].to_vec(), prompt.clone()];
        let rows = eval.generate_batch(&both, 32, &greedy, &[], &mut [Rng::new(0), Rng::new(0)]).unwrap();
        assert_eq!(rows[1], want, "{arch}: batched greedy generation");
    }
}

#[test]
fn gpt2_matches_transformers() {
    parity("gpt2");
}

#[test]
fn llama_with_llama3_rope_scaling_matches_transformers() {
    parity("llama");
}

#[test]
fn mistral_with_sliding_window_matches_transformers() {
    parity("mistral");
}

#[test]
fn qwen2_matches_transformers() {
    parity("qwen2");
}

#[test]
fn qwen3_matches_transformers() {
    parity("qwen3");
}

#[test]
fn sharded_and_bf16_checkpoints_load() {
    let a = load_dir(&dir("gpt2"), &Device::Cpu).unwrap();
    let b = load_dir(&dir("gpt2_sharded"), &Device::Cpu).unwrap();
    assert!(safetensors_files(&dir("gpt2_sharded")).unwrap().len() > 1);
    for (k, t) in &a.weights {
        assert_eq!(max_abs(&(t - &b.weights[k]).unwrap()), 0.0, "{k}");
    }
    let m = load_dir(&dir("llama_bf16"), &Device::Cpu).unwrap();
    let g = golden("llama_bf16");
    let model = Decoder::load(&Weights::new(m.weights), &m.config).unwrap();
    let logits = model.forward(&g["ids"].to_dtype(DType::U32).unwrap(), 0, None, None).unwrap();
    let r = rel(&logits, &g["logits"]);
    assert!(r < 1e-5, "bf16 weights: logits differ by {r}");
}

#[test]
fn hf_to_taper_to_hf_is_bit_identical() {
    for arch in ["gpt2", "llama", "mistral", "qwen2", "qwen3"] {
        let raw = read_safetensors(&safetensors_files(&dir(arch)).unwrap(), &Device::Cpu).unwrap();
        let m = load_dir(&dir(arch), &Device::Cpu).unwrap();
        let back = m.family.weights_to_hf(&m.config, &m.weights).unwrap();
        assert_eq!(back.len(), raw.len(), "{arch}: tensor count");
        for (name, t) in back {
            let orig = &raw[&name];
            assert_eq!(t.dims(), orig.dims(), "{arch}: {name}");
            let a: Vec<f32> = t.flatten_all().unwrap().to_vec1().unwrap();
            let b: Vec<f32> = orig.flatten_all().unwrap().to_vec1().unwrap();
            assert!(a.iter().zip(&b).all(|(x, y)| x.to_bits() == y.to_bits()), "{arch}: {name} not bit-identical");
        }
        let cfg_back = m.family.config_from_hf(&m.family.config_to_hf(&m.config)).unwrap();
        assert_eq!(cfg_back, m.config, "{arch}: config round trip");
    }
}
