/*
 * Device code of a one-token FFN norm + router (norm_route.h): the top-k
 * and permutation tail kernel_norm_route1 ends with, and the epilogue a
 * GEMV runs to do the whole chain in its own launch (moe_route_epi_t).
 */
#ifndef MOE_KERNELS_NORM_ROUTE_CUH
#define MOE_KERNELS_NORM_ROUTE_CUH

#include "common.cuh"
#include "moe_route.cuh"
#include "norm_route.h"

#define NR_MAX_K    32
#define RE_MAX_COLS 32                  /* columns a block of the GEMV owns */


/*
 * One warp (all lanes): the top-k of the E logits in shared memory lg_s
 * (moe_route_topk_warp: sel, selw, margin) and the permutation of the K
 * slots of the one token (K <= 32: one slot a lane, ranks by a scan over
 * the K choices, no barrier): erow, slot_of, offs, and tot += the
 * experts' counts.  lgw: ROUTE_MAX_E floats, ssel: NR_MAX_K ints of the
 * warp's shared memory.
 */
__device__ __forceinline__ void
moe_nr_topk_permute(const float *lg_s, int E, int K, int renorm,
    int32_t *sel, float *selw, float *margin, int32_t *offs, int32_t *erow,
    int32_t *slot_of, unsigned long long *tot, float *lgw, int *ssel,
    int lane)
{
    moe_route_topk_warp(lg_s, 0, E, K, renorm, sel, selw, margin, lgw, lane,
                        ssel);
    if (lane < K) {
        int ei = ssel[lane], r = 0;

        for (int j = 0; j < K; j++) {
            int ej = ssel[j];

            r += ej < ei || (ej == ei && j < lane);
        }
        erow[r] = lane;
        slot_of[lane] = r;
    }
    for (int e = lane; e <= E; e += 32) {
        int below = 0, at = 0;

        for (int j = 0; j < K; j++) {
            below += ssel[j] < e;
            at += ssel[j] == e;
        }
        offs[e] = below;
        if (e < E && tot != NULL) {
            tot[e] += (unsigned long long) at;
        }
    }
}


/*
 * moe_nr_topk_permute for E <= 32 with one expert a lane: the softmax
 * with moe_route_topk_warp's expressions and sums (one logit a lane,
 * the same warp trees), each expert's rank in its order (probability
 * descending, ties to the lower expert) counted against the others in
 * shared memory instead of K + 1 rounds of warp argmax, the K chosen
 * summed in rank order: so the same sel, selw and margin bits, without
 * the rounds' shuffles or reading selw back for the renormalisation.
 * lgw: ROUTE_MAX_E floats, ssel: NR_MAX_K ints of the warp's shared
 * memory.
 */
__device__ __forceinline__ void
moe_nr_topk_lanes(const float *lg_s, int E, int K, int renorm,
    int32_t *sel, float *selw, float *margin, int32_t *offs, int32_t *erow,
    int32_t *slot_of, unsigned long long *tot, float *lgw, int *ssel,
    int lane)
{
    float l = lane < E ? lg_s[lane] : -INFINITY;
    float mx = moe_warp_max(l);
    float p = lane < E ? expf(l - mx) : 0.0f;
    float sum = moe_warp_sum(p);
    int   r = 0;

    p = p / sum;
    if (lane < E) {
        lgw[lane] = p;
    }
    __syncwarp();
    for (int j = 0; j < E; j++) {
        float q = lgw[j];

        r += q > p || (q == p && j < lane);
    }
    __syncwarp();                       /* lgw is rewritten below */
    if (lane < E && r < K) {
        ssel[r] = lane;
        lgw[r] = p;                     /* the chosen, in rank order */
    }
    __syncwarp();
    float ksum = 0.0f;

    for (int k = 0; k < K; k++) {
        ksum += lgw[k];
    }
    if (lane < E && r <= K) {
        if (r < K) {
            sel[r] = lane;
            selw[r] = renorm ? p / ksum : p;
        } else if (margin != NULL) {
            *margin = lgw[K - 1] - p;   /* the (K+1)-th */
        }
    }
    if (margin != NULL && K == E && lane == 0) {
        *margin = 1.0f;
    }
    if (lane < K) {
        int ei = ssel[lane], rk = 0;

        for (int j = 0; j < K; j++) {
            int ej = ssel[j];

            rk += ej < ei || (ej == ei && j < lane);
        }
        erow[rk] = lane;
        slot_of[lane] = rk;
    }
    for (int e = lane; e <= E; e += 32) {
        int below = 0, at = 0;

        for (int j = 0; j < K; j++) {
            below += ssel[j] < e;
            at += ssel[j] == e;
        }
        offs[e] = below;
        if (e < E && tot != NULL) {
            tot[e] += (unsigned long long) at;
        }
    }
}


/* Before the GEMV's PDL wait: the router's and the norm weight's lines of
 * columns [c0, c0 + nc) asked into L2 (weights: no kernel writes them). */
__device__ __forceinline__ void
moe_route_epi_prefetch(const moe_route_epi_t &ep, int c0)
{
    int t = (int) threadIdx.x;

    if (t < ep.E) {
        moe_prefetch_l2(ep.router + (size_t) t * ep.D + c0);
    } else if (t == ep.E) {
        moe_prefetch_l2(ep.w + c0);
    }
}


/*
 * The epilogue (norm_route.h, moe_route_epi_t) of a GEMV block of NT
 * threads that wrote the delta's columns [c0, c0 + nc) of its one row
 * into Y (visible to the block: a __syncthreads after the writes); nc <=
 * RE_MAX_COLS.  Every thread of every block calls it, after the GEMV's
 * PDL wait.  part holds expert q's partial of block b at q * nblk + b,
 * so that the last block reads each expert's partials in whole lines.
 */
template <int NT>
__device__ __forceinline__ void
moe_route_epi(const moe_route_epi_t &ep, const float *Y, int c0, int nc)
{
    constexpr int    NWP = NT / 32;
    __shared__ float sums[ROUTE_MAX_E + 1];
    __shared__ float lgw[ROUTE_MAX_E];
    __shared__ int   ssel[NR_MAX_K];
    __shared__ int   last;
    const int        t = threadIdx.x, lane = t & 31, warp = t >> 5;
    const int        E = ep.E, D = ep.D, Q = E + 1;
    const unsigned   nblk = gridDim.x * gridDim.y;
    const unsigned   bid = blockIdx.y * gridDim.x + blockIdx.x;

    /* 1. every warp: its lanes' columns of the residual x + y (as
     * moe_rms_row adds it), the norm weight and
     * its experts' router entries, all loaded at once; then the block's
     * partial sums: expert q's router entry times the weighted residual,
     * and (q == E) the squares */
    const int c = c0 + (lane < nc ? lane : 0);
    float     v;

    {
        float xv = 0.0f, yv = 0.0f, wv = 0.0f;

        if (lane < nc) {
            xv = ep.x[c];
            yv = Y[c];
            wv = ep.w[c];
        }

        v = xv + yv;
        for (int q = warp; q < Q; q += NWP) {
            float a = 0.0f;

            if (lane < nc) {
                a = q == E ? v * v : ep.router[(size_t) q * D + c] * (wv * v);
            }
            a = moe_warp_sum(a);
            if (lane == 0) {
                ep.part[(size_t) q * nblk + bid] = a;
            }
        }
    }
    /* warp 0 writes the residual back once every warp has read it; the
     * block's residual and partials visible GPU-wide before the count
     * says so (the pattern of cooperative groups' grid sync: the
     * barrier, then one thread's fence) */
    __syncthreads();
    if (warp == 0) {
        if (lane < nc) {
            ep.x[c] = v;
        }
        __syncwarp();
        if (lane == 0) {
            __threadfence();
            last = atomicAdd(ep.count, 1u) == nblk - 1;
            if (last) {
                __threadfence();
            }
        }
    }
    __syncthreads();
    if (!last) {
        return;
    }

    /* 3. the last block: each expert's partials summed in block order
     * (lane l sums blocks l, l + 32, ..; then the warp tree), so the same
     * bits whichever block came last; read through L2 (other blocks wrote
     * them) */
    for (int q = warp; q < Q; q += NWP) {
        const float *p = ep.part + (size_t) q * nblk;
        float        a = 0.0f;

#pragma unroll 8
        for (unsigned b = lane; b < nblk; b += 32) {
            a += __ldcg(p + b);
        }
        a = moe_warp_sum(a);
        if (lane == 0) {
            sums[q] = a;
        }
    }
    __syncthreads();

    const float inv = 1.0f / sqrtf(sums[E] / (float) D + ep.eps);

    /* 4. warp 0: the logits, the top-k and the permutation; the other
     * warps (all of them for a one-warp block, after) the normalized row
     * with moe_rms_row's products */
    if (warp == 0) {
        for (int e = lane; e < E; e += 32) {
            float l = sums[e] * inv;

            sums[e] = l;
            ep.logits[e] = l;
        }
        __syncwarp();
        if (E <= 32) {
            moe_nr_topk_lanes(sums, E, ep.K, ep.renorm, ep.sel, ep.selw,
                              ep.margin, ep.offs, ep.erow, ep.slot_of,
                              reinterpret_cast<unsigned long long *>(ep.tot),
                              lgw, ssel, lane);
        } else {
            moe_nr_topk_permute(sums, E, ep.K, ep.renorm, ep.sel, ep.selw,
                                ep.margin, ep.offs, ep.erow, ep.slot_of,
                                reinterpret_cast<unsigned long long *>(
                                    ep.tot),
                                lgw, ssel, lane);
        }
        if (lane == 0) {
            *ep.count = 0u;             /* for the next launch */
        }
    }
    if (warp != 0 || NWP == 1) {
        const int t0 = NWP == 1 ? t : t - 32, nt = NWP == 1 ? NT : NT - 32;

#pragma unroll 4
        for (int d = t0; d < D / 4; d += nt) {
            float4 v = __ldcg(reinterpret_cast<const float4 *>(ep.x) + d);
            float4 w = reinterpret_cast<const float4 *>(ep.w)[d];
            float4 o;

            o.x = w.x * (v.x * inv);
            o.y = w.y * (v.y * inv);
            o.z = w.z * (v.z * inv);
            o.w = w.w * (v.w * inv);
            __nv_bfloat162 pr[2];

            pr[0] = __floats2bfloat162_rn(o.x, o.y);
            pr[1] = __floats2bfloat162_rn(o.z, o.w);
            *reinterpret_cast<uint2 *>(ep.out + 4 * d) =
                *reinterpret_cast<uint2 *>(pr);
            if (ep.out_f32 != NULL) {
                reinterpret_cast<float4 *>(ep.out_f32)[d] = o;
            }
        }
    }
}

#endif
