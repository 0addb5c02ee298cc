
/*
 * Copyright (C) LocalMoE contributors
 */


#include <ngx_config.h>
#include <ngx_core.h>
#include <ngx_http.h>

#include "ngx_http_moe_module.h"


static void ngx_http_moe_gen_cleanup(void *data);
static void ngx_http_moe_tree_cleanup(void *data);
static ngx_int_t ngx_http_moe_json_depth(u_char *p, u_char *last);
static const char *ngx_http_moe_json_dup(yajl_val v);
static int ngx_http_moe_key_cmp(const void *a, const void *b);
static const char *ngx_http_moe_error_type(ngx_uint_t status);


static ngx_str_t  ngx_http_moe_json_type = ngx_string("application/json");


yajl_gen
ngx_http_moe_gen_create(ngx_http_request_t *r)
{
    yajl_gen             g;
    ngx_pool_cleanup_t  *cln;

    cln = ngx_pool_cleanup_add(r->pool, 0);
    if (cln == NULL) {
        return NULL;
    }

    g = yajl_gen_alloc(NULL);
    if (g == NULL) {
        return NULL;
    }

    cln->handler = ngx_http_moe_gen_cleanup;
    cln->data = g;

    return g;
}


static void
ngx_http_moe_gen_cleanup(void *data)
{
    yajl_gen_free(data);
}


ngx_int_t
ngx_http_moe_send_gen(ngx_http_request_t *r, ngx_uint_t status, yajl_gen g)
{
    size_t                len;
    const unsigned char  *buf;

    if (yajl_gen_get_buf(g, &buf, &len) != yajl_gen_status_ok) {
        return NGX_HTTP_INTERNAL_SERVER_ERROR;
    }

    return ngx_http_moe_send_text(r, status, &ngx_http_moe_json_type,
                                  (u_char *) buf, len);
}


/* sends a complete response; the data is copied */

ngx_int_t
ngx_http_moe_send_text(ngx_http_request_t *r, ngx_uint_t status,
    ngx_str_t *type, u_char *data, size_t len)
{
    ngx_int_t     rc;
    ngx_buf_t    *b;
    ngx_chain_t   out;

    r->headers_out.status = status;
    r->headers_out.content_length_n = len;
    r->headers_out.content_type = *type;
    r->headers_out.content_type_len = type->len;
    r->headers_out.content_type_lowcase = NULL;

    rc = ngx_http_send_header(r);

    if (rc == NGX_ERROR || rc > NGX_OK || r->header_only) {
        return rc;
    }

    b = ngx_create_temp_buf(r->pool, len ? len : 1);
    if (b == NULL) {
        return NGX_ERROR;
    }

    b->last = ngx_cpymem(b->pos, data, len);
    b->last_buf = (r == r->main) ? 1 : 0;
    b->last_in_chain = 1;

    out.buf = b;
    out.next = NULL;

    return ngx_http_output_filter(r, &out);
}


static const char *
ngx_http_moe_error_type(ngx_uint_t status)
{
    if (status >= 500) {
        return "server_error";
    }

    if (status == NGX_HTTP_UNAUTHORIZED) {
        return "authentication_error";
    }

    return "invalid_request_error";
}


/* fills *err and returns NGX_DECLINED, so parsers can "return fail(...)" */

ngx_int_t
ngx_http_moe_fail(ngx_http_moe_err_t *err, ngx_uint_t status,
    const char *param, const char *fmt, ...)
{
    u_char   *p;
    va_list   args;

    va_start(args, fmt);
    p = ngx_vslprintf(err->msg, err->msg + sizeof(err->msg), fmt, args);
    va_end(args);

    err->len = p - err->msg;
    err->status = status;
    err->param = param;
    err->type = ngx_http_moe_error_type(status);

    switch (status) {

    case NGX_HTTP_SERVICE_UNAVAILABLE:
        err->code = "service_unavailable";
        break;

    case NGX_HTTP_REQUEST_ENTITY_TOO_LARGE:
        err->code = "request_too_large";
        break;

    default:
        err->code = NULL;
    }

    return NGX_DECLINED;
}


void
ngx_http_moe_gen_error(yajl_gen g, ngx_http_moe_err_t *err)
{
    yajl_gen_map_open(g);
    ngx_http_moe_gen_lit(g, "error");
    yajl_gen_map_open(g);

    ngx_http_moe_gen_lit(g, "message");
    ngx_http_moe_gen_str(g, err->msg, err->len);

    ngx_http_moe_gen_lit(g, "type");
    ngx_http_moe_gen_cstr(g, err->type);

    ngx_http_moe_gen_lit(g, "param");
    if (err->param) {
        ngx_http_moe_gen_cstr(g, err->param);
    } else {
        yajl_gen_null(g);
    }

    ngx_http_moe_gen_lit(g, "code");
    if (err->code) {
        ngx_http_moe_gen_cstr(g, err->code);
    } else {
        yajl_gen_null(g);
    }

    yajl_gen_map_close(g);
    yajl_gen_map_close(g);
}


ngx_int_t
ngx_http_moe_send_err(ngx_http_request_t *r, ngx_http_moe_err_t *err)
{
    yajl_gen  g;

    g = ngx_http_moe_gen_create(r);
    if (g == NULL) {
        return NGX_HTTP_INTERNAL_SERVER_ERROR;
    }

    ngx_http_moe_gen_error(g, err);

    return ngx_http_moe_send_gen(r, err->status, g);
}


ngx_int_t
ngx_http_moe_send_error(ngx_http_request_t *r, ngx_uint_t status,
    const char *param, const char *fmt, ...)
{
    u_char              *p;
    va_list              args;
    ngx_http_moe_err_t   err;

    va_start(args, fmt);
    p = ngx_vslprintf(err.msg, err.msg + sizeof(err.msg), fmt, args);
    va_end(args);

    (void) ngx_http_moe_fail(&err, status, param, "%*s",
                             (size_t) (p - err.msg), err.msg);

    return ngx_http_moe_send_err(r, &err);
}


/*
 * Parses a request body.  yajl_tree_parse() wants a C string and frees
 * trees recursively, so NUL bytes and deep nesting are refused before it
 * runs; the tree is freed with the request pool.
 */

ngx_int_t
ngx_http_moe_json_parse(ngx_http_request_t *r, u_char *data, size_t len,
    yajl_val *root, ngx_http_moe_err_t *err)
{
    char                 msg[256];
    yajl_val             v;
    const char          *dup;
    ngx_pool_cleanup_t  *cln;

    if (len == 0) {
        return ngx_http_moe_fail(err, NGX_HTTP_BAD_REQUEST, NULL,
                                 "request body is empty: expected a JSON "
                                 "object");
    }

    if (ngx_strlchr(data, data + len, '\0') != NULL) {
        return ngx_http_moe_fail(err, NGX_HTTP_BAD_REQUEST, NULL,
                                 "request body is not valid JSON: "
                                 "NUL byte");
    }

    switch (ngx_http_moe_json_depth(data, data + len)) {

    case NGX_OK:
        break;

    case NGX_DECLINED:
        /*
         * yajl_tree hands strings over NUL terminated: a \u0000 would cut
         * a prompt or make "name\u0000zzz" a model name; refused, never
         * truncated
         */
        return ngx_http_moe_fail(err, NGX_HTTP_BAD_REQUEST, NULL,
                                 "request body holds a NUL character "
                                 "(\\u0000) in a string, which is not "
                                 "supported");

    default:
        return ngx_http_moe_fail(err, NGX_HTTP_BAD_REQUEST, NULL,
                                 "request body is nested deeper than %d "
                                 "levels", NGX_HTTP_MOE_MAX_DEPTH);
    }

    cln = ngx_pool_cleanup_add(r->pool, 0);
    if (cln == NULL) {
        return NGX_ERROR;
    }

    msg[0] = '\0';

    /* data is NUL terminated by the body reader */
    v = yajl_tree_parse((const char *) data, msg, sizeof(msg));

    if (v == NULL) {
        /* yajl's message spans lines: keep the first one */
        msg[strcspn(msg, "\r\n")] = '\0';

        return ngx_http_moe_fail(err, NGX_HTTP_BAD_REQUEST, NULL,
                                 "request body is not valid JSON: %s",
                                 msg[0] ? msg : "parse error");
    }

    cln->handler = ngx_http_moe_tree_cleanup;
    cln->data = v;

    if (!YAJL_IS_OBJECT(v)) {
        return ngx_http_moe_fail(err, NGX_HTTP_BAD_REQUEST, NULL,
                                 "request body must be a JSON object");
    }

    /* yajl_tree keeps both of a duplicated key and lookups see the first */

    dup = ngx_http_moe_json_dup(v);

    if (dup == (const char *) -1) {
        return NGX_ERROR;
    }

    if (dup) {
        return ngx_http_moe_fail(err, NGX_HTTP_BAD_REQUEST, dup,
                                 "request body is not valid: duplicate key "
                                 "\"%s\" in a JSON object", dup);
    }

    *root = v;

    return NGX_OK;
}


/*
 * A JSON text found inside a request (a string field that holds JSON, as
 * an assistant tool call's "arguments"), NUL terminated: its tree, or
 * NULL when it is not JSON, holds a \u0000, or is nested deeper than
 * NGX_HTTP_MOE_MAX_DEPTH.  The body's own depth check does not see inside
 * strings, and yajl_tree_free() recurses once per level: 800 KB of '['
 * killed the worker.  The caller frees the tree with yajl_tree_free().
 */

yajl_val
ngx_http_moe_json_parse_text(const char *text)
{
    u_char  *p = (u_char *) text;

    if (ngx_http_moe_json_depth(p, p + ngx_strlen(p)) != NGX_OK) {
        return NULL;
    }

    return yajl_tree_parse(text, NULL, 0);
}


static void
ngx_http_moe_tree_cleanup(void *data)
{
    yajl_tree_free(data);
}


/*
 * NGX_ERROR: nested deeper than NGX_HTTP_MOE_MAX_DEPTH; NGX_DECLINED: a
 * string holds a \u0000 escape
 */

static ngx_int_t
ngx_http_moe_json_depth(u_char *p, u_char *last)
{
    ngx_int_t   depth;
    ngx_uint_t  in_string;

    depth = 0;
    in_string = 0;

    for ( /* void */ ; p < last; p++) {

        if (in_string) {
            if (*p == '\\') {
                p++;

                if (last - p >= 5 && p[0] == 'u'
                    && ngx_strncmp(p + 1, "0000", 4) == 0)
                {
                    return NGX_DECLINED;
                }

            } else if (*p == '"') {
                in_string = 0;
            }

            continue;
        }

        switch (*p) {

        case '"':
            in_string = 1;
            break;

        case '[':
        case '{':
            if (++depth > NGX_HTTP_MOE_MAX_DEPTH) {
                return NGX_ERROR;
            }
            break;

        case ']':
        case '}':
            depth--;
            break;
        }
    }

    return NGX_OK;
}


/*
 * The first key found twice in an object anywhere in the tree, NULL if
 * none, (const char *) -1 when out of memory.  Small objects are checked
 * pairwise, large ones sorted, so a body of many keys costs n log n.
 */

static const char *
ngx_http_moe_json_dup(yajl_val v)
{
    size_t        i, j, n;
    const char  **keys, *dup;

    if (YAJL_IS_ARRAY(v)) {
        for (i = 0; i < v->u.array.len; i++) {
            dup = ngx_http_moe_json_dup(v->u.array.values[i]);
            if (dup) {
                return dup;
            }
        }

        return NULL;
    }

    if (!YAJL_IS_OBJECT(v)) {
        return NULL;
    }

    n = v->u.object.len;

    if (n <= 16) {
        for (i = 1; i < n; i++) {
            for (j = 0; j < i; j++) {
                if (ngx_strcmp(v->u.object.keys[i], v->u.object.keys[j])
                    == 0)
                {
                    return v->u.object.keys[i];
                }
            }
        }

    } else {
        keys = ngx_alloc(n * sizeof(const char *), ngx_cycle->log);
        if (keys == NULL) {
            return (const char *) -1;
        }

        ngx_memcpy(keys, v->u.object.keys, n * sizeof(const char *));
        ngx_qsort(keys, n, sizeof(const char *), ngx_http_moe_key_cmp);

        dup = NULL;

        for (i = 1; i < n; i++) {
            if (ngx_strcmp(keys[i], keys[i - 1]) == 0) {
                dup = keys[i];
                break;
            }
        }

        ngx_free(keys);

        if (dup) {
            return dup;
        }
    }

    for (i = 0; i < n; i++) {
        dup = ngx_http_moe_json_dup(v->u.object.values[i]);
        if (dup) {
            return dup;
        }
    }

    return NULL;
}


static int
ngx_http_moe_key_cmp(const void *a, const void *b)
{
    return ngx_strcmp(*(const char **) a, *(const char **) b);
}


/* a member of an object; JSON null counts as absent */

yajl_val
ngx_http_moe_json_get(yajl_val obj, const char *key)
{
    yajl_val  v;

    v = ngx_http_moe_json_find(obj, key);

    return YAJL_IS_NULL(v) ? NULL : v;
}


yajl_val
ngx_http_moe_json_find(yajl_val obj, const char *key)
{
    size_t  i;

    if (!YAJL_IS_OBJECT(obj)) {
        return NULL;
    }

    for (i = 0; i < obj->u.object.len; i++) {
        if (ngx_strcmp(obj->u.object.keys[i], key) == 0) {
            return obj->u.object.values[i];
        }
    }

    return NULL;
}


/* an integer; 3.0 is accepted as 3, as OpenAI's own validation does */

ngx_int_t
ngx_http_moe_json_int(yajl_val v, int64_t *out)
{
    double  d;

    if (YAJL_IS_INTEGER(v)) {
        *out = YAJL_GET_INTEGER(v);
        return NGX_OK;
    }

    if (YAJL_IS_DOUBLE(v)) {
        d = YAJL_GET_DOUBLE(v);

        if (d >= -9.0e15 && d <= 9.0e15 && d == (double) (int64_t) d) {
            *out = (int64_t) d;
            return NGX_OK;
        }
    }

    return NGX_ERROR;
}


ngx_int_t
ngx_http_moe_json_number(yajl_val v, double *out)
{
    if (YAJL_IS_INTEGER(v)) {
        *out = (double) YAJL_GET_INTEGER(v);
        return NGX_OK;
    }

    if (YAJL_IS_DOUBLE(v)) {
        *out = YAJL_GET_DOUBLE(v);
        return NGX_OK;
    }

    return NGX_ERROR;
}


ngx_int_t
ngx_http_moe_json_bool(yajl_val v, ngx_uint_t *out)
{
    if (YAJL_IS_TRUE(v)) {
        *out = 1;
        return NGX_OK;
    }

    if (YAJL_IS_FALSE(v)) {
        *out = 0;
        return NGX_OK;
    }

    return NGX_ERROR;
}


/*
 * An array of token ids, each in [0, vocab).  Returns NGX_DECLINED for a
 * wrong type or an id out of range, NGX_ERROR when out of memory.
 */

ngx_int_t
ngx_http_moe_json_ids(yajl_val v, int vocab, int32_t **ids, size_t *n,
    ngx_pool_t *pool)
{
    size_t    i;
    int64_t   id;
    int32_t  *p;

    if (!YAJL_IS_ARRAY(v)) {
        return NGX_DECLINED;
    }

    p = ngx_palloc(pool, (v->u.array.len + 1) * sizeof(int32_t));
    if (p == NULL) {
        return NGX_ERROR;
    }

    for (i = 0; i < v->u.array.len; i++) {
        if (ngx_http_moe_json_int(v->u.array.values[i], &id) != NGX_OK
            || id < 0 || id >= vocab)
        {
            return NGX_DECLINED;
        }

        p[i] = (int32_t) id;
    }

    *ids = p;
    *n = v->u.array.len;

    return NGX_OK;
}


/*
 * Chat messages: a non-empty array of {role, content}; content is a
 * string, an array of {"type":"text","text":...} parts (joined with "\n"
 * as vLLM does) or null for an assistant turn.
 */

ngx_int_t
ngx_http_moe_messages(ngx_http_request_t *r, yajl_val v,
    moe_chat_msg_t **msgs, ngx_int_t *n, ngx_http_moe_err_t *err)
{
    size_t           i, j, len;
    u_char          *p;
    yajl_val         m, role, content, part, type, text;
    moe_chat_msg_t  *out;

    static const char  *roles[] = {
        "system", "user", "assistant", "tool", "developer", NULL
    };

    if (!YAJL_IS_ARRAY(v)) {
        return ngx_http_moe_fail(err, NGX_HTTP_BAD_REQUEST, "messages",
                                 "messages must be an array");
    }

    if (v->u.array.len == 0) {
        return ngx_http_moe_fail(err, NGX_HTTP_BAD_REQUEST, "messages",
                                 "messages must not be empty");
    }

    out = ngx_pcalloc(r->pool, v->u.array.len * sizeof(moe_chat_msg_t));
    if (out == NULL) {
        return NGX_ERROR;
    }

    for (i = 0; i < v->u.array.len; i++) {
        m = v->u.array.values[i];

        if (!YAJL_IS_OBJECT(m)) {
            return ngx_http_moe_fail(err, NGX_HTTP_BAD_REQUEST, "messages",
                                     "messages[%uz] must be an object", i);
        }

        role = ngx_http_moe_json_get(m, "role");

        if (!YAJL_IS_STRING(role)) {
            return ngx_http_moe_fail(err, NGX_HTTP_BAD_REQUEST, "messages",
                                     "messages[%uz].role must be a string",
                                     i);
        }

        for (j = 0; roles[j]; j++) {
            if (ngx_strcmp(role->u.string, roles[j]) == 0) {
                break;
            }
        }

        if (roles[j] == NULL) {
            return ngx_http_moe_fail(err, NGX_HTTP_BAD_REQUEST, "messages",
                                     "messages[%uz].role \"%s\" is not one of "
                                     "system, user, assistant, tool, "
                                     "developer", i, role->u.string);
        }

        out[i].role = role->u.string;

        content = ngx_http_moe_json_find(m, "content");

        if (content == NULL || YAJL_IS_NULL(content)) {
            if (ngx_strcmp(role->u.string, "assistant") != 0) {
                return ngx_http_moe_fail(err, NGX_HTTP_BAD_REQUEST,
                                         "messages",
                                         "messages[%uz].content is required",
                                         i);
            }

            out[i].content = "";
            out[i].content_len = 0;
            continue;
        }

        if (YAJL_IS_STRING(content)) {
            out[i].content = content->u.string;
            out[i].content_len = ngx_strlen(content->u.string);
            continue;
        }

        if (!YAJL_IS_ARRAY(content)) {
            return ngx_http_moe_fail(err, NGX_HTTP_BAD_REQUEST, "messages",
                                     "messages[%uz].content must be a string "
                                     "or an array of text parts", i);
        }

        len = 0;

        for (j = 0; j < content->u.array.len; j++) {
            part = content->u.array.values[j];
            type = ngx_http_moe_json_get(part, "type");
            text = ngx_http_moe_json_get(part, "text");

            if (!YAJL_IS_STRING(type)
                || ngx_strcmp(type->u.string, "text") != 0)
            {
                return ngx_http_moe_fail(err, NGX_HTTP_BAD_REQUEST,
                                         "messages",
                                         "messages[%uz].content[%uz]: only "
                                         "parts of type \"text\" are "
                                         "supported", i, j);
            }

            if (!YAJL_IS_STRING(text)) {
                return ngx_http_moe_fail(err, NGX_HTTP_BAD_REQUEST,
                                         "messages",
                                         "messages[%uz].content[%uz].text "
                                         "must be a string", i, j);
            }

            len += ngx_strlen(text->u.string) + 1;
        }

        p = ngx_pnalloc(r->pool, len + 1);
        if (p == NULL) {
            return NGX_ERROR;
        }

        out[i].content = (const char *) p;

        for (j = 0; j < content->u.array.len; j++) {
            text = ngx_http_moe_json_get(content->u.array.values[j], "text");

            if (j) {
                *p++ = '\n';
            }

            p = ngx_cpymem(p, text->u.string, ngx_strlen(text->u.string));
        }

        *p = '\0';
        out[i].content_len = p - (u_char *) out[i].content;
    }

    *msgs = out;
    *n = v->u.array.len;

    return NGX_OK;
}
