/*
 * kernel_qgemm_q4w: the 4-bit GEMV / small GEMM on warpgroup tensor cores
 * (wgmma) for expert groups of more than 16 rows (decode at batch 32 and
 * above), GPTQ's layout (AWQ repacked at load), no g_idx.
 *
 * Why: at 16-32 rows a pass the mma.sync kernels are bound by the tensor
 * work, not the bytes.  A Mixtral decode step at batch 64 spent 25.4 of
 * its 29.4 ms in kernel_qgemv_q4_mma (passes of 32 rows), 0.23 of the
 * 4-bit bandwidth limit (bench/RESULTS.md, thirteenth session), and the
 * GEMV by group's 16-row passes reached 42 % of the copy rate.  32 rows
 * of 4-bit weights need 128 flops a weight byte; wgmma delivers that at
 * the copy rate (about 16 SM clocks a 512-byte block of weights for
 * m64n32k16 at the full bf16 rate), mma.sync at roughly half of it.
 *
 * How:
 *  - a block is one warpgroup (4 warps); a warp owns 32 columns (its
 *    lanes load 16 bytes, 4 columns x 8 k, per word row, as in
 *    kernel_qgemv_q4g) and turns them into the A operand of wgmma in
 *    registers: one LOP3 per two nibbles gives bf16 (128 + q), one bf16x2
 *    subtraction of (128 + z') leaves q - z' exactly;
 *  - the block's rows (B, N = 16 or 32 a pass) are staged by the block's
 *    threads into shared memory per chunk of 32 U k, K-major with the
 *    128-byte swizzle (wgmma.cuh's layout), their k permuted within each
 *    32 k the way the nibble pairs sit in the A fragments (so no
 *    register shuffles of the weights);
 *  - wgmma accumulates each quantization group's sum of (q - z') x in
 *    fp32 (restarting at a group's first k through scale-d 0), and the
 *    group's scale multiplies it into the running output (exact integer
 *    weights: no bf16 rounding of w);
 *  - two chunks of weights in flight in registers, the next chunk's rows
 *    in registers while the current chunk multiplies, an L2 prefetch of
 *    the chunk two past the register loads; K split over a thread-block
 *    cluster of S blocks when the grid is small, reduced in a fixed
 *    order through distributed shared memory (deterministic);
 *  - MR 2 fuses SwiGLU: warps 0 and 1 take 64 gate columns, warps 2 and
 *    3 the same up columns, and the epilogue writes bf16 silu(g) u.
 */
#include <cooperative_groups.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <stdint.h>

#include "common.cuh"
#include "quant_common.cuh"
#include "quant_gemv.h"
#include "wgmma.cuh"

namespace cg = cooperative_groups;
typedef __nv_bfloat16 bf16;

#define Q4W_SMAX  8             /* most blocks per cluster */
#define Q4W_PA    3             /* L2 prefetch of chunk c + 1 + pa while
                                   c multiplies (the registers load c +
                                   2; 0: none, 1 the same chunk as the
                                   loads; 0, 1, 2, 3, 6 measured: 3) */
#define Q4W_NT    128           /* threads: one warpgroup */


template <int NR>
__device__ __forceinline__ void
q4w_mma(float (&d)[NR / 2], const uint32_t (&a)[4], uint64_t db, int sd)
{
    if constexpr (NR == 16) {
        moe_wg_mma_bf16_rs_n16(d, a, db, sd);
    } else {
        moe_wg_mma_bf16_rs_n32(d, a, db, sd);
    }
}


/* One chunk of a lane's weights: U word rows (k 8 wr .. 8 wr + 7 of its
 * 4 columns), and its group's zeros (one word: 8 columns) and fp16
 * scales (its 4 columns). */
template <int U>
struct q4w_stage {
    uint4    w[U];
    uint32_t z;
    uint2    s;
};


/*
 * Stage one chunk of the pass's rows as wgmma's B: task (row r, 32-k
 * block u) takes the row's 64 bytes at k 32 U ch + 32 u (word rows t =
 * 0..3 of the lanes) and writes two k16 steps (2 u + h): slots 0..7 the
 * pairs (k 8t, k 8t + 4) [h 0] / (k 8t + 2, 8t + 6) [h 1] of t = 0..3,
 * slots 8..15 (8t + 1, 8t + 5) / (8t + 3, 8t + 7): where the A fragment
 * holds the nibbles of those k.  Rows of 128 bytes (64 logical k), 8-row
 * groups 1024 bytes apart, 16-byte chunk c of row r at c ^ (r & 7).
 */
template <int U, int NR, int NT>
__device__ __forceinline__ void
q4w_xload(uint4 (&xr)[(NR * U + NT - 1) / NT][4],
    const uint4 *const (&xp)[(NR * U + NT - 1) / NT], int ch)
{
    constexpr int XT = (NR * U + NT - 1) / NT;

#pragma unroll
    for (int i = 0; i < XT; i++) {
        const int id = (int) threadIdx.x + NT * i;

        if (id < NR * U) {
            const uint4 *p = xp[i] + (size_t) ch * 4 * U + 4 * (id % U);

#pragma unroll
            for (int t = 0; t < 4; t++) {
                xr[i][t] = __ldg(p + t);
            }
        }
    }
}


template <int U, int NR, int NT>
__device__ __forceinline__ void
q4w_xstore(unsigned char *buf, const uint4 (&xr)[(NR * U + NT - 1) / NT][4])
{
    constexpr int XT = (NR * U + NT - 1) / NT;

#pragma unroll
    for (int i = 0; i < XT; i++) {
        const int id = (int) threadIdx.x + NT * i;

        if (id < NR * U) {
            const int r = id / U, u = id % U;

#pragma unroll
            for (int h = 0; h < 2; h++) {
#pragma unroll
                for (int hf = 0; hf < 2; hf++) {
                    uint4      o;
                    const int  sel = hf ? 0x7632 : 0x5410;
                    const int  cc = 2 * (2 * u + h) + hf;   /* 16-B chunk */
                    const int  a = cc / 8, c = cc % 8;

                    o.x = __byte_perm(h ? xr[i][0].y : xr[i][0].x,
                                      h ? xr[i][0].w : xr[i][0].z, sel);
                    o.y = __byte_perm(h ? xr[i][1].y : xr[i][1].x,
                                      h ? xr[i][1].w : xr[i][1].z, sel);
                    o.z = __byte_perm(h ? xr[i][2].y : xr[i][2].x,
                                      h ? xr[i][2].w : xr[i][2].z, sel);
                    o.w = __byte_perm(h ? xr[i][3].y : xr[i][3].x,
                                      h ? xr[i][3].w : xr[i][3].z, sel);
                    *reinterpret_cast<uint4 *>(
                        buf + a * NR * 128 + (r >> 3) * 1024 + (r & 7) * 128
                        + ((c ^ (r & 7)) << 4)) = o;
                }
            }
        }
    }
}


/* A chunk's weights, then (q4w_load_zs) its group's zeros and scales:
 * apart, so that the loop loads a stage's scales only after its fold
 * has used the old ones (a scale kept across the new load became a
 * register copy that waited for the load: a third of the stall samples,
 * ncu on the H200) */
template <int U>
__device__ __forceinline__ void
q4w_load_w(q4w_stage<U> &st, const uint4 *wp, int wstep, int ch)
{
#pragma unroll
    for (int u = 0; u < U; u++) {
        st.w[u] = __ldcs(wp + (size_t) (ch * 4 * U + 4 * u) * wstep);
    }
}


template <int U>
__device__ __forceinline__ void
q4w_load_zs(q4w_stage<U> &st, const uint32_t *zp, int zstep,
    const uint2 *sp, int sstep, int grp)
{
    st.z = __ldg(zp + (size_t) grp * zstep);
    st.s = __ldg(sp + (size_t) grp * sstep);
}


/*
 * grid (column tiles, expert groups, S), cluster (1, 1, S), 128 threads.
 * MR 1: tile x = columns 128 x .. + 127 of Y (n, Ntot) fp32; MR 2: Ntot
 * = 2 F stacked gate|up, tile x = gate columns 64 x .. + 63 and the same
 * up columns, H (n, F) bf16 (leading dimension ldy).  U: word rows a
 * lane per chunk (chunk = 32 U k, G % (32 U) == 0, U 2 or 4); NR rows a
 * pass (16 or 32).
 */
template <int MR, int U, int NR, int MINB, int WGS>
__global__ void __launch_bounds__(Q4W_NT * WGS, MINB)
kernel_qgemm_q4w(const bf16 *X, int ldx, const int32_t *xrow, int xdiv,
    const uint32_t *qweight, const uint32_t *qzeros,
    const uint16_t *scales, int G, int zero_bias, int Ntot, int K,
    const int32_t *offs, int E, int n, float *Y, bf16 *H, int ldy, int pa)
{
    constexpr int ST = 2;
    constexpr int NT = Q4W_NT * WGS;            /* threads */
    constexpr int NW = 4 * WGS;                 /* warps */
    constexpr int BUF = U / 2 * NR * 128;       /* a chunk's B bytes */
    constexpr int XT = (NR * U + NT - 1) / NT;
    constexpr int ND = NR / 2;                   /* D registers a wgmma */
    extern __shared__ unsigned char q4w_raw[];
    unsigned char *sm = reinterpret_cast<unsigned char *>(
        ((uintptr_t) q4w_raw + 1023) & ~(uintptr_t) 1023);
    /* after a pass's chunks: the warps' sums [NW][NR][32] (over the B
     * buffers) */
    float         *red = reinterpret_cast<float *>(sm);

    cg::cluster_group cl = cg::this_cluster();
    const int      lane = (int) threadIdx.x & 31;
    const int      warp = (int) threadIdx.x >> 5;
    const int      g = lane >> 2, t = lane & 3;
    const int      S = (int) gridDim.z;
    const int      rank = (int) cl.block_rank();
    const int      KG = K / G, cpg = G / (32 * U);
    const int      g0 = (int) ((int64_t) KG * rank / S);
    const int      g1 = (int) ((int64_t) KG * (rank + 1) / S);
    const int      ch0 = g0 * cpg, ch1 = g1 * cpg;
    const int      Nh = Ntot / MR;
    /* the warp's 32 columns (MR 2: the first half of the warps gate
     * columns, the second the same up columns) */
    const int      cbw = MR == 2
                         ? (WGS == 1
                            ? (int) blockIdx.x * 64 + (warp & 1) * 32
                              + (warp >> 1) * Nh
                            : (int) blockIdx.x * 64 * WGS
                              + (warp % (2 * WGS)) * 32
                              + (warp / (2 * WGS)) * Nh)
                         : (int) blockIdx.x * 128 * WGS + warp * 32;
    const int      lc = cbw + 4 * g;
    const int      zsh = 4 * (lc & 7);
    int            r0, r1;

    moe_pdl_enter();

    const int      e = q_group_rows(offs, E, n, &r0, &r1);

    if (e < 0 || r1 <= r0) {
        return;                 /* uniform over the cluster (same y) */
    }

    const uint32_t *we = qweight + (size_t) e * (K / 8) * Ntot;
    const uint4    *wp = reinterpret_cast<const uint4 *>(
                             we + (size_t) t * Ntot + lc);
    const uint32_t *zp = qzeros + (size_t) e * KG * (Ntot / 8) + lc / 8;
    const uint2    *sp = reinterpret_cast<const uint2 *>(
                             scales + (size_t) e * KG * Ntot + lc);
    const int       wstep = Ntot / 4, zstep = Ntot / 8, sstep = Ntot / 4;
    /* L2 prefetch: lane l < 4 U fetches the warp's 128-byte line of word
     * row l of a chunk */
    const uint32_t *pfb = we + (size_t) (lane % (4 * U)) * Ntot + cbw;
    const size_t    pfstep = (size_t) 4 * U * Ntot;

    for (int p0 = r0; p0 < r1; p0 += NR) {
        float          y[2][ND], d[2][ND];
        const uint4   *xp[XT];

#pragma unroll
        for (int i = 0; i < XT; i++) {
            const int id = (int) threadIdx.x + NT * i;
            const int rr = min(p0 + min(id / U, NR - 1), r1 - 1);

            xp[i] = reinterpret_cast<const uint4 *>(
                        X + (size_t) (xrow != NULL ? xrow[rr] / xdiv : rr)
                            * ldx);
        }
#pragma unroll
        for (int mt = 0; mt < 2; mt++) {
#pragma unroll
            for (int i = 0; i < ND; i++) {
                y[mt][i] = d[mt][i] = 0.0f;
            }
        }

        if (ch0 < ch1) {
            const bool   one = cpg == 1;
            q4w_stage<U> st[ST];
            uint4        xr[XT][4];

            q4w_load_w<U>(st[0], wp, wstep, ch0);
            q4w_load_zs<U>(st[0], zp, zstep, sp, sstep,
                           one ? ch0 : ch0 / cpg);
            if (ch0 + 1 < ch1) {
                q4w_load_w<U>(st[1], wp, wstep, ch0 + 1);
                q4w_load_zs<U>(st[1], zp, zstep, sp, sstep,
                               one ? ch0 + 1 : (ch0 + 1) / cpg);
            }
            q4w_xload<U, NR, NT>(xr, xp, ch0);
            q4w_xstore<U, NR, NT>(sm, xr);
            if (ch0 + 1 < ch1) {
                q4w_xload<U, NR, NT>(xr, xp, ch0 + 1);
            }
            moe_wg_fence_proxy_async();
            __syncthreads();

            for (int ch = ch0; ch < ch1; ch += ST) {
#pragma unroll
                for (int j = 0; j < ST; j++) {
                    const int      cj = ch + j;

                    if (cj >= ch1) {
                        break;
                    }

                    unsigned char *buf = sm + j * BUF;
                    const uint64_t db = moe_wg_desc(buf);
                    const int      sd0 = one || cj % cpg == 0 ? 0 : 1;
                    uint32_t       a[U][2][2][4];
                    uint32_t       zz[4];

#pragma unroll
                    for (int i = 0; i < 4; i++) {
                        zz[i] = q4m_zz(((st[j].z >> (zsh + 4 * i)) & 15u)
                                       + (uint32_t) zero_bias);
                    }
#pragma unroll
                    for (int u = 0; u < U; u++) {
                        const uint32_t w4[4] = { st[j].w[u].x, st[j].w[u].y,
                                                 st[j].w[u].z,
                                                 st[j].w[u].w };

#pragma unroll
                        for (int mt = 0; mt < 2; mt++) {
                            const uint32_t wa = w4[2 * mt];
                            const uint32_t wb = w4[2 * mt + 1];
                            const uint32_t za = zz[2 * mt];
                            const uint32_t zb = zz[2 * mt + 1];

                            a[u][0][mt][0] = q4m_sub(q4m_nib2l(wa, 0), za);
                            a[u][0][mt][1] = q4m_sub(q4m_nib2l(wb, 0), zb);
                            a[u][0][mt][2] = q4m_sub(q4m_nib2l(wa, 4), za);
                            a[u][0][mt][3] = q4m_sub(q4m_nib2l(wb, 4), zb);
                            a[u][1][mt][0] = q4m_sub(q4m_nib2l(wa, 8), za);
                            a[u][1][mt][1] = q4m_sub(q4m_nib2l(wb, 8), zb);
                            a[u][1][mt][2] = q4m_sub(q4m_nib2l(wa, 12), za);
                            a[u][1][mt][3] = q4m_sub(q4m_nib2l(wb, 12), zb);
                        }
                    }
                    moe_wg_fence_regs_n(d[0]);
                    moe_wg_fence_regs_n(d[1]);
                    moe_wg_fence();
#pragma unroll
                    for (int u = 0; u < U; u++) {
#pragma unroll
                        for (int h = 0; h < 2; h++) {
                            const int      kb = 2 * u + h;
                            const uint64_t dk = db
                                                + (uint64_t) ((kb / 4) * NR
                                                              * 128 >> 4)
                                                + 2 * (kb % 4);
                            const int      sd = kb == 0 ? sd0 : 1;

                            q4w_mma<NR>(d[0], a[u][h][0], dk, sd);
                            q4w_mma<NR>(d[1], a[u][h][1], dk, sd);
                        }
                    }
                    moe_wg_commit();
                    /* while the tensor cores work: the weights two chunks
                     * on, the rows of the next chunk into the other B
                     * buffer (its readers, chunk cj - 1, have finished),
                     * the rows after them into registers */
                    if (cj + 1 < ch1) {
                        /* the proxy fence before the weight loads are
                         * issued (measured 6-7 % faster than after) */
                        q4w_xstore<U, NR, NT>(sm + (1 - j) * BUF, xr);
                        moe_wg_fence_proxy_async();
                    }
                    if (cj + ST < ch1) {
                        q4w_load_w<U>(st[j], wp, wstep, cj + ST);
                    }
                    if (pa > 0 && cj + ST + pa - 1 < ch1 && lane < 4 * U) {
                        moe_prefetch_l2(pfb + (size_t) (cj + ST + pa - 1)
                                              * pfstep);
                    }
                    if (cj + 2 < ch1) {
                        q4w_xload<U, NR, NT>(xr, xp, cj + 2);
                    }
                    moe_wg_wait<0>();
                    moe_wg_fence_regs_n(d[0]);
                    moe_wg_fence_regs_n(d[1]);
                    if (one || (cj + 1) % cpg == 0) {
                        /* the group's end: y += scale x sum (q - z') x */
#pragma unroll
                        for (int mt = 0; mt < 2; mt++) {
                            const uint32_t sw = mt ? st[j].s.y : st[j].s.x;
                            const float    s0 = q4m_h2f(sw, 0);
                            const float    s1 = q4m_h2f(sw, 1);

#pragma unroll
                            for (int i = 0; i < ND; i++) {
                                y[mt][i] = fmaf((i & 2) ? s1 : s0, d[mt][i],
                                                y[mt][i]);
                            }
                        }
                    }
                    if (cj + ST < ch1) {
                        q4w_load_zs<U>(st[j], zp, zstep, sp, sstep,
                                       one ? cj + ST : (cj + ST) / cpg);
                    }
                    __syncthreads();
                }
            }
        }

        /* the warps' sums over the B buffers (every wgmma has finished and
         * the block has synchronised), then the ranks' in a fixed order */
#pragma unroll
        for (int mt = 0; mt < 2; mt++) {
#pragma unroll
            for (int i = 0; i < ND; i++) {
                red[(warp * NR + mt * ND + i) * 32 + lane] = y[mt][i];
            }
        }
        cl.sync();
        {
            const int NO = (MR == 2 ? NW / 2 : NW) * NR * 32;

            for (int idx = rank * NT + (int) threadIdx.x; idx < NO;
                 idx += S * NT)
            {
                const int w = idx / (NR * 32), fl = idx % (NR * 32);
                const int f = fl / 32, l = fl % 32;
                const int mt = f / ND, i = f % ND;
                const int row = p0 + 8 * (i / 4) + 2 * (l & 3) + (i & 1);
                const int cw = 4 * (l >> 2) + 2 * mt + ((i >> 1) & 1);
                float     u = 0.0f;
                const float v = q_ranks_sum<MR == 2>(
                    cl, red, w * NR * 32 + fl, (w + NW / 2) * NR * 32 + fl,
                    S, &u);

                if (row < r1) {
                    if (MR == 1) {
                        Y[(size_t) row * ldy + (int) blockIdx.x * 128 * WGS
                          + w * 32 + cw] = v;
                    } else {
                        H[(size_t) row * ldy + (int) blockIdx.x * 64 * WGS
                          + w * 32 + cw] =
                            moe_f2bf(moe_silu_mul(v, u));
                    }
                }
            }
        }
        cl.sync();                      /* red / B free for the next pass */
    }
}


extern "C" int
moe_cuda_q4w_supported(int G, int Ntot, int K, int silu)
{
    return G > 0 && G % 64 == 0 && K > 0 && K % G == 0 && Ntot > 0
           && (silu ? Ntot % 2 == 0 && (Ntot / 2) % 64 == 0
                    : Ntot % 128 == 0);
}


template <int MR, int U, int NR, int MINB, int WGS>
static int
q4w_launch(int S_force, int pa, const bf16 *X, int ldx, const int32_t *xrow,
    int xdiv, const uint32_t *qw, const uint32_t *qz, const uint16_t *sc,
    int G, int zero_bias, int Ntot, int K, const int32_t *offs, int E, int n,
    float *Y, bf16 *H, int ldy, cudaStream_t stream)
{
    constexpr size_t    BUF = (size_t) U / 2 * NR * 128;
    constexpr size_t    RED = (size_t) 4 * WGS * NR * 32 * sizeof(float);
    constexpr size_t    SMEM = (2 * BUF > RED ? 2 * BUF : RED) + 1024;
    const int           tiles = MR == 2 ? Ntot / 2 / (64 * WGS)
                                        : Ntot / (128 * WGS);
    const int           ng = q_groups(offs, E, n);
    const int           S = S_force > 0 && S_force <= Q4W_SMAX
                            ? S_force
                            /* each rank at least 4 groups */
                            : q_cluster_split((int64_t) tiles * ng, K / G, 4,
                                              MINB, Q4W_SMAX);
    cudaLaunchConfig_t  cfg = {};
    cudaLaunchAttribute at[2] = {};

    static_assert(SMEM <= 48 * 1024, "q4w: shared memory over 48 KB");
    q_cluster_cfg(&cfg, at, tiles, ng, S, Q4W_NT * WGS, SMEM, stream);
    MOE_CUDA_CHECK(cudaLaunchKernelEx(&cfg,
                                      kernel_qgemm_q4w<MR, U, NR, MINB, WGS>,
                                      X, ldx, xrow, xdiv, qw, qz, sc, G,
                                      zero_bias, Ntot, K, offs, E, n, Y, H,
                                      ldy, pa));
    return MOE_K_OK;
}


template <int U, int NR, int MINB, int WGS = 1>
static int
q4w_go(int S_force, int pa, const bf16 *X, int ldx, const int32_t *xrow,
    int xdiv, const uint32_t *qw, const uint32_t *qz, const uint16_t *sc,
    int G, int zero_bias, int Ntot, int K, const int32_t *offs, int E, int n,
    float *Y, bf16 *H, int ldy, cudaStream_t stream)
{
    if (H != NULL) {
        return q4w_launch<2, U, NR, MINB, WGS>(S_force, pa, X, ldx, xrow, xdiv,
                                          qw, qz, sc, G, zero_bias, Ntot, K,
                                          offs, E, n, NULL, H, ldy, stream);
    }
    return q4w_launch<1, U, NR, MINB, WGS>(S_force, pa, X, ldx, xrow, xdiv, qw,
                                      qz, sc, G, zero_bias, Ntot, K, offs, E,
                                      n, Y, NULL, ldy, stream);
}


/* moe_cuda_qgemv_q4w with the cluster size (0: picked) and the L2
 * prefetch (0: none) forced (bench/dev/quant_gemv). */
static int
q4w_run(int shape, int S_force, int pa, const moe_bf16_t *X, int ldx,
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
    if (!moe_cuda_q4w_supported(G, Ntot, K, H != NULL)
        || !q_gptq_args_ok(X, ldx, qweight, qzeros, scales, offs, E, Y, H)
        || shape < 0 || shape > 8
        || (shape == 8 && !q4w_pair_ok(G, Ntot, H != NULL)))
    {
        moe_cuda_set_error("qgemv_q4w: unsupported shape (N %d, K %d, group "
                           "%d, ldx %d, E %d, shape %d, %s)", Ntot, K, G,
                           ldx, E, shape,
                           H != NULL ? "SiLU fused" : "fp32 out");
        return MOE_K_EUNSUPPORTED;
    }
    if (H != NULL) {
        ldy = Ntot / 2;
    }
    if (shape == 0) {
        /* 16 rows a pass for hints up to 16, else 32; 128 k a chunk when
         * the group allows; 32 rows and 128 k on two warpgroups a block
         * where the columns allow (3.5 / 6 % faster than one on the
         * mixtral gate|up / down at 32 rows, 2026-12-04 run 14a) */
        shape = (max_rows > 16 ? 3 : 1) + (G % 128 == 0 ? 1 : 0);
        if (shape == 4 && q4w_pair_ok(G, Ntot, H != NULL)) {
            shape = 8;
        }
    }
    if (G % 128 != 0 && (shape == 2 || shape == 4)) {
        shape--;                        /* 128 k chunks need G % 128 */
    }
#define Q4W_ARGS  S_force, pa, Xb, ldx, xrow, xdiv, qw, qz, scales, G, \
                  zero_bias, Ntot, K, offs, E, n, Y, Hb, ldy, stream
    switch (shape) {
    case 1:
        return q4w_go<2, 16, 2>(Q4W_ARGS);
    case 2:
        return q4w_go<4, 16, 2>(Q4W_ARGS);
    case 3:
        return q4w_go<2, 32, 2>(Q4W_ARGS);
    case 5:         /* dev: the L2 prefetch pa 0, 2, 6 (Q4W_PA; shape
                     * 4 otherwise) */
    case 6:
    case 7:
        pa = shape == 5 ? 0 : shape == 6 ? 2 : 6;
        return q4w_go<4, 32, 2>(Q4W_ARGS);
    case 8:         /* two warpgroups a block sharing the staged rows
                     * (256 / 128 + 128 columns), 1 a SM */
        return q4w_go<4, 32, 1, 2>(Q4W_ARGS);
    default:
        return q4w_go<4, 32, 2>(Q4W_ARGS);
    }
#undef Q4W_ARGS
}


extern "C" int
moe_cuda_qgemv_q4w(const moe_bf16_t *X, int ldx, const int32_t *xrow,
    int xdiv, const int32_t *qweight, const int32_t *qzeros,
    const uint16_t *scales, int G, int zero_bias, int Ntot, int K,
    const int32_t *offs, int E, int n, int max_rows, int shape, float *Y,
    int ldy, moe_bf16_t *H, cudaStream_t stream)
{
    return q4w_run(shape, 0, Q4W_PA, X, ldx, xrow, xdiv, qweight, qzeros,
                   scales, G, zero_bias, Ntot, K, offs, E, n, max_rows, Y,
                   ldy, H, stream);
}
