// Elementwise kernels around the cuFFT transforms of the causal FFT convolution
// (cuda.rs beside this file drives them; mod.rs documents the maths).
//
// Buffers of real signals are `rows` rows of `pitch = 2 * (n / 2 + 1)` floats: the layout of
// an in-place real-to-complex transform, whose spectrum of `bins = n / 2 + 1` complex values
// overwrites the row. Launch shape for every row kernel: grid.x = row, grid.y (and the loop)
// over the columns, so no thread divides by the pitch.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <stdint.h>

#include "convert.cuh"

// dst[r, i] = src[r, i] for i < len, 0 for len <= i < pitch (src rows of `len`, cast to f32).
template <typename T>
__device__ void pad(const T *__restrict__ src, float *__restrict__ dst, int len, int pitch) {
    const size_t row = blockIdx.x;
    const T *s = src + row * (size_t)len;
    float *d = dst + row * (size_t)pitch;
    for (int i = blockIdx.y * blockDim.x + threadIdx.x; i < pitch; i += gridDim.y * blockDim.x) {
        d[i] = i < len ? to_f32(s[i]) : 0.0f;
    }
}

// dst[r, i] = src[r, i] for i < len (rows of `pitch` floats to rows of `len`, cast to T).
template <typename T>
__device__ void unpad(const float *__restrict__ src, T *__restrict__ dst, int len, int pitch) {
    const size_t row = blockIdx.x;
    const float *s = src + row * (size_t)pitch;
    T *d = dst + row * (size_t)len;
    for (int i = blockIdx.y * blockDim.x + threadIdx.x; i < len; i += gridDim.y * blockDim.x) {
        d[i] = from_f32<T>(s[i]);
    }
}

extern "C" __global__ void pad_f32(const float *src, float *dst, int len, int pitch) { pad(src, dst, len, pitch); }
extern "C" __global__ void pad_bf16(const __nv_bfloat16 *src, float *dst, int len, int pitch) { pad(src, dst, len, pitch); }
extern "C" __global__ void pad_f16(const __half *src, float *dst, int len, int pitch) { pad(src, dst, len, pitch); }
extern "C" __global__ void unpad_f32(const float *src, float *dst, int len, int pitch) { unpad(src, dst, len, pitch); }
extern "C" __global__ void unpad_bf16(const float *src, __nv_bfloat16 *dst, int len, int pitch) { unpad(src, dst, len, pitch); }
extern "C" __global__ void unpad_f16(const float *src, __half *dst, int len, int pitch) { unpad(src, dst, len, pitch); }

__device__ __forceinline__ float2 cmul(float2 a, float2 b) {
    return make_float2(a.x * b.x - a.y * b.y, a.x * b.y + a.y * b.x);
}

// a * conj(b)
__device__ __forceinline__ float2 cmul_conj(float2 a, float2 b) {
    return make_float2(a.x * b.x + a.y * b.y, a.y * b.x - a.x * b.y);
}

// The spectrum of a real signal has real DC and (even n) Nyquist bins: products of such
// spectra keep rounding noise in their imaginary parts, cleared here (`nyquist` is bins - 1
// for even n, -1 for odd n) so the complex-to-real transform sees an exact Hermitian input.
__device__ __forceinline__ float2 real_edges(float2 v, int k, int nyquist) {
    if (k == 0 || k == nyquist) v.y = 0.0f;
    return v;
}

// Forward product: out[r, k] = xs[r, k] * hs[r % channels, k] * scale, rows of `stride`
// complex values of which the first `bins` are used. `out` may be `xs` (in place).
extern "C" __global__ void spectra_mul(const float2 *xs, const float2 *__restrict__ hs, float2 *out,
                                       int channels, int bins, int stride, int nyquist, float scale) {
    const size_t row = blockIdx.x;
    const float2 *x = xs + row * (size_t)stride;
    const float2 *h = hs + (row % channels) * (size_t)stride;
    float2 *o = out + row * (size_t)stride;
    for (int k = blockIdx.y * blockDim.x + threadIdx.x; k < bins; k += gridDim.y * blockDim.x) {
        float2 p = cmul(x[k], h[k]);
        o[k] = real_edges(make_float2(p.x * scale, p.y * scale), k, nyquist);
    }
}

// Backward products, one thread per (channel = blockIdx.x, bin k), looping over the batch:
//   ds[b, c, k] <- ds[b, c, k] * conj(hs[c, k]) * scale                 (dx spectrum, in place)
//   dhs[c, k]    = sum_b ds[b, c, k] * conj(xs[b, c, k]) * scale        (dh spectrum)
// ds, xs: [batch, channels, stride]; hs, dhs: [channels, stride] (complex values).
extern "C" __global__ void spectra_grads(float2 *ds, const float2 *__restrict__ xs, const float2 *__restrict__ hs,
                                         float2 *__restrict__ dhs, int batch, int channels, int bins, int stride,
                                         int nyquist, float scale) {
    const size_t c = blockIdx.x;
    const size_t plane = (size_t)channels * stride;
    for (int k = blockIdx.y * blockDim.x + threadIdx.x; k < bins; k += gridDim.y * blockDim.x) {
        const float2 h = hs[c * stride + k];
        float2 acc = make_float2(0.0f, 0.0f);
        size_t at = c * stride + k;
        for (int b = 0; b < batch; ++b, at += plane) {
            const float2 d = ds[at];
            const float2 dx = cmul_conj(d, h);
            ds[at] = real_edges(make_float2(dx.x * scale, dx.y * scale), k, nyquist);
            const float2 p = cmul_conj(d, xs[at]);
            acc.x += p.x;
            acc.y += p.y;
        }
        dhs[c * stride + k] = real_edges(make_float2(acc.x * scale, acc.y * scale), k, nyquist);
    }
}
