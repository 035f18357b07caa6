// Cross-entropy over rows of logits (N, V) with i64 targets, and its backward, the twins of
// src/loss.rs: one block per row for the log-sum-exp, computed in f32 whatever the stored type.
// The forward's output is f32 whatever the logits: [mean loss, lse_0 .. lse_{N-1}].
#include "common.cuh"

// out[1 + r] = lse of row r; loss[r] = lse - x[target] on counted rows, 0 on ignored ones. The
// host has checked the targets; one outside [0, V) anyway gives NaN rather than a stray read.
template <typename T>
__device__ void ce_rows(const T *x, const int64_t *targets, float *out, float *loss, uint64_t n, uint64_t v,
                        int64_t ignore) {
    __shared__ float scratch[32];
    const uint64_t r = blockIdx.x;
    if (r >= n) return;
    const T *xr = x + r * v;
    float m = -INFINITY;
    for (uint64_t j = threadIdx.x; j < v; j += blockDim.x) m = fmaxf(m, to_f32(xr[j]));
    const float max = block_max(m, scratch);
    float s = 0.0f;
    for (uint64_t j = threadIdx.x; j < v; j += blockDim.x) s += expf(to_f32(xr[j]) - max);
    const float lse = max + logf(block_sum(s, scratch));
    if (threadIdx.x == 0) {
        const int64_t t = targets[r];
        out[1 + r] = lse;
        if (t == ignore) loss[r] = 0.0f;
        else if (t < 0 || (uint64_t)t >= v) loss[r] = NAN;
        else loss[r] = lse - to_f32(xr[t]);
    }
}

// out[0] = Σ loss / count, one block of CE_SUM_THREADS: each thread adds a strided share in
// f64, and thread 0 adds the shares in order, so that the total is the same on every run.
#define CE_SUM_THREADS 256
extern "C" __global__ void ce_mean(const float *loss, float *out, uint64_t n, uint64_t count) {
    __shared__ double part[CE_SUM_THREADS];
    double s = 0.0;
    for (uint64_t i = threadIdx.x; i < n; i += CE_SUM_THREADS) s += (double)loss[i];
    part[threadIdx.x] = s;
    __syncthreads();
    if (threadIdx.x == 0) {
        double total = 0.0;
        for (int k = 0; k < CE_SUM_THREADS; ++k) total += part[k];
        out[0] = (float)(total / (double)(count > 0 ? count : 1));
    }
}

// dlogits = (exp(x - lse) - onehot(target)) scale on counted rows, 0 on ignored ones; one
// thread per element.
template <typename T>
__device__ void ce_bwd(const T *x, const int64_t *targets, const float *lse, T *dx, uint64_t n, uint64_t v,
                       int64_t ignore, float scale) {
    const uint64_t i = (uint64_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n * v) return;
    const uint64_t r = i / v, j = i % v;
    const int64_t t = targets[r];
    float d = 0.0f;
    if (t != ignore) {
        d = expf(to_f32(x[i]) - lse[r]) * scale;
        if ((int64_t)j == t) d -= scale;
    }
    dx[i] = from_f32<T>(d);
}

#define LOSS(T, S)                                                                                                     \
    extern "C" __global__ void ce_rows_##S(const T *x, const int64_t *targets, float *out, float *loss, uint64_t n,    \
                                           uint64_t v, int64_t ignore) {                                               \
        ce_rows<T>(x, targets, out, loss, n, v, ignore);                                                               \
    }                                                                                                                  \
    extern "C" __global__ void ce_bwd_##S(const T *x, const int64_t *targets, const float *lse, T *dx, uint64_t n,     \
                                          uint64_t v, int64_t ignore, float scale) {                                   \
        ce_bwd<T>(x, targets, lse, dx, n, v, ignore, scale);                                                           \
    }
FOR_EACH_DTYPE(LOSS)
