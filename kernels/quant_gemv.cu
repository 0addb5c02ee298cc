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
 * multiple of a round (the checkpoints' case); deterministic; its warps
 * per block and register budget chosen by the grid (q4m_auto).  (A CUDA-
 * core kernel for 1-2 rows per pass measured slower and lives in the dev
 * harness, bench/dev/q4_fma.cuh.)
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
#include "quant_common.cuh"
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




/* grid (ceil(Ntot / QF_WARPS), groups), QF_WARPS warps */
__global__ void __launch_bounds__(QF_WARPS * 32)
kernel_qgemv_fp8(const bf16 *X, int ldx, const int32_t *xrow, int xdiv,
    const uint8_t *W, const float *scale, int mode, int stacked, int Ntot,
    int K, const int32_t *offs, int E, int n, float *Y, int ldy)
{
    moe_pdl_enter();
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
    moe_pdl_enter();
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
 * zeroing.  A warp can keep the weights of its next pf iterations on
 * their way into L2 (prefetch.global.L2); the first version shipped pf 8
 * (a warp's whole range on Mixtral shapes), but on the H200 every
 * distance 1-32 measured slower than none at 1, 2 and 16 rows per
 * expert (bench/dev/quant_gemv, 2026-12-02), so QM_PF is 0.
 */

#define QM_WARPS  8         /* q4 mma GEMV: warps per block (NW) */
#define QM_MINB   2         /* q4 mma GEMV: blocks per SM it is compiled
                               for (MINB: 128 registers at 8 warps) */
#define QM_SMAX   8         /* q4 mma GEMV: most blocks per cluster */
#define QM_PF     0         /* q4 mma GEMV: iterations prefetched ahead
                               into L2 (0: none; 1-32 measured slower on
                               the H200, bench/RESULTS.md 2026-12-02) */



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
                moe_prefetch_l2(qw + (size_t) wr * Ntot + cc);
            }
        } else {
            int k = 16 * (it * nu + u) + 4 * t;

            if (k < K) {
#pragma unroll
                for (int q = 0; q < 4; q++) {
                    moe_prefetch_l2(qw + (size_t) (k + q) * Nw + wc);
                }
            }
        }
    }
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
template <int FMT, int NT, int WC, int QU, int MR, int NW = QM_WARPS,
          int MINB = QM_MINB>
__global__ void __launch_bounds__(NW * 32, MINB)
kernel_qgemv_q4_mma(const bf16 *X, int ldx, const int32_t *xrow, int xdiv,
    const int32_t *qweight, const int32_t *qzeros, const uint16_t *scales,
    int G, int zero_bias, int Ntot, int K, int nu, int pf,
    const int32_t *offs, int E, int n, float *Y, bf16 *H, int ldy)
{
    moe_pdl_enter();
    constexpr int     MT = FMT == MOE_K_Q4_AWQ ? 4 * WC : 2;
    constexpr int     F = MT * NT * 4;       /* outputs per lane */
    __shared__ float  red[NW][F][32];
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
    const int         pw = (int) blockIdx.z * NW + warp;
    const int         it0 = (int) ((int64_t) IT * pw / (S * NW));
    const int         it1 = (int) ((int64_t) IT * (pw + 1) / (S * NW));
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
            q_warps_sum(red, F * 32);
            cl.sync();                          /* every rank's block sum */
            for (int idx = rank * NW * 32 + (int) threadIdx.x;
                 idx < F * 32; idx += S * NW * 32)
            {
                int   f = idx / 32, l = idx % 32, i = f % 4;
                int   nt = (f / 4) % NT, mt = f / (4 * NT);
                int   lg = l >> 2, lt = l & 3;
                int   row = p0 + 8 * nt + 2 * lt + (i & 1);
                int   col;

                if (FMT == MOE_K_Q4_AWQ) {
                    col = 8 * ((int) blockIdx.x * 8 * WC + WC * lg + mt / 4)
                          + 2 * (mt % 4) + (i >> 1);
                } else {
                    col = (int) blockIdx.x * 32 + 4 * lg + 2 * mt + (i >> 1);
                }
                const float v = q_ranks_sum<false>(cl, &red[0][0][0], idx,
                                                   0, S, NULL);

                if (row < r1 && col < Nh) {
                    if (MR == 1) {
                        Y[(size_t) row * ldy + col] = v;
                    } else if (half == 0) {
                        gs[idx] = v;
                    } else {
                        float gv = gs[idx];

                        H[(size_t) row * ldy + col] =
                            moe_f2bf(moe_silu_mul(gv, v));
                    }
                }
            }
            cl.sync();                      /* red free for the next pass */
        }
    }
}


/* grid-stride over count * rows * K / 16 chunks of 16 values */
__global__ void
kernel_dequant_fp8(const uint8_t *W, const float *scale, int mode,
    int stacked, int rows, int K, int count, bf16 *out)
{
    moe_pdl_enter();
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
    moe_pdl_enter();
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
    MOE_CUDA_CHECK(moe_launch(kernel_qgemv_fp8, grid, QF_WARPS * 32, 0, stream,
        reinterpret_cast<const bf16 *>(X), ldx, xrow, xdiv, W, scale, mode,
        stacked, Ntot, K, offs, E, n, Y, ldy));
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
template <int FMT, int NT, int WC, int QU, int NW, int MINB>
static int
q4m_launch(int tiles, int ng, int S, const bf16 *X, int ldx,
    const int32_t *xrow, int xdiv, const int32_t *qweight,
    const int32_t *qzeros, const uint16_t *scales, int G, int zero_bias,
    int Ntot, int K, int nu, int pf, const int32_t *offs, int E, int n,
    float *Y, bf16 *H, int ldy, cudaStream_t stream)
{
    cudaLaunchConfig_t  cfg = {};
    cudaLaunchAttribute at[2] = {};

    q_cluster_cfg(&cfg, at, tiles, ng, S, NW * 32, 0, stream);
    if (H != NULL) {
        MOE_CUDA_CHECK(cudaLaunchKernelEx(
            &cfg, kernel_qgemv_q4_mma<FMT, NT, WC, QU, 2, NW, MINB>, X, ldx,
            xrow,
            xdiv, qweight, qzeros, scales, G, zero_bias, Ntot, K, nu, pf,
            offs, E, n, Y, H, ldy));
    } else {
        MOE_CUDA_CHECK(cudaLaunchKernelEx(
            &cfg, kernel_qgemv_q4_mma<FMT, NT, WC, QU, 1, NW, MINB>, X, ldx,
            xrow,
            xdiv, qweight, qzeros, scales, G, zero_bias, Ntot, K, nu, pf,
            offs, E, n, Y, H, ldy));
    }
    return MOE_K_OK;
}


/*
 * Blocks per cluster (K splits) for `blocks` column-tile x group blocks
 * of `it` iterations each: 1 when the grid has about a block per SM (90
 * %), else the smallest power of two that gets there (each warp keeping
 * at least one iteration).  Every split adds a cluster reduction: on the
 * H200 (bench/dev/quant_gemv, 2026-12-02) S 1 was best or within 3 % at
 * every Mixtral shape with >= 256 blocks, and the batch-1 AWQ down
 * projection (64 blocks) was fastest at S 2 (52 us; S 1 95, S 4 60),
 * while the earlier rule (the smallest S filling the 2-per-SM waves to
 * 90 %) took S 4 for AWQ gate|up (98 us against 84 at S 1).
 */
static int
q4m_split(int blocks, int it, int nw)
{
    int64_t want = ((int64_t) moe_sm_count() * 9 + 9) / 10;
    int     S = 1;

    while (S < QM_SMAX && (int64_t) blocks * S < want
           && 2 * S * nw <= it)
    {
        S *= 2;
    }
    return S;
}


/*
 * The tile of kernel_qgemv_q4_mma for mr rows per group and Nh output
 * columns: n-tiles per pass (*nt), AWQ words per lane (*wc), rounds per
 * iteration at most (*qu), k per round (*round); returns the column
 * tiles.  GPTQ: 8, 16 or 32 rows per pass, tiles of 32 columns; AWQ: 8
 * rows (2 words per lane, when the words pair up) or 16 (1 word).
 */
static int
q4m_shape(int fmt, int mr, int Nh, int *nt, int *wc, int *qu, int *round)
{
    int Nw = Nh / 8;

    if (fmt == MOE_K_Q4_GPTQ) {
        *nt = mr <= 8 ? 1 : mr <= 16 ? 2 : 4;
        *wc = 1;
        *qu = *nt == 4 ? 2 : 4;
        *round = 32;
        return (Nh + 31) / 32;
    }
    *nt = mr <= 8 && Nw % 2 == 0 ? 1 : 2;
    *wc = *nt == 1 ? 2 : 1;
    *qu = *nt == 1 ? 2 : 4;
    *round = 16;
    return (Nw + 8 * *wc - 1) / (8 * *wc);
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
template <int NW = QM_WARPS, int MINB = QM_MINB>
static int
q4m_try(int fmt, const bf16 *X, int ldx, const int32_t *xrow, int xdiv,
    const int32_t *qweight, const int32_t *qzeros, const uint16_t *scales,
    const int32_t *g_idx, int G, int zero_bias, int Ntot, int K,
    const int32_t *offs, int E, int n, int mr, int S_force, int pf,
    float *Y, bf16 *H, int ldy, cudaStream_t stream)
{
    int Nh = H != NULL ? Ntot / 2 : Ntot;
    int ng = q_groups(offs, E, n);
    int nt, wc, qu, round, tiles, nu, it, S;

    if ((fmt == MOE_K_Q4_GPTQ && g_idx != NULL)
        || (H != NULL && Ntot % 16 != 0)
        || ((uintptr_t) X & 15u) != 0 || ((uintptr_t) qweight & 15u) != 0
        || ((uintptr_t) scales & 15u) != 0
        || ((uintptr_t) qzeros & 3u) != 0)
    {
        return 1;
    }
    tiles = q4m_shape(fmt, mr, Nh, &nt, &wc, &qu, &round);
    if (G % round != 0) {
        return 1;
    }
    for (nu = qu; nu > 1 && G % (round * nu) != 0; nu /= 2) {
        /* an iteration stays inside one quantization group */
    }
    it = (K + round * nu - 1) / (round * nu);
    S = S_force > 0 && S_force <= QM_SMAX ? S_force
                                          : q4m_split(tiles * ng, it, NW);

#define Q4M_ARGS  tiles, ng, S, X, ldx, xrow, xdiv, qweight, qzeros, scales, \
                  G, zero_bias, Ntot, K, nu, pf, offs, E, n, Y, H, ldy, \
                  stream
    if (fmt == MOE_K_Q4_GPTQ) {
        if (nt == 1) {
            return q4m_launch<MOE_K_Q4_GPTQ, 1, 1, 4, NW, MINB>(Q4M_ARGS);
        }
        if (nt == 2) {
            return q4m_launch<MOE_K_Q4_GPTQ, 2, 1, 4, NW, MINB>(Q4M_ARGS);
        }
        return q4m_launch<MOE_K_Q4_GPTQ, 4, 1, 2, NW, MINB>(Q4M_ARGS);
    }
    if (nt == 1) {
        return q4m_launch<MOE_K_Q4_AWQ, 1, 2, 2, NW, MINB>(Q4M_ARGS);
    }
    return q4m_launch<MOE_K_Q4_AWQ, 2, 1, 4, NW, MINB>(Q4M_ARGS);
#undef Q4M_ARGS
}


/*
 * q4m_try with the block shape for the grid: warps per block x blocks per
 * SM it is compiled for (registers).  At 8 rows per pass (decode), from
 * bench/dev/quant_gemv on the H200 (2026-12-02, mixtral expert shapes, 1
 * and 2 rows per expert; kernels/NOTES.md): GPTQ grids of >= 4 blocks
 * per SM at 4 warps x 6 (gate|up 1 row 62.0 us against 78.1 with 8 x 2,
 * 2 rows 220.9 against 290.8; down 2 rows 118.4 against 125.4), smaller
 * ones keep 8 x 2 (down 1 row 34.5; 4 x 6: 47.2); AWQ grids of >= 2
 * blocks per SM at 4 x 4 (gate|up 80.1 against 87.2, 2 rows 264.1
 * against 276.9), smaller ones with a long K at 16 x 1 (down, K 14336: 1
 * row 37.8 against 51.5, 2 rows 132.2 against 135.0); the dense q|k|v and
 * o (K 4096, 48 and 32 blocks) keep 8 x 2 (13.1 / 12.9 us; 16 x 1: 17.2 /
 * 16.6).  16 and 32 rows per pass (batch 64): grids
 * of >= 4 blocks per SM at 4 x 4 (GPTQ gate|up 16 rows 322.8 against
 * 377.0, 32 rows 538.1 against 593.4, down 155.9 / 262.7 against 164.2 /
 * 267.9; AWQ gate|up 321.2 / 636.6 against 347.8 / 687.5); smaller
 * grids keep 8 x 2: the AWQ down projection (512 blocks: 156.8 / 309.7
 * against 160.4 / 318.8 at 4 x 4) and the dense projections.
 */
static int
q4m_auto(int fmt, const bf16 *X, int ldx, const int32_t *xrow, int xdiv,
    const int32_t *qweight, const int32_t *qzeros, const uint16_t *scales,
    const int32_t *g_idx, int G, int zero_bias, int Ntot, int K,
    const int32_t *offs, int E, int n, int mr, float *Y, bf16 *H, int ldy,
    cudaStream_t stream)
{
    int     nt, wc, qu, round;
    int64_t blocks = (int64_t) q4m_shape(fmt, mr, H != NULL ? Ntot / 2
                                                            : Ntot,
                                         &nt, &wc, &qu, &round)
                     * q_groups(offs, E, n);
    int64_t sms = moe_sm_count();

#define Q4M_AUTO_ARGS  fmt, X, ldx, xrow, xdiv, qweight, qzeros, scales,    \
                       g_idx, G, zero_bias, Ntot, K, offs, E, n, mr, 0,     \
                       QM_PF, Y, H, ldy, stream
    if (nt == 1 && fmt == MOE_K_Q4_GPTQ && blocks >= 4 * sms) {
        return q4m_try<4, 6>(Q4M_AUTO_ARGS);
    }
    if (nt == 1 && fmt == MOE_K_Q4_AWQ && blocks >= 2 * sms) {
        return q4m_try<4, 4>(Q4M_AUTO_ARGS);
    }
    if (nt == 1 && fmt == MOE_K_Q4_AWQ && K >= 8192) {
        return q4m_try<16, 1>(Q4M_AUTO_ARGS);
    }
    if (nt > 1 && blocks >= 4 * sms) {
        return q4m_try<4, 4>(Q4M_AUTO_ARGS);
    }
    return q4m_try(Q4M_AUTO_ARGS);
#undef Q4M_AUTO_ARGS
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
    rc = q4m_auto(fmt, reinterpret_cast<const bf16 *>(X), ldx, xrow, xdiv,
                  qweight, qzeros, scales, g_idx, G,
                  fmt == MOE_K_Q4_AWQ ? 0 : zero_bias, Ntot, K, offs, E, n,
                  mr, Y, NULL, ldy, stream);
    if (rc != 1) {
        return rc;
    }

    /* the CUDA-core kernel (GPTQ with g_idx, odd group sizes): K split
     * over blocks that add into Y with atomics */
    nthr = fmt == MOE_K_Q4_AWQ ? Ntot / 8 : Ntot;
    gx = (nthr + Q4_NT - 1) / Q4_NT;
    /* K splits: about 4 blocks per SM over the grid, whole 8-k words,
     * at most Q4_KC_MAX k per block (the staged input rows) */
    ks = (4 * moe_sm_count() + gx * ng - 1) / (gx * ng);
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
        MOE_CUDA_CHECK(moe_launch(kernel_qgemv_q4<MOE_K_Q4_AWQ>, grid, Q4_NT,
            0, stream, reinterpret_cast<const bf16 *>(X), ldx, xrow, xdiv,
            qweight, qzeros, scales, nullptr, G, 0, Ntot, K, KC, offs, E, n, Y,
            ldy));
    } else {
        MOE_CUDA_CHECK(moe_launch(kernel_qgemv_q4<MOE_K_Q4_GPTQ>, grid, Q4_NT,
            0, stream, reinterpret_cast<const bf16 *>(X), ldx, xrow, xdiv,
            qweight, qzeros, scales, g_idx, G, zero_bias, Ntot, K, KC, offs, E,
            n, Y, ldy));
    }
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
    rc = q4m_auto(fmt, reinterpret_cast<const bf16 *>(X), ldx, xrow, xdiv,
                  qweight, qzeros, scales, g_idx, G,
                  fmt == MOE_K_Q4_AWQ ? 0 : zero_bias, Ntot, K, offs, E, n,
                  mr, NULL, reinterpret_cast<bf16 *>(H), Ntot / 2, stream);
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


/* One AWQ matrix's qweight (K, N / 8) -> GPTQ's (K / 8, N) in dst (a
 * thread per output word: k = 8 i + b at bits 4 b of column j), and its
 * qzeros (KG, N / 8) re-ordered in place (column 8 w + b at bits 4 b;
 * a thread per word, read then written by the same thread). */
__global__ void
kernel_q4_awq_to_gptq(const uint32_t *src, uint32_t *dst, uint32_t *zeros,
    int Ntot, int K, int KG)
{
    moe_pdl_enter();
    const int64_t nw = (int64_t) (K / 8) * Ntot, nz = (int64_t) KG * (Ntot / 8);

    for (int64_t i = (int64_t) blockIdx.x * blockDim.x + threadIdx.x;
         i < nw + nz; i += (int64_t) gridDim.x * blockDim.x)
    {
        if (i < nw) {
            const int j = (int) (i % Ntot), kb = (int) (i / Ntot);
            const int sh = 4 * q4_awq_pos[j & 7];
            uint32_t  w = 0;

#pragma unroll
            for (int b = 0; b < 8; b++) {
                uint32_t q = src[(size_t) (8 * kb + b) * (Ntot / 8) + j / 8];

                w |= ((q >> sh) & 15u) << (4 * b);
            }
            dst[i] = w;
        } else {
            const int64_t zi = i - nw;
            const uint32_t z = zeros[zi];
            uint32_t       w = 0;

#pragma unroll
            for (int b = 0; b < 8; b++) {
                w |= ((z >> (4 * q4_awq_pos[b])) & 15u) << (4 * b);
            }
            zeros[zi] = w;
        }
    }
}


extern "C" int
moe_cuda_q4_awq_to_gptq(int32_t *qweight, int32_t *qzeros, int Ntot, int K,
    int G, int count, void *scratch, size_t scratch_bytes,
    cudaStream_t stream)
{
    const size_t bytes = (size_t) Ntot * K / 2;
    const int    KG = (K + G - 1) / G;

    MOE_TRY(q4_check("q4_awq_to_gptq", MOE_K_Q4_AWQ, G, Ntot, K));
    if (scratch == NULL || scratch_bytes < bytes) {
        moe_cuda_set_error("q4_awq_to_gptq: scratch of %zu bytes for a "
                           "%zu-byte matrix", scratch_bytes, bytes);
        return MOE_K_EUNSUPPORTED;
    }
    for (int m = 0; m < count; m++) {
        uint32_t *w = reinterpret_cast<uint32_t *>(qweight) + m * bytes / 4;
        uint32_t *z = reinterpret_cast<uint32_t *>(qzeros)
                      + (size_t) m * KG * (Ntot / 8);
        int64_t   n = (int64_t) (K / 8) * Ntot + (int64_t) KG * (Ntot / 8);

        MOE_CUDA_CHECK(moe_launch(kernel_q4_awq_to_gptq, moe_grid(n, 256),
            256, 0, stream, (const uint32_t *) w, (uint32_t *) scratch, z,
            Ntot, K, KG));
        MOE_CUDA_CHECK(cudaMemcpyAsync(w, scratch, bytes,
                                       cudaMemcpyDeviceToDevice, stream));
    }
    return MOE_K_OK;
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
    MOE_CUDA_CHECK(moe_launch(kernel_dequant_fp8, moe_grid(total, 256), 256, 0,
        stream, W, scale, mode, stacked, rows, K, count,
        reinterpret_cast<bf16 *>(out)));
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
        MOE_CUDA_CHECK(moe_launch(kernel_dequant_q4<MOE_K_Q4_AWQ>,
            moe_grid(total, 256), 256, 0, stream, qweight, qzeros, scales,
            nullptr, G, 0, Ntot, K, count, reinterpret_cast<bf16 *>(out)));
    } else {
        MOE_CUDA_CHECK(moe_launch(kernel_dequant_q4<MOE_K_Q4_GPTQ>,
            moe_grid(total, 256), 256, 0, stream, qweight, qzeros, scales,
            g_idx, G, zero_bias, Ntot, K, count,
            reinterpret_cast<bf16 *>(out)));
    }
    return MOE_K_OK;
}
