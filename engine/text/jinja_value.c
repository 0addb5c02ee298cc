/*
 * Jinja base layer, called by every other jinja_*.c file and calling none
 * of them: the render failure path (moe_jj_fail), the arena, value
 * constructors, Python-compatible truth, equality,
 * ordering, str()/repr() and json.dumps(ensure_ascii=False).
 */

#include <math.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "text/jinja_int.h"

/*
 * The one failure path of a render: every layer (values, helpers,
 * builtins, methods, the evaluator) reports through it, so it lives here
 * at the bottom and no file has to call back up to report an error.
 */
void
moe_jj_fail(moe_jj_ctx_t *c, int rc, const char *fmt, ...)
{
    va_list  ap;

    va_start(ap, fmt);
    vsnprintf(c->err, sizeof(c->err), fmt, ap);
    va_end(ap);
    c->rc = rc;
    longjmp(c->jb, 1);
}


struct moe_jj_chunk_s {
    moe_jj_chunk_t  *next;
    size_t           size, used;
    /* data follows, 16-aligned */
};

#define MOE_JJ_CHUNK_HDR  ((sizeof(moe_jj_chunk_t) + 15) & ~(size_t) 15)


void *
moe_jj_alloc(moe_jj_arena_t *a, size_t n)
{
    moe_jj_chunk_t  *c = a->head;
    void            *p;

    n = (n + 15) & ~(size_t) 15;
    if (n == 0) {
        n = 16;
    }
    if (a->cap != 0 && (a->used + n > a->cap || n > a->cap)) {
        return NULL;
    }
    if (c == NULL || c->size - c->used < n) {
        size_t  size = n > 65536 ? n : 65536;

        c = malloc(MOE_JJ_CHUNK_HDR + size);
        if (c == NULL) {
            return NULL;
        }
        c->size = size;
        c->used = 0;
        c->next = a->head;
        a->head = c;
    }
    p = (char *) c + MOE_JJ_CHUNK_HDR + c->used;
    c->used += n;
    a->used += n;

    return p;
}


char *
moe_jj_strdup(moe_jj_arena_t *a, const char *s, size_t n)
{
    char  *p = moe_jj_alloc(a, n + 1);

    if (p != NULL) {
        memcpy(p, s, n);
        p[n] = '\0';
    }
    return p;
}


void
moe_jj_arena_free(moe_jj_arena_t *a)
{
    while (a->head != NULL) {
        moe_jj_chunk_t  *next = a->head->next;

        free(a->head);
        a->head = next;
    }
    a->used = 0;
}


void *
moe_jj_xalloc(moe_jj_ctx_t *c, size_t n)
{
    void  *p = moe_jj_alloc(&c->arena, n);

    if (p == NULL) {
        moe_jj_fail(c, MOE_EINVAL, "template render used too much memory");
    }
    return p;
}


static void *
moe_jj_calloc(moe_jj_ctx_t *c, size_t n)
{
    void  *p = moe_jj_xalloc(c, n);

    memset(p, 0, n);
    return p;
}


/* ------------------------------------------------------------ utf-8 */

size_t
moe_jj_utf8_len(const char *p, size_t n)
{
    size_t  i, k = 0;

    for (i = 0; i < n; i++) {
        if (((unsigned char) p[i] & 0xc0) != 0x80) {
            k++;
        }
    }
    return k;
}


size_t
moe_jj_utf8_off(const char *p, size_t n, size_t idx)
{
    size_t  i, k = 0;

    for (i = 0; i < n; i++) {
        if (((unsigned char) p[i] & 0xc0) != 0x80) {
            if (k++ == idx) {
                return i;
            }
        }
    }
    return n;
}


static int
moe_jj_is_space_cp(unsigned long cp)
{
    return (cp >= 0x09 && cp <= 0x0d) || (cp >= 0x1c && cp <= 0x20)
           || cp == 0x85 || cp == 0xa0 || cp == 0x1680
           || (cp >= 0x2000 && cp <= 0x200a) || cp == 0x2028
           || cp == 0x2029 || cp == 0x202f || cp == 0x205f || cp == 0x3000;
}


size_t
moe_jj_space(const char *p, size_t n)
{
    const unsigned char  *u = (const unsigned char *) p;

    if (n >= 1 && u[0] < 0x80) {
        return moe_jj_is_space_cp(u[0]) ? 1 : 0;
    }
    if (n >= 2 && (u[0] & 0xe0) == 0xc0) {
        return moe_jj_is_space_cp(((u[0] & 0x1fUL) << 6) | (u[1] & 0x3f))
               ? 2 : 0;
    }
    if (n >= 3 && (u[0] & 0xf0) == 0xe0) {
        return moe_jj_is_space_cp(((u[0] & 0x0fUL) << 12)
                                  | ((u[1] & 0x3fUL) << 6) | (u[2] & 0x3f))
               ? 3 : 0;
    }
    return 0;
}


size_t
moe_jj_space_back(const char *p, size_t n)
{
    size_t  k;

    for (k = 1; k <= 3 && k <= n; k++) {
        if (((unsigned char) p[n - k] & 0xc0) != 0x80) {
            return moe_jj_space(p + n - k, k) == k ? k : 0;
        }
    }
    return 0;
}


/* ------------------------------------------------------------ make */

/* A zeroed value of type t. */
static moe_jv_t
moe_jv_new(int t)
{
    moe_jv_t  v;

    memset(&v, 0, sizeof(v));
    v.t = t;
    return v;
}


moe_jv_t
moe_jv_str(moe_jj_ctx_t *c, const char *p, size_t n)
{
    moe_jv_t  v = moe_jv_new(MOE_JV_STR);

    v.u.s.p = p;
    v.u.s.n = n;
    if (c != NULL) {
        char  *s = moe_jj_xalloc(c, n + 1);

        memcpy(s, p, n);
        s[n] = '\0';
        v.u.s.p = s;
    }
    return v;
}


moe_jv_t
moe_jv_cstr(moe_jj_ctx_t *c, const char *s)
{
    return moe_jv_str(c, s, strlen(s));
}


/* a + b of two strings, in the render arena */
moe_jv_t
moe_jv_concat(moe_jj_ctx_t *c, moe_jv_t a, moe_jv_t b)
{
    char  *p = moe_jj_xalloc(c, a.u.s.n + b.u.s.n + 1);

    memcpy(p, a.u.s.p, a.u.s.n);
    memcpy(p + a.u.s.n, b.u.s.p, b.u.s.n);
    return moe_jv_str(NULL, p, a.u.s.n + b.u.s.n);
}


moe_jv_t
moe_jv_int(long long i)
{
    moe_jv_t  v = moe_jv_new(MOE_JV_INT);

    v.u.i = i;
    return v;
}


moe_jv_t
moe_jv_float(double f)
{
    moe_jv_t  v = moe_jv_new(MOE_JV_FLOAT);

    v.u.f = f;
    return v;
}


moe_jv_t
moe_jv_bool(int b)
{
    moe_jv_t  v = moe_jv_new(MOE_JV_BOOL);

    v.u.i = b != 0;
    return v;
}


moe_jv_t
moe_jv_none(void)
{
    return moe_jv_new(MOE_JV_NONE);
}


moe_jv_t
moe_jv_undef(const char *name)
{
    moe_jv_t  v = moe_jv_new(MOE_JV_UNDEF);

    v.name = name;
    return v;
}


moe_jv_t
moe_jv_list(moe_jj_ctx_t *c)
{
    moe_jv_t  v = moe_jv_new(MOE_JV_LIST);

    v.u.l = moe_jj_calloc(c, sizeof(*v.u.l));
    return v;
}


moe_jv_t
moe_jv_dict(moe_jj_ctx_t *c)
{
    moe_jv_t  v = moe_jv_new(MOE_JV_DICT);

    v.u.d = moe_jj_calloc(c, sizeof(*v.u.d));
    return v;
}


void
moe_jv_push(moe_jj_ctx_t *c, moe_jv_t *list, moe_jv_t v)
{
    moe_jv_list_t  *l = list->u.l;

    if (l->n == l->cap) {
        size_t     cap = l->cap ? l->cap * 2 : 8;
        moe_jv_t  *nv = moe_jj_calloc(c, cap * sizeof(*nv));

        if (l->n > 0) {
            memcpy(nv, l->v, l->n * sizeof(*nv));
        }
        l->v = nv;
        l->cap = cap;
    }
    l->v[l->n++] = v;
}


moe_jv_t *
moe_jv_dict_find(moe_jv_dict_t *d, moe_jv_t k)
{
    size_t  i;

    for (i = d->n; i-- > 0; ) {
        if (moe_jv_eq(d->k[i], k)) {
            return &d->v[i];
        }
    }
    return NULL;
}


moe_jv_t *
moe_jv_dict_get(moe_jv_dict_t *d, const char *k, size_t n)
{
    size_t  i;

    for (i = d->n; i-- > 0; ) {
        if (d->k[i].t == MOE_JV_STR && d->k[i].u.s.n == n
            && memcmp(d->k[i].u.s.p, k, n) == 0)
        {
            return &d->v[i];
        }
    }
    return NULL;
}


void
moe_jv_dict_set(moe_jj_ctx_t *c, moe_jv_dict_t *d, moe_jv_t k, moe_jv_t v)
{
    moe_jv_t  *slot = moe_jv_dict_find(d, k);

    if (slot != NULL) {
        *slot = v;
        return;
    }
    if (d->n == d->cap) {
        size_t     cap = d->cap ? d->cap * 2 : 8;
        moe_jv_t  *nk = moe_jj_calloc(c, cap * sizeof(*nk));
        moe_jv_t  *nv = moe_jj_calloc(c, cap * sizeof(*nv));

        if (d->n > 0) {
            memcpy(nk, d->k, d->n * sizeof(*nk));
            memcpy(nv, d->v, d->n * sizeof(*nv));
        }
        d->k = nk;
        d->v = nv;
        d->cap = cap;
    }
    d->k[d->n] = k;
    d->v[d->n] = v;
    d->n++;
}


/* ------------------------------------------------------------ compare */

int
moe_jv_truthy(moe_jv_t v)
{
    switch (v.t) {
    case MOE_JV_BOOL:
    case MOE_JV_INT:   return v.u.i != 0;
    case MOE_JV_FLOAT: return v.u.f != 0.0;
    case MOE_JV_STR:   return v.u.s.n != 0;
    case MOE_JV_LIST:  return v.u.l->n != 0;
    case MOE_JV_DICT:  return v.flag || v.u.d->n != 0;
    default:           return 0;
    }
}


static int
moe_jv_isnum(moe_jv_t v)
{
    return v.t == MOE_JV_BOOL || v.t == MOE_JV_INT || v.t == MOE_JV_FLOAT;
}


int
moe_jv_eq(moe_jv_t a, moe_jv_t b)
{
    size_t  i;

    if (moe_jv_isnum(a) && moe_jv_isnum(b)) {
        if (a.t != MOE_JV_FLOAT && b.t != MOE_JV_FLOAT) {
            return a.u.i == b.u.i;
        }
        return (a.t == MOE_JV_FLOAT ? a.u.f : (double) a.u.i)
               == (b.t == MOE_JV_FLOAT ? b.u.f : (double) b.u.i);
    }
    if (a.t != b.t) {
        return 0;
    }
    switch (a.t) {
    case MOE_JV_UNDEF:
    case MOE_JV_NONE:
        return 1;
    case MOE_JV_STR:
        return a.u.s.n == b.u.s.n && memcmp(a.u.s.p, b.u.s.p, a.u.s.n) == 0;
    case MOE_JV_LIST:
        if (a.u.l->n != b.u.l->n || a.flag != b.flag) {
            return 0;
        }
        for (i = 0; i < a.u.l->n; i++) {
            if (!moe_jv_eq(a.u.l->v[i], b.u.l->v[i])) {
                return 0;
            }
        }
        return 1;
    case MOE_JV_DICT:
        if (a.flag || b.flag) {
            return a.u.d == b.u.d;
        }
        if (a.u.d->n != b.u.d->n) {
            return 0;
        }
        for (i = 0; i < a.u.d->n; i++) {
            moe_jv_t  *o = moe_jv_dict_find(b.u.d, a.u.d->k[i]);

            if (o == NULL || !moe_jv_eq(a.u.d->v[i], *o)) {
                return 0;
            }
        }
        return 1;
    }
    return 0;
}


const char *
moe_jv_type(moe_jv_t v)
{
    static const char  *names[] = { "Undefined", "NoneType", "bool", "int",
                                    "float", "str", "list", "dict" };

    if (v.t == MOE_JV_LIST && v.flag) {
        return "tuple";
    }
    return names[v.t];
}


int
moe_jv_cmp(moe_jj_ctx_t *c, moe_jv_t a, moe_jv_t b, int line)
{
    if (moe_jv_isnum(a) && moe_jv_isnum(b)) {
        double  x, y;

        if (a.t != MOE_JV_FLOAT && b.t != MOE_JV_FLOAT) {
            return a.u.i < b.u.i ? -1 : a.u.i > b.u.i;
        }
        x = a.t == MOE_JV_FLOAT ? a.u.f : (double) a.u.i;
        y = b.t == MOE_JV_FLOAT ? b.u.f : (double) b.u.i;
        return x < y ? -1 : x > y;
    }
    if (a.t == MOE_JV_STR && b.t == MOE_JV_STR) {
        size_t  n = a.u.s.n < b.u.s.n ? a.u.s.n : b.u.s.n;
        int     r = memcmp(a.u.s.p, b.u.s.p, n);

        if (r != 0) {
            return r < 0 ? -1 : 1;
        }
        return a.u.s.n < b.u.s.n ? -1 : a.u.s.n > b.u.s.n;
    }
    if (a.t == MOE_JV_LIST && b.t == MOE_JV_LIST) {
        size_t  i;

        for (i = 0; i < a.u.l->n && i < b.u.l->n; i++) {
            int  r = moe_jv_cmp(c, a.u.l->v[i], b.u.l->v[i], line);

            if (r != 0) {
                return r;
            }
        }
        return a.u.l->n < b.u.l->n ? -1 : a.u.l->n > b.u.l->n;
    }
    moe_jj_fail(c, MOE_EINVAL, "cannot order '%s' and '%s' at line %d",
                moe_jv_type(a), moe_jv_type(b), line);
}


/* ------------------------------------------------------------ text */

typedef struct {
    moe_jj_ctx_t  *c;
    char          *p;
    size_t         n, cap;
} moe_jj_sb_t;


static void
moe_jj_sb_add(moe_jj_sb_t *b, const char *s, size_t n)
{
    if (b->n + n + 1 > b->cap) {
        size_t  cap = b->cap ? b->cap * 2 : 64;
        char   *p;

        while (cap < b->n + n + 1) {
            cap *= 2;
        }
        p = moe_jj_xalloc(b->c, cap);
        if (b->n > 0) {
            memcpy(p, b->p, b->n);
        }
        b->p = p;
        b->cap = cap;
    }
    memcpy(b->p + b->n, s, n);
    b->n += n;
    b->p[b->n] = '\0';
}


static void
moe_jj_sb_str(moe_jj_sb_t *b, const char *s)
{
    moe_jj_sb_add(b, s, strlen(s));
}


/* Python's repr(float) */
static void
moe_jj_float_repr(char *buf, size_t len, double f, int json)
{
    int     p, e;
    char    tmp[64];

    if (isnan(f)) {
        snprintf(buf, len, "%s", json ? "NaN" : "nan");
        return;
    }
    if (isinf(f)) {
        snprintf(buf, len, "%s%s", f < 0 ? "-" : "", json ? "Infinity" : "inf");
        return;
    }
    for (p = 1; p < 17; p++) {
        snprintf(tmp, sizeof(tmp), "%.*e", p - 1, f);
        if (strtod(tmp, NULL) == f) {
            break;
        }
    }
    snprintf(tmp, sizeof(tmp), "%.*e", p - 1, f);
    e = atoi(strchr(tmp, 'e') + 1);
    if (e >= -4 && e < 16) {
        int  dec = p - 1 - e;

        snprintf(buf, len, "%.*f", dec > 0 ? dec : 0, f);
        if (strchr(buf, '.') == NULL) {
            snprintf(buf + strlen(buf), len - strlen(buf), ".0");
        }
    } else {
        char  *ep = strchr(tmp, 'e');

        snprintf(buf, len, "%.*se%c%02d", (int) (ep - tmp), tmp,
                 e < 0 ? '-' : '+', e < 0 ? -e : e);
    }
}


static void moe_jj_repr(moe_jj_sb_t *b, moe_jv_t v, int depth);


static void
moe_jj_str_into(moe_jj_sb_t *b, moe_jv_t v, int depth)
{
    char    buf[64];
    size_t  i;

    if (depth > MOE_JJ_MAX_DEPTH) {
        moe_jj_fail(b->c, MOE_EINVAL, "value nested too deeply");
    }
    switch (v.t) {
    case MOE_JV_UNDEF: return;
    case MOE_JV_NONE:  moe_jj_sb_str(b, "None"); return;
    case MOE_JV_BOOL:  moe_jj_sb_str(b, v.u.i ? "True" : "False"); return;
    case MOE_JV_INT:
        snprintf(buf, sizeof(buf), "%lld", v.u.i);
        moe_jj_sb_str(b, buf);
        return;
    case MOE_JV_FLOAT:
        moe_jj_float_repr(buf, sizeof(buf), v.u.f, 0);
        moe_jj_sb_str(b, buf);
        return;
    case MOE_JV_STR:
        moe_jj_sb_add(b, v.u.s.p, v.u.s.n);
        return;
    case MOE_JV_LIST:
        moe_jj_sb_str(b, v.flag ? "(" : "[");
        for (i = 0; i < v.u.l->n; i++) {
            if (i > 0) {
                moe_jj_sb_str(b, ", ");
            }
            moe_jj_repr(b, v.u.l->v[i], depth + 1);
        }
        moe_jj_sb_str(b, v.flag ? (v.u.l->n == 1 ? ",)" : ")") : "]");
        return;
    case MOE_JV_DICT:
        moe_jj_sb_str(b, v.flag ? "<Namespace {" : "{");
        for (i = 0; i < v.u.d->n; i++) {
            if (i > 0) {
                moe_jj_sb_str(b, ", ");
            }
            moe_jj_repr(b, v.u.d->k[i], depth + 1);
            moe_jj_sb_str(b, ": ");
            moe_jj_repr(b, v.u.d->v[i], depth + 1);
        }
        moe_jj_sb_str(b, v.flag ? "}>" : "}");
        return;
    }
}


static void
moe_jj_repr(moe_jj_sb_t *b, moe_jv_t v, int depth)
{
    size_t  i;
    int     q = '\'';

    if (v.t != MOE_JV_STR) {
        moe_jj_str_into(b, v, depth);
        return;
    }
    if (memchr(v.u.s.p, '\'', v.u.s.n) && !memchr(v.u.s.p, '"', v.u.s.n)) {
        q = '"';
    }
    moe_jj_sb_add(b, (char *) &q, 1);
    for (i = 0; i < v.u.s.n; i++) {
        unsigned char  ch = (unsigned char) v.u.s.p[i];
        char           esc[8];

        if (ch == '\\' || ch == q) {
            esc[0] = '\\';
            esc[1] = (char) ch;
            moe_jj_sb_add(b, esc, 2);
        } else if (ch == '\n') {
            moe_jj_sb_str(b, "\\n");
        } else if (ch == '\r') {
            moe_jj_sb_str(b, "\\r");
        } else if (ch == '\t') {
            moe_jj_sb_str(b, "\\t");
        } else if (ch < 0x20 || ch == 0x7f) {
            snprintf(esc, sizeof(esc), "\\x%02x", ch);
            moe_jj_sb_str(b, esc);
        } else {
            moe_jj_sb_add(b, (char *) &ch, 1);
        }
    }
    moe_jj_sb_add(b, (char *) &q, 1);
}


moe_jv_t
moe_jv_tostr(moe_jj_ctx_t *c, moe_jv_t v)
{
    moe_jj_sb_t  b = { c, NULL, 0, 0 };

    if (v.t == MOE_JV_STR) {
        return v;
    }
    moe_jj_str_into(&b, v, 0);
    return moe_jv_str(NULL, b.p ? b.p : "", b.n);
}


static void
moe_jj_json_str(moe_jj_sb_t *b, const char *p, size_t n)
{
    size_t  i, start = 0;

    moe_jj_sb_add(b, "\"", 1);
    for (i = 0; i < n; i++) {
        unsigned char  ch = (unsigned char) p[i];
        char           esc[8];

        if (ch >= 0x20 && ch != '"' && ch != '\\') {
            continue;
        }
        moe_jj_sb_add(b, p + start, i - start);
        start = i + 1;
        switch (ch) {
        case '"':  moe_jj_sb_str(b, "\\\""); break;
        case '\\': moe_jj_sb_str(b, "\\\\"); break;
        case '\n': moe_jj_sb_str(b, "\\n"); break;
        case '\r': moe_jj_sb_str(b, "\\r"); break;
        case '\t': moe_jj_sb_str(b, "\\t"); break;
        case '\b': moe_jj_sb_str(b, "\\b"); break;
        case '\f': moe_jj_sb_str(b, "\\f"); break;
        default:
            snprintf(esc, sizeof(esc), "\\u%04x", ch);
            moe_jj_sb_str(b, esc);
        }
    }
    moe_jj_sb_add(b, p + start, n - start);
    moe_jj_sb_add(b, "\"", 1);
}


static void
moe_jj_json_nl(moe_jj_sb_t *b, int indent, int level)
{
    int  i;

    moe_jj_sb_add(b, "\n", 1);
    for (i = 0; i < indent * level; i++) {
        moe_jj_sb_add(b, " ", 1);
    }
}


static int
moe_jj_key_cmp(const void *x, const void *y)
{
    const moe_jv_t  *a = *(const moe_jv_t * const *) x;
    const moe_jv_t  *b = *(const moe_jv_t * const *) y;
    size_t           n = a->u.s.n < b->u.s.n ? a->u.s.n : b->u.s.n;
    int              r = memcmp(a->u.s.p, b->u.s.p, n);

    return r ? r : (a->u.s.n > b->u.s.n) - (a->u.s.n < b->u.s.n);
}


static void
moe_jj_json(moe_jj_sb_t *b, moe_jv_t v, int indent, int sort, int level,
    int line)
{
    char    buf[64];
    size_t  i, n;
    const char *sep = indent >= 0 ? "," : ", ";

    if (level > MOE_JJ_MAX_DEPTH) {
        moe_jj_fail(b->c, MOE_EINVAL, "value nested too deeply");
    }
    switch (v.t) {
    case MOE_JV_NONE: moe_jj_sb_str(b, "null"); return;
    case MOE_JV_BOOL: moe_jj_sb_str(b, v.u.i ? "true" : "false"); return;
    case MOE_JV_INT:
        snprintf(buf, sizeof(buf), "%lld", v.u.i);
        moe_jj_sb_str(b, buf);
        return;
    case MOE_JV_FLOAT:
        moe_jj_float_repr(buf, sizeof(buf), v.u.f, 1);
        moe_jj_sb_str(b, buf);
        return;
    case MOE_JV_STR:
        moe_jj_json_str(b, v.u.s.p, v.u.s.n);
        return;
    case MOE_JV_LIST:
        n = v.u.l->n;
        if (n == 0) {
            moe_jj_sb_str(b, "[]");
            return;
        }
        moe_jj_sb_str(b, "[");
        for (i = 0; i < n; i++) {
            if (i > 0) {
                moe_jj_sb_str(b, sep);
            }
            if (indent >= 0) {
                moe_jj_json_nl(b, indent, level + 1);
            }
            moe_jj_json(b, v.u.l->v[i], indent, sort, level + 1, line);
        }
        if (indent >= 0) {
            moe_jj_json_nl(b, indent, level);
        }
        moe_jj_sb_str(b, "]");
        return;
    case MOE_JV_DICT: {
        moe_jv_t  **keys;

        n = v.u.d->n;
        if (n == 0 || v.flag) {
            if (v.flag) {
                break;
            }
            moe_jj_sb_str(b, "{}");
            return;
        }
        keys = moe_jj_calloc(b->c, n * sizeof(*keys));
        for (i = 0; i < n; i++) {
            keys[i] = &v.u.d->k[i];
            if (keys[i]->t != MOE_JV_STR) {
                moe_jj_fail(b->c, MOE_EINVAL, "tojson: non-string dict key "
                            "at line %d", line);
            }
        }
        if (sort) {
            qsort(keys, n, sizeof(*keys), moe_jj_key_cmp);
        }
        moe_jj_sb_str(b, "{");
        for (i = 0; i < n; i++) {
            if (i > 0) {
                moe_jj_sb_str(b, sep);
            }
            if (indent >= 0) {
                moe_jj_json_nl(b, indent, level + 1);
            }
            moe_jj_json_str(b, keys[i]->u.s.p, keys[i]->u.s.n);
            moe_jj_sb_str(b, ": ");
            moe_jj_json(b, v.u.d->v[keys[i] - v.u.d->k], indent, sort,
                        level + 1, line);
        }
        if (indent >= 0) {
            moe_jj_json_nl(b, indent, level);
        }
        moe_jj_sb_str(b, "}");
        return;
    }
    default:
        break;
    }
    moe_jj_fail(b->c, MOE_EINVAL, "tojson: %s is not JSON serializable at "
                "line %d", moe_jv_type(v), line);
}


moe_jv_t
moe_jv_tojson(moe_jj_ctx_t *c, moe_jv_t v, int indent, int sort_keys,
    int line)
{
    moe_jj_sb_t  b = { c, NULL, 0, 0 };

    moe_jj_json(&b, v, indent, sort_keys, 0, line);
    return moe_jv_str(NULL, b.p, b.n);
}
