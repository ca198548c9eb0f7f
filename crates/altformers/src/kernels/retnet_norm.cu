// RetNet's output normalisations and group norm in one pass each way (mixers/retnet.rs,
// `Retention::finish_normalised`), one warp per (sequence, head, position) row:
//   a_j = o_j c, r = o_dv c, s = max(|r|, 1), y_j = a_j / s     (the paper's normalised R~)
//   z_j = (y_j - mean(y)) / sqrt(var(y) + eps)                  (one group per head)
// o1: [B, H, T, dv + 1] f32 (the values' and the ones column's sums), c: [H, T] f32 (the row
// normalisation, a constant), z: [B, T, H, dv] f32, token-major (the group norm's affine and the
// output projection read it as [B, T, H dv] without a transpose). The backward recomputes y and
// the statistics from o1 and returns d o1. As tensor operations this was about 40% of RetNet's
// training step on the GPU (broadcast products and divisions, sums, the transpose).
#include "convert.cuh"

namespace {

struct Row {
    const float* o;  // the row of o1 (dv + 1 values)
    float c, s, mean, rstd;
};

// The row's normalisers and group-norm statistics (every lane gets them).
__device__ __forceinline__ Row row_stats(const float* o1, const float* c, int row, int T, int H, int dv, float eps,
                                         int lane) {
    Row r;
    r.o = o1 + (long long)row * (dv + 1);
    r.c = c[row % (H * T)];
    r.s = fmaxf(fabsf(r.o[dv] * r.c), 1.f);
    const float scale = r.c / r.s;
    float sum = 0.f;
    for (int j = lane; j < dv; j += 32) sum += r.o[j] * scale;
    r.mean = warp_sum(sum) / dv;
    float sq = 0.f;
    for (int j = lane; j < dv; j += 32) {
        const float d = r.o[j] * scale - r.mean;
        sq += d * d;
    }
    r.rstd = rsqrtf(warp_sum(sq) / dv + eps);
    return r;
}

}  // namespace

extern "C" __global__ void retnet_norm_fwd(const float* __restrict__ o1, const float* __restrict__ c,
                                           float* __restrict__ z, int rows, int T, int H, int dv, float eps) {
    const int row = blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32, lane = threadIdx.x % 32;
    if (row >= rows) return;
    const Row r = row_stats(o1, c, row, T, H, dv, eps, lane);
    const int t = row % T, h = (row / T) % H, b = row / (T * H);
    float* zr = z + (((long long)b * T + t) * H + h) * dv;
    const float scale = r.c / r.s;
    for (int j = lane; j < dv; j += 32) zr[j] = (r.o[j] * scale - r.mean) * r.rstd;
}

// dz: [B, T, H, dv] f32 (token-major, as z); d_o1: [B, H, T, dv + 1] f32. With z the output:
//   dy_j = rstd (dz_j - mean(dz) - z_j mean(dz z)),  d a_j = dy_j / s,  ds = -sum_j dy_j y_j / s,
//   d o_j = c d a_j,  d o_dv = c ds sign(r) where |r| > 1 (else 0: the max chose 1).
extern "C" __global__ void retnet_norm_bwd(const float* __restrict__ o1, const float* __restrict__ c,
                                           const float* __restrict__ dz, float* __restrict__ d_o1, int rows, int T,
                                           int H, int dv, float eps) {
    const int row = blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32, lane = threadIdx.x % 32;
    if (row >= rows) return;
    const Row r = row_stats(o1, c, row, T, H, dv, eps, lane);
    const int t = row % T, h = (row / T) % H, b = row / (T * H);
    const float* dzr = dz + (((long long)b * T + t) * H + h) * dv;
    const float scale = r.c / r.s;
    float sum_dz = 0.f, sum_dzz = 0.f;
    for (int j = lane; j < dv; j += 32) {
        const float zj = (r.o[j] * scale - r.mean) * r.rstd;
        sum_dz += dzr[j];
        sum_dzz += dzr[j] * zj;
    }
    const float mean_dz = warp_sum(sum_dz) / dv, mean_dzz = warp_sum(sum_dzz) / dv;
    float* dor = d_o1 + (long long)row * (dv + 1);
    float dot = 0.f;  // sum_j dy_j y_j
    for (int j = lane; j < dv; j += 32) {
        const float yj = r.o[j] * scale;
        const float zj = (yj - r.mean) * r.rstd;
        const float dy = r.rstd * (dzr[j] - mean_dz - zj * mean_dzz);
        dot += dy * yj;
        dor[j] = dy / r.s * r.c;
    }
    dot = warp_sum(dot);
    if (lane == 0) {
        const float rs = r.o[dv] * r.c;
        const float ds = -dot / r.s;
        dor[dv] = fabsf(rs) > 1.f ? ds * (rs > 0.f ? 1.f : -1.f) * r.c : 0.f;
    }
}
