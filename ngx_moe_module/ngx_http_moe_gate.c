
/*
 * Copyright (C) LocalMoE contributors
 */


#include <ngx_config.h>
#include <ngx_core.h>
#include <ngx_http.h>
#include <ngx_sha1.h>

#include "ngx_http_moe_module.h"


/*
 * The gate in front of the API: API keys (Authorization: Bearer) and the
 * request body size limit.
 *
 * Keys come from the engine YAML's server: section (api_key, api_key_file,
 * admin_api_key, admin_api_key_file).  They are read when the
 * configuration is parsed, so "nginx -s reload" reads them again.  Only
 * their SHA-1 digests are kept: a request's key is hashed and compared
 * with every configured digest, all 20 bytes of each, with no early exit,
 * so the time taken says nothing about how much of a key was right nor
 * about its length beyond the hashing itself.
 */


#define NGX_HTTP_MOE_ROUTE_OPEN     0
#define NGX_HTTP_MOE_ROUTE_KEY      1
#define NGX_HTTP_MOE_ROUTE_ADMIN    2


static ngx_int_t ngx_http_moe_gate_file(ngx_conf_t *cf, const char *path,
    const char *what, ngx_array_t *digests);
static ngx_int_t ngx_http_moe_gate_add(ngx_array_t *digests, u_char *key,
    size_t len);
static ngx_uint_t ngx_http_moe_gate_match(ngx_array_t *digests,
    u_char *digest);
static ngx_uint_t ngx_http_moe_gate_class(ngx_http_request_t *r);
static ngx_int_t ngx_http_moe_gate_refuse(ngx_http_request_t *r,
    ngx_uint_t status, const char *fmt);
static ngx_int_t ngx_http_moe_gate_header_filter(ngx_http_request_t *r);
static ngx_int_t ngx_http_moe_gate_body_filter(ngx_http_request_t *r,
    ngx_chain_t *in);


static ngx_http_output_header_filter_pt  ngx_http_next_header_filter;
static ngx_http_output_body_filter_pt    ngx_http_next_body_filter;


static ngx_str_t  ngx_http_moe_admin_routes[] = {
    ngx_string("/v1/models/switch"),
    ngx_string("/v1/stats/memory"),
    ngx_string("/v1/stats/performance"),
    ngx_null_string
};


/*
 * Reads the keys named by the YAML (inline and files) into mcf->keys and
 * mcf->admin_keys as digests, then wipes the inline keys from the parsed
 * configuration.  Called while the configuration is parsed; failures are
 * logged at emerg naming the file, never a key.
 */

ngx_int_t
ngx_http_moe_gate_load(ngx_conf_t *cf, ngx_http_moe_main_conf_t *mcf)
{
    int            i;
    moe_config_t  *c;

    c = mcf->config;

    mcf->keys = ngx_array_create(cf->pool, 4, NGX_HTTP_MOE_KEY_DIGEST);
    mcf->admin_keys = ngx_array_create(cf->pool, 1, NGX_HTTP_MOE_KEY_DIGEST);

    if (mcf->keys == NULL || mcf->admin_keys == NULL) {
        return NGX_ERROR;
    }

    for (i = 0; i < c->n_api_keys; i++) {
        if (ngx_http_moe_gate_add(mcf->keys, (u_char *) c->api_keys[i],
                                  ngx_strlen(c->api_keys[i]))
            != NGX_OK)
        {
            return NGX_ERROR;
        }
    }

    for (i = 0; i < c->n_admin_api_keys; i++) {
        if (ngx_http_moe_gate_add(mcf->admin_keys,
                                  (u_char *) c->admin_api_keys[i],
                                  ngx_strlen(c->admin_api_keys[i]))
            != NGX_OK)
        {
            return NGX_ERROR;
        }
    }

    if (c->api_key_file[0]
        && ngx_http_moe_gate_file(cf, c->api_key_file, "api_key_file",
                                  mcf->keys)
           != NGX_OK)
    {
        return NGX_ERROR;
    }

    if (c->admin_api_key_file[0]
        && ngx_http_moe_gate_file(cf, c->admin_api_key_file,
                                  "admin_api_key_file", mcf->admin_keys)
           != NGX_OK)
    {
        return NGX_ERROR;
    }

    /* a key file, even an empty one, turns the keys on: never fail open */

    mcf->auth = (c->n_api_keys || c->n_admin_api_keys || c->api_key_file[0]
                 || c->admin_api_key_file[0]);
    mcf->admin_auth = (c->n_admin_api_keys || c->admin_api_key_file[0]);

    ngx_explicit_memzero(c->api_keys, sizeof(c->api_keys));
    ngx_explicit_memzero(c->admin_api_keys, sizeof(c->admin_api_keys));

    return NGX_OK;
}


/* one key a line; blank lines and lines starting with '#' are skipped */

static ngx_int_t
ngx_http_moe_gate_file(ngx_conf_t *cf, const char *path, const char *what,
    ngx_array_t *digests)
{
    char       *data;
    size_t      len;
    u_char     *p, *last, *start, *end;
    ngx_int_t   rc;

    data = moe_read_file(path, &len);

    if (data == NULL) {
        ngx_conf_log_error(NGX_LOG_EMERG, cf, ngx_errno,
                           "moe_engine: server.%s \"%s\" cannot be read",
                           what, path);
        return NGX_ERROR;
    }

    rc = NGX_OK;
    p = (u_char *) data;
    last = p + len;

    while (p < last) {
        end = ngx_strlchr(p, last, '\n');
        if (end == NULL) {
            end = last;
        }

        start = p;
        p = end + 1;

        while (start < end && (*start == ' ' || *start == '\t')) {
            start++;
        }

        while (end > start
               && (end[-1] == ' ' || end[-1] == '\t' || end[-1] == '\r'))
        {
            end--;
        }

        if (start == end || *start == '#') {
            continue;
        }

        if (ngx_strlchr(start, end, '\0') != NULL) {
            ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                               "moe_engine: server.%s \"%s\" holds a NUL "
                               "byte", what, path);
            rc = NGX_ERROR;
            break;
        }

        if (ngx_http_moe_gate_add(digests, start, end - start) != NGX_OK) {
            rc = NGX_ERROR;
            break;
        }
    }

    ngx_explicit_memzero(data, len);
    free(data);

    return rc;
}


static ngx_int_t
ngx_http_moe_gate_add(ngx_array_t *digests, u_char *key, size_t len)
{
    u_char      *d;
    ngx_sha1_t   sha1;

    d = ngx_array_push(digests);
    if (d == NULL) {
        return NGX_ERROR;
    }

    ngx_sha1_init(&sha1);
    ngx_sha1_update(&sha1, key, len);
    ngx_sha1_final(d, &sha1);

    return NGX_OK;
}


/* every digest is compared in full: no early exit */

static ngx_uint_t
ngx_http_moe_gate_match(ngx_array_t *digests, u_char *digest)
{
    u_char      *d, diff;
    ngx_uint_t   i, j, match;

    match = 0;
    d = digests->elts;

    for (i = 0; i < digests->nelts; i++) {
        diff = 0;

        for (j = 0; j < NGX_HTTP_MOE_KEY_DIGEST; j++) {
            diff |= d[i * NGX_HTTP_MOE_KEY_DIGEST + j] ^ digest[j];
        }

        match |= (ngx_uint_t) (diff == 0);
    }

    return match;
}


static ngx_uint_t
ngx_http_moe_gate_class(ngx_http_request_t *r)
{
    ngx_str_t                *s;
    ngx_http_moe_loc_conf_t  *mlcf;

    if (r->uri.len == sizeof("/health") - 1
        && ngx_strncmp(r->uri.data, "/health", r->uri.len) == 0)
    {
        return NGX_HTTP_MOE_ROUTE_OPEN;
    }

    if (r->uri.len == sizeof("/metrics") - 1
        && ngx_strncmp(r->uri.data, "/metrics", r->uri.len) == 0)
    {
        mlcf = ngx_http_moe_loc_conf(r);

        return mlcf->metrics;
    }

    for (s = ngx_http_moe_admin_routes; s->len; s++) {
        if (r->uri.len == s->len
            && ngx_strncmp(r->uri.data, s->data, s->len) == 0)
        {
            return NGX_HTTP_MOE_ROUTE_ADMIN;
        }
    }

    return NGX_HTTP_MOE_ROUTE_KEY;
}


/*
 * The access check for every API request: NGX_DECLINED when it may go on,
 * else what the content handler returns (a 401 or 403 with an OpenAI error
 * body has been sent).  With no keys configured everything is open.
 */

ngx_int_t
ngx_http_moe_gate_auth(ngx_http_request_t *r)
{
    u_char                    *p, *last;
    u_char                     digest[NGX_HTTP_MOE_KEY_DIGEST];
    ngx_uint_t                 cls, user, admin;
    ngx_sha1_t                 sha1;
    ngx_table_elt_t           *h;
    ngx_http_moe_main_conf_t  *mcf;

    mcf = ngx_http_moe_main_conf(r);

    if (!mcf->auth) {
        return NGX_DECLINED;
    }

    cls = ngx_http_moe_gate_class(r);

    if (cls == NGX_HTTP_MOE_ROUTE_OPEN) {
        return NGX_DECLINED;
    }

    h = r->headers_in.authorization;

    if (h == NULL) {
        return ngx_http_moe_gate_refuse(r, NGX_HTTP_UNAUTHORIZED,
                                        "no API key: send it in the "
                                        "Authorization header as "
                                        "\"Bearer YOUR_KEY\"");
    }

    p = h->value.data;
    last = p + h->value.len;

    if (h->value.len < sizeof("Bearer ") - 1
        || ngx_strncasecmp(p, (u_char *) "Bearer ", sizeof("Bearer ") - 1)
           != 0)
    {
        return ngx_http_moe_gate_refuse(r, NGX_HTTP_UNAUTHORIZED,
                                        "the Authorization header must be "
                                        "\"Bearer YOUR_KEY\"");
    }

    p += sizeof("Bearer ") - 1;

    while (p < last && *p == ' ') {
        p++;
    }

    while (last > p && last[-1] == ' ') {
        last--;
    }

    ngx_sha1_init(&sha1);
    ngx_sha1_update(&sha1, p, last - p);
    ngx_sha1_final(digest, &sha1);

    admin = ngx_http_moe_gate_match(mcf->admin_keys, digest);
    user = ngx_http_moe_gate_match(mcf->keys, digest);

    if (!admin && !user) {
        return ngx_http_moe_gate_refuse(r, NGX_HTTP_UNAUTHORIZED,
                                        "incorrect API key provided");
    }

    if (cls == NGX_HTTP_MOE_ROUTE_ADMIN && !admin) {
        return ngx_http_moe_gate_refuse(r, NGX_HTTP_FORBIDDEN,
                                        mcf->admin_auth
                                        ? "this endpoint needs the admin "
                                          "API key"
                                        : "this endpoint needs the admin "
                                          "API key and none is configured "
                                          "(server.admin_api_key)");
    }

    return NGX_DECLINED;
}


static ngx_int_t
ngx_http_moe_gate_refuse(ngx_http_request_t *r, ngx_uint_t status,
    const char *fmt)
{
    ngx_int_t           rc;
    ngx_table_elt_t    *h;
    ngx_http_moe_err_t  err;

    rc = ngx_http_discard_request_body(r);
    if (rc != NGX_OK) {
        return rc;
    }

    (void) ngx_http_moe_fail(&err, status, NULL, "%s", fmt);

    /* OpenAI's own answers to a bad key */
    err.type = "invalid_request_error";
    err.code = "invalid_api_key";

    if (status == NGX_HTTP_FORBIDDEN) {
        err.type = "permission_error";
        err.code = "insufficient_permissions";

    } else {
        h = ngx_list_push(&r->headers_out.headers);
        if (h == NULL) {
            return NGX_HTTP_INTERNAL_SERVER_ERROR;
        }

        h->hash = 1;
        ngx_str_set(&h->key, "WWW-Authenticate");
        ngx_str_set(&h->value, "Bearer");
    }

    return ngx_http_moe_send_err(r, &err);
}


/*
 * The body size limit.  moe_max_body_size is the core's
 * client_max_body_size in an API location (see the merge in
 * ngx_http_moe_module.c), so nginx itself stops reading at the limit,
 * chunked bodies too: it checks every chunk's size before reading it, so
 * nothing past the limit is ever buffered or written to a temporary file.
 * The core answers that 413 with an HTML page; these filters make it the
 * API's OpenAI JSON error instead.
 */

ngx_int_t
ngx_http_moe_gate_init(ngx_conf_t *cf)
{
    ngx_http_next_header_filter = ngx_http_top_header_filter;
    ngx_http_top_header_filter = ngx_http_moe_gate_header_filter;

    ngx_http_next_body_filter = ngx_http_top_body_filter;
    ngx_http_top_body_filter = ngx_http_moe_gate_body_filter;

    return NGX_OK;
}


static ngx_int_t
ngx_http_moe_gate_header_filter(ngx_http_request_t *r)
{
    size_t                    len;
    yajl_gen                  g;
    ngx_buf_t                *b;
    ngx_chain_t              *cl;
    ngx_http_moe_ctx_t       *ctx;
    ngx_http_moe_err_t        err;
    const unsigned char      *buf;
    ngx_http_moe_loc_conf_t  *mlcf;

    mlcf = ngx_http_moe_loc_conf(r);

    if (r != r->main
        || r->err_status != NGX_HTTP_REQUEST_ENTITY_TOO_LARGE
        || mlcf == NULL
        || mlcf->enable != 1)
    {
        return ngx_http_next_header_filter(r);
    }

    ctx = ngx_http_moe_get_ctx(r);

    if (ctx == NULL) {
        ctx = ngx_http_moe_ctx_create(r);
        if (ctx == NULL) {
            return NGX_ERROR;
        }
    }

    /* a chunked body's content_length_n counts what was read so far */

    if (!r->headers_in.chunked && r->headers_in.content_length_n >= 0) {
        (void) ngx_http_moe_fail(&err, NGX_HTTP_REQUEST_ENTITY_TOO_LARGE,
                                 NULL, "request body is too large: %O "
                                 "bytes, the limit is %uz",
                                 r->headers_in.content_length_n,
                                 mlcf->max_body_size);
    } else {
        (void) ngx_http_moe_fail(&err, NGX_HTTP_REQUEST_ENTITY_TOO_LARGE,
                                 NULL, "request body is too large: the "
                                 "limit is %uz bytes (chunked body "
                                 "refused as it crossed it)",
                                 mlcf->max_body_size);
    }

    g = ngx_http_moe_gen_create(r);
    if (g == NULL) {
        return NGX_ERROR;
    }

    ngx_http_moe_gen_error(g, &err);

    if (yajl_gen_get_buf(g, &buf, &len) != yajl_gen_status_ok) {
        return NGX_ERROR;
    }

    b = ngx_create_temp_buf(r->pool, len);
    cl = ngx_alloc_chain_link(r->pool);

    if (b == NULL || cl == NULL) {
        return NGX_ERROR;
    }

    b->last = ngx_cpymem(b->pos, buf, len);
    b->last_buf = 1;
    b->last_in_chain = 1;

    cl->buf = b;
    cl->next = NULL;

    ctx->gate_body = cl;

    ngx_str_set(&r->headers_out.content_type, "application/json");
    r->headers_out.content_type_len = r->headers_out.content_type.len;
    r->headers_out.content_type_lowcase = NULL;

    ngx_http_clear_content_length(r);
    r->headers_out.content_length_n = len;

    return ngx_http_next_header_filter(r);
}


/* the core's HTML page goes, the JSON error body goes out once instead */

static ngx_int_t
ngx_http_moe_gate_body_filter(ngx_http_request_t *r, ngx_chain_t *in)
{
    ngx_chain_t         *out;
    ngx_http_moe_ctx_t  *ctx;

    ctx = ngx_http_moe_get_ctx(r);

    if (ctx == NULL || r != r->main || !(ctx->gate_body || ctx->gate_sent)) {
        return ngx_http_next_body_filter(r, in);
    }

    if (ctx->gate_sent) {
        /* the rest of the HTML page; flushes still go through */
        return in ? NGX_OK : ngx_http_next_body_filter(r, NULL);
    }

    out = ctx->gate_body;
    ctx->gate_body = NULL;
    ctx->gate_sent = 1;

    return ngx_http_next_body_filter(r, out);
}
