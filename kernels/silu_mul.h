/* SwiGLU activation: h = silu(gate) * up. */
#ifndef MOE_KERNELS_SILU_MUL_H
#define MOE_KERNELS_SILU_MUL_H
#include "common.h"
#ifdef __cplusplus
extern "C" {
#endif
/*
 * gu: (R, 2F) fp32, row = [gate (F) | up (F)]; h: (R, F) bf16 out,
 * h[r, j] = bf16(g / (1 + exp(-g)) * u).
 */
int moe_cuda_silu_mul(const float *gu, int R, int F, moe_bf16_t *h,
    cudaStream_t stream);
#ifdef __cplusplus
}
#endif
#endif
