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
 * path (logprobs on forces logits + moe_sample()).  Non-greedy requests
 * drawn by the backend (moe_seq_batch_t.sample) give the same seeded
 * streams as the engine's host sampler, penalties included.
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
#include "text/tokenizer.h"

#define NREQ  12
#define MAXT  40

typedef struct {
    int32_t  toks[MAXT];
    int      n;
    int      finished;
    int      reason;
    int      n_gen;
} result_t;


static const char *prompts[NREQ] = {
    "Hello", "The quick brown fox", "In the beginning", "1 2 3 4 5",
    "GNU General Public License", "you may not use this file",
    "a", "Once upon a time there was", "def main():\n    return 0",
    "zzz", "What is the meaning of", "copyright notice"
};


static char  srcdir[PATH_MAX];


static int
run(moe_engine_t *e, const int *ids_n, int32_t ids[][256], int first,
    int count, const moe_sampling_t *sp, result_t *res, int cancel_after)
{
    int            i, live = count;
    size_t         k, n;
    moe_event_t    ev[128];
    struct pollfd  pfd = { moe_engine_eventfd(e), POLLIN, 0 };

    for (i = first; i < first + count; i++) {
        memset(&res[i], 0, sizeof(res[i]));
        if (moe_engine_submit(e, (uint64_t) i + 1, ids[i], ids_n[i], sp)
            != MOE_OK)
        {
            return -1;
        }
    }

    while (live > 0) {
        if (poll(&pfd, 1, 5000) == 0) {
            TAP_DIAG("timed out waiting for events");
            return -1;
        }
        n = moe_engine_drain(e, ev, 128);
        for (k = 0; k < n; k++) {
            result_t *r = &res[ev[k].req_id - 1];

            if (ev[k].type == MOE_EV_TOKEN) {
                if (r->n < MAXT) r->toks[r->n] = ev[k].token;
                r->n++;
                if (cancel_after > 0 && r->n == cancel_after) {
                    moe_engine_cancel(e, ev[k].req_id);
                }
            } else {
                r->finished++;
                r->reason = ev[k].type == MOE_EV_FINISH
                            ? ev[k].finish_reason : -1;
                r->n_gen = ev[k].n_generated;
                live--;
            }
        }
    }
    return 0;
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
make_engine(int kv_blocks, int max_seqs, double swap_gib)
{
    char           err[1024];
    moe_config_t   cfg;
    moe_engine_t  *e;

    moe_config_defaults(&cfg);
    snprintf(cfg.model_name, sizeof(cfg.model_name), "localmoe-tiny");
    snprintf(cfg.model_path, sizeof(cfg.model_path),
             "%.900s/models/localmoe-tiny", srcdir);
    snprintf(cfg.backend, sizeof(cfg.backend), "cpu");
    cfg.max_model_len = 128;
    cfg.block_size = 4;
    cfg.kv_cache_blocks = kv_blocks;
    cfg.max_num_seqs = max_seqs;
    cfg.max_num_batched_tokens = 64;
    cfg.cpu_threads = 1;
    cfg.swap_space = swap_gib;

    if (moe_engine_create(&cfg, &e, err, sizeof(err)) != MOE_OK) {
        TAP_DIAG("engine: %s", err);
        return NULL;
    }
    return e;
}


int
main(int argc, char **argv)
{
    int              i, ok, ids_n[NREQ];
    int32_t          ids[NREQ][256], *p;
    size_t           n;
    moe_engine_t    *e;
    moe_sampling_t   sp;
    moe_stats_t      st;
    result_t         solo[NREQ], batch[NREQ], small[NREQ], r2[2];
    char            *slash;

    (void) argc;
    if (getenv("MOE_SRCDIR")) {
        snprintf(srcdir, sizeof(srcdir), "%s", getenv("MOE_SRCDIR"));
    } else if (realpath(argv[0], srcdir) != NULL) {
        /* build/t/engine -> repo root */
        for (i = 0; i < 3 && (slash = strrchr(srcdir, '/')); i++) {
            *slash = '\0';
        }
    }

    TAP_PLAN(23);

    e = make_engine(0, 16, 0);
    if (e == NULL) {
        TAP_OK(0, "engine starts on models/localmoe-tiny");
        return 1;
    }
    TAP_OK(1, "engine starts on models/localmoe-tiny");

    for (i = 0; i < NREQ; i++) {
        moe_tokenizer_encode(moe_engine_tokenizer(e), prompts[i],
                             strlen(prompts[i]), 1, &p, &n);
        ids_n[i] = (int) n;
        memcpy(ids[i], p, n * sizeof(int32_t));
        free(p);
    }

    moe_sampling_defaults(&sp);
    sp.temperature = 0.0f;
    sp.max_tokens = 24;
    sp.ignore_eos = 1;

    ok = 1;
    for (i = 0; i < NREQ; i++) {
        ok &= run(e, ids_n, ids, i, 1, &sp, solo, 0) == 0;
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
        ok = run(e, ids_n, ids, 0, 4, &sp, batch, 0) == 0;
        for (i = 0; ok && i < 4; i++) {
            ok = batch[i].n == solo[i].n
                 && memcmp(batch[i].toks, solo[i].toks,
                           sizeof(int32_t) * (size_t) solo[i].n) == 0;
        }
        sp.logprobs = 0;
        TAP_OK(ok, "greedy with logprobs (host sampling) == without "
               "(backend argmax), 4 prompts batched");
    }

    ok = run(e, ids_n, ids, 0, NREQ, &sp, batch, 0) == 0;
    for (i = 0; i < NREQ; i++) {
        ok &= batch[i].finished == 1 && batch[i].n == solo[i].n
              && memcmp(batch[i].toks, solo[i].toks,
                        sizeof(int32_t) * (size_t) solo[i].n) == 0;
    }
    TAP_OK(ok, "%d requests batched together: identical greedy tokens, "
           "one finish each", NREQ);

    moe_engine_stats(e, &st);
    TAP_OK(st.kv_blocks_used == 0 && st.seqs_running == 0,
           "all KV blocks free after the batch (used %lld)",
           (long long) st.kv_blocks_used);

    /* cancel after 3 tokens frees the blocks */
    sp.max_tokens = 100;
    ok = run(e, ids_n, ids, 0, 2, &sp, r2, 3) == 0;
    usleep(300000);
    moe_engine_stats(e, &st);
    TAP_OK(ok && r2[0].reason == MOE_FINISH_CANCELLED && r2[0].n < 100
           && st.kv_blocks_used == 0,
           "cancel: reason cancelled after %d tokens, blocks used %lld",
           r2[0].n, (long long) st.kv_blocks_used);

    /* cancelling the last running sequence must still wake the worker
     * for its FINISH event (a lost wake-up here once hung the caller).
     * The tiny model may finish all 40 tokens before the cancel lands, so
     * LENGTH is a legal outcome; a missing FINISH (time-out) is not. */
    {
        int cancelled = 0;

        ok = 1;
        for (i = 0; i < 30 && ok; i++) {
            ok = run(e, ids_n, ids, 0, 1, &sp, r2, 1) == 0
                 && r2[0].finished == 1
                 && (r2[0].reason == MOE_FINISH_CANCELLED
                     || r2[0].reason == MOE_FINISH_LENGTH);
            cancelled += r2[0].reason == MOE_FINISH_CANCELLED;
        }
        TAP_OK(ok && cancelled > 0, "30 cancels of the only running "
               "sequence: every FINISH arrives (%d cancelled, the rest "
               "finished first)", cancelled);
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
        result_t c1[1], c2[1];
        moe_event_t ev[64];
        struct pollfd pfd = { moe_engine_eventfd(e), POLLIN, 0 };
        int      cached[2] = { -1, -1 }, k, done;

        moe_tokenizer_encode(moe_engine_tokenizer(e), p, strlen(p), 1, &pp,
                             &pn);
        memcpy(pids[0], pp, pn * sizeof(int32_t));
        pn_[0] = (int) pn;
        free(pp);
        sp.max_tokens = 8;
        sp.temperature = 0.0f;
        for (k = 0; k < 2; k++) {
            result_t *r = k ? c2 : c1;

            memset(r, 0, sizeof(*r));
            moe_engine_submit(e, 500 + k, pids[0], pn_[0], &sp);
            for (done = 0; !done && poll(&pfd, 1, 5000) > 0; ) {
                size_t m = moe_engine_drain(e, ev, 64), q;

                for (q = 0; q < m; q++) {
                    if (ev[q].type == MOE_EV_TOKEN && r->n < MAXT) {
                        r->toks[r->n++] = ev[q].token;
                    } else if (ev[q].type != MOE_EV_TOKEN) {
                        cached[k] = ev[q].n_cached;
                        done = 1;
                    }
                }
            }
        }
        TAP_OK(cached[0] == 0 && cached[1] == ((int) pn - 1) / 4 * 4,
               "second identical prompt (%d tokens): %d cached tokens "
               "(first %d)", (int) pn, cached[1], cached[0]);
        TAP_OK(c1[0].n == 8 && c1[0].n == c2[0].n
               && memcmp(c1[0].toks, c2[0].toks, 8 * sizeof(int32_t)) == 0,
               "cached prefix gives the same greedy tokens");
    }

    /* seeded sampling */
    sp.max_tokens = 20;
    sp.temperature = 1.0f;
    sp.seed = 99;
    sp.has_seed = 1;
    ok = run(e, ids_n, ids, 0, 1, &sp, r2, 0) == 0;
    ok &= run(e, ids_n, ids, 1, 1, &sp, r2, 0) == 0;
    {
        result_t a = r2[0];

        ok &= run(e, ids_n, ids, 0, 1, &sp, r2, 0) == 0;
        TAP_OK(ok && a.n == r2[0].n
               && memcmp(a.toks, r2[0].toks, sizeof(int32_t) * a.n) == 0,
               "same seed and prompt, same sampled tokens");
    }

    TAP_OK(moe_engine_submit(e, 1000, ids[0], 0, &sp) == MOE_EINVAL,
           "empty prompt refused");
    {
        int32_t  bad = 1 << 30;

        TAP_OK(moe_engine_submit(e, 1001, &bad, 1, &sp) == MOE_EINVAL,
               "token id out of vocab refused");
    }
    {
        static int32_t  longp[200];

        TAP_OK(moe_engine_submit(e, 1002, longp, 200, &sp) == MOE_ETOOLONG,
               "prompt over max_model_len refused");
    }
    moe_engine_destroy(e);

    /* a KV cache of 40 blocks (160 tokens) for 12 sequences of up to ~35
     * tokens: preemption by recompute must not change any output */
    e = make_engine(40, 16, 0);
    sp.temperature = 0.0f;
    sp.has_seed = 0;
    sp.max_tokens = 24;
    ok = e != NULL && run(e, ids_n, ids, 0, NREQ, &sp, small, 0) == 0;
    for (i = 0; ok && i < NREQ; i++) {
        ok &= small[i].finished == 1 && small[i].n == solo[i].n
              && memcmp(small[i].toks, solo[i].toks,
                        sizeof(int32_t) * (size_t) solo[i].n) == 0;
    }
    if (e != NULL) {
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
            ok = e != NULL && run(e, ids_n, ids, 0, NREQ, &sp, small, 0) == 0;
            for (i = 0; ok && i < NREQ; i++) {
                ok &= small[i].finished == 1 && small[i].n == solo[i].n
                      && memcmp(small[i].toks, solo[i].toks,
                                sizeof(int32_t) * (size_t) solo[i].n) == 0;
            }
            usleep(100000);
            if (e != NULL) {
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
                ok = e != NULL && run(e, ids_n, ids, 0, NREQ, &sp, r, 0) == 0;
                if (e != NULL) {
                    moe_engine_stats(e, &st);
                    *(pass == 0 ? &na : &nb) = st.backend_sampled_tokens;
                    moe_engine_destroy(e);
                }
                if (!ok) {
                    break;
                }
            }
            gen = 0;
            for (i = 0; ok && i < NREQ; i++) {
                ok &= ra[i].finished == 1 && ra[i].n == rb[i].n
                      && memcmp(ra[i].toks, rb[i].toks,
                                sizeof(int32_t) * (size_t) ra[i].n) == 0;
                gen += ra[i].n_gen;
            }
            TAP_OK(ok && na == gen && nb == 0, "%s: tokens drawn by the "
                   "backend (%lld of %lld) equal the host sampler's, 12 "
                   "concurrent seeded requests", what[k], (long long) na,
                   (long long) gen);
        }
    }

    return TAP_DONE();
}
