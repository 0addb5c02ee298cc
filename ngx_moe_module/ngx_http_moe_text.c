
/*
 * Copyright (C) LocalMoE contributors
 */


#include <ngx_config.h>
#include <ngx_core.h>
#include <ngx_http.h>

#include "ngx_http_moe_module.h"

#include <pthread.h>


/*
 * Text work runs on an nginx thread pool, never on the event loop: a long
 * prompt takes its tokenizer time away from one pool thread, not from every
 * stream the worker serves.  The shape is ngx_http_copy_thread_handler's:
 * the task is posted with r->main->blocked raised, so the request (and its
 * pool, which the task reads) outlives a client that goes away meanwhile;
 * the completion event comes back on the loop, lowers blocked and runs the
 * request's write event handler: ours resumes the request, or nginx's
 * finalizer when the request was terminated in between.
 *
 * moe_tokenizer_encode(), moe_tokenizer_decode() and moe_chat_render() may
 * run on several threads at once: the tokenizer is read-only after loading
 * (its byte table is built under pthread_once, PCRE2 match data is made per
 * call), and the parsed chat templates are cached under a mutex and only
 * read while rendering.
 */


#define NGX_HTTP_MOE_TEXT_TIMEOUT  60000


static void ngx_http_moe_text_thread(void *data, ngx_log_t *log);
static void ngx_http_moe_text_read(ngx_http_moe_text_t *t);
static void ngx_http_moe_text_encode(ngx_http_moe_text_t *t);
static void ngx_http_moe_text_event(ngx_event_t *ev);
static void ngx_http_moe_text_resume(ngx_http_request_t *r);
static void ngx_http_moe_text_cleanup(void *data);
static int ngx_http_moe_guide_get(const moe_tokenizer_t *tok,
    moe_guided_kind_t kind, const char *spec, size_t len, moe_guide_t **out,
    char *msg, size_t msglen);


/*
 * A task for op (NGX_HTTP_MOE_TEXT_*) in r->pool, with a pool cleanup that
 * frees whatever the thread left in it.  The caller sets the inputs, then
 * posts it.  NULL: out of memory.
 */

ngx_http_moe_text_t *
ngx_http_moe_text_create(ngx_http_request_t *r, ngx_uint_t op)
{
    ngx_thread_task_t         *task;
    ngx_pool_cleanup_t        *cln;
    ngx_http_moe_ctx_t        *ctx;
    ngx_http_moe_text_t       *t;

    ctx = ngx_http_moe_get_ctx(r);

    cln = ngx_pool_cleanup_add(r->pool, 0);
    if (cln == NULL) {
        return NULL;
    }

    task = ngx_thread_task_alloc(r->pool, sizeof(ngx_http_moe_text_t));
    if (task == NULL) {
        return NULL;
    }

    t = task->ctx;

    t->op = op;
    /* the engine the request was routed to (none yet: reading the body) */
    if (ctx != NULL && ctx->eng != NULL) {
        t->tokenizer = ctx->eng->tokenizer;
        t->chat_template = ctx->eng->info->chat_template;
    }
    t->task = task;
    t->request = r;

    cln->handler = ngx_http_moe_text_cleanup;
    cln->data = t;

    return t;
}


/*
 * Hands t to the location's thread pool; done(r, t) runs on the event loop
 * once the thread is through, unless the request was terminated meanwhile.
 * done owns the request from then on (it finalizes it).  The caller must
 * not touch t's inputs until then, and returns NGX_DONE up the stack.
 * NGX_DECLINED: the pool's queue is full, *err holds the 503.
 */

ngx_int_t
ngx_http_moe_text_post(ngx_http_request_t *r, ngx_http_moe_text_t *t,
    ngx_http_moe_text_done_pt done, void *data, ngx_http_moe_err_t *err)
{
    ngx_thread_task_t         *task;
    ngx_http_moe_ctx_t        *ctx;
    ngx_http_moe_loc_conf_t   *mlcf;
    ngx_http_moe_main_conf_t  *mcf;

    mlcf = ngx_http_moe_loc_conf(r);
    ctx = ngx_http_moe_get_ctx(r);

    /*
     * messages need the model's template; wrapping them in ChatML for a
     * model that never saw ChatML gives junk, so say how to fix it (as
     * vLLM answers 400)
     */

    if (t->op == NGX_HTTP_MOE_TEXT_ENCODE && t->msgs != NULL
        && t->chat_template == NULL && ctx != NULL && ctx->eng != NULL)
    {
        mcf = ngx_http_moe_main_conf(r);

        return ngx_http_moe_fail(err, NGX_HTTP_BAD_REQUEST, "messages",
                                 "the model \"%s\" has no chat template "
                                 "(its tokenizer_config.json has no "
                                 "chat_template), so chat messages cannot "
                                 "be rendered: add \"chat_template:\" (a "
                                 "Jinja template or a file) to the vllm "
                                 "section of %V, or use /v1/completions",
                                 ctx->eng->info->served_name,
                                 &mcf->engine_file);
    }

    if (ctx == NULL || ctx->task != NULL || mlcf->thread_pool == NULL) {
        ngx_log_error(NGX_LOG_ALERT, r->connection->log, 0,
                      "moe: text task posted out of turn");
        return NGX_ERROR;
    }

    task = t->task;

    t->done = done;
    t->data = data;

    task->handler = ngx_http_moe_text_thread;
    task->event.handler = ngx_http_moe_text_event;
    task->event.data = t;
    task->event.log = r->connection->log;

    if (ngx_thread_task_post(mlcf->thread_pool, task) != NGX_OK) {
        return ngx_http_moe_fail(err, NGX_HTTP_SERVICE_UNAVAILABLE, NULL,
                                 "the server is overloaded: the thread "
                                 "pool queue is full, retry later");
    }

    /*
     * the timer only reports a task that hangs; it also keeps a graceful
     * shutdown waiting for the request, as for a running generation
     */

    ngx_add_timer(&task->event, NGX_HTTP_MOE_TEXT_TIMEOUT);

    t->running = 1;
    ctx->task = t;

    r->main->blocked++;
    r->aio = 1;

    r->write_event_handler = ngx_http_moe_text_resume;

    /* a client that goes away is noticed now, and the request terminated
     * as soon as the task is done */
    r->read_event_handler = ngx_http_test_reading;

    return NGX_OK;
}


/* runs on a pool thread: no nginx structure, no request pool */

static void
ngx_http_moe_text_thread(void *data, ngx_log_t *log)
{
    ngx_http_moe_text_t  *t = data;

    switch (t->op) {

    case NGX_HTTP_MOE_TEXT_READ:
        ngx_http_moe_text_read(t);
        break;

    case NGX_HTTP_MOE_TEXT_ENCODE:
        ngx_http_moe_text_encode(t);
        break;

    case NGX_HTTP_MOE_TEXT_DECODE:
        t->rc = moe_tokenizer_decode(t->tokenizer, t->ids, t->n_ids, 0,
                                     &t->out_text, &t->out_len);
        break;

    default:
        t->rc = MOE_EINVAL;
    }
}


static void
ngx_http_moe_text_read(ngx_http_moe_text_t *t)
{
    off_t                      offset;
    size_t                     left;
    ssize_t                    n;
    u_char                    *p;
    ngx_uint_t                 i;
    ngx_http_moe_text_file_t  *f;

    t->rc = MOE_OK;

    for (i = 0; i < t->n_files; i++) {
        f = &t->files[i];

        p = f->dst;
        left = f->size;
        offset = f->offset;

        while (left) {
            n = pread(f->fd, p, left, offset);

            if (n == -1 && ngx_errno == NGX_EINTR) {
                continue;
            }

            if (n <= 0) {
                t->err = (n == -1) ? ngx_errno : 0;
                t->rc = MOE_EIO;
                return;
            }

            p += n;
            left -= n;
            offset += n;
        }
    }
}


static void
ngx_http_moe_text_encode(ngx_http_moe_text_t *t)
{
    const char  *text;
    size_t       len;

    text = (const char *) t->text;
    len = t->len;

    if (t->guide_kind != MOE_GUIDED_NONE) {
        t->guide_rc = ngx_http_moe_guide_get(t->tokenizer, t->guide_kind,
                                             t->guide_spec, t->guide_len,
                                             &t->guide, t->guide_msg,
                                             sizeof(t->guide_msg));
        if (t->guide_rc != MOE_OK) {
            t->rc = MOE_OK;
            return;
        }
    }

    if (t->skip_encode) {
        t->rc = MOE_OK;
        return;
    }

    if (t->chat_json || t->msgs) {
        if (t->chat_json) {
            /* tools or tool calls: the template gets them as JSON */
            t->rc = moe_chat_render_json(t->tokenizer, t->chat_template,
                                         t->chat_json, t->tools_json,
                                         (int) t->add_generation_prompt,
                                         &t->out_text, &t->out_len, t->msg,
                                         sizeof(t->msg));

        } else {
            t->rc = moe_chat_render(t->tokenizer, t->chat_template, t->msgs,
                                    (int) t->n_msgs,
                                    (int) t->add_generation_prompt,
                                    &t->out_text, &t->out_len, t->msg,
                                    sizeof(t->msg));
        }

        if (t->rc != MOE_OK) {
            t->render_failed = 1;
            return;
        }

        text = t->out_text;
        len = t->out_len;
    }

    t->rc = moe_tokenizer_encode(t->tokenizer, text, len,
                                 (int) t->add_special_tokens, &t->out_ids,
                                 &t->n_out);
}


/* on the event loop: the thread is done (or the watchdog fired) */

static void
ngx_http_moe_text_event(ngx_event_t *ev)
{
    ngx_connection_t     *c;
    ngx_http_request_t   *r;
    ngx_http_moe_text_t  *t;

    t = ev->data;
    r = t->request;
    c = r->connection;

    ngx_http_set_log_request(c->log, r);

    if (ev->timedout) {
        ngx_log_error(NGX_LOG_ALERT, c->log, 0,
                      "moe: text thread task took too long");
        ev->timedout = 0;
        return;
    }

    if (ev->timer_set) {
        ngx_del_timer(ev);
    }

    t->running = 0;

    r->main->blocked--;
    r->aio = 0;

    if (r->done) {
        c->write->handler(c->write);

    } else {
        r->write_event_handler(r);
        ngx_http_run_posted_requests(c);
    }
}


/*
 * The request's write event handler while a task runs: nothing to do
 * until the task is done, then its continuation.
 */

static void
ngx_http_moe_text_resume(ngx_http_request_t *r)
{
    ngx_http_moe_ctx_t   *ctx;
    ngx_http_moe_text_t  *t;

    ctx = ngx_http_moe_get_ctx(r);

    if (ctx == NULL || ctx->task == NULL || ctx->task->running) {
        return;
    }

    t = ctx->task;
    ctx->task = NULL;

    r->write_event_handler = ngx_http_request_empty_handler;

    t->done(r, t);
}


/*
 * The ids of an ENCODE task, copied into r->pool.  A template that cannot
 * be rendered is the client's 400 (NGX_DECLINED, *err set); a tokenizer
 * failure or no memory is NGX_ERROR.
 */

ngx_int_t
ngx_http_moe_text_ids(ngx_http_request_t *r, ngx_http_moe_text_t *t,
    int32_t **ids, size_t *n, ngx_http_moe_err_t *err)
{
    int32_t  *p;

    if (t->render_failed) {
        if (t->rc == MOE_ENOMEM) {
            return NGX_ERROR;
        }

        return ngx_http_moe_fail(err, NGX_HTTP_BAD_REQUEST, "messages",
                                 "cannot apply the chat template: %s",
                                 t->msg[0] ? t->msg : moe_strerror(t->rc));
    }

    if (t->rc != MOE_OK) {
        ngx_log_error(NGX_LOG_ERR, r->connection->log, 0,
                      "moe: tokenizer failed: %s", moe_strerror(t->rc));
        return NGX_ERROR;
    }

    p = ngx_palloc(r->pool, (t->n_out + 1) * sizeof(int32_t));
    if (p == NULL) {
        return NGX_ERROR;
    }

    if (t->n_out) {
        ngx_memcpy(p, t->out_ids, t->n_out * sizeof(int32_t));
    }

    *ids = p;
    *n = t->n_out;

    ngx_http_moe_text_free(t);

    return NGX_OK;
}


/* frees the thread's outputs early; the pool cleanup frees them otherwise */

void
ngx_http_moe_text_free(ngx_http_moe_text_t *t)
{
    free(t->out_text);
    free(t->out_ids);

    t->out_text = NULL;
    t->out_ids = NULL;
}


/* the request pool goes away only once no task runs (r->main->blocked) */

static void
ngx_http_moe_text_cleanup(void *data)
{
    ngx_http_moe_text_t  *t = data;

    ngx_http_moe_text_free(t);

    moe_guide_release(t->guide);
    t->guide = NULL;
}


/*
 * Compiled guides, per worker, keyed by (tokenizer, kind, text): a bounded
 * LRU shared by the pool threads under a mutex.  Compiling runs outside
 * the lock (two threads may compile the same guide at once; the second
 * result replaces nothing and is used once).  An entry holds one
 * reference; a guide of another tokenizer (a model switch) is never
 * served (moe_guide_matches) and ages out.
 */

#define NGX_HTTP_MOE_GUIDE_CACHE  32

typedef struct {
    moe_guide_t               *guide;
    const moe_tokenizer_t     *tok;
    moe_guided_kind_t          kind;
    uint32_t                   hash;
    char                      *spec;
    size_t                     len;
    ngx_uint_t                 used;
} ngx_http_moe_guide_entry_t;


static ngx_http_moe_guide_entry_t  ngx_http_moe_guides[
                                       NGX_HTTP_MOE_GUIDE_CACHE];
static ngx_uint_t                  ngx_http_moe_guides_tick;
static pthread_mutex_t             ngx_http_moe_guides_lock =
                                       PTHREAD_MUTEX_INITIALIZER;


static ngx_http_moe_guide_entry_t *
ngx_http_moe_guide_find(const moe_tokenizer_t *tok, moe_guided_kind_t kind,
    uint32_t hash, const char *spec, size_t len)
{
    ngx_uint_t                   i;
    ngx_http_moe_guide_entry_t  *e;

    for (i = 0; i < NGX_HTTP_MOE_GUIDE_CACHE; i++) {
        e = &ngx_http_moe_guides[i];

        if (e->guide != NULL && e->tok == tok && e->kind == kind
            && e->hash == hash && e->len == len
            && ngx_memcmp(e->spec, spec, len) == 0
            && moe_guide_matches(e->guide, tok))
        {
            return e;
        }
    }

    return NULL;
}


/* on a pool thread: a reference to the guide, from the cache or compiled */

static int
ngx_http_moe_guide_get(const moe_tokenizer_t *tok, moe_guided_kind_t kind,
    const char *spec, size_t len, moe_guide_t **out, char *msg,
    size_t msglen)
{
    int                          rc;
    char                        *copy;
    uint32_t                     hash;
    ngx_uint_t                   i;
    moe_guide_t                 *g, *old;
    ngx_http_moe_guide_entry_t  *e, *victim;

    hash = ngx_crc32_long((u_char *) spec, len) ^ (uint32_t) kind;

    pthread_mutex_lock(&ngx_http_moe_guides_lock);

    e = ngx_http_moe_guide_find(tok, kind, hash, spec, len);
    if (e != NULL) {
        e->used = ++ngx_http_moe_guides_tick;
        *out = moe_guide_ref(e->guide);
        pthread_mutex_unlock(&ngx_http_moe_guides_lock);
        return MOE_OK;
    }

    pthread_mutex_unlock(&ngx_http_moe_guides_lock);

    rc = moe_guide_compile(tok, kind, spec, len, &g, msg, msglen);
    if (rc != MOE_OK) {
        return rc;
    }

    *out = g;

    copy = malloc(len + 1);
    if (copy == NULL) {
        return MOE_OK;          /* served, not cached */
    }

    ngx_memcpy(copy, spec, len);
    copy[len] = '\0';

    pthread_mutex_lock(&ngx_http_moe_guides_lock);

    if (ngx_http_moe_guide_find(tok, kind, hash, spec, len) != NULL) {
        pthread_mutex_unlock(&ngx_http_moe_guides_lock);
        free(copy);
        return MOE_OK;
    }

    victim = &ngx_http_moe_guides[0];

    for (i = 0; i < NGX_HTTP_MOE_GUIDE_CACHE; i++) {
        e = &ngx_http_moe_guides[i];

        if (e->guide == NULL) {
            victim = e;
            break;
        }

        if (e->used < victim->used) {
            victim = e;
        }
    }

    old = victim->guide;
    free(victim->spec);

    victim->guide = moe_guide_ref(g);
    victim->tok = tok;
    victim->kind = kind;
    victim->hash = hash;
    victim->spec = copy;
    victim->len = len;
    victim->used = ++ngx_http_moe_guides_tick;

    pthread_mutex_unlock(&ngx_http_moe_guides_lock);

    moe_guide_release(old);

    return MOE_OK;
}
