/*
 * Device helpers shared by the 4-bit GEMV kernels (quant_gemv.cu,
 * q4_tiled.cu, q4_group.cu): the rows of a block's expert group, the
 * exact bf16 integer arithmetic that turns nibbles into (q - z), the
 * fp16 scales as fp32, and the K-split kernels' sums over a block's
 * warps and a cluster's ranks.
 */
#ifndef MOE_KERNELS_QUANT_COMMON_CUH
#define MOE_KERNELS_QUANT_COMMON_CUH

#include <cooperative_groups.h>
#include <cuda_fp16.h>
#include <stdint.h>

#include "common.cuh"

/* Rows [r0, r1) of this block's group (r0 = r1 when it has none). */
__device__ __forceinline__ int
q_group_rows(const int32_t *offs, int E, int n, int *r0, int *r1)
{
    int e = moe_block_group(offs, E, (int) threadIdx.x & 31);

    if (e < 0 || e >= E) {
        *r0 = *r1 = 0;
        return -1;
    }
    *r0 = offs != NULL ? offs[e] : 0;
    *r1 = offs != NULL ? offs[e + 1] : n;
    return e;
}


/* bf16x2 (128 + nibble at bit s, 128 + nibble at bit s + 16) of w */
__device__ __forceinline__ uint32_t
q4m_nib2(uint32_t w, int s)
{
    return ((w >> s) & 0x000f000fu) | 0x43004300u;
}


/* q4m_nib2 in one LOP3 ((w >> s) & 0x000f000f | 0x43004300): written
 * as a 3-input lop3 so that the compiler does not split the two
 * immediates into an AND and an OR (it does: 2 LOP3 a pair). */
__device__ __forceinline__ uint32_t
q4m_nib2l(uint32_t w, int s)
{
    uint32_t d;

    asm("lop3.b32 %0, %1, %2, %3, 0xea;\n"
        : "=r"(d) : "r"(w >> s), "r"(0x000f000fu), "r"(0x43004300u));
    return d;
}


/* bf16x2 (128 + z, 128 + z) */
__device__ __forceinline__ uint32_t
q4m_zz(uint32_t z)
{
    return 0x43004300u + z * 0x00010001u;
}


/* a - b, bf16x2, exact for the small integers here */
__device__ __forceinline__ uint32_t
q4m_sub(uint32_t a, uint32_t b)
{
    uint32_t d;

    asm("sub.rn.bf16x2 %0, %1, %2;\n" : "=r"(d) : "r"(a), "r"(b));
    return d;
}

/* A block's warps' partial sums: red[w][f][l] over w < NW added into
 * red[0][f][l], for the first n (f, l) entries, by the block's NW * 32
 * threads.  Between two barriers: after the warps wrote red, before
 * anything reads red[0]. */
template <int NW, int F>
__device__ __forceinline__ void
q_warps_sum(float (&red)[NW][F][32], int n)
{
    for (int idx = (int) threadIdx.x; idx < n; idx += NW * 32) {
        float v = 0.0f;

        for (int w = 0; w < NW; w++) {
            v += red[w][idx / 32][idx % 32];
        }
        red[0][idx / 32][idx % 32] = v;
    }
}


/* Entry `off` of the shared array `base` summed over the cluster's S
 * ranks in rank order (every rank adds an entry in the same order, so
 * the K-split sum does not depend on which rank writes it); TWO: entry
 * off2 the same way, into *u (a fused gate|up's up half). */
template <bool TWO>
__device__ __forceinline__ float
q_ranks_sum(cooperative_groups::cluster_group &cl, float *base, int off,
    int off2, int S, float *u)
{
    float v = 0.0f, w = 0.0f;

    for (int rk = 0; rk < S; rk++) {
        const float *rs = cl.map_shared_rank(base, rk);

        v += rs[off];
        if (TWO) {
            w += rs[off2];
        }
    }
    if (TWO) {
        *u = w;
    }
    return v;
}


/* Host side of the 4-bit launchers: the expert groups a grid covers
 * (compact when n < E). */
static inline int
q_groups(const int32_t *offs, int E, int n)
{
    return offs != NULL && n < E ? n : E;
}


/* Blocks per cluster (K splits) of a grid of `blocks`: the smallest power
 * of two up to smax that fills half the resident block slots (bps a SM),
 * while each of a block's K ranges keeps at least `per` groups (per: the
 * split units a rank has times their minimum groups) of the KG. */
static inline int
q_cluster_split(int64_t blocks, int KG, int per, int bps, int smax)
{
    int64_t want = ((int64_t) moe_sm_count() * bps + 1) / 2;
    int     S = 1;

    while (S < smax && blocks * S < want && 2 * S * per <= KG) {
        S *= 2;
    }
    return S;
}


/* The arguments the GPTQ-layout launchers by group (q4_group.cu,
 * q4_wgmma.cu) share beyond their shapes: ldx % 8, E > 0 (offs NULL:
 * E 1), an output (Y or H), X and qweight 16-byte, scales 8-byte, qzeros
 * 4-byte aligned. */
static inline int
q_gptq_args_ok(const void *X, int ldx, const void *qweight,
    const void *qzeros, const void *scales, const int32_t *offs, int E,
    const void *Y, const void *H)
{
    return ldx % 8 == 0 && E > 0 && (offs != NULL || E == 1)
           && (H != NULL || Y != NULL) && ((uintptr_t) X & 15u) == 0
           && ((uintptr_t) qweight & 15u) == 0
           && ((uintptr_t) scales & 7u) == 0
           && ((uintptr_t) qzeros & 3u) == 0;
}


/* Whether the warpgroup 4-bit GEMM's two-warpgroup shape (q4_wgmma.cu
 * shape 8: 32 rows, 128-k chunks, 256 columns a block, or 128 + 128
 * with SiLU fused) takes a shape moe_cuda_q4w_supported takes: G % 128
 * (128-k chunks) and N % 256 (fused: F % 128). */
static inline int
q4w_pair_ok(int G, int Ntot, int silu)
{
    return G % 128 == 0 && (silu ? (Ntot / 2) % 128 : Ntot % 256) == 0;
}


/* A launch of grid (tiles, groups, S) with the S blocks along z one
 * thread-block cluster (at: room for two attributes: the cluster, and PDL
 * when moe_cuda_pdl_get()). */
static inline void
q_cluster_cfg(cudaLaunchConfig_t *cfg, cudaLaunchAttribute *at, int tiles,
    int ng, int S, int threads, size_t smem, cudaStream_t stream)
{
    cfg->gridDim = dim3((unsigned) tiles, (unsigned) ng, (unsigned) S);
    cfg->blockDim = dim3((unsigned) threads);
    cfg->dynamicSmemBytes = smem;
    cfg->stream = stream;
    at[0].id = cudaLaunchAttributeClusterDimension;
    at[0].val.clusterDim.x = 1;
    at[0].val.clusterDim.y = 1;
    at[0].val.clusterDim.z = (unsigned) S;
    cfg->attrs = at;
    cfg->numAttrs = 1;
    if (moe_cuda_pdl_get()) {
        at[1].id = cudaLaunchAttributeProgrammaticStreamSerialization;
        at[1].val.programmaticStreamSerializationAllowed = 1;
        cfg->numAttrs = 2;
    }
}


/* the fp16 in the low (hi 0) or high (hi 1) half of v, as fp32 (an
 * fp16x2 word of 4-bit scales) */
__device__ __forceinline__ float
q4m_h2f(uint32_t v, int hi)
{
    return __half2float(__ushort_as_half(
        (unsigned short) (hi ? v >> 16 : v & 0xffffu)));
}

#endif
