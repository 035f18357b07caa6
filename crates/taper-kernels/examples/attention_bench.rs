//! Times the fused attention against the composed candle version, forward and forward+backward.
//! `cargo run --release -p taper-kernels --example attention_bench [B H T D [Hkv]]`
//! (default 8 6 256 64, causal, f32).

use candle_core::{Device, Tensor, Var};
use std::time::Instant;
use taper_kernels::{attention, attention_composed, AttentionError, AttnOpts};

type Res<T> = Result<T, Box<dyn std::error::Error>>;
type Attn = fn(&Tensor, &Tensor, &Tensor, &AttnOpts) -> Result<Tensor, AttentionError>;

/// This process's user + system CPU time in ms (Linux; 0 elsewhere). On a shared machine wall
/// time depends on the load; CPU time counts the work.
fn cpu_ms() -> f64 {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    // Fields after the parenthesised command name; utime and stime are the 12th and 13th.
    let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let f: Vec<f64> = rest.split_whitespace().skip(11).take(2).filter_map(|x| x.parse().ok()).collect();
    // Clock ticks, 100 per second on Linux.
    f.iter().sum::<f64>() * 10.0
}

/// Median wall and CPU milliseconds of `reps` runs after one warm-up.
fn time(reps: usize, mut f: impl FnMut() -> Res<()>) -> Res<(f64, f64)> {
    f()?;
    let mut ms = Vec::with_capacity(reps);
    let cpu0 = cpu_ms();
    for _ in 0..reps {
        let t = Instant::now();
        f()?;
        ms.push(t.elapsed().as_secs_f64() * 1e3);
    }
    let cpu = (cpu_ms() - cpu0) / reps as f64;
    ms.sort_by(f64::total_cmp);
    Ok((ms[reps / 2], cpu))
}

fn main() -> Res<()> {
    let args: Vec<usize> = std::env::args().skip(1).map(|a| a.parse()).collect::<Result<_, _>>()?;
    let [b, h, t, d] = match args[..] {
        [b, h, t, d, ..] => [b, h, t, d],
        _ => [8, 6, 256, 64],
    };
    let hkv = args.get(4).copied().unwrap_or(h);
    let dev = Device::Cpu;
    let q = Var::from_tensor(&(Tensor::randn(0f32, 1.0, (b, h, t, d), &dev)?))?;
    let k = Var::from_tensor(&(Tensor::randn(0f32, 1.0, (b, hkv, t, d), &dev)?))?;
    let v = Var::from_tensor(&(Tensor::randn(0f32, 1.0, (b, hkv, t, d), &dev)?))?;
    let r = Tensor::randn(0f32, 1.0, (b, h, t, d), &dev)?;
    let opts = AttnOpts::causal(d, 0);
    let reps = 7;
    println!("B={b} Hq={h} Hkv={hkv} T={t} D={d} causal f32, {} threads", rayon::current_num_threads());
    for (name, f) in [("fused", attention as Attn), ("composed", attention_composed)] {
        let fwd = time(reps, || {
            let (q, k, v) = (q.as_tensor().detach(), k.as_tensor().detach(), v.as_tensor().detach());
            f(&q, &k, &v, &opts)?;
            Ok(())
        })?;
        let both = time(reps, || {
            let out = f(q.as_tensor(), k.as_tensor(), v.as_tensor(), &opts)?;
            let grads = (out * &r)?.sum_all()?.backward()?;
            assert!(grads.get(k.as_tensor()).is_some());
            Ok(())
        })?;
        println!(
            "{name:>9}: forward {:7.1} ms wall {:7.1} ms cpu, forward+backward {:7.1} ms wall {:7.1} ms cpu",
            fwd.0, fwd.1, both.0, both.1
        );
    }
    Ok(())
}
