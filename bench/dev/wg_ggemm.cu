/*
 * Grouped fp8 GEMMs on wgmma for the fp8 prefill's routed experts, the
 * shipped one and multistage cp.async variants: every expert's tiles in
 * one launch, so no expert's GEMM ends in a partial wave of its own,
 * against the
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
 * MINB CTAs per SM.  kernels/fp8_grouped.cu: the same tiles (BN 256)
 * fed by TMA from a producer warp through mbarriers, a CTA per tile and
 * persistent (one CTA per SM, the shipped launch).  Tile
 * order: expert,
 * then column tile, then row tile (an expert's rows stay in L2 while its
 * weights stream once).  K % 128 == 0, N % 256 == 0.
 * Usage: build/bench/dev/wg_ggemm
 */
#include <cuda_fp8.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "common.cuh"
#include "gemm_fp8.h"
#include "fp8_grouped.h"
#include "fp8_grouped.cuh"
#include "ptx.cuh"
#include "wgmma.cuh"

#include "dev.cuh"

#define WG_BM  FG_BM
#define WG_BK  128
#define WG_NT  256

/* shared memory of an instance: ST stages of A (128 rows) and B (BN
 * rows), 128 bytes each, + alignment slack */
static constexpr int
wg_smem(int bn, int st)
{
    return st * (WG_BM + bn) * WG_BK + 1024;
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
    fg_tile_t t;

    if (!fg_tile(offs, E, N / WG_BN, blockIdx.x, &t)) {
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
        const uint64_t da = moe_wg_desc(sa);

#pragma unroll
        for (int h = 0; h < NH; h++) {
            moe_wg_fence_regs(d[h]);
        }
        moe_wg_fence();
#pragma unroll
        for (int ks = 0; ks < WG_BK / 32; ks++) {
            /* 32 bytes of K further: the start address + 2 (16-byte
             * units); the swizzle is applied on the address bits */
#pragma unroll
            for (int h = 0; h < NH; h++) {
                moe_wg_mma_e4m3_n128(d[h], da + 2 * ks,
                                 moe_wg_desc(sb + h * 128 * WG_BK) + 2 * ks);
            }
        }
        moe_wg_commit();
#pragma unroll
        for (int h = 0; h < NH; h++) {
            moe_wg_fence_regs(d[h]);
        }
        moe_wg_wait<1>();                   /* tile kt - 1's wgmma done */
    }
    moe_wg_wait<0>();
#pragma unroll
    for (int h = 0; h < NH; h++) {
        moe_wg_fence_regs(d[h]);
    }

    fg_store<NH>(d, wg, &t, N, nt * WG_BN, Y);
}


/* 1 when variant tag runs: DEV_FG_ONLY unset, or a comma list holding
 * it. */
static int
wg_selected(const char *tag)
{
    const char *l = getenv("DEV_FG_ONLY");
    size_t      n = strlen(tag);

    while (l != NULL && *l != '\0') {
        const char *e = strchr(l, ',');
        size_t      m = e != NULL ? (size_t) (e - l) : strlen(l);

        if (m == n && strncmp(l, tag, n) == 0) {
            return 1;
        }
        l = e != NULL ? e + 1 : NULL;
    }
    return l == NULL && getenv("DEV_FG_ONLY") == NULL;
}


/* seconds on a monotonic clock */
static double
dev_now(void)
{
    struct timespec ts;

    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double) ts.tv_sec + 1e-9 * (double) ts.tv_nsec;
}


/* One matrix of one layer's experts: rows[e] rows each, N x K weights. */
static void
wg_case(const char *name, const int *rows, int E, int N, int K,
    moe_fp8_gemm_t *g, double peak)
{
    int      off[65], n = 0;
    uint8_t *q, *w;
    int32_t *doffs;
    uint32_t *sched;
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
    DEV_CHECK(cudaMalloc(&sched, 2 * sizeof(uint32_t)));
    DEV_CHECK(cudaMemset(sched, 0, 2 * sizeof(uint32_t)));
    DEV_CHECK(cudaMalloc(&y0, (size_t) (n + MOE_FP8_GEMM_ROWS) * N * 2));
    DEV_CHECK(cudaMalloc(&y1, (size_t) (n + MOE_FP8_GEMM_ROWS) * N * 2));
    {
        /* random e4m3 codes of moderate magnitude (exponent field 4..10,
         * random sign and mantissa): no NaN, sums far inside bf16 */
        size_t   nb = (size_t) E * ws > (size_t) n * K ? (size_t) E * ws
                                                        : (size_t) n * K;
        uint8_t *h = (uint8_t *) malloc(nb + 8);
        uint64_t x = 0x9e3779b97f4a7c15ull;

        /* xorshift64, 8 codes a step (rand() per byte took ~15 s for
         * gate|up's 940 MB) */
        for (size_t i = 0; i < nb; i += 8) {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            for (int k = 0; k < 8; k++) {
                uint32_t r = (uint32_t) (x >> (8 * k)) & 0xffu;
                uint32_t m = (uint32_t) (x >> (4 * k + 3));

                h[i + k] = (uint8_t) ((r & 0x87u) | ((4u + m % 7u) << 3));
            }
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
        if (!wg_selected(tag)) {
            return;
        }
        DEV_CHECK(cudaMemset(y1, 0, (size_t) n * N * 2));
        {
            /* one launch first, watched: a variant that never ends
             * prints HANG and ends the run (a device call's limit
             * would otherwise take every later line with it) */
            double t0 = dev_now();

            launch();
            while (cudaStreamQuery(0) == cudaErrorNotReady) {
                if (dev_now() - t0 > 10.0) {
                    printf("  %-26s %-34s HANG (not done after 10 s)\n",
                           name, label);
                    printf("RESULT kind=wg_ggemm case=\"%s\" variant=%s "
                           "hang=1\n", name, tag);
                    fflush(stdout);
                    _exit(3);
                }
            }
        }
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
    if (moe_cuda_fp8_grouped_supported(N, K, ws)) {
        /* the shipped kernel (kernels/fp8_grouped.cu): TMA, a producer
         * warp, 128 x 256 tiles; one CTA per tile or persistent (one CTA
         * per SM), two n128 wgmma per k step or one n256, the epilogue
         * from the fragments or staged through shared memory */
        enum { W = MOE_FG_WIDE, S = MOE_FG_STAGED, D = MOE_FG_DYN };
        static const struct {
            const char *label, *tag;
            int         ctas, variant;
        } fv[8] = {
            { "TMA, 2 x n128, CTA per tile", "wgmma_tma_ws", 0, 0 },
            { "TMA, 2 x n128, persistent", "wgmma_tma_persist", -1, 0 },
            { "TMA, n256, CTA per tile", "wgmma_tma_n256", 0, W },
            { "TMA, n256, persistent", "wgmma_tma_n256_persist", -1, W },
            { "TMA, n256, staged, CTA per tile", "wgmma_tma_n256_st", 0,
              W | S },
            { "TMA, n256, staged, persistent", "wgmma_tma_n256_st_persist",
              -1, W | S },
            /* the tile order (fp8_gsched): drawn from a counter */
            { "persistent, drawn tiles", "gsched_1", -1, W | S | D },
            { "persistent, drawn, CTA pairs", "gsched_2", -1,
              W | S | D | MOE_FG_PAIR },
        };

        for (int v = 0; v < 8; v++) {
            run(fv[v].label, fv[v].tag, [&]() {
                (void) moe_cuda_fp8_grouped_gemm_ctas(
                    q, n + MOE_FP8_GEMM_ROWS, w, ws, doffs, E, n, N, K,
                    (moe_bf16_t *) y1, fv[v].ctas, fv[v].variant, sched, 0);
            });
        }
        run("shipped", "wgmma_tma_shipped", [&]() {
            (void) moe_cuda_fp8_grouped_gemm(q, n + MOE_FP8_GEMM_ROWS, w, ws,
                                             doffs, E, n, N, K,
                                             (moe_bf16_t *) y1, sched, 0, 0);
        });
        if (N >= 8192 && wg_selected("swiglu")) {
            /* gate|up with SwiGLU in the epilogue (H: rows x N / 2),
             * unit scales: its time only (the math: test_fp8_grouped) */
            float *sc;

            DEV_CHECK(cudaMalloc(&sc, sizeof(float) * (size_t) (E * N
                                                                + n + 1)));
            DEV_CHECK(cudaMemset(sc, 0, sizeof(float) * (size_t) (E * N
                                                                  + n + 1)));
            for (int sch = 0; sch <= 2; sch++) {
                double ms = dev_time(5, [&]() {
                    return moe_cuda_fp8_grouped_swiglu(
                        q, n + MOE_FP8_GEMM_ROWS, w, ws, doffs, E, n, N / 2,
                        K, sc + E * N, sc, N, (moe_bf16_t *) y1, sched,
                        sch == 2 ? MOE_FG_DYN | MOE_FG_PAIR
                        : sch ? MOE_FG_DYN : 0, 0);
                });
                printf("  %-26s %-34s %8.1f us %6.0f TFLOP/s %5.1f%%\n", "",
                       sch == 2 ? "SwiGLU epilogue, CTA pairs"
                       : sch ? "SwiGLU epilogue, drawn tiles"
                           : "shipped + SwiGLU epilogue (H)", ms * 1e3,
                       flops / ms / 1e9, 100.0 * flops / ms / 1e9 / peak);
                printf("RESULT kind=wg_ggemm case=\"%s\" variant=swiglu%s "
                       "us=%.1f\n", name, sch == 2 ? "_gsched_2" : sch ? "_gsched_1" : "",
                       ms * 1e3);
            }
            cudaFree(sc);
        }
    }
    cudaFree(q);
    cudaFree(w);
    cudaFree(doffs);
    cudaFree(sched);
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
    {
        /* DEV_FG_CASES: a string of case digits (default all, 01234) */
        const char *c = getenv("DEV_FG_CASES");

        if (c == NULL || *c == '\0') {
            c = "01234";
        }
        srand(11);
        if (strchr(c, '0')) {
            wg_case("small 130/1/64 N 512", small, 3, 512, 256, g, peak);
        }
        if (strchr(c, '1')) {
            wg_case("gate|up uneven", uneven, 8, 28672, 4096, g, peak);
        }
        if (strchr(c, '2')) {
            wg_case("down uneven", uneven, 8, 4096, 14336, g, peak);
        }
        if (strchr(c, '3')) {
            wg_case("gate|up even", even, 8, 28672, 4096, g, peak);
        }
        if (strchr(c, '4')) {
            wg_case("down even", even, 8, 4096, 14336, g, peak);
        }
    }
    return dev_failed;
}
