// Shared helpers of the CUDA kernels (compiled at run time with NVRTC: no CUDA headers, so the few
// types and conversions needed are spelled out here).

typedef unsigned int u32;
typedef unsigned short u16;
typedef signed char i8;
typedef long long i64;
typedef unsigned long long u64;

#define NEG_INF __int_as_float(0xff800000)

// KV cache types (KvType in backend/mod.rs; cuda/kernels.rs mirrors the numbers).
#define KV_F16 0
#define KV_F32 1
#define KV_Q8 2  // llama.cpp's q8_0: int8 values, an f16 scale per 32

// Bytes per cached value in a row (q8_0: the int8 values; their scales follow the row's values).
__host__ __device__ constexpr int kv_bytes(int type) { return type == KV_F16 ? 2 : type == KV_F32 ? 4 : 1; }

// Bytes of one token's keys (or values) of kv_dim values: for q8_0 the kv_dim int8 values, then the kv_dim / 32
// f16 scales, padded to 16 bytes, so that every row and every head's values start 16-byte aligned. Mirrors
// `kv_row_bytes` in cuda/kernels.rs.
__device__ __forceinline__ i64 kv_row_bytes(int type, int kv_dim) {
    if (type != KV_Q8) return (i64)kv_bytes(type) * kv_dim;
    return ((i64)kv_dim + kv_dim / 16 + 15) / 16 * 16;
}

// Programmatic dependent launch (sm_90+; cuda/kernels.rs launches with it): a kernel may start while the
// previous one in the stream finishes. `pdl_wait` blocks until that one has completed and its writes are
// visible, so everything before it must read only constant data (weights); `pdl_trigger` lets the next
// kernel's blocks be scheduled as this one's last wave runs. Without the launch attribute both do nothing.
__device__ __forceinline__ void pdl_wait() {
#if __CUDA_ARCH__ >= 900
    asm volatile("griddepcontrol.wait;" ::: "memory");
#endif
}

__device__ __forceinline__ void pdl_trigger() {
#if __CUDA_ARCH__ >= 900
    asm volatile("griddepcontrol.launch_dependents;" :::);
#endif
}

__device__ __forceinline__ float h2f(u16 h) {
    float f;
    asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(h));
    return f;
}

__device__ __forceinline__ u16 f2h(float f) {
    u16 h;
    asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(f));
    return h;
}

// acc + Σ x[i]·h[i] over the 8 f16 values of one 16-byte load.
__device__ __forceinline__ float dot8h(uint4 v, const float* x, float acc) {
    acc += x[0] * h2f((u16)(v.x & 0xffff));
    acc += x[1] * h2f((u16)(v.x >> 16));
    acc += x[2] * h2f((u16)(v.y & 0xffff));
    acc += x[3] * h2f((u16)(v.y >> 16));
    acc += x[4] * h2f((u16)(v.z & 0xffff));
    acc += x[5] * h2f((u16)(v.z >> 16));
    acc += x[6] * h2f((u16)(v.w & 0xffff));
    acc += x[7] * h2f((u16)(v.w >> 16));
    return acc;
}

__device__ __forceinline__ float warp_sum(float v) {
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

// Integer sums and maxima take one redux instruction (sm_80+) where float sums take five dependent
// shuffles. A float's maximum is taken as an integer's: `ordered` maps floats (not NaN) to ints of the same
// order, and back.
__device__ __forceinline__ int ordered(int i) {
    return i >= 0 ? i : i ^ 0x7fffffff;
}

__device__ __forceinline__ float warp_max(float v) {
    return __int_as_float(ordered(__reduce_max_sync(0xffffffffu, ordered(__float_as_int(v)))));
}

__device__ __forceinline__ int warp_isum(int v) {
    return __reduce_add_sync(0xffffffffu, v);
}

// Block-wide reductions (blockDim.x a multiple of 32): every thread gets the result. `scratch` holds 32
// values. There is no barrier before the partials are written (one less on the critical path): a reduction
// that follows another without a barrier in between must use its own scratch.
__device__ __forceinline__ float block_sum(float v, float* scratch) {
    v = warp_sum(v);
    if ((threadIdx.x & 31) == 0) scratch[threadIdx.x >> 5] = v;
    __syncthreads();
    v = (threadIdx.x & 31) < (blockDim.x >> 5) ? scratch[threadIdx.x & 31] : 0.0f;
    return warp_sum(v);
}

__device__ __forceinline__ float block_max(float v, float* scratch) {
    v = warp_max(v);
    if ((threadIdx.x & 31) == 0) scratch[threadIdx.x >> 5] = v;
    __syncthreads();
    v = (threadIdx.x & 31) < (blockDim.x >> 5) ? scratch[threadIdx.x & 31] : NEG_INF;
    return warp_max(v);
}

// The block's best (value, index) pair: the largest value, the lowest index among equal ones. Every thread
// passes its own and thread 0 gets the result; `sval` and `sidx` hold one entry per warp.
__device__ __forceinline__ void block_argmax(float& v, int& i, float* sval, int* sidx) {
    for (int o = 16; o > 0; o >>= 1) {
        float ov = __shfl_xor_sync(0xffffffffu, v, o);
        int oi = __shfl_xor_sync(0xffffffffu, i, o);
        if (ov > v || (ov == v && oi < i)) {
            v = ov;
            i = oi;
        }
    }
    __syncthreads();  // earlier readers of sval/sidx are done
    if ((threadIdx.x & 31) == 0) {
        sval[threadIdx.x >> 5] = v;
        sidx[threadIdx.x >> 5] = i;
    }
    __syncthreads();
    if (threadIdx.x == 0)
        for (int w = 1; w < (int)(blockDim.x >> 5); w++)
            if (sval[w] > v || (sval[w] == v && sidx[w] < i)) {
                v = sval[w];
                i = sidx[w];
            }
}

// Asynchronous 16-byte copies from global to shared memory (cp.async, sm_80+): issued before `pdl_wait` for
// constant data, so that its latency overlaps the previous kernel; `cp_async_wait` waits for this thread's
// copies (a barrier then publishes them to the block).
__device__ __forceinline__ void cp_async16(void* smem, const void* gmem) {
    unsigned s = (unsigned)__cvta_generic_to_shared(smem);
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16;" ::"r"(s), "l"(gmem) : "memory");
}

__device__ __forceinline__ void cp_async_wait() {
    asm volatile("cp.async.wait_all;" ::: "memory");
}

// Starts copying the norm weights `w` (n floats, n % 4 == 0, 16-byte aligned) into `ws`, for `norm_quant`.
__device__ __forceinline__ void norm_weights_async(const float* w, int n, float* ws) {
    for (int i = threadIdx.x; i < n / 4; i += blockDim.x) cp_async16(ws + 4 * i, w + 4 * i);
}

// RMSNorm of `x` (n floats, n % 4 == 0, n <= 32 * blockDim.x) by the weights in `ws` (being copied by
// `norm_weights_async`; without `prenorm`, x as it is: a family without sub-norms), then BitNet's per-token
// absmax int8 quantization, element for element the CPU's
// `rmsnorm` + `kernels::quantize_activations`: s = 127 / max(max|xn|, 1e-5), q = clamp(round_half_even(xn * s),
// -128, 127). Each thread loads its (at most 8) float4 of x at once and keeps them in registers; q goes to
// dst[0..kp) as packed int8 (zeros past n). Returns s. The whole block calls it; dst is visible to the block
// afterwards. `scratch`: 64 floats (one reduction's 32 each).
#define NQ 8

__device__ __forceinline__ float norm_quant(const float* x, int n, int kp, float eps, const float* ws, bool prenorm,
                                            int* dst, float* scratch) {
    const float4* x4 = (const float4*)x;
    const float4* w4 = (const float4*)ws;
    int n4 = n >> 2;
    float4 v[NQ];
    float ss = 0.0f;
#pragma unroll
    for (int k = 0; k < NQ; k++) {
        int i = threadIdx.x + k * blockDim.x;
        if (i < n4) v[k] = x4[i];
    }
#pragma unroll
    for (int k = 0; k < NQ; k++)
        if (threadIdx.x + k * blockDim.x < n4) ss += v[k].x * v[k].x + v[k].y * v[k].y + v[k].z * v[k].z + v[k].w * v[k].w;
    cp_async_wait();
    float inv = 1.0f;
    if (prenorm) {
        ss = block_sum(ss, scratch);  // its barrier also publishes ws
        inv = 1.0f / sqrtf(ss / (float)n + eps);
    }
    float amax = 0.0f;
#pragma unroll
    for (int k = 0; k < NQ; k++) {
        int i = threadIdx.x + k * blockDim.x;
        if (i < n4) {
            if (prenorm) {
                float4 w = w4[i];
                v[k] = make_float4(w.x * (v[k].x * inv), w.y * (v[k].y * inv), w.z * (v[k].z * inv),
                                   w.w * (v[k].w * inv));
            }
            amax = fmaxf(amax, fmaxf(fmaxf(fabsf(v[k].x), fabsf(v[k].y)), fmaxf(fabsf(v[k].z), fabsf(v[k].w))));
        }
    }
    amax = block_max(amax, scratch + 32);
    float s = 127.0f / fmaxf(amax, 1e-5f);
#pragma unroll
    for (int k = 0; k < NQ; k++) {
        int i = threadIdx.x + k * blockDim.x;
        if (i < n4) {
            int q0 = (int)fminf(fmaxf(rintf(v[k].x * s), -128.0f), 127.0f);
            int q1 = (int)fminf(fmaxf(rintf(v[k].y * s), -128.0f), 127.0f);
            int q2 = (int)fminf(fmaxf(rintf(v[k].z * s), -128.0f), 127.0f);
            int q3 = (int)fminf(fmaxf(rintf(v[k].w * s), -128.0f), 127.0f);
            dst[i] = (q0 & 0xff) | (q1 & 0xff) << 8 | (q2 & 0xff) << 16 | (q3 & 0xff) << 24;
        }
    }
    for (int i = n4 + threadIdx.x; i < kp / 4; i += blockDim.x) dst[i] = 0;
    __syncthreads();
    return s;
}
