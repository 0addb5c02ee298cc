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
 *   - one layer's GEMMs together (qkv + o + 8 experts' gate|up and down).
 * Output: a table and RESULT lines.  Usage: build/bench/dev/gemm_fp8
 */
#include <cublasLt.h>

#include "dev.cuh"
#include "gemm.h"
#include "gemm_fp8.h"

static double fp8_peak;      /* TFLOP/s, scalar scales, 8192^3 */

/* cuBLASLt e4m3 x e4m3 -> bf16, TN, unit scalar scales: the peak */
static void
fp8_limit(void *lws, size_t lws_bytes)
{
    const int                       M = 8192;
    cublasLtHandle_t                lt;
    cublasLtMatmulDesc_t            desc;
    cublasLtMatrixLayout_t          a, b, c;
    cublasLtMatmulPreference_t      pref;
    cublasLtMatmulHeuristicResult_t res;
    cublasOperation_t               ta = CUBLAS_OP_T, tb = CUBLAS_OP_N;
    int                             nres = 0;
    float                           one = 1.0f, zero = 0.0f;
    void                           *x, *y;
    double                          ms;

    DEV_CHECK(cudaMalloc(&x, (size_t) 2 * M * M));
    DEV_CHECK(cudaMalloc(&y, (size_t) M * M * 2));
    DEV_CHECK(cudaMemset(x, 0x30, (size_t) 2 * M * M));
    if (cublasLtCreate(&lt) != CUBLAS_STATUS_SUCCESS
        || cublasLtMatmulDescCreate(&desc, CUBLAS_COMPUTE_32F, CUDA_R_32F)
           != CUBLAS_STATUS_SUCCESS
        || cublasLtMatmulDescSetAttribute(desc, CUBLASLT_MATMUL_DESC_TRANSA,
                                          &ta, sizeof(ta))
           != CUBLAS_STATUS_SUCCESS
        || cublasLtMatmulDescSetAttribute(desc, CUBLASLT_MATMUL_DESC_TRANSB,
                                          &tb, sizeof(tb))
           != CUBLAS_STATUS_SUCCESS
        || cublasLtMatrixLayoutCreate(&a, CUDA_R_8F_E4M3, M, M, M)
           != CUBLAS_STATUS_SUCCESS
        || cublasLtMatrixLayoutCreate(&b, CUDA_R_8F_E4M3, M, M, M)
           != CUBLAS_STATUS_SUCCESS
        || cublasLtMatrixLayoutCreate(&c, CUDA_R_16BF, M, M, M)
           != CUBLAS_STATUS_SUCCESS
        || cublasLtMatmulPreferenceCreate(&pref) != CUBLAS_STATUS_SUCCESS
        || cublasLtMatmulPreferenceSetAttribute(pref,
               CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES, &lws_bytes,
               sizeof(lws_bytes)) != CUBLAS_STATUS_SUCCESS
        || cublasLtMatmulAlgoGetHeuristic(lt, desc, a, b, c, c, pref, 1,
                                          &res, &nres)
           != CUBLAS_STATUS_SUCCESS || nres < 1)
    {
        fprintf(stderr, "cuBLASLt fp8 8192^3: no algorithm\n");
        exit(2);
    }
    const char *xa = (const char *) x;

    ms = dev_time(10, [&]() {
        return (int) cublasLtMatmul(lt, desc, &one, xa, a,
                                    xa + (size_t) M * M, b, &zero, y, c, y,
                                    c, &res.algo, lws, lws_bytes, 0);
    });
    fp8_peak = 2.0 * M * (double) M * M / ms / 1e9;
    printf("limit: cuBLASLt e4m3 GEMM 8192^3 (scalar scales) %.0f TFLOP/s\n",
           fp8_peak);
    printf("RESULT kind=fp8_gemm_limit tflops=%.1f bf16_tflops=%.1f "
           "copy_gbs=%.0f\n", fp8_peak, dev_gemm_tflops, dev_copy_gbs);
    cublasLtMatmulPreferenceDestroy(pref);
    cublasLtMatrixLayoutDestroy(a);
    cublasLtMatrixLayoutDestroy(b);
    cublasLtMatrixLayoutDestroy(c);
    cublasLtMatmulDescDestroy(desc);
    cublasLtDestroy(lt);
    DEV_CHECK(cudaFree(x));
    DEV_CHECK(cudaFree(y));
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
        DEV_CHECK(cudaMalloc(&q, (size_t) (M + 64) * K));
        DEV_CHECK(cudaMalloc(&qs, (size_t) M * 4));
        DEV_CHECK(cudaMalloc(&ws, (size_t) N * 4));
        DEV_CHECK(cudaMalloc(&tmp, (size_t) (M + 64) * N * 4));
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
    moe_cuda_fp8_gemm_destroy(g);
    cublasDestroy(h);
    cudaFree(lws);
    return dev_failed;
}
