
/*
 * Copyright (C) LocalMoE contributors
 */


#include <ngx_config.h>
#include <ngx_core.h>
#include <ngx_http.h>

#include "ngx_http_moe_module.h"


/*
 * Admission control.  A flood must not become a queue that every client
 * waits in (2,560 requests at once used to get 200 after 37 s at p99): past
 * engine.max_waiting_requests requests, or engine.max_waiting_tokens
 * prompt tokens, that have been admitted but have not started running,
 * the worker answers 429 at once, without touching the engine.
 *
 * "Waiting" is counted by the worker itself, from admission (before the
 * body is templated and tokenized on the thread pool) to the engine's
 * first event for the request (its first token: prefill is done; or its
 * end).  Only the event loop touches the counters, so they are exact with
 * no locks or atomics, and they never lag behind the engine: a request the
 * worker admitted counts at once, which an engine gauge read across the
 * ring could not do for requests still in the tokenizer.
 */


static ngx_int_t ngx_http_moe_admit_reject(ngx_http_request_t *r,
    ngx_http_moe_admit_t *a, ngx_http_moe_err_t *err, const char *fmt,
    ngx_uint_t what, uint64_t limit);


static ngx_str_t  ngx_http_moe_retry_after = ngx_string("1");


/* the limits from the engine YAML, once the worker starts */

void
ngx_http_moe_admit_init(ngx_http_moe_main_conf_t *mcf)
{
    ngx_memzero(&mcf->admit, sizeof(ngx_http_moe_admit_t));

    mcf->admit.max_waiting = (ngx_uint_t) mcf->config->max_waiting_requests;
    mcf->admit.max_tokens = (uint64_t) mcf->config->max_waiting_tokens;
}


/*
 * A new generation request: NGX_OK (counted as waiting until its first
 * engine event) or NGX_DECLINED with a 429 in *err and Retry-After set.
 */

ngx_int_t
ngx_http_moe_admit(ngx_http_request_t *r, ngx_http_moe_ctx_t *ctx,
    ngx_http_moe_err_t *err)
{
    ngx_http_moe_admit_t  *a;

    /* ctx->mcf, not the request's main conf: this file sits below
     * ngx_http_moe_request.c, which holds the module's index */
    a = &ctx->mcf->admit;

    if (ctx->waiting) {
        return NGX_OK;
    }

    if (a->max_waiting && a->waiting >= a->max_waiting) {
        return ngx_http_moe_admit_reject(r, a, err,
                                         "the server is at capacity: %ui "
                                         "requests are waiting to run (the "
                                         "limit is %uL, "
                                         "engine.max_waiting_requests); "
                                         "retry later",
                                         a->waiting, a->max_waiting);
    }

    a->waiting++;
    ctx->waiting = 1;
    ctx->waiting_tokens = 0;

    return NGX_OK;
}


/*
 * The admitted request's prompt is n tokens: NGX_OK, or NGX_DECLINED with
 * a 429 when the waiting prompts would pass the token budget.  A request
 * is never refused for its size alone: with nothing else waiting it is
 * admitted whatever its length (max_model_len bounds it).
 */

ngx_int_t
ngx_http_moe_admit_tokens(ngx_http_request_t *r, ngx_http_moe_ctx_t *ctx,
    size_t n, ngx_http_moe_err_t *err)
{
    ngx_http_moe_admit_t  *a;

    a = &ctx->mcf->admit;

    if (!ctx->waiting) {
        return NGX_OK;
    }

    if (a->max_tokens && a->waiting_tokens
        && a->waiting_tokens + n > a->max_tokens)
    {
        ngx_http_moe_admit_done(ctx);

        return ngx_http_moe_admit_reject(r, a, err,
                                         "the server is at capacity: %ui "
                                         "prompt tokens are waiting to run "
                                         "(the limit is %uL, "
                                         "engine.max_waiting_tokens); "
                                         "retry later",
                                         (ngx_uint_t) a->waiting_tokens,
                                         a->max_tokens);
    }

    a->waiting_tokens += n;
    ctx->waiting_tokens = n;

    return NGX_OK;
}


/* the request runs (or ended): it no longer waits; idempotent */

void
ngx_http_moe_admit_done(ngx_http_moe_ctx_t *ctx)
{
    ngx_http_moe_admit_t  *a;

    if (!ctx->waiting) {
        return;
    }

    a = &ctx->mcf->admit;

    a->waiting--;
    a->waiting_tokens -= ctx->waiting_tokens;

    ctx->waiting = 0;
    ctx->waiting_tokens = 0;
}


static ngx_int_t
ngx_http_moe_admit_reject(ngx_http_request_t *r, ngx_http_moe_admit_t *a,
    ngx_http_moe_err_t *err, const char *fmt, ngx_uint_t what,
    uint64_t limit)
{
    ngx_table_elt_t  *h;

    a->rejected++;

    /*
     * Retry-After: 1.  The queue drains at the engine's pace, and a
     * waiting request leaves it as soon as its prefill is done, so a slot
     * is usually free within a second; a client that honours the header
     * then finds one without polling in a loop.
     */

    h = ngx_list_push(&r->headers_out.headers);
    if (h == NULL) {
        return NGX_ERROR;
    }

    h->hash = 1;
    ngx_str_set(&h->key, "Retry-After");
    h->value = ngx_http_moe_retry_after;

    (void) ngx_http_moe_fail(err, NGX_HTTP_TOO_MANY_REQUESTS, NULL, fmt,
                             what, limit);

    err->type = "rate_limit_exceeded";
    err->code = "rate_limit_exceeded";

    return NGX_DECLINED;
}
