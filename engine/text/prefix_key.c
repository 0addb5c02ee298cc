/*
 * The prefix affinity key (moe.h, "Prefix affinity key"): a 64-bit hash of
 * the stable start of an OpenAI request body, for a front nginx's
 * `hash $moe_prefix_key consistent`.  Pure computation: yajl's callback
 * parser over the body as it is fed, no engine, no model, no tokenizer.
 *
 * Canonical bytes hashed (clipped to the budget):
 *   chat:         "C", then per message: role 0x1f text 0x1e, for the
 *                 messages up to and including the first "user" one;
 *   completions:  "P", then the prompt's text, or its token ids as decimal
 *                 numbers each followed by ','.
 * The tag byte is not counted in the budget.
 *
 * Depths below are those of yajl containers: the body's top-level map is
 * depth 1, "messages" (an array) depth 2, a message (a map) depth 3, an
 * array "content" depth 4, a content part (a map) depth 5.
 */

#include <stdlib.h>
#include <string.h>

#include <yajl/yajl_parse.h>

#include "moe.h"


#define PK_DEFAULT_BUDGET  1024
#define PK_MAX_DEPTH       64      /* deeper containers are not looked at */
#define PK_ROLE_MAX        32
#define PK_TRACK           6       /* depths 0..5 carry keys and kinds */

/* keys that matter, by the depth of the map they are in */
enum { K_OTHER = 0, K_MESSAGES, K_PROMPT, K_ROLE, K_CONTENT, K_TEXT };


struct moe_prefix_key_s {
    yajl_handle   h;
    size_t        budget;
    size_t        used;            /* canonical bytes hashed */
    uint64_t      hash;            /* FNV-1a state */

    int           depth;           /* open containers */
    unsigned char key[PK_TRACK];   /* last key of the map at that depth */
    unsigned char array[PK_TRACK]; /* 1: the container there is an array */

    int           kind;            /* 0, 'C' (messages) or 'P' (prompt) */
    int           done;            /* the key is complete */
    int           failed;          /* not JSON: no key */

    /* the message being read (its role may come after its content) */
    char          role[PK_ROLE_MAX];
    size_t        role_len;
    char         *text;            /* budget bytes */
    size_t        text_len;
};


/* FNV-1a, 64-bit */

static void
pk_hash(moe_prefix_key_t *k, const void *p, size_t n)
{
    const unsigned char  *b = p;
    size_t                i;

    for (i = 0; i < n; i++) {
        k->hash ^= b[i];
        k->hash *= 0x100000001b3ULL;
    }
}


/* hashes canonical bytes within the budget; the key is done at the budget */

static void
pk_emit(moe_prefix_key_t *k, const void *p, size_t n)
{
    size_t  room = k->budget - k->used;

    if (n > room) {
        n = room;
    }

    pk_hash(k, p, n);
    k->used += n;

    if (k->used == k->budget) {
        k->done = 1;
    }
}


static void
pk_start(moe_prefix_key_t *k, int kind)
{
    unsigned char  tag = (unsigned char) kind;

    k->kind = kind;
    pk_hash(k, &tag, 1);
}


/* where the parser is, from the keys and container kinds above it */

static int
pk_in_messages(const moe_prefix_key_t *k)
{
    return k->depth >= 2 && k->key[1] == K_MESSAGES && k->array[2]
           && k->kind == 'C';
}


static int
pk_in_message(const moe_prefix_key_t *k)
{
    return pk_in_messages(k) && k->depth >= 3 && !k->array[3];
}


static int
pk_in_content(const moe_prefix_key_t *k)
{
    return pk_in_message(k) && k->depth >= 4 && k->key[3] == K_CONTENT
           && k->array[4];
}


static int
pk_in_prompt(const moe_prefix_key_t *k)
{
    return k->depth >= 1 && k->key[1] == K_PROMPT && k->kind == 'P';
}


static void
pk_text_add(moe_prefix_key_t *k, const unsigned char *s, size_t n)
{
    size_t  room = k->budget - k->text_len;

    if (n > room) {
        n = room;
    }

    memcpy(k->text + k->text_len, s, n);
    k->text_len += n;
}


static void
pk_message_end(moe_prefix_key_t *k)
{
    static const char  us = 0x1f, rs = 0x1e;

    pk_emit(k, k->role, k->role_len);
    pk_emit(k, &us, 1);
    pk_emit(k, k->text, k->text_len);
    pk_emit(k, &rs, 1);

    /* the first user message ends the stable prefix */
    if (k->role_len == 4 && memcmp(k->role, "user", 4) == 0) {
        k->done = 1;
    }
}


/* yajl callbacks: return 0 to stop the parse (the key is done) */

static int
pk_string(void *ctx, const unsigned char *s, size_t n)
{
    moe_prefix_key_t  *k = ctx;

    if (k->kind == 'P' && pk_in_prompt(k)) {
        /* "prompt": "text", or the first string of ["text", ...] */
        if (k->depth == 1 || (k->depth == 2 && k->array[2])) {
            pk_emit(k, s, n);
            k->done = 1;
        }

    } else if (k->kind == 'C' && pk_in_message(k)) {
        if (k->depth == 3 && k->key[3] == K_ROLE) {
            k->role_len = n < PK_ROLE_MAX ? n : PK_ROLE_MAX;
            memcpy(k->role, s, k->role_len);

        } else if (k->depth == 3 && k->key[3] == K_CONTENT) {
            pk_text_add(k, s, n);

        } else if (pk_in_content(k)
                   && (k->depth == 4
                       || (k->depth == 5 && !k->array[5]
                           && k->key[5] == K_TEXT)))
        {
            pk_text_add(k, s, n);
        }
    }

    return !k->done;
}


static int
pk_number(void *ctx, const char *s, size_t n)
{
    moe_prefix_key_t  *k = ctx;
    static const char  comma = ',';

    /* token ids: "prompt": [1, 2, ...] or [[1, 2, ...], ...] */
    if (k->kind == 'P' && pk_in_prompt(k)
        && ((k->depth == 2 && k->array[2])
            || (k->depth == 3 && k->array[2] && k->array[3])))
    {
        pk_emit(k, s, n);
        pk_emit(k, &comma, 1);
    }

    return !k->done;
}


static int
pk_scalar(void *ctx)
{
    moe_prefix_key_t  *k = ctx;

    return !k->done;
}


static int
pk_boolean(void *ctx, int v)
{
    (void) v;
    return pk_scalar(ctx);
}


static int
pk_open(moe_prefix_key_t *k, int array)
{
    int  d = k->depth + 1;

    if (d > PK_MAX_DEPTH) {
        k->failed = 1;
        return 0;
    }

    if (d == 2 && k->kind == 0 && k->depth == 1) {
        if (k->key[1] == K_MESSAGES && array) {
            pk_start(k, 'C');

        } else if (k->key[1] == K_PROMPT && array) {
            pk_start(k, 'P');
        }
    }

    k->depth = d;

    if (d < PK_TRACK) {
        k->array[d] = (unsigned char) array;
        k->key[d] = K_OTHER;
    }

    if (d == 3 && pk_in_message(k)) {
        k->role_len = 0;
        k->text_len = 0;
    }

    return 1;
}


static int
pk_start_map(void *ctx)
{
    return pk_open(ctx, 0);
}


static int
pk_start_array(void *ctx)
{
    return pk_open(ctx, 1);
}


static int
pk_close(moe_prefix_key_t *k)
{
    if (k->depth == 3 && pk_in_message(k)) {
        pk_message_end(k);

    } else if (k->depth == 2 && (pk_in_messages(k) || pk_in_prompt(k))) {
        /* every message read and none from a user; or the token ids */
        k->done = 1;

    } else if (k->depth == 3 && pk_in_prompt(k) && k->array[2]
               && k->array[3])
    {
        /* the first prompt of [[ids], [ids], ...] */
        k->done = 1;
    }

    k->depth--;

    return !k->done;
}


static int
pk_end(void *ctx)
{
    return pk_close(ctx);
}


static int
pk_map_key(void *ctx, const unsigned char *s, size_t n)
{
    moe_prefix_key_t  *k = ctx;
    int                id = K_OTHER;

#define PK_IS(lit)  (n == sizeof(lit) - 1 && memcmp(s, lit, n) == 0)

    switch (k->depth) {
    case 1:
        id = PK_IS("messages") ? K_MESSAGES : PK_IS("prompt") ? K_PROMPT
                                                              : K_OTHER;
        break;
    case 3:
        id = PK_IS("role") ? K_ROLE : PK_IS("content") ? K_CONTENT : K_OTHER;
        break;
    case 5:
        id = PK_IS("text") ? K_TEXT : K_OTHER;
        break;
    }

#undef PK_IS

    if (k->depth < PK_TRACK) {
        k->key[k->depth] = (unsigned char) id;
    }

    return 1;
}


/* "prompt": "text" opens no container: the string callback sees depth 1 */

static int
pk_top_string(void *ctx, const unsigned char *s, size_t n)
{
    moe_prefix_key_t  *k = ctx;

    if (k->kind == 0 && k->depth == 1 && k->key[1] == K_PROMPT) {
        pk_start(k, 'P');
    }

    return pk_string(ctx, s, n);
}


static const yajl_callbacks  pk_callbacks = {
    pk_scalar,          /* null */
    pk_boolean,
    NULL,               /* integer: yajl_number takes them */
    NULL,               /* double */
    pk_number,
    pk_top_string,
    pk_start_map,
    pk_map_key,
    pk_end,
    pk_start_array,
    pk_end
};


moe_prefix_key_t *
moe_prefix_key_create(size_t budget)
{
    moe_prefix_key_t  *k;

    k = calloc(1, sizeof(*k));
    if (k == NULL) {
        return NULL;
    }

    k->budget = budget ? budget : PK_DEFAULT_BUDGET;
    k->hash = 0xcbf29ce484222325ULL;

    k->text = malloc(k->budget);
    k->h = yajl_alloc(&pk_callbacks, NULL, k);

    if (k->text == NULL || k->h == NULL) {
        moe_prefix_key_destroy(k);
        return NULL;
    }

    return k;
}


int
moe_prefix_key_feed(moe_prefix_key_t *k, const void *data, size_t len)
{
    yajl_status  st;

    if (k->done) {
        return 1;
    }

    if (k->failed) {
        return MOE_EINVAL;
    }

    st = yajl_parse(k->h, data, len);

    if (k->done) {
        return 1;
    }

    if (st != yajl_status_ok) {
        k->failed = 1;
        return MOE_EINVAL;
    }

    return 0;
}


int
moe_prefix_key_finish(moe_prefix_key_t *k, uint64_t *hash)
{
    uint64_t  x;

    if (!k->done && !k->failed) {
        (void) yajl_complete_parse(k->h);
    }

    if (!k->done || k->used == 0) {
        return MOE_EINVAL;
    }

    /* murmur3's finalizer: every input bit moves every output bit */
    x = k->hash;
    x ^= x >> 33;
    x *= 0xff51afd7ed558ccdULL;
    x ^= x >> 33;
    x *= 0xc4ceb9fe1a85ec53ULL;
    x ^= x >> 33;

    *hash = x;

    return MOE_OK;
}


void
moe_prefix_key_destroy(moe_prefix_key_t *k)
{
    if (k == NULL) {
        return;
    }

    if (k->h) {
        yajl_free(k->h);
    }

    free(k->text);
    free(k);
}
