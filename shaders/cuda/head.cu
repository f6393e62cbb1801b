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
    for (int r = blockIdx.x * 8 + warp; r < rows; r += gridDim.x * 8) {
        const uint4* row = (const uint4*)(E + (i64)r * n);
        float acc = 0.0f;
#pragma unroll 4
        for (int i = lane; i < n / 8; i += 32) acc = dot8h(row[i], xs + 8 * i, acc);
        acc = warp_sum(acc);
        if (lane == 0) logits[r] = acc;
        if (acc > bv) {  // rows rise within a warp: strict > keeps the lowest index
            bv = acc;
            bi = r;
        }
    }
    if (lane == 0) {
        wval[warp] = bv;
        widx[warp] = bi;
    }
    __syncthreads();
    if (threadIdx.x == 0) {
        for (int w = 1; w < 8; w++)
            if (wval[w] > bv || (wval[w] == bv && widx[w] < bi)) {
                bv = wval[w];
                bi = widx[w];
            }
        block_val[blockIdx.x] = bv;
        block_idx[blockIdx.x] = bi;
        __threadfence();
        last = atomicAdd(counter, 1u) == gridDim.x - 1;
    }
    __syncthreads();
    if (!last || threadIdx.x != 0) return;
    for (int b = 0; b < (int)gridDim.x; b++) {
        float v = __ldcg(&block_val[b]);
        int i = __ldcg(&block_idx[b]);
        if (v > bv || (v == bv && i < bi)) {
            bv = v;
            bi = i;
        }
    }
    *best = bi;
    *counter = 0;
}
