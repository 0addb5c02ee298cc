/*
 * Permutation by expert, deterministic and stable: one block per expert
 * scans all slots (a block-wide prefix sum over each 256-slot window keeps
 * the slots in ascending order).  O(E * T * K) reads: small next to the
 * expert GEMMs.
 */
#include "common.cuh"
#include "moe_permute.cuh"
#include "moe_permute.h"
#include "moe_route.cuh"
#include "moe_route.h"

#define PERM_THREADS 256


__global__ void
kernel_moe_count(const int32_t *sel, int n, int32_t *counts)
{
    moe_pdl_enter();
    __shared__ float sh[32];
    int              e = blockIdx.x;
    float            c = 0.0f;
    int              ci = 0;

    for (int i = threadIdx.x; i < n; i += blockDim.x) {
        ci += sel[i] == e;
    }
    c = (float) ci;            /* exact: n < 2^24 */
    c = moe_block_sum(c, sh);
    if (threadIdx.x == 0) {
        counts[e] = (int32_t) c;
    }
}


__global__ void
kernel_moe_scatter(const int32_t *sel, int n, const int32_t *counts,
    int32_t *erow, int32_t *slot_of)
{
    moe_pdl_enter();
    __shared__ int wsum[PERM_THREADS / 32];
    __shared__ int base_s;
    int            e = blockIdx.x;
    int            lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    int            base;

    if (threadIdx.x == 0) {
        int off = 0;

        for (int j = 0; j < e; j++) {
            off += counts[j];
        }
        base_s = off;
    }
    __syncthreads();
    base = base_s;

    for (int i0 = 0; i0 < n; i0 += PERM_THREADS) {
        int      i = i0 + threadIdx.x;
        int      flag = i < n && sel[i] == e;
        unsigned bal = __ballot_sync(0xffffffffu, flag);
        int      before = __popc(bal & ((1u << lane) - 1u));
        int      wpre = 0, total = 0;

        if (lane == 0) {
            wsum[warp] = __popc(bal);
        }
        __syncthreads();
        for (int w = 0; w < PERM_THREADS / 32; w++) {
            wpre += w < warp ? wsum[w] : 0;
            total += wsum[w];
        }
        if (flag) {
            int r = base + wpre + before;

            erow[r] = i;
            slot_of[i] = r;
        }
        base += total;
        __syncthreads();        /* wsum is rewritten next window */
    }
}


/*
 * One block of PERM_ONE threads: counts by shared atomics, a prefix over
 * the experts, then windows of PERM_ONE slots in order: a slot's row is
 * its expert's base + the same expert's slots in earlier warps of the
 * window (per-warp counts in shared memory) + its rank among its warp's
 * lanes with that expert (__match_any_sync).
 */
#define PERM_ONE    1024
#define PERM_MAX_E  256

/* The body of kernel_moe_permute for a block of PERM_ONE threads (cnt,
 * base: PERM_MAX_E ints, wcnt: PERM_ONE / 32 x PERM_MAX_E, all shared). */
__device__ __forceinline__ void
moe_permute_block(const int32_t *sel, int n, int E, int32_t *offs,
    int32_t *erow, int32_t *slot_of, unsigned long long *tot, int *cnt,
    int *base, int (*wcnt)[PERM_MAX_E])
{
    int            lane = threadIdx.x & 31, warp = threadIdx.x >> 5;

    for (int e = threadIdx.x; e < E; e += blockDim.x) {
        cnt[e] = 0;
    }
    __syncthreads();
    for (int i = threadIdx.x; i < n; i += blockDim.x) {
        atomicAdd(&cnt[sel[i]], 1);
    }
    __syncthreads();
    if (threadIdx.x == 0) {
        int o = 0;

        for (int e = 0; e < E; e++) {
            base[e] = o;
            offs[e] = o;
            o += cnt[e];
        }
        offs[E] = o;
    }
    if (tot != NULL) {
        for (int e = threadIdx.x; e < E; e += blockDim.x) {
            tot[e] += (unsigned long long) cnt[e];
        }
    }
    for (int i0 = 0; i0 < n; i0 += PERM_ONE) {
        int      i = i0 + threadIdx.x;
        int      e = i < n ? sel[i] : -1;
        unsigned peers = __match_any_sync(0xffffffffu, e);
        int      rank = __popc(peers & ((1u << lane) - 1u));

        for (int k = threadIdx.x; k < (PERM_ONE / 32) * E; k += PERM_ONE) {
            wcnt[k / E][k % E] = 0;
        }
        __syncthreads();        /* base written, wcnt cleared */
        if (e >= 0 && rank == 0) {
            wcnt[warp][e] = __popc(peers);
        }
        __syncthreads();
        if (e >= 0) {
            int r = base[e] + rank;

            for (int w = 0; w < warp; w++) {
                r += wcnt[w][e];
            }
            erow[r] = i;
            slot_of[i] = r;
        }
        __syncthreads();        /* all reads of base done */
        for (int x = threadIdx.x; x < E; x += PERM_ONE) {
            int s = 0;

            for (int w = 0; w < PERM_ONE / 32; w++) {
                s += wcnt[w][x];
            }
            base[x] += s;
        }
        __syncthreads();        /* wcnt read, base updated */
    }
}


__global__ void __launch_bounds__(PERM_ONE)
kernel_moe_permute(const int32_t *sel, int n, int E, int32_t *offs,
    int32_t *erow, int32_t *slot_of, unsigned long long *tot)
{
    moe_pdl_enter();
    __shared__ int cnt[PERM_MAX_E];
    __shared__ int base[PERM_MAX_E];
    __shared__ int wcnt[PERM_ONE / 32][PERM_MAX_E];

    moe_permute_block(sel, n, E, offs, erow, slot_of, tot, cnt, base, wcnt);
}


/*
 * The router's top-k (moe_route.cuh, one warp per token) and the
 * permutation in one launch for steps of up to PERM_ONE / 32 tokens:
 * one launch fewer per routed layer at decode.  The warps' logits and
 * the permutation's per-warp counts share one shared buffer (used one
 * after the other).
 */
__global__ void __launch_bounds__(PERM_ONE)
kernel_route_topk_permute(const float *logits, int T, int E, int K,
    int renorm, int32_t *sel, float *selw, float *margin, int32_t *offs,
    int32_t *erow, int32_t *slot_of, unsigned long long *tot)
{
    moe_pdl_enter();
    __shared__ int   cnt[PERM_MAX_E];
    __shared__ int   base[PERM_MAX_E];
    __shared__ union {
        float lg[PERM_ONE / 32][ROUTE_MAX_E];
        int   wcnt[PERM_ONE / 32][PERM_MAX_E];
    } u;
    int              lane = threadIdx.x & 31, warp = threadIdx.x >> 5;

    if (warp < T) {
        moe_route_topk_warp(logits, warp, E, K, renorm, sel, selw, margin,
                            u.lg[warp], lane);
    }
    __syncthreads();            /* sel written (global, this block) and
                                 * u.lg read before it becomes wcnt */
    moe_permute_block(sel, T * K, E, offs, erow, slot_of, tot, cnt, base,
                      u.wcnt);
}


__global__ void
kernel_moe_gather(const __nv_bfloat16 *xb, int D, const int32_t *erow, int K,
    __nv_bfloat16 *xe)
{
    moe_pdl_enter();
    int                  r = blockIdx.x;
    const __nv_bfloat16 *src = xb + (size_t) (erow[r] / K) * D;
    __nv_bfloat16       *dst = xe + (size_t) r * D;

    if ((D & 7) == 0) {
        const uint4 *s4 = reinterpret_cast<const uint4 *>(src);
        uint4       *d4 = reinterpret_cast<uint4 *>(dst);

        for (int d = threadIdx.x; d < D / 8; d += blockDim.x) {
            d4[d] = s4[d];
        }
    } else {
        for (int d = threadIdx.x; d < D; d += blockDim.x) {
            dst[d] = src[d];
        }
    }
}


__global__ void
kernel_moe_unpermute(const float *ye, int D, const int32_t *sel,
    const float *selw, const int32_t *slot_of, int K, float *out)
{
    moe_pdl_enter();
    __shared__ int   ord_row[MOE_UNPERM_MAX_K];
    __shared__ float ord_w[MOE_UNPERM_MAX_K];
    int              t = blockIdx.x;

    /* K threads rank the slots at once (v2 ran a selection sort on one
     * thread, ~K^2 dependent global loads) */
    moe_unperm_order(sel, selw, slot_of, t, K, ord_row, ord_w);
    __syncthreads();
    for (int d = threadIdx.x; d < D; d += blockDim.x) {
        float acc = 0.0f;

        for (int o = 0; o < K; o++) {
            acc += ye[(size_t) ord_row[o] * D + d] * ord_w[o];
        }
        out[(size_t) t * D + d] = acc;
    }
}


/* The same over (token, 1024-column slice) blocks with float4 accesses
 * (D % 4 == 0): at decode one token's row is 4+ blocks, and every load is
 * in flight at once. */
#define UNPERM_V_COLS 1024

__global__ void
kernel_moe_unpermute_v(const float *__restrict__ ye, int D,
    const int32_t *sel, const float *selw, const int32_t *slot_of, int K,
    float *__restrict__ out)
{
    moe_pdl_enter();
    __shared__ int   ord_row[MOE_UNPERM_MAX_K];
    __shared__ float ord_w[MOE_UNPERM_MAX_K];
    int              t = blockIdx.x;
    int              d = blockIdx.y * UNPERM_V_COLS + 4 * threadIdx.x;

    moe_unperm_order(sel, selw, slot_of, t, K, ord_row, ord_w);
    __syncthreads();
    if (d < D) {
        *reinterpret_cast<float4 *>(out + (size_t) t * D + d) =
            moe_unperm_sum4(ye, D, ord_row, ord_w, K, d / 4);
    }
}


extern "C" int
moe_cuda_moe_count(const int32_t *sel, int n, int E, int32_t *counts,
    cudaStream_t stream)
{
    if (E <= 0) {
        return MOE_K_OK;
    }
    MOE_CUDA_CHECK(moe_launch(kernel_moe_count, E, PERM_THREADS, 0, stream,
        sel, n, counts));
    return MOE_K_OK;
}


extern "C" int
moe_cuda_moe_scatter(const int32_t *sel, int n, int E, const int32_t *counts,
    int32_t *erow, int32_t *slot_of, cudaStream_t stream)
{
    if (E <= 0 || n <= 0) {
        return MOE_K_OK;
    }
    MOE_CUDA_CHECK(moe_launch(kernel_moe_scatter, E, PERM_THREADS, 0, stream,
        sel, n, counts, erow, slot_of));
    return MOE_K_OK;
}


extern "C" int
moe_cuda_moe_permute(const int32_t *sel, int n, int E, int32_t *offs,
    int32_t *erow, int32_t *slot_of, int64_t *tot, cudaStream_t stream)
{
    if (E <= 0 || E > PERM_MAX_E) {
        moe_cuda_set_error("permute: %d experts not supported", E);
        return MOE_K_EUNSUPPORTED;
    }
    MOE_CUDA_CHECK(moe_launch(kernel_moe_permute, 1, PERM_ONE, 0, stream, sel,
        n, E, offs, erow, slot_of,
        reinterpret_cast<unsigned long long *>(tot)));
    return MOE_K_OK;
}


extern "C" int
moe_cuda_moe_gather(const moe_bf16_t *xb, int D, const int32_t *erow, int K,
    int n, moe_bf16_t *xe, cudaStream_t stream)
{
    if (n <= 0) {
        return MOE_K_OK;
    }
    MOE_CUDA_CHECK(moe_launch(kernel_moe_gather, n, 128, 0, stream,
        reinterpret_cast<const __nv_bfloat16 *>(xb), D, erow, K,
        reinterpret_cast<__nv_bfloat16 *>(xe)));
    return MOE_K_OK;
}


extern "C" int
moe_cuda_moe_unpermute(const float *ye, int D, const int32_t *sel,
    const float *selw, const int32_t *slot_of, int T, int K, float *out,
    cudaStream_t stream)
{
    if (K < 1 || K > MOE_UNPERM_MAX_K) {
        moe_cuda_set_error("unpermute: top-%d not supported", K);
        return MOE_K_EUNSUPPORTED;
    }
    if (T <= 0) {
        return MOE_K_OK;
    }
    if (D % 4 == 0 && ((uintptr_t) ye | (uintptr_t) out) % 16 == 0) {
        MOE_CUDA_CHECK(moe_launch(kernel_moe_unpermute_v,
            dim3((unsigned) T,
                 (unsigned) ((D + UNPERM_V_COLS - 1) / UNPERM_V_COLS)),
            UNPERM_V_COLS / 4, 0, stream, ye, D, sel, selw, slot_of, K, out));
        return MOE_K_OK;
    }
    MOE_CUDA_CHECK(moe_launch(kernel_moe_unpermute, T, 256, 0, stream, ye, D,
        sel, selw, slot_of, K, out));
    return MOE_K_OK;
}


extern "C" int
moe_cuda_route_permute(const float *xf, int T, int D, const float *router,
    int E, int K, int renorm, float *logits, int32_t *sel, float *selw,
    float *margin, int32_t *offs, int32_t *erow, int32_t *slot_of,
    int64_t *tot, cudaStream_t stream)
{
    if (T <= 0 || T > PERM_ONE / 32 || E > PERM_MAX_E) {
        MOE_TRY(moe_cuda_route(xf, T, D, router, E, K, renorm, logits, sel,
                               selw, margin, stream));
        return T <= 0 ? MOE_K_OK
                      : moe_cuda_moe_permute(sel, T * K, E, offs, erow,
                                             slot_of, tot, stream);
    }
    MOE_TRY(moe_cuda_route_logits(xf, T, D, router, E, K, logits, stream));
    MOE_CUDA_CHECK(moe_launch(kernel_route_topk_permute, 1, PERM_ONE, 0,
        stream, logits, T, E, K, renorm, sel, selw, margin, offs, erow,
        slot_of, reinterpret_cast<unsigned long long *>(tot)));
    return MOE_K_OK;
}
