/*
 * kernel_qgemv_q4g: the 4-bit decode GEMV (GPTQ's layout, which AWQ is
 * repacked into at load) for groups of up to 8 rows a pass (NT 1; NT 2:
 * 16, two n-tiles of the mma sharing each decoded weight fragment),
 * written to issue few instructions per weight byte (kernels/NOTES.md
 * "4-bit GEMV by quantization group").
 *
 * Why: the tensor-core GEMV in quant_gemv.cu (kernel_qgemv_q4_mma)
 * issued about 149 warp instructions per 512 weight bytes; at the H200's
 * copy bandwidth an SM receives 512 bytes every ~16 clocks, in which its
 * four schedulers issue at most 64, so that kernel was issue-bound at
 * ~45 % of the bandwidth.  What this one does differently:
 *
 *  - the zero point leaves the inner loop: the weights enter the mma as
 *    the exact bf16 integers 128 + q (one LOP3 per two values, shifts
 *    shared by the word), and a second mma with an all-ones A gives each
 *    row's sum of the inputs over the same k (sigma); at the group's end
 *    sum (q - z) x = sum (128 + q) x - (128 + z) sigma, scaled by the
 *    group's scale in fp32.  The 16 bf16 subtractions per 16 weight bytes
 *    become 2 mma per 32 bytes;
 *  - a warp streams 64 columns (two 16-byte loads per word row per lane:
 *    two sub-tiles of 32), so the input fragments (one 16-byte load and
 *    four byte_perm per word row), sigma and the loop cost are shared by
 *    twice the weights;
 *  - a warp's K range is whole quantization groups, walked in chunks of
 *    32 U k (U word rows per lane), two chunks in flight in registers
 *    (each chunk's zeros and scales load with its weights) and the chunk
 *    after them prefetched into L2 (for a dense matrix the first chunks
 *    before the PDL wait: weights are never written); no predicated
 *    loads: rows past the group's end read its last row (their results
 *    are dropped), shapes that do not tile are refused by
 *    moe_cuda_q4g_supported and take kernel_qgemv_q4_mma.
 *
 * ncu of the first version (Mixtral gate|up, 1 row x 2 experts): 84
 * warp instructions per 512 weight bytes, issue on 41 % of the cycles
 * with 1.9 warps per scheduler: latency-bound, no longer issue-bound
 * (kernels/NOTES.md has each later step's figures).
 *
 * MR 2 fuses SwiGLU: sub-tile 0 is 32 gate columns, sub-tile 1 the same
 * 32 up columns, so a lane holds both sums of its outputs and writes
 * H = bf16(silu(g) * u) (the arithmetic of moe_cuda_silu_mul).
 *
 * A block's NW warps either split the K range of one tile (AN 0) or take
 * NW adjacent tiles (AN 1: a word row is then read as NW x 256
 * contiguous bytes, and the warps share their inputs in L1); the K range
 * is further split over the S blocks of a thread-block cluster (grid.z).
 * Partial sums are added in shared memory, then through distributed
 * shared memory, in a fixed order (no atomics, no zeroing; the result
 * does not depend on timing).
 *
 * Measured and not kept (kernels/NOTES.md): a variant streaming the
 * weights into shared memory with bulk copies (cp.async.bulk on an
 * mbarrier ring, 2-4 chunks in flight per warp) was 10-60 % slower at
 * every block shape.
 *
 * fp32 note: sum (128 + q) x and (128 + z) sigma are ~20x larger than
 * their difference, so the group sum keeps ~19 of fp32's 24 bits; the
 * outputs are rounded to bf16 (8 bits) downstream.
 */
#include <cooperative_groups.h>
#include <cuda_fp16.h>
#include <stdint.h>

#include "common.cuh"
#include "ptx.cuh"
#include "quant_common.cuh"
#include "quant_gemv.h"

namespace cg = cooperative_groups;
typedef __nv_bfloat16 bf16;

#define Q4G_ONES  0x3f803f80u   /* bf16x2 (1, 1) */
#define Q4G_SMAX  8             /* most blocks per cluster */
#define Q4G_PA    1             /* L2 prefetch: chunks past the register
                                   stages (0: none; 1 measured best) */
#define Q4G_PRE   0x100         /* with pa: a dense matrix's weights of
                                   both register stages before the wait */
#define Q4G_PRE_L2 4            /* and the lines of this many chunks after
                                   them asked into L2 there */


/* One chunk of a lane's loads: U word rows (k 8 wr .. 8 wr + 7) of its
 * 4 columns in each of the 2 sub-tiles, the 8 inputs of each word row,
 * and the chunk's group's zeros (one word per sub-tile) and scales (4
 * fp16 per sub-tile). */
template <int U, int NT>
struct q4g_stage {
    uint4    w[U][2];
    uint4    x[U][NT];          /* n-tile nt: input rows 8 nt + g */
    uint32_t z[2];
    uint2    s[2];
};


/*
 * The lane's pointers: weights of word row t of sub-tile s at
 * w0[s] (uint4, advancing by Ntot / 4 per word row), inputs of word row
 * t at x0[nt] (uint4, 1 per word row; n-tile nt), zeros / scales of group 0 at z0[s] /
 * s0[s] (advancing by Ntot / 8 words / Ntot / 4 uint2 per group).
 */
struct q4g_ptrs {
    const uint4    *w0[2];
    const uint4    *x0[2];      /* n-tiles 0 and 1 */
    const uint32_t *z0[2];
    const uint2    *s0[2];
    int             wstep;      /* uint4 per word row: Ntot / 4 */
    int             zstep;      /* words per group: Ntot / 8 */
    int             sstep;      /* uint2 per group: Ntot / 4 */
};


template <int U, int NT>
__device__ __forceinline__ void
q4g_load(q4g_stage<U, NT> &st, const q4g_ptrs &p, int ch, int grp)
{
#pragma unroll
    for (int u = 0; u < U; u++) {
        const int wr = ch * 4 * U + 4 * u;   /* + t: in the pointers */

#pragma unroll
        for (int s = 0; s < 2; s++) {
            st.w[u][s] = __ldcs(p.w0[s] + (size_t) wr * p.wstep);
        }
#pragma unroll
        for (int nt = 0; nt < NT; nt++) {
            st.x[u][nt] = __ldg(p.x0[nt] + wr);
        }
    }
#pragma unroll
    for (int s = 0; s < 2; s++) {
        st.z[s] = __ldg(p.z0[s] + (size_t) grp * p.zstep);
        st.s[s] = __ldg(p.s0[s] + (size_t) grp * p.sstep);
    }
}


/* q4g_load in two halves (dense_pre's kernels): the weights, zeros and
 * scales (never written by the kernels before: they may load before the
 * PDL wait) and the inputs (after it).  q4g_load keeps its own loop: made
 * of these two it loads in another order, and the shipped kernels'
 * machine code changed (16-1382 instructions a kernel, unmeasured). */
template <int U, int NT>
__device__ __forceinline__ void
q4g_load_w(q4g_stage<U, NT> &st, const q4g_ptrs &p, int ch, int grp)
{
#pragma unroll
    for (int u = 0; u < U; u++) {
        const int wr = ch * 4 * U + 4 * u;

#pragma unroll
        for (int s = 0; s < 2; s++) {
            st.w[u][s] = __ldcs(p.w0[s] + (size_t) wr * p.wstep);
        }
    }
#pragma unroll
    for (int s = 0; s < 2; s++) {
        st.z[s] = __ldg(p.z0[s] + (size_t) grp * p.zstep);
        st.s[s] = __ldg(p.s0[s] + (size_t) grp * p.sstep);
    }
}


template <int U, int NT>
__device__ __forceinline__ void
q4g_load_x(q4g_stage<U, NT> &st, const q4g_ptrs &p, int ch)
{
#pragma unroll
    for (int u = 0; u < U; u++) {
        const int wr = ch * 4 * U + 4 * u;

#pragma unroll
        for (int nt = 0; nt < NT; nt++) {
            st.x[u][nt] = __ldg(p.x0[nt] + wr);
        }
    }
}


/*
 * The chunk's products: for each word row, the input pairs (k0, k4),
 * (k1, k5) [slots 2t, 2t+1 / 2t+8, 2t+9 of the first mma] and (k2, k6),
 * (k3, k7) [the second]; sub-tile s, m-tile mt: columns 4 g + 2 mt (rows
 * g) and 4 g + 2 mt + 1 (rows g + 8), their nibble pairs in the same
 * slots; sigma from the all-ones A with the same B.
 */
template <int U, int NT>
__device__ __forceinline__ void
q4g_mma(const uint4 (&w)[U][2], const uint4 (&x)[U][NT],
    float (&c)[2][2][NT][4], float (&sg)[NT][4])
{
#pragma unroll
    for (int u = 0; u < U; u++) {
        uint32_t b[NT][4];

#pragma unroll
        for (int nt = 0; nt < NT; nt++) {
            const uint4 xv = x[u][nt];

            b[nt][0] = __byte_perm(xv.x, xv.z, 0x5410);
            b[nt][1] = __byte_perm(xv.x, xv.z, 0x7632);
            b[nt][2] = __byte_perm(xv.y, xv.w, 0x5410);
            b[nt][3] = __byte_perm(xv.y, xv.w, 0x7632);
            moe_mma_bf16(sg[nt], Q4G_ONES, Q4G_ONES, Q4G_ONES, Q4G_ONES,
                         b[nt][0], b[nt][1]);
            moe_mma_bf16(sg[nt], Q4G_ONES, Q4G_ONES, Q4G_ONES, Q4G_ONES,
                         b[nt][2], b[nt][3]);
        }
#pragma unroll
        for (int s = 0; s < 2; s++) {
            const uint32_t w4[4] = { w[u][s].x, w[u][s].y, w[u][s].z,
                                     w[u][s].w };

#pragma unroll
            for (int mt = 0; mt < 2; mt++) {
                const uint32_t wa = w4[2 * mt], wb = w4[2 * mt + 1];
                const uint32_t a0 = q4m_nib2l(wa, 0), a1 = q4m_nib2l(wb, 0);
                const uint32_t a2 = q4m_nib2l(wa, 4), a3 = q4m_nib2l(wb, 4);
                const uint32_t a4 = q4m_nib2l(wa, 8), a5 = q4m_nib2l(wb, 8);
                const uint32_t a6 = q4m_nib2l(wa, 12), a7 = q4m_nib2l(wb, 12);

#pragma unroll
                for (int nt = 0; nt < NT; nt++) {
                    moe_mma_bf16(c[s][mt][nt], a0, a1, a2, a3, b[nt][0],
                                 b[nt][1]);
                    moe_mma_bf16(c[s][mt][nt], a4, a5, a6, a7, b[nt][2],
                                 b[nt][3]);
                }
            }
        }
    }
}


/*
 * The group's end: y += scale * (c - (128 + z + zero_bias) sigma) for the
 * lane's 8 columns (c[s][mt][0..1]: column 4 g + 2 mt, rows 2t, 2t+1;
 * [2..3]: the next column), then c and sigma restart.  zsh[s]: the bit
 * of the lane's first zero in its word (0 or 16).
 */
template <int NT>
__device__ __forceinline__ void
q4g_fold(const uint32_t (&z)[2], const uint2 (&sc)[2], const int (&zsh)[2],
    int zero_bias, float (&c)[2][2][NT][4], float (&sg)[NT][4],
    float (&y)[2][2][NT][4])
{
#pragma unroll
    for (int s = 0; s < 2; s++) {
        const uint32_t zw = z[s] >> zsh[s];

#pragma unroll
        for (int mt = 0; mt < 2; mt++) {
            const uint32_t sw = mt ? sc[s].y : sc[s].x;
            const float    z0 = (float) (int) (128u + ((zw >> (8 * mt))
                                                       & 15u))
                                + (float) zero_bias;
            const float    z1 = (float) (int) (128u + ((zw >> (8 * mt + 4))
                                                       & 15u))
                                + (float) zero_bias;
            const float    s0 = q4m_h2f(sw, 0), s1 = q4m_h2f(sw, 1);
#pragma unroll
            for (int nt = 0; nt < NT; nt++) {
                float (&cm)[4] = c[s][mt][nt];
                float (&ym)[4] = y[s][mt][nt];

                ym[0] += s0 * fmaf(-z0, sg[nt][0], cm[0]);
                ym[1] += s0 * fmaf(-z0, sg[nt][1], cm[1]);
                ym[2] += s1 * fmaf(-z1, sg[nt][2], cm[2]);
                ym[3] += s1 * fmaf(-z1, sg[nt][3], cm[3]);
                cm[0] = cm[1] = cm[2] = cm[3] = 0.0f;
            }
        }
    }
#pragma unroll
    for (int nt = 0; nt < NT; nt++) {
        sg[nt][0] = sg[nt][1] = sg[nt][2] = sg[nt][3] = 0.0f;
    }
}


/*
 * The end of a pass: the warps' partial sums y (per lane: sub-tile s,
 * m-tile mt, n-tile nt, i; entry ((s 2 + mt) NT + nt) 4 + i) added in
 * shared memory, then the ranks' through distributed shared memory, each
 * in a fixed order, and written: Y (MR 1) or H = bf16(silu(gate) * up)
 * (MR 2) for rows p0 .. < r1.
 */
template <int MR, int NW, int AN, int NT>
__device__ __forceinline__ void
q4g_reduce(float (&red)[NW][16 * NT][32], const float (&y)[2][2][NT][4],
    cg::cluster_group &cl, int warp, int lane, int S, int rank, int p0,
    int r1, int cb0, int cb1, float *Y, bf16 *H, int ldy)
{
    /* AN 1: the warps' outputs are distinct columns (warp w's tile is
     * this warp's + w - warp); AN 0: the warps' sums first */
    const int F = (MR == 2 ? 8 : 16) * NT;  /* outputs per lane written */
    const int NO = AN ? NW : 1;         /* warps whose outputs differ */

#pragma unroll
    for (int s = 0; s < 2; s++) {
#pragma unroll
        for (int mt = 0; mt < 2; mt++) {
#pragma unroll
            for (int nt = 0; nt < NT; nt++) {
#pragma unroll
                for (int i = 0; i < 4; i++) {
                    red[warp][((s * 2 + mt) * NT + nt) * 4 + i][lane] =
                        y[s][mt][nt][i];
                }
            }
        }
    }
    __syncthreads();
    if (!AN) {
        q_warps_sum(red, 16 * NT * 32);
    }
    cl.sync();                              /* every rank's block sum */
    for (int idx = rank * NW * 32 + (int) threadIdx.x;
         idx < NO * F * 32; idx += S * NW * 32)
    {
        const int w = idx / (F * 32), fl = idx % (F * 32);
        const int f = fl / 32, l = fl % 32, i = f % 4;
        const int nt = (f / 4) % NT, mt = (f / (4 * NT)) % 2;
        const int s = f / (8 * NT);
        const int lg = l >> 2, lt = l & 3;
        const int row = p0 + 8 * nt + 2 * lt + (i & 1);
        const int dc = AN ? (w - warp) * (MR == 2 ? 32 : 64) : 0;
        const int col = (s ? cb1 : cb0) + dc + 4 * lg + 2 * mt + (i >> 1);
        float     u = 0.0f;
        const float v = q_ranks_sum<MR == 2>(cl, &red[w][0][0], fl,
                                             fl + 8 * NT * 32, S, &u);

        if (row < r1) {
            if (MR == 1) {
                Y[(size_t) row * ldy + col] = v;
            } else {
                H[(size_t) row * ldy + col] =
                    moe_f2bf(moe_silu_mul(v, u));
            }
        }
    }
    cl.sync();                          /* red free for the next pass */
}


/*
 * grid (column tiles, expert groups, S), cluster (1, 1, S), NW warps.
 * MR 1: tile x = columns 64 x .. 64 x + 63 of Y (n, Ntot), sub-tiles of
 * 32.  MR 2: Ntot = 2 F stacked gate|up, tile x = gate columns 32 x ..
 * + 31 (sub-tile 0) and the same up columns F + 32 x .. (sub-tile 1); H
 * (n, F), leading dimension ldy.  U: word rows per lane per chunk
 * (chunk = 32 U k, G % (32 U) == 0).
 */
template <int MR, int U, int NW, int MINB, int AN, int NT, bool PRE = false>
__global__ void __launch_bounds__(NW * 32, MINB)
kernel_qgemv_q4g(const bf16 *X, int ldx, const int32_t *xrow, int xdiv,
    const uint32_t *qweight, const uint32_t *qzeros,
    const uint16_t *scales, int G, int zero_bias, int Ntot, int K,
    const int32_t *offs, int E, int n, float *Y, bf16 *H, int ldy, int pa)
{
    /* register stages: chunk c + ST - 1 loads while c is multiplied (a
     * third stage, inputs loaded at use to make room, measured slower:
     * kernels/NOTES.md) */
    constexpr int     ST = 2;
    __shared__ float  red[NW][16 * NT][32];

    cg::cluster_group cl = cg::this_cluster();
    const int         lane = (int) threadIdx.x & 31;
    const int         warp = (int) threadIdx.x >> 5;
    const int         g = lane >> 2, t = lane & 3;
    const int         S = (int) gridDim.z;
    const int         rank = (int) cl.block_rank();
    const int         KG = K / G, cpg = G / (32 * U);
    /* AN 0: the block's warps split the tile's K range; AN 1: each warp
     * has its own tile (the block's NW tiles adjacent along N, so a word
     * row is read as NW x 256 contiguous bytes) and the whole K range of
     * its rank */
    const int         pw = AN ? (int) blockIdx.z : (int) blockIdx.z * NW + warp;
    const int         pn = AN ? S : S * NW;
    const int         g0 = (int) ((int64_t) KG * pw / pn);
    const int         g1 = (int) ((int64_t) KG * (pw + 1) / pn);
    const int         ch0 = g0 * cpg, ch1 = g1 * cpg;
    const int         Nh = Ntot / MR;
    const int         tile = AN ? (int) blockIdx.x * NW + warp
                                : (int) blockIdx.x;
    /* the tile's sub-tile columns */
    const int         cb0 = MR == 2 ? tile * 32 : tile * 64;
    const int         cb1 = MR == 2 ? cb0 + Nh : cb0 + 32;
    /* L2 prefetch of the chunk pa past the register stages (the one
     * multiplied + ST - 1 + pa; pa 0: none): lane l fetches the 128-byte
     * line of word row l % 4U, sub-tile l / 4U of a chunk (4 U rows x 2
     * sub-tiles: U 4 one line a lane) */
    const int         pf = pa > 0 ? ST - 1 + pa : 0;
    const int         pr = lane % (4 * U), ps = (lane / (4 * U)) & 1;
    const size_t      pfstep = (size_t) 4 * U * Ntot;
    const uint32_t   *pfb = qweight + (size_t) pr * Ntot + (ps ? cb1 : cb0);
    int               r0, r1;
    /* PRE (its own instantiations, launched for one matrix without
     * SiLU), one pass: the weights, zeros and scales of both register
     * stages load before the PDL wait, so they stream while the kernel
     * before runs; the inputs after it */
    bool              pre = PRE && MR == 1 && offs == NULL && n <= 8 * NT
                            && xrow == NULL;
    if (offs == NULL && !pre) {
        /* one matrix: its weights are known before the kernel this one
         * waits for has finished (weights are never written) */
        for (int c = ch0; c < ch1 && c < ch0 + pf; c++) {
            moe_prefetch_l2(pfb + (size_t) c * pfstep);
        }
    }
    if (!pre) {
        moe_pdl_enter();
    }

    /* offs NULL: nothing read */
    const int         e = q_group_rows(offs, E, n, &r0, &r1);

    if (e < 0 || r1 <= r0) {
        if (pre) {
            moe_pdl_enter();
        }
        return;                 /* uniform over the cluster (same x, y) */
    }

    /* this lane's 4 columns in each sub-tile */
    const uint32_t *pfe = pfb + (size_t) e * (K / 8) * Ntot;
    const int lc[2] = { cb0 + 4 * g, cb1 + 4 * g };
    const int zsh[2] = { 4 * (lc[0] & 7), 4 * (lc[1] & 7) };
    q4g_ptrs  p;

    p.wstep = Ntot / 4;
    p.zstep = Ntot / 8;
    p.sstep = Ntot / 4;
#pragma unroll
    for (int s = 0; s < 2; s++) {
        p.w0[s] = reinterpret_cast<const uint4 *>(
                      qweight + (size_t) e * (K / 8) * Ntot
                      + (size_t) t * Ntot + lc[s]);
        p.z0[s] = qzeros + (size_t) e * KG * (Ntot / 8) + lc[s] / 8;
        p.s0[s] = reinterpret_cast<const uint2 *>(
                      scales + (size_t) e * KG * Ntot + lc[s]);
    }

    /* cpg 1 (G = 32 U, e.g. 128): every chunk is a group */
    const bool       one = cpg == 1;
    q4g_stage<U, NT> st[ST];

    if (pre) {
#pragma unroll
        for (int j = 0; j < ST; j++) {
            if (ch0 + j < ch1) {
                q4g_load_w<U, NT>(st[j], p, ch0 + j,
                                  one ? ch0 + j : (ch0 + j) / cpg);
            }
        }
        /* and the next Q4G_PRE_L2 chunks' lines into L2 */
        for (int c = ch0 + ST; c < ch1 && c < ch0 + ST + Q4G_PRE_L2; c++) {
            moe_prefetch_l2(pfb + (size_t) c * pfstep);
        }
        moe_pdl_enter();
    }

    for (int p0 = r0; p0 < r1; p0 += 8 * NT) {
        float y[2][2][NT][4], c[2][2][NT][4], sg[NT][4];

#pragma unroll
        for (int nt = 0; nt < NT; nt++) {
            /* the B column g of n-tile nt: row p0 + 8 nt + g (the
             * group's last row past its end) */
            const int rr = min(p0 + 8 * nt + g, r1 - 1);

            p.x0[nt] = reinterpret_cast<const uint4 *>(
                           X + (size_t) (xrow != NULL ? xrow[rr] / xdiv : rr)
                               * ldx)
                       + t;
#pragma unroll
            for (int s = 0; s < 2; s++) {
#pragma unroll
                for (int mt = 0; mt < 2; mt++) {
#pragma unroll
                    for (int i = 0; i < 4; i++) {
                        y[s][mt][nt][i] = c[s][mt][nt][i] = 0.0f;
                    }
                }
            }
#pragma unroll
            for (int i = 0; i < 4; i++) {
                sg[nt][i] = 0.0f;
            }
        }

        if (ch0 < ch1) {
#pragma unroll
            for (int j = 0; j < ST - 1; j++) {
                if (ch0 + j < ch1) {
                    if (pre) {
                        q4g_load_x<U, NT>(st[j], p, ch0 + j);
                    } else {
                        q4g_load<U, NT>(st[j], p, ch0 + j,
                                        one ? ch0 + j : (ch0 + j) / cpg);
                    }
                }
            }
            if (offs != NULL || p0 > r0) {
                for (int cc = ch0 + ST; cc < ch1 && cc < ch0 + pf; cc++) {
                    moe_prefetch_l2(pfe + (size_t) cc * pfstep);
                }
            }
            for (int ch = ch0; ch < ch1; ch += ST) {
#pragma unroll
                for (int j = 0; j < ST; j++) {
                    const int cj = ch + j, cn = cj + ST - 1;

                    if (cj >= ch1) {
                        break;
                    }
                    if (cn < ch1) {
                        if (pre && cn < ch0 + ST) {
                            /* its weights came before the wait */
                            q4g_load_x<U, NT>(st[(j + ST - 1) % ST], p, cn);
                        } else {
                            q4g_load<U, NT>(st[(j + ST - 1) % ST], p, cn,
                                            one ? cn : cn / cpg);
                        }
                    }
                    if (pf > 0 && cj + pf < ch1) {
                        moe_prefetch_l2(pfe + (size_t) (cj + pf) * pfstep);
                    }
                    q4g_mma<U, NT>(st[j].w, st[j].x, c, sg);
                    if (one || (cj + 1) % cpg == 0) {
                        q4g_fold<NT>(st[j].z, st[j].s, zsh, zero_bias, c,
                                     sg, y);
                    }
                }
            }
        }

        q4g_reduce<MR, NW, AN, NT>(red, y, cl, warp, lane, S, rank, p0, r1, cb0, cb1,
                           Y, H, ldy);
        pre = false;
    }
}


extern "C" int
moe_cuda_q4g_supported(int G, int Ntot, int K, int silu)
{
    int Nh = silu ? Ntot / 2 : Ntot;

    return G > 0 && G % 32 == 0 && K > 0 && K % G == 0 && Ntot > 0
           && (silu ? Ntot % 2 == 0 && Nh % 32 == 0 : Nh % 64 == 0);
}


/* Row hints up to 16 on this kernel; above, the warpgroup kernel where
 * it takes the shape in chunks of 128 k (G % 128 == 0: with 64-k chunks
 * it measured no faster than the tensor-core GEMV, bench/dev/quant_gemv
 * 32 rows, H200 2026-12-04). */
extern "C" int
moe_cuda_q4g_rows_ok(int G, int Ntot, int K, int silu, int max_rows)
{
    if (max_rows <= 16) {
        return moe_cuda_q4g_supported(G, Ntot, K, silu);
    }
    return G % 128 == 0 && moe_cuda_q4w_supported(G, Ntot, K, silu);
}




/* One launch: grid (tiles, groups, S), the S blocks of a z column one
 * cluster (PDL when moe_cuda_pdl_get()). */
template <int MR, int U, int NW, int MINB, int AN, int NT>
static int
q4g_launch(int tiles, int ng, int S, const bf16 *X, int ldx,
    const int32_t *xrow, int xdiv, const uint32_t *qw, const uint32_t *qz,
    const uint16_t *sc, int G, int zero_bias, int Ntot, int K,
    const int32_t *offs, int E, int n, float *Y, bf16 *H, int ldy, int pa,
    cudaStream_t stream)
{
    cudaLaunchConfig_t  cfg = {};
    cudaLaunchAttribute at[2] = {};

    q_cluster_cfg(&cfg, at, tiles, ng, S, NW * 32, 0, stream);
    if constexpr (MR == 1) {
        if ((pa & Q4G_PRE) != 0 && offs == NULL && xrow == NULL
            && n <= 8 * NT)
        {
            /* dense_pre: the instantiations that load before the wait */
            MOE_CUDA_CHECK(cudaLaunchKernelEx(&cfg,
                                              kernel_qgemv_q4g<MR, U, NW,
                                                               MINB, AN, NT,
                                                               true>,
                                              X, ldx, xrow, xdiv, qw, qz, sc,
                                              G, zero_bias, Ntot, K, offs, E,
                                              n, Y, H, ldy,
                                              pa & (Q4G_PRE - 1)));
            return MOE_K_OK;
        }
    }
    MOE_CUDA_CHECK(cudaLaunchKernelEx(&cfg,
                                      kernel_qgemv_q4g<MR, U, NW, MINB, AN,
                                                       NT>,
                                      X, ldx, xrow, xdiv, qw, qz, sc, G,
                                      zero_bias, Ntot, K, offs, E, n, Y, H,
                                      ldy, pa & (Q4G_PRE - 1)));
    return MOE_K_OK;
}


/* The launch for chunk size U (G % (32 U) == 0) and block shape; AN 1
 * (the warps on adjacent tiles) when the tiles divide among the warps,
 * else AN 0. */
template <int U, int NW, int MINB, int AN, int NT>
static int
q4g_go(int S_force, int pa, const bf16 *X, int ldx, const int32_t *xrow, int xdiv,
    const uint32_t *qw, const uint32_t *qz, const uint16_t *sc, int G,
    int zero_bias, int Ntot, int K, const int32_t *offs, int E, int n,
    float *Y, bf16 *H, int ldy, cudaStream_t stream)
{
    const int MRv = H != NULL ? 2 : 1;
    const int wt = MRv == 2 ? Ntot / 2 / 32 : Ntot / 64;  /* warp tiles */
    const int an = AN && wt % NW == 0;
    const int tiles = an ? wt / NW : wt;
    const int ng = q_groups(offs, E, n);
    int       S = S_force > 0 && S_force <= Q4G_SMAX ? S_force : 0;

    if (S == 0) {
        /* K splits (q_cluster_split) keeping at least 4 groups a warp.
         * On the H200 (bench/dev/quant_gemv, 2026-12-04) every split of a
         * grid that already had a block per SM was slower: S 1 for the
         * batch-1 down projection (128 blocks of 8 warps) 25.3 us against
         * 28.8 at S 2; gate|up (224 blocks of 4 warps) 47.2 against
         * 51.9. */
        S = q_cluster_split((int64_t) tiles * ng, K / G, 2 * (an ? 1 : NW),
                            MINB, Q4G_SMAX);
    }
#define Q4G_L  tiles, ng, S, X, ldx, xrow, xdiv, qw, qz, sc, G, zero_bias, \
               Ntot, K, offs, E, n
    if (an) {
        return H != NULL
               ? q4g_launch<2, U, NW, MINB, 1, NT>(Q4G_L, NULL, H, ldy, pa,
                                                   stream)
               : q4g_launch<1, U, NW, MINB, 1, NT>(Q4G_L, Y, NULL, ldy, pa,
                                                   stream);
    }
    return H != NULL
           ? q4g_launch<2, U, NW, MINB, 0, NT>(Q4G_L, NULL, H, ldy, pa,
                                               stream)
           : q4g_launch<1, U, NW, MINB, 0, NT>(Q4G_L, Y, NULL, ldy, pa,
                                               stream);
#undef Q4G_L
}


/* The chunk size for G: UMAX word rows per lane (32 UMAX k) when G
 * allows, else fewer. */
template <int UMAX, int NW, int MINB, int AN, int NT = 1>
static int
q4g_pick_u(int S_force, int pa, const bf16 *X, int ldx, const int32_t *xrow,
    int xdiv, const uint32_t *qw, const uint32_t *qz, const uint16_t *sc,
    int G, int zero_bias, int Ntot, int K, const int32_t *offs, int E, int n,
    float *Y, bf16 *H, int ldy, cudaStream_t stream)
{
#define Q4G_ARGS  S_force, pa, X, ldx, xrow, xdiv, qw, qz, sc, G, \
                  zero_bias, \
                  Ntot, K, offs, E, n, Y, H, ldy, stream
    if (UMAX >= 4 && G % 128 == 0) {
        return q4g_go<UMAX >= 4 ? 4 : 1, NW, MINB, AN, NT>(Q4G_ARGS);
    }
    if (UMAX >= 2 && G % 64 == 0) {
        return q4g_go<UMAX >= 2 ? 2 : 1, NW, MINB, AN, NT>(Q4G_ARGS);
    }
    return q4g_go<1, NW, MINB, AN, NT>(Q4G_ARGS);
#undef Q4G_ARGS
}


/* moe_cuda_qgemv_q4g with the cluster size (0: picked) and the L2
 * prefetch (chunks past the register stages, 0: none) forced
 * (bench/dev/quant_gemv). */
static int
q4g_run(int shape, int S_force, int pa, const moe_bf16_t *X, int ldx,
    const int32_t *xrow, int xdiv, const int32_t *qweight,
    const int32_t *qzeros, const uint16_t *scales, int G, int zero_bias,
    int Ntot, int K, const int32_t *offs, int E, int n, int max_rows,
    float *Y, int ldy, moe_bf16_t *H, cudaStream_t stream)
{
    const bf16     *Xb = reinterpret_cast<const bf16 *>(X);
    const uint32_t *qw = reinterpret_cast<const uint32_t *>(qweight);
    const uint32_t *qz = reinterpret_cast<const uint32_t *>(qzeros);
    bf16           *Hb = reinterpret_cast<bf16 *>(H);

    if (n <= 0) {
        return MOE_K_OK;
    }
    if (!moe_cuda_q4g_supported(G, Ntot, K, H != NULL)
        || !q_gptq_args_ok(X, ldx, qweight, qzeros, scales, offs, E, Y, H))
    {
        moe_cuda_set_error("qgemv_q4g: unsupported shape (N %d, K %d, group "
                           "%d, ldx %d, E %d, %s)", Ntot, K, G, ldx, E,
                           H != NULL ? "SiLU fused" : "fp32 out");
        return MOE_K_EUNSUPPORTED;
    }
    if (H != NULL) {
        ldy = Ntot / 2;
    }
#define Q4G_ARGS  S_force, pa, Xb, ldx, xrow, xdiv, qw, qz, scales, G, \
                  zero_bias, Ntot, K, offs, E, n, Y, Hb, ldy, stream
    const int ng = q_groups(offs, E, n);
    const int mr = max_rows > 0 ? max_rows : (n + ng - 1) / ng;

    /* more than 16 rows a group (or shapes 10..14): the warpgroup
     * tensor cores (kernels/q4_wgmma.cu) where they take the shape */
    if ((shape >= 10 && shape <= 13
         && moe_cuda_q4w_supported(G, Ntot, K, H != NULL))
        || (shape == 14 && moe_cuda_q4w_supported(G, Ntot, K, H != NULL)
            && q4w_pair_ok(G, Ntot, H != NULL))
        || (shape == 0 && mr > 16
            && moe_cuda_q4g_rows_ok(G, Ntot, K, H != NULL, mr)))
    {
        return moe_cuda_qgemv_q4w(X, ldx, xrow, xdiv, qweight, qzeros,
                                  scales, G, zero_bias, Ntot, K, offs, E, n,
                                  mr, shape == 14 ? 8
                                      : shape >= 10 ? shape - 9 : 0,
                                  Y, ldy, H, stream);
    }
    switch (shape) {
    case 1:
        return q4g_pick_u<4, 8, 1, 0>(Q4G_ARGS);
    case 2:
        return q4g_pick_u<2, 4, 3, 0>(Q4G_ARGS);
    case 3:
        return q4g_pick_u<4, 4, 2, 0>(Q4G_ARGS);
    case 4:
        return q4g_pick_u<4, 4, 2, 1>(Q4G_ARGS);
    case 5:
        return q4g_pick_u<4, 2, 4, 1>(Q4G_ARGS);
    case 6:
        return q4g_pick_u<4, 8, 1, 1>(Q4G_ARGS);
    case 7:
        return q4g_pick_u<2, 4, 2, 1, 2>(Q4G_ARGS);
    case 8:
        return q4g_pick_u<2, 4, 2, 0, 2>(Q4G_ARGS);
    case 9:
        return q4g_pick_u<2, 8, 1, 0, 2>(Q4G_ARGS);
    default:
        break;
    }
    /* more than 8 rows a group: 16 a pass (two n-tiles; 64 k a chunk to
     * make room for their registers) */
    if (mr > 8) {
        if (H != NULL || (int64_t) (Ntot / 64) * ng > moe_sm_count()) {
            return q4g_pick_u<2, 4, 2, 1, 2>(Q4G_ARGS);
        }
        return q4g_pick_u<2, 8, 1, 0, 2>(Q4G_ARGS);
    }
    /* the shipped shapes (bench/dev/quant_gemv, H200, 2026-12-04: one
     * Mixtral layer at 1 and 2 rows per expert): adjacent warp tiles at
     * 4 warps x 2 blocks per SM for gate|up with SiLU (43.6 us at 1 row
     * x 2 experts, 154 at 2 rows x 8) and for grids of more than a block
     * per SM (down at 2 rows x 8 experts: 77.5 us, 81.3 with the warps
     * splitting K); smaller grids split K over 8 warps (the batch-1 down
     * projection: 22.3 us, 34 on adjacent tiles) */
    if (H != NULL || (int64_t) (Ntot / 64) * ng > moe_sm_count()) {
        return q4g_pick_u<4, 4, 2, 1>(Q4G_ARGS);
    }
    return q4g_pick_u<4, 8, 1, 0>(Q4G_ARGS);
#undef Q4G_ARGS
}


extern "C" int
moe_cuda_qgemv_q4g(const moe_bf16_t *X, int ldx, const int32_t *xrow,
    int xdiv, const int32_t *qweight, const int32_t *qzeros,
    const uint16_t *scales, int G, int zero_bias, int Ntot, int K,
    const int32_t *offs, int E, int n, int shape, float *Y, int ldy,
    moe_bf16_t *H, cudaStream_t stream)
{
    return q4g_run(shape, 0, Q4G_PA, X, ldx, xrow, xdiv, qweight, qzeros,
                   scales, G, zero_bias, Ntot, K, offs, E, n, 8, Y, ldy, H,
                   stream);
}


extern "C" int
moe_cuda_qgemv_q4g_rows(const moe_bf16_t *X, int ldx, const int32_t *xrow,
    int xdiv, const int32_t *qweight, const int32_t *qzeros,
    const uint16_t *scales, int G, int zero_bias, int Ntot, int K,
    const int32_t *offs, int E, int n, int max_rows, float *Y, int ldy,
    moe_bf16_t *H, cudaStream_t stream)
{
    return moe_cuda_qgemv_q4g_pre(X, ldx, xrow, xdiv, qweight, qzeros,
                                  scales, G, zero_bias, Ntot, K, offs, E, n,
                                  max_rows, Y, ldy, H, 0, stream);
}


extern "C" int
moe_cuda_qgemv_q4g_pre(const moe_bf16_t *X, int ldx, const int32_t *xrow,
    int xdiv, const int32_t *qweight, const int32_t *qzeros,
    const uint16_t *scales, int G, int zero_bias, int Ntot, int K,
    const int32_t *offs, int E, int n, int max_rows, float *Y, int ldy,
    moe_bf16_t *H, int pre, cudaStream_t stream)
{
    return q4g_run(0, 0, Q4G_PA | (pre ? Q4G_PRE : 0), X, ldx, xrow, xdiv,
                   qweight, qzeros, scales, G, zero_bias, Ntot, K, offs, E,
                   n, max_rows, Y, ldy, H, stream);
}
