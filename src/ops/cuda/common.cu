// Helpers shared by the NVRTC kernels (prepended to softmax.cu and elementwise.cu).
// No headers (NVRTC needs no CUDA include path): bf16 is handled as its bit pattern.

#define BLOCK 256
#define NEG_INF __int_as_float(0xff800000)

typedef unsigned long long index_t;

__device__ __forceinline__ int imin(int a, int b) { return a < b ? a : b; }

__device__ __forceinline__ unsigned short f32_to_bf16(float f) {
    unsigned int u = __float_as_uint(f);
    if ((u & 0x7fffffffu) > 0x7f800000u) return 0x7fc0;  // NaN
    u += 0x7fffu + ((u >> 16) & 1u);                      // round to nearest even
    return (unsigned short)(u >> 16);
}

__device__ __forceinline__ void store(float* p, index_t i, float v) { p[i] = v; }
__device__ __forceinline__ void store(unsigned short* p, index_t i, float v) { p[i] = f32_to_bf16(v); }

__device__ float block_reduce(float v, bool is_max, float* shared) {
    for (int o = 16; o > 0; o >>= 1) {
        float other = __shfl_xor_sync(0xffffffffu, v, o);
        v = is_max ? fmaxf(v, other) : v + other;
    }
    int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    if (lane == 0) shared[warp] = v;
    __syncthreads();
    if (warp == 0) {
        v = lane < BLOCK / 32 ? shared[lane] : (is_max ? NEG_INF : 0.0f);
        for (int o = 16; o > 0; o >>= 1) {
            float other = __shfl_xor_sync(0xffffffffu, v, o);
            v = is_max ? fmaxf(v, other) : v + other;
        }
        if (lane == 0) shared[0] = v;
    }
    __syncthreads();
    float result = shared[0];
    __syncthreads();
    return result;
}

__device__ __forceinline__ float bf16_to_f32(unsigned short h) {
    return __uint_as_float(((unsigned int)h) << 16);
}

// Loads, stores and rounding for the two activation types: float, and bf16 as unsigned short.
__device__ __forceinline__ float load(const float* p, index_t i) { return p[i]; }
__device__ __forceinline__ float load(const unsigned short* p, index_t i) { return bf16_to_f32(p[i]); }
__device__ __forceinline__ float round_as(float v, const float*) { return v; }
__device__ __forceinline__ float round_as(float v, const unsigned short*) {
    return bf16_to_f32(f32_to_bf16(v));
}

__device__ __forceinline__ float warp_sum(float v) {
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

