// Elementwise maps with 16-byte accesses: each thread moves 8 bf16 (or 4 f32) per load and
// store where every pointer is 16-byte aligned (candle's buffers are; a view's offset may not
// be), element by element otherwise and for the tail. Scalar 2-byte accesses left the fused
// GELU at about a third of the H200's bandwidth (bench/results/2026-12-03-h200-train-speed).
// `f(values..., index)` gets f32 values and the element's index; launches need about
// n / 8 threads (grid-stride loops cover any grid).
#pragma once
#include <stdint.h>

#include "convert.cuh"

template <typename T>
__device__ __forceinline__ bool aligned16(const T* p) {
    return (reinterpret_cast<uintptr_t>(p) & 15) == 0;
}

// y[i] = f(x[i], i)
template <typename T, typename F>
__device__ __forceinline__ void map1(const T* __restrict__ x, T* __restrict__ y, long long n, F f) {
    constexpr int V = 16 / sizeof(T);
    const long long tid = blockIdx.x * (long long)blockDim.x + threadIdx.x;
    const long long stride = (long long)gridDim.x * blockDim.x;
    long long done = 0;
    if (aligned16(x) && aligned16(y)) {
        const long long vecs = n / V;
        for (long long i = tid; i < vecs; i += stride) {
            uint4 raw = reinterpret_cast<const uint4*>(x)[i];
            T* e = reinterpret_cast<T*>(&raw);
#pragma unroll
            for (int j = 0; j < V; ++j) e[j] = from_f32<T>(f(to_f32(e[j]), i * V + j));
            reinterpret_cast<uint4*>(y)[i] = raw;
        }
        done = vecs * V;
    }
    for (long long i = done + tid; i < n; i += stride) y[i] = from_f32<T>(f(to_f32(x[i]), i));
}

// y[i] = f(x[i], g[i], i)
template <typename T, typename F>
__device__ __forceinline__ void map2(const T* __restrict__ x, const T* __restrict__ g, T* __restrict__ y,
                                     long long n, F f) {
    constexpr int V = 16 / sizeof(T);
    const long long tid = blockIdx.x * (long long)blockDim.x + threadIdx.x;
    const long long stride = (long long)gridDim.x * blockDim.x;
    long long done = 0;
    if (aligned16(x) && aligned16(g) && aligned16(y)) {
        const long long vecs = n / V;
        for (long long i = tid; i < vecs; i += stride) {
            uint4 raw = reinterpret_cast<const uint4*>(x)[i];
            const uint4 graw = reinterpret_cast<const uint4*>(g)[i];
            T* e = reinterpret_cast<T*>(&raw);
            const T* ge = reinterpret_cast<const T*>(&graw);
#pragma unroll
            for (int j = 0; j < V; ++j) e[j] = from_f32<T>(f(to_f32(e[j]), to_f32(ge[j]), i * V + j));
            reinterpret_cast<uint4*>(y)[i] = raw;
        }
        done = vecs * V;
    }
    for (long long i = done + tid; i < n; i += stride) y[i] = from_f32<T>(f(to_f32(x[i]), to_f32(g[i]), i));
}
