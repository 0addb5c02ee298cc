
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
static void ngx_http_moe_gen_chunk_usage(ngx_http_moe_ctx_t *ctx);
static ngx_int_t ngx_http_moe_sse_gen(ngx_http_moe_ctx_t *ctx,
    ngx_uint_t flags);
static ngx_int_t ngx_http_moe_sse_write(ngx_http_moe_ctx_t *ctx,
    const u_char *data, size_t len, ngx_uint_t flags);
static void ngx_http_moe_stream_writer(ngx_http_request_t *r);
static ngx_int_t ngx_http_moe_stream_arm(ngx_http_request_t *r);
static void ngx_http_moe_keepalive_handler(ngx_event_t *ev);
static ngx_uint_t ngx_http_moe_status(int status);
static ngx_int_t ngx_http_moe_text_end(ngx_http_moe_ctx_t *ctx,
    moe_event_t *ev);
static ngx_int_t ngx_http_moe_text_out(ngx_http_moe_ctx_t *ctx,
    const char *text, size_t len);
static ngx_int_t ngx_http_moe_tool_events(ngx_http_moe_ctx_t *ctx);
static ngx_int_t ngx_http_moe_tool_finish(ngx_http_moe_ctx_t *ctx);
static void ngx_http_moe_tool_cleanup(void *data);
static void ngx_http_moe_gen_tool_chunk(ngx_http_moe_ctx_t *ctx,
    moe_toolev_t *ev);
static void ngx_http_moe_gen_tool_calls(ngx_http_moe_ctx_t *ctx);
static ngx_uint_t ngx_http_moe_tool_blank(u_char *p, size_t len);

static ngx_int_t ngx_http_moe_lp_echo(ngx_http_moe_ctx_t *ctx);
static ngx_int_t ngx_http_moe_lp_token(ngx_http_moe_ctx_t *ctx,
    moe_event_t *ev);
static ngx_int_t ngx_http_moe_lp_prompt(ngx_http_moe_ctx_t *ctx,
    moe_event_t *ev);
static ngx_int_t ngx_http_moe_lp_add(ngx_http_moe_ctx_t *ctx, int32_t token,
    float logprob, ngx_uint_t no_logprob, const moe_logprob_entry_t *top,
    ngx_uint_t n_top);
static ngx_int_t ngx_http_moe_lp_decode(ngx_http_moe_ctx_t *ctx, int32_t id,
    ngx_str_t *out);
static void ngx_http_moe_gen_logprobs(ngx_http_moe_ctx_t *ctx);
static void ngx_http_moe_gen_lp_chat(yajl_gen g, ngx_http_moe_lp_tok_t *t);
static void ngx_http_moe_gen_lp_value(yajl_gen g, float logprob);

static void ngx_http_moe_choice_cleanup(void *data);
static void ngx_http_moe_choice_load(ngx_http_moe_ctx_t *ctx, ngx_uint_t c);
static void ngx_http_moe_choice_save(ngx_http_moe_ctx_t *ctx);
static ngx_int_t ngx_http_moe_choices_echo(ngx_http_moe_ctx_t *ctx,
    ngx_uint_t role);
static void ngx_http_moe_choice_event(ngx_http_moe_ctx_t *ctx,
    moe_event_t *ev);
static void ngx_http_moe_choice_end(ngx_http_moe_ctx_t *ctx);
static void ngx_http_moe_choice_pick(ngx_http_moe_ctx_t *ctx, ngx_uint_t k);


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
        if (ctx->choices) {
            return ngx_http_moe_choices_echo(ctx, 0) == NGX_OK ? NGX_DONE
                                                              : NGX_ERROR;
        }

        if (ngx_http_moe_lp_echo(ctx) != NGX_OK) {
            return NGX_ERROR;
        }

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

    if (ctx->choices) {
        rc = ngx_http_moe_sse_write(ctx, NULL, 0, 0);

        if (rc == NGX_ERROR
            || ngx_http_moe_choices_echo(ctx, ctx->chat) != NGX_OK)
        {
            return NGX_ERROR;
        }

        return NGX_DONE;
    }

    if (ctx->chat) {
        ngx_http_moe_gen_chunk(ctx, "", 0, 1, NULL);
        rc = ngx_http_moe_sse_gen(ctx, NGX_HTTP_MOE_SSE_DATA);

    } else {
        rc = ngx_http_moe_sse_write(ctx, NULL, 0, 0);
    }

    if (rc == NGX_ERROR || ngx_http_moe_lp_echo(ctx) != NGX_OK) {
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
    ngx_int_t            rc;
    ngx_http_moe_err_t   err;

    /* its first event: the request no longer waits to run */
    ngx_http_moe_admit_done(ctx);

    if (ctx->done) {
        return;
    }

    if (ctx->choices) {
        ngx_http_moe_choice_event(ctx, ev);
        return;
    }

    switch (ev->type) {

    case MOE_EV_PROMPT:
        if (ngx_http_moe_lp_prompt(ctx, ev) != NGX_OK) {
            ngx_http_finalize_request(ctx->request, NGX_ERROR);
        }

        return;

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
        if (ngx_http_moe_text_end(ctx, ev) != NGX_OK) {
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

    if (ctx->logprobs && ngx_http_moe_lp_token(ctx, ev) != NGX_OK) {
        return NGX_ERROR;
    }

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


/*
 * A FINISH event for the text loaded in ctx (the request's, or one
 * choice's): the finish reason, then what its text stream held back (no
 * stop string matched).  NGX_OK, or NGX_ERROR when the request was failed
 * or finalized here.
 */

static ngx_int_t
ngx_http_moe_text_end(ngx_http_moe_ctx_t *ctx, moe_event_t *ev)
{
    size_t               len;
    const char          *text;
    ngx_http_moe_err_t   err;

    ctx->finish_reason = (ev->finish_reason == MOE_FINISH_LENGTH)
                         ? "length" : "stop";

    text = NULL;
    len = 0;

    if (moe_textstream_finish(ctx->ts, &text, &len) != MOE_OK) {
        (void) ngx_http_moe_fail(&err, NGX_HTTP_INTERNAL_SERVER_ERROR, NULL,
                                 "detokenizer failed");
        ngx_http_moe_fail_request(ctx, &err);
        return NGX_ERROR;
    }

    if (len && ngx_http_moe_text(ctx, text, len) == NGX_ERROR) {
        ngx_http_finalize_request(ctx->request, NGX_ERROR);
        return NGX_ERROR;
    }

    return NGX_OK;
}


/* new text: through the tool-call parser when there is one */

static ngx_int_t
ngx_http_moe_text(ngx_http_moe_ctx_t *ctx, const char *text, size_t len)
{
    if (ctx->tp) {
        if (moe_toolparse_push(ctx->tp, text, len) != MOE_OK) {
            return NGX_ERROR;
        }

        return ngx_http_moe_tool_events(ctx);
    }

    return ngx_http_moe_text_out(ctx, text, len);
}


/* content: an SSE chunk, or appended to the answer being built */

static ngx_int_t
ngx_http_moe_text_out(ngx_http_moe_ctx_t *ctx, const char *text, size_t len)
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

    if (ctx->tp && ngx_http_moe_tool_finish(ctx) != NGX_OK) {
        ngx_http_moe_stream_done(ctx);
        ngx_http_finalize_request(r, NGX_ERROR);
        return;
    }

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
    yajl_gen    g;
    ngx_uint_t  k;

    g = ctx->gen;

    ngx_http_moe_gen_head(ctx, ctx->chat ? "chat.completion"
                                         : "text_completion");

    ngx_http_moe_gen_lit(g, "choices");
    yajl_gen_array_open(g);

    /* n > 1: the n_return best choices, in rank order */
    for (k = 0; k < (ctx->choices ? ctx->n_return : 1); k++) {
        if (ctx->choices) {
            ngx_http_moe_choice_pick(ctx, k);
        }

        yajl_gen_map_open(g);

        ngx_http_moe_gen_lit(g, "index");
        yajl_gen_integer(g, k);

        if (ctx->chat) {
            ngx_http_moe_gen_lit(g, "message");
            yajl_gen_map_open(g);
            ngx_http_moe_gen_lit(g, "role");
            ngx_http_moe_gen_lit(g, "assistant");
            ngx_http_moe_gen_lit(g, "content");

            if (ctx->tp && moe_toolparse_n_calls(ctx->tp) > 0
                && ngx_http_moe_tool_blank(ctx->text, ctx->text_len))
            {
                /* only calls (blanks around them are no content) */
                yajl_gen_null(g);

            } else {
                ngx_http_moe_gen_str(g, ctx->text ? ctx->text
                                                  : (u_char *) "",
                                     ctx->text_len);
            }

            ngx_http_moe_gen_tool_calls(ctx);
            yajl_gen_map_close(g);

        } else {
            ngx_http_moe_gen_lit(g, "text");
            ngx_http_moe_gen_str(g, ctx->text ? ctx->text : (u_char *) "",
                                 ctx->text_len);
        }

        ngx_http_moe_gen_logprobs(ctx);

        ngx_http_moe_gen_lit(g, "finish_reason");
        ngx_http_moe_gen_cstr(g, ctx->finish_reason);

        yajl_gen_map_close(g);
    }

    yajl_gen_array_close(g);

    ngx_http_moe_gen_usage(ctx);

    if (yajl_gen_map_close(g) != yajl_gen_status_ok) {
        return NGX_ERROR;
    }

    return NGX_OK;
}


/* a stream chunk's usage: the counts so far (continuous_usage_stats), null
 * (include_usage: only the last chunk has them), or none */

static void
ngx_http_moe_gen_chunk_usage(ngx_http_moe_ctx_t *ctx)
{
    if (ctx->continuous_usage) {
        ngx_http_moe_gen_usage(ctx);

    } else if (ctx->include_usage) {
        ngx_http_moe_gen_lit(ctx->gen, "usage");
        yajl_gen_null(ctx->gen);
    }
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
    yajl_gen_integer(g, ctx->cur);

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

    ngx_http_moe_gen_logprobs(ctx);

    ngx_http_moe_gen_lit(g, "finish_reason");

    if (finish) {
        ngx_http_moe_gen_cstr(g, finish);

    } else {
        yajl_gen_null(g);
    }

    yajl_gen_map_close(g);
    yajl_gen_array_close(g);

    ngx_http_moe_gen_chunk_usage(ctx);

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


/* ------------------------------------------------- logprobs and echo */

/*
 * Each generated token (and, with echo, each prompt token) gets an entry:
 * its text decoded alone, its logprob and its top entries.  A streamed
 * chunk carries the entries of the tokens whose text it sends (text held
 * back for a stop string or half a character waits with its entries);
 * the final answer carries them all.  Decoding one id is a table lookup
 * per byte, as the incremental detokenizer does on this loop anyway.
 */


/* echo without prompt logprobs: the prompt text first, at once */

static ngx_int_t
ngx_http_moe_lp_echo(ngx_http_moe_ctx_t *ctx)
{
    if (!ctx->echo_on || ctx->echo_sent || ctx->logprobs) {
        return NGX_OK;
    }

    ctx->echo_sent = 1;

    if (ctx->echo_len == 0) {
        return NGX_OK;
    }

    return ngx_http_moe_text(ctx, (const char *) ctx->echo, ctx->echo_len);
}


static ngx_int_t
ngx_http_moe_lp_token(ngx_http_moe_ctx_t *ctx, moe_event_t *ev)
{
    moe_logprobs_t  *lp;

    lp = ev->lp;

    return ngx_http_moe_lp_add(ctx, ev->token, ev->logprob, 0,
                               lp ? lp->top : NULL,
                               lp ? (ngx_uint_t) lp->k : 0);
}


/* echo with logprobs: the prompt's rows, then the prompt text with them */

static ngx_int_t
ngx_http_moe_lp_prompt(ngx_http_moe_ctx_t *ctx, moe_event_t *ev)
{
    int32_t          i;
    moe_logprobs_t  *lp;

    lp = ev->lp;

    if (lp == NULL || !ctx->echo_on || ctx->echo_sent) {
        return NGX_OK;
    }

    for (i = 0; i < lp->n_rows; i++) {
        if (ngx_http_moe_lp_add(ctx, lp->token[i], lp->logprob[i], i == 0,
                                i == 0 ? NULL : lp->top + (size_t) i * lp->k,
                                i == 0 ? 0 : (ngx_uint_t) lp->k)
            != NGX_OK)
        {
            return NGX_ERROR;
        }
    }

    ctx->echo_sent = 1;

    if (ctx->stream && ctx->echo_len == 0) {
        ngx_http_moe_gen_chunk(ctx, "", 0, 0, NULL);
        return ngx_http_moe_sse_gen(ctx, NGX_HTTP_MOE_SSE_DATA);
    }

    return ngx_http_moe_text(ctx, (const char *) ctx->echo, ctx->echo_len);
}


static ngx_int_t
ngx_http_moe_lp_add(ngx_http_moe_ctx_t *ctx, int32_t token, float logprob,
    ngx_uint_t no_logprob, const moe_logprob_entry_t *top, ngx_uint_t n_top)
{
    ngx_uint_t              i, n;
    ngx_http_moe_lp_tok_t  *t;

    if (ctx->lp == NULL) {
        ctx->lp = ngx_array_create(ctx->request->pool, 16,
                                   sizeof(ngx_http_moe_lp_tok_t));
        if (ctx->lp == NULL) {
            return NGX_ERROR;
        }
    }

    t = ngx_array_push(ctx->lp);
    if (t == NULL) {
        return NGX_ERROR;
    }

    ngx_memzero(t, sizeof(ngx_http_moe_lp_tok_t));

    if (ngx_http_moe_lp_decode(ctx, token, &t->text) != NGX_OK) {
        return NGX_ERROR;
    }

    t->logprob = logprob;
    t->no_logprob = no_logprob;
    /* text_offset counts characters, as Python's len() of the text */
    t->offset = ctx->lp_offset;
    n = ngx_utf8_length(t->text.data, t->text.len);
    ctx->lp_offset += (n == (ngx_uint_t) NGX_ERROR) ? t->text.len : n;

    n = ngx_min(n_top, ctx->lp_top);

    if (top == NULL || n == 0) {
        return NGX_OK;
    }

    t->top = ngx_palloc(ctx->request->pool,
                        n * sizeof(ngx_http_moe_lp_top_t));
    if (t->top == NULL) {
        return NGX_ERROR;
    }

    for (i = 0; i < n; i++) {
        if (top[i].id < 0) {
            break;
        }

        if (ngx_http_moe_lp_decode(ctx, top[i].id, &t->top[i].text)
            != NGX_OK)
        {
            return NGX_ERROR;
        }

        t->top[i].logprob = top[i].logprob;
    }

    t->n_top = i;

    return NGX_OK;
}


/* one id's text, special tokens included, in the request's pool */

static ngx_int_t
ngx_http_moe_lp_decode(ngx_http_moe_ctx_t *ctx, int32_t id, ngx_str_t *out)
{
    char    *text;
    size_t   len;

    text = NULL;
    len = 0;

    if (moe_tokenizer_decode(ctx->eng->tokenizer, &id, 1, 0, &text, &len)
        != MOE_OK)
    {
        ngx_log_error(NGX_LOG_ERR, ctx->request->connection->log, 0,
                      "moe: cannot decode token %D for logprobs", id);
        return NGX_ERROR;
    }

    out->len = len;
    out->data = ngx_pnalloc(ctx->request->pool, len + 1);

    if (out->data == NULL) {
        free(text);
        return NGX_ERROR;
    }

    ngx_memcpy(out->data, text, len);
    free(text);

    return NGX_OK;
}


/*
 * "logprobs": null without logprobs or, in a stream chunk, without new
 * tokens; else chat's {"content": [...], "refusal": null} or completions'
 * {"tokens", "token_logprobs", "top_logprobs", "text_offset"}.  A stream
 * forgets the entries it sent.
 */

static void
ngx_http_moe_gen_logprobs(ngx_http_moe_ctx_t *ctx)
{
    yajl_gen                g;
    ngx_uint_t              i, j;
    ngx_http_moe_lp_tok_t  *t;

    g = ctx->gen;

    ngx_http_moe_gen_lit(g, "logprobs");

    if (!ctx->logprobs
        || (ctx->stream && (ctx->lp == NULL || ctx->lp->nelts == 0)))
    {
        yajl_gen_null(g);
        return;
    }

    t = ctx->lp ? ctx->lp->elts : NULL;
    yajl_gen_map_open(g);

    if (ctx->chat) {
        ngx_http_moe_gen_lit(g, "content");
        yajl_gen_array_open(g);

        for (i = 0; ctx->lp && i < ctx->lp->nelts; i++) {
            ngx_http_moe_gen_lp_chat(g, &t[i]);
        }

        yajl_gen_array_close(g);

        ngx_http_moe_gen_lit(g, "refusal");
        yajl_gen_null(g);

        goto done;
    }

    ngx_http_moe_gen_lit(g, "tokens");
    yajl_gen_array_open(g);
    for (i = 0; ctx->lp && i < ctx->lp->nelts; i++) {
        ngx_http_moe_gen_str(g, t[i].text.data, t[i].text.len);
    }
    yajl_gen_array_close(g);

    ngx_http_moe_gen_lit(g, "token_logprobs");
    yajl_gen_array_open(g);
    for (i = 0; ctx->lp && i < ctx->lp->nelts; i++) {
        if (t[i].no_logprob) {
            yajl_gen_null(g);

        } else {
            ngx_http_moe_gen_lp_value(g, t[i].logprob);
        }
    }
    yajl_gen_array_close(g);

    ngx_http_moe_gen_lit(g, "top_logprobs");
    yajl_gen_array_open(g);
    for (i = 0; ctx->lp && i < ctx->lp->nelts; i++) {
        if (t[i].no_logprob) {
            yajl_gen_null(g);
            continue;
        }

        yajl_gen_map_open(g);
        for (j = 0; j < t[i].n_top; j++) {
            ngx_http_moe_gen_str(g, t[i].top[j].text.data,
                                 t[i].top[j].text.len);
            ngx_http_moe_gen_lp_value(g, t[i].top[j].logprob);
        }
        yajl_gen_map_close(g);
    }
    yajl_gen_array_close(g);

    ngx_http_moe_gen_lit(g, "text_offset");
    yajl_gen_array_open(g);
    for (i = 0; ctx->lp && i < ctx->lp->nelts; i++) {
        yajl_gen_integer(g, (long long) t[i].offset);
    }
    yajl_gen_array_close(g);

done:

    yajl_gen_map_close(g);

    if (ctx->stream && ctx->lp) {
        ctx->lp->nelts = 0;
    }
}


/* chat's {token, logprob, bytes, top_logprobs: [{token, logprob, bytes}]} */

static void
ngx_http_moe_gen_lp_chat(yajl_gen g, ngx_http_moe_lp_tok_t *t)
{
    size_t      k;
    ngx_uint_t  j;
    ngx_str_t  *text;
    float       logprob;

    for (j = 0; j <= t->n_top; j++) {
        if (j == 0) {
            text = &t->text;
            logprob = t->logprob;

        } else {
            text = &t->top[j - 1].text;
            logprob = t->top[j - 1].logprob;
        }

        yajl_gen_map_open(g);

        ngx_http_moe_gen_lit(g, "token");
        ngx_http_moe_gen_str(g, text->data, text->len);

        ngx_http_moe_gen_lit(g, "logprob");
        ngx_http_moe_gen_lp_value(g, logprob);

        ngx_http_moe_gen_lit(g, "bytes");
        yajl_gen_array_open(g);
        for (k = 0; k < text->len; k++) {
            yajl_gen_integer(g, text->data[k]);
        }
        yajl_gen_array_close(g);

        if (j > 0) {
            yajl_gen_map_close(g);
            continue;
        }

        ngx_http_moe_gen_lit(g, "top_logprobs");
        yajl_gen_array_open(g);

        if (t->n_top == 0) {
            yajl_gen_array_close(g);
            yajl_gen_map_close(g);
            return;
        }
    }

    yajl_gen_array_close(g);
    yajl_gen_map_close(g);
}


/* JSON has no -inf: a token the sampler could not pick gets OpenAI's
 * -9999.0 */

static void
ngx_http_moe_gen_lp_value(yajl_gen g, float logprob)
{
    if (!(logprob > -9999.0f)) {
        logprob = -9999.0f;
    }

    yajl_gen_double(g, (double) logprob);
}


/* ------------------------------------------------------- n > 1 choices */

/*
 * A request of n_choices engine choices (n, or best_of on completions):
 * each choice has its own text stream, text, logprobs and finish reason,
 * loaded into the request's fields while one of its events is handled, so
 * the single-choice functions above serve it unchanged.  A streamed
 * answer sends each choice's chunks with its index as they come, a
 * finish chunk per choice, and ends (usage, [DONE]) with the last; the
 * final JSON lists the n_return choices with the highest cumulative
 * logprob (all of them, in index order, without best_of).  Usage counts
 * the prompt once and the tokens of every choice.
 */

ngx_int_t
ngx_http_moe_choices_init(ngx_http_moe_ctx_t *ctx, ngx_uint_t n_choices,
    ngx_uint_t n_return, const char *const *stops, int n_stops,
    int skip_special_tokens)
{
    ngx_uint_t              c;
    ngx_pool_cleanup_t     *cln;
    ngx_http_moe_choice_t  *ch;

    ch = ngx_pcalloc(ctx->request->pool,
                     n_choices * sizeof(ngx_http_moe_choice_t));
    if (ch == NULL) {
        return NGX_ERROR;
    }

    cln = ngx_pool_cleanup_add(ctx->request->pool, 0);
    if (cln == NULL) {
        return NGX_ERROR;
    }

    cln->handler = ngx_http_moe_choice_cleanup;
    cln->data = ctx;

    ctx->choices = ch;
    ctx->n_choices = n_choices;
    ctx->n_return = n_return;

    /* choice 0 keeps the stream the request made */
    ch[0].ts = ctx->ts;

    for (c = 1; c < n_choices; c++) {
        ch[c].ts = moe_textstream_create(ctx->eng->tokenizer, stops, n_stops,
                                         skip_special_tokens);
        if (ch[c].ts == NULL) {
            return NGX_ERROR;
        }
    }

    ctx->cur = 0;

    return NGX_OK;
}


/* runs before the request's own cleanup (pool cleanups run last first) */

static void
ngx_http_moe_choice_cleanup(void *data)
{
    ngx_http_moe_ctx_t  *ctx = data;
    ngx_uint_t           c;

    for (c = 0; c < ctx->n_choices; c++) {
        if (ctx->choices[c].ts) {
            moe_textstream_free(ctx->choices[c].ts);
            ctx->choices[c].ts = NULL;
        }
    }

    ctx->ts = NULL;
}


static void
ngx_http_moe_choice_load(ngx_http_moe_ctx_t *ctx, ngx_uint_t c)
{
    ngx_http_moe_choice_t  *ch;

    ch = &ctx->choices[c];

    ctx->cur = c;
    ctx->ts = ch->ts;
    ctx->text = ch->text;
    ctx->text_len = ch->text_len;
    ctx->text_cap = ch->text_cap;
    ctx->lp = ch->lp;
    ctx->lp_offset = ch->lp_offset;
    ctx->finish_reason = ch->finish_reason;
    ctx->echo_sent = ch->echo_sent;
}


static void
ngx_http_moe_choice_save(ngx_http_moe_ctx_t *ctx)
{
    ngx_http_moe_choice_t  *ch;

    ch = &ctx->choices[ctx->cur];

    ch->ts = ctx->ts;
    ch->text = ctx->text;
    ch->text_len = ctx->text_len;
    ch->text_cap = ctx->text_cap;
    ch->lp = ctx->lp;
    ch->lp_offset = ctx->lp_offset;
    ch->finish_reason = ctx->finish_reason;
    ch->echo_sent = ctx->echo_sent;
}


/* at the start: each choice's role chunk (chat streams) and echo */

static ngx_int_t
ngx_http_moe_choices_echo(ngx_http_moe_ctx_t *ctx, ngx_uint_t role)
{
    ngx_int_t   rc;
    ngx_uint_t  c;

    for (c = 0; c < ctx->n_choices; c++) {
        ngx_http_moe_choice_load(ctx, c);

        rc = NGX_OK;

        if (role) {
            ngx_http_moe_gen_chunk(ctx, "", 0, 1, NULL);
            rc = ngx_http_moe_sse_gen(ctx, NGX_HTTP_MOE_SSE_DATA);
        }

        if (rc == NGX_OK) {
            rc = ngx_http_moe_lp_echo(ctx);
        }

        ngx_http_moe_choice_save(ctx);

        if (rc != NGX_OK) {
            return NGX_ERROR;
        }
    }

    return NGX_OK;
}


static void
ngx_http_moe_choice_event(ngx_http_moe_ctx_t *ctx, moe_event_t *ev)
{
    ngx_int_t               rc;
    ngx_uint_t              c;
    ngx_http_moe_err_t      err;
    ngx_http_moe_choice_t  *ch;

    c = (ngx_uint_t) ev->index;

    if (ev->type == MOE_EV_ERROR) {
        ctx->live = 0;
        (void) ngx_http_moe_fail(&err, ngx_http_moe_status(ev->status),
                                 NULL, "generation failed: %s",
                                 moe_strerror(ev->status));
        ngx_http_moe_fail_request(ctx, &err);
        return;
    }

    if (ev->index < 0 || c >= ctx->n_choices) {
        return;
    }

    ch = &ctx->choices[c];

    if (ev->type == MOE_EV_PROMPT) {
        /* the prompt is every choice's: its rows and echo for each */
        for (c = 0; c < ctx->n_choices; c++) {
            ngx_http_moe_choice_load(ctx, c);
            rc = ngx_http_moe_lp_prompt(ctx, ev);
            ngx_http_moe_choice_save(ctx);

            if (rc != NGX_OK) {
                ngx_http_finalize_request(ctx->request, NGX_ERROR);
                return;
            }
        }

        return;
    }

    if (ev->type == MOE_EV_FINISH) {
        if (++ctx->n_ended == ctx->n_choices) {
            ctx->live = 0;
        }

        if (ch->done) {
            return;
        }

        if (ev->finish_reason == MOE_FINISH_ERROR) {
            ctx->live = 0;
            (void) ngx_http_moe_fail(&err, NGX_HTTP_INTERNAL_SERVER_ERROR,
                                     NULL, "generation failed: %s",
                                     moe_strerror(ev->status));
            ngx_http_moe_fail_request(ctx, &err);
            return;
        }

        ctx->n_prompt = ev->n_prompt;
        ctx->n_cached = ev->n_cached;

        /* the EOS token counts, as in the engine's n_generated */
        if (ev->n_generated > ch->n_seen) {
            ctx->n_completion += ev->n_generated - ch->n_seen;
        }

        ngx_http_moe_choice_load(ctx, c);

        if (ngx_http_moe_text_end(ctx, ev) != NGX_OK) {
            return;
        }

        ngx_http_moe_choice_end(ctx);
        return;
    }

    if (ev->type != MOE_EV_TOKEN || ch->done) {
        return;
    }

    ch->n_seen++;
    ch->cum_logprob += ev->logprob;

    ngx_http_moe_choice_load(ctx, c);

    rc = ngx_http_moe_token(ctx, ev);

    if (rc == NGX_ERROR) {
        ngx_http_finalize_request(ctx->request, NGX_ERROR);
        return;
    }

    if (rc == NGX_DONE) {
        /* a stop string ended this choice: the engine may drop it (a
         * full ring: it runs on and its tokens are ignored) */
        (void) moe_engine_cancel_choice(ctx->eng->engine, ctx->id,
                                        (int) c);
        ctx->finish_reason = "stop";
        ngx_http_moe_choice_end(ctx);
        return;
    }

    ngx_http_moe_choice_save(ctx);
}


/* the loaded choice is complete: its finish chunk, or the whole answer
 * after the last one */

static void
ngx_http_moe_choice_end(ngx_http_moe_ctx_t *ctx)
{
    ngx_http_moe_choice_t  *ch;

    ch = &ctx->choices[ctx->cur];
    ch->done = 1;

    ngx_http_moe_choice_save(ctx);

    if (++ctx->n_done == ctx->n_choices) {
        /* the last: its finish chunk, usage and [DONE], or the JSON */
        ngx_http_moe_finish(ctx);
        return;
    }

    if (!ctx->stream) {
        return;
    }

    ngx_http_moe_gen_chunk(ctx, "", 0, 0, ctx->finish_reason);

    if (ngx_http_moe_sse_gen(ctx, NGX_HTTP_MOE_SSE_DATA) == NGX_ERROR) {
        ngx_http_finalize_request(ctx->request, NGX_ERROR);
    }
}


/* load the k-th choice of the answer: by cumulative logprob when best_of
 * asked for more than n (ties: the lower index), else choice k */

static void
ngx_http_moe_choice_pick(ngx_http_moe_ctx_t *ctx, ngx_uint_t k)
{
    ngx_uint_t              c, j, rank;
    ngx_http_moe_choice_t  *ch;

    ch = ctx->choices;

    if (ctx->n_return == ctx->n_choices) {
        ngx_http_moe_choice_load(ctx, k);
        return;
    }

    for (c = 0; c < ctx->n_choices; c++) {
        rank = 0;

        for (j = 0; j < ctx->n_choices; j++) {
            if (ch[j].cum_logprob > ch[c].cum_logprob
                || (ch[j].cum_logprob == ch[c].cum_logprob && j < c))
            {
                rank++;
            }
        }

        if (rank == k) {
            ngx_http_moe_choice_load(ctx, c);
            return;
        }
    }
}


/* ------------------------------------------------------------- tool calls */

/*
 * A request with tools (tool_choice not "none", a parser configured) gets
 * a parser over its output text (ngx_http_moe_tools.c chose the format);
 * content goes out as before, calls as tool_calls (function_call for the
 * deprecated functions), streamed as OpenAI streams them: a first delta
 * with index, id, type, function.name and arguments "", then fragments
 * of the arguments; finish_reason "tool_calls".
 */

ngx_int_t
ngx_http_moe_stream_tools(ngx_http_moe_ctx_t *ctx, ngx_http_moe_tools_t *tl)
{
    uint64_t             seed;
    ngx_pool_cleanup_t  *cln;

    if (tl->format == MOE_TOOL_NONE) {
        return NGX_OK;
    }

    cln = ngx_pool_cleanup_add(ctx->request->pool, 0);
    if (cln == NULL) {
        return NGX_ERROR;
    }

    seed = ((uint64_t) ngx_random() << 32) ^ (uint64_t) ngx_random()
           ^ ctx->id;

    ctx->tp = moe_toolparse_create((moe_tool_format_t) tl->format, tl->name,
                                   seed);
    if (ctx->tp == NULL) {
        return NGX_ERROR;
    }

    ctx->tool_legacy = tl->legacy;

    cln->handler = ngx_http_moe_tool_cleanup;
    cln->data = ctx;

    return NGX_OK;
}


static void
ngx_http_moe_tool_cleanup(void *data)
{
    ngx_http_moe_ctx_t  *ctx = data;

    moe_toolparse_free(ctx->tp);
    ctx->tp = NULL;
}


/* what the parser made of the last text: content, call deltas */

static ngx_int_t
ngx_http_moe_tool_events(ngx_http_moe_ctx_t *ctx)
{
    moe_toolev_t  ev;

    while (moe_toolparse_next(ctx->tp, &ev)) {

        if (ev.type == MOE_TOOLEV_CONTENT) {
            if (ngx_http_moe_text_out(ctx, ev.text, ev.len) == NGX_ERROR) {
                return NGX_ERROR;
            }

            continue;
        }

        /* whole calls are read at the end of a non-streamed answer */
        if (!ctx->stream) {
            continue;
        }

        /* the legacy function_call holds one call */
        if (ctx->tool_legacy && ev.index > 0) {
            continue;
        }

        ngx_http_moe_gen_tool_chunk(ctx, &ev);

        if (ngx_http_moe_sse_gen(ctx, NGX_HTTP_MOE_SSE_DATA) == NGX_ERROR) {
            return NGX_ERROR;
        }
    }

    return NGX_OK;
}


/* the output ended: what the parser held back, and the finish reason */

static ngx_int_t
ngx_http_moe_tool_finish(ngx_http_moe_ctx_t *ctx)
{
    if (moe_toolparse_finish(ctx->tp) != MOE_OK) {
        return NGX_ERROR;
    }

    if (ngx_http_moe_tool_events(ctx) != NGX_OK) {
        return NGX_ERROR;
    }

    if (moe_toolparse_n_calls(ctx->tp) > 0
        && ngx_strcmp(ctx->finish_reason, "stop") == 0)
    {
        ctx->finish_reason = ctx->tool_legacy ? "function_call"
                                              : "tool_calls";
    }

    return NGX_OK;
}


/* one streamed tool-call delta */

static void
ngx_http_moe_gen_tool_chunk(ngx_http_moe_ctx_t *ctx, moe_toolev_t *ev)
{
    yajl_gen  g;

    g = ctx->gen;

    ngx_http_moe_gen_head(ctx, "chat.completion.chunk");

    ngx_http_moe_gen_lit(g, "choices");
    yajl_gen_array_open(g);
    yajl_gen_map_open(g);

    ngx_http_moe_gen_lit(g, "index");
    yajl_gen_integer(g, 0);

    ngx_http_moe_gen_lit(g, "delta");
    yajl_gen_map_open(g);

    if (ctx->tool_legacy) {
        ngx_http_moe_gen_lit(g, "function_call");

    } else {
        ngx_http_moe_gen_lit(g, "tool_calls");
        yajl_gen_array_open(g);
        yajl_gen_map_open(g);
        ngx_http_moe_gen_lit(g, "index");
        yajl_gen_integer(g, ev->index);

        if (ev->type == MOE_TOOLEV_CALL) {
            ngx_http_moe_gen_lit(g, "id");
            ngx_http_moe_gen_cstr(g, ev->id);
            ngx_http_moe_gen_lit(g, "type");
            ngx_http_moe_gen_lit(g, "function");
        }

        ngx_http_moe_gen_lit(g, "function");
    }

    yajl_gen_map_open(g);

    if (ev->type == MOE_TOOLEV_CALL) {
        ngx_http_moe_gen_lit(g, "name");
        ngx_http_moe_gen_cstr(g, ev->name);
    }

    ngx_http_moe_gen_lit(g, "arguments");
    ngx_http_moe_gen_str(g, ev->text, ev->len);
    yajl_gen_map_close(g);

    if (!ctx->tool_legacy) {
        yajl_gen_map_close(g);
        yajl_gen_array_close(g);
    }

    yajl_gen_map_close(g);

    ngx_http_moe_gen_lit(g, "logprobs");
    yajl_gen_null(g);
    ngx_http_moe_gen_lit(g, "finish_reason");
    yajl_gen_null(g);

    yajl_gen_map_close(g);
    yajl_gen_array_close(g);

    ngx_http_moe_gen_chunk_usage(ctx);

    yajl_gen_map_close(g);
}


/* the message's tool_calls (or function_call) of a non-streamed answer */

static void
ngx_http_moe_gen_tool_calls(ngx_http_moe_ctx_t *ctx)
{
    int          i, n;
    size_t       len;
    yajl_gen     g;
    const char  *id, *name, *args;

    if (ctx->tp == NULL) {
        return;
    }

    g = ctx->gen;
    n = moe_toolparse_n_calls(ctx->tp);

    if (n == 0) {
        return;
    }

    if (ctx->tool_legacy) {
        (void) moe_toolparse_call(ctx->tp, 0, &id, &name, &args, &len);

        ngx_http_moe_gen_lit(g, "function_call");
        yajl_gen_map_open(g);
        ngx_http_moe_gen_lit(g, "name");
        ngx_http_moe_gen_cstr(g, name);
        ngx_http_moe_gen_lit(g, "arguments");
        ngx_http_moe_gen_str(g, args, len);
        yajl_gen_map_close(g);
        return;
    }

    ngx_http_moe_gen_lit(g, "tool_calls");
    yajl_gen_array_open(g);

    for (i = 0; i < n; i++) {
        (void) moe_toolparse_call(ctx->tp, i, &id, &name, &args, &len);

        yajl_gen_map_open(g);
        ngx_http_moe_gen_lit(g, "id");
        ngx_http_moe_gen_cstr(g, id);
        ngx_http_moe_gen_lit(g, "type");
        ngx_http_moe_gen_lit(g, "function");
        ngx_http_moe_gen_lit(g, "function");
        yajl_gen_map_open(g);
        ngx_http_moe_gen_lit(g, "name");
        ngx_http_moe_gen_cstr(g, name);
        ngx_http_moe_gen_lit(g, "arguments");
        ngx_http_moe_gen_str(g, args, len);
        yajl_gen_map_close(g);
        yajl_gen_map_close(g);
    }

    yajl_gen_array_close(g);
}


static ngx_uint_t
ngx_http_moe_tool_blank(u_char *p, size_t len)
{
    size_t  i;

    for (i = 0; i < len; i++) {
        if (p[i] != ' ' && p[i] != '\n' && p[i] != '\t' && p[i] != '\r') {
            return 0;
        }
    }

    return 1;
}
