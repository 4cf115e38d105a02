// RMSNorm, SwiGLU and RoPE, forward and backward, one pass each (see ../elementwise.rs for the
// formulas). Statistics and arithmetic in f32; inputs and outputs in the activation type T
// (float, or bf16 as unsigned short), rounded where the tensor-op formulas round.
// Helpers (bf16 conversion, loads, stores, warp sums) are in common.cu.

#define ROWS_PER_BLOCK (BLOCK / 32)

// One warp per row of `dim`: out = round(x / rms(x)) * w.
template <typename T>
__device__ void rms_norm_rows(const T* x, const T* w, T* out, int rows, int dim, float eps) {
    const int row = blockIdx.x * ROWS_PER_BLOCK + threadIdx.x / 32, lane = threadIdx.x % 32;
    if (row >= rows) return;
    const T* xr = x + (index_t)row * dim;
    T* yr = out + (index_t)row * dim;
    float squares = 0.0f;
    for (int i = lane; i < dim; i += 32) {
        const float v = load(xr, i);
        squares += v * v;
    }
    const float inv = 1.0f / sqrtf(warp_sum(squares) / dim + eps);
    for (int i = lane; i < dim; i += 32) store(yr, i, round_as(load(xr, i) * inv, xr) * load(w, i));
}

// With x̂ = x / rms(x) and g = round(grad * w): dx = (g - x̂ · mean(g x̂)) / rms(x).
template <typename T>
__device__ void rms_norm_grad_rows(const T* x, const T* w, const T* grad, T* dx, int rows,
                                   int dim, float eps) {
    const int row = blockIdx.x * ROWS_PER_BLOCK + threadIdx.x / 32, lane = threadIdx.x % 32;
    if (row >= rows) return;
    const index_t at = (index_t)row * dim;
    const T *xr = x + at, *gr = grad + at;
    T* dxr = dx + at;
    float squares = 0.0f;
    for (int i = lane; i < dim; i += 32) {
        const float v = load(xr, i);
        squares += v * v;
    }
    const float inv = 1.0f / sqrtf(warp_sum(squares) / dim + eps);
    float dot = 0.0f;
    for (int i = lane; i < dim; i += 32) dot += round_as(load(gr, i) * load(w, i), xr) * load(xr, i);
    const float mean_dot = warp_sum(dot) * inv / dim;
    for (int i = lane; i < dim; i += 32) {
        const float g = round_as(load(gr, i) * load(w, i), xr);
        store(dxr, i, (g - load(xr, i) * inv * mean_dot) * inv);
    }
}

#define GRID_STRIDE(i, n) \
    for (index_t i = (index_t)blockIdx.x * BLOCK + threadIdx.x; i < (n); i += (index_t)gridDim.x * BLOCK)

// out = round(silu(gate)) * up
template <typename T>
__device__ void swiglu(const T* gate, const T* up, T* out, index_t n) {
    GRID_STRIDE(i, n) {
        const float g = load(gate, i);
        store(out, i, round_as(g / (1.0f + expf(-g)), gate) * load(up, i));
    }
}

// With s = sigmoid(gate): d_up = grad · gate · s, d_gate = grad · up · s (1 + gate (1 - s)).
template <typename T>
__device__ void swiglu_grads(const T* gate, const T* up, const T* grad, T* d_gate, T* d_up,
                             index_t n) {
    GRID_STRIDE(i, n) {
        const float g = load(gate, i), dy = load(grad, i);
        const float s = 1.0f / (1.0f + expf(-g));
        store(d_up, i, dy * g * s);
        store(d_gate, i, dy * load(up, i) * s * (1.0f + g * (1.0f - s)));
    }
}

// x: [batch, heads, seq, dim] read through its strides (elements); out: the same, contiguous.
// cos, sin: f32 [seq, dim]. out = x cos + sign · rotate_half(x) sin, rotate_half(x) = [-x2, x1];
// sign = -1 rotates back.
template <typename T>
__device__ void rope(const T* x, T* out, const float* cos, const float* sin, int heads, int seq,
                     int dim, long long stride_b, long long stride_h, long long stride_t,
                     long long stride_d, index_t n, float sign) {
    const int half = dim / 2;
    GRID_STRIDE(i, n) {
        const int d = (int)(i % dim);
        index_t r = i / dim;
        const int t = (int)(r % seq);
        r /= seq;
        const int h = (int)(r % heads);
        const index_t b = r / heads;
        const T* xr = x + (long long)b * stride_b + h * stride_h + t * stride_t;
        const float v = load(xr, (index_t)(d * stride_d));
        const float partner = d < half ? -load(xr, (index_t)((d + half) * stride_d))
                                       : load(xr, (index_t)((d - half) * stride_d));
        const index_t tab = (index_t)t * dim + d;
        store(out, i, v * cos[tab] + sign * partner * sin[tab]);
    }
}

extern "C" __global__ void rms_norm_rows_bf16(const unsigned short* x, const unsigned short* w,
                                              unsigned short* out, int rows, int dim, float eps) {
    rms_norm_rows(x, w, out, rows, dim, eps);
}
extern "C" __global__ void rms_norm_rows_f32(const float* x, const float* w, float* out, int rows,
                                             int dim, float eps) {
    rms_norm_rows(x, w, out, rows, dim, eps);
}
extern "C" __global__ void rms_norm_grad_rows_bf16(const unsigned short* x, const unsigned short* w,
                                                   const unsigned short* grad, unsigned short* dx,
                                                   int rows, int dim, float eps) {
    rms_norm_grad_rows(x, w, grad, dx, rows, dim, eps);
}
extern "C" __global__ void rms_norm_grad_rows_f32(const float* x, const float* w, const float* grad,
                                                  float* dx, int rows, int dim, float eps) {
    rms_norm_grad_rows(x, w, grad, dx, rows, dim, eps);
}
extern "C" __global__ void swiglu_bf16(const unsigned short* gate, const unsigned short* up,
                                       unsigned short* out, index_t n) {
    swiglu(gate, up, out, n);
}
extern "C" __global__ void swiglu_f32(const float* gate, const float* up, float* out, index_t n) {
    swiglu(gate, up, out, n);
}
extern "C" __global__ void swiglu_grads_bf16(const unsigned short* gate, const unsigned short* up,
                                             const unsigned short* grad, unsigned short* d_gate,
                                             unsigned short* d_up, index_t n) {
    swiglu_grads(gate, up, grad, d_gate, d_up, n);
}
extern "C" __global__ void swiglu_grads_f32(const float* gate, const float* up, const float* grad,
                                            float* d_gate, float* d_up, index_t n) {
    swiglu_grads(gate, up, grad, d_gate, d_up, n);
}
extern "C" __global__ void rope_bf16(const unsigned short* x, unsigned short* out, const float* cos,
                                     const float* sin, int heads, int seq, int dim,
                                     long long stride_b, long long stride_h, long long stride_t,
                                     long long stride_d, index_t n, float sign) {
    rope(x, out, cos, sin, heads, seq, dim, stride_b, stride_h, stride_t, stride_d, n, sign);
}
extern "C" __global__ void rope_f32(const float* x, float* out, const float* cos, const float* sin,
                                    int heads, int seq, int dim, long long stride_b,
                                    long long stride_h, long long stride_t, long long stride_d,
                                    index_t n, float sign) {
    rope(x, out, cos, sin, heads, seq, dim, stride_b, stride_h, stride_t, stride_d, n, sign);
}
