/*
 * KV block manager: a stack of free block ids, plus the prefix cache
 * (reference counts, a chained hash table of published blocks and an LRU
 * list of cached blocks nobody uses).
 */

#include <stdlib.h>
#include <string.h>

#include "moe.h"
#include "sched/kv.h"


int
moe_blocks_init(moe_blocks_t *b, int n_total, int block_size,
    int prefix_caching)
{
    int  i;

    memset(b, 0, sizeof(*b));

    if (n_total < 1 || block_size < 1) {
        return MOE_EINVAL;
    }

    b->n_buckets = 16;
    while (b->n_buckets < (uint32_t) n_total) {
        b->n_buckets <<= 1;
    }

    b->free_ids = malloc(sizeof(int32_t) * (size_t) n_total);
    b->refcnt = calloc((size_t) n_total, sizeof(int32_t));
    b->hashed = calloc((size_t) n_total, 1);
    b->hash = calloc((size_t) n_total, sizeof(uint64_t));
    b->next = malloc(sizeof(int32_t) * (size_t) n_total);
    b->lru_prev = malloc(sizeof(int32_t) * (size_t) n_total);
    b->lru_next = malloc(sizeof(int32_t) * (size_t) n_total);
    b->buckets = malloc(sizeof(int32_t) * b->n_buckets);
    b->tokens = prefix_caching
                ? malloc(sizeof(int32_t) * (size_t) n_total
                         * (size_t) block_size)
                : NULL;

    if (b->free_ids == NULL || b->refcnt == NULL || b->hashed == NULL
        || b->hash == NULL || b->next == NULL || b->lru_prev == NULL
        || b->lru_next == NULL || b->buckets == NULL
        || (prefix_caching && b->tokens == NULL))
    {
        moe_blocks_destroy(b);
        return MOE_ENOMEM;
    }

    /* pop order 0, 1, 2, ...: low ids first keeps early tests readable */
    for (i = 0; i < n_total; i++) {
        b->free_ids[i] = n_total - 1 - i;
    }
    memset(b->buckets, 0xff, sizeof(int32_t) * b->n_buckets);

    b->n_plain = n_total;
    b->n_free = n_total;
    b->n_total = n_total;
    b->n_usable = n_total;
    b->block_size = block_size;
    b->caching = prefix_caching;
    b->lru_head = b->lru_tail = -1;

    return MOE_OK;
}


int
moe_blocks_limit(moe_blocks_t *b, int n_usable)
{
    int  i;

    if (n_usable < 1 || n_usable > b->n_total || b->n_plain != b->n_usable
        || b->n_free != b->n_usable)
    {
        return MOE_EINVAL;
    }
    for (i = 0; i < n_usable; i++) {
        b->free_ids[i] = n_usable - 1 - i;
    }
    b->n_plain = n_usable;
    b->n_free = n_usable;
    b->n_usable = n_usable;
    return MOE_OK;
}


int
moe_blocks_grow(moe_blocks_t *b, int n_usable)
{
    int  id, added;

    if (n_usable > b->n_total) {
        n_usable = b->n_total;
    }
    if (n_usable <= b->n_usable) {
        return 0;
    }
    /* pushed highest first: the lowest new id is handed out first */
    for (id = n_usable - 1; id >= b->n_usable; id--) {
        b->free_ids[b->n_plain++] = id;
    }
    added = n_usable - b->n_usable;
    b->n_free += added;
    b->n_usable = n_usable;
    return added;
}


void
moe_blocks_destroy(moe_blocks_t *b)
{
    free(b->free_ids);
    free(b->refcnt);
    free(b->hashed);
    free(b->hash);
    free(b->tokens);
    free(b->next);
    free(b->lru_prev);
    free(b->lru_next);
    free(b->buckets);
    memset(b, 0, sizeof(*b));
}


static void
moe_lru_unlink(moe_blocks_t *b, int32_t id)
{
    int32_t  p = b->lru_prev[id], n = b->lru_next[id];

    if (p >= 0) b->lru_next[p] = n; else b->lru_head = n;
    if (n >= 0) b->lru_prev[n] = p; else b->lru_tail = p;
    b->n_cached--;
}


static void
moe_lru_push(moe_blocks_t *b, int32_t id)
{
    b->lru_prev[id] = b->lru_tail;
    b->lru_next[id] = -1;
    if (b->lru_tail >= 0) b->lru_next[b->lru_tail] = id;
    else b->lru_head = id;
    b->lru_tail = id;
    b->n_cached++;
}


static void
moe_table_remove(moe_blocks_t *b, int32_t id)
{
    int32_t  *pp = &b->buckets[b->hash[id] & (b->n_buckets - 1)];

    while (*pp >= 0 && *pp != id) {
        pp = &b->next[*pp];
    }
    if (*pp == id) {
        *pp = b->next[id];
    }
    b->hashed[id] = 0;
}


static int32_t
moe_table_find(const moe_blocks_t *b, uint64_t h, const int32_t *tokens)
{
    int32_t  id = b->buckets[h & (b->n_buckets - 1)];
    size_t   bs = (size_t) b->block_size;

    for ( /* void */ ; id >= 0; id = b->next[id]) {
        /* the tokens too: a 64-bit collision must not share wrong K/V */
        if (b->hash[id] == h
            && memcmp(b->tokens + (size_t) id * bs, tokens,
                      bs * sizeof(int32_t)) == 0)
        {
            return id;
        }
    }
    return -1;
}


/* FNV-1a over the previous hash and the block's tokens */
static uint64_t
moe_chain_hash(uint64_t prev, const int32_t *tokens, int n)
{
    uint64_t       h = 0xcbf29ce484222325ULL ^ prev;
    const uint8_t *p = (const uint8_t *) tokens;
    size_t         i, len = (size_t) n * sizeof(int32_t);

    for (i = 0; i < len; i++) {
        h = (h ^ p[i]) * 0x100000001b3ULL;
    }
    return h ^ (h >> 29);
}


static int
moe_table_grow(int32_t **table, int *cap, int want)
{
    int       newcap = *cap ? *cap : 8;
    int32_t  *t;

    if (want <= *cap) {
        return MOE_OK;
    }
    while (newcap < want) {
        newcap *= 2;
    }
    t = realloc(*table, sizeof(int32_t) * (size_t) newcap);
    if (t == NULL) {
        return MOE_ENOMEM;
    }
    *table = t;
    *cap = newcap;
    return MOE_OK;
}


int
moe_blocks_reserve(moe_blocks_t *b, int32_t **table, int *n, int *cap,
    int n_tokens)
{
    int      need, i;
    int32_t  id;

    need = moe_blocks_for(b, n_tokens) - *n;
    if (need <= 0) {
        return MOE_OK;
    }

    if (need > b->n_free) {
        return MOE_EFULL;
    }

    if (moe_table_grow(table, cap, *n + need) != MOE_OK) {
        return MOE_ENOMEM;
    }

    for (i = 0; i < need; i++) {
        if (b->n_plain > 0) {
            id = b->free_ids[--b->n_plain];
        } else {
            /* evict the least recently released cached block */
            id = b->lru_head;
            moe_lru_unlink(b, id);
            moe_table_remove(b, id);
        }
        b->refcnt[id] = 1;
        b->n_free--;
        (*table)[(*n)++] = id;
    }

    return MOE_OK;
}


void
moe_blocks_release(moe_blocks_t *b, int32_t *table, int *n)
{
    int      i;
    int32_t  id;

    for (i = *n - 1; i >= 0; i--) {
        id = table[i];
        if (--b->refcnt[id] > 0) {
            continue;
        }
        b->n_free++;
        if (b->hashed[id]) {
            moe_lru_push(b, id);
        } else {
            b->free_ids[b->n_plain++] = id;
        }
    }

    *n = 0;
}


int
moe_blocks_share(moe_blocks_t *b, const int32_t *ids, int n,
    int32_t **table, int *tn, int *cap)
{
    int  i;

    if (moe_table_grow(table, cap, *tn + n) != MOE_OK) {
        return MOE_ENOMEM;
    }
    for (i = 0; i < n; i++) {
        b->refcnt[ids[i]]++;
        (*table)[(*tn)++] = ids[i];
    }
    return MOE_OK;
}


int
moe_blocks_match(moe_blocks_t *b, const int32_t *tokens, int max_tokens,
    int32_t **table, int *n, int *cap, uint64_t *hashes)
{
    int       i, bs = b->block_size;
    uint64_t  h = 0;
    int32_t   id;

    if (!b->caching || *n != 0) {
        return 0;
    }

    for (i = 0; (i + 1) * bs <= max_tokens; i++) {
        h = moe_chain_hash(h, tokens + (size_t) i * bs, bs);
        id = moe_table_find(b, h, tokens + (size_t) i * bs);
        if (id < 0) {
            break;
        }
        if (moe_table_grow(table, cap, i + 1) != MOE_OK) {
            break;
        }
        if (b->refcnt[id]++ == 0) {
            /* it was cached and free: in use again */
            moe_lru_unlink(b, id);
            b->n_free--;
        }
        (*table)[(*n)++] = id;
        hashes[i] = h;
    }

    return *n * bs;
}


void
moe_blocks_publish(moe_blocks_t *b, const int32_t *table,
    const int32_t *tokens, uint64_t *hashes, int from, int to)
{
    int       i, bs = b->block_size;
    uint64_t  h;
    int32_t   id;
    uint32_t  k;

    if (!b->caching) {
        return;
    }

    for (i = from; i < to; i++) {
        h = moe_chain_hash(i > 0 ? hashes[i - 1] : 0,
                           tokens + (size_t) i * bs, bs);
        hashes[i] = h;
        id = table[i];

        if (b->hashed[id]
            || moe_table_find(b, h, tokens + (size_t) i * bs) >= 0)
        {
            continue;
        }

        memcpy(b->tokens + (size_t) id * bs, tokens + (size_t) i * bs,
               sizeof(int32_t) * (size_t) bs);
        b->hash[id] = h;
        b->hashed[id] = 1;
        k = (uint32_t) (h & (b->n_buckets - 1));
        b->next[id] = b->buckets[k];
        b->buckets[k] = id;
    }
}


/* ------------------------------------------------------ host swap slots */

int
moe_slots_init(moe_slots_t *s, int n_total)
{
    int  i;

    memset(s, 0, sizeof(*s));
    if (n_total < 0) {
        return MOE_EINVAL;
    }
    if (n_total == 0) {
        return MOE_OK;
    }

    s->free_ids = malloc(sizeof(int32_t) * (size_t) n_total);
    if (s->free_ids == NULL) {
        return MOE_ENOMEM;
    }
    for (i = 0; i < n_total; i++) {
        s->free_ids[i] = n_total - 1 - i;
    }
    s->n_free = s->n_total = n_total;
    return MOE_OK;
}


void
moe_slots_destroy(moe_slots_t *s)
{
    free(s->free_ids);
    memset(s, 0, sizeof(*s));
}


int
moe_slots_alloc(moe_slots_t *s, int n, int32_t *ids)
{
    int  i;

    if (n > s->n_free) {
        return MOE_EFULL;
    }
    for (i = 0; i < n; i++) {
        ids[i] = s->free_ids[--s->n_free];
    }
    return MOE_OK;
}


void
moe_slots_free(moe_slots_t *s, const int32_t *ids, int n)
{
    int  i;

    for (i = n - 1; i >= 0; i--) {
        s->free_ids[s->n_free++] = ids[i];
    }
}
