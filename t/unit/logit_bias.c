/*
 * logit_bias on the backend (issue 10 item 6), CPU backend, without nginx:
 *  - the batch fields (moe_seq_batch_t.bias_ids / bias) on the CPU backend
 *    give the token moe_sample_u() gives with the same bias in
 *    moe_sampling_t, over the same logits and u: greedy (-bias on the
 *    greedy id moves it; an id listed twice gets both entries), +100
 *    forcing an unlikely id greedy and drawn, and seeded draws with top-p
 *    and a frequency penalty; lp_out / lp_top equal moe_logprobs_row() of
 *    the biased, penalised logits; a list over MOE_MAX_LOGIT_BIAS is
 *    refused (MOE_EINVAL);
 *  - the engine: a backend that adds the bias (logit_bias_device, the
 *    default) and one that leaves it to the host sampler
 *    (MOE_CPU_LOGIT_BIAS=0) give the same tokens and logprobs for greedy
 *    (-100 on the greedy token changes it, +100 forces a token) and
 *    seeded sampled requests; on the first no token is drawn by the host
 *    sampler (host_sampled_tokens stays 0, the sampled ones count in
 *    backend_sampled_tokens), on the second every one is; an engine of
 *    two tensor-parallel CPU ranks keeps the bias on the backend too.
 */

#include <limits.h>
#include <math.h>
#include <poll.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "moe.h"
#include "backends/backend.h"
#include "model/model.h"
#include "sampling/sampling.h"
#include "tap.h"
#include "tiny_engine.h"

#define NGEN  8
#define TOPK  5

static char  srcdir[PATH_MAX];


/* ----------------------------------------------------- backend level */

typedef struct {
    moe_backend_t  *b;
    int32_t         table[8];
    int32_t         toks[4];
    int             V;
} bk_t;


/* one forward of the 4-token prompt (the same K/V every time) */
static int
bk_run(bk_t *k, float *logits, int32_t *tok, const moe_sampling_t *sp,
    float u, const int32_t *pen_tok, const int32_t *pen_cnt,
    const uint8_t *pen_seen, int n_pen, const int32_t *ids,
    const float *bias, int n_bias, float *lp, moe_logprob_entry_t *top)
{
    moe_seq_batch_t  sb;

    memset(&sb, 0, sizeof(sb));
    sb.tokens = k->toks;
    sb.n_tokens = 4;
    sb.pos = 0;
    sb.block_table = k->table;
    sb.n_blocks = 8;
    sb.logits = logits;
    sb.token_out = tok;
    sb.sample = sp;
    sb.u = u;
    sb.pen_tok = pen_tok;
    sb.pen_cnt = pen_cnt;
    sb.pen_seen = pen_seen;
    sb.n_pen = n_pen;
    sb.bias_ids = ids;
    sb.bias = bias;
    sb.n_bias = n_bias;
    sb.lp_out = lp;
    sb.lp_top = top;
    sb.lp_k = lp != NULL ? TOPK : 0;
    return k->b->forward(k->b, &sb, 1);
}


static void
test_backend(void)
{
    char                 err[512], dir[PATH_MAX + 64];
    moe_model_t         *m = NULL;
    bk_t                 k;
    float               *L, *work, lp, hlp, bias[MOE_MAX_LOGIT_BIAS + 1];
    int32_t              ids[MOE_MAX_LOGIT_BIAS + 1], tok, g, lo, htok;
    int32_t              pen_tok[3] = { 0, 0, 0 }, pen_cnt[3] = { 2, 1, 3 };
    int32_t             *cnt;
    uint8_t              pen_seen[3] = { 1, 1, 1 };
    moe_logprob_entry_t  top[TOPK], htop[TOPK];
    moe_sampler_t        smp;
    moe_sampling_t       sp, hsp;
    int                  i, j, ok, V, same, lp_ok, forced;

    memset(&k, 0, sizeof(k));
    snprintf(dir, sizeof(dir), "%s/models/localmoe-tiny", srcdir);
    if (moe_model_load(dir, 0, &m, err, sizeof(err)) != MOE_OK
        || moe_cpu_backend_create(m, 8, 4, 1, &k.b, err, sizeof(err))
           != MOE_OK)
    {
        TAP_DIAG("backend: %s", err);
        TAP_OK(0, "cpu backend starts");
        moe_model_free(m);
        return;
    }
    TAP_OK(k.b->logit_bias_device == 1,
           "cpu backend adds logit_bias itself (logit_bias_device)");
    V = k.V = moe_model_hparams(m)->vocab_size;
    for (i = 0; i < 8; i++) k.table[i] = i;
    for (i = 0; i < 4; i++) k.toks[i] = 10 + 7 * i;
    L = malloc(sizeof(float) * (size_t) V);
    work = malloc(sizeof(float) * (size_t) V);
    cnt = calloc((size_t) V, sizeof(int32_t));
    moe_sampler_init(&smp, V);

    /* the unbiased logits, their argmax and least likely id */
    bk_run(&k, L, NULL, NULL, 0, NULL, NULL, NULL, 0, NULL, NULL, 0, NULL,
           NULL);
    g = lo = 0;
    for (i = 1; i < V; i++) {
        if (L[i] > L[g]) g = i;
        if (L[i] < L[lo]) lo = i;
    }

    /* greedy: -60 then -40 more on the greedy id (listed twice), +3 on
     * another; the backend's argmax == the host sampler's */
    moe_sampling_defaults(&sp);
    sp.temperature = 0.0f;
    ids[0] = g; bias[0] = -60.0f;
    ids[1] = (g + 1) % V; bias[1] = 3.0f;
    ids[2] = g; bias[2] = -40.0f;
    hsp = sp;
    hsp.logit_bias_ids = ids;
    hsp.logit_bias = bias;
    hsp.n_logit_bias = 3;
    memcpy(work, L, sizeof(float) * (size_t) V);
    htok = moe_sample_u(&smp, work, &hsp, NULL, NULL, 0.0f, &hlp);
    tok = -1;
    ok = bk_run(&k, NULL, &tok, NULL, 0, NULL, NULL, NULL, 0, ids, bias, 3,
                &lp, top) == MOE_OK;
    TAP_OK(ok && tok == htok && tok != g,
           "greedy: -100 on the greedy id %d moves the backend's argmax to "
           "%d (host sampler: %d)", g, tok, htok);
    (void) moe_logprobs_row(work, V, 0.0f, htok, TOPK, htop);
    hlp = moe_logprobs_row(work, V, 0.0f, htok, 0, NULL);
    lp_ok = fabsf(lp - hlp) < 1e-5f;
    for (j = 0; j < TOPK; j++) {
        lp_ok &= top[j].id == htop[j].id
                 && fabsf(top[j].logprob - htop[j].logprob) < 1e-5f;
    }
    TAP_OK(ok && lp_ok, "greedy: lp_out / lp_top are the biased "
           "distribution's (%g, host %g)", lp, hlp);

    /* +100 on the least likely id forces it, greedy and drawn */
    ids[0] = lo; bias[0] = 100.0f;
    tok = -1;
    ok = bk_run(&k, NULL, &tok, NULL, 0, NULL, NULL, NULL, 0, ids, bias, 1,
                NULL, NULL) == MOE_OK && tok == lo;
    sp.temperature = 1.0f;
    forced = 0;
    for (i = 0; ok && i < 8; i++) {
        tok = -1;
        ok = bk_run(&k, NULL, &tok, &sp, (float) i / 8.0f + 0.05f, NULL,
                    NULL, NULL, 0, ids, bias, 1, NULL, NULL) == MOE_OK;
        forced += tok == lo;
    }
    TAP_OK(ok && forced == 8, "+100 on the least likely id %d forces it, "
           "greedy and in %d of 8 draws", lo, forced);

    /* seeded draws: top-p, temperature, a frequency + repetition penalty
     * on three ids, a bias list of five; every u gives the host's token
     * and logprobs */
    sp.temperature = 0.9f;
    sp.top_p = 0.95f;
    sp.frequency_penalty = 0.4f;
    sp.repetition_penalty = 1.2f;
    for (j = 0; j < 5; j++) {
        ids[j] = (g + 3 * j) % V;
        bias[j] = j == 0 ? -2.0f : 1.5f + (float) j;
    }
    pen_tok[0] = (g + 3) % V;
    pen_tok[1] = g;
    pen_tok[2] = (g + 9) % V;
    same = lp_ok = 1;
    ok = 1;
    for (i = 0; ok && i < 16; i++) {
        float     u = ((float) i + 0.5f) / 16.0f;
        uint8_t  *seen = calloc((size_t) V, 1);

        for (j = 0; j < 3; j++) {
            cnt[pen_tok[j]] = pen_cnt[j];
            seen[pen_tok[j]] = pen_seen[j];
        }
        hsp = sp;
        hsp.logit_bias_ids = ids;
        hsp.logit_bias = bias;
        hsp.n_logit_bias = 5;
        memcpy(work, L, sizeof(float) * (size_t) V);
        htok = moe_sample_u(&smp, work, &hsp, cnt, seen, u, &hlp);
        hlp = moe_logprobs_row(work, V, sp.temperature, htok, TOPK, htop);
        for (j = 0; j < 3; j++) {
            cnt[pen_tok[j]] = 0;
        }
        free(seen);
        tok = -1;
        ok = bk_run(&k, NULL, &tok, &sp, u, pen_tok, pen_cnt, pen_seen, 3,
                    ids, bias, 5, &lp, top) == MOE_OK;
        same &= tok == htok;
        lp_ok &= fabsf(lp - hlp) < 1e-5f;
        for (j = 0; j < TOPK; j++) {
            lp_ok &= top[j].id == htop[j].id
                     && fabsf(top[j].logprob - htop[j].logprob) < 1e-5f;
        }
    }
    TAP_OK(ok && same, "sampled (top-p, penalties, 5 biases): 16 draws "
           "equal the host sampler's");
    TAP_OK(ok && lp_ok, "sampled: lp_out / lp_top equal the host's over "
           "the biased, penalised, tempered logits");

    /* a list over the limit is refused before anything runs */
    for (j = 0; j <= MOE_MAX_LOGIT_BIAS; j++) {
        ids[j] = j % V;
        bias[j] = 1.0f;
    }
    TAP_OK(bk_run(&k, NULL, &tok, NULL, 0, NULL, NULL, NULL, 0, ids, bias,
                  MOE_MAX_LOGIT_BIAS + 1, NULL, NULL) == MOE_EINVAL
           && bk_run(&k, NULL, &tok, NULL, 0, NULL, NULL, NULL, 0, NULL,
                     bias, 1, NULL, NULL) == MOE_EINVAL,
           "%d entries, or a list without ids: MOE_EINVAL",
           MOE_MAX_LOGIT_BIAS + 1);

    moe_sampler_destroy(&smp);
    free(cnt);
    free(work);
    free(L);
    k.b->destroy(k.b);
    moe_model_free(m);
}


/* ------------------------------------------------------ engine level */

typedef struct {
    int32_t  toks[NGEN];
    float    lp[NGEN];
    int32_t  top[NGEN][TOPK];
    float    top_lp[NGEN][TOPK];
    int      n, finished;
} res_t;


static moe_engine_t *
make_engine(int tp)
{
    moe_config_t cfg;

    tu_tiny_config(&cfg, srcdir);
    if (tp > 1) {
        cfg.tensor_parallel_size = tp;
        cfg.cpu_tensor_parallel = 1;
    }
    return tu_engine(&cfg);
}


static int
run(moe_engine_t *e, uint64_t id, const int32_t *p, int n,
    const moe_sampling_t *sp, res_t *r)
{
    moe_event_t    ev[64];
    size_t         got, k;
    struct pollfd  pfd = { moe_engine_eventfd(e), POLLIN, 0 };

    memset(r, 0, sizeof(*r));
    if (moe_engine_submit(e, id, p, n, sp) != MOE_OK) {
        return -1;
    }
    while (!r->finished) {
        if (poll(&pfd, 1, 60000) == 0) {
            TAP_DIAG("timed out");
            return -1;
        }
        got = moe_engine_drain(e, ev, 64);
        for (k = 0; k < got; k++) {
            if (ev[k].req_id == id && ev[k].type == MOE_EV_TOKEN
                && r->n < NGEN)
            {
                r->toks[r->n] = ev[k].token;
                r->lp[r->n] = ev[k].logprob;
                if (ev[k].lp != NULL) {
                    for (int j = 0; j < TOPK && j < ev[k].lp->k; j++) {
                        r->top[r->n][j] = ev[k].lp->top[j].id;
                        r->top_lp[r->n][j] = ev[k].lp->top[j].logprob;
                    }
                }
                r->n++;
            } else if (ev[k].req_id == id && ev[k].type != MOE_EV_TOKEN
                       && ev[k].type != MOE_EV_PROMPT)
            {
                r->finished = 1;
            }
            moe_event_release(&ev[k]);
        }
    }
    return r->n == NGEN ? 0 : -1;
}


static int
same_res(const res_t *a, const res_t *b, int with_lp)
{
    int  i, j;

    if (memcmp(a->toks, b->toks, sizeof(a->toks)) != 0) {
        return 0;
    }
    for (i = 0; with_lp && i < NGEN; i++) {
        if (fabsf(a->lp[i] - b->lp[i]) > 1e-5f) return 0;
        for (j = 0; j < TOPK; j++) {
            if (a->top[i][j] != b->top[i][j]
                || fabsf(a->top_lp[i][j] - b->top_lp[i][j]) > 1e-5f)
            {
                return 0;
            }
        }
    }
    return 1;
}


static void
test_engine(void)
{
    moe_engine_t   *e, *h;
    moe_sampling_t  sp;
    moe_stats_t     se, sh;
    res_t           base, a, b;
    int32_t         prompt[6] = { 1, 20, 33, 47, 52, 60 }, bid[2];
    float           bval[2];
    int             ok, i, all;

    e = make_engine(1);
    setenv("MOE_CPU_LOGIT_BIAS", "0", 1);
    h = make_engine(1);
    unsetenv("MOE_CPU_LOGIT_BIAS");
    if (e == NULL || h == NULL) {
        TAP_OK(0, "engines start");
        moe_engine_destroy(e);
        moe_engine_destroy(h);
        return;
    }

    moe_sampling_defaults(&sp);
    sp.temperature = 0.0f;
    sp.max_tokens = NGEN;
    sp.ignore_eos = 1;
    ok = run(e, 1, prompt, 6, &sp, &base) == 0;

    /* -100 on the greedy first token */
    bid[0] = base.toks[0];
    bval[0] = -100.0f;
    sp.logit_bias_ids = bid;
    sp.logit_bias = bval;
    sp.n_logit_bias = 1;
    sp.logprobs = 1;
    sp.top_logprobs = TOPK;
    ok = ok && run(e, 2, prompt, 6, &sp, &a) == 0
         && run(h, 3, prompt, 6, &sp, &b) == 0;
    TAP_OK(ok && a.toks[0] != base.toks[0] && same_res(&a, &b, 1),
           "greedy, -100 on the greedy token %d: first token %d, the "
           "host sampler's tokens and logprobs", base.toks[0], a.toks[0]);

    /* +100 forces a token the model would not pick */
    bid[0] = (base.toks[0] + 5) % 256;
    bval[0] = 100.0f;
    sp.logprobs = 0;
    sp.top_logprobs = 0;
    ok = run(e, 4, prompt, 6, &sp, &a) == 0
         && run(h, 5, prompt, 6, &sp, &b) == 0;
    all = ok;
    for (i = 0; i < NGEN; i++) all &= a.toks[i] == bid[0];
    TAP_OK(all && same_res(&a, &b, 0),
           "greedy, +100 on token %d: every token is it, on both paths",
           bid[0]);

    moe_engine_stats(e, &se);
    moe_engine_stats(h, &sh);
    TAP_OK(se.host_sampled_tokens == 0 && sh.host_sampled_tokens == 2 * NGEN,
           "greedy with logit_bias: no token drawn by the host sampler "
           "(%lld; host-bias engine %lld)",
           (long long) se.host_sampled_tokens,
           (long long) sh.host_sampled_tokens);

    /* seeded sampled, a penalty, two biases, logprobs */
    moe_sampling_defaults(&sp);
    sp.temperature = 0.9f;
    sp.top_p = 0.9f;
    sp.presence_penalty = 0.5f;
    sp.seed = 7;
    sp.has_seed = 1;
    sp.max_tokens = NGEN;
    sp.ignore_eos = 1;
    sp.logprobs = 1;
    sp.top_logprobs = TOPK;
    bid[0] = base.toks[1];
    bval[0] = -5.0f;
    bid[1] = (base.toks[1] + 11) % 256;
    bval[1] = 4.0f;
    sp.logit_bias_ids = bid;
    sp.logit_bias = bval;
    sp.n_logit_bias = 2;
    ok = run(e, 6, prompt, 6, &sp, &a) == 0
         && run(h, 7, prompt, 6, &sp, &b) == 0;
    TAP_OK(ok && same_res(&a, &b, 1),
           "seeded sampled with logit_bias: the backend's tokens and "
           "logprobs == the host sampler's");
    moe_engine_stats(e, &se);
    moe_engine_stats(h, &sh);
    TAP_OK(se.host_sampled_tokens == 0 && se.backend_sampled_tokens == NGEN
           && sh.backend_sampled_tokens == 0,
           "sampled: drawn by the backend (%lld), none by the host sampler "
           "(%lld)", (long long) se.backend_sampled_tokens,
           (long long) se.host_sampled_tokens);

    /* tensor parallel (2 CPU ranks): the wrapper takes rank 0's flag, the
     * bias rides with rank 0's rows */
    moe_engine_destroy(h);
    h = make_engine(2);
    sp.logprobs = 0;            /* the wrapper leaves logprobs to the host */
    sp.top_logprobs = 0;
    memset(&sh, 0, sizeof(sh));
    ok = h != NULL && run(e, 8, prompt, 6, &sp, &a) == 0
         && run(h, 9, prompt, 6, &sp, &b) == 0;
    if (h != NULL) moe_engine_stats(h, &sh);
    TAP_OK(ok && same_res(&a, &b, 0) && sh.host_sampled_tokens == 0
           && sh.backend_sampled_tokens == NGEN,
           "tensor_parallel_size 2: the same seeded biased stream, drawn "
           "by the backend (%lld), none by the host (%lld)",
           (long long) sh.backend_sampled_tokens,
           (long long) sh.host_sampled_tokens);

    moe_engine_destroy(h);
    moe_engine_destroy(e);
}


int
main(int argc, char **argv)
{
    int  i;

    (void) argc;
    if (getenv("MOE_SRCDIR")) {
        snprintf(srcdir, sizeof(srcdir), "%s", getenv("MOE_SRCDIR"));
    } else if (realpath(argv[0], srcdir) != NULL) {
        for (i = 0; i < 3; i++) {       /* build/t/logit_bias -> root */
            char *slash = strrchr(srcdir, '/');
            if (slash) *slash = '\0';
        }
    }
    TAP_PLAN(13);
    test_backend();
    test_engine();
    return TAP_DONE();
}
