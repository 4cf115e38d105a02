// RMSNorm, SwiGLU, RoPE and the per-token distillation KL, forward and backward (see
// ../elementwise.rs for the formulas). Statistics and arithmetic in f32; inputs and outputs in the activation type T
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

// The distillation KL per token, KL(p_s ‖ p_t) = Σ_v p_s,v (log p_s,v - log p_t,v) with
// p = softmax over the vocabulary, in f32 from logits in T; one block per row. Its student
// gradient, g · p_s,j (log p_s,j - log p_t,j - KL), recomputes the row's statistics (a third
// sweep) instead of keeping anything: the logits are the only saved state.

// Running (max, sum of exp(x - max)), merged across threads.
struct LogSumExp {
    float max, sum;
};

__device__ __forceinline__ LogSumExp lse_merge(LogSumExp a, LogSumExp b) {
    const float m = fmaxf(a.max, b.max);
    if (m == NEG_INF) return a;
    return {m, a.sum * expf(a.max - m) + b.sum * expf(b.max - m)};
}

// One element into a running (max, sum): a single exp per element. A -inf logit adds nothing
// (without the test, -inf - -inf would make the sum NaN).
__device__ __forceinline__ void lse_add(LogSumExp& a, float x) {
    if (x == NEG_INF) return;
    if (x > a.max) {
        a.sum = a.sum * expf(a.max - x) + 1.0f;
        a.max = x;
    } else {
        a.sum += expf(x - a.max);
    }
}

__device__ LogSumExp block_lse(LogSumExp v, float* shared) {
    for (int o = 16; o > 0; o >>= 1)
        v = lse_merge(v, {__shfl_xor_sync(0xffffffffu, v.max, o),
                          __shfl_xor_sync(0xffffffffu, v.sum, o)});
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    if (lane == 0) {
        shared[2 * warp] = v.max;
        shared[2 * warp + 1] = v.sum;
    }
    __syncthreads();
    LogSumExp all = {NEG_INF, 0.0f};
    for (int w = 0; w < BLOCK / 32; w++) all = lse_merge(all, {shared[2 * w], shared[2 * w + 1]});
    __syncthreads();
    return all;
}

// log Σ exp over the row of s and of t, then the row's KL: what both kernels start with.
template <typename T>
__device__ void row_kl(const T* s, const T* t, int vocab, float* shared, float* lse_s,
                       float* lse_t, float* kl) {
    LogSumExp ls = {NEG_INF, 0.0f}, lt = {NEG_INF, 0.0f};
    for (int v = threadIdx.x; v < vocab; v += BLOCK) {
        lse_add(ls, load(s, v));
        lse_add(lt, load(t, v));
    }
    ls = block_lse(ls, shared);
    lt = block_lse(lt, shared);
    *lse_s = ls.max + logf(ls.sum);
    *lse_t = lt.max + logf(lt.sum);
    float sum = 0.0f;
    for (int v = threadIdx.x; v < vocab; v += BLOCK) {
        const float log_s = load(s, v) - *lse_s, p = expf(log_s);
        // Tokens the student gives no probability (a -inf logit) contribute 0, not 0 · inf.
        if (p > 0.0f) sum += p * (log_s - (load(t, v) - *lse_t));
    }
    *kl = block_reduce(sum, false, shared);
}

template <typename T>
__device__ void kl_rows(const T* student, const T* teacher, float* kl, int vocab) {
    __shared__ float shared[2 * BLOCK / 32];
    const index_t at = (index_t)blockIdx.x * vocab;
    float lse_s, lse_t, row;
    row_kl(student + at, teacher + at, vocab, shared, &lse_s, &lse_t, &row);
    if (threadIdx.x == 0) kl[blockIdx.x] = row;
}

template <typename T>
__device__ void kl_student_grad_rows(const T* student, const T* teacher, const float* grad,
                                     T* d_student, int vocab) {
    __shared__ float shared[2 * BLOCK / 32];
    const index_t at = (index_t)blockIdx.x * vocab;
    const T *s = student + at, *t = teacher + at;
    float lse_s, lse_t, kl;
    row_kl(s, t, vocab, shared, &lse_s, &lse_t, &kl);
    const float g = grad[blockIdx.x];
    for (int v = threadIdx.x; v < vocab; v += BLOCK) {
        const float log_s = load(s, v) - lse_s, p = expf(log_s);
        store(d_student + at, v, p > 0.0f ? g * p * (log_s - (load(t, v) - lse_t) - kl) : 0.0f);
    }
}

extern "C" __global__ void kl_rows_bf16(const unsigned short* student, const unsigned short* teacher,
                                        float* kl, int vocab) {
    kl_rows(student, teacher, kl, vocab);
}
extern "C" __global__ void kl_rows_f32(const float* student, const float* teacher, float* kl,
                                       int vocab) {
    kl_rows(student, teacher, kl, vocab);
}
extern "C" __global__ void kl_student_grad_rows_bf16(const unsigned short* student,
                                                     const unsigned short* teacher,
                                                     const float* grad, unsigned short* d_student,
                                                     int vocab) {
    kl_student_grad_rows(student, teacher, grad, d_student, vocab);
}
extern "C" __global__ void kl_student_grad_rows_f32(const float* student, const float* teacher,
                                                    const float* grad, float* d_student,
                                                    int vocab) {
    kl_student_grad_rows(student, teacher, grad, d_student, vocab);
}
