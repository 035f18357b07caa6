//! Forward + backward time of fused ops against the composed candle versions on the CPU, at
//! GPT-2-small-like sizes. `cargo run --release -p taper-kernels --example timing`

use candle_core::{DType, Device, Result, Tensor, Var, D};
use std::time::Instant;

fn time(reps: usize, mut f: impl FnMut() -> Result<()>) -> Result<f64> {
    f()?; // warm-up
    let t0 = Instant::now();
    for _ in 0..reps {
        f()?;
    }
    Ok(t0.elapsed().as_secs_f64() * 1e3 / reps as f64)
}

fn fwd_bwd(x: &Var, op: &dyn Fn(&Tensor) -> Result<Tensor>) -> Result<()> {
    let y = op(x.as_tensor())?;
    let g = y.sqr()?.sum_all()?.backward()?;
    assert!(g.get(x.as_tensor()).is_some());
    Ok(())
}

fn main() -> Result<()> {
    let dev = Device::Cpu;
    let (n, c, v) = (4096, 768, 8192);
    let x = Var::from_tensor(&Tensor::randn(0f32, 1., (n, c), &dev)?)?;
    let w = Tensor::ones(c, DType::F32, &dev)?;
    let b = Tensor::zeros(c, DType::F32, &dev)?;
    let composed_ln = |x: &Tensor| -> Result<Tensor> {
        let mean = x.mean_keepdim(D::Minus1)?;
        let xc = x.broadcast_sub(&mean)?;
        let var = xc.sqr()?.mean_keepdim(D::Minus1)?;
        xc.broadcast_div(&(var + 1e-5)?.sqrt()?)?.broadcast_mul(&w)?.broadcast_add(&b)
    };
    let fused = time(5, || fwd_bwd(&x, &|x| taper_kernels::layer_norm(x, &w, Some(&b), 1e-5)))?;
    let composed = time(5, || fwd_bwd(&x, &composed_ln))?;
    println!("layer_norm ({n}, {c}) fwd+bwd: fused {fused:.2} ms, composed {composed:.2} ms");

    let h = Var::from_tensor(&Tensor::randn(0f32, 1., (n, c * 4), &dev)?)?;
    let fused = time(5, || fwd_bwd(&h, &|x| taper_kernels::gelu_erf(x)))?;
    let composed = time(5, || fwd_bwd(&h, &|x| x.gelu_erf()))?;
    println!("gelu_erf ({n}, {}) fwd+bwd: fused {fused:.2} ms, composed {composed:.2} ms", c * 4);

    let logits = Var::from_tensor(&Tensor::randn(0f32, 1., (n / 4, v), &dev)?)?;
    let targets = Tensor::from_vec((0..n / 4).map(|i| (i * 7 % v) as i64).collect::<Vec<_>>(), n / 4, &dev)?;
    let ce = |f: &dyn Fn(&Tensor) -> Result<Tensor>| -> Result<()> {
        let loss = f(logits.as_tensor())?;
        loss.backward()?;
        Ok(())
    };
    let fused = time(5, || ce(&|l| Ok(taper_kernels::cross_entropy(l, &targets, -100)?.0)))?;
    let composed = time(5, || {
        ce(&|l| {
            let max = l.max_keepdim(D::Minus1)?.detach();
            let s = l.broadcast_sub(&max)?;
            let logp = s.broadcast_sub(&s.exp()?.sum_keepdim(D::Minus1)?.log()?)?;
            let picked = logp.gather(&targets.to_dtype(DType::U32)?.unsqueeze(1)?, 1)?;
            picked.mean_all()?.neg()
        })
    })?;
    println!("cross_entropy ({}, {v}) fwd+bwd: fused {fused:.2} ms, composed {composed:.2} ms", n / 4);
    Ok(())
}
