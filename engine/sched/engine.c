/*
 * The engine: one thread that owns the model, the KV block manager and the
 * scheduler (scheduler.c).  The nginx worker talks to it through two
 * lock-free SPSC rings (submit: worker -> engine; events: engine ->
 * worker) and two eventfds (wake: worker -> engine when it queued work;
 * events: engine -> worker, registered as an nginx read event).  This
 * file: the thread's loop, the rings' worker side, create / destroy (the
 * backend comes from the factory, backends/backend.h), stats.
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

#include "sched/engine_int.h"


static void
moe_wake_worker(moe_engine_t *e)
{
    uint64_t  one = 1;
    ssize_t   n;

    e->wake_pending = 0;
    n = write(e->ev_fd, &one, sizeof(one));
    (void) n;   /* EAGAIN: the counter is already non-zero, fine */
}


/* The submit ring: requests to the scheduler, cancels done at once. */
static void
moe_drain_submit(moe_engine_t *e)
{
    moe_msg_t  m;

    while (moe_ring_pop(e->submit, &m) == 1) {
        if (m.type == MOE_MSG_CANCEL) {
            moe_sched_cancel(e, m.req_id, m.index);
            continue;
        }

        atomic_fetch_add_explicit(&e->st_submitted, 1, memory_order_relaxed);
        moe_sched_submit(e, &m);
    }
}


static void
moe_publish_stats(moe_engine_t *e)
{
    size_t          i;
    const int64_t  *c;

    atomic_store_explicit(&e->st_running, e->n_running, memory_order_relaxed);
    atomic_store_explicit(&e->st_waiting, e->waitq.n, memory_order_relaxed);
    atomic_store_explicit(&e->st_blocks_used,
                          e->blocks.n_usable - e->blocks.n_free,
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


/* A pool that grows (moe_backend_t.kv_grow): ask the backend every
 * MOE_KV_GROW_MS while blocks are missing; new ones are free at once. */
static void
moe_kv_poll_grow(moe_engine_t *e)
{
    struct timespec  ts;
    int64_t          now;
    int              n, added;

    if (e->backend->kv_grow == NULL || e->blocks.n_usable >= e->blocks.n_total)
    {
        return;
    }
    clock_gettime(CLOCK_MONOTONIC, &ts);
    now = (int64_t) ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
    if (now < e->kv_grow_next_ms) {
        return;
    }
    e->kv_grow_next_ms = now + MOE_KV_GROW_MS;
    n = e->backend->kv_grow(e->backend);
    added = moe_blocks_grow(&e->blocks, n);
    if (added > 0) {
        atomic_store_explicit(&e->st_blocks_usable, e->blocks.n_usable,
                              memory_order_relaxed);
        moe_log(e->blocks.n_usable == e->blocks.n_total ? MOE_LOG_INFO
                                                        : MOE_LOG_DEBUG,
                "KV pool grew by %d blocks to %d of %d", added,
                e->blocks.n_usable, e->blocks.n_total);
    }
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

        moe_kv_poll_grow(e);
        moe_drain_submit(e);
        moe_sched_flush_events(e);

        if (moe_sched_idle(e)) {
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

        rc = moe_sched_step(e);
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
    char        path[MOE_PATH_MAX + 64], ebuf[MOE_PATH_MAX + 384];
    char       *text, *res = NULL;
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

    /* moe_json_parse_object refuses nesting yajl cannot free */
    (void) moe_json_parse_object(text, path, "", &root, ebuf, sizeof(ebuf));
    free(text);
    if (root == NULL) {
        moe_log(MOE_LOG_WARN, "%s; ignoring it", ebuf);
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


/*
 * The seed's model: section describes a model; the model's config.json
 * wins.  A key that disagrees is a warning, never a silent change of the
 * model's shape.  top_k_experts is the one override (routing may be
 * changed): the top-k to load with, 0 to keep the model's.  `native` holds
 * the model's own hyperparameters (config.json, before any override).
 */
static int
moe_compare_model_section(const moe_config_t *c, const moe_hparams_t *native)
{
    const char  *f = c->file;
    int          dense = native->n_experts <= 1;

#define MOE_CMP(field, val, name)                                            \
    if (c->field > 0 && c->field != (val)) {                                 \
        moe_log(MOE_LOG_WARN, "%s: model.%s is %d but the model's "          \
                "config.json says %d; using the model's value", f, name,     \
                c->field, (int) (val));                                      \
    }

    if (dense) {
        if (c->num_experts > 0) {
            moe_log(MOE_LOG_WARN, "%s: model.num_experts (%d) is ignored: "
                    "%s is a dense model (no experts)", f, c->num_experts,
                    native->arch_name);
        }
    } else {
        MOE_CMP(num_experts, native->n_experts, "num_experts")
    }
    MOE_CMP(hidden_size, native->dim, "hidden_size")
    MOE_CMP(intermediate_size, native->ffn_dim, "intermediate_size")
    MOE_CMP(max_sequence_length, native->max_pos, "max_sequence_length")

#undef MOE_CMP

    if (c->top_k_experts <= 0) {
        return 0;
    }

    if (dense) {
        moe_log(MOE_LOG_WARN, "%s: model.top_k_experts (%d) is ignored: "
                "%s is a dense model (no experts)", f, c->top_k_experts,
                native->arch_name);
        return 0;
    }

    if (c->top_k_experts == native->top_k) {
        return 0;
    }

    if (c->top_k_experts > native->n_experts) {
        moe_log(MOE_LOG_WARN, "%s: model.top_k_experts %d is more than the "
                "model's %d experts; ignored (the model routes to %d)", f,
                c->top_k_experts, native->n_experts, native->top_k);
        return 0;
    }

    moe_log(MOE_LOG_WARN, "%s: model.top_k_experts %d overrides the model's "
            "routing: each token now goes to %d of %d experts, the model "
            "was trained with %d (remove the key to keep the model's)", f,
            c->top_k_experts, c->top_k_experts, native->n_experts,
            native->top_k);

    return c->top_k_experts;
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
    o->quantization = cfg->quantization;
    o->tensor_parallel_size = cfg->tensor_parallel_size;
    if (cfg->n_instances > 0 && cfg->instances[0].n_gpu_devices > 0) {
        o->gpu_devices = cfg->instances[0].gpu_devices;
        o->n_gpu_devices = cfg->instances[0].n_gpu_devices;
    }
    o->cpu_tensor_parallel = cfg->cpu_tensor_parallel;
    o->expert_parallel = cfg->expert_parallel;
    o->nccl = cfg->nccl[0] != '\0' ? cfg->nccl : NULL;
    o->cpu_threads = cfg->cpu_threads;
    o->kv_cache_blocks = cfg->kv_cache_blocks;
    o->gpu_memory_utilization = cfg->gpu_memory_utilization;
    o->swap_space = cfg->swap_space;
    o->block_size = cfg->block_size;
    o->max_model_len = max_model_len;
    o->max_num_seqs = cfg->max_num_seqs;
    o->max_num_batched_tokens = cfg->max_num_batched_tokens;
    /* fp8 KV cache (vllm.kv_cache_dtype) */
    o->kv_fp8 = strncmp(cfg->kv_cache_dtype, "fp8", 3) == 0;
    o->kv_k_scale = (float) cfg->kv_cache_scale_k;
    o->kv_v_scale = (float) cfg->kv_cache_scale_v;
}


int
moe_engine_create(const moe_config_t *cfg, moe_engine_t **out, char *err,
    size_t errlen)
{
    int                   rc, n_blocks, i, top_k;
    char                  path[MOE_PATH_MAX + 32];
    const moe_hparams_t  *hp;
    moe_model_t          *native;
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

    /* the model's own shape first: the model: section is checked
     * against it (config.json only) */
    rc = moe_model_load_config(cfg->model_path, 0, &native, err, errlen);
    if (rc != MOE_OK) {
        goto fail;
    }
    top_k = moe_compare_model_section(cfg, moe_model_hparams(native));
    moe_model_free(native);

    /* which backend, and the model loaded the way it reads it */
    moe_backend_opts(cfg, 0, &bo);
    rc = moe_backend_load_model(&bo, cfg->model_path, top_k, &kind,
                                &e->model, err, errlen);
    if (rc != MOE_OK) {
        goto fail;
    }
    hp = moe_model_hparams(e->model);

    snprintf(path, sizeof(path), "%s/tokenizer.json", cfg->model_path);
    rc = moe_tokenizer_load(path, &e->tok, err, errlen);
    if (rc != MOE_OK) {
        goto fail;
    }

    /* vllm.chat_template (inline or a file) replaces the model's */
    if (cfg->chat_template_file[0] != '\0') {
        e->chat_template = moe_read_file(cfg->chat_template_file, NULL);
        if (e->chat_template == NULL) {
            moe_errf(err, errlen, "%s: chat_template '%s': %s", cfg->file,
                     cfg->chat_template_file, strerror(errno));
            rc = MOE_EIO;
            goto fail;
        }
    } else if (cfg->chat_template[0] != '\0') {
        e->chat_template = strdup(cfg->chat_template);
        if (e->chat_template == NULL) {
            moe_errf(err, errlen, "%s", "out of memory");
            rc = MOE_ENOMEM;
            goto fail;
        }
    } else {
        e->chat_template = moe_read_chat_template(cfg->model_path);
    }
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
    e->ep_ranks = moe_tp_backend_ep_ranks(e->backend);
    n_blocks = e->backend->n_kv_blocks;
    e->info.kv_blocks_total = n_blocks;
    snprintf(e->info.kv_cache_dtype, sizeof(e->info.kv_cache_dtype), "%s",
             e->backend->kv_dtype != NULL ? e->backend->kv_dtype : "auto");

    rc = moe_blocks_init(&e->blocks, n_blocks, cfg->block_size,
                         cfg->enable_prefix_caching);
    if (rc != MOE_OK) {
        moe_errf(err, errlen, "%s", "out of memory (block manager)");
        goto fail;
    }
    if (e->backend->kv_grow != NULL && e->backend->n_kv_usable > 0
        && e->backend->n_kv_usable < n_blocks)
    {
        (void) moe_blocks_limit(&e->blocks, e->backend->n_kv_usable);
        moe_log(MOE_LOG_INFO, "KV pool starts with %d of %d blocks; the "
                "rest as memory frees", e->blocks.n_usable, n_blocks);
    }
    atomic_store(&e->st_blocks_usable, e->blocks.n_usable);
    {
        struct timespec ts;

        /* the first poll after one period: what is free now, the backend
         * took at create */
        clock_gettime(CLOCK_MONOTONIC, &ts);
        e->kv_grow_next_ms = (int64_t) ts.tv_sec * 1000
                             + ts.tv_nsec / 1000000 + MOE_KV_GROW_MS;
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
    e->gmask_words = (hp->vocab_size + 31) / 32;
    e->gmask = calloc((size_t) cfg->max_num_seqs * (size_t) e->gmask_words,
                      sizeof(uint32_t));
    e->lp_val = calloc((size_t) cfg->max_num_seqs, sizeof(float));
    e->lp_top = calloc((size_t) cfg->max_num_seqs * MOE_MAX_TOP_LOGPROBS,
                       sizeof(moe_logprob_entry_t));
    e->n_expert_counts = (size_t) hp->n_layers * (size_t) hp->n_experts;
    e->expert_counts = calloc(e->n_expert_counts, sizeof(_Atomic int64_t));
    e->submit = moe_ring_create((size_t) cfg->ring_size, sizeof(moe_msg_t));
    e->events = moe_ring_create((size_t) cfg->ring_size * 4,
                                sizeof(moe_event_t));

    if (e->running == NULL || e->batch == NULL || e->batch_seq == NULL
        || e->logits == NULL || e->tok_out == NULL || e->gmask == NULL
        || e->lp_val == NULL || e->lp_top == NULL
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
                "%d blocks x %d tokens (%s)", e->info.served_name,
                e->info.architecture, e->info.n_layers, e->info.n_experts,
                e->info.top_k, e->info.vocab_size, e->info.backend,
                e->info.max_model_len, n_blocks, cfg->block_size,
                e->info.kv_cache_dtype);
    }

    *out = e;
    return MOE_OK;

fail:
    moe_engine_destroy(e);
    return rc;
}


int
moe_engine_handover_wait(moe_engine_t *e, int timeout_ms, int64_t *pid,
    double *ms)
{
    if (e == NULL || e->backend == NULL
        || e->backend->handover_wait == NULL)
    {
        return -1;
    }
    return e->backend->handover_wait(e->backend, timeout_ms, pid, ms);
}


void
moe_engine_destroy(moe_engine_t *e)
{
    moe_msg_t   m;
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
            moe_sampling_bias_free(&m.sp);
            moe_guide_release(m.sp.guide);
        }
    }

    moe_sched_free_all(e);

    /* logprobs records of events nobody drained */
    if (e->events != NULL) {
        moe_event_t  ev;

        while (moe_ring_pop(e->events, &ev) == 1) {
            moe_event_release(&ev);
        }
    }
    while (e->overflow_pos < e->n_overflow) {
        moe_event_release(&e->overflow[e->overflow_pos++]);
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
    free(e->gmask);
    free(e->lp_val);
    free(e->lp_top);
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
        || sp->n_stop_token_ids > MOE_MAX_STOP_IDS
        || sp->n_logit_bias < 0 || sp->n_logit_bias > MOE_MAX_LOGIT_BIAS
        || sp->top_logprobs < 0 || sp->top_logprobs > MOE_MAX_TOP_LOGPROBS
        || (sp->top_logprobs > 0 && !sp->logprobs)
        || (sp->prompt_logprobs != 0 && sp->prompt_logprobs != 1)
        || sp->n_choices < 0 || sp->n_choices > MOE_MAX_CHOICES
        || sp->n_choices > e->cfg.max_num_seqs)
    {
        return MOE_EINVAL;
    }

    for (i = 0; i < sp->n_logit_bias; i++) {
        if (sp->logit_bias_ids[i] < 0
            || sp->logit_bias_ids[i] >= e->info.vocab_size
            || !(sp->logit_bias[i] >= -100.0f && sp->logit_bias[i] <= 100.0f))
        {
            return MOE_EINVAL;
        }
    }

    /* a guide compiled against another tokenizer cannot mask this one
     * (forked choices, n_choices > 1, each carry their own guide state) */
    if (sp->guide != NULL
        && moe_guided_vocab(sp->guide) != moe_tokenizer_vocab_size(e->tok))
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

    /* the engine's own copy of the bias (freed with the sequence) */
    m.sp.logit_bias_ids = NULL;
    m.sp.logit_bias = NULL;
    if (sp->n_logit_bias > 0
        && moe_sampling_bias_copy(&m.sp, sp) != MOE_OK)
    {
        free(m.prompt);
        return MOE_ENOMEM;
    }

    /* the engine's own reference to the guide (released with the
     * sequence) */
    moe_guide_ref(m.sp.guide);

    if (moe_ring_push(e->submit, &m) != MOE_OK) {
        free(m.prompt);
        moe_sampling_bias_free(&m.sp);
        moe_guide_release(m.sp.guide);
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
    m.index = -1;

    if (moe_ring_push(e->submit, &m) != MOE_OK) {
        return MOE_EFULL;
    }

    moe_wake_engine(e);
    return MOE_OK;
}


int
moe_engine_cancel_choice(moe_engine_t *e, uint64_t req_id, int index)
{
    moe_msg_t  m;

    memset(&m, 0, sizeof(m));
    m.type = MOE_MSG_CANCEL;
    m.req_id = req_id;
    m.index = index < 0 ? -1 : index;

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


void
moe_event_release(moe_event_t *ev)
{
    free(ev->lp);
    ev->lp = NULL;
}


int
moe_engine_pin_step_cost(moe_engine_t *e, double c0, double c1, double c2)
{
    int  rc = MOE_ESTATE;

    pthread_mutex_lock(&e->hold_mu);
    if (e->parked) {
        moe_stepcost_pin(&e->cost, c0, c1, c2);
        moe_stepcost_publish(e);
        rc = MOE_OK;
    }
    pthread_mutex_unlock(&e->hold_mu);
    return rc;
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
    o->kv_blocks_total = atomic_load(&m->st_blocks_usable);
    o->kv_blocks_pending = e->info.kv_blocks_total - o->kv_blocks_total;
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
    o->host_sampled_tokens = atomic_load(&m->st_host_sampled);
    o->prefill_limited_steps = atomic_load(&m->st_pf_limited);
    for (int k = 0; k < 3; k++) {
        o->step_cost_ns[k] = (double) atomic_load(&m->st_cost_milli[k])
                             / 1000.0;
    }
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


/* ------------------------------------------------ expert parallelism */

int
moe_engine_rank_load(const moe_engine_t *e, int64_t *tokens, int n)
{
    size_t  i, E, per;
    int     r;

    if (e->ep_ranks <= 0) {
        return 0;
    }
    if (n < e->ep_ranks) {
        return MOE_EINVAL;
    }
    /* rank r owns experts [r * E / ranks, (r + 1) * E / ranks) */
    E = (size_t) moe_model_hparams(e->model)->n_experts;
    per = E / (size_t) e->ep_ranks;
    for (r = 0; r < e->ep_ranks; r++) {
        tokens[r] = 0;
    }
    for (i = 0; per > 0 && i < e->n_expert_counts; i++) {
        r = (int) ((i % E) / per);
        tokens[r] += atomic_load_explicit(&e->expert_counts[i],
                                          memory_order_relaxed);
    }
    return e->ep_ranks;
}
