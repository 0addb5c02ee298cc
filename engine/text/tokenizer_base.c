/*
 * Tokenizer base: the pieces that loading, encoding and decoding share
 * (growable buffers, the vocab and merge hash maps, the GPT-2 byte <->
 * char table, literal replace, <0xNN> byte tokens).  It calls nothing in
 * the other tokenizer files.
 */

#include <pthread.h>
#include <stdlib.h>
#include <string.h>

#include "text/tokenizer_int.h"
#include "text/utf8.h"


/* ------------------------------------------------------------ buffers */

/*
 * Make room for `need` elements of size sz in the array v of *cap elements,
 * doubling from `first`.  Returns the (maybe moved) array, or NULL when out
 * of memory; then v and *cap are unchanged, so the caller can still free v.
 */
void *
moe_tok_grow(void *v, size_t *cap, size_t need, size_t sz, size_t first)
{
    size_t  c;

    if (need <= *cap) {
        return v;
    }
    c = *cap ? *cap * 2 : first;
    while (c < need) {
        c *= 2;
    }
    v = realloc(v, c * sz);
    if (v != NULL) {
        *cap = c;
    }
    return v;
}

int
moe_tok_buf_reserve(tbuf_t *b, size_t extra)
{
    char  *p;

    p = moe_tok_grow(b->p, &b->cap, b->len + extra + 1, 1, 64);
    if (p == NULL) {
        return -1;
    }
    b->p = p;
    return 0;
}

int
moe_tok_buf_put(tbuf_t *b, const void *s, size_t n)
{
    if (moe_tok_buf_reserve(b, n) != 0) {
        return -1;
    }
    if (n) {
        memcpy(b->p + b->len, s, n);
    }
    b->len += n;
    b->p[b->len] = '\0';
    return 0;
}

void
moe_tok_buf_free(tbuf_t *b)
{
    free(b->p);
    b->p = NULL;
    b->len = b->cap = 0;
}

/*
 * Append s[0..n) to b with each maximal invalid subpart replaced by U+FFFD
 * (Unicode "substitution of maximal subparts", as Python and Rust do).
 */
int
moe_tok_buf_put_lossy(tbuf_t *b, const char *s, size_t n)
{
    size_t  i, v, bad;

    if (moe_tok_buf_reserve(b, n) != 0) {
        return -1;
    }
    for (i = 0; i < n; i += v + bad) {
        v = moe_utf8_valid_prefix(s + i, n - i, &bad);
        if (moe_tok_buf_put(b, s + i, v) != 0
            || (bad && moe_tok_buf_put(b, MOE_UTF8_FFFD, 3) != 0))
        {
            return -1;
        }
    }
    return 0;
}


/* Byte value of a "<0xNN>" token (Rust u8::from_str_radix(_, 16) on the
 * two digits), or -1. */
int
moe_tok_byte_value(const char *s, size_t n)
{
    int i, v = 0, d;

    if (n != 6 || memcmp(s, "<0x", 3) != 0 || s[5] != '>') {
        return -1;
    }
    for (i = 3; i < 5; i++) {
        char c = s[i];
        if (c >= '0' && c <= '9') {
            d = c - '0';
        } else if (c >= 'a' && c <= 'f') {
            d = c - 'a' + 10;
        } else if (c >= 'A' && c <= 'F') {
            d = c - 'A' + 10;
        } else {
            return -1;
        }
        v = v * 16 + d;
    }
    return v;
}


/* ------------------------------------------------------------ hash maps */

static uint64_t
hash_bytes(const char *s, size_t n)
{
    uint64_t h = 1469598103934665603ULL;
    size_t   i;

    for (i = 0; i < n; i++) {
        h ^= (unsigned char) s[i];
        h *= 1099511628211ULL;
    }
    return h ^ (h >> 29);
}

static uint64_t
hash_u64(uint64_t x)
{
    x ^= x >> 33;
    x *= 0xff51afd7ed558ccdULL;
    x ^= x >> 33;
    x *= 0xc4ceb9fe1a85ec53ULL;
    x ^= x >> 33;
    return x;
}


/* open addressing: a power of two at least twice the number of keys */
static size_t
table_cap(size_t n)
{
    size_t cap = 16;

    while (cap < n * 2) {
        cap *= 2;
    }
    return cap;
}

int
moe_tok_strmap_init(strmap_t *m, size_t n)
{
    size_t cap = table_cap(n);

    m->slot = malloc(cap * sizeof(*m->slot));
    if (m->slot == NULL) {
        return -1;
    }
    memset(m->slot, 0xff, cap * sizeof(*m->slot));
    m->cap = cap;
    return 0;
}

int32_t
moe_tok_vocab_get(const moe_tokenizer_t *t, const char *s, size_t n)
{
    const strmap_t *m = &t->vocab;
    size_t          i;
    int32_t         id;

    if (m->cap == 0) {
        return -1;
    }
    i = hash_bytes(s, n) & (m->cap - 1);
    while ((id = m->slot[i]) >= 0) {
        if (t->vocab_len[id] == n && memcmp(t->vocab_str[id], s, n) == 0) {
            return id;
        }
        i = (i + 1) & (m->cap - 1);
    }
    return -1;
}

/* insert id (its vocab string set); a later duplicate string wins */
void
moe_tok_vocab_put(moe_tokenizer_t *t, int32_t id)
{
    strmap_t   *m = &t->vocab;
    const char *s = t->vocab_str[id];
    size_t      n = t->vocab_len[id], i;
    int32_t     o;

    i = hash_bytes(s, n) & (m->cap - 1);
    while ((o = m->slot[i]) >= 0) {
        if (t->vocab_len[o] == n && memcmp(t->vocab_str[o], s, n) == 0) {
            m->slot[i] = id;
            return;
        }
        i = (i + 1) & (m->cap - 1);
    }
    m->slot[i] = id;
}

int
moe_tok_pairmap_init(pairmap_t *m, size_t n)
{
    size_t cap = table_cap(n);

    m->key = calloc(cap, sizeof(*m->key));
    m->rank = malloc(cap * sizeof(*m->rank));
    m->new_id = malloc(cap * sizeof(*m->new_id));
    if (m->key == NULL || m->rank == NULL || m->new_id == NULL) {
        return -1;
    }
    m->cap = cap;
    return 0;
}

void
moe_tok_pairmap_put(pairmap_t *m, int32_t a, int32_t b, uint32_t rank,
    int32_t nid)
{
    uint64_t k = (((uint64_t) (uint32_t) a << 32) | (uint32_t) b) + 1;
    size_t   i = hash_u64(k) & (m->cap - 1);

    while (m->key[i] != 0 && m->key[i] != k) {
        i = (i + 1) & (m->cap - 1);
    }
    m->key[i] = k;         /* HashMap collect: the later merge wins */
    m->rank[i] = rank;
    m->new_id[i] = nid;
}

int
moe_tok_pairmap_get(const pairmap_t *m, int32_t a, int32_t b, uint32_t *rank,
    int32_t *nid)
{
    uint64_t k = (((uint64_t) (uint32_t) a << 32) | (uint32_t) b) + 1;
    size_t   i;

    if (m->cap == 0) {
        return 0;
    }
    i = hash_u64(k) & (m->cap - 1);
    while (m->key[i] != 0) {
        if (m->key[i] == k) {
            *rank = m->rank[i];
            *nid = m->new_id[i];
            return 1;
        }
        i = (i + 1) & (m->cap - 1);
    }
    return 0;
}


/* ------------------------------------------------------ literal replace */

int
moe_tok_replace_all(const char *s, size_t n, const char *pat, size_t pl,
    const char *rep, size_t rl, tbuf_t *out)
{
    size_t i = 0, last = 0;

    while (pl && i + pl <= n) {
        if (memcmp(s + i, pat, pl) == 0) {
            if (moe_tok_buf_put(out, s + last, i - last) != 0
                || moe_tok_buf_put(out, rep, rl) != 0)
            {
                return -1;
            }
            i += pl;
            last = i;
        } else {
            i++;
        }
    }
    return moe_tok_buf_put(out, s + last, n - last);
}


/* ------------------------------------------------------------ ByteLevel */

/* GPT-2 byte <-> unicode map */
char             moe_tok_bl_enc[256][3];    /* UTF-8 of the char for byte b */
uint8_t          moe_tok_bl_enc_len[256];
int16_t          moe_tok_bl_dec[0x144];     /* code point -> byte, -1 */
static pthread_once_t bl_once = PTHREAD_ONCE_INIT;

static void
bytelevel_build(void)
{
    int      b, n = 0;
    uint32_t cp;

    for (b = 0; b < 0x144; b++) {
        moe_tok_bl_dec[b] = -1;
    }
    for (b = 0; b < 256; b++) {
        if ((b >= '!' && b <= '~') || (b >= 0xa1 && b <= 0xac)
            || (b >= 0xae && b <= 0xff))
        {
            cp = (uint32_t) b;
        } else {
            cp = 256 + (uint32_t) n++;
        }
        moe_tok_bl_enc_len[b] = (uint8_t) moe_utf8_encode(cp,
                                                          moe_tok_bl_enc[b]);
        moe_tok_bl_dec[cp] = (int16_t) b;
    }
}


void
moe_tok_bytelevel_init(void)
{
    (void) pthread_once(&bl_once, bytelevel_build);
}
