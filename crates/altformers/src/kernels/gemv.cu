// y = x W^T for a few rows of x (decoding: one row per sequence), W: [N, K] row-major as a
// linear layer stores it. One warp per output column streams W's row with 16-byte loads and
// keeps one f32 sum per row of x. cuBLAS runs a general GEMM here: in bf16 at one row it
// was slower than f32 (bench/results/2026-12-03-h200-decode), and a decoding step is a
// dozen such products per layer.
#include <cuda_bf16.h>

#include "convert.cuh"
#include "elementwise.cuh"

#define GEMV_MAX_ROWS 8

template <typename T>
__device__ void gemv(const T* __restrict__ x, const T* __restrict__ w, T* __restrict__ y, int rows, int k, int n) {
    constexpr int V = 16 / sizeof(T);
    const int col = (blockIdx.x * blockDim.x + threadIdx.x) >> 5;
    const int lane = threadIdx.x & 31;
    if (col >= n) return;
    const T* wr = w + (long long)col * k;
    float acc[GEMV_MAX_ROWS];
#pragma unroll
    for (int r = 0; r < GEMV_MAX_ROWS; ++r) acc[r] = 0.f;
    if (k % V == 0 && aligned16(w) && aligned16(x)) {
        for (int c = lane * V; c < k; c += 32 * V) {
            const uint4 wraw = *reinterpret_cast<const uint4*>(wr + c);
            const T* we = reinterpret_cast<const T*>(&wraw);
#pragma unroll
            for (int r = 0; r < GEMV_MAX_ROWS; ++r) {
                if (r < rows) {
                    const uint4 xraw = *reinterpret_cast<const uint4*>(x + (long long)r * k + c);
                    const T* xe = reinterpret_cast<const T*>(&xraw);
#pragma unroll
                    for (int j = 0; j < V; ++j) acc[r] += to_f32(we[j]) * to_f32(xe[j]);
                }
            }
        }
    } else {
        for (int c = lane; c < k; c += 32) {
            const float wv = to_f32(wr[c]);
#pragma unroll
            for (int r = 0; r < GEMV_MAX_ROWS; ++r)
                if (r < rows) acc[r] += wv * to_f32(x[(long long)r * k + c]);
        }
    }
#pragma unroll
    for (int r = 0; r < GEMV_MAX_ROWS; ++r) {
        if (r < rows) {
            const float v = warp_sum(acc[r]);
            if (lane == 0) y[(long long)r * n + col] = from_f32<T>(v);
        }
    }
}

extern "C" __global__ void gemv_f32(const float* x, const float* w, float* y, int rows, int k, int n) {
    gemv(x, w, y, rows, k, n);
}
extern "C" __global__ void gemv_bf16(const __nv_bfloat16* x, const __nv_bfloat16* w, __nv_bfloat16* y, int rows, int k,
                                     int n) {
    gemv(x, w, y, rows, k, n);
}
