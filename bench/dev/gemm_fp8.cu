/*
 * fp8 prefill GEMMs (kernels/gemm_fp8.cu) on the Mixtral-8x7B shapes of a
 * 2048-token prefill, next to the limits of the same run:
 *   - cuBLAS bf16 GEMM 8192^3 (dev_limits) and cuBLASLt e4m3 GEMM 8192^3
 *     with scalar (per-tensor) scales: the fp8 tensor-core peak;
 *   - per shape (qkv, o, one expert's gate|up and down at 512 tokens, the
 *     mean rows per expert of a 2048-token prompt with top-2 of 8): the bf16
 *     cuBLAS GEMM the backend runs today and the fp8 path (per-token
 *     activation quantization + cuBLASLt with outer-vector scales), each
 *     in TFLOP/s and as a share of the fp8 peak;
 *   - one layer's GEMMs together (qkv + o + 8 experts' gate|up and down);
 *   - cuBLASLt's first heuristic answer against its best of 16, per shape;
 *   - one layer's experts per expert on 1, 2 and 4 streams, and as one
 *     strided-batched call per matrix with the rows padded (even and a
 *     2048-token prompt's uneven routing).
 * Output: a table and RESULT lines.  Usage: build/bench/dev/gemm_fp8
 */
#include <cublasLt.h>

#include "dev.cuh"
#include "gemm.h"
#include "gemm_fp8.h"

static double fp8_peak;      /* TFLOP/s, scalar scales, 8192^3 */

#define FG_SWEEP 16

/* The cuBLASLt objects of one e4m3 x e4m3 GEMM in the backend's TN form,
 * Y (M, N) = Q (M, K) . W (N, K)^T with unit scales and output type dt,
 * and the heuristic's first n (<= FG_SWEEP) answers; exits without one. */
typedef struct {
    cublasLtHandle_t                lt;
    cublasLtMatmulDesc_t            desc;
    cublasLtMatrixLayout_t          a, b, c;
    cublasLtMatmulHeuristicResult_t res[FG_SWEEP];
    int                             nres;
} fp8_lt_t;

/* batch > 1: that many GEMMs of the shape in one call, each operand
 * strided by its own size (cuBLASLt's strided batch) */
static int
fp8_lt_batch(cublasLtMatrixLayout_t l, int batch, int64_t stride)
{
    int32_t b = batch;

    return batch <= 1
           || (cublasLtMatrixLayoutSetAttribute(l,
                   CUBLASLT_MATRIX_LAYOUT_BATCH_COUNT, &b, sizeof(b))
               == CUBLAS_STATUS_SUCCESS
               && cublasLtMatrixLayoutSetAttribute(l,
                   CUBLASLT_MATRIX_LAYOUT_STRIDED_BATCH_OFFSET, &stride,
                   sizeof(stride)) == CUBLAS_STATUS_SUCCESS);
}

static void
fp8_lt_make_b(fp8_lt_t *f, int M, int N, int K, cudaDataType_t dt,
    size_t lws_bytes, int n, int batch)
{
    cublasLtMatmulPreference_t pref;
    cublasOperation_t          ta = CUBLAS_OP_T, tb = CUBLAS_OP_N;

    f->nres = 0;
    if (cublasLtCreate(&f->lt) != CUBLAS_STATUS_SUCCESS
        || cublasLtMatmulDescCreate(&f->desc, CUBLAS_COMPUTE_32F, CUDA_R_32F)
           != CUBLAS_STATUS_SUCCESS
        || cublasLtMatmulDescSetAttribute(f->desc,
               CUBLASLT_MATMUL_DESC_TRANSA, &ta, sizeof(ta))
           != CUBLAS_STATUS_SUCCESS
        || cublasLtMatmulDescSetAttribute(f->desc,
               CUBLASLT_MATMUL_DESC_TRANSB, &tb, sizeof(tb))
           != CUBLAS_STATUS_SUCCESS
        || cublasLtMatrixLayoutCreate(&f->a, CUDA_R_8F_E4M3, K, N, K)
           != CUBLAS_STATUS_SUCCESS
        || cublasLtMatrixLayoutCreate(&f->b, CUDA_R_8F_E4M3, K, M, K)
           != CUBLAS_STATUS_SUCCESS
        || cublasLtMatrixLayoutCreate(&f->c, dt, N, M, N)
           != CUBLAS_STATUS_SUCCESS
        || !fp8_lt_batch(f->a, batch, (int64_t) N * K)
        || !fp8_lt_batch(f->b, batch, (int64_t) M * K)
        || !fp8_lt_batch(f->c, batch, (int64_t) M * N)
        || cublasLtMatmulPreferenceCreate(&pref) != CUBLAS_STATUS_SUCCESS
        || cublasLtMatmulPreferenceSetAttribute(pref,
               CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES, &lws_bytes,
               sizeof(lws_bytes)) != CUBLAS_STATUS_SUCCESS
        || cublasLtMatmulAlgoGetHeuristic(f->lt, f->desc, f->a, f->b, f->c,
                                          f->c, pref, n, f->res, &f->nres)
           != CUBLAS_STATUS_SUCCESS || f->nres < 1)
    {
        fprintf(stderr, "cuBLASLt fp8 %dx%dx%d batch %d: no algorithm\n",
                M, N, K, batch);
        exit(2);
    }
    cublasLtMatmulPreferenceDestroy(pref);
}

static void
fp8_lt_make(fp8_lt_t *f, int M, int N, int K, cudaDataType_t dt,
    size_t lws_bytes, int n)
{
    fp8_lt_make_b(f, M, N, K, dt, lws_bytes, n, 1);
}

static void
fp8_lt_free(fp8_lt_t *f)
{
    cublasLtMatrixLayoutDestroy(f->a);
    cublasLtMatrixLayoutDestroy(f->b);
    cublasLtMatrixLayoutDestroy(f->c);
    cublasLtMatmulDescDestroy(f->desc);
    cublasLtDestroy(f->lt);
}


/* cuBLASLt e4m3 x e4m3 -> bf16, TN, unit scalar scales: the peak */
static void
fp8_limit(void *lws, size_t lws_bytes)
{
    const int   M = 8192;
    fp8_lt_t    f;
    float       one = 1.0f, zero = 0.0f;
    void       *x, *y;
    double      ms;

    DEV_CHECK(cudaMalloc(&x, (size_t) 2 * M * M));
    DEV_CHECK(cudaMalloc(&y, (size_t) M * M * 2));
    DEV_CHECK(cudaMemset(x, 0x30, (size_t) 2 * M * M));
    fp8_lt_make(&f, M, M, M, CUDA_R_16BF, lws_bytes, 1);
    const char *xa = (const char *) x;

    ms = dev_time(10, [&]() {
        return (int) cublasLtMatmul(f.lt, f.desc, &one, xa, f.a,
                                    xa + (size_t) M * M, f.b, &zero, y, f.c,
                                    y, f.c, &f.res[0].algo, lws, lws_bytes,
                                    0);
    });
    fp8_peak = 2.0 * M * (double) M * M / ms / 1e9;
    printf("limit: cuBLASLt e4m3 GEMM 8192^3 (scalar scales) %.0f TFLOP/s\n",
           fp8_peak);
    printf("RESULT kind=fp8_gemm_limit tflops=%.1f bf16_tflops=%.1f "
           "copy_gbs=%.0f\n", fp8_peak, dev_gemm_tflops, dev_copy_gbs);
    fp8_lt_free(&f);
    DEV_CHECK(cudaFree(x));
    DEV_CHECK(cudaFree(y));
}


/*
 * Algorithm sweep: cuBLASLt's first heuristic answer against the best of
 * its first FG_SWEEP answers, timed on the shape (unit scales, the TN
 * form and output type the backend runs: bf16 for the experts' gate|up,
 * fp32 for down and the dense projections).
 */
static void
fp8_sweep(void *lws, size_t lws_bytes, int M, int N, int K, int y_bf16)
{
    fp8_lt_t f;
    int      best = -1;
    float    one = 1.0f, zero = 0.0f;
    double   ms0 = 0, msb = 1e30, flops = 2.0 * M * (double) N * K;
    void    *w, *q, *y;

    DEV_CHECK(cudaMalloc(&w, (size_t) N * K));
    DEV_CHECK(cudaMalloc(&q, (size_t) M * K));
    DEV_CHECK(cudaMalloc(&y, (size_t) M * N * 4));
    DEV_CHECK(cudaMemset(w, 0x30, (size_t) N * K));
    DEV_CHECK(cudaMemset(q, 0x30, (size_t) M * K));
    fp8_lt_make(&f, M, N, K, y_bf16 ? CUDA_R_16BF : CUDA_R_32F, lws_bytes,
                FG_SWEEP);
    for (int i = 0; i < f.nres; i++) {
        double ms;

        if (f.res[i].state != CUBLAS_STATUS_SUCCESS) {
            continue;
        }
        ms = dev_time(10, [&]() {
            return (int) cublasLtMatmul(f.lt, f.desc, &one, w, f.a, q, f.b,
                                        &zero, y, f.c, y, f.c,
                                        &f.res[i].algo, lws, lws_bytes, 0);
        });
        if (i == 0) {
            ms0 = ms;
        }
        if (ms < msb) {
            msb = ms;
            best = i;
        }
    }
    printf("  sweep %5d x %5d x %5d %s: first %7.1f us (%5.0f TFLOP/s), "
           "best #%d of %d %7.1f us (%5.0f TFLOP/s) %.3fx\n", M, N, K,
           y_bf16 ? "bf16" : "fp32", ms0 * 1e3, flops / ms0 / 1e9, best,
           f.nres, msb * 1e3, flops / msb / 1e9, ms0 / msb);
    printf("RESULT kind=fp8_sweep shape=%d,%d,%d y_bf16=%d first_us=%.1f "
           "best_us=%.1f best=%d n=%d\n", M, N, K, y_bf16, ms0 * 1e3,
           msb * 1e3, best, f.nres);
    fp8_lt_free(&f);
    cudaFree(w);
    cudaFree(q);
    cudaFree(y);
}


/*
 * One layer's routed experts (8 experts, rows[e] each) through the
 * unscaled fp8 GEMMs of cb_fp8_ffn: gate|up then down (bf16 out, as the
 * engine writes both), per expert in order on one stream, and spread
 * over ns streams (expert e on stream e % ns, each stream its own handle
 * and workspace, forked from and joined back to stream 0 with events).
 */
static void
fp8_streams(const int *rows, int ns)
{
    const int       E = 8, D = 4096, F = 14336;
    const size_t    wsb = (size_t) 32 << 20;
    int             n = 0, off[9];
    uint8_t        *wg, *wd, *q, *qh;
    void           *tg, *td, *wsp[8];
    moe_fp8_gemm_t *g[8];
    cudaStream_t    st[8];
    cudaEvent_t     fork, join[8];
    double          flops, ms;

    for (int e = 0; e < E; e++) {
        off[e] = n;
        n += rows[e];
    }
    off[E] = n;
    flops = 2.0 * n * (2.0 * F * D + (double) D * F);
    DEV_CHECK(cudaMalloc(&wg, (size_t) E * 2 * F * D));
    DEV_CHECK(cudaMalloc(&wd, (size_t) E * D * F));
    DEV_CHECK(cudaMalloc(&q, (size_t) (n + MOE_FP8_GEMM_ROWS) * D));
    DEV_CHECK(cudaMalloc(&qh, (size_t) (n + MOE_FP8_GEMM_ROWS) * F));
    DEV_CHECK(cudaMalloc(&tg, (size_t) (n + MOE_FP8_GEMM_ROWS) * 2 * F * 2));
    DEV_CHECK(cudaMalloc(&td, (size_t) (n + MOE_FP8_GEMM_ROWS) * D * 4));
    DEV_CHECK(cudaMemset(wg, 0x30, (size_t) E * 2 * F * D));
    DEV_CHECK(cudaMemset(wd, 0x30, (size_t) E * D * F));
    DEV_CHECK(cudaMemset(q, 0x30, (size_t) (n + MOE_FP8_GEMM_ROWS) * D));
    DEV_CHECK(cudaMemset(qh, 0x30, (size_t) (n + MOE_FP8_GEMM_ROWS) * F));
    DEV_CHECK(cudaEventCreateWithFlags(&fork, cudaEventDisableTiming));
    for (int i = 0; i < ns; i++) {
        DEV_CHECK(cudaMalloc(&wsp[i], wsb));
        if (moe_cuda_fp8_gemm_create(wsp[i], wsb, &g[i]) != 0) {
            fprintf(stderr, "fp8 gemm: %s\n", moe_cuda_last_error());
            exit(2);
        }
        DEV_CHECK(cudaEventCreateWithFlags(&join[i],
                                           cudaEventDisableTiming));
        if (i == 0) {
            st[i] = 0;
        } else {
            DEV_CHECK(cudaStreamCreateWithFlags(&st[i],
                                                cudaStreamNonBlocking));
        }
    }
    ms = dev_time(10, [&]() {
        int rc = 0;

        DEV_CHECK(cudaEventRecord(fork, 0));
        for (int i = 1; i < ns; i++) {
            DEV_CHECK(cudaStreamWaitEvent(st[i], fork, 0));
        }
        for (int e = 0; e < E && rc == 0; e++) {
            rc = moe_cuda_gemm_fp8_unscaled(g[e % ns], rows[e], 2 * F, D,
                                            q + (size_t) off[e] * D,
                                            wg + (size_t) e * 2 * F * D,
                                            (uint16_t *) tg
                                            + (size_t) off[e] * 2 * F, 1,
                                            st[e % ns]);
        }
        for (int e = 0; e < E && rc == 0; e++) {
            rc = moe_cuda_gemm_fp8_unscaled(g[e % ns], rows[e], D, F,
                                            qh + (size_t) off[e] * F,
                                            wd + (size_t) e * D * F,
                                            (uint16_t *) td
                                            + (size_t) off[e] * D, 1,
                                            st[e % ns]);
        }
        for (int i = 1; i < ns; i++) {
            DEV_CHECK(cudaEventRecord(join[i], st[i]));
            DEV_CHECK(cudaStreamWaitEvent(0, join[i], 0));
        }
        return rc;
    });
    printf("  experts %d rows (%d..), %d stream%s: %8.1f us %6.0f TFLOP/s "
           "%5.1f%% of fp8 peak\n", n, rows[0], ns, ns > 1 ? "s" : "",
           ms * 1e3, flops / ms / 1e9, 100.0 * flops / ms / 1e9 / fp8_peak);
    printf("RESULT kind=fp8_expert_streams rows=%d streams=%d us=%.1f "
           "tflops=%.1f\n", n, ns, ms * 1e3, flops / ms / 1e9);
    for (int i = 0; i < ns; i++) {
        moe_cuda_fp8_gemm_destroy(g[i]);
        cudaFree(wsp[i]);
        cudaEventDestroy(join[i]);
        if (i > 0) {
            cudaStreamDestroy(st[i]);
        }
    }
    cudaEventDestroy(fork);
    cudaFree(wg);
    cudaFree(wd);
    cudaFree(q);
    cudaFree(qh);
    cudaFree(tg);
    cudaFree(td);
}


/*
 * The same layer's experts as fp8_streams, but each matrix of the 8
 * experts in ONE strided-batched cuBLASLt call: every expert's rows padded
 * to the largest count rounded up to 64 (the rows the engine would
 * quantize into padded slots).  TFLOP/s counts the real rows only, so the
 * padding is charged: the question is whether one large call (no per-call
 * wave tail, one launch) beats 8 calls despite the padded rows.
 */
static void
fp8_batched(const int *rows, void *lws, size_t lws_bytes)
{
    const int E = 8, D = 4096, F = 14336;
    int       n = 0, mp = 0;
    fp8_lt_t  fg, fd;
    float     one = 1.0f, zero = 0.0f;
    uint8_t  *wg, *wd, *q, *qh;
    void     *tg, *td;
    double    flops, ms;

    for (int e = 0; e < E; e++) {
        n += rows[e];
        mp = rows[e] > mp ? rows[e] : mp;
    }
    mp = (mp + 63) / 64 * 64;
    flops = 2.0 * n * (2.0 * F * D + (double) D * F);
    DEV_CHECK(cudaMalloc(&wg, (size_t) E * 2 * F * D));
    DEV_CHECK(cudaMalloc(&wd, (size_t) E * D * F));
    DEV_CHECK(cudaMalloc(&q, (size_t) E * mp * D));
    DEV_CHECK(cudaMalloc(&qh, (size_t) E * mp * F));
    DEV_CHECK(cudaMalloc(&tg, (size_t) E * mp * 2 * F * 2));
    DEV_CHECK(cudaMalloc(&td, (size_t) E * mp * D * 2));
    DEV_CHECK(cudaMemset(wg, 0x30, (size_t) E * 2 * F * D));
    DEV_CHECK(cudaMemset(wd, 0x30, (size_t) E * D * F));
    DEV_CHECK(cudaMemset(q, 0x30, (size_t) E * mp * D));
    DEV_CHECK(cudaMemset(qh, 0x30, (size_t) E * mp * F));
    fp8_lt_make_b(&fg, mp, 2 * F, D, CUDA_R_16BF, lws_bytes, 1, E);
    fp8_lt_make_b(&fd, mp, D, F, CUDA_R_16BF, lws_bytes, 1, E);
    ms = dev_time(10, [&]() {
        int rc = (int) cublasLtMatmul(fg.lt, fg.desc, &one, wg, fg.a, q,
                                      fg.b, &zero, tg, fg.c, tg, fg.c,
                                      &fg.res[0].algo, lws, lws_bytes, 0);

        return rc != 0 ? rc
               : (int) cublasLtMatmul(fd.lt, fd.desc, &one, wd, fd.a, qh,
                                      fd.b, &zero, td, fd.c, td, fd.c,
                                      &fd.res[0].algo, lws, lws_bytes, 0);
    });
    printf("  experts %d rows (%d..), one batched call per matrix, %d "
           "rows each: %8.1f us %6.0f TFLOP/s %5.1f%% of fp8 peak (real "
           "rows)\n", n, rows[0], mp, ms * 1e3, flops / ms / 1e9,
           100.0 * flops / ms / 1e9 / fp8_peak);
    printf("RESULT kind=fp8_expert_batched rows=%d padded=%d us=%.1f "
           "tflops=%.1f\n", n, mp, ms * 1e3, flops / ms / 1e9);
    fp8_lt_free(&fg);
    fp8_lt_free(&fd);
    cudaFree(wg);
    cudaFree(wd);
    cudaFree(q);
    cudaFree(qh);
    cudaFree(tg);
    cudaFree(td);
}


int
main(void)
{
    static const struct {
        const char *name;
        int         M, N, K, count;
    } sh[] = {
        { "qkv 2048x6144x4096", 2048, 6144, 4096, 1 },
        { "o 2048x4096x4096", 2048, 4096, 4096, 1 },
        { "expert gate|up 512x28672x4096", 512, 28672, 4096, 8 },
        { "expert down 512x4096x14336", 512, 4096, 14336, 8 },
    };
    const size_t    lws_bytes = (size_t) 64 << 20;
    void           *lws;
    cublasHandle_t  h;
    moe_fp8_gemm_t *g;
    double          lay_bf = 0, lay_f8 = 0, lay_flops = 0;

    dev_limits();
    DEV_CHECK(cudaMalloc(&lws, lws_bytes));
    fp8_limit(lws, lws_bytes);
    if (cublasCreate(&h) != CUBLAS_STATUS_SUCCESS
        || moe_cuda_fp8_gemm_create(lws, lws_bytes, &g) != 0)
    {
        fprintf(stderr, "handles: %s\n", moe_cuda_last_error());
        return 2;
    }
    for (size_t i = 0; i < sizeof(sh) / sizeof(sh[0]); i++) {
        int     M = sh[i].M, N = sh[i].N, K = sh[i].K;
        void   *x, *w, *w8, *y, *q, *qs, *ws, *tmp;
        double  flops = 2.0 * M * (double) N * K, ms_bf, ms_f8;

        DEV_CHECK(cudaMalloc(&x, (size_t) M * K * 2));
        DEV_CHECK(cudaMalloc(&w, (size_t) N * K * 2));
        DEV_CHECK(cudaMalloc(&w8, (size_t) N * K));
        DEV_CHECK(cudaMalloc(&y, (size_t) M * N * 2));
        DEV_CHECK(cudaMalloc(&q, (size_t) (M + MOE_FP8_GEMM_ROWS) * K));
        DEV_CHECK(cudaMalloc(&qs, (size_t) M * 4));
        DEV_CHECK(cudaMalloc(&ws, (size_t) N * 4));
        DEV_CHECK(cudaMalloc(&tmp, (size_t) (M + MOE_FP8_GEMM_ROWS) * N * 4));
        DEV_CHECK(cudaMemset(x, 0x3c, (size_t) M * K * 2));
        DEV_CHECK(cudaMemset(w, 0x3c, (size_t) N * K * 2));
        DEV_CHECK(cudaMemset(w8, 0x30, (size_t) N * K));
        DEV_CHECK(cudaMemset(ws, 0x3b, (size_t) N * 4));
        (void) cublasSetStream(h, 0);
        ms_bf = dev_time(10, [&]() {
            return moe_cuda_gemm(h, M, N, K, (const moe_bf16_t *) x, K,
                                 (const moe_bf16_t *) w, K, y, N, 1, 0.0f);
        });
        ms_f8 = dev_time(10, [&]() {
            int rc = moe_cuda_quant_rows_fp8((const moe_bf16_t *) x, K, NULL,
                                             1, M, K, (uint8_t *) q,
                                             (float *) qs, 0);

            return rc != 0 ? rc
                   : moe_cuda_gemm_fp8(g, M, N, K, (const uint8_t *) q,
                                       (const float *) qs,
                                       (const uint8_t *) w8,
                                       (const float *) ws, y, N, 1, 0,
                                       (float *) tmp, 0);
        });
        printf("  %-32s bf16 %8.1f us %6.0f TFLOP/s | fp8 %8.1f us %6.0f "
               "TFLOP/s %5.1f%% of fp8 peak (%s)\n", sh[i].name,
               ms_bf * 1e3, flops / ms_bf / 1e9, ms_f8 * 1e3,
               flops / ms_f8 / 1e9, 100.0 * flops / ms_f8 / 1e9 / fp8_peak,
               moe_cuda_fp8_gemm_outer_vec(g) ? "outer-vector scales"
                                              : "rescale kernel");
        printf("RESULT kind=fp8_gemm shape=%d,%d,%d bf16_ms=%.4f fp8_ms=%.4f "
               "fp8_tflops=%.1f of_fp8_peak=%.3f\n", M, N, K, ms_bf, ms_f8,
               flops / ms_f8 / 1e9, flops / ms_f8 / 1e9 / fp8_peak);
        lay_bf += ms_bf * sh[i].count;
        lay_f8 += ms_f8 * sh[i].count;
        lay_flops += flops * sh[i].count;
        cudaFree(x);
        cudaFree(w);
        cudaFree(w8);
        cudaFree(y);
        cudaFree(q);
        cudaFree(qs);
        cudaFree(ws);
        cudaFree(tmp);
    }
    printf("  one layer's GEMMs (prefill 2048): bf16 %.3f ms, fp8 %.3f ms "
           "(%.0f TFLOP/s, %.1f%% of the fp8 peak)\n", lay_bf, lay_f8,
           lay_flops / lay_f8 / 1e9, 100.0 * lay_flops / lay_f8 / 1e9
           / fp8_peak);
    printf("RESULT kind=fp8_gemm_layer bf16_ms=%.4f fp8_ms=%.4f "
           "of_fp8_peak=%.3f\n", lay_bf, lay_f8,
           lay_flops / lay_f8 / 1e9 / fp8_peak);
    {
        /* cuBLASLt's first answer against its best, per shape */
        static const int sw[][4] = {
            { 2048, 6144, 4096, 0 }, { 2048, 6144, 4096, 1 },
            { 2048, 4096, 4096, 0 }, { 2048, 4096, 4096, 1 },
            { 448, 28672, 4096, 1 }, { 512, 28672, 4096, 1 },
            { 576, 28672, 4096, 1 }, { 640, 28672, 4096, 1 },
            { 448, 4096, 14336, 0 }, { 512, 4096, 14336, 0 },
            { 576, 4096, 14336, 0 }, { 640, 4096, 14336, 0 },
        };
        /* a 2048-token prompt's uneven routing, and the even one */
        static const int uneven[8] = { 704, 640, 576, 512, 512, 448, 384,
                                       320 };
        static const int even[8] = { 512, 512, 512, 512, 512, 512, 512,
                                     512 };

        for (size_t i = 0; i < sizeof(sw) / sizeof(sw[0]); i++) {
            fp8_sweep(lws, lws_bytes, sw[i][0], sw[i][1], sw[i][2],
                      sw[i][3]);
        }
        for (int ns = 1; ns <= 4; ns *= 2) {
            fp8_streams(even, ns);
            fp8_streams(uneven, ns);
        }
        fp8_batched(even, lws, lws_bytes);
        fp8_batched(uneven, lws, lws_bytes);
    }
    moe_cuda_fp8_gemm_destroy(g);
    cublasDestroy(h);
    cudaFree(lws);
    return dev_failed;
}
