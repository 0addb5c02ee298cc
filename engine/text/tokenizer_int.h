/*
 * Tokenizer internals shared by the tokenizer's files (never included
 * outside engine/text/tokenizer_*.c):
 *
 *   tokenizer_load.c       tokenizer.json -> struct moe_tokenizer; lookups
 *   tokenizer_normalize.c  the normalizer chain
 *   tokenizer_encode.c     added tokens, pre-tokenizers, post-processor
 *   tokenizer_bpe.c        the BPE model on one word
 *   tokenizer_decode.c     the decoder chain
 *   tokenizer_base.c       buffers, hash maps, ByteLevel table (calls none
 *                          of the above)
 *
 * Calls go load -> normalize -> base, encode -> normalize/bpe -> base,
 * decode -> base; tools/callgraph.sh checks that no file loop appears.
 */

#ifndef MOE_TOKENIZER_INT_H
#define MOE_TOKENIZER_INT_H

#include <stddef.h>
#include <stdint.h>

#define PCRE2_CODE_UNIT_WIDTH 8
#include <pcre2.h>

#include "moe.h"


/* ------------------------------------------------------------ buffers */

typedef struct {
    char   *p;
    size_t  len;
    size_t  cap;
} tbuf_t;

typedef struct arena_blk {
    struct arena_blk *next;
    size_t            used;
    size_t            size;
    char              data[];
} arena_blk_t;

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


/* NFC, NFD, NFKC, NFKD: Unicode normalization forms, through utf8proc */
enum { NORM_PREPEND, NORM_REPLACE, NORM_UNICODE };
enum { NORM_FORM_NFC, NORM_FORM_NFD, NORM_FORM_NFKC, NORM_FORM_NFKD };

typedef struct {
    int          type;
    char        *a;           /* Prepend: text; Replace: literal pattern */
    size_t       alen;
    char        *b;           /* Replace: content */
    size_t       blen;
    pcre2_code  *re;          /* Replace with a Regex pattern */
    int          uform;       /* NORM_UNICODE: NORM_FORM_* */
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

    /* an attachment owned by the tokenizer (guided decoding's vocabulary
     * trie), made once on first use by moe_tokenizer_ext(); freed with it */
    void          *ext;
    void         (*ext_free)(void *);
};


/* BPE output and scratch (tokenizer_bpe.c), kept by the encoder */
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


/* ------------------------------------------------- tokenizer_base.c */

/*
 * Make room for `need` elements of size sz in the array v of *cap elements,
 * doubling from `first`.  Returns the (maybe moved) array, or NULL when out
 * of memory; then v and *cap are unchanged, so the caller can still free v.
 */
void *moe_tok_grow(void *v, size_t *cap, size_t need, size_t sz,
    size_t first);

/* Buffers: reserve / append return 0, or -1 when out of memory (b is
 * unchanged then); free releases b->p and empties b. */
int  moe_tok_buf_reserve(tbuf_t *b, size_t extra);
int  moe_tok_buf_put(tbuf_t *b, const void *s, size_t n);
int  moe_tok_buf_put_lossy(tbuf_t *b, const char *s, size_t n);
void moe_tok_buf_free(tbuf_t *b);

/* Byte value of a "<0xNN>" token (Rust u8::from_str_radix(_, 16) on the
 * two digits), or -1. */
int moe_tok_byte_value(const char *s, size_t n);

/* The vocab (string -> id) and merges ((a, b) -> rank, new id) maps:
 * init returns 0 or -1 (out of memory); get returns the id / 1 when
 * found, -1 / 0 when not. */
int     moe_tok_strmap_init(strmap_t *m, size_t n);
int32_t moe_tok_vocab_get(const moe_tokenizer_t *t, const char *s, size_t n);
void    moe_tok_vocab_put(moe_tokenizer_t *t, int32_t id);
int     moe_tok_pairmap_init(pairmap_t *m, size_t n);
void    moe_tok_pairmap_put(pairmap_t *m, int32_t a, int32_t b, uint32_t rank,
    int32_t nid);
int     moe_tok_pairmap_get(const pairmap_t *m, int32_t a, int32_t b,
    uint32_t *rank, int32_t *nid);

/* Append s[0..n) to out with each occurrence of pat[0..pl) replaced by
 * rep[0..rl), left to right.  0, or -1 when out of memory. */
int moe_tok_replace_all(const char *s, size_t n, const char *pat, size_t pl,
    const char *rep, size_t rl, tbuf_t *out);

/* GPT-2 byte <-> char table: filled once by moe_tok_bytelevel_init()
 * (thread-safe, called by moe_tokenizer_load), read-only afterwards. */
extern char     moe_tok_bl_enc[256][3];     /* UTF-8 of the char for byte b */
extern uint8_t  moe_tok_bl_enc_len[256];
extern int16_t  moe_tok_bl_dec[0x144];      /* code point -> byte, -1 */
void moe_tok_bytelevel_init(void);

/* ---------------------------------------------- tokenizer_normalize.c */

/* Apply t's normalizer chain to s[0..n); the result replaces out's
 * content; tmp is scratch.  0, or -1 when out of memory. */
int moe_tok_normalize(const moe_tokenizer_t *t, const char *s, size_t n,
    tbuf_t *out, tbuf_t *tmp);

/* ---------------------------------------------------- tokenizer_bpe.c */

/* Append id to o: 0, or -1 when out of memory. */
int moe_tok_ids_push(ids_t *o, int32_t id);

/* Append the BPE ids of the word w[0..n) to out, using scratch sc (kept
 * between calls, freed by the caller).  0, or -1 when out of memory. */
int moe_tok_bpe_word(const moe_tokenizer_t *t, const char *w, size_t n,
    ids_t *out, bpe_scratch_t *sc);

#endif /* MOE_TOKENIZER_INT_H */
