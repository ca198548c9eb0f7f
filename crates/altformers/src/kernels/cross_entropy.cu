// Cross-entropy of logits against integer targets, for nn::cross_entropy on a GPU: candle's
// expression (log-softmax: the row max, the shift, exp, the sum, log, the shift again, the
// target's gather; its backward about as many) was about twenty launches over [N, V] and a
// millisecond of a GPT-2-small step; here one pass each way. f32 or bf16 logits, f32 arithmetic.
//
// Forward, one warp per row: lse = log sum_c exp(x_c) (an online max and sum per lane, then
// combined across the warp), loss = lse - x_t; writes the row's loss and lse. A target outside
// [0, V) gives a NaN loss (caught by the trainer's non-finite-loss check, not a fault).
// Backward: dx_c = (exp(x_c - lse) - [c == t]) g, g the row's loss gradient.
#include <cuda_bf16.h>
#include <stdint.h>

#include "convert.cuh"

namespace {

// (max, sum of exp(x - max)) of this lane and another's, combined.
__device__ __forceinline__ void combine(float& m, float& s, float m2, float s2) {
    const float top = fmaxf(m, m2);
    if (top == -INFINITY) return;  // both empty
    s = s * expf(m - top) + s2 * expf(m2 - top);
    m = top;
}

template <typename T>
__device__ __forceinline__ void cross_entropy_fwd(const T* __restrict__ x, const uint32_t* __restrict__ targets,
                                                  float* __restrict__ loss, float* __restrict__ lse, long long rows,
                                                  int v) {
    const int lane = threadIdx.x % 32;
    const long long warps = (long long)gridDim.x * blockDim.x / 32;
    for (long long r = ((long long)blockIdx.x * blockDim.x + threadIdx.x) / 32; r < rows; r += warps) {
        const T* xr = x + r * v;
        float m = -INFINITY, s = 0.f;
        for (int c = lane; c < v; c += 32) {
            const float xc = to_f32(xr[c]);
            if (xc > m) {
                s = s * expf(m - xc) + 1.f;
                m = xc;
            } else {
                s += expf(xc - m);
            }
        }
#pragma unroll
        for (int o = 16; o > 0; o >>= 1) {
            const float m2 = __shfl_xor_sync(0xffffffffu, m, o), s2 = __shfl_xor_sync(0xffffffffu, s, o);
            combine(m, s, m2, s2);
        }
        if (lane == 0) {
            const float l = m + logf(s);
            const uint32_t t = targets[r];
            lse[r] = l;
            loss[r] = t < (uint32_t)v ? l - to_f32(xr[t]) : __int_as_float(0x7fc00000);
        }
    }
}

template <typename T>
__device__ __forceinline__ void cross_entropy_bwd(const T* __restrict__ x, const uint32_t* __restrict__ targets,
                                                  const float* __restrict__ lse, const float* __restrict__ g,
                                                  T* __restrict__ dx, long long rows, int v) {
    const int lane = threadIdx.x % 32;
    const long long warps = (long long)gridDim.x * blockDim.x / 32;
    for (long long r = ((long long)blockIdx.x * blockDim.x + threadIdx.x) / 32; r < rows; r += warps) {
        const T* xr = x + r * v;
        T* dr = dx + r * v;
        const float l = lse[r], gr = g[r];
        const uint32_t t = targets[r];
        for (int c = lane; c < v; c += 32) {
            const float p = expf(to_f32(xr[c]) - l);
            dr[c] = from_f32<T>((p - (c == (int)t ? 1.f : 0.f)) * gr);
        }
    }
}

}  // namespace

#define CROSS_ENTROPY_ENTRY_POINTS(SUFFIX, T)                                                                   \
    extern "C" __global__ void cross_entropy_fwd_##SUFFIX(const T* x, const uint32_t* targets, float* loss,     \
                                                          float* lse, long long rows, int v) {                  \
        cross_entropy_fwd<T>(x, targets, loss, lse, rows, v);                                                   \
    }                                                                                                           \
    extern "C" __global__ void cross_entropy_bwd_##SUFFIX(const T* x, const uint32_t* targets, const float* lse, \
                                                          const float* g, T* dx, long long rows, int v) {       \
        cross_entropy_bwd<T>(x, targets, lse, g, dx, rows, v);                                                  \
    }

CROSS_ENTROPY_ENTRY_POINTS(f32, float)
CROSS_ENTROPY_ENTRY_POINTS(bf16, __nv_bfloat16)
