/*
 * Router GEMV in fp32 (one warp per expert) and the softmax/top-k done by
 * one thread per token, exactly as the CPU backend orders it.
 */
#include <math.h>

#include "common.cuh"
#include "moe_route.h"

#define ROUTE_MAX_E 256


__global__ void
kernel_moe_route(const float *xf, int D, const float *router, int E, int K,
    int32_t *sel, float *selw)
{
    __shared__ float lg[ROUTE_MAX_E];
    __shared__ int   taken[ROUTE_MAX_E];
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
    for (int e = threadIdx.x; e < E; e += blockDim.x) {
        taken[e] = 0;
    }
    __syncthreads();
    if (threadIdx.x != 0) {
        return;
    }

    float mx = -INFINITY, sum = 0.0f, ksum = 0.0f;

    for (int e = 0; e < E; e++) {
        mx = fmaxf(mx, lg[e]);
    }
    for (int e = 0; e < E; e++) {
        lg[e] = expf(lg[e] - mx);
        sum += lg[e];
    }
    for (int e = 0; e < E; e++) {
        lg[e] /= sum;
    }
    for (int k = 0; k < K; k++) {
        int best = -1;

        for (int e = 0; e < E; e++) {
            if (!taken[e] && (best < 0 || lg[e] > lg[best])) {
                best = e;
            }
        }
        taken[best] = 1;
        sel[(size_t) t * K + k] = best;
        selw[(size_t) t * K + k] = lg[best];
        ksum += lg[best];
    }
    for (int k = 0; k < K; k++) {
        selw[(size_t) t * K + k] /= ksum;
    }
}


extern "C" int
moe_cuda_route(const float *xf, int T, int D, const float *router, int E,
    int K, int32_t *sel, float *selw, cudaStream_t stream)
{
    if (E < 1 || E > ROUTE_MAX_E || K < 1 || K > E) {
        moe_cuda_set_error("route: %d experts, top-%d not supported", E, K);
        return MOE_EUNSUPPORTED;
    }
    if (T <= 0) {
        return MOE_OK;
    }
    kernel_moe_route<<<T, 256, 0, stream>>>(xf, D, router, E, K, sel, selw);
    MOE_CUDA_CHECK_LAUNCH("kernel_moe_route");
    return MOE_OK;
}
