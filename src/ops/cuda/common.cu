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

#define LOG2E 1.4426950408889634f
#define LN2 0.6931471805599453f

__device__ __forceinline__ unsigned int pack_bf16(float lo, float hi) {
#if __CUDA_ARCH__ >= 800
    // One instruction for both (round to nearest even, as f32_to_bf16).
    unsigned int packed;
    asm("cvt.rn.bf16x2.f32 %0, %1, %2;\n" : "=r"(packed) : "f"(hi), "f"(lo));
    return packed;
#else
    return (unsigned int)f32_to_bf16(lo) | ((unsigned int)f32_to_bf16(hi) << 16);
#endif
}

// 16-byte loads and stores: 8 bf16 or 4 f32 values (the memory-bound kernels move rows this way
// where sizes and addresses allow; one 2-byte access per thread left them at a quarter of the
// memory bandwidth).
template <typename T> struct Vec16;
template <> struct Vec16<unsigned short> {
    static const int N = 8;
    __device__ static void load(const unsigned short* p, index_t i, float* out) {
        const uint4 u = *reinterpret_cast<const uint4*>(p + i);
        const unsigned int w[4] = {u.x, u.y, u.z, u.w};
#pragma unroll
        for (int k = 0; k < 4; k++) {
            out[2 * k] = __uint_as_float(w[k] << 16);
            out[2 * k + 1] = __uint_as_float(w[k] & 0xffff0000u);
        }
    }
    __device__ static void store(unsigned short* p, index_t i, const float* v) {
        *reinterpret_cast<uint4*>(p + i) = make_uint4(pack_bf16(v[0], v[1]), pack_bf16(v[2], v[3]),
                                                      pack_bf16(v[4], v[5]), pack_bf16(v[6], v[7]));
    }
};
template <> struct Vec16<float> {
    static const int N = 4;
    __device__ static void load(const float* p, index_t i, float* out) {
        const float4 u = *reinterpret_cast<const float4*>(p + i);
        out[0] = u.x, out[1] = u.y, out[2] = u.z, out[3] = u.w;
    }
    __device__ static void store(float* p, index_t i, const float* v) {
        *reinterpret_cast<float4*>(p + i) = make_float4(v[0], v[1], v[2], v[3]);
    }
};

__device__ __forceinline__ bool aligned16(const void* p) {
    return (reinterpret_cast<unsigned long long>(p) & 15ull) == 0;
}

// 2^x on the special-function unit (what exp2f becomes under --use_fast_math; the scores are far
// from the denormal range where the two differ).
__device__ __forceinline__ float fast_exp2(float x) {
    float y;
    asm("ex2.approx.ftz.f32 %0, %1;\n" : "=f"(y) : "f"(x));
    return y;
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

