/*
 * Router in two launches.
 *
 * 1. Logits (fp32): one block of 256 threads per (expert, tile of up to
 *    ROUTE_RT tokens); the threads split the reduction dimension, read the
 *    expert's router row once as 16-byte vectors (when D % 4 == 0) and
 *    apply it to every token of the tile, then reduce by warp shuffles and
 *    shared memory.  Grid E x ceil(T / ROUTE_RT): every SM has work even at
 *    one token (the v2 kernel ran one block per token, which at T = 1 read
 *    the whole (E, D) router through a single SM: ~67 us per layer).
 * 2. Softmax/top-k: one warp per token, K rounds of a warp argmax, ties to
 *    the lower expert as in the CPU backend's scan.  The softmax sum is a
 *    warp tree (the CPU sums in order): weights may differ from the CPU's
 *    in the last bits; the choices differ only where two probabilities tie
 *    within that.
 * 3. kernel_norm_route (below): at decode, the FFN norm, the logits, the
 *    top-k and the permutation in one block, handing over on chip.
 */
#include <math.h>

#include "common.cuh"
#include "moe_permute.cuh"
#include "moe_route.h"
#include "rmsnorm.cuh"

#define ROUTE_MAX_E    256
#define ROUTE_RT       8           /* tokens per logits block */
#define ROUTE_THREADS  256
#define TOPK_WARPS     4           /* tokens per top-k block */


template <bool VEC>
__global__ void __launch_bounds__(ROUTE_THREADS)
kernel_route_logits(const float *xf, int T, int D, const float *router,
    int E, float *logits)
{
    moe_pdl_enter();
    __shared__ float red[ROUTE_THREADS / 32][ROUTE_RT];
    int              e = blockIdx.x, t0 = blockIdx.y * ROUTE_RT;
    int              nt = T - t0 < ROUTE_RT ? T - t0 : ROUTE_RT;
    int              lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const float     *w = router + (size_t) e * D;
    const float     *x = xf + (size_t) t0 * D;
    float            acc[ROUTE_RT];

#pragma unroll
    for (int j = 0; j < ROUTE_RT; j++) {
        acc[j] = 0.0f;
    }
    if (VEC) {
        const float4 *w4 = reinterpret_cast<const float4 *>(w);
        int           D4 = D >> 2;

#pragma unroll 4
        for (int i = threadIdx.x; i < D4; i += ROUTE_THREADS) {
            float4 wv = __ldg(w4 + i);

#pragma unroll
            for (int j = 0; j < ROUTE_RT; j++) {
                if (j < nt) {
                    float4 xv = *(reinterpret_cast<const float4 *>(
                                      x + (size_t) j * D) + i);

                    acc[j] += wv.x * xv.x + wv.y * xv.y + wv.z * xv.z
                              + wv.w * xv.w;
                }
            }
        }
    } else {
        for (int i = threadIdx.x; i < D; i += ROUTE_THREADS) {
            float wv = w[i];

#pragma unroll
            for (int j = 0; j < ROUTE_RT; j++) {
                if (j < nt) {
                    acc[j] += wv * x[(size_t) j * D + i];
                }
            }
        }
    }
#pragma unroll
    for (int j = 0; j < ROUTE_RT; j++) {
        float v = moe_warp_sum(acc[j]);

        if (lane == 0) {
            red[warp][j] = v;
        }
    }
    __syncthreads();
    if (threadIdx.x < nt) {
        float s = 0.0f;

        for (int wi = 0; wi < ROUTE_THREADS / 32; wi++) {
            s += red[wi][threadIdx.x];
        }
        logits[(size_t) (t0 + threadIdx.x) * E + e] = s;
    }
}


/*
 * Softmax and top-k of token t (its E logits at lrow) by one warp (lg: E
 * floats of shared memory for the warp): sel, selw, margin as
 * moe_cuda_route writes them.
 */
__device__ __forceinline__ void
route_topk_token(const float *lrow, int t, int E, int K, int renorm,
    int32_t *sel, float *selw, float *margin, float *lg)
{
    int lane = threadIdx.x & 31;

    for (int e = lane; e < E; e += 32) {
        lg[e] = lrow[e];
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


__global__ void __launch_bounds__(TOPK_WARPS * 32)
kernel_route_topk(const float *logits, int T, int E, int K, int renorm,
    int32_t *sel, float *selw, float *margin)
{
    moe_pdl_enter();
    __shared__ float lgs[TOPK_WARPS][ROUTE_MAX_E];
    int              warp = threadIdx.x >> 5;
    int              t = blockIdx.x * TOPK_WARPS + warp;

    if (t >= T) {
        return;                 /* uniform over the warp; no block barrier */
    }
    route_topk_token(logits + (size_t) t * E, t, E, K, renorm, sel, selw,
                     margin, lgs[warp]);
}


/*
 * The decode steps' FFN entry in one block of MOE_RMS_THREADS threads
 * (moe_cuda_norm_route).  Separate launches cost a memory round trip each
 * between stages that depend on each other (ncu, H200: norm 3.4, logits
 * 4.0, top-k 4.2, permutation 3.6 us, and a one-block kernel chaining the
 * same four stages through global memory took 15.6); here the stages hand
 * over in registers and shared memory:
 *  - before the PDL wait, the router and norm weights are prefetched into
 *    L2 (weights: no kernel before writes them);
 *  - each row's residual add + RMSNorm (moe_rms_row) leaves the thread's
 *    normalized values in registers; the thread dots them with the same
 *    elements of NR_EC router rows at a time, and the block sums those
 *    (warp shuffles, then one warp per expert over the warps' sums in
 *    shared memory) into the logits row in shared memory;
 *  - one warp per token takes the top-k from there (route_topk_token);
 *  - the permutation (moe_permute_block).
 * Results: x, xb, xf, the permutation bit for bit as the separate
 * launches; the logits in another fp32 summation order (so the weights
 * and margins within fp32 rounding of theirs).
 */
#define NR_EC  8                 /* experts per logits round */
#define NR_MAX_ROUNDS 8          /* most T * ceil(E / NR_EC) */

template <int NV>
__global__ void __launch_bounds__(MOE_RMS_THREADS)
kernel_norm_route(float *x, const float *delta, int T, int D, const float *w,
    float eps, __nv_bfloat16 *xb, float *xf, const float *router, int E,
    int K, int renorm, float *logits, int32_t *sel, float *selw,
    float *margin, int32_t *offs, int32_t *erow, int32_t *slot_of,
    unsigned long long *tot)
{
    moe_prefetch_l2_span(router, (size_t) E * D * sizeof(float));
    moe_prefetch_l2_span(w, (size_t) D * sizeof(float));
    moe_pdl_enter();
    __shared__ float sh[32];
    __shared__ float part[MOE_RMS_THREADS / 32][NR_EC];
    __shared__ union {
        float         lg[MOE_NORM_ROUTE_MAX_T][2][ROUTE_MAX_E];
        moe_perm_smem perm;
    } u;
    const int     lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int     D4 = D >> 2;
    const float4 *r4 = reinterpret_cast<const float4 *>(router);

    for (int t = 0; t < T; t++) {
        float4 o[NV];

        if (delta != NULL) {
            moe_rms_row_delta dl = {
                reinterpret_cast<const float4 *>(delta + (size_t) t * D) };

            moe_rms_row<NV>(x + (size_t) t * D, dl, D, w, eps,
                            xb + (size_t) t * D, xf + (size_t) t * D, sh, o);
        } else {
            moe_rms_row<NV>(x + (size_t) t * D, moe_rms_no_delta(), D, w,
                            eps, xb + (size_t) t * D, xf + (size_t) t * D,
                            sh, o);
        }
        for (int e0 = 0; e0 < E; e0 += NR_EC) {
            float p[NR_EC];

#pragma unroll
            for (int c = 0; c < NR_EC; c++) {
                p[c] = 0.0f;
            }
#pragma unroll
            for (int j = 0; j < NV; j++) {
                int d = threadIdx.x + j * MOE_RMS_THREADS;

#pragma unroll
                for (int c = 0; c < NR_EC; c++) {
                    if (d < D4 && e0 + c < E) {
                        float4 rv = __ldg(r4 + (size_t) (e0 + c) * D4 + d);

                        p[c] += rv.x * o[j].x + rv.y * o[j].y
                                + rv.z * o[j].z + rv.w * o[j].w;
                    }
                }
            }
#pragma unroll
            for (int c = 0; c < NR_EC; c++) {
                p[c] = moe_warp_sum(p[c]);
            }
            if (lane == 0) {
#pragma unroll
                for (int c = 0; c < NR_EC; c++) {
                    part[warp][c] = p[c];
                }
            }
            __syncthreads();
            if (warp < NR_EC && e0 + warp < E) {
                float v = moe_warp_sum(part[lane][warp]);

                if (lane == 0) {
                    u.lg[t][0][e0 + warp] = v;
                    logits[(size_t) t * E + e0 + warp] = v;
                }
            }
            __syncthreads();            /* part read before the next round */
        }
    }
    if (warp < T) {
        route_topk_token(u.lg[warp][0], warp, E, K, renorm, sel, selw, margin,
                         u.lg[warp][1]);
    }
    __syncthreads();                    /* sel written, lg free */
    moe_permute_block(sel, T * K, E, offs, erow, slot_of, tot, u.perm);
}


extern "C" int
moe_cuda_route(const float *xf, int T, int D, const float *router, int E,
    int K, int renorm, float *logits, int32_t *sel, float *selw, float *margin,
    cudaStream_t stream)
{
    dim3 grid;

    if (E < 1 || E > ROUTE_MAX_E || K < 1 || K > E || D < 1) {
        moe_cuda_set_error("route: %d experts, top-%d not supported", E, K);
        return MOE_K_EUNSUPPORTED;
    }
    if (T <= 0) {
        return MOE_K_OK;
    }
    grid = dim3((unsigned) E, (unsigned) ((T + ROUTE_RT - 1) / ROUTE_RT));
    if (D % 4 == 0
        && ((uintptr_t) xf & 15) == 0 && ((uintptr_t) router & 15) == 0)
    {
        MOE_CUDA_CHECK(moe_launch(kernel_route_logits<true>, grid,
            ROUTE_THREADS, 0, stream, xf, T, D, router, E, logits));
    } else {
        MOE_CUDA_CHECK(moe_launch(kernel_route_logits<false>, grid,
            ROUTE_THREADS, 0, stream, xf, T, D, router, E, logits));
    }
    MOE_CUDA_CHECK(moe_launch(kernel_route_topk,
        (T + TOPK_WARPS - 1) / TOPK_WARPS, TOPK_WARPS * 32, 0, stream, logits,
        T, E, K, renorm, sel, selw, margin));
    return MOE_K_OK;
}


extern "C" int
moe_cuda_norm_route(float *x, const float *delta, int T, int D,
    const float *w, float eps, moe_bf16_t *xb, float *xf,
    const float *router, int E, int K, int renorm, float *logits,
    int32_t *sel, float *selw, float *margin, int32_t *offs, int32_t *erow,
    int32_t *slot_of, int64_t *tot, cudaStream_t stream)
{
    int nv = moe_rms_nv(D);

    if (T < 1 || T > MOE_NORM_ROUTE_MAX_T || nv == 0 || E < 1
        || E > ROUTE_MAX_E || E > MOE_PERM_MAX_E || K < 1 || K > E
        || T * ((E + NR_EC - 1) / NR_EC) > NR_MAX_ROUNDS
        || ((uintptr_t) x | (uintptr_t) delta | (uintptr_t) w
            | (uintptr_t) xf | (uintptr_t) router) % 16 != 0
        || (uintptr_t) xb % 8 != 0)
    {
        moe_cuda_set_error("norm_route: %d tokens, D %d, %d experts, "
                           "top-%d or the alignment not supported", T, D, E,
                           K);
        return MOE_K_EUNSUPPORTED;
    }
#define NORM_ROUTE(NV)                                                     \
    moe_launch(kernel_norm_route<NV>, 1, MOE_RMS_THREADS, 0, stream, x,    \
               delta, T, D, w, eps,                                        \
               reinterpret_cast<__nv_bfloat16 *>(xb), xf, router, E, K,    \
               renorm, logits, sel, selw, margin, offs, erow, slot_of,     \
               reinterpret_cast<unsigned long long *>(tot))
    MOE_CUDA_CHECK(nv == 1 ? NORM_ROUTE(1) : nv == 2 ? NORM_ROUTE(2)
                   : nv == 4 ? NORM_ROUTE(4) : NORM_ROUTE(8));
#undef NORM_ROUTE
    return MOE_K_OK;
}
