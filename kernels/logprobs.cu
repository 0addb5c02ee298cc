/*
 * Logprobs rows: max, sum of exponentials (double) and the top k (k <= 20)
 * of each row in one block.  Each thread keeps its own top k of the ids it
 * strides over (an insertion list in registers / local memory), then k
 * rounds of a block argmax over the threads' list heads merge them: k
 * block reductions, no sort of the vocabulary.  The host reference is
 * moe_logprobs_row() (engine/sampling/sampling.c).
 */
#include <limits.h>
#include <math.h>

#include "common.cuh"
#include "logprobs.h"

#define LP_THREADS 256
#define LP_K       MOE_K_LOGPROBS_MAX_K


/* (va, ia) before (vb, ib): larger value, or equal value and lower id */
__device__ __forceinline__ bool
lp_better(float va, int ia, float vb, int ib)
{
    return va > vb || (va == vb && ia < ib);
}


__device__ __forceinline__ double
lp_warp_sum_d(double v)
{
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) {
        v += __shfl_xor_sync(0xffffffffu, v, o);
    }
    return v;
}


__global__ void
kernel_logprobs_rows(const float *x, int64_t ld, int V,
    const moe_cuda_logprobs_param_t *params, const int32_t *chosen,
    float *lp, int32_t *top_id, float *top_lp)
{
    moe_pdl_enter();
    __shared__ float   shf[32];
    __shared__ double  shd[32];
    __shared__ float   sv[32];
    __shared__ int     si[32];
    __shared__ int     win;

    moe_cuda_logprobs_param_t  p = params[blockIdx.x];
    const float               *row = x + (int64_t) blockIdx.x * ld;
    int        n = V, i, j, k, cnt = 0, pos = 0, r;
    int        lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    int        nw = (blockDim.x + 31) >> 5;
    float      m = -INFINITY, s, lse, lv[LP_K];
    int        li[LP_K];
    double     sum = 0.0;

    if (!p.enabled) {
        return;
    }
    if (p.n_valid > 0 && p.n_valid < V) {
        n = p.n_valid;
    }
    k = p.k < 0 ? 0 : (p.k > LP_K ? LP_K : p.k);
    s = p.inv_temperature;

    /* max (NaN never wins) and this thread's top k, one pass */
    for (i = threadIdx.x; i < n; i += blockDim.x) {
        float v = row[i];

        if (!(v == v)) {
            continue;
        }
        m = fmaxf(m, v);
        if (k == 0 || (cnt == k && !(v > lv[cnt - 1]))) {
            continue;
        }
        j = cnt < k ? cnt++ : cnt - 1;
        while (j > 0 && v > lv[j - 1]) {
            lv[j] = lv[j - 1];
            li[j] = li[j - 1];
            j--;
        }
        lv[j] = v;
        li[j] = i;
    }
    m = moe_warp_max(m);
    if (lane == 0) {
        shf[warp] = m;
    }
    __syncthreads();
    m = lane < nw ? shf[lane] : -INFINITY;
    m = moe_warp_max(m);

    for (i = threadIdx.x; i < n; i += blockDim.x) {
        float v = row[i];

        if (v == v) {
            sum += (double) expf((v - m) * s);
        }
    }
    sum = lp_warp_sum_d(sum);
    if (lane == 0) {
        shd[warp] = sum;
    }
    __syncthreads();
    sum = lane < nw ? shd[lane] : 0.0;
    sum = lp_warp_sum_d(sum);
    lse = (float) log(sum);

    if (threadIdx.x == 0) {
        int c = chosen != NULL ? chosen[blockIdx.x] : -1;

        lp[blockIdx.x] = c >= 0 && c < n ? (row[c] - m) * s - lse : NAN;
    }

    /* merge: k rounds of a block argmax over the list heads */
    for (r = 0; r < LP_K; r++) {
        float  bv = -INFINITY;
        int    bi = INT_MAX, bt = INT_MAX;
        size_t o = (size_t) blockIdx.x * LP_K + (size_t) r;

        if (r >= k) {
            if (threadIdx.x == 0) {
                top_id[o] = -1;
                top_lp[o] = NAN;
            }
            continue;
        }
        if (pos < cnt) {
            bv = lv[pos];
            bi = li[pos];
            bt = threadIdx.x;
        }
#pragma unroll
        for (int q = 16; q > 0; q >>= 1) {
            float ov = __shfl_down_sync(0xffffffffu, bv, q);
            int   oi = __shfl_down_sync(0xffffffffu, bi, q);
            int   ot = __shfl_down_sync(0xffffffffu, bt, q);

            if (lp_better(ov, oi, bv, bi)) {
                bv = ov;
                bi = oi;
                bt = ot;
            }
        }
        __syncthreads();            /* sv / si / win of the last round */
        if (lane == 0) {
            sv[warp] = bv;
            si[warp] = bi;
            shf[warp] = __int_as_float(bt);
        }
        __syncthreads();
        if (warp == 0) {
            bv = lane < nw ? sv[lane] : -INFINITY;
            bi = lane < nw ? si[lane] : INT_MAX;
            bt = lane < nw ? __float_as_int(shf[lane]) : INT_MAX;
#pragma unroll
            for (int q = 16; q > 0; q >>= 1) {
                float ov = __shfl_down_sync(0xffffffffu, bv, q);
                int   oi = __shfl_down_sync(0xffffffffu, bi, q);
                int   ot = __shfl_down_sync(0xffffffffu, bt, q);

                if (lp_better(ov, oi, bv, bi)) {
                    bv = ov;
                    bi = oi;
                    bt = ot;
                }
            }
            if (lane == 0) {
                win = bi == INT_MAX ? -1 : bt;
                top_id[o] = bi == INT_MAX ? -1 : bi;
                top_lp[o] = bi == INT_MAX ? NAN : (bv - m) * s - lse;
            }
        }
        __syncthreads();
        if ((int) threadIdx.x == win) {
            pos++;
        }
    }
}


extern "C" int
moe_cuda_logprobs_rows(const float *logits, int64_t ld, int rows, int V,
    const moe_cuda_logprobs_param_t *params, const int32_t *chosen,
    float *lp, int32_t *top_id, float *top_lp, cudaStream_t stream)
{
    if (rows <= 0) {
        return MOE_K_OK;
    }
    if (V <= 0 || ld < V || logits == NULL || params == NULL || lp == NULL
        || top_id == NULL || top_lp == NULL)
    {
        moe_cuda_set_error("logprobs: bad shape or NULL pointer (V %d, "
                           "ld %lld)", V, (long long) ld);
        return MOE_K_EBACKEND;
    }
    MOE_CUDA_CHECK(moe_launch(kernel_logprobs_rows, rows, LP_THREADS, 0,
        stream, logits, ld, V, params, chosen, lp, top_id, top_lp));
    return MOE_K_OK;
}
