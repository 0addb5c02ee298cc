/*
 * Jinja filters used by chat templates (x | trim, | tojson, ...).  Tests,
 * str/dict methods and the globals transformers provides are in
 * jinja_methods.c, the helpers both use in jinja_helpers.c.  Anything
 * else fails with "unsupported filter 'x' at line N".
 */

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "text/jinja_int.h"

#define MOE_JJ_IS(name, lit)  (strcmp(name, lit) == 0)


static long long
moe_jj_len(moe_jj_ctx_t *c, moe_jv_t v, int line)
{
    switch (v.t) {
    case MOE_JV_STR:   return (long long) moe_jj_utf8_len(v.u.s.p, v.u.s.n);
    case MOE_JV_LIST:  return (long long) v.u.l->n;
    case MOE_JV_DICT:  return (long long) v.u.d->n;
    case MOE_JV_UNDEF: return 0;
    }
    moe_jj_fail(c, MOE_EINVAL, "object of type '%s' has no len() at line %d",
                moe_jv_type(v), line);
}


/* obj.attr for map/selectattr ("a.b" walks), undefined when missing */
static moe_jv_t
moe_jj_attr_path(moe_jv_t v, moe_jv_t name)
{
    const char  *p = name.u.s.p, *e = p + name.u.s.n;

    while (p < e) {
        const char  *dot = memchr(p, '.', (size_t) (e - p));
        moe_jv_t    *x;

        if (dot == NULL) {
            dot = e;
        }
        if (v.t != MOE_JV_DICT
            || (x = moe_jv_dict_get(v.u.d, p, (size_t) (dot - p))) == NULL)
        {
            return moe_jv_undef("attribute");
        }
        v = *x;
        p = dot + 1;
    }
    return v;
}


/* select/reject/selectattr/rejectattr */
static moe_jv_t
moe_jj_select(moe_jj_ctx_t *c, moe_jn_t *n, moe_jv_t v, moe_jv_t *args,
    int nargs, int attr, int keep)
{
    moe_jv_t  items = moe_jj_items_of(c, v, n->line), r = moe_jv_list(c);
    size_t    i;
    int       a0 = attr ? 1 : 0;
    moe_jn_t  tn = *n;

    if (attr && (nargs < 1 || args[0].t != MOE_JV_STR)) {
        moe_jj_fail(c, MOE_EINVAL, "selectattr/rejectattr need an attribute "
                    "name at line %d", n->line);
    }
    if (nargs > a0) {
        if (args[a0].t != MOE_JV_STR) {
            moe_jj_fail(c, MOE_EINVAL, "test name must be a string at line %d",
                        n->line);
        }
        tn.s = args[a0].u.s.p;
        tn.sn = args[a0].u.s.n;
    }
    for (i = 0; i < items.u.l->n; i++) {
        moe_jv_t  x = items.u.l->v[i];
        int       ok;

        if (attr) {
            x = moe_jj_attr_path(x, args[0]);
        }
        ok = nargs > a0 ? moe_jj_test(c, &tn, x, args + a0 + 1,
                                      nargs - a0 - 1)
                        : moe_jv_truthy(x);
        if (ok == keep) {
            moe_jv_push(c, &r, items.u.l->v[i]);
        }
    }
    return r;
}


moe_jv_t
moe_jj_filter(moe_jj_ctx_t *c, moe_jn_t *n, moe_jv_t v, moe_jv_t *args,
    int nargs, char **kw, int nkw)
{
    char      name[32];
    moe_jv_t  r, x;
    size_t    i;

    snprintf(name, sizeof(name), "%.*s", (int) n->sn, n->s);

    if (MOE_JJ_IS(name, "default") || MOE_JJ_IS(name, "d")) {
        x = moe_jj_arg(args, nargs, kw, nkw, 1, "boolean", moe_jv_bool(0));
        if (v.t == MOE_JV_UNDEF || (moe_jv_truthy(x) && !moe_jv_truthy(v))) {
            return moe_jj_arg(args, nargs, kw, nkw, 0, "default_value",
                              moe_jv_str(NULL, "", 0));
        }
        return v;
    }
    if (MOE_JJ_IS(name, "length") || MOE_JJ_IS(name, "count")) {
        return moe_jv_int(moe_jj_len(c, v, n->line));
    }
    if (MOE_JJ_IS(name, "string")) {
        return moe_jv_tostr(c, v);
    }
    if (MOE_JJ_IS(name, "safe")) {
        return v;
    }
    if (MOE_JJ_IS(name, "trim")) {
        return moe_jj_strip(moe_jv_tostr(c, v), 3,
                            moe_jj_arg(args, nargs, kw, nkw, 0, "chars",
                                       moe_jv_none()));
    }
    if (MOE_JJ_IS(name, "upper") || MOE_JJ_IS(name, "lower")
        || MOE_JJ_IS(name, "capitalize") || MOE_JJ_IS(name, "title"))
    {
        return moe_jj_case(c, moe_jv_tostr(c, v),
                           name[0] == 'u' ? 0 : name[0] == 'l' ? 1
                           : name[0] == 'c' ? 2 : 4);
    }
    if (MOE_JJ_IS(name, "replace")) {
        x = moe_jj_arg(args, nargs, kw, nkw, 2, "count", moe_jv_none());
        if (nargs < 2) {
            moe_jj_fail(c, MOE_EINVAL, "replace needs 2 arguments at line %d",
                        n->line);
        }
        return moe_jj_replace(c, moe_jv_tostr(c, v), moe_jv_tostr(c, args[0]),
                              moe_jv_tostr(c, args[1]),
                              x.t == MOE_JV_INT ? x.u.i : -1);
    }
    if (MOE_JJ_IS(name, "tojson")) {
        moe_jv_t  ind = moe_jj_arg(args, nargs, kw, nkw, 1, "indent",
                                   moe_jv_none());
        moe_jv_t  asc = moe_jj_arg(args, nargs, kw, nkw, 0, "ensure_ascii",
                                   moe_jv_bool(0));
        moe_jv_t  sep = moe_jj_arg(args, nargs, kw, nkw, 2, "separators",
                                   moe_jv_none());
        moe_jv_t  srt = moe_jj_arg(args, nargs, kw, nkw, 3, "sort_keys",
                                   moe_jv_bool(0));

        if (moe_jv_truthy(asc) || sep.t != MOE_JV_NONE
            || (ind.t != MOE_JV_NONE && ind.t != MOE_JV_INT))
        {
            moe_jj_fail(c, MOE_EINVAL, "unsupported tojson arguments at line "
                        "%d", n->line);
        }
        return moe_jv_tojson(c, v, ind.t == MOE_JV_INT
                                   ? (int) (ind.u.i < 0 ? 0
                                            : ind.u.i > 64 ? 64 : ind.u.i)
                                   : -1,
                             moe_jv_truthy(srt), n->line);
    }
    if (MOE_JJ_IS(name, "join")) {
        moe_jv_t  items = moe_jj_items_of(c, v, n->line);
        moe_jv_t  sep = moe_jv_tostr(c, moe_jj_arg(args, nargs, kw, nkw, 0,
                                                   "d", moe_jv_str(NULL, "",
                                                                   0)));
        moe_jv_t  at = moe_jj_arg(args, nargs, kw, nkw, 1, "attribute",
                                  moe_jv_none());

        r = moe_jv_str(NULL, "", 0);
        for (i = 0; i < items.u.l->n; i++) {
            x = items.u.l->v[i];
            if (at.t == MOE_JV_STR) {
                x = moe_jj_attr_path(x, at);
            }
            if (i > 0) {
                r = moe_jv_concat(c, r, sep);
            }
            r = moe_jv_concat(c, r, moe_jv_tostr(c, x));
        }
        return r;
    }
    if (MOE_JJ_IS(name, "first") || MOE_JJ_IS(name, "last")) {
        moe_jv_t  items = moe_jj_items_of(c, v, n->line);

        if (items.u.l->n == 0) {
            return moe_jv_undef(name);
        }
        return items.u.l->v[name[0] == 'f' ? 0 : items.u.l->n - 1];
    }
    if (MOE_JJ_IS(name, "list")) {
        moe_jv_t  items = moe_jj_items_of(c, v, n->line);

        r = moe_jv_list(c);
        for (i = 0; i < items.u.l->n; i++) {
            moe_jv_push(c, &r, items.u.l->v[i]);
        }
        return r;
    }
    if (MOE_JJ_IS(name, "reverse")) {
        moe_jv_t  items = moe_jj_items_of(c, v, n->line);

        r = moe_jv_list(c);
        for (i = items.u.l->n; i-- > 0; ) {
            moe_jv_push(c, &r, items.u.l->v[i]);
        }
        if (v.t == MOE_JV_STR) {
            moe_jv_t  s = moe_jv_str(NULL, "", 0);

            for (i = 0; i < r.u.l->n; i++) {
                s = moe_jv_concat(c, s, r.u.l->v[i]);
            }
            return s;
        }
        return r;
    }
    if (MOE_JJ_IS(name, "items")) {
        r = moe_jv_list(c);
        if (v.t == MOE_JV_UNDEF) {
            return r;
        }
        if (v.t != MOE_JV_DICT) {
            moe_jj_fail(c, MOE_EINVAL, "items expects a mapping at line %d",
                        n->line);
        }
        for (i = 0; i < v.u.d->n; i++) {
            moe_jv_t  t = moe_jv_list(c);

            t.flag = 1;
            moe_jv_push(c, &t, v.u.d->k[i]);
            moe_jv_push(c, &t, v.u.d->v[i]);
            moe_jv_push(c, &r, t);
        }
        return r;
    }
    if (MOE_JJ_IS(name, "int") || MOE_JJ_IS(name, "float")) {
        x = moe_jj_arg(args, nargs, kw, nkw, 0, "default",
                       name[0] == 'i' ? moe_jv_int(0) : moe_jv_float(0.0));
        if (v.t == MOE_JV_INT || v.t == MOE_JV_BOOL || v.t == MOE_JV_FLOAT) {
            double  f = v.t == MOE_JV_FLOAT ? v.u.f : (double) v.u.i;

            return name[0] == 'i' ? moe_jv_int(v.t == MOE_JV_FLOAT
                                               ? (long long) f : v.u.i)
                                  : moe_jv_float(f);
        }
        if (v.t == MOE_JV_STR) {
            char    buf[64], *end;
            double  f;

            r = moe_jj_strip(v, 3, moe_jv_none());
            if (r.u.s.n > 0 && r.u.s.n < sizeof(buf)) {
                memcpy(buf, r.u.s.p, r.u.s.n);
                buf[r.u.s.n] = '\0';
                f = strtod(buf, &end);
                if (*end == '\0') {
                    return name[0] == 'i' ? moe_jv_int((long long) f)
                                          : moe_jv_float(f);
                }
            }
        }
        return x;
    }
    if (MOE_JJ_IS(name, "abs")) {
        if (v.t == MOE_JV_FLOAT) {
            return moe_jv_float(v.u.f < 0 ? -v.u.f : v.u.f);
        }
        if (v.t == MOE_JV_INT || v.t == MOE_JV_BOOL) {
            return moe_jv_int(v.u.i < 0 ? -v.u.i : v.u.i);
        }
        moe_jj_fail(c, MOE_EINVAL, "bad operand for abs at line %d", n->line);
    }
    if (MOE_JJ_IS(name, "map")) {
        moe_jv_t  items = moe_jj_items_of(c, v, n->line);
        moe_jv_t  at = moe_jj_arg(args, 0, kw, nkw, -1, "attribute",
                                  moe_jv_none());
        moe_jn_t  fn = *n;

        if (at.t != MOE_JV_STR && (nargs < 1 || args[0].t != MOE_JV_STR)) {
            moe_jj_fail(c, MOE_EINVAL, "map needs a filter name or "
                        "attribute= at line %d", n->line);
        }
        if (at.t != MOE_JV_STR) {
            fn.s = args[0].u.s.p;
            fn.sn = args[0].u.s.n;
        }
        r = moe_jv_list(c);
        for (i = 0; i < items.u.l->n; i++) {
            x = items.u.l->v[i];
            if (at.t == MOE_JV_STR) {
                x = moe_jj_attr_path(x, at);
                if (x.t == MOE_JV_UNDEF) {
                    x = moe_jj_arg(args, 0, kw, nkw, -1, "default", x);
                }
            } else {
                x = moe_jj_filter(c, &fn, x, args + 1, nargs - 1, kw, nkw);
            }
            moe_jv_push(c, &r, x);
        }
        return r;
    }
    if (MOE_JJ_IS(name, "select") || MOE_JJ_IS(name, "reject")) {
        return moe_jj_select(c, n, v, args, nargs, 0, name[0] == 's');
    }
    if (MOE_JJ_IS(name, "selectattr") || MOE_JJ_IS(name, "rejectattr")) {
        return moe_jj_select(c, n, v, args, nargs, 1, name[0] == 's');
    }

    moe_jj_fail(c, MOE_EINVAL, "unsupported filter '%s' at line %d", name,
                n->line);
}

