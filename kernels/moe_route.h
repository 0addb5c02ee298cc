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

/* The first of moe_cuda_route's launches alone: logits (T, E) (the same
 * checks and refusals). */
int moe_cuda_route_logits(const float *xf, int T, int D, const float *router,
    int E, int K, float *logits, cudaStream_t stream);
#ifdef __cplusplus
}
#endif
#endif
