/*
 * Checks the grouped e4m3 GEMM of the fp8 prefill's experts
 * (kernels/fp8_grouped.cu) on fresh random inputs (seed printed;
 * MOE_TEST_SEED=N repeats a run):
 *  - every row of every group against a double host sum of the decoded
 *    e4m3 products, per element: |y - ref| <= 2^-8 |ref| (the bf16
 *    rounding of the output) + 2^-9 sum_k |q w| (the tensor cores keep
 *    about 14 mantissa bits of their running sums and drop the rest, so
 *    the errors of the K / 32 steps add up in one direction: first run,
 *    K 1024, up to 6.4e-4 of sum |q w|); and the relative L2 error <=
 *    4e-3;
 *  - ten launches each: the shipped one, one CTA per tile, 3 CTAs (each
 *    walks many tiles, so the stage ring and its phases carry over from
 *    tile to tile), two n128 wgmma per k step instead of one n256, the
 *    epilogue staged through shared memory (a CTA per tile, 3 CTAs), and
 *    tiles drawn from a counter (MOE_FG_DYN) on the shipped launch, on 3
 *    CTAs and on a CTA per tile, and drawn by CTA pairs sharing their
 *    weight loads (MOE_FG_PAIR: shipped, 4 CTAs, a CTA per tile): each
 *    also bit for bit equal to the shipped static launch's output, and
 *    the counters back at zero after it (the next launch's start);
 *  - groups of 0, 1, 64, 130 and 257 rows (partial row tiles, an empty
 *    group), offsets starting past 0 (an expert-parallel rank's view),
 *    K from 128 (one stage) to 1024 (the 4-stage ring wraps twice), 1 to
 *    3 column tiles, a row bound above the rows, the last group ending at
 *    Q's last row (TMA's zero fill past it);
 *  - rows of Y past the groups' keep their sentinel (nothing written
 *    outside the groups);
 *  - captured into a CUDA graph and replayed after the offsets on the
 *    device changed: the replay follows the new offsets (they are read on
 *    the device, not baked into the launch); the same with the drawn
 *    tiles, replayed twice (the counters reset by each replay);
 *  - the SwiGLU epilogue (moe_cuda_fp8_grouped_swiglu) against the host's
 *    SwiGLU of the plain GEMM's bf16 products with random row and channel
 *    scales: within a bf16 rounding step, and bit for bit the same with
 *    the drawn tiles, alone and on CTA pairs; F % 128 refused;
 *  - refusals (MOE_K_EUNSUPPORTED, nothing written): N % 256, K % 128, a
 *    weight stride below N x K, a misaligned Q; r_max 0 is a no-op;
 *    MOE_K_EINVAL: drawn tiles without counters, or on a variant not built
 *    with them, pairs without drawn tiles.
 * TAP; skips when there is no CUDA device.
 */

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "gpu_tap.h"
#include "gpu_util.h"

extern "C" {
#include "tap.h"
}
#include "fp8.h"
#include "fp8_grouped.h"

#define SENTINEL 0x7bcd                 /* a bf16 no product rounds to */


/* a CUDA runtime call that must succeed here (else the run ends: the
 * plan's count then fails it) */
static void
fg_ck(cudaError_t e, const char *what)
{
    if (e != cudaSuccess) {
        TAP_DIAG("%s: %s", what, cudaGetErrorString(e));
        exit(1);
    }
}


/* One problem: E groups of rows[e] rows (offsets from base), N x K
 * weights per group, Q with exactly the groups' rows. */
typedef struct {
    int      E, N, K, base, total;
    int32_t  offs[17];
    uint8_t *q, *w;                     /* host */
    void    *dq, *dw, *doffs, *dy;      /* device */
    uint32_t *dsched;                   /* the two tile counters */
    size_t   ycap;                      /* rows of dy (total + 16) */
} fg_prob_t;


static void
prob_init(fg_prob_t *p, const int *rows, int E, int N, int K, int base)
{
    p->E = E;
    p->N = N;
    p->K = K;
    p->base = base;
    p->offs[0] = base;
    for (int e = 0; e < E; e++) {
        p->offs[e + 1] = p->offs[e] + rows[e];
    }
    p->total = p->offs[E] - base;
    p->q = (uint8_t *) malloc((size_t) (p->total > 0 ? p->total : 1) * K);
    p->w = (uint8_t *) malloc((size_t) E * N * K);
    for (size_t i = 0; i < (size_t) p->total * K; i++) {
        p->q[i] = gu_rand_e4m3();
    }
    for (size_t i = 0; i < (size_t) E * N * K; i++) {
        p->w[i] = gu_rand_e4m3();
    }
    p->dq = gu_up(p->q, (size_t) (p->total > 0 ? p->total : 1) * K);
    p->dw = gu_up(p->w, (size_t) E * N * K);
    p->doffs = gu_up(p->offs, sizeof(int32_t) * (size_t) (E + 1));
    p->ycap = (size_t) p->total + 16;
    p->dy = gu_dev(p->ycap * N * 2);
    p->dsched = (uint32_t *) gu_dev(2 * sizeof(uint32_t));
    fg_ck(cudaMemset(p->dsched, 0, 2 * sizeof(uint32_t)), "counters");
}


/* 1 when both tile counters are zero (as every launch must leave them) */
static int
prob_sched_zero(const fg_prob_t *p, const char *what)
{
    uint32_t c[2];

    gu_down(c, p->dsched, sizeof(c));
    if (c[0] != 0 || c[1] != 0) {
        TAP_DIAG("%s: tile counters left at %u, %u", what, c[0], c[1]);
    }
    return c[0] == 0 && c[1] == 0;
}


static void
prob_free(fg_prob_t *p)
{
    cudaFree(p->dq);
    cudaFree(p->dw);
    cudaFree(p->doffs);
    cudaFree(p->dy);
    cudaFree(p->dsched);
    free(p->q);
    free(p->w);
}


/* Y's rows filled with the sentinel. */
static void
prob_clear(fg_prob_t *p)
{
    uint16_t *h = (uint16_t *) malloc(p->ycap * p->N * 2);

    for (size_t i = 0; i < p->ycap * p->N; i++) {
        h[i] = SENTINEL;
    }
    fg_ck(cudaMemcpy(p->dy, h, p->ycap * p->N * 2,
                     cudaMemcpyHostToDevice), "upload Y");
    free(h);
}


/* Y against the host for the offsets offs (E + 1, from offs[0]); rows
 * past the groups' must hold the sentinel.  1 when within the bounds. */
static int
prob_check(const fg_prob_t *p, const int32_t *offs, const char *what)
{
    uint16_t *y = (uint16_t *) malloc(p->ycap * p->N * 2);
    double    e2 = 0, r2 = 0, worst = 0;
    int       bad = 0, bad_rest = 0, R = offs[p->E] - offs[0];
    float    *wf = (float *) malloc((size_t) p->N * p->K * 4);
    float    *qf = (float *) malloc((size_t) p->K * 4);

    gu_down(y, p->dy, p->ycap * p->N * 2);
    for (int e = 0; e < p->E; e++) {
        for (size_t i = 0; i < (size_t) p->N * p->K; i++) {
            wf[i] = moe_fp8_to_f32(p->w[(size_t) e * p->N * p->K + i]);
        }
        for (int r = offs[e] - offs[0]; r < offs[e + 1] - offs[0]; r++) {
            for (int k = 0; k < p->K; k++) {
                qf[k] = moe_fp8_to_f32(p->q[(size_t) r * p->K + k]);
            }
            for (int j = 0; j < p->N; j++) {
                const float *wr = wf + (size_t) j * p->K;
                double       s = 0, a = 0, got, err;

                for (int k = 0; k < p->K; k++) {
                    double t = (double) qf[k] * wr[k];

                    s += t;
                    a += fabs(t);
                }
                got = gu_bf2f(y[(size_t) r * p->N + j]);
                err = fabs(got - s);
                e2 += err * err;
                r2 += s * s;
                if (err > ldexp(fabs(s), -8) + ldexp(a, -9)) {
                    if (bad++ < 3) {
                        TAP_DIAG("%s: group %d row %d col %d: %.6g, host "
                                 "%.6g (sum |qw| %.6g)", what, e, r, j, got,
                                 s, a);
                    }
                }
                worst = fmax(worst, err / (ldexp(fabs(s), -8)
                                           + ldexp(a, -9) + 1e-30));
            }
        }
    }
    for (size_t r = (size_t) R; r < p->ycap; r++) {
        for (int j = 0; j < p->N; j++) {
            bad_rest += y[r * p->N + j] != SENTINEL;
        }
    }
    if (bad_rest > 0) {
        TAP_DIAG("%s: %d values written past the groups' rows", what,
                 bad_rest);
    }
    free(y);
    free(wf);
    free(qf);
    {
        double rel = r2 > 0 ? sqrt(e2 / r2) : 0;

        TAP_DIAG("%s: relative L2 %.2e, worst element at %.2f of its "
                 "bound", what, rel, worst);
        return bad == 0 && bad_rest == 0 && rel <= 4e-3;
    }
}


/* the launch: ctas 1 the shipped one (its tile order: variant's
 * MOE_FG_DYN bit), else moe_cuda_fp8_grouped_gemm_ctas with that
 * grid (0: one CTA per tile) and variant (MOE_FG_*) */
static int
prob_run(fg_prob_t *p, int r_max, int ctas, int variant, cudaStream_t s)
{
    if (ctas == 1) {
        return moe_cuda_fp8_grouped_gemm((const uint8_t *) p->dq, p->total,
                                         (const uint8_t *) p->dw,
                                         (size_t) p->N * p->K,
                                         (const int32_t *) p->doffs, p->E,
                                         r_max, p->N, p->K,
                                         (moe_bf16_t *) p->dy, p->dsched,
                                         variant & (MOE_FG_DYN
                                                    | MOE_FG_PAIR), s);
    }
    return moe_cuda_fp8_grouped_gemm_ctas((const uint8_t *) p->dq, p->total,
                                          (const uint8_t *) p->dw,
                                          (size_t) p->N * p->K,
                                          (const int32_t *) p->doffs, p->E,
                                          r_max, p->N, p->K,
                                          (moe_bf16_t *) p->dy, ctas,
                                          variant, p->dsched, s);
}


static void
test_case(const int *rows, int E, int N, int K, int base, int slack)
{
    enum { W = MOE_FG_WIDE, S = MOE_FG_STAGED, D = MOE_FG_DYN,
           P = MOE_FG_DYN | MOE_FG_PAIR, NL = 12 };
    static const int ctas[NL] = { 1, 0, 3, 0, 0, 3, 1, 3, 0, 1, 4, 0 };
    static const int var[NL] = { W, W, W, 0, W | S, W | S, D, W | S | D,
                                 W | S | D, P, W | S | P, W | S | P };
    static const char *const launch[NL] = {
        "shipped", "n256, a CTA per tile", "n256, 3 CTAs",
        "2 x n128, a CTA per tile", "n256 staged, a CTA per tile",
        "n256 staged, 3 CTAs", "shipped, drawn tiles",
        "staged, 3 CTAs, drawn tiles", "staged, a CTA per tile, drawn tiles",
        "shipped, CTA pairs", "staged, 4 CTAs (2 pairs)",
        "staged, a CTA per tile, pairs"
    };
    fg_prob_t p;
    char      what[200];
    int       rc, ok;
    size_t    head, ybytes;
    uint16_t *y0 = NULL, *y1;

    prob_init(&p, rows, E, N, K, base);
    snprintf(what, sizeof(what), "%d groups (rows", E);
    for (int e = 0; e < E; e++) {
        snprintf(what + strlen(what), sizeof(what) - strlen(what), " %d",
                 rows[e]);
    }
    snprintf(what + strlen(what), sizeof(what) - strlen(what),
             ") N %d K %d, offsets from %d, row bound +%d", N, K, base,
             slack);
    head = strlen(what);
    ybytes = p.ycap * (size_t) N * 2;
    y1 = (uint16_t *) malloc(ybytes);
    for (int c = 0; c < NL; c++) {
        int same = 1;

        snprintf(what + head, sizeof(what) - head, ", %s", launch[c]);
        prob_clear(&p);
        rc = prob_run(&p, p.total + slack, ctas[c], var[c], 0);
        ok = gu_sync_ok(rc, what) && prob_check(&p, p.offs, what);
        if (c == 0) {
            y0 = (uint16_t *) malloc(ybytes);
            gu_down(y0, p.dy, ybytes);
        } else if (var[c] & (D | P)) {
            /* the same tiles' sums, whichever CTA made them */
            gu_down(y1, p.dy, ybytes);
            same = memcmp(y0, y1, ybytes) == 0;
            if (!same) {
                TAP_DIAG("%s: output differs from the shipped static "
                         "launch's", what);
            }
            ok = ok && same && prob_sched_zero(&p, what);
        }
        TAP_OK(ok, "grouped GEMM %s: every element within its bound, "
               "nothing written past the groups%s", what,
               var[c] & D ? "; bit for bit the static launch's, the "
               "counters back at zero" : "");
    }
    free(y0);
    free(y1);
    prob_free(&p);
}


/* One launch (schedule bits sch) captured into a graph, replayed (reps
 * times) after the device offsets moved rows from one group to another
 * (same total). */
static void
test_graph(int sch, int reps)
{
    static const int rows[3] = { 40, 200, 90 };
    fg_prob_t        p;
    cudaStream_t     s;
    cudaGraph_t      gr = NULL;
    cudaGraphExec_t  ge = NULL;
    int32_t          offs2[4];
    int              rc, ok;

    prob_init(&p, rows, 3, 512, 256, 0);
    fg_ck(cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking), "stream");
    prob_clear(&p);
    fg_ck(cudaStreamBeginCapture(s, cudaStreamCaptureModeThreadLocal),
          "begin capture");
    rc = prob_run(&p, p.total, 1, sch, s);
    fg_ck(cudaStreamEndCapture(s, &gr), "end capture");
    fg_ck(cudaGraphInstantiate(&ge, gr, 0), "instantiate");
    /* 200 | 40 | 90 instead of 40 | 200 | 90 */
    offs2[0] = 0;
    offs2[1] = 200;
    offs2[2] = 240;
    offs2[3] = 330;
    fg_ck(cudaMemcpy(p.doffs, offs2, sizeof(offs2),
                     cudaMemcpyHostToDevice), "upload offsets");
    ok = 1;
    for (int i = 0; i < reps; i++) {
        prob_clear(&p);
        fg_ck(cudaGraphLaunch(ge, s), "replay");
        fg_ck(cudaStreamSynchronize(s), "sync");
        ok = ok && gu_sync_ok(rc, "graph capture")
             && prob_check(&p, offs2, "graph replay, new offsets")
             && prob_sched_zero(&p, "graph replay");
    }
    TAP_OK(ok, "grouped GEMM (schedule %d) captured in a graph follows the "
           "offsets on the device at each of %d replays", sch, reps);
    cudaGraphExecDestroy(ge);
    cudaGraphDestroy(gr);
    cudaStreamDestroy(s);
    prob_free(&p);
}


/* moe_cuda_fp8_grouped_swiglu against the plain grouped GEMM's bf16
 * products G (rows, 2F) and the host's SwiGLU of them with the scales
 * (the kernel rounds its sums to bf16 first, as the unfused path): per
 * element within one bf16 rounding step (2^-8 relative) + 1e-6 of the
 * largest |h|; rows past the groups untouched. */
static void
test_swiglu(const int *rows, int E, int F, int K, int base)
{
    fg_prob_t p;
    float    *qs, *ws;
    void     *dqs, *dws, *dh;
    uint16_t *G, *H;
    size_t    hcap;
    char      what[160];
    int       rc, rc2, ok, bad = 0, bad_rest = 0;
    double    hmax = 0;

    prob_init(&p, rows, E, 2 * F, K, base);
    hcap = p.ycap;
    qs = (float *) malloc(sizeof(float) * (size_t) (p.total + 1));
    ws = (float *) malloc(sizeof(float) * (size_t) E * 2 * F);
    for (int r = 0; r < p.total; r++) {
        qs[r] = (0.5f + fabsf(gu_uniform())) * 1e-2f;
    }
    for (int i = 0; i < E * 2 * F; i++) {
        ws[i] = (0.5f + fabsf(gu_uniform())) * 1e-2f;
    }
    dqs = gu_up(qs, sizeof(float) * (size_t) (p.total + 1));
    dws = gu_up(ws, sizeof(float) * (size_t) E * 2 * F);
    dh = gu_dev(hcap * F * 2);
    G = (uint16_t *) malloc(hcap * 2 * F * 2);
    H = (uint16_t *) malloc(hcap * F * 2);
    for (size_t i = 0; i < hcap * F; i++) {
        H[i] = SENTINEL;
    }
    fg_ck(cudaMemcpy(dh, H, hcap * F * 2, cudaMemcpyHostToDevice), "H");
    prob_clear(&p);
    rc = prob_run(&p, p.total, 1, 0, 0);
    rc2 = moe_cuda_fp8_grouped_swiglu((const uint8_t *) p.dq, p.total,
                                      (const uint8_t *) p.dw,
                                      (size_t) 2 * F * K,
                                      (const int32_t *) p.doffs, E, p.total,
                                      F, K, (const float *) dqs,
                                      (const float *) dws, (size_t) 2 * F,
                                      (moe_bf16_t *) dh, p.dsched, 0, 0);
    snprintf(what, sizeof(what), "grouped SwiGLU GEMM, %d groups, F %d K "
             "%d, offsets from %d", E, F, K, base);
    ok = gu_sync_ok(rc | rc2, what);
    gu_down(G, p.dy, hcap * 2 * F * 2);
    gu_down(H, dh, hcap * F * 2);
    /* the host's h for every group row, then each against the device's
     * (the bound's floor needs the largest |h| first) */
    float *ref = (float *) malloc(sizeof(float) * (size_t) (p.total + 1) * F);

    for (int e = 0; ok && e < E; e++) {
        const float *we = ws + (size_t) e * 2 * F;

        for (int r = p.offs[e] - base; r < p.offs[e + 1] - base; r++) {
            for (int j = 0; j < F; j++) {
                float g = gu_bf2f(G[(size_t) r * 2 * F + j])
                          * (qs[r] * we[j]);
                float u = gu_bf2f(G[(size_t) r * 2 * F + F + j])
                          * (qs[r] * we[F + j]);

                ref[(size_t) r * F + j] = g / (1.0f + expf(-g)) * u;
                hmax = fmax(hmax, fabs(ref[(size_t) r * F + j]));
            }
        }
    }
    for (size_t i = 0; ok && i < (size_t) p.total * F; i++) {
        float got = gu_bf2f(H[i]);

        if (fabs(got - ref[i]) > ldexp(fabs(ref[i]), -8) + 1e-6 * hmax) {
            if (bad++ < 3) {
                TAP_DIAG("%s: row %zu col %zu: %.6g, host %.6g", what,
                         i / F, i % F, got, ref[i]);
            }
        }
    }
    free(ref);
    for (size_t i = (size_t) p.total * F; i < hcap * F; i++) {
        bad_rest += H[i] != SENTINEL;
    }
    TAP_OK(ok && bad == 0 && bad_rest == 0, "%s: h equal to the host's "
           "SwiGLU of the bf16 products within a rounding step (%d off), "
           "nothing written past the groups (%d)", what, bad, bad_rest);
    for (int v = 0; v < 2; v++) {
        /* the same with drawn tiles, alone and on CTA pairs: bit for
         * bit */
        uint16_t *H2 = (uint16_t *) malloc(hcap * F * 2);

        for (size_t i = 0; i < hcap * F; i++) {
            H2[i] = SENTINEL;
        }
        fg_ck(cudaMemcpy(dh, H2, hcap * F * 2, cudaMemcpyHostToDevice),
              "H");
        rc2 = moe_cuda_fp8_grouped_swiglu((const uint8_t *) p.dq, p.total,
                                          (const uint8_t *) p.dw,
                                          (size_t) 2 * F * K,
                                          (const int32_t *) p.doffs, E,
                                          p.total, F, K, (const float *) dqs,
                                          (const float *) dws,
                                          (size_t) 2 * F, (moe_bf16_t *) dh,
                                          p.dsched,
                                          v ? MOE_FG_DYN | MOE_FG_PAIR
                                            : MOE_FG_DYN, 0);
        ok = gu_sync_ok(rc2, what);
        gu_down(H2, dh, hcap * F * 2);
        TAP_OK(ok && memcmp(H, H2, hcap * F * 2) == 0
               && prob_sched_zero(&p, what), "%s, drawn tiles%s: "
               "bit for bit the static launch's h, counters back at zero",
               what, v ? " on CTA pairs" : "");
        free(H2);
    }
    cudaFree(dqs);
    cudaFree(dws);
    cudaFree(dh);
    free(qs);
    free(ws);
    free(G);
    free(H);
    prob_free(&p);
}


static void
test_refusals(void)
{
    static const int rows[2] = { 10, 20 };
    fg_prob_t        p;
    uint16_t         y0;
    int              r1, r2, r3, r4, r5, nothing;

    prob_init(&p, rows, 2, 256, 256, 0);
    prob_clear(&p);
    r1 = moe_cuda_fp8_grouped_gemm((const uint8_t *) p.dq, 30,
                                   (const uint8_t *) p.dw, 320 * 256,
                                   (const int32_t *) p.doffs, 2, 30, 320,
                                   256, (moe_bf16_t *) p.dy, p.dsched, 0,
                                   0);
    r2 = moe_cuda_fp8_grouped_gemm((const uint8_t *) p.dq, 30,
                                   (const uint8_t *) p.dw, 256 * 192,
                                   (const int32_t *) p.doffs, 2, 30, 256,
                                   192, (moe_bf16_t *) p.dy, p.dsched, 0,
                                   0);
    r3 = moe_cuda_fp8_grouped_gemm((const uint8_t *) p.dq, 30,
                                   (const uint8_t *) p.dw, 256 * 128,
                                   (const int32_t *) p.doffs, 2, 30, 256,
                                   256, (moe_bf16_t *) p.dy, p.dsched, 0,
                                   0);
    r4 = moe_cuda_fp8_grouped_gemm((const uint8_t *) p.dq + 1, 30,
                                   (const uint8_t *) p.dw, 256 * 256,
                                   (const int32_t *) p.doffs, 2, 30, 256,
                                   256, (moe_bf16_t *) p.dy, p.dsched, 0,
                                   0);
    r5 = prob_run(&p, 0, 1, 1, 0);
    fg_ck(cudaDeviceSynchronize(), "sync");
    gu_down(&y0, p.dy, 2);
    nothing = y0 == SENTINEL;
    TAP_OK(r1 == MOE_K_EUNSUPPORTED && r2 == MOE_K_EUNSUPPORTED
           && r3 == MOE_K_EUNSUPPORTED && r4 == MOE_K_EUNSUPPORTED
           && r5 == MOE_K_OK && nothing,
           "refused: N 320 (%d), K 192 (%d), stride < N K (%d), Q "
           "misaligned (%d); r_max 0 a no-op (%d), Y untouched", r1, r2, r3,
           r4, r5);
    TAP_OK(moe_cuda_fp8_grouped_supported(28672, 4096, 28672 * 4096)
           && moe_cuda_fp8_grouped_supported(4096, 14336,
                                             (size_t) 4096 * 14336)
           && !moe_cuda_fp8_grouped_supported(64, 128, 64 * 128)
           && !moe_cuda_fp8_grouped_supported(256, 64, 256 * 64),
           "supported: Mixtral's gate|up and down; not N 64 or K 64");
    r1 = moe_cuda_fp8_grouped_gemm((const uint8_t *) p.dq, 30,
                                   (const uint8_t *) p.dw, 256 * 256,
                                   (const int32_t *) p.doffs, 2, 30, 256,
                                   256, (moe_bf16_t *) p.dy, NULL,
                                   MOE_FG_DYN, 0);
    r2 = moe_cuda_fp8_grouped_gemm_ctas((const uint8_t *) p.dq, 30,
                                        (const uint8_t *) p.dw, 256 * 256,
                                        (const int32_t *) p.doffs, 2, 30,
                                        256, 256, (moe_bf16_t *) p.dy, 0,
                                        MOE_FG_WIDE | MOE_FG_DYN, p.dsched,
                                        0);
    r3 = moe_cuda_fp8_grouped_gemm((const uint8_t *) p.dq, 30,
                                   (const uint8_t *) p.dw, 256 * 256,
                                   (const int32_t *) p.doffs, 2, 30, 256,
                                   256, (moe_bf16_t *) p.dy, p.dsched,
                                   MOE_FG_PAIR, 0);
    fg_ck(cudaDeviceSynchronize(), "sync");
    gu_down(&y0, p.dy, 2);
    TAP_OK(r1 == MOE_K_EINVAL && r2 == MOE_K_EINVAL && r3 == MOE_K_EINVAL
           && y0 == SENTINEL,
           "refused: drawn tiles without counters (%d), drawn tiles on the "
           "unstaged kernel, not built (%d), pairs without drawn tiles "
           "(%d); Y untouched", r1, r2, r3);
    prob_free(&p);
}


int
main(void)
{
    static const int r4[4] = { 0, 1, 130, 257 };
    static const int r8[8] = { 64, 3, 0, 129, 128, 300, 17, 1 };
    static const int r1[1] = { 64 };
    uint64_t         seed;
    int              ndev = 0;

    if (cudaGetDeviceCount(&ndev) != cudaSuccess || ndev == 0) {
        printf("1..0 # SKIP no CUDA device\n");
        return 0;
    }
    seed = gu_seed_env();
    TAP_PLAN(61);
    TAP_DIAG("seed %llu", (unsigned long long) seed);
    test_case(r4, 4, 512, 1024, 5, 37);
    test_case(r8, 8, 768, 256, 0, 0);
    test_case(r1, 1, 256, 128, 0, 0);
    test_case(r8 + 3, 3, 256, 512, 1000, 1);
    test_swiglu(r4, 4, 256, 512, 5);
    test_swiglu(r8, 3, 128, 256, 0);
    test_graph(0, 1);
    test_graph(MOE_FG_DYN, 2);
    test_graph(MOE_FG_DYN | MOE_FG_PAIR, 2);
    test_refusals();
    TAP_OK(moe_cuda_fp8_grouped_swiglu((const uint8_t *) 16, 1,
                                       (const uint8_t *) 16, 384 * 128,
                                       (const int32_t *) 16, 1, 1, 192, 128,
                                       (const float *) 16,
                                       (const float *) 16, 384,
                                       (moe_bf16_t *) 16, NULL, 0, 0)
           == MOE_K_EUNSUPPORTED, "grouped SwiGLU refuses F 192 (F %% 128)");
    return TAP_DONE();
}
