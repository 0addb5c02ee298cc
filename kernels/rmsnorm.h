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
/*
 * moe_cuda_add_rmsnorm (D % 4 == 0 rows, 16-byte aligned) with the delta
 * given as unscaled fp8 products in bf16: delta[r, d] = dq[r * D + d] *
 * (qs[r] * ws[d]) in fp32, exactly what moe_cuda_fp8_rescale_rows_bf16
 * (ws_stride 0, no groups) stores, so the result is bit for bit that
 * rescale followed by moe_cuda_add_rmsnorm, in one pass over half the
 * delta's bytes.  Needs D % 4 == 0, D <= 32768, x / ws / w / out_f32
 * 16-byte and dq / out 8-byte aligned: MOE_K_EUNSUPPORTED otherwise.
 */
int moe_cuda_add_rmsnorm_q(float *x, const moe_bf16_t *dq, const float *qs,
    const float *ws, const int32_t *rows, int n_rows, int D, const float *w,
    float eps, moe_bf16_t *out, float *out_f32, cudaStream_t stream);
/*
 * The MoE un-permute fused into the next norm (decode: one launch instead
 * of two): moe_cuda_add_rmsnorm with delta[r, :] the weighted sum of
 * token r's expert rows, as moe_cuda_moe_unpermute computes it (ye, sel,
 * selw, slot_of and K as there; r = rows ? rows[i] : i), bit for bit the
 * two launches' results; the delta itself is not stored.  Needs D % 4 ==
 * 0, D <= 32768, K <= 64, x / ye / w / out_f32 16-byte and out 8-byte
 * aligned: MOE_K_EUNSUPPORTED otherwise (the caller runs the two).
 */
int moe_cuda_unpermute_rmsnorm(float *x, const float *ye, const int32_t *sel,
    const float *selw, const int32_t *slot_of, int K, const int32_t *rows,
    int n_rows, int D, const float *w, float eps, moe_bf16_t *out,
    float *out_f32, cudaStream_t stream);
/*
 * The same when the expert rows are the unscaled products of the fp8
 * down projection (the prefill's fused FFN): expert row j's value is
 * yq[j, d] (bf16) * (qh[j] * ws[e * ws_stride + d]) with e the expert of
 * the slot (sel), computed as moe_cuda_fp8_rescale_rows_bf16 computes it,
 * so the result is bit for bit that rescale into ye followed by
 * moe_cuda_unpermute_rmsnorm; one pass over half the bytes, no ye.
 * Rows of yq: slot_of's (the step's expert rows from 0).  Needs, besides
 * the above, ws_stride % 4 == 0, ws 16-byte and yq 8-byte aligned.
 */
int moe_cuda_unpermute_rmsnorm_q(float *x, const moe_bf16_t *yq,
    const float *qh, const float *ws, size_t ws_stride, const int32_t *sel,
    const float *selw, const int32_t *slot_of, int K, const int32_t *rows,
    int n_rows, int D, const float *w, float eps, moe_bf16_t *out,
    float *out_f32, cudaStream_t stream);
#ifdef __cplusplus
}
#endif
#endif
