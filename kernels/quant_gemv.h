/*
 * Quantized weights on the device, in the checkpoints' own layouts:
 * decode GEMVs that dequantize in registers (FP8 e4m3 and 4-bit AWQ /
 * GPTQ), grouped per expert like moe_cuda_gemv (rows routed to each
 * expert, offsets read on the device, no host sync, graph-safe grids),
 * and dequantize-to-bf16 kernels for the tensor-core path (prefill and
 * large batches: dequantize one layer's / expert's weights into a bf16
 * scratch, then the existing bf16 GEMM / grouped GEMM; kernels/NOTES.md
 * "Quantized weights").
 *
 * Shared terms:
 *   E groups (experts) of rows [offs[e], offs[e+1]) of the step (offs NULL:
 *   one group, rows [0, n)); input row of step row r: xr(r) = xrow ?
 *   xrow[r] / xdiv : r; X bf16 with leading dimension ldx (>= K).
 *   Ntot output features (a stacked gate|up weight has Ntot = 2 F; then
 *   moe_cuda_silu_mul on Y gives the bf16 hidden rows).
 *   Y[r * ldy + j] = sum_k X[xr(r), k] * deq(W_e)[j, k]  (fp32), j < Ntot.
 *   n: the total rows (an upper bound of offs[E]); with n < E the grid
 *   covers only n groups (moe_block_group).  n == 0: nothing to do.
 */
#ifndef MOE_KERNELS_QUANT_GEMV_H
#define MOE_KERNELS_QUANT_GEMV_H
#include "common.h"
#ifdef __cplusplus
extern "C" {
#endif

/* FP8 weight scale layouts (HF fp8 / compressed-tensors / block-wise). */
enum {
    MOE_K_FP8_TENSOR  = 0,  /* one fp32 per matrix; a stacked gate|up
                               weight keeps both: scale[e * 2 + (j >= F)]
                               with F = Ntot / 2 when `stacked` */
    MOE_K_FP8_CHANNEL = 1,  /* one fp32 per output row: scale[e * Ntot + j] */
    MOE_K_FP8_BLOCK   = 2   /* weight_scale_inv of 128x128 blocks:
                               scale[e * nb + (j / 128) * ceil(K / 128)
                               + k / 128], nb = ceil(Ntot / 128) *
                               ceil(K / 128) */
};

/* 4-bit packings. */
enum {
    MOE_K_Q4_AWQ  = 0,   /* AutoAWQ GEMM: qweight (K, Ntot / 8) int32, the
                            8 nibbles of word w holding columns 8w + c at
                            bits 4 * {0,4,1,5,2,6,3,7}[c]; qzeros
                            (KG, Ntot / 8) packed the same way; scales
                            (KG, Ntot) fp16; w = (q - z) * s */
    MOE_K_Q4_GPTQ = 1    /* GPTQ: qweight (K / 8, Ntot) int32, word (i, j)
                            holding k = 8 i + b at bits 4 b; qzeros
                            (KG, Ntot / 8) with column 8 w + b at bits
                            4 b; scales (KG, Ntot) fp16; g_idx (K)
                            int32 or NULL (group k / G); w = (q - z) * s,
                            z = stored zero + zero_bias (1 for the
                            original "gptq" checkpoint format, which
                            stores zero - 1; 0 for "gptq_v2") */
};

/*
 * FP8 grouped GEMV: W = the experts' e4m3 weights, expert e's (Ntot, K)
 * row-major at W + e * Ntot * K (HF layout, [out][in]); scale by `mode`
 * (above; stacked: 1 when Ntot is a gate|up pair with per-tensor scales).
 * Every group's rows are done in passes of 4; any group size is correct.
 * Needs K % 16 == 0, ldx % 8 == 0, X 16-byte aligned (else
 * MOE_K_EUNSUPPORTED).  One warp per output feature, 16-byte weight loads.
 */
int moe_cuda_qgemv_fp8(const moe_bf16_t *X, int ldx, const int32_t *xrow,
    int xdiv, const uint8_t *W, const float *scale, int mode, int stacked,
    int Ntot, int K, const int32_t *offs, int E, int n, float *Y, int ldy,
    cudaStream_t stream);

/*
 * 4-bit grouped GEMV (AWQ or GPTQ by fmt, tensors above; KG = ceil(K / G)
 * groups, the last one shorter when K % G != 0; expert e's tensors at
 * qweight + e * K * Ntot / 8, qzeros + e * KG * Ntot / 8, scales + e *
 * KG * Ntot, g_idx + e * K).  G: the group size (a multiple of 8; K for
 * one group).  Needs Ntot % 8 == 0, K % 8 == 0, ldx % 8 == 0 (else
 * MOE_K_EUNSUPPORTED).  zero_bias is used by GPTQ only.
 *
 * Without g_idx, with G a multiple of 32 (GPTQ) or 16 (AWQ) and 16-byte
 * aligned X, qweight and scales (the checkpoints' case): tensor cores
 * (mma on the bf16 integers q - z, exact; fp32 sums scaled per group),
 * K split over the warps of a block and a thread-block cluster, partial
 * sums added in a fixed order: Y's rows [0, n) columns [0, Ntot) are
 * written (nothing else), the same bits every run.  Otherwise (GPTQ with
 * g_idx, other group sizes): a CUDA-core kernel that splits K over blocks
 * adding into Y with atomics; the launcher zeroes Y's rows [0, n)
 * (columns [0, Ntot)) first and the last bits of fp32 vary between runs.
 * Either way the caller must not rely on Y's other columns being kept.
 *
 * g_idx (GPTQ): pass NULL whenever g_idx[k] == k / G for every k (the
 * trivial order, which most checkpoints store even without desc_act):
 * the launcher does not inspect g_idx, and a non-NULL g_idx always takes
 * the slow atomic kernel.  The backend checks this once at load (host
 * side) and drops the tensor.  desc_act checkpoints (g_idx a permutation
 * of groups): at load, sort k by g_idx (stable), perm[k'] = the k at
 * sorted position k'; repack qweight so word row i holds k' = 8 i .. 8 i
 * + 7 (nibble of old k = perm[k']), and keep qzeros / scales as they are
 * (group of k' is g_idx[perm[k']], == k' / G when every group has G
 * members, the GPTQ case: check it, else keep g_idx and the atomic
 * kernel).  Then per step the input row must be permuted alike, X'[r,
 * k'] = X[r, perm[k']] (a gather into a scratch, ldx = K), and the call
 * takes X' with g_idx NULL.  For a down projection the permutation can
 * be folded into the gate|up projection instead: permute the rows
 * (output features) of gate and up by the down's perm at load, and the
 * SwiGLU output comes out already in the down's k' order (no gather).
 */
int moe_cuda_qgemv_q4(int fmt, const moe_bf16_t *X, int ldx,
    const int32_t *xrow, int xdiv, const int32_t *qweight,
    const int32_t *qzeros, const uint16_t *scales, const int32_t *g_idx,
    int G, int zero_bias, int Ntot, int K, const int32_t *offs, int E, int n,
    float *Y, int ldy, cudaStream_t stream);

/*
 * moe_cuda_qgemv_q4 with a hint: max_rows, about the most rows a group
 * has (0: the mean, ceil(n / groups)).  It picks the tensor-core tile
 * (8, 16 or 32 rows per pass; a group with more rows takes several
 * passes, each reading its weights again); any value gives the same
 * results.
 */
int moe_cuda_qgemv_q4_rows(int fmt, const moe_bf16_t *X, int ldx,
    const int32_t *xrow, int xdiv, const int32_t *qweight,
    const int32_t *qzeros, const uint16_t *scales, const int32_t *g_idx,
    int G, int zero_bias, int Ntot, int K, const int32_t *offs, int E, int n,
    int max_rows, float *Y, int ldy, cudaStream_t stream);

/*
 * gate|up with SiLU fused: Ntot = 2 F stacked (gate columns [0, F), up
 * [F, 2 F), Ntot % 16 == 0), H (n, F) bf16 (leading dimension F) =
 * bf16(silu(g) * u), the arithmetic of moe_cuda_silu_mul.  Where the
 * tensor-core kernel applies (see moe_cuda_qgemv_q4) one launch writes H
 * (a block does a tile's gate columns, then the same up columns); else
 * moe_cuda_qgemv_q4_rows into the fp32 scratch Y (n, Ntot) and
 * moe_cuda_silu_mul (Y may be NULL only when the tensor-core kernel
 * applies; MOE_K_EUNSUPPORTED otherwise).
 */
int moe_cuda_qgemv_q4_silu(int fmt, const moe_bf16_t *X, int ldx,
    const int32_t *xrow, int xdiv, const int32_t *qweight,
    const int32_t *qzeros, const uint16_t *scales, const int32_t *g_idx,
    int G, int zero_bias, int Ntot, int K, const int32_t *offs, int E, int n,
    int max_rows, float *Y, moe_bf16_t *H, cudaStream_t stream);

/*
 * Dequantize `count` consecutive FP8 matrices (rows, K) (expert e at
 * W + e * rows * K, scales as for moe_cuda_qgemv_fp8 with Ntot = rows)
 * into bf16 out (count, rows, K): out = bf16(float(q) * scale), the same
 * fp32 product the GEMV forms.  K % 16 == 0.
 */
int moe_cuda_dequant_fp8(const uint8_t *W, const float *scale, int mode,
    int stacked, int rows, int K, int count, moe_bf16_t *out,
    cudaStream_t stream);

/*
 * Dequantize `count` consecutive 4-bit matrices (tensors and strides as
 * for moe_cuda_qgemv_q4, ragged K too) into bf16 out (count, Ntot, K) row-major, the
 * HF (out, in) layout the bf16 GEMMs take: out[j, k] = bf16((q - z) * s).
 */
int moe_cuda_dequant_q4(int fmt, const int32_t *qweight,
    const int32_t *qzeros, const uint16_t *scales, const int32_t *g_idx,
    int G, int zero_bias, int Ntot, int K, int count, moe_bf16_t *out,
    cudaStream_t stream);

/*
 * AWQ weights repacked into GPTQ's layout, in place (count matrices of
 * qweight (K, Ntot / 8) and qzeros (KG, Ntot / 8), KG = ceil(K / G),
 * through a device scratch of at least Ntot * K / 2 bytes): then they
 * are GPTQ tensors with zero_bias 0 (scales unchanged) and every GPTQ
 * kernel takes them, the same values bit for bit (the tensor-core GEMV
 * on GPTQ's layout measured faster: kernels/NOTES.md "4-bit layouts").
 */
int moe_cuda_q4_awq_to_gptq(int32_t *qweight, int32_t *qzeros, int Ntot,
    int K, int G, int count, void *scratch, size_t scratch_bytes,
    cudaStream_t stream);

/*
 * The 4-bit GEMV by quantization group (kernels/q4_group.cu) for GPTQ's
 * layout (GPTQ checkpoints, AWQ after moe_cuda_q4_awq_to_gptq), no
 * g_idx, groups of up to 8 rows (decode): the contract of
 * moe_cuda_qgemv_q4_rows (Y (n, Ntot) fp32, leading dimension ldy) when H
 * is NULL, of moe_cuda_qgemv_q4_silu's fused path when not (Ntot = 2 F
 * stacked gate|up, H (n, F) = bf16(silu(g) * u)).  Groups with more rows
 * are correct but read the weights once per 8 rows (moe_cuda_qgemv_q4g)
 * or, with a max_rows hint above 8, once per 16 (..._q4g_rows).  It applies when
 * moe_cuda_q4g_supported(G, Ntot, K, H != NULL): G % 32 == 0, K % G ==
 * 0, and Ntot % 64 == 0 (fused: F % 32 == 0); else MOE_K_EUNSUPPORTED.
 * shape: 0 the shipped block shape, 1..6 others, 7..9 16 rows a pass
 * (bench/dev/quant_gemv), 10..14 the warpgroup kernel's shapes 1..4 and
 * 8 where moe_cuda_qgemv_q4w takes the shape (else the shape-0 pick).
 */
int moe_cuda_q4g_supported(int G, int Ntot, int K, int silu);
/* Whether moe_cuda_qgemv_q4g_rows takes a shape at a row hint on its own
 * kernels (hints up to 16: moe_cuda_q4g_supported; above: the warpgroup
 * kernel, G % 128 == 0) rather than handing it to passes of 16 that
 * read the weights once per 16 rows. */
int moe_cuda_q4g_rows_ok(int G, int Ntot, int K, int silu, int max_rows);
int moe_cuda_qgemv_q4g(const moe_bf16_t *X, int ldx, const int32_t *xrow,
    int xdiv, const int32_t *qweight, const int32_t *qzeros,
    const uint16_t *scales, int G, int zero_bias, int Ntot, int K,
    const int32_t *offs, int E, int n, int shape, float *Y, int ldy,
    moe_bf16_t *H, cudaStream_t stream);
/* The same with the row hint of moe_cuda_qgemv_q4_rows (0: the mean):
 * above 8, passes of 16 rows; shape 0. */
int moe_cuda_qgemv_q4g_rows(const moe_bf16_t *X, int ldx,
    const int32_t *xrow, int xdiv, const int32_t *qweight,
    const int32_t *qzeros, const uint16_t *scales, int G, int zero_bias,
    int Ntot, int K, const int32_t *offs, int E, int n, int max_rows,
    float *Y, int ldy, moe_bf16_t *H, cudaStream_t stream);
/* moe_cuda_qgemv_q4g_rows with pre (the tuning record's dense_pre): one
 * matrix (offs NULL, xrow NULL) in one pass (n <= 8 on passes of 8, 16
 * on passes of 16) loads the weights, zeros and scales of both register
 * stages before its PDL wait and asks the next chunks' lines into L2
 * there, the inputs after it; the same sums.  pre 0: exactly _rows. */
int moe_cuda_qgemv_q4g_pre(const moe_bf16_t *X, int ldx,
    const int32_t *xrow, int xdiv, const int32_t *qweight,
    const int32_t *qzeros, const uint16_t *scales, int G, int zero_bias,
    int Ntot, int K, const int32_t *offs, int E, int n, int max_rows,
    float *Y, int ldy, moe_bf16_t *H, int pre, cudaStream_t stream);

/*
 * The 4-bit GEMM on warpgroup tensor cores (kernels/q4_wgmma.cu) for
 * expert groups of more than 16 rows: the contract of moe_cuda_qgemv_q4g
 * (GPTQ's layout, no g_idx; Y fp32 when H is NULL, else H = bf16(silu(g)
 * u) of stacked gate|up), rows in passes of 16 or 32.  It applies when
 * moe_cuda_q4w_supported(G, Ntot, K, H != NULL): G % 64 == 0, K % G ==
 * 0, Ntot % 128 == 0 (fused: F % 64 == 0); else MOE_K_EUNSUPPORTED.
 * shape: 0 picked from max_rows (16 rows a pass up to 16, else 32; 128 k
 * a chunk when G % 128 == 0; (32, 128) on shape 8 where it fits), 1..4
 * forced: (16 rows, 64 k), (16, 128), (32, 64), (32, 128)
 * (bench/dev/quant_gemv; 5..7: shape 4 with other L2 prefetch distances);
 * 8: shape 4 on two warpgroups a block sharing the staged rows (G % 128,
 * N % 256, fused F % 128; else MOE_K_EUNSUPPORTED).  moe_cuda_qgemv_q4g_rows takes
 * it for row hints above 16 where moe_cuda_q4g_rows_ok
 * (moe_cuda_qgemv_q4g: shapes 10..13 are its shapes 1..4, 14 its 8).
 */
int moe_cuda_q4w_supported(int G, int Ntot, int K, int silu);
int moe_cuda_qgemv_q4w(const moe_bf16_t *X, int ldx, const int32_t *xrow,
    int xdiv, const int32_t *qweight, const int32_t *qzeros,
    const uint16_t *scales, int G, int zero_bias, int Ntot, int K,
    const int32_t *offs, int E, int n, int max_rows, int shape, float *Y,
    int ldy, moe_bf16_t *H, cudaStream_t stream);

/*
 * Tiled 4-bit weights (kernels/q4_tiled.cu; kernels/NOTES.md "4-bit
 * layouts"; a development layout, measured slower than the GEMV on
 * GPTQ's layout): an AWQ or GPTQ qweight repacked once at load so that
 * each lane's 16-byte load is the tensor-core fragments of four
 * products: tiles of 16 output features x 64 k (512 bytes, feature-tile
 * major); qzeros and scales stay in the checkpoint's layout (fmt says
 * which zero packing).  It applies when moe_cuda_q4t_supported: Ntot %
 * 16 == 0, K % 64 == 0, G a power of two >= 64 (a tile lies in one
 * group; the kernel finds it with a shift), and no g_idx (the caller
 * checks that).  Same bytes as the original.
 */
int moe_cuda_q4t_supported(int fmt, int G, int Ntot, int K);

/* Repack `count` consecutive qweight matrices (Ntot, K) of fmt in place
 * into the tiled layout, through a device scratch of at least Ntot * K /
 * 2 bytes (stream-ordered; the scratch is free once the stream reaches
 * the end).  qweight 16-byte aligned. */
int moe_cuda_q4t_pack(int fmt, int32_t *qweight, int Ntot, int K, int count,
    void *scratch, size_t scratch_bytes, cudaStream_t stream);

/*
 * The 4-bit grouped GEMV on tiled weights qt (expert e's tiles at qt + e
 * * Ntot * K / 8 words; qzeros, scales, G, zero_bias as for
 * moe_cuda_qgemv_q4): the contract of moe_cuda_qgemv_q4_rows (Y rows [0,
 * n) columns [0, Ntot) written, deterministic), or with H non-NULL the
 * contract of moe_cuda_qgemv_q4_silu's fused path (Ntot = 2 F stacked
 * gate|up, Ntot % 32 == 0, H (n, F) bf16, Y unused).  max_rows: the
 * rows-per-group hint (8, 16 or 32 rows per pass); sk: K splits per
 * feature tile (0: picked from the grid; else 1, 2, 4 or 8, at most 4
 * with H, for the dev harness; others are refused).  With H, ldy is
 * not read (H's leading dimension is F).  Needs ldx % 8 == 0, X and qt
 * 16-byte aligned.
 */
int moe_cuda_qgemv_q4t(int fmt, const moe_bf16_t *X, int ldx,
    const int32_t *xrow, int xdiv, const int32_t *qt,
    const int32_t *qzeros, const uint16_t *scales, int G, int zero_bias,
    int Ntot, int K, const int32_t *offs, int E, int n, int max_rows,
    int sk, float *Y, int ldy, moe_bf16_t *H, cudaStream_t stream);

/* moe_cuda_dequant_q4 on tiled weights: bf16 (count, Ntot, K), the same
 * values bit for bit. */
int moe_cuda_dequant_q4t(int fmt, const int32_t *qt, const int32_t *qzeros,
    const uint16_t *scales, int G, int zero_bias, int Ntot, int K, int count,
    moe_bf16_t *out, cudaStream_t stream);

#ifdef __cplusplus
}
#endif
#endif
