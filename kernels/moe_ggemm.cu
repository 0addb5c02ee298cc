/*
 * Grouped GEMM on the tensor cores (mma.sync m16n8k16, bf16 in, fp32
 * accumulate) for MoE expert layers at 8-64 tokens per expert.
 *
 * A block of 4 warps owns BR = 64 MT weight rows of one group (expert) and
 * walks its tokens in tiles of BT (16, 32 or 64); per token tile the whole
 * reduction dimension is streamed through shared memory in chunks of 64 k
 * with an ST-stage cp.async pipeline (weights with an L2 evict-first
 * policy), one barrier per chunk.  Shared rows are padded to 72 bf16 (144
 * bytes) so that the 8 row addresses of an ldmatrix hit distinct banks.
 *
 * The weights are the mma's A operand (16 rows per m-tile, ldmatrix.x4),
 * the tokens its B operand (8 per n-tile, ldmatrix.x4 for two n-tiles);
 * warp w owns m-tiles MT w .. MT w + MT - 1 and all BT tokens.  Without
 * SiLU, m-tile t holds output columns j0 + 16 t .. + 15.  With SiLU, m-tile
 * t holds the gate rows of columns j0 + 8 t .. + 7 in its rows 0-7 and the
 * up rows of the same columns in rows 8-15: the accumulator of lane
 * (g, q) then has gate (c0, c1) and up (c2, c3) of column j0 + 8 t + g for
 * tokens 2q, 2q + 1, so the product is formed in registers.
 *
 * Token rows past the group's end and k past Kd are zero-filled (cp.async
 * src-size 0, no access) and never written.  The group offsets are read on
 * the device; the grid is (column tiles, groups), groups = min(E, n) (with
 * n < E each block finds the y-th non-empty group).
 */
#include "common.cuh"
#include "ptx.cuh"
#include "moe_ggemm.h"

typedef __nv_bfloat16 bf16;

#define GG_WARPS 4
#define GG_NT    (GG_WARPS * 32)        /* threads per block */
#define GG_BK    64                     /* k per pipeline stage */
#define GG_ROW   (GG_BK + 8)            /* bf16 per shared row (padded) */


/* Tile constants of kernel_ggemm<BT, MT, SILU>. */
template <int BT, int MT>
struct gg_cfg {
    static constexpr int BR = 64 * MT;                  /* weight rows */
    static constexpr int ST = MT == 1 ? 4 : 3;          /* stages */
    static constexpr int WL = BR * (GG_BK / 8) / GG_NT; /* 16 B copies */
    static constexpr int XL = BT * (GG_BK / 8) / GG_NT; /* per thread */
    static constexpr size_t SMEM =
        (size_t) ST * (BR + BT) * GG_ROW * sizeof(bf16);
    static_assert(BT % 16 == 0 && WL * GG_NT == BR * (GG_BK / 8)
                  && XL * GG_NT == BT * (GG_BK / 8), "tile load split");
};


/*
 * grid (ceil(N / (SILU ? 32 MT : 64 MT)), groups), GG_NT threads,
 * gg_cfg<BT, MT>::SMEM bytes of dynamic shared memory.
 */
template <int BT, int MT, bool SILU>
__global__ void __launch_bounds__(GG_NT, 2)
kernel_ggemm(const bf16 *X, int ldx, const int32_t *xrow, int xdiv,
    const bf16 *W, int N, int Kd, const int32_t *offs, int E, int n,
    float *Y, bf16 *H, int ldy, int pf)
{
    moe_pdl_enter();
    typedef gg_cfg<BT, MT> C;
    constexpr int BR = C::BR, ST = C::ST, WL = C::WL, XL = C::XL;
    constexpr int NP = BT / 16;                 /* n-tile pairs */

    extern __shared__ __align__(16) unsigned char gg_sm[];
    bf16       *w_s = reinterpret_cast<bf16 *>(gg_sm);  /* [ST][BR][ROW] */
    bf16       *x_s = w_s + ST * BR * GG_ROW;           /* [ST][BT][ROW] */
    const int   tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    const int   g = lane >> 2, q = lane & 3;
    const int   lr = tid >> 3, ch = tid & 7;    /* copy row (+16 i), chunk */
    const int   e = moe_block_group(offs, E, lane);
    const int   nk = (Kd + GG_BK - 1) / GG_BK;
    const int   j0 = blockIdx.x * (SILU ? 32 : 64) * MT;
    int         r0, r1;
    uint64_t    pol;
    const bf16 *wsrc;
    size_t      wstep;
    unsigned    wval = 0;

    if (e < 0) {
        return;                 /* fewer non-empty groups than gridDim.y */
    }
    r0 = offs != NULL ? offs[e] : 0;
    r1 = offs != NULL ? offs[e + 1] : n;
    if (r1 <= r0) {
        return;                 /* uniform over the block */
    }
    pol = moe_l2_evict_first();

    /* this thread's weight rows: shared rows lr + 16 i (m-tile i), i < WL;
     * global rows base + i * wstep, valid while the column is < N */
    {
        const bf16 *We = W + (size_t) e * (SILU ? 2 : 1) * N * Kd;
        int         col0 = SILU ? j0 + (lr & 7) : j0 + lr;
        int         row0 = SILU && lr >= 8 ? col0 + N : col0;

#pragma unroll
        for (int i = 0; i < WL; i++) {
            if (col0 + i * (SILU ? 8 : 16) < N) {
                wval |= 1u << i;
            }
        }
        wstep = (size_t) (SILU ? 8 : 16) * Kd;
        wsrc = wval != 0 ? We + (size_t) row0 * Kd + ch * 8 : W;
    }

    for (int p0 = r0; p0 < r1; p0 += BT) {
        const bf16 *xsrc[XL];
        unsigned    xval = 0;
        float       acc[MT][2 * NP][4];

        /* this thread's token rows: shared rows lr + 16 i, i < XL */
#pragma unroll
        for (int i = 0; i < XL; i++) {
            int r = p0 + lr + 16 * i;

            xsrc[i] = X;
            if (r < r1) {
                int xr = xrow != NULL ? xrow[r] / xdiv : r;

                xsrc[i] = X + (size_t) xr * ldx + ch * 8;
                xval |= 1u << i;
            }
        }
#pragma unroll
        for (int m = 0; m < MT; m++) {
#pragma unroll
            for (int t = 0; t < 2 * NP; t++) {
#pragma unroll
                for (int c = 0; c < 4; c++) {
                    acc[m][t][c] = 0.0f;
                }
            }
        }

        /* cp.async of k chunk kc into stage st (k past Kd: zeros) */
        auto load = [&](int kc, int st) {
            int   k = kc * GG_BK;
            bool  kv = k + ch * 8 < Kd;
            bf16 *wd = w_s + (st * BR + lr) * GG_ROW + ch * 8;
            bf16 *xd = x_s + (st * BT + lr) * GG_ROW + ch * 8;

#pragma unroll
            for (int i = 0; i < WL; i++) {
                bool        ok = kv && ((wval >> i) & 1u);
                const bf16 *src = ok ? wsrc + i * wstep + k : W;

                if (pf) {
                    moe_cp_async16_pol_pf(wd + i * 16 * GG_ROW, src,
                                          ok ? 16 : 0, pol);
                } else {
                    moe_cp_async16_pol(wd + i * 16 * GG_ROW, src,
                                       ok ? 16 : 0, pol);
                }
            }
#pragma unroll
            for (int i = 0; i < XL; i++) {
                bool ok = kv && ((xval >> i) & 1u);

                moe_cp_async16(xd + i * 16 * GG_ROW, ok ? xsrc[i] + k : X,
                               ok ? 16 : 0);
            }
        };

        /* prologue: stages 0 .. ST - 2 (one commit group each, empty past
         * nk, so that the group count stays uniform) */
#pragma unroll
        for (int s = 0; s < ST - 1; s++) {
            if (s < nk) {
                load(s, s);
            }
            moe_cp_async_commit();
        }

        int cs = 0, ls = ST - 1;        /* compute and load stages */

        for (int kc = 0; kc < nk; kc++) {
            /* groups committed: ST - 1 + kc; at most ST - 2 pending means
             * chunk kc has landed (this thread's copies; the barrier makes
             * every thread's visible and frees stage ls, read at kc - 1) */
            moe_cp_async_wait<ST - 2>();
            __syncthreads();
            if (kc + ST - 1 < nk) {
                load(kc + ST - 1, ls);
            }
            moe_cp_async_commit();

            const bf16 *ws = w_s + (cs * BR + warp * 16 * MT) * GG_ROW;
            const bf16 *xs = x_s + cs * BT * GG_ROW;

#pragma unroll
            for (int kk = 0; kk < GG_BK / 16; kk++) {
                uint32_t a[MT][4];

#pragma unroll
                for (int m = 0; m < MT; m++) {
                    moe_ldmatrix_x4(a[m][0], a[m][1], a[m][2], a[m][3],
                                    ws + (m * 16 + (lane & 15)) * GG_ROW
                                       + kk * 16 + (lane >> 4) * 8);
                }
#pragma unroll
                for (int np = 0; np < NP; np++) {
                    uint32_t b0, b1, b2, b3;

                    moe_ldmatrix_x4(b0, b1, b2, b3,
                                    xs + (np * 16 + (lane & 7)
                                          + ((lane >> 4) << 3)) * GG_ROW
                                       + kk * 16 + ((lane >> 3) & 1) * 8);
#pragma unroll
                    for (int m = 0; m < MT; m++) {
                        moe_mma_bf16(acc[m][2 * np], a[m][0], a[m][1],
                                     a[m][2], a[m][3], b0, b1);
                        moe_mma_bf16(acc[m][2 * np + 1], a[m][0], a[m][1],
                                     a[m][2], a[m][3], b2, b3);
                    }
                }
            }
            cs = cs == ST - 1 ? 0 : cs + 1;
            ls = ls == ST - 1 ? 0 : ls + 1;
        }

        /* epilogue: lane (g, q) holds rows g (c0, c1) and g + 8 (c2, c3)
         * of each m-tile, tokens 2q and 2q + 1 of each n-tile */
#pragma unroll
        for (int m = 0; m < MT; m++) {
            int mt = warp * MT + m;

#pragma unroll
            for (int t = 0; t < 2 * NP; t++) {
                int r = p0 + t * 8 + 2 * q;

#pragma unroll
                for (int h = 0; h < 2; h++) {
                    if (SILU) {
                        int   col = j0 + mt * 8 + g;
                        float gt = acc[m][t][h], up = acc[m][t][2 + h];

                        if (col < N && r + h < r1) {
                            H[(size_t) (r + h) * ldy + col] =
                                moe_f2bf(moe_silu_mul(gt, up));
                        }
                    } else {
                        int col = j0 + mt * 16 + g + 8 * h;

#pragma unroll
                        for (int c = 0; c < 2; c++) {
                            if (col < N && r + c < r1) {
                                Y[(size_t) (r + c) * ldy + col] =
                                    acc[m][t][2 * h + c];
                            }
                        }
                    }
                }
            }
        }
        __syncthreads();        /* the next tile's prologue reuses stages */
    }
}


/*
 * Launch kernel_ggemm<BT, MT, SILU> (raising its shared-memory limit once).
 * pf: the 256-byte L2 prefetch on the weight loads; the shipped launches
 * pass 0 (it lost 4-7 %: kernels/TUNING.md), bench/dev measures 1.
 */
template <int BT, int MT, bool SILU>
static int
gg_launch(unsigned groups, cudaStream_t s, const bf16 *X, int ldx,
    const int32_t *xrow, int xdiv, const bf16 *W, int N, int Kd,
    const int32_t *offs, int E, int n, float *Y, bf16 *H, int ldy, int pf)
{
    static int   ready = 0;
    const size_t sm = gg_cfg<BT, MT>::SMEM;
    const int    cols = (SILU ? 32 : 64) * MT;
    dim3         grid((unsigned) ((N + cols - 1) / cols), groups);

    if (!ready) {
        MOE_CUDA_CHECK(moe_smem_max_carveout(kernel_ggemm<BT, MT, SILU>, sm));
        ready = 1;
    }
    MOE_CUDA_CHECK(moe_launch(kernel_ggemm<BT, MT, SILU>, grid, GG_NT, sm, s,
        X, ldx, xrow, xdiv, W, N, Kd, offs, E, n, Y, H, ldy, pf));
    return MOE_K_OK;
}


template <int BT, int MT>
static int
gg_launch_s(int silu, unsigned groups, cudaStream_t s, const bf16 *X,
    int ldx, const int32_t *xrow, int xdiv, const bf16 *W, int N, int Kd,
    const int32_t *offs, int E, int n, float *Y, bf16 *H, int ldy)
{
    if (silu) {
        return gg_launch<BT, MT, true>(groups, s, X, ldx, xrow, xdiv, W, N,
                                       Kd, offs, E, n, Y, H, ldy, 0);
    }
    return gg_launch<BT, MT, false>(groups, s, X, ldx, xrow, xdiv, W, N, Kd,
                                    offs, E, n, Y, H, ldy, 0);
}


extern "C" int
moe_cuda_ggemm_supported(int N, int Kd, int ldx)
{
    return N > 0 && Kd > 0 && Kd % 8 == 0 && ldx % 8 == 0 && ldx >= Kd;
}


/* The launch's group count (0 when n is 0), or -1 with the error set for a
 * bad shape. */
static int
gg_groups(int N, int Kd, int ldx, const int32_t *xrow, int xdiv,
    const int32_t *offs, int E, int n)
{
    if (!moe_cuda_ggemm_supported(N, Kd, ldx) || E <= 0 || n < 0
        || (xrow != NULL && xdiv <= 0) || (offs == NULL && E != 1)
        || E > 65535)
    {
        moe_cuda_set_error("ggemm: unsupported shape (N %d, Kd %d, ldx %d, "
                           "E %d, n %d)", N, Kd, ldx, E, n);
        return -1;
    }
    /* at most min(E, n) groups are non-empty */
    return offs != NULL && n < E ? n : E;
}


extern "C" void
moe_cuda_ggemm_pick(int N, int E, int n, int silu, const int32_t *offs,
    int *bt, int *mt)
{
    unsigned groups = (unsigned) (offs != NULL && n < E ? n : E);
    int      avg, cols2;

    if (groups < 1) {
        groups = 1;
    }
    /* token tile: about 1.5x the mean rows per group (fuller groups take
     * a second pass over their weights) */
    avg = (n + (int) groups - 1) / (int) groups;
    *bt = avg <= 10 ? 16 : avg <= 22 ? 32 : 64;
    /* 128 weight rows per block (3 stages, 3 blocks per SM at BT <= 32)
     * when that still gives 3 blocks per SM, else 64 rows (4 stages) */
    cols2 = silu ? 64 : 128;
    *mt = *bt <= 32 && (int64_t) ((N + cols2 - 1) / cols2) * groups
                       >= 3 * (int64_t) moe_sm_count() ? 2 : 1;
}


extern "C" int
moe_cuda_ggemm_tiled(const moe_bf16_t *X, int ldx, const int32_t *xrow,
    int xdiv, const moe_bf16_t *W, int N, int Kd, const int32_t *offs,
    int E, int n, int silu, float *Y, moe_bf16_t *H, int ldy, int bt,
    int mt, cudaStream_t stream)
{
    const bf16 *x = reinterpret_cast<const bf16 *>(X);
    const bf16 *w = reinterpret_cast<const bf16 *>(W);
    bf16       *h = reinterpret_cast<bf16 *>(H);
    int         groups = gg_groups(N, Kd, ldx, xrow, xdiv, offs, E, n);

    if (groups < 0) {
        return MOE_K_EUNSUPPORTED;
    }
    if (n == 0) {
        return MOE_K_OK;
    }
#define GG_TILE(B, M)                                                        \
    if (bt == B && mt == M) {                                                \
        return gg_launch_s<B, M>(silu, (unsigned) groups, stream, x, ldx,    \
                                 xrow, xdiv, w, N, Kd, offs, E, n, Y, h,     \
                                 ldy);                                       \
    }
    GG_TILE(16, 1) GG_TILE(16, 2) GG_TILE(32, 1) GG_TILE(32, 2)
    GG_TILE(64, 1)
#undef GG_TILE
    moe_cuda_set_error("ggemm: tile %d/%d is not shipped (16/1, 16/2, 32/1, "
                       "32/2, 64/1)", bt, mt);
    return MOE_K_EUNSUPPORTED;
}


extern "C" int
moe_cuda_ggemm(const moe_bf16_t *X, int ldx, const int32_t *xrow, int xdiv,
    const moe_bf16_t *W, int N, int Kd, const int32_t *offs, int E, int n,
    int silu, float *Y, moe_bf16_t *H, int ldy, cudaStream_t stream)
{
    int bt, mt;

    if (gg_groups(N, Kd, ldx, xrow, xdiv, offs, E, n) < 0) {
        return MOE_K_EUNSUPPORTED;
    }
    if (n == 0) {
        return MOE_K_OK;
    }
    moe_cuda_ggemm_pick(N, E, n, silu, offs, &bt, &mt);
    return moe_cuda_ggemm_tiled(X, ldx, xrow, xdiv, W, N, Kd, offs, E, n,
                                silu, Y, H, ldy, bt, mt, stream);
}
