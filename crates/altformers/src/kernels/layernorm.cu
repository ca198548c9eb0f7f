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

// Rows of d % 8 == 0 elements, d <= 256 C: each lane holds its chunks of 8 columns (column
// 8 (lane + 32 i), i < C) in registers, read and written 16 bytes at a time, so a row is read
// once (the scalar kernels above read 2-byte elements, x and g twice in the backward: about
// half the bandwidth at width 768). The backward sums dw and db in registers over every row the
// warp walks, then once per CTA through shared memory.
template <typename T> __device__ __forceinline__ void load8(const T* p, float v[8]);
template <> __device__ __forceinline__ void load8<float>(const float* p, float v[8]) {
    const float4 a = reinterpret_cast<const float4*>(p)[0], b = reinterpret_cast<const float4*>(p)[1];
    v[0] = a.x, v[1] = a.y, v[2] = a.z, v[3] = a.w, v[4] = b.x, v[5] = b.y, v[6] = b.z, v[7] = b.w;
}
template <> __device__ __forceinline__ void load8<__nv_bfloat16>(const __nv_bfloat16* p, float v[8]) {
    const uint4 u = *reinterpret_cast<const uint4*>(p);
    const __nv_bfloat162* h = reinterpret_cast<const __nv_bfloat162*>(&u);
#pragma unroll
    for (int i = 0; i < 4; ++i) {
        const float2 f = __bfloat1622float2(h[i]);
        v[2 * i] = f.x, v[2 * i + 1] = f.y;
    }
}
template <typename T> __device__ __forceinline__ void store8(T* p, const float v[8]);
template <> __device__ __forceinline__ void store8<float>(float* p, const float v[8]) {
    reinterpret_cast<float4*>(p)[0] = make_float4(v[0], v[1], v[2], v[3]);
    reinterpret_cast<float4*>(p)[1] = make_float4(v[4], v[5], v[6], v[7]);
}
template <> __device__ __forceinline__ void store8<__nv_bfloat16>(__nv_bfloat16* p, const float v[8]) {
    uint4 u;
    u.x = pack_bf16(v[0], v[1]), u.y = pack_bf16(v[2], v[3]), u.z = pack_bf16(v[4], v[5]), u.w = pack_bf16(v[6], v[7]);
    *reinterpret_cast<uint4*>(p) = u;
}

template <typename T, int C>
__device__ __forceinline__ void layer_norm_fwd_vec(const T* __restrict__ x, const float* __restrict__ w,
                                                   const float* __restrict__ b, T* __restrict__ y,
                                                   float* __restrict__ mean_out, float* __restrict__ rstd_out,
                                                   long long rows, int d, float eps, int has_bias) {
    const int lane = threadIdx.x % 32;
    const long long warps = (long long)gridDim.x * blockDim.x / 32;
    for (long long r = ((long long)blockIdx.x * blockDim.x + threadIdx.x) / 32; r < rows; r += warps) {
        float v[C][8];
        float s = 0.f;
#pragma unroll
        for (int i = 0; i < C; ++i) {
            const int c = (lane + 32 * i) * 8;
            if (c < d) {
                load8(x + r * d + c, v[i]);
#pragma unroll
                for (int e = 0; e < 8; ++e) s += v[i][e];
            }
        }
        const float mean = warp_sum(s) / d;
        float q = 0.f;
#pragma unroll
        for (int i = 0; i < C; ++i)
            if ((lane + 32 * i) * 8 < d)
#pragma unroll
                for (int e = 0; e < 8; ++e) q += (v[i][e] - mean) * (v[i][e] - mean);
        const float rstd = rsqrtf(warp_sum(q) / d + eps);
#pragma unroll
        for (int i = 0; i < C; ++i) {
            const int c = (lane + 32 * i) * 8;
            if (c >= d) continue;
            float wv[8], bv[8];
            load8(w + c, wv);
            if (has_bias) load8(b + c, bv);
#pragma unroll
            for (int e = 0; e < 8; ++e) v[i][e] = (v[i][e] - mean) * rstd * wv[e] + (has_bias ? bv[e] : 0.f);
            store8(y + r * d + c, v[i]);
        }
        if (lane == 0) {
            mean_out[r] = mean;
            rstd_out[r] = rstd;
        }
    }
}

template <typename T, int C>
__device__ __forceinline__ void layer_norm_bwd_vec(const T* __restrict__ x, const T* __restrict__ g,
                                                   const float* __restrict__ w, const float* __restrict__ mean,
                                                   const float* __restrict__ rstd, T* __restrict__ dx,
                                                   float* __restrict__ dw, float* __restrict__ db, long long rows,
                                                   int d, int has_bias) {
    extern __shared__ float sums[];  // [d] dw, then [d] db
    for (int i = threadIdx.x; i < 2 * d; i += blockDim.x) sums[i] = 0.f;
    const int lane = threadIdx.x % 32;
    const long long warps = (long long)gridDim.x * blockDim.x / 32;
    float sum_dw[C][8], sum_db[C][8];
#pragma unroll
    for (int i = 0; i < C; ++i)
#pragma unroll
        for (int e = 0; e < 8; ++e) sum_dw[i][e] = sum_db[i][e] = 0.f;
    for (long long r = ((long long)blockIdx.x * blockDim.x + threadIdx.x) / 32; r < rows; r += warps) {
        float xh[C][8], gv[C][8];
        const float m = mean[r], rs = rstd[r];
        // mean(g w) and mean(g w xh), the two terms of the row's dx
        float a = 0.f, bx = 0.f;
#pragma unroll
        for (int i = 0; i < C; ++i) {
            const int c = (lane + 32 * i) * 8;
            if (c >= d) continue;
            float wv[8];
            load8(x + r * d + c, xh[i]);
            load8(g + r * d + c, gv[i]);
            load8(w + c, wv);
#pragma unroll
            for (int e = 0; e < 8; ++e) {
                xh[i][e] = (xh[i][e] - m) * rs;
                const float gw = gv[i][e] * wv[e];
                a += gw;
                bx += gw * xh[i][e];
            }
        }
        a = warp_sum(a) / d;
        bx = warp_sum(bx) / d;
#pragma unroll
        for (int i = 0; i < C; ++i) {
            const int c = (lane + 32 * i) * 8;
            if (c >= d) continue;
            float wv[8], out[8];
            load8(w + c, wv);
#pragma unroll
            for (int e = 0; e < 8; ++e) {
                out[e] = rs * (gv[i][e] * wv[e] - a - xh[i][e] * bx);
                sum_dw[i][e] += gv[i][e] * xh[i][e];
                sum_db[i][e] += gv[i][e];
            }
            store8(dx + r * d + c, out);
        }
    }
    __syncthreads();
#pragma unroll
    for (int i = 0; i < C; ++i) {
        const int c = (lane + 32 * i) * 8;
        if (c >= d) continue;
#pragma unroll
        for (int e = 0; e < 8; ++e) {
            atomicAdd(&sums[c + e], sum_dw[i][e]);
            if (has_bias) atomicAdd(&sums[d + c + e], sum_db[i][e]);
        }
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

// The register-resident kernels, C chunks of 8 columns per lane (d <= 256 C, d % 8 == 0).
#define LAYER_NORM_VEC_ENTRY_POINTS(SUFFIX, T, C)                                                                \
    extern "C" __global__ void layer_norm_fwd_##SUFFIX##_v##C(const T* x, const float* w, const float* b, T* y, \
                                                              float* mean, float* rstd, long long rows, int d,  \
                                                              float eps, int has_bias) {                        \
        layer_norm_fwd_vec<T, C>(x, w, b, y, mean, rstd, rows, d, eps, has_bias);                               \
    }                                                                                                            \
    extern "C" __global__ void __launch_bounds__(256, C < 4 ? 2 : 1)                                          \
        layer_norm_bwd_##SUFFIX##_v##C(const T* x, const T* g, const float* w,                                  \
                                                              const float* mean, const float* rstd, T* dx,      \
                                                              float* dw, float* db, long long rows, int d,      \
                                                              int has_bias) {                                   \
        layer_norm_bwd_vec<T, C>(x, g, w, mean, rstd, dx, dw, db, rows, d, has_bias);                           \
    }

LAYER_NORM_VEC_ENTRY_POINTS(f32, float, 1)
LAYER_NORM_VEC_ENTRY_POINTS(f32, float, 2)
LAYER_NORM_VEC_ENTRY_POINTS(f32, float, 3)
LAYER_NORM_VEC_ENTRY_POINTS(f32, float, 4)
LAYER_NORM_VEC_ENTRY_POINTS(bf16, __nv_bfloat16, 1)
LAYER_NORM_VEC_ENTRY_POINTS(bf16, __nv_bfloat16, 2)
LAYER_NORM_VEC_ENTRY_POINTS(bf16, __nv_bfloat16, 3)
LAYER_NORM_VEC_ENTRY_POINTS(bf16, __nv_bfloat16, 4)
