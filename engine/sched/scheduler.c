/*
 * The scheduler: sequences, their queues, and the step (continuous
 * batching).  Every step first gives each running sequence its next chunk
 * (one token when decoding, up to the token budget when prefilling), then
 * admits waiting sequences in arrival order while there are sequence
 * slots, tokens in the budget and KV blocks.  When a running sequence
 * cannot get a block, the most recently admitted one is preempted:
 * swapped out (its blocks copied to the backend's host swap pool, resumed
 * later from where it was) when the swap slots suffice, else recomputed
 * (its blocks freed, its prompt + output computed again later, at the
 * front of the queue).  Swapped and waiting sequences are resumed /
 * admitted strictly oldest first, so the oldest requests always progress.
 * Each sequence's sampling plan (moe_plan_t) is decided at its first
 * admission.  Events go out through the event ring (an overflow queue
 * keeps their order when it is full).
 */

#include <math.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <math.h>
#include <string.h>

#include "sched/engine_int.h"


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
    free(s->plp);
    moe_sampling_bias_free(&s->sp);
    moe_guided_state_free(s->guided);
    moe_guide_release(s->sp.guide);
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
            free(ev->lp);
            return;
        }
        e->overflow = p;
        e->cap_overflow = cap;
    }

    e->overflow[e->n_overflow++] = *ev;
}


void
moe_sched_flush_events(moe_engine_t *e)
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
    ev.index = s->choice;
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


/* 1 when s is the only sequence left of its request (the choices of a
 * request share its id): its end is the request's end. */
static int
moe_seq_last_choice(const moe_engine_t *e, const moe_seq_t *s)
{
    int               i, k;
    const moe_seq_t  *o;
    const moe_seq_queue_t *q[2] = { &e->waitq, &e->swapq };

    if (s->sp.n_choices <= 1) {
        return 1;
    }
    for (i = 0; i < e->n_running; i++) {
        o = e->running[i];
        if (o != s && o->id == s->id) {
            return 0;
        }
    }
    for (k = 0; k < 2; k++) {
        for (o = q[k]->head; o != NULL; o = o->next) {
            if (o != s && o->id == s->id) {
                return 0;
            }
        }
    }
    return 1;
}


/* Finish a running sequence: event, blocks back, memory freed. */
static void
moe_retire(moe_engine_t *e, int i, int reason, int32_t token)
{
    moe_seq_t  *s = e->running[i];

    int         last = moe_seq_last_choice(e, s);

    moe_finish_event(e, s, reason, token);
    moe_blocks_release(&e->blocks, s->blocks, &s->n_blocks);
    moe_running_remove(e, i);
    moe_seq_free(s);

    if (last) {
        atomic_fetch_add_explicit(&e->st_finished, 1, memory_order_relaxed);
    }
}


/* One sequence of request id (choice index, or any when index < 0)
 * cancelled: 1, or 0 when there is none (left). */
static int
moe_sched_cancel_one(moe_engine_t *e, uint64_t id, int index)
{
    int               i, k, last;
    moe_seq_t        *s;
    moe_seq_queue_t  *q[2] = { &e->waitq, &e->swapq };

    for (i = 0; i < e->n_running; i++) {
        s = e->running[i];
        if (s->id == id && (index < 0 || s->choice == index)) {
            if (moe_seq_last_choice(e, s)) {
                atomic_fetch_add_explicit(&e->st_cancelled, 1,
                                          memory_order_relaxed);
            }
            moe_retire(e, i, MOE_FINISH_CANCELLED, -1);
            return 1;
        }
    }

    /* waiting (maybe holding prefix blocks) or swapped (holding slots) */
    for (k = 0; k < 2; k++) {
        for (s = q[k]->head; s != NULL; s = s->next) {
            if (s->id != id || (index >= 0 && s->choice != index)) {
                continue;
            }
            last = moe_seq_last_choice(e, s);
            moe_q_unlink(q[k], s);
            moe_blocks_release(&e->blocks, s->blocks, &s->n_blocks);
            moe_seq_drop_slots(e, s);
            moe_finish_event(e, s, MOE_FINISH_CANCELLED, -1);
            moe_seq_free(s);
            if (last) {
                atomic_fetch_add_explicit(&e->st_finished, 1,
                                          memory_order_relaxed);
                atomic_fetch_add_explicit(&e->st_cancelled, 1,
                                          memory_order_relaxed);
            }
            return 1;
        }
    }

    return 0;
}


void
moe_sched_cancel(moe_engine_t *e, uint64_t id, int index)
{
    /* every choice of it; one already finished: its FINISH event is on
     * its way, nothing to do */
    while (moe_sched_cancel_one(e, id, index)) {
        /* next */
    }
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
    s->sp = m->sp;              /* the bias copy is the sequence's now */
    m->sp.logit_bias_ids = NULL;
    m->sp.logit_bias = NULL;
    m->sp.n_logit_bias = 0;
    m->sp.guide = NULL;         /* and the guide reference */
    if (s->sp.guide != NULL) {
        s->guided = moe_guided_state_create(s->sp.guide, e->info.eos_ids,
                                            e->info.n_eos);
        if (s->guided == NULL) {
            free(s->tokens);    /* m->prompt is still the caller's */
            s->tokens = NULL;
            moe_seq_free(s);
            return NULL;
        }
    }
    s->n_prompt = m->n_prompt;
    s->cap = cap;
    s->tokens = realloc(m->prompt, sizeof(int32_t) * (size_t) cap);
    if (s->tokens == NULL) {
        moe_seq_free(s);        /* m->prompt is still the caller's */
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

    if (s->sp.prompt_logprobs) {
        s->plp = moe_logprobs_alloc(s->n_prompt, s->sp.top_logprobs);
        if (s->plp == NULL) {
            moe_seq_free(s);
            return NULL;
        }
        s->plp->token[0] = s->tokens[0];
        s->plp->logprob[0] = NAN;
        for (i = 0; i < s->sp.top_logprobs; i++) {
            s->plp->top[i].id = -1;
            s->plp->top[i].logprob = NAN;
        }
    }

    moe_rng_seed(&s->rng, s->sp.has_seed
                          ? s->sp.seed
                          : (s->id * 0x9e3779b97f4a7c15ULL)
                            ^ (uint64_t) moe_now_ns());

    return s;
}


void
moe_sched_submit(moe_engine_t *e, moe_msg_t *m)
{
    moe_seq_t   *s;
    moe_event_t  ev;

    s = moe_seq_create(e, m);
    if (s == NULL) {
        free(m->prompt);
        m->prompt = NULL;
        memset(&ev, 0, sizeof(ev));
        ev.req_id = m->req_id;
        ev.type = MOE_EV_ERROR;
        ev.status = MOE_ENOMEM;
        moe_emit(e, &ev);
        atomic_fetch_add_explicit(&e->st_finished, 1, memory_order_relaxed);
        return;
    }

    moe_q_insert(&e->waitq, s);
}


int
moe_sched_idle(const moe_engine_t *e)
{
    return e->n_running == 0 && e->waitq.n == 0 && e->swapq.n == 0;
}


void
moe_sched_free_all(moe_engine_t *e)
{
    moe_seq_t  *s;

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


/* ---------------------------------------------- logprobs (issue 10) */

/* 1 while s (choice 0 of a request with n_choices > 1) has yet to fork */
static int
moe_seq_to_fork(const moe_seq_t *s)
{
    return s->sp.n_choices > 1 && !s->forked;
}


/* 1 while s prefills its prompt one position per step for its prompt
 * logprobs (each position's logits are needed) */
static int
moe_seq_scoring(const moe_seq_t *s)
{
    return s->plp != NULL && !s->plp_sent && s->n_computed < s->n_prompt;
}


/* the chunk s may take this step: one position while it scores */
static int
moe_seq_chunk(const moe_seq_t *s, int chunk)
{
    return moe_seq_scoring(s) && chunk > 1 ? 1 : chunk;
}


/* Row n_computed of s's prompt logprobs from the logits of the position
 * before it (raw model distribution: temperature 1). */
static void
moe_seq_score(moe_engine_t *e, moe_seq_t *s, const float *logits)
{
    int              row = s->n_computed;
    moe_logprobs_t  *lp = s->plp;

    lp->token[row] = s->tokens[row];
    lp->logprob[row] = moe_logprobs_row(logits, e->n_sample, 1.0f,
                                        s->tokens[row], lp->k,
                                        lp->top + (size_t) row * lp->k);
}


/* the prompt's last logits arrived: its rows are complete, send them */
static void
moe_seq_send_prompt(moe_engine_t *e, moe_seq_t *s)
{
    moe_event_t  ev;

    memset(&ev, 0, sizeof(ev));
    ev.req_id = s->id;
    ev.type = MOE_EV_PROMPT;
    ev.lp = s->plp;
    s->plp = NULL;
    s->plp_sent = 1;
    moe_emit(e, &ev);
}


/* Row i's logprobs by the backend (a sequence with logprobs on an
 * ARGMAX / BACKEND plan: the backend has logprobs_tokens) */
static void
moe_row_lp(moe_engine_t *e, int i, const moe_seq_t *s)
{
    moe_seq_batch_t  *b = &e->batch[i];

    if (!s->sp.logprobs) {
        return;
    }
    b->lp_out = e->lp_val + i;
    b->lp_top = e->lp_top + (size_t) i * MOE_MAX_TOP_LOGPROBS;
    b->lp_k = s->sp.top_logprobs;
}


/* A TOKEN event's top entries (sp.top_logprobs > 0) as the backend
 * computed them (moe_row_lp); NULL (none sent) out of memory. */
static moe_logprobs_t *
moe_token_lp_backend(moe_engine_t *e, int i, moe_seq_t *s, int32_t tok)
{
    moe_logprobs_t  *r;

    r = moe_logprobs_alloc(1, s->sp.top_logprobs);
    if (r == NULL) {
        return NULL;
    }
    r->token[0] = tok;
    r->logprob[0] = e->lp_val[i];
    memcpy(r->top, e->lp_top + (size_t) i * MOE_MAX_TOP_LOGPROBS,
           sizeof(moe_logprob_entry_t) * (size_t) r->k);
    return r;
}


/* A TOKEN event's top entries (sp.top_logprobs > 0) from the biased,
 * penalised logits moe_sample() left; NULL (none sent) out of memory. */
static moe_logprobs_t *
moe_token_lp(moe_engine_t *e, moe_seq_t *s, const float *logits, int32_t tok,
    float lp)
{
    moe_logprobs_t  *r;

    r = moe_logprobs_alloc(1, s->sp.top_logprobs);
    if (r == NULL) {
        return NULL;
    }
    r->token[0] = tok;
    r->logprob[0] = lp;
    (void) moe_logprobs_row(logits, e->n_sample, s->sp.temperature, tok,
                            r->k, r->top);
    return r;
}


/* ---------------------------------------------------- guided decoding */

/*
 * The allowed-token mask of guided sequence s for batch row i, into
 * e->gmask's row i; s->guided_n gets the count (0: dead end; a negative
 * status: no memory; both fail the sequence after the forward).
 */
static void
moe_guided_step_mask(moe_engine_t *e, moe_seq_t *s, int i)
{
    s->guided_n = moe_guided_mask(s->guided,
                                  e->gmask + (size_t) i
                                             * (size_t) e->gmask_words,
                                  (size_t) e->gmask_words);
}


/* the masked ids' logits to -inf (host sampling of a guided row): word
 * by word, all-allowed words skipped */
static void
moe_guided_apply(const uint32_t *mask, float *logits, int vocab)
{
    int       w, k, base, nw = (vocab + 31) / 32;
    uint32_t  m;

    for (w = 0; w < nw; w++) {
        m = mask[w];
        if (m == 0xffffffffu) {
            continue;
        }
        base = w * 32;
        if (m == 0 && base + 32 <= vocab) {
            for (k = 0; k < 32; k++) {          /* vectorizes */
                logits[base + k] = -INFINITY;
            }
            continue;
        }
        for (k = 0; k < 32 && base + k < vocab; k++) {
            if (!(m & (1u << k))) {
                logits[base + k] = -INFINITY;
            }
        }
    }
}


/*
 * End guided sequence s with an ERROR event (status MOE_EINVAL: its guide
 * allows no token here, or refused the sampled one) and free it.
 */
static void
moe_guided_fail(moe_engine_t *e, moe_seq_t *s, int status)
{
    moe_event_t  ev;
    int          j;

    for (j = 0; j < e->n_running; j++) {
        if (e->running[j] == s) {
            break;
        }
    }
    moe_log(MOE_LOG_WARN, "request %llu: guided decoding dead end (%s)",
            (unsigned long long) s->id, moe_strerror(status));
    memset(&ev, 0, sizeof(ev));
    ev.req_id = s->id;
    ev.type = MOE_EV_ERROR;
    ev.status = status;
    moe_emit(e, &ev);
    moe_blocks_release(&e->blocks, s->blocks, &s->n_blocks);
    if (j < e->n_running) {
        moe_running_remove(e, j);
    }
    moe_seq_free(s);
    atomic_fetch_add_explicit(&e->st_finished, 1, memory_order_relaxed);
}


/* ------------------------------------------ logit_bias (issue 10) */

/* Row i's logit_bias for the backend to add (a token_out row of a
 * sequence on an ARGMAX / BACKEND plan: the backend has logit_bias_device;
 * the lists are the sequence's own copy, alive for the step) */
static void
moe_row_bias(moe_engine_t *e, int i, const moe_seq_t *s)
{
    moe_seq_batch_t  *b = &e->batch[i];

    if (s->sp.n_logit_bias <= 0) {
        return;
    }
    b->bias_ids = s->sp.logit_bias_ids;
    b->bias = s->sp.logit_bias;
    b->n_bias = s->sp.n_logit_bias;
}


/*
 * The sampling plan of s, for its whole life: MOE_PLAN_ARGMAX when its
 * next token is always the plain argmax of its logits (what moe_sample()
 * does for it: greedy, no penalty that applies), so the backend may pick
 * it; MOE_PLAN_BACKEND when the backend can draw it (sample_tokens, the
 * penalty list complete); logprobs allow either only on a backend that
 * computes them (logprobs_tokens); else
 * MOE_PLAN_HOST.  A logit_bias rides with the row (moe_row_bias) when
 * the backend adds it (logit_bias_device), greedy or drawn; else the
 * sequence takes MOE_PLAN_HOST (greedy too).
 */
static moe_plan_t
moe_seq_plan(const moe_engine_t *e, const moe_seq_t *s)
{
    const moe_sampling_t *sp = &s->sp;
    int                   lp_ok;

    if (sp->n_logit_bias > 0 && !e->backend->logit_bias_device) {
        return MOE_PLAN_HOST;
    }
    /* guided: the mask rides with the row when the backend applies it
     * on the device; else the host masks the logits */
    if (s->guided != NULL && !e->backend->guided_mask) {
        return MOE_PLAN_HOST;
    }
    /* logprobs: the backend's when it computes them (logprobs_tokens),
     * else logits to the host */
    lp_ok = !sp->logprobs || e->backend->logprobs_tokens;

    if (moe_sampling_is_greedy(sp) && lp_ok
        && (s->seen == NULL || sp->repetition_penalty == 1.0f)
        && (s->counts == NULL
            || (sp->frequency_penalty == 0.0f
                && sp->presence_penalty == 0.0f)))
    {
        return MOE_PLAN_ARGMAX;
    }
    if (e->backend->sample_tokens && lp_ok && !s->pen_lost) {
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
        b->lp_out = NULL;
        b->lp_top = NULL;
        b->lp_k = 0;
        b->sample = NULL;
        b->n_pen = 0;
        b->n_valid = e->n_sample;
        b->mask = NULL;
        b->bias_ids = NULL;
        b->bias = NULL;
        b->n_bias = 0;
        if (moe_seq_scoring(s)
            && s->n_computed + b->n_tokens != s->n_tokens)
        {
            /* a prompt position's logits, for its prompt logprobs */
            b->logits = e->logits + (size_t) i * e->info.vocab_size;
            continue;
        }
        if (s->n_computed + b->n_tokens != s->n_tokens) {
            continue;
        }
        if (s->guided != NULL) {
            moe_guided_step_mask(e, s, i);
            b->mask = e->gmask + (size_t) i * (size_t) e->gmask_words;
        }
        if (moe_seq_to_fork(s) || moe_seq_scoring(s)) {
            /* logits to the host: the choices draw their first token
             * from them too / the prompt's last logprobs row */
            b->logits = e->logits + (size_t) i * e->info.vocab_size;
            continue;
        }
        if (s->plan == MOE_PLAN_ARGMAX) {
            b->token_out = e->tok_out + i;
            moe_row_lp(e, i, s);
            moe_row_bias(e, i, s);
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
        moe_row_lp(e, i, s);
        moe_row_bias(e, i, s);
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


/* ------------------------------------------------ choices (issue 10) */

/*
 * Choice idx of p, whose prompt was just prefilled (p->n_computed ==
 * n_prompt), made with every prompt position's K/V when it can: p's full
 * prompt blocks shared (reference counts) and a copy of the partial last
 * one through one host swap slot (swap_out then swap_in, queued on the
 * backend in order, before the next forward writes p's copy): *mode 2,
 * running, its first token drawn this step from p's logits (the caller's
 * step row `row`, which must be < max_num_seqs).  Without a free row, a
 * swap slot or a block for the copy: *mode 1, running with the blocks
 * wholly before the last prompt position shared, that tail recomputed by
 * its own next chunk.  Without a running slot: *mode 0, waiting to
 * prefill alone.  NULL (nothing changed) when out of memory.
 */
static moe_seq_t *
moe_seq_fork(moe_engine_t *e, moe_seq_t *p, int idx, int row_free,
    int *mode)
{
    int         bs = e->cfg.block_size, full, shared, rc;
    int32_t     slot;
    size_t      V = (size_t) e->info.vocab_size;
    moe_seq_t  *s;

    s = calloc(1, sizeof(*s));
    if (s == NULL) {
        return NULL;
    }

    s->id = p->id;
    s->order = p->order;
    s->sp = p->sp;
    s->sp.logit_bias_ids = NULL;        /* its own copy, below */
    s->sp.logit_bias = NULL;
    s->sp.n_logit_bias = 0;
    s->sp.guide = moe_guide_ref(p->sp.guide);   /* released with it */
    s->sp.prompt_logprobs = 0;
    s->n_prompt = p->n_prompt;
    s->cap = p->cap;
    s->n_tokens = p->n_prompt;
    s->n_cached = p->n_cached;
    s->admitted = 1;
    s->plan = p->plan;
    s->choice = idx;
    s->forked = 1;
    s->pen_lost = p->pen_lost;

    s->tokens = malloc(sizeof(int32_t) * (size_t) s->cap);
    s->bhash = malloc(sizeof(uint64_t) * (size_t) (s->cap / bs + 1));
    if (s->tokens == NULL || s->bhash == NULL
        || moe_sampling_bias_copy(&s->sp, &p->sp) != MOE_OK)
    {
        moe_seq_free(s);
        return NULL;
    }
    if (s->sp.guide != NULL) {
        /* nothing generated yet: the guide's start state, as p's */
        s->guided = moe_guided_state_create(s->sp.guide, e->info.eos_ids,
                                            e->info.n_eos);
        if (s->guided == NULL) {
            moe_seq_free(s);
            return NULL;
        }
        s->guided_n = p->guided_n;
    }
    memcpy(s->tokens, p->tokens, sizeof(int32_t) * (size_t) p->n_prompt);
    memcpy(s->bhash, p->bhash, sizeof(uint64_t) * (size_t) p->n_published);

    if (p->counts != NULL) {
        s->counts = calloc(V, sizeof(int32_t));     /* nothing generated */
    }
    if (p->seen != NULL) {
        s->seen = malloc(V);
        if (s->seen != NULL) {
            memcpy(s->seen, p->seen, V);
        }
    }
    if (p->n_pen > 0) {
        s->pen_ids = malloc(sizeof(int32_t) * (size_t) p->n_pen);
        if (s->pen_ids != NULL) {
            memcpy(s->pen_ids, p->pen_ids,
                   sizeof(int32_t) * (size_t) p->n_pen);
            s->n_pen = s->cap_pen = p->n_pen;
        }
    }
    if ((p->counts != NULL && s->counts == NULL)
        || (p->seen != NULL && s->seen == NULL)
        || (p->n_pen > 0 && s->pen_ids == NULL))
    {
        moe_seq_free(s);
        return NULL;
    }

    /* its own stream: seed + idx when seeded */
    moe_rng_seed(&s->rng, p->sp.has_seed
                          ? p->sp.seed + (uint64_t) idx
                          : ((s->id * 0x9e3779b97f4a7c15ULL)
                             ^ (uint64_t) moe_now_ns())
                            + (uint64_t) idx);

    if (e->n_running >= e->cfg.max_num_seqs) {
        *mode = 0;
        moe_q_insert(&e->waitq, s);
        return s;
    }

    full = p->n_prompt / bs;
    *mode = row_free
            && (full * bs == p->n_prompt
                || (e->backend->swap_out != NULL
                    && e->backend->swap_in != NULL
                    && e->slots.n_free > 0 && e->blocks.n_free > 0))
            ? 2 : 1;
    shared = *mode == 2 ? full : (p->n_prompt - 1) / bs;

    if (moe_blocks_share(&e->blocks, p->blocks, shared, &s->blocks,
                         &s->n_blocks, &s->cap_blocks) != MOE_OK)
    {
        moe_seq_free(s);
        return NULL;
    }
    s->n_computed = shared * bs;
    s->n_published = p->n_published < shared ? p->n_published : shared;

    if (*mode == 2 && full * bs < p->n_prompt) {
        /* copy on write of the partial last block, before p writes it */
        rc = moe_blocks_reserve(&e->blocks, &s->blocks, &s->n_blocks,
                                &s->cap_blocks, p->n_prompt);
        if (rc == MOE_OK) {
            (void) moe_slots_alloc(&e->slots, 1, &slot);
            rc = e->backend->swap_out(e->backend, p->blocks + full, &slot, 1);
            if (rc == MOE_OK) {
                rc = e->backend->swap_in(e->backend, &slot,
                                         s->blocks + full, 1);
            }
            moe_slots_free(&e->slots, &slot, 1);
        }
        if (rc != MOE_OK) {
            /* prefill it alone */
            moe_blocks_release(&e->blocks, s->blocks, &s->n_blocks);
            s->n_computed = 0;
            s->n_published = 0;
            *mode = 0;
            moe_q_insert(&e->waitq, s);
            return s;
        }
    }
    if (*mode == 2) {
        s->n_computed = p->n_prompt;
    }

    moe_running_insert(e, s);
    return s;
}


/*
 * p (row i of the step) has its prompt prefilled and its logits in row i:
 * fork choices 1..n_choices-1.  Those with every prompt position get a
 * step row of their own after the others (*n grows) with a copy of the
 * logits, so that the step draws their first token as it draws p's.  A
 * choice that cannot be made (no memory) ends at once with an ERROR
 * event of its index.
 */
static void
moe_fork_choices(moe_engine_t *e, moe_seq_t *p, int i, int *n)
{
    int               k, mode, row;
    size_t            V = (size_t) e->info.vocab_size;
    moe_seq_t        *s;
    moe_event_t       ev;
    moe_seq_batch_t  *b;

    p->forked = 1;

    for (k = 1; k < p->sp.n_choices; k++) {
        row = *n;
        s = moe_seq_fork(e, p, k, row < e->cfg.max_num_seqs, &mode);
        if (s == NULL) {
            memset(&ev, 0, sizeof(ev));
            ev.req_id = p->id;
            ev.type = MOE_EV_ERROR;
            ev.status = MOE_ENOMEM;
            ev.index = k;
            moe_emit(e, &ev);
            continue;
        }
        if (mode != 2) {
            continue;
        }
        b = &e->batch[row];
        memset(b, 0, sizeof(*b));
        e->batch_seq[row] = s;
        b->mask = e->batch[i].mask;     /* the same start state's mask */
        b->logits = e->logits + (size_t) row * V;
        memcpy(b->logits, e->batch[i].logits, sizeof(float) * V);
        (*n)++;
    }
}


/*
 * Stall-free batching: the prefill chunk that fits the step's prefill
 * time (*pf_ns, < 0: no limit) for a sequence at pos wanting `chunk`
 * tokens.  The first prefill chunk of a step always gets at least one
 * block's worth (prompts always progress); later ones get what the time
 * left buys, possibly 0.  Sets *limited when it cut the chunk.
 */
static int
moe_pf_chunk(moe_engine_t *e, double *pf_ns, int *pf_any, int pos,
    int chunk, int *limited)
{
    int  p, floor_;

    if (*pf_ns < 0 || chunk <= 1) {
        return chunk;
    }

    p = moe_stepcost_fit_tokens(&e->cost, *pf_ns, pos, chunk);
    if (p < chunk) {
        *limited = 1;
        floor_ = e->cfg.block_size < chunk ? e->cfg.block_size : chunk;
        if (!*pf_any && p < floor_) {
            p = floor_;
        }
    }

    if (p > 0) {
        *pf_any = 1;
        *pf_ns -= moe_stepcost_predict(&e->cost, p,
                                       moe_stepcost_attn(pos, p))
                  - e->cost.c[0];
        if (*pf_ns < 0) {
            *pf_ns = 0;
        }
    }
    return p;
}


int
moe_sched_step(moe_engine_t *e)
{
    int         i, n = 0, budget, want, chunk, rc, limit, reason;
    int         preempted = 0, resumed, fork_room = 0, last;
    int32_t     tok;
    float       lp;
    int64_t     t0;
    moe_seq_t  *s;
    moe_event_t ev;
    double      pf_ns = -1, attn = 0;
    int         pf_any = 0, pf_limited = 0, n_tok = 0;

    budget = e->cfg.max_num_batched_tokens;
    limit = e->cfg.max_chunked_prefill_tokens > 0
            ? e->cfg.max_chunked_prefill_tokens : budget;

    /* 0. stall-free batching: with decodes running, this step's prefill
     * chunks may add at most (ratio - 1) times what the decodes alone
     * cost, by the measured step cost model */
    if (e->cfg.prefill_step_ratio > 0 && e->cfg.enable_chunked_prefill
        && e->cost.ok)
    {
        int     dec = 0;
        double  dattn = 0;

        for (i = 0; i < e->n_running; i++) {
            s = e->running[i];
            if (s->n_tokens - s->n_computed == 1) {
                dec++;
                dattn += moe_stepcost_attn(s->n_computed, 1);
            }
        }
        if (dec > 0) {
            pf_ns = (e->cfg.prefill_step_ratio - 1.0)
                    * moe_stepcost_predict(&e->cost, dec, dattn);
            if (pf_ns < 0) {
                pf_ns = 0;
            }
        }
    }

    /* 1. running sequences: decode tokens and unfinished prefills */
    for (i = 0; i < e->n_running && budget > 0; i++) {
        s = e->running[i];
        want = s->n_tokens - s->n_computed;
        chunk = want < budget ? want : budget;
        if (chunk > limit) {
            chunk = limit;
        }
        chunk = moe_seq_chunk(s, chunk);
        if (chunk < want && !e->cfg.enable_chunked_prefill && n > 0
            && !moe_seq_scoring(s))
        {
            continue;
        }
        if (want > 1) {
            chunk = moe_pf_chunk(e, &pf_ns, &pf_any, s->n_computed, chunk,
                                 &pf_limited);
            if (chunk == 0) {
                continue;
            }
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
           && budget > 0 && e->n_running + fork_room < e->cfg.max_num_seqs)
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
            chunk = moe_seq_chunk(s, chunk);
            if (chunk < want && !e->cfg.enable_chunked_prefill && n > 0
                && !moe_seq_scoring(s))
            {
                break;
            }
            if (want > 1) {
                chunk = moe_pf_chunk(e, &pf_ns, &pf_any, s->n_computed,
                                     chunk, &pf_limited);
                if (chunk == 0) {
                    break;
                }
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

        /* a request of several choices waits for room for all of them
         * (they fork from it after its prefill) */
        if (moe_seq_to_fork(s)
            && e->n_running + fork_room + s->sp.n_choices
               > e->cfg.max_num_seqs)
        {
            break;
        }

        /* prefix cache: reuse whole blocks of an equal prefix; the last
         * prompt token is always computed (its logits are needed, and its
         * block must be private since K/V will be written there) */
        if (s->n_blocks == 0 && s->n_computed == 0
            && !moe_seq_scoring(s))
        {
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
        chunk = moe_seq_chunk(s, chunk);
        if (chunk < want && !e->cfg.enable_chunked_prefill && n > 0
            && !moe_seq_scoring(s))
        {
            chunk = 0;
        }
        if (chunk > 1) {
            chunk = moe_pf_chunk(e, &pf_ns, &pf_any, s->n_computed, chunk,
                                 &pf_limited);
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
        if (moe_seq_to_fork(s)) {
            fork_room += s->sp.n_choices - 1;
        }

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

    for (i = 0; i < n; i++) {
        n_tok += e->batch[i].n_tokens;
        attn += moe_stepcost_attn(e->batch[i].pos, e->batch[i].n_tokens);
    }
    if (pf_limited) {
        atomic_fetch_add_explicit(&e->st_pf_limited, 1,
                                  memory_order_relaxed);
    }

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
            last = moe_seq_last_choice(e, s);
            memset(&ev, 0, sizeof(ev));
            ev.req_id = s->id;
            ev.type = MOE_EV_ERROR;
            ev.status = rc;
            ev.index = s->choice;
            moe_emit(e, &ev);
            moe_blocks_release(&e->blocks, s->blocks, &s->n_blocks);
            moe_running_remove(e, i);
            moe_seq_free(s);
            if (last) {
                atomic_fetch_add_explicit(&e->st_finished, 1,
                                          memory_order_relaxed);
            }
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

        /* prompt logprobs: a prompt position before the last */
        if (s->plp != NULL && !s->plp_sent && e->batch[i].logits != NULL
            && s->n_computed < s->n_prompt)
        {
            moe_seq_score(e, s, e->batch[i].logits);
            continue;
        }

        if (s->guided != NULL && s->guided_n <= 0
            && (e->batch[i].token_out != NULL
                || e->batch[i].logits != NULL))
        {
            moe_guided_fail(e, s, s->guided_n < 0 ? s->guided_n
                                                  : MOE_EINVAL);
            continue;
        }

        if (moe_seq_to_fork(s) && s->n_computed == s->n_prompt
            && e->batch[i].logits != NULL)
        {
            moe_fork_choices(e, s, i, &n);
        }

        if (s->plp != NULL && !s->plp_sent && e->batch[i].logits != NULL) {
            moe_seq_send_prompt(e, s);
        }

        if (e->batch[i].token_out != NULL) {
            tok = e->tok_out[i];
            lp = e->batch[i].lp_out != NULL ? e->lp_val[i] : 0.0f;
            if (e->batch[i].sample != NULL) {
                atomic_fetch_add_explicit(&e->st_backend_sampled, 1,
                                          memory_order_relaxed);
            }
        } else if (e->batch[i].logits != NULL) {
            if (s->guided != NULL) {
                moe_guided_apply(e->batch[i].mask, e->batch[i].logits,
                                 e->info.vocab_size);
            }
            tok = moe_sample(&e->sampler, e->batch[i].logits, &s->sp,
                             s->counts, s->seen, &s->rng, &lp);
            atomic_fetch_add_explicit(&e->st_host_sampled, 1,
                                      memory_order_relaxed);
        } else {
            continue;
        }
        s->n_generated++;
        atomic_fetch_add_explicit(&e->st_gen_tokens, 1, memory_order_relaxed);
        if (s->n_generated == 1 && s->choice == 0) {
            atomic_fetch_add_explicit(&e->st_prompt_tokens, s->n_prompt,
                                      memory_order_relaxed);
        }

        reason = MOE_FINISH_NONE;

        /* the guide follows the token (EOS only where its language may
         * end: then the sequence stops, ignore_eos or not) */
        if (s->guided != NULL) {
            if (moe_guided_advance(s->guided, tok) != MOE_OK) {
                moe_guided_fail(e, s, MOE_EINVAL);
                continue;
            }
            for (int k = 0; k < e->info.n_eos; k++) {
                if (tok == e->info.eos_ids[k]) {
                    reason = MOE_FINISH_STOP;
                }
            }
        }

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
            ev.index = s->choice;
            if (s->sp.top_logprobs > 0 && e->batch[i].logits != NULL) {
                ev.lp = moe_token_lp(e, s, e->batch[i].logits, tok, lp);
            } else if (s->sp.top_logprobs > 0
                       && e->batch[i].lp_out != NULL)
            {
                ev.lp = moe_token_lp_backend(e, i, s, tok);
            }
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

    t0 = moe_now_ns() - t0;
    moe_stepcost_observe(&e->cost, n_tok, attn, (double) t0);
    moe_stepcost_publish(e);
    atomic_fetch_add_explicit(&e->st_steps, 1, memory_order_relaxed);
    atomic_fetch_add_explicit(&e->st_busy_ns, t0, memory_order_relaxed);

    return MOE_OK;
}
