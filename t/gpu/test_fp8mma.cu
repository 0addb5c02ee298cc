/*
 * Checks the e4m3-weight tensor-core kernels (moe_cuda_gemv_fp8 on bf16
 * and on f16 fragments, moe_cuda_gemv_fp8h, and moe_cuda_ggemm_fp8 on
 * bf16 and on f16 fragments, moe_cuda_rows_f16 + moe_cuda_ggemm_fp8h,
 * kernels/moe_gemv_fp8.cu) against a double-precision
 * host reference on the dequantized weights (kernels/fp8.h), fresh random
 * inputs each run (the seed is printed; MOE_TEST_SEED=N repeats a run),
 * outputs poisoned (NaN) first, the poison checked past column N and past
 * the last row:
 *  - each scale mode (per tensor, per channel, 128x128 blocks) with SiLU
 *    (bf16 H) and without (fp32 Y), through the four entry points
 *    (automatic tile: the GEMV entry takes the f16 kernel for row hints
 *    up to 2) and every shipped tile forced (GEMV 8/16/32 rows per pass,
 *    grouped GEMMs 16/32/64 tokens), the GEMV's 4- and 8-warp blocks
 *    forced (moe_cuda_gemv_fp8_warps; 8 warps with SiLU are refused),
 *    and the f16 GEMV's four variants at 1, 3 and 8 rows a pass;
 *  - activations past f16's range (amplitude 1e6 and 1e-9) and rows
 *    5e-12 .. 2e9 apart in one pass, each row checked on its own: the f16
 *    kernels' per-row power-of-two scale;
 *  - groups of 0, 1, 3, 16, 17, 64 and 100 rows (more than every tile:
 *    several passes), E 8 and E 1 (dense: offs NULL, and with offsets),
 *    n < E (compact grid), n an over-estimate, gathered input rows (xdiv
 *    2) and direct ones, ldx > Kd;
 *  - Kd 16, 208, 4096 + 48 (not a multiple of the 128-k chunk), N odd
 *    small (40, 72) and 128 / 256, and the mixtral shapes (gate|up N 14336
 *    Kd 4096 with SiLU, down N 4096 Kd 14336), E 8 x 16 rows, 192 sampled
 *    columns (those shapes' weights are filled on the device from a hash
 *    the host repeats);
 *  - weights of subnormal codes only (0x00-0x07, 0x80-0x87), where a
 *    conversion that flushed subnormals would return zeros;
 *  - a graph-captured launch of each entry point replayed with other
 *    group sizes;
 *  - n = 0 is a no-op, unsupported shapes give MOE_K_EUNSUPPORTED (and
 *    the f16 GEMV's rows a pass past 8 or its staging budget, rows_f16's
 *    bad shapes, ggemm_fp8h without scales).
 * Weights: random e4m3 codes except the NaNs (0x7f, 0xff); scales
 * uniform in [5e-4, 2e-3]; X bf16 uniform [-1, 1].
 * Thresholds (relative L2 over the checked outputs): fp32 Y 5e-5 (fp32
 * accumulation of exact products over <= 14336 terms, measured bf16
 * kernels ~1e-7), bf16 H 4e-3 (bf16 rounding of the output: 2^-9 at most
 * per element).  TAP; skips when there is no CUDA device.
 * Diagnostics (not tests, MOE_TEST_NO_TIMING unset): weight-streaming
 * bandwidth of the mixtral shapes at 1 row per expert (2 experts) and 16
 * rows per expert (8 experts), and of the dense q|k|v and o projections
 * at 1 row, for the bf16- and f16-fragment GEMVs (each variant) and the
 * grouped GEMM, next to the device-to-device copy bandwidth of the same
 * run.
 */

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "gpu_tap.h"
#include "gpu_util.h"

extern "C" {
#include "tap.h"
#include "fp8.h"
}
#include "moe_gemv.h"
#include "moe_ggemm.h"
#include "quant_gemv.h"

/* fp32 sums over Kd up to 14336 in another order than the host's double
 * sum: the H200 measured 1.67e-5 on the mixtral down shape (first run,
 * 2026-12-02), so 5e-5 */
#define F32_TOL  5e-5
#define SILU_TOL 4e-3

/* ENT_GEMVH: the GEMV on f16 fragments (moe_cuda_gemv_fp8h), "tile"
 * tp | variant << 4 (tp 0: the auto entry's rows a pass); ENT_GGEMMH:
 * moe_cuda_rows_f16 then the grouped GEMM on f16 fragments
 * (moe_cuda_ggemm_fp8h), tile the token tile (0: picked) */
enum { ENT_GEMV = 0, ENT_GGEMM = 1, ENT_GEMVH = 2, ENT_GGEMMH = 3,
       ENT_N = 4 };

/* Activation amplitude of the next setups: each row's values uniform in
 * [-g_xamp, g_xamp], or with g_xmix the row's amplitude from f8_mix by
 * row (rows far apart in magnitude staged in one pass); g_xmix also makes
 * f8_check hold every row to the tolerance on its own. */
static double g_xamp = 1.0;
static int    g_xmix;
static const double f8_mix[5] = { 3e6, 1e-7, 1.0, 2e9, 5e-12 };


static const char *
f8_ent_name(int ent)
{
    return ent == ENT_GEMV ? "gemv_fp8" : ent == ENT_GGEMM ? "ggemm_fp8"
           : ent == ENT_GEMVH ? "gemv_fp8h" : "ggemm_fp8h";
}

/* A kernel fault (illegal instruction / address) is sticky: every later
 * CUDA call fails, so the remaining cases are reported failed unrun. */
static const char *f8_dead;


/* gu_sync_ok, and a sticky error (the device unusable) noted in f8_dead */
static int
sync_ok(int rc, const char *what)
{
    cudaError_t e;

    if (gu_sync_ok(rc, what)) {
        return 1;
    }
    e = cudaGetLastError();             /* clears a non-sticky one */
    if (e != cudaSuccess && cudaDeviceSynchronize() != cudaSuccess) {
        f8_dead = cudaGetErrorString(e);
        TAP_DIAG("sticky CUDA error: the remaining cases are reported "
                 "failed without running");
    }
    return 0;
}


/* 1 while the device is usable; else one failed test for `what`. */
static int
f8_alive(const char *what)
{
    if (f8_dead == NULL) {
        return 1;
    }
    TAP_OK(0, "%s: not run after a sticky CUDA error (%s)", what, f8_dead);
    return 0;
}


/* e4m3 code of weight i (hash of i and seed): any code but the NaNs, or
 * (subn) a subnormal / zero code only. */
__host__ __device__ static inline uint8_t
w8_code(uint64_t i, uint64_t seed, int subn)
{
    uint64_t z = i * 0x9e3779b97f4a7c15ULL + seed;
    uint8_t  b;

    z = (z ^ (z >> 31)) * 0xbf58476d1ce4e5b9ULL;
    z = (z ^ (z >> 29)) * 0x94d049bb133111ebULL;
    z ^= z >> 32;
    b = (uint8_t) (z >> 8);
    if (subn) {
        return (uint8_t) (b & 0x87u);
    }
    return (b & 0x7fu) == 0x7fu ? (uint8_t) (b & 0xfeu) : b;
}


__global__ void
kernel_fill_w8(uint8_t *w, size_t n, uint64_t seed, int subn)
{
    for (size_t i = (size_t) blockIdx.x * blockDim.x + threadIdx.x; i < n;
         i += (size_t) gridDim.x * blockDim.x)
    {
        w[i] = w8_code(i, seed, subn);
    }
}


/* One launch's inputs, on the host and the device. */
typedef struct {
    int       E, N, Kd, silu, mode, R, kb;
    int       n, nrows, nx, ldx, ldy, xdiv, grouped;
    int32_t   offs[129];
    int32_t  *xrow;             /* nrows or NULL */
    float    *x;                /* nx x ldx (bf16 values) */
    float    *scale;
    size_t    nscale;
    uint64_t  wseed;
    int       subn;
    uint8_t  *d_w;
    float    *d_scale;
    uint16_t *d_x;
    int32_t  *d_xrow, *d_offs;
    void     *d_y;
    uint16_t *d_xh;             /* ENT_GGEMMH: the f16 rows (nx x ldx) */
    float    *d_sinv;           /* and their scales (nx) */
} f8_in;


static size_t
f8_nscale(int mode, int E, int R, int Kd, int silu)
{
    if (mode == MOE_K_FP8_TENSOR) {
        return (size_t) E * (silu ? 2 : 1);
    }
    if (mode == MOE_K_FP8_CHANNEL) {
        return (size_t) E * R;
    }
    return (size_t) E * ((R + 127) / 128) * ((Kd + 127) / 128);
}


/* Dequantization scale of weight (e, j, k). */
static double
f8_s(const f8_in *in, int e, int j, int k)
{
    if (in->mode == MOE_K_FP8_TENSOR) {
        return in->scale[e * (in->silu ? 2 : 1) + (in->silu && j >= in->N)];
    }
    if (in->mode == MOE_K_FP8_CHANNEL) {
        return in->scale[(size_t) e * in->R + j];
    }
    return in->scale[(size_t) e * ((in->R + 127) / 128) * in->kb
                     + (size_t) (j / 128) * in->kb + k / 128];
}


/* Dequantized weight row j of group e (Kd doubles). */
static void
f8_wrow(const f8_in *in, int e, int j, double *w)
{
    const uint64_t base = ((uint64_t) e * in->R + j) * in->Kd;

    for (int k = 0; k < in->Kd; k++) {
        w[k] = (double) moe_fp8_to_f32(w8_code(base + k, in->wseed, in->subn))
               * f8_s(in, e, j, k);
    }
}


static double
f8_dot(const double *w, const float *x, int Kd)
{
    double a = 0;

    for (int k = 0; k < Kd; k++) {
        a += (double) x[k] * w[k];
    }
    return a;
}


/*
 * Set up a launch: E groups of rows[e] rows (rows NULL: E 1, offs NULL,
 * n0 rows), n = the rows + n_extra, weights hashed on the device (d_w
 * given: already filled from wseed, not subnormal-only).
 */
static int
f8_setup(f8_in *in, int E, const int *rows, int n0, int n_extra, int N,
    int Kd, int silu, int mode, int xdiv, int subn, uint8_t *d_w,
    uint64_t wseed)
{
    size_t nw;

    memset(in, 0, sizeof(*in));
    in->E = E;
    in->N = N;
    in->Kd = Kd;
    in->silu = silu;
    in->mode = mode;
    in->R = silu ? 2 * N : N;
    in->kb = (Kd + 127) / 128;
    in->subn = subn;
    in->grouped = rows != NULL;
    in->offs[0] = 0;
    for (int e = 0; e < E && rows != NULL; e++) {
        in->offs[e + 1] = in->offs[e] + rows[e];
    }
    in->nrows = rows != NULL ? in->offs[E] : n0;
    in->n = in->nrows + n_extra;
    in->xdiv = xdiv;
    in->nx = xdiv > 0 ? (in->nrows + xdiv - 1) / xdiv + 1 : in->nrows;
    if (in->nx < 1) {
        in->nx = 1;
    }
    in->ldx = Kd + 8;
    in->ldy = N + 8;
    if (xdiv > 0 && in->nrows > 0) {
        in->xrow = (int32_t *) malloc(sizeof(int32_t) * in->nrows);
        for (int r = 0; r < in->nrows; r++) {
            in->xrow[r] = (int32_t) (gu_rand() % (uint32_t) (in->nx * xdiv));
        }
    }
    in->x = (float *) malloc(sizeof(float) * in->nx * in->ldx);
    {
        uint16_t *xb = (uint16_t *) malloc(2 * (size_t) in->nx * in->ldx);

        gu_fill_bf(in->x, xb, (size_t) in->nx * in->ldx, 1.0f);
        for (int r = 0; r < in->nx && (g_xmix || g_xamp != 1.0); r++) {
            double amp = g_xmix ? f8_mix[r % 5] : g_xamp;

            for (int k = 0; k < in->ldx; k++) {
                size_t i = (size_t) r * in->ldx + k;

                xb[i] = gu_f2bf((float) (in->x[i] * amp));
                in->x[i] = gu_bf2f(xb[i]);
            }
        }
        in->d_x = (uint16_t *) gu_up(xb, 2 * (size_t) in->nx * in->ldx);
        free(xb);
    }
    in->nscale = f8_nscale(mode, E, in->R, Kd, silu);
    in->scale = (float *) malloc(sizeof(float) * in->nscale);
    for (size_t i = 0; i < in->nscale; i++) {
        in->scale[i] = 1.25e-3f + 7.5e-4f * gu_uniform();
    }
    in->d_scale = (float *) gu_up(in->scale, sizeof(float) * in->nscale);
    in->wseed = wseed;
    nw = (size_t) E * in->R * Kd;
    if (d_w != NULL) {
        in->d_w = d_w;
    } else {
        in->d_w = (uint8_t *) gu_dev(nw);
        kernel_fill_w8<<<1024, 256>>>(in->d_w, nw, wseed, subn);
    }
    in->d_xrow = in->xrow != NULL
        ? (int32_t *) gu_up(in->xrow, sizeof(int32_t) * in->nrows) : NULL;
    in->d_offs = (int32_t *) gu_up(in->offs, sizeof(int32_t) * (E + 1));
    in->d_y = gu_dev((size_t) (in->nrows + 2) * in->ldy * 4);
    in->d_xh = (uint16_t *) gu_dev(2 * (size_t) in->nx * in->ldx);
    in->d_sinv = (float *) gu_dev(sizeof(float) * in->nx);
    return sync_ok(0, "setup");
}


static void
f8_free(f8_in *in, int own_w)
{
    if (own_w) {
        cudaFree(in->d_w);
    }
    cudaFree(in->d_scale);
    cudaFree(in->d_x);
    cudaFree(in->d_xrow);
    cudaFree(in->d_offs);
    cudaFree(in->d_y);
    cudaFree(in->d_xh);
    cudaFree(in->d_sinv);
    free(in->xrow);
    free(in->x);
    free(in->scale);
}


/* GEMV "tiles" above this: 8 rows per pass and (tile - F8_TILE_WARPS)
 * warps per block forced (moe_cuda_gemv_fp8_warps) */
#define F8_TILE_WARPS 100

/* Run entry point ent with tile (0: automatic) on stream s. */
static int
f8_run(const f8_in *in, int ent, int tile, cudaStream_t s)
{
    const moe_bf16_t *x = (const moe_bf16_t *) in->d_x;
    const int32_t    *offs = in->grouped ? in->d_offs : NULL;
    int               maxr = 0;

    for (int e = 0; e < in->E && in->grouped; e++) {
        int c = in->offs[e + 1] - in->offs[e];

        maxr = c > maxr ? c : maxr;
    }
    if (!in->grouped) {
        maxr = in->nrows;
    }
    if (ent == ENT_GGEMMH) {
        int rc = moe_cuda_rows_f16(x, in->ldx, in->nx, in->Kd, in->d_xh,
                                   in->ldx, in->d_sinv, s);

        if (rc != 0) {
            return rc;
        }
        return moe_cuda_ggemm_fp8h(in->d_xh, in->ldx, in->d_sinv,
                                   in->d_xrow, in->xdiv, in->d_w,
                                   in->d_scale, in->mode, in->N, in->Kd,
                                   offs, in->E, in->n, in->silu,
                                   (float *) in->d_y, (moe_bf16_t *) in->d_y,
                                   in->ldy, tile, s);
    }
    if (ent == ENT_GEMVH) {
        int tp = tile & 15;

        if (tp == 0) {
            tp = maxr < 1 ? 1 : maxr > 8 ? 8 : maxr;
            while (tp > 1 && moe_cuda_fp8h_tp(in->Kd, tp) != tp) {
                tp--;
            }
        }
        return moe_cuda_gemv_fp8h(x, in->ldx, in->d_xrow, in->xdiv, in->d_w,
                                  in->d_scale, in->mode, in->N, in->Kd, offs,
                                  in->E, in->n, tp, in->silu,
                                  (float *) in->d_y, (moe_bf16_t *) in->d_y,
                                  in->ldy, tile >> 4, s);
    }
    if (ent == ENT_GEMV) {
        if (tile > F8_TILE_WARPS) {
            /* 8 rows per pass with tile - F8_TILE_WARPS warps forced */
            return moe_cuda_gemv_fp8_warps(x, in->ldx, in->d_xrow, in->xdiv,
                                           in->d_w, in->d_scale, in->mode,
                                           in->N, in->Kd, offs, in->E, in->n,
                                           in->silu, (float *) in->d_y,
                                           (moe_bf16_t *) in->d_y, in->ldy,
                                           1, tile - F8_TILE_WARPS, s);
        }
        if (tile == 0) {
            return moe_cuda_gemv_fp8(x, in->ldx, in->d_xrow, in->xdiv,
                                     in->d_w, in->d_scale, in->mode, in->N,
                                     in->Kd, offs, in->E, in->n, maxr,
                                     in->silu, (float *) in->d_y,
                                     (moe_bf16_t *) in->d_y, in->ldy, NULL,
                                     s);
        }
        return moe_cuda_gemv_fp8_tiled(x, in->ldx, in->d_xrow, in->xdiv,
                                       in->d_w, in->d_scale, in->mode, in->N,
                                       in->Kd, offs, in->E, in->n, in->silu,
                                       (float *) in->d_y,
                                       (moe_bf16_t *) in->d_y, in->ldy, tile,
                                       s);
    }
    if (tile == 0) {
        return moe_cuda_ggemm_fp8(x, in->ldx, in->d_xrow, in->xdiv, in->d_w,
                                  in->d_scale, in->mode, in->N, in->Kd, offs,
                                  in->E, in->n, in->silu, (float *) in->d_y,
                                  (moe_bf16_t *) in->d_y, in->ldy, s);
    }
    return moe_cuda_ggemm_fp8_tiled(x, in->ldx, in->d_xrow, in->xdiv,
                                    in->d_w, in->d_scale, in->mode, in->N,
                                    in->Kd, offs, in->E, in->n, in->silu,
                                    (float *) in->d_y,
                                    (moe_bf16_t *) in->d_y, in->ldy, tile, s);
}


/*
 * Compare the output with the reference at columns cols[0..nc) (NULL:
 * all N) of every row; the poison must be intact past column N and in
 * the two rows past the last.
 */
static int
f8_check(const char *what, int ok, const f8_in *in, const int *cols, int nc)
{
    int       nalloc = in->nrows + 2, ldy = in->ldy, N = in->N, bad = 0;
    size_t    cnt = (size_t) nalloc * ldy;
    float    *out = (float *) malloc(sizeof(float) * cnt);
    uint16_t *ob = (uint16_t *) malloc(2 * cnt);
    uint32_t *ow = (uint32_t *) out;
    double   *wg = (double *) malloc(sizeof(double) * in->Kd);
    double   *wu = (double *) malloc(sizeof(double) * in->Kd);
    double    num = 0, den = 0, err, rowerr = 0;
    double   *rnum = (double *) calloc((size_t) nalloc, sizeof(double));
    double   *rden = (double *) calloc((size_t) nalloc, sizeof(double));

    if (cols == NULL) {
        nc = N;
    }
    if (in->silu) {
        gu_down(ob, in->d_y, 2 * cnt);
        gu_bf_to_f(out, ob, cnt);
    } else {
        gu_down(out, in->d_y, 4 * cnt);
    }
    for (int e = 0; e < in->E; e++) {
        int rb = in->grouped ? in->offs[e] : 0;
        int re = in->grouped ? in->offs[e + 1] : in->nrows;

        for (int ci = 0; ci < nc && rb < re; ci++) {
            int j = cols != NULL ? cols[ci] : ci;

            f8_wrow(in, e, j, wg);
            if (in->silu) {
                f8_wrow(in, e, in->N + j, wu);
            }
            for (int r = rb; r < re; r++) {
                const float *xr = in->x
                    + (size_t) (in->xrow != NULL ? in->xrow[r] / in->xdiv : r)
                      * in->ldx;
                double       a = f8_dot(wg, xr, in->Kd), d;
                float        o = out[(size_t) r * ldy + j];

                if (in->silu) {
                    double u = f8_dot(wu, xr, in->Kd);

                    a = a / (1.0 + exp(-a)) * u;
                }
                d = (double) o - a;
                if (isnan(o) || isinf(o)) {
                    d = INFINITY;
                }
                num += d * d;
                den += a * a;
                rnum[r] += d * d;
                rden[r] += a * a;
            }
        }
    }
    for (int r = 0; r < nalloc; r++) {
        for (int j = r < in->nrows ? N : 0; j < ldy; j++) {
            size_t i = (size_t) r * ldy + j;

            if (in->silu ? ob[i] != 0xffffu : ow[i] != 0xffffffffu) {
                bad++;
            }
        }
    }
    err = den > 0 ? sqrt(num / den) : (num > 0 ? 1 : 0);
    if (!(err == err)) {
        err = INFINITY;
    }
    for (int r = 0; r < in->nrows; r++) {
        double e = rden[r] > 0 ? sqrt(rnum[r] / rden[r])
                               : (rnum[r] > 0 ? 1 : 0);

        if (!(e <= rowerr)) {
            rowerr = e == e ? e : INFINITY;     /* NaN: a failure */
        }
    }
    {
        double tol = in->silu ? SILU_TOL : F32_TOL;

        if (g_xmix) {
            TAP_OK(ok && err <= tol && rowerr <= tol && bad == 0 && den > 0,
                   "%s (err %.2e, worst row %.2e, %d stray writes)", what,
                   err, rowerr, bad);
        } else {
            TAP_OK(ok && err <= tol && bad == 0 && den > 0, "%s (err %.2e, "
                   "%d stray writes)", what, err, bad);
        }
    }
    free(rnum);
    free(rden);
    free(out);
    free(ob);
    free(wg);
    free(wu);
    return ok && bad == 0;
}


static const char *
f8_mode_name(int mode)
{
    return mode == MOE_K_FP8_TENSOR ? "tensor"
           : mode == MOE_K_FP8_CHANNEL ? "channel" : "block";
}


/* One case through one entry point / tile. */
static void
test_case(const char *label, int E, const int *rows, int n0, int n_extra,
    int N, int Kd, int silu, int mode, int xdiv, int subn, int ent,
    int tile)
{
    f8_in    in;
    char     what[256];
    uint64_t wseed = ((uint64_t) gu_rand() << 32) | gu_rand();
    int      ok, rc;

    snprintf(what, sizeof(what), "%s %s: %s tile %d", f8_ent_name(ent), f8_mode_name(mode), label, tile);
    if (!f8_alive(what)) {
        return;
    }
    ok = f8_setup(&in, E, rows, n0, n_extra, N, Kd, silu, mode, xdiv, subn,
                  NULL, wseed);
    rc = ok ? f8_run(&in, ent, tile, 0) : -1;
    ok = sync_ok(rc, label) && ok;
    snprintf(what, sizeof(what), "%s %s: %s, %s, E %d rows %d (n %d), N %d "
             "Kd %d, %s, %s%s", f8_ent_name(ent),
             tile ? "forced tile" : "auto", label, f8_mode_name(mode), E,
             in.nrows, in.n, N, Kd, silu ? "SiLU bf16" : "fp32",
             xdiv ? "gathered" : "direct", subn ? ", subnormal codes" : "");
    if (tile) {
        snprintf(what + strlen(what), sizeof(what) - strlen(what),
                 " [tile %d]", tile);
    }
    f8_check(what, ok, &in, NULL, 0);
    f8_free(&in, 1);
}


/* Both entry points over the three modes and SiLU on / off. */
static void
test_all(const char *label, int E, const int *rows, int n0, int n_extra,
    int N, int Kd, int xdiv)
{
    for (int mode = 0; mode < 3; mode++) {
        for (int silu = 0; silu < 2; silu++) {
            int n = silu && mode == MOE_K_FP8_BLOCK && N % 128 ? 128 : N;

            for (int ent = 0; ent < ENT_N; ent++) {
                test_case(label, E, rows, n0, n_extra, n, Kd, silu, mode,
                          xdiv, 0, ent, 0);
            }
        }
    }
}


/* A captured launch replayed after the group sizes changed (same n). */
static void
test_graph(int ent, int silu)
{
    static const int rows0[8] = { 3, 0, 17, 1, 0, 9, 2, 0 };
    static const int rows1[8] = { 0, 16, 0, 0, 12, 1, 0, 3 };
    f8_in            in;
    cudaStream_t     s = NULL;
    cudaGraph_t      graph = NULL;
    cudaGraphExec_t  exec = NULL;
    uint64_t         wseed = ((uint64_t) gu_rand() << 32) | gu_rand();
    char             what[160];
    int              ok, rc = -1;

    snprintf(what, sizeof(what), "%s graph replay", f8_ent_name(ent));
    if (!f8_alive(what)) {
        return;
    }
    ok = f8_setup(&in, 8, rows0, 0, 0, 136, 400, silu, MOE_K_FP8_CHANNEL,
                  2, 0, NULL, wseed);
    ok = ok && cudaStreamCreate(&s) == cudaSuccess;
    ok = ok && cudaStreamBeginCapture(s, cudaStreamCaptureModeGlobal)
               == cudaSuccess;
    if (ok) {
        rc = f8_run(&in, ent, 0, s);
        ok = cudaStreamEndCapture(s, &graph) == cudaSuccess && rc == 0;
    }
    ok = ok && cudaGraphInstantiate(&exec, graph, 0) == cudaSuccess;
    for (int v = 0; v < 2; v++) {
        const int *rows = v == 0 ? rows0 : rows1;
        int        vok = ok;

        in.offs[0] = 0;
        for (int e = 0; e < 8; e++) {
            in.offs[e + 1] = in.offs[e] + rows[e];
        }
        cudaMemcpy(in.d_offs, in.offs, sizeof(int32_t) * 9,
                   cudaMemcpyHostToDevice);
        cudaMemset(in.d_y, 0xff, (size_t) (in.nrows + 2) * in.ldy * 4);
        vok = vok && cudaGraphLaunch(exec, s) == cudaSuccess;
        vok = vok && cudaStreamSynchronize(s) == cudaSuccess;
        vok = sync_ok(vok ? 0 : -1, "graph replay") && vok;
        snprintf(what, sizeof(what), "%s graph replay %d: %d rows, %s",
                 f8_ent_name(ent), v,
                 in.offs[8], silu ? "SiLU bf16" : "fp32");
        f8_check(what, vok, &in, NULL, 0);
    }
    if (exec != NULL) {
        cudaGraphExecDestroy(exec);
    }
    if (graph != NULL) {
        cudaGraphDestroy(graph);
    }
    if (s != NULL) {
        cudaStreamDestroy(s);
    }
    f8_free(&in, 1);
}


/* n == 0 no-op; refused shapes. */
static void
test_edges(void)
{
    f8_in in;
    int   rows[2] = { 2, 1 };
    int   rc1, rc2, rc3, ok;

    if (!f8_alive("n = 0 and refused shapes")) {
        return;
    }
    ok = f8_setup(&in, 2, rows, 0, 0, 64, 64, 0, MOE_K_FP8_CHANNEL, 0, 0,
                  NULL, 7);
    in.n = 0;
    rc1 = f8_run(&in, ENT_GEMV, 0, 0);
    rc2 = f8_run(&in, ENT_GGEMM, 0, 0);
    rc3 = f8_run(&in, ENT_GEMVH, 0, 0);
    rc3 = rc3 == MOE_K_OK ? f8_run(&in, ENT_GGEMMH, 0, 0) : rc3;
    ok = sync_ok(0, "n 0") && ok;
    {
        size_t    cnt = (size_t) (in.nrows + 2) * in.ldy;
        uint32_t *o = (uint32_t *) malloc(4 * cnt);
        int       bad = 0;

        gu_down(o, in.d_y, 4 * cnt);
        for (size_t i = 0; i < cnt; i++) {
            bad += o[i] != 0xffffffffu;
        }
        TAP_OK(ok && rc1 == MOE_K_OK && rc2 == MOE_K_OK && rc3 == MOE_K_OK
               && bad == 0, "n = 0: the three entry points return OK and "
               "write nothing (%d writes)", bad);
        free(o);
    }
    TAP_OK(!moe_cuda_fp8_supported(MOE_K_FP8_TENSOR, 64, 72, 80, 0)
           && !moe_cuda_fp8_supported(MOE_K_FP8_BLOCK, 72, 128, 128, 1)
           && moe_cuda_fp8_supported(MOE_K_FP8_BLOCK, 72, 128, 128, 0)
           && !moe_cuda_fp8_supported(7, 64, 64, 64, 0)
           && !moe_cuda_fp8_supported(MOE_K_FP8_CHANNEL, 64, 64, 60, 0)
           && moe_cuda_fp8_supported(MOE_K_FP8_CHANNEL, 64, 16, 16, 1),
           "moe_cuda_fp8_supported: Kd %% 16, block + SiLU N %% 128, mode, "
           "ldx");
    in.n = in.nrows;
    in.Kd = 72;                         /* not a multiple of 16 */
    rc1 = f8_run(&in, ENT_GEMV, 0, 0);
    rc2 = f8_run(&in, ENT_GGEMM, 0, 0);
    in.Kd = 64;
    in.mode = 5;
    TAP_OK(rc1 == MOE_K_EUNSUPPORTED && rc2 == MOE_K_EUNSUPPORTED
           && f8_run(&in, ENT_GEMV, 0, 0) == MOE_K_EUNSUPPORTED
           && f8_run(&in, ENT_GGEMM, 0, 0) == MOE_K_EUNSUPPORTED,
           "Kd 72, mode 5: MOE_K_EUNSUPPORTED (%s)", moe_cuda_last_error());
    in.mode = MOE_K_FP8_CHANNEL;
    in.silu = 1;
    rc1 = f8_run(&in, ENT_GEMV, F8_TILE_WARPS + 8, 0);
    in.silu = 0;
    rc2 = f8_run(&in, ENT_GEMV, F8_TILE_WARPS + 6, 0);
    TAP_OK(rc1 == MOE_K_EUNSUPPORTED && rc2 == MOE_K_EUNSUPPORTED,
           "gemv_fp8 8 warps with SiLU, and 6 warps: refused (%d, %d)", rc1,
           rc2);
    TAP_OK(f8_run(&in, ENT_GEMV, 3, 0) == MOE_K_EUNSUPPORTED
           && f8_run(&in, ENT_GGEMM, 48, 0) == MOE_K_EUNSUPPORTED,
           "GEMV tile 3, ggemm tile 48: not shipped (%s)",
           moe_cuda_last_error());
    TAP_OK(moe_cuda_fp8h_tp(4096, 1) == 1 && moe_cuda_fp8h_tp(4096, 8) == 8
           && moe_cuda_fp8h_tp(4096, 100) == 8
           && moe_cuda_fp8h_tp(4096, 0) == 1
           && moe_cuda_fp8h_tp(14336, 2) == 2
           && moe_cuda_fp8h_tp(14336, 3) == 0 && moe_cuda_fp8h_tp(0, 1) == 0,
           "moe_cuda_fp8h_tp: hints clamped to 1..8, 0 past the staging "
           "budget (Kd 14336: 2 rows)");
    rc1 = f8_run(&in, ENT_GEMVH, 9, 0);
    rc2 = f8_run(&in, ENT_GEMVH, 1 | 8 << 4, 0);
    in.Kd = 14336;
    in.ldx = 14336 + 8;
    rc3 = f8_run(&in, ENT_GEMVH, 3, 0);
    in.Kd = 64;
    in.ldx = 72;
    TAP_OK(rc1 == MOE_K_EUNSUPPORTED && rc2 == MOE_K_EUNSUPPORTED
           && rc3 == MOE_K_EUNSUPPORTED && f8_run(&in, ENT_GEMVH, 8, 0) == 0,
           "gemv_fp8h: 9 rows a pass, variant 8, 3 rows of Kd 14336 "
           "refused; 8 rows of Kd 64 taken (%s)", moe_cuda_last_error());
    TAP_OK(moe_cuda_rows_f16((const moe_bf16_t *) in.d_x, in.ldx, 2, 60,
                             in.d_xh, in.ldx, in.d_sinv, 0)
               == MOE_K_EUNSUPPORTED
           && moe_cuda_rows_f16((const moe_bf16_t *) in.d_x, in.ldx, 2, 64,
                                in.d_xh, 56, in.d_sinv, 0)
               == MOE_K_EUNSUPPORTED
           && moe_cuda_rows_f16((const moe_bf16_t *) in.d_x, in.ldx, 2, 64,
                                in.d_xh, in.ldx, NULL, 0)
               == MOE_K_EUNSUPPORTED
           && moe_cuda_ggemm_fp8h(in.d_xh, in.ldx, NULL, NULL, 1, in.d_w,
                                  in.d_scale, in.mode, in.N, in.Kd, NULL, 1,
                                  2, 0, (float *) in.d_y, NULL, in.ldy, 0, 0)
               == MOE_K_EUNSUPPORTED
           && f8_run(&in, ENT_GGEMMH, 48, 0) == MOE_K_EUNSUPPORTED,
           "rows_f16: Kd 60, ldh < Kd, no sinv; ggemm_fp8h: no sinv, tile "
           "48: refused (%s)", moe_cuda_last_error());
    in.mode = MOE_K_FP8_BLOCK;
    in.silu = 1;
    in.N = 72;
    TAP_OK(f8_run(&in, ENT_GEMV, 0, 0) == MOE_K_EUNSUPPORTED
           && f8_run(&in, ENT_GGEMM, 0, 0) == MOE_K_EUNSUPPORTED
           && f8_run(&in, ENT_GEMVH, 0, 0) == MOE_K_EUNSUPPORTED
           && f8_run(&in, ENT_GGEMMH, 0, 0) == MOE_K_EUNSUPPORTED,
           "block scales with SiLU and N 72: refused");
    ok = sync_ok(0, "edges");
    TAP_OK(ok, "no launch error left after the refused calls");
    f8_free(&in, 1);
}


/* The mixtral shapes on hashed weights (E 8, 16 rows per expert, the
 * first expert 33), sampled columns. */
static void
test_mixtral(uint8_t *d_w, uint64_t wseed, int N, int Kd, int silu,
    int mode)
{
    int   rows[8] = { 33, 16, 16, 0, 16, 16, 15, 16 };
    int   cols[192];
    f8_in in;
    char  what[200];

    for (int i = 0; i < 192; i++) {
        cols[i] = i < 64 ? (i < 32 ? i : N - 64 + i)
                         : (int) (gu_rand() % (uint32_t) N);
    }
    for (int ent = 0; ent < ENT_N; ent++) {
        int ok;
        int rc;

        snprintf(what, sizeof(what), "%s mixtral", f8_ent_name(ent));
        if (!f8_alive(what)) {
            continue;
        }
        ok = f8_setup(&in, 8, rows, 0, 0, N, Kd, silu, mode, 2, 0, d_w,
                      wseed);
        rc = ok ? f8_run(&in, ent, 0, 0) : -1;
        ok = sync_ok(rc, "mixtral") && ok;
        snprintf(what, sizeof(what), "%s mixtral %s N %d Kd %d, %s scales, "
                 "%d rows, 192 sampled columns",
                 f8_ent_name(ent),
                 silu ? "gate|up SiLU" : "down", N, Kd, f8_mode_name(mode),
                 in.nrows);
        f8_check(what, ok, &in, cols, 192);
        f8_free(&in, 0);
    }
}


/* Weight bytes / kernel time (20 launches) of one setup through one
 * entry point and tile; a diagnostic line. */
static void
bench_one(const f8_in *in, int ent, int tile, const char *label,
    const char *shape, double bytes, double copy_gbs)
{
    enum { WARM = 50, ROUNDS = 5, REPS = 20 };
    cudaEvent_t a, b;
    float       ms[ROUNDS], t;
    int         rc = 0;

    /* clocks up and caches in their steady state first: a single warm-up
     * launch left the first kernel timed after a setup ~9 % slow (the
     * same kernel timed twice in a row, run 17a), so WARM launches, then
     * the median of ROUNDS rounds of REPS */
    cudaEventCreate(&a);
    cudaEventCreate(&b);
    for (int i = 0; i < WARM; i++) {
        rc |= f8_run(in, ent, tile, 0);
    }
    for (int r = 0; r < ROUNDS; r++) {
        cudaEventRecord(a);
        for (int i = 0; i < REPS; i++) {
            rc |= f8_run(in, ent, tile, 0);
        }
        cudaEventRecord(b);
        cudaEventSynchronize(b);
        ms[r] = 0;
        cudaEventElapsedTime(&ms[r], a, b);
    }
    cudaEventDestroy(a);
    cudaEventDestroy(b);
    for (int i = 1; i < ROUNDS; i++) {          /* insertion sort */
        for (int j = i; j > 0 && ms[j - 1] > ms[j]; j--) {
            t = ms[j];
            ms[j] = ms[j - 1];
            ms[j - 1] = t;
        }
    }
    t = ms[ROUNDS / 2] / REPS;                  /* ms a launch */
    if (rc == 0 && t > 0) {
        double gbs = bytes / (t * 1e-3) / 1e9;

        TAP_DIAG("%-30s %-34s %8.1f us, %5.0f GB/s of e4m3 weights "
                 "(%4.1f %% of copy %.0f GB/s; median of %d x %d)", label,
                 shape, t * 1e3, gbs, 100 * gbs / copy_gbs, copy_gbs, ROUNDS,
                 REPS);
    } else {
        (void) cudaGetLastError();
    }
}


/* The mixtral shapes at 1 row per expert (2 experts: batch 1) and 16
 * (8 experts), and the dense q|k|v and o projections at 1 row: the bf16-
 * fragment GEMV, each f16-fragment variant, the grouped GEMM at 16. */
static void
bench_mixtral(uint8_t *d_w, double copy_gbs)
{
    static const int per[3] = { 1, 8, 16 };
    char             shape[96], label[64];

    for (int silu = 1; silu >= 0; silu--) {
        int N = silu ? 14336 : 4096, Kd = silu ? 4096 : 14336;

        for (int pi = 0; pi < 3; pi++) {
            int   rows[8], hit = per[pi] == 1 ? 2 : 8;
            f8_in in;
            double bytes = (double) hit * (silu ? 2 : 1) * N * Kd;

            if (f8_dead != NULL) {
                return;                 /* diagnostics only */
            }
            for (int e = 0; e < 8; e++) {
                rows[e] = e < hit ? per[pi] : 0;
            }
            if (!f8_setup(&in, 8, rows, 0, 0, N, Kd, silu, MOE_K_FP8_CHANNEL,
                          2, 0, d_w, 1)) {
                f8_free(&in, 0);
                continue;
            }
            snprintf(shape, sizeof(shape), "%s %d row(s) x %d experts",
                     silu ? "gate|up" : "down", per[pi], hit);
            bench_one(&in, ENT_GEMV, per[pi] <= 8 ? 1 : 2,
                      "gemv_fp8 (bf16 fragments)", shape, bytes, copy_gbs);
            for (int v = 0; v < 4 && per[pi] == 1; v++) {
                snprintf(label, sizeof(label), "gemv_fp8h variant %d", v);
                bench_one(&in, ENT_GEMVH, v << 4, label, shape, bytes,
                          copy_gbs);
            }
            if (per[pi] > 1) {
                bench_one(&in, ENT_GGEMM, 0, "ggemm_fp8", shape, bytes,
                          copy_gbs);
                bench_one(&in, ENT_GGEMMH, 0, "rows_f16 + ggemm_fp8h", shape,
                          bytes, copy_gbs);
                bench_one(&in, ENT_GGEMMH, 32, "rows_f16 + ggemm_fp8h bt 32",
                          shape, bytes, copy_gbs);
            }
            f8_free(&in, 0);
        }
    }
    for (int d = 0; d < 2; d++) {
        int   N = d == 0 ? 6144 : 4096;
        f8_in in;

        if (!f8_setup(&in, 1, NULL, 1, 0, N, 4096, 0, MOE_K_FP8_CHANNEL, 0,
                      0, d_w, 1)) {
            f8_free(&in, 0);
            continue;
        }
        snprintf(shape, sizeof(shape), "dense %s N %d K 4096, 1 row",
                 d == 0 ? "q|k|v" : "o", N);
        bench_one(&in, ENT_GEMV, F8_TILE_WARPS + 4, "gemv_fp8 4 warps",
                  shape, (double) N * 4096, copy_gbs);
        bench_one(&in, ENT_GEMV, F8_TILE_WARPS + 8, "gemv_fp8 8 warps",
                  shape, (double) N * 4096, copy_gbs);
        for (int v = 0; v < 4; v++) {
            snprintf(label, sizeof(label), "gemv_fp8h variant %d", v);
            bench_one(&in, ENT_GEMVH, v << 4, label, shape,
                      (double) N * 4096, copy_gbs);
        }
        f8_free(&in, 0);
    }
}


static double
copy_bw(void)
{
    size_t      n = (size_t) 1 << 30;
    void       *a = NULL, *b = NULL;
    cudaEvent_t e0, e1;
    float       ms = 0;

    if (cudaMalloc(&a, n) != cudaSuccess || cudaMalloc(&b, n) != cudaSuccess)
    {
        cudaFree(a);
        return 0;
    }
    cudaEventCreate(&e0);
    cudaEventCreate(&e1);
    cudaMemcpy(b, a, n, cudaMemcpyDeviceToDevice);
    cudaEventRecord(e0);
    for (int i = 0; i < 10; i++) {
        cudaMemcpy(b, a, n, cudaMemcpyDeviceToDevice);
    }
    cudaEventRecord(e1);
    cudaEventSynchronize(e1);
    cudaEventElapsedTime(&ms, e0, e1);
    cudaEventDestroy(e0);
    cudaEventDestroy(e1);
    cudaFree(a);
    cudaFree(b);
    return ms > 0 ? 2.0 * n * 10 / (ms * 1e-3) / 1e9 : 0;
}


int
main(void)
{
    const char         *env = getenv("MOE_TEST_SEED");
    unsigned long long  seed;
    int                 ndev = 0;
    static const int    g8[8] = { 0, 1, 3, 16, 17, 64, 100, 0 };
    static const int    g8b[8] = { 17, 0, 1, 0, 3, 0, 16, 2 };
    static const int    two[8] = { 0, 1, 0, 0, 0, 1, 0, 0 };
    static const int    one[1] = { 23 };
    size_t              wn = (size_t) 8 * 2 * 14336 * 4096;
    uint8_t            *d_w = NULL;
    uint64_t            wseed;

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

    /* label, E, rows, n0, n extra, N, Kd, xdiv: modes x SiLU x entries */
    test_all("groups 0..100", 8, g8, 0, 0, 72, 208, 2);
    test_all("k tail", 8, g8b, 0, 5, 40, 4096 + 48, 0);
    test_all("dense", 1, NULL, 37, 0, 72, 208, 0);
    test_all("E 1 offsets", 1, one, 0, 0, 128, 16, 2);
    test_all("n < E", 8, two, 0, 0, 256, 4096 + 48, 2);
    test_all("n < E, over-estimate", 8, two, 0, 3, 40, 208, 0);
    /* every shipped tile, one case each per mode and SiLU */
    for (int mode = 0; mode < 3; mode++) {
        for (int silu = 0; silu < 2; silu++) {
            for (int t = 1; t <= 4; t *= 2) {
                test_case("tile", 8, g8, 0, 0, 128, 336, silu, mode, 2, 0,
                          ENT_GEMV, t);
            }
            for (int t = 16; t <= 64; t *= 2) {
                test_case("tile", 8, g8, 0, 0, 128, 336, silu, mode, 2, 0,
                          ENT_GGEMM, t);
                test_case("tile", 8, g8, 0, 0, 128, 336, silu, mode, 2, 0,
                          ENT_GGEMMH, t);
            }
        }
    }
    /* the GEMV's 4- and 8-warp blocks forced (8 rows per pass, no SiLU):
     * grouped with several passes, dense with a k tail, and the mixtral
     * o projection's shape (the launcher's rule takes 8 warps there) */
    for (int mode = 0; mode < 3; mode++) {
        for (int w = 4; w <= 8; w += 4) {
            test_case("warps", 8, g8, 0, 0, 128, 336, 0, mode, 2, 0,
                      ENT_GEMV, F8_TILE_WARPS + w);
            test_case("warps, dense", 1, NULL, 5, 0, 72, 4096 + 48, 0, mode,
                      0, 0, ENT_GEMV, F8_TILE_WARPS + w);
        }
        test_case("dense o projection", 1, NULL, 1, 0, 4096, 4096, 0, mode,
                  0, 0, ENT_GEMV, 0);
    }
    /* subnormal codes only: a flushing conversion gives zeros */
    for (int ent = 0; ent < ENT_N; ent++) {
        test_case("subnormals", 8, g8b, 0, 0, 128, 208, 0,
                  MOE_K_FP8_CHANNEL, 0, 1, ent, 0);
        test_case("subnormals", 8, g8b, 0, 0, 128, 208, 1,
                  MOE_K_FP8_BLOCK, 0, 1, ent, 0);
    }
    test_graph(ENT_GEMV, 0);
    test_graph(ENT_GEMV, 1);
    test_graph(ENT_GGEMM, 0);
    test_graph(ENT_GGEMM, 1);
    test_graph(ENT_GEMVH, 0);
    test_graph(ENT_GEMVH, 1);
    test_graph(ENT_GGEMMH, 0);
    test_graph(ENT_GGEMMH, 1);
    /* the f16-fragment GEMV: every variant at 1, 3 and 8 rows a pass over
     * groups of 0..100 rows (many passes, partial last ones) */
    for (int mode = 0; mode < 3; mode++) {
        for (int silu = 0; silu < 2; silu++) {
            for (int v = 0; v < 4; v++) {
                for (int tp = 1; tp <= 8; tp += tp == 1 ? 2 : 5) {
                    test_case("f16 variant", 8, g8, 0, 0, 128, 336, silu,
                              mode, 2, 0, ENT_GEMVH, tp | v << 4);
                }
            }
        }
    }
    /* activations past f16's range (1e6: overflow unscaled; 1e-9: under
     * its normals), and rows 1e-12 .. 2e9 apart in one pass, each row
     * held to the tolerance on its own: the per-row power-of-two scale.
     * The bf16-fragment GEMV (tile 1) takes the same inputs. */
    for (int a = 0; a < 3; a++) {
        g_xamp = a == 0 ? 1e6 : a == 1 ? 1e-9 : 1.0;
        g_xmix = a == 2;
        for (int silu = 0; silu < 2; silu++) {
            const char *lab = a == 0 ? "x ~1e6" : a == 1 ? "x ~1e-9"
                                                         : "x rows 5e-12..2e9";

            test_case(lab, 8, g8b, 0, 0, 136, 4096 + 48, silu,
                      MOE_K_FP8_CHANNEL, 2, 0, ENT_GEMVH, 8);
            test_case(lab, 1, NULL, 7, 0, 128, 1024, silu, MOE_K_FP8_BLOCK,
                      0, 0, ENT_GEMVH, 0);
            test_case(lab, 8, g8b, 0, 0, 136, 4096 + 48, silu,
                      MOE_K_FP8_CHANNEL, 2, 0, ENT_GEMV, 1);
            test_case(lab, 8, g8, 0, 0, 256, 1024, silu, MOE_K_FP8_BLOCK,
                      2, 0, ENT_GGEMMH, 0);
            test_case(lab, 8, g8b, 0, 0, 136, 4096 + 48, silu,
                      MOE_K_FP8_CHANNEL, 0, 0, ENT_GGEMMH, 32);
        }
    }
    g_xamp = 1.0;
    g_xmix = 0;
    test_edges();

    /* mixtral-like layers on hashed device weights (0.94 GB) */
    wseed = ((uint64_t) gu_rand() << 32) | gu_rand();
    if (!f8_alive("mixtral shapes")) {
        /* reported */
    } else if (cudaMalloc(&d_w, wn) != cudaSuccess) {
        TAP_OK(0, "cudaMalloc of %zu bytes for the mixtral weights", wn);
    } else {
        kernel_fill_w8<<<4096, 256>>>(d_w, wn, wseed, 0);
        if (sync_ok(0, "fill weights")) {
            for (int mode = 0; mode < 3; mode++) {
                test_mixtral(d_w, wseed, 14336, 4096, 1, mode);
                test_mixtral(d_w, wseed, 4096, 14336, 0, mode);
            }
            if (getenv("MOE_TEST_NO_TIMING") == NULL) {
                bench_mixtral(d_w, copy_bw());
            }
        } else {
            TAP_OK(0, "hash fill of the mixtral weights");
        }
        cudaFree(d_w);
    }
    TAP_PLAN(tap_n);
    return TAP_DONE();
}
