/* Row argmax over fp32 logits (device greedy sampling). */
#include <limits.h>
#include <math.h>

#include "common.cuh"
#include "argmax.h"

#define AM_THREADS 1024
#define AM_UNR     4        /* loads in flight per thread per round */


/* (va, ia) beats (vb, ib): larger value, or equal value and lower id */
__device__ __forceinline__ bool
am_better(float va, int ia, float vb, int ib)
{
    return va > vb || (va == vb && ia < ib);
}


__global__ void
kernel_argmax_rows(const float *x, int64_t ld, int V, const int32_t *n_valid,
    int32_t *out)
{
    moe_pdl_enter();
    __shared__ float sv[32];
    __shared__ int   si[32];
    const float     *row = x + (int64_t) blockIdx.x * ld;
    int              n = V, lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    int              nw = (blockDim.x + 31) >> 5, bi = INT_MAX, i;
    float            bv = -INFINITY;

    if (n_valid != NULL) {
        int k = n_valid[blockIdx.x];

        if (k > 0 && k < V) {
            n = k;
        }
    }
    /* NaN compares false both ways: never taken.  A round issues
     * AM_UNR independent loads before comparing (one row per block: a
     * loop of one load per trip waited a memory round trip per trip,
     * 27 us for V 32000 on the H200, ncu 2026-12-02) */
    for (i = threadIdx.x; i < n; i += AM_UNR * (int) blockDim.x) {
        float v[AM_UNR];

#pragma unroll
        for (int u = 0; u < AM_UNR; u++) {
            int j = i + u * (int) blockDim.x;

            v[u] = j < n ? row[j] : -INFINITY;
        }
#pragma unroll
        for (int u = 0; u < AM_UNR; u++) {
            int j = i + u * (int) blockDim.x;

            if (j < n && am_better(v[u], j, bv, bi)) {
                bv = v[u];
                bi = j;
            }
        }
    }
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) {
        float ov = __shfl_down_sync(0xffffffffu, bv, o);
        int   oi = __shfl_down_sync(0xffffffffu, bi, o);

        if (am_better(ov, oi, bv, bi)) {
            bv = ov;
            bi = oi;
        }
    }
    if (lane == 0) {
        sv[warp] = bv;
        si[warp] = bi;
    }
    __syncthreads();
    if (warp == 0) {
        bv = lane < nw ? sv[lane] : -INFINITY;
        bi = lane < nw ? si[lane] : INT_MAX;
#pragma unroll
        for (int o = 16; o > 0; o >>= 1) {
            float ov = __shfl_down_sync(0xffffffffu, bv, o);
            int   oi = __shfl_down_sync(0xffffffffu, bi, o);

            if (am_better(ov, oi, bv, bi)) {
                bv = ov;
                bi = oi;
            }
        }
        if (lane == 0) {
            out[blockIdx.x] = bi == INT_MAX ? 0 : bi;
        }
    }
}


extern "C" int
moe_cuda_argmax_rows(const float *x, int64_t ld, int rows, int V,
    const int32_t *n_valid, int32_t *out, cudaStream_t stream)
{
    if (rows <= 0) {
        return MOE_K_OK;
    }
    if (V <= 0 || ld < V) {
        moe_cuda_set_error("argmax: bad shape (V %d, ld %lld)", V,
                           (long long) ld);
        return MOE_K_EBACKEND;
    }
    MOE_CUDA_CHECK(moe_launch(kernel_argmax_rows, rows, AM_THREADS, 0, stream,
        x, ld, V, n_valid, out));
    return MOE_K_OK;
}
