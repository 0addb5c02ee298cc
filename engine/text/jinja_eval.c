/*
 * Jinja evaluator: expressions and statements.  All values of one render
 * live in one arena, freed when it ends; errors longjmp back to the render
 * call (jinja_render.c).
 */

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "text/jinja_int.h"

static moe_jv_t moe_jj_eval(moe_jj_ctx_t *c, moe_jn_t *n);


static void
moe_jj_undef_fail(moe_jj_ctx_t *c, moe_jv_t v, int line)
{
    moe_jj_fail(c, MOE_EINVAL, "'%s' is undefined at line %d",
                v.name ? v.name : "value", line);
}


static void
moe_jj_out(moe_jj_ctx_t *c, const char *p, size_t n)
{
    if (n == 0) {
        return;
    }
    if (c->len + n > MOE_JJ_MAX_OUT) {
        moe_jj_fail(c, MOE_EINVAL, "rendered template exceeds %d bytes",
                    MOE_JJ_MAX_OUT);
    }
    if (c->len + n + 1 > c->cap) {
        size_t  cap = c->cap ? c->cap * 2 : 4096;
        char   *o;

        while (cap < c->len + n + 1) {
            cap *= 2;
        }
        o = moe_jj_xalloc(c, cap);
        if (c->len > 0) {
            memcpy(o, c->out, c->len);
        }
        c->out = o;
        c->cap = cap;
    }
    memcpy(c->out + c->len, p, n);
    c->len += n;
}


static void
moe_jj_step(moe_jj_ctx_t *c)
{
    if (++c->steps > MOE_JJ_MAX_STEPS) {
        moe_jj_fail(c, MOE_EINVAL, "template render exceeds %d steps",
                    MOE_JJ_MAX_STEPS);
    }
}


static moe_jv_t *
moe_jj_lookup(moe_jj_ctx_t *c, const char *name, size_t n)
{
    moe_jj_scope_t  *s;

    for (s = c->scope; s != NULL; s = s->up) {
        moe_jv_t  *v = moe_jv_dict_get(s->vars, name, n);

        if (v != NULL) {
            return v;
        }
    }
    return NULL;
}


static void
moe_jj_assign(moe_jj_ctx_t *c, const char *name, moe_jv_t v)
{
    moe_jv_dict_set(c, c->scope->vars, moe_jv_str(NULL, name, strlen(name)),
                    v);
}


static long long
moe_jj_index(moe_jj_ctx_t *c, moe_jv_t v, int line)
{
    if (v.t == MOE_JV_INT || v.t == MOE_JV_BOOL) {
        return v.u.i;
    }
    moe_jj_fail(c, MOE_EINVAL, "indices must be integers, not %s at line %d",
                moe_jv_type(v), line);
}


static moe_jv_t
moe_jj_getitem(moe_jj_ctx_t *c, moe_jv_t o, moe_jv_t k, int line)
{
    moe_jv_t   *p;
    long long   i, len;

    switch (o.t) {
    case MOE_JV_UNDEF:
        moe_jj_undef_fail(c, o, line);
        break;
    case MOE_JV_DICT:
        p = moe_jv_dict_find(o.u.d, k);
        if (p != NULL) {
            return *p;
        }
        break;
    case MOE_JV_LIST:
    case MOE_JV_STR:
        if (k.t != MOE_JV_INT && k.t != MOE_JV_BOOL) {
            break;
        }
        i = k.u.i;
        len = o.t == MOE_JV_LIST ? (long long) o.u.l->n
                                 : (long long) moe_jj_utf8_len(o.u.s.p,
                                                               o.u.s.n);
        if (i < 0) {
            i += len;
        }
        if (i < 0 || i >= len) {
            break;
        }
        if (o.t == MOE_JV_LIST) {
            return o.u.l->v[i];
        } else {
            size_t  a = moe_jj_utf8_off(o.u.s.p, o.u.s.n, (size_t) i);
            size_t  b = moe_jj_utf8_off(o.u.s.p, o.u.s.n, (size_t) i + 1);

            return moe_jv_str(NULL, o.u.s.p + a, b - a);
        }
    default:
        break;
    }
    return moe_jv_undef(k.t == MOE_JV_STR ? k.u.s.p : "item");
}


static moe_jv_t
moe_jj_slice(moe_jj_ctx_t *c, moe_jn_t *n)
{
    moe_jv_t    o = moe_jj_eval(c, n->a), r;
    moe_jn_t   *part[3] = { n->b, n->c, n->cond };
    long long   v[3], len, i, k;
    int         set[3], j;
    size_t     *offs = NULL;

    for (j = 0; j < 3; j++) {
        moe_jv_t  x;

        set[j] = 0;
        if (part[j] != NULL) {
            x = moe_jj_eval(c, part[j]);
            if (x.t != MOE_JV_NONE && x.t != MOE_JV_UNDEF) {
                v[j] = moe_jj_index(c, x, n->line);
                set[j] = 1;
            }
        }
    }
    if (o.t == MOE_JV_LIST) {
        len = (long long) o.u.l->n;
    } else if (o.t == MOE_JV_STR) {
        len = (long long) moe_jj_utf8_len(o.u.s.p, o.u.s.n);
        offs = moe_jj_xalloc(c, (size_t) (len + 1) * sizeof(*offs));
        for (i = 0, k = 0; i < (long long) o.u.s.n; i++) {
            if (((unsigned char) o.u.s.p[i] & 0xc0) != 0x80) {
                offs[k++] = (size_t) i;
            }
        }
        offs[len] = o.u.s.n;
    } else if (o.t == MOE_JV_UNDEF) {
        moe_jj_undef_fail(c, o, n->line);
    } else {
        moe_jj_fail(c, MOE_EINVAL, "cannot slice %s at line %d",
                    moe_jv_type(o), n->line);
    }

    if (!set[2]) {
        v[2] = 1;
    }
    if (v[2] == 0) {
        moe_jj_fail(c, MOE_EINVAL, "slice step cannot be zero at line %d",
                    n->line);
    }
    for (j = 0; j < 2; j++) {
        if (!set[j]) {
            v[j] = v[2] > 0 ? (j == 0 ? 0 : len) : (j == 0 ? len - 1 : -1);
            continue;
        }
        if (v[j] < 0) {
            v[j] += len;
            if (v[j] < 0) {
                v[j] = v[2] > 0 ? 0 : -1;
            }
        } else if (v[j] >= len) {
            v[j] = v[2] > 0 ? len : len - 1;
        }
    }

    if (o.t == MOE_JV_LIST) {
        r = moe_jv_list(c);
    } else {
        r = moe_jv_str(NULL, "", 0);
    }
    if (o.t == MOE_JV_STR && v[2] == 1) {
        return v[0] < v[1] ? moe_jv_str(NULL, o.u.s.p + offs[v[0]],
                                        offs[v[1]] - offs[v[0]])
                           : r;
    }
    {
        char    *buf = NULL;
        size_t   bn = 0;

        if (o.t == MOE_JV_STR) {
            buf = moe_jj_xalloc(c, o.u.s.n + 1);
        }
        for (i = v[0]; v[2] > 0 ? i < v[1] : i > v[1]; i += v[2]) {
            if (o.t == MOE_JV_LIST) {
                moe_jv_push(c, &r, o.u.l->v[i]);
            } else {
                memcpy(buf + bn, o.u.s.p + offs[i], offs[i + 1] - offs[i]);
                bn += offs[i + 1] - offs[i];
            }
        }
        if (o.t == MOE_JV_STR) {
            r = moe_jv_str(NULL, buf, bn);
        }
    }
    return r;
}


static double
moe_jj_num(moe_jj_ctx_t *c, moe_jv_t v, const char *op, moe_jv_t o, int line)
{
    if (v.t == MOE_JV_FLOAT) {
        return v.u.f;
    }
    if (v.t == MOE_JV_INT || v.t == MOE_JV_BOOL) {
        return (double) v.u.i;
    }
    if (v.t == MOE_JV_UNDEF) {
        moe_jj_undef_fail(c, v, line);
    }
    moe_jj_fail(c, MOE_EINVAL, "unsupported operand types for %s: '%s' and "
                "'%s' at line %d", op, moe_jv_type(v), moe_jv_type(o), line);
}


static moe_jv_t
moe_jj_repeat(moe_jj_ctx_t *c, moe_jv_t s, long long k)
{
    moe_jv_t   r;
    long long  i;

    if (s.t == MOE_JV_LIST) {
        r = moe_jv_list(c);
        for (i = 0; i < k; i++) {
            size_t  j;

            for (j = 0; j < s.u.l->n; j++) {
                moe_jj_step(c);
                moe_jv_push(c, &r, s.u.l->v[j]);
            }
        }
        return r;
    }
    if (k <= 0 || s.u.s.n == 0) {
        return moe_jv_str(NULL, "", 0);
    }
    if ((unsigned long long) k > MOE_JJ_MAX_OUT / s.u.s.n) {
        moe_jj_fail(c, MOE_EINVAL, "string repetition too large");
    }
    {
        char  *p = moe_jj_xalloc(c, s.u.s.n * (size_t) k + 1);

        for (i = 0; i < k; i++) {
            memcpy(p + (size_t) i * s.u.s.n, s.u.s.p, s.u.s.n);
        }
        return moe_jv_str(NULL, p, s.u.s.n * (size_t) k);
    }
}


static moe_jv_t
moe_jj_binop(moe_jj_ctx_t *c, moe_jn_t *n, moe_jv_t a, moe_jv_t b)
{
    const char  *op = n->s;
    double       x, y;
    int          ints = (a.t == MOE_JV_INT || a.t == MOE_JV_BOOL)
                        && (b.t == MOE_JV_INT || b.t == MOE_JV_BOOL);
    long long    r;

    if (op[0] == '~') {
        moe_jv_t  sa = moe_jv_tostr(c, a), sb = moe_jv_tostr(c, b);

        return moe_jv_concat(c, sa, sb);
    }
    if (op[0] == '+' && a.t == MOE_JV_STR && b.t == MOE_JV_STR) {
        return moe_jv_concat(c, a, b);
    }
    if (op[0] == '+' && a.t == MOE_JV_LIST && b.t == MOE_JV_LIST) {
        moe_jv_t  l = moe_jv_list(c);
        size_t    i;

        for (i = 0; i < a.u.l->n; i++) moe_jv_push(c, &l, a.u.l->v[i]);
        for (i = 0; i < b.u.l->n; i++) moe_jv_push(c, &l, b.u.l->v[i]);
        l.flag = a.flag;
        return l;
    }
    if (op[0] == '*' && op[1] == '\0' && (a.t == MOE_JV_STR
                                          || a.t == MOE_JV_LIST) && ints == 0
        && (b.t == MOE_JV_INT || b.t == MOE_JV_BOOL))
    {
        return moe_jj_repeat(c, a, b.u.i);
    }
    if (op[0] == '*' && op[1] == '\0' && (b.t == MOE_JV_STR
                                          || b.t == MOE_JV_LIST)
        && (a.t == MOE_JV_INT || a.t == MOE_JV_BOOL))
    {
        return moe_jj_repeat(c, b, a.u.i);
    }

    x = moe_jj_num(c, a, op, b, n->line);
    y = moe_jj_num(c, b, op, a, n->line);

    if (ints) {
        long long  i = a.u.i, j = b.u.i;

        switch (op[0]) {
        case '+':
            if (!__builtin_add_overflow(i, j, &r)) return moe_jv_int(r);
            break;
        case '-':
            if (!__builtin_sub_overflow(i, j, &r)) return moe_jv_int(r);
            break;
        case '*':
            if (op[1] == '*') {
                if (j < 0) {
                    return moe_jv_float(pow(x, y));
                }
                r = 1;
                while (j-- > 0) {
                    if (__builtin_mul_overflow(r, i, &r)) {
                        moe_jj_fail(c, MOE_EINVAL, "integer overflow at line "
                                    "%d", n->line);
                    }
                }
                return moe_jv_int(r);
            }
            if (!__builtin_mul_overflow(i, j, &r)) return moe_jv_int(r);
            break;
        case '/':
        case '%':
            if (j == 0) {
                moe_jj_fail(c, MOE_EINVAL, "division by zero at line %d",
                            n->line);
            }
            if (op[0] == '/' && op[1] == '\0') {
                return moe_jv_float(x / y);
            }
            if (i == -9223372036854775807LL - 1 && j == -1) {
                break;
            }
            r = i % j;
            if (r != 0 && ((r < 0) != (j < 0))) {
                return op[0] == '%' ? moe_jv_int(r + j)
                                    : moe_jv_int(i / j - 1);
            }
            return op[0] == '%' ? moe_jv_int(r) : moe_jv_int(i / j);
        }
        moe_jj_fail(c, MOE_EINVAL, "integer overflow at line %d", n->line);
    }

    switch (op[0]) {
    case '+': return moe_jv_float(x + y);
    case '-': return moe_jv_float(x - y);
    case '*': return moe_jv_float(op[1] == '*' ? pow(x, y) : x * y);
    default:
        if (y == 0.0) {
            moe_jj_fail(c, MOE_EINVAL, "division by zero at line %d", n->line);
        }
        if (op[0] == '/' && op[1] == '\0') {
            return moe_jv_float(x / y);
        }
        if (op[0] == '/') {
            return moe_jv_float(floor(x / y));
        }
        x = fmod(x, y);
        if (x != 0.0 && ((x < 0) != (y < 0))) {
            x += y;
        }
        return moe_jv_float(x);
    }
}


static int
moe_jj_contains(moe_jj_ctx_t *c, moe_jv_t hay, moe_jv_t needle, int line)
{
    size_t  i;

    switch (hay.t) {
    case MOE_JV_UNDEF:
        return 0;
    case MOE_JV_STR:
        if (needle.t != MOE_JV_STR) {
            moe_jj_fail(c, MOE_EINVAL, "'in <string>' requires string as left "
                        "operand, not %s at line %d", moe_jv_type(needle),
                        line);
        }
        if (needle.u.s.n == 0) {
            return 1;
        }
        for (i = 0; i + needle.u.s.n <= hay.u.s.n; i++) {
            if (memcmp(hay.u.s.p + i, needle.u.s.p, needle.u.s.n) == 0) {
                return 1;
            }
        }
        return 0;
    case MOE_JV_LIST:
        for (i = 0; i < hay.u.l->n; i++) {
            if (moe_jv_eq(hay.u.l->v[i], needle)) {
                return 1;
            }
        }
        return 0;
    case MOE_JV_DICT:
        return moe_jv_dict_find(hay.u.d, needle) != NULL;
    }
    moe_jj_fail(c, MOE_EINVAL, "argument of type '%s' is not iterable at "
                "line %d", moe_jv_type(hay), line);
}


/* Evaluates call arguments into args[] (positional then keyword). */
static moe_jv_t *
moe_jj_args(moe_jj_ctx_t *c, moe_jn_t *n)
{
    moe_jv_t  *args = NULL;
    int        i;

    if (n->nkids > 0) {
        args = moe_jj_xalloc(c, (size_t) n->nkids * sizeof(*args));
        for (i = 0; i < n->nkids; i++) {
            args[i] = moe_jj_eval(c, n->kids[i]);
        }
    }
    return args;
}


static moe_jv_t
moe_jj_eval(moe_jj_ctx_t *c, moe_jn_t *n)
{
    moe_jv_t   a, b, *p;
    int        i;

    moe_jj_step(c);

    switch (n->t) {
    case MOE_JN_LIT:
        return n->v;

    case MOE_JN_NAME:
        p = moe_jj_lookup(c, n->s, n->sn);
        return p ? *p : moe_jv_undef(n->s);

    case MOE_JN_LIST:
    case MOE_JN_TUPLE:
        a = moe_jv_list(c);
        a.flag = n->t == MOE_JN_TUPLE;
        for (i = 0; i < n->nkids; i++) {
            moe_jv_push(c, &a, moe_jj_eval(c, n->kids[i]));
        }
        return a;

    case MOE_JN_DICT:
        a = moe_jv_dict(c);
        for (i = 0; i + 1 < n->nkids; i += 2) {
            b = moe_jj_eval(c, n->kids[i]);
            moe_jv_dict_set(c, a.u.d, b, moe_jj_eval(c, n->kids[i + 1]));
        }
        return a;

    case MOE_JN_ATTR:
        a = moe_jj_eval(c, n->a);
        if (a.t == MOE_JV_UNDEF) {
            moe_jj_undef_fail(c, a, n->line);
        }
        if (a.t == MOE_JV_DICT) {
            p = moe_jv_dict_get(a.u.d, n->s, n->sn);
            if (p != NULL) {
                return *p;
            }
        } else if (a.t == MOE_JV_LIST && n->s[0] >= '0' && n->s[0] <= '9') {
            return moe_jj_getitem(c, a, moe_jv_int(strtoll(n->s, NULL, 10)),
                                  n->line);
        }
        return moe_jv_undef(moe_jj_strdup(&c->arena, n->s, n->sn));

    case MOE_JN_ITEM:
        a = moe_jj_eval(c, n->a);
        return moe_jj_getitem(c, a, moe_jj_eval(c, n->b), n->line);

    case MOE_JN_SLICE:
        return moe_jj_slice(c, n);

    case MOE_JN_CALL: {
        moe_jv_t  *args;

        if (n->a->t == MOE_JN_ATTR) {
            a = moe_jj_eval(c, n->a->a);
            if (a.t == MOE_JV_UNDEF) {
                moe_jj_undef_fail(c, a, n->line);
            }
            args = moe_jj_args(c, n);
            return moe_jj_method(c, n, a,
                                 moe_jj_strdup(&c->arena, n->a->s, n->a->sn),
                                 args, n->nargs, n->kw + n->nargs,
                                 n->nkids - n->nargs);
        }
        if (n->a->t == MOE_JN_NAME
            && moe_jj_lookup(c, n->a->s, n->a->sn) == NULL)
        {
            args = moe_jj_args(c, n);
            return moe_jj_global_call(c, n, n->a->s, args, n->nargs,
                                      n->kw + n->nargs, n->nkids - n->nargs);
        }
        a = moe_jj_eval(c, n->a);
        if (a.t == MOE_JV_UNDEF) {
            moe_jj_undef_fail(c, a, n->line);
        }
        moe_jj_fail(c, MOE_EINVAL, "'%s' object is not callable at line %d",
                    moe_jv_type(a), n->line);
    }

    case MOE_JN_FILTER: {
        moe_jv_t  *args;

        a = moe_jj_eval(c, n->a);
        args = moe_jj_args(c, n);
        return moe_jj_filter(c, n, a, args, n->nargs, n->kw + n->nargs,
                             n->nkids - n->nargs);
    }

    case MOE_JN_TEST: {
        moe_jv_t  *args;

        a = moe_jj_eval(c, n->a);
        args = moe_jj_args(c, n);
        return moe_jv_bool(moe_jj_test(c, n, a, args, n->nargs));
    }

    case MOE_JN_UNARY:
        a = moe_jj_eval(c, n->a);
        if (n->s[0] == '-') {
            if (a.t == MOE_JV_INT || a.t == MOE_JV_BOOL) {
                if (a.u.i == -9223372036854775807LL - 1) {
                    moe_jj_fail(c, MOE_EINVAL, "integer overflow at line %d",
                                n->line);
                }
                return moe_jv_int(-a.u.i);
            }
            return moe_jv_float(-moe_jj_num(c, a, "-", a, n->line));
        }
        moe_jj_num(c, a, "+", a, n->line);
        return a.t == MOE_JV_BOOL ? moe_jv_int(a.u.i) : a;

    case MOE_JN_BIN:
        a = moe_jj_eval(c, n->a);
        b = moe_jj_eval(c, n->b);
        return moe_jj_binop(c, n, a, b);

    case MOE_JN_AND:
        a = moe_jj_eval(c, n->a);
        return moe_jv_truthy(a) ? moe_jj_eval(c, n->b) : a;

    case MOE_JN_OR:
        a = moe_jj_eval(c, n->a);
        return moe_jv_truthy(a) ? a : moe_jj_eval(c, n->b);

    case MOE_JN_NOT:
        return moe_jv_bool(!moe_jv_truthy(moe_jj_eval(c, n->a)));

    case MOE_JN_CMP:
        a = moe_jj_eval(c, n->kids[0]);
        for (i = 1; i < n->nkids; i++) {
            const char  *op = n->kw[i];
            int          ok;

            b = moe_jj_eval(c, n->kids[i]);
            if (op[0] == '=' || op[0] == '!') {
                ok = moe_jv_eq(a, b) == (op[0] == '=');
            } else if (op[0] == 'i' || op[0] == 'n') {
                ok = moe_jj_contains(c, b, a, n->line) == (op[0] == 'i');
            } else {
                int  r = moe_jv_cmp(c, a, b, n->line);

                ok = op[0] == '<' ? (op[1] ? r <= 0 : r < 0)
                                  : (op[1] ? r >= 0 : r > 0);
            }
            if (!ok) {
                return moe_jv_bool(0);
            }
            a = b;
        }
        return moe_jv_bool(1);

    case MOE_JN_COND:
        if (moe_jv_truthy(moe_jj_eval(c, n->a))) {
            return moe_jj_eval(c, n->b);
        }
        return n->c ? moe_jj_eval(c, n->c) : moe_jv_undef("else");
    }

    moe_jj_fail(c, MOE_EINVAL, "unsupported expression at line %d", n->line);
}


static moe_jv_t
moe_jj_iterable(moe_jj_ctx_t *c, moe_jv_t v, int line)
{
    moe_jv_t  l;
    size_t    i;

    switch (v.t) {
    case MOE_JV_LIST:
        return v;
    case MOE_JV_UNDEF:
        return moe_jv_list(c);
    case MOE_JV_DICT:
        if (v.flag) {
            break;
        }
        l = moe_jv_list(c);
        for (i = 0; i < v.u.d->n; i++) {
            moe_jv_push(c, &l, v.u.d->k[i]);
        }
        return l;
    case MOE_JV_STR:
        l = moe_jv_list(c);
        for (i = 0; i < v.u.s.n; ) {
            size_t  j = i + 1;

            while (j < v.u.s.n && ((unsigned char) v.u.s.p[j] & 0xc0) == 0x80) {
                j++;
            }
            moe_jv_push(c, &l, moe_jv_str(NULL, v.u.s.p + i, j - i));
            i = j;
        }
        return l;
    default:
        break;
    }
    moe_jj_fail(c, MOE_EINVAL, "'%s' object is not iterable at line %d",
                moe_jv_type(v), line);
}


static void
moe_jj_bind(moe_jj_ctx_t *c, moe_jn_t *n, moe_jv_t v)
{
    int  i;

    if (n->nkids == 1) {
        moe_jj_assign(c, n->kids[0]->s, v);
        return;
    }
    if (v.t != MOE_JV_LIST || (int) v.u.l->n != n->nkids) {
        moe_jj_fail(c, MOE_EINVAL, "cannot unpack %s into %d names at line %d",
                    moe_jv_type(v), n->nkids, n->line);
    }
    for (i = 0; i < n->nkids; i++) {
        moe_jj_assign(c, n->kids[i]->s, v.u.l->v[i]);
    }
}


static void
moe_jj_for(moe_jj_ctx_t *c, moe_jn_t *n)
{
    moe_jv_t        items = moe_jj_iterable(c, moe_jj_eval(c, n->a), n->line);
    moe_jj_scope_t  scope;
    size_t          i, len;

    scope.up = c->scope;
    scope.vars = moe_jv_dict(c).u.d;
    c->scope = &scope;

    if (n->cond != NULL) {
        moe_jv_t  kept = moe_jv_list(c);

        for (i = 0; i < items.u.l->n; i++) {
            moe_jj_bind(c, n, items.u.l->v[i]);
            if (moe_jv_truthy(moe_jj_eval(c, n->cond))) {
                moe_jv_push(c, &kept, items.u.l->v[i]);
            }
        }
        items = kept;
    }

    len = items.u.l->n;
    for (i = 0; i < len; i++) {
        moe_jv_t  loop = moe_jv_dict(c);

#define MOE_JJ_LOOP(k, v) \
        moe_jv_dict_set(c, loop.u.d, moe_jv_str(NULL, k, sizeof(k) - 1), v)
        MOE_JJ_LOOP("index", moe_jv_int((long long) i + 1));
        MOE_JJ_LOOP("index0", moe_jv_int((long long) i));
        MOE_JJ_LOOP("revindex", moe_jv_int((long long) (len - i)));
        MOE_JJ_LOOP("revindex0", moe_jv_int((long long) (len - i - 1)));
        MOE_JJ_LOOP("first", moe_jv_bool(i == 0));
        MOE_JJ_LOOP("last", moe_jv_bool(i + 1 == len));
        MOE_JJ_LOOP("length", moe_jv_int((long long) len));
        MOE_JJ_LOOP("depth", moe_jv_int(1));
        MOE_JJ_LOOP("depth0", moe_jv_int(0));
        MOE_JJ_LOOP("previtem", i > 0 ? items.u.l->v[i - 1]
                                      : moe_jv_undef("previtem"));
        MOE_JJ_LOOP("nextitem", i + 1 < len ? items.u.l->v[i + 1]
                                            : moe_jv_undef("nextitem"));
#undef MOE_JJ_LOOP
        moe_jj_assign(c, "loop", loop);
        moe_jj_bind(c, n, items.u.l->v[i]);
        moe_jj_exec(c, n->b);
        if (c->brk == 1) {
            c->brk = 0;
            break;
        }
        c->brk = 0;
    }

    c->scope = scope.up;

    if (len == 0 && n->c != NULL) {
        moe_jj_exec(c, n->c);
    }
}


void
moe_jj_exec(moe_jj_ctx_t *c, moe_jn_t *n)
{
    moe_jv_t  v, *p;
    int       i;

    moe_jj_step(c);

    switch (n->t) {
    case MOE_JN_BODY:
        for (i = 0; i < n->nkids && c->brk == 0; i++) {
            moe_jj_exec(c, n->kids[i]);
        }
        return;

    case MOE_JN_TEXT:
        moe_jj_out(c, n->s, n->sn);
        return;

    case MOE_JN_OUT:
        v = moe_jv_tostr(c, moe_jj_eval(c, n->a));
        moe_jj_out(c, v.u.s.p, v.u.s.n);
        return;

    case MOE_JN_IF:
        if (moe_jv_truthy(moe_jj_eval(c, n->a))) {
            moe_jj_exec(c, n->b);
        } else if (n->c != NULL) {
            moe_jj_exec(c, n->c);
        }
        return;

    case MOE_JN_FOR:
        moe_jj_for(c, n);
        return;

    case MOE_JN_SET:
        v = moe_jj_eval(c, n->a);
        if (n->s != NULL) {
            p = moe_jj_lookup(c, n->kids[0]->s, n->kids[0]->sn);
            if (p == NULL || p->t != MOE_JV_DICT || !p->flag) {
                moe_jj_fail(c, MOE_EINVAL, "cannot assign attribute on "
                            "non-namespace object at line %d", n->line);
            }
            moe_jv_dict_set(c, p->u.d, moe_jv_str(NULL, n->s, n->sn), v);
            return;
        }
        moe_jj_bind(c, n, v);
        return;

    case MOE_JN_SETBLOCK: {
        char    *out = c->out;
        size_t   len = c->len, cap = c->cap;

        c->out = NULL;
        c->len = c->cap = 0;
        moe_jj_exec(c, n->b);
        v = moe_jv_str(NULL, c->out ? c->out : "", c->len);
        c->out = out;
        c->len = len;
        c->cap = cap;
        moe_jj_assign(c, n->kids[0]->s, v);
        return;
    }

    case MOE_JN_BREAK:
        c->brk = 1;
        return;

    case MOE_JN_CONTINUE:
        c->brk = 2;
        return;
    }

    moe_jj_fail(c, MOE_EINVAL, "unsupported statement at line %d", n->line);
}
