// Retention scan on tensor cores (bf16 in, f32 accumulate), chunk-parallel:
//   o_t = sum_{i<=t} gamma^(t-i) (q_t . k_i) v_i      (with `reverse`, over i >= t)
// the same op as decayed.cu's retention_scan, split the way flash-linear-attention splits it
// so that only the state recurrence is sequential:
//
// 1. retention_states_bf16: grid (d_k / 64, d_v / 64, B H), one CTA per 64 x 64 state tile.
//    Walks the chunks of 64 tokens in order with the state in WMMA accumulators: stores the
//    state *before* chunk c (bf16, [B H, chunks, DKP, DVP], d_k and d_v padded to 64), then
//    S = gamma^len S + K_c^T (V_c (.) gamma^(len-1-i)). The next chunk's K, V stream in by
//    cp.async while this one is multiplied. The last state goes to the op's output.
// 2. retention_outputs_bf16_d{64,128}: grid (chunks, d_v / 64, B H), every chunk at once:
//    O_c = ((Q_c K_c^T) (.) D) V_c + (Q_c (.) gamma^(j+1)) S_c with D_ji = gamma^(j-i) [i <= j].
//
// Position r of chunk c is token start + r (or T - 1 - start - r with `reverse`, which is
// how the backward pass runs its three scans, see kernels/decayed.rs). Rows past T, and
// columns past d_k or d_v, are zero in shared memory, so every tile product is exact.
#include <cuda_bf16.h>
#include <mma.h>
#include <stdint.h>

#include "async_copy.cuh"

typedef __nv_bfloat16 bf16;
using namespace nvcuda;

namespace {

constexpr int CHUNK = 64;            // tokens per chunk
constexpr int TILE = 64;             // state tile edge, and value columns per output CTA
constexpr int THREADS = 128;         // 4 warps, each owning a 32 x 32 quarter of a 64 x 64 tile
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

// A 64 x 64 accumulator tile (this warp's 2 x 2 fragments at (wm, wn)) into the f32 staging tile.
__device__ __forceinline__ void stage(float* f, Acc (&acc)[2][2], int wm, int wn) {
#pragma unroll
    for (int i = 0; i < 2; ++i)
#pragma unroll
        for (int j = 0; j < 2; ++j)
            wmma::store_matrix_sync(f + (wm * 32 + i * 16) * LDF + wn * 32 + j * 16, acc[i][j], LDF, wmma::mem_row_major);
}

// Writes the staged 64 x 64 f32 tile as bf16 rows: staged row r goes to `dst + row(r) * ld`,
// columns col0 .. col0 + 64 clipped to `width`, rows r < rows.
template <typename RowOf>
__device__ __forceinline__ void write_staged(const float* f, bf16* dst, int ld, int width, int col0, int rows, RowOf row) {
    if (ld % 8 == 0 && col0 + TILE <= width) {
        for (int i = threadIdx.x; i < rows * (TILE / 8); i += THREADS) {
            const int r = i / (TILE / 8), c = (i % (TILE / 8)) * 8;
            const float* s = f + r * LDF + c;
            uint4 packed;
            __nv_bfloat162* p = reinterpret_cast<__nv_bfloat162*>(&packed);
#pragma unroll
            for (int e = 0; e < 4; ++e) p[e] = __floats2bfloat162_rn(s[2 * e], s[2 * e + 1]);
            *reinterpret_cast<uint4*>(dst + row(r) * ld + col0 + c) = packed;
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
extern "C" __global__ void __launch_bounds__(THREADS)
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

    const int warp = threadIdx.x / 32, wm = warp / 2, wn = warp % 2;
    const float ld = log_decay[bh % heads];
    Acc acc[2][2];
#pragma unroll
    for (int i = 0; i < 2; ++i)
#pragma unroll
        for (int j = 0; j < 2; ++j) wmma::fill_fragment(acc[i][j], 0.f);

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
        for (int i = threadIdx.x; i < len * TILE; i += THREADS) {
            const int r = i / TILE, col = i % TILE;
            vb[r * LDT + col] = __float2bfloat16(__bfloat162float(vb[r * LDT + col]) * __expf(ld * (len - 1 - r)));
        }
        __syncthreads();

        const float carry = __expf(ld * len);
#pragma unroll
        for (int i = 0; i < 2; ++i)
#pragma unroll
            for (int j = 0; j < 2; ++j)
                for (int e = 0; e < acc[i][j].num_elements; ++e) acc[i][j].x[e] *= carry;
        const bf16* kb = ks + buf * CHUNK * LDT;
#pragma unroll
        for (int kk = 0; kk < CHUNK / 16; ++kk) {
            ACol a[2];
            BRow b[2];
#pragma unroll
            for (int i = 0; i < 2; ++i) wmma::load_matrix_sync(a[i], kb + kk * 16 * LDT + wm * 32 + i * 16, LDT);
#pragma unroll
            for (int j = 0; j < 2; ++j) wmma::load_matrix_sync(b[j], vb + kk * 16 * LDT + wn * 32 + j * 16, LDT);
#pragma unroll
            for (int i = 0; i < 2; ++i)
#pragma unroll
                for (int j = 0; j < 2; ++j) wmma::mma_sync(acc[i][j], a[i], b[j], acc[i][j]);
        }
        __syncthreads();  // this stage is refilled by the next iteration's prefetch
    }
    if (final_state == nullptr) return;  // the backward's scans need no final state
    stage(f, acc, wm, wn);
    __syncthreads();
    const int rows = min(TILE, dk - k0);
    write_staged(f, final_state + (size_t)bh * dk * dv + (size_t)k0 * dv, dv, dv, v0, rows, [](int r) { return (size_t)r; });
}

// Outputs. Shared memory: Q, K chunk tiles [64][DK + PAD], V [64][LDT], the state tile
// [DK][LDT] (TRANSPOSED: [64][DK + PAD], rows of a [d_v, d_k] state read as its transpose),
// the decayed scores [64][LDT] (bf16) and the f32 staging tile [64][LDF].
template <int DK, bool TRANSPOSED>
__device__ __forceinline__ void retention_outputs(const bf16* __restrict__ q, const bf16* __restrict__ k,
                                                  const bf16* __restrict__ v, const bf16* __restrict__ states,
                                                  const float* __restrict__ log_decay, bf16* __restrict__ out,
                                                  int heads, int len_t, int dk, int dv, int reverse) {
    constexpr int LDQ = DK + PAD;
    const int c = blockIdx.x, v0 = blockIdx.y * TILE, bh = blockIdx.z;
    const int chunks = gridDim.x, dvp = gridDim.y * TILE, dkp = (dk + TILE - 1) / TILE * TILE;
    const int start = c * CHUNK, len = min(CHUNK, len_t - start);

    bf16* qs = reinterpret_cast<bf16*>(smem);
    bf16* ks = qs + CHUNK * LDQ;
    bf16* vs = ks + CHUNK * LDQ;
    bf16* ss = vs + CHUNK * LDT;
    bf16* ps = ss + DK * LDT;
    float* f = reinterpret_cast<float*>(ps + CHUNK * LDT);

    load_chunk<DK>(qs, q + (size_t)bh * len_t * dk, dk, 0, start, len, len_t, reverse);
    load_chunk<DK>(ks, k + (size_t)bh * len_t * dk, dk, 0, start, len, len_t, reverse);
    load_chunk<TILE>(vs, v + (size_t)bh * len_t * dv, dv, v0, start, len, len_t, reverse);
    // the state tile, zero past the padded widths: rows 0 .. DK, columns v0 .. v0 + 64 of a
    // [dkp, dvp] state, or (TRANSPOSED) rows v0 .. v0 + 64, columns 0 .. DK of a [dvp, dkp] one
    const bf16* sc = states + ((size_t)bh * chunks + c) * dkp * dvp;
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
    cp_async_commit();
    cp_async_wait<0>();
    __syncthreads();

    const int warp = threadIdx.x / 32, wm = warp / 2, wn = warp % 2;
    const float ld = log_decay[bh % heads];
    Acc acc[2][2];
#pragma unroll
    for (int i = 0; i < 2; ++i)
#pragma unroll
        for (int j = 0; j < 2; ++j) wmma::fill_fragment(acc[i][j], 0.f);
    // scores Q K^T; the quarter above the diagonal (queries 0-31, keys 32-63) stays zero
    if (wm >= wn) {
#pragma unroll
        for (int kk = 0; kk < DK / 16; ++kk) {
            ARow a[2];
            BCol b[2];
#pragma unroll
            for (int i = 0; i < 2; ++i) wmma::load_matrix_sync(a[i], qs + (wm * 32 + i * 16) * LDQ + kk * 16, LDQ);
#pragma unroll
            for (int j = 0; j < 2; ++j) wmma::load_matrix_sync(b[j], ks + (wn * 32 + j * 16) * LDQ + kk * 16, LDQ);
#pragma unroll
            for (int i = 0; i < 2; ++i)
#pragma unroll
                for (int j = 0; j < 2; ++j) wmma::mma_sync(acc[i][j], a[i], b[j], acc[i][j]);
        }
    }
    stage(f, acc, wm, wn);
    __syncthreads();
    // P_ji = gamma^(j-i) [i <= j] (Q K^T)_ji, and the queries decayed from the chunk's start
    for (int i = threadIdx.x; i < CHUNK * CHUNK; i += THREADS) {
        const int j = i / CHUNK, col = i % CHUNK;
        ps[j * LDT + col] = __float2bfloat16(col <= j ? f[j * LDF + col] * __expf(ld * (j - col)) : 0.f);
    }
    for (int i = threadIdx.x; i < CHUNK * DK; i += THREADS) {
        const int j = i / DK, a = i % DK;
        qs[j * LDQ + a] = __float2bfloat16(__bfloat162float(qs[j * LDQ + a]) * __expf(ld * (j + 1)));
    }
    __syncthreads();

#pragma unroll
    for (int i = 0; i < 2; ++i)
#pragma unroll
        for (int j = 0; j < 2; ++j) wmma::fill_fragment(acc[i][j], 0.f);
#pragma unroll
    for (int kk = 0; kk < DK / 16; ++kk) {
        ARow a[2];
#pragma unroll
        for (int i = 0; i < 2; ++i) wmma::load_matrix_sync(a[i], qs + (wm * 32 + i * 16) * LDQ + kk * 16, LDQ);
        if (TRANSPOSED) {
            BCol b[2];
#pragma unroll
            for (int j = 0; j < 2; ++j) wmma::load_matrix_sync(b[j], ss + (wn * 32 + j * 16) * LDQ + kk * 16, LDQ);
#pragma unroll
            for (int i = 0; i < 2; ++i)
#pragma unroll
                for (int j = 0; j < 2; ++j) wmma::mma_sync(acc[i][j], a[i], b[j], acc[i][j]);
        } else {
            BRow b[2];
#pragma unroll
            for (int j = 0; j < 2; ++j) wmma::load_matrix_sync(b[j], ss + kk * 16 * LDT + wn * 32 + j * 16, LDT);
#pragma unroll
            for (int i = 0; i < 2; ++i)
#pragma unroll
                for (int j = 0; j < 2; ++j) wmma::mma_sync(acc[i][j], a[i], b[j], acc[i][j]);
        }
    }
    // P is lower triangular: rows wm * 32 .. + 32 need keys below wm * 32 + 32 only
    for (int kk = 0; kk < (wm + 1) * 2; ++kk) {
        ARow a[2];
        BRow b[2];
#pragma unroll
        for (int i = 0; i < 2; ++i) wmma::load_matrix_sync(a[i], ps + (wm * 32 + i * 16) * LDT + kk * 16, LDT);
#pragma unroll
        for (int j = 0; j < 2; ++j) wmma::load_matrix_sync(b[j], vs + kk * 16 * LDT + wn * 32 + j * 16, LDT);
#pragma unroll
        for (int i = 0; i < 2; ++i)
#pragma unroll
            for (int j = 0; j < 2; ++j) wmma::mma_sync(acc[i][j], a[i], b[j], acc[i][j]);
    }
    stage(f, acc, wm, wn);
    __syncthreads();
    bf16* oh = out + (size_t)bh * len_t * dv;
    write_staged(f, oh, dv, dv, v0, len, [=](int r) { return token(start, r, len_t, reverse); });
}

#define RETENTION_OUTPUTS(NAME, DK, TRANSPOSED)                                                             \
    extern "C" __global__ void __launch_bounds__(THREADS) NAME(                                              \
        const bf16* q, const bf16* k, const bf16* v, const bf16* states, const float* log_decay, bf16* out, \
        int heads, int len_t, int dk, int dv, int reverse) {                                                 \
        retention_outputs<DK, TRANSPOSED>(q, k, v, states, log_decay, out, heads, len_t, dk, dv, reverse);   \
    }
RETENTION_OUTPUTS(retention_outputs_bf16_d64, 64, false)
RETENTION_OUTPUTS(retention_outputs_bf16_d128, 128, false)
RETENTION_OUTPUTS(retention_outputs_bf16_d256, 256, false)
RETENTION_OUTPUTS(retention_outputs_bf16_d64_t, 64, true)
RETENTION_OUTPUTS(retention_outputs_bf16_d128_t, 128, true)
RETENTION_OUTPUTS(retention_outputs_bf16_d256_t, 256, true)
