// RWKV-4's one-token step fused (`decode.rs`): the token-shift mixes of a block in one launch,
// the WKV read, update and receptance gate in one, and the channel mix's squared ReLU and gate
// in one each. Decoding a token is a few hundred small operations; unfused, candle launched
// about seventy per layer and the step was bound by launches, not by the GPU.
// Activations T (f32 or bf16), parameters P (the activations' dtype, or f32 under bf16
// activations over f32 weights); the WKV state and all arithmetic in f32.
#include <cuda_bf16.h>

#include "convert.cuh"

namespace {

__device__ __forceinline__ float sigmoid(float x) { return 1.f / (1.f + expf(-x)); }

// out[i][b][c] = prev[b][c] + (x[b][c] - prev[b][c]) * mix_i[c] for the n = 2 or 3 mixes
// (prev null: zeros, the start of a sequence). x, prev: [rows, d]; out: [n, rows, d].
template <typename T, typename P>
__device__ void shift_mix(const T* __restrict__ x, const T* __restrict__ prev, const P* __restrict__ m0,
                          const P* __restrict__ m1, const P* __restrict__ m2, T* __restrict__ out, long long total,
                          int d, int n) {
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < total; i += (long long)gridDim.x * blockDim.x) {
        const int c = i % d;
        const float p = prev ? to_f32(prev[i]) : 0.f;
        const float diff = to_f32(x[i]) - p;
        out[i] = from_f32<T>(p + diff * to_f32(m0[c]));
        out[total + i] = from_f32<T>(p + diff * to_f32(m1[c]));
        if (n > 2) out[2 * total + i] = from_f32<T>(p + diff * to_f32(m2[c]));
    }
}

// One token of the official RWKV-4 kernel, then the receptance gate:
//   y = sigmoid(r) * (e1 aa + e2 v) / (e1 bb + e2), e1 = e^{pp - q}, e2 = e^{u + k - q}, q = max(pp, u + k)
//   then the state: aa' = f1 aa + f2 v, bb' = f1 bb + f2, pp' = q', with f1 = e^{pp - w - q'},
//   f2 = e^{k - q'}, q' = max(pp - w, k), w = e^{time_decay}.
// k, v, r: [rows, d]; state aa, bb, pp (f32, [rows, d] each; null: the empty state); decay and
// bonus u: [d]. Writes y: [rows, d] and the new state as one [3, rows, d] f32 buffer.
template <typename T, typename P>
__device__ void wkv_step(const T* __restrict__ k, const T* __restrict__ v, const T* __restrict__ r,
                         const float* __restrict__ aa, const float* __restrict__ bb, const float* __restrict__ pp,
                         const P* __restrict__ decay, const P* __restrict__ bonus, T* __restrict__ y,
                         float* __restrict__ state, long long total, int d, float empty_log_scale) {
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < total; i += (long long)gridDim.x * blockDim.x) {
        const int c = i % d;
        const float kk = to_f32(k[i]), vv = to_f32(v[i]);
        const float a = aa ? aa[i] : 0.f, b = bb ? bb[i] : 0.f, p = pp ? pp[i] : empty_log_scale;
        const float ww = to_f32(bonus[c]) + kk;
        float q = fmaxf(p, ww);
        float e1 = expf(p - q), e2 = expf(ww - q);
        y[i] = from_f32<T>(sigmoid(to_f32(r[i])) * ((e1 * a + e2 * vv) / (e1 * b + e2)));
        const float decayed = p - expf(to_f32(decay[c]));
        q = fmaxf(decayed, kk);
        e1 = expf(decayed - q);
        e2 = expf(kk - q);
        state[i] = e1 * a + e2 * vv;
        state[total + i] = e1 * b + e2;
        state[2 * total + i] = q;
    }
}

}  // namespace

#define RWKV4_DECODE(SUFFIX, T, P)                                                                                  \
    extern "C" __global__ void shift_mix_##SUFFIX(const T* x, const T* prev, const P* m0, const P* m1, const P* m2, \
                                                  T* out, long long total, int d, int n) {                          \
        shift_mix(x, prev, m0, m1, m2, out, total, d, n);                                                           \
    }                                                                                                               \
    extern "C" __global__ void wkv_step_##SUFFIX(const T* k, const T* v, const T* r, const float* aa,               \
                                                 const float* bb, const float* pp, const P* decay, const P* bonus,  \
                                                 T* y, float* state, long long total, int d, float empty) {         \
        wkv_step(k, v, r, aa, bb, pp, decay, bonus, y, state, total, d, empty);                                     \
    }

RWKV4_DECODE(f32, float, float)
RWKV4_DECODE(bf16, __nv_bfloat16, __nv_bfloat16)
RWKV4_DECODE(bf16_f32, __nv_bfloat16, float)

// The channel mix's key activation, max(x, 0)^2, and its gate sigmoid(r) * v.
#define RWKV4_CHANNEL(SUFFIX, T)                                                                          \
    extern "C" __global__ void relu_square_##SUFFIX(const T* x, T* y, long long n) {                      \
        for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n;                       \
             i += (long long)gridDim.x * blockDim.x) {                                                    \
            const float v = fmaxf(to_f32(x[i]), 0.f);                                                     \
            y[i] = from_f32<T>(v * v);                                                                    \
        }                                                                                                 \
    }                                                                                                     \
    extern "C" __global__ void sigmoid_gate_##SUFFIX(const T* r, const T* v, T* y, long long n) {         \
        for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n;                       \
             i += (long long)gridDim.x * blockDim.x) {                                                    \
            y[i] = from_f32<T>(sigmoid(to_f32(r[i])) * to_f32(v[i]));                                     \
        }                                                                                                 \
    }

RWKV4_CHANNEL(f32, float)
RWKV4_CHANNEL(bf16, __nv_bfloat16)
