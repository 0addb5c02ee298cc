/*
 * Tokenizer normalizers: Prepend, Replace (literal or regex) and the
 * Unicode normalization forms NFC, NFD, NFKC, NFKD (through utf8proc, as
 * Hugging Face `tokenizers` applies them with the unicode-normalization
 * crate).  Used on input text pieces (encode) and on the content of
 * normalized added tokens (load).
 */

#include <stdlib.h>
#include <string.h>

#include <utf8proc.h>

#include "text/tokenizer_int.h"
#include "text/utf8.h"


static int
replace_re(const pcre2_code *re, const char *s, size_t n, const char *rep,
    size_t rl, tbuf_t *out)
{
    pcre2_match_data *md = pcre2_match_data_create_from_pattern(re, NULL);
    size_t            pos = 0, last = 0, cl;
    PCRE2_SIZE       *ov;
    int               rc = 0;

    if (md == NULL) {
        return -1;
    }
    while (pos <= n
           && pcre2_match(re, (PCRE2_SPTR) s, n, pos, PCRE2_NO_UTF_CHECK, md,
                          NULL) >= 0)
    {
        ov = pcre2_get_ovector_pointer(md);
        if (ov[1] == ov[0]) {           /* empty match: step one char */
            if (ov[0] >= n) {
                break;
            }
            (void) moe_utf8_decode(s + ov[0], n - ov[0], &cl);
            pos = ov[0] + cl;
            continue;
        }
        if (moe_tok_buf_put(out, s + last, ov[0] - last) != 0
            || moe_tok_buf_put(out, rep, rl) != 0)
        {
            rc = -1;
            break;
        }
        pos = last = ov[1];
    }
    if (rc == 0) {
        rc = moe_tok_buf_put(out, s + last, n - last);
    }
    pcre2_match_data_free(md);
    return rc;
}

/* utf8proc options of the NORM_FORM_* forms */
static const utf8proc_option_t  unicode_form[] = {
    [NORM_FORM_NFC] = UTF8PROC_STABLE | UTF8PROC_COMPOSE,
    [NORM_FORM_NFD] = UTF8PROC_STABLE | UTF8PROC_DECOMPOSE,
    [NORM_FORM_NFKC] = UTF8PROC_STABLE | UTF8PROC_COMPOSE | UTF8PROC_COMPAT,
    [NORM_FORM_NFKD] = UTF8PROC_STABLE | UTF8PROC_DECOMPOSE | UTF8PROC_COMPAT,
};

/*
 * Unicode normalization form `form` (NORM_FORM_*) of the valid
 * UTF-8 s[0..n), appended to out.  ASCII text is its own normal form in
 * all four forms, so it is copied without a call.  Returns -1 when out of
 * memory (or when utf8proc refuses the input, which sanitized text never
 * gives it).
 */
static int
unicode_normalize(const char *s, size_t n, int form, tbuf_t *out)
{
    utf8proc_uint8_t  *d = NULL;
    utf8proc_ssize_t   dl;
    size_t             i;
    int                rc;

    for (i = 0; i < n && (unsigned char) s[i] < 0x80; i++) {
        /* find the first non-ASCII byte */
    }
    if (i == n) {
        return moe_tok_buf_put(out, s, n);
    }
    if (n > ((size_t) -1 >> 4)) {               /* utf8proc_ssize_t */
        return -1;
    }
    dl = utf8proc_map((const utf8proc_uint8_t *) s, (utf8proc_ssize_t) n, &d,
                      unicode_form[form]);
    if (dl < 0) {
        return -1;
    }
    rc = moe_tok_buf_put(out, d, (size_t) dl);
    free(d);
    return rc;
}

/* Apply the normalizer chain to s[0..n); result in out (reset first). */
int
moe_tok_normalize(const moe_tokenizer_t *t, const char *s, size_t n,
    tbuf_t *out, tbuf_t *tmp)
{
    int                i;
    const norm_step_t *st;
    tbuf_t             x;

    out->len = 0;
    if (moe_tok_buf_put(out, s, n) != 0) {
        return -1;
    }
    for (i = 0; i < t->n_norm; i++) {
        st = &t->norm[i];
        tmp->len = 0;
        switch (st->type) {
        case NORM_PREPEND:
            if (out->len == 0) {
                continue;               /* Prepend skips empty strings */
            }
            if (moe_tok_buf_put(tmp, st->a, st->alen) != 0
                || moe_tok_buf_put(tmp, out->p, out->len) != 0)
            {
                return -1;
            }
            break;
        case NORM_REPLACE:
            if ((st->re ? replace_re(st->re, out->p, out->len, st->b,
                                     st->blen, tmp)
                 : moe_tok_replace_all(out->p, out->len, st->a, st->alen,
                                       st->b, st->blen, tmp)) != 0)
            {
                return -1;
            }
            break;
        case NORM_UNICODE:
            if (unicode_normalize(out->p, out->len, st->uform, tmp) != 0) {
                return -1;
            }
            break;
        default:
            continue;
        }
        x = *out;
        *out = *tmp;
        *tmp = x;
    }
    return 0;
}
