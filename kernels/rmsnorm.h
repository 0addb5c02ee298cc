/* RMSNorm fused with the residual add. */
#ifndef MOE_KERNELS_RMSNORM_H
#define MOE_KERNELS_RMSNORM_H
#include "common.h"
#ifdef __cplusplus
extern "C" {
#endif
/*
 * For i < n_rows, r = rows ? rows[i] : i:
 *   v = x[r, :] + (delta ? delta[r, :] : 0);  if delta: x[r, :] = v;
 *   out[i, :] = bf16(w * (v / sqrt(mean(v^2) + eps)));
 *   out_f32[i, :] = the same in fp32 (if out_f32 != NULL).
 * x, delta: (*, D) fp32; w: (D) fp32; out: (n_rows, D) bf16 (may be NULL);
 * rows: (n_rows) int32 device, distinct, or NULL.
 */
int moe_cuda_add_rmsnorm(float *x, const float *delta, const int32_t *rows,
    int n_rows, int D, const float *w, float eps, moe_bf16_t *out,
    float *out_f32, cudaStream_t stream);
#ifdef __cplusplus
}
#endif
#endif
