/*
 * libFuzzer harness: the tokenizer on what a client sends (prompt text,
 * any bytes, invalid UTF-8 included) and on id sequences (prompts given as
 * token ids, logit_bias keys, and whatever a model emits, out-of-range ids
 * included).
 *
 * Input: byte 0 picks the tokenizer (its value modulo the number loaded)
 * and the mode (bits 4-5); the rest is the text or the ids.
 *   mode 0, 1  encode the text (add_special_tokens = mode)
 *   mode 2, 3  byte 1 % 8 is the length of a stop string that follows;
 *              the rest are ids, three bytes each (little endian, mapped
 *              to [-4, vocab + 4)), skip_special_tokens = mode & 1
 *
 * Checks, beside ASan / UBSan / LeakSanitizer and libFuzzer's timeout and
 * RSS limit: encode succeeds and gives ids in [0, vocab); those ids decode;
 * on a byte-level tokenizer (ByteLevel pre-tokenizer and decoder), text
 * that is valid UTF-8 decodes back to itself; decode refuses a sequence
 * with an id out of range with MOE_EINVAL and accepts any other; the
 * streaming detokenizer's pieces plus its flush equal the decode; a text
 * stream with the stop string hands out the whole decode when it does not
 * stop, else a prefix of it that the stop string follows.
 *
 * Tokenizers: models/localmoe-kjv's (byte-level BPE; relative to
 * $MOE_SRCDIR, default the working directory), plus build/tok/llama2's
 * (SentencePiece-style BPE with byte fallback) and build/tok/llama3's
 * (128k byte-level BPE) when tools/fetch_tokenizers.sh has put them
 * there; $MOE_FUZZ_TOKENIZERS (paths separated by ':') replaces the list.
 */

#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "moe.h"
#include "text/tokenizer.h"
#include "text/utf8.h"

#define FZ_MAX_TOK  4

static moe_tokenizer_t  *fz_tok[FZ_MAX_TOK];
static int               fz_bytelevel[FZ_MAX_TOK];
static int               fz_n;


int LLVMFuzzerInitialize(int *argc, char ***argv);
int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);


static void
fz_load(const char *path, int required, int bytelevel)
{
    char  err[256];

    if (fz_n == FZ_MAX_TOK) {
        return;
    }
    if (moe_tokenizer_load(path, &fz_tok[fz_n], err, sizeof(err))
        != MOE_OK)
    {
        if (required) {
            fprintf(stderr, "fuzz_tokenizer: %s: %s\n", path, err);
            exit(1);
        }
        return;
    }
    fprintf(stderr, "fuzz_tokenizer: %d: %s\n", fz_n, path);
    fz_bytelevel[fz_n++] = bytelevel;
}


int
LLVMFuzzerInitialize(int *argc, char ***argv)
{
    const char *list = getenv("MOE_FUZZ_TOKENIZERS");
    const char *src = getenv("MOE_SRCDIR");
    char        buf[1024], *copy, *p, *save = NULL;

    (void) argc;
    (void) argv;
    if (src == NULL) {
        src = ".";
    }
    if (list != NULL) {
        copy = strdup(list);
        for (p = strtok_r(copy, ":", &save); p != NULL;
             p = strtok_r(NULL, ":", &save))
        {
            fz_load(p, 1, 0);
        }
        free(copy);
    } else {
        snprintf(buf, sizeof(buf), "%s/models/localmoe-kjv/tokenizer.json",
                 src);
        fz_load(buf, 1, 1);
        snprintf(buf, sizeof(buf), "%s/build/tok/llama2/tokenizer.json",
                 src);
        fz_load(buf, 0, 0);
        snprintf(buf, sizeof(buf), "%s/build/tok/llama3/tokenizer.json",
                 src);
        fz_load(buf, 0, 1);
    }
    if (fz_n == 0) {
        fprintf(stderr, "fuzz_tokenizer: no tokenizer\n");
        exit(1);
    }
    return 0;
}


/* decode ids both ways (whole, streamed) and compare; the whole text */
static char *
fz_decode(const moe_tokenizer_t *t, const int32_t *ids, size_t n, int skip,
    int all_valid, size_t *len)
{
    moe_detok_t *d;
    char        *text = NULL, *out = NULL;
    size_t       tl = 0, ol = 0, oc = 0, i;
    int          rc;

    rc = moe_tokenizer_decode(t, ids, n, skip, &text, &tl);
    if (!all_valid) {
        if (rc != MOE_EINVAL || text != NULL) {
            abort();                    /* an id out of range decoded */
        }
        return NULL;
    }
    if (rc != MOE_OK || text == NULL || text[tl] != '\0') {
        abort();                        /* (the text may hold NULs) */
    }
    d = moe_detok_create(t, skip);
    if (d == NULL) {
        abort();
    }
    for (i = 0; i < n; i++) {
        if (moe_detok_push(d, ids[i], &out, &ol, &oc) != MOE_OK) {
            abort();
        }
    }
    if (moe_detok_flush(d, &out, &ol, &oc) != MOE_OK) {
        abort();
    }
    if (ol != tl || (tl > 0 && memcmp(out, text, tl) != 0)) {
        fprintf(stderr, "detok '%.*s' != decode '%s'\n", (int) ol,
                out ? out : "", text);
        abort();                        /* the stream is not the decode */
    }
    moe_detok_free(d);
    free(out);
    *len = tl;
    return text;
}


/* ids through a text stream with one stop string; full: their decode */
static void
fz_stream(const moe_tokenizer_t *t, const int32_t *ids, size_t n, int skip,
    const char *stop, const char *full, size_t fl)
{
    moe_textstream_t *s;
    const char       *stops[1] = { stop }, *piece;
    char             *out = NULL;
    size_t            ol = 0, pl, i, sl = strlen(stop);
    int               stopped = 0;

    s = moe_textstream_create(t, stops, 1, skip);
    if (s == NULL) {
        abort();
    }
    for (i = 0; i < n && !stopped; i++) {
        if (moe_textstream_push(s, ids[i], &piece, &pl, &stopped) != MOE_OK
            || (out = realloc(out, ol + pl + 1)) == NULL)
        {
            abort();
        }
        memcpy(out + ol, piece, pl);
        ol += pl;
    }
    if (!stopped) {
        if (moe_textstream_finish(s, &piece, &pl) != MOE_OK
            || (out = realloc(out, ol + pl + 1)) == NULL)
        {
            abort();
        }
        memcpy(out + ol, piece, pl);
        ol += pl;
    }
    if (ol > fl || (ol && memcmp(out, full, ol) != 0)
        || (!stopped && ol != fl)
        || (stopped && (sl == 0 || ol + sl > fl
                        || memcmp(full + ol, stop, sl) != 0)))
    {
        abort();                        /* not the decode, or its stop */
    }
    moe_textstream_free(s);
    free(out);
}


int
LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    const moe_tokenizer_t  *t;
    int32_t                *ids = NULL;
    size_t                  n = 0, i, len, bad, sl;
    char                   *text, stop[8];
    int                     which, mode, vocab, valid = 1;

    if (size == 0) {
        return 0;
    }
    which = data[0] % fz_n;
    mode = (data[0] >> 4) & 3;
    t = fz_tok[which];
    vocab = moe_tokenizer_vocab_size(t);
    data++;
    size--;

    if (mode < 2) {
        if (moe_tokenizer_encode(t, (const char *) data, size, mode, &ids,
                                 &n) != MOE_OK)
        {
            abort();
        }
        for (i = 0; i < n; i++) {
            if (ids[i] < 0 || ids[i] >= vocab) {
                abort();
            }
        }
        text = fz_decode(t, ids, n, 0, 1, &len);
        if (fz_bytelevel[which] && mode == 0
            && moe_utf8_valid_prefix((const char *) data, size, &bad)
               == size
            && (len != size || memcmp(text, data, size) != 0))
        {
            fprintf(stderr, "round trip: '%s'\n", text);
            abort();                    /* decode(encode(s)) != s */
        }
        free(text);
        free(ids);
        return 0;
    }

    stop[0] = '\0';
    if (size > 0) {
        sl = data[0] % 8;
        sl = sl < size ? sl : size - 1;
        memcpy(stop, data + 1, sl);
        stop[sl] = '\0';
        data += 1 + sl;
        size -= 1 + sl;
    }
    n = size / 3;
    ids = malloc(sizeof(int32_t) * (n ? n : 1));
    if (ids == NULL) {
        return 0;
    }
    for (i = 0; i < n; i++) {
        unsigned v = data[3 * i] | (unsigned) data[3 * i + 1] << 8
                     | (unsigned) data[3 * i + 2] << 16;

        ids[i] = (int32_t) (v % (unsigned) (vocab + 8)) - 4;
        if (ids[i] < 0 || ids[i] >= vocab
            || moe_tokenizer_id_to_token(t, ids[i]) == NULL)
        {
            valid = 0;
        }
        (void) moe_tokenizer_is_special(t, ids[i]);
    }
    text = fz_decode(t, ids, n, mode & 1, valid, &len);
    if (text != NULL) {
        fz_stream(t, ids, n, mode & 1, stop, text, len);
    }
    free(text);
    free(ids);
    return 0;
}
