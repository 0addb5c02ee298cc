/*
 * Decode's FFN norm and router for one token in one launch (norm_route.h).
 *
 * At batch 1 the chain add + norm -> router logits -> top-k + permutation
 * was three dependent launches of one token's work each (2.3 + 2.8 + 5.2
 * us a layer on an H100, PDL off, run 21b).  Here one block of
 * MOE_RMS_THREADS threads runs it all:
 *   1. before the PDL wait, the router rows (weights, never written by the
 *      kernels before) go into registers (E <= 8, D <= 4096: two experts'
 *      four float4 a thread) or, for other shapes, are asked into L2;
 *   2. moe_rms_row (rmsnorm.cuh, the row kernels' code): x += delta, out,
 *      and the fp32 row into shared memory (then out_f32);
 *   3. the logits: four groups of 256 threads, expert e on group e % 4,
 *      thread i of a group summing float4 i, i + 256, .. of the row with
 *      moe_route_dot4, then the warp sums and the group's 8 warp sums in
 *      order: kernel_route_logits<true>'s order for one token (256
 *      threads a block, the same sums), so the same bits;
 *   4. warp 0: moe_route_topk_warp (the same code as the top-k launches)
 *      on the logits in shared memory, its choices also into shared
 *      memory, then the permutation of its K slots (K <= 32: one slot a
 *      lane, ranks by a scan over the K choices, no barrier), the values
 *      moe_permute_block writes for one token.
 * Two builds of the kernel: router rows in registers where they fit (64
 * registers a thread, a whole SM's register file), and the lean one
 * (router via L2, at most 32 registers, so it is resident beside the
 * blocks of the kernel before it); the launcher's `lean` picks (tuning
 * route_fuse1 1 / 2).
 */
#include "common.cuh"
#include "moe_route.cuh"
#include "norm_route.h"
#include "rmsnorm.cuh"

#define NR_GROUP    256                         /* threads a logits group */
#define NR_GROUPS   (MOE_RMS_THREADS / NR_GROUP)
#define NR_MAX_D    8192                        /* the row in shared memory */
#define NR_MAX_K    32
#define NR_PRE_E    8                           /* router rows in registers */
#define NR_PRE_D4   (4 * NR_GROUP)


/* MINB 1: router rows in registers where they fit (PRE), up to 64
 * registers a thread; MINB 2 (the lean variant, PRE false): at most 32, so
 * the block fits beside the blocks of the GEMV before it and is resident
 * early, the router rows only asked into L2 before the wait. */
template <int NV, bool PRE, int MINB>
__global__ void __launch_bounds__(MOE_RMS_THREADS, MINB)
kernel_norm_route1(float *__restrict__ x, const float *__restrict__ delta,
    int D, const float *__restrict__ w, float eps,
    __nv_bfloat16 *__restrict__ out, float *__restrict__ out_f32,
    const float *__restrict__ router, int E, int K, int renorm,
    float *logits, int32_t *sel, float *selw, float *margin, int32_t *offs,
    int32_t *erow, int32_t *slot_of, unsigned long long *tot)
{
    const moe_rms_row_delta         dl = {
        reinterpret_cast<const float4 *>(delta) };
    __shared__ __align__(16) float4 xs4[NR_MAX_D / 4];
    __shared__ float                sh[32];
    __shared__ float                red[MOE_RMS_THREADS / 32]
                                       [ROUTE_MAX_E / NR_GROUPS];
    __shared__ float                lg_s[ROUTE_MAX_E];
    __shared__ float                lgw[ROUTE_MAX_E];
    __shared__ int                  ssel[NR_MAX_K];
    const int                       D4 = D >> 2;
    const int                       lane = threadIdx.x & 31;
    const int                       warp = threadIdx.x >> 5;
    const int                       grp = threadIdx.x / NR_GROUP;
    const int                       gt = threadIdx.x % NR_GROUP;
    const float4                   *r4 = reinterpret_cast<const float4 *>(
                                             router);
    float4                          wr[PRE ? 2 : 1][PRE ? 4 : 1];

    /* 1. the router rows, before the wait */
    if constexpr (PRE) {
#pragma unroll
        for (int a = 0; a < 2; a++) {
#pragma unroll
            for (int n = 0; n < 4; n++) {
                int e = grp + NR_GROUPS * a, i = gt + NR_GROUP * n;

                wr[a][n] = e < E && i < D4
                           ? __ldg(r4 + (size_t) e * D4 + i)
                           : make_float4(0.0f, 0.0f, 0.0f, 0.0f);
            }
        }
    } else {
        int lines = (int) (((size_t) E * D * sizeof(float) + 127) / 128);

        for (int l = threadIdx.x; l < lines; l += MOE_RMS_THREADS) {
            moe_prefetch_l2(reinterpret_cast<const char *>(router)
                            + (size_t) l * 128);
        }
    }
    moe_pdl_enter();

    /* 2. the norm: the fp32 row into shared memory */
    moe_rms_row<NV>(x, dl, D, w, eps, out, reinterpret_cast<float *>(xs4),
                    sh);
    __syncthreads();
    if (out_f32 != NULL) {
        for (int d = threadIdx.x; d < D4; d += MOE_RMS_THREADS) {
            reinterpret_cast<float4 *>(out_f32)[d] = xs4[d];
        }
    }

    /* 3. the logits (uniform trip counts: every warp reaches the shuffles) */
    for (int a = 0; NR_GROUPS * a < E; a++) {
        int   e = grp + NR_GROUPS * a;
        float acc = 0.0f;

        if constexpr (PRE) {
            if (a < 2) {
#pragma unroll
                for (int n = 0; n < 4; n++) {
                    int i = gt + NR_GROUP * n;

                    if (e < E && i < D4) {
                        acc = moe_route_dot4(acc, a == 0 ? wr[0][n]
                                                         : wr[1][n],
                                             xs4[i]);
                    }
                }
            }
        } else {
            if (e < E) {
#pragma unroll 2
                for (int i = gt; i < D4; i += NR_GROUP) {
                    acc = moe_route_dot4(acc, __ldg(r4 + (size_t) e * D4
                                                    + i), xs4[i]);
                }
            }
        }
        acc = moe_warp_sum(acc);
        if (lane == 0) {
            red[warp][a] = acc;
        }
    }
    __syncthreads();
    if ((int) threadIdx.x < E) {
        int   e = threadIdx.x, g = e % NR_GROUPS, a = e / NR_GROUPS;
        float s = 0.0f;

        for (int wi = 0; wi < NR_GROUP / 32; wi++) {
            s += red[g * (NR_GROUP / 32) + wi][a];
        }
        lg_s[e] = s;
        if (logits != NULL) {
            logits[e] = s;
        }
    }
    __syncthreads();
    if (warp != 0) {
        return;
    }

    /* 4. top-k and the permutation of the K slots */
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


extern "C" int
moe_cuda_norm_route1_ok(int D, int E, int K)
{
    return D > 0 && D % 4 == 0 && D <= NR_MAX_D && E >= 1
           && E <= ROUTE_MAX_E && K >= 1 && K <= E && K <= NR_MAX_K
           && moe_rms_nv(D) > 0;
}


extern "C" int
moe_cuda_norm_route1(float *x, const float *delta, int D, const float *w,
    float eps, moe_bf16_t *out, float *out_f32, const float *router, int E,
    int K, int renorm, float *logits, int32_t *sel, float *selw,
    float *margin, int32_t *offs, int32_t *erow, int32_t *slot_of,
    int64_t *tot, int lean, cudaStream_t stream)
{
    __nv_bfloat16 *o = reinterpret_cast<__nv_bfloat16 *>(out);
    int            nv = moe_rms_nv(D);
    bool           pre = !lean && E <= NR_PRE_E && D / 4 <= NR_PRE_D4;

    if (!moe_cuda_norm_route1_ok(D, E, K) || delta == NULL
        || ((uintptr_t) x | (uintptr_t) delta | (uintptr_t) w
            | (uintptr_t) out_f32 | (uintptr_t) router) % 16 != 0
        || (uintptr_t) out % 8 != 0)
    {
        moe_cuda_set_error("norm_route1: D %d, %d experts, top-%d or the "
                           "alignment not supported", D, E, K);
        return MOE_K_EUNSUPPORTED;
    }
    unsigned long long *t = reinterpret_cast<unsigned long long *>(tot);

    /* D <= NR_MAX_D: one or two float4 a thread (moe_rms_nv) */
#define NR_LAUNCH(NV, PRE, MINB)                                              \
    moe_launch(kernel_norm_route1<NV, PRE, MINB>, 1, MOE_RMS_THREADS, 0,      \
               stream, x, delta, D, w, eps, o, out_f32, router, E, K, renorm, \
               logits, sel, selw, margin, offs, erow, slot_of, t)
    MOE_CUDA_CHECK(lean ? (nv == 1 ? NR_LAUNCH(1, false, 2)
                                   : NR_LAUNCH(2, false, 2))
                   : nv == 1 ? (pre ? NR_LAUNCH(1, true, 1)
                                    : NR_LAUNCH(1, false, 1))
                   : NR_LAUNCH(2, false, 1));
#undef NR_LAUNCH
    return MOE_K_OK;
}
