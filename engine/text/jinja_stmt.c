/*
 * Jinja statements ({% if %}, {% for %}, {% set %}, ...) and the public
 * moe_jinja_parse()/moe_jinja_free().
 */

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "text/jinja_int.h"


static moe_jn_t *moe_jj_body(moe_jj_parser_t *P, const char **ends);


static int
moe_jj_expect_end(moe_jj_parser_t *P)
{
    if (moe_jj_cur(P)->t == MOE_JT_BLOCK_END) {
        P->i++;
        return 1;
    }
    moe_jj_fail_at(P, "expected end of statement", NULL, 0);
    return 0;
}


/* A target list: "a" or "a, b" or "ns.attr" (attr only when allow_attr). */
static moe_jn_t *
moe_jj_targets(moe_jj_parser_t *P, moe_jn_t *n, int allow_attr)
{
    do {
        moe_jj_tok_t  *t = moe_jj_cur(P);
        moe_jn_t      *v;

        if (t->t != MOE_JT_NAME) {
            return moe_jj_fail_at(P, "expected a variable name", NULL, 0);
        }
        v = moe_jj_node(P, MOE_JN_NAME);
        if (v == NULL) {
            return NULL;
        }
        v->s = moe_jj_tokstr(P, t);
        v->sn = t->n;
        P->i++;
        if (allow_attr && moe_jj_accept_op(P, ".")) {
            t = moe_jj_cur(P);
            if (t->t != MOE_JT_NAME) {
                return moe_jj_fail_at(P, "expected an attribute name",
                                      NULL, 0);
            }
            n->s = moe_jj_tokstr(P, t);
            n->sn = t->n;
            P->i++;
            allow_attr = 0;
            if (moe_jj_is_op(P, ",")) {
                return moe_jj_fail_at(P, "unsupported multiple targets",
                                      NULL, 0);
            }
        }
        if (!moe_jj_add_kid(P, n, v, NULL)) {
            return NULL;
        }
    } while (!P->failed && moe_jj_accept_op(P, ","));

    return P->failed ? NULL : n;
}


static moe_jn_t *
moe_jj_stmt_if(moe_jj_parser_t *P)
{
    static const char  *ends[] = { "elif", "else", "endif", NULL };
    moe_jn_t           *n = moe_jj_node(P, MOE_JN_IF);

    if (n == NULL || (n->a = moe_jj_expr(P)) == NULL || !moe_jj_expect_end(P)
        || (n->b = moe_jj_body(P, ends)) == NULL)
    {
        return NULL;
    }
    if (moe_jj_is_name(P, "elif")) {
        P->i++;
        n->c = moe_jj_stmt_if(P);
        return n->c ? n : NULL;
    }
    if (moe_jj_is_name(P, "else")) {
        static const char  *ends2[] = { "endif", NULL };

        P->i++;
        if (!moe_jj_expect_end(P) || (n->c = moe_jj_body(P, ends2)) == NULL) {
            return NULL;
        }
    }
    P->i++;                                          /* endif */
    return moe_jj_expect_end(P) ? n : NULL;
}


static moe_jn_t *
moe_jj_stmt_for(moe_jj_parser_t *P)
{
    static const char  *ends[] = { "else", "endfor", NULL };
    static const char  *ends2[] = { "endfor", NULL };
    moe_jn_t           *n = moe_jj_node(P, MOE_JN_FOR);

    if (n == NULL || moe_jj_targets(P, n, 0) == NULL) {
        return NULL;
    }
    if (!moe_jj_is_name(P, "in")) {
        return moe_jj_fail_at(P, "expected 'in'", NULL, 0);
    }
    P->i++;
    /* the iterable must not swallow the loop filter's "if" */
    n->a = moe_jj_expr(P);
    if (n->a == NULL) {
        return NULL;
    }
    if (n->a->t == MOE_JN_COND && n->a->c == NULL) {
        n->cond = n->a->a;
        n->a = n->a->b;
    }
    if (moe_jj_is_name(P, "recursive")) {
        return moe_jj_fail_at(P, "unsupported", "recursive", 9);
    }
    if (!moe_jj_expect_end(P)) {
        return NULL;
    }
    P->in_loop++;
    n->b = moe_jj_body(P, ends);
    P->in_loop--;
    if (n->b == NULL) {
        return NULL;
    }
    if (moe_jj_is_name(P, "else")) {
        P->i++;
        if (!moe_jj_expect_end(P) || (n->c = moe_jj_body(P, ends2)) == NULL) {
            return NULL;
        }
    }
    P->i++;                                          /* endfor */
    return moe_jj_expect_end(P) ? n : NULL;
}


static moe_jn_t *
moe_jj_stmt_set(moe_jj_parser_t *P)
{
    static const char  *ends[] = { "endset", NULL };
    moe_jn_t           *n = moe_jj_node(P, MOE_JN_SET);

    if (n == NULL || moe_jj_targets(P, n, 1) == NULL) {
        return NULL;
    }
    if (moe_jj_accept_op(P, "=")) {
        n->a = moe_jj_expr(P);
        if (n->a != NULL && moe_jj_is_op(P, ",")) {
            return moe_jj_fail_at(P, "unsupported tuple assignment", NULL, 0);
        }
        return n->a != NULL && moe_jj_expect_end(P) ? n : NULL;
    }
    if (n->nkids != 1 || n->s != NULL) {
        return moe_jj_fail_at(P, "expected '='", NULL, 0);
    }
    if (moe_jj_is_op(P, "|")) {
        return moe_jj_fail_at(P, "unsupported filtered block set", NULL, 0);
    }
    n->t = MOE_JN_SETBLOCK;
    if (!moe_jj_expect_end(P) || (n->b = moe_jj_body(P, ends)) == NULL) {
        return NULL;
    }
    P->i++;
    return moe_jj_expect_end(P) ? n : NULL;
}


/*
 * Statements and text up to a {% name %} with name in `ends` (NULL: up to
 * the end of the template).  Leaves P at that name.
 */
static moe_jn_t *
moe_jj_body(moe_jj_parser_t *P, const char **ends)
{
    moe_jn_t  *body = moe_jj_node(P, MOE_JN_BODY);

    if (body == NULL) {
        return NULL;
    }
    if (++P->depth > MOE_JJ_MAX_DEPTH) {
        return moe_jj_fail_at(P, "blocks nested too deeply", NULL, 0);
    }

    while (!P->failed) {
        moe_jj_tok_t  *t = moe_jj_cur(P);
        moe_jn_t      *n = NULL;
        int            k;

        if (t->t == MOE_JT_EOF) {
            if (ends != NULL) {
                for (k = 0; ends[k + 1] != NULL; k++) { }
                return moe_jj_fail_at(P, "missing", ends[k], strlen(ends[k]));
            }
            break;
        }

        if (t->t == MOE_JT_TEXT) {
            n = moe_jj_node(P, MOE_JN_TEXT);
            if (n == NULL) {
                return NULL;
            }
            n->s = t->p;
            n->sn = t->n;
            P->i++;

        } else if (t->t == MOE_JT_VAR_BEGIN) {
            P->i++;
            n = moe_jj_node(P, MOE_JN_OUT);
            if (n == NULL || (n->a = moe_jj_expr(P)) == NULL) {
                return NULL;
            }
            if (moe_jj_cur(P)->t != MOE_JT_VAR_END) {
                return moe_jj_fail_at(P, "expected '}}'", NULL, 0);
            }
            P->i++;

        } else if (t->t == MOE_JT_BLOCK_BEGIN) {
            P->i++;
            t = moe_jj_cur(P);
            if (t->t != MOE_JT_NAME) {
                return moe_jj_fail_at(P, "expected a statement name", NULL, 0);
            }
            for (k = 0; ends != NULL && ends[k] != NULL; k++) {
                if (moe_jj_is_name(P, ends[k])) {
                    P->depth--;
                    return body;
                }
            }
            P->i++;
            if (t->n == 2 && memcmp(t->p, "if", 2) == 0) {
                n = moe_jj_stmt_if(P);
            } else if (t->n == 3 && memcmp(t->p, "for", 3) == 0) {
                n = moe_jj_stmt_for(P);
            } else if (t->n == 3 && memcmp(t->p, "set", 3) == 0) {
                n = moe_jj_stmt_set(P);
            } else if ((t->n == 5 && memcmp(t->p, "break", 5) == 0)
                       || (t->n == 8 && memcmp(t->p, "continue", 8) == 0))
            {
                if (P->in_loop == 0) {
                    return moe_jj_fail_at(P, "statement outside a loop",
                                          t->p, t->n);
                }
                n = moe_jj_node(P, t->n == 5 ? MOE_JN_BREAK : MOE_JN_CONTINUE);
                if (n == NULL || !moe_jj_expect_end(P)) {
                    return NULL;
                }
            } else if (t->n == 10 && memcmp(t->p, "generation", 10) == 0) {
                static const char  *gends[] = { "endgeneration", NULL };

                if (!moe_jj_expect_end(P)
                    || (n = moe_jj_body(P, gends)) == NULL)
                {
                    return NULL;
                }
                P->i++;
                if (!moe_jj_expect_end(P)) {
                    return NULL;
                }
            } else if (t->n > 3 && memcmp(t->p, "end", 3) == 0) {
                return moe_jj_fail_at(P, "unexpected", t->p, t->n);
            } else {
                return moe_jj_fail_at(P, "unsupported statement", t->p, t->n);
            }
            if (n == NULL) {
                return NULL;
            }

        } else {
            return moe_jj_fail_at(P, "unexpected token", NULL, 0);
        }

        if (!moe_jj_add_kid(P, body, n, NULL)) {
            return NULL;
        }
    }

    P->depth--;
    return P->failed ? NULL : body;
}


static int
moe_jj_parse_tokens(moe_jj_arena_t *a, moe_jj_tok_t *toks, size_t n,
    moe_jn_t **root, char *err, size_t errlen)
{
    moe_jj_parser_t  P;

    memset(&P, 0, sizeof(P));
    P.a = a;
    P.t = toks;
    P.n = n;
    P.err = err;
    P.errlen = errlen;

    *root = moe_jj_body(&P, NULL);

    return *root ? MOE_OK : MOE_EINVAL;
}


int
moe_jinja_parse(const char *src, size_t len, moe_jinja_tmpl_t **out,
    char *err, size_t errlen)
{
    moe_jinja_tmpl_t  *t;
    moe_jj_tok_t      *toks = NULL;
    size_t             ntoks = 0, i, k = 0;
    char              *s;
    int                rc;
    char               dummy[8];

    if (err == NULL || errlen == 0) {
        err = dummy;
        errlen = sizeof(dummy);
    }
    err[0] = '\0';
    *out = NULL;

    t = calloc(1, sizeof(*t));
    s = t ? moe_jj_alloc(&t->arena, len + 1) : NULL;
    if (s == NULL) {
        free(t);
        snprintf(err, errlen, "out of memory parsing the template");
        return MOE_ENOMEM;
    }

    /* Jinja normalizes \r\n and \r to \n and drops one trailing newline */
    for (i = 0; i < len; i++) {
        if (src[i] == '\r') {
            s[k++] = '\n';
            if (i + 1 < len && src[i + 1] == '\n') {
                i++;
            }
        } else {
            s[k++] = src[i];
        }
    }
    if (k > 0 && s[k - 1] == '\n') {
        k--;
    }
    s[k] = '\0';

    rc = moe_jj_lex(&t->arena, s, k, &toks, &ntoks, err, errlen);
    if (rc == MOE_OK) {
        rc = moe_jj_parse_tokens(&t->arena, toks, ntoks, &t->root, err,
                                 errlen);
    }
    free(toks);

    if (rc != MOE_OK) {
        moe_jinja_free(t);
        return rc;
    }

    *out = t;
    return MOE_OK;
}


void
moe_jinja_free(moe_jinja_tmpl_t *t)
{
    if (t != NULL) {
        moe_jj_arena_free(&t->arena);
        free(t);
    }
}
