// The counter-based dropout mask's random bits (crate::ops::dropout::bits, which this must
// equal): two rounds of Wellons' lowbias32 keyed by the seed's halves. Element i is kept iff
// dropout_bits(...) >= threshold. Shared by the dropout kernel and the flash attention
// kernels, whose dropout on the probabilities draws the same mask as the unfused path.
#pragma once

static __device__ __forceinline__ unsigned int dropout_mix32(unsigned int x) {
    x ^= x >> 16;
    x *= 0x7feb352du;
    x ^= x >> 15;
    x *= 0x846ca68bu;
    return x ^ (x >> 16);
}

static __device__ __forceinline__ unsigned int dropout_bits(unsigned int seed_lo, unsigned int seed_hi,
                                                            unsigned long long i) {
    return dropout_mix32(dropout_mix32((unsigned int)i ^ seed_lo) ^ (unsigned int)(i >> 32) ^ seed_hi);
}
