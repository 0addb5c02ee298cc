/*
 * Tool calls in model output: the parsers vLLM names hermes, mistral and
 * llama3_json, plus the two shapes the guided decoder forces (tool_choice
 * "required" and a named function), over text that arrives in pieces.
 *
 * The parser keeps the text it has not decided about in `buf`.  In content
 * mode it emits everything up to a possible start marker and holds back a
 * tail that could still become one; after a marker it waits for the whole
 * JSON of the call (a balanced scan that knows strings), parses it with
 * yajl, and emits the call; a body that does not parse is given back as
 * content, marker included.
 */

#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <yajl/yajl_gen.h>
#include <yajl/yajl_tree.h>

#include "moe.h"
#include "util/json.h"

enum {
    TP_CONTENT = 0,     /* plain text; looking for a start marker */
    TP_BODY,            /* after a start marker: the call's JSON */
    TP_AFTER            /* after a call: another one may follow */
};

typedef struct {
    char    id[32];
    char   *name;
    char   *args;
    size_t  args_len;
} tp_call_t;

typedef struct {
    int     type;
    int     index;
    size_t  off;        /* into ev_text */
    size_t  len;
} tp_event_t;

/*
 * The balanced scan of a call's JSON (tp_json_end) kept across pushes, so
 * a body that arrives in many pieces is scanned once: buf[base .. at)
 * scanned so far.  Forgotten whenever buf's front is consumed.
 */
typedef struct {
    int     valid;
    size_t  base;       /* where the JSON (and blanks before it) starts */
    size_t  at;
    size_t  end;        /* > 0: found, buf[base .. end) */
    int     open;       /* its first '{' or '[' seen */
    int     depth;
    int     str;
    int     esc;
    int     not_call;   /* the JSON found parsed, and is no call */
} tp_scan_t;

struct moe_toolparse {
    moe_tool_format_t  fmt;
    uint64_t           rng;
    int                mode;
    int                seen_text;   /* non-blank text went by (llama3) */
    int                via_marker;  /* the body began after the marker */
    int                failed;

    char              *buf;         /* undecided text */
    size_t             len;
    size_t             cap;

    /* how far buf was examined by waits that see nothing new until
     * more text comes (each push would rescan it all: quadratic in a
     * long output) */
    tp_scan_t          scan;        /* the body's JSON */
    tp_scan_t          scan_args;   /* mistral's name[ARGS]{...} */
    size_t             close_at;    /* hermes: "</tool_call>" not in
                                       buf[0 .. close_at) */
    size_t             blank_at;    /* llama3: buf[0 .. blank_at) blank */

    tp_call_t         *calls;
    int                n_calls;
    int                cap_calls;

    tp_event_t        *ev;
    size_t             n_ev;
    size_t             cap_ev;
    size_t             next_ev;
    char              *ev_text;
    size_t             ev_len;
    size_t             ev_cap;
};

static const char *const tp_names[] = {
    "none", "hermes", "mistral", "llama3_json", "required", "named"
};


int
moe_tool_format_from_name(const char *name)
{
    int  i;

    if (name == NULL) {
        return -1;
    }

    for (i = 0; i <= MOE_TOOL_LLAMA3_JSON; i++) {
        if (strcmp(name, tp_names[i]) == 0) {
            return i;
        }
    }

    return -1;
}


const char *
moe_tool_format_name(int format)
{
    if (format < 0 || format > MOE_TOOL_NAMED) {
        return "unknown";
    }

    return tp_names[format];
}


moe_tool_format_t
moe_tool_format_detect(const char *architecture, const char *chat_template)
{
    if (chat_template != NULL) {
        if (strstr(chat_template, "<tool_call>")) {
            return MOE_TOOL_HERMES;
        }
        if (strstr(chat_template, "[TOOL_CALLS]")) {
            return MOE_TOOL_MISTRAL;
        }
        if (strstr(chat_template, "<|python_tag|>")
            || strstr(chat_template, "ipython"))
        {
            return MOE_TOOL_LLAMA3_JSON;
        }
        if (strstr(chat_template, "<|im_start|>")) {
            return MOE_TOOL_HERMES;     /* ChatML: Hermes and Qwen */
        }
    }

    if (architecture != NULL) {
        if (strncmp(architecture, "Qwen", 4) == 0) {
            return MOE_TOOL_HERMES;
        }
        if (strncmp(architecture, "Mistral", 7) == 0
            || strncmp(architecture, "Mixtral", 7) == 0)
        {
            return MOE_TOOL_MISTRAL;
        }
        if (strncmp(architecture, "Llama", 5) == 0) {
            return MOE_TOOL_LLAMA3_JSON;
        }
    }

    return MOE_TOOL_HERMES;
}


/* ------------------------------------------------------------ buffers */

static int
tp_grow(char **p, size_t *cap, size_t need)
{
    size_t  c;
    char   *n;

    if (need <= *cap) {
        return MOE_OK;
    }

    c = *cap ? *cap : 128;
    while (c < need) {
        c *= 2;
    }

    n = realloc(*p, c);
    if (n == NULL) {
        return MOE_ENOMEM;
    }

    *p = n;
    *cap = c;

    return MOE_OK;
}


/* what was examined of buf no longer holds (its front moved) */
static void
tp_forget(moe_toolparse_t *p)
{
    p->scan.valid = 0;
    p->scan_args.valid = 0;
    p->close_at = 0;
    p->blank_at = 0;
}


/* drops the first n bytes of the undecided text */
static void
tp_consume(moe_toolparse_t *p, size_t n)
{
    if (n == 0) {
        return;         /* buf may be NULL: nothing was pushed yet */
    }
    memmove(p->buf, p->buf + n, p->len - n);
    p->len -= n;
    tp_forget(p);
}


static int
tp_event(moe_toolparse_t *p, int type, int index, const char *text,
    size_t len)
{
    tp_event_t  *e;

    /* adjacent pieces of content or of one call's arguments: one event */
    if (p->n_ev > p->next_ev && type != MOE_TOOLEV_CALL) {
        e = &p->ev[p->n_ev - 1];

        if (e->type == type && e->index == index
            && e->off + e->len == p->ev_len)
        {
            if (tp_grow(&p->ev_text, &p->ev_cap, p->ev_len + len + 1)) {
                return MOE_ENOMEM;
            }
            memcpy(p->ev_text + p->ev_len, text, len);
            p->ev_len += len;
            e->len += len;
            return MOE_OK;
        }
    }

    if (type == MOE_TOOLEV_CONTENT && len == 0) {
        return MOE_OK;
    }

    if (p->n_ev == p->cap_ev) {
        size_t       c = p->cap_ev ? p->cap_ev * 2 : 8;
        tp_event_t  *n = realloc(p->ev, c * sizeof(tp_event_t));

        if (n == NULL) {
            return MOE_ENOMEM;
        }
        p->ev = n;
        p->cap_ev = c;
    }

    if (tp_grow(&p->ev_text, &p->ev_cap, p->ev_len + len + 1)) {
        return MOE_ENOMEM;
    }

    e = &p->ev[p->n_ev++];
    e->type = type;
    e->index = index;
    e->off = p->ev_len;
    e->len = len;

    if (len) {
        memcpy(p->ev_text + p->ev_len, text, len);
    }
    p->ev_len += len;

    return MOE_OK;
}


static int
tp_content(moe_toolparse_t *p, const char *text, size_t len)
{
    size_t  i;

    for (i = 0; i < len && !p->seen_text; i++) {
        if (text[i] != ' ' && text[i] != '\n' && text[i] != '\t'
            && text[i] != '\r')
        {
            p->seen_text = 1;
        }
    }

    return tp_event(p, MOE_TOOLEV_CONTENT, 0, text, len);
}


/* ------------------------------------------------------------ call ids */

static void
tp_id(moe_toolparse_t *p, char *id, size_t n)
{
    static const char  abc[] = "abcdefghijklmnopqrstuvwxyz"
                               "ABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789";
    size_t    i, k, start;
    uint64_t  z;

    if (p->fmt == MOE_TOOL_MISTRAL) {
        k = 9;              /* Mistral's templates check the length */
        start = 0;
    } else {
        k = 24;
        memcpy(id, "call_", 5);
        start = 5;
    }

    for (i = 0; i < k && start + i + 1 < n; i++) {
        /* splitmix64 */
        z = (p->rng += 0x9e3779b97f4a7c15ULL);
        z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
        z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
        z ^= z >> 31;
        id[start + i] = abc[z % (sizeof(abc) - 1)];
    }

    id[start + i] = '\0';
}


static tp_call_t *
tp_new_call(moe_toolparse_t *p, const char *name)
{
    tp_call_t  *c;

    if (p->n_calls == p->cap_calls) {
        int         n = p->cap_calls ? p->cap_calls * 2 : 4;
        tp_call_t  *a = realloc(p->calls, n * sizeof(tp_call_t));

        if (a == NULL) {
            return NULL;
        }
        p->calls = a;
        p->cap_calls = n;
    }

    c = &p->calls[p->n_calls];
    memset(c, 0, sizeof(*c));
    c->name = strdup(name);
    c->args = malloc(1);
    if (c->name == NULL || c->args == NULL) {
        free(c->name);
        free(c->args);
        return NULL;
    }
    c->args[0] = '\0';
    tp_id(p, c->id, sizeof(c->id));
    p->n_calls++;

    return c;
}


static int
tp_add_args(moe_toolparse_t *p, int i, const char *text, size_t len)
{
    tp_call_t  *c = &p->calls[i];
    char       *n;

    n = realloc(c->args, c->args_len + len + 1);
    if (n == NULL) {
        return MOE_ENOMEM;
    }
    memcpy(n + c->args_len, text, len);
    c->args = n;
    c->args_len += len;
    c->args[c->args_len] = '\0';

    return tp_event(p, MOE_TOOLEV_ARGUMENTS, i, text, len);
}


/* ------------------------------------------------------------ JSON */

/*
 * The end of the JSON object or array at buf[base ..] (after blanks): its
 * length including the blanks before it, 0 while it is incomplete, -1
 * when it does not start with '{' or '['.  Resumes where the last call
 * with the same scan and base stopped.
 */
static long
tp_json_end(moe_toolparse_t *p, tp_scan_t *sc, size_t base)
{
    size_t  i;

    if (!sc->valid || sc->base != base) {
        memset(sc, 0, sizeof(*sc));
        sc->valid = 1;
        sc->base = base;
        sc->at = base;
    }

    if (sc->end > 0) {
        return (long) (sc->end - base);
    }

    for (i = sc->at; i < p->len; i++) {
        char  ch = p->buf[i];

        if (!sc->open) {
            if (ch == ' ' || ch == '\n' || ch == '\t' || ch == '\r') {
                continue;
            }
            if (ch != '{' && ch != '[') {
                sc->at = i;
                return -1;
            }
            sc->open = 1;
            sc->depth = 1;
            continue;
        }

        if (sc->str) {
            if (sc->esc) {
                sc->esc = 0;
            } else if (ch == '\\') {
                sc->esc = 1;
            } else if (ch == '"') {
                sc->str = 0;
            }
            continue;
        }

        if (ch == '"') {
            sc->str = 1;
        } else if (ch == '{' || ch == '[') {
            sc->depth++;
        } else if (ch == '}' || ch == ']') {
            if (--sc->depth == 0) {
                sc->end = i + 1;
                return (long) (sc->end - base);
            }
        }
    }

    sc->at = p->len;
    return 0;
}


static void
tp_gen_value(yajl_gen g, yajl_val v)
{
    size_t  i;

    if (YAJL_IS_STRING(v)) {
        yajl_gen_string(g, (const unsigned char *) v->u.string,
                        strlen(v->u.string));

    } else if (YAJL_IS_NUMBER(v)) {
        yajl_gen_number(g, v->u.number.r, strlen(v->u.number.r));

    } else if (YAJL_IS_OBJECT(v)) {
        yajl_gen_map_open(g);
        for (i = 0; i < v->u.object.len; i++) {
            yajl_gen_string(g, (const unsigned char *) v->u.object.keys[i],
                            strlen(v->u.object.keys[i]));
            tp_gen_value(g, v->u.object.values[i]);
        }
        yajl_gen_map_close(g);

    } else if (YAJL_IS_ARRAY(v)) {
        yajl_gen_array_open(g);
        for (i = 0; i < v->u.array.len; i++) {
            tp_gen_value(g, v->u.array.values[i]);
        }
        yajl_gen_array_close(g);

    } else if (YAJL_IS_TRUE(v)) {
        yajl_gen_bool(g, 1);

    } else if (YAJL_IS_FALSE(v)) {
        yajl_gen_bool(g, 0);

    } else {
        yajl_gen_null(g);
    }
}


static yajl_val
tp_get(yajl_val obj, const char *key)
{
    return moe_json_get(obj, key);
}


/* a {"name", "arguments"|"parameters"} object is a call */
static int
tp_is_call(yajl_val o)
{
    yajl_val  name, args;

    name = tp_get(o, "name");
    args = tp_get(o, "arguments");
    if (args == NULL) {
        args = tp_get(o, "parameters");
    }

    return YAJL_IS_STRING(name) && name->u.string[0] != '\0'
           && (args == NULL || YAJL_IS_OBJECT(args) || YAJL_IS_STRING(args)
               || YAJL_IS_NULL(args));
}


static int
tp_emit_call(moe_toolparse_t *p, yajl_val o)
{
    int             rc, i;
    size_t          len;
    yajl_gen        g;
    yajl_val        args;
    tp_call_t      *c;
    const unsigned  char *out;

    args = tp_get(o, "arguments");
    if (args == NULL) {
        args = tp_get(o, "parameters");
    }

    c = tp_new_call(p, tp_get(o, "name")->u.string);
    if (c == NULL) {
        return MOE_ENOMEM;
    }
    i = p->n_calls - 1;

    rc = tp_event(p, MOE_TOOLEV_CALL, i, "", 0);
    if (rc != MOE_OK) {
        return rc;
    }

    if (args == NULL || YAJL_IS_NULL(args)) {
        return tp_add_args(p, i, "{}", 2);
    }

    if (YAJL_IS_STRING(args)) {
        return tp_add_args(p, i, args->u.string, strlen(args->u.string));
    }

    g = yajl_gen_alloc(NULL);
    if (g == NULL) {
        return MOE_ENOMEM;
    }

    tp_gen_value(g, args);
    rc = MOE_ENOMEM;
    if (yajl_gen_get_buf(g, &out, &len) == yajl_gen_status_ok) {
        rc = tp_add_args(p, i, (const char *) out, len);
    }
    yajl_gen_free(g);

    return rc;
}


/*
 * The JSON text s[0..len) as calls: an object that is a call, or an array
 * of them (mistral, required).  1: emitted; 0: not calls (nothing
 * emitted); <0: a status.
 */
static int
tp_parse_calls(moe_toolparse_t *p, const char *s, size_t len, int array_ok)
{
    int       rc, ok;
    char     *z;
    size_t    i;
    yajl_val  v;

    z = malloc(len + 1);
    if (z == NULL) {
        return MOE_ENOMEM;
    }
    memcpy(z, s, len);
    z[len] = '\0';

    v = moe_json_parse(z, NULL, 0);
    free(z);

    if (v == NULL) {
        return 0;
    }

    ok = 0;
    rc = MOE_OK;

    if (YAJL_IS_OBJECT(v)) {
        ok = tp_is_call(v);
        if (ok) {
            rc = tp_emit_call(p, v);
        }

    } else if (array_ok && YAJL_IS_ARRAY(v) && v->u.array.len > 0) {
        ok = 1;
        for (i = 0; i < v->u.array.len; i++) {
            ok = ok && tp_is_call(v->u.array.values[i]);
        }
        for (i = 0; ok && rc == MOE_OK && i < v->u.array.len; i++) {
            rc = tp_emit_call(p, v->u.array.values[i]);
        }
    }

    yajl_tree_free(v);

    return rc != MOE_OK ? rc : ok;
}


/* ------------------------------------------------------------ markers */

static const char *
tp_marker(moe_tool_format_t fmt)
{
    switch (fmt) {
    case MOE_TOOL_HERMES:
        return "<tool_call>";
    case MOE_TOOL_MISTRAL:
        return "[TOOL_CALLS]";
    case MOE_TOOL_LLAMA3_JSON:
        return "<|python_tag|>";
    default:
        return NULL;
    }
}


/* the length of the longest tail of s that is a proper prefix of m */
static size_t
tp_partial(const char *s, size_t len, const char *m)
{
    size_t  k, mlen = strlen(m);

    for (k = mlen - 1; k > 0; k--) {
        if (k <= len && memcmp(s + len - k, m, k) == 0) {
            return k;
        }
    }

    return 0;
}


static const char *
tp_find(const char *s, size_t len, const char *m)
{
    size_t  i, mlen = strlen(m);

    for (i = 0; i + mlen <= len; i++) {
        if (s[i] == m[0] && memcmp(s + i, m, mlen) == 0) {
            return s + i;
        }
    }

    return NULL;
}


static int
tp_blank(char c)
{
    return c == ' ' || c == '\n' || c == '\t' || c == '\r';
}


/* ------------------------------------------------------------ the machine */

/* content mode: emit up to a marker; 1 when a call body begins */
static int
tp_step_content(moe_toolparse_t *p, int final, int *more)
{
    int          rc;
    size_t       i, hold;
    const char  *m, *at;

    *more = 0;
    m = tp_marker(p->fmt);

    if (m == NULL) {
        rc = tp_content(p, p->buf, p->len);
        p->len = 0;
        tp_forget(p);
        return rc;
    }

    /* llama3_json: output that starts with '{' is a call too */
    if (p->fmt == MOE_TOOL_LLAMA3_JSON && !p->seen_text) {
        for (i = p->blank_at; i < p->len && tp_blank(p->buf[i]); i++) {
            /* void */
        }
        p->blank_at = i;

        if (i < p->len && p->buf[i] == '{') {
            tp_consume(p, i);
            p->via_marker = 0;
            p->mode = TP_BODY;
            *more = 1;
            return MOE_OK;
        }

        if (i == p->len && !final) {
            return MOE_OK;      /* only blanks yet: wait */
        }
    }

    at = tp_find(p->buf, p->len, m);

    if (at != NULL) {
        rc = tp_content(p, p->buf, at - p->buf);
        if (rc != MOE_OK) {
            return rc;
        }
        tp_consume(p, (at - p->buf) + strlen(m));
        p->via_marker = 1;
        p->mode = TP_BODY;
        *more = 1;
        return MOE_OK;
    }

    hold = final ? 0 : tp_partial(p->buf, p->len, m);
    rc = tp_content(p, p->buf, p->len - hold);
    tp_consume(p, p->len - hold);

    return rc;
}


static int tp_step_mistral_args(moe_toolparse_t *p, int final, int *more);


/* the body was not a call: it goes out as content, marker included */
static int
tp_body_failed(moe_toolparse_t *p, size_t n)
{
    int          rc = MOE_OK;
    const char  *m = tp_marker(p->fmt);

    if (m != NULL && p->via_marker) {
        rc = tp_content(p, m, strlen(m));
    }

    if (rc == MOE_OK) {
        rc = tp_content(p, p->buf, n);
    }
    tp_consume(p, n);
    p->mode = TP_CONTENT;

    return rc;
}


static int
tp_step_body(moe_toolparse_t *p, int final, int *more)
{
    int          rc;
    long         end;
    size_t       n;
    const char  *close;

    *more = 0;

    if (p->fmt == MOE_TOOL_HERMES) {
        /* the JSON's own end first: "</tool_call>" may sit in a string */
        end = tp_json_end(p, &p->scan, 0);

        if (end > 0 && !p->scan.not_call) {
            for (n = (size_t) end; n < p->len && tp_blank(p->buf[n]); n++) {
                /* void */
            }

            if (!final && p->len - n < 12
                && memcmp(p->buf + n, "</tool_call>", p->len - n) == 0)
            {
                return MOE_OK;      /* the closing tag may be coming */
            }

            rc = tp_parse_calls(p, p->buf, (size_t) end, 0);
            if (rc < 0) {
                return rc;
            }

            if (rc == 1) {
                if (p->len - n >= 12
                    && memcmp(p->buf + n, "</tool_call>", 12) == 0)
                {
                    n += 12;
                }
                tp_consume(p, n);
                p->mode = TP_AFTER;
                *more = 1;
                return MOE_OK;
            }

            p->scan.not_call = 1;   /* not parsed again while the closing
                                       tag is awaited */
        }

        if (end == 0 && !final) {
            return MOE_OK;
        }

        /* searched from where the last search ended (less the length
         * of a tag that may straddle it) */
        n = p->close_at > 11 ? p->close_at - 11 : 0;
        close = tp_find(p->buf + n, p->len - n, "</tool_call>");

        if (close == NULL && !final) {
            p->close_at = p->len;
            return MOE_OK;
        }

        *more = 1;
        return tp_body_failed(p, close ? (size_t) (close - p->buf) + 12
                                       : p->len);
    }

    /* mistral, llama3_json, required: one JSON value */

    end = tp_json_end(p, &p->scan, 0);

    if (end < 0 && p->fmt == MOE_TOOL_MISTRAL) {
        /* Mistral's newer tokenizers (v11): name[ARGS]{arguments} */
        return tp_step_mistral_args(p, final, more);
    }

    if (end == 0 && !final) {
        return MOE_OK;
    }

    /* not JSON: only the marker goes back, the text after it is looked at
     * again as content (giving back all that had arrived hid a later call
     * or not, depending on how the output was cut in pieces) */
    n = end > 0 ? (size_t) end : end < 0 ? 0 : p->len;
    rc = (end > 0) ? tp_parse_calls(p, p->buf, n,
                                    p->fmt != MOE_TOOL_LLAMA3_JSON)
                   : 0;
    if (rc < 0) {
        return rc;
    }

    if (rc == 0) {
        *more = 1;
        return tp_body_failed(p, n);
    }

    tp_consume(p, n);
    p->mode = TP_AFTER;
    *more = 1;

    return MOE_OK;
}


/*
 * [TOOL_CALLS]name[ARGS]{...}: a function name (a-z A-Z 0-9 _ -), the
 * [ARGS] token, the arguments object.  Anything else is content.
 */
static int
tp_step_mistral_args(moe_toolparse_t *p, int final, int *more)
{
    int          rc;
    long         end;
    size_t       i, a;
    tp_call_t   *c;
    const char  *args;

    *more = 1;

    for (i = 0; i < p->len && i < 64; i++) {
        char  ch = p->buf[i];

        if (!((ch >= 'a' && ch <= 'z') || (ch >= 'A' && ch <= 'Z')
              || (ch >= '0' && ch <= '9') || ch == '_' || ch == '-'))
        {
            break;
        }
    }

    a = p->len - i;

    if (i == 0 || i == 64 || (a < 6 && memcmp(p->buf + i, "[ARGS]", a))
        || (a >= 6 && memcmp(p->buf + i, "[ARGS]", 6)))
    {
        if (i < p->len || final) {
            return tp_body_failed(p, i < p->len ? i : p->len);
        }
        *more = 0;
        return MOE_OK;              /* the name may go on */
    }

    if (a < 6) {
        if (final) {
            return tp_body_failed(p, p->len);
        }
        *more = 0;
        return MOE_OK;
    }

    args = p->buf + i + 6;
    end = tp_json_end(p, &p->scan_args, i + 6);

    if (end < 0) {
        /* not JSON: marker, name and [ARGS] go back, what follows is
         * looked at again (as in tp_step_body) */
        return tp_body_failed(p, i + 6);
    }

    if (end == 0) {
        if (final) {
            return tp_body_failed(p, p->len);
        }
        *more = 0;
        return MOE_OK;
    }

    /* a call whose arguments parse as an object */
    {
        char      *z = malloc((size_t) end + 1);
        yajl_val   v;

        if (z == NULL) {
            return MOE_ENOMEM;
        }
        memcpy(z, args, (size_t) end);
        z[end] = '\0';
        v = moe_json_parse(z, NULL, 0);
        free(z);

        if (!YAJL_IS_OBJECT(v)) {
            yajl_tree_free(v);
            return tp_body_failed(p, i + 6 + (size_t) end);
        }

        p->buf[i] = '\0';
        c = tp_new_call(p, p->buf);
        rc = (c == NULL) ? MOE_ENOMEM
                         : tp_event(p, MOE_TOOLEV_CALL, p->n_calls - 1, "", 0);
        if (rc == MOE_OK) {
            yajl_gen              g = yajl_gen_alloc(NULL);
            const unsigned char  *out;
            size_t                len;

            rc = MOE_ENOMEM;
            if (g != NULL) {
                tp_gen_value(g, v);
                if (yajl_gen_get_buf(g, &out, &len) == yajl_gen_status_ok) {
                    rc = tp_add_args(p, p->n_calls - 1, (const char *) out,
                                     len);
                }
                yajl_gen_free(g);
            }
        }
        yajl_tree_free(v);

        if (rc != MOE_OK) {
            return rc;
        }
    }

    tp_consume(p, i + 6 + (size_t) end);
    p->mode = TP_AFTER;

    return MOE_OK;
}


/* after a call: blanks (and llama3's ';') go, then another call or text */
static int
tp_step_after(moe_toolparse_t *p, int final, int *more)
{
    size_t       i;
    const char  *m;

    *more = 0;

    for (i = 0; i < p->len; i++) {
        if (!tp_blank(p->buf[i])
            && !(p->fmt == MOE_TOOL_LLAMA3_JSON && p->buf[i] == ';'))
        {
            break;
        }
    }
    tp_consume(p, i);

    if (p->len == 0) {
        return MOE_OK;
    }

    m = tp_marker(p->fmt);

    if (p->fmt == MOE_TOOL_LLAMA3_JSON && p->buf[0] == '{') {
        p->via_marker = 0;
        p->mode = TP_BODY;
        *more = 1;
        return MOE_OK;
    }

    if (m != NULL) {
        size_t  mlen = strlen(m);

        if (p->len >= mlen && memcmp(p->buf, m, mlen) == 0) {
            tp_consume(p, mlen);
            p->via_marker = 1;
            p->mode = TP_BODY;
            *more = 1;
            return MOE_OK;
        }

        if (!final && p->len < mlen && memcmp(p->buf, m, p->len) == 0) {
            return MOE_OK;
        }
    }

    /* text after the calls: content (required: nothing else may come) */
    p->mode = TP_CONTENT;
    p->seen_text = 1;
    if (p->fmt == MOE_TOOL_REQUIRED) {
        int  rc = tp_content(p, p->buf, p->len);

        p->len = 0;
        tp_forget(p);
        return rc;
    }
    *more = 1;

    return MOE_OK;
}


static int
tp_run(moe_toolparse_t *p, int final)
{
    int  rc, more;

    do {
        switch (p->mode) {
        case TP_BODY:
            rc = tp_step_body(p, final, &more);
            break;
        case TP_AFTER:
            rc = tp_step_after(p, final, &more);
            break;
        default:
            rc = tp_step_content(p, final, &more);
            break;
        }

        if (rc != MOE_OK) {
            p->failed = 1;
            return rc;
        }
    } while (more && (p->len > 0 || final));

    return MOE_OK;
}


/* ------------------------------------------------------------ public */

moe_toolparse_t *
moe_toolparse_create(moe_tool_format_t format, const char *fn_name,
    uint64_t seed)
{
    moe_toolparse_t  *p;

    if ((int) format < 0 || format > MOE_TOOL_NAMED
        || (format == MOE_TOOL_NAMED && (fn_name == NULL || !*fn_name)))
    {
        return NULL;
    }

    p = calloc(1, sizeof(*p));
    if (p == NULL) {
        return NULL;
    }

    p->fmt = format;
    p->rng = seed;
    p->mode = (format == MOE_TOOL_REQUIRED) ? TP_BODY : TP_CONTENT;

    if (format == MOE_TOOL_NAMED) {
        if (tp_new_call(p, fn_name) == NULL
            || tp_event(p, MOE_TOOLEV_CALL, 0, "", 0) != MOE_OK)
        {
            moe_toolparse_free(p);
            return NULL;
        }
    }

    return p;
}


void
moe_toolparse_free(moe_toolparse_t *p)
{
    int  i;

    if (p == NULL) {
        return;
    }

    for (i = 0; i < p->n_calls; i++) {
        free(p->calls[i].name);
        free(p->calls[i].args);
    }

    free(p->calls);
    free(p->buf);
    free(p->ev);
    free(p->ev_text);
    free(p);
}


/* events not taken before a push are dropped, except the first call's
 * start of a NAMED parser (queued at create) */
static void
tp_reset_events(moe_toolparse_t *p)
{
    if (p->next_ev >= p->n_ev) {
        p->n_ev = 0;
        p->next_ev = 0;
        p->ev_len = 0;
    }
}


int
moe_toolparse_push(moe_toolparse_t *p, const char *text, size_t len)
{
    if (p->failed) {
        return MOE_ENOMEM;
    }

    tp_reset_events(p);

    if (p->fmt == MOE_TOOL_NAMED) {
        return len ? tp_add_args(p, 0, text, len) : MOE_OK;
    }

    if (tp_grow(&p->buf, &p->cap, p->len + len + 1) != MOE_OK) {
        p->failed = 1;
        return MOE_ENOMEM;
    }

    memcpy(p->buf + p->len, text, len);
    p->len += len;

    return tp_run(p, 0);
}


int
moe_toolparse_finish(moe_toolparse_t *p)
{
    if (p->failed) {
        return MOE_ENOMEM;
    }

    tp_reset_events(p);

    if (p->fmt == MOE_TOOL_NAMED) {
        return MOE_OK;
    }

    return tp_run(p, 1);
}


int
moe_toolparse_next(moe_toolparse_t *p, moe_toolev_t *ev)
{
    tp_event_t  *e;

    if (p->next_ev >= p->n_ev) {
        return 0;
    }

    e = &p->ev[p->next_ev++];

    ev->type = e->type;
    ev->index = e->index;
    ev->text = p->ev_text + e->off;
    ev->len = e->len;
    ev->id = NULL;
    ev->name = NULL;

    if (e->type != MOE_TOOLEV_CONTENT) {
        ev->id = p->calls[e->index].id;
        ev->name = p->calls[e->index].name;
    }

    return 1;
}


int
moe_toolparse_n_calls(const moe_toolparse_t *p)
{
    return p->n_calls;
}


int
moe_toolparse_call(const moe_toolparse_t *p, int i, const char **id,
    const char **name, const char **args, size_t *args_len)
{
    if (i < 0 || i >= p->n_calls) {
        return MOE_EINVAL;
    }

    *id = p->calls[i].id;
    *name = p->calls[i].name;
    *args = p->calls[i].args;
    *args_len = p->calls[i].args_len;

    return MOE_OK;
}
