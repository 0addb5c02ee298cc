/*
 * Checks the device logprobs kernel (moe_cuda_logprobs_rows,
 * kernels/logprobs.cu) against the host's moe_logprobs_row() on fresh
 * random inputs (the seed is printed; MOE_TEST_SEED=N repeats a run):
 *  - 64 rows for each V in {6, 1000 (row stride 1003), 32000, 151936}:
 *    logits normal x a scale in [0.5, 8], half the rows rounded to bf16
 *    and some quantised to a few values (ties everywhere), n_valid
 *    sometimes < V, temperatures 1 / 0.7 / 1.5 / greedy (1), k from 0 to
 *    20, the chosen id random (one row out of range: NAN);
 *  - the chosen logprob within 1e-4 of the host's (fp32 logits, sums in
 *    double on both sides), every top entry's id equal to the host's (the
 *    same order: logit descending, ties by ascending id) and its logprob
 *    within 1e-4; entries past min(k, n) are id -1; exp() of the top
 *    entries sums to <= 1 (+1e-5);
 *  - a disabled row is left untouched (its poisoned outputs stay);
 *  - NaN logits are never in the top and leave the other logprobs finite;
 *  - rows = 0 is a no-op; bad arguments give MOE_K_EBACKEND;
 *  - timing (diagnostic): V 151936, k 20, 1 and 64 rows.
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
#include "sampling/sampling.h"
#include "tap.h"
}
#include "logprobs.h"

#define K  MOE_K_LOGPROBS_MAX_K


static float
gauss(void)
{
    float a = (gu_uniform() + 1.0f) * 0.5f, b = (gu_uniform() + 1.0f) * 0.5f;

    if (a < 1e-7f) {
        a = 1e-7f;
    }
    return sqrtf(-2.0f * logf(a)) * cosf(6.2831853f * b);
}


static int
irand(int n)
{
    return (int) (gu_rand() % (uint32_t) n);
}


/* one batch of `rows` rows of V (stride ld) against the host */
static void
test_vs_host(int V, int ld, int rows)
{
    static const float  temps[4] = { 1.0f, 0.7f, 1.5f, 0.0f };
    size_t              nx = (size_t) rows * ld;
    float              *x = (float *) malloc(nx * sizeof(float));
    float              *lp = (float *) malloc(rows * sizeof(float));
    float              *tlp = (float *) malloc((size_t) rows * K * 4);
    int32_t            *tid = (int32_t *) malloc((size_t) rows * K * 4);
    int32_t            *ch = (int32_t *) malloc(rows * sizeof(int32_t));
    float              *T = (float *) malloc(rows * sizeof(float));
    moe_cuda_logprobs_param_t *p = (moe_cuda_logprobs_param_t *)
        calloc((size_t) rows, sizeof(*p));
    moe_logprob_entry_t top[K];
    int                 r, i, j, n, bad_lp = 0, bad_id = 0, bad_tlp = 0;
    int                 bad_tail = 0, bad_mass = 0, rc;
    double              worst = 0.0;

    for (r = 0; r < rows; r++) {
        float scale = 0.5f + 7.5f * (gu_uniform() + 1.0f) * 0.5f;
        int   quant = irand(4) == 0, bf = irand(2);

        for (i = 0; i < ld; i++) {
            float v = gauss() * scale;

            if (quant) {
                v = floorf(v);
            } else if (bf) {
                v = gu_round_bf(v);
            }
            x[(size_t) r * ld + i] = v;
        }
        p[r].enabled = 1;
        p[r].k = irand(K + 1);
        p[r].n_valid = irand(3) == 0 ? 1 + irand(V) : 0;
        T[r] = temps[irand(4)];
        p[r].inv_temperature = T[r] < MOE_GREEDY_TEMPERATURE
                               ? 1.0f : 1.0f / T[r];
        n = p[r].n_valid > 0 && p[r].n_valid < V ? p[r].n_valid : V;
        ch[r] = irand(n);
    }
    ch[rows - 1] = -5;                         /* out of range: NAN */

    float   *dx = (float *) gu_up(x, nx * sizeof(float));
    void    *dp = gu_up(p, (size_t) rows * sizeof(*p));
    int32_t *dch = (int32_t *) gu_up(ch, rows * sizeof(int32_t));
    float   *dlp = (float *) gu_dev(rows * sizeof(float));
    int32_t *dtid = (int32_t *) gu_dev((size_t) rows * K * 4);
    float   *dtlp = (float *) gu_dev((size_t) rows * K * 4);

    rc = moe_cuda_logprobs_rows(dx, ld, rows, V,
                                (const moe_cuda_logprobs_param_t *) dp, dch,
                                dlp, dtid, dtlp, 0);
    cudaDeviceSynchronize();
    gu_down(lp, dlp, rows * sizeof(float));
    gu_down(tid, dtid, (size_t) rows * K * 4);
    gu_down(tlp, dtlp, (size_t) rows * K * 4);

    for (r = 0; r < rows; r++) {
        const float *row = x + (size_t) r * ld;
        float        h;
        double       mass = 0.0;
        int          k = p[r].k;

        n = p[r].n_valid > 0 && p[r].n_valid < V ? p[r].n_valid : V;
        h = moe_logprobs_row(row, n, T[r], ch[r], k, top);
        if (isnan(h) ? !isnan(lp[r]) : !(fabsf(lp[r] - h) <= 1e-4f)) {
            if (bad_lp++ < 3) {
                TAP_DIAG("V %d row %d: lp %g, host %g", V, r, lp[r], h);
            }
        }
        if (!isnan(h) && fabs(lp[r] - h) > worst) {
            worst = fabs(lp[r] - h);
        }
        for (j = 0; j < K; j++) {
            int32_t d = tid[(size_t) r * K + j];
            float   dv = tlp[(size_t) r * K + j];

            if (j >= (k < n ? k : n)) {
                bad_tail += d != -1;
                continue;
            }
            if (d != top[j].id) {
                if (bad_id++ < 3) {
                    TAP_DIAG("V %d row %d top %d: id %d, host %d", V, r, j,
                             d, top[j].id);
                }
            }
            bad_tlp += !(fabsf(dv - top[j].logprob) <= 1e-4f);
            mass += exp((double) dv);
        }
        bad_mass += mass > 1.0 + 1e-5;
    }
    TAP_OK(rc == MOE_K_OK && bad_lp == 0,
           "V %d: %d rows, chosen logprob within 1e-4 of the host (worst "
           "%.2g)", V, rows, worst);
    TAP_OK(bad_id == 0 && bad_tlp == 0,
           "V %d: top entries: the host's ids in its order (%d differ), "
           "logprobs within 1e-4 (%d differ)", V, bad_id, bad_tlp);
    TAP_OK(bad_tail == 0 && bad_mass == 0,
           "V %d: entries past k are -1 (%d not), exp sum of top <= 1 (%d "
           "over)", V, bad_tail, bad_mass);

    cudaFree(dx); cudaFree(dp); cudaFree(dch); cudaFree(dlp);
    cudaFree(dtid); cudaFree(dtlp);
    free(x); free(lp); free(tlp); free(tid); free(ch); free(T); free(p);
}


static void
test_special(void)
{
    enum { V = 5000 };
    static float               x[2 * V];
    moe_cuda_logprobs_param_t  p[2];
    int32_t                    ch[2] = { 3, 7 }, tid[2 * K];
    float                      lp[2], tlp[2 * K];
    int                        i, nan_in_top = 0, rc;

    for (i = 0; i < 2 * V; i++) {
        x[i] = gauss();
    }
    for (i = 0; i < V; i += 97) {
        x[i] = NAN;                              /* row 0: some NaN */
    }
    x[0] = NAN;
    memset(p, 0, sizeof(p));
    p[0].enabled = 1;
    p[0].k = K;
    p[0].inv_temperature = 1.0f;
    p[1].enabled = 0;                            /* row 1: disabled */
    p[1].k = K;

    float   *dx = (float *) gu_up(x, sizeof(x));
    void    *dp = gu_up(p, sizeof(p));
    int32_t *dch = (int32_t *) gu_up(ch, sizeof(ch));
    float   *dlp = (float *) gu_dev(sizeof(lp));
    int32_t *dtid = (int32_t *) gu_dev(sizeof(tid));
    float   *dtlp = (float *) gu_dev(sizeof(tlp));

    rc = moe_cuda_logprobs_rows(dx, V, 2, V,
                                (const moe_cuda_logprobs_param_t *) dp, dch,
                                dlp, dtid, dtlp, 0);
    cudaDeviceSynchronize();
    gu_down(lp, dlp, sizeof(lp));
    gu_down(tid, dtid, sizeof(tid));
    gu_down(tlp, dtlp, sizeof(tlp));
    for (i = 0; i < K; i++) {
        nan_in_top += tid[i] < 0 || tid[i] % 97 == 0 || isnan(tlp[i]);
    }
    TAP_OK(rc == MOE_K_OK && nan_in_top == 0 && isfinite(lp[0]),
           "NaN logits: never in the top, the chosen logprob finite (%g)",
           lp[0]);
    {
        uint32_t bits;

        memcpy(&bits, &lp[1], 4);
        TAP_OK(bits == 0xffffffffu && tid[K] == -1
               && tid[2 * K - 1] == -1,
               "a disabled row is left untouched (poison stays)");
    }
    TAP_OK(moe_cuda_logprobs_rows(dx, V, 0, V, NULL, NULL, NULL, NULL,
                                  NULL, 0) == MOE_K_OK,
           "rows = 0: a no-op");
    TAP_OK(moe_cuda_logprobs_rows(dx, V - 1, 1, V,
                                  (const moe_cuda_logprobs_param_t *) dp,
                                  dch, dlp, dtid, dtlp, 0)
           == MOE_K_EBACKEND,
           "ld < V refused");
    cudaFree(dx); cudaFree(dp); cudaFree(dch); cudaFree(dlp);
    cudaFree(dtid); cudaFree(dtlp);
}


static double
time_rows(int V, int rows)
{
    size_t                     nx = (size_t) rows * V;
    float                     *x = (float *) malloc(nx * sizeof(float));
    moe_cuda_logprobs_param_t *p = (moe_cuda_logprobs_param_t *)
        calloc((size_t) rows, sizeof(*p));
    int32_t                   *ch = (int32_t *) calloc(rows, 4);
    cudaEvent_t                a, b;
    float                      ms = 0.0f;
    int                        i, iters = 50;

    gu_fill(x, nx, 4.0f);
    for (i = 0; i < rows; i++) {
        p[i].enabled = 1;
        p[i].k = K;
        p[i].inv_temperature = 1.0f;
    }
    float   *dx = (float *) gu_up(x, nx * sizeof(float));
    void    *dp = gu_up(p, (size_t) rows * sizeof(*p));
    int32_t *dch = (int32_t *) gu_up(ch, rows * 4);
    float   *dlp = (float *) gu_dev(rows * 4);
    int32_t *dtid = (int32_t *) gu_dev((size_t) rows * K * 4);
    float   *dtlp = (float *) gu_dev((size_t) rows * K * 4);

    cudaEventCreate(&a);
    cudaEventCreate(&b);
    cudaEventRecord(a, 0);
    for (i = 0; i < iters; i++) {
        (void) moe_cuda_logprobs_rows(dx, V, rows, V,
            (const moe_cuda_logprobs_param_t *) dp, dch, dlp, dtid, dtlp, 0);
    }
    cudaEventRecord(b, 0);
    cudaEventSynchronize(b);
    cudaEventElapsedTime(&ms, a, b);
    cudaFree(dx); cudaFree(dp); cudaFree(dch); cudaFree(dlp);
    cudaFree(dtid); cudaFree(dtlp);
    free(x); free(p); free(ch);
    return 1000.0 * ms / iters;
}


int
main(void)
{
    const char         *env = getenv("MOE_TEST_SEED");
    unsigned long long  seed;
    int                 ndev = 0;

    if (cudaGetDeviceCount(&ndev) != cudaSuccess || ndev == 0) {
        printf("1..0 # SKIP no CUDA device\n");
        return 0;
    }
    if (env != NULL && *env != '\0') {
        seed = strtoull(env, NULL, 0);
    } else {
        seed = (unsigned long long) time(NULL) * 1000003ULL
               ^ (unsigned long long) getpid();
    }
    gu_seed(seed);
    TAP_DIAG("random inputs from seed %llu (MOE_TEST_SEED=%llu repeats "
             "this run)", seed, seed);

    test_vs_host(6, 6, 64);
    test_vs_host(1000, 1003, 64);
    test_vs_host(32000, 32000, 64);
    test_vs_host(151936, 151936, 64);
    test_special();

    if (getenv("MOE_TEST_NO_TIMING") == NULL) {
        TAP_DIAG("timing (us per launch): V 151936, k 20: 1 row %.1f, 64 "
                 "rows %.1f", time_rows(151936, 1), time_rows(151936, 64));
    }

    TAP_PLAN(tap_n);
    return TAP_DONE();
}
