/*
 * Several choices per request (sampling.n_choices, issue 10 item 5), CPU
 * backend, without nginx:
 *  - n = 2 greedy: two choices (event index 0 and 1), each a FINISH of
 *    its own, both equal to the request run alone;
 *  - seeded sampling, n = 3 with seed S: choice i equals the request run
 *    alone with seed S + i (each choice its own stream);
 *  - the choices share the prompt's KV blocks: held after the step that
 *    prefills a 10-token prompt (block size 4: 2 full blocks + a partial
 *    one), n = 4 uses 3 + 3 x 1 blocks (the partial block copied for each
 *    choice), not 4 x 3; the copy leaves the parent's block intact (its
 *    tokens equal the solo run's, greedy), with and without swap space
 *    (without it the children recompute the tail);
 *  - a cancel ends every choice (a FINISH CANCELLED per index), a cancel
 *    of one choice only that one, and every block is free afterwards;
 *    the finished-request counter counts the request once;
 *  - n_choices over max_num_seqs or MOE_MAX_CHOICES is refused.
 */

#include <limits.h>
#include <poll.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "moe.h"
#include "tap.h"
#include "tiny_engine.h"

#define MAXC  8
#define MAXT  16

typedef struct {
    int32_t  toks[MAXC][MAXT];
    int      n[MAXC];
    int      fin[MAXC];
    int      reason[MAXC];
    int      n_gen[MAXC];
    int      n_fin, n_bad;
} res_t;

static char  srcdir[PATH_MAX];


static moe_engine_t *
make_engine(double swap_gib, int max_seqs)
{
    moe_config_t cfg;

    tu_tiny_config(&cfg, srcdir);
    cfg.max_num_seqs = max_seqs;
    cfg.swap_space = swap_gib;
    cfg.enable_prefix_caching = 0;
    return tu_engine(&cfg);
}


/* events of request id until `want` choices have ended (0 or -1) */
static int
pump(moe_engine_t *e, uint64_t id, res_t *r, int want, int ntok_stop,
    int stop_choice)
{
    moe_event_t    ev[64];
    size_t         n, k;
    struct pollfd  pfd = { moe_engine_eventfd(e), POLLIN, 0 };

    while (r->n_fin < want) {
        if (ntok_stop > 0 && r->n[stop_choice] >= ntok_stop) {
            return 0;
        }
        if (poll(&pfd, 1, 30000) == 0) {
            TAP_DIAG("timed out");
            return -1;
        }
        n = moe_engine_drain(e, ev, 64);
        for (k = 0; k < n; k++) {
            int c = ev[k].index;

            moe_event_release(&ev[k]);
            if (ev[k].req_id != id) {
                continue;
            }
            if (c < 0 || c >= MAXC) {
                r->n_bad++;
                continue;
            }
            if (ev[k].type == MOE_EV_TOKEN) {
                if (r->n[c] < MAXT) r->toks[c][r->n[c]] = ev[k].token;
                r->n[c]++;
            } else {
                r->fin[c]++;
                r->reason[c] = ev[k].type == MOE_EV_FINISH
                               ? ev[k].finish_reason : -1;
                r->n_gen[c] = ev[k].n_generated;
                r->n_fin++;
            }
        }
    }
    return 0;
}


static int
run(moe_engine_t *e, uint64_t id, const int32_t *ids, int n,
    const moe_sampling_t *sp, res_t *r)
{
    memset(r, 0, sizeof(*r));
    if (moe_engine_submit(e, id, ids, n, sp) != MOE_OK) {
        TAP_DIAG("submit %llu refused", (unsigned long long) id);
        return -1;
    }
    return pump(e, id, r, sp->n_choices > 1 ? sp->n_choices : 1, 0, 0);
}


static int
same(const int32_t *a, int na, const int32_t *b, int nb)
{
    return na == nb && memcmp(a, b, sizeof(int32_t) * (size_t) na) == 0;
}


/* blocks in use once parked */
static int64_t
blocks_used(moe_engine_t *e)
{
    moe_stats_t  st;

    moe_engine_hold(e, 0);
    moe_engine_stats(e, &st);
    return st.kv_blocks_used;
}


int
main(int argc, char **argv)
{
    moe_engine_t   *e;
    moe_sampling_t  sp;
    moe_stats_t     st;
    res_t           solo, r, alone[3];
    int32_t        *ids;
    size_t          n;
    int             i, ok, pass;
    int64_t         used, fin0;
    uint64_t        id = 1;

    (void) argc;
    if (getenv("MOE_SRCDIR")) {
        snprintf(srcdir, sizeof(srcdir), "%s", getenv("MOE_SRCDIR"));
    } else if (realpath(argv[0], srcdir) != NULL) {
        for (i = 0; i < 3; i++) {
            char *slash = strrchr(srcdir, '/');
            if (slash) *slash = '\0';
        }
    }

    TAP_PLAN(16);

    for (pass = 0; pass < 2; pass++) {
        const char *how = pass == 0 ? "swap space" : "no swap space";

        e = make_engine(pass == 0 ? 0.01 : 0.0, 8);
        if (e == NULL) {
            TAP_OK(0, "engine starts (%s)", how);
            return 1;
        }
        moe_tokenizer_encode(moe_engine_tokenizer(e), "Once upon a time",
                             16, 1, &ids, &n);
        while (n < 10) {             /* 10 tokens: 2 full blocks + 2 */
            ids = realloc(ids, (n + 1) * sizeof(int32_t));
            ids[n] = ids[n - 1];
            n++;
        }
        n = 10;

        moe_sampling_defaults(&sp);
        sp.temperature = 0.0f;
        sp.max_tokens = MAXT;
        sp.ignore_eos = 1;
        ok = run(e, id++, ids, (int) n, &sp, &solo) == 0;

        /* KV sharing, held after the prefill step */
        sp.n_choices = 4;
        memset(&r, 0, sizeof(r));
        moe_engine_hold(e, 0);
        ok &= moe_engine_submit(e, id, ids, (int) n, &sp) == MOE_OK;
        moe_engine_hold(e, 1);
        ok &= pump(e, id, &r, 4, 1, 0) == 0;
        used = blocks_used(e);
        moe_engine_hold(e, -1);
        ok &= pump(e, id, &r, 4, 0, 0) == 0;
        id++;
        TAP_OK(ok && used == (pass == 0 ? 6 : 3),
               "%s: n=4 after the prefill step uses %lld blocks (%s)", how,
               (long long) used, pass == 0
               ? "3 + a copied partial block per choice"
               : "3; the choices recompute the tail next step");
        ok = r.n_fin == 4 && r.n_bad == 0;
        for (i = 0; i < 4; i++) {
            ok &= r.fin[i] == 1 && r.reason[i] == MOE_FINISH_LENGTH
                  && same(r.toks[i], r.n[i], solo.toks[0], solo.n[0]);
        }
        TAP_OK(ok, "%s: n=4 greedy: 4 choices, each one FINISH, each equal "
               "to the request run alone (parent's block intact)", how);
        TAP_OK(blocks_used(e) == 0, "%s: every block free afterwards", how);
        moe_engine_hold(e, -1);

        if (pass == 1) {
            free(ids);
            moe_engine_destroy(e);
            break;
        }

        /* n = 2 greedy */
        sp.n_choices = 2;
        ok = run(e, id++, ids, (int) n, &sp, &r) == 0;
        TAP_OK(ok && r.n_fin == 2 && same(r.toks[0], r.n[0], r.toks[1],
                                          r.n[1]) && r.n[0] == MAXT,
               "n=2 greedy: two equal choices of %d tokens", r.n[0]);

        /* seeded: choice i == alone with seed + i */
        sp.temperature = 1.0f;
        sp.has_seed = 1;
        sp.n_choices = 1;
        ok = 1;
        for (i = 0; i < 3; i++) {
            sp.seed = 1000 + (uint64_t) i;
            ok &= run(e, id++, ids, (int) n, &sp, &alone[i]) == 0;
        }
        sp.seed = 1000;
        sp.n_choices = 3;
        ok &= run(e, id++, ids, (int) n, &sp, &r) == 0;
        for (i = 0; i < 3; i++) {
            ok &= same(r.toks[i], r.n[i], alone[i].toks[0], alone[i].n[0]);
        }
        TAP_OK(ok, "seeded n=3: choice i == the request alone with seed+i");
        TAP_OK(!same(alone[0].toks[0], alone[0].n[0], alone[1].toks[0],
                     alone[1].n[0]),
               "seeded: seed and seed+1 differ (the check can fail)");

        /* cancel: all, then one */
        moe_engine_stats(e, &st);
        fin0 = st.requests_finished;
        sp.max_tokens = 100 < MAXT ? 100 : MAXT;
        sp.n_choices = 3;
        memset(&r, 0, sizeof(r));
        moe_engine_hold(e, 0);
        ok = moe_engine_submit(e, id, ids, (int) n, &sp) == MOE_OK;
        moe_engine_hold(e, 2);
        ok &= pump(e, id, &r, 3, 2, 2) == 0;
        ok &= moe_engine_cancel(e, id) == MOE_OK;
        moe_engine_hold(e, -1);
        ok &= pump(e, id, &r, 3, 0, 0) == 0;
        id++;
        for (i = 0; i < 3; i++) {
            ok &= r.fin[i] == 1 && r.reason[i] == MOE_FINISH_CANCELLED;
        }
        TAP_OK(ok, "cancel: every choice ends CANCELLED");
        TAP_OK(blocks_used(e) == 0, "cancel: every block free");
        moe_engine_hold(e, -1);
        moe_engine_stats(e, &st);
        TAP_OK(st.requests_finished == fin0 + 1,
               "the request counted finished once (%lld)",
               (long long) (st.requests_finished - fin0));

        memset(&r, 0, sizeof(r));
        moe_engine_hold(e, 0);
        ok = moe_engine_submit(e, id, ids, (int) n, &sp) == MOE_OK;
        moe_engine_hold(e, 2);
        ok &= pump(e, id, &r, 3, 2, 1) == 0;
        ok &= moe_engine_cancel_choice(e, id, 1) == MOE_OK;
        moe_engine_hold(e, -1);
        ok &= pump(e, id, &r, 3, 0, 0) == 0;
        id++;
        TAP_OK(ok && r.reason[1] == MOE_FINISH_CANCELLED
               && r.reason[0] == MOE_FINISH_LENGTH
               && r.reason[2] == MOE_FINISH_LENGTH && r.n[0] == MAXT,
               "cancel of choice 1: only it ends CANCELLED");
        TAP_OK(blocks_used(e) == 0, "cancel of one: every block free");
        moe_engine_hold(e, -1);

        /* refused */
        sp.n_choices = 9;
        TAP_OK(moe_engine_submit(e, id++, ids, (int) n, &sp) == MOE_EINVAL,
               "n_choices over max_num_seqs refused");
        sp.n_choices = MOE_MAX_CHOICES + 1;
        TAP_OK(moe_engine_submit(e, id++, ids, (int) n, &sp) == MOE_EINVAL,
               "n_choices over MOE_MAX_CHOICES refused");

        free(ids);
        moe_engine_destroy(e);
    }

    return TAP_DONE();
}
