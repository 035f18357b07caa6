//! The CUDA kernels against the composed ops on the same GPU: each op's forward and the
//! gradients of every input, in f32 (within 1e-5 relative to the largest value) and in bf16
//! and f16 (within a few rounding steps of the type: both paths round their results to it,
//! and the kernels compute in f32 where the composed ops may round intermediates too).
//! `scripts/gpu-check.sh` runs these with `TAPER_REQUIRE_CUDA=1`, so a missing device fails
//! them there; elsewhere, without a device, each says so and passes.
#![cfg(feature = "cuda")]

mod cuda_common;

use cuda_common::*;

#[test]
fn activations_match_the_composed_ops() {
    let Some(dev) = gpu() else { return };
    for dt in DTYPES {
        let xs = inputs(&dev, dt, &[&[3, 37, 64], &[3, 37, 64]], 2.0);
        check("gelu_erf", dt, &xs[..1], |t| taper_kernels::gelu_erf(&t[0]));
        check("gelu_tanh", dt, &xs[..1], |t| taper_kernels::gelu_tanh(&t[0]));
        check("swiglu", dt, &xs, |t| taper_kernels::swiglu(&t[0], &t[1]));
    }
}
