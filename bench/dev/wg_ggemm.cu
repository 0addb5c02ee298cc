/*
 * A grouped fp8 GEMM on wgmma for the fp8 prefill's routed experts, a
 * first measurement (not shipped): every expert's tiles in one launch, so
 * no expert's GEMM ends in a partial wave of its own, against the
 * per-expert cuBLASLt calls the engine makes (moe_cuda_gemm_fp8_unscaled,
 * rows rounded to 64), on one layer's gate|up (N 28672, K 4096) and down
 * (N 4096, K 14336) at the engine's uneven routing of a 2048-token prompt
 * and at an even one, next to cuBLASLt's e4m3 rate on 8192^3 in the same
 * run.
 *
 * kernel_dev_wg_ggemm<BN, ST, DIST, MINB>: Y (rows, N) bf16 = Q (rows,
 * K) e4m3 . W_e (N, K)^T for the rows of expert e (offs), unscaled (the
 * engine's contract).  CTA = 128 rows x BN columns, two warpgroups of 64
 * rows, each issuing wgmma m64n128k32 BN / 128 times per 32 of K; K tiles
 * of 128 bytes loaded with cp.async (16-byte chunks, the 128-byte
 * swizzle: chunk c of row r at c ^ (r & 7)) into ST stages, DIST tiles
 * ahead, so that the wgmma of one tile runs while the next ones load;
 * MINB CTAs per SM.  kernel_dev_wg_ggemm_tma: the same tiles fed by TMA
 * from a producer warp through mbarriers (see there).  Tile order: expert,
 * then column tile, then row tile (an expert's rows stay in L2 while its
 * weights stream once).  K % 128 == 0, N % 256 == 0.
 * Usage: build/bench/dev/wg_ggemm
 */
#include <cuda.h>
#include <cudaTypedefs.h>
#include <cuda_fp8.h>

#include "common.cuh"
#include "gemm_fp8.h"
#include "ptx.cuh"

#include "dev.cuh"

#define WG_BM  128
#define WG_BK  128
#define WG_NT  256

/* shared memory of an instance: ST stages of A (128 rows) and B (BN
 * rows), 128 bytes each, + alignment slack */
static constexpr int
wg_smem(int bn, int st)
{
    return st * (WG_BM + bn) * WG_BK + 1024;
}

/* D (64 x 128, fp32: this warpgroup's fragment d[64]) += A (64 x 32
 * e4m3, descriptor da) . B (128 x 32 e4m3, descriptor db)^T, both K-major
 * in shared memory; asynchronous until wg_wait. */
__device__ __forceinline__ void
wg_mma_e4m3_n128(float *d, uint64_t da, uint64_t db)
{
    asm volatile(
        "{\n"
        ".reg .pred p;\n"
        "setp.ne.b32 p, 1, 0;\n"
        "wgmma.mma_async.sync.aligned.m64n128k32.f32.e4m3.e4m3 {"
        "%0, %1, %2, %3, %4, %5, %6, %7, "
        "%8, %9, %10, %11, %12, %13, %14, %15, "
        "%16, %17, %18, %19, %20, %21, %22, %23, "
        "%24, %25, %26, %27, %28, %29, %30, %31, "
        "%32, %33, %34, %35, %36, %37, %38, %39, "
        "%40, %41, %42, %43, %44, %45, %46, %47, "
        "%48, %49, %50, %51, %52, %53, %54, %55, "
        "%56, %57, %58, %59, %60, %61, %62, %63}, "
        "%64, %65, p, 1, 1;\n"
        "}\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]),
          "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]),
          "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]),
          "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]),
          "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]),
          "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]),
          "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]),
          "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]),
          "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]),
          "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]),
          "+f"(d[40]), "+f"(d[41]), "+f"(d[42]), "+f"(d[43]),
          "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]),
          "+f"(d[48]), "+f"(d[49]), "+f"(d[50]), "+f"(d[51]),
          "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]),
          "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]),
          "+f"(d[60]), "+f"(d[61]), "+f"(d[62]), "+f"(d[63])
        : "l"(da), "l"(db));
}


/* a K-major e4m3 tile in shared memory, 128-byte rows, 128-byte swizzle,
 * 8-row groups 1024 bytes apart (the tile starts 1024-byte aligned) */
__device__ __forceinline__ uint64_t
wg_desc(const void *p)
{
    uint32_t a = (uint32_t) __cvta_generic_to_shared(p);

    return (uint64_t) ((a & 0x3ffff) >> 4) | ((uint64_t) 1 << 16)
           | ((uint64_t) (1024 >> 4) << 32) | ((uint64_t) 1 << 62);
}


__device__ __forceinline__ void
wg_fence(void)
{
    asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory");
}


__device__ __forceinline__ void
wg_commit(void)
{
    asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory");
}


template <int N>
__device__ __forceinline__ void
wg_wait(void)
{
    asm volatile("wgmma.wait_group.sync.aligned %0;\n" :: "n"(N) : "memory");
}


/* keep the compiler from moving accumulator reads / writes across the
 * asynchronous wgmma */
__device__ __forceinline__ void
wg_fence_regs(float *d)
{
#pragma unroll
    for (int i = 0; i < 64; i++) {
        asm volatile("" : "+f"(d[i]) :: "memory");
    }
}


/* byte pointers as moe_cp_async16's (16 bytes copied, any type) */
__device__ __forceinline__ __nv_bfloat16 *
wg_b16(unsigned char *p)
{
    return reinterpret_cast<__nv_bfloat16 *>(p);
}

__device__ __forceinline__ const __nv_bfloat16 *
wg_b16(const uint8_t *p)
{
    return reinterpret_cast<const __nv_bfloat16 *>(p);
}


/* A CTA's tile: bid over (expert, column tile of bn, row tile of
 * WG_BM) in that order; its expert e, column tile nt, first row r0 (from
 * offs[0]) and rows mrows.  0 past the last tile. */
struct wg_tile_t {
    int e, nt, r0, mrows;
};

__device__ __forceinline__ int
wg_tile(const int32_t *offs, int E, int ntn, int bid, wg_tile_t *t)
{
    for (int e = 0; e < E; e++) {
        int rows = offs[e + 1] - offs[e];
        int mtiles = (rows + WG_BM - 1) / WG_BM;

        if (bid < mtiles * ntn) {
            int mt = bid % mtiles;

            t->e = e;
            t->nt = bid / mtiles;
            t->r0 = offs[e] - offs[0] + mt * WG_BM;
            t->mrows = min(WG_BM, rows - mt * WG_BM);
            return 1;
        }
        bid -= mtiles * ntn;
    }
    return 0;
}


/* A consumer warpgroup's accumulators d[h] (columns 128 h ..) as bf16
 * into Y: d[h][4 j + c + 2 v] is row 64 wg + 16 warp + lane / 4 + 8 v of
 * the tile, column c0 + 128 h + 8 j + 2 (lane % 4) + c; rows past mrows
 * are not stored. */
template <int NH>
__device__ __forceinline__ void
wg_store(float (*d)[64], int wg, const wg_tile_t *t, int N, int c0,
    __nv_bfloat16 *Y)
{
    const int lane = threadIdx.x & 31, w = (threadIdx.x >> 5) & 3;
    const int ra = 64 * wg + 16 * w + (lane >> 2);

#pragma unroll
    for (int v = 0; v < 2; v++) {
        const int r = ra + 8 * v;

        if (r < t->mrows) {
            __nv_bfloat16 *y = Y + (size_t) (t->r0 + r) * N + c0
                               + 2 * (lane & 3);

#pragma unroll
            for (int h = 0; h < NH; h++) {
#pragma unroll
                for (int j = 0; j < 16; j++) {
                    *reinterpret_cast<__nv_bfloat162 *>(y + 128 * h + 8 * j)
                        = __floats2bfloat162_rn(d[h][4 * j + 2 * v],
                                                d[h][4 * j + 2 * v + 1]);
                }
            }
        }
    }
}


template <int BN, int ST, int DIST, int MINB>
__global__ void __launch_bounds__(WG_NT, MINB)
kernel_dev_wg_ggemm(const uint8_t *Q, const uint8_t *W, size_t wstride,
    const int32_t *offs, int E, int N, int K, __nv_bfloat16 *Y)
{
    constexpr int WG_BN = BN, WG_ST = ST, NH = BN / 128;
    static_assert(ST >= DIST + 2 && BN % 128 == 0, "stage reuse");

    extern __shared__ unsigned char wg_sm_raw[];
    unsigned char *sm = (unsigned char *)
        (((uintptr_t) wg_sm_raw + 1023) & ~(uintptr_t) 1023);
    const int tid = threadIdx.x;
    wg_tile_t t;

    if (!wg_tile(offs, E, N / WG_BN, blockIdx.x, &t)) {
        return;                         /* past the last tile */
    }

    const int r0 = t.r0, mrows = t.mrows, nt = t.nt;
    const uint8_t *qa = Q + (size_t) r0 * K;
    const uint8_t *wb = W + (size_t) t.e * wstride
                        + (size_t) nt * WG_BN * K;
    const int nk = K / WG_BK;

    auto load = [&](int kt, int st) {
        unsigned char *sa = sm + st * (WG_BM + WG_BN) * WG_BK;
        unsigned char *sb = sa + WG_BM * WG_BK;
        const size_t   k0 = (size_t) kt * WG_BK;

        /* 16-byte chunk ch of row r to its 128-byte swizzled place
         * (chunk ch ^ (r & 7)); A rows past mrows as zeros */
#pragma unroll
        for (int i = 0; i < WG_BM * 8 / WG_NT; i++) {
            int c = tid + i * WG_NT, r = c >> 3, ch = c & 7;
            int ok = r < mrows;

            moe_cp_async16(wg_b16(sa + r * 128 + ((ch ^ (r & 7)) << 4)),
                           wg_b16(ok ? qa + (size_t) r * K + k0 + ch * 16
                                     : qa), ok ? 16 : 0);
        }
#pragma unroll
        for (int i = 0; i < WG_BN * 8 / WG_NT; i++) {
            int c = tid + i * WG_NT, r = c >> 3, ch = c & 7;

            moe_cp_async16(wg_b16(sb + r * 128 + ((ch ^ (r & 7)) << 4)),
                           wg_b16(wb + (size_t) r * K + k0 + ch * 16), 16);
        }
    };

    float      d[NH][64];
    const int  wg = tid >> 7;           /* warpgroup: rows 64 wg .. */

#pragma unroll
    for (int h = 0; h < NH; h++) {
#pragma unroll
        for (int i = 0; i < 64; i++) {
            d[h][i] = 0.0f;
        }
    }
#pragma unroll
    for (int p = 0; p < DIST; p++) {
        if (p < nk) {
            load(p, p);
        }
        moe_cp_async_commit();
    }
    for (int kt = 0; kt < nk; kt++) {
        const int st = kt % WG_ST;

        /* this thread's tile kt is in */
        moe_cp_async_wait<DIST - 1>();
        asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
        __syncthreads();                /* everyone's; the stage of tile
                                         * kt + DIST - ST (its wgmma
                                         * waited for) is free */
        if (kt + DIST < nk) {
            load(kt + DIST, (kt + DIST) % WG_ST);
        }
        moe_cp_async_commit();

        const unsigned char *sa = sm + st * (WG_BM + WG_BN) * WG_BK
                                  + wg * 64 * WG_BK;
        const unsigned char *sb = sm + st * (WG_BM + WG_BN) * WG_BK
                                  + WG_BM * WG_BK;
        const uint64_t da = wg_desc(sa);

#pragma unroll
        for (int h = 0; h < NH; h++) {
            wg_fence_regs(d[h]);
        }
        wg_fence();
#pragma unroll
        for (int ks = 0; ks < WG_BK / 32; ks++) {
            /* 32 bytes of K further: the start address + 2 (16-byte
             * units); the swizzle is applied on the address bits */
#pragma unroll
            for (int h = 0; h < NH; h++) {
                wg_mma_e4m3_n128(d[h], da + 2 * ks,
                                 wg_desc(sb + h * 128 * WG_BK) + 2 * ks);
            }
        }
        wg_commit();
#pragma unroll
        for (int h = 0; h < NH; h++) {
            wg_fence_regs(d[h]);
        }
        wg_wait<1>();                   /* tile kt - 1's wgmma done */
    }
    wg_wait<0>();
#pragma unroll
    for (int h = 0; h < NH; h++) {
        wg_fence_regs(d[h]);
    }

    wg_store<NH>(d, wg, &t, N, nt * WG_BN, Y);
}


/* ---- the TMA + warp-specialised instance ---- */

/*
 * kernel_dev_wg_ggemm_tma: the same tiles (128 rows x 256 columns, tile
 * order expert, column tile, row tile), three warpgroups: warpgroup 0's
 * first thread is the producer (TMA 2-d tile loads, 128-byte swizzle,
 * of the A rows and B rows of a K tile into stage s, completing on
 * full[s] with the byte count), warpgroups 1 and 2 the consumers (64 rows
 * each: wait full[s], 8 wgmma m64n128k32, release the previous stage on
 * empty[] once its wgmma are done).  No block-wide barrier in the loop.
 * A rows past the expert's are other rows of Q (or TMA's zero fill past
 * Q's end): their results are not stored.
 */
#define WT_ST  4
#define WT_NT  384
#define WT_SMEM (WT_ST * (WG_BM + 256) * WG_BK + 1024)

__device__ __forceinline__ void
wt_mbar_init(uint64_t *b, int count)
{
    asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n"
                 :: "r"((uint32_t) __cvta_generic_to_shared(b)), "r"(count)
                 : "memory");
}


__device__ __forceinline__ void
wt_mbar_wait(uint64_t *b, int parity)
{
    uint32_t a = (uint32_t) __cvta_generic_to_shared(b);

    asm volatile(
        "{\n"
        ".reg .pred p;\n"
        "WT_WAIT:\n"
        "mbarrier.try_wait.parity.shared::cta.b64 p, [%0], %1;\n"
        "@!p bra WT_WAIT;\n"
        "}\n" :: "r"(a), "r"(parity) : "memory");
}


__device__ __forceinline__ void
wt_mbar_arrive(uint64_t *b)
{
    asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];\n"
                 :: "r"((uint32_t) __cvta_generic_to_shared(b)) : "memory");
}


__device__ __forceinline__ void
wt_mbar_expect(uint64_t *b, uint32_t bytes)
{
    asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;\n"
                 :: "r"((uint32_t) __cvta_generic_to_shared(b)), "r"(bytes)
                 : "memory");
}


/* a box of the 2-d map at (c0 = byte along K, c1 = row) into dst,
 * completing on bar */
__device__ __forceinline__ void
wt_tma_2d(void *dst, const CUtensorMap *map, int c0, int c1, uint64_t *bar)
{
    asm volatile(
        "cp.async.bulk.tensor.2d.shared::cluster.global.mbarrier::"
        "complete_tx::bytes [%0], [%1, {%2, %3}], [%4];\n"
        :: "r"((uint32_t) __cvta_generic_to_shared(dst)),
           "l"((uint64_t) map), "r"(c0), "r"(c1),
           "r"((uint32_t) __cvta_generic_to_shared(bar))
        : "memory");
}


__global__ void __launch_bounds__(WT_NT, 1)
kernel_dev_wg_ggemm_tma(const __grid_constant__ CUtensorMap mq,
    const __grid_constant__ CUtensorMap mw, const int32_t *offs, int E,
    int N, int K, __nv_bfloat16 *Y)
{
    extern __shared__ unsigned char wg_sm_raw[];
    unsigned char *sm = (unsigned char *)
        (((uintptr_t) wg_sm_raw + 1023) & ~(uintptr_t) 1023);
    __shared__ __align__(8) uint64_t full[WT_ST], empty[WT_ST];
    const int tid = threadIdx.x;
    wg_tile_t t;

    if (!wg_tile(offs, E, N / 256, blockIdx.x, &t)) {
        return;
    }

    const int nk = K / WG_BK;
    const int stage_bytes = (WG_BM + 256) * WG_BK;

    if (tid == 0) {
        for (int s = 0; s < WT_ST; s++) {
            wt_mbar_init(&full[s], 1);
            wt_mbar_init(&empty[s], 2);
        }
        asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
    }
    __syncthreads();

    if (tid < 128) {
        /* producer */
        if (tid == 0) {
            for (int kt = 0; kt < nk; kt++) {
                const int s = kt % WT_ST;

                if (kt >= WT_ST) {
                    wt_mbar_wait(&empty[s], ((kt / WT_ST) - 1) & 1);
                }
                wt_mbar_expect(&full[s], (uint32_t) stage_bytes);
                wt_tma_2d(sm + s * stage_bytes, &mq, kt * WG_BK, t.r0,
                          &full[s]);
                wt_tma_2d(sm + s * stage_bytes + WG_BM * WG_BK, &mw,
                          kt * WG_BK, t.e * N + t.nt * 256, &full[s]);
            }
        }
        return;
    }

    const int cw = (tid >> 7) - 1;      /* consumer: rows 64 cw .. */
    float     d[2][64];

#pragma unroll
    for (int h = 0; h < 2; h++) {
#pragma unroll
        for (int i = 0; i < 64; i++) {
            d[h][i] = 0.0f;
        }
    }
    for (int kt = 0; kt < nk; kt++) {
        const int s = kt % WT_ST;
        const unsigned char *sa = sm + s * stage_bytes + cw * 64 * WG_BK;
        const unsigned char *sb = sm + s * stage_bytes + WG_BM * WG_BK;
        const uint64_t da = wg_desc(sa), db0 = wg_desc(sb),
                       db1 = wg_desc(sb + 128 * WG_BK);

        wt_mbar_wait(&full[s], (kt / WT_ST) & 1);
        wg_fence_regs(d[0]);
        wg_fence_regs(d[1]);
        wg_fence();
#pragma unroll
        for (int ks = 0; ks < WG_BK / 32; ks++) {
            wg_mma_e4m3_n128(d[0], da + 2 * ks, db0 + 2 * ks);
            wg_mma_e4m3_n128(d[1], da + 2 * ks, db1 + 2 * ks);
        }
        wg_commit();
        wg_fence_regs(d[0]);
        wg_fence_regs(d[1]);
        wg_wait<1>();                   /* tile kt - 1's wgmma done */
        if (kt > 0 && (tid & 127) == 0) {
            wt_mbar_arrive(&empty[(kt - 1) % WT_ST]);
        }
    }
    wg_wait<0>();
    wg_fence_regs(d[0]);
    wg_fence_regs(d[1]);
    wg_store<2>(d, cw, &t, N, t.nt * 256, Y);
}


/* A 2-d e4m3 tensor map: rows of K bytes, boxes of box_rows x 128 bytes,
 * 128-byte swizzle, zeros past the end; exits on failure (a dev tool). */
static CUtensorMap
wt_map(const void *base, size_t rows, int K, int box_rows)
{
    static PFN_cuTensorMapEncodeTiled_v12000 enc = NULL;
    CUtensorMap                              m;
    cuuint64_t                               dim[2] = { (cuuint64_t) K,
                                                        rows };
    cuuint64_t                               stride[1] = {
                                                 (cuuint64_t) K };
    cuuint32_t                               box[2] = {
                                                 128, (cuuint32_t) box_rows };
    cuuint32_t                               es[2] = { 1, 1 };

    if (enc == NULL) {
        cudaDriverEntryPointQueryResult q;

        DEV_CHECK(cudaGetDriverEntryPointByVersion("cuTensorMapEncodeTiled",
                                                   (void **) &enc, 12000,
                                                   cudaEnableDefault, &q));
        if (enc == NULL || q != cudaDriverEntryPointSuccess) {
            fprintf(stderr, "no cuTensorMapEncodeTiled\n");
            exit(2);
        }
    }
    CUresult r = enc(&m, CU_TENSOR_MAP_DATA_TYPE_UINT8, 2, (void *) base,
                     dim, stride, box, es, CU_TENSOR_MAP_INTERLEAVE_NONE,
                     CU_TENSOR_MAP_SWIZZLE_128B,
                     CU_TENSOR_MAP_L2_PROMOTION_L2_256B,
                     CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE);

    if (r != CUDA_SUCCESS) {
        fprintf(stderr, "cuTensorMapEncodeTiled: %d\n", (int) r);
        exit(2);
    }
    return m;
}


/* One matrix of one layer's experts: rows[e] rows each, N x K weights. */
static void
wg_case(const char *name, const int *rows, int E, int N, int K,
    moe_fp8_gemm_t *g, double peak)
{
    int      off[65], n = 0;
    uint8_t *q, *w;
    int32_t *doffs;
    void    *y0, *y1;
    size_t   ws = (size_t) N * K;
    double   ms0, ms1 = 0, flops;
    int      mtiles = 0;

    for (int e = 0; e < E; e++) {
        off[e] = n;
        n += rows[e];
        mtiles += (rows[e] + WG_BM - 1) / WG_BM;
    }
    off[E] = n;
    flops = 2.0 * n * (double) N * K;
    DEV_CHECK(cudaMalloc(&q, (size_t) (n + MOE_FP8_GEMM_ROWS) * K));
    DEV_CHECK(cudaMalloc(&w, (size_t) E * ws));
    DEV_CHECK(cudaMalloc(&doffs, sizeof(int32_t) * (E + 1)));
    DEV_CHECK(cudaMalloc(&y0, (size_t) (n + MOE_FP8_GEMM_ROWS) * N * 2));
    DEV_CHECK(cudaMalloc(&y1, (size_t) (n + MOE_FP8_GEMM_ROWS) * N * 2));
    {
        /* random e4m3 codes of moderate magnitude (exponent field 4..10,
         * random sign and mantissa): no NaN, sums far inside bf16 */
        size_t   nb = (size_t) E * ws > (size_t) n * K ? (size_t) E * ws
                                                        : (size_t) n * K;
        uint8_t *h = (uint8_t *) malloc(nb);

        for (size_t i = 0; i < nb; i++) {
            uint32_t r = (uint32_t) rand();

            h[i] = (uint8_t) ((r & 0x87u) | ((4u + (r >> 8) % 7u) << 3));
        }
        DEV_CHECK(cudaMemcpy(w, h, (size_t) E * ws, cudaMemcpyHostToDevice));
        DEV_CHECK(cudaMemcpy(q, h + 7, (size_t) n * K,
                             cudaMemcpyHostToDevice));
        free(h);
    }
    DEV_CHECK(cudaMemcpy(doffs, off, sizeof(int32_t) * (E + 1),
                         cudaMemcpyHostToDevice));
    ms0 = dev_time(5, [&]() {
        int rc = 0;

        for (int e = 0; e < E; e++) {
            if (rows[e] > 0) {
                rc |= moe_cuda_gemm_fp8_unscaled(g, rows[e], N, K,
                          q + (size_t) off[e] * K, w + (size_t) e * ws,
                          (char *) y0 + (size_t) off[e] * N * 2, 1, 0);
            }
        }
        return rc;
    });
    printf("  %-26s cuBLASLt per expert  %8.1f us %6.0f TFLOP/s %5.1f%% "
           "of the e4m3 rate\n", name, ms0 * 1e3, flops / ms0 / 1e9,
           100.0 * flops / ms0 / 1e9 / peak);
    printf("RESULT kind=wg_ggemm case=\"%s\" variant=cublaslt N=%d K=%d "
           "rows=%d us=%.1f\n", name, N, K, n, ms0 * 1e3);

    /* one grouped instance: launch() into y1 timed, checked against y0,
     * a table line (label) and a RESULT line (variant tag) */
    auto run = [&](const char *label, const char *tag, auto launch) {
        DEV_CHECK(cudaMemset(y1, 0, (size_t) n * N * 2));
        ms1 = dev_time(5, [&]() {
            launch();
            return (int) cudaGetLastError();
        });
        DEV_CHECK(cudaDeviceSynchronize());

        double err = dev_diff(y0, y1, (size_t) n * N, 1);

        printf("  %-26s %-34s %8.1f us %6.0f TFLOP/s %5.1f%%  diff %.2e "
               "%s\n", "", label, ms1 * 1e3, flops / ms1 / 1e9,
               100.0 * flops / ms1 / 1e9 / peak, err,
               err <= 1e-2 ? "ok" : "FAIL");
        printf("RESULT kind=wg_ggemm case=\"%s\" variant=%s us=%.1f "
               "diff=%.3e\n", name, tag, ms1 * 1e3, err);
        dev_failed |= !(err <= 1e-2);
    };

    /* the multistage instances: BN, stages, tiles in flight ahead, CTAs
     * per SM */
#define WG_V(BN, ST, DIST, MINB)                                             \
    do {                                                                     \
        auto kf = kernel_dev_wg_ggemm<BN, ST, DIST, MINB>;                   \
        DEV_CHECK(cudaFuncSetAttribute(kf,                                   \
            cudaFuncAttributeMaxDynamicSharedMemorySize, wg_smem(BN, ST)));  \
        run("wgmma BN " #BN " st " #ST " ahead " #DIST " " #MINB "/SM",      \
            "wgmma_" #BN "_" #ST "_" #DIST "_" #MINB, [&]() {                \
                kf<<<(unsigned) (mtiles * (N / BN)), WG_NT,                  \
                     wg_smem(BN, ST)>>>(q, w, ws, doffs, E, N, K,            \
                                        (__nv_bfloat16 *) y1);               \
            });                                                              \
    } while (0)
    WG_V(256, 4, 2, 1);
    WG_V(128, 3, 1, 2);
    WG_V(128, 6, 4, 1);
#undef WG_V
    if (N % 256 == 0) {
        CUtensorMap mq = wt_map(q, (size_t) n, K, WG_BM);
        CUtensorMap mw = wt_map(w, (size_t) E * N, K, 256);

        DEV_CHECK(cudaFuncSetAttribute(kernel_dev_wg_ggemm_tma,
                      cudaFuncAttributeMaxDynamicSharedMemorySize, WT_SMEM));
        run("wgmma TMA, producer warp, BN 256", "wgmma_tma_ws", [&]() {
            kernel_dev_wg_ggemm_tma<<<(unsigned) (mtiles * (N / 256)), WT_NT,
                                      WT_SMEM>>>(mq, mw, doffs, E, N, K,
                                                 (__nv_bfloat16 *) y1);
        });
    }
    cudaFree(q);
    cudaFree(w);
    cudaFree(doffs);
    cudaFree(y0);
    cudaFree(y1);
}


int
main(void)
{
    static const int uneven[8] = { 1022, 700, 560, 480, 420, 380, 344, 190 };
    static const int even[8] = { 512, 512, 512, 512, 512, 512, 512, 512 };
    static const int small[3] = { 130, 1, 64 };
    moe_fp8_gemm_t  *g;
    void            *ws;
    double           peak;

    dev_limits();
    DEV_CHECK(cudaMalloc(&ws, (size_t) 32 << 20));
    if (moe_cuda_fp8_gemm_create(ws, (size_t) 32 << 20, &g) != 0) {
        fprintf(stderr, "fp8 gemm: %s\n", moe_cuda_last_error());
        return 2;
    }
    {
        /* the e4m3 rate: cuBLASLt on 8192^3, unit scales, bf16 out */
        const int M = 8192;
        uint8_t  *a, *b;
        void     *c;

        DEV_CHECK(cudaMalloc(&a, (size_t) M * M));
        DEV_CHECK(cudaMalloc(&b, (size_t) M * M));
        DEV_CHECK(cudaMalloc(&c, (size_t) M * M * 2));
        DEV_CHECK(cudaMemset(a, 0x30, (size_t) M * M));
        DEV_CHECK(cudaMemset(b, 0x30, (size_t) M * M));
        double ms = dev_time(10, [&]() {
            return moe_cuda_gemm_fp8_unscaled(g, M, M, M, a, b, c, 1, 0);
        });
        peak = 2.0 * M * (double) M * M / ms / 1e9;
        printf("limit: cuBLASLt e4m3 8192^3 (unit scales, bf16 out) %.0f "
               "TFLOP/s\n", peak);
        cudaFree(a);
        cudaFree(b);
        cudaFree(c);
    }
    srand(11);
    wg_case("small 130/1/64 N 512", small, 3, 512, 256, g, peak);
    wg_case("gate|up uneven", uneven, 8, 28672, 4096, g, peak);
    wg_case("down uneven", uneven, 8, 4096, 14336, g, peak);
    wg_case("gate|up even", even, 8, 28672, 4096, g, peak);
    wg_case("down even", even, 8, 4096, 14336, g, peak);
    return dev_failed;
}
