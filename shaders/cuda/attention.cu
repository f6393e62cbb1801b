// Causal attention over the f16 KV cache (GQA: query head h reads kv head h / group). Scores are
// q·k / sqrt(head_dim) in f32, softmax in f32, as the CPU computes them.

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
extern "C" __global__ void __launch_bounds__(128) attn_decode(const float* q, const u16* kc, const u16* vc, int hd,
                                                              int kv_dim, int group, float scale, const int* params,
                                                              const int* row_pos, const u64* row_kv,
                                                              float* part_o, float* part_ml, int max_chunks,
                                                              u32* counters, float* out) {
    extern __shared__ float4 sm4[];
    int kstride = hd + 8;                        // u16 per key row in shared memory: padded against bank conflicts
    u16* ks = (u16*)sm4;                         // [DEC_CHUNK][kstride]
    u16* vs = ks + DEC_CHUNK * kstride;          // [DEC_CHUNK][hd]
    float* qs = (float*)(vs + DEC_CHUNK * hd);   // [hd]
    float* ps = qs + hd;                         // [DEC_CHUNK]
    float* os = ps + DEC_CHUNK;                  // [4][hd] per-warp partial outputs
    __shared__ float scratch[64];
    __shared__ int last;
    int row = blockIdx.z, n_head = gridDim.y, q_dim = n_head * hd;
    int pos = row_pos ? row_pos[row] : params[1], nchunks = pos / DEC_CHUNK + 1;
    if (row_kv) {
        kc = (const u16*)row_kv[2 * row];
        vc = (const u16*)row_kv[2 * row + 1];
    }
    q += (i64)row * q_dim;
    out += (i64)row * q_dim;
    part_o += (i64)row * n_head * max_chunks * hd;
    part_ml += (i64)row * n_head * max_chunks * 2;
    counters += row * n_head;
    int c = blockIdx.x, h = blockIdx.y, tid = threadIdx.x, warp = tid >> 5, lane = tid & 31, kvh = h / group;
    pdl_trigger();
    if (c >= nchunks) return;
    int t0 = c * DEC_CHUNK, n = min(DEC_CHUNK, pos + 1 - t0), pieces = hd / 8;  // 16-byte pieces per row
    const u16* kbase = kc + (i64)t0 * kv_dim + kvh * hd;
    const u16* vbase = vc + (i64)t0 * kv_dim + kvh * hd;
    int cached = t0 + n - 1 == pos ? n - 1 : n;  // keys of earlier tokens in this chunk
    for (int i = tid; i < cached * pieces; i += blockDim.x) {
        int j = i / pieces, k = i % pieces;
        cp_async16(ks + j * kstride + 8 * k, kbase + (i64)j * kv_dim + 8 * k);
        cp_async16(vs + j * hd + 8 * k, vbase + (i64)j * kv_dim + 8 * k);
    }
    pdl_wait();
    for (int d = tid; d < hd; d += blockDim.x) qs[d] = q[h * hd + d];
    if (cached < n && tid < pieces) {  // the current token
        *(uint4*)(ks + cached * kstride + 8 * tid) = *(const uint4*)(kbase + (i64)cached * kv_dim + 8 * tid);
        *(uint4*)(vs + cached * hd + 8 * tid) = *(const uint4*)(vbase + (i64)cached * kv_dim + 8 * tid);
    }
    cp_async_wait();
    __syncthreads();
    float s = NEG_INF;
    if (tid < n) {
        const uint4* k = (const uint4*)(ks + tid * kstride);
        float dot = 0.0f;
        for (int i = 0; i < pieces; i++) dot = dot8h(k[i], qs + 8 * i, dot);
        s = dot * scale;
    }
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
        const u32* vr = (const u32*)(vs + j * hd);
        float pj = ps[j];
#pragma unroll
        for (int i = 0; i < 4; i++) {
            int w = lane + 32 * i;
            if (w < words) {
                u32 v = vr[w];
                o[2 * i] += pj * h2f((u16)(v & 0xffff));
                o[2 * i + 1] += pj * h2f((u16)(v >> 16));
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

#define PQ 16  // queries per block
#define PK 32  // keys per step: one per lane

// Prompt (T queries at positions pos0.., keys 0..pos0+T-1), flash-attention style on the CUDA cores: block
// (query tile, head); per step of 32 keys, warp w scores rows w and w + 8 (lane = key) and updates their
// running max and sum; each thread then accumulates a few rows × 2 dims of the output.
// Block: 256 threads; dynamic shared memory: see cuda/mod.rs (attn_prefill_smem).
extern "C" __global__ void __launch_bounds__(256) attn_prefill(const float* q, const u16* kc, const u16* vc, int T,
                                                               int pos0, int hd, int q_dim, int kv_dim, int group,
                                                               float scale, float* out) {
    extern __shared__ float sm[];
    int dp = hd / 2;                              // half2 words per key
    float* qs = sm;                               // [PQ][hd]
    float* ps = qs + PQ * hd;                     // [PQ][PK] probabilities of this step
    float* alpha = ps + PQ * PK;                  // [PQ] rescale of the running output
    float* lsum = alpha + PQ;                     // [PQ] final softmax sums
    u32* ks = (u32*)(lsum + PQ);                  // [PK][dp + 1] (padded: conflict-free column reads)
    u32* vs = ks + PK * (dp + 1);                 // [PK][dp]
    int h = blockIdx.y, q0 = blockIdx.x * PQ, kvh = h / group, tid = threadIdx.x;
    int warp = tid >> 5, lane = tid & 31;
    int nq = min(PQ, T - q0);
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
            const u32* kr = (const u32*)(kc + (i64)(k0 + j) * kv_dim + kvh * hd);
            const u32* vr = (const u32*)(vc + (i64)(k0 + j) * kv_dim + kvh * hd);
            ks[j * (dp + 1) + c] = ok ? kr[c] : 0u;
            vs[j * dp + c] = ok ? vr[c] : 0u;
        }
        __syncthreads();
#pragma unroll
        for (int half = 0; half < 2; half++) {
            int r = warp + 8 * half, key = k0 + lane;
            float s = NEG_INF;
            if (r < nq && key <= pos0 + q0 + r) {
                const float* qr = qs + r * hd;
                const u32* kr = ks + lane * (dp + 1);
                float dot = 0.0f;
                for (int c = 0; c < dp; c++) {
                    u32 w = kr[c];
                    dot += qr[2 * c] * h2f((u16)(w & 0xffff));
                    dot += qr[2 * c + 1] * h2f((u16)(w >> 16));
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
                    u32 w = vs[j * dp + col];
                    o0 += pr[j] * h2f((u16)(w & 0xffff));
                    o1 += pr[j] * h2f((u16)(w >> 16));
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
