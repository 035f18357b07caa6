//! Forward and forward + backward time of each op of one decoder block (and the LM head + loss)
//! at the benchmark reference shapes (B 8, T 256, C 384, 6 heads, vocab 8192), beside plain GEMMs
//! of the same sizes: where a training step's time goes. The backward is of sum(y).
//! `RAYON_NUM_THREADS=2 cargo run --release -p taper-kernels --example block_profile`
//! (`ONLY=gelu_erf` times one op).

use candle_core::{DType, Device, Tensor, Var};
use std::time::Instant;
use taper_kernels::*;

type Res<T> = Result<T, Box<dyn std::error::Error>>;
type OpFn<'a> = dyn Fn() -> candle_core::Result<Tensor> + 'a;
fn time(reps: usize, mut f: impl FnMut() -> Res<()>) -> Res<f64> {
    f()?;
    let mut ms = vec![];
    for _ in 0..reps {
        let t = Instant::now();
        f()?;
        ms.push(t.elapsed().as_secs_f64() * 1e3);
    }
    ms.sort_by(f64::total_cmp);
    Ok(ms[reps / 2])
}
fn main() -> Res<()> {
    let dev = Device::Cpu;
    let (b, t, c, h, v) = (8usize, 256usize, 384usize, 6usize, 8192usize);
    let n = b * t;
    let x = Var::from_tensor(&Tensor::randn(0f32, 1.0, (b, t, c), &dev)?)?;
    let lw = Var::from_tensor(&Tensor::ones(c, DType::F32, &dev)?)?;
    let lb = Var::from_tensor(&Tensor::zeros(c, DType::F32, &dev)?)?;
    let wqkv = Var::from_tensor(&(Tensor::randn(0f32, 0.02, (3 * c, c), &dev)?))?;
    let bqkv = Var::from_tensor(&Tensor::zeros(3 * c, DType::F32, &dev)?)?;
    let wo = Var::from_tensor(&(Tensor::randn(0f32, 0.02, (c, c), &dev)?))?;
    let wup = Var::from_tensor(&(Tensor::randn(0f32, 0.02, (4 * c, c), &dev)?))?;
    let wdn = Var::from_tensor(&(Tensor::randn(0f32, 0.02, (c, 4 * c), &dev)?))?;
    let head = Var::from_tensor(&(Tensor::randn(0f32, 0.02, (v, c), &dev)?))?;
    let tg = Tensor::from_vec((0..n as i64).map(|i| (i * 7919) % v as i64).collect::<Vec<_>>(), n, &dev)?;
    let opts = AttnOpts::causal(c / h, 0);
    let reps = 7;
    let gemm = |m: usize, k: usize, nn: usize| -> Res<f64> {
        let a = Tensor::randn(0f32, 1.0, (m, k), &dev)?;
        let bb = Tensor::randn(0f32, 1.0, (k, nn), &dev)?;
        time(reps, || {
            a.matmul(&bb)?;
            Ok(())
        })
    };
    let only = std::env::var("ONLY").ok();
    if only.is_none() {
        println!("gemm qkv fwd {:.2} ms", gemm(n, c, 3 * c)?);
        println!("gemm up fwd {:.2} ms", gemm(n, c, 4 * c)?);
        println!("gemm head fwd {:.2} ms", gemm(n, c, v)?);
    }
    let xt = x.as_tensor();
    let qv = Var::from_tensor(&Tensor::randn(0f32, 1.0, (b, t, 3 * c), &dev)?)?;
    let av = Var::from_tensor(&Tensor::randn(0f32, 1.0, (b, t, 4 * c), &dev)?)?;
    let ops: Vec<(&str, Box<OpFn>)> = vec![
        ("layer_norm", Box::new(|| layer_norm(xt, &lw, Some(&lb), 1e-5))),
        ("qkv linear", Box::new(|| linear(xt, &wqkv, Some(&bqkv)))),
        (
            "attention_packed",
            Box::new(|| {
                attention_packed(qv.as_tensor(), h, h, &opts).map_err(|e| candle_core::Error::Msg(e.to_string()))
            }),
        ),
        ("o linear", Box::new(|| linear(xt, &wo, None))),
        ("gelu_erf", Box::new(|| gelu_erf(av.as_tensor()))),
        ("gelu_tanh", Box::new(|| gelu_tanh(av.as_tensor()))),
        ("linear_gelu tanh", Box::new(|| linear_gelu(xt, &wup, None, true))),
        ("residual add", Box::new(|| xt + xt)),
        ("linear_gelu", Box::new(|| linear_gelu(xt, &wup, None, false))),
        ("down linear", Box::new(|| linear(av.as_tensor(), &wdn, None))),
    ];
    for (name, f) in &ops {
        if only.as_deref().is_some_and(|o| o != *name) {
            continue;
        }
        let fwd = time(reps, || {
            f()?;
            Ok(())
        })?;
        let fb = time(reps, || {
            let y = f()?;
            let _g = (y.sum_all()?).backward()?;
            Ok(())
        })?;
        println!("{name:>18}: fwd {fwd:7.2} ms  fwd+bwd {fb:7.2} ms");
    }
    if only.is_some() {
        return Ok(());
    }
    let hh = xt.reshape((n, c))?;
    let fwd = time(reps, || {
        linear_cross_entropy(&hh, &head, &tg, -100, 0)?;
        Ok(())
    })?;
    let fb = time(reps, || {
        let (l, _) = linear_cross_entropy(&hh, &head, &tg, -100, 0)?;
        l.backward()?;
        Ok(())
    })?;
    println!("{:>18}: fwd {fwd:7.2} ms  fwd+bwd {fb:7.2} ms", "linear_ce");
    Ok(())
}
