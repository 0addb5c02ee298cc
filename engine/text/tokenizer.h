/*
 * Tokenizer internals shared inside libmoe (the public API is in moe.h).
 *
 * The tokenizer (tokenizer.c) reproduces Hugging Face `tokenizers`: added
 * tokens split first, then normalizer, pre-tokenizer, BPE model and
 * post-processor on encode; the decoder chain on decode.  tokenizer_detok.c
 * builds the incremental detokenizer on top of moe_tokenizer_decode().
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

/*
 * Copy `len` bytes of possibly invalid UTF-8 into a malloc()ed, NUL
 * terminated buffer, replacing each maximal invalid subpart by U+FFFD (the
 * rule of Python's bytes.decode("utf-8", "replace") and Rust's
 * String::from_utf8_lossy).  Returns NULL when out of memory.
 */
char *moe_utf8_sanitize(const char *s, size_t len, size_t *out_len);

/* Write code point cp (< 0x110000) as UTF-8 at o (room for 4 bytes);
 * returns the byte count. */
size_t moe_utf8_encode(uint32_t cp, char *o);

#endif /* MOE_TOKENIZER_H */
