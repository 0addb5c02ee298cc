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
 */
#include <math.h>

#include "common.cuh"
#include "moe_route.cuh"
#include "moe_route.h"

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

                    acc[j] = moe_route_dot4(acc[j], wv, xv);
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
 * Logits of prefill-sized steps with few experts: one block per tile of
 * 32 / EM tokens computes every expert's logit (EM >= E), so each token's
 * row is read from L2 once instead of once per expert (the grid above
 * read the 2048 x 4096 fp32 rows of a Mixtral prefill 8 times: 29.6 us
 * per layer, L2-bound; 8 tokens per block took 23.8 us, H200).  Each (token, expert) sum runs exactly as in
 * kernel_route_logits<true> (the same threads over the same k, the same
 * warp and block reductions): the same bits.  D % 4 == 0, 16-byte
 * aligned rows.
 */
#define ROUTE_ALL_MIN_T 256         /* tokens from which it runs */

template <int EM>
__global__ void __launch_bounds__(ROUTE_THREADS)
kernel_route_logits_all(const float *xf, int T, int D, const float *router,
    int E, float *logits)
{
    moe_pdl_enter();
    constexpr int    RT = 32 / EM;
    __shared__ float red[ROUTE_THREADS / 32][RT * EM];
    int              t0 = blockIdx.x * RT;
    int              nt = T - t0 < RT ? T - t0 : RT;
    int              lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const float4    *w4 = reinterpret_cast<const float4 *>(router);
    const float4    *x4 = reinterpret_cast<const float4 *>(xf
                                                         + (size_t) t0 * D);
    int              D4 = D >> 2;
    float            acc[RT][EM];

#pragma unroll
    for (int j = 0; j < RT; j++) {
#pragma unroll
        for (int e = 0; e < EM; e++) {
            acc[j][e] = 0.0f;
        }
    }
    for (int i = threadIdx.x; i < D4; i += ROUTE_THREADS) {
        float4 xv[RT];

#pragma unroll
        for (int j = 0; j < RT; j++) {
            xv[j] = j < nt ? x4[(size_t) j * D4 + i]
                           : make_float4(0.0f, 0.0f, 0.0f, 0.0f);
        }
#pragma unroll
        for (int e = 0; e < EM; e++) {
            if (e < E) {
                float4 wv = __ldg(w4 + (size_t) e * D4 + i);

#pragma unroll
                for (int j = 0; j < RT; j++) {
                    acc[j][e] = moe_route_dot4(acc[j][e], wv, xv[j]);
                }
            }
        }
    }
#pragma unroll
    for (int j = 0; j < RT; j++) {
#pragma unroll
        for (int e = 0; e < EM; e++) {
            float v = moe_warp_sum(acc[j][e]);

            if (lane == 0) {
                red[warp][j * EM + e] = v;
            }
        }
    }
    __syncthreads();
    for (int q = threadIdx.x; q < RT * EM; q += ROUTE_THREADS) {
        int   j = q / EM, e = q % EM;
        float sum = 0.0f;

        if (j < nt && e < E) {
            for (int wi = 0; wi < ROUTE_THREADS / 32; wi++) {
                sum += red[wi][q];
            }
            logits[(size_t) (t0 + j) * E + e] = sum;
        }
    }
}


__global__ void __launch_bounds__(TOPK_WARPS * 32)
kernel_route_topk(const float *logits, int T, int E, int K, int renorm,
    int32_t *sel, float *selw, float *margin)
{
    moe_pdl_enter();
    __shared__ float lgs[TOPK_WARPS][ROUTE_MAX_E];
    int              lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    int              t = blockIdx.x * TOPK_WARPS + warp;

    if (t >= T) {
        return;                 /* uniform over the warp; no block barrier */
    }
    moe_route_topk_warp(logits, t, E, K, renorm, sel, selw, margin,
                        lgs[warp], lane);
}


extern "C" int
moe_cuda_route_logits(const float *xf, int T, int D, const float *router,
    int E, int K, float *logits, cudaStream_t stream)
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
    if (T >= ROUTE_ALL_MIN_T && E <= 16 && D % 4 == 0
        && ((uintptr_t) xf & 15) == 0 && ((uintptr_t) router & 15) == 0)
    {
        if (E <= 8) {
            MOE_CUDA_CHECK(moe_launch(kernel_route_logits_all<8>,
                (T + 3) / 4, ROUTE_THREADS, 0, stream, xf, T, D, router, E,
                logits));
        } else {
            MOE_CUDA_CHECK(moe_launch(kernel_route_logits_all<16>,
                (T + 1) / 2, ROUTE_THREADS, 0, stream, xf, T, D, router, E,
                logits));
        }
    } else if (D % 4 == 0
        && ((uintptr_t) xf & 15) == 0 && ((uintptr_t) router & 15) == 0)
    {
        MOE_CUDA_CHECK(moe_launch(kernel_route_logits<true>, grid,
            ROUTE_THREADS, 0, stream, xf, T, D, router, E, logits));
    } else {
        MOE_CUDA_CHECK(moe_launch(kernel_route_logits<false>, grid,
            ROUTE_THREADS, 0, stream, xf, T, D, router, E, logits));
    }
    return MOE_K_OK;
}


extern "C" int
moe_cuda_route(const float *xf, int T, int D, const float *router, int E,
    int K, int renorm, float *logits, int32_t *sel, float *selw, float *margin,
    cudaStream_t stream)
{
    MOE_TRY(moe_cuda_route_logits(xf, T, D, router, E, K, logits, stream));
    if (T <= 0) {
        return MOE_K_OK;
    }
    MOE_CUDA_CHECK(moe_launch(kernel_route_topk,
        (T + TOPK_WARPS - 1) / TOPK_WARPS, TOPK_WARPS * 32, 0, stream, logits,
        T, E, K, renorm, sel, selw, margin));
    return MOE_K_OK;
}
