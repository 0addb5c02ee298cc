/*
 * Tokenizer: Hugging Face tokenizer.json (BPE model) encode and decode,
 * behaving as the Rust `tokenizers` library does.
 *
 * Encode pipeline (TokenizerImpl::encode):
 *   invalid UTF-8 -> U+FFFD
 *   split out added tokens that are matched on the raw text (normalized=false)
 *   normalize each remaining piece; split out normalized added tokens
 *   pre-tokenize each remaining piece into words
 *   BPE each word (ignore_merges, byte_fallback, unk/fuse_unk)
 *   post-process (TemplateProcessing) when add_special_tokens
 * Decode: ids -> token strings (specials filtered when asked) -> decoder
 * chain (ByteLevel, Replace, ByteFallback, Fuse, Strip, Metaspace) -> join.
 *
 * Every Sequence (normalizer, pre-tokenizer, decoder, post-processor) is
 * flattened at load time into one array of steps: applying a Sequence is
 * applying its members in order.
 */

#include <errno.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define PCRE2_CODE_UNIT_WIDTH 8
#include <pcre2.h>
#include <utf8proc.h>
#include <yajl/yajl_tree.h>

#include "moe.h"
#include "text/tokenizer.h"


/* ------------------------------------------------------------ utilities */

typedef struct {
    char   *p;
    size_t  len;
    size_t  cap;
} tbuf_t;

/*
 * Make room for `need` elements of size sz in the array v of *cap elements,
 * doubling from `first`.  Returns the (maybe moved) array, or NULL when out
 * of memory; then v and *cap are unchanged, so the caller can still free v.
 */
static void *
grow(void *v, size_t *cap, size_t need, size_t sz, size_t first)
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

static int
tb_reserve(tbuf_t *b, size_t extra)
{
    char  *p;

    p = grow(b->p, &b->cap, b->len + extra + 1, 1, 64);
    if (p == NULL) {
        return -1;
    }
    b->p = p;
    return 0;
}

static int
tb_put(tbuf_t *b, const void *s, size_t n)
{
    if (tb_reserve(b, n) != 0) {
        return -1;
    }
    if (n) {
        memcpy(b->p + b->len, s, n);
    }
    b->len += n;
    b->p[b->len] = '\0';
    return 0;
}

static void
tb_free(tbuf_t *b)
{
    free(b->p);
    b->p = NULL;
    b->len = b->cap = 0;
}


/* Length of the (valid) UTF-8 char starting with byte c. */
static size_t
u8len(unsigned char c)
{
    if (c < 0x80) {
        return 1;
    }
    if (c < 0xe0) {
        return 2;
    }
    if (c < 0xf0) {
        return 3;
    }
    return 4;
}

/* Decode one char of valid UTF-8 at s (n bytes left); *cl gets its length. */
static uint32_t
u8dec(const char *s, size_t n, size_t *cl)
{
    const unsigned char *u = (const unsigned char *) s;
    size_t               l = u8len(u[0]);
    uint32_t             cp;

    if (l > n) {
        l = n;
    }
    *cl = l;
    switch (l) {
    case 1:
        return u[0];
    case 2:
        return ((uint32_t) (u[0] & 0x1f) << 6) | (u[1] & 0x3f);
    case 3:
        return ((uint32_t) (u[0] & 0x0f) << 12)
               | ((uint32_t) (u[1] & 0x3f) << 6) | (u[2] & 0x3f);
    default:
        cp = ((uint32_t) (u[0] & 0x07) << 18)
             | ((uint32_t) (u[1] & 0x3f) << 12)
             | ((uint32_t) (u[2] & 0x3f) << 6) | (u[3] & 0x3f);
        return cp;
    }
}

size_t
moe_utf8_encode(uint32_t cp, char *o)
{
    if (cp < 0x80) {
        o[0] = (char) cp;
        return 1;
    }
    if (cp < 0x800) {
        o[0] = (char) (0xc0 | (cp >> 6));
        o[1] = (char) (0x80 | (cp & 0x3f));
        return 2;
    }
    if (cp < 0x10000) {
        o[0] = (char) (0xe0 | (cp >> 12));
        o[1] = (char) (0x80 | ((cp >> 6) & 0x3f));
        o[2] = (char) (0x80 | (cp & 0x3f));
        return 3;
    }
    o[0] = (char) (0xf0 | (cp >> 18));
    o[1] = (char) (0x80 | ((cp >> 12) & 0x3f));
    o[2] = (char) (0x80 | ((cp >> 6) & 0x3f));
    o[3] = (char) (0x80 | (cp & 0x3f));
    return 4;
}

static const char FFFD[] = "\xef\xbf\xbd";

/*
 * Append s[0..n) to b with each maximal invalid subpart replaced by U+FFFD
 * (Unicode "substitution of maximal subparts", as Python and Rust do).
 */
static int
tb_put_lossy(tbuf_t *b, const char *s, size_t n)
{
    const unsigned char *u = (const unsigned char *) s;
    size_t               i = 0, start = 0, need, k;
    unsigned char        c, lo, hi;

    if (tb_reserve(b, n) != 0) {
        return -1;
    }
    while (i < n) {
        c = u[i];
        if (c < 0x80) {
            i++;
            continue;
        }
        lo = 0x80;
        hi = 0xbf;
        if (c >= 0xc2 && c <= 0xdf) {
            need = 1;
        } else if (c >= 0xe0 && c <= 0xef) {
            need = 2;
            if (c == 0xe0) {
                lo = 0xa0;
            } else if (c == 0xed) {
                hi = 0x9f;
            }
        } else if (c >= 0xf0 && c <= 0xf4) {
            need = 3;
            if (c == 0xf0) {
                lo = 0x90;
            } else if (c == 0xf4) {
                hi = 0x8f;
            }
        } else {
            need = 0;
        }
        k = 0;
        if (need) {
            /* first continuation has the special range, others 80..BF */
            if (i + 1 < n && u[i + 1] >= lo && u[i + 1] <= hi) {
                k = 1;
                while (k < need && i + 1 + k < n
                       && u[i + 1 + k] >= 0x80 && u[i + 1 + k] <= 0xbf)
                {
                    k++;
                }
            }
            if (k == need) {
                i += 1 + need;
                continue;
            }
        }
        /* invalid: lead byte plus k valid continuations is one subpart */
        if (tb_put(b, s + start, i - start) != 0
            || tb_put(b, FFFD, 3) != 0)
        {
            return -1;
        }
        i += 1 + k;
        start = i;
    }
    return tb_put(b, s + start, n - start);
}

char *
moe_utf8_sanitize(const char *s, size_t len, size_t *out_len)
{
    tbuf_t b = {0};

    if (tb_reserve(&b, len) != 0 || tb_put_lossy(&b, s, len) != 0) {
        tb_free(&b);
        return NULL;
    }
    if (out_len) {
        *out_len = b.len;
    }
    return b.p;
}

/* Byte value of a "<0xNN>" token (Rust u8::from_str_radix(_, 16) on the
 * two digits), or -1. */
static int
byte_token_value(const char *s, size_t n)
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

/* Unicode White_Space (Rust char::is_whitespace). */
static int
is_uspace(uint32_t c)
{
    return (c >= 0x09 && c <= 0x0d) || c == 0x20 || c == 0x85 || c == 0xa0
           || c == 0x1680 || (c >= 0x2000 && c <= 0x200a) || c == 0x2028
           || c == 0x2029 || c == 0x202f || c == 0x205f || c == 0x3000;
}


/* ---------------------------------------------------------- string arena */

typedef struct arena_blk {
    struct arena_blk *next;
    size_t            used;
    size_t            size;
    char              data[];
} arena_blk_t;

static char *
arena_strdup(arena_blk_t **a, const char *s, size_t n)
{
    arena_blk_t *b = *a;
    size_t       sz;
    char        *p;

    if (b == NULL || b->used + n + 1 > b->size) {
        sz = n + 1 > (1u << 20) ? n + 1 : (1u << 20);
        b = malloc(sizeof(*b) + sz);
        if (b == NULL) {
            return NULL;
        }
        b->next = *a;
        b->used = 0;
        b->size = sz;
        *a = b;
    }
    p = b->data + b->used;
    memcpy(p, s, n);
    p[n] = '\0';
    b->used += n + 1;
    return p;
}

static void
arena_free(arena_blk_t *a)
{
    arena_blk_t *n;

    while (a) {
        n = a->next;
        free(a);
        a = n;
    }
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

/* string -> id; keys point at the tokenizer's id strings */
typedef struct {
    int32_t  *slot;      /* (cap) id or -1 */
    size_t    cap;       /* power of two */
} strmap_t;

typedef struct {
    uint64_t *key;       /* (cap) (a << 32 | b) + 1, 0 = empty */
    uint32_t *rank;      /* (cap) */
    int32_t  *new_id;    /* (cap) */
    size_t    cap;
} pairmap_t;


/* --------------------------------------------------------------- model */

/* NFC, NFD, NFKC, NFKD: Unicode normalization forms, through utf8proc */
enum { NORM_PREPEND, NORM_REPLACE, NORM_UNICODE };

typedef struct {
    int          type;
    char        *a;           /* Prepend: text; Replace: literal pattern */
    size_t       alen;
    char        *b;           /* Replace: content */
    size_t       blen;
    pcre2_code  *re;          /* Replace with a Regex pattern */
    int          uform;       /* NORM_UNICODE: utf8proc_option_t flags */
} norm_step_t;

enum { PRE_SPLIT, PRE_BYTELEVEL, PRE_METASPACE, PRE_DIGITS };
enum { BEH_REMOVED, BEH_ISOLATED, BEH_PREV, BEH_NEXT, BEH_CONTIGUOUS };
enum { SCHEME_ALWAYS, SCHEME_FIRST, SCHEME_NEVER };

typedef struct {
    int          type;
    pcre2_code  *re;          /* Split regex / ByteLevel GPT-2 regex */
    char        *lit;         /* Split literal pattern */
    size_t       litlen;
    int          behavior;
    int          invert;
    int          add_prefix_space;
    int          use_regex;
    char         rep[8];      /* Metaspace replacement, UTF-8 */
    size_t       replen;
    int          scheme;
    int          split;
    int          individual_digits;
} pre_step_t;

enum { DEC_BYTELEVEL, DEC_REPLACE, DEC_BYTEFALLBACK, DEC_FUSE, DEC_STRIP,
       DEC_METASPACE };

typedef struct {
    int          type;
    char        *pat;         /* Replace: literal */
    size_t       patlen;
    char        *content;     /* Replace: content */
    size_t       contentlen;
    uint32_t     strip_char;
    int          start;
    int          stop;
    uint32_t     replacement; /* Metaspace */
    int          scheme;
} dec_step_t;

typedef struct {
    const char  *s;           /* content */
    size_t       len;
    const char  *ns;          /* normalized content (normalized tokens) */
    size_t       nlen;
    int32_t      id;
    unsigned     single_word:1;
    unsigned     lstrip:1;
    unsigned     rstrip:1;
    unsigned     normalized:1;
    unsigned     special:1;
} added_t;

/* index of added tokens by first byte, longest first */
typedef struct {
    int32_t     *idx;         /* (n) indices into t->added */
    uint32_t     start[257];  /* bucket b: idx[start[b] .. start[b+1]) */
    int          n;
} added_index_t;

typedef struct {
    int          is_seq;      /* 1: the input sequence, 0: fixed ids */
    int32_t     *ids;
    int          n;
} tpl_item_t;

#define ID_ADDED    1
#define ID_SPECIAL  2

struct moe_tokenizer {
    arena_blk_t   *arena;

    /* id -> token string (added content overrides the vocab string) */
    int32_t        n_ids;           /* max id + 1 */
    const char   **id_str;          /* (n_ids) NULL for holes */
    uint32_t      *id_len;          /* (n_ids) */
    uint8_t       *id_flags;        /* (n_ids) ID_* */
    int16_t       *id_byte;         /* (n_ids) byte of a <0xNN> token or -1 */

    /* model */
    const char   **vocab_str;       /* (n_ids) model vocab strings only */
    uint32_t      *vocab_len;
    strmap_t       vocab;           /* model vocab string -> id */
    pairmap_t      merges;
    int            ignore_merges;
    int            byte_fallback;
    int            fuse_unk;
    int32_t        unk_id;          /* -1: none */
    char          *cont_prefix;     /* continuing_subword_prefix or NULL */
    size_t         cont_prefix_len;
    char          *eow_suffix;      /* end_of_word_suffix or NULL */
    size_t         eow_suffix_len;
    int32_t        byte_id[256];    /* <0xNN> ids for byte_fallback, -1 */

    /* pipeline */
    norm_step_t   *norm;
    int            n_norm;
    pre_step_t    *pre;
    int            n_pre;
    dec_step_t    *dec;
    int            n_dec;
    int            has_decoder;
    int            dec_byte_fallback;
    tpl_item_t    *tpl;             /* TemplateProcessing single */
    int            n_tpl;

    added_t       *added;
    int            n_added;
    added_index_t  raw_idx;         /* normalized == false */
    added_index_t  norm_idx;        /* normalized == true */
    pcre2_code    *re_word_end;     /* \w$  (single_word) */
    pcre2_code    *re_word_start;   /* ^\w */

    /* tokenizer_config.json */
    char          *bos_token;
    char          *eos_token;
    char          *chat_template;
    int            add_bos;
    int            add_eos;
};

/* GPT-2 byte <-> unicode map */
static char      bl_enc[256][3];    /* UTF-8 of the char for byte b */
static uint8_t   bl_enc_len[256];
static int16_t   bl_dec[0x144];     /* code point -> byte, -1 */
static pthread_once_t bl_once = PTHREAD_ONCE_INIT;

static void
bytelevel_build(void)
{
    int      b, n = 0;
    uint32_t cp;

    for (b = 0; b < 0x144; b++) {
        bl_dec[b] = -1;
    }
    for (b = 0; b < 256; b++) {
        if ((b >= '!' && b <= '~') || (b >= 0xa1 && b <= 0xac)
            || (b >= 0xae && b <= 0xff))
        {
            cp = (uint32_t) b;
        } else {
            cp = 256 + (uint32_t) n++;
        }
        bl_enc_len[b] = (uint8_t) moe_utf8_encode(cp, bl_enc[b]);
        bl_dec[cp] = (int16_t) b;
    }
}

static const char GPT2_RE[] =
    "'s|'t|'re|'ve|'m|'ll|'d| ?\\p{L}+| ?\\p{N}+| ?[^\\s\\p{L}\\p{N}]+"
    "|\\s+(?!\\S)|\\s+";


/* -------------------------------------------------------- map functions */

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

static int
strmap_init(strmap_t *m, size_t n)
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

static int32_t
vocab_get(const moe_tokenizer_t *t, const char *s, size_t n)
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
static void
vocab_put(moe_tokenizer_t *t, int32_t id)
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

static int
pairmap_init(pairmap_t *m, size_t n)
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

static void
pairmap_put(pairmap_t *m, int32_t a, int32_t b, uint32_t rank, int32_t nid)
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

static int
pairmap_get(const pairmap_t *m, int32_t a, int32_t b, uint32_t *rank,
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


/* ---------------------------------------------------------- JSON helpers */

static yajl_val
jget(yajl_val obj, const char *key)
{
    size_t i;

    if (!YAJL_IS_OBJECT(obj)) {
        return NULL;
    }
    for (i = 0; i < obj->u.object.len; i++) {
        if (strcmp(obj->u.object.keys[i], key) == 0) {
            return obj->u.object.values[i];
        }
    }
    return NULL;
}

static const char *
jstr(yajl_val obj, const char *key)
{
    return YAJL_GET_STRING(jget(obj, key));
}

static int
jbool(yajl_val obj, const char *key, int dflt)
{
    yajl_val v = jget(obj, key);

    if (YAJL_IS_TRUE(v)) {
        return 1;
    }
    if (YAJL_IS_FALSE(v)) {
        return 0;
    }
    return dflt;
}

static long long
jint(yajl_val obj, const char *key, long long dflt)
{
    yajl_val v = jget(obj, key);

    return YAJL_IS_INTEGER(v) ? YAJL_GET_INTEGER(v) : dflt;
}


static pcre2_code *
re_compile(const char *pat, char *err, size_t errlen)
{
    pcre2_code  *re;
    int          ec;
    PCRE2_SIZE   eo;
    PCRE2_UCHAR  msg[128];

    re = pcre2_compile((PCRE2_SPTR) pat, PCRE2_ZERO_TERMINATED,
                       PCRE2_UTF | PCRE2_UCP, &ec, &eo, NULL);
    if (re == NULL) {
        pcre2_get_error_message(ec, msg, sizeof(msg));
        moe_errf(err, errlen, "regex /%s/ at %zu: %s", pat, (size_t) eo,
                (char *) msg);
        return NULL;
    }
    (void) pcre2_jit_compile(re, PCRE2_JIT_COMPLETE);   /* optional */
    return re;
}


/* -------------------------------------------------------------- loading */

static int
load_vocab(moe_tokenizer_t *t, yajl_val model, yajl_val added, char *err,
    size_t errlen)
{
    yajl_val    vocab = jget(model, "vocab");
    size_t      i, nv;
    long long   id, max_id = -1;

    if (!YAJL_IS_OBJECT(vocab)) {
        moe_errf(err, errlen, "model.vocab missing or not an object");
        return MOE_EFORMAT;
    }
    nv = vocab->u.object.len;
    for (i = 0; i < nv; i++) {
        yajl_val v = vocab->u.object.values[i];
        if (!YAJL_IS_INTEGER(v) || YAJL_GET_INTEGER(v) < 0
            || YAJL_GET_INTEGER(v) > 0x7fffffff)
        {
            moe_errf(err, errlen, "model.vocab[\"%s\"]: bad id",
                    vocab->u.object.keys[i]);
            return MOE_EFORMAT;
        }
        if (YAJL_GET_INTEGER(v) > max_id) {
            max_id = YAJL_GET_INTEGER(v);
        }
    }
    if (YAJL_IS_ARRAY(added)) {
        for (i = 0; i < added->u.array.len; i++) {
            id = jint(added->u.array.values[i], "id", -1);
            if (id < 0 || id > 0x7fffffff
                || jstr(added->u.array.values[i], "content") == NULL)
            {
                moe_errf(err, errlen, "added_tokens[%zu]: bad id or content",
                        i);
                return MOE_EFORMAT;
            }
            if (id > max_id) {
                max_id = id;
            }
        }
    }
    if (max_id > 16 * 1024 * 1024) {
        moe_errf(err, errlen, "token id %lld too large", max_id);
        return MOE_EFORMAT;
    }
    t->n_ids = (int32_t) (max_id + 1);
    t->id_str = calloc((size_t) t->n_ids, sizeof(*t->id_str));
    t->id_len = calloc((size_t) t->n_ids, sizeof(*t->id_len));
    t->id_flags = calloc((size_t) t->n_ids, sizeof(*t->id_flags));
    t->id_byte = malloc((size_t) t->n_ids * sizeof(*t->id_byte));
    t->vocab_str = calloc((size_t) t->n_ids, sizeof(*t->vocab_str));
    t->vocab_len = calloc((size_t) t->n_ids, sizeof(*t->vocab_len));
    if (!t->id_str || !t->id_len || !t->id_flags || !t->id_byte
        || !t->vocab_str || !t->vocab_len || strmap_init(&t->vocab, nv) != 0)
    {
        return MOE_ENOMEM;
    }
    for (i = 0; i < nv; i++) {
        const char *k = vocab->u.object.keys[i];
        size_t      kl = strlen(k);
        char       *s = arena_strdup(&t->arena, k, kl);
        int32_t     vid = (int32_t) YAJL_GET_INTEGER(vocab->u.object.values[i]);

        if (s == NULL) {
            return MOE_ENOMEM;
        }
        t->vocab_str[vid] = s;
        t->vocab_len[vid] = (uint32_t) kl;
        t->id_str[vid] = s;
        t->id_len[vid] = (uint32_t) kl;
        vocab_put(t, vid);
    }
    return MOE_OK;
}

static int
load_merges(moe_tokenizer_t *t, yajl_val model, char *err, size_t errlen)
{
    yajl_val     merges = jget(model, "merges");
    size_t       i, n, la, lb;
    const char  *a, *b, *sp;
    int32_t      ia, ib, in;
    tbuf_t       cat = {0};

    if (merges == NULL || YAJL_IS_NULL(merges)) {
        return MOE_OK;
    }
    if (!YAJL_IS_ARRAY(merges)) {
        moe_errf(err, errlen, "model.merges is not an array");
        return MOE_EFORMAT;
    }
    n = merges->u.array.len;
    if (pairmap_init(&t->merges, n) != 0) {
        return MOE_ENOMEM;
    }
    for (i = 0; i < n; i++) {
        yajl_val m = merges->u.array.values[i];

        if (YAJL_IS_STRING(m)) {
            a = m->u.string;
            sp = strchr(a, ' ');
            if (sp == NULL || strchr(sp + 1, ' ') != NULL) {
                moe_errf(err, errlen, "merges[%zu] \"%s\": not \"a b\"", i, a);
                tb_free(&cat);
                return MOE_EFORMAT;
            }
            la = (size_t) (sp - a);
            b = sp + 1;
            lb = strlen(b);
        } else if (YAJL_IS_ARRAY(m) && m->u.array.len == 2
                   && YAJL_IS_STRING(m->u.array.values[0])
                   && YAJL_IS_STRING(m->u.array.values[1]))
        {
            a = m->u.array.values[0]->u.string;
            b = m->u.array.values[1]->u.string;
            la = strlen(a);
            lb = strlen(b);
        } else {
            moe_errf(err, errlen, "merges[%zu]: neither \"a b\" nor [a, b]", i);
            tb_free(&cat);
            return MOE_EFORMAT;
        }
        ia = vocab_get(t, a, la);
        ib = vocab_get(t, b, lb);
        cat.len = 0;
        if (tb_put(&cat, a, la) != 0) {
            tb_free(&cat);
            return MOE_ENOMEM;
        }
        /* the merged token drops b's continuing_subword_prefix */
        if (t->cont_prefix && lb >= t->cont_prefix_len
            && memcmp(b, t->cont_prefix, t->cont_prefix_len) == 0)
        {
            if (tb_put(&cat, b + t->cont_prefix_len,
                       lb - t->cont_prefix_len) != 0)
            {
                tb_free(&cat);
                return MOE_ENOMEM;
            }
        } else if (tb_put(&cat, b, lb) != 0) {
            tb_free(&cat);
            return MOE_ENOMEM;
        }
        in = vocab_get(t, cat.p, cat.len);
        if (ia < 0 || ib < 0 || in < 0) {
            moe_errf(err, errlen, "merges[%zu]: token not in vocab", i);
            tb_free(&cat);
            return MOE_EFORMAT;
        }
        pairmap_put(&t->merges, ia, ib, (uint32_t) i, in);
    }
    tb_free(&cat);
    return MOE_OK;
}

static int
parse_pattern(yajl_val pat, const char **lit, const char **regex)
{
    *lit = jstr(pat, "String");
    *regex = jstr(pat, "Regex");
    return (*lit || *regex) ? 0 : -1;
}

/*
 * A kind of pipeline component: normalizer, pre_tokenizer, decoder or
 * post_processor.  All four share the JSON shape {"type": T, ...} where a
 * T of "Sequence" lists its members under the kind's own key; add_steps()
 * does that part once, so a kind's fill() handles only its leaf types.
 */
typedef struct {
    const char  *name;        /* in error messages: "normalizer" */
    const char  *list_key;    /* a Sequence's members: "normalizers" */
    size_t       size;        /* one step; 0: the kind keeps no step array */

    /* fill the zeroed step (NULL when size is 0) from leaf node n */
    int        (*fill)(moe_tokenizer_t *t, yajl_val n, const char *type,
                       void *step, char *err, size_t errlen);
} step_kind_t;

/*
 * Flatten node n (absent or null: nothing) of kind k into the array *steps
 * of *n_steps steps.  A step is counted only when its fill() succeeds, so on
 * failure *steps still holds *n_steps complete steps for the caller to free.
 */
static int
add_steps(moe_tokenizer_t *t, yajl_val n, const step_kind_t *k, void **steps,
    int *n_steps, char *err, size_t errlen)
{
    const char  *type = jstr(n, "type");
    yajl_val     list;
    size_t       i;
    char        *s;
    int          rc;

    if (n == NULL || YAJL_IS_NULL(n)) {
        return MOE_OK;
    }
    if (type == NULL) {
        moe_errf(err, errlen, "%s without type", k->name);
        return MOE_EFORMAT;
    }
    if (strcmp(type, "Sequence") == 0) {
        list = jget(n, k->list_key);
        if (!YAJL_IS_ARRAY(list)) {
            moe_errf(err, errlen, "%s Sequence without %s", k->name,
                    k->list_key);
            return MOE_EFORMAT;
        }
        for (i = 0; i < list->u.array.len; i++) {
            rc = add_steps(t, list->u.array.values[i], k, steps, n_steps,
                           err, errlen);
            if (rc != MOE_OK) {
                return rc;
            }
        }
        return MOE_OK;
    }
    if (k->size == 0) {
        return k->fill(t, n, type, NULL, err, errlen);
    }
    s = realloc(*steps, (size_t) (*n_steps + 1) * k->size);
    if (s == NULL) {
        return MOE_ENOMEM;
    }
    *steps = s;
    s += (size_t) *n_steps * k->size;
    memset(s, 0, k->size);
    rc = k->fill(t, n, type, s, err, errlen);
    if (rc == MOE_OK) {
        (*n_steps)++;
    }
    return rc;
}

static int
fill_norm(moe_tokenizer_t *t, yajl_val n, const char *type, void *step,
    char *err, size_t errlen)
{
    norm_step_t  *s = step;

    if (strcmp(type, "Prepend") == 0) {
        const char *p = jstr(n, "prepend");
        if (p == NULL) {
            moe_errf(err, errlen, "normalizer Prepend without prepend");
            return MOE_EFORMAT;
        }
        s->type = NORM_PREPEND;
        s->alen = strlen(p);
        s->a = arena_strdup(&t->arena, p, s->alen);
    } else if (strcmp(type, "Replace") == 0) {
        const char *lit, *rx, *c = jstr(n, "content");
        if (parse_pattern(jget(n, "pattern"), &lit, &rx) != 0 || c == NULL) {
            moe_errf(err, errlen, "normalizer Replace: bad pattern/content");
            return MOE_EFORMAT;
        }
        s->type = NORM_REPLACE;
        if (lit) {
            s->alen = strlen(lit);
            s->a = arena_strdup(&t->arena, lit, s->alen);
        } else {
            s->re = re_compile(rx, err, errlen);
            if (s->re == NULL) {
                return MOE_EFORMAT;
            }
        }
        s->blen = strlen(c);
        s->b = arena_strdup(&t->arena, c, s->blen);
    } else if (strcmp(type, "NFC") == 0) {
        s->type = NORM_UNICODE;
        s->uform = UTF8PROC_STABLE | UTF8PROC_COMPOSE;
    } else if (strcmp(type, "NFD") == 0) {
        s->type = NORM_UNICODE;
        s->uform = UTF8PROC_STABLE | UTF8PROC_DECOMPOSE;
    } else if (strcmp(type, "NFKC") == 0) {
        s->type = NORM_UNICODE;
        s->uform = UTF8PROC_STABLE | UTF8PROC_COMPOSE | UTF8PROC_COMPAT;
    } else if (strcmp(type, "NFKD") == 0) {
        s->type = NORM_UNICODE;
        s->uform = UTF8PROC_STABLE | UTF8PROC_DECOMPOSE | UTF8PROC_COMPAT;
    } else {
        moe_errf(err, errlen, "normalizer %s not supported", type);
        return MOE_EUNSUPPORTED;
    }
    return MOE_OK;
}

static int
scheme_of(yajl_val n)
{
    const char *sc = jstr(n, "prepend_scheme");

    if (sc == NULL) {   /* older files: add_prefix_space */
        return jbool(n, "add_prefix_space", 1) ? SCHEME_ALWAYS : SCHEME_NEVER;
    }
    if (strcmp(sc, "first") == 0) {
        return SCHEME_FIRST;
    }
    if (strcmp(sc, "never") == 0) {
        return SCHEME_NEVER;
    }
    return SCHEME_ALWAYS;
}

static int
fill_pre(moe_tokenizer_t *t, yajl_val n, const char *type, void *step,
    char *err, size_t errlen)
{
    pre_step_t  *s = step;

    if (strcmp(type, "Split") == 0) {
        const char *lit, *rx, *beh = jstr(n, "behavior");
        if (parse_pattern(jget(n, "pattern"), &lit, &rx) != 0 || beh == NULL) {
            moe_errf(err, errlen, "pre_tokenizer Split: bad pattern/behavior");
            return MOE_EFORMAT;
        }
        s->type = PRE_SPLIT;
        if (lit) {
            s->litlen = strlen(lit);
            s->lit = arena_strdup(&t->arena, lit, s->litlen);
            if (s->litlen == 0) {
                moe_errf(err, errlen, "pre_tokenizer Split: empty pattern");
                return MOE_EFORMAT;
            }
        } else {
            s->re = re_compile(rx, err, errlen);
            if (s->re == NULL) {
                return MOE_EFORMAT;
            }
        }
        if (strcmp(beh, "Removed") == 0) {
            s->behavior = BEH_REMOVED;
        } else if (strcmp(beh, "Isolated") == 0) {
            s->behavior = BEH_ISOLATED;
        } else if (strcmp(beh, "MergedWithPrevious") == 0) {
            s->behavior = BEH_PREV;
        } else if (strcmp(beh, "MergedWithNext") == 0) {
            s->behavior = BEH_NEXT;
        } else if (strcmp(beh, "Contiguous") == 0) {
            s->behavior = BEH_CONTIGUOUS;
        } else {
            moe_errf(err, errlen, "pre_tokenizer Split: behavior %s", beh);
            pcre2_code_free(s->re);     /* the step is not counted */
            return MOE_EFORMAT;
        }
        s->invert = jbool(n, "invert", 0);
    } else if (strcmp(type, "ByteLevel") == 0) {
        s->type = PRE_BYTELEVEL;
        s->add_prefix_space = jbool(n, "add_prefix_space", 1);
        s->use_regex = jbool(n, "use_regex", 1);
        if (s->use_regex) {
            s->re = re_compile(GPT2_RE, err, errlen);
            if (s->re == NULL) {
                return MOE_EFORMAT;
            }
        }
    } else if (strcmp(type, "Metaspace") == 0) {
        const char *r = jstr(n, "replacement");
        s->type = PRE_METASPACE;
        if (r == NULL || strlen(r) == 0 || strlen(r) > 4) {
            moe_errf(err, errlen, "pre_tokenizer Metaspace: bad replacement");
            return MOE_EFORMAT;
        }
        s->replen = strlen(r);
        memcpy(s->rep, r, s->replen);
        s->scheme = scheme_of(n);
        s->split = jbool(n, "split", 1);
    } else if (strcmp(type, "Digits") == 0) {
        s->type = PRE_DIGITS;
        s->individual_digits = jbool(n, "individual_digits", 0);
        s->re = re_compile(s->individual_digits ? "\\p{N}" : "\\p{N}+",
                           err, errlen);
        if (s->re == NULL) {
            return MOE_EFORMAT;
        }
        s->behavior = BEH_ISOLATED;
    } else {
        moe_errf(err, errlen, "pre_tokenizer %s not supported", type);
        return MOE_EUNSUPPORTED;
    }
    return MOE_OK;
}

static int
fill_dec(moe_tokenizer_t *t, yajl_val n, const char *type, void *step,
    char *err, size_t errlen)
{
    dec_step_t  *s = step;
    size_t       cl;

    if (strcmp(type, "ByteLevel") == 0) {
        s->type = DEC_BYTELEVEL;
    } else if (strcmp(type, "Replace") == 0) {
        const char *lit, *rx, *c = jstr(n, "content");
        if (parse_pattern(jget(n, "pattern"), &lit, &rx) != 0 || c == NULL
            || lit == NULL || lit[0] == '\0')
        {
            moe_errf(err, errlen, "decoder Replace: only non-empty String "
                    "patterns are supported");
            return MOE_EUNSUPPORTED;
        }
        s->type = DEC_REPLACE;
        s->patlen = strlen(lit);
        s->pat = arena_strdup(&t->arena, lit, s->patlen);
        s->contentlen = strlen(c);
        s->content = arena_strdup(&t->arena, c, s->contentlen);
    } else if (strcmp(type, "ByteFallback") == 0) {
        s->type = DEC_BYTEFALLBACK;
        t->dec_byte_fallback = 1;
    } else if (strcmp(type, "Fuse") == 0) {
        s->type = DEC_FUSE;
    } else if (strcmp(type, "Strip") == 0) {
        const char *c = jstr(n, "content");
        s->type = DEC_STRIP;
        if (c == NULL || c[0] == '\0') {
            moe_errf(err, errlen, "decoder Strip without content");
            return MOE_EFORMAT;
        }
        s->strip_char = u8dec(c, strlen(c), &cl);
        s->start = (int) jint(n, "start", 0);
        s->stop = (int) jint(n, "stop", 0);
    } else if (strcmp(type, "Metaspace") == 0) {
        const char *r = jstr(n, "replacement");
        s->type = DEC_METASPACE;
        if (r == NULL || r[0] == '\0') {
            moe_errf(err, errlen, "decoder Metaspace: bad replacement");
            return MOE_EFORMAT;
        }
        s->replacement = u8dec(r, strlen(r), &cl);
        s->scheme = scheme_of(n);
    } else {
        moe_errf(err, errlen, "decoder %s not supported", type);
        return MOE_EUNSUPPORTED;
    }
    return MOE_OK;
}

/* Post-processors keep no steps: only a TemplateProcessing changes ids. */
static int
fill_post(moe_tokenizer_t *t, yajl_val n, const char *type, void *step,
    char *err, size_t errlen)
{
    yajl_val     list, specials, item, sp, ids;
    size_t       i, j;

    (void) step;
    if (strcmp(type, "ByteLevel") == 0) {
        return MOE_OK;                  /* offsets only; ids unchanged */
    }
    if (strcmp(type, "TemplateProcessing") != 0) {
        moe_errf(err, errlen, "post_processor %s not supported", type);
        return MOE_EUNSUPPORTED;
    }
    if (t->tpl != NULL) {
        moe_errf(err, errlen, "two TemplateProcessing post_processors");
        return MOE_EUNSUPPORTED;
    }
    list = jget(n, "single");
    specials = jget(n, "special_tokens");
    if (!YAJL_IS_ARRAY(list)) {
        moe_errf(err, errlen, "TemplateProcessing without single");
        return MOE_EFORMAT;
    }
    t->tpl = calloc(list->u.array.len + 1, sizeof(*t->tpl));
    if (t->tpl == NULL) {
        return MOE_ENOMEM;
    }
    for (i = 0; i < list->u.array.len; i++) {
        item = list->u.array.values[i];
        if (jget(item, "Sequence") != NULL) {
            t->tpl[t->n_tpl++].is_seq = 1;
            continue;
        }
        sp = jget(item, "SpecialToken");
        ids = jget(jget(specials, jstr(sp, "id") ? jstr(sp, "id") : ""),
                   "ids");
        if (!YAJL_IS_ARRAY(ids)) {
            moe_errf(err, errlen, "TemplateProcessing: special token %s "
                    "not in special_tokens", jstr(sp, "id") ? jstr(sp, "id")
                    : "?");
            return MOE_EFORMAT;
        }
        t->tpl[t->n_tpl].ids = malloc((ids->u.array.len + 1)
                                      * sizeof(int32_t));
        if (t->tpl[t->n_tpl].ids == NULL) {
            return MOE_ENOMEM;
        }
        for (j = 0; j < ids->u.array.len; j++) {
            yajl_val v = ids->u.array.values[j];
            if (!YAJL_IS_INTEGER(v)) {
                moe_errf(err, errlen, "TemplateProcessing: bad id");
                return MOE_EFORMAT;
            }
            t->tpl[t->n_tpl].ids[j] = (int32_t) YAJL_GET_INTEGER(v);
        }
        t->tpl[t->n_tpl].n = (int) j;
        t->n_tpl++;
    }
    return MOE_OK;
}

static const step_kind_t  norm_kind = {
    "normalizer", "normalizers", sizeof(norm_step_t), fill_norm
};
static const step_kind_t  pre_kind = {
    "pre_tokenizer", "pretokenizers", sizeof(pre_step_t), fill_pre
};
static const step_kind_t  dec_kind = {
    "decoder", "decoders", sizeof(dec_step_t), fill_dec
};
static const step_kind_t  post_kind = {
    "post_processor", "processors", 0, fill_post
};

/*
 * Load the normalizer, pre-tokenizer, decoder and post-processor chains.
 * The step arrays pass through a void * so that add_steps() can grow any of
 * them; t takes each array back even on failure, for moe_tokenizer_free().
 */
static int
load_pipeline(moe_tokenizer_t *t, yajl_val root, char *err, size_t errlen)
{
    void      *norm = NULL, *pre = NULL, *dec = NULL;
    yajl_val   d = jget(root, "decoder");
    int        rc;

    rc = add_steps(t, jget(root, "normalizer"), &norm_kind, &norm, &t->n_norm,
                   err, errlen);
    t->norm = norm;
    if (rc != MOE_OK) {
        return rc;
    }
    rc = add_steps(t, jget(root, "pre_tokenizer"), &pre_kind, &pre,
                   &t->n_pre, err, errlen);
    t->pre = pre;
    if (rc != MOE_OK) {
        return rc;
    }
    t->has_decoder = d != NULL && !YAJL_IS_NULL(d);
    rc = add_steps(t, d, &dec_kind, &dec, &t->n_dec, err, errlen);
    t->dec = dec;
    if (rc != MOE_OK) {
        return rc;
    }
    return add_steps(t, jget(root, "post_processor"), &post_kind, NULL, NULL,
                     err, errlen);
}

static int normalize_piece(const moe_tokenizer_t *t, const char *s, size_t n,
    tbuf_t *out, tbuf_t *tmp);

static int
cmp_added_len(const void *a, const void *b, void *arg)
{
    const moe_tokenizer_t *t = arg;
    const added_t         *x = &t->added[*(const int32_t *) a];
    const added_t         *y = &t->added[*(const int32_t *) b];
    size_t                 lx = x->normalized ? x->nlen : x->len;
    size_t                 ly = y->normalized ? y->nlen : y->len;

    if (lx != ly) {
        return lx > ly ? -1 : 1;
    }
    return *(const int32_t *) a - *(const int32_t *) b;
}

static int
build_added_index(moe_tokenizer_t *t, added_index_t *ix, int normalized)
{
    int       i, n = 0;
    uint32_t  count[257] = {0};
    uint32_t  pos[256];
    unsigned  c;

    for (i = 0; i < t->n_added; i++) {
        const added_t *a = &t->added[i];
        if ((int) a->normalized != normalized) {
            continue;
        }
        if ((normalized ? a->nlen : a->len) == 0) {
            continue;
        }
        n++;
    }
    ix->idx = malloc(((size_t) n + 1) * sizeof(*ix->idx));
    if (ix->idx == NULL) {
        return -1;
    }
    ix->n = n;
    n = 0;
    for (i = 0; i < t->n_added; i++) {
        const added_t *a = &t->added[i];
        if ((int) a->normalized != normalized
            || (normalized ? a->nlen : a->len) == 0)
        {
            continue;
        }
        ix->idx[n++] = i;
    }
    qsort_r(ix->idx, (size_t) n, sizeof(*ix->idx), cmp_added_len, t);
    /* stable bucket by first byte, keeping longest-first order */
    for (i = 0; i < n; i++) {
        const added_t *a = &t->added[ix->idx[i]];
        c = (unsigned char) (normalized ? a->ns[0] : a->s[0]);
        count[c + 1]++;
    }
    for (c = 0; c < 256; c++) {
        count[c + 1] += count[c];
    }
    memcpy(ix->start, count, sizeof(count));
    {
        int32_t *tmp = malloc(((size_t) n + 1) * sizeof(*tmp));
        if (tmp == NULL) {
            return -1;
        }
        memcpy(pos, count, sizeof(pos));
        for (i = 0; i < n; i++) {
            const added_t *a = &t->added[ix->idx[i]];
            c = (unsigned char) (normalized ? a->ns[0] : a->s[0]);
            tmp[pos[c]++] = ix->idx[i];
        }
        memcpy(ix->idx, tmp, (size_t) n * sizeof(*tmp));
        free(tmp);
    }
    return 0;
}

static int
load_added(moe_tokenizer_t *t, yajl_val added, char *err, size_t errlen)
{
    size_t   i;
    tbuf_t   nb = {0}, tmp = {0};
    int      any_norm = 0;

    if (!YAJL_IS_ARRAY(added) || added->u.array.len == 0) {
        return MOE_OK;
    }
    t->added = calloc(added->u.array.len, sizeof(*t->added));
    if (t->added == NULL) {
        return MOE_ENOMEM;
    }
    for (i = 0; i < added->u.array.len; i++) {
        yajl_val    a = added->u.array.values[i];
        const char *c = jstr(a, "content");
        added_t    *d = &t->added[t->n_added++];
        int32_t     id = (int32_t) jint(a, "id", -1);

        d->len = strlen(c);
        d->s = arena_strdup(&t->arena, c, d->len);
        if (d->s == NULL) {
            return MOE_ENOMEM;
        }
        d->id = id;
        d->single_word = jbool(a, "single_word", 0);
        d->lstrip = jbool(a, "lstrip", 0);
        d->rstrip = jbool(a, "rstrip", 0);
        d->special = jbool(a, "special", 0);
        d->normalized = jbool(a, "normalized", !d->special);
        t->id_str[id] = d->s;
        t->id_len[id] = (uint32_t) d->len;
        t->id_flags[id] |= ID_ADDED | (d->special ? ID_SPECIAL : 0);
        if (d->single_word) {
            any_norm |= 2;
        }
    }
    /* normalized tokens are matched by their normalized form */
    for (i = 0; i < (size_t) t->n_added; i++) {
        added_t *d = &t->added[i];
        if (!d->normalized) {
            continue;
        }
        any_norm |= 1;
        nb.len = 0;
        if (normalize_piece(t, d->s, d->len, &nb, &tmp) != 0) {
            tb_free(&nb);
            tb_free(&tmp);
            return MOE_ENOMEM;
        }
        d->nlen = nb.len;
        d->ns = arena_strdup(&t->arena, nb.p ? nb.p : "", nb.len);
        if (d->ns == NULL) {
            tb_free(&nb);
            tb_free(&tmp);
            return MOE_ENOMEM;
        }
    }
    tb_free(&nb);
    tb_free(&tmp);
    if (build_added_index(t, &t->raw_idx, 0) != 0
        || build_added_index(t, &t->norm_idx, 1) != 0)
    {
        return MOE_ENOMEM;
    }
    if (any_norm & 2) {
        t->re_word_end = re_compile("\\w$", err, errlen);
        t->re_word_start = re_compile("^\\w", err, errlen);
        if (t->re_word_end == NULL || t->re_word_start == NULL) {
            return MOE_EFORMAT;
        }
    }
    return MOE_OK;
}

static char *
config_token(moe_tokenizer_t *t, yajl_val cfg, const char *key)
{
    yajl_val    v = jget(cfg, key);
    const char *s = YAJL_GET_STRING(v);

    if (s == NULL && YAJL_IS_OBJECT(v)) {
        s = jstr(v, "content");
    }
    return s ? arena_strdup(&t->arena, s, strlen(s)) : NULL;
}

static void
load_config(moe_tokenizer_t *t, const char *json_path)
{
    char        path[MOE_PATH_MAX + 32];
    const char *slash = strrchr(json_path, '/');
    size_t      dl = slash ? (size_t) (slash - json_path + 1) : 0, len, i;
    char       *buf;
    yajl_val    cfg, ct;

    if (dl + sizeof("tokenizer_config.json") > sizeof(path)) {
        return;
    }
    memcpy(path, json_path, dl);
    memcpy(path + dl, "tokenizer_config.json", sizeof("tokenizer_config.json"));
    buf = moe_read_file(path, &len);
    if (buf == NULL) {
        return;
    }
    cfg = yajl_tree_parse(buf, NULL, 0);
    free(buf);
    if (cfg == NULL) {
        return;       /* optional file: a broken one is ignored */
    }
    t->bos_token = config_token(t, cfg, "bos_token");
    t->eos_token = config_token(t, cfg, "eos_token");
    t->add_bos = jbool(cfg, "add_bos_token", -1);
    t->add_eos = jbool(cfg, "add_eos_token", -1);
    ct = jget(cfg, "chat_template");
    if (YAJL_IS_STRING(ct)) {
        t->chat_template = arena_strdup(&t->arena, ct->u.string,
                                        strlen(ct->u.string));
    } else if (YAJL_IS_ARRAY(ct)) {
        for (i = 0; i < ct->u.array.len; i++) {
            yajl_val e = ct->u.array.values[i];
            const char *nm = jstr(e, "name"), *tp = jstr(e, "template");
            if (nm && tp && strcmp(nm, "default") == 0) {
                t->chat_template = arena_strdup(&t->arena, tp, strlen(tp));
            }
        }
    }
    yajl_tree_free(cfg);
}

int
moe_tokenizer_load(const char *tokenizer_json_path, moe_tokenizer_t **out,
    char *err, size_t errlen)
{
    moe_tokenizer_t *t;
    char            *buf;
    size_t           len;
    yajl_val         root, model, added;
    const char      *type, *s;
    char             ebuf[256];
    int              rc, b;

    *out = NULL;
    if (tokenizer_json_path == NULL) {
        moe_errf(err, errlen, "no tokenizer path");
        return MOE_EINVAL;
    }
    (void) pthread_once(&bl_once, bytelevel_build);
    buf = moe_read_file(tokenizer_json_path, &len);
    if (buf == NULL) {
        moe_errf(err, errlen, "%s: %s", tokenizer_json_path, strerror(errno));
        return MOE_EIO;
    }
    ebuf[0] = '\0';
    root = yajl_tree_parse(buf, ebuf, sizeof(ebuf));
    free(buf);
    if (root == NULL) {
        ebuf[strcspn(ebuf, "\n")] = '\0';     /* yajl adds a context dump */
        moe_errf(err, errlen, "%s: bad JSON: %.200s", tokenizer_json_path,
                ebuf);
        return MOE_EFORMAT;
    }
    t = calloc(1, sizeof(*t));
    if (t == NULL) {
        yajl_tree_free(root);
        return MOE_ENOMEM;
    }
    t->unk_id = -1;
    t->add_bos = t->add_eos = -1;
    model = jget(root, "model");
    added = jget(root, "added_tokens");
    type = jstr(model, "type");
    if (type == NULL && YAJL_IS_OBJECT(jget(model, "merges"))) {
        type = "BPE";
    }
    if (type == NULL || strcmp(type, "BPE") != 0) {
        moe_errf(err, errlen, "%s: model type %s not supported (BPE only)",
                tokenizer_json_path, type ? type : "(none)");
        rc = type ? MOE_EUNSUPPORTED : MOE_EFORMAT;
        goto fail;
    }
    if ((s = jstr(model, "continuing_subword_prefix")) != NULL && s[0]) {
        t->cont_prefix_len = strlen(s);
        t->cont_prefix = arena_strdup(&t->arena, s, t->cont_prefix_len);
    }
    if ((s = jstr(model, "end_of_word_suffix")) != NULL && s[0]) {
        t->eow_suffix_len = strlen(s);
        t->eow_suffix = arena_strdup(&t->arena, s, t->eow_suffix_len);
    }
    t->ignore_merges = jbool(model, "ignore_merges", 0);
    t->byte_fallback = jbool(model, "byte_fallback", 0);
    t->fuse_unk = jbool(model, "fuse_unk", 0);
    rc = load_vocab(t, model, added, err, errlen);
    if (rc != MOE_OK) {
        goto fail;
    }
    if ((s = jstr(model, "unk_token")) != NULL) {
        t->unk_id = vocab_get(t, s, strlen(s));
    }
    for (b = 0; b < 256; b++) {
        char nm[8];
        snprintf(nm, sizeof(nm), "<0x%02X>", b);
        t->byte_id[b] = vocab_get(t, nm, 6);
    }
    rc = load_merges(t, model, err, errlen);
    if (rc == MOE_OK) {
        rc = load_pipeline(t, root, err, errlen);
    }
    if (rc == MOE_OK) {
        rc = load_added(t, added, err, errlen);
    }
    if (rc != MOE_OK) {
        goto fail;
    }
    for (b = 0; b < t->n_ids; b++) {
        t->id_byte[b] = (int16_t) (t->id_str[b]
                                   ? byte_token_value(t->id_str[b],
                                                      t->id_len[b])
                                   : -1);
    }
    yajl_tree_free(root);
    load_config(t, tokenizer_json_path);
    *out = t;
    return MOE_OK;

fail:
    if (rc == MOE_ENOMEM) {
        moe_errf(err, errlen, "%s: out of memory", tokenizer_json_path);
    }
    yajl_tree_free(root);
    moe_tokenizer_free(t);
    return rc;
}

void
moe_tokenizer_free(moe_tokenizer_t *t)
{
    int i;

    if (t == NULL) {
        return;
    }
    for (i = 0; i < t->n_norm; i++) {
        pcre2_code_free(t->norm[i].re);
    }
    for (i = 0; i < t->n_pre; i++) {
        pcre2_code_free(t->pre[i].re);
    }
    for (i = 0; i < t->n_tpl; i++) {
        free(t->tpl[i].ids);
    }
    pcre2_code_free(t->re_word_end);
    pcre2_code_free(t->re_word_start);
    free(t->norm);
    free(t->pre);
    free(t->dec);
    free(t->tpl);
    free(t->added);
    free(t->raw_idx.idx);
    free(t->norm_idx.idx);
    free(t->id_str);
    free(t->id_len);
    free(t->id_flags);
    free(t->id_byte);
    free(t->vocab_str);
    free(t->vocab_len);
    free(t->vocab.slot);
    free(t->merges.key);
    free(t->merges.rank);
    free(t->merges.new_id);
    arena_free(t->arena);
    free(t);
}


/* ------------------------------------------------------- piece lists */

typedef struct {
    size_t   off;       /* into text */
    size_t   len;
    int32_t  id;        /* added token id, or -1 for text still to split */
    int      at_start;  /* begins at offset 0 of the original input */
} piece_t;

typedef struct {
    tbuf_t   text;
    piece_t *v;
    size_t   n;
    size_t   cap;
} plist_t;

static int
pl_add(plist_t *l, const char *s, size_t n, int32_t id, int at_start)
{
    piece_t *v;

    v = grow(l->v, &l->cap, l->n + 1, sizeof(*v), 16);
    if (v == NULL) {
        return -1;
    }
    l->v = v;
    l->v[l->n].off = l->text.len;
    l->v[l->n].len = n;
    l->v[l->n].id = id;
    l->v[l->n].at_start = at_start;
    l->n++;
    return tb_put(&l->text, s, n);
}

static void
pl_reset(plist_t *l)
{
    l->n = 0;
    l->text.len = 0;
}

static void
pl_free(plist_t *l)
{
    tb_free(&l->text);
    free(l->v);
    memset(l, 0, sizeof(*l));
}

static void
pl_swap(plist_t *a, plist_t *b)
{
    plist_t x = *a;

    *a = *b;
    *b = x;
}


/* ------------------------------------------------------- added tokens */

static int
re_hit(const pcre2_code *re, const char *s, size_t n, pcre2_match_data *md)
{
    return pcre2_match(re, (PCRE2_SPTR) s, n, 0, PCRE2_NO_UTF_CHECK, md, NULL)
           >= 0;
}

/*
 * Split s[0..n) into added-token pieces and text pieces, like
 * AddedVocabulary::find_matches: leftmost-longest non-overlapping matches;
 * single_word, lstrip and rstrip adjust or reject a match.
 */
static int
split_added(const moe_tokenizer_t *t, const added_index_t *ix, int use_norm,
    const char *s, size_t n, int at_start, plist_t *out, pcre2_match_data *md)
{
    size_t          i = 0, start_off = 0, start, stop, cl, k;
    uint32_t        b, e;
    const added_t  *a, *hit;
    unsigned char   c;

    if (ix->n == 0) {
        return n ? pl_add(out, s, n, -1, at_start) : 0;
    }
    while (i < n) {
        c = (unsigned char) s[i];
        hit = NULL;
        for (b = ix->start[c], e = ix->start[c + 1]; b < e; b++) {
            const char *as;
            size_t      al;
            a = &t->added[ix->idx[b]];
            as = use_norm ? a->ns : a->s;
            al = use_norm ? a->nlen : a->len;
            if (al <= n - i && memcmp(s + i, as, al) == 0) {
                hit = a;
                break;
            }
        }
        if (hit == NULL) {
            i++;
            continue;
        }
        start = i;
        stop = i + (use_norm ? hit->nlen : hit->len);
        i = stop;
        if (hit->single_word) {
            int sp_before = start == 0
                            || !re_hit(t->re_word_end, s, start, md);
            int sp_after = stop == n
                           || !re_hit(t->re_word_start, s + stop, n - stop,
                                      md);
            if (!sp_before || !sp_after) {
                continue;
            }
        }
        if (hit->lstrip) {
            /* back over the whitespace that ends s[0..start) */
            k = start;
            while (k > start_off) {
                size_t j = k - 1;
                while (j > 0 && ((unsigned char) s[j] & 0xc0) == 0x80) {
                    j--;
                }
                if (!is_uspace(u8dec(s + j, n - j, &cl))) {
                    break;
                }
                k = j;
            }
            start = k;
        }
        if (hit->rstrip) {
            while (stop < n && is_uspace(u8dec(s + stop, n - stop, &cl))) {
                stop += cl;
            }
            i = stop;
        }
        if (start_off < start
            && pl_add(out, s + start_off, start - start_off, -1,
                      at_start && start_off == 0) != 0)
        {
            return -1;
        }
        if (pl_add(out, s + start, stop - start, hit->id, 0) != 0) {
            return -1;
        }
        start_off = stop;
    }
    if (start_off < n) {
        return pl_add(out, s + start_off, n - start_off, -1,
                      at_start && start_off == 0);
    }
    return 0;
}


/* ---------------------------------------------------------- normalizer */

static int
replace_all(const char *s, size_t n, const char *pat, size_t pl,
    const char *rep, size_t rl, tbuf_t *out)
{
    size_t i = 0, last = 0;

    while (pl && i + pl <= n) {
        if (memcmp(s + i, pat, pl) == 0) {
            if (tb_put(out, s + last, i - last) != 0
                || tb_put(out, rep, rl) != 0)
            {
                return -1;
            }
            i += pl;
            last = i;
        } else {
            i++;
        }
    }
    return tb_put(out, s + last, n - last);
}

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
            (void) u8dec(s + ov[0], n - ov[0], &cl);
            pos = ov[0] + cl;
            continue;
        }
        if (tb_put(out, s + last, ov[0] - last) != 0
            || tb_put(out, rep, rl) != 0)
        {
            rc = -1;
            break;
        }
        pos = last = ov[1];
    }
    if (rc == 0) {
        rc = tb_put(out, s + last, n - last);
    }
    pcre2_match_data_free(md);
    return rc;
}

/*
 * Unicode normalization form `form` (utf8proc option flags) of the valid
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
        return tb_put(out, s, n);
    }
    if (n > ((size_t) -1 >> 4)) {               /* utf8proc_ssize_t */
        return -1;
    }
    dl = utf8proc_map((const utf8proc_uint8_t *) s, (utf8proc_ssize_t) n, &d,
                      (utf8proc_option_t) form);
    if (dl < 0) {
        return -1;
    }
    rc = tb_put(out, d, (size_t) dl);
    free(d);
    return rc;
}

/* Apply the normalizer chain to s[0..n); result in out (reset first). */
static int
normalize_piece(const moe_tokenizer_t *t, const char *s, size_t n,
    tbuf_t *out, tbuf_t *tmp)
{
    int                i;
    const norm_step_t *st;
    tbuf_t             x;

    out->len = 0;
    if (tb_put(out, s, n) != 0) {
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
            if (tb_put(tmp, st->a, st->alen) != 0
                || tb_put(tmp, out->p, out->len) != 0)
            {
                return -1;
            }
            break;
        case NORM_REPLACE:
            if ((st->re ? replace_re(st->re, out->p, out->len, st->b,
                                     st->blen, tmp)
                 : replace_all(out->p, out->len, st->a, st->alen, st->b,
                               st->blen, tmp)) != 0)
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


/* ------------------------------------------------------- pre-tokenizer */

typedef struct {
    size_t s, e;
    int    m;
} span_t;

typedef struct {
    span_t *v;
    size_t  n, cap;
} spans_t;

static int
sp_add(spans_t *sp, size_t s, size_t e, int m)
{
    span_t *v;

    v = grow(sp->v, &sp->cap, sp->n + 1, sizeof(*v), 64);
    if (v == NULL) {
        return -1;
    }
    sp->v = v;
    sp->v[sp->n].s = s;
    sp->v[sp->n].e = e;
    sp->v[sp->n].m = m;
    sp->n++;
    return 0;
}

/* Pattern::find_matches: matches and the gaps between them, in order. */
static int
find_spans(const pre_step_t *st, const char *s, size_t n, spans_t *sp,
    pcre2_match_data *md)
{
    size_t      prev = 0, pos = 0, ms, me, cl, litlen = st->litlen;
    const char *lit = st->lit;
    PCRE2_SIZE *ov;
    int         rc;

    /* Metaspace splits on its replacement: a literal pattern too */
    if (lit == NULL && st->type == PRE_METASPACE) {
        lit = st->rep;
        litlen = st->replen;
    }
    sp->n = 0;
    if (n == 0) {
        return sp_add(sp, 0, 0, 0);
    }
    for (;;) {
        if (lit) {
            const char *f = pos + litlen <= n
                            ? memmem(s + pos, n - pos, lit, litlen)
                            : NULL;
            if (f == NULL) {
                break;
            }
            ms = (size_t) (f - s);
            me = ms + litlen;
        } else {
            if (pos > n) {
                break;
            }
            rc = pcre2_match(st->re, (PCRE2_SPTR) s, n, pos,
                             PCRE2_NO_UTF_CHECK, md, NULL);
            if (rc < 0) {
                if (rc == PCRE2_ERROR_NOMATCH) {
                    break;
                }
                return -1;              /* JIT stack/match limit */
            }
            ov = pcre2_get_ovector_pointer(md);
            ms = ov[0];
            me = ov[1];
            if (me == ms) {             /* empty match: dropped anyway */
                if (ms >= n) {
                    break;
                }
                (void) u8dec(s + ms, n - ms, &cl);
                pos = ms + cl;
                continue;
            }
        }
        if (prev != ms && sp_add(sp, prev, ms, 0) != 0) {
            return -1;
        }
        if (sp_add(sp, ms, me, 1) != 0) {
            return -1;
        }
        prev = pos = me;
    }
    if (prev != n) {
        return sp_add(sp, prev, n, 0);
    }
    return 0;
}

/* NormalizedString::split behaviors; merges in place, then emits pieces */
static int
emit_spans(spans_t *sp, int behavior, int invert, const char *s,
    int at_start, plist_t *out)
{
    size_t  i, k = 0;
    int     prev_m = 0;
    span_t *v = sp->v;

    for (i = 0; i < sp->n; i++) {
        if (invert) {
            v[i].m = !v[i].m;
        }
    }
    switch (behavior) {
    case BEH_REMOVED:
        for (i = 0; i < sp->n; i++) {
            if (!v[i].m) {
                v[k++] = v[i];
            }
        }
        break;
    case BEH_ISOLATED:
        k = sp->n;
        break;
    case BEH_PREV:
        for (i = 0; i < sp->n; i++) {
            if (v[i].m && !prev_m && k > 0) {
                v[k - 1].e = v[i].e;
            } else {
                v[k++] = v[i];
            }
            prev_m = v[i].m;
        }
        break;
    case BEH_CONTIGUOUS:
        for (i = 0; i < sp->n; i++) {
            int m = v[i].m;
            if (m == prev_m && k > 0) {
                v[k - 1].e = v[i].e;
            } else {
                v[k++] = v[i];
            }
            prev_m = m;
        }
        break;
    case BEH_NEXT: {
        /* walk backwards: a match joins the piece that follows it */
        size_t j = sp->n;
        k = sp->n;
        while (j-- > 0) {
            span_t cur = v[j];
            if (cur.m && !prev_m && k < sp->n) {
                v[k].s = cur.s;
            } else {
                v[--k] = cur;
            }
            prev_m = cur.m;
        }
        for (i = 0; k + i < sp->n; i++) {
            v[i] = v[k + i];
        }
        k = i;
        break;
    }
    }
    for (i = 0; i < k; i++) {
        if (v[i].e > v[i].s
            && pl_add(out, s + v[i].s, v[i].e - v[i].s, -1,
                      at_start && v[i].s == 0) != 0)
        {
            return -1;
        }
    }
    return 0;
}

static int
pre_step(const moe_tokenizer_t *t, const pre_step_t *st, plist_t *in,
    plist_t *out, spans_t *sp, tbuf_t *tmp, pcre2_match_data *md)
{
    size_t       i, j, cl;
    const char  *s;
    size_t       n;
    int          at;

    (void) t;
    pl_reset(out);
    for (i = 0; i < in->n; i++) {
        const piece_t *p = &in->v[i];

        s = in->text.p + p->off;
        n = p->len;
        at = p->at_start;
        if (p->id >= 0) {
            if (pl_add(out, s, n, p->id, 0) != 0) {
                return -1;
            }
            continue;
        }
        switch (st->type) {
        case PRE_SPLIT:
        case PRE_DIGITS:
            if (find_spans(st, s, n, sp, md) != 0
                || emit_spans(sp, st->behavior, st->invert, s, at, out) != 0)
            {
                return -1;
            }
            break;
        case PRE_METASPACE:
            tmp->len = 0;
            if (st->scheme == SCHEME_ALWAYS
                || (st->scheme == SCHEME_FIRST && at))
            {
                /* prepend unless it already starts with the replacement
                 * (or a space, which becomes one) */
                int starts = (n >= st->replen
                              && memcmp(s, st->rep, st->replen) == 0)
                             || (n > 0 && s[0] == ' ');
                if (!starts && tb_put(tmp, st->rep, st->replen) != 0) {
                    return -1;
                }
            }
            if (replace_all(s, n, " ", 1, st->rep, st->replen, tmp) != 0) {
                return -1;
            }
            if (!st->split) {
                if (tmp->len && pl_add(out, tmp->p, tmp->len, -1, at) != 0) {
                    return -1;
                }
                break;
            }
            if (find_spans(st, tmp->p, tmp->len, sp, md) != 0
                || emit_spans(sp, BEH_NEXT, 0, tmp->p, at, out) != 0)
            {
                return -1;
            }
            break;
        case PRE_BYTELEVEL: {
            size_t first = out->n, k;
            tmp->len = 0;
            if (st->add_prefix_space && (n == 0 || s[0] != ' ')) {
                if (tb_put(tmp, " ", 1) != 0) {
                    return -1;
                }
            }
            if (tb_put(tmp, s, n) != 0) {
                return -1;
            }
            if (st->use_regex) {
                if (find_spans(st, tmp->p, tmp->len, sp, md) != 0
                    || emit_spans(sp, BEH_ISOLATED, 0, tmp->p, at, out) != 0)
                {
                    return -1;
                }
            } else if (tmp->len
                       && pl_add(out, tmp->p, tmp->len, -1, at) != 0)
            {
                return -1;
            }
            /* map the new pieces' bytes to the GPT-2 alphabet, in place
             * at the end of out->text */
            for (k = first; k < out->n; k++) {
                piece_t *q = &out->v[k];
                size_t   len2 = 0, base;
                for (j = 0; j < q->len; j++) {
                    len2 += bl_enc_len[(unsigned char) out->text.p[q->off + j]];
                }
                base = out->text.len;
                if (tb_reserve(&out->text, len2) != 0) {
                    return -1;
                }
                for (j = 0; j < q->len; j++) {
                    unsigned char c = (unsigned char) out->text.p[q->off + j];
                    memcpy(out->text.p + out->text.len, bl_enc[c],
                           bl_enc_len[c]);
                    out->text.len += bl_enc_len[c];
                }
                out->text.p[out->text.len] = '\0';
                q->off = base;
                q->len = len2;
            }
            (void) cl;
            break;
        }
        }
    }
    return 0;
}


/* ---------------------------------------------------------------- BPE */

typedef struct {
    int32_t id;
    int32_t prev;
    int32_t next;
    int32_t alive;
} sym_t;

typedef struct {
    uint32_t rank;
    uint32_t pos;
    int32_t  new_id;
} mrg_t;

typedef struct {
    int32_t *v;
    size_t   n, cap;
} ids_t;

typedef struct {
    sym_t   *sym;
    size_t   sym_cap;
    mrg_t   *heap;
    size_t   heap_n, heap_cap;
    tbuf_t   tmp;
} bpe_scratch_t;

static int
ids_push(ids_t *o, int32_t id)
{
    int32_t *v;

    v = grow(o->v, &o->cap, o->n + 1, sizeof(*v), 64);
    if (v == NULL) {
        return -1;
    }
    o->v = v;
    o->v[o->n++] = id;
    return 0;
}

static int
mrg_less(const mrg_t *a, const mrg_t *b)
{
    return a->rank != b->rank ? a->rank < b->rank : a->pos < b->pos;
}

static int
heap_push(bpe_scratch_t *sc, uint32_t rank, uint32_t pos, int32_t nid)
{
    size_t i;
    mrg_t  m, *h;

    h = grow(sc->heap, &sc->heap_cap, sc->heap_n + 1, sizeof(*h), 64);
    if (h == NULL) {
        return -1;
    }
    sc->heap = h;
    m.rank = rank;
    m.pos = pos;
    m.new_id = nid;
    i = sc->heap_n++;
    while (i > 0 && mrg_less(&m, &sc->heap[(i - 1) / 2])) {
        sc->heap[i] = sc->heap[(i - 1) / 2];
        i = (i - 1) / 2;
    }
    sc->heap[i] = m;
    return 0;
}

static mrg_t
heap_pop(bpe_scratch_t *sc)
{
    mrg_t  top = sc->heap[0], last = sc->heap[--sc->heap_n];
    size_t i = 0, c;

    for (;;) {
        c = 2 * i + 1;
        if (c >= sc->heap_n) {
            break;
        }
        if (c + 1 < sc->heap_n && mrg_less(&sc->heap[c + 1], &sc->heap[c])) {
            c++;
        }
        if (!mrg_less(&sc->heap[c], &last)) {
            break;
        }
        sc->heap[i] = sc->heap[c];
        i = c;
    }
    if (sc->heap_n) {
        sc->heap[i] = last;
    }
    return top;
}

static int
sym_add(bpe_scratch_t *sc, size_t *ns, int32_t id)
{
    sym_t *s;

    s = grow(sc->sym, &sc->sym_cap, *ns + 1, sizeof(*s), 64);
    if (s == NULL) {
        return -1;
    }
    sc->sym = s;
    sc->sym[*ns].id = id;
    sc->sym[*ns].prev = (int32_t) *ns - 1;
    sc->sym[*ns].next = (int32_t) *ns + 1;
    sc->sym[*ns].alive = 1;
    (*ns)++;
    return 0;
}

/* BPE::tokenize_with_cache + merge_word + Word::merge_all for one word. */
static int
bpe_word(const moe_tokenizer_t *t, const char *w, size_t n, ids_t *out,
    bpe_scratch_t *sc)
{
    size_t   i, cl, ns = 0, b;
    int32_t  id, unk = -1, nid;
    uint32_t rank;
    tbuf_t  *tmp = &sc->tmp;

    if (n == 0) {
        return 0;
    }
    if (t->ignore_merges && (id = vocab_get(t, w, n)) >= 0) {
        return ids_push(out, id);
    }
    for (i = 0; i < n; i += cl) {
        cl = u8len((unsigned char) w[i]);
        if (cl > n - i) {
            cl = n - i;
        }
        tmp->len = 0;
        if (t->cont_prefix && i > 0
            && tb_put(tmp, t->cont_prefix, t->cont_prefix_len) != 0)
        {
            return -1;
        }
        if (tb_put(tmp, w + i, cl) != 0) {
            return -1;
        }
        if (t->eow_suffix && i + cl == n
            && tb_put(tmp, t->eow_suffix, t->eow_suffix_len) != 0)
        {
            return -1;
        }
        id = vocab_get(t, tmp->p, tmp->len);
        if (id >= 0) {
            if (unk >= 0) {
                if (sym_add(sc, &ns, unk) != 0) {
                    return -1;
                }
                unk = -1;
            }
            if (sym_add(sc, &ns, id) != 0) {
                return -1;
            }
            continue;
        }
        if (t->byte_fallback) {
            for (b = 0; b < tmp->len; b++) {
                if (t->byte_id[(unsigned char) tmp->p[b]] < 0) {
                    break;
                }
            }
            if (b == tmp->len) {
                for (b = 0; b < tmp->len; b++) {
                    if (sym_add(sc, &ns, t->byte_id[(unsigned char) tmp->p[b]])
                        != 0)
                    {
                        return -1;
                    }
                }
                continue;
            }
        }
        if (t->unk_id >= 0) {
            if (unk >= 0 && !t->fuse_unk) {
                if (sym_add(sc, &ns, unk) != 0) {
                    return -1;
                }
            }
            unk = t->unk_id;
        }
    }
    if (unk >= 0 && sym_add(sc, &ns, unk) != 0) {
        return -1;
    }
    if (ns == 0) {
        return 0;
    }
    sc->sym[ns - 1].next = -1;
    sc->heap_n = 0;
    for (i = 0; i + 1 < ns; i++) {
        if (pairmap_get(&t->merges, sc->sym[i].id, sc->sym[i + 1].id, &rank,
                        &nid)
            && heap_push(sc, rank, (uint32_t) i, nid) != 0)
        {
            return -1;
        }
    }
    while (sc->heap_n) {
        mrg_t   top = heap_pop(sc);
        sym_t  *cur = &sc->sym[top.pos], *right;
        int32_t np;

        if (!cur->alive || cur->next < 0) {
            continue;
        }
        right = &sc->sym[cur->next];
        if (!pairmap_get(&t->merges, cur->id, right->id, &rank, &nid)
            || nid != top.new_id)
        {
            continue;                   /* stale entry */
        }
        cur->id = top.new_id;
        right->alive = 0;
        cur->next = right->next;
        if (cur->next >= 0) {
            sc->sym[cur->next].prev = (int32_t) top.pos;
        }
        np = cur->prev;
        if (np >= 0
            && pairmap_get(&t->merges, sc->sym[np].id, cur->id, &rank, &nid)
            && heap_push(sc, rank, (uint32_t) np, nid) != 0)
        {
            return -1;
        }
        if (cur->next >= 0
            && pairmap_get(&t->merges, cur->id, sc->sym[cur->next].id, &rank,
                           &nid)
            && heap_push(sc, rank, top.pos, nid) != 0)
        {
            return -1;
        }
    }
    for (i = 0; i < ns; i++) {
        if (sc->sym[i].alive && ids_push(out, sc->sym[i].id) != 0) {
            return -1;
        }
    }
    return 0;
}


/* -------------------------------------------------------------- encode */

int
moe_tokenizer_encode(const moe_tokenizer_t *t, const char *text, size_t len,
    int add_special_tokens, int32_t **ids, size_t *n)
{
    char              *s = NULL;
    size_t             sl, i, j;
    plist_t            a = {0}, b = {0};
    tbuf_t             nb = {0}, tmp = {0};
    spans_t            sp = {0};
    bpe_scratch_t      sc = {0};
    ids_t              out = {0}, fin = {0};
    pcre2_match_data  *md = NULL;
    int                k, rc = MOE_ENOMEM;

    if (ids) {
        *ids = NULL;
    }
    if (n) {
        *n = 0;
    }
    if (t == NULL || (text == NULL && len) || ids == NULL || n == NULL) {
        return MOE_EINVAL;
    }
    s = moe_utf8_sanitize(text ? text : "", len, &sl);
    md = pcre2_match_data_create(32, NULL);
    if (s == NULL || md == NULL) {
        goto done;
    }
    /* 1. added tokens on the raw text */
    if (split_added(t, &t->raw_idx, 0, s, sl, 1, &a, md) != 0) {
        goto done;
    }
    /* 2. normalize text pieces, then normalized added tokens */
    if (t->n_norm || t->norm_idx.n) {
        for (i = 0; i < a.n; i++) {
            piece_t *p = &a.v[i];
            if (p->id >= 0) {
                if (pl_add(&b, a.text.p + p->off, p->len, p->id, 0) != 0) {
                    goto done;
                }
                continue;
            }
            if (normalize_piece(t, a.text.p + p->off, p->len, &nb, &tmp) != 0
                || split_added(t, &t->norm_idx, 1, nb.p, nb.len, p->at_start,
                               &b, md) != 0)
            {
                goto done;
            }
        }
        pl_swap(&a, &b);
    }
    /* 3. pre-tokenizers */
    for (k = 0; k < t->n_pre; k++) {
        if (pre_step(t, &t->pre[k], &a, &b, &sp, &tmp, md) != 0) {
            rc = MOE_EINVAL;        /* regex resource limit on this input */
            goto done;
        }
        pl_swap(&a, &b);
    }
    /* 4. model */
    for (i = 0; i < a.n; i++) {
        piece_t *p = &a.v[i];
        if (p->id >= 0) {
            if (ids_push(&out, p->id) != 0) {
                goto done;
            }
        } else if (bpe_word(t, a.text.p + p->off, p->len, &out, &sc) != 0) {
            goto done;
        }
    }
    /* 5. post-processor */
    if (add_special_tokens && t->n_tpl) {
        for (k = 0; k < t->n_tpl; k++) {
            const tpl_item_t *it = &t->tpl[k];
            if (it->is_seq) {
                for (i = 0; i < out.n; i++) {
                    if (ids_push(&fin, out.v[i]) != 0) {
                        goto done;
                    }
                }
            } else {
                for (j = 0; j < (size_t) it->n; j++) {
                    if (ids_push(&fin, it->ids[j]) != 0) {
                        goto done;
                    }
                }
            }
        }
        free(out.v);
        out = fin;
        fin.v = NULL;
    }
    if (out.v == NULL) {
        out.v = malloc(sizeof(int32_t));
        if (out.v == NULL) {
            goto done;
        }
    }
    *ids = out.v;
    *n = out.n;
    out.v = NULL;
    rc = MOE_OK;

done:
    free(s);
    free(out.v);
    free(fin.v);
    pl_free(&a);
    pl_free(&b);
    tb_free(&nb);
    tb_free(&tmp);
    free(sp.v);
    free(sc.sym);
    free(sc.heap);
    tb_free(&sc.tmp);
    pcre2_match_data_free(md);
    return rc;
}


/* -------------------------------------------------------------- decode */

typedef struct {
    tbuf_t   text;
    size_t  *off;       /* (n + 1) token k is text[off[k] .. off[k+1]) */
    size_t   n, cap;
} slist_t;

static int
sl_add(slist_t *l, const char *s, size_t n)
{
    size_t *o;

    o = grow(l->off, &l->cap, l->n + 2, sizeof(*o), 32);
    if (o == NULL) {
        return -1;
    }
    l->off = o;
    if (l->n == 0) {
        l->off[0] = l->text.len;
    }
    if (tb_put(&l->text, s, n) != 0) {
        return -1;
    }
    l->n++;
    l->off[l->n] = l->text.len;
    return 0;
}

/* append bytes to the last token of l (creating it when l is empty) */
static int
sl_start(slist_t *l)
{
    return sl_add(l, "", 0);
}

static int
sl_append_last(slist_t *l, const char *s, size_t n)
{
    if (tb_put(&l->text, s, n) != 0) {
        return -1;
    }
    l->off[l->n] = l->text.len;
    return 0;
}

static void
sl_reset(slist_t *l)
{
    l->n = 0;
    l->text.len = 0;
}

static int
dec_step(const dec_step_t *st, slist_t *in, slist_t *out)
{
    size_t      k, i, cl, n = 0, start_cut, stop_cut, cnt;
    const char *s = NULL;
    tbuf_t      bytes = {0};
    int         rc = -1;
    uint32_t    cp;

    sl_reset(out);
    switch (st->type) {
    case DEC_BYTELEVEL:
        for (k = 0; k < in->n; k++) {
            size_t mark = bytes.len;
            int    ok = 1;
            s = in->text.p + in->off[k];
            n = in->off[k + 1] - in->off[k];
            for (i = 0; i < n; i += cl) {
                cp = u8dec(s + i, n - i, &cl);
                if (cp >= 0x144 || bl_dec[cp] < 0) {
                    ok = 0;
                    break;
                }
                if (tb_put(&bytes, &(char) { (char) bl_dec[cp] }, 1) != 0) {
                    goto out;
                }
            }
            if (!ok) {
                bytes.len = mark;
                if (tb_put(&bytes, s, n) != 0) {
                    goto out;
                }
            }
        }
        if (sl_start(out) != 0
            || tb_put_lossy(&out->text, bytes.p ? bytes.p : "", bytes.len)
               != 0)
        {
            goto out;
        }
        out->off[1] = out->text.len;
        break;
    case DEC_REPLACE:
        for (k = 0; k < in->n; k++) {
            if (sl_start(out) != 0) {
                goto out;
            }
            bytes.len = 0;
            if (replace_all(in->text.p + in->off[k],
                            in->off[k + 1] - in->off[k], st->pat, st->patlen,
                            st->content, st->contentlen, &bytes) != 0
                || sl_append_last(out, bytes.p, bytes.len) != 0)
            {
                goto out;
            }
        }
        break;
    case DEC_BYTEFALLBACK:
        bytes.len = 0;
        for (k = 0; k <= in->n; k++) {
            int byte = -1;
            if (k < in->n) {
                s = in->text.p + in->off[k];
                n = in->off[k + 1] - in->off[k];
                byte = byte_token_value(s, n);
            }
            if (byte >= 0) {
                char c = (char) byte;
                if (tb_put(&bytes, &c, 1) != 0) {
                    goto out;
                }
                continue;
            }
            if (bytes.len) {
                tbuf_t chk = {0};
                /* valid UTF-8 as a whole, else one U+FFFD per byte */
                if (tb_put_lossy(&chk, bytes.p, bytes.len) != 0) {
                    goto out;
                }
                if (chk.len == bytes.len
                    && memcmp(chk.p, bytes.p, bytes.len) == 0)
                {
                    rc = sl_add(out, bytes.p, bytes.len);
                } else {
                    rc = 0;
                    for (cnt = 0; cnt < bytes.len && rc == 0; cnt++) {
                        rc = sl_add(out, FFFD, 3);
                    }
                }
                tb_free(&chk);
                if (rc != 0) {
                    goto out;
                }
                rc = -1;
                bytes.len = 0;
            }
            if (k < in->n && sl_add(out, s, n) != 0) {
                goto out;
            }
        }
        break;
    case DEC_FUSE:
        if (sl_start(out) != 0
            || sl_append_last(out, in->text.p ? in->text.p + in->off[0] : "",
                              in->n ? in->off[in->n] - in->off[0] : 0) != 0)
        {
            goto out;
        }
        break;
    case DEC_STRIP:
        for (k = 0; k < in->n; k++) {
            size_t nch;
            s = in->text.p + in->off[k];
            n = in->off[k + 1] - in->off[k];
            /* cut up to `start` leading and `stop` trailing strip chars */
            start_cut = 0;
            for (i = 0, nch = 0; i < n && nch < (size_t) st->start; i += cl) {
                cp = u8dec(s + i, n - i, &cl);
                if (cp != st->strip_char) {
                    break;
                }
                nch++;
                start_cut = i + cl;
            }
            stop_cut = n;
            for (i = n, nch = 0; i > start_cut && nch < (size_t) st->stop;
                 nch++)
            {
                size_t j = i - 1;
                while (j > 0 && ((unsigned char) s[j] & 0xc0) == 0x80) {
                    j--;
                }
                if (u8dec(s + j, n - j, &cl) != st->strip_char) {
                    break;
                }
                stop_cut = i = j;
            }
            if (sl_add(out, s + start_cut, stop_cut - start_cut) != 0) {
                goto out;
            }
        }
        break;
    case DEC_METASPACE:
        for (k = 0; k < in->n; k++) {
            if (sl_start(out) != 0) {
                goto out;
            }
            s = in->text.p + in->off[k];
            n = in->off[k + 1] - in->off[k];
            for (i = 0; i < n; i += cl) {
                cp = u8dec(s + i, n - i, &cl);
                if (cp == st->replacement) {
                    if (k == 0 && st->scheme != SCHEME_NEVER) {
                        continue;
                    }
                    if (sl_append_last(out, " ", 1) != 0) {
                        goto out;
                    }
                } else if (sl_append_last(out, s + i, cl) != 0) {
                    goto out;
                }
            }
        }
        break;
    }
    rc = 0;

out:
    tb_free(&bytes);
    return rc;
}

int
moe_tokenizer_decode(const moe_tokenizer_t *t, const int32_t *ids, size_t n,
    int skip_special_tokens, char **text, size_t *len)
{
    slist_t  a = {0}, b = {0}, x;
    size_t   i;
    int      k, rc = MOE_ENOMEM;
    tbuf_t   res = {0};

    if (text) {
        *text = NULL;
    }
    if (len) {
        *len = 0;
    }
    if (t == NULL || (ids == NULL && n) || text == NULL) {
        return MOE_EINVAL;
    }
    for (i = 0; i < n; i++) {
        int32_t id = ids[i];
        if (id < 0 || id >= t->n_ids || t->id_str[id] == NULL) {
            rc = MOE_EINVAL;
            goto done;
        }
        if (skip_special_tokens && (t->id_flags[id] & ID_SPECIAL)) {
            continue;
        }
        if (sl_add(&a, t->id_str[id], t->id_len[id]) != 0) {
            goto done;
        }
    }
    if (t->has_decoder) {
        for (k = 0; k < t->n_dec; k++) {
            if (dec_step(&t->dec[k], &a, &b) != 0) {
                goto done;
            }
            x = a;
            a = b;
            b = x;
        }
        if (tb_put(&res, a.n ? a.text.p + a.off[0] : "",
                   a.n ? a.off[a.n] - a.off[0] : 0) != 0)
        {
            goto done;
        }
    } else {
        for (i = 0; i < a.n; i++) {     /* no decoder: tokens joined by " " */
            if ((i && tb_put(&res, " ", 1) != 0)
                || tb_put(&res, a.text.p + a.off[i], a.off[i + 1] - a.off[i])
                   != 0)
            {
                goto done;
            }
        }
    }
    if (res.p == NULL && tb_put(&res, "", 0) != 0) {
        goto done;
    }
    *text = res.p;
    if (len) {
        *len = res.len;
    }
    res.p = NULL;
    rc = MOE_OK;

done:
    tb_free(&res);
    tb_free(&a.text);
    free(a.off);
    tb_free(&b.text);
    free(b.off);
    return rc;
}


/* ------------------------------------------------------------ lookups */

int
moe_tokenizer_vocab_size(const moe_tokenizer_t *t)
{
    return t ? t->n_ids : 0;
}

int32_t
moe_tokenizer_token_to_id(const moe_tokenizer_t *t, const char *token)
{
    size_t n;
    int    i;

    if (t == NULL || token == NULL) {
        return -1;
    }
    n = strlen(token);
    for (i = 0; i < t->n_added; i++) {      /* added vocabulary first */
        if (t->added[i].len == n && memcmp(t->added[i].s, token, n) == 0) {
            return t->added[i].id;
        }
    }
    return vocab_get(t, token, n);
}

const char *
moe_tokenizer_id_to_token(const moe_tokenizer_t *t, int32_t id)
{
    if (t == NULL || id < 0 || id >= t->n_ids) {
        return NULL;
    }
    return t->id_str[id];
}

int
moe_tokenizer_is_special(const moe_tokenizer_t *t, int32_t id)
{
    if (t == NULL || id < 0 || id >= t->n_ids) {
        return 0;
    }
    return (t->id_flags[id] & ID_SPECIAL) != 0;
}

int
moe_tokenizer_is_byte_token(const moe_tokenizer_t *t, int32_t id)
{
    if (t == NULL || id < 0 || id >= t->n_ids || !t->dec_byte_fallback) {
        return 0;
    }
    return t->id_byte[id] >= 0;
}

const char *
moe_tokenizer_bos_token(const moe_tokenizer_t *t)
{
    return t ? t->bos_token : NULL;
}

const char *
moe_tokenizer_eos_token(const moe_tokenizer_t *t)
{
    return t ? t->eos_token : NULL;
}

const char *
moe_tokenizer_chat_template(const moe_tokenizer_t *t)
{
    return t ? t->chat_template : NULL;
}

int
moe_tokenizer_add_bos_token(const moe_tokenizer_t *t)
{
    return t ? t->add_bos : -1;
}

int
moe_tokenizer_add_eos_token(const moe_tokenizer_t *t)
{
    return t ? t->add_eos : -1;
}
