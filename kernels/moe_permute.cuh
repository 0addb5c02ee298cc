/*
 * Device pieces of the permutation (moe_permute.cu) that the fused decode
 * kernels (rmsnorm.cu, moe_route.cu) run too, so that a fused launch and
 * the separate ones do the same arithmetic in the same order.
 */
#ifndef MOE_KERNELS_MOE_PERMUTE_CUH
#define MOE_KERNELS_MOE_PERMUTE_CUH

#include "common.cuh"

#define MOE_UNPERM_MAX_K 64     /* top-k the un-permute takes */
#define MOE_PERM_ONE     1024   /* threads of the one-block permutation */
#define MOE_PERM_MAX_E   256    /* experts it takes */


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


/* Shared memory of moe_permute_block. */
struct moe_perm_smem {
    int cnt[MOE_PERM_MAX_E];
    int base[MOE_PERM_MAX_E];
    int wcnt[MOE_PERM_ONE / 32][MOE_PERM_MAX_E];
};


/*
 * The whole permutation by one block of MOE_PERM_ONE threads (contract:
 * moe_cuda_moe_permute): counts by shared atomics, a prefix over the
 * experts, then windows of MOE_PERM_ONE slots in order: a slot's row is
 * its expert's base + the same expert's slots in earlier warps of the
 * window (per-warp counts in shared memory) + its rank among its warp's
 * lanes with that expert (__match_any_sync).  Called by every thread.
 */
__device__ __forceinline__ void
moe_permute_block(const int32_t *sel, int n, int E, int32_t *offs,
    int32_t *erow, int32_t *slot_of, unsigned long long *tot,
    moe_perm_smem &sm)
{
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;

    for (int e = threadIdx.x; e < E; e += blockDim.x) {
        sm.cnt[e] = 0;
    }
    __syncthreads();
    for (int i = threadIdx.x; i < n; i += blockDim.x) {
        atomicAdd(&sm.cnt[sel[i]], 1);
    }
    __syncthreads();
    if (threadIdx.x == 0) {
        int o = 0;

        for (int e = 0; e < E; e++) {
            sm.base[e] = o;
            offs[e] = o;
            o += sm.cnt[e];
        }
        offs[E] = o;
    }
    if (tot != NULL) {
        for (int e = threadIdx.x; e < E; e += blockDim.x) {
            tot[e] += (unsigned long long) sm.cnt[e];
        }
    }
    for (int i0 = 0; i0 < n; i0 += MOE_PERM_ONE) {
        int      i = i0 + threadIdx.x;
        int      e = i < n ? sel[i] : -1;
        unsigned peers = __match_any_sync(0xffffffffu, e);
        int      rank = __popc(peers & ((1u << lane) - 1u));

        for (int k = threadIdx.x; k < (MOE_PERM_ONE / 32) * E;
             k += MOE_PERM_ONE)
        {
            sm.wcnt[k / E][k % E] = 0;
        }
        __syncthreads();        /* base written, wcnt cleared */
        if (e >= 0 && rank == 0) {
            sm.wcnt[warp][e] = __popc(peers);
        }
        __syncthreads();
        if (e >= 0) {
            int r = sm.base[e] + rank;

            for (int w = 0; w < warp; w++) {
                r += sm.wcnt[w][e];
            }
            erow[r] = i;
            slot_of[i] = r;
        }
        __syncthreads();        /* all reads of base done */
        for (int x = threadIdx.x; x < E; x += MOE_PERM_ONE) {
            int s = 0;

            for (int w = 0; w < MOE_PERM_ONE / 32; w++) {
                s += sm.wcnt[w][x];
            }
            sm.base[x] += s;
        }
        __syncthreads();        /* wcnt read, base updated */
    }
}

#endif /* MOE_KERNELS_MOE_PERMUTE_CUH */
