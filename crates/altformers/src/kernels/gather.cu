#include <cuda_bf16.h>
#include <stdint.h>

#include "convert.cuh"

// The backward of a row gather (`table[ids]`, the token embedding and the MQAR query rows):
// the gradient of every gathered row is added into its table row. candle's generic
// `index_add` gives each of the d columns one thread that walks all N ids in order, so a
// 16K-token batch is 16K dependent steps on one SM (about 10 ms, the whole step of a small
// model); here every (id, column) pair has its own thread and repeated ids meet in f32
// atomics (so the summation order, and the last bits, vary from run to run, as in
// PyTorch's index_add_).
extern "C" __global__ void scatter_add_rows_f32(const unsigned int* __restrict__ ids,
                                                const float* __restrict__ grad,
                                                float* __restrict__ out, long long n, int d,
                                                unsigned int rows) {
    const long long total = n * (long long)d;
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < total;
         i += (long long)gridDim.x * blockDim.x) {
        const unsigned int row = ids[i / d];
        // Out-of-range ids cannot reach here (the forward gather rejects them); skip anyway.
        if (row < rows) atomicAdd(out + (long long)row * d + i % d, grad[i]);
    }
}

// A token embedding in one pass each way (`embed_*`): out[r] = table[ids[r]] + pos[r % t],
// rounded to the activations' dtype, where the gather, the position add in f32 and the cast
// were three passes over [N, d] (and their gradients three more, the cast of the gradient to
// f32 alone 0.12 ms of a GPT-2-small step). A block per row at a time, threads along the row.
// An id past the table gives NaN (the gather above rejects it; this one cannot stop).
namespace {

template <typename T>
__device__ __forceinline__ void embed_fwd(const float* __restrict__ table, const float* __restrict__ pos,
                                          const unsigned int* __restrict__ ids, T* __restrict__ out, long long n,
                                          int d, int t, unsigned int rows, int has_pos) {
    for (long long r = blockIdx.x; r < n; r += gridDim.x) {
        const unsigned int id = ids[r];
        const float* tr = table + (long long)id * d;
        const float* pr = pos + (r % t) * (long long)d;
        T* orow = out + r * d;
        for (int c = threadIdx.x; c < d; c += blockDim.x) {
            const float v = id < rows ? tr[c] : __int_as_float(0x7fc00000);
            orow[c] = from_f32<T>(has_pos ? v + pr[c] : v);
        }
    }
}

// d table[ids[r]] += g[r] (f32 atomics into a zeroed table: repeated ids meet there).
template <typename T>
__device__ __forceinline__ void embed_bwd_table(const T* __restrict__ g, const unsigned int* __restrict__ ids,
                                                float* __restrict__ dtable, long long n, int d, unsigned int rows) {
    for (long long r = blockIdx.x; r < n; r += gridDim.x) {
        const unsigned int id = ids[r];
        if (id >= rows) continue;
        for (int c = threadIdx.x; c < d; c += blockDim.x) atomicAdd(dtable + (long long)id * d + c, to_f32(g[r * d + c]));
    }
}

// d pos[p] = sum over the b sequences of g[s t + p] (each position's rows, in order: no atomics).
template <typename T>
__device__ __forceinline__ void embed_bwd_positions(const T* __restrict__ g, float* __restrict__ dpos, int b, int d,
                                                    int t) {
    for (int p = blockIdx.x; p < t; p += gridDim.x)
        for (int c = threadIdx.x; c < d; c += blockDim.x) {
            float s = 0.f;
            for (int q = 0; q < b; ++q) s += to_f32(g[((long long)q * t + p) * d + c]);
            dpos[(long long)p * d + c] = s;
        }
}

}  // namespace

#define EMBED_ENTRY_POINTS(SUFFIX, T)                                                                            \
    extern "C" __global__ void embed_fwd_##SUFFIX(const float* table, const float* pos, const unsigned int* ids, \
                                                  T* out, long long n, int d, int t, unsigned int rows,          \
                                                  int has_pos) {                                                 \
        embed_fwd<T>(table, pos, ids, out, n, d, t, rows, has_pos);                                              \
    }                                                                                                            \
    extern "C" __global__ void embed_bwd_table_##SUFFIX(const T* g, const unsigned int* ids, float* dtable,       \
                                                        long long n, int d, unsigned int rows) {                 \
        embed_bwd_table<T>(g, ids, dtable, n, d, rows);                                                          \
    }                                                                                                            \
    extern "C" __global__ void embed_bwd_positions_##SUFFIX(const T* g, float* dpos, int b, int d, int t) {      \
        embed_bwd_positions<T>(g, dpos, b, d, t);                                                                \
    }

EMBED_ENTRY_POINTS(f32, float)
EMBED_ENTRY_POINTS(bf16, __nv_bfloat16)
