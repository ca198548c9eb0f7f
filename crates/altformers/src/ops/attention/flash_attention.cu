// Fused causal attention for sm_90 in bf16 with f32 accumulation (FlashAttention-2 style):
// forward (output + per-row log-sum-exp), and backward (D = rowsum(dO * O), then dK/dV per
// key block with dQ accumulated atomically in f32, then dQ converted to bf16).
// Tile sizes and shared-memory layouts are mirrored in cuda.rs beside this file (`Tiles`); the
// reasons for them are given there.
//
// Layouts: q [B, T, H, D], k and v [B, S, KVH, D] at any strides (`Strides`, in elements:
// rows of D contiguous and 16-byte aligned), so the heads of a projection's output are read
// in place; o, dout [B, T, H, D] contiguous (token-major: the output projection reads o as
// [B, T, H D] without a transpose), dq [B, T, H, D] and dk, dv [B, S, KVH, D] token-major at
// their own strides (contiguous, or the parts of one fused projection's gradient); lse, delta and the f32
// dq_accum [B, H, T(, D)] contiguous. Query head h reads key/value head h / (H / KVH). Query
// row i sees key j when j <= offset + i (and j < S).
//
// Dropout on the probabilities (threshold > 0): P[b, h, i, j] is kept iff
// dropout_bits(seed, ((b0 + b) H + h) T + i) S + j) >= threshold and scaled by drop_scale,
// the mask the unfused path's dropout of the [B, H, T, S] probabilities draws (b0: the first
// sequence of a slice of the batch). The forward's row sums are of the undropped P; the
// backward uses the dropped P for dV and dS = P (dP_dropped - D) with
// dP_dropped = (dO V^T) * mask * drop_scale and D = rowsum(dO * O) (FlashAttention-2, sec. 3.1).
//
// Tensor-core fragments follow PTX mma.m16n8k16 (row.col, bf16 in, f32 accumulate). With
// lane = 4 * grp + quad: A regs hold (row grp | grp + 8, cols 2 quad + {0,1} | + 8),
// B regs hold (k rows 2 quad + {0,1} | + 8, col grp), C holds (row grp | grp + 8,
// cols 2 quad + {0,1}). Shared tiles are padded by 8 elements per row so that the 8 row
// addresses of each ldmatrix phase fall into distinct banks.
#include <cuda_bf16.h>
#include <stdint.h>

#include "async_copy.cuh"
#include "convert.cuh"
#include "dropout.cuh"
#include "flash_attention_bwd.cuh"

typedef __nv_bfloat16 bf16;

// Element strides of a [B, rows, heads, D] operand: sequence, head and row (D is contiguous).
struct Strides {
    long long batch, head, row;
};

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

// Copies rows row0 .. row0 + ROWS of a [rows, D] matrix with rows `ld` elements apart into a
// padded shared tile, zero-filling rows at or beyond `rows`.
template <int ROWS, int D, int THREADS>
__device__ __forceinline__ void load_tile_async(bf16* tile, const bf16* src, long long ld, int row0, int rows) {
    constexpr int kChunks = D / 8, kTotal = ROWS * kChunks;
    // A compile-time trip count, so the loop unrolls into straight-line copies.
#pragma unroll
    for (int i = 0; i < (kTotal + THREADS - 1) / THREADS; ++i) {
        const int c = i * THREADS + threadIdx.x;
        if (kTotal % THREADS != 0 && c >= kTotal) break;
        const int r = c / kChunks, col = (c % kChunks) * 8;
        const bool valid = row0 + r < rows;
        const bf16* from = valid ? src + (row0 + r) * ld + col : src;
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
                                          const bf16* __restrict__ v, Strides qs, Strides ks, Strides vs,
                                          bf16* __restrict__ o, float* __restrict__ lse, int T, int S, int H,
                                          int KVH, int offset,
                                          float scale_log2, unsigned int seed_lo, unsigned int seed_hi,
                                          unsigned int threshold, float drop_scale, int b0) {
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
    const bf16* q_h = q + b * qs.batch + h * qs.head;
    const bf16* k_h = k + b * ks.batch + kvh * ks.head;
    const bf16* v_h = v + b * vs.batch + kvh * vs.head;

    // Keys seen by any row of this tile: 0 .. min(S, offset + m0 + BR).
    const int key_end = min(S, offset + m0 + BR);
    const int key_blocks = (key_end + BC - 1) / BC;

    load_tile_async<BR, D, THREADS>(s_q, q_h, qs.row, m0, T);
    load_tile_async<BC, D, THREADS>(s_k, k_h, ks.row, 0, S);
    load_tile_async<BC, D, THREADS>(s_v, v_h, vs.row, 0, S);
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
            load_tile_async<BC, D, THREADS>(s_k + (stage ^ 1) * BC * LD, k_h, ks.row, (j + 1) * BC, S);
            load_tile_async<BC, D, THREADS>(s_v + (stage ^ 1) * BC * LD, v_h, vs.row, (j + 1) * BC, S);
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
                        row_sum[mt][r] += p;
                        float kept = p;
                        if (threshold != 0) {
                            const int row = m0 + w0 + mt * 16 + grp + r * 8;
                            const int col = j * BC + nt * 8 + quad * 2 + e;
                            const unsigned long long at =
                                ((unsigned long long)((b0 + b) * H + h) * T + row) * S + col;
                            kept = dropout_bits(seed_lo, seed_hi, at) >= threshold ? p * drop_scale : 0.f;
                        }
                        acc_s[mt][nt][2 * r + e] = kept;
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

    bf16* o_h = o + ((size_t)b * T * H + h) * D;  // token-major: rows H D apart
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
                    *reinterpret_cast<uint32_t*>(o_h + (size_t)row * H * D + dn * 8 + quad * 2) =
                        pack_bf16(acc_o[mt][dn][2 * r] * inv, acc_o[mt][dn][2 * r + 1] * inv);
                // Log-sum-exp of the scaled scores, in log2 units: p = exp2(s * scale_log2 - lse).
                if (quad == 0) lse[(size_t)(b * H + h) * T + row] = row_max[mt][r] + log2f(sum);
            }
        }
}

// ---------------------------------------------------------------------------------------
// Backward, step 1: delta[b, h, t] = sum_d dO[b, t, h, d] * O[b, t, h, d]; one warp per row.
template <int D>
__device__ __forceinline__ void flash_bwd_delta(const bf16* __restrict__ o, const bf16* __restrict__ dout,
                                                float* __restrict__ delta, int rows, int T, int H) {
    const int row = blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32, lane = threadIdx.x % 32;
    if (row >= rows) return;
    // row = (b H + h) T + t of delta; (b T + t) H + h of the token-major O and dO
    const size_t at = ((size_t)(row / (H * T)) * T + row % T) * H + (row / T) % H;
    float acc = 0.f;
#pragma unroll
    for (int c = lane * 2; c < D; c += 64) {
        const __nv_bfloat162 a = *reinterpret_cast<const __nv_bfloat162*>(o + at * D + c);
        const __nv_bfloat162 g = *reinterpret_cast<const __nv_bfloat162*>(dout + at * D + c);
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
                                          const bf16* __restrict__ v, Strides qs, Strides ks, Strides vs,
                                          const bf16* __restrict__ dout,
                                          const float* __restrict__ lse, const float* __restrict__ delta,
                                          float* __restrict__ dq_accum, bf16* __restrict__ dk,
                                          bf16* __restrict__ dv, Strides gs, int T, int S, int H, int KVH, int offset,
                                          float scale_log2, float scale, unsigned int seed_lo,
                                          unsigned int seed_hi, unsigned int threshold, float drop_scale, int b0) {
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
    const bf16* k_h = k + b * ks.batch + kvh * ks.head;
    const bf16* v_h = v + b * vs.batch + kvh * vs.head;

    const QueryBlocks blocks(n0, offset, T, BR);
    const int steps = group * blocks.count;

    auto load_step = [&](int h, int m_block, int stage) {
        const int m0 = m_block * BR;
        const size_t head = (size_t)(b * H + h) * T;
        load_tile_async<BR, D, THREADS>(s_q + stage * BR * LD, q + b * qs.batch + h * qs.head, qs.row, m0, T);
        load_tile_async<BR, D, THREADS>(s_do + stage * BR * LD, dout + ((size_t)b * T * H + h) * D, (long long)H * D,
                                        m0, T);
        for (int i = threadIdx.x; i < BR; i += THREADS) {
            const bool valid = m0 + i < T;
            s_lse[stage * BR + i] = valid ? lse[head + m0 + i] : 0.f;
            s_delta[stage * BR + i] = valid ? delta[head + m0 + i] : 0.f;
        }
    };

    load_tile_async<BC, D, THREADS>(s_k, k_h, ks.row, n0, S);
    load_tile_async<BC, D, THREADS>(s_v, v_h, vs.row, n0, S);
    if (steps > 0) load_step(kvh * group, blocks.first, 0);
    cp_async_commit();

    float acc_dk[D / 8][4], acc_dv[D / 8][4];
#pragma unroll
    for (int i = 0; i < D / 8; ++i)
#pragma unroll
        for (int e = 0; e < 4; ++e) acc_dk[i][e] = acc_dv[i][e] = 0.f;

    const int dq_mt = warp % M_TILES, dq_nt0 = (warp / M_TILES) * DQ_NT;

    // (head, query block) of this step and the next, advanced without a division per step.
    int h = kvh * group, m_block = blocks.first;
    int next_h = h, next_m_block = m_block;
    for (int step = 0; step < steps; ++step) {
        const int stage = step & 1;
        blocks.advance(next_h, next_m_block);
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
        // this head's first row in the dropout mask's coordinates
        const unsigned long long row0 = (unsigned long long)((b0 + b) * H + h) * T;

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
                const int key = n0 + warp * 16 + grp + (e >> 1) * 8, query = m0 + nt * 8 + quad * 2 + (e & 1);
                backward_element(acc_s[nt][e], acc_dp[nt][e], (e & 1) ? lse2.y : lse2.x, (e & 1) ? delta2.y : delta2.x,
                                 key, query, all_visible, offset, T, S, row0, scale_log2, seed_lo, seed_hi, threshold,
                                 drop_scale);
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

    // token-major at the gradients' strides `gs` (dk's and dv's)
    bf16* dk_h = dk + (size_t)b * gs.batch + (size_t)kvh * gs.head;
    bf16* dv_h = dv + (size_t)b * gs.batch + (size_t)kvh * gs.head;
#pragma unroll
    for (int r = 0; r < 2; ++r) {
        const int key = n0 + warp * 16 + grp + r * 8;
        if (key >= S) continue;
#pragma unroll
        for (int dn = 0; dn < D / 8; ++dn) {
            const size_t at = (size_t)key * gs.row + dn * 8 + quad * 2;
            *reinterpret_cast<uint32_t*>(dk_h + at) =
                pack_bf16(acc_dk[dn][2 * r] * scale, acc_dk[dn][2 * r + 1] * scale);
            *reinterpret_cast<uint32_t*>(dv_h + at) = pack_bf16(acc_dv[dn][2 * r], acc_dv[dn][2 * r + 1]);
        }
    }
}


}  // namespace

// Entry points, one per head width. Tile parameters must match `Tiles` in cuda.rs.
#define FLASH_ENTRY_POINTS(D, FWD_WARPS, FWD_BC, FWD_MT, BWD_WARPS, BWD_BR)                                          \
    extern "C" __global__ void __launch_bounds__(32 * FWD_WARPS)                                             \
        flash_attention_fwd_d##D(const bf16* q, const bf16* k, const bf16* v, Strides qs, Strides ks,        \
                                 Strides vs, bf16* o, float* lse, int T, int S, int H, int KVH, int offset,  \
                                 float scale_log2, unsigned int seed_lo, unsigned int seed_hi,               \
                                 unsigned int threshold, float drop_scale, int b0) {                         \
        flash_fwd<D, FWD_WARPS, FWD_BC, FWD_MT>(q, k, v, qs, ks, vs, o, lse, T, S, H, KVH, offset,           \
                                                scale_log2, seed_lo, seed_hi, threshold, drop_scale, b0);    \
    }                                                                                                        \
    extern "C" __global__ void flash_attention_bwd_delta_d##D(const bf16* o, const bf16* dout, float* delta, \
                                                              int rows, int T, int H) {                      \
        flash_bwd_delta<D>(o, dout, delta, rows, T, H);                                                      \
    }                                                                                                        \
    extern "C" __global__ void __launch_bounds__(32 * BWD_WARPS) flash_attention_bwd_d##D(                   \
        const bf16* q, const bf16* k, const bf16* v, Strides qs, Strides ks, Strides vs, const bf16* dout,   \
        const float* lse, const float* delta, float* dq_accum, bf16* dk, bf16* dv, Strides gs, int T, int S, \
        int H, int KVH, int offset, float scale_log2, float scale, unsigned int seed_lo,                    \
        unsigned int seed_hi, unsigned int threshold, float drop_scale, int b0) {                            \
        flash_bwd<D, BWD_WARPS, BWD_BR>(q, k, v, qs, ks, vs, dout, lse, delta, dq_accum, dk, dv, gs, T, S, H,\
                                        KVH, offset, scale_log2, scale, seed_lo, seed_hi, threshold,         \
                                        drop_scale, b0);                                                     \
    }

FLASH_ENTRY_POINTS(64, 4, 64, 1, 4, 64)
FLASH_ENTRY_POINTS(128, 4, 32, 2, 8, 64)

// Backward, step 3: dq = scale * dq_accum in bf16, from [B, H, T, D] to token-major [B, T, H, D]
// at strides `dqs`. Four columns per thread (D is a multiple of 8): one 16-byte read and one
// 8-byte write, and 32-bit index arithmetic (the host checks that n / 4 fits): 64-bit divisions
// per element made this pass about four times slower than its bandwidth.
extern "C" __global__ void flash_attention_bwd_dq_convert(const float* dq_accum, bf16* dq, Strides dqs, float scale,
                                                          size_t n, int T, int H, int D) {
    const unsigned int n4 = (unsigned int)(n / 4), quads = (unsigned int)D / 4;
    const unsigned int ut = (unsigned int)T, uh = (unsigned int)H;
    for (unsigned int i = blockIdx.x * blockDim.x + threadIdx.x; i < n4; i += gridDim.x * blockDim.x) {
        const unsigned int row = i / quads, c = (i - row * quads) * 4;  // row = (b H + h) T + t
        const unsigned int bh = row / ut, t = row - bh * ut;
        const unsigned int b = bh / uh, h = bh - b * uh;
        const size_t at = (size_t)b * dqs.batch + (size_t)t * dqs.row + (size_t)h * dqs.head + c;
        const float4 a = *reinterpret_cast<const float4*>(dq_accum + (size_t)i * 4);
        const __nv_bfloat162 lo = __floats2bfloat162_rn(a.x * scale, a.y * scale);
        const __nv_bfloat162 hi = __floats2bfloat162_rn(a.z * scale, a.w * scale);
        uint2 packed;
        packed.x = *reinterpret_cast<const uint32_t*>(&lo);
        packed.y = *reinterpret_cast<const uint32_t*>(&hi);
        *reinterpret_cast<uint2*>(dq + at) = packed;
    }
}
