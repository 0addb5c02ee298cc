/*
 * The router's top-k of one token by one warp (moe_route.cu's
 * kernel_route_topk, and the fused top-k + permutation of
 * moe_permute.cu, run the same code: the same choices and weights).
 */
#ifndef MOE_KERNELS_MOE_ROUTE_CUH
#define MOE_KERNELS_MOE_ROUTE_CUH

#include <math.h>

#include "common.cuh"

#define ROUTE_MAX_E    256


/* acc + w . x over one float4 of an expert's router row: the one
 * expression every logits kernel sums with (moe_route.cu, norm_route.cu),
 * so their sums over the same float4 sequence are the same bits. */
__device__ __forceinline__ float
moe_route_dot4(float acc, float4 w, float4 x)
{
    return acc + (w.x * x.x + w.y * x.y + w.z * x.z + w.w * x.w);
}


/*
 * Token t: softmax over its E logits (fp32, a warp tree), the K largest
 * in descending order (ties to the lower expert) into sel / selw,
 * renormalised when renorm; margin[t] (margin may be NULL) the K-th
 * probability minus the (K+1)-th.  lg: ROUTE_MAX_E floats of shared
 * memory owned by the warp; sel_sh (K ints of shared memory, may be NULL)
 * gets the choices too, visible to the warp when it returns.  The whole
 * warp calls it.
 */
__device__ __forceinline__ void
moe_route_topk_rounds(const float *logits, int t, int E, int K, int renorm,
    int32_t *sel, float *selw, float *margin, float *lg, int lane,
    int *sel_sh = NULL)
{
    for (int e = lane; e < E; e += 32) {
        lg[e] = logits[(size_t) t * E + e];
    }
    __syncwarp();

    float mx = -INFINITY, sum = 0.0f, ksum = 0.0f;

    for (int e = lane; e < E; e += 32) {
        mx = fmaxf(mx, lg[e]);
    }
    mx = moe_warp_max(mx);
    for (int e = lane; e < E; e += 32) {
        sum += expf(lg[e] - mx);
    }
    sum = moe_warp_sum(sum);
    for (int e = lane; e < E; e += 32) {
        lg[e] = expf(lg[e] - mx) / sum;
    }
    __syncwarp();
    float pk = 0.0f;
    int   rounds = margin != NULL && K < E ? K + 1 : K;

    for (int k = 0; k < rounds; k++) {
        float bv = -INFINITY;
        int   be = -1;

        for (int e = lane; e < E; e += 32) {
            if (lg[e] > bv || (be < 0 && lg[e] >= bv)) {
                bv = lg[e];
                be = e;
            }
        }
#pragma unroll
        for (int o = 16; o > 0; o >>= 1) {
            float ov = __shfl_xor_sync(0xffffffffu, bv, o);
            int   oe = __shfl_xor_sync(0xffffffffu, be, o);

            if (oe >= 0 && (be < 0 || ov > bv || (ov == bv && oe < be))) {
                bv = ov;
                be = oe;
            }
        }
        if (k == K) {           /* the (K+1)-th: margin only */
            if (lane == 0) {
                margin[t] = pk - bv;
            }
            break;
        }
        pk = bv;
        __syncwarp();           /* all lanes read lg before it changes */
        if (lane == 0) {
            sel[(size_t) t * K + k] = be;
            if (sel_sh != NULL) {
                sel_sh[k] = be;
            }
            selw[(size_t) t * K + k] = bv;
            lg[be] = -INFINITY;     /* taken */
        }
        ksum += bv;
        __syncwarp();
    }
    if (margin != NULL && K == E && lane == 0) {
        margin[t] = 1.0f;
    }
    __syncwarp();               /* lane 0's selw stores are visible */
    for (int k = lane; renorm && k < K; k += 32) {
        selw[(size_t) t * K + k] /= ksum;
    }
}


/*
 * moe_route_topk_warp for E <= 32, one expert a lane: the softmax with
 * the rounds' expressions and sums (one logit a lane, the same warp
 * trees), each expert's rank in their order (probability descending,
 * ties to the lower expert) counted against the others in lg, the K
 * chosen summed in rank order: the same sel, selw, margin and sel_sh
 * bits as moe_route_topk_rounds without its K + 1 rounds of warp argmax
 * or its read-back of selw for the renormalisation (test_kernels checks
 * the two bit for bit, planted ties included).
 */
__device__ __forceinline__ void
moe_route_topk_lanes(const float *logits, int t, int E, int K, int renorm,
    int32_t *sel, float *selw, float *margin, float *lg, int lane,
    int *sel_sh = NULL)
{
    float l = lane < E ? logits[(size_t) t * E + lane] : -INFINITY;
    float mx = moe_warp_max(l);
    float p = lane < E ? expf(l - mx) : 0.0f;
    float sum = moe_warp_sum(p);
    int   r = 0;

    p = p / sum;
    if (lane < E) {
        lg[lane] = p;
    }
    __syncwarp();
    for (int j = 0; j < E; j++) {
        float q = lg[j];

        r += q > p || (q == p && j < lane);
    }
    if (lane < E && r < K) {
        lg[32 + r] = p;                 /* the chosen, in rank order */
        if (sel_sh != NULL) {
            sel_sh[r] = lane;
        }
    }
    __syncwarp();
    float ksum = 0.0f;

    for (int k = 0; k < K; k++) {
        ksum += lg[32 + k];
    }
    if (lane < E && r < K) {
        sel[(size_t) t * K + r] = lane;
        selw[(size_t) t * K + r] = renorm ? p / ksum : p;
    }
    if (margin != NULL && lane < E && r == K) {
        margin[t] = lg[32 + K - 1] - p; /* the (K+1)-th */
    }
    if (margin != NULL && K == E && lane == 0) {
        margin[t] = 1.0f;
    }
    __syncwarp();
}


/* The top-k of one token by one warp (the contract above
 * moe_route_topk_rounds): moe_route_topk_lanes up to 32 experts, else
 * the rounds. */
__device__ __forceinline__ void
moe_route_topk_warp(const float *logits, int t, int E, int K, int renorm,
    int32_t *sel, float *selw, float *margin, float *lg, int lane,
    int *sel_sh = NULL)
{
    if (E <= 32) {
        moe_route_topk_lanes(logits, t, E, K, renorm, sel, selw, margin, lg,
                             lane, sel_sh);
    } else {
        moe_route_topk_rounds(logits, t, E, K, renorm, sel, selw, margin, lg,
                              lane, sel_sh);
    }
}

#endif
