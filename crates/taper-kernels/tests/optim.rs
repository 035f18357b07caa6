//! The in-place AdamW and Lion updates against the composed candle expressions (bit for bit in
//! f32) and against the update rules written out in plain f64.

use candle_core::{DType, Device, Tensor};
use taper_kernels::{adamw_step, lion_step, AdamW, Lion};

fn values(n: usize, seed: u64, dtype: DType) -> Tensor {
    let mut s = seed;
    let v: Vec<f64> = (0..n)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            (s % 2001) as f64 / 1000.0 - 1.0
        })
        .collect();
    Tensor::from_vec(v, n, &Device::Cpu).unwrap().to_dtype(dtype).unwrap()
}

fn bits(t: &Tensor) -> Vec<u32> {
    t.to_vec1::<f32>().unwrap().iter().map(|v| v.to_bits()).collect()
}

#[test]
fn adamw_in_place_matches_composed_bit_for_bit() {
    // 70001 elements: several rayon chunks and a ragged tail.
    let n = 70_001;
    let w = values(n, 1, DType::F32);
    let (m, v) = (w.zeros_like().unwrap(), w.zeros_like().unwrap());
    let (mut rw, mut rm, mut rv) = (w.copy().unwrap(), m.copy().unwrap(), v.copy().unwrap());
    for step in 1..=4u64 {
        let g = values(n, 10 + step, DType::F32);
        let h = AdamW { lr: 0.01 * step as f64, beta1: 0.9, beta2: 0.95, eps: 1e-8, weight_decay: 0.1, step };
        adamw_step(&w, &m, &v, &g, &h).unwrap();
        // taper-train's composed update, term for term.
        rm = (&rm + ((&g - &rm).unwrap() * (1.0 - h.beta1)).unwrap()).unwrap();
        rv = ((&rv * h.beta2).unwrap() + (g.sqr().unwrap() * (1.0 - h.beta2)).unwrap()).unwrap();
        let bc1 = 1.0 - h.beta1.powi(step as i32);
        let bc2_sqrt = (1.0 - h.beta2.powi(step as i32)).sqrt();
        let denom = ((rv.sqrt().unwrap() / bc2_sqrt).unwrap() + h.eps).unwrap();
        rw = ((&rw * (1.0 - h.lr * h.weight_decay)).unwrap() - (rm.div(&denom).unwrap() * (h.lr / bc1)).unwrap())
            .unwrap();
        assert_eq!(bits(&w), bits(&rw), "w at step {step}");
        assert_eq!(bits(&m), bits(&rm), "m at step {step}");
        assert_eq!(bits(&v), bits(&rv), "v at step {step}");
    }
}

#[test]
fn lion_in_place_matches_composed_bit_for_bit() {
    let n = 33_333;
    let w = values(n, 2, DType::F32);
    let m = w.zeros_like().unwrap();
    let (mut rw, mut rm) = (w.copy().unwrap(), m.copy().unwrap());
    for step in 1..=4u64 {
        // Step 3's gradient is zero in places where the momentum is zero too: sign(0) = 0.
        let g = if step == 1 { values(n, 7, DType::F32).relu().unwrap() } else { values(n, 20 + step, DType::F32) };
        let h = Lion { lr: 0.003, beta1: 0.9, beta2: 0.99, weight_decay: 0.5 };
        lion_step(&w, &m, &g, &h).unwrap();
        let update = ((&rm * h.beta1).unwrap() + (&g * (1.0 - h.beta1)).unwrap()).unwrap().sign().unwrap();
        rw = ((&rw * (1.0 - h.lr * h.weight_decay)).unwrap() - (update * h.lr).unwrap()).unwrap();
        rm = ((&rm * h.beta2).unwrap() + (&g * (1.0 - h.beta2)).unwrap()).unwrap();
        assert_eq!(bits(&w), bits(&rw), "w at step {step}");
        assert_eq!(bits(&m), bits(&rm), "m at step {step}");
    }
}

#[test]
fn f64_updates_follow_the_rules() {
    let n = 5;
    let w = values(n, 3, DType::F64);
    let (m, v) = (w.zeros_like().unwrap(), w.zeros_like().unwrap());
    let w0: Vec<f64> = w.to_vec1().unwrap();
    let (mut ew, mut em, mut ev) = (w0.clone(), vec![0f64; n], vec![0f64; n]);
    for step in 1..=3u64 {
        let g = values(n, 30 + step, DType::F64);
        let gv: Vec<f64> = g.to_vec1().unwrap();
        let h = AdamW { lr: 0.1, beta1: 0.8, beta2: 0.9, eps: 1e-6, weight_decay: 0.2, step };
        adamw_step(&w, &m, &v, &g, &h).unwrap();
        for i in 0..n {
            ew[i] *= 1.0 - h.lr * h.weight_decay;
            em[i] = h.beta1 * em[i] + (1.0 - h.beta1) * gv[i];
            ev[i] = h.beta2 * ev[i] + (1.0 - h.beta2) * gv[i] * gv[i];
            let mh = em[i] / (1.0 - h.beta1.powi(step as i32));
            let vh = ev[i] / (1.0 - h.beta2.powi(step as i32));
            ew[i] -= h.lr * mh / (vh.sqrt() + h.eps);
        }
    }
    let got: Vec<f64> = w.to_vec1().unwrap();
    for (a, b) in got.iter().zip(&ew) {
        assert!((a - b).abs() < 1e-12, "{got:?} vs {ew:?}");
    }
    // Lion in f64: w = w (1 - lr wd) - lr sign(b1 m + (1 - b1) g); m = b2 m + (1 - b2) g.
    let w = values(n, 4, DType::F64);
    let m = values(n, 5, DType::F64);
    let g = values(n, 6, DType::F64);
    let (w0, m0, g0): (Vec<f64>, Vec<f64>, Vec<f64>) =
        (w.to_vec1().unwrap(), m.to_vec1().unwrap(), g.to_vec1().unwrap());
    lion_step(&w, &m, &g, &Lion { lr: 0.1, beta1: 0.9, beta2: 0.99, weight_decay: 0.1 }).unwrap();
    let (w1, m1): (Vec<f64>, Vec<f64>) = (w.to_vec1().unwrap(), m.to_vec1().unwrap());
    for i in 0..n {
        let u = 0.9 * m0[i] + 0.1 * g0[i];
        let want = w0[i] * 0.99 - 0.1 * u.signum() * if u == 0.0 { 0.0 } else { 1.0 };
        assert!((w1[i] - want).abs() < 1e-12 && (m1[i] - (0.99 * m0[i] + 0.01 * g0[i])).abs() < 1e-12);
    }
}

#[test]
fn mismatched_or_strided_state_is_an_error() {
    let w = values(6, 1, DType::F32).reshape((2, 3)).unwrap();
    let g = w.ones_like().unwrap();
    let h = AdamW { lr: 0.1, beta1: 0.9, beta2: 0.99, eps: 1e-8, weight_decay: 0.0, step: 1 };
    let small = Tensor::zeros(3, DType::F32, &Device::Cpu).unwrap();
    assert!(adamw_step(&w, &small, &small, &g, &h).is_err());
    let strided = Tensor::zeros((3, 2), DType::F32, &Device::Cpu).unwrap().t().unwrap();
    assert!(adamw_step(&w, &strided, &strided, &g, &h).is_err());
}

/// Dtypes without a kernel (bf16) take the composed path and still update in place.
#[test]
fn bf16_falls_back_to_composed_in_place() {
    let w = values(8, 9, DType::BF16);
    let m = w.zeros_like().unwrap();
    let g = values(8, 10, DType::BF16);
    let before: Vec<f32> = w.to_dtype(DType::F32).unwrap().to_vec1().unwrap();
    lion_step(&w, &m, &g, &Lion { lr: 0.125, beta1: 0.9, beta2: 0.99, weight_decay: 0.0 }).unwrap();
    let after: Vec<f32> = w.to_dtype(DType::F32).unwrap().to_vec1().unwrap();
    let gs: Vec<f32> = g.to_dtype(DType::F32).unwrap().to_vec1().unwrap();
    for i in 0..8 {
        let want = before[i]
            - 0.125
                * if gs[i] > 0.0 {
                    1.0
                } else if gs[i] < 0.0 {
                    -1.0
                } else {
                    0.0
                };
        assert!((after[i] - want).abs() < 0.02 * (1.0 + want.abs()), "{i}: {} vs {want}", after[i]);
    }
}
