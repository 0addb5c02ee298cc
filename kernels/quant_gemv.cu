/*
 * Quantized-weight GEMVs and dequantization (contracts: quant_gemv.h).
 *
 * kernel_qgemv_fp8: one warp per output feature j of one group; the
 * lanes stream the e4m3 row W_e[j, :] in 16-byte loads (QF_U of them in
 * flight per lane), convert pairs with the hardware cvt (e4m3x2 ->
 * f16x2, exact) and form fp32 dot products with the group's rows (4 per
 * pass, read from L1/L2: they are small and shared by every warp).
 * Block scales multiply each 16-value chunk's dot (a chunk never crosses
 * a 128-column block); tensor / channel scales multiply the sum.
 *
 * kernel_qgemv_q4_mma (below, with its own notes): the 4-bit GEMV on
 * tensor cores, taken whenever there is no g_idx and the group size is a
 * multiple of a round (the checkpoints' case); deterministic.
 *
 * kernel_qgemv_q4_fma (below, with its own notes): the 4-bit GEMV on
 * CUDA cores for groups of 1-2 rows per pass (decode), taken before the
 * tensor-core one when the rows hint is <= Q4S_MAXR and G % 32 == 0;
 * weights streamed through per-thread cp.async rings, deterministic.
 *
 * kernel_qgemv_q4 (the fallback: GPTQ with g_idx, odd group sizes): AWQ
 * packs 8 output columns per int32 along N, GPTQ 8
 * k per int32 along K; both keep consecutive words along N, so a thread
 * owns one word column (AWQ: 8 columns; GPTQ: 1 column, 8 k per word) and
 * walks k: every warp load is 128 contiguous bytes.  A block is QN
 * threads x a k range [k0, k1) (grid.z splits K so that small groups
 * still fill the machine), the group's input rows for that range staged
 * in shared memory as fp32 (and GPTQ's g_idx for the range, read once
 * per block), scales and zeros reloaded when the group changes, 8 weight
 * words in flight per thread; the partial sums are added into Y with
 * atomics (the launcher zeroes Y first).
 *
 * Dequantize kernels: the same arithmetic, written as bf16 (N, K) rows
 * with 16-byte stores (8 consecutive k of one column per thread).
 */
#include <cooperative_groups.h>
#include <cuda_fp8.h>
#include <cuda_fp16.h>

#include "common.cuh"
#include "ptx.cuh"
#include "quant_gemv.h"
#include "silu_mul.h"

namespace cg = cooperative_groups;

typedef __nv_bfloat16 bf16;

#define QF_WARPS  8         /* fp8 GEMV: output features per block */
#define QF_U      4         /* fp8 GEMV: 16-byte loads in flight per lane */
#define Q_R       4         /* rows per pass (both GEMVs) */
#define Q4_NT     128       /* q4 GEMV: threads (word columns) per block */
#define Q4_KC_MAX 1024      /* q4 GEMV: most k per block (shared memory) */
#define Q4_U      8         /* q4 GEMV: weight words in flight */

/* Nibble position of AWQ column c (0..7) inside its word. */
__device__ __constant__ int q4_awq_pos[8] = { 0, 4, 1, 5, 2, 6, 3, 7 };


/* Multiprocessors of the current device (132 if it cannot be read). */
static int
q_sms(void)
{
    static int n = 0;

    if (n == 0) {
        int dev = 0, v = 0;

        if (cudaGetDevice(&dev) == cudaSuccess
            && cudaDeviceGetAttribute(&v, cudaDevAttrMultiProcessorCount,
                                      dev) == cudaSuccess && v > 0)
        {
            n = v;
        } else {
            n = 132;
        }
    }
    return n;
}


/* 16 e4m3 values (one uint4) to fp32, exact. */
__device__ __forceinline__ void
q_fp8x16(uint4 q, float (&f)[16])
{
    const uint32_t w[4] = { q.x, q.y, q.z, q.w };

#pragma unroll
    for (int i = 0; i < 4; i++) {
#pragma unroll
        for (int h = 0; h < 2; h++) {
            __half2_raw r = __nv_cvt_fp8x2_to_halfraw2(
                (__nv_fp8x2_storage_t) (w[i] >> (16 * h)), __NV_E4M3);
            float2      v = __half22float2(*reinterpret_cast<__half2 *>(&r));

            f[4 * i + 2 * h] = v.x;
            f[4 * i + 2 * h + 1] = v.y;
        }
    }
}


/* The tensor / channel factor of fp8 row j of group e (1 for blocks). */
__device__ __forceinline__ float
q_fp8_row_scale(const float *scale, int mode, int stacked, int e, int j,
    int rows)
{
    if (mode == MOE_K_FP8_TENSOR) {
        return stacked ? scale[e * 2 + (j >= rows / 2)] : scale[e];
    }
    if (mode == MOE_K_FP8_CHANNEL) {
        return scale[(size_t) e * rows + j];
    }
    return 1.0f;
}


/* The block factor of element (j, k) of group e (1 unless blocks). */
__device__ __forceinline__ float
q_fp8_blk_scale(const float *scale, int mode, int e, int j, int k, int rows,
    int K)
{
    int nbk, nb;

    if (mode != MOE_K_FP8_BLOCK) {
        return 1.0f;
    }
    nbk = (K + 127) / 128;
    nb = (rows + 127) / 128 * nbk;
    return scale[(size_t) e * nb + (j / 128) * nbk + k / 128];
}


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


/* grid (ceil(Ntot / QF_WARPS), groups), QF_WARPS warps */
__global__ void __launch_bounds__(QF_WARPS * 32)
kernel_qgemv_fp8(const bf16 *X, int ldx, const int32_t *xrow, int xdiv,
    const uint8_t *W, const float *scale, int mode, int stacked, int Ntot,
    int K, const int32_t *offs, int E, int n, float *Y, int ldy)
{
    const int lane = (int) threadIdx.x & 31, warp = (int) threadIdx.x >> 5;
    const int j = (int) blockIdx.x * QF_WARPS + warp;
    int       r0, r1;
    const int e = q_group_rows(offs, E, n, &r0, &r1);

    if (e < 0 || j >= Ntot) {
        return;                             /* warp-uniform, no barrier */
    }

    const uint8_t *w = W + ((size_t) e * Ntot + j) * K;
    const float    cs = q_fp8_row_scale(scale, mode, stacked, e, j, Ntot);

    for (int rb = r0; rb < r1; rb += Q_R) {
        const int   nr = min(Q_R, r1 - rb);
        const bf16 *xp[Q_R];
        float       acc[Q_R];

#pragma unroll
        for (int r = 0; r < Q_R; r++) {
            int rr = rb + (r < nr ? r : 0);
            int xr = xrow != NULL ? xrow[rr] / xdiv : rr;

            xp[r] = X + (size_t) xr * ldx;
            acc[r] = 0.0f;
        }
        for (int k0 = lane * 16; k0 < K; k0 += 512 * QF_U) {
            uint4 q[QF_U];

#pragma unroll
            for (int u = 0; u < QF_U; u++) {
                int k = k0 + 512 * u;

                q[u] = k < K ? __ldcs(reinterpret_cast<const uint4 *>(w + k))
                             : make_uint4(0u, 0u, 0u, 0u);
            }
#pragma unroll
            for (int u = 0; u < QF_U; u++) {
                int   k = k0 + 512 * u;
                float wf[16], bs;

                if (k >= K) {
                    break;
                }
                q_fp8x16(q[u], wf);
                bs = q_fp8_blk_scale(scale, mode, e, j, k, Ntot, K);
#pragma unroll
                for (int r = 0; r < Q_R; r++) {
                    if (r < nr) {
                        const uint4 *xv =
                            reinterpret_cast<const uint4 *>(xp[r] + k);
                        uint4        xa = __ldg(xv), xb = __ldg(xv + 1);
                        const bf16  *xs[2] = {
                            reinterpret_cast<const bf16 *>(&xa),
                            reinterpret_cast<const bf16 *>(&xb) };
                        float        d = 0.0f;

#pragma unroll
                        for (int i = 0; i < 16; i++) {
                            d += moe_bf2f(xs[i >> 3][i & 7]) * wf[i];
                        }
                        acc[r] += bs * d;
                    }
                }
            }
        }
#pragma unroll
        for (int r = 0; r < Q_R; r++) {
            float v = moe_warp_sum(acc[r]);

            if (lane == 0 && r < nr) {
                Y[(size_t) (rb + r) * ldy + j] = v * cs;
            }
        }
    }
}


/* Scale and zero of (group g, column col) of expert e, 4-bit formats. */
__device__ __forceinline__ void
q4_sz(int fmt, const int32_t *qzeros, const uint16_t *scales, int e, int KG,
    int g, int col, int Ntot, int zero_bias, float *s, float *z)
{
    size_t   row = (size_t) e * KG + g;
    uint32_t zw = (uint32_t) qzeros[row * (Ntot / 8) + col / 8];
    int      sh = fmt == MOE_K_Q4_AWQ ? q4_awq_pos[col & 7] : (col & 7);

    *s = __half2float(__ushort_as_half(scales[row * Ntot + col]));
    *z = (float) ((int) ((zw >> (4 * sh)) & 15u) + zero_bias);
}


/*
 * grid (ceil(threads / Q4_NT), groups, ceil(K / KC)), Q4_NT threads;
 * threads = Ntot / 8 word columns (AWQ) or Ntot columns (GPTQ).
 */
template <int FMT>
__global__ void __launch_bounds__(Q4_NT)
kernel_qgemv_q4(const bf16 *X, int ldx, const int32_t *xrow, int xdiv,
    const int32_t *qweight, const int32_t *qzeros, const uint16_t *scales,
    const int32_t *g_idx, int G, int zero_bias, int Ntot, int K, int KC,
    const int32_t *offs, int E, int n, float *Y, int ldy)
{
    __shared__ float xs[Q_R][Q4_KC_MAX];
    __shared__ int   gs[Q4_KC_MAX];         /* GPTQ g_idx of [k0, k1) */

    const int tid = (int) threadIdx.x;
    const int nthr = FMT == MOE_K_Q4_AWQ ? Ntot / 8 : Ntot;
    const int c = (int) blockIdx.x * Q4_NT + tid;   /* word column */
    const int k0 = (int) blockIdx.z * KC, k1 = min(K, k0 + KC);
    const int KG = (K + G - 1) / G;
    int       r0, r1;
    const int e = q_group_rows(offs, E, n, &r0, &r1);

    if (e < 0 || k0 >= K) {
        return;                             /* block-uniform */
    }

    const bool valid = c < nthr;

    if (FMT == MOE_K_Q4_GPTQ && g_idx != NULL) {
        /* read once per block; the pass loop's first barrier orders it */
        for (int i = tid; i < k1 - k0; i += Q4_NT) {
            gs[i] = g_idx[(size_t) e * K + k0 + i];
        }
    }
    for (int rb = r0; rb < r1; rb += Q_R) {
        const int nr = min(Q_R, r1 - rb);

        __syncthreads();                    /* last pass's readers done */
        for (int i = tid; i < Q_R * (k1 - k0); i += Q4_NT) {
            int r = i / (k1 - k0), k = i % (k1 - k0);
            int xr;

            if (r < nr) {
                xr = xrow != NULL ? xrow[rb + r] / xdiv : rb + r;
                xs[r][k] = moe_bf2f(X[(size_t) xr * ldx + k0 + k]);
            } else {
                xs[r][k] = 0.0f;
            }
        }
        __syncthreads();
        if (!valid) {
            continue;
        }

        if (FMT == MOE_K_Q4_AWQ) {
            const int Nw = Ntot / 8;
            float     acc[Q_R][8];

#pragma unroll
            for (int r = 0; r < Q_R; r++) {
#pragma unroll
                for (int i = 0; i < 8; i++) {
                    acc[r][i] = 0.0f;
                }
            }
            for (int ks = k0; ks < k1;) {
                const int g = ks / G, ke = min(k1, (g + 1) * G);
                float     s[8], z[8];

#pragma unroll
                for (int i = 0; i < 8; i++) {
                    q4_sz(FMT, qzeros, scales, e, KG, g, 8 * c + i, Ntot,
                          zero_bias, &s[i], &z[i]);
                }
                for (int k = ks; k < ke; k += Q4_U) {
                    uint32_t q[Q4_U];

#pragma unroll
                    for (int u = 0; u < Q4_U; u++) {
                        q[u] = (uint32_t) __ldcs(
                            qweight + ((size_t) e * K + k + u) * Nw + c);
                    }
#pragma unroll
                    for (int u = 0; u < Q4_U; u++) {
#pragma unroll
                        for (int i = 0; i < 8; i++) {
                            float wv = ((float) ((q[u] >> (4 * q4_awq_pos[i]))
                                                 & 15u) - z[i]) * s[i];

#pragma unroll
                            for (int r = 0; r < Q_R; r++) {
                                acc[r][i] += xs[r][k - k0 + u] * wv;
                            }
                        }
                    }
                }
                ks = ke;
            }
#pragma unroll
            for (int r = 0; r < Q_R; r++) {
                if (r < nr) {
#pragma unroll
                    for (int i = 0; i < 8; i++) {
                        atomicAdd(&Y[(size_t) (rb + r) * ldy + 8 * c + i],
                                  acc[r][i]);
                    }
                }
            }
        } else {
            float acc[Q_R];
            int   gp = -1;
            float s = 0.0f, z = 0.0f;

#pragma unroll
            for (int r = 0; r < Q_R; r++) {
                acc[r] = 0.0f;
            }
            for (int kw = k0 / 8; kw < k1 / 8; kw += Q4_U) {
                uint32_t q[Q4_U];

#pragma unroll
                for (int u = 0; u < Q4_U; u++) {
                    q[u] = kw + u < k1 / 8
                           ? (uint32_t) __ldcs(qweight
                                 + ((size_t) e * (K / 8) + kw + u) * Ntot + c)
                           : 0u;
                }
#pragma unroll
                for (int u = 0; u < Q4_U; u++) {
                    if (kw + u >= k1 / 8) {
                        break;
                    }
#pragma unroll
                    for (int b = 0; b < 8; b++) {
                        int k = 8 * (kw + u) + b;
                        int g = g_idx != NULL ? gs[k - k0] : k / G;
                        float wv;

                        if (g != gp) {
                            q4_sz(FMT, qzeros, scales, e, KG, g, c, Ntot,
                                  zero_bias, &s, &z);
                            gp = g;
                        }
                        wv = ((float) ((q[u] >> (4 * b)) & 15u) - z) * s;
#pragma unroll
                        for (int r = 0; r < Q_R; r++) {
                            acc[r] += xs[r][k - k0] * wv;
                        }
                    }
                }
            }
#pragma unroll
            for (int r = 0; r < Q_R; r++) {
                if (r < nr) {
                    atomicAdd(&Y[(size_t) (rb + r) * ldy + c], acc[r]);
                }
            }
        }
    }
}


/* ------------------------------------------- 4-bit GEMV on tensor cores */

/*
 * kernel_qgemv_q4_mma: the weights are the A operand of mma.m16n8k16
 * (rows = output columns, bf16 integers q - z, exact), the group's input
 * rows the B operand (8 per n-tile, NT n-tiles per pass), fp32
 * accumulators.  Nibbles become bf16 with one mask-and-or each: the
 * nibbles at bits s and s + 16 of a word, or-ed into 0x4300 (bf16 128,
 * mantissa unit 1), give the pair (128 + q_lo, 128 + q_hi); one bf16x2
 * subtraction of (128 + z, 128 + z) leaves q - z.  mma sums over slot
 * k of A[row][k] B[k][n]; any permutation of k used alike by A and B
 * leaves the sum unchanged, which is how each format's nibble order maps
 * onto the fragments without moving weights:
 *
 * GPTQ (word (i, j) = k 8 i .. 8 i + 7 of column j): lane (g, t) loads
 * 16 bytes, columns c0 + 4 g .. + 3 of word row 4 r + t (a warp load:
 * 4 rows x 128 contiguous bytes).  Columns 4 g + {0, 1} are rows g and
 * g + 8 of m-tile 0, 4 g + {2, 3} of m-tile 1.  The word's nibble pairs
 * (0, 4), (1, 5) feed the slots (2t, 2t+1), (2t+8, 2t+9) of one mma,
 * (2, 6), (3, 7) those of a second; the input's 8 k of that word row are
 * permuted alike with byte_perm.  A round: 32 k.
 *
 * AWQ (word (k, w) = columns 8 w + c at nibble {0,4,1,5,2,6,3,7}[c]):
 * lane (g, t) loads WC words (4 WC bytes) at the 4 k rows 16 r + 4 t +
 * {0..3}.  byte_perm puts the low halves of the words of rows 0 and 1
 * into one register, nibble positions 0..3 (columns 0, 2, 4, 6) of row 0
 * at bits 0..15 and of row 1 at bits 16..31; the high halves (columns 1,
 * 3, 5, 7) into another: a shift by 4 m and the mask then give column
 * 2 m (or 2 m + 1) at k rows 0 and 1, the slots (2t, 2t+1); rows 2 and 3
 * fill (2t+8, 2t+9).  The input's natural order fits.  A round: 16 k.
 *
 * One iteration is nu rounds inside one quantization group (the launcher
 * picks nu so that an iteration never crosses a group boundary): scales
 * and zeros are loaded once per iteration, the mma sums of a group are
 * scaled (fp32) into the running outputs after its last iteration.  The K
 * range of a column tile is split over the QM_WARPS warps of a block and
 * the S blocks of a thread-block cluster (grid.z = S, contiguous
 * iteration ranges); the partial outputs are added in shared memory
 * (warps) and then through distributed shared memory (ranks), each sum
 * in a fixed order: the result does not depend on timing, no atomics, no
 * zeroing.  Each warp keeps the weights of its next QM_PF iterations on
 * their way into L2 (prefetch.global.L2), so a warp that waits for its
 * loads waits for L2 while DRAM streams the lines after them.  A warp has
 * only 4-7 iterations on mixtral shapes (gate|up 4, down 7 at batch 1),
 * so QM_PF 8 requests its whole range at its start: 2 blocks x 8 warps x
 * 8-14 KB, about 130-230 KB per SM in flight from the first cycle,
 * without registers (the loads then wait on L2, not on DRAM); fused
 * gate|up (S 1 at batch 1, 16 iterations per half) stays 8 ahead.
 */

#define QM_WARPS  8         /* q4 mma GEMV: warps per block */
#define QM_SMAX   8         /* q4 mma GEMV: most blocks per cluster */
#define QM_PF     8         /* q4 mma GEMV: iterations prefetched ahead
                               (8: a warp's whole K range on mixtral
                               shapes, requested at its start) */

/* bf16x2 (128 + nibble at bit s, 128 + nibble at bit s + 16) of w */
__device__ __forceinline__ uint32_t
q4m_nib2(uint32_t w, int s)
{
    return ((w >> s) & 0x000f000fu) | 0x43004300u;
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


/* Bring the 128-byte line of p into L2 (no register, no wait). */
__device__ __forceinline__ void
q4m_prefetch(const void *p)
{
    asm volatile("prefetch.global.L2 [%0];\n" :: "l"(p));
}


/*
 * Prefetch into L2 the weight words lane (g, t) will load in iteration
 * it (the same addresses as the loads; nothing past K or Ntot).
 */
template <int FMT, int WC, int QU>
__device__ __forceinline__ void
q4m_prefetch_iter(const uint32_t *qw, int it, int nu, int t, int cc,
    int wc, bool cv, int Ntot, int K)
{
    const int Nw = Ntot / 8;

    if (!cv) {
        return;
    }
#pragma unroll
    for (int u = 0; u < QU; u++) {
        if (u >= nu) {
            break;
        }
        if (FMT == MOE_K_Q4_GPTQ) {
            int wr = 4 * (it * nu + u) + t;

            if (8 * wr < K) {
                q4m_prefetch(qw + (size_t) wr * Ntot + cc);
            }
        } else {
            int k = 16 * (it * nu + u) + 4 * t;

            if (k < K) {
#pragma unroll
                for (int q = 0; q < 4; q++) {
                    q4m_prefetch(qw + (size_t) (k + q) * Nw + wc);
                }
            }
        }
    }
}


__device__ __forceinline__ float
q4m_h2f(uint32_t v, int hi)
{
    return __half2float(__ushort_as_half(
        (unsigned short) (hi ? v >> 16 : v & 0xffffu)));
}


/*
 * grid (column tiles, groups, S), cluster (1, 1, S), QM_WARPS warps.
 * GPTQ: tile of 32 columns, WC 1 (unused).  AWQ: tile of 8 WC words
 * (64 WC columns).  nu: rounds per iteration (1 .. QU); pf: iterations
 * prefetched ahead (QM_PF; bench/dev/quant_gemv varies it).
 * MR 1: Y[r, j] for the Ntot columns.  MR 2 (SiLU fused): Ntot = 2 F
 * stacked gate|up; the tiles cover F columns, a block does the tile's
 * gate columns j (their cluster sums kept in gs, shared memory), then
 * its up columns F + j (the same lanes, the same reduction order), and
 * writes H[r * ldy + j] = bf16(silu(g) * u), the arithmetic of
 * kernel_silu_mul.
 */
template <int FMT, int NT, int WC, int QU, int MR>
__global__ void __launch_bounds__(QM_WARPS * 32, 2)
kernel_qgemv_q4_mma(const bf16 *X, int ldx, const int32_t *xrow, int xdiv,
    const int32_t *qweight, const int32_t *qzeros, const uint16_t *scales,
    int G, int zero_bias, int Ntot, int K, int nu, int pf,
    const int32_t *offs, int E, int n, float *Y, bf16 *H, int ldy)
{
    constexpr int     MT = FMT == MOE_K_Q4_AWQ ? 4 * WC : 2;
    constexpr int     F = MT * NT * 4;       /* outputs per lane */
    __shared__ float  red[QM_WARPS][F][32];
    __shared__ float  gs[MR == 2 ? F * 32 : 1];  /* MR 2: the gate sums,
                                                  * each read back by the
                                                  * thread that wrote it */

    cg::cluster_group cl = cg::this_cluster();
    const int         lane = (int) threadIdx.x & 31;
    const int         warp = (int) threadIdx.x >> 5;
    const int         g = lane >> 2, t = lane & 3;
    const int         S = (int) gridDim.z;
    const int         rank = (int) cl.block_rank();
    const int         KG = (K + G - 1) / G, Nw = Ntot / 8;
    const int         span = (FMT == MOE_K_Q4_AWQ ? 16 : 32) * nu;
    const int         IT = (K + span - 1) / span;
    const int         pw = (int) blockIdx.z * QM_WARPS + warp;
    const int         it0 = (int) ((int64_t) IT * pw / (S * QM_WARPS));
    const int         it1 = (int) ((int64_t) IT * (pw + 1) / (S * QM_WARPS));
    int               r0, r1;
    const int         e = q_group_rows(offs, E, n, &r0, &r1);

    if (e < 0 || r1 <= r0) {
        return;                 /* uniform over the cluster (same x, y) */
    }

    /* columns per half (MR 2: gate, then up at + Nh) */
    const int  Nh = Ntot / MR;
    /* this lane's columns in the half: GPTQ cl0 .. cl0 + 3; AWQ words
     * wl0 .. wl0 + WC - 1 */
    const int  cl0 = (int) blockIdx.x * 32 + 4 * g;
    const int  wl0 = (int) blockIdx.x * 8 * WC + WC * g;
    const bool cv = FMT == MOE_K_Q4_AWQ ? wl0 < Nh / 8 : cl0 < Nh;
    const uint32_t *qw = reinterpret_cast<const uint32_t *>(qweight)
                         + (size_t) e * K * Nw;

    for (int p0 = r0; p0 < r1; p0 += 8 * NT) {
        const bf16 *xp[NT];
        bool        xv[NT];

#pragma unroll
        for (int nt = 0; nt < NT; nt++) {
            int r = p0 + 8 * nt + g;

            xv[nt] = r < r1;
            xp[nt] = X + (size_t) (xv[nt] ? (xrow != NULL ? xrow[r] / xdiv
                                                          : r) : 0) * ldx;
        }
#pragma unroll 1
        for (int half = 0; half < MR; half++) {
            const int cc = cl0 + half * Nh;
            const int wc = wl0 + half * (Nh / 8);
            float     y[MT][NT][4];

#pragma unroll
            for (int nt = 0; nt < NT; nt++) {
#pragma unroll
                for (int mt = 0; mt < MT; mt++) {
#pragma unroll
                    for (int i = 0; i < 4; i++) {
                        y[mt][nt][i] = 0.0f;
                    }
                }
            }

            /* pf iterations ahead of the loads, in L2: the loads of an
             * iteration then wait for L2, not DRAM (bytes in flight per SM
             * without registers) */
            for (int d = 0; d < pf; d++) {
                /* half 1: half 0's last iterations prefetched these */
                if (it0 + d < it1 && !(half == 1 && it1 - it0 >= pf)) {
                    q4m_prefetch_iter<FMT, WC, QU>(qw, it0 + d, nu, t, cc, wc,
                                                   cv, Ntot, K);
                }
            }
            /* c: the current group's sums, scaled into y at its end */
            float c[MT][NT][4];

#pragma unroll
            for (int mt = 0; mt < MT; mt++) {
#pragma unroll
                for (int nt = 0; nt < NT; nt++) {
#pragma unroll
                    for (int i = 0; i < 4; i++) {
                        c[mt][nt][i] = 0.0f;
                    }
                }
            }
            for (int it = it0; it < it1; it++) {
                const int    grp = it * span / G;
                const size_t srow = (size_t) e * KG + grp;
                const bool   fold = it + 1 >= it1
                                    || (it + 1) * span / G != grp;

                if (pf > 0 && it + pf < it1) {
                    q4m_prefetch_iter<FMT, WC, QU>(qw, it + pf, nu, t, cc,
                                                   wc, cv, Ntot, K);
                } else if (MR == 2 && half == 0 && pf > 0
                           && it + pf - it1 < it1 - it0)
                {
                    /* the up half's first iterations, same lanes */
                    q4m_prefetch_iter<FMT, WC, QU>(qw, it0 + it + pf - it1,
                                                   nu, t, cc + Nh,
                                                   wc + Nh / 8, cv, Ntot,
                                                   K);
                }

                if (FMT == MOE_K_Q4_GPTQ) {
                    uint4    wq[QU], xq[QU][NT];
                    uint32_t zz[4];
                    uint2    sr = make_uint2(0u, 0u);

                    /* zeros (4 nibbles of one word) and scales (8 bytes) */
                    if (cv) {
                        uint32_t zw = (uint32_t) __ldg(qzeros + srow * Nw
                                                       + cc / 8);

                        sr = __ldg(reinterpret_cast<const uint2 *>(
                            scales + srow * Ntot + cc));
#pragma unroll
                        for (int i = 0; i < 4; i++) {
                            zz[i] = q4m_zz(((zw >> (4 * ((cc & 7) + i))) & 15u)
                                           + (uint32_t) zero_bias);
                        }
                    } else {
#pragma unroll
                        for (int i = 0; i < 4; i++) {
                            zz[i] = q4m_zz(0u);
                        }
                    }
#pragma unroll
                    for (int u = 0; u < QU; u++) {
                        int  wr = 4 * (it * nu + u) + t;     /* word row */
                        bool kv = u < nu && 8 * wr < K;

                        wq[u] = kv && cv
                                ? __ldcs(reinterpret_cast<const uint4 *>(
                                      qw + (size_t) wr * Ntot + cc))
                                : make_uint4(0u, 0u, 0u, 0u);
#pragma unroll
                        for (int nt = 0; nt < NT; nt++) {
                            const uint4 *xs4 = reinterpret_cast<
                                const uint4 *>(xp[nt] + 8 * wr);

                            xq[u][nt] = kv && xv[nt] ? __ldg(xs4)
                                        : make_uint4(0u, 0u, 0u, 0u);
                        }
                    }
#pragma unroll
                    for (int u = 0; u < QU; u++) {
                        if (u >= nu) {
                            break;
                        }
                        const uint32_t w4[4] = { wq[u].x, wq[u].y, wq[u].z,
                                                 wq[u].w };

#pragma unroll
                        for (int h = 0; h < 2; h++) {
                            uint32_t b0[NT], b1[NT];

#pragma unroll
                            for (int nt = 0; nt < NT; nt++) {
                                uint32_t lo = h ? xq[u][nt].y : xq[u][nt].x;
                                uint32_t hi = h ? xq[u][nt].w : xq[u][nt].z;

                                b0[nt] = __byte_perm(lo, hi, 0x5410);
                                b1[nt] = __byte_perm(lo, hi, 0x7632);
                            }
#pragma unroll
                            for (int mt = 0; mt < 2; mt++) {
                                uint32_t wa = w4[2 * mt], wb = w4[2 * mt + 1];
                                uint32_t a0 = q4m_sub(q4m_nib2(wa, 8 * h),
                                                      zz[2 * mt]);
                                uint32_t a1 = q4m_sub(q4m_nib2(wb, 8 * h),
                                                      zz[2 * mt + 1]);
                                uint32_t a2 = q4m_sub(q4m_nib2(wa, 8 * h + 4),
                                                      zz[2 * mt]);
                                uint32_t a3 = q4m_sub(q4m_nib2(wb, 8 * h + 4),
                                                      zz[2 * mt + 1]);

#pragma unroll
                                for (int nt = 0; nt < NT; nt++) {
                                    moe_mma_bf16(c[mt][nt], a0, a1, a2, a3,
                                                 b0[nt], b1[nt]);
                                }
                            }
                        }
                    }
                    /* at the group's end, scale its sums: rows g / g + 8 of
                     * m-tile mt are columns cc + 2 mt / cc + 2 mt + 1 */
#pragma unroll
                    for (int mt = 0; mt < 2; mt++) {
                        uint32_t sw = mt ? sr.y : sr.x;
                        float    s0 = q4m_h2f(sw, 0), s1 = q4m_h2f(sw, 1);

#pragma unroll
                        for (int nt = 0; nt < NT; nt++) {
                            if (fold) {
                                y[mt][nt][0] += s0 * c[mt][nt][0];
                                y[mt][nt][1] += s0 * c[mt][nt][1];
                                y[mt][nt][2] += s1 * c[mt][nt][2];
                                y[mt][nt][3] += s1 * c[mt][nt][3];
                                c[mt][nt][0] = c[mt][nt][1] = 0.0f;
                                c[mt][nt][2] = c[mt][nt][3] = 0.0f;
                            }
                        }
                    }
                } else {
                    uint32_t wq[QU][4][WC], zz[WC][8];
                    uint2    xq[QU][NT];
                    uint4    sr[WC];

#pragma unroll
                    for (int j = 0; j < WC; j++) {
                        uint32_t zw = cv ? (uint32_t) __ldg(qzeros + srow * Nw
                                                            + wc + j) : 0u;

                        sr[j] = cv ? __ldg(reinterpret_cast<const uint4 *>(
                                         scales + srow * Ntot + 8 * (wc + j)))
                                   : make_uint4(0u, 0u, 0u, 0u);
#pragma unroll
                        for (int p = 0; p < 8; p++) {
                            zz[j][p] = q4m_zz(((zw >> (4 * p)) & 15u)
                                              + (uint32_t) zero_bias);
                        }
                    }
#pragma unroll
                    for (int u = 0; u < QU; u++) {
                        int  k = 16 * (it * nu + u) + 4 * t;
                        bool kv = u < nu && k < K;

#pragma unroll
                        for (int q = 0; q < 4; q++) {
                            const uint32_t *src = qw + (size_t) (k + q) * Nw
                                                  + wc;

                            if (WC == 2) {
                                const uint2 *s2 =
                                    reinterpret_cast<const uint2 *>(src);
                                uint2        v = kv && cv
                                                 ? __ldcs(s2)
                                                 : make_uint2(0u, 0u);

                                wq[u][q][0] = v.x;
                                wq[u][q][WC - 1] = v.y;
                            } else {
                                const int *s1 =
                                    reinterpret_cast<const int *>(src);

                                wq[u][q][0] = kv && cv
                                              ? (uint32_t) __ldcs(s1) : 0u;
                            }
                        }
#pragma unroll
                        for (int nt = 0; nt < NT; nt++) {
                            const uint2 *xs2 = reinterpret_cast<
                                const uint2 *>(xp[nt] + k);

                            xq[u][nt] = kv && xv[nt] ? __ldg(xs2)
                                        : make_uint2(0u, 0u);
                        }
                    }
#pragma unroll
                    for (int u = 0; u < QU; u++) {
                        if (u >= nu) {
                            break;
                        }
#pragma unroll
                        for (int j = 0; j < WC; j++) {
                            uint32_t l01 = __byte_perm(wq[u][0][j],
                                                       wq[u][1][j],
                                                       0x5410);
                            uint32_t h01 = __byte_perm(wq[u][0][j],
                                                       wq[u][1][j],
                                                       0x7632);
                            uint32_t l23 = __byte_perm(wq[u][2][j],
                                                       wq[u][3][j],
                                                       0x5410);
                            uint32_t h23 = __byte_perm(wq[u][2][j],
                                                       wq[u][3][j],
                                                       0x7632);

#pragma unroll
                            for (int m = 0; m < 4; m++) {
                                /* column 2 m: nibble position m; 2 m + 1:
                                 * position m + 4 */
                                uint32_t za = zz[j][m], zb = zz[j][m + 4];
                                uint32_t a0 = q4m_sub(
                                    q4m_nib2(l01, 4 * m), za);
                                uint32_t a1 = q4m_sub(
                                    q4m_nib2(h01, 4 * m), zb);
                                uint32_t a2 = q4m_sub(
                                    q4m_nib2(l23, 4 * m), za);
                                uint32_t a3 = q4m_sub(
                                    q4m_nib2(h23, 4 * m), zb);

#pragma unroll
                                for (int nt = 0; nt < NT; nt++) {
                                    moe_mma_bf16(c[4 * j + m][nt], a0, a1, a2,
                                                 a3, xq[u][nt].x, xq[u][nt].y);
                                }
                            }
                        }
                    }
#pragma unroll
                    for (int j = 0; j < WC; j++) {
                        const uint32_t s4[4] = { sr[j].x, sr[j].y, sr[j].z,
                                                 sr[j].w };

                        if (!fold) {
                            break;
                        }
#pragma unroll
                        for (int m = 0; m < 4; m++) {
                            float s0 = q4m_h2f(s4[m], 0);
                            float s1 = q4m_h2f(s4[m], 1);

#pragma unroll
                            for (int nt = 0; nt < NT; nt++) {
                                float (&cm)[4] = c[4 * j + m][nt];

                                y[4 * j + m][nt][0] += s0 * cm[0];
                                y[4 * j + m][nt][1] += s0 * cm[1];
                                y[4 * j + m][nt][2] += s1 * cm[2];
                                y[4 * j + m][nt][3] += s1 * cm[3];
                                cm[0] = cm[1] = cm[2] = cm[3] = 0.0f;
                            }
                        }
                    }
                }
            }

            /* the warps' partial sums, then the ranks', in a fixed order */
#pragma unroll
            for (int mt = 0; mt < MT; mt++) {
#pragma unroll
                for (int nt = 0; nt < NT; nt++) {
#pragma unroll
                    for (int i = 0; i < 4; i++) {
                        red[warp][(mt * NT + nt) * 4 + i][lane] = y[mt][nt][i];
                    }
                }
            }
            __syncthreads();
            for (int idx = (int) threadIdx.x; idx < F * 32;
                 idx += QM_WARPS * 32)
            {
                float v = 0.0f;

                for (int w = 0; w < QM_WARPS; w++) {
                    v += red[w][idx / 32][idx % 32];
                }
                red[0][idx / 32][idx % 32] = v;
            }
            cl.sync();                          /* every rank's block sum */
            for (int idx = rank * QM_WARPS * 32 + (int) threadIdx.x;
                 idx < F * 32; idx += S * QM_WARPS * 32)
            {
                int   f = idx / 32, l = idx % 32, i = f % 4;
                int   nt = (f / 4) % NT, mt = f / (4 * NT);
                int   lg = l >> 2, lt = l & 3;
                int   row = p0 + 8 * nt + 2 * lt + (i & 1);
                int   col;
                float v = 0.0f;

                if (FMT == MOE_K_Q4_AWQ) {
                    col = 8 * ((int) blockIdx.x * 8 * WC + WC * lg + mt / 4)
                          + 2 * (mt % 4) + (i >> 1);
                } else {
                    col = (int) blockIdx.x * 32 + 4 * lg + 2 * mt + (i >> 1);
                }
                for (int rk = 0; rk < S; rk++) {
                    v += cl.map_shared_rank(&red[0][0][0], rk)[idx];
                }
                if (row < r1 && col < Nh) {
                    if (MR == 1) {
                        Y[(size_t) row * ldy + col] = v;
                    } else if (half == 0) {
                        gs[idx] = v;
                    } else {
                        float gv = gs[idx];

                        H[(size_t) row * ldy + col] =
                            moe_f2bf(gv / (1.0f + expf(-gv)) * v);
                    }
                }
            }
            cl.sync();                      /* red free for the next pass */
        }
    }
}


/* ------------------------------- 4-bit GEMV on CUDA cores, 1-2 rows */

/*
 * kernel_qgemv_q4_fma: groups of 1..Q4S_MAXR rows per pass (decode), no
 * g_idx, G a multiple of 32.  At one or two rows the mma tile above
 * wastes 7/8 of its token columns and its geometry (2 blocks of 8 warps
 * per SM, loads into registers) kept few bytes in flight; here every
 * thread streams its weights through its own ring of Q4S_P shared-memory
 * slots with cp.async (no registers held by loads in flight: 256 threads
 * x 128 bytes = 32 KB per block, 2-3 blocks per SM), and dequantizes on
 * the CUDA cores with three instructions per weight and row:
 *
 *   nibble p of word w (bits 4p .. 4p + 3, p <= 4; p 5..7 come from
 *   w >> 12 at positions 2..4) or-ed into the exponent 150 - 4p is the
 *   fp32 2^(23 - 4p) + q exactly (LOP3); subtracting 2^(23 - 4p) gives q
 *   exactly (FADD); one FFMA per row adds x q in fp32.
 *
 * Zeros and scales are applied once per quantization group: a lane
 * keeps acc = sum x q and xs = sum x over the k it saw in the group and
 * folds y += s (acc - z xs) at the group's end (exact products, fp32
 * sums; GPTQ's zero_bias is part of z).  The layouts:
 *
 * GPTQ (word (i, j) = k 8 i .. 8 i + 7 of column j): a lane copies 16
 * bytes, columns c .. c + 3 of one word row (32 weights); 8 lanes span
 * 32 columns (128 bytes, one line) and 4 lanes 4 consecutive word rows:
 * one warp load = 4 full lines.  The 8 inputs of a word row are read
 * from shared memory as fp32 (two float4) with their sum (staged once
 * per block).
 *
 * AWQ (word (k, w) = columns 8 w + c at nibble {0,4,1,5,2,6,3,7}[c]): a
 * lane copies 8 bytes, words w, w + 1 of one k row (16 columns, each
 * with its own nibble position); 16 lanes span 32 words (256 columns,
 * 128 bytes) and 2 lanes 2 consecutive k rows.  The zeros are packed the
 * same way, so a column's zero is the same nibble position of its zero
 * word.
 *
 * A block: Q4S_WARPS warps on one column tile (MR 1: TN columns; MR 2,
 * SiLU fused: the tile's gate columns on the first half of the warps,
 * the same up columns F + j on the second half) and one range of K;
 * the warps of a tile half take contiguous K ranges of whole "units"
 * (the 4 GPTQ word rows / 2 AWQ k rows one warp load covers; a unit
 * never straddles a quantization group since G % 32 == 0, so a warp's
 * lanes fold together).  K is split further over the S blocks of a
 * thread-block cluster (grid.z) when the tiles are few or K is long
 * (the block's inputs, fp32 in shared memory, are at most Q4S_KMAX k
 * per row).  Partial sums: lanes and warps added in shared memory, then
 * the ranks through distributed shared memory, each in a fixed order:
 * no atomics, the same bits every run.
 */

#define Q4S_WARPS 8         /* q4 fma GEMV: warps per block */
#define Q4S_MAXR  2         /* q4 fma GEMV: most rows per pass */
#define Q4S_KMAX  4096      /* q4 fma GEMV: most k per block (inputs) */
#define Q4S_SMAX  8         /* q4 fma GEMV: most blocks per cluster */
#define Q4S_RING  128       /* q4 fma GEMV: bytes in flight per thread */

/* per format and rows per pass: bytes per copy, lanes along N, lanes
 * along K, columns per lane, k per step (GPTQ: a word row), columns per
 * tile.  AWQ: 2 words per lane at 1 row, 1 word at 2 (the 16 x 2
 * accumulators and sums of 2 words at 2 rows spilled). */
template <int FMT, int NR> struct q4s_fmt {
    static constexpr int CB = 16, NL = 8, KL = 4, CL = 4, SK = 8, TN = 32;
};
template <> struct q4s_fmt<MOE_K_Q4_AWQ, 1> {
    static constexpr int CB = 8, NL = 16, KL = 2, CL = 16, SK = 1, TN = 256;
};
template <> struct q4s_fmt<MOE_K_Q4_AWQ, 2> {
    static constexpr int CB = 4, NL = 32, KL = 1, CL = 8, SK = 1, TN = 256;
};


__device__ __forceinline__ void
q4s_cp(void *dst, const void *src, int bytes)
{
    unsigned s = (unsigned) __cvta_generic_to_shared(dst);

    if (bytes == 16) {
        asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n"
                     :: "r"(s), "l"(src) : "memory");
    } else if (bytes == 8) {
        asm volatile("cp.async.ca.shared.global [%0], [%1], 8;\n"
                     :: "r"(s), "l"(src) : "memory");
    } else {
        asm volatile("cp.async.ca.shared.global [%0], [%1], 4;\n"
                     :: "r"(s), "l"(src) : "memory");
    }
}


__device__ __forceinline__ void
q4s_commit(void)
{
    asm volatile("cp.async.commit_group;\n" ::: "memory");
}


template <int N>
__device__ __forceinline__ void
q4s_wait(void)
{
    asm volatile("cp.async.wait_group %0;\n" :: "n"(N) : "memory");
}


/* q of nibble p (0..7) of w, hi = w >> 12, exactly, as fp32 */
__device__ __forceinline__ float
q4s_nib(uint32_t w, uint32_t hi, int p)
{
    const int      pp = p < 5 ? p : p - 3;
    const uint32_t v = p < 5 ? w : hi;
    const uint32_t ex = (uint32_t) (150 - 4 * pp) << 23;

    return __uint_as_float((v & (0xfu << (4 * pp))) | ex)
           - __uint_as_float(ex);
}


/*
 * grid (tiles, groups, S), cluster (1, 1, S), Q4S_WARPS warps, dynamic
 * shared memory (q4s_smem).  NR rows per pass (a group with more takes
 * several passes).  MR 1: Y[r * ldy + j], j < Ntot.  MR 2: Ntot = 2 F
 * stacked gate|up, H[r * ldy + j] = bf16(silu(g) u), j < F, the
 * arithmetic of kernel_silu_mul.
 */
template <int FMT, int NR, int MR>
__global__ void __launch_bounds__(Q4S_WARPS * 32, 2)
kernel_qgemv_q4_fma(const bf16 *X, int ldx, const int32_t *xrow, int xdiv,
    const int32_t *qweight, const int32_t *qzeros, const uint16_t *scales,
    int G, int zero_bias, int Ntot, int K, int kmax, const int32_t *offs,
    int E, int n, float *Y, bf16 *H, int ldy)
{
    typedef q4s_fmt<FMT, NR> F_;
    constexpr int CB = F_::CB, NL = F_::NL, KL = F_::KL, CL = F_::CL;
    constexpr int SK = F_::SK, TN = F_::TN;
    constexpr int WL = FMT == MOE_K_Q4_AWQ ? CL / 8 : 1;  /* AWQ words */
    constexpr int P = Q4S_RING / CB;            /* ring slots per thread */
    constexpr int WS = Q4S_WARPS / MR;          /* warps per tile half */
    constexpr int NT = Q4S_WARPS * 32;
    constexpr int OUT = TN * NR;                /* outputs per half */
    constexpr int AC = CL;                      /* accumulators */

    extern __shared__ __align__(16) unsigned char q4s_sm[];
    unsigned char *ring = q4s_sm;                       /* [P][NT][CB] */
    float         *xs_sm = reinterpret_cast<float *>(q4s_sm + P * NT * CB);
    float         *x8_sm = xs_sm + NR * kmax;          /* GPTQ: [NR][kmax/8] */
    float         *bsum = x8_sm + (FMT == MOE_K_Q4_GPTQ ? NR * kmax / 8 : 0);
    float         *red = reinterpret_cast<float *>(q4s_sm);  /* aliases ring */

    cg::cluster_group cl = cg::this_cluster();
    const int tid = (int) threadIdx.x, lane = tid & 31, warp = tid >> 5;
    const int seg = warp / WS, ws = warp % WS;
    const int nl = lane % NL, kq = lane / NL;
    const int S = (int) gridDim.z, rank = (int) cl.block_rank();
    const int KG = (K + G - 1) / G, Nw = Ntot / 8, Nh = Ntot / MR;
    const int ST = K / SK;                      /* steps: word / k rows */
    const int U = (ST + KL - 1) / KL;           /* units of KL steps */
    constexpr int BU = 32 / (KL * SK);          /* units per 32 k */
    const int UB = (U + BU - 1) / BU;           /* blocks of 32 k */
    const int ub0 = min(U, BU * (int) ((int64_t) UB * (int) blockIdx.z / S));
    const int ub1 = min(U, BU * (int) ((int64_t) UB * ((int) blockIdx.z + 1)
                                       / S));
    const int u0 = ub0 + (int) ((int64_t) (ub1 - ub0) * ws / WS);
    const int u1 = ub0 + (int) ((int64_t) (ub1 - ub0) * (ws + 1) / WS);
    const int klo = ub0 * KL * SK;              /* block's first k */
    const int khi = min(K, ub1 * KL * SK);
    int       r0, r1;
    const int e = q_group_rows(offs, E, n, &r0, &r1);

    if (e < 0 || r1 <= r0) {
        return;                 /* uniform over the cluster (same x, y) */
    }

    /* this lane's columns: GPTQ c0 .. c0 + 3; AWQ words w0 .. w0 + WL - 1
     * (past the half's end: clamped to its start, not written) */
    const int  tc = (int) blockIdx.x * TN;
    const bool cv = FMT == MOE_K_Q4_GPTQ ? tc + 4 * nl < Nh
                                         : tc / 8 + WL * nl < Nh / 8;
    const int  c0 = seg * Nh + (cv ? tc + 4 * nl : 0);       /* GPTQ */
    const int  w0 = seg * (Nh / 8) + (cv ? tc / 8 + WL * nl : 0);  /* AWQ */
    const uint32_t *qw = reinterpret_cast<const uint32_t *>(qweight)
                         + (size_t) e * K * Nw;
    const int  nc = u1 - u0;                    /* this lane's steps */
    unsigned char *slot0 = ring + (size_t) tid * CB;

    for (int p0 = r0; p0 < r1; p0 += NR) {
        const int nr = min(NR, r1 - p0);

        /* the ring's first P - 1 copies before the inputs are staged */
        auto issue = [&](int c) {
            if (c < nc) {
                int step = (u0 + c) * KL + kq;

                if (step < ST) {
                    const uint32_t *src = FMT == MOE_K_Q4_GPTQ
                        ? qw + (size_t) step * Ntot + c0
                        : qw + (size_t) step * Nw + w0;

                    q4s_cp(slot0 + (size_t) (c % P) * NT * CB, src, CB);
                }
            }
            q4s_commit();
        };
#pragma unroll 1
        for (int c = 0; c < P - 1; c++) {
            issue(c);
        }

        /* inputs of [klo, khi) as fp32 (0 past the group's rows); GPTQ:
         * the sum of each 8 too, in a fixed order */
        for (int i = tid; i < NR * (kmax / 8); i += NT) {
            int   r = i / (kmax / 8), k8 = i % (kmax / 8);
            int   k = klo + 8 * k8;
            float f[8], s8 = 0.0f;

            if (r < nr && k < khi) {
                int   row = p0 + r;
                int   xr = xrow != NULL ? xrow[row] / xdiv : row;
                uint4 v = __ldg(reinterpret_cast<const uint4 *>(
                    X + (size_t) xr * ldx + k));
                const bf16 *b = reinterpret_cast<const bf16 *>(&v);

#pragma unroll
                for (int t = 0; t < 8; t++) {
                    f[t] = moe_bf2f(b[t]);
                    s8 += f[t];
                }
            } else {
#pragma unroll
                for (int t = 0; t < 8; t++) {
                    f[t] = 0.0f;
                }
            }
            float4 *d = reinterpret_cast<float4 *>(xs_sm + r * kmax + 8 * k8);

            d[0] = make_float4(f[0], f[1], f[2], f[3]);
            d[1] = make_float4(f[4], f[5], f[6], f[7]);
            if (FMT == MOE_K_Q4_GPTQ) {
                x8_sm[r * (kmax / 8) + k8] = s8;
            }
        }
        __syncthreads();

        float y[AC][NR], acc[AC][NR], xs[NR];

#pragma unroll
        for (int i = 0; i < AC; i++) {
#pragma unroll
            for (int r = 0; r < NR; r++) {
                y[i][r] = acc[i][r] = 0.0f;
            }
        }
#pragma unroll
        for (int r = 0; r < NR; r++) {
            xs[r] = 0.0f;
        }

        /* scales / zeros of group g (issued at its first unit, used at
         * its fold) */
        uint4    sq[2] = { make_uint4(0u, 0u, 0u, 0u),
                           make_uint4(0u, 0u, 0u, 0u) };
        uint32_t zq[2] = { 0u, 0u };
        auto load_sz = [&](int g) {
            size_t srow = (size_t) e * KG + g;

            if (FMT == MOE_K_Q4_GPTQ) {
                uint2 v = __ldg(reinterpret_cast<const uint2 *>(
                    scales + srow * Ntot + c0));

                sq[0].x = v.x;
                sq[0].y = v.y;
                zq[0] = (uint32_t) __ldg(qzeros + srow * Nw + c0 / 8);
            } else if (WL == 2) {
                const uint4 *s4 = reinterpret_cast<const uint4 *>(
                    scales + srow * Ntot + 8 * w0);
                uint2        z2 = __ldg(reinterpret_cast<const uint2 *>(
                    qzeros + srow * Nw + w0));

                sq[0] = __ldg(s4);
                sq[WL - 1] = __ldg(s4 + 1);
                zq[0] = z2.x;
                zq[WL - 1] = z2.y;
            } else {
                sq[0] = __ldg(reinterpret_cast<const uint4 *>(
                    scales + srow * Ntot + 8 * w0));
                zq[0] = (uint32_t) __ldg(qzeros + srow * Nw + w0);
            }
        };
        auto fold = [&]() {
#pragma unroll
            for (int i = 0; i < AC; i++) {
                float s, z;

                if (FMT == MOE_K_Q4_GPTQ) {
                    uint32_t sw = i < 2 ? sq[0].x : sq[0].y;

                    s = q4m_h2f(sw, i & 1);
                    z = (float) ((int) ((zq[0] >> (4 * ((c0 & 7) + i)))
                                        & 15u) + zero_bias);
                } else {
                    /* accumulator i: word i / 8, nibble position i % 8
                     * = column {0,2,4,6,1,3,5,7}[i % 8] of the word */
                    const int j = i / 8, p = i % 8;
                    const int c = p < 4 ? 2 * p : 2 * (p - 4) + 1;
                    const uint32_t sv[4] = { sq[j].x, sq[j].y, sq[j].z,
                                             sq[j].w };

                    s = q4m_h2f(sv[c / 2], c & 1);
                    z = (float) ((zq[j] >> (4 * p)) & 15u);
                }
#pragma unroll
                for (int r = 0; r < NR; r++) {
                    y[i][r] = fmaf(s, fmaf(-z, xs[r], acc[i][r]), y[i][r]);
                    acc[i][r] = 0.0f;
                }
            }
#pragma unroll
            for (int r = 0; r < NR; r++) {
                xs[r] = 0.0f;
            }
        };

        int gcur = -1;

#pragma unroll 1
        for (int c = 0; c < nc; c++) {
            const int u = u0 + c;
            const int g = u * KL * SK / G;
            const int step = u * KL + kq;

            if (g != gcur) {                    /* warp-uniform */
                if (gcur >= 0) {
                    fold();
                }
                gcur = g;
                load_sz(g);
            }
            issue(c + P - 1);
            q4s_wait<P - 1>();
            if (step >= ST) {
                continue;                       /* GPTQ K % 32 tail */
            }
            const unsigned char *sl = slot0 + (size_t) (c % P) * NT * CB;
            const int            lk = step * SK - klo;   /* local k */

            if (FMT == MOE_K_Q4_GPTQ) {
                const uint4    wv = *reinterpret_cast<const uint4 *>(sl);
                const uint32_t w4[4] = { wv.x, wv.y, wv.z, wv.w };
                float          xv[NR][8];

#pragma unroll
                for (int r = 0; r < NR; r++) {
                    const float4 *xp = reinterpret_cast<const float4 *>(
                        xs_sm + r * kmax + lk);
                    float4 a = xp[0], b = xp[1];

                    xv[r][0] = a.x; xv[r][1] = a.y;
                    xv[r][2] = a.z; xv[r][3] = a.w;
                    xv[r][4] = b.x; xv[r][5] = b.y;
                    xv[r][6] = b.z; xv[r][7] = b.w;
                    xs[r] += x8_sm[r * (kmax / 8) + lk / 8];
                }
#pragma unroll
                for (int i = 0; i < 4; i++) {
                    const uint32_t w = w4[i], hi = w >> 12;

#pragma unroll
                    for (int p = 0; p < 8; p++) {
                        float q = q4s_nib(w, hi, p);

#pragma unroll
                        for (int r = 0; r < NR; r++) {
                            acc[i][r] = fmaf(xv[r][p], q, acc[i][r]);
                        }
                    }
                }
            } else {
                uint32_t wv[WL];
                float    xv[NR];

                if (WL == 2) {
                    const uint2 v = *reinterpret_cast<const uint2 *>(sl);

                    wv[0] = v.x;
                    wv[WL - 1] = v.y;
                } else {
                    wv[0] = *reinterpret_cast<const uint32_t *>(sl);
                }

#pragma unroll
                for (int r = 0; r < NR; r++) {
                    xv[r] = xs_sm[r * kmax + lk];
                    xs[r] += xv[r];
                }
#pragma unroll
                for (int j = 0; j < WL; j++) {
                    const uint32_t w = wv[j], hi = w >> 12;

#pragma unroll
                    for (int p = 0; p < 8; p++) {
                        float q = q4s_nib(w, hi, p);

#pragma unroll
                        for (int r = 0; r < NR; r++) {
                            acc[8 * j + p][r] = fmaf(xv[r], q,
                                                     acc[8 * j + p][r]);
                        }
                    }
                }
            }
        }
        if (gcur >= 0) {
            fold();
        }
        q4s_wait<0>();
        __syncthreads();                    /* ring and inputs free */

        /* lanes' sums: red[seg][kl][col in tile][r], kl = ws * KL + kq */
        {
            float *rp = red + ((size_t) (seg * WS + ws) * KL + kq) * OUT;

#pragma unroll
            for (int i = 0; i < AC; i++) {
                int col;

                if (FMT == MOE_K_Q4_GPTQ) {
                    col = 4 * nl + i;
                } else {
                    const int p = i % 8;

                    col = 8 * (WL * nl + i / 8)
                          + (p < 4 ? 2 * p : 2 * (p - 4) + 1);
                }
#pragma unroll
                for (int r = 0; r < NR; r++) {
                    rp[col * NR + r] = y[i][r];
                }
            }
        }
        __syncthreads();
        for (int o = tid; o < MR * OUT; o += NT) {
            const int sg = o / OUT, oi = o % OUT;
            float     v = 0.0f;

            for (int kl = 0; kl < WS * KL; kl++) {
                v += red[((size_t) sg * WS * KL + kl) * OUT + oi];
            }
            bsum[o] = v;
        }
        cl.sync();                              /* every rank's block sum */
        for (int o = rank * NT + tid; o < OUT; o += S * NT) {
            const int col = tc + o / NR, r = o % NR;
            float     v = 0.0f, u = 0.0f;

            for (int rk = 0; rk < S; rk++) {
                const float *b = cl.map_shared_rank(bsum, rk);

                v += b[o];
                if (MR == 2) {
                    u += b[OUT + o];
                }
            }
            if (r < nr && col < Nh) {
                if (MR == 1) {
                    Y[(size_t) (p0 + r) * ldy + col] = v;
                } else {
                    H[(size_t) (p0 + r) * ldy + col] =
                        moe_f2bf(v / (1.0f + expf(-v)) * u);
                }
            }
        }
        cl.sync();                  /* bsum, ring, inputs free for reuse */
    }
}


/* grid-stride over count * rows * K / 16 chunks of 16 values */
__global__ void
kernel_dequant_fp8(const uint8_t *W, const float *scale, int mode,
    int stacked, int rows, int K, int count, bf16 *out)
{
    const int64_t kc = K / 16, total = (int64_t) count * rows * kc;

    for (int64_t i = (int64_t) blockIdx.x * blockDim.x + threadIdx.x;
         i < total; i += (int64_t) gridDim.x * blockDim.x)
    {
        int64_t row = i / kc;
        int     k = (int) (i % kc) * 16;
        int     e = (int) (row / rows), j = (int) (row % rows);
        float   wf[16], f;
        uint4   o[2];
        bf16   *ob = reinterpret_cast<bf16 *>(o);

        q_fp8x16(__ldcs(reinterpret_cast<const uint4 *>(W + row * K + k)),
                 wf);
        f = q_fp8_row_scale(scale, mode, stacked, e, j, rows)
            * q_fp8_blk_scale(scale, mode, e, j, k, rows, K);
#pragma unroll
        for (int t = 0; t < 16; t++) {
            ob[t] = moe_f2bf(wf[t] * f);
        }
        *reinterpret_cast<uint4 *>(out + row * K + k) = o[0];
        *reinterpret_cast<uint4 *>(out + row * K + k + 8) = o[1];
    }
}


/*
 * grid-stride over count * (K / 8) * nthr items, nthr = Ntot / 8 (AWQ:
 * 8 k x 8 columns each) or Ntot (GPTQ: 8 k x 1 column), the column index
 * fastest (coalesced weight reads).
 */
template <int FMT>
__global__ void
kernel_dequant_q4(const int32_t *qweight, const int32_t *qzeros,
    const uint16_t *scales, const int32_t *g_idx, int G, int zero_bias,
    int Ntot, int K, int count, bf16 *out)
{
    const int     nthr = FMT == MOE_K_Q4_AWQ ? Ntot / 8 : Ntot;
    const int     KG = (K + G - 1) / G;
    const int64_t total = (int64_t) count * (K / 8) * nthr;

    for (int64_t i = (int64_t) blockIdx.x * blockDim.x + threadIdx.x;
         i < total; i += (int64_t) gridDim.x * blockDim.x)
    {
        int     c = (int) (i % nthr);
        int64_t rest = i / nthr;
        int     kb = (int) (rest % (K / 8)), e = (int) (rest / (K / 8));

        if (FMT == MOE_K_Q4_AWQ) {
            uint32_t q[8];
            float    s[8], z[8];
            int      g = 8 * kb / G;

#pragma unroll
            for (int u = 0; u < 8; u++) {
                q[u] = (uint32_t) __ldcs(
                    qweight + ((size_t) e * K + 8 * kb + u) * (Ntot / 8) + c);
            }
#pragma unroll
            for (int cc = 0; cc < 8; cc++) {
                uint4 o;
                bf16 *ob = reinterpret_cast<bf16 *>(&o);

                q4_sz(FMT, qzeros, scales, e, KG, g, 8 * c + cc, Ntot,
                      zero_bias, &s[cc], &z[cc]);
#pragma unroll
                for (int u = 0; u < 8; u++) {
                    ob[u] = moe_f2bf(((float) ((q[u] >> (4 * q4_awq_pos[cc]))
                                               & 15u) - z[cc]) * s[cc]);
                }
                *reinterpret_cast<uint4 *>(
                    out + ((size_t) e * Ntot + 8 * c + cc) * K + 8 * kb) = o;
            }
        } else {
            uint32_t q = (uint32_t) __ldcs(
                qweight + ((size_t) e * (K / 8) + kb) * Ntot + c);
            uint4    o;
            bf16    *ob = reinterpret_cast<bf16 *>(&o);

#pragma unroll
            for (int b = 0; b < 8; b++) {
                int   k = 8 * kb + b;
                int   g = g_idx != NULL ? g_idx[(size_t) e * K + k] : k / G;
                float s, z;

                q4_sz(FMT, qzeros, scales, e, KG, g, c, Ntot, zero_bias, &s,
                      &z);
                ob[b] = moe_f2bf(((float) ((q >> (4 * b)) & 15u) - z) * s);
            }
            *reinterpret_cast<uint4 *>(
                out + ((size_t) e * Ntot + c) * K + 8 * kb) = o;
        }
    }
}


/* Groups the grid covers (compact when n < E). */
static int
q_groups(const int32_t *offs, int E, int n)
{
    return offs != NULL && n < E ? n : E;
}


extern "C" int
moe_cuda_qgemv_fp8(const moe_bf16_t *X, int ldx, const int32_t *xrow,
    int xdiv, const uint8_t *W, const float *scale, int mode, int stacked,
    int Ntot, int K, const int32_t *offs, int E, int n, float *Y, int ldy,
    cudaStream_t stream)
{
    dim3 grid;

    if (n <= 0 || Ntot <= 0) {
        return MOE_K_OK;
    }
    if (K <= 0 || K % 16 != 0 || ldx % 8 != 0 || E <= 0 || mode < 0
        || mode > MOE_K_FP8_BLOCK || (offs == NULL && E != 1)
        || ((uintptr_t) X & 15u) != 0 || ((uintptr_t) W & 15u) != 0)
    {
        moe_cuda_set_error("qgemv_fp8: unsupported shape (N %d, K %d, ldx "
                           "%d, E %d, mode %d)", Ntot, K, ldx, E, mode);
        return MOE_K_EUNSUPPORTED;
    }
    grid = dim3((unsigned) ((Ntot + QF_WARPS - 1) / QF_WARPS),
                (unsigned) q_groups(offs, E, n));
    kernel_qgemv_fp8<<<grid, QF_WARPS * 32, 0, stream>>>(
        reinterpret_cast<const bf16 *>(X), ldx, xrow, xdiv, W, scale, mode,
        stacked, Ntot, K, offs, E, n, Y, ldy);
    MOE_CUDA_CHECK_LAUNCH("kernel_qgemv_fp8");
    return MOE_K_OK;
}


/* Shapes every 4-bit launcher needs. */
static int
q4_check(const char *who, int fmt, int G, int Ntot, int K)
{
    if ((fmt != MOE_K_Q4_AWQ && fmt != MOE_K_Q4_GPTQ) || Ntot <= 0
        || Ntot % 8 != 0 || K <= 0 || K % 8 != 0 || G <= 0 || G % 8 != 0)
    {
        moe_cuda_set_error("%s: unsupported shape (format %d, N %d, K %d, "
                           "group %d)", who, fmt, Ntot, K, G);
        return MOE_K_EUNSUPPORTED;
    }
    return MOE_K_OK;
}


/* One launch of kernel_qgemv_q4_mma: grid (tiles, groups, S), cluster of
 * the S blocks along z; H non-NULL: SiLU fused (MR 2, ldy H's). */
template <int FMT, int NT, int WC, int QU>
static int
q4m_launch(int tiles, int ng, int S, const bf16 *X, int ldx,
    const int32_t *xrow, int xdiv, const int32_t *qweight,
    const int32_t *qzeros, const uint16_t *scales, int G, int zero_bias,
    int Ntot, int K, int nu, int pf, const int32_t *offs, int E, int n,
    float *Y, bf16 *H, int ldy, cudaStream_t stream)
{
    cudaLaunchConfig_t  cfg = {};
    cudaLaunchAttribute at[1] = {};

    cfg.gridDim = dim3((unsigned) tiles, (unsigned) ng, (unsigned) S);
    cfg.blockDim = dim3(QM_WARPS * 32);
    cfg.dynamicSmemBytes = 0;
    cfg.stream = stream;
    at[0].id = cudaLaunchAttributeClusterDimension;
    at[0].val.clusterDim.x = 1;
    at[0].val.clusterDim.y = 1;
    at[0].val.clusterDim.z = (unsigned) S;
    cfg.attrs = at;
    cfg.numAttrs = 1;
    if (H != NULL) {
        MOE_CUDA_CHECK(cudaLaunchKernelEx(
            &cfg, kernel_qgemv_q4_mma<FMT, NT, WC, QU, 2>, X, ldx, xrow,
            xdiv, qweight, qzeros, scales, G, zero_bias, Ntot, K, nu, pf,
            offs, E, n, Y, H, ldy));
    } else {
        MOE_CUDA_CHECK(cudaLaunchKernelEx(
            &cfg, kernel_qgemv_q4_mma<FMT, NT, WC, QU, 1>, X, ldx, xrow,
            xdiv, qweight, qzeros, scales, G, zero_bias, Ntot, K, nu, pf,
            offs, E, n, Y, H, ldy));
    }
    return MOE_K_OK;
}


/*
 * Blocks per cluster (K splits) for `blocks` column-tile x group blocks
 * of `it` iterations each: the grid runs in waves of 2 blocks per SM
 * (__launch_bounds__), and a last wave that is mostly empty leaves SMs
 * idle, so the smallest S <= QM_SMAX whose waves are >= 90 % full (each
 * warp keeping at least one iteration), else the fullest.
 */
static int
q4m_split(int blocks, int it)
{
    int    slots = 2 * q_sms(), best = 1, S;
    double fill, best_fill = 0.0;

    for (S = 1; S <= QM_SMAX && (S == 1 || S * QM_WARPS <= it); S++) {
        int64_t b = (int64_t) blocks * S;
        int64_t waves = (b + slots - 1) / slots;

        fill = (double) b / (double) (waves * slots);
        if (fill >= 0.9) {
            return S;
        }
        if (fill > best_fill + 1e-9) {
            best_fill = fill;
            best = S;
        }
    }
    return best;
}


/*
 * The tensor-core 4-bit GEMV (kernel_qgemv_q4_mma) when the shapes allow
 * it: no g_idx, G a multiple of a round (GPTQ 32 k, AWQ 16 k), aligned
 * tensors.  Returns 1 when it does not apply (the caller takes the
 * atomic kernel), else a MOE_K_* status.  Tile by rows per group (mr):
 * GPTQ 8, 16 or 32 rows per pass; AWQ 8 rows (2 words per lane) or 16
 * (1 word per lane).  S: blocks per cluster (q4m_split, or S_force
 * when 1..QM_SMAX); pf: iterations prefetched ahead (QM_PF ships;
 * bench/dev/quant_gemv sets both).  H non-NULL: SiLU fused, H (n, Ntot
 * / 2) bf16 with leading dimension ldy (needs Ntot % 16 == 0).
 */
static int
q4m_try(int fmt, const bf16 *X, int ldx, const int32_t *xrow, int xdiv,
    const int32_t *qweight, const int32_t *qzeros, const uint16_t *scales,
    const int32_t *g_idx, int G, int zero_bias, int Ntot, int K,
    const int32_t *offs, int E, int n, int mr, int S_force, int pf,
    float *Y, bf16 *H, int ldy, cudaStream_t stream)
{
    int Nh = H != NULL ? Ntot / 2 : Ntot, Nw = Nh / 8;
    int ng = q_groups(offs, E, n);
    int nt, wc = 1, qu, round, tiles, nu, it, S;

    if ((fmt == MOE_K_Q4_GPTQ && g_idx != NULL)
        || (H != NULL && Ntot % 16 != 0)
        || ((uintptr_t) X & 15u) != 0 || ((uintptr_t) qweight & 15u) != 0
        || ((uintptr_t) scales & 15u) != 0
        || ((uintptr_t) qzeros & 3u) != 0)
    {
        return 1;
    }
    if (fmt == MOE_K_Q4_GPTQ) {
        nt = mr <= 8 ? 1 : mr <= 16 ? 2 : 4;
        qu = nt == 4 ? 2 : 4;
        round = 32;
        tiles = (Nh + 31) / 32;
    } else {
        nt = mr <= 8 && Nw % 2 == 0 ? 1 : 2;
        wc = nt == 1 ? 2 : 1;
        qu = nt == 1 ? 2 : 4;
        round = 16;
        tiles = (Nw + 8 * wc - 1) / (8 * wc);
    }
    if (G % round != 0) {
        return 1;
    }
    for (nu = qu; nu > 1 && G % (round * nu) != 0; nu /= 2) {
        /* an iteration stays inside one quantization group */
    }
    it = (K + round * nu - 1) / (round * nu);
    S = S_force > 0 && S_force <= QM_SMAX ? S_force : q4m_split(tiles * ng,
                                                                it);

#define Q4M_ARGS  tiles, ng, S, X, ldx, xrow, xdiv, qweight, qzeros, scales, \
                  G, zero_bias, Ntot, K, nu, pf, offs, E, n, Y, H, ldy, \
                  stream
    if (fmt == MOE_K_Q4_GPTQ) {
        if (nt == 1) {
            return q4m_launch<MOE_K_Q4_GPTQ, 1, 1, 4>(Q4M_ARGS);
        }
        if (nt == 2) {
            return q4m_launch<MOE_K_Q4_GPTQ, 2, 1, 4>(Q4M_ARGS);
        }
        return q4m_launch<MOE_K_Q4_GPTQ, 4, 1, 2>(Q4M_ARGS);
    }
    if (nt == 1) {
        return q4m_launch<MOE_K_Q4_AWQ, 1, 2, 2>(Q4M_ARGS);
    }
    return q4m_launch<MOE_K_Q4_AWQ, 2, 1, 4>(Q4M_ARGS);
#undef Q4M_ARGS
}


/* Shared memory of kernel_qgemv_q4_fma: the copy ring, the inputs
 * (kmax k of NR rows, fp32), GPTQ's sums of 8 inputs, the block sums. */
static size_t
q4s_smem(int fmt, int nr, int mr, int kmax)
{
    int tn = fmt == MOE_K_Q4_GPTQ ? q4s_fmt<MOE_K_Q4_GPTQ, 1>::TN
                                  : q4s_fmt<MOE_K_Q4_AWQ, 1>::TN;

    return (size_t) Q4S_RING * Q4S_WARPS * 32
           + (size_t) nr * kmax * 4
           + (fmt == MOE_K_Q4_GPTQ ? (size_t) nr * (kmax / 8) * 4 : 0)
           + (size_t) mr * tn * nr * 4;
}


/* One launch of kernel_qgemv_q4_fma<FMT, NR, MR>: grid (tiles, groups,
 * S), cluster of the S blocks along z.  bps_out non-NULL: only report
 * the resident blocks per SM at the largest shared memory (no launch). */
template <int FMT, int NR, int MR>
static int
q4s_launch(int tiles, int ng, int S, int kmax, const bf16 *X, int ldx,
    const int32_t *xrow, int xdiv, const int32_t *qweight,
    const int32_t *qzeros, const uint16_t *scales, int G, int zero_bias,
    int Ntot, int K, const int32_t *offs, int E, int n, float *Y, bf16 *H,
    int ldy, int *bps_out, cudaStream_t stream)
{
    static int          ready = 0, bps = 1;
    const size_t        smax = q4s_smem(FMT, NR, MR, Q4S_KMAX);
    cudaLaunchConfig_t  cfg = {};
    cudaLaunchAttribute at[1] = {};

    if (!ready) {
        MOE_CUDA_CHECK(cudaFuncSetAttribute(
            kernel_qgemv_q4_fma<FMT, NR, MR>,
            cudaFuncAttributeMaxDynamicSharedMemorySize, (int) smax));
        MOE_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(
            &bps, kernel_qgemv_q4_fma<FMT, NR, MR>, Q4S_WARPS * 32, smax));
        if (bps < 1) {
            bps = 1;
        }
        ready = 1;
    }
    if (bps_out != NULL) {
        *bps_out = bps;
        return MOE_K_OK;
    }
    cfg.gridDim = dim3((unsigned) tiles, (unsigned) ng, (unsigned) S);
    cfg.blockDim = dim3(Q4S_WARPS * 32);
    cfg.dynamicSmemBytes = q4s_smem(FMT, NR, MR, kmax);
    cfg.stream = stream;
    at[0].id = cudaLaunchAttributeClusterDimension;
    at[0].val.clusterDim.x = 1;
    at[0].val.clusterDim.y = 1;
    at[0].val.clusterDim.z = (unsigned) S;
    cfg.attrs = at;
    cfg.numAttrs = 1;
    MOE_CUDA_CHECK(cudaLaunchKernelEx(
        &cfg, kernel_qgemv_q4_fma<FMT, NR, MR>, X, ldx, xrow, xdiv, qweight,
        qzeros, scales, G, zero_bias, Ntot, K, kmax, offs, E, n, Y, H, ldy));
    return MOE_K_OK;
}


/*
 * The CUDA-core 4-bit GEMV (kernel_qgemv_q4_fma) for groups of up to
 * Q4S_MAXR rows (mr: the rows hint), when the shapes allow it: no g_idx,
 * G % 32 == 0, AWQ Ntot a multiple of 16 per half (8-byte word pairs),
 * K <= Q4S_SMAX * Q4S_KMAX, 16-byte aligned X, qweight and scales,
 * 8-byte aligned qzeros.  Returns 1 when it does not apply, else a
 * MOE_K_* status.  S: blocks per cluster (K splits): the smallest that
 * keeps each block's inputs within Q4S_KMAX k and fills the waves of
 * resident blocks to >= 90 % (as q4m_split), or S_force when 1..8 (the
 * dev harness; raised to the inputs' minimum).  H non-NULL: SiLU fused
 * (H (n, Ntot / 2) bf16 with leading dimension ldy).
 */
static int
q4s_try(int fmt, const bf16 *X, int ldx, const int32_t *xrow, int xdiv,
    const int32_t *qweight, const int32_t *qzeros, const uint16_t *scales,
    const int32_t *g_idx, int G, int zero_bias, int Ntot, int K,
    const int32_t *offs, int E, int n, int mr, int S_force, float *Y,
    bf16 *H, int ldy, cudaStream_t stream)
{
    const int mrr = H != NULL ? 2 : 1;
    const int Nh = Ntot / mrr;
    const int ng = q_groups(offs, E, n);
    const int nr = mr <= 1 ? 1 : 2;
    int       tn, UB, smin, S, bps = 1, tiles, kmax;

    if (mr > Q4S_MAXR || (fmt == MOE_K_Q4_GPTQ && g_idx != NULL)
        || G % 32 != 0 || Ntot % (8 * mrr) != 0
        || (fmt == MOE_K_Q4_AWQ && nr == 1 && Nh % 16 != 0)
        || (xrow != NULL && xdiv <= 0)
        || ((uintptr_t) X & 15u) != 0 || ((uintptr_t) qweight & 15u) != 0
        || ((uintptr_t) scales & 15u) != 0
        || ((uintptr_t) qzeros & 7u) != 0)
    {
        return 1;
    }
    UB = (K + 31) / 32;
    smin = (UB + Q4S_KMAX / 32 - 1) / (Q4S_KMAX / 32);
    if (smin > Q4S_SMAX) {
        return 1;
    }
    tn = fmt == MOE_K_Q4_GPTQ ? q4s_fmt<MOE_K_Q4_GPTQ, 1>::TN
                              : q4s_fmt<MOE_K_Q4_AWQ, 1>::TN;
    tiles = (Nh + tn - 1) / tn;

#define Q4S_ARGS(b)  tiles, ng, S, kmax, X, ldx, xrow, xdiv, qweight, \
                     qzeros, scales, G, zero_bias, Ntot, K, offs, E, n, Y, \
                     H, ldy, b, stream
#define Q4S_PICK(b)                                                          \
    (fmt == MOE_K_Q4_GPTQ                                                    \
     ? (nr == 1                                                              \
        ? (mrr == 1 ? q4s_launch<MOE_K_Q4_GPTQ, 1, 1>(Q4S_ARGS(b))           \
                    : q4s_launch<MOE_K_Q4_GPTQ, 1, 2>(Q4S_ARGS(b)))          \
        : (mrr == 1 ? q4s_launch<MOE_K_Q4_GPTQ, 2, 1>(Q4S_ARGS(b))           \
                    : q4s_launch<MOE_K_Q4_GPTQ, 2, 2>(Q4S_ARGS(b))))         \
     : (nr == 1                                                              \
        ? (mrr == 1 ? q4s_launch<MOE_K_Q4_AWQ, 1, 1>(Q4S_ARGS(b))            \
                    : q4s_launch<MOE_K_Q4_AWQ, 1, 2>(Q4S_ARGS(b)))           \
        : (mrr == 1 ? q4s_launch<MOE_K_Q4_AWQ, 2, 1>(Q4S_ARGS(b))            \
                    : q4s_launch<MOE_K_Q4_AWQ, 2, 2>(Q4S_ARGS(b)))))

    S = 1;
    kmax = 32;
    MOE_TRY(Q4S_PICK(&bps));
    if (S_force >= 1 && S_force <= Q4S_SMAX) {
        S = S_force < smin ? smin : S_force;
    } else {
        int    slots = bps * q_sms(), best = smin;
        double best_fill = 0.0;

        for (S = smin; S <= Q4S_SMAX && (S == smin || S <= UB); S++) {
            int64_t b = (int64_t) tiles * ng * S;
            int64_t waves = (b + slots - 1) / slots;
            double  fill = (double) b / (double) (waves * slots);

            if (fill >= 0.9) {
                best = S;
                break;
            }
            if (fill > best_fill + 1e-9) {
                best_fill = fill;
                best = S;
            }
        }
        S = best;
    }
    if (S > UB) {
        S = UB;
    }
    kmax = (UB + S - 1) / S * 32;
    return Q4S_PICK(NULL);
#undef Q4S_PICK
#undef Q4S_ARGS
}


extern "C" int
moe_cuda_qgemv_q4(int fmt, const moe_bf16_t *X, int ldx,
    const int32_t *xrow, int xdiv, const int32_t *qweight,
    const int32_t *qzeros, const uint16_t *scales, const int32_t *g_idx,
    int G, int zero_bias, int Ntot, int K, const int32_t *offs, int E, int n,
    float *Y, int ldy, cudaStream_t stream)
{
    return moe_cuda_qgemv_q4_rows(fmt, X, ldx, xrow, xdiv, qweight, qzeros,
                                  scales, g_idx, G, zero_bias, Ntot, K, offs,
                                  E, n, 0, Y, ldy, stream);
}


extern "C" int
moe_cuda_qgemv_q4_rows(int fmt, const moe_bf16_t *X, int ldx,
    const int32_t *xrow, int xdiv, const int32_t *qweight,
    const int32_t *qzeros, const uint16_t *scales, const int32_t *g_idx,
    int G, int zero_bias, int Ntot, int K, const int32_t *offs, int E, int n,
    int max_rows, float *Y, int ldy, cudaStream_t stream)
{
    int  nthr, gx, ng, ks, KC, rc, mr;
    dim3 grid;

    if (n <= 0) {
        return MOE_K_OK;
    }
    MOE_TRY(q4_check("qgemv_q4", fmt, G, Ntot, K));
    if (ldx % 8 != 0 || E <= 0 || (offs == NULL && E != 1)) {
        moe_cuda_set_error("qgemv_q4: unsupported ldx %d / E %d", ldx, E);
        return MOE_K_EUNSUPPORTED;
    }
    ng = q_groups(offs, E, n);
    mr = max_rows > 0 ? max_rows : (n + ng - 1) / ng;
    /* 1..Q4S_MAXR rows per group: CUDA cores; more: tensor cores */
    rc = q4s_try(fmt, reinterpret_cast<const bf16 *>(X), ldx, xrow, xdiv,
                 qweight, qzeros, scales, g_idx, G,
                 fmt == MOE_K_Q4_AWQ ? 0 : zero_bias, Ntot, K, offs, E, n,
                 mr, 0, Y, NULL, ldy, stream);
    if (rc != 1) {
        return rc;
    }
    rc = q4m_try(fmt, reinterpret_cast<const bf16 *>(X), ldx, xrow, xdiv,
                 qweight, qzeros, scales, g_idx, G,
                 fmt == MOE_K_Q4_AWQ ? 0 : zero_bias, Ntot, K, offs, E, n,
                 mr, 0, QM_PF, Y, NULL, ldy, stream);
    if (rc != 1) {
        return rc;
    }

    /* the CUDA-core kernel (GPTQ with g_idx, odd group sizes): K split
     * over blocks that add into Y with atomics */
    nthr = fmt == MOE_K_Q4_AWQ ? Ntot / 8 : Ntot;
    gx = (nthr + Q4_NT - 1) / Q4_NT;
    /* K splits: about 4 blocks per SM over the grid, whole 8-k words,
     * at most Q4_KC_MAX k per block (the staged input rows) */
    ks = (4 * q_sms() + gx * ng - 1) / (gx * ng);
    if (ks > K / 8) {
        ks = K / 8;
    }
    if (ks < (K + Q4_KC_MAX - 1) / Q4_KC_MAX) {
        ks = (K + Q4_KC_MAX - 1) / Q4_KC_MAX;
    }
    KC = ((K + ks - 1) / ks + 7) / 8 * 8;
    ks = (K + KC - 1) / KC;
    grid = dim3((unsigned) gx, (unsigned) ng, (unsigned) ks);
    MOE_CUDA_CHECK(cudaMemset2DAsync(Y, (size_t) ldy * sizeof(float), 0,
                                     (size_t) Ntot * sizeof(float),
                                     (size_t) n, stream));
    if (fmt == MOE_K_Q4_AWQ) {
        kernel_qgemv_q4<MOE_K_Q4_AWQ><<<grid, Q4_NT, 0, stream>>>(
            reinterpret_cast<const bf16 *>(X), ldx, xrow, xdiv, qweight,
            qzeros, scales, NULL, G, 0, Ntot, K, KC, offs, E, n, Y, ldy);
    } else {
        kernel_qgemv_q4<MOE_K_Q4_GPTQ><<<grid, Q4_NT, 0, stream>>>(
            reinterpret_cast<const bf16 *>(X), ldx, xrow, xdiv, qweight,
            qzeros, scales, g_idx, G, zero_bias, Ntot, K, KC, offs, E, n, Y,
            ldy);
    }
    MOE_CUDA_CHECK_LAUNCH("kernel_qgemv_q4");
    return MOE_K_OK;
}


extern "C" int
moe_cuda_qgemv_q4_silu(int fmt, const moe_bf16_t *X, int ldx,
    const int32_t *xrow, int xdiv, const int32_t *qweight,
    const int32_t *qzeros, const uint16_t *scales, const int32_t *g_idx,
    int G, int zero_bias, int Ntot, int K, const int32_t *offs, int E, int n,
    int max_rows, float *Y, moe_bf16_t *H, cudaStream_t stream)
{
    int ng, mr, rc;

    if (n <= 0) {
        return MOE_K_OK;
    }
    MOE_TRY(q4_check("qgemv_q4_silu", fmt, G, Ntot, K));
    if (ldx % 8 != 0 || E <= 0 || (offs == NULL && E != 1) || H == NULL
        || Ntot % 16 != 0)
    {
        moe_cuda_set_error("qgemv_q4_silu: unsupported ldx %d / E %d / "
                           "N %d (a multiple of 16) / H %p", ldx, E, Ntot,
                           (void *) H);
        return MOE_K_EUNSUPPORTED;
    }
    ng = q_groups(offs, E, n);
    mr = max_rows > 0 ? max_rows : (n + ng - 1) / ng;
    rc = q4s_try(fmt, reinterpret_cast<const bf16 *>(X), ldx, xrow, xdiv,
                 qweight, qzeros, scales, g_idx, G,
                 fmt == MOE_K_Q4_AWQ ? 0 : zero_bias, Ntot, K, offs, E, n,
                 mr, 0, NULL, reinterpret_cast<bf16 *>(H), Ntot / 2,
                 stream);
    if (rc != 1) {
        return rc;
    }
    rc = q4m_try(fmt, reinterpret_cast<const bf16 *>(X), ldx, xrow, xdiv,
                 qweight, qzeros, scales, g_idx, G,
                 fmt == MOE_K_Q4_AWQ ? 0 : zero_bias, Ntot, K, offs, E, n,
                 mr, 0, QM_PF, NULL, reinterpret_cast<bf16 *>(H), Ntot / 2,
                 stream);
    if (rc != 1) {
        return rc;
    }
    /* no tensor-core path (g_idx, odd groups): fp32 Y, then SiLU */
    if (Y == NULL) {
        moe_cuda_set_error("qgemv_q4_silu: this shape needs the fp32 "
                           "scratch Y (g_idx or group %d)", G);
        return MOE_K_EUNSUPPORTED;
    }
    MOE_TRY(moe_cuda_qgemv_q4_rows(fmt, X, ldx, xrow, xdiv, qweight, qzeros,
                                   scales, g_idx, G, zero_bias, Ntot, K,
                                   offs, E, n, max_rows, Y, Ntot, stream));
    return moe_cuda_silu_mul(Y, n, Ntot / 2, H, stream);
}


extern "C" int
moe_cuda_dequant_fp8(const uint8_t *W, const float *scale, int mode,
    int stacked, int rows, int K, int count, moe_bf16_t *out,
    cudaStream_t stream)
{
    int64_t total = (int64_t) count * rows * (K / 16);

    if (total <= 0) {
        return MOE_K_OK;
    }
    if (K % 16 != 0 || mode < 0 || mode > MOE_K_FP8_BLOCK) {
        moe_cuda_set_error("dequant_fp8: unsupported K %d / mode %d", K,
                           mode);
        return MOE_K_EUNSUPPORTED;
    }
    kernel_dequant_fp8<<<moe_grid(total, 256), 256, 0, stream>>>(
        W, scale, mode, stacked, rows, K, count,
        reinterpret_cast<bf16 *>(out));
    MOE_CUDA_CHECK_LAUNCH("kernel_dequant_fp8");
    return MOE_K_OK;
}


extern "C" int
moe_cuda_dequant_q4(int fmt, const int32_t *qweight,
    const int32_t *qzeros, const uint16_t *scales, const int32_t *g_idx,
    int G, int zero_bias, int Ntot, int K, int count, moe_bf16_t *out,
    cudaStream_t stream)
{
    int64_t total;

    MOE_TRY(q4_check("dequant_q4", fmt, G, Ntot, K));
    total = (int64_t) count * (K / 8)
            * (fmt == MOE_K_Q4_AWQ ? Ntot / 8 : Ntot);
    if (total <= 0) {
        return MOE_K_OK;
    }
    if (fmt == MOE_K_Q4_AWQ) {
        kernel_dequant_q4<MOE_K_Q4_AWQ><<<moe_grid(total, 256), 256, 0,
                                          stream>>>(
            qweight, qzeros, scales, NULL, G, 0, Ntot, K, count,
            reinterpret_cast<bf16 *>(out));
    } else {
        kernel_dequant_q4<MOE_K_Q4_GPTQ><<<moe_grid(total, 256), 256, 0,
                                           stream>>>(
            qweight, qzeros, scales, g_idx, G, zero_bias, Ntot, K, count,
            reinterpret_cast<bf16 *>(out));
    }
    MOE_CUDA_CHECK_LAUNCH("kernel_dequant_q4");
    return MOE_K_OK;
}
