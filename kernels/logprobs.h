/* Logprobs on the device: log-softmax of a row at one id plus its top k. */
#ifndef MOE_KERNELS_LOGPROBS_H
#define MOE_KERNELS_LOGPROBS_H
#include "common.h"
#ifdef __cplusplus
extern "C" {
#endif

/* the most top entries a row may ask for (OpenAI's top_logprobs limit) */
#define MOE_K_LOGPROBS_MAX_K  20

typedef struct {
    float    inv_temperature;    /* 1 / T of the row's distribution (1
                                    for greedy) */
    int32_t  n_valid;            /* ids considered: i < n_valid when
                                    0 < n_valid < V, else all V */
    int32_t  k;                  /* top entries, 0..MOE_K_LOGPROBS_MAX_K */
    int32_t  enabled;            /* 0: the row is left alone */
} moe_cuda_logprobs_param_t;

/*
 * One block per enabled row r of logits (rows, ld) fp32 (read only):
 * with n ids considered (params[r].n_valid) and s = inv_temperature,
 *   lp[r] = s * (x[chosen[r]] - max) - log(sum_i exp(s * (x[i] - max)))
 * (NAN when chosen[r] is not in [0, n)), and the k largest x[r, i] as
 * top_id[r * MOE_K_LOGPROBS_MAX_K + j] / top_lp[...] in descending order,
 * ties by ascending id (the host's moe_logprobs_row() order); entries past
 * min(k, n) are id -1.  NaN logits are skipped.  The sum runs in double.
 * params, chosen, lp, top_id, top_lp are device pointers; reads them on
 * the device (graph-safe).  rows <= 0: nothing.  MOE_K_EBACKEND on a bad
 * shape or a failed launch.
 */
int moe_cuda_logprobs_rows(const float *logits, int64_t ld, int rows, int V,
    const moe_cuda_logprobs_param_t *params, const int32_t *chosen,
    float *lp, int32_t *top_id, float *top_lp, cudaStream_t stream);

#ifdef __cplusplus
}
#endif
#endif
