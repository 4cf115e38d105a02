// RMSNorm, SwiGLU, RoPE and the per-token distillation KL, forward and backward (see
// ../elementwise.rs for the formulas). Statistics and arithmetic in f32; inputs and outputs in the activation type T
// (float, or bf16 as unsigned short), rounded where the tensor-op formulas round.
// Helpers (bf16 conversion, loads, stores, warp sums) are in common.cu.

#define ROWS_PER_BLOCK (BLOCK / 32)

// Each kernel below has a 16-byte path (Vec16: the sizes are multiples of its width and every
// pointer is 16-byte aligned, as contiguous bf16 / f32 tensors of the models' sizes are) and a
// per-value one for anything else; both compute the same values.

// Whether n values of T from each pointer can go 16 bytes at a time.
template <typename T>
__device__ __forceinline__ bool vectorises(index_t n, const void* a, const void* b = 0,
                                           const void* c = 0, const void* d = 0,
                                           const void* e = 0) {
    return n % Vec16<T>::N == 0 && aligned16(a) && aligned16(b) && aligned16(c) && aligned16(d) &&
           aligned16(e);
}

// Σ x² over one row, by one warp.
template <typename T>
__device__ __forceinline__ float row_squares(const T* xr, int dim, bool vec, int lane) {
    float squares = 0.0f;
    if (vec) {
        const int N = Vec16<T>::N;
#pragma unroll 4
        for (int i = lane * N; i < dim; i += 32 * N) {
            float v[N];
            Vec16<T>::load(xr, i, v);
#pragma unroll
            for (int k = 0; k < N; k++) squares += v[k] * v[k];
        }
    } else {
        for (int i = lane; i < dim; i += 32) {
            const float v = load(xr, i);
            squares += v * v;
        }
    }
    return warp_sum(squares);
}

// NORM_SHORT_ROWS=0 (a define for scripts/elementwise-kernels.py) times the per-warp path alone.
#ifndef NORM_SHORT_ROWS
#define NORM_SHORT_ROWS 1
#endif

// Lanes per row where each lane can hold one 16-byte vector of a row (dim = lanes · N, lanes a
// power of two <= 32: the q / k norms over head_dim 64 or 128), else 0 (rows swept by a warp).
template <typename T>
__device__ __forceinline__ int lanes_per_row(int dim, bool vec) {
    const int lanes = dim / Vec16<T>::N;
    return NORM_SHORT_ROWS && vec && lanes <= 32 && (lanes & (lanes - 1)) == 0 ? lanes : 0;
}

// Σ over each aligned group of `lanes` lanes (a power of two).
__device__ __forceinline__ float group_sum(float v, int lanes) {
    for (int o = lanes / 2; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

// The rows of a warp and the stride between its turns: 32 / lanes rows at a time where rows are
// held in registers, else one; warps stride over the rows, so any grid covers them.
#define WARP_ROWS(first, rows, per_warp)                                                      \
    for (index_t first = ((index_t)blockIdx.x * ROWS_PER_BLOCK + threadIdx.x / 32) * (per_warp); \
         first < (rows); first += (index_t)gridDim.x * ROWS_PER_BLOCK * (per_warp))

// out = round(x / rms(x)) * w over rows of `dim`.
template <typename T>
__device__ void rms_norm_rows(const T* x, const T* w, T* out, int rows, int dim, float eps) {
    const int lane = threadIdx.x % 32, N = Vec16<T>::N;
    const bool vec = vectorises<T>(dim, x, w, out);
    const int lanes = lanes_per_row<T>(dim, vec);
    if (lanes) {
        // Short rows in registers: one load of each value, no loop per row.
        const int i = (lane % lanes) * N;
        float wv[N];
        Vec16<T>::load(w, i, wv);
        WARP_ROWS(first, rows, 32 / lanes) {
            const index_t row = first + lane / lanes;
            const bool live = row < rows;  // all lanes take part in the sums
            float v[N], squares = 0.0f;
            if (live) Vec16<T>::load(x + row * dim, i, v);
#pragma unroll
            for (int k = 0; k < N; k++) {
                if (!live) v[k] = 0.0f;
                squares += v[k] * v[k];
            }
            const float inv = 1.0f / sqrtf(group_sum(squares, lanes) / dim + eps);
            if (!live) continue;
#pragma unroll
            for (int k = 0; k < N; k++) v[k] = round_as(v[k] * inv, x) * wv[k];
            Vec16<T>::store(out + row * dim, i, v);
        }
        return;
    }
    WARP_ROWS(row, rows, 1) {
        const T* xr = x + row * dim;
        T* yr = out + row * dim;
        const float inv = 1.0f / sqrtf(row_squares(xr, dim, vec, lane) / dim + eps);
        if (vec) {
#pragma unroll 4
            for (int i = lane * N; i < dim; i += 32 * N) {
                float v[N], wv[N];
                Vec16<T>::load(xr, i, v);
                Vec16<T>::load(w, i, wv);
#pragma unroll
                for (int k = 0; k < N; k++) v[k] = round_as(v[k] * inv, xr) * wv[k];
                Vec16<T>::store(yr, i, v);
            }
        } else {
            for (int i = lane; i < dim; i += 32)
                store(yr, i, round_as(load(xr, i) * inv, xr) * load(w, i));
        }
    }
}

// With x̂ = x / rms(x) and g = round(grad * w): dx = (g - x̂ · mean(g x̂)) / rms(x).
template <typename T>
__device__ void rms_norm_grad_rows(const T* x, const T* w, const T* grad, T* dx, int rows,
                                   int dim, float eps) {
    const int lane = threadIdx.x % 32, N = Vec16<T>::N;
    const bool vec = vectorises<T>(dim, x, w, grad, dx);
    const int lanes = lanes_per_row<T>(dim, vec);
    if (lanes) {
        const int i = (lane % lanes) * N;
        float wv[N];
        Vec16<T>::load(w, i, wv);
        WARP_ROWS(first, rows, 32 / lanes) {
            const index_t row = first + lane / lanes;
            const bool live = row < rows;
            float v[N], g[N], squares = 0.0f, dot = 0.0f;
            if (live) {
                Vec16<T>::load(x + row * dim, i, v);
                Vec16<T>::load(grad + row * dim, i, g);
            }
#pragma unroll
            for (int k = 0; k < N; k++) {
                if (!live) v[k] = g[k] = 0.0f;
                g[k] = round_as(g[k] * wv[k], x);
                squares += v[k] * v[k];
                dot += g[k] * v[k];
            }
            const float inv = 1.0f / sqrtf(group_sum(squares, lanes) / dim + eps);
            const float mean_dot = group_sum(dot, lanes) * inv / dim;
            if (!live) continue;
#pragma unroll
            for (int k = 0; k < N; k++) v[k] = (g[k] - v[k] * inv * mean_dot) * inv;
            Vec16<T>::store(dx + row * dim, i, v);
        }
        return;
    }
    WARP_ROWS(row, rows, 1) {
        const index_t at = row * dim;
        const T *xr = x + at, *gr = grad + at;
        T* dxr = dx + at;
        const float inv = 1.0f / sqrtf(row_squares(xr, dim, vec, lane) / dim + eps);
        float dot = 0.0f;
        if (vec) {
#pragma unroll 4
            for (int i = lane * N; i < dim; i += 32 * N) {
                float v[N], wv[N], gv[N];
                Vec16<T>::load(xr, i, v);
                Vec16<T>::load(w, i, wv);
                Vec16<T>::load(gr, i, gv);
#pragma unroll
                for (int k = 0; k < N; k++) dot += round_as(gv[k] * wv[k], xr) * v[k];
            }
        } else {
            for (int i = lane; i < dim; i += 32)
                dot += round_as(load(gr, i) * load(w, i), xr) * load(xr, i);
        }
        const float mean_dot = warp_sum(dot) * inv / dim;
        if (vec) {
#pragma unroll 4
            for (int i = lane * N; i < dim; i += 32 * N) {
                float v[N], wv[N], gv[N];
                Vec16<T>::load(xr, i, v);
                Vec16<T>::load(w, i, wv);
                Vec16<T>::load(gr, i, gv);
#pragma unroll
                for (int k = 0; k < N; k++)
                    v[k] = (round_as(gv[k] * wv[k], xr) - v[k] * inv * mean_dot) * inv;
                Vec16<T>::store(dxr, i, v);
            }
        } else {
            for (int i = lane; i < dim; i += 32) {
                const float g = round_as(load(gr, i) * load(w, i), xr);
                store(dxr, i, (g - load(xr, i) * inv * mean_dot) * inv);
            }
        }
    }
}

#define GRID_STRIDE(i, n) \
    for (index_t i = (index_t)blockIdx.x * BLOCK + threadIdx.x; i < (n); i += (index_t)gridDim.x * BLOCK)

// 1 / (1 + exp(-g)) with exp on the special-function unit (inf for g < ~-88, giving 0).
__device__ __forceinline__ float sigmoid(float g) { return 1.0f / (1.0f + fast_exp2(-g * LOG2E)); }

// out = round(silu(gate)) * up
template <typename T>
__device__ void swiglu(const T* gate, const T* up, T* out, index_t n) {
    if (vectorises<T>(n, gate, up, out)) {
        const int N = Vec16<T>::N;
        GRID_STRIDE(j, n / N) {
            float g[N], u[N];
            Vec16<T>::load(gate, j * N, g);
            Vec16<T>::load(up, j * N, u);
#pragma unroll
            for (int k = 0; k < N; k++) g[k] = round_as(g[k] * sigmoid(g[k]), gate) * u[k];
            Vec16<T>::store(out, j * N, g);
        }
    } else {
        GRID_STRIDE(i, n) {
            const float g = load(gate, i);
            store(out, i, round_as(g * sigmoid(g), gate) * load(up, i));
        }
    }
}

// With s = sigmoid(gate): d_up = grad · gate · s, d_gate = grad · up · s (1 + gate (1 - s)).
template <typename T>
__device__ void swiglu_grads(const T* gate, const T* up, const T* grad, T* d_gate, T* d_up,
                             index_t n) {
    if (vectorises<T>(n, gate, up, grad, d_gate, d_up)) {
        const int N = Vec16<T>::N;
        GRID_STRIDE(j, n / N) {
            float g[N], u[N], dy[N];
            Vec16<T>::load(gate, j * N, g);
            Vec16<T>::load(up, j * N, u);
            Vec16<T>::load(grad, j * N, dy);
#pragma unroll
            for (int k = 0; k < N; k++) {
                const float s = sigmoid(g[k]);
                const float dg = dy[k] * u[k] * s * (1.0f + g[k] * (1.0f - s));
                u[k] = dy[k] * g[k] * s;
                g[k] = dg;
            }
            Vec16<T>::store(d_gate, j * N, g);
            Vec16<T>::store(d_up, j * N, u);
        }
    } else {
        GRID_STRIDE(i, n) {
            const float g = load(gate, i), dy = load(grad, i);
            const float s = sigmoid(g);
            store(d_up, i, dy * g * s);
            store(d_gate, i, dy * load(up, i) * s * (1.0f + g * (1.0f - s)));
        }
    }
}

// N f32 values from a 16-byte aligned address.
template <int N>
__device__ __forceinline__ void load_f32s(const float* p, float* out) {
#pragma unroll
    for (int k = 0; k < N; k += 4) Vec16<float>::load(p, k, out + k);
}

// x: [batch, heads, seq, dim] read through its strides (elements); out: the same, contiguous.
// cos, sin: f32 [seq, dim]. out = x cos + sign · rotate_half(x) sin, rotate_half(x) = [-x2, x1];
// sign = -1 rotates back. Where the last axis is unit-stride and rows are 16-byte aligned, each
// thread rotates N values of the first half together with their N partners in the second (one
// index decomposition per 2N values; the per-value path divides per value).
template <typename T>
__device__ void rope(const T* x, T* out, const float* cos, const float* sin, int heads, int seq,
                     int dim, long long stride_b, long long stride_h, long long stride_t,
                     long long stride_d, index_t n, float sign) {
    const int half = dim / 2;
    const int N = Vec16<T>::N;
    const bool vec = stride_d == 1 && half % N == 0 && stride_t % N == 0 && stride_h % N == 0 &&
                     stride_b % N == 0 && aligned16(x) && aligned16(out) && aligned16(cos) &&
                     aligned16(sin);
    if (vec) {
        const int chunks = half / N;
        GRID_STRIDE(j, n / (2 * N)) {
            const int c = (int)(j % chunks);
            index_t r = j / chunks;  // the row (b, h, t) in out's order
            const int t = (int)(r % seq);
            const index_t bh = r / seq;
            const int h = (int)(bh % heads);
            const index_t b = bh / heads;
            const T* xr = x + (long long)b * stride_b + h * stride_h + t * stride_t;
            const int d = c * N;
            float x1[N], x2[N], c1[N], c2[N], s1[N], s2[N];
            Vec16<T>::load(xr, d, x1);
            Vec16<T>::load(xr, d + half, x2);
            const index_t tab = (index_t)t * dim + d;
            load_f32s<N>(cos + tab, c1);
            load_f32s<N>(cos + tab + half, c2);
            load_f32s<N>(sin + tab, s1);
            load_f32s<N>(sin + tab + half, s2);
            float o1[N], o2[N];
#pragma unroll
            for (int k = 0; k < N; k++) {
                o1[k] = x1[k] * c1[k] - sign * x2[k] * s1[k];
                o2[k] = x2[k] * c2[k] + sign * x1[k] * s2[k];
            }
            T* orow = out + r * dim;
            Vec16<T>::store(orow, d, o1);
            Vec16<T>::store(orow, d + half, o2);
        }
        return;
    }
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

// The attention backward's row term delta = Σ_d dO · O (f32) over rows of [batch, heads, q_len]
// (written contiguous), one warp per row. dO and O are read through their strides (batch, head,
// row; each row's dim values contiguous): the flash forward writes O token-major and dO arrives
// as the output projection's token-major gradient, so neither is copied to [B, H, T, D] first.
template <typename T>
__device__ void attention_delta_rows(const T* grad, const T* out, float* delta, int heads,
                                     int q_len, int dim, long long grad_b, long long grad_h,
                                     long long grad_t, long long out_b, long long out_h,
                                     long long out_t, index_t rows) {
    const int lane = threadIdx.x % 32, N = Vec16<T>::N;
    WARP_ROWS(row, rows, 1) {
        const int t = (int)(row % q_len);
        const index_t bh = row / q_len;
        const int h = (int)(bh % heads);
        const index_t b = bh / heads;
        const T* g = grad + b * grad_b + h * grad_h + t * grad_t;
        const T* o = out + b * out_b + h * out_h + t * out_t;
        float sum = 0.0f;
        if (vectorises<T>(dim, g, o)) {
            for (int i = lane * N; i < dim; i += 32 * N) {
                float gv[N], ov[N];
                Vec16<T>::load(g, i, gv);
                Vec16<T>::load(o, i, ov);
#pragma unroll
                for (int k = 0; k < N; k++) sum += gv[k] * ov[k];
            }
        } else {
            for (int i = lane; i < dim; i += 32) sum += load(g, i) * load(o, i);
        }
        sum = warp_sum(sum);
        if (lane == 0) delta[row] = sum;
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

extern "C" __global__ void attention_delta_rows_bf16(
    const unsigned short* grad, const unsigned short* out, float* delta, int heads, int q_len,
    int dim, long long grad_b, long long grad_h, long long grad_t, long long out_b, long long out_h,
    long long out_t, index_t rows) {
    attention_delta_rows(grad, out, delta, heads, q_len, dim, grad_b, grad_h, grad_t, out_b, out_h,
                         out_t, rows);
}
extern "C" __global__ void attention_delta_rows_f32(const float* grad, const float* out,
                                                    float* delta, int heads, int q_len, int dim,
                                                    long long grad_b, long long grad_h,
                                                    long long grad_t, long long out_b,
                                                    long long out_h, long long out_t, index_t rows) {
    attention_delta_rows(grad, out, delta, heads, q_len, dim, grad_b, grad_h, grad_t, out_b, out_h,
                         out_t, rows);
}

// The distillation KL per token, KL(p_s ‖ p_t) = Σ_v p_s,v (log p_s,v - log p_t,v) with
// p = softmax over the vocabulary, in f32 from logits in T; one block per row. One sweep over the
// row: with e_v = exp(s_v - max_s),
//   KL = (Σ e_v (s_v - t_v)) / (Σ e_v) - lse_s + lse_t,
// so the running state is the two (max, Σ exp) pairs and Σ e_v (s_v - t_v), rescaled with the
// student's sum whenever its max grows. The student gradient, g · p_s,j (log p_s,j - log p_t,j -
// KL), repeats that sweep and writes in a second one: the logits are the only saved state. Rows
// are read 16 bytes at a time where the vocabulary and the pointers allow (the logits are ~1 GB
// per pass at Qwen's 151,936-token vocabulary, so the kernels are bound by memory bandwidth).

struct KlState {
    float max_s, sum_s, cross;  // student max, Σ exp(s - max_s), Σ exp(s - max_s) (s - t)
    float max_t, sum_t;         // teacher max, Σ exp(t - max_t)
};

// The larger of a and b, NaN if either is (fmaxf would drop it: a NaN logit must reach the sums).
__device__ __forceinline__ float max_keeping_nan(float a, float b) {
    return (b > a || b != b) ? b : a;
}

// Adds N logits of each row. Entries with s = -inf add nothing to either student sum (no 0 · inf).
// A NaN logit makes the block's maximum NaN, so its exponentials, and the row's sums, are NaN.
template <int N>
__device__ __forceinline__ void kl_add(KlState& st, const float* s, const float* t) {
    float ms = st.max_s, mt = st.max_t;
#pragma unroll
    for (int i = 0; i < N; i++) {
        ms = max_keeping_nan(ms, s[i]);
        mt = max_keeping_nan(mt, t[i]);
    }
    if (ms != NEG_INF) {
        if (ms > st.max_s) {
            const float c = fast_exp2((st.max_s - ms) * LOG2E);
            st.sum_s *= c;
            st.cross = c > 0.0f ? st.cross * c : 0.0f;
            st.max_s = ms;
        }
#pragma unroll
        for (int i = 0; i < N; i++) {
            const float e = fast_exp2((s[i] - ms) * LOG2E);
            st.sum_s += e;
            if (e > 0.0f) st.cross += e * (s[i] - t[i]);
        }
    }
    if (mt != NEG_INF) {
        if (mt > st.max_t) {
            st.sum_t *= fast_exp2((st.max_t - mt) * LOG2E);
            st.max_t = mt;
        }
#pragma unroll
        for (int i = 0; i < N; i++) st.sum_t += fast_exp2((t[i] - mt) * LOG2E);
    }
}

__device__ __forceinline__ KlState kl_merge(KlState a, KlState b) {
    KlState r;
    r.max_s = fmaxf(a.max_s, b.max_s);
    r.max_t = fmaxf(a.max_t, b.max_t);
    // Both maxima -inf: the sums are 0, or NaN from a NaN logit, which the sum keeps.
    if (r.max_s == NEG_INF) {
        r.sum_s = a.sum_s + b.sum_s;
        r.cross = a.cross + b.cross;
    } else {
        const float ca = fast_exp2((a.max_s - r.max_s) * LOG2E);
        const float cb = fast_exp2((b.max_s - r.max_s) * LOG2E);
        r.sum_s = a.sum_s * ca + b.sum_s * cb;
        r.cross = (ca > 0.0f ? a.cross * ca : 0.0f) + (cb > 0.0f ? b.cross * cb : 0.0f);
    }
    r.sum_t = r.max_t == NEG_INF ? a.sum_t + b.sum_t
                                 : a.sum_t * fast_exp2((a.max_t - r.max_t) * LOG2E) +
                                       b.sum_t * fast_exp2((b.max_t - r.max_t) * LOG2E);
    return r;
}

__device__ __forceinline__ KlState kl_shfl(KlState v, int o) {
    return {__shfl_xor_sync(0xffffffffu, v.max_s, o), __shfl_xor_sync(0xffffffffu, v.sum_s, o),
            __shfl_xor_sync(0xffffffffu, v.cross, o), __shfl_xor_sync(0xffffffffu, v.max_t, o),
            __shfl_xor_sync(0xffffffffu, v.sum_t, o)};
}

// The row's log Σ exp of s, that minus t's, and its KL: what both kernels start with.
template <typename T>
__device__ void row_kl(const T* s, const T* t, int vocab, bool vectorised, float* lse_s,
                       float* lse_diff, float* kl) {
    __shared__ float shared[5 * BLOCK / 32];
    KlState st = {NEG_INF, 0.0f, 0.0f, NEG_INF, 0.0f};
    if (vectorised) {
        const int N = Vec16<T>::N;
        for (int v = threadIdx.x * N; v < vocab; v += BLOCK * N) {
            float sv[N], tv[N];
            Vec16<T>::load(s, v, sv);
            Vec16<T>::load(t, v, tv);
            kl_add<N>(st, sv, tv);
        }
    } else {
        for (int v = threadIdx.x; v < vocab; v += BLOCK) {
            const float sv = load(s, v), tv = load(t, v);
            kl_add<1>(st, &sv, &tv);
        }
    }
    for (int o = 16; o > 0; o >>= 1) st = kl_merge(st, kl_shfl(st, o));
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    if (lane == 0) {
        float* w = shared + 5 * warp;
        w[0] = st.max_s, w[1] = st.sum_s, w[2] = st.cross, w[3] = st.max_t, w[4] = st.sum_t;
    }
    __syncthreads();
    KlState all = {NEG_INF, 0.0f, 0.0f, NEG_INF, 0.0f};
    for (int k = 0; k < BLOCK / 32; k++) {
        const float* w = shared + 5 * k;
        all = kl_merge(all, {w[0], w[1], w[2], w[3], w[4]});
    }
    *lse_s = all.max_s + logf(all.sum_s);
    // Not lse_s - lse_t: each is ~16 at Qwen's vocabulary, so their difference loses ~1e-6, which
    // is 3e-4 of the KL of a student near its teacher (KL ~4e-3); this loses ~1e-7.
    *lse_diff = (all.max_s - all.max_t) + logf(all.sum_s / all.sum_t);
    *kl = all.cross / all.sum_s - *lse_diff;
}

template <typename T>
__device__ void kl_rows(const T* student, const T* teacher, float* kl, int vocab) {
    const index_t at = (index_t)blockIdx.x * vocab;
    // Rows of `vocab` values from 16-byte aligned starts: every row start is aligned too.
    const bool vectorised = vectorises<T>(vocab, student, teacher);
    float lse_s, lse_diff, row;
    row_kl(student + at, teacher + at, vocab, vectorised, &lse_s, &lse_diff, &row);
    if (threadIdx.x == 0) kl[blockIdx.x] = row;
}

// g · p_s (log p_s - log p_t - KL) of one logit pair; 0 where p_s is 0 (a -inf student logit),
// NaN throughout a row with a NaN logit (p is NaN there, as burn's ops give).
__device__ __forceinline__ float kl_grad(float s, float t, float g, float lse_s, float lse_diff,
                                         float kl) {
    const float log_s = s - lse_s, p = fast_exp2(log_s * LOG2E);
    return p == 0.0f ? 0.0f : g * p * ((s - t) - lse_diff - kl);
}

template <typename T>
__device__ void kl_student_grad_rows(const T* student, const T* teacher, const float* grad,
                                     T* d_student, int vocab) {
    const index_t at = (index_t)blockIdx.x * vocab;
    const T *s = student + at, *t = teacher + at;
    T* d = d_student + at;
    const bool vectorised = vectorises<T>(vocab, student, teacher, d_student);
    float lse_s, lse_diff, kl;
    row_kl(s, t, vocab, vectorised, &lse_s, &lse_diff, &kl);
    const float g = grad[blockIdx.x];
    if (vectorised) {
        const int N = Vec16<T>::N;
        for (int v = threadIdx.x * N; v < vocab; v += BLOCK * N) {
            float sv[N], tv[N], out[N];
            Vec16<T>::load(s, v, sv);
            Vec16<T>::load(t, v, tv);
#pragma unroll
            for (int i = 0; i < N; i++) out[i] = kl_grad(sv[i], tv[i], g, lse_s, lse_diff, kl);
            Vec16<T>::store(d, v, out);
        }
    } else {
        for (int v = threadIdx.x; v < vocab; v += BLOCK)
            store(d, v, kl_grad(load(s, v), load(t, v), g, lse_s, lse_diff, kl));
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
