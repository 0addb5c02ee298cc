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
 * the top-k never picks an expert twice); ord_e (may be NULL) gets its
 * expert.  The caller syncs before reading.
 */
__device__ __forceinline__ void
moe_unperm_order(const int32_t *sel, const float *selw,
    const int32_t *slot_of, int t, int K, int *ord_row, float *ord_w,
    int *ord_e = NULL)
{
    if ((int) threadIdx.x < K) {
        int k = (int) threadIdx.x, ek = sel[(size_t) t * K + k], o = 0;

        for (int j = 0; j < K; j++) {
            int ej = sel[(size_t) t * K + j];

            o += ej < ek || (ej == ek && j < k);
        }
        ord_row[o] = slot_of[(size_t) t * K + k];
        ord_w[o] = selw[(size_t) t * K + k];
        if (ord_e != NULL) {
            ord_e[o] = ek;
        }
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


/*
 * The same sum when the expert rows are unscaled fp8 products in bf16
 * (yq) with a per-row scale qh[row] and per-expert channel scales
 * ws[e * ws_stride + j]: each row value becomes yq * (qh[row] * ws[e, j])
 * in fp32 first, exactly the value moe_cuda_fp8_rescale_rows_bf16 stores
 * (kernels/gemm_fp8.cu), then it is summed as above: the two launches'
 * bits in one pass over half the bytes.
 */
__device__ __forceinline__ float4
moe_unperm_sum4_q(const __nv_bfloat16 *yq, const float *qh, const float *ws,
    size_t ws_stride, int D, const int *ord_row, const int *ord_e,
    const float *ord_w, int K, int d4)
{
    float4 acc = make_float4(0.0f, 0.0f, 0.0f, 0.0f);

    for (int o = 0; o < K; o++) {
        int    r = ord_row[o];
        float4 t = moe_bf16x4(*(reinterpret_cast<const uint2 *>(
                                    yq + (size_t) r * D) + d4));
        float4 w = *(reinterpret_cast<const float4 *>(
                         ws + (size_t) ord_e[o] * ws_stride) + d4);
        float  q = qh[r], wo = ord_w[o];
        float4 y;

        y.x = moe_fp8_unscale(t.x, q, w.x);
        y.y = moe_fp8_unscale(t.y, q, w.y);
        y.z = moe_fp8_unscale(t.z, q, w.z);
        y.w = moe_fp8_unscale(t.w, q, w.w);
        acc.x += y.x * wo;
        acc.y += y.y * wo;
        acc.z += y.z * wo;
        acc.w += y.w * wo;
    }
    return acc;
}

#endif /* MOE_KERNELS_MOE_PERMUTE_CUH */
