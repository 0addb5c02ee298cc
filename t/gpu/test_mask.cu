/*
 * Checks guided decoding's device mask (moe_cuda_mask_rows, kernels/mask.cu)
 * against the host on fresh random inputs (the seed is printed;
 * MOE_TEST_SEED=N repeats a run):
 *  - rows over V in {5, 1000 (row stride 1003), 128256}, masks dense,
 *    sparse (a few ids) and single-id: after the kernel every masked id
 *    reads -inf and every allowed id is bit-identical to its input; ids
 *    past V (the stride's tail) are untouched;
 *  - the greedy id after the mask (moe_cuda_argmax_rows) equals the host's
 *    argmax over the allowed ids, and the drawn id (moe_cuda_sample_rows,
 *    temperature 0.9 / top-p 0.95) equals moe_sample_u() on the host's
 *    masked logits with the same u, except at probability boundaries
 *    (< 1% of rows), and is always an allowed id;
 *  - a real guide's masks (engine/guided/ over models/localmoe-kjv's
 *    tokenizer, a JSON Schema, along a document) give, applied on the
 *    device, exactly the host-masked argmax;
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
#include "guided/guided.h"
#include "sampling/sampling.h"
#include "tap.h"
}
#include "argmax.h"
#include "mask.h"
#include "sample.h"


static int
bit(const uint32_t *m, int i)
{
    return (int) ((m[i >> 5] >> (i & 31)) & 1u);
}


static void
make_mask(uint32_t *m, int W, int V, int kind)
{
    int i, k;

    memset(m, 0, sizeof(uint32_t) * (size_t) W);
    if (kind == 0) {                    /* dense: ~70% allowed */
        k = 0;
        for (i = 0; i < V; i++) {
            if (gu_rand() % 10 < 7) {
                m[i >> 5] |= 1u << (i & 31);
                k++;
            }
        }
        if (k == 0) {
            /*
             * never an empty row: the scheduler fails a guided sequence
             * whose mask allows nothing (guided_n 0) whatever is drawn,
             * so an empty row has no right answer here (at V 5 one in
             * 0.3^5 = 1/412 dense rows came out empty)
             */
            i = (int) (gu_rand() % (uint32_t) V);
            m[i >> 5] |= 1u << (i & 31);
        }
    } else if (kind == 1) {             /* sparse: a few ids */
        for (k = 0; k < 5; k++) {
            i = (int) (gu_rand() % (uint32_t) V);
            m[i >> 5] |= 1u << (i & 31);
        }
    } else {                            /* one id */
        i = (int) (gu_rand() % (uint32_t) V);
        m[i >> 5] |= 1u << (i & 31);
    }
}


/* one batch of rows: mask, argmax, draw; returns boundary mismatches */
static int
test_rows(int V, int ld, int rows)
{
    int                      W = (V + 31) / 32, r, i, bad_mask = 0;
    int                      bad_arg = 0, bad_draw = 0, bound = 0;
    int                      disallowed = 0;
    size_t                   n = (size_t) rows * ld;
    float                   *x = (float *) malloc(n * sizeof(float));
    float                   *y = (float *) malloc(n * sizeof(float));
    uint32_t                *m = (uint32_t *) malloc((size_t) rows * W * 4);
    int32_t                 *am = (int32_t *) malloc(rows * 4);
    int32_t                 *dr = (int32_t *) malloc(rows * 4);
    moe_cuda_sample_param_t *p = (moe_cuda_sample_param_t *)
                                 calloc((size_t) rows, sizeof(*p));
    float                   *dx, *tmp;
    uint32_t                *dm;
    int32_t                 *dam, *ddr;
    moe_cuda_sample_param_t *dp;
    moe_sampler_t            s;
    moe_sampling_t           sp;

    for (i = 0; i < (int) n; i++) {
        x[i] = gu_uniform() * 6.0f;
    }
    for (r = 0; r < rows; r++) {
        make_mask(m + (size_t) r * W, W, V, r % 3);
        p[r].temperature = 0.9f;
        p[r].top_p = 0.95f;
        p[r].repetition_penalty = 1.0f;
        p[r].u = (float) (gu_rand() & 0xffffff) / 16777216.0f;
    }
    dx = (float *) gu_up(x, n * sizeof(float));
    dm = (uint32_t *) gu_up(m, (size_t) rows * W * 4);
    dam = (int32_t *) gu_dev(rows * 4);
    ddr = (int32_t *) gu_dev(rows * 4);
    dp = (moe_cuda_sample_param_t *) gu_up(p, rows * sizeof(*p));

    TAP_OK(moe_cuda_mask_rows(dx, ld, rows, V, dm, W, 0) == MOE_K_OK
           && moe_cuda_argmax_rows(dx, ld, rows, V, NULL, dam, 0)
              == MOE_K_OK,
           "V %d: mask + argmax launch", V);
    gu_down(y, dx, n * sizeof(float));
    gu_down(am, dam, rows * 4);
    moe_cuda_sample_rows(dx, ld, rows, V, dp, NULL, NULL, NULL, ddr, 0);
    gu_down(dr, ddr, rows * 4);

    moe_sampler_init(&s, V);
    moe_sampling_defaults(&sp);
    sp.temperature = 0.9f;
    sp.top_p = 0.95f;
    tmp = (float *) malloc((size_t) V * sizeof(float));
    for (r = 0; r < rows; r++) {
        const float    *xr = x + (size_t) r * ld, *yr = y + (size_t) r * ld;
        const uint32_t *mr = m + (size_t) r * W;
        int             best = -1, want;
        float           lp;

        for (i = 0; i < ld; i++) {
            int allowed = i >= V || bit(mr, i);
            if (allowed ? memcmp(&xr[i], &yr[i], 4) != 0
                        : !(isinf(yr[i]) && yr[i] < 0))
            {
                bad_mask++;
                break;
            }
        }
        for (i = 0; i < V; i++) {
            if (bit(mr, i) && (best < 0 || xr[i] > xr[best])) {
                best = i;
            }
        }
        bad_arg += am[r] != best;
        disallowed += dr[r] < 0 || dr[r] >= V || !bit(mr, dr[r]);
        for (i = 0; i < V; i++) {
            tmp[i] = bit(mr, i) ? xr[i] : -INFINITY;
        }
        want = moe_sample_u(&s, tmp, &sp, NULL, NULL, p[r].u, &lp);
        if (dr[r] != want) {
            int   lo, hi;
            float u = p[r].u;

            for (i = 0; i < V; i++) {
                tmp[i] = bit(mr, i) ? xr[i] : -INFINITY;
            }
            lo = moe_sample_u(&s, tmp, &sp, NULL, NULL,
                              fmaxf(0.0f, u * (1 - 1e-4f)), &lp);
            for (i = 0; i < V; i++) {
                tmp[i] = bit(mr, i) ? xr[i] : -INFINITY;
            }
            hi = moe_sample_u(&s, tmp, &sp, NULL, NULL,
                              fminf(0.999999f, u * (1 + 1e-4f) + 1e-7f),
                              &lp);
            if (lo != want || hi != want) {
                bound++;
            } else {
                bad_draw++;
            }
        }
    }
    TAP_OK(bad_mask == 0, "V %d (ld %d), %d rows: masked ids read -inf, "
           "allowed ids and the tail untouched (%d bad rows)", V, ld, rows,
           bad_mask);
    TAP_OK(bad_arg == 0, "V %d: device argmax after the mask == host argmax "
           "over the allowed ids (%d mismatches)", V, bad_arg);
    TAP_OK(disallowed == 0, "V %d: every drawn id is allowed (%d not)", V,
           disallowed);
    TAP_OK(bad_draw == 0, "V %d: drawn id == moe_sample_u on the host-masked "
           "logits outside boundaries (%d mismatches, %d boundary)", V,
           bad_draw, bound);
    moe_sampler_destroy(&s);
    free(tmp);
    free(x); free(y); free(m); free(am); free(dr); free(p);
    cudaFree(dx); cudaFree(dm); cudaFree(dam); cudaFree(ddr); cudaFree(dp);
    return bound;
}


/* masks from a compiled guide along a JSON document */
static void
test_guide(void)
{
    const char        *srcdir = getenv("MOE_SRCDIR");
    char               path[1200], err[256];
    moe_tokenizer_t   *t = NULL;
    moe_guide_t       *g = NULL;
    moe_guided_state_t *st;
    const char        *schema = "{\"type\":\"object\",\"properties\":{"
                                "\"a\":{\"type\":\"integer\"},\"b\":{\"enum\":"
                                "[\"x\",\"yz\"]}},\"required\":[\"a\",\"b\"],"
                                "\"additionalProperties\":false}";
    const char        *doc = "{\"a\": 12, \"b\": \"yz\"}";
    int                V, W, pos, i, bad = 0, steps = 0;
    float             *x, *dx;
    uint32_t          *m, *dm;
    int32_t            got, *dout, eos = 0;

    snprintf(path, sizeof(path), "%s/models/localmoe-kjv/tokenizer.json",
             srcdir ? srcdir : ".");
    if (moe_tokenizer_load(path, &t, err, sizeof(err)) != MOE_OK
        || moe_guide_compile(t, MOE_GUIDED_JSON, schema, strlen(schema), &g,
                             err, sizeof(err)) != MOE_OK)
    {
        TAP_OK(0, "guide over localmoe-kjv's tokenizer: %s", err);
        moe_tokenizer_free(t);
        return;
    }
    V = moe_tokenizer_vocab_size(t);
    W = (V + 31) / 32;
    x = (float *) malloc((size_t) V * sizeof(float));
    m = (uint32_t *) malloc((size_t) W * 4);
    dx = (float *) gu_dev((size_t) V * sizeof(float));
    dm = (uint32_t *) gu_dev((size_t) W * 4);
    dout = (int32_t *) gu_dev(4);
    for (pos = 0; pos <= (int) strlen(doc); pos++) {
        int best = -1;

        st = moe_guided_state_create(g, &eos, 1);
        moe_guided_feed(st, doc, (size_t) pos);
        moe_guided_mask(st, m, (size_t) W);
        moe_guided_state_free(st);
        for (i = 0; i < V; i++) {
            x[i] = gu_uniform() * 4.0f;
            if (bit(m, i) && (best < 0 || x[i] > x[best])) {
                best = i;
            }
        }
        cudaMemcpy(dx, x, (size_t) V * sizeof(float), cudaMemcpyHostToDevice);
        cudaMemcpy(dm, m, (size_t) W * 4, cudaMemcpyHostToDevice);
        moe_cuda_mask_rows(dx, V, 1, V, dm, W, 0);
        moe_cuda_argmax_rows(dx, V, 1, V, NULL, dout, 0);
        gu_down(&got, dout, 4);
        bad += got != best;
        steps++;
    }
    TAP_OK(bad == 0, "a JSON Schema guide's masks along a document (%d "
           "steps): device-masked argmax == host-masked argmax (%d "
           "mismatches)", steps, bad);
    free(x); free(m);
    cudaFree(dx); cudaFree(dm); cudaFree(dout);
    moe_guide_release(g);
    moe_tokenizer_free(t);
}


int
main(void)
{
    const char         *env = getenv("MOE_TEST_SEED");
    unsigned long long  seed;
    int                 ndev = 0, bound = 0;
    float              *dx;
    uint32_t           *dm;

    if (cudaGetDeviceCount(&ndev) != cudaSuccess || ndev == 0) {
        printf("1..0 # SKIP no CUDA device\n");
        return 0;
    }
    seed = env != NULL && *env ? strtoull(env, NULL, 0)
           : (unsigned long long) time(NULL) * 1000003ULL
             ^ (unsigned long long) getpid();
    gu_seed(seed);
    TAP_DIAG("random inputs from seed %llu (MOE_TEST_SEED=%llu repeats "
             "this run)", seed, seed);

    bound += test_rows(5, 5, 300);
    bound += test_rows(1000, 1003, 300);
    bound += test_rows(128256, 128256, 60);
    TAP_OK(bound * 100 < 660, "boundary draws %d of 660 rows (< 1%%)", bound);
    test_guide();

    dx = (float *) gu_dev(64 * sizeof(float));
    dm = (uint32_t *) gu_dev(64);
    TAP_OK(moe_cuda_mask_rows(dx, 64, 0, 64, dm, 2, 0) == MOE_K_OK,
           "rows 0: a no-op");
    TAP_OK(moe_cuda_mask_rows(dx, 64, 1, 64, dm, 1, 0) == MOE_K_EBACKEND
           && moe_cuda_mask_rows(dx, 32, 1, 64, dm, 2, 0) == MOE_K_EBACKEND,
           "bad shapes: MOE_K_EBACKEND");
    cudaFree(dx);
    cudaFree(dm);
    printf("1..%d\n", tap_n);
    return TAP_DONE();
}
