// Hopper (sm_90a) flash attention on warpgroup MMA (wgmma), forward and backward: the same
// definitions and arguments as flash.cu's kernels (causal, DMS key bias past `window`; output and
// log-sum-exp; dK / dV / bias gradient and dQ), FlashAttention-3's shape without its producer
// warps. The forward: A block is two warpgroups
// of 64 query rows each (128 rows); keys come in tiles of 128 through shared memory, copied with
// cp.async while the previous tile is computed on. S = Q Kᵀ is one m64n128k16 wgmma per 16 of
// head_dim with both operands read from shared memory by the tensor cores (not once per warp
// through ldmatrix as with mma.sync, which bound the other kernels); O += P V takes P from
// registers. The accumulator layout of a warp's 16 rows is mma.m16n8k16's, so the online softmax
// is flash.cu's.
//
// Shared tiles are in wgmma's 128-byte-swizzle layout (the one TMA writes and FlashAttention-2
// uses for ldmatrix): a [R][128] bf16 tile is two [R][64] halves, R x 128 B each; row r of a half
// is 128 contiguous bytes whose 16-byte chunk c sits at chunk c ^ (r % 8). Sixteen consecutive
// threads copy one 256-byte row (coalesced reads), and any eight consecutive 16-byte stores land
// in distinct bank groups. The same tile serves as a K-major operand (Q, K: 8-row groups 1024 B
// apart, a k16 step 32 B on within the half) and, for V, an MN-major one (head_dim halves R x 128
// B apart, 8-key groups 1024 B apart). Tiles are 1024-byte aligned (the swizzle is computed from
// address bits).
//
// Only compiled for compute_90a (the host picks these kernels on compute capability 9.0).

#define HOPPER_ROWS 128
#define HOPPER_KEYS 128
#define HOPPER_THREADS 256
// K/V tile buffers: the tile computed on and HOPPER_STAGES - 1 in flight (3 x 64 KB + Q's 32 KB
// is within the 227 KB a block may have).
#ifndef HOPPER_STAGES
#define HOPPER_STAGES 3
#endif

// Byte offset of row r, column chunk c (8 bf16, 0 .. 15) in an R-row swizzled [R][128] tile.
__device__ __forceinline__ int swizzled_offset(int rows, int r, int c) {
    return (c / 8) * rows * 128 + r * 128 + (((c % 8) ^ (r % 8)) * 16);
}

// Rows first .. first + rows of a row-major [*, 128] tensor into a swizzled tile with cp.async
// (zero-filled past `limit`), by `threads` threads from `thread`.
__device__ void load_swizzled_tile_async(unsigned short* tile, const unsigned short* src, int first,
                                         int rows, int limit, int thread, int threads) {
    for (int w = thread; w < rows * 16; w += threads) {
        const int r = w / 16, c = w % 16;
        const bool valid = first + r < limit;
        const unsigned short* from = src + (index_t)(valid ? first + r : 0) * 128 + c * 8;
        asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(
                         smem_address((char*)tile + swizzled_offset(rows, r, c))),
                     "l"(from), "r"(valid ? 16 : 0));
    }
}

// wgmma shared-memory matrix descriptor, 128-byte swizzle: start address, leading and stride
// byte offsets, all in 16-byte units (PTX ISA, "Matrix Descriptor Format").
__device__ __forceinline__ unsigned long long wgmma_descriptor(const void* start, int leading,
                                                               int stride) {
    return (unsigned long long)((smem_address(start) & 0x3FFFF) >> 4) |
           ((unsigned long long)(leading >> 4) << 16) | ((unsigned long long)(stride >> 4) << 32) |
           (1ull << 62);
}

__device__ __forceinline__ void wgmma_fence() { asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory"); }
__device__ __forceinline__ void wgmma_commit() {
    asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory");
}
template <int N>
__device__ __forceinline__ void wgmma_wait() {
    asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(N) : "memory");
}
// Shared-memory writes by the threads (cp.async lands in the generic proxy) made visible to the
// tensor cores' reads (the async proxy).
__device__ __forceinline__ void fence_async_shared() {
    asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
}

#define WGMMA_ACC64(d)                                                                              \
    "+f"(d[0][0]), "+f"(d[0][1]), "+f"(d[0][2]), "+f"(d[0][3]), "+f"(d[1][0]), "+f"(d[1][1]),     \
        "+f"(d[1][2]), "+f"(d[1][3]), "+f"(d[2][0]), "+f"(d[2][1]), "+f"(d[2][2]), "+f"(d[2][3]),  \
        "+f"(d[3][0]), "+f"(d[3][1]), "+f"(d[3][2]), "+f"(d[3][3]), "+f"(d[4][0]), "+f"(d[4][1]),  \
        "+f"(d[4][2]), "+f"(d[4][3]), "+f"(d[5][0]), "+f"(d[5][1]), "+f"(d[5][2]), "+f"(d[5][3]),  \
        "+f"(d[6][0]), "+f"(d[6][1]), "+f"(d[6][2]), "+f"(d[6][3]), "+f"(d[7][0]), "+f"(d[7][1]),  \
        "+f"(d[7][2]), "+f"(d[7][3]), "+f"(d[8][0]), "+f"(d[8][1]), "+f"(d[8][2]), "+f"(d[8][3]),  \
        "+f"(d[9][0]), "+f"(d[9][1]), "+f"(d[9][2]), "+f"(d[9][3]), "+f"(d[10][0]),                \
        "+f"(d[10][1]), "+f"(d[10][2]), "+f"(d[10][3]), "+f"(d[11][0]), "+f"(d[11][1]),            \
        "+f"(d[11][2]), "+f"(d[11][3]), "+f"(d[12][0]), "+f"(d[12][1]), "+f"(d[12][2]),            \
        "+f"(d[12][3]), "+f"(d[13][0]), "+f"(d[13][1]), "+f"(d[13][2]), "+f"(d[13][3]),            \
        "+f"(d[14][0]), "+f"(d[14][1]), "+f"(d[14][2]), "+f"(d[14][3]), "+f"(d[15][0]),            \
        "+f"(d[15][1]), "+f"(d[15][2]), "+f"(d[15][3])
#define WGMMA_D64                                                                                  \
    "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, " \
    "%20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, %35, %36, %37, "  \
    "%38, %39, %40, %41, %42, %43, %44, %45, %46, %47, %48, %49, %50, %51, %52, %53, %54, %55, "  \
    "%56, %57, %58, %59, %60, %61, %62, %63}"

// d (64 x 128, f32; per warp mma.m16n8k16's C layout over 16 column tiles) = or += A Bᵀ, A and
// B K-major in shared memory.
__device__ __forceinline__ void wgmma_ss_n128(float (*d)[4], unsigned long long a,
                                              unsigned long long b, bool accumulate) {
    asm volatile(
        "{\n.reg .pred p;\nsetp.ne.b32 p, %66, 0;\n"
        "wgmma.mma_async.sync.aligned.m64n128k16.f32.bf16.bf16 " WGMMA_D64
        ", %64, %65, p, 1, 1, 0, 0;\n}\n"
        : WGMMA_ACC64(d)
        : "l"(a), "l"(b), "r"((int)accumulate));
}

#define WGMMA_ACC32(d)                                                                              \
    "+f"(d[0][0]), "+f"(d[0][1]), "+f"(d[0][2]), "+f"(d[0][3]), "+f"(d[1][0]), "+f"(d[1][1]),     \
        "+f"(d[1][2]), "+f"(d[1][3]), "+f"(d[2][0]), "+f"(d[2][1]), "+f"(d[2][2]), "+f"(d[2][3]),  \
        "+f"(d[3][0]), "+f"(d[3][1]), "+f"(d[3][2]), "+f"(d[3][3]), "+f"(d[4][0]), "+f"(d[4][1]),  \
        "+f"(d[4][2]), "+f"(d[4][3]), "+f"(d[5][0]), "+f"(d[5][1]), "+f"(d[5][2]), "+f"(d[5][3]),  \
        "+f"(d[6][0]), "+f"(d[6][1]), "+f"(d[6][2]), "+f"(d[6][3]), "+f"(d[7][0]), "+f"(d[7][1]),  \
        "+f"(d[7][2]), "+f"(d[7][3])
#define WGMMA_D32                                                                                  \
    "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, " \
    "%20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31}"

// The same with N = 64.
__device__ __forceinline__ void wgmma_ss_n64(float (*d)[4], unsigned long long a,
                                             unsigned long long b, bool accumulate) {
    asm volatile(
        "{\n.reg .pred p;\nsetp.ne.b32 p, %34, 0;\n"
        "wgmma.mma_async.sync.aligned.m64n64k16.f32.bf16.bf16 " WGMMA_D32
        ", %32, %33, p, 1, 1, 0, 0;\n}\n"
        : WGMMA_ACC32(d)
        : "l"(a), "l"(b), "r"((int)accumulate));
}

// d += A B with A (64 x 16) in registers (mma.m16n8k16's A layout per warp) and B (16 x 128)
// MN-major in shared memory.
__device__ __forceinline__ void wgmma_rs_n128_mn(float (*d)[4], const unsigned int* a,
                                                 unsigned long long b) {
    asm volatile(
        "wgmma.mma_async.sync.aligned.m64n128k16.f32.bf16.bf16 " WGMMA_D64
        ", {%64, %65, %66, %67}, %68, 1, 1, 1, 1;\n"
        : WGMMA_ACC64(d)
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(b));
}

// Descriptor of a K-major operand: columns 16 kk .. 16 kk + 15 of rows row0 .. (a multiple of 8)
// of a swizzled [rows][128] tile (half kk / 4, 32 B per k16 step within it, 8-row groups 1024 B
// apart; the leading offset is unused by swizzled K-major operands).
__device__ __forceinline__ unsigned long long k_major(const unsigned short* tile, int rows, int row0,
                                                      int kk) {
    return wgmma_descriptor((const char*)tile + (kk / 4) * rows * 128 + row0 * 128 + (kk % 4) * 32,
                            16, 1024);
}

// Descriptor of an MN-major operand: rows 16 kk .. 16 kk + 15 of a swizzled [rows][128] tile as
// the k dimension, its 128 columns as N (two 8-row groups, 2048 B, per step; the halves `rows`
// x 128 B apart).
__device__ __forceinline__ unsigned long long mn_major(const unsigned short* tile, int rows, int kk) {
    return wgmma_descriptor((const char*)tile + kk * 2048, rows * 128, 1024);
}

// n floats from src (zeros past `limit` or without src) into dst with 4-byte cp.async, one per
// thread from `thread` (threads at or past n copy nothing).
__device__ __forceinline__ void load_floats_async(float* dst, const float* src, int first, int n,
                                                  int limit, int thread) {
    if (thread >= n) return;
    if (src && first + thread < limit)
        asm volatile("cp.async.ca.shared.global [%0], [%1], 4;\n" ::"r"(smem_address(dst + thread)),
                     "l"(src + first + thread));
    else
        dst[thread] = 0.0f;
}

// The tiles first, first + step, .. < end through STAGES shared buffers: issue(x, buffer) starts
// tile x's cp.async copies into a buffer, body(x, buffer) computes on it once it has landed for
// every thread and the tensor cores, with the next STAGES - 1 tiles in flight. One commit group per
// tile (empty past the end), so cp.async.wait_group counts tiles; copies issued before the call
// join the first tile's group.
template <int STAGES, typename Issue, typename Body>
__device__ __forceinline__ void staged_tiles(int first, int end, int step, Issue issue, Body body) {
#pragma unroll
    for (int stage = 0; stage < STAGES - 1; ++stage) {
        if (first + stage * step < end) issue(first + stage * step, stage);
        async_commit();
    }
    for (int x = first, buffer = 0; x < end; x += step) {
        // The buffer of tile x - step was released by the previous iteration's last
        // __syncthreads.
        const int ahead = x + (STAGES - 1) * step;
        if (ahead < end) issue(ahead, (buffer + STAGES - 1) % STAGES);
        async_commit();
        async_wait<STAGES - 1>();
        fence_async_shared();
        __syncthreads();
        body(x, buffer);
        __syncthreads();  // every warp is done with this buffer before it is refilled
        buffer = buffer + 1 == STAGES ? 0 : buffer + 1;
    }
    async_wait<0>();
}

// The 1024-byte aligned start of the dynamic shared memory (the host adds 1 KB of slack): the
// swizzle pattern follows address bits.
__device__ __forceinline__ unsigned char* aligned_shared(unsigned char* raw) {
    return raw + ((1024 - (smem_address(raw) & 1023)) & 1023);
}

extern __shared__ __align__(1024) unsigned char hopper_raw[];

// A block of the forward or the dQ kernel: 128 query rows of one query head, 64 per warpgroup,
// 16 per warp, the heaviest (last, under the causal mask) blocks first.
struct QueryBlock {
    int wg_row0, row0;  // this warpgroup's and this warp's first row
    index_t q_head, kv_head;
    int key_end;     // keys any row of the block sees
    int wg_key_end;  // keys this warpgroup's rows see (none for one wholly past q_len)

    __device__ QueryBlock(int heads, int kv_heads, int q_len, int k_len, int offset) {
        const int wg = threadIdx.x / 128, warp = (threadIdx.x % 128) / 32;
        const int block = gridDim.x - 1 - blockIdx.x;
        const int h = blockIdx.y, b = blockIdx.z;
        wg_row0 = block * HOPPER_ROWS + wg * 64;
        row0 = wg_row0 + warp * 16;
        q_head = ((index_t)b * heads + h) * q_len;
        kv_head = ((index_t)b * kv_heads + h / (heads / kv_heads)) * k_len;
        key_end = imin(k_len, offset + imin(q_len, (block + 1) * HOPPER_ROWS));
        wg_key_end = wg_row0 >= q_len ? 0 : imin(k_len, offset + imin(q_len, wg_row0 + 64));
    }
};

// Starts the copies of keys kb .. kb + KEYS of a KV head into a K and a V tile (swizzled) and
// KEYS bias values (zeros without a bias), by all the block's threads.
template <int KEYS>
__device__ __forceinline__ void issue_kv_tile(unsigned short* k_tile, unsigned short* v_tile,
                                              float* bias_tile, const unsigned short* k_head,
                                              const unsigned short* v_head, const float* bias_head,
                                              int kb, int k_len) {
    load_swizzled_tile_async(k_tile, k_head, kb, KEYS, k_len, threadIdx.x, HOPPER_THREADS);
    load_swizzled_tile_async(v_tile, v_head, kb, KEYS, k_len, threadIdx.x, HOPPER_THREADS);
    load_floats_async(bias_tile, bias_head, kb, KEYS, k_len, threadIdx.x);
}

// Forward: see the top of the file. Dynamic shared memory (HOPPER_FORWARD_SHARED on the host):
// 1 KB slack, two warpgroups' Q tiles, HOPPER_STAGES K/V tile pairs, their bias tiles.
extern "C" __global__ void __launch_bounds__(HOPPER_THREADS) flash_forward_hopper_d128(
    const unsigned short* q, const unsigned short* k, const unsigned short* v, const float* bias,
    unsigned short* out, float* lse, int heads, int kv_heads, int q_len, int k_len, int offset,
    int window, float scale) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
    constexpr int D = 128, WG_ROWS = 64;
    constexpr int Q_TILE = WG_ROWS * D, KV_TILE = HOPPER_KEYS * D;  // halves
    unsigned short* q_tiles = (unsigned short*)aligned_shared(hopper_raw);
    unsigned short* kv_tiles = q_tiles + 2 * Q_TILE;  // per stage: K then V
    float* bias_tiles = (float*)(kv_tiles + 2 * HOPPER_STAGES * KV_TILE);
    const float scale2 = scale * LOG2E;

    const int lane = threadIdx.x % 32, g = lane / 4, t = lane % 4;
    const QueryBlock blk(heads, kv_heads, q_len, k_len, offset);
    const float* bias_head = bias ? bias + blk.kv_head : 0;
    unsigned short* q_tile = q_tiles + (threadIdx.x / 128) * Q_TILE;

    float o[D / 8][4];
    zero_tiles<D / 8>(o);
    float m[2] = {NEG_INF, NEG_INF}, l[2] = {0.0f, 0.0f};

    load_swizzled_tile_async(q_tile, q + blk.q_head * D, blk.wg_row0, WG_ROWS, q_len,
                             threadIdx.x % 128, 128);
    staged_tiles<HOPPER_STAGES>(
        0, blk.key_end, HOPPER_KEYS,
        [&](int kb, int buffer) {
            unsigned short* tile = kv_tiles + 2 * buffer * KV_TILE;
            issue_kv_tile<HOPPER_KEYS>(tile, tile + KV_TILE, bias_tiles + buffer * HOPPER_KEYS,
                                       k + blk.kv_head * D, v + blk.kv_head * D, bias_head, kb,
                                       k_len);
        },
        [&](int kb, int buffer) {
            if (kb >= blk.wg_key_end) return;
            const unsigned short* k_tile = kv_tiles + 2 * buffer * KV_TILE;
            const unsigned short* v_tile = k_tile + KV_TILE;
            float s[HOPPER_KEYS / 8][4];
            wgmma_fence();
#pragma unroll
            for (int kk = 0; kk < D / 16; ++kk)
                wgmma_ss_n128(s, k_major(q_tile, WG_ROWS, 0, kk), k_major(k_tile, HOPPER_KEYS, 0, kk),
                              kk > 0);
            wgmma_commit();
            wgmma_wait<0>();
            online_softmax_tile<HOPPER_KEYS, D>(s, m, l, o, kb, offset + blk.row0, k_len,
                                                bias_head != 0,
                                                window, bias_tiles + buffer * HOPPER_KEYS, LOG2E,
                                                scale2);
            // O += P V, 16 keys per wgmma.
            wgmma_fence();
#pragma unroll
            for (int kk = 0; kk < HOPPER_KEYS / 16; ++kk) {
                unsigned int pa[4];
                c_tiles_to_a(pa, s, kk);
                wgmma_rs_n128_mn(o, pa, mn_major(v_tile, HOPPER_KEYS, kk));
            }
            wgmma_commit();
            wgmma_wait<0>();
        });
    store_output_rows<D>(o, m, l, blk.row0, q_len, heads, out, lse, blk.q_head, g, t);
#endif
}

// ---- Backward on wgmma: the same two kernels as flash.cu's (dK / dV / bias gradient per key
// block, added in f32 into the group's KV head; dQ per query block), with the same arguments.
#define HOPPER_BWD_QROWS 64
#define HOPPER_BWD_KEYS 64

// dK, dV, d(bias): a block is 128 keys of one query head, 64 per warpgroup, 16 per warp; query
// tiles of 64 rows (Q, dO, lse, delta) stream through HOPPER_STAGES buffers. Per tile and
// warpgroup: Sᵀ = K Qᵀ and dPᵀ = V dOᵀ (m64n64, both operands in shared memory), Pᵀ and dSᵀ in
// registers, then dV += Pᵀ dO and dK += dSᵀ Q (m64n128, Pᵀ / dSᵀ from registers, dO / Q read
// MN-major). Dynamic shared memory: 1 KB slack, K and V tiles, per stage Q and dO tiles, lse and
// delta (HOPPER_BACKWARD_KV_SHARED on the host).
extern "C" __global__ void __launch_bounds__(HOPPER_THREADS) flash_backward_kv_hopper_d128(
    const unsigned short* q, const unsigned short* k, const unsigned short* v,
    const unsigned short* dout, const float* lse, const float* delta, const float* bias, float* dk,
    float* dv, float* dbias, int heads, int kv_heads, int q_len, int k_len, int offset, int window,
    float scale) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
    constexpr int D = 128, KEYS = 128, QROWS = HOPPER_BWD_QROWS;
    constexpr int KV_TILE = KEYS * D, Q_TILE = QROWS * D;  // halves
    unsigned short* k_tile = (unsigned short*)aligned_shared(hopper_raw);
    unsigned short* v_tile = k_tile + KV_TILE;
    unsigned short* q_tiles = v_tile + KV_TILE;  // per stage: Q then dO
    float* lse_tiles = (float*)(q_tiles + 2 * HOPPER_STAGES * Q_TILE);
    float* delta_tiles = lse_tiles + HOPPER_STAGES * QROWS;
    const float scale2 = scale * LOG2E;

    const int wg = threadIdx.x / 128, warp = (threadIdx.x % 128) / 32, lane = threadIdx.x % 32;
    const int g = lane / 4, t = lane % 4;
    const int kb = blockIdx.x * KEYS;
    const int h = blockIdx.y, b = blockIdx.z;
    const int kvh = h / (heads / kv_heads);
    const index_t kv_head = ((index_t)b * kv_heads + kvh) * k_len;
    const index_t q_head = ((index_t)b * heads + h) * q_len;
    const int wg_key0 = kb + wg * 64;
    const int key0 = wg_key0 + warp * 16;
    const float* bias_head = bias ? bias + kv_head : 0;

    float key_bias[2];
    load_key_bias(key_bias, bias_head, key0, k_len, g);
    float dk_acc[D / 8][4], dv_acc[D / 8][4];
    zero_tiles<D / 8>(dk_acc);
    zero_tiles<D / 8>(dv_acc);
    float db[2] = {0.0f, 0.0f};

    load_swizzled_tile_async(k_tile, k + kv_head * D, kb, KEYS, k_len, threadIdx.x, HOPPER_THREADS);
    load_swizzled_tile_async(v_tile, v + kv_head * D, kb, KEYS, k_len, threadIdx.x, HOPPER_THREADS);
    // Queries before position kb see none of these keys.
    const int first_q = (kb > offset ? kb - offset : 0) / QROWS * QROWS;
    staged_tiles<HOPPER_STAGES>(
        first_q, q_len, QROWS,
        [&](int q0, int buffer) {
            unsigned short* tile = q_tiles + 2 * buffer * Q_TILE;
            load_swizzled_tile_async(tile, q + q_head * D, q0, QROWS, q_len, threadIdx.x, HOPPER_THREADS);
            load_swizzled_tile_async(tile + Q_TILE, dout + q_head * D, q0, QROWS, q_len, threadIdx.x,
                                     HOPPER_THREADS);
            load_floats_async(lse_tiles + buffer * QROWS, lse + q_head, q0, QROWS, q_len, threadIdx.x);
            load_floats_async(delta_tiles + buffer * QROWS, delta + q_head, q0, QROWS, q_len,
                              threadIdx.x >= 128 ? threadIdx.x - 128 : QROWS);
        },
        [&](int q0, int buffer) {
            // Every query of the tile is before this warpgroup's first key, or its keys are all
            // past k_len.
            if (offset + q0 + QROWS - 1 < wg_key0 || wg_key0 >= k_len) return;
            const unsigned short* q_tile = q_tiles + 2 * buffer * Q_TILE;
            const unsigned short* do_tile = q_tile + Q_TILE;
            float st[QROWS / 8][4], dpt[QROWS / 8][4];
            wgmma_fence();
#pragma unroll
            for (int kk = 0; kk < D / 16; ++kk) {
                wgmma_ss_n64(st, k_major(k_tile, KEYS, wg * 64, kk), k_major(q_tile, QROWS, 0, kk), kk > 0);
                wgmma_ss_n64(dpt, k_major(v_tile, KEYS, wg * 64, kk), k_major(do_tile, QROWS, 0, kk),
                             kk > 0);
            }
            wgmma_commit();
            wgmma_wait<0>();
            key_gradient_scores<QROWS>(st, dpt, key0, q0, offset, q_len, k_len, bias_head != 0, window,
                                       key_bias, lse_tiles + buffer * QROWS,
                                       delta_tiles + buffer * QROWS, LOG2E, scale2, db);
            // dV += Pᵀ dO, dK += dSᵀ Q (scaled at the end), 16 queries per wgmma.
            wgmma_fence();
#pragma unroll
            for (int kk = 0; kk < QROWS / 16; ++kk) {
                unsigned int pa[4], sa[4];
                c_tiles_to_a(pa, st, kk);
                c_tiles_to_a(sa, dpt, kk);
                wgmma_rs_n128_mn(dv_acc, pa, mn_major(do_tile, QROWS, kk));
                wgmma_rs_n128_mn(dk_acc, sa, mn_major(q_tile, QROWS, kk));
            }
            wgmma_commit();
            wgmma_wait<0>();
        });
    store_key_gradients<D>(dk_acc, dv_acc, db, key0, k_len, dk, dv, dbias, kv_head, scale, g, t);
#endif
}

// dQ: a block is 128 query rows of one head, 64 per warpgroup; key tiles of 64 (K, V, bias) stream
// through HOPPER_STAGES buffers. Per tile and warpgroup: S = Q Kᵀ and dP = dO Vᵀ (m64n64), dS in
// registers, dQ += dS K (m64n128, K read MN-major). Dynamic shared memory: 1 KB slack, two
// warpgroups' Q and dO tiles, per stage K and V tiles and bias (HOPPER_BACKWARD_Q_SHARED on the
// host).
extern "C" __global__ void __launch_bounds__(HOPPER_THREADS) flash_backward_q_hopper_d128(
    const unsigned short* q, const unsigned short* k, const unsigned short* v,
    const unsigned short* dout, const float* lse, const float* delta, const float* bias,
    unsigned short* dq, int heads, int kv_heads, int q_len, int k_len, int offset, int window,
    float scale) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
    constexpr int D = 128, WG_ROWS = 64, KEYS = HOPPER_BWD_KEYS;
    constexpr int Q_TILE = WG_ROWS * D, KV_TILE = KEYS * D;  // halves
    unsigned short* q_tiles = (unsigned short*)aligned_shared(hopper_raw);  // per warpgroup: Q, dO
    unsigned short* kv_tiles = q_tiles + 4 * Q_TILE;                        // per stage: K, V
    float* bias_tiles = (float*)(kv_tiles + 2 * HOPPER_STAGES * KV_TILE);
    const float scale2 = scale * LOG2E;

    const int lane = threadIdx.x % 32, g = lane / 4, t = lane % 4;
    const QueryBlock blk(heads, kv_heads, q_len, k_len, offset);
    const float* bias_head = bias ? bias + blk.kv_head : 0;
    unsigned short* q_tile = q_tiles + 2 * (threadIdx.x / 128) * Q_TILE;
    unsigned short* do_tile = q_tile + Q_TILE;

    float row_lse[2], row_delta[2];
    load_row_statistics(row_lse, row_delta, lse, delta, blk.q_head, blk.row0, q_len, g);
    float dq_acc[D / 8][4];
    zero_tiles<D / 8>(dq_acc);

    load_swizzled_tile_async(q_tile, q + blk.q_head * D, blk.wg_row0, WG_ROWS, q_len,
                             threadIdx.x % 128, 128);
    load_swizzled_tile_async(do_tile, dout + blk.q_head * D, blk.wg_row0, WG_ROWS, q_len,
                             threadIdx.x % 128, 128);
    staged_tiles<HOPPER_STAGES>(
        0, blk.key_end, KEYS,
        [&](int kb, int buffer) {
            unsigned short* tile = kv_tiles + 2 * buffer * KV_TILE;
            issue_kv_tile<KEYS>(tile, tile + KV_TILE, bias_tiles + buffer * KEYS, k + blk.kv_head * D,
                                v + blk.kv_head * D, bias_head, kb, k_len);
        },
        [&](int kb, int buffer) {
            if (kb >= blk.wg_key_end) return;
            const unsigned short* k_tile = kv_tiles + 2 * buffer * KV_TILE;
            const unsigned short* v_tile = k_tile + KV_TILE;
            float s[KEYS / 8][4], dp[KEYS / 8][4];
            wgmma_fence();
#pragma unroll
            for (int kk = 0; kk < D / 16; ++kk) {
                wgmma_ss_n64(s, k_major(q_tile, WG_ROWS, 0, kk), k_major(k_tile, KEYS, 0, kk), kk > 0);
                wgmma_ss_n64(dp, k_major(do_tile, WG_ROWS, 0, kk), k_major(v_tile, KEYS, 0, kk), kk > 0);
            }
            wgmma_commit();
            wgmma_wait<0>();
            query_gradient_scores<KEYS>(s, dp, blk.row0, kb, offset, q_len, k_len, bias_head != 0, window,
                                        bias_tiles + buffer * KEYS, LOG2E, row_lse, row_delta, scale2);
            // dQ += dS K, 16 keys per wgmma (scaled at the end).
            wgmma_fence();
#pragma unroll
            for (int kk = 0; kk < KEYS / 16; ++kk) {
                unsigned int sa[4];
                c_tiles_to_a(sa, s, kk);
                wgmma_rs_n128_mn(dq_acc, sa, mn_major(k_tile, KEYS, kk));
            }
            wgmma_commit();
            wgmma_wait<0>();
        });
    store_query_gradient_rows<D>(dq_acc, blk.row0, q_len, dq, blk.q_head, scale, g, t);
#endif
}
