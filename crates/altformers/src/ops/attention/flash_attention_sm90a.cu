// Causal attention on Hopper's warpgroup MMA (wgmma): the forward at head widths 128 and 64
// and the backward's key-block step at width 64, the alternatives to flash_attention.cu's
// mma.sync kernels and the defaults on compute capability 9.0 (ALTFORMERS_ATTENTION_FWD=mma,
// ALTFORMERS_ATTENTION_BWD=mma select the others). Same arguments, same outputs as those.
// Compiled for sm_90a, the target that has wgmma (build.rs: files named *_sm90a.cu), so it
// loads only on compute capability 9.0.
//
// Forward:
// A CTA of two warpgroups owns 128 query rows (64 each, one m64 wgmma row block); key tiles
// of 128 rows stream through two cp.async stages. S = Q K^T reads both operands straight from
// shared memory (no ldmatrix, no register fragments for Q or K), and O += P V takes P from
// the S accumulators in registers and V from shared memory: the tensor cores read shared
// memory themselves, which is what lifts the mma.sync kernels' shared-memory ceiling.
//
// Shared tiles are [rows][D] bf16, at D = 128 stored as two column halves of [rows][64]; each
// half has 128-byte rows, each 16-byte chunk c of row r at chunk c ^ (r % 8): the 128-byte swizzle the wgmma
// descriptors name. K and V tiles have the same layout; K is read as a K-major operand (S
// contracts over d), V as an MN-major one (O contracts over keys).
#include <cuda_bf16.h>
#include <stdint.h>

#include "async_copy.cuh"
#include "convert.cuh"
#include "dropout.cuh"
#include "flash_attention_bwd.cuh"

typedef __nv_bfloat16 bf16;

// Element strides of a [B, rows, heads, 128] operand (as flash_attention.cu's).
struct Strides {
    long long batch, head, row;
};

namespace {

namespace wg {

constexpr int kRows = 128, kKeys = 128, kD = 128, kThreads = 256;
constexpr int kHalfBytes = 128;  // one swizzled row of a column half: 64 bf16

// Byte offset of 16-byte chunk `chunk` (0..15 along d) of row `row` in a tile of `rows` rows.
__device__ __forceinline__ uint32_t chunk_offset(int rows, int row, int chunk) {
    const int half = chunk >> 3, c = chunk & 7;
    return half * rows * kHalfBytes + row * kHalfBytes + ((c ^ (row & 7)) << 4);
}

// Rows row0 .. row0 + rows of a [n, D] matrix (D = 128 or 64) with rows `ld` elements apart
// into a swizzled tile (zero-filled past n). At D = 64 the tile is one column half.
template <int ROWS, int D = kD>
__device__ __forceinline__ void load_tile(uint32_t tile, const bf16* src, long long ld, int row0, int n) {
    constexpr int kChunks = ROWS * D / 8, kRowChunks = D / 8;
    static_assert(kChunks % kThreads == 0, "whole chunks per thread");
#pragma unroll
    for (int i = 0; i < kChunks / kThreads; ++i) {
        const int c = i * kThreads + threadIdx.x, row = c / kRowChunks, chunk = c % kRowChunks;
        const bool valid = row0 + row < n;
        const bf16* from = valid ? src + (row0 + row) * ld + chunk * 8 : src;
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

// D (+)= A B, m64n64k16: A [64, 16] and B [16, 64] in shared memory, each K-major (TRANS 0:
// rows along M or N, contiguous along K) or MN-major (TRANS 1: contiguous along M or N).
template <int TRANS_A, int TRANS_B>
__device__ __forceinline__ void mma64_ss(float (&d)[32], uint64_t a, uint64_t b, int accumulate) {
    asm volatile(
        "{\n.reg .pred p;\nsetp.ne.b32 p, %34, 0;\n"
        "wgmma.mma_async.sync.aligned.m64n64k16.f32.bf16.bf16 {%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31}, %32, %33, p, 1, 1, %35, %36;\n}\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31])
        : "l"(a), "l"(b), "r"(accumulate), "n"(TRANS_A), "n"(TRANS_B));
}

// D += A B, m64n64k16: A [64, 16] bf16 fragments in registers (as mma_rs), B [16, 64] in shared
// memory, MN-major.
__device__ __forceinline__ void mma64_rs(float (&d)[32], const uint32_t (&a)[4], uint64_t b) {
    asm volatile(
        "{\n.reg .pred p;\nsetp.ne.b32 p, %37, 0;\n"
        "wgmma.mma_async.sync.aligned.m64n64k16.f32.bf16.bf16 {%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31}, {%32, %33, %34, %35}, %36, p, 1, 1, 1;\n}\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(b), "r"(1));
}

// Pins registers in place for the compiler: an in-flight wgmma reads or writes them, so no
// ordinary instruction may be moved across the fence, commit or wait around it.
template <int N>
__device__ __forceinline__ void pin(float (&x)[N]) {
#pragma unroll
    for (int i = 0; i < N; ++i) asm volatile("" : "+f"(x[i])::"memory");
}
template <int N>
__device__ __forceinline__ void pin(uint32_t (&x)[N][4]) {
#pragma unroll
    for (int i = 0; i < N; ++i)
#pragma unroll
        for (int e = 0; e < 4; ++e) asm volatile("" : "+r"(x[i][e])::"memory");
}

__device__ __forceinline__ void fence() { asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory"); }
__device__ __forceinline__ void commit() { asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory"); }
__device__ __forceinline__ void wait_all() { asm volatile("wgmma.wait_group.sync.aligned 0;\n" ::: "memory"); }
// cp.async writes are generic-proxy writes; wgmma reads through the async proxy.
__device__ __forceinline__ void fence_async_shared() { asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory"); }
// A barrier for the 128 threads of warpgroup `wg` alone (named barriers 1, 2; 0 is __syncthreads).
__device__ __forceinline__ void warpgroup_barrier(int wg) { asm volatile("bar.sync %0, 128;\n" ::"r"(wg + 1) : "memory"); }

}  // namespace wg

// Grid (ceil(T / 128), H, B), 256 threads: warpgroup wg owns rows m0 + 64 wg .. + 63; warp w
// of it rows + 16 (w % 4), the same per-warp row block as the accumulators of mma.m16n8k16,
// so the softmax below is the mma.sync kernel's with one m-tile and 16 n-tiles.
template <int D>
__device__ __forceinline__ void flash_fwd_wgmma(const bf16* __restrict__ q, const bf16* __restrict__ k,
                                                const bf16* __restrict__ v, Strides qs, Strides ks, Strides vs,
                                                bf16* __restrict__ o,
                                                float* __restrict__ lse, int T, int S, int H, int KVH, int offset,
                                                float scale_log2) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
    using namespace wg;
    constexpr int kTileBytes = kRows * D * 2;  // Q, and each K or V stage (kKeys == kRows)
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
    const bf16* q_h = q + b * qs.batch + h * qs.head;
    const bf16* k_h = k + b * ks.batch + kvh * ks.head;
    const bf16* v_h = v + b * vs.batch + kvh * vs.head;
    const int key_end = min(S, offset + m0 + kRows);
    const int key_blocks = (key_end + kKeys - 1) / kKeys;

    load_tile<kRows, D>(s_q, q_h, qs.row, m0, T);
    load_tile<kKeys, D>(s_k, k_h, ks.row, 0, S);
    load_tile<kKeys, D>(s_v, v_h, vs.row, 0, S);
    cp_async_commit();

    float acc_o[D / 2], acc_s[64];
#pragma unroll
    for (int i = 0; i < 64; ++i) acc_s[i] = 0.f;
#pragma unroll
    for (int i = 0; i < D / 2; ++i) acc_o[i] = 0.f;
    float row_max[2] = {-INFINITY, -INFINITY}, row_sum[2] = {0.f, 0.f};

    for (int j = 0; j < key_blocks; ++j) {
        const int stage = j & 1;
        if (j + 1 < key_blocks) {
            load_tile<kKeys, D>(s_k + (stage ^ 1) * kTileBytes, k_h, ks.row, (j + 1) * kKeys, S);
            load_tile<kKeys, D>(s_v + (stage ^ 1) * kTileBytes, v_h, vs.row, (j + 1) * kKeys, S);
        }
        cp_async_commit();
        cp_async_wait<1>();
        fence_async_shared();
        __syncthreads();
        const uint32_t k_tile = s_k + stage * kTileBytes, v_tile = s_v + stage * kTileBytes;

        // S = Q K^T over d in 8 steps of 16: within a column half the step moves 32 bytes
        // along the swizzled rows (the hardware applies the swizzle to the final address).
        pin(acc_s);
        fence();
#pragma unroll
        for (int kk = 0; kk < D / 16; ++kk) {
            const uint32_t col = (kk >> 2) * kRows * kHalfBytes + (kk & 3) * 32;
            const uint64_t a = descriptor(s_q + wgi * 64 * kHalfBytes + col, 16, 1024);
            const uint64_t bk = descriptor(k_tile + col, 16, 1024);
            mma_ss(acc_s, a, bk, kk > 0);
        }
        commit();
        pin(acc_s);
        wait_all();
        pin(acc_s);

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
            for (int n = 0; n < D / 8; ++n) {
                acc_o[4 * n + 2 * r] *= rescale;
                acc_o[4 * n + 2 * r + 1] *= rescale;
            }
#pragma unroll
            for (int n = 0; n < 16; ++n) {
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
        pin(acc_o);
        pin(p_frag);
        fence();
#pragma unroll
        for (int kk = 0; kk < kKeys / 16; ++kk) {
            const uint64_t bv = descriptor(v_tile + kk * 16 * kHalfBytes, kKeys * kHalfBytes, 1024);
            if constexpr (D == 128)
                mma_rs(acc_o, p_frag[kk], bv);
            else
                mma64_rs(acc_o, p_frag[kk], bv);
        }
        commit();
        pin(acc_o);
        pin(p_frag);
        wait_all();
        pin(acc_o);
        // The next iteration prefetches into the stage just read.
        __syncthreads();
    }

    bf16* o_h = o + ((size_t)b * T * H + h) * D;  // token-major: rows H D apart
#pragma unroll
    for (int r = 0; r < 2; ++r) {
        float sum = row_sum[r];
        sum += __shfl_xor_sync(0xffffffff, sum, 1);
        sum += __shfl_xor_sync(0xffffffff, sum, 2);
        const float inv = sum > 0.f ? 1.f / sum : 0.f;
        const int row = row_lo + r * 8;
        if (row < T) {
#pragma unroll
            for (int n = 0; n < D / 8; ++n)
                *reinterpret_cast<uint32_t*>(o_h + (size_t)row * H * D + n * 8 + quad * 2) =
                    pack_bf16(acc_o[4 * n + 2 * r] * inv, acc_o[4 * n + 2 * r + 1] * inv);
            if (quad == 0) lse[(size_t)(b * H + h) * T + row] = row_max[r] + log2f(sum);
        }
    }
#else
    __trap();  // built for a target without wgmma (sm_90a)
#endif
}


// Backward, step 2 at head width 64 (steps 1 and 3, D = rowsum(dO O) and dQ's conversion, are
// flash_attention.cu's). Grid (ceil(S / 128), KVH, B), 256 threads: the CTA owns 128 keys,
// warpgroup wg keys n0 + 64 wg .. + 63 (warp w of it + 16 (w % 4), the accumulator rows of
// mma.m16n8k16 as in the forward), and walks every query head of the group and every block of
// 64 queries that sees its keys, Q, dO, lse and D double-buffered by cp.async. Per step, as the
// mma.sync kernel: S^T = K Q^T and dP^T = V dO^T (both operands from shared memory), P^T and
// dS^T = P^T (dP^T - D) in registers, which are the A operands of dV += P^T dO and
// dK += dS^T Q (dO and Q read MN-major); dS^T is also stored (swizzled, [key][query]) and read
// back MN-major as the A of this warpgroup's share of dQ = dS K over its 64 keys; the two
// shares are summed through shared memory, each warpgroup adding half the columns to the f32
// dq_accum with atomics. All tiles are [rows][64] bf16 with 128-byte rows in the forward's
// swizzle. Dropout as flash_attention.cu's.
// A compile-time flag as a value (for the step's two elementwise forms).
template <bool B>
struct Flag {
    static constexpr bool value = B;
};

// DROPOUT: the kernel is instantiated with and without the dropout code (its caller picks by
// the threshold): the loop body is unrolled over every element, and the instruction cache, not
// the tensor cores, was what the step waited on most (Nsight Compute: "no instruction" 1.7 of
// 6.9 cycles per issued instruction).
template <bool DROPOUT>
__device__ __forceinline__ void flash_bwd_wgmma64(const bf16* __restrict__ q, const bf16* __restrict__ k,
                                                  const bf16* __restrict__ v, Strides qs, Strides ks, Strides vs,
                                                  const bf16* __restrict__ dout, const float* __restrict__ lse,
                                                  const float* __restrict__ delta, float* __restrict__ dq_accum,
                                                  bf16* __restrict__ dk, bf16* __restrict__ dv, Strides gs, int T,
                                                  int S, int H,
                                                  int KVH, int offset, float scale_log2, float scale,
                                                  unsigned int seed_lo, unsigned int seed_hi, unsigned int threshold,
                                                  float drop_scale, int b0) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
    using namespace wg;
    constexpr int BC = 128, BR = 64, D = 64, kRowBytes = 128;
    constexpr int kKeyTile = BC * kRowBytes, kQueryTile = BR * kRowBytes;
    extern __shared__ __align__(16) unsigned char smem[];
    const uint32_t base = (smem_addr(smem) + 1023) & ~1023u;
    unsigned char* generic = smem + (base - smem_addr(smem));  // the same bytes, for plain stores
    const uint32_t s_k = base, s_v = s_k + kKeyTile, s_ds = s_v + kKeyTile;
    const uint32_t s_q = s_ds + kKeyTile, s_do = s_q + 2 * kQueryTile;  // 2 stages each
    unsigned char* g_ds = generic + 2 * kKeyTile;
    float* s_lse = reinterpret_cast<float*>(generic + 3 * kKeyTile + 4 * kQueryTile);  // 2 stages
    float* s_delta = s_lse + 2 * BR;                                                     // 2 stages
    // dQ's exchange between the warpgroups: 16 floats a thread each way (see the atomics)
    float* s_dq = s_delta + 2 * BR;

    const int n0 = blockIdx.x * BC, kvh = blockIdx.y, b = blockIdx.z;
    const int group = H / KVH;
    const int wgi = threadIdx.x / 128, warp = (threadIdx.x / 32) % 4, lane = threadIdx.x % 32;
    const int grp = lane >> 2, quad = lane & 3;
    const int local_lo = wgi * 64 + warp * 16 + grp;  // this thread's keys: n0 + local_lo, + 8
    const bf16* k_h = k + b * ks.batch + kvh * ks.head;
    const bf16* v_h = v + b * vs.batch + kvh * vs.head;

    const QueryBlocks blocks(n0, offset, T, BR);
    const int steps = group * blocks.count;

    auto load_step = [&](int h, int m_block, int stage) {
        const int m0 = m_block * BR;
        const size_t head = (size_t)(b * H + h) * T;
        load_tile<BR, D>(s_q + stage * kQueryTile, q + b * qs.batch + h * qs.head, qs.row, m0, T);
        load_tile<BR, D>(s_do + stage * kQueryTile, dout + ((size_t)b * T * H + h) * D, (long long)H * D, m0, T);
        // lse and D by cp.async as well (4 bytes a thread, zero past T): a plain load here
        // would stall its warp until the values arrived.
        if (threadIdx.x < 2 * BR) {
            const int i = threadIdx.x % BR;
            const bool valid = m0 + i < T, is_delta = threadIdx.x >= BR;
            const float* src = (is_delta ? delta : lse) + head + (valid ? m0 + i : 0);
            float* dst = (is_delta ? s_delta : s_lse) + stage * BR + i;
            asm volatile("cp.async.ca.shared.global [%0], [%1], 4, %2;\n" ::"r"(smem_addr(dst)), "l"(src),
                         "r"(valid ? 4 : 0));
        }
    };

    load_tile<BC, D>(s_k, k_h, ks.row, n0, S);
    load_tile<BC, D>(s_v, v_h, vs.row, n0, S);
    if (steps > 0) load_step(kvh * group, blocks.first, 0);
    cp_async_commit();

    float acc_dk[32], acc_dv[32];
#pragma unroll
    for (int i = 0; i < 32; ++i) acc_dk[i] = acc_dv[i] = 0.f;
    // this warpgroup's 64 rows of K, V and dS^T
    const uint32_t k_rows = s_k + wgi * 64 * kRowBytes, v_rows = s_v + wgi * 64 * kRowBytes;
    const uint32_t ds_rows = s_ds + wgi * 64 * kRowBytes;

    int h = kvh * group, m_block = blocks.first;
    int next_h = h, next_m_block = m_block;
    for (int step = 0; step < steps; ++step) {
        const int stage = step & 1;
        blocks.advance(next_h, next_m_block);
        if (step + 1 < steps) load_step(next_h, next_m_block, stage ^ 1);
        cp_async_commit();
        cp_async_wait<1>();
        fence_async_shared();
        __syncthreads();
        const int m0 = m_block * BR;
        const bool all_visible = n0 + BC - 1 <= offset + m0 && m0 + BR <= T && n0 + BC <= S;
        const uint32_t q_tile = s_q + stage * kQueryTile, do_tile = s_do + stage * kQueryTile;
        const float* lse_tile = s_lse + stage * BR;
        const float* delta_tile = s_delta + stage * BR;
        // this head's first row in the dropout mask's coordinates
        const unsigned long long row0 = (unsigned long long)((b0 + b) * H + h) * T;

        // S^T = K Q^T and dP^T = V dO^T over d in 4 steps of 16 (32 bytes along the rows).
        float acc_s[32], acc_dp[32];
        pin(acc_s);
        pin(acc_dp);
        fence();
#pragma unroll
        for (int kk = 0; kk < D / 16; ++kk)
            mma64_ss<0, 0>(acc_s, descriptor(k_rows + kk * 32, 16, 1024), descriptor(q_tile + kk * 32, 16, 1024), kk > 0);
#pragma unroll
        for (int kk = 0; kk < D / 16; ++kk)
            mma64_ss<0, 0>(acc_dp, descriptor(v_rows + kk * 32, 16, 1024), descriptor(do_tile + kk * 32, 16, 1024),
                           kk > 0);
        commit();
        pin(acc_s);
        pin(acc_dp);
        wait_all();
        pin(acc_s);
        pin(acc_dp);

        // acc[4 n + e]: key n0 + local_lo + 8 (e >> 1), query m0 + 8 n + 2 quad + (e & 1). Two
        // forms: without the causal mask (a block every query of which sees every key) and with.
        auto elementwise = [&](auto masked) {
#pragma unroll
            for (int n = 0; n < BR / 8; ++n) {
                const float2 lse2 = *reinterpret_cast<const float2*>(lse_tile + n * 8 + quad * 2);
                const float2 delta2 = *reinterpret_cast<const float2*>(delta_tile + n * 8 + quad * 2);
#pragma unroll
                for (int e = 0; e < 4; ++e) {
                    const int key = n0 + local_lo + (e >> 1) * 8, query = m0 + n * 8 + quad * 2 + (e & 1);
                    backward_element<DROPOUT, decltype(masked)::value>(
                        acc_s[4 * n + e], acc_dp[4 * n + e], (e & 1) ? lse2.y : lse2.x, (e & 1) ? delta2.y : delta2.x,
                        key, query, all_visible, offset, T, S, row0, scale_log2, seed_lo, seed_hi, threshold,
                        drop_scale);
                }
                // dS^T row (key) r, queries 8 n .. + 7: 16-byte chunk n of the swizzled row
#pragma unroll
                for (int r = 0; r < 2; ++r) {
                    const int row = local_lo + r * 8;
                    *reinterpret_cast<uint32_t*>(g_ds + row * kRowBytes + ((n ^ (row & 7)) << 4) + quad * 4) =
                        pack_bf16(acc_dp[4 * n + 2 * r], acc_dp[4 * n + 2 * r + 1]);
                }
            }
        };
        if (all_visible)
            elementwise(Flag<false>{});
        else
            elementwise(Flag<true>{});

        // dV += P^T dO and dK += dS^T Q over the 64 queries in 4 steps of 16: n-tiles 2 kk and
        // 2 kk + 1 are the A fragment of step kk; dO and Q rows (queries) are K, 16 of them two
        // 8-row groups 1024 bytes apart. (All fragments packed before the fence.)
        uint32_t p_frag[BR / 16][4], ds_frag[BR / 16][4];
#pragma unroll
        for (int kk = 0; kk < BR / 16; ++kk)
#pragma unroll
            for (int i = 0; i < 4; ++i) {
                p_frag[kk][i] = pack_bf16(acc_s[8 * kk + 2 * i], acc_s[8 * kk + 2 * i + 1]);
                ds_frag[kk][i] = pack_bf16(acc_dp[8 * kk + 2 * i], acc_dp[8 * kk + 2 * i + 1]);
            }
        pin(acc_dv);
        pin(acc_dk);
        pin(p_frag);
        pin(ds_frag);
        fence();
#pragma unroll
        for (int kk = 0; kk < BR / 16; ++kk)
            mma64_rs(acc_dv, p_frag[kk], descriptor(do_tile + kk * 16 * kRowBytes, kQueryTile, 1024));
#pragma unroll
        for (int kk = 0; kk < BR / 16; ++kk)
            mma64_rs(acc_dk, ds_frag[kk], descriptor(q_tile + kk * 16 * kRowBytes, kQueryTile, 1024));
        commit();
        pin(acc_dv);
        pin(acc_dk);
        pin(p_frag);
        pin(ds_frag);

        // dQ (64 queries x 64) += dS K over this warpgroup's 64 keys: A = dS from the stored
        // dS^T (MN-major: queries contiguous), B = K (MN-major: d contiguous), keys are K.
        fence_async_shared();
        warpgroup_barrier(wgi);
        float acc_dq[32];
        pin(acc_dq);
        fence();
#pragma unroll
        for (int kk = 0; kk < 64 / 16; ++kk)
            mma64_ss<1, 1>(acc_dq, descriptor(ds_rows + kk * 16 * kRowBytes, kKeyTile, 1024),
                           descriptor(k_rows + kk * 16 * kRowBytes, kKeyTile, 1024), kk > 0);
        commit();
        pin(acc_dq);
        wait_all();
        pin(acc_dq);
        pin(acc_dv);
        pin(acc_dk);
        pin(p_frag);
        pin(ds_frag);

        // acc_dq[4 n + e]: query m0 + 16 warp + grp + 8 (e >> 1), column 8 n + 2 quad + (e & 1),
        // the same positions in both warpgroups' threads of one index. Warpgroup wg adds columns
        // 32 wg .. + 31 (n-tiles 4 wg .. + 3) to dq_accum: it hands the other half to its partner
        // through shared memory and adds the partner's half of its own, which halves the atomics.
        const int tid = threadIdx.x % 128;
        float* to_partner = s_dq + (1 - wgi) * 16 * 128;  // read by the other warpgroup
#pragma unroll
        for (int i = 0; i < 16; ++i) to_partner[i * 128 + tid] = wgi == 0 ? acc_dq[16 + i] : acc_dq[i];
        __syncthreads();
        const float* from_partner = s_dq + wgi * 16 * 128;
        float half[16];  // half[4 j + e]: n-tile 4 wg + j
#pragma unroll
        for (int i = 0; i < 16; ++i) half[i] = (wgi == 0 ? acc_dq[i] : acc_dq[16 + i]) + from_partner[i * 128 + tid];
        // two adjacent columns per atomic
        float* dq_h = dq_accum + (size_t)(b * H + h) * T * D;
#pragma unroll
        for (int r = 0; r < 2; ++r) {
            const int row = m0 + warp * 16 + grp + r * 8;
            if (row >= T) continue;
            float* dq_row = dq_h + (size_t)row * D + wgi * 32 + quad * 2;
#pragma unroll
            for (int j = 0; j < 4; ++j)
                atomicAdd(reinterpret_cast<float2*>(dq_row + j * 8), make_float2(half[4 * j + 2 * r], half[4 * j + 2 * r + 1]));
        }
        h = next_h, m_block = next_m_block;
        // dS^T and this stage's tiles are overwritten next step.
        __syncthreads();
    }

    // token-major at the gradients' strides `gs` (dk's and dv's)
    bf16* dk_h = dk + (size_t)b * gs.batch + (size_t)kvh * gs.head;
    bf16* dv_h = dv + (size_t)b * gs.batch + (size_t)kvh * gs.head;
#pragma unroll
    for (int r = 0; r < 2; ++r) {
        const int key = n0 + local_lo + r * 8;
        if (key >= S) continue;
#pragma unroll
        for (int n = 0; n < D / 8; ++n) {
            const size_t at = (size_t)key * gs.row + n * 8 + quad * 2;
            *reinterpret_cast<uint32_t*>(dk_h + at) = pack_bf16(acc_dk[4 * n + 2 * r] * scale, acc_dk[4 * n + 2 * r + 1] * scale);
            *reinterpret_cast<uint32_t*>(dv_h + at) = pack_bf16(acc_dv[4 * n + 2 * r], acc_dv[4 * n + 2 * r + 1]);
        }
    }
#else
    __trap();  // built for a target without wgmma (sm_90a)
#endif
}

}  // namespace

extern "C" __global__ void __launch_bounds__(256)
    flash_attention_fwd_wgmma_d128(const bf16* q, const bf16* k, const bf16* v, Strides qs, Strides ks, Strides vs,
                                   bf16* o, float* lse, int T, int S, int H, int KVH, int offset, float scale_log2) {
    flash_fwd_wgmma<128>(q, k, v, qs, ks, vs, o, lse, T, S, H, KVH, offset, scale_log2);
}

extern "C" __global__ void __launch_bounds__(256)
    flash_attention_fwd_wgmma_d64(const bf16* q, const bf16* k, const bf16* v, Strides qs, Strides ks, Strides vs,
                                  bf16* o, float* lse, int T, int S, int H, int KVH, int offset, float scale_log2) {
    flash_fwd_wgmma<64>(q, k, v, qs, ks, vs, o, lse, T, S, H, KVH, offset, scale_log2);
}

extern "C" __global__ void __launch_bounds__(256, 1) flash_attention_bwd_wgmma_d64(
    const bf16* q, const bf16* k, const bf16* v, Strides qs, Strides ks, Strides vs, const bf16* dout, const float* lse,
    const float* delta, float* dq_accum, bf16* dk, bf16* dv, Strides gs, int T, int S, int H, int KVH, int offset,
    float scale_log2, float scale, unsigned int seed_lo, unsigned int seed_hi, unsigned int threshold, float drop_scale,
    int b0) {
    if (threshold == 0)
        flash_bwd_wgmma64<false>(q, k, v, qs, ks, vs, dout, lse, delta, dq_accum, dk, dv, gs, T, S, H, KVH, offset, scale_log2, scale,
                      seed_lo, seed_hi, threshold, drop_scale, b0);
    else
        flash_bwd_wgmma64<true>(q, k, v, qs, ks, vs, dout, lse, delta, dq_accum, dk, dv, gs, T, S, H, KVH, offset, scale_log2, scale,
                      seed_lo, seed_hi, threshold, drop_scale, b0);
}
