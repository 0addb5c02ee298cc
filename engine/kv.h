/*
 * KV block manager (engine internal), shared by the CPU and CUDA backends.
 *
 * It hands out physical block ids 0..n_total-1 of the backend's KV pool;
 * a block holds block_size consecutive token positions of one sequence for
 * every layer.  The manager only does the book-keeping: the memory is the
 * backend's.  Engine thread only (no locking).
 */

#ifndef MOE_KV_H
#define MOE_KV_H

#include <stdint.h>

typedef struct {
    int32_t *free_ids;    /* (n_total) stack of free block ids */
    int      n_free;
    int      n_total;
    int      block_size;
} moe_blocks_t;

/* MOE_OK or MOE_ENOMEM; n_total >= 1. */
int  moe_blocks_init(moe_blocks_t *b, int n_total, int block_size);
void moe_blocks_destroy(moe_blocks_t *b);

/* Blocks needed to hold n_tokens positions. */
static inline int
moe_blocks_for(const moe_blocks_t *b, int n_tokens)
{
    return (n_tokens + b->block_size - 1) / b->block_size;
}

/*
 * Grow a sequence's block table (*table, *n, *cap; malloc()ed, owned by the
 * caller) until it covers n_tokens positions.  All or nothing: on MOE_EFULL
 * (pool exhausted) or MOE_ENOMEM the table is unchanged.
 */
int  moe_blocks_reserve(moe_blocks_t *b, int32_t **table, int *n, int *cap,
    int n_tokens);

/* Return every block of a table to the pool and empty it (*n = 0). */
void moe_blocks_release(moe_blocks_t *b, int32_t *table, int *n);

#endif /* MOE_KV_H */
