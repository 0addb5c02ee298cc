/*
 * Grouped small-M GEMM ("GEMV") for decode-sized steps: every expert's
 * weights are streamed from device memory once per 64 of its tokens, all
 * experts of a layer in one launch, the per-expert row ranges read on the
 * device (no host sync).  Two kernels: kernel_gemv_fma (CUDA cores, groups
 * of 1-4 rows per pass) and kernel_gemv_mma (tensor cores, more rows).
 */
#ifndef MOE_KERNELS_MOE_GEMV_H
#define MOE_KERNELS_MOE_GEMV_H
#include "common.h"
#include "tuning.h"
#ifdef __cplusplus
extern "C" {
#endif
/*
 * For each group e < E with rows [r0, r1) = [offs[e], offs[e+1]) (offs
 * NULL: one group, rows [0, n)), and each output column j < N:
 *   acc[r, j] = sum_k X[xr(r), k] * W_e[j, k],
 *   xr(r) = xrow ? xrow[r] / xdiv : r   (gathered input rows)
 * W_e = W + e * (silu ? 2 N : N) * Kd, row-major (rows, Kd) bf16.
 * silu == 0: Y[r * ldy + j] = acc (fp32).
 * silu == 1: W_e has 2N rows, gate rows [0, N) then up rows [N, 2N);
 *   H[r * ldy + j] = bf16(silu(gate) * up)  (H bf16).
 * X: bf16 rows of leading dimension ldx (>= Kd, multiple of 8).
 * Kd % 8 == 0 (else MOE_K_EUNSUPPORTED).  max_rows: an upper bound on the
 * rows of any one group (chooses the tile; any count stays correct: a
 * group of more than 64 rows takes several passes over its weights).
 * offs is (E + 1) int32 on the device.  With offs, n is the total rows
 * offs[E] (an upper bound suffices; 0: unknown): when n < E only n
 * groups can be non-empty and the grid covers only n groups.
 * tune (NULL: the defaults): max_rows <= tune->gemv_fma_rows (and <= 4)
 * takes the CUDA-core kernel, larger hints the tensor-core one.
 */
int moe_cuda_gemv(const moe_bf16_t *X, int ldx, const int32_t *xrow,
    int xdiv, const moe_bf16_t *W, int N, int Kd, const int32_t *offs,
    int E, int n, int max_rows, int silu, float *Y, moe_bf16_t *H, int ldy,
    const moe_cuda_tuning_t *tune, cudaStream_t stream);

/* Whether moe_cuda_gemv supports this shape (Kd % 8 == 0, ldx % 8 == 0). */
int moe_cuda_gemv_supported(int Kd, int ldx);
#ifdef __cplusplus
}
#endif
#endif
