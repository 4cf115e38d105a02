// Flash-style attention forward for bf16 on tensor cores (mma.sync m16n8k16, sm_80+): one block
// of 4 warps per 64 query rows of one query head, each warp 16 rows; keys in tiles of 64 through
// shared memory; the scores stay in registers (online softmax), so no [rows, keys] tensor is
// written. Same definition as softmax_rows + the two GEMMs around it: scores scaled by `scale`,
// key j visible to the query at position qpos when j <= qpos, the DMS key bias added when
// qpos - j > window; writes the output and each row's log-sum-exp (the backward's input).
//
// Fragment layouts (PTX ISA, mma.m16n8k16 with .bf16): lane = 4 g + t;
//   A (16x16, row-major): regs {(g, 2t..2t+1), (g+8, 2t..), (g, 2t+8..), (g+8, 2t+8..)}
//   B (16x8, k x n):      regs {(k 2t..2t+1, n g), (k 2t+8.., n g)}
//   C (16x8, f32):        {(g, 2t), (g, 2t+1), (g+8, 2t), (g+8, 2t+1)}
// Two C tiles side by side are exactly the A fragment of the next product (P V).

#define FLASH_ROWS 64
#define FLASH_KEYS 64
#define FLASH_THREADS 128

__device__ __forceinline__ unsigned int pack_bf16(float lo, float hi) {
    return (unsigned int)f32_to_bf16(lo) | ((unsigned int)f32_to_bf16(hi) << 16);
}

__device__ __forceinline__ unsigned int load_pair(const unsigned short* p) {
    return *(const unsigned int*)p;
}

// c += a b
__device__ __forceinline__ void mma_bf16(float* c, const unsigned int* a, unsigned int b0,
                                         unsigned int b1) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
        "{%8,%9}, {%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

__device__ __forceinline__ float quad_max(float v) {
    v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, 1));
    return fmaxf(v, __shfl_xor_sync(0xffffffffu, v, 2));
}

__device__ __forceinline__ float quad_sum(float v) {
    v += __shfl_xor_sync(0xffffffffu, v, 1);
    return v + __shfl_xor_sync(0xffffffffu, v, 2);
}

// q, out: [batch, heads, q_len, D]; k, v: [batch, kv_heads, k_len, D]; bias: f32
// [batch, kv_heads, k_len] or null; lse: f32 [batch, heads, q_len]. Queries sit at positions
// offset .. offset + q_len, keys at 0 .. k_len.
template <int D>
__device__ void flash_forward(const unsigned short* q, const unsigned short* k,
                              const unsigned short* v, const float* bias, unsigned short* out,
                              float* lse, int heads, int kv_heads, int q_len, int k_len,
                              int offset, int window, float scale) {
    constexpr int KS = D + 8;           // padded K-tile row (halves): conflict-free B loads
    constexpr int VS = FLASH_KEYS + 8;  // padded row of the transposed V tile
    __shared__ __align__(16) unsigned short ks[FLASH_KEYS * KS];
    __shared__ __align__(16) unsigned short vt[D * VS];
    __shared__ float bias_tile[FLASH_KEYS];

    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    const int g = lane / 4, t = lane % 4;
    // The heaviest (last, under the causal mask) row blocks first.
    const int block = gridDim.x - 1 - blockIdx.x;
    const int h = blockIdx.y, b = blockIdx.z;
    const int kvh = h / (heads / kv_heads);
    const int row0 = block * FLASH_ROWS + warp * 16;
    const index_t q_head = ((index_t)b * heads + h) * q_len;
    const index_t kv_head = ((index_t)b * kv_heads + kvh) * k_len;
    const float* bias_head = bias ? bias + kv_head : 0;

    unsigned int qf[D / 16][4];
#pragma unroll
    for (int kk = 0; kk < D / 16; ++kk)
#pragma unroll
        for (int i = 0; i < 4; ++i) {
            const int row = row0 + g + ((i & 1) ? 8 : 0);
            const int col = kk * 16 + 2 * t + ((i & 2) ? 8 : 0);
            qf[kk][i] = row < q_len ? load_pair(q + (q_head + row) * D + col) : 0u;
        }

    float o[D / 8][4];
#pragma unroll
    for (int dt = 0; dt < D / 8; ++dt) o[dt][0] = o[dt][1] = o[dt][2] = o[dt][3] = 0.0f;
    float m[2] = {NEG_INF, NEG_INF}, l[2] = {0.0f, 0.0f};

    const int last_row = imin(q_len, (block + 1) * FLASH_ROWS) - 1;
    const int key_end = imin(k_len, offset + last_row + 1);
    for (int kb = 0; kb < key_end; kb += FLASH_KEYS) {
        __syncthreads();  // every warp is done with the previous tiles
        for (int w = threadIdx.x; w < FLASH_KEYS * D / 2; w += FLASH_THREADS) {
            const int key = w / (D / 2), col = (w % (D / 2)) * 2;
            unsigned int kv = 0u, vv = 0u;
            if (kb + key < k_len) {
                kv = load_pair(k + (kv_head + kb + key) * D + col);
                vv = load_pair(v + (kv_head + kb + key) * D + col);
            }
            *(unsigned int*)(ks + key * KS + col) = kv;
            vt[col * VS + key] = (unsigned short)(vv & 0xffffu);
            vt[(col + 1) * VS + key] = (unsigned short)(vv >> 16);
        }
        if (threadIdx.x < FLASH_KEYS)
            bias_tile[threadIdx.x] =
                (bias_head && kb + (int)threadIdx.x < k_len) ? bias_head[kb + threadIdx.x] : 0.0f;
        __syncthreads();

        float s[FLASH_KEYS / 8][4];
#pragma unroll
        for (int nt = 0; nt < FLASH_KEYS / 8; ++nt) s[nt][0] = s[nt][1] = s[nt][2] = s[nt][3] = 0.0f;
#pragma unroll
        for (int kk = 0; kk < D / 16; ++kk)
#pragma unroll
            for (int nt = 0; nt < FLASH_KEYS / 8; ++nt) {
                const unsigned short* kr = ks + (nt * 8 + g) * KS + kk * 16 + 2 * t;
                mma_bf16(s[nt], qf[kk], load_pair(kr), load_pair(kr + 8));
            }

        float mx[2] = {NEG_INF, NEG_INF};
#pragma unroll
        for (int nt = 0; nt < FLASH_KEYS / 8; ++nt)
#pragma unroll
            for (int e = 0; e < 4; ++e) {
                const int r = e >> 1;
                const int qpos = offset + row0 + g + 8 * r;
                const int key = kb + nt * 8 + 2 * t + (e & 1);
                float x = s[nt][e] * scale;
                if (key > qpos || key >= k_len) x = NEG_INF;
                else if (bias_head && qpos - key > window) x += bias_tile[key - kb];
                s[nt][e] = x;
                mx[r] = fmaxf(mx[r], x);
            }
        float alpha[2], sum[2] = {0.0f, 0.0f};
#pragma unroll
        for (int r = 0; r < 2; ++r) {
            const float next = fmaxf(m[r], quad_max(mx[r]));
            alpha[r] = m[r] == NEG_INF ? 0.0f : expf(m[r] - next);
            m[r] = next;
        }
#pragma unroll
        for (int nt = 0; nt < FLASH_KEYS / 8; ++nt)
#pragma unroll
            for (int e = 0; e < 4; ++e) {
                const int r = e >> 1;
                const float p = m[r] == NEG_INF ? 0.0f : expf(s[nt][e] - m[r]);
                s[nt][e] = p;
                sum[r] += p;
            }
#pragma unroll
        for (int r = 0; r < 2; ++r) l[r] = l[r] * alpha[r] + sum[r];
#pragma unroll
        for (int dt = 0; dt < D / 8; ++dt) {
            o[dt][0] *= alpha[0];
            o[dt][1] *= alpha[0];
            o[dt][2] *= alpha[1];
            o[dt][3] *= alpha[1];
        }
#pragma unroll
        for (int kk = 0; kk < FLASH_KEYS / 16; ++kk) {
            const unsigned int pa[4] = {
                pack_bf16(s[2 * kk][0], s[2 * kk][1]), pack_bf16(s[2 * kk][2], s[2 * kk][3]),
                pack_bf16(s[2 * kk + 1][0], s[2 * kk + 1][1]),
                pack_bf16(s[2 * kk + 1][2], s[2 * kk + 1][3])};
#pragma unroll
            for (int dt = 0; dt < D / 8; ++dt) {
                const unsigned short* vr = vt + (dt * 8 + g) * VS + kk * 16 + 2 * t;
                mma_bf16(o[dt], pa, load_pair(vr), load_pair(vr + 8));
            }
        }
    }

#pragma unroll
    for (int r = 0; r < 2; ++r) {
        const float total = quad_sum(l[r]);
        const int row = row0 + g + 8 * r;
        if (row >= q_len) continue;
        const float inv = 1.0f / total;
        unsigned short* orow = out + (q_head + row) * D;
#pragma unroll
        for (int dt = 0; dt < D / 8; ++dt)
            *(unsigned int*)(orow + dt * 8 + 2 * t) =
                pack_bf16(o[dt][2 * r] * inv, o[dt][2 * r + 1] * inv);
        if (t == 0) lse[q_head + row] = m[r] + logf(total);
    }
}

#define FLASH_FORWARD(D)                                                                         \
    extern "C" __global__ void __launch_bounds__(FLASH_THREADS) flash_forward_d##D(              \
        const unsigned short* q, const unsigned short* k, const unsigned short* v,               \
        const float* bias, unsigned short* out, float* lse, int heads, int kv_heads, int q_len, \
        int k_len, int offset, int window, float scale) {                                        \
        flash_forward<D>(q, k, v, bias, out, lse, heads, kv_heads, q_len, k_len, offset, window, \
                         scale);                                                                 \
    }

FLASH_FORWARD(64)
FLASH_FORWARD(128)
