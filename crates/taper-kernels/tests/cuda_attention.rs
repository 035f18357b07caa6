//! The CUDA attention kernels (cuda/attention.cu) against the composed path on the same GPU:
//! the output and the gradients of q, k and v, in f32, bf16 and f16, head sizes 64 and 128,
//! with every kind of mask, grouped-query heads, queries after a cache (Tq < Tk), lengths that
//! are not multiples of the tiles, and the (B, T, H·D) and packed entry points.
#![cfg(feature = "cuda")]

mod cuda_common;

use candle_core::{DType, Tensor};
use cuda_common::*;
use taper_kernels::AttnOpts;

/// The masks to try for b batch rows of tq queries and tk keys, each with a name.
fn masks(b: usize, tq: usize, tk: usize, d: usize) -> Vec<(String, AttnOpts)> {
    let plain = AttnOpts::new(1.0 / (d as f64).sqrt());
    // Row 0: every fifth key padded; row 1: its first 3 keys and its last 20, so that under
    // causality its first queries see no key at all (a zero row and no gradient).
    let padding: Vec<bool> = (0..b * tk)
        .map(|n| {
            let (r, j) = (n / tk, n % tk);
            if r % 2 == 0 {
                j % 5 == 0
            } else {
                j < 3 || j + 20 >= tk
            }
        })
        .collect();
    // Packed rows: segments of 9 positions numbered from 1, the last 7 positions padding (0).
    let segs = |t: usize| -> Vec<u32> {
        (0..b * t).map(|n| if n % t + 7 >= t { 0 } else { (n % t / 9 + 1 + n / t) as u32 }).collect()
    };
    vec![
        ("bidirectional".into(), plain.clone()),
        ("causal".into(), AttnOpts::causal(d, 0)),
        ("causal, window 16".into(), AttnOpts::causal(d, 16)),
        ("bidirectional, window 10".into(), AttnOpts { window: 10, ..plain.clone() }),
        ("key padding".into(), AttnOpts { key_padding: Some(padding.clone()), ..plain.clone() }),
        ("causal, key padding".into(), AttnOpts { key_padding: Some(padding.clone()), ..AttnOpts::causal(d, 0) }),
        ("causal, segments".into(), AttnOpts { segments: Some((segs(tq), segs(tk))), ..AttnOpts::causal(d, 0) }),
        (
            "bidirectional, segments, key padding, window 24".into(),
            AttnOpts { segments: Some((segs(tq), segs(tk))), key_padding: Some(padding), window: 24, ..plain },
        ),
    ]
}

fn attention(t: &[Tensor], opts: &AttnOpts) -> candle_core::Result<Tensor> {
    taper_kernels::attention(&t[0], &t[1], &t[2], opts).map_err(candle_core::Error::wrap)
}

/// (B, H, T, D) heads: MHA and GQA, one query tile and several, self-attention and queries
/// after a cache, every mask.
#[test]
fn attention_matches_the_composed_path() {
    let Some(dev) = gpu() else { return };
    for dt in DTYPES {
        for d in [64, 128] {
            // (B, Hq, Hkv, Tq, Tk): 77 spans two query tiles and three key tiles with ragged ends.
            for (b, hq, hkv, tq, tk) in [(2, 4, 2, 77, 77), (2, 2, 2, 33, 77), (1, 4, 1, 130, 130)] {
                let xs = inputs(&dev, dt, &[&[b, hq, tq, d], &[b, hkv, tk, d], &[b, hkv, tk, d]], 1.0);
                for (name, opts) in masks(b, tq, tk, d) {
                    let what = format!("attention {:?} d {d}, {name}", (b, hq, hkv, tq, tk));
                    check(&what, dt, &xs, |t| attention(t, &opts));
                }
            }
        }
    }
}

/// Larger scores (inputs 3x), where the online softmax's running max matters.
#[test]
fn attention_matches_with_peaked_scores() {
    let Some(dev) = gpu() else { return };
    for dt in DTYPES {
        let (b, hq, hkv, t, d) = (2, 4, 2, 150, 64);
        let xs = inputs(&dev, dt, &[&[b, hq, t, d], &[b, hkv, t, d], &[b, hkv, t, d]], 3.0);
        for opts in [AttnOpts::causal(d, 0), AttnOpts::new(1.0 / (d as f64).sqrt())] {
            check(&format!("attention peaked {opts:?}"), dt, &xs, |t| attention(t, &opts));
        }
    }
}

/// The projections' layout (B, T, H·D), read in place by the kernel.
#[test]
fn attention_bthd_matches_the_composed_path() {
    let Some(dev) = gpu() else { return };
    for dt in DTYPES {
        for d in [64, 128] {
            for (b, hq, hkv, tq, tk) in [(2, 4, 2, 77, 77), (2, 4, 2, 20, 77)] {
                let xs = inputs(&dev, dt, &[&[b, tq, hq * d], &[b, tk, hkv * d], &[b, tk, hkv * d]], 1.0);
                for (name, opts) in masks(b, tq, tk, d) {
                    let what = format!("attention_bthd {:?} d {d}, {name}", (b, hq, hkv, tq, tk));
                    check(&what, dt, &xs, |t| {
                        taper_kernels::attention_bthd(&t[0], &t[1], &t[2], hq, hkv, &opts)
                            .map_err(candle_core::Error::wrap)
                    });
                }
            }
        }
    }
}

/// One packed projection, with and without rotary embeddings: split with candle ops and
/// through the kernel, the gradient flowing back into the packed rows.
#[test]
fn attention_packed_matches_the_composed_path() {
    let Some(dev) = gpu() else { return };
    for dt in DTYPES {
        let (b, t, hq, hkv, d) = (2, 77, 4, 2, 64);
        let xs = inputs(&dev, dt, &[&[b, t, (hq + 2 * hkv) * d]], 1.0);
        let angles = || Tensor::randn(0f32, 1f32, (t, d), &dev).unwrap().to_dtype(dt).unwrap();
        let (cos, sin) = (angles().cos().unwrap(), angles().sin().unwrap());
        for (name, opts) in masks(b, t, t, d) {
            check(&format!("attention_packed, {name}"), dt, &xs, |x| {
                taper_kernels::attention_packed(&x[0], hq, hkv, &opts).map_err(candle_core::Error::wrap)
            });
            check(&format!("attention_packed_rope, {name}"), dt, &xs, |x| {
                taper_kernels::attention_packed_rope(&x[0], hq, hkv, &cos, &sin, &opts)
                    .map_err(candle_core::Error::wrap)
            });
        }
    }
}

/// Head sizes without a kernel, and dropout, take the composed path with the kernels on.
#[test]
fn other_head_sizes_and_dropout_fall_back() {
    let Some(dev) = gpu() else { return };
    for dt in DTYPES {
        let xs = inputs(&dev, dt, &[&[2, 4, 37, 32], &[2, 2, 37, 32], &[2, 2, 37, 32]], 1.0);
        check("attention d 32", dt, &xs, |t| attention(t, &AttnOpts::causal(32, 0)));
        let xs = inputs(&dev, dt, &[&[2, 4, 37, 64], &[2, 2, 37, 64], &[2, 2, 37, 64]], 1.0);
        let opts = AttnOpts { dropout: Some((0.1, 7)), ..AttnOpts::causal(64, 0) };
        check("attention with dropout", dt, &xs, |t| attention(t, &opts));
    }
}

/// A query row that sees no key: a zero output and zero gradients, as on the CPU.
#[test]
fn rows_without_keys_are_zero() {
    let Some(dev) = gpu() else { return };
    let (b, h, t, d) = (1, 2, 40, 64);
    let xs = inputs(&dev, DType::F32, &[&[b, h, t, d], &[b, h, t, d], &[b, h, t, d]], 1.0);
    // Causal with the first 5 keys padded: queries 0..5 see nothing.
    let opts = AttnOpts { key_padding: Some((0..t).map(|j| j < 5).collect()), ..AttnOpts::causal(d, 0) };
    let y = taper_kernels::with_cuda_kernels(true, || {
        let ts: Vec<Tensor> = xs.iter().map(|v| v.as_tensor().clone()).collect();
        attention(&ts, &opts).unwrap()
    });
    let head = y.narrow(2, 0, 5).unwrap().abs().unwrap().sum_all().unwrap().to_scalar::<f32>().unwrap();
    assert_eq!(head, 0.0, "rows that see no key");
    let rest = y.narrow(2, 5, t - 5).unwrap().abs().unwrap().sum_all().unwrap().to_scalar::<f32>().unwrap();
    assert!(rest > 0.0);
}
