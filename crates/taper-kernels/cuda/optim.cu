// AdamW and Lion updates in place, the twins of src/optim.rs, in f32 only (as the CPU ops):
// per tensor (one kernel per state update, as the CPU ops run) and over many tensors at once
// (one launch for a whole model's parameters).
//
// Bit parity with the composed candle ops on the GPU: each candle op is a kernel of its own, so
// each of its results is rounded before the next op reads it; candle's affine (x * mul + add,
// what `tensor * f64` and `tensor + f64` build) is compiled by nvcc to one fma.rn.f32, so it
// rounds once. The updates below therefore spell every operation with an intrinsic that pins
// its rounding (__fmaf_rn for an affine; __fadd_rn, __fsub_rn, __fmul_rn, __fdiv_rn, __fsqrt_rn
// for the rest, which nvcc never contracts into an FMA of its own), in the composed order.
#include "common.cuh"

// candle's affine x * mul + add.
__device__ __forceinline__ float affine(float x, float mul, float add) { return __fmaf_rn(x, mul, add); }

// m + (g - m) a.
__device__ __forceinline__ float lerp_moment(float m, float g, float a) { return __fadd_rn(m, affine(__fsub_rn(g, m), a, 0.0f)); }

// v b + g^2 a.
__device__ __forceinline__ float square_moment(float v, float g, float b, float a) {
    return __fadd_rn(affine(v, b, 0.0f), affine(__fmul_rn(g, g), a, 0.0f));
}

// m b + g a.
__device__ __forceinline__ float linear_moment(float m, float g, float b, float a) {
    return __fadd_rn(affine(m, b, 0.0f), affine(g, a, 0.0f));
}

// w decay - m / (sqrt(v) inv + eps) step, with m and v the moments after this step's update.
__device__ __forceinline__ float adamw_w(float w, float m, float v, float inv, float eps, float decay, float step) {
    const float denom = affine(affine(__fsqrt_rn(v), inv, 0.0f), 1.0f, eps);
    return __fsub_rn(affine(w, decay, 0.0f), affine(__fdiv_rn(m, denom), step, 0.0f));
}

// candle's sign: 1, -1, or 0 (for 0 and NaN).
__device__ __forceinline__ float sign_f(float u) { return (float)(u > 0.0f) - (float)(u < 0.0f); }

// w decay - sign(m b1 + g a) lr, with m the momentum from before this step.
__device__ __forceinline__ float lion_w(float w, float m, float g, float decay, float b1, float a, float lr) {
    const float u = __fadd_rn(affine(m, b1, 0.0f), affine(g, a, 0.0f));
    return __fsub_rn(affine(w, decay, 0.0f), affine(sign_f(u), lr, 0.0f));
}

#define EACH for (uint64_t i = (uint64_t)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (uint64_t)blockDim.x * gridDim.x)

extern "C" __global__ void moment_lerp_f32(float *s, const float *g, float a, uint64_t n) {
    EACH s[i] = lerp_moment(s[i], g[i], a);
}

extern "C" __global__ void moment_square_f32(float *s, const float *g, float b, float a, uint64_t n) {
    EACH s[i] = square_moment(s[i], g[i], b, a);
}

extern "C" __global__ void moment_linear_f32(float *s, const float *g, float b, float a, uint64_t n) {
    EACH s[i] = linear_moment(s[i], g[i], b, a);
}

extern "C" __global__ void adamw_update_f32(float *w, const float *m, const float *v, float inv, float eps, float decay,
                                            float step, uint64_t n) {
    EACH w[i] = adamw_w(w[i], m[i], v[i], inv, eps, decay, step);
}

extern "C" __global__ void lion_update_f32(float *w, const float *m, const float *g, float decay, float b1, float a,
                                           float lr, uint64_t n) {
    EACH w[i] = lion_w(w[i], m[i], g[i], decay, b1, a, lr);
}

// The many-tensor kernels read one table of u64 (built by src/optim.rs), for p tensors cut into
// c chunks of at most `chunk` elements:
//   [0, k p)        k pointers per tensor, tensor-major: (w, m, v, g) for AdamW, (w, m, g) for Lion
//   [k p, (k+1) p)  each tensor's element count
//   [(k+1) p, +c)   each chunk's tensor index
//   [(k+1) p + c, +c) each chunk's first element
// A block takes chunks in a grid-stride loop and its threads the chunk's elements; each element
// belongs to one chunk, so each is updated exactly once.
struct Chunk {
    uint64_t t, start, end;
};

__device__ __forceinline__ Chunk chunk_at(const uint64_t *table, uint64_t k, uint64_t p, uint64_t c, uint64_t ci,
                                          uint64_t chunk) {
    const uint64_t t = table[(k + 1) * p + ci];
    const uint64_t start = table[(k + 1) * p + c + ci];
    const uint64_t n = table[k * p + t];
    return Chunk{t, start, start + chunk < n ? start + chunk : n};
}

extern "C" __global__ void adamw_many_f32(const uint64_t *table, uint64_t p, uint64_t c, uint64_t chunk, float a1,
                                          float b2, float a2, float inv, float eps, float decay, float step) {
    for (uint64_t ci = blockIdx.x; ci < c; ci += gridDim.x) {
        const Chunk ch = chunk_at(table, 4, p, c, ci, chunk);
        float *w = (float *)table[4 * ch.t], *m = (float *)table[4 * ch.t + 1], *v = (float *)table[4 * ch.t + 2];
        const float *g = (const float *)table[4 * ch.t + 3];
        for (uint64_t i = ch.start + threadIdx.x; i < ch.end; i += blockDim.x) {
            const float gi = g[i];
            const float mi = lerp_moment(m[i], gi, a1);
            const float vi = square_moment(v[i], gi, b2, a2);
            m[i] = mi;
            v[i] = vi;
            w[i] = adamw_w(w[i], mi, vi, inv, eps, decay, step);
        }
    }
}

extern "C" __global__ void lion_many_f32(const uint64_t *table, uint64_t p, uint64_t c, uint64_t chunk, float decay,
                                         float b1, float a1, float lr, float b2, float a2) {
    for (uint64_t ci = blockIdx.x; ci < c; ci += gridDim.x) {
        const Chunk ch = chunk_at(table, 3, p, c, ci, chunk);
        float *w = (float *)table[3 * ch.t], *m = (float *)table[3 * ch.t + 1];
        const float *g = (const float *)table[3 * ch.t + 2];
        for (uint64_t i = ch.start + threadIdx.x; i < ch.end; i += blockDim.x) {
            const float gi = g[i], mi = m[i];
            w[i] = lion_w(w[i], mi, gi, decay, b1, a1, lr);
            m[i] = linear_moment(mi, gi, b2, a2);
        }
    }
}
