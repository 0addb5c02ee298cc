/* Guided decoding on the device: an allowed-token bitmask over logits. */
#ifndef MOE_KERNELS_MASK_H
#define MOE_KERNELS_MASK_H
#include "common.h"
#ifdef __cplusplus
extern "C" {
#endif
/*
 * logits: (rows, ld) fp32, modified in place; mask: (rows, mask_ld) uint32
 * words (device), bit (i & 31) of mask[r, i >> 5] set when id i may be
 * the next token of row r.  Every id i < V whose bit is clear reads -inf
 * afterwards (so the argmax and the sampler never pick it); the others
 * are untouched.  mask_ld >= (V + 31) / 32.  Reads everything on the
 * device (graph-capturable).  rows <= 0: nothing.  MOE_K_EBACKEND on a
 * bad shape or a failed launch.
 */
int moe_cuda_mask_rows(float *logits, int64_t ld, int rows, int V,
    const uint32_t *mask, int64_t mask_ld, cudaStream_t stream);
#ifdef __cplusplus
}
#endif
#endif
