// Flash-style attention for training, the CUDA twin of src/attention.rs: the forward keeps the
// output and one logsumexp per query row; the backward rebuilds the probabilities from q, k and
// that logsumexp. Plain tiled CUDA C, f32 accumulation whatever the stored type:
//   flash_fwd   one block per (query tile of 64 rows, query head, batch row), 4 threads per row
//               (each owning every 4th column of the head), keys 32 at a time through shared
//               memory, an online softmax (running max and sum) per row.
//   flash_di    D_i = rowsum(dO ∘ O), one warp per row.
//   flash_dq    dq like the forward: per query tile, over key tiles, dq += dS k.
//   flash_dkdv  one block per (key tile of 32, key/value head, batch row), 8 threads per key,
//               over the query tiles of every query head of its group: dv += Pᵀ dO, dk += dSᵀ q.
// Both gradients are owned by one block each, so nothing is added atomically.
//
// Element (batch r, head h, position t, column c) of q, o, dO and dq sits at
//   r·Hq·Tq·D + h·q_sh + t·q_st + c, and of k, v, dk and dv at r·Hkv·Tk·D + h·k_sh + t·k_st + c,
// which covers both the (B, H, T, D) layout and the projections' (B, T, H·D).
// The logsumexp and D_i are f32 (B, Hq, Tq).
#include "common.cuh"

// The masks follow RowMask in src/attention.rs exactly: query i sits at position
// p = Tk - Tq + i; causal keeps keys j <= p, a window keeps p - j < window, a padding key
// (pad[j] != 0) is never seen, and with segments a query sees the keys of its own segment,
// or, with segment 0, only the key at its own position. A row that sees no key gets a zero
// output, logsumexp -inf and no gradient.
struct AttnDims {
    int64_t b, hq, hkv, tq, tk;
    int64_t q_sh, q_st, k_sh, k_st;
    int64_t window; // 0: none
    int32_t causal;
    float scale;
};

// The keys [lo, hi) a query row may see, and the segment they must carry (has_seg).
struct RowKeys {
    int64_t lo, hi;
    uint32_t seg;
    bool has_seg;
};

__device__ __forceinline__ RowKeys no_keys() { return RowKeys{0, 0, 0u, false}; }

// qseg points at this batch row's Tq query segments (or is null).
__device__ __forceinline__ RowKeys row_keys(const AttnDims &p, const uint32_t *qseg, int64_t i) {
    const int64_t pos = p.tk - p.tq + i;
    int64_t lo = 0, hi = p.tk;
    if (p.causal) hi = min(hi, pos + 1);
    if (p.window > 0) lo = max(lo, pos - p.window + 1);
    RowKeys r{0, 0, 0u, false};
    if (qseg) {
        const uint32_t s = qseg[i];
        if (s == 0) {
            lo = max(lo, pos);
            hi = min(hi, pos + 1);
        } else {
            r.seg = s;
            r.has_seg = true;
        }
    }
    lo = min(max(lo, (int64_t)0), p.tk);
    hi = min(max(hi, (int64_t)0), p.tk);
    r.lo = lo;
    r.hi = max(hi, lo);
    return r;
}

// Whether the row sees key j (pad and kseg point at this batch row's Tk entries, or are null).
__device__ __forceinline__ bool sees(const RowKeys &r, int64_t j, const uint8_t *pad, const uint32_t *kseg) {
    if (j < r.lo || j >= r.hi) return false;
    if (pad && pad[j]) return false;
    if (r.has_seg && kseg && kseg[j] != r.seg) return false;
    return true;
}

#define FULL_MASK 0xffffffffu

// The sum over the G adjacent lanes that share a row (G a power of two dividing 32): every one
// of them gets the same value, since float addition commutes.
template <int G> __device__ __forceinline__ float group_sum(float v) {
#pragma unroll
    for (int o = 1; o < G; o <<= 1) v += __shfl_xor_sync(FULL_MASK, v, o);
    return v;
}

constexpr int BQ = 64;         // query rows per block of the forward and of dq
constexpr int BK = 32;         // keys per shared-memory tile of the forward and of dq
constexpr int TPR = 4;         // threads per query row
constexpr int NT = BQ * TPR;   // threads per block
constexpr int BKV = 32;        // keys per block of dk, dv
constexpr int TPK = 8;         // threads per key
constexpr int BQV = 32;        // query rows per shared-memory tile of dk, dv
constexpr int NTKV = BKV * TPK; // threads per block of dk, dv

// The range of keys that some row of the block sees, [lo, hi) (empty: lo = hi = 0). Every
// thread of the block must call it.
__device__ __forceinline__ void block_span(const RowKeys &r, bool leader, int64_t &lo, int64_t &hi) {
    __shared__ long long s_lo, s_hi;
    if (threadIdx.x == 0) {
        s_lo = LLONG_MAX;
        s_hi = 0;
    }
    __syncthreads();
    if (leader && r.lo < r.hi) {
        atomicMin(&s_lo, (long long)r.lo);
        atomicMax(&s_hi, (long long)r.hi);
    }
    __syncthreads();
    lo = s_lo;
    hi = s_hi;
    if (hi <= lo) lo = hi = 0;
}

// Keys k0..k0+BK of this head into shared memory as f32, zeros past Tk.
template <typename T, int D>
__device__ __forceinline__ void stage_keys(const T *src, int64_t stride, int64_t k0, int64_t tk, float (*dst)[D]) {
    for (int e = threadIdx.x; e < BK * D; e += NT) {
        const int jj = e / D, c = e % D;
        const int64_t j = k0 + jj;
        dst[jj][c] = j < tk ? to_f32(src[j * stride + c]) : 0.0f;
    }
}

template <typename T, int D>
__device__ void flash_fwd(const T *q, const T *k, const T *v, const uint8_t *pad, const uint32_t *qseg,
                          const uint32_t *kseg, T *o, float *lse, AttnDims p) {
    constexpr int DS = D / TPR;
    __shared__ float ks[BK][D];
    __shared__ float vs[BK][D];
    const int tid = threadIdx.x, rr = tid / TPR, s = tid % TPR;
    const int64_t bi = blockIdx.z, h = blockIdx.y, i = (int64_t)blockIdx.x * BQ + rr;
    const int64_t g = h / (p.hq / p.hkv);
    const bool live = i < p.tq;
    const T *qh = q + bi * p.hq * p.tq * D + h * p.q_sh;
    const T *kh = k + bi * p.hkv * p.tk * D + g * p.k_sh;
    const T *vh = v + bi * p.hkv * p.tk * D + g * p.k_sh;
    const uint8_t *padr = pad ? pad + bi * p.tk : nullptr;
    const uint32_t *ksr = kseg ? kseg + bi * p.tk : nullptr;
    const RowKeys row = live ? row_keys(p, qseg ? qseg + bi * p.tq : nullptr, i) : no_keys();
    int64_t lo, hi;
    block_span(row, s == 0, lo, hi);

    float qr[DS], acc[DS];
#pragma unroll
    for (int c = 0; c < DS; c++) {
        qr[c] = live ? to_f32(qh[i * p.q_st + s + TPR * c]) : 0.0f;
        acc[c] = 0.0f;
    }
    float m = -INFINITY, l = 0.0f;
    for (int64_t k0 = lo - lo % BK; k0 < hi; k0 += BK) {
        __syncthreads(); // the previous tile is consumed
        stage_keys<T, D>(kh, p.k_st, k0, p.tk, ks);
        stage_keys<T, D>(vh, p.k_st, k0, p.tk, vs);
        __syncthreads();
        float sc[BK];
        float mx = -INFINITY;
#pragma unroll
        for (int jj = 0; jj < BK; jj++) {
            float part = 0.0f;
#pragma unroll
            for (int c = 0; c < DS; c++) part += qr[c] * ks[jj][s + TPR * c];
            part = group_sum<TPR>(part);
            sc[jj] = sees(row, k0 + jj, padr, ksr) ? part * p.scale : -INFINITY;
            mx = fmaxf(mx, sc[jj]);
        }
        if (mx == -INFINITY) continue; // this row sees none of these keys
        const float mnew = fmaxf(m, mx);
        const float alpha = expf(m - mnew); // 0 on the first visible tile (m = -inf)
        l *= alpha;
#pragma unroll
        for (int c = 0; c < DS; c++) acc[c] *= alpha;
        m = mnew;
#pragma unroll
        for (int jj = 0; jj < BK; jj++) {
            const float pj = expf(sc[jj] - m); // masked: exp(-inf) = 0
            l += pj;
#pragma unroll
            for (int c = 0; c < DS; c++) acc[c] += pj * vs[jj][s + TPR * c];
        }
    }
    if (!live) return;
    const float inv = l > 0.0f ? 1.0f / l : 0.0f;
    T *oh = o + bi * p.hq * p.tq * D + h * p.q_sh + i * p.q_st;
#pragma unroll
    for (int c = 0; c < DS; c++) oh[s + TPR * c] = from_f32<T>(acc[c] * inv);
    if (s == 0) lse[(bi * p.hq + h) * p.tq + i] = l > 0.0f ? m + logf(l) : -INFINITY;
}

// D_i = rowsum(dO ∘ O) over B·Hq·Tq rows, 8 rows (warps) to a block of 256.
template <typename T, int D>
__device__ void flash_di(const T *o, const T *g, float *di, AttnDims p) {
    const int64_t row = (int64_t)blockIdx.x * 8 + threadIdx.x / 32;
    const int lane = threadIdx.x % 32;
    if (row >= p.b * p.hq * p.tq) return; // whole warps leave together
    const int64_t bi = row / (p.hq * p.tq), h = (row / p.tq) % p.hq, i = row % p.tq;
    const int64_t at = bi * p.hq * p.tq * D + h * p.q_sh + i * p.q_st;
    float acc = 0.0f;
    for (int c = lane; c < D; c += 32) acc += to_f32(o[at + c]) * to_f32(g[at + c]);
    acc = warp_sum(acc);
    if (lane == 0) di[row] = acc;
}

// dq = scale · Σ_j P_ij (dP_ij - D_i) k_j, with P_ij = exp(scale q_i·k_j - lse_i) and
// dP_ij = dO_i·v_j, one block per (query tile, query head, batch row) as in the forward.
template <typename T, int D>
__device__ void flash_dq(const T *q, const T *k, const T *v, const T *g, const float *lse, const float *di,
                         const uint8_t *pad, const uint32_t *qseg, const uint32_t *kseg, T *dq, AttnDims p) {
    constexpr int DS = D / TPR;
    __shared__ float ks[BK][D];
    __shared__ float vs[BK][D];
    const int tid = threadIdx.x, rr = tid / TPR, s = tid % TPR;
    const int64_t bi = blockIdx.z, h = blockIdx.y, i = (int64_t)blockIdx.x * BQ + rr;
    const int64_t gk = h / (p.hq / p.hkv);
    const bool live = i < p.tq;
    const int64_t qoff = bi * p.hq * p.tq * D + h * p.q_sh;
    const T *kh = k + bi * p.hkv * p.tk * D + gk * p.k_sh;
    const T *vh = v + bi * p.hkv * p.tk * D + gk * p.k_sh;
    const uint8_t *padr = pad ? pad + bi * p.tk : nullptr;
    const uint32_t *ksr = kseg ? kseg + bi * p.tk : nullptr;
    const float li = live ? lse[(bi * p.hq + h) * p.tq + i] : -INFINITY;
    const float dii = live ? di[(bi * p.hq + h) * p.tq + i] : 0.0f;
    // A row whose logsumexp is -inf saw no key in the forward: no gradient.
    const RowKeys row = li == -INFINITY ? no_keys() : row_keys(p, qseg ? qseg + bi * p.tq : nullptr, i);
    int64_t lo, hi;
    block_span(row, s == 0, lo, hi);

    float qr[DS], gr[DS], acc[DS];
#pragma unroll
    for (int c = 0; c < DS; c++) {
        qr[c] = live ? to_f32(q[qoff + i * p.q_st + s + TPR * c]) : 0.0f;
        gr[c] = live ? to_f32(g[qoff + i * p.q_st + s + TPR * c]) : 0.0f;
        acc[c] = 0.0f;
    }
    for (int64_t k0 = lo - lo % BK; k0 < hi; k0 += BK) {
        __syncthreads();
        stage_keys<T, D>(kh, p.k_st, k0, p.tk, ks);
        stage_keys<T, D>(vh, p.k_st, k0, p.tk, vs);
        __syncthreads();
#pragma unroll 4
        for (int jj = 0; jj < BK; jj++) {
            float sp = 0.0f, dp = 0.0f;
#pragma unroll
            for (int c = 0; c < DS; c++) {
                sp += qr[c] * ks[jj][s + TPR * c];
                dp += gr[c] * vs[jj][s + TPR * c];
            }
            sp = group_sum<TPR>(sp);
            dp = group_sum<TPR>(dp);
            const float pij = sees(row, k0 + jj, padr, ksr) ? expf(sp * p.scale - li) : 0.0f;
            const float ds = pij * (dp - dii) * p.scale;
#pragma unroll
            for (int c = 0; c < DS; c++) acc[c] += ds * ks[jj][s + TPR * c];
        }
    }
    if (!live) return;
#pragma unroll
    for (int c = 0; c < DS; c++) dq[qoff + i * p.q_st + s + TPR * c] = from_f32<T>(acc[c]);
}

// dv_j = Σ_i P_ij dO_i and dk_j = scale · Σ_i P_ij (dP_ij - D_i) q_i over the query rows of
// every query head sharing this key/value head. dkv holds dk then dv, each (B, Hkv, Tk, D)
// elements in k's layout.
template <typename T, int D>
__device__ void flash_dkdv(const T *q, const T *k, const T *v, const T *g, const float *lse, const float *di,
                           const uint8_t *pad, const uint32_t *qseg, const uint32_t *kseg, T *dkv, AttnDims p) {
    constexpr int DS = D / TPK;
    __shared__ float qs[BQV][D];
    __shared__ float gs[BQV][D];
    __shared__ float lse_s[BQV], di_s[BQV];
    __shared__ RowKeys rows[BQV];
    const int tid = threadIdx.x, jj = tid / TPK, s = tid % TPK;
    const int64_t bi = blockIdx.z, gk = blockIdx.y, j0 = (int64_t)blockIdx.x * BKV, j = j0 + jj;
    const bool live = j < p.tk;
    const int64_t rep = p.hq / p.hkv;
    const int64_t koff = bi * p.hkv * p.tk * D + gk * p.k_sh + j * p.k_st;
    const uint8_t *padr = pad ? pad + bi * p.tk : nullptr;
    const uint32_t *ksr = kseg ? kseg + bi * p.tk : nullptr;
    const uint32_t *qsr = qseg ? qseg + bi * p.tq : nullptr;

    float kr[DS], vr[DS], dk[DS], dv[DS];
#pragma unroll
    for (int c = 0; c < DS; c++) {
        kr[c] = live ? to_f32(k[koff + s + TPK * c]) : 0.0f;
        vr[c] = live ? to_f32(v[koff + s + TPK * c]) : 0.0f;
        dk[c] = 0.0f;
        dv[c] = 0.0f;
    }
    for (int64_t hh = 0; hh < rep; hh++) {
        const int64_t h = gk * rep + hh;
        const int64_t qoff = bi * p.hq * p.tq * D + h * p.q_sh;
        const int64_t roff = (bi * p.hq + h) * p.tq;
        for (int64_t i0 = 0; i0 < p.tq; i0 += BQV) {
            __syncthreads(); // the previous tile is consumed
            bool overlaps = false;
            if (tid < BQV) {
                const int64_t i = i0 + tid;
                const float li = i < p.tq ? lse[roff + i] : -INFINITY;
                const RowKeys r = li == -INFINITY ? no_keys() : row_keys(p, qsr, i);
                rows[tid] = r;
                lse_s[tid] = li;
                di_s[tid] = i < p.tq ? di[roff + i] : 0.0f;
                overlaps = r.lo < r.hi && r.lo < j0 + BKV && r.hi > j0;
            }
            if (!__syncthreads_or(overlaps)) continue; // no row of this tile sees these keys
            for (int e = tid; e < BQV * D; e += NTKV) {
                const int ii = e / D, c = e % D;
                const int64_t i = i0 + ii;
                qs[ii][c] = i < p.tq ? to_f32(q[qoff + i * p.q_st + c]) : 0.0f;
                gs[ii][c] = i < p.tq ? to_f32(g[qoff + i * p.q_st + c]) : 0.0f;
            }
            __syncthreads();
#pragma unroll 4
            for (int ii = 0; ii < BQV; ii++) {
                float sp = 0.0f, dp = 0.0f;
#pragma unroll
                for (int c = 0; c < DS; c++) {
                    sp += kr[c] * qs[ii][s + TPK * c];
                    dp += vr[c] * gs[ii][s + TPK * c];
                }
                sp = group_sum<TPK>(sp);
                dp = group_sum<TPK>(dp);
                const RowKeys r = rows[ii];
                const float pij = live && sees(r, j, padr, ksr) ? expf(sp * p.scale - lse_s[ii]) : 0.0f;
                const float ds = pij * (dp - di_s[ii]) * p.scale;
#pragma unroll
                for (int c = 0; c < DS; c++) {
                    dv[c] += pij * gs[ii][s + TPK * c];
                    dk[c] += ds * qs[ii][s + TPK * c];
                }
            }
        }
    }
    if (!live) return;
    const int64_t nk = p.b * p.hkv * p.tk * D;
#pragma unroll
    for (int c = 0; c < DS; c++) {
        dkv[koff + s + TPK * c] = from_f32<T>(dk[c]);
        dkv[nk + koff + s + TPK * c] = from_f32<T>(dv[c]);
    }
}

#define FLASH(T, S, D)                                                                                                 \
    extern "C" __global__ void __launch_bounds__(NT)                                                                   \
        flash_fwd_d##D##_##S(const T *q, const T *k, const T *v, const uint8_t *pad, const uint32_t *qseg,             \
                             const uint32_t *kseg, T *o, float *lse, AttnDims p) {                                     \
        flash_fwd<T, D>(q, k, v, pad, qseg, kseg, o, lse, p);                                                          \
    }                                                                                                                  \
    extern "C" __global__ void flash_di_d##D##_##S(const T *o, const T *g, float *di, AttnDims p) {                    \
        flash_di<T, D>(o, g, di, p);                                                                                   \
    }                                                                                                                  \
    extern "C" __global__ void __launch_bounds__(NT)                                                                   \
        flash_dq_d##D##_##S(const T *q, const T *k, const T *v, const T *g, const float *lse, const float *di,         \
                            const uint8_t *pad, const uint32_t *qseg, const uint32_t *kseg, T *dq, AttnDims p) {       \
        flash_dq<T, D>(q, k, v, g, lse, di, pad, qseg, kseg, dq, p);                                                   \
    }                                                                                                                  \
    extern "C" __global__ void __launch_bounds__(NTKV)                                                                 \
        flash_dkdv_d##D##_##S(const T *q, const T *k, const T *v, const T *g, const float *lse, const float *di,       \
                              const uint8_t *pad, const uint32_t *qseg, const uint32_t *kseg, T *dkv, AttnDims p) {    \
        flash_dkdv<T, D>(q, k, v, g, lse, di, pad, qseg, kseg, dkv, p);                                                \
    }
#define FLASH_64(T, S) FLASH(T, S, 64)
#define FLASH_128(T, S) FLASH(T, S, 128)
FOR_EACH_DTYPE(FLASH_64)
FOR_EACH_DTYPE(FLASH_128)
