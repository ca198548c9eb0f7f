// Inverted dropout with a counter-based mask (crate::ops::dropout says why): element i is
// kept iff bits(seed, index(i)) >= threshold, and kept elements are scaled (index(i) is i
// offset by `first`, or for a slice of every row, row by row: ops/dropout.rs's `index`). One pass, no mask in
// memory; the backward is the same kernel on the gradient. The hash (dropout.cuh) must stay
// identical to ops/dropout.rs's `bits` (the GPU test compares the two exactly).
#include <cuda_bf16.h>

#include "convert.cuh"
#include "dropout.cuh"
#include "elementwise.cuh"

#define DROPOUT(SUFFIX, T)                                                                               \
    extern "C" __global__ void dropout_##SUFFIX(const T* x, T* y, long long n, unsigned int seed_lo,     \
                                                unsigned int seed_hi, unsigned int threshold, float scale,   \
                                                unsigned long long first, unsigned long long row,            \
                                                unsigned long long stride) {                                 \
        map1(x, y, n, [=](float v, long long i) {                                                        \
            unsigned long long u = (unsigned long long)i;                                                \
            unsigned long long at = row == 0 ? first + u : first + u / row * stride + u % row;           \
            return dropout_bits(seed_lo, seed_hi, at) >= threshold ? v * scale : 0.f;                     \
        });                                                                                              \
    }

DROPOUT(f32, float)
DROPOUT(bf16, __nv_bfloat16)
