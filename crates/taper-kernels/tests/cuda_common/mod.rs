//! What the CUDA tests share: the device, tolerances, and running an op with the CUDA kernels
//! on and off to compare the two.
#![allow(dead_code)]

use candle_core::{DType, Device, Tensor, Var};

/// The GPU, or None (and a line saying why) where there is none and none is required.
pub fn gpu() -> Option<Device> {
    match Device::new_cuda(0) {
        Ok(d) => Some(d),
        Err(e) if std::env::var("TAPER_REQUIRE_CUDA").is_ok_and(|v| v == "1") => panic!("no CUDA device: {e}"),
        Err(e) => {
            eprintln!("skipped: no CUDA device ({e})");
            None
        }
    }
}

/// The tolerance for results stored in `dt`, relative to the largest magnitude compared: f32
/// as the issue asks; bf16 (8 significant bits) and f16 (11) at eight rounding steps of the
/// type. The kernels keep every intermediate in f32 and round once on the way out, while the
/// composed ops round each intermediate to the type (a softmax's probabilities, a norm's
/// centred rows, the incoming gradient times each factor), a few steps between them; a wrong
/// index or mask differs by the values themselves, far beyond.
pub fn tolerance(dt: DType) -> f64 {
    match dt {
        DType::F32 => 1e-5,
        DType::BF16 => 8.0 * 2f64.powi(-8),
        DType::F16 => 8.0 * 2f64.powi(-11),
        dt => unreachable!("{dt:?}"),
    }
}

pub fn assert_close(what: &str, dt: DType, got: &Tensor, want: &Tensor) {
    assert_eq!(got.dims(), want.dims(), "{what}: shape");
    let g = got.to_dtype(DType::F64).unwrap().flatten_all().unwrap().to_vec1::<f64>().unwrap();
    let w = want.to_dtype(DType::F64).unwrap().flatten_all().unwrap().to_vec1::<f64>().unwrap();
    let scale = w.iter().fold(0f64, |m, v| m.max(v.abs())).max(1e-30);
    let worst = g.iter().zip(&w).map(|(a, b)| (a - b).abs() / scale).fold(0f64, f64::max);
    assert!(worst <= tolerance(dt), "{what} ({dt:?}): worst relative difference {worst:e} > {:e}", tolerance(dt));
}

/// Random inputs on `dev` in `dt` (normal, times `scale`), each a Var so that it gets a gradient.
pub fn inputs(dev: &Device, dt: DType, shapes: &[&[usize]], scale: f64) -> Vec<Var> {
    shapes
        .iter()
        .map(|s| {
            let t = (Tensor::randn(0f32, 1f32, *s, dev).unwrap() * scale).unwrap().to_dtype(dt).unwrap();
            Var::from_tensor(&t).unwrap()
        })
        .collect()
}

/// Runs `f` over `xs` with the CUDA kernels on and off, and compares the outputs and the
/// gradients of every input under a fixed random projection of the output (so that every
/// output element weighs in the backward).
pub fn check(what: &str, dt: DType, xs: &[Var], f: impl Fn(&[Tensor]) -> candle_core::Result<Tensor>) {
    let run = |on: bool| {
        taper_kernels::with_cuda_kernels(on, || {
            let ts: Vec<Tensor> = xs.iter().map(|v| v.as_tensor().clone()).collect();
            let y = f(&ts).unwrap();
            // In f32 whatever y's type, so that both runs weigh the outputs alike.
            let ones = Tensor::ones(y.shape(), DType::F32, y.device()).unwrap();
            let proj = ones.cumsum(y.rank() - 1).unwrap().sin().unwrap();
            let loss = (y.to_dtype(DType::F32).unwrap() * proj).unwrap().sum_all().unwrap();
            let grads = loss.backward().unwrap();
            let gs: Vec<Option<Tensor>> = xs.iter().map(|v| grads.get(v.as_tensor()).cloned()).collect();
            (y, gs)
        })
    };
    let ((y1, g1), (y0, g0)) = (run(true), run(false));
    assert_close(&format!("{what} forward"), dt, &y1, &y0);
    for (i, (a, b)) in g1.iter().zip(&g0).enumerate() {
        match (a, b) {
            (Some(a), Some(b)) => assert_close(&format!("{what} gradient of input {i}"), dt, a, b),
            (None, None) => {}
            _ => panic!("{what}: input {i} has a gradient on one path only"),
        }
    }
}

pub const DTYPES: [DType; 3] = [DType::F32, DType::BF16, DType::F16];
