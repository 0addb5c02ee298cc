/* Token permutation by expert and the weighted un-permute. */
#ifndef MOE_KERNELS_MOE_PERMUTE_H
#define MOE_KERNELS_MOE_PERMUTE_H
#include "common.h"
#ifdef __cplusplus
extern "C" {
#endif
/*
 * The (token, k) slots i = t * K + k (n = T * K of them) with expert sel[i]
 * are grouped by expert: expert e owns rows [off_e, off_e + counts[e]),
 * off_e = counts[0] + ... + counts[e-1], its slots in ascending i (the CPU
 * backend's order).
 */

/* counts: (E) int32 out, counts[e] = #{i < n : sel[i] == e}. */
int moe_cuda_moe_count(const int32_t *sel, int n, int E, int32_t *counts,
    cudaStream_t stream);

/* erow: (n) out, erow[r] = slot of row r; slot_of: (n) out, the inverse. */
int moe_cuda_moe_scatter(const int32_t *sel, int n, int E,
    const int32_t *counts, int32_t *erow, int32_t *slot_of,
    cudaStream_t stream);

/*
 * count + scatter in one launch (one block, no host sync): offs (E + 1)
 * out, offs[e] = counts[0] + ... + counts[e-1] (offs[E] = n); erow and
 * slot_of as moe_cuda_moe_scatter writes them; tot (E) int64 (may be
 * NULL): tot[e] += counts[e] (running totals kept on the device).
 * E <= 256.
 */
int moe_cuda_moe_permute(const int32_t *sel, int n, int E, int32_t *offs,
    int32_t *erow, int32_t *slot_of, int64_t *tot, cudaStream_t stream);

/*
 * moe_cuda_route (moe_route.h) then moe_cuda_moe_permute of its T * K
 * choices, the same outputs bit for bit; steps of up to 32 tokens (E <=
 * 256) run the top-k and the permutation as one launch (two in all
 * instead of three).
 */
int moe_cuda_route_permute(const float *xf, int T, int D, const float *router,
    int E, int K, int renorm, float *logits, int32_t *sel, float *selw,
    float *margin, int32_t *offs, int32_t *erow, int32_t *slot_of,
    int64_t *tot, cudaStream_t stream);

/* xe[r, :] = xb[erow[r] / K, :] for r < n; xb, xe: (*, D) bf16. */
int moe_cuda_moe_gather(const moe_bf16_t *xb, int D, const int32_t *erow,
    int K, int n, moe_bf16_t *xe, cudaStream_t stream);

/*
 * out[t, :] = sum over k in ascending order of expert sel[t, k] of
 * selw[t, k] * ye[slot_of[t * K + k], :]  (fp32; ye (T*K, D) fp32,
 * out (T, D) fp32).  K <= 64.
 */
int moe_cuda_moe_unpermute(const float *ye, int D, const int32_t *sel,
    const float *selw, const int32_t *slot_of, int T, int K, float *out,
    cudaStream_t stream);
#ifdef __cplusplus
}
#endif
#endif
