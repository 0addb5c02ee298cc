/*
 * Guided decoding, the engine's side (the public half is moe.h's "guided
 * decoding" block: moe_guide_compile / _ref / _release).
 *
 * Every guide kind compiles to one byte-level context-free grammar
 * (gbnf.c parses GBNF; regex.c and schema.c translate a regular
 * expression and a JSON Schema to GBNF first; a choice is an alternation
 * of literals).  A sequence carries a matcher state: the set of
 * pushdown stacks of grammar positions still alive after the bytes it has
 * produced (llama.cpp's scheme).  The allowed-token mask walks the
 * tokenizer's vocabulary trie once, advancing the stack set byte by byte
 * and skipping every subtree whose prefix is already dead; masks are
 * cached per guide by canonical stack set, so a state met again (every
 * state of a regex or a choice, the inside of a JSON string, ...) costs a
 * copy after warm-up.
 */

#ifndef MOE_GUIDED_H
#define MOE_GUIDED_H

#include <stddef.h>
#include <stdint.h>

#include "moe.h"

typedef struct moe_guided_state moe_guided_state_t;

/*
 * A matcher at the start of g's language (takes a reference to g).
 * eos: the ids that end a sequence (allowed only where the language may
 * end).  NULL on allocation failure.
 */
moe_guided_state_t *moe_guided_state_create(moe_guide_t *g,
    const int32_t *eos, int n_eos);
void moe_guided_state_free(moe_guided_state_t *st);

/*
 * The allowed-token mask of st's next token: bit (id & 31) of
 * words[id >> 5] (n_words >= (vocab + 31) / 32; bits past the
 * tokenizer's vocabulary are 0).  Returns the number of allowed tokens
 * (0: a dead end, the sequence cannot continue), or a negative moe
 * status: MOE_ENOMEM, or MOE_EUNSUPPORTED when a state the tokens lead
 * to is over the matcher's limits (guided_int.h: the guide is too
 * complex).
 */
int moe_guided_mask(moe_guided_state_t *st, uint32_t *words, size_t n_words);

/*
 * Feed the sampled token: MOE_OK (st moved on), or MOE_EINVAL when the
 * guide rejects it (st unchanged), MOE_ENOMEM / MOE_EUNSUPPORTED as
 * moe_guided_mask.  An EOS id is accepted only where the language may
 * end (st then takes nothing more).
 */
int moe_guided_advance(moe_guided_state_t *st, int32_t token);

/* 1 when the bytes fed so far form a complete string of the language. */
int moe_guided_is_accepting(const moe_guided_state_t *st);

/*
 * Feed raw text (tests, tools): MOE_OK when every byte is accepted (st
 * moved on), MOE_EINVAL at the first rejected byte (st unchanged);
 * MOE_ENOMEM / MOE_EUNSUPPORTED as moe_guided_mask.
 */
int moe_guided_feed(moe_guided_state_t *st, const char *s, size_t n);

/* vocabulary size the guide's masks cover (the tokenizer's) */
int moe_guided_vocab(const moe_guide_t *g);

#endif /* MOE_GUIDED_H */
