/*
 * Checks the two small kernels of the CUDA backend's plumbing against host
 * references on fresh random data (the seed is printed; MOE_TEST_SEED=N
 * repeats a run), destinations poisoned (NaN bits) first:
 *  - moe_cuda_convert (kernels/convert.cu, the weight upload): F32, F16
 *    and BF16 sources into fp32 and bf16 destinations, contiguous,
 *    strided (row stride ld > the used columns) and transposed (GPT-2
 *    Conv1D) pieces, each converted in two chunks (s0 > 0 for the second):
 *    every destination element bit-equal to the host's exact widening then
 *    round-to-nearest-even (bf16 -> bf16 copies the bits), the poison left
 *    intact past the piece; a bad dtype is refused (MOE_K_EINVAL) and an
 *    empty chunk writes nothing;
 *  - moe_cuda_tp_sum (kernels/tp_sum.cu, the tensor-parallel all-reduce
 *    add): R = 1, 2, 3 (one rank NULL) and 8 ranks over a [lo, hi) slice of
 *    10007 floats, bit-equal to the host's fp32 sum in rank order, the
 *    poison left intact outside the slice; R = 0 and R = 65 refused.
 * TAP; skips when there is no CUDA device.
 */

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include <cuda_fp16.h>

#include "gpu_util.h"

extern "C" {
#include "tap.h"
}
#include "convert.h"
#include "tp_sum.h"

#define ROWS   37
#define COLS   53
#define LD     61            /* strided: source row stride > COLS */
#define PAD    64            /* poisoned destination elements past a piece */


static const char *dt_name[4] = { "", "F32", "F16", "BF16" };


/* Source element i of dtype dt as its bytes, and its exact fp32 value. */
static float
src_put(void *src, int dt, size_t i)
{
    float v = gu_uniform() * 3.0f;

    if (dt == MOE_K_DT_F32) {
        ((float *) src)[i] = v;
        return v;
    }
    if (dt == MOE_K_DT_F16) {
        __half h = __float2half_rn(v);

        memcpy((uint16_t *) src + i, &h, 2);
        return __half2float(h);
    }
    ((uint16_t *) src)[i] = gu_f2bf(v);
    return gu_bf2f(((uint16_t *) src)[i]);
}


/* One dtype, one output type, one layout (0 contiguous, 1 strided, 2
 * transposed): the piece's destination is (ROWS, COLS). */
static void
test_convert(int dt, int out_bf16, int layout)
{
    static const char *lname[3] = { "contiguous", "strided", "transposed" };
    size_t      esz = dt == MOE_K_DT_F32 ? 4 : 2, osz = out_bf16 ? 2 : 4;
    int64_t     nsrc = layout == 2 ? COLS : ROWS;  /* source rows */
    int64_t     used = layout == 2 ? ROWS : COLS;  /* elements used each */
    int64_t     ld = layout == 0 ? used : LD;
    size_t      nd = (size_t) ROWS * COLS + PAD;
    void       *hsrc = malloc((size_t) (nsrc * ld) * esz);
    float      *ref = (float *) malloc(sizeof(float) * nd);
    void       *hdst = malloc(nd * osz);
    void       *dsrc, *ddst;
    int64_t     half = nsrc / 2, bad = 0, r, j;
    int         rc;

    for (r = 0; r < nsrc; r++) {
        for (j = 0; j < ld; j++) {
            float v = src_put(hsrc, dt, (size_t) (r * ld + j));

            if (j < used) {
                size_t di = layout == 2 ? (size_t) (j * COLS + r)
                                        : (size_t) (r * COLS + j);
                ref[di] = v;
            }
        }
    }
    dsrc = gu_up(hsrc, (size_t) (nsrc * ld) * esz);
    ddst = gu_dev(nd * osz);

    /* two chunks, as the backend's staging does: rows [0, half), then
     * [half, nsrc) with s0 = half and src at that row */
    rc = moe_cuda_convert(dsrc, dt, 0, half, used, ld, layout == 2, COLS,
                          ddst, out_bf16, 0);
    if (rc == MOE_K_OK) {
        rc = moe_cuda_convert((char *) dsrc + (size_t) (half * ld) * esz, dt,
                              half, nsrc - half, used, ld, layout == 2,
                              COLS, ddst, out_bf16, 0);
    }
    if (cudaDeviceSynchronize() != cudaSuccess) {
        rc = -1;
    }
    gu_down(hdst, ddst, nd * osz);

    for (size_t i = 0; i < nd; i++) {
        if (i >= (size_t) ROWS * COLS) {
            /* past the piece: still the poison */
            bad += out_bf16 ? ((uint16_t *) hdst)[i] != 0xffff
                            : ((uint32_t *) hdst)[i] != 0xffffffffu;
        } else if (out_bf16) {
            bad += ((uint16_t *) hdst)[i] != gu_f2bf(ref[i]);
        } else {
            bad += memcmp((float *) hdst + i, ref + i, 4) != 0;
        }
    }
    TAP_OK(rc == MOE_K_OK && bad == 0, "convert %s -> %s, %s, 2 chunks: "
           "%lld of %zu elements differ (rc %d %s)", dt_name[dt],
           out_bf16 ? "bf16" : "fp32", lname[layout], (long long) bad, nd,
           rc, rc != MOE_K_OK ? moe_cuda_last_error() : "");
    cudaFree(dsrc);
    cudaFree(ddst);
    free(hsrc);
    free(ref);
    free(hdst);
}


static void
test_tp_sum(int R, int with_null)
{
    const size_t n = 10007, lo = 123, hi = 9000;
    float       *h[8], *d[8], *dst, *out, *ref;
    int64_t      bad = 0;
    int          rc, r;

    out = (float *) malloc(sizeof(float) * n);
    ref = (float *) malloc(sizeof(float) * n);
    for (r = 0; r < R; r++) {
        h[r] = (float *) malloc(sizeof(float) * n);
        gu_fill(h[r], n, 2.0f);
        d[r] = with_null && r == 1 ? NULL
               : (float *) gu_up(h[r], sizeof(float) * n);
    }
    for (size_t i = 0; i < n; i++) {
        float s = 0.0f;

        for (r = 0; r < R; r++) {
            if (d[r] != NULL) {
                s += h[r][i];
            }
        }
        ref[i] = s;
    }
    dst = (float *) gu_dev(sizeof(float) * n);
    rc = moe_cuda_tp_sum(dst, d, R, lo, hi, 0);
    if (cudaDeviceSynchronize() != cudaSuccess) {
        rc = -1;
    }
    gu_down(out, dst, sizeof(float) * n);
    for (size_t i = 0; i < n; i++) {
        uint32_t u;

        memcpy(&u, out + i, 4);
        bad += i < lo || i >= hi ? u != 0xffffffffu
                                 : memcmp(out + i, ref + i, 4) != 0;
    }
    TAP_OK(rc == MOE_K_OK && bad == 0, "tp_sum %d ranks%s over [%zu, %zu) of "
           "%zu: %lld differ from the host's rank-order sum or the poison "
           "(rc %d)", R, with_null ? " (rank 1 NULL)" : "", lo, hi, n,
           (long long) bad, rc);
    for (r = 0; r < R; r++) {
        cudaFree(d[r]);
        free(h[r]);
    }
    cudaFree(dst);
    free(out);
    free(ref);
}


int
main(void)
{
    int         ndev = 0, dt, ob, lay;
    const char *sv = getenv("MOE_TEST_SEED");
    uint64_t    seed = sv != NULL ? strtoull(sv, NULL, 10)
                                  : (uint64_t) time(NULL);
    float      *d;
    float      *srcs[65];

    if (cudaGetDeviceCount(&ndev) != cudaSuccess || ndev < 1) {
        printf("1..0 # SKIP no CUDA device\n");
        return 0;
    }
    TAP_PLAN(3 * 2 * 3 + 2 + 4 + 2);
    gu_seed(seed);
    TAP_DIAG("seed %llu (MOE_TEST_SEED repeats it)",
             (unsigned long long) seed);

    for (dt = MOE_K_DT_F32; dt <= MOE_K_DT_BF16; dt++) {
        for (ob = 0; ob < 2; ob++) {
            for (lay = 0; lay < 3; lay++) {
                test_convert(dt, ob, lay);
            }
        }
    }

    d = (float *) gu_dev(64);
    TAP_OK(moe_cuda_convert(d, 7, 0, 1, 4, 4, 0, 4, d, 0, 0)
           == MOE_K_EINVAL, "convert: dtype 7 refused (%s)",
           moe_cuda_last_error());
    {
        uint32_t u[16];

        TAP_OK(moe_cuda_convert(NULL, MOE_K_DT_F32, 0, 0, 4, 4, 0, 4, d, 0, 0)
               == MOE_K_OK && cudaDeviceSynchronize() == cudaSuccess
               && (gu_down(u, d, 64), u[0] == 0xffffffffu
                                      && u[15] == 0xffffffffu),
               "convert: an empty chunk writes nothing");
    }

    test_tp_sum(1, 0);
    test_tp_sum(2, 0);
    test_tp_sum(3, 1);
    test_tp_sum(8, 0);
    memset(srcs, 0, sizeof(srcs));
    TAP_OK(moe_cuda_tp_sum(d, srcs, 0, 0, 4, 0) == MOE_K_EINVAL
           && moe_cuda_tp_sum(d, srcs, 65, 0, 4, 0) == MOE_K_EINVAL,
           "tp_sum: 0 and 65 ranks refused");
    cudaFree(d);
    return TAP_DONE();
}
