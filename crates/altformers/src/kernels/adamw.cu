// The AdamW step of train/optim.rs for every parameter at once (a multi-tensor launch):
// candle's generic path spends about fifteen kernel launches per parameter per step (the
// moments, bias corrections, decay, update and the gradient norm), which dominates the step
// time of small models on a GPU. Here a step is two launches whatever the parameter count.
//
// `table` holds one row of TABLE_COLS u64 per tensor: pointers to the weights, first and
// second moments and gradient (all f32, contiguous), element count, decay flag (0/1), the
// tensor's first block, and its learning-rate multiple (an f32's bits in the low 32); block
// b works on the tensor whose range of blocks holds b. A last row holds what changes from
// step to step, the learning rate and the two bias corrections (f32 bits), so that a
// training step captured as a CUDA graph replays with new values written into its table.
#include <stdint.h>

#define TABLE_COLS 8
#define BLOCK 256
#define PER_BLOCK (BLOCK * 8)

struct Row {
    float *w, *m, *v;
    const float *g;
    long long n;
    int decay;
    float lr_scale;
};

__device__ __forceinline__ int find_tensor(const unsigned long long *table, int count, unsigned long long block) {
    int lo = 0, hi = count - 1;
    while (lo < hi) {  // last tensor whose first block <= block
        int mid = (lo + hi + 1) / 2;
        if (table[mid * TABLE_COLS + 6] <= block) lo = mid; else hi = mid - 1;
    }
    return lo;
}

__device__ __forceinline__ Row row(const unsigned long long *table, int i) {
    const unsigned long long *r = table + i * TABLE_COLS;
    Row x;
    x.w = (float *)r[0];
    x.m = (float *)r[1];
    x.v = (float *)r[2];
    x.g = (const float *)r[3];
    x.n = (long long)r[4];
    x.decay = (int)r[5];
    x.lr_scale = __uint_as_float((unsigned int)r[7]);
    return x;
}

// sumsq[0] += sum of g^2 over every tensor (zeroed by the caller).
extern "C" __global__ void adamw_sumsq(const unsigned long long *table, int count, double *sumsq) {
    const int t = find_tensor(table, count, blockIdx.x);
    const Row x = row(table, t);
    const long long start = (long long)(blockIdx.x - table[t * TABLE_COLS + 6]) * PER_BLOCK;
    float acc = 0.0f;
    for (long long i = start + threadIdx.x; i < start + PER_BLOCK && i < x.n; i += BLOCK) {
        const float g = x.g[i];
        acc += g * g;
    }
    for (int off = 16; off > 0; off /= 2) acc += __shfl_down_sync(0xffffffff, acc, off);
    __shared__ float warp_sums[BLOCK / 32];
    if (threadIdx.x % 32 == 0) warp_sums[threadIdx.x / 32] = acc;
    __syncthreads();
    if (threadIdx.x == 0) {
        double total = 0.0;
        for (int w = 0; w < BLOCK / 32; ++w) total += warp_sums[w];
        atomicAdd(sumsq, total);
    }
}

// One AdamW update (PyTorch's rule, decoupled decay), gradients scaled to norm `clip` when
// larger (clip 0: no clipping). Each tensor steps at lr times its multiple, and decays by
// 1 - that rate times weight_decay, as a PyTorch parameter group of that rate. A non-finite
// gradient norm leaves every tensor untouched: the host reads the norm afterwards and
// reports the error.
extern "C" __global__ void adamw_update(const unsigned long long *table, int count, const double *sumsq,
                                        float beta1, float beta2, float eps, float weight_decay, float clip) {
    const unsigned long long *per_step = table + count * TABLE_COLS;
    const float lr = __uint_as_float((unsigned int)per_step[0]);
    const float bc1 = __uint_as_float((unsigned int)per_step[1]);
    const float bc2 = __uint_as_float((unsigned int)per_step[2]);
    const double norm = sqrt(*sumsq);
    if (!isfinite(norm)) return;
    const float scale = (clip > 0.0f && norm > clip) ? (float)(clip / (norm + 1e-6)) : 1.0f;
    const int t = find_tensor(table, count, blockIdx.x);
    const Row x = row(table, t);
    const long long start = (long long)(blockIdx.x - table[t * TABLE_COLS + 6]) * PER_BLOCK;
    const float rate = lr * x.lr_scale;
    const float decay_factor = 1.0f - rate * weight_decay;
    for (long long i = start + threadIdx.x; i < start + PER_BLOCK && i < x.n; i += BLOCK) {
        const float g = x.g[i] * scale;
        const float m = beta1 * x.m[i] + (1.0f - beta1) * g;
        const float v = beta2 * x.v[i] + (1.0f - beta2) * g * g;
        x.m[i] = m;
        x.v[i] = v;
        const float update = (m / bc1) / (sqrtf(v / bc2) + eps);
        const float w = x.decay ? x.w[i] * decay_factor : x.w[i];
        x.w[i] = w - rate * update;
    }
}
