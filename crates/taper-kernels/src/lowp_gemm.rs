//! GEMMs on operands rounded to bf16 or f16, accumulated in f32.
//!
//! Where the CPU has AVX512-BF16, bf16 products run on `vdpbf16ps`: each 32-bit lane takes a
//! pair of bf16 from each operand along k and adds both products to an f32 accumulator, twice
//! the multiply-adds of an f32 FMA per instruction. Operands are packed as such pairs: B (k, n)
//! in panels of 32 columns, each pair of k rows interleaved column by column; A (m, k) in
//! micro-panels of 6 rows, each row's pair one 32-bit word to broadcast. A 6 x 32 tile of C
//! lives in 12 zmm registers over a block of k. Without the instruction (or for f16, which has
//! no dot-product instruction on these CPUs) the operands are rounded to the precision and
//! multiplied by the f32 GEMM: the same products, exact in f32, summed in another order.

use crate::float::Float;
use crate::precision::Precision;
use rayon::prelude::*;

/// `gemm_new` with both operands rounded to `p` when T is f32 and `p` is not.
pub(crate) fn gemm_new_in<T: Float>(
    p: Precision,
    mnk: (usize, usize, usize),
    lhs: &[T],
    ls: (usize, usize),
    rhs: &[T],
    rs: (usize, usize),
) -> Vec<T> {
    match (p, as_f32(lhs), as_f32(rhs)) {
        (Precision::Bf16 | Precision::F16, Some(a), Some(b)) => {
            let (m, n, _) = mnk;
            let mut out = vec![0f32; m * n];
            gemm_rounded(p, &mut out, mnk, false, a, ls, b, rs);
            from_f32(out)
        }
        _ => crate::linear::gemm_new(mnk, lhs, ls, rhs, rs),
    }
}

/// `gemm_acc` (dst (m, n) += lhs · rhs) with both operands rounded to `p` when T is f32.
pub(crate) fn gemm_acc_in<T: Float>(
    p: Precision,
    dst: &mut [T],
    mnk: (usize, usize, usize),
    lhs: &[T],
    ls: (usize, usize),
    rhs: &[T],
    rs: (usize, usize),
) {
    match (p, as_f32(lhs), as_f32(rhs), as_f32_mut(dst)) {
        (Precision::Bf16 | Precision::F16, Some(a), Some(b), Some(d)) => gemm_rounded(p, d, mnk, true, a, ls, b, rs),
        _ => crate::linear::gemm_acc(dst, mnk, lhs, ls, rhs, rs),
    }
}

fn as_f32<T: 'static>(x: &[T]) -> Option<&[f32]> {
    // SAFETY: T is f32 itself, checked by its type id.
    (std::any::TypeId::of::<T>() == std::any::TypeId::of::<f32>())
        .then(|| unsafe { std::slice::from_raw_parts(x.as_ptr() as *const f32, x.len()) })
}

fn as_f32_mut<T: 'static>(x: &mut [T]) -> Option<&mut [f32]> {
    // SAFETY: T is f32 itself, checked by its type id.
    (std::any::TypeId::of::<T>() == std::any::TypeId::of::<f32>())
        .then(|| unsafe { std::slice::from_raw_parts_mut(x.as_mut_ptr() as *mut f32, x.len()) })
}

fn from_f32<T: Float>(v: Vec<f32>) -> Vec<T> {
    assert_eq!(std::any::TypeId::of::<T>(), std::any::TypeId::of::<f32>());
    let mut v = std::mem::ManuallyDrop::new(v);
    // SAFETY: T is f32 (asserted): same layout, the vector's allocation handed over whole.
    unsafe { Vec::from_raw_parts(v.as_mut_ptr() as *mut T, v.len(), v.capacity()) }
}

/// dst (m, n) = [dst +] round(lhs) (m, k) · round(rhs) (k, n), operands given by (row, column)
/// strides, f32 accumulation.
#[allow(clippy::too_many_arguments)]
pub(crate) fn gemm_rounded(
    p: Precision,
    dst: &mut [f32],
    (m, n, k): (usize, usize, usize),
    accumulate: bool,
    lhs: &[f32],
    ls: (usize, usize),
    rhs: &[f32],
    rs: (usize, usize),
) {
    if m * n == 0 {
        return;
    }
    assert!(dst.len() >= m * n, "gemm: destination too small");
    if k == 0 {
        if !accumulate {
            dst[..m * n].fill(0.0);
        }
        return;
    }
    assert!(lhs.len() > (m - 1) * ls.0 + (k - 1) * ls.1, "gemm: lhs out of bounds");
    assert!(rhs.len() > (k - 1) * rs.0 + (n - 1) * rs.1, "gemm: rhs out of bounds");
    #[cfg(target_arch = "x86_64")]
    if p == Precision::Bf16 && avx512bf16::available() {
        // SAFETY: the CPU has the instructions; the asserts above bound every access.
        unsafe { avx512bf16::gemm(dst, (m, n, k), accumulate, lhs, ls, rhs, rs) };
        return;
    }
    // The rounded operands, contiguous, through the f32 GEMM.
    let a: Vec<f32> = (0..m * k).into_par_iter().map(|i| p.round(lhs[(i / k) * ls.0 + (i % k) * ls.1])).collect();
    let b: Vec<f32> = (0..k * n).into_par_iter().map(|i| p.round(rhs[(i / n) * rs.0 + (i % n) * rs.1])).collect();
    if !accumulate {
        dst[..m * n].fill(0.0);
    }
    crate::linear::gemm_acc(&mut dst[..m * n], (m, n, k), &a, (k, 1), &b, (n, 1));
}

/// Whether bf16 GEMMs run on the CPU's bf16 dot-product instructions here.
pub fn bf16_native() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        avx512bf16::available()
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

#[cfg(target_arch = "x86_64")]
mod avx512bf16 {
    use rayon::prelude::*;
    use std::arch::x86_64::*;

    /// Rows of a micro-tile (one broadcast each) and columns (two zmm of 16 lanes).
    const MR: usize = 6;
    const NR: usize = 32;
    /// Pairs of k per block and rows per task. A block of 256 pairs (a B panel block of 32 KB,
    /// read from L2 as it streams through the tile) keeps C in registers over most of k: at the
    /// reference model's shapes on 2 threads, 283-313 GFLOP/s against 227-285 with blocks of
    /// 64 pairs and 197-206 for the f32 GEMM (best of 7, in turn).
    const KC: usize = 256;
    const MC: usize = 4 * MR;

    pub(super) fn available() -> bool {
        static HAS: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
        *HAS.get_or_init(|| is_x86_feature_detected!("avx512f") && is_x86_feature_detected!("avx512bf16"))
    }

    /// Packs `lanes` lanes (from `lane0`) of an operand in bf16 bits, element (kk, lane) at
    /// kk * strides.0 + lane * strides.1, as pair words: word q * width + lane holds
    /// (kk = 2q, 2q + 1), zero past k. Both B's panels (lanes: columns) and A's micro-panels
    /// (lanes: rows) are this; the loop runs along whichever dim is contiguous.
    fn pack_pairs(
        src: &[u16],
        k: usize,
        (ks, ls): (usize, usize),
        lane0: usize,
        lanes: usize,
        width: usize,
        out: &mut [u32],
    ) {
        let kp = k.div_ceil(2);
        if ks == 1 {
            // Each lane is a contiguous run along k (x's and dY's rows, W's rows read as Wᵀ).
            for l in 0..lanes {
                for (q, pair) in src[(lane0 + l) * ls..][..k].chunks(2).enumerate() {
                    out[q * width + l] = pair_word(pair);
                }
            }
        } else if ls == 1 {
            // The lanes are contiguous at each kk: two such runs make a run of pair words.
            for q in 0..kp {
                let lo = &src[2 * q * ks + lane0..][..lanes];
                let words = &mut out[q * width..][..lanes];
                if 2 * q + 1 < k {
                    let hi = &src[(2 * q + 1) * ks + lane0..][..lanes];
                    for ((o, &l), &h) in words.iter_mut().zip(lo).zip(hi) {
                        *o = l as u32 | (h as u32) << 16;
                    }
                } else {
                    for (o, &l) in words.iter_mut().zip(lo) {
                        *o = l as u32;
                    }
                }
            }
        } else {
            for q in 0..kp {
                for l in 0..lanes {
                    let at = |kk: usize| if kk < k { src[kk * ks + (lane0 + l) * ls] as u32 } else { 0 };
                    out[q * width + l] = at(2 * q) | at(2 * q + 1) << 16;
                }
            }
        }
    }

    /// Two bf16 along k as one word, the first in the low half; a lone last one pairs with 0.
    #[inline(always)]
    fn pair_word(pair: &[u16]) -> u32 {
        pair[0] as u32 | (pair.get(1).copied().unwrap_or(0) as u32) << 16
    }

    /// `src` as bf16 bits (to nearest, ties to even), 16 values an instruction.
    fn convert(src: &[f32]) -> Vec<u16> {
        const CHUNK: usize = 1 << 14;
        let mut out = vec![0u16; src.len()];
        out.par_chunks_mut(CHUNK).zip(src.par_chunks(CHUNK)).for_each(|(o, s)| {
            // SAFETY: only reached where the CPU has AVX512F and AVX512-BF16.
            unsafe { convert_chunk(s, o) }
        });
        out
    }

    #[target_feature(enable = "avx512f,avx512bf16")]
    unsafe fn convert_chunk(src: &[f32], dst: &mut [u16]) {
        let n = src.len().min(dst.len());
        let mut i = 0;
        while i + 16 <= n {
            // SAFETY: i + 16 <= n elements of both slices.
            unsafe {
                let h = _mm512_cvtneps_pbh(_mm512_loadu_ps(src.as_ptr().add(i)));
                _mm256_storeu_si256(
                    dst.as_mut_ptr().add(i) as *mut __m256i,
                    std::mem::transmute::<__m256bh, __m256i>(h),
                );
            }
            i += 16;
        }
        for j in i..n {
            dst[j] = half::bf16::from_f32(src[j]).to_bits();
        }
    }

    /// # Safety
    /// The CPU has AVX512F and AVX512-BF16; dst holds m * n, and the operands' strides stay in
    /// bounds (the caller asserted both).
    pub(super) unsafe fn gemm(
        dst: &mut [f32],
        (m, n, k): (usize, usize, usize),
        accumulate: bool,
        lhs: &[f32],
        ls: (usize, usize),
        rhs: &[f32],
        rs: (usize, usize),
    ) {
        let kp = k.div_ceil(2);
        let panels = n.div_ceil(NR);
        // Both operands in bf16 first, as laid out (one vector pass each); packing then moves
        // 16-bit values.
        let lhs = convert(&lhs[..=(m - 1) * ls.0 + (k - 1) * ls.1]);
        let rhs = convert(&rhs[..=(k - 1) * rs.0 + (n - 1) * rs.1]);
        // B packed as pair words: panel j, pair q at ((j * kp) + q) * NR; word c holds
        // (B[2q][c], B[2q+1][c]), zero beyond k and n. Each loop runs along B's contiguous dim.
        let mut b = vec![0u32; panels * kp * NR];
        b.par_chunks_mut(kp * NR).enumerate().for_each(|(j, panel)| {
            pack_pairs(&rhs, k, (rs.0, rs.1), j * NR, NR.min(n - j * NR), NR, panel);
        });
        let b = &b;
        dst[..m * n].par_chunks_mut(MC * n).enumerate().for_each(|(blk, rows)| {
            let r0 = blk * MC;
            let mc = rows.len() / n;
            let micro = mc.div_ceil(MR);
            // A packed: micro-panel i, pair q at ((i * kp) + q) * MR; word r holds
            // (A[r][2q], A[r][2q+1]), zero beyond k and m.
            let mut a = vec![0u32; micro * kp * MR];
            for i in 0..micro {
                let out = &mut a[i * kp * MR..][..kp * MR];
                pack_pairs(&lhs, k, (ls.1, ls.0), r0 + i * MR, MR.min(mc - i * MR), MR, out);
            }
            for q0 in (0..kp).step_by(KC) {
                let kc = KC.min(kp - q0);
                let add = accumulate || q0 > 0;
                for j in 0..panels {
                    let bp = b[(j * kp + q0) * NR..].as_ptr() as *const u16;
                    let nr = NR.min(n - j * NR);
                    for i in 0..micro {
                        let mr = MR.min(mc - i * MR);
                        let ap = a[(i * kp + q0) * MR..].as_ptr();
                        let c = rows[i * MR * n + j * NR..].as_mut_ptr();
                        // SAFETY: the packs hold kc pairs from these offsets; the tile's mr
                        // rows of nr columns lie inside `rows` (row stride n).
                        unsafe { tile(kc, ap, bp, c, n, mr, nr, add) };
                    }
                }
            }
        });
    }

    #[test]
    #[ignore = "a timing to read by hand (no assertion): cargo test --release -p taper-kernels --lib speed -- --ignored --nocapture --test-threads=1"]
    fn tile_speed() {
        if !available() {
            return;
        }
        let kc = 128;
        let a = vec![0x3f80_3f80u32; kc * MR];
        let b = vec![0x3f80u16; kc * 2 * NR];
        let mut c = vec![0f32; MR * NR];
        let reps = 200_000;
        let t = std::time::Instant::now();
        for _ in 0..reps {
            unsafe { tile(kc, a.as_ptr(), b.as_ptr(), c.as_mut_ptr(), NR, MR, NR, true) };
        }
        let s = t.elapsed().as_secs_f64();
        eprintln!("tile: {:.1} GFLOP/s on one core", (2 * MR * NR * 2 * kc * reps) as f64 / s / 1e9);
    }

    /// C (mr, nr; row stride ldc) = [C +] the 6 x 32 tile of kc pairs.
    #[target_feature(enable = "avx512f,avx512bf16")]
    #[allow(clippy::too_many_arguments)]
    unsafe fn tile(kc: usize, a: *const u32, b: *const u16, c: *mut f32, ldc: usize, mr: usize, nr: usize, add: bool) {
        let mut acc = [[_mm512_setzero_ps(); 2]; MR];
        for q in 0..kc {
            // SAFETY (whole body): the caller vouches for kc pairs of both packs and the tile.
            let (b0, b1): (__m512bh, __m512bh) = unsafe {
                let bq = b.add(q * 2 * NR);
                (
                    std::mem::transmute::<__m512i, __m512bh>(_mm512_loadu_si512(bq as *const __m512i)),
                    std::mem::transmute::<__m512i, __m512bh>(_mm512_loadu_si512(bq.add(NR) as *const __m512i)),
                )
            };
            for (r, row) in acc.iter_mut().enumerate() {
                let w = unsafe { *a.add(q * MR + r) };
                let av = std::mem::transmute::<__m512i, __m512bh>(_mm512_set1_epi32(w as i32));
                row[0] = _mm512_dpbf16_ps(row[0], av, b0);
                row[1] = _mm512_dpbf16_ps(row[1], av, b1);
            }
        }
        if mr == MR && nr == NR {
            for (r, row) in acc.iter().enumerate() {
                unsafe {
                    let cr = c.add(r * ldc);
                    let (mut lo, mut hi) = (row[0], row[1]);
                    if add {
                        lo = _mm512_add_ps(lo, _mm512_loadu_ps(cr));
                        hi = _mm512_add_ps(hi, _mm512_loadu_ps(cr.add(16)));
                    }
                    _mm512_storeu_ps(cr, lo);
                    _mm512_storeu_ps(cr.add(16), hi);
                }
            }
            return;
        }
        let mut tmp = [0f32; MR * NR];
        for (r, row) in acc.iter().enumerate() {
            unsafe {
                _mm512_storeu_ps(tmp.as_mut_ptr().add(r * NR), row[0]);
                _mm512_storeu_ps(tmp.as_mut_ptr().add(r * NR + 16), row[1]);
            }
        }
        for r in 0..mr {
            for col in 0..nr {
                unsafe {
                    let cp = c.add(r * ldc + col);
                    *cp = if add { *cp + tmp[r * NR + col] } else { tmp[r * NR + col] };
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The f64 product of the rounded operands and, per element, the sum of |products|.
    fn reference(p: Precision, (m, n, k): (usize, usize, usize), a: &[f32], b: &[f32]) -> (Vec<f64>, Vec<f64>) {
        let mut out = (vec![0f64; m * n], vec![0f64; m * n]);
        for i in 0..m {
            for j in 0..n {
                for l in 0..k {
                    let prod = p.round(a[i * k + l]) as f64 * p.round(b[l * n + j]) as f64;
                    out.0[i * n + j] += prod;
                    out.1[i * n + j] += prod.abs();
                }
            }
        }
        out
    }

    /// Against an f64 sum of the rounded operands' products: only f32 accumulation error is
    /// left (relative to the sum of |products|), at shapes with ragged edges in m, n and k,
    /// transposed operands, and accumulation onto dst.
    #[test]
    fn rounded_gemm_is_the_rounded_operands_product() {
        let mut seed = 1u64;
        let mut next = || {
            seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            ((seed >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
        };
        for p in [Precision::Bf16, Precision::F16] {
            for (m, n, k) in [(1, 1, 1), (7, 33, 5), (13, 70, 257), (100, 40, 300), (6, 32, 256)] {
                let a: Vec<f32> = (0..m * k).map(|_| next()).collect();
                let b: Vec<f32> = (0..k * n).map(|_| next()).collect();
                let (want, size) = reference(p, (m, n, k), &a, &b);
                // The classic bound on a k-term f32 sum: k eps sum |terms| (plus the +1 below).
                let check = |got: &[f32], what: &str| {
                    for ((g, w), s) in got.iter().zip(&want).zip(&size) {
                        let bound = (k as f64 + 1.0) * f32::EPSILON as f64 * (s + 1.0);
                        assert!((*g as f64 - w).abs() <= bound, "{p:?} {m}x{n}x{k} {what}: {g} vs {w}");
                    }
                };
                let mut out = vec![0f32; m * n];
                gemm_rounded(p, &mut out, (m, n, k), false, &a, (k, 1), &b, (n, 1));
                check(&out, "plain");
                // The same product from transposed storage: aᵀ stored (k, m), bᵀ stored (n, k).
                let at: Vec<f32> = (0..k * m).map(|i| a[(i % m) * k + i / m]).collect();
                let bt: Vec<f32> = (0..n * k).map(|i| b[(i % k) * n + i / k]).collect();
                let mut out = vec![1f32; m * n];
                gemm_rounded(p, &mut out, (m, n, k), true, &at, (1, m), &bt, (1, k));
                let less_one: Vec<f32> = out.iter().map(|v| v - 1.0).collect();
                check(&less_one, "transposed, accumulated");
            }
        }
    }

    /// Rounding is what changes: the bf16 product differs from the f32 one by about bf16's
    /// precision, and the f16 product by about f16's.
    #[test]
    fn low_precision_products_differ_from_f32_by_their_rounding() {
        let (m, n, k) = (8, 8, 64);
        let a: Vec<f32> = (0..m * k).map(|i| ((i * 37 % 101) as f32 / 101.0) + 0.5).collect();
        let b: Vec<f32> = (0..k * n).map(|i| ((i * 53 % 97) as f32 / 97.0) + 0.5).collect();
        let exact = reference(Precision::F32, (m, n, k), &a, &b).0;
        for (p, lo, hi) in [(Precision::Bf16, 1e-5, 2f64.powi(-7)), (Precision::F16, 1e-7, 2f64.powi(-10))] {
            let mut out = vec![0f32; m * n];
            gemm_rounded(p, &mut out, (m, n, k), false, &a, (k, 1), &b, (n, 1));
            let rel = out.iter().zip(&exact).map(|(g, w)| ((*g as f64 - w) / w).abs()).fold(0f64, f64::max);
            assert!(rel > lo && rel < hi, "{p:?}: relative difference {rel} outside ({lo}, {hi})");
        }
    }
}

#[cfg(test)]
mod speed {
    use super::*;
    /// The bf16 GEMM against the f32 one at the reference model's shapes, best of 7.
    #[test]
    #[ignore = "a timing to read by hand (no assertion): cargo test --release -p taper-kernels --lib speed -- --ignored --nocapture --test-threads=1"]
    fn speed() {
        for (m, k, n) in [(2048, 384, 1152), (2048, 1536, 384), (384, 2048, 1536), (2048, 384, 8192)] {
            let a: Vec<f32> = (0..m * k).map(|i| (i % 7) as f32 * 0.1).collect();
            let b: Vec<f32> = (0..k * n).map(|i| (i % 5) as f32 * 0.1).collect();
            let time = |f: &dyn Fn()| {
                f();
                let mut best = f64::MAX;
                for _ in 0..7 {
                    let t = std::time::Instant::now();
                    f();
                    best = best.min(t.elapsed().as_secs_f64());
                }
                2.0 * (m * n * k) as f64 / best / 1e9
            };
            let f32g = time(&|| {
                crate::linear::gemm_new((m, n, k), &a, (k, 1), &b, (n, 1));
            });
            let bf = time(&|| {
                let mut out = vec![0f32; m * n];
                gemm_rounded(Precision::Bf16, &mut out, (m, n, k), false, &a, (k, 1), &b, (n, 1));
            });
            eprintln!("{m}x{k}x{n}: f32 {f32g:.0} GFLOP/s, bf16 {bf:.0}");
        }
    }
}
