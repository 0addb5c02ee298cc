/*
 * The kernel dev harness (bench/dev, `make bench-dev`): what its programs
 * share.  Each program includes one kernel source from kernels/ (so the
 * variants are instantiations of the same templates the library ships,
 * compiled with the same flags), runs the shipped launcher and every
 * variant on the same random inputs, checks each variant against the
 * shipped output within bf16 bounds, and prints its time and achieved
 * GB/s or TFLOP/s next to the limits measured in the same run
 * (device-to-device copy bandwidth, cuBLAS bf16 GEMM rate).  Not a test:
 * nothing here runs under prove; a failed check prints FAIL and makes the
 * exit status 1.
 */
#ifndef MOE_BENCH_DEV_CUH
#define MOE_BENCH_DEV_CUH

#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>

#include <cublas_v2.h>
#include <cuda_runtime.h>

#include "gpu_util.h"

static int    dev_failed;
static double dev_copy_gbs;      /* device-to-device copy, read + write */
static double dev_gemm_tflops;   /* cuBLAS bf16 GEMM, fp32 accumulate */


/* Exit at once on a CUDA error of the harness itself (not a request
 * path: a dev tool). */
#define DEV_CHECK(stmt)                                                      \
    do {                                                                     \
        cudaError_t dev_e_ = (stmt);                                         \
        if (dev_e_ != cudaSuccess) {                                         \
            fprintf(stderr, "%s at %s:%d: %s\n", #stmt, __FILE__, __LINE__, \
                    cudaGetErrorString(dev_e_));                             \
            exit(2);                                                         \
        }                                                                    \
    } while (0)


/* One call of fn (0: launched); a failure exits with CUDA's reason. */
template <typename F>
static void
dev_launch(F &fn)
{
    if (fn() != 0) {
        fprintf(stderr, "launch failed: %s\n",
                cudaGetErrorString(cudaGetLastError()));
        exit(2);
    }
}

/* Milliseconds of one call of fn(): the median of DEV_ROUNDS rounds of
 * iters calls each (their mean), after warm-up calls for at least
 * DEV_WARM_MS or 2 calls.  One round after two warm-up calls, as this was
 * until 2026-12-05, timed the first variant after a setup or a change of
 * shape 5-10 % slow (the attention harness's "shipped" lines, run 18a);
 * fn returns a launcher status (MOE_K_OK = 0). */
#define DEV_ROUNDS   3
#define DEV_WARM_MS  20.0

template <typename F>
static double
dev_time(int iters, F fn)
{
    cudaEvent_t a, b;
    float       ms = 0;
    double      r[DEV_ROUNDS];
    int         warm = 0;

    DEV_CHECK(cudaEventCreate(&a));
    DEV_CHECK(cudaEventCreate(&b));
    DEV_CHECK(cudaEventRecord(a, 0));
    do {                                /* warm-up: >= 2 calls, >= 20 ms */
        dev_launch(fn);
        DEV_CHECK(cudaEventRecord(b, 0));
        DEV_CHECK(cudaEventSynchronize(b));
        DEV_CHECK(cudaEventElapsedTime(&ms, a, b));
    } while (++warm < 2 || ms < DEV_WARM_MS);
    for (int k = 0; k < DEV_ROUNDS; k++) {
        DEV_CHECK(cudaEventRecord(a, 0));
        for (int i = 0; i < iters; i++) {
            dev_launch(fn);
        }
        DEV_CHECK(cudaEventRecord(b, 0));
        DEV_CHECK(cudaEventSynchronize(b));
        DEV_CHECK(cudaEventElapsedTime(&ms, a, b));
        r[k] = (double) ms / iters;
    }
    DEV_CHECK(cudaGetLastError());
    cudaEventDestroy(a);
    cudaEventDestroy(b);
    for (int i = 1; i < DEV_ROUNDS; i++) {      /* insertion sort */
        for (int j = i; j > 0 && r[j] < r[j - 1]; j--) {
            double x = r[j];

            r[j] = r[j - 1];
            r[j - 1] = x;
        }
    }
    return r[DEV_ROUNDS / 2];
}


/* Measure the two limits every line is compared with. */
static void
dev_limits(void)
{
    size_t         n = (size_t) 1 << 30;          /* 1 GiB each way */
    void          *a, *b;
    cublasHandle_t h;
    int            M = 8192;
    float          one = 1.0f, zero = 0.0f;
    double         ms;

    DEV_CHECK(cudaMalloc(&a, n));
    DEV_CHECK(cudaMalloc(&b, n));
    DEV_CHECK(cudaMemset(a, 0, n));
    ms = dev_time(10, [&]() {
        return (int) cudaMemcpyAsync(b, a, n, cudaMemcpyDeviceToDevice, 0);
    });
    dev_copy_gbs = 2.0 * (double) n / ms / 1e6;
    DEV_CHECK(cudaFree(a));
    DEV_CHECK(cudaFree(b));

    DEV_CHECK(cudaMalloc(&a, (size_t) 2 * M * M * 2));
    DEV_CHECK(cudaMalloc(&b, (size_t) M * M * 4));
    DEV_CHECK(cudaMemset(a, 0, (size_t) 2 * M * M * 2));
    if (cublasCreate(&h) != CUBLAS_STATUS_SUCCESS) {
        fprintf(stderr, "cublasCreate failed\n");
        exit(2);
    }
    const char *x = (const char *) a;

    ms = dev_time(10, [&]() {
        return (int) cublasGemmEx(h, CUBLAS_OP_T, CUBLAS_OP_N, M, M, M, &one,
                                  x, CUDA_R_16BF, M,
                                  x + (size_t) M * M * 2, CUDA_R_16BF, M,
                                  &zero, b, CUDA_R_32F, M,
                                  CUBLAS_COMPUTE_32F,
                                  CUBLAS_GEMM_DEFAULT);
    });
    dev_gemm_tflops = 2.0 * M * (double) M * M / ms / 1e9;
    cublasDestroy(h);
    DEV_CHECK(cudaFree(a));
    DEV_CHECK(cudaFree(b));
    printf("limits: device copy %.0f GB/s, cuBLAS bf16 GEMM %.0f TFLOP/s\n",
           dev_copy_gbs, dev_gemm_tflops);
}


/*
 * One result line: name, time, achieved rate against its limit (bytes > 0:
 * GB/s against the copy bandwidth; else flops: TFLOP/s against cuBLAS),
 * and the relative RMS difference from the shipped output (err < 0: this
 * is the shipped line; err <= -2: a line with no output to compare)
 * checked against tol.
 */
static void
dev_line(const char *name, double ms, double bytes, double flops,
    double err, double tol)
{
    int bad = err >= 0 && !(err <= tol);

    if (bytes > 0) {
        double gbs = bytes / ms / 1e6;

        printf("  %-34s %9.1f us %7.0f GB/s %5.1f%% of copy", name,
               ms * 1e3, gbs, 100.0 * gbs / dev_copy_gbs);
    } else {
        double tf = flops / ms / 1e9;

        printf("  %-34s %9.1f us %7.1f TFLOP/s %5.1f%% of cuBLAS", name,
               ms * 1e3, tf, 100.0 * tf / dev_gemm_tflops);
    }
    if (err <= -2) {
        printf("\n");                  /* no output to compare */
    } else if (err < 0) {
        printf("  (shipped)\n");
    } else {
        printf("  diff %.2e %s\n", err, bad ? "FAIL" : "ok");
    }
    dev_failed |= bad;
}


/* Relative RMS difference of two device arrays of n floats (bf16 != 0:
 * n bf16 values). */
static double
dev_diff(const void *d_a, const void *d_b, size_t n, int bf16)
{
    size_t    bytes = n * (bf16 ? 2 : 4);
    void     *ha = malloc(bytes), *hb = malloc(bytes);
    double    num = 0, den = 0;

    gu_down(ha, d_a, bytes);
    gu_down(hb, d_b, bytes);
    for (size_t i = 0; i < n; i++) {
        double a = bf16 ? gu_bf2f(((uint16_t *) ha)[i]) : ((float *) ha)[i];
        double b = bf16 ? gu_bf2f(((uint16_t *) hb)[i]) : ((float *) hb)[i];

        num += (a - b) * (a - b);
        den += b * b;
    }
    free(ha);
    free(hb);
    /* a NaN anywhere fails (num != 0 holds for NaN, num > 0 does not) */
    num = den > 0 ? sqrt(num / den) : (num != 0 ? INFINITY : 0);
    return num == num ? num : INFINITY;
}


/* n bf16 values uniform in [-scale, scale) on the device. */
static void *
dev_rand_bf(size_t n, float scale)
{
    uint16_t *h = (uint16_t *) malloc(n * 2);

    for (size_t i = 0; i < n; i++) {
        h[i] = gu_f2bf(gu_uniform() * scale);
    }

    void *d = gu_up(h, n * 2);

    free(h);
    return d;
}

#endif /* MOE_BENCH_DEV_CUH */
