/* Tensor-parallel all-reduce add: the ranks' partial sums, ranks in order. */
#ifndef MOE_KERNELS_TP_SUM_H
#define MOE_KERNELS_TP_SUM_H
#include <stddef.h>
#include "common.h"
#ifdef __cplusplus
extern "C" {
#endif

#define MOE_K_TP_MAX 64              /* most ranks one call adds */

/*
 * dst[i] = srcs[0][i] + srcs[1][i] + ... + srcs[R-1][i] for lo <= i < hi,
 * added in rank order in fp32 (so every rank that computes a slice gets
 * the same bits); a NULL srcs[r] adds nothing.  srcs is a host array of R
 * device pointers (read at the call); the buffers may live on other
 * devices with peer access enabled.  Enqueued on stream.  MOE_K_OK,
 * MOE_K_EINVAL (R outside 1..MOE_K_TP_MAX) or MOE_K_EBACKEND.
 */
int moe_cuda_tp_sum(float *dst, float *const *srcs, int R, size_t lo,
    size_t hi, cudaStream_t stream);

#ifdef __cplusplus
}
#endif
#endif
