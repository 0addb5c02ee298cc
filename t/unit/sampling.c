/*
 * Checks the host sampler (greedy, temperature, top-k, top-p, min-p,
 * penalties, seeded RNG, the id-order draw of moe_sample_u, the RNG
 * stream of moe_sample) and the KV block manager's all-or-nothing
 * reservations.
 */

#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "moe.h"
#include "sched/kv.h"
#include "sampling/sampling.h"
#include "tap.h"

/* one logit_bias entry for the tests (moe_sampling_t points at it) */
static int32_t lb_id[1];
static float   lb_val[1];

#define V 6

static int32_t
draw(moe_sampler_t *s, const float *base, const moe_sampling_t *sp,
    const int32_t *counts, const uint8_t *seen, moe_rng_t *rng)
{
    float  l[V], lp;

    memcpy(l, base, sizeof(l));
    return moe_sample(s, l, sp, counts, seen, rng, &lp);
}


int
main(void)
{
    moe_sampler_t   s;
    moe_sampling_t  sp;
    moe_rng_t       r1, r2;
    float           base[V] = { 1.0f, 3.0f, 2.5f, 3.0f, -1.0f, 0.5f };
    float           l[V], lp, p[V], mx, sum;
    int             i, same, hist[V] = { 0 }, ok, n = 60000;
    int32_t         a[50], b[50], counts[V] = { 0 };
    uint8_t         seen[V] = { 0 };
    moe_blocks_t    bm;
    int32_t        *t1 = NULL, *t2 = NULL;
    int             n1 = 0, c1 = 0, n2 = 0, c2 = 0;

    TAP_PLAN(28);

    moe_sampler_init(&s, V);
    moe_sampling_defaults(&sp);

    sp.temperature = 0.0f;
    memcpy(l, base, sizeof(l));
    TAP_OK(moe_sample(&s, l, &sp, NULL, NULL, &r1, &lp) == 1 && lp == 0.0f,
           "greedy takes the argmax, lowest id on ties (no logprob asked)");
    sp.logprobs = 1;
    memcpy(l, base, sizeof(l));
    moe_sample(&s, l, &sp, NULL, NULL, &r1, &lp);
    mx = 3.0f; sum = 0;
    for (i = 0; i < V; i++) sum += expf(base[i] - mx);
    TAP_OK(fabsf(lp - (3.0f - mx - logf(sum))) < 1e-5f,
           "logprob of the greedy token is log softmax (%g)", lp);
    sp.logprobs = 0;

    sp.temperature = 1.0f;
    moe_rng_seed(&r1, 42);
    moe_rng_seed(&r2, 42);
    for (i = 0; i < 50; i++) {
        a[i] = draw(&s, base, &sp, NULL, NULL, &r1);
        b[i] = draw(&s, base, &sp, NULL, NULL, &r2);
    }
    TAP_OK(memcmp(a, b, sizeof(a)) == 0, "same seed, same draws");
    moe_rng_seed(&r2, 43);
    same = 0;
    for (i = 0; i < 50; i++) {
        same += a[i] == draw(&s, base, &sp, NULL, NULL, &r2);
    }
    TAP_OK(same < 50, "another seed draws differently (%d/50 equal)", same);

    /* empirical frequencies at T=1 follow softmax */
    moe_rng_seed(&r1, 7);
    for (i = 0; i < n; i++) {
        hist[draw(&s, base, &sp, NULL, NULL, &r1)]++;
    }
    ok = 1;
    for (i = 0; i < V; i++) {
        p[i] = expf(base[i] - mx) / sum;
        if (fabs((double) hist[i] / n - p[i]) > 0.01) {
            ok = 0;
            TAP_DIAG("token %d: %.4f vs %.4f", i, (double) hist[i] / n, p[i]);
        }
    }
    TAP_OK(ok, "T=1 frequencies match softmax within 0.01 over %d draws", n);

    sp.top_k = 2;
    memset(hist, 0, sizeof(hist));
    for (i = 0; i < 2000; i++) {
        hist[draw(&s, base, &sp, NULL, NULL, &r1)]++;
    }
    TAP_OK(hist[1] > 0 && hist[3] > 0 && hist[1] + hist[3] == 2000,
           "top_k 2 keeps only the two best tokens (%d, %d)", hist[1],
           hist[3]);
    sp.top_k = 3;
    sp.top_p = 0.6f;
    memset(hist, 0, sizeof(hist));
    for (i = 0; i < 2000; i++) {
        hist[draw(&s, base, &sp, NULL, NULL, &r1)]++;
    }
    TAP_OK(hist[1] > 0 && hist[3] > 0 && hist[1] + hist[3] == 2000,
           "top_k 3 then top_p 0.6 keeps the two tied best (%d, %d)",
           hist[1], hist[3]);
    sp.top_p = 1.0f;
    sp.top_k = 0;

    sp.top_p = 0.3f;
    memset(hist, 0, sizeof(hist));
    for (i = 0; i < 2000; i++) {
        hist[draw(&s, base, &sp, NULL, NULL, &r1)]++;
    }
    TAP_OK(hist[1] == 2000, "top_p 0.3 keeps only the top token");
    sp.top_p = 0.8f;
    memset(hist, 0, sizeof(hist));
    for (i = 0; i < 4000; i++) {
        hist[draw(&s, base, &sp, NULL, NULL, &r1)]++;
    }
    TAP_OK(hist[1] > 0 && hist[3] > 0 && hist[2] > 0 && hist[0] == 0
           && hist[4] == 0 && hist[5] == 0,
           "top_p 0.8 keeps the nucleus {1,3,2}");
    sp.top_p = 1.0f;

    sp.min_p = 0.9f;
    memset(hist, 0, sizeof(hist));
    for (i = 0; i < 2000; i++) {
        hist[draw(&s, base, &sp, NULL, NULL, &r1)]++;
    }
    TAP_OK(hist[1] + hist[3] == 2000, "min_p 0.9 keeps tokens within 90%% "
           "of the best probability");
    sp.min_p = 0.0f;

    sp.temperature = 0.05f;
    memset(hist, 0, sizeof(hist));
    for (i = 0; i < 2000; i++) {
        hist[draw(&s, base, &sp, NULL, NULL, &r1)]++;
    }
    TAP_OK(hist[2] + hist[0] + hist[4] + hist[5] == 0,
           "low temperature concentrates on the best logits");

    sp.temperature = 0.0f;
    sp.frequency_penalty = 1.0f;
    counts[1] = 1;
    counts[3] = 1;
    TAP_OK(draw(&s, base, &sp, counts, NULL, &r1) == 2,
           "frequency penalty moves greedy off repeated tokens");
    sp.frequency_penalty = 0.0f;
    sp.presence_penalty = 0.6f;
    TAP_OK(draw(&s, base, &sp, counts, NULL, &r1) == 2,
           "presence penalty lowers tokens already present");
    sp.presence_penalty = 0.0f;

    sp.repetition_penalty = 2.0f;
    seen[1] = seen[3] = 1;
    TAP_OK(draw(&s, base, &sp, NULL, seen, &r1) == 2,
           "repetition penalty divides positive logits of seen tokens");
    sp.repetition_penalty = 1.0f;

    /* logit_bias: added before greedy; -100 bans the argmax (1, first of
     * the tied 1 and 3), +100 forces a low token, whatever the penalties */
    sp.temperature = 0.0f;
    sp.n_logit_bias = 1;
    sp.logit_bias_ids = lb_id;
    sp.logit_bias = lb_val;
    lb_id[0] = 1;
    lb_val[0] = -100.0f;
    TAP_OK(draw(&s, base, &sp, NULL, NULL, &r1) == 3,
           "logit_bias -100 on the greedy token moves greedy to the next");
    lb_id[0] = 4;
    lb_val[0] = 100.0f;
    sp.presence_penalty = 2.0f;
    counts[4] = 1;
    TAP_OK(draw(&s, base, &sp, counts, NULL, &r1) == 4,
           "logit_bias +100 forces a low token, before penalties");
    counts[4] = 0;
    sp.presence_penalty = 0.0f;
    sp.temperature = 1.0f;
    ok = 1;
    for (i = 0; i < 200; i++) {
        ok &= draw(&s, base, &sp, NULL, NULL, &r1) == 4;
    }
    TAP_OK(ok, "logit_bias +100 forces the token when sampling too");
    sp.n_logit_bias = 0;

    /* the draw walks the kept ids in ascending order: 3 equal logits
     * (ids 1, 3, 5) kept by top-k, each a third of the mass */
    {
        static const float  eq[V] = { 0.0f, 4.0f, -9.0f, 4.0f, -9.0f, 4.0f };
        static const float  us[4] = { 0.0f, 0.3333f, 0.3334f, 0.6666f };
        static const int    want[4] = { 1, 1, 3, 3 };
        int32_t             got[5];

        sp.temperature = 1.0f;
        sp.top_k = 3;
        ok = 1;
        for (i = 0; i < 4; i++) {
            memcpy(l, eq, sizeof(l));
            got[i] = moe_sample_u(&s, l, &sp, NULL, NULL, us[i], &lp);
            ok = ok && got[i] == want[i];
        }
        memcpy(l, eq, sizeof(l));
        got[4] = moe_sample_u(&s, l, &sp, NULL, NULL, 0.6667f, &lp);
        TAP_OK(ok && got[4] == 5, "3 equal kept logits: u below 1/3 gives "
               "the lowest id, above 2/3 the highest (%d %d %d %d %d)",
               got[0], got[1], got[2], got[3], got[4]);

        /* distinct logits, top-p sorted them best first: u = 0 still
         * takes the lowest kept id (0), not the best one (2) */
        sp.top_k = 0;
        sp.top_p = 0.999f;
        memcpy(l, (const float[V]) { 2.0f, 2.5f, 3.0f, -20.0f, -20.0f,
                                     -20.0f }, sizeof(l));
        got[0] = moe_sample_u(&s, l, &sp, NULL, NULL, 0.0f, &lp);
        memcpy(l, (const float[V]) { 2.0f, 2.5f, 3.0f, -20.0f, -20.0f,
                                     -20.0f }, sizeof(l));
        got[1] = moe_sample_u(&s, l, &sp, NULL, NULL, 0.99999f, &lp);
        TAP_OK(got[0] == 0 && got[1] == 2, "top-p keeps {0,1,2}: u 0 takes "
               "id 0, u ~1 id 2 (%d %d)", got[0], got[1]);
        sp.top_p = 1.0f;
    }

    /* moe_sample = one uniform + moe_sample_u; greedy draws nothing */
    {
        moe_rng_t  ra, rb;
        float      ua;

        moe_rng_seed(&ra, 99);
        moe_rng_seed(&rb, 99);
        ok = 1;
        for (i = 0; i < 200; i++) {
            int32_t  x, y;

            sp.temperature = i % 3 == 0 ? 0.0f : 0.7f;
            sp.top_p = i % 2 ? 0.8f : 1.0f;
            memcpy(l, base, sizeof(l));
            x = moe_sample(&s, l, &sp, NULL, NULL, &ra, &lp);
            ua = sp.temperature < 1e-5f ? 0.5f : moe_rng_uniform(&rb);
            memcpy(l, base, sizeof(l));
            y = moe_sample_u(&s, l, &sp, NULL, NULL, ua, &lp);
            ok = ok && x == y;
        }
        TAP_OK(ok && moe_rng_next(&ra) == moe_rng_next(&rb),
               "moe_sample == moe_rng_uniform + moe_sample_u, greedy "
               "consumes no random number");
        sp.top_p = 1.0f;
        sp.temperature = 1.0f;
    }

    /* one token kept: any u gives it; temperature alone, u -> 1: the
     * last id with weight */
    sp.top_k = 1;
    memcpy(l, base, sizeof(l));
    ok = moe_sample_u(&s, l, &sp, NULL, NULL, 0.99f, &lp) == 1;
    sp.top_k = 0;
    memcpy(l, base, sizeof(l));
    TAP_OK(ok && moe_sample_u(&s, l, &sp, NULL, NULL, 0.9999999f, &lp) == 5,
           "top_k 1 keeps the first of the tied best; u near 1 takes the "
           "largest id");

    /* min_p > 1 keeps nothing: the best token, no out-of-range read */
    sp.min_p = 1.5f;
    memcpy(l, base, sizeof(l));
    TAP_OK(moe_sample_u(&s, l, &sp, NULL, NULL, 0.5f, &lp) == 1,
           "min_p over 1 falls back to the best token");
    sp.min_p = 0.0f;

    moe_sampler_destroy(&s);

    /* block manager */
    moe_blocks_init(&bm, 5, 4, 0);
    TAP_OK(moe_blocks_reserve(&bm, &t1, &n1, &c1, 9) == MOE_OK && n1 == 3
           && bm.n_free == 2, "9 tokens take 3 blocks of 4");
    TAP_OK(moe_blocks_reserve(&bm, &t2, &n2, &c2, 13) == MOE_EFULL
           && n2 == 0 && bm.n_free == 2
           && (moe_blocks_release(&bm, t1, &n1), bm.n_free == 5)
           && moe_blocks_reserve(&bm, &t2, &n2, &c2, 13) == MOE_OK
           && n2 == 4, "reservation is all or nothing; released blocks "
           "are reused");
    free(t1);
    free(t2);
    moe_blocks_destroy(&bm);

    /* prefix cache: 3 full blocks published by one sequence are found by
     * the next one with the same prefix, shared, then cached and evicted */
    {
        int32_t   toks[16], other[16];
        uint64_t  h1[4], h2[4];
        int32_t  *a = NULL, *c = NULL;
        int       na = 0, ca = 0, nc = 0, cc = 0, hit;

        for (i = 0; i < 16; i++) {
            toks[i] = 100 + i;
            other[i] = 100 + i;
        }
        other[9] = 7;     /* differs inside block 2 */

        moe_blocks_init(&bm, 6, 4, 1);
        moe_blocks_reserve(&bm, &a, &na, &ca, 14);
        moe_blocks_publish(&bm, a, toks, h1, 0, 3);
        hit = moe_blocks_match(&bm, toks, 13, &c, &nc, &cc, h2);
        TAP_OK(hit == 12 && nc == 3 && memcmp(a, c, 3 * sizeof(int32_t)) == 0
               && bm.n_free == 2 && h1[2] == h2[2],
               "equal prefix: 3 blocks shared (hit %d, free %d)", hit,
               bm.n_free);
        moe_blocks_release(&bm, c, &nc);
        hit = moe_blocks_match(&bm, other, 13, &c, &nc, &cc, h2);
        TAP_OK(hit == 8 && nc == 2, "prefix differing in block 2: 2 blocks "
               "shared (hit %d)", hit);
        moe_blocks_release(&bm, c, &nc);
        moe_blocks_release(&bm, a, &na);
        TAP_OK(bm.n_free == 6 && bm.n_cached == 3,
               "released published blocks stay cached (%d cached)",
               bm.n_cached);
        /* 6 fresh blocks: the 3 plain ones, then the cached ones evicted */
        TAP_OK(moe_blocks_reserve(&bm, &a, &na, &ca, 24) == MOE_OK
               && na == 6 && bm.n_cached == 0
               && moe_blocks_match(&bm, toks, 13, &c, &nc, &cc, h2) == 0,
               "eviction reuses cached blocks and forgets them");
        moe_blocks_release(&bm, a, &na);
        free(a);
        free(c);
        moe_blocks_destroy(&bm);
    }

    return TAP_DONE();
}
