//! Data parallelism in the loop. Each rank holds a replica and computes the gradients of its
//! own slice of the step's samples; at the loop's gradient seam they are averaged across ranks
//! (one all-reduce per bucket of tens of MB), so every replica takes the same update.
//!
//! With `train.shard_optimizer` (ZeRO stage 1, Rajbhandari et al. 2020) each rank keeps the
//! optimizer's moments for only its 1/N of the flattened parameters: the gradients are
//! reduce-scattered (each rank receives the mean of its own slice), each rank updates its
//! slice, and the parameters are all-gathered. The update is the same element by element, so
//! the trajectory is the replicated one's; checkpoints hold the whole optimizer state, gathered,
//! so a run resumes on any number of ranks.

use crate::fingerprint::Fingerprint;
use crate::optim::{global_norm, OptimConfig, Optimizer, Param};
use crate::{Result, TrainError};
use candle_core::{Tensor, Var};
use std::collections::HashMap;
use std::ops::Range;
use std::rc::Rc;
use taper_dist::{Comm, BUCKET_BYTES};

fn dist(e: taper_dist::DistError) -> TrainError {
    TrainError::Invalid(e.to_string())
}

/// A step's gradients once complete: every parameter's (replicated), or this rank's slice of
/// the flattened gradients (sharded).
pub enum Gradients {
    Full(Vec<Tensor>),
    Shard(Vec<f32>),
}

/// Which slice of the flattened parameters each rank owns: ranks take equal contiguous
/// slices (the last one padded), so each holds 1/N of the optimizer state.
#[derive(Debug, Clone)]
pub struct ShardPlan {
    /// Each parameter's (flat offset, element count).
    spans: Vec<(usize, usize)>,
    total: usize,
    per_rank: usize,
    rank: usize,
}

impl ShardPlan {
    pub fn new(sizes: &[usize], rank: usize, world: usize) -> Self {
        let mut spans = Vec::with_capacity(sizes.len());
        let mut at = 0;
        for &n in sizes {
            spans.push((at, n));
            at += n;
        }
        Self { spans, total: at, per_rank: at.div_ceil(world), rank }
    }

    /// This rank's flat range.
    pub fn mine(&self) -> Range<usize> {
        let start = (self.rank * self.per_rank).min(self.total);
        start..((self.rank + 1) * self.per_rank).min(self.total)
    }

    /// The flat buffer's length with the padding: every rank's slice `per_rank` long.
    fn padded(&self, world: usize) -> usize {
        self.per_rank * world
    }

    /// The pieces of parameters in this rank's range: (parameter, start within it, length).
    pub fn segments(&self) -> Vec<(usize, usize, usize)> {
        let r = self.mine();
        self.spans
            .iter()
            .enumerate()
            .filter_map(|(i, &(off, n))| {
                let (a, b) = (off.max(r.start), (off + n).min(r.end));
                (a < b).then(|| (i, a - off, b - a))
            })
            .collect()
    }
}

/// The gradient seam's reduction: the loss and gradients of this rank's micro-batches become
/// the step's, averaged over the ranks.
pub fn reduce(comm: &dyn Comm, plan: Option<&ShardPlan>, loss: &mut Tensor, grads: Vec<Tensor>) -> Result<Gradients> {
    let w = comm.world();
    if w == 1 {
        return Ok(Gradients::Full(grads));
    }
    // MPI reduces host buffers: the loss makes one read here (with NCCL too, for now).
    let mut l = [taper_model::host::scalar(loss)?];
    comm.all_reduce_sum_f64(&mut l).map_err(dist)?;
    *loss = Tensor::new(l[0] / w as f64, loss.device())?;
    match plan {
        None => {
            let summed = comm.all_reduce_tensors(&grads, BUCKET_BYTES).map_err(dist)?;
            let mean = summed.iter().map(|g| g / w as f64).collect::<candle_core::Result<Vec<_>>>()?;
            Ok(Gradients::Full(mean))
        }
        Some(plan) => {
            let mut flat = taper_dist::flatten(&grads).map_err(dist)?;
            flat.resize(plan.padded(w), 0.0);
            let mut mine = vec![0f32; plan.per_rank];
            comm.reduce_scatter_sum(&flat, &mut mine).map_err(dist)?;
            mine.truncate(plan.mine().len());
            // The same f32 multiplication the replicated path's tensor division makes.
            let scale = (1.0 / w as f64) as f32;
            mine.iter_mut().for_each(|g| *g *= scale);
            Ok(Gradients::Shard(mine))
        }
    }
}

/// The optimizer of a run: replicated, or sharded across the ranks.
pub enum Updater {
    Plain(Optimizer),
    Sharded(Box<Sharded>),
}

impl Updater {
    /// The whole model's trainable parameters (every rank holds them all).
    pub fn params(&self) -> &[Param] {
        match self {
            Updater::Plain(o) => o.params(),
            Updater::Sharded(s) => &s.params,
        }
    }

    pub fn plan(&self) -> Option<&ShardPlan> {
        match self {
            Updater::Plain(_) => None,
            Updater::Sharded(s) => Some(&s.plan),
        }
    }

    /// Updates applied so far.
    pub fn step_count(&self) -> u64 {
        match self {
            Updater::Plain(o) => o.step_count(),
            Updater::Sharded(s) => s.inner.step_count(),
        }
    }

    /// The global L2 norm of the step's gradients, an f64 scalar tensor.
    pub fn norm(&self, g: &Gradients) -> Result<Tensor> {
        match (self, g) {
            (_, Gradients::Full(g)) => global_norm(g),
            (Updater::Sharded(s), Gradients::Shard(mine)) => {
                let mut sq = [mine.iter().map(|&x| (x as f64) * (x as f64)).sum::<f64>()];
                s.comm.all_reduce_sum_f64(&mut sq).map_err(dist)?;
                Ok(Tensor::new(sq[0].sqrt(), &s.device())?)
            }
            (Updater::Plain(_), Gradients::Shard(_)) => {
                Err(TrainError::Invalid("a gradient shard without a plan".into()))
            }
        }
    }

    /// Whether reading a value back costs nothing here: the CPU's own kernels (and a sharded
    /// optimizer, which goes through the host for MPI anyway).
    pub fn reads_freely(&self) -> bool {
        match self {
            Updater::Plain(o) => o.params().first().is_none_or(|p| taper_kernels::fused_on(p.var.device())),
            Updater::Sharded(_) => true,
        }
    }

    /// Applies the gradients, each first multiplied by `scale` (clipping) when given.
    pub fn apply(&mut self, g: Gradients, lr: f64, scale: Option<f64>) -> Result<()> {
        match (self, g) {
            (Updater::Plain(o), Gradients::Full(mut g)) => {
                if let Some(s) = scale {
                    g = g.iter().map(|g| g * s).collect::<candle_core::Result<_>>()?;
                }
                o.step(&g, lr)
            }
            (Updater::Sharded(s), Gradients::Shard(mine)) => s.step(&mine, lr, scale),
            _ => Err(TrainError::Invalid("gradients of another kind than the optimizer's".into())),
        }
    }

    /// [`Updater::apply`] with the clipping scale a device scalar, never read.
    pub fn apply_scaled(&mut self, g: Gradients, lr: f64, scale: Option<&Tensor>) -> Result<()> {
        match (self, g, scale) {
            (Updater::Plain(o), Gradients::Full(mut g), Some(s)) => {
                g = g.iter().map(|g| g.broadcast_mul(&s.to_dtype(g.dtype())?)).collect::<candle_core::Result<_>>()?;
                o.step(&g, lr)
            }
            (u, g, None) => u.apply(g, lr, None),
            (u, g, Some(s)) => u.apply(g, lr, Some(taper_model::host::scalar(s)?)),
        }
    }

    /// The whole optimizer state, as a checkpoint holds it. Sharded, every rank must call it
    /// (the moments are all-gathered).
    pub fn state_tensors(&self) -> Result<HashMap<String, Tensor>> {
        match self {
            Updater::Plain(o) => Ok(o.state_tensors()),
            Updater::Sharded(s) => s.state_tensors(),
        }
    }

    pub fn load_state(&mut self, map: HashMap<String, Tensor>, step: u64, origin: &str) -> Result<()> {
        match self {
            Updater::Plain(o) => o.load_state(map, step, origin),
            Updater::Sharded(s) => s.load_state(map, step, origin),
        }
    }

    /// Bytes of optimizer state this replica holds.
    pub fn state_bytes(&self) -> usize {
        match self {
            Updater::Plain(o) => {
                (0..o.params().len()).map(|i| o.slots(i).iter().map(|t| t.elem_count() * 4).sum::<usize>()).sum()
            }
            Updater::Sharded(s) => s.state_bytes(),
        }
    }

    /// Sets every replica's parameters to rank 0's (after the segments' values were loaded).
    pub fn broadcast_params(&mut self, comm: &dyn Comm) -> Result<()> {
        if comm.world() == 1 {
            return Ok(());
        }
        let ts: Vec<Tensor> = self.params().iter().map(|p| p.var.as_tensor().clone()).collect();
        let from_main = comm.broadcast_tensors(&ts, 0, BUCKET_BYTES).map_err(dist)?;
        for (p, t) in self.params().iter().zip(from_main) {
            p.var.set(&t)?;
        }
        if let Updater::Sharded(s) = self {
            s.pull_segments()?;
        }
        Ok(())
    }
}

/// ZeRO stage 1: the optimizer over this rank's segments of the flattened parameters.
pub struct Sharded {
    params: Vec<Param>,
    plan: ShardPlan,
    /// (parameter, start within it, length) of each of this rank's segments.
    segments: Vec<(usize, usize, usize)>,
    /// Over one 1-D variable per segment, with its parameter's weight decay.
    inner: Optimizer,
    comm: Rc<dyn Comm>,
}

impl Sharded {
    pub fn new(cfg: OptimConfig, vars: Vec<(String, Var)>, comm: Rc<dyn Comm>) -> Result<Self> {
        let params: Vec<Param> =
            vars.into_iter().map(|(name, var)| Param { decay: cfg.decays(&name), name, var }).collect();
        let sizes: Vec<usize> = params.iter().map(|p| p.var.elem_count()).collect();
        let plan = ShardPlan::new(&sizes, comm.rank(), comm.world());
        let segments = plan.segments();
        let seg_params = segments
            .iter()
            .map(|&(i, start, len)| {
                let p = &params[i];
                let values = p.var.as_tensor().flatten_all()?.narrow(0, start, len)?.copy()?;
                Ok(Param { name: segment_name(&p.name, start), var: Var::from_tensor(&values)?, decay: p.decay })
            })
            .collect::<Result<Vec<_>>>()?;
        let inner = Optimizer::with_params(cfg, seg_params)?;
        Ok(Self { params, plan, segments, inner, comm })
    }

    /// Copies the parameters' current values into the segments (after a broadcast).
    fn pull_segments(&mut self) -> Result<()> {
        for (k, &(i, start, len)) in self.segments.iter().enumerate() {
            let v = self.params[i].var.as_tensor().flatten_all()?.narrow(0, start, len)?;
            self.inner.params()[k].var.set(&v.copy()?)?;
        }
        Ok(())
    }

    fn device(&self) -> candle_core::Device {
        self.params.first().map(|p| p.var.device().clone()).unwrap_or(candle_core::Device::Cpu)
    }

    fn step(&mut self, mine: &[f32], lr: f64, scale: Option<f64>) -> Result<()> {
        let dev = self.device();
        let mut at = 0;
        let grads = self
            .segments
            .iter()
            .map(|&(_, _, len)| {
                let g = Tensor::from_slice(&mine[at..at + len], len, &dev)?;
                at += len;
                Ok(match scale {
                    Some(s) => (g * s)?,
                    None => g,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        self.inner.step(&grads, lr)?;
        // Every rank's updated slice, to every rank.
        let mut slice = Vec::with_capacity(self.plan.per_rank);
        for p in self.inner.params() {
            slice.extend(p.var.as_tensor().to_vec1::<f32>()?);
        }
        let full = self.gather(slice)?;
        for (p, &(off, n)) in self.params.iter().zip(&self.plan.spans) {
            p.var.set(&Tensor::from_slice(&full[off..off + n], p.var.shape(), &dev)?)?;
        }
        Ok(())
    }

    /// All ranks' slices of the flat vector, from this rank's.
    fn gather(&self, mut slice: Vec<f32>) -> Result<Vec<f32>> {
        slice.resize(self.plan.per_rank, 0.0);
        let mut full = vec![0f32; self.plan.padded(self.comm.world())];
        self.comm.all_gather(&slice, &mut full).map_err(dist)?;
        Ok(full)
    }

    fn state_tensors(&self) -> Result<HashMap<String, Tensor>> {
        let mut out = HashMap::new();
        for (k, slot) in self.inner.slot_names().iter().enumerate() {
            let mut slice = Vec::with_capacity(self.plan.per_rank);
            for i in 0..self.segments.len() {
                slice.extend(self.inner.slots(i)[k].to_vec1::<f32>()?);
            }
            let full = self.gather(slice)?;
            for (p, &(off, n)) in self.params.iter().zip(&self.plan.spans) {
                let t = Tensor::from_slice(&full[off..off + n], p.var.shape(), p.var.device())?;
                out.insert(format!("{}.{slot}", p.name), t);
            }
        }
        let dev = self.device();
        out.insert("updates".into(), Tensor::new(&[self.inner.step_count() as i64], &dev)?);
        Ok(out)
    }

    fn load_state(&mut self, mut map: HashMap<String, Tensor>, step: u64, origin: &str) -> Result<()> {
        let mut segs = HashMap::new();
        if let Some(u) = map.remove("updates") {
            segs.insert("updates".to_string(), u);
        }
        for &(i, start, len) in &self.segments {
            let p = &self.params[i];
            for slot in self.inner.slot_names() {
                let key = format!("{}.{slot}", p.name);
                let t = map.get(&key).ok_or_else(|| TrainError::Checkpoint {
                    path: origin.to_string(),
                    reason: format!("optimizer state `{key}` is missing (was it saved by another optimizer?)"),
                })?;
                if t.elem_count() != p.var.elem_count() {
                    return Err(TrainError::Checkpoint {
                        path: origin.to_string(),
                        reason: format!(
                            "optimizer state `{key}`: expected shape {:?}, found {:?}",
                            p.var.dims(),
                            t.dims()
                        ),
                    });
                }
                segs.insert(
                    format!("{}.{slot}", segment_name(&p.name, start)),
                    t.flatten_all()?.narrow(0, start, len)?,
                );
            }
        }
        self.inner.load_state(segs, step, origin)
    }

    /// Bytes of optimizer state this rank holds.
    pub fn state_bytes(&self) -> usize {
        (0..self.segments.len()).map(|i| self.inner.slots(i).iter().map(|t| t.elem_count() * 4).sum::<usize>()).sum()
    }
}

fn segment_name(param: &str, start: usize) -> String {
    format!("{param}@{start}")
}

/// Fails on every rank when a replica's parameters differ from rank 0's: the replicas must
/// agree after the first update, or the ranks are not training one model.
pub fn check_replicas(comm: &dyn Comm, params: &[Param], step: u64) -> Result<()> {
    if comm.world() == 1 {
        return Ok(());
    }
    let tensors: HashMap<String, Tensor> = params.iter().map(|p| (p.name.clone(), p.var.as_tensor().clone())).collect();
    let mine = Fingerprint::new().tensors("params", &tensors)?.hex();
    let mut main = mine.clone().into_bytes();
    comm.broadcast_bytes(&mut main, 0).map_err(dist)?;
    let mut differ = [f64::from(u8::from(main != mine.as_bytes()))];
    comm.all_reduce_sum_f64(&mut differ).map_err(dist)?;
    if differ[0] > 0.0 {
        return Err(TrainError::Invalid(format!(
            "after step {step} the parameters of {} of {} replicas differ from rank 0's: the ranks did not take the \
             same update (are they running the same taper on the same config?)",
            differ[0],
            comm.world()
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shards_cover_the_parameters_once() {
        let sizes = [5, 3, 9];
        let (mut seen, world) = (vec![0; 17], 3);
        for rank in 0..world {
            let plan = ShardPlan::new(&sizes, rank, world);
            assert_eq!(plan.mine().len(), if rank < 2 { 6 } else { 5 });
            for (i, start, len) in plan.segments() {
                let off: usize = sizes[..i].iter().sum();
                (off + start..off + start + len).for_each(|k| seen[k] += 1);
            }
        }
        assert!(seen.iter().all(|&c| c == 1), "{seen:?}");
        // More ranks than elements: the last ranks hold nothing.
        assert!(ShardPlan::new(&[2], 3, 4).segments().is_empty());
    }
}
