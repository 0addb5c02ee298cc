
/*
 * Copyright (C) LocalMoE contributors
 */


#include <ngx_config.h>
#include <ngx_core.h>
#include <ngx_http.h>

#include "ngx_http_moe_module.h"


#define NGX_HTTP_MOE_SSE_DATA  1
#define NGX_HTTP_MOE_SSE_LAST  2


static ngx_int_t ngx_http_moe_token(ngx_http_moe_ctx_t *ctx,
    moe_event_t *ev);
static ngx_int_t ngx_http_moe_text(ngx_http_moe_ctx_t *ctx, const char *text,
    size_t len);
static void ngx_http_moe_finish(ngx_http_moe_ctx_t *ctx);
static void ngx_http_moe_fail_request(ngx_http_moe_ctx_t *ctx,
    ngx_http_moe_err_t *err);
static void ngx_http_moe_stream_done(ngx_http_moe_ctx_t *ctx);
static void ngx_http_moe_sse_done(ngx_http_moe_ctx_t *ctx);
static ngx_int_t ngx_http_moe_gen_response(ngx_http_moe_ctx_t *ctx);
static void ngx_http_moe_gen_chunk(ngx_http_moe_ctx_t *ctx, const char *text,
    size_t len, ngx_uint_t role, const char *finish);
static void ngx_http_moe_gen_head(ngx_http_moe_ctx_t *ctx,
    const char *object);
static void ngx_http_moe_gen_usage(ngx_http_moe_ctx_t *ctx);
static ngx_int_t ngx_http_moe_sse_gen(ngx_http_moe_ctx_t *ctx,
    ngx_uint_t flags);
static ngx_int_t ngx_http_moe_sse_write(ngx_http_moe_ctx_t *ctx,
    const u_char *data, size_t len, ngx_uint_t flags);
static void ngx_http_moe_stream_writer(ngx_http_request_t *r);
static ngx_int_t ngx_http_moe_stream_arm(ngx_http_request_t *r);
static void ngx_http_moe_keepalive_handler(ngx_event_t *ev);
static ngx_uint_t ngx_http_moe_status(int status);


static ngx_str_t  ngx_http_moe_sse_type = ngx_string("text/event-stream");


/*
 * The sequence is queued.  A streamed answer starts now: the headers,
 * then for chat the role chunk, so a client sees the stream open while
 * the prompt is still prefilling.  Every live request also holds a timer:
 * it sends SSE comments until the first token and keeps a graceful
 * shutdown from exiting under a running generation.
 */

ngx_int_t
ngx_http_moe_stream_start(ngx_http_moe_ctx_t *ctx)
{
    ngx_int_t            rc;
    ngx_table_elt_t     *h;
    ngx_http_request_t  *r;

    r = ctx->request;

    ctx->keepalive.handler = ngx_http_moe_keepalive_handler;
    ctx->keepalive.data = ctx;
    ctx->keepalive.log = r->connection->log;

    ngx_add_timer(&ctx->keepalive, ctx->keepalive_interval);

    if (!ctx->stream) {
        return NGX_DONE;
    }

    r->headers_out.status = NGX_HTTP_OK;
    r->headers_out.content_length_n = -1;
    r->headers_out.content_type = ngx_http_moe_sse_type;
    r->headers_out.content_type_len = ngx_http_moe_sse_type.len;
    r->headers_out.content_type_lowcase = NULL;

    h = ngx_list_push(&r->headers_out.headers);
    if (h == NULL) {
        return NGX_ERROR;
    }

    h->hash = 1;
    ngx_str_set(&h->key, "Cache-Control");
    ngx_str_set(&h->value, "no-cache");

    h = ngx_list_push(&r->headers_out.headers);
    if (h == NULL) {
        return NGX_ERROR;
    }

    h->hash = 1;
    ngx_str_set(&h->key, "X-Accel-Buffering");
    ngx_str_set(&h->value, "no");

    rc = ngx_http_send_header(r);

    if (rc == NGX_ERROR || rc > NGX_OK || r->header_only) {
        return rc;
    }

    r->write_event_handler = ngx_http_moe_stream_writer;

    if (ctx->chat) {
        ngx_http_moe_gen_chunk(ctx, "", 0, 1, NULL);
        rc = ngx_http_moe_sse_gen(ctx, NGX_HTTP_MOE_SSE_DATA);

    } else {
        rc = ngx_http_moe_sse_write(ctx, NULL, 0, 0);
    }

    if (rc == NGX_ERROR) {
        return NGX_ERROR;
    }

    return NGX_DONE;
}


/*
 * One engine event for this request.  The request may be finalized here;
 * the caller must not touch ctx afterwards.
 */

void
ngx_http_moe_stream_event(ngx_http_moe_ctx_t *ctx, moe_event_t *ev)
{
    size_t               len;
    ngx_int_t            rc;
    const char          *text;
    ngx_http_moe_err_t   err;

    /* its first event: the request no longer waits to run */
    ngx_http_moe_admit_done(ctx);

    if (ctx->done) {
        return;
    }

    switch (ev->type) {

    case MOE_EV_TOKEN:
        rc = ngx_http_moe_token(ctx, ev);

        if (rc == NGX_ERROR) {
            ngx_http_finalize_request(ctx->request, NGX_ERROR);

        } else if (rc == NGX_DONE) {
            /* a stop string matched: the engine need not go on */
            ngx_http_moe_cancel(ctx->eng, ctx->id);
            ctx->live = 0;
            ctx->finish_reason = "stop";
            ngx_http_moe_finish(ctx);
        }

        return;

    case MOE_EV_FINISH:
        ctx->live = 0;

        if (ev->finish_reason == MOE_FINISH_ERROR) {
            (void) ngx_http_moe_fail(&err, NGX_HTTP_INTERNAL_SERVER_ERROR,
                                     NULL, "generation failed: %s",
                                     moe_strerror(ev->status));
            ngx_http_moe_fail_request(ctx, &err);
            return;
        }

        ctx->n_prompt = ev->n_prompt;
        ctx->n_cached = ev->n_cached;
        ctx->n_completion = ev->n_generated;
        ctx->finish_reason = (ev->finish_reason == MOE_FINISH_LENGTH)
                             ? "length" : "stop";

        text = NULL;
        len = 0;

        if (moe_textstream_finish(ctx->ts, &text, &len) != MOE_OK) {
            (void) ngx_http_moe_fail(&err, NGX_HTTP_INTERNAL_SERVER_ERROR,
                                     NULL, "detokenizer failed");
            ngx_http_moe_fail_request(ctx, &err);
            return;
        }

        if (len && ngx_http_moe_text(ctx, text, len) == NGX_ERROR) {
            ngx_http_finalize_request(ctx->request, NGX_ERROR);
            return;
        }

        ngx_http_moe_finish(ctx);
        return;

    case MOE_EV_ERROR:
        ctx->live = 0;

        ngx_log_error(NGX_LOG_ERR, ctx->request->connection->log, 0,
                      "moe: request %uL failed in the engine: %s",
                      ctx->id, moe_strerror(ev->status));

        (void) ngx_http_moe_fail(&err, ngx_http_moe_status(ev->status),
                                 NULL, "generation failed: %s",
                                 moe_strerror(ev->status));
        ngx_http_moe_fail_request(ctx, &err);
        return;

    default:
        ngx_log_error(NGX_LOG_ALERT, ctx->request->connection->log, 0,
                      "moe: unknown engine event type %D", ev->type);
        return;
    }
}


static ngx_uint_t
ngx_http_moe_status(int status)
{
    switch (status) {

    case MOE_EINVAL:
    case MOE_ETOOLONG:
        return NGX_HTTP_BAD_REQUEST;

    case MOE_EFULL:
    case MOE_ENOMEM:
        return NGX_HTTP_SERVICE_UNAVAILABLE;

    default:
        return NGX_HTTP_INTERNAL_SERVER_ERROR;
    }
}


/* NGX_OK, NGX_ERROR, or NGX_DONE when a stop string ended the output */

static ngx_int_t
ngx_http_moe_token(ngx_http_moe_ctx_t *ctx, moe_event_t *ev)
{
    int          stopped;
    size_t       len;
    const char  *text;

    ctx->got_token = 1;
    ctx->n_completion++;

    text = NULL;
    len = 0;
    stopped = 0;

    if (moe_textstream_push(ctx->ts, ev->token, &text, &len, &stopped)
        != MOE_OK)
    {
        ngx_log_error(NGX_LOG_ERR, ctx->request->connection->log, 0,
                      "moe: detokenizer failed on token %D", ev->token);
        return NGX_ERROR;
    }

    if (len && ngx_http_moe_text(ctx, text, len) == NGX_ERROR) {
        return NGX_ERROR;
    }

    return stopped ? NGX_DONE : NGX_OK;
}


/* new text: an SSE chunk, or appended to the answer being built */

static ngx_int_t
ngx_http_moe_text(ngx_http_moe_ctx_t *ctx, const char *text, size_t len)
{
    u_char  *p;
    size_t   cap;

    if (ctx->stream) {
        ngx_http_moe_gen_chunk(ctx, text, len, 0, NULL);
        return ngx_http_moe_sse_gen(ctx, NGX_HTTP_MOE_SSE_DATA);
    }

    if (ctx->text_len + len > ctx->text_cap) {
        cap = ngx_max(ctx->text_cap * 2, ctx->text_len + len);
        cap = ngx_max(cap, 256);

        p = ngx_pnalloc(ctx->request->pool, cap);
        if (p == NULL) {
            return NGX_ERROR;
        }

        if (ctx->text_len) {
            ngx_memcpy(p, ctx->text, ctx->text_len);
        }

        if (ctx->text) {
            ngx_pfree(ctx->request->pool, ctx->text);
        }

        ctx->text = p;
        ctx->text_cap = cap;
    }

    ngx_memcpy(ctx->text + ctx->text_len, text, len);
    ctx->text_len += len;

    return NGX_OK;
}


/* the answer is complete: send what is left and finalize */

static void
ngx_http_moe_finish(ngx_http_moe_ctx_t *ctx)
{
    ngx_int_t            rc;
    ngx_http_request_t  *r;

    r = ctx->request;

    ngx_http_moe_stream_done(ctx);

    if (!ctx->stream) {
        rc = ngx_http_moe_gen_response(ctx);
        if (rc == NGX_OK) {
            rc = ngx_http_moe_send_gen(r, NGX_HTTP_OK, ctx->gen);
        }

        ngx_http_finalize_request(r, rc);
        return;
    }

    ngx_http_moe_gen_chunk(ctx, "", 0, 0, ctx->finish_reason);

    if (ctx->include_usage) {
        if (ngx_http_moe_sse_gen(ctx, NGX_HTTP_MOE_SSE_DATA) == NGX_ERROR) {
            ngx_http_finalize_request(r, NGX_ERROR);
            return;
        }

        ngx_http_moe_gen_head(ctx, ctx->chat ? "chat.completion.chunk"
                                             : "text_completion");
        ngx_http_moe_gen_lit(ctx->gen, "choices");
        yajl_gen_array_open(ctx->gen);
        yajl_gen_array_close(ctx->gen);
        ngx_http_moe_gen_usage(ctx);
        yajl_gen_map_close(ctx->gen);
    }

    ngx_http_moe_sse_done(ctx);
}


/*
 * The sequence failed.  Before any output the client gets a JSON error
 * with its status; inside a stream an SSE error event and [DONE].
 */

static void
ngx_http_moe_fail_request(ngx_http_moe_ctx_t *ctx, ngx_http_moe_err_t *err)
{
    ngx_http_request_t  *r;

    r = ctx->request;

    ngx_http_moe_stream_done(ctx);

    if (!r->header_sent) {
        ngx_http_finalize_request(r, ngx_http_moe_send_err(r, err));
        return;
    }

    yajl_gen_reset(ctx->gen, NULL);
    yajl_gen_clear(ctx->gen);
    ngx_http_moe_gen_error(ctx->gen, err);

    ngx_http_moe_sse_done(ctx);
}


/* the request ends: no more engine events, no more keep-alive comments */

static void
ngx_http_moe_stream_done(ngx_http_moe_ctx_t *ctx)
{
    ctx->done = 1;
    ngx_http_moe_unregister(ctx);

    if (ctx->keepalive.timer_set) {
        ngx_del_timer(&ctx->keepalive);
    }
}


/* the last event of a stream: the one in ctx->gen, then [DONE]; finalizes */

static void
ngx_http_moe_sse_done(ngx_http_moe_ctx_t *ctx)
{
    ngx_int_t            rc;
    ngx_http_request_t  *r;

    static u_char  done[] = "data: [DONE]\n\n";

    r = ctx->request;

    if (ngx_http_moe_sse_gen(ctx, NGX_HTTP_MOE_SSE_DATA) == NGX_ERROR) {
        ngx_http_finalize_request(r, NGX_ERROR);
        return;
    }

    rc = ngx_http_moe_sse_write(ctx, done, sizeof(done) - 1,
                                NGX_HTTP_MOE_SSE_LAST);

    ngx_http_finalize_request(r, rc);
}


static ngx_int_t
ngx_http_moe_gen_response(ngx_http_moe_ctx_t *ctx)
{
    yajl_gen  g;

    g = ctx->gen;

    ngx_http_moe_gen_head(ctx, ctx->chat ? "chat.completion"
                                         : "text_completion");

    ngx_http_moe_gen_lit(g, "choices");
    yajl_gen_array_open(g);
    yajl_gen_map_open(g);

    ngx_http_moe_gen_lit(g, "index");
    yajl_gen_integer(g, 0);

    if (ctx->chat) {
        ngx_http_moe_gen_lit(g, "message");
        yajl_gen_map_open(g);
        ngx_http_moe_gen_lit(g, "role");
        ngx_http_moe_gen_lit(g, "assistant");
        ngx_http_moe_gen_lit(g, "content");
        ngx_http_moe_gen_str(g, ctx->text ? ctx->text : (u_char *) "",
                             ctx->text_len);
        yajl_gen_map_close(g);

    } else {
        ngx_http_moe_gen_lit(g, "text");
        ngx_http_moe_gen_str(g, ctx->text ? ctx->text : (u_char *) "",
                             ctx->text_len);
    }

    ngx_http_moe_gen_lit(g, "logprobs");
    yajl_gen_null(g);

    ngx_http_moe_gen_lit(g, "finish_reason");
    ngx_http_moe_gen_cstr(g, ctx->finish_reason);

    yajl_gen_map_close(g);
    yajl_gen_array_close(g);

    ngx_http_moe_gen_usage(ctx);

    if (yajl_gen_map_close(g) != yajl_gen_status_ok) {
        return NGX_ERROR;
    }

    return NGX_OK;
}


/* a new document: opens the object and writes id, object, created, model */

static void
ngx_http_moe_gen_head(ngx_http_moe_ctx_t *ctx, const char *object)
{
    yajl_gen  g;

    g = ctx->gen;

    yajl_gen_reset(g, NULL);
    yajl_gen_clear(g);

    yajl_gen_map_open(g);

    ngx_http_moe_gen_lit(g, "id");
    ngx_http_moe_gen_str(g, ctx->rid.data, ctx->rid.len);

    ngx_http_moe_gen_lit(g, "object");
    ngx_http_moe_gen_cstr(g, object);

    ngx_http_moe_gen_lit(g, "created");
    yajl_gen_integer(g, (long long) ctx->created);

    ngx_http_moe_gen_lit(g, "model");
    ngx_http_moe_gen_str(g, ctx->model.data, ctx->model.len);
}


static void
ngx_http_moe_gen_usage(ngx_http_moe_ctx_t *ctx)
{
    yajl_gen  g;

    g = ctx->gen;

    ngx_http_moe_gen_lit(g, "usage");
    yajl_gen_map_open(g);

    ngx_http_moe_gen_lit(g, "prompt_tokens");
    yajl_gen_integer(g, ctx->n_prompt);

    ngx_http_moe_gen_lit(g, "completion_tokens");
    yajl_gen_integer(g, ctx->n_completion);

    ngx_http_moe_gen_lit(g, "total_tokens");
    yajl_gen_integer(g, ctx->n_prompt + ctx->n_completion);

    ngx_http_moe_gen_lit(g, "prompt_tokens_details");
    yajl_gen_map_open(g);
    ngx_http_moe_gen_lit(g, "cached_tokens");
    yajl_gen_integer(g, ctx->n_cached);
    yajl_gen_map_close(g);

    yajl_gen_map_close(g);
}


/* one streamed chunk: a role delta, a text delta, or the finish */

static void
ngx_http_moe_gen_chunk(ngx_http_moe_ctx_t *ctx, const char *text, size_t len,
    ngx_uint_t role, const char *finish)
{
    yajl_gen  g;

    g = ctx->gen;

    ngx_http_moe_gen_head(ctx, ctx->chat ? "chat.completion.chunk"
                                         : "text_completion");

    ngx_http_moe_gen_lit(g, "choices");
    yajl_gen_array_open(g);
    yajl_gen_map_open(g);

    ngx_http_moe_gen_lit(g, "index");
    yajl_gen_integer(g, 0);

    if (ctx->chat) {
        ngx_http_moe_gen_lit(g, "delta");
        yajl_gen_map_open(g);

        if (role) {
            ngx_http_moe_gen_lit(g, "role");
            ngx_http_moe_gen_lit(g, "assistant");
        }

        if (finish == NULL) {
            ngx_http_moe_gen_lit(g, "content");
            ngx_http_moe_gen_str(g, text, len);
        }

        yajl_gen_map_close(g);

    } else {
        ngx_http_moe_gen_lit(g, "text");
        ngx_http_moe_gen_str(g, text, len);
    }

    ngx_http_moe_gen_lit(g, "logprobs");
    yajl_gen_null(g);

    ngx_http_moe_gen_lit(g, "finish_reason");

    if (finish) {
        ngx_http_moe_gen_cstr(g, finish);

    } else {
        yajl_gen_null(g);
    }

    yajl_gen_map_close(g);
    yajl_gen_array_close(g);

    if (ctx->continuous_usage) {
        ngx_http_moe_gen_usage(ctx);

    } else if (ctx->include_usage) {
        ngx_http_moe_gen_lit(g, "usage");
        yajl_gen_null(g);
    }

    yajl_gen_map_close(g);
}


static ngx_int_t
ngx_http_moe_sse_gen(ngx_http_moe_ctx_t *ctx, ngx_uint_t flags)
{
    size_t                len;
    const unsigned char  *buf;

    if (yajl_gen_get_buf(ctx->gen, &buf, &len) != yajl_gen_status_ok) {
        return NGX_ERROR;
    }

    return ngx_http_moe_sse_write(ctx, buf, len, flags);
}


/*
 * Sends one piece of the stream at once (a flushed buffer).  Buffers are
 * recycled through ctx->free once the write filter is done with them; when
 * the socket is full the rest goes out from the write event handler.
 */

static ngx_int_t
ngx_http_moe_sse_write(ngx_http_moe_ctx_t *ctx, const u_char *data,
    size_t len, ngx_uint_t flags)
{
    u_char              *p;
    size_t               size;
    ngx_int_t            rc;
    ngx_buf_t           *b;
    ngx_chain_t         *cl;
    ngx_http_request_t  *r;

    r = ctx->request;

    size = len;

    if (flags & NGX_HTTP_MOE_SSE_DATA) {
        size += sizeof("data: ") - 1 + sizeof("\n\n") - 1;
    }

    cl = ngx_chain_get_free_buf(r->pool, &ctx->free);
    if (cl == NULL) {
        return NGX_ERROR;
    }

    b = cl->buf;

    if (size && (b->start == NULL || (size_t) (b->end - b->start) < size)) {
        p = ngx_palloc(r->pool, ngx_max(size, 512));
        if (p == NULL) {
            return NGX_ERROR;
        }

        b->start = p;
        b->end = p + ngx_max(size, 512);
    }

    b->pos = b->start;
    b->last = b->start;

    /* a recycled buffer keeps its flags; an empty one must not be memory */
    b->temporary = size ? 1 : 0;

    if (flags & NGX_HTTP_MOE_SSE_DATA) {
        b->last = ngx_cpymem(b->last, "data: ", sizeof("data: ") - 1);
    }

    if (len) {
        b->last = ngx_cpymem(b->last, data, len);
    }

    if (flags & NGX_HTTP_MOE_SSE_DATA) {
        b->last = ngx_cpymem(b->last, "\n\n", sizeof("\n\n") - 1);
    }

    b->tag = (ngx_buf_tag_t) &ngx_http_moe_ctx_index;
    b->flush = 1;
    b->last_buf = (flags & NGX_HTTP_MOE_SSE_LAST) ? 1 : 0;
    b->last_in_chain = 1;

    rc = ngx_http_output_filter(r, cl);

    ngx_chain_update_chains(r->pool, &ctx->free, &ctx->busy, &cl,
                            (ngx_buf_tag_t) &ngx_http_moe_ctx_index);

    if (rc == NGX_ERROR) {
        return NGX_ERROR;
    }

    if (flags & NGX_HTTP_MOE_SSE_LAST) {
        /* ngx_http_finalize_request() takes care of the rest */
        return rc;
    }

    if (ngx_http_moe_stream_arm(r) != NGX_OK) {
        return NGX_ERROR;
    }

    return rc;
}


static void
ngx_http_moe_stream_writer(ngx_http_request_t *r)
{
    ngx_int_t            rc;
    ngx_event_t         *wev;
    ngx_chain_t         *cl;
    ngx_connection_t    *c;
    ngx_http_moe_ctx_t  *ctx;

    c = r->connection;
    wev = c->write;

    ctx = ngx_http_moe_get_ctx(r);

    if (wev->timedout) {
        ngx_log_error(NGX_LOG_INFO, c->log, NGX_ETIMEDOUT,
                      "client timed out");
        c->timedout = 1;
        ngx_http_finalize_request(r, NGX_HTTP_REQUEST_TIME_OUT);
        return;
    }

    if (ctx == NULL || wev->delayed) {
        return;
    }

    cl = NULL;

    rc = ngx_http_output_filter(r, NULL);

    ngx_chain_update_chains(r->pool, &ctx->free, &ctx->busy, &cl,
                            (ngx_buf_tag_t) &ngx_http_moe_ctx_index);

    if (rc == NGX_ERROR || ngx_http_moe_stream_arm(r) != NGX_OK) {
        ngx_http_finalize_request(r, NGX_ERROR);
    }
}


/* a send timeout while output waits for the socket, as ngx_http_writer() */

static ngx_int_t
ngx_http_moe_stream_arm(ngx_http_request_t *r)
{
    ngx_event_t               *wev;
    ngx_connection_t          *c;
    ngx_http_core_loc_conf_t  *clcf;

    c = r->connection;
    wev = c->write;

    if (!r->buffered && !c->buffered) {
        if (wev->timer_set) {
            ngx_del_timer(wev);
        }

        return NGX_OK;
    }

    clcf = ngx_http_get_module_loc_conf(r, ngx_http_core_module);

    if (!wev->delayed) {
        ngx_add_timer(wev, clcf->send_timeout);
    }

    if (ngx_handle_write_event(wev, clcf->send_lowat) != NGX_OK) {
        return NGX_ERROR;
    }

    return NGX_OK;
}


static void
ngx_http_moe_keepalive_handler(ngx_event_t *ev)
{
    ngx_connection_t    *c;
    ngx_http_request_t  *r;
    ngx_http_moe_ctx_t  *ctx;

    static u_char  comment[] = ": keep-alive\n\n";

    ctx = ev->data;
    r = ctx->request;
    c = r->connection;

    if (ctx->done) {
        return;
    }

    if (ctx->stream && !ctx->got_token) {
        if (ngx_http_moe_sse_write(ctx, comment, sizeof(comment) - 1, 0)
            == NGX_ERROR)
        {
            ngx_http_finalize_request(r, NGX_ERROR);
            ngx_http_run_posted_requests(c);
            return;
        }
    }

    ngx_add_timer(ev, ctx->keepalive_interval);

    ngx_http_run_posted_requests(c);
}
