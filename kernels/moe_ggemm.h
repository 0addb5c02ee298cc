/*
 * Grouped tensor-core GEMM for MoE expert layers at 8-64 tokens per
 * expert: every expert's weights are streamed through shared memory (cp.async
 * pipeline) once per token tile, all experts of a layer in one launch, the
 * per-expert row ranges read on the device (no host sync; the grid depends
 * only on N, E and n, so a launch can be captured in a CUDA graph).  The
 * same contract as moe_cuda_gemv (moe_gemv.h) without its max_rows hint.
 */
#ifndef MOE_KERNELS_MOE_GGEMM_H
#define MOE_KERNELS_MOE_GGEMM_H
#include "common.h"
#ifdef __cplusplus
extern "C" {
#endif
/*
 * For each group e < E with rows [r0, r1) = [offs[e], offs[e+1]) (offs
 * NULL: one group, E must be 1, rows [0, n)), and each output column
 * j < N:
 *   acc[r, j] = sum_k X[xr(r), k] * W_e[j, k],
 *   xr(r) = xrow ? xrow[r] / xdiv : r   (gathered input rows)
 * W_e = W + e * (silu ? 2 N : N) * Kd, row-major (rows, Kd) bf16.
 * silu == 0: Y[r * ldy + j] = acc (fp32).
 * silu == 1: W_e has 2N rows, gate rows [0, N) then up rows [N, 2N);
 *   H[r * ldy + j] = bf16(silu(gate) * up)  (H bf16).
 * X: bf16 rows of leading dimension ldx; X, W 16-byte aligned.
 * offs: (E + 1) int32 on the device; n: an upper bound of offs[E] (the
 * total rows; it chooses the token tile, and with n < E the grid covers
 * only n groups, each block finding its non-empty group on the device).
 * n == 0: nothing to do (MOE_K_OK).  Unsupported shapes (see below):
 * MOE_K_EUNSUPPORTED.  Any group size is correct: a group of more rows than
 * the token tile takes several passes over its weights.
 */
int moe_cuda_ggemm(const moe_bf16_t *X, int ldx, const int32_t *xrow,
    int xdiv, const moe_bf16_t *W, int N, int Kd, const int32_t *offs,
    int E, int n, int silu, float *Y, moe_bf16_t *H, int ldy,
    cudaStream_t stream);

/* Whether moe_cuda_ggemm supports this shape: N > 0, Kd > 0, Kd % 8 == 0,
 * ldx % 8 == 0, ldx >= Kd (any N; Kd % 64 == 0 wastes nothing). */
int moe_cuda_ggemm_supported(int N, int Kd, int ldx);

/*
 * The tile moe_cuda_ggemm chooses for a launch of these sizes (the same
 * arguments): *bt tokens per tile (16, 32 or 64; about 1.5x the mean rows
 * per group), *mt 16-row weight tiles per warp (2: 128 weight rows per
 * block, 3 pipeline stages, when that still gives 3 blocks per SM at
 * bt <= 32; else 1: 64 rows, 4 stages).  Reads the device's SM count once.
 */
void moe_cuda_ggemm_pick(int N, int E, int n, int silu, const int32_t *offs,
    int *bt, int *mt);

/*
 * moe_cuda_ggemm with the tile given instead of picked (tests run every
 * shipped tile on one shape): bt/mt one of 16/1, 16/2, 32/1, 32/2, 64/1,
 * else MOE_K_EUNSUPPORTED.  Other variants (64/2, the L2 prefetch) live in
 * bench/dev.
 */
int moe_cuda_ggemm_tiled(const moe_bf16_t *X, int ldx, const int32_t *xrow,
    int xdiv, const moe_bf16_t *W, int N, int Kd, const int32_t *offs,
    int E, int n, int silu, float *Y, moe_bf16_t *H, int ldy, int bt,
    int mt, cudaStream_t stream);

/*
 * moe_cuda_ggemm's contract with e4m3 weights and scales by mode, exactly
 * as moe_cuda_gemv_fp8 (moe_gemv.h: layouts, rounding, requirements
 * Kd % 16 == 0, ldx % 8 == 0, block scales with silu need N % 128 == 0).
 * kernel_ggemm_fp8 (moe_gemv_fp8.cu): 64 weight rows per block, token
 * tile 16 / 32 / 64 picked from the mean rows per group (as
 * moe_cuda_ggemm); any group size is correct.  Graph-safe.
 */
int moe_cuda_ggemm_fp8(const moe_bf16_t *X, int ldx, const int32_t *xrow,
    int xdiv, const uint8_t *W, const float *scale, int mode, int N, int Kd,
    const int32_t *offs, int E, int n, int silu, float *Y, moe_bf16_t *H,
    int ldy, cudaStream_t stream);

/* moe_cuda_ggemm_fp8 with the token tile bt (16, 32 or 64) given. */
int moe_cuda_ggemm_fp8_tiled(const moe_bf16_t *X, int ldx,
    const int32_t *xrow, int xdiv, const uint8_t *W, const float *scale,
    int mode, int N, int Kd, const int32_t *offs, int E, int n, int silu,
    float *Y, moe_bf16_t *H, int ldy, int bt, cudaStream_t stream);

/*
 * Rows [0, n) of X (bf16, Kd wide, ld ldx) as f16 into Xh (ld ldh), each
 * row r times its own power of two 2^d, d chosen from the row's largest
 * |x| so that it lands in [2^14, 2^15) (clamped to +-120): every bf16
 * value from 2^-29 of the row's largest up is exact in f16 and none
 * overflows; sinv[r] = 2^-d.  One block a row (kernel_rows_f16).  Kd %
 * 8 == 0, ldx and ldh >= Kd and % 8 == 0, X and Xh 16-byte aligned, sinv
 * not NULL (else MOE_K_EUNSUPPORTED); n 0 is a no-op.  Graph-safe.
 */
int moe_cuda_rows_f16(const moe_bf16_t *X, int ldx, int n, int Kd,
    uint16_t *Xh, int ldh, float *sinv, cudaStream_t stream);

/*
 * moe_cuda_ggemm_fp8 on f16 fragments: the tokens are the f16 rows Xh
 * (ld ldh) and their sinv made by moe_cuda_rows_f16 (gathered rows:
 * xrow[r] / xdiv indexes both), the e4m3 weights convert exactly to f16
 * (cvt.rn.f16x2.e4m3x2, one instruction per two weights against ~4.5
 * for bf16 fragments), mma.m16n8k16.f16 with fp32 accumulation, each
 * token's sums times its sinv.  Same sums as moe_cuda_ggemm_fp8 up to
 * fp32 order and the f16 staging's flush below 2^-29 of a row's
 * largest; the NaN codes give NaN.  bt: 16, 32, 64, or 0 picked as
 * moe_cuda_ggemm_fp8 picks it.  Requirements as moe_cuda_ggemm_fp8 with
 * ldh for ldx, sinv not NULL.
 */
int moe_cuda_ggemm_fp8h(const uint16_t *Xh, int ldh, const float *sinv,
    const int32_t *xrow, int xdiv, const uint8_t *W, const float *scale,
    int mode, int N, int Kd, const int32_t *offs, int E, int n, int silu,
    float *Y, moe_bf16_t *H, int ldy, int bt, cudaStream_t stream);
#ifdef __cplusplus
}
#endif
#endif
