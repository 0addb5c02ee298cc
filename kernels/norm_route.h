/* Decode's FFN norm and MoE router for one token in one launch. */
#ifndef MOE_KERNELS_NORM_ROUTE_H
#define MOE_KERNELS_NORM_ROUTE_H
#include "common.h"
#ifdef __cplusplus
extern "C" {
#endif
/*
 * One token (one row of x): moe_cuda_add_rmsnorm(x, delta, NULL, 1, D, w,
 * eps, out, out_f32) followed by moe_cuda_route_permute(out_f32, 1, D,
 * router, E, K, renorm, logits, sel, selw, margin, offs, erow, slot_of,
 * tot), in one block of one launch, writing bit for bit what those calls
 * write (x, out, out_f32, logits, sel, selw, margin, offs, erow, slot_of,
 * tot): the same device code for the norm and the top-k, the router dot
 * products summed in the same order.  The router rows are read before
 * the kernel waits on the one before it (PDL): they are weights.  lean 0:
 * into registers where they fit (E <= 8, D <= 4096; a block of 64
 * registers a thread); lean 1: only asked into L2 (at most 32 registers
 * a thread, so the block fits beside another kernel's blocks).
 * margin and tot may be NULL.  Needs a delta,
 * moe_cuda_norm_route1_ok(D, E, K), x / delta / w / out_f32 /
 * router 16-byte and out 8-byte aligned: MOE_K_EUNSUPPORTED otherwise
 * (the caller runs the two calls).
 */
int moe_cuda_norm_route1(float *x, const float *delta, int D, const float *w,
    float eps, moe_bf16_t *out, float *out_f32, const float *router, int E,
    int K, int renorm, float *logits, int32_t *sel, float *selw,
    float *margin, int32_t *offs, int32_t *erow, int32_t *slot_of,
    int64_t *tot, int lean, cudaStream_t stream);

/* Whether moe_cuda_norm_route1 takes the shape: D % 4 == 0, D <= 8192,
 * 1 <= K <= min(E, 32), E <= 256 (no side effect). */
int moe_cuda_norm_route1_ok(int D, int E, int K);
#ifdef __cplusplus
}
#endif
#endif
