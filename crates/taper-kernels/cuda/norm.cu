// LayerNorm and RMSNorm over rows of C with their backward, the twins of src/norm.rs: one block
// per row for the rows' statistics, computed in f32 whatever the stored type.
#include "common.cuh"

// Rows per partial sum of dw and db: each (column, chunk of rows) adds its rows in order, and
// the chunks are added in order after, so that a run is reproducible bit for bit.
#define NORM_GRAD_ROWS 64

// (mean, 1 / sqrt(var + eps)) of one row, in every thread; the mean is 0 for RMSNorm.
template <typename T>
__device__ __forceinline__ float2 row_stats(const T *x, uint64_t c, bool rms, float eps, float *scratch) {
    float mean = 0.0f;
    if (!rms) {
        float s = 0.0f;
        for (uint64_t j = threadIdx.x; j < c; j += blockDim.x) s += to_f32(x[j]);
        mean = block_sum(s, scratch) / (float)c;
    }
    float s = 0.0f;
    for (uint64_t j = threadIdx.x; j < c; j += blockDim.x) {
        const float d = to_f32(x[j]) - mean;
        s += d * d;
    }
    const float var = block_sum(s, scratch) / (float)c;
    return make_float2(mean, 1.0f / sqrtf(var + eps));
}

// y = (x - mean) rstd w (+ b) for the rows of x (rows, c); b is read only when has_b.
template <typename T>
__device__ void norm_fwd(const T *x, const T *w, const T *b, T *y, uint64_t rows, uint64_t c, int rms, int has_b,
                         float eps) {
    __shared__ float scratch[32];
    const uint64_t r = blockIdx.x;
    if (r >= rows) return;
    const T *xr = x + r * c;
    T *yr = y + r * c;
    const float2 st = row_stats(xr, c, rms != 0, eps, scratch);
    for (uint64_t j = threadIdx.x; j < c; j += blockDim.x) {
        float v = (to_f32(xr[j]) - st.x) * st.y * to_f32(w[j]);
        if (has_b) v += to_f32(b[j]);
        yr[j] = from_f32<T>(v);
    }
}

// dx = rstd (g w - mean(g w) - xhat mean(g w xhat)) for each row (the first mean 0 for RMSNorm),
// and the row's (mean, rstd) into stats (rows, 2) for the column sums.
template <typename T>
__device__ void norm_bwd_rows(const T *x, const T *w, const T *g, T *dx, float *stats, uint64_t rows, uint64_t c,
                              int rms, float eps) {
    __shared__ float scratch[32];
    const uint64_t r = blockIdx.x;
    if (r >= rows) return;
    const T *xr = x + r * c;
    const T *gr = g + r * c;
    T *dr = dx + r * c;
    const float2 st = row_stats(xr, c, rms != 0, eps, scratch);
    float s1 = 0.0f, s2 = 0.0f;
    for (uint64_t j = threadIdx.x; j < c; j += blockDim.x) {
        const float xhat = (to_f32(xr[j]) - st.x) * st.y;
        const float gw = to_f32(gr[j]) * to_f32(w[j]);
        s1 += gw;
        s2 += gw * xhat;
    }
    s1 = block_sum(s1, scratch);
    s2 = block_sum(s2, scratch);
    const float m1 = rms ? 0.0f : s1 / (float)c;
    const float m2 = s2 / (float)c;
    for (uint64_t j = threadIdx.x; j < c; j += blockDim.x) {
        const float xhat = (to_f32(xr[j]) - st.x) * st.y;
        dr[j] = from_f32<T>(st.y * (to_f32(gr[j]) * to_f32(w[j]) - m1 - xhat * m2));
    }
    if (threadIdx.x == 0) {
        stats[2 * r] = st.x;
        stats[2 * r + 1] = st.y;
    }
}

// partial (chunks, 2, c): [Σ g xhat; Σ g] over the rows of chunk blockIdx.x, for column j of
// the columns blockIdx.y covers (the chunks on x, which allows far more blocks than y).
template <typename T>
__device__ void norm_bwd_partial(const T *x, const T *g, const float *stats, float *partial, uint64_t rows,
                                 uint64_t c) {
    const uint64_t j = (uint64_t)blockIdx.y * blockDim.x + threadIdx.x;
    if (j >= c) return;
    const uint64_t k = blockIdx.x;
    const uint64_t r0 = k * NORM_GRAD_ROWS;
    const uint64_t r1 = r0 + NORM_GRAD_ROWS < rows ? r0 + NORM_GRAD_ROWS : rows;
    float dw = 0.0f, db = 0.0f;
    for (uint64_t r = r0; r < r1; ++r) {
        const float gv = to_f32(g[r * c + j]);
        const float xhat = (to_f32(x[r * c + j]) - stats[2 * r]) * stats[2 * r + 1];
        dw += gv * xhat;
        db += gv;
    }
    partial[k * 2 * c + j] = dw;
    partial[k * 2 * c + c + j] = db;
}

// out (2 c) = Σ over the chunks of partial (chunks, 2 c), in chunk order: [dw; db].
template <typename T> __device__ void norm_bwd_cols(const float *partial, T *out, uint64_t chunks, uint64_t c) {
    const uint64_t j = (uint64_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (j >= 2 * c) return;
    float s = 0.0f;
    for (uint64_t k = 0; k < chunks; ++k) s += partial[k * 2 * c + j];
    out[j] = from_f32<T>(s);
}

#define NORM(T, S)                                                                                                     \
    extern "C" __global__ void norm_fwd_##S(const T *x, const T *w, const T *b, T *y, uint64_t rows, uint64_t c,       \
                                            int rms, int has_b, float eps) {                                           \
        norm_fwd<T>(x, w, b, y, rows, c, rms, has_b, eps);                                                             \
    }                                                                                                                  \
    extern "C" __global__ void norm_bwd_rows_##S(const T *x, const T *w, const T *g, T *dx, float *stats,              \
                                                 uint64_t rows, uint64_t c, int rms, float eps) {                      \
        norm_bwd_rows<T>(x, w, g, dx, stats, rows, c, rms, eps);                                                       \
    }                                                                                                                  \
    extern "C" __global__ void norm_bwd_partial_##S(const T *x, const T *g, const float *stats, float *partial,        \
                                                    uint64_t rows, uint64_t c) {                                       \
        norm_bwd_partial<T>(x, g, stats, partial, rows, c);                                                            \
    }                                                                                                                  \
    extern "C" __global__ void norm_bwd_cols_##S(const float *partial, T *out, uint64_t chunks, uint64_t c) {          \
        norm_bwd_cols<T>(partial, out, chunks, c);                                                                     \
    }
FOR_EACH_DTYPE(NORM)
