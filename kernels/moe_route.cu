/*
 * Router GEMV in fp32 (one warp per expert) and the softmax/top-k done by
 * warp 0 of the token's block: K rounds of a warp argmax, ties to the lower
 * expert as in the CPU backend's scan.  The softmax sum is a warp tree
 * (the CPU sums in order): weights may differ from the CPU's in the last
 * bits; the choices differ only where two probabilities tie within that.
 */
#include <math.h>

#include "common.cuh"
#include "moe_route.h"

#define ROUTE_MAX_E 256


__global__ void
kernel_moe_route(const float *xf, int D, const float *router, int E, int K,
    int32_t *sel, float *selw, float *margin)
{
    __shared__ float lg[ROUTE_MAX_E];
    int              t = blockIdx.x;
    int              lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    int              nw = blockDim.x >> 5;
    const float     *x = xf + (size_t) t * D;

    for (int e = warp; e < E; e += nw) {
        const float *w = router + (size_t) e * D;
        float        s = 0.0f;

        for (int d = lane; d < D; d += 32) {
            s += w[d] * x[d];
        }
        s = moe_warp_sum(s);
        if (lane == 0) {
            lg[e] = s;
        }
    }
    __syncthreads();
    if (warp != 0) {
        return;
    }

    /* warp 0: softmax over the E logits, then K rounds of a warp argmax
     * (ties to the lower expert, as the CPU's strict > scan) */
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
        if (lane == 0) {
            sel[(size_t) t * K + k] = be;
            selw[(size_t) t * K + k] = bv;
            lg[be] = -INFINITY;     /* taken */
        }
        ksum += bv;
        __syncwarp();
    }
    if (margin != NULL && K == E && lane == 0) {
        margin[t] = 1.0f;
    }
    if (lane < K) {
        selw[(size_t) t * K + lane] /= ksum;
    }
    for (int k = lane + 32; k < K; k += 32) {
        selw[(size_t) t * K + k] /= ksum;
    }
}


extern "C" int
moe_cuda_route(const float *xf, int T, int D, const float *router, int E,
    int K, int32_t *sel, float *selw, float *margin, cudaStream_t stream)
{
    if (E < 1 || E > ROUTE_MAX_E || K < 1 || K > E) {
        moe_cuda_set_error("route: %d experts, top-%d not supported", E, K);
        return MOE_EUNSUPPORTED;
    }
    if (T <= 0) {
        return MOE_OK;
    }
    kernel_moe_route<<<T, 256, 0, stream>>>(xf, D, router, E, K, sel, selw,
                                                 margin);
    MOE_CUDA_CHECK_LAUNCH("kernel_moe_route");
    return MOE_OK;
}
