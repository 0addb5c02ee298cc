/*
 * Inside the engine (sched/ only): the submit message, the sequence, the
 * engine's state, and the scheduler's entry points (scheduler.c) that the
 * engine thread (engine.c) calls.  Calls go one way: engine.c ->
 * scheduler.c; the scheduler never calls back into engine.c.
 */

#ifndef MOE_SCHED_ENGINE_INT_H
#define MOE_SCHED_ENGINE_INT_H

#include <pthread.h>
#include <stdatomic.h>
#include <stdint.h>
#include <time.h>

#include "moe.h"
#include "backends/backend.h"
#include "sched/kv.h"
#include "sched/ring.h"
#include "sched/stepcost.h"
#include "sampling/sampling.h"
#include "guided/guided.h"

enum { MOE_MSG_SUBMIT = 1, MOE_MSG_CANCEL = 2 };

typedef struct {
    int32_t         type;
    int32_t         n_prompt;
    uint64_t        req_id;
    int32_t        *prompt;        /* malloc()ed; the engine takes it */
    moe_sampling_t  sp;
    int32_t         index;         /* CANCEL: the choice, -1 all */
} moe_msg_t;

typedef struct moe_seq  moe_seq_t;

/*
 * How a sequence's tokens are chosen, decided once when it is first
 * admitted (moe_seq_plan) and kept: the step only reads it.
 */
typedef enum {
    MOE_PLAN_ARGMAX = 1,    /* greedy, no penalty that applies (logprobs
                               only with a backend that has
                               logprobs_tokens): the backend's argmax
                               (token_out), no logits copy */
    MOE_PLAN_BACKEND,       /* drawn by a backend that samples
                               (sample_tokens): token_out with .sample, u
                               and the penalty list */
    MOE_PLAN_HOST           /* logits to the host, moe_sample() there
                               (logit_bias, logprobs on a backend without
                               logprobs_tokens, a backend that only does
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
    /* prompt logprobs (sp.prompt_logprobs): rows filled as the prompt is
     * prefilled one position per step; sent (MOE_EV_PROMPT) before the
     * first token, then owned by the event */
    moe_logprobs_t *plp;
    int             plp_sent;
    /* choices (sp.n_choices > 1): choice 0 is the one submitted; it forks
     * the others when its prompt is prefilled (forked = 1) */
    int             choice;
    int             forked;
    moe_seq_t      *prev, *next;   /* waiting or swapped queue links */

    /* guided decoding: the matcher of sp.guide (NULL: none); the step's
     * allowed-token mask is e->gmask's row of this sequence's batch row */
    moe_guided_state_t *guided;
    int             guided_n;      /* allowed tokens this step (0: dead
                                      end: the sequence fails) */
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
    float             *lp_val;     /* (max_num_seqs) logprobs a backend
                                      with logprobs_tokens computed */
    moe_logprob_entry_t *lp_top;   /* (max_num_seqs, MOE_MAX_TOP_LOGPROBS)
                                      their top entries */
    int32_t           *pen_tok;    /* (cap_pen) the step's penalty lists,
                                      row after row */
    int32_t           *pen_cnt;
    uint8_t           *pen_seen;
    size_t             cap_pen;
    moe_sampler_t      sampler;
    int                n_sample;   /* ids the sampler may produce */
    int                wake_pending; /* events pushed, worker not woken */
    moe_stepcost_t     cost;       /* measured step costs: stall-free
                                      prefill sizing (stepcost.h) */

    /* guided decoding: (max_num_seqs, gmask_words) allowed-token bits of
     * the step's guided rows (moe_seq_batch_t.mask points here) */
    uint32_t          *gmask;
    int                gmask_words;

    /* counters, written by the engine thread, read by anyone */
    _Atomic int64_t    st_submitted, st_finished, st_cancelled,
                       st_prompt_tokens, st_gen_tokens, st_steps,
                       st_busy_ns, st_preemptions, st_running, st_waiting,
                       st_blocks_used, st_blocks_cached, st_cached_tokens,
                       st_swap_outs, st_swap_ins, st_swap_blocks_out,
                       st_swapped, st_swap_used, st_backend_sampled,
                       st_pf_limited, st_blocks_usable;
    int64_t            kv_grow_next_ms;    /* next kv_grow poll */
    _Atomic int64_t    st_host_sampled;    /* moe_stats_t.host_sampled_tokens */
    _Atomic int64_t    st_cost_milli[3];   /* cost.c x 1000 when cost.ok */
    _Atomic int64_t   *expert_counts;  /* (n_layers * n_experts) */
    size_t             n_expert_counts;

    /* expert parallelism: ranks holding whole experts (0: none) */
    int                ep_ranks;
};


/* Copy the step cost model's coefficients where stats readers see them
 * (engine thread, or a caller holding the parked engine). */
static inline void
moe_stepcost_publish(moe_engine_t *e)
{
    for (int k = 0; k < 3; k++) {
        atomic_store_explicit(&e->st_cost_milli[k],
                              e->cost.ok ? (int64_t) (e->cost.c[k] * 1000.0)
                                         : 0,
                              memory_order_relaxed);
    }
}


static inline int64_t
moe_now_ns(void)
{
    struct timespec  ts;

    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t) ts.tv_sec * 1000000000 + ts.tv_nsec;
}


/* ------------------------------------------- the scheduler (scheduler.c) */

/*
 * Take a submitted request (m->prompt is taken over, also on failure):
 * a sequence at the back of the waiting queue, or, out of memory, an
 * ERROR event (MOE_ENOMEM) and the request counted finished.
 */
void moe_sched_submit(moe_engine_t *e, moe_msg_t *m);

/*
 * Cancel request id wherever it is (running, waiting, swapped): its KV
 * blocks and swap slots freed now, FINISH(CANCELLED) sent (per choice).
 * index >= 0: only that choice.  An id that already finished is ignored.
 */
void moe_sched_cancel(moe_engine_t *e, uint64_t id, int index);

/*
 * One scheduler step: chunks for the running sequences, resumes and
 * admissions oldest first, preemption (swap or recompute) when blocks run
 * out, one backend forward, then sampling, events and retirement.  A
 * failed forward fails that step's sequences (ERROR events) and returns
 * MOE_OK; other statuses (out of memory in the block manager) are
 * returned with nothing lost.
 */
int moe_sched_step(moe_engine_t *e);

/* 1 when nothing is running, waiting or swapped. */
int moe_sched_idle(const moe_engine_t *e);

/* Push events that found the event ring full, in order, as far as there
 * is room now (each sets wake_pending). */
void moe_sched_flush_events(moe_engine_t *e);

/* Free every sequence (engine destroy, the thread stopped). */
void moe_sched_free_all(moe_engine_t *e);

#endif /* MOE_SCHED_ENGINE_INT_H */
