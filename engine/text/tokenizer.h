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

#endif /* MOE_TOKENIZER_H */
