/*
 * Internals shared by the guided room's files: the compiled grammar, the
 * GBNF parser entry, the translators to GBNF, and the vocabulary trie.
 */

#ifndef MOE_GUIDED_INT_H
#define MOE_GUIDED_INT_H

#include <pthread.h>
#include <stdatomic.h>
#include <stddef.h>
#include <stdint.h>

#include "moe.h"

/* limits: beyond them a guide is refused as too large */
#define MOE_GRAM_MAX_RULES     20000
#define MOE_GRAM_MAX_ELEMS     400000
#define MOE_GRAM_MAX_REPEAT    1000     /* {m,n} bounds */

/*
 * The matcher's limits on one expansion (the stacks one byte leads to, or
 * the start state): nested rule references followed before a byte class
 * is reached, distinct intermediate stacks expanded (their copies, kept
 * to expand each once, at most 4 * MOE_GUIDED_MAX_STATE int32), and the
 * size of the resulting state in int32 (records of every stack); and on
 * one mask: stacks expanded by all the transitions of its vocabulary walk
 * (about 0.3 s; typical guides take a few thousand on Llama-3's
 * vocabulary, a choice among 5000 strings 75000).  Beyond them the guide
 * is too complex to match (MOE_EUNSUPPORTED; refused at compile time
 * when its start state or its first mask already is).  A JSON Schema
 * with dozens of properties nested ten deep stays far below them.
 */
#define MOE_GUIDED_MAX_DEPTH   4096
#define MOE_GUIDED_MAX_EXPAND  (1 << 16)
#define MOE_GUIDED_MAX_STATE   (4096 * 64)
#define MOE_GUIDED_MAX_WALK    (1 << 22)

/*
 * The guided rooms' hash tables (gbnf.c's rule names, matcher.c's state
 * store) are int32 slot arrays of n slots, n a power of two, -1 free,
 * probed linearly: put v at the first free slot from hash h.
 */
static inline void
moe_gslot_put(int32_t *sl, size_t n, uint64_t h, int32_t v)
{
    size_t  j = (size_t) h & (n - 1);

    while (sl[j] >= 0) {
        j = (j + 1) & (n - 1);
    }
    sl[j] = v;
}

/*
 * A flat grammar: rule r's body starts at el[rule_start[r]], alternatives
 * separated by GE_ALT, the rule ended by GE_END.  An element e >= 0 is a
 * byte class (e even: class e / 2) or a rule reference (e odd: rule
 * e / 2).
 */
#define GE_END   (-1)
#define GE_ALT   (-2)
#define GE_IS_CLASS(e)  ((e) >= 0 && ((e) & 1) == 0)
#define GE_IS_REF(e)    ((e) >= 0 && ((e) & 1) == 1)
#define GE_CLASS(c)     ((int32_t) ((c) * 2))
#define GE_REF(r)       ((int32_t) ((r) * 2 + 1))

typedef struct {
    int32_t   *el;          /* (n_el) */
    int        n_el;
    uint32_t (*cls)[8];     /* (n_cls) 256-bit byte sets */
    int        n_cls;
    int32_t   *rule_start;  /* (n_rules) */
    int        n_rules;
    int        root;
} moe_gram_t;

/* a growable text buffer (the translators' output) */
typedef struct {
    char   *p;
    size_t  len, cap;
    int     oom;
} gbuf_t;

void gb_put(gbuf_t *b, const char *s, size_t n);
void gb_puts(gbuf_t *b, const char *s);
void gb_printf(gbuf_t *b, const char *fmt, ...)
    __attribute__((format(printf, 2, 3)));
/* s as a GBNF string literal (quotes included) */
void gb_lit(gbuf_t *b, const char *s, size_t n);
void gb_free(gbuf_t *b);

/*
 * Parse GBNF text into g (root rule "root"): MOE_OK, or MOE_EINVAL with
 * err naming the problem and its byte offset (what = "grammar", "regex"
 * ... prefixes the message), MOE_ENOMEM.
 */
int  moe_gbnf_parse(const char *src, size_t len, moe_gram_t *g,
    char *err, size_t errlen);
void moe_gram_free(moe_gram_t *g);

/* regex (anchored full match) -> GBNF expression appended to out
 * (json_string: restrict to the inside of a JSON string, escaping '"'
 * and '\\'); MOE_EINVAL with err "regex: ... at offset N". */
int  moe_regex_to_gbnf(const char *re, size_t len, int json_string,
    gbuf_t *out, char *err, size_t errlen);

/* JSON Schema text -> a GBNF grammar (root rule "root") in out */
int  moe_schema_to_gbnf(const char *schema, size_t len, gbuf_t *out,
    char *err, size_t errlen);

/* the generic JSON rules (value, object, array, string, number, ws) */
extern const char moe_gbnf_json_rules[];

/* the tokenizer's vocabulary as a trie of token bytes (preorder nodes) */
typedef struct {
    uint8_t    byte;
    uint16_t   depth;       /* 1 for the root's children */
    uint32_t   end;         /* index after the subtree */
    uint32_t   tok_first;   /* tokens ending here: tok[tok_first ..] */
    uint32_t   tok_n;
} moe_trie_node_t;

typedef struct {
    atomic_int        refs;       /* the tokenizer's + one per guide */
    int               vocab;
    moe_trie_node_t  *node;       /* (n_node) */
    uint32_t          n_node;
    int32_t          *tok;        /* token ids in node order; a node's
                                     subtree holds tok[node.tok_first ..
                                     first of node.end) */
    uint32_t          n_tok;
    uint32_t        (*desc)[8];   /* (n_node) bytes below each node (its
                                     descendants' bytes, 256-bit set) */
    int               max_depth;
    char             *bytes;      /* all tokens' bytes */
    uint32_t         *boff;       /* (vocab + 1) token id's bytes offsets;
                                     an excluded token has none */
} moe_vocab_trie_t;

typedef struct moe_mask_cache moe_mask_cache_t;
typedef struct moe_state_store moe_state_store_t;

struct moe_guide {
    atomic_int               refs;
    moe_guided_kind_t        kind;
    moe_gram_t               g;
    const moe_vocab_trie_t  *trie;      /* the tokenizer's, shared */
    int                      n_words;
    pthread_mutex_t          lock;      /* the mask cache, the store */
    moe_mask_cache_t        *cache;
    moe_state_store_t       *store;     /* interned states, transitions */
};

/*
 * Check that g's start state and its first mask (then cached) can be
 * made within the matcher's limits: MOE_OK, or MOE_EINVAL with err saying
 * the guide is too complex, MOE_ENOMEM.  (moe_guide_compile's last step.)
 */
int  moe_guided_check_start(moe_guide_t *g, char *err, size_t errlen);

/* t's trie with one more reference (NULL: no memory); _unref drops one */
const moe_vocab_trie_t *moe_vocab_trie_get(const moe_tokenizer_t *t);
void moe_vocab_trie_unref(const moe_vocab_trie_t *t);
/* t's trie as it is now, no reference taken (NULL: none made yet) */
const moe_vocab_trie_t *moe_vocab_trie_peek(const moe_tokenizer_t *t);
void moe_mask_cache_free(moe_mask_cache_t *c);
void moe_state_store_free(moe_state_store_t *ss);

#endif /* MOE_GUIDED_INT_H */
