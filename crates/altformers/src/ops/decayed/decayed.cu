// Decayed linear attention (ops/decayed/), fused:
//
// 1. retention_scan_*: o_t = sum_{i<=t} gamma^(t-i) (q_t . k_i) v_i for one scalar decay per
//    head, chunkwise. One CTA per (value-column tile, head, batch) walks the chunks in order,
//    holding the [d_k, VTILE] state in shared memory: per chunk, scores (Q K^T) (.) D, output
//    P V + (Q (.) gamma^(j+1)) S, then S = gamma^len S + (K (.) gamma^(len-1-i))^T V. With
//    `reverse` the sequence is read back to front (t -> T-1-t): the backward pass is three such
//    scans (see cuda.rs beside this file). Inputs f32 or bf16, everything accumulated in f32.
//
// 2. wkv_forward / wkv_backward: RWKV-4's normalised WKV, one thread per (batch, channel)
//    scanning time in f32 with the running-maximum state (aa, bb, pp) of the official kernel.
//
// 3. retention_step: one token of 1 when decoding, S' = gamma S + k^T v and o = q S', in one
//    pass over the state (read once, written once).

#include <cuda_bf16.h>

namespace {

constexpr int CHUNK = 64;           // tokens per chunk
constexpr int VTILE = 64;           // value columns per CTA
constexpr int THREADS = 256;        // 16 x 16 threads, each owning a 4 x 4 output tile
constexpr int TSTRIDE = CHUNK + 4;  // row stride of the transposed tiles (keeps float4 alignment)

__device__ __forceinline__ float to_float(float x) { return x; }
__device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }
__device__ __forceinline__ void put(float* p, float x) { *p = x; }
__device__ __forceinline__ void put(__nv_bfloat16* p, float x) { *p = __float2bfloat16(x); }

__device__ __forceinline__ void fma4(float4& acc, float s, const float4& x) {
    acc.x = fmaf(s, x.x, acc.x);
    acc.y = fmaf(s, x.y, acc.y);
    acc.z = fmaf(s, x.z, acc.z);
    acc.w = fmaf(s, x.w, acc.w);
}

__device__ __forceinline__ float lane(const float4& x, int i) {
    return i == 0 ? x.x : i == 1 ? x.y : i == 2 ? x.z : x.w;
}

// acc[r] += a[m][r] * b[m][0..4] for m < n (a 4 x 4 tile of the product of a's columns and
// b's rows), each row of a and b float4-aligned, `a_stride` / `b_stride` floats apart.
__device__ __forceinline__ void tile4(float4 (&acc)[4], const float* a, int a_stride, const float* b,
                                      int b_stride, int n) {
    for (int m = 0; m < n; ++m) {
        const float4 am = *reinterpret_cast<const float4*>(&a[m * a_stride]);
        const float4 bm = *reinterpret_cast<const float4*>(&b[m * b_stride]);
#pragma unroll
        for (int r = 0; r < 4; ++r) fma4(acc[r], lane(am, r), bm);
    }
}

// Shared memory layout (floats), every segment a multiple of 4 floats:
// qT [dk][TSTRIDE], kT [dk][TSTRIDE] (chunk transposed), vs [CHUNK][VTILE],
// pT [CHUNK][TSTRIDE] (decayed scores, pT[i][j] for query j, key i), S [dk][VTILE],
// powers [CHUNK + 4] (gamma^n).
template <typename Elem>
__device__ void retention_scan(const Elem* __restrict__ q, const Elem* __restrict__ k,
                               const Elem* __restrict__ v, const float* __restrict__ log_decay,
                               Elem* __restrict__ out, Elem* __restrict__ state_out, int heads,
                               int len_t, int dk, int dv, int reverse) {
    const int tile = blockIdx.x, h = blockIdx.y, b = blockIdx.z;
    const int e0 = tile * VTILE;
    const int width = min(VTILE, dv - e0);
    const size_t bh = (size_t)b * heads + h;
    const Elem* qh = q + bh * len_t * dk;
    const Elem* kh = k + bh * len_t * dk;
    const Elem* vh = v + bh * len_t * dv;
    Elem* oh = out + bh * len_t * dv;
    state_out += bh * dk * dv;  // [B, H, dk, dv]

    extern __shared__ float4 smem4[];
    float* qT = reinterpret_cast<float*>(smem4);
    float* kT = qT + dk * TSTRIDE;
    float* vs = kT + dk * TSTRIDE;
    float* pT = vs + CHUNK * VTILE;
    float* S = pT + CHUNK * TSTRIDE;
    float* powers = S + dk * VTILE;

    const int tid = threadIdx.x, tx = tid % 16, ty = tid / 16;
    const float ld = log_decay[h];
    for (int n = tid; n <= CHUNK; n += THREADS) powers[n] = __expf(ld * n);
    for (int i = tid; i < dk * VTILE; i += THREADS) S[i] = 0.f;

    const int chunks = (len_t + CHUNK - 1) / CHUNK;
    for (int c = 0; c < chunks; ++c) {
        const int start = c * CHUNK;
        const int len = min(CHUNK, len_t - start);
        // position r of the chunk is token `time(r)` of the sequence
        auto time = [&](int r) -> size_t {
            return reverse ? (size_t)(len_t - 1 - start - r) : (size_t)(start + r);
        };
        __syncthreads();  // the previous chunk's readers are done (and the init is visible)
        for (int idx = tid; idx < CHUNK * dk; idx += THREADS) {
            const int r = idx / dk, a = idx % dk;
            const bool live = r < len;
            qT[a * TSTRIDE + r] = live ? to_float(qh[time(r) * dk + a]) : 0.f;
            kT[a * TSTRIDE + r] = live ? to_float(kh[time(r) * dk + a]) : 0.f;
        }
        for (int idx = tid; idx < CHUNK * VTILE; idx += THREADS) {
            const int r = idx / VTILE, e = idx % VTILE;
            vs[idx] = (r < len && e < width) ? to_float(vh[time(r) * dv + e0 + e]) : 0.f;
        }
        __syncthreads();

        // scores: queries j = 4 ty + r, keys i = 4 tx + s; tiles above the diagonal are zero
        {
            float4 acc[4] = {};
            if (tx <= ty) tile4(acc, &qT[4 * ty], TSTRIDE, &kT[4 * tx], TSTRIDE, dk);
#pragma unroll
            for (int s = 0; s < 4; ++s) {
                const int i = 4 * tx + s;
                float4 col;
                float* cp = reinterpret_cast<float*>(&col);
#pragma unroll
                for (int r = 0; r < 4; ++r) {
                    const int j = 4 * ty + r;
                    cp[r] = i <= j ? lane(acc[r], s) * powers[j - i] : 0.f;
                }
                *reinterpret_cast<float4*>(&pT[i * TSTRIDE + 4 * ty]) = col;
            }
        }
        __syncthreads();

        // outputs: rows j = 4 ty + r, value columns e = 4 tx + s
        {
            float4 inner[4] = {}, cross[4] = {};
            tile4(inner, &pT[4 * ty], TSTRIDE, &vs[4 * tx], VTILE, 4 * ty + 4);
            tile4(cross, &qT[4 * ty], TSTRIDE, &S[4 * tx], VTILE, dk);
#pragma unroll
            for (int r = 0; r < 4; ++r) {
                const int j = 4 * ty + r;
                if (j >= len) break;
                const float qd = powers[j + 1];
                Elem* row = oh + time(j) * dv + e0;
#pragma unroll
                for (int s = 0; s < 4; ++s) {
                    const int e = 4 * tx + s;
                    if (e < width) put(&row[e], lane(inner[r], s) + qd * lane(cross[r], s));
                }
            }
        }
        __syncthreads();

        // state: S = gamma^len S + sum_{i<len} gamma^(len-1-i) k_i^T v_i (rows a = ty + 16 m)
        const float carry = powers[len];
        for (int a = ty; a < dk; a += 16) {
            float4 acc = *reinterpret_cast<const float4*>(&S[a * VTILE + 4 * tx]);
            acc.x *= carry;
            acc.y *= carry;
            acc.z *= carry;
            acc.w *= carry;
            for (int i = 0; i < len; ++i) {
                const float4 vi = *reinterpret_cast<const float4*>(&vs[i * VTILE + 4 * tx]);
                fma4(acc, kT[a * TSTRIDE + i] * powers[len - 1 - i], vi);
            }
            *reinterpret_cast<float4*>(&S[a * VTILE + 4 * tx]) = acc;
        }
    }
    __syncthreads();
    for (int idx = tid; idx < dk * VTILE; idx += THREADS) {
        const int a = idx / VTILE, e = idx % VTILE;
        if (e < width) put(&state_out[(size_t)a * dv + e0 + e], S[idx]);
    }
}

}  // namespace

#define RETENTION_SCAN(NAME, ELEM)                                                              \
    extern "C" __global__ void __launch_bounds__(THREADS)                                       \
        NAME(const ELEM* q, const ELEM* k, const ELEM* v, const float* log_decay, ELEM* out,    \
             ELEM* state_out, int heads, int len_t, int dk, int dv, int reverse) {              \
        retention_scan<ELEM>(q, k, v, log_decay, out, state_out, heads, len_t, dk, dv, reverse); \
    }
RETENTION_SCAN(retention_scan_f32, float)
RETENTION_SCAN(retention_scan_bf16, __nv_bfloat16)

// One channel's WKV state as the official RWKV-4 kernel keeps it: numerator aa e^pp,
// denominator bb e^pp, pp a running maximum exponent.
struct WkvRun {
    float aa = 0.f, bb = 0.f, pp = -1e38f;

    // The output for token (kk, vv) with the bonus u, before it is folded in: y = num / den,
    // with den and p (num and den are scaled by e^-p) returned beside it.
    __device__ __forceinline__ float read(float kk, float vv, float u, float& den, float& p) const {
        const float ww = u + kk;
        p = fmaxf(pp, ww);
        const float e1 = __expf(pp - p), e2 = __expf(ww - p);
        den = e1 * bb + e2;
        return (e1 * aa + e2 * vv) / den;
    }

    // Folds token (kk, vv) into the state after one step of decay w.
    __device__ __forceinline__ void fold(float kk, float vv, float w) {
        const float ww = pp - w;
        const float p = fmaxf(ww, kk);
        const float e1 = __expf(ww - p);
        const float e2 = __expf(kk - p);
        aa = e1 * aa + e2 * vv;
        bb = e1 * bb + e2;
        pp = p;
    }
};

// WKV, k, v: [B, T, C] f32; decay_bonus: [2, C] (decay rate w >= 0, per-step factor e^{-w};
// bonus u). y_t = (sum_{i<t} e^{-(t-1-i) w + k_i} v_i + e^{u + k_t} v_t) / (same with v = 1).
// Writes y [B, T, C] then the final state aa, bb, pp, each [B, C] (`out` holds B (T + 3) C).
extern "C" __global__ void wkv_forward(const float* __restrict__ k, const float* __restrict__ v,
                                       const float* __restrict__ decay_bonus,
                                       float* __restrict__ out, int batch, int len_t, int channels) {
    const int idx = blockIdx.x * blockDim.x + threadIdx.x;
    if (idx >= batch * channels) return;
    const int b = idx / channels, c = idx % channels;
    const float w = decay_bonus[c], u = decay_bonus[channels + c];
    const size_t base = (size_t)b * len_t * channels + c;
    WkvRun run;
    for (int t = 0; t < len_t; ++t) {
        const size_t at = base + (size_t)t * channels;
        const float kk = k[at], vv = v[at];
        // read (the current token with its bonus), then fold it into the state
        float den, p;
        out[at] = run.read(kk, vv, u, den, p);
        run.fold(kk, vv, w);
    }
    float* state = out + (size_t)batch * len_t * channels + idx;
    const size_t plane = (size_t)batch * channels;
    state[0] = run.aa;
    state[plane] = run.bb;
    state[2 * plane] = run.pp;
}

// Gradients of WKV from dL/dy `gy`. Writes dk, dv ([B, T, C] each) then the per-sequence dw,
// du ([B, C] each; the caller sums over B): `grads` holds 2 B T C + 2 B C.
//
// With D_t the denominator of y_t and h_t = gy_t / D_t, the past tokens' gradients use
//   alpha_i = sum_{t>i} e^{-(t-1-i) w} h_t,   beta_i = same with h_t y_t,
//   alpha'_i = sum_{t>i} (t-1-i) e^{-(t-1-i) w} h_t, beta'_i likewise,
// as dk_i = e^{k_i} (v_i alpha_i - beta_i), dv_i = e^{k_i} alpha_i,
// dw = -sum_i e^{k_i} (v_i alpha'_i - beta'_i); the bonus term adds
// gy_t e^{u + k_t} / D_t (v_t - y_t) to dk_t and du, gy_t e^{u + k_t} / D_t to dv_t.
// The four sums share a log-scale `q` (the running maximum of -(t-1-i) w - log D_t), and
// k_i + q <= 0 since D_t contains e^{k_i - (t-1-i) w}: nothing overflows for any key size.
// A first, forward pass stores y_t and log D_t in the dv and dk slots it later overwrites.
extern "C" __global__ void wkv_backward(const float* __restrict__ k, const float* __restrict__ v,
                                        const float* __restrict__ gy,
                                        const float* __restrict__ decay_bonus,
                                        float* __restrict__ grads, int batch, int len_t,
                                        int channels) {
    const int idx = blockIdx.x * blockDim.x + threadIdx.x;
    if (idx >= batch * channels) return;
    const int b = idx / channels, c = idx % channels;
    const float w = decay_bonus[c], u = decay_bonus[channels + c];
    const size_t base = (size_t)b * len_t * channels + c;
    const size_t volume = (size_t)batch * len_t * channels;
    float* gk = grads;
    float* gv = grads + volume;

    WkvRun run;
    for (int t = 0; t < len_t; ++t) {
        const size_t at = base + (size_t)t * channels;
        const float kk = k[at], vv = v[at];
        float den, p;
        gv[at] = run.read(kk, vv, u, den, p);  // y_t
        gk[at] = p + __logf(den);              // log D_t
        run.fold(kk, vv, w);
    }

    float alpha = 0.f, beta = 0.f, alpha_aged = 0.f, beta_aged = 0.f, scale = -1e38f;
    float gw = 0.f, gu = 0.f;
    for (int t = len_t - 1; t >= 0; --t) {
        const size_t at = base + (size_t)t * channels;
        const float kk = k[at], vv = v[at], g = gy[at];
        const float y = gv[at], log_den = gk[at];
        const float bonus_grad = g * __expf(u + kk - log_den);
        const float past = __expf(kk + scale);
        gu += bonus_grad * (vv - y);
        gk[at] = bonus_grad * (vv - y) + past * (vv * alpha - beta);
        gv[at] = bonus_grad + past * alpha;
        gw -= past * (vv * alpha_aged - beta_aged);
        // extend the sums by token t (for the tokens before it): age one step, add h_t
        const float next = fmaxf(scale - w, -log_den);
        const float f = __expf(scale - w - next), e = __expf(-log_den - next);
        alpha_aged = (alpha_aged + alpha) * f;
        beta_aged = (beta_aged + beta) * f;
        alpha = alpha * f + g * e;
        beta = beta * f + g * y * e;
        scale = next;
    }
    float* params = grads + 2 * volume + idx;
    params[0] = gw;
    params[(size_t)batch * channels] = gu;
}

// One decoding token of retention per (batch, head) row: S' = gamma_h S + k^T v, o = q S'.
// q, k: [rows, dk]; v: [rows, dv]; state, next: [rows, dk, dv] (state null: the empty state);
// log_decay: [heads]; o: [rows, dv]; all f32. Grid (rows, ceil(dv / blockDim.x)); a thread owns
// one value column and walks the dk rows of the state, so each state element is read and
// written once, in coalesced rows (the tensor form's outer product, decay, add and product
// made about seven passes, two of them cuBLAS batches of rank-1 and one-row products).
extern "C" __global__ void retention_step(const float* __restrict__ q, const float* __restrict__ k,
                                          const float* __restrict__ v, const float* __restrict__ log_decay,
                                          const float* __restrict__ state, float* __restrict__ o,
                                          float* __restrict__ next, int heads, int dk, int dv) {
    extern __shared__ float qk[];  // q then k of this row
    const long long row = blockIdx.x;
    for (int i = threadIdx.x; i < dk; i += blockDim.x) {
        qk[i] = q[row * dk + i];
        qk[dk + i] = k[row * dk + i];
    }
    __syncthreads();
    const int j = blockIdx.y * blockDim.x + threadIdx.x;
    if (j >= dv) return;
    const float gamma = expf(log_decay[row % heads]);
    const float vj = v[row * dv + j];
    const long long base = row * dk * dv + j;
    float acc = 0.f;
#pragma unroll 8
    for (int i = 0; i < dk; ++i) {
        const float s = (state ? gamma * state[base + (long long)i * dv] : 0.f) + qk[dk + i] * vj;
        next[base + (long long)i * dv] = s;
        acc = fmaf(qk[i], s, acc);
    }
    o[row * dv + j] = acc;
}
