
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
    ngx_http_moe_inst_t *inst, ngx_http_moe_err_t *err, const char *fmt,
    ngx_uint_t what, uint64_t limit);


/* the limits from the engine YAML, once the worker starts */

void
ngx_http_moe_admit_init(ngx_http_moe_admit_t *a, const moe_config_t *config)
{
    ngx_memzero(a, sizeof(ngx_http_moe_admit_t));

    a->max_waiting = (ngx_uint_t) config->max_waiting_requests;
    a->max_tokens = (uint64_t) config->max_waiting_tokens;
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

    /* per instance: the one the request was routed to */
    a = &ctx->inst->admit;

    if (ctx->waiting) {
        return NGX_OK;
    }

    if (a->max_waiting && a->waiting >= a->max_waiting) {
        return ngx_http_moe_admit_reject(r, ctx->inst, err,
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

    a = &ctx->inst->admit;

    if (!ctx->waiting) {
        return NGX_OK;
    }

    if (a->max_tokens && a->waiting_tokens
        && a->waiting_tokens + n > a->max_tokens)
    {
        ngx_http_moe_admit_done(ctx);

        return ngx_http_moe_admit_reject(r, ctx->inst, err,
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

    a = &ctx->inst->admit;

    a->waiting--;
    a->waiting_tokens -= ctx->waiting_tokens;

    ctx->waiting = 0;
    ctx->waiting_tokens = 0;
}


static ngx_int_t
ngx_http_moe_admit_reject(ngx_http_request_t *r, ngx_http_moe_inst_t *inst,
    ngx_http_moe_err_t *err, const char *fmt, ngx_uint_t what,
    uint64_t limit)
{
    inst->admit.rejected++;

    if (ngx_http_moe_set_retry_after(r, ngx_http_moe_retry_after(inst))
        != NGX_OK)
    {
        return NGX_ERROR;
    }

    (void) ngx_http_moe_fail(err, NGX_HTTP_TOO_MANY_REQUESTS, NULL, fmt,
                             what, limit);

    err->type = "rate_limit_exceeded";
    err->code = "rate_limit_exceeded";

    return NGX_DECLINED;
}


/*
 * Retry-After, in seconds, for a 429 or a 503 of inst (at least 1, at most
 * 600):
 *   * serving: the work queued ahead of a new request over the engine's
 *     throughput: (waiting prompt tokens, or waiting requests times the
 *     mean tokens of a finished request when the prompts are not
 *     tokenized yet, plus the running sequences' share) divided by the
 *     tokens per second of the engine's busy time;
 *   * loading: the last load's duration minus the time this one has run
 *     (the time it has run, before any load finished).
 */

time_t
ngx_http_moe_retry_after(ngx_http_moe_inst_t *inst)
{
    double                 tps, per_req, queued, sec;
    ngx_msec_t             ran;
    moe_stats_t            st;
    ngx_http_moe_admit_t  *a;

    if (inst == NULL) {
        return 1;
    }

    if (inst->eng == NULL || inst->eng->engine == NULL) {
        ran = ngx_current_msec - inst->load_start;
        sec = inst->last_load_ms > ran
              ? (double) (inst->last_load_ms - ran) / 1000
              : (double) ran / 1000;
        goto clamp;
    }

    moe_engine_stats(inst->eng->engine, &st);

    tps = st.busy_ns > 0
          ? (double) (st.prompt_tokens_total + st.generated_tokens_total)
            * 1e9 / (double) st.busy_ns
          : 0;

    if (tps <= 0) {
        return 1;
    }

    per_req = st.requests_finished > 0
              ? (double) (st.prompt_tokens_total + st.generated_tokens_total)
                / (double) st.requests_finished
              : 16;

    a = &inst->admit;

    queued = a->waiting_tokens
             ? (double) a->waiting_tokens
             : (double) a->waiting * per_req;
    queued += (double) st.seqs_running * per_req / 2;

    sec = queued / tps;

clamp:

    if (sec < 1) {
        return 1;
    }

    return sec > 600 ? 600 : (time_t) (sec + 0.999);
}


/* the Retry-After header of a 429 or 503 */

ngx_int_t
ngx_http_moe_set_retry_after(ngx_http_request_t *r, time_t sec)
{
    u_char           *p;
    ngx_table_elt_t  *h;

    p = ngx_pnalloc(r->pool, NGX_TIME_T_LEN);
    if (p == NULL) {
        return NGX_ERROR;
    }

    h = ngx_list_push(&r->headers_out.headers);
    if (h == NULL) {
        return NGX_ERROR;
    }

    h->hash = 1;
    ngx_str_set(&h->key, "Retry-After");
    h->value.data = p;
    h->value.len = ngx_sprintf(p, "%T", sec < 1 ? 1 : sec) - p;

    return NGX_OK;
}
