/*
 * Device pieces of the weighted un-permute (moe_permute.cu) that the fused
 * un-permute + norm (rmsnorm.cu) runs too, so that the fused launch and the
 * separate ones do the same arithmetic in the same order.
 */
#ifndef MOE_KERNELS_MOE_PERMUTE_CUH
#define MOE_KERNELS_MOE_PERMUTE_CUH

#include "common.cuh"

#define MOE_UNPERM_MAX_K 64     /* top-k the un-permute takes */


/*
 * Token t's K slots in ascending expert order (the un-permute's summation
 * order): ord_row[o] = the expert row of the o-th, ord_w[o] its weight.
 * Threads 0 .. K - 1 each place one slot (its rank among the K, ties by k:
 * the top-k never picks an expert twice); the caller syncs before reading.
 */
__device__ __forceinline__ void
moe_unperm_order(const int32_t *sel, const float *selw,
    const int32_t *slot_of, int t, int K, int *ord_row, float *ord_w)
{
    if ((int) threadIdx.x < K) {
        int k = (int) threadIdx.x, ek = sel[(size_t) t * K + k], o = 0;

        for (int j = 0; j < K; j++) {
            int ej = sel[(size_t) t * K + j];

            o += ej < ek || (ej == ek && j < k);
        }
        ord_row[o] = slot_of[(size_t) t * K + k];
        ord_w[o] = selw[(size_t) t * K + k];
    }
}


/* sum over o < K of ord_w[o] * ye[ord_row[o], 4 d4 .. 4 d4 + 3] */
__device__ __forceinline__ float4
moe_unperm_sum4(const float *ye, int D, const int *ord_row,
    const float *ord_w, int K, int d4)
{
    float4 acc = make_float4(0.0f, 0.0f, 0.0f, 0.0f);

    for (int o = 0; o < K; o++) {
        float4 y = *(reinterpret_cast<const float4 *>(
                         ye + (size_t) ord_row[o] * D) + d4);
        float  wo = ord_w[o];

        acc.x += y.x * wo;
        acc.y += y.y * wo;
        acc.z += y.z * wo;
        acc.w += y.w * wo;
    }
    return acc;
}

#endif /* MOE_KERNELS_MOE_PERMUTE_CUH */
