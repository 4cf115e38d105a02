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

// The A fragment (16 x 16, k = columns 16 kk ..) formed by two adjacent C tiles (2 kk, 2 kk + 1)
// rounded to bf16: a C tile's layout is exactly one half of an A fragment's.
__device__ __forceinline__ void c_tiles_to_a(unsigned int* a, float (*c)[4], int kk) {
    a[0] = pack_bf16(c[2 * kk][0], c[2 * kk][1]);
    a[1] = pack_bf16(c[2 * kk][2], c[2 * kk][3]);
    a[2] = pack_bf16(c[2 * kk + 1][0], c[2 * kk + 1][1]);
    a[3] = pack_bf16(c[2 * kk + 1][2], c[2 * kk + 1][3]);
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

__device__ __forceinline__ unsigned int smem_address(const void* p) {
    unsigned long long a;
    asm("cvta.to.shared.u64 %0, %1;" : "=l"(a) : "l"(p));
    return (unsigned int)a;
}

// B fragments of two adjacent n-tiles (n0 and n0 + 8; b[0..1] and b[2..3]) at column k0 of a
// row-major [n][k] shared tile (keys x head_dim, as K is stored), one ldmatrix.x4.
__device__ __forceinline__ void load_b_pair(unsigned int* b, const unsigned short* tile, int stride,
                                            int n0, int k0) {
    const int lane = threadIdx.x % 32;
    const unsigned short* p =
        tile + (n0 + (lane & 7) + ((lane & 16) ? 8 : 0)) * stride + k0 + ((lane & 8) ? 8 : 0);
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(b[0]), "=r"(b[1]), "=r"(b[2]), "=r"(b[3])
                 : "r"(smem_address(p)));
}

// The same for a row-major [k][n] tile read transposed (V: keys x head_dim, keys as k).
__device__ __forceinline__ void load_b_pair_transposed(unsigned int* b, const unsigned short* tile,
                                                       int stride, int k0, int n0) {
    const int lane = threadIdx.x % 32;
    const unsigned short* p =
        tile + (k0 + (lane & 7) + ((lane & 8) ? 8 : 0)) * stride + n0 + ((lane & 16) ? 8 : 0);
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(b[0]), "=r"(b[1]), "=r"(b[2]), "=r"(b[3])
                 : "r"(smem_address(p)));
}

struct __align__(16) Bytes16 {
    unsigned int x, y, z, w;
};

// Rows first .. first + rows of a row-major [*, D] tensor into a padded shared tile (zeros past
// `limit`), 16 bytes per load.
template <int D>
__device__ void load_tile(unsigned short* tile, const unsigned short* src, int first, int rows,
                          int limit) {
    for (int w = threadIdx.x; w < rows * D / 8; w += FLASH_THREADS) {
        const int r = w / (D / 8), c = (w % (D / 8)) * 8;
        Bytes16 value = {0u, 0u, 0u, 0u};
        if (first + r < limit) value = *(const Bytes16*)(src + (index_t)(first + r) * D + c);
        *(Bytes16*)(tile + r * (D + 8) + c) = value;
    }
}

// The same with cp.async (16 bytes per copy, zero-filled past `limit`): the copies run while the
// block computes on the other buffer; cp.async.wait_group + __syncthreads make them visible.
template <int D>
__device__ void load_tile_async(unsigned short* tile, const unsigned short* src, int first,
                                int rows, int limit) {
    for (int w = threadIdx.x; w < rows * D / 8; w += FLASH_THREADS) {
        const int r = w / (D / 8), c = (w % (D / 8)) * 8;
        const bool valid = first + r < limit;
        const unsigned short* from = src + (index_t)(valid ? first + r : 0) * D + c;
        asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(
                         smem_address(tile + r * (D + 8) + c)),
                     "l"(from), "r"(valid ? 16 : 0));
    }
}

__device__ __forceinline__ void async_commit() { asm volatile("cp.async.commit_group;\n" ::); }

template <int N>
__device__ __forceinline__ void async_wait() {
    asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
}

// A fragments (16 rows x D) of rows row0.. of a row-major [*, D] tensor in global memory.
template <int D>
__device__ void load_a_rows(unsigned int (*frag)[4], const unsigned short* src, int row0,
                            int limit) {
    const int g = (threadIdx.x % 32) / 4, t = threadIdx.x % 4;
#pragma unroll
    for (int kk = 0; kk < D / 16; ++kk)
#pragma unroll
        for (int i = 0; i < 4; ++i) {
            const int row = row0 + g + ((i & 1) ? 8 : 0);
            const int col = kk * 16 + 2 * t + ((i & 2) ? 8 : 0);
            frag[kk][i] = row < limit ? load_pair(src + (index_t)row * D + col) : 0u;
        }
}

// acc += a · tile[k0 .. k0 + 16][0 .. D]: one 16-wide k step of a product whose right operand is
// a row-major [k][D + 8] shared tile read transposed (V, dO, Q or K as stored).
template <int D>
__device__ __forceinline__ void accumulate_product(float (*acc)[4], const unsigned int* a,
                                                   const unsigned short* tile, int k0) {
#pragma unroll
    for (int dt = 0; dt < D / 8; dt += 2) {
        unsigned int b4[4];
        load_b_pair_transposed(b4, tile, D + 8, k0, dt * 8);
        mma_bf16(acc[dt], a, b4[0], b4[1]);
        mma_bf16(acc[dt + 1], a, b4[2], b4[3]);
    }
}

// Runs body(kb, k_tile, v_tile, bias_tile) for the key tiles 0, 64, .. < key_end of one KV
// head, with each next tile's copies (cp.async) in flight while the body computes on the current
// one. `shared` is the dynamic shared memory: two buffers of a K and a V tile ([64][D + 8]
// halves), then two bias tiles (64 f32, already in log2 units; 0 without a bias) -
// flash_tile_shared_bytes(D) on the host.
template <int D, typename Body>
__device__ void for_each_kv_tile(unsigned short* shared, const unsigned short* k_head,
                                 const unsigned short* v_head, const float* bias_head, int k_len,
                                 int key_end, Body body) {
    constexpr int TILE = FLASH_KEYS * (D + 8);
    float* bias_tiles = (float*)(shared + 4 * TILE);
    auto issue = [&](int kb, int buffer) {
        unsigned short* tile = shared + 2 * buffer * TILE;
        load_tile_async<D>(tile, k_head, kb, FLASH_KEYS, k_len);
        load_tile_async<D>(tile + TILE, v_head, kb, FLASH_KEYS, k_len);
        if (threadIdx.x < FLASH_KEYS)
            bias_tiles[buffer * FLASH_KEYS + threadIdx.x] =
                (bias_head && kb + (int)threadIdx.x < k_len) ? bias_head[kb + threadIdx.x] * LOG2E
                                                             : 0.0f;
        async_commit();
    };
    if (key_end <= 0) return;
    issue(0, 0);
    for (int kb = 0, buffer = 0; kb < key_end; kb += FLASH_KEYS, buffer ^= 1) {
        // The other buffer was released by the __syncthreads ending the previous iteration.
        if (kb + FLASH_KEYS < key_end) {
            issue(kb + FLASH_KEYS, buffer ^ 1);
            async_wait<1>();
        } else {
            async_wait<0>();
        }
        __syncthreads();  // tile kb has landed for every thread
        const unsigned short* k_tile = shared + 2 * buffer * TILE;
        body(kb, k_tile, k_tile + TILE, bias_tiles + buffer * FLASH_KEYS);
        __syncthreads();  // every warp is done with this buffer before it is refilled
    }
}

// A fragment (16 rows x 16, k = columns k0..) of rows row0.. of a row-major [*][stride] shared
// tile, one ldmatrix.x4: lanes 0-7 / 8-15 address rows 0-7 / 8-15 at k0, lanes 16-31 the same at
// k0 + 8, which lands the four 8x8 matrices in the A register order.
__device__ __forceinline__ void load_a_shared(unsigned int* a, const unsigned short* tile,
                                              int stride, int row0, int k0) {
    const int lane = threadIdx.x % 32;
    const unsigned short* p =
        tile + (row0 + (lane & 7) + ((lane & 8) ? 8 : 0)) * stride + k0 + ((lane & 16) ? 8 : 0);
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(a[0]), "=r"(a[1]), "=r"(a[2]), "=r"(a[3])
                 : "r"(smem_address(p)));
}

// N accumulator tiles (mma.m16n8k16's C layout, 4 floats each) set to zero.
template <int N>
__device__ __forceinline__ void zero_tiles(float (*acc)[4]) {
#pragma unroll
    for (int i = 0; i < N; ++i) acc[i][0] = acc[i][1] = acc[i][2] = acc[i][3] = 0.0f;
}

// How a tile of queries at positions p0 .. p0 + nq - 1 and keys k0 .. k0 + nk - 1 meets the
// masks: `plain` when every key is visible to every query (all keys at or before the first
// query, inside k_len) and the bias applies to all of them (`all_biased`) or to none, so the
// tile needs no per-score tests (all but the diagonal and window-edge tiles).
struct TileMask {
    bool plain, all_biased;
};

__device__ __forceinline__ TileMask tile_mask(int p0, int nq, int k0, int nk, int k_len,
                                              bool has_bias, int window) {
    const bool visible = k0 + nk - 1 <= p0 && k0 + nk <= k_len;
    const bool all_biased = has_bias && p0 - (k0 + nk - 1) > window;
    const bool none_biased = !has_bias || p0 + nq - 1 - k0 <= window;
    return {visible && (all_biased || none_biased), all_biased};
}

// One warp's online-softmax step over a tile of KEYS keys for its 16 query rows (the first at
// position first_pos): s holds the tile's raw scores Q Kᵀ in mma.m16n8k16's C layout and leaves as
// the probabilities P (unnormalised, relative to the new running maximum m, in log2 units); l is
// each row's running sum and o its output, rescaled to the new maximum. Keys past the query's
// position or k_len are masked; the DMS key bias (bias_tile times bias_scale in log2 units)
// applies where the query is more than `window` positions after the key.
template <int KEYS, int D>
__device__ __forceinline__ void online_softmax_tile(float (*s)[4], float* m, float* l,
                                                    float (*o)[4], int kb, int first_pos,
                                                    int k_len, bool has_bias, int window,
                                                    const float* bias_tile, float bias_scale,
                                                    float scale2) {
    const int lane = threadIdx.x % 32;
    const int g = lane / 4, t = lane % 4;
    float mx[2] = {NEG_INF, NEG_INF};
    const TileMask mask = tile_mask(first_pos, 16, kb, KEYS, k_len, has_bias, window);
    if (mask.plain) {
#pragma unroll
        for (int nt = 0; nt < KEYS / 8; ++nt)
#pragma unroll
            for (int e = 0; e < 4; ++e) {
                float x = s[nt][e] * scale2;
                if (mask.all_biased) x = fmaf(bias_tile[nt * 8 + 2 * t + (e & 1)], bias_scale, x);
                s[nt][e] = x;
                mx[e >> 1] = fmaxf(mx[e >> 1], x);
            }
    } else {
#pragma unroll
        for (int nt = 0; nt < KEYS / 8; ++nt)
#pragma unroll
            for (int e = 0; e < 4; ++e) {
                const int r = e >> 1;
                const int qpos = first_pos + g + 8 * r;
                const int key = kb + nt * 8 + 2 * t + (e & 1);
                float x = s[nt][e] * scale2;
                if (key > qpos || key >= k_len) x = NEG_INF;
                else if (has_bias && qpos - key > window) x = fmaf(bias_tile[key - kb], bias_scale, x);
                s[nt][e] = x;
                mx[r] = fmaxf(mx[r], x);
            }
    }
    float alpha[2], sum[2] = {0.0f, 0.0f};
#pragma unroll
    for (int r = 0; r < 2; ++r) {
        const float next = fmaxf(m[r], quad_max(mx[r]));
        alpha[r] = m[r] == NEG_INF ? 0.0f : fast_exp2(m[r] - next);
        m[r] = next;
    }
#pragma unroll
    for (int nt = 0; nt < KEYS / 8; ++nt)
#pragma unroll
        for (int e = 0; e < 4; ++e) {
            const int r = e >> 1;
            const float p = m[r] == NEG_INF ? 0.0f : fast_exp2(s[nt][e] - m[r]);
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
}

// One warp's 16 output rows (from row0) normalised by their sums, and their log-sum-exps. out is
// token-major, [batch, q_len, heads, D] (the block's batch and head from blockIdx.z / y): the
// output projection's layout, so the context needs no transposing copy (nor a second saved
// copy in training); lse is [batch, heads, q_len] from q_head.
template <int D>
__device__ __forceinline__ void store_output_rows(float (*o)[4], const float* m, const float* l,
                                                  int row0, int q_len, int heads,
                                                  unsigned short* out, float* lse, index_t q_head,
                                                  int g, int t) {
#pragma unroll
    for (int r = 0; r < 2; ++r) {
        const float total = quad_sum(l[r]);
        const int row = row0 + g + 8 * r;
        if (row >= q_len) continue;
        const float inv = 1.0f / total;
        unsigned short* orow = out + (((index_t)blockIdx.z * q_len + row) * heads + blockIdx.y) * D;
#pragma unroll
        for (int dt = 0; dt < D / 8; ++dt)
            *(unsigned int*)(orow + dt * 8 + 2 * t) = pack_bf16(o[dt][2 * r] * inv, o[dt][2 * r + 1] * inv);
        if (t == 0) lse[q_head + row] = m[r] * LN2 + logf(total);
    }
}

// Query rows per block of the forward with MT 16-row tiles per warp.
#define FLASH_BLOCK_ROWS(MT) (FLASH_ROWS * (MT))

// q: [batch, heads, q_len, D]; out: [batch, q_len, heads, D]; k, v: [batch, kv_heads, k_len, D];
// bias: f32
// [batch, kv_heads, k_len] or null; lse: f32 [batch, heads, q_len]. Queries sit at positions
// offset .. offset + q_len, keys at 0 .. k_len.
//
// MT = 16-row tiles per warp. MT 1: 64 rows per block, Q fragments in registers. MT 2 (the
// "wide" kernel, FlashAttention-2's shape): 128 rows per block, 32 per warp, Q in shared memory
// (its fragments do not fit in registers beside two tiles' scores and outputs); every K and V
// fragment read from shared memory then feeds two tensor-core products instead of one, which
// halves the shared-memory traffic per product (the MT 1 kernel is bound by it).
template <int D, int MT>
__device__ void flash_forward(const unsigned short* q, const unsigned short* k,
                              const unsigned short* v, const float* bias, unsigned short* out,
                              float* lse, int heads, int kv_heads, int q_len, int k_len,
                              int offset, int window, float scale) {
    constexpr int KS = D + 8;  // padded tile row (halves): conflict-free fragment loads
    constexpr int ROWS = FLASH_BLOCK_ROWS(MT);
    extern __shared__ __align__(16) unsigned short flash_shared[];
    // exp(x) = exp2(x log2 e): the scores and the bias are kept in log2 units.
    const float scale2 = scale * LOG2E;

    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    const int g = lane / 4, t = lane % 4;
    // The heaviest (last, under the causal mask) row blocks first.
    const int block = gridDim.x - 1 - blockIdx.x;
    const int h = blockIdx.y, b = blockIdx.z;
    const int kvh = h / (heads / kv_heads);
    const int row0 = block * ROWS + warp * 16 * MT;
    const index_t q_head = ((index_t)b * heads + h) * q_len;
    const index_t kv_head = ((index_t)b * kv_heads + kvh) * k_len;
    const float* bias_head = bias ? bias + kv_head : 0;

    // MT 1: this warp's Q fragments in registers. MT > 1: the block's Q rows after the K/V and
    // bias buffers of for_each_kv_tile (made visible by its first __syncthreads).
    unsigned int qf[MT == 1 ? D / 16 : 1][4];
    unsigned short* q_tile =
        (unsigned short*)((float*)(flash_shared + 4 * FLASH_KEYS * KS) + 2 * FLASH_KEYS);
    if constexpr (MT == 1)
        load_a_rows<D>(qf, q + q_head * D, row0, q_len);
    else
        load_tile<D>(q_tile, q + q_head * D, block * ROWS, ROWS, q_len);

    float o[MT][D / 8][4];
#pragma unroll
    for (int mt = 0; mt < MT; ++mt)
#pragma unroll
        for (int dt = 0; dt < D / 8; ++dt) o[mt][dt][0] = o[mt][dt][1] = o[mt][dt][2] = o[mt][dt][3] = 0.0f;
    float m[MT][2], l[MT][2];
#pragma unroll
    for (int mt = 0; mt < MT; ++mt) m[mt][0] = m[mt][1] = NEG_INF, l[mt][0] = l[mt][1] = 0.0f;

    const int last_row = imin(q_len, (block + 1) * ROWS) - 1;
    const int key_end = imin(k_len, offset + last_row + 1);
    for_each_kv_tile<D>(flash_shared, k + kv_head * D, v + kv_head * D, bias_head, k_len, key_end,
                        [&](int kb, const unsigned short* ks, const unsigned short* vs,
                            const float* bias_tile) {
        float s[MT][FLASH_KEYS / 8][4];
#pragma unroll
        for (int mt = 0; mt < MT; ++mt)
#pragma unroll
            for (int nt = 0; nt < FLASH_KEYS / 8; ++nt)
                s[mt][nt][0] = s[mt][nt][1] = s[mt][nt][2] = s[mt][nt][3] = 0.0f;
#pragma unroll
        for (int kk = 0; kk < D / 16; ++kk) {
            unsigned int a[MT][4];
#pragma unroll
            for (int mt = 0; mt < MT; ++mt) {
                if constexpr (MT == 1) {
#pragma unroll
                    for (int i = 0; i < 4; ++i) a[mt][i] = qf[kk][i];
                } else {
                    load_a_shared(a[mt], q_tile, KS, warp * 16 * MT + mt * 16, kk * 16);
                }
            }
#pragma unroll
            for (int nt = 0; nt < FLASH_KEYS / 8; nt += 2) {
                unsigned int kb4[4];
                load_b_pair(kb4, ks, KS, nt * 8, kk * 16);
#pragma unroll
                for (int mt = 0; mt < MT; ++mt) {
                    mma_bf16(s[mt][nt], a[mt], kb4[0], kb4[1]);
                    mma_bf16(s[mt][nt + 1], a[mt], kb4[2], kb4[3]);
                }
            }
        }

#pragma unroll
        for (int mt = 0; mt < MT; ++mt)
            online_softmax_tile<FLASH_KEYS, D>(s[mt], m[mt], l[mt], o[mt], kb,
                                               offset + row0 + mt * 16, k_len, bias_head != 0,
                                               window, bias_tile, 1.0f, scale2);
        // O += P V: each V fragment pair feeds every row tile of the warp.
#pragma unroll
        for (int kk = 0; kk < FLASH_KEYS / 16; ++kk) {
            unsigned int pa[MT][4];
#pragma unroll
            for (int mt = 0; mt < MT; ++mt) c_tiles_to_a(pa[mt], s[mt], kk);
#pragma unroll
            for (int dt = 0; dt < D / 8; dt += 2) {
                unsigned int b4[4];
                load_b_pair_transposed(b4, vs, KS, kk * 16, dt * 8);
#pragma unroll
                for (int mt = 0; mt < MT; ++mt) {
                    mma_bf16(o[mt][dt], pa[mt], b4[0], b4[1]);
                    mma_bf16(o[mt][dt + 1], pa[mt], b4[2], b4[3]);
                }
            }
        }
    });

#pragma unroll
    for (int mt = 0; mt < MT; ++mt)
        store_output_rows<D>(o[mt], m[mt], l[mt], row0 + mt * 16, q_len, heads, out, lse, q_head,
                            g, t);
}

#define FLASH_FORWARD(NAME, D, MT)                                                               \
    extern "C" __global__ void __launch_bounds__(FLASH_THREADS) NAME(                            \
        const unsigned short* q, const unsigned short* k, const unsigned short* v,               \
        const float* bias, unsigned short* out, float* lse, int heads, int kv_heads, int q_len, \
        int k_len, int offset, int window, float scale) {                                        \
        flash_forward<D, MT>(q, k, v, bias, out, lse, heads, kv_heads, q_len, k_len, offset,     \
                             window, scale);                                                     \
    }

FLASH_FORWARD(flash_forward_d64, 64, 1)
FLASH_FORWARD(flash_forward_d128, 128, 1)
FLASH_FORWARD(flash_forward_wide_d128, 128, 2)

// c1 = a1 tile1ᵀ and c2 = a2 tile2ᵀ for N rows of two [N][D + 8] shared tiles (zeroed first):
// the scores and their gradient's dO Vᵀ (or Sᵀ and dPᵀ) of one tile.
template <int D, int N>
__device__ __forceinline__ void two_products(float (*c1)[4], const unsigned int (*a1)[4],
                                             const unsigned short* tile1, float (*c2)[4],
                                             const unsigned int (*a2)[4],
                                             const unsigned short* tile2) {
#pragma unroll
    for (int nt = 0; nt < N / 8; ++nt)
#pragma unroll
        for (int e = 0; e < 4; ++e) c1[nt][e] = c2[nt][e] = 0.0f;
#pragma unroll
    for (int kk = 0; kk < D / 16; ++kk)
#pragma unroll
        for (int nt = 0; nt < N / 8; nt += 2) {
            unsigned int b4[4];
            load_b_pair(b4, tile1, D + 8, nt * 8, kk * 16);
            mma_bf16(c1[nt], a1[kk], b4[0], b4[1]);
            mma_bf16(c1[nt + 1], a1[kk], b4[2], b4[3]);
            load_b_pair(b4, tile2, D + 8, nt * 8, kk * 16);
            mma_bf16(c2[nt], a2[kk], b4[0], b4[1]);
            mma_bf16(c2[nt + 1], a2[kk], b4[2], b4[3]);
        }
}

// The backward's elementwise step for one warp's 16 keys (from key0) against N queries (from q0)
// of a tile, in mma.m16n8k16's C layout (keys as rows): st holds Sᵀ = K Qᵀ and leaves as Pᵀ, dpt
// holds dPᵀ = V dOᵀ and leaves as dSᵀ = Pᵀ (dPᵀ - delta). lse_tile (times lse_scale in log2 units)
// and delta_tile are the queries'; key_bias (log2 units) the thread's two keys', whose gradient
// (the dS where the bias applies) accumulates in db.
template <int N>
__device__ __forceinline__ void key_gradient_scores(float (*st)[4], float (*dpt)[4], int key0,
                                                    int q0, int offset, int q_len, int k_len,
                                                    bool has_bias, int window,
                                                    const float* key_bias, const float* lse_tile,
                                                    const float* delta_tile, float lse_scale,
                                                    float scale2, float* db) {
    const int lane = threadIdx.x % 32;
    const int g = lane / 4, t = lane % 4;
    // Tiles of 16 keys x N queries inside q_len that tile_mask passes need no per-score tests.
    const TileMask mask = tile_mask(offset + q0, N, key0, 16, k_len, has_bias, window);
    const bool all_outside = mask.all_biased;
    if (mask.plain && q0 + N <= q_len) {
#pragma unroll
        for (int nt = 0; nt < N / 8; ++nt)
#pragma unroll
            for (int e = 0; e < 4; ++e) {
                const int r = e >> 1;
                const int qi = nt * 8 + 2 * t + (e & 1);
                float x = st[nt][e] * scale2;
                if (all_outside) x += key_bias[r];
                const float p = fast_exp2(x - lse_tile[qi] * lse_scale);
                const float ds = p * (dpt[nt][e] - delta_tile[qi]);
                if (all_outside) db[r] += ds;
                st[nt][e] = p;
                dpt[nt][e] = ds;
            }
        return;
    }
#pragma unroll
    for (int nt = 0; nt < N / 8; ++nt)
#pragma unroll
        for (int e = 0; e < 4; ++e) {
            const int r = e >> 1;
            const int key = key0 + g + 8 * r;
            const int qi = nt * 8 + 2 * t + (e & 1);
            const int qpos = offset + q0 + qi;
            float p = 0.0f, ds = 0.0f;
            if (q0 + qi < q_len && key < k_len && key <= qpos) {
                float x = st[nt][e] * scale2;
                const bool outside = has_bias && qpos - key > window;
                if (outside) x += key_bias[r];
                p = fast_exp2(x - lse_tile[qi] * lse_scale);
                ds = p * (dpt[nt][e] - delta_tile[qi]);
                if (outside) db[r] += ds;
            }
            st[nt][e] = p;
            dpt[nt][e] = ds;
        }
}

// The dQ side's elementwise step for one warp's 16 query rows (from row0) against KEYS keys (from
// kb), in mma.m16n8k16's C layout: s holds S = Q Kᵀ and leaves as dS = P (dP - delta), dp holds
// dP = dO Vᵀ. row_lse (log2 units) and row_delta are the thread's two rows'; bias_tile times
// bias_scale the keys' bias in log2 units.
template <int KEYS>
__device__ __forceinline__ void query_gradient_scores(float (*s)[4], const float (*dp)[4],
                                                      int row0, int kb, int offset, int q_len,
                                                      int k_len, bool has_bias, int window,
                                                      const float* bias_tile, float bias_scale,
                                                      const float* row_lse,
                                                      const float* row_delta, float scale2) {
    const int lane = threadIdx.x % 32;
    const int g = lane / 4, t = lane % 4;
    // Tiles of 16 rows inside q_len x KEYS keys that tile_mask passes need no per-score tests.
    const TileMask mask = tile_mask(offset + row0, 16, kb, KEYS, k_len, has_bias, window);
    const bool all_biased = mask.all_biased;
    if (mask.plain && row0 + 16 <= q_len) {
#pragma unroll
        for (int nt = 0; nt < KEYS / 8; ++nt)
#pragma unroll
            for (int e = 0; e < 4; ++e) {
                const int r = e >> 1;
                float x = s[nt][e] * scale2;
                if (all_biased) x = fmaf(bias_tile[nt * 8 + 2 * t + (e & 1)], bias_scale, x);
                s[nt][e] = fast_exp2(x - row_lse[r]) * (dp[nt][e] - row_delta[r]);
            }
        return;
    }
#pragma unroll
    for (int nt = 0; nt < KEYS / 8; ++nt)
#pragma unroll
        for (int e = 0; e < 4; ++e) {
            const int r = e >> 1;
            const int row = row0 + g + 8 * r, qpos = offset + row;
            const int key = kb + nt * 8 + 2 * t + (e & 1);
            float ds = 0.0f;
            if (row < q_len && key < k_len && key <= qpos) {
                float x = s[nt][e] * scale2;
                if (has_bias && qpos - key > window) x = fmaf(bias_tile[key - kb], bias_scale, x);
                ds = fast_exp2(x - row_lse[r]) * (dp[nt][e] - row_delta[r]);
            }
            s[nt][e] = ds;
        }
}

// One warp's 16 keys' dK (times scale), dV and bias gradient added in f32 into the KV head's
// accumulators (the group's query heads add into the same rows).
template <int D>
__device__ __forceinline__ void store_key_gradients(const float (*dk_acc)[4],
                                                    const float (*dv_acc)[4], const float* db,
                                                    int key0, int k_len, float* dk, float* dv,
                                                    float* dbias, index_t kv_head, float scale,
                                                    int g, int t) {
#pragma unroll
    for (int r = 0; r < 2; ++r) {
        const float bias_total = quad_sum(db[r]);
        const int key = key0 + g + 8 * r;
        if (key >= k_len) continue;
        float* dk_row = dk + (kv_head + key) * D;
        float* dv_row = dv + (kv_head + key) * D;
#pragma unroll
        for (int dt = 0; dt < D / 8; ++dt)
#pragma unroll
            for (int e = 0; e < 2; ++e) {
                atomicAdd(dk_row + dt * 8 + 2 * t + e, dk_acc[dt][2 * r + e] * scale);
                atomicAdd(dv_row + dt * 8 + 2 * t + e, dv_acc[dt][2 * r + e]);
            }
        if (dbias && t == 0 && bias_total != 0.0f) atomicAdd(dbias + kv_head + key, bias_total);
    }
}

// One warp's 16 rows of dQ (times scale) as bf16.
template <int D>
__device__ __forceinline__ void store_query_gradient_rows(const float (*dq_acc)[4], int row0,
                                                          int q_len, unsigned short* dq,
                                                          index_t q_head, float scale, int g,
                                                          int t) {
#pragma unroll
    for (int r = 0; r < 2; ++r) {
        const int row = row0 + g + 8 * r;
        if (row >= q_len) continue;
        unsigned short* dq_row = dq + (q_head + row) * D;
#pragma unroll
        for (int dt = 0; dt < D / 8; ++dt)
            *(unsigned int*)(dq_row + dt * 8 + 2 * t) =
                pack_bf16(dq_acc[dt][2 * r] * scale, dq_acc[dt][2 * r + 1] * scale);
    }
}

// The log-sum-exp (in log2 units) and delta of this thread's two rows (row0 + g, + 8) of a query
// head, zero past q_len: the dQ kernels' per-row inputs.
__device__ __forceinline__ void load_row_statistics(float* row_lse, float* row_delta,
                                                    const float* lse, const float* delta,
                                                    index_t q_head, int row0, int q_len, int g) {
#pragma unroll
    for (int r = 0; r < 2; ++r) {
        const int row = row0 + g + 8 * r;
        row_lse[r] = row < q_len ? lse[q_head + row] * LOG2E : 0.0f;
        row_delta[r] = row < q_len ? delta[q_head + row] : 0.0f;
    }
}

// The DMS bias (in log2 units) of this thread's two keys (key0 + g, + 8), zero past k_len or
// without a bias: the dK/dV kernels' per-key input.
__device__ __forceinline__ void load_key_bias(float* key_bias, const float* bias_head, int key0,
                                              int k_len, int g) {
#pragma unroll
    for (int r = 0; r < 2; ++r) {
        const int key = key0 + g + 8 * r;
        key_bias[r] = (bias_head && key < k_len) ? bias_head[key] * LOG2E : 0.0f;
    }
}

#define BWD_QROWS 32

// Runs body(q0, q_tile, do_tile, lse_tile, delta_tile) for the query tiles first_q, first_q +
// 32, .. < q_len of one query head (Q and dO rows, the log-sum-exps in log2 units, the deltas),
// with each next tile's copies (cp.async) in flight while the body computes on the current one:
// the dK/dV kernel's counterpart of for_each_kv_tile. The four buffers hold two tiles each.
template <int D, typename Body>
__device__ void for_each_q_tile(unsigned short* qs, unsigned short* dos, float* lse_tiles,
                                float* delta_tiles, const unsigned short* q_head,
                                const unsigned short* do_head, const float* lse_head,
                                const float* delta_head, int first_q, int q_len, Body body) {
    constexpr int TILE = BWD_QROWS * (D + 8);
    auto issue = [&](int q0, int buffer) {
        load_tile_async<D>(qs + buffer * TILE, q_head, q0, BWD_QROWS, q_len);
        load_tile_async<D>(dos + buffer * TILE, do_head, q0, BWD_QROWS, q_len);
        if (threadIdx.x < BWD_QROWS) {
            const int row = q0 + threadIdx.x;
            lse_tiles[buffer * BWD_QROWS + threadIdx.x] =
                row < q_len ? lse_head[row] * LOG2E : 0.0f;
            delta_tiles[buffer * BWD_QROWS + threadIdx.x] = row < q_len ? delta_head[row] : 0.0f;
        }
        async_commit();
    };
    if (first_q >= q_len) return;
    issue(first_q, 0);
    for (int q0 = first_q, buffer = 0; q0 < q_len; q0 += BWD_QROWS, buffer ^= 1) {
        // The other buffer was released by the __syncthreads ending the previous iteration.
        if (q0 + BWD_QROWS < q_len) {
            issue(q0 + BWD_QROWS, buffer ^ 1);
            async_wait<1>();
        } else {
            async_wait<0>();
        }
        __syncthreads();  // tile q0 has landed for every thread
        body(q0, qs + buffer * TILE, dos + buffer * TILE, lse_tiles + buffer * BWD_QROWS,
             delta_tiles + buffer * BWD_QROWS);
        __syncthreads();  // every warp is done with this buffer before it is refilled
    }
}

// ---- Backward (FlashAttention-2 style), from the forward's log-sum-exp and
// delta_i = sum_d dO_id O_id: P = exp(S - lse), dS = P (dP - delta) with dP = dO Vᵀ;
// dV = Pᵀ dO, dK = scale dSᵀ Q, dQ = scale dS K, d(bias_j) = sum of dS_ij over the rows where
// the bias applies. Two kernels: one per block of 64 keys and one query head (dK, dV and the bias
// gradient, added in f32 into the group's shared KV head), one per block of 64 query rows (dQ,
// recomputing S and dP).

template <int D>
__device__ void flash_backward_kv(const unsigned short* q, const unsigned short* k,
                                  const unsigned short* v, const unsigned short* dout,
                                  const float* lse, const float* delta, const float* bias,
                                  float* dk, float* dv, float* dbias, int heads, int kv_heads,
                                  int q_len, int k_len, int offset, int window, float scale) {
    constexpr int S = D + 8;
    // Two buffers each: the tile being computed on and the next one in flight.
    __shared__ __align__(16) unsigned short qs[2 * BWD_QROWS * S];
    __shared__ __align__(16) unsigned short dos[2 * BWD_QROWS * S];
    __shared__ float lse_tiles[2 * BWD_QROWS], delta_tiles[2 * BWD_QROWS];

    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    const int g = lane / 4, t = lane % 4;
    const int kb = blockIdx.x * FLASH_KEYS;
    const int h = blockIdx.y, b = blockIdx.z;
    const int kvh = h / (heads / kv_heads);
    const index_t kv_head = ((index_t)b * kv_heads + kvh) * k_len;
    const index_t q_head = ((index_t)b * heads + h) * q_len;
    const float scale2 = scale * LOG2E;
    const int key0 = kb + warp * 16;
    const float* bias_head = bias ? bias + kv_head : 0;

    unsigned int kf[D / 16][4], vf[D / 16][4];
    load_a_rows<D>(kf, k + kv_head * D, key0, k_len);
    load_a_rows<D>(vf, v + kv_head * D, key0, k_len);
    float key_bias[2];
    load_key_bias(key_bias, bias_head, key0, k_len, g);
    float dk_acc[D / 8][4], dv_acc[D / 8][4];
    zero_tiles<D / 8>(dk_acc);
    zero_tiles<D / 8>(dv_acc);
    float db[2] = {0.0f, 0.0f};

    // Queries before position kb see none of these keys.
    const int first_q = (kb > offset ? kb - offset : 0) / BWD_QROWS * BWD_QROWS;
    for_each_q_tile<D>(qs, dos, lse_tiles, delta_tiles, q + q_head * D, dout + q_head * D,
                       lse + q_head, delta + q_head, first_q, q_len,
                       [&](int q0, const unsigned short* q_tile, const unsigned short* do_tile,
                           const float* lse_tile, const float* delta_tile) {
        // Sᵀ = K Qᵀ and dPᵀ = V dOᵀ: this warp's 16 keys x 32 queries.
        float st[BWD_QROWS / 8][4], dpt[BWD_QROWS / 8][4];
        two_products<D, BWD_QROWS>(st, kf, q_tile, dpt, vf, do_tile);
        key_gradient_scores<BWD_QROWS>(st, dpt, key0, q0, offset, q_len, k_len, bias_head != 0,
                                       window, key_bias, lse_tile, delta_tile, 1.0f, scale2, db);
        // dV += Pᵀ dO, dK += dSᵀ Q (scaled at the end).
#pragma unroll
        for (int kk = 0; kk < BWD_QROWS / 16; ++kk) {
            unsigned int pa[4];
            c_tiles_to_a(pa, st, kk);
            unsigned int sa[4];
            c_tiles_to_a(sa, dpt, kk);
            accumulate_product<D>(dv_acc, pa, do_tile, kk * 16);
            accumulate_product<D>(dk_acc, sa, q_tile, kk * 16);
        }
    });

    store_key_gradients<D>(dk_acc, dv_acc, db, key0, k_len, dk, dv, dbias, kv_head, scale, g, t);
}

template <int D>
__device__ void flash_backward_q(const unsigned short* q, const unsigned short* k,
                                 const unsigned short* v, const unsigned short* dout,
                                 const float* lse, const float* delta, const float* bias,
                                 unsigned short* dq, int heads, int kv_heads, int q_len, int k_len,
                                 int offset, int window, float scale) {
    extern __shared__ __align__(16) unsigned short flash_shared[];

    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    const int g = lane / 4, t = lane % 4;
    const int block = gridDim.x - 1 - blockIdx.x;
    const int h = blockIdx.y, b = blockIdx.z;
    const int kvh = h / (heads / kv_heads);
    const int row0 = block * FLASH_ROWS + warp * 16;
    const index_t q_head = ((index_t)b * heads + h) * q_len;
    const index_t kv_head = ((index_t)b * kv_heads + kvh) * k_len;
    const float* bias_head = bias ? bias + kv_head : 0;
    const float scale2 = scale * LOG2E;

    unsigned int qf[D / 16][4], df[D / 16][4];
    load_a_rows<D>(qf, q + q_head * D, row0, q_len);
    load_a_rows<D>(df, dout + q_head * D, row0, q_len);
    float row_lse[2], row_delta[2];
    load_row_statistics(row_lse, row_delta, lse, delta, q_head, row0, q_len, g);
    float dq_acc[D / 8][4];
    zero_tiles<D / 8>(dq_acc);

    const int last_row = imin(q_len, (block + 1) * FLASH_ROWS) - 1;
    const int key_end = imin(k_len, offset + last_row + 1);
    for_each_kv_tile<D>(flash_shared, k + kv_head * D, v + kv_head * D, bias_head, k_len, key_end,
                        [&](int kb, const unsigned short* ks, const unsigned short* vs,
                            const float* bias_tile) {
        float s[FLASH_KEYS / 8][4], dp[FLASH_KEYS / 8][4];
        two_products<D, FLASH_KEYS>(s, qf, ks, dp, df, vs);
        query_gradient_scores<FLASH_KEYS>(s, dp, row0, kb, offset, q_len, k_len, bias_head != 0,
                                          window, bias_tile, 1.0f, row_lse, row_delta, scale2);
#pragma unroll
        for (int kk = 0; kk < FLASH_KEYS / 16; ++kk) {
            unsigned int sa[4];
            c_tiles_to_a(sa, s, kk);
            accumulate_product<D>(dq_acc, sa, ks, kk * 16);
        }
    });

    store_query_gradient_rows<D>(dq_acc, row0, q_len, dq, q_head, scale, g, t);
}

#define FLASH_BACKWARD(D)                                                                         \
    extern "C" __global__ void __launch_bounds__(FLASH_THREADS) flash_backward_kv_d##D(           \
        const unsigned short* q, const unsigned short* k, const unsigned short* v,                \
        const unsigned short* dout, const float* lse, const float* delta, const float* bias,      \
        float* dk, float* dv, float* dbias, int heads, int kv_heads, int q_len, int k_len,        \
        int offset, int window, float scale) {                                                    \
        flash_backward_kv<D>(q, k, v, dout, lse, delta, bias, dk, dv, dbias, heads, kv_heads,     \
                             q_len, k_len, offset, window, scale);                                \
    }                                                                                             \
    extern "C" __global__ void __launch_bounds__(FLASH_THREADS) flash_backward_q_d##D(            \
        const unsigned short* q, const unsigned short* k, const unsigned short* v,                \
        const unsigned short* dout, const float* lse, const float* delta, const float* bias,      \
        unsigned short* dq, int heads, int kv_heads, int q_len, int k_len, int offset,            \
        int window, float scale) {                                                                \
        flash_backward_q<D>(q, k, v, dout, lse, delta, bias, dq, heads, kv_heads, q_len, k_len,   \
                            offset, window, scale);                                               \
    }

FLASH_BACKWARD(64)
FLASH_BACKWARD(128)
