/*
 * libFuzzer harness: tokenizer.json loading (engine/text/tokenizer_load.c)
 * followed by encoding and decoding short fixed strings.
 *
 * The input is tokenizer.json; when it holds a line "#tokenizer_config\n"
 * the text after it is written as tokenizer_config.json beside it (and
 * removed from tokenizer.json).  moe_tokenizer_load() must fail with a
 * message naming the file (out of memory aside) or give a tokenizer that
 * encodes every fixed string, with and without special tokens, into ids
 * inside its vocabulary (0 <= id < moe_tokenizer_vocab_size()); decodes
 * those ids (skipping special tokens or not), also one at a time through
 * the incremental detokenizer; and answers every per-id lookup (token
 * string, special flag, byte token, token bytes) for each id.
 */

#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "fuzz_files.h"
#include "text/tokenizer.h"

#define CFG_MARK  "#tokenizer_config\n"

static const char *const  texts[] = {
    "Hello, world! 123 4567",
    " leading  and   spaced\ttext\n\nnew lines ",
    ("caf\xc3\xa9 na\xc3\xafve \xe2\x80\x94 \xe4\xbd\xa0\xe5\xa5\xbd "
     "\xf0\x9f\x98\x80"),
    "<s>[INST] <|im_start|>user<|im_end|> </s>",
    "bad utf-8: \xff\xfe \xc3",
    "",
};


static void
check_ids(const moe_tokenizer_t *t, const int32_t *ids, size_t n)
{
    moe_detok_t  *d;
    char         *text, *out, buf[64];
    size_t        len, olen, ocap, i;
    int           vocab = moe_tokenizer_vocab_size(t), skip;
    int32_t       id;

    for (i = 0; i < n; i++) {
        FF_CHECK(ids[i] >= 0 && ids[i] < vocab, "id %d outside the "
                 "vocabulary (%d)", (int) ids[i], vocab);
    }
    for (skip = 0; skip < 2; skip++) {
        text = NULL;
        FF_CHECK(moe_tokenizer_decode(t, ids, n, skip, &text, &len)
                 == MOE_OK, "decode of encoded ids");
        FF_CHECK(text != NULL && strlen(text) <= len, "decoded length");
        free(text);

        d = moe_detok_create(t, skip);
        FF_CHECK(d != NULL, "detok");
        out = NULL;
        olen = ocap = 0;
        for (i = 0; i < n; i++) {
            FF_CHECK(moe_detok_push(d, ids[i], &out, &olen, &ocap)
                     == MOE_OK, "detok push");
        }
        FF_CHECK(moe_detok_flush(d, &out, &olen, &ocap) == MOE_OK,
                 "detok flush");
        free(out);
        moe_detok_free(d);
    }
    for (i = 0; i < n; i++) {
        id = ids[i];
        (void) moe_tokenizer_id_to_token(t, id);
        (void) moe_tokenizer_is_special(t, id);
        (void) moe_tokenizer_is_byte_token(t, id);
        (void) moe_tokenizer_token_bytes(t, id, buf, sizeof(buf));
    }
}


int
LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    char              path[128], cpath[128], err[512], *text, *mark;
    moe_tokenizer_t  *t;
    int32_t          *ids;
    size_t            n, i, tl;
    int               rc, add, vocab;
    const char       *s;
    char              buf[64];

    text = malloc(size + 1);
    FF_CHECK(text != NULL, "malloc");
    memcpy(text, data, size);
    text[size] = '\0';
    tl = size;
    ff_path(path, sizeof(path), "tokenizer.json");
    ff_path(cpath, sizeof(cpath), "tokenizer_config.json");
    mark = memmem(text, size, CFG_MARK, strlen(CFG_MARK));
    if (mark != NULL) {
        tl = (size_t) (mark - text);
        ff_write(cpath, mark + strlen(CFG_MARK),
                 size - tl - strlen(CFG_MARK));
    } else {
        unlink(cpath);
    }
    ff_write(path, text, tl);
    free(text);

    err[0] = '\0';
    rc = moe_tokenizer_load(path, &t, err, sizeof(err));
    if (rc != MOE_OK) {
        FF_CHECK(t == NULL, "tokenizer on failure");
        FF_CHECK(rc == MOE_ENOMEM || strstr(err, path) != NULL,
                 "error does not name the file: %s", err);
        return 0;
    }
    for (i = 0; i < sizeof(texts) / sizeof(texts[0]); i++) {
        for (add = 0; add < 2; add++) {
            ids = NULL;
            n = 0;
            rc = moe_tokenizer_encode(t, texts[i], strlen(texts[i]), add,
                                      &ids, &n);
            FF_CHECK(rc == MOE_OK, "encode '%s': %d", texts[i], rc);
            check_ids(t, ids, n);
            free(ids);
        }
    }
    vocab = moe_tokenizer_vocab_size(t);
    for (i = 0; i < 64 && (int) i < vocab; i++) {
        s = moe_tokenizer_id_to_token(t, (int32_t) i);
        if (s != NULL) {
            (void) moe_tokenizer_token_to_id(t, s);
        }
        (void) moe_tokenizer_token_bytes(t, (int32_t) i, buf, sizeof(buf));
    }
    (void) moe_tokenizer_bos_token(t);
    (void) moe_tokenizer_eos_token(t);
    (void) moe_tokenizer_chat_template(t);
    moe_tokenizer_free(t);
    return 0;
}
