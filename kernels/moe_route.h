/* MoE routing: router logits -> softmax -> top-k -> renormalise. */
#ifndef MOE_KERNELS_MOE_ROUTE_H
#define MOE_KERNELS_MOE_ROUTE_H
#include "common.h"
#ifdef __cplusplus
extern "C" {
#endif
/*
 * Mixtral semantics, in fp32: logits[e] = router[e, :] . xf[t, :], softmax
 * over all E experts, the K largest (ties to the lower index) in
 * descending order into sel[t, k], their probabilities renormalised to sum
 * 1 into selw[t, k] (renorm != 0), else the raw probabilities (Qwen2-MoE
 * norm_topk_prob false).  xf: (T, D) fp32; router: (E, D) fp32;
 * sel: (T, K) int32; selw: (T, K) fp32.  E <= 256, K <= E
 * (MOE_K_EUNSUPPORTED otherwise).  margin (T) fp32, may be NULL: the
 * K-th largest probability minus the (K+1)-th (1 when K == E): how near
 * the token's choice is to a flip.  logits: (T, E) fp32 workspace on the
 * device (overwritten).  Two launches, grid over (expert, token tile): no
 * single-block stage, so T = 1 uses many SMs.
 */
int moe_cuda_route(const float *xf, int T, int D, const float *router, int E,
    int K, int renorm, float *logits, int32_t *sel, float *selw, float *margin,
    cudaStream_t stream);
/* Most tokens moe_cuda_norm_route takes (its single block does them). */
#define MOE_NORM_ROUTE_MAX_T 8
/*
 * A decode step's MoE FFN entry in one launch (one block): the residual
 * add and RMSNorm of moe_cuda_add_rmsnorm over rows 0 .. T - 1 (x, delta
 * (may be NULL), w, eps; xb the bf16 output, xf the fp32 one, both
 * (T, D)), then moe_cuda_route over xf (router .. margin as there), then
 * moe_cuda_moe_permute of the T * K slots (offs, erow, slot_of, tot as
 * there).  x, xb, xf as the separate launches write them, bit for bit;
 * the logits summed in another order (fp32 rounding apart), so the
 * weights and margins too, and the choices wherever two probabilities do
 * not tie within that.  Needs 1 <= T <= MOE_NORM_ROUTE_MAX_T, T * ceil(E
 * / 8) <= 8, D % 4 == 0 and D <= 32768, K <= E, x / delta / w / xf /
 * router 16-byte and xb 8-byte aligned: MOE_K_EUNSUPPORTED otherwise (the
 * caller runs the separate launches).
 */
int moe_cuda_norm_route(float *x, const float *delta, int T, int D,
    const float *w, float eps, moe_bf16_t *xb, float *xf,
    const float *router, int E, int K, int renorm, float *logits,
    int32_t *sel, float *selw, float *margin, int32_t *offs, int32_t *erow,
    int32_t *slot_of, int64_t *tot, cudaStream_t stream);
#ifdef __cplusplus
}
#endif
#endif
