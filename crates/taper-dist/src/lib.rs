//! Data-parallel communication for taper: which replica this process is, and the collectives
//! training needs (all-reduce, broadcast, barrier, reduce-scatter and all-gather), behind one
//! small interface with three engines:
//!
//! - one process ([`Single`]), the default, at no cost;
//! - MPI ([`mpi::Mpi`], feature `mpi`), through rsmpi over the system's Open MPI or MPICH: ranks
//!   come from the launcher (`mpirun -np N taper ...`, `srun taper ...`);
//! - NCCL ([`nccl`], feature `nccl`) on CUDA tensors, its communicator's id sent over MPI.
//!
//! Tensors are reduced in a few large flat buckets rather than one call per tensor: per-call
//! latency, not bandwidth, dominates small messages.

use candle_core::{DType, Device, Tensor};
use std::rc::Rc;

#[cfg(feature = "mpi")]
pub mod mpi;
#[cfg(feature = "nccl")]
pub mod nccl;
mod watchdog;

pub use watchdog::Watchdog;

#[derive(Debug, thiserror::Error)]
pub enum DistError {
    /// The launcher and the build disagree, or MPI could not start.
    #[error("{0}")]
    Launch(String),
    /// A collective failed or its inputs do not fit it.
    #[error("rank {rank}: {what}")]
    Collective { rank: usize, what: String },
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

pub type Result<T> = std::result::Result<T, DistError>;

/// Gradients are reduced in buckets of this many bytes: large enough that the per-call cost is
/// small beside the transfer, small enough not to double the gradients' memory.
pub const BUCKET_BYTES: usize = 32 << 20;

/// A group of replicas and the collectives between them. Every rank must call the same
/// collectives in the same order with buffers of the same length.
pub trait Comm {
    fn rank(&self) -> usize;
    fn world(&self) -> usize;
    /// The rank among the processes on this machine: which GPU this rank takes.
    fn local_rank(&self) -> usize;
    /// "single", "mpi" or "nccl".
    fn backend(&self) -> &'static str;

    /// The rank that owns the run dir, the logs and the checkpoints.
    fn is_main(&self) -> bool {
        self.rank() == 0
    }

    /// Sums `buf` over the ranks, in place.
    fn all_reduce_sum(&self, buf: &mut [f32]) -> Result<()>;
    fn all_reduce_sum_f64(&self, buf: &mut [f64]) -> Result<()>;
    /// Copies `root`'s `buf` to every rank.
    fn broadcast(&self, buf: &mut [f32], root: usize) -> Result<()>;
    /// Copies `root`'s bytes (of any length) to every rank.
    fn broadcast_bytes(&self, buf: &mut Vec<u8>, root: usize) -> Result<()>;
    fn barrier(&self) -> Result<()>;
    /// A barrier where ranks may wait long for one of them (the main rank preparing data,
    /// evaluating or saving): not bounded by the watchdog.
    fn rendezvous(&self) -> Result<()> {
        self.barrier()
    }
    /// Sums `send` (world x recv.len() values) over the ranks; rank r keeps block r in `recv`.
    fn reduce_scatter_sum(&self, send: &[f32], recv: &mut [f32]) -> Result<()>;
    /// Every rank's `send` in rank order, into `recv` (world x send.len() values).
    fn all_gather(&self, send: &[f32], recv: &mut [f32]) -> Result<()>;
    /// Ends every rank's process, so that after one rank fails none waits for it forever.
    fn abort(&self, code: i32) -> !;

    /// The sum over the ranks of each tensor of `ts`, which live on one device: flattened into
    /// buckets of at most `bucket_bytes`, one all-reduce per bucket.
    fn all_reduce_tensors(&self, ts: &[Tensor], bucket_bytes: usize) -> Result<Vec<Tensor>> {
        host_all_reduce_tensors(self, ts, bucket_bytes)
    }

    /// Rank `root`'s values of `ts`, on every rank.
    fn broadcast_tensors(&self, ts: &[Tensor], root: usize, bucket_bytes: usize) -> Result<Vec<Tensor>> {
        host_broadcast_tensors(self, ts, root, bucket_bytes)
    }
}

/// [`Comm::all_reduce_tensors`] through host buffers.
pub fn host_all_reduce_tensors<C: Comm + ?Sized>(c: &C, ts: &[Tensor], bucket_bytes: usize) -> Result<Vec<Tensor>> {
    if c.world() == 1 {
        return Ok(ts.to_vec());
    }
    let mut out = Vec::with_capacity(ts.len());
    for group in buckets(ts, bucket_bytes) {
        let mut flat = flatten(&ts[group.clone()])?;
        c.all_reduce_sum(&mut flat)?;
        out.extend(unflatten(&flat, &ts[group])?);
    }
    Ok(out)
}

/// [`Comm::broadcast_tensors`] through host buffers.
pub fn host_broadcast_tensors<C: Comm + ?Sized>(
    c: &C,
    ts: &[Tensor],
    root: usize,
    bucket_bytes: usize,
) -> Result<Vec<Tensor>> {
    if c.world() == 1 {
        return Ok(ts.to_vec());
    }
    let mut out = Vec::with_capacity(ts.len());
    for group in buckets(ts, bucket_bytes) {
        let mut flat = flatten(&ts[group.clone()])?;
        c.broadcast(&mut flat, root)?;
        out.extend(unflatten(&flat, &ts[group])?);
    }
    Ok(out)
}

/// Consecutive runs of tensors of at most `bytes` f32 bytes each (a larger tensor alone).
pub fn buckets(ts: &[Tensor], bytes: usize) -> Vec<std::ops::Range<usize>> {
    let mut out = Vec::new();
    let (mut start, mut size) = (0, 0);
    for (i, t) in ts.iter().enumerate() {
        let n = t.elem_count() * 4;
        if i > start && size + n > bytes {
            out.push(start..i);
            (start, size) = (i, 0);
        }
        size += n;
    }
    if start < ts.len() {
        out.push(start..ts.len());
    }
    out
}

/// The tensors' values, f32, one after another.
pub fn flatten(ts: &[Tensor]) -> Result<Vec<f32>> {
    let mut flat = Vec::with_capacity(ts.iter().map(Tensor::elem_count).sum());
    for t in ts {
        flat.extend(t.flatten_all()?.to_dtype(DType::F32)?.to_vec1::<f32>()?);
    }
    Ok(flat)
}

/// [`flatten`] undone: tensors shaped, typed and placed as `like`.
pub fn unflatten(flat: &[f32], like: &[Tensor]) -> Result<Vec<Tensor>> {
    let mut at = 0;
    like.iter()
        .map(|t| {
            let n = t.elem_count();
            let v = Tensor::from_slice(&flat[at..at + n], t.shape(), &Device::Cpu)?;
            at += n;
            Ok(v.to_dtype(t.dtype())?.to_device(t.device())?)
        })
        .collect()
}

/// One process: every collective is the identity.
pub struct Single;

impl Comm for Single {
    fn rank(&self) -> usize {
        0
    }
    fn world(&self) -> usize {
        1
    }
    fn local_rank(&self) -> usize {
        0
    }
    fn backend(&self) -> &'static str {
        "single"
    }
    fn all_reduce_sum(&self, _buf: &mut [f32]) -> Result<()> {
        Ok(())
    }
    fn all_reduce_sum_f64(&self, _buf: &mut [f64]) -> Result<()> {
        Ok(())
    }
    fn broadcast(&self, _buf: &mut [f32], _root: usize) -> Result<()> {
        Ok(())
    }
    fn broadcast_bytes(&self, _buf: &mut Vec<u8>, _root: usize) -> Result<()> {
        Ok(())
    }
    fn barrier(&self) -> Result<()> {
        Ok(())
    }
    fn reduce_scatter_sum(&self, send: &[f32], recv: &mut [f32]) -> Result<()> {
        recv.copy_from_slice(&send[..recv.len()]);
        Ok(())
    }
    fn all_gather(&self, send: &[f32], recv: &mut [f32]) -> Result<()> {
        recv.copy_from_slice(send);
        Ok(())
    }
    fn abort(&self, code: i32) -> ! {
        std::process::exit(code)
    }
}

/// The number of processes a launcher started, from the variables mpirun (Open MPI, MPICH,
/// Intel MPI) and srun set; None outside a launcher.
pub fn launched_world() -> Option<usize> {
    ["OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_SIZE", "MPI_LOCALNRANKS", "SLURM_NTASKS"]
        .iter()
        .find_map(|k| std::env::var(k).ok()?.parse::<usize>().ok())
}

/// The communicator this process was launched with: MPI under mpirun or srun (feature `mpi`),
/// else one process. A multi-process launch of a build without MPI is an error, not N
/// independent runs writing over each other.
pub fn from_env() -> Result<Rc<dyn Comm>> {
    let n = launched_world().unwrap_or(1);
    #[cfg(feature = "nccl")]
    if n > 1 && candle_core::utils::cuda_is_available() {
        return Ok(Rc::new(nccl::Nccl::init()?));
    }
    #[cfg(feature = "mpi")]
    if n > 1 {
        return Ok(Rc::new(mpi::Mpi::init()?));
    }
    if n > 1 {
        return Err(DistError::Launch(format!(
            "launched as {n} processes (by mpirun or srun), but this taper was built without MPI: build it with \
             `--features mpi` (data parallelism), or launch one process"
        )));
    }
    Ok(Rc::new(Single))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tensors_round_trip_through_buckets() -> Result<()> {
        let dev = Device::Cpu;
        let ts = vec![
            Tensor::arange(0f32, 6., &dev)?.reshape((2, 3))?,
            Tensor::new(&[7f32], &dev)?,
            Tensor::arange(10f32, 14., &dev)?,
        ];
        // 6 + 1 values fit 28 bytes; the last one goes alone.
        assert_eq!(buckets(&ts, 28), vec![0..2, 2..3]);
        assert_eq!(buckets(&ts, 4), vec![0..1, 1..2, 2..3]);
        let back = unflatten(&flatten(&ts)?, &ts)?;
        for (a, b) in ts.iter().zip(&back) {
            assert_eq!(a.dims(), b.dims());
            assert_eq!(a.flatten_all()?.to_vec1::<f32>()?, b.flatten_all()?.to_vec1::<f32>()?);
        }
        let one = Single;
        assert_eq!(one.all_reduce_tensors(&ts, 28)?.len(), 3);
        Ok(())
    }
}
