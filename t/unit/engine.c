/*
 * Checks the engine end to end without nginx, on the tiny default model:
 * continuous batching gives every request exactly the tokens it gets when
 * run alone (greedy), also when the KV cache is so small that sequences are
 * preempted and recomputed, or swapped out to host memory (swap_space:
 * large enough, only swaps and no recompute; small, a mix of both) and
 * resumed; afterwards every KV block and swap slot is free; max_tokens is
 * honoured; a cancel frees the KV blocks; same seed gives the same sample;
 * bad submissions are refused.  Greedy requests take the backend's argmax
 * (token_out): their tokens equal moe_sample()'s greedy pick over CPU
 * backend logits run by hand, and equal the engine's own host-sampling
 * path (logprobs on, with MOE_CPU_LOGPROBS_TOKENS=0, forces logits +
 * moe_sample()).  Non-greedy requests
 * drawn by the backend (moe_seq_batch_t.sample) give the same seeded
 * streams as the engine's host sampler, penalties included.
 *
 * Batch invariance: a request's tokens do not depend on what shares its
 * steps: 12 requests in lockstep (checked by the step count), joining a
 * running batch one step apart in either order (each prefilled beside
 * others decoding), beside a long prompt prefilled in other chunks, with
 * 2 threads splitting each step, and a seeded request amid differently
 * sampled ones.  Every composition is forced with moe_engine_hold(), never
 * left to thread timing, so the outcome is the same on an idle machine,
 * pinned to one busy core (t/engine_load.t) or anywhere between.
 *
 * Events: the eventfd stays readable while events wait (one event per
 * drain), and events that waited in the engine's overflow queue (a tiny
 * ring) all arrive.  Each group of requests has fresh ids: a subtest that
 * fails (time-out) cancels its requests and cannot spill into the next.
 */

#include <limits.h>
#include <poll.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "moe.h"
#include "backends/backend.h"
#include "sampling/sampling.h"
#include "tap.h"
#include "tiny_engine.h"
#include "text/tokenizer.h"

/* one logit_bias entry for the tests (moe_sampling_t points at it) */
static int32_t lb_id[1];
static float   lb_val[1];

#define NREQ  12
#define MAXT  40

/* A hang guard, not a speed limit: outputs never depend on timing, so a
 * busy machine only has to deliver the events eventually.  Compile with
 * -DEVENT_TIMEOUT_MS=1 to see that a time-out fails its subtest cleanly. */
#ifndef EVENT_TIMEOUT_MS
#define EVENT_TIMEOUT_MS  30000
#endif

typedef struct {
    int32_t  toks[MAXT];
    int      n;
    int      finished;
    int      reason;
    int      n_gen;
    int      n_cached;
} result_t;


/*
 * One group of requests on an engine: slot i is request id base + i.  Every
 * group takes fresh ids (next_id), so late events of a group that failed
 * (time-out) are told apart and never written into another group's
 * results.
 */
typedef struct {
    moe_engine_t  *e;
    uint64_t       base;
    int            count;
    int            live;
    result_t      *res;
} group_t;


static const char *prompts[NREQ] = {
    "Hello", "The quick brown fox", "In the beginning", "1 2 3 4 5",
    "GNU General Public License", "you may not use this file",
    "a", "Once upon a time there was", "def main():\n    return 0",
    "zzz", "What is the meaning of", "copyright notice"
};


static char      srcdir[PATH_MAX];
static uint64_t  next_id = 1;


static void
group_init(group_t *g, moe_engine_t *e, int count, result_t *res)
{
    g->e = e;
    g->base = next_id;
    g->count = count;
    g->live = 0;
    g->res = res;
    next_id += (uint64_t) count;
    memset(res, 0, sizeof(*res) * (size_t) count);
}


static int
group_submit(group_t *g, int slot, const int32_t *ids, int n,
    const moe_sampling_t *sp)
{
    if (moe_engine_submit(g->e, g->base + (uint64_t) slot, ids, n, sp)
        != MOE_OK)
    {
        TAP_DIAG("submit of slot %d refused", slot);
        return -1;
    }
    g->live++;
    return 0;
}


/*
 * Take the waiting events: one poll, then one drain per wake-up (the
 * eventfd stays readable while events wait).  Events of older groups are
 * skipped; one with an id nobody submitted fails the group.  0, or -1 on
 * a time-out or a stray id.
 */
static int
group_pump(group_t *g)
{
    size_t         k, n;
    moe_event_t    ev[128];
    struct pollfd  pfd = { moe_engine_eventfd(g->e), POLLIN, 0 };

    if (poll(&pfd, 1, EVENT_TIMEOUT_MS) == 0) {
        TAP_DIAG("timed out waiting for events (%d of %d requests live)",
                 g->live, g->count);
        return -1;
    }
    n = moe_engine_drain(g->e, ev, 128);
    for (k = 0; k < n; k++) {
        result_t  *r;

        if (ev[k].req_id < g->base) {
            continue;   /* a request of an abandoned group */
        }
        if (ev[k].req_id >= g->base + (uint64_t) g->count) {
            TAP_DIAG("event for request %llu, never submitted",
                     (unsigned long long) ev[k].req_id);
            return -1;
        }
        r = &g->res[ev[k].req_id - g->base];
        if (ev[k].type == MOE_EV_TOKEN) {
            if (r->n < MAXT) {
                r->toks[r->n] = ev[k].token;
            }
            r->n++;
        } else {
            r->finished++;
            r->reason = ev[k].type == MOE_EV_FINISH ? ev[k].finish_reason
                                                    : -1;
            r->n_gen = ev[k].n_generated;
            r->n_cached = ev[k].n_cached;
            g->live--;
        }
    }
    return 0;
}


/* Pump until slot has at least ntok tokens or has finished. */
static int
group_wait_tokens(group_t *g, int slot, int ntok)
{
    while (g->res[slot].n < ntok && !g->res[slot].finished) {
        if (group_pump(g) != 0) {
            return -1;
        }
    }
    return 0;
}


/*
 * Pump until every submitted request finished.  On failure the rest are
 * cancelled and their events taken for a while, and the engine released,
 * so that the next subtest starts on an engine with nothing left running.
 */
static int
group_finish(group_t *g)
{
    int  i, rc = 0, tries;

    while (g->live > 0) {
        if (group_pump(g) != 0) {
            rc = -1;
            break;
        }
    }
    if (rc != 0) {
        moe_engine_hold(g->e, -1);
        for (i = 0; i < g->count; i++) {
            if (!g->res[i].finished) {
                moe_engine_cancel(g->e, g->base + (uint64_t) i);
            }
        }
        for (tries = 0; g->live > 0 && tries < 3; tries++) {
            (void) group_pump(g);
        }
    }
    return rc;
}


/*
 * Wait for the step that sent the last events to end (the engine parks
 * after it), so that the stats read next are those after it.
 */
static void
settle(moe_engine_t *e)
{
    moe_engine_hold(e, 0);
    moe_engine_hold(e, -1);
}


/*
 * Requests first .. first+count-1 with the same sampling, submitted while
 * the engine is held so that it reads all of them at once (they are
 * admitted together, as far as the step budget and KV cache allow), then
 * run to the end.  res is indexed like ids.  0 or -1.
 */
static int
run(moe_engine_t *e, const int *ids_n, int32_t ids[][256], int first,
    int count, const moe_sampling_t *sp, result_t *res)
{
    int      i, rc = 0;
    group_t  g;

    group_init(&g, e, count, res + first);
    moe_engine_hold(e, 0);
    for (i = 0; i < count && rc == 0; i++) {
        rc = group_submit(&g, i, ids[first + i], ids_n[first + i], sp);
    }
    moe_engine_hold(e, -1);
    return group_finish(&g) != 0 ? -1 : rc;
}


/* 1 when a[i] and b[i] hold the same tokens for i < n; else 0 and the
 * first difference in a diagnostic */
static int
same_tokens(const char *what, const result_t *a, const result_t *b, int n)
{
    int  i, j;

    for (i = 0; i < n; i++) {
        if (a[i].n != b[i].n
            || memcmp(a[i].toks, b[i].toks, sizeof(int32_t)
                      * (size_t) (a[i].n < MAXT ? a[i].n : MAXT)) != 0)
        {
            for (j = 0; j < a[i].n && j < b[i].n && j < MAXT
                        && a[i].toks[j] == b[i].toks[j]; j++)
            {
                /* first difference */
            }
            TAP_DIAG("%s: request %d differs at token %d (%d and %d "
                     "tokens)", what, i, j, a[i].n, b[i].n);
            return 0;
        }
    }
    return 1;
}


/*
 * Greedy reference outside the engine: prefill prompt ids on a fresh CPU
 * backend, then decode, each token moe_sample() (temperature 0) over the
 * logits restricted to the tokenizer's ids, as the engine's host path.
 * n_gen tokens into out; 0 or -1.
 */
static int
greedy_ref(const int32_t *ids, int n_ids, int n_vocab_tok, int n_gen,
    int32_t *out)
{
    char             err[512], dir[PATH_MAX + 64];
    moe_model_t     *m = NULL;
    moe_backend_t   *b = NULL;
    moe_sampler_t    smp;
    moe_sampling_t   sp;
    moe_seq_batch_t  sb;
    moe_rng_t        rng;
    int32_t          toks[256], table[16];
    float           *logits = NULL, lp;
    int              i, n = n_ids, rc = -1, V, have_smp = 0;

    snprintf(dir, sizeof(dir), "%s/models/localmoe-tiny", srcdir);
    if (moe_model_load(dir, 0, &m, err, sizeof(err)) != MOE_OK
        || moe_cpu_backend_create(m, 16, 16, 1, &b, err, sizeof(err))
           != MOE_OK)
    {
        TAP_DIAG("reference: %s", err);
        goto done;
    }
    V = moe_model_hparams(m)->vocab_size;
    if (n_vocab_tok <= 0 || n_vocab_tok > V) {
        n_vocab_tok = V;
    }
    logits = malloc(sizeof(float) * (size_t) V);
    if (logits == NULL || moe_sampler_init(&smp, n_vocab_tok) != MOE_OK
        || n_ids + n_gen > 256)
    {
        goto done;
    }
    have_smp = 1;
    moe_sampling_defaults(&sp);
    sp.temperature = 0.0f;
    moe_rng_seed(&rng, 1);
    memcpy(toks, ids, sizeof(int32_t) * (size_t) n_ids);
    for (i = 0; i < 16; i++) {
        table[i] = i;
    }
    for (i = 0; i < n_gen; i++) {
        memset(&sb, 0, sizeof(sb));
        sb.tokens = i == 0 ? toks : toks + n - 1;
        sb.n_tokens = i == 0 ? n : 1;
        sb.pos = i == 0 ? 0 : n - 1;
        sb.block_table = table;
        sb.n_blocks = 16;
        sb.logits = logits;
        if (b->forward(b, &sb, 1) != MOE_OK) {
            goto done;
        }
        out[i] = moe_sample(&smp, logits, &sp, NULL, NULL, &rng, &lp);
        toks[n++] = out[i];
    }
    rc = 0;

done:
    if (have_smp) {
        moe_sampler_destroy(&smp);
    }
    free(logits);
    if (b != NULL) {
        b->destroy(b);
    }
    moe_model_free(m);
    return rc;
}


static moe_engine_t *
make_engine_with(int kv_blocks, int max_seqs, double swap_gib, int threads,
    int ring_size, int prefix_cache)
{
    moe_config_t cfg;

    tu_tiny_config(&cfg, srcdir);
    cfg.kv_cache_blocks = kv_blocks;
    cfg.max_num_seqs = max_seqs;
    cfg.max_num_batched_tokens = 64;
    cfg.cpu_threads = threads;
    cfg.swap_space = swap_gib;
    cfg.enable_prefix_caching = prefix_cache;
    /* these tests force each step's composition with moe_engine_hold()
     * (a prompt joins in exactly one step); stall-free batching would
     * size prefill chunks from measured step times, so it is off here and
     * tested with a pinned cost model in t/unit/stallfree.c */
    cfg.prefill_step_ratio = 0;
    if (ring_size > 0) {
        cfg.ring_size = ring_size;
    }
    return tu_engine(&cfg);
}


static moe_engine_t *
make_engine(int kv_blocks, int max_seqs, double swap_gib)
{
    return make_engine_with(kv_blocks, max_seqs, swap_gib, 1, 0, 1);
}


/* Wait (bounded) until the engine has finished `finished` requests since
 * it started and has nothing left to run. */
static int
wait_idle(moe_engine_t *e, int64_t finished)
{
    moe_stats_t  st;
    int          i;

    for (i = 0; i < EVENT_TIMEOUT_MS; i++) {
        moe_engine_stats(e, &st);
        if (st.requests_finished >= finished
            && st.seqs_running == 0 && st.seqs_waiting == 0)
        {
            settle(e);
            return 0;
        }
        usleep(1000);
    }
    TAP_DIAG("engine still busy");
    return -1;
}


int
main(int argc, char **argv)
{
    int              i, ok, ids_n[NREQ], n_tok;
    int32_t          ids[NREQ][256], *p;
    size_t           n;
    moe_engine_t    *e;
    moe_sampling_t   sp;
    moe_stats_t      st;
    result_t         solo[NREQ], batch[NREQ], small[NREQ], r2[2];
    char            *slash;
    group_t          g;
    int64_t          steps0;

    (void) argc;
    if (getenv("MOE_SRCDIR")) {
        snprintf(srcdir, sizeof(srcdir), "%s", getenv("MOE_SRCDIR"));
    } else if (realpath(argv[0], srcdir) != NULL) {
        /* build/t/engine -> repo root */
        for (i = 0; i < 3 && (slash = strrchr(srcdir, '/')); i++) {
            *slash = '\0';
        }
    }

    TAP_PLAN(35);

    /* logprobs force the engine's host path here, as this test means (the
     * CPU backend would otherwise compute them beside its own argmax or
     * draw: t/logprobs.t checks that path against this one) */
    setenv("MOE_CPU_LOGPROBS_TOKENS", "0", 1);

    e = make_engine(0, 16, 0);
    if (e == NULL) {
        TAP_OK(0, "engine starts on models/localmoe-tiny");
        return 1;
    }
    TAP_OK(1, "engine starts on models/localmoe-tiny");

    n_tok = 0;
    for (i = 0; i < NREQ; i++) {
        moe_tokenizer_encode(moe_engine_tokenizer(e), prompts[i],
                             strlen(prompts[i]), 1, &p, &n);
        ids_n[i] = (int) n;
        n_tok += (int) n;
        memcpy(ids[i], p, n * sizeof(int32_t));
        free(p);
    }

    moe_sampling_defaults(&sp);
    sp.temperature = 0.0f;
    sp.max_tokens = 24;
    sp.ignore_eos = 1;

    ok = 1;
    for (i = 0; i < NREQ; i++) {
        ok &= run(e, ids_n, ids, i, 1, &sp, solo) == 0;
    }
    TAP_OK(ok && solo[0].n == 24 && solo[0].reason == MOE_FINISH_LENGTH
           && solo[0].n_gen == 24,
           "one at a time: max_tokens 24 gives 24 tokens, reason length");

    /* the engine's greedy tokens (backend argmax) == moe_sample() over
     * CPU logits, and == the engine's host path (logprobs forces it) */
    {
        int32_t  ref[24];
        int      nv = moe_tokenizer_vocab_size(moe_engine_tokenizer(e));

        ok = 1;
        for (i = 0; i < 4 && ok; i++) {
            ok = solo[i].n == 24
                 && greedy_ref(ids[i], ids_n[i], nv, 24, ref) == 0
                 && memcmp(ref, solo[i].toks, sizeof(ref)) == 0;
            if (!ok) {
                TAP_DIAG("prompt %d differs from the moe_sample reference",
                         i);
            }
        }
        TAP_OK(ok, "greedy tokens of 4 prompts == moe_sample over CPU "
               "backend logits");

        sp.logprobs = 1;
        ok = run(e, ids_n, ids, 0, 4, &sp, batch) == 0
             && same_tokens("logprobs", batch, solo, 4);
        sp.logprobs = 0;
        TAP_OK(ok, "greedy with logprobs (host sampling) == without "
               "(backend argmax), 4 prompts batched");
    }

    /* logit_bias takes the host sampler, greedy included: -100 on the
     * greedy first token changes it, +100 on a token forces it at every
     * step; a bad id or value is refused */
    {
        moe_sampling_t  bsp = sp;
        int32_t         banned = solo[0].toks[0], forced;
        int             nv = moe_tokenizer_vocab_size(moe_engine_tokenizer(e));

        bsp.n_logit_bias = 1;
        bsp.logit_bias_ids = lb_id;
        bsp.logit_bias = lb_val;
        lb_id[0] = banned;
        lb_val[0] = -100.0f;
        ok = run(e, ids_n, ids, 0, 1, &bsp, batch) == 0
             && batch[0].n == 24 && batch[0].toks[0] != banned;
        for (i = 0; ok && i < batch[0].n; i++) {
            ok = batch[0].toks[i] != banned;
        }
        TAP_OK(ok, "logit_bias -100 bans the greedy token %d", banned);

        forced = (banned + nv / 2) % nv;
        lb_id[0] = forced;
        lb_val[0] = 100.0f;
        ok = run(e, ids_n, ids, 0, 1, &bsp, batch) == 0 && batch[0].n == 24;
        for (i = 0; ok && i < batch[0].n; i++) {
            ok = batch[0].toks[i] == forced;
        }
        TAP_OK(ok, "logit_bias +100 forces token %d at every step", forced);

        /* in one batch with plain greedy requests (backend argmax): the
         * biased one is forced, the others keep their solo tokens */
        {
            group_t  g;

            group_init(&g, e, 3, batch);
            moe_engine_hold(e, 0);
            ok = group_submit(&g, 0, ids[1], ids_n[1], &sp) == 0
                 && group_submit(&g, 1, ids[0], ids_n[0], &bsp) == 0
                 && group_submit(&g, 2, ids[2], ids_n[2], &sp) == 0;
            /* the engine copied the bias at submit: the caller's array
             * may change (or be freed) before the sequence runs */
            lb_id[0] = banned;
            lb_val[0] = -3.0f;
            moe_engine_hold(e, -1);
            ok = group_finish(&g) == 0 && ok
                 && same_tokens("batched with a biased one", batch,
                                solo + 1, 1)
                 && same_tokens("batched with a biased one", batch + 2,
                                solo + 2, 1)
                 && batch[1].n == 24;
            for (i = 0; ok && i < batch[1].n; i++) {
                ok = batch[1].toks[i] == forced;
            }
            TAP_OK(ok, "logit_bias in a batch with plain greedy requests: "
                   "forced there (as submitted, though the caller's array "
                   "changed before it ran), the others unchanged");
        }

        lb_id[0] = moe_engine_info(e)->vocab_size;
        ok = moe_engine_submit(e, 999999, ids[0], ids_n[0], &bsp)
             == MOE_EINVAL;
        lb_id[0] = 0;
        lb_val[0] = 101.0f;
        ok &= moe_engine_submit(e, 999999, ids[0], ids_n[0], &bsp)
              == MOE_EINVAL;
        TAP_OK(ok, "logit_bias id out of vocab or value past 100: EINVAL");
    }

    /*
     * Batch invariance: a request's greedy tokens are its solo tokens
     * whatever shares its steps.  Each composition is forced with
     * moe_engine_hold(), not left to thread timing.
     */

    /* all 12 read at once: admitted in the first step (their prompts'
     * blocks are in the prefix cache since the solo runs, so what is left
     * to compute fits the budget of 64), then decoded in lockstep.  A step
     * gives a request at most one token: 24 steps for 24 tokens each means
     * all 12 were in every step. */
    moe_engine_stats(e, &st);
    steps0 = st.steps;
    ok = run(e, ids_n, ids, 0, NREQ, &sp, batch) == 0;
    for (i = 0; i < NREQ; i++) {
        ok &= batch[i].finished == 1;
    }
    ok = ok && same_tokens("12 together", batch, solo, NREQ);
    TAP_OK(ok, "%d requests batched together: identical greedy tokens, "
           "one finish each", NREQ);
    settle(e);
    moe_engine_stats(e, &st);
    TAP_OK(st.steps - steps0 == 24,
           "the 12 requests (%d prompt tokens) shared every step: %lld "
           "steps for 24 tokens each", n_tok,
           (long long) (st.steps - steps0));

    TAP_OK(st.kv_blocks_used == 0 && st.seqs_running == 0,
           "all KV blocks free after the batch (used %lld)",
           (long long) st.kv_blocks_used);

    /* staggered: request i joins after exactly one more step, so it is
     * prefilled beside i decoding sequences (each at another position)
     * and decodes beside others that are prefilling or finished; once in
     * arrival order, once reversed (other neighbours, other steps).  On an
     * engine without prefix caching: every prompt is computed whole in
     * its step, none taken from blocks another composition computed. */
    {
        static const char *what[2] = { "staggered", "staggered, reversed" };
        moe_engine_t      *e0 = e;

        e = make_engine_with(0, 16, 0, 1, 0, 0);
        for (int k = 0; e != NULL && k < 2; k++) {
            group_init(&g, e, NREQ, batch);
            moe_engine_hold(e, 0);
            ok = 1;
            for (i = 0; i < NREQ && ok; i++) {
                int  r = k == 0 ? i : NREQ - 1 - i;

                ok = group_submit(&g, r, ids[r], ids_n[r], &sp) == 0
                     && moe_engine_hold(e, 1) == MOE_OK
                     && group_wait_tokens(&g, r, 1) == 0;
            }
            moe_engine_hold(e, -1);
            ok = group_finish(&g) == 0 && ok;
            for (i = 0; i < NREQ; i++) {
                ok &= batch[i].finished == 1;
            }
            TAP_OK(ok && same_tokens(what[k], batch, solo, NREQ),
                   "%s: 12 requests each joining a running batch one step "
                   "apart: identical greedy tokens", what[k]);
        }
        if (e == NULL) {
            TAP_OK(0, "staggered: engine without prefix caching");
            TAP_OK(0, "staggered, reversed: engine without prefix caching");
        }
        moe_engine_destroy(e);
        e = e0;
    }

    /* cancel after 3 tokens frees the blocks: the engine is held after 3
     * steps, so the cancel lands while both requests run */
    sp.max_tokens = 100;
    group_init(&g, e, 2, r2);
    moe_engine_hold(e, 0);
    ok = group_submit(&g, 0, ids[0], ids_n[0], &sp) == 0
         && group_submit(&g, 1, ids[1], ids_n[1], &sp) == 0;
    moe_engine_hold(e, 3);
    ok = ok && group_wait_tokens(&g, 0, 3) == 0
         && moe_engine_cancel(e, g.base) == MOE_OK;
    moe_engine_hold(e, -1);
    ok = group_finish(&g) == 0 && ok;
    settle(e);
    moe_engine_stats(e, &st);
    TAP_OK(ok && r2[0].reason == MOE_FINISH_CANCELLED && r2[0].n == 3
           && r2[1].reason == MOE_FINISH_LENGTH && r2[1].n == 100
           && st.kv_blocks_used == 0,
           "cancel: reason cancelled after %d tokens (the other ran to "
           "%d), blocks used %lld", r2[0].n, r2[1].n,
           (long long) st.kv_blocks_used);

    /* cancelling the last running sequence must still wake the worker
     * for its FINISH event (a lost wake-up here once hung the caller).
     * The engine is held after the first step, so the cancel reaches a
     * running sequence every time and is read before its next step. */
    {
        int cancelled = 0;

        ok = 1;
        for (i = 0; i < 30 && ok; i++) {
            group_init(&g, e, 1, r2);
            moe_engine_hold(e, 0);
            ok = group_submit(&g, 0, ids[0], ids_n[0], &sp) == 0;
            moe_engine_hold(e, 1);
            ok = ok && group_wait_tokens(&g, 0, 1) == 0
                 && moe_engine_cancel(e, g.base) == MOE_OK;
            moe_engine_hold(e, -1);
            ok = group_finish(&g) == 0 && ok && r2[0].finished == 1;
            cancelled += r2[0].reason == MOE_FINISH_CANCELLED;
        }
        TAP_OK(ok && cancelled == 30, "30 cancels of the only running "
               "sequence: every FINISH arrives (%d cancelled)", cancelled);
    }

    /* prefix caching: the same 14-token prompt again reuses its 3 full
     * blocks of 4 (the block holding the last prompt token is computed)
     * and gives the same greedy tokens */
    {
        static const char *p = "one two three four five six seven";
        int32_t *pp;
        size_t   pn;
        int32_t  pids[1][256];
        int      pn_[1];
        result_t c[2];

        moe_tokenizer_encode(moe_engine_tokenizer(e), p, strlen(p), 1, &pp,
                             &pn);
        memcpy(pids[0], pp, pn * sizeof(int32_t));
        pn_[0] = (int) pn;
        free(pp);
        sp.max_tokens = 8;
        sp.temperature = 0.0f;
        ok = run(e, pn_, pids, 0, 1, &sp, &c[0]) == 0
             && run(e, pn_, pids, 0, 1, &sp, &c[1]) == 0;
        TAP_OK(ok && c[0].n_cached == 0
               && c[1].n_cached == ((int) pn - 1) / 4 * 4,
               "second identical prompt (%d tokens): %d cached tokens "
               "(first %d)", (int) pn, c[1].n_cached, c[0].n_cached);
        TAP_OK(ok && c[0].n == 8 && same_tokens("cached", &c[0], &c[1], 1),
               "cached prefix gives the same greedy tokens");
    }

    /* seeded sampling */
    sp.max_tokens = 20;
    sp.temperature = 1.0f;
    sp.seed = 99;
    sp.has_seed = 1;
    ok = run(e, ids_n, ids, 0, 1, &sp, r2) == 0;
    ok &= run(e, ids_n, ids, 1, 1, &sp, r2) == 0;
    {
        result_t a = r2[0];

        ok &= run(e, ids_n, ids, 0, 1, &sp, r2) == 0;
        TAP_OK(ok && a.n == 20 && same_tokens("seed", &a, &r2[0], 1),
               "same seed and prompt, same sampled tokens");
    }

    /* a seeded request amid 11 others (greedy, other seeds, penalties)
     * read in the same step draws what it draws alone */
    {
        result_t        alone[NREQ], mixed[NREQ];
        moe_sampling_t  other;

        ok = run(e, ids_n, ids, 5, 1, &sp, alone) == 0;
        group_init(&g, e, NREQ, mixed);
        moe_engine_hold(e, 0);
        for (i = 0; i < NREQ && ok; i++) {
            other = sp;
            other.seed = 7 + (uint64_t) i;
            other.temperature = (float) (i % 3) * 0.5f;
            other.repetition_penalty = i % 2 ? 1.2f : 1.0f;
            other.top_k = i % 4 ? 0 : 5;
            ok = group_submit(&g, i, ids[i], ids_n[i], i == 5 ? &sp : &other)
                 == 0;
        }
        moe_engine_hold(e, -1);
        ok = group_finish(&g) == 0 && ok;
        TAP_OK(ok && alone[5].n == 20
               && same_tokens("seeded amid others", &mixed[5], &alone[5], 1),
               "a seeded request amid 11 differently sampled ones: the "
               "tokens it draws alone");
    }

    TAP_OK(moe_engine_submit(e, 1000000, ids[0], 0, &sp) == MOE_EINVAL,
           "empty prompt refused");
    {
        int32_t  bad = 1 << 30;

        TAP_OK(moe_engine_submit(e, 1000001, &bad, 1, &sp) == MOE_EINVAL,
               "token id out of vocab refused");
    }
    {
        static int32_t  longp[200];

        TAP_OK(moe_engine_submit(e, 1000002, longp, 200, &sp)
               == MOE_ETOOLONG, "prompt over max_model_len refused");
    }

    /* a prompt too long for one step's budget of 64 tokens, never seen
     * before (nothing cached), joining 12 decoding sequences: prefilled
     * in the budget they leave (52 tokens), then the rest beside them;
     * its tokens are those of the reference run by hand (the whole prompt
     * in one forward call), the others' their solo tokens */
    {
        int32_t   lids[1][256], ref[24];
        int       ln[1] = { 90 };
        result_t  lalone[1], lmix[NREQ + 1];
        int       nv = moe_tokenizer_vocab_size(moe_engine_tokenizer(e));

        for (i = 0; i < ln[0]; i++) {
            lids[0][i] = ids[i % NREQ][i % ids_n[i % NREQ]];
        }
        sp.temperature = 0.0f;
        sp.has_seed = 0;
        sp.max_tokens = 24;
        memset(lalone, 0, sizeof(lalone));
        ok = greedy_ref(lids[0], ln[0], nv, 24, ref) == 0;
        memcpy(lalone[0].toks, ref, sizeof(ref));
        lalone[0].n = 24;

        group_init(&g, e, NREQ + 1, lmix);
        moe_engine_hold(e, 0);
        for (i = 0; i < NREQ && ok; i++) {
            ok = group_submit(&g, i, ids[i], ids_n[i], &sp) == 0;
        }
        ok = ok && moe_engine_hold(e, 1) == MOE_OK
             && group_wait_tokens(&g, 0, 1) == 0
             && group_submit(&g, NREQ, lids[0], ln[0], &sp) == 0;
        moe_engine_hold(e, -1);
        ok = group_finish(&g) == 0 && ok;
        TAP_OK(ok && lalone[0].n == 24
               && same_tokens("chunked beside decodes", &lmix[NREQ],
                              &lalone[0], 1)
               && same_tokens("beside a chunked prefill", lmix, solo, NREQ),
               "a 90-token prompt prefilled in chunks beside 12 decoding "
               "sequences: its greedy tokens == one whole prefill by hand, "
               "the others' unchanged");
    }

    /* the eventfd stays readable while events wait: 12 x 24 tokens + 12
     * finishes taken one per drain, with no new event after the first
     * (the engine is idle) */
    {
        struct pollfd  pfd = { moe_engine_eventfd(e), POLLIN, 0 };
        moe_event_t    ev;
        int            got = 0, readable = 1;

        moe_engine_stats(e, &st);
        group_init(&g, e, NREQ, batch);
        moe_engine_hold(e, 0);
        for (i = 0; i < NREQ; i++) {
            (void) group_submit(&g, i, ids[i], ids_n[i], &sp);
        }
        moe_engine_hold(e, -1);
        ok = wait_idle(e, st.requests_finished + NREQ) == 0;
        while (ok && readable && got < NREQ * 25) {
            readable = poll(&pfd, 1, 0) == 1;
            if (readable && moe_engine_drain(e, &ev, 1) == 1) {
                got++;
            }
        }
        TAP_OK(ok && got == NREQ * 25 && poll(&pfd, 1, 0) == 0,
               "one event per drain: the eventfd stays readable until the "
               "last of %d events is taken (%d taken)", NREQ * 25, got);
    }
    moe_engine_destroy(e);

    /* events that wait in the engine's overflow queue (an event ring of
     * 64 for 300 events, drained only after the engine finished) all
     * arrive, each batch moved into the ring with its own wake-up */
    e = make_engine_with(0, 16, 0, 1, 16, 1);
    {
        ok = e != NULL;
        if (ok) {
            group_init(&g, e, NREQ, batch);
            moe_engine_hold(e, 0);
            for (i = 0; i < NREQ; i++) {
                (void) group_submit(&g, i, ids[i], ids_n[i], &sp);
            }
            moe_engine_hold(e, -1);
            ok = wait_idle(e, NREQ) == 0 && group_finish(&g) == 0
                 && same_tokens("overflow", batch, solo, NREQ);
        }
        TAP_OK(ok, "event ring of 64 for 300 events: all arrive, tokens "
               "unchanged");
        moe_engine_destroy(e);
    }

    /* the staggered batch again with 2 threads splitting every step */
    setenv("MOE_CPU_MIN_PAR_WORK", "1", 1);
    e = make_engine_with(0, 16, 0, 2, 0, 0);
    unsetenv("MOE_CPU_MIN_PAR_WORK");
    ok = e != NULL;
    if (ok) {
        group_init(&g, e, NREQ, batch);
        moe_engine_hold(e, 0);
        for (i = 0; i < NREQ && ok; i++) {
            ok = group_submit(&g, i, ids[i], ids_n[i], &sp) == 0
                 && moe_engine_hold(e, 1) == MOE_OK
                 && group_wait_tokens(&g, i, 1) == 0;
        }
        moe_engine_hold(e, -1);
        ok = group_finish(&g) == 0 && ok
             && same_tokens("2 threads", batch, solo, NREQ);
    }
    TAP_OK(ok, "2 threads, 12 requests joining one step apart: the greedy "
           "tokens of 1 thread alone");
    moe_engine_destroy(e);

    /* a KV cache of 40 blocks (160 tokens) for 12 sequences of up to ~35
     * tokens: preemption by recompute must not change any output */
    e = make_engine(40, 16, 0);
    memset(&st, 0, sizeof(st));
    sp.temperature = 0.0f;
    sp.has_seed = 0;
    sp.max_tokens = 24;
    ok = e != NULL && run(e, ids_n, ids, 0, NREQ, &sp, small) == 0;
    for (i = 0; ok && i < NREQ; i++) {
        ok &= small[i].finished == 1;
    }
    ok = ok && same_tokens("small KV cache", small, solo, NREQ);
    if (e != NULL) {
        settle(e);
        moe_engine_stats(e, &st);
    }
    TAP_OK(ok && st.preemptions > 0 && st.swap_outs == 0,
           "small KV cache: %lld preemptions, outputs unchanged",
           (long long) st.preemptions);
    moe_engine_destroy(e);

    /* the same with swap space: a block of the tiny model is 2 layers x
     * K,V x 4 tokens x 2 heads x 16 dims fp32 = 2 KiB.  ~1 MiB holds every
     * sequence (only swaps); 10 slots hold one sequence at a time (swaps
     * and recomputes).  Swapped sequences resume with their K/V, so the
     * outputs must still be the solo ones. */
    {
        static const double  gib[2] = { 1.0 / 1024,
                                         10.0 * 2048 / 1073741824.0 };
        static const char   *what[2] = { "large", "small" };
        int                  k;

        for (k = 0; k < 2; k++) {
            memset(&st, 0, sizeof(st));
            e = make_engine(40, 16, gib[k]);
            ok = e != NULL && run(e, ids_n, ids, 0, NREQ, &sp, small) == 0;
            for (i = 0; ok && i < NREQ; i++) {
                ok &= small[i].finished == 1;
            }
            ok = ok && same_tokens(what[k], small, solo, NREQ);
            if (e != NULL) {
                settle(e);
                moe_engine_stats(e, &st);
            }
            TAP_DIAG("swap space %s (%lld slots): %lld swaps out, %lld in, "
                     "%lld blocks, %lld recompute preemptions", what[k],
                     (long long) st.swap_slots_total,
                     (long long) st.swap_outs, (long long) st.swap_ins,
                     (long long) st.swap_blocks_out,
                     (long long) st.preemptions);
            TAP_OK(ok && st.swap_outs > 0 && st.swap_ins == st.swap_outs
                   && (k == 0 ? st.preemptions == 0 : st.preemptions > 0),
                   "small KV cache, %s swap space: %lld swaps, %lld "
                   "recomputes, outputs unchanged", what[k],
                   (long long) st.swap_outs, (long long) st.preemptions);
            TAP_OK(e != NULL && st.kv_blocks_used == 0
                   && st.swap_slots_used == 0 && st.seqs_swapped == 0
                   && st.seqs_running == 0 && st.seqs_waiting == 0,
                   "%s swap space: all KV blocks (%lld used) and swap slots "
                   "(%lld used) free at the end", what[k],
                   (long long) st.kv_blocks_used,
                   (long long) st.swap_slots_used);
            moe_engine_destroy(e);
        }
    }

    /* load_format dummy makes random weights on the GPU only */
    {
        char          err[512] = "";
        moe_config_t  cfg;
        moe_engine_t *d = NULL;

        moe_config_defaults(&cfg);
        snprintf(cfg.model_path, sizeof(cfg.model_path),
                 "%.900s/models/localmoe-tiny", srcdir);
        snprintf(cfg.backend, sizeof(cfg.backend), "cpu");
        snprintf(cfg.load_format, sizeof(cfg.load_format), "dummy");
        TAP_OK(moe_engine_create(&cfg, &d, err, sizeof(err))
               == MOE_EUNSUPPORTED && strstr(err, "cuda") != NULL,
               "load_format dummy on the cpu backend is refused (%s)", err);
        moe_engine_destroy(d);
    }

    /* sampling in the backend (moe_seq_batch_t.sample, what the GPU
     * does) against the engine's host sampler over copied logits
     * (MOE_CPU_SAMPLE_TOKENS=0): the same seeded streams for 12
     * concurrent requests, with truncation and with every penalty (the
     * backend gets the sequences' penalty lists), and the backend really
     * drew them (backend_sampled_tokens) */
    {
        static const char *what[3] = {
            "temperature 0.9, top-k 20, top-p 0.9, min-p 0.02",
            "temperature 0.8, repetition 1.3, frequency 0.5, presence 0.3",
            "greedy with repetition penalty 1.5 and presence 0.4"
        };
        result_t  ra[NREQ], rb[NREQ];
        int64_t   na = -1, nb = -1, gen;

        for (int k = 0; k < 3; k++) {
            moe_sampling_defaults(&sp);
            sp.max_tokens = 24;
            sp.seed = 1234 + (uint64_t) k;
            sp.has_seed = 1;
            if (k == 0) {
                sp.temperature = 0.9f;
                sp.top_k = 20;
                sp.top_p = 0.9f;
                sp.min_p = 0.02f;
            } else if (k == 1) {
                sp.temperature = 0.8f;
                sp.repetition_penalty = 1.3f;
                sp.frequency_penalty = 0.5f;
                sp.presence_penalty = 0.3f;
            } else {
                sp.temperature = 0.0f;
                sp.repetition_penalty = 1.5f;
                sp.presence_penalty = 0.4f;
            }
            for (int pass = 0; pass < 2; pass++) {
                result_t *r = pass == 0 ? ra : rb;

                if (pass == 1) {
                    setenv("MOE_CPU_SAMPLE_TOKENS", "0", 1);
                }
                e = make_engine(0, 16, 0);
                unsetenv("MOE_CPU_SAMPLE_TOKENS");
                ok = e != NULL && run(e, ids_n, ids, 0, NREQ, &sp, r) == 0;
                if (e != NULL) {
                    settle(e);
                    moe_engine_stats(e, &st);
                    *(pass == 0 ? &na : &nb) = st.backend_sampled_tokens;
                    moe_engine_destroy(e);
                }
                if (!ok) {
                    break;
                }
            }
            gen = 0;
            for (i = 0; i < NREQ; i++) {
                ok &= ra[i].finished == 1 && rb[i].finished == 1;
                gen += ra[i].n_gen;
            }
            ok = ok && same_tokens(what[k], ra, rb, NREQ);
            TAP_OK(ok && na == gen && nb == 0, "%s: tokens drawn by the "
                   "backend (%lld of %lld) equal the host sampler's, 12 "
                   "concurrent seeded requests", what[k], (long long) na,
                   (long long) gen);
        }
    }

    return TAP_DONE();
}
