/*
 * moe_guide_compile (moe.h): every kind goes through GBNF text (gbnf.c)
 * to the flat grammar; the guide keeps the tokenizer's vocabulary trie
 * (made once per tokenizer) and its own mask cache.  Its references
 * (moe_guide_ref / _release) live in matcher.c with the matcher states
 * that hold them, so the two files call in one direction only.
 */

#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <yajl/yajl_tree.h>

#include "guided/guided.h"
#include "guided/guided_int.h"
#include "util/json.h"


/* a choice: a JSON array of strings -> root ::= "a" | "b" ... */
static int
choice_to_gbnf(const char *spec, size_t len, gbuf_t *out, char *err,
    size_t errlen)
{
    char     *txt, perr[128];
    yajl_val  v;
    size_t    i;
    int       rc = MOE_OK;

    txt = strndup(spec, len);
    if (txt == NULL) {
        return MOE_ENOMEM;
    }
    perr[0] = '\0';
    v = moe_json_parse(txt, perr, sizeof(perr));
    free(txt);
    if (v == NULL || !YAJL_IS_ARRAY(v) || v->u.array.len == 0) {
        snprintf(err, errlen, "choice: expected a non-empty JSON array of "
                 "strings%s%.100s", v == NULL ? ": " : "", perr);
        for (txt = err; *txt; txt++) {
            if (*txt == '\n' || *txt == '\r') {
                *txt = ' ';
            }
        }
        yajl_tree_free(v);
        return MOE_EINVAL;
    }
    gb_puts(out, "root ::=");
    for (i = 0; i < v->u.array.len; i++) {
        yajl_val s = v->u.array.values[i];
        if (!YAJL_IS_STRING(s)) {
            snprintf(err, errlen, "choice: entry %zu is not a string", i);
            rc = MOE_EINVAL;
            break;
        }
        gb_puts(out, i ? " | " : " ");
        gb_lit(out, s->u.string, strlen(s->u.string));
    }
    gb_puts(out, "\n");
    yajl_tree_free(v);
    return out->oom ? MOE_ENOMEM : rc;
}


int
moe_guide_compile(const moe_tokenizer_t *t, moe_guided_kind_t kind,
    const char *spec, size_t len, moe_guide_t **out, char *err,
    size_t errlen)
{
    gbuf_t        src = {0};
    moe_guide_t  *g;
    char          dummy[8];
    int           rc;

    if (err == NULL || errlen == 0) {
        err = dummy;
        errlen = sizeof(dummy);
    }
    err[0] = '\0';
    if (out == NULL) {
        return MOE_EINVAL;
    }
    *out = NULL;
    if (t == NULL || (spec == NULL && len > 0 && kind != MOE_GUIDED_JSON_OBJECT)) {
        snprintf(err, errlen, "no tokenizer or no guide text");
        return MOE_EINVAL;
    }
    switch (kind) {
    case MOE_GUIDED_JSON:
        rc = moe_schema_to_gbnf(spec, len, &src, err, errlen);
        break;
    case MOE_GUIDED_JSON_OBJECT:
        gb_puts(&src, "root ::= json-object\n");
        gb_puts(&src, moe_gbnf_json_rules);
        rc = src.oom ? MOE_ENOMEM : MOE_OK;
        break;
    case MOE_GUIDED_REGEX:
        gb_puts(&src, "root ::= ");
        rc = moe_regex_to_gbnf(spec, len, 0, &src, err, errlen);
        gb_puts(&src, "\n");
        break;
    case MOE_GUIDED_GRAMMAR:
        gb_put(&src, spec, len);
        rc = src.oom ? MOE_ENOMEM : MOE_OK;
        break;
    case MOE_GUIDED_CHOICE:
        rc = choice_to_gbnf(spec, len, &src, err, errlen);
        break;
    default:
        snprintf(err, errlen, "unknown guide kind %d", (int) kind);
        return MOE_EINVAL;
    }
    if (rc != MOE_OK) {
        gb_free(&src);
        if (rc == MOE_ENOMEM) {
            snprintf(err, errlen, "out of memory compiling the guide");
        }
        return rc;
    }
    g = calloc(1, sizeof(*g));
    if (g == NULL) {
        gb_free(&src);
        return MOE_ENOMEM;
    }
    rc = moe_gbnf_parse(src.p ? src.p : "", src.len, &g->g, err, errlen);
    gb_free(&src);
    if (rc != MOE_OK) {
        free(g);
        return rc;
    }
    g->trie = moe_vocab_trie_get(t);
    if (g->trie == NULL) {
        moe_gram_free(&g->g);
        free(g);
        snprintf(err, errlen, "out of memory building the vocabulary trie");
        return MOE_ENOMEM;
    }
    g->kind = kind;
    g->n_words = (g->trie->vocab + 31) / 32;
    atomic_init(&g->refs, 1);
    pthread_mutex_init(&g->lock, NULL);
    /* a guide whose start already expands past the matcher's limits
     * could never produce a mask: refused here, by name */
    rc = moe_guided_check_start(g, err, errlen);
    if (rc != MOE_OK) {
        moe_guide_release(g);
        return rc;
    }
    *out = g;
    return MOE_OK;
}
