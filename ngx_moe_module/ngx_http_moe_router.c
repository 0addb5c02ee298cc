
/*
 * Copyright (C) LocalMoE contributors
 */


/*
 * $moe_prefix_key: the prefix affinity key of a request body, for a front
 * nginx that balances several LocalMoE nodes with
 *
 *     upstream localmoe { hash $moe_prefix_key consistent; server ...; }
 *
 * so that the turns of one conversation reach the node whose prefix cache
 * holds their first messages.  The key is 16 hex digits of
 * moe_prefix_key_finish() (libmoe, pure computation: no engine, no model,
 * no tokenizer; see moe.h).  A body that yields no key (not JSON, no
 * "messages" or "prompt", no body) gets "none-" and 16 hex digits that
 * differ per request, so the consistent hash spreads such requests instead
 * of piling them on one node.
 *
 * This is a module of its own inside the same .so as ngx_http_moe_module:
 * a front nginx loads the .so and uses the variable with no "moe_engine"
 * and no "moe_api" anywhere, and then no engine starts.  It uses nothing of
 * the other module's files.
 *
 * The body: proxy_pass reads the whole request body before it picks the
 * upstream peer (with proxy_request_buffering on, the default), so the
 * hash sees it all.  A body kept in memory is parsed there; for one nginx
 * wrote to its temporary file, only a bounded prefix is read back, in
 * small pread()s of a file nginx has just written (page cache), at most
 * NGX_HTTP_MOE_ROUTER_SCAN + 8 * moe_prefix_key_bytes bytes in all.  The
 * parse stops as soon as the key is complete.
 */


#include <ngx_config.h>
#include <ngx_core.h>
#include <ngx_http.h>

#include <moe.h>


/* bytes of body parsed past the budget (JSON around the messages) */
#define NGX_HTTP_MOE_ROUTER_SCAN  65536
#define NGX_HTTP_MOE_ROUTER_READ  4096

#define NGX_HTTP_MOE_ROUTER_KEY_LEN  16
#define NGX_HTTP_MOE_ROUTER_NONE     "none-"


typedef struct {
    size_t                     prefix_key_bytes;
} ngx_http_moe_router_loc_conf_t;


static ngx_int_t ngx_http_moe_router_add_variables(ngx_conf_t *cf);
static void *ngx_http_moe_router_create_loc_conf(ngx_conf_t *cf);
static char *ngx_http_moe_router_merge_loc_conf(ngx_conf_t *cf, void *parent,
    void *child);
static char *ngx_http_moe_router_bytes(ngx_conf_t *cf, void *post,
    void *data);
static ngx_int_t ngx_http_moe_prefix_key_variable(ngx_http_request_t *r,
    ngx_http_variable_value_t *v, uintptr_t data);
static ngx_int_t ngx_http_moe_router_key(ngx_http_request_t *r,
    size_t budget, uint64_t *hash);


static ngx_conf_post_handler_pt  ngx_http_moe_router_bytes_p =
    ngx_http_moe_router_bytes;


static ngx_command_t  ngx_http_moe_router_commands[] = {

    { ngx_string("moe_prefix_key_bytes"),
      NGX_HTTP_MAIN_CONF|NGX_HTTP_SRV_CONF|NGX_HTTP_LOC_CONF|NGX_CONF_TAKE1,
      ngx_conf_set_size_slot,
      NGX_HTTP_LOC_CONF_OFFSET,
      offsetof(ngx_http_moe_router_loc_conf_t, prefix_key_bytes),
      &ngx_http_moe_router_bytes_p },

      ngx_null_command
};


static ngx_http_module_t  ngx_http_moe_router_module_ctx = {
    ngx_http_moe_router_add_variables,     /* preconfiguration */
    NULL,                                  /* postconfiguration */

    NULL,                                  /* create main configuration */
    NULL,                                  /* init main configuration */

    NULL,                                  /* create server configuration */
    NULL,                                  /* merge server configuration */

    ngx_http_moe_router_create_loc_conf,   /* create location configuration */
    ngx_http_moe_router_merge_loc_conf     /* merge location configuration */
};


ngx_module_t  ngx_http_moe_router_module = {
    NGX_MODULE_V1,
    &ngx_http_moe_router_module_ctx,       /* module context */
    ngx_http_moe_router_commands,          /* module directives */
    NGX_HTTP_MODULE,                       /* module type */
    NULL,                                  /* init master */
    NULL,                                  /* init module */
    NULL,                                  /* init process */
    NULL,                                  /* init thread */
    NULL,                                  /* exit thread */
    NULL,                                  /* exit process */
    NULL,                                  /* exit master */
    NGX_MODULE_V1_PADDING
};


static ngx_http_variable_t  ngx_http_moe_router_vars[] = {

    /*
     * not cacheable: evaluated before the body is read (an early log or
     * header directive), it must not freeze the fallback for the request
     */

    { ngx_string("moe_prefix_key"), NULL, ngx_http_moe_prefix_key_variable,
      0, NGX_HTTP_VAR_NOCACHEABLE, 0 },

      ngx_http_null_variable
};


static ngx_int_t
ngx_http_moe_router_add_variables(ngx_conf_t *cf)
{
    ngx_http_variable_t  *var, *v;

    for (v = ngx_http_moe_router_vars; v->name.len; v++) {
        var = ngx_http_add_variable(cf, &v->name, v->flags);
        if (var == NULL) {
            return NGX_ERROR;
        }

        var->get_handler = v->get_handler;
        var->data = v->data;
    }

    return NGX_OK;
}


static void *
ngx_http_moe_router_create_loc_conf(ngx_conf_t *cf)
{
    ngx_http_moe_router_loc_conf_t  *conf;

    conf = ngx_pcalloc(cf->pool, sizeof(ngx_http_moe_router_loc_conf_t));
    if (conf == NULL) {
        return NULL;
    }

    conf->prefix_key_bytes = NGX_CONF_UNSET_SIZE;

    return conf;
}


static char *
ngx_http_moe_router_merge_loc_conf(ngx_conf_t *cf, void *parent, void *child)
{
    ngx_http_moe_router_loc_conf_t *prev = parent;
    ngx_http_moe_router_loc_conf_t *conf = child;

    /* about 256 tokens of English text at ~4 bytes a token */
    ngx_conf_merge_size_value(conf->prefix_key_bytes, prev->prefix_key_bytes,
                              1024);

    return NGX_CONF_OK;
}


static char *
ngx_http_moe_router_bytes(ngx_conf_t *cf, void *post, void *data)
{
    size_t  *sp = data;

    if (*sp < 1 || *sp > 1024 * 1024) {
        return "must be between 1 and 1m bytes";
    }

    return NGX_CONF_OK;
}


static ngx_int_t
ngx_http_moe_prefix_key_variable(ngx_http_request_t *r,
    ngx_http_variable_value_t *v, uintptr_t data)
{
    u_char                          *p;
    uint64_t                         hash;
    ngx_uint_t                       none;
    ngx_http_moe_router_loc_conf_t  *rlcf;

    rlcf = ngx_http_get_module_loc_conf(r, ngx_http_moe_router_module);

    none = 0;

    if (ngx_http_moe_router_key(r, rlcf->prefix_key_bytes, &hash) != NGX_OK) {

        /*
         * no key: one that differs per request (and stays the same for
         * the request, if evaluated twice) spreads them over the ring
         */

        none = 1;
        hash = ((uint64_t) ngx_pid << 40)
               ^ ((uint64_t) r->connection->number << 16)
               ^ (uint64_t) r->connection->requests;
        hash *= 0x9e3779b97f4a7c15ULL;
        hash ^= hash >> 29;
    }

    p = ngx_pnalloc(r->pool, sizeof(NGX_HTTP_MOE_ROUTER_NONE) - 1
                             + NGX_HTTP_MOE_ROUTER_KEY_LEN);
    if (p == NULL) {
        return NGX_ERROR;
    }

    v->data = p;

    if (none) {
        p = ngx_cpymem(p, NGX_HTTP_MOE_ROUTER_NONE,
                       sizeof(NGX_HTTP_MOE_ROUTER_NONE) - 1);
    }

    p = ngx_sprintf(p, "%016xL", hash);

    v->len = p - v->data;
    v->valid = 1;
    v->no_cacheable = 1;
    v->not_found = 0;

    return NGX_OK;
}


/*
 * NGX_OK with *hash when the body read so far yields a key; NGX_DECLINED
 * when it does not (no body yet, not JSON, nothing to key on);
 * NGX_ERROR on allocation failure (also "no key" to the caller).
 */

static ngx_int_t
ngx_http_moe_router_key(ngx_http_request_t *r, size_t budget, uint64_t *hash)
{
    int                  rc;
    off_t                off;
    size_t               max, seen, n;
    ssize_t              got;
    ngx_buf_t           *b;
    ngx_chain_t         *cl;
    moe_prefix_key_t    *k;
    u_char               buf[NGX_HTTP_MOE_ROUTER_READ];

    if (r->request_body == NULL || r->request_body->bufs == NULL) {
        return NGX_DECLINED;
    }

    k = moe_prefix_key_create(budget);
    if (k == NULL) {
        return NGX_ERROR;
    }

    max = NGX_HTTP_MOE_ROUTER_SCAN + 8 * budget;
    seen = 0;
    rc = 0;

    for (cl = r->request_body->bufs; cl && rc == 0 && seen < max;
         cl = cl->next)
    {
        b = cl->buf;

        if (ngx_buf_in_memory(b)) {
            n = ngx_min((size_t) (b->last - b->pos), max - seen);
            rc = moe_prefix_key_feed(k, b->pos, n);
            seen += n;
            continue;
        }

        if (!b->in_file || b->file == NULL) {
            continue;
        }

        /* a spilled body: read its start back, a little at a time */

        for (off = b->file_pos; off < b->file_last && rc == 0 && seen < max;
             off += got)
        {
            n = ngx_min((size_t) (b->file_last - off), sizeof(buf));
            n = ngx_min(n, max - seen);

            got = pread(b->file->fd, buf, n, off);

            if (got <= 0) {
                ngx_log_error(NGX_LOG_INFO, r->connection->log, ngx_errno,
                              "moe_prefix_key: cannot read the body's "
                              "temporary file \"%V\"", &b->file->name);
                rc = MOE_EINVAL;
                break;
            }

            rc = moe_prefix_key_feed(k, buf, got);
            seen += got;
        }
    }

    rc = (rc >= 0 && moe_prefix_key_finish(k, hash) == MOE_OK)
         ? NGX_OK : NGX_DECLINED;

    moe_prefix_key_destroy(k);

    return rc;
}
