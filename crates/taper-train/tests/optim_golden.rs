//! taper's optimizers against PyTorch's trajectories (scripts/golden/optim.py).

use candle_core::{Device, Tensor, Var};
use taper_train::optim::{OptimConfig, Optimizer};

#[test]
fn optimizers_follow_pytorch() {
    let text =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/optim_golden.json")).unwrap();
    let g: serde_json::Value = serde_json::from_str(&text).unwrap();
    let f32s = |v: &serde_json::Value| -> Vec<f32> {
        v.as_array().unwrap().iter().map(|x| x.as_f64().unwrap() as f32).collect()
    };
    let dev = Device::Cpu;
    for (case, c) in g["cases"].as_object().unwrap() {
        // The fixture's optimizer settings, with `weight.` naming so that weight decay applies.
        let mut cfg: OptimConfig = serde_json::from_value(c["cfg"].clone()).unwrap();
        cfg.lr = 1.0;
        let p = Var::from_tensor(&Tensor::from_vec(f32s(&g["p0"]), (2, 3), &dev).unwrap()).unwrap();
        let mut opt = Optimizer::new(cfg, vec![("layer.weight".into(), p.clone())]).unwrap();
        for (s, want) in c["traj"].as_array().unwrap().iter().enumerate() {
            let grad = Tensor::from_vec(f32s(&g["grads"][s]), (2, 3), &dev).unwrap();
            opt.step(&[grad], g["lrs"][s].as_f64().unwrap()).unwrap();
            let got: Vec<f32> = p.as_tensor().flatten_all().unwrap().to_vec1().unwrap();
            for (a, b) in got.iter().zip(f32s(want)) {
                assert!((a - b).abs() <= 1e-6 * (1.0 + b.abs()), "{case} step {}: {got:?} vs {want}", s + 1);
            }
        }
    }
}
