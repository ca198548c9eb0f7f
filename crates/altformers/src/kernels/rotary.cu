// Rotary position embeddings (primitives/rotary.rs) in one pass: each pair (x_{2i}, x_{2i+1})
// of a row at position t rotated by the angle whose cos and sin are tables[0][t][i] and
// tables[1][t][i]; `sign` -1 rotates back (the backward). The tensor form took eight
// broadcast products over strided half-width views, a concatenation and their backward: about
// a quarter of RetNet's training step on the GPU (bench/results/2026-12-03-h200-train-speed).
// x, y: [rows, T, d] contiguous (rows = B H); tables: [2, T, d / 2] f32.
#include <cuda_bf16.h>

#include "convert.cuh"

namespace {

template <typename T>
__device__ void rotate(const T* __restrict__ x, const float* __restrict__ tables, T* __restrict__ y,
                       long long pairs, int t, int half, float sign) {
    const long long table = (long long)t * half;
    for (long long p = blockIdx.x * (long long)blockDim.x + threadIdx.x; p < pairs;
         p += (long long)gridDim.x * blockDim.x) {
        const long long at = p % table;  // (position, pair) within the tables
        const float c = tables[at], s = sign * tables[table + at];
        const float x0 = to_f32(x[2 * p]), x1 = to_f32(x[2 * p + 1]);
        y[2 * p] = from_f32<T>(x0 * c - x1 * s);
        y[2 * p + 1] = from_f32<T>(x0 * s + x1 * c);
    }
}

}  // namespace

extern "C" __global__ void rotary_f32(const float* x, const float* tables, float* y, long long pairs, int t,
                                      int half, float sign) {
    rotate(x, tables, y, pairs, t, half, sign);
}

extern "C" __global__ void rotary_bf16(const __nv_bfloat16* x, const float* tables, __nv_bfloat16* y,
                                       long long pairs, int t, int half, float sign) {
    rotate(x, tables, y, pairs, t, half, sign);
}
