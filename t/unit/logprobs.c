/*
 * Logprobs (issue 10 item 4), CPU backend, without nginx:
 *  - moe_logprobs_row(): the chosen token's logprob equals a direct
 *    log-softmax (in double) of logits / T; the top k entries are the k
 *    largest, sorted, ties by id, exp() of them sums to <= 1;
 *  - moe_sample() with logprobs reports the logprob of the distribution it
 *    drew from (after logit_bias, penalties and temperature);
 *  - the engine: TOKEN events of a greedy request with top_logprobs carry
 *    a record whose first entry is the token itself with the event's
 *    logprob, and those logprobs equal a log-softmax of the CPU backend's
 *    logits computed by hand; requests without top_logprobs carry none;
 *  - prompt logprobs: one MOE_EV_PROMPT event before the first token with
 *    a row per prompt token (row 0 NAN), each the log-softmax of the CPU
 *    backend's logits of the prefix; the generated tokens are those of
 *    the same request without prompt logprobs; every KV block is free
 *    afterwards; bad top_logprobs values are refused by submit.
 */

#include <limits.h>
#include <math.h>
#include <poll.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "moe.h"
#include "backends/backend.h"
#include "model/model.h"
#include "sampling/sampling.h"
#include "tap.h"
#include "tiny_engine.h"

#define NGEN  8
#define TOPK  5

static char  srcdir[PATH_MAX];


/* log softmax(l / T)[i] in double */
static double
ref_lp(const float *l, int V, double T, int i)
{
    double  mx = l[0], sum = 0.0;
    int     j;

    for (j = 1; j < V; j++) {
        if (l[j] > mx) mx = l[j];
    }
    for (j = 0; j < V; j++) {
        sum += exp((l[j] - mx) / T);
    }
    return (l[i] - mx) / T - log(sum);
}


static uint64_t  rs = 88172645463325252ULL;

static float
frand(void)
{
    rs ^= rs << 13; rs ^= rs >> 7; rs ^= rs << 17;
    return (float) ((rs >> 11) * (1.0 / 9007199254740992.0));
}


static void
test_row(void)
{
    enum { V = 3000, K = 20 };
    static float         l[V];
    moe_logprob_entry_t  top[K];
    int                  i, j, ok, sorted, largest;
    float                lp;
    double               mass;

    for (i = 0; i < V; i++) {
        l[i] = 8.0f * frand() - 4.0f;
    }
    l[17] = l[42] = 5.0f;      /* a tie at the top: 17 before 42 */

    for (int t = 0; t < 2; t++) {
        float T = t == 0 ? 1.0f : 0.7f;

        lp = moe_logprobs_row(l, V, T, 123, K, top);
        TAP_OK(fabs(lp - ref_lp(l, V, T, 123)) < 1e-5,
               "T=%.1f: chosen logprob == direct log-softmax (%g, %g)", T,
               lp, ref_lp(l, V, T, 123));
        ok = 1;
        sorted = 1;
        mass = 0.0;
        for (j = 0; j < K; j++) {
            ok &= fabs(top[j].logprob - ref_lp(l, V, T, top[j].id)) < 1e-5;
            if (j > 0) sorted &= top[j].logprob <= top[j - 1].logprob;
            mass += exp(top[j].logprob);
        }
        TAP_OK(ok, "T=%.1f: each top entry's logprob is its log-softmax", T);
        TAP_OK(sorted && top[0].id == 17 && top[1].id == 42,
               "T=%.1f: top entries sorted, ties by ascending id", T);
        TAP_OK(mass <= 1.0 + 1e-6, "T=%.1f: exp sum of top %d = %g <= 1",
               T, K, mass);
        largest = 1;
        for (i = 0; i < V; i++) {
            int in = 0;
            for (j = 0; j < K; j++) in |= top[j].id == i;
            if (!in && l[i] > l[top[K - 1].id]) largest = 0;
        }
        TAP_OK(largest, "T=%.1f: no token outside the top is larger", T);
    }
    /* greedy (T 0) reports the untempered distribution */
    lp = moe_logprobs_row(l, V, 0.0f, 5, 0, NULL);
    TAP_OK(fabs(lp - ref_lp(l, V, 1.0, 5)) < 1e-5,
           "greedy: logprob at temperature 1");
}


static void
test_sample(void)
{
    enum { V = 500 };
    static float     l[V], work[V], want[V];
    moe_sampler_t    s;
    moe_sampling_t   sp;
    moe_rng_t        rng;
    int32_t          tok, bid = 7, cnt[V];
    float            bias = 3.0f, lp;
    int              i;

    for (i = 0; i < V; i++) {
        l[i] = 4.0f * frand() - 2.0f;
        cnt[i] = i % 3 == 0;
    }
    moe_sampler_init(&s, V);
    moe_sampling_defaults(&sp);
    sp.logprobs = 1;
    sp.temperature = 0.8f;
    sp.top_k = 10;
    sp.frequency_penalty = 0.5f;
    sp.logit_bias_ids = &bid;
    sp.logit_bias = &bias;
    sp.n_logit_bias = 1;
    moe_rng_seed(&rng, 3);
    memcpy(work, l, sizeof(l));
    tok = moe_sample(&s, work, &sp, cnt, NULL, &rng, &lp);
    for (i = 0; i < V; i++) {
        want[i] = l[i] + (i == bid ? bias : 0.0f)
                  - (cnt[i] ? 0.5f : 0.0f);
    }
    TAP_OK(fabs(lp - ref_lp(want, V, 0.8, tok)) < 1e-5,
           "moe_sample: logprob of the biased, penalised, tempered "
           "distribution (%g, %g)", lp, ref_lp(want, V, 0.8, tok));
    TAP_OK(memcmp(work, want, sizeof(want)) == 0,
           "moe_sample leaves the biased, penalised logits");
    moe_sampler_destroy(&s);
}


/* ------------------------------------------------------------- engine */

typedef struct {
    int32_t   toks[NGEN];
    float     lp[NGEN];
    int32_t   top[NGEN][TOPK];
    float     top_lp[NGEN][TOPK];
    int       n, n_with_rec, rec_ok, finished, prompt_at, n_events;
    moe_logprobs_t *prompt;
} res_t;


static moe_engine_t *
make_engine(void)
{
    moe_config_t cfg;

    tu_tiny_config(&cfg, srcdir);
    return tu_engine(&cfg);
}


static int
collect(moe_engine_t *e, uint64_t id, res_t *r)
{
    moe_event_t    ev[64];
    size_t         n, k;
    struct pollfd  pfd = { moe_engine_eventfd(e), POLLIN, 0 };

    memset(r, 0, sizeof(*r));
    r->rec_ok = 1;
    r->prompt_at = -1;
    while (!r->finished) {
        if (poll(&pfd, 1, 30000) == 0) {
            TAP_DIAG("timed out");
            return -1;
        }
        n = moe_engine_drain(e, ev, 64);
        for (k = 0; k < n; k++) {
            if (ev[k].req_id != id) {
                moe_event_release(&ev[k]);
                continue;
            }
            r->n_events++;
            if (ev[k].type == MOE_EV_PROMPT) {
                r->prompt_at = r->n;
                r->prompt = ev[k].lp;       /* kept */
                continue;
            }
            if (ev[k].type == MOE_EV_TOKEN && r->n < NGEN) {
                r->toks[r->n] = ev[k].token;
                r->lp[r->n] = ev[k].logprob;
                r->n++;
                if (ev[k].lp != NULL) {
                    moe_logprobs_t *p = ev[k].lp;
                    for (int j = 0; j < TOPK && j < p->k; j++) {
                        r->top[r->n - 1][j] = p->top[j].id;
                        r->top_lp[r->n - 1][j] = p->top[j].logprob;
                    }
                    r->n_with_rec++;
                    r->rec_ok &= p->n_rows == 1 && p->k == TOPK
                                 && p->token[0] == ev[k].token
                                 && p->top[0].id == ev[k].token
                                 && fabsf(p->top[0].logprob
                                          - ev[k].logprob) < 1e-6f
                                 && p->logprob[0] == ev[k].logprob;
                }
            } else if (ev[k].type != MOE_EV_TOKEN) {
                r->finished = 1;
            }
            moe_event_release(&ev[k]);
        }
    }
    return 0;
}


/* logits of every position of toks[0..n) on a fresh CPU backend, one
 * position per forward: out (n, V) */
static int
ref_logits(const int32_t *toks, int n, float *out, int *V)
{
    char             err[512], dir[PATH_MAX + 64];
    moe_model_t     *m = NULL;
    moe_backend_t   *b = NULL;
    moe_seq_batch_t  sb;
    int32_t          table[32];
    int              i, rc = -1;

    snprintf(dir, sizeof(dir), "%s/models/localmoe-tiny", srcdir);
    if (moe_model_load(dir, 0, &m, err, sizeof(err)) != MOE_OK
        || moe_cpu_backend_create(m, 32, 4, 1, &b, err, sizeof(err))
           != MOE_OK)
    {
        TAP_DIAG("reference: %s", err);
        goto done;
    }
    *V = moe_model_hparams(m)->vocab_size;
    for (i = 0; i < 32; i++) table[i] = i;
    for (i = 0; i < n; i++) {
        memset(&sb, 0, sizeof(sb));
        sb.tokens = (int32_t *) toks + i;
        sb.n_tokens = 1;
        sb.pos = i;
        sb.block_table = table;
        sb.n_blocks = 32;
        sb.logits = out + (size_t) i * *V;
        if (b->forward(b, &sb, 1) != MOE_OK) goto done;
    }
    rc = 0;
done:
    if (b) b->destroy(b);
    moe_model_free(m);
    return rc;
}


int
main(int argc, char **argv)
{
    moe_engine_t   *e, *h;
    moe_sampling_t  sp;
    moe_stats_t     st;
    res_t           a, b, c;
    int32_t        *ids, all[128];
    size_t          n;
    int             i, ok, V = 0, nv;
    float          *lg;

    (void) argc;
    if (getenv("MOE_SRCDIR")) {
        snprintf(srcdir, sizeof(srcdir), "%s", getenv("MOE_SRCDIR"));
    } else if (realpath(argv[0], srcdir) != NULL) {
        /* build/t/logprobs -> repo root */
        for (i = 0; i < 3; i++) {
            char *slash = strrchr(srcdir, '/');
            if (slash) *slash = '\0';
        }
    }

    TAP_PLAN(27);
    test_row();
    test_sample();

    e = make_engine();
    if (e == NULL) {
        TAP_OK(0, "engine starts");
        return 1;
    }
    TAP_OK(1, "engine starts on models/localmoe-tiny");
    nv = moe_tokenizer_vocab_size(moe_engine_tokenizer(e));

    moe_tokenizer_encode(moe_engine_tokenizer(e), "Once upon a time there",
                         22, 1, &ids, &n);

    moe_sampling_defaults(&sp);
    sp.temperature = 0.0f;
    sp.max_tokens = NGEN;
    sp.ignore_eos = 1;

    ok = moe_engine_submit(e, 1, ids, (int) n, &sp) == MOE_OK
         && collect(e, 1, &a) == 0;
    TAP_OK(ok && a.n == NGEN && a.n_with_rec == 0,
           "greedy without logprobs: %d tokens, no records", a.n);

    sp.logprobs = 1;
    sp.top_logprobs = TOPK;
    ok = moe_engine_submit(e, 2, ids, (int) n, &sp) == MOE_OK
         && collect(e, 2, &b) == 0;
    TAP_OK(ok && b.n == NGEN && memcmp(a.toks, b.toks, sizeof(a.toks)) == 0,
           "greedy with top_logprobs: the same tokens");
    TAP_OK(b.n_with_rec == NGEN && b.rec_ok,
           "every TOKEN carries a record: the token first, same logprob");

    /* the engine's logprobs == log-softmax of the CPU backend's logits */
    memcpy(all, ids, n * sizeof(int32_t));
    memcpy(all + n, b.toks, sizeof(b.toks));
    lg = malloc(sizeof(float) * (size_t) moe_engine_info(e)->vocab_size
                * (n + NGEN));
    ok = lg != NULL && ref_logits(all, (int) n + NGEN, lg, &V) == 0;
    if (ok) {
        for (i = 0; i < NGEN; i++) {
            double want = ref_lp(lg + (size_t) (n - 1 + i) * V, nv, 1.0,
                                 b.toks[i]);
            if (fabs(want - b.lp[i]) > 1e-4) {
                TAP_DIAG("token %d: %g, direct %g", i, b.lp[i], want);
                ok = 0;
            }
        }
    }
    TAP_OK(ok, "token logprobs == log-softmax of CPU backend logits");

    /* prompt logprobs */
    sp.prompt_logprobs = 1;
    ok = moe_engine_submit(e, 3, ids, (int) n, &sp) == MOE_OK
         && collect(e, 3, &c) == 0;
    TAP_OK(ok && c.prompt != NULL && c.prompt_at == 0,
           "prompt logprobs: one PROMPT event before the first token");
    TAP_OK(c.prompt && c.prompt->n_rows == (int) n
           && isnan(c.prompt->logprob[0])
           && c.prompt->top[0].id == -1,
           "PROMPT: %d rows, row 0 NAN", c.prompt ? c.prompt->n_rows : -1);
    ok = c.prompt != NULL && lg != NULL && V > 0;
    for (i = 1; ok && i < (int) n; i++) {
        const float *row = lg + (size_t) (i - 1) * V;
        double want = ref_lp(row, nv, 1.0, ids[i]);
        ok = c.prompt->token[i] == ids[i]
             && fabs(c.prompt->logprob[i] - want) < 1e-4
             && fabs(c.prompt->top[(size_t) i * TOPK].logprob
                     - ref_lp(row, nv, 1.0, c.prompt->top[(size_t) i
                                                      * TOPK].id)) < 1e-4
             && c.prompt->top[(size_t) i * TOPK].logprob
                >= c.prompt->logprob[i] - 1e-6;
        if (!ok) TAP_DIAG("prompt row %d differs", i);
    }
    TAP_OK(ok, "prompt rows == log-softmax of the prefix's logits, top "
           "first");
    TAP_OK(c.n == NGEN && memcmp(a.toks, c.toks, sizeof(a.toks)) == 0,
           "prompt logprobs: the same generated tokens");
    free(c.prompt);
    free(lg);

    /* refused */
    sp.prompt_logprobs = 0;
    sp.top_logprobs = 21;
    TAP_OK(moe_engine_submit(e, 9, ids, (int) n, &sp) == MOE_EINVAL,
           "top_logprobs 21 refused");
    sp.top_logprobs = 2;
    sp.logprobs = 0;
    TAP_OK(moe_engine_submit(e, 9, ids, (int) n, &sp) == MOE_EINVAL,
           "top_logprobs without logprobs refused");

    moe_engine_hold(e, 0);
    moe_engine_hold(e, -1);
    moe_engine_stats(e, &st);
    TAP_OK(st.kv_blocks_used == 0, "every KV block free afterwards (%lld)",
           (long long) st.kv_blocks_used);

    /* the backend's logprobs (lp_out, as CUDA computes them on the
     * device) == the host sampler's: an engine whose CPU backend leaves
     * them to the host (MOE_CPU_LOGPROBS_TOKENS=0), a seeded sampled
     * request with a frequency penalty and top_logprobs */
    setenv("MOE_CPU_LOGPROBS_TOKENS", "0", 1);
    h = make_engine();
    unsetenv("MOE_CPU_LOGPROBS_TOKENS");
    moe_sampling_defaults(&sp);
    sp.temperature = 0.8f;
    sp.frequency_penalty = 0.7f;
    sp.seed = 42;
    sp.has_seed = 1;
    sp.max_tokens = NGEN;
    sp.ignore_eos = 1;
    sp.logprobs = 1;
    sp.top_logprobs = TOPK;
    ok = h != NULL && moe_engine_submit(e, 20, ids, (int) n, &sp) == MOE_OK
         && collect(e, 20, &a) == 0
         && moe_engine_submit(h, 21, ids, (int) n, &sp) == MOE_OK
         && collect(h, 21, &b) == 0
         && a.n == NGEN && b.n == NGEN && a.n_with_rec == NGEN
         && b.n_with_rec == NGEN;
    {
        moe_stats_t  se, sh;

        moe_engine_stats(e, &se);
        if (h != NULL) moe_engine_stats(h, &sh);
        ok = ok && se.backend_sampled_tokens >= NGEN
             && sh.backend_sampled_tokens == 0;
        TAP_OK(ok && memcmp(a.toks, b.toks, sizeof(a.toks)) == 0,
               "sampled + penalty: the backend's draw with its logprobs "
               "(%lld tokens) gives the host sampler's tokens",
               (long long) se.backend_sampled_tokens);
    }
    for (i = 0; ok && i < NGEN; i++) {
        ok = fabsf(a.lp[i] - b.lp[i]) < 1e-5f
             && memcmp(a.top[i], b.top[i], sizeof(a.top[i])) == 0;
        for (int j = 0; ok && j < TOPK; j++) {
            ok = fabsf(a.top_lp[i][j] - b.top_lp[i][j]) < 1e-5f;
        }
        if (!ok) TAP_DIAG("token %d: %g vs host %g", i, a.lp[i], b.lp[i]);
    }
    TAP_OK(ok, "backend logprobs and top entries == the host sampler's "
           "(penalised, tempered distribution)");
    moe_engine_destroy(h);

    free(ids);
    moe_engine_destroy(e);
    return TAP_DONE();
}
