/*
 * Jinja tests (x is defined, ...), str/dict methods (x.strip(), ...) and
 * global functions (raise_exception, namespace, range, strftime_now).
 */

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "text/jinja_int.h"

#define MOE_JJ_IS(name, lit)  (strcmp(name, lit) == 0)


static long long
moe_jj_int_arg(moe_jj_ctx_t *c, moe_jv_t v, const char *what, int line)
{
    if (v.t == MOE_JV_INT || v.t == MOE_JV_BOOL) {
        return v.u.i;
    }
    moe_jj_fail(c, MOE_EINVAL, "%s expects an integer, got %s at line %d",
                what, moe_jv_type(v), line);
}


int
moe_jj_test(moe_jj_ctx_t *c, moe_jn_t *n, moe_jv_t v, moe_jv_t *args,
    int nargs)
{
    char      name[32];
    moe_jv_t  a = nargs > 0 ? args[0] : moe_jv_undef("argument");
    int       isnum = v.t == MOE_JV_INT || v.t == MOE_JV_BOOL
                      || v.t == MOE_JV_FLOAT;

    snprintf(name, sizeof(name), "%.*s", (int) n->sn, n->s);

    if (MOE_JJ_IS(name, "defined"))   return v.t != MOE_JV_UNDEF;
    if (MOE_JJ_IS(name, "undefined")) return v.t == MOE_JV_UNDEF;
    if (MOE_JJ_IS(name, "none"))      return v.t == MOE_JV_NONE;
    if (MOE_JJ_IS(name, "string"))    return v.t == MOE_JV_STR;
    if (MOE_JJ_IS(name, "mapping"))   return v.t == MOE_JV_DICT && !v.flag;
    if (MOE_JJ_IS(name, "number"))    return isnum;
    if (MOE_JJ_IS(name, "integer"))   return v.t == MOE_JV_INT;
    if (MOE_JJ_IS(name, "float"))     return v.t == MOE_JV_FLOAT;
    if (MOE_JJ_IS(name, "boolean"))   return v.t == MOE_JV_BOOL;
    if (MOE_JJ_IS(name, "true"))      return v.t == MOE_JV_BOOL && v.u.i;
    if (MOE_JJ_IS(name, "false"))     return v.t == MOE_JV_BOOL && !v.u.i;
    if (MOE_JJ_IS(name, "callable"))  return 0;
    if (MOE_JJ_IS(name, "iterable")) {
        return v.t == MOE_JV_STR || v.t == MOE_JV_LIST
               || (v.t == MOE_JV_DICT && !v.flag) || v.t == MOE_JV_UNDEF;
    }
    if (MOE_JJ_IS(name, "sequence")) {
        return v.t == MOE_JV_STR || v.t == MOE_JV_LIST
               || (v.t == MOE_JV_DICT && !v.flag) || v.t == MOE_JV_UNDEF;
    }
    if (MOE_JJ_IS(name, "eq") || MOE_JJ_IS(name, "equalto")
        || MOE_JJ_IS(name, "=="))
    {
        return moe_jv_eq(v, a);
    }
    if (MOE_JJ_IS(name, "ne") || MOE_JJ_IS(name, "!=")) {
        return !moe_jv_eq(v, a);
    }
    if (MOE_JJ_IS(name, "sameas")) {
        return moe_jv_eq(v, a) && v.t == a.t
               && (v.t != MOE_JV_LIST || v.u.l == a.u.l)
               && (v.t != MOE_JV_DICT || v.u.d == a.u.d);
    }
    if (MOE_JJ_IS(name, "lt") || MOE_JJ_IS(name, "lessthan")) {
        return moe_jv_cmp(c, v, a, n->line) < 0;
    }
    if (MOE_JJ_IS(name, "le")) return moe_jv_cmp(c, v, a, n->line) <= 0;
    if (MOE_JJ_IS(name, "gt") || MOE_JJ_IS(name, "greaterthan")) {
        return moe_jv_cmp(c, v, a, n->line) > 0;
    }
    if (MOE_JJ_IS(name, "ge")) return moe_jv_cmp(c, v, a, n->line) >= 0;
    if (MOE_JJ_IS(name, "in")) {
        moe_jv_t  items;
        size_t    i;

        if (a.t == MOE_JV_STR) {
            return v.t == MOE_JV_STR && v.u.s.n <= a.u.s.n
                   && (v.u.s.n == 0
                       || memmem(a.u.s.p, a.u.s.n, v.u.s.p, v.u.s.n) != NULL);
        }
        if (a.t == MOE_JV_DICT) {
            return moe_jv_dict_find(a.u.d, v) != NULL;
        }
        items = moe_jj_items_of(c, a, n->line);
        for (i = 0; i < items.u.l->n; i++) {
            if (moe_jv_eq(items.u.l->v[i], v)) {
                return 1;
            }
        }
        return 0;
    }
    if (MOE_JJ_IS(name, "odd") || MOE_JJ_IS(name, "even")) {
        long long  i = moe_jj_int_arg(c, v, name, n->line);

        return ((i % 2) != 0) == (name[0] == 'o');
    }
    if (MOE_JJ_IS(name, "divisibleby")) {
        long long  i = moe_jj_int_arg(c, v, name, n->line);
        long long  d = moe_jj_int_arg(c, a, name, n->line);

        if (d == 0) {
            moe_jj_fail(c, MOE_EINVAL, "division by zero at line %d", n->line);
        }
        return d == -1 || i % d == 0;
    }
    if (MOE_JJ_IS(name, "lower") || MOE_JJ_IS(name, "upper")) {
        size_t  i;

        if (v.t != MOE_JV_STR) {
            return 0;
        }
        for (i = 0; i < v.u.s.n; i++) {
            char  ch = v.u.s.p[i];

            if ((name[0] == 'l' && ch >= 'A' && ch <= 'Z')
                || (name[0] == 'u' && ch >= 'a' && ch <= 'z'))
            {
                return 0;
            }
        }
        return 1;
    }

    moe_jj_fail(c, MOE_EINVAL, "unsupported test '%s' at line %d", name,
                n->line);
}


static moe_jv_t
moe_jj_str_method(moe_jj_ctx_t *c, moe_jn_t *n, moe_jv_t s, const char *name,
    moe_jv_t *args, int nargs, char **kw, int nkw)
{
    moe_jv_t  a0 = moe_jj_arg(args, nargs, kw, nkw, 0, "", moe_jv_none());

    if (MOE_JJ_IS(name, "strip") || MOE_JJ_IS(name, "lstrip")
        || MOE_JJ_IS(name, "rstrip"))
    {
        if (a0.t != MOE_JV_NONE) {
            moe_jj_need_str(c, a0, name, n->line);
        }
        return moe_jj_strip(s, name[0] == 'l' ? 1 : name[0] == 'r' ? 2 : 3,
                            a0);
    }
    if (MOE_JJ_IS(name, "startswith") || MOE_JJ_IS(name, "endswith")) {
        if (nargs != 1) {
            moe_jj_fail(c, MOE_EINVAL, "%s takes one argument at line %d",
                        name, n->line);
        }
        return moe_jv_bool(moe_jj_affix(c, s, a0, name[0] == 'e', n->line));
    }
    if (MOE_JJ_IS(name, "split")) {
        moe_jv_t  sep = moe_jj_arg(args, nargs, kw, nkw, 0, "sep",
                                   moe_jv_none());
        moe_jv_t  max = moe_jj_arg(args, nargs, kw, nkw, 1, "maxsplit",
                                   moe_jv_int(-1));

        if (sep.t != MOE_JV_NONE) {
            moe_jj_need_str(c, sep, name, n->line);
        }
        return moe_jj_split(c, s, sep, moe_jj_int_arg(c, max, name, n->line),
                            n->line);
    }
    if (MOE_JJ_IS(name, "upper"))      return moe_jj_case(c, s, 0);
    if (MOE_JJ_IS(name, "lower"))      return moe_jj_case(c, s, 1);
    if (MOE_JJ_IS(name, "capitalize")) return moe_jj_case(c, s, 2);
    if (MOE_JJ_IS(name, "title"))      return moe_jj_case(c, s, 3);
    if (MOE_JJ_IS(name, "replace")) {
        moe_jv_t  cnt = moe_jj_arg(args, nargs, kw, nkw, 2, "count",
                                   moe_jv_int(-1));

        if (nargs < 2) {
            moe_jj_fail(c, MOE_EINVAL, "replace needs 2 arguments at line %d",
                        n->line);
        }
        return moe_jj_replace(c, s, moe_jj_need_str(c, args[0], name, n->line),
                              moe_jj_need_str(c, args[1], name, n->line),
                              moe_jj_int_arg(c, cnt, name, n->line));
    }
    if (MOE_JJ_IS(name, "find") || MOE_JJ_IS(name, "count")) {
        size_t      i;
        long long   hits = 0;

        moe_jj_need_str(c, a0, name, n->line);
        for (i = 0; i + a0.u.s.n <= s.u.s.n; i++) {
            if (memcmp(s.u.s.p + i, a0.u.s.p, a0.u.s.n) == 0) {
                if (name[0] == 'f') {
                    return moe_jv_int((long long) moe_jj_utf8_len(s.u.s.p, i));
                }
                hits++;
                if (a0.u.s.n > 0) {
                    i += a0.u.s.n - 1;
                }
            }
        }
        return moe_jv_int(name[0] == 'f' ? -1 : hits);
    }
    if (MOE_JJ_IS(name, "join")) {
        moe_jv_t  items = moe_jj_items_of(c, a0, n->line), r;
        size_t    i, len = 0, k = 0;
        char     *p;

        for (i = 0; i < items.u.l->n; i++) {
            len += moe_jj_need_str(c, items.u.l->v[i], name, n->line).u.s.n
                   + s.u.s.n;
        }
        p = moe_jj_xalloc(c, len + 1);
        for (i = 0; i < items.u.l->n; i++) {
            r = items.u.l->v[i];
            if (i > 0) {
                memcpy(p + k, s.u.s.p, s.u.s.n);
                k += s.u.s.n;
            }
            memcpy(p + k, r.u.s.p, r.u.s.n);
            k += r.u.s.n;
        }
        return moe_jv_str(NULL, p, k);
    }

    moe_jj_fail(c, MOE_EINVAL, "unsupported method '%s' at line %d", name,
                n->line);
}


moe_jv_t
moe_jj_method(moe_jj_ctx_t *c, moe_jn_t *n, moe_jv_t obj, const char *name,
    moe_jv_t *args, int nargs, char **kw, int nkw)
{
    moe_jv_t  r;
    size_t    i;

    if (obj.t == MOE_JV_STR) {
        return moe_jj_str_method(c, n, obj, name, args, nargs, kw, nkw);
    }
    if (obj.t == MOE_JV_DICT && !obj.flag) {
        if (MOE_JJ_IS(name, "get")) {
            moe_jv_t  *p;

            if (nargs < 1) {
                moe_jj_fail(c, MOE_EINVAL, "get needs a key at line %d",
                            n->line);
            }
            p = moe_jv_dict_find(obj.u.d, args[0]);
            return p ? *p : nargs > 1 ? args[1] : moe_jv_none();
        }
        if (MOE_JJ_IS(name, "items") || MOE_JJ_IS(name, "keys")
            || MOE_JJ_IS(name, "values"))
        {
            r = moe_jv_list(c);
            for (i = 0; i < obj.u.d->n; i++) {
                if (name[0] == 'i') {
                    moe_jv_t  t = moe_jv_list(c);

                    t.flag = 1;
                    moe_jv_push(c, &t, obj.u.d->k[i]);
                    moe_jv_push(c, &t, obj.u.d->v[i]);
                    moe_jv_push(c, &r, t);
                } else {
                    moe_jv_push(c, &r, name[0] == 'k' ? obj.u.d->k[i]
                                                      : obj.u.d->v[i]);
                }
            }
            return r;
        }
    }
    moe_jj_fail(c, MOE_EINVAL, "unsupported method '%s' on %s at line %d",
                name, moe_jv_type(obj), n->line);
}


moe_jv_t
moe_jj_global_call(moe_jj_ctx_t *c, moe_jn_t *n, const char *name,
    moe_jv_t *args, int nargs, char **kw, int nkw)
{
    moe_jv_t  r;
    int       i;

    if (MOE_JJ_IS(name, "raise_exception")) {
        moe_jv_t  m = moe_jv_tostr(c, nargs > 0 ? args[0] : moe_jv_none());

        moe_jj_fail(c, MOE_EINVAL, "%.*s", (int) (m.u.s.n > 400 ? 400
                                                               : m.u.s.n),
                    m.u.s.p);
    }
    if (MOE_JJ_IS(name, "namespace") || MOE_JJ_IS(name, "dict")) {
        r = moe_jv_dict(c);
        r.flag = name[0] == 'n';
        for (i = 0; i < nargs; i++) {
            size_t  k;

            if (args[i].t != MOE_JV_DICT) {
                moe_jj_fail(c, MOE_EINVAL, "%s() takes keyword arguments at "
                            "line %d", name, n->line);
            }
            for (k = 0; k < args[i].u.d->n; k++) {
                moe_jv_dict_set(c, r.u.d, args[i].u.d->k[k],
                                args[i].u.d->v[k]);
            }
        }
        for (i = 0; i < nkw; i++) {
            moe_jv_dict_set(c, r.u.d, moe_jv_cstr(NULL, kw[i]),
                            args[nargs + i]);
        }
        return r;
    }
    if (MOE_JJ_IS(name, "range")) {
        long long  a = 0, b, s = 1, x;

        if (nargs < 1 || nargs > 3 || nkw > 0) {
            moe_jj_fail(c, MOE_EINVAL, "range takes 1 to 3 arguments at line "
                        "%d", n->line);
        }
        b = moe_jj_int_arg(c, args[0], name, n->line);
        if (nargs > 1) {
            a = b;
            b = moe_jj_int_arg(c, args[1], name, n->line);
        }
        if (nargs > 2) {
            s = moe_jj_int_arg(c, args[2], name, n->line);
        }
        if (s == 0) {
            moe_jj_fail(c, MOE_EINVAL, "range step must not be zero at line "
                        "%d", n->line);
        }
        r = moe_jv_list(c);
        for (x = a; s > 0 ? x < b : x > b; x += s) {
            if (r.u.l->n >= 1000000) {
                moe_jj_fail(c, MOE_EINVAL, "range too big at line %d",
                            n->line);
            }
            moe_jv_push(c, &r, moe_jv_int(x));
            if ((s > 0 && x > b - s) || (s < 0 && x < b - s)) {
                break;
            }
        }
        return r;
    }
    if (MOE_JJ_IS(name, "strftime_now")) {
        char       buf[256];
        time_t     now = time(NULL);
        struct tm  tm;
        moe_jv_t   f = nargs > 0 ? args[0] : moe_jv_none();

        moe_jj_need_str(c, f, name, n->line);
        localtime_r(&now, &tm);
        f = moe_jv_str(c, f.u.s.p, f.u.s.n);
        if (strftime(buf, sizeof(buf), f.u.s.p, &tm) == 0) {
            buf[0] = '\0';
        }
        return moe_jv_cstr(c, buf);
    }
    moe_jj_fail(c, MOE_EINVAL, "unsupported function '%s' at line %d", name,
                n->line);
}
