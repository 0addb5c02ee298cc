/*
 * Tokenizer internals shared inside libmoe (the public API is in moe.h).
 *
 * The tokenizer reproduces Hugging Face `tokenizers`: added tokens split
 * first, then normalizer, pre-tokenizer, BPE model and post-processor on
 * encode (tokenizer_encode.c, _normalize.c, _bpe.c); the decoder chain on
 * decode (tokenizer_decode.c).  tokenizer_load.c reads tokenizer.json;
 * tokenizer_int.h lists the files and their shared internals.
 * tokenizer_detok.c builds the incremental detokenizer on top of
 * moe_tokenizer_decode().  UTF-8 helpers are in text/utf8.h.
 */

#ifndef MOE_TOKENIZER_H
#define MOE_TOKENIZER_H

#include <stddef.h>
#include <stdint.h>

#include "moe.h"

/*
 * Fields of tokenizer_config.json beside tokenizer.json; NULL (or -1 for
 * the flags) when the file or the key is absent.  bos/eos accept both the
 * plain string and the {"content": ...} object forms; chat_template accepts
 * a string or the list form (the entry named "default").  The strings live
 * as long as the tokenizer.
 */
const char *moe_tokenizer_bos_token(const moe_tokenizer_t *t);
const char *moe_tokenizer_eos_token(const moe_tokenizer_t *t);
const char *moe_tokenizer_chat_template(const moe_tokenizer_t *t);
int         moe_tokenizer_add_bos_token(const moe_tokenizer_t *t);
int         moe_tokenizer_add_eos_token(const moe_tokenizer_t *t);

/* 1 if the decoder chain has a ByteFallback step and `id` is a <0xNN>
 * byte token (its byte group stays open until a non-byte token follows). */
int moe_tokenizer_is_byte_token(const moe_tokenizer_t *t, int32_t id);


/* ------------------------------------------- token bytes (guided decoding) */

/*
 * The bytes token `id` adds to a decoded text in the middle of a sequence
 * (ByteLevel characters mapped back to their bytes, <0xNN> byte tokens to
 * their byte, Replace/Metaspace's replacement to a space; the Strip step
 * and the Metaspace prefix rule, which only touch the text's first
 * character, are not applied).  Writes at most cap bytes to buf and
 * returns the full length, or -1 for an id out of range or a hole.
 */
int moe_tokenizer_token_bytes(const moe_tokenizer_t *t, int32_t id,
    char *buf, size_t cap);

/*
 * The tokenizer's one attachment: returns it, making it with make(t) on
 * the first call (under a lock; thread-safe); free(ext) runs in
 * moe_tokenizer_free().  NULL when make returns NULL (tried again on the
 * next call).  One kind of attachment per process (guided decoding's
 * vocabulary trie); the first caller's free function is kept.
 */
void *moe_tokenizer_ext(const moe_tokenizer_t *t,
    void *(*make)(const moe_tokenizer_t *t), void (*free_fn)(void *));

#endif /* MOE_TOKENIZER_H */
