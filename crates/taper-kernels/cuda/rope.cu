// Rotary embedding in the rotate-half layout and its transpose, the twins of src/rope.rs: one
// thread per pair (i, i + D/2) of a head vector, computed in f32 whatever the stored type.
#include "common.cuh"

// x (B, H, T, D) rotated by the tables cos, sin (Bc, T, D), Bc 1 or B. Forward:
//   y1 = x1 cos1 - x2 sin1, y2 = x2 cos2 + x1 sin2;
// backward (the transpose, x the incoming gradient):
//   y1 = x1 cos1 + x2 sin2, y2 = x2 cos2 - x1 sin1.
template <typename T>
__device__ void rope(const T *x, const T *cos, const T *sin, T *y, uint64_t rows, uint64_t h, uint64_t t, uint64_t d,
                     uint64_t cb, int backward) {
    const uint64_t half = d / 2;
    const uint64_t idx = (uint64_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (idx >= rows * half) return;
    const uint64_t r = idx / half, i = idx % half;
    const uint64_t bi = r / (h * t), ti = r % t;
    const uint64_t tr = (cb == 1 ? 0 : bi) * t + ti;
    const T *cr = cos + tr * d;
    const T *sr = sin + tr * d;
    const float x1 = to_f32(x[r * d + i]), x2 = to_f32(x[r * d + half + i]);
    const float c1 = to_f32(cr[i]), c2 = to_f32(cr[half + i]);
    const float s1 = to_f32(sr[i]), s2 = to_f32(sr[half + i]);
    float y1, y2;
    if (backward) {
        y1 = x1 * c1 + x2 * s2;
        y2 = x2 * c2 - x1 * s1;
    } else {
        y1 = x1 * c1 - x2 * s1;
        y2 = x2 * c2 + x1 * s2;
    }
    y[r * d + i] = from_f32<T>(y1);
    y[r * d + half + i] = from_f32<T>(y2);
}

#define ROPE(T, S)                                                                                                     \
    extern "C" __global__ void rope_##S(const T *x, const T *cos, const T *sin, T *y, uint64_t rows, uint64_t h,       \
                                        uint64_t t, uint64_t d, uint64_t cb, int backward) {                           \
        rope<T>(x, cos, sin, y, rows, h, t, d, cb, backward);                                                          \
    }
FOR_EACH_DTYPE(ROPE)
