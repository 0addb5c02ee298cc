/* Dense GEMMs through cuBLAS: bf16 inputs, fp32 accumulation. */
#ifndef MOE_KERNELS_GEMM_H
#define MOE_KERNELS_GEMM_H
#include <cublas_v2.h>
#include "common.h"
#ifdef __cplusplus
extern "C" {
#endif
/*
 * Row-major Y (M, N) = X (M, K) . W^T + beta * Y, W (N, K) as HF stores
 * linear weights.  X: bf16, leading dimension ldx (>= K); W: bf16, ldw
 * (>= K); Y: fp32 (y_bf16 == 0) or bf16 (y_bf16 == 1), ldy (>= N).
 * Compute type fp32.  Runs on the handle's stream.  M == 0: no-op.
 */
int moe_cuda_gemm(cublasHandle_t h, int M, int N, int K,
    const moe_bf16_t *X, int ldx, const moe_bf16_t *W, int ldw, void *Y,
    int ldy, int y_bf16, float beta);
#ifdef __cplusplus
}
#endif
#endif
