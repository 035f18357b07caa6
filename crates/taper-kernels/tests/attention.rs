//! The fused attention against the composed candle version (forward and dq, dk, dv in f32),
//! against a naive reference written from the mask definitions (f64), and against finite
//! differences (f64), over awkward shapes and every mask kind.

use candle_core::{DType, Device, Result, Tensor, Var};
use taper_kernels::{attention, attention_composed, AttentionError, AttnOpts};

/// xorshift64*: a few lines, seeded, enough for test inputs.
struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Self {
        Self(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }

    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    /// Uniform in [-1, 1).
    fn sym(&mut self) -> f64 {
        (self.next() >> 11) as f64 / (1u64 << 52) as f64 - 1.0
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }

    fn vec(&mut self, n: usize, amp: f64) -> Vec<f64> {
        (0..n).map(|_| self.sym() * amp).collect()
    }
}

#[derive(Clone)]
struct Case {
    name: &'static str,
    b: usize,
    hq: usize,
    hkv: usize,
    tq: usize,
    tk: usize,
    d: usize,
    opts: AttnOpts,
}

impl Case {
    fn new(name: &'static str, (b, hq, hkv): (usize, usize, usize), (tq, tk, d): (usize, usize, usize)) -> Self {
        Self { name, b, hq, hkv, tq, tk, d, opts: AttnOpts::new(1.0 / (d as f64).sqrt()) }
    }

    fn causal(mut self, window: usize) -> Self {
        self.opts.causal = true;
        self.opts.window = window;
        self
    }

    /// q, k, v and the probe r of the loss sum(out * r), as f64 host data.
    fn data(&self, seed: u64) -> [Vec<f64>; 4] {
        let mut rng = Rng::new(seed);
        let (nq, nk) = (self.b * self.hq * self.tq * self.d, self.b * self.hkv * self.tk * self.d);
        // Wide logits (|q·k| scale up to ~3) so that the softmax is far from uniform.
        [rng.vec(nq, 2.0), rng.vec(nk, 2.0), rng.vec(nk, 1.0), rng.vec(nq, 1.0)]
    }

    fn tensors(&self, data: &[Vec<f64>; 4], dtype: DType) -> Result<[Tensor; 4]> {
        let dev = &Device::Cpu;
        let qs = (self.b, self.hq, self.tq, self.d);
        let ks = (self.b, self.hkv, self.tk, self.d);
        let t = |v: &Vec<f64>, s: (usize, usize, usize, usize)| Tensor::from_vec(v.clone(), s, dev)?.to_dtype(dtype);
        Ok([t(&data[0], qs)?, t(&data[1], ks)?, t(&data[2], ks)?, t(&data[3], qs)?])
    }
}

fn cases() -> Vec<Case> {
    let mut c = vec![
        Case::new("plain, odd sizes", (2, 3, 3), (37, 37, 24)),
        Case::new("causal T=1, batch 1", (1, 2, 2), (1, 1, 8)).causal(0),
        Case::new("long causal", (1, 2, 2), (300, 300, 40)).causal(0),
        Case::new("GQA 4/2 causal", (2, 4, 2), (45, 45, 33)).causal(0),
        Case::new("GQA 4/1", (1, 4, 1), (70, 70, 17)),
        Case::new("KV cache Tq < Tk, GQA", (2, 4, 2), (5, 77, 20)).causal(0),
        Case::new("sliding window", (1, 2, 1), (100, 100, 16)).causal(17),
        Case::new("window over a cache", (1, 2, 2), (9, 71, 12)).causal(30),
        Case::new("cross-attention Tq < Tk", (2, 2, 1), (11, 29, 19)),
        Case::new("cross-attention Tq > Tk", (1, 3, 3), (67, 13, 10)),
        Case::new("causal Tq > Tk (rows with no key)", (1, 2, 2), (6, 4, 8)).causal(0),
        // Past the kernel's key block (512): the online softmax rescales rows across blocks.
        Case::new("keys over three blocks", (1, 2, 1), (70, 1100, 6)),
        Case::new("long causal over two key blocks", (1, 1, 1), (600, 600, 5)).causal(0),
    ];
    let mut pad = Case::new("key padding, a fully masked row", (2, 2, 2), (9, 13, 11));
    // Batch row 0 loses a few keys; batch row 1 loses all of them.
    pad.opts.key_padding = Some((0..2 * 13).map(|i| if i < 13 { i % 4 == 1 } else { true }).collect());
    c.push(pad);
    let mut cross = Case::new("cross-attention with key padding", (2, 4, 2), (7, 90, 9));
    cross.opts.key_padding = Some((0..2 * 90).map(|i| (i % 90) >= 70 + (i / 90) * 10).collect());
    c.push(cross);
    let mut packed = Case::new("packed segments", (2, 2, 1), (50, 50, 14)).causal(0);
    let seg = |lens: &[(u32, usize)]| -> Vec<u32> { lens.iter().flat_map(|&(s, n)| vec![s; n]).collect() };
    let s: Vec<u32> = seg(&[(1, 20), (2, 17), (3, 5), (0, 8)]).into_iter().chain(seg(&[(1, 49), (0, 1)])).collect();
    packed.opts.segments = Some((s.clone(), s));
    c.push(packed);
    let mut packed_w = Case::new("packed segments with a window and padding keys", (1, 4, 2), (40, 40, 8)).causal(6);
    let s = seg(&[(1, 11), (2, 25), (0, 4)]);
    packed_w.opts.segments = Some((s.clone(), s));
    packed_w.opts.key_padding = Some((0..40).map(|j| j == 3 || j == 20).collect());
    c.push(packed_w);
    c
}

/// Attention written out from the definitions of AttnOpts, in f64, row by row.
fn naive(c: &Case, q: &[f64], k: &[f64], v: &[f64]) -> Vec<f64> {
    let (d, rep) = (c.d, c.hq / c.hkv);
    let mut out = vec![0.0; q.len()];
    for r in 0..c.b {
        for h in 0..c.hq {
            let kvh = r * c.hkv + h / rep;
            for i in 0..c.tq {
                let p = (c.tk + i) as isize - c.tq as isize;
                let sees = |j: usize| {
                    let o = &c.opts;
                    let ji = j as isize;
                    let seg_ok = match &o.segments {
                        None => true,
                        Some((qs, _)) if qs[r * c.tq + i] == 0 => ji == p,
                        Some((qs, ks)) => ks[r * c.tk + j] == qs[r * c.tq + i],
                    };
                    let future = o.causal && ji > p;
                    let too_old = o.window > 0 && p - ji >= o.window as isize;
                    let padded = o.key_padding.as_ref().is_some_and(|kp| kp[r * c.tk + j]);
                    seg_ok && !future && !too_old && !padded
                };
                let qi = &q[((r * c.hq + h) * c.tq + i) * d..][..d];
                let s: Vec<Option<f64>> = (0..c.tk)
                    .map(|j| {
                        sees(j).then(|| {
                            c.opts.scale
                                * qi.iter().zip(&k[(kvh * c.tk + j) * d..][..d]).map(|(a, b)| a * b).sum::<f64>()
                        })
                    })
                    .collect();
                let max = s.iter().flatten().copied().fold(f64::NEG_INFINITY, f64::max);
                if max == f64::NEG_INFINITY {
                    continue;
                }
                let z: f64 = s.iter().flatten().map(|x| (x - max).exp()).sum();
                let o = &mut out[((r * c.hq + h) * c.tq + i) * d..][..d];
                for (j, sj) in s.iter().enumerate() {
                    if let Some(sj) = sj {
                        let w = (sj - max).exp() / z;
                        for (o, vv) in o.iter_mut().zip(&v[(kvh * c.tk + j) * d..][..d]) {
                            *o += w * vv;
                        }
                    }
                }
            }
        }
    }
    out
}

fn host(t: &Tensor) -> Result<Vec<f64>> {
    t.flatten_all()?.to_dtype(DType::F64)?.to_vec1::<f64>()
}

/// max |a - b| / (1 + max |b|), with NaN failing.
fn rel_err(a: &[f64], b: &[f64]) -> f64 {
    assert_eq!(a.len(), b.len());
    let scale = 1.0 + b.iter().fold(0f64, |m, x| m.max(x.abs()));
    let mut worst = 0f64;
    for (x, y) in a.iter().zip(b) {
        assert!(x.is_finite(), "non-finite value {x}");
        worst = worst.max((x - y).abs());
    }
    worst / scale
}

type Attn = fn(&Tensor, &Tensor, &Tensor, &AttnOpts) -> std::result::Result<Tensor, AttentionError>;

/// Output and dq, dk, dv of sum(attn(q, k, v) * r).
fn run(c: &Case, data: &[Vec<f64>; 4], dtype: DType, f: Attn) -> Result<[Vec<f64>; 4]> {
    let [q, k, v, r] = c.tensors(data, dtype)?;
    let (q, k, v) = (Var::from_tensor(&q)?, Var::from_tensor(&k)?, Var::from_tensor(&v)?);
    let out = f(q.as_tensor(), k.as_tensor(), v.as_tensor(), &c.opts).map_err(candle_core::Error::wrap)?;
    assert_eq!(out.dims(), [c.b, c.hq, c.tq, c.d], "{}", c.name);
    let grads = (&out * &r)?.sum_all()?.backward()?;
    let g = |x: &Var| host(grads.get(x.as_tensor()).expect("a gradient"));
    Ok([host(&out)?, g(&q)?, g(&k)?, g(&v)?])
}

#[test]
fn fused_matches_composed_in_f32() -> Result<()> {
    for (n, c) in cases().iter().enumerate() {
        let data = c.data(100 + n as u64);
        let fused = run(c, &data, DType::F32, attention)?;
        let composed = run(c, &data, DType::F32, attention_composed)?;
        for (what, (a, b)) in ["out", "dq", "dk", "dv"].iter().zip(fused.iter().zip(&composed)) {
            let e = rel_err(a, b);
            assert!(e < 1e-5, "{}: {what} differs by {e:e}", c.name);
        }
    }
    Ok(())
}

#[test]
fn fused_matches_the_definition_in_f64() -> Result<()> {
    for (n, c) in cases().iter().enumerate() {
        let data = c.data(200 + n as u64);
        let reference = naive(c, &data[0], &data[1], &data[2]);
        let [out, ..] = run(c, &data, DType::F64, attention)?;
        let e = rel_err(&out, &reference);
        assert!(e < 1e-12, "{}: fused differs from the definition by {e:e}", c.name);
        let [out, ..] = run(c, &data, DType::F64, attention_composed)?;
        let e = rel_err(&out, &reference);
        assert!(e < 1e-12, "{}: composed differs from the definition by {e:e}", c.name);
    }
    Ok(())
}

#[test]
fn fused_gradients_match_finite_differences_in_f64() -> Result<()> {
    for (n, c) in cases().iter().enumerate() {
        let data = c.data(300 + n as u64);
        let [_, dq, dk, dv] = run(c, &data, DType::F64, attention)?;
        let loss = |data: &[Vec<f64>; 4]| -> Result<f64> {
            let [q, k, v, r] = c.tensors(data, DType::F64)?;
            let out = attention(&q, &k, &v, &c.opts).map_err(candle_core::Error::wrap)?;
            (out * r)?.sum_all()?.to_scalar::<f64>()
        };
        let mut rng = Rng::new(400 + n as u64);
        for (input, grad) in [(0, &dq), (1, &dk), (2, &dv)] {
            for _ in 0..6 {
                let at = rng.below(grad.len());
                let h = 1e-5;
                let mut plus = data.clone();
                plus[input][at] += h;
                let mut minus = data.clone();
                minus[input][at] -= h;
                let fd = (loss(&plus)? - loss(&minus)?) / (2.0 * h);
                let g = grad[at];
                assert!((fd - g).abs() < 1e-7 * (1.0 + fd.abs()), "{}: input {input}[{at}]: fd {fd} vs {g}", c.name);
            }
        }
    }
    Ok(())
}

/// A query with no visible key: zero output, zero gradient, no NaN, in both versions.
#[test]
fn a_row_without_keys_is_zero_with_zero_gradient() -> Result<()> {
    let mut c = Case::new("all keys padded", (1, 2, 1), (3, 5, 4));
    c.opts.key_padding = Some(vec![true; 5]);
    let data = c.data(7);
    for f in [attention as Attn, attention_composed] {
        for dtype in [DType::F32, DType::F64] {
            for x in run(&c, &data, dtype, f)? {
                assert!(x.iter().all(|x| *x == 0.0), "{x:?}");
            }
        }
    }
    Ok(())
}

/// Packed rows as taper's `segment_mask` defines them: a document's first token sees only
/// itself, and a padding token (segment 0) sees only itself, so both copy their own value row.
#[test]
fn segment_starts_and_padding_see_only_themselves() -> Result<()> {
    let mut c = Case::new("packed", (1, 1, 1), (6, 6, 3)).causal(0);
    let seg = vec![1, 1, 2, 2, 0, 0];
    c.opts.segments = Some((seg.clone(), seg));
    let data = c.data(9);
    let [out, ..] = run(&c, &data, DType::F64, attention)?;
    for i in [0, 2, 4, 5] {
        assert_eq!(&out[i * 3..i * 3 + 3], &data[2][i * 3..i * 3 + 3], "row {i}");
    }
    assert_ne!(&out[3 * 3..3 * 3 + 3], &data[2][3 * 3..3 * 3 + 3], "row 3 mixes two keys");
    Ok(())
}

#[test]
fn bad_shapes_are_typed_errors() -> Result<()> {
    let dev = &Device::Cpu;
    let q = Tensor::zeros((1, 3, 4, 8), DType::F32, dev)?;
    let k = Tensor::zeros((1, 2, 4, 8), DType::F32, dev)?;
    let opts = AttnOpts::new(1.0);
    assert!(matches!(attention(&q, &k, &k, &opts), Err(AttentionError::Shape(_))), "3 heads over 2");
    let k = Tensor::zeros((1, 3, 4, 8), DType::F32, dev)?;
    let bad = AttnOpts { key_padding: Some(vec![false; 3]), ..opts.clone() };
    assert!(matches!(attention(&q, &k, &k, &bad), Err(AttentionError::Shape(_))), "padding length");
    let k64 = k.to_dtype(DType::F64)?;
    assert!(matches!(attention(&q, &k64, &k, &opts), Err(AttentionError::DType { .. })), "mixed dtypes");
    Ok(())
}

/// The (B, T, H·D) entry is the same op on the projections' layout: output and gradients equal
/// the (B, H, T, D) kernel's, moved between layouts, bit for bit.
#[test]
fn bthd_layout_is_the_same_attention() -> Result<()> {
    for (n, c) in cases().iter().enumerate() {
        let data = c.data(500 + n as u64);
        let [bhtd_out, dq, dk, dv] = run(c, &data, DType::F32, attention)?;
        let [q, k, v, r] = c.tensors(&data, DType::F32)?;
        let to_bthd = |t: &Tensor| -> Result<Tensor> {
            let (b, h, tt, d) = t.dims4()?;
            t.transpose(1, 2)?.contiguous()?.reshape((b, tt, h * d))
        };
        let (q, k, v) =
            (Var::from_tensor(&to_bthd(&q)?)?, Var::from_tensor(&to_bthd(&k)?)?, Var::from_tensor(&to_bthd(&v)?)?);
        let out = taper_kernels::attention_bthd(q.as_tensor(), k.as_tensor(), v.as_tensor(), c.hq, c.hkv, &c.opts)
            .map_err(candle_core::Error::wrap)?;
        assert_eq!(out.dims(), [c.b, c.tq, c.hq * c.d], "{}", c.name);
        let grads = (&out * to_bthd(&r)?)?.sum_all()?.backward()?;
        let back = |t: &Tensor, h: usize, tt: usize| -> Result<Vec<f64>> {
            host(&t.reshape((c.b, tt, h, c.d))?.transpose(1, 2)?.contiguous()?)
        };
        let g = |x: &Var| grads.get(x.as_tensor()).expect("a gradient").clone();
        for (what, got, want) in [
            ("out", back(&out, c.hq, c.tq)?, bhtd_out),
            ("dq", back(&g(&q), c.hq, c.tq)?, dq),
            ("dk", back(&g(&k), c.hkv, c.tk)?, dk),
            ("dv", back(&g(&v), c.hkv, c.tk)?, dv),
        ] {
            assert!(got == want, "{}: {what} differs between layouts", c.name);
        }
    }
    Ok(())
}

/// The packed entry, q, k and v side by side in one (B, T, (Hq + 2·Hkv)·D) tensor, is the same
/// attention too; its one gradient holds dq, dk and dv in the same places.
#[test]
fn packed_qkv_is_the_same_attention() -> Result<()> {
    for (n, c) in cases().iter().enumerate().filter(|(_, c)| c.tq == c.tk) {
        let data = c.data(600 + n as u64);
        let [bhtd_out, dq, dk, dv] = run(c, &data, DType::F32, attention)?;
        let [q, k, v, r] = c.tensors(&data, DType::F32)?;
        let to_rows = |t: &Tensor| -> Result<Tensor> {
            let (b, h, tt, d) = t.dims4()?;
            t.transpose(1, 2)?.contiguous()?.reshape((b, tt, h * d))
        };
        let qkv = Var::from_tensor(&Tensor::cat(&[to_rows(&q)?, to_rows(&k)?, to_rows(&v)?], 2)?)?;
        let out =
            taper_kernels::attention_packed(qkv.as_tensor(), c.hq, c.hkv, &c.opts).map_err(candle_core::Error::wrap)?;
        assert_eq!(out.dims(), [c.b, c.tq, c.hq * c.d], "{}", c.name);
        let grads = (&out * to_rows(&r)?)?.sum_all()?.backward()?;
        let g = grads.get(qkv.as_tensor()).expect("a gradient");
        let back = |t: &Tensor, h: usize| -> Result<Vec<f64>> {
            host(&t.reshape((c.b, c.tq, h, c.d))?.transpose(1, 2)?.contiguous()?)
        };
        let part = |from: usize, h: usize| g.narrow(2, from * c.d, h * c.d);
        for (what, got, want) in [
            ("out", back(&out, c.hq)?, bhtd_out),
            ("dq", back(&part(0, c.hq)?, c.hq)?, dq),
            ("dk", back(&part(c.hq, c.hkv)?, c.hkv)?, dk),
            ("dv", back(&part(c.hq + c.hkv, c.hkv)?, c.hkv)?, dv),
        ] {
            assert!(got == want, "{}: {what} differs from the (B, H, T, D) op", c.name);
        }
    }
    Ok(())
}

/// Rotary tables (rows, T, D) in the rotate-half layout: angle (offset + t) / 10000^(2i/D).
fn rope_tables(rows: usize, t: usize, d: usize, dtype: DType) -> Result<(Tensor, Tensor)> {
    let (mut cos, mut sin) = (Vec::new(), Vec::new());
    for r in 0..rows {
        for p in 0..t {
            for j in 0..d {
                let i = j % (d / 2);
                let a = (p + 3 * r) as f64 / 10_000f64.powf(2.0 * i as f64 / d as f64);
                cos.push(a.cos());
                sin.push(a.sin());
            }
        }
    }
    let shape: &[usize] = if rows == 1 { &[t, d] } else { &[rows, 1, t, d] };
    Ok((
        Tensor::from_vec(cos, shape, &Device::Cpu)?.to_dtype(dtype)?,
        Tensor::from_vec(sin, shape, &Device::Cpu)?.to_dtype(dtype)?,
    ))
}

/// RoPE inside the packed op equals `rope` on the (B, H, T, D) heads followed by the attention,
/// output and every gradient, with one table for all rows and with a table per row (packed
/// sequences); tables of the wrong shape are a typed error.
#[test]
fn packed_qkv_with_rope_is_rope_then_attention() -> Result<()> {
    for (n, c) in cases().iter().enumerate().filter(|(_, c)| c.tq == c.tk && c.d % 2 == 0) {
        for rows in [1, c.b] {
            let data = c.data(700 + n as u64);
            let [q, k, v, r] = c.tensors(&data, DType::F64)?;
            let (cos, sin) = rope_tables(rows, c.tq, c.d, DType::F64)?;
            let (qv, kv, vv) = (Var::from_tensor(&q)?, Var::from_tensor(&k)?, Var::from_tensor(&v)?);
            let (qr, kr) =
                (taper_kernels::rope(qv.as_tensor(), &cos, &sin)?, taper_kernels::rope(kv.as_tensor(), &cos, &sin)?);
            let want = taper_kernels::attention(&qr, &kr, vv.as_tensor(), &c.opts).map_err(candle_core::Error::wrap)?;
            let wg = (&want * &r)?.sum_all()?.backward()?;

            let to_rows = |t: &Tensor| -> Result<Tensor> {
                let (b, h, tt, d) = t.dims4()?;
                t.transpose(1, 2)?.contiguous()?.reshape((b, tt, h * d))
            };
            let qkv = Var::from_tensor(&Tensor::cat(&[to_rows(&q)?, to_rows(&k)?, to_rows(&v)?], 2)?)?;
            let out = taper_kernels::attention_packed_rope(qkv.as_tensor(), c.hq, c.hkv, &cos, &sin, &c.opts)
                .map_err(candle_core::Error::wrap)?;
            let g = (&out * to_rows(&r)?)?.sum_all()?.backward()?;
            let g = g.get(qkv.as_tensor()).expect("a gradient");
            let back = |t: &Tensor, h: usize| -> Result<Vec<f64>> {
                host(&t.reshape((c.b, c.tq, h, c.d))?.transpose(1, 2)?.contiguous()?)
            };
            let part = |from: usize, h: usize| g.narrow(2, from * c.d, h * c.d);
            let wgrad = |x: &Var| host(wg.get(x.as_tensor()).expect("a gradient"));
            for (what, got, want) in [
                ("out", back(&out, c.hq)?, host(&want)?),
                ("dq", back(&part(0, c.hq)?, c.hq)?, wgrad(&qv)?),
                ("dk", back(&part(c.hq, c.hkv)?, c.hkv)?, wgrad(&kv)?),
                ("dv", back(&part(c.hq + c.hkv, c.hkv)?, c.hkv)?, wgrad(&vv)?),
            ] {
                let e = rel_err(&got, &want);
                assert!(e < 1e-12, "{} (tables for {rows} rows): {what} off by {e}", c.name);
            }
        }
    }
    let qkv = Tensor::zeros((2, 5, 3 * 8), DType::F32, &Device::Cpu)?;
    let (cos, sin) = rope_tables(1, 4, 8, DType::F32)?;
    let err = taper_kernels::attention_packed_rope(&qkv, 1, 1, &cos, &sin, &AttnOpts::causal(8, 0)).unwrap_err();
    assert!(err.to_string().contains("rotary tables"), "{err}");
    Ok(())
}
