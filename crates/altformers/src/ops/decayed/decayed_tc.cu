// Retention scan on tensor cores (bf16 in, f32 accumulate), chunk-parallel:
//   o_t = sum_{i<=t} gamma^(t-i) (q_t . k_i) v_i      (with `reverse`, over i >= t)
// the same op as decayed.cu's retention_scan, split the way flash-linear-attention splits it
// so that only the state recurrence is sequential:
//
// Every CTA is 8 warps, each owning 16 rows x 32 columns of a 64 x 64 product (WMMA tiles).
// 1. retention_states_bf16: grid (d_k / 64, d_v / 64, B H), one CTA per 64 x 64 state tile.
//    Walks the chunks of 64 tokens in order with the state in WMMA accumulators: stores the
//    state *before* chunk c (bf16, [B H, chunks, DKP, DVP], d_k and d_v padded to 64), then
//    S = gamma^len S + K_c^T (V_c (.) gamma^(len-1-i)). The next chunk's K, V stream in by
//    cp.async while this one is multiplied. The last state goes to the op's output.
// 2. retention_outputs_bf16_d{64,128,256}: grid (chunks, 1, B H), every chunk at once, each
//    CTA walking the value columns 64 at a time:
//    O_c = ((Q_c K_c^T) (.) D) V_c + (Q_c (.) gamma^(j+1)) S_c with D_ji = gamma^(j-i) [i <= j].
//    The `_t` variants read a [d_v, d_k] state as its transpose (the backward's dk, which
//    shares its states with dv).
//
// Position r of chunk c is token start + r (or T - 1 - start - r with `reverse`, which is
// how the backward pass runs its three scans, see cuda.rs beside this file). Rows past T, and
// columns past d_k or d_v, are zero in shared memory, so every tile product is exact.
#include <cuda_bf16.h>
#include <mma.h>
#include <stdint.h>

#include "async_copy.cuh"

typedef __nv_bfloat16 bf16;
using namespace nvcuda;

namespace {

constexpr int CHUNK = 64;            // tokens per chunk
constexpr int TILE = 64;             // state tile edge, and value columns per output step
constexpr int WARPS = 8;             // each owning 16 rows x 32 columns of a 64 x 64 tile
constexpr int THREADS = 32 * WARPS;
constexpr int WROWS = 16, FM = WROWS / 16, FN = 2;  // rows per warp; 16 x 16 fragments per warp
constexpr int PAD = 8;               // bf16 row padding (keeps WMMA's 32-byte alignment)
constexpr int LDT = TILE + PAD;      // row stride of a 64-column bf16 tile
constexpr int LDF = TILE + 4;        // row stride of the f32 staging tile

typedef wmma::fragment<wmma::accumulator, 16, 16, 16, float> Acc;
typedef wmma::fragment<wmma::matrix_a, 16, 16, 16, bf16, wmma::row_major> ARow;
typedef wmma::fragment<wmma::matrix_a, 16, 16, 16, bf16, wmma::col_major> ACol;
typedef wmma::fragment<wmma::matrix_b, 16, 16, 16, bf16, wmma::row_major> BRow;
typedef wmma::fragment<wmma::matrix_b, 16, 16, 16, bf16, wmma::col_major> BCol;

// Token index of chunk position r.
__device__ __forceinline__ size_t token(int start, int r, int len_t, int reverse) {
    return reverse ? (size_t)(len_t - 1 - start - r) : (size_t)(start + r);
}

// Loads chunk rows r < CHUNK (tokens from `start`), columns col0 .. col0 + COLS of a
// row-major [T, width] matrix into a shared tile with row stride COLS + PAD. Rows at or past
// `len` and columns at or past `width` are zero. 16-byte cp.async when the rows allow it
// (the caller commits and waits), element loads otherwise.
template <int COLS>
__device__ __forceinline__ void load_chunk(bf16* tile, const bf16* src, int width, int col0, int start,
                                           int len, int len_t, int reverse) {
    constexpr int LD = COLS + PAD, VECS = COLS / 8;
    if (width % 8 == 0 && col0 + COLS <= width) {
        for (int i = threadIdx.x; i < CHUNK * VECS; i += THREADS) {
            const int r = i / VECS, c = (i % VECS) * 8;
            const bool valid = r < len;
            const bf16* from = valid ? src + token(start, r, len_t, reverse) * width + col0 + c : src;
            cp_async16(tile + r * LD + c, from, valid);
        }
    } else {
        for (int i = threadIdx.x; i < CHUNK * COLS; i += THREADS) {
            const int r = i / COLS, c = i % COLS;
            const bool valid = r < len && col0 + c < width;
            tile[r * LD + c] = valid ? src[token(start, r, len_t, reverse) * width + col0 + c] : __float2bfloat16(0.f);
        }
    }
}

// The 8 bf16 at `p` (16-byte aligned) times `w`.
__device__ __forceinline__ void scale8(bf16* p, float w) {
    uint4 x = *reinterpret_cast<uint4*>(p);
    __nv_bfloat162* h = reinterpret_cast<__nv_bfloat162*>(&x);
#pragma unroll
    for (int e = 0; e < 4; ++e) {
        const float2 f = __bfloat1622float2(h[e]);
        h[e] = __floats2bfloat162_rn(f.x * w, f.y * w);
    }
    *reinterpret_cast<uint4*>(p) = x;
}

// 8 floats from `s` (16-byte aligned), times w[0..8), as 8 bf16.
__device__ __forceinline__ uint4 pack8(const float* s, const float (&w)[8]) {
    const float4 a = *reinterpret_cast<const float4*>(s), b = *reinterpret_cast<const float4*>(s + 4);
    uint4 packed;
    __nv_bfloat162* p = reinterpret_cast<__nv_bfloat162*>(&packed);
    p[0] = __floats2bfloat162_rn(a.x * w[0], a.y * w[1]);
    p[1] = __floats2bfloat162_rn(a.z * w[2], a.w * w[3]);
    p[2] = __floats2bfloat162_rn(b.x * w[4], b.y * w[5]);
    p[3] = __floats2bfloat162_rn(b.z * w[6], b.w * w[7]);
    return packed;
}

__device__ __forceinline__ void zero(Acc (&acc)[FM][FN]) {
#pragma unroll
    for (int i = 0; i < FM; ++i)
#pragma unroll
        for (int j = 0; j < FN; ++j) wmma::fill_fragment(acc[i][j], 0.f);
}

// acc += A B over one 16-deep slice: A fragment i at `a + i * a_step` (stride lda), B fragment
// j at `b + j * b_step` (stride ldb), each read with its fragment type's layout.
template <typename AFrag, typename BFrag>
__device__ __forceinline__ void mma16(Acc (&acc)[FM][FN], const bf16* a, int a_step, int lda, const bf16* b, int b_step,
                                      int ldb) {
    AFrag fa[FM];
    BFrag fb[FN];
#pragma unroll
    for (int i = 0; i < FM; ++i) wmma::load_matrix_sync(fa[i], a + i * a_step, lda);
#pragma unroll
    for (int j = 0; j < FN; ++j) wmma::load_matrix_sync(fb[j], b + j * b_step, ldb);
#pragma unroll
    for (int i = 0; i < FM; ++i)
#pragma unroll
        for (int j = 0; j < FN; ++j) wmma::mma_sync(acc[i][j], fa[i], fb[j], acc[i][j]);
}

// A 64 x 64 accumulator tile (this warp's FM x FN fragments at (wm, wn)) into the f32 staging tile.
__device__ __forceinline__ void stage(float* f, Acc (&acc)[FM][FN], int wm, int wn) {
#pragma unroll
    for (int i = 0; i < FM; ++i)
#pragma unroll
        for (int j = 0; j < FN; ++j)
            wmma::store_matrix_sync(f + (wm * WROWS + i * 16) * LDF + wn * 32 + j * 16, acc[i][j], LDF, wmma::mem_row_major);
}

// Writes the staged 64 x 64 f32 tile as bf16 rows: staged row r goes to `dst + row(r) * ld`,
// columns col0 .. col0 + 64 clipped to `width`, rows r < rows.
template <typename RowOf>
__device__ __forceinline__ void write_staged(const float* f, bf16* dst, int ld, int width, int col0, int rows, RowOf row) {
    if (ld % 8 == 0 && col0 + TILE <= width) {
        for (int i = threadIdx.x; i < rows * (TILE / 8); i += THREADS) {
            const int r = i / (TILE / 8), c = (i % (TILE / 8)) * 8;
            const float ones[8] = {1.f, 1.f, 1.f, 1.f, 1.f, 1.f, 1.f, 1.f};
            *reinterpret_cast<uint4*>(dst + row(r) * ld + col0 + c) = pack8(f + r * LDF + c, ones);
        }
    } else {
        for (int i = threadIdx.x; i < rows * TILE; i += THREADS) {
            const int r = i / TILE, c = i % TILE;
            if (col0 + c < width) dst[row(r) * ld + col0 + c] = __float2bfloat16(f[r * LDF + c]);
        }
    }
}

}  // namespace

extern __shared__ __align__(128) unsigned char smem[];

// States. Shared memory: two stages of K and V chunk tiles (bf16 [64][LDT] each) and the f32
// staging tile [64][LDF].
extern "C" __global__ void __launch_bounds__(THREADS, 4)
    retention_states_bf16(const bf16* __restrict__ k, const bf16* __restrict__ v, const float* __restrict__ log_decay,
                          bf16* __restrict__ states, bf16* __restrict__ final_state, int heads, int len_t, int dk,
                          int dv, int reverse) {
    const int k0 = blockIdx.x * TILE, v0 = blockIdx.y * TILE, bh = blockIdx.z;
    const int chunks = (len_t + CHUNK - 1) / CHUNK;
    const int dkp = gridDim.x * TILE, dvp = gridDim.y * TILE;
    const bf16* kh = k + (size_t)bh * len_t * dk;
    const bf16* vh = v + (size_t)bh * len_t * dv;
    bf16* sh = states + (size_t)bh * chunks * dkp * dvp;

    bf16* ks = reinterpret_cast<bf16*>(smem);  // [2][CHUNK][LDT]
    bf16* vs = ks + 2 * CHUNK * LDT;           // [2][CHUNK][LDT]
    float* f = reinterpret_cast<float*>(vs + 2 * CHUNK * LDT);

    const int warp = threadIdx.x / 32, wm = warp / 2, wn = warp % 2;  // rows wm * WROWS, columns wn * 32
    const float ld = log_decay[bh % heads];
    Acc acc[FM][FN];
    zero(acc);

    load_chunk<TILE>(ks, kh, dk, k0, 0, min(CHUNK, len_t), len_t, reverse);
    load_chunk<TILE>(vs, vh, dv, v0, 0, min(CHUNK, len_t), len_t, reverse);
    cp_async_commit();
    for (int c = 0; c < chunks; ++c) {
        const int start = c * CHUNK, len = min(CHUNK, len_t - start), buf = c & 1;
        if (c + 1 < chunks) {
            const int next = start + CHUNK, next_len = min(CHUNK, len_t - next);
            load_chunk<TILE>(ks + (buf ^ 1) * CHUNK * LDT, kh, dk, k0, next, next_len, len_t, reverse);
            load_chunk<TILE>(vs + (buf ^ 1) * CHUNK * LDT, vh, dv, v0, next, next_len, len_t, reverse);
        }
        cp_async_commit();  // possibly empty: keeps one group per chunk for the wait below

        // the state before chunk c
        stage(f, acc, wm, wn);
        __syncthreads();
        bf16* dst = sh + (size_t)c * dkp * dvp + (size_t)k0 * dvp;
        write_staged(f, dst, dvp, dvp, v0, TILE, [](int r) { return (size_t)r; });
        cp_async_wait<1>();
        __syncthreads();  // chunk c has landed; the staging tile is free

        // V rows weighted by gamma^(len-1-r): the decay from their token to the chunk's end
        bf16* vb = vs + buf * CHUNK * LDT;
        for (int i = threadIdx.x; i < len * (TILE / 8); i += THREADS) {
            const int r = i / (TILE / 8), col = (i % (TILE / 8)) * 8;
            scale8(vb + r * LDT + col, __expf(ld * (len - 1 - r)));
        }
        __syncthreads();

        const float carry = __expf(ld * len);
#pragma unroll
        for (int i = 0; i < FM; ++i)
#pragma unroll
            for (int j = 0; j < FN; ++j)
                for (int e = 0; e < acc[i][j].num_elements; ++e) acc[i][j].x[e] *= carry;
        const bf16* kb = ks + buf * CHUNK * LDT;
        // K^T: the chunk's K tile read column-major
#pragma unroll
        for (int kk = 0; kk < CHUNK / 16; ++kk)
            mma16<ACol, BRow>(acc, kb + kk * 16 * LDT + wm * WROWS, 16, LDT, vb + kk * 16 * LDT + wn * 32, 16, LDT);
        __syncthreads();  // this stage is refilled by the next iteration's prefetch
    }
    if (final_state == nullptr) return;  // the backward's scans need no final state
    stage(f, acc, wm, wn);
    __syncthreads();
    const int rows = min(TILE, dk - k0);
    write_staged(f, final_state + (size_t)bh * dk * dv + (size_t)k0 * dv, dv, dv, v0, rows, [](int r) { return (size_t)r; });
}

// Outputs. Shared memory: Q, K chunk tiles [64][DK + PAD] (the f32 staging tile [64][LDF]
// replaces K), V [64][LDT], the state tile [DK][LDT] (TRANSPOSED: [64][DK + PAD], rows of a
// [d_v, d_k] state read as its transpose) and the decayed scores [64][LDT] (bf16).
// One CTA per chunk walks the value columns 64 at a time, so the scores and the decayed
// queries are computed, and Q and K read, once per chunk rather than once per value tile.
template <int DK, bool TRANSPOSED>
__device__ __forceinline__ void retention_outputs(const bf16* __restrict__ q, const bf16* __restrict__ k,
                                                  const bf16* __restrict__ v, const bf16* __restrict__ states,
                                                  const float* __restrict__ log_decay, bf16* __restrict__ out,
                                                  int heads, int len_t, int dk, int dv, int reverse) {
    constexpr int LDQ = DK + PAD;
    const int c = blockIdx.x, bh = blockIdx.z;
    const int chunks = gridDim.x, dvp = (dv + TILE - 1) / TILE * TILE, dkp = (dk + TILE - 1) / TILE * TILE;
    const int start = c * CHUNK, len = min(CHUNK, len_t - start);

    // the f32 staging tile takes K's place once the scores are computed
    constexpr int KS_BYTES = CHUNK * LDQ * 2 > CHUNK * LDF * 4 ? CHUNK * LDQ * 2 : CHUNK * LDF * 4;
    bf16* qs = reinterpret_cast<bf16*>(smem);
    bf16* ks = qs + CHUNK * LDQ;
    float* f = reinterpret_cast<float*>(ks);
    bf16* vs = ks + KS_BYTES / 2;
    bf16* ss = vs + CHUNK * LDT;
    bf16* ps = ss + DK * LDT;

    // Starts the copies of value columns v0 .. v0 + 64 and of the matching state tile, zero
    // past the padded widths: rows 0 .. DK, columns v0 .. v0 + 64 of a [dkp, dvp] state, or
    // (TRANSPOSED) rows v0 .. v0 + 64, columns 0 .. DK of a [dvp, dkp] one.
    const bf16* sc = states + ((size_t)bh * chunks + c) * dkp * dvp;
    auto load_value_tile = [&](int v0) {
        load_chunk<TILE>(vs, v + (size_t)bh * len_t * dv, dv, v0, start, len, len_t, reverse);
        if (TRANSPOSED) {
            for (int i = threadIdx.x; i < TILE * (DK / 8); i += THREADS) {
                const int r = i / (DK / 8), col = (i % (DK / 8)) * 8;
                const bool valid = col < dkp;
                cp_async16(ss + r * LDQ + col, valid ? sc + (size_t)(v0 + r) * dkp + col : sc, valid);
            }
        } else {
            for (int i = threadIdx.x; i < DK * (TILE / 8); i += THREADS) {
                const int r = i / (TILE / 8), col = (i % (TILE / 8)) * 8;
                const bool valid = r < dkp;
                cp_async16(ss + r * LDT + col, valid ? sc + (size_t)r * dvp + v0 + col : sc, valid);
            }
        }
    };
    load_chunk<DK>(qs, q + (size_t)bh * len_t * dk, dk, 0, start, len, len_t, reverse);
    load_chunk<DK>(ks, k + (size_t)bh * len_t * dk, dk, 0, start, len, len_t, reverse);
    load_value_tile(0);
    cp_async_commit();
    cp_async_wait<0>();
    __syncthreads();

    const int warp = threadIdx.x / 32, wm = warp / 2, wn = warp % 2;  // rows wm * WROWS, columns wn * 32
    const float ld = log_decay[bh % heads];
    Acc acc[FM][FN];
    zero(acc);
    // scores Q K^T; warp tiles wholly above the diagonal stay zero
    if (wn * 32 <= wm * WROWS + WROWS - 1) {
#pragma unroll
        for (int kk = 0; kk < DK / 16; ++kk)
            mma16<ARow, BCol>(acc, qs + wm * WROWS * LDQ + kk * 16, 16 * LDQ, LDQ, ks + wn * 32 * LDQ + kk * 16, 16 * LDQ, LDQ);
    }
    __syncthreads();  // every warp is done with K: the staging tile overwrites it
    stage(f, acc, wm, wn);
    __syncthreads();
    // P_ji = gamma^(j-i) [i <= j] (Q K^T)_ji, and the queries decayed from the chunk's start
    for (int i = threadIdx.x; i < CHUNK * (CHUNK / 8); i += THREADS) {
        const int j = i / (CHUNK / 8), col = (i % (CHUNK / 8)) * 8;
        float w[8];
#pragma unroll
        for (int e = 0; e < 8; ++e) w[e] = col + e <= j ? __expf(ld * (j - col - e)) : 0.f;
        *reinterpret_cast<uint4*>(ps + j * LDT + col) = pack8(f + j * LDF + col, w);
    }
    for (int i = threadIdx.x; i < CHUNK * (DK / 8); i += THREADS) {
        const int j = i / (DK / 8), a = (i % (DK / 8)) * 8;
        scale8(qs + j * LDQ + a, __expf(ld * (j + 1)));
    }
    __syncthreads();

    const bf16* qw = qs + wm * WROWS * LDQ;
    bf16* oh = out + (size_t)bh * len_t * dv;
    for (int v0 = 0; v0 < dvp; v0 += TILE) {
        if (v0 > 0) {  // the previous tile's products and writes are done (barrier below)
            load_value_tile(v0);
            cp_async_commit();
            cp_async_wait<0>();
            __syncthreads();
        }
        zero(acc);
#pragma unroll
        for (int kk = 0; kk < DK / 16; ++kk) {
            if (TRANSPOSED)
                mma16<ARow, BCol>(acc, qw + kk * 16, 16 * LDQ, LDQ, ss + wn * 32 * LDQ + kk * 16, 16 * LDQ, LDQ);
            else
                mma16<ARow, BRow>(acc, qw + kk * 16, 16 * LDQ, LDQ, ss + kk * 16 * LDT + wn * 32, 16, LDT);
        }
        // P is lower triangular: this warp's rows need keys below (wm + 1) * WROWS only
        for (int kk = 0; kk < (wm + 1) * WROWS / 16; ++kk)
            mma16<ARow, BRow>(acc, ps + wm * WROWS * LDT + kk * 16, 16 * LDT, LDT, vs + kk * 16 * LDT + wn * 32, 16, LDT);
        stage(f, acc, wm, wn);
        __syncthreads();
        write_staged(f, oh, dv, dv, v0, len, [=](int r) { return token(start, r, len_t, reverse); });
        __syncthreads();  // the staging, value and state tiles are free again
    }
}

// At most MIN_BLOCKS CTAs of 256 threads per SM fit in shared memory: registers to match.
#define RETENTION_OUTPUTS(NAME, DK, TRANSPOSED, MIN_BLOCKS)                                                  \
    extern "C" __global__ void __launch_bounds__(THREADS, MIN_BLOCKS) NAME(                                  \
        const bf16* q, const bf16* k, const bf16* v, const bf16* states, const float* log_decay, bf16* out, \
        int heads, int len_t, int dk, int dv, int reverse) {                                                 \
        retention_outputs<DK, TRANSPOSED>(q, k, v, states, log_decay, out, heads, len_t, dk, dv, reverse);   \
    }
RETENTION_OUTPUTS(retention_outputs_bf16_d64, 64, false, 4)
RETENTION_OUTPUTS(retention_outputs_bf16_d128, 128, false, 3)
RETENTION_OUTPUTS(retention_outputs_bf16_d256, 256, false, 1)
RETENTION_OUTPUTS(retention_outputs_bf16_d64_t, 64, true, 4)
RETENTION_OUTPUTS(retention_outputs_bf16_d128_t, 128, true, 3)
RETENTION_OUTPUTS(retention_outputs_bf16_d256_t, 256, true, 1)
