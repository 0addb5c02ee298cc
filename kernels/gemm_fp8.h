/*
 * FP8 tensor-core GEMMs for prefill-sized steps (cuBLASLt, e4m3 x e4m3,
 * fp32 accumulation): the weights are the checkpoint's e4m3 bytes with one
 * scale per output row (per-channel; a per-tensor scale is given as a row
 * vector of that value), the activations are quantized on the fly, one
 * scale per row (token): s[r] = amax(X[r, :]) / 448 (vLLM's "dynamic
 * per-token" scheme).  The product of the two scaled operands is what
 * cuBLASLt's outer-vector scaling (CUBLASLT_MATMUL_MATRIX_SCALE_OUTER_VEC_32F)
 * computes; where the library refuses that mode, the GEMM runs with unit
 * scales into fp32 and a second kernel multiplies row and column scales
 * (moe_cuda_fp8_gemm_outer_vec says which one ran).
 *
 * The activations' rounding to e4m3 is the only difference from the bf16
 * path (relative error up to 2^-4 per element, averaging out over K):
 * tests bound the result against the host product of the dequantized
 * operands (tight) and against the unquantized product (loose).
 */
#ifndef MOE_KERNELS_GEMM_FP8_H
#define MOE_KERNELS_GEMM_FP8_H
#include "common.h"
#ifdef __cplusplus
extern "C" {
#endif

typedef struct moe_fp8_gemm_s moe_fp8_gemm_t;

/*
 * A cuBLASLt handle and a plan cache for one device; workspace: device
 * memory of ws_bytes the matmuls may use (>= 32 MiB recommended; owned by
 * the caller, alive as long as the object).  MOE_K_OK / MOE_K_EBACKEND.
 */
int moe_cuda_fp8_gemm_create(void *workspace, size_t ws_bytes,
    moe_fp8_gemm_t **out);
void moe_cuda_fp8_gemm_destroy(moe_fp8_gemm_t *g);

/* Force the unit-scale + rescale path (tests; 0 restores the default). */
void moe_cuda_fp8_gemm_force_rescale(moe_fp8_gemm_t *g, int on);

/* 1 when the last moe_cuda_gemm_fp8 on g used outer-vector scaling in
 * cuBLASLt, 0 when it used the unit-scale GEMM + rescale kernel. */
int moe_cuda_fp8_gemm_outer_vec(const moe_fp8_gemm_t *g);

/* Plans made so far (one cuBLASLt heuristic query each; tests).  Once the
 * library has refused outer-vector scaling for a shape, g stops asking
 * (it decides by architecture: cuBLASLt 13.1 refuses it on sm_90 for
 * every shape), so a prefill's many per-expert row counts share the
 * rescale path's few plans. */
int moe_cuda_fp8_gemm_plans_made(const moe_fp8_gemm_t *g);

/*
 * Dynamic per-row quantization: for r < M, row xr(r) = xrow ? xrow[r] /
 * xdiv : r of X (bf16, leading dimension ldx):
 *   s[r] = max(amax_k |X[xr(r), k]|, 1e-12) / 448,
 *   Q[r * K + k] = e4m3_satfinite_rne(X[xr(r), k] / s[r]).
 * K % 16 == 0, ldx % 8 == 0 (else MOE_K_EUNSUPPORTED).  One block per row.
 */
int moe_cuda_quant_rows_fp8(const moe_bf16_t *X, int ldx,
    const int32_t *xrow, int xdiv, int M, int K, uint8_t *Q, float *s,
    cudaStream_t stream);

/*
 * The unit-scale GEMMs below run on M rounded up to round_up(M, R) rows,
 * R = moe_cuda_fp8_gemm_rows(g): 64, or what moe_cuda_fp8_gemm_set_rows
 * set (64 or 128; a measuring switch, before the first GEMM).  Their
 * plans are keyed by the rounded M, so a prefill's per-expert row counts
 * share a few plans.  Buffers sized for MOE_FP8_GEMM_ROWS (the largest R)
 * fit either.  H200 (bench/dev/gemm_fp8, Mixtral gate|up): cuBLASLt's
 * first choice ran 448 rows in 95.1 us and 512 in 81.2, 576 in 101.0 and
 * 640 in 96.2, yet the whole fp8 prefill 2048 with R 128 spent 48.5 ms in
 * the expert stage against 46.8 with 64 (bench/RESULTS.md).
 */
#define MOE_FP8_GEMM_ROWS 128

int moe_cuda_fp8_gemm_rows(const moe_fp8_gemm_t *g);
int moe_cuda_fp8_gemm_set_rows(moe_fp8_gemm_t *g, int rows);

/*
 * Row-major Y (M, N) = (Q * qs) . (W * ws)^T:
 *   Y[r, j] = qs[r] * ws[j] * sum_k e4m3(Q[r, k]) * e4m3(W[j, k])
 * Q (M, K) e4m3 rows of K bytes (moe_cuda_quant_rows_fp8), qs (M) fp32;
 * W (N, K) e4m3 row-major (HF layout), ws (N) fp32.  Y: bf16 (y_bf16 1) or
 * fp32, leading dimension ldy >= N; `accumulate` adds into Y (fp32 Y
 * only).  tmp: fp32 scratch of round_up(M, R) * N floats, used only by
 * the rescale path (NULL: that path is refused with MOE_K_EUNSUPPORTED),
 * which multiplies round_up(M, R) rows of Q: Q must have that many rows
 * readable (their values do not matter).  K % 16 == 0,
 * N % 16 == 0 (cuBLASLt's fp8 alignment), ws 16-byte aligned.  M == 0:
 * nothing to do.
 * Not capturable into a CUDA graph on the first call of a shape (the plan
 * is chosen then); prefill steps run outside graphs.
 */
int moe_cuda_gemm_fp8(moe_fp8_gemm_t *g, int M, int N, int K,
    const uint8_t *Q, const float *qs, const uint8_t *W, const float *ws,
    void *Y, int ldy, int y_bf16, int accumulate, float *tmp,
    cudaStream_t stream);

/*
 * The unscaled product for a consumer that applies the scales itself:
 * Y (round_up(M, R), N) row-major, leading dimension N, bf16 (y_bf16 1)
 * or fp32:
 *   Y[r, j] = sum_k e4m3(Q[r, k]) * e4m3(W[j, k])
 * Q must have round_up(M, R) readable rows and Y room for as many (the
 * rows past M hold values of no meaning: a caller stacking groups' rows
 * in one Y runs the groups in row order, so that each group's rows are
 * written last by its own GEMM), so that a prefill's per-expert row
 * counts share the rescale path's plans.  K % 16 == 0, N % 16 == 0.  Raw
 * sums of e4m3 products stay far inside bf16's range; the bf16 rounding
 * adds 2^-9 relative per element.
 */
int moe_cuda_gemm_fp8_unscaled(moe_fp8_gemm_t *g, int M, int N, int K,
    const uint8_t *Q, const uint8_t *W, void *Y, int y_bf16,
    cudaStream_t stream);

/*
 * Row groups (the experts of a prefill, one launch for all): with offs
 * non-NULL, row r belongs to group e < E with offs[e] <= offs[0] + r <
 * offs[e + 1] (offs on the device: the routing's row offsets from the
 * first group's), and its weight scales are ws + e * ws_stride; offs
 * NULL: every row uses ws.
 */

/*
 * SwiGLU of an unscaled gate|up product (moe_cuda_gemm_fp8_unscaled with
 * N = 2F: gate columns 0..F-1, up columns F..2F-1 of each row of G, bf16),
 * quantized per row for the next fp8 GEMM.  For r < M, j < F, with ws the
 * row's group's scales (above):
 *   g = G[r, j] * (qs[r] * ws[j]),  u = G[r, F + j] * (qs[r] * ws[F + j]),
 *   h[r, j] = bf16(g / (1 + exp(-g)) * u)     (moe_cuda_silu_mul's math)
 * then s[r] and Q[r * F + j] from h exactly as moe_cuda_quant_rows_fp8
 * computes them from a bf16 row.  h stays on chip for F <= 24576; with
 * more columns G's gate half is overwritten with it.  One fused pass
 * instead of the rescale, SwiGLU and quantize kernels.  F % 8 == 0; G, ws
 * 16-byte and Q 8-byte aligned, ws_stride % 4 == 0 (else
 * MOE_K_EUNSUPPORTED).
 */
int moe_cuda_silu_quant_fp8(moe_bf16_t *G, int M, int F, const float *qs,
    const float *ws, size_t ws_stride, const int32_t *offs, int E,
    uint8_t *Q, float *s, cudaStream_t stream);

/*
 * The rescale of unscaled fp32 products (moe_cuda_gemm_fp8_unscaled,
 * y_bf16 0) by row groups: Y[r * ldy + j] = tmp[r * N + j] * (qs[r] *
 * ws[j]), ws the row's group's scales (above).  N % 16 == 0, tmp and ws
 * 16-byte aligned, ws_stride % 4 == 0.
 */
int moe_cuda_fp8_rescale_rows(const float *tmp, int M, int N,
    const float *qs, const float *ws, size_t ws_stride, const int32_t *offs,
    int E, float *Y, int ldy, cudaStream_t stream);

/*
 * The same from unscaled bf16 products (moe_cuda_gemm_fp8_unscaled,
 * y_bf16 1: half the bytes written and read back; the bf16 rounding of
 * the raw dot product, 2^-9 relative, is what a bf16 output would carry
 * anyway): Y[r * ldy + j] = float(tmp[r * N + j]) * (qs[r] * ws[j]).
 * Same conditions.
 */
int moe_cuda_fp8_rescale_rows_bf16(const moe_bf16_t *tmp, int M, int N,
    const float *qs, const float *ws, size_t ws_stride, const int32_t *offs,
    int E, float *Y, int ldy, cudaStream_t stream);

#ifdef __cplusplus
}
#endif
#endif
