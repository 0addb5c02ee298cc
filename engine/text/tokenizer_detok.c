/*
 * Incremental detokenizer (the vLLM/TGI window method).
 *
 * State: all pushed ids, and two offsets into them.  ids[prefix..read) is
 * text already sent; its decode (prefix_text) is kept.  On each push the
 * window ids[prefix..n) is decoded; when it is longer than prefix_text and
 * final, the difference is sent and the window slides: prefix = read,
 * read = n.
 *
 * Why the pieces add up to decode(all ids):
 *  - decoding restarts only at a token boundary `read` where the text before
 *    it was final, so bytes never straddle it (ByteLevel) and no byte group
 *    spans it (ByteFallback);
 *  - window-start effects (Strip's one leading space, Metaspace's first
 *    token) hit the first kept token of ids[prefix..read) in both decodes
 *    and cancel in the difference; that range always holds a kept token,
 *    since it is exactly the tokens of the last piece sent;
 *  - at the very start prefix = 0, where the effect is the real one.
 * Text is "final" when it does not end in U+FFFD (an incomplete UTF-8
 * sequence decodes to U+FFFD and may still complete) and, with a
 * ByteFallback decoder, the last kept token is not a <0xNN> byte token
 * (a following byte token could turn a valid group into one U+FFFD per
 * byte).
 */

#include <stdlib.h>
#include <string.h>

#include "moe.h"
#include "text/tokenizer.h"

struct moe_detok {
    const moe_tokenizer_t *t;
    int                    skip;
    int32_t               *ids;          /* (cap) every pushed id */
    size_t                 n;
    size_t                 cap;
    size_t                 prefix;       /* window start */
    size_t                 read;         /* end of text already sent */
    char                  *prefix_text;  /* decode(ids[prefix..read)) */
    size_t                 prefix_len;
    int                    last_is_byte; /* last kept id is a byte token */
};

moe_detok_t *
moe_detok_create(const moe_tokenizer_t *t, int skip_special_tokens)
{
    moe_detok_t *d;

    if (t == NULL) {
        return NULL;
    }
    d = calloc(1, sizeof(*d));
    if (d == NULL) {
        return NULL;
    }
    d->t = t;
    d->skip = skip_special_tokens;
    return d;
}

void
moe_detok_free(moe_detok_t *d)
{
    if (d == NULL) {
        return;
    }
    free(d->ids);
    free(d->prefix_text);
    free(d);
}

static int
out_append(char **out, size_t *len, size_t *cap, const char *s, size_t n)
{
    size_t  c;
    char   *p;

    if (*out == NULL || *len + n + 1 > *cap) {
        c = *cap ? *cap : 64;
        while (c < *len + n + 1) {
            c *= 2;
        }
        p = realloc(*out, c);
        if (p == NULL) {
            return MOE_ENOMEM;
        }
        *out = p;
        *cap = c;
    }
    memcpy(*out + *len, s, n);
    *len += n;
    (*out)[*len] = '\0';
    return MOE_OK;
}

static int
ends_with_fffd(const char *s, size_t n)
{
    return n >= 3 && memcmp(s + n - 3, "\xef\xbf\xbd", 3) == 0;
}

/* Send text[prefix_len .. tl) (the window's text up to token `to`) and
 * slide the window: prefix = read, read = to. */
static int
send(moe_detok_t *d, const char *text, size_t tl, size_t to, char **out,
    size_t *len, size_t *cap)
{
    int rc;

    rc = out_append(out, len, cap, text + d->prefix_len, tl - d->prefix_len);
    if (rc != MOE_OK) {
        return rc;
    }
    d->prefix = d->read;
    d->read = to;
    free(d->prefix_text);
    d->prefix_text = NULL;
    d->prefix_len = 0;
    return moe_tokenizer_decode(d->t, d->ids + d->prefix, d->read - d->prefix,
                                d->skip, &d->prefix_text, &d->prefix_len);
}

/*
 * The window's text (full, fl bytes) is not final, but its text up to
 * the last token may be: it is when it is a proper prefix of full and its
 * last kept token is not a byte token.  A U+FFFD that a later token could
 * still turn into a character comes from an incomplete UTF-8 sequence at
 * the very end of the bytes; had that sequence begun before the last
 * token, both texts would end in that same U+FFFD, one no longer than the
 * other.  And no byte group spans a token that is not a byte token.
 * Sending it slides the window, so a run of tokens that never ends a
 * character ("\xc3\xa2" "\xc3\xa2" ... : byte 0xE2 over and over in a
 * byte-level vocabulary) costs a few short decodes a token instead of a
 * decode of the whole run (quadratic: 8000 such tokens took 1.2 s).
 */
static int
step_part(moe_detok_t *d, const char *full, size_t fl, char **out,
    size_t *len, size_t *cap)
{
    size_t  to = d->n - 1, k, pl = 0;
    char   *part = NULL;
    int     rc, byte = 0;

    if (to <= d->read) {
        return MOE_OK;
    }
    for (k = to; k-- > d->read;) {
        if (d->skip && moe_tokenizer_is_special(d->t, d->ids[k])) {
            continue;
        }
        byte = moe_tokenizer_is_byte_token(d->t, d->ids[k]);
        break;
    }
    if (byte) {
        return MOE_OK;
    }
    rc = moe_tokenizer_decode(d->t, d->ids + d->prefix, to - d->prefix,
                              d->skip, &part, &pl);
    if (rc != MOE_OK) {
        return rc;
    }
    if (pl > d->prefix_len && pl < fl && memcmp(full, part, pl) == 0) {
        rc = send(d, part, pl, to, out, len, cap);
    }
    free(part);
    return rc;
}

/* Send the window's new text if `force` or it is final; slide on send. */
static int
step(moe_detok_t *d, int force, char **out, size_t *len, size_t *cap)
{
    char   *full = NULL;
    size_t  fl = 0;
    int     rc;

    rc = moe_tokenizer_decode(d->t, d->ids + d->prefix, d->n - d->prefix,
                              d->skip, &full, &fl);
    if (rc != MOE_OK) {
        return rc;
    }
    if (fl <= d->prefix_len
        || memcmp(full, d->prefix_text ? d->prefix_text : "",
                  d->prefix_len) != 0)
    {
        free(full);
        return MOE_OK;
    }
    if (!force && (ends_with_fffd(full, fl) || d->last_is_byte)) {
        rc = step_part(d, full, fl, out, len, cap);
        free(full);
        return rc;
    }
    rc = send(d, full, fl, d->n, out, len, cap);
    free(full);
    return rc;
}

int
moe_detok_push(moe_detok_t *d, int32_t id, char **out, size_t *len,
    size_t *cap)
{
    int32_t *v;
    size_t   c;
    int      byte;

    if (d == NULL || out == NULL || len == NULL || cap == NULL) {
        return MOE_EINVAL;
    }
    if (id < 0 || id >= moe_tokenizer_vocab_size(d->t)
        || moe_tokenizer_id_to_token(d->t, id) == NULL)
    {
        return MOE_EINVAL;
    }
    if (d->n == d->cap) {
        c = d->cap ? d->cap * 2 : 64;
        v = realloc(d->ids, c * sizeof(*v));
        if (v == NULL) {
            return MOE_ENOMEM;
        }
        d->ids = v;
        d->cap = c;
    }
    d->ids[d->n++] = id;
    if (d->skip && moe_tokenizer_is_special(d->t, id)) {
        return MOE_OK;                  /* adds no text */
    }
    byte = moe_tokenizer_is_byte_token(d->t, id);
    if (byte && d->last_is_byte) {
        /* a byte group goes on: nothing before it can be sent (the last
         * push saw to that) and the group itself is undecided until it
         * ends, so no decode now (one per byte of a long run of byte
         * tokens was quadratic: 32000 of them took 49 s) */
        return MOE_OK;
    }
    d->last_is_byte = byte;
    return step(d, 0, out, len, cap);
}

int
moe_detok_flush(moe_detok_t *d, char **out, size_t *len, size_t *cap)
{
    if (d == NULL || out == NULL || len == NULL || cap == NULL) {
        return MOE_EINVAL;
    }
    if (d->n == d->read) {
        return MOE_OK;
    }
    return step(d, 1, out, len, cap);
}
