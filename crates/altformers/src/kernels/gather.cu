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
