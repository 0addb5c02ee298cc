/*
 * Checks logit_bias on the device (moe_cuda_logit_bias_rows,
 * kernels/logit_bias.cu) against the host loop moe_sample_u() runs, on
 * fresh random inputs (the seed is printed; MOE_TEST_SEED=N repeats it):
 *  - rows over V in {7, 1000 (row stride 1003), 128256} with lists of 0,
 *    1, a few and MOE_MAX_LOGIT_BIAS entries (ids drawn with repeats, a
 *    few out of range): every logit equals the host's in-order fp32 sum
 *    bit for bit, ids past V and rows with no list are untouched;
 *  - the greedy id after the bias (moe_cuda_argmax_rows) equals
 *    moe_sample_u()'s greedy id with the same list in moe_sampling_t, and
 *    +100 on one id makes it the argmax;
 *  - rows = 0 is a no-op; a bad shape gives MOE_K_EBACKEND.
 * TAP; skips when there is no CUDA device.
 */

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "gpu_util.h"

extern "C" {
#include "moe.h"
#include "sampling/sampling.h"
#include "tap.h"
}
#include "argmax.h"
#include "logit_bias.h"


static void
test_rows(int V, int ld, int rows)
{
    size_t    n = (size_t) rows * ld;
    float    *x = (float *) malloc(n * sizeof(float));
    float    *y = (float *) malloc(n * sizeof(float));
    float    *want = (float *) malloc(n * sizeof(float));
    int32_t  *off = (int32_t *) malloc(rows * sizeof(int32_t));
    int32_t  *cnt = (int32_t *) malloc(rows * sizeof(int32_t));
    int32_t  *ids = (int32_t *) malloc((size_t) rows * MOE_MAX_LOGIT_BIAS
                                       * sizeof(int32_t));
    float    *bias = (float *) malloc((size_t) rows * MOE_MAX_LOGIT_BIAS
                                      * sizeof(float));
    int32_t  *am = (int32_t *) malloc(rows * sizeof(int32_t));
    float    *dx, *dbias, *tmp;
    int32_t  *doff, *dcnt, *dids, *dam;
    int       r, i, j, o = 0, bad = 0, bad_arg = 0, forced_ok = 1;
    moe_sampler_t   s;
    moe_sampling_t  sp;

    for (i = 0; i < (int) n; i++) {
        x[i] = gu_uniform() * 8.0f - 4.0f;
    }
    memcpy(want, x, n * sizeof(float));
    for (r = 0; r < rows; r++) {
        int k = r % 4 == 0 ? 0 : r % 4 == 1 ? 1
                : r % 4 == 2 ? 5 : MOE_MAX_LOGIT_BIAS;

        off[r] = o;
        cnt[r] = k;
        for (j = 0; j < k; j++) {
            /* a small id range: repeats; 1 in 50 out of range */
            ids[o + j] = gu_rand() % 50 == 0
                         ? V + (int32_t) (gu_rand() % 7)
                         : (int32_t) (gu_rand() % (uint32_t) (V < 64 ? V
                                                              : 64));
            bias[o + j] = gu_uniform() * 200.0f - 100.0f;
            if (k == 1) {
                bias[o + j] = 100.0f;       /* forces ids[o] */
            }
        }
        for (j = 0; j < k; j++) {           /* the host loop, in order */
            if (ids[o + j] >= 0 && ids[o + j] < V) {
                want[(size_t) r * ld + ids[o + j]] += bias[o + j];
            }
        }
        o += k;
    }
    dx = (float *) gu_up(x, n * sizeof(float));
    doff = (int32_t *) gu_up(off, rows * sizeof(int32_t));
    dcnt = (int32_t *) gu_up(cnt, rows * sizeof(int32_t));
    dids = (int32_t *) gu_up(ids, (size_t) (o > 0 ? o : 1)
                                  * sizeof(int32_t));
    dbias = (float *) gu_up(bias, (size_t) (o > 0 ? o : 1) * sizeof(float));
    dam = (int32_t *) gu_dev(rows * sizeof(int32_t));

    TAP_OK(moe_cuda_logit_bias_rows(dx, ld, rows, V, doff, dcnt, dids, dbias,
                                    0) == MOE_K_OK
           && moe_cuda_argmax_rows(dx, ld, rows, V, NULL, dam, 0)
              == MOE_K_OK,
           "V %d, %d rows: logit_bias + argmax launch", V, rows);
    gu_down(y, dx, n * sizeof(float));
    gu_down(am, dam, rows * sizeof(int32_t));
    for (i = 0; i < (int) n; i++) {
        bad += memcmp(&y[i], &want[i], sizeof(float)) != 0;
    }
    TAP_OK(bad == 0, "V %d: every logit == the host's in-order sum, bit for "
           "bit (untouched past V and without a list): %d differ", V, bad);

    moe_sampler_init(&s, V);
    moe_sampling_defaults(&sp);
    sp.temperature = 0.0f;
    tmp = (float *) malloc((size_t) V * sizeof(float));
    for (r = 0; r < rows; r++) {
        float   lp;
        int32_t h;

        memcpy(tmp, x + (size_t) r * ld, (size_t) V * sizeof(float));
        sp.logit_bias_ids = ids + off[r];
        sp.logit_bias = bias + off[r];
        sp.n_logit_bias = cnt[r];
        h = moe_sample_u(&s, tmp, &sp, NULL, NULL, 0.0f, &lp);
        bad_arg += am[r] != h;
        if (cnt[r] == 1 && ids[off[r]] < V) {
            forced_ok &= am[r] == ids[off[r]];
        }
    }
    TAP_OK(bad_arg == 0 && forced_ok, "V %d: device argmax == "
           "moe_sample_u()'s greedy id with the list (%d differ); +100 "
           "forces its id", V, bad_arg);
    moe_sampler_destroy(&s);
    free(tmp);
    cudaFree(dx);
    cudaFree(doff);
    cudaFree(dcnt);
    cudaFree(dids);
    cudaFree(dbias);
    cudaFree(dam);
    free(x);
    free(y);
    free(want);
    free(off);
    free(cnt);
    free(ids);
    free(bias);
    free(am);
}


int
main(void)
{
    const char         *env = getenv("MOE_TEST_SEED");
    unsigned long long  seed;
    float              *dx;
    int32_t            *di;
    int                 ndev = 0;

    if (cudaGetDeviceCount(&ndev) != cudaSuccess || ndev == 0) {
        printf("1..0 # SKIP no CUDA device\n");
        return 0;
    }
    seed = env != NULL && *env != '\0'
           ? strtoull(env, NULL, 0)
           : (unsigned long long) time(NULL) * 1000003ULL
             ^ (unsigned long long) getpid();
    gu_seed(seed);
    TAP_PLAN(11);
    TAP_DIAG("seed %llu (MOE_TEST_SEED=%llu repeats this run)", seed, seed);
    test_rows(7, 7, 8);
    test_rows(1000, 1003, 64);
    test_rows(128256, 128256, 16);

    dx = (float *) gu_dev(16 * sizeof(float));
    di = (int32_t *) gu_dev(16 * sizeof(int32_t));
    TAP_OK(moe_cuda_logit_bias_rows(dx, 16, 0, 16, NULL, NULL, NULL, NULL, 0)
           == MOE_K_OK, "rows 0: a no-op");
    TAP_OK(moe_cuda_logit_bias_rows(dx, 8, 1, 16, di, di, di, dx, 0)
           == MOE_K_EBACKEND, "ld < V: MOE_K_EBACKEND");
    cudaFree(dx);
    cudaFree(di);
    return TAP_DONE();
}
