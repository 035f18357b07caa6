// GELU(u + b) over a linear's (n, o) product u with the bias b (o) added on the way, and its
// backward, the CUDA half of src/linear.rs's linear_gelu (cuBLAS forms u): one pass over the
// product instead of an add and a GELU. Computed in f32; u + b is rounded to the stored type
// before the GELU, as the composed add stores it, so the two paths agree.
//
// The GELU and its derivative are act.cu's, included whole so that the two cannot drift apart
// (its kernels come along into this module unused).
#include "act.cu"

template <typename T> __device__ __forceinline__ float biased(const T *u, const T *b, uint64_t i, uint64_t o) {
    return to_f32(from_f32<T>(to_f32(u[i]) + to_f32(b[i % o])));
}

template <typename T, bool TANH> __device__ void bias_gelu_fwd(const T *u, const T *b, T *y, uint64_t n, uint64_t o) {
    const uint64_t i = (uint64_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    const float v = biased(u, b, i, o);
    y[i] = from_f32<T>(TANH ? gelu_tanh_f(v) : gelu_erf_f(v));
}

// du = g GELU'(u + b); the bias's gradient is du summed over rows (src/linear.rs).
template <typename T, bool TANH>
__device__ void bias_gelu_bwd(const T *u, const T *b, const T *g, T *du, uint64_t n, uint64_t o) {
    const uint64_t i = (uint64_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    const float v = biased(u, b, i, o);
    du[i] = from_f32<T>(to_f32(g[i]) * (TANH ? gelu_tanh_df(v) : gelu_erf_df(v)));
}

#define LINEAR(T, S)                                                                                                   \
    extern "C" __global__ void bias_gelu_erf_fwd_##S(const T *u, const T *b, T *y, uint64_t n, uint64_t o) {          \
        bias_gelu_fwd<T, false>(u, b, y, n, o);                                                                        \
    }                                                                                                                  \
    extern "C" __global__ void bias_gelu_tanh_fwd_##S(const T *u, const T *b, T *y, uint64_t n, uint64_t o) {         \
        bias_gelu_fwd<T, true>(u, b, y, n, o);                                                                         \
    }                                                                                                                  \
    extern "C" __global__ void bias_gelu_erf_bwd_##S(const T *u, const T *b, const T *g, T *du, uint64_t n,           \
                                                     uint64_t o) {                                                     \
        bias_gelu_bwd<T, false>(u, b, g, du, n, o);                                                                    \
    }                                                                                                                  \
    extern "C" __global__ void bias_gelu_tanh_bwd_##S(const T *u, const T *b, const T *g, T *du, uint64_t n,          \
                                                      uint64_t o) {                                                    \
        bias_gelu_bwd<T, true>(u, b, g, du, n, o);                                                                     \
    }
FOR_EACH_DTYPE(LINEAR)
