/*
 * Token bytes and the tokenizer's attachment, for guided decoding: the
 * guided room builds its vocabulary trie from moe_tokenizer_token_bytes()
 * and keeps it on the tokenizer through moe_tokenizer_ext().
 */

#include <pthread.h>
#include <string.h>

#include "moe.h"
#include "text/tokenizer.h"
#include "text/tokenizer_int.h"
#include "text/utf8.h"


static pthread_mutex_t moe_tok_ext_lock = PTHREAD_MUTEX_INITIALIZER;


/* put n bytes at *len (counting all, writing what fits) */
static void
tb_put(char *buf, size_t cap, size_t *len, const char *s, size_t n)
{
    if (*len < cap) {
        memcpy(buf + *len, s, *len + n <= cap ? n : cap - *len);
    }
    *len += n;
}


int
moe_tokenizer_token_bytes(const moe_tokenizer_t *t, int32_t id, char *buf,
    size_t cap)
{
    const char  *s;
    size_t       n, i, cl, len = 0;
    uint32_t     cp;
    int          k, bytelevel = 0, repl = 0, bfb = 0;
    uint32_t     rep_cp = 0x2581;      /* U+2581 LOWER ONE EIGHTH BLOCK */
    const char  *pat = NULL;
    size_t       patlen = 0;

    if (t == NULL || id < 0 || id >= t->n_ids || t->id_str[id] == NULL) {
        return -1;
    }
    s = t->id_str[id];
    n = t->id_len[id];
    if (t->id_flags[id] & ID_ADDED) {       /* added tokens: their content */
        tb_put(buf, cap, &len, s, n);
        return (int) len;
    }
    for (k = 0; t->has_decoder && k < t->n_dec; k++) {
        switch (t->dec[k].type) {
        case DEC_BYTELEVEL:
            bytelevel = 1;
            break;
        case DEC_BYTEFALLBACK:
            bfb = 1;
            break;
        case DEC_REPLACE:
            repl = 1;
            pat = t->dec[k].pat;
            patlen = t->dec[k].patlen;
            break;
        case DEC_METASPACE:
            repl = 1;
            rep_cp = t->dec[k].replacement;
            pat = NULL;
            break;
        default:
            break;
        }
    }
    if (bfb && t->id_byte[id] >= 0) {
        char c = (char) t->id_byte[id];
        tb_put(buf, cap, &len, &c, 1);
        return (int) len;
    }
    for (i = 0; i < n; i += cl) {
        cp = moe_utf8_decode(s + i, n - i, &cl);
        if (cl == 0) {
            cl = 1;
        }
        if (bytelevel && cp < 0x144 && moe_tok_bl_dec[cp] >= 0) {
            char c = (char) moe_tok_bl_dec[cp];
            tb_put(buf, cap, &len, &c, 1);
        } else if (repl && pat != NULL && patlen && patlen <= n - i
                   && memcmp(s + i, pat, patlen) == 0)
        {
            tb_put(buf, cap, &len, " ", 1);
            cl = patlen;
        } else if (repl && pat == NULL && cp == rep_cp) {
            tb_put(buf, cap, &len, " ", 1);
        } else {
            tb_put(buf, cap, &len, s + i, cl);
        }
    }
    return (int) len;
}


void *
moe_tokenizer_ext(const moe_tokenizer_t *t,
    void *(*make)(const moe_tokenizer_t *t), void (*free_fn)(void *))
{
    moe_tokenizer_t *w = (moe_tokenizer_t *) t;  /* the attachment slot only */
    void            *x;

    if (t == NULL) {
        return NULL;
    }
    pthread_mutex_lock(&moe_tok_ext_lock);
    if (w->ext == NULL && make != NULL) {
        w->ext = make(t);
        if (w->ext != NULL) {
            w->ext_free = free_fn;
        }
    }
    x = w->ext;
    pthread_mutex_unlock(&moe_tok_ext_lock);
    return x;
}
