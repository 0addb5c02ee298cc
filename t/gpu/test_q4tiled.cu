/*
 * Checks the tiled 4-bit weights (kernels/q4_tiled.cu; quant_gemv.h
 * "Tiled 4-bit weights") on fresh random AWQ / GPTQ tensors (the seed is
 * printed; MOE_TEST_SEED=N repeats a run; zeros 0..15, fp16 scales
 * 0.002..0.022, bf16 inputs in [-1, 1)):
 *  - moe_cuda_q4t_supported on accepted and refused shapes;
 *  - moe_cuda_q4t_pack of 2 of 3 matrices in place (AWQ and GPTQ, N 96,
 *    K 320): every nibble equal to a host re-implementation of the layout
 *    in q4_tiled.cu's header (tile (nt, kt) at byte (nt K / 64 + kt) 512,
 *    lane l = 4 g + t's 16 bytes, word i, nibble slot p = feature 16 nt +
 *    g + 8 (p & 1) at k = 64 kt + 16 t + 4 i + 2 ((p >> 1) & 1) + (p >>
 *    2)), the third matrix untouched; refusals (scratch too small or NULL,
 *    N % 16, K % 64, misaligned qweight, unknown format) leave qweight as
 *    it was;
 *  - per weight shape (AWQ and GPTQ, GPTQ zero bias 0 and 1, AWQ with a
 *    zero bias passed that it must ignore, G 64 / 128 / K, K 320 with G
 *    128 (last group short), N 96 / 128 / 256 / 64, 8 experts):
 *      the pack of all 8 experts against the host layout;
 *      moe_cuda_dequant_q4t on the tiled weights bit-equal to
 *      moe_cuda_dequant_q4 on the original ones and to the host's
 *      bf16((q - z) s);
 *      moe_cuda_qgemv_q4t into Y (H NULL) for dense steps (offs NULL) of
 *      1, 3, 8, 9, 17 and 33 rows (3 and 17 gathered through xrow / 2),
 *      8 experts with uneven rows and empty groups (3,0,1,0,9,2,0,17,
 *      gathered) and a compact grid (2 rows over 8 experts), each with
 *      max_rows 0 / 1 / 32 and k split auto / 1 / 2 / 4 / 8: every output
 *      within 2e-4 sum_k |x w| + 1e-6 of the double host sum of x (q - z)
 *      s, within twice that of moe_cuda_qgemv_q4_rows on the original
 *      layout, Y's columns past N (ldy = N + 5) and its rows past n keep
 *      their NaN sentinel, two runs bit-equal, and every max_rows hint the
 *      same bits at one split;
 *      the same steps with H (SiLU fused, N = 2 F): bf16 H within the
 *      host's silu(g) u (the sums' bounds carried through silu and the
 *      product, plus 2^-7 |h| for the bf16 rounding), within a bf16 step
 *      (plus twice the carried bounds) of moe_cuda_qgemv_q4_silu on the
 *      original layout, H's row n untouched, two runs bit-equal, hints
 *      bit-equal; k split 8 with H refused (MOE_K_EUNSUPPORTED, H
 *      untouched);
 *  - per AWQ shape, the weights repacked into GPTQ's layout
 *    (moe_cuda_q4_awq_to_gptq, the backend's default): read by
 *    moe_cuda_dequant_q4 as GPTQ with zero bias 0 they give the host's
 *    values bit for bit; a scratch one byte short is refused;
 *  - refusals (MOE_K_EUNSUPPORTED, nothing written, the device fine): N %
 *    16, K % 64, G 32, X one element off, ldx % 8, H with N % 32, k split
 *    3, 8 with H, 16, misaligned tiles; n 0 is a no-op (MOE_K_OK);
 *    moe_cuda_dequant_q4t refuses G 32 and K % 64;
 *  - a CUDA graph of one moe_cuda_qgemv_q4t launch (full and compact
 *    grid) replayed after the device offsets changed, then changed back:
 *    each replay follows the offsets on the device (host reference of the
 *    new offsets, nothing else written).
 * TAP; skips when there is no CUDA device.
 */

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include <cuda_fp16.h>

#include "gpu_tap.h"
#include "gpu_util.h"

extern "C" {
#include "tap.h"
}
#include "quant_gemv.h"

#define NEXP    8                   /* experts of a weight set */
#define NSK     5                   /* k splits tried with Y */
#define NSK_H   4                   /* with H (8 refused) */
#define NHINT   3
#define NHINT_H 2
#define XROWS   7                   /* input rows of a gathered step */

static const int awq_pos[8] = { 0, 4, 1, 5, 2, 6, 3, 7 };
static const int sks[NSK] = { 0, 1, 2, 4, 8 };
static const int hints[NHINT] = { 0, 1, 32 };
static const int hints_h[NHINT_H] = { 0, 32 };


/* a CUDA runtime call that must succeed (else the run ends: the plan's
 * count then fails it) */
static void
ck(cudaError_t e, const char *what)
{
    if (e != cudaSuccess) {
        TAP_DIAG("%s: %s", what, cudaGetErrorString(e));
        exit(1);
    }
}


static const char *
fmt_name(int fmt)
{
    return fmt == MOE_K_Q4_AWQ ? "awq" : "gptq";
}


/* ------------------------------------------------ the layouts, host side */

/* Nibble of feature f, input k of matrix m in fmt's checkpoint layout. */
static int
orig_nib(int fmt, const int32_t *qw, int N, int K, int m, int f, int k)
{
    uint32_t w;

    if (fmt == MOE_K_Q4_AWQ) {      /* (K, N / 8), columns at awq_pos */
        w = (uint32_t) qw[(size_t) m * K * (N / 8) + (size_t) k * (N / 8)
                          + f / 8];
        return (int) ((w >> (4 * awq_pos[f & 7])) & 15u);
    }
    /* GPTQ: (K / 8, N), k = 8 i + b at bits 4 b */
    w = (uint32_t) qw[(size_t) m * (K / 8) * N + (size_t) (k / 8) * N + f];
    return (int) ((w >> (4 * (k & 7))) & 15u);
}


/*
 * Nibbles of `count` tiled matrices t (N x K each, N K / 8 words) that
 * differ from the layout of q4_tiled.cu's header applied to qw; the
 * first one described in first.
 */
static long
tiled_bad(int fmt, const int32_t *qw, const uint32_t *t, int N, int K,
    int count, char *first, size_t fl)
{
    const size_t mw = (size_t) N * K / 8;
    long         bad = 0;

    first[0] = '\0';
    for (int m = 0; m < count; m++) {
        for (int nt = 0; nt < N / 16; nt++) {
            for (int kt = 0; kt < K / 64; kt++) {
                for (int l = 0; l < 32; l++) {
                    for (int i = 0; i < 4; i++) {
                        size_t   byte = ((size_t) nt * (K / 64) + kt) * 512
                                        + 16 * (size_t) l + 4 * (size_t) i;
                        uint32_t w = t[m * mw + byte / 4];
                        int      g = l >> 2, tt = l & 3;

                        for (int p = 0; p < 8; p++) {
                            int f = 16 * nt + g + 8 * (p & 1);
                            int k = 64 * kt + 16 * tt + 4 * i
                                    + 2 * ((p >> 1) & 1) + (p >> 2);
                            int want = orig_nib(fmt, qw, N, K, m, f, k);
                            int got = (int) ((w >> (4 * p)) & 15u);

                            if (got != want) {
                                if (bad == 0) {
                                    snprintf(first, fl, "matrix %d tile "
                                             "(%d, %d) lane %d word %d slot "
                                             "%d (feature %d, k %d): %d, "
                                             "want %d", m, nt, kt, l, i, p,
                                             f, k, got, want);
                                }
                                bad++;
                            }
                        }
                    }
                }
            }
        }
    }
    return bad;
}


static uint32_t
rand_word(void)
{
    return gu_rand() ^ (gu_rand() << 16);
}


/* ------------------------------------------------------- weight sets */

typedef struct {
    int       fmt, G, zb, N, K, ne, KG;  /* zb: as passed to launchers */
    int32_t  *qw, *qz;                    /* host, checkpoint layout */
    uint16_t *sc;
    float    *w;                          /* host (q - z) s, (ne, N, K) */
    int32_t  *dqw, *dqt, *dqz;            /* device: original, tiled */
    uint16_t *dsc;
    int       pack_rc;
    long      pack_bad;
    char      pack_first[160];
} qt_t;


/* Random tensors of ne experts, uploaded twice (original and tiled:
 * packed here through a scratch of exactly one matrix) and dequantized
 * on the host (AWQ ignores zb). */
static void
qt_make(qt_t *q, int fmt, int G, int zb, int N, int K, int ne)
{
    size_t nw = (size_t) ne * N * K / 8;
    size_t nz, ns;
    int    zbe = fmt == MOE_K_Q4_AWQ ? 0 : zb;
    void  *scratch;

    memset(q, 0, sizeof(*q));
    q->fmt = fmt;
    q->G = G;
    q->zb = zb;
    q->N = N;
    q->K = K;
    q->ne = ne;
    q->KG = (K + G - 1) / G;
    nz = (size_t) ne * q->KG * N / 8;
    ns = (size_t) ne * q->KG * N;
    q->qw = (int32_t *) malloc(nw * 4);
    q->qz = (int32_t *) malloc(nz * 4);
    q->sc = (uint16_t *) malloc(ns * 2);
    q->w = (float *) malloc((size_t) ne * N * K * 4);
    for (size_t i = 0; i < nw; i++) {
        q->qw[i] = (int32_t) rand_word();
    }
    for (size_t i = 0; i < nz; i++) {
        q->qz[i] = (int32_t) rand_word();       /* every zero 0..15 */
    }
    for (size_t i = 0; i < ns; i++) {
        __half_raw r = __float2half(0.002f + 0.02f * fabsf(gu_uniform()));

        q->sc[i] = r.x;
    }
    for (int e = 0; e < ne; e++) {
        for (int j = 0; j < N; j++) {
            int sh = fmt == MOE_K_Q4_AWQ ? awq_pos[j & 7] : (j & 7);

            for (int k = 0; k < K; k++) {
                size_t   gr = (size_t) e * q->KG + k / G;
                uint32_t zw = (uint32_t) q->qz[gr * (N / 8) + j / 8];
                int      z = (int) ((zw >> (4 * sh)) & 15u) + zbe;
                int      nib = orig_nib(fmt, q->qw, N, K, e, j, k);

                q->w[((size_t) e * N + j) * K + k] =
                    ((float) nib - (float) z) * gu_h2f(q->sc[gr * N + j]);
            }
        }
    }
    q->dqw = (int32_t *) gu_up(q->qw, nw * 4);
    q->dqt = (int32_t *) gu_up(q->qw, nw * 4);
    q->dqz = (int32_t *) gu_up(q->qz, nz * 4);
    q->dsc = (uint16_t *) gu_up(q->sc, ns * 2);
    scratch = gu_dev((size_t) N * K / 2);
    q->pack_rc = moe_cuda_q4t_pack(fmt, q->dqt, N, K, ne, scratch,
                                   (size_t) N * K / 2, 0);
    if (!gu_sync_ok(q->pack_rc, "q4t_pack")) {
        q->pack_rc = q->pack_rc != 0 ? q->pack_rc : MOE_K_EBACKEND;
    }
    cudaFree(scratch);
    {
        uint32_t *t = (uint32_t *) malloc(nw * 4);

        gu_down(t, q->dqt, nw * 4);
        q->pack_bad = tiled_bad(fmt, q->qw, t, N, K, ne, q->pack_first,
                                sizeof(q->pack_first));
        free(t);
    }
}


static void
qt_free(qt_t *q)
{
    cudaFree(q->dqw);
    cudaFree(q->dqt);
    cudaFree(q->dqz);
    cudaFree(q->dsc);
    free(q->qw);
    free(q->qz);
    free(q->sc);
    free(q->w);
}


static void
qt_label(const qt_t *q, char *buf, size_t bl)
{
    snprintf(buf, bl, "%s G %d zb %d N %d K %d", fmt_name(q->fmt), q->G,
             q->zb, q->N, q->K);
}


/* ------------------------------------------------------------ steps */

/* The rows of one call: dense (offs NULL, E 1, expert 0's weights) or
 * NEXP groups by offs; inputs X (nx, ldx) bf16, row r reading X row
 * xrow[r] / 2 when gathered, else row r. */
typedef struct {
    int       dense, gather, E, n, nx, ldx, N, K;
    int32_t   offs[NEXP + 1], *xrow;
    float    *x;
    uint16_t *xb;
    double   *ref, *mag;                /* (n, N): sum x w, sum |x w| */
    uint16_t *dx;
    int32_t  *doffs, *dxrow;
} step_t;


/* ref and mag of the step's current offsets */
static void
step_ref(step_t *s, const qt_t *q)
{
    memset(s->ref, 0, (size_t) s->n * s->N * sizeof(double));
    memset(s->mag, 0, (size_t) s->n * s->N * sizeof(double));
    for (int e = 0; e < s->E; e++) {
        int r0 = s->dense ? 0 : s->offs[e];
        int r1 = s->dense ? s->n : s->offs[e + 1];

        for (int r = r0; r < r1; r++) {
            const float *xv = s->x + (size_t) (s->gather ? s->xrow[r] / 2
                                                         : r) * s->ldx;

            for (int j = 0; j < s->N; j++) {
                const float *w = q->w + ((size_t) e * s->N + j) * s->K;
                double       acc = 0, a = 0;

                for (int k = 0; k < s->K; k++) {
                    double p = (double) xv[k] * w[k];

                    acc += p;
                    a += fabs(p);
                }
                s->ref[(size_t) r * s->N + j] = acc;
                s->mag[(size_t) r * s->N + j] = a;
            }
        }
    }
}


/* rows: NEXP group sizes (dense: NULL, n rows) */
static void
step_make(step_t *s, const qt_t *q, int dense, int gather, int n,
    const int *rows)
{
    memset(s, 0, sizeof(*s));
    s->dense = dense;
    s->gather = gather;
    s->N = q->N;
    s->K = q->K;
    s->E = dense ? 1 : NEXP;
    s->offs[0] = 0;
    if (dense) {
        s->offs[1] = n;
    } else {
        for (int e = 0; e < NEXP; e++) {
            s->offs[e + 1] = s->offs[e] + rows[e];
        }
    }
    s->n = s->offs[s->E];
    s->nx = gather ? XROWS : s->n;
    s->ldx = q->K + 8;
    s->xrow = (int32_t *) malloc((size_t) s->n * 4 + 4);
    for (int r = 0; r < s->n; r++) {
        s->xrow[r] = (int32_t) (gu_rand() % (uint32_t) s->nx) * 2 + 1;
    }
    s->x = (float *) malloc((size_t) s->nx * s->ldx * 4);
    s->xb = (uint16_t *) malloc((size_t) s->nx * s->ldx * 2);
    gu_fill_bf(s->x, s->xb, (size_t) s->nx * s->ldx, 1.0f);
    s->ref = (double *) malloc((size_t) s->n * s->N * sizeof(double));
    s->mag = (double *) malloc((size_t) s->n * s->N * sizeof(double));
    step_ref(s, q);
    s->dx = (uint16_t *) gu_up(s->xb, (size_t) s->nx * s->ldx * 2);
    s->doffs = (int32_t *) gu_up(s->offs, sizeof(s->offs));
    s->dxrow = (int32_t *) gu_up(s->xrow, (size_t) s->n * 4 + 4);
}


/* new group sizes (same total), on the host and the device */
static void
step_set_rows(step_t *s, const qt_t *q, const int *rows)
{
    for (int e = 0; e < NEXP; e++) {
        s->offs[e + 1] = s->offs[e] + rows[e];
    }
    ck(cudaMemcpy(s->doffs, s->offs, sizeof(s->offs),
                  cudaMemcpyHostToDevice), "upload offsets");
    step_ref(s, q);
}


static void
step_free(step_t *s)
{
    cudaFree(s->dx);
    cudaFree(s->doffs);
    cudaFree(s->dxrow);
    free(s->xrow);
    free(s->x);
    free(s->xb);
    free(s->ref);
    free(s->mag);
}


static int
q4t_run(const qt_t *q, const step_t *s, int hint, int sk, float *Y, int ldy,
    uint16_t *H, cudaStream_t stream)
{
    return moe_cuda_qgemv_q4t(q->fmt, (const moe_bf16_t *) s->dx, s->ldx,
                              s->gather ? s->dxrow : NULL, 2, q->dqt,
                              q->dqz, q->dsc, q->G, q->zb, q->N, q->K,
                              s->dense ? NULL : s->doffs, s->E, s->n, hint,
                              sk, Y, ldy, (moe_bf16_t *) H, stream);
}


/* ------------------------------------------------------ checks of Y */

typedef struct {
    long   bad_ref, bad_orig, written;
    double worst;                       /* err / (2e-4 mag + 1e-6) */
    char   first[240];
} tally_t;


/*
 * Y (n + 2 rows of ldy) against the host (2e-4 sum |x w| + 1e-6) and, if
 * Yo, against the original layout's Y (twice that); everything outside
 * rows [0, n) x columns [0, N) must hold the 0xff sentinel.
 */
static void
y_check(const step_t *s, const float *Y, const float *Yo, int ldy,
    const char *tag, tally_t *t)
{
    for (int r = 0; r < s->n + 2; r++) {
        for (int j = 0; j < ldy; j++) {
            float v = Y[(size_t) r * ldy + j];

            if (r >= s->n || j >= s->N) {
                uint32_t u;

                memcpy(&u, &v, 4);
                if (u != 0xffffffffu) {
                    if (t->written == 0 && t->first[0] == '\0') {
                        snprintf(t->first, sizeof(t->first), "%s: row %d "
                                 "col %d written (%.7g)", tag, r, j, v);
                    }
                    t->written++;
                }
                continue;
            }
            double ref = s->ref[(size_t) r * s->N + j];
            double tol = 2e-4 * s->mag[(size_t) r * s->N + j] + 1e-6;
            double err = fabs((double) v - ref);

            if (!(err <= tol)) {
                if (t->first[0] == '\0') {
                    snprintf(t->first, sizeof(t->first), "%s: row %d col "
                             "%d: %.7g, host %.7g (sum |x w| %.4g)", tag, r,
                             j, v, ref, s->mag[(size_t) r * s->N + j]);
                }
                t->bad_ref++;
            }
            if (err / tol > t->worst || isnan(v)) {
                t->worst = isnan(v) ? INFINITY : err / tol;
            }
            if (Yo != NULL) {
                float  o = Yo[(size_t) r * ldy + j];
                double d = fabs((double) v - (double) o);

                if (!(d <= 2 * tol)) {
                    if (t->first[0] == '\0') {
                        snprintf(t->first, sizeof(t->first), "%s: row %d "
                                 "col %d: %.7g, original layout %.7g", tag,
                                 r, j, v, o);
                    }
                    t->bad_orig++;
                }
            }
        }
    }
}


/*
 * moe_cuda_qgemv_q4t into Y for one step, every hint x k split, each run
 * twice; against the host, moe_cuda_qgemv_q4_rows on the original layout
 * and the sentinel; bit-equal runs and hints.
 */
static void
test_y(const qt_t *q, const step_t *s, const char *sname)
{
    const int ldy = q->N + 5;
    size_t    ny = (size_t) (s->n + 2) * ldy;
    float    *dy = (float *) gu_dev(ny * 4);
    float    *hy = (float *) malloc(ny * 4), *hy2 = (float *) malloc(ny * 4);
    float    *ho = (float *) malloc(ny * 4);
    float    *hfirst = (float *) malloc(NSK * ny * 4);
    tally_t   t, to;
    char      lab[96], tag[160];
    int       rc, ok_o, rc_bad = 0, diff_run = 0, diff_hint = 0;

    memset(&t, 0, sizeof(t));
    memset(&to, 0, sizeof(to));
    qt_label(q, lab, sizeof(lab));

    /* the original layout, the reference of the cross-check */
    ck(cudaMemset(dy, 0xff, ny * 4), "memset Y");
    rc = moe_cuda_qgemv_q4_rows(q->fmt, (const moe_bf16_t *) s->dx, s->ldx,
                                s->gather ? s->dxrow : NULL, 2, q->dqw,
                                q->dqz, q->dsc, NULL, q->G, q->zb, q->N,
                                q->K, s->dense ? NULL : s->doffs, s->E, s->n,
                                0, dy, ldy, 0);
    ok_o = gu_sync_ok(rc, "qgemv_q4_rows (original layout)");
    gu_down(ho, dy, ny * 4);
    y_check(s, ho, NULL, ldy, "original layout", &to);
    if (to.bad_ref > 0) {
        /* the bound of the cross-check assumes it */
        TAP_DIAG("%s %s: the original layout's GEMV is off the host (%ld "
                 "bad): %s", lab, sname, to.bad_ref, to.first);
    }

    for (int h = 0; h < NHINT; h++) {
        for (int si = 0; si < NSK; si++) {
            for (int pass = 0; pass < 2; pass++) {
                ck(cudaMemset(dy, 0xff, ny * 4), "memset Y");
                rc = q4t_run(q, s, hints[h], sks[si], dy, ldy, NULL, 0);
                snprintf(tag, sizeof(tag), "max_rows %d sk %d", hints[h],
                         sks[si]);
                if (!gu_sync_ok(rc, tag)) {
                    rc_bad++;
                }
                gu_down(pass == 0 ? hy : hy2, dy, ny * 4);
            }
            if (memcmp(hy, hy2, ny * 4) != 0) {
                if (diff_run++ == 0) {
                    TAP_DIAG("%s %s: max_rows %d sk %d: two runs differ",
                             lab, sname, hints[h], sks[si]);
                }
            }
            if (h == 0) {
                memcpy(hfirst + si * ny, hy, ny * 4);
            } else if (memcmp(hfirst + si * ny, hy, ny * 4) != 0) {
                if (diff_hint++ == 0) {
                    TAP_DIAG("%s %s: sk %d: max_rows %d differs from "
                             "max_rows %d", lab, sname, sks[si], hints[h],
                             hints[0]);
                }
            }
            y_check(s, hy, ok_o ? ho : NULL, ldy, tag, &t);
        }
    }
    if (t.first[0] != '\0') {
        TAP_DIAG("%s %s: first problem: %s", lab, sname, t.first);
    }
    TAP_DIAG("%s %s: worst error %.3g of the bound (2e-4 sum |x w| + 1e-6)",
             lab, sname, t.worst);
    TAP_OK(rc_bad == 0 && ok_o && t.bad_ref == 0 && t.bad_orig == 0
           && t.written == 0 && diff_run == 0 && diff_hint == 0,
           "qgemv_q4t %s, %s (%d rows): max_rows 0/1/32 x sk auto/1/2/4/8 "
           "within 2e-4 of the host (%ld bad) and of qgemv_q4_rows on the "
           "original layout (%ld bad), nothing else written (%ld), runs "
           "bit-equal (%d differ), hints bit-equal (%d differ), %d "
           "launches failed", lab, sname, s->n, t.bad_ref, t.bad_orig,
           t.written, diff_run, diff_hint, rc_bad);
    cudaFree(dy);
    free(hy);
    free(hy2);
    free(ho);
    free(hfirst);
}


/*
 * H (n + 1 rows of F) against silu(g) u of the host's sums and against
 * Ho (the original layout's fused H); row n must hold 0xffff.
 */
static void
h_check(const step_t *s, const uint16_t *Hd, const uint16_t *Ho,
    const char *tag, tally_t *t)
{
    const int F = s->N / 2;

    for (int r = 0; r < s->n + 1; r++) {
        for (int j = 0; j < F; j++) {
            uint16_t b = Hd[(size_t) r * F + j];

            if (r >= s->n) {
                if (b != 0xffff) {
                    if (t->first[0] == '\0') {
                        snprintf(t->first, sizeof(t->first), "%s: H row %d "
                                 "col %d written", tag, r, j);
                    }
                    t->written++;
                }
                continue;
            }
            double g = s->ref[(size_t) r * s->N + j];
            double u = s->ref[(size_t) r * s->N + F + j];
            double mg = s->mag[(size_t) r * s->N + j];
            double mu = s->mag[(size_t) r * s->N + F + j];
            double sg = g / (1.0 + exp(-g)), want = sg * u;
            /* the sums' bounds carried through silu (slope <= 1.1) and
             * the product */
            double prop = (2e-4 * mg + 1e-6) * 1.1 * fabs(u)
                          + fabs(sg) * (2e-4 * mu + 1e-6);
            double tol = prop + fabs(want) / 128 + 1e-6;
            double v = gu_bf2f(b), err = fabs(v - want);

            if (!(err <= tol)) {
                if (t->first[0] == '\0') {
                    snprintf(t->first, sizeof(t->first), "%s: H row %d col "
                             "%d: %.7g, host %.7g", tag, r, j, v, want);
                }
                t->bad_ref++;
            }
            if (err / tol > t->worst || isnan(v)) {
                t->worst = isnan(v) ? INFINITY : err / tol;
            }
            if (Ho != NULL) {
                double o = gu_bf2f(Ho[(size_t) r * F + j]);
                double d = fabs(v - o);

                if (!(d <= 2 * prop + fmax(fabs(v), fabs(o)) / 128
                           + 1e-6))
                {
                    if (t->first[0] == '\0') {
                        snprintf(t->first, sizeof(t->first), "%s: H row %d "
                                 "col %d: %.7g, original layout %.7g", tag,
                                 r, j, v, o);
                    }
                    t->bad_orig++;
                }
            }
        }
    }
}


/* moe_cuda_qgemv_q4t with H (SiLU fused) for one step */
static void
test_h(const qt_t *q, const step_t *s, const char *sname)
{
    const int F = q->N / 2;
    size_t    nh = (size_t) (s->n + 1) * F;
    uint16_t *dh = (uint16_t *) gu_dev(nh * 2);
    float    *dys = (float *) gu_dev((size_t) s->n * q->N * 4);
    uint16_t *hh = (uint16_t *) malloc(nh * 2);
    uint16_t *hh2 = (uint16_t *) malloc(nh * 2);
    uint16_t *ho = (uint16_t *) malloc(nh * 2);
    uint16_t *hfirst = (uint16_t *) malloc(NSK_H * nh * 2);
    tally_t   t, to;
    char      lab[96], tag[160];
    int       rc, ok_o, rc_bad = 0, diff_run = 0, diff_hint = 0, rc8;
    int       kept8 = 1;

    memset(&t, 0, sizeof(t));
    memset(&to, 0, sizeof(to));
    qt_label(q, lab, sizeof(lab));

    ck(cudaMemset(dh, 0xff, nh * 2), "memset H");
    rc = moe_cuda_qgemv_q4_silu(q->fmt, (const moe_bf16_t *) s->dx, s->ldx,
                                s->gather ? s->dxrow : NULL, 2, q->dqw,
                                q->dqz, q->dsc, NULL, q->G, q->zb, q->N,
                                q->K, s->dense ? NULL : s->doffs, s->E, s->n,
                                0, dys, (moe_bf16_t *) dh, 0);
    ok_o = gu_sync_ok(rc, "qgemv_q4_silu (original layout)");
    gu_down(ho, dh, nh * 2);
    h_check(s, ho, NULL, "original layout", &to);
    if (to.bad_ref > 0 || to.written > 0) {
        TAP_DIAG("%s %s: the original layout's fused H is off the host (%ld "
                 "bad, %ld written): %s", lab, sname, to.bad_ref,
                 to.written, to.first);
    }

    for (int h = 0; h < NHINT_H; h++) {
        for (int si = 0; si < NSK_H; si++) {
            for (int pass = 0; pass < 2; pass++) {
                ck(cudaMemset(dh, 0xff, nh * 2), "memset H");
                rc = q4t_run(q, s, hints_h[h], sks[si], NULL, 0, dh, 0);
                snprintf(tag, sizeof(tag), "H max_rows %d sk %d",
                         hints_h[h], sks[si]);
                if (!gu_sync_ok(rc, tag)) {
                    rc_bad++;
                }
                gu_down(pass == 0 ? hh : hh2, dh, nh * 2);
            }
            if (memcmp(hh, hh2, nh * 2) != 0) {
                if (diff_run++ == 0) {
                    TAP_DIAG("%s %s: H max_rows %d sk %d: two runs differ",
                             lab, sname, hints_h[h], sks[si]);
                }
            }
            if (h == 0) {
                memcpy(hfirst + si * nh, hh, nh * 2);
            } else if (memcmp(hfirst + si * nh, hh, nh * 2) != 0) {
                if (diff_hint++ == 0) {
                    TAP_DIAG("%s %s: H sk %d: max_rows %d differs from "
                             "max_rows %d", lab, sname, sks[si], hints_h[h],
                             hints_h[0]);
                }
            }
            h_check(s, hh, ok_o ? ho : NULL, tag, &t);
        }
    }

    /* k split 8 with H: refused, nothing written */
    ck(cudaMemset(dh, 0xff, nh * 2), "memset H");
    rc8 = q4t_run(q, s, 0, 8, NULL, 0, dh, 0);
    kept8 = gu_sync_ok(0, "H sk 8");
    gu_down(hh, dh, nh * 2);
    for (size_t i = 0; i < nh; i++) {
        kept8 &= hh[i] == 0xffff;
    }

    if (t.first[0] != '\0') {
        TAP_DIAG("%s %s: first problem: %s", lab, sname, t.first);
    }
    TAP_DIAG("%s %s: H worst error %.3g of the bound", lab, sname, t.worst);
    TAP_OK(rc_bad == 0 && ok_o && t.bad_ref == 0 && t.bad_orig == 0
           && t.written == 0 && diff_run == 0 && diff_hint == 0
           && rc8 == MOE_K_EUNSUPPORTED && kept8,
           "qgemv_q4t SiLU fused %s, %s (%d rows): max_rows 0/32 x sk "
           "auto/1/2/4: H within bounds of the host's silu(g) u (%ld bad) "
           "and a bf16 step of qgemv_q4_silu on the original layout (%ld "
           "bad), row n untouched (%ld), runs bit-equal (%d differ), hints "
           "bit-equal (%d differ), %d launches failed; sk 8 refused (rc %d"
           "%s)", lab, sname, s->n, t.bad_ref, t.bad_orig, t.written,
           diff_run, diff_hint, rc_bad, rc8, kept8 ? "" : ", H written");
    cudaFree(dh);
    cudaFree(dys);
    free(hh);
    free(hh2);
    free(ho);
    free(hfirst);
}


/* ------------------------------------------------- pack and dequant */

/* moe_cuda_dequant_q4t (tiled) against moe_cuda_dequant_q4 (original)
 * and the host, every expert, bit for bit */
static void
test_dequant(const qt_t *q)
{
    size_t    no = (size_t) q->ne * q->N * q->K;
    uint16_t *dt = (uint16_t *) gu_dev(no * 2), *dor = (uint16_t *)
                   gu_dev(no * 2);
    uint16_t *ht = (uint16_t *) malloc(no * 2), *hor = (uint16_t *)
                   malloc(no * 2);
    int       rc1, rc2, ok;
    long      bad_o = 0, bad_h = 0, first = -1;
    char      lab[96];

    qt_label(q, lab, sizeof(lab));
    rc1 = moe_cuda_dequant_q4t(q->fmt, q->dqt, q->dqz, q->dsc, q->G, q->zb,
                               q->N, q->K, q->ne, (moe_bf16_t *) dt, 0);
    rc2 = moe_cuda_dequant_q4(q->fmt, q->dqw, q->dqz, q->dsc, NULL, q->G,
                              q->zb, q->N, q->K, q->ne, (moe_bf16_t *) dor,
                              0);
    ok = gu_sync_ok(rc1 | rc2, "dequant");
    gu_down(ht, dt, no * 2);
    gu_down(hor, dor, no * 2);
    for (size_t i = 0; i < no; i++) {
        uint16_t want = gu_f2bf(q->w[i]);

        if (ht[i] != hor[i]) {
            bad_o++;
        }
        if (ht[i] != want) {
            if (first < 0) {
                first = (long) i;
            }
            bad_h++;
        }
    }
    if (first >= 0) {
        size_t i = (size_t) first;

        TAP_DIAG("%s: expert %zu feature %zu k %zu: 0x%04x, host 0x%04x, "
                 "original layout 0x%04x", lab, i / ((size_t) q->N * q->K),
                 i / q->K % q->N, i % q->K, ht[i], gu_f2bf(q->w[i]), hor[i]);
    }
    TAP_OK(ok && bad_o == 0 && bad_h == 0, "dequant_q4t %s, %d experts: "
           "bit-equal to dequant_q4 on the original layout (%ld differ) and "
           "to the host's bf16((q - z) s) (%ld differ)", lab, q->ne, bad_o,
           bad_h);
    cudaFree(dt);
    cudaFree(dor);
    free(ht);
    free(hor);
}


/*
 * AWQ weights repacked into GPTQ's layout (moe_cuda_q4_awq_to_gptq, in
 * place, all experts): moe_cuda_dequant_q4 reading them as GPTQ with
 * zero bias 0 gives the host's bf16((q - z) s) bit for bit (the values
 * every GPTQ kernel reads; the engine-level check is test_qbackend's AWQ
 * models); a scratch one byte short is refused with qweight untouched.
 */
static void
test_awq_gptq(const qt_t *q)
{
    size_t    nw = (size_t) q->ne * q->N * q->K / 8;
    size_t    nz = (size_t) q->ne * q->KG * q->N / 8;
    size_t    no = (size_t) q->ne * q->N * q->K;
    int32_t  *w = (int32_t *) gu_dev(nw * 4), *z = (int32_t *) gu_dev(nz * 4);
    uint16_t *d = (uint16_t *) gu_dev(no * 2);
    uint16_t *h = (uint16_t *) malloc(no * 2);
    int32_t  *hw = (int32_t *) malloc(nw * 4);
    void     *scr = gu_dev((size_t) q->N * q->K / 2);
    int       rc, rc0, ok;
    long      bad = 0;
    char      lab[96];

    qt_label(q, lab, sizeof(lab));
    ck(cudaMemcpy(w, q->dqw, nw * 4, cudaMemcpyDeviceToDevice), "copy");
    ck(cudaMemcpy(z, q->dqz, nz * 4, cudaMemcpyDeviceToDevice), "copy");
    rc0 = moe_cuda_q4_awq_to_gptq(w, z, q->N, q->K, q->G, q->ne, scr,
                                  (size_t) q->N * q->K / 2 - 1, 0);
    gu_down(hw, w, nw * 4);
    TAP_OK(rc0 == MOE_K_EUNSUPPORTED && memcmp(hw, q->qw, nw * 4) == 0,
           "awq_to_gptq %s: a scratch one byte short refused, qweight "
           "untouched", lab);
    rc = moe_cuda_q4_awq_to_gptq(w, z, q->N, q->K, q->G, q->ne, scr,
                                 (size_t) q->N * q->K / 2, 0);
    rc |= moe_cuda_dequant_q4(MOE_K_Q4_GPTQ, w, z, q->dsc, NULL, q->G, 0,
                              q->N, q->K, q->ne, (moe_bf16_t *) d, 0);
    ok = gu_sync_ok(rc, "awq_to_gptq");
    gu_down(h, d, no * 2);
    for (size_t i = 0; i < no; i++) {
        bad += h[i] != gu_f2bf(q->w[i]);
    }
    TAP_OK(ok && bad == 0, "awq_to_gptq %s, %d experts: read as GPTQ (zero "
           "bias 0), bit-equal to the host's bf16((q - z) s) (%ld differ)",
           lab, q->ne, bad);
    cudaFree(w);
    cudaFree(z);
    cudaFree(d);
    cudaFree(scr);
    free(h);
    free(hw);
}


/* count 2 of 3 matrices packed in place: the host layout, the third
 * matrix as it was */
static void
test_pack(int fmt)
{
    const int N = 96, K = 320, M = 3;
    size_t    mw = (size_t) N * K / 8;
    int32_t  *qw = (int32_t *) malloc(M * mw * 4);
    uint32_t *t = (uint32_t *) malloc(M * mw * 4);
    int32_t  *dq;
    void     *scratch = gu_dev(mw * 4);
    int       rc, ok;
    long      bad;
    char      first[160];

    for (size_t i = 0; i < M * mw; i++) {
        qw[i] = (int32_t) rand_word();
    }
    dq = (int32_t *) gu_up(qw, M * mw * 4);
    rc = moe_cuda_q4t_pack(fmt, dq, N, K, 2, scratch, mw * 4, 0);
    ok = gu_sync_ok(rc, "q4t_pack count 2");
    gu_down(t, dq, M * mw * 4);
    bad = tiled_bad(fmt, qw, t, N, K, 2, first, sizeof(first));
    if (bad > 0) {
        TAP_DIAG("q4t_pack %s: %s", fmt_name(fmt), first);
    }
    TAP_OK(ok && bad == 0 && memcmp(t + 2 * mw, qw + 2 * mw, mw * 4) == 0,
           "q4t_pack %s N %d K %d, 2 of 3 matrices in place (scratch of one "
           "matrix): every nibble where the tiled layout puts it (%ld "
           "differ), the third matrix untouched", fmt_name(fmt), N, K, bad);
    cudaFree(dq);
    cudaFree(scratch);
    free(qw);
    free(t);
}


static void
test_pack_refusals(void)
{
    const int N = 96, K = 320;
    size_t    bytes = (size_t) N * K / 2;
    int32_t  *qw = (int32_t *) malloc(bytes + 16);
    int32_t  *back = (int32_t *) malloc(bytes + 16);
    int32_t  *dq;
    void     *scratch = gu_dev(2 * bytes);
    int       r1, r2, r3, r4, r5, r6, ok;

    for (size_t i = 0; i < (bytes + 16) / 4; i++) {
        qw[i] = (int32_t) rand_word();
    }
    dq = (int32_t *) gu_up(qw, bytes + 16);
    r1 = moe_cuda_q4t_pack(MOE_K_Q4_AWQ, dq, N, K, 1, scratch, bytes - 1, 0);
    r2 = moe_cuda_q4t_pack(MOE_K_Q4_GPTQ, dq, N, K, 1, NULL, bytes, 0);
    TAP_OK(r1 == MOE_K_EUNSUPPORTED && r2 == MOE_K_EUNSUPPORTED,
           "q4t_pack refuses a scratch one byte short (%d) and a NULL "
           "scratch (%d): %s", r1, r2, moe_cuda_last_error());
    r3 = moe_cuda_q4t_pack(MOE_K_Q4_GPTQ, dq, 72, K, 1, scratch, 2 * bytes,
                           0);
    TAP_OK(r3 == MOE_K_EUNSUPPORTED, "q4t_pack refuses N 72 (N %% 16 != 0): "
           "%s", moe_cuda_last_error());
    r4 = moe_cuda_q4t_pack(MOE_K_Q4_AWQ, dq, N, 288, 1, scratch, 2 * bytes,
                           0);
    TAP_OK(r4 == MOE_K_EUNSUPPORTED, "q4t_pack refuses K 288 (K %% 64 != "
           "0): %s", moe_cuda_last_error());
    r5 = moe_cuda_q4t_pack(MOE_K_Q4_AWQ, dq + 1, N, K, 1, scratch,
                           2 * bytes, 0);
    r6 = moe_cuda_q4t_pack(7, dq, N, K, 1, scratch, 2 * bytes, 0);
    TAP_OK(r5 == MOE_K_EUNSUPPORTED && r6 == MOE_K_EUNSUPPORTED,
           "q4t_pack refuses qweight 4 bytes off 16-byte alignment (%d) and "
           "format 7 (%d)", r5, r6);
    ok = gu_sync_ok(0, "q4t_pack refusals");
    gu_down(back, dq, bytes + 16);
    TAP_OK(ok && memcmp(back, qw, bytes + 16) == 0, "q4t_pack: qweight "
           "untouched by the refused calls, the device fine");
    cudaFree(dq);
    cudaFree(scratch);
    free(qw);
    free(back);
}


static void
test_supported(void)
{
    int a = moe_cuda_q4t_supported(MOE_K_Q4_AWQ, 128, 256, 512);
    int b = moe_cuda_q4t_supported(MOE_K_Q4_GPTQ, 128, 128, 320);
    int c = moe_cuda_q4t_supported(MOE_K_Q4_GPTQ, 64, 96, 1024);
    int d = moe_cuda_q4t_supported(MOE_K_Q4_AWQ, 512, 64, 512);
    int r1 = moe_cuda_q4t_supported(MOE_K_Q4_AWQ, 32, 256, 512);
    int r2 = moe_cuda_q4t_supported(MOE_K_Q4_GPTQ, 128, 72, 512);
    int r3 = moe_cuda_q4t_supported(MOE_K_Q4_GPTQ, 128, 256, 96);
    int r4 = moe_cuda_q4t_supported(7, 128, 256, 512);
    int r5 = moe_cuda_q4t_supported(MOE_K_Q4_AWQ, 0, 256, 512);
    int r6 = moe_cuda_q4t_supported(MOE_K_Q4_AWQ, 96, 256, 576);

    TAP_OK(a && b && c && d && !r1 && !r2 && !r3 && !r4 && !r5 && !r6,
           "q4t_supported: awq G 128 N 256 K 512, gptq G 128 K 320 (K %% G "
           "!= 0), gptq G 64 N 96, G = K yes (%d %d %d %d); G 32, N 72, K "
           "96, format 7, G 0, G 96 no (%d %d %d %d %d %d)", a, b, c, d, r1,
           r2, r3, r4, r5, r6);
}


/* ----------------------------------------------------------- refusals */

static void
test_refusals(void)
{
    qt_t      q;
    const int N = 128, K = 256, G = 64, n = 4, ldx = K + 8, ldy = N + 5;
    size_t    ny = (size_t) (n + 2) * ldy, nh = (size_t) (n + 1) * N;
    float    *hx = (float *) malloc((size_t) n * ldx * 4);
    uint16_t *hxb = (uint16_t *) malloc((size_t) n * ldx * 2);
    uint16_t *dx, *dh, *hh = (uint16_t *) malloc(nh * 2);
    float    *dy, *hy = (float *) malloc(ny * 4);
    uint16_t *dd;
    int       rc, ok, kept = 1;

#define RF(X_, ldx_, qt_, G_, N_, K_, n_, sk_, H_)                           \
    moe_cuda_qgemv_q4t(MOE_K_Q4_AWQ, (const moe_bf16_t *) (X_), (ldx_), NULL,\
                       1, (qt_), q.dqz, q.dsc, (G_), 0, (N_), (K_), NULL, 1,  \
                       (n_), 0, (sk_), dy, ldy, (moe_bf16_t *) (H_), 0)

    qt_make(&q, MOE_K_Q4_AWQ, G, 0, N, K, 1);
    gu_fill_bf(hx, hxb, (size_t) n * ldx, 1.0f);
    dx = (uint16_t *) gu_up(hxb, (size_t) n * ldx * 2);
    dy = (float *) gu_dev(ny * 4);
    dh = (uint16_t *) gu_dev(nh * 2);
    ck(cudaMemset(dy, 0xff, ny * 4), "memset Y");
    ck(cudaMemset(dh, 0xff, nh * 2), "memset H");

    rc = RF(dx, ldx, q.dqt, G, 72, K, n, 0, NULL);
    TAP_OK(rc == MOE_K_EUNSUPPORTED, "qgemv_q4t refuses N 72 (N %% 16 != "
           "0): %s", moe_cuda_last_error());
    rc = RF(dx, ldx, q.dqt, G, N, 96, n, 0, NULL);
    TAP_OK(rc == MOE_K_EUNSUPPORTED, "qgemv_q4t refuses K 96 (K %% 64 != "
           "0): %s", moe_cuda_last_error());
    rc = RF(dx, ldx, q.dqt, 32, N, K, n, 0, NULL);
    TAP_OK(rc == MOE_K_EUNSUPPORTED, "qgemv_q4t refuses G 32 (G %% 64 != "
           "0): %s", moe_cuda_last_error());
    rc = RF(dx + 1, ldx, q.dqt, G, N, K, n, 0, NULL);
    TAP_OK(rc == MOE_K_EUNSUPPORTED, "qgemv_q4t refuses X one element off "
           "16-byte alignment: %s", moe_cuda_last_error());
    rc = RF(dx, K + 4, q.dqt, G, N, K, n, 0, NULL);
    TAP_OK(rc == MOE_K_EUNSUPPORTED, "qgemv_q4t refuses ldx %d (ldx %% 8 "
           "!= 0): %s", K + 4, moe_cuda_last_error());
    rc = RF(dx, ldx, q.dqt, G, 48, K, n, 0, dh);
    TAP_OK(rc == MOE_K_EUNSUPPORTED, "qgemv_q4t refuses H with N 48 (N %% "
           "32 != 0): %s", moe_cuda_last_error());
    rc = RF(dx, ldx, q.dqt, G, N, K, n, 3, NULL);
    TAP_OK(rc == MOE_K_EUNSUPPORTED, "qgemv_q4t refuses k split 3: %s",
           moe_cuda_last_error());
    rc = RF(dx, ldx, q.dqt, G, N, K, n, 8, dh);
    TAP_OK(rc == MOE_K_EUNSUPPORTED, "qgemv_q4t refuses k split 8 with H: "
           "%s", moe_cuda_last_error());
    rc = RF(dx, ldx, q.dqt, G, N, K, n, 16, NULL);
    TAP_OK(rc == MOE_K_EUNSUPPORTED, "qgemv_q4t refuses k split 16: %s",
           moe_cuda_last_error());
    rc = RF(dx, ldx, q.dqt + 1, G, N, K, n, 0, NULL);
    TAP_OK(rc == MOE_K_EUNSUPPORTED, "qgemv_q4t refuses tiles 4 bytes off "
           "16-byte alignment: %s", moe_cuda_last_error());
    rc = RF(dx, ldx, q.dqt, G, N, K, 0, 0, NULL);
    TAP_OK(rc == MOE_K_OK, "qgemv_q4t with n 0: MOE_K_OK (%d)", rc);

    ok = gu_sync_ok(0, "qgemv_q4t refusals");
    gu_down(hy, dy, ny * 4);
    gu_down(hh, dh, nh * 2);
    for (size_t i = 0; i < ny; i++) {
        uint32_t u;

        memcpy(&u, &hy[i], 4);
        kept &= u == 0xffffffffu;
    }
    for (size_t i = 0; i < nh; i++) {
        kept &= hh[i] == 0xffff;
    }
    TAP_OK(ok && kept, "qgemv_q4t: the refused calls and n 0 wrote nothing "
           "to Y or H, the device fine");
#undef RF

    dd = (uint16_t *) gu_dev((size_t) N * K * 2);
    {
        int r1 = moe_cuda_dequant_q4t(MOE_K_Q4_AWQ, q.dqt, q.dqz, q.dsc, 32,
                                      0, N, K, 1, (moe_bf16_t *) dd, 0);
        int r2 = moe_cuda_dequant_q4t(MOE_K_Q4_GPTQ, q.dqt, q.dqz, q.dsc, G,
                                      0, N, 96, 1, (moe_bf16_t *) dd, 0);

        TAP_OK(r1 == MOE_K_EUNSUPPORTED && r2 == MOE_K_EUNSUPPORTED
               && gu_sync_ok(0, "dequant_q4t refusals"),
               "dequant_q4t refuses G 32 (%d) and K 96 (%d)", r1, r2);
    }
    cudaFree(dd);
    cudaFree(dx);
    cudaFree(dy);
    cudaFree(dh);
    qt_free(&q);
    free(hx);
    free(hxb);
    free(hh);
    free(hy);
}


/* -------------------------------------------------------------- graph */

/*
 * One moe_cuda_qgemv_q4t launch (8 experts, rows r1) captured into a
 * graph; replayed after the device offsets moved to r2 (same total), then
 * back to r1: each replay against the host of the offsets it saw.
 */
static void
test_graph(const qt_t *q, const char *name, const int *r1, const int *r2)
{
    step_t          s;
    cudaStream_t    st;
    cudaGraph_t     gr = NULL;
    cudaGraphExec_t ge = NULL;
    const int       ldy = q->N + 5;
    size_t          ny;
    float          *dy, *hy;
    tally_t         t;
    int             rc, ok = 1;
    char            lab[96];

    step_make(&s, q, 0, 1, 0, r1);
    ny = (size_t) (s.n + 2) * ldy;
    dy = (float *) gu_dev(ny * 4);
    hy = (float *) malloc(ny * 4);
    memset(&t, 0, sizeof(t));
    qt_label(q, lab, sizeof(lab));
    ck(cudaStreamCreateWithFlags(&st, cudaStreamNonBlocking), "stream");
    ck(cudaStreamBeginCapture(st, cudaStreamCaptureModeThreadLocal),
       "begin capture");
    rc = q4t_run(q, &s, 0, 0, dy, ldy, NULL, st);
    ck(cudaStreamEndCapture(st, &gr), "end capture");
    ck(cudaGraphInstantiate(&ge, gr, 0), "instantiate");
    ok &= gu_sync_ok(rc, "graph capture");
    for (int rep = 0; rep < 2; rep++) {
        step_set_rows(&s, q, rep == 0 ? r2 : r1);
        ck(cudaMemset(dy, 0xff, ny * 4), "memset Y");
        /* the uploads and the memset ran on the legacy stream, which a
         * non-blocking stream does not wait for */
        ck(cudaDeviceSynchronize(), "sync before replay");
        ck(cudaGraphLaunch(ge, st), "replay");
        ck(cudaStreamSynchronize(st), "sync");
        ok &= gu_sync_ok(0, "graph replay");
        gu_down(hy, dy, ny * 4);
        y_check(&s, hy, NULL, ldy, rep == 0 ? "replay, new offsets"
                                            : "replay, offsets back", &t);
    }
    if (t.first[0] != '\0') {
        TAP_DIAG("graph %s %s: %s", lab, name, t.first);
    }
    TAP_OK(ok && t.bad_ref == 0 && t.written == 0, "qgemv_q4t %s, %s, "
           "captured in a graph: replays follow the offsets on the device "
           "(%ld bad, %ld written outside)", lab, name, t.bad_ref,
           t.written);
    cudaGraphExecDestroy(ge);
    cudaGraphDestroy(gr);
    cudaStreamDestroy(st);
    cudaFree(dy);
    free(hy);
    step_free(&s);
}


/* -------------------------------------------------------------- main */

typedef struct {
    int fmt, G, zb, N, K;
} shape_t;

static const shape_t shapes[] = {
    { MOE_K_Q4_AWQ, 128, 1, 256, 512 },    /* AWQ ignores the zero bias */
    { MOE_K_Q4_GPTQ, 128, 1, 256, 512 },
    { MOE_K_Q4_AWQ, 64, 0, 96, 1024 },     /* N % 32 != 0 column tiles */
    { MOE_K_Q4_GPTQ, 64, 0, 96, 1024 },
    { MOE_K_Q4_AWQ, 128, 0, 128, 320 },    /* last group of 64 */
    { MOE_K_Q4_GPTQ, 128, 1, 128, 320 },
    { MOE_K_Q4_GPTQ, 512, 0, 64, 512 },    /* one group */
};
#define NSHAPE ((int) (sizeof(shapes) / sizeof(shapes[0])))

typedef struct {
    const char *name;
    int         dense, gather, n, rows[NEXP];
} rcfg_t;

static const rcfg_t rcfgs[] = {
    { "dense 1 row", 1, 0, 1, { 0 } },
    { "dense 3 rows gathered", 1, 1, 3, { 0 } },
    { "dense 8 rows", 1, 0, 8, { 0 } },
    { "dense 9 rows", 1, 0, 9, { 0 } },
    { "dense 17 rows gathered", 1, 1, 17, { 0 } },
    { "dense 33 rows", 1, 0, 33, { 0 } },
    { "8 experts, rows 3,0,1,0,9,2,0,17, gathered", 0, 1, 0,
      { 3, 0, 1, 0, 9, 2, 0, 17 } },
    { "compact grid, rows 0,1,0,0,0,0,1,0, gathered", 0, 1, 0,
      { 0, 1, 0, 0, 0, 0, 1, 0 } },
};
#define NRCFG ((int) (sizeof(rcfgs) / sizeof(rcfgs[0])))


int
main(void)
{
    static const int g_r1[NEXP] = { 3, 0, 5, 1, 0, 7, 2, 6 };
    static const int g_r2[NEXP] = { 0, 6, 2, 0, 9, 1, 6, 0 };
    static const int c_r1[NEXP] = { 0, 1, 0, 0, 0, 0, 1, 0 };
    static const int c_r2[NEXP] = { 0, 0, 0, 2, 0, 0, 0, 0 };
    uint64_t         seed;
    int              ndev = 0;

    if (cudaGetDeviceCount(&ndev) != cudaSuccess || ndev < 1) {
        printf("1..0 # SKIP no CUDA device\n");
        return 0;
    }
    /* supported 1, pack 2 + refusals 5, per shape: pack, dequant, Y and
     * H per step; qgemv refusals 13, graphs 2 */
    {
        int nawq = 0;

        for (int si = 0; si < NSHAPE; si++) {
            nawq += shapes[si].fmt == MOE_K_Q4_AWQ;
        }
        /* ... and per AWQ shape the repack into GPTQ's layout (2) */
        TAP_PLAN(1 + 2 + 5 + NSHAPE * (2 + 2 * NRCFG) + 2 * nawq + 13 + 2);
    }
    seed = gu_seed_env();
    TAP_DIAG("seed %llu (MOE_TEST_SEED repeats it)",
             (unsigned long long) seed);

    test_supported();
    test_pack(MOE_K_Q4_AWQ);
    test_pack(MOE_K_Q4_GPTQ);
    test_pack_refusals();

    for (int si = 0; si < NSHAPE; si++) {
        const shape_t *sh = &shapes[si];
        qt_t           q;
        char           lab[96];

        qt_make(&q, sh->fmt, sh->G, sh->zb, sh->N, sh->K, NEXP);
        qt_label(&q, lab, sizeof(lab));
        if (q.pack_bad > 0) {
            TAP_DIAG("q4t_pack %s: %s", lab, q.pack_first);
        }
        TAP_OK(q.pack_rc == MOE_K_OK && q.pack_bad == 0, "q4t_pack %s, %d "
               "experts: every nibble where the tiled layout puts it (%ld "
               "differ)", lab, NEXP, q.pack_bad);
        test_dequant(&q);
        if (sh->fmt == MOE_K_Q4_AWQ) {
            test_awq_gptq(&q);
        }
        for (int ri = 0; ri < NRCFG; ri++) {
            const rcfg_t *rc = &rcfgs[ri];
            step_t        s;

            step_make(&s, &q, rc->dense, rc->gather, rc->n, rc->rows);
            test_y(&q, &s, rc->name);
            test_h(&q, &s, rc->name);
            step_free(&s);
        }
        if (si == 1) {
            test_graph(&q, "8 experts, 24 rows", g_r1, g_r2);
            test_graph(&q, "compact grid, 2 rows", c_r1, c_r2);
        }
        qt_free(&q);
    }
    test_refusals();
    {
        cudaError_t e = cudaDeviceSynchronize();

        if (e != cudaSuccess) {
            TAP_DIAG("device error: %s", cudaGetErrorString(e));
            return 1;
        }
    }
    return TAP_DONE();
}
