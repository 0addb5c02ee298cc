/*
 * KV block manager (engine internal), shared by the CPU and CUDA backends.
 *
 * It hands out physical block ids 0..n_total-1 of the backend's KV pool;
 * a block holds block_size consecutive token positions of one sequence for
 * every layer.  The manager only does the book-keeping: the memory is the
 * backend's.  Engine thread only (no locking).
 *
 * Prefix caching (when enabled): a full block is identified by a hash
 * chained over every token from position 0 to its end, so equal hashes
 * mean equal prefixes at equal positions, hence equal K/V.  Published
 * blocks are shared by reference count; when the last user releases one it
 * stays cached (least recently released first out) until a fresh block is
 * needed and none is plainly free.
 */

#ifndef MOE_KV_H
#define MOE_KV_H

#include <stdint.h>

typedef struct {
    int32_t  *free_ids;    /* (n_total) stack of plainly free blocks */
    int       n_plain;
    int       n_free;      /* plainly free + cached free */
    int       n_total;
    int       n_usable;    /* ids 0..n_usable-1 handed out (n_total
                              unless the pool grows: moe_blocks_grow) */
    int       block_size;
    int       caching;     /* prefix caching on */

    /* per block */
    int32_t  *refcnt;      /* (n_total) users of the block */
    uint8_t  *hashed;      /* (n_total) 1: published in the table */
    uint64_t *hash;        /* (n_total) its chain hash when hashed */
    int32_t  *tokens;      /* (n_total, block_size) its tokens when hashed */
    int32_t  *next;        /* (n_total) next block in its hash bucket */
    int32_t  *lru_prev;    /* (n_total) cached-free list links */
    int32_t  *lru_next;

    int32_t  *buckets;     /* (n_buckets) first block of each bucket, -1 */
    uint32_t  n_buckets;   /* power of two */
    int32_t   lru_head;    /* oldest cached-free block, -1 */
    int32_t   lru_tail;
    int       n_cached;    /* cached-free blocks */
} moe_blocks_t;

/* MOE_OK or MOE_ENOMEM; n_total >= 1. */
int  moe_blocks_init(moe_blocks_t *b, int n_total, int block_size,
    int prefix_caching);
void moe_blocks_destroy(moe_blocks_t *b);

/*
 * A pool that grows (a backend whose KV memory is not all there yet: the
 * weights imported from an old worker that still holds the GPU).  limit:
 * right after init, hand out only ids 0..n_usable-1 (1 <= n_usable <=
 * n_total; MOE_EINVAL otherwise or when blocks are in use).  grow: ids up
 * to n_usable-1 become free (a smaller or equal n_usable does nothing;
 * capped at n_total); returns the number of blocks added.
 */
int  moe_blocks_limit(moe_blocks_t *b, int n_usable);
int  moe_blocks_grow(moe_blocks_t *b, int n_usable);

/* Blocks needed to hold n_tokens positions. */
static inline int
moe_blocks_for(const moe_blocks_t *b, int n_tokens)
{
    return (n_tokens + b->block_size - 1) / b->block_size;
}

/*
 * Grow a sequence's block table (*table, *n, *cap; malloc()ed, owned by the
 * caller) with fresh blocks until it covers n_tokens positions (evicting
 * cached blocks when nothing is plainly free).  All or nothing: on
 * MOE_EFULL (pool exhausted) or MOE_ENOMEM the table is unchanged.
 */
int  moe_blocks_reserve(moe_blocks_t *b, int32_t **table, int *n, int *cap,
    int n_tokens);

/* Drop the table's references (blocks whose count reaches 0 become free,
 * or cached when published) and empty it (*n = 0). */
void moe_blocks_release(moe_blocks_t *b, int32_t *table, int *n);

/*
 * Prefix lookup for an empty table: append the cached blocks that hold
 * tokens[0..), whole blocks only, at most max_tokens positions, stopping at
 * the first miss.  hashes (capacity >= max_tokens / block_size) receives
 * the chain hash of each matched block.  Returns the number of positions
 * matched (a multiple of block_size), or a negative status.
 */
int  moe_blocks_match(moe_blocks_t *b, const int32_t *tokens, int max_tokens,
    int32_t **table, int *n, int *cap, uint64_t *hashes);

/*
 * Append blocks ids[0..n) (in use by another sequence) to a table, one
 * more reference each: a forked choice shares its parent's prompt blocks.
 * MOE_OK, or MOE_ENOMEM with the table unchanged.
 */
int  moe_blocks_share(moe_blocks_t *b, const int32_t *ids, int n,
    int32_t **table, int *tn, int *cap);

/*
 * Publish the sequence's full blocks from index `from` to `to` - 1 (tokens
 * are the sequence's tokens from position 0; hashes holds the chain hashes
 * of blocks before `from` and receives the new ones).  A block whose prefix
 * is already cached under another id stays private.
 */
void moe_blocks_publish(moe_blocks_t *b, const int32_t *table,
    const int32_t *tokens, uint64_t *hashes, int from, int to);


/*
 * Host swap slots (preemption by swapping): ids 0..n_total-1 of the
 * backend's swap pool (moe_backend_t.swap_*), a plain stack of free ids.
 * n_total may be 0 (swapping off).  Engine thread only.
 */
typedef struct {
    int32_t  *free_ids;    /* (n_total) stack of free slots */
    int       n_free;
    int       n_total;
} moe_slots_t;

/* MOE_OK or MOE_ENOMEM; n_total >= 0. */
int  moe_slots_init(moe_slots_t *s, int n_total);
void moe_slots_destroy(moe_slots_t *s);

/* Take n slots into ids (all or nothing): MOE_OK, or MOE_EFULL with
 * nothing taken. */
int  moe_slots_alloc(moe_slots_t *s, int n, int32_t *ids);

/* Give back n slots taken by moe_slots_alloc(). */
void moe_slots_free(moe_slots_t *s, const int32_t *ids, int n);

#endif /* MOE_KV_H */
