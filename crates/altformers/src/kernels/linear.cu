// The f32 master weight cast to bf16 for the mixed-precision product (linear.rs), with
// 16-byte reads: candle's cast moves one element a thread (about a tenth of the bandwidth).
#include <cuda_bf16.h>
#include <stdint.h>

extern "C" __global__ void f32_to_bf16(const float* __restrict__ x, __nv_bfloat16* __restrict__ y, long long n) {
    const long long tid = blockIdx.x * (long long)blockDim.x + threadIdx.x;
    const long long stride = (long long)gridDim.x * blockDim.x;
    long long done = 0;
    if ((reinterpret_cast<uintptr_t>(x) & 15) == 0 && (reinterpret_cast<uintptr_t>(y) & 7) == 0) {
        const long long quads = n / 4;
        for (long long i = tid; i < quads; i += stride) {
            const float4 v = reinterpret_cast<const float4*>(x)[i];
            const __nv_bfloat162 lo = __floats2bfloat162_rn(v.x, v.y), hi = __floats2bfloat162_rn(v.z, v.w);
            uint2 packed;
            packed.x = *reinterpret_cast<const uint32_t*>(&lo);
            packed.y = *reinterpret_cast<const uint32_t*>(&hi);
            reinterpret_cast<uint2*>(y)[i] = packed;
        }
        done = quads * 4;
    }
    for (long long i = done + tid; i < n; i += stride) y[i] = __float2bfloat16_rn(x[i]);
}
