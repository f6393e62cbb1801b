// The ends of the network: token embedding lookup, and the float LM head with the argmax.

// x[t] = E[tokens[t]] (f16 rows of n). Grid: one block per token.
extern "C" __global__ void embed(const u16* E, int n, const u32* tokens, float* x) {
    pdl_trigger();
    pdl_wait();
    const u16* row = E + (i64)tokens[blockIdx.x] * n;
    for (int i = threadIdx.x; i < n; i += blockDim.x) x[(i64)blockIdx.x * n + i] = h2f(row[i]);
}

// logits = E · rmsnorm(x, norm_w) for E in f16 [rows][n] (n % 8 == 0), a warp per row, and the argmax
// (lowest index among equal maxima, as the CPU sampler): each block leaves its best, and the last block to
// finish reduces them into *best. Block: 256 threads; dynamic shared memory: n floats.
extern "C" __global__ void __launch_bounds__(256) lm_head(const float* x, const float* norm_w, int n, float eps,
                                                          const u16* E, int rows, float* logits, float* block_val,
                                                          int* block_idx, u32* counter, int* best) {
    extern __shared__ float xs[];
    __shared__ float scratch[32];
    __shared__ float wval[8];
    __shared__ int widx[8];
    __shared__ int last;
    int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    pdl_trigger();
    pdl_wait();
    float ss = 0.0f;
    for (int i = threadIdx.x; i < n; i += blockDim.x) ss += x[i] * x[i];
    ss = block_sum(ss, scratch);
    float inv = 1.0f / sqrtf(ss / (float)n + eps);
    for (int i = threadIdx.x; i < n; i += blockDim.x) xs[i] = norm_w[i] * (x[i] * inv);
    __syncthreads();
    float bv = NEG_INF;
    int bi = 0x7fffffff;
    // Two rows at a time (r, then r + stride), so that twice as many loads are in flight.
    int stride = gridDim.x * 8;
    for (int r = blockIdx.x * 8 + warp; r < rows; r += 2 * stride) {
        int r2 = r + stride < rows ? r + stride : r;
        const uint4* row = (const uint4*)(E + (i64)r * n);
        const uint4* row2 = (const uint4*)(E + (i64)r2 * n);
        float acc = 0.0f, acc2 = 0.0f;
#pragma unroll 4
        for (int i = lane; i < n / 8; i += 32) {
            uint4 a = row[i], b = row2[i];
            acc = dot8h(a, xs + 8 * i, acc);
            acc2 = dot8h(b, xs + 8 * i, acc2);
        }
        acc = warp_sum(acc);
        acc2 = warp_sum(acc2);
        if (lane == 0) {
            logits[r] = acc;
            logits[r2] = acc2;
        }
        if (acc > bv) {  // rows rise within a warp: strict > keeps the lowest index
            bv = acc;
            bi = r;
        }
        if (acc2 > bv) {
            bv = acc2;
            bi = r2;
        }
    }
    block_argmax(bv, bi, wval, widx);
    if (threadIdx.x == 0) {
        block_val[blockIdx.x] = bv;
        block_idx[blockIdx.x] = bi;
        __threadfence();
        last = atomicAdd(counter, 1u) == gridDim.x - 1;
    }
    __syncthreads();
    if (!last) return;
    // The last block reduces the blocks' bests, a few per thread (read past L1: other blocks wrote them).
    bv = NEG_INF;
    bi = 0x7fffffff;
    for (int b = threadIdx.x; b < (int)gridDim.x; b += blockDim.x) {
        float v = __ldcg(&block_val[b]);
        int i = __ldcg(&block_idx[b]);
        if (v > bv || (v == bv && i < bi)) {
            bv = v;
            bi = i;
        }
    }
    block_argmax(bv, bi, wval, widx);
    if (threadIdx.x == 0) {
        *best = bi;
        *counter = 0;
    }
}
