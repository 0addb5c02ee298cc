/*
 * Grouped small-M GEMM ("GEMV") for decode-sized steps: every expert's
 * weights are streamed from device memory once per 64 of its tokens, all
 * experts of a layer in one launch, the per-expert row ranges read on the
 * device (no host sync).  Two kernels: kernel_gemv_fma (CUDA cores, groups
 * of 1-4 rows per pass) and kernel_gemv_mma (tensor cores, more rows);
 * with e4m3 weights kernel_gemv_fp8 (moe_gemv_fp8.cu, tensor cores).
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

/*
 * moe_cuda_gemv's contract with e4m3 weights (kernels/moe_gemv_fp8.cu):
 * W_e = W + e * R * Kd bytes, R = silu ? 2 N : N rows of Kd e4m3 (HF
 * (out, in) layout), dequantized w[j][k] = e4m3(W_e[j][k]) * s(e, j, k):
 *   mode MOE_K_FP8_TENSOR (quant_gemv.h): s = scale[e * (silu ? 2 : 1)
 *        + (silu && j >= N)]  (gate and up keep their own tensor scales)
 *   mode MOE_K_FP8_CHANNEL: s = scale[e * R + j]
 *   mode MOE_K_FP8_BLOCK (128x128): s = scale[e * nb + (j / 128) * kb
 *        + k / 128], kb = ceil(Kd / 128), nb = ceil(R / 128) * kb; with
 *        silu N % 128 == 0 is required.
 * Activations stay bf16; products (exact: e4m3 x bf16 fits the mma's
 * fp32 product) accumulate in fp32.  Tensor / channel scales multiply
 * the fp32 sum of a row; block scales multiply each 128-k fp32 partial
 * sum, added in fp32.  The NaN codes 0x7f / 0xff decode as +-480.
 * Requires Kd % 16 == 0, ldx % 8 == 0, ldx >= Kd, X and W 16-byte
 * aligned (else MOE_K_EUNSUPPORTED, see moe_cuda_fp8_supported).
 * max_rows picks the kernel and its token tile: with tune->fp8_gemv
 * (NULL: the defaults, on), max_rows <= 2 and moe_cuda_fp8h_tp(Kd,
 * max_rows) > 0 the f16-fragment kernel (moe_cuda_gemv_fp8h below, that
 * many rows a pass; tune->dense_pre: with MOE_FP8H_PRE), else 8, 16 or
 * 32 rows a pass on bf16 fragments; larger groups take more passes
 * over their weights.
 * Graph-safe: the grid depends on N, E and n only.
 */
int moe_cuda_gemv_fp8(const moe_bf16_t *X, int ldx, const int32_t *xrow,
    int xdiv, const uint8_t *W, const float *scale, int mode, int N, int Kd,
    const int32_t *offs, int E, int n, int max_rows, int silu, float *Y,
    moe_bf16_t *H, int ldy, const moe_cuda_tuning_t *tune,
    cudaStream_t stream);

/* moe_cuda_gemv_fp8 with the tile given: nt x 8 rows per pass, nt 1, 2
 * or 4 (else MOE_K_EUNSUPPORTED); for tests and benchmarks. */
int moe_cuda_gemv_fp8_tiled(const moe_bf16_t *X, int ldx,
    const int32_t *xrow, int xdiv, const uint8_t *W, const float *scale,
    int mode, int N, int Kd, const int32_t *offs, int E, int n, int silu,
    float *Y, moe_bf16_t *H, int ldy, int nt, cudaStream_t stream);

/* moe_cuda_gemv_fp8_tiled with the block's warps given: 0 the launcher's
 * rule (8 warps when a 1-tile launch without SiLU fits one wave of
 * 8-warp blocks, else 4), 4, or 8 (nt 1 without SiLU only; else
 * MOE_K_EUNSUPPORTED); for tests and benchmarks. */
int moe_cuda_gemv_fp8_warps(const moe_bf16_t *X, int ldx,
    const int32_t *xrow, int xdiv, const uint8_t *W, const float *scale,
    int mode, int N, int Kd, const int32_t *offs, int E, int n, int silu,
    float *Y, moe_bf16_t *H, int ldy, int nt, int warps,
    cudaStream_t stream);

/*
 * moe_cuda_gemv_fp8's contract on f16 fragments (kernel_gemv_fp8h): each
 * pass of tp (1..8) rows of a group is first staged in shared memory as
 * f16, each row scaled by its own power of two (its largest |x| put in
 * [2^14, 2^15), so bf16 values from 2^-29 of the row's largest up are
 * exact and none overflows; the sums are scaled back in fp32); the e4m3
 * weights convert exactly to f16 (cvt.rn.f16x2.e4m3x2), products
 * accumulate in fp32 on mma.m16n8k16.f16: the same sums as the bf16
 * kernel up to fp32 order.  Differences: the NaN codes 0x7f / 0xff give
 * NaN, not +-480; activations under 2^-29 of their row's largest lose
 * bits or flush (a row whose largest is under 2^-106 is scaled by 2^120
 * only).  Requires what
 * moe_cuda_fp8_supported requires and moe_cuda_fp8h_tp(Kd, tp) == tp
 * (else MOE_K_EUNSUPPORTED).  variant (tests and benchmarks): 0 the
 * launcher's rule, 1 twice the chunks a register stage, 2 eight warps a
 * block, 3 four; plus MOE_FP8H_PRE: one matrix (offs NULL) in one pass
 * (n <= tp) loads both register stages of its weights before its PDL
 * wait, the lines of the next two into L2 (the tuning record's
 * dense_pre; moe_cuda_gemv_fp8 adds it from tune).  The same sums.
 */
#define MOE_FP8H_PRE 4
int moe_cuda_gemv_fp8h(const moe_bf16_t *X, int ldx, const int32_t *xrow,
    int xdiv, const uint8_t *W, const float *scale, int mode, int N, int Kd,
    const int32_t *offs, int E, int n, int tp, int silu, float *Y,
    moe_bf16_t *H, int ldy, int variant, cudaStream_t stream);

/* Rows a pass the f16-fragment GEMV stages for a row hint: min(max(hint,
 * 1), 8) when that many rows of Kd f16 fit its shared-memory budget
 * (72 KiB: 8 rows of Kd 4096, 2 of 14336), else 0 (moe_cuda_gemv_fp8
 * then takes the bf16 kernel). */
int moe_cuda_fp8h_tp(int Kd, int max_rows);

/* Whether the fp8 GEMV / grouped GEMM support this shape and mode:
 * N > 0, Kd > 0, Kd % 16 == 0, ldx % 8 == 0, ldx >= Kd, mode one of
 * MOE_K_FP8_*, and for block scales with silu N % 128 == 0. */
int moe_cuda_fp8_supported(int mode, int N, int Kd, int ldx, int silu);
#ifdef __cplusplus
}
#endif
#endif
