/*
 * A KV pool that grows while sequences run (moe_backend_t.kv_grow, the
 * engine's poll between steps, moe_blocks_limit / moe_blocks_grow), as a
 * worker that imported its weights from the old one gets the old one's KV
 * memory when it exits.  The CPU backend emulates it with
 * MOE_CPU_KV_GROW=start,step: only ids below the usable count pass its
 * step check, so a block handed out too early fails the run.
 *  - the block manager: limit, all-or-nothing reservations against the
 *    usable pool, growth (capped, never shrinking), ids in range;
 *  - the engine on localmoe-tiny: stats show the small pool and what is
 *    pending, six greedy requests that need three times the start pool
 *    all finish with exactly the tokens of an engine whose pool was whole
 *    from the start, and the pool reaches its full size.
 */

#include <limits.h>
#include <poll.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "moe.h"
#include "sched/kv.h"
#include "tap.h"
#include "tiny_engine.h"

#define NREQ    6
#define GEN     60
#define PLEN    20
#define BLOCKS  160
#define START   40

static char srcdir[PATH_MAX];


static moe_engine_t *
make_engine(void)
{
    moe_config_t cfg;

    tu_tiny_config(&cfg, srcdir);
    cfg.kv_cache_blocks = BLOCKS;
    cfg.max_num_seqs = NREQ;
    cfg.max_num_batched_tokens = 64;
    cfg.prefill_step_ratio = 0;
    return tu_engine(&cfg);
}


/* Run NREQ greedy requests to the end; toks[i][0..GEN) their tokens;
 * *max_total: the most usable blocks seen while some were unfinished.
 * pause: after 5 steps the engine parks 300 ms (a kv_grow poll comes due)
 * before it goes on.  Returns the requests that finished with GEN
 * tokens. */
static int
run(moe_engine_t *e, int32_t toks[NREQ][GEN], int64_t *max_total,
    int pause)
{
    moe_sampling_t  sp;
    moe_stats_t     st;
    moe_event_t     ev[64];
    int32_t         prompt[PLEN];
    int             n[NREQ], done = 0, good = 0, i, j, k, m;
    struct pollfd   pfd;

    moe_sampling_defaults(&sp);
    sp.temperature = 0.0f;
    sp.max_tokens = GEN;
    sp.ignore_eos = 1;
    memset(n, 0, sizeof(n));
    moe_engine_hold(e, 0);
    for (i = 0; i < NREQ; i++) {
        for (j = 0; j < PLEN; j++) {
            prompt[j] = 5 + (i * 37 + j * 11) % 200;
        }
        if (moe_engine_submit(e, 100 + (uint64_t) i, prompt, PLEN, &sp)
            != MOE_OK)
        {
            TAP_DIAG("submit %d refused", i);
        }
    }
    if (pause) {
        moe_engine_hold(e, 5);
        usleep(300000);
    }
    moe_engine_hold(e, -1);
    pfd.fd = moe_engine_eventfd(e);
    pfd.events = POLLIN;
    while (done < NREQ) {
        if (poll(&pfd, 1, 30000) <= 0) {
            TAP_DIAG("timed out, %d of %d done", done, NREQ);
            break;
        }
        m = (int) moe_engine_drain(e, ev, 64);
        for (k = 0; k < m; k++) {
            i = (int) (ev[k].req_id - 100);
            if (i < 0 || i >= NREQ) {
                continue;
            }
            if (ev[k].type == MOE_EV_TOKEN) {
                if (n[i] < GEN) {
                    toks[i][n[i]] = ev[k].token;
                }
                n[i]++;
            } else {
                done++;
                good += ev[k].type == MOE_EV_FINISH && n[i] == GEN;
            }
        }
        moe_engine_stats(e, &st);
        if (done < NREQ && st.kv_blocks_total > *max_total) {
            *max_total = st.kv_blocks_total;
        }
    }
    return good;
}


int
main(void)
{
    const char     *src = getenv("MOE_SRCDIR");
    moe_blocks_t    b;
    moe_engine_t   *e;
    moe_stats_t     st;
    int32_t        *tab = NULL, ref[NREQ][GEN], got[NREQ][GEN];
    int             n = 0, cap = 0, i, ok, tries;
    int64_t         maxt = 0;

    TAP_PLAN(15);
    snprintf(srcdir, sizeof(srcdir), "%s", src != NULL ? src : ".");

    /* ---- the block manager */
    ok = moe_blocks_init(&b, 10, 4, 1) == MOE_OK
         && moe_blocks_limit(&b, 4) == MOE_OK;
    TAP_OK(ok && b.n_free == 4 && b.n_usable == 4 && b.n_total == 10,
           "blocks: limited to 4 of 10");
    ok = moe_blocks_reserve(&b, &tab, &n, &cap, 16) == MOE_OK;
    ok &= moe_blocks_reserve(&b, &tab, &n, &cap, 20) == MOE_EFULL && n == 4;
    for (i = 0; i < n; i++) {
        ok &= tab[i] >= 0 && tab[i] < 4;
    }
    TAP_OK(ok, "blocks: 4 handed out, ids below 4, a 5th refused");
    TAP_OK(moe_blocks_limit(&b, 2) == MOE_EINVAL,
           "blocks: no limit while blocks are in use");
    ok = moe_blocks_grow(&b, 7) == 3 && b.n_free == 3;
    ok &= moe_blocks_reserve(&b, &tab, &n, &cap, 28) == MOE_OK && n == 7;
    for (i = 4; i < n; i++) {
        ok &= tab[i] >= 4 && tab[i] < 7;
    }
    TAP_OK(ok, "blocks: grown to 7, the new ids handed out");
    ok = moe_blocks_grow(&b, 5) == 0 && moe_blocks_grow(&b, 7) == 0
         && moe_blocks_grow(&b, 100) == 3 && b.n_usable == 10
         && b.n_free == 3;
    TAP_OK(ok, "blocks: growth never shrinks, capped at the pool");
    moe_blocks_release(&b, tab, &n);
    TAP_OK(b.n_free == 10, "blocks: all free after the release");
    free(tab);
    moe_blocks_destroy(&b);
    TAP_OK(moe_blocks_init(&b, 3, 4, 0) == MOE_OK
           && moe_blocks_limit(&b, 0) == MOE_EINVAL
           && moe_blocks_limit(&b, 4) == MOE_EINVAL, "blocks: bad limits");
    moe_blocks_destroy(&b);

    /* ---- the reference: a whole pool */
    unsetenv("MOE_CPU_KV_GROW");
    e = make_engine();
    if (e == NULL) {
        return 1;
    }
    moe_engine_stats(e, &st);
    TAP_OK(st.kv_blocks_total == BLOCKS && st.kv_blocks_pending == 0,
           "whole pool: %lld blocks, none pending",
           (long long) st.kv_blocks_total);
    TAP_OK(run(e, ref, &maxt, 0) == NREQ, "whole pool: every request ran");
    moe_engine_destroy(e);

    /* ---- a pool that starts at START and grows 40 blocks per poll */
    setenv("MOE_CPU_KV_GROW", "40,40", 1);
    e = make_engine();
    if (e == NULL) {
        return 1;
    }
    moe_engine_hold(e, 0);      /* before its first poll (250 ms away) */
    moe_engine_stats(e, &st);
    TAP_OK(st.kv_blocks_total == START
           && st.kv_blocks_pending == BLOCKS - START,
           "growing pool: starts with %lld blocks, %lld pending",
           (long long) st.kv_blocks_total,
           (long long) st.kv_blocks_pending);
    moe_engine_hold(e, -1);
    maxt = 0;
    TAP_OK(run(e, got, &maxt, 1) == NREQ,
           "growing pool: every request ran (%d x %d blocks needed, %d "
           "at the start)", NREQ, (PLEN + GEN + 3) / 4, START);
    TAP_OK(memcmp(ref, got, sizeof(ref)) == 0,
           "growing pool: the tokens of the whole pool");
    for (tries = 0; tries < 100; tries++) {
        moe_engine_stats(e, &st);
        if (st.kv_blocks_total == BLOCKS) {
            break;
        }
        usleep(50000);
    }
    TAP_OK(maxt > START, "growing pool: grew while requests ran (%lld "
           "blocks seen)", (long long) maxt);
    TAP_OK(st.kv_blocks_total == BLOCKS && st.kv_blocks_pending == 0,
           "growing pool: reaches %lld blocks",
           (long long) st.kv_blocks_total);
    TAP_OK(st.kv_blocks_used == 0, "growing pool: every block free after");
    moe_engine_destroy(e);
    unsetenv("MOE_CPU_KV_GROW");
    return TAP_DONE();
}
