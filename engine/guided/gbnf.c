/*
 * GBNF (llama.cpp's grammar format) -> a flat byte-level grammar.
 *
 *   rule ::= alt1 | alt2       # comment
 *   items: "literal" (escapes \n \r \t \\ \" \xHH \uHHHH \UHHHHHHHH),
 *          [a-z\n] / [^...] character classes, . (any character),
 *          ( ... ) groups, rule names, postfix * + ? {m} {m,} {m,n}
 *
 * A rule's body runs until the next `name ::=`.  Character classes are
 * over code points; each becomes byte classes (one element for ASCII)
 * plus UTF-8 byte-range sequences for the rest.  Repetitions become
 * right-recursive helper rules.  After parsing: every rule is defined,
 * "root" exists, alternatives that can derive no string are dropped (a
 * root that derives none: "empty language"), and left recursion is
 * refused (the matcher expands stacks eagerly).
 */

#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "guided/guided_int.h"


/* ------------------------------------------------------------ buffers */

void
gb_put(gbuf_t *b, const char *s, size_t n)
{
    char   *p;
    size_t  c;

    if (b->oom) {
        return;
    }
    if (b->len + n + 1 > b->cap) {
        c = b->cap ? b->cap : 256;
        while (c < b->len + n + 1) {
            c *= 2;
        }
        p = realloc(b->p, c);
        if (p == NULL) {
            b->oom = 1;
            return;
        }
        b->p = p;
        b->cap = c;
    }
    memcpy(b->p + b->len, s, n);
    b->len += n;
    b->p[b->len] = '\0';
}


void
gb_puts(gbuf_t *b, const char *s)
{
    gb_put(b, s, strlen(s));
}


void
gb_printf(gbuf_t *b, const char *fmt, ...)
{
    char     tmp[512];
    va_list  ap;
    int      n;

    va_start(ap, fmt);
    n = vsnprintf(tmp, sizeof(tmp), fmt, ap);
    va_end(ap);
    if (n < 0 || (size_t) n >= sizeof(tmp)) {
        b->oom = 1;
        return;
    }
    gb_put(b, tmp, (size_t) n);
}


void
gb_lit(gbuf_t *b, const char *s, size_t n)
{
    size_t         i;
    unsigned char  c;

    gb_put(b, "\"", 1);
    for (i = 0; i < n; i++) {
        c = (unsigned char) s[i];
        if (c == '"' || c == '\\') {
            gb_put(b, "\\", 1);
            gb_put(b, (const char *) &c, 1);
        } else if (c < 0x20 || c == 0x7f) {
            gb_printf(b, "\\x%02X", c);
        } else {
            gb_put(b, (const char *) &c, 1);
        }
    }
    gb_put(b, "\"", 1);
}


void
gb_free(gbuf_t *b)
{
    free(b->p);
    b->p = NULL;
    b->len = b->cap = 0;
}


/* ------------------------------------------------------------ builder */

typedef struct {
    int32_t  *v;
    int       n, cap;
} ivec_t;

typedef struct {
    char     *name;
    ivec_t    body;       /* alternatives separated by GE_ALT */
    int       defined;
    int       name_off;   /* offset of its first mention (errors) */
} prule_t;

typedef struct {
    const char  *s;
    size_t       n, i;
    prule_t     *rules;
    int          n_rules, cap_rules;
    uint32_t   (*cls)[8];
    int          n_cls, cap_cls;
    long         n_el;            /* running total, for the limit */
    int          any_rule;        /* rule of ".", -1 until needed */
    int32_t     *name_slot;       /* (n_name_slot) named rules by name
                                     hash, open addressing; -1 empty */
    int          n_name_slot;     /* power of two (0: none yet) */
    int          n_named;
    char        *err;
    size_t       errlen;
    int          rc;
} gp_t;


static int
iv_push(ivec_t *v, int32_t x)
{
    int32_t *p;
    int      c;

    if (v->n == v->cap) {
        c = v->cap ? v->cap * 2 : 16;
        p = realloc(v->v, sizeof(*p) * (size_t) c);
        if (p == NULL) {
            return -1;
        }
        v->v = p;
        v->cap = c;
    }
    v->v[v->n++] = x;
    return 0;
}


static int
gp_fail(gp_t *p, int rc, const char *fmt, ...)
{
    va_list ap;

    if (p->rc != MOE_OK) {
        return p->rc;
    }
    p->rc = rc;
    if (p->err != NULL && p->errlen) {
        va_start(ap, fmt);
        vsnprintf(p->err, p->errlen, fmt, ap);
        va_end(ap);
    }
    return rc;
}


static int
gp_oom(gp_t *p)
{
    return gp_fail(p, MOE_ENOMEM, "out of memory compiling the guide");
}


static int
gp_too_large(gp_t *p)
{
    return gp_fail(p, MOE_EINVAL,
                   "grammar too large (limits: %d rules, %d elements)",
                   MOE_GRAM_MAX_RULES, MOE_GRAM_MAX_ELEMS);
}


/* a new rule; name NULL: anonymous.  Returns its index or -1. */
static int
gp_new_rule(gp_t *p, const char *name, size_t nl)
{
    prule_t *r;
    int      c;

    if (p->n_rules >= MOE_GRAM_MAX_RULES) {
        gp_too_large(p);
        return -1;
    }
    if (p->n_rules == p->cap_rules) {
        c = p->cap_rules ? p->cap_rules * 2 : 64;
        r = realloc(p->rules, sizeof(*r) * (size_t) c);
        if (r == NULL) {
            gp_oom(p);
            return -1;
        }
        p->rules = r;
        p->cap_rules = c;
    }
    r = &p->rules[p->n_rules];
    memset(r, 0, sizeof(*r));
    r->name_off = (int) p->i;
    if (name != NULL) {
        r->name = strndup(name, nl);
        if (r->name == NULL) {
            gp_oom(p);
            return -1;
        }
    }
    return p->n_rules++;
}


static uint32_t
gp_name_hash(const char *name, size_t nl)
{
    uint32_t h = 2166136261u;
    size_t   i;

    for (i = 0; i < nl; i++) {
        h = (h ^ (unsigned char) name[i]) * 16777619u;
    }
    return h;
}


/* the name table twice as large (or made): 0, or -1 out of memory */
static int
gp_names_grow(gp_t *p)
{
    int      n = p->n_name_slot ? p->n_name_slot * 2 : 256, i;
    int32_t *sl = malloc(sizeof(int32_t) * (size_t) n);

    if (sl == NULL) {
        return -1;
    }
    memset(sl, 0xff, sizeof(int32_t) * (size_t) n);
    for (i = 0; i < p->n_rules; i++) {
        if (p->rules[i].name != NULL) {
            moe_gslot_put(sl, (size_t) n,
                          gp_name_hash(p->rules[i].name,
                                       strlen(p->rules[i].name)), i);
        }
    }
    free(p->name_slot);
    p->name_slot = sl;
    p->n_name_slot = n;
    return 0;
}


/* the rule named name (made on first mention): its index or -1 (hashed:
 * a grammar of 20000 rules used to scan them all for every reference) */
static int
gp_rule_by_name(gp_t *p, const char *name, size_t nl)
{
    uint32_t  j;
    int       r;

    if ((p->n_named + 1) * 2 > p->n_name_slot && gp_names_grow(p) != 0) {
        gp_oom(p);
        return -1;
    }
    for (j = gp_name_hash(name, nl) & (uint32_t) (p->n_name_slot - 1);
         (r = p->name_slot[j]) >= 0;
         j = (j + 1) & (uint32_t) (p->n_name_slot - 1))
    {
        if (strlen(p->rules[r].name) == nl
            && memcmp(p->rules[r].name, name, nl) == 0)
        {
            return r;
        }
    }
    r = gp_new_rule(p, name, nl);
    if (r >= 0) {
        p->name_slot[j] = r;
        p->n_named++;
    }
    return r;
}


static int
gp_emit(gp_t *p, ivec_t *v, int32_t e)
{
    if (++p->n_el > MOE_GRAM_MAX_ELEMS) {
        return gp_too_large(p);
    }
    if (iv_push(v, e) != 0) {
        return gp_oom(p);
    }
    return MOE_OK;
}


/* a byte class from a 256-bit set; returns its element */
static int32_t
gp_class(gp_t *p, const uint32_t set[8])
{
    uint32_t (*c)[8];
    int        k;

    if (p->n_cls == p->cap_cls) {
        k = p->cap_cls ? p->cap_cls * 2 : 64;
        c = realloc(p->cls, sizeof(*c) * (size_t) k);
        if (c == NULL) {
            gp_oom(p);
            return -1;
        }
        p->cls = c;
        p->cap_cls = k;
    }
    memcpy(p->cls[p->n_cls], set, sizeof(uint32_t) * 8);
    return GE_CLASS(p->n_cls++);
}


static int32_t
gp_byte_range(gp_t *p, unsigned lo, unsigned hi)
{
    uint32_t set[8] = {0};
    unsigned b;

    for (b = lo; b <= hi; b++) {
        set[b >> 5] |= 1u << (b & 31);
    }
    return gp_class(p, set);
}


/* ------------------------------------------------------ lexical helpers */

static void
gp_skip(gp_t *p, int newlines)
{
    while (p->i < p->n) {
        char c = p->s[p->i];
        if (c == '#') {
            while (p->i < p->n && p->s[p->i] != '\n') {
                p->i++;
            }
        } else if (c == ' ' || c == '\t' || c == '\r'
                   || (newlines && c == '\n'))
        {
            p->i++;
        } else {
            break;
        }
    }
}


static int
is_name_char(char c)
{
    return (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z')
           || (c >= '0' && c <= '9') || c == '-' || c == '_';
}


/* length of a name at p->i (0: none) */
static size_t
gp_name_len(gp_t *p, size_t at)
{
    size_t k = at;

    while (k < p->n && is_name_char(p->s[k])) {
        k++;
    }
    return k - at;
}


/* 1 when a `name ::=` starts at p->i */
static int
gp_at_rule_head(gp_t *p)
{
    size_t nl = gp_name_len(p, p->i), k;

    if (nl == 0) {
        return 0;
    }
    k = p->i + nl;
    while (k < p->n && (p->s[k] == ' ' || p->s[k] == '\t'
                        || p->s[k] == '\r' || p->s[k] == '\n'))
    {
        k++;
    }
    return k + 3 <= p->n && memcmp(p->s + k, "::=", 3) == 0;
}


static int
hexval(char c)
{
    if (c >= '0' && c <= '9') return c - '0';
    if (c >= 'a' && c <= 'f') return c - 'a' + 10;
    if (c >= 'A' && c <= 'F') return c - 'A' + 10;
    return -1;
}


/* one (possibly escaped) code point at p->i; -1 on error */
static long
gp_char(gp_t *p)
{
    unsigned char c;
    long          cp;
    int           k, nd, h, len;
    size_t        at = p->i;

    if (p->i >= p->n) {
        gp_fail(p, MOE_EINVAL, "grammar: unexpected end at offset %zu", at);
        return -1;
    }
    c = (unsigned char) p->s[p->i];
    if (c == '\\') {
        p->i++;
        if (p->i >= p->n) {
            gp_fail(p, MOE_EINVAL, "grammar: unexpected end at offset %zu",
                    at);
            return -1;
        }
        c = (unsigned char) p->s[p->i++];
        switch (c) {
        case 'n': return '\n';
        case 'r': return '\r';
        case 't': return '\t';
        case 'f': return '\f';
        case 'v': return '\v';
        case '0': return 0;
        case 'x': nd = 2; break;
        case 'u': nd = 4; break;
        case 'U': nd = 8; break;
        default:  return c;     /* \\ \" \[ \] \- \^ ... */
        }
        cp = 0;
        for (k = 0; k < nd; k++) {
            h = p->i < p->n ? hexval(p->s[p->i]) : -1;
            if (h < 0) {
                gp_fail(p, MOE_EINVAL,
                        "grammar: bad \\%c escape at offset %zu", c, at);
                return -1;
            }
            cp = cp * 16 + h;
            p->i++;
        }
        if (cp > 0x10ffff) {
            gp_fail(p, MOE_EINVAL, "grammar: code point out of range at "
                    "offset %zu", at);
            return -1;
        }
        return cp;
    }
    /* UTF-8 */
    if (c < 0x80) {
        p->i++;
        return c;
    }
    len = c >= 0xf0 ? 4 : c >= 0xe0 ? 3 : c >= 0xc0 ? 2 : 0;
    if (len == 0 || p->i + (size_t) len > p->n) {
        gp_fail(p, MOE_EINVAL, "grammar: invalid UTF-8 at offset %zu", at);
        return -1;
    }
    cp = c & (0x3f >> (len - 1));
    for (k = 1; k < len; k++) {
        c = (unsigned char) p->s[p->i + k];
        if ((c & 0xc0) != 0x80) {
            gp_fail(p, MOE_EINVAL, "grammar: invalid UTF-8 at offset %zu",
                    at);
            return -1;
        }
        cp = (cp << 6) | (c & 0x3f);
    }
    p->i += (size_t) len;
    return cp;
}


/* ------------------------------------------------ code points -> bytes */

static int
utf8_enc(unsigned long cp, unsigned char *b)
{
    if (cp < 0x80) {
        b[0] = (unsigned char) cp;
        return 1;
    }
    if (cp < 0x800) {
        b[0] = (unsigned char) (0xc0 | (cp >> 6));
        b[1] = (unsigned char) (0x80 | (cp & 0x3f));
        return 2;
    }
    if (cp < 0x10000) {
        b[0] = (unsigned char) (0xe0 | (cp >> 12));
        b[1] = (unsigned char) (0x80 | ((cp >> 6) & 0x3f));
        b[2] = (unsigned char) (0x80 | (cp & 0x3f));
        return 3;
    }
    b[0] = (unsigned char) (0xf0 | (cp >> 18));
    b[1] = (unsigned char) (0x80 | ((cp >> 12) & 0x3f));
    b[2] = (unsigned char) (0x80 | ((cp >> 6) & 0x3f));
    b[3] = (unsigned char) (0x80 | (cp & 0x3f));
    return 4;
}


/*
 * Append to rule body v one alternative per UTF-8 byte-range sequence of
 * code points [lo, hi] (both >= 0x80, no surrogates, one encoded length):
 * split until every continuation position is a full 0x80-0xBF range or a
 * single value (the utf8-ranges method).
 */
static int
gp_utf8_range(gp_t *p, ivec_t *v, unsigned long lo, unsigned long hi,
    int *first)
{
    unsigned char  a[4], b[4];
    int            n, i, k;
    unsigned long  m;

    if (lo > hi) {
        return MOE_OK;
    }
    if (lo < 0x800 && hi >= 0x800) {
        return gp_utf8_range(p, v, lo, 0x7ff, first) != MOE_OK
               ? p->rc : gp_utf8_range(p, v, 0x800, hi, first);
    }
    if (lo < 0x10000 && hi >= 0x10000) {
        return gp_utf8_range(p, v, lo, 0xffff, first) != MOE_OK
               ? p->rc : gp_utf8_range(p, v, 0x10000, hi, first);
    }
    n = utf8_enc(lo, a);
    for (i = 1; i < n; i++) {
        m = (1ul << (6 * i)) - 1;
        if ((lo & ~m) != (hi & ~m)) {
            if ((lo & m) != 0) {
                return gp_utf8_range(p, v, lo, lo | m, first) != MOE_OK
                       ? p->rc
                       : gp_utf8_range(p, v, (lo | m) + 1, hi, first);
            }
            if ((hi & m) != m) {
                return gp_utf8_range(p, v, lo, (hi & ~m) - 1, first)
                       != MOE_OK
                       ? p->rc : gp_utf8_range(p, v, hi & ~m, hi, first);
            }
        }
    }
    utf8_enc(hi, b);
    if (!*first && gp_emit(p, v, GE_ALT) != MOE_OK) {
        return p->rc;
    }
    *first = 0;
    for (k = 0; k < n; k++) {
        int32_t e = gp_byte_range(p, a[k], b[k]);
        if (e < 0 || gp_emit(p, v, e) != MOE_OK) {
            return p->rc ? p->rc : gp_oom(p);
        }
    }
    return MOE_OK;
}


typedef struct {
    unsigned long lo, hi;
} cprange_t;


static int
cpr_cmp(const void *a, const void *b)
{
    const cprange_t *x = a, *y = b;

    return x->lo < y->lo ? -1 : x->lo > y->lo;
}


/*
 * Emit into seq the element(s) for a code-point class: one byte class when
 * it is ASCII only, else a reference to a new rule of alternatives.
 */
static int
gp_cp_class(gp_t *p, ivec_t *seq, cprange_t *r, int nr, int negate)
{
    cprange_t     *m = NULL, *c = NULL;
    int            nm = 0, nc = 0, i, rid, first = 1, any_ascii = 0;
    uint32_t       set[8] = {0};
    unsigned long  x, lo, hi, next;
    ivec_t        *body;
    int32_t        e;

    /* normalise: sort, merge */
    qsort(r, (size_t) nr, sizeof(*r), cpr_cmp);
    m = malloc(sizeof(*m) * (size_t) (nr + 1));
    c = malloc(sizeof(*c) * (size_t) (nr + 3));
    if (m == NULL || c == NULL) {
        free(m);
        free(c);
        return gp_oom(p);
    }
    for (i = 0; i < nr; i++) {
        if (nm > 0 && r[i].lo <= m[nm - 1].hi + 1) {
            if (r[i].hi > m[nm - 1].hi) {
                m[nm - 1].hi = r[i].hi;
            }
        } else {
            m[nm++] = r[i];
        }
    }
    if (negate) {
        next = 0;
        for (i = 0; i < nm; i++) {
            if (m[i].lo > next) {
                c[nc].lo = next;
                c[nc++].hi = m[i].lo - 1;
            }
            next = m[i].hi + 1;
        }
        if (next <= 0x10ffff) {
            c[nc].lo = next;
            c[nc++].hi = 0x10ffff;
        }
    } else {
        memcpy(c, m, sizeof(*m) * (size_t) nm);
        nc = nm;
    }
    free(m);

    for (i = 0; i < nc; i++) {
        for (x = c[i].lo; x <= c[i].hi && x < 0x80; x++) {
            set[x >> 5] |= 1u << (x & 31);
            any_ascii = 1;
        }
    }
    if (nc == 0 || c[nc - 1].hi < 0x80) {
        free(c);
        if (!any_ascii) {
            return gp_fail(p, MOE_EINVAL, "grammar: empty character class "
                           "at offset %zu", p->i);
        }
        e = gp_class(p, set);
        return e < 0 ? p->rc : gp_emit(p, seq, e);
    }
    rid = gp_new_rule(p, NULL, 0);
    if (rid < 0) {
        free(c);
        return p->rc;
    }
    p->rules[rid].defined = 1;
    body = &p->rules[rid].body;
    if (any_ascii) {
        e = gp_class(p, set);
        if (e < 0 || gp_emit(p, body, e) != MOE_OK) {
            free(c);
            return p->rc;
        }
        first = 0;
    }
    for (i = 0; i < nc; i++) {
        lo = c[i].lo < 0x80 ? 0x80 : c[i].lo;
        hi = c[i].hi;
        if (lo > hi) {
            continue;
        }
        /* no surrogates */
        if (lo <= 0xdfff && hi >= 0xd800) {
            if (lo < 0xd800
                && gp_utf8_range(p, body, lo, 0xd7ff, &first) != MOE_OK)
            {
                break;
            }
            lo = 0xe000;
        }
        if (gp_utf8_range(p, body, lo, hi, &first) != MOE_OK) {
            break;
        }
    }
    free(c);
    if (p->rc != MOE_OK) {
        return p->rc;
    }
    if (first) {
        /* only surrogates: an empty body would match the empty string */
        return gp_fail(p, MOE_EINVAL, "grammar: character class matches "
                       "no character (surrogates only) at offset %zu", p->i);
    }
    return gp_emit(p, seq, GE_REF(rid));
}


/* -------------------------------------------------------------- parser */

static int gp_alternatives(gp_t *p, ivec_t *body, int depth);


/* copy v[from ..] (a sequence) into a new vector */
static int
gp_dup(gp_t *p, const ivec_t *src, int from, ivec_t *out)
{
    int i;

    for (i = from; i < src->n; i++) {
        if (gp_emit(p, out, src->v[i]) != MOE_OK) {
            return p->rc;
        }
    }
    return MOE_OK;
}


/*
 * Replace seq[from ..] (the item just parsed: S) with its repetition
 * S{mn, mx} (mx < 0: unbounded): S copied mn times, then a rule
 * R ::= S R | (empty) for the unbounded tail, or mx - mn nested
 * optional rules Ok ::= S Ok-1 | (empty).
 */
static int
gp_repeat(gp_t *p, ivec_t *seq, int from, long mn, long mx)
{
    ivec_t   item = {0};
    int      rid, prev = -1, k;
    long     i;
    ivec_t  *b;

    if (gp_dup(p, seq, from, &item) != MOE_OK) {
        free(item.v);
        return p->rc;
    }
    seq->n = from;
    for (i = 0; i < mn; i++) {
        if (gp_dup(p, &item, 0, seq) != MOE_OK) {
            goto out;
        }
    }
    if (mx < 0) {
        rid = gp_new_rule(p, NULL, 0);
        if (rid < 0) {
            goto out;
        }
        p->rules[rid].defined = 1;
        b = &p->rules[rid].body;
        if (gp_dup(p, &item, 0, b) != MOE_OK
            || gp_emit(p, b, GE_REF(rid)) != MOE_OK
            || gp_emit(p, b, GE_ALT) != MOE_OK
            || gp_emit(p, seq, GE_REF(rid)) != MOE_OK)
        {
            goto out;
        }
    } else {
        for (k = 0; k < mx - mn; k++) {
            rid = gp_new_rule(p, NULL, 0);
            if (rid < 0) {
                goto out;
            }
            p->rules[rid].defined = 1;
            b = &p->rules[rid].body;
            if (gp_dup(p, &item, 0, b) != MOE_OK
                || (prev >= 0 && gp_emit(p, b, GE_REF(prev)) != MOE_OK)
                || gp_emit(p, b, GE_ALT) != MOE_OK)
            {
                goto out;
            }
            prev = rid;
        }
        if (prev >= 0 && gp_emit(p, seq, GE_REF(prev)) != MOE_OK) {
            goto out;
        }
    }
out:
    free(item.v);
    return p->rc;
}


static long
gp_number(gp_t *p)
{
    long v = 0;
    int  any = 0;

    while (p->i < p->n && p->s[p->i] >= '0' && p->s[p->i] <= '9') {
        v = v * 10 + (p->s[p->i++] - '0');
        any = 1;
        if (v > MOE_GRAM_MAX_REPEAT) {
            gp_fail(p, MOE_EINVAL, "grammar: repetition bound above %d at "
                    "offset %zu", MOE_GRAM_MAX_REPEAT, p->i);
            return -2;
        }
    }
    return any ? v : -1;
}


static int
gp_sequence(gp_t *p, ivec_t *seq, int depth)
{
    int      last = -1, rid;
    long     cp, mn, mx;
    size_t   nl, at;
    int32_t  e;

    for (;;) {
        gp_skip(p, 1);
        if (p->rc != MOE_OK) {
            return p->rc;
        }
        if (p->i >= p->n) {
            return MOE_OK;
        }
        at = p->i;
        switch (p->s[p->i]) {
        case '"':
            last = seq->n;
            p->i++;
            while (p->i < p->n && p->s[p->i] != '"') {
                unsigned char b[4];
                int           k, n;

                cp = gp_char(p);
                if (cp < 0) {
                    return p->rc;
                }
                n = utf8_enc((unsigned long) cp, b);
                for (k = 0; k < n; k++) {
                    e = gp_byte_range(p, b[k], b[k]);
                    if (e < 0 || gp_emit(p, seq, e) != MOE_OK) {
                        return p->rc ? p->rc : gp_oom(p);
                    }
                }
            }
            if (p->i >= p->n) {
                return gp_fail(p, MOE_EINVAL, "grammar: unterminated string "
                               "literal at offset %zu", at);
            }
            p->i++;
            if (seq->n == last) {       /* "" matches the empty string */
                last = -1;
            }
            break;
        case '[': {
            cprange_t *r = NULL, *nr2;
            int        n = 0, cap = 0, neg = 0;
            long       lo, hi;

            last = seq->n;
            p->i++;
            if (p->i < p->n && p->s[p->i] == '^') {
                neg = 1;
                p->i++;
            }
            while (p->i < p->n && p->s[p->i] != ']') {
                lo = gp_char(p);
                if (lo < 0) {
                    free(r);
                    return p->rc;
                }
                hi = lo;
                if (p->i + 1 < p->n && p->s[p->i] == '-'
                    && p->s[p->i + 1] != ']')
                {
                    p->i++;
                    hi = gp_char(p);
                    if (hi < 0) {
                        free(r);
                        return p->rc;
                    }
                    if (hi < lo) {
                        free(r);
                        return gp_fail(p, MOE_EINVAL, "grammar: reversed "
                                       "range in class at offset %zu", at);
                    }
                }
                if (n == cap) {
                    cap = cap ? cap * 2 : 8;
                    nr2 = realloc(r, sizeof(*r) * (size_t) cap);
                    if (nr2 == NULL) {
                        free(r);
                        return gp_oom(p);
                    }
                    r = nr2;
                }
                r[n].lo = (unsigned long) lo;
                r[n++].hi = (unsigned long) hi;
            }
            if (p->i >= p->n) {
                free(r);
                return gp_fail(p, MOE_EINVAL, "grammar: unterminated "
                               "character class at offset %zu", at);
            }
            p->i++;
            if (n == 0 && !neg) {
                free(r);
                return gp_fail(p, MOE_EINVAL, "grammar: empty character "
                               "class at offset %zu", at);
            }
            if (r == NULL) {
                r = malloc(sizeof(*r));
                if (r == NULL) {
                    return gp_oom(p);
                }
            }
            gp_cp_class(p, seq, r, n, neg);
            free(r);
            if (p->rc != MOE_OK) {
                return p->rc;
            }
            break;
        }
        case '.':
            last = seq->n;
            p->i++;
            if (p->any_rule < 0) {
                cprange_t none = {0, 0};
                ivec_t    tmp = {0};

                /* [^\x00] plus NUL itself: every code point */
                if (gp_cp_class(p, &tmp, &none, 0, 1) != MOE_OK) {
                    free(tmp.v);
                    return p->rc;
                }
                p->any_rule = tmp.v[0];
                free(tmp.v);
            }
            if (gp_emit(p, seq, p->any_rule) != MOE_OK) {
                return p->rc;
            }
            break;
        case '(':
            last = seq->n;
            p->i++;
            if (depth > 200) {
                return gp_fail(p, MOE_EINVAL, "grammar: groups nested too "
                               "deep at offset %zu", at);
            }
            rid = gp_new_rule(p, NULL, 0);
            if (rid < 0) {
                return p->rc;
            }
            p->rules[rid].defined = 1;
            {
                ivec_t body = {0};
                if (gp_alternatives(p, &body, depth + 1) != MOE_OK) {
                    free(body.v);
                    return p->rc;
                }
                p->rules[rid].body = body;
            }
            gp_skip(p, 1);
            if (p->i >= p->n || p->s[p->i] != ')') {
                return gp_fail(p, MOE_EINVAL, "grammar: missing ')' for the "
                               "group at offset %zu", at);
            }
            p->i++;
            if (gp_emit(p, seq, GE_REF(rid)) != MOE_OK) {
                return p->rc;
            }
            break;
        case '*': case '+': case '?': case '{':
            if (last < 0) {
                return gp_fail(p, MOE_EINVAL, "grammar: '%c' with nothing "
                               "to repeat at offset %zu", p->s[p->i], at);
            }
            if (p->s[p->i] == '{') {
                p->i++;
                gp_skip(p, 0);
                mn = gp_number(p);
                if (mn == -2) {
                    return p->rc;
                }
                gp_skip(p, 0);
                mx = mn;
                if (p->i < p->n && p->s[p->i] == ',') {
                    p->i++;
                    gp_skip(p, 0);
                    mx = gp_number(p);
                    if (mx == -2) {
                        return p->rc;
                    }
                    gp_skip(p, 0);
                }
                if (mn < 0 || p->i >= p->n || p->s[p->i] != '}'
                    || (mx >= 0 && mx < mn))
                {
                    return gp_fail(p, MOE_EINVAL, "grammar: bad {m,n} "
                                   "repetition at offset %zu", at);
                }
                p->i++;
            } else {
                char q = p->s[p->i++];
                mn = q == '+' ? 1 : 0;
                mx = q == '?' ? 1 : -1;
            }
            if (gp_repeat(p, seq, last, mn, mx) != MOE_OK) {
                return p->rc;
            }
            last = -1;
            break;
        default:
            nl = gp_name_len(p, p->i);
            if (nl == 0 || gp_at_rule_head(p)) {
                return MOE_OK;          /* ')' '|' or the next rule */
            }
            last = seq->n;
            rid = gp_rule_by_name(p, p->s + p->i, nl);
            if (rid < 0) {
                return p->rc;
            }
            p->i += nl;
            if (gp_emit(p, seq, GE_REF(rid)) != MOE_OK) {
                return p->rc;
            }
            break;
        }
    }
}


static int
gp_alternatives(gp_t *p, ivec_t *body, int depth)
{
    for (;;) {
        if (gp_sequence(p, body, depth) != MOE_OK) {
            return p->rc;
        }
        gp_skip(p, 1);
        if (p->i < p->n && p->s[p->i] == '|') {
            p->i++;
            if (gp_emit(p, body, GE_ALT) != MOE_OK) {
                return p->rc;
            }
            continue;
        }
        return MOE_OK;
    }
}


static int
gp_grammar(gp_t *p)
{
    size_t  nl, at;
    int     rid;
    ivec_t  body;

    for (;;) {
        gp_skip(p, 1);
        if (p->rc != MOE_OK || p->i >= p->n) {
            return p->rc;
        }
        at = p->i;
        nl = gp_name_len(p, p->i);
        if (nl == 0 || !gp_at_rule_head(p)) {
            return gp_fail(p, MOE_EINVAL, "grammar: expected `name ::=` at "
                           "offset %zu", at);
        }
        rid = gp_rule_by_name(p, p->s + p->i, nl);
        if (rid < 0) {
            return p->rc;
        }
        if (p->rules[rid].defined) {
            return gp_fail(p, MOE_EINVAL, "grammar: rule '%s' defined twice "
                           "(offset %zu)", p->rules[rid].name, at);
        }
        p->rules[rid].defined = 1;
        p->i += nl;
        gp_skip(p, 1);
        p->i += 3;                      /* ::= */
        memset(&body, 0, sizeof(body));
        if (gp_alternatives(p, &body, 0) != MOE_OK) {
            free(body.v);
            return p->rc;
        }
        p->rules[rid].body = body;
        gp_skip(p, 1);
        if (p->i < p->n && !gp_at_rule_head(p)) {
            return gp_fail(p, MOE_EINVAL, "grammar: unexpected '%c' at "
                           "offset %zu", p->s[p->i], p->i);
        }
    }
}


/* ------------------------------------------------------------- checks */

/* flatten p's rules into g */
static int
gp_flatten(gp_t *p, moe_gram_t *g)
{
    int  r, k, n = 0;

    for (r = 0; r < p->n_rules; r++) {
        n += p->rules[r].body.n + 1;
    }
    g->el = malloc(sizeof(int32_t) * (size_t) (n + 1));
    g->rule_start = malloc(sizeof(int32_t) * (size_t) (p->n_rules + 1));
    if (g->el == NULL || g->rule_start == NULL) {
        return gp_oom(p);
    }
    n = 0;
    for (r = 0; r < p->n_rules; r++) {
        g->rule_start[r] = n;
        for (k = 0; k < p->rules[r].body.n; k++) {
            g->el[n++] = p->rules[r].body.v[k];
        }
        g->el[n++] = GE_END;
    }
    g->n_el = n;
    g->n_rules = p->n_rules;
    g->cls = p->cls;
    g->n_cls = p->n_cls;
    p->cls = NULL;
    return MOE_OK;
}


/*
 * The least fixpoint of "rule r has an alternative whose every element
 * passes" (elements are character classes or rule references): a
 * reference passes when its rule is already in flag[], a class unless
 * classes_block.  classes_block 0: productive rules (derive some string);
 * 1: nullable rules (derive the empty string).  Worklist: each
 * alternative counts its references still unflagged, each rule lists the
 * alternatives that reference it; linear in the grammar (repeated passes
 * over every rule took one pass per rule of a chain).  MOE_OK or
 * MOE_ENOMEM.
 */
static int
gp_closure(gp_t *p, char *flag, int classes_block)
{
    int           *need = NULL, *alt_rule = NULL, *first = NULL;
    int           *user = NULL, *queue = NULL;
    int            r, k, n_alt = 0, a, live, nq = 0, q, i;
    long           n_ref = 0;
    const ivec_t  *b;

    for (r = 0; r < p->n_rules; r++) {
        b = &p->rules[r].body;
        n_alt++;
        for (k = 0; k < b->n; k++) {
            n_alt += b->v[k] == GE_ALT;
            n_ref += GE_IS_REF(b->v[k]);
        }
    }
    need = malloc(sizeof(int) * (size_t) n_alt);
    alt_rule = malloc(sizeof(int) * (size_t) n_alt);
    first = calloc((size_t) p->n_rules + 1, sizeof(int));
    user = malloc(sizeof(int) * (size_t) (n_ref + 1));
    queue = malloc(sizeof(int) * (size_t) (p->n_rules + 1));
    if (need == NULL || alt_rule == NULL || first == NULL || user == NULL
        || queue == NULL)
    {
        free(need); free(alt_rule); free(first); free(user); free(queue);
        return gp_oom(p);
    }

    /* per alternative: its rule and its unflagged references (-1: it has
     * a class that blocks); per rule: how many references it has */
    a = 0;
    for (r = 0; r < p->n_rules; r++) {
        b = &p->rules[r].body;
        need[a] = 0;
        alt_rule[a] = r;
        for (k = 0; k <= b->n; k++) {
            if (k == b->n || b->v[k] == GE_ALT) {
                if (k < b->n) {
                    need[++a] = 0;
                    alt_rule[a] = r;
                }
            } else if (GE_IS_REF(b->v[k])) {
                if (need[a] >= 0) {
                    need[a]++;
                }
                first[b->v[k] / 2 + 1]++;
            } else if (classes_block) {
                need[a] = -1;
            }
        }
        a++;
    }
    for (r = 0; r < p->n_rules; r++) {
        first[r + 1] += first[r];
    }
    /* user[first[s] ..]: the alternative of each reference to rule s */
    a = 0;
    for (r = 0; r < p->n_rules; r++) {
        b = &p->rules[r].body;
        for (k = 0; k < b->n; k++) {
            if (b->v[k] == GE_ALT) {
                a++;
            } else if (GE_IS_REF(b->v[k])) {
                user[first[b->v[k] / 2]++] = a;
            }
        }
        a++;
    }
    for (r = p->n_rules; r > 0; r--) {     /* first[] back to the starts */
        first[r] = first[r - 1];
    }
    first[0] = 0;

    for (a = 0; a < n_alt; a++) {
        if (need[a] == 0 && !flag[alt_rule[a]]) {
            flag[alt_rule[a]] = 1;
            queue[nq++] = alt_rule[a];
        }
    }
    for (q = 0; q < nq; q++) {
        r = queue[q];
        for (i = first[r]; i < first[r + 1]; i++) {
            a = user[i];
            live = need[a] > 0;
            if (live && --need[a] == 0 && !flag[alt_rule[a]]) {
                flag[alt_rule[a]] = 1;
                queue[nq++] = alt_rule[a];
            }
        }
    }
    free(need); free(alt_rule); free(first); free(user); free(queue);
    return MOE_OK;
}


/*
 * Productive rules (derive some string) by fixpoint; then drop every
 * alternative that references an unproductive rule.
 */
static int
gp_prune(gp_t *p, int root)
{
    char   *prod;
    int     r, k, ok, start, w;
    ivec_t *b;

    prod = calloc((size_t) p->n_rules, 1);
    if (prod == NULL) {
        return gp_oom(p);
    }
    if (gp_closure(p, prod, 0) != MOE_OK) {
        free(prod);
        return p->rc;
    }
    if (!prod[root]) {
        free(prod);
        return gp_fail(p, MOE_EINVAL, "the guide's language is empty (no "
                       "string matches it)");
    }
    for (r = 0; r < p->n_rules; r++) {
        if (!prod[r]) {
            p->rules[r].body.n = 0;     /* unreachable from live stacks */
            continue;
        }
        b = &p->rules[r].body;
        w = 0;
        start = 0;
        ok = 1;
        for (k = 0; k <= b->n; k++) {
            if (k == b->n || b->v[k] == GE_ALT) {
                if (ok) {
                    if (w > 0) {
                        b->v[w++] = GE_ALT;
                    }
                    if (k > start) {
                        memmove(b->v + w, b->v + start,
                                sizeof(int32_t) * (size_t) (k - start));
                    }
                    w += k - start;
                }
                start = k + 1;
                ok = 1;
            } else if (GE_IS_REF(b->v[k]) && !prod[b->v[k] / 2]) {
                ok = 0;
            }
        }
        b->n = w;
    }
    free(prod);
    return MOE_OK;
}


/* nullable rules, then a cycle search over "r may start with s" edges */
static int
gp_left_rec(gp_t *p)
{
    char   *nul, *color, *lead;
    int    *stk, *pos, r, sp;

    nul = calloc((size_t) p->n_rules, 1);
    color = calloc((size_t) p->n_rules, 1);
    lead = malloc((size_t) p->n_rules);
    stk = malloc(sizeof(int) * (size_t) p->n_rules);
    pos = malloc(sizeof(int) * (size_t) p->n_rules);
    if (nul == NULL || color == NULL || lead == NULL || stk == NULL
        || pos == NULL)
    {
        free(nul); free(color); free(lead); free(stk); free(pos);
        return gp_oom(p);
    }
    if (gp_closure(p, nul, 1) != MOE_OK) {
        free(nul); free(color); free(lead); free(stk); free(pos);
        return p->rc;
    }

    /* iterative DFS: pos[sp] walks rule stk[sp]'s body; lead[sp]: every
     * element before pos[sp] in its alternative is nullable (kept as the
     * walk goes: scanning back from each element was quadratic in a long
     * alternative) */
    for (r = 0; r < p->n_rules && p->rc == MOE_OK; r++) {
        if (color[r]) {
            continue;
        }
        sp = 0;
        stk[0] = r;
        pos[0] = 0;
        lead[0] = 1;
        color[r] = 1;
        while (sp >= 0 && p->rc == MOE_OK) {
            int     cur = stk[sp], found = -1;
            ivec_t *cb = &p->rules[cur].body;

            while (pos[sp] < cb->n) {
                int32_t e = cb->v[pos[sp]++];
                int     at_lead = lead[sp];

                if (e == GE_ALT) {
                    lead[sp] = 1;
                    continue;
                }
                lead[sp] = at_lead && GE_IS_REF(e) && nul[e / 2];
                if (at_lead && GE_IS_REF(e)) {
                    found = e / 2;
                    break;
                }
            }
            if (found < 0) {
                color[cur] = 2;
                sp--;
                continue;
            }
            if (color[found] == 1) {
                gp_fail(p, MOE_EINVAL, "grammar: left recursion through "
                        "rule '%s'", p->rules[found].name
                                     ? p->rules[found].name : "(group)");
                break;
            }
            if (color[found] == 0) {
                color[found] = 1;
                stk[++sp] = found;
                pos[sp] = 0;
                lead[sp] = 1;
            }
        }
    }
    free(nul); free(color); free(lead); free(stk); free(pos);
    return p->rc;
}


int
moe_gbnf_parse(const char *src, size_t len, moe_gram_t *g, char *err,
    size_t errlen)
{
    gp_t  p;
    int   r, root = -1;

    memset(g, 0, sizeof(*g));
    memset(&p, 0, sizeof(p));
    p.s = src;
    p.n = len;
    p.err = err;
    p.errlen = errlen;
    p.any_rule = -1;
    p.rc = MOE_OK;
    if (err != NULL && errlen) {
        err[0] = '\0';
    }

    if (gp_grammar(&p) != MOE_OK) {
        goto done;
    }
    for (r = 0; r < p.n_rules; r++) {
        if (!p.rules[r].defined) {
            gp_fail(&p, MOE_EINVAL, "grammar: undefined rule '%s' (offset "
                    "%d)", p.rules[r].name, p.rules[r].name_off);
            goto done;
        }
        if (p.rules[r].name != NULL && strcmp(p.rules[r].name, "root") == 0) {
            root = r;
        }
    }
    if (root < 0) {
        gp_fail(&p, MOE_EINVAL, "grammar: no 'root' rule");
        goto done;
    }
    if (gp_prune(&p, root) != MOE_OK || gp_left_rec(&p) != MOE_OK) {
        goto done;
    }
    if (gp_flatten(&p, g) != MOE_OK) {
        goto done;
    }
    g->root = root;

done:
    for (r = 0; r < p.n_rules; r++) {
        free(p.rules[r].name);
        free(p.rules[r].body.v);
    }
    free(p.rules);
    free(p.cls);
    free(p.name_slot);
    if (p.rc != MOE_OK) {
        moe_gram_free(g);
    }
    return p.rc;
}


void
moe_gram_free(moe_gram_t *g)
{
    free(g->el);
    free(g->cls);
    free(g->rule_start);
    memset(g, 0, sizeof(*g));
}
