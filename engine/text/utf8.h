/*
 * UTF-8 helpers shared by the tokenizer and the Jinja lexer: decode and
 * encode one character, Unicode White_Space, and the lossy repair of
 * invalid input (each maximal invalid subpart becomes U+FFFD).
 */

#ifndef MOE_UTF8_H
#define MOE_UTF8_H

#include <stddef.h>
#include <stdint.h>

/* U+FFFD REPLACEMENT CHARACTER as UTF-8 (3 bytes) */
#define MOE_UTF8_FFFD  "\xef\xbf\xbd"

/* Length of the (valid) UTF-8 character whose first byte is c: 1..4. */
size_t moe_utf8_len(unsigned char c);

/*
 * Decode one character of valid UTF-8 at s (n > 0 bytes left); *cl gets
 * its length in bytes (never more than n).  Invalid input gives some code
 * point and a length >= 1, never a read past s + n.
 */
uint32_t moe_utf8_decode(const char *s, size_t n, size_t *cl);

/* Write code point cp (< 0x110000) as UTF-8 at o (room for 4 bytes);
 * returns the byte count. */
size_t moe_utf8_encode(uint32_t cp, char *o);

/* 1 if cp is Unicode White_Space (Rust char::is_whitespace), else 0. */
int moe_utf8_is_space(uint32_t cp);

/*
 * Length of the longest valid UTF-8 prefix of s[0..n).  When that prefix
 * is not all of s, *bad gets the length (>= 1) of the maximal invalid
 * subpart that follows it (Unicode "substitution of maximal subparts",
 * as Python and Rust apply it), else 0.
 */
size_t moe_utf8_valid_prefix(const char *s, size_t n, size_t *bad);

/*
 * Copy `len` bytes of possibly invalid UTF-8 into a malloc()ed, NUL
 * terminated buffer, replacing each maximal invalid subpart by U+FFFD (the
 * rule of Python's bytes.decode("utf-8", "replace") and Rust's
 * String::from_utf8_lossy); *out_len (when not NULL) gets its length.
 * The caller frees the result.  Returns NULL when out of memory.
 */
char *moe_utf8_sanitize(const char *s, size_t len, size_t *out_len);

#endif /* MOE_UTF8_H */
