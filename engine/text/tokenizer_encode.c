/*
 * Tokenizer encode, as TokenizerImpl::encode in Hugging Face `tokenizers`:
 *   invalid UTF-8 -> U+FFFD
 *   split out added tokens that are matched on the raw text (normalized=false)
 *   normalize each remaining piece; split out normalized added tokens
 *   pre-tokenize each remaining piece into words
 *   BPE each word (tokenizer_bpe.c)
 *   post-process (TemplateProcessing) when add_special_tokens
 */

#include <stdlib.h>
#include <string.h>

#include "moe.h"
#include "text/tokenizer.h"
#include "text/tokenizer_int.h"
#include "text/utf8.h"


/* ------------------------------------------------------- piece lists */

typedef struct {
    size_t   off;       /* into text */
    size_t   len;
    int32_t  id;        /* added token id, or -1 for text still to split */
    int      at_start;  /* begins at offset 0 of the original input */
} piece_t;

typedef struct {
    tbuf_t   text;
    piece_t *v;
    size_t   n;
    size_t   cap;
} plist_t;

static int
pl_add(plist_t *l, const char *s, size_t n, int32_t id, int at_start)
{
    piece_t *v;

    v = moe_tok_grow(l->v, &l->cap, l->n + 1, sizeof(*v), 16);
    if (v == NULL) {
        return -1;
    }
    l->v = v;
    l->v[l->n].off = l->text.len;
    l->v[l->n].len = n;
    l->v[l->n].id = id;
    l->v[l->n].at_start = at_start;
    l->n++;
    return moe_tok_buf_put(&l->text, s, n);
}

static void
pl_reset(plist_t *l)
{
    l->n = 0;
    l->text.len = 0;
}

static void
pl_free(plist_t *l)
{
    moe_tok_buf_free(&l->text);
    free(l->v);
    memset(l, 0, sizeof(*l));
}

static void
pl_swap(plist_t *a, plist_t *b)
{
    plist_t x = *a;

    *a = *b;
    *b = x;
}


/* ------------------------------------------------------- added tokens */

static int
re_hit(const pcre2_code *re, const char *s, size_t n, pcre2_match_data *md)
{
    return pcre2_match(re, (PCRE2_SPTR) s, n, 0, PCRE2_NO_UTF_CHECK, md, NULL)
           >= 0;
}

/*
 * Split s[0..n) into added-token pieces and text pieces, like
 * AddedVocabulary::find_matches: leftmost-longest non-overlapping matches;
 * single_word, lstrip and rstrip adjust or reject a match.
 */
static int
split_added(const moe_tokenizer_t *t, const added_index_t *ix, int use_norm,
    const char *s, size_t n, int at_start, plist_t *out, pcre2_match_data *md)
{
    size_t          i = 0, start_off = 0, start, stop, cl, k;
    uint32_t        b, e;
    const added_t  *a, *hit;
    unsigned char   c;

    if (ix->n == 0) {
        return n ? pl_add(out, s, n, -1, at_start) : 0;
    }
    while (i < n) {
        c = (unsigned char) s[i];
        hit = NULL;
        for (b = ix->start[c], e = ix->start[c + 1]; b < e; b++) {
            const char *as;
            size_t      al;
            a = &t->added[ix->idx[b]];
            as = use_norm ? a->ns : a->s;
            al = use_norm ? a->nlen : a->len;
            if (al <= n - i && memcmp(s + i, as, al) == 0) {
                hit = a;
                break;
            }
        }
        if (hit == NULL) {
            i++;
            continue;
        }
        start = i;
        stop = i + (use_norm ? hit->nlen : hit->len);
        i = stop;
        if (hit->single_word) {
            int sp_before = start == 0
                            || !re_hit(t->re_word_end, s, start, md);
            int sp_after = stop == n
                           || !re_hit(t->re_word_start, s + stop, n - stop,
                                      md);
            if (!sp_before || !sp_after) {
                continue;
            }
        }
        if (hit->lstrip) {
            /* back over the whitespace that ends s[0..start) */
            k = start;
            while (k > start_off) {
                size_t j = k - 1;
                while (j > 0 && ((unsigned char) s[j] & 0xc0) == 0x80) {
                    j--;
                }
                if (!moe_utf8_is_space(moe_utf8_decode(s + j, n - j, &cl))) {
                    break;
                }
                k = j;
            }
            start = k;
        }
        if (hit->rstrip) {
            while (stop < n
                   && moe_utf8_is_space(moe_utf8_decode(s + stop, n - stop,
                                                        &cl)))
            {
                stop += cl;
            }
            i = stop;
        }
        if (start_off < start
            && pl_add(out, s + start_off, start - start_off, -1,
                      at_start && start_off == 0) != 0)
        {
            return -1;
        }
        if (pl_add(out, s + start, stop - start, hit->id, 0) != 0) {
            return -1;
        }
        start_off = stop;
    }
    if (start_off < n) {
        return pl_add(out, s + start_off, n - start_off, -1,
                      at_start && start_off == 0);
    }
    return 0;
}


/* ------------------------------------------------------- pre-tokenizer */

typedef struct {
    size_t s, e;
    int    m;
} span_t;

typedef struct {
    span_t *v;
    size_t  n, cap;
} spans_t;

static int
sp_add(spans_t *sp, size_t s, size_t e, int m)
{
    span_t *v;

    v = moe_tok_grow(sp->v, &sp->cap, sp->n + 1, sizeof(*v), 64);
    if (v == NULL) {
        return -1;
    }
    sp->v = v;
    sp->v[sp->n].s = s;
    sp->v[sp->n].e = e;
    sp->v[sp->n].m = m;
    sp->n++;
    return 0;
}

/* Pattern::find_matches: matches and the gaps between them, in order. */
static int
find_spans(const pre_step_t *st, const char *s, size_t n, spans_t *sp,
    pcre2_match_data *md)
{
    size_t      prev = 0, pos = 0, ms, me, cl, litlen = st->litlen;
    const char *lit = st->lit;
    PCRE2_SIZE *ov;
    int         rc;

    /* Metaspace splits on its replacement: a literal pattern too */
    if (lit == NULL && st->type == PRE_METASPACE) {
        lit = st->rep;
        litlen = st->replen;
    }
    sp->n = 0;
    if (n == 0) {
        return sp_add(sp, 0, 0, 0);
    }
    for (;;) {
        if (lit) {
            const char *f = pos + litlen <= n
                            ? memmem(s + pos, n - pos, lit, litlen)
                            : NULL;
            if (f == NULL) {
                break;
            }
            ms = (size_t) (f - s);
            me = ms + litlen;
        } else {
            if (pos > n) {
                break;
            }
            rc = pcre2_match(st->re, (PCRE2_SPTR) s, n, pos,
                             PCRE2_NO_UTF_CHECK, md, NULL);
            if (rc < 0) {
                if (rc == PCRE2_ERROR_NOMATCH) {
                    break;
                }
                return -1;              /* JIT stack/match limit */
            }
            ov = pcre2_get_ovector_pointer(md);
            ms = ov[0];
            me = ov[1];
            if (me == ms) {             /* empty match: dropped anyway */
                if (ms >= n) {
                    break;
                }
                (void) moe_utf8_decode(s + ms, n - ms, &cl);
                pos = ms + cl;
                continue;
            }
        }
        if (prev != ms && sp_add(sp, prev, ms, 0) != 0) {
            return -1;
        }
        if (sp_add(sp, ms, me, 1) != 0) {
            return -1;
        }
        prev = pos = me;
    }
    if (prev != n) {
        return sp_add(sp, prev, n, 0);
    }
    return 0;
}

/* NormalizedString::split behaviors; merges in place, then emits pieces */
static int
emit_spans(spans_t *sp, int behavior, int invert, const char *s,
    int at_start, plist_t *out)
{
    size_t  i, k = 0;
    int     prev_m = 0;
    span_t *v = sp->v;

    for (i = 0; i < sp->n; i++) {
        if (invert) {
            v[i].m = !v[i].m;
        }
    }
    switch (behavior) {
    case BEH_REMOVED:
        for (i = 0; i < sp->n; i++) {
            if (!v[i].m) {
                v[k++] = v[i];
            }
        }
        break;
    case BEH_ISOLATED:
        k = sp->n;
        break;
    case BEH_PREV:
        for (i = 0; i < sp->n; i++) {
            if (v[i].m && !prev_m && k > 0) {
                v[k - 1].e = v[i].e;
            } else {
                v[k++] = v[i];
            }
            prev_m = v[i].m;
        }
        break;
    case BEH_CONTIGUOUS:
        for (i = 0; i < sp->n; i++) {
            int m = v[i].m;
            if (m == prev_m && k > 0) {
                v[k - 1].e = v[i].e;
            } else {
                v[k++] = v[i];
            }
            prev_m = m;
        }
        break;
    case BEH_NEXT: {
        /* walk backwards: a match joins the piece that follows it */
        size_t j = sp->n;
        k = sp->n;
        while (j-- > 0) {
            span_t cur = v[j];
            if (cur.m && !prev_m && k < sp->n) {
                v[k].s = cur.s;
            } else {
                v[--k] = cur;
            }
            prev_m = cur.m;
        }
        for (i = 0; k + i < sp->n; i++) {
            v[i] = v[k + i];
        }
        k = i;
        break;
    }
    }
    for (i = 0; i < k; i++) {
        if (v[i].e > v[i].s
            && pl_add(out, s + v[i].s, v[i].e - v[i].s, -1,
                      at_start && v[i].s == 0) != 0)
        {
            return -1;
        }
    }
    return 0;
}

static int
pre_step(const moe_tokenizer_t *t, const pre_step_t *st, plist_t *in,
    plist_t *out, spans_t *sp, tbuf_t *tmp, pcre2_match_data *md)
{
    size_t       i, j, cl;
    const char  *s;
    size_t       n;
    int          at;

    (void) t;
    pl_reset(out);
    for (i = 0; i < in->n; i++) {
        const piece_t *p = &in->v[i];

        s = in->text.p + p->off;
        n = p->len;
        at = p->at_start;
        if (p->id >= 0) {
            if (pl_add(out, s, n, p->id, 0) != 0) {
                return -1;
            }
            continue;
        }
        switch (st->type) {
        case PRE_SPLIT:
        case PRE_DIGITS:
            if (find_spans(st, s, n, sp, md) != 0
                || emit_spans(sp, st->behavior, st->invert, s, at, out) != 0)
            {
                return -1;
            }
            break;
        case PRE_METASPACE:
            tmp->len = 0;
            if (st->scheme == SCHEME_ALWAYS
                || (st->scheme == SCHEME_FIRST && at))
            {
                /* prepend unless it already starts with the replacement
                 * (or a space, which becomes one) */
                int starts = (n >= st->replen
                              && memcmp(s, st->rep, st->replen) == 0)
                             || (n > 0 && s[0] == ' ');
                if (!starts && moe_tok_buf_put(tmp, st->rep, st->replen) != 0) {
                    return -1;
                }
            }
            if (moe_tok_replace_all(s, n, " ", 1, st->rep, st->replen, tmp)
                != 0)
            {
                return -1;
            }
            if (!st->split) {
                if (tmp->len && pl_add(out, tmp->p, tmp->len, -1, at) != 0) {
                    return -1;
                }
                break;
            }
            if (find_spans(st, tmp->p, tmp->len, sp, md) != 0
                || emit_spans(sp, BEH_NEXT, 0, tmp->p, at, out) != 0)
            {
                return -1;
            }
            break;
        case PRE_BYTELEVEL: {
            size_t first = out->n, k;
            tmp->len = 0;
            if (st->add_prefix_space && (n == 0 || s[0] != ' ')) {
                if (moe_tok_buf_put(tmp, " ", 1) != 0) {
                    return -1;
                }
            }
            if (moe_tok_buf_put(tmp, s, n) != 0) {
                return -1;
            }
            if (st->use_regex) {
                if (find_spans(st, tmp->p, tmp->len, sp, md) != 0
                    || emit_spans(sp, BEH_ISOLATED, 0, tmp->p, at, out) != 0)
                {
                    return -1;
                }
            } else if (tmp->len
                       && pl_add(out, tmp->p, tmp->len, -1, at) != 0)
            {
                return -1;
            }
            /* map the new pieces' bytes to the GPT-2 alphabet, in place
             * at the end of out->text */
            for (k = first; k < out->n; k++) {
                piece_t *q = &out->v[k];
                size_t   len2 = 0, base;
                for (j = 0; j < q->len; j++) {
                    len2 += moe_tok_bl_enc_len[(unsigned char)
                                               out->text.p[q->off + j]];
                }
                base = out->text.len;
                if (moe_tok_buf_reserve(&out->text, len2) != 0) {
                    return -1;
                }
                for (j = 0; j < q->len; j++) {
                    unsigned char c = (unsigned char) out->text.p[q->off + j];
                    memcpy(out->text.p + out->text.len, moe_tok_bl_enc[c],
                           moe_tok_bl_enc_len[c]);
                    out->text.len += moe_tok_bl_enc_len[c];
                }
                out->text.p[out->text.len] = '\0';
                q->off = base;
                q->len = len2;
            }
            (void) cl;
            break;
        }
        }
    }
    return 0;
}


/* -------------------------------------------------------------- encode */

int
moe_tokenizer_encode(const moe_tokenizer_t *t, const char *text, size_t len,
    int add_special_tokens, int32_t **ids, size_t *n)
{
    char              *s = NULL;
    size_t             sl, i, j;
    plist_t            a = {0}, b = {0};
    tbuf_t             nb = {0}, tmp = {0};
    spans_t            sp = {0};
    bpe_scratch_t      sc = {0};
    ids_t              out = {0}, fin = {0};
    pcre2_match_data  *md = NULL;
    int                k, rc = MOE_ENOMEM;

    if (ids) {
        *ids = NULL;
    }
    if (n) {
        *n = 0;
    }
    if (t == NULL || (text == NULL && len) || ids == NULL || n == NULL) {
        return MOE_EINVAL;
    }
    s = moe_utf8_sanitize(text ? text : "", len, &sl);
    md = pcre2_match_data_create(32, NULL);
    if (s == NULL || md == NULL) {
        goto done;
    }
    /* 1. added tokens on the raw text */
    if (split_added(t, &t->raw_idx, 0, s, sl, 1, &a, md) != 0) {
        goto done;
    }
    /* 2. normalize text pieces, then normalized added tokens */
    if (t->n_norm || t->norm_idx.n) {
        for (i = 0; i < a.n; i++) {
            piece_t *p = &a.v[i];
            if (p->id >= 0) {
                if (pl_add(&b, a.text.p + p->off, p->len, p->id, 0) != 0) {
                    goto done;
                }
                continue;
            }
            if (moe_tok_normalize(t, a.text.p + p->off, p->len, &nb, &tmp) != 0
                || split_added(t, &t->norm_idx, 1, nb.p, nb.len, p->at_start,
                               &b, md) != 0)
            {
                goto done;
            }
        }
        pl_swap(&a, &b);
    }
    /* 3. pre-tokenizers */
    for (k = 0; k < t->n_pre; k++) {
        if (pre_step(t, &t->pre[k], &a, &b, &sp, &tmp, md) != 0) {
            rc = MOE_EINVAL;        /* regex resource limit on this input */
            goto done;
        }
        pl_swap(&a, &b);
    }
    /* 4. model */
    for (i = 0; i < a.n; i++) {
        piece_t *p = &a.v[i];
        if (p->id >= 0) {
            if (moe_tok_ids_push(&out, p->id) != 0) {
                goto done;
            }
        } else if (moe_tok_bpe_word(t, a.text.p + p->off, p->len, &out, &sc)
                   != 0)
        {
            goto done;
        }
    }
    /* 5. post-processor */
    if (add_special_tokens && t->n_tpl) {
        for (k = 0; k < t->n_tpl; k++) {
            const tpl_item_t *it = &t->tpl[k];
            if (it->is_seq) {
                for (i = 0; i < out.n; i++) {
                    if (moe_tok_ids_push(&fin, out.v[i]) != 0) {
                        goto done;
                    }
                }
            } else {
                for (j = 0; j < (size_t) it->n; j++) {
                    if (moe_tok_ids_push(&fin, it->ids[j]) != 0) {
                        goto done;
                    }
                }
            }
        }
        free(out.v);
        out = fin;
        fin.v = NULL;
    }
    if (out.v == NULL) {
        out.v = malloc(sizeof(int32_t));
        if (out.v == NULL) {
            goto done;
        }
    }
    *ids = out.v;
    *n = out.n;
    out.v = NULL;
    rc = MOE_OK;

done:
    free(s);
    free(out.v);
    free(fin.v);
    pl_free(&a);
    pl_free(&b);
    moe_tok_buf_free(&nb);
    moe_tok_buf_free(&tmp);
    free(sp.v);
    free(sc.sym);
    free(sc.heap);
    moe_tok_buf_free(&sc.tmp);
    pcre2_match_data_free(md);
    return rc;
}
