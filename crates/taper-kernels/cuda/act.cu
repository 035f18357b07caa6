// GELU (erf and tanh forms) and SwiGLU with their backward, the twins of src/act.rs: one
// thread per element, computed in f32 whatever the stored type.
#include "common.cuh"

#define SQRT_2_OVER_PI 0.7978845608028654f
#define INV_SQRT_2PI 0.3989422804014327f
#define GELU_C 0.044715f

__device__ __forceinline__ float gelu_erf_f(float v) { return 0.5f * v * (1.0f + erff(v * 0.7071067811865476f)); }

__device__ __forceinline__ float gelu_erf_df(float v) {
    return 0.5f * (1.0f + erff(v * 0.7071067811865476f)) + v * INV_SQRT_2PI * expf(-0.5f * v * v);
}

__device__ __forceinline__ float sigmoidf(float v) { return 1.0f / (1.0f + expf(-v)); }

__device__ __forceinline__ float tanh_arg(float v) { return SQRT_2_OVER_PI * v * (1.0f + GELU_C * v * v); }

// v σ(2u) = v (1 + tanh u) / 2, as the CPU kernel writes it.
__device__ __forceinline__ float gelu_tanh_f(float v) { return v * sigmoidf(2.0f * tanh_arg(v)); }

__device__ __forceinline__ float gelu_tanh_df(float v) {
    const float s = sigmoidf(2.0f * tanh_arg(v));
    return s + v * s * (1.0f - s) * 2.0f * SQRT_2_OVER_PI * (1.0f + 3.0f * GELU_C * v * v);
}

template <typename T, bool TANH> __device__ void gelu_fwd(const T *x, T *y, uint64_t n) {
    const uint64_t i = (uint64_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    const float v = to_f32(x[i]);
    y[i] = from_f32<T>(TANH ? gelu_tanh_f(v) : gelu_erf_f(v));
}

template <typename T, bool TANH> __device__ void gelu_bwd(const T *x, const T *g, T *dx, uint64_t n) {
    const uint64_t i = (uint64_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    const float v = to_f32(x[i]);
    dx[i] = from_f32<T>(to_f32(g[i]) * (TANH ? gelu_tanh_df(v) : gelu_erf_df(v)));
}

// silu(gate) * up.
template <typename T> __device__ void swiglu_fwd(const T *gate, const T *up, T *y, uint64_t n) {
    const uint64_t i = (uint64_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    const float g = to_f32(gate[i]);
    y[i] = from_f32<T>(g / (1.0f + expf(-g)) * to_f32(up[i]));
}

// out = [dgate; dup], 2n elements.
template <typename T> __device__ void swiglu_bwd(const T *gate, const T *up, const T *grad, T *out, uint64_t n) {
    const uint64_t i = (uint64_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    const float g = to_f32(gate[i]), u = to_f32(up[i]), o = to_f32(grad[i]);
    const float s = sigmoidf(g);
    out[i] = from_f32<T>(o * u * s * (1.0f + g * (1.0f - s)));
    out[n + i] = from_f32<T>(o * g * s);
}

#define ACT(T, S)                                                                                                      \
    extern "C" __global__ void gelu_erf_fwd_##S(const T *x, T *y, uint64_t n) { gelu_fwd<T, false>(x, y, n); }          \
    extern "C" __global__ void gelu_tanh_fwd_##S(const T *x, T *y, uint64_t n) { gelu_fwd<T, true>(x, y, n); }          \
    extern "C" __global__ void gelu_erf_bwd_##S(const T *x, const T *g, T *dx, uint64_t n) {                            \
        gelu_bwd<T, false>(x, g, dx, n);                                                                                \
    }                                                                                                                  \
    extern "C" __global__ void gelu_tanh_bwd_##S(const T *x, const T *g, T *dx, uint64_t n) {                           \
        gelu_bwd<T, true>(x, g, dx, n);                                                                                 \
    }                                                                                                                  \
    extern "C" __global__ void swiglu_fwd_##S(const T *gate, const T *up, T *y, uint64_t n) {                           \
        swiglu_fwd<T>(gate, up, y, n);                                                                                  \
    }                                                                                                                  \
    extern "C" __global__ void swiglu_bwd_##S(const T *gate, const T *up, const T *grad, T *out, uint64_t n) {          \
        swiglu_bwd<T>(gate, up, grad, out, n);                                                                          \
    }
FOR_EACH_DTYPE(ACT)
