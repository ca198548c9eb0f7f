// Inverted dropout with a counter-based mask (crate::ops::dropout says why): element i is
// kept iff bits(seed, i) >= threshold, and kept elements are scaled. One pass, no mask in
// memory; the backward is the same kernel on the gradient. The hash (dropout.cuh) must stay
// identical to ops/dropout.rs's `bits` (the GPU test compares the two exactly).
#include <cuda_bf16.h>

#include "convert.cuh"
#include "dropout.cuh"

#define DROPOUT(SUFFIX, T)                                                                                      \
    extern "C" __global__ void dropout_##SUFFIX(const T* x, T* y, long long n, unsigned int seed_lo,            \
                                                unsigned int seed_hi, unsigned int threshold, float scale) {    \
        for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n;                             \
             i += (long long)gridDim.x * blockDim.x) {                                                          \
            const bool keep = dropout_bits(seed_lo, seed_hi, (unsigned long long)i) >= threshold;               \
            y[i] = keep ? from_f32<T>(to_f32(x[i]) * scale) : from_f32<T>(0.f);                                 \
        }                                                                                                       \
    }

DROPOUT(f32, float)
DROPOUT(bf16, __nv_bfloat16)
