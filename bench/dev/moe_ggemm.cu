/*
 * Dev harness: the grouped tensor-core GEMM (kernels/moe_ggemm.cu) on
 * mixtral expert shapes (8 experts; gate|up N 14336 Kd 4096 with the SiLU
 * epilogue, down N 4096 Kd 14336) at r rows per expert.  Lines: the
 * shipped launcher (its own tile pick), every shipped tile forced
 * (moe_cuda_ggemm_tiled), and the variants that do not ship: the 64-token
 * tile with 128 weight rows (64/2), and the 256-byte L2 prefetch on the
 * weight loads with the picked tile.  Rate: weight bytes per call / time.
 *
 *   build/bench/dev/moe_ggemm [rows ...]      (default 8 16 32 64)
 */
#include "../../kernels/moe_ggemm.cu"

#include "dev.cuh"


/* A tile of kernel_ggemm with the prefetch flag, shipped or not. */
template <int BT, int MT>
static int
dev_gg(int silu, int pf, const bf16 *X, const int32_t *xrow, int xdiv,
    const bf16 *W, int N, int Kd, const int32_t *offs, int E, int n,
    float *Y, bf16 *H)
{
    unsigned groups = (unsigned) (n < E ? n : E);

    return silu ? gg_launch<BT, MT, true>(groups, 0, X, Kd, xrow, xdiv, W, N,
                                          Kd, offs, E, n, Y, H, N, pf)
                : gg_launch<BT, MT, false>(groups, 0, X, Kd, xrow, xdiv, W,
                                           N, Kd, offs, E, n, Y, H, N, pf);
}


/* dev_gg for a runtime tile (the shipped ones and 64/2). */
static int
dev_gg_tile(int bt, int mt, int silu, int pf, const bf16 *X,
    const int32_t *xrow, int xdiv, const bf16 *W, int N, int Kd,
    const int32_t *offs, int E, int n, float *Y, bf16 *H)
{
#define DEV_T(B, M)                                                          \
    if (bt == B && mt == M) {                                                \
        return dev_gg<B, M>(silu, pf, X, xrow, xdiv, W, N, Kd, offs, E, n,   \
                            Y, H);                                           \
    }
    DEV_T(16, 1) DEV_T(16, 2) DEV_T(32, 1) DEV_T(32, 2) DEV_T(64, 1)
    DEV_T(64, 2)
#undef DEV_T
    return MOE_K_EUNSUPPORTED;
}


static void
dev_shape(int silu, int rows)
{
    static const int tiles[5][2] = {
        { 16, 1 }, { 16, 2 }, { 32, 1 }, { 32, 2 }, { 64, 1 }
    };
    const int   E = 8, N = silu ? 14336 : 4096, Kd = silu ? 4096 : 14336;
    const int   n = E * rows, xdiv = silu ? 2 : 1, iters = 30;
    size_t      wn = (size_t) E * (silu ? 2 : 1) * N * Kd;
    double      bytes = 2.0 * (double) wn, tol = silu ? 2e-2 : 1e-3;
    int32_t     offs[9], *xrow = (int32_t *) malloc(sizeof(int32_t) * n);
    char        name[64];
    double      ms;
    int         bt, mt;

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

    moe_cuda_ggemm_pick(N, E, n, silu, d_offs, &bt, &mt);
    printf("%s N %d Kd %d, %d rows per expert (%.0f MB of weights), picked "
           "tile %d/%d\n", silu ? "gate|up + SiLU" : "down", N, Kd, rows,
           bytes / 1e6, bt, mt);
    ms = dev_time(iters, [&]() {
        return moe_cuda_ggemm((const moe_bf16_t *) X, Kd, xr, xdiv,
                              (const moe_bf16_t *) W, N, Kd, d_offs, E, n,
                              silu, (float *) ref, (moe_bf16_t *) ref, N, 0);
    });
    dev_line("shipped (picked tile)", ms, bytes, 0, -1, 0);
    for (int t = 0; t < 5; t++) {
        ms = dev_time(iters, [&]() {
            return moe_cuda_ggemm_tiled((const moe_bf16_t *) X, Kd, xr, xdiv,
                                        (const moe_bf16_t *) W, N, Kd,
                                        d_offs, E, n, silu, (float *) out,
                                        (moe_bf16_t *) out, N, tiles[t][0],
                                        tiles[t][1], 0);
        });
        snprintf(name, sizeof(name), "shipped tile %d/%d", tiles[t][0],
                 tiles[t][1]);
        dev_line(name, ms, bytes, 0, dev_diff(out, ref, on, silu), tol);
    }
    ms = dev_time(iters, [&]() {
        return dev_gg_tile(64, 2, silu, 0, X, xr, xdiv, W, N, Kd, d_offs, E,
                           n, (float *) out, (bf16 *) out);
    });
    dev_line("variant tile 64/2", ms, bytes, 0, dev_diff(out, ref, on, silu),
             tol);
    ms = dev_time(iters, [&]() {
        return dev_gg_tile(bt, mt, silu, 1, X, xr, xdiv, W, N, Kd, d_offs, E,
                           n, (float *) out, (bf16 *) out);
    });
    snprintf(name, sizeof(name), "variant L2 256B prefetch, %d/%d", bt, mt);
    dev_line(name, ms, bytes, 0, dev_diff(out, ref, on, silu), tol);
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
        int d[4] = { 8, 16, 32, 64 };

        for (nr = 0; nr < 4; nr++) {
            rows[nr] = d[nr];
        }
    }
    gu_seed(2);
    dev_limits();
    for (int i = 0; i < nr; i++) {
        if (rows[i] < 1 || rows[i] > 256) {
            fprintf(stderr, "rows per expert: 1..256\n");
            return 2;
        }
        dev_shape(1, rows[i]);
        dev_shape(0, rows[i]);
    }
    return dev_failed;
}
