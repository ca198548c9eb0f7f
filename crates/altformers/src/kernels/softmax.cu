// Softmax over the last dimension with its backward, for nn::softmax on a GPU (attention
// probabilities on the unfused path: widths the flash kernel does not take, f32 runs).
// candle's softmax is about five launches forward (max, subtract, exp, sum, divide) and
// more backward; here one each. One warp per row; f32 arithmetic for f32 or bf16 data.
//   y = exp(x - max) / sum exp(x - max),   dx = (g - sum(g y)) y
#include <cuda_bf16.h>
#include <math.h>

#include "convert.cuh"

namespace {

__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
    return v;
}

template <typename T>
__device__ __forceinline__ void softmax_fwd(const T* __restrict__ x, T* __restrict__ y, long long rows, int d) {
    const int lane = threadIdx.x % 32;
    const long long warps = (long long)gridDim.x * blockDim.x / 32;
    for (long long r = ((long long)blockIdx.x * blockDim.x + threadIdx.x) / 32; r < rows; r += warps) {
        const T* xr = x + r * d;
        float m = -INFINITY;
        for (int c = lane; c < d; c += 32) m = fmaxf(m, to_f32(xr[c]));
        m = warp_max(m);
        // a row of -inf (everything masked) gives 0/0 = NaN, as the tensor expression does
        float s = 0.f;
        for (int c = lane; c < d; c += 32) s += __expf(to_f32(xr[c]) - m);
        const float inv = 1.f / warp_sum(s);
        T* yr = y + r * d;
        for (int c = lane; c < d; c += 32) yr[c] = from_f32<T>(__expf(to_f32(xr[c]) - m) * inv);
    }
}

template <typename T>
__device__ __forceinline__ void softmax_bwd(const T* __restrict__ y, const T* __restrict__ g, T* __restrict__ dx,
                                            long long rows, int d) {
    const int lane = threadIdx.x % 32;
    const long long warps = (long long)gridDim.x * blockDim.x / 32;
    for (long long r = ((long long)blockIdx.x * blockDim.x + threadIdx.x) / 32; r < rows; r += warps) {
        const T* yr = y + r * d;
        const T* gr = g + r * d;
        float dot = 0.f;
        for (int c = lane; c < d; c += 32) dot += to_f32(gr[c]) * to_f32(yr[c]);
        dot = warp_sum(dot);
        T* dxr = dx + r * d;
        for (int c = lane; c < d; c += 32) dxr[c] = from_f32<T>((to_f32(gr[c]) - dot) * to_f32(yr[c]));
    }
}

}  // namespace

#define SOFTMAX_ENTRY_POINTS(SUFFIX, T)                                                                          \
    extern "C" __global__ void softmax_fwd_##SUFFIX(const T* x, T* y, long long rows, int d) {                 \
        softmax_fwd<T>(x, y, rows, d);                                                                           \
    }                                                                                                            \
    extern "C" __global__ void softmax_bwd_##SUFFIX(const T* y, const T* g, T* dx, long long rows, int d) {    \
        softmax_bwd<T>(y, g, dx, rows, d);                                                                       \
    }

SOFTMAX_ENTRY_POINTS(f32, float)
SOFTMAX_ENTRY_POINTS(bf16, __nv_bfloat16)
