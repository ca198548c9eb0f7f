// Causal attention forward for head width 128 on Hopper's warpgroup MMA (wgmma), the
// alternative to flash_attention.cu's mma.sync forward and the default on compute capability
// 9.0 (1.2x it on the H200; ALTFORMERS_ATTENTION_FWD=mma selects the other). Same arguments,
// same outputs: O and the log2-unit log-sum-exp the backward there reads. Compiled for sm_90a,
// the target that has wgmma (build.rs: files named *_sm90a.cu), so it loads only on compute
// capability 9.0.
//
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
#include <cuda_bf16.h>
#include <stdint.h>

#include "async_copy.cuh"
#include "convert.cuh"

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

// Rows row0 .. row0 + rows of a [n, 128] matrix with rows `ld` elements apart into a swizzled
// tile (zero-filled past n).
template <int ROWS>
__device__ __forceinline__ void load_tile(uint32_t tile, const bf16* src, long long ld, int row0, int n) {
    constexpr int kChunks = ROWS * kD / 8;
    static_assert(kChunks % kThreads == 0, "whole chunks per thread");
#pragma unroll
    for (int i = 0; i < kChunks / kThreads; ++i) {
        const int c = i * kThreads + threadIdx.x, row = c >> 4, chunk = c & 15;
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

}  // namespace wg

// Grid (ceil(T / 128), H, B), 256 threads: warpgroup wg owns rows m0 + 64 wg .. + 63; warp w
// of it rows + 16 (w % 4), the same per-warp row block as the accumulators of mma.m16n8k16,
// so the softmax below is the mma.sync kernel's with one m-tile and 16 n-tiles.
__device__ __forceinline__ void flash_fwd_wgmma(const bf16* __restrict__ q, const bf16* __restrict__ k,
                                                const bf16* __restrict__ v, Strides qs, Strides ks, Strides vs,
                                                bf16* __restrict__ o,
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
    const bf16* q_h = q + b * qs.batch + h * qs.head;
    const bf16* k_h = k + b * ks.batch + kvh * ks.head;
    const bf16* v_h = v + b * vs.batch + kvh * vs.head;
    const int key_end = min(S, offset + m0 + kRows);
    const int key_blocks = (key_end + kKeys - 1) / kKeys;

    load_tile<kRows>(s_q, q_h, qs.row, m0, T);
    load_tile<kKeys>(s_k, k_h, ks.row, 0, S);
    load_tile<kKeys>(s_v, v_h, vs.row, 0, S);
    cp_async_commit();

    float acc_o[64], acc_s[64];
#pragma unroll
    for (int i = 0; i < 64; ++i) acc_o[i] = acc_s[i] = 0.f;
    float row_max[2] = {-INFINITY, -INFINITY}, row_sum[2] = {0.f, 0.f};

    for (int j = 0; j < key_blocks; ++j) {
        const int stage = j & 1;
        if (j + 1 < key_blocks) {
            load_tile<kKeys>(s_k + (stage ^ 1) * kTileBytes, k_h, ks.row, (j + 1) * kKeys, S);
            load_tile<kKeys>(s_v + (stage ^ 1) * kTileBytes, v_h, vs.row, (j + 1) * kKeys, S);
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
        for (int kk = 0; kk < kD / 16; ++kk) {
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
        pin(acc_o);
        pin(p_frag);
        fence();
#pragma unroll
        for (int kk = 0; kk < kKeys / 16; ++kk)
            mma_rs(acc_o, p_frag[kk], descriptor(v_tile + kk * 16 * kHalfBytes, kKeys * kHalfBytes, 1024));
        commit();
        pin(acc_o);
        pin(p_frag);
        wait_all();
        pin(acc_o);
        // The next iteration prefetches into the stage just read.
        __syncthreads();
    }

    bf16* o_h = o + ((size_t)b * T * H + h) * kD;  // token-major: rows H kD apart
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
                *reinterpret_cast<uint32_t*>(o_h + (size_t)row * H * kD + n * 8 + quad * 2) =
                    pack_bf16(acc_o[4 * n + 2 * r] * inv, acc_o[4 * n + 2 * r + 1] * inv);
            if (quad == 0) lse[(size_t)(b * H + h) * T + row] = row_max[r] + log2f(sum);
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
    flash_fwd_wgmma(q, k, v, qs, ks, vs, o, lse, T, S, H, KVH, offset, scale_log2);
}
