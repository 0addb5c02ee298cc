/*
 * Jinja helpers shared by the filters (jinja_builtins.c) and the str/dict
 * methods (jinja_methods.c): argument lookup by position or keyword, the
 * string operations both offer (strip, case, replace, split,
 * startswith/endswith) and iteration over a value's items.  They call
 * only the value layer (jinja_value.c).
 */

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "text/jinja_int.h"


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
