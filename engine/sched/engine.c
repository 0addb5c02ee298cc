/*
 * The engine: one thread that owns the model, the KV block manager and the
 * scheduler.  The nginx worker talks to it through two lock-free SPSC rings
 * (submit: worker -> engine; events: engine -> worker) and two eventfds
 * (wake: worker -> engine when it queued work; events: engine -> worker,
 * registered as an nginx read event).
 *
 * Scheduling (continuous batching): every step first gives each running
 * sequence its next chunk (one token when decoding, up to the token budget
 * when prefilling), then admits waiting sequences in arrival order while
 * there are sequence slots, tokens in the budget and KV blocks.  When a
 * running sequence cannot get a block, the most recently admitted one is
 * preempted: swapped out (its blocks copied to the backend's host swap
 * pool, resumed later from where it was) when the swap slots suffice, else
 * recomputed (its blocks freed, its prompt + output computed again later,
 * at the front of the queue).  Swapped and waiting sequences are resumed /
 * admitted strictly oldest first, so the oldest requests always progress.
 */

#include <errno.h>
#include <poll.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <time.h>
#include <unistd.h>

#include <yajl/yajl_tree.h>

#include "moe.h"
#include "backends/backend.h"
#include "sched/kv.h"
#include "sched/ring.h"
#include "sampling/sampling.h"

#define MOE_EV_BATCH  256

enum { MOE_MSG_SUBMIT = 1, MOE_MSG_CANCEL = 2 };

typedef struct {
    int32_t         type;
    int32_t         n_prompt;
    uint64_t        req_id;
    int32_t        *prompt;        /* malloc()ed; the engine takes it */
    moe_sampling_t  sp;
} moe_msg_t;

typedef struct moe_seq  moe_seq_t;

/*
 * How a sequence's tokens are chosen, decided once when it is first
 * admitted (moe_seq_plan) and kept: the step only reads it.
 */
typedef enum {
    MOE_PLAN_ARGMAX = 1,    /* greedy, no penalty that applies, no
                               logprobs: the backend's argmax (token_out),
                               no logits copy */
    MOE_PLAN_BACKEND,       /* drawn by a backend that samples
                               (sample_tokens): token_out with .sample, u
                               and the penalty list */
    MOE_PLAN_HOST           /* logits to the host, moe_sample() there
                               (logprobs, or a backend that only does
                               argmax, or the penalty list was lost) */
} moe_plan_t;

typedef struct {
    moe_seq_t  *head, *tail;
    int         n;
} moe_seq_queue_t;

struct moe_seq {
    uint64_t        id;
    moe_sampling_t  sp;
    int32_t        *tokens;        /* (cap) prompt then generated ids */
    int             n_tokens;
    int             cap;
    int             n_prompt;
    int             n_computed;    /* positions whose K/V are cached */
    int             n_generated;
    int32_t        *blocks;        /* block table */
    int             n_blocks;
    int             cap_blocks;
    int32_t        *counts;        /* (vocab) generated occurrences, or
                                      NULL when no penalty needs them */
    uint8_t        *seen;          /* (vocab) in prompt or output, or NULL */
    int32_t        *pen_ids;       /* the distinct ids with seen or counts
                                      set: the penalty list a backend that
                                      samples gets (moe_seq_batch_t) */
    int             n_pen, cap_pen;
    int             pen_lost;      /* 1: pen_ids incomplete (no memory):
                                      sample on the host */
    uint64_t       *bhash;         /* (cap / block_size + 1) chain hashes of
                                      the full blocks, for prefix caching */
    int             n_published;   /* full blocks offered to the cache */
    int             n_cached;      /* prompt tokens found in the cache at
                                      first admission */
    int             admitted;      /* admitted at least once */
    uint64_t        order;         /* arrival number: scheduling priority
                                      (lower is older, goes first) */
    int32_t        *slots;         /* (n_slots) host swap slots holding
                                      blocks 0..n_slots-1 while swapped */
    int             n_slots;
    moe_rng_t       rng;
    moe_plan_t      plan;          /* set at first admission */
    moe_seq_t      *prev, *next;   /* waiting or swapped queue links */
};

struct moe_engine {
    moe_config_t       cfg;
    moe_model_info_t   info;
    moe_model_t       *model;
    moe_tokenizer_t   *tok;
    moe_backend_t     *backend;
    char              *chat_template;

    moe_ring_t        *submit;     /* moe_msg_t, worker -> engine */
    moe_ring_t        *events;     /* moe_event_t, engine -> worker */
    int                ev_fd;      /* engine -> worker wake */
    int                wake_fd;    /* worker -> engine wake */
    pthread_t          thread;
    int                thread_started;
    atomic_int         stop;

    /* moe_engine_hold(): hold_steps is how many steps the engine thread
     * may still take before it parks (-1: no limit), parked says it is
     * parked; both under hold_mu.  held (hold_steps >= 0) spares the
     * thread the lock when nobody holds it. */
    pthread_mutex_t    hold_mu;
    pthread_cond_t     hold_cv;
    atomic_int         held;
    int                hold_steps;
    int                parked;

    /* engine thread only */
    moe_blocks_t       blocks;
    moe_seq_t        **running;    /* (max_num_seqs) in admission order */
    int                n_running;
    moe_seq_queue_t    waitq;      /* admitted never or preempted */
    moe_seq_queue_t    swapq;      /* swapped out, oldest first */
    moe_slots_t        slots;      /* host swap slots (backend's pool) */
    uint64_t           next_order;
    moe_event_t       *overflow;   /* events the ring had no room for */
    size_t             n_overflow, cap_overflow, overflow_pos;
    moe_seq_batch_t   *batch;      /* (max_num_seqs) */
    moe_seq_t        **batch_seq;  /* (max_num_seqs) */
    float             *logits;     /* (max_num_seqs, vocab) */
    int32_t           *tok_out;    /* (max_num_seqs) greedy ids picked by
                                      the backend (moe_seq_batch_t
                                      token_out) */
    int32_t           *pen_tok;    /* (cap_pen) the step's penalty lists,
                                      row after row */
    int32_t           *pen_cnt;
    uint8_t           *pen_seen;
    size_t             cap_pen;
    moe_sampler_t      sampler;
    int                n_sample;   /* ids the sampler may produce */
    int                wake_pending; /* events pushed, worker not woken */

    /* counters, written by the engine thread, read by anyone */
    _Atomic int64_t    st_submitted, st_finished, st_cancelled,
                       st_prompt_tokens, st_gen_tokens, st_steps,
                       st_busy_ns, st_preemptions, st_running, st_waiting,
                       st_blocks_used, st_blocks_cached, st_cached_tokens,
                       st_swap_outs, st_swap_ins, st_swap_blocks_out,
                       st_swapped, st_swap_used, st_backend_sampled;
    _Atomic int64_t   *expert_counts;  /* (n_layers * n_experts) */
    size_t             n_expert_counts;
};


static int64_t
moe_now_ns(void)
{
    struct timespec  ts;

    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t) ts.tv_sec * 1000000000 + ts.tv_nsec;
}


/* Note that tok is about to get seen / counts set: list it if it has
 * neither yet (the list stays the set of ids with either). */
static void
moe_seq_pen_note(moe_seq_t *s, int32_t tok)
{
    int32_t *p;
    int      cap;

    if ((s->seen == NULL && s->counts == NULL) || s->pen_lost
        || (s->seen != NULL && s->seen[tok])
        || (s->counts != NULL && s->counts[tok] > 0))
    {
        return;
    }
    if (s->n_pen == s->cap_pen) {
        cap = s->cap_pen ? 2 * s->cap_pen : 64;
        p = realloc(s->pen_ids, sizeof(int32_t) * (size_t) cap);
        if (p == NULL) {
            s->pen_lost = 1;
            if (s->plan == MOE_PLAN_BACKEND) {
                s->plan = MOE_PLAN_HOST;
            }
            return;
        }
        s->pen_ids = p;
        s->cap_pen = cap;
    }
    s->pen_ids[s->n_pen++] = tok;
}


static void
moe_seq_free(moe_seq_t *s)
{
    if (s == NULL) {
        return;
    }
    free(s->tokens);
    free(s->blocks);
    free(s->counts);
    free(s->seen);
    free(s->pen_ids);
    free(s->bhash);
    free(s->slots);
    free(s);
}


/* ------------------------------------------------------------- events */

static void
moe_emit(moe_engine_t *e, const moe_event_t *ev)
{
    moe_event_t  *p;

    e->wake_pending = 1;

    /* keep order: once anything overflowed, everything queues behind it */
    if (e->n_overflow == e->overflow_pos
        && moe_ring_push(e->events, ev) == MOE_OK)
    {
        return;
    }

    if (e->n_overflow == e->cap_overflow) {
        size_t  cap = e->cap_overflow ? e->cap_overflow * 2 : 1024;

        p = realloc(e->overflow, cap * sizeof(*p));
        if (p == NULL) {
            /* cannot happen in practice; the event is lost and logged */
            moe_log(MOE_LOG_ERROR, "event queue: out of memory, request "
                    "%llu loses an event", (unsigned long long) ev->req_id);
            return;
        }
        e->overflow = p;
        e->cap_overflow = cap;
    }

    e->overflow[e->n_overflow++] = *ev;
}


static void
moe_flush_overflow(moe_engine_t *e)
{
    while (e->overflow_pos < e->n_overflow) {
        if (moe_ring_push(e->events, &e->overflow[e->overflow_pos])
            != MOE_OK)
        {
            return;
        }
        e->overflow_pos++;

        /* the worker was woken when these were emitted and may have
         * emptied the ring since: the ones that only arrive now need a
         * wake-up of their own, or the last of them sit there unseen once
         * the engine goes idle */
        e->wake_pending = 1;
    }

    e->n_overflow = e->overflow_pos = 0;
}


static void
moe_wake_worker(moe_engine_t *e)
{
    uint64_t  one = 1;
    ssize_t   n;

    e->wake_pending = 0;
    n = write(e->ev_fd, &one, sizeof(one));
    (void) n;   /* EAGAIN: the counter is already non-zero, fine */
}


static void
moe_finish_event(moe_engine_t *e, moe_seq_t *s, int reason, int32_t token)
{
    moe_event_t  ev;

    memset(&ev, 0, sizeof(ev));
    ev.req_id = s->id;
    ev.type = MOE_EV_FINISH;
    ev.token = token;
    ev.finish_reason = reason;
    ev.n_prompt = s->n_prompt;
    ev.n_cached = s->n_cached;
    ev.n_generated = s->n_generated;
    moe_emit(e, &ev);
}


/* ---------------------------------------------------------- sequences */

/* Doubly linked queues of sequences in arrival order (waiting, swapped). */

static void
moe_q_unlink(moe_seq_queue_t *q, moe_seq_t *s)
{
    if (s->prev) s->prev->next = s->next; else q->head = s->next;
    if (s->next) s->next->prev = s->prev; else q->tail = s->prev;
    s->prev = s->next = NULL;
    q->n--;
}


/* Insert before the first sequence that arrived later: new requests land
 * at the back, preempted ones at their place (in practice the front). */
static void
moe_q_insert(moe_seq_queue_t *q, moe_seq_t *s)
{
    moe_seq_t  *p = q->tail;

    /* walk from the back: new arrivals, the common case, stop at once */
    while (p != NULL && p->order > s->order) {
        p = p->prev;
    }
    s->prev = p;
    s->next = p != NULL ? p->next : q->head;
    if (s->next) s->next->prev = s; else q->tail = s;
    if (p) p->next = s; else q->head = s;
    q->n++;
}


/* Give a sequence's host swap slots back. */
static void
moe_seq_drop_slots(moe_engine_t *e, moe_seq_t *s)
{
    moe_slots_free(&e->slots, s->slots, s->n_slots);
    free(s->slots);
    s->slots = NULL;
    s->n_slots = 0;
}


/* Into the running list at its place by arrival (admission order is
 * arrival order: the newest running sequence is preempted first). */
static void
moe_running_insert(moe_engine_t *e, moe_seq_t *s)
{
    int  j = e->n_running;

    while (j > 0 && e->running[j - 1]->order > s->order) {
        j--;
    }
    memmove(&e->running[j + 1], &e->running[j],
            sizeof(moe_seq_t *) * (size_t) (e->n_running - j));
    e->running[j] = s;
    e->n_running++;
}


static void
moe_running_remove(moe_engine_t *e, int i)
{
    memmove(&e->running[i], &e->running[i + 1],
            sizeof(moe_seq_t *) * (size_t) (e->n_running - i - 1));
    e->n_running--;
}


/* Finish a running sequence: event, blocks back, memory freed. */
static void
moe_retire(moe_engine_t *e, int i, int reason, int32_t token)
{
    moe_seq_t  *s = e->running[i];

    moe_finish_event(e, s, reason, token);
    moe_blocks_release(&e->blocks, s->blocks, &s->n_blocks);
    moe_running_remove(e, i);
    moe_seq_free(s);

    atomic_fetch_add_explicit(&e->st_finished, 1, memory_order_relaxed);
}


static void
moe_cancel_seq(moe_engine_t *e, uint64_t id)
{
    int               i, k;
    moe_seq_t        *s;
    moe_seq_queue_t  *q[2] = { &e->waitq, &e->swapq };

    for (i = 0; i < e->n_running; i++) {
        if (e->running[i]->id == id) {
            moe_retire(e, i, MOE_FINISH_CANCELLED, -1);
            atomic_fetch_add_explicit(&e->st_cancelled, 1,
                                      memory_order_relaxed);
            return;
        }
    }

    /* waiting (maybe holding prefix blocks) or swapped (holding slots) */
    for (k = 0; k < 2; k++) {
        for (s = q[k]->head; s != NULL; s = s->next) {
            if (s->id != id) {
                continue;
            }
            moe_q_unlink(q[k], s);
            moe_blocks_release(&e->blocks, s->blocks, &s->n_blocks);
            moe_seq_drop_slots(e, s);
            moe_finish_event(e, s, MOE_FINISH_CANCELLED, -1);
            moe_seq_free(s);
            atomic_fetch_add_explicit(&e->st_finished, 1,
                                      memory_order_relaxed);
            atomic_fetch_add_explicit(&e->st_cancelled, 1,
                                      memory_order_relaxed);
            return;
        }
    }

    /* already finished: its FINISH event is on its way; nothing to do */
}


static moe_seq_t *
moe_seq_create(moe_engine_t *e, moe_msg_t *m)
{
    int         i, cap;
    moe_seq_t  *s;

    s = calloc(1, sizeof(*s));
    if (s == NULL) {
        return NULL;
    }

    cap = m->n_prompt + m->sp.max_tokens;
    if (cap > e->info.max_model_len) {
        cap = e->info.max_model_len;
    }

    s->id = m->req_id;
    s->order = e->next_order++;
    s->sp = m->sp;
    s->n_prompt = m->n_prompt;
    s->cap = cap;
    s->tokens = realloc(m->prompt, sizeof(int32_t) * (size_t) cap);
    if (s->tokens == NULL) {
        free(s);
        return NULL;
    }
    m->prompt = NULL;
    s->n_tokens = m->n_prompt;

    s->bhash = malloc(sizeof(uint64_t)
                      * (size_t) (cap / e->cfg.block_size + 1));
    if (s->bhash == NULL) {
        moe_seq_free(s);
        return NULL;
    }

    if (s->sp.frequency_penalty != 0.0f || s->sp.presence_penalty != 0.0f) {
        s->counts = calloc((size_t) e->info.vocab_size, sizeof(int32_t));
        if (s->counts == NULL) {
            moe_seq_free(s);
            return NULL;
        }
    }

    if (s->sp.repetition_penalty != 1.0f) {
        s->seen = calloc((size_t) e->info.vocab_size, 1);
        if (s->seen == NULL) {
            moe_seq_free(s);
            return NULL;
        }
        for (i = 0; i < s->n_prompt; i++) {
            moe_seq_pen_note(s, s->tokens[i]);
            s->seen[s->tokens[i]] = 1;
        }
    }

    moe_rng_seed(&s->rng, s->sp.has_seed
                          ? s->sp.seed
                          : (s->id * 0x9e3779b97f4a7c15ULL)
                            ^ (uint64_t) moe_now_ns());

    return s;
}


static void
moe_drain_submit(moe_engine_t *e)
{
    moe_msg_t    m;
    moe_seq_t   *s;
    moe_event_t  ev;

    while (moe_ring_pop(e->submit, &m) == 1) {
        if (m.type == MOE_MSG_CANCEL) {
            moe_cancel_seq(e, m.req_id);
            continue;
        }

        atomic_fetch_add_explicit(&e->st_submitted, 1, memory_order_relaxed);

        s = moe_seq_create(e, &m);
        if (s == NULL) {
            free(m.prompt);
            memset(&ev, 0, sizeof(ev));
            ev.req_id = m.req_id;
            ev.type = MOE_EV_ERROR;
            ev.status = MOE_ENOMEM;
            moe_emit(e, &ev);
            atomic_fetch_add_explicit(&e->st_finished, 1,
                                      memory_order_relaxed);
            continue;
        }

        moe_q_insert(&e->waitq, s);
    }
}


/* ------------------------------------------------------------ the step */

/*
 * Swap a sequence that left the running list out to host memory: copies of
 * the blocks holding its n_computed positions go to free swap slots (all
 * of them, shared prefix blocks too: the copy is what gets resumed), then
 * its table is released.  MOE_OK, or MOE_EFULL (swapping off, not enough
 * slots, nothing computed) / another status with nothing changed.
 */
static int
moe_swap_out_seq(moe_engine_t *e, moe_seq_t *s)
{
    int  nb, rc;

    nb = moe_blocks_for(&e->blocks, s->n_computed);
    if (nb == 0 || nb > s->n_blocks || e->backend->swap_out == NULL
        || e->backend->swap_in == NULL || nb > e->slots.n_free)
    {
        return MOE_EFULL;
    }

    s->slots = malloc(sizeof(int32_t) * (size_t) nb);
    if (s->slots == NULL) {
        return MOE_ENOMEM;
    }
    (void) moe_slots_alloc(&e->slots, nb, s->slots);
    s->n_slots = nb;

    rc = e->backend->swap_out(e->backend, s->blocks, s->slots, nb);
    if (rc != MOE_OK) {
        moe_log(MOE_LOG_ERROR, "swap out of request %llu failed (%s); "
                "recomputing it instead", (unsigned long long) s->id,
                moe_strerror(rc));
        moe_seq_drop_slots(e, s);
        return rc;
    }

    moe_blocks_release(&e->blocks, s->blocks, &s->n_blocks);
    s->n_published = 0;       /* its blocks will be fresh when resumed */
    moe_q_insert(&e->swapq, s);

    atomic_fetch_add_explicit(&e->st_swap_outs, 1, memory_order_relaxed);
    atomic_fetch_add_explicit(&e->st_swap_blocks_out, nb,
                              memory_order_relaxed);
    moe_log(MOE_LOG_INFO, "preempted request %llu (swap): KV cache full, "
            "%d blocks to host memory", (unsigned long long) s->id, nb);
    return MOE_OK;
}


/* Preempt the most recently admitted running sequence (not yet in this
 * step's batch): swapped out when the swap slots hold its blocks, else
 * recomputed later.  Returns 0 when there is nothing to preempt. */
static int
moe_preempt_last(moe_engine_t *e, int first_allowed)
{
    moe_seq_t  *s;

    if (e->n_running - 1 < first_allowed) {
        return 0;
    }

    s = e->running[e->n_running - 1];
    e->n_running--;

    if (moe_swap_out_seq(e, s) == MOE_OK) {
        return 1;
    }

    moe_blocks_release(&e->blocks, s->blocks, &s->n_blocks);
    s->n_computed = 0;
    s->n_published = 0;
    moe_q_insert(&e->waitq, s);

    atomic_fetch_add_explicit(&e->st_preemptions, 1, memory_order_relaxed);
    moe_log(MOE_LOG_INFO, "preempted request %llu (recompute): KV cache full",
            (unsigned long long) s->id);
    return 1;
}


/*
 * Resume the oldest swapped sequence s with a chunk of `chunk` tokens:
 * fresh blocks for its computed positions plus the chunk, swap_in of its
 * slots into the first of them.  MOE_OK (s is running), MOE_EFULL (not
 * enough free blocks, nothing changed) or another status; a failed copy
 * sends s back to be recomputed (MOE_OK is still returned: s left the
 * swapped queue but is not in the step).
 */
static int
moe_swap_in_seq(moe_engine_t *e, moe_seq_t *s, int chunk, int *resumed)
{
    int  rc;

    *resumed = 0;
    rc = moe_blocks_reserve(&e->blocks, &s->blocks, &s->n_blocks,
                            &s->cap_blocks, s->n_computed + chunk);
    if (rc != MOE_OK) {
        return rc;
    }

    moe_q_unlink(&e->swapq, s);
    rc = e->backend->swap_in(e->backend, s->slots, s->blocks, s->n_slots);
    moe_seq_drop_slots(e, s);

    if (rc != MOE_OK) {
        moe_log(MOE_LOG_ERROR, "swap in of request %llu failed (%s); "
                "recomputing it", (unsigned long long) s->id,
                moe_strerror(rc));
        moe_blocks_release(&e->blocks, s->blocks, &s->n_blocks);
        s->n_computed = 0;
        s->n_published = 0;
        moe_q_insert(&e->waitq, s);
        atomic_fetch_add_explicit(&e->st_preemptions, 1,
                                  memory_order_relaxed);
        return MOE_OK;
    }

    moe_running_insert(e, s);
    *resumed = 1;
    atomic_fetch_add_explicit(&e->st_swap_ins, 1, memory_order_relaxed);
    moe_log(MOE_LOG_INFO, "resumed request %llu: %d blocks swapped in",
            (unsigned long long) s->id, moe_blocks_for(&e->blocks,
                                                       s->n_computed));
    return MOE_OK;
}


/* Room for n more penalty-list entries in the step's lists. */
static int
moe_pen_reserve(moe_engine_t *e, size_t need)
{
    size_t    cap;
    int32_t  *t, *c;
    uint8_t  *v;

    if (need <= e->cap_pen) {
        return MOE_OK;
    }
    cap = e->cap_pen ? e->cap_pen : 1024;
    while (cap < need) {
        cap *= 2;
    }
    t = realloc(e->pen_tok, sizeof(int32_t) * cap);
    if (t != NULL) {
        e->pen_tok = t;
    }
    c = realloc(e->pen_cnt, sizeof(int32_t) * cap);
    if (c != NULL) {
        e->pen_cnt = c;
    }
    v = realloc(e->pen_seen, cap);
    if (v != NULL) {
        e->pen_seen = v;
    }
    if (t == NULL || c == NULL || v == NULL) {
        return MOE_ENOMEM;
    }
    e->cap_pen = cap;
    return MOE_OK;
}


/*
 * The sampling plan of s, for its whole life: MOE_PLAN_ARGMAX when its
 * next token is always the plain argmax of its logits (what moe_sample()
 * does for it: greedy, no penalty that applies, no logprobs), so the
 * backend may pick it; MOE_PLAN_BACKEND when the backend can draw it
 * (sample_tokens, no logprobs, the penalty list complete); else
 * MOE_PLAN_HOST.
 */
static moe_plan_t
moe_seq_plan(const moe_engine_t *e, const moe_seq_t *s)
{
    const moe_sampling_t *sp = &s->sp;

    if (moe_sampling_is_greedy(sp) && !sp->logprobs
        && (s->seen == NULL || sp->repetition_penalty == 1.0f)
        && (s->counts == NULL
            || (sp->frequency_penalty == 0.0f
                && sp->presence_penalty == 0.0f)))
    {
        return MOE_PLAN_ARGMAX;
    }
    if (e->backend->sample_tokens && !sp->logprobs && !s->pen_lost) {
        return MOE_PLAN_BACKEND;
    }
    return MOE_PLAN_HOST;
}


/*
 * Each step row's output, by its sequence's plan (moe_seq_plan): rows that
 * end their sequence's known tokens get token_out (ARGMAX: the backend's
 * argmax; BACKEND: the draw with the sequence's parameters: its RNG gives
 * u here exactly when moe_sample() would draw, so the stream of a seeded
 * request is the same either way) or logits for moe_sample() on the host
 * (HOST, or BACKEND in a step whose penalty lists found no memory).
 */
static void
moe_step_outputs(moe_engine_t *e, int n)
{
    moe_seq_batch_t *b;
    moe_seq_t       *s;
    size_t           used = 0;
    int              i, k;

    for (i = 0; i < n; i++) {
        s = e->batch_seq[i];
        b = &e->batch[i];
        b->logits = NULL;
        b->token_out = NULL;
        b->sample = NULL;
        b->n_pen = 0;
        b->n_valid = e->n_sample;
        if (s->n_computed + b->n_tokens != s->n_tokens) {
            continue;
        }
        if (s->plan == MOE_PLAN_ARGMAX) {
            b->token_out = e->tok_out + i;
            continue;
        }
        /* no room for the penalty lists: the host samples this step */
        if (s->plan != MOE_PLAN_BACKEND
            || moe_pen_reserve(e, used + (size_t) s->n_pen) != MOE_OK)
        {
            b->logits = e->logits + (size_t) i * e->info.vocab_size;
            continue;
        }
        b->token_out = e->tok_out + i;
        b->sample = &s->sp;
        b->u = moe_sampling_is_greedy(&s->sp) ? 0.0f
                                               : moe_rng_uniform(&s->rng);
        for (k = 0; k < s->n_pen; k++) {
            int32_t t = s->pen_ids[k];

            e->pen_tok[used + k] = t;
            e->pen_cnt[used + k] = s->counts != NULL ? s->counts[t] : 0;
            e->pen_seen[used + k] = s->seen != NULL ? s->seen[t] : 0;
        }
        b->n_pen = s->n_pen;
        used += (size_t) s->n_pen;
    }
    /* pointers last: the lists may have moved while they grew */
    used = 0;
    for (i = 0; i < n; i++) {
        b = &e->batch[i];
        if (b->n_pen == 0) {
            b->pen_tok = b->pen_cnt = NULL;
            b->pen_seen = NULL;
            continue;
        }
        b->pen_tok = e->pen_tok + used;
        b->pen_cnt = e->pen_cnt + used;
        b->pen_seen = e->pen_seen + used;
        used += (size_t) b->n_pen;
    }
}


/* Entry i of the step: s's next chunk of `chunk` tokens (no outputs yet;
 * the step decides logits or token after admission). */
static void
moe_batch_add(moe_engine_t *e, int i, moe_seq_t *s, int chunk)
{
    moe_seq_batch_t  *b = &e->batch[i];

    memset(b, 0, sizeof(*b));
    e->batch_seq[i] = s;
    b->tokens = s->tokens + s->n_computed;
    b->n_tokens = chunk;
    b->pos = s->n_computed;
    b->block_table = s->blocks;
    b->n_blocks = s->n_blocks;
}


static int
moe_step(moe_engine_t *e)
{
    int         i, n = 0, budget, want, chunk, rc, limit, reason;
    int         preempted = 0, resumed;
    int32_t     tok;
    float       lp;
    int64_t     t0;
    moe_seq_t  *s;
    moe_event_t ev;

    budget = e->cfg.max_num_batched_tokens;
    limit = e->cfg.max_chunked_prefill_tokens > 0
            ? e->cfg.max_chunked_prefill_tokens : budget;

    /* 1. running sequences: decode tokens and unfinished prefills */
    for (i = 0; i < e->n_running && budget > 0; i++) {
        s = e->running[i];
        want = s->n_tokens - s->n_computed;
        chunk = want < budget ? want : budget;
        if (chunk > limit) {
            chunk = limit;
        }
        if (chunk < want && !e->cfg.enable_chunked_prefill && n > 0) {
            continue;
        }

        while ((rc = moe_blocks_reserve(&e->blocks, &s->blocks, &s->n_blocks,
                                        &s->cap_blocks,
                                        s->n_computed + chunk))
               == MOE_EFULL)
        {
            if (!moe_preempt_last(e, i + 1)) {
                break;
            }
            preempted = 1;
        }

        if (rc == MOE_EFULL) {
            /* s is the newest: it waits for blocks behind the others
             * (swapped out or to be recomputed) */
            (void) moe_preempt_last(e, i);
            preempted = 1;
            break;
        }

        if (rc != MOE_OK) {
            return rc;
        }

        moe_batch_add(e, n++, s, chunk);
        budget -= chunk;
    }

    /* 2. resume swapped sequences and admit waiting ones, strictly oldest
     * first (swapped ones were admitted before any never-admitted one);
     * not in a step that had to preempt (it would only swap back) */
    while (!preempted && (e->waitq.head != NULL || e->swapq.head != NULL)
           && budget > 0 && e->n_running < e->cfg.max_num_seqs)
    {
        s = e->swapq.head;
        if (s != NULL
            && (e->waitq.head == NULL || s->order < e->waitq.head->order))
        {
            want = s->n_tokens - s->n_computed;
            chunk = want < budget ? want : budget;
            if (chunk > limit) {
                chunk = limit;
            }
            if (chunk < want && !e->cfg.enable_chunked_prefill && n > 0) {
                break;
            }
            rc = moe_swap_in_seq(e, s, chunk, &resumed);
            if (rc == MOE_EFULL) {
                break;
            }
            if (rc != MOE_OK) {
                return rc;
            }
            if (!resumed) {
                continue;       /* copy failed: s waits for a recompute */
            }

            moe_batch_add(e, n++, s, chunk);
            budget -= chunk;
            continue;
        }

        s = e->waitq.head;

        /* prefix cache: reuse whole blocks of an equal prefix; the last
         * prompt token is always computed (its logits are needed, and its
         * block must be private since K/V will be written there) */
        if (s->n_blocks == 0 && s->n_computed == 0) {
            int hit = moe_blocks_match(&e->blocks, s->tokens,
                                       s->n_tokens - 1, &s->blocks,
                                       &s->n_blocks, &s->cap_blocks,
                                       s->bhash);
            s->n_computed = hit > 0 ? hit : 0;
            s->n_published = s->n_computed / e->cfg.block_size;
            if (!s->admitted) {
                s->n_cached = s->n_computed;
            }
        }

        want = s->n_tokens - s->n_computed;
        chunk = want < budget ? want : budget;
        if (chunk > limit) {
            chunk = limit;
        }
        if (chunk < want && !e->cfg.enable_chunked_prefill && n > 0) {
            chunk = 0;
        }

        rc = chunk == 0 ? MOE_EFULL
             : moe_blocks_reserve(&e->blocks, &s->blocks, &s->n_blocks,
                                  &s->cap_blocks, s->n_computed + chunk);
        if (rc != MOE_OK) {
            /* not this step: give the matched blocks back for now */
            moe_blocks_release(&e->blocks, s->blocks, &s->n_blocks);
            s->n_computed = 0;
            s->n_published = 0;
            if (rc == MOE_EFULL) {
                break;
            }
            return rc;
        }

        if (!s->admitted) {
            s->admitted = 1;
            s->plan = moe_seq_plan(e, s);
            atomic_fetch_add_explicit(&e->st_cached_tokens, s->n_cached,
                                      memory_order_relaxed);
        }

        moe_q_unlink(&e->waitq, s);
        moe_running_insert(e, s);

        moe_batch_add(e, n++, s, chunk);
        budget -= chunk;
    }

    if (n == 0) {
        return MOE_OK;
    }

    /* the last prompt / generated token's output: greedy sequences
     * without penalties or logprobs take the backend's argmax (no logits
     * copy, no host scan); with a backend that samples, the others
     * without logprobs too; the rest logits for moe_sample() */
    moe_step_outputs(e, n);

    /* 3. forward */
    t0 = moe_now_ns();
    rc = e->backend->forward(e->backend, e->batch, n);
    if (rc != MOE_OK) {
        moe_log(MOE_LOG_ERROR, "forward step failed: %s", moe_strerror(rc));
        /* fail the sequences of this step, keep serving the others */
        for (i = e->n_running - 1; i >= 0; i--) {
            int j;

            for (j = 0; j < n; j++) {
                if (e->batch_seq[j] == e->running[i]) {
                    break;
                }
            }
            if (j == n) {
                continue;
            }

            s = e->running[i];
            memset(&ev, 0, sizeof(ev));
            ev.req_id = s->id;
            ev.type = MOE_EV_ERROR;
            ev.status = rc;
            moe_emit(e, &ev);
            moe_blocks_release(&e->blocks, s->blocks, &s->n_blocks);
            moe_running_remove(e, i);
            moe_seq_free(s);
            atomic_fetch_add_explicit(&e->st_finished, 1,
                                      memory_order_relaxed);
        }
        return MOE_OK;
    }

    /* 4. sample and retire */
    for (i = 0; i < n; i++) {
        s = e->batch_seq[i];
        s->n_computed += e->batch[i].n_tokens;

        if (s->n_computed / e->cfg.block_size > s->n_published) {
            moe_blocks_publish(&e->blocks, s->blocks, s->tokens, s->bhash,
                               s->n_published,
                               s->n_computed / e->cfg.block_size);
            s->n_published = s->n_computed / e->cfg.block_size;
        }

        if (e->batch[i].token_out != NULL) {
            tok = e->tok_out[i];
            lp = 0.0f;
            if (e->batch[i].sample != NULL) {
                atomic_fetch_add_explicit(&e->st_backend_sampled, 1,
                                          memory_order_relaxed);
            }
        } else if (e->batch[i].logits != NULL) {
            tok = moe_sample(&e->sampler, e->batch[i].logits, &s->sp,
                             s->counts, s->seen, &s->rng, &lp);
        } else {
            continue;
        }
        s->n_generated++;
        atomic_fetch_add_explicit(&e->st_gen_tokens, 1, memory_order_relaxed);
        if (s->n_generated == 1) {
            atomic_fetch_add_explicit(&e->st_prompt_tokens, s->n_prompt,
                                      memory_order_relaxed);
        }

        reason = MOE_FINISH_NONE;

        if (!s->sp.ignore_eos) {
            int k;

            for (k = 0; k < e->info.n_eos; k++) {
                if (tok == e->info.eos_ids[k]) {
                    reason = MOE_FINISH_STOP;
                }
            }
        }

        for (int k = 0; k < s->sp.n_stop_token_ids; k++) {
            if (tok == s->sp.stop_token_ids[k]) {
                reason = MOE_FINISH_STOP;
            }
        }

        if (reason == MOE_FINISH_NONE) {
            memset(&ev, 0, sizeof(ev));
            ev.req_id = s->id;
            ev.type = MOE_EV_TOKEN;
            ev.token = tok;
            ev.logprob = lp;
            moe_emit(e, &ev);

            moe_seq_pen_note(s, tok);
            if (s->counts) s->counts[tok]++;
            if (s->seen) s->seen[tok] = 1;

            if (s->n_generated >= s->sp.max_tokens
                || s->n_tokens + 1 >= e->info.max_model_len
                || s->n_tokens >= s->cap)
            {
                reason = MOE_FINISH_LENGTH;
            } else {
                s->tokens[s->n_tokens++] = tok;
            }
        }

        if (reason != MOE_FINISH_NONE) {
            int j;

            for (j = 0; j < e->n_running; j++) {
                if (e->running[j] == s) {
                    break;
                }
            }
            moe_retire(e, j, reason,
                       reason == MOE_FINISH_STOP ? tok : -1);
        }
    }

    atomic_fetch_add_explicit(&e->st_steps, 1, memory_order_relaxed);
    atomic_fetch_add_explicit(&e->st_busy_ns, moe_now_ns() - t0,
                              memory_order_relaxed);

    return MOE_OK;
}


static void
moe_publish_stats(moe_engine_t *e)
{
    size_t          i;
    const int64_t  *c;

    atomic_store_explicit(&e->st_running, e->n_running, memory_order_relaxed);
    atomic_store_explicit(&e->st_waiting, e->waitq.n, memory_order_relaxed);
    atomic_store_explicit(&e->st_blocks_used,
                          e->blocks.n_total - e->blocks.n_free,
                          memory_order_relaxed);
    atomic_store_explicit(&e->st_blocks_cached, e->blocks.n_cached,
                          memory_order_relaxed);
    atomic_store_explicit(&e->st_swapped, e->swapq.n, memory_order_relaxed);
    atomic_store_explicit(&e->st_swap_used,
                          e->slots.n_total - e->slots.n_free,
                          memory_order_relaxed);

    if (e->backend->expert_counts != NULL
        && (c = e->backend->expert_counts(e->backend)) != NULL)
    {
        for (i = 0; i < e->n_expert_counts; i++) {
            atomic_store_explicit(&e->expert_counts[i], c[i],
                                  memory_order_relaxed);
        }
    }
}


/* With the engine held (moe_engine_hold) and no steps left: park here,
 * between steps and before the submit ring is read, until released. */
static void
moe_hold_gate(moe_engine_t *e)
{
    pthread_mutex_lock(&e->hold_mu);
    while (e->hold_steps == 0
           && !atomic_load_explicit(&e->stop, memory_order_acquire))
    {
        e->parked = 1;
        pthread_cond_broadcast(&e->hold_cv);
        pthread_cond_wait(&e->hold_cv, &e->hold_mu);
    }
    e->parked = 0;
    pthread_mutex_unlock(&e->hold_mu);
}


static void *
moe_engine_main(void *arg)
{
    moe_engine_t   *e = arg;
    struct pollfd   pfd;
    uint64_t        v;
    ssize_t         r;
    int             rc, timeout;

    pfd.fd = e->wake_fd;
    pfd.events = POLLIN;

    while (!atomic_load_explicit(&e->stop, memory_order_acquire)) {
        if (atomic_load_explicit(&e->held, memory_order_acquire)) {
            moe_hold_gate(e);
        }

        moe_drain_submit(e);
        moe_flush_overflow(e);

        if (e->n_running == 0 && e->waitq.n == 0 && e->swapq.n == 0) {
            moe_publish_stats(e);
            /* events from cancels or failed submits (drain_submit) need
             * their wake-up too, not only those of a step */
            if (e->n_overflow > 0 || e->wake_pending) {
                moe_wake_worker(e);
            }
            /* idle: sleep until the worker queues work (or, with events
             * still waiting for ring space, retry soon) */
            timeout = e->n_overflow > 0 ? 1 : 200;
            if (poll(&pfd, 1, timeout) > 0) {
                r = read(e->wake_fd, &v, sizeof(v));
                (void) r;
            }
            continue;
        }

        rc = moe_step(e);
        if (rc != MOE_OK) {
            moe_log(MOE_LOG_ERROR, "scheduler step failed: %s",
                    moe_strerror(rc));
        }

        if (atomic_load_explicit(&e->held, memory_order_acquire)) {
            pthread_mutex_lock(&e->hold_mu);
            if (e->hold_steps > 0) {
                e->hold_steps--;
            }
            pthread_mutex_unlock(&e->hold_mu);
        }

        moe_publish_stats(e);
        if (e->wake_pending) {
            moe_wake_worker(e);
        }
    }

    return NULL;
}


/* ------------------------------------------------------------ creation */



/* chat_template from tokenizer_config.json (string, or the "default" entry
 * of a list of named templates); NULL when absent. */
static char *
moe_read_chat_template(const char *dir)
{
    char        path[MOE_PATH_MAX + 64], ebuf[128], *text, *res = NULL;
    size_t      len;
    yajl_val    root, t;
    const char *key[] = { "chat_template", NULL };
    size_t      i;

    snprintf(path, sizeof(path), "%s/tokenizer_config.json", dir);
    text = moe_read_file(path, &len);
    if (text == NULL || len == 0) {
        free(text);
        return NULL;            /* absent or empty: no template */
    }

    root = yajl_tree_parse(text, ebuf, sizeof(ebuf));
    free(text);
    if (root == NULL) {
        moe_log(MOE_LOG_WARN, "%s: not valid JSON (%s); ignoring it", path,
                ebuf);
        return NULL;
    }

    t = yajl_tree_get(root, key, yajl_t_any);
    if (t != NULL && YAJL_IS_STRING(t)) {
        res = strdup(t->u.string);
    } else if (t != NULL && YAJL_IS_ARRAY(t)) {
        for (i = 0; i < YAJL_GET_ARRAY(t)->len; i++) {
            yajl_val  it = YAJL_GET_ARRAY(t)->values[i];
            const char *nk[] = { "name", NULL }, *tk[] = { "template", NULL };
            yajl_val  nm = yajl_tree_get(it, nk, yajl_t_string);
            yajl_val  tp = yajl_tree_get(it, tk, yajl_t_string);

            if (nm && tp && res == NULL
                && strcmp(nm->u.string, "default") == 0)
            {
                res = strdup(tp->u.string);
            }
        }
    }

    yajl_tree_free(root);
    return res;
}


static void
moe_compare_model_section(const moe_config_t *c, const moe_hparams_t *hp)
{
    const char  *f = c->file;

#define MOE_CMP(field, val, name)                                            \
    if (c->field > 0 && c->field != (val)) {                                 \
        moe_log(MOE_LOG_WARN, "%s: model.%s is %d but the model's "          \
                "config.json says %d; using the model's value", f, name,     \
                c->field, (int) (val));                                      \
    }

    MOE_CMP(num_experts, hp->n_experts, "num_experts")
    MOE_CMP(hidden_size, hp->dim, "hidden_size")
    MOE_CMP(intermediate_size, hp->ffn_dim, "intermediate_size")
    MOE_CMP(max_sequence_length, hp->max_pos, "max_sequence_length")

#undef MOE_CMP

    if (c->top_k_experts > 0) {
        moe_log(MOE_LOG_INFO, "%s: model.top_k_experts %d overrides the "
                "model's top-k (now %d of %d experts)", f, c->top_k_experts,
                hp->top_k, hp->n_experts);
    }
}


/* The factory's view of the configuration (backends/backend.h). */
static void
moe_backend_opts(const moe_config_t *cfg, int max_model_len,
    moe_backend_opts_t *o)
{
    memset(o, 0, sizeof(*o));
    o->file = cfg->file;
    o->backend = cfg->backend;
    o->dummy = strcmp(cfg->load_format, "dummy") == 0;
    o->tensor_parallel_size = cfg->tensor_parallel_size;
    if (cfg->n_instances > 0 && cfg->instances[0].n_gpu_devices > 0) {
        o->gpu_devices = cfg->instances[0].gpu_devices;
        o->n_gpu_devices = cfg->instances[0].n_gpu_devices;
    }
    o->cpu_tensor_parallel = cfg->cpu_tensor_parallel;
    o->cpu_threads = cfg->cpu_threads;
    o->kv_cache_blocks = cfg->kv_cache_blocks;
    o->gpu_memory_utilization = cfg->gpu_memory_utilization;
    o->swap_space = cfg->swap_space;
    o->block_size = cfg->block_size;
    o->max_model_len = max_model_len;
    o->max_num_seqs = cfg->max_num_seqs;
    o->max_num_batched_tokens = cfg->max_num_batched_tokens;
}


int
moe_engine_create(const moe_config_t *cfg, moe_engine_t **out, char *err,
    size_t errlen)
{
    int                   rc, n_blocks, i;
    char                  path[MOE_PATH_MAX + 32];
    const moe_hparams_t  *hp;
    moe_engine_t         *e;
    moe_backend_opts_t    bo;
    moe_backend_kind_t    kind;

    *out = NULL;

    e = calloc(1, sizeof(*e));
    if (e == NULL) {
        moe_errf(err, errlen, "%s", "out of memory");
        return MOE_ENOMEM;
    }
    e->ev_fd = e->wake_fd = -1;
    e->cfg = *cfg;
    e->hold_steps = -1;
    if (pthread_mutex_init(&e->hold_mu, NULL) != 0) {
        free(e);
        moe_errf(err, errlen, "%s", "pthread_mutex_init failed");
        return MOE_ENOMEM;
    }
    if (pthread_cond_init(&e->hold_cv, NULL) != 0) {
        pthread_mutex_destroy(&e->hold_mu);
        free(e);
        moe_errf(err, errlen, "%s", "pthread_cond_init failed");
        return MOE_ENOMEM;
    }

    if (cfg->model_path[0] == '\0') {
        moe_errf(err, errlen, "%s", "no model path in the configuration");
        rc = MOE_EINVAL;
        goto fail;
    }

    /* which backend, and the model loaded the way it reads it */
    moe_backend_opts(cfg, 0, &bo);
    rc = moe_backend_load_model(&bo, cfg->model_path,
                                cfg->top_k_experts > 0 ? cfg->top_k_experts
                                                       : 0,
                                &kind, &e->model, err, errlen);
    if (rc != MOE_OK) {
        goto fail;
    }
    hp = moe_model_hparams(e->model);
    moe_compare_model_section(cfg, hp);

    snprintf(path, sizeof(path), "%s/tokenizer.json", cfg->model_path);
    rc = moe_tokenizer_load(path, &e->tok, err, errlen);
    if (rc != MOE_OK) {
        goto fail;
    }

    e->chat_template = moe_read_chat_template(cfg->model_path);
    /* model info */
    snprintf(e->info.served_name, sizeof(e->info.served_name), "%.255s",
             cfg->served_model_name[0] ? cfg->served_model_name
                                       : cfg->model_name);
    memcpy(e->info.model_path, cfg->model_path, sizeof(e->info.model_path));
    memcpy(e->info.architecture, hp->arch_name, sizeof(e->info.architecture));
    e->info.vocab_size = hp->vocab_size;
    e->info.n_layers = hp->n_layers;
    e->info.n_experts = hp->n_experts;
    e->info.top_k = hp->top_k;
    e->info.hidden_size = hp->dim;
    e->info.n_eos = hp->n_eos;
    memcpy(e->info.eos_ids, hp->eos_ids, sizeof(e->info.eos_ids));
    e->info.block_size = cfg->block_size;
    e->info.chat_template = e->chat_template;
    e->info.created = (long) time(NULL);

    e->info.max_model_len = hp->max_pos;
    if (cfg->max_model_len > 0 && cfg->max_model_len <= hp->max_pos) {
        e->info.max_model_len = cfg->max_model_len;
    } else if (cfg->max_model_len > hp->max_pos) {
        /* as with the model: section, the model's own limit wins */
        moe_log(MOE_LOG_WARN, "%s: max_model_len %d is larger than the "
                "model's max_position_embeddings %d; using %d", cfg->file,
                cfg->max_model_len, hp->max_pos, hp->max_pos);
    }

    /* ids the tokenizer cannot decode (embedding padding) are never
     * sampled */
    e->n_sample = moe_tokenizer_vocab_size(e->tok);
    if (e->n_sample <= 0 || e->n_sample > hp->vocab_size) {
        e->n_sample = hp->vocab_size;
    }

    /* the backend: CPU fallback, rank placement, KV pool and swap space
     * (every running sequence can reach max_model_len) */
    moe_backend_opts(cfg, e->info.max_model_len, &bo);
    rc = moe_backend_create(&bo, kind, e->model, &e->backend, err, errlen);
    if (rc != MOE_OK) {
        goto fail;
    }
    snprintf(e->info.backend, sizeof(e->info.backend), "%s",
             e->backend->name);
    n_blocks = e->backend->n_kv_blocks;
    e->info.kv_blocks_total = n_blocks;

    rc = moe_blocks_init(&e->blocks, n_blocks, cfg->block_size,
                         cfg->enable_prefix_caching);
    if (rc != MOE_OK) {
        moe_errf(err, errlen, "%s", "out of memory (block manager)");
        goto fail;
    }

    rc = moe_slots_init(&e->slots, e->backend->n_swap_slots);
    if (rc != MOE_OK) {
        moe_errf(err, errlen, "%s", "out of memory (swap slots)");
        goto fail;
    }

    e->running = calloc((size_t) cfg->max_num_seqs, sizeof(moe_seq_t *));
    e->batch = calloc((size_t) cfg->max_num_seqs, sizeof(moe_seq_batch_t));
    e->batch_seq = calloc((size_t) cfg->max_num_seqs, sizeof(moe_seq_t *));
    e->logits = malloc(sizeof(float) * (size_t) cfg->max_num_seqs
                       * (size_t) hp->vocab_size);
    e->tok_out = calloc((size_t) cfg->max_num_seqs, sizeof(int32_t));
    e->n_expert_counts = (size_t) hp->n_layers * (size_t) hp->n_experts;
    e->expert_counts = calloc(e->n_expert_counts, sizeof(_Atomic int64_t));
    e->submit = moe_ring_create((size_t) cfg->ring_size, sizeof(moe_msg_t));
    e->events = moe_ring_create((size_t) cfg->ring_size * 4,
                                sizeof(moe_event_t));

    if (e->running == NULL || e->batch == NULL || e->batch_seq == NULL
        || e->logits == NULL || e->tok_out == NULL
        || e->expert_counts == NULL || e->submit == NULL
        || e->events == NULL
        || moe_sampler_init(&e->sampler, e->n_sample) != MOE_OK)
    {
        moe_errf(err, errlen, "%s", "out of memory (engine buffers)");
        rc = MOE_ENOMEM;
        goto fail;
    }

    e->ev_fd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
    e->wake_fd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
    if (e->ev_fd < 0 || e->wake_fd < 0) {
        moe_errf(err, errlen, "eventfd: %s", strerror(errno));
        rc = MOE_ENOMEM;
        goto fail;
    }

    if (pthread_create(&e->thread, NULL, moe_engine_main, e) != 0) {
        moe_errf(err, errlen, "%s", "cannot start the engine thread");
        rc = MOE_ENOMEM;
        goto fail;
    }
    e->thread_started = 1;

    for (i = 0; i < 1; i++) {
        moe_log(MOE_LOG_INFO, "engine ready: %s (%s, %d layers, %d experts "
                "top-%d, vocab %d), backend %s, max_model_len %d, KV cache "
                "%d blocks x %d tokens", e->info.served_name,
                e->info.architecture, e->info.n_layers, e->info.n_experts,
                e->info.top_k, e->info.vocab_size, e->info.backend,
                e->info.max_model_len, n_blocks, cfg->block_size);
    }

    *out = e;
    return MOE_OK;

fail:
    moe_engine_destroy(e);
    return rc;
}


void
moe_engine_destroy(moe_engine_t *e)
{
    moe_msg_t   m;
    moe_seq_t  *s;
    uint64_t    one = 1;
    ssize_t     r;

    if (e == NULL) {
        return;
    }

    if (e->thread_started) {
        atomic_store_explicit(&e->stop, 1, memory_order_release);
        r = write(e->wake_fd, &one, sizeof(one));
        (void) r;
        /* a held engine waits in moe_hold_gate(): wake it to see stop */
        pthread_mutex_lock(&e->hold_mu);
        pthread_cond_broadcast(&e->hold_cv);
        pthread_mutex_unlock(&e->hold_mu);
        pthread_join(e->thread, NULL);
    }

    if (e->submit != NULL) {
        while (moe_ring_pop(e->submit, &m) == 1) {
            free(m.prompt);
        }
    }

    while (e->n_running > 0) {
        moe_seq_free(e->running[--e->n_running]);
    }
    while ((s = e->waitq.head) != NULL) {
        moe_q_unlink(&e->waitq, s);
        moe_seq_free(s);
    }
    while ((s = e->swapq.head) != NULL) {
        moe_q_unlink(&e->swapq, s);
        moe_seq_free(s);
    }

    if (e->backend != NULL) {
        e->backend->destroy(e->backend);
    }
    moe_model_free(e->model);
    moe_tokenizer_free(e->tok);
    moe_blocks_destroy(&e->blocks);
    moe_slots_destroy(&e->slots);
    moe_sampler_destroy(&e->sampler);
    moe_ring_free(e->submit);
    moe_ring_free(e->events);
    if (e->ev_fd >= 0) close(e->ev_fd);
    if (e->wake_fd >= 0) close(e->wake_fd);
    free(e->running);
    free(e->batch);
    free(e->batch_seq);
    free(e->logits);
    free(e->tok_out);
    free(e->pen_tok);
    free(e->pen_cnt);
    free(e->pen_seen);
    free(e->overflow);
    free((void *) e->expert_counts);
    free(e->chat_template);
    pthread_cond_destroy(&e->hold_cv);
    pthread_mutex_destroy(&e->hold_mu);
    free(e);
}


/* ------------------------------------------------- worker-side calls */

int
moe_engine_eventfd(const moe_engine_t *e)
{
    return e->ev_fd;
}


const moe_model_info_t *
moe_engine_info(const moe_engine_t *e)
{
    return &e->info;
}


const moe_tokenizer_t *
moe_engine_tokenizer(const moe_engine_t *e)
{
    return e->tok;
}


static void
moe_wake_engine(moe_engine_t *e)
{
    uint64_t  one = 1;
    ssize_t   r;

    r = write(e->wake_fd, &one, sizeof(one));
    (void) r;
}


int
moe_engine_submit(moe_engine_t *e, uint64_t req_id, const int32_t *prompt,
    int n_prompt, const moe_sampling_t *sp)
{
    int        i;
    moe_msg_t  m;

    if (prompt == NULL || n_prompt < 1 || sp == NULL || sp->max_tokens < 1
        || sp->temperature < 0.0f || sp->top_p <= 0.0f || sp->top_p > 1.0f
        || sp->min_p < 0.0f || sp->min_p > 1.0f
        || sp->repetition_penalty <= 0.0f
        || sp->n_stop_token_ids < 0
        || sp->n_stop_token_ids > MOE_MAX_STOP_IDS)
    {
        return MOE_EINVAL;
    }

    if (n_prompt >= e->info.max_model_len) {
        return MOE_ETOOLONG;
    }

    for (i = 0; i < n_prompt; i++) {
        if (prompt[i] < 0 || prompt[i] >= e->info.vocab_size) {
            return MOE_EINVAL;
        }
    }

    memset(&m, 0, sizeof(m));
    m.type = MOE_MSG_SUBMIT;
    m.req_id = req_id;
    m.n_prompt = n_prompt;
    m.sp = *sp;
    m.prompt = malloc(sizeof(int32_t) * (size_t) n_prompt);
    if (m.prompt == NULL) {
        return MOE_ENOMEM;
    }
    memcpy(m.prompt, prompt, sizeof(int32_t) * (size_t) n_prompt);

    if (moe_ring_push(e->submit, &m) != MOE_OK) {
        free(m.prompt);
        return MOE_EFULL;
    }

    moe_wake_engine(e);
    return MOE_OK;
}


int
moe_engine_cancel(moe_engine_t *e, uint64_t req_id)
{
    moe_msg_t  m;

    memset(&m, 0, sizeof(m));
    m.type = MOE_MSG_CANCEL;
    m.req_id = req_id;

    if (moe_ring_push(e->submit, &m) != MOE_OK) {
        return MOE_EFULL;
    }

    moe_wake_engine(e);
    return MOE_OK;
}


int
moe_engine_hold(moe_engine_t *e, int steps)
{
    if (!e->thread_started) {
        return MOE_ESTATE;
    }

    pthread_mutex_lock(&e->hold_mu);
    e->hold_steps = steps < 0 ? -1 : steps;
    atomic_store_explicit(&e->held, steps >= 0, memory_order_release);
    pthread_cond_broadcast(&e->hold_cv);
    pthread_mutex_unlock(&e->hold_mu);

    /* out of its idle poll, so that it reaches the gate now */
    moe_wake_engine(e);

    if (steps == 0) {
        pthread_mutex_lock(&e->hold_mu);
        while (!e->parked && e->hold_steps == 0) {
            pthread_cond_wait(&e->hold_cv, &e->hold_mu);
        }
        pthread_mutex_unlock(&e->hold_mu);
    }

    return MOE_OK;
}


size_t
moe_engine_drain(moe_engine_t *e, moe_event_t *ev, size_t max)
{
    size_t    n = 0;
    uint64_t  v, one = 1;
    ssize_t   r;

    /* clear the wake-up first: events pushed after this read set it again */
    r = read(e->ev_fd, &v, sizeof(v));
    (void) r;

    while (n < max && moe_ring_pop(e->events, &ev[n]) == 1) {
        n++;
    }

    /*
     * ev is full and events remain: keep the eventfd readable, as the
     * contract says, for a caller that takes one batch per wake-up.  The
     * read above cleared it, and once the engine is idle nothing else would
     * set it again: the rest would wait unseen.
     */
    if (n == max && moe_ring_count(e->events) > 0) {
        r = write(e->ev_fd, &one, sizeof(one));
        (void) r;
    }

    return n;
}


void
moe_engine_stats(const moe_engine_t *e, moe_stats_t *o)
{
    moe_engine_t  *m = (moe_engine_t *) e;

    memset(o, 0, sizeof(*o));
    o->kv_blocks_total = e->info.kv_blocks_total;
    o->kv_blocks_used = atomic_load(&m->st_blocks_used);
    o->kv_blocks_cached = atomic_load(&m->st_blocks_cached);
    o->cached_tokens_total = atomic_load(&m->st_cached_tokens);
    o->block_size = e->cfg.block_size;
    o->kv_bytes_per_block = e->backend->kv_bytes_per_block;
    o->weights_bytes = moe_model_weight_bytes(e->model);
    o->seqs_running = atomic_load(&m->st_running);
    o->seqs_waiting = atomic_load(&m->st_waiting);
    o->requests_submitted = atomic_load(&m->st_submitted);
    o->requests_finished = atomic_load(&m->st_finished);
    o->requests_cancelled = atomic_load(&m->st_cancelled);
    o->prompt_tokens_total = atomic_load(&m->st_prompt_tokens);
    o->generated_tokens_total = atomic_load(&m->st_gen_tokens);
    o->steps = atomic_load(&m->st_steps);
    o->busy_ns = atomic_load(&m->st_busy_ns);
    o->preemptions = atomic_load(&m->st_preemptions);
    o->submit_ring_free = (int64_t) (moe_ring_capacity(e->submit)
                                     - moe_ring_count(e->submit));
    o->swap_outs = atomic_load(&m->st_swap_outs);
    o->swap_ins = atomic_load(&m->st_swap_ins);
    o->swap_blocks_out = atomic_load(&m->st_swap_blocks_out);
    o->seqs_swapped = atomic_load(&m->st_swapped);
    o->swap_slots_total = e->slots.n_total;
    o->swap_slots_used = atomic_load(&m->st_swap_used);
    o->backend_sampled_tokens = atomic_load(&m->st_backend_sampled);
}


int
moe_engine_expert_counts(const moe_engine_t *e, int64_t *counts, size_t n)
{
    size_t  i;

    if (n < e->n_expert_counts) {
        return MOE_EINVAL;
    }

    for (i = 0; i < e->n_expert_counts; i++) {
        counts[i] = atomic_load_explicit(&e->expert_counts[i],
                                         memory_order_relaxed);
    }

    return (int) e->n_expert_counts;
}
