/*
 * The step check every backend runs before it touches its KV cache
 * (moe_batch_check, backend.h).  A base file: it calls no other backend
 * file, so the backends and the factory all use it without a loop.
 */

#include <stddef.h>

#include "backends/backend.h"


int
moe_batch_check(const moe_hparams_t *hp, const moe_seq_batch_t *seqs,
    int n, int n_blocks, int block_size, int max_tokens, int *n_tokens,
    size_t *n_table, int *max_ctx)
{
    int     s, i, need, T = 0, ctx = 0;
    size_t  nbt = 0;

    if (n < 0 || (n > 0 && seqs == NULL) || block_size <= 0) {
        return MOE_EINVAL;
    }

    for (s = 0; s < n; s++) {
        const moe_seq_batch_t *sq = &seqs[s];

        if (sq->n_tokens <= 0 || sq->tokens == NULL || sq->pos < 0
            || sq->block_table == NULL || sq->n_tokens > (1 << 24)
            || sq->pos > (1 << 30) - sq->n_tokens)
        {
            return MOE_EINVAL;
        }
        need = (sq->pos + sq->n_tokens + block_size - 1) / block_size;
        if (need > sq->n_blocks) {
            return MOE_EINVAL;
        }
        for (i = 0; i < need; i++) {
            if (sq->block_table[i] < 0 || sq->block_table[i] >= n_blocks) {
                return MOE_EINVAL;
            }
        }
        for (i = 0; i < sq->n_tokens; i++) {
            if (sq->tokens[i] < 0 || sq->tokens[i] >= hp->vocab_size) {
                return MOE_EINVAL;
            }
        }
        /* logit_bias: a bounded list, both arrays given (ids out of
         * the vocabulary are skipped by the backends) */
        if (sq->n_bias < 0 || sq->n_bias > MOE_MAX_LOGIT_BIAS
            || (sq->n_bias > 0
                && (sq->bias_ids == NULL || sq->bias == NULL)))
        {
            return MOE_EINVAL;
        }
        if (hp->learned_pos && sq->pos + sq->n_tokens > hp->max_pos) {
            return MOE_EINVAL;      /* past the position table */
        }
        if (T > max_tokens - sq->n_tokens) {
            return MOE_EINVAL;
        }
        T += sq->n_tokens;
        nbt += (size_t) need;
        if (sq->pos + sq->n_tokens > ctx) {
            ctx = sq->pos + sq->n_tokens;
        }
    }

    *n_tokens = T;
    if (n_table != NULL) {
        *n_table = nbt;
    }
    if (max_ctx != NULL) {
        *max_ctx = ctx;
    }
    return MOE_OK;
}
