// Layer normalization over the last dimension with its backward, for nn::LayerNorm on a GPU:
// candle's tensor expression is about ten launches forward and twenty backward per norm (the
// row means, the centring, the variance, the broadcasts and their reductions), which weighs
// on small models whose steps are bound by launches. Statistics and arithmetic are f32
// whatever the activations' dtype (f32 or bf16); weight and bias are f32.
//
// Forward: one warp per row; writes y and the row's mean and 1/std for the backward.
// Backward, with xh = (x - mean) / std and gw = g w:
//   dx = (gw - mean(gw) - xh mean(gw xh)) / std,   dw = sum_rows g xh,   db = sum_rows g.
// One warp per row again. Rows up to 768 wide: each warp adds its columns' dw and db into
// its own slice of shared memory (no atomics), the slices are summed at the end; wider rows
// add into one shared copy with atomics (an atomic per element and row: it made the backward
// three times slower than its bandwidth at width 768, where eight warps add to the same
// columns). Each CTA then adds its sums to the f32 outputs with one
// atomic per column (so the last bits of dw and db vary with the order of CTAs, as with any
// atomic reduction).
#include <cuda_bf16.h>

#include "convert.cuh"

namespace {

// Rows up to this wide sum dw and db per warp in the backward (8 warps x 2 d floats: 48 KB,
// the default shared-memory limit; as PRIVATE_WIDTH in layernorm.rs).
constexpr int kPrivateWidth = 768;

template <typename T>
__device__ __forceinline__ void layer_norm_fwd(const T* __restrict__ x, const float* __restrict__ w,
                                               const float* __restrict__ b, T* __restrict__ y,
                                               float* __restrict__ mean_out, float* __restrict__ rstd_out,
                                               long long rows, int d, float eps, int has_bias) {
    const int lane = threadIdx.x % 32;
    const long long warps = (long long)gridDim.x * blockDim.x / 32;
    for (long long r = ((long long)blockIdx.x * blockDim.x + threadIdx.x) / 32; r < rows; r += warps) {
        const T* xr = x + r * d;
        float s = 0.f;
        for (int c = lane; c < d; c += 32) s += to_f32(xr[c]);
        const float mean = warp_sum(s) / d;
        float v = 0.f;
        for (int c = lane; c < d; c += 32) {
            const float t = to_f32(xr[c]) - mean;
            v += t * t;
        }
        const float rstd = rsqrtf(warp_sum(v) / d + eps);
        T* yr = y + r * d;
        for (int c = lane; c < d; c += 32) {
            const float t = (to_f32(xr[c]) - mean) * rstd * w[c];
            yr[c] = from_f32<T>(has_bias ? t + b[c] : t);
        }
        if (lane == 0) {
            mean_out[r] = mean;
            rstd_out[r] = rstd;
        }
    }
}

// Every row this warp walks: its dx, and each column's g xh and g handed to `add(c, g xh, g)`.
template <typename T, typename Add>
__device__ __forceinline__ void layer_norm_bwd_rows(const T* __restrict__ x, const T* __restrict__ g,
                                                    const float* __restrict__ w, const float* __restrict__ mean,
                                                    const float* __restrict__ rstd, T* __restrict__ dx,
                                                    long long rows, int d, Add add) {
    const int lane = threadIdx.x % 32;
    const long long warps = (long long)gridDim.x * blockDim.x / 32;
    for (long long r = ((long long)blockIdx.x * blockDim.x + threadIdx.x) / 32; r < rows; r += warps) {
        const T* xr = x + r * d;
        const T* gr = g + r * d;
        const float m = mean[r], rs = rstd[r];
        // mean(g w) and mean(g w xh), the two terms of the row's dx
        float a = 0.f, bx = 0.f;
        for (int c = lane; c < d; c += 32) {
            const float gw = to_f32(gr[c]) * w[c];
            a += gw;
            bx += gw * (to_f32(xr[c]) - m) * rs;
        }
        a = warp_sum(a) / d;
        bx = warp_sum(bx) / d;
        T* dxr = dx + r * d;
        for (int c = lane; c < d; c += 32) {
            const float gv = to_f32(gr[c]), xh = (to_f32(xr[c]) - m) * rs;
            dxr[c] = from_f32<T>(rs * (gv * w[c] - a - xh * bx));
            add(c, gv * xh, gv);
        }
    }
}

template <typename T>
__device__ __forceinline__ void layer_norm_bwd(const T* __restrict__ x, const T* __restrict__ g,
                                               const float* __restrict__ w, const float* __restrict__ mean,
                                               const float* __restrict__ rstd, T* __restrict__ dx,
                                               float* __restrict__ dw, float* __restrict__ db, long long rows,
                                               int d, int has_bias) {
    // [d] for dw, then [d] for db (times the warps for rows at most kPrivateWidth wide)
    extern __shared__ float sums[];
    const bool private_sums = d <= kPrivateWidth;
    for (int i = threadIdx.x; i < (private_sums ? blockDim.x / 32 : 1) * 2 * d; i += blockDim.x) sums[i] = 0.f;
    __syncthreads();
    if (private_sums) {
        // each warp adds into its own slice [warp][2 d] (plain adds), then the slices are summed
        float* own = sums + (size_t)(threadIdx.x / 32) * 2 * d;
        layer_norm_bwd_rows(x, g, w, mean, rstd, dx, rows, d, [&](int c, float gxh, float gv) {
            own[c] += gxh;
            own[d + c] += gv;
        });
        __syncthreads();
        for (int c = threadIdx.x; c < 2 * d; c += blockDim.x)
            for (int v = 1; v < (int)blockDim.x / 32; ++v) sums[c] += sums[(size_t)v * 2 * d + c];
    } else {
        layer_norm_bwd_rows(x, g, w, mean, rstd, dx, rows, d, [&](int c, float gxh, float gv) {
            atomicAdd(&sums[c], gxh);
            if (has_bias) atomicAdd(&sums[d + c], gv);
        });
    }
    __syncthreads();
    for (int c = threadIdx.x; c < d; c += blockDim.x) {
        atomicAdd(&dw[c], sums[c]);
        if (has_bias) atomicAdd(&db[c], sums[d + c]);
    }
}

}  // namespace

#define LAYER_NORM_ENTRY_POINTS(SUFFIX, T)                                                                       \
    extern "C" __global__ void layer_norm_fwd_##SUFFIX(const T* x, const float* w, const float* b, T* y,        \
                                                       float* mean, float* rstd, long long rows, int d,         \
                                                       float eps, int has_bias) {                               \
        layer_norm_fwd<T>(x, w, b, y, mean, rstd, rows, d, eps, has_bias);                                      \
    }                                                                                                            \
    extern "C" __global__ void layer_norm_bwd_##SUFFIX(const T* x, const T* g, const float* w, const float* mean, \
                                                       const float* rstd, T* dx, float* dw, float* db,          \
                                                       long long rows, int d, int has_bias) {                   \
        layer_norm_bwd<T>(x, g, w, mean, rstd, dx, dw, db, rows, d, has_bias);                                  \
    }

LAYER_NORM_ENTRY_POINTS(f32, float)
LAYER_NORM_ENTRY_POINTS(bf16, __nv_bfloat16)
