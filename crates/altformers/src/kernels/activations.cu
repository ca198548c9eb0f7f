// GELU (erf form) and SiLU with their derivatives, one launch each way, and the sum of two
// tensors. candle's forward
// is one launch already, but its backward builds the derivative from about ten (GELU) or six
// (SiLU) elementwise ops, which weighs on small models whose steps are bound by launches.
// f32 arithmetic whatever the dtype (f32 or bf16).
#include <cuda_bf16.h>

#include "convert.cuh"
#include "elementwise.cuh"

namespace {

// gelu(x) = x Phi(x); gelu'(x) = Phi(x) + x phi(x)
__device__ __forceinline__ float gelu(float x) { return 0.5f * x * (1.f + erff(x * 0.70710678118654752f)); }
__device__ __forceinline__ float gelu_grad(float x) {
    return 0.5f * (1.f + erff(x * 0.70710678118654752f)) + x * 0.39894228040143268f * __expf(-0.5f * x * x);
}
// silu(x) = x s(x); silu'(x) = s(x) (1 + x (1 - s(x)))
__device__ __forceinline__ float sigmoid(float x) { return 1.f / (1.f + __expf(-x)); }
__device__ __forceinline__ float silu(float x) { return x * sigmoid(x); }
__device__ __forceinline__ float silu_grad(float x) {
    const float s = sigmoid(x);
    return s * (1.f + x * (1.f - s));
}

}  // namespace

#define ACTIVATION(NAME, SUFFIX, T)                                                                \
    extern "C" __global__ void NAME##_fwd_##SUFFIX(const T* x, T* y, long long n) {                \
        map1(x, y, n, [](float v, long long) { return NAME(v); });                                 \
    }                                                                                              \
    extern "C" __global__ void NAME##_bwd_##SUFFIX(const T* x, const T* g, T* dx, long long n) {   \
        map2(x, g, dx, n, [](float v, float gv, long long) { return gv * NAME##_grad(v); });       \
    }

ACTIVATION(gelu, f32, float)
ACTIVATION(gelu, bf16, __nv_bfloat16)
ACTIVATION(silu, f32, float)
ACTIVATION(silu, bf16, __nv_bfloat16)

// The sum of two tensors of one shape (the residual adds, and the gradient sums of the
// backward): candle's bf16 add moves two bytes a thread, about half the H200's bandwidth
// (bench/results/2026-12-03-h200-train-speed, call 9).
#define SUM2(SUFFIX, T)                                                                           \
    extern "C" __global__ void sum2_##SUFFIX(const T* a, const T* b, T* y, long long n) {         \
        map2(a, b, y, n, [](float u, float v, long long) { return u + v; });                      \
    }

SUM2(f32, float)
SUM2(bf16, __nv_bfloat16)
