/*
 * Stall-free batching (engine/sched/stepcost.c and the scheduler's use of
 * it).  Checks:
 *  1. the step cost model recovers known coefficients from exact and from
 *     noisy synthetic steps, is not used before it has seen
 *     MOE_STEPCOST_WARM steps, never fits a negative cost, and the chunk
 *     solver returns the largest chunk within a time budget;
 *  2. in the engine (tiny model, CPU) with the model pinned
 *     (moe_engine_pin_step_cost: no timing involved): a long prompt that
 *     arrives while 4 sequences decode is absorbed in chunks no larger than
 *     the pinned model allows for prefill_step_ratio (each step's prefill
 *     tokens counted through the step count it takes), the decodes get a
 *     token every step meanwhile, and its greedy output equals the same
 *     prompt run alone (unchunked): chunking changes the pace, not the
 *     tokens;
 *  3. a long prompt with nothing decoding is prefilled in one step (no
 *     limit when no stream would stall), and prefill_step_ratio 0 turns the
 *     limit off.
 */

#include <limits.h>
#include <math.h>
#include <poll.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "moe.h"
#include "sched/stepcost.h"
#include "tap.h"

#ifndef EVENT_TIMEOUT_MS
#define EVENT_TIMEOUT_MS  30000
#endif

#define MAXR  8
#define MAXT  64

static char  srcdir[PATH_MAX];

typedef struct {
    int32_t  toks[MAXT];
    int      n, finished;
} res_t;


static int
close_to(double a, double b, double rel)
{
    return fabs(a - b) <= rel * (fabs(b) + 1e-9);
}


static void
test_model(void)
{
    moe_stepcost_t  m;
    int             i, tok, p;
    double          attn, t;
    unsigned        x = 12345;

    /* 1a. exact data from t = 2e6 + 3e4 tok + 50 attn */
    moe_stepcost_init(&m);
    for (i = 0; i < 40; i++) {
        tok = 1 + (i * 37) % 200;
        attn = moe_stepcost_attn((i * 53) % 500, tok);
        t = 2e6 + 3e4 * tok + 50 * attn;
        moe_stepcost_observe(&m, tok, attn, t);
        if (i == MOE_STEPCOST_WARM - 2) {
            TAP_OK(!m.ok, "model not used before %d steps",
                   MOE_STEPCOST_WARM);
        }
    }
    TAP_OK(m.ok && close_to(m.c[0], 2e6, 1e-3)
           && close_to(m.c[1], 3e4, 1e-3) && close_to(m.c[2], 50, 1e-2),
           "exact steps: c = %.4g %.4g %.4g (want 2e6 3e4 50)",
           m.c[0], m.c[1], m.c[2]);

    /* 1b. +-5% noise */
    moe_stepcost_init(&m);
    for (i = 0; i < 200; i++) {
        x = x * 1103515245u + 12345u;
        tok = 1 + (int) ((x >> 8) % 300);
        attn = moe_stepcost_attn((int) ((x >> 4) % 1000), tok);
        t = (1e6 + 2e4 * tok + 10 * attn)
            * (0.95 + 0.1 * (double) ((x >> 16) & 1023) / 1023.0);
        moe_stepcost_observe(&m, tok, attn, t);
    }
    TAP_OK(m.ok && close_to(m.c[1], 2e4, 0.15),
           "noisy steps: c1 = %.4g (want 2e4 +- 15%%)", m.c[1]);

    /* 1c. costs that fall with attention (noise in a real run) are not
     * fitted negative */
    moe_stepcost_init(&m);
    for (i = 0; i < 40; i++) {
        tok = 1 + i % 50;
        attn = moe_stepcost_attn(i * 10, tok);
        moe_stepcost_observe(&m, tok, attn, 1e6 + 1e4 * tok - 5 * attn);
    }
    TAP_OK(m.c[0] >= 0 && m.c[1] >= 0 && m.c[2] >= 0,
           "no negative coefficient (%.3g %.3g %.3g)", m.c[0], m.c[1],
           m.c[2]);

    /* 1c'. steps of two shapes only (what a GPU serving long prompts
     * sees: 16 decodes, or 16 decodes + a whole 8192-token prompt at
     * position 0): tokens and attention are collinear; the model must
     * still price a token (attention's share folded in), not give up
     * (a device run found it never warm this way) */
    moe_stepcost_init(&m);
    for (i = 0; i < 300; i++) {
        x = x * 1103515245u + 12345u;
        tok = i % 10 == 0 ? 8192 + 16 : 16;
        attn = i % 10 == 0 ? moe_stepcost_attn(0, 8192)
                             + 16 * moe_stepcost_attn(8192, 1)
                           : 16 * moe_stepcost_attn(8192, 1);
        t = (25e6 + 5e4 * tok + 100 * attn)
            * (0.97 + 0.06 * (double) ((x >> 16) & 1023) / 1023.0);
        moe_stepcost_observe(&m, tok, attn, t);
    }
    TAP_OK(m.ok && m.c[1] > 4e4 && m.c[1] < 7e4
           && moe_stepcost_predict(&m, 16, 16 * moe_stepcost_attn(8192, 1))
              < 30e6,
           "two step shapes: usable, c1 %.4g ns/token (attention folded "
           "in: 5e4-7e4), decode step %.3g ms", m.c[1],
           moe_stepcost_predict(&m, 16, 16 * moe_stepcost_attn(8192, 1))
           / 1e6);

    /* 1d. solver: budget 1e6 ns, c1 = 1e4 -> 100 tokens at pos 0 w/o
     * attention; with attention the largest p whose cost fits */
    moe_stepcost_pin(&m, 5e5, 1e4, 0);
    TAP_OK(moe_stepcost_fit_tokens(&m, 1e6, 0, 1000) == 100
           && moe_stepcost_fit_tokens(&m, 1e6, 0, 40) == 40
           && moe_stepcost_fit_tokens(&m, 0, 0, 40) == 0,
           "solver without attention: 100 of 1000, all of 40, 0 of no "
           "budget");
    moe_stepcost_pin(&m, 5e5, 1e4, 100);
    p = moe_stepcost_fit_tokens(&m, 1e6, 300, 1000);
    TAP_OK(p > 0 && p < 100
           && moe_stepcost_predict(&m, p, moe_stepcost_attn(300, p)) - 5e5
              <= 1e6
           && moe_stepcost_predict(&m, p + 1, moe_stepcost_attn(300, p + 1))
              - 5e5 > 1e6,
           "solver with attention: %d tokens is the largest that fits", p);
}


static moe_engine_t *
make_engine(double ratio)
{
    char          err[1024];
    moe_config_t  cfg;
    moe_engine_t *e;

    moe_config_defaults(&cfg);
    snprintf(cfg.model_name, sizeof(cfg.model_name), "localmoe-tiny");
    snprintf(cfg.model_path, sizeof(cfg.model_path),
             "%.900s/models/localmoe-tiny", srcdir);
    snprintf(cfg.backend, sizeof(cfg.backend), "cpu");
    cfg.max_model_len = 512;
    cfg.block_size = 16;
    cfg.max_num_seqs = 8;
    cfg.max_num_batched_tokens = 512;
    cfg.cpu_threads = 1;
    cfg.enable_prefix_caching = 0;
    cfg.prefill_step_ratio = ratio;
    if (moe_engine_create(&cfg, &e, err, sizeof(err)) != MOE_OK) {
        TAP_DIAG("engine: %s", err);
        return NULL;
    }
    return e;
}


/* Take events until request `id` (0..MAXR-1, ids base+i) has `ntok`
 * tokens or finished, or every request finished when ntok < 0. */
static int
pump(moe_engine_t *e, uint64_t base, res_t *r, int nreq, int id, int ntok)
{
    moe_event_t    ev[64];
    size_t         n, k;
    struct pollfd  pfd = { moe_engine_eventfd(e), POLLIN, 0 };

    for ( ;; ) {
        int  done = 1;

        if (ntok >= 0) {
            done = r[id].n >= ntok || r[id].finished;
        } else {
            for (k = 0; k < (size_t) nreq; k++) {
                done &= r[k].finished;
            }
        }
        if (done) {
            return 0;
        }
        if (poll(&pfd, 1, EVENT_TIMEOUT_MS) == 0) {
            TAP_DIAG("timed out waiting for events");
            return -1;
        }
        n = moe_engine_drain(e, ev, 64);
        for (k = 0; k < n; k++) {
            res_t  *x;

            if (ev[k].req_id < base || ev[k].req_id >= base + (size_t) nreq) {
                continue;
            }
            x = &r[ev[k].req_id - base];
            if (ev[k].type == MOE_EV_TOKEN) {
                if (x->n < MAXT) {
                    x->toks[x->n] = ev[k].token;
                }
                x->n++;
            } else {
                x->finished = 1;
            }
        }
    }
}


static void
prompt_ids(int32_t *ids, int n, int salt)
{
    for (int i = 0; i < n; i++) {
        ids[i] = 3 + (i * 7 + salt * 13) % 200;
    }
}


/* Let the parked engine take exactly k steps, then park it again. */
static int
steps(moe_engine_t *e, int k)
{
    moe_stats_t  st;
    int64_t      s0;
    int          i;

    moe_engine_stats(e, &st);
    s0 = st.steps;
    moe_engine_hold(e, k);
    for (i = 0; i < EVENT_TIMEOUT_MS; i++) {
        moe_engine_stats(e, &st);
        if (st.steps >= s0 + k) {
            break;
        }
        usleep(1000);
    }
    moe_engine_hold(e, 0);
    moe_engine_stats(e, &st);
    return st.steps == s0 + k ? 0 : -1;
}


static void
test_engine(void)
{
    moe_engine_t   *e;
    moe_sampling_t  sp, dec;
    moe_stats_t     st0, st1;
    res_t           r[MAXR], alone[1];
    int32_t         longp[400], shortp[8];
    int             i, ok;
    uint64_t        base = 100;
    int             k;

    moe_sampling_defaults(&sp);
    sp.temperature = 0;
    sp.max_tokens = 8;
    sp.ignore_eos = 1;
    dec = sp;
    dec.max_tokens = MAXT;
    prompt_ids(longp, 400, 1);

    for (k = 0; k < 2; k++) {
        double  ratio = k == 0 ? 3.0 : 0.0;

        e = make_engine(ratio);
        if (e == NULL) {
            TAP_OK(0, "engine starts (prefill_step_ratio %g)", ratio);
            continue;
        }

        /* the long prompt alone: nothing decodes, so no limit */
        memset(alone, 0, sizeof(alone));
        moe_engine_hold(e, 0);
        TAP_OK(moe_engine_pin_step_cost(e, 1e6, 1e4, 0) == MOE_OK,
               "ratio %g: pin the step cost model while parked", ratio);
        moe_engine_stats(e, &st0);
        moe_engine_submit(e, base, longp, 400, &sp);
        ok = steps(e, 1) == 0;
        moe_engine_stats(e, &st1);
        TAP_OK(ok && st1.prefill_limited_steps == 0
               && st1.seqs_running == 1 && st1.seqs_waiting == 0,
               "ratio %g: 400-token prompt with nothing decoding is "
               "prefilled in one step (limited %lld)", ratio,
               (long long) st1.prefill_limited_steps);
        TAP_OK(st1.step_cost_ns[1] == 1e4, "ratio %g: stats show the "
               "pinned model (c1 %.1f ns/token)", ratio,
               st1.step_cost_ns[1]);
        moe_engine_hold(e, -1);
        ok = pump(e, base, alone, 1, 0, -1) == 0 && alone[0].n == 8;
        TAP_OK(ok, "ratio %g: reference run, 8 tokens", ratio);

        /* 4 decoding, then the long prompt.  Pinned: 1 ms + 10 us a
         * token, so the decodes alone cost 1.04 ms and ratio 3 leaves
         * 2.08 ms = 208 prefill tokens a step: 400 = 208 + 192, two
         * steps, the first one cut */
        base += 10;
        memset(r, 0, sizeof(r));
        moe_engine_hold(e, 0);
        for (i = 0; i < 4; i++) {
            prompt_ids(shortp, 8, 10 + i);
            moe_engine_submit(e, base + (uint64_t) i, shortp, 8, &dec);
        }
        ok = steps(e, 2) == 0;          /* their prefill + one decode */
        moe_engine_stats(e, &st0);
        moe_engine_submit(e, base + 4, longp, 400, &sp);
        ok = ok && steps(e, 1) == 0;
        moe_engine_stats(e, &st1);
        if (k == 0) {
            TAP_OK(ok && st1.prefill_limited_steps
                         - st0.prefill_limited_steps == 1
                   && st1.seqs_running == 5,
                   "ratio 3: beside 4 decodes the prompt's first step is "
                   "cut (limited +%lld, running %lld)",
                   (long long) (st1.prefill_limited_steps
                                - st0.prefill_limited_steps),
                   (long long) st1.seqs_running);
        } else {
            TAP_OK(ok && st1.prefill_limited_steps == 0
                   && st1.seqs_running == 5,
                   "ratio 0: the prompt joins whole beside 4 decodes "
                   "(limited %lld)", (long long) st1.prefill_limited_steps);
        }
        ok = ok && steps(e, 1) == 0;
        moe_engine_stats(e, &st0);
        moe_engine_hold(e, -1);
        ok = ok && pump(e, base, r, 5, 0, -1) == 0;
        if (k == 0) {
            TAP_OK(ok && st0.prefill_limited_steps
                         == st1.prefill_limited_steps
                   && r[4].n >= 1 && r[0].n >= 4,
                   "ratio 3: the other 192 tokens fit the next step, "
                   "decodes went on");
        }
        TAP_OK(ok && r[4].n == 8 && memcmp(r[4].toks, alone[0].toks,
                                           8 * sizeof(int32_t)) == 0,
               "ratio %g: beside decodes, the same tokens as alone", ratio);
        base += 10;
        moe_engine_destroy(e);
    }
}


int
main(int argc, char **argv)
{
    const char  *d = getenv("MOE_SRCDIR");

    (void) argc;

    if (d != NULL) {
        snprintf(srcdir, sizeof(srcdir), "%s", d);
    } else if (realpath(argv[0], srcdir) != NULL) {
        /* build/t/stallfree -> repo root */
        for (int i = 0; i < 3; i++) {
            char *slash = strrchr(srcdir, '/');
            if (slash != NULL) {
                *slash = '\0';
            }
        }
    }
    test_model();
    test_engine();
    TAP_PLAN(tap_n);
    return TAP_DONE();
}
