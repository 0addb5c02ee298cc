/*
 * Checks the device sampler (moe_cuda_sample_rows, kernels/sample.cu)
 * against the host's moe_sample_u() on fresh random inputs (the seed is
 * printed; MOE_TEST_SEED=N repeats a run):
 *  - 3000 rows over V in {6, 1000 (row stride 1003), 32000, 151936}:
 *    logits normal x a scale in [0.5, 8], some quantised to a few values
 *    (ties everywhere) or with planted copies of the maximum and of other
 *    values, n_valid sometimes < V, parameters greedy / temperature /
 *    top-k / top-p / min-p / combinations, penalties with random lists of
 *    distinct ids (some >= n_valid); the host gets the same u and
 *    counts/seen arrays built from the lists.  The ids must be equal
 *    except in boundary cases, decided on the host: a case is boundary
 *    when moe_sample_u with u, top_p or min_p scaled by 1 -+ 1e-4
 *    (clamped) changes the host's answer.  No mismatch outside boundary
 *    cases; boundary mismatches < 1% of the rows.  The penalised logits
 *    left in place are bit-identical to the host's (ids >= n_valid
 *    untouched), and every out[] (poisoned with -1) is written and < n;
 *  - frequencies: one V = 1000 row, temperature 0.8, top-p 0.9, 20000
 *    evenly spaced u: each kept token's count is within 2 of 20000 x its
 *    renormalised probability (the draw maps u intervals to ids), nothing
 *    outside the nucleus, and a chi-square sum below its random bound;
 *  - penalties alone move greedy picks (frequency, presence, repetition on
 *    positive and negative logits) to the expected ids;
 *  - NaN logits: greedy equals the host scan, other rows never draw NaN;
 *  - a graph-captured launch gives the ids of an eager one, and a second
 *    eager run the same ids (deterministic);
 *  - rows = 0 is a no-op, bad arguments give MOE_EINVAL;
 *  - timings (diagnostics): V = 32000 and 151936, top-k 50 + top-p 0.9 +
 *    min-p 0.05 + penalties, 1 and 64 rows; top-p alone at 151936.
 * TAP; skips when there is no CUDA device.
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
#include "sampling/sampling.h"
#include "tap.h"
}
#include "sample.h"

#define N_MODES 8
static const char *mode_name[N_MODES] = {
    "greedy", "temperature", "top-k", "top-p", "min-p", "top-k+top-p",
    "top-k+top-p+min-p", "top-p+min-p"
};

/* a batch of rows of one V, as launched */
typedef struct {
    int                       V, ld, rows;
    float                    *x;        /* (rows, ld) original logits */
    moe_cuda_sample_param_t  *p;
    int                      *mode;
    int32_t                  *tok, *cnt;
    uint8_t                  *seen;
    int                       n_pen, cap_pen;
} batch_t;


static float
gauss(void)
{
    float a = (gu_uniform() + 1.0f) * 0.5f, b = (gu_uniform() + 1.0f) * 0.5f;

    if (a < 1e-7f) {
        a = 1e-7f;
    }
    return sqrtf(-2.0f * logf(a)) * cosf(6.2831853f * b);
}


/* uniform [0, 1) with 24 bits, as moe_rng_uniform */
static float
unif(void)
{
    return (float) (gu_rand() & 0xffffff) * (1.0f / 16777216.0f);
}


static int
row_n(const batch_t *b, int r)
{
    int nv = b->p[r].n_valid;

    return nv > 0 && nv < b->V ? nv : b->V;
}


static void
push_pen(batch_t *b, int32_t tok, int32_t cnt, uint8_t seen)
{
    if (b->n_pen == b->cap_pen) {
        b->cap_pen = b->cap_pen ? 2 * b->cap_pen : 1024;
        b->tok = (int32_t *) realloc(b->tok, sizeof(int32_t) * b->cap_pen);
        b->cnt = (int32_t *) realloc(b->cnt, sizeof(int32_t) * b->cap_pen);
        b->seen = (uint8_t *) realloc(b->seen, b->cap_pen);
    }
    b->tok[b->n_pen] = tok;
    b->cnt[b->n_pen] = cnt;
    b->seen[b->n_pen] = seen;
    b->n_pen++;
}


static void
batch_free(batch_t *b)
{
    free(b->x);
    free(b->p);
    free(b->mode);
    free(b->tok);
    free(b->cnt);
    free(b->seen);
    memset(b, 0, sizeof(*b));
}


/* logits of one row: kind 0 normal x scale, 1 quantised (a few values),
 * 2 with planted copies of the maximum and of a random value */
static void
fill_row(float *x, int V, int kind)
{
    float scale = 0.5f + 7.5f * unif();
    int   i;

    for (i = 0; i < V; i++) {
        x[i] = gauss() * scale;
    }
    if (kind == 1) {
        float q = (gu_rand() & 1) ? 1.0f : 0.5f;

        for (i = 0; i < V; i++) {
            x[i] = roundf(x[i] / scale / q) * q * scale * 0.5f;
        }
    } else if (kind == 2 && V > 1) {
        int   best = 0, copies = 1 + (int) (gu_rand() % 6);
        float other = x[gu_rand() % (unsigned) V];

        for (i = 1; i < V; i++) {
            if (x[i] > x[best]) {
                best = i;
            }
        }
        for (i = 0; i < copies; i++) {
            x[gu_rand() % (unsigned) V] = x[best];
        }
        for (i = 0; i < V / 50 + 1; i++) {
            x[gu_rand() % (unsigned) V] = other;
        }
    }
}


static int
pick_top_k(int n)
{
    static const int ks[] = { 1, 2, 3, 10, 40, 100, 1000 };
    uint32_t         c = gu_rand() % 11;

    if (c < 7) {
        return ks[c];
    }
    if (c == 7) {
        return n - 1;
    }
    if (c == 8) {
        return n;
    }
    if (c == 9) {
        return n + 7;
    }
    return 1 + (int) (gu_rand() % (unsigned) n);
}


static void
make_batch(batch_t *b, int V, int ld, int rows)
{
    char *used = (char *) calloc((size_t) V, 1);

    memset(b, 0, sizeof(*b));
    b->V = V;
    b->ld = ld;
    b->rows = rows;
    b->x = (float *) malloc(sizeof(float) * (size_t) rows * ld);
    b->p = (moe_cuda_sample_param_t *) calloc((size_t) rows,
                                              sizeof(*b->p));
    b->mode = (int *) malloc(sizeof(int) * rows);

    for (int r = 0; r < rows; r++) {
        moe_cuda_sample_param_t *p = &b->p[r];
        float                   *x = b->x + (size_t) r * ld;
        uint32_t                 c = gu_rand() % 10;
        int                      mode = (int) (gu_rand() % N_MODES), n;

        fill_row(x, V, c < 6 ? 0 : c < 8 ? 1 : 2);
        for (int i = V; i < ld; i++) {
            x[i] = NAN;                 /* never read */
        }
        c = gu_rand() % 10;
        p->n_valid = c < 6 ? 0 : c < 8 ? 1 + (int) (gu_rand() % (unsigned) V)
                                 : c == 8 ? V + 5 : -3;
        n = row_n(b, r);

        p->temperature = mode == 0 ? ((gu_rand() & 1) ? 0.0f : 5e-6f)
                         : (gu_rand() % 10 == 0) ? 0.05f + 0.15f * unif()
                         : 0.3f + 1.7f * unif();
        p->top_p = 1.0f;
        p->min_p = 0.0f;
        p->top_k = (gu_rand() % 4 == 0) ? -1 : 0;
        if (mode == 2 || mode == 5 || mode == 6) {
            p->top_k = pick_top_k(n);
        }
        if (mode == 3 || mode == 5 || mode == 6 || mode == 7) {
            p->top_p = (gu_rand() % 5 == 0) ? 0.9f : 0.02f + 0.97f * unif();
        }
        if (mode == 4 || mode == 6 || mode == 7) {
            p->min_p = 0.001f + 0.4f * unif();
        }
        p->repetition_penalty = 1.0f;
        p->u = unif();
        p->pen_off = b->n_pen;
        p->pen_n = 0;
        if (gu_rand() % 100 < 35) {
            int L = 1 + (int) (gu_rand() % (unsigned) (V < 64 ? V : 64));

            if (gu_rand() & 1) {
                p->repetition_penalty = 0.7f + 0.9f * unif();
            }
            if (gu_rand() % 5 < 3) {
                p->frequency_penalty = 2.0f * unif() - 1.0f;
            }
            if (gu_rand() % 5 < 3) {
                p->presence_penalty = 2.0f * unif() - 1.0f;
            }
            for (int k = 0; k < L; k++) {
                int32_t t = (int32_t) (gu_rand() % (unsigned) V), cnt;

                if (used[t]) {
                    continue;
                }
                used[t] = 1;
                cnt = (int32_t) (gu_rand() % 4);
                push_pen(b, t, cnt, cnt > 0 ? 1 : (uint8_t) (gu_rand() & 1));
                p->pen_n++;
            }
            for (int k = 0; k < p->pen_n; k++) {
                used[b->tok[p->pen_off + k]] = 0;
            }
        }
        b->mode[r] = mode;
    }
    free(used);
}


/* the host: the row's params as moe_sampling_t, counts/seen from its list */
static void
host_params(const batch_t *b, int r, int n, moe_sampling_t *sp,
    int32_t *counts, uint8_t *seen)
{
    const moe_cuda_sample_param_t *p = &b->p[r];

    moe_sampling_defaults(sp);
    sp->temperature = p->temperature;
    sp->top_p = p->top_p;
    sp->top_k = p->top_k;
    sp->min_p = p->min_p;
    sp->repetition_penalty = p->repetition_penalty;
    sp->frequency_penalty = p->frequency_penalty;
    sp->presence_penalty = p->presence_penalty;
    sp->logprobs = 0;
    memset(counts, 0, sizeof(int32_t) * n);
    memset(seen, 0, n);
    for (int k = 0; k < p->pen_n; k++) {
        int32_t t = b->tok[p->pen_off + k];

        if (t < n) {
            counts[t] = b->cnt[p->pen_off + k];
            seen[t] = b->seen[p->pen_off + k];
        }
    }
}


static int32_t
host_run(moe_sampler_t *s, const float *x0, float *tmp, int n,
    const moe_sampling_t *sp, const int32_t *counts, const uint8_t *seen,
    float u)
{
    float lp;

    memcpy(tmp, x0, sizeof(float) * n);
    return moe_sample_u(s, tmp, sp, counts, seen, u, &lp);
}


/* 1 when u, top_p or min_p scaled by 1 -+ 1e-4 changes the host's id */
static int
is_boundary(moe_sampler_t *s, const float *x0, float *tmp, int n,
    const moe_sampling_t *sp, const int32_t *counts, const uint8_t *seen,
    float u, int32_t want)
{
    static const float f[2] = { 1.0f - 1e-4f, 1.0f + 1e-4f };
    moe_sampling_t     q;

    for (int k = 0; k < 2; k++) {
        float uu = fminf(u * f[k], 0x1.fffffep-1f);

        if (host_run(s, x0, tmp, n, sp, counts, seen, uu) != want) {
            return 1;
        }
        if (sp->top_p < 1.0f) {
            q = *sp;
            q.top_p = fminf(sp->top_p * f[k], 1.0f);
            if (host_run(s, x0, tmp, n, &q, counts, seen, u) != want) {
                return 1;
            }
        }
        if (sp->min_p > 0.0f) {
            q = *sp;
            q.min_p = sp->min_p * f[k];
            if (host_run(s, x0, tmp, n, &q, counts, seen, u) != want) {
                return 1;
            }
        }
    }
    return 0;
}


typedef struct {
    float   *x;
    void    *p;
    int32_t *tok, *cnt, *out;
    uint8_t *seen;
} dev_batch_t;


static void
dev_up(dev_batch_t *d, const batch_t *b)
{
    size_t np = b->n_pen > 0 ? (size_t) b->n_pen : 1;

    d->x = (float *) gu_up(b->x, sizeof(float) * (size_t) b->rows * b->ld);
    d->p = gu_up(b->p, sizeof(moe_cuda_sample_param_t) * b->rows);
    d->tok = (int32_t *) gu_dev(sizeof(int32_t) * np);
    d->cnt = (int32_t *) gu_dev(sizeof(int32_t) * np);
    d->seen = (uint8_t *) gu_dev(np);
    if (b->n_pen > 0) {
        cudaMemcpy(d->tok, b->tok, sizeof(int32_t) * np,
                   cudaMemcpyHostToDevice);
        cudaMemcpy(d->cnt, b->cnt, sizeof(int32_t) * np,
                   cudaMemcpyHostToDevice);
        cudaMemcpy(d->seen, b->seen, np, cudaMemcpyHostToDevice);
    }
    d->out = (int32_t *) gu_dev(sizeof(int32_t) * b->rows);   /* -1 */
}


static void
dev_free(dev_batch_t *d)
{
    cudaFree(d->x);
    cudaFree(d->p);
    cudaFree(d->tok);
    cudaFree(d->cnt);
    cudaFree(d->seen);
    cudaFree(d->out);
}


static int
dev_run(dev_batch_t *d, const batch_t *b, cudaStream_t st)
{
    return moe_cuda_sample_rows(d->x, b->ld, b->rows, b->V,
                                (const moe_cuda_sample_param_t *) d->p,
                                d->tok, d->cnt, d->seen, d->out, st);
}


/* the main comparison for one V; returns the boundary mismatches */
static int
test_vs_host(int V, int ld, int rows)
{
    batch_t      b;
    dev_batch_t  d;
    int32_t     *out = (int32_t *) malloc(sizeof(int32_t) * rows);
    float       *xo = (float *) malloc(sizeof(float) * (size_t) rows * ld);
    float       *tmp = (float *) malloc(sizeof(float) * V);
    float       *pen = (float *) malloc(sizeof(float) * V);
    int32_t     *counts = (int32_t *) malloc(sizeof(int32_t) * V);
    uint8_t     *seen = (uint8_t *) malloc(V);
    int          ok, bad = 0, bound = 0, unwritten = 0, pen_bad = 0;
    int          per_mode[N_MODES] = { 0 }, mm_mode[N_MODES] = { 0 };
    char         line[512];
    size_t       o = 0;

    make_batch(&b, V, ld, rows);
    dev_up(&d, &b);
    ok = gu_sync_ok(dev_run(&d, &b, 0), "sample");
    gu_down(out, d.out, sizeof(int32_t) * rows);
    gu_down(xo, d.x, sizeof(float) * (size_t) rows * ld);

    for (int r = 0; ok && r < rows; r++) {
        const float    *x0 = b.x + (size_t) r * ld;
        const float    *xr = xo + (size_t) r * ld;
        int             n = row_n(&b, r);
        moe_sampler_t   s;
        moe_sampling_t  sp;
        float           lp;
        int32_t         want;

        per_mode[b.mode[r]]++;
        if (out[r] < 0 || out[r] >= n) {
            if (unwritten++ < 5) {
                TAP_DIAG("V %d row %d: out %d not in [0, %d)", V, r, out[r],
                         n);
            }
            continue;
        }
        if (moe_sampler_init(&s, n) != MOE_OK) {
            ok = 0;
            break;
        }
        host_params(&b, r, n, &sp, counts, seen);
        memcpy(pen, x0, sizeof(float) * n);
        want = moe_sample_u(&s, pen, &sp, counts, seen, b.p[r].u, &lp);

        /* in place: penalised ids bit-identical, the rest untouched */
        if (memcmp(pen, xr, sizeof(float) * n) != 0
            || memcmp(x0 + n, xr + n, sizeof(float) * (V - n)) != 0)
        {
            if (pen_bad++ < 5) {
                for (int i = 0; i < V; i++) {
                    float h = i < n ? pen[i] : x0[i];

                    if (memcmp(&h, &xr[i], 4) != 0) {
                        TAP_DIAG("V %d row %d: logit %d host %a device %a "
                                 "(orig %a)", V, r, i, h, xr[i], x0[i]);
                        break;
                    }
                }
            }
        }

        if (out[r] != want) {
            mm_mode[b.mode[r]]++;
            if (is_boundary(&s, x0, tmp, n, &sp, counts, seen, b.p[r].u,
                            want))
            {
                bound++;
            } else if (bad++ < 8) {
                TAP_DIAG("V %d row %d n %d %s: device %d host %d (logits "
                         "%g / %g) T %g k %d p %g minp %g u %.9g pen %d "
                         "rep %g freq %g pres %g", V, r, n,
                         mode_name[b.mode[r]], out[r], want, pen[out[r]],
                         pen[want], b.p[r].temperature, b.p[r].top_k,
                         b.p[r].top_p, b.p[r].min_p, b.p[r].u, b.p[r].pen_n,
                         b.p[r].repetition_penalty, b.p[r].frequency_penalty,
                         b.p[r].presence_penalty);
            }
        }
        moe_sampler_destroy(&s);
    }

    for (int m = 0; m < N_MODES; m++) {
        if (o < sizeof(line)) {
            o += (size_t) snprintf(line + o, sizeof(line) - o, " %s %d/%d",
                                   mode_name[m], mm_mode[m], per_mode[m]);
        }
    }
    TAP_DIAG("V %d mismatches/rows per mode:%s", V, line);
    TAP_OK(ok && bad == 0 && unwritten == 0 && pen_bad == 0,
           "V %d (ld %d), %d rows: device id == moe_sample_u except "
           "boundary cases (%d boundary, %d not), every poisoned out "
           "written and < n (%d not), penalised logits bit-identical "
           "(%d rows differ)", V, ld, rows, bound, bad, unwritten, pen_bad);
    dev_free(&d);
    batch_free(&b);
    free(out); free(xo); free(tmp); free(pen); free(counts); free(seen);
    return bound;
}


/* the host semantics for the expected probabilities (double) */
static int
cmp_desc(const void *a, const void *b, void *arg)
{
    const float *x = (const float *) arg;
    int          ia = *(const int *) a, ib = *(const int *) b;

    if (x[ia] != x[ib]) {
        return x[ia] > x[ib] ? -1 : 1;
    }
    return ia < ib ? -1 : ia > ib;
}


static void
test_frequencies(void)
{
    const int    V = 1000, N = 20000;
    const float  T = 0.8f, top_p = 0.9f;
    batch_t      b;
    dev_batch_t  d;
    float       *x = (float *) malloc(sizeof(float) * V);
    float       *w = (float *) malloc(sizeof(float) * V);
    int         *ix = (int *) malloc(sizeof(int) * V);
    int         *hist = (int *) calloc(V, sizeof(int));
    double      *pr = (double *) calloc(V, sizeof(double));
    int32_t     *out = (int32_t *) malloc(sizeof(int32_t) * N);
    double       sum = 0, cum = 0, kept = 0, chi2 = 0, maxdev = 0;
    float        mx;
    int          nk = 0, outside = 0, ok, i;

    fill_row(x, V, 0);
    mx = x[0];
    for (i = 1; i < V; i++) {
        mx = fmaxf(mx, x[i]);
    }
    for (i = 0; i < V; i++) {
        w[i] = expf((x[i] - mx) / T);
        sum += w[i];
        ix[i] = i;
    }
    qsort_r(ix, V, sizeof(int), cmp_desc, x);
    for (i = 0; i < V; i++) {
        cum += w[ix[i]];
        pr[ix[i]] = w[ix[i]];
        kept += w[ix[i]];
        nk++;
        if (cum >= (double) top_p * sum) {
            break;
        }
    }
    for (i = 0; i < V; i++) {
        pr[i] /= kept;
    }

    memset(&b, 0, sizeof(b));
    b.V = V;
    b.ld = V;
    b.rows = N;
    b.x = (float *) malloc(sizeof(float) * (size_t) N * V);
    b.p = (moe_cuda_sample_param_t *) calloc(N, sizeof(*b.p));
    for (int r = 0; r < N; r++) {
        memcpy(b.x + (size_t) r * V, x, sizeof(float) * V);
        b.p[r].temperature = T;
        b.p[r].top_p = top_p;
        b.p[r].repetition_penalty = 1.0f;
        b.p[r].u = (float) ((r + 0.5) / N);
    }
    dev_up(&d, &b);
    ok = gu_sync_ok(dev_run(&d, &b, 0), "sample frequencies");
    gu_down(out, d.out, sizeof(int32_t) * N);
    for (int r = 0; ok && r < N; r++) {
        if (out[r] < 0 || out[r] >= V) {
            ok = 0;
            break;
        }
        hist[out[r]]++;
    }
    for (i = 0; ok && i < V; i++) {
        double e = pr[i] * N;

        if (pr[i] == 0.0) {
            outside += hist[i];
            continue;
        }
        chi2 += (hist[i] - e) * (hist[i] - e) / e;
        maxdev = fmax(maxdev, fabs(hist[i] - e));
    }
    TAP_OK(ok && outside == 0 && maxdev <= 2.0
           && chi2 <= nk + 4.0 * sqrt(2.0 * nk),
           "V 1000, T 0.8, top-p 0.9 (%d kept), 20000 spaced u: counts "
           "within 2 of N p (max %.2f), chi-square %.1f (bound %.1f), "
           "%d outside the nucleus", nk, maxdev, chi2,
           nk + 4.0 * sqrt(2.0 * nk), outside);
    dev_free(&d);
    batch_free(&b);
    free(x); free(w); free(ix); free(hist); free(pr); free(out);
}


/* one launch of rows built by hand; returns the ids (and the logits) */
static int
run_rows(float *x, int V, int rows, moe_cuda_sample_param_t *p,
    const int32_t *tok, const int32_t *cnt, const uint8_t *seen, int npen,
    int32_t *out)
{
    batch_t      b;
    dev_batch_t  d;
    int          ok;

    memset(&b, 0, sizeof(b));
    b.V = V;
    b.ld = V;
    b.rows = rows;
    b.x = x;
    b.p = p;
    b.tok = (int32_t *) tok;
    b.cnt = (int32_t *) cnt;
    b.seen = (uint8_t *) seen;
    b.n_pen = npen;
    dev_up(&d, &b);
    ok = gu_sync_ok(dev_run(&d, &b, 0), "sample rows");
    gu_down(out, d.out, sizeof(int32_t) * rows);
    gu_down(x, d.x, sizeof(float) * (size_t) rows * V);
    dev_free(&d);
    return ok;
}


static void
test_penalties(void)
{
    enum { V = 300, R = 5 };
    float                    *x = (float *) malloc(sizeof(float) * V * R);
    moe_cuda_sample_param_t   p[R];
    int32_t                   tok[R], cnt[R], out[R];
    uint8_t                   seen[R];
    static const int32_t      want[R] = { 20, 20, 20, 30, 10 };
    int                       ok, r, i;

    /* rows 0-2: 10 is the best (5.0), 20 next (4.0); row 3: all
     * negative, 10 the best (-1.0), 30 next (-1.5); row 4: a no-op
     * penalty list (factor 1, counts 0) */
    for (r = 0; r < R; r++) {
        for (i = 0; i < V; i++) {
            x[r * V + i] = r == 3 ? -2.0f - unif() : 3.0f * unif() - 1.0f;
        }
        x[r * V + 10] = r == 3 ? -1.0f : 5.0f;
        x[r * V + 20] = r == 3 ? -2.5f : 4.0f;
        x[r * V + 30] = r == 3 ? -1.5f : 3.5f;
        memset(&p[r], 0, sizeof(p[r]));
        p[r].top_p = 1.0f;
        p[r].repetition_penalty = 1.0f;
        p[r].pen_off = r;
        p[r].pen_n = 1;
        tok[r] = 10;
        cnt[r] = 0;
        seen[r] = 1;
    }
    p[0].frequency_penalty = 1.5f;      /* 5 - 1.5 = 3.5 < 4 */
    cnt[0] = 1;
    p[1].presence_penalty = 1.1f;       /* 3.9 */
    cnt[1] = 2;
    p[2].repetition_penalty = 2.0f;     /* 2.5 */
    p[3].repetition_penalty = 2.0f;     /* -2.0 < -1.5 */
    p[4].frequency_penalty = 3.0f;      /* count 0: no effect */
    ok = run_rows(x, V, R, p, tok, cnt, seen, R, out);
    for (r = 0; r < R; r++) {
        ok = ok && out[r] == want[r];
    }
    TAP_OK(ok && x[0 * V + 10] == 3.5f && x[2 * V + 10] == 2.5f
           && x[3 * V + 10] == -2.0f && x[4 * V + 10] == 5.0f,
           "penalties move greedy: frequency, presence, repetition on a "
           "positive and a negative logit, count 0 untouched (%d %d %d %d "
           "%d)", out[0], out[1], out[2], out[3], out[4]);
    free(x);
}


static void
test_nan(void)
{
    enum { V = 5000, R = 6 };
    float                    *x = (float *) malloc(sizeof(float) * V * R);
    float                    *x0 = (float *) malloc(sizeof(float) * V * R);
    moe_cuda_sample_param_t   p[R];
    int32_t                   out[R];
    int                       ok, r, i, good;

    for (r = 0; r < R; r++) {
        fill_row(x + r * V, V, 0);
        for (i = 1; i < V; i += 1 + (int) (gu_rand() % 7)) {
            x[r * V + i] = NAN;
        }
        memset(&p[r], 0, sizeof(p[r]));
        p[r].temperature = r < 2 ? 0.0f : 1.0f;
        p[r].top_p = r == 3 || r == 5 ? 0.8f : 1.0f;
        p[r].top_k = r == 4 || r == 5 ? 20 : 0;
        p[r].min_p = r == 5 ? 0.01f : 0.0f;
        p[r].repetition_penalty = 1.0f;
        p[r].u = unif();
    }
    for (i = 0; i < V; i++) {
        x[1 * V + i] = NAN;             /* row 1: all NaN -> 0 */
    }
    memcpy(x0, x, sizeof(float) * V * R);
    ok = run_rows(x, V, R, p, NULL, NULL, NULL, 0, out);
    {
        int best = 0;

        for (i = 1; i < V; i++) {
            if (x0[i] > x0[best]) {
                best = i;
            }
        }
        good = out[0] == best && out[1] == 0;
    }
    for (r = 2; r < R; r++) {
        good = good && out[r] >= 0 && out[r] < V && !isnan(x0[r * V + out[r]]);
    }
    TAP_OK(ok && good, "NaN logits: greedy == host scan (%d), all-NaN row "
           "gives 0 (%d), sampled rows never draw a NaN id", out[0], out[1]);
    free(x);
    free(x0);
}


static void
test_graph(void)
{
    batch_t          b;
    dev_batch_t      d;
    cudaStream_t     st;
    cudaGraph_t      g = NULL;
    cudaGraphExec_t  ge = NULL;
    int              rows = 64, ok, same = 1, same2 = 1, rc = -1;
    int32_t         *a = (int32_t *) malloc(sizeof(int32_t) * rows);
    int32_t         *c = (int32_t *) malloc(sizeof(int32_t) * rows);
    int32_t         *e = (int32_t *) malloc(sizeof(int32_t) * rows);
    size_t           xb;

    make_batch(&b, 32000, 32000, rows);
    xb = sizeof(float) * (size_t) rows * b.ld;
    dev_up(&d, &b);
    cudaStreamCreate(&st);
    ok = gu_sync_ok(dev_run(&d, &b, st), "sample eager");
    gu_down(a, d.out, sizeof(int32_t) * rows);

    /* again from the original logits (penalties work in place) */
    cudaMemcpy(d.x, b.x, xb, cudaMemcpyHostToDevice);
    cudaMemset(d.out, 0xff, sizeof(int32_t) * rows);
    ok = ok && gu_sync_ok(dev_run(&d, &b, st), "sample eager 2");
    gu_down(e, d.out, sizeof(int32_t) * rows);

    cudaMemcpy(d.x, b.x, xb, cudaMemcpyHostToDevice);
    cudaMemset(d.out, 0xff, sizeof(int32_t) * rows);
    cudaDeviceSynchronize();
    if (ok && cudaStreamBeginCapture(st, cudaStreamCaptureModeGlobal)
              == cudaSuccess)
    {
        rc = dev_run(&d, &b, st);
        if (cudaStreamEndCapture(st, &g) != cudaSuccess
            || cudaGraphInstantiate(&ge, g, 0) != cudaSuccess
            || cudaGraphLaunch(ge, st) != cudaSuccess)
        {
            rc = -1;
        }
    }
    ok = ok && gu_sync_ok(rc, "sample graph");
    gu_down(c, d.out, sizeof(int32_t) * rows);
    for (int r = 0; r < rows; r++) {
        same = same && a[r] == c[r];
        same2 = same2 && a[r] == e[r];
    }
    TAP_OK(ok && same && same2, "64 rows V 32000: graph-captured launch == "
           "eager ids (%s), a second eager run == the first (%s)",
           same ? "yes" : "no", same2 ? "yes" : "no");
    if (ge != NULL) {
        cudaGraphExecDestroy(ge);
    }
    if (g != NULL) {
        cudaGraphDestroy(g);
    }
    cudaStreamDestroy(st);
    dev_free(&d);
    batch_free(&b);
    free(a); free(c); free(e);
}


static void
test_args(void)
{
    moe_cuda_sample_param_t  p;
    float                   *x = (float *) gu_dev(sizeof(float) * 64);
    void                    *dp;
    int32_t                 *o = (int32_t *) gu_dev(sizeof(int32_t) * 2);
    int32_t                  h[2];
    int                      ok;

    memset(&p, 0, sizeof(p));
    p.top_p = 1.0f;
    dp = gu_up(&p, sizeof(p));
    ok = moe_cuda_sample_rows(NULL, 0, 0, 0, NULL, NULL, NULL, NULL, NULL, 0)
         == MOE_OK
         && moe_cuda_sample_rows(x, 64, 0, 64,
                                 (moe_cuda_sample_param_t *) dp, NULL, NULL,
                                 NULL, o, 0) == MOE_OK
         && moe_cuda_sample_rows(x, 64, -3, 64,
                                 (moe_cuda_sample_param_t *) dp, NULL, NULL,
                                 NULL, o, 0) == MOE_OK;
    ok = gu_sync_ok(ok ? 0 : -1, "rows 0") && ok;
    gu_down(h, o, sizeof(h));
    TAP_OK(ok && h[0] == -1 && h[1] == -1, "rows <= 0: MOE_OK, nothing "
           "written");
    ok = moe_cuda_sample_rows(x, 64, 1, 0, (moe_cuda_sample_param_t *) dp,
                              NULL, NULL, NULL, o, 0) == MOE_EINVAL
         && moe_cuda_sample_rows(x, 63, 1, 64,
                                 (moe_cuda_sample_param_t *) dp, NULL, NULL,
                                 NULL, o, 0) == MOE_EINVAL
         && moe_cuda_sample_rows(NULL, 64, 1, 64,
                                 (moe_cuda_sample_param_t *) dp, NULL, NULL,
                                 NULL, o, 0) == MOE_EINVAL
         && moe_cuda_sample_rows(x, 64, 1, 64, NULL, NULL, NULL, NULL, o, 0)
            == MOE_EINVAL
         && moe_cuda_sample_rows(x, 64, 1, 64,
                                 (moe_cuda_sample_param_t *) dp, NULL, NULL,
                                 NULL, NULL, 0) == MOE_EINVAL;
    TAP_OK(ok, "V 0, ld < V, NULL logits / params / out: MOE_EINVAL (%s)",
           moe_cuda_last_error());
    cudaFree(x);
    cudaFree(dp);
    cudaFree(o);
}


/* microseconds per launch of rows copies of one configuration */
static double
time_rows(int V, int rows, int top_k, float top_p, float min_p, int npen)
{
    batch_t      b;
    dev_batch_t  d;
    cudaEvent_t  e0, e1;
    float        ms = 0;
    const int    iters = 20;

    memset(&b, 0, sizeof(b));
    b.V = V;
    b.ld = V;
    b.rows = rows;
    b.x = (float *) malloc(sizeof(float) * (size_t) rows * V);
    b.p = (moe_cuda_sample_param_t *) calloc(rows, sizeof(*b.p));
    for (int r = 0; r < rows; r++) {
        fill_row(b.x + (size_t) r * V, V, 0);
        b.p[r].temperature = 0.8f;
        b.p[r].top_k = top_k;
        b.p[r].top_p = top_p;
        b.p[r].min_p = min_p;
        b.p[r].repetition_penalty = 1.1f;
        b.p[r].frequency_penalty = 0.2f;
        b.p[r].u = unif();
        b.p[r].pen_off = b.n_pen;
        b.p[r].pen_n = npen;
        for (int k = 0; k < npen; k++) {
            push_pen(&b, (int32_t) ((k * 7919) % V), 1 + k % 3, 1);
        }
    }
    dev_up(&d, &b);
    cudaEventCreate(&e0);
    cudaEventCreate(&e1);
    for (int i = 0; i < 3; i++) {
        dev_run(&d, &b, 0);
    }
    cudaEventRecord(e0, 0);
    for (int i = 0; i < iters; i++) {
        dev_run(&d, &b, 0);
    }
    cudaEventRecord(e1, 0);
    if (gu_sync_ok(0, "timing")) {
        cudaEventElapsedTime(&ms, e0, e1);
    }
    cudaEventDestroy(e0);
    cudaEventDestroy(e1);
    dev_free(&d);
    batch_free(&b);
    return 1000.0 * ms / iters;
}


int
main(void)
{
    const char         *env = getenv("MOE_TEST_SEED");
    unsigned long long  seed;
    int                 ndev = 0, bound = 0, total = 0;

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

    /* MOE_TEST_QUICK (under compute-sanitizer racecheck, which runs the
     * kernel ~1000x slower): a tenth of the rows */
    {
        int q = getenv("MOE_TEST_QUICK") != NULL ? 10 : 1;

        bound += test_vs_host(6, 6, 800 / q);
        bound += test_vs_host(1000, 1003, 900 / q);
        bound += test_vs_host(32000, 32000, 900 / q);
        bound += test_vs_host(151936, 151936, 400 / q);
        total = (800 + 900 + 900 + 400) / q;
    }
    TAP_OK(bound * 100 < total, "boundary mismatches %d of %d rows (< 1%%)",
           bound, total);
    test_frequencies();
    test_penalties();
    test_nan();
    test_graph();
    test_args();

    if (getenv("MOE_TEST_NO_TIMING") != NULL) {
        return TAP_DONE();      /* under compute-sanitizer: no timings */
    }
    TAP_DIAG("timing (us per launch): V 32000 k50+p0.9+minp0.05+64 pen: "
             "1 row %.1f, 64 rows %.1f",
             time_rows(32000, 1, 50, 0.9f, 0.05f, 64),
             time_rows(32000, 64, 50, 0.9f, 0.05f, 64));
    TAP_DIAG("timing (us per launch): V 151936 same: 1 row %.1f, 64 rows "
             "%.1f; top-p 0.9 alone 1 row %.1f; temperature only 1 row %.1f",
             time_rows(151936, 1, 50, 0.9f, 0.05f, 64),
             time_rows(151936, 64, 50, 0.9f, 0.05f, 64),
             time_rows(151936, 1, 0, 0.9f, 0.0f, 0),
             time_rows(151936, 1, 0, 1.0f, 0.0f, 0));

    TAP_PLAN(tap_n);
    return TAP_DONE();
}
