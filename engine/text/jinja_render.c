/*
 * The public render calls: set up a render context (arena, limits, the
 * error jump), fill the globals, run the template (jinja_eval.c).
 */

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <yajl/yajl_tree.h>

#include "text/jinja_int.h"
#include "util/json.h"


/* Runs the template with the globals `vars` filled by fill(). */
static int
moe_jj_render(const moe_jinja_tmpl_t *t,
    void (*fill)(moe_jj_ctx_t *c, moe_jv_dict_t *g, const void *arg),
    const void *arg, char **out, size_t *out_len, char *err, size_t errlen)
{
    moe_jj_ctx_t    *c;
    moe_jj_scope_t   global;
    int              rc;

    *out = NULL;
    *out_len = 0;
    c = calloc(1, sizeof(*c));
    if (c == NULL) {
        if (err != NULL && errlen > 0) {
            snprintf(err, errlen, "out of memory rendering the template");
        }
        return MOE_ENOMEM;
    }
    c->arena.cap = MOE_JJ_MAX_ARENA;

    if (setjmp(c->jb) == 0) {
        global.up = NULL;
        global.vars = moe_jv_dict(c).u.d;
        c->scope = &global;
        fill(c, global.vars, arg);
        moe_jj_exec(c, t->root);
        c->rc = MOE_OK;
        *out = malloc(c->len + 1);
        if (*out == NULL) {
            c->rc = MOE_ENOMEM;
            snprintf(c->err, sizeof(c->err), "out of memory rendering the "
                     "template");
        } else {
            if (c->len > 0) {
                memcpy(*out, c->out, c->len);
            }
            (*out)[c->len] = '\0';
            *out_len = c->len;
        }
    }

    rc = c->rc;
    if (rc != MOE_OK && err != NULL && errlen > 0) {
        snprintf(err, errlen, "%s", c->err);
    }
    moe_jj_arena_free(&c->arena);
    free(c);

    return rc;
}


static void
moe_jj_fill_chat(moe_jj_ctx_t *c, moe_jv_dict_t *g, const void *arg)
{
    const moe_jinja_chat_vars_t  *v = arg;
    moe_jv_t                      msgs = moe_jv_list(c);
    int                           i;

    for (i = 0; i < v->n_msgs; i++) {
        moe_jv_t  m = moe_jv_dict(c);

        moe_jv_dict_set(c, m.u.d, moe_jv_cstr(NULL, "role"),
                        moe_jv_cstr(NULL, v->msgs[i].role ? v->msgs[i].role
                                                          : "user"));
        moe_jv_dict_set(c, m.u.d, moe_jv_cstr(NULL, "content"),
                        moe_jv_str(NULL, v->msgs[i].content
                                         ? v->msgs[i].content : "",
                                   v->msgs[i].content ? v->msgs[i].content_len
                                                      : 0));
        moe_jv_push(c, &msgs, m);
    }
    moe_jv_dict_set(c, g, moe_jv_cstr(NULL, "messages"), msgs);
    moe_jv_dict_set(c, g, moe_jv_cstr(NULL, "add_generation_prompt"),
                    moe_jv_bool(v->add_generation_prompt));
    moe_jv_dict_set(c, g, moe_jv_cstr(NULL, "tools"), moe_jv_none());
    moe_jv_dict_set(c, g, moe_jv_cstr(NULL, "documents"), moe_jv_none());
    if (v->bos_token != NULL) {
        moe_jv_dict_set(c, g, moe_jv_cstr(NULL, "bos_token"),
                        moe_jv_cstr(NULL, v->bos_token));
    }
    if (v->eos_token != NULL) {
        moe_jv_dict_set(c, g, moe_jv_cstr(NULL, "eos_token"),
                        moe_jv_cstr(NULL, v->eos_token));
    }
}


int
moe_jinja_render_chat(const moe_jinja_tmpl_t *t,
    const moe_jinja_chat_vars_t *v, char **out, size_t *out_len, char *err,
    size_t errlen)
{
    return moe_jj_render(t, moe_jj_fill_chat, v, out, out_len, err, errlen);
}


static moe_jv_t
moe_jj_from_yajl(moe_jj_ctx_t *c, yajl_val y, int depth)
{
    moe_jv_t  v;
    size_t    i;

    if (depth > MOE_JJ_MAX_DEPTH) {
        moe_jj_fail(c, MOE_EINVAL, "JSON nested too deeply");
    }
    if (YAJL_IS_STRING(y)) {
        return moe_jv_cstr(NULL, YAJL_GET_STRING(y));
    }
    if (YAJL_IS_INTEGER(y)) {
        return moe_jv_int(YAJL_GET_INTEGER(y));
    }
    if (YAJL_IS_NUMBER(y)) {
        return moe_jv_float(YAJL_GET_DOUBLE(y));
    }
    if (YAJL_IS_TRUE(y) || YAJL_IS_FALSE(y)) {
        return moe_jv_bool(YAJL_IS_TRUE(y));
    }
    if (YAJL_IS_ARRAY(y)) {
        v = moe_jv_list(c);
        for (i = 0; i < y->u.array.len; i++) {
            moe_jv_push(c, &v, moe_jj_from_yajl(c, y->u.array.values[i],
                                                depth + 1));
        }
        return v;
    }
    if (YAJL_IS_OBJECT(y)) {
        v = moe_jv_dict(c);
        for (i = 0; i < y->u.object.len; i++) {
            moe_jv_dict_set(c, v.u.d, moe_jv_cstr(NULL, y->u.object.keys[i]),
                            moe_jj_from_yajl(c, y->u.object.values[i],
                                             depth + 1));
        }
        return v;
    }
    return moe_jv_none();
}


static void
moe_jj_fill_json(moe_jj_ctx_t *c, moe_jv_dict_t *g, const void *arg)
{
    yajl_val  y = (yajl_val) arg;
    moe_jv_t  v = moe_jj_from_yajl(c, y, 0);
    size_t    i;

    for (i = 0; i < v.u.d->n; i++) {
        moe_jv_dict_set(c, g, v.u.d->k[i], v.u.d->v[i]);
    }
}


int
moe_jinja_render_json(const moe_jinja_tmpl_t *t, const char *json,
    char **out, size_t *out_len, char *err, size_t errlen)
{
    char      ebuf[128];
    yajl_val  y = moe_json_parse(json, ebuf, sizeof(ebuf));
    int       rc;

    *out = NULL;
    *out_len = 0;
    if (y == NULL || !YAJL_IS_OBJECT(y)) {
        if (err != NULL && errlen > 0) {
            snprintf(err, errlen, "template variables must be a JSON object");
        }
        yajl_tree_free(y);
        return MOE_EINVAL;
    }
    rc = moe_jj_render(t, moe_jj_fill_json, y, out, out_len, err, errlen);
    yajl_tree_free(y);
    return rc;
}
