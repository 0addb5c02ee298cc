/*
 * cuBLAS is column-major: row-major Y (M, N) is column-major Y^T (N, M) =
 * W (N, K) . X^T, and row-major W (N, K) is column-major (K, N), so W goes
 * in transposed and X as is.
 */
#include "common.cuh"
#include "gemm.h"


extern "C" int
moe_cuda_gemm(cublasHandle_t h, int M, int N, int K, const moe_bf16_t *X,
    int ldx, const moe_bf16_t *W, int ldw, void *Y, int ldy, int y_bf16,
    float beta)
{
    float alpha = 1.0f;

    if (M <= 0 || N <= 0) {
        return MOE_K_OK;
    }
    MOE_CUBLAS_CHECK(cublasGemmEx(h, CUBLAS_OP_T, CUBLAS_OP_N, N, M, K,
                                  &alpha, W, CUDA_R_16BF, ldw, X, CUDA_R_16BF,
                                  ldx, &beta, Y,
                                  y_bf16 ? CUDA_R_16BF : CUDA_R_32F, ldy,
                                  CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT));
    return MOE_K_OK;
}
