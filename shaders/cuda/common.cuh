// Shared helpers of the CUDA kernels (compiled at run time with NVRTC: no CUDA headers, so the few
// types and conversions needed are spelled out here).

typedef unsigned int u32;
typedef unsigned short u16;
typedef signed char i8;
typedef long long i64;

#define NEG_INF __int_as_float(0xff800000)

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

__device__ __forceinline__ float warp_max(float v) {
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
    return v;
}

__device__ __forceinline__ int warp_isum(int v) {
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

// Block-wide reductions (blockDim.x a multiple of 32): every thread gets the result. `scratch` holds 32
// values; the leading barrier lets consecutive calls reuse it.
__device__ __forceinline__ float block_sum(float v, float* scratch) {
    v = warp_sum(v);
    __syncthreads();
    if ((threadIdx.x & 31) == 0) scratch[threadIdx.x >> 5] = v;
    __syncthreads();
    v = (threadIdx.x & 31) < (blockDim.x >> 5) ? scratch[threadIdx.x & 31] : 0.0f;
    return warp_sum(v);
}

__device__ __forceinline__ float block_max(float v, float* scratch) {
    v = warp_max(v);
    __syncthreads();
    if ((threadIdx.x & 31) == 0) scratch[threadIdx.x >> 5] = v;
    __syncthreads();
    v = (threadIdx.x & 31) < (blockDim.x >> 5) ? scratch[threadIdx.x & 31] : NEG_INF;
    return warp_max(v);
}

__device__ __forceinline__ int block_isum(int v, float* scratch) {
    v = warp_isum(v);
    __syncthreads();
    if ((threadIdx.x & 31) == 0) scratch[threadIdx.x >> 5] = __int_as_float(v);
    __syncthreads();
    v = (threadIdx.x & 31) < (blockDim.x >> 5) ? __float_as_int(scratch[threadIdx.x & 31]) : 0;
    return warp_isum(v);
}

// RMSNorm of `x` (n floats, n % 4 == 0) by `w`, then BitNet's per-token absmax int8 quantization, element
// for element the CPU's `rmsnorm` + `kernels::quantize_activations`: s = 127 / max(max|xn|, 1e-5),
// q = clamp(round_half_even(xn * s), -128, 127). `x` and `w` are read once, with all of a thread's loads in
// flight together (up to n = 4096: one round trip), into `xs` and `ws` (n floats of shared memory each);
// q goes to dst[0..kp) (zeros past n). Returns s and Σq (the GEMV's correction for codes stored as
// code + 1). The whole block calls it; dst is visible to the block afterwards.
struct Quant {
    float s;
    int sum;
};

#define NQ_LOADS 4

__device__ __forceinline__ Quant norm_quant(const float* x, const float* w, int n, int kp, float eps, float* xs,
                                            float* ws, i8* dst, float* scratch) {
    const float4* x4 = (const float4*)x;
    const float4* w4 = (const float4*)w;
    int n4 = n >> 2, step = blockDim.x * NQ_LOADS;
    float ss = 0.0f;
    for (int base = threadIdx.x; base < n4; base += step) {
        float4 xv[NQ_LOADS], wv[NQ_LOADS];
#pragma unroll
        for (int k = 0; k < NQ_LOADS; k++) {
            int i = base + k * blockDim.x;
            if (i < n4) {
                xv[k] = x4[i];
                wv[k] = w4[i];
            }
        }
#pragma unroll
        for (int k = 0; k < NQ_LOADS; k++) {
            int i = base + k * blockDim.x;
            if (i < n4) {
                ((float4*)xs)[i] = xv[k];
                ((float4*)ws)[i] = wv[k];
                ss += xv[k].x * xv[k].x + xv[k].y * xv[k].y + xv[k].z * xv[k].z + xv[k].w * xv[k].w;
            }
        }
    }
    ss = block_sum(ss, scratch);  // its barriers also publish xs and ws
    float inv = 1.0f / sqrtf(ss / (float)n + eps);
    float amax = 0.0f;
    for (int i = threadIdx.x; i < n; i += blockDim.x) {
        float v = ws[i] * (xs[i] * inv);
        xs[i] = v;
        amax = fmaxf(amax, fabsf(v));
    }
    amax = block_max(amax, scratch);
    float s = 127.0f / fmaxf(amax, 1e-5f);
    int sum = 0;
    for (int i = threadIdx.x; i < kp; i += blockDim.x) {
        int q = 0;
        if (i < n) q = (int)fminf(fmaxf(rintf(xs[i] * s), -128.0f), 127.0f);
        dst[i] = (i8)q;
        sum += q;
    }
    Quant r;
    r.s = s;
    r.sum = block_isum(sum, scratch);
    return r;
}
