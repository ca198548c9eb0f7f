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

// A row's mean(g w) and mean(g w xh), the two terms of its dx.
template <typename T>
__device__ __forceinline__ float2 layer_norm_bwd_terms(const T* __restrict__ xr, const T* __restrict__ gr,
                                                       const float* __restrict__ w, float m, float rs, int d,
                                                       int lane) {
    float a = 0.f, bx = 0.f;
    for (int c = lane; c < d; c += 32) {
        const float gw = to_f32(gr[c]) * w[c];
        a += gw;
        bx += gw * (to_f32(xr[c]) - m) * rs;
    }
    return make_float2(warp_sum(a) / d, warp_sum(bx) / d);
}

// Rows at most kPrivateWidth wide: each warp adds its rows' g xh and g into its own slice of
// shared memory (plain adds, no atomics: [warp][2 d]); then the slices are summed into the first.
template <typename T>
__device__ __forceinline__ void layer_norm_bwd_private(const T* __restrict__ x, const T* __restrict__ g,
                                                       const float* __restrict__ w, const float* __restrict__ mean,
                                                       const float* __restrict__ rstd, T* __restrict__ dx,
                                                       float* __restrict__ sums, long long rows, int d) {
    const int lane = threadIdx.x % 32, warp = threadIdx.x / 32, nwarps = blockDim.x / 32;
    float* own = sums + (size_t)warp * 2 * d;
    const long long warps = (long long)gridDim.x * blockDim.x / 32;
    for (long long r = ((long long)blockIdx.x * blockDim.x + threadIdx.x) / 32; r < rows; r += warps) {
        const T* xr = x + r * d;
        const T* gr = g + r * d;
        const float m = mean[r], rs = rstd[r];
        const float2 t = layer_norm_bwd_terms(xr, gr, w, m, rs, d, lane);
        T* dxr = dx + r * d;
        for (int c = lane; c < d; c += 32) {
            const float gv = to_f32(gr[c]), xh = (to_f32(xr[c]) - m) * rs;
            dxr[c] = from_f32<T>(rs * (gv * w[c] - t.x - xh * t.y));
            own[c] += gv * xh;
            own[d + c] += gv;
        }
    }
    __syncthreads();
    for (int c = threadIdx.x; c < 2 * d; c += blockDim.x)
        for (int v = 1; v < nwarps; ++v) sums[c] += sums[(size_t)v * 2 * d + c];
    __syncthreads();
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
        layer_norm_bwd_private<T>(x, g, w, mean, rstd, dx, sums, rows, d);
    } else {
        const int lane = threadIdx.x % 32;
        const long long warps = (long long)gridDim.x * blockDim.x / 32;
        for (long long r = ((long long)blockIdx.x * blockDim.x + threadIdx.x) / 32; r < rows; r += warps) {
            const T* xr = x + r * d;
            const T* gr = g + r * d;
            const float m = mean[r], rs = rstd[r];
            const float2 t = layer_norm_bwd_terms(xr, gr, w, m, rs, d, lane);
            T* dxr = dx + r * d;
            for (int c = lane; c < d; c += 32) {
                const float gv = to_f32(gr[c]), xh = (to_f32(xr[c]) - m) * rs;
                dxr[c] = from_f32<T>(rs * (gv * w[c] - t.x - xh * t.y));
                atomicAdd(&sums[c], gv * xh);
                if (has_bias) atomicAdd(&sums[d + c], gv);
            }
        }
        __syncthreads();
    }
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
