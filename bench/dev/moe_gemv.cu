/*
 * Dev harness: the grouped GEMV (kernels/moe_gemv.cu) at decode sizes on
 * mixtral expert shapes (8 experts; gate|up N 14336 Kd 4096 with the SiLU
 * epilogue, down N 4096 Kd 14336), r rows per expert.  Lines: the shipped
 * launcher (default tuning record), the same launcher with the record's
 * gemv_fma_rows at 0 (tensor cores only) and 4 (the CUDA-core kernel up to
 * 4 rows), and the variant that does not ship: the tensor-core kernel with
 * one register stage at r <= 16 (the shipped one keeps two in flight).
 * Rate: weight bytes streamed per call / time.
 *
 *   build/bench/dev/moe_gemv [rows ...]       (default 1 2 4 8 16)
 */
#include "../../kernels/moe_gemv.cu"

#include "dev.cuh"


/* The single-stage tensor-core kernel for NT (<= 2) token tiles. */
template <int NT>
static int
dev_gemv_one_stage(int silu, const bf16 *X, const int32_t *xrow, int xdiv,
    const bf16 *W, int N, int Kd, const int32_t *offs, int E, int n,
    float *Y, bf16 *H)
{
    dim3 grid((unsigned) ((N + 15) / 16), (unsigned) (n < E ? n : E));

    if (silu) {
        kernel_gemv_mma<NT, 2, 2, false><<<grid, GV_WARPS * 32>>>(
            X, Kd, xrow, xdiv, W, N, Kd, offs, E, n, Y, H, N);
    } else {
        kernel_gemv_mma<NT, 1, 4, false><<<grid, GV_WARPS * 32>>>(
            X, Kd, xrow, xdiv, W, N, Kd, offs, E, n, Y, H, N);
    }
    return (int) cudaGetLastError();
}


static void
dev_shape(int silu, int rows)
{
    const int         E = 8, N = silu ? 14336 : 4096, Kd = silu ? 4096 : 14336;
    const int         n = E * rows, xdiv = silu ? 2 : 1, iters = 50;
    size_t            wn = (size_t) E * (silu ? 2 : 1) * N * Kd;
    double            bytes = 2.0 * (double) wn;
    int32_t           offs[9], *xrow = (int32_t *) malloc(sizeof(int32_t) * n);
    moe_cuda_tuning_t tune = MOE_CUDA_TUNING_DEFAULTS;
    char              name[64];
    double            ms;

    for (int e = 0; e <= E; e++) {
        offs[e] = e * rows;
    }
    for (int r = 0; r < n; r++) {
        xrow[r] = (int32_t) (gu_rand() % (uint32_t) (n * xdiv));
    }

    const bf16 *X = (const bf16 *) dev_rand_bf((size_t) n * Kd, 1.0f);
    const bf16 *W = (const bf16 *) dev_rand_bf(wn, 0.05f);
    int32_t    *d_offs = (int32_t *) gu_up(offs, sizeof(offs));
    int32_t    *d_xrow = (int32_t *) gu_up(xrow, sizeof(int32_t) * n);
    const int32_t *xr = silu ? d_xrow : NULL;
    size_t      on = (size_t) n * N;
    void       *ref = gu_dev(on * 4), *out = gu_dev(on * 4);
    auto        shipped = [&](const moe_cuda_tuning_t *t, void *y) {
        return moe_cuda_gemv((const moe_bf16_t *) X, Kd, xr, xdiv,
                             (const moe_bf16_t *) W, N, Kd, d_offs, E, n,
                             rows, silu, (float *) y, (moe_bf16_t *) y, N, t,
                             0);
    };

    printf("%s N %d Kd %d, %d rows per expert (%.0f MB of weights)\n",
           silu ? "gate|up + SiLU" : "down", N, Kd, rows, bytes / 1e6);
    ms = dev_time(iters, [&]() { return shipped(NULL, ref); });
    dev_line("shipped (default record)", ms, bytes, 0, -1, 0);
    for (int fma = 0; fma <= 4; fma += 4) {
        tune.gemv_fma_rows = fma;
        ms = dev_time(iters, [&]() { return shipped(&tune, out); });
        snprintf(name, sizeof(name), "record gemv_fma_rows %d", fma);
        dev_line(name, ms, bytes, 0, dev_diff(out, ref, on, silu),
                 silu ? 2e-2 : 1e-3);
    }
    if (rows <= 16) {
        ms = dev_time(iters, [&]() {
            return rows <= 8
                   ? dev_gemv_one_stage<1>(silu, X, xr, xdiv, W, N, Kd,
                                           d_offs, E, n, (float *) out,
                                           (bf16 *) out)
                   : dev_gemv_one_stage<2>(silu, X, xr, xdiv, W, N, Kd,
                                           d_offs, E, n, (float *) out,
                                           (bf16 *) out);
        });
        dev_line("tensor cores, one register stage", ms, bytes, 0,
                 dev_diff(out, ref, on, silu), silu ? 2e-2 : 1e-3);
    }
    cudaFree((void *) X); cudaFree((void *) W); cudaFree(d_offs);
    cudaFree(d_xrow); cudaFree(ref); cudaFree(out);
    free(xrow);
}


int
main(int argc, char **argv)
{
    int rows[16], nr = 0;

    for (int i = 1; i < argc && nr < 16; i++) {
        rows[nr++] = atoi(argv[i]);
    }
    if (nr == 0) {
        int d[5] = { 1, 2, 4, 8, 16 };

        for (nr = 0; nr < 5; nr++) {
            rows[nr] = d[nr];
        }
    }
    gu_seed(1);
    dev_limits();
    for (int i = 0; i < nr; i++) {
        if (rows[i] < 1 || rows[i] > 64) {
            fprintf(stderr, "rows per expert: 1..64\n");
            return 2;
        }
        dev_shape(1, rows[i]);
        dev_shape(0, rows[i]);
    }
    return dev_failed;
}
