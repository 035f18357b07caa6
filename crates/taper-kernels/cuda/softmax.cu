// Softmax and log-softmax over the last dim with their backward, the twins of src/softmax.rs:
// one block per row, computed in f32 whatever the stored type.
#include "common.cuh"

// softmax: y = exp(x - max) / Σ exp(x - max); log: y = x - (max + log Σ exp(x - max)).
template <typename T> __device__ void softmax_fwd(const T *x, T *y, uint64_t rows, uint64_t c, int is_log) {
    __shared__ float scratch[32];
    const uint64_t r = blockIdx.x;
    if (r >= rows) return;
    const T *xr = x + r * c;
    T *yr = y + r * c;
    float m = -INFINITY;
    for (uint64_t j = threadIdx.x; j < c; j += blockDim.x) m = fmaxf(m, to_f32(xr[j]));
    const float max = block_max(m, scratch);
    float s = 0.0f;
    for (uint64_t j = threadIdx.x; j < c; j += blockDim.x) s += expf(to_f32(xr[j]) - max);
    const float sum = block_sum(s, scratch);
    if (is_log) {
        const float shift = max + logf(sum);
        for (uint64_t j = threadIdx.x; j < c; j += blockDim.x) yr[j] = from_f32<T>(to_f32(xr[j]) - shift);
    } else {
        const float inv = 1.0f / sum;
        for (uint64_t j = threadIdx.x; j < c; j += blockDim.x) yr[j] = from_f32<T>(expf(to_f32(xr[j]) - max) * inv);
    }
}

// dx from (y, g): softmax y (g - Σ g y); log-softmax g - exp(y) Σ g.
template <typename T>
__device__ void softmax_bwd(const T *y, const T *g, T *dx, uint64_t rows, uint64_t c, int is_log) {
    __shared__ float scratch[32];
    const uint64_t r = blockIdx.x;
    if (r >= rows) return;
    const T *yr = y + r * c;
    const T *gr = g + r * c;
    T *dr = dx + r * c;
    float s = 0.0f;
    for (uint64_t j = threadIdx.x; j < c; j += blockDim.x) s += is_log ? to_f32(gr[j]) : to_f32(gr[j]) * to_f32(yr[j]);
    const float sum = block_sum(s, scratch);
    for (uint64_t j = threadIdx.x; j < c; j += blockDim.x) {
        const float yv = to_f32(yr[j]), gv = to_f32(gr[j]);
        dr[j] = from_f32<T>(is_log ? gv - expf(yv) * sum : yv * (gv - sum));
    }
}

#define SOFTMAX(T, S)                                                                                                  \
    extern "C" __global__ void softmax_fwd_##S(const T *x, T *y, uint64_t rows, uint64_t c, int is_log) {              \
        softmax_fwd<T>(x, y, rows, c, is_log);                                                                         \
    }                                                                                                                  \
    extern "C" __global__ void softmax_bwd_##S(const T *y, const T *g, T *dx, uint64_t rows, uint64_t c, int is_log) { \
        softmax_bwd<T>(y, g, dx, rows, c, is_log);                                                                     \
    }
FOR_EACH_DTYPE(SOFTMAX)
