/*
 * Tokenizer decode: ids -> token strings (specials filtered when asked) ->
 * decoder chain (ByteLevel, Replace, ByteFallback, Fuse, Strip,
 * Metaspace) -> join, as Hugging Face `tokenizers` decodes.
 */

#include <stdlib.h>
#include <string.h>

#include "moe.h"
#include "text/tokenizer.h"
#include "text/tokenizer_int.h"
#include "text/utf8.h"


typedef struct {
    tbuf_t   text;
    size_t  *off;       /* (n + 1) token k is text[off[k] .. off[k+1]) */
    size_t   n, cap;
} slist_t;

static int
sl_add(slist_t *l, const char *s, size_t n)
{
    size_t *o;

    o = moe_tok_grow(l->off, &l->cap, l->n + 2, sizeof(*o), 32);
    if (o == NULL) {
        return -1;
    }
    l->off = o;
    if (l->n == 0) {
        l->off[0] = l->text.len;
    }
    if (moe_tok_buf_put(&l->text, s, n) != 0) {
        return -1;
    }
    l->n++;
    l->off[l->n] = l->text.len;
    return 0;
}

/* append bytes to the last token of l (creating it when l is empty) */
static int
sl_start(slist_t *l)
{
    return sl_add(l, "", 0);
}

static int
sl_append_last(slist_t *l, const char *s, size_t n)
{
    if (moe_tok_buf_put(&l->text, s, n) != 0) {
        return -1;
    }
    l->off[l->n] = l->text.len;
    return 0;
}

static void
sl_reset(slist_t *l)
{
    l->n = 0;
    l->text.len = 0;
}

static int
dec_step(const dec_step_t *st, slist_t *in, slist_t *out)
{
    size_t      k, i, cl, n = 0, start_cut, stop_cut, cnt;
    const char *s = NULL;
    tbuf_t      bytes = {0};
    int         rc = -1;
    uint32_t    cp;

    sl_reset(out);
    switch (st->type) {
    case DEC_BYTELEVEL:
        for (k = 0; k < in->n; k++) {
            size_t mark = bytes.len;
            int    ok = 1;
            s = in->text.p + in->off[k];
            n = in->off[k + 1] - in->off[k];
            for (i = 0; i < n; i += cl) {
                cp = moe_utf8_decode(s + i, n - i, &cl);
                if (cp >= 0x144 || moe_tok_bl_dec[cp] < 0) {
                    ok = 0;
                    break;
                }
                if (moe_tok_buf_put(&bytes,
                                    &(char) { (char) moe_tok_bl_dec[cp] }, 1)
                    != 0)
                {
                    goto out;
                }
            }
            if (!ok) {
                bytes.len = mark;
                if (moe_tok_buf_put(&bytes, s, n) != 0) {
                    goto out;
                }
            }
        }
        if (sl_start(out) != 0
            || moe_tok_buf_put_lossy(&out->text, bytes.p ? bytes.p : "",
                                     bytes.len)
               != 0)
        {
            goto out;
        }
        out->off[1] = out->text.len;
        break;
    case DEC_REPLACE:
        for (k = 0; k < in->n; k++) {
            if (sl_start(out) != 0) {
                goto out;
            }
            bytes.len = 0;
            if (moe_tok_replace_all(in->text.p + in->off[k],
                                    in->off[k + 1] - in->off[k], st->pat,
                                    st->patlen, st->content, st->contentlen,
                                    &bytes) != 0
                || sl_append_last(out, bytes.p, bytes.len) != 0)
            {
                goto out;
            }
        }
        break;
    case DEC_BYTEFALLBACK:
        bytes.len = 0;
        for (k = 0; k <= in->n; k++) {
            int byte = -1;
            if (k < in->n) {
                s = in->text.p + in->off[k];
                n = in->off[k + 1] - in->off[k];
                byte = moe_tok_byte_value(s, n);
            }
            if (byte >= 0) {
                char c = (char) byte;
                if (moe_tok_buf_put(&bytes, &c, 1) != 0) {
                    goto out;
                }
                continue;
            }
            if (bytes.len) {
                tbuf_t chk = {0};
                /* valid UTF-8 as a whole, else one U+MOE_UTF8_FFFD per byte */
                if (moe_tok_buf_put_lossy(&chk, bytes.p, bytes.len) != 0) {
                    goto out;
                }
                if (chk.len == bytes.len
                    && memcmp(chk.p, bytes.p, bytes.len) == 0)
                {
                    rc = sl_add(out, bytes.p, bytes.len);
                } else {
                    rc = 0;
                    for (cnt = 0; cnt < bytes.len && rc == 0; cnt++) {
                        rc = sl_add(out, MOE_UTF8_FFFD, 3);
                    }
                }
                moe_tok_buf_free(&chk);
                if (rc != 0) {
                    goto out;
                }
                rc = -1;
                bytes.len = 0;
            }
            if (k < in->n && sl_add(out, s, n) != 0) {
                goto out;
            }
        }
        break;
    case DEC_FUSE:
        if (sl_start(out) != 0
            || sl_append_last(out, in->text.p ? in->text.p + in->off[0] : "",
                              in->n ? in->off[in->n] - in->off[0] : 0) != 0)
        {
            goto out;
        }
        break;
    case DEC_STRIP:
        for (k = 0; k < in->n; k++) {
            size_t nch;
            s = in->text.p + in->off[k];
            n = in->off[k + 1] - in->off[k];
            /* cut up to `start` leading and `stop` trailing strip chars */
            start_cut = 0;
            for (i = 0, nch = 0; i < n && nch < (size_t) st->start; i += cl) {
                cp = moe_utf8_decode(s + i, n - i, &cl);
                if (cp != st->strip_char) {
                    break;
                }
                nch++;
                start_cut = i + cl;
            }
            stop_cut = n;
            for (i = n, nch = 0; i > start_cut && nch < (size_t) st->stop;
                 nch++)
            {
                size_t j = i - 1;
                while (j > 0 && ((unsigned char) s[j] & 0xc0) == 0x80) {
                    j--;
                }
                if (moe_utf8_decode(s + j, n - j, &cl) != st->strip_char) {
                    break;
                }
                stop_cut = i = j;
            }
            if (sl_add(out, s + start_cut, stop_cut - start_cut) != 0) {
                goto out;
            }
        }
        break;
    case DEC_METASPACE:
        for (k = 0; k < in->n; k++) {
            if (sl_start(out) != 0) {
                goto out;
            }
            s = in->text.p + in->off[k];
            n = in->off[k + 1] - in->off[k];
            for (i = 0; i < n; i += cl) {
                cp = moe_utf8_decode(s + i, n - i, &cl);
                if (cp == st->replacement) {
                    if (k == 0 && st->scheme != SCHEME_NEVER) {
                        continue;
                    }
                    if (sl_append_last(out, " ", 1) != 0) {
                        goto out;
                    }
                } else if (sl_append_last(out, s + i, cl) != 0) {
                    goto out;
                }
            }
        }
        break;
    }
    rc = 0;

out:
    moe_tok_buf_free(&bytes);
    return rc;
}

int
moe_tokenizer_decode(const moe_tokenizer_t *t, const int32_t *ids, size_t n,
    int skip_special_tokens, char **text, size_t *len)
{
    slist_t  a = {0}, b = {0}, x;
    size_t   i;
    int      k, rc = MOE_ENOMEM;
    tbuf_t   res = {0};

    if (text) {
        *text = NULL;
    }
    if (len) {
        *len = 0;
    }
    if (t == NULL || (ids == NULL && n) || text == NULL) {
        return MOE_EINVAL;
    }
    for (i = 0; i < n; i++) {
        int32_t id = ids[i];
        if (id < 0 || id >= t->n_ids || t->id_str[id] == NULL) {
            rc = MOE_EINVAL;
            goto done;
        }
        if (skip_special_tokens && (t->id_flags[id] & ID_SPECIAL)) {
            continue;
        }
        if (sl_add(&a, t->id_str[id], t->id_len[id]) != 0) {
            goto done;
        }
    }
    if (t->has_decoder) {
        for (k = 0; k < t->n_dec; k++) {
            if (dec_step(&t->dec[k], &a, &b) != 0) {
                goto done;
            }
            x = a;
            a = b;
            b = x;
        }
        if (moe_tok_buf_put(&res, a.n ? a.text.p + a.off[0] : "",
                            a.n ? a.off[a.n] - a.off[0] : 0) != 0)
        {
            goto done;
        }
    } else {
        for (i = 0; i < a.n; i++) {     /* no decoder: tokens joined by " " */
            if ((i && moe_tok_buf_put(&res, " ", 1) != 0)
                || moe_tok_buf_put(&res, a.text.p + a.off[i],
                                   a.off[i + 1] - a.off[i])
                   != 0)
            {
                goto done;
            }
        }
    }
    if (res.p == NULL && moe_tok_buf_put(&res, "", 0) != 0) {
        goto done;
    }
    *text = res.p;
    if (len) {
        *len = res.len;
    }
    res.p = NULL;
    rc = MOE_OK;

done:
    moe_tok_buf_free(&res);
    moe_tok_buf_free(&a.text);
    free(a.off);
    moe_tok_buf_free(&b.text);
    free(b.off);
    return rc;
}
