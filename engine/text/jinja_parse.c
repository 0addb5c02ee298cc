/*
 * Jinja parser: tokens -> syntax tree, with Jinja2's operator precedence
 * (condexpr < or < and < not < compare < +,- < ~ < *,/,//,% < ** < unary
 * < postfix, filters and tests).
 */

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "text/jinja_int.h"



static moe_jn_t *moe_jj_or(moe_jj_parser_t *P);
static moe_jn_t *moe_jj_unary(moe_jj_parser_t *P, int with_filter);
static moe_jn_t *moe_jj_primary(moe_jj_parser_t *P);


moe_jn_t *
moe_jj_fail_at(moe_jj_parser_t *P, const char *what, const char *name,
    size_t nlen)
{
    if (!P->failed) {
        int  line = P->t[P->i < P->n ? P->i : P->n - 1].line;

        P->failed = 1;
        if (name != NULL) {
            snprintf(P->err, P->errlen, "%s '%.*s' at line %d", what,
                     (int) (nlen > 64 ? 64 : nlen), name, line);
        } else {
            snprintf(P->err, P->errlen, "%s at line %d", what, line);
        }
    }
    return NULL;
}


moe_jj_tok_t *
moe_jj_cur(moe_jj_parser_t *P)
{
    return &P->t[P->i < P->n ? P->i : P->n - 1];
}


int
moe_jj_is_op(moe_jj_parser_t *P, const char *op)
{
    moe_jj_tok_t  *t = moe_jj_cur(P);

    return t->t == MOE_JT_OP && t->n == strlen(op)
           && memcmp(t->p, op, t->n) == 0;
}


int
moe_jj_is_name(moe_jj_parser_t *P, const char *name)
{
    moe_jj_tok_t  *t = moe_jj_cur(P);

    return t->t == MOE_JT_NAME && t->n == strlen(name)
           && memcmp(t->p, name, t->n) == 0;
}


int
moe_jj_accept_op(moe_jj_parser_t *P, const char *op)
{
    if (moe_jj_is_op(P, op)) {
        P->i++;
        return 1;
    }
    return 0;
}


static int
moe_jj_expect_op(moe_jj_parser_t *P, const char *op)
{
    if (moe_jj_accept_op(P, op)) {
        return 1;
    }
    moe_jj_fail_at(P, "expected", op, strlen(op));
    return 0;
}


moe_jn_t *
moe_jj_node(moe_jj_parser_t *P, int type)
{
    moe_jn_t  *n = moe_jj_alloc(P->a, sizeof(*n));

    if (n == NULL) {
        return moe_jj_fail_at(P, "out of memory", NULL, 0);
    }
    memset(n, 0, sizeof(*n));
    n->t = type;
    n->line = moe_jj_cur(P)->line;

    return n;
}


/* Grows n->kids (and n->kw when kw != NULL or already present). */
int
moe_jj_add_kid(moe_jj_parser_t *P, moe_jn_t *n, moe_jn_t *kid, char *kw)
{
    moe_jn_t  **k;
    char      **w;
    int         cap = n->nkids < 4 ? 4 : n->nkids;

    if ((n->nkids & (n->nkids - 1)) == 0 || n->nkids < 4) {
        k = moe_jj_alloc(P->a, (size_t) cap * 2 * sizeof(*k));
        w = moe_jj_alloc(P->a, (size_t) cap * 2 * sizeof(*w));
        if (k == NULL || w == NULL) {
            moe_jj_fail_at(P, "out of memory", NULL, 0);
            return 0;
        }
        if (n->nkids > 0) {
            memcpy(k, n->kids, (size_t) n->nkids * sizeof(*k));
            memcpy(w, n->kw, (size_t) n->nkids * sizeof(*w));
        }
        n->kids = k;
        n->kw = w;
    }
    n->kids[n->nkids] = kid;
    n->kw[n->nkids] = kw;
    n->nkids++;

    return 1;
}


char *
moe_jj_tokstr(moe_jj_parser_t *P, moe_jj_tok_t *t)
{
    char  *s = moe_jj_strdup(P->a, t->p, t->n);

    if (s == NULL) {
        moe_jj_fail_at(P, "out of memory", NULL, 0);
    }
    return s;
}


/* Call arguments "(a, b, k=v)" after the '(' was consumed. */
static int
moe_jj_args(moe_jj_parser_t *P, moe_jn_t *n)
{
    while (!P->failed && !moe_jj_accept_op(P, ")")) {
        moe_jn_t  *v;
        char      *kw = NULL;

        if (n->nkids > 0 && !moe_jj_expect_op(P, ",")) {
            return 0;
        }
        if (moe_jj_accept_op(P, ")")) {
            break;
        }
        if (moe_jj_cur(P)->t == MOE_JT_NAME && P->i + 1 < P->n
            && P->t[P->i + 1].t == MOE_JT_OP && P->t[P->i + 1].n == 1
            && P->t[P->i + 1].p[0] == '=')
        {
            kw = moe_jj_tokstr(P, moe_jj_cur(P));
            P->i += 2;
        } else if (n->nkids > n->nargs) {
            moe_jj_fail_at(P, "positional argument after keyword", NULL, 0);
            return 0;
        }
        v = moe_jj_expr(P);
        if (v == NULL || !moe_jj_add_kid(P, n, v, kw)) {
            return 0;
        }
        if (kw == NULL) {
            n->nargs++;
        }
    }
    return !P->failed;
}


/*
 * A `type` node (ATTR, FILTER, TEST) over node, named by the current token;
 * `what` is the error when that is not a name (ATTR also takes an integer).
 */
static moe_jn_t *
moe_jj_named(moe_jj_parser_t *P, int type, moe_jn_t *node, const char *what)
{
    moe_jj_tok_t  *t = moe_jj_cur(P);
    moe_jn_t      *n;

    if (t->t != MOE_JT_NAME && (type != MOE_JN_ATTR || t->t != MOE_JT_INT)) {
        return moe_jj_fail_at(P, what, NULL, 0);
    }
    n = moe_jj_node(P, type);
    if (n == NULL) {
        return NULL;
    }
    n->a = node;
    n->s = t->p;
    n->sn = t->n;
    P->i++;
    return n;
}


/* A call of node, after the '(' was consumed. */
static moe_jn_t *
moe_jj_call(moe_jj_parser_t *P, moe_jn_t *node)
{
    moe_jn_t  *n = moe_jj_node(P, MOE_JN_CALL);

    if (n == NULL) {
        return NULL;
    }
    n->a = node;
    if (!moe_jj_args(P, n)) {
        return NULL;
    }
    return n;
}


static moe_jn_t *
moe_jj_postfix(moe_jj_parser_t *P, moe_jn_t *node)
{
    while (node != NULL && !P->failed) {
        moe_jn_t  *n;

        if (moe_jj_accept_op(P, ".")) {
            node = moe_jj_named(P, MOE_JN_ATTR, node,
                                "expected a name after '.'");

        } else if (moe_jj_accept_op(P, "[")) {
            moe_jn_t  *part[3] = { NULL, NULL, NULL };
            int        k = 0, slice = 0;

            for ( ;; ) {
                if (!moe_jj_is_op(P, ":") && !moe_jj_is_op(P, "]")) {
                    part[k] = moe_jj_expr(P);
                    if (part[k] == NULL) {
                        return NULL;
                    }
                }
                if (k < 2 && moe_jj_accept_op(P, ":")) {
                    slice = 1;
                    k++;
                    continue;
                }
                break;
            }
            if (!moe_jj_expect_op(P, "]")) {
                return NULL;
            }
            if (!slice && part[0] == NULL) {
                return moe_jj_fail_at(P, "empty subscript", NULL, 0);
            }
            n = moe_jj_node(P, slice ? MOE_JN_SLICE : MOE_JN_ITEM);
            if (n == NULL) {
                return NULL;
            }
            n->a = node;
            n->b = part[0];
            n->c = part[1];
            n->cond = part[2];
            node = n;

        } else if (moe_jj_accept_op(P, "(")) {
            node = moe_jj_call(P, node);

        } else {
            break;
        }
    }
    return P->failed ? NULL : node;
}


static moe_jn_t *
moe_jj_filters(moe_jj_parser_t *P, moe_jn_t *node)
{
    while (node != NULL && !P->failed) {
        moe_jn_t      *n;
        moe_jj_tok_t  *t;
        int            neg = 0;

        if (moe_jj_accept_op(P, "|")) {
            n = moe_jj_named(P, MOE_JN_FILTER, node, "expected a filter name");
            if (n == NULL
                || (moe_jj_accept_op(P, "(") && !moe_jj_args(P, n)))
            {
                return NULL;
            }
            node = n;

        } else if (moe_jj_is_name(P, "is")) {
            P->i++;
            if (moe_jj_is_name(P, "not")) {
                neg = 1;
                P->i++;
            }
            n = moe_jj_named(P, MOE_JN_TEST, node, "expected a test name");
            if (n == NULL) {
                return NULL;
            }
            t = moe_jj_cur(P);
            if (moe_jj_accept_op(P, "(")) {
                if (!moe_jj_args(P, n)) {
                    return NULL;
                }
            } else if ((t->t == MOE_JT_NAME || t->t == MOE_JT_STRING
                        || t->t == MOE_JT_INT || t->t == MOE_JT_FLOAT
                        || moe_jj_is_op(P, "[") || moe_jj_is_op(P, "{"))
                       && !moe_jj_is_name(P, "else")
                       && !moe_jj_is_name(P, "or")
                       && !moe_jj_is_name(P, "and")
                       && !moe_jj_is_name(P, "if"))
            {
                moe_jn_t  *arg = moe_jj_postfix(P, moe_jj_primary(P));

                if (arg == NULL || !moe_jj_add_kid(P, n, arg, NULL)) {
                    return NULL;
                }
                n->nargs = 1;
            }
            node = n;
            if (neg) {
                n = moe_jj_node(P, MOE_JN_NOT);
                if (n == NULL) {
                    return NULL;
                }
                n->a = node;
                node = n;
            }

        } else if (moe_jj_accept_op(P, "(")) {
            node = moe_jj_call(P, node);

        } else {
            break;
        }
    }
    return P->failed ? NULL : node;
}


/* Comma-separated items up to `close`; `type` LIST, TUPLE or DICT. */
static moe_jn_t *
moe_jj_seq(moe_jj_parser_t *P, int type, const char *close, moe_jn_t *first)
{
    moe_jn_t  *n = moe_jj_node(P, type);

    if (n == NULL || (first != NULL && !moe_jj_add_kid(P, n, first, NULL))) {
        return NULL;
    }
    while (!P->failed) {
        moe_jn_t  *v;

        if (n->nkids > 0 && !moe_jj_accept_op(P, ",")) {
            break;
        }
        if (moe_jj_is_op(P, close)) {
            break;
        }
        v = moe_jj_expr(P);
        if (v == NULL || !moe_jj_add_kid(P, n, v, NULL)) {
            return NULL;
        }
        if (type == MOE_JN_DICT) {
            if (!moe_jj_expect_op(P, ":")) {
                return NULL;
            }
            v = moe_jj_expr(P);
            if (v == NULL || !moe_jj_add_kid(P, n, v, NULL)) {
                return NULL;
            }
        }
    }
    if (!moe_jj_expect_op(P, close)) {
        return NULL;
    }
    return n;
}


static moe_jn_t *
moe_jj_primary(moe_jj_parser_t *P)
{
    moe_jj_tok_t  *t = moe_jj_cur(P);
    moe_jn_t      *n;

    if (P->failed) {
        return NULL;
    }
    if (++P->depth > MOE_JJ_MAX_DEPTH) {
        return moe_jj_fail_at(P, "expression nested too deeply", NULL, 0);
    }

    switch (t->t) {
    case MOE_JT_NAME:
        n = moe_jj_node(P, MOE_JN_LIT);
        if (n == NULL) {
            break;
        }
        P->i++;
        if ((t->n == 4 && (!memcmp(t->p, "true", 4) || !memcmp(t->p, "True", 4)))
            || (t->n == 5 && (!memcmp(t->p, "false", 5)
                              || !memcmp(t->p, "False", 5))))
        {
            n->v = moe_jv_bool(t->n == 4);
        } else if (t->n == 4 && (!memcmp(t->p, "none", 4)
                                 || !memcmp(t->p, "None", 4)))
        {
            n->v = moe_jv_none();
        } else {
            n->t = MOE_JN_NAME;
            n->s = moe_jj_tokstr(P, t);
            n->sn = t->n;
        }
        break;

    case MOE_JT_STRING: {
        size_t  len = 0, j;
        char   *s;

        for (j = P->i; j < P->n && P->t[j].t == MOE_JT_STRING; j++) {
            len += P->t[j].n;
        }
        n = moe_jj_node(P, MOE_JN_LIT);
        s = moe_jj_alloc(P->a, len + 1);
        if (n == NULL || s == NULL) {
            n = moe_jj_fail_at(P, "out of memory", NULL, 0);
            break;
        }
        len = 0;
        for ( ; P->i < j; P->i++) {
            memcpy(s + len, P->t[P->i].p, P->t[P->i].n);
            len += P->t[P->i].n;
        }
        n->v.t = MOE_JV_STR;
        n->v.u.s.p = s;
        n->v.u.s.n = len;
        break;
    }

    case MOE_JT_INT:
    case MOE_JT_FLOAT:
        n = moe_jj_node(P, MOE_JN_LIT);
        if (n != NULL) {
            n->v = t->t == MOE_JT_INT ? moe_jv_int(t->i) : moe_jv_float(t->f);
            P->i++;
        }
        break;

    default:
        if (moe_jj_accept_op(P, "(")) {
            if (moe_jj_accept_op(P, ")")) {
                n = moe_jj_node(P, MOE_JN_TUPLE);
                break;
            }
            n = moe_jj_expr(P);
            if (n != NULL && moe_jj_is_op(P, ",")) {
                n = moe_jj_seq(P, MOE_JN_TUPLE, ")", n);
            } else if (n != NULL && !moe_jj_expect_op(P, ")")) {
                n = NULL;
            }
        } else if (moe_jj_accept_op(P, "[")) {
            n = moe_jj_seq(P, MOE_JN_LIST, "]", NULL);
        } else if (moe_jj_accept_op(P, "{")) {
            n = moe_jj_seq(P, MOE_JN_DICT, "}", NULL);
        } else if (t->t == MOE_JT_OP) {
            n = moe_jj_fail_at(P, "unexpected", t->p, t->n);
        } else {
            n = moe_jj_fail_at(P, "unexpected end of tag", NULL, 0);
        }
    }

    P->depth--;
    return P->failed ? NULL : n;
}


static moe_jn_t *
moe_jj_bin(moe_jj_parser_t *P, int type, const char *op, moe_jn_t *a,
    moe_jn_t *b)
{
    moe_jn_t  *n;

    if (a == NULL || b == NULL || (n = moe_jj_node(P, type)) == NULL) {
        return NULL;
    }
    n->s = op;
    n->sn = op ? strlen(op) : 0;
    n->a = a;
    n->b = b;
    return n;
}


static moe_jn_t *
moe_jj_unary(moe_jj_parser_t *P, int with_filter)
{
    moe_jn_t  *n;

    if (++P->depth > MOE_JJ_MAX_DEPTH) {
        return moe_jj_fail_at(P, "expression nested too deeply", NULL, 0);
    }
    if (moe_jj_is_op(P, "-") || moe_jj_is_op(P, "+")) {
        const char  *op = moe_jj_is_op(P, "-") ? "-" : "+";

        P->i++;
        n = moe_jj_node(P, MOE_JN_UNARY);
        if (n != NULL) {
            n->s = op;
            n->a = moe_jj_unary(P, 0);
            if (n->a == NULL) {
                n = NULL;
            }
        }
    } else {
        n = moe_jj_postfix(P, moe_jj_primary(P));
    }
    if (n != NULL && with_filter) {
        n = moe_jj_filters(P, n);
    }
    P->depth--;
    return n;
}


static moe_jn_t *
moe_jj_pow(moe_jj_parser_t *P)
{
    moe_jn_t  *n = moe_jj_unary(P, 1);

    while (n != NULL && moe_jj_accept_op(P, "**")) {
        n = moe_jj_bin(P, MOE_JN_BIN, "**", n, moe_jj_unary(P, 1));
    }
    return n;
}


/* A left-associative level: operand (ops[k] operand)*, ops NULL-ended. */
static moe_jn_t *
moe_jj_binops(moe_jj_parser_t *P, const char *const *ops,
    moe_jn_t *(*operand)(moe_jj_parser_t *P))
{
    moe_jn_t  *n = operand(P);
    int        k;

    while (n != NULL) {
        for (k = 0; ops[k] && !moe_jj_is_op(P, ops[k]); k++) { }
        if (ops[k] == NULL) {
            break;
        }
        P->i++;
        n = moe_jj_bin(P, MOE_JN_BIN, ops[k], n, operand(P));
    }
    return n;
}


static moe_jn_t *
moe_jj_math2(moe_jj_parser_t *P)
{
    static const char *const  ops[] = { "*", "/", "//", "%", NULL };

    return moe_jj_binops(P, ops, moe_jj_pow);
}


static moe_jn_t *
moe_jj_concat(moe_jj_parser_t *P)
{
    static const char *const  ops[] = { "~", NULL };

    return moe_jj_binops(P, ops, moe_jj_math2);
}


static moe_jn_t *
moe_jj_math1(moe_jj_parser_t *P)
{
    static const char *const  ops[] = { "+", "-", NULL };

    return moe_jj_binops(P, ops, moe_jj_concat);
}


static moe_jn_t *
moe_jj_compare(moe_jj_parser_t *P)
{
    static const char  *ops[] = { "==", "!=", "<", "<=", ">", ">=", NULL };
    moe_jn_t           *first = moe_jj_math1(P), *n = NULL;

    while (first != NULL && !P->failed) {
        const char  *op = NULL;
        int          k;

        for (k = 0; ops[k]; k++) {
            if (moe_jj_is_op(P, ops[k])) {
                op = ops[k];
                P->i++;
                break;
            }
        }
        if (op == NULL && moe_jj_is_name(P, "in")) {
            op = "in";
            P->i++;
        } else if (op == NULL && moe_jj_is_name(P, "not")
                   && P->i + 1 < P->n && P->t[P->i + 1].t == MOE_JT_NAME
                   && P->t[P->i + 1].n == 2
                   && memcmp(P->t[P->i + 1].p, "in", 2) == 0)
        {
            op = "notin";
            P->i += 2;
        }
        if (op == NULL) {
            break;
        }
        if (n == NULL) {
            n = moe_jj_node(P, MOE_JN_CMP);
            if (n == NULL || !moe_jj_add_kid(P, n, first, NULL)) {
                return NULL;
            }
        }
        if (!moe_jj_add_kid(P, n, moe_jj_math1(P), (char *) op)
            || n->kids[n->nkids - 1] == NULL)
        {
            return NULL;
        }
    }
    return P->failed ? NULL : (n ? n : first);
}


static moe_jn_t *
moe_jj_not(moe_jj_parser_t *P)
{
    moe_jn_t  *n;

    if (moe_jj_is_name(P, "not")) {
        P->i++;
        if (++P->depth > MOE_JJ_MAX_DEPTH) {
            return moe_jj_fail_at(P, "expression nested too deeply", NULL, 0);
        }
        n = moe_jj_node(P, MOE_JN_NOT);
        if (n != NULL && (n->a = moe_jj_not(P)) == NULL) {
            n = NULL;
        }
        P->depth--;
        return n;
    }
    return moe_jj_compare(P);
}


static moe_jn_t *
moe_jj_and(moe_jj_parser_t *P)
{
    moe_jn_t  *n = moe_jj_not(P);

    while (n != NULL && moe_jj_is_name(P, "and")) {
        P->i++;
        n = moe_jj_bin(P, MOE_JN_AND, NULL, n, moe_jj_not(P));
    }
    return n;
}


static moe_jn_t *
moe_jj_or(moe_jj_parser_t *P)
{
    moe_jn_t  *n = moe_jj_and(P);

    while (n != NULL && moe_jj_is_name(P, "or")) {
        P->i++;
        n = moe_jj_bin(P, MOE_JN_OR, NULL, n, moe_jj_and(P));
    }
    return n;
}


moe_jn_t *
moe_jj_expr(moe_jj_parser_t *P)
{
    moe_jn_t  *n;

    if (++P->depth > MOE_JJ_MAX_DEPTH) {
        return moe_jj_fail_at(P, "expression nested too deeply", NULL, 0);
    }
    n = moe_jj_or(P);
    while (n != NULL && moe_jj_is_name(P, "if")) {
        moe_jn_t  *c = moe_jj_node(P, MOE_JN_COND);

        P->i++;
        if (c == NULL || (c->a = moe_jj_or(P)) == NULL) {
            n = NULL;
            break;
        }
        c->b = n;
        if (moe_jj_is_name(P, "else")) {
            P->i++;
            if ((c->c = moe_jj_expr(P)) == NULL) {
                n = NULL;
                break;
            }
        }
        n = c;
    }
    P->depth--;
    return n;
}

