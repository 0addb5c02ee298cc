/*
 * Checks the 4-bit GEMV by quantization group (kernels/q4_group.cu;
 * quant_gemv.h, moe_cuda_qgemv_q4g) on fresh random GPTQ tensors (the
 * seed is printed; MOE_TEST_SEED=N repeats a run): qweight (K / 8, N)
 * int32 with k = 8 i + b of column j at bits 4 b of word (i, j), qzeros
 * (K / G, N / 8) with column 8 w + b at bits 4 b of word w, fp16 scales
 * (K / G, N), experts stacked; w = (q - z') s, z' = zero + zero_bias;
 * every zero 0..15, scales 0.002..0.022, bf16 inputs in [-1, 1) (one set
 * with large inputs, below):
 *  - moe_cuda_q4g_supported on accepted shapes (G 128 / 32 / 96, G = K,
 *    with and without SiLU) and refused ones (G 16, 48, 0, -32, K % G,
 *    N % 64 without SiLU, F % 32 with SiLU, N 0, K 0);
 *  - per weight set (G 32 / 64 / 96 / 128 / 256 and G = K; zero bias 0
 *    and 1; N 64 / 128 / 192 / 256 / 4096; K 256 .. 4096, G 32 with K
 *    1024 and 2048 so that K is split over clusters of 2 .. 8 blocks, G
 *    96 for 3 chunks a group; 8 experts, the N 4096 set 1 expert and
 *    dense steps only; the sets with G % 64 == 0 and N % 128 == 0 also
 *    reach the warpgroup kernel of kernels/q4_wgmma.cu through shapes
 *    10..13 (14, two warpgroups a block: G % 128 and N % 256 / F % 128
 *    only), G 64 / N 256 / K 1024 and G 128 / N 128 / K 4096 with its K
 *    split over clusters of 2 and 4, the others fall back to the
 *    shape-0 pick):
 *      the bound's sensitivity, host only (dense 8 rows): the host sums
 *      with every zero off by one, or of the neighbour column j ^ 1,
 *      fall outside the bound for at least 60 % / 90 % of the outputs (a
 *      wrong zero moves an output by s sum_group x, near 0 for some
 *      groups of zero-mean inputs: 78-100 % measured, so 80 % failed 1
 *      run in 13 at G 256 N 64);
 *      moe_cuda_qgemv_q4g into Y (H NULL) for dense steps (offs NULL,
 *      E 1) of 1, 2, 3, 7, 8, 9, 17 and 40 rows (2, 7, 17 and 40
 *      gathered through xrow / 2), 8 experts of one row each, 8 experts
 *      with uneven rows and empty groups (3,0,1,0,9,2,0,17 and
 *      33,0,18,1,0,70,5,16: passes of 16 and 32 rows with a partial
 *      last pass, gathered) and a compact grid (2 rows over 8 experts,
 *      gathered), each with every block shape 0 .. 13, each run twice:
 *      every output within the bound below of the double host sum of
 *      x (q - z') s, within twice the bound of moe_cuda_qgemv_q4_rows
 *      (MOE_K_Q4_GPTQ) on the same tensors, Y's columns past N (ldy = N
 *      + 5) and its 2 rows past n keep their NaN sentinel, the two runs
 *      bit-equal;
 *      the same steps with H (SiLU fused, N = 2 F): bf16 H within the
 *      host's silu(g) u (the sums' bounds carried through silu, slope <=
 *      1.1, and the product, plus 2^-7 |h| for the bf16 rounding), within
 *      a bf16 step (plus twice the carried bounds) of
 *      moe_cuda_qgemv_q4_silu on the same tensors, H's row n untouched,
 *      the two runs bit-equal;
 *  - large inputs (G 128, zero bias 1, N 128, K 512, 8 experts): bf16
 *    inputs in [-180, 300) (mean 60), every q within 2 of its z'
 *    (clamped to 0..15), scales 0.015..0.025: the kernel's sums (128 + q)
 *    x and (128 + z') sigma of a group are ~10^6 s each and cancel to a
 *    result hundreds of times smaller; the same checks (sensitivity, Y
 *    and H);
 *  - refusals (MOE_K_EUNSUPPORTED, nothing written to Y or H, the device
 *    fine): G 16, G 48, K % G, N 96 (N % 64) into Y, N 96 (F 48) into H,
 *    ldx % 8 (into Y and into H), X one element off 16-byte alignment, E
 *    0, offs NULL with E 2, Y and H both NULL, qweight 4 bytes off 16-byte
 *    alignment, scales 2 bytes off 8-byte alignment; n 0 and n -1 are
 *    no-ops (MOE_K_OK);
 *  - CUDA graphs of one launch (8 experts into Y, a compact grid into Y,
 *    8 experts into H; G 128 set) replayed after the device offsets
 *    changed, then changed back: each replay against the host of the
 *    offsets it saw, nothing else written.
 *
 * The bound.  Per quantization group and output the kernel forms c =
 * sum (128 + q) x and sigma = sum x in fp32 (tensor-core mma steps of 16
 * k, G / 16 a group) and adds s (c - (128 + z') sigma).  The rounding
 * errors of c and of (128 + z') sigma are relative to their magnitudes,
 * not to the result: |128 + q| <= |q - z'| + 128 + z', so both together
 * are at most C_g = s sum_{k in g} |x| (|q - z'| + 2 (128 + z')).  A
 * step that aligns its 17 terms by truncation loses under 16 units of
 * 2^-23 of the running sums (2^-19), which grow to C_g / s by the
 * group's end (half of it on average over the G / 16 steps): (G / 16 +
 * 1) 2^-20 C_g a group.  The fp32 sums over groups, warps and cluster
 * ranks take 2e-4 sum |x w| (as in test_q4tiled.cu).  So output (r, j)
 * must be within
 *     2e-4 sum_k |x w| + (G / 16 + 1) 2^-20 sum_k |x| (|q - z'| + 2 (128
 *     + z')) s + 1e-6
 * of the host's double sum (G 128: 2e-4 sum |x w| + 2^-16.8 of the
 * cancelling magnitudes).  The sensitivity check shows that a zero off
 * by one (s sum x a group) or a wrong column falls outside it; the worst
 * error is printed as a fraction of the bound.
 * TAP; skips when there is no CUDA device.
 */

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cuda_fp16.h>

#include "gpu_tap.h"
#include "gpu_util.h"

extern "C" {
#include "tap.h"
}
#include "quant_gemv.h"

#define NEXP    8                   /* experts of a weight set */
#define NSHAPE  15                  /* block shapes 0 .. 14 (10..14: the
                                       warpgroup kernel, q4_wgmma.cu) */
#define XROWS   7                   /* input rows of a gathered step */
#define SENS_RC 4                   /* the step of the sensitivity check */


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


static uint32_t
rand_word(void)
{
    return gu_rand() ^ (gu_rand() << 16);
}


/* ------------------------------------------------------- weight sets */

typedef struct {
    int       G, zb, N, K, ne, KG, big;
    int32_t  *qw, *qz;              /* host, GPTQ layout */
    uint16_t *sc;
    float    *w;                    /* (ne, N, K): (q - z') s */
    float    *cw;                   /* (ne, N, K): (|q - z'| + 2 (128 +
                                       z')) s, the cancelling magnitudes */
    int32_t  *dqw, *dqz;            /* device */
    uint16_t *dsc;
} qs_t;


/* nibble of column j, input k of expert e: word (k / 8, j) of the
 * expert's (K / 8, N), bits 4 (k % 8) */
static int
q_nib(const qs_t *q, int e, int j, int k)
{
    uint32_t w = (uint32_t) q->qw[((size_t) e * (q->K / 8) + k / 8) * q->N
                                  + j];

    return (int) ((w >> (4 * (k & 7))) & 15u);
}


/* stored zero of column j, group g of expert e: word (g, j / 8) of the
 * expert's (KG, N / 8), bits 4 (j % 8) */
static int
q_zero(const qs_t *q, int e, int g, int j)
{
    uint32_t w = (uint32_t) q->qz[((size_t) e * q->KG + g) * (q->N / 8)
                                  + j / 8];

    return (int) ((w >> (4 * (j & 7))) & 15u);
}


static float
q_scale(const qs_t *q, int e, int g, int j)
{
    return gu_h2f(q->sc[((size_t) e * q->KG + g) * q->N + j]);
}


/* Random tensors of ne experts, uploaded, dequantized on the host.  big:
 * scales 0.015..0.025 and every q within 2 of its z' (clamped). */
static void
qs_make(qs_t *q, int G, int zb, int N, int K, int ne, int big)
{
    size_t nw = (size_t) ne * (K / 8) * N, nz, ns;
    size_t nel = (size_t) ne * N * K;

    memset(q, 0, sizeof(*q));
    q->G = G;
    q->zb = zb;
    q->N = N;
    q->K = K;
    q->ne = ne;
    q->KG = K / G;
    q->big = big;
    nz = (size_t) ne * q->KG * (N / 8);
    ns = (size_t) ne * q->KG * N;
    q->qw = (int32_t *) malloc(nw * 4);
    q->qz = (int32_t *) malloc(nz * 4);
    q->sc = (uint16_t *) malloc(ns * 2);
    q->w = (float *) malloc(nel * 4);
    q->cw = (float *) malloc(nel * 4);
    for (size_t i = 0; i < nz; i++) {
        q->qz[i] = (int32_t) rand_word();       /* every zero 0..15 */
    }
    for (size_t i = 0; i < ns; i++) {
        float      u = fabsf(gu_uniform());
        __half_raw r = __float2half(big ? 0.015f + 0.01f * u
                                        : 0.002f + 0.02f * u);

        q->sc[i] = r.x;
    }
    for (int e = 0; e < ne; e++) {
        for (int i = 0; i < K / 8; i++) {
            for (int j = 0; j < N; j++) {
                uint32_t word = 0;

                for (int b = 0; b < 8; b++) {
                    int v = (int) (gu_rand() & 15u);

                    if (big) {
                        v = q_zero(q, e, (8 * i + b) / G, j) + zb
                            + (int) (gu_rand() % 5u) - 2;
                        v = v < 0 ? 0 : v > 15 ? 15 : v;
                    }
                    word |= (uint32_t) v << (4 * b);
                }
                q->qw[((size_t) e * (K / 8) + i) * N + j] = (int32_t) word;
            }
        }
    }
    for (int e = 0; e < ne; e++) {
        for (int j = 0; j < N; j++) {
            for (int k = 0; k < K; k++) {
                int    z = q_zero(q, e, k / G, j) + zb;
                int    d = q_nib(q, e, j, k) - z;
                float  s = q_scale(q, e, k / G, j);
                size_t o = ((size_t) e * N + j) * K + k;

                q->w[o] = (float) d * s;
                q->cw[o] = ((float) abs(d) + 2.0f * (float) (128 + z)) * s;
            }
        }
    }
    q->dqw = (int32_t *) gu_up(q->qw, nw * 4);
    q->dqz = (int32_t *) gu_up(q->qz, nz * 4);
    q->dsc = (uint16_t *) gu_up(q->sc, ns * 2);
}


static void
qs_free(qs_t *q)
{
    cudaFree(q->dqw);
    cudaFree(q->dqz);
    cudaFree(q->dsc);
    free(q->qw);
    free(q->qz);
    free(q->sc);
    free(q->w);
    free(q->cw);
}


static void
qs_label(const qs_t *q, char *buf, size_t bl)
{
    snprintf(buf, bl, "G %d zb %d N %d K %d%s", q->G, q->zb, q->N, q->K,
             q->big ? " large inputs" : "");
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
    double   *ref, *tol, *dz;       /* (n, N): sum x w, its bound, sum x s */
    uint16_t *dx;
    int32_t  *doffs, *dxrow;
} step_t;


/* ref, tol and dz (the change of a zero off by one) of the current
 * offsets */
static void
step_ref(step_t *s, const qs_t *q)
{
    const double cf = ldexp((double) (q->G / 16 + 1), -20);
    double      *xg = (double *) malloc((size_t) q->KG * sizeof(double));

    memset(s->ref, 0, (size_t) s->n * s->N * sizeof(double));
    memset(s->tol, 0, (size_t) s->n * s->N * sizeof(double));
    memset(s->dz, 0, (size_t) s->n * s->N * sizeof(double));
    for (int e = 0; e < s->E; e++) {
        int r0 = s->dense ? 0 : s->offs[e];
        int r1 = s->dense ? s->n : s->offs[e + 1];

        for (int r = r0; r < r1; r++) {
            const float *xv = s->x + (size_t) (s->gather ? s->xrow[r] / 2
                                                         : r) * s->ldx;

            for (int g = 0; g < q->KG; g++) {
                double a = 0;

                for (int k = g * q->G; k < (g + 1) * q->G; k++) {
                    a += xv[k];
                }
                xg[g] = a;
            }
            for (int j = 0; j < s->N; j++) {
                size_t       o = ((size_t) e * s->N + j) * s->K;
                size_t       idx = (size_t) r * s->N + j;
                const float *w = q->w + o, *cw = q->cw + o;
                double       acc = 0, mag = 0, c = 0, dz = 0;

                for (int k = 0; k < s->K; k++) {
                    double p = (double) xv[k] * w[k];

                    acc += p;
                    mag += fabs(p);
                    c += fabs((double) xv[k]) * cw[k];
                }
                for (int g = 0; g < q->KG; g++) {
                    dz += xg[g] * q_scale(q, e, g, j);
                }
                s->ref[idx] = acc;
                s->tol[idx] = 2e-4 * mag + cf * c + 1e-6;
                s->dz[idx] = dz;
            }
        }
    }
    free(xg);
}


/* rows: NEXP group sizes (dense: NULL, n rows) */
static void
step_make(step_t *s, const qs_t *q, int dense, int gather, int n,
    const int *rows)
{
    size_t nxe;

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
    nxe = (size_t) s->nx * s->ldx;
    s->x = (float *) malloc(nxe * 4);
    s->xb = (uint16_t *) malloc(nxe * 2);
    for (size_t i = 0; i < nxe; i++) {
        float v = gu_uniform();

        s->xb[i] = gu_f2bf(q->big ? 240.0f * v + 60.0f : v);
        s->x[i] = gu_bf2f(s->xb[i]);
    }
    s->ref = (double *) malloc((size_t) s->n * s->N * sizeof(double));
    s->tol = (double *) malloc((size_t) s->n * s->N * sizeof(double));
    s->dz = (double *) malloc((size_t) s->n * s->N * sizeof(double));
    step_ref(s, q);
    s->dx = (uint16_t *) gu_up(s->xb, nxe * 2);
    s->doffs = (int32_t *) gu_up(s->offs, sizeof(s->offs));
    s->dxrow = (int32_t *) gu_up(s->xrow, (size_t) s->n * 4 + 4);
}


/* new group sizes (same total), on the host and the device */
static void
step_set_rows(step_t *s, const qs_t *q, const int *rows)
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
    free(s->tol);
    free(s->dz);
}


static int
q4g_run(const qs_t *q, const step_t *s, int shape, float *Y, int ldy,
    uint16_t *H, cudaStream_t stream)
{
    return moe_cuda_qgemv_q4g((const moe_bf16_t *) s->dx, s->ldx,
                              s->gather ? s->dxrow : NULL, 2, q->dqw,
                              q->dqz, q->dsc, q->G, q->zb, q->N, q->K,
                              s->dense ? NULL : s->doffs, s->E, s->n, shape,
                              Y, ldy, (moe_bf16_t *) H, stream);
}


/* ------------------------------------------------ the bound's reach */

/*
 * Host only: the fraction of the step's outputs for which a zero off by
 * one in every group (the sum moves by sum_k x s) and the neighbour
 * column j ^ 1's sum fall outside the bound.
 */
static void
test_bound(const qs_t *q, const step_t *s)
{
    long   tot = (long) s->n * s->N, zc = 0, cc = 0;
    double zmin = INFINITY, cmin = INFINITY;
    char   lab[96];

    qs_label(q, lab, sizeof(lab));
    for (int r = 0; r < s->n; r++) {
        for (int j = 0; j < s->N; j++) {
            size_t i = (size_t) r * s->N + j;
            double tol = s->tol[i];
            double dz = fabs(s->dz[i]);
            double dc = fabs(s->ref[i ^ 1] - s->ref[i]);

            zc += dz > tol;
            cc += dc > tol;
            zmin = fmin(zmin, dz / tol);
            cmin = fmin(cmin, dc / tol);
        }
    }
    TAP_DIAG("%s: smallest |wrong - host| / bound: zero + 1 %.3g, column j "
             "^ 1 %.3g", lab, zmin, cmin);
    TAP_OK(tot > 0 && zc >= 0.6 * (double) tot && cc >= 0.9 * (double) tot,
           "bound of %s (host, %d rows): a zero off by one falls outside it "
           "for %ld of %ld outputs (>= 60 %%), the column j ^ 1 for %ld (>= "
           "90 %%)", lab, s->n, zc, tot, cc);
}


/* ------------------------------------------------------ checks of Y */

typedef struct {
    long   bad_ref, bad_orig, written;
    double worst;                       /* err / bound */
    char   first[240];
} tally_t;


/*
 * Y (n + 2 rows of ldy) against the host (the step's bound) and, if Yo,
 * against the reference kernel's Y (twice the bound); everything outside
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
            double tol = s->tol[(size_t) r * s->N + j];
            double err = fabs((double) v - ref);

            if (!(err <= tol)) {
                if (t->first[0] == '\0') {
                    snprintf(t->first, sizeof(t->first), "%s: row %d col "
                             "%d: %.7g, host %.7g (bound %.3g)", tag, r, j,
                             v, ref, tol);
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
                                 "col %d: %.7g, qgemv_q4_rows %.7g", tag, r,
                                 j, v, o);
                    }
                    t->bad_orig++;
                }
            }
        }
    }
}


/*
 * moe_cuda_qgemv_q4g into Y for one step, every block shape, each run
 * twice; against the host, moe_cuda_qgemv_q4_rows and the sentinel;
 * bit-equal runs.
 */
static void
test_y(const qs_t *q, const step_t *s, const char *sname)
{
    const int ldy = q->N + 5;
    size_t    ny = (size_t) (s->n + 2) * ldy;
    float    *dy = (float *) gu_dev(ny * 4);
    float    *hy = (float *) malloc(ny * 4), *hy2 = (float *) malloc(ny * 4);
    float    *ho = (float *) malloc(ny * 4);
    tally_t   t, to;
    char      lab[96], tag[64];
    int       rc, ok_o, rc_bad = 0, diff_run = 0;

    memset(&t, 0, sizeof(t));
    memset(&to, 0, sizeof(to));
    qs_label(q, lab, sizeof(lab));

    /* the reference kernel, for the cross-check */
    ck(cudaMemset(dy, 0xff, ny * 4), "memset Y");
    rc = moe_cuda_qgemv_q4_rows(MOE_K_Q4_GPTQ, (const moe_bf16_t *) s->dx,
                                s->ldx, s->gather ? s->dxrow : NULL, 2,
                                q->dqw, q->dqz, q->dsc, NULL, q->G, q->zb,
                                q->N, q->K, s->dense ? NULL : s->doffs, s->E,
                                s->n, 0, dy, ldy, 0);
    ok_o = gu_sync_ok(rc, "qgemv_q4_rows");
    gu_down(ho, dy, ny * 4);
    y_check(s, ho, NULL, ldy, "qgemv_q4_rows", &to);
    if (to.bad_ref > 0) {
        /* the bound of the cross-check assumes it */
        TAP_DIAG("%s %s: qgemv_q4_rows is off the host (%ld bad): %s", lab,
                 sname, to.bad_ref, to.first);
    }

    for (int sh = 0; sh < NSHAPE; sh++) {
        for (int pass = 0; pass < 2; pass++) {
            ck(cudaMemset(dy, 0xff, ny * 4), "memset Y");
            rc = q4g_run(q, s, sh, dy, ldy, NULL, 0);
            snprintf(tag, sizeof(tag), "shape %d", sh);
            if (!gu_sync_ok(rc, tag)) {
                rc_bad++;
            }
            gu_down(pass == 0 ? hy : hy2, dy, ny * 4);
        }
        if (memcmp(hy, hy2, ny * 4) != 0) {
            if (diff_run++ == 0) {
                TAP_DIAG("%s %s: shape %d: two runs differ", lab, sname, sh);
            }
        }
        y_check(s, hy, ok_o ? ho : NULL, ldy, tag, &t);
    }
    if (t.first[0] != '\0') {
        TAP_DIAG("%s %s: first problem: %s", lab, sname, t.first);
    }
    TAP_DIAG("%s %s: worst error %.3g of the bound", lab, sname, t.worst);
    TAP_OK(rc_bad == 0 && ok_o && t.bad_ref == 0 && t.bad_orig == 0
           && t.written == 0 && diff_run == 0,
           "qgemv_q4g %s, %s (%d rows): shapes 0..14 within the bound of "
           "the host (%ld bad) and twice it of qgemv_q4_rows (%ld bad), "
           "nothing else written (%ld), runs bit-equal (%d differ), %d "
           "launches failed", lab, sname, s->n, t.bad_ref, t.bad_orig,
           t.written, diff_run, rc_bad);
    cudaFree(dy);
    free(hy);
    free(hy2);
    free(ho);
}


/*
 * H (n + 1 rows of F) against silu(g) u of the host's sums and against
 * Ho (the reference kernel's fused H); row n must hold 0xffff.
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
            size_t i = (size_t) r * s->N + j;
            double g = s->ref[i], u = s->ref[i + F];
            double tg = s->tol[i], tu = s->tol[i + F];
            double sg = g / (1.0 + exp(-g)), want = sg * u;
            /* the sums' bounds carried through silu (slope <= 1.1) and
             * the product */
            double prop = 1.1 * tg * (fabs(u) + tu) + fabs(sg) * tu;
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
                                 "col %d: %.7g, qgemv_q4_silu %.7g", tag, r,
                                 j, v, o);
                    }
                    t->bad_orig++;
                }
            }
        }
    }
}


/* moe_cuda_qgemv_q4g with H (SiLU fused) for one step */
static void
test_h(const qs_t *q, const step_t *s, const char *sname)
{
    const int F = q->N / 2;
    size_t    nh = (size_t) (s->n + 1) * F;
    uint16_t *dh = (uint16_t *) gu_dev(nh * 2);
    float    *dys = (float *) gu_dev((size_t) s->n * q->N * 4);
    uint16_t *hh = (uint16_t *) malloc(nh * 2);
    uint16_t *hh2 = (uint16_t *) malloc(nh * 2);
    uint16_t *ho = (uint16_t *) malloc(nh * 2);
    tally_t   t, to;
    char      lab[96], tag[64];
    int       rc, ok_o, rc_bad = 0, diff_run = 0;

    memset(&t, 0, sizeof(t));
    memset(&to, 0, sizeof(to));
    qs_label(q, lab, sizeof(lab));

    ck(cudaMemset(dh, 0xff, nh * 2), "memset H");
    rc = moe_cuda_qgemv_q4_silu(MOE_K_Q4_GPTQ, (const moe_bf16_t *) s->dx,
                                s->ldx, s->gather ? s->dxrow : NULL, 2,
                                q->dqw, q->dqz, q->dsc, NULL, q->G, q->zb,
                                q->N, q->K, s->dense ? NULL : s->doffs, s->E,
                                s->n, 0, dys, (moe_bf16_t *) dh, 0);
    ok_o = gu_sync_ok(rc, "qgemv_q4_silu");
    gu_down(ho, dh, nh * 2);
    h_check(s, ho, NULL, "qgemv_q4_silu", &to);
    if (to.bad_ref > 0) {
        TAP_DIAG("%s %s: qgemv_q4_silu is off the host (%ld bad): %s", lab,
                 sname, to.bad_ref, to.first);
    }

    for (int sh = 0; sh < NSHAPE; sh++) {
        for (int pass = 0; pass < 2; pass++) {
            ck(cudaMemset(dh, 0xff, nh * 2), "memset H");
            rc = q4g_run(q, s, sh, NULL, 0, dh, 0);
            snprintf(tag, sizeof(tag), "H shape %d", sh);
            if (!gu_sync_ok(rc, tag)) {
                rc_bad++;
            }
            gu_down(pass == 0 ? hh : hh2, dh, nh * 2);
        }
        if (memcmp(hh, hh2, nh * 2) != 0) {
            if (diff_run++ == 0) {
                TAP_DIAG("%s %s: H shape %d: two runs differ", lab, sname,
                         sh);
            }
        }
        h_check(s, hh, ok_o ? ho : NULL, tag, &t);
    }
    if (t.first[0] != '\0') {
        TAP_DIAG("%s %s: first problem: %s", lab, sname, t.first);
    }
    TAP_DIAG("%s %s: H worst error %.3g of the bound", lab, sname, t.worst);
    TAP_OK(rc_bad == 0 && ok_o && t.bad_ref == 0 && t.bad_orig == 0
           && t.written == 0 && diff_run == 0,
           "qgemv_q4g SiLU fused %s, %s (%d rows): shapes 0..14, H within "
           "bounds of the host's silu(g) u (%ld bad) and a bf16 step of "
           "qgemv_q4_silu (%ld bad), row n untouched (%ld), runs bit-equal "
           "(%d differ), %d launches failed", lab, sname, s->n, t.bad_ref,
           t.bad_orig, t.written, diff_run, rc_bad);
    cudaFree(dh);
    cudaFree(dys);
    free(hh);
    free(hh2);
    free(ho);
}


/* ------------------------------------------------------- supported */

static void
test_supported(void)
{
    int a = moe_cuda_q4g_supported(128, 256, 512, 0);
    int b = moe_cuda_q4g_supported(32, 64, 1024, 1);
    int c = moe_cuda_q4g_supported(96, 128, 576, 0);
    int d = moe_cuda_q4g_supported(512, 128, 512, 1);
    int r1 = moe_cuda_q4g_supported(16, 128, 256, 0);
    int r2 = moe_cuda_q4g_supported(48, 128, 480, 0);
    int r3 = moe_cuda_q4g_supported(128, 128, 320, 0);
    int r4 = moe_cuda_q4g_supported(128, 96, 512, 0);
    int r5 = moe_cuda_q4g_supported(128, 96, 512, 1);
    int r6 = moe_cuda_q4g_supported(128, 160, 512, 1);
    int r7 = moe_cuda_q4g_supported(0, 128, 512, 0);
    int r8 = moe_cuda_q4g_supported(-32, 128, 512, 0);
    int r9 = moe_cuda_q4g_supported(128, 0, 512, 0);
    int r10 = moe_cuda_q4g_supported(128, 128, 0, 0);

    TAP_OK(a && b && c && d && !r1 && !r2 && !r3 && !r4 && !r5 && !r6
           && !r7 && !r8 && !r9 && !r10,
           "q4g_supported: G 128 N 256 K 512, G 32 N 64 SiLU, G 96 K 576, "
           "G = K 512 SiLU yes (%d %d %d %d); G 16, G 48, K 320 at G 128, "
           "N 96, N 96 SiLU (F 48), N 160 SiLU (F 80), G 0, G -32, N 0, "
           "K 0 no (%d %d %d %d %d %d %d %d %d %d)", a, b, c, d, r1, r2, r3,
           r4, r5, r6, r7, r8, r9, r10);
}


/* ----------------------------------------------------------- refusals */

static void
test_refusals(void)
{
    qs_t      q;
    const int N = 128, K = 256, G = 64, n = 4, ldx = K + 8, ldy = N + 5;
    size_t    ny = (size_t) (n + 2) * ldy, nh = (size_t) (n + 1) * N;
    size_t    nx = (size_t) n * ldx;
    const int offs[3] = { 0, 2, 4 };
    float    *hx = (float *) malloc(nx * 4);
    uint16_t *hxb = (uint16_t *) malloc(nx * 2);
    uint16_t *dx, *dh, *hh = (uint16_t *) malloc(nh * 2);
    float    *dy, *hy = (float *) malloc(ny * 4);
    int32_t  *doffs;
    int       rc, rc2, ok, kept = 1;

#define RF(X_, ldx_, qw_, sc_, G_, N_, K_, offs_, E_, n_, Y_, H_)            \
    moe_cuda_qgemv_q4g((const moe_bf16_t *) (X_), (ldx_), NULL, 1, (qw_),    \
                       q.dqz, (sc_), (G_), 0, (N_), (K_), (offs_), (E_),     \
                       (n_), 0, (Y_), ldy, (moe_bf16_t *) (H_), 0)

    qs_make(&q, G, 0, N, K, 2, 0);
    gu_fill_bf(hx, hxb, nx, 1.0f);
    dx = (uint16_t *) gu_up(hxb, nx * 2);
    doffs = (int32_t *) gu_up(offs, sizeof(offs));
    dy = (float *) gu_dev(ny * 4);
    dh = (uint16_t *) gu_dev(nh * 2);
    ck(cudaMemset(dy, 0xff, ny * 4), "memset Y");
    ck(cudaMemset(dh, 0xff, nh * 2), "memset H");

    rc = RF(dx, ldx, q.dqw, q.dsc, 16, N, K, NULL, 1, n, dy, NULL);
    TAP_OK(rc == MOE_K_EUNSUPPORTED, "qgemv_q4g refuses G 16 (G %% 32 != "
           "0): %s", moe_cuda_last_error());
    rc = RF(dx, ldx, q.dqw, q.dsc, 48, N, 240, NULL, 1, n, dy, NULL);
    TAP_OK(rc == MOE_K_EUNSUPPORTED, "qgemv_q4g refuses G 48 (K 240): %s",
           moe_cuda_last_error());
    rc = RF(dx, ldx, q.dqw, q.dsc, 128, N, 192, NULL, 1, n, dy, NULL);
    TAP_OK(rc == MOE_K_EUNSUPPORTED, "qgemv_q4g refuses K 192 at G 128 (K "
           "%% G != 0): %s", moe_cuda_last_error());
    rc = RF(dx, ldx, q.dqw, q.dsc, G, 96, K, NULL, 1, n, dy, NULL);
    TAP_OK(rc == MOE_K_EUNSUPPORTED, "qgemv_q4g refuses N 96 into Y (N %% "
           "64 != 0): %s", moe_cuda_last_error());
    rc = RF(dx, ldx, q.dqw, q.dsc, G, 96, K, NULL, 1, n, NULL, dh);
    TAP_OK(rc == MOE_K_EUNSUPPORTED, "qgemv_q4g refuses N 96 into H (F 48, "
           "F %% 32 != 0): %s", moe_cuda_last_error());
    rc = RF(dx, K + 4, q.dqw, q.dsc, G, N, K, NULL, 1, n, dy, NULL);
    rc2 = RF(dx, K + 4, q.dqw, q.dsc, G, N, K, NULL, 1, n, NULL, dh);
    TAP_OK(rc == MOE_K_EUNSUPPORTED && rc2 == MOE_K_EUNSUPPORTED,
           "qgemv_q4g refuses ldx %d (ldx %% 8 != 0) into Y (%d) and into H "
           "(%d): %s", K + 4, rc, rc2, moe_cuda_last_error());
    rc = RF(dx + 1, ldx, q.dqw, q.dsc, G, N, K, NULL, 1, n, dy, NULL);
    TAP_OK(rc == MOE_K_EUNSUPPORTED, "qgemv_q4g refuses X one element off "
           "16-byte alignment: %s", moe_cuda_last_error());
    rc = RF(dx, ldx, q.dqw, q.dsc, G, N, K, doffs, 0, n, dy, NULL);
    TAP_OK(rc == MOE_K_EUNSUPPORTED, "qgemv_q4g refuses E 0: %s",
           moe_cuda_last_error());
    rc = RF(dx, ldx, q.dqw, q.dsc, G, N, K, NULL, 2, n, dy, NULL);
    TAP_OK(rc == MOE_K_EUNSUPPORTED, "qgemv_q4g refuses offs NULL with E "
           "2: %s", moe_cuda_last_error());
    rc = RF(dx, ldx, q.dqw, q.dsc, G, N, K, NULL, 1, n, NULL, NULL);
    TAP_OK(rc == MOE_K_EUNSUPPORTED, "qgemv_q4g refuses Y and H both NULL: "
           "%s", moe_cuda_last_error());
    rc = RF(dx, ldx, q.dqw + 1, q.dsc, G, N, K, NULL, 1, n, dy, NULL);
    TAP_OK(rc == MOE_K_EUNSUPPORTED, "qgemv_q4g refuses qweight 4 bytes off "
           "16-byte alignment: %s", moe_cuda_last_error());
    rc = RF(dx, ldx, q.dqw, q.dsc + 1, G, N, K, NULL, 1, n, dy, NULL);
    TAP_OK(rc == MOE_K_EUNSUPPORTED, "qgemv_q4g refuses scales 2 bytes off "
           "8-byte alignment: %s", moe_cuda_last_error());
    rc = RF(dx, ldx, q.dqw, q.dsc, G, N, K, NULL, 1, 0, dy, NULL);
    rc2 = RF(dx, ldx, q.dqw, q.dsc, G, N, K, doffs, 2, -1, NULL, dh);
    TAP_OK(rc == MOE_K_OK && rc2 == MOE_K_OK, "qgemv_q4g with n 0 (%d) and "
           "n -1 (%d): MOE_K_OK", rc, rc2);

    ok = gu_sync_ok(0, "qgemv_q4g refusals");
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
    TAP_OK(ok && kept, "qgemv_q4g: the refused calls and n 0 / -1 wrote "
           "nothing to Y or H, the device fine");
#undef RF

    cudaFree(dx);
    cudaFree(dy);
    cudaFree(dh);
    cudaFree(doffs);
    qs_free(&q);
    free(hx);
    free(hxb);
    free(hh);
    free(hy);
}


/* -------------------------------------------------------------- graph */

/*
 * One moe_cuda_qgemv_q4g launch (shape 0, 8 experts, rows r1, into Y or
 * with silu into H) captured into a graph; replayed after the device
 * offsets moved to r2 (same total), then back to r1: each replay against
 * the host of the offsets it saw.
 */
static void
test_graph(const qs_t *q, const char *name, const int *r1, const int *r2,
    int silu)
{
    step_t          s;
    cudaStream_t    st;
    cudaGraph_t     gr = NULL;
    cudaGraphExec_t ge = NULL;
    const int       ldy = q->N + 5, F = q->N / 2;
    size_t          bytes;
    void           *dout, *hout;
    tally_t         t;
    int             rc, ok = 1;
    char            lab[96];

    step_make(&s, q, 0, 1, 0, r1);
    bytes = silu ? (size_t) (s.n + 1) * F * 2 : (size_t) (s.n + 2) * ldy * 4;
    dout = gu_dev(bytes);
    hout = malloc(bytes);
    memset(&t, 0, sizeof(t));
    qs_label(q, lab, sizeof(lab));
    ck(cudaStreamCreateWithFlags(&st, cudaStreamNonBlocking), "stream");
    ck(cudaStreamBeginCapture(st, cudaStreamCaptureModeThreadLocal),
       "begin capture");
    rc = q4g_run(q, &s, 0, silu ? NULL : (float *) dout, ldy,
                 silu ? (uint16_t *) dout : NULL, st);
    ck(cudaStreamEndCapture(st, &gr), "end capture");
    ck(cudaGraphInstantiate(&ge, gr, 0), "instantiate");
    ok &= gu_sync_ok(rc, "graph capture");
    for (int rep = 0; rep < 2; rep++) {
        const char *tag = rep == 0 ? "replay, new offsets"
                                   : "replay, offsets back";

        step_set_rows(&s, q, rep == 0 ? r2 : r1);
        ck(cudaMemset(dout, 0xff, bytes), "memset out");
        /* the uploads and the memset ran on the legacy stream, which a
         * non-blocking stream does not wait for */
        ck(cudaDeviceSynchronize(), "sync before replay");
        ck(cudaGraphLaunch(ge, st), "replay");
        ck(cudaStreamSynchronize(st), "sync");
        ok &= gu_sync_ok(0, "graph replay");
        gu_down(hout, dout, bytes);
        if (silu) {
            h_check(&s, (const uint16_t *) hout, NULL, tag, &t);
        } else {
            y_check(&s, (const float *) hout, NULL, ldy, tag, &t);
        }
    }
    if (t.first[0] != '\0') {
        TAP_DIAG("graph %s %s: %s", lab, name, t.first);
    }
    TAP_OK(ok && t.bad_ref == 0 && t.written == 0, "qgemv_q4g %s, %s%s, "
           "captured in a graph: replays follow the offsets on the device "
           "(%ld bad, %ld written outside)", lab, name,
           silu ? ", SiLU fused" : "", t.bad_ref, t.written);
    cudaGraphExecDestroy(ge);
    cudaGraphDestroy(gr);
    cudaStreamDestroy(st);
    cudaFree(dout);
    free(hout);
    step_free(&s);
}


/* -------------------------------------------------------------- main */

typedef struct {
    int G, zb, N, K, ne, big;
} set_t;

static const set_t sets[] = {
    { 128, 1, 256, 512, NEXP, 0 },     /* U 4, a chunk a group; graphs */
    { 32, 0, 128, 1024, NEXP, 0 },     /* U 1, clusters of 2 / 4 */
    { 32, 1, 64, 2048, NEXP, 0 },      /* clusters of 4 / 8, one tile */
    { 64, 1, 192, 1024, NEXP, 0 },     /* U 2, 3 tiles (F 96) */
    { 96, 0, 128, 576, NEXP, 0 },      /* U 1, 3 chunks a group */
    { 256, 0, 64, 512, NEXP, 0 },      /* 2 chunks a group at U 4 */
    { 256, 1, 128, 256, NEXP, 0 },     /* G = K: one group */
    { 128, 0, 4096, 256, 1, 0 },       /* 64 tiles, dense steps only */
    { 128, 1, 128, 512, NEXP, 1 },     /* large inputs */
    { 64, 0, 256, 1024, NEXP, 0 },     /* wgmma: 64 k chunks, clusters of 2 */
    { 128, 0, 128, 4096, NEXP, 0 },    /* wgmma: clusters of 4 */
};
#define NSET ((int) (sizeof(sets) / sizeof(sets[0])))

typedef struct {
    const char *name;
    int         dense, gather, n, rows[NEXP];
} rcfg_t;

static const rcfg_t rcfgs[] = {
    { "dense 1 row", 1, 0, 1, { 0 } },
    { "dense 2 rows gathered", 1, 1, 2, { 0 } },
    { "dense 3 rows", 1, 0, 3, { 0 } },
    { "dense 7 rows gathered", 1, 1, 7, { 0 } },
    { "dense 8 rows", 1, 0, 8, { 0 } },             /* SENS_RC */
    { "dense 9 rows", 1, 0, 9, { 0 } },
    { "dense 17 rows gathered", 1, 1, 17, { 0 } },
    { "dense 40 rows gathered", 1, 1, 40, { 0 } },
    { "8 experts, 1 row each", 0, 0, 0, { 1, 1, 1, 1, 1, 1, 1, 1 } },
    { "8 experts, rows 3,0,1,0,9,2,0,17, gathered", 0, 1, 0,
      { 3, 0, 1, 0, 9, 2, 0, 17 } },
    { "compact grid, rows 0,1,0,0,0,0,1,0, gathered", 0, 1, 0,
      { 0, 1, 0, 0, 0, 0, 1, 0 } },
    { "8 experts, rows 33,0,18,1,0,70,5,16, gathered", 0, 1, 0,
      { 33, 0, 18, 1, 0, 70, 5, 16 } },
};
#define NRCFG  ((int) (sizeof(rcfgs) / sizeof(rcfgs[0])))
#define NDENSE 8                    /* the dense steps come first */


int
main(void)
{
    static const int g_r1[NEXP] = { 3, 0, 5, 1, 0, 7, 2, 6 };
    static const int g_r2[NEXP] = { 0, 6, 2, 0, 9, 1, 6, 0 };
    static const int c_r1[NEXP] = { 0, 1, 0, 0, 0, 0, 1, 0 };
    static const int c_r2[NEXP] = { 0, 0, 0, 2, 0, 0, 0, 0 };
    uint64_t         seed;
    int              ndev = 0, plan = 1 + 14 + 3;

    if (cudaGetDeviceCount(&ndev) != cudaSuccess || ndev < 1) {
        printf("1..0 # SKIP no CUDA device\n");
        return 0;
    }
    /* supported 1, refusals 14, graphs 3; per set the bound's reach and
     * Y and H per step */
    for (int si = 0; si < NSET; si++) {
        plan += 1 + 2 * (sets[si].ne == NEXP ? NRCFG : NDENSE);
    }
    TAP_PLAN(plan);
    seed = gu_seed_env();
    TAP_DIAG("seed %llu (MOE_TEST_SEED repeats it)",
             (unsigned long long) seed);

    test_supported();

    for (int si = 0; si < NSET; si++) {
        const set_t *se = &sets[si];
        qs_t         q;

        qs_make(&q, se->G, se->zb, se->N, se->K, se->ne, se->big);
        for (int ri = 0; ri < (se->ne == NEXP ? NRCFG : NDENSE); ri++) {
            const rcfg_t *rc = &rcfgs[ri];
            step_t        s;

            step_make(&s, &q, rc->dense, rc->gather, rc->n, rc->rows);
            if (ri == SENS_RC) {
                test_bound(&q, &s);
            }
            test_y(&q, &s, rc->name);
            test_h(&q, &s, rc->name);
            step_free(&s);
        }
        if (si == 0) {
            test_graph(&q, "8 experts, 24 rows", g_r1, g_r2, 0);
            test_graph(&q, "compact grid, 2 rows", c_r1, c_r2, 0);
            test_graph(&q, "8 experts, 24 rows", g_r1, g_r2, 1);
        }
        qs_free(&q);
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
