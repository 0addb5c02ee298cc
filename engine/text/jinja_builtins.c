/*
 * Jinja builtins used by chat templates: filters, tests, str/dict methods
 * and the globals transformers provides (raise_exception, strftime_now)
 * plus namespace() and range().  Anything else fails with "unsupported
 * filter/test/method/function 'x' at line N".
 */

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "text/jinja_int.h"

#define MOE_JJ_IS(name, lit)  (strcmp(name, lit) == 0)


moe_jv_t
moe_jj_arg(moe_jv_t *args, int nargs, char **kw, int nkw, int pos,
    const char *name, moe_jv_t dflt)
{
    int  i;

    if (pos >= 0 && pos < nargs) {
        return args[pos];
    }
    for (i = 0; i < nkw; i++) {
        if (strcmp(kw[i], name) == 0) {
            return args[nargs + i];
        }
    }
    return dflt;
}


moe_jv_t
moe_jj_need_str(moe_jj_ctx_t *c, moe_jv_t v, const char *what, int line)
{
    if (v.t != MOE_JV_STR) {
        moe_jj_fail(c, MOE_EINVAL, "%s expects a string, got %s at line %d",
                    what, moe_jv_type(v), line);
    }
    return v;
}


static size_t
moe_jj_charlen(const char *p, size_t n)
{
    size_t  k = 1;

    while (k < n && ((unsigned char) p[k] & 0xc0) == 0x80) {
        k++;
    }
    return k;
}


/* is the character p[0..k) one of the characters of set? */
static int
moe_jj_in_set(const char *p, size_t k, moe_jv_t set)
{
    size_t  i = 0;

    while (i < set.u.s.n) {
        size_t  j = moe_jj_charlen(set.u.s.p + i, set.u.s.n - i);

        if (j == k && memcmp(set.u.s.p + i, p, k) == 0) {
            return 1;
        }
        i += j;
    }
    return 0;
}


/* str.strip/lstrip/rstrip: which = 1 left, 2 right, 3 both */
moe_jv_t
moe_jj_strip(moe_jv_t s, int which, moe_jv_t chars)
{
    const char  *p = s.u.s.p;
    size_t       n = s.u.s.n, k;
    int          ws = chars.t != MOE_JV_STR;

    while ((which & 1) && n > 0) {
        k = ws ? moe_jj_space(p, n) : moe_jj_charlen(p, n);
        if (k == 0 || (!ws && !moe_jj_in_set(p, k, chars))) {
            break;
        }
        p += k;
        n -= k;
    }
    while ((which & 2) && n > 0) {
        if (ws) {
            k = moe_jj_space_back(p, n);
        } else {
            for (k = 1; k < n && ((unsigned char) p[n - k] & 0xc0) == 0x80; k++)
            { }
            if (!moe_jj_in_set(p + n - k, k, chars)) {
                k = 0;
            }
        }
        if (k == 0) {
            break;
        }
        n -= k;
    }
    return moe_jv_str(NULL, p, n);
}


/* mode 0 upper, 1 lower, 2 capitalize, 3 str.title, 4 Jinja title */
moe_jv_t
moe_jj_case(moe_jj_ctx_t *c, moe_jv_t s, int mode)
{
    moe_jv_t  r = moe_jv_str(c, s.u.s.p, s.u.s.n);
    char     *p = (char *) r.u.s.p;
    size_t    i;
    int       start = 1;

    for (i = 0; i < r.u.s.n; i++) {
        int  ch = (unsigned char) p[i];
        int  up = mode == 0 || ((mode == 2 && i == 0) || (mode >= 3 && start));

        if (ch >= 'a' && ch <= 'z' && up) {
            p[i] = (char) (ch - 32);
        } else if (ch >= 'A' && ch <= 'Z' && !up) {
            p[i] = (char) (ch + 32);
        }
        if (mode == 3) {
            start = !((ch >= 'a' && ch <= 'z') || (ch >= 'A' && ch <= 'Z')
                      || ch >= 0x80);
        } else if (mode == 4) {
            start = strchr("- \t\n\r\f\v({[<", ch) != NULL && ch != 0;
        }
    }
    return r;
}


moe_jv_t
moe_jj_replace(moe_jj_ctx_t *c, moe_jv_t s, moe_jv_t old, moe_jv_t new,
    long long count)
{
    char    *o;
    size_t   i = 0, k = 0, hits = 0, max;

    if (old.u.s.n == 0) {
        moe_jj_fail(c, MOE_EINVAL, "replace with an empty pattern is not "
                    "supported");
    }
    max = s.u.s.n / old.u.s.n + 1;
    if (new.u.s.n > 0 && max > (MOE_JJ_MAX_OUT - s.u.s.n) / new.u.s.n) {
        max = (MOE_JJ_MAX_OUT - s.u.s.n) / new.u.s.n;
    }
    o = moe_jj_xalloc(c, s.u.s.n + max * new.u.s.n + 1);
    while (i < s.u.s.n) {
        if ((count < 0 || (long long) hits < count) && hits < max
            && i + old.u.s.n <= s.u.s.n
            && memcmp(s.u.s.p + i, old.u.s.p, old.u.s.n) == 0)
        {
            memcpy(o + k, new.u.s.p, new.u.s.n);
            k += new.u.s.n;
            i += old.u.s.n;
            hits++;
        } else {
            o[k++] = s.u.s.p[i++];
        }
    }
    return moe_jv_str(NULL, o, k);
}


moe_jv_t
moe_jj_split(moe_jj_ctx_t *c, moe_jv_t s, moe_jv_t sep, long long max,
    int line)
{
    moe_jv_t     r = moe_jv_list(c);
    const char  *p = s.u.s.p;
    size_t       n = s.u.s.n, i = 0, start = 0, k;

    if (sep.t != MOE_JV_STR) {
        while (i < n) {
            while (i < n && (k = moe_jj_space(p + i, n - i)) > 0) {
                i += k;
            }
            if (i >= n) {
                break;
            }
            if (max >= 0 && (long long) r.u.l->n >= max) {
                size_t  e = n;

                while (e > i && (k = moe_jj_space_back(p + i, e - i)) > 0) {
                    e -= k;
                }
                moe_jv_push(c, &r, moe_jv_str(NULL, p + i, e - i));
                break;
            }
            start = i;
            while (i < n && moe_jj_space(p + i, n - i) == 0) {
                i++;
            }
            moe_jv_push(c, &r, moe_jv_str(NULL, p + start, i - start));
        }
        return r;
    }
    if (sep.u.s.n == 0) {
        moe_jj_fail(c, MOE_EINVAL, "empty separator at line %d", line);
    }
    while (i + sep.u.s.n <= n) {
        if ((max < 0 || (long long) r.u.l->n < max)
            && memcmp(p + i, sep.u.s.p, sep.u.s.n) == 0)
        {
            moe_jv_push(c, &r, moe_jv_str(NULL, p + start, i - start));
            i += sep.u.s.n;
            start = i;
        } else {
            i++;
        }
    }
    moe_jv_push(c, &r, moe_jv_str(NULL, p + start, n - start));
    return r;
}


int
moe_jj_affix(moe_jj_ctx_t *c, moe_jv_t s, moe_jv_t a, int end, int line)
{
    size_t  i;

    if (a.t == MOE_JV_LIST) {
        for (i = 0; i < a.u.l->n; i++) {
            if (moe_jj_affix(c, s, a.u.l->v[i], end, line)) {
                return 1;
            }
        }
        return 0;
    }
    moe_jj_need_str(c, a, end ? "endswith" : "startswith", line);
    return a.u.s.n <= s.u.s.n
           && memcmp(s.u.s.p + (end ? s.u.s.n - a.u.s.n : 0), a.u.s.p,
                     a.u.s.n) == 0;
}


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


moe_jv_t
moe_jj_items_of(moe_jj_ctx_t *c, moe_jv_t v, int line)
{
    moe_jv_t  l;
    size_t    i, k;

    if (v.t == MOE_JV_LIST) {
        return v;
    }
    l = moe_jv_list(c);
    if (v.t == MOE_JV_UNDEF) {
        return l;
    }
    if (v.t == MOE_JV_DICT && !v.flag) {
        for (i = 0; i < v.u.d->n; i++) {
            moe_jv_push(c, &l, v.u.d->k[i]);
        }
        return l;
    }
    if (v.t == MOE_JV_STR) {
        for (i = 0; i < v.u.s.n; i += k) {
            k = moe_jj_charlen(v.u.s.p + i, v.u.s.n - i);
            moe_jv_push(c, &l, moe_jv_str(NULL, v.u.s.p + i, k));
        }
        return l;
    }
    moe_jj_fail(c, MOE_EINVAL, "'%s' object is not iterable at line %d",
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

