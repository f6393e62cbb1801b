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

// The LM head of a step of many sequences runs on the tensor cores (f16 mma.sync, f32 accumulators). To keep
// float32 accuracy, each token's normalized input y is scaled by a power of two 2^k (max |y|·2^k < 2^14, so
// no f16 overflows, and small inputs keep their precision) and split into f16 high and low parts,
// y·2^k = hi + lo with lo = y·2^k - hi: E·hi + E·lo carries about 22 bits of y, and the products of f16
// values are exact in the accumulators.

// Rows t < nt of x (n floats each): y = rmsnorm(x_t, norm_w), split into xh[t], xl[t] (f16 rows of n) with
// inv_scale[t] = 2^-k; rows nt <= t < gridDim.x are zeros (the GEMM's token tiles are whole). Grid: one block
// per row; dynamic shared memory: n floats.
extern "C" __global__ void __launch_bounds__(256) head_split_rows(const float* x, int nt, const float* norm_w, int n,
                                                                  float eps, u16* xh, u16* xl, float* inv_scale) {
    extern __shared__ float4 ys4[];
    float* ys = (float*)ys4;  // [n] the norm weights, then y
    __shared__ float scratch[64];
    int t = blockIdx.x, n4 = n / 4;
    norm_weights_async(norm_w, n, ys);
    pdl_trigger();
    pdl_wait();
    cp_async_wait();
    u16* h = xh + (i64)t * n;
    u16* l = xl + (i64)t * n;
    if (t >= nt) {
        for (int i = threadIdx.x; i < n; i += blockDim.x) h[i] = l[i] = 0;
        if (threadIdx.x == 0) inv_scale[t] = 0.0f;
        return;
    }
    const float4* x4 = (const float4*)(x + (i64)t * n);
    float ss = 0.0f;
    for (int i = threadIdx.x; i < n4; i += blockDim.x) {
        float4 v = x4[i];
        ss += v.x * v.x + v.y * v.y + v.z * v.z + v.w * v.w;
    }
    ss = block_sum(ss, scratch);  // its barrier also publishes the norm weights
    float inv = 1.0f / sqrtf(ss / (float)n + eps), amax = 0.0f;
    for (int i = threadIdx.x; i < n4; i += blockDim.x) {
        float4 v = x4[i], w = ys4[i];
        v = make_float4(w.x * (v.x * inv), w.y * (v.y * inv), w.z * (v.z * inv), w.w * (v.w * inv));
        ys4[i] = v;
        amax = fmaxf(amax, fmaxf(fmaxf(fabsf(v.x), fabsf(v.y)), fmaxf(fabsf(v.z), fabsf(v.w))));
    }
    amax = block_max(amax, scratch + 32);  // its barrier also publishes y
    int e = 0;
    if (amax > 0.0f) frexpf(amax, &e);  // amax < 2^e
    float scale = ldexpf(1.0f, 14 - e);
    for (int i = threadIdx.x; i < n; i += blockDim.x) {
        float y = ys[i] * scale;
        u16 hi = f2h(y);
        h[i] = hi;
        l[i] = f2h(y - h2f(hi));
    }
    if (threadIdx.x == 0) inv_scale[t] = ldexpf(1.0f, e - 14);
}

// Block tile of `lm_head_mma`: 64 tokens × 256 rows of E, K in chunks of 256 columns staged in shared memory.
#define HT 64
#define HR 256
#define HK 256
#define HKS (HK + 32)  // a staged row in halves: padded by 64 bytes, so a quarter warp's 16-byte loads of
                       // rows g and g + 1 fall in different banks

__device__ __forceinline__ void mma_f16(float* c, u32 a0, u32 a1, u32 a2, u32 a3, u32 b0, u32 b1) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
}

// c += A·B for one 16-token × 8-row tile over 32 columns, where lane (g, tig) holds columns 8·tig..8·tig+7 of
// tokens g and g + 8 (a, a8) and of E's row g (b). An MMA's k slots (2·tig, 2·tig + 1, 2·tig + 8, 2·tig + 9) are
// the lane's own columns for A and B alike, so 16-byte loads feed it directly: the sum is the same in any
// column order.
__device__ __forceinline__ void mma_32(float* c, uint4 a, uint4 a8, uint4 b) {
    mma_f16(c, a.x, a8.x, a.y, a8.y, b.x, b.y);
    mma_f16(c, a.z, a8.z, a.w, a8.w, b.z, b.w);
}

// The larger (value, index) pair: the lowest index among equal values.
__device__ __forceinline__ void better(float& v, int& i, float ov, int oi) {
    if (ov > v || (ov == v && oi < i)) {
        v = ov;
        i = oi;
    }
}

__device__ __forceinline__ void warp_argmax(float& v, int& i) {
    for (int o = 16; o > 0; o >>= 1) better(v, i, __shfl_xor_sync(0xffffffffu, v, o), __shfl_xor_sync(0xffffffffu, i, o));
}

// `lm_head` for a step of many sequences: logits_t = E · y_t for the split inputs of `head_split_rows`, and
// their argmaxes. Block (x, y) takes E's rows [256x, 256x + 256) and tokens [64y, 64y + 64) (of nt); warp w
// the rows 32w.. of those, as 4 tiles of 8, and every token, as up to 4 tiles of 16. E is read once per 64
// tokens, straight into registers (each lane 16 bytes of a row per 32 columns); the inputs go through shared
// memory, a chunk of 256 columns at a time. Token t's logits go to the address outs[2t] (none where it is
// 0), its argmax to outs[2t + 1] (likewise): the tile is staged in shared memory so that each token's 256 logits are
// written in whole 16-byte stores (`outs` may point into page-locked host memory, where each store is a PCIe
// transaction). Each block leaves its best per token, and the last block of a column to finish reduces them.
// Block: 256 threads; dynamic shared memory: 2 · 64 · HKS halves (also holds the 64 × 256 output tile).
extern "C" __global__ void __launch_bounds__(256) lm_head_mma(const u16* xh, const u16* xl, const float* inv_scale,
                                                              int nt, int n, const u16* E, int rows, const u64* outs,
                                                              float* block_val, int* block_idx, u32* counters) {
    extern __shared__ uint4 hs4[];
    u16* ah = (u16*)hs4;       // [64][HKS] high parts of a column chunk
    u16* al = ah + HT * HKS;   // [64][HKS] low parts
    float* cs = (float*)hs4;   // [64][HR + 4] the output tile, once the products are done
    __shared__ int last;
    int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31, g = lane >> 2, tig = lane & 3;
    int t0 = blockIdx.y * HT, m = min(HT, nt - t0), mts = (m + 15) / 16, r0 = blockIdx.x * HR;
    const uint4* brow[4];
    bool bok[4];
#pragma unroll
    for (int j = 0; j < 4; j++) {
        int r = r0 + 32 * warp + 8 * j + g;
        bok[j] = r < rows;
        brow[j] = (const uint4*)(E + (i64)min(r, rows - 1) * n) + tig;
    }
    float acc[4][4][4] = {};
    pdl_trigger();
    pdl_wait();
    for (int k0 = 0; k0 < n; k0 += HK) {
        int kn = min(HK, n - k0);
        __syncthreads();  // the previous chunk's readers are done
        // Stage columns [k0, k0 + kn) of the tile's tokens (16-byte pieces; zeros past n).
        int pieces = HK / 8;
        for (int i = tid; i < 16 * mts * pieces; i += blockDim.x) {
            int t = i / pieces, c = 8 * (i % pieces);
            uint4 vh = make_uint4(0, 0, 0, 0), vl = vh;
            if (c < kn) {
                vh = *(const uint4*)(xh + (i64)(t0 + t) * n + k0 + c);
                vl = *(const uint4*)(xl + (i64)(t0 + t) * n + k0 + c);
            }
            *(uint4*)(ah + t * HKS + c) = vh;
            *(uint4*)(al + t * HKS + c) = vl;
        }
        __syncthreads();
#pragma unroll 2
        for (int ks = 0; ks < kn; ks += 32) {
            uint4 b[4];
            int col = (k0 + ks) / 8;
#pragma unroll
            for (int j = 0; j < 4; j++) b[j] = bok[j] && ks + 8 * tig < kn ? __ldlu(brow[j] + col) : make_uint4(0, 0, 0, 0);
#pragma unroll
            for (int mt = 0; mt < 4; mt++) {
                if (mt >= mts) break;
                const u16* ph = ah + (16 * mt + g) * HKS + ks + 8 * tig;
                const u16* pl = al + (16 * mt + g) * HKS + ks + 8 * tig;
                uint4 h = *(const uint4*)ph, h8 = *(const uint4*)(ph + 8 * HKS);
                uint4 l = *(const uint4*)pl, l8 = *(const uint4*)(pl + 8 * HKS);
#pragma unroll
                for (int j = 0; j < 4; j++) {
                    mma_32(acc[mt][j], h, h8, b[j]);
                    mma_32(acc[mt][j], l, l8, b[j]);
                }
            }
        }
    }
    // Accumulator (mt, j, i): token 16·mt + g (+8 for i >= 2), row 32·warp + 8·j + 2·tig (+1 for odd i).
    __syncthreads();  // the staged inputs are no longer read: the tile takes their place
#pragma unroll
    for (int mt = 0; mt < 4; mt++) {
        if (mt >= mts) break;
#pragma unroll
        for (int i = 0; i < 4; i++) {
            int t = 16 * mt + g + 8 * (i >> 1);
            float sc = t < m ? inv_scale[t0 + t] : 0.0f;
#pragma unroll
            for (int j = 0; j < 4; j++) cs[t * (HR + 4) + 32 * warp + 8 * j + 2 * tig + (i & 1)] = acc[mt][j][i] * sc;
        }
    }
    __syncthreads();
    // Warp w writes out tokens w, w + 8, ... and finds each one's best row of the tile.
    int valid = min(HR, rows - r0);
    for (int t = warp; t < m; t += 8) {
        const float* row = cs + t * (HR + 4);
        float* dst = (float*)outs[2 * (t0 + t)];
        bool whole = ((u64)dst & 15) == 0;  // 16-byte stores where the logits are aligned (every sequence's are)
        float bv = NEG_INF;
        int bi = 0x7fffffff;
        for (int c = 4 * lane; c < valid; c += 128) {
            float4 v = *(const float4*)(row + c);
            if (dst) {
                if (whole && c + 4 <= valid) *(float4*)(dst + r0 + c) = v;
                else for (int q = 0; q < min(4, valid - c); q++) dst[r0 + c + q] = (&v.x)[q];
            }
            for (int q = 0; q < 4 && c + q < valid; q++) better(bv, bi, (&v.x)[q], r0 + c + q);
        }
        warp_argmax(bv, bi);
        if (lane == 0) {
            block_val[(i64)(t0 + t) * gridDim.x + blockIdx.x] = bv;
            block_idx[(i64)(t0 + t) * gridDim.x + blockIdx.x] = bi;
        }
    }
    __threadfence();
    __syncthreads();
    if (tid == 0) last = atomicAdd(&counters[blockIdx.y], 1u) == gridDim.x - 1;
    __syncthreads();
    if (!last) return;
    __threadfence();
    // The last block reduces the blocks' bests: a warp per token (read past L1: other blocks wrote them).
    for (int t = warp; t < m; t += 8) {
        float bv = NEG_INF;
        int bi = 0x7fffffff;
        for (int b = lane; b < (int)gridDim.x; b += 32)
            better(bv, bi, __ldcg(&block_val[(i64)(t0 + t) * gridDim.x + b]), __ldcg(&block_idx[(i64)(t0 + t) * gridDim.x + b]));
        warp_argmax(bv, bi);
        if (lane == 0 && outs[2 * (t0 + t) + 1]) *(int*)outs[2 * (t0 + t) + 1] = bi;
    }
    if (tid == 0) counters[blockIdx.y] = 0;
}
