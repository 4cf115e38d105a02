// Fused row softmax of one attention chunk, compiled at run time with NVRTC.
//
// scores: f32 [group, rows, keys], already scaled by 1/sqrt(head_dim) in the GEMM.
// For the query at position qpos = qpos0 + r, key j is visible when j <= qpos; the DMS key bias
// (f32, one value per key) is added when qpos - j > window. Writes the probabilities (0 for
// future keys) in the activation type, and the row's log-sum-exp.
// Helpers (bf16 conversion, stores, block reductions) are in common.cu.

template <typename P>
__device__ void softmax_rows(const float* scores, P* probs, float* lse, const float* bias,
                             int keys, int rows, int lse_stride, int qpos0, int window) {
    __shared__ float shared[BLOCK / 32];
    const int r = blockIdx.x, g = blockIdx.y;
    const index_t row = ((index_t)g * rows + r) * keys;
    const float* s = scores + row;
    P* p = probs + row;
    const int qpos = qpos0 + r;
    const int visible = imin(keys, qpos + 1);
    float m = NEG_INF;
    for (int j = threadIdx.x; j < visible; j += BLOCK) {
        float v = s[j] + ((bias != 0 && qpos - j > window) ? bias[j] : 0.0f);
        m = fmaxf(m, v);
    }
    m = block_reduce(m, true, shared);
    float sum = 0.0f;
    for (int j = threadIdx.x; j < visible; j += BLOCK) {
        float v = s[j] + ((bias != 0 && qpos - j > window) ? bias[j] : 0.0f);
        sum += expf(v - m);
    }
    sum = block_reduce(sum, false, shared);
    const float inv = 1.0f / sum;
    for (int j = threadIdx.x; j < keys; j += BLOCK) {
        float out = 0.0f;
        if (j < visible) {
            float v = s[j] + ((bias != 0 && qpos - j > window) ? bias[j] : 0.0f);
            out = expf(v - m) * inv;
        }
        store(p, j, out);
    }
    if (threadIdx.x == 0) lse[(index_t)g * lse_stride + r] = m + logf(sum);
}

extern "C" __global__ void softmax_rows_bf16(const float* scores, unsigned short* probs, float* lse,
                                             const float* bias, int keys, int rows, int lse_stride,
                                             int qpos0, int window) {
    softmax_rows(scores, probs, lse, bias, keys, rows, lse_stride, qpos0, window);
}

extern "C" __global__ void softmax_rows_f32(const float* scores, float* probs, float* lse,
                                            const float* bias, int keys, int rows, int lse_stride,
                                            int qpos0, int window) {
    softmax_rows(scores, probs, lse, bias, keys, rows, lse_stride, qpos0, window);
}

// Backward of one chunk, per row (same geometry as softmax_rows). From the recomputed scores
// (f32, scaled), the saved log-sum-exp and delta_i = sum_d dO_id O_id:
//   p = exp(s + bias·[outside] - lse)   (0 for future keys)
//   ds = p · (dp - delta)
// `grad` holds dp on entry and ds (f32, for the key-bias gradient) on exit; `probs` and
// `grad_low` receive p and ds in the activation type for the gradient GEMMs.
template <typename P>
__device__ void attention_grad_rows(const float* scores, float* grad, P* probs, P* grad_low,
                                    const float* lse, const float* delta, const float* bias,
                                    int keys, int rows, int row_stride, int qpos0, int window) {
    const int r = blockIdx.x, g = blockIdx.y;
    const index_t row = ((index_t)g * rows + r) * keys;
    const int qpos = qpos0 + r;
    const int visible = imin(keys, qpos + 1);
    const float row_lse = lse[(index_t)g * row_stride + r];
    const float row_delta = delta[(index_t)g * row_stride + r];
    for (int j = threadIdx.x; j < keys; j += BLOCK) {
        float p = 0.0f, ds = 0.0f;
        if (j < visible) {
            float v = scores[row + j] + ((bias != 0 && qpos - j > window) ? bias[j] : 0.0f);
            p = expf(v - row_lse);
            ds = p * (grad[row + j] - row_delta);
        }
        grad[row + j] = ds;
        store(probs, row + j, p);
        store(grad_low, row + j, ds);
    }
}

extern "C" __global__ void attention_grad_rows_bf16(const float* scores, float* grad,
                                                    unsigned short* probs, unsigned short* grad_low,
                                                    const float* lse, const float* delta,
                                                    const float* bias, int keys, int rows,
                                                    int row_stride, int qpos0, int window) {
    attention_grad_rows(scores, grad, probs, grad_low, lse, delta, bias, keys, rows, row_stride,
                        qpos0, window);
}

extern "C" __global__ void attention_grad_rows_f32(const float* scores, float* grad, float* probs,
                                                   float* grad_low, const float* lse,
                                                   const float* delta, const float* bias, int keys,
                                                   int rows, int row_stride, int qpos0, int window) {
    attention_grad_rows(scores, grad, probs, grad_low, lse, delta, bias, keys, rows, row_stride,
                        qpos0, window);
}

// Key-bias gradient of one chunk: bias_grad[j] += sum over the group's rows r with
// qpos0 + r - j > window of ds[g, r, j]. Threads own key columns; blockIdx.y splits the rows.
extern "C" __global__ void bias_grad_columns(const float* grad, float* bias_grad, int keys,
                                             int rows, int groups, int qpos0, int window,
                                             int rows_per_split) {
    const int j = blockIdx.x * BLOCK + threadIdx.x;
    if (j >= keys) return;
    const int total = groups * rows;
    const int first = blockIdx.y * rows_per_split;
    const int last = imin(total, first + rows_per_split);
    float sum = 0.0f;
    for (int i = first; i < last; ++i) {
        const int r = i % rows;
        if (qpos0 + r - j > window) sum += grad[(index_t)i * keys + j];
    }
    if (sum != 0.0f) atomicAdd(bias_grad + j, sum);
}
