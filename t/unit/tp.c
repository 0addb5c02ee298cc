/*
 * Checks tensor parallelism on the CPU (engine/backends/tp.c, moe_model_shard):
 * for every test model and every tp that divides its heads, kv heads and
 * intermediate sizes (2, 4), the ranks' shards run together with their
 * partial sums all-reduced give the logits of the unsharded CPU backend
 * (fp32, only the order of the partial sums differs: relative error
 * <= 1e-5) over chunked prefill of two interleaved sequences on shuffled
 * pages and decode steps, the same greedy tokens, and the same expert
 * counts; a tp that does not divide the model is refused by name; swap
 * out / in on the sharded backend round-trips every rank's pages; the
 * engine with tensor_parallel_size 2 gives the greedy streams of tp 1; and
 * the sharded tensor walk (moe_model_for_each_tensor_shard, what the CUDA
 * ranks load from the files) yields exactly moe_model_shard's weights.
 * The same with expert parallelism (moe_model_shard_ep: whole experts,
 * E / tp per rank): logits within 1e-5, greedy tokens and expert counts
 * equal, the walk equal to the shards, a tp that does not divide the
 * experts (or a dense model) refused by name, and the engine with
 * expert_parallel gives tp 1's greedy streams and a per-rank load that
 * sums to the routed rows.
 */

#include <math.h>
#include <limits.h>
#include <poll.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include <stddef.h>

#include "moe.h"
#include "backends/backend.h"
#include "model/safetensors.h"
#include "tap.h"

#define BS      4
#define NB      48
#define LEN_A   23
#define LEN_B   17
#define N_DEC   8
#define CHUNK   7

static char  srcdir[PATH_MAX];

static const char *models[] = {
    "t/data/models/llama-mha", "t/data/models/llama-gqa",
    "t/data/models/mixtral-gqa", "t/data/models/mixtral-fused",
    "t/data/models/mistral-sw", "t/data/models/qwen2-bias",
    "t/data/models/qwen2moe-shared", "t/data/models/qwen3moe-qknorm",
    "t/data/models/gpt2-tiny", "t/data/models/llama-bias",
    "models/localmoe-tiny", "models/localmoe-kjv"
};


static double
rel_err(const float *a, const float *ref, int n)
{
    double num = 0, den = 0;

    for (int i = 0; i < n; i++) {
        double d = (double) a[i] - ref[i];

        num += d * d;
        den += (double) ref[i] * ref[i];
    }
    return den > 0 ? sqrt(num / den) : sqrt(num);
}


static int
argmax(const float *v, int n)
{
    int b = 0;

    for (int i = 1; i < n; i++) {
        if (v[i] > v[b]) {
            b = i;
        }
    }
    return b;
}


/* tp CPU ranks through the factory (moe_backend_create_ranks). */
static int
cpu_ranks_ep(const moe_model_t *m, int tp, int ep, int n_blocks,
    int block_size, int n_threads, moe_backend_t **out, char *err,
    size_t errlen)
{
    moe_ranks_t p;

    memset(&p, 0, sizeof(p));
    p.kind = MOE_BACKEND_CPU;
    p.tp = tp;
    p.ep = ep;
    p.n_threads = n_threads;
    p.n_blocks = n_blocks;
    p.block_size = block_size;
    return moe_backend_create_ranks(m, &p, out, err, errlen);
}


static int
cpu_ranks(const moe_model_t *m, int tp, int n_blocks, int block_size,
    int n_threads, moe_backend_t **out, char *err, size_t errlen)
{
    return cpu_ranks_ep(m, tp, 0, n_blocks, block_size, n_threads, out, err,
                        errlen);
}


/* One model at one tp: 0 when skipped (tp does not divide), else tests. */
static void
test_model(const char *rel, int tp, int ep)
{
    char                 dir[PATH_MAX + 64], err[512];
    moe_model_t         *m = NULL;
    moe_backend_t       *one = NULL, *par = NULL;
    const moe_hparams_t *hp;
    int32_t              toks[2][LEN_A + N_DEC], bt[2][NB / 2];
    int                  len[2] = { LEN_A, LEN_B }, done[2] = { 0, 0 };
    int                  V, rc, steps = 0, rows = 0, greedy_bad = 0;
    double               worst = 0;
    float               *l1 = NULL, *l2 = NULL;
    const char          *name = strrchr(rel, '/') + 1;
    const char          *mode = ep ? " ep" : "";

    snprintf(dir, sizeof(dir), "%s/%s", srcdir, rel);
    if (moe_model_load(dir, 0, &m, err, sizeof(err)) != MOE_OK) {
        TAP_OK(0, "%s: load: %s", name, err);
        return;
    }
    hp = moe_model_hparams(m);
    if (ep && hp->n_experts <= 1) {
        /* expert_parallel on a dense model: refused by name */
        rc = cpu_ranks_ep(m, tp, 1, NB, BS, 1, &par, err, sizeof(err));
        TAP_OK(rc == MOE_EUNSUPPORTED && strstr(err, "no routed experts"),
               "%s tp %d ep: refused (%s)", name, tp, err);
        moe_model_free(m);
        return;
    }
    if (hp->n_heads % tp || hp->n_kv_heads % tp
        || (ep ? hp->n_experts % tp : hp->ffn_dim % tp)
        || hp->shared_ffn_dim % tp || hp->dense_ffn_dim % tp)
    {
        rc = cpu_ranks_ep(m, tp, ep, NB, BS, 1, &par, err, sizeof(err));
        TAP_OK(rc == MOE_EUNSUPPORTED && strstr(err, "must divide") != NULL
               && (!ep || hp->n_experts % tp == 0
                   || strstr(err, "number of experts") != NULL),
               "%s tp %d%s: refused (%s)", name, tp, mode, err);
        moe_model_free(m);
        return;
    }
    V = hp->vocab_size;
    l1 = malloc(sizeof(float) * 2 * V);
    l2 = malloc(sizeof(float) * 2 * V);
    for (int q = 0; q < 2; q++) {
        for (int i = 0; i < len[q]; i++) {
            toks[q][i] = (int32_t) ((i * 37 + q * 101 + 11) % V);
        }
    }
    for (int i = 0; i < NB / 2; i++) {
        bt[0][i] = 2 * ((i * 7 + 3) % (NB / 2));
        bt[1][i] = 2 * ((i * 11 + 5) % (NB / 2)) + 1;
    }
    if (moe_cpu_backend_create(m, NB, BS, 2, &one, err, sizeof(err))
        != MOE_OK
        || cpu_ranks_ep(m, tp, ep, NB, BS, 2, &par, err, sizeof(err))
           != MOE_OK)
    {
        TAP_OK(0, "%s tp %d%s: backends: %s", name, tp, mode, err);
        goto out;
    }
    if (ep) {
        TAP_OK(moe_tp_backend_ep_ranks(par) == tp, "%s tp %d ep: the "
               "backend reports %d expert-parallel ranks", name, tp,
               moe_tp_backend_ep_ranks(par));
    }
    /* chunked prefill of both, then decode; every step both backends */
    for (;;) {
        moe_seq_batch_t sb[2];
        int             n = 0;

        for (int q = 0; q < 2; q++) {
            int c = done[q] < len[q] ? len[q] - done[q] : 1;

            if (done[q] >= len[q] + N_DEC - 1) {
                continue;
            }
            if (c > CHUNK) {
                c = CHUNK;
            }
            memset(&sb[n], 0, sizeof(sb[n]));
            sb[n].tokens = toks[q] + done[q];
            sb[n].n_tokens = c;
            sb[n].pos = done[q];
            sb[n].block_table = bt[q];
            sb[n].n_blocks = NB / 2;
            sb[n].logits = l1 + (size_t) n * V;
            n++;
        }
        if (n == 0) {
            break;
        }
        if (one->forward(one, sb, n) != MOE_OK) {
            TAP_OK(0, "%s tp %d%s: step %d on one backend", name, tp, mode,
                   steps);
            goto out;
        }
        for (int i = 0; i < n; i++) {
            sb[i].logits = l2 + (size_t) i * V;
        }
        if (par->forward(par, sb, n) != MOE_OK) {
            TAP_OK(0, "%s tp %d%s: step %d on %d ranks", name, tp, mode,
                   steps, tp);
            goto out;
        }
        n = 0;
        for (int q = 0; q < 2; q++) {
            if (done[q] >= len[q] + N_DEC - 1) {
                continue;
            }
            int c = done[q] < len[q] ? len[q] - done[q] : 1;

            c = c > CHUNK ? CHUNK : c;
            done[q] += c;
            if (done[q] >= len[q]) {
                const float *a = l1 + (size_t) n * V, *b = l2 + (size_t) n * V;
                double       e = rel_err(b, a, V);

                worst = e > worst || e != e ? e : worst;
                greedy_bad += argmax(a, V) != argmax(b, V);
                rows++;
                /* decode continues with the unsharded backend's choice */
                if (done[q] < len[q] + N_DEC) {
                    toks[q][done[q]] = (int32_t) argmax(a, V);
                }
            }
            n++;
        }
        steps++;
    }
    {
        const int64_t *c1 = one->expert_counts(one);
        const int64_t *c2 = par->expert_counts(par);
        int            same = 1;

        for (int i = 0; c1 && c2 && i < hp->n_layers * hp->n_experts; i++) {
            same &= c1[i] == c2[i];
        }
        TAP_OK(worst <= 1e-5 && greedy_bad == 0 && rows > 0 && same,
               "%s tp %d%s: %d steps (chunked prefill + decode, 2 "
               "sequences), %d logits rows: rel err max %.2e (<= 1e-5), "
               "greedy equal (%d differ), expert counts equal (%s)", name,
               tp, mode, steps, rows, worst, greedy_bad,
               same ? "yes" : "no");
    }

out:
    if (par != NULL) {
        par->destroy(par);
    }
    if (one != NULL) {
        one->destroy(one);
    }
    free(l1);
    free(l2);
    moe_model_free(m);
}



/* ------------------------------------------- the sharded tensor walk */

static const size_t wk_field[MOE_WK_COUNT] = {
    offsetof(moe_weights_t, embed), offsetof(moe_weights_t, lm_head),
    offsetof(moe_weights_t, pos_embed), offsetof(moe_weights_t, final_norm),
    offsetof(moe_weights_t, final_norm_b),
    offsetof(moe_weights_t, attn_norm), offsetof(moe_weights_t, attn_norm_b),
    offsetof(moe_weights_t, ffn_norm), offsetof(moe_weights_t, ffn_norm_b),
    offsetof(moe_weights_t, wq), offsetof(moe_weights_t, wk),
    offsetof(moe_weights_t, wv), offsetof(moe_weights_t, wo),
    offsetof(moe_weights_t, bq), offsetof(moe_weights_t, bk),
    offsetof(moe_weights_t, bv), offsetof(moe_weights_t, bo),
    offsetof(moe_weights_t, q_norm), offsetof(moe_weights_t, k_norm),
    offsetof(moe_weights_t, router), offsetof(moe_weights_t, w_gate),
    offsetof(moe_weights_t, w_up), offsetof(moe_weights_t, w_down),
    offsetof(moe_weights_t, b_gate), offsetof(moe_weights_t, b_up),
    offsetof(moe_weights_t, b_down), offsetof(moe_weights_t, ws_gate),
    offsetof(moe_weights_t, ws_up), offsetof(moe_weights_t, ws_down),
    offsetof(moe_weights_t, ws_gate_inp), offsetof(moe_weights_t, wd_gate),
    offsetof(moe_weights_t, wd_up), offsetof(moe_weights_t, wd_down)
};

typedef struct {
    const moe_hparams_t *hp;        /* the shard's */
    const moe_weights_t *w;         /* moe_model_shard's arrays */
    int64_t              checked, bad, pieces;
} walk_ctx_t;


static float
src_elem(const moe_tensor_ref_t *t, int64_t i)
{
    const unsigned char *p = (const unsigned char *) t->data;
    uint32_t             u = 0;
    uint16_t             h;
    float                f;

    if (t->dtype == MOE_DT_F32) {
        memcpy(&f, p + i * 4, 4);
        return f;
    }
    memcpy(&h, p + i * 2, 2);
    if (t->dtype == MOE_DT_BF16) {
        u = (uint32_t) h << 16;
        memcpy(&f, &u, 4);
        return f;
    }
    /* f16 */
    {
        int e = (h >> 10) & 31, m = h & 1023;
        float v = e == 0 ? ldexpf((float) m, -24)
                         : e == 31 ? (m ? NAN : INFINITY)
                                   : ldexpf((float) (m | 1024), e - 25);

        return (h & 0x8000) ? -v : v;
    }
}


/* every element of the piece equals the shard array's at its place */
static int
walk_check(void *vctx, const moe_tensor_ref_t *t)
{
    walk_ctx_t  *c = vctx;
    const float *arr = *(float *const *) ((const char *) c->w
                                         + wk_field[t->kind]);
    int64_t      layer = t->layer > 0 ? t->layer : 0;
    int64_t      ex = t->expert > 0 ? t->expert : 0;
    int64_t      E = t->expert >= 0 ? moe_hp_local_experts(c->hp) : 1;
    int64_t      off = (layer * E + ex) * t->rows * t->cols;

    c->pieces++;
    if (arr == NULL) {
        c->bad++;
        return MOE_OK;
    }
    for (int64_t r = 0; r < t->rows; r++) {
        for (int64_t k = 0; k < t->cols; k++) {
            float v = src_elem(t, t->transposed ? k * t->ld + r
                                                : r * t->ld + k);

            c->bad += !(v == arr[off + r * t->cols + k]);
            c->checked++;
        }
    }
    return MOE_OK;
}


static void
test_walk(const char *rel, int tp, int ep)
{
    char         dir[PATH_MAX + 64], err[512] = "";
    moe_model_t *m = NULL, *sh = NULL;
    walk_ctx_t   c;
    int          ok = 1, r, rc = MOE_OK;
    int64_t      checked = 0, bad = 0, pieces = 0;
    const char  *name = strrchr(rel, '/') + 1;
    int          placed = 1;

    snprintf(dir, sizeof(dir), "%s/%s", srcdir, rel);
    if (moe_model_load(dir, 0, &m, err, sizeof(err)) != MOE_OK) {
        TAP_OK(0, "%s: load: %s", name, err);
        return;
    }
    for (r = 0; r < tp && ok; r++) {
        rc = moe_model_shard_ep(m, tp, r, ep, &sh, err, sizeof(err));
        if (rc != MOE_OK) {
            break;
        }
        memset(&c, 0, sizeof(c));
        c.hp = moe_model_hparams(sh);
        c.w = moe_model_weights(sh);
        if (ep) {
            /* rank r: experts [r E / tp, (r + 1) E / tp), whole */
            const moe_hparams_t *hp = moe_model_hparams(m);

            placed &= c.hp->n_local_experts == hp->n_experts / tp
                      && c.hp->expert_first == r * (hp->n_experts / tp)
                      && c.hp->ffn_dim == hp->ffn_dim
                      && c.hp->n_heads == hp->n_heads / tp;
        }
        ok = moe_model_for_each_tensor_shard_ep(m, tp, r, ep, walk_check,
                                                &c, err, sizeof(err))
             == MOE_OK;
        checked += c.checked;
        bad += c.bad;
        pieces += c.pieces;
        moe_model_free(sh);
    }
    if (rc == MOE_EUNSUPPORTED) {
        TAP_DIAG("%s tp %d: %s", name, tp, err);
        moe_model_free(m);
        return;
    }
    TAP_OK(ok && rc == MOE_OK && bad == 0 && checked > 0 && placed,
           "%s tp %d%s: the sharded tensor walk (%lld pieces, %lld elements "
           "over the ranks) equals moe_model_shard%s's weights (%lld "
           "differ)%s", name, tp, ep ? " ep" : "", (long long) pieces,
           (long long) checked, ep ? "_ep" : "", (long long) bad,
           ep ? (placed ? ", whole experts E / tp per rank" : ", MISPLACED")
              : "");
    moe_model_free(m);
}

/* swap out / in on 2 ranks: every rank's pages come back bit for bit */
static void
test_swap(void)
{
    char            dir[PATH_MAX + 64], err[512];
    moe_model_t    *m = NULL;
    moe_backend_t  *par = NULL;
    moe_seq_batch_t sb;
    int32_t         toks[12], bt[4] = { 5, 1, 7, 2 }, blk = 1, slot = 3;
    int32_t         back = 9;
    char           *a = NULL, *b = NULL;
    int             ok = 0;

    snprintf(dir, sizeof(dir), "%s/models/localmoe-tiny", srcdir);
    if (moe_model_load(dir, 0, &m, err, sizeof(err)) != MOE_OK
        || cpu_ranks(m, 2, 16, BS, 1, &par, err, sizeof(err))
           != MOE_OK)
    {
        TAP_OK(0, "swap on 2 ranks: %s", err);
        moe_model_free(m);
        return;
    }
    for (int i = 0; i < 12; i++) {
        toks[i] = 10 + 3 * i;
    }
    memset(&sb, 0, sizeof(sb));
    sb.tokens = toks;
    sb.n_tokens = 12;
    sb.block_table = bt;
    sb.n_blocks = 4;
    a = malloc((size_t) par->kv_bytes_per_block);
    b = malloc((size_t) par->kv_bytes_per_block);
    if (a != NULL && b != NULL && par->forward(par, &sb, 1) == MOE_OK
        && par->swap_alloc(par, 8, err, sizeof(err)) == MOE_OK
        && par->swap_out(par, &blk, &slot, 1) == MOE_OK
        && par->swap_read(par, slot, a) == MOE_OK
        && par->swap_in(par, &slot, &back, 1) == MOE_OK
        && par->swap_out(par, &back, &slot, 1) == MOE_OK
        && par->swap_read(par, slot, b) == MOE_OK)
    {
        int nz = 0;

        for (int64_t i = 0; i < par->kv_bytes_per_block; i++) {
            nz += a[i] != 0;
        }
        ok = memcmp(a, b, (size_t) par->kv_bytes_per_block) == 0 && nz > 0;
    }
    TAP_OK(ok, "swap on 2 ranks: block 1 -> slot -> block 9 -> slot is the "
           "same %lld bytes (both ranks' halves)",
           (long long) par->kv_bytes_per_block);
    free(a);
    free(b);
    par->destroy(par);
    moe_model_free(m);
}


/* the engine with tensor_parallel_size tp: greedy streams of 6 requests */
static int
engine_run(int tp, int ep, int32_t out[6][16])
{
    char            err[1024];
    moe_config_t    cfg;
    moe_engine_t   *e;
    moe_sampling_t  sp;
    moe_event_t     ev[64];
    int32_t         prompt[6][9];
    int             live = 6, n[6] = { 0 };
    struct pollfd   pfd;

    moe_config_defaults(&cfg);
    snprintf(cfg.model_path, sizeof(cfg.model_path),
             "%.900s/models/localmoe-tiny", srcdir);
    snprintf(cfg.backend, sizeof(cfg.backend), "cpu");
    cfg.max_model_len = 64;
    cfg.block_size = 4;
    cfg.kv_cache_blocks = 64;
    cfg.tensor_parallel_size = tp;
    cfg.cpu_tensor_parallel = 1;
    cfg.expert_parallel = ep;
    cfg.cpu_threads = 2;
    if (moe_engine_create(&cfg, &e, err, sizeof(err)) != MOE_OK) {
        TAP_DIAG("engine tp %d: %s", tp, err);
        return -1;
    }
    moe_sampling_defaults(&sp);
    sp.temperature = 0.0f;
    sp.max_tokens = 16;
    sp.ignore_eos = 1;
    for (int i = 0; i < 6; i++) {
        for (int j = 0; j < 9; j++) {
            prompt[i][j] = (int32_t) (3 + (i * 41 + j * 13) % 400);
        }
        if (moe_engine_submit(e, (uint64_t) i + 1, prompt[i], 9, &sp)
            != MOE_OK)
        {
            moe_engine_destroy(e);
            return -1;
        }
    }
    pfd.fd = moe_engine_eventfd(e);
    pfd.events = POLLIN;
    while (live > 0) {
        /* a hang guard only: on a loaded machine one step of the rank
         * threads can take seconds, and the result must not depend on it */
        if (poll(&pfd, 1, 60000) <= 0) {
            TAP_DIAG("engine tp %d: no event for 60 s, %d requests live",
                     tp, live);
            break;
        }
        size_t k = moe_engine_drain(e, ev, 64);

        for (size_t j = 0; j < k; j++) {
            int r = (int) ev[j].req_id - 1;

            if (ev[j].type == MOE_EV_TOKEN && n[r] < 16) {
                out[r][n[r]++] = ev[j].token;
            } else if (ev[j].type != MOE_EV_TOKEN) {
                live--;
            }
        }
    }
    if (ep) {
        /* the per-rank load covers every routed row, on tp ranks */
        int64_t load[8], counts[4096], sum = 0, lsum = 0;
        int     n = moe_engine_rank_load(e, load, 8), c, busy = 0;

        c = moe_engine_expert_counts(e, counts, 4096);
        for (int i = 0; i < c; i++) {
            sum += counts[i];
        }
        for (int i = 0; i < n; i++) {
            lsum += load[i];
            busy += load[i] > 0;
        }
        TAP_OK(n == tp && c > 0 && lsum == sum && sum > 0 && busy == tp
               && moe_engine_rank_load(e, load, tp - 1) == MOE_EINVAL,
               "engine tp %d ep: rank load over %d ranks (%lld + %lld ...) "
               "sums to the %lld routed rows", tp, n, (long long) load[0],
               (long long) (n > 1 ? load[1] : 0), (long long) sum);
    } else if (tp == 1) {
        int64_t load[8];

        TAP_OK(moe_engine_rank_load(e, load, 8) == 0, "engine tp 1: no "
               "expert-parallel ranks reported");
    }
    moe_engine_destroy(e);
    return live == 0 ? 0 : -1;
}


int
main(int argc, char **argv)
{
    static int32_t a[6][16], b[6][16];
    char          *slash;
    int            i;

    (void) argc;
    if (getenv("MOE_SRCDIR")) {
        snprintf(srcdir, sizeof(srcdir), "%s", getenv("MOE_SRCDIR"));
    } else if (realpath(argv[0], srcdir) != NULL) {
        for (i = 0; i < 3 && (slash = strrchr(srcdir, '/')); i++) {
            *slash = '\0';
        }
    }
    for (size_t k = 0; k < sizeof(models) / sizeof(models[0]); k++) {
        test_model(models[k], 2, 0);
        test_model(models[k], 4, 0);
    }
    for (size_t k = 0; k < sizeof(models) / sizeof(models[0]); k++) {
        test_walk(models[k], 2, 0);
        test_walk(models[k], 4, 0);
    }
    /* expert parallelism: whole experts per rank, same logits */
    for (size_t k = 0; k < sizeof(models) / sizeof(models[0]); k++) {
        test_model(models[k], 2, 1);
        test_model(models[k], 4, 1);
    }
    for (size_t k = 0; k < sizeof(models) / sizeof(models[0]); k++) {
        test_walk(models[k], 2, 1);
        test_walk(models[k], 4, 1);
    }
    test_swap();
    TAP_OK(engine_run(1, 0, a) == 0 && engine_run(2, 0, b) == 0
           && memcmp(a, b, sizeof(a)) == 0, "engine: tensor_parallel_size 2 "
           "on the cpu gives the greedy streams of tp 1 (6 requests x 16 "
           "tokens)");
    memset(b, 0, sizeof(b));
    TAP_OK(engine_run(2, 1, b) == 0 && memcmp(a, b, sizeof(a)) == 0,
           "engine: tensor_parallel_size 2 with expert_parallel on the cpu "
           "gives the greedy streams of tp 1");
    TAP_PLAN(tap_n);
    return TAP_DONE();
}
