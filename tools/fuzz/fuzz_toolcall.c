/*
 * libFuzzer harness: the tool-call parsers (engine/text/toolcall.c) on
 * arbitrary model output, and the parser choice on arbitrary chat
 * templates and architecture names.
 *
 * Input: byte 0 picks the format (its value modulo 6: none, hermes,
 * mistral, llama3_json, required, named); byte 1 seeds the split of the
 * text into pushes of 1 to 16 bytes; the rest is the output text.
 *
 * Checks, beside ASan / UBSan / LeakSanitizer and libFuzzer's timeout and
 * RSS limit: push and finish succeed; every event is well formed (a call
 * index in range, CALL events in order, ARGUMENTS of a started call);
 * each call's ARGUMENTS events add up to its whole arguments; the
 * content and calls are the same whether the text comes in one push or
 * in many (same seed, so the same call ids); with format none the content
 * is the text itself.
 */

#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "moe.h"

typedef struct {
    char    *s;
    size_t   len, cap;
} fz_buf_t;

typedef struct {
    fz_buf_t   content;
    fz_buf_t   args[64];      /* per call, from ARGUMENTS events */
    int        n_calls;       /* CALL events seen */
} fz_run_t;


int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);


static void
fz_put(fz_buf_t *b, const char *s, size_t n)
{
    if (b->len + n + 1 > b->cap) {
        b->cap = (b->len + n + 1) * 2;
        b->s = realloc(b->s, b->cap);
        if (b->s == NULL) {
            abort();
        }
    }
    memcpy(b->s + b->len, s, n);
    b->len += n;
    b->s[b->len] = '\0';
}


static void
fz_events(moe_toolparse_t *p, fz_run_t *r)
{
    moe_toolev_t ev;

    while (moe_toolparse_next(p, &ev)) {
        switch (ev.type) {
        case MOE_TOOLEV_CONTENT:
            fz_put(&r->content, ev.text, ev.len);
            break;
        case MOE_TOOLEV_CALL:
            if (ev.index != r->n_calls || ev.id == NULL || ev.name == NULL
                || ev.name[0] == '\0')
            {
                abort();                /* calls out of order */
            }
            r->n_calls++;
            break;
        case MOE_TOOLEV_ARGUMENTS:
            if (ev.index < 0 || ev.index >= r->n_calls) {
                abort();                /* arguments of no started call */
            }
            if (ev.index < 64) {
                fz_put(&r->args[ev.index], ev.text, ev.len);
            }
            break;
        default:
            abort();
        }
    }
}


/* parse text in pushes of the given sizes (NULL: one push) */
static moe_toolparse_t *
fz_parse(moe_tool_format_t fmt, const char *text, size_t len,
    unsigned seed, int split, fz_run_t *r)
{
    moe_toolparse_t *p;
    size_t           at = 0, n;

    p = moe_toolparse_create(fmt, "get_weather", 42);
    if (p == NULL) {
        abort();
    }
    while (at < len) {
        n = len - at;
        if (split) {
            seed = seed * 1103515245u + 12345u;
            n = 1 + (seed >> 16) % 16;
            if (n > len - at) {
                n = len - at;
            }
        }
        if (moe_toolparse_push(p, text + at, n) != MOE_OK) {
            abort();
        }
        fz_events(p, r);
        at += n;
    }
    if (moe_toolparse_finish(p) != MOE_OK) {
        abort();
    }
    fz_events(p, r);
    return p;
}


static void
fz_run_free(fz_run_t *r)
{
    int i;

    free(r->content.s);
    for (i = 0; i < 64; i++) {
        free(r->args[i].s);
    }
}


int
LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    moe_tool_format_t  fmt;
    moe_toolparse_t   *pa, *pb;
    fz_run_t           a, b;
    const char        *text, *ida, *idb, *na, *nb, *aa, *ab;
    size_t             len, la, lb;
    char              *z;
    int                i;

    if (size < 2) {
        return 0;
    }
    fmt = (moe_tool_format_t) (data[0] % 6);
    text = (const char *) data + 2;
    len = size - 2;

    /* the parser choice reads NUL-terminated strings */
    z = malloc(len + 1);
    if (z == NULL) {
        return 0;
    }
    memcpy(z, text, len);
    z[len] = '\0';
    if ((int) moe_tool_format_detect(z, z) < 0
        || moe_tool_format_detect(z, z) > MOE_TOOL_LLAMA3_JSON
        || moe_tool_format_from_name(z) > MOE_TOOL_LLAMA3_JSON)
    {
        abort();
    }
    free(z);

    memset(&a, 0, sizeof(a));
    memset(&b, 0, sizeof(b));
    pa = fz_parse(fmt, text, len, 0, 0, &a);
    pb = fz_parse(fmt, text, len, data[1], 1, &b);

    if (a.n_calls != moe_toolparse_n_calls(pa)) {
        abort();                        /* CALL events != calls */
    }
    if (fmt == MOE_TOOL_NONE
        && (a.content.len != len
            || (len && memcmp(a.content.s, text, len) != 0)))
    {
        abort();                        /* none: the text is the content */
    }
    if (a.n_calls != b.n_calls || a.content.len != b.content.len
        || (a.content.len
            && memcmp(a.content.s, b.content.s, a.content.len) != 0))
    {
        fprintf(stderr, "one push: %d calls, content '%s'\n"
                "split:    %d calls, content '%s'\n", a.n_calls,
                a.content.s ? a.content.s : "", b.n_calls,
                b.content.s ? b.content.s : "");
        abort();                        /* the split changed the result */
    }
    for (i = 0; i < a.n_calls; i++) {
        if (moe_toolparse_call(pa, i, &ida, &na, &aa, &la) != MOE_OK
            || moe_toolparse_call(pb, i, &idb, &nb, &ab, &lb) != MOE_OK
            || strcmp(ida, idb) != 0 || strcmp(na, nb) != 0 || la != lb
            || memcmp(aa, ab, la) != 0 || strlen(aa) > la)
        {
            abort();                    /* a call differs between splits */
        }
        if (i < 64
            && (a.args[i].len != la
                || (la && memcmp(a.args[i].s, aa, la) != 0)))
        {
            abort();                    /* events != the call's arguments */
        }
    }
    if (moe_toolparse_call(pa, a.n_calls, &ida, &na, &aa, &la)
        != MOE_EINVAL)
    {
        abort();
    }
    moe_toolparse_free(pa);
    moe_toolparse_free(pb);
    fz_run_free(&a);
    fz_run_free(&b);
    return 0;
}
