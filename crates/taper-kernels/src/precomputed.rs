//! Graph nodes for values computed outside the graph: the forward runs as plain tensor ops on
//! detached inputs (in chunks, or without forming what the backward does not need), and one
//! custom op then stands for the whole computation, handing over its output and owning its
//! backward. This is how the device-generic paths recompute instead of keeping intermediates,
//! on any device, without kernels of their own.

use candle_core::{
    backend::BackendStorage, CpuStorage, CudaStorage, CustomOp1, CustomOp2, CustomOp3, Layout, MetalStorage, Result,
    Shape, Storage, Tensor,
};
use std::sync::{Arc, Mutex};

type Bwd1 = dyn Fn(&Tensor, &Tensor) -> Result<Option<Tensor>> + Send + Sync;
type Bwd2 = dyn Fn(&Tensor, &Tensor, &Tensor) -> Result<(Option<Tensor>, Option<Tensor>)> + Send + Sync;
type Bwd3 = dyn Fn(&Tensor, &Tensor, &Tensor, &Tensor) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)>
    + Send
    + Sync;

/// `out` as a node of the graph over `x`; `bwd(x, grad)` gives x's gradient.
pub fn attach1(
    x: &Tensor,
    name: &'static str,
    out: Tensor,
    bwd: impl Fn(&Tensor, &Tensor) -> Result<Option<Tensor>> + Send + Sync + 'static,
) -> Result<Tensor> {
    if !x.track_op() {
        return Ok(out);
    }
    x.apply_op1_arc(Arc::new(Box::new(Node { name, out: Mutex::new(Some(out)), bwd: Box::new(bwd) as Box<Bwd1> })))
}

/// `out` as a node over `a` and `b`; `bwd(a, b, grad)` gives their gradients.
pub fn attach2(
    a: &Tensor,
    b: &Tensor,
    name: &'static str,
    out: Tensor,
    bwd: impl Fn(&Tensor, &Tensor, &Tensor) -> Result<(Option<Tensor>, Option<Tensor>)> + Send + Sync + 'static,
) -> Result<Tensor> {
    if !(a.track_op() || b.track_op()) {
        return Ok(out);
    }
    a.apply_op2_arc(b, Arc::new(Box::new(Node { name, out: Mutex::new(Some(out)), bwd: Box::new(bwd) as Box<Bwd2> })))
}

/// `out` as a node over `a`, `b` and `c`; `bwd(a, b, c, grad)` gives their gradients.
pub fn attach3(
    a: &Tensor,
    b: &Tensor,
    c: &Tensor,
    name: &'static str,
    out: Tensor,
    bwd: impl Fn(&Tensor, &Tensor, &Tensor, &Tensor) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)>
        + Send
        + Sync
        + 'static,
) -> Result<Tensor> {
    if !(a.track_op() || b.track_op() || c.track_op()) {
        return Ok(out);
    }
    a.apply_op3_arc(
        b,
        c,
        Arc::new(Box::new(Node { name, out: Mutex::new(Some(out)), bwd: Box::new(bwd) as Box<Bwd3> })),
    )
}

struct Node<B: ?Sized> {
    name: &'static str,
    /// Until the forward hands it over: the node keeps no second copy of its output.
    out: Mutex<Option<Tensor>>,
    bwd: Box<B>,
}

impl<B: ?Sized> Node<B> {
    /// A copy of the output's storage: a custom op returns storage of its own.
    fn output(&self) -> Result<(Storage, Shape)> {
        let out = self.out.lock().map_err(|_| crate::bad(self.name, "a forward panicked"))?.take();
        let out = out.ok_or_else(|| crate::bad(self.name, "the forward ran twice"))?;
        let (storage, layout) = out.storage_and_layout();
        if !layout.is_contiguous() || layout.start_offset() != 0 {
            drop(storage);
            let c = out.copy()?;
            let (storage, layout) = c.storage_and_layout();
            return Ok((copy(&storage, layout)?, c.shape().clone()));
        }
        Ok((copy(&storage, layout)?, out.shape().clone()))
    }

    fn cpu(&self) -> Result<(CpuStorage, Shape)> {
        match self.output()? {
            (Storage::Cpu(s), shape) => Ok((s, shape)),
            _ => Err(crate::bad(self.name, "output on another device than the inputs")),
        }
    }

    fn cuda(&self) -> Result<(CudaStorage, Shape)> {
        match self.output()? {
            (Storage::Cuda(s), shape) => Ok((s, shape)),
            _ => Err(crate::bad(self.name, "output on another device than the inputs")),
        }
    }

    fn metal(&self) -> Result<(MetalStorage, Shape)> {
        match self.output()? {
            (Storage::Metal(s), shape) => Ok((s, shape)),
            _ => Err(crate::bad(self.name, "output on another device than the inputs")),
        }
    }
}

fn copy(s: &Storage, layout: &Layout) -> Result<Storage> {
    Ok(match s {
        Storage::Cpu(s) => Storage::Cpu(s.try_clone(layout)?),
        Storage::Cuda(s) => Storage::Cuda(s.try_clone(layout)?),
        Storage::Metal(s) => Storage::Metal(s.try_clone(layout)?),
    })
}

impl CustomOp1 for Node<Bwd1> {
    fn name(&self) -> &'static str {
        self.name
    }
    fn cpu_fwd(&self, _: &CpuStorage, _: &Layout) -> Result<(CpuStorage, Shape)> {
        self.cpu()
    }
    fn cuda_fwd(&self, _: &CudaStorage, _: &Layout) -> Result<(CudaStorage, Shape)> {
        self.cuda()
    }
    fn metal_fwd(&self, _: &MetalStorage, _: &Layout) -> Result<(MetalStorage, Shape)> {
        self.metal()
    }
    fn bwd(&self, x: &Tensor, _: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        (self.bwd)(&x.detach(), &grad.detach())
    }
}

impl CustomOp2 for Node<Bwd2> {
    fn name(&self) -> &'static str {
        self.name
    }
    fn cpu_fwd(&self, _: &CpuStorage, _: &Layout, _: &CpuStorage, _: &Layout) -> Result<(CpuStorage, Shape)> {
        self.cpu()
    }
    fn cuda_fwd(&self, _: &CudaStorage, _: &Layout, _: &CudaStorage, _: &Layout) -> Result<(CudaStorage, Shape)> {
        self.cuda()
    }
    fn metal_fwd(&self, _: &MetalStorage, _: &Layout, _: &MetalStorage, _: &Layout) -> Result<(MetalStorage, Shape)> {
        self.metal()
    }
    fn bwd(&self, a: &Tensor, b: &Tensor, _: &Tensor, grad: &Tensor) -> Result<(Option<Tensor>, Option<Tensor>)> {
        (self.bwd)(&a.detach(), &b.detach(), &grad.detach())
    }
}

impl CustomOp3 for Node<Bwd3> {
    fn name(&self) -> &'static str {
        self.name
    }
    fn cpu_fwd(
        &self,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        self.cpu()
    }
    fn cuda_fwd(
        &self,
        _: &CudaStorage,
        _: &Layout,
        _: &CudaStorage,
        _: &Layout,
        _: &CudaStorage,
        _: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        self.cuda()
    }
    fn metal_fwd(
        &self,
        _: &MetalStorage,
        _: &Layout,
        _: &MetalStorage,
        _: &Layout,
        _: &MetalStorage,
        _: &Layout,
    ) -> Result<(MetalStorage, Shape)> {
        self.metal()
    }
    fn bwd(
        &self,
        a: &Tensor,
        b: &Tensor,
        c: &Tensor,
        _: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        (self.bwd)(&a.detach(), &b.detach(), &c.detach(), &grad.detach())
    }
}
