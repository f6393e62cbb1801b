// BitLinear (W1.58A8) on the GPU: y = (Σ code·q) / s · scale, exact in the integer part.
//
// Weight layout (made by cuda/pack.rs): each row is `words` u32 words of 16 columns; column 16w + 4g + k is
// the 2-bit field at bit 8k + 2g of word w, holding u = code + 1. So `(word >> 2g) & 0x03030303` is four
// int8 lanes (u of columns 16w + 4g .. 16w + 4g + 3) that line up with one int32 word of int8 activations:
// one dp4a per 4 columns. Rows come in pairs (2p, 2p + 1) whose outputs one epilogue uses together:
// rotary pairs for q/k, (gate, up) for the FFN, plain neighbours otherwise.

#define EPI_QKV 0    // rotate the pair if it is a rotary pair, then store to q, the key cache or the value cache
#define EPI_GLU 1    // h[p] = act(gate) * up
#define EPI_RESID 2  // x[2p] += a, x[2p + 1] += b

// Mirrors `Epilogue` in cuda/mod.rs (#[repr(C)]).
struct Epilogue {
    const int* dst;     // QKV: original row (q, then k, then v) of each packed row
    const int* rope;    // QKV: rotary frequency index of each pair, -1 for none
    float* out;         // QKV: q; GLU: h; RESID: x. Row t at out + t * out_stride
    char* kc;           // QKV: this layer's caches, [ctx] rows of kv_row_bytes(kv_type, kv_dim)
    char* vc;
    const float* cos;   // QKV: [ctx][rope_half]
    const float* sin;
    int kind;
    int out_stride;
    int q_dim;
    int kv_dim;
    int rope_half;
    int silu;           // GLU: SiLU instead of relu²
    // A step of many sequences (one token each): token t's position and its sequence's key and value caches
    // of this layer ([t][2] addresses). Null for one sequence: positions pos0 + t, caches kc and vc.
    const int* row_pos;
    const u64* row_kv;
    // QKV into a q8_0 cache: each token's keys then values as f32 ([t][2 kv_dim]), which kv_quant (attention.cu)
    // quantizes into the caches (a block's scale needs all its 32 values).
    float* stage;
    int kv_type;
};

__device__ __forceinline__ int row_position(const Epilogue& e, int t, int pos0) {
    return e.row_pos ? e.row_pos[t] : pos0 + t;
}

__device__ __forceinline__ void store_qkv(const Epilogue& e, int r, int t, int pos, float y) {
    if (r < e.q_dim) {
        e.out[(i64)t * e.out_stride + r] = y;
        return;
    }
    int i = r - e.q_dim;  // in [key | value]
    if (e.kv_type == KV_Q8) {
        e.stage[(i64)t * 2 * e.kv_dim + i] = y;
        return;
    }
    bool key = i < e.kv_dim;
    char* cache = e.row_kv ? (char*)e.row_kv[2 * t + (key ? 0 : 1)] : key ? e.kc : e.vc;
    char* row = cache + pos * kv_row_bytes(e.kv_type, e.kv_dim);
    int d = key ? i : i - e.kv_dim;
    if (e.kv_type == KV_F16) ((u16*)row)[d] = f2h(y);
    else ((float*)row)[d] = y;
}

// What the epilogue of pair p at position pos needs besides its outputs (QKV): the rotation (cos and sin of
// its frequency, if it is a rotary pair) and the rows its outputs go to.
struct PairInfo {
    float c, s;
    int rot;
    int ra, rb;
};

__device__ __forceinline__ PairInfo pair_info(const Epilogue& e, int p, int pos) {
    PairInfo k = {1.0f, 0.0f, 0, 0, 0};
    if (e.kind == EPI_QKV) {
        int j = e.rope[p];
        if (j >= 0) {
            k.c = e.cos[pos * e.rope_half + j];
            k.s = e.sin[pos * e.rope_half + j];
            k.rot = 1;
        }
        k.ra = e.dst[2 * p];
        k.rb = e.dst[2 * p + 1];
    }
    return k;
}

// The outputs a (row 2p) and b (row 2p + 1) of token t at position pos; `k` is pair_info(e, p, pos).
__device__ void epilogue(const Epilogue& e, const PairInfo& k, int p, int t, int pos, float a, float b) {
    if (e.kind == EPI_GLU) {
        float act;
        if (e.silu) {
            act = a / (1.0f + expf(-a));
        } else {
            float r = fmaxf(a, 0.0f);
            act = r * r;
        }
        e.out[(i64)t * e.out_stride + p] = act * b;
    } else if (e.kind == EPI_RESID) {
        float* x = e.out + (i64)t * e.out_stride;
        x[2 * p] += a;
        x[2 * p + 1] += b;
    } else {
        if (k.rot) {  // NeoX rotation of (head[j], head[j + rope_dim/2])
            float ra = a * k.c - b * k.s, rb = b * k.c + a * k.s;
            a = ra;
            b = rb;
        }
        store_qkv(e, k.ra, t, pos, a);
        store_qkv(e, k.rb, t, pos, b);
    }
}

// Σ u·x over 16 columns: one packed word against 16 int8 activations.
__device__ __forceinline__ int dot16(u32 w, int4 x, int acc) {
    acc = __dp4a((int)(w & 0x03030303u), x.x, acc);
    acc = __dp4a((int)((w >> 2) & 0x03030303u), x.y, acc);
    acc = __dp4a((int)((w >> 4) & 0x03030303u), x.z, acc);
    acc = __dp4a((int)((w >> 6) & 0x03030303u), x.w, acc);
    return acc;
}

// One prompt token's activations: RMSNorm (by `w`; none if it is null) + quantization of row t of `x` (n floats,
// stride n) into row t of `xq` (kp bytes) and its scale. Grid: one block per token; dynamic shared memory: n
// floats.
extern "C" __global__ void __launch_bounds__(512) norm_quant_rows(const float* x, const float* w, int n, int kp,
                                                                  float eps, i8* xq, float* scales) {
    extern __shared__ float4 ws4[];
    float* ws = (float*)ws4;  // [n] the norm weights
    __shared__ float scratch[64];
    if (w) norm_weights_async(w, n, ws);
    pdl_trigger();
    pdl_wait();
    int t = blockIdx.x;
    float s = norm_quant(x + (i64)t * n, n, kp, eps, ws, w != nullptr, (int*)(xq + (i64)t * kp), scratch);
    if (threadIdx.x == 0) scales[t] = s;
}

#define GEMV_THREADS 512

// What a decode block keeps of each of its row pairs: the rows' scales, the epilogue's needs and (residual
// epilogue) the values added to.
struct PairConst {
    float sa, sb;
    PairInfo info;
    float xa, xb;
};

// Starts copying row pairs [c0, c1) of W (contiguous: 2 rows of `words` words each) into `wsm` and loads
// their constants into `pc` (shared memory; a barrier publishes them).
__device__ __forceinline__ void stage_pairs(u32* wsm, PairConst* pc, const u32* W, int words, const float* row_scale,
                                            int c0, int c1, const Epilogue& e, int pos) {
    const uint4* src = (const uint4*)(W + (i64)2 * c0 * words);
    int pieces = (c1 - c0) * words / 2;  // 16-byte pieces (words % 4 == 0)
    for (int i = threadIdx.x; i < pieces; i += blockDim.x) cp_async16((uint4*)wsm + i, src + i);
    for (int i = threadIdx.x; i < c1 - c0; i += blockDim.x) {
        pc[i].sa = row_scale[2 * (c0 + i)];
        pc[i].sb = row_scale[2 * (c0 + i) + 1];
        pc[i].info = pair_info(e, c0 + i, pos);
    }
}

// The residual epilogue's current values of pairs [c0, c1), written by earlier kernels: read after pdl_wait.
__device__ __forceinline__ void stage_residual(PairConst* pc, int c0, int c1, const Epilogue& e) {
    if (e.kind != EPI_RESID) return;
    for (int i = threadIdx.x; i < c1 - c0; i += blockDim.x) {
        pc[i].xa = e.out[2 * (c0 + i)];
        pc[i].xb = e.out[2 * (c0 + i) + 1];
    }
}

// The epilogue of pair p (staged as `k`) from its integer dot products.
__device__ __forceinline__ void gemv_epilogue(const Epilogue& e, const PairConst& k, int p, int pos, float s, int acc_a,
                                              int acc_b) {
    float ya = (float)acc_a / s * k.sa, yb = (float)acc_b / s * k.sb;
    if (e.kind == EPI_RESID) {
        e.out[2 * p] = k.xa + ya;
        e.out[2 * p + 1] = k.xb + yb;
    } else {
        epilogue(e, k.info, p, 0, pos, ya, yb);
    }
}

// Decode BitLinear: one token, fused with the RMSNorm + quantization of its input and with the epilogue.
// Block b owns a contiguous range of row pairs; the grid is at most one block per multiprocessor, so that
// the next kernel's blocks fit beside this one's. Before waiting for the previous kernel (programmatic
// dependent launch) a block starts copying all its weights (up to `chunk` pairs: what its shared memory
// budget holds; more come in later chunks) and the norm weights into shared memory with cp.async, and loads
// the epilogue's constants, so that all of it streams from memory while the kernels before it finish. Then
// the input is normalized and quantized, and warp w computes pairs w and w + 16, then w + 32 and w + 48, ...
// (two at a time: more independent work in flight; its lanes over the words).
// Block: 512 threads; dynamic shared memory: gemv_smem in cuda/kernels.rs.
extern "C" __global__ void __launch_bounds__(GEMV_THREADS) bitlinear_gemv(const float* x, const float* norm_w, int n,
                                                                          float eps, const u32* W, int words,
                                                                          const float* row_scale, int pairs, int chunk,
                                                                          const int* params, Epilogue e) {
    extern __shared__ float4 smem4[];
    float* ws = (float*)smem4;                          // [n] the norm weights
    int4* xq = (int4*)(ws + n);                         // [words] int8 activations, 16 per int4
    u32* wsm = (u32*)(xq + words);                      // [chunk][2][words] weights
    PairConst* pc = (PairConst*)(wsm + (i64)chunk * 2 * words);  // [chunk]
    __shared__ float scratch[64];
    int per = (pairs + gridDim.x - 1) / gridDim.x, p0 = blockIdx.x * per, p1 = min(p0 + per, pairs);
    int pos = params[1];  // written before the graph's first kernel, so readable before pdl_wait
    pdl_trigger();
    if (p0 >= p1) return;
    stage_pairs(wsm, pc, W, words, row_scale, p0, min(p0 + chunk, p1), e, pos);
    if (norm_w) norm_weights_async(norm_w, n, ws);
    pdl_wait();
    stage_residual(pc, p0, min(p0 + chunk, p1), e);
    // Its barriers publish wsm and pc.
    float s = norm_quant(x, n, words * 16, eps, ws, norm_w != nullptr, (int*)xq, scratch);
    int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, warps = blockDim.x >> 5;
    for (int c0 = p0; c0 < p1; c0 += chunk) {
        int c1 = min(c0 + chunk, p1);
        if (c0 != p0) {  // weights past the shared-memory budget: load the next chunk once this one is done
            __syncthreads();
            stage_pairs(wsm, pc, W, words, row_scale, c0, c1, e, pos);
            stage_residual(pc, c0, c1, e);
            cp_async_wait();
            __syncthreads();
        }
        for (int i = warp; i < c1 - c0; i += 2 * warps) {
            int j = i + warps < c1 - c0 ? i + warps : i;  // the second pair (the first again if there is none)
            const u32* ri = wsm + (i64)2 * i * words;
            const u32* rj = wsm + (i64)2 * j * words;
            // Σx is summed again for every pair: four more dp4a per word in a chain of their own, cheaper
            // in latency than a separate pass over xq before the dot products.
            int ia = 0, ib = 0, ja = 0, jb = 0, xsum = 0;
#pragma unroll 4
            for (int w = lane; w < words; w += 32) {
                int4 v = xq[w];
                ia = dot16(ri[w], v, ia);
                ib = dot16(ri[words + w], v, ib);
                ja = dot16(rj[w], v, ja);
                jb = dot16(rj[words + w], v, jb);
                xsum = __dp4a(v.x, 0x01010101, __dp4a(v.y, 0x01010101, __dp4a(v.z, 0x01010101, __dp4a(v.w, 0x01010101, xsum))));
            }
            // Σ (u - 1)·x = Σ u·x - Σ x
            ia = warp_isum(ia - xsum);
            ib = warp_isum(ib - xsum);
            ja = warp_isum(ja - xsum);
            jb = warp_isum(jb - xsum);
            if (lane == 0) {
                gemv_epilogue(e, pc[i], c0 + i, pos, s, ia, ib);
                if (j != i) gemv_epilogue(e, pc[j], c0 + j, pos, s, ja, jb);
            }
        }
    }
}

// Prompt BitLinear: C[t][r] = Σ_k xq[t][k] · code[r][k] on the tensor cores (int8 mma.sync m16n8k32), the
// ternary codes expanded to int8 on their way to shared memory. Tile: 64 tokens × 128 packed rows × 64
// columns; 8 warps as 2 (tokens) × 4 (rows), 32×32 each. Rows of shared tiles are padded to 80 bytes so
// that the fragment loads hit 32 different banks. xq rows are words * 16 bytes (zero padded).
#define GM 64
#define GN 128
#define GS 80

__device__ __forceinline__ void mma_s8(int* c, const u32* a, const u32* b) {
    asm volatile(
        "mma.sync.aligned.m16n8k32.row.col.s32.s8.s8.s32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};"
        : "+r"(c[0]), "+r"(c[1]), "+r"(c[2]), "+r"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}

// int8 codes (u - 1) of the 16 columns of one packed word, in column order.
__device__ __forceinline__ uint4 expand16(u32 w) {
    return make_uint4(__vsub4(w & 0x03030303u, 0x01010101u), __vsub4((w >> 2) & 0x03030303u, 0x01010101u),
                      __vsub4((w >> 4) & 0x03030303u, 0x01010101u), __vsub4((w >> 6) & 0x03030303u, 0x01010101u));
}

// Split-K: with few tokens (a many-sequence decode step, a short prompt) the grid has fewer blocks than the
// device has multiprocessors, and each block walks all of K alone. Then block z of gridDim.z takes its share
// of the k tiles, leaves its integer partial sums in `part` and the last of a tile's blocks to finish adds
// them up (integers: exact, in any order) and runs the epilogue. `done` counts each tile's finished blocks.
struct SplitK {
    int* part;  // [tile][gridDim.z][256 threads × 32] partial accumulators
    u32* done;  // [tile], zero between launches
};

// Adds the other splits' partial sums of this block's tile to `acc`, once they are all done; false in every
// block but the last to finish.
__device__ bool gather_splits(const SplitK& sk, int (&acc)[2][4][4]) {
    __shared__ int last;
    int splits = gridDim.z, tile = blockIdx.y * gridDim.x + blockIdx.x, tid = threadIdx.x;
    int* mine = sk.part + ((i64)tile * splits + blockIdx.z) * 8192 + tid;
#pragma unroll
    for (int i = 0; i < 32; i++) mine[256 * i] = acc[i >> 4][(i >> 2) & 3][i & 3];
    __threadfence();
    __syncthreads();
    if (tid == 0) last = atomicAdd(&sk.done[tile], 1u) == (u32)splits - 1;
    __syncthreads();
    if (!last) return false;
    __threadfence();
    for (int z = 0; z < splits; z++) {
        if (z == (int)blockIdx.z) continue;
        const int* other = sk.part + ((i64)tile * splits + z) * 8192 + tid;
#pragma unroll
        for (int i = 0; i < 32; i++) acc[i >> 4][(i >> 2) & 3][i & 3] += __ldcg(other + 256 * i);
    }
    if (tid == 0) sk.done[tile] = 0;
    return true;
}

// Prompt tokens are at positions pos0.., the tokens of a many-sequence step where e.row_pos says.
extern "C" __global__ void __launch_bounds__(256) bitlinear_gemm(const i8* X, const float* scales, int T, const u32* W,
                                                                 int words, const float* row_scale, int pairs,
                                                                 int pos0, Epilogue e, SplitK sk) {
    __shared__ __align__(16) unsigned char As[GM * GS];
    __shared__ __align__(16) unsigned char Bs[GN * GS];
    int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31, g = lane >> 2, tig = lane & 3;
    int m0 = blockIdx.y * GM, n0 = blockIdx.x * GN, rows = 2 * pairs, kp = words * 16;
    int wm = (warp & 1) * 32, wn = (warp >> 1) * 32;
    // Global → shared: each thread moves 16 activation bytes and 2 weight words (32 columns) per tile.
    int xr = tid >> 2, xc = (tid & 3) * 16, wr = tid >> 1, wc = (tid & 1) * 2;
    bool xok = m0 + xr < T, wok = n0 + wr < rows;
    int ktiles = words / 4, per = (ktiles + gridDim.z - 1) / gridDim.z;
    int k0 = min((int)blockIdx.z * per, ktiles), k1 = min(k0 + per, ktiles);
    const i8* xp = X + (i64)(m0 + xr) * kp + xc + k0 * 64;
    const u32* wp = W + (i64)(n0 + wr) * words + wc + k0 * 4;
    uint2 wv = wok && k0 < k1 ? *(const uint2*)wp : make_uint2(0x55555555u, 0x55555555u);
    pdl_trigger();
    pdl_wait();
    uint4 xv = xok && k0 < k1 ? *(const uint4*)xp : make_uint4(0, 0, 0, 0);
    int acc[2][4][4] = {};
    for (int kt = 0; kt < k1 - k0; kt++) {
        __syncthreads();
        *(uint4*)(As + xr * GS + xc) = xv;
        *(uint4*)(Bs + wr * GS + wc * 16) = expand16(wv.x);
        *(uint4*)(Bs + wr * GS + wc * 16 + 16) = expand16(wv.y);
        __syncthreads();
        if (kt + 1 < k1 - k0) {  // the next tile's loads fly while this one is multiplied
            if (xok) xv = *(const uint4*)(xp + (kt + 1) * 64);
            if (wok) wv = *(const uint2*)(wp + (kt + 1) * 4);
        }
#pragma unroll
        for (int ks = 0; ks < 64; ks += 32) {
            u32 af[2][4], bf[4][2];
#pragma unroll
            for (int mt = 0; mt < 2; mt++) {
                const unsigned char* base = As + (wm + mt * 16 + g) * GS + ks + tig * 4;
                af[mt][0] = *(const u32*)base;
                af[mt][1] = *(const u32*)(base + 8 * GS);
                af[mt][2] = *(const u32*)(base + 16);
                af[mt][3] = *(const u32*)(base + 8 * GS + 16);
            }
#pragma unroll
            for (int nt = 0; nt < 4; nt++) {
                const unsigned char* base = Bs + (wn + nt * 8 + g) * GS + ks + tig * 4;
                bf[nt][0] = *(const u32*)base;
                bf[nt][1] = *(const u32*)(base + 16);
            }
#pragma unroll
            for (int mt = 0; mt < 2; mt++)
#pragma unroll
                for (int nt = 0; nt < 4; nt++) mma_s8(acc[mt][nt], af[mt], bf[nt]);
        }
    }
    if (gridDim.z > 1 && !gather_splits(sk, acc)) return;
    // Accumulator (mt, nt, i): token wm + mt*16 + g (+8 for i >= 2), packed row wn + nt*8 + 2*tig (+1 for odd i):
    // each thread holds whole row pairs.
#pragma unroll
    for (int mt = 0; mt < 2; mt++)
#pragma unroll
        for (int nt = 0; nt < 4; nt++)
#pragma unroll
            for (int h = 0; h < 2; h++) {
                int t = m0 + wm + mt * 16 + g + 8 * h, r = n0 + wn + nt * 8 + 2 * tig;
                if (t < T && r < rows) {
                    float s = scales[t];
                    float ya = (float)acc[mt][nt][2 * h] / s * row_scale[r];
                    float yb = (float)acc[mt][nt][2 * h + 1] / s * row_scale[r + 1];
                    int pos = row_position(e, t, pos0);
                    epilogue(e, pair_info(e, r / 2, pos), r / 2, t, pos, ya, yb);
                }
            }
}
