/*
 * Grouped small-M GEMM for decode-sized steps, two kernels:
 *
 * kernel_gemv_mma: tensor cores (mma.sync m16n8k16, bf16 in, fp32
 * accumulate).  A block of 4 warps owns 16 output columns (16 gate + 16 up
 * columns when the SiLU epilogue is fused) of one group (expert); its warps
 * split the reduction dimension in interleaved 32-wide chunks and their
 * partial sums are added in shared memory.  The weights are the mma's A
 * operand (rows = output columns), the tokens its B operand (8 per mma, up
 * to 64 per pass), both loaded straight from global memory as 16-byte
 * vectors: a thread (g = lane / 4, q = lane % 4) loads elements [8q, 8q + 8)
 * of a 32-wide chunk for its rows, and the two mmas of the chunk take words
 * {0, 1} and {2, 3} of it.  A and B use the same permutation of k, so the
 * sum over k is unchanged.  Weights are read with streaming loads, once per
 * pass; groups with no rows exit at once.
 */
#include "common.cuh"
#include "ptx.cuh"
#include "moe_gemv.h"

#define GV_WARPS 4

typedef __nv_bfloat16 bf16;


/* One stage of operands in registers: UNR 32-wide k chunks of the warp,
 * A (weights: MR row sets x 2 row halves) and B (NT x 8 tokens). */
template <int NT, int MR, int UNR>
struct gv_stage {
    uint4 a[UNR][MR][2];
    uint4 b[UNR][NT];
};


/* Issue the loads of the UNR chunks c0, c0 + GV_WARPS, ...; chunks past
 * nch (or k past Kd, rows out of range) load zeros and issue no access. */
template <int NT, int MR, int UNR>
__device__ __forceinline__ void
gv_load(gv_stage<NT, MR, UNR> &st, const bf16 *const (&arow)[MR][2],
    const bool (&aval)[MR][2], const bf16 *const (&brow)[NT],
    const bool (&bval)[NT], int c0, int nch, int Kd, int q)
{
#pragma unroll
    for (int u = 0; u < UNR; u++) {
        int  c = c0 + u * GV_WARPS;
        int  k = c * 32 + q * 8;
        bool kv = c < nch && k < Kd;

#pragma unroll
        for (int mr = 0; mr < MR; mr++) {
#pragma unroll
            for (int h = 0; h < 2; h++) {
                if (kv && aval[mr][h]) {
                    st.a[u][mr][h] = __ldcs(
                        reinterpret_cast<const uint4 *>(arow[mr][h] + k));
                } else {
                    st.a[u][mr][h] = make_uint4(0, 0, 0, 0);
                }
            }
        }
#pragma unroll
        for (int j = 0; j < NT; j++) {
            if (kv && bval[j]) {
                st.b[u][j] = *reinterpret_cast<const uint4 *>(brow[j] + k);
            } else {
                st.b[u][j] = make_uint4(0, 0, 0, 0);
            }
        }
    }
}


/* acc += the stage's products (zero operands add nothing). */
template <int NT, int MR, int UNR>
__device__ __forceinline__ void
gv_compute(float (&acc)[MR][NT][4], const gv_stage<NT, MR, UNR> &st)
{
#pragma unroll
    for (int u = 0; u < UNR; u++) {
#pragma unroll
        for (int j = 0; j < NT; j++) {
            uint4 bv = st.b[u][j];

#pragma unroll
            for (int mr = 0; mr < MR; mr++) {
                const uint4 *a = st.a[u][mr];

                moe_mma_bf16(acc[mr][j], a[0].x, a[1].x, a[0].y, a[1].y,
                             bv.x, bv.y);
                moe_mma_bf16(acc[mr][j], a[0].z, a[1].z, a[0].w, a[1].w,
                             bv.z, bv.w);
            }
        }
    }
}


template <int NT, int MR, int UNR, bool PIPE>
__global__ void __launch_bounds__(GV_WARPS * 32)
kernel_gemv_mma(const bf16 *X, int ldx, const int32_t *xrow, int xdiv,
    const bf16 *W, int N, int Kd, const int32_t *offs, int E, int n,
    float *Y, bf16 *H, int ldy)
{
    moe_pdl_enter();
    __shared__ float red[GV_WARPS][MR * NT * 4][32];
    int              e = blockIdx.y;
    int              lane = threadIdx.x & 31, warp = threadIdx.x >> 5;

    if (offs != NULL && (int) gridDim.y < E) {
        /* compact grid (fewer rows than groups): block y takes the y-th
         * non-empty group; every warp finds it alike (uniform exit) */
        e = moe_block_group(offs, E, lane);
        if (e < 0) {
            return;             /* fewer non-empty groups than gridDim.y */
        }
    }

    int              r0 = offs != NULL ? offs[e] : 0;
    int              r1 = offs != NULL ? offs[e + 1] : n;
    int              g = lane >> 2, q = lane & 3;
    int              j0 = blockIdx.x * 16;
    int              nch = (Kd + 31) >> 5;
    const bf16      *We = W + (size_t) e * MR * N * Kd;
    const bf16      *arow[MR][2];
    bool             aval[MR][2];

    if (r1 <= r0) {
        return;                 /* uniform over the block */
    }
#pragma unroll
    for (int mr = 0; mr < MR; mr++) {
#pragma unroll
        for (int h = 0; h < 2; h++) {
            int j = j0 + g + 8 * h;

            aval[mr][h] = j < N;
            arow[mr][h] = We + (size_t) (mr * N + (j < N ? j : 0)) * Kd;
        }
    }

    for (int p0 = r0; p0 < r1; p0 += 8 * NT) {
        float       acc[MR][NT][4];
        const bf16 *brow[NT];
        bool        bval[NT];

#pragma unroll
        for (int j = 0; j < NT; j++) {
            int r = p0 + 8 * j + g;
            int xr = 0;

            bval[j] = r < r1;
            if (bval[j]) {
                xr = xrow != NULL ? xrow[r] / xdiv : r;
            }
            brow[j] = X + (size_t) xr * ldx;
#pragma unroll
            for (int mr = 0; mr < MR; mr++) {
#pragma unroll
                for (int c = 0; c < 4; c++) {
                    acc[mr][j][c] = 0.0f;
                }
            }
        }

        gv_stage<NT, MR, UNR> st[2];
        const int             step = GV_WARPS * UNR;

        if (!PIPE) {
            for (int c0 = warp; c0 < nch; c0 += step) {
                gv_load<NT, MR, UNR>(st[0], arow, aval, brow, bval, c0, nch,
                                     Kd, q);
                gv_compute<NT, MR, UNR>(acc, st[0]);
            }
        } else if (warp < nch) {
            /* two stages in registers: the loads of chunk set i + 1 are in
             * flight while set i is multiplied (one stage waits a full
             * memory round trip per set) */
            gv_load<NT, MR, UNR>(st[0], arow, aval, brow, bval, warp, nch,
                                 Kd, q);
            for (int c0 = warp;; c0 += 2 * step) {
                gv_load<NT, MR, UNR>(st[1], arow, aval, brow, bval,
                                     c0 + step, nch, Kd, q);
                gv_compute<NT, MR, UNR>(acc, st[0]);
                if (c0 + step >= nch) {
                    break;
                }
                gv_load<NT, MR, UNR>(st[0], arow, aval, brow, bval,
                                     c0 + 2 * step, nch, Kd, q);
                gv_compute<NT, MR, UNR>(acc, st[1]);
                if (c0 + 2 * step >= nch) {
                    break;
                }
            }
        }

#pragma unroll
        for (int mr = 0; mr < MR; mr++) {
#pragma unroll
            for (int j = 0; j < NT; j++) {
#pragma unroll
                for (int c = 0; c < 4; c++) {
                    red[warp][(mr * NT + j) * 4 + c][lane] = acc[mr][j][c];
                }
            }
        }
        __syncthreads();
        for (int i = threadIdx.x; i < NT * 4 * 32; i += GV_WARPS * 32) {
            int   l = i & 31, jc = i >> 5, j = jc >> 2, c = jc & 3;
            int   col = j0 + (l >> 2) + (c >= 2 ? 8 : 0);
            int   r = p0 + 8 * j + 2 * (l & 3) + (c & 1);
            float v = 0.0f;

#pragma unroll
            for (int w = 0; w < GV_WARPS; w++) {
                v += red[w][jc][l];
            }
            if (col < N && r < r1) {
                if (MR == 2) {
                    float u = 0.0f;

#pragma unroll
                    for (int w = 0; w < GV_WARPS; w++) {
                        u += red[w][NT * 4 + jc][l];
                    }
                    H[(size_t) r * ldy + col] =
                        moe_f2bf(moe_silu_mul(v, u));
                } else {
                    Y[(size_t) r * ldy + col] = v;
                }
            }
        }
        __syncthreads();        /* red is rewritten by the next pass */
    }
}


/*
 * kernel_gemv_fma: CUDA-core path for groups of at most a few rows per pass
 * (decode at batch 1-8: the mma tile above wastes 7 of its 8 token columns
 * there).  A warp owns GF_CW output columns (their gate and up rows with the
 * SiLU epilogue) and reads each weight row as whole 512-byte segments (32
 * lanes x 16 bytes), GF_U segments of every row in flight per lane; the
 * input rows are read at the same k (L1/L2 hits); partial sums are reduced
 * across the warp with shuffles.  No shared memory, no block barrier.
 */
#define GF_WARPS 4
#define GF_CW    2
#define GF_U     4

__device__ __forceinline__ float
gf_dot8(uint4 w, uint4 x, float acc)
{
    const __nv_bfloat162 *wp = reinterpret_cast<const __nv_bfloat162 *>(&w);
    const __nv_bfloat162 *xp = reinterpret_cast<const __nv_bfloat162 *>(&x);

#pragma unroll
    for (int i = 0; i < 4; i++) {
        float2 a = __bfloat1622float2(wp[i]);
        float2 b = __bfloat1622float2(xp[i]);

        acc = fmaf(a.x, b.x, acc);
        acc = fmaf(a.y, b.y, acc);
    }
    return acc;
}


template <int NTF, bool SILU>
__global__ void __launch_bounds__(GF_WARPS * 32)
kernel_gemv_fma(const bf16 *X, int ldx, const int32_t *xrow, int xdiv,
    const bf16 *W, int N, int Kd, const int32_t *offs, int E, int n,
    float *Y, bf16 *H, int ldy)
{
    moe_pdl_enter();
    constexpr int RW = SILU ? 2 * GF_CW : GF_CW;
    int           lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    int           e = moe_block_group(offs, E, lane);
    int           col0 = (blockIdx.x * GF_WARPS + warp) * GF_CW;

    if (e < 0 || col0 >= N) {
        return;
    }

    int         r0 = offs != NULL ? offs[e] : 0;
    int         r1 = offs != NULL ? offs[e + 1] : n;
    const bf16 *We = W + (size_t) e * (SILU ? 2 : 1) * N * Kd;
    const bf16 *wr[RW];
    bool        wv[RW];

#pragma unroll
    for (int i = 0; i < RW; i++) {
        int c = col0 + (i % GF_CW);

        wv[i] = c < N;
        wr[i] = We + (size_t) ((i >= GF_CW ? N : 0) + (c < N ? c : 0)) * Kd;
    }

    for (int p0 = r0; p0 < r1; p0 += NTF) {
        float       acc[RW][NTF];
        const bf16 *xp[NTF];
        bool        xv[NTF];

#pragma unroll
        for (int t = 0; t < NTF; t++) {
            int r = p0 + t;

            xv[t] = r < r1;
            xp[t] = X + (size_t) (xv[t] ? (xrow != NULL ? xrow[r] / xdiv : r)
                                        : 0) * ldx;
#pragma unroll
            for (int i = 0; i < RW; i++) {
                acc[i][t] = 0.0f;
            }
        }

        for (int k0 = lane * 8; k0 < Kd; k0 += 256 * GF_U) {
            uint4 w[GF_U][RW];

#pragma unroll
            for (int u = 0; u < GF_U; u++) {
                int k = k0 + u * 256;

#pragma unroll
                for (int i = 0; i < RW; i++) {
                    w[u][i] = k < Kd && wv[i]
                              ? __ldcs(reinterpret_cast<const uint4 *>(
                                    wr[i] + k))
                              : make_uint4(0, 0, 0, 0);
                }
            }
#pragma unroll
            for (int u = 0; u < GF_U; u++) {
                int k = k0 + u * 256;

                if (k >= Kd) {
                    break;
                }
#pragma unroll
                for (int t = 0; t < NTF; t++) {
                    uint4 x = xv[t] ? __ldg(reinterpret_cast<const uint4 *>(
                                          xp[t] + k))
                                    : make_uint4(0, 0, 0, 0);

#pragma unroll
                    for (int i = 0; i < RW; i++) {
                        acc[i][t] = gf_dot8(w[u][i], x, acc[i][t]);
                    }
                }
            }
        }

#pragma unroll
        for (int i = 0; i < RW; i++) {
#pragma unroll
            for (int t = 0; t < NTF; t++) {
#pragma unroll
                for (int o = 16; o > 0; o >>= 1) {
                    acc[i][t] += __shfl_xor_sync(0xffffffffu, acc[i][t], o);
                }
            }
        }
        if (lane == 0) {
#pragma unroll
            for (int t = 0; t < NTF; t++) {
                if (!xv[t]) {
                    continue;
                }
#pragma unroll
                for (int i = 0; i < GF_CW; i++) {
                    if (!wv[i]) {
                        continue;
                    }
                    size_t o = (size_t) (p0 + t) * ldy + col0 + i;

                    if (SILU) {
                        float g = acc[i][t], v = acc[RW - GF_CW + i][t];

                        H[o] = moe_f2bf(moe_silu_mul(g, v));
                    } else {
                        Y[o] = acc[i][t];
                    }
                }
            }
        }
    }
}


template <int NTF>
static void
gf_launch(dim3 grid, cudaStream_t s, int silu, const bf16 *X, int ldx,
    const int32_t *xrow, int xdiv, const bf16 *W, int N, int Kd,
    const int32_t *offs, int E, int n, float *Y, bf16 *H, int ldy)
{
    if (silu) {
        (void) moe_launch(kernel_gemv_fma<NTF, true>, grid, GF_WARPS * 32, 0,
            s, X, ldx, xrow, xdiv, W, N, Kd, offs, E, n, Y, H, ldy);
    } else {
        (void) moe_launch(kernel_gemv_fma<NTF, false>, grid, GF_WARPS * 32, 0,
            s, X, ldx, xrow, xdiv, W, N, Kd, offs, E, n, Y, H, ldy);
    }
}


extern "C" int
moe_cuda_gemv_supported(int Kd, int ldx)
{
    return Kd > 0 && Kd % 8 == 0 && ldx % 8 == 0 && ldx >= Kd;
}


/* NT <= 2 (decode: up to 16 rows per group): two register stages; wider
 * tiles keep one (their B operands fill the registers). */
template <int NT>
static void
gv_launch(dim3 grid, cudaStream_t s, int silu, const bf16 *X, int ldx,
    const int32_t *xrow, int xdiv, const bf16 *W, int N, int Kd,
    const int32_t *offs, int E, int n, float *Y, bf16 *H, int ldy)
{
    constexpr bool PIPE = NT <= 2;

    if (silu) {
        (void) moe_launch(kernel_gemv_mma<NT, 2, 2, PIPE>, grid, GV_WARPS * 32,
            0, s, X, ldx, xrow, xdiv, W, N, Kd, offs, E, n, Y, H, ldy);
    } else {
        (void) moe_launch(kernel_gemv_mma<NT, 1, 4, PIPE>, grid, GV_WARPS * 32,
            0, s, X, ldx, xrow, xdiv, W, N, Kd, offs, E, n, Y, H, ldy);
    }
}


extern "C" int
moe_cuda_gemv(const moe_bf16_t *X, int ldx, const int32_t *xrow, int xdiv,
    const moe_bf16_t *W, int N, int Kd, const int32_t *offs, int E, int n,
    int max_rows, int silu, float *Y, moe_bf16_t *H, int ldy,
    const moe_cuda_tuning_t *tune, cudaStream_t stream)
{
    static const moe_cuda_tuning_t defaults = MOE_CUDA_TUNING_DEFAULTS;
    const bf16 *x = reinterpret_cast<const bf16 *>(X);
    const bf16 *w = reinterpret_cast<const bf16 *>(W);
    bf16       *h = reinterpret_cast<bf16 *>(H);
    dim3        grid;

    if (tune == NULL) {
        tune = &defaults;
    }
    if (!moe_cuda_gemv_supported(Kd, ldx) || N <= 0 || E <= 0
        || (xrow != NULL && xdiv <= 0))
    {
        moe_cuda_set_error("gemv: unsupported shape (N %d, Kd %d, ldx %d, "
                           "E %d)", N, Kd, ldx, E);
        return MOE_K_EUNSUPPORTED;
    }
    if (offs == NULL && (n <= 0 || E != 1)) {
        return n <= 0 ? MOE_K_OK : MOE_K_EUNSUPPORTED;
    }
    /* at most min(E, n) groups are non-empty: with fewer rows than groups
     * (decode: 2 of 8 experts at one token) the grid covers only that many
     * and the blocks find their group on the device (a grid of E lets
     * the empty ones exit: 5376 idle blocks per mixtral layer) */
    grid = dim3((unsigned) ((N + 15) / 16),
                (unsigned) (offs != NULL && n > 0 && n < E ? n : E));
    /* groups of up to gemv_fma_rows rows per pass: the CUDA-core kernel
     * (its tile is at most 4 rows) */
    if (max_rows <= tune->gemv_fma_rows && max_rows <= 4) {
        grid.x = (unsigned) ((N + GF_WARPS * GF_CW - 1) / (GF_WARPS * GF_CW));
        if (max_rows <= 1) {
            gf_launch<1>(grid, stream, silu, x, ldx, xrow, xdiv, w, N, Kd,
                         offs, E, n, Y, h, ldy);
        } else if (max_rows <= 2) {
            gf_launch<2>(grid, stream, silu, x, ldx, xrow, xdiv, w, N, Kd,
                         offs, E, n, Y, h, ldy);
        } else {
            gf_launch<4>(grid, stream, silu, x, ldx, xrow, xdiv, w, N, Kd,
                         offs, E, n, Y, h, ldy);
        }
        MOE_CUDA_CHECK_LAUNCH("kernel_gemv_fma");
        return MOE_K_OK;
    }
    if (max_rows <= 8) {
        gv_launch<1>(grid, stream, silu, x, ldx, xrow, xdiv, w, N, Kd, offs,
                     E, n, Y, h, ldy);
    } else if (max_rows <= 16) {
        gv_launch<2>(grid, stream, silu, x, ldx, xrow, xdiv, w, N, Kd, offs,
                     E, n, Y, h, ldy);
    } else if (max_rows <= 32) {
        gv_launch<4>(grid, stream, silu, x, ldx, xrow, xdiv, w, N, Kd, offs,
                     E, n, Y, h, ldy);
    } else {
        gv_launch<8>(grid, stream, silu, x, ldx, xrow, xdiv, w, N, Kd, offs,
                     E, n, Y, h, ldy);
    }
    MOE_CUDA_CHECK_LAUNCH("kernel_gemv_mma");
    return MOE_K_OK;
}
