// Causal attention over the KV cache (GQA: query head h reads kv head h / group). Scores are q·k / sqrt(head_dim)
// in f32, softmax in f32, as the CPU computes them. Each kernel is a template over the cache type (KV_F16,
// KV_F32, KV_Q8: rows as kv_row_bytes in common.cuh), instantiated once per type under its own name.

// Quantizes row t's keys and values, which the QKV epilogue left as f32 in `stage` ([t][2 kv_dim]), into its q8_0
// caches as ggml's reference quantizer does: per 32 values d = max|x| / 127 (kept as f16), q = round(x / d).
// Positions and caches as the epilogue's: row_pos / row_kv for a step of many sequences, else kc / vc at
// params[1] (a decode step) or pos0 + t (a prompt). Grid: (t, 2 kv_dim / 32), a warp per block of 32 values.
extern "C" __global__ void __launch_bounds__(32) kv_quant(const float* stage, int kv_dim, int pos0, const int* params,
                                                          const int* row_pos, const u64* row_kv, char* kc, char* vc) {
    int t = blockIdx.x, i = blockIdx.y * 32 + threadIdx.x;
    pdl_trigger();
    pdl_wait();
    int pos = row_pos ? row_pos[t] : params ? params[1] : pos0 + t;
    bool key = i < kv_dim;
    char* cache = row_kv ? (char*)row_kv[2 * t + (key ? 0 : 1)] : key ? kc : vc;
    char* row = cache + pos * kv_row_bytes(KV_Q8, kv_dim);
    int d = key ? i : i - kv_dim;  // a block never straddles keys and values: kv_dim % 32 == 0
    float x = stage[(i64)t * 2 * kv_dim + i];
    float amax = warp_max(fabsf(x));
    float scale = amax / 127.0f, inv = scale != 0.0f ? 1.0f / scale : 0.0f;
    row[d] = (char)(int)roundf(x * inv);
    if (threadIdx.x == 0) ((u16*)(row + kv_dim))[d / 32] = f2h(scale);
}

// Two values (dims 2w, 2w + 1) of a cached row in attn_decode's shared memory; `scales`: the row's q8_0 scales.
template <int KT>
__device__ __forceinline__ float2 staged_pair(const char* row, int w, const float* scales) {
    if (KT == KV_F16) {
        u32 v = ((const u32*)row)[w];
        return make_float2(h2f((u16)(v & 0xffff)), h2f((u16)(v >> 16)));
    }
    if (KT == KV_F32) return ((const float2*)row)[w];
    u32 v = ((const u16*)row)[w];
    float d = scales[w / 16];
    return make_float2(d * (float)(i8)(v & 0xff), d * (float)(i8)(v >> 8));
}

// q · (a staged key row) over hd dims.
template <int KT>
__device__ __forceinline__ float staged_dot(const char* row, const float* q, int hd, const float* scales) {
    float dot = 0.0f;
    if (KT == KV_F16) {
        for (int i = 0; i < hd / 8; i++) dot = dot8h(((const uint4*)row)[i], q + 8 * i, dot);
    } else if (KT == KV_F32) {
        for (int i = 0; i < hd / 4; i++) {
            float4 k = ((const float4*)row)[i];
            dot += q[4 * i] * k.x + q[4 * i + 1] * k.y + q[4 * i + 2] * k.z + q[4 * i + 3] * k.w;
        }
    } else {
        for (int b = 0; b < hd / 32; b++) {
            float s = 0.0f;
            for (int i = 0; i < 2; i++) {
                uint4 v = ((const uint4*)row)[2 * b + i];
                u32 w[4] = {v.x, v.y, v.z, v.w};
                const float* qb = q + 32 * b + 16 * i;
#pragma unroll
                for (int j = 0; j < 16; j++) s += qb[j] * (float)(i8)(w[j / 4] >> (8 * (j % 4)));
            }
            dot += scales[b] * s;
        }
    }
    return dot;
}

#define DEC_CHUNK 128

// Decode (one query, flash-decoding): block (c, h) handles keys [c*128, c*128 + 128) of head h. The keys and
// values of earlier tokens are constant during the step, so they are copied into shared memory before
// waiting for the previous kernel (programmatic dependent launch); only q and the current token's key and
// value (written by that kernel) are read after. A thread per key for the scores; warp w sums the values of
// keys w, w+4, ..., its lanes over the head's dims. With one chunk the block writes the output; with several
// it writes its partial output with its softmax max and sum, and the last block of a head to finish merges
// the partials into out (no second launch). Blocks past the current position exit at once, so one grid fits
// every step of a CUDA graph. A step of many sequences runs row r (blockIdx.z) at position row_pos[r] over its
// own caches (row_kv[2r], row_kv[2r + 1]); with one sequence, row_pos and row_kv are null (params[1], kc, vc).
// Block: 128 threads; dynamic shared memory: attn_decode_smem in cuda/kernels.rs.
template <int KT>
__device__ void attn_decode(const float* q, const char* kc, const char* vc, int hd, int kv_dim, int group, float scale,
                            const int* params, const int* row_pos, const u64* row_kv, float* part_o, float* part_ml,
                            int max_chunks, u32* counters, float* out) {
    extern __shared__ float4 sm4[];
    const int B = kv_bytes(KT), nb = hd / 32;    // bytes per value; q8_0 scales per row of a head
    int kstride = hd * B + 16, vstride = hd * B;  // bytes per row in shared memory (keys padded against conflicts)
    char* ks = (char*)sm4;                        // [DEC_CHUNK][kstride]
    char* vs = ks + DEC_CHUNK * kstride;          // [DEC_CHUNK][vstride]
    float* kd = (float*)(vs + DEC_CHUNK * vstride);  // q8_0: [DEC_CHUNK][nb] key scales, then value scales
    float* vd = kd + (KT == KV_Q8 ? DEC_CHUNK * nb : 0);
    float* qs = vd + (KT == KV_Q8 ? DEC_CHUNK * nb : 0);  // [hd]
    float* ps = qs + hd;                         // [DEC_CHUNK]
    float* os = ps + DEC_CHUNK;                  // [4][hd] per-warp partial outputs
    __shared__ float scratch[64];
    __shared__ int last;
    int row = blockIdx.z, n_head = gridDim.y, q_dim = n_head * hd;
    int pos = row_pos ? row_pos[row] : params[1], nchunks = pos / DEC_CHUNK + 1;
    if (row_kv) {
        kc = (const char*)row_kv[2 * row];
        vc = (const char*)row_kv[2 * row + 1];
    }
    q += (i64)row * q_dim;
    out += (i64)row * q_dim;
    part_o += (i64)row * n_head * max_chunks * hd;
    part_ml += (i64)row * n_head * max_chunks * 2;
    counters += row * n_head;
    int c = blockIdx.x, h = blockIdx.y, tid = threadIdx.x, warp = tid >> 5, lane = tid & 31, kvh = h / group;
    pdl_trigger();
    if (c >= nchunks) return;
    i64 rb = kv_row_bytes(KT, kv_dim);
    int t0 = c * DEC_CHUNK, n = min(DEC_CHUNK, pos + 1 - t0), pieces = hd * B / 16;  // 16-byte pieces per row
    const char* kbase = kc + t0 * rb + kvh * hd * B;
    const char* vbase = vc + t0 * rb + kvh * hd * B;
    // q8_0: this head's scales, after the row's values.
    const u16* kscale = (const u16*)(kc + t0 * rb + kv_dim) + kvh * nb;
    const u16* vscale = (const u16*)(vc + t0 * rb + kv_dim) + kvh * nb;
    int cached = t0 + n - 1 == pos ? n - 1 : n;  // keys of earlier tokens in this chunk
    for (int i = tid; i < cached * pieces; i += blockDim.x) {
        int j = i / pieces, k = i % pieces;
        cp_async16(ks + j * kstride + 16 * k, kbase + j * rb + 16 * k);
        cp_async16(vs + j * vstride + 16 * k, vbase + j * rb + 16 * k);
    }
    if (KT == KV_Q8)
        for (int i = tid; i < cached * nb; i += blockDim.x) {
            int j = i / nb, b = i % nb;
            kd[i] = h2f(kscale[j * rb / 2 + b]);
            vd[i] = h2f(vscale[j * rb / 2 + b]);
        }
    pdl_wait();
    for (int d = tid; d < hd; d += blockDim.x) qs[d] = q[h * hd + d];
    if (cached < n && tid < pieces) {  // the current token
        *(uint4*)(ks + cached * kstride + 16 * tid) = *(const uint4*)(kbase + cached * rb + 16 * tid);
        *(uint4*)(vs + cached * vstride + 16 * tid) = *(const uint4*)(vbase + cached * rb + 16 * tid);
    }
    if (KT == KV_Q8 && cached < n && tid < nb) {
        kd[cached * nb + tid] = h2f(kscale[cached * rb / 2 + tid]);
        vd[cached * nb + tid] = h2f(vscale[cached * rb / 2 + tid]);
    }
    cp_async_wait();
    __syncthreads();
    float s = NEG_INF;
    if (tid < n) s = staged_dot<KT>(ks + tid * kstride, qs, hd, kd + tid * nb) * scale;
    float m = block_max(s, scratch);
    float p = tid < n ? expf(s - m) : 0.0f;
    ps[tid] = p;
    float l = block_sum(p, scratch + 32);  // its barrier also publishes ps
    int words = hd / 2;
    float o[8];
#pragma unroll
    for (int i = 0; i < 8; i++) o[i] = 0.0f;
#pragma unroll 4
    for (int j = warp; j < n; j += 4) {
        const char* vr = vs + j * vstride;
        float pj = ps[j];
#pragma unroll
        for (int i = 0; i < 4; i++) {
            int w = lane + 32 * i;
            if (w < words) {
                float2 v = staged_pair<KT>(vr, w, vd + j * nb);
                o[2 * i] += pj * v.x;
                o[2 * i + 1] += pj * v.y;
            }
        }
    }
#pragma unroll
    for (int i = 0; i < 4; i++) {
        int w = lane + 32 * i;
        if (w < words) {
            os[warp * hd + 2 * w] = o[2 * i];
            os[warp * hd + 2 * w + 1] = o[2 * i + 1];
        }
    }
    __syncthreads();
    if (nchunks == 1) {
        for (int d = tid; d < hd; d += blockDim.x) out[h * hd + d] = (os[d] + os[hd + d] + os[2 * hd + d] + os[3 * hd + d]) / l;
        return;
    }
    float* po = part_o + ((i64)h * max_chunks + c) * hd;
    for (int d = tid; d < hd; d += blockDim.x) po[d] = os[d] + os[hd + d] + os[2 * hd + d] + os[3 * hd + d];
    if (tid == 0) {
        part_ml[(h * max_chunks + c) * 2] = m;
        part_ml[(h * max_chunks + c) * 2 + 1] = l;
    }
    __threadfence();
    __syncthreads();
    if (tid == 0) last = atomicAdd(&counters[h], 1u) == (u32)(nchunks - 1);
    __syncthreads();
    if (!last) return;
    // Merge: out = Σ_c o_c e^{m_c - M} / Σ_c l_c e^{m_c - M}. Other blocks' partials are read past L1.
    float M = NEG_INF, L = 0.0f;
    for (int cc = 0; cc < nchunks; cc++) M = fmaxf(M, __ldcg(&part_ml[(h * max_chunks + cc) * 2]));
    for (int cc = 0; cc < nchunks; cc++)
        L += __ldcg(&part_ml[(h * max_chunks + cc) * 2 + 1]) * expf(__ldcg(&part_ml[(h * max_chunks + cc) * 2]) - M);
    for (int d = tid; d < hd; d += blockDim.x) {
        float acc = 0.0f;
        for (int cc = 0; cc < nchunks; cc++)
            acc += __ldcg(&part_o[((i64)h * max_chunks + cc) * hd + d]) *
                   expf(__ldcg(&part_ml[(h * max_chunks + cc) * 2]) - M);
        out[h * hd + d] = acc / L;
    }
    if (tid == 0) counters[h] = 0;
}

#define ATTN_DECODE(name, KT)                                                                                      \
    extern "C" __global__ void __launch_bounds__(128)                                                              \
        name(const float* q, const char* kc, const char* vc, int hd, int kv_dim, int group, float scale,           \
             const int* params, const int* row_pos, const u64* row_kv, float* part_o, float* part_ml,              \
             int max_chunks, u32* counters, float* out) {                                                          \
        attn_decode<KT>(q, kc, vc, hd, kv_dim, group, scale, params, row_pos, row_kv, part_o, part_ml, max_chunks, \
                        counters, out);                                                                            \
    }
ATTN_DECODE(attn_decode_f16, KV_F16)
ATTN_DECODE(attn_decode_f32, KV_F32)
ATTN_DECODE(attn_decode_q8, KV_Q8)

#define PQ 16  // queries per block
#define PK 32  // keys per step: one per lane

// Two values (dims d, d + 1) of a cached row in global memory: as they are stored (an f16 pair stays packed in a
// u32, unpacked at use), or as floats (f32; q8_0 times its scale).
template <int KT> struct KvPair { typedef float2 T; };
template <> struct KvPair<KV_F16> { typedef u32 T; };

template <int KT>
__device__ __forceinline__ typename KvPair<KT>::T load_pair(const char* row, int kv_dim, int d) {
    if constexpr (KT == KV_F16) {
        return *(const u32*)(row + 2 * d);
    } else if constexpr (KT == KV_F32) {
        return *(const float2*)(row + 4 * d);
    } else {
        u32 v = *(const u16*)(row + d);
        float s = h2f(((const u16*)(row + kv_dim))[d / 32]);
        return make_float2(s * (float)(i8)(v & 0xff), s * (float)(i8)(v >> 8));
    }
}

__device__ __forceinline__ float2 unpack_pair(u32 w) { return make_float2(h2f((u16)(w & 0xffff)), h2f((u16)(w >> 16))); }
__device__ __forceinline__ float2 unpack_pair(float2 w) { return w; }

// Prompt (T queries at positions pos0.., keys 0..pos0+T-1), flash-attention style on the CUDA cores: block
// (query tile, head); per step of 32 keys, warp w scores rows w and w + 8 (lane = key) and updates their
// running max and sum; each thread then accumulates a few rows × 2 dims of the output.
// Block: 256 threads; dynamic shared memory: attn_prefill_smem in cuda/kernels.rs.
template <int KT>
__device__ void attn_prefill(const float* q, const char* kc, const char* vc, int T, int pos0, int hd, int q_dim,
                             int kv_dim, int group, float scale, float* out) {
    typedef typename KvPair<KT>::T P;
    extern __shared__ float sm[];
    int dp = hd / 2;                              // value pairs per key
    float* qs = sm;                               // [PQ][hd]
    float* ps = qs + PQ * hd;                     // [PQ][PK] probabilities of this step
    float* alpha = ps + PQ * PK;                  // [PQ] rescale of the running output
    float* lsum = alpha + PQ;                     // [PQ] final softmax sums
    P* ks = (P*)(lsum + PQ);                      // [PK][dp + 1] (padded: conflict-free column reads)
    P* vs = ks + PK * (dp + 1);                   // [PK][dp]
    int h = blockIdx.y, q0 = blockIdx.x * PQ, kvh = h / group, tid = threadIdx.x;
    int warp = tid >> 5, lane = tid & 31;
    int nq = min(PQ, T - q0);
    i64 rb = kv_row_bytes(KT, kv_dim);
    pdl_trigger();
    pdl_wait();
    for (int i = tid; i < PQ * hd; i += blockDim.x) {
        int r = i / hd, d = i % hd;
        qs[i] = r < nq ? q[(i64)(q0 + r) * q_dim + h * hd + d] : 0.0f;
    }
    // Output ownership: dims (2c, 2c + 1) with c = tid % dp, rows tid / dp + k * (256 / dp).
    int col = tid % dp, rstep = blockDim.x / dp, r0 = tid / dp;
    float acc[8][2];
#pragma unroll
    for (int k = 0; k < 8; k++) acc[k][0] = acc[k][1] = 0.0f;
    float m_run[2] = {NEG_INF, NEG_INF}, l_run[2] = {0.0f, 0.0f};  // rows warp, warp + 8
    int kend = pos0 + q0 + nq;                                      // keys [0, kend) are visible to this tile
    for (int k0 = 0; k0 < kend; k0 += PK) {
        __syncthreads();
        for (int i = tid; i < PK * dp; i += blockDim.x) {
            int j = i / dp, c = i % dp;
            bool ok = k0 + j < kend;
            P zero = {};
            ks[j * (dp + 1) + c] = ok ? load_pair<KT>(kc + (k0 + j) * rb, kv_dim, kvh * hd + 2 * c) : zero;
            vs[j * dp + c] = ok ? load_pair<KT>(vc + (k0 + j) * rb, kv_dim, kvh * hd + 2 * c) : zero;
        }
        __syncthreads();
#pragma unroll
        for (int half = 0; half < 2; half++) {
            int r = warp + 8 * half, key = k0 + lane;
            float s = NEG_INF;
            if (r < nq && key <= pos0 + q0 + r) {
                const float* qr = qs + r * hd;
                const P* kr = ks + lane * (dp + 1);
                float dot = 0.0f;
                for (int c = 0; c < dp; c++) {
                    float2 k = unpack_pair(kr[c]);
                    dot += qr[2 * c] * k.x;
                    dot += qr[2 * c + 1] * k.y;
                }
                s = dot * scale;
            }
            float m_new = fmaxf(m_run[half], warp_max(s));
            float p = s == NEG_INF ? 0.0f : expf(s - m_new);
            float a = m_run[half] == NEG_INF ? (m_new == NEG_INF ? 1.0f : 0.0f) : expf(m_run[half] - m_new);
            l_run[half] = l_run[half] * a + warp_sum(p);
            m_run[half] = m_new;
            ps[r * PK + lane] = p;
            if (lane == 0) alpha[r] = a;
        }
        __syncthreads();
#pragma unroll
        for (int k = 0; k < 8; k++) {
            int r = r0 + k * rstep;
            if (r < PQ) {
                float a = alpha[r], o0 = acc[k][0] * a, o1 = acc[k][1] * a;
                const float* pr = ps + r * PK;
                for (int j = 0; j < PK; j++) {
                    float2 v = unpack_pair(vs[j * dp + col]);
                    o0 += pr[j] * v.x;
                    o1 += pr[j] * v.y;
                }
                acc[k][0] = o0;
                acc[k][1] = o1;
            }
        }
    }
    if (lane == 0) {
        lsum[warp] = l_run[0];
        lsum[warp + 8] = l_run[1];
    }
    __syncthreads();
#pragma unroll
    for (int k = 0; k < 8; k++) {
        int r = r0 + k * rstep;
        if (r < nq && tid < rstep * dp) {
            float* o = out + (i64)(q0 + r) * q_dim + h * hd + 2 * col;
            o[0] = acc[k][0] / lsum[r];
            o[1] = acc[k][1] / lsum[r];
        }
    }
}

#define ATTN_PREFILL(name, KT)                                                                                     \
    extern "C" __global__ void __launch_bounds__(256) name(const float* q, const char* kc, const char* vc, int T,  \
                                                           int pos0, int hd, int q_dim, int kv_dim, int group,     \
                                                           float scale, float* out) {                              \
        attn_prefill<KT>(q, kc, vc, T, pos0, hd, q_dim, kv_dim, group, scale, out);                               \
    }
ATTN_PREFILL(attn_prefill_f16, KV_F16)
ATTN_PREFILL(attn_prefill_f32, KV_F32)
ATTN_PREFILL(attn_prefill_q8, KV_Q8)
