/*
 * libFuzzer harness: guided decoding with a guide a client wrote
 * (guided_json, guided_regex, guided_grammar, guided_choice,
 * response_format reach moe_guide_compile() as they are).
 *
 * Input: byte 0 picks the kind ('j' JSON Schema, 'o' json_object, 'r'
 * regex, 'g' GBNF, 'c' choice; any other byte by its value modulo 5);
 * then the spec; after the last NUL byte, if any, a program that drives a
 * matcher (else four greedy steps):
 *   op % 4 == 0  mask, then advance by the k-th allowed token (k: next byte)
 *   op % 4 == 1  feed one raw byte (next byte)
 *   op % 4 == 2  advance by any id (next two bytes: negative and out of
 *                range ids included)
 *   op % 4 == 3  mask, then advance by EOS when the mask allows it
 *
 * Checks, beside ASan / UBSan / LeakSanitizer and libFuzzer's timeout and
 * RSS limit: a compile either succeeds or fails with MOE_EINVAL /
 * MOE_ENOMEM, no guide and a non-empty message; masks, feeds and advances
 * fail only as documented (MOE_ENOMEM, MOE_EUNSUPPORTED: a guide over the
 * matcher's limits; MOE_EINVAL: a byte or token refused); a mask's count
 * equals its set bits, no bit is set past the vocabulary, EOS is set
 * exactly when the text may end, and every allowed token is accepted by
 * advance.
 *
 * The tokenizer: $MOE_FUZZ_TOKENIZER, else models/localmoe-kjv's
 * (relative to $MOE_SRCDIR, default the working directory).
 */

#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "moe.h"
#include "guided/guided.h"
#include "text/tokenizer.h"

#define FZ_MAX_OPS    32
#define FZ_MAX_MASKS  8

static moe_tokenizer_t  *fz_tok;
static int32_t           fz_eos = -1;
static int               fz_vocab;
static uint32_t         *fz_words;
static size_t            fz_nw;


int LLVMFuzzerInitialize(int *argc, char ***argv);
int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);


int
LLVMFuzzerInitialize(int *argc, char ***argv)
{
    const char *path = getenv("MOE_FUZZ_TOKENIZER");
    const char *src = getenv("MOE_SRCDIR");
    const char *eos;
    char        buf[1024], err[256];

    (void) argc;
    (void) argv;
    if (path == NULL) {
        snprintf(buf, sizeof(buf), "%s/models/localmoe-kjv/tokenizer.json",
                 src ? src : ".");
        path = buf;
    }
    if (moe_tokenizer_load(path, &fz_tok, err, sizeof(err)) != MOE_OK) {
        fprintf(stderr, "fuzz_guided: %s: %s\n", path, err);
        exit(1);
    }
    eos = moe_tokenizer_eos_token(fz_tok);
    if (eos != NULL) {
        fz_eos = moe_tokenizer_token_to_id(fz_tok, eos);
    }
    fz_vocab = moe_tokenizer_vocab_size(fz_tok);
    fz_nw = (size_t) (fz_vocab + 31) / 32;
    fz_words = calloc(fz_nw, sizeof(uint32_t));
    if (fz_words == NULL) {
        exit(1);
    }
    return 0;
}


static int
fz_bit(const uint32_t *w, int32_t id)
{
    return (int) ((w[id >> 5] >> (id & 31)) & 1);
}


/* one mask of st: checked; returns its count (< 0: refused, stop) */
static int
fz_mask(moe_guided_state_t *st)
{
    int  n, id, bits = 0;

    n = moe_guided_mask(st, fz_words, fz_nw);
    if (n < 0) {
        if (n != MOE_ENOMEM && n != MOE_EUNSUPPORTED) {
            abort();                    /* (too complex: refused) */
        }
        return n;
    }
    for (id = 0; id < (int) (fz_nw * 32); id++) {
        if (fz_bit(fz_words, id)) {
            if (id >= fz_vocab) {
                abort();                /* a bit past the vocabulary */
            }
            bits++;
        }
    }
    if (bits != n) {
        abort();                        /* count and bits disagree */
    }
    if (fz_eos >= 0
        && fz_bit(fz_words, fz_eos) != moe_guided_is_accepting(st))
    {
        abort();                        /* EOS where the text may not end */
    }
    return n;
}


/* the k-th allowed token of the last mask (n > 0 of them) */
static int32_t
fz_pick(int n, unsigned k)
{
    int32_t id;

    k %= (unsigned) n;
    for (id = 0; id < fz_vocab; id++) {
        if (fz_bit(fz_words, id) && k-- == 0) {
            return id;
        }
    }
    abort();
}


static void
fz_drive(moe_guide_t *g, const uint8_t *prog, size_t n)
{
    static const uint8_t  greedy[] = { 0, 0, 0, 0, 0, 0, 0, 0 };
    moe_guided_state_t   *st;
    size_t                i = 0;
    int                   ops = 0, masks = 0, m, rc;
    int32_t               id;
    char                  c;

    if (n == 0) {
        prog = greedy;
        n = sizeof(greedy);
    }
    st = moe_guided_state_create(g, &fz_eos, fz_eos >= 0 ? 1 : 0);
    if (st == NULL) {
        return;
    }
    while (i < n && ops++ < FZ_MAX_OPS) {
        uint8_t op = prog[i++];

        switch (op % 4) {
        case 0:
        case 3:
            if (masks++ == FZ_MAX_MASKS) {
                goto out;
            }
            m = fz_mask(st);
            if (m <= 0) {
                goto out;
            }
            if (op % 4 == 3) {
                if (fz_eos < 0 || !fz_bit(fz_words, fz_eos)) {
                    break;
                }
                id = fz_eos;
            } else {
                id = fz_pick(m, i < n ? prog[i++] : 0);
            }
            rc = moe_guided_advance(st, id);
            if (rc == MOE_ENOMEM) {
                goto out;
            }
            if (rc != MOE_OK) {
                abort();                /* an allowed token was refused */
            }
            break;
        case 1:
            c = (char) (i < n ? prog[i++] : 0);
            rc = moe_guided_feed(st, &c, 1);
            if (rc != MOE_OK && rc != MOE_EINVAL && rc != MOE_ENOMEM
                && rc != MOE_EUNSUPPORTED)
            {
                abort();
            }
            break;
        default:
            id = (int16_t) ((i < n ? prog[i] : 0)
                            | (i + 1 < n ? prog[i + 1] : 0) << 8);
            i += 2;
            rc = moe_guided_advance(st, id);
            if (rc != MOE_OK && rc != MOE_EINVAL && rc != MOE_ENOMEM
                && rc != MOE_EUNSUPPORTED)
            {
                abort();
            }
            break;
        }
    }
out:
    moe_guided_state_free(st);
}


int
LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    static const moe_guided_kind_t kinds[] = {
        MOE_GUIDED_JSON, MOE_GUIDED_JSON_OBJECT, MOE_GUIDED_REGEX,
        MOE_GUIDED_GRAMMAR, MOE_GUIDED_CHOICE
    };
    moe_guided_kind_t  kind;
    moe_guide_t       *g = (moe_guide_t *) 1;
    const uint8_t     *nul;
    size_t             spec_len, k;
    char               err[256];
    int                rc;

    if (size == 0) {
        return 0;
    }
    switch (data[0]) {
    case 'j': kind = MOE_GUIDED_JSON; break;
    case 'o': kind = MOE_GUIDED_JSON_OBJECT; break;
    case 'r': kind = MOE_GUIDED_REGEX; break;
    case 'g': kind = MOE_GUIDED_GRAMMAR; break;
    case 'c': kind = MOE_GUIDED_CHOICE; break;
    default:  kind = kinds[data[0] % 5]; break;
    }
    data++;
    size--;
    spec_len = size;
    nul = NULL;
    for (k = size; k-- > 0;) {
        if (data[k] == 0) {
            nul = data + k;
            break;
        }
    }
    if (nul != NULL) {
        spec_len = (size_t) (nul - data);
    }

    memset(err, 'x', sizeof(err));
    rc = moe_guide_compile(fz_tok, kind, (const char *) data, spec_len, &g,
                           err, sizeof(err));
    if (rc != MOE_OK) {
        if ((rc != MOE_EINVAL && rc != MOE_ENOMEM) || g != NULL
            || memchr(err, '\0', sizeof(err)) == NULL || err[0] == '\0')
        {
            abort();                    /* a refusal without a message */
        }
        return 0;
    }
    if (g == NULL || !moe_guide_matches(g, fz_tok)
        || moe_guided_vocab(g) != fz_vocab)
    {
        abort();
    }
    if (nul != NULL) {
        fz_drive(g, nul + 1, size - spec_len - 1);
    } else {
        fz_drive(g, NULL, 0);
    }
    moe_guide_release(g);
    return 0;
}
