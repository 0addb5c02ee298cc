/*
 * Regular expression -> GBNF expression (the whole text must match: an
 * implicit ^...$).  The usual ERE/PCRE subset: literals and escapes
 * (\n \t \r \f \v \xHH \uHHHH \. ...), classes [...] / [^...] with ranges,
 * \d \w \s \D \W \S (also inside classes), '.', groups ( ) (?: )
 * (?P<n> ) (?<n> ), alternation, * + ? {m} {m,} {m,n} (a lazy '?' or
 * possessive '+' suffix is accepted and changes nothing: every match is
 * allowed).  ^ at the start and $ at the end are accepted.  Refused with
 * the offset: lookaround, backreferences, \b, anchors elsewhere.
 *
 * json_string mode writes the inside of a JSON string: literal '"', '\'
 * and control characters become their JSON escapes; classes and '.' never
 * produce them raw.
 */

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "guided/guided_int.h"


typedef struct {
    const char *s;
    size_t      n, i;
    int         json;
    gbuf_t     *out;
    char       *err;
    size_t      errlen;
    int         rc;
} rx_t;

typedef struct {
    unsigned long lo, hi;
} rr_t;


static int
rx_fail(rx_t *x, const char *what, size_t at)
{
    if (x->rc == MOE_OK) {
        x->rc = MOE_EINVAL;
        snprintf(x->err, x->errlen, "regex: %s at offset %zu", what, at);
    }
    return x->rc;
}


static int
rx_hex(char c)
{
    if (c >= '0' && c <= '9') return c - '0';
    if (c >= 'a' && c <= 'f') return c - 'a' + 10;
    if (c >= 'A' && c <= 'F') return c - 'A' + 10;
    return -1;
}


/* one code point written as a GBNF class member */
static void
rx_cp(gbuf_t *b, unsigned long cp)
{
    if (cp > 0xffff) {
        gb_printf(b, "\\U%08lX", cp);
    } else if (cp < 0x20 || cp > 0x7e || cp == ']' || cp == '\\'
               || cp == '-' || cp == '^' || cp == '"' || cp == '[')
    {
        gb_printf(b, "\\u%04lX", cp);
    } else {
        char c = (char) cp;
        gb_put(b, &c, 1);
    }
}


/* the literal code point cp as GBNF (JSON-escaped in json mode) */
static void
rx_lit(rx_t *x, unsigned long cp)
{
    char          tmp[8];
    unsigned char u[4];
    int           n;

    if (x->json && (cp == '"' || cp == '\\')) {
        tmp[0] = '\\';
        tmp[1] = (char) cp;
        gb_lit(x->out, tmp, 2);
        return;
    }
    if (x->json && cp < 0x20) {
        const char *e = cp == '\n' ? "\\n" : cp == '\t' ? "\\t"
                        : cp == '\r' ? "\\r" : cp == '\f' ? "\\f"
                        : cp == '\b' ? "\\b" : NULL;
        if (e != NULL) {
            gb_lit(x->out, e, 2);
        } else {
            snprintf(tmp, sizeof(tmp), "\\u%04lx", cp);
            gb_lit(x->out, tmp, 6);
        }
        return;
    }
    if (cp < 0x80) {
        u[0] = (unsigned char) cp;
        n = 1;
    } else if (cp < 0x800) {
        u[0] = (unsigned char) (0xc0 | (cp >> 6));
        u[1] = (unsigned char) (0x80 | (cp & 0x3f));
        n = 2;
    } else if (cp < 0x10000) {
        u[0] = (unsigned char) (0xe0 | (cp >> 12));
        u[1] = (unsigned char) (0x80 | ((cp >> 6) & 0x3f));
        u[2] = (unsigned char) (0x80 | (cp & 0x3f));
        n = 3;
    } else {
        u[0] = (unsigned char) (0xf0 | (cp >> 18));
        u[1] = (unsigned char) (0x80 | ((cp >> 12) & 0x3f));
        u[2] = (unsigned char) (0x80 | ((cp >> 6) & 0x3f));
        u[3] = (unsigned char) (0x80 | (cp & 0x3f));
        n = 4;
    }
    gb_lit(x->out, (const char *) u, (size_t) n);
}


/* a class from ranges; json mode keeps '"', '\' and controls out */
static void
rx_class_out(rx_t *x, const rr_t *r, int nr, int neg)
{
    static const rr_t bad[] = { {0, 0x1f}, {'"', '"'}, {'\\', '\\'} };
    int               i, k;
    unsigned long     lo, hi;

    gb_puts(x->out, neg ? "[^" : "[");
    if (neg) {
        for (i = 0; i < nr; i++) {
            rx_cp(x->out, r[i].lo);
            if (r[i].hi != r[i].lo) {
                gb_puts(x->out, "-");
                rx_cp(x->out, r[i].hi);
            }
        }
        if (x->json) {
            gb_puts(x->out, "\\u0000-\\u001F\\u0022\\u005C");
        }
    } else {
        for (i = 0; i < nr; i++) {
            lo = r[i].lo;
            hi = r[i].hi;
            /* cut the forbidden ranges out (json mode) */
            for (k = 0; x->json && k < 3 && lo <= hi; k++) {
                if (bad[k].hi < lo || bad[k].lo > hi) {
                    continue;
                }
                if (bad[k].lo > lo) {
                    rx_cp(x->out, lo);
                    gb_puts(x->out, "-");
                    rx_cp(x->out, bad[k].lo - 1);
                }
                lo = bad[k].hi + 1;
            }
            if (lo > hi) {
                continue;
            }
            rx_cp(x->out, lo);
            if (hi != lo) {
                gb_puts(x->out, "-");
                rx_cp(x->out, hi);
            }
        }
    }
    gb_puts(x->out, "]");
}


/* \d \w \s as ranges; returns the count (0: not a class escape) */
static int
rx_class_escape(char c, rr_t *r, int *neg)
{
    *neg = c == 'D' || c == 'W' || c == 'S';
    switch (c) {
    case 'd': case 'D':
        r[0].lo = '0'; r[0].hi = '9';
        return 1;
    case 'w': case 'W':
        r[0].lo = 'a'; r[0].hi = 'z';
        r[1].lo = 'A'; r[1].hi = 'Z';
        r[2].lo = '0'; r[2].hi = '9';
        r[3].lo = '_'; r[3].hi = '_';
        return 4;
    case 's': case 'S':
        r[0].lo = ' '; r[0].hi = ' ';
        r[1].lo = '\t'; r[1].hi = '\r';     /* \t \n \v \f \r */
        return 2;
    default:
        return 0;
    }
}


/* an escaped single code point after '\' (x->i at the char after '\') */
static long
rx_escape_cp(rx_t *x, size_t at)
{
    char  c = x->s[x->i++];
    long  v = 0;
    int   k, nd, h;

    switch (c) {
    case 'n': return '\n';
    case 't': return '\t';
    case 'r': return '\r';
    case 'f': return '\f';
    case 'v': return '\v';
    case '0': return 0;
    case 'x': nd = 2; break;
    case 'u': nd = 4; break;
    case 'b': case 'B': case 'A': case 'z': case 'Z': case 'G':
        rx_fail(x, "anchors and word boundaries (\\b \\B \\A \\z) are not "
                "supported", at);
        return -1;
    default:
        if (c >= '1' && c <= '9') {
            rx_fail(x, "backreferences are not supported", at);
            return -1;
        }
        if ((c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z')) {
            rx_fail(x, "unknown escape", at);
            return -1;
        }
        return (unsigned char) c;
    }
    if (x->i < x->n && x->s[x->i] == '{') {        /* \x{HHHH} */
        x->i++;
        while (x->i < x->n && x->s[x->i] != '}') {
            h = rx_hex(x->s[x->i++]);
            if (h < 0 || v > 0x10ffff) {
                rx_fail(x, "bad hex escape", at);
                return -1;
            }
            v = v * 16 + h;
        }
        x->i++;
        return v;
    }
    for (k = 0; k < nd; k++) {
        h = x->i < x->n ? rx_hex(x->s[x->i]) : -1;
        if (h < 0) {
            rx_fail(x, "bad hex escape", at);
            return -1;
        }
        v = v * 16 + h;
        x->i++;
    }
    return v;
}


/* UTF-8 code point at x->i */
static long
rx_utf8(rx_t *x)
{
    unsigned char c = (unsigned char) x->s[x->i];
    int           len, k;
    long          cp;

    if (c < 0x80) {
        x->i++;
        return c;
    }
    len = c >= 0xf0 ? 4 : c >= 0xe0 ? 3 : c >= 0xc0 ? 2 : 0;
    if (len == 0 || x->i + (size_t) len > x->n) {
        rx_fail(x, "invalid UTF-8", x->i);
        return -1;
    }
    cp = c & (0x3f >> (len - 1));
    for (k = 1; k < len; k++) {
        cp = (cp << 6) | ((unsigned char) x->s[x->i + k] & 0x3f);
    }
    x->i += (size_t) len;
    return cp;
}


static int
rx_class(rx_t *x)
{
    rr_t    r[256];
    int     nr = 0, neg = 0, k, eneg;
    size_t  at = x->i;
    long    lo, hi;

    x->i++;                             /* [ */
    if (x->i < x->n && x->s[x->i] == '^') {
        neg = 1;
        x->i++;
    }
    if (x->i < x->n && x->s[x->i] == ']') {     /* ']' first is literal */
        r[nr].lo = r[nr].hi = ']';
        nr++;
        x->i++;
    }
    while (x->i < x->n && x->s[x->i] != ']') {
        if (nr > 240) {
            return rx_fail(x, "character class too large", at);
        }
        if (x->s[x->i] == '[' && x->i + 1 < x->n && x->s[x->i + 1] == ':') {
            return rx_fail(x, "POSIX classes [:name:] are not supported",
                           x->i);
        }
        if (x->s[x->i] == '\\' && x->i + 1 < x->n) {
            k = rx_class_escape(x->s[x->i + 1], r + nr, &eneg);
            if (k > 0) {
                if (eneg) {
                    return rx_fail(x, "\\D \\W \\S inside a class are not "
                                   "supported", x->i);
                }
                nr += k;
                x->i += 2;
                continue;
            }
            x->i++;
            lo = rx_escape_cp(x, x->i - 1);
        } else {
            lo = rx_utf8(x);
        }
        if (lo < 0) {
            return x->rc;
        }
        hi = lo;
        if (x->i + 1 < x->n && x->s[x->i] == '-' && x->s[x->i + 1] != ']') {
            x->i++;
            if (x->s[x->i] == '\\') {
                x->i++;
                hi = x->i < x->n ? rx_escape_cp(x, x->i - 1) : -1;
            } else {
                hi = rx_utf8(x);
            }
            if (hi < 0) {
                return x->rc ? x->rc : rx_fail(x, "bad range", at);
            }
            if (hi < lo) {
                return rx_fail(x, "reversed range in class", at);
            }
        }
        r[nr].lo = (unsigned long) lo;
        r[nr].hi = (unsigned long) hi;
        nr++;
    }
    if (x->i >= x->n) {
        return rx_fail(x, "unterminated character class", at);
    }
    x->i++;
    if (nr == 0 && !neg) {
        return rx_fail(x, "empty character class", at);
    }
    rx_class_out(x, r, nr, neg);
    return MOE_OK;
}


static int rx_alt(rx_t *x, int depth);


static int
rx_seq(rx_t *x, int depth)
{
    size_t  at;
    char    c;
    long    cp, mn, mx;
    rr_t    r[4];
    int     k, neg, have_atom = 0;

    for (;;) {
        if (x->rc != MOE_OK || x->i >= x->n) {
            return x->rc;
        }
        at = x->i;
        c = x->s[x->i];
        if (c == '|' || c == ')') {
            return MOE_OK;
        }
        switch (c) {
        case '(':
            x->i++;
            if (depth > 100) {
                return rx_fail(x, "groups nested too deep", at);
            }
            if (x->i < x->n && x->s[x->i] == '?') {
                if (x->i + 1 < x->n && x->s[x->i + 1] == ':') {
                    x->i += 2;
                } else if (x->i + 2 < x->n
                           && (x->s[x->i + 1] == 'P' || x->s[x->i + 1] == '<')
                           && x->s[x->i + 2] != '=' && x->s[x->i + 2] != '!')
                {
                    while (x->i < x->n && x->s[x->i] != '>') {
                        x->i++;
                    }
                    x->i++;
                } else {
                    return rx_fail(x, "lookaround and inline flags are not "
                                   "supported", at);
                }
            }
            gb_puts(x->out, " (");
            if (rx_alt(x, depth + 1) != MOE_OK) {
                return x->rc;
            }
            if (x->i >= x->n || x->s[x->i] != ')') {
                return rx_fail(x, "missing ')'", at);
            }
            x->i++;
            gb_puts(x->out, ")");
            have_atom = 1;
            break;
        case '[':
            gb_puts(x->out, " ");
            if (rx_class(x) != MOE_OK) {
                return x->rc;
            }
            have_atom = 1;
            break;
        case '.':
            x->i++;
            gb_puts(x->out, x->json ? " [^\\n\\u0000-\\u001F\"\\\\]"
                                    : " [^\\n]");
            have_atom = 1;
            break;
        case '^':
            x->i++;
            if (at != 0) {
                return rx_fail(x, "'^' is only supported at the start", at);
            }
            continue;
        case '$':
            x->i++;
            if (x->i != x->n) {
                return rx_fail(x, "'$' is only supported at the end", at);
            }
            continue;
        case '*': case '+': case '?': case '{':
            if (!have_atom) {
                if (c == '{') {         /* a literal brace (PCRE's rule) */
                    x->i++;
                    gb_puts(x->out, " ");
                    rx_lit(x, '{');
                    have_atom = 1;
                    break;
                }
                return rx_fail(x, "quantifier with nothing to repeat", at);
            }
            x->i++;
            if (c == '{') {
                mn = 0;
                k = 0;
                while (x->i < x->n && x->s[x->i] >= '0' && x->s[x->i] <= '9'
                       && mn <= MOE_GRAM_MAX_REPEAT)
                {
                    mn = mn * 10 + (x->s[x->i++] - '0');
                    k++;
                }
                mx = mn;
                if (x->i < x->n && x->s[x->i] == ',') {
                    x->i++;
                    mx = -1;
                    if (x->i < x->n && x->s[x->i] >= '0'
                        && x->s[x->i] <= '9')
                    {
                        mx = 0;
                        while (x->i < x->n && x->s[x->i] >= '0'
                               && x->s[x->i] <= '9'
                               && mx <= MOE_GRAM_MAX_REPEAT)
                        {
                            mx = mx * 10 + (x->s[x->i++] - '0');
                        }
                    }
                }
                if (k == 0 || x->i >= x->n || x->s[x->i] != '}'
                    || (mx >= 0 && mx < mn) || mn > MOE_GRAM_MAX_REPEAT
                    || mx > MOE_GRAM_MAX_REPEAT)
                {
                    return rx_fail(x, "bad {m,n} quantifier", at);
                }
                x->i++;
                if (mx < 0) {
                    gb_printf(x->out, "{%ld,}", mn);
                } else {
                    gb_printf(x->out, "{%ld,%ld}", mn, mx);
                }
            } else {
                gb_put(x->out, &c, 1);
            }
            if (x->i < x->n && (x->s[x->i] == '?' || x->s[x->i] == '+')) {
                x->i++;                 /* lazy / possessive */
            }
            have_atom = 0;
            break;
        case '\\':
            if (x->i + 1 >= x->n) {
                return rx_fail(x, "trailing backslash", at);
            }
            k = rx_class_escape(x->s[x->i + 1], r, &neg);
            gb_puts(x->out, " ");
            if (k > 0) {
                x->i += 2;
                rx_class_out(x, r, k, neg);
            } else {
                x->i++;
                cp = rx_escape_cp(x, at);
                if (cp < 0) {
                    return x->rc;
                }
                rx_lit(x, (unsigned long) cp);
            }
            have_atom = 1;
            break;
        default:
            cp = rx_utf8(x);
            if (cp < 0) {
                return x->rc;
            }
            gb_puts(x->out, " ");
            rx_lit(x, (unsigned long) cp);
            have_atom = 1;
            break;
        }
    }
}


static int
rx_alt(rx_t *x, int depth)
{
    for (;;) {
        gb_puts(x->out, " \"\"");       /* an empty branch stays valid */
        if (rx_seq(x, depth) != MOE_OK) {
            return x->rc;
        }
        if (x->i < x->n && x->s[x->i] == '|') {
            x->i++;
            gb_puts(x->out, " |");
            continue;
        }
        return MOE_OK;
    }
}


int
moe_regex_to_gbnf(const char *re, size_t len, int json_string, gbuf_t *out,
    char *err, size_t errlen)
{
    rx_t x;

    memset(&x, 0, sizeof(x));
    x.s = re;
    x.n = len;
    x.json = json_string;
    x.out = out;
    x.err = err;
    x.errlen = errlen;
    x.rc = MOE_OK;
    gb_puts(out, "(");
    if (rx_alt(&x, 0) != MOE_OK) {
        return x.rc;
    }
    if (x.i < x.n) {
        return rx_fail(&x, "unbalanced ')'", x.i);
    }
    gb_puts(out, ")");
    return out->oom ? MOE_ENOMEM : MOE_OK;
}
