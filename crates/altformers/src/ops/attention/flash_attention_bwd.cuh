// What the two attention backward kernels share (flash_attention.cu's mma.sync kernel and
// flash_attention_sm90a.cu's wgmma kernel): the walk of a key block's steps and one (key,
// query) element of P and dS. Their tiles, fragments and layouts differ; this does not.
#pragma once

#include "dropout.cuh"

// The blocks of BR queries that see at least one key of the key block starting at n0 (query
// rows i >= n0 - offset): first .. first + count. A key block's steps are every query head of
// its group and, for each, these blocks.
struct QueryBlocks {
    int first, count;

    __device__ __forceinline__ QueryBlocks(int n0, int offset, int T, int BR)
        : first(max(0, n0 - offset) / BR), count(max(0, (T + BR - 1) / BR - max(0, n0 - offset) / BR)) {}

    // (head, query block) of the step after (h, m): the next block, then the next head; no
    // division per step.
    __device__ __forceinline__ void advance(int& h, int& m) const {
        if (++m == first + count) m = first, ++h;
    }
};

// One element of the backward step for key `key` and query `query` of head row `row0`
// ((first sequence + b) H + h) T: from the score s and dp = (dO V^T) at that place, with the
// row's log-sum-exp and D, leaves P (dropped where the mask says) in s and dS = P (dP keep - D)
// in dp. P is 0 where the query does not see the key, tested only off a block-uniform
// `all_visible` step. (A masked score can exceed the row's log-sum-exp, so exp2 may give inf
// there: it is selected away, never multiplied.)
// DROPOUT false: the caller knows there is none (threshold 0); MASK false: it knows the
// step is `all_visible` (both leave out code, which keeps a fully unrolled step small).
template <bool DROPOUT = true, bool MASK = true>
__device__ __forceinline__ void backward_element(float& s, float& dp, float lse, float delta, int key, int query,
                                                 bool all_visible, int offset, int T, int S,
                                                 unsigned long long row0, float scale_log2, unsigned int seed_lo,
                                                 unsigned int seed_hi, unsigned int threshold, float drop_scale) {
    float p = exp2f(fmaf(s, scale_log2, -lse));
    if (MASK && !all_visible) p = key <= offset + query && query < T && key < S ? p : 0.f;
    float keep = 1.f;
    if (DROPOUT && threshold != 0)
        keep = dropout_bits(seed_lo, seed_hi, (row0 + query) * S + key) >= threshold ? drop_scale : 0.f;
    s = p * keep;
    dp = p * (dp * keep - delta);
}
