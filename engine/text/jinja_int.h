/*
 * Internals of the Jinja-subset interpreter (jinja_*.c only): arena,
 * values, tokens, syntax tree and the render context.
 *
 * Files, each calling only those below it (tools/callgraph.sh checks):
 *   jinja_render.c    render entry points (moe_jinja_render*) -> eval
 *   jinja_stmt.c      statement parser, moe_jinja_parse -> parse, lex
 *   jinja_parse.c     expression parser
 *   jinja_lex.c       lexer
 *   jinja_eval.c      evaluator (expressions and statements)
 *   jinja_builtins.c  filters
 *   jinja_methods.c   tests, str/dict methods, globals
 *   jinja_helpers.c   argument lookup and string operations of the two above
 *   jinja_value.c     base: failure path, arena, values, UTF-8 counts
 */

#ifndef MOE_JINJA_INT_H
#define MOE_JINJA_INT_H

#include <setjmp.h>
#include <stddef.h>

#include "text/jinja.h"

#define MOE_JJ_MAX_DEPTH    200          /* nesting of expressions/blocks */
#define MOE_JJ_MAX_STEPS    20000000     /* evaluation steps per render */
#define MOE_JJ_MAX_OUT      (16 << 20)   /* bytes of rendered output */
#define MOE_JJ_MAX_ARENA    (256 << 20)  /* bytes of values per render */

/* ------------------------------------------------------------- arena */

typedef struct moe_jj_chunk_s moe_jj_chunk_t;

typedef struct {
    moe_jj_chunk_t  *head;
    size_t           used;       /* bytes handed out, all chunks */
    size_t           cap;        /* limit on used; 0: none */
} moe_jj_arena_t;

/* NULL when out of memory or over cap. */
void *moe_jj_alloc(moe_jj_arena_t *a, size_t n);
char *moe_jj_strdup(moe_jj_arena_t *a, const char *s, size_t n);
void moe_jj_arena_free(moe_jj_arena_t *a);

/* ------------------------------------------------------------- values */

enum {
    MOE_JV_UNDEF, MOE_JV_NONE, MOE_JV_BOOL, MOE_JV_INT, MOE_JV_FLOAT,
    MOE_JV_STR, MOE_JV_LIST, MOE_JV_DICT
};

typedef struct moe_jv_list_s moe_jv_list_t;
typedef struct moe_jv_dict_s moe_jv_dict_t;

typedef struct {
    int                 t;        /* MOE_JV_* */
    int                 flag;     /* LIST: tuple; DICT: namespace */
    union {
        long long       i;        /* BOOL, INT */
        double          f;
        struct { const char *p; size_t n; } s;   /* not NUL terminated */
        moe_jv_list_t  *l;
        moe_jv_dict_t  *d;
    } u;
    const char         *name;     /* UNDEF: the name that was missing */
} moe_jv_t;

struct moe_jv_list_s {
    moe_jv_t  *v;                 /* [n] */
    size_t     n, cap;
};

struct moe_jv_dict_s {
    moe_jv_t  *k;                 /* [n] keys (strings mostly) */
    moe_jv_t  *v;                 /* [n] values, insertion order */
    size_t     n, cap;
};

/* ------------------------------------------------------------- tokens */

enum {
    MOE_JT_EOF, MOE_JT_TEXT, MOE_JT_VAR_BEGIN, MOE_JT_VAR_END,
    MOE_JT_BLOCK_BEGIN, MOE_JT_BLOCK_END, MOE_JT_NAME, MOE_JT_STRING,
    MOE_JT_INT, MOE_JT_FLOAT, MOE_JT_OP
};

typedef struct {
    int          t;               /* MOE_JT_* */
    int          line;
    const char  *p;               /* TEXT/NAME/STRING (decoded)/OP */
    size_t       n;
    long long    i;
    double       f;
} moe_jj_tok_t;

/* Tokenize normalized source; tokens live in arena a. */
int moe_jj_lex(moe_jj_arena_t *a, const char *src, size_t len,
    moe_jj_tok_t **toks, size_t *ntoks, char *err, size_t errlen);

/* ------------------------------------------------------------- syntax */

enum {
    /* expressions */
    MOE_JN_LIT, MOE_JN_NAME, MOE_JN_LIST, MOE_JN_TUPLE, MOE_JN_DICT,
    MOE_JN_ATTR, MOE_JN_ITEM, MOE_JN_SLICE, MOE_JN_CALL, MOE_JN_FILTER,
    MOE_JN_TEST, MOE_JN_UNARY, MOE_JN_BIN, MOE_JN_AND, MOE_JN_OR,
    MOE_JN_NOT, MOE_JN_CMP, MOE_JN_COND,
    /* statements */
    MOE_JN_TEXT, MOE_JN_OUT, MOE_JN_IF, MOE_JN_FOR, MOE_JN_SET,
    MOE_JN_SETBLOCK, MOE_JN_BREAK, MOE_JN_CONTINUE, MOE_JN_BODY
};

typedef struct moe_jn_s moe_jn_t;

struct moe_jn_s {
    int          t;               /* MOE_JN_* */
    int          line;
    const char  *s;               /* NAME/ATTR/FILTER/TEST/CALL name, op,
                                     TEXT data, SET target attr */
    size_t       sn;
    moe_jv_t     v;               /* LIT */
    moe_jn_t    *a, *b, *c;       /* operands; IF: cond, then, else;
                                     FOR: iter, body, else; SLICE: lo,hi,st */
    moe_jn_t   **kids;            /* LIST/TUPLE/DICT(k,v,k,v..)/args/BODY/
                                     FOR and SET targets, CMP operands */
    char       **kw;              /* keyword names for kids[nargs..] */
    int          nkids;
    int          nargs;           /* positional args among kids */
    moe_jn_t    *cond;            /* FOR: loop filter */
};

struct moe_jinja_tmpl {
    moe_jj_arena_t  arena;
    moe_jn_t       *root;
};


/* parser state shared by jinja_parse.c (expressions) and jinja_stmt.c */
typedef struct {
    moe_jj_arena_t  *a;
    moe_jj_tok_t    *t;
    size_t           n, i;
    int              depth;
    char            *err;
    size_t           errlen;
    int              failed;
    int              in_loop;
} moe_jj_parser_t;

moe_jn_t *moe_jj_fail_at(moe_jj_parser_t *P, const char *what,
    const char *name, size_t nlen);
moe_jj_tok_t *moe_jj_cur(moe_jj_parser_t *P);
int moe_jj_is_op(moe_jj_parser_t *P, const char *op);
int moe_jj_is_name(moe_jj_parser_t *P, const char *name);
int moe_jj_accept_op(moe_jj_parser_t *P, const char *op);
moe_jn_t *moe_jj_node(moe_jj_parser_t *P, int type);
int moe_jj_add_kid(moe_jj_parser_t *P, moe_jn_t *n, moe_jn_t *kid, char *kw);
char *moe_jj_tokstr(moe_jj_parser_t *P, moe_jj_tok_t *t);
moe_jn_t *moe_jj_expr(moe_jj_parser_t *P);

/* ------------------------------------------------------------- render */

typedef struct moe_jj_scope_s moe_jj_scope_t;

struct moe_jj_scope_s {
    moe_jj_scope_t  *up;
    moe_jv_dict_t   *vars;
};

typedef struct {
    moe_jj_arena_t   arena;
    moe_jj_scope_t  *scope;
    char            *out;
    size_t           len, cap;
    long             steps;
    int              depth;
    int              brk;         /* 1 break, 2 continue pending */
    jmp_buf          jb;
    int              rc;
    char             err[512];
} moe_jj_ctx_t;

/* Fail the render: sets rc/err and longjmps out (jinja_value.c, the base
 * layer, so that no file calls back up to report an error). */
void moe_jj_fail(moe_jj_ctx_t *c, int rc, const char *fmt, ...)
    __attribute__((noreturn, format(printf, 3, 4)));

/* Runs statement n (jinja_eval.c). */
void moe_jj_exec(moe_jj_ctx_t *c, moe_jn_t *n);

/* value helpers (jinja_value.c) */
/* moe_jj_alloc() in the render arena; fails the render when over cap. */
void *moe_jj_xalloc(moe_jj_ctx_t *c, size_t n);
moe_jv_t moe_jv_str(moe_jj_ctx_t *c, const char *p, size_t n);
moe_jv_t moe_jv_cstr(moe_jj_ctx_t *c, const char *s);
/* a + b of two strings */
moe_jv_t moe_jv_concat(moe_jj_ctx_t *c, moe_jv_t a, moe_jv_t b);
moe_jv_t moe_jv_int(long long i);
moe_jv_t moe_jv_float(double f);
moe_jv_t moe_jv_bool(int b);
moe_jv_t moe_jv_none(void);
moe_jv_t moe_jv_undef(const char *name);
moe_jv_t moe_jv_list(moe_jj_ctx_t *c);
moe_jv_t moe_jv_dict(moe_jj_ctx_t *c);
void moe_jv_push(moe_jj_ctx_t *c, moe_jv_t *list, moe_jv_t v);
void moe_jv_dict_set(moe_jj_ctx_t *c, moe_jv_dict_t *d, moe_jv_t k,
    moe_jv_t v);
moe_jv_t *moe_jv_dict_get(moe_jv_dict_t *d, const char *k, size_t n);
moe_jv_t *moe_jv_dict_find(moe_jv_dict_t *d, moe_jv_t k);
int moe_jv_truthy(moe_jv_t v);
int moe_jv_eq(moe_jv_t a, moe_jv_t b);
int moe_jv_cmp(moe_jj_ctx_t *c, moe_jv_t a, moe_jv_t b, int line);
const char *moe_jv_type(moe_jv_t v);
/* str() of a value, as Python prints it */
moe_jv_t moe_jv_tostr(moe_jj_ctx_t *c, moe_jv_t v);
/* json.dumps(v, ensure_ascii=False, indent=indent (<0: None)) */
moe_jv_t moe_jv_tojson(moe_jj_ctx_t *c, moe_jv_t v, int indent,
    int sort_keys, int line);
size_t moe_jj_utf8_len(const char *p, size_t n);
/* byte offset of code point index i (clamped to n) */
size_t moe_jj_utf8_off(const char *p, size_t n, size_t i);
/* length of a Python-whitespace character at p (0: not whitespace) */
size_t moe_jj_space(const char *p, size_t n);
size_t moe_jj_space_back(const char *p, size_t n);

/* filters (jinja_builtins.c); tests, methods, globals (jinja_methods.c) */
moe_jv_t moe_jj_filter(moe_jj_ctx_t *c, moe_jn_t *n, moe_jv_t v,
    moe_jv_t *args, int nargs, char **kw, int nkw);
int moe_jj_test(moe_jj_ctx_t *c, moe_jn_t *n, moe_jv_t v, moe_jv_t *args,
    int nargs);
moe_jv_t moe_jj_method(moe_jj_ctx_t *c, moe_jn_t *n, moe_jv_t obj,
    const char *name, moe_jv_t *args, int nargs, char **kw, int nkw);
moe_jv_t moe_jj_global_call(moe_jj_ctx_t *c, moe_jn_t *n, const char *name,
    moe_jv_t *args, int nargs, char **kw, int nkw);

/* helpers shared by jinja_builtins.c and jinja_methods.c
 * (jinja_helpers.c) */
moe_jv_t moe_jj_arg(moe_jv_t *args, int nargs, char **kw, int nkw, int pos,
    const char *name, moe_jv_t dflt);
moe_jv_t moe_jj_need_str(moe_jj_ctx_t *c, moe_jv_t v, const char *what,
    int line);
moe_jv_t moe_jj_strip(moe_jv_t s, int which, moe_jv_t chars);
moe_jv_t moe_jj_case(moe_jj_ctx_t *c, moe_jv_t s, int mode);
moe_jv_t moe_jj_replace(moe_jj_ctx_t *c, moe_jv_t s, moe_jv_t old,
    moe_jv_t new, long long count);
moe_jv_t moe_jj_split(moe_jj_ctx_t *c, moe_jv_t s, moe_jv_t sep,
    long long max, int line);
int moe_jj_affix(moe_jj_ctx_t *c, moe_jv_t s, moe_jv_t a, int end, int line);
moe_jv_t moe_jj_items_of(moe_jj_ctx_t *c, moe_jv_t v, int line);

#endif /* MOE_JINJA_INT_H */
