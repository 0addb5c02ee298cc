
/*
 * Copyright (C) LocalMoE contributors
 */


#include <ngx_config.h>
#include <ngx_core.h>
#include <ngx_http.h>

#include "ngx_http_moe_module.h"


static void ngx_http_moe_ctx_cleanup(void *data);


/* ngx_http_moe_module.ctx_index (see ngx_http_moe_module.h) */
ngx_uint_t  ngx_http_moe_ctx_index;


/*
 * The request's context, set as the module ctx, with a pool cleanup that
 * ends whatever the request still holds (an engine sequence, a timer, the
 * text stream) however the request ends.
 */

ngx_http_moe_ctx_t *
ngx_http_moe_ctx_create(ngx_http_request_t *r)
{
    ngx_pool_cleanup_t  *cln;
    ngx_http_moe_ctx_t  *ctx;

    ctx = ngx_pcalloc(r->pool, sizeof(ngx_http_moe_ctx_t));
    if (ctx == NULL) {
        return NULL;
    }

    cln = ngx_pool_cleanup_add(r->pool, 0);
    if (cln == NULL) {
        return NULL;
    }

    cln->handler = ngx_http_moe_ctx_cleanup;
    cln->data = ctx;

    ctx->request = r;
    ctx->mcf = ngx_http_moe_main_conf(r);

    ngx_http_moe_set_ctx(r, ctx);

    return ctx;
}


/* the live request with engine id `id`, NULL if it is gone */

ngx_http_moe_ctx_t *
ngx_http_moe_lookup(ngx_http_moe_main_conf_t *mcf, uint64_t id)
{
    ngx_rbtree_key_t     key;
    ngx_rbtree_node_t   *node, *sentinel;
    ngx_http_moe_ctx_t  *ctx;

    key = (ngx_rbtree_key_t) id;

    node = mcf->requests.root;
    sentinel = mcf->requests.sentinel;

    while (node != sentinel) {

        if (key < node->key) {
            node = node->left;
            continue;
        }

        if (key > node->key) {
            node = node->right;
            continue;
        }

        /* key == node->key; on 32-bit platforms the key is truncated */

        ctx = (ngx_http_moe_ctx_t *) node;

        if (ctx->id == id) {
            return ctx;
        }

        node = node->right;
    }

    return NULL;
}


/* makes ctx findable by its id (once its sequence is submitted) */

void
ngx_http_moe_register(ngx_http_moe_ctx_t *ctx)
{
    ctx->node.key = (ngx_rbtree_key_t) ctx->id;
    ngx_rbtree_insert(&ctx->mcf->requests, &ctx->node);
    ctx->in_map = 1;
}


/* the engine's late events for ctx are dropped from now on */

void
ngx_http_moe_unregister(ngx_http_moe_ctx_t *ctx)
{
    if (ctx->in_map) {
        ngx_rbtree_delete(&ctx->mcf->requests, &ctx->node);
        ctx->in_map = 0;
    }
}


/*
 * Ask the engine to drop a sequence.  A full command ring is not an error:
 * the id is kept and retried on the next wake-up or after 10 ms.
 */

void
ngx_http_moe_cancel(ngx_http_moe_eng_t *eng, uint64_t id)
{
    uint64_t                  *p;
    ngx_http_moe_main_conf_t  *mcf;

    if (eng == NULL || eng->engine == NULL) {
        return;
    }

    if (eng->cancels->nelts == 0
        && moe_engine_cancel(eng->engine, id) != MOE_EFULL)
    {
        return;
    }

    p = ngx_array_push(eng->cancels);
    if (p == NULL) {
        ngx_log_error(NGX_LOG_ALERT, ngx_cycle->log, 0,
                      "moe: cannot queue cancel of request %uL", id);
        return;
    }

    *p = id;

    mcf = eng->inst->mcf;

    if (!mcf->cancel_timer.timer_set) {
        ngx_add_timer(&mcf->cancel_timer, NGX_HTTP_MOE_CANCEL_RETRY);
    }
}


/* mcf->cancel_timer: retries the cancels the full rings refused, on every
 * engine (the current ones and those finishing after a switch) */

void
ngx_http_moe_cancel_handler(ngx_event_t *ev)
{
    ngx_uint_t                 i;
    ngx_http_moe_eng_t        *eng;
    ngx_http_moe_main_conf_t  *mcf;

    mcf = ev->data;

    for (i = 0; i < mcf->n_inst; i++) {
        if (mcf->inst[i].eng) {
            ngx_http_moe_retry_cancels(mcf->inst[i].eng);
        }

        for (eng = mcf->inst[i].retired; eng; eng = eng->next) {
            if (!eng->destroying) {
                ngx_http_moe_retry_cancels(eng);
            }
        }
    }
}


/* sends the queued cancels in order until the ring is full again */

void
ngx_http_moe_retry_cancels(ngx_http_moe_eng_t *eng)
{
    uint64_t                  *ids;
    ngx_uint_t                 i, k;
    ngx_http_moe_main_conf_t  *mcf;

    ids = eng->cancels->elts;

    for (i = 0, k = 0; i < eng->cancels->nelts; i++) {
        if (moe_engine_cancel(eng->engine, ids[i]) == MOE_EFULL) {
            /* keep the order: later ones would fail the same way */
            for ( /* void */ ; i < eng->cancels->nelts; i++) {
                ids[k++] = ids[i];
            }

            break;
        }
    }

    eng->cancels->nelts = k;

    mcf = eng->inst->mcf;

    if (k && !mcf->cancel_timer.timer_set) {
        ngx_add_timer(&mcf->cancel_timer, NGX_HTTP_MOE_CANCEL_RETRY);
    }
}


/*
 * A request's reference to its engine ends; a retired engine (switched
 * out) with no reference left is destroyed by ngx_http_moe_inst.c's reap
 * event.
 */

void
ngx_http_moe_eng_unref(ngx_http_moe_eng_t *eng)
{
    if (eng->refs > 0) {
        eng->refs--;
    }

    if (eng->refs == 0 && eng->retired && !eng->reap.posted
        && !eng->destroying)
    {
        /* not here: the wake handler may be in the middle of this
         * engine's events */
        ngx_post_event(&eng->reap, &ngx_posted_events);
    }
}


/*
 * Runs when the request pool goes away, however the request ended: a
 * sequence the engine still runs is cancelled so its KV blocks are freed.
 */

static void
ngx_http_moe_ctx_cleanup(void *data)
{
    ngx_http_moe_ctx_t  *ctx = data;

    ngx_http_moe_admit_done(ctx);

    if (ctx->live) {
        ngx_http_moe_cancel(ctx->eng, ctx->id);
        ctx->live = 0;
    }

    ngx_http_moe_unregister(ctx);

    /* the engine may now retire (after a switch): the last reference */
    if (ctx->eng) {
        ngx_http_moe_eng_unref(ctx->eng);
        ctx->eng = NULL;
    }

    if (ctx->keepalive.timer_set) {
        ngx_del_timer(&ctx->keepalive);
    }

    if (ctx->ts) {
        moe_textstream_free(ctx->ts);
        ctx->ts = NULL;
    }

    if (ctx->gen) {
        yajl_gen_free(ctx->gen);
        ctx->gen = NULL;
    }
}
