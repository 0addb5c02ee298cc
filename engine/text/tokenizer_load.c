/*
 * Tokenizer loading: tokenizer.json (BPE model: vocab, merges, options;
 * added tokens; the normalizer, pre-tokenizer, decoder and post-processor
 * pipeline) and tokenizer_config.json beside it; free; lookups.
 *
 * Every Sequence (normalizer, pre-tokenizer, decoder, post-processor) is
 * flattened at load time into one array of steps: applying a Sequence is
 * applying its members in order.  A component type not handled here is
 * refused with an error naming it.
 */

#include <errno.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <yajl/yajl_tree.h>

#include "moe.h"
#include "text/tokenizer.h"
#include "text/tokenizer_int.h"
#include "text/utf8.h"
#include "util/json.h"


/*
 * The largest token id a tokenizer.json may use, and how far its ids may
 * run past the number of tokens it lists.  The per-id tables are sized
 * by the largest id (27 bytes an id), so a file of a few tokens with one
 * id near TOK_MAX_ID would set up 450 MB: the holes are held to
 * TOK_MAX_HOLES ids (27 MB), the tables stay proportional to the file.
 * Real vocabularies are dense (a few reserved holes at most) and below
 * 300k ids.
 */
#define TOK_MAX_ID     (16 * 1024 * 1024)
#define TOK_MAX_HOLES  (1024 * 1024)


/* ---------------------------------------------------------- string arena */

static char *
arena_strdup(arena_blk_t **a, const char *s, size_t n)
{
    arena_blk_t *b = *a;
    size_t       sz;
    char        *p;

    if (b == NULL || b->used + n + 1 > b->size) {
        sz = n + 1 > (1u << 20) ? n + 1 : (1u << 20);
        b = malloc(sizeof(*b) + sz);
        if (b == NULL) {
            return NULL;
        }
        b->next = *a;
        b->used = 0;
        b->size = sz;
        *a = b;
    }
    p = b->data + b->used;
    memcpy(p, s, n);
    p[n] = '\0';
    b->used += n + 1;
    return p;
}

static void
arena_free(arena_blk_t *a)
{
    arena_blk_t *n;

    while (a) {
        n = a->next;
        free(a);
        a = n;
    }
}


/* ---------------------------------------------------------- JSON helpers */

static yajl_val
jget(yajl_val obj, const char *key)
{
    return moe_json_get(obj, key);
}

static const char *
jstr(yajl_val obj, const char *key)
{
    return YAJL_GET_STRING(jget(obj, key));
}

static int
jbool(yajl_val obj, const char *key, int dflt)
{
    yajl_val v = jget(obj, key);

    if (YAJL_IS_TRUE(v)) {
        return 1;
    }
    if (YAJL_IS_FALSE(v)) {
        return 0;
    }
    return dflt;
}

static long long
jint(yajl_val obj, const char *key, long long dflt)
{
    yajl_val v = jget(obj, key);

    return YAJL_IS_INTEGER(v) ? YAJL_GET_INTEGER(v) : dflt;
}


static pcre2_code *
re_compile(const char *pat, char *err, size_t errlen)
{
    pcre2_code  *re;
    int          ec;
    PCRE2_SIZE   eo;
    PCRE2_UCHAR  msg[128];

    re = pcre2_compile((PCRE2_SPTR) pat, PCRE2_ZERO_TERMINATED,
                       PCRE2_UTF | PCRE2_UCP, &ec, &eo, NULL);
    if (re == NULL) {
        pcre2_get_error_message(ec, msg, sizeof(msg));
        moe_errf(err, errlen, "regex /%s/ at %zu: %s", pat, (size_t) eo,
                (char *) msg);
        return NULL;
    }
    (void) pcre2_jit_compile(re, PCRE2_JIT_COMPLETE);   /* optional */
    return re;
}


/* -------------------------------------------------------------- loading */

static const char GPT2_RE[] =
    "'s|'t|'re|'ve|'m|'ll|'d| ?\\p{L}+| ?\\p{N}+| ?[^\\s\\p{L}\\p{N}]+"
    "|\\s+(?!\\S)|\\s+";


static int
load_vocab(moe_tokenizer_t *t, yajl_val model, yajl_val added, char *err,
    size_t errlen)
{
    yajl_val    vocab = jget(model, "vocab");
    size_t      i, nv, n_listed;
    long long   id, max_id = -1;

    if (!YAJL_IS_OBJECT(vocab)) {
        moe_errf(err, errlen, "model.vocab missing or not an object");
        return MOE_EFORMAT;
    }
    nv = vocab->u.object.len;
    for (i = 0; i < nv; i++) {
        yajl_val v = vocab->u.object.values[i];
        if (!YAJL_IS_INTEGER(v) || YAJL_GET_INTEGER(v) < 0
            || YAJL_GET_INTEGER(v) > 0x7fffffff)
        {
            moe_errf(err, errlen, "model.vocab[\"%s\"]: bad id",
                    vocab->u.object.keys[i]);
            return MOE_EFORMAT;
        }
        if (YAJL_GET_INTEGER(v) > max_id) {
            max_id = YAJL_GET_INTEGER(v);
        }
    }
    if (YAJL_IS_ARRAY(added)) {
        for (i = 0; i < added->u.array.len; i++) {
            id = jint(added->u.array.values[i], "id", -1);
            if (id < 0 || id > 0x7fffffff
                || jstr(added->u.array.values[i], "content") == NULL)
            {
                moe_errf(err, errlen, "added_tokens[%zu]: bad id or content",
                        i);
                return MOE_EFORMAT;
            }
            if (id > max_id) {
                max_id = id;
            }
        }
    }
    if (max_id > TOK_MAX_ID) {
        moe_errf(err, errlen, "token id %lld too large (at most %d)", max_id,
                 TOK_MAX_ID);
        return MOE_EFORMAT;
    }
    n_listed = nv + (YAJL_IS_ARRAY(added) ? added->u.array.len : 0);
    if ((size_t) max_id >= n_listed + TOK_MAX_HOLES) {
        moe_errf(err, errlen, "token id %lld leaves too many ids unused: "
                 "%zu tokens listed, at most %d ids may be holes", max_id,
                 n_listed, TOK_MAX_HOLES);
        return MOE_EFORMAT;
    }
    t->n_ids = (int32_t) (max_id + 1);
    t->id_str = calloc((size_t) t->n_ids, sizeof(*t->id_str));
    t->id_len = calloc((size_t) t->n_ids, sizeof(*t->id_len));
    t->id_flags = calloc((size_t) t->n_ids, sizeof(*t->id_flags));
    t->id_byte = malloc((size_t) t->n_ids * sizeof(*t->id_byte));
    t->vocab_str = calloc((size_t) t->n_ids, sizeof(*t->vocab_str));
    t->vocab_len = calloc((size_t) t->n_ids, sizeof(*t->vocab_len));
    if (!t->id_str || !t->id_len || !t->id_flags || !t->id_byte
        || !t->vocab_str || !t->vocab_len
        || moe_tok_strmap_init(&t->vocab, nv) != 0)
    {
        return MOE_ENOMEM;
    }
    for (i = 0; i < nv; i++) {
        const char *k = vocab->u.object.keys[i];
        size_t      kl = strlen(k);
        char       *s = arena_strdup(&t->arena, k, kl);
        int32_t     vid = (int32_t) YAJL_GET_INTEGER(vocab->u.object.values[i]);

        if (s == NULL) {
            return MOE_ENOMEM;
        }
        t->vocab_str[vid] = s;
        t->vocab_len[vid] = (uint32_t) kl;
        t->id_str[vid] = s;
        t->id_len[vid] = (uint32_t) kl;
        moe_tok_vocab_put(t, vid);
    }
    return MOE_OK;
}

static int
load_merges(moe_tokenizer_t *t, yajl_val model, char *err, size_t errlen)
{
    yajl_val     merges = jget(model, "merges");
    size_t       i, n, la, lb;
    const char  *a, *b, *sp;
    int32_t      ia, ib, in;
    tbuf_t       cat = {0};

    if (merges == NULL || YAJL_IS_NULL(merges)) {
        return MOE_OK;
    }
    if (!YAJL_IS_ARRAY(merges)) {
        moe_errf(err, errlen, "model.merges is not an array");
        return MOE_EFORMAT;
    }
    n = merges->u.array.len;
    if (moe_tok_pairmap_init(&t->merges, n) != 0) {
        return MOE_ENOMEM;
    }
    for (i = 0; i < n; i++) {
        yajl_val m = merges->u.array.values[i];

        if (YAJL_IS_STRING(m)) {
            a = m->u.string;
            sp = strchr(a, ' ');
            if (sp == NULL || strchr(sp + 1, ' ') != NULL) {
                moe_errf(err, errlen, "merges[%zu] \"%s\": not \"a b\"", i, a);
                moe_tok_buf_free(&cat);
                return MOE_EFORMAT;
            }
            la = (size_t) (sp - a);
            b = sp + 1;
            lb = strlen(b);
        } else if (YAJL_IS_ARRAY(m) && m->u.array.len == 2
                   && YAJL_IS_STRING(m->u.array.values[0])
                   && YAJL_IS_STRING(m->u.array.values[1]))
        {
            a = m->u.array.values[0]->u.string;
            b = m->u.array.values[1]->u.string;
            la = strlen(a);
            lb = strlen(b);
        } else {
            moe_errf(err, errlen, "merges[%zu]: neither \"a b\" nor [a, b]", i);
            moe_tok_buf_free(&cat);
            return MOE_EFORMAT;
        }
        ia = moe_tok_vocab_get(t, a, la);
        ib = moe_tok_vocab_get(t, b, lb);
        cat.len = 0;
        if (moe_tok_buf_put(&cat, a, la) != 0) {
            moe_tok_buf_free(&cat);
            return MOE_ENOMEM;
        }
        /* the merged token drops b's continuing_subword_prefix */
        if (t->cont_prefix && lb >= t->cont_prefix_len
            && memcmp(b, t->cont_prefix, t->cont_prefix_len) == 0)
        {
            if (moe_tok_buf_put(&cat, b + t->cont_prefix_len,
                                lb - t->cont_prefix_len) != 0)
            {
                moe_tok_buf_free(&cat);
                return MOE_ENOMEM;
            }
        } else if (moe_tok_buf_put(&cat, b, lb) != 0) {
            moe_tok_buf_free(&cat);
            return MOE_ENOMEM;
        }
        in = moe_tok_vocab_get(t, cat.p, cat.len);
        if (ia < 0 || ib < 0 || in < 0) {
            moe_errf(err, errlen, "merges[%zu]: token not in vocab", i);
            moe_tok_buf_free(&cat);
            return MOE_EFORMAT;
        }
        moe_tok_pairmap_put(&t->merges, ia, ib, (uint32_t) i, in);
    }
    moe_tok_buf_free(&cat);
    return MOE_OK;
}

static int
parse_pattern(yajl_val pat, const char **lit, const char **regex)
{
    *lit = jstr(pat, "String");
    *regex = jstr(pat, "Regex");
    return (*lit || *regex) ? 0 : -1;
}

/*
 * A kind of pipeline component: normalizer, pre_tokenizer, decoder or
 * post_processor.  All four share the JSON shape {"type": T, ...} where a
 * T of "Sequence" lists its members under the kind's own key; add_steps()
 * does that part once, so a kind's fill() handles only its leaf types.
 */
typedef struct {
    const char  *name;        /* in error messages: "normalizer" */
    const char  *list_key;    /* a Sequence's members: "normalizers" */
    size_t       size;        /* one step; 0: the kind keeps no step array */

    /* fill the zeroed step (NULL when size is 0) from leaf node n */
    int        (*fill)(moe_tokenizer_t *t, yajl_val n, const char *type,
                       void *step, char *err, size_t errlen);
} step_kind_t;

/*
 * Flatten node n (absent or null: nothing) of kind k into the array *steps
 * of *n_steps steps.  A step is counted only when its fill() succeeds, so on
 * failure *steps still holds *n_steps complete steps for the caller to free.
 */
static int
add_steps(moe_tokenizer_t *t, yajl_val n, const step_kind_t *k, void **steps,
    int *n_steps, char *err, size_t errlen)
{
    const char  *type = jstr(n, "type");
    yajl_val     list;
    size_t       i;
    char        *s;
    int          rc;

    if (n == NULL || YAJL_IS_NULL(n)) {
        return MOE_OK;
    }
    if (type == NULL) {
        moe_errf(err, errlen, "%s without type", k->name);
        return MOE_EFORMAT;
    }
    if (strcmp(type, "Sequence") == 0) {
        list = jget(n, k->list_key);
        if (!YAJL_IS_ARRAY(list)) {
            moe_errf(err, errlen, "%s Sequence without %s", k->name,
                    k->list_key);
            return MOE_EFORMAT;
        }
        for (i = 0; i < list->u.array.len; i++) {
            rc = add_steps(t, list->u.array.values[i], k, steps, n_steps,
                           err, errlen);
            if (rc != MOE_OK) {
                return rc;
            }
        }
        return MOE_OK;
    }
    if (k->size == 0) {
        return k->fill(t, n, type, NULL, err, errlen);
    }
    s = realloc(*steps, (size_t) (*n_steps + 1) * k->size);
    if (s == NULL) {
        return MOE_ENOMEM;
    }
    *steps = s;
    s += (size_t) *n_steps * k->size;
    memset(s, 0, k->size);
    rc = k->fill(t, n, type, s, err, errlen);
    if (rc == MOE_OK) {
        (*n_steps)++;
    }
    return rc;
}

static int
fill_norm(moe_tokenizer_t *t, yajl_val n, const char *type, void *step,
    char *err, size_t errlen)
{
    norm_step_t  *s = step;

    if (strcmp(type, "Prepend") == 0) {
        const char *p = jstr(n, "prepend");
        if (p == NULL) {
            moe_errf(err, errlen, "normalizer Prepend without prepend");
            return MOE_EFORMAT;
        }
        s->type = NORM_PREPEND;
        s->alen = strlen(p);
        s->a = arena_strdup(&t->arena, p, s->alen);
    } else if (strcmp(type, "Replace") == 0) {
        const char *lit, *rx, *c = jstr(n, "content");
        if (parse_pattern(jget(n, "pattern"), &lit, &rx) != 0 || c == NULL) {
            moe_errf(err, errlen, "normalizer Replace: bad pattern/content");
            return MOE_EFORMAT;
        }
        s->type = NORM_REPLACE;
        if (lit) {
            s->alen = strlen(lit);
            s->a = arena_strdup(&t->arena, lit, s->alen);
        } else {
            s->re = re_compile(rx, err, errlen);
            if (s->re == NULL) {
                return MOE_EFORMAT;
            }
        }
        s->blen = strlen(c);
        s->b = arena_strdup(&t->arena, c, s->blen);
    } else if (strcmp(type, "NFC") == 0) {
        s->type = NORM_UNICODE;
        s->uform = NORM_FORM_NFC;
    } else if (strcmp(type, "NFD") == 0) {
        s->type = NORM_UNICODE;
        s->uform = NORM_FORM_NFD;
    } else if (strcmp(type, "NFKC") == 0) {
        s->type = NORM_UNICODE;
        s->uform = NORM_FORM_NFKC;
    } else if (strcmp(type, "NFKD") == 0) {
        s->type = NORM_UNICODE;
        s->uform = NORM_FORM_NFKD;
    } else {
        moe_errf(err, errlen, "normalizer %s not supported", type);
        return MOE_EUNSUPPORTED;
    }
    return MOE_OK;
}

static int
scheme_of(yajl_val n)
{
    const char *sc = jstr(n, "prepend_scheme");

    if (sc == NULL) {   /* older files: add_prefix_space */
        return jbool(n, "add_prefix_space", 1) ? SCHEME_ALWAYS : SCHEME_NEVER;
    }
    if (strcmp(sc, "first") == 0) {
        return SCHEME_FIRST;
    }
    if (strcmp(sc, "never") == 0) {
        return SCHEME_NEVER;
    }
    return SCHEME_ALWAYS;
}

static int
fill_pre(moe_tokenizer_t *t, yajl_val n, const char *type, void *step,
    char *err, size_t errlen)
{
    pre_step_t  *s = step;

    if (strcmp(type, "Split") == 0) {
        const char *lit, *rx, *beh = jstr(n, "behavior");
        if (parse_pattern(jget(n, "pattern"), &lit, &rx) != 0 || beh == NULL) {
            moe_errf(err, errlen, "pre_tokenizer Split: bad pattern/behavior");
            return MOE_EFORMAT;
        }
        s->type = PRE_SPLIT;
        if (lit) {
            s->litlen = strlen(lit);
            s->lit = arena_strdup(&t->arena, lit, s->litlen);
            if (s->litlen == 0) {
                moe_errf(err, errlen, "pre_tokenizer Split: empty pattern");
                return MOE_EFORMAT;
            }
        } else {
            s->re = re_compile(rx, err, errlen);
            if (s->re == NULL) {
                return MOE_EFORMAT;
            }
        }
        if (strcmp(beh, "Removed") == 0) {
            s->behavior = BEH_REMOVED;
        } else if (strcmp(beh, "Isolated") == 0) {
            s->behavior = BEH_ISOLATED;
        } else if (strcmp(beh, "MergedWithPrevious") == 0) {
            s->behavior = BEH_PREV;
        } else if (strcmp(beh, "MergedWithNext") == 0) {
            s->behavior = BEH_NEXT;
        } else if (strcmp(beh, "Contiguous") == 0) {
            s->behavior = BEH_CONTIGUOUS;
        } else {
            moe_errf(err, errlen, "pre_tokenizer Split: behavior %s", beh);
            pcre2_code_free(s->re);     /* the step is not counted */
            return MOE_EFORMAT;
        }
        s->invert = jbool(n, "invert", 0);
    } else if (strcmp(type, "ByteLevel") == 0) {
        s->type = PRE_BYTELEVEL;
        s->add_prefix_space = jbool(n, "add_prefix_space", 1);
        s->use_regex = jbool(n, "use_regex", 1);
        if (s->use_regex) {
            s->re = re_compile(GPT2_RE, err, errlen);
            if (s->re == NULL) {
                return MOE_EFORMAT;
            }
        }
    } else if (strcmp(type, "Metaspace") == 0) {
        const char *r = jstr(n, "replacement");
        s->type = PRE_METASPACE;
        if (r == NULL || strlen(r) == 0 || strlen(r) > 4) {
            moe_errf(err, errlen, "pre_tokenizer Metaspace: bad replacement");
            return MOE_EFORMAT;
        }
        s->replen = strlen(r);
        memcpy(s->rep, r, s->replen);
        s->scheme = scheme_of(n);
        s->split = jbool(n, "split", 1);
    } else if (strcmp(type, "Digits") == 0) {
        s->type = PRE_DIGITS;
        s->individual_digits = jbool(n, "individual_digits", 0);
        s->re = re_compile(s->individual_digits ? "\\p{N}" : "\\p{N}+",
                           err, errlen);
        if (s->re == NULL) {
            return MOE_EFORMAT;
        }
        s->behavior = BEH_ISOLATED;
    } else {
        moe_errf(err, errlen, "pre_tokenizer %s not supported", type);
        return MOE_EUNSUPPORTED;
    }
    return MOE_OK;
}

static int
fill_dec(moe_tokenizer_t *t, yajl_val n, const char *type, void *step,
    char *err, size_t errlen)
{
    dec_step_t  *s = step;
    size_t       cl;

    if (strcmp(type, "ByteLevel") == 0) {
        s->type = DEC_BYTELEVEL;
    } else if (strcmp(type, "Replace") == 0) {
        const char *lit, *rx, *c = jstr(n, "content");
        if (parse_pattern(jget(n, "pattern"), &lit, &rx) != 0 || c == NULL
            || lit == NULL || lit[0] == '\0')
        {
            moe_errf(err, errlen, "decoder Replace: only non-empty String "
                    "patterns are supported");
            return MOE_EUNSUPPORTED;
        }
        s->type = DEC_REPLACE;
        s->patlen = strlen(lit);
        s->pat = arena_strdup(&t->arena, lit, s->patlen);
        s->contentlen = strlen(c);
        s->content = arena_strdup(&t->arena, c, s->contentlen);
    } else if (strcmp(type, "ByteFallback") == 0) {
        s->type = DEC_BYTEFALLBACK;
        t->dec_byte_fallback = 1;
    } else if (strcmp(type, "Fuse") == 0) {
        s->type = DEC_FUSE;
    } else if (strcmp(type, "Strip") == 0) {
        const char *c = jstr(n, "content");
        s->type = DEC_STRIP;
        if (c == NULL || c[0] == '\0') {
            moe_errf(err, errlen, "decoder Strip without content");
            return MOE_EFORMAT;
        }
        s->strip_char = moe_utf8_decode(c, strlen(c), &cl);
        s->start = (int) jint(n, "start", 0);
        s->stop = (int) jint(n, "stop", 0);
    } else if (strcmp(type, "Metaspace") == 0) {
        const char *r = jstr(n, "replacement");
        s->type = DEC_METASPACE;
        if (r == NULL || r[0] == '\0') {
            moe_errf(err, errlen, "decoder Metaspace: bad replacement");
            return MOE_EFORMAT;
        }
        s->replacement = moe_utf8_decode(r, strlen(r), &cl);
        s->scheme = scheme_of(n);
    } else {
        moe_errf(err, errlen, "decoder %s not supported", type);
        return MOE_EUNSUPPORTED;
    }
    return MOE_OK;
}

/* Post-processors keep no steps: only a TemplateProcessing changes ids. */
static int
fill_post(moe_tokenizer_t *t, yajl_val n, const char *type, void *step,
    char *err, size_t errlen)
{
    yajl_val     list, specials, item, sp, ids;
    size_t       i, j;
    tpl_item_t  *tp;
    const char  *nm;

    (void) step;
    if (strcmp(type, "ByteLevel") == 0) {
        return MOE_OK;                  /* offsets only; ids unchanged */
    }
    if (strcmp(type, "TemplateProcessing") != 0) {
        moe_errf(err, errlen, "post_processor %s not supported", type);
        return MOE_EUNSUPPORTED;
    }
    if (t->tpl != NULL) {
        moe_errf(err, errlen, "two TemplateProcessing post_processors");
        return MOE_EUNSUPPORTED;
    }
    list = jget(n, "single");
    specials = jget(n, "special_tokens");
    if (!YAJL_IS_ARRAY(list)) {
        moe_errf(err, errlen, "TemplateProcessing without single");
        return MOE_EFORMAT;
    }
    t->tpl = calloc(list->u.array.len + 1, sizeof(*t->tpl));
    if (t->tpl == NULL) {
        return MOE_ENOMEM;
    }
    for (i = 0; i < list->u.array.len; i++) {
        item = list->u.array.values[i];
        if (jget(item, "Sequence") != NULL) {
            t->tpl[t->n_tpl++].is_seq = 1;
            continue;
        }
        sp = jget(item, "SpecialToken");
        nm = jstr(sp, "id");
        ids = jget(jget(specials, nm ? nm : ""), "ids");
        if (!YAJL_IS_ARRAY(ids)) {
            moe_errf(err, errlen, "TemplateProcessing: special token %.64s "
                    "not in special_tokens", nm ? nm : "?");
            return MOE_EFORMAT;
        }
        t->tpl[t->n_tpl].ids = malloc((ids->u.array.len + 1)
                                      * sizeof(int32_t));
        if (t->tpl[t->n_tpl].ids == NULL) {
            return MOE_ENOMEM;
        }
        /* counted before it is filled: moe_tokenizer_free() frees it */
        tp = &t->tpl[t->n_tpl++];
        for (j = 0; j < ids->u.array.len; j++) {
            yajl_val v = ids->u.array.values[j];
            if (!YAJL_IS_INTEGER(v) || YAJL_GET_INTEGER(v) < 0
                || YAJL_GET_INTEGER(v) > INT32_MAX)
            {
                moe_errf(err, errlen, "TemplateProcessing: special token "
                         "%.64s: ids must be token ids", nm ? nm : "?");
                return MOE_EFORMAT;
            }
            tp->ids[j] = (int32_t) YAJL_GET_INTEGER(v);
            tp->n = (int) j + 1;
        }
    }
    return MOE_OK;
}

static const step_kind_t  norm_kind = {
    "normalizer", "normalizers", sizeof(norm_step_t), fill_norm
};
static const step_kind_t  pre_kind = {
    "pre_tokenizer", "pretokenizers", sizeof(pre_step_t), fill_pre
};
static const step_kind_t  dec_kind = {
    "decoder", "decoders", sizeof(dec_step_t), fill_dec
};
static const step_kind_t  post_kind = {
    "post_processor", "processors", 0, fill_post
};

/*
 * Load the normalizer, pre-tokenizer, decoder and post-processor chains.
 * The step arrays pass through a void * so that add_steps() can grow any of
 * them; t takes each array back even on failure, for moe_tokenizer_free().
 */
static int
load_pipeline(moe_tokenizer_t *t, yajl_val root, char *err, size_t errlen)
{
    void      *norm = NULL, *pre = NULL, *dec = NULL;
    yajl_val   d = jget(root, "decoder");
    int        rc;

    rc = add_steps(t, jget(root, "normalizer"), &norm_kind, &norm, &t->n_norm,
                   err, errlen);
    t->norm = norm;
    if (rc != MOE_OK) {
        return rc;
    }
    rc = add_steps(t, jget(root, "pre_tokenizer"), &pre_kind, &pre,
                   &t->n_pre, err, errlen);
    t->pre = pre;
    if (rc != MOE_OK) {
        return rc;
    }
    t->has_decoder = d != NULL && !YAJL_IS_NULL(d);
    rc = add_steps(t, d, &dec_kind, &dec, &t->n_dec, err, errlen);
    t->dec = dec;
    if (rc != MOE_OK) {
        return rc;
    }
    return add_steps(t, jget(root, "post_processor"), &post_kind, NULL, NULL,
                     err, errlen);
}


static int
cmp_added_len(const void *a, const void *b, void *arg)
{
    const moe_tokenizer_t *t = arg;
    const added_t         *x = &t->added[*(const int32_t *) a];
    const added_t         *y = &t->added[*(const int32_t *) b];
    size_t                 lx = x->normalized ? x->nlen : x->len;
    size_t                 ly = y->normalized ? y->nlen : y->len;

    if (lx != ly) {
        return lx > ly ? -1 : 1;
    }
    return *(const int32_t *) a - *(const int32_t *) b;
}

static int
build_added_index(moe_tokenizer_t *t, added_index_t *ix, int normalized)
{
    int       i, n = 0;
    uint32_t  count[257] = {0};
    uint32_t  pos[256];
    unsigned  c;

    for (i = 0; i < t->n_added; i++) {
        const added_t *a = &t->added[i];
        if ((int) a->normalized != normalized) {
            continue;
        }
        if ((normalized ? a->nlen : a->len) == 0) {
            continue;
        }
        n++;
    }
    ix->idx = malloc(((size_t) n + 1) * sizeof(*ix->idx));
    if (ix->idx == NULL) {
        return -1;
    }
    ix->n = n;
    n = 0;
    for (i = 0; i < t->n_added; i++) {
        const added_t *a = &t->added[i];
        if ((int) a->normalized != normalized
            || (normalized ? a->nlen : a->len) == 0)
        {
            continue;
        }
        ix->idx[n++] = i;
    }
    qsort_r(ix->idx, (size_t) n, sizeof(*ix->idx), cmp_added_len, t);
    /* stable bucket by first byte, keeping longest-first order */
    for (i = 0; i < n; i++) {
        const added_t *a = &t->added[ix->idx[i]];
        c = (unsigned char) (normalized ? a->ns[0] : a->s[0]);
        count[c + 1]++;
    }
    for (c = 0; c < 256; c++) {
        count[c + 1] += count[c];
    }
    memcpy(ix->start, count, sizeof(count));
    {
        int32_t *tmp = malloc(((size_t) n + 1) * sizeof(*tmp));
        if (tmp == NULL) {
            return -1;
        }
        memcpy(pos, count, sizeof(pos));
        for (i = 0; i < n; i++) {
            const added_t *a = &t->added[ix->idx[i]];
            c = (unsigned char) (normalized ? a->ns[0] : a->s[0]);
            tmp[pos[c]++] = ix->idx[i];
        }
        memcpy(ix->idx, tmp, (size_t) n * sizeof(*tmp));
        free(tmp);
    }
    return 0;
}

static int
load_added(moe_tokenizer_t *t, yajl_val added, char *err, size_t errlen)
{
    size_t   i;
    tbuf_t   nb = {0}, tmp = {0};
    int      any_norm = 0;

    if (!YAJL_IS_ARRAY(added) || added->u.array.len == 0) {
        return MOE_OK;
    }
    t->added = calloc(added->u.array.len, sizeof(*t->added));
    if (t->added == NULL) {
        return MOE_ENOMEM;
    }
    for (i = 0; i < added->u.array.len; i++) {
        yajl_val    a = added->u.array.values[i];
        const char *c = jstr(a, "content");
        added_t    *d = &t->added[t->n_added++];
        int32_t     id = (int32_t) jint(a, "id", -1);

        d->len = strlen(c);
        d->s = arena_strdup(&t->arena, c, d->len);
        if (d->s == NULL) {
            return MOE_ENOMEM;
        }
        d->id = id;
        d->single_word = jbool(a, "single_word", 0);
        d->lstrip = jbool(a, "lstrip", 0);
        d->rstrip = jbool(a, "rstrip", 0);
        d->special = jbool(a, "special", 0);
        d->normalized = jbool(a, "normalized", !d->special);
        t->id_str[id] = d->s;
        t->id_len[id] = (uint32_t) d->len;
        t->id_flags[id] |= ID_ADDED | (d->special ? ID_SPECIAL : 0);
        if (d->single_word) {
            any_norm |= 2;
        }
    }
    /* normalized tokens are matched by their normalized form */
    for (i = 0; i < (size_t) t->n_added; i++) {
        added_t *d = &t->added[i];
        if (!d->normalized) {
            continue;
        }
        any_norm |= 1;
        nb.len = 0;
        if (moe_tok_normalize(t, d->s, d->len, &nb, &tmp) != 0) {
            moe_tok_buf_free(&nb);
            moe_tok_buf_free(&tmp);
            return MOE_ENOMEM;
        }
        d->nlen = nb.len;
        d->ns = arena_strdup(&t->arena, nb.p ? nb.p : "", nb.len);
        if (d->ns == NULL) {
            moe_tok_buf_free(&nb);
            moe_tok_buf_free(&tmp);
            return MOE_ENOMEM;
        }
    }
    moe_tok_buf_free(&nb);
    moe_tok_buf_free(&tmp);
    if (build_added_index(t, &t->raw_idx, 0) != 0
        || build_added_index(t, &t->norm_idx, 1) != 0)
    {
        return MOE_ENOMEM;
    }
    if (any_norm & 2) {
        t->re_word_end = re_compile("\\w$", err, errlen);
        t->re_word_start = re_compile("^\\w", err, errlen);
        if (t->re_word_end == NULL || t->re_word_start == NULL) {
            return MOE_EFORMAT;
        }
    }
    return MOE_OK;
}

/*
 * The ids a TemplateProcessing adds must be tokens (in the vocabulary or
 * added): encode would otherwise return ids that decode refuses and the
 * model has no embedding for.  Run once the added tokens are in.
 */
static int
check_template(const moe_tokenizer_t *t, char *err, size_t errlen)
{
    int32_t  id;
    int      i, j;

    for (i = 0; i < t->n_tpl; i++) {
        for (j = 0; j < t->tpl[i].n; j++) {
            id = t->tpl[i].ids[j];
            if (id < 0 || id >= t->n_ids || t->id_str[id] == NULL) {
                moe_errf(err, errlen, "post_processor TemplateProcessing: "
                         "special token id %d is not a token (%d ids)",
                         (int) id, (int) t->n_ids);
                return MOE_EFORMAT;
            }
        }
    }
    return MOE_OK;
}


static char *
config_token(moe_tokenizer_t *t, yajl_val cfg, const char *key)
{
    yajl_val    v = jget(cfg, key);
    const char *s = YAJL_GET_STRING(v);

    if (s == NULL && YAJL_IS_OBJECT(v)) {
        s = jstr(v, "content");
    }
    return s ? arena_strdup(&t->arena, s, strlen(s)) : NULL;
}

static void
load_config(moe_tokenizer_t *t, const char *json_path)
{
    char        path[MOE_PATH_MAX + 32];
    const char *slash = strrchr(json_path, '/');
    size_t      dl = slash ? (size_t) (slash - json_path + 1) : 0, len, i;
    char       *buf;
    yajl_val    cfg, ct;

    if (dl + sizeof("tokenizer_config.json") > sizeof(path)) {
        return;
    }
    memcpy(path, json_path, dl);
    memcpy(path + dl, "tokenizer_config.json", sizeof("tokenizer_config.json"));
    buf = moe_read_file(path, &len);
    if (buf == NULL) {
        return;
    }
    cfg = moe_json_parse(buf, NULL, 0);
    free(buf);
    if (cfg == NULL) {
        return;       /* optional file: a broken one is ignored */
    }
    t->bos_token = config_token(t, cfg, "bos_token");
    t->eos_token = config_token(t, cfg, "eos_token");
    t->add_bos = jbool(cfg, "add_bos_token", -1);
    t->add_eos = jbool(cfg, "add_eos_token", -1);
    ct = jget(cfg, "chat_template");
    if (YAJL_IS_STRING(ct)) {
        t->chat_template = arena_strdup(&t->arena, ct->u.string,
                                        strlen(ct->u.string));
    } else if (YAJL_IS_ARRAY(ct)) {
        for (i = 0; i < ct->u.array.len; i++) {
            yajl_val e = ct->u.array.values[i];
            const char *nm = jstr(e, "name"), *tp = jstr(e, "template");
            if (nm && tp && strcmp(nm, "default") == 0) {
                t->chat_template = arena_strdup(&t->arena, tp, strlen(tp));
            }
        }
    }
    yajl_tree_free(cfg);
}

int
moe_tokenizer_load(const char *tokenizer_json_path, moe_tokenizer_t **out,
    char *err, size_t errlen)
{
    moe_tokenizer_t *t;
    char            *buf;
    size_t           len;
    yajl_val         root, model, added;
    const char      *type, *s;
    char             ebuf[256], msg[384];
    int              rc, b;

    *out = NULL;
    if (tokenizer_json_path == NULL) {
        moe_errf(err, errlen, "no tokenizer path");
        return MOE_EINVAL;
    }
    moe_tok_bytelevel_init();
    buf = moe_read_file(tokenizer_json_path, &len);
    if (buf == NULL) {
        moe_errf(err, errlen, "%s: %s", tokenizer_json_path, strerror(errno));
        return MOE_EIO;
    }
    root = moe_json_parse(buf, ebuf, sizeof(ebuf));
    free(buf);
    if (root == NULL) {
        moe_errf(err, errlen, "%s: bad JSON: %.200s", tokenizer_json_path,
                ebuf);
        return MOE_EFORMAT;
    }
    t = calloc(1, sizeof(*t));
    if (t == NULL) {
        yajl_tree_free(root);
        return MOE_ENOMEM;
    }
    t->unk_id = -1;
    t->add_bos = t->add_eos = -1;
    msg[0] = '\0';
    model = jget(root, "model");
    added = jget(root, "added_tokens");
    type = jstr(model, "type");
    if (type == NULL && YAJL_IS_OBJECT(jget(model, "merges"))) {
        type = "BPE";
    }
    if (type == NULL || strcmp(type, "BPE") != 0) {
        moe_errf(msg, sizeof(msg), "model type %.64s not supported (BPE "
                 "only)", type ? type : "(none)");
        rc = type ? MOE_EUNSUPPORTED : MOE_EFORMAT;
        goto fail;
    }
    if ((s = jstr(model, "continuing_subword_prefix")) != NULL && s[0]) {
        t->cont_prefix_len = strlen(s);
        t->cont_prefix = arena_strdup(&t->arena, s, t->cont_prefix_len);
    }
    if ((s = jstr(model, "end_of_word_suffix")) != NULL && s[0]) {
        t->eow_suffix_len = strlen(s);
        t->eow_suffix = arena_strdup(&t->arena, s, t->eow_suffix_len);
    }
    t->ignore_merges = jbool(model, "ignore_merges", 0);
    t->byte_fallback = jbool(model, "byte_fallback", 0);
    t->fuse_unk = jbool(model, "fuse_unk", 0);
    rc = load_vocab(t, model, added, msg, sizeof(msg));
    if (rc != MOE_OK) {
        goto fail;
    }
    if ((s = jstr(model, "unk_token")) != NULL) {
        t->unk_id = moe_tok_vocab_get(t, s, strlen(s));
    }
    for (b = 0; b < 256; b++) {
        char nm[8];
        snprintf(nm, sizeof(nm), "<0x%02X>", b);
        t->byte_id[b] = moe_tok_vocab_get(t, nm, 6);
    }
    rc = load_merges(t, model, msg, sizeof(msg));
    if (rc == MOE_OK) {
        rc = load_pipeline(t, root, msg, sizeof(msg));
    }
    if (rc == MOE_OK) {
        rc = load_added(t, added, msg, sizeof(msg));
    }
    if (rc == MOE_OK) {
        rc = check_template(t, msg, sizeof(msg));
    }
    if (rc != MOE_OK) {
        goto fail;
    }
    for (b = 0; b < t->n_ids; b++) {
        t->id_byte[b] = (int16_t) (t->id_str[b]
                                   ? moe_tok_byte_value(t->id_str[b],
                                                        t->id_len[b])
                                   : -1);
    }
    yajl_tree_free(root);
    load_config(t, tokenizer_json_path);
    *out = t;
    return MOE_OK;

fail:
    /* the parts' messages say what is wrong; this names the file */
    moe_errf(err, errlen, "%s: %s", tokenizer_json_path,
             rc == MOE_ENOMEM ? "out of memory"
             : msg[0] != '\0' ? msg : moe_strerror(rc));
    yajl_tree_free(root);
    moe_tokenizer_free(t);
    return rc;
}

void
moe_tokenizer_free(moe_tokenizer_t *t)
{
    int i;

    if (t == NULL) {
        return;
    }
    if (t->ext != NULL && t->ext_free != NULL) {
        t->ext_free(t->ext);
    }
    for (i = 0; i < t->n_norm; i++) {
        pcre2_code_free(t->norm[i].re);
    }
    for (i = 0; i < t->n_pre; i++) {
        pcre2_code_free(t->pre[i].re);
    }
    for (i = 0; i < t->n_tpl; i++) {
        free(t->tpl[i].ids);
    }
    pcre2_code_free(t->re_word_end);
    pcre2_code_free(t->re_word_start);
    free(t->norm);
    free(t->pre);
    free(t->dec);
    free(t->tpl);
    free(t->added);
    free(t->raw_idx.idx);
    free(t->norm_idx.idx);
    free(t->id_str);
    free(t->id_len);
    free(t->id_flags);
    free(t->id_byte);
    free(t->vocab_str);
    free(t->vocab_len);
    free(t->vocab.slot);
    free(t->merges.key);
    free(t->merges.rank);
    free(t->merges.new_id);
    arena_free(t->arena);
    free(t);
}


/* ------------------------------------------------------------ lookups */

int
moe_tokenizer_vocab_size(const moe_tokenizer_t *t)
{
    return t ? t->n_ids : 0;
}

int32_t
moe_tokenizer_token_to_id(const moe_tokenizer_t *t, const char *token)
{
    size_t n;
    int    i;

    if (t == NULL || token == NULL) {
        return -1;
    }
    n = strlen(token);
    for (i = 0; i < t->n_added; i++) {      /* added vocabulary first */
        if (t->added[i].len == n && memcmp(t->added[i].s, token, n) == 0) {
            return t->added[i].id;
        }
    }
    return moe_tok_vocab_get(t, token, n);
}

const char *
moe_tokenizer_id_to_token(const moe_tokenizer_t *t, int32_t id)
{
    if (t == NULL || id < 0 || id >= t->n_ids) {
        return NULL;
    }
    return t->id_str[id];
}

int
moe_tokenizer_is_special(const moe_tokenizer_t *t, int32_t id)
{
    if (t == NULL || id < 0 || id >= t->n_ids) {
        return 0;
    }
    return (t->id_flags[id] & ID_SPECIAL) != 0;
}

int
moe_tokenizer_is_byte_token(const moe_tokenizer_t *t, int32_t id)
{
    if (t == NULL || id < 0 || id >= t->n_ids || !t->dec_byte_fallback) {
        return 0;
    }
    return t->id_byte[id] >= 0;
}

const char *
moe_tokenizer_bos_token(const moe_tokenizer_t *t)
{
    return t ? t->bos_token : NULL;
}

const char *
moe_tokenizer_eos_token(const moe_tokenizer_t *t)
{
    return t ? t->eos_token : NULL;
}

const char *
moe_tokenizer_chat_template(const moe_tokenizer_t *t)
{
    return t ? t->chat_template : NULL;
}

int
moe_tokenizer_add_bos_token(const moe_tokenizer_t *t)
{
    return t ? t->add_bos : -1;
}

int
moe_tokenizer_add_eos_token(const moe_tokenizer_t *t)
{
    return t ? t->add_eos : -1;
}
