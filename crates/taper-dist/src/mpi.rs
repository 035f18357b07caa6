//! MPI through rsmpi: the ranks the launcher started, and its collectives on host buffers.

use crate::{Comm, DistError, Result, Watchdog};
use ::mpi::collective::SystemOperation;
use ::mpi::environment::Universe;
use ::mpi::topology::SimpleCommunicator;
use ::mpi::traits::*;

pub struct Mpi {
    world: SimpleCommunicator,
    rank: usize,
    size: usize,
    local_rank: usize,
    watch: Watchdog,
    // Finalizes MPI when dropped: declared last, so it goes after the communicator.
    _universe: Universe,
}

impl Mpi {
    /// Initialises MPI; the local rank is the rank within this machine's shared-memory group.
    pub fn init() -> Result<Self> {
        let universe = ::mpi::initialize()
            .ok_or_else(|| DistError::Launch("MPI was already initialised in this process".into()))?;
        let world = universe.world();
        let (rank, size) = (world.rank() as usize, world.size() as usize);
        let local_rank = world.split_shared(world.rank()).rank() as usize;
        Ok(Self { world, rank, size, local_rank, watch: Watchdog::start(rank), _universe: universe })
    }

    fn check(&self, ok: bool, what: impl FnOnce() -> String) -> Result<()> {
        if ok {
            Ok(())
        } else {
            Err(DistError::Collective { rank: self.rank, what: what() })
        }
    }
}

impl Comm for Mpi {
    fn rank(&self) -> usize {
        self.rank
    }
    fn world(&self) -> usize {
        self.size
    }
    fn local_rank(&self) -> usize {
        self.local_rank
    }
    fn backend(&self) -> &'static str {
        "mpi"
    }

    fn all_reduce_sum(&self, buf: &mut [f32]) -> Result<()> {
        let _w = self.watch.enter("an all-reduce");
        let send = buf.to_vec();
        self.world.all_reduce_into(&send[..], buf, SystemOperation::sum());
        Ok(())
    }

    fn all_reduce_sum_f64(&self, buf: &mut [f64]) -> Result<()> {
        let _w = self.watch.enter("an all-reduce");
        let send = buf.to_vec();
        self.world.all_reduce_into(&send[..], buf, SystemOperation::sum());
        Ok(())
    }

    fn broadcast(&self, buf: &mut [f32], root: usize) -> Result<()> {
        let _w = self.watch.enter("a broadcast");
        self.world.process_at_rank(root as i32).broadcast_into(buf);
        Ok(())
    }

    fn broadcast_bytes(&self, buf: &mut Vec<u8>, root: usize) -> Result<()> {
        let _w = self.watch.enter("a broadcast");
        let root_proc = self.world.process_at_rank(root as i32);
        let mut len = buf.len() as u64;
        root_proc.broadcast_into(&mut len);
        buf.resize(len as usize, 0);
        root_proc.broadcast_into(&mut buf[..]);
        Ok(())
    }

    fn barrier(&self) -> Result<()> {
        let _w = self.watch.enter("a barrier");
        self.world.barrier();
        Ok(())
    }

    fn rendezvous(&self) -> Result<()> {
        self.world.barrier();
        Ok(())
    }

    fn reduce_scatter_sum(&self, send: &[f32], recv: &mut [f32]) -> Result<()> {
        self.check(send.len() == recv.len() * self.size, || {
            format!("reduce-scatter of {} values into blocks of {}", send.len(), recv.len())
        })?;
        let _w = self.watch.enter("a reduce-scatter");
        self.world.reduce_scatter_block_into(send, recv, SystemOperation::sum());
        Ok(())
    }

    fn all_gather(&self, send: &[f32], recv: &mut [f32]) -> Result<()> {
        self.check(recv.len() == send.len() * self.size, || {
            format!("all-gather of {} values into {}", send.len(), recv.len())
        })?;
        let _w = self.watch.enter("an all-gather");
        self.world.all_gather_into(send, recv);
        Ok(())
    }

    fn abort(&self, code: i32) -> ! {
        self.world.abort(code)
    }
}
