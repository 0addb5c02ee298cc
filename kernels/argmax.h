/* Greedy selection on the device: argmax of each row of fp32 logits. */
#ifndef MOE_KERNELS_ARGMAX_H
#define MOE_KERNELS_ARGMAX_H
#include "common.h"
#ifdef __cplusplus
extern "C" {
#endif
/*
 * x: (rows, ld) fp32; out: (rows) int32.  out[r] = the id i < n of the
 * largest x[r, i] (fp32 compare; ties: the lowest id, exactly as the host
 * greedy sampler), where n = n_valid[r] when n_valid != NULL (a device
 * array of rows ints) and 0 < n_valid[r] < V, else V.  NaNs are never
 * chosen; a row with nothing else gives 0.  One block per row; reads
 * n_valid on the device, so it may be captured in a graph.  rows <= 0:
 * nothing.
 */
int moe_cuda_argmax_rows(const float *x, int64_t ld, int rows, int V,
    const int32_t *n_valid, int32_t *out, cudaStream_t stream);
#ifdef __cplusplus
}
#endif
#endif
