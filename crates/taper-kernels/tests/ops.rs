//! Each fused op against the composed candle version (f32: forward and gradients) and against
//! central finite differences (f64), over awkward shapes: rows that fit no SIMD width or tile,
//! batch 1, T = 1, a long row, and non-contiguous (transposed) inputs.

use candle_core::{DType, Device, Result, Tensor, Var, D};

/// xorshift64*, seeded: inputs are the same on every run.
struct Rng(u64);

impl Rng {
    fn uniform(&mut self) -> f64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        (self.0.wrapping_mul(0x2545_f491_4f6c_dd1d) >> 11) as f64 / (1u64 << 53) as f64
    }

    fn normal(&mut self) -> f64 {
        let (u, v) = (self.uniform().max(1e-300), self.uniform());
        (-2.0 * u.ln()).sqrt() * (2.0 * std::f64::consts::PI * v).cos()
    }

    fn tensor(&mut self, shape: &[usize], scale: f64, dtype: DType) -> Tensor {
        let n: usize = shape.iter().product();
        let v: Vec<f64> = (0..n).map(|_| self.normal() * scale).collect();
        Tensor::from_vec(v, shape, &Device::Cpu).unwrap().to_dtype(dtype).unwrap()
    }
}

/// An op input: its values, whether it takes a gradient, and whether to present it transposed
/// (the stored tensor has the last two dims swapped and the op sees `.t()` of it).
struct Input {
    t: Tensor,
    grad: bool,
    transposed: bool,
}

fn inp(t: Tensor) -> Input {
    Input { t, grad: true, transposed: false }
}

fn constant(t: Tensor) -> Input {
    Input { t, grad: false, transposed: false }
}

/// `t` laid out transposed in memory, shown to the op with its original shape.
fn transposed(t: Tensor) -> Input {
    Input { t: t.t().unwrap().contiguous().unwrap(), grad: true, transposed: true }
}

type Op<'a> = &'a dyn Fn(&[Tensor]) -> Result<Tensor>;

/// The op's output and the gradients of sum(y * probe) for the inputs that take one.
fn run(op: Op, inputs: &[Input], probe_seed: u64) -> Result<(Tensor, Vec<Option<Tensor>>)> {
    let vars: Vec<Option<Var>> =
        inputs.iter().map(|i| if i.grad { Some(Var::from_tensor(&i.t).unwrap()) } else { None }).collect();
    let args: Vec<Tensor> = inputs
        .iter()
        .zip(&vars)
        .map(|(i, v)| {
            let t = v.as_ref().map_or(i.t.clone(), |v| v.as_tensor().clone());
            if i.transposed {
                t.t().unwrap()
            } else {
                t
            }
        })
        .collect();
    let y = op(&args)?;
    let probe = Rng(probe_seed).tensor(y.dims(), 1.0, y.dtype());
    let grads = y.mul(&probe)?.sum_all()?.backward()?;
    let gs = vars
        .iter()
        .map(|v| {
            v.as_ref().map(|v| grads.get(v.as_tensor()).cloned().unwrap_or_else(|| v.as_tensor().zeros_like().unwrap()))
        })
        .collect();
    Ok((y, gs))
}

fn max_rel_err(a: &Tensor, b: &Tensor) -> f64 {
    assert_eq!(a.dims(), b.dims());
    let a: Vec<f64> = a.to_dtype(DType::F64).unwrap().flatten_all().unwrap().to_vec1().unwrap();
    let b: Vec<f64> = b.to_dtype(DType::F64).unwrap().flatten_all().unwrap().to_vec1().unwrap();
    let scale = b.iter().fold(0f64, |m, v| m.max(v.abs())).max(1.0);
    a.iter().zip(&b).fold(0f64, |m, (x, y)| m.max((x - y).abs() / scale))
}

/// Fused vs composed in f32: outputs and every gradient within `tol` of the largest value.
fn parity(name: &str, fused: Op, composed: Op, inputs: &[Input], tol: f64) {
    let (y1, g1) = run(fused, inputs, 7).unwrap();
    let (y2, g2) = run(composed, inputs, 7).unwrap();
    let e = max_rel_err(&y1, &y2);
    assert!(e < tol, "{name}: forward off by {e}");
    for (i, (a, b)) in g1.iter().zip(&g2).enumerate() {
        if let (Some(a), Some(b)) = (a, b) {
            let e = max_rel_err(a, b);
            assert!(e < tol, "{name}: gradient of input {i} off by {e}");
        }
    }
}

/// Backward of the fused op in f64 against central differences of sum(y * probe), at up to
/// 24 positions per input.
fn finite_differences(name: &str, fused: Op, inputs: &[Input]) {
    let (_, grads) = run(fused, inputs, 9).unwrap();
    let loss = |ins: &[Input]| -> f64 {
        let args: Vec<Tensor> = ins.iter().map(|i| if i.transposed { i.t.t().unwrap() } else { i.t.clone() }).collect();
        let y = fused(&args).unwrap();
        let probe = Rng(9).tensor(y.dims(), 1.0, y.dtype());
        y.mul(&probe).unwrap().sum_all().unwrap().to_scalar::<f64>().unwrap()
    };
    let mut pick = Rng(5);
    for (k, g) in grads.iter().enumerate() {
        let Some(g) = g else { continue };
        // The gradient of the stored tensor: indexed like the stored values.
        let g: Vec<f64> = g.flatten_all().unwrap().to_vec1().unwrap();
        let base: Vec<f64> = inputs[k].t.flatten_all().unwrap().to_vec1().unwrap();
        let n = base.len();
        let idx: Vec<usize> =
            if n <= 24 { (0..n).collect() } else { (0..24).map(|_| (pick.uniform() * n as f64) as usize).collect() };
        for i in idx {
            let h = 1e-6;
            let shifted = |d: f64| -> f64 {
                let mut v = base.clone();
                v[i] += d;
                let t = Tensor::from_vec(v, inputs[k].t.dims(), &Device::Cpu).unwrap();
                let ins: Vec<Input> = inputs
                    .iter()
                    .enumerate()
                    .map(|(j, x)| Input {
                        t: if j == k { t.clone() } else { x.t.clone() },
                        grad: x.grad,
                        transposed: x.transposed,
                    })
                    .collect();
                loss(&ins)
            };
            let fd = (shifted(h) - shifted(-h)) / (2.0 * h);
            assert!((fd - g[i]).abs() < 1e-6 * (1.0 + fd.abs()), "{name}: input {k}[{i}]: fd {fd} vs {}", g[i]);
        }
    }
}

// The composed references, written out from taper-model's nn.rs.

fn ref_layer_norm(x: &Tensor, w: &Tensor, b: Option<&Tensor>, eps: f64) -> Result<Tensor> {
    let mean = x.mean_keepdim(D::Minus1)?;
    let xc = x.broadcast_sub(&mean)?;
    let var = xc.sqr()?.mean_keepdim(D::Minus1)?;
    let y = xc.broadcast_div(&(var + eps)?.sqrt()?)?.broadcast_mul(w)?;
    match b {
        Some(b) => y.broadcast_add(b),
        None => Ok(y),
    }
}

fn ref_rms_norm(x: &Tensor, w: &Tensor, eps: f64) -> Result<Tensor> {
    let ms = x.sqr()?.mean_keepdim(D::Minus1)?;
    x.broadcast_div(&(ms + eps)?.sqrt()?)?.broadcast_mul(w)
}

fn ref_softmax(x: &Tensor) -> Result<Tensor> {
    let max = x.max_keepdim(D::Minus1)?.detach();
    let e = x.broadcast_sub(&max)?.exp()?;
    e.broadcast_div(&e.sum_keepdim(D::Minus1)?)
}

fn ref_log_softmax(x: &Tensor) -> Result<Tensor> {
    let max = x.max_keepdim(D::Minus1)?.detach();
    let shifted = x.broadcast_sub(&max)?;
    shifted.broadcast_sub(&shifted.exp()?.sum_keepdim(D::Minus1)?.log()?)
}

fn ref_rope(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    let d = x.dim(D::Minus1)?;
    let x1 = x.narrow(D::Minus1, 0, d / 2)?;
    let x2 = x.narrow(D::Minus1, d / 2, d / 2)?;
    let rotated = Tensor::cat(&[&x2.neg()?, &x1], D::Minus1)?;
    x.broadcast_mul(cos)? + rotated.broadcast_mul(sin)?
}

fn ref_cross_entropy(logits: &Tensor, targets: &Tensor, ignore: i64) -> Result<Tensor> {
    let valid = targets.ne(ignore)?;
    let safe = valid.where_cond(targets, &targets.zeros_like()?)?.to_dtype(DType::U32)?;
    let picked = ref_log_softmax(logits)?.gather(&safe.unsqueeze(1)?, 1)?.squeeze(1)?;
    let validf = valid.to_dtype(logits.dtype())?;
    let count = validf.sum_all()?.to_dtype(DType::F64)?.to_scalar::<f64>()?;
    (picked * validf)?.sum_all()?.neg()? / count.max(1.0)
}

/// Every case of one op in f32 (parity) and f64 (finite differences).
fn both(name: &str, fused: Op, composed: Op, make: &dyn Fn(DType) -> Vec<Input>) {
    parity(name, fused, composed, &make(DType::F32), 1e-5);
    finite_differences(name, fused, &make(DType::F64));
}

#[test]
fn norms() {
    for (shape, transpose) in
        [(vec![3, 5, 7], false), (vec![1, 1, 1031], false), (vec![11, 9], true), (vec![1, 1], false)]
    {
        let c = *shape.last().unwrap();
        let make = |dtype: DType| {
            let mut r = Rng(shape.iter().product::<usize>() as u64);
            let x = r.tensor(&shape, 2.0, dtype).affine(1.0, 0.5).unwrap();
            let x = if transpose { transposed(x) } else { inp(x) };
            vec![x, inp(r.tensor(&[c], 0.3, dtype).affine(1.0, 1.0).unwrap()), inp(r.tensor(&[c], 0.3, dtype))]
        };
        let label = format!("layer_norm {shape:?}");
        both(
            &label,
            &|a| taper_kernels::layer_norm(&a[0], &a[1], Some(&a[2]), 1e-5),
            &|a| ref_layer_norm(&a[0], &a[1], Some(&a[2]), 1e-5),
            &make,
        );
        let no_bias = |d: DType| make(d).into_iter().take(2).collect::<Vec<_>>();
        both(
            &format!("layer_norm without bias {shape:?}"),
            &|a| taper_kernels::layer_norm(&a[0], &a[1], None, 1e-5),
            &|a| ref_layer_norm(&a[0], &a[1], None, 1e-5),
            &no_bias,
        );
        both(
            &format!("rms_norm {shape:?}"),
            &|a| taper_kernels::rms_norm(&a[0], &a[1], 1e-6),
            &|a| ref_rms_norm(&a[0], &a[1], 1e-6),
            &no_bias,
        );
    }
}

#[test]
fn softmaxes() {
    for (shape, transpose) in
        [(vec![2, 3, 17], false), (vec![1, 1037], false), (vec![13, 6], true), (vec![1, 1, 1], false)]
    {
        let make = |dtype: DType| {
            let x = Rng(3 + shape.len() as u64).tensor(&shape, 3.0, dtype);
            vec![if transpose { transposed(x) } else { inp(x) }]
        };
        both(
            &format!("softmax {shape:?}"),
            &|a| taper_kernels::softmax_last_dim(&a[0]),
            &|a| ref_softmax(&a[0]),
            &make,
        );
        both(
            &format!("log_softmax {shape:?}"),
            &|a| taper_kernels::log_softmax(&a[0]),
            &|a| ref_log_softmax(&a[0]),
            &make,
        );
    }
}

#[test]
fn rope_plain_packed_and_strided() {
    // (x shape, cos shape, x given as (B, T, H, D) transposed to (B, H, T, D) as the decoder does)
    let cases: [(&[usize], &[usize], bool); 5] = [
        (&[2, 3, 5, 6], &[5, 6], false),
        (&[1, 2, 1, 8], &[1, 8], false),
        (&[2, 1, 5, 6], &[2, 1, 5, 6], false),
        (&[2, 3, 7, 10], &[2, 1, 7, 10], true),
        (&[1, 4, 33, 66], &[33, 66], true),
    ];
    for (xs, cs, strided) in cases {
        let make = |dtype: DType| {
            let mut r = Rng(xs.iter().sum::<usize>() as u64);
            let x = if strided {
                // Stored (B, T, H, D); the op sees transpose(1, 2), like q and k in the decoder.
                inp(r.tensor(&[xs[0], xs[2], xs[1], xs[3]], 1.0, dtype))
            } else {
                inp(r.tensor(xs, 1.0, dtype))
            };
            vec![x, constant(r.tensor(cs, 1.0, dtype)), constant(r.tensor(cs, 1.0, dtype))]
        };
        let prep = move |a: &[Tensor]| if strided { a[0].transpose(1, 2).unwrap() } else { a[0].clone() };
        both(
            &format!("rope {xs:?} {cs:?}"),
            &|a| taper_kernels::rope(&prep(a), &a[1], &a[2]),
            &|a| ref_rope(&prep(a), &a[1], &a[2]),
            &make,
        );
    }
}

#[test]
fn cross_entropy_with_ignored_rows() {
    let ignore = -100i64;
    for (n, v, transpose, ignored) in [(7, 11, false, 2), (1, 1500, false, 0), (9, 5, true, 3), (3, 4, false, 3)] {
        let mut r = Rng(n as u64 * 31 + v as u64);
        let targets: Vec<i64> =
            (0..n).map(|i| if i < ignored { ignore } else { (r.uniform() * v as f64) as i64 % v as i64 }).collect();
        let targets = Tensor::new(targets.as_slice(), &Device::Cpu).unwrap();
        let make = |dtype: DType| {
            let x = Rng(n as u64 + 1).tensor(&[n, v], 2.0, dtype);
            vec![if transpose { transposed(x) } else { inp(x) }]
        };
        let fused = |a: &[Tensor]| -> Result<Tensor> {
            let (loss, count) = taper_kernels::cross_entropy(&a[0], &targets, ignore)?;
            assert_eq!(count, n - ignored);
            Ok(loss)
        };
        both(&format!("cross_entropy {n}x{v}"), &fused, &|a| ref_cross_entropy(&a[0], &targets, ignore), &make);
    }
    // A target outside the vocabulary is an error, not a panic.
    let logits = Tensor::zeros((2, 3), DType::F32, &Device::Cpu).unwrap();
    let bad = Tensor::new(&[1i64, 3], &Device::Cpu).unwrap();
    assert!(taper_kernels::cross_entropy(&logits, &bad, -100).is_err());
}

#[test]
fn activations() {
    for (shape, transpose) in
        [(vec![3, 37], false), (vec![1, 1, 1], false), (vec![5, 4099], false), (vec![19, 3], true)]
    {
        let make1 = |dtype: DType| {
            let x = Rng(shape[1] as u64).tensor(&shape, 2.5, dtype);
            vec![if transpose { transposed(x) } else { inp(x) }]
        };
        both(&format!("gelu_erf {shape:?}"), &|a| taper_kernels::gelu_erf(&a[0]), &|a| a[0].gelu_erf(), &make1);
        both(&format!("gelu_tanh {shape:?}"), &|a| taper_kernels::gelu_tanh(&a[0]), &|a| a[0].gelu(), &make1);
        let make2 = |dtype: DType| {
            let mut r = Rng(shape[0] as u64 + 100);
            let (g, u) = (r.tensor(&shape, 2.5, dtype), r.tensor(&shape, 1.0, dtype));
            if transpose {
                vec![transposed(g), inp(u)]
            } else {
                vec![inp(g), inp(u)]
            }
        };
        both(&format!("swiglu {shape:?}"), &|a| taper_kernels::swiglu(&a[0], &a[1]), &|a| a[0].silu()? * &a[1], &make2);
    }
}

#[test]
fn linear_with_and_without_bias() {
    // (x shape, out): a 3-D batch, one row, ragged widths, a wide GEMM that takes the threaded
    // path, and a transposed (non-contiguous) x.
    for (shape, out, transpose) in [
        (vec![2, 5, 7], 3, false),
        (vec![1, 1], 1, false),
        (vec![1, 1, 13], 33, false),
        (vec![67, 129], 71, false),
        (vec![9, 6], 4, true),
    ] {
        let c = *shape.last().unwrap();
        let make = |dtype: DType| {
            let mut r = Rng(shape.iter().product::<usize>() as u64 + out as u64);
            let x = r.tensor(&shape, 1.0, dtype);
            let x = if transpose { transposed(x) } else { inp(x) };
            vec![x, inp(r.tensor(&[out, c], 0.5, dtype)), inp(r.tensor(&[out], 0.5, dtype))]
        };
        both(
            &format!("linear {shape:?} -> {out}"),
            &|a| taper_kernels::linear(&a[0], &a[1], Some(&a[2])),
            &|a| taper_kernels::linear_composed(&a[0], &a[1], Some(&a[2])),
            &make,
        );
        let no_bias = |d: DType| make(d).into_iter().take(2).collect::<Vec<_>>();
        both(
            &format!("linear without bias {shape:?} -> {out}"),
            &|a| taper_kernels::linear(&a[0], &a[1], None),
            &|a| taper_kernels::linear_composed(&a[0], &a[1], None),
            &no_bias,
        );
    }
    // The up-projection with its GELU in one node, erf and tanh forms, with and without bias.
    for (shape, out) in [(vec![2, 5, 7], 3), (vec![1, 1], 1), (vec![67, 129], 71)] {
        let c = *shape.last().unwrap();
        let make = |dtype: DType| {
            let mut r = Rng(shape.iter().product::<usize>() as u64 + 7);
            vec![
                inp(r.tensor(&shape, 1.0, dtype)),
                inp(r.tensor(&[out, c], 0.7, dtype)),
                inp(r.tensor(&[out], 0.5, dtype)),
            ]
        };
        let no_bias = |d: DType| make(d).into_iter().take(2).collect::<Vec<_>>();
        for tanh in [false, true] {
            let act = move |u: Tensor| if tanh { u.gelu() } else { u.gelu_erf() };
            both(
                &format!("linear_gelu tanh={tanh} {shape:?} -> {out}"),
                &|a| taper_kernels::linear_gelu(&a[0], &a[1], Some(&a[2]), tanh),
                &|a| act(taper_kernels::linear_composed(&a[0], &a[1], Some(&a[2]))?),
                &make,
            );
            both(
                &format!("linear_gelu without bias tanh={tanh} {shape:?} -> {out}"),
                &|a| taper_kernels::linear_gelu(&a[0], &a[1], None, tanh),
                &|a| act(taper_kernels::linear_composed(&a[0], &a[1], None)?),
                &no_bias,
            );
        }
    }
    // A frozen weight: the gradient still reaches x.
    let mut r = Rng(5);
    let (x, w) = (r.tensor(&[4, 6], 1.0, DType::F32), r.tensor(&[3, 6], 1.0, DType::F32));
    parity(
        "linear, frozen weight",
        &|a| taper_kernels::linear(&a[0], &a[1], None),
        &|a| taper_kernels::linear_composed(&a[0], &a[1], None),
        &[inp(x), constant(w)],
        1e-5,
    );
}

/// The forwards agree with candle's to a few f32 ulps of the output's scale: the same
/// expressions, with an exp and erf that vectorise instead of libm's.
#[test]
fn forwards_match_candle_activations_to_a_few_ulps() {
    let x = Rng(1).tensor(&[4, 513], 3.0, DType::F32);
    let u = Rng(2).tensor(&[4, 513], 1.0, DType::F32);
    let same = |what: &str, a: Tensor, b: Tensor| {
        let (a, b): (Vec<f32>, Vec<f32>) =
            (a.flatten_all().unwrap().to_vec1().unwrap(), b.flatten_all().unwrap().to_vec1().unwrap());
        for (x, y) in a.iter().zip(&b) {
            assert!((x - y).abs() <= 1e-6 * (1.0 + y.abs()), "{what}: {x} vs candle's {y}");
        }
    };
    same("gelu_erf", taper_kernels::gelu_erf(&x).unwrap(), x.gelu_erf().unwrap());
    same("gelu_tanh", taper_kernels::gelu_tanh(&x).unwrap(), x.gelu().unwrap());
    same("swiglu", taper_kernels::swiglu(&x, &u).unwrap(), (x.silu().unwrap() * &u).unwrap());
}

#[test]
fn linear_cross_entropy_in_chunks() {
    let ignore = -100i64;
    // (N, C, V, rows per chunk): chunks that do not divide N, one row, one chunk for all.
    for (n, c, v, rows) in [(10, 6, 13, 3), (1, 4, 1029, 0), (7, 5, 9, 7), (5, 3, 4, 2)] {
        let mut r = Rng(n as u64 * 7 + v as u64);
        let targets: Vec<i64> =
            (0..n).map(|i| if i % 4 == 1 { ignore } else { (r.uniform() * v as f64) as i64 % v as i64 }).collect();
        let targets = Tensor::new(targets.as_slice(), &Device::Cpu).unwrap();
        let make = |dtype: DType| {
            let mut r = Rng(n as u64 + c as u64);
            vec![inp(r.tensor(&[n, c], 1.0, dtype)), inp(r.tensor(&[v, c], 0.5, dtype))]
        };
        let fused = |a: &[Tensor]| -> Result<Tensor> {
            Ok(taper_kernels::linear_cross_entropy(&a[0], &a[1], &targets, ignore, rows)?.0)
        };
        let composed = |a: &[Tensor]| ref_cross_entropy(&a[0].matmul(&a[1].t()?)?, &targets, ignore);
        both(&format!("linear_cross_entropy {n}x{c}x{v}/{rows}"), &fused, &composed, &make);
        // A frozen head (LoRA, a frozen embedding) or frozen hidden states: the forward forms
        // only the gradient that is wanted.
        let mut r = Rng(3);
        let (h, w) = (r.tensor(&[n, c], 1.0, DType::F32), r.tensor(&[v, c], 0.5, DType::F32));
        for (label, inputs) in [
            ("frozen head", [inp(h.clone()), constant(w.clone())]),
            ("frozen hidden", [constant(h.clone()), inp(w.clone())]),
            ("no gradient", [constant(h), constant(w)]),
        ] {
            parity(&format!("linear_cross_entropy {label} {n}x{c}x{v}"), &fused, &composed, &inputs, 1e-5);
        }
    }
}

/// Under a bf16 or f16 matmul precision, the fused linear (with and without its GELU), the
/// linear + cross-entropy and their composed forms give the f32 composed results to within their operands' rounding,
/// forward and every gradient: bf16 keeps 8 bits of mantissa (a relative step of 2^-8 = 0.0039
/// per operand), f16 11 bits (2^-11). Each error is relative to the largest value, so the bound
/// is a few steps, and each must also exceed f32's error (the low precision really ran). A
/// loss scale forms the cross-entropy's gradients at that size and divides it back out.
#[test]
fn low_precision_matmuls_stay_within_their_rounding_of_f32() {
    use taper_kernels::{set_loss_scale, set_matmul_precision, Precision};
    let ignore = -100i64;
    let targets = Tensor::new(&[3i64, 0, ignore, 40, 7, 63, 1, 2, 5, 9, 11, 12], &Device::Cpu).unwrap();
    let ce = |a: &[Tensor]| -> Result<Tensor> {
        Ok(taper_kernels::linear_cross_entropy(&a[0], &a[1], &targets, ignore, 5)?.0)
    };
    let ce_ref = |a: &[Tensor]| ref_cross_entropy(&a[0].matmul(&a[1].t()?)?, &targets, ignore);
    let chunked = |a: &[Tensor]| taper_kernels::linear_cross_entropy_chunked(&a[0], &a[1], &targets, ignore);
    let composed = |a: &[Tensor]| taper_kernels::linear_composed(&a[0], &a[1], Some(&a[2]));
    let lin = |a: &[Tensor]| taper_kernels::linear(&a[0], &a[1], Some(&a[2]));
    let lin_ref = |a: &[Tensor]| taper_kernels::linear_composed(&a[0], &a[1], Some(&a[2]));
    let gelu = |a: &[Tensor]| taper_kernels::linear_gelu(&a[0], &a[1], Some(&a[2]), false);
    let gelu_ref = |a: &[Tensor]| taper_kernels::linear_composed(&a[0], &a[1], Some(&a[2]))?.gelu_erf();
    let mut r = Rng(11);
    let x = r.tensor(&[3, 12, 70], 1.0, DType::F32);
    let (w, b) = (r.tensor(&[40, 70], 0.3, DType::F32), r.tensor(&[40], 0.5, DType::F32));
    let (h, head) = (r.tensor(&[12, 70], 1.0, DType::F32), r.tensor(&[64, 70], 0.3, DType::F32));
    // The composed forms (other devices, the device-generic path) cast to the precision around
    // candle's matmul, whose product is rounded too: the same bound holds.
    let cases: [(&str, Op, Op, Vec<Tensor>); 5] = [
        ("linear", &lin, &lin_ref, vec![x.clone(), w.clone(), b.clone()]),
        ("linear_composed", &composed, &lin_ref, vec![x.clone(), w.clone(), b.clone()]),
        ("linear_gelu", &gelu, &gelu_ref, vec![x, w, b]),
        ("linear_cross_entropy", &ce, &ce_ref, vec![h.clone(), head.clone()]),
        ("linear_cross_entropy_chunked", &chunked, &ce_ref, vec![h, head]),
    ];
    for (p, step) in [(Precision::Bf16, 2f64.powi(-8)), (Precision::F16, 2f64.powi(-11))] {
        for scale in [1.0, 1024.0] {
            for (name, fused, composed, values) in &cases {
                let inputs: Vec<Input> = values.iter().map(|t| inp(t.clone())).collect();
                let (y2, g2) = run(*composed, &inputs, 7).unwrap();
                let (y1, g1) = {
                    let _p = set_matmul_precision(p);
                    let _s = set_loss_scale(scale);
                    run(*fused, &inputs, 7).unwrap()
                };
                let mut errs = vec![max_rel_err(&y1, &y2)];
                errs.extend(g1.iter().zip(&g2).map(|(a, b)| max_rel_err(a.as_ref().unwrap(), b.as_ref().unwrap())));
                for (i, e) in errs.iter().enumerate() {
                    assert!(*e < 4.0 * step, "{p:?} x{scale} {name}: output {i} (0 forward) off by {e}");
                }
                assert!(errs.iter().any(|e| *e > 1e-5), "{p:?} {name}: no rounding visible ({errs:?})");
            }
        }
    }
}
