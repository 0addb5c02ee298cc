
/*
 * Copyright (C) LocalMoE contributors
 */


#include <ngx_config.h>
#include <ngx_core.h>
#include <ngx_http.h>

#include "ngx_http_moe_module.h"


typedef ngx_int_t (*ngx_http_moe_get_pt)(ngx_http_request_t *r);
typedef ngx_int_t (*ngx_http_moe_post_pt)(ngx_http_request_t *r,
    yajl_val root);


typedef struct {
    ngx_str_t                  uri;
    ngx_http_moe_get_pt        get;
    ngx_http_moe_post_pt       post;
} ngx_http_moe_route_t;


typedef struct {
    const char                *name;
    size_t                     offset;      /* a float in moe_sampling_t */
    double                     min;
    double                     max;
    ngx_uint_t                 min_open;    /* min itself not allowed */
    const char                *range;
} ngx_http_moe_float_param_t;


/* what a request field that the server does not honour may hold */
typedef enum {
    NGX_HTTP_MOE_FIELD_ANY = 0,     /* any value but null changes output */
    NGX_HTTP_MOE_FIELD_ARRAY,       /* an array; [] is off */
    NGX_HTTP_MOE_FIELD_FALSE,       /* a boolean; false is off */
    NGX_HTTP_MOE_FIELD_STRING,      /* a string; "" is off */
    NGX_HTTP_MOE_FIELD_INT,         /* an integer; off is off, below it is
                                       an error */
    NGX_HTTP_MOE_FIELD_BOOL,        /* a boolean, no effect on output */
    NGX_HTTP_MOE_FIELD_TEXT,        /* a string, no effect on output */
    NGX_HTTP_MOE_FIELD_OBJECT       /* an object, no effect on output */
} ngx_http_moe_field_e;


typedef struct {
    const char                *name;
    ngx_http_moe_field_e       kind;
    int64_t                    off;
} ngx_http_moe_field_t;


typedef struct {
    moe_sampling_t             sp;
    ngx_uint_t                 chat;
    int64_t                    max_tokens;  /* -1: not given */
    const char                *max_tokens_name;
    ngx_uint_t                 stream;
    ngx_uint_t                 include_usage;
    ngx_uint_t                 continuous_usage;
    ngx_uint_t                 add_special_tokens;
    ngx_uint_t                 skip_special_tokens;
    const char                *stops[MOE_MAX_STOP];
    int                        n_stops;

    /* tools, tool_choice, functions (ngx_http_moe_tools.c) */
    ngx_http_moe_tools_t       tools;
    ngx_uint_t                 skip_special_given;

    /* guided decoding: the guide a pool thread compiles (cached) */
    moe_guided_kind_t          guide_kind;
    const char                *guide_spec;
    size_t                     guide_len;
    const char                *guide_param;
    int32_t                   *ids;         /* prompt ids given with a
                                               guide: kept while the guide
                                               compiles */
    size_t                     n_ids;
    /* logprobs and echo (ngx_http_moe_lp_params), n and best_of
     * (ngx_http_moe_n_params) */
    ngx_uint_t                 n;
    ngx_uint_t                 best_of;
    ngx_uint_t                 echo;
    u_char                    *echo_text;
    size_t                     echo_len;
} ngx_http_moe_params_t;


static ngx_http_moe_route_t *ngx_http_moe_route(ngx_http_request_t *r);
static void ngx_http_moe_body_handler(ngx_http_request_t *r);
static void ngx_http_moe_body_read(ngx_http_request_t *r,
    ngx_http_moe_text_t *t);
static ngx_int_t ngx_http_moe_post(ngx_http_request_t *r, ngx_str_t *body);
static ngx_int_t ngx_http_moe_read_body(ngx_http_request_t *r,
    ngx_str_t *body, ngx_http_moe_err_t *err);
static ngx_int_t ngx_http_moe_completions(ngx_http_request_t *r,
    yajl_val root);
static ngx_int_t ngx_http_moe_chat(ngx_http_request_t *r, yajl_val root);
static ngx_int_t ngx_http_moe_switch(ngx_http_request_t *r, yajl_val root);
static ngx_int_t ngx_http_moe_generate(ngx_http_request_t *r, yajl_val root,
    ngx_uint_t chat);
static void ngx_http_moe_prompt_done(ngx_http_request_t *r,
    ngx_http_moe_text_t *t);
static ngx_int_t ngx_http_moe_answer(ngx_http_request_t *r, ngx_int_t rc,
    ngx_http_moe_err_t *err);
static ngx_int_t ngx_http_moe_params(ngx_http_request_t *r, yajl_val root,
    ngx_uint_t chat, ngx_http_moe_params_t *p, ngx_http_moe_err_t *err);
static ngx_int_t ngx_http_moe_fields(yajl_val root, ngx_uint_t chat,
    ngx_http_moe_err_t *err);
static ngx_int_t ngx_http_moe_params_tools(ngx_http_request_t *r,
    yajl_val root, ngx_http_moe_params_t *p, ngx_http_moe_err_t *err);
static ngx_int_t ngx_http_moe_guided(ngx_http_request_t *r, yajl_val root,
    ngx_http_moe_params_t *p, ngx_http_moe_err_t *err);
static ngx_int_t ngx_http_moe_guided_text(ngx_http_request_t *r, yajl_val v,
    ngx_http_moe_params_t *p);
static ngx_int_t ngx_http_moe_lp_params(yajl_val root, ngx_uint_t chat,
    ngx_http_moe_params_t *p, ngx_http_moe_err_t *err);
static ngx_int_t ngx_http_moe_n_params(ngx_http_request_t *r, yajl_val root,
    ngx_uint_t chat, ngx_http_moe_params_t *p, ngx_http_moe_err_t *err);
static ngx_int_t ngx_http_moe_logit_bias(ngx_http_request_t *r, yajl_val v,
    int vocab, moe_sampling_t *sp, ngx_http_moe_err_t *err);
static ngx_int_t ngx_http_moe_prompt(ngx_http_request_t *r, yajl_val root,
    ngx_http_moe_params_t *p, int32_t **ids, size_t *n,
    ngx_http_moe_err_t *err);
static ngx_int_t ngx_http_moe_submit(ngx_http_request_t *r,
    ngx_http_moe_params_t *p, int32_t *ids, size_t n,
    ngx_http_moe_err_t *err);


static ngx_http_moe_route_t  ngx_http_moe_routes[] = {

    { ngx_string("/v1/completions"), NULL, ngx_http_moe_completions },
    { ngx_string("/v1/chat/completions"), NULL, ngx_http_moe_chat },
    { ngx_string("/v1/models"), ngx_http_moe_models, NULL },
    { ngx_string("/v1/models/switch"), NULL, ngx_http_moe_switch },
    { ngx_string("/health"), ngx_http_moe_health, NULL },
    { ngx_string("/tokenize"), NULL, ngx_http_moe_tokenize },
    { ngx_string("/detokenize"), NULL, ngx_http_moe_detokenize },
    { ngx_string("/v1/stats/memory"), ngx_http_moe_stats_memory, NULL },
    { ngx_string("/v1/stats/performance"),
      ngx_http_moe_stats_performance, NULL },
    { ngx_string("/metrics"), ngx_http_moe_metrics, NULL },
    { ngx_null_string, NULL, NULL }
};


/* GET /v1/models/{id}: the served name may itself contain slashes */
static ngx_http_moe_route_t  ngx_http_moe_model_route =
    { ngx_string("/v1/models/"), ngx_http_moe_model, NULL };


static ngx_http_moe_float_param_t  ngx_http_moe_float_params[] = {

    { "temperature", offsetof(moe_sampling_t, temperature),
      0, 2, 0, "[0, 2]" },
    { "top_p", offsetof(moe_sampling_t, top_p), 0, 1, 1, "(0, 1]" },
    { "min_p", offsetof(moe_sampling_t, min_p), 0, 1, 0, "[0, 1]" },
    { "presence_penalty", offsetof(moe_sampling_t, presence_penalty),
      -2, 2, 0, "[-2, 2]" },
    { "frequency_penalty", offsetof(moe_sampling_t, frequency_penalty),
      -2, 2, 0, "[-2, 2]" },
    { "repetition_penalty", offsetof(moe_sampling_t, repetition_penalty),
      0, 2, 1, "(0, 2]" },
    { NULL, 0, 0, 0, 0, NULL }
};


/*
 * Request fields with a value the server does not honour yet: refused with
 * a 400 naming them rather than ignored, except the values that mean "off"
 * (null always counts as absent).  Fields with no effect on the output are
 * only type-checked.  Unknown fields are ignored, as OpenAI clients send
 * vendor extensions.  Fields with more shapes (modalities, logprobs) are
 * checked in ngx_http_moe_fields() itself; guided decoding's (guided_*,
 * response_format) in ngx_http_moe_guided(); tools, tool_choice,
 * functions and function_call in ngx_http_moe_tools.c.
 */

static ngx_http_moe_field_t  ngx_http_moe_fields_table[] = {

    { "suffix", NGX_HTTP_MOE_FIELD_STRING, 0 },
    { "min_tokens", NGX_HTTP_MOE_FIELD_INT, 0 },
    { "audio", NGX_HTTP_MOE_FIELD_ANY, 0 },
    { "prediction", NGX_HTTP_MOE_FIELD_ANY, 0 },
    { "web_search_options", NGX_HTTP_MOE_FIELD_ANY, 0 },
    { "prompt_logprobs", NGX_HTTP_MOE_FIELD_ANY, 0 },
    { "structured_outputs", NGX_HTTP_MOE_FIELD_ANY, 0 },
    { "parallel_tool_calls", NGX_HTTP_MOE_FIELD_BOOL, 0 },
    { "store", NGX_HTTP_MOE_FIELD_BOOL, 0 },
    { "user", NGX_HTTP_MOE_FIELD_TEXT, 0 },
    { "metadata", NGX_HTTP_MOE_FIELD_OBJECT, 0 },
    /* strict checking (tools helper): the rest of OpenAI's chat fields */
    { "service_tier", NGX_HTTP_MOE_FIELD_TEXT, 0 },
    { "prompt_cache_key", NGX_HTTP_MOE_FIELD_TEXT, 0 },
    { "safety_identifier", NGX_HTTP_MOE_FIELD_TEXT, 0 },
    { "reasoning_effort", NGX_HTTP_MOE_FIELD_ANY, 0 },
    { "verbosity", NGX_HTTP_MOE_FIELD_ANY, 0 },
    { NULL, NGX_HTTP_MOE_FIELD_ANY, 0 }
};


static ngx_str_t  ngx_http_moe_allow_get = ngx_string("GET, HEAD");
static ngx_str_t  ngx_http_moe_allow_post = ngx_string("POST");


ngx_int_t
ngx_http_moe_handler(ngx_http_request_t *r)
{
    ngx_int_t                  rc;
    ngx_str_t                 *allow;
    ngx_table_elt_t           *h;
    ngx_http_moe_route_t      *route;
    ngx_http_moe_main_conf_t  *mcf;

    /* API keys first: an unknown route is no answer to a stranger */

    rc = ngx_http_moe_gate_auth(r);
    if (rc != NGX_DECLINED) {
        return rc;
    }

    route = ngx_http_moe_route(r);

    if (route == NULL) {
        rc = ngx_http_discard_request_body(r);
        if (rc != NGX_OK) {
            return rc;
        }

        return ngx_http_moe_send_error(r, NGX_HTTP_NOT_FOUND, NULL,
                                       "no route for %V", &r->uri);
    }

    if ((route->get && !(r->method & (NGX_HTTP_GET|NGX_HTTP_HEAD)))
        || (route->post && r->method != NGX_HTTP_POST))
    {
        rc = ngx_http_discard_request_body(r);
        if (rc != NGX_OK) {
            return rc;
        }

        allow = route->get ? &ngx_http_moe_allow_get
                           : &ngx_http_moe_allow_post;

        h = ngx_list_push(&r->headers_out.headers);
        if (h == NULL) {
            return NGX_HTTP_INTERNAL_SERVER_ERROR;
        }

        h->hash = 1;
        ngx_str_set(&h->key, "Allow");
        h->value = *allow;

        return ngx_http_moe_send_error(r, NGX_HTTP_NOT_ALLOWED, NULL,
                                       "method %V is not allowed for %V "
                                       "(use %V)", &r->method_name,
                                       &r->uri, allow);
    }

    mcf = ngx_http_moe_main_conf(r);

    /* no instance serves yet (loading, failed): 503 with the reason,
     * Retry-After while loading; a switch is the admin's way out */

    if (ngx_http_moe_inst_any(mcf) == NULL
        && route->post != ngx_http_moe_switch)
    {
        rc = ngx_http_discard_request_body(r);
        if (rc != NGX_OK) {
            return rc;
        }

        if (route->get == ngx_http_moe_health) {
            return ngx_http_moe_health(r);
        }

        return ngx_http_moe_inst_unavailable(r, mcf);
    }

    if (route->get) {
        rc = ngx_http_discard_request_body(r);
        if (rc != NGX_OK) {
            return rc;
        }

        return route->get(r);
    }

    /* the body limit (moe_max_body_size) is the core's
     * client_max_body_size in this location: nginx enforces it while
     * reading, and ngx_http_moe_gate.c gives its 413 the JSON body */

    rc = ngx_http_read_client_request_body(r, ngx_http_moe_body_handler);

    if (rc >= NGX_HTTP_SPECIAL_RESPONSE) {
        return rc;
    }

    return NGX_DONE;
}


static ngx_http_moe_route_t *
ngx_http_moe_route(ngx_http_request_t *r)
{
    ngx_str_t             *prefix;
    ngx_http_moe_route_t  *route;

    for (route = ngx_http_moe_routes; route->uri.len; route++) {
        if (r->uri.len == route->uri.len
            && ngx_strncmp(r->uri.data, route->uri.data, r->uri.len) == 0)
        {
            return route;
        }
    }

    prefix = &ngx_http_moe_model_route.uri;

    if (r->uri.len > prefix->len
        && ngx_strncmp(r->uri.data, prefix->data, prefix->len) == 0)
    {
        return &ngx_http_moe_model_route;
    }

    return NULL;
}


static void
ngx_http_moe_body_handler(ngx_http_request_t *r)
{
    ngx_int_t            rc;
    ngx_str_t           *body;
    ngx_http_moe_err_t   err;

    body = ngx_pcalloc(r->pool, sizeof(ngx_str_t));

    if (body == NULL || ngx_http_moe_ctx_create(r) == NULL) {
        ngx_http_finalize_request(r, NGX_HTTP_INTERNAL_SERVER_ERROR);
        return;
    }

    rc = ngx_http_moe_read_body(r, body, &err);

    switch (rc) {

    case NGX_OK:
        rc = ngx_http_moe_post(r, body);
        break;

    case NGX_DECLINED:
        rc = ngx_http_moe_send_err(r, &err);
        break;

    case NGX_ERROR:
        rc = NGX_HTTP_INTERNAL_SERVER_ERROR;
        break;
    }

    if (rc == NGX_DONE) {
        /* a thread task or the engine's events go on with the request */
        return;
    }

    ngx_http_finalize_request(r, rc);
}


/* a pool thread read the part of the body that nginx had spilled to a file */

static void
ngx_http_moe_body_read(ngx_http_request_t *r, ngx_http_moe_text_t *t)
{
    ngx_int_t  rc;

    if (t->rc != MOE_OK) {
        ngx_log_error(NGX_LOG_ERR, r->connection->log, t->err,
                      "moe: cannot read request body from \"%V\"",
                      &r->request_body->temp_file->file.name);
        ngx_http_finalize_request(r, NGX_HTTP_INTERNAL_SERVER_ERROR);
        return;
    }

    rc = ngx_http_moe_post(r, t->data);

    if (rc == NGX_DONE) {
        return;
    }

    ngx_http_finalize_request(r, rc);
}


/*
 * The body as JSON to the POST route; returns what the request is to be
 * finalized with, or NGX_DONE when a thread task or the engine's events go
 * on with it.
 */

static ngx_int_t
ngx_http_moe_post(ngx_http_request_t *r, ngx_str_t *body)
{
    ngx_int_t              rc;
    yajl_val               root;
    ngx_http_moe_err_t     err;
    ngx_http_moe_route_t  *route;

    route = ngx_http_moe_route(r);

    if (route == NULL || route->post == NULL) {
        return NGX_HTTP_INTERNAL_SERVER_ERROR;
    }

    root = NULL;

    rc = ngx_http_moe_json_parse(r, body->data, body->len, &root, &err);

    if (rc == NGX_DECLINED) {
        return ngx_http_moe_send_err(r, &err);
    }

    if (rc != NGX_OK) {
        return NGX_HTTP_INTERNAL_SERVER_ERROR;
    }

    return route->post(r, root);
}


/*
 * The body may sit in memory buffers or in a temporary file; the parser
 * wants one NUL terminated string.  Memory is copied now; the file is read
 * on a pool thread (NGX_DONE: ngx_http_moe_body_read goes on).
 */

static ngx_int_t
ngx_http_moe_read_body(ngx_http_request_t *r, ngx_str_t *body,
    ngx_http_moe_err_t *err)
{
    off_t                      len;
    u_char                    *p;
    ngx_int_t                  rc;
    ngx_buf_t                 *b;
    ngx_uint_t                 nfiles;
    ngx_chain_t               *cl;
    ngx_http_moe_text_t       *t;
    ngx_http_moe_text_file_t  *f;

    len = 0;
    nfiles = 0;

    if (r->request_body) {
        for (cl = r->request_body->bufs; cl; cl = cl->next) {
            b = cl->buf;

            if (ngx_buf_in_memory(b)) {
                len += b->last - b->pos;

            } else if (b->in_file) {
                len += b->file_last - b->file_pos;
                nfiles++;
            }
        }
    }

    p = ngx_pnalloc(r->pool, (size_t) len + 1);
    if (p == NULL) {
        return NGX_ERROR;
    }

    body->data = p;
    body->len = (size_t) len;
    body->data[len] = '\0';

    t = NULL;
    f = NULL;

    if (nfiles) {
        t = ngx_http_moe_text_create(r, NGX_HTTP_MOE_TEXT_READ);
        if (t == NULL) {
            return NGX_ERROR;
        }

        f = ngx_pcalloc(r->pool, nfiles * sizeof(ngx_http_moe_text_file_t));
        if (f == NULL) {
            return NGX_ERROR;
        }

        t->files = f;
    }

    if (r->request_body) {
        for (cl = r->request_body->bufs; cl; cl = cl->next) {
            b = cl->buf;

            if (ngx_buf_in_memory(b)) {
                p = ngx_cpymem(p, b->pos, b->last - b->pos);

            } else if (b->in_file) {
                f->fd = b->file->fd;
                f->offset = b->file_pos;
                f->size = (size_t) (b->file_last - b->file_pos);
                f->dst = p;

                p += f->size;
                f++;
                t->n_files++;
            }
        }
    }

    if (t == NULL) {
        return NGX_OK;
    }

    rc = ngx_http_moe_text_post(r, t, ngx_http_moe_body_read, body, err);
    if (rc != NGX_OK) {
        return rc;
    }

    return NGX_DONE;
}


static ngx_int_t
ngx_http_moe_completions(ngx_http_request_t *r, yajl_val root)
{
    return ngx_http_moe_generate(r, root, 0);
}


static ngx_int_t
ngx_http_moe_chat(ngx_http_request_t *r, yajl_val root)
{
    return ngx_http_moe_generate(r, root, 1);
}


static ngx_int_t
ngx_http_moe_switch(ngx_http_request_t *r, yajl_val root)
{
    return ngx_http_moe_inst_switch(r, root);
}


static ngx_int_t
ngx_http_moe_generate(ngx_http_request_t *r, yajl_val root, ngx_uint_t chat)
{
    size_t                  n;
    int32_t                *ids;
    ngx_int_t               rc;
    ngx_http_moe_err_t      err;
    ngx_http_moe_params_t  *p;

    p = ngx_palloc(r->pool, sizeof(ngx_http_moe_params_t));
    if (p == NULL) {
        return ngx_http_moe_answer(r, NGX_ERROR, &err);
    }

    /* the instance "model" names (ngx_http_moe_inst.c): 404, or 503 while
     * it loads */
    rc = ngx_http_moe_check_model(r, root, &err);
    if (rc != NGX_OK) {
        return ngx_http_moe_answer(r, rc, &err);
    }

    /* 429 at once past the waiting limits (ngx_http_moe_admit.c) */
    rc = ngx_http_moe_admit(r, ngx_http_moe_get_ctx(r), &err);
    if (rc != NGX_OK) {
        return ngx_http_moe_answer(r, rc, &err);
    }

    rc = ngx_http_moe_params(r, root, chat, p, &err);

    if (rc == NGX_OK) {
        rc = ngx_http_moe_prompt(r, root, p, &ids, &n, &err);

        if (rc == NGX_DONE) {
            /* ngx_http_moe_prompt_done goes on */
            return NGX_DONE;
        }
    }

    if (rc == NGX_OK) {
        rc = ngx_http_moe_submit(r, p, ids, n, &err);
    }

    return ngx_http_moe_answer(r, rc, &err);
}


/* a pool thread made the prompt's token ids */

static void
ngx_http_moe_prompt_done(ngx_http_request_t *r, ngx_http_moe_text_t *t)
{
    size_t                  n;
    int32_t                *ids;
    ngx_int_t               rc;
    ngx_http_moe_err_t      err;
    ngx_http_moe_params_t  *p;

    p = t->data;

    if (t->guide_kind != MOE_GUIDED_NONE && t->guide_rc != MOE_OK) {
        if (t->guide_rc == MOE_ENOMEM) {
            rc = NGX_ERROR;

        } else {
            rc = ngx_http_moe_fail(&err, NGX_HTTP_BAD_REQUEST,
                                   p->guide_param, "%s: %s", p->guide_param,
                                   t->guide_msg[0] ? t->guide_msg
                                   : moe_strerror(t->guide_rc));
        }

    } else if (t->skip_encode) {
        ids = p->ids;
        n = p->n_ids;
        rc = NGX_OK;

    } else {
        rc = ngx_http_moe_text_ids(r, t, &ids, &n, &err);
    }

    /* the task keeps its reference until the pool goes; the engine takes
     * its own at submit */
    p->sp.guide = t->guide;

    if (rc == NGX_OK) {
        rc = ngx_http_moe_submit(r, p, ids, n, &err);
    }

    rc = ngx_http_moe_answer(r, rc, &err);

    if (rc == NGX_DONE) {
        /* the engine's events finish the request */
        return;
    }

    ngx_http_finalize_request(r, rc);
}


/* the error body for a failed step of a generation */

static ngx_int_t
ngx_http_moe_answer(ngx_http_request_t *r, ngx_int_t rc,
    ngx_http_moe_err_t *err)
{
    if (rc == NGX_DECLINED) {
        return ngx_http_moe_send_err(r, err);
    }

    if (rc == NGX_ERROR) {
        return ngx_http_moe_send_error(r, NGX_HTTP_INTERNAL_SERVER_ERROR,
                                       NULL, "internal error");
    }

    return rc;
}


static ngx_int_t
ngx_http_moe_params(ngx_http_request_t *r, yajl_val root, ngx_uint_t chat,
    ngx_http_moe_params_t *p, ngx_http_moe_err_t *err)
{
    size_t                       i;
    float                       *f;
    double                       d;
    int64_t                      k;
    yajl_val                     v, s;
    ngx_uint_t                   b;
    const char                  *name;
    ngx_http_moe_float_param_t  *fp;

    ngx_memzero(p, sizeof(ngx_http_moe_params_t));
    moe_sampling_defaults(&p->sp);

    p->chat = chat;
    p->max_tokens = -1;
    p->add_special_tokens = chat ? 0 : 1;
    p->skip_special_tokens = 1;

    if (ngx_http_moe_check_model(r, root, err) != NGX_OK) {
        return NGX_DECLINED;
    }

    v = ngx_http_moe_json_get(root, "stream");

    if (v && ngx_http_moe_json_bool(v, &p->stream) != NGX_OK) {
        return ngx_http_moe_fail(err, NGX_HTTP_BAD_REQUEST, "stream",
                                 "stream must be a boolean");
    }

    v = ngx_http_moe_json_get(root, "stream_options");

    if (v) {
        if (!YAJL_IS_OBJECT(v)) {
            return ngx_http_moe_fail(err, NGX_HTTP_BAD_REQUEST,
                                     "stream_options",
                                     "stream_options must be an object");
        }

        if (!p->stream) {
            return ngx_http_moe_fail(err, NGX_HTTP_BAD_REQUEST,
                                     "stream_options",
                                     "stream_options is only allowed when "
                                     "stream is true");
        }

        s = ngx_http_moe_json_get(v, "include_usage");

        if (s && ngx_http_moe_json_bool(s, &p->include_usage) != NGX_OK) {
            return ngx_http_moe_fail(err, NGX_HTTP_BAD_REQUEST,
                                     "stream_options",
                                     "stream_options.include_usage must be "
                                     "a boolean");
        }

        /* vLLM's usage in every chunk, with include_usage as vLLM */
        s = ngx_http_moe_json_get(v, "continuous_usage_stats");

        if (s && ngx_http_moe_json_bool(s, &p->continuous_usage) != NGX_OK) {
            return ngx_http_moe_fail(err, NGX_HTTP_BAD_REQUEST,
                                     "stream_options",
                                     "stream_options.continuous_usage_stats "
                                     "must be a boolean");
        }

        p->continuous_usage &= p->include_usage;
    }

    if (ngx_http_moe_fields(root, chat, err) != NGX_OK) {
        return NGX_DECLINED;
    }

    if (ngx_http_moe_guided(r, root, p, err) != NGX_OK
        || ngx_http_moe_lp_params(root, chat, p, err) != NGX_OK
        || ngx_http_moe_n_params(r, root, chat, p, err) != NGX_OK)
    {
        return NGX_DECLINED;
    }

    v = ngx_http_moe_json_get(root, "logit_bias");

    if (v && ngx_http_moe_logit_bias(r, v,
                                     ngx_http_moe_model_info(r)->vocab_size,
                                     &p->sp, err)
             != NGX_OK)
    {
        return NGX_DECLINED;
    }

    /* max_completion_tokens replaces the deprecated max_tokens */

    name = "max_completion_tokens";
    v = ngx_http_moe_json_get(root, name);

    if (v == NULL) {
        name = "max_tokens";
        v = ngx_http_moe_json_get(root, name);
    }

    if (v) {
        if (ngx_http_moe_json_int(v, &k) != NGX_OK) {
            return ngx_http_moe_fail(err, NGX_HTTP_BAD_REQUEST, name,
                                     "%s must be an integer", name);
        }

        if (k < 1) {
            return ngx_http_moe_fail(err, NGX_HTTP_BAD_REQUEST, name,
                                     "%s must be at least 1, got %L",
                                     name, k);
        }

        p->max_tokens = k;
        p->max_tokens_name = name;
    }

    for (fp = ngx_http_moe_float_params; fp->name; fp++) {
        v = ngx_http_moe_json_get(root, fp->name);

        if (v == NULL) {
            continue;
        }

        if (ngx_http_moe_json_number(v, &d) != NGX_OK) {
            return ngx_http_moe_fail(err, NGX_HTTP_BAD_REQUEST, fp->name,
                                     "%s must be a number", fp->name);
        }

        if (d < fp->min || d > fp->max || (fp->min_open && d == fp->min)) {
            return ngx_http_moe_fail(err, NGX_HTTP_BAD_REQUEST, fp->name,
                                     "%s must be in %s", fp->name,
                                     fp->range);
        }

        f = (float *) ((u_char *) &p->sp + fp->offset);
        *f = (float) d;
    }

    v = ngx_http_moe_json_get(root, "top_k");

    if (v) {
        if (ngx_http_moe_json_int(v, &k) != NGX_OK) {
            return ngx_http_moe_fail(err, NGX_HTTP_BAD_REQUEST, "top_k",
                                     "top_k must be an integer");
        }

        if (k < -1 || k > 0x7fffffff) {
            return ngx_http_moe_fail(err, NGX_HTTP_BAD_REQUEST, "top_k",
                                     "top_k must be -1 (disabled) or at "
                                     "least 1, got %L", k);
        }

        p->sp.top_k = (k <= 0) ? 0 : (int) k;
    }

    v = ngx_http_moe_json_get(root, "seed");

    if (v) {
        if (ngx_http_moe_json_int(v, &k) != NGX_OK) {
            return ngx_http_moe_fail(err, NGX_HTTP_BAD_REQUEST, "seed",
                                     "seed must be an integer");
        }

        p->sp.seed = (uint64_t) k;
        p->sp.has_seed = 1;
    }

    v = ngx_http_moe_json_get(root, "ignore_eos");

    if (v) {
        if (ngx_http_moe_json_bool(v, &b) != NGX_OK) {
            return ngx_http_moe_fail(err, NGX_HTTP_BAD_REQUEST, "ignore_eos",
                                     "ignore_eos must be a boolean");
        }

        p->sp.ignore_eos = (int) b;
    }

    v = ngx_http_moe_json_get(root, "add_special_tokens");

    if (v && ngx_http_moe_json_bool(v, &p->add_special_tokens) != NGX_OK) {
        return ngx_http_moe_fail(err, NGX_HTTP_BAD_REQUEST,
                                 "add_special_tokens",
                                 "add_special_tokens must be a boolean");
    }

    v = ngx_http_moe_json_get(root, "skip_special_tokens");
    p->skip_special_given = (v != NULL);

    if (v && ngx_http_moe_json_bool(v, &p->skip_special_tokens) != NGX_OK) {
        return ngx_http_moe_fail(err, NGX_HTTP_BAD_REQUEST,
                                 "skip_special_tokens",
                                 "skip_special_tokens must be a boolean");
    }

    v = ngx_http_moe_json_get(root, "stop");

    if (YAJL_IS_STRING(v)) {
        if (v->u.string[0] == '\0') {
            return ngx_http_moe_fail(err, NGX_HTTP_BAD_REQUEST, "stop",
                                     "stop strings must not be empty");
        }

        p->stops[p->n_stops++] = v->u.string;

    } else if (YAJL_IS_ARRAY(v)) {
        if (v->u.array.len > (size_t) NGX_HTTP_MOE_MAX_STOP) {
            return ngx_http_moe_fail(err, NGX_HTTP_BAD_REQUEST, "stop",
                                     "stop takes at most %d strings",
                                     NGX_HTTP_MOE_MAX_STOP);
        }

        for (i = 0; i < v->u.array.len; i++) {
            s = v->u.array.values[i];

            if (!YAJL_IS_STRING(s)) {
                return ngx_http_moe_fail(err, NGX_HTTP_BAD_REQUEST, "stop",
                                         "stop must be a string or an array "
                                         "of strings");
            }

            if (s->u.string[0] == '\0') {
                return ngx_http_moe_fail(err, NGX_HTTP_BAD_REQUEST, "stop",
                                         "stop strings must not be empty");
            }

            p->stops[p->n_stops++] = s->u.string;
        }

    } else if (v) {
        return ngx_http_moe_fail(err, NGX_HTTP_BAD_REQUEST, "stop",
                                 "stop must be a string or an array of "
                                 "strings");
    }

    v = ngx_http_moe_json_get(root, "stop_token_ids");

    if (v) {
        if (!YAJL_IS_ARRAY(v)) {
            return ngx_http_moe_fail(err, NGX_HTTP_BAD_REQUEST,
                                     "stop_token_ids",
                                     "stop_token_ids must be an array of "
                                     "token ids");
        }

        if (v->u.array.len > MOE_MAX_STOP_IDS) {
            return ngx_http_moe_fail(err, NGX_HTTP_BAD_REQUEST,
                                     "stop_token_ids",
                                     "stop_token_ids takes at most %d ids",
                                     MOE_MAX_STOP_IDS);
        }

        for (i = 0; i < v->u.array.len; i++) {
            if (ngx_http_moe_json_int(v->u.array.values[i], &k) != NGX_OK
                || k < 0 || k >= ngx_http_moe_model_info(r)->vocab_size)
            {
                return ngx_http_moe_fail(err, NGX_HTTP_BAD_REQUEST,
                                         "stop_token_ids",
                                         "stop_token_ids must be token ids "
                                         "in [0, %d)",
                                         ngx_http_moe_model_info(r)
                                             ->vocab_size);
            }

            p->sp.stop_token_ids[i] = (int32_t) k;
        }

        p->sp.n_stop_token_ids = (int) v->u.array.len;
    }

    if (ngx_http_moe_params_tools(r, root, p, err) != NGX_OK) {
        return NGX_DECLINED;
    }

    return NGX_OK;
}


/*
 * tools, tool_choice, functions, function_call (ngx_http_moe_tools.c).
 * The mistral and llama3_json parsers look for special tokens
 * ([TOOL_CALLS], <|python_tag|>), so they are kept in the text unless
 * the request says otherwise (as vLLM does for mistral).
 */

static ngx_int_t
ngx_http_moe_params_tools(ngx_http_request_t *r, yajl_val root,
    ngx_http_moe_params_t *p, ngx_http_moe_err_t *err)
{
    const char  *name;

    if (ngx_http_moe_tools_parse(r, root, p->chat, &p->tools, err)
        != NGX_OK)
    {
        return NGX_DECLINED;
    }

    /* required / named: the guided decoder forces the tools' schema */
    if (p->tools.guide_spec != NULL) {
        name = p->tools.legacy ? "function_call" : "tool_choice";

        if (p->guide_kind != MOE_GUIDED_NONE) {
            return ngx_http_moe_fail(err, NGX_HTTP_BAD_REQUEST, name,
                                     "%s forcing a call cannot be combined "
                                     "with %s", name, p->guide_param);
        }

        p->guide_kind = MOE_GUIDED_JSON;
        p->guide_spec = (const char *) p->tools.guide_spec;
        p->guide_len = p->tools.guide_len;
        p->guide_param = name;
    }

    if (!p->skip_special_given
        && (p->tools.format == MOE_TOOL_MISTRAL
            || p->tools.format == MOE_TOOL_LLAMA3_JSON))
    {
        p->skip_special_tokens = 0;
    }

    return NGX_OK;
}


/*
 * The fields the server does not honour yet (ngx_http_moe_fields_table and
 * the few with more shapes): NGX_OK when each is absent, null, or a value
 * that means "off"; else NGX_DECLINED with a 400 naming the field.
 */

static ngx_int_t
ngx_http_moe_fields(yajl_val root, ngx_uint_t chat, ngx_http_moe_err_t *err)
{
    size_t                 i;
    int64_t                k;
    yajl_val               v, s;
    const char            *name;
    ngx_http_moe_field_t  *f;

    for (f = ngx_http_moe_fields_table; f->name; f++) {
        name = f->name;
        v = ngx_http_moe_json_get(root, name);

        if (v == NULL) {
            continue;
        }

        switch (f->kind) {

        case NGX_HTTP_MOE_FIELD_ARRAY:
            if (!YAJL_IS_ARRAY(v)) {
                return ngx_http_moe_fail(err, NGX_HTTP_BAD_REQUEST, name,
                                         "%s must be an array", name);
            }

            if (v->u.array.len == 0) {
                continue;
            }

            break;

        case NGX_HTTP_MOE_FIELD_FALSE:
        case NGX_HTTP_MOE_FIELD_BOOL:
            if (!YAJL_IS_TRUE(v) && !YAJL_IS_FALSE(v)) {
                return ngx_http_moe_fail(err, NGX_HTTP_BAD_REQUEST, name,
                                         "%s must be a boolean", name);
            }

            if (f->kind == NGX_HTTP_MOE_FIELD_BOOL || YAJL_IS_FALSE(v)) {
                continue;
            }

            break;

        case NGX_HTTP_MOE_FIELD_STRING:
        case NGX_HTTP_MOE_FIELD_TEXT:
            if (!YAJL_IS_STRING(v)) {
                return ngx_http_moe_fail(err, NGX_HTTP_BAD_REQUEST, name,
                                         "%s must be a string", name);
            }

            if (f->kind == NGX_HTTP_MOE_FIELD_TEXT || v->u.string[0] == '\0') {
                continue;
            }

            break;

        case NGX_HTTP_MOE_FIELD_INT:
            if (ngx_http_moe_json_int(v, &k) != NGX_OK) {
                return ngx_http_moe_fail(err, NGX_HTTP_BAD_REQUEST, name,
                                         "%s must be an integer", name);
            }

            if (k < f->off) {
                return ngx_http_moe_fail(err, NGX_HTTP_BAD_REQUEST, name,
                                         "%s must be at least %L, got %L",
                                         name, f->off, k);
            }

            if (k == f->off) {
                continue;
            }

            return ngx_http_moe_fail(err, NGX_HTTP_BAD_REQUEST, name,
                                     "%s other than %L is not supported yet",
                                     name, f->off);

        case NGX_HTTP_MOE_FIELD_OBJECT:
            if (!YAJL_IS_OBJECT(v)) {
                return ngx_http_moe_fail(err, NGX_HTTP_BAD_REQUEST, name,
                                         "%s must be an object", name);
            }

            continue;

        default: /* NGX_HTTP_MOE_FIELD_ANY */
            break;
        }

        return ngx_http_moe_fail(err, NGX_HTTP_BAD_REQUEST, name,
                                 "%s is not supported yet", name);
    }

    v = ngx_http_moe_json_get(root, "modalities");

    if (v) {
        if (!YAJL_IS_ARRAY(v)) {
            return ngx_http_moe_fail(err, NGX_HTTP_BAD_REQUEST, "modalities",
                                     "modalities must be an array of "
                                     "strings");
        }

        for (i = 0; i < v->u.array.len; i++) {
            s = v->u.array.values[i];

            if (!YAJL_IS_STRING(s)) {
                return ngx_http_moe_fail(err, NGX_HTTP_BAD_REQUEST,
                                         "modalities",
                                         "modalities must be an array of "
                                         "strings");
            }

            if (ngx_strcmp(s->u.string, "text") != 0) {
                return ngx_http_moe_fail(err, NGX_HTTP_BAD_REQUEST,
                                         "modalities",
                                         "modalities other than \"text\" are "
                                         "not supported yet");
            }
        }
    }

    /* logprobs, top_logprobs, echo: ngx_http_moe_lp_params() */

    return NGX_OK;
}


/*
 * n (chat and completions) and best_of (completions) into p: n in
 * 1..min(MOE_MAX_CHOICES, max_num_seqs), best_of in n..that limit (the
 * engine runs best_of choices; the answer has the n with the highest
 * cumulative logprob), best_of > n not with stream (OpenAI's rule).
 * NGX_DECLINED with a 400 naming the field.
 */

static ngx_int_t
ngx_http_moe_n_params(ngx_http_request_t *r, yajl_val root, ngx_uint_t chat,
    ngx_http_moe_params_t *p, ngx_http_moe_err_t *err)
{
    int64_t                    k, limit;
    yajl_val                   v;
    ngx_http_moe_main_conf_t  *mcf;

    mcf = ngx_http_moe_main_conf(r);

    limit = ngx_min(MOE_MAX_CHOICES, mcf->config->max_num_seqs);

    p->n = 1;

    v = ngx_http_moe_json_get(root, "n");

    if (v) {
        if (ngx_http_moe_json_int(v, &k) != NGX_OK) {
            return ngx_http_moe_fail(err, NGX_HTTP_BAD_REQUEST, "n",
                                     "n must be an integer");
        }

        if (k < 1 || k > limit) {
            return ngx_http_moe_fail(err, NGX_HTTP_BAD_REQUEST, "n",
                                     "n must be in [1, %L], got %L",
                                     limit, k);
        }

        /* ngx_http_moe_guided ran first: a guide is already chosen */
        if (k > 1 && p->guide_kind != MOE_GUIDED_NONE) {
            return ngx_http_moe_fail(err, NGX_HTTP_BAD_REQUEST, "n",
                                     "n > 1 with guided decoding "
                                     "(response_format, guided_*, tools) "
                                     "is not supported yet");
        }

        p->n = (ngx_uint_t) k;
    }

    p->best_of = p->n;

    v = ngx_http_moe_json_get(root, "best_of");

    if (v == NULL) {
        return NGX_OK;
    }

    if (ngx_http_moe_json_int(v, &k) != NGX_OK) {
        return ngx_http_moe_fail(err, NGX_HTTP_BAD_REQUEST, "best_of",
                                 "best_of must be an integer");
    }

    if (chat) {
        if (k == 1) {
            return NGX_OK;
        }

        return ngx_http_moe_fail(err, NGX_HTTP_BAD_REQUEST, "best_of",
                                 "best_of is not supported on chat "
                                 "completions (a completions field)");
    }

    if (k < (int64_t) p->n || k > limit) {
        return ngx_http_moe_fail(err, NGX_HTTP_BAD_REQUEST, "best_of",
                                 "best_of must be in [n, %L] (n is %ui), "
                                 "got %L", limit, p->n, k);
    }

    if (k > (int64_t) p->n && p->stream) {
        return ngx_http_moe_fail(err, NGX_HTTP_BAD_REQUEST, "best_of",
                                 "best_of cannot be used with stream "
                                 "(choices are ranked once complete)");
    }

    p->best_of = (ngx_uint_t) k;

    return NGX_OK;
}


/*
 * logprobs, top_logprobs and echo into p.  Chat: logprobs a boolean,
 * top_logprobs 0-20 with logprobs true; completions: logprobs an integer
 * 0-5 (the top entries per token), echo a boolean (the prompt text, which
 * must then be text, before the completion; with logprobs also the
 * prompt tokens' logprobs, the first one null).  null is absent.
 * NGX_DECLINED with a 400 naming the field.
 */

static ngx_int_t
ngx_http_moe_lp_params(yajl_val root, ngx_uint_t chat,
    ngx_http_moe_params_t *p, ngx_http_moe_err_t *err)
{
    int64_t     k, top;
    yajl_val    v, t;
    ngx_uint_t  b;

    top = -1;

    v = ngx_http_moe_json_get(root, "logprobs");

    if (v && chat) {
        if (ngx_http_moe_json_bool(v, &b) != NGX_OK) {
            return ngx_http_moe_fail(err, NGX_HTTP_BAD_REQUEST, "logprobs",
                                     "logprobs must be a boolean");
        }

        p->sp.logprobs = (int) b;

    } else if (v && !YAJL_IS_FALSE(v)) {
        if (ngx_http_moe_json_int(v, &k) != NGX_OK) {
            return ngx_http_moe_fail(err, NGX_HTTP_BAD_REQUEST, "logprobs",
                                     "logprobs must be an integer");
        }

        if (k < 0 || k > 5) {
            return ngx_http_moe_fail(err, NGX_HTTP_BAD_REQUEST, "logprobs",
                                     "logprobs must be in [0, 5], got %L",
                                     k);
        }

        p->sp.logprobs = 1;
        p->sp.top_logprobs = (int) k;
    }

    v = ngx_http_moe_json_get(root, "top_logprobs");

    if (v) {
        if (ngx_http_moe_json_int(v, &top) != NGX_OK) {
            return ngx_http_moe_fail(err, NGX_HTTP_BAD_REQUEST,
                                     "top_logprobs",
                                     "top_logprobs must be an integer");
        }

        if (!chat) {
            return ngx_http_moe_fail(err, NGX_HTTP_BAD_REQUEST,
                                     "top_logprobs",
                                     "top_logprobs is a chat field: "
                                     "completions take logprobs (0-5)");
        }

        if (top < 0 || top > MOE_MAX_TOP_LOGPROBS) {
            return ngx_http_moe_fail(err, NGX_HTTP_BAD_REQUEST,
                                     "top_logprobs",
                                     "top_logprobs must be in [0, %d], "
                                     "got %L", MOE_MAX_TOP_LOGPROBS, top);
        }

        if (top > 0 && !p->sp.logprobs) {
            return ngx_http_moe_fail(err, NGX_HTTP_BAD_REQUEST,
                                     "top_logprobs",
                                     "top_logprobs requires logprobs to be "
                                     "true");
        }

        p->sp.top_logprobs = (int) top;
    }

    v = ngx_http_moe_json_get(root, "echo");

    if (v == NULL) {
        return NGX_OK;
    }

    if (ngx_http_moe_json_bool(v, &b) != NGX_OK) {
        return ngx_http_moe_fail(err, NGX_HTTP_BAD_REQUEST, "echo",
                                 "echo must be a boolean");
    }

    if (!b) {
        return NGX_OK;
    }

    if (chat) {
        return ngx_http_moe_fail(err, NGX_HTTP_BAD_REQUEST, "echo",
                                 "echo is not supported on chat "
                                 "completions (a completions field)");
    }

    /* the text to echo: a string prompt, or an array holding one */

    t = ngx_http_moe_json_get(root, "prompt");

    if (YAJL_IS_ARRAY(t) && t->u.array.len == 1) {
        t = t->u.array.values[0];
    }

    if (!YAJL_IS_STRING(t)) {
        return ngx_http_moe_fail(err, NGX_HTTP_BAD_REQUEST, "echo",
                                 "echo needs a text prompt (not token "
                                 "ids)");
    }

    p->echo = 1;
    p->echo_text = (u_char *) t->u.string;
    p->echo_len = ngx_strlen(t->u.string);
    p->sp.prompt_logprobs = p->sp.logprobs;

    return NGX_OK;
}


/*
 * Guided decoding: guided_json (a schema object or its JSON text),
 * guided_regex, guided_grammar (GBNF) and guided_choice (strings), as vLLM
 * names them, or response_format {"type": "json_object"} /
 * {"type": "json_schema", "json_schema": {"name", "schema", "strict"}} /
 * {"type": "text"}; at most one of them.  Only the shapes are checked
 * here: the guide compiles on a pool thread with the prompt (its errors
 * are the 400 of ngx_http_moe_prompt_done, param = the field).
 */

static ngx_int_t
ngx_http_moe_guided(ngx_http_request_t *r, yajl_val root,
    ngx_http_moe_params_t *p, ngx_http_moe_err_t *err)
{
    size_t                i, j;
    yajl_val              v, js, s;
    ngx_uint_t            n;
    const char           *name;
    moe_guided_kind_t     kind;

    static const char    *names[] = { "guided_json", "guided_regex",
                                      "guided_grammar", "guided_choice",
                                      "response_format" };
    static const moe_guided_kind_t  kinds[] = {
        MOE_GUIDED_JSON, MOE_GUIDED_REGEX, MOE_GUIDED_GRAMMAR,
        MOE_GUIDED_CHOICE, MOE_GUIDED_NONE
    };

    n = 0;

    for (i = 0; i < sizeof(names) / sizeof(names[0]); i++) {
        v = ngx_http_moe_json_get(root, names[i]);

        if (v == NULL || YAJL_IS_NULL(v)) {
            continue;
        }

        name = names[i];
        kind = kinds[i];

        switch (kind) {

        case MOE_GUIDED_JSON:
            if (!YAJL_IS_OBJECT(v) && !YAJL_IS_STRING(v)) {
                return ngx_http_moe_fail(err, NGX_HTTP_BAD_REQUEST, name,
                                         "guided_json must be a JSON Schema "
                                         "(an object or its JSON text)");
            }
            break;

        case MOE_GUIDED_REGEX:
        case MOE_GUIDED_GRAMMAR:
            if (!YAJL_IS_STRING(v) || v->u.string[0] == '\0') {
                return ngx_http_moe_fail(err, NGX_HTTP_BAD_REQUEST, name,
                                         "%s must be a non-empty string",
                                         name);
            }
            break;

        case MOE_GUIDED_CHOICE:
            if (!YAJL_IS_ARRAY(v) || v->u.array.len == 0) {
                return ngx_http_moe_fail(err, NGX_HTTP_BAD_REQUEST, name,
                                         "guided_choice must be a non-empty "
                                         "array of strings");
            }

            for (j = 0; j < v->u.array.len; j++) {
                if (!YAJL_IS_STRING(v->u.array.values[j])) {
                    return ngx_http_moe_fail(err, NGX_HTTP_BAD_REQUEST, name,
                                             "guided_choice must be a "
                                             "non-empty array of strings");
                }
            }

            break;

        default:        /* response_format */
            s = ngx_http_moe_json_get(v, "type");

            if (!YAJL_IS_OBJECT(v) || !YAJL_IS_STRING(s)) {
                return ngx_http_moe_fail(err, NGX_HTTP_BAD_REQUEST, name,
                                         "response_format must be an object "
                                         "with a string \"type\"");
            }

            if (ngx_strcmp(s->u.string, "text") == 0) {
                continue;
            }

            if (ngx_strcmp(s->u.string, "json_object") == 0) {
                kind = MOE_GUIDED_JSON_OBJECT;
                break;
            }

            if (ngx_strcmp(s->u.string, "json_schema") != 0) {
                return ngx_http_moe_fail(err, NGX_HTTP_BAD_REQUEST, name,
                                         "response_format.type must be "
                                         "\"text\", \"json_object\" or "
                                         "\"json_schema\"");
            }

            js = ngx_http_moe_json_get(v, "json_schema");

            if (!YAJL_IS_OBJECT(js)) {
                return ngx_http_moe_fail(err, NGX_HTTP_BAD_REQUEST, name,
                                         "response_format json_schema needs "
                                         "a \"json_schema\" object");
            }

            s = ngx_http_moe_json_get(js, "name");

            if (s != NULL && !YAJL_IS_STRING(s)) {
                return ngx_http_moe_fail(err, NGX_HTTP_BAD_REQUEST, name,
                                         "response_format.json_schema.name "
                                         "must be a string");
            }

            s = ngx_http_moe_json_get(js, "strict");

            if (s != NULL && !YAJL_IS_TRUE(s) && !YAJL_IS_FALSE(s)
                && !YAJL_IS_NULL(s))
            {
                return ngx_http_moe_fail(err, NGX_HTTP_BAD_REQUEST, name,
                                         "response_format.json_schema.strict "
                                         "must be a boolean");
            }

            v = ngx_http_moe_json_get(js, "schema");

            if (v == NULL) {
                kind = MOE_GUIDED_JSON_OBJECT;      /* any object */
                break;
            }

            if (!YAJL_IS_OBJECT(v)) {
                return ngx_http_moe_fail(err, NGX_HTTP_BAD_REQUEST, name,
                                         "response_format.json_schema.schema "
                                         "must be an object");
            }

            kind = MOE_GUIDED_JSON;
            break;
        }

        if (++n > 1) {
            return ngx_http_moe_fail(err, NGX_HTTP_BAD_REQUEST, name,
                                     "only one of guided_json, "
                                     "guided_regex, guided_grammar, "
                                     "guided_choice and response_format "
                                     "may be given");
        }

        p->guide_kind = kind;
        p->guide_param = name;

        if (kind == MOE_GUIDED_JSON_OBJECT) {
            p->guide_spec = "";
            p->guide_len = 0;

        } else if (YAJL_IS_STRING(v)) {
            p->guide_spec = v->u.string;
            p->guide_len = ngx_strlen(v->u.string);

        } else if (ngx_http_moe_guided_text(r, v, p) != NGX_OK) {
            return ngx_http_moe_fail(err, NGX_HTTP_INTERNAL_SERVER_ERROR,
                                     NULL, "out of memory");
        }
    }

    return NGX_OK;
}


static void
ngx_http_moe_guided_gen(yajl_gen g, yajl_val v)
{
    size_t  i;

    if (YAJL_IS_STRING(v)) {
        yajl_gen_string(g, (const u_char *) v->u.string,
                        ngx_strlen(v->u.string));

    } else if (YAJL_IS_NUMBER(v)) {
        yajl_gen_number(g, v->u.number.r, ngx_strlen(v->u.number.r));

    } else if (YAJL_IS_TRUE(v) || YAJL_IS_FALSE(v)) {
        yajl_gen_bool(g, YAJL_IS_TRUE(v));

    } else if (YAJL_IS_ARRAY(v)) {
        yajl_gen_array_open(g);

        for (i = 0; i < v->u.array.len; i++) {
            ngx_http_moe_guided_gen(g, v->u.array.values[i]);
        }

        yajl_gen_array_close(g);

    } else if (YAJL_IS_OBJECT(v)) {
        yajl_gen_map_open(g);

        for (i = 0; i < v->u.object.len; i++) {
            yajl_gen_string(g, (const u_char *) v->u.object.keys[i],
                            ngx_strlen(v->u.object.keys[i]));
            ngx_http_moe_guided_gen(g, v->u.object.values[i]);
        }

        yajl_gen_map_close(g);

    } else {
        yajl_gen_null(g);
    }
}


/* v (a schema object or a choice array) as JSON text in r->pool */

static ngx_int_t
ngx_http_moe_guided_text(ngx_http_request_t *r, yajl_val v,
    ngx_http_moe_params_t *p)
{
    size_t          len;
    u_char         *s;
    yajl_gen        g;
    const u_char   *buf;

    g = yajl_gen_alloc(NULL);
    if (g == NULL) {
        return NGX_ERROR;
    }

    ngx_http_moe_guided_gen(g, v);

    yajl_gen_get_buf(g, &buf, &len);

    s = ngx_pnalloc(r->pool, len + 1);
    if (s == NULL) {
        yajl_gen_free(g);
        return NGX_ERROR;
    }

    ngx_memcpy(s, buf, len);
    s[len] = '\0';

    yajl_gen_free(g);

    p->guide_spec = (const char *) s;
    p->guide_len = len;

    return NGX_OK;
}


/*
 * logit_bias: an object mapping token ids (decimal strings) in [0, vocab)
 * to numbers in [-100, 100], at most MOE_MAX_LOGIT_BIAS entries, into sp.
 * NGX_DECLINED with a 400 naming logit_bias when malformed.
 */

static ngx_int_t
ngx_http_moe_logit_bias(ngx_http_request_t *r, yajl_val v, int vocab,
    moe_sampling_t *sp, ngx_http_moe_err_t *err)
{
    size_t       i;
    float       *bias;
    double       d;
    int32_t     *ids;
    ngx_int_t    id;
    const char  *key;

    if (!YAJL_IS_OBJECT(v)) {
        return ngx_http_moe_fail(err, NGX_HTTP_BAD_REQUEST, "logit_bias",
                                 "logit_bias must be an object mapping "
                                 "token ids to numbers");
    }

    if (v->u.object.len > MOE_MAX_LOGIT_BIAS) {
        return ngx_http_moe_fail(err, NGX_HTTP_BAD_REQUEST, "logit_bias",
                                 "logit_bias takes at most %d entries",
                                 MOE_MAX_LOGIT_BIAS);
    }

    if (v->u.object.len == 0) {
        sp->n_logit_bias = 0;
        return NGX_OK;
    }

    /* the request's until moe_engine_submit(), which copies them */
    ids = ngx_palloc(r->pool, v->u.object.len * sizeof(int32_t));
    bias = ngx_palloc(r->pool, v->u.object.len * sizeof(float));
    if (ids == NULL || bias == NULL) {
        return ngx_http_moe_fail(err, NGX_HTTP_INTERNAL_SERVER_ERROR, NULL,
                                 "out of memory");
    }

    for (i = 0; i < v->u.object.len; i++) {
        key = v->u.object.keys[i];
        id = ngx_atoi((u_char *) key, ngx_strlen(key));

        if (id == NGX_ERROR || id >= vocab) {
            return ngx_http_moe_fail(err, NGX_HTTP_BAD_REQUEST, "logit_bias",
                                     "logit_bias keys must be token ids in "
                                     "[0, %d), got \"%s\"", vocab, key);
        }

        if (ngx_http_moe_json_number(v->u.object.values[i], &d) != NGX_OK
            || !(d >= -100.0 && d <= 100.0))
        {
            return ngx_http_moe_fail(err, NGX_HTTP_BAD_REQUEST, "logit_bias",
                                     "logit_bias values must be numbers in "
                                     "[-100, 100] (token \"%s\")", key);
        }

        ids[i] = (int32_t) id;
        bias[i] = (float) d;
    }

    sp->logit_bias_ids = ids;
    sp->logit_bias = bias;
    sp->n_logit_bias = (int) v->u.object.len;

    return NGX_OK;
}


/*
 * The prompt as token ids in r->pool: given as ids (NGX_OK), or text or
 * messages for a pool thread to render and encode (NGX_DONE:
 * ngx_http_moe_prompt_done goes on).
 */

static ngx_int_t
ngx_http_moe_prompt(ngx_http_request_t *r, yajl_val root,
    ngx_http_moe_params_t *p, int32_t **ids, size_t *n,
    ngx_http_moe_err_t *err)
{
    yajl_val                   v, first;
    ngx_int_t                  rc;
    ngx_http_moe_text_t       *t;

    t = ngx_http_moe_text_create(r, NGX_HTTP_MOE_TEXT_ENCODE);
    if (t == NULL) {
        return NGX_ERROR;
    }

    t->add_special_tokens = p->add_special_tokens;

    t->guide_kind = p->guide_kind;
    t->guide_spec = p->guide_spec;
    t->guide_len = p->guide_len;

    if (p->chat) {
        v = ngx_http_moe_json_get(root, "messages");

        if (v == NULL) {
            return ngx_http_moe_fail(err, NGX_HTTP_BAD_REQUEST, "messages",
                                     "messages is required");
        }

        rc = ngx_http_moe_messages(r, v, &t->msgs, &t->n_msgs, err);
        if (rc != NGX_OK) {
            return rc;
        }

        /* tools and tool calls: the template sees them as JSON */
        rc = ngx_http_moe_tools_prompt(r, v, t->msgs, &p->tools, t, err);
        if (rc != NGX_OK) {
            return rc;
        }

        t->add_generation_prompt = 1;

        goto post;
    }

    v = ngx_http_moe_json_get(root, "prompt");

    if (v == NULL) {
        return ngx_http_moe_fail(err, NGX_HTTP_BAD_REQUEST, "prompt",
                                 "prompt is required");
    }

    if (YAJL_IS_ARRAY(v)) {
        if (v->u.array.len == 0) {
            return ngx_http_moe_fail(err, NGX_HTTP_BAD_REQUEST, "prompt",
                                     "prompt must not be empty");
        }

        first = v->u.array.values[0];

        if (YAJL_IS_STRING(first) || YAJL_IS_ARRAY(first)) {
            if (v->u.array.len > 1) {
                return ngx_http_moe_fail(err, NGX_HTTP_BAD_REQUEST,
                                         "prompt",
                                         "batched prompts are not "
                                         "supported yet");
            }

            v = first;
        }
    }

    if (YAJL_IS_STRING(v)) {
        t->text = (u_char *) v->u.string;
        t->len = ngx_strlen(v->u.string);

        goto post;
    }

    if (!YAJL_IS_ARRAY(v)) {
        return ngx_http_moe_fail(err, NGX_HTTP_BAD_REQUEST, "prompt",
                                 "prompt must be a string, an array of "
                                 "token ids, or an array holding one of "
                                 "those");
    }

    rc = ngx_http_moe_json_ids(v, ngx_http_moe_model_info(r)->vocab_size,
                               ids, n, r->pool);

    if (rc == NGX_DECLINED) {
        return ngx_http_moe_fail(err, NGX_HTTP_BAD_REQUEST, "prompt",
                                 "prompt token ids must be integers in "
                                 "[0, %d)",
                                 ngx_http_moe_model_info(r)->vocab_size);
    }

    if (rc != NGX_OK || p->guide_kind == MOE_GUIDED_NONE) {
        return rc;
    }

    /* the ids are ready, the guide is compiled on the pool all the same */

    p->ids = *ids;
    p->n_ids = *n;
    t->skip_encode = 1;

post:

    rc = ngx_http_moe_text_post(r, t, ngx_http_moe_prompt_done, p, err);
    if (rc != NGX_OK) {
        return rc;
    }

    return NGX_DONE;
}


static ngx_int_t
ngx_http_moe_submit(ngx_http_request_t *r, ngx_http_moe_params_t *p,
    int32_t *ids, size_t n, ngx_http_moe_err_t *err)
{
    int                        rc;
    u_char                    *s;
    size_t                     max_len;
    ngx_uint_t                 chat;
    uint64_t                   rnd;
    const char                *prefix;
    ngx_http_moe_ctx_t        *ctx;
    ngx_http_moe_loc_conf_t   *mlcf;
    ngx_http_moe_main_conf_t  *mcf;

    mcf = ngx_http_moe_main_conf(r);
    mlcf = ngx_http_moe_loc_conf(r);

    chat = p->chat;
    max_len = (size_t) ngx_http_moe_model_info(r)->max_model_len;

    if (n == 0) {
        return ngx_http_moe_fail(err, NGX_HTTP_BAD_REQUEST,
                                 chat ? "messages" : "prompt",
                                 "The prompt cannot be empty");
    }

    if (p->max_tokens < 0) {
        if (n >= max_len) {
            return ngx_http_moe_fail(err, NGX_HTTP_BAD_REQUEST,
                                     chat ? "messages" : "prompt",
                                     "This model's maximum context length "
                                     "is %uz tokens. However, you requested "
                                     "%uz tokens in the messages, Please "
                                     "reduce the length of the messages.",
                                     max_len, n);
        }

        p->max_tokens = (int64_t) (max_len - n);

    } else if ((uint64_t) p->max_tokens + n > max_len) {
        return ngx_http_moe_fail(err, NGX_HTTP_BAD_REQUEST,
                                 p->max_tokens_name,
                                 "This model's maximum context length is "
                                 "%uz tokens. However, you requested %uL "
                                 "tokens (%uz in the messages, %L in the "
                                 "completion). Please reduce the length of "
                                 "the messages or completion.",
                                 max_len, (uint64_t) p->max_tokens + n, n,
                                 p->max_tokens);
    }

    p->sp.max_tokens = (int) p->max_tokens;

    /* made with the request body (ngx_http_moe_body_handler) */
    ctx = ngx_http_moe_get_ctx(r);

    rc = ngx_http_moe_admit_tokens(r, ctx, n, err);
    if (rc != NGX_OK) {
        return rc;
    }

    ctx->id = mcf->next_id++;
    ctx->chat = chat;
    ctx->stream = p->stream;
    ctx->include_usage = p->include_usage;
    ctx->continuous_usage = p->continuous_usage;
    ctx->n_prompt = (ngx_int_t) n;
    ctx->created = ngx_time();

    ctx->logprobs = p->sp.logprobs ? 1 : 0;
    ctx->lp_top = (ngx_uint_t) p->sp.top_logprobs;
    ctx->echo_on = p->echo;
    ctx->echo = p->echo_text;
    ctx->echo_len = p->echo_len;

    /* best_of ranks the choices by their cumulative logprob */
    p->sp.n_choices = (int) p->best_of;
    if (p->best_of > p->n) {
        p->sp.logprobs = 1;
    }
    ctx->keepalive_interval = mlcf->keepalive;

    ctx->model.data = (u_char *) ctx->eng->info->served_name;
    ctx->model.len = ngx_strlen(ctx->eng->info->served_name);

    prefix = chat ? "chatcmpl-" : "cmpl-";

    s = ngx_pnalloc(r->pool, sizeof("chatcmpl-") - 1 + 32);
    if (s == NULL) {
        return NGX_ERROR;
    }

    rnd = ((uint64_t) ngx_random() << 32) ^ (uint64_t) ngx_random();

    ctx->rid.data = s;
    ctx->rid.len = ngx_sprintf(s, "%s%016xL%016xL", prefix, rnd, ctx->id)
                   - s;

    ctx->gen = yajl_gen_alloc(NULL);
    if (ctx->gen == NULL) {
        return NGX_ERROR;
    }

    ctx->ts = moe_textstream_create(ctx->eng->tokenizer, p->stops, p->n_stops,
                                    (int) p->skip_special_tokens);
    if (ctx->ts == NULL) {
        return NGX_ERROR;
    }

    if (p->best_of > 1
        && p->tools.format != MOE_TOOL_NONE)
    {
        return ngx_http_moe_fail(err, NGX_HTTP_BAD_REQUEST, "n",
                                 "n > 1 with tools is not supported yet");
    }

    if (p->best_of > 1
        && ngx_http_moe_choices_init(ctx, p->best_of, p->n, p->stops,
                                     p->n_stops,
                                     (int) p->skip_special_tokens)
           != NGX_OK)
    {
        return NGX_ERROR;
    }

    /* tool calls in the output (ngx_http_moe_stream.c) */
    if (ngx_http_moe_stream_tools(ctx, &p->tools) != NGX_OK) {
        return NGX_ERROR;
    }

    rc = moe_engine_submit(ctx->eng->engine, ctx->id, ids, (int) n, &p->sp);

    switch (rc) {

    case MOE_OK:
        break;

    case MOE_EFULL:
        return ngx_http_moe_fail(err, NGX_HTTP_SERVICE_UNAVAILABLE, NULL,
                                 "the server is overloaded: the request "
                                 "queue is full, retry later");

    case MOE_ETOOLONG:
        return ngx_http_moe_fail(err, NGX_HTTP_BAD_REQUEST,
                                 chat ? "messages" : "prompt",
                                 "This model's maximum context length is "
                                 "%uz tokens. However, you requested %uz "
                                 "tokens in the messages, Please reduce "
                                 "the length of the messages.",
                                 max_len, n);

    case MOE_EINVAL:
        return ngx_http_moe_fail(err, NGX_HTTP_BAD_REQUEST, NULL,
                                 "the engine refused the request: %s",
                                 moe_strerror(rc));

    default:
        ngx_log_error(NGX_LOG_ERR, r->connection->log, 0,
                      "moe: submit failed: %s", moe_strerror(rc));

        return ngx_http_moe_fail(err, NGX_HTTP_INTERNAL_SERVER_ERROR, NULL,
                                 "the engine failed: %s", moe_strerror(rc));
    }

    ctx->live = 1;

    ngx_http_moe_register(ctx);

    /* a client that goes away finalizes the request: 499 and a cancel */
    r->read_event_handler = ngx_http_test_reading;

    return ngx_http_moe_stream_start(ctx);
}
