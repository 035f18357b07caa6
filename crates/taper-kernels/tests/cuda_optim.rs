//! The CUDA optimizer kernels (one tensor, and many in one launch) against the composed update
//! on the same GPU, bit for bit in f32; and the linear layers' CUDA path against the composed
//! one. `scripts/gpu-check.sh` runs these with `TAPER_REQUIRE_CUDA=1`; elsewhere, without a
//! device, each says so and passes.
#![cfg(feature = "cuda")]

mod cuda_common;

use candle_core::{DType, Device, Tensor};
use cuda_common::*;
use taper_kernels::{adamw_step, adamw_step_many, lion_step, lion_step_many, with_cuda_kernels, AdamW, Lion};

/// Sizes under a block, past one, and one past a chunk of the many-tensor kernels (4096).
const SIZES: [usize; 3] = [1, 1000, 4097];

fn randn(dev: &Device, n: usize) -> Tensor {
    Tensor::randn(0f32, 1f32, n, dev).unwrap()
}

fn bits(t: &Tensor) -> Vec<u32> {
    t.to_vec1::<f32>().unwrap().iter().map(|v| v.to_bits()).collect()
}

/// A parameter and its states: its kernels-on copy and its kernels-off copy.
struct Twin {
    on: Vec<Tensor>,
    off: Vec<Tensor>,
}

impl Twin {
    /// A parameter with `states` state tensors, starting from random values (so that the
    /// first step reads nonzero states too).
    fn new(dev: &Device, n: usize, states: usize) -> Self {
        let on: Vec<Tensor> =
            (0..=states).map(|i| if i == 2 { randn(dev, n).abs().unwrap() } else { randn(dev, n) }).collect();
        let off = on.iter().map(|t| t.copy().unwrap()).collect();
        Twin { on, off }
    }

    fn assert_same(&self, what: &str) {
        for (i, (a, b)) in self.on.iter().zip(&self.off).enumerate() {
            assert_eq!(bits(a), bits(b), "{what}: tensor {i} of {} elements", a.elem_count());
        }
    }
}

fn adamw(step: u64) -> AdamW {
    AdamW { lr: 0.01, beta1: 0.9, beta2: 0.95, eps: 1e-8, weight_decay: 0.1, step }
}

fn lion() -> Lion {
    Lion { lr: 0.003, beta1: 0.9, beta2: 0.99, weight_decay: 0.5 }
}

#[test]
fn adamw_matches_the_composed_update_bit_for_bit() {
    let Some(dev) = gpu() else { return };
    for n in SIZES {
        let p = Twin::new(&dev, n, 2);
        for step in 1..=3 {
            let g = randn(&dev, n);
            let h = adamw(step);
            with_cuda_kernels(true, || adamw_step(&p.on[0], &p.on[1], &p.on[2], &g, &h)).unwrap();
            with_cuda_kernels(false, || adamw_step(&p.off[0], &p.off[1], &p.off[2], &g, &h)).unwrap();
            p.assert_same(&format!("adamw_step, step {step}"));
        }
    }
}

#[test]
fn lion_matches_the_composed_update_bit_for_bit() {
    let Some(dev) = gpu() else { return };
    for n in SIZES {
        let p = Twin::new(&dev, n, 1);
        for step in 1..=3 {
            // The first gradient is zero in places: sign(0) = 0 where the momentum is zero too.
            let g = if step == 1 { randn(&dev, n).relu().unwrap() } else { randn(&dev, n) };
            if step == 1 {
                for t in [&p.on[1], &p.off[1]] {
                    t.slice_set(&Tensor::zeros(n, DType::F32, &dev).unwrap(), 0, 0).unwrap();
                }
            }
            with_cuda_kernels(true, || lion_step(&p.on[0], &p.on[1], &g, &lion())).unwrap();
            with_cuda_kernels(false, || lion_step(&p.off[0], &p.off[1], &g, &lion())).unwrap();
            p.assert_same(&format!("lion_step, step {step}"));
        }
    }
}

#[test]
fn adamw_many_matches_the_composed_update_bit_for_bit() {
    let Some(dev) = gpu() else { return };
    let ps: Vec<Twin> = SIZES.iter().map(|&n| Twin::new(&dev, n, 2)).collect();
    for step in 1..=3 {
        // The gradient of the middle parameter strided (the update takes it contiguous).
        let gs: Vec<Tensor> = SIZES
            .iter()
            .map(|&n| {
                if n == 1000 {
                    randn(&dev, 2 * n).reshape((n, 2)).unwrap().narrow(1, 0, 1).unwrap().squeeze(1).unwrap()
                } else {
                    randn(&dev, n)
                }
            })
            .collect();
        let h = adamw(step);
        let set = |on: bool| -> Vec<(&Tensor, &Tensor, &Tensor, &Tensor)> {
            ps.iter()
                .zip(&gs)
                .map(|(p, g)| {
                    let t = if on { &p.on } else { &p.off };
                    (&t[0], &t[1], &t[2], g)
                })
                .collect()
        };
        with_cuda_kernels(true, || adamw_step_many(&set(true), &h)).unwrap();
        with_cuda_kernels(false, || adamw_step_many(&set(false), &h)).unwrap();
        for p in &ps {
            p.assert_same(&format!("adamw_step_many, step {step}"));
        }
    }
}

#[test]
fn lion_many_matches_the_composed_update_bit_for_bit() {
    let Some(dev) = gpu() else { return };
    let ps: Vec<Twin> = SIZES.iter().map(|&n| Twin::new(&dev, n, 1)).collect();
    for step in 1..=3 {
        let gs: Vec<Tensor> = SIZES.iter().map(|&n| randn(&dev, n)).collect();
        let set = |on: bool| -> Vec<(&Tensor, &Tensor, &Tensor)> {
            ps.iter()
                .zip(&gs)
                .map(|(p, g)| {
                    let t = if on { &p.on } else { &p.off };
                    (&t[0], &t[1], g)
                })
                .collect()
        };
        with_cuda_kernels(true, || lion_step_many(&set(true), &lion())).unwrap();
        with_cuda_kernels(false, || lion_step_many(&set(false), &lion())).unwrap();
        for p in &ps {
            p.assert_same(&format!("lion_step_many, step {step}"));
        }
    }
}

#[test]
fn many_with_shared_memory_updates_one_by_one() {
    // Two parameters that are one tensor: the kernel would update it twice at once, so the
    // update falls back to one step after the other, as the kernels-off path does.
    let Some(dev) = gpu() else { return };
    let p = Twin::new(&dev, 1000, 1);
    let g = randn(&dev, 1000);
    let (on, off) = (&p.on, &p.off);
    with_cuda_kernels(true, || lion_step_many(&[(&on[0], &on[1], &g), (&on[0], &on[1], &g)], &lion())).unwrap();
    with_cuda_kernels(false, || lion_step_many(&[(&off[0], &off[1], &g), (&off[0], &off[1], &g)], &lion())).unwrap();
    p.assert_same("lion_step_many over one parameter twice");
}

#[test]
fn linear_matches_the_composed_ops() {
    let Some(dev) = gpu() else { return };
    for dt in DTYPES {
        // (B, T, in) x (out, in): sizes that are not multiples of a tile.
        let xs = inputs(&dev, dt, &[&[2, 37, 70], &[45, 70], &[45]], 1.0);
        check("linear", dt, &xs, |t| taper_kernels::linear(&t[0], &t[1], Some(&t[2])));
        check("linear without bias", dt, &xs[..2], |t| taper_kernels::linear(&t[0], &t[1], None));
        for tanh in [false, true] {
            check(&format!("linear_gelu (tanh {tanh})"), dt, &xs, |t| {
                taper_kernels::linear_gelu(&t[0], &t[1], Some(&t[2]), tanh)
            });
            check(&format!("linear_gelu without bias (tanh {tanh})"), dt, &xs[..2], |t| {
                taper_kernels::linear_gelu(&t[0], &t[1], None, tanh)
            });
        }
    }
}
