// Fused causal attention for sm_90 in bf16 with f32 accumulation (FlashAttention-2 style):
// forward (output + per-row log-sum-exp), and backward (D = rowsum(dO * O), then dK/dV per
// key block with dQ accumulated atomically in f32, then dQ converted to bf16).
// Tile sizes and shared-memory layouts are mirrored in flash_attention.rs (`Tiles`); the
// reasons for them are given there.
//
// Layouts: q, o, dout, dq [B, H, T, D]; k, v, dk, dv [B, KVH, S, D]; lse, delta [B, H, T];
// all contiguous. Query head h reads key/value head h / (H / KVH). Query row i sees key j
// when j <= offset + i (and j < S).
//
// Tensor-core fragments follow PTX mma.m16n8k16 (row.col, bf16 in, f32 accumulate). With
// lane = 4 * grp + quad: A regs hold (row grp | grp + 8, cols 2 quad + {0,1} | + 8),
// B regs hold (k rows 2 quad + {0,1} | + 8, col grp), C holds (row grp | grp + 8,
// cols 2 quad + {0,1}). Shared tiles are padded by 8 elements per row so that the 8 row
// addresses of each ldmatrix phase fall into distinct banks.
#include <cuda_bf16.h>
#include <stdint.h>

#include "async_copy.cuh"

typedef __nv_bfloat16 bf16;

namespace {

constexpr int kPad = 8;
// How far (log2 units) a row's scores may exceed the forward's running max before it is moved:
// p <= 2^8 keeps the f32 sums and bf16 P far from overflow.
constexpr float kRescaleSlack = 8.f;

__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], const bf16* p) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(smem_addr(p)));
}
__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t (&r)[4], const bf16* p) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(smem_addr(p)));
}

__device__ __forceinline__ void mma_bf16(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// Two floats as a bf16 pair, `lo` in the low half (the lower column of a fragment).
__device__ __forceinline__ uint32_t pack_bf16(float lo, float hi) {
    __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
    return *reinterpret_cast<uint32_t*>(&v);
}

// ldmatrix address of this lane for an A operand (16 x 16, row-major in shared memory) at
// (row0, col0): lanes 0-15 address rows 0-15 of the left 8 columns, 16-31 the right ones.
__device__ __forceinline__ const bf16* a_frag_addr(const bf16* tile, int ld, int row0, int col0, int lane) {
    return tile + (row0 + (lane & 15)) * ld + col0 + (lane >> 4) * 8;
}
// ldmatrix (non-transposed) address for two B operands n-tiles (n0, n0 + 8) x k (k0 .. k0 + 16)
// from a tile stored [n][k]: regs 0,1 are the first n-tile's B, regs 2,3 the second's.
__device__ __forceinline__ const bf16* b_frag_addr(const bf16* tile, int ld, int n0, int k0, int lane) {
    return tile + (n0 + (lane & 7) + ((lane >> 4) << 3)) * ld + k0 + ((lane >> 3) & 1) * 8;
}
// ldmatrix.trans address for two B n-tiles from a tile stored [k][n] (k0 .. k0 + 16, n0 .. n0 + 16).
__device__ __forceinline__ const bf16* bt_frag_addr(const bf16* tile, int ld, int k0, int n0, int lane) {
    return tile + (k0 + (lane & 7) + ((lane >> 3) & 1) * 8) * ld + n0 + (lane >> 4) * 8;
}

// Copies rows row0 .. row0 + ROWS of a [rows, D] matrix into a padded shared tile,
// zero-filling rows at or beyond `rows`.
template <int ROWS, int D, int THREADS>
__device__ __forceinline__ void load_tile_async(bf16* tile, const bf16* src, int row0, int rows) {
    constexpr int kChunks = D / 8, kTotal = ROWS * kChunks;
    // A compile-time trip count, so the loop unrolls into straight-line copies.
#pragma unroll
    for (int i = 0; i < (kTotal + THREADS - 1) / THREADS; ++i) {
        const int c = i * THREADS + threadIdx.x;
        if (kTotal % THREADS != 0 && c >= kTotal) break;
        const int r = c / kChunks, col = (c % kChunks) * 8;
        const bool valid = row0 + r < rows;
        const bf16* from = valid ? src + (size_t)(row0 + r) * D + col : src;
        cp_async16(tile + r * (D + kPad) + col, from, valid);
    }
}

// ---------------------------------------------------------------------------------------
// Forward. Grid (ceil(T / BR), H, B); WARPS warps each own MT m-tiles of 16 query rows; key
// tiles of BC rows stream through a two-stage cp.async pipeline. Every K and V fragment a
// warp reads from shared memory feeds MT mmas: with one m-tile per warp the forward is bound
// by shared-memory bandwidth (16 flops per byte read, where the tensor cores need about 23).
// Q fragments stay in registers when they fit beside the accumulators (MT * D <= 128), else
// they are re-read from shared memory every key block.
template <int D, int WARPS, int BC, int MT>
__device__ __forceinline__ void flash_fwd(const bf16* __restrict__ q, const bf16* __restrict__ k,
                                          const bf16* __restrict__ v, bf16* __restrict__ o,
                                          float* __restrict__ lse, int T, int S, int H, int KVH, int offset,
                                          float scale_log2) {
    constexpr int WARP_ROWS = 16 * MT, BR = WARP_ROWS * WARPS, THREADS = 32 * WARPS, LD = D + kPad;
    constexpr bool Q_IN_REGS = MT * D <= 128;
    extern __shared__ __align__(16) unsigned char smem[];
    bf16* s_q = reinterpret_cast<bf16*>(smem);
    bf16* s_k = s_q + BR * LD;      // 2 stages
    bf16* s_v = s_k + 2 * BC * LD;  // 2 stages

    // Causal work grows with the query block: launch the longest ones first so the tail of
    // the grid is made of short blocks.
    const int m0 = (gridDim.x - 1 - blockIdx.x) * BR, h = blockIdx.y, b = blockIdx.z;
    const int kvh = h / (H / KVH);
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, grp = lane >> 2, quad = lane & 3;
    const int w0 = warp * WARP_ROWS;  // this warp's first row in the tile
    const bf16* q_h = q + (size_t)(b * H + h) * T * D;
    const bf16* k_h = k + (size_t)(b * KVH + kvh) * S * D;
    const bf16* v_h = v + (size_t)(b * KVH + kvh) * S * D;

    // Keys seen by any row of this tile: 0 .. min(S, offset + m0 + BR).
    const int key_end = min(S, offset + m0 + BR);
    const int key_blocks = (key_end + BC - 1) / BC;

    load_tile_async<BR, D, THREADS>(s_q, q_h, m0, T);
    load_tile_async<BC, D, THREADS>(s_k, k_h, 0, S);
    load_tile_async<BC, D, THREADS>(s_v, v_h, 0, S);
    cp_async_commit();
    cp_async_wait<0>();
    __syncthreads();

    uint32_t q_frag[Q_IN_REGS ? MT : 1][Q_IN_REGS ? D / 16 : 1][4];
    if constexpr (Q_IN_REGS) {
#pragma unroll
        for (int mt = 0; mt < MT; ++mt)
#pragma unroll
            for (int kk = 0; kk < D / 16; ++kk)
                ldmatrix_x4(q_frag[mt][kk], a_frag_addr(s_q, LD, w0 + mt * 16, kk * 16, lane));
    }

    float acc_o[MT][D / 8][4];
#pragma unroll
    for (int mt = 0; mt < MT; ++mt)
#pragma unroll
        for (int i = 0; i < D / 8; ++i) acc_o[mt][i][0] = acc_o[mt][i][1] = acc_o[mt][i][2] = acc_o[mt][i][3] = 0.f;
    // Running max (in scaled log2 units) and this thread's partial row sums for rows grp, grp + 8
    // of each m-tile; the sums are reduced across the quad only at the end (the rescaling
    // factors agree).
    float row_max[MT][2], row_sum[MT][2];
#pragma unroll
    for (int mt = 0; mt < MT; ++mt) row_max[mt][0] = row_max[mt][1] = -INFINITY, row_sum[mt][0] = row_sum[mt][1] = 0.f;

    for (int j = 0; j < key_blocks; ++j) {
        const int stage = j & 1;
        if (j + 1 < key_blocks) {
            load_tile_async<BC, D, THREADS>(s_k + (stage ^ 1) * BC * LD, k_h, (j + 1) * BC, S);
            load_tile_async<BC, D, THREADS>(s_v + (stage ^ 1) * BC * LD, v_h, (j + 1) * BC, S);
        }
        cp_async_commit();
        cp_async_wait<1>();
        __syncthreads();
        const bf16* k_tile = s_k + stage * BC * LD;
        const bf16* v_tile = s_v + stage * BC * LD;

        float acc_s[MT][BC / 8][4];
#pragma unroll
        for (int mt = 0; mt < MT; ++mt)
#pragma unroll
            for (int i = 0; i < BC / 8; ++i)
                acc_s[mt][i][0] = acc_s[mt][i][1] = acc_s[mt][i][2] = acc_s[mt][i][3] = 0.f;
#pragma unroll
        for (int kk = 0; kk < D / 16; ++kk) {
            uint32_t qa[MT][4];
#pragma unroll
            for (int mt = 0; mt < MT; ++mt) {
                if constexpr (Q_IN_REGS) {
#pragma unroll
                    for (int e = 0; e < 4; ++e) qa[mt][e] = q_frag[mt][kk][e];
                } else {
                    ldmatrix_x4(qa[mt], a_frag_addr(s_q, LD, w0 + mt * 16, kk * 16, lane));
                }
            }
#pragma unroll
            for (int np = 0; np < BC / 16; ++np) {
                uint32_t bk[4];
                ldmatrix_x4(bk, b_frag_addr(k_tile, LD, np * 16, kk * 16, lane));
#pragma unroll
                for (int mt = 0; mt < MT; ++mt) {
                    mma_bf16(acc_s[mt][2 * np], qa[mt], bk[0], bk[1]);
                    mma_bf16(acc_s[mt][2 * np + 1], qa[mt], bk[2], bk[3]);
                }
            }
        }

        const int n0 = j * BC;
        if (n0 + BC > S || n0 + BC - 1 > offset + m0) {
#pragma unroll
            for (int mt = 0; mt < MT; ++mt)
#pragma unroll
                for (int nt = 0; nt < BC / 8; ++nt)
#pragma unroll
                    for (int e = 0; e < 4; ++e) {
                        const int row = m0 + w0 + mt * 16 + grp + (e >> 1) * 8;
                        const int col = n0 + nt * 8 + quad * 2 + (e & 1);
                        if (col > offset + row || col >= S) acc_s[mt][nt][e] = -INFINITY;
                    }
        }

        // Block row maxima (scaled, log2 units), then one warp-wide decision: the running max
        // (the base of every exponent) moves only when some row of the warp has grown past it by
        // more than kRescaleSlack; otherwise the stale base stays, P stays below 2^kRescaleSlack,
        // and the rescaling of O and the sums is skipped. After the first blocks that is most
        // blocks. lse = base + log2(sum) is exact either way.
        float block_max[MT][2];
        bool grow = false;
#pragma unroll
        for (int mt = 0; mt < MT; ++mt)
#pragma unroll
            for (int r = 0; r < 2; ++r) {
                float mx = -INFINITY;
#pragma unroll
                for (int nt = 0; nt < BC / 8; ++nt) mx = fmaxf(mx, fmaxf(acc_s[mt][nt][2 * r], acc_s[mt][nt][2 * r + 1]));
                mx = fmaxf(mx, __shfl_xor_sync(0xffffffff, mx, 1));
                mx = fmaxf(mx, __shfl_xor_sync(0xffffffff, mx, 2));
                block_max[mt][r] = mx * scale_log2;  // scale_log2 > 0; -inf stays -inf
                grow |= block_max[mt][r] > row_max[mt][r] + kRescaleSlack;
            }
        if (__any_sync(0xffffffff, grow)) {
#pragma unroll
            for (int mt = 0; mt < MT; ++mt)
#pragma unroll
                for (int r = 0; r < 2; ++r) {
                    const float mx = fmaxf(row_max[mt][r], block_max[mt][r]);
                    // A row with nothing visible yet keeps max -inf (rescale of nothing: 0 sums).
                    const float rescale = mx == -INFINITY ? 1.f : exp2f(row_max[mt][r] - mx);
                    row_max[mt][r] = mx;
                    row_sum[mt][r] *= rescale;
#pragma unroll
                    for (int dn = 0; dn < D / 8; ++dn) {
                        acc_o[mt][dn][2 * r] *= rescale;
                        acc_o[mt][dn][2 * r + 1] *= rescale;
                    }
                }
        }
#pragma unroll
        for (int mt = 0; mt < MT; ++mt)
#pragma unroll
            for (int r = 0; r < 2; ++r) {
                // Subtracting 0 for a row with nothing visible yet yields p = exp2(-inf) = 0.
                const float base = row_max[mt][r] == -INFINITY ? 0.f : row_max[mt][r];
#pragma unroll
                for (int nt = 0; nt < BC / 8; ++nt)
#pragma unroll
                    for (int e = 0; e < 2; ++e) {
                        const float p = exp2f(fmaf(acc_s[mt][nt][2 * r + e], scale_log2, -base));
                        acc_s[mt][nt][2 * r + e] = p;
                        row_sum[mt][r] += p;
                    }
            }

        // O += P V: the S accumulator fragments of n-tiles (2kk, 2kk+1) are exactly the A
        // fragment of the kk-th 16-key slice, so P never leaves registers.
#pragma unroll
        for (int kk = 0; kk < BC / 16; ++kk) {
            uint32_t p_frag[MT][4];
#pragma unroll
            for (int mt = 0; mt < MT; ++mt) {
                p_frag[mt][0] = pack_bf16(acc_s[mt][2 * kk][0], acc_s[mt][2 * kk][1]);
                p_frag[mt][1] = pack_bf16(acc_s[mt][2 * kk][2], acc_s[mt][2 * kk][3]);
                p_frag[mt][2] = pack_bf16(acc_s[mt][2 * kk + 1][0], acc_s[mt][2 * kk + 1][1]);
                p_frag[mt][3] = pack_bf16(acc_s[mt][2 * kk + 1][2], acc_s[mt][2 * kk + 1][3]);
            }
#pragma unroll
            for (int np = 0; np < D / 16; ++np) {
                uint32_t bv[4];
                ldmatrix_x4_trans(bv, bt_frag_addr(v_tile, LD, kk * 16, np * 16, lane));
#pragma unroll
                for (int mt = 0; mt < MT; ++mt) {
                    mma_bf16(acc_o[mt][2 * np], p_frag[mt], bv[0], bv[1]);
                    mma_bf16(acc_o[mt][2 * np + 1], p_frag[mt], bv[2], bv[3]);
                }
            }
        }
        // The next iteration prefetches into the stage just read.
        __syncthreads();
    }

    bf16* o_h = o + (size_t)(b * H + h) * T * D;
#pragma unroll
    for (int mt = 0; mt < MT; ++mt)
#pragma unroll
        for (int r = 0; r < 2; ++r) {
            float sum = row_sum[mt][r];
            sum += __shfl_xor_sync(0xffffffff, sum, 1);
            sum += __shfl_xor_sync(0xffffffff, sum, 2);
            const float inv = sum > 0.f ? 1.f / sum : 0.f;
            const int row = m0 + w0 + mt * 16 + grp + r * 8;
            if (row < T) {
#pragma unroll
                for (int dn = 0; dn < D / 8; ++dn)
                    *reinterpret_cast<uint32_t*>(o_h + (size_t)row * D + dn * 8 + quad * 2) =
                        pack_bf16(acc_o[mt][dn][2 * r] * inv, acc_o[mt][dn][2 * r + 1] * inv);
                // Log-sum-exp of the scaled scores, in log2 units: p = exp2(s * scale_log2 - lse).
                if (quad == 0) lse[(size_t)(b * H + h) * T + row] = row_max[mt][r] + log2f(sum);
            }
        }
}

// ---------------------------------------------------------------------------------------
// Backward, step 1: delta[i] = sum_d dO[i, d] * O[i, d]; one warp per row.
template <int D>
__device__ __forceinline__ void flash_bwd_delta(const bf16* __restrict__ o, const bf16* __restrict__ dout,
                                                float* __restrict__ delta, int rows) {
    const int row = blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32, lane = threadIdx.x % 32;
    if (row >= rows) return;
    float acc = 0.f;
#pragma unroll
    for (int c = lane * 2; c < D; c += 64) {
        const __nv_bfloat162 a = *reinterpret_cast<const __nv_bfloat162*>(o + (size_t)row * D + c);
        const __nv_bfloat162 g = *reinterpret_cast<const __nv_bfloat162*>(dout + (size_t)row * D + c);
        const float2 af = __bfloat1622float2(a), gf = __bfloat1622float2(g);
        acc += af.x * gf.x + af.y * gf.y;
    }
#pragma unroll
    for (int s = 16; s > 0; s >>= 1) acc += __shfl_xor_sync(0xffffffff, acc, s);
    if (lane == 0) delta[row] = acc;
}

// Backward, step 2. Grid (ceil(S / BC), KVH, B); WARPS warps each own 16 keys (BC = 16 WARPS)
// and keep their dK, dV rows in registers while the block walks every query head of the
// group and every query block of BR rows that sees the keys (Q, dO, lse, delta double
// buffered). Per step, with S^T = K Q^T kept transposed so that P^T and dS^T are already the
// A operands of dV += P^T dO and dK += dS^T Q: dS^T goes through shared memory for
// dQ += dS K, which is added to the f32 dq_accum with atomics (unscaled; step 3 scales).
template <int D, int WARPS, int BR>
__device__ __forceinline__ void flash_bwd(const bf16* __restrict__ q, const bf16* __restrict__ k,
                                          const bf16* __restrict__ v, const bf16* __restrict__ dout,
                                          const float* __restrict__ lse, const float* __restrict__ delta,
                                          float* __restrict__ dq_accum, bf16* __restrict__ dk,
                                          bf16* __restrict__ dv, int T, int S, int H, int KVH, int offset,
                                          float scale_log2, float scale) {
    constexpr int BC = 16 * WARPS, THREADS = 32 * WARPS, LD = D + kPad, LDS = BR + kPad;
    // dQ = dS K split over warps: each warp takes one 16-row m-tile and DQ_NT 8-wide d-tiles.
    constexpr int M_TILES = BR / 16, WARPS_PER_M = WARPS / M_TILES, DQ_NT = D / 8 / WARPS_PER_M;
    static_assert(WARPS % M_TILES == 0 && DQ_NT % 2 == 0, "dQ tiling must cover the block evenly");
    extern __shared__ __align__(16) unsigned char smem[];
    bf16* s_k = reinterpret_cast<bf16*>(smem);
    bf16* s_v = s_k + BC * LD;
    bf16* s_q = s_v + BC * LD;       // 2 stages
    bf16* s_do = s_q + 2 * BR * LD;  // 2 stages
    bf16* s_ds = s_do + 2 * BR * LD; // [BC][LDS], dS^T
    float* s_lse = reinterpret_cast<float*>(s_ds + BC * LDS);  // 2 stages
    float* s_delta = s_lse + 2 * BR;                           // 2 stages

    const int n0 = blockIdx.x * BC, kvh = blockIdx.y, b = blockIdx.z;
    const int group = H / KVH;
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, grp = lane >> 2, quad = lane & 3;
    const bf16* k_h = k + (size_t)(b * KVH + kvh) * S * D;
    const bf16* v_h = v + (size_t)(b * KVH + kvh) * S * D;

    // Query blocks that see at least one key of this block: rows i >= n0 - offset.
    const int m_first = max(0, n0 - offset) / BR;
    const int m_count = max(0, (T + BR - 1) / BR - m_first);
    const int steps = group * m_count;

    auto load_step = [&](int h, int m_block, int stage) {
        const int m0 = m_block * BR;
        const size_t head = (size_t)(b * H + h) * T;
        load_tile_async<BR, D, THREADS>(s_q + stage * BR * LD, q + head * D, m0, T);
        load_tile_async<BR, D, THREADS>(s_do + stage * BR * LD, dout + head * D, m0, T);
        for (int i = threadIdx.x; i < BR; i += THREADS) {
            const bool valid = m0 + i < T;
            s_lse[stage * BR + i] = valid ? lse[head + m0 + i] : 0.f;
            s_delta[stage * BR + i] = valid ? delta[head + m0 + i] : 0.f;
        }
    };

    load_tile_async<BC, D, THREADS>(s_k, k_h, n0, S);
    load_tile_async<BC, D, THREADS>(s_v, v_h, n0, S);
    if (steps > 0) load_step(kvh * group, m_first, 0);
    cp_async_commit();

    float acc_dk[D / 8][4], acc_dv[D / 8][4];
#pragma unroll
    for (int i = 0; i < D / 8; ++i)
#pragma unroll
        for (int e = 0; e < 4; ++e) acc_dk[i][e] = acc_dv[i][e] = 0.f;

    const int dq_mt = warp % M_TILES, dq_nt0 = (warp / M_TILES) * DQ_NT;

    // (head, query block) of this step and the next, advanced without a division per step.
    int h = kvh * group, m_block = m_first;
    int next_h = h, next_m_block = m_block;
    for (int step = 0; step < steps; ++step) {
        const int stage = step & 1;
        if (++next_m_block == m_first + m_count) next_m_block = m_first, ++next_h;
        if (step + 1 < steps) load_step(next_h, next_m_block, stage ^ 1);
        cp_async_commit();
        cp_async_wait<1>();
        __syncthreads();
        const int m0 = m_block * BR;
        // Every (key, query) pair of the step visible and in range: the block-uniform fast path
        // skips the per-element mask (most steps; only those near the diagonal need it).
        const bool all_visible = n0 + BC - 1 <= offset + m0 && m0 + BR <= T && n0 + BC <= S;
        const bf16* q_tile = s_q + stage * BR * LD;
        const bf16* do_tile = s_do + stage * BR * LD;
        const float* lse_tile = s_lse + stage * BR;
        const float* delta_tile = s_delta + stage * BR;

        // S^T and dP^T = V dO^T for this warp's 16 keys x BR queries.
        float acc_s[BR / 8][4], acc_dp[BR / 8][4];
#pragma unroll
        for (int i = 0; i < BR / 8; ++i)
#pragma unroll
            for (int e = 0; e < 4; ++e) acc_s[i][e] = acc_dp[i][e] = 0.f;
#pragma unroll
        for (int kk = 0; kk < D / 16; ++kk) {
            uint32_t k_frag[4], v_frag[4];
            ldmatrix_x4(k_frag, a_frag_addr(s_k, LD, warp * 16, kk * 16, lane));
            ldmatrix_x4(v_frag, a_frag_addr(s_v, LD, warp * 16, kk * 16, lane));
#pragma unroll
            for (int np = 0; np < BR / 16; ++np) {
                uint32_t bq[4], bdo[4];
                ldmatrix_x4(bq, b_frag_addr(q_tile, LD, np * 16, kk * 16, lane));
                ldmatrix_x4(bdo, b_frag_addr(do_tile, LD, np * 16, kk * 16, lane));
                mma_bf16(acc_s[2 * np], k_frag, bq[0], bq[1]);
                mma_bf16(acc_s[2 * np + 1], k_frag, bq[2], bq[3]);
                mma_bf16(acc_dp[2 * np], v_frag, bdo[0], bdo[1]);
                mma_bf16(acc_dp[2 * np + 1], v_frag, bdo[2], bdo[3]);
            }
        }

        // P^T from the saved log-sum-exp; dS^T = P^T (dP^T - delta), also stored for dQ.
#pragma unroll
        for (int nt = 0; nt < BR / 8; ++nt) {
            const float2 lse2 = *reinterpret_cast<const float2*>(lse_tile + nt * 8 + quad * 2);
            const float2 delta2 = *reinterpret_cast<const float2*>(delta_tile + nt * 8 + quad * 2);
#pragma unroll
            for (int e = 0; e < 4; ++e) {
                // A masked score can exceed the row's log-sum-exp (exp2 gives inf): selected away.
                float p = exp2f(fmaf(acc_s[nt][e], scale_log2, -((e & 1) ? lse2.y : lse2.x)));
                if (!all_visible) {
                    const int key = n0 + warp * 16 + grp + (e >> 1) * 8;
                    const int query = m0 + nt * 8 + quad * 2 + (e & 1);
                    p = key <= offset + query && query < T && key < S ? p : 0.f;
                }
                acc_s[nt][e] = p;
                acc_dp[nt][e] = p * (acc_dp[nt][e] - ((e & 1) ? delta2.y : delta2.x));
            }
#pragma unroll
            for (int r = 0; r < 2; ++r)
                *reinterpret_cast<uint32_t*>(s_ds + (warp * 16 + grp + r * 8) * LDS + nt * 8 + quad * 2) =
                    pack_bf16(acc_dp[nt][2 * r], acc_dp[nt][2 * r + 1]);
        }

        // dV += P^T dO and dK += dS^T Q (contraction over the BR queries).
#pragma unroll
        for (int kk = 0; kk < BR / 16; ++kk) {
            const uint32_t p_frag[4] = {
                pack_bf16(acc_s[2 * kk][0], acc_s[2 * kk][1]), pack_bf16(acc_s[2 * kk][2], acc_s[2 * kk][3]),
                pack_bf16(acc_s[2 * kk + 1][0], acc_s[2 * kk + 1][1]),
                pack_bf16(acc_s[2 * kk + 1][2], acc_s[2 * kk + 1][3])};
            const uint32_t ds_frag[4] = {
                pack_bf16(acc_dp[2 * kk][0], acc_dp[2 * kk][1]), pack_bf16(acc_dp[2 * kk][2], acc_dp[2 * kk][3]),
                pack_bf16(acc_dp[2 * kk + 1][0], acc_dp[2 * kk + 1][1]),
                pack_bf16(acc_dp[2 * kk + 1][2], acc_dp[2 * kk + 1][3])};
#pragma unroll
            for (int np = 0; np < D / 16; ++np) {
                uint32_t bdo[4], bq[4];
                ldmatrix_x4_trans(bdo, bt_frag_addr(do_tile, LD, kk * 16, np * 16, lane));
                ldmatrix_x4_trans(bq, bt_frag_addr(q_tile, LD, kk * 16, np * 16, lane));
                mma_bf16(acc_dv[2 * np], p_frag, bdo[0], bdo[1]);
                mma_bf16(acc_dv[2 * np + 1], p_frag, bdo[2], bdo[3]);
                mma_bf16(acc_dk[2 * np], ds_frag, bq[0], bq[1]);
                mma_bf16(acc_dk[2 * np + 1], ds_frag, bq[2], bq[3]);
            }
        }
        __syncthreads();

        // dQ[m-tile, d-tiles] += dS K over the BC keys; dS is read transposed from s_ds.
        float acc_dq[DQ_NT][4];
#pragma unroll
        for (int i = 0; i < DQ_NT; ++i) acc_dq[i][0] = acc_dq[i][1] = acc_dq[i][2] = acc_dq[i][3] = 0.f;
#pragma unroll
        for (int kk = 0; kk < BC / 16; ++kk) {
            uint32_t ds_frag[4];
            // A = dS (queries x keys) from dS^T stored [key][query]: lanes 0-7 keys 0-7 /
            // queries 0-7, 8-15 queries +8, 16-23 keys +8, 24-31 both.
            ldmatrix_x4_trans(ds_frag,
                              s_ds + (kk * 16 + (lane & 7) + (lane >> 4) * 8) * LDS + dq_mt * 16 + ((lane >> 3) & 1) * 8);
#pragma unroll
            for (int np = 0; np < DQ_NT / 2; ++np) {
                uint32_t bk[4];
                ldmatrix_x4_trans(bk, bt_frag_addr(s_k, LD, kk * 16, (dq_nt0 + 2 * np) * 8, lane));
                mma_bf16(acc_dq[2 * np], ds_frag, bk[0], bk[1]);
                mma_bf16(acc_dq[2 * np + 1], ds_frag, bk[2], bk[3]);
            }
        }
        // Two adjacent columns per atomic (sm_90's vector atomicAdd): half the instructions,
        // and each warp-wide atomic covers whole 32-byte sectors.
        float* dq_h = dq_accum + (size_t)(b * H + h) * T * D;
#pragma unroll
        for (int r = 0; r < 2; ++r) {
            const int row = m0 + dq_mt * 16 + grp + r * 8;
            if (row >= T) continue;
            float* dq_row = dq_h + (size_t)row * D + dq_nt0 * 8 + quad * 2;
#pragma unroll
            for (int nt = 0; nt < DQ_NT; ++nt) {
#if __CUDA_ARCH__ >= 900
                atomicAdd(reinterpret_cast<float2*>(dq_row + nt * 8), make_float2(acc_dq[nt][2 * r], acc_dq[nt][2 * r + 1]));
#else
                atomicAdd(dq_row + nt * 8, acc_dq[nt][2 * r]);
                atomicAdd(dq_row + nt * 8 + 1, acc_dq[nt][2 * r + 1]);
#endif
            }
        }
        h = next_h, m_block = next_m_block;
        // s_ds and this stage's buffers are overwritten next step.
        __syncthreads();
    }

    bf16* dk_h = dk + (size_t)(b * KVH + kvh) * S * D;
    bf16* dv_h = dv + (size_t)(b * KVH + kvh) * S * D;
#pragma unroll
    for (int r = 0; r < 2; ++r) {
        const int key = n0 + warp * 16 + grp + r * 8;
        if (key >= S) continue;
#pragma unroll
        for (int dn = 0; dn < D / 8; ++dn) {
            const size_t at = (size_t)key * D + dn * 8 + quad * 2;
            *reinterpret_cast<uint32_t*>(dk_h + at) =
                pack_bf16(acc_dk[dn][2 * r] * scale, acc_dk[dn][2 * r + 1] * scale);
            *reinterpret_cast<uint32_t*>(dv_h + at) = pack_bf16(acc_dv[dn][2 * r], acc_dv[dn][2 * r + 1]);
        }
    }
}


// ---------------------------------------------------------------------------------------
// Forward for width 128 on Hopper's warpgroup MMA (wgmma), selected with
// ALTFORMERS_ATTENTION_FWD=wgmma until it has been measured against the mma.sync kernel above.
// A CTA of two warpgroups owns 128 query rows (64 each, one m64 wgmma row block); key tiles
// of 128 rows stream through two cp.async stages. S = Q K^T reads both operands straight from
// shared memory (no ldmatrix, no register fragments for Q or K), and O += P V takes P from
// the S accumulators in registers and V from shared memory: the tensor cores read shared
// memory themselves, which is what lifts the mma.sync kernels' shared-memory ceiling.
//
// Shared tiles are [rows][128] bf16 stored as two column halves of [rows][64] with 128-byte
// rows, each 16-byte chunk c of row r at chunk c ^ (r % 8): the 128-byte swizzle the wgmma
// descriptors name. K and V tiles have the same layout; K is read as a K-major operand (S
// contracts over d), V as an MN-major one (O contracts over keys).
namespace wg {

constexpr int kRows = 128, kKeys = 128, kD = 128, kThreads = 256;
constexpr int kHalfBytes = 128;  // one swizzled row of a column half: 64 bf16

// Byte offset of 16-byte chunk `chunk` (0..15 along d) of row `row` in a tile of `rows` rows.
__device__ __forceinline__ uint32_t chunk_offset(int rows, int row, int chunk) {
    const int half = chunk >> 3, c = chunk & 7;
    return half * rows * kHalfBytes + row * kHalfBytes + ((c ^ (row & 7)) << 4);
}

// Rows row0 .. row0 + rows of a [n, 128] matrix into a swizzled tile (zero-filled past n).
template <int ROWS>
__device__ __forceinline__ void load_tile(uint32_t tile, const bf16* src, int row0, int n) {
    constexpr int kChunks = ROWS * kD / 8;
    static_assert(kChunks % kThreads == 0, "whole chunks per thread");
#pragma unroll
    for (int i = 0; i < kChunks / kThreads; ++i) {
        const int c = i * kThreads + threadIdx.x, row = c >> 4, chunk = c & 15;
        const bool valid = row0 + row < n;
        const bf16* from = valid ? src + (size_t)(row0 + row) * kD + chunk * 8 : src;
        asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(tile + chunk_offset(ROWS, row, chunk)),
                     "l"(from), "r"(valid ? 16 : 0));
    }
}

// Shared-memory matrix descriptor, 128-byte swizzle (PTX ISA, "Matrix Descriptor Format").
__device__ __forceinline__ uint64_t descriptor(uint32_t addr, uint32_t leading_bytes, uint32_t stride_bytes) {
    return (uint64_t)((addr & 0x3FFFF) >> 4) | (uint64_t)((leading_bytes >> 4) & 0x3FFF) << 16 |
           (uint64_t)((stride_bytes >> 4) & 0x3FFF) << 32 | (uint64_t)1 << 62;
}

// D (+)= A B^T, A [64, 16] and B [128, 16] K-major in shared memory.
__device__ __forceinline__ void mma_ss(float (&d)[64], uint64_t a, uint64_t b, int accumulate) {
    asm volatile(
        "{\n.reg .pred p;\nsetp.ne.b32 p, %66, 0;\n"
        "wgmma.mma_async.sync.aligned.m64n128k16.f32.bf16.bf16 {%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, %48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63}, %64, %65, p, 1, 1, 0, 0;\n}\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]), "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]), "+f"(d[40]), "+f"(d[41]), "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]), "+f"(d[48]), "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]), "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), "+f"(d[62]), "+f"(d[63])
        : "l"(a), "l"(b), "r"(accumulate));
}

// D += A B, A [64, 16] bf16 fragments in registers (mma.m16n8k16's A layout per warp), B
// [16, 128] MN-major in shared memory.
__device__ __forceinline__ void mma_rs(float (&d)[64], const uint32_t (&a)[4], uint64_t b) {
    asm volatile(
        "{\n.reg .pred p;\nsetp.ne.b32 p, %69, 0;\n"
        "wgmma.mma_async.sync.aligned.m64n128k16.f32.bf16.bf16 {%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, %48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63}, {%64, %65, %66, %67}, %68, p, 1, 1, 1;\n}\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]), "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]), "+f"(d[40]), "+f"(d[41]), "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]), "+f"(d[48]), "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]), "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), "+f"(d[62]), "+f"(d[63])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(b), "r"(1));
}

__device__ __forceinline__ void fence() { asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory"); }
__device__ __forceinline__ void commit() { asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory"); }
__device__ __forceinline__ void wait_all() { asm volatile("wgmma.wait_group.sync.aligned 0;\n" ::: "memory"); }
// cp.async writes are generic-proxy writes; wgmma reads through the async proxy.
__device__ __forceinline__ void fence_async_shared() { asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory"); }

}  // namespace wg

// Grid (ceil(T / 128), H, B), 256 threads: warpgroup wg owns rows m0 + 64 wg .. + 63; warp w
// of it rows + 16 (w % 4), the same per-warp row block as the accumulators of mma.m16n8k16,
// so the softmax below is the mma.sync kernel's with one m-tile and 16 n-tiles.
__device__ __forceinline__ void flash_fwd_wgmma(const bf16* __restrict__ q, const bf16* __restrict__ k,
                                                const bf16* __restrict__ v, bf16* __restrict__ o,
                                                float* __restrict__ lse, int T, int S, int H, int KVH, int offset,
                                                float scale_log2) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
    using namespace wg;
    constexpr int kTileBytes = kRows * kD * 2;  // Q, and each K or V stage (kKeys == kRows)
    extern __shared__ __align__(16) unsigned char smem[];
    // The swizzle repeats every 1024 bytes: tiles start on a 1024-byte boundary (the launch
    // asks for 1 KB more than the tiles need).
    const uint32_t base = (smem_addr(smem) + 1023) & ~1023u;
    const uint32_t s_q = base, s_k = base + kTileBytes, s_v = base + 3 * kTileBytes;  // K, V: 2 stages each

    const int m0 = (gridDim.x - 1 - blockIdx.x) * kRows, h = blockIdx.y, b = blockIdx.z;
    const int kvh = h / (H / KVH);
    const int wgi = threadIdx.x / 128, warp = (threadIdx.x / 32) % 4, lane = threadIdx.x % 32;
    const int grp = lane >> 2, quad = lane & 3;
    const int row_lo = m0 + wgi * 64 + warp * 16 + grp;  // this thread's rows: row_lo, row_lo + 8
    const bf16* q_h = q + (size_t)(b * H + h) * T * kD;
    const bf16* k_h = k + (size_t)(b * KVH + kvh) * S * kD;
    const bf16* v_h = v + (size_t)(b * KVH + kvh) * S * kD;
    const int key_end = min(S, offset + m0 + kRows);
    const int key_blocks = (key_end + kKeys - 1) / kKeys;

    load_tile<kRows>(s_q, q_h, m0, T);
    load_tile<kKeys>(s_k, k_h, 0, S);
    load_tile<kKeys>(s_v, v_h, 0, S);
    cp_async_commit();

    float acc_o[64], acc_s[64];
#pragma unroll
    for (int i = 0; i < 64; ++i) acc_o[i] = acc_s[i] = 0.f;
    float row_max[2] = {-INFINITY, -INFINITY}, row_sum[2] = {0.f, 0.f};

    for (int j = 0; j < key_blocks; ++j) {
        const int stage = j & 1;
        if (j + 1 < key_blocks) {
            load_tile<kKeys>(s_k + (stage ^ 1) * kTileBytes, k_h, (j + 1) * kKeys, S);
            load_tile<kKeys>(s_v + (stage ^ 1) * kTileBytes, v_h, (j + 1) * kKeys, S);
        }
        cp_async_commit();
        cp_async_wait<1>();
        fence_async_shared();
        __syncthreads();
        const uint32_t k_tile = s_k + stage * kTileBytes, v_tile = s_v + stage * kTileBytes;

        // S = Q K^T over d in 8 steps of 16: within a column half the step moves 32 bytes
        // along the swizzled rows (the hardware applies the swizzle to the final address).
        fence();
#pragma unroll
        for (int kk = 0; kk < kD / 16; ++kk) {
            const uint32_t col = (kk >> 2) * kRows * kHalfBytes + (kk & 3) * 32;
            const uint64_t a = descriptor(s_q + wgi * 64 * kHalfBytes + col, 16, 1024);
            const uint64_t bk = descriptor(k_tile + col, 16, 1024);
            mma_ss(acc_s, a, bk, kk > 0);
        }
        commit();
        wait_all();

        // acc_s[4 n + e]: row row_lo + 8 (e >> 1), key n0 + 8 n + 2 quad + (e & 1).
        const int n0 = j * kKeys;
        if (n0 + kKeys > S || n0 + kKeys - 1 > offset + m0) {
#pragma unroll
            for (int n = 0; n < 16; ++n)
#pragma unroll
                for (int e = 0; e < 4; ++e) {
                    const int row = row_lo + (e >> 1) * 8, col = n0 + n * 8 + quad * 2 + (e & 1);
                    if (col > offset + row || col >= S) acc_s[4 * n + e] = -INFINITY;
                }
        }
#pragma unroll
        for (int r = 0; r < 2; ++r) {
            float mx = -INFINITY;
#pragma unroll
            for (int n = 0; n < 16; ++n) mx = fmaxf(mx, fmaxf(acc_s[4 * n + 2 * r], acc_s[4 * n + 2 * r + 1]));
            mx = fmaxf(mx, __shfl_xor_sync(0xffffffff, mx, 1));
            mx = fmaxf(mx, __shfl_xor_sync(0xffffffff, mx, 2));
            mx = fmaxf(row_max[r], mx * scale_log2);
            // A row with nothing visible yet keeps max -inf; subtracting 0 then yields p = 0.
            const float base_r = mx == -INFINITY ? 0.f : mx;
            const float rescale = exp2f(row_max[r] - base_r);
            row_max[r] = mx;
            row_sum[r] *= rescale;
#pragma unroll
            for (int n = 0; n < 16; ++n) {
                acc_o[4 * n + 2 * r] *= rescale;
                acc_o[4 * n + 2 * r + 1] *= rescale;
#pragma unroll
                for (int e = 0; e < 2; ++e) {
                    const float p = exp2f(fmaf(acc_s[4 * n + 2 * r + e], scale_log2, -base_r));
                    acc_s[4 * n + 2 * r + e] = p;
                    row_sum[r] += p;
                }
            }
        }

        // O += P V over the 128 keys in 8 steps of 16: P's n-tiles (2 kk, 2 kk + 1) are the
        // A fragment of step kk; V's 16 key rows are two 8-row groups (1024 bytes apart),
        // its two column halves one tile-half apart.
        // (All of P packed before the fence: registers an in-flight wgmma reads must not change.)
        uint32_t p_frag[kKeys / 16][4];
#pragma unroll
        for (int kk = 0; kk < kKeys / 16; ++kk)
#pragma unroll
            for (int i = 0; i < 4; ++i) p_frag[kk][i] = pack_bf16(acc_s[8 * kk + 2 * i], acc_s[8 * kk + 2 * i + 1]);
        fence();
#pragma unroll
        for (int kk = 0; kk < kKeys / 16; ++kk)
            mma_rs(acc_o, p_frag[kk], descriptor(v_tile + kk * 16 * kHalfBytes, kKeys * kHalfBytes, 1024));
        commit();
        wait_all();
        // The next iteration prefetches into the stage just read.
        __syncthreads();
    }

    bf16* o_h = o + (size_t)(b * H + h) * T * kD;
#pragma unroll
    for (int r = 0; r < 2; ++r) {
        float sum = row_sum[r];
        sum += __shfl_xor_sync(0xffffffff, sum, 1);
        sum += __shfl_xor_sync(0xffffffff, sum, 2);
        const float inv = sum > 0.f ? 1.f / sum : 0.f;
        const int row = row_lo + r * 8;
        if (row < T) {
#pragma unroll
            for (int n = 0; n < 16; ++n)
                *reinterpret_cast<uint32_t*>(o_h + (size_t)row * kD + n * 8 + quad * 2) =
                    pack_bf16(acc_o[4 * n + 2 * r] * inv, acc_o[4 * n + 2 * r + 1] * inv);
            if (quad == 0) lse[(size_t)(b * H + h) * T + row] = row_max[r] + log2f(sum);
        }
    }
#else
    __trap();  // built for a target without wgmma (sm_90a)
#endif
}
}  // namespace

// Entry points, one per head width. Tile parameters must match `Tiles` in flash_attention.rs.
#define FLASH_ENTRY_POINTS(D, FWD_WARPS, FWD_BC, FWD_MT, BWD_WARPS, BWD_BR)                                          \
    extern "C" __global__ void __launch_bounds__(32 * FWD_WARPS)                                             \
        flash_attention_fwd_d##D(const bf16* q, const bf16* k, const bf16* v, bf16* o, float* lse, int T,    \
                                 int S, int H, int KVH, int offset, float scale_log2) {                      \
        flash_fwd<D, FWD_WARPS, FWD_BC, FWD_MT>(q, k, v, o, lse, T, S, H, KVH, offset, scale_log2);                  \
    }                                                                                                        \
    extern "C" __global__ void flash_attention_bwd_delta_d##D(const bf16* o, const bf16* dout, float* delta, \
                                                              int rows) {                                    \
        flash_bwd_delta<D>(o, dout, delta, rows);                                                            \
    }                                                                                                        \
    extern "C" __global__ void __launch_bounds__(32 * BWD_WARPS) flash_attention_bwd_d##D(                   \
        const bf16* q, const bf16* k, const bf16* v, const bf16* dout, const float* lse, const float* delta, \
        float* dq_accum, bf16* dk, bf16* dv, int T, int S, int H, int KVH, int offset, float scale_log2,      \
        float scale) {                                                                                       \
        flash_bwd<D, BWD_WARPS, BWD_BR>(q, k, v, dout, lse, delta, dq_accum, dk, dv, T, S, H, KVH, offset,   \
                                        scale_log2, scale);                                                  \
    }

FLASH_ENTRY_POINTS(64, 4, 64, 1, 4, 64)
FLASH_ENTRY_POINTS(128, 4, 32, 2, 8, 64)

extern "C" __global__ void __launch_bounds__(256)
    flash_attention_fwd_wgmma_d128(const bf16* q, const bf16* k, const bf16* v, bf16* o, float* lse, int T, int S,
                                   int H, int KVH, int offset, float scale_log2) {
    flash_fwd_wgmma(q, k, v, o, lse, T, S, H, KVH, offset, scale_log2);
}

// Backward, step 3: dq = scale * dq_accum in bf16.
extern "C" __global__ void flash_attention_bwd_dq_convert(const float* dq_accum, bf16* dq, float scale, size_t n) {
    for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x)
        dq[i] = __float2bfloat16(dq_accum[i] * scale);
}
