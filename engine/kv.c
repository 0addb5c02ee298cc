/*
 * KV block manager: a stack of free physical block ids.
 */

#include <stdlib.h>

#include "moe.h"
#include "kv.h"


int
moe_blocks_init(moe_blocks_t *b, int n_total, int block_size)
{
    int  i;

    if (n_total < 1 || block_size < 1) {
        return MOE_EINVAL;
    }

    b->free_ids = malloc(sizeof(int32_t) * (size_t) n_total);
    if (b->free_ids == NULL) {
        return MOE_ENOMEM;
    }

    /* pop order 0, 1, 2, ...: low ids first keeps early tests readable */
    for (i = 0; i < n_total; i++) {
        b->free_ids[i] = n_total - 1 - i;
    }

    b->n_free = n_total;
    b->n_total = n_total;
    b->block_size = block_size;

    return MOE_OK;
}


void
moe_blocks_destroy(moe_blocks_t *b)
{
    free(b->free_ids);
    b->free_ids = NULL;
    b->n_free = b->n_total = 0;
}


int
moe_blocks_reserve(moe_blocks_t *b, int32_t **table, int *n, int *cap,
    int n_tokens)
{
    int       need, i;
    int32_t  *t;

    need = moe_blocks_for(b, n_tokens) - *n;
    if (need <= 0) {
        return MOE_OK;
    }

    if (need > b->n_free) {
        return MOE_EFULL;
    }

    if (*n + need > *cap) {
        int newcap = *cap ? *cap : 8;

        while (newcap < *n + need) {
            newcap *= 2;
        }

        t = realloc(*table, sizeof(int32_t) * (size_t) newcap);
        if (t == NULL) {
            return MOE_ENOMEM;
        }

        *table = t;
        *cap = newcap;
    }

    for (i = 0; i < need; i++) {
        (*table)[(*n)++] = b->free_ids[--b->n_free];
    }

    return MOE_OK;
}


void
moe_blocks_release(moe_blocks_t *b, int32_t *table, int *n)
{
    int  i;

    for (i = *n - 1; i >= 0; i--) {
        b->free_ids[b->n_free++] = table[i];
    }

    *n = 0;
}
