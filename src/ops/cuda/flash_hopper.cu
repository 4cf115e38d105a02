// Hopper (sm_90a) flash attention forward on warpgroup MMA (wgmma): the same definition and
// arguments as flash_forward in flash.cu (causal, DMS key bias past `window`, output and
// log-sum-exp), FlashAttention-3's shape without its producer warps. A block is two warpgroups
// of 64 query rows each (128 rows); keys come in tiles of 128 through shared memory, copied with
// cp.async while the previous tile is computed on. S = Q Kᵀ is one m64n128k16 wgmma per 16 of
// head_dim with both operands read from shared memory by the tensor cores (not once per warp
// through ldmatrix as with mma.sync, which bound the other kernels); O += P V takes P from
// registers. The accumulator layout of a warp's 16 rows is mma.m16n8k16's, so the online softmax
// is flash.cu's.
//
// Shared tiles are in wgmma's no-swizzle "core matrix" layout: 8 rows x 16 bytes (8 bf16) stored
// as 128 contiguous bytes; the core matrix of rows 8i.. and columns 8c.. of an R-row tile sits at
// (c R/8 + i) 128 bytes. One layout serves both operand kinds: K-major (Q, K: 8-row groups 128 B
// apart, 8-column chunks 16 R B apart) and, for V, MN-major (head_dim chunks 16 R B apart, 8-key
// groups 128 B apart).
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

// Byte offset of row r, column chunk c (8 bf16) in an R-row core-matrix tile.
__device__ __forceinline__ int core_offset(int rows, int r, int c) {
    return (c * (rows / 8) + r / 8) * 128 + (r % 8) * 16;
}

// Rows first .. first + rows of a row-major [*, D] tensor into a core-matrix tile with cp.async
// (zero-filled past `limit`), by `threads` threads from `thread`: eight consecutive threads take
// eight rows of one column chunk, so each quarter-warp's stores hit distinct banks, and a warp
// reads eight 64-byte row pieces from global memory.
template <int D>
__device__ void load_core_tile_async(unsigned short* tile, const unsigned short* src, int first,
                                     int rows, int limit, int thread, int threads) {
    for (int w = thread; w < rows * D / 8; w += threads) {
#ifdef LOAD_ROWS
        const int r = w / (D / 8), c = w % (D / 8);
#else
        const int r = (w / D) * 8 + w % 8, c = (w / 8) % (D / 8);
#endif
        const bool valid = first + r < limit;
        const unsigned short* from = src + (index_t)(valid ? first + r : 0) * D + c * 8;
        asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(
                         smem_address((char*)tile + core_offset(rows, r, c))),
                     "l"(from), "r"(valid ? 16 : 0));
    }
}

// wgmma shared-memory matrix descriptor, no swizzle: start address, leading (K-direction) and
// stride (M/N-direction) byte offsets between core matrices, all in 16-byte units.
__device__ __forceinline__ unsigned long long wgmma_descriptor(const void* start, int leading,
                                                               int stride) {
    return (unsigned long long)((smem_address(start) & 0x3FFFF) >> 4) |
           ((unsigned long long)(leading >> 4) << 16) | ((unsigned long long)(stride >> 4) << 32);
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

extern "C" __global__ void __launch_bounds__(HOPPER_THREADS) flash_forward_hopper_d128(
    const unsigned short* q, const unsigned short* k, const unsigned short* v, const float* bias,
    unsigned short* out, float* lse, int heads, int kv_heads, int q_len, int k_len, int offset,
    int window, float scale) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
    constexpr int D = 128;
    constexpr int WG_ROWS = 64;
    constexpr int Q_TILE = WG_ROWS * D;          // halves, one warpgroup's Q
    constexpr int KV_TILE = HOPPER_KEYS * D;     // halves, one K or V tile
    extern __shared__ __align__(128) unsigned short hopper_shared[];
    unsigned short* q_tiles = hopper_shared;                  // 2 warpgroups
    unsigned short* kv_tiles = hopper_shared + 2 * Q_TILE;   // buffers of K then V
    float* bias_tiles = (float*)(kv_tiles + 2 * HOPPER_STAGES * KV_TILE);
    const float scale2 = scale * LOG2E;

    const int wg = threadIdx.x / 128, warp = (threadIdx.x % 128) / 32, lane = threadIdx.x % 32;
    const int g = lane / 4, t = lane % 4;
    const int block = gridDim.x - 1 - blockIdx.x;  // the heaviest row blocks first
    const int h = blockIdx.y, b = blockIdx.z;
    const int kvh = h / (heads / kv_heads);
    const int wg_row0 = block * HOPPER_ROWS + wg * WG_ROWS;
    const int row0 = wg_row0 + warp * 16;
    const index_t q_head = ((index_t)b * heads + h) * q_len;
    const index_t kv_head = ((index_t)b * kv_heads + kvh) * k_len;
    const float* bias_head = bias ? bias + kv_head : 0;
    const unsigned short* k_head = k + kv_head * D;
    const unsigned short* v_head = v + kv_head * D;
    unsigned short* q_tile = q_tiles + wg * Q_TILE;

    auto issue = [&](int kb, int buffer) {
        unsigned short* tile = kv_tiles + 2 * buffer * KV_TILE;
        load_core_tile_async<D>(tile, k_head, kb, HOPPER_KEYS, k_len, threadIdx.x, HOPPER_THREADS);
        load_core_tile_async<D>(tile + KV_TILE, v_head, kb, HOPPER_KEYS, k_len, threadIdx.x,
                                HOPPER_THREADS);
        // The bias tile too (4 bytes per copy, zero past k_len or without a bias): a plain load
        // here would stall the block for a memory latency per tile.
        if (threadIdx.x < HOPPER_KEYS) {
            const bool valid = bias_head && kb + (int)threadIdx.x < k_len;
            asm volatile("cp.async.ca.shared.global [%0], [%1], 4, %2;\n" ::"r"(
                             smem_address(bias_tiles + buffer * HOPPER_KEYS + threadIdx.x)),
                         "l"(valid ? bias_head + kb + threadIdx.x : (const float*)k_head),
                         "r"(valid ? 4 : 0));
        }
        async_commit();
    };

    float o[D / 8][4];
#pragma unroll
    for (int dt = 0; dt < D / 8; ++dt) o[dt][0] = o[dt][1] = o[dt][2] = o[dt][3] = 0.0f;
    float m[2] = {NEG_INF, NEG_INF}, l[2] = {0.0f, 0.0f};

    const int last_row = imin(q_len, (block + 1) * HOPPER_ROWS) - 1;
    const int key_end = imin(k_len, offset + last_row + 1);
    // This warpgroup's last visible key: tiles past it are all masked for its rows.
    const int wg_key_end = imin(k_len, offset + imin(q_len - 1, wg_row0 + WG_ROWS - 1) + 1);
    load_core_tile_async<D>(q_tile, q + q_head * D, wg_row0, WG_ROWS, q_len, threadIdx.x % 128, 128);
    // HOPPER_STAGES - 1 tiles in flight ahead of the one computed on; one commit group per tile
    // (empty past the end), so cp.async.wait_group counts tiles.
#pragma unroll
    for (int stage = 0; stage < HOPPER_STAGES - 1; ++stage) {
        if (stage * HOPPER_KEYS < key_end) issue(stage * HOPPER_KEYS, stage);
        else async_commit();
    }
    for (int kb = 0, buffer = 0; kb < key_end; kb += HOPPER_KEYS) {
        // The buffer of tile kb - HOPPER_KEYS was released by the previous iteration's last
        // __syncthreads.
        const int ahead = kb + (HOPPER_STAGES - 1) * HOPPER_KEYS;
        const int ahead_buffer = (buffer + HOPPER_STAGES - 1) % HOPPER_STAGES;
#ifndef HOPPER_NO_LOAD
        if (ahead < key_end) issue(ahead, ahead_buffer);
        else async_commit();
#else
        async_commit();
#endif
        async_wait<HOPPER_STAGES - 1>();
        fence_async_shared();
        __syncthreads();  // tile kb (and Q) landed for every thread and the tensor cores
        if (kb < wg_key_end) {
            const unsigned short* k_tile = kv_tiles + 2 * buffer * KV_TILE;
            const unsigned short* v_tile = k_tile + KV_TILE;
            const float* bias_tile = bias_tiles + buffer * HOPPER_KEYS;
            float s[HOPPER_KEYS / 8][4];
#ifdef HOPPER_NO_MMA
#pragma unroll
            for (int nt = 0; nt < HOPPER_KEYS / 8; ++nt) s[nt][0] = s[nt][1] = s[nt][2] = s[nt][3] = 0.01f * nt;
#else
            wgmma_fence();
#pragma unroll
            for (int kk = 0; kk < D / 16; ++kk)
                wgmma_ss_n128(s, wgmma_descriptor(q_tile + kk * 2 * WG_ROWS * 8, WG_ROWS * 16, 128),
                              wgmma_descriptor(k_tile + kk * 2 * HOPPER_KEYS * 8, HOPPER_KEYS * 16, 128),
                              kk > 0);
            wgmma_commit();
            wgmma_wait<0>();
#endif
#ifndef HOPPER_NO_SOFTMAX
            online_softmax_tile<HOPPER_KEYS, D>(s, m, l, o, kb, offset + row0, k_len, bias_head != 0,
                                                window, bias_tile, LOG2E, scale2);
#endif
#ifndef HOPPER_NO_MMA
            // O += P V, 16 keys per wgmma; V's 8-key groups are 128 B apart, its head_dim chunks
            // 16 x 128 B apart.
            wgmma_fence();
#pragma unroll
            for (int kk = 0; kk < HOPPER_KEYS / 16; ++kk) {
                unsigned int pa[4];
                c_tiles_to_a(pa, s, kk);
                wgmma_rs_n128_mn(o, pa, wgmma_descriptor(v_tile + kk * 2 * 64, 128, HOPPER_KEYS * 16));
            }
            wgmma_commit();
            wgmma_wait<0>();
#else
#pragma unroll
            for (int kk = 0; kk < HOPPER_KEYS / 16; ++kk) {
                unsigned int pa[4];
                c_tiles_to_a(pa, s, kk);
                o[kk][0] += __uint_as_float(pa[0] ^ pa[1] ^ pa[2] ^ pa[3]);
            }
#endif
        }
        __syncthreads();  // every warp is done with this buffer before it is refilled
        buffer = buffer + 1 == HOPPER_STAGES ? 0 : buffer + 1;
    }
    async_wait<0>();
    store_output_rows<D>(o, m, l, row0, q_len, out, lse, q_head, g, t);
#endif
}
