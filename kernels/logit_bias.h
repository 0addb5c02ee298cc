/* logit_bias on the device: per-row (id, bias) lists added to logits. */
#ifndef MOE_KERNELS_LOGIT_BIAS_H
#define MOE_KERNELS_LOGIT_BIAS_H
#include "common.h"
#ifdef __cplusplus
extern "C" {
#endif
/*
 * logits: (rows, ld) fp32, modified in place.  Row r's list is entries
 * off[r] .. off[r] + cnt[r] of ids / bias (device arrays); for each entry
 * in list order, bias[j] is added to logits[r, ids[j]] when 0 <= ids[j] <
 * V (other ids are skipped), so an id listed twice gets both additions in
 * the same order as the host loop (moe_sample_u) and the same fp32 sum.
 * cnt[r] 0: the row is untouched.  Reads everything on the device
 * (graph-capturable).  rows <= 0: nothing.  MOE_K_EBACKEND on a bad shape
 * or a failed launch.
 */
int moe_cuda_logit_bias_rows(float *logits, int64_t ld, int rows, int V,
    const int32_t *off, const int32_t *cnt, const int32_t *ids,
    const float *bias, cudaStream_t stream);
#ifdef __cplusplus
}
#endif
#endif
