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

#[test]
fn norms_match_the_composed_ops() {
    let Some(dev) = gpu() else { return };
    for dt in DTYPES {
        for c in [37, 64, 1000] {
            // 2 x 129 rows: past two of the backward's 64-row chunks for dw and db, and not a
            // multiple of them; widths under, at and past a block of threads.
            let xs = inputs(&dev, dt, &[&[2, 129, c], &[c], &[c]], 1.0);
            check(&format!("layer_norm ({c})"), dt, &xs, |t| {
                taper_kernels::layer_norm(&t[0], &t[1], Some(&t[2]), 1e-5)
            });
            check(&format!("layer_norm without bias ({c})"), dt, &xs[..2], |t| {
                taper_kernels::layer_norm(&t[0], &t[1], None, 1e-5)
            });
            check(&format!("rms_norm ({c})"), dt, &xs[..2], |t| taper_kernels::rms_norm(&t[0], &t[1], 1e-6));
        }
    }
}

#[test]
fn softmaxes_match_the_composed_ops() {
    let Some(dev) = gpu() else { return };
    for dt in DTYPES {
        for c in [37, 64, 1000] {
            let xs = inputs(&dev, dt, &[&[3, 67, c]], 3.0);
            check(&format!("softmax_last_dim ({c})"), dt, &xs, |t| taper_kernels::softmax_last_dim(&t[0]));
            check(&format!("log_softmax ({c})"), dt, &xs, |t| taper_kernels::log_softmax(&t[0]));
        }
    }
}

#[test]
fn rope_matches_the_composed_ops() {
    let Some(dev) = gpu() else { return };
    for dt in DTYPES {
        for (b, h, t, d) in [(2, 3, 37, 64), (3, 2, 5, 38)] {
            let xs = inputs(&dev, dt, &[&[b, h, t, d]], 1.0);
            // The tables are plain tensors, not Vars: the kernel takes only tables that track no op.
            for tables in [&[t, d][..], &[b, 1, t, d][..], &[1, 1, t, d][..]] {
                let angles = || candle_core::Tensor::randn(0f32, 1f32, tables, &dev).unwrap().to_dtype(dt).unwrap();
                let (cos, sin) = (angles().cos().unwrap(), angles().sin().unwrap());
                check(&format!("rope {:?} with tables {tables:?}", (b, h, t, d)), dt, &xs, |x| {
                    taper_kernels::rope(&x[0], &cos, &sin)
                });
            }
        }
    }
}

#[test]
fn cross_entropy_matches_the_composed_ops() {
    let Some(dev) = gpu() else { return };
    let ignore = -100i64;
    for dt in DTYPES {
        for (n, v, every) in [(261, 37, 5), (261, 64, 3), (130, 1000, 7), (4, 64, 1)] {
            let logits = inputs(&dev, dt, &[&[n, v]], 3.0).remove(0);
            // Every `every`-th target ignored (all of them when it is 1: a count of 0).
            let ts: Vec<i64> = (0..n).map(|i| if i % every == 0 { ignore } else { ((i * 7919) % v) as i64 }).collect();
            let targets = candle_core::Tensor::new(ts.as_slice(), &dev).unwrap();
            let run = |on: bool| {
                taper_kernels::with_cuda_kernels(on, || {
                    let (loss, count) = taper_kernels::cross_entropy(logits.as_tensor(), &targets, ignore).unwrap();
                    let grads = (loss.to_dtype(candle_core::DType::F32).unwrap() * 1.7).unwrap().backward().unwrap();
                    (loss, count, grads.get(logits.as_tensor()).cloned().expect("a gradient of the logits"))
                })
            };
            let ((l1, c1, g1), (l0, c0, g0)) = (run(true), run(false));
            let what = format!("cross_entropy ({n}, {v})");
            assert_eq!(c1, c0, "{what}: count");
            assert_eq!(c1, ts.iter().filter(|&&t| t != ignore).count(), "{what}: count");
            assert_eq!(l1.dtype(), l0.dtype(), "{what}: loss dtype");
            assert_close(&format!("{what} loss"), dt, &l1, &l0);
            assert_close(&format!("{what} gradient of the logits"), dt, &g1, &g0);
        }
    }
}

/// The chunked LM head and loss with the rows' losses and logit gradients from the
/// cross-entropy twin: loss, dh and dW against the composed chunks, over several chunks (a
/// vocabulary of 70 000 leaves 59 rows to a chunk) with ignored rows, at loss scales 1 and
/// 1024 (f16's loss scaling forms the gradients at the scale), and without gradients.
#[test]
fn chunked_linear_cross_entropy_matches_the_composed_ops() {
    let Some(dev) = gpu() else { return };
    let (n, c, v, ignore) = (150, 32, 70_000, -100i64);
    for dt in DTYPES {
        let xs = inputs(&dev, dt, &[&[n, c], &[v, c]], 0.5);
        let ts: Vec<i64> = (0..n).map(|i| if i % 9 == 4 { ignore } else { ((i * 7919) % v) as i64 }).collect();
        let targets = candle_core::Tensor::new(ts.as_slice(), &dev).unwrap();
        for scale in [1.0, 1024.0] {
            let run = |on: bool| {
                taper_kernels::with_cuda_kernels(on, || {
                    let _scaled = taper_kernels::set_loss_scale(scale);
                    let (h, w) = (xs[0].as_tensor(), xs[1].as_tensor());
                    let loss = taper_kernels::linear_cross_entropy_chunked(h, w, &targets, ignore).unwrap();
                    let grads = (loss.to_dtype(candle_core::DType::F32).unwrap() * scale).unwrap().backward().unwrap();
                    (loss, grads.get(h).cloned().unwrap(), grads.get(w).cloned().unwrap())
                })
            };
            let ((l1, dh1, dw1), (l0, dh0, dw0)) = (run(true), run(false));
            let what = format!("chunked linear + cross-entropy at loss scale {scale}");
            assert_close(&format!("{what}: loss"), dt, &l1, &l0);
            assert_close(&format!("{what}: dh"), dt, &dh1, &dh0);
            assert_close(&format!("{what}: dW"), dt, &dw1, &dw0);
        }
        // Without a gradient to form (inputs that track nothing), the losses alone.
        let (h, w) = (xs[0].as_tensor().detach(), xs[1].as_tensor().detach());
        let loss = |on: bool| {
            taper_kernels::with_cuda_kernels(on, || {
                taper_kernels::linear_cross_entropy_chunked(&h, &w, &targets, ignore).unwrap()
            })
        };
        assert_close("chunked linear + cross-entropy without gradients: loss", dt, &loss(true), &loss(false));
    }
}
