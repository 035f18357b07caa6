//! NCCL on CUDA tensors: the replicas' gradients are reduced on the GPUs, with no copy through
//! the host. MPI starts the ranks and carries the NCCL communicator's unique id from rank 0 to
//! the others; the host collectives (metrics, barriers) stay on MPI.

use crate::mpi::Mpi;
use crate::{buckets, Comm, DistError, Result};
use candle_core::op::BackpropOp;
use candle_core::{CudaStorage, DType, Device, Storage, Tensor};
use cudarc::nccl::safe::{Comm as NcclComm, Id, ReduceOp};

pub struct Nccl {
    mpi: Mpi,
    comm: NcclComm,
    device: candle_core::CudaDevice,
}

fn nccl_err(rank: usize, what: &str, e: impl std::fmt::Debug) -> DistError {
    DistError::Collective { rank, what: format!("NCCL {what}: {e:?}") }
}

impl Nccl {
    /// MPI first (ranks, local rank), then one NCCL communicator over the ranks' GPUs, each
    /// rank on `cuda:LOCAL_RANK`.
    pub fn init() -> Result<Self> {
        let mpi = Mpi::init()?;
        let (rank, world) = (mpi.rank(), mpi.world());
        let Device::Cuda(device) = Device::new_cuda(mpi.local_rank())? else {
            return Err(DistError::Launch("NCCL needs a CUDA device".into()));
        };
        let mut id_bytes = match rank {
            0 => Id::new().map_err(|e| nccl_err(rank, "unique id", e))?.internal().iter().map(|&c| c as u8).collect(),
            _ => vec![0u8; 128],
        };
        mpi.broadcast_bytes(&mut id_bytes, 0)?;
        let mut internal = [0 as std::ffi::c_char; 128];
        for (d, s) in internal.iter_mut().zip(&id_bytes) {
            *d = *s as std::ffi::c_char;
        }
        let comm = NcclComm::from_rank(device.cuda_stream(), rank, world, Id::uninit(internal))
            .map_err(|e| nccl_err(rank, "communicator", e))?;
        Ok(Self { mpi, comm, device })
    }

    /// A fresh CUDA tensor of `shape` over `slice`.
    fn wrap(&self, slice: cudarc::driver::CudaSlice<f32>, n: usize) -> Tensor {
        let storage = Storage::Cuda(CudaStorage::wrap_cuda_slice(slice, self.device.clone()));
        Tensor::from_storage(storage, n, BackpropOp::none(), false)
    }

    /// `op` over one flat f32 CUDA tensor: the result in a new tensor.
    fn on_device(
        &self,
        flat: &Tensor,
        op: impl FnOnce(
            &NcclComm,
            &cudarc::driver::CudaSlice<f32>,
            &mut cudarc::driver::CudaSlice<f32>,
        ) -> std::result::Result<(), String>,
    ) -> Result<Tensor> {
        let n = flat.elem_count();
        let (storage, layout) = flat.storage_and_layout();
        let bad = |what: &str| DistError::Collective { rank: self.mpi.rank(), what: what.into() };
        let Storage::Cuda(s) = &*storage else { return Err(bad("NCCL needs CUDA tensors")) };
        let src = s.as_cuda_slice::<f32>()?;
        // A fresh concatenation: it starts at the slice's start and fills it.
        if layout.start_offset() != 0 || src.len() != n {
            return Err(bad("NCCL reduces whole contiguous buffers"));
        }
        let mut dst = self.device.alloc_zeros::<f32>(n)?;
        op(&self.comm, src, &mut dst).map_err(|e| DistError::Collective { rank: self.mpi.rank(), what: e })?;
        Ok(self.wrap(dst, n))
    }
}

impl Comm for Nccl {
    fn rank(&self) -> usize {
        self.mpi.rank()
    }
    fn world(&self) -> usize {
        self.mpi.world()
    }
    fn local_rank(&self) -> usize {
        self.mpi.local_rank()
    }
    fn backend(&self) -> &'static str {
        "nccl"
    }
    fn all_reduce_sum(&self, buf: &mut [f32]) -> Result<()> {
        self.mpi.all_reduce_sum(buf)
    }
    fn all_reduce_sum_f64(&self, buf: &mut [f64]) -> Result<()> {
        self.mpi.all_reduce_sum_f64(buf)
    }
    fn broadcast(&self, buf: &mut [f32], root: usize) -> Result<()> {
        self.mpi.broadcast(buf, root)
    }
    fn broadcast_bytes(&self, buf: &mut Vec<u8>, root: usize) -> Result<()> {
        self.mpi.broadcast_bytes(buf, root)
    }
    fn barrier(&self) -> Result<()> {
        self.mpi.barrier()
    }
    fn rendezvous(&self) -> Result<()> {
        self.mpi.rendezvous()
    }
    fn reduce_scatter_sum(&self, send: &[f32], recv: &mut [f32]) -> Result<()> {
        self.mpi.reduce_scatter_sum(send, recv)
    }
    fn all_gather(&self, send: &[f32], recv: &mut [f32]) -> Result<()> {
        self.mpi.all_gather(send, recv)
    }
    fn abort(&self, code: i32) -> ! {
        self.mpi.abort(code)
    }

    /// On the GPUs: each bucket concatenated into one flat device tensor and all-reduced by
    /// NCCL; tensors elsewhere go through the host over MPI.
    fn all_reduce_tensors(&self, ts: &[Tensor], bucket_bytes: usize) -> Result<Vec<Tensor>> {
        if ts.iter().any(|t| !t.device().is_cuda()) {
            return crate::host_all_reduce_tensors(self, ts, bucket_bytes);
        }
        let mut out = Vec::with_capacity(ts.len());
        for group in buckets(ts, bucket_bytes) {
            let parts = ts[group.clone()]
                .iter()
                .map(|t| t.flatten_all()?.to_dtype(DType::F32))
                .collect::<candle_core::Result<Vec<_>>>()?;
            let flat = Tensor::cat(&parts, 0)?.contiguous()?;
            let summed = self.on_device(&flat, |c, src, dst| {
                c.all_reduce(src, dst, &ReduceOp::Sum).map(|_| ()).map_err(|e| format!("NCCL all-reduce: {e:?}"))
            })?;
            let mut at = 0;
            for t in &ts[group] {
                let n = t.elem_count();
                out.push(summed.narrow(0, at, n)?.reshape(t.shape())?.to_dtype(t.dtype())?);
                at += n;
            }
        }
        Ok(out)
    }

    fn broadcast_tensors(&self, ts: &[Tensor], root: usize, bucket_bytes: usize) -> Result<Vec<Tensor>> {
        if ts.iter().any(|t| !t.device().is_cuda()) {
            return crate::host_broadcast_tensors(self, ts, root, bucket_bytes);
        }
        let mut out = Vec::with_capacity(ts.len());
        for group in buckets(ts, bucket_bytes) {
            let parts = ts[group.clone()]
                .iter()
                .map(|t| t.flatten_all()?.to_dtype(DType::F32))
                .collect::<candle_core::Result<Vec<_>>>()?;
            let flat = Tensor::cat(&parts, 0)?.contiguous()?;
            let got = self.on_device(&flat, |c, src, dst| {
                c.broadcast(Some(src), dst, root as i32).map(|_| ()).map_err(|e| format!("NCCL broadcast: {e:?}"))
            })?;
            let mut at = 0;
            for t in &ts[group] {
                let n = t.elem_count();
                out.push(got.narrow(0, at, n)?.reshape(t.shape())?.to_dtype(t.dtype())?);
                at += n;
            }
        }
        Ok(out)
    }
}
