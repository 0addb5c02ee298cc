/* Embedding gather: x[t, :] = fp32(table[tokens[t], :]). */
#ifndef MOE_KERNELS_EMBED_H
#define MOE_KERNELS_EMBED_H
#include "common.h"
#ifdef __cplusplus
extern "C" {
#endif
/*
 * tokens: (T) int32 device, each in [0, vocab) (not checked here);
 * table: (vocab, D) bf16; x: (T, D) fp32 out.  MOE_K_OK or MOE_K_EBACKEND.
 */
int moe_cuda_embed(const int32_t *tokens, int T, const moe_bf16_t *table,
    int D, float *x, cudaStream_t stream);
#ifdef __cplusplus
}
#endif
#endif
