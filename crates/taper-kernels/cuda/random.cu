// Philox4x32-10 uniforms, the CUDA twin of src/random.rs (same bits for the same key and
// index): thread i computes block counter (i, stream) and writes elements 4i .. 4i+3.
#include <stdint.h>

#define PHILOX_M0 0xD2511F53u
#define PHILOX_M1 0xCD9E8D57u
#define PHILOX_W0 0x9E3779B9u
#define PHILOX_W1 0xBB67AE85u

__device__ __forceinline__ uint4 philox4x32_10(uint4 c, uint32_t k0, uint32_t k1) {
#pragma unroll
    for (int round = 0; round < 10; ++round) {
        if (round > 0) {
            k0 += PHILOX_W0;
            k1 += PHILOX_W1;
        }
        const uint32_t hi0 = __umulhi(PHILOX_M0, c.x), lo0 = PHILOX_M0 * c.x;
        const uint32_t hi1 = __umulhi(PHILOX_M1, c.z), lo1 = PHILOX_M1 * c.z;
        c = make_uint4(hi1 ^ c.y ^ k0, lo1, hi0 ^ c.w ^ k1, lo0);
    }
    return c;
}

__device__ __forceinline__ float philox_unit(uint32_t x) {
    return (float)(x >> 8) * (1.0f / 16777216.0f);
}

extern "C" __global__ void philox_uniform_f32(float *out, uint64_t n, uint32_t k0, uint32_t k1,
                                              uint32_t stream) {
    const uint64_t block = (uint64_t)blockIdx.x * blockDim.x + threadIdx.x;
    const uint64_t i = block * 4;
    if (i >= n) {
        return;
    }
    const uint4 r = philox4x32_10(make_uint4((uint32_t)block, (uint32_t)(block >> 32), stream, 0u), k0, k1);
    const uint32_t v[4] = {r.x, r.y, r.z, r.w};
    for (int j = 0; j < 4 && i + j < n; ++j) {
        out[i + j] = philox_unit(v[j]);
    }
}
