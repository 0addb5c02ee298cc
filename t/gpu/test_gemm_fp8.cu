/*
 * Checks the fp8 prefill GEMM (kernels/gemm_fp8.cu) on fresh random inputs
 * (seed printed; MOE_TEST_SEED=N repeats a run):
 *  - moe_cuda_quant_rows_fp8: per-row scales equal the host's
 *    max(amax, 1e-12) / 448 bit for bit and every e4m3 byte equals the host
 *    rounding (kernels/fp8.h) of x / s, for rows of very different
 *    magnitudes, an all-zero row, gathered rows (xdiv 2) and ldx > K, at
 *    K 1040 .. 32768 (every register-held width and the two-read one);
 *  - moe_cuda_gemm_fp8 against a double host product of the dequantized
 *    operands (relative L2 error <= 1e-3 for fp32 output: the fp8 MMA's
 *    accumulation precision, see FP32_TOL; 4e-3 for bf16),
 *    through cuBLASLt's outer-vector scaling and through the forced
 *    unit-scale + rescale path, fp32 and bf16 output, accumulate, ldy > N,
 *    M from 1 to 300, K up to 4096 (a diagnostic says which path the
 *    library took);
 *  - after outer-vector scaling is refused, a second row count (same
 *    rounded M) makes no new plan (no heuristic query per expert);
 *  - moe_cuda_gemm_fp8_unscaled: the raw sums in bf16 / fp32 against a
 *    double host sum (relative L2 error <= 4e-3 / FP32_TOL);
 *  - moe_cuda_silu_quant_fp8: scales, e4m3 bytes and G's gate half (h
 *    kept on chip up to F 24576, written back above) equal the host's
 *    (expf ulps may move one in 1000 by one rounding step), a tiny-scale
 *    row, F up to 24584, row groups with their own scales (offsets from
 *    5, an empty group); F % 8 refused;
 *  - moe_cuda_fp8_rescale_rows: bit for bit the host's tmp * (qs * ws)
 *    by row group, ldy > N; N % 16 refused;
 *  - quantize + GEMM against the unquantized bf16 x fp8-weight product:
 *    relative L2 error <= 0.06 (the activations' e4m3 rounding);
 *  - moe_cuda_add_rmsnorm_q (a dense fp8 projection's unscaled products
 *    added scaled inside the next norm): bit for bit the rescale into fp32
 *    + moe_cuda_add_rmsnorm, with and without a row list; D % 4 refused;
 *  - moe_cuda_rope_kv_q (the stacked q|k|v fp8 projection's unscaled
 *    products scaled inside the rope): the fp32 rows (q, k, v) and the
 *    bf16 / e4m3 cache bit for bit the rescale + rope_kv(_fp8); an odd
 *    head_dim refused;
 *  - moe_cuda_unpermute_rmsnorm_q (the fused FFN's down products
 *    un-permuted inside the next norm, scales applied on the way): bit for
 *    bit moe_cuda_fp8_rescale_rows_bf16 by expert group into fp32 rows,
 *    then moe_cuda_unpermute_rmsnorm, on a real routing (moe_cuda_moe_
 *    permute of random distinct top-k experts), with and without a row
 *    list; its refusals;
 *  - unsupported shapes give MOE_K_EUNSUPPORTED, M = 0 is a no-op.
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
#include "gemm_fp8.h"
#include "moe_permute.h"
#include "rmsnorm.h"
#include "rope.h"

/* Hopper's fp8 tensor cores keep about 14 mantissa bits in their running
 * sums (measured here: 1.3e-4 .. 2.2e-4 relative at K 16 .. 4096, with
 * CUBLASLT_MATMUL_DESC_FAST_ACCUM off), so an fp32 result is exact only
 * to about 2^-13; the bound leaves 4x headroom over that. */
#define FP32_TOL 1e-3


static int
test_quant(int K, int ldx)
{
    const int M = 9, rows = 18;
    uint16_t *xb = (uint16_t *) calloc((size_t) rows * ldx, 2);
    int32_t   xrow[9];
    uint8_t  *q = (uint8_t *) malloc((size_t) M * K);
    float     s[9];
    int       bad_s = 0, bad_q = 0;

    for (int r = 0; r < rows; r++) {
        float mag = r == 4 ? 0.0f : powf(10.0f, (float) (r % 7) - 3.0f);

        for (int k = 0; k < K; k++) {
            xb[(size_t) r * ldx + k] = gu_f2bf(gu_uniform() * mag);
        }
    }
    for (int r = 0; r < M; r++) {
        xrow[r] = ((r * 5) % rows) * 2;      /* xdiv 2 */
    }
    xrow[0] = 4 * 2;                         /* the zero row */

    void *dx = gu_up(xb, (size_t) rows * ldx * 2);
    void *dr = gu_up(xrow, sizeof(xrow));
    void *dq = gu_dev((size_t) M * K);
    void *ds = gu_dev(sizeof(s));
    int   rc = moe_cuda_quant_rows_fp8((const moe_bf16_t *) dx, ldx,
                                       (const int32_t *) dr, 2, M, K,
                                       (uint8_t *) dq, (float *) ds, 0);

    if (!gu_sync_ok(rc, "quant_rows_fp8")) {
        TAP_OK(0, "quant_rows_fp8 ran");
        return 1;
    }
    gu_down(q, dq, (size_t) M * K);
    gu_down(s, ds, sizeof(s));
    for (int r = 0; r < M; r++) {
        const uint16_t *x = xb + (size_t) (xrow[r] / 2) * ldx;
        float           amax = 0.0f, hs;

        for (int k = 0; k < K; k++) {
            amax = fmaxf(amax, fabsf(gu_bf2f(x[k])));
        }
        hs = fmaxf(amax, 1e-12f) / 448.0f;
        if (memcmp(&hs, &s[r], 4) != 0) {
            if (bad_s++ < 3) {
                TAP_DIAG("row %d: scale %.9g, host %.9g", r, s[r], hs);
            }
            continue;
        }
        for (int k = 0; k < K; k++) {
            uint8_t h = moe_fp8_from_f32(gu_bf2f(x[k]) / hs);

            if (h != q[(size_t) r * K + k] && bad_q++ < 3) {
                TAP_DIAG("row %d k %d: %#x, host %#x", r, k,
                         q[(size_t) r * K + k], h);
            }
        }
    }
    TAP_OK(bad_s == 0, "quant_rows_fp8 K %d: per-row scales equal the "
           "host's", K);
    TAP_OK(bad_q == 0, "quant_rows_fp8 K %d ldx %d: e4m3 bytes equal the "
           "host rounding (zero row, gathered rows)", K, ldx);
    cudaFree(dx);
    cudaFree(dr);
    cudaFree(dq);
    cudaFree(ds);
    free(xb);
    free(q);
    return 0;
}

/* moe_cuda_gemm_fp8_unscaled: the raw e4m3 dot products in bf16 or fp32,
 * M rows of round_up(M, 64) written, against a double host sum. */
static void
test_unscaled(moe_fp8_gemm_t *g, int M, int N, int K, int y_bf16)
{
    size_t    Mp = (size_t) (M + MOE_FP8_GEMM_ROWS - 1)
                 / MOE_FP8_GEMM_ROWS * MOE_FP8_GEMM_ROWS, yb = y_bf16 ? 2 : 4;
    uint8_t  *q = (uint8_t *) malloc(Mp * K);
    uint8_t  *w = (uint8_t *) malloc((size_t) N * K);
    char     *y = (char *) malloc(Mp * N * yb);
    float    *ref = (float *) malloc((size_t) M * N * 4);
    float    *got = (float *) malloc((size_t) M * N * 4);
    double    err = NAN;
    int       ok;

    for (size_t i = 0; i < Mp * K; i++) {
        q[i] = gu_rand_e4m3();
    }
    for (size_t i = 0; i < (size_t) N * K; i++) {
        w[i] = gu_rand_e4m3();
    }
    for (int r = 0; r < M; r++) {
        for (int j = 0; j < N; j++) {
            double d = 0;

            for (int k = 0; k < K; k++) {
                d += (double) moe_fp8_to_f32(q[(size_t) r * K + k])
                     * moe_fp8_to_f32(w[(size_t) j * K + k]);
            }
            ref[(size_t) r * N + j] = (float) d;
        }
    }
    void *dq = gu_up(q, Mp * K);
    void *dw = gu_up(w, (size_t) N * K);
    void *dy = gu_dev(Mp * N * yb);
    int   rc = moe_cuda_gemm_fp8_unscaled(g, M, N, K, (const uint8_t *) dq,
                                          (const uint8_t *) dw, dy, y_bf16,
                                          0);
    double tol = y_bf16 ? 4e-3 : FP32_TOL;

    ok = gu_sync_ok(rc, "gemm_fp8_unscaled");
    if (ok) {
        gu_down(y, dy, Mp * N * yb);
        for (size_t i = 0; i < (size_t) M * N; i++) {
            got[i] = y_bf16 ? gu_bf2f(((const uint16_t *) y)[i])
                            : ((const float *) y)[i];
        }
        err = gu_relerr(got, ref, (size_t) M * N);
        ok = err <= tol;
    }
    TAP_OK(ok, "gemm_fp8_unscaled M %d N %d K %d: raw sums in %s, rel err "
           "%.3g <= %g", M, N, K, y_bf16 ? "bf16" : "fp32", err, tol);
    cudaFree(dq);
    cudaFree(dw);
    cudaFree(dy);
    free(q);
    free(w);
    free(y);
    free(ref);
    free(got);
}


/* moe_cuda_silu_quant_fp8 against the host: h = bf16(silu(g) * u) of the
 * scaled halves, then the per-row scale and e4m3 bytes of
 * moe_cuda_quant_rows_fp8.  The device's expf may differ from the host's
 * by an ulp, which can move an h across a bf16 rounding boundary: a byte
 * may then differ by one code, in at most 1 / 1000 of the values. */
/* E > 1: row groups of uneven sizes (one empty) whose offsets start at 5
 * (moe_cuda_silu_quant_fp8's offs), each with its own scales */
static int32_t *
grp_offs(int M, int E)
{
    int32_t *o = (int32_t *) malloc(sizeof(int32_t) * (size_t) (E + 1));

    o[0] = 5;
    for (int e = 1; e < E; e++) {
        int left = M - (o[e - 1] - 5);

        o[e] = o[e - 1] + (e == 2 ? 0 : left / 2);
    }
    o[E] = 5 + M;
    return o;
}


static int
grp_of(const int32_t *o, int E, int r)
{
    int e = 0;

    while (e + 1 < E && o[e + 1] <= o[0] + r) {
        e++;
    }
    return e;
}


static void
test_silu_quant(int M, int F, int E)
{
    uint16_t *G = (uint16_t *) malloc((size_t) M * 2 * F * 2);
    uint16_t *Gout = (uint16_t *) malloc((size_t) M * 2 * F * 2);
    float    *qs = (float *) malloc((size_t) M * 4);
    float    *wsa = (float *) malloc((size_t) E * 2 * F * 4);
    int32_t  *offs = grp_offs(M, E);
    uint8_t  *Q = (uint8_t *) malloc((size_t) M * F);
    float    *s = (float *) malloc((size_t) M * 4);
    float    *h = (float *) malloc((size_t) F * 4);
    int       bad_s = 0, off1 = 0, bad = 0, bad_h = 0;

    for (size_t i = 0; i < (size_t) M * 2 * F; i++) {
        /* raw e4m3 dot products: magnitudes in the thousands */
        G[i] = gu_f2bf(gu_uniform() * 3000.0f);
    }
    for (int r = 0; r < M; r++) {
        qs[r] = (0.2f + fabsf(gu_uniform())) * (r == 3 ? 1e-6f : 1e-3f);
    }
    for (int j = 0; j < E * 2 * F; j++) {
        wsa[j] = 0.5f + fabsf(gu_uniform());
    }
    void *dG = gu_up(G, (size_t) M * 2 * F * 2);
    void *dqs = gu_up(qs, (size_t) M * 4);
    void *dws = gu_up(wsa, (size_t) E * 2 * F * 4);
    void *dof = gu_up(offs, sizeof(int32_t) * (size_t) (E + 1));
    void *dQ = gu_dev((size_t) M * F);
    void *ds = gu_dev((size_t) M * 4);
    int   rc = moe_cuda_silu_quant_fp8((moe_bf16_t *) dG, M, F,
                                       (const float *) dqs,
                                       (const float *) dws, (size_t) 2 * F,
                                       E > 1 ? (const int32_t *) dof : NULL,
                                       E, (uint8_t *) dQ, (float *) ds, 0);
    int   ok = gu_sync_ok(rc, "silu_quant_fp8");

    if (ok) {
        gu_down(Gout, dG, (size_t) M * 2 * F * 2);
        gu_down(Q, dQ, (size_t) M * F);
        gu_down(s, ds, (size_t) M * 4);
    }
    for (int r = 0; ok && r < M; r++) {
        const float *ws = wsa + (size_t) grp_of(offs, E, r) * 2 * F;
        float        amax = 0.0f, hs;

        for (int j = 0; j < F; j++) {
            float gv = gu_bf2f(G[(size_t) r * 2 * F + j]) * (qs[r] * ws[j]);
            float uv = gu_bf2f(G[(size_t) r * 2 * F + F + j])
                       * (qs[r] * ws[F + j]);

            h[j] = gu_bf2f(gu_f2bf(gv / (1.0f + expf(-gv)) * uv));
            amax = fmaxf(amax, fabsf(h[j]));
            /* G's gate half: h when it did not fit on chip, else as
             * it was */
            if (Gout[(size_t) r * 2 * F + j]
                != (F > 24576 ? gu_f2bf(h[j]) : G[(size_t) r * 2 * F + j]))
            {
                bad_h++;
            }
        }
        hs = fmaxf(amax, 1e-12f) / 448.0f;
        if (fabsf(s[r] - hs) > 1e-6f * hs) {
            if (bad_s++ < 3) {
                TAP_DIAG("row %d: scale %.9g, host %.9g", r, s[r], hs);
            }
            continue;
        }
        for (int j = 0; j < F; j++) {
            int c = moe_fp8_from_f32(h[j] / s[r]), d = Q[(size_t) r * F + j];

            if (c != d) {
                /* one code apart: the codes' magnitudes are adjacent */
                if ((c ^ d) < 0x80 && abs((c & 0x7f) - (d & 0x7f)) == 1) {
                    off1++;
                } else if (bad++ < 3) {
                    TAP_DIAG("row %d col %d: %#x, host %#x", r, j, d, c);
                }
            }
        }
    }
    TAP_OK(ok && bad_s == 0 && bad == 0 && off1 * 1000 <= M * F
           && bad_h * 1000 <= M * F,
           "silu_quant_fp8 M %d F %d, %d group(s): scales, e4m3 bytes and "
           "G's gate half (%s) equal the host's (%d bytes and %d h one "
           "rounding apart)", M, F, E,
           F > 24576 ? "h written over it" : "unchanged, h on chip", off1,
           bad_h);
    cudaFree(dof);
    free(offs);
    cudaFree(dG);
    cudaFree(dqs);
    cudaFree(dws);
    cudaFree(dQ);
    cudaFree(ds);
    free(G);
    free(Gout);
    free(qs);
    free(wsa);
    free(Q);
    free(s);
    free(h);
}


/* moe_cuda_fp8_rescale_rows (bf 0: fp32 products) and
 * moe_cuda_fp8_rescale_rows_bf16 (bf 1: bf16 products): each row times
 * its scale and its group's channel scales, bit for bit the host's
 * float(tmp) * (qs * ws). */
static void
test_rescale_rows(int M, int N, int E, int ldy, int bf)
{
    float   *tmp = (float *) malloc((size_t) M * N * 4);
    float   *qs = (float *) malloc((size_t) M * 4);
    float   *wsa = (float *) malloc((size_t) E * N * 4);
    float   *y = (float *) malloc((size_t) M * ldy * 4);
    int32_t *offs = grp_offs(M, E);
    int      bad = 0;

    uint16_t *tb = (uint16_t *) malloc((size_t) M * N * 2);

    for (size_t i = 0; i < (size_t) M * N; i++) {
        tmp[i] = gu_uniform() * 5000.0f;
        if (bf) {
            tb[i] = gu_f2bf(tmp[i]);
            tmp[i] = gu_bf2f(tb[i]);
        }
    }
    for (int r = 0; r < M; r++) {
        qs[r] = (0.1f + fabsf(gu_uniform())) * 1e-3f;
    }
    for (int j = 0; j < E * N; j++) {
        wsa[j] = (0.1f + fabsf(gu_uniform())) * 1e-2f;
    }
    void *dt = bf ? gu_up(tb, (size_t) M * N * 2)
                  : gu_up(tmp, (size_t) M * N * 4);
    void *dqs = gu_up(qs, (size_t) M * 4);
    void *dws = gu_up(wsa, (size_t) E * N * 4);
    void *dof = gu_up(offs, sizeof(int32_t) * (size_t) (E + 1));
    void *dy = gu_dev((size_t) M * ldy * 4);
    int   rc = bf ? moe_cuda_fp8_rescale_rows_bf16(
                           (const moe_bf16_t *) dt, M, N,
                           (const float *) dqs, (const float *) dws,
                           (size_t) N, E > 1 ? (const int32_t *) dof : NULL,
                           E, (float *) dy, ldy, 0)
                    : moe_cuda_fp8_rescale_rows((const float *) dt, M, N,
                                                (const float *) dqs,
                                                (const float *) dws,
                                                (size_t) N,
                                                E > 1 ? (const int32_t *) dof
                                                      : NULL, E,
                                                (float *) dy, ldy, 0);
    int   ok = gu_sync_ok(rc, "fp8_rescale_rows");

    if (ok) {
        gu_down(y, dy, (size_t) M * ldy * 4);
        for (int r = 0; r < M; r++) {
            const float *ws = wsa + (size_t) grp_of(offs, E, r) * N;

            for (int j = 0; j < N; j++) {
                float want = tmp[(size_t) r * N + j] * (qs[r] * ws[j]);

                if (memcmp(&want, &y[(size_t) r * ldy + j], 4) != 0
                    && bad++ < 3)
                {
                    TAP_DIAG("row %d col %d: %.9g, host %.9g", r, j,
                             y[(size_t) r * ldy + j], want);
                }
            }
        }
    }
    TAP_OK(ok && bad == 0, "fp8_rescale_rows%s M %d N %d, %d group(s), "
           "ldy %d: bit for bit the host's", bf ? "_bf16" : "", M, N, E,
           ldy);
    free(tb);
    cudaFree(dt);
    cudaFree(dqs);
    cudaFree(dws);
    cudaFree(dof);
    cudaFree(dy);
    free(tmp);
    free(qs);
    free(wsa);
    free(y);
    free(offs);
}


/* One GEMM case against the host; returns 1 when within tolerance. */
static int
gemm_case(moe_fp8_gemm_t *g, int M, int N, int K, int ldy, int y_bf16,
    int acc, int rescale, const char *name)
{
    uint8_t *q = (uint8_t *) malloc((size_t) M * K);
    uint8_t *w = (uint8_t *) malloc((size_t) N * K);
    float   *qs = (float *) malloc((size_t) M * 4);
    float   *ws = (float *) malloc((size_t) N * 4);
    float   *y0 = (float *) malloc((size_t) M * ldy * 4);
    float   *ref = (float *) malloc((size_t) M * N * 4);
    float   *got = (float *) malloc((size_t) M * N * 4);
    float   *qf = (float *) malloc((size_t) M * K * 4);
    float   *wf = (float *) malloc((size_t) N * K * 4);
    size_t   ybytes = (size_t) M * ldy * (y_bf16 ? 2 : 4);
    int      rc, ok;
    double   err;

    for (size_t i = 0; i < (size_t) M * K; i++) {
        q[i] = gu_rand_e4m3();
        qf[i] = moe_fp8_to_f32(q[i]);
    }
    for (size_t i = 0; i < (size_t) N * K; i++) {
        w[i] = gu_rand_e4m3();
        wf[i] = moe_fp8_to_f32(w[i]);
    }
    for (int r = 0; r < M; r++) {
        qs[r] = (0.5f + (gu_uniform() + 1.0f)) / 448.0f;
    }
    for (int j = 0; j < N; j++) {
        ws[j] = (0.5f + (gu_uniform() + 1.0f)) * 1e-3f;
    }
    for (size_t i = 0; i < (size_t) M * ldy; i++) {
        y0[i] = acc ? gu_uniform() : 0.0f;
    }
    for (int r = 0; r < M; r++) {
        for (int j = 0; j < N; j++) {
            double d = 0;

            for (int k = 0; k < K; k++) {
                d += (double) qf[(size_t) r * K + k] * wf[(size_t) j * K + k];
            }
            d *= (double) qs[r] * ws[j];
            if (acc) {
                d += y0[(size_t) r * ldy + j];
            }
            ref[(size_t) r * N + j] = (float) d;
        }
    }

    /* Q and tmp with room for M rounded up to 64 rows (gemm_fp8.h) */
    size_t Mp = (size_t) (M + MOE_FP8_GEMM_ROWS - 1)
                 / MOE_FP8_GEMM_ROWS * MOE_FP8_GEMM_ROWS;
    void  *dq = gu_dev(Mp * K);
    void *dw = gu_up(w, (size_t) N * K);
    void *dqs = gu_up(qs, (size_t) M * 4);
    void *dws = gu_up(ws, (size_t) N * 4);
    void *dy = gu_dev(ybytes);
    void *dt = gu_dev(Mp * N * 4);

    cudaMemcpy(dq, q, (size_t) M * K, cudaMemcpyHostToDevice);
    if (acc) {
        cudaMemcpy(dy, y0, ybytes, cudaMemcpyHostToDevice);
    }
    moe_cuda_fp8_gemm_force_rescale(g, rescale);
    rc = moe_cuda_gemm_fp8(g, M, N, K, (const uint8_t *) dq,
                           (const float *) dqs, (const uint8_t *) dw,
                           (const float *) dws, dy, ldy, y_bf16, acc,
                           (float *) dt, 0);
    ok = gu_sync_ok(rc, name);
    if (ok) {
        if (y_bf16) {
            uint16_t *yb = (uint16_t *) malloc(ybytes);

            gu_down(yb, dy, ybytes);
            for (int r = 0; r < M; r++) {
                for (int j = 0; j < N; j++) {
                    got[(size_t) r * N + j] = gu_bf2f(yb[(size_t) r * ldy
                                                         + j]);
                }
            }
            free(yb);
        } else {
            float *yf = (float *) malloc(ybytes);

            gu_down(yf, dy, ybytes);
            for (int r = 0; r < M; r++) {
                memcpy(got + (size_t) r * N, yf + (size_t) r * ldy,
                       (size_t) N * 4);
            }
            free(yf);
        }
        err = gu_relerr(got, ref, (size_t) M * N);
        ok = err <= (y_bf16 ? 4e-3 : FP32_TOL);
        TAP_DIAG("%s: rel err %.3g (%s)", name, err,
                 moe_cuda_fp8_gemm_outer_vec(g) ? "cuBLASLt outer-vector "
                 "scales" : "unit scales + rescale kernel");
    }
    moe_cuda_fp8_gemm_force_rescale(g, 0);
    cudaFree(dq);
    cudaFree(dw);
    cudaFree(dqs);
    cudaFree(dws);
    cudaFree(dy);
    cudaFree(dt);
    free(q);
    free(w);
    free(qs);
    free(ws);
    free(y0);
    free(ref);
    free(got);
    free(qf);
    free(wf);
    return ok;
}

/* quantize bf16 X, GEMM, compare with the unquantized product */
static int
end_to_end(moe_fp8_gemm_t *g, int M, int N, int K)
{
    uint16_t *xb = (uint16_t *) malloc((size_t) M * K * 2);
    uint8_t  *w = (uint8_t *) malloc((size_t) N * K);
    float    *ws = (float *) malloc((size_t) N * 4);
    float    *ref = (float *) malloc((size_t) M * N * 4);
    float    *got = (float *) malloc((size_t) M * N * 4);
    int       rc, ok;
    double    err = NAN;

    for (size_t i = 0; i < (size_t) M * K; i++) {
        xb[i] = gu_f2bf(gu_uniform() * (i % 97 == 0 ? 8.0f : 1.0f));
    }
    for (size_t i = 0; i < (size_t) N * K; i++) {
        w[i] = gu_rand_e4m3();
    }
    for (int j = 0; j < N; j++) {
        ws[j] = (0.5f + (gu_uniform() + 1.0f)) * 1e-3f;
    }
    for (int r = 0; r < M; r++) {
        for (int j = 0; j < N; j++) {
            double d = 0;

            for (int k = 0; k < K; k++) {
                d += (double) gu_bf2f(xb[(size_t) r * K + k])
                     * moe_fp8_to_f32(w[(size_t) j * K + k]);
            }
            ref[(size_t) r * N + j] = (float) (d * ws[j]);
        }
    }

    void *dx = gu_up(xb, (size_t) M * K * 2);
    void *dw = gu_up(w, (size_t) N * K);
    void *dws = gu_up(ws, (size_t) N * 4);
    size_t Mp = (size_t) (M + MOE_FP8_GEMM_ROWS - 1)
                 / MOE_FP8_GEMM_ROWS * MOE_FP8_GEMM_ROWS;
    void  *dq = gu_dev(Mp * K);
    void  *dqs = gu_dev((size_t) M * 4);
    void  *dy = gu_dev((size_t) M * N * 4);
    void  *dt = gu_dev(Mp * N * 4);

    rc = moe_cuda_quant_rows_fp8((const moe_bf16_t *) dx, K, NULL, 1, M, K,
                                 (uint8_t *) dq, (float *) dqs, 0);
    if (rc == 0) {
        rc = moe_cuda_gemm_fp8(g, M, N, K, (const uint8_t *) dq,
                               (const float *) dqs, (const uint8_t *) dw,
                               (const float *) dws, dy, N, 0, 0,
                               (float *) dt, 0);
    }
    ok = gu_sync_ok(rc, "quantize + gemm");
    if (ok) {
        gu_down(got, dy, (size_t) M * N * 4);
        err = gu_relerr(got, ref, (size_t) M * N);
        ok = err <= 0.06;
    }
    TAP_OK(ok, "quantized activations x fp8 weights vs the bf16 x fp8 "
           "product: rel err %.3g <= 0.06 (M %d N %d K %d)", err, M, N, K);
    cudaFree(dx);
    cudaFree(dw);
    cudaFree(dws);
    cudaFree(dq);
    cudaFree(dqs);
    cudaFree(dy);
    cudaFree(dt);
    free(xb);
    free(w);
    free(ws);
    free(ref);
    free(got);
    return ok;
}

/*
 * The outputs a fused norm and its two-launch reference write: x updated
 * in place (fp32, nx values) and the normed rows in bf16 and fp32 (nrd
 * values each); side 0 is the reference, side 1 the fused launch.  Both
 * sides start from the same x.
 */
typedef struct {
    size_t sz[3];
    void  *d[2][3];
} norm_pair_t;

static void
norm_pair_init(norm_pair_t *p, const float *x, size_t nx, size_t nrd)
{
    p->sz[0] = 4 * nx;
    p->sz[1] = 2 * nrd;
    p->sz[2] = 4 * nrd;
    for (int v = 0; v < 2; v++) {
        p->d[v][0] = gu_up(x, p->sz[0]);
        p->d[v][1] = gu_dev(p->sz[1]);
        p->d[v][2] = gu_dev(p->sz[2]);
    }
}


/* Copies both sides down and frees them; returns how many of the three
 * outputs differ anywhere, plus 1 if the reference left x as it was (a
 * step that did nothing would otherwise pass). */
static int
norm_pair_compare(norm_pair_t *p, const float *x)
{
    void *h[2][3];
    int   bad = 0;

    for (int v = 0; v < 2; v++) {
        for (int i = 0; i < 3; i++) {
            h[v][i] = malloc(p->sz[i]);
            gu_down(h[v][i], p->d[v][i], p->sz[i]);
        }
    }
    for (int i = 0; i < 3; i++) {
        bad += memcmp(h[0][i], h[1][i], p->sz[i]) != 0;
    }
    bad += memcmp(h[0][0], x, p->sz[0]) == 0;
    for (int v = 0; v < 2; v++) {
        for (int i = 0; i < 3; i++) {
            cudaFree(p->d[v][i]);
            free(h[v][i]);
        }
    }
    return bad;
}


/*
 * moe_cuda_unpermute_rmsnorm_q against the two launches it replaces:
 * T tokens' top-K of E experts (distinct per token) permuted on the
 * device; bf16 unscaled down products yq (T K, D), row scales qh, channel
 * scales ws (E, D); reference = moe_cuda_fp8_rescale_rows_bf16 (groups
 * by the device offsets) into fp32 ye + moe_cuda_unpermute_rmsnorm.
 * x, bf16 out and fp32 out must agree bit for bit.
 */
static int
test_unpermute_q(int T, int D, int E, int K, int with_rows)
{
    int       n = T * K, nr = with_rows ? (T + 1) / 2 : T, bad = 0, rc = 0;
    size_t    nx = (size_t) T * D;
    float    *x = (float *) malloc(4 * nx);
    float    *w = (float *) malloc(4 * (size_t) D);
    float    *ws = (float *) malloc(4 * (size_t) E * D);
    float    *qh = (float *) malloc(4 * (size_t) n);
    float    *selw = (float *) malloc(4 * (size_t) n);
    uint16_t *yq = (uint16_t *) malloc(2 * (size_t) n * D);
    int32_t  *sel = (int32_t *) malloc(4 * (size_t) n);
    int32_t  *rows = (int32_t *) malloc(4 * (size_t) T);
    norm_pair_t np;

    for (size_t i = 0; i < nx; i++) {
        x[i] = gu_uniform();
    }
    for (int i = 0; i < D; i++) {
        w[i] = gu_uniform();
    }
    for (size_t i = 0; i < (size_t) E * D; i++) {
        ws[i] = (0.5f + 0.5f * fabsf(gu_uniform())) / 448.0f;
    }
    for (size_t i = 0; i < (size_t) n * D; i++) {
        yq[i] = gu_f2bf(gu_uniform() * 3000.0f);
    }
    for (int i = 0; i < n; i++) {
        qh[i] = (0.25f + fabsf(gu_uniform())) / 448.0f;
        selw[i] = gu_uniform();
    }
    for (int t = 0; t < T; t++) {
        /* K distinct experts, unordered */
        for (int k = 0; k < K; k++) {
            int e, dup;

            do {
                e = (int) (gu_rand() % (uint32_t) E);
                dup = 0;
                for (int j = 0; j < k; j++) {
                    dup |= sel[t * K + j] == e;
                }
            } while (dup);
            sel[t * K + k] = e;
        }
    }
    for (int i = 0; i < nr; i++) {
        rows[i] = with_rows ? T - 1 - 2 * i : i;
    }
    int32_t *d_sel = (int32_t *) gu_up(sel, 4 * (size_t) n);
    int32_t *d_rows = (int32_t *) gu_up(rows, 4 * (size_t) T);
    int32_t *d_offs = (int32_t *) gu_dev(4 * (size_t) (E + 1));
    int32_t *d_erow = (int32_t *) gu_dev(4 * (size_t) n);
    int32_t *d_slot = (int32_t *) gu_dev(4 * (size_t) n);
    float   *d_w = (float *) gu_up(w, 4 * (size_t) D);
    float   *d_ws = (float *) gu_up(ws, 4 * (size_t) E * D);
    float   *d_qh = (float *) gu_up(qh, 4 * (size_t) n);
    float   *d_selw = (float *) gu_up(selw, 4 * (size_t) n);
    void    *d_yq = gu_up(yq, 2 * (size_t) n * D);
    float   *d_ye = (float *) gu_dev(4 * (size_t) n * D);
    const int32_t *rl = with_rows ? d_rows : NULL;

    norm_pair_init(&np, x, nx, (size_t) nr * D);
    rc |= moe_cuda_moe_permute(d_sel, n, E, d_offs, d_erow, d_slot, NULL, 0);
    rc |= moe_cuda_fp8_rescale_rows_bf16((const moe_bf16_t *) d_yq, n, D,
                                         d_qh, d_ws, (size_t) D, d_offs, E,
                                         d_ye, D, 0);
    rc |= moe_cuda_unpermute_rmsnorm((float *) np.d[0][0], d_ye, d_sel,
                                     d_selw, d_slot, K, rl, nr, D, d_w,
                                     1e-5f, (moe_bf16_t *) np.d[0][1],
                                     (float *) np.d[0][2], 0);
    rc |= moe_cuda_unpermute_rmsnorm_q((float *) np.d[1][0],
                                       (const moe_bf16_t *) d_yq, d_qh, d_ws,
                                       (size_t) D, d_sel, d_selw, d_slot, K,
                                       rl, nr, D, d_w, 1e-5f,
                                       (moe_bf16_t *) np.d[1][1],
                                       (float *) np.d[1][2], 0);
    int ok = gu_sync_ok(rc, "unpermute_rmsnorm_q");

    bad = norm_pair_compare(&np, x);
    TAP_OK(ok && bad == 0, "unpermute_rmsnorm_q T %d D %d E %d top-%d rows "
           "%d: == fp8 rescale by group + unpermute_rmsnorm, bit for bit "
           "(%d differences)", T, D, E, K, with_rows, bad);
    cudaFree(d_sel); cudaFree(d_rows); cudaFree(d_offs); cudaFree(d_erow);
    cudaFree(d_slot); cudaFree(d_w); cudaFree(d_ws); cudaFree(d_qh);
    cudaFree(d_selw); cudaFree(d_yq); cudaFree(d_ye);
    free(x); free(w); free(ws); free(qh); free(selw); free(yq); free(sel);
    free(rows);
    return ok && bad == 0;
}


/*
 * moe_cuda_add_rmsnorm_q against moe_cuda_fp8_rescale_rows_bf16 (no
 * groups) into fp32 + moe_cuda_add_rmsnorm: x, bf16 and fp32 outputs bit
 * for bit, with and without a row list.
 */
static int
test_add_rmsnorm_q(int T, int D, int with_rows)
{
    int       nr = with_rows ? (T + 1) / 2 : T, bad = 0, rc = 0;
    size_t    nx = (size_t) T * D;
    float    *x = (float *) malloc(4 * nx);
    float    *w = (float *) malloc(4 * (size_t) D);
    float    *ws = (float *) malloc(4 * (size_t) D);
    float    *qs = (float *) malloc(4 * (size_t) T);
    uint16_t *dq = (uint16_t *) malloc(2 * nx);
    int32_t  *rows = (int32_t *) malloc(4 * (size_t) T);
    norm_pair_t np;

    for (size_t i = 0; i < nx; i++) {
        x[i] = gu_uniform();
        dq[i] = gu_f2bf(gu_uniform() * 3000.0f);
    }
    for (int i = 0; i < D; i++) {
        w[i] = gu_uniform();
        ws[i] = (0.5f + 0.5f * fabsf(gu_uniform())) / 448.0f;
    }
    for (int t = 0; t < T; t++) {
        qs[t] = (0.25f + fabsf(gu_uniform())) / 448.0f;
    }
    for (int i = 0; i < nr; i++) {
        rows[i] = with_rows ? T - 1 - 2 * i : i;
    }
    int32_t *d_rows = (int32_t *) gu_up(rows, 4 * (size_t) T);
    float   *d_w = (float *) gu_up(w, 4 * (size_t) D);
    float   *d_ws = (float *) gu_up(ws, 4 * (size_t) D);
    float   *d_qs = (float *) gu_up(qs, 4 * (size_t) T);
    void    *d_dq = gu_up(dq, 2 * nx);
    float   *d_tmp = (float *) gu_dev(4 * nx);
    const int32_t *rl = with_rows ? d_rows : NULL;

    norm_pair_init(&np, x, nx, (size_t) nr * D);
    rc |= moe_cuda_fp8_rescale_rows_bf16((const moe_bf16_t *) d_dq, T, D,
                                         d_qs, d_ws, 0, NULL, 1, d_tmp, D, 0);
    rc |= moe_cuda_add_rmsnorm((float *) np.d[0][0], d_tmp, rl, nr, D, d_w,
                               1e-5f, (moe_bf16_t *) np.d[0][1],
                               (float *) np.d[0][2], 0);
    rc |= moe_cuda_add_rmsnorm_q((float *) np.d[1][0],
                                 (const moe_bf16_t *) d_dq, d_qs, d_ws, rl,
                                 nr, D, d_w, 1e-5f,
                                 (moe_bf16_t *) np.d[1][1],
                                 (float *) np.d[1][2], 0);
    int ok = gu_sync_ok(rc, "add_rmsnorm_q");

    bad = norm_pair_compare(&np, x);
    TAP_OK(ok && bad == 0, "add_rmsnorm_q T %d D %d rows %d: == fp8 rescale "
           "+ add_rmsnorm, bit for bit (%d differences)", T, D, with_rows,
           bad);
    cudaFree(d_rows); cudaFree(d_w); cudaFree(d_ws); cudaFree(d_qs);
    cudaFree(d_dq); cudaFree(d_tmp);
    free(x); free(w); free(ws); free(qs); free(dq); free(rows);
    return ok && bad == 0;
}


/*
 * moe_cuda_rope_kv_q against moe_cuda_fp8_rescale_rows_bf16 into fp32 q|k|v
 * + moe_cuda_rope_kv (bf16 cache) / moe_cuda_rope_kv_fp8: every fp32 row
 * value (q, k and v columns) and every cache byte bit for bit; T tokens
 * at random positions written to random distinct slots.
 */
static int
test_rope_q(int T, int nh, int nkv, int hd, int kv_fp8)
{
    int       ld = (nh + 2 * nkv) * hd, bs = 16, bad = 0, rc = 0;
    int       nblk = (T + bs - 1) / bs + 2, kvd = nkv * hd;
    size_t    nq = (size_t) T * ld;
    size_t    kvb = (size_t) nblk * 2 * bs * kvd * (kv_fp8 ? 1 : 2);
    uint16_t *yq = (uint16_t *) malloc(2 * nq);
    float    *qs = (float *) malloc(4 * (size_t) T);
    float    *ws = (float *) malloc(4 * (size_t) ld);
    float    *inv = (float *) malloc(4 * (size_t) (hd / 2));
    int32_t  *pos = (int32_t *) malloc(4 * (size_t) T);
    int32_t  *slot = (int32_t *) malloc(4 * (size_t) T);
    void     *hq[2], *hk[2], *dq[2], *dk[2];

    for (size_t i = 0; i < nq; i++) {
        yq[i] = gu_f2bf(gu_uniform() * 3000.0f);
    }
    for (int t = 0; t < T; t++) {
        qs[t] = (0.25f + fabsf(gu_uniform())) / 448.0f;
        pos[t] = (int32_t) (gu_rand() % 30000u);
        slot[t] = t + bs;               /* past the first block */
    }
    for (int j = 0; j < ld; j++) {
        ws[j] = (0.5f + 0.5f * fabsf(gu_uniform())) / 448.0f;
    }
    for (int i = 0; i < hd / 2; i++) {
        inv[i] = 1.0f / powf(10000.0f, (float) (2 * i) / (float) hd);
    }
    void    *d_yq = gu_up(yq, 2 * nq);
    float   *d_qs = (float *) gu_up(qs, 4 * (size_t) T);
    float   *d_ws = (float *) gu_up(ws, 4 * (size_t) ld);
    float   *d_inv = (float *) gu_up(inv, 4 * (size_t) (hd / 2));
    int32_t *d_pos = (int32_t *) gu_up(pos, 4 * (size_t) T);
    int32_t *d_slot = (int32_t *) gu_up(slot, 4 * (size_t) T);
    moe_cuda_rope_src_t src = { (const moe_bf16_t *) d_yq, d_qs, d_ws };

    for (int v = 0; v < 2; v++) {
        dq[v] = gu_dev(4 * nq);
        dk[v] = gu_dev(kvb);
        cudaMemset(dq[v], 0x7f, 4 * nq);
        cudaMemset(dk[v], 0x5a, kvb);
    }
    rc |= moe_cuda_fp8_rescale_rows_bf16((const moe_bf16_t *) d_yq, T, ld,
                                         d_qs, d_ws, 0, NULL, 1,
                                         (float *) dq[0], ld, 0);
    if (kv_fp8) {
        rc |= moe_cuda_rope_kv_fp8((float *) dq[0], ld, T, nh, nkv, hd, d_pos,
                                   d_slot, d_inv, NULL, 1.0f,
                                   (uint8_t *) dk[0], bs, 0.05f, 0.03f, 0);
    } else {
        rc |= moe_cuda_rope_kv((float *) dq[0], ld, T, nh, nkv, hd, d_pos,
                               d_slot, d_inv, NULL, 1.0f,
                               (moe_bf16_t *) dk[0], bs, 0);
    }
    rc |= moe_cuda_rope_kv_q((float *) dq[1], ld, &src, T, nh, nkv, hd,
                             d_pos, d_slot, d_inv, NULL, 1.0f, dk[1], kv_fp8,
                             bs, 0.05f, 0.03f, 0);
    int ok = gu_sync_ok(rc, "rope_kv_q");

    for (int v = 0; v < 2; v++) {
        hq[v] = malloc(4 * nq);
        hk[v] = malloc(kvb);
        gu_down(hq[v], dq[v], 4 * nq);
        gu_down(hk[v], dk[v], kvb);
    }
    bad += memcmp(hq[0], hq[1], 4 * nq) != 0;
    bad += memcmp(hk[0], hk[1], kvb) != 0;
    {
        /* the reference wrote the cache (a no-op would compare equal) */
        size_t changed = 0;

        for (size_t i = 0; i < kvb; i++) {
            changed += ((const uint8_t *) hk[0])[i] != 0x5a;
        }
        bad += changed == 0;
    }
    TAP_OK(ok && bad == 0, "rope_kv_q T %d heads %d/%d hd %d %s cache: == fp8 "
           "rescale + rope, rows and cache bit for bit (%d differences)", T,
           nh, nkv, hd, kv_fp8 ? "e4m3" : "bf16", bad);
    for (int v = 0; v < 2; v++) {
        cudaFree(dq[v]); cudaFree(dk[v]); free(hq[v]); free(hk[v]);
    }
    cudaFree(d_yq); cudaFree(d_qs); cudaFree(d_ws); cudaFree(d_inv);
    cudaFree(d_pos); cudaFree(d_slot);
    free(yq); free(qs); free(ws); free(inv); free(pos); free(slot);
    return ok && bad == 0;
}


int
main(void)
{
    static const struct {
        int M, N, K, ldy, y_bf16, acc;
    } cs[] = {
        { 1, 16, 16, 16, 0, 0 },
        { 7, 48, 64, 48, 0, 0 },
        { 33, 256, 4096, 256, 0, 0 },
        { 130, 96, 1024, 96, 1, 0 },
        { 64, 128, 512, 160, 0, 0 },      /* ldy > N */
        { 300, 64, 256, 64, 0, 1 },       /* accumulate */
        { 17, 4096, 512, 4096, 1, 0 },
    };
    const int       ncs = (int) (sizeof(cs) / sizeof(cs[0]));
    moe_fp8_gemm_t *g = NULL;
    void           *lws = NULL;
    uint64_t        seed;
    int             ndev = 0, rc;

    if (cudaGetDeviceCount(&ndev) != cudaSuccess || ndev == 0) {
        printf("1..0 # SKIP no CUDA device\n");
        return 0;
    }
    seed = gu_seed_env();
    TAP_PLAN(12 + 2 * ncs + 12 + 2 + 3 + 3 + 1 + 5 + 4 + 4);
    TAP_DIAG("seed %llu", (unsigned long long) seed);

    /* K 1040 .. 24576: the rows held in registers (2, 4, 8, 12 groups
     * of 8 per thread, partial ones too); 32768: read twice */
    test_quant(1040, 1056);
    test_quant(4096, 4096);
    test_quant(8208, 8208);
    test_quant(14336, 14344);
    test_quant(24576, 24576);
    test_quant(32768, 32768);

    lws = gu_dev((size_t) 32 << 20);
    rc = moe_cuda_fp8_gemm_create(lws, (size_t) 32 << 20, &g);
    if (rc != 0) {
        TAP_DIAG("fp8 gemm create: %s", moe_cuda_last_error());
        return 1;
    }
    for (int i = 0; i < ncs; i++) {
        for (int rs = 0; rs < 2; rs++) {
            char name[128];

            snprintf(name, sizeof(name), "gemm_fp8 M %d N %d K %d ldy %d "
                     "%s%s, %s", cs[i].M, cs[i].N, cs[i].K, cs[i].ldy,
                     cs[i].y_bf16 ? "bf16" : "fp32",
                     cs[i].acc ? " accumulate" : "",
                     rs ? "forced rescale path" : "default path");
            TAP_OK(gemm_case(g, cs[i].M, cs[i].N, cs[i].K, cs[i].ldy,
                             cs[i].y_bf16, cs[i].acc, rs, name), "%s", name);
        }
    }
    {
        /* a fresh object: once outer-vector scaling is refused, a new M
         * (same rounded M) makes no plan; where the library takes the
         * mode, each M has its own plan */
        moe_fp8_gemm_t *g2 = NULL;
        int             made = -1, outer = -1;

        if (moe_cuda_fp8_gemm_create(lws, (size_t) 32 << 20, &g2) == 0) {
            const size_t R = MOE_FP8_GEMM_ROWS;    /* rows multiplied */
            void *dq = gu_dev(R * 64), *dw = gu_dev(64 * 64);
            void *dws = gu_dev(64 * 4), *dy = gu_dev(64 * 64 * 4);
            void *dt = gu_dev(R * 64 * 4);
            int   rc1 = moe_cuda_gemm_fp8(g2, 5, 64, 64, (const uint8_t *) dq,
                                          (const float *) dws,
                                          (const uint8_t *) dw,
                                          (const float *) dws, dy, 64, 0, 0,
                                          (float *) dt, 0);
            int   n1 = moe_cuda_fp8_gemm_plans_made(g2);

            outer = moe_cuda_fp8_gemm_outer_vec(g2);
            if (rc1 == 0
                && moe_cuda_gemm_fp8(g2, 7, 64, 64, (const uint8_t *) dq,
                                     (const float *) dws,
                                     (const uint8_t *) dw,
                                     (const float *) dws, dy, 64, 0, 0,
                                     (float *) dt, 0) == 0)
            {
                made = moe_cuda_fp8_gemm_plans_made(g2) - n1;
            }
            cudaDeviceSynchronize();
            cudaFree(dq); cudaFree(dw); cudaFree(dws); cudaFree(dy);
            cudaFree(dt);
            moe_cuda_fp8_gemm_destroy(g2);
        }
        TAP_OK(made == (outer ? 1 : 0), "a second row count makes %d plan(s) "
               "(%s)", made, outer ? "outer-vector scales taken"
                                   : "outer-vector scales refused: no new "
                                     "query");
    }
    test_unscaled(g, 70, 256, 512, 1);
    test_unscaled(g, 1, 4096, 128, 1);
    test_unscaled(g, 70, 256, 512, 0);
    test_silu_quant(9, 1032, 1);
    test_silu_quant(2, 14336, 1);
    test_silu_quant(2, 24584, 1);
    test_silu_quant(37, 1032, 5);
    test_rescale_rows(37, 256, 5, 256, 0);
    test_rescale_rows(9, 4096, 1, 4098, 0);     /* scalar stores */
    test_rescale_rows(37, 256, 5, 256, 1);      /* bf16 products */
    test_rescale_rows(9, 4096, 1, 4098, 1);
    TAP_OK(moe_cuda_silu_quant_fp8(NULL, 1, 12, NULL, NULL, 0, NULL, 1, NULL,
                                   NULL, 0) == MOE_K_EUNSUPPORTED,
           "silu_quant_fp8: F %% 8 != 0 refused");
    TAP_OK(moe_cuda_fp8_rescale_rows(NULL, 1, 24, NULL, NULL, 0, NULL, 1,
                                     NULL, 24, 0) == MOE_K_EUNSUPPORTED,
           "fp8_rescale_rows: N %% 16 != 0 refused");
    TAP_OK(moe_cuda_fp8_rescale_rows_bf16(NULL, 1, 24, NULL, NULL, 0, NULL,
                                          1, NULL, 24, 0)
           == MOE_K_EUNSUPPORTED, "fp8_rescale_rows_bf16: N %% 16 != 0 "
           "refused");
    TAP_OK(moe_cuda_fp8_gemm_rows(g) == 64
           && moe_cuda_fp8_gemm_set_rows(g, 100) == MOE_K_EINVAL
           && moe_cuda_fp8_gemm_set_rows(g, 128) == MOE_K_OK
           && moe_cuda_fp8_gemm_rows(g) == 128
           && moe_cuda_fp8_gemm_set_rows(g, 64) == MOE_K_OK
           && moe_cuda_fp8_gemm_rows(g) == 64,
           "fp8 gemm row rounding: 64 by default, 128 settable, 100 "
           "refused");
    test_add_rmsnorm_q(1, 4096, 0);
    test_add_rmsnorm_q(70, 4096, 0);
    test_add_rmsnorm_q(9, 14000, 1);
    TAP_OK(moe_cuda_add_rmsnorm_q(NULL, NULL, NULL, NULL, NULL, 1, 66, NULL,
                                  1e-5f, NULL, NULL, 0) == MOE_K_EUNSUPPORTED,
           "add_rmsnorm_q refuses D %% 4 != 0");
    test_rope_q(1, 32, 8, 128, 0);
    test_rope_q(100, 32, 8, 128, 0);
    test_rope_q(70, 4, 2, 64, 1);
    TAP_OK(moe_cuda_rope_kv_q(NULL, 8, NULL, 1, 1, 1, 7, NULL, NULL, NULL,
                              NULL, 1.0f, NULL, 0, 16, 1.0f, 1.0f, 0)
           == MOE_K_EUNSUPPORTED, "rope_kv_q refuses an odd head_dim");
    test_unpermute_q(1, 4096, 8, 2, 0);
    test_unpermute_q(37, 4096, 8, 2, 0);
    test_unpermute_q(9, 2048, 60, 4, 1);
    test_unpermute_q(5, 14000, 16, 8, 1);
    {
        float   *d_f = (float *) gu_dev(4 * 4096 * 16);
        int32_t *d_i = (int32_t *) gu_dev(4 * 4096);
        int      r1, r2, r3, r4;

        r1 = moe_cuda_unpermute_rmsnorm_q(d_f, (moe_bf16_t *) d_f, d_f, d_f,
                                          64, d_i, d_f, d_i, 65, NULL, 1, 64,
                                          d_f, 1e-5f, (moe_bf16_t *) d_f,
                                          NULL, 0);
        r2 = moe_cuda_unpermute_rmsnorm_q(d_f, (moe_bf16_t *) d_f, d_f, d_f,
                                          66, d_i, d_f, d_i, 2, NULL, 1, 64,
                                          d_f, 1e-5f, (moe_bf16_t *) d_f,
                                          NULL, 0);
        r3 = moe_cuda_unpermute_rmsnorm_q(d_f, (moe_bf16_t *) d_f + 1, d_f,
                                          d_f, 64, d_i, d_f, d_i, 2, NULL, 1,
                                          64, d_f, 1e-5f, (moe_bf16_t *) d_f,
                                          NULL, 0);
        r4 = moe_cuda_unpermute_rmsnorm_q(d_f, (moe_bf16_t *) d_f, d_f, d_f,
                                          66, d_i, d_f, d_i, 2, NULL, 1, 66,
                                          d_f, 1e-5f, (moe_bf16_t *) d_f,
                                          NULL, 0);
        TAP_OK(r1 == MOE_K_EUNSUPPORTED && r2 == MOE_K_EUNSUPPORTED
               && r3 == MOE_K_EUNSUPPORTED && r4 == MOE_K_EUNSUPPORTED
               && cudaDeviceSynchronize() == cudaSuccess,
               "unpermute_rmsnorm_q refuses top-65, a scale stride %% 4, a "
               "misaligned yq and D %% 4 (%d %d %d %d)", r1, r2, r3, r4);
        cudaFree(d_f); cudaFree(d_i);
    }
    end_to_end(g, 48, 256, 2048);
    end_to_end(g, 5, 4096, 4096);

    TAP_OK(moe_cuda_gemm_fp8(g, 0, 16, 16, NULL, NULL, NULL, NULL, NULL, 16,
                             0, 0, NULL, 0) == MOE_K_OK,
           "M = 0 is a no-op");
    TAP_OK(moe_cuda_gemm_fp8(g, 4, 20, 16, NULL, NULL, NULL, NULL, NULL, 20,
                             0, 0, NULL, 0) == MOE_K_EUNSUPPORTED
           && moe_cuda_gemm_fp8(g, 4, 16, 24, NULL, NULL, NULL, NULL, NULL,
                                16, 0, 0, NULL, 0) == MOE_K_EUNSUPPORTED,
           "N or K not a multiple of 16: unsupported");
    TAP_OK(moe_cuda_quant_rows_fp8(NULL, 8, NULL, 1, 2, 24, NULL, NULL, 0)
           == MOE_K_EUNSUPPORTED, "quant_rows_fp8: K %% 16 != 0 refused");

    moe_cuda_fp8_gemm_destroy(g);
    cudaFree(lws);
    return TAP_DONE();
}
