/*
 * CPU backend: the fp32 reference forward pass with a paged KV cache.
 *
 * Math follows Hugging Face's Llama/Mistral/Mixtral modelling code:
 * RMSNorm in fp32, split-halves ("rotate_half") RoPE at absolute positions,
 * grouped-query attention with an optional sliding window, SwiGLU experts,
 * softmax -> top-k -> renormalised Mixtral routing.  Optional pieces, each
 * driven by an hparams flag, cover Qwen2 (q/k/v bias), Qwen2-MoE (raw
 * top-k weights, a sigmoid-gated shared expert, dense mlp_only layers),
 * Qwen3-MoE (per-head q/k RMSNorm) and GPT-2 (LayerNorm with bias, learned
 * positions, GELU MLP with biases).
 *
 * Determinism: every output element is one dot product computed in a fixed
 * order over contiguous memory, and every token's math depends only on its
 * own sequence.  So results are bitwise identical whatever else is in the
 * step and whatever the thread count (threads split output rows or
 * (token, head) pairs, never a reduction).
 *
 * Tests can force the experts of the next step (moe_cpu_backend_force_
 * routing) and read back those of the last (moe_cpu_backend_last_routing)
 * to compare another backend's arithmetic with its routing taken out.
 */

#include <math.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "backends/backend.h"
#include "sampling/sampling.h"
#include "fp8.h"

#define CPU_MIN_PAR_WORK  (1 << 18)   /* multiply-adds worth a thread split;
                                         MOE_CPU_MIN_PAR_WORK overrides
                                         (tests force threading with 1) */
#define CPU_TOKEN_TILE    16          /* tokens per weight-row pass */


/* ---------------------------------------------------------- thread pool */

typedef void (*cpu_task_fn)(void *arg, int lo, int hi, int part);

typedef struct cpu_pool cpu_pool_t;

typedef struct {
    cpu_pool_t  *pool;
    int          part;
} cpu_worker_t;

struct cpu_pool {
    pthread_mutex_t  mu;
    pthread_cond_t   start;
    pthread_cond_t   done;
    int              n;          /* participants, caller included */
    pthread_t       *threads;    /* n - 1 */
    cpu_worker_t    *workers;
    int              n_started;
    cpu_task_fn      fn;
    void            *arg;
    int              total;
    unsigned         gen;
    int              pending;
    int              stop;
    int64_t          min_work;   /* below this, run on the caller only */
};


static void
cpu_pool_part(cpu_pool_t *p, int part)
{
    int lo = (int) ((int64_t) p->total * part / p->n);
    int hi = (int) ((int64_t) p->total * (part + 1) / p->n);

    if (lo < hi) {
        p->fn(p->arg, lo, hi, part);
    }
}


static void *
cpu_pool_main(void *a)
{
    cpu_worker_t *w = a;
    cpu_pool_t   *p = w->pool;
    unsigned      seen = 0;

    for ( ;; ) {
        pthread_mutex_lock(&p->mu);
        while (p->gen == seen && !p->stop) {
            pthread_cond_wait(&p->start, &p->mu);
        }
        if (p->stop) {
            pthread_mutex_unlock(&p->mu);
            return NULL;
        }
        seen = p->gen;
        pthread_mutex_unlock(&p->mu);

        cpu_pool_part(p, w->part);

        pthread_mutex_lock(&p->mu);
        if (--p->pending == 0) {
            pthread_cond_signal(&p->done);
        }
        pthread_mutex_unlock(&p->mu);
    }
}


static void
cpu_pool_destroy(cpu_pool_t *p)
{
    int i;

    if (p == NULL) {
        return;
    }
    pthread_mutex_lock(&p->mu);
    p->stop = 1;
    pthread_cond_broadcast(&p->start);
    pthread_mutex_unlock(&p->mu);
    for (i = 0; i < p->n_started; i++) {
        pthread_join(p->threads[i], NULL);
    }
    pthread_cond_destroy(&p->start);
    pthread_cond_destroy(&p->done);
    pthread_mutex_destroy(&p->mu);
    free(p->threads);
    free(p->workers);
    free(p);
}


static cpu_pool_t *
cpu_pool_create(int n)
{
    cpu_pool_t *p;
    const char *env;
    int         i;

    p = calloc(1, sizeof(*p));
    if (p == NULL) {
        return NULL;
    }
    p->n = n;
    p->min_work = CPU_MIN_PAR_WORK;
    env = getenv("MOE_CPU_MIN_PAR_WORK");
    if (env != NULL && atoll(env) > 0) {
        p->min_work = atoll(env);
    }
    pthread_mutex_init(&p->mu, NULL);
    pthread_cond_init(&p->start, NULL);
    pthread_cond_init(&p->done, NULL);
    p->threads = calloc((size_t) n, sizeof(*p->threads));
    p->workers = calloc((size_t) n, sizeof(*p->workers));
    if (p->threads == NULL || p->workers == NULL) {
        cpu_pool_destroy(p);
        return NULL;
    }
    for (i = 1; i < n; i++) {
        p->workers[i].pool = p;
        p->workers[i].part = i;
        if (pthread_create(&p->threads[i - 1], NULL, cpu_pool_main,
                           &p->workers[i]) != 0)
        {
            cpu_pool_destroy(p);
            return NULL;
        }
        p->n_started++;
    }
    return p;
}


/* Run fn over [0, total) split into contiguous parts; serial if small. */
static void
cpu_pool_run(cpu_pool_t *p, cpu_task_fn fn, void *arg, int total,
    int64_t work)
{
    if (p->n == 1 || work < p->min_work || total < 2) {
        if (total > 0) {
            fn(arg, 0, total, 0);
        }
        return;
    }
    pthread_mutex_lock(&p->mu);
    p->fn = fn;
    p->arg = arg;
    p->total = total;
    p->pending = p->n - 1;
    p->gen++;
    pthread_cond_broadcast(&p->start);
    pthread_mutex_unlock(&p->mu);

    cpu_pool_part(p, 0);

    pthread_mutex_lock(&p->mu);
    while (p->pending > 0) {
        pthread_cond_wait(&p->done, &p->mu);
    }
    pthread_mutex_unlock(&p->mu);
}


/* ----------------------------------------------------------- the backend */

typedef struct {
    moe_backend_t         base;        /* first: the public interface */
    const moe_model_t    *model;
    const moe_hparams_t  *hp;
    const moe_weights_t  *w;
    int                   n_blocks;
    int                   block_size;
    int                   n_threads;
    int                   ctx_max;     /* scores row length (grown to the
                                           longest context seen) */
    float                *kv;          /* (n_blocks, n_layers, 2,
                                           block_size, n_kv_heads,
                                           head_dim) */
    int64_t              *counts;      /* (n_layers, n_experts) */
    cpu_pool_t           *pool;
    float                *scores;      /* (n_threads, ctx_max) attention
                                           probabilities */

    /* per-step scratch, for up to cap tokens */
    int                   cap;
    float                *x;           /* (cap, dim) residual stream */
    float                *xb;          /* (cap, dim) normed input */
    float                *q;           /* (cap, n_heads * head_dim) */
    float                *k;           /* (cap, n_kv_heads * head_dim) */
    float                *v;           /* (cap, n_kv_heads * head_dim) */
    float                *att;         /* (cap, n_heads * head_dim) */
    float                *tmp;         /* (cap, dim) */
    float                *rcos;        /* (cap, head_dim / 2) */
    float                *rinv;        /* (head_dim / 2) RoPE frequencies
                                          (model/rope.c), and per sequence
                                          for dynamic scaling */
    float                *rinv_seq;
    float                 ratt;        /* cos/sin scale (yarn) */
    float                *rsin;        /* (cap, head_dim / 2) */
    int                  *tseq;        /* (cap) sequence of each token */
    int                  *tpos;        /* (cap) absolute position */
    float                *rlogits;     /* (cap, n_experts) */
    int                  *sel;         /* (cap, top_k) chosen experts */
    float                *selw;        /* (cap, top_k) their weights */
    int                  *slot_of;     /* (cap * top_k) -> row in xe */
    float                *xe;          /* (cap * top_k, dim) gathered */
    float                *hg;          /* (cap * hmax) */
    float                *hu;          /* (cap * hmax); hmax = max(top_k *
                                           ffn_dim, shared_ffn_dim,
                                           dense_ffn_dim) */
    float                *ys;          /* (cap, dim) shared expert out */
    float                *sg;          /* (cap) shared expert gate logit */
    float                *ye;          /* (cap * top_k, dim) */
    int                  *erow;        /* (cap * top_k) token slot by row */
    int                  *ecount;      /* (n_experts) */
    int                  *eoff;        /* (n_experts + 1) */
    float                *vlogits;     /* (vocab_size) logits of a row that
                                           wants only token_out */
    moe_sampler_t         sampler;     /* token_out rows with .sample */
    int32_t              *pcounts;     /* (vocab_size) zero but while one
                                           row's penalty list is applied */
    uint8_t              *pseen;       /* (vocab_size) likewise */

    /* per-step sequence table */
    const moe_seq_batch_t *seqs;

    /* tensor parallel: sums the (T, dim) partial outputs of o_proj and of
     * the FFN over the ranks, in place (moe_tp_backend_wrap) */
    moe_reduce_fn         reduce;
    void                 *reduce_ctx;

    /* tests: routing of the last step and a forced routing for the next
     * (moe_cpu_backend_force_routing / _last_routing) */
    int32_t              *route_last;  /* (route_cap, n_layers, top_k) */
    int                   route_cap;   /* tokens route_last can hold */
    int                   route_T;     /* tokens of the last step; -1 after
                                           a failed step */
    int32_t              *route_force; /* (force_T, n_layers, top_k) or
                                           NULL: next step picks itself */
    int                   force_T;

    /* swap space: n_swap_slots slots, each one block as in kv */
    float                *swap;        /* (n_swap_slots, n_layers, 2,
                                           block_size, n_kv_heads,
                                           head_dim) */

    /* fp8 KV cache (kv_cache_dtype fp8, moe_cpu_backend_set_kv_fp8):
     * K/V stored as fp32 values rounded through e4m3 with these per-tensor
     * scales, exactly what the CUDA backend's cache gives back */
    int                   kv_fp8;
    int                   kv_grow_step;  /* MOE_CPU_KV_GROW (tests) */
    float                 kv_ks[MOE_MAX_LAYERS];  /* by layer */
    float                 kv_vs[MOE_MAX_LAYERS];
    int64_t               budget;      /* bytes reserved in the emulated
                                          memory budget (cpu_budget.c) */
} cpu_backend_t;


static inline float
cpu_dot(const float *a, const float *b, int n)
{
    float s0 = 0, s1 = 0, s2 = 0, s3 = 0, s4 = 0, s5 = 0, s6 = 0, s7 = 0;
    float r;
    int   i = 0;

    for (; i + 8 <= n; i += 8) {
        s0 += a[i] * b[i];
        s1 += a[i + 1] * b[i + 1];
        s2 += a[i + 2] * b[i + 2];
        s3 += a[i + 3] * b[i + 3];
        s4 += a[i + 4] * b[i + 4];
        s5 += a[i + 5] * b[i + 5];
        s6 += a[i + 6] * b[i + 6];
        s7 += a[i + 7] * b[i + 7];
    }
    r = ((s0 + s1) + (s2 + s3)) + ((s4 + s5) + (s6 + s7));
    for (; i < n; i++) {
        r += a[i] * b[i];
    }
    return r;
}


/* out[i * ldo + r] = W[r, :] . x[i, :] for i < m, r < n (W is (n, d)). */
typedef struct {
    float        *out;
    int           ldo;
    const float  *x;
    int           m;
    const float  *W;
    int           d;
} cpu_mm_t;


static void
cpu_mm_task(void *arg, int lo, int hi, int part)
{
    const cpu_mm_t *a = arg;
    int             i0, i1, i, r;

    (void) part;
    for (i0 = 0; i0 < a->m; i0 += CPU_TOKEN_TILE) {
        i1 = i0 + CPU_TOKEN_TILE < a->m ? i0 + CPU_TOKEN_TILE : a->m;
        for (r = lo; r < hi; r++) {
            const float *wr = a->W + (size_t) r * (size_t) a->d;

            for (i = i0; i < i1; i++) {
                a->out[(size_t) i * (size_t) a->ldo + (size_t) r] =
                    cpu_dot(wr, a->x + (size_t) i * (size_t) a->d, a->d);
            }
        }
    }
}


static void
cpu_matmul(cpu_backend_t *b, float *out, int ldo, const float *x, int m,
    const float *W, int n, int d)
{
    cpu_mm_t a;

    if (m <= 0) {
        return;
    }
    a.out = out;
    a.ldo = ldo;
    a.x = x;
    a.m = m;
    a.W = W;
    a.d = d;
    cpu_pool_run(b->pool, cpu_mm_task, &a, n, (int64_t) m * n * d);
}


static void
cpu_rmsnorm(float *out, const float *x, const float *w, int n, float eps)
{
    double ss = 0;
    float  inv;
    int    i;

    for (i = 0; i < n; i++) {
        ss += (double) x[i] * x[i];
    }
    inv = 1.0f / sqrtf((float) (ss / n) + eps);
    for (i = 0; i < n; i++) {
        out[i] = w[i] * (x[i] * inv);
    }
}


/* rotate_half RoPE on one head vector of length hd. */
static void
cpu_rope(float *v, const float *c, const float *s, int hd)
{
    int half = hd / 2, i;

    for (i = 0; i < half; i++) {
        float x1 = v[i], x2 = v[i + half];

        v[i] = x1 * c[i] - x2 * s[i];
        v[i + half] = x2 * c[i] + x1 * s[i];
    }
}


static inline float *
cpu_kv_at(cpu_backend_t *b, int block, int layer, int which, int off)
{
    const moe_hparams_t *hp = b->hp;
    size_t               row = (size_t) hp->n_kv_heads * hp->head_dim;

    return b->kv + ((((size_t) block * hp->n_layers + layer) * 2 + which)
                    * b->block_size + off) * row;
}


/* fp8 KV cache: round the K and V rows just written at (block, layer,
 * off) through e4m3 with the per-tensor scales (kernels/fp8.h, as the
 * CUDA backend's rope_kv_fp8 stores them). */
static void
cpu_kv_round_fp8(cpu_backend_t *b, int block, int layer, int off)
{
    int    n = b->hp->n_kv_heads * b->hp->head_dim, i;
    float *k = cpu_kv_at(b, block, layer, 0, off);
    float *v = cpu_kv_at(b, block, layer, 1, off);

    for (i = 0; i < n; i++) {
        k[i] = moe_fp8_round(k[i], b->kv_ks[layer]);
        v[i] = moe_fp8_round(v[i], b->kv_vs[layer]);
    }
}


/* Attention over (token, head) pairs [lo, hi). */
typedef struct {
    cpu_backend_t  *b;
    int             layer;
} cpu_att_t;


static void
cpu_att_task(void *arg, int lo, int hi, int part)
{
    const cpu_att_t     *a = arg;
    cpu_backend_t       *b = a->b;
    const moe_hparams_t *hp = b->hp;
    int                  hd = hp->head_dim, nh = hp->n_heads;
    int                  group = hp->n_heads / hp->n_kv_heads;
    float               *sc = b->scores + (size_t) part * b->ctx_max;
    float                scale = 1.0f / sqrtf((float) hd);
    int                  item;

    for (item = lo; item < hi; item++) {
        int                    t = item / nh, h = item % nh;
        int                    p = b->tpos[t], kvh = h / group;
        const moe_seq_batch_t *s = &b->seqs[b->tseq[t]];
        const float           *q = b->q + (size_t) t * nh * hd
                                   + (size_t) h * hd;
        float                 *o = b->att + (size_t) t * nh * hd
                                   + (size_t) h * hd;
        int                    j, j0, d;
        float                  mx, sum, pj;

        j0 = 0;
        if (hp->sliding_window > 0 && p - hp->sliding_window + 1 > 0) {
            j0 = p - hp->sliding_window + 1;
        }
        mx = -INFINITY;
        for (j = j0; j <= p; j++) {
            const float *kp = cpu_kv_at(b, s->block_table[j / b->block_size],
                                        a->layer, 0, j % b->block_size)
                              + (size_t) kvh * hd;

            sc[j] = cpu_dot(q, kp, hd) * scale;
            if (sc[j] > mx) {
                mx = sc[j];
            }
        }
        sum = 0;
        for (j = j0; j <= p; j++) {
            sc[j] = expf(sc[j] - mx);
            sum += sc[j];
        }
        for (d = 0; d < hd; d++) {
            o[d] = 0;
        }
        for (j = j0; j <= p; j++) {
            const float *vp = cpu_kv_at(b, s->block_table[j / b->block_size],
                                        a->layer, 1, j % b->block_size)
                              + (size_t) kvh * hd;

            pj = sc[j] / sum;
            for (d = 0; d < hd; d++) {
                o[d] += pj * vp[d];
            }
        }
    }
}


static void
cpu_free_scratch(cpu_backend_t *b)
{
    free(b->x);
    free(b->xb);
    free(b->q);
    free(b->k);
    free(b->v);
    free(b->att);
    free(b->tmp);
    free(b->rcos);
    free(b->rinv);
    free(b->rinv_seq);
    free(b->rsin);
    free(b->tseq);
    free(b->tpos);
    free(b->rlogits);
    free(b->sel);
    free(b->selw);
    free(b->slot_of);
    free(b->xe);
    free(b->hg);
    free(b->hu);
    free(b->ye);
    free(b->erow);
    free(b->ys);
    free(b->sg);
    free(b->vlogits);
    b->vlogits = NULL;
    b->ys = b->sg = NULL;
    b->x = b->xb = b->q = b->k = b->v = b->att = b->tmp = NULL;
    b->rcos = b->rsin = b->rlogits = b->selw = NULL;
    b->xe = b->hg = b->hu = b->ye = NULL;
    b->tseq = b->tpos = b->sel = b->slot_of = b->erow = NULL;
    b->cap = 0;
}


/* A row's drawn token (moe_seq_batch_t.sample): moe_sample_u() over ids
 * < n_valid with the row's penalty lists spread into the zeroed pcounts /
 * pseen for the call.  lg is modified (penalties). */
static int32_t
cpu_sample_row(cpu_backend_t *b, float *lg, const moe_seq_batch_t *sq)
{
    int             V = b->hp->vocab_size, i, n;
    float           lp;
    int32_t         tok;
    moe_sampling_t  sp;

    n = sq->n_valid > 0 && sq->n_valid < V ? sq->n_valid : V;
    for (i = 0; i < sq->n_pen; i++) {
        if (sq->pen_tok[i] >= 0 && sq->pen_tok[i] < V) {
            b->pcounts[sq->pen_tok[i]] = sq->pen_cnt[i];
            b->pseen[sq->pen_tok[i]] = sq->pen_seen[i];
        }
    }
    b->sampler.vocab = n;           /* scratch holds V >= n entries */
    sp = *sq->sample;
    sp.logprobs = 0;                /* lp_out: cpu_logprobs_row() */
    sp.n_logit_bias = 0;            /* the row's bias: cpu_bias_row() */
    tok = moe_sample_u(&b->sampler, lg, &sp, b->pcounts, b->pseen,
                       sq->u, &lp);
    for (i = 0; i < sq->n_pen; i++) {
        if (sq->pen_tok[i] >= 0 && sq->pen_tok[i] < V) {
            b->pcounts[sq->pen_tok[i]] = 0;
            b->pseen[sq->pen_tok[i]] = 0;
        }
    }
    return tok;
}


/* ---- logit_bias on the backend (moe_seq_batch_t.bias_ids / bias) */

/* Add a token_out row's logit_bias to its logits lg (vocab_size floats),
 * in list order, as moe_sample_u() does before its penalties. */
static void
cpu_bias_row(cpu_backend_t *b, float *lg, const moe_seq_batch_t *sq)
{
    int  V = b->hp->vocab_size, j;

    for (j = 0; j < sq->n_bias; j++) {
        if (sq->bias_ids[j] >= 0 && sq->bias_ids[j] < V) {
            lg[sq->bias_ids[j]] += sq->bias[j];
        }
    }
}


/* lp_out / lp_top of a row whose token_out is set, from its logits as the
 * draw left them (penalised in place) */
static void
cpu_logprobs_row(cpu_backend_t *b, const float *lg, const moe_seq_batch_t *sq)
{
    int    V = b->hp->vocab_size, n;
    float  t;

    n = sq->n_valid > 0 && sq->n_valid < V ? sq->n_valid : V;
    t = sq->sample != NULL && b->base.sample_tokens
        ? sq->sample->temperature : 0.0f;
    *sq->lp_out = moe_logprobs_row(lg, n, t, *sq->token_out, sq->lp_k,
                                   sq->lp_top);
}


/* The greedy id: the first maximum of lg[0..n) (n = n_valid when 0 <
 * n_valid < V, else V), the same scan as moe_sample()'s greedy path. */
static int32_t
cpu_argmax(const float *lg, int V, int n_valid)
{
    int  i, n = n_valid > 0 && n_valid < V ? n_valid : V, best = 0;

    for (i = 1; i < n; i++) {
        if (lg[i] > lg[best]) {
            best = i;
        }
    }
    return (int32_t) best;
}


/* Make the scratch hold n tokens; MOE_ENOMEM leaves it empty but valid. */
static int
cpu_reserve(cpu_backend_t *b, int n)
{
    const moe_hparams_t *hp = b->hp;
    size_t               N, K, D, Q, KV, F, E, H;

    if (n <= b->cap) {
        return MOE_OK;
    }
    cpu_free_scratch(b);
    N = (size_t) n;
    K = (size_t) hp->top_k;
    D = (size_t) hp->dim;
    Q = (size_t) hp->n_heads * hp->head_dim;
    KV = (size_t) hp->n_kv_heads * hp->head_dim;
    F = (size_t) hp->ffn_dim;
    E = (size_t) hp->n_experts;
    H = K * F;
    H = (size_t) hp->shared_ffn_dim > H ? (size_t) hp->shared_ffn_dim : H;
    H = (size_t) hp->dense_ffn_dim > H ? (size_t) hp->dense_ffn_dim : H;

    b->x = malloc(N * D * sizeof(float));
    b->xb = malloc(N * D * sizeof(float));
    b->q = malloc(N * Q * sizeof(float));
    b->k = malloc(N * KV * sizeof(float));
    b->v = malloc(N * KV * sizeof(float));
    b->att = malloc(N * Q * sizeof(float));
    b->tmp = malloc(N * D * sizeof(float));
    b->rcos = malloc(N * (size_t) (hp->head_dim / 2) * sizeof(float));
    b->rinv = malloc((size_t) (hp->head_dim / 2) * sizeof(float));
    b->rinv_seq = malloc((size_t) (hp->head_dim / 2) * sizeof(float));
    if (b->rinv != NULL) {
        moe_rope_inv_freq(hp, b->rinv, &b->ratt);
    }
    b->rsin = malloc(N * (size_t) (hp->head_dim / 2) * sizeof(float));
    b->tseq = malloc(N * sizeof(int));
    b->tpos = malloc(N * sizeof(int));
    b->rlogits = malloc(N * E * sizeof(float));
    b->sel = malloc(N * K * sizeof(int));
    b->selw = malloc(N * K * sizeof(float));
    b->slot_of = malloc(N * K * sizeof(int));
    b->xe = malloc(N * K * D * sizeof(float));
    b->hg = malloc(N * H * sizeof(float));
    b->hu = malloc(N * H * sizeof(float));
    b->ys = malloc(N * D * sizeof(float));
    b->sg = malloc(N * sizeof(float));
    b->ye = malloc(N * K * D * sizeof(float));
    b->erow = malloc(N * K * sizeof(int));
    b->vlogits = malloc((size_t) hp->vocab_size * sizeof(float));
    if (!b->vlogits || !b->x || !b->xb || !b->q || !b->k || !b->v || !b->att || !b->tmp
        || !b->rcos || !b->rsin || !b->rinv || !b->rinv_seq || !b->tseq || !b->tpos || !b->rlogits
        || !b->sel || !b->selw || !b->slot_of || !b->xe || !b->hg || !b->hu
        || !b->ye || !b->erow || !b->ys || !b->sg)
    {
        cpu_free_scratch(b);
        return MOE_ENOMEM;
    }
    b->cap = n;
    return MOE_OK;
}


/* LayerNorm with bias over n (GPT-2), statistics in double. */
static void
cpu_layernorm(float *out, const float *x, const float *w, const float *bias,
    int n, float eps)
{
    double s = 0, ss = 0;
    float  mean, inv;
    int    i;

    for (i = 0; i < n; i++) {
        s += x[i];
    }
    mean = (float) (s / n);
    for (i = 0; i < n; i++) {
        double d = (double) x[i] - mean;

        ss += d * d;
    }
    inv = 1.0f / sqrtf((float) (ss / n) + eps);
    for (i = 0; i < n; i++) {
        out[i] = (x[i] - mean) * inv * w[i] + bias[i];
    }
}


/* The model's norm (RMSNorm, or LayerNorm when hp->norm_layer) of T rows. */
static void
cpu_norm(cpu_backend_t *b, float *out, const float *x, int T, const float *w,
    const float *bias)
{
    const moe_hparams_t *hp = b->hp;
    int                  D = hp->dim, t;

    for (t = 0; t < T; t++) {
        if (hp->norm_layer) {
            cpu_layernorm(out + (size_t) t * D, x + (size_t) t * D, w, bias,
                          D, hp->norm_eps);
        } else {
            cpu_rmsnorm(out + (size_t) t * D, x + (size_t) t * D, w, D,
                        hp->norm_eps);
        }
    }
}


static inline float
cpu_gelu(float x, int act)
{
    if (act == MOE_ACT_GELU) {
        return 0.5f * x * (1.0f + erff(x * 0.70710678118654752f));
    }
    return 0.5f * x * (1.0f + tanhf(0.79788456080286536f
                                    * (x + 0.044715f * x * x * x)));
}


/*
 * One MLP over n rows of x (dim wide) into out (n, dim):
 *   gated:   down(act(gate x + bg) * (up x + bu)) + bd
 *   ungated: down(act(up x + bu)) + bd            (Wg == NULL)
 * F is the hidden width; hg/hu hold n * F floats; biases may be NULL.
 */
static void
cpu_mlp(cpu_backend_t *b, float *out, const float *x, int n, const float *Wg,
    const float *Wu, const float *Wd, const float *bg, const float *bu,
    const float *bd, int F, float *hg, float *hu)
{
    const moe_hparams_t *hp = b->hp;
    int                  D = hp->dim, act = hp->act, r, j;

    if (n <= 0) {
        return;
    }
    if (Wg != NULL) {
        cpu_matmul(b, hg, F, x, n, Wg, F, D);
    }
    cpu_matmul(b, hu, F, x, n, Wu, F, D);
    for (r = 0; r < n; r++) {
        float *g = hg + (size_t) r * F, *u = hu + (size_t) r * F;

        if (bu != NULL) {
            for (j = 0; j < F; j++) {
                u[j] += bu[j];
            }
        }
        if (Wg == NULL) {
            for (j = 0; j < F; j++) {
                u[j] = act == MOE_ACT_SILU ? u[j] / (1.0f + expf(-u[j]))
                                           : cpu_gelu(u[j], act);
            }
            continue;
        }
        if (bg != NULL) {
            for (j = 0; j < F; j++) {
                g[j] += bg[j];
            }
        }
        if (act == MOE_ACT_SILU) {
            for (j = 0; j < F; j++) {
                g[j] = g[j] / (1.0f + expf(-g[j])) * u[j];
            }
        } else {
            for (j = 0; j < F; j++) {
                g[j] = cpu_gelu(g[j], act) * u[j];
            }
        }
    }
    cpu_matmul(b, out, D, Wg != NULL ? hg : hu, n, Wd, D, F);
    if (bd != NULL) {
        for (r = 0; r < n; r++) {
            for (j = 0; j < D; j++) {
                out[(size_t) r * D + j] += bd[j];
            }
        }
    }
}


/* Record the experts of `layer` for the T tokens of this step into
 * route_last (b->sel, or -1 when the layer does not route). */
static void
cpu_route_log(cpu_backend_t *b, int layer, int T, int routed)
{
    int    K = b->hp->top_k, L = b->hp->n_layers, t, k;

    for (t = 0; t < T; t++) {
        int32_t *o = b->route_last + ((size_t) t * L + layer) * K;

        for (k = 0; k < K; k++) {
            o[k] = routed ? b->sel[t * K + k] : -1;
        }
    }
}


/* Mixture of experts (or the one dense FFN) for T tokens of b->xb, result
 * into b->tmp. */
static void
cpu_ffn(cpu_backend_t *b, int layer, int T)
{
    const moe_hparams_t *hp = b->hp;
    const moe_weights_t *w = b->w;
    int                  D = hp->dim, F = hp->ffn_dim, E = hp->n_experts;
    int                  K = hp->top_k;
    size_t               lE = (size_t) layer * E, lu = (size_t) layer;
    int                  t, e, k, j, r, n_rows;
    int                  El = moe_hp_local_experts(hp);
    int                  e_lo = hp->expert_first, e_hi = e_lo + El;

    if (hp->layer_dense[layer]) {
        /* a dense layer of an MoE model (mlp_only_layers) */
        size_t FD = (size_t) hp->dense_ffn_dim;

        cpu_mlp(b, b->tmp, b->xb, T, w->wd_gate + lu * FD * D,
                w->wd_up + lu * FD * D, w->wd_down + lu * D * FD, NULL, NULL,
                NULL, (int) FD, b->hg, b->hu);
        cpu_route_log(b, layer, T, 0);
        return;
    }

    if (E == 1) {
        for (t = 0; t < T; t++) {
            b->sel[t * K] = 0;
            b->selw[t * K] = 1.0f;
        }
    } else {
        cpu_matmul(b, b->rlogits, E, b->xb, T, w->router + lE * D, E, D);
        for (t = 0; t < T; t++) {
            float *lg = b->rlogits + (size_t) t * E;
            float  mx = -INFINITY, sum = 0, ksum = 0;

            /* softmax over all experts, in fp32 */
            for (e = 0; e < E; e++) {
                mx = lg[e] > mx ? lg[e] : mx;
            }
            for (e = 0; e < E; e++) {
                lg[e] = expf(lg[e] - mx);
                sum += lg[e];
            }
            for (e = 0; e < E; e++) {
                lg[e] /= sum;
            }
            /* top-k, ties to the lower index; or the forced experts
             * (tests), weighted by these same probabilities */
            for (k = 0; k < K; k++) {
                int best = -1;

                if (b->route_force != NULL) {
                    best = b->route_force[((size_t) t * hp->n_layers + lu)
                                          * K + k];
                }
                for (e = 0; b->route_force == NULL && e < E; e++) {
                    int taken = 0;

                    for (j = 0; j < k; j++) {
                        taken |= b->sel[t * K + j] == e;
                    }
                    if (!taken && (best < 0 || lg[e] > lg[best])) {
                        best = e;
                    }
                }
                b->sel[t * K + k] = best;
                b->selw[t * K + k] = lg[best];
                ksum += lg[best];
            }
            /* Mixtral / norm_topk_prob: renormalise the chosen weights */
            if (!hp->router_no_renorm) {
                for (k = 0; k < K; k++) {
                    b->selw[t * K + k] /= ksum;
                }
            }
        }
    }

    cpu_route_log(b, layer, T, E > 1);

    /* group (token, k) slots by expert */
    memset(b->ecount, 0, (size_t) E * sizeof(int));
    for (t = 0; t < T * K; t++) {
        b->ecount[b->sel[t]]++;
    }
    b->eoff[0] = 0;
    for (e = 0; e < E; e++) {
        b->eoff[e + 1] = b->eoff[e] + b->ecount[e];
        b->counts[lE + e] += b->ecount[e];
        b->ecount[e] = 0;
    }
    for (t = 0; t < T * K; t++) {
        e = b->sel[t];
        r = b->eoff[e] + b->ecount[e]++;
        b->erow[r] = t;
        b->slot_of[t] = r;
        memcpy(b->xe + (size_t) r * D, b->xb + (size_t) (t / K) * D,
               (size_t) D * sizeof(float));
    }

    for (e = e_lo; e < e_hi; e++) {
        /* expert parallel: only this rank's experts, stored from 0 */
        size_t wi = (lu * (size_t) El + (size_t) (e - e_lo)) * (size_t) F
                    * D;
        int    r0 = b->eoff[e];

        n_rows = b->ecount[e];
        if (n_rows == 0) {
            continue;
        }
        /* biases only exist on dense models (E == 1) */
        cpu_mlp(b, b->ye + (size_t) r0 * D, b->xe + (size_t) r0 * D, n_rows,
                w->w_gate != NULL ? w->w_gate + wi : NULL, w->w_up + wi,
                w->w_down + wi,
                w->b_gate != NULL ? w->b_gate + lu * F : NULL,
                w->b_up != NULL ? w->b_up + lu * F : NULL,
                w->b_down != NULL ? w->b_down + lu * D : NULL,
                F, b->hg + (size_t) r0 * F, b->hu + (size_t) r0 * F);
    }

    /* weighted sum per token, in ascending expert order (as HF adds) */
    for (t = 0; t < T; t++) {
        float *o = b->tmp + (size_t) t * D;

        for (j = 0; j < D; j++) {
            o[j] = 0;
        }
        for (e = e_lo; e < e_hi; e++) {
            for (k = 0; k < K; k++) {
                if (b->sel[t * K + k] == e) {
                    const float *y = b->ye
                                     + (size_t) b->slot_of[t * K + k] * D;
                    float        wk = b->selw[t * K + k];

                    for (j = 0; j < D; j++) {
                        o[j] += y[j] * wk;
                    }
                }
            }
        }
    }

    /* Qwen2-MoE shared expert: + sigmoid(gate . x) * shared(x) */
    if (hp->shared_ffn_dim > 0) {
        size_t FS = (size_t) hp->shared_ffn_dim;

        cpu_mlp(b, b->ys, b->xb, T, w->ws_gate + lu * FS * D,
                w->ws_up + lu * FS * D, w->ws_down + lu * D * FS, NULL, NULL,
                NULL, (int) FS, b->hg, b->hu);
        cpu_matmul(b, b->sg, 1, b->xb, T, w->ws_gate_inp + lu * D, 1, D);
        for (t = 0; t < T; t++) {
            float        sgm = 1.0f / (1.0f + expf(-b->sg[t]));
            float       *o = b->tmp + (size_t) t * D;
            const float *y = b->ys + (size_t) t * D;

            for (j = 0; j < D; j++) {
                o[j] += sgm * y[j];
            }
        }
    }
}


static int
cpu_forward_step(moe_backend_t *base, const moe_seq_batch_t *seqs, int n)
{
    cpu_backend_t       *b = (cpu_backend_t *) base;
    const moe_hparams_t *hp = b->hp;
    const moe_weights_t *w = b->w;
    int                  D = hp->dim, hd = hp->head_dim, half = hd / 2;
    int                  Q = hp->n_heads * hd, KV = hp->n_kv_heads * hd;
    int                  T, s, i, t, l, h, rc, ctx;
    cpu_att_t            at;

    if (n < 0 || (n > 0 && seqs == NULL)) {
        return MOE_EINVAL;
    }
    /* validate everything before touching the cache */
    /* a pool that grows: ids past the usable ones are an engine bug */
    if (moe_batch_check(hp, seqs, n, b->base.n_kv_usable > 0
                                     ? b->base.n_kv_usable : b->n_blocks,
                        b->block_size, 1 << 24,
                        &T, NULL, &ctx) != MOE_OK)
    {
        return MOE_EINVAL;
    }
    if (T == 0) {
        return MOE_OK;
    }
    if (b->route_force != NULL && b->force_T != T) {
        return MOE_EINVAL;          /* forced routing for another step */
    }
    rc = cpu_reserve(b, T);
    if (rc != MOE_OK) {
        return rc;
    }
    if (T > b->route_cap) {
        int32_t *nr = realloc(b->route_last, (size_t) T * hp->n_layers
                                             * hp->top_k * sizeof(int32_t));

        if (nr == NULL) {
            return MOE_ENOMEM;
        }
        b->route_last = nr;
        b->route_cap = T;
    }
    if (ctx > b->ctx_max) {
        float *ns = realloc(b->scores,
                            (size_t) b->n_threads * ctx * sizeof(float));

        if (ns == NULL) {
            return MOE_ENOMEM;
        }
        b->scores = ns;
        b->ctx_max = ctx;
    }
    b->seqs = seqs;

    /* embeddings, token tables, RoPE angles */
    t = 0;
    for (s = 0; s < n; s++) {
        const float *inv = b->rinv;

        if (hp->rope_type == MOE_ROPE_DYNAMIC && !hp->learned_pos) {
            /* transformers: the base for the sequence's length so far
             * (the largest position in this forward, + 1) */
            moe_rope_inv_freq_base(hp, moe_rope_dynamic_base(hp,
                                   seqs[s].pos + seqs[s].n_tokens),
                                   b->rinv_seq);
            inv = b->rinv_seq;
        }
        for (i = 0; i < seqs[s].n_tokens; i++, t++) {
            float pos = (float) (seqs[s].pos + i);

            b->tseq[t] = s;
            b->tpos[t] = seqs[s].pos + i;
            memcpy(b->x + (size_t) t * D,
                   w->embed + (size_t) seqs[s].tokens[i] * D,
                   (size_t) D * sizeof(float));
            if (hp->learned_pos) {
                const float *pe = w->pos_embed + (size_t) b->tpos[t] * D;
                float       *xt = b->x + (size_t) t * D;

                for (h = 0; h < D; h++) {
                    xt[h] += pe[h];
                }
                continue;
            }
            for (h = 0; h < half; h++) {
                /* as HF: angle = pos * inv_freq in fp32, cos and sin
                 * times the attention scaling (1 but for yarn) */
                float ang = pos * inv[h];

                b->rcos[(size_t) t * half + h] = cosf(ang) * b->ratt;
                b->rsin[(size_t) t * half + h] = sinf(ang) * b->ratt;
            }
        }
    }

    for (l = 0; l < hp->n_layers; l++) {
        size_t lu = (size_t) l;

        cpu_norm(b, b->xb, b->x, T, w->attn_norm + lu * D,
                 hp->norm_layer ? w->attn_norm_b + lu * D : NULL);
        cpu_matmul(b, b->q, Q, b->xb, T, w->wq + lu * Q * D, Q, D);
        cpu_matmul(b, b->k, KV, b->xb, T, w->wk + lu * KV * D, KV, D);
        cpu_matmul(b, b->v, KV, b->xb, T, w->wv + lu * KV * D, KV, D);
        if (hp->qkv_bias) {
            for (t = 0; t < T; t++) {
                for (i = 0; i < Q; i++) {
                    b->q[(size_t) t * Q + i] += w->bq[lu * Q + i];
                }
                for (i = 0; i < KV; i++) {
                    b->k[(size_t) t * KV + i] += w->bk[lu * KV + i];
                    b->v[(size_t) t * KV + i] += w->bv[lu * KV + i];
                }
            }
        }
        if (hp->qk_norm) {
            /* Qwen3: RMSNorm over each head, before RoPE */
            for (t = 0; t < T * hp->n_heads; t++) {
                float *qh = b->q + (size_t) t * hd;

                cpu_rmsnorm(qh, qh, w->q_norm + lu * hd, hd, hp->norm_eps);
            }
            for (t = 0; t < T * hp->n_kv_heads; t++) {
                float *kh = b->k + (size_t) t * hd;

                cpu_rmsnorm(kh, kh, w->k_norm + lu * hd, hd, hp->norm_eps);
            }
        }

        for (t = 0; t < T; t++) {
            const moe_seq_batch_t *sq = &seqs[b->tseq[t]];
            const float           *c = b->rcos + (size_t) t * half;
            const float           *sn = b->rsin + (size_t) t * half;
            int                    p = b->tpos[t];

            for (h = 0; !hp->learned_pos && h < hp->n_heads; h++) {
                cpu_rope(b->q + (size_t) t * Q + (size_t) h * hd, c, sn, hd);
            }
            for (h = 0; !hp->learned_pos && h < hp->n_kv_heads; h++) {
                cpu_rope(b->k + (size_t) t * KV + (size_t) h * hd, c, sn, hd);
            }
            memcpy(cpu_kv_at(b, sq->block_table[p / b->block_size], l, 0,
                             p % b->block_size),
                   b->k + (size_t) t * KV, (size_t) KV * sizeof(float));
            memcpy(cpu_kv_at(b, sq->block_table[p / b->block_size], l, 1,
                             p % b->block_size),
                   b->v + (size_t) t * KV, (size_t) KV * sizeof(float));
            if (b->kv_fp8) {
                cpu_kv_round_fp8(b, sq->block_table[p / b->block_size], l,
                                 p % b->block_size);
            }
        }

        at.b = b;
        at.layer = l;
        cpu_pool_run(b->pool, cpu_att_task, &at, T * hp->n_heads,
                     (int64_t) T * hp->n_heads * hd * 64);

        cpu_matmul(b, b->tmp, D, b->att, T, w->wo + lu * D * Q, D, Q);
        if (hp->o_bias) {
            for (i = 0; i < T * D; i++) {
                b->tmp[i] += w->bo[lu * D + (size_t) (i % D)];
            }
        }
        if (b->reduce != NULL) {
            b->reduce(b->reduce_ctx, b->tmp, (size_t) T * D);
        }
        for (i = 0; i < T * D; i++) {
            b->x[i] += b->tmp[i];
        }

        cpu_norm(b, b->xb, b->x, T, w->ffn_norm + lu * D,
                 hp->norm_layer ? w->ffn_norm_b + lu * D : NULL);
        cpu_ffn(b, l, T);
        if (b->reduce != NULL) {
            b->reduce(b->reduce_ctx, b->tmp, (size_t) T * D);
        }
        for (i = 0; i < T * D; i++) {
            b->x[i] += b->tmp[i];
        }
    }

    /* logits and / or the greedy token of the last token of each
     * sequence that asks for them */
    t = 0;
    for (s = 0; s < n; s++) {
        float *lg = seqs[s].logits != NULL ? seqs[s].logits : b->vlogits;

        t += seqs[s].n_tokens;
        if (seqs[s].logits == NULL && seqs[s].token_out == NULL) {
            continue;
        }
        cpu_norm(b, b->xb, b->x + (size_t) (t - 1) * D, 1, w->final_norm,
                 w->final_norm_b);
        cpu_matmul(b, lg, hp->vocab_size, b->xb, 1, w->lm_head,
                   hp->vocab_size, D);
        if (seqs[s].token_out != NULL && seqs[s].n_bias > 0
            && b->base.logit_bias_device)
        {
            cpu_bias_row(b, lg, &seqs[s]);
        }
        if (seqs[s].token_out != NULL && seqs[s].sample != NULL
            && b->base.sample_tokens)
        {
            *seqs[s].token_out = cpu_sample_row(b, lg, &seqs[s]);
        } else if (seqs[s].token_out != NULL) {
            *seqs[s].token_out = cpu_argmax(lg, hp->vocab_size,
                                            seqs[s].n_valid);
        }
        if (seqs[s].token_out != NULL && seqs[s].lp_out != NULL) {
            cpu_logprobs_row(b, lg, &seqs[s]);
        }
    }
    b->seqs = NULL;
    b->route_T = T;
    return MOE_OK;
}


/* One step; a forced routing applies to this step only, whatever it
 * returns. */
static int
cpu_forward(moe_backend_t *base, const moe_seq_batch_t *seqs, int n)
{
    cpu_backend_t *b = (cpu_backend_t *) base;
    int            rc;

    b->route_T = -1;
    rc = cpu_forward_step(base, seqs, n);
    free(b->route_force);
    b->route_force = NULL;
    b->force_T = 0;
    return rc;
}


int
moe_cpu_backend_force_routing(moe_backend_t *base, const int32_t *experts,
    int n_tokens)
{
    cpu_backend_t       *b = (cpu_backend_t *) base;
    const moe_hparams_t *hp;
    size_t               n;
    int                  t, l, k, j, K;

    if (b == NULL || strcmp(base->name, "cpu") != 0 || experts == NULL
        || n_tokens <= 0 || n_tokens > (1 << 24))
    {
        return MOE_EINVAL;
    }
    hp = b->hp;
    K = hp->top_k;
    for (t = 0; t < n_tokens; t++) {
        for (l = 0; hp->n_experts > 1 && l < hp->n_layers; l++) {
            const int32_t *x = experts + ((size_t) t * hp->n_layers + l) * K;

            if (hp->layer_dense[l]) {
                continue;
            }
            for (k = 0; k < K; k++) {
                if (x[k] < 0 || x[k] >= hp->n_experts) {
                    return MOE_EINVAL;
                }
                for (j = 0; j < k; j++) {
                    if (x[j] == x[k]) {
                        return MOE_EINVAL;
                    }
                }
            }
        }
    }
    free(b->route_force);
    b->route_force = NULL;
    b->force_T = 0;
    if (hp->n_experts == 1) {
        return MOE_OK;              /* nothing routes; nothing to force */
    }
    n = (size_t) n_tokens * hp->n_layers * K;
    b->route_force = malloc(n * sizeof(int32_t));
    if (b->route_force == NULL) {
        return MOE_ENOMEM;
    }
    memcpy(b->route_force, experts, n * sizeof(int32_t));
    b->force_T = n_tokens;
    return MOE_OK;
}


int
moe_cpu_backend_last_routing(moe_backend_t *base, int32_t *experts,
    int n_tokens)
{
    cpu_backend_t *b = (cpu_backend_t *) base;

    if (b == NULL || strcmp(base->name, "cpu") != 0 || experts == NULL
        || n_tokens <= 0 || n_tokens != b->route_T)
    {
        return MOE_EINVAL;
    }
    memcpy(experts, b->route_last, (size_t) n_tokens * b->hp->n_layers
           * b->hp->top_k * sizeof(int32_t));
    return MOE_OK;
}


static const int64_t *
cpu_expert_counts(moe_backend_t *base)
{
    return ((cpu_backend_t *) base)->counts;
}


/* ------------------------------------------------------- swap space */

static int
cpu_swap_alloc(moe_backend_t *base, int n_slots, char *err, size_t errlen)
{
    cpu_backend_t *b = (cpu_backend_t *) base;

    free(b->swap);
    b->swap = NULL;
    b->base.n_swap_slots = 0;
    if (n_slots < 0) {
        moe_errf(err, errlen, "cpu backend: bad swap slot count %d", n_slots);
        return MOE_EINVAL;
    }
    if (n_slots == 0) {
        return MOE_OK;
    }
    /* malloc, not calloc: pages are touched only when slots are used */
    b->swap = malloc((size_t) n_slots * (size_t) b->base.kv_bytes_per_block);
    if (b->swap == NULL) {
        moe_errf(err, errlen, "cpu backend: out of memory for %d swap slots "
              "(%lld MiB)", n_slots, (long long) n_slots
              * b->base.kv_bytes_per_block >> 20);
        return MOE_ENOMEM;
    }
    b->base.n_swap_slots = n_slots;
    return MOE_OK;
}


/* dir 0: blocks -> slots, 1: slots -> blocks */
static int
cpu_swap_copy(cpu_backend_t *b, const int32_t *blocks, const int32_t *slots,
    int n, int dir)
{
    size_t  per = (size_t) b->base.kv_bytes_per_block;
    char   *kv = (char *) b->kv, *sw = (char *) b->swap;
    int     i;

    for (i = 0; i < n; i++) {
        if (blocks[i] < 0 || blocks[i] >= b->n_blocks || slots[i] < 0
            || slots[i] >= b->base.n_swap_slots)
        {
            return MOE_EINVAL;
        }
    }
    for (i = 0; i < n; i++) {
        if (dir == 0) {
            memcpy(sw + (size_t) slots[i] * per,
                   kv + (size_t) blocks[i] * per, per);
        } else {
            memcpy(kv + (size_t) blocks[i] * per,
                   sw + (size_t) slots[i] * per, per);
        }
    }
    return MOE_OK;
}


static int
cpu_swap_out(moe_backend_t *base, const int32_t *blocks,
    const int32_t *slots, int n)
{
    return cpu_swap_copy((cpu_backend_t *) base, blocks, slots, n, 0);
}


static int
cpu_swap_in(moe_backend_t *base, const int32_t *slots,
    const int32_t *blocks, int n)
{
    return cpu_swap_copy((cpu_backend_t *) base, blocks, slots, n, 1);
}


static int
cpu_swap_read(moe_backend_t *base, int32_t slot, void *dst)
{
    cpu_backend_t *b = (cpu_backend_t *) base;
    size_t         per = (size_t) b->base.kv_bytes_per_block;

    if (slot < 0 || slot >= b->base.n_swap_slots) {
        return MOE_EINVAL;
    }
    memcpy(dst, (char *) b->swap + (size_t) slot * per, per);
    return MOE_OK;
}


static void
cpu_destroy(moe_backend_t *base)
{
    cpu_backend_t *b = (cpu_backend_t *) base;

    if (b == NULL) {
        return;
    }
    cpu_pool_destroy(b->pool);
    cpu_free_scratch(b);
    moe_cpu_budget_release(b->budget);
    free(b->kv);
    free(b->swap);
    free(b->counts);
    free(b->scores);
    free(b->ecount);
    free(b->eoff);
    free(b->route_last);
    free(b->route_force);
    moe_sampler_destroy(&b->sampler);
    free(b->pcounts);
    free(b->pseen);
    free(b);
}


/* MOE_CPU_KV_GROW: each call makes kv_grow_step more blocks usable. */
static int
cpu_kv_grow(moe_backend_t *base)
{
    cpu_backend_t *b = (cpu_backend_t *) base;
    int            n = base->n_kv_usable + b->kv_grow_step;

    base->n_kv_usable = n < base->n_kv_blocks ? n : base->n_kv_blocks;
    return base->n_kv_usable;
}


int
moe_cpu_backend_create(const moe_model_t *m, int n_blocks, int block_size,
    int n_threads, moe_backend_t **out, char *err, size_t errlen)
{
    const moe_hparams_t *hp;
    const char          *env;
    cpu_backend_t       *b;
    size_t               kv_floats, per_block;
    long                 ncpu;
    int                  rc;

    *out = NULL;
    if (m == NULL || n_blocks <= 0 || block_size <= 0 || n_threads < 0
        || (int64_t) n_blocks * block_size > (1 << 30))
    {
        moe_errf(err, errlen, "cpu backend: bad arguments (n_blocks %d, "
              "block_size %d, n_threads %d)", n_blocks, block_size,
              n_threads);
        return MOE_EINVAL;
    }
    hp = moe_model_hparams(m);
    if (moe_model_weights(m)->embed == NULL) {
        moe_errf(err, errlen, "cpu backend: the model has no weights "
              "(load_format 'dummy' needs the cuda backend)");
        return MOE_EINVAL;
    }
    if (hp->n_experts > 256 || hp->top_k > hp->n_experts) {
        moe_errf(err, errlen, "cpu backend: %d experts / top_k %d not "
              "supported (at most 256 experts)", hp->n_experts, hp->top_k);
        return MOE_EUNSUPPORTED;
    }
    if (n_threads == 0) {
        ncpu = sysconf(_SC_NPROCESSORS_ONLN);
        n_threads = ncpu > 0 ? (int) (ncpu > 64 ? 64 : ncpu) : 1;
    }

    b = calloc(1, sizeof(*b));
    if (b == NULL) {
        moe_errf(err, errlen, "cpu backend: out of memory");
        return MOE_ENOMEM;
    }

    /* the emulated device memory: weights + KV pool, as a GPU would hold */
    per_block = (size_t) hp->n_layers * 2 * (size_t) block_size
                * (size_t) hp->n_kv_heads * (size_t) hp->head_dim;
    b->budget = moe_model_weight_bytes(m)
                + (int64_t) (per_block * sizeof(float)) * n_blocks;
    rc = moe_cpu_budget_reserve(b->budget, err, errlen);
    if (rc != MOE_OK) {
        free(b);
        return rc;
    }
    b->model = m;
    b->hp = hp;
    b->w = moe_model_weights(m);
    b->n_blocks = n_blocks;
    b->block_size = block_size;
    b->n_threads = n_threads;
    b->ctx_max = 4096 < n_blocks * block_size ? 4096 : n_blocks * block_size;
    b->route_T = -1;

    per_block = (size_t) hp->n_layers * 2 * (size_t) block_size
                * (size_t) hp->n_kv_heads * (size_t) hp->head_dim;
    kv_floats = per_block * (size_t) n_blocks;
    b->base.name = "cpu";
    b->base.kv_dtype = "float32";
    b->base.n_kv_blocks = n_blocks;
    b->base.kv_bytes_per_block = (int64_t) (per_block * sizeof(float));
    b->base.forward = cpu_forward;
    b->base.expert_counts = cpu_expert_counts;
    b->base.destroy = cpu_destroy;
    b->base.swap_alloc = cpu_swap_alloc;
    b->base.swap_out = cpu_swap_out;
    b->base.swap_in = cpu_swap_in;
    b->base.swap_read = cpu_swap_read;

    b->kv = calloc(kv_floats, sizeof(float));
    b->counts = calloc((size_t) hp->n_layers * hp->n_experts,
                       sizeof(int64_t));
    b->scores = malloc((size_t) n_threads * b->ctx_max * sizeof(float));
    b->ecount = calloc((size_t) hp->n_experts, sizeof(int));
    b->eoff = calloc((size_t) hp->n_experts + 1, sizeof(int));
    b->pool = cpu_pool_create(n_threads);
    b->pcounts = calloc((size_t) hp->vocab_size, sizeof(int32_t));
    b->pseen = calloc((size_t) hp->vocab_size, 1);
    /* tokens drawn here too (moe_seq_batch_t.sample), as on the GPU;
     * MOE_CPU_SAMPLE_TOKENS=0 leaves them to the engine's own sampler
     * (the test of the two paths' equality) */
    env = getenv("MOE_CPU_SAMPLE_TOKENS");
    b->base.sample_tokens = env == NULL || atoi(env) != 0;
    env = getenv("MOE_CPU_LOGPROBS_TOKENS");
    b->base.logprobs_tokens = env == NULL || atoi(env) != 0;
    /* logit_bias added here (moe_seq_batch_t.bias_ids); 0: the engine's
     * host sampler adds it (the test of the two paths' equality) */
    env = getenv("MOE_CPU_LOGIT_BIAS");
    b->base.logit_bias_device = env == NULL || atoi(env) != 0;
    /* MOE_CPU_KV_GROW=start,step (tests): the pool starts with `start`
     * usable blocks and each kv_grow adds `step`, as the CUDA pool of a
     * worker that imported its weights grows when the old one exits; the
     * memory is all allocated here, only the limit moves */
    env = getenv("MOE_CPU_KV_GROW");
    if (env != NULL) {
        int start = 0, step = 0;

        if (sscanf(env, "%d,%d", &start, &step) == 2 && start > 0
            && step > 0 && start < n_blocks)
        {
            b->base.n_kv_usable = start;
            b->kv_grow_step = step;
            b->base.kv_grow = cpu_kv_grow;
        }
    }
    if (!b->kv || !b->counts || !b->scores || !b->ecount || !b->eoff
        || !b->pool || !b->pcounts || !b->pseen
        || moe_sampler_init(&b->sampler, hp->vocab_size) != MOE_OK
        || cpu_reserve(b, 256) != MOE_OK)
    {
        moe_errf(err, errlen, "cpu backend: out of memory for %d KV blocks "
              "(%zu MiB) and scratch", n_blocks,
              kv_floats * sizeof(float) >> 20);
        cpu_destroy(&b->base);
        return MOE_ENOMEM;
    }
    *out = &b->base;
    return MOE_OK;
}


void
moe_cpu_backend_set_reduce(moe_backend_t *base, moe_reduce_fn fn, void *ctx)
{
    cpu_backend_t *b = (cpu_backend_t *) base;

    b->reduce = fn;
    b->reduce_ctx = ctx;
}


/* ------------------------------------------------------ fp8 KV cache */

int
moe_cpu_backend_set_kv_fp8(moe_backend_t *base, const float *k_scales,
    const float *v_scales, char *err, size_t errlen)
{
    cpu_backend_t *b = (cpu_backend_t *) base;
    int            l;

    for (l = 0; l < b->hp->n_layers; l++) {
        if (!(k_scales[l] > 0.0f) || !(v_scales[l] > 0.0f)
            || !isfinite(k_scales[l]) || !isfinite(v_scales[l]))
        {
            moe_errf(err, errlen, "cpu backend: fp8 KV scales must be "
                     "finite and > 0 (layer %d: k %g, v %g)", l,
                     (double) k_scales[l], (double) v_scales[l]);
            return MOE_EINVAL;
        }
    }
    for (l = 0; l < b->hp->n_layers; l++) {
        b->kv_ks[l] = k_scales[l];
        b->kv_vs[l] = v_scales[l];
    }
    b->kv_fp8 = 1;
    b->base.kv_dtype = "fp8_e4m3";
    return MOE_OK;
}
