// The ends of the network: token embedding lookup, and the float LM head with the argmax.

// x[t] = E[tokens[t]] (f16 rows of n). Grid: one block per token.
extern "C" __global__ void embed(const u16* E, int n, const u32* tokens, float* x) {
    pdl_trigger();
    pdl_wait();
    const u16* row = E + (i64)tokens[blockIdx.x] * n;
    for (int i = threadIdx.x; i < n; i += blockDim.x) x[(i64)blockIdx.x * n + i] = h2f(row[i]);
}

// logits = E · rmsnorm(x, norm_w) for E in f16 [rows][n] (n % 8 == 0; x and norm_w 16-byte aligned), a warp
// per row, and the argmax (lowest index among equal maxima, as the CPU sampler): each block leaves its best,
// and the last block to finish reduces them into *best. Rows go in groups of 16, a row pair per warp (twice
// as many loads in flight); in round k block b takes group b + k * gridDim.x, so that the whole grid sweeps
// the matrix from front to back (on an H100, blocks streaming separate regions ran 18% slower). The grid is
// sized so that every block gets as many rounds. A round's 16 logits are written by one warp, in one 64-byte
// store: `logits` may be page-locked host memory, where each store is a PCIe transaction. Block: 256
// threads; dynamic shared memory: n floats.
extern "C" __global__ void __launch_bounds__(256) lm_head(const float* x, const float* norm_w, int n, float eps,
                                                          const u16* E, int rows, float* logits, float* block_val,
                                                          int* block_idx, u32* counter, int* best) {
    extern __shared__ float4 xs4[];
    float* xs = (float*)xs4;       // [n] the norm weights, then the normalized input
    __shared__ float ls[2][16];    // two rounds' logits: one is written out while the next is computed
    __shared__ float scratch[32];
    __shared__ float wval[8];
    __shared__ int widx[8];
    __shared__ int last;
    int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, n4 = n / 4;
    const float4* x4 = (const float4*)x;
    norm_weights_async(norm_w, n, xs);  // constant: copied while the previous kernel finishes
    pdl_trigger();
    pdl_wait();
    float ss = 0.0f;
#pragma unroll 4
    for (int i = threadIdx.x; i < n4; i += blockDim.x) {
        float4 v = x4[i];
        ss += v.x * v.x + v.y * v.y + v.z * v.z + v.w * v.w;
    }
    cp_async_wait();
    ss = block_sum(ss, scratch);  // its barrier also publishes the norm weights
    float inv = 1.0f / sqrtf(ss / (float)n + eps);
    for (int i = threadIdx.x; i < n4; i += blockDim.x) {
        float4 v = x4[i], w = xs4[i];
        xs4[i] = make_float4(w.x * (v.x * inv), w.y * (v.y * inv), w.z * (v.z * inv), w.w * (v.w * inv));
    }
    __syncthreads();
    float bv = NEG_INF;
    int bi = 0x7fffffff;
    for (int g = blockIdx.x, k = 0; 16 * g < rows; g += gridDim.x, k++) {
        int a = min(16 * g + 2 * warp, rows - 1), b = min(a + 1, rows - 1);
        const uint4* row = (const uint4*)(E + (i64)a * n);
        const uint4* row2 = (const uint4*)(E + (i64)b * n);
        float acc = 0.0f, acc2 = 0.0f;
        // Five loads of each row in flight per lane (2B4T's 2560 columns are ten per lane): 2% faster than four
        // or eight on an H100.
#pragma unroll 5
        for (int i = lane; i < n / 8; i += 32) {
            // Read once: "last use" loads (ld.global.lu) ran 4% faster than plain ones on an H100, 2% faster
            // than streaming (.cs) ones.
            uint4 u = __ldlu(row + i), v = __ldlu(row2 + i);
            acc = dot8h(u, xs + 8 * i, acc);
            acc2 = dot8h(v, xs + 8 * i, acc2);
        }
        acc = warp_sum(acc);
        acc2 = warp_sum(acc2);
        if (lane == 0) {
            ls[k & 1][2 * warp] = acc;
            ls[k & 1][2 * warp + 1] = acc2;
        }
        if (acc > bv) {  // rows rise within a warp: strict > keeps the lowest index
            bv = acc;
            bi = a;
        }
        if (acc2 > bv) {
            bv = acc2;
            bi = b;
        }
        __syncthreads();  // round k's logits are in ls[k & 1]; warp 0 wrote round k - 1's before coming here
        if (warp == 0 && lane < 16 && 16 * g + lane < rows) logits[16 * g + lane] = ls[k & 1][lane];
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

// Up to this many tokens share a block of the LM head (their accumulators are registers).
#define HEAD_TOKENS 8

// The f16 values of one 16-byte load, as floats.
__device__ __forceinline__ void unpack8h(uint4 v, float* f) {
    f[0] = h2f((u16)(v.x & 0xffff));
    f[1] = h2f((u16)(v.x >> 16));
    f[2] = h2f((u16)(v.y & 0xffff));
    f[3] = h2f((u16)(v.y >> 16));
    f[4] = h2f((u16)(v.z & 0xffff));
    f[5] = h2f((u16)(v.z >> 16));
    f[6] = h2f((u16)(v.w & 0xffff));
    f[7] = h2f((u16)(v.w >> 16));
}

// acc + Σ x[i]·f[i], in the order dot8h sums.
__device__ __forceinline__ float dot8f(const float* f, const float* x, float acc) {
#pragma unroll
    for (int i = 0; i < 8; i++) acc += x[i] * f[i];
    return acc;
}

// `lm_head` for a step of many sequences: logits_t = E · rmsnorm(x_t, norm_w) for tokens t of x (rows of n
// floats) and their argmaxes. (One token's `lm_head` keeps its own kernel: this one's registers and shared
// memory reads slow the single token down: see BENCHMARKS.md.)
// Block column blockIdx.y takes tokens [per·y, per·y + per) of the `nt` (per <= HEAD_TOKENS): each row of E
// is read once for all of them. Token t's logits go to the address outs[2t] (none where it is 0: a step
// that wants only the greedy token), its argmax to outs[2t + 1]. A warp per row pair, rows in groups of 16:
// in round k block b takes group b + k * gridDim.x, so that the whole grid sweeps the matrix from front to
// back (on an H100, blocks streaming separate regions ran 18% slower); the grid is sized so that every block
// gets as many rounds. Each block leaves its best per token, and the last block of a column to finish
// reduces them. A round's 16 logits of a token are written in one 64-byte store: `outs` may point into
// page-locked host memory, where each store is a PCIe transaction. Block: 256 threads; dynamic shared
// memory: (1 + per) · n floats.
extern "C" __global__ void __launch_bounds__(256) lm_head_rows(const float* x, int nt, int per, const float* norm_w, int n,
                                                          float eps, const u16* E, int rows, const u64* outs,
                                                          float* block_val, int* block_idx, u32* counters) {
    extern __shared__ float4 xs4[];
    float* ws = (float*)xs4;                    // [n] the norm weights
    float* xn = ws + n;                         // [per][n] the normalized inputs
    __shared__ float ls[2][HEAD_TOKENS][16];    // two rounds' logits: one is written out while the next is computed
    __shared__ float scratch[64];
    __shared__ float wval[8];
    __shared__ int widx[8];
    __shared__ int last;
    int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, n4 = n / 4;
    int t0 = blockIdx.y * per, m = min(per, nt - t0);
    norm_weights_async(norm_w, n, ws);  // constant: copied while the previous kernel finishes
    pdl_trigger();
    pdl_wait();
    cp_async_wait();
    for (int j = 0; j < m; j++) {
        const float4* x4 = (const float4*)(x + (i64)(t0 + j) * n);
        float4* y4 = (float4*)(xn + (i64)j * n);
        float ss = 0.0f;
#pragma unroll 4
        for (int i = threadIdx.x; i < n4; i += blockDim.x) {
            float4 v = x4[i];
            ss += v.x * v.x + v.y * v.y + v.z * v.z + v.w * v.w;
        }
        ss = block_sum(ss, scratch);  // its barrier also publishes the norm weights
        float inv = 1.0f / sqrtf(ss / (float)n + eps);
        for (int i = threadIdx.x; i < n4; i += blockDim.x) {
            float4 v = x4[i], w = xs4[i];
            y4[i] = make_float4(w.x * (v.x * inv), w.y * (v.y * inv), w.z * (v.z * inv), w.w * (v.w * inv));
        }
        __syncthreads();  // xn[j] is complete, and scratch is free for the next token's sum
    }
    float bv[HEAD_TOKENS];
    int bi[HEAD_TOKENS];
#pragma unroll
    for (int j = 0; j < HEAD_TOKENS; j++) {
        bv[j] = NEG_INF;
        bi[j] = 0x7fffffff;
    }
    for (int g = blockIdx.x, k = 0; 16 * g < rows; g += gridDim.x, k++) {
        int a = min(16 * g + 2 * warp, rows - 1), b = min(a + 1, rows - 1);
        const uint4* row = (const uint4*)(E + (i64)a * n);
        const uint4* row2 = (const uint4*)(E + (i64)b * n);
        float acc[HEAD_TOKENS], acc2[HEAD_TOKENS];
#pragma unroll
        for (int j = 0; j < HEAD_TOKENS; j++) acc[j] = acc2[j] = 0.0f;
        // Five loads of each row in flight per lane (2B4T's 2560 columns are ten per lane): 2% faster than four
        // or eight on an H100 (one token).
#pragma unroll 5
        for (int i = lane; i < n / 8; i += 32) {
            // Read once: "last use" loads (ld.global.lu) ran 4% faster than plain ones on an H100, 2% faster
            // than streaming (.cs) ones.
            float u[8], v[8];
            unpack8h(__ldlu(row + i), u);
            unpack8h(__ldlu(row2 + i), v);
#pragma unroll
            for (int j = 0; j < HEAD_TOKENS; j++)
                if (j < m) {
                    acc[j] = dot8f(u, xn + (i64)j * n + 8 * i, acc[j]);
                    acc2[j] = dot8f(v, xn + (i64)j * n + 8 * i, acc2[j]);
                }
        }
#pragma unroll
        for (int j = 0; j < HEAD_TOKENS; j++)
            if (j < m) {
                float s = warp_sum(acc[j]), s2 = warp_sum(acc2[j]);
                if (lane == 0) {
                    ls[k & 1][j][2 * warp] = s;
                    ls[k & 1][j][2 * warp + 1] = s2;
                }
                if (s > bv[j]) {  // rows rise within a warp: strict > keeps the lowest index
                    bv[j] = s;
                    bi[j] = a;
                }
                if (s2 > bv[j]) {
                    bv[j] = s2;
                    bi[j] = b;
                }
            }
        __syncthreads();  // round k's logits are in ls[k & 1]; their writers wrote round k - 1's before coming here
        int j = threadIdx.x >> 4, r = 16 * g + (threadIdx.x & 15);
        if (j < m && r < rows && outs[2 * (t0 + j)]) ((float*)outs[2 * (t0 + j)])[r] = ls[k & 1][j][threadIdx.x & 15];
    }
#pragma unroll
    for (int j = 0; j < HEAD_TOKENS; j++)
        if (j < m) {
            block_argmax(bv[j], bi[j], wval, widx);
            if (threadIdx.x == 0) {
                block_val[(i64)(t0 + j) * gridDim.x + blockIdx.x] = bv[j];
                block_idx[(i64)(t0 + j) * gridDim.x + blockIdx.x] = bi[j];
            }
        }
    if (threadIdx.x == 0) {
        __threadfence();
        last = atomicAdd(&counters[blockIdx.y], 1u) == gridDim.x - 1;
    }
    __syncthreads();
    if (!last) return;
    // The last block reduces the blocks' bests, a few per thread (read past L1: other blocks wrote them).
    for (int j = 0; j < m; j++) {
        float v = NEG_INF;
        int i = 0x7fffffff;
        for (int b = threadIdx.x; b < (int)gridDim.x; b += blockDim.x) {
            float bvb = __ldcg(&block_val[(i64)(t0 + j) * gridDim.x + b]);
            int bib = __ldcg(&block_idx[(i64)(t0 + j) * gridDim.x + b]);
            if (bvb > v || (bvb == v && bib < i)) {
                v = bvb;
                i = bib;
            }
        }
        block_argmax(v, i, wval, widx);
        if (threadIdx.x == 0) *(int*)outs[2 * (t0 + j) + 1] = i;
    }
    if (threadIdx.x == 0) counters[blockIdx.y] = 0;
}
