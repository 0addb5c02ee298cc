/*
 * Tensor parallelism: one backend over tp rank backends of any kind (CPU
 * ranks over moe_model_shard's shards, CUDA ranks over their slices on
 * their GPUs; made by moe_backend_create_ranks, backend.c), one thread per
 * rank in one process.  The row-parallel partial sums of o_proj and the
 * FFN are all-reduced with barriers; the adds and copies go through
 * moe_tp_ops_t (host loops here, a kernel over device buffers for CUDA
 * ranks), ranks in order, so every rank gets the same bits.  CUDA ranks
 * with an NCCL communicator (moe_cuda_nccl_attach) all-reduce on their own
 * streams and never call the host reduce; the threads still run them.
 * Expert parallel ranks (moe_tp_backend_set_ep) hold whole experts; their
 * FFN partial sums are added by the same reduce.
 */

#include <pthread.h>
#include <stdlib.h>
#include <string.h>

#include "backends/backend.h"

typedef struct tp_backend tp_backend_t;

typedef struct {
    tp_backend_t  *tp;
    int            rank;
} tp_rank_t;

struct tp_backend {
    moe_backend_t           base;          /* first: the interface */
    int                     tp;
    moe_backend_t         **rank;          /* (tp) rank backends */
    moe_model_t           **shard;         /* (tp) their models */
    tp_rank_t              *rctx;          /* (tp) reduce contexts */
    pthread_t              *th;            /* (tp) ranks 1.. */
    int                     n_threads;     /* started */

    pthread_mutex_t         mu;
    pthread_cond_t          cv;            /* every state change */
    uint64_t                step;          /* bumped per forward */
    int                     stop;
    const moe_seq_batch_t  *seqs;          /* rank 0's view */
    moe_seq_batch_t        *rseqs;         /* the others': no outputs */
    int                     cap_rseqs;
    int                     n;
    int                    *rc;            /* (tp) per rank */
    int                     n_done;

    /* how buffers are added and copied (host memory, or device memory
     * through the kernels of the CUDA ranks) */
    const moe_tp_ops_t     *ops;
    void                  **op_ctx;        /* (tp) per rank */
    void                  (*set_reduce)(moe_backend_t *b, moe_reduce_fn fn,
                                        void *ctx);
    int                     own_shards;
    int                     ep;            /* ranks hold whole experts */

    /* all-reduce state */
    int                     active;        /* ranks still in this step */
    int                     arrived;
    uint64_t                bar_gen;
    float                 **buf;           /* (tp) the ranks' buffers */
    float                  *sum;
    size_t                  sum_cap, count;
    int                     sum_bad;
};


/* Barrier over the ranks still in the step (a rank that returned early
 * does not hold the others).  Called with mu held. */
static void
tp_release_if_full(tp_backend_t *b)
{
    if (b->arrived > 0 && b->arrived >= b->active) {
        b->arrived = 0;
        b->bar_gen++;
        pthread_cond_broadcast(&b->cv);
    }
}


static void
tp_barrier(tp_backend_t *b)
{
    uint64_t g = b->bar_gen;

    b->arrived++;
    tp_release_if_full(b);
    while (g == b->bar_gen) {
        pthread_cond_wait(&b->cv, &b->mu);
    }
}


static void
tp_reduce(void *ctx, float *buf, size_t n)
{
    tp_rank_t    *rc = ctx;
    tp_backend_t *b = rc->tp;
    size_t        lo, hi;
    int           R = b->tp;

    pthread_mutex_lock(&b->mu);
    b->buf[rc->rank] = buf;
    b->count = n;
    if (n > b->sum_cap) {
        /* every rank asks the same n: the first one grows the buffer
         * before anyone can be past the barrier below */
        float *s = b->ops->alloc(n * sizeof(float));

        if (s == NULL) {
            b->sum_bad = 1;
        } else {
            b->ops->free(b->sum);
            b->sum = s;
            b->sum_cap = n;
        }
    }
    tp_barrier(b);
    pthread_mutex_unlock(&b->mu);

    /* this rank's slice of the sum, ranks added in order; a rank that
     * left the step early adds nothing (the step fails anyway) */
    lo = n * (size_t) rc->rank / (size_t) R;
    hi = n * (size_t) (rc->rank + 1) / (size_t) R;
    if (!b->sum_bad && b->ops->sum(b->op_ctx[rc->rank], b->sum,
                                   (float *const *) b->buf, R, lo, hi)
                       != MOE_OK)
    {
        b->sum_bad = 1;
    }

    pthread_mutex_lock(&b->mu);
    tp_barrier(b);
    pthread_mutex_unlock(&b->mu);

    if (!b->sum_bad && b->ops->copy(b->op_ctx[rc->rank], buf, b->sum, n)
                       != MOE_OK)
    {
        b->sum_bad = 1;
    }

    pthread_mutex_lock(&b->mu);
    tp_barrier(b);                  /* sum free for the next reduce */
    pthread_mutex_unlock(&b->mu);
}


/* A rank left the step: the barriers stop counting it. */
static void
tp_leave(tp_backend_t *b, int rank, int rc)
{
    pthread_mutex_lock(&b->mu);
    b->rc[rank] = rc;
    b->active--;
    b->n_done++;
    b->buf[rank] = NULL;
    tp_release_if_full(b);
    pthread_cond_broadcast(&b->cv);
    pthread_mutex_unlock(&b->mu);
}


static void *
tp_worker(void *arg)
{
    tp_rank_t    *rc = arg;
    tp_backend_t *b = rc->tp;
    uint64_t      seen = 0;
    int           r;

    for ( ;; ) {
        pthread_mutex_lock(&b->mu);
        while (!b->stop && b->step == seen) {
            pthread_cond_wait(&b->cv, &b->mu);
        }
        if (b->stop) {
            pthread_mutex_unlock(&b->mu);
            return NULL;
        }
        seen = b->step;
        pthread_mutex_unlock(&b->mu);

        r = b->rank[rc->rank]->forward(b->rank[rc->rank], b->rseqs, b->n);
        tp_leave(b, rc->rank, r);
    }
}


static int
tp_forward(moe_backend_t *base, const moe_seq_batch_t *seqs, int n)
{
    tp_backend_t *b = (tp_backend_t *) base;
    int           i, r, rc = MOE_OK;

    if (n < 0 || (n > 0 && seqs == NULL)) {
        return MOE_EINVAL;
    }
    if (n > b->cap_rseqs) {
        moe_seq_batch_t *p = realloc(b->rseqs, sizeof(*p) * (size_t) n);

        if (p == NULL) {
            return MOE_ENOMEM;
        }
        b->rseqs = p;
        b->cap_rseqs = n;
    }
    for (i = 0; i < n; i++) {
        /* ranks > 0 compute their shard but no outputs */
        b->rseqs[i] = seqs[i];
        b->rseqs[i].logits = NULL;
        b->rseqs[i].token_out = NULL;
        b->rseqs[i].sample = NULL;
    }

    pthread_mutex_lock(&b->mu);
    b->seqs = seqs;
    b->n = n;
    b->n_done = 0;
    b->active = b->tp;
    b->arrived = 0;
    b->sum_bad = 0;
    for (r = 0; r < b->tp; r++) {
        b->rc[r] = MOE_OK;
        b->buf[r] = NULL;
    }
    b->step++;
    pthread_cond_broadcast(&b->cv);
    pthread_mutex_unlock(&b->mu);

    r = b->rank[0]->forward(b->rank[0], seqs, n);
    tp_leave(b, 0, r);

    pthread_mutex_lock(&b->mu);
    while (b->n_done < b->tp) {
        pthread_cond_wait(&b->cv, &b->mu);
    }
    for (r = 0; r < b->tp; r++) {
        if (b->rc[r] != MOE_OK && rc == MOE_OK) {
            rc = b->rc[r];
        }
    }
    if (rc == MOE_OK && b->sum_bad) {
        rc = MOE_ENOMEM;
    }
    pthread_mutex_unlock(&b->mu);
    return rc;
}


/* A pool that grows: every rank's that grows, the usable count the least
 * of the ranks' (a block id is valid only when every rank holds it). */
static int
tp_rank_usable(moe_backend_t *r)
{
    return r->n_kv_usable > 0 ? r->n_kv_usable : r->n_kv_blocks;
}


static int
tp_kv_grow(moe_backend_t *base)
{
    tp_backend_t *b = (tp_backend_t *) base;
    int           r, n, least = base->n_kv_blocks;

    for (r = 0; r < b->tp; r++) {
        n = b->rank[r]->kv_grow != NULL ? b->rank[r]->kv_grow(b->rank[r])
                                        : tp_rank_usable(b->rank[r]);
        least = n < least ? n : least;
    }
    base->n_kv_usable = least > base->n_kv_usable ? least
                                                  : base->n_kv_usable;
    return base->n_kv_usable;
}


static const int64_t *
tp_expert_counts(moe_backend_t *base)
{
    tp_backend_t *b = (tp_backend_t *) base;

    /* every rank routes the same tokens alike (the router is replicated,
     * expert parallel or not): rank 0's */
    return b->rank[0]->expert_counts(b->rank[0]);
}


static void
tp_destroy(moe_backend_t *base)
{
    tp_backend_t *b = (tp_backend_t *) base;
    int           r;

    if (b == NULL) {
        return;
    }
    pthread_mutex_lock(&b->mu);
    b->stop = 1;
    pthread_cond_broadcast(&b->cv);
    pthread_mutex_unlock(&b->mu);
    for (r = 0; r < b->n_threads; r++) {
        pthread_join(b->th[r], NULL);
    }
    for (r = 0; r < b->tp; r++) {
        if (b->rank != NULL && b->rank[r] != NULL) {
            b->rank[r]->destroy(b->rank[r]);
        }
        if (b->shard != NULL && b->own_shards) {
            moe_model_free(b->shard[r]);
        }
    }
    if (b->ops != NULL && b->sum != NULL) {
        b->ops->free(b->sum);
        b->sum = NULL;
    }
    pthread_cond_destroy(&b->cv);
    pthread_mutex_destroy(&b->mu);
    free(b->rank);
    free(b->shard);
    free(b->rctx);
    free(b->th);
    free(b->rseqs);
    free(b->rc);
    free(b->buf);
    free(b->op_ctx);
    free(b);
}


static int
tp_swap_alloc(moe_backend_t *base, int n_slots, char *err, size_t errlen)
{
    tp_backend_t *b = (tp_backend_t *) base;
    int           r, rc = MOE_OK;

    for (r = 0; r < b->tp && rc == MOE_OK; r++) {
        rc = b->rank[r]->swap_alloc(b->rank[r], n_slots, err, errlen);
    }
    if (rc != MOE_OK) {
        for (r = 0; r < b->tp; r++) {
            (void) b->rank[r]->swap_alloc(b->rank[r], 0, NULL, 0);
        }
    }
    base->n_swap_slots = b->rank[0]->n_swap_slots;
    return rc;
}


/* The same swap on every rank (their pools are indexed alike). */
static int
tp_swap_each(moe_backend_t *base, int out, const int32_t *blocks,
    const int32_t *slots, int n)
{
    tp_backend_t  *b = (tp_backend_t *) base;
    moe_backend_t *r;
    int            i, rc;

    for (i = 0; i < b->tp; i++) {
        r = b->rank[i];
        rc = out ? r->swap_out(r, blocks, slots, n)
                 : r->swap_in(r, slots, blocks, n);
        if (rc != MOE_OK) {
            return rc;
        }
    }
    return MOE_OK;
}


static int
tp_swap_out(moe_backend_t *base, const int32_t *blocks, const int32_t *slots,
    int n)
{
    return tp_swap_each(base, 1, blocks, slots, n);
}


static int
tp_swap_in(moe_backend_t *base, const int32_t *slots, const int32_t *blocks,
    int n)
{
    return tp_swap_each(base, 0, blocks, slots, n);
}


/* The slot of every rank, one after the other (rank order). */
static int
tp_swap_read(moe_backend_t *base, int32_t slot, void *dst)
{
    tp_backend_t *b = (tp_backend_t *) base;
    char         *p = dst;
    int           r, rc;

    for (r = 0; r < b->tp; r++) {
        rc = b->rank[r]->swap_read(b->rank[r], slot, p);
        if (rc != MOE_OK) {
            return rc;
        }
        p += b->rank[r]->kv_bytes_per_block;
    }
    return MOE_OK;
}


/* host ops: the CPU ranks' buffers are host memory */
static int
tp_host_sum(void *octx, float *dst, float *const *srcs, int R, size_t lo,
    size_t hi)
{
    size_t i;
    int    r;

    (void) octx;
    for (i = lo; i < hi; i++) {
        float s = 0.0f;

        for (r = 0; r < R; r++) {
            s += srcs[r] != NULL ? srcs[r][i] : 0.0f;
        }
        dst[i] = s;
    }
    return MOE_OK;
}


static int
tp_host_copy(void *octx, float *dst, const float *src, size_t n)
{
    (void) octx;
    memcpy(dst, src, n * sizeof(float));
    return MOE_OK;
}


const moe_tp_ops_t moe_tp_host_ops = {
    tp_host_sum, tp_host_copy, malloc, free
};


int
moe_tp_backend_wrap(moe_backend_t **ranks, moe_model_t **shards, int tp,
    const moe_tp_ops_t *ops, void **op_ctx,
    void (*set_reduce)(moe_backend_t *b, moe_reduce_fn fn, void *ctx),
    moe_backend_t **out, char *err, size_t errlen)
{
    tp_backend_t *b;
    int           r;

    *out = NULL;
    b = calloc(1, sizeof(*b));
    if (b == NULL || tp < 2 || tp > 64) {
        free(b);
        for (r = 0; r < tp; r++) {
            if (ranks[r] != NULL) {
                ranks[r]->destroy(ranks[r]);
            }
            if (shards != NULL) {
                moe_model_free(shards[r]);
            }
        }
        moe_errf(err, errlen, "tensor parallel: %s", b == NULL
                 ? "out of memory" : "tensor_parallel_size must be 2..64");
        return b == NULL ? MOE_ENOMEM : MOE_EINVAL;
    }
    b->tp = tp;
    b->ops = ops;
    b->set_reduce = set_reduce;
    pthread_mutex_init(&b->mu, NULL);
    pthread_cond_init(&b->cv, NULL);
    b->rank = calloc((size_t) tp, sizeof(*b->rank));
    b->shard = calloc((size_t) tp, sizeof(*b->shard));
    b->rctx = calloc((size_t) tp, sizeof(*b->rctx));
    b->th = calloc((size_t) tp, sizeof(*b->th));
    b->rc = calloc((size_t) tp, sizeof(*b->rc));
    b->buf = calloc((size_t) tp, sizeof(*b->buf));
    b->op_ctx = calloc((size_t) tp, sizeof(*b->op_ctx));
    for (r = 0; r < tp; r++) {
        if (b->rank != NULL) {
            b->rank[r] = ranks[r];      /* owned from here on */
        }
        if (b->shard != NULL && shards != NULL) {
            b->shard[r] = shards[r];
        }
    }
    b->own_shards = shards != NULL;
    if (!b->rank || !b->shard || !b->rctx || !b->th || !b->rc || !b->buf
        || !b->op_ctx)
    {
        tp_destroy(&b->base);
        moe_errf(err, errlen, "tensor parallel: out of memory");
        return MOE_ENOMEM;
    }
    for (r = 0; r < tp; r++) {
        b->op_ctx[r] = op_ctx != NULL ? op_ctx[r] : NULL;
        b->rctx[r].tp = b;
        b->rctx[r].rank = r;
        set_reduce(b->rank[r], tp_reduce, &b->rctx[r]);
        b->base.kv_bytes_per_block += b->rank[r]->kv_bytes_per_block;
    }
    for (r = 1; r < tp; r++) {
        if (pthread_create(&b->th[b->n_threads], NULL, tp_worker,
                           &b->rctx[r]) != 0)
        {
            tp_destroy(&b->base);
            moe_errf(err, errlen, "tensor parallel: cannot start rank %d's "
                     "thread", r);
            return MOE_ENOMEM;
        }
        b->n_threads++;
    }
    b->base.name = b->rank[0]->name;
    b->base.kv_dtype = b->rank[0]->kv_dtype;
    b->base.n_kv_blocks = b->rank[0]->n_kv_blocks;
    for (r = 0; r < tp; r++) {
        if (b->rank[r]->kv_grow != NULL) {
            b->base.kv_grow = tp_kv_grow;
        }
        if (tp_rank_usable(b->rank[r]) < b->base.n_kv_blocks
            && (b->base.n_kv_usable == 0
                || tp_rank_usable(b->rank[r]) < b->base.n_kv_usable))
        {
            b->base.n_kv_usable = tp_rank_usable(b->rank[r]);
        }
    }
    b->base.sample_tokens = b->rank[0]->sample_tokens;
    b->base.guided_mask = b->rank[0]->guided_mask;
    /* logit_bias rides with rank 0's rows, which alone give tokens */
    b->base.logit_bias_device = b->rank[0]->logit_bias_device;
    b->base.forward = tp_forward;
    b->base.expert_counts = tp_expert_counts;
    b->base.destroy = tp_destroy;
    b->base.swap_alloc = b->rank[0]->swap_alloc != NULL ? tp_swap_alloc
                                                       : NULL;
    b->base.swap_out = b->rank[0]->swap_out != NULL ? tp_swap_out : NULL;
    b->base.swap_in = b->rank[0]->swap_in != NULL ? tp_swap_in : NULL;
    b->base.swap_read = b->rank[0]->swap_read != NULL ? tp_swap_read : NULL;
    *out = &b->base;
    return MOE_OK;
}


moe_backend_t *
moe_tp_backend_rank(moe_backend_t *base, int rank)
{
    tp_backend_t *b = (tp_backend_t *) base;

    if (base == NULL || base->forward != tp_forward || rank < 0
        || rank >= b->tp)
    {
        return rank == 0 ? base : NULL;
    }
    return b->rank[rank];
}



/* ------------------------------------------------ expert parallelism */

void
moe_tp_backend_set_ep(moe_backend_t *base)
{
    if (base != NULL && base->forward == tp_forward) {
        ((tp_backend_t *) base)->ep = 1;
    }
}


int
moe_tp_backend_ep_ranks(moe_backend_t *base)
{
    tp_backend_t *b = (tp_backend_t *) base;

    if (base == NULL || base->forward != tp_forward || !b->ep) {
        return 0;
    }
    return b->tp;
}
