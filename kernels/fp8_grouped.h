/*
 * A grouped e4m3 GEMM for the fp8 prefill's routed experts: every
 * expert's tiles in one launch, the group offsets read on the device (no
 * host copy of the routing, so no host sync per layer), on Hopper's
 * warpgroup tensor cores (wgmma) fed by TMA.  Same contract as the
 * per-expert moe_cuda_gemm_fp8_unscaled calls it replaces (bf16, scales
 * left to the reader), except that no row past a group's is written.
 */
#ifndef MOE_KERNELS_FP8_GROUPED_H
#define MOE_KERNELS_FP8_GROUPED_H
#include "common.h"
#ifdef __cplusplus
extern "C" {
#endif

/*
 * For each group e < E, the rows r of Q with offs[e] <= offs[0] + r <
 * offs[e + 1] (offs: E + 1 ascending int32 on the device):
 *   Y[r * N + j] = bf16(sum_k e4m3(Q[r * K + k]) * e4m3(W_e[j * K + k]))
 * W_e = W + e * wstride bytes, (N, K) row-major (HF layout).  Q has
 * q_rows rows of K bytes readable (rows of other groups inside a tile are
 * read, their products not stored; rows past q_rows read as zeros).
 * r_max >= offs[E] - offs[0] bounds the rows on the host (it sizes the
 * grid: tiles past the last group's exit at once).  Rows of Y outside the
 * groups are left as they were.
 * N % 256 == 0, K % 128 == 0, wstride % 16 == 0, Q and W 16-byte
 * aligned, E >= 1 (else MOE_K_EUNSUPPORTED, nothing enqueued: the caller
 * keeps the per-expert GEMMs).  Tiles of 128 rows x 256 columns in the
 * order group, column tile, row tile (a group's rows stay in L2 while
 * its weights stream once), one persistent CTA per SM looping over them;
 * a 4-stage TMA pipeline fed by one producer thread, two consumer
 * warpgroups of 64 rows.  Capturable into a
 * CUDA graph (the tensor maps are kernel parameters, made on the host at
 * each call).
 * sch: 0 for the static order above, or MOE_FG_DYN: each CTA draws its
 * next tile from the counter sched[0] (the same order; a CTA done early
 * takes more), so the grid ends within about a tile of balanced instead
 * of a whole wave late.  sched: two uint32 on the device, zero before
 * the first launch, left zero by each launch that completes; one pair per
 * stream that may run these launches at the same time; NULL with
 * MOE_FG_DYN is MOE_K_EINVAL.  MOE_FG_DYN | MOE_FG_PAIR: the CTAs in
 * clusters of two, each pair on two row tiles of one group and column
 * tile, each CTA loading half the tile's weight rows into both (TMA
 * multicast): a third less read from L2 per tile (PAIR alone is
 * MOE_K_EINVAL).  The output is the same for every sch (each tile's
 * sums are made the same way, whichever CTA makes them).
 */
int moe_cuda_fp8_grouped_gemm(const uint8_t *Q, int q_rows,
    const uint8_t *W, size_t wstride, const int32_t *offs, int E,
    int r_max, int N, int K, moe_bf16_t *Y, uint32_t *sched, int sch,
    cudaStream_t stream);

/* The same with the grid and the kernel variant chosen (measurements,
 * bench/dev/wg_ggemm): ctas 0: one CTA per tile; > 0: that many CTAs,
 * each looping over the tiles ctas apart; < 0: -ctas CTAs per SM.
 * variant: MOE_FG_WIDE one wgmma m64n256k32 per k step and warpgroup
 * (else two m64n128k32, A read twice), MOE_FG_STAGED the products
 * through shared memory, stored as whole rows (else straight from the
 * fragments, 4 bytes a lane).  moe_cuda_fp8_grouped_gemm: kernels/
 * fp8_grouped.cu's FG_CTAS, FG_WIDE and FG_STAGED.  MOE_FG_DYN and
 * MOE_FG_PAIR (sch above) are built for WIDE | STAGED only (else
 * MOE_K_EINVAL); with PAIR, ctas > 0 is rounded down to an even count
 * (at least 2). */
#define MOE_FG_WIDE    1
#define MOE_FG_STAGED  2
#define MOE_FG_DYN     4
#define MOE_FG_PAIR    8
int moe_cuda_fp8_grouped_gemm_ctas(const uint8_t *Q, int q_rows,
    const uint8_t *W, size_t wstride, const int32_t *offs, int E,
    int r_max, int N, int K, moe_bf16_t *Y, int ctas, int variant,
    uint32_t *sched, cudaStream_t stream);

/*
 * The gate|up GEMM of the same groups with SwiGLU in its epilogue: W_e
 * has 2F rows (gate 0 .. F - 1, up F .. 2F - 1, wstride bytes from one
 * group to the next), qs the rows' e4m3 scales (moe_cuda_quant_rows_fp8,
 * indexed like Q's rows), ws + e * ws_stride group e's 2F channel scales;
 * for the groups' rows r and j < F:
 *   g = gsum[r, j] * (qs[r] * ws_e[j]),  u = gsum[r, F + j] * (qs[r] *
 *   ws_e[F + j]),  H[r * F + j] = bf16(g / (1 + exp(-g)) * u)
 * (gsum: the e4m3 dot products in fp32, as above), moe_cuda_silu_quant_fp8's
 * math on the unrounded sums.  H (rows, F) bf16; the next GEMM's input
 * then comes from moe_cuda_quant_rows_fp8 on H.  F % 128 == 0, K % 128 ==
 * 0, ws 8-byte aligned, ws_stride even, wstride % 16 == 0 (else
 * MOE_K_EUNSUPPORTED).  A CTA's tile: 128 rows x 128 columns of H, its
 * B the 128 gate rows and the 128 up rows of those columns.  sched, sch:
 * as moe_cuda_fp8_grouped_gemm's.
 */
int moe_cuda_fp8_grouped_swiglu(const uint8_t *Q, int q_rows,
    const uint8_t *W, size_t wstride, const int32_t *offs, int E,
    int r_max, int F, int K, const float *qs, const float *ws,
    size_t ws_stride, moe_bf16_t *H, uint32_t *sched, int sch,
    cudaStream_t stream);

/* 1 when moe_cuda_fp8_grouped_gemm takes this shape (its N, K, wstride
 * conditions; alignment aside). */
int moe_cuda_fp8_grouped_supported(int N, int K, size_t wstride);

#ifdef __cplusplus
}
#endif
#endif
