/*
 * Jinja lexer: splits a (newline-normalized) template into text and tag
 * tokens with Jinja2's whitespace rules as transformers configures them:
 * trim_blocks (one newline after %} and #} is dropped), lstrip_blocks
 * (blanks before {% and {# on their own line are dropped), and the -/+
 * markers on tags.
 */

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "text/jinja_int.h"
#include "text/utf8.h"

typedef struct {
    moe_jj_arena_t  *a;
    moe_jj_tok_t    *v;
    size_t           n, cap;
    int              line;
    char            *err;
    size_t           errlen;
} moe_jj_lexer_t;


static moe_jj_tok_t *
moe_jj_emit(moe_jj_lexer_t *L, int t, const char *p, size_t n)
{
    if (L->n == L->cap) {
        size_t         cap = L->cap ? L->cap * 2 : 256;
        moe_jj_tok_t  *v = realloc(L->v, cap * sizeof(*v));

        if (v == NULL) {
            return NULL;
        }
        L->v = v;
        L->cap = cap;
    }

    memset(&L->v[L->n], 0, sizeof(L->v[0]));
    L->v[L->n].t = t;
    L->v[L->n].line = L->line;
    L->v[L->n].p = p;
    L->v[L->n].n = n;

    return &L->v[L->n++];
}


static void
moe_jj_lines(moe_jj_lexer_t *L, const char *p, size_t n)
{
    size_t  i;

    for (i = 0; i < n; i++) {
        if (p[i] == '\n') {
            L->line++;
        }
    }
}


static int
moe_jj_hexval(int ch)
{
    if (ch >= '0' && ch <= '9') return ch - '0';
    if (ch >= 'a' && ch <= 'f') return ch - 'a' + 10;
    if (ch >= 'A' && ch <= 'F') return ch - 'A' + 10;
    return -1;
}



/* Decode a string literal body with Python's unicode-escape rules. */
static int
moe_jj_string(moe_jj_lexer_t *L, const char *p, size_t n)
{
    char          *o = moe_jj_alloc(L->a, n + 1);
    size_t         i, k = 0;
    moe_jj_tok_t  *t;

    if (o == NULL) {
        return MOE_ENOMEM;
    }

    for (i = 0; i < n; i++) {
        int  ch = (unsigned char) p[i];

        if (ch != '\\' || i + 1 >= n) {
            o[k++] = (char) ch;
            continue;
        }
        ch = p[++i];
        switch (ch) {
        case 'n': o[k++] = '\n'; break;
        case 't': o[k++] = '\t'; break;
        case 'r': o[k++] = '\r'; break;
        case 'a': o[k++] = '\a'; break;
        case 'b': o[k++] = '\b'; break;
        case 'f': o[k++] = '\f'; break;
        case 'v': o[k++] = '\v'; break;
        case '\\': case '\'': case '"': o[k++] = (char) ch; break;
        case '\n': break;
        case 'x': case 'u': case 'U': {
            int            w = ch == 'x' ? 2 : ch == 'u' ? 4 : 8, j;
            unsigned long  cp = 0;

            for (j = 0; j < w; j++) {
                int  h = i + 1 + j < n ? moe_jj_hexval(p[i + 1 + j]) : -1;

                if (h < 0) {
                    snprintf(L->err, L->errlen, "bad \\%c escape in a string "
                             "at line %d", ch, L->line);
                    return MOE_EINVAL;
                }
                cp = cp * 16 + (unsigned long) h;
            }
            if (cp > 0x10ffff || (cp >= 0xd800 && cp < 0xe000)) {
                snprintf(L->err, L->errlen, "bad code point in a string at "
                         "line %d", L->line);
                return MOE_EINVAL;
            }
            i += (size_t) w;
            k += moe_utf8_encode((uint32_t) cp, o + k);
            break;
        }
        default:
            if (ch >= '0' && ch <= '7') {
                unsigned long  cp = (unsigned long) (ch - '0');
                int            j;

                for (j = 0; j < 2 && i + 1 < n && p[i + 1] >= '0'
                     && p[i + 1] <= '7'; j++)
                {
                    cp = cp * 8 + (unsigned long) (p[++i] - '0');
                }
                k += moe_utf8_encode((uint32_t) cp, o + k);
                break;
            }
            if (ch == 'N') {
                snprintf(L->err, L->errlen, "unsupported \\N escape at line "
                         "%d", L->line);
                return MOE_EINVAL;
            }
            o[k++] = '\\';
            o[k++] = (char) ch;
        }
    }

    o[k] = '\0';
    t = moe_jj_emit(L, MOE_JT_STRING, o, k);

    return t ? MOE_OK : MOE_ENOMEM;
}


static const char *moe_jj_ops[] = {
    "//", "**", "==", "!=", "<=", ">=", "+", "-", "*", "/", "%", "~", "<",
    ">", "=", "(", ")", "[", "]", "{", "}", ",", ".", ":", "|", ";", NULL
};


/*
 * Tokens of one {{ }} or {% %} tag starting at *pos (after the opening
 * delimiter and sign).  Leaves *pos after the closing delimiter and any
 * whitespace it strips.
 */
static int
moe_jj_tag(moe_jj_lexer_t *L, const char *s, size_t len, size_t *pos,
    int block)
{
    size_t  i = *pos;
    int     depth = 0;

    for ( ;; ) {
        const char  *p;
        size_t       rest, j;
        int          ch;

        while (i < len && (s[i] == ' ' || s[i] == '\t' || s[i] == '\n'
               || s[i] == '\r' || s[i] == '\f' || s[i] == '\v'))
        {
            if (s[i] == '\n') {
                L->line++;
            }
            i++;
        }
        if (i >= len) {
            snprintf(L->err, L->errlen, "unclosed %s tag at line %d",
                     block ? "{%" : "{{", L->line);
            return MOE_EINVAL;
        }

        p = s + i;
        rest = len - i;
        ch = (unsigned char) *p;

        if (depth == 0) {
            const char  *end = block ? "%}" : "}}";
            int          sign = 0;

            if ((ch == '-' || (block && ch == '+')) && rest >= 3
                && memcmp(p + 1, end, 2) == 0)
            {
                sign = ch;
                p++;
            }
            if (rest >= 2 && memcmp(p, end, 2) == 0) {
                i = (size_t) (p - s) + 2;
                if (moe_jj_emit(L, block ? MOE_JT_BLOCK_END : MOE_JT_VAR_END,
                                NULL, 0) == NULL)
                {
                    return MOE_ENOMEM;
                }
                if (sign == '-') {
                    size_t  w;

                    while (i < len && (w = moe_jj_space(s + i, len - i))) {
                        moe_jj_lines(L, s + i, w);
                        i += w;
                    }
                } else if (block && sign == 0 && i < len && s[i] == '\n') {
                    L->line++;
                    i++;
                }
                *pos = i;
                return MOE_OK;
            }
        }

        if ((ch >= 'a' && ch <= 'z') || (ch >= 'A' && ch <= 'Z') || ch == '_')
        {
            for (j = 1; j < rest; j++) {
                int  c2 = (unsigned char) p[j];

                if (!((c2 >= 'a' && c2 <= 'z') || (c2 >= 'A' && c2 <= 'Z')
                      || (c2 >= '0' && c2 <= '9') || c2 == '_'))
                {
                    break;
                }
            }
            if (moe_jj_emit(L, MOE_JT_NAME, p, j) == NULL) {
                return MOE_ENOMEM;
            }
            i += j;
            continue;
        }

        if (ch >= '0' && ch <= '9') {
            char           buf[64];
            size_t         k = 0;
            int            isf = 0;
            moe_jj_tok_t  *t;

            for (j = 0; j < rest && k < sizeof(buf) - 1; j++) {
                int  c2 = (unsigned char) p[j];

                if (c2 >= '0' && c2 <= '9') {
                    buf[k++] = (char) c2;
                } else if (c2 == '_' && j + 1 < rest && p[j + 1] >= '0'
                           && p[j + 1] <= '9')
                {
                    continue;
                } else if (c2 == '.' && !isf && j + 1 < rest
                           && p[j + 1] >= '0' && p[j + 1] <= '9')
                {
                    isf = 1;
                    buf[k++] = '.';
                } else if ((c2 == 'e' || c2 == 'E') && j + 1 < rest
                           && ((p[j + 1] >= '0' && p[j + 1] <= '9')
                               || ((p[j + 1] == '-' || p[j + 1] == '+')
                                   && j + 2 < rest && p[j + 2] >= '0'
                                   && p[j + 2] <= '9')))
                {
                    isf = 2;
                    buf[k++] = 'e';
                    buf[k++] = p[++j];
                } else {
                    break;
                }
            }
            buf[k] = '\0';
            t = moe_jj_emit(L, isf ? MOE_JT_FLOAT : MOE_JT_INT, p, j);
            if (t == NULL) {
                return MOE_ENOMEM;
            }
            if (isf) {
                t->f = strtod(buf, NULL);
            } else {
                t->i = strtoll(buf, NULL, 10);
            }
            i += j;
            continue;
        }

        if (ch == '\'' || ch == '"') {
            int  rc;

            for (j = 1; j < rest && p[j] != ch; j++) {
                if (p[j] == '\\') {
                    j++;
                }
            }
            if (j >= rest) {
                snprintf(L->err, L->errlen, "unterminated string at line %d",
                         L->line);
                return MOE_EINVAL;
            }
            rc = moe_jj_string(L, p + 1, j - 1);
            if (rc != MOE_OK) {
                return rc;
            }
            moe_jj_lines(L, p, j);
            i += j + 1;
            continue;
        }

        for (j = 0; moe_jj_ops[j] != NULL; j++) {
            size_t  on = strlen(moe_jj_ops[j]);

            if (rest >= on && memcmp(p, moe_jj_ops[j], on) == 0) {
                if (moe_jj_emit(L, MOE_JT_OP, moe_jj_ops[j], on) == NULL) {
                    return MOE_ENOMEM;
                }
                if (on == 1 && strchr("([{", *p)) {
                    depth++;
                } else if (on == 1 && strchr(")]}", *p) && depth > 0) {
                    depth--;
                }
                i += on;
                break;
            }
        }
        if (moe_jj_ops[j] == NULL) {
            snprintf(L->err, L->errlen, "unexpected character '%c' at line %d",
                     ch, L->line);
            return MOE_EINVAL;
        }
    }
}


int
moe_jj_lex(moe_jj_arena_t *a, const char *s, size_t len, moe_jj_tok_t **toks,
    size_t *ntoks, char *err, size_t errlen)
{
    moe_jj_lexer_t  L;
    size_t          pos = 0;
    int             rc = MOE_OK;

    memset(&L, 0, sizeof(L));
    L.a = a;
    L.line = 1;
    L.err = err;
    L.errlen = errlen;

    while (pos < len && rc == MOE_OK) {
        size_t  tag = pos, tn, k;
        int     kind = 0, sign = 0, line_starting;

        line_starting = pos == 0 || s[pos - 1] == '\n';

        while (tag + 1 < len) {
            if (s[tag] == '{' && (s[tag + 1] == '{' || s[tag + 1] == '%'
                                  || s[tag + 1] == '#'))
            {
                kind = s[tag + 1];
                break;
            }
            tag++;
        }
        if (kind == 0) {
            tag = len;
        }

        tn = tag - pos;
        if (kind != 0 && tag + 2 < len
            && (s[tag + 2] == '-' || s[tag + 2] == '+'))
        {
            sign = s[tag + 2];
        }

        if (sign == '-') {
            while (tn > 0 && (k = moe_jj_space_back(s + pos, tn)) > 0) {
                tn -= k;
            }
        } else if (sign != '+' && (kind == '%' || kind == '#')) {
            size_t  l = tn;

            while (l > 0 && s[pos + l - 1] != '\n') {
                l--;
            }
            if (l > 0 || line_starting) {
                for (k = l; k < tn; k++) {
                    if (strchr(" \t\r\f\v", s[pos + k]) == NULL) {
                        break;
                    }
                }
                if (k == tn) {
                    tn = l;
                }
            }
        }

        if (tn > 0 && moe_jj_emit(&L, MOE_JT_TEXT, s + pos, tn) == NULL) {
            rc = MOE_ENOMEM;
            break;
        }
        moe_jj_lines(&L, s + pos, tag - pos);

        if (kind == 0) {
            break;
        }
        pos = tag + 2 + (sign ? 1 : 0);

        if (kind == '#') {
            size_t  e = pos;

            while (e + 1 < len && !(s[e] == '#' && s[e + 1] == '}')) {
                e++;
            }
            if (e + 1 >= len) {
                snprintf(err, errlen, "unclosed comment at line %d", L.line);
                rc = MOE_EINVAL;
                break;
            }
            moe_jj_lines(&L, s + pos, e + 2 - pos);
            pos = e + 2;
            if (e > tag + 2 && s[e - 1] == '-') {
                while (pos < len && (k = moe_jj_space(s + pos, len - pos))) {
                    moe_jj_lines(&L, s + pos, k);
                    pos += k;
                }
            } else if (!(e > tag + 2 && s[e - 1] == '+') && pos < len
                       && s[pos] == '\n')
            {
                L.line++;
                pos++;
            }
            continue;
        }

        if (moe_jj_emit(&L, kind == '%' ? MOE_JT_BLOCK_BEGIN
                                        : MOE_JT_VAR_BEGIN, NULL, 0) == NULL)
        {
            rc = MOE_ENOMEM;
            break;
        }
        rc = moe_jj_tag(&L, s, len, &pos, kind == '%');
    }

    if (rc == MOE_OK && moe_jj_emit(&L, MOE_JT_EOF, NULL, 0) == NULL) {
        rc = MOE_ENOMEM;
    }
    if (rc != MOE_OK) {
        free(L.v);
        if (rc == MOE_ENOMEM) {
            snprintf(err, errlen, "out of memory parsing the template");
        }
        return rc;
    }

    *toks = L.v;
    *ntoks = L.n;

    return MOE_OK;
}
