//! `taper bench`: the throughput of a pretraining step, split into forward, backward and
//! optimizer, with achieved FLOP/s set against a GEMM peak measured on this machine at the
//! model's own matmul shapes. `scripts/bench_torch.py` prints the same figures for PyTorch.

use crate::config::RunConfig;
use crate::data_parallel::{self, Sharded, Updater};
use crate::device::select_device;
use crate::optim::Optimizer;
use crate::{Result, TrainError};
use candle_core::{DType, Device, Tensor, Var};
use serde::Serialize;
use std::rc::Rc;
use std::time::Instant;
use taper_dist::Comm;
use taper_model::{init_weights, Decoder, ModelConfig, Rng, Weights};

#[derive(Debug, Clone, Serialize)]
pub struct BenchReport {
    pub implementation: &'static str,
    pub threads: usize,
    pub params: usize,
    /// 6 x (matmul parameters) + 12 x layers x width x context (PaLM's count, attention included).
    pub flops_per_token: f64,
    pub tokens_per_step: usize,
    pub steps: usize,
    pub tokens_per_sec: f64,
    pub step_ms: f64,
    pub forward_ms: f64,
    pub backward_ms: f64,
    pub optimizer_ms: f64,
    pub gflops: f64,
    /// FLOP-weighted GEMM throughput at the model's matmul shapes (forward and both backward
    /// products), the best a step made of nothing but matmuls could do here.
    pub gemm_peak_gflops: f64,
    pub mfu: f64,
    /// `train.precision`: what the GEMMs' operands are rounded to.
    pub precision: &'static str,
    /// The same measurement with the operands in `precision` (the fused linear's GEMMs; bf16 on
    /// the CPU's bf16 dot-product instructions where it has them), and the MFU against it.
    /// Equal to the f32 figures in f32.
    pub precision_gemm_peak_gflops: f64,
    pub precision_mfu: f64,
    /// The largest of the replicas'.
    pub peak_rss_mb: f64,
    /// Data-parallel replicas (processes); tokens/s counts all of them.
    pub world: usize,
    /// The gradient all-reduce (or reduce-scatter) per step, and its share of the step.
    pub allreduce_ms: f64,
    pub allreduce_share: f64,
    /// Optimizer state one replica holds (halved by `train.shard_optimizer` at world 2).
    pub optimizer_state_mb: f64,
    /// The f32 master weights, and their gradients as a step holds them before the update.
    pub weights_mb: f64,
    pub gradients_mb: f64,
    /// The rest of the step's peak: the activations kept for the backward (what activation
    /// checkpointing trades for recomputation), the backward's transient gradients and the
    /// kernels' scratch. Measured on the CPU as the resident high-water mark of the timed steps
    /// above what was resident before them (weights and optimizer state) and the gradients;
    /// null on other devices, where the step's memory is not the process's.
    pub activations_mb: f64,
}

/// Parameters that enter a matmul: the attention and MLP projections and the output head.
fn matmul_params(cfg: &ModelConfig) -> usize {
    let c = cfg.n_embd;
    let (q, kv) = (cfg.n_head * cfg.head_dim(), cfg.kv_heads() * cfg.head_dim());
    let mlp_mats = if matches!(cfg.mlp, taper_model::Mlp::Swiglu) { 3 } else { 2 };
    cfg.n_layer * (c * q + 2 * c * kv + q * c + mlp_mats * c * cfg.hidden()) + cfg.vocab_size * c
}

pub fn flops_per_token(cfg: &ModelConfig) -> f64 {
    6.0 * matmul_params(cfg) as f64 + 12.0 * (cfg.n_layer * cfg.n_embd * cfg.block_size) as f64
}

/// (m, k, n) of every weight matmul in one step's forward: x (m, k) times W^T (k, n).
fn matmul_shapes(cfg: &ModelConfig, rows: usize) -> Vec<(usize, usize, usize, usize)> {
    let c = cfg.n_embd;
    let (q, kv, h) = (cfg.n_head * cfg.head_dim(), cfg.kv_heads() * cfg.head_dim(), cfg.hidden());
    let mlp_in = if matches!(cfg.mlp, taper_model::Mlp::Swiglu) { 2 } else { 1 };
    // (m, k, n, how many per step)
    vec![
        (rows, c, q, cfg.n_layer),
        (rows, c, kv, 2 * cfg.n_layer),
        (rows, q, c, cfg.n_layer),
        (rows, c, h, mlp_in * cfg.n_layer),
        (rows, h, c, cfg.n_layer),
        (rows, c, cfg.vocab_size, 1),
    ]
}

/// Seconds per call of `f` (its result dropped), the best of `reps` after one warm-up call.
fn best_of(reps: usize, mut f: impl FnMut() -> Result<Tensor>) -> Result<f64> {
    f()?;
    let mut best = f64::INFINITY;
    for _ in 0..reps {
        let t = Instant::now();
        f()?;
        best = best.min(t.elapsed().as_secs_f64());
    }
    Ok(best)
}

/// GFLOP/s of the model's matmuls (forward x W^T, backward dX = dY W and dW = dY^T X) at their
/// real shapes, weighted by how often a step runs each: in f32 through candle's matmul, in a
/// lower precision through the fused linear with its operands rounded (each laid out as that
/// product reads it; bf16 on the CPU's bf16 dot-product instructions where it has them).
pub fn gemm_peak(p: taper_kernels::Precision, cfg: &ModelConfig, rows: usize, dev: &Device) -> Result<f64> {
    let _p = taper_kernels::set_matmul_precision(p);
    let mut rng = Rng::new(1);
    let mut rand = |r: usize, c: usize| -> Result<Tensor> {
        let v: Vec<f32> = (0..r * c).map(|_| rng.normal() as f32).collect();
        Ok(Tensor::from_vec(v, (r, c), dev)?)
    };
    let (mut flops, mut secs) = (0.0, 0.0);
    for (m, k, n, count) in matmul_shapes(cfg, rows) {
        let (x, w, dy) = (rand(m, k)?, rand(n, k)?, rand(m, n)?);
        let (fwd, dx, dw) = match p {
            taper_kernels::Precision::F32 => (
                best_of(3, || Ok(x.matmul(&w.t()?)?))?,
                best_of(3, || Ok(dy.matmul(&w)?))?,
                best_of(3, || Ok(dy.t()?.matmul(&x)?))?,
            ),
            _ => {
                let (wt, dyt, xt) = (w.t()?.contiguous()?, dy.t()?.contiguous()?, x.t()?.contiguous()?);
                (
                    best_of(3, || Ok(taper_kernels::linear(&x, &w, None)?))?,
                    best_of(3, || Ok(taper_kernels::linear(&dy, &wt, None)?))?,
                    best_of(3, || Ok(taper_kernels::linear(&dyt, &xt, None)?))?,
                )
            }
        };
        flops += 3.0 * 2.0 * (m * k * n) as f64 * count as f64;
        secs += (fwd + dx + dw) * count as f64;
    }
    Ok(flops / secs / 1e9)
}

/// Peak resident set size of this process, in MB.
pub fn peak_rss_mb() -> f64 {
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: getrusage only writes the struct it is given.
    let rc = unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut usage) };
    if rc != 0 {
        return f64::NAN;
    }
    usage.ru_maxrss as f64 / 1024.0 // kilobytes on Linux
}

/// The process's resident memory now and its high-water mark, in MB (Linux's VmRSS and
/// VmHWM); None elsewhere.
fn resident_mb() -> Option<(f64, f64)> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let field = |key: &str| -> Option<f64> {
        let line = status.lines().find(|l| l.starts_with(key))?;
        let kb: f64 = line[key.len()..].trim().trim_end_matches("kB").trim().parse().ok()?;
        Some(kb / 1024.0)
    };
    Some((field("VmRSS:")?, field("VmHWM:")?))
}

/// Resets the process's resident high-water mark to what is resident now (Linux 4.0 and later:
/// writing 5 to clear_refs), so that a later VmHWM is the peak of what ran since. False where
/// that is not possible.
fn reset_resident_peak() -> bool {
    std::fs::write("/proc/self/clear_refs", "5").is_ok()
}

/// Keeps freed buffers of up to 32 MiB in the process for reuse. A training step frees and
/// reallocates the same activation- and gradient-sized tensors every time; glibc by default
/// maps big blocks afresh and unmaps them on free, so each step would fault every page back in
/// (zero-filled by the kernel), about a tenth of a CPU step. 32 MiB is the largest threshold
/// glibc accepts; bigger blocks (full logits) still go back.
pub fn keep_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only sets allocator parameters; it is called before any thread starts.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 32 << 20);
        libc::mallopt(libc::M_TRIM_THRESHOLD, i32::MAX);
    }
}

/// Times `steps` training steps (after `warmup` untimed ones) of the config's model on random
/// tokens: forward with the loss, backward, the gradients' reduction across replicas (under
/// mpirun), optimizer update. Each phase is timed apart, the device synchronised before each
/// timer is read.
pub fn bench(cfg: &RunConfig, steps: usize, warmup: usize, comm: &Rc<dyn Comm>) -> Result<BenchReport> {
    let dev = select_device(&cfg.device)?;
    let world = comm.world();
    let m = &cfg.model;
    if m.vocab_size == 0 {
        return Err(TrainError::Invalid(
            "bench: set model.vocab_size (no tokenizer is trained for a benchmark)".into(),
        ));
    }
    let (b, t) = (cfg.train.batch_size, m.block_size);
    let vars: Vec<(String, Var)> = init_weights(m, cfg.seed, &dev)?
        .into_iter()
        .map(|(n, t)| Ok((n, Var::from_tensor(&t)?)))
        .collect::<Result<_>>()?;
    let params: usize = vars.iter().map(|(_, v)| v.elem_count()).sum();
    let weights = Weights::from_pairs(vars.iter().map(|(n, v)| (n.clone(), v.as_tensor().clone())));
    let model = Decoder::load(&weights, m)?.with_checkpointing(cfg.train.activation_checkpointing);
    // As the training loop sets it (without f16's loss scaling: the timing is the same).
    let _matmuls = taper_kernels::set_matmul_precision(cfg.train.precision);
    let mut opt = match cfg.train.shard_optimizer && world > 1 {
        true => Updater::Sharded(Box::new(Sharded::new(cfg.optim.clone(), vars, comm.clone())?)),
        false => Updater::Plain(Optimizer::new(cfg.optim.clone(), vars)?),
    };
    // Each replica its own tokens.
    let mut rng = Rng::derive(cfg.seed, &[comm.rank() as u64]);
    // What is resident before the first step (the weights, the optimizer's state, the
    // program), so that the step's own peak can be told apart from it.
    let before_steps = match dev.is_cpu() && reset_resident_peak() {
        true => resident_mb().map(|(now, _)| now),
        false => None,
    };
    let (mut fwd, mut bwd, mut red, mut upd) = (0.0, 0.0, 0.0, 0.0);
    for i in 0..warmup + steps {
        let ids: Vec<u32> = (0..b * t).map(|_| rng.below(m.vocab_size as u64) as u32).collect();
        let tg: Vec<i64> = (0..b * t).map(|_| rng.below(m.vocab_size as u64) as i64).collect();
        let (x, y) = (Tensor::from_vec(ids, (b, t), &dev)?, Tensor::from_vec(tg, b * t, &dev)?);
        let t0 = Instant::now();
        // As `taper pretrain` computes it: the head and the loss fused when the kernels are on.
        let loss = model.head_loss(&model.forward_hidden(&x, 0, None, None)?, &y, -100)?;
        let loss_value = loss.to_dtype(DType::F32)?.to_scalar::<f32>()?;
        let t1 = Instant::now();
        let store = taper_model::checkpointing::backward(&loss)?;
        let grads: Vec<Tensor> = opt
            .params()
            .iter()
            .map(|p| {
                store
                    .get(p.var.as_tensor())
                    .cloned()
                    .ok_or_else(|| TrainError::Invalid(format!("no gradient for {}", p.name)))
            })
            .collect::<Result<_>>()?;
        drop(store);
        dev.synchronize()?;
        let t2 = Instant::now();
        let mut l = Tensor::new(loss_value as f64, &dev)?;
        let grads = data_parallel::reduce(&**comm, opt.plan(), &mut l, grads)?;
        dev.synchronize()?;
        let t_red = Instant::now();
        opt.norm(&grads)?;
        opt.apply(grads, cfg.optim.lr, None)?;
        dev.synchronize()?;
        let t3 = Instant::now();
        if !loss_value.is_finite() {
            return Err(TrainError::Invalid(format!("bench: loss became {loss_value} at step {i}")));
        }
        if i >= warmup {
            fwd += (t1 - t0).as_secs_f64();
            bwd += (t2 - t1).as_secs_f64();
            red += (t_red - t2).as_secs_f64();
            upd += (t3 - t_red).as_secs_f64();
        }
    }
    let n = steps.max(1) as f64;
    let weights_mb = 4.0 * params as f64 / 1e6;
    // f32 gradients of every parameter, held together between the backward and the update.
    let gradients_mb = weights_mb;
    let step_peak_mb = match (before_steps, resident_mb()) {
        (Some(before), Some((_, peak))) => peak - before,
        _ => f64::NAN,
    };
    // The slowest replica sets the pace; the peak memory is the largest replica's.
    let mut worst = [fwd + bwd + red + upd, peak_rss_mb(), step_peak_mb];
    if world > 1 {
        // Each replica's pair in its own place; the sum gathers them all.
        let k = worst.len();
        let mut all = vec![0f64; k * world];
        all[k * comm.rank()..k * comm.rank() + k].copy_from_slice(&worst);
        comm.all_reduce_sum_f64(&mut all).map_err(|e| TrainError::Invalid(e.to_string()))?;
        for (i, w) in worst.iter_mut().enumerate() {
            *w = all.iter().skip(i).step_by(k).copied().fold(f64::NEG_INFINITY, f64::max);
        }
    }
    let step_s = worst[0] / n;
    let tokens_per_sec = (world * b * t) as f64 / step_s;
    let fpt = flops_per_token(m);
    let gflops = fpt * tokens_per_sec / 1e9;
    let precision = cfg.train.precision;
    let peak = gemm_peak(taper_kernels::Precision::F32, m, b * t, &dev)?;
    let low_peak = match precision {
        taper_kernels::Precision::F32 => peak,
        p => gemm_peak(p, m, b * t, &dev)?,
    };
    Ok(BenchReport {
        implementation: "taper",
        threads: candle_core::utils::get_num_threads(),
        params,
        flops_per_token: fpt,
        tokens_per_step: b * t,
        steps,
        tokens_per_sec,
        step_ms: step_s * 1e3,
        forward_ms: fwd / n * 1e3,
        backward_ms: bwd / n * 1e3,
        optimizer_ms: upd / n * 1e3,
        gflops,
        gemm_peak_gflops: peak,
        // Against the replicas' combined peak.
        mfu: gflops / (peak * world as f64),
        precision: precision.name(),
        precision_gemm_peak_gflops: low_peak,
        precision_mfu: gflops / (low_peak * world as f64),
        peak_rss_mb: worst[1],
        world,
        allreduce_ms: red / n * 1e3,
        allreduce_share: red / (fwd + bwd + red + upd),
        optimizer_state_mb: opt.state_bytes() as f64 / 1e6,
        weights_mb,
        gradients_mb,
        // NaN (null in JSON) where the peak could not be read.
        activations_mb: match worst[2].is_finite() {
            true => (worst[2] - gradients_mb).max(0.0),
            false => f64::NAN,
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The FLOP count follows the formula: for GPT-2 small's shape (12 x 768, vocab
    /// 50257, context 1024) 6N with N = 85M + 38.6M head, plus the attention term.
    #[test]
    fn flops_per_token_counts_matmul_params_and_attention() {
        let cfg = ModelConfig {
            vocab_size: 50257,
            n_layer: 12,
            n_head: 12,
            n_embd: 768,
            block_size: 1024,
            ..Default::default()
        };
        let n = 12 * 12 * 768 * 768 + 50257 * 768;
        assert_eq!(matmul_params(&cfg), n);
        assert_eq!(flops_per_token(&cfg), 6.0 * n as f64 + 12.0 * 12.0 * 768.0 * 1024.0);
    }
}
