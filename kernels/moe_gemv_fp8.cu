/*
 * Grouped GEMV and grouped GEMM with e4m3 weights on the tensor cores
 * (contracts: moe_cuda_gemv_fp8 in moe_gemv.h, moe_cuda_ggemm_fp8 in
 * moe_ggemm.h).  The weights move as e4m3 bytes (half the bytes of bf16)
 * and are converted in registers into the bf16 A fragments of the same
 * mma.sync m16n8k16 (bf16 in, fp32 accumulate) the bf16 kernels use.
 *
 * Conversion (f8_cvt4, exact for every code but the NaNs 0x7f / 0xff,
 * which decode as +-480): e4m3 (s, e, m) placed as the bf16 bits
 * (s = 0, exponent e, mantissa m << 4) is |w| * 2^-120 exactly, normal
 * and subnormal codes alike (both formats' subnormals line up); one bf16x2
 * multiply by +-2^120 carrying the sign restores w exactly.  Integer ops
 * and one half-precision multiply, no conversion-unit instructions.  Four
 * bytes b0..b3 become the words (b0, b2) and (b1, b3): the activations are
 * paired the same way (one prmt per word), so the sum over k is unchanged.
 *
 * Scales: per tensor and per channel multiply the fp32 sums in the
 * epilogue (exact up to one fp32 rounding); 128x128 blocks: every 128-k
 * chunk of a 16-row tile lies in one block, so its fp32 partial sum is
 * multiplied by that block's scale and added to the running fp32 sum.
 *
 * kernel_gemv_fp8 (decode, up to NT x 8 rows per pass): kernel_gemv_mma's
 * layout; a block of 4 warps owns 16 output columns (and their up rows
 * with SiLU) of one group, warps take interleaved 128-k chunks, a lane
 * (g, q) streams 32 contiguous bytes of each of its rows per chunk
 * (16-byte streaming loads, a row's 128 bytes per 4 lanes), two register
 * stages of UNR chunks; partial sums added across warps in shared memory.
 *
 * kernel_ggemm_fp8 (8-64+ rows per group): kernel_ggemm's layout with
 * 128-k stages of e4m3 weights (64 rows x 128 bytes, rows padded to 144
 * bytes) and bf16 tokens (BT rows x 128, padded to 288 bytes) through a
 * 3- or 4-stage cp.async pipeline (no L2 cache hint: see load()); A
 * fragments read as 4-byte words from shared memory and converted, B as
 * 8-byte words (conflict-free with those pads).
 */
#include <cuda_fp16.h>

#include "common.cuh"
#include "ptx.cuh"
#include "moe_gemv.h"
#include "moe_ggemm.h"
#include "quant_gemv.h"

typedef __nv_bfloat16 bf16;

#define F8_WARPS 4                      /* warps per block (W), and */
#define F8_WARPS_WIDE 8                 /* for grids of under one wave */
#define F8_CK    128                    /* k per chunk / stage */


/* bf16x2 a * b, round to nearest (sm_90), subnormals kept. */
__device__ __forceinline__ uint32_t
f8_mul_bf16x2(uint32_t a, uint32_t b)
{
    uint32_t d;

    asm("mul.rn.bf16x2 %0, %1, %2;\n" : "=r"(d) : "r"(a), "r"(b));
    return d;
}


/* Four e4m3 bytes b0..b3 of x -> bf16x2 words (b0, b2) and (b1, b3). */
__device__ __forceinline__ void
f8_cvt4(uint32_t x, uint32_t &w02, uint32_t &w13)
{
    const uint32_t em = 0x07f007f0u, sg = 0x80008000u, p120 = 0x7b807b80u;

    w02 = f8_mul_bf16x2((x << 4) & em, ((x << 8) & sg) | p120);
    w13 = f8_mul_bf16x2((x >> 4) & em, (x & sg) | p120);
}


/* bf16 activations x0..x3 (words x01, x23) paired like f8_cvt4. */
__device__ __forceinline__ void
f8_pair(uint32_t x01, uint32_t x23, uint32_t &b0, uint32_t &b1)
{
    b0 = __byte_perm(x01, x23, 0x5410);         /* (x0, x2) */
    b1 = __byte_perm(x01, x23, 0x7632);         /* (x1, x3) */
}


/* Scale-table index base of weight row j (block mode: its block row). */
__device__ __forceinline__ float
f8_row_scale(const float *scale, int mode, int silu, int e, int N, int R,
    int j)
{
    if (mode == MOE_K_FP8_TENSOR) {
        return scale[e * (silu ? 2 : 1) + (silu && j >= N)];
    }
    if (mode == MOE_K_FP8_CHANNEL) {
        return scale[(size_t) e * R + j];
    }
    return 1.0f;
}


/* ------------------------------------------------------------------ */
/* kernel_gemv_fp8                                                     */

/* The lane's weight rows of one group e's 16-column tile (columns j0 + g
 * and j0 + g + 8 of each of the MR stacked matrices; aval false past N,
 * the pointer then a valid row) and, BLK, each matrix's 128x128 block-
 * scale row (nch = ceil(Kd / 128) scales a row); R = MR * N rows a
 * group. */
template <int MR, bool BLK>
__device__ __forceinline__ void
f8_gv_rows(const uint8_t *(&arow)[MR][2], bool (&aval)[MR][2],
    const float *(&bsc)[MR], const uint8_t *W, const float *scale, int e,
    int N, int R, int Kd, int j0, int g, int nch)
{
    const uint8_t *We = W + (size_t) e * R * Kd;

#pragma unroll
    for (int mr = 0; mr < MR; mr++) {
#pragma unroll
        for (int h = 0; h < 2; h++) {
            int j = j0 + g + 8 * h;

            aval[mr][h] = j < N;
            arow[mr][h] = We + (size_t) (mr * N + (j < N ? j : 0)) * Kd;
        }
        bsc[mr] = scale;
        if (BLK) {
            bsc[mr] = scale + (size_t) e * ((R + 127) / 128) * nch
                      + (size_t) ((mr * N + j0) / 128) * nch;
        }
    }
}


/* A operands of UNR chunks: [chunk][row set][row half][16-byte piece p];
 * lane q's piece p of a chunk is bytes q * 32 + p * 16 of each row's 128
 * for the bf16 fragments, p * 64 + q * 16 for the f16 ones (F16) */
template <int MR, int UNR>
struct f8_stage {
    uint4 a[UNR][MR][2][2];
};


template <int MR, int UNR, int NW, bool F16 = false>
__device__ __forceinline__ void
f8_gv_load(f8_stage<MR, UNR> &st, const uint8_t *const (&arow)[MR][2],
    const bool (&aval)[MR][2], int c0, int nch, int Kd, int q)
{
#pragma unroll
    for (int u = 0; u < UNR; u++) {
        int c = c0 + u * NW;

#pragma unroll
        for (int p = 0; p < 2; p++) {
            int  k = F16 ? c * F8_CK + p * 64 + q * 16
                         : c * F8_CK + q * 32 + p * 16;
            bool kv = c < nch && k < Kd;

#pragma unroll
            for (int mr = 0; mr < MR; mr++) {
#pragma unroll
                for (int h = 0; h < 2; h++) {
                    st.a[u][mr][h][p] = kv && aval[mr][h]
                        ? __ldcs(reinterpret_cast<const uint4 *>(
                              arow[mr][h] + k))
                        : make_uint4(0, 0, 0, 0);
                }
            }
        }
    }
}


/* acc += the products of chunk c (A in st.a[u]); BLK: per-chunk partial
 * sums times the block scales bs[mr]. */
template <int NT, int MR, int UNR, int NW, bool BLK>
__device__ __forceinline__ void
f8_gv_compute(float (&acc)[MR][NT][4], const f8_stage<MR, UNR> &st,
    const bf16 *const (&brow)[NT], const bool (&bval)[NT], int c0, int nch,
    int Kd, int q, const float *const (&bsc)[MR])
{
#pragma unroll
    for (int u = 0; u < UNR; u++) {
        int   c = c0 + u * NW;
        float part[MR][NT][4];
        float (&dst)[MR][NT][4] = BLK ? part : acc;

        if (c >= nch) {
            break;
        }
        if (BLK) {
#pragma unroll
            for (int mr = 0; mr < MR; mr++) {
#pragma unroll
                for (int j = 0; j < NT; j++) {
#pragma unroll
                    for (int i = 0; i < 4; i++) {
                        part[mr][j][i] = 0.0f;
                    }
                }
            }
        }
#pragma unroll
        for (int p = 0; p < 2; p++) {
            /* k past Kd (a lane's part of the last chunk): the weights
             * loaded as zeros, the activations are not read; no lane
             * leaves the loop (mma.sync needs the whole warp) */
            int      k = c * F8_CK + q * 32 + p * 16;
            uint32_t xb[NT][8];

#pragma unroll
            for (int j = 0; j < NT; j++) {
                uint4 v0 = make_uint4(0, 0, 0, 0), v1 = v0;

                if (bval[j] && k < Kd) {
                    const uint4 *xp =
                        reinterpret_cast<const uint4 *>(brow[j] + k);

                    v0 = __ldg(xp);
                    v1 = __ldg(xp + 1);
                }
                f8_pair(v0.x, v0.y, xb[j][0], xb[j][1]);
                f8_pair(v0.z, v0.w, xb[j][2], xb[j][3]);
                f8_pair(v1.x, v1.y, xb[j][4], xb[j][5]);
                f8_pair(v1.z, v1.w, xb[j][6], xb[j][7]);
            }
#pragma unroll
            for (int mr = 0; mr < MR; mr++) {
                const uint4 &lo = st.a[u][mr][0][p], &hi = st.a[u][mr][1][p];
                const uint32_t xl[4] = { lo.x, lo.y, lo.z, lo.w };
                const uint32_t xh[4] = { hi.x, hi.y, hi.z, hi.w };

#pragma unroll
                for (int i = 0; i < 4; i++) {
                    uint32_t l02, l13, h02, h13;

                    f8_cvt4(xl[i], l02, l13);
                    f8_cvt4(xh[i], h02, h13);
#pragma unroll
                    for (int j = 0; j < NT; j++) {
                        moe_mma_bf16(dst[mr][j], l02, h02, l13, h13,
                                     xb[j][2 * i], xb[j][2 * i + 1]);
                    }
                }
            }
        }
        if (BLK) {
#pragma unroll
            for (int mr = 0; mr < MR; mr++) {
                /* bsc[mr]: the block-scale row of row set mr's rows */
                float s = __ldg(bsc[mr] + c);

#pragma unroll
                for (int j = 0; j < NT; j++) {
#pragma unroll
                    for (int i = 0; i < 4; i++) {
                        acc[mr][j][i] = fmaf(s, part[mr][j][i],
                                             acc[mr][j][i]);
                    }
                }
            }
        }
    }
}


/* Bring the 128-byte lines of the chunks c0, c0 + NW, .. (2 UNR of them:
 * both register stages) of this lane's rows into L2 (lanes q == 0; no
 * register, no wait). */
template <int MR, int UNR, int NW>
__device__ __forceinline__ void
f8_gv_prefetch(const uint8_t *const (&arow)[MR][2],
    const bool (&aval)[MR][2], int c0, int nch, int q)
{
    if (q != 0) {
        return;
    }
#pragma unroll
    for (int u = 0; u < 2 * UNR; u++) {
        int c = c0 + u * NW;

#pragma unroll
        for (int mr = 0; mr < MR; mr++) {
#pragma unroll
            for (int h = 0; h < 2; h++) {
                if (c < nch && aval[mr][h]) {
                    asm volatile("prefetch.global.L2 [%0];\n"
                                 :: "l"(arow[mr][h] + (size_t) c * F8_CK));
                }
            }
        }
    }
}


/* A pass's K loop, shared by kernel_gemv_fp8 and kernel_gemv_fp8h: two
 * register stages of UNR chunks (st[0] already loaded by the caller, and
 * st[1] too when pre1), the weight loads of one in flight while the
 * other goes through mul(stage, its first chunk). */
template <int MR, int UNR, int NW, bool F16, typename M>
__device__ __forceinline__ void
f8_gv_loop(f8_stage<MR, UNR> (&st)[2], const uint8_t *const (&arow)[MR][2],
    const bool (&aval)[MR][2], int warp, int nch, int Kd, int q, M mul,
    bool pre1 = false)
{
    const int step = NW * UNR;

    for (int c0 = warp;; c0 += 2 * step) {
        /* pre1: st[1] of the first round was loaded by the caller */
        if (!pre1 || c0 != warp) {
            f8_gv_load<MR, UNR, NW, F16>(st[1], arow, aval, c0 + step, nch,
                                         Kd, q);
        }
        mul(st[0], c0);
        if (c0 + step >= nch) {
            break;
        }
        f8_gv_load<MR, UNR, NW, F16>(st[0], arow, aval, c0 + 2 * step, nch,
                                     Kd, q);
        mul(st[1], c0 + step);
        if (c0 + 2 * step >= nch) {
            break;
        }
    }
}


/* One output of a pass, shared by the two GEMV kernels' epilogues: the
 * warps' sums of entry (f, l) of red (MR 2: and of the up half's entry
 * (UP + f, l)), for column col of token row r when ok, times the
 * weight row's scale (HS: and first the row's power-of-two hs[t]),
 * written to Y, or silu(gate) up to H. */
template <int MR, int NW, int MODE, int UP, bool HS, int F>
__device__ __forceinline__ void
f8_gv_out(const float (&red)[NW][F][32], int f, int l, bool ok,
    const float *hs, int t, const float *scale, int e, int N, int R,
    int col, int r, float *Y, bf16 *H, int ldy)
{
    float v = 0.0f;

#pragma unroll
    for (int w = 0; w < NW; w++) {
        v += red[w][f][l];
    }
    if (!ok) {
        return;
    }
    v = (HS ? v * hs[t] : v)
        * f8_row_scale(scale, MODE, MR == 2, e, N, R, col);
    if (MR == 2) {
        float u = 0.0f;

#pragma unroll
        for (int w = 0; w < NW; w++) {
            u += red[w][UP + f][l];
        }
        u = (HS ? u * hs[t] : u)
            * f8_row_scale(scale, MODE, 1, e, N, R, N + col);
        H[(size_t) r * ldy + col] = moe_f2bf(moe_silu_mul(v, u));
    } else {
        Y[(size_t) r * ldy + col] = v;
    }
}

/*
 * grid (ceil(N / 16), groups), NW warps (F8_WARPS, or F8_WARPS_WIDE when
 * the grid is under one wave: the K range in more pieces).  MR 2: SiLU
 * (gate rows j0.., up rows N + j0..).  MODE: MOE_K_FP8_*.
 * Dense (offs NULL): which weights a block reads does not depend on the
 * kernels before it, so its first two stages' lines are requested into
 * L2 before moe_pdl_enter (a prefetch is only a hint and L2 is coherent:
 * safe even if the kernel before wrote them); with PDL that overlaps
 * the end of the kernel before.  Grouped launches find their group in
 * offs, written by the kernels before: they wait first.
 */
template <int NT, int MR, int UNR, int MODE, int NW>
__global__ void __launch_bounds__(NW * 32)
kernel_gemv_fp8(const bf16 *X, int ldx, const int32_t *xrow, int xdiv,
    const uint8_t *W, const float *scale, int N, int Kd,
    const int32_t *offs, int E, int n, float *Y, bf16 *H, int ldy)
{
    if (offs != NULL) {
        moe_pdl_enter();
    }
    constexpr bool BLK = MODE == MOE_K_FP8_BLOCK;
    __shared__ float red[NW][MR * NT * 4][32];
    const int        lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int        g = lane >> 2, q = lane & 3;
    /* offs NULL: blockIdx.y, nothing read */
    const int        e = moe_block_group(offs, E, lane);
    const int        j0 = blockIdx.x * 16;
    const int        R = MR * N;
    const int        nch = (Kd + F8_CK - 1) / F8_CK;
    int              r0, r1;

    if (e < 0) {
        return;                 /* fewer non-empty groups than gridDim.y */
    }
    r0 = offs != NULL ? offs[e] : 0;
    r1 = offs != NULL ? offs[e + 1] : n;
    if (r1 <= r0) {
        return;                 /* uniform over the block */
    }

    const uint8_t *arow[MR][2];
    bool           aval[MR][2];
    const float   *bsc[MR];

    f8_gv_rows<MR, BLK>(arow, aval, bsc, W, scale, e, N, R, Kd, j0, g, nch);

    if (offs == NULL) {
        if (warp < nch) {
            f8_gv_prefetch<MR, UNR, NW>(arow, aval, warp, nch, q);
        }
        moe_pdl_enter();
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

        /* two stages in registers: the weight loads of chunk set i + 1
         * are in flight while set i is converted and multiplied */
        f8_stage<MR, UNR> st[2];

        if (warp < nch) {
            f8_gv_load<MR, UNR, NW>(st[0], arow, aval, warp, nch, Kd, q);
            f8_gv_loop<MR, UNR, NW, false>(
                st, arow, aval, warp, nch, Kd, q,
                [&](const f8_stage<MR, UNR> &sg, int c0) {
                    f8_gv_compute<NT, MR, UNR, NW, BLK>(acc, sg, brow, bval,
                                                        c0, nch, Kd, q, bsc);
                });
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
        for (int i = threadIdx.x; i < NT * 4 * 32; i += NW * 32) {
            int l = i & 31, jc = i >> 5, j = jc >> 2, c = jc & 3;
            int col = j0 + (l >> 2) + (c >= 2 ? 8 : 0);
            int r = p0 + 8 * j + 2 * (l & 3) + (c & 1);

            f8_gv_out<MR, NW, MODE, NT * 4, false>(
                red, jc, l, col < N && r < r1, NULL, 0, scale, e, N, R,
                col, r, Y, H, ldy);
        }
        __syncthreads();        /* red is rewritten by the next pass */
    }
}


/* ------------------------------------------------------------------ */
/* kernel_gemv_fp8h: f16 fragments                                     */

/* Bytes of staged f16 activations a block may use (TP x Kp x 2). */
#define F8H_SMEM_MAX (72 * 1024)
#define F8H_PAD      8                  /* f16 past each staged row */
#define F8H_AUTO_ROWS 2                 /* moe_cuda_gemv_fp8 takes it up to */


/* Two e4m3 codes of each half of w -> f16x2 lo (bytes 0, 1) and hi
 * (bytes 2, 3), the lower byte in the lower half; exact (e4m3 is a
 * subset of f16, subnormals included; the NaN codes stay NaN). */
__device__ __forceinline__ void
f8h_cvt(uint32_t w, uint32_t &lo, uint32_t &hi)
{
    asm("{\n\t.reg .b16 l, h;\n\t"
        "mov.b32 {l, h}, %2;\n\t"
        "cvt.rn.f16x2.e4m3x2 %0, l;\n\t"
        "cvt.rn.f16x2.e4m3x2 %1, h;\n\t}"
        : "=r"(lo), "=r"(hi) : "r"(w));
}


/* acc += the products of the chunks of st (B: this lane's token row of the
 * staged f16 activations xt, NULL for lanes past the pass's tokens). */
template <int MR, int UNR, int NW, bool BLK>
__device__ __forceinline__ void
f8h_compute(float (&acc)[MR][4], const f8_stage<MR, UNR> &st,
    const uint16_t *xt, int c0, int nch, int q, const float *const (&bsc)[MR])
{
#pragma unroll
    for (int u = 0; u < UNR; u++) {
        int   c = c0 + u * NW;
        float part[MR][4];
        float (&dst)[MR][4] = BLK ? part : acc;

        if (c >= nch) {
            break;
        }
        if (BLK) {
#pragma unroll
            for (int mr = 0; mr < MR; mr++) {
#pragma unroll
                for (int i = 0; i < 4; i++) {
                    part[mr][i] = 0.0f;
                }
            }
        }
#pragma unroll
        for (int p = 0; p < 2; p++) {
            /* the staged rows are zero past Kd up to the chunk's end */
            uint4 v0 = make_uint4(0, 0, 0, 0), v1 = v0;

            if (xt != NULL) {
                const uint4 *xp = reinterpret_cast<const uint4 *>(
                    xt + c * F8_CK + p * 64 + q * 16);

                v0 = xp[0];
                v1 = xp[1];
            }
            const uint32_t xb[8] = { v0.x, v0.y, v0.z, v0.w,
                                     v1.x, v1.y, v1.z, v1.w };

#pragma unroll
            for (int mr = 0; mr < MR; mr++) {
                const uint4 &lo = st.a[u][mr][0][p], &hi = st.a[u][mr][1][p];
                const uint32_t wl[4] = { lo.x, lo.y, lo.z, lo.w };
                const uint32_t wh[4] = { hi.x, hi.y, hi.z, hi.w };

#pragma unroll
                for (int i = 0; i < 4; i++) {
                    uint32_t l0, l1, h0, h1;

                    /* word i: k pairs 4i, 4i+1 (l0 / h0) and 4i+2, 4i+3
                     * (l1 / h1) of rows g / g + 8: the activation words
                     * 2i and 2i + 1 */
                    f8h_cvt(wl[i], l0, l1);
                    f8h_cvt(wh[i], h0, h1);
                    moe_mma_f16(dst[mr], l0, h0, l1, h1, xb[2 * i],
                                xb[2 * i + 1]);
                }
            }
        }
        if (BLK) {
#pragma unroll
            for (int mr = 0; mr < MR; mr++) {
                float s = __ldg(bsc[mr] + c);

#pragma unroll
                for (int i = 0; i < 4; i++) {
                    acc[mr][i] = fmaf(s, part[mr][i], acc[mr][i]);
                }
            }
        }
    }
}


/* The power-of-two exponent d that puts a row whose largest |x| has the
 * bf16 magnitude bits mx (0x7fff-masked; Inf / NaN: 0x7f80 and up) in
 * [2^14, 2^15): bf16 exponent field E bounds |x| < 2^(E - 126); clamped
 * to +-120 so that 2^d and 2^-d are normal floats (0 for a zero row). */
__device__ __forceinline__ int
f8h_exp(uint32_t mx)
{
    int d = mx == 0 ? 0 : 141 - (int) (mx >> 7);

    return d < -120 ? -120 : d > 120 ? 120 : d;
}


/* The largest bf16 magnitude bits (0x7fff-masked) of row src's nv
 * 8-value vectors that this warp's lanes read (vectors tid, tid + stride,
 * ..), the same in every lane; all 32 lanes call it. */
__device__ __forceinline__ uint32_t
f8h_warp_absmax(const uint4 *src, int nv, int tid, int stride)
{
    uint32_t mm = 0;

    for (int v = tid; v < nv; v += stride) {
        uint4 w = __ldg(src + v);

        mm = __vmaxu2(mm, w.x & 0x7fff7fffu);
        mm = __vmaxu2(mm, w.y & 0x7fff7fffu);
        mm = __vmaxu2(mm, w.z & 0x7fff7fffu);
        mm = __vmaxu2(mm, w.w & 0x7fff7fffu);
    }
    return __reduce_max_sync(0xffffffffu, max(mm & 0xffffu, mm >> 16));
}


/* Eight bf16 (w) times 2^d (s) -> eight f16 (round to nearest). */
__device__ __forceinline__ uint4
f8h_cvt_row8(uint4 w, float s)
{
    const uint32_t wi[4] = { w.x, w.y, w.z, w.w };
    uint32_t       wo[4];

#pragma unroll
    for (int i = 0; i < 4; i++) {
        float   a = __uint_as_float(wi[i] << 16) * s;
        float   b = __uint_as_float(wi[i] & 0xffff0000u) * s;
        __half2 hh = __floats2half2_rn(a, b);

        wo[i] = *reinterpret_cast<uint32_t *>(&hh);
    }
    return make_uint4(wo[0], wo[1], wo[2], wo[3]);
}


/*
 * Stage the pass's tokens p0 .. p0 + TP - 1 (those below r1) into xs as
 * f16, row t at xs + t * xsl, each scaled by its own power of two 2^d:
 * d puts the row's largest |x| in [2^14, 2^15) (clamped to +-120), so
 * every bf16 value from 2^-29 of the row's largest up is exact in f16
 * and none overflows; the sums are multiplied back by sinv[t] = 2^-d.
 * Rows past r1 and the columns Kd .. nch * 128 are zeros.
 */
template <int NW>
__device__ __forceinline__ void
f8h_stage(uint16_t *xs, int xsl, float *sinv, uint32_t (*smax)[8],
    const bf16 *X, int ldx, const int32_t *xrow, int xdiv, int p0, int r1,
    int TP, int Kd, int nch)
{
    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    const int nv = Kd / 8, nvp = nch * (F8_CK / 8);
    const uint4 *xr[8];
    uint32_t     m[8];

#pragma unroll
    for (int t = 0; t < 8; t++) {
        int r = p0 + t;

        xr[t] = NULL;
        m[t] = 0;
        if (t < TP && r < r1) {
            int x = xrow != NULL ? xrow[r] / xdiv : r;

            xr[t] = reinterpret_cast<const uint4 *>(X + (size_t) x * ldx);
        }
    }
#pragma unroll
    for (int t = 0; t < 8; t++) {
        if (xr[t] == NULL) {
            continue;
        }
        m[t] = f8h_warp_absmax(xr[t], nv, tid, NW * 32);
    }
    if (lane == 0) {
#pragma unroll
        for (int t = 0; t < 8; t++) {
            smax[warp][t] = m[t];
        }
    }
    __syncthreads();
#pragma unroll
    for (int t = 0; t < 8; t++) {
        uint32_t mx = 0;
        int      d;
        float    s;

        if (t >= TP) {
            break;
        }
        if (xr[t] == NULL) {
            continue;           /* no lane reads an absent row */
        }
#pragma unroll
        for (int w = 0; w < NW; w++) {
            mx = max(mx, smax[w][t]);
        }
        d = f8h_exp(mx);
        s = __int_as_float((127 + d) << 23);
        if (tid == 0) {
            sinv[t] = __int_as_float((127 - d) << 23);
        }
        uint4 *dst = reinterpret_cast<uint4 *>(xs + (size_t) t * xsl);

        for (int v = tid; v < nvp; v += NW * 32) {
            uint4 w = make_uint4(0, 0, 0, 0);

            if (xr[t] != NULL && v < nv) {
                w = __ldg(xr[t] + v);
            }
            dst[v] = f8h_cvt_row8(w, s);
        }
    }
    __syncthreads();
}


/*
 * kernel_gemv_fp8 on f16 fragments: the same grid, blocks and epilogue
 * (one 16-column tile of one group, warps on interleaved 128-k chunks,
 * two register stages of UNR chunks), but each pass's TP <= 8 token rows
 * are first staged in shared memory as f16 (f8h_stage: per-row power-of-
 * two scale), and the weights become f16 A fragments with one
 * cvt.rn.f16x2.e4m3x2 per two weights for mma.m16n8k16.f16: ~1/3 of
 * kernel_gemv_fp8's instructions per weight byte (its bf16 fragments
 * take ~2.25 integer / bf16 instructions a weight, and the activations
 * are re-read and paired per chunk).  Dynamic shared memory: TP rows of
 * nch * 128 + F8H_PAD f16.
 */
template <int MR, int UNR, int MODE, int NW, bool PRE = false>
__global__ void __launch_bounds__(NW * 32, PRE ? 3 : 0)
kernel_gemv_fp8h(const bf16 *X, int ldx, const int32_t *xrow, int xdiv,
    const uint8_t *W, const float *scale, int N, int Kd,
    const int32_t *offs, int E, int n, int TP, float *Y, bf16 *H, int ldy)
{
    if (offs != NULL) {
        moe_pdl_enter();
    }
    constexpr bool BLK = MODE == MOE_K_FP8_BLOCK;
    extern __shared__ uint4 f8h_dyn[];
    __shared__ float    red[NW][MR * 4][32];
    __shared__ uint32_t smax[NW][8];
    __shared__ float    sinv[8];
    uint16_t           *xs = reinterpret_cast<uint16_t *>(f8h_dyn);
    const int           lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int           g = lane >> 2, q = lane & 3;
    const int           e = moe_block_group(offs, E, lane);
    const int           j0 = blockIdx.x * 16;
    const int           R = MR * N;
    const int           nch = (Kd + F8_CK - 1) / F8_CK;
    const int           xsl = nch * F8_CK + F8H_PAD;
    int                 r0, r1;

    if (e < 0) {
        return;
    }
    r0 = offs != NULL ? offs[e] : 0;
    r1 = offs != NULL ? offs[e + 1] : n;
    if (r1 <= r0) {
        return;
    }

    const uint8_t *arow[MR][2];
    bool           aval[MR][2];
    const float   *bsc[MR];

    f8_gv_rows<MR, BLK>(arow, aval, bsc, W, scale, e, N, R, Kd, j0, g, nch);

    f8_stage<MR, UNR> stp[2];   /* PRE: the stages loaded before the wait */

    /* PRE (its own instantiations, launched for one matrix without
     * SiLU in 4-warp blocks held to three an SM: both register stages
     * live across the wait and the staging take ~40 more registers,
     * which the other launches should not pay), one pass: both register
     * stages of weights are loaded before the wait, so they stream
     * while the kernel before runs (weights are never written); else
     * their first lines are only asked into L2 there */
    bool pre = PRE && MR == 1 && offs == NULL && r1 - r0 <= TP;
    if (offs == NULL) {
        if (warp < nch) {
            if (pre) {
                f8_gv_load<MR, UNR, NW, true>(stp[0], arow, aval, warp, nch,
                                              Kd, q);
                f8_gv_load<MR, UNR, NW, true>(stp[1], arow, aval,
                                              warp + NW * UNR, nch, Kd, q);
                /* and the next two stages' lines into L2 */
                if (warp + 2 * NW * UNR < nch) {
                    f8_gv_prefetch<MR, UNR, NW>(arow, aval,
                                                warp + 2 * NW * UNR, nch, q);
                }
            } else {
                f8_gv_prefetch<MR, UNR, NW>(arow, aval, warp, nch, q);
            }
        }
        moe_pdl_enter();
    }

    for (int p0 = r0; p0 < r1; p0 += TP) {
        float             acc[MR][4];
        f8_stage<MR, UNR> stl[2];
        /* PRE: the stages declared outside the pass loop (so that those
         * loaded before the wait are used in place); else inside it, as
         * the other launches always had them (their registers: 128) */
        f8_stage<MR, UNR> (&st)[2] = PRE ? stp : stl;
        const uint16_t   *xt = g < TP && p0 + g < r1
                               ? xs + (size_t) g * xsl : NULL;

#pragma unroll
        for (int mr = 0; mr < MR; mr++) {
#pragma unroll
            for (int c = 0; c < 4; c++) {
                acc[mr][c] = 0.0f;
            }
        }
        /* the first stage's weights are in flight while the rows are
         * staged */
        if (warp < nch && !pre) {
            f8_gv_load<MR, UNR, NW, true>(st[0], arow, aval, warp, nch, Kd,
                                          q);
        }
        f8h_stage<NW>(xs, xsl, sinv, smax, X, ldx, xrow, xdiv, p0, r1, TP,
                      Kd, nch);
        if (warp < nch) {
            f8_gv_loop<MR, UNR, NW, true>(
                st, arow, aval, warp, nch, Kd, q,
                [&](const f8_stage<MR, UNR> &sg, int c0) {
                    f8h_compute<MR, UNR, NW, BLK>(acc, sg, xt, c0, nch, q,
                                                  bsc);
                }, pre);
        }
        pre = false;

#pragma unroll
        for (int mr = 0; mr < MR; mr++) {
#pragma unroll
            for (int c = 0; c < 4; c++) {
                red[warp][mr * 4 + c][lane] = acc[mr][c];
            }
        }
        __syncthreads();
        for (int i = threadIdx.x; i < 4 * 32; i += NW * 32) {
            int l = i & 31, c = i >> 5;
            int col = j0 + (l >> 2) + (c >= 2 ? 8 : 0);
            int t = 2 * (l & 3) + (c & 1), r = p0 + t;

            f8_gv_out<MR, NW, MODE, 4, true>(
                red, c, l, col < N && t < TP && r < r1, sinv, t, scale, e,
                N, R, col, r, Y, H, ldy);
        }
        __syncthreads();        /* red, xs and sinv are rewritten next */
    }
}


/* Whether a grid of `blocks` 4-warp blocks (NT 1, no SiLU) fits in one
 * wave of F8_WARPS_WIDE-warp blocks: then the wide kernel splits each
 * column tile's K range over twice the warps, and the SMs hold twice the
 * loads in flight (mixtral's o projection at batch 1: 256 blocks on 132
 * SMs, 8 of the 16 warps an SM can hold). */
template <int MODE>
static bool
f8_gv_wide(int64_t blocks)
{
    static int per_sm = -1;

    if (per_sm < 0) {
        int nb = 0;

        if (cudaOccupancyMaxActiveBlocksPerMultiprocessor(
                &nb, kernel_gemv_fp8<1, 1, 2, MODE, F8_WARPS_WIDE>,
                F8_WARPS_WIDE * 32, 0) != cudaSuccess)
        {
            (void) cudaGetLastError();
            nb = 0;
        }
        per_sm = nb;
    }
    return blocks <= (int64_t) per_sm * moe_sm_count();
}


/* wide: -1 the rule above, 0 / 1 forced (NT 1 without SiLU only). */
template <int NT, int MODE>
static void
f8_gv_launch(dim3 grid, cudaStream_t s, int silu, int wide, const bf16 *X,
    int ldx, const int32_t *xrow, int xdiv, const uint8_t *W,
    const float *scale, int N, int Kd, const int32_t *offs, int E, int n,
    float *Y, bf16 *H, int ldy)
{
    if (silu) {
        (void) moe_launch(kernel_gemv_fp8<NT, 2, 1, MODE, F8_WARPS>, grid,
            F8_WARPS * 32, 0, s, X, ldx, xrow, xdiv, W, scale, N, Kd, offs,
            E, n, Y, H, ldy);
    } else if (NT == 1 && (wide < 0 ? f8_gv_wide<MODE>((int64_t) grid.x
                                                       * grid.y)
                                    : wide > 0)) {
        (void) moe_launch(kernel_gemv_fp8<1, 1, 2, MODE, F8_WARPS_WIDE>,
            grid, F8_WARPS_WIDE * 32, 0, s, X, ldx, xrow, xdiv, W, scale, N,
            Kd, offs, E, n, Y, H, ldy);
    } else {
        (void) moe_launch(kernel_gemv_fp8<NT, 1, (NT >= 4 ? 1 : 2), MODE,
            F8_WARPS>, grid, F8_WARPS * 32, 0, s, X, ldx, xrow, xdiv, W,
            scale, N, Kd, offs, E, n, Y, H, ldy);
    }
}


template <int NT>
static void
f8_gv_mode(int mode, dim3 grid, cudaStream_t s, int silu, int wide,
    const bf16 *X, int ldx, const int32_t *xrow, int xdiv, const uint8_t *W,
    const float *scale, int N, int Kd, const int32_t *offs, int E, int n,
    float *Y, bf16 *H, int ldy)
{
    if (mode == MOE_K_FP8_TENSOR) {
        f8_gv_launch<NT, MOE_K_FP8_TENSOR>(grid, s, silu, wide, X, ldx, xrow,
                                           xdiv, W, scale, N, Kd, offs, E, n,
                                           Y, H, ldy);
    } else if (mode == MOE_K_FP8_CHANNEL) {
        f8_gv_launch<NT, MOE_K_FP8_CHANNEL>(grid, s, silu, wide, X, ldx,
                                            xrow, xdiv, W, scale, N, Kd,
                                            offs, E, n, Y, H, ldy);
    } else {
        f8_gv_launch<NT, MOE_K_FP8_BLOCK>(grid, s, silu, wide, X, ldx, xrow,
                                          xdiv, W, scale, N, Kd, offs, E, n,
                                          Y, H, ldy);
    }
}


extern "C" int
moe_cuda_fp8_supported(int mode, int N, int Kd, int ldx, int silu)
{
    return N > 0 && Kd > 0 && Kd % 16 == 0 && ldx % 8 == 0 && ldx >= Kd
           && (mode == MOE_K_FP8_TENSOR || mode == MOE_K_FP8_CHANNEL
               || mode == MOE_K_FP8_BLOCK)
           && !(mode == MOE_K_FP8_BLOCK && silu && N % 128 != 0);
}


/* The launch's group count (0 when n is 0), or -1 with the error set. */
static int
f8_groups(const char *who, int mode, int N, int Kd, int ldx,
    const int32_t *xrow, int xdiv, const int32_t *offs, int E, int n,
    int silu)
{
    if (!moe_cuda_fp8_supported(mode, N, Kd, ldx, silu) || E <= 0 || n < 0
        || E > 65535 || (xrow != NULL && xdiv <= 0)
        || (offs == NULL && E != 1))
    {
        moe_cuda_set_error("%s: unsupported shape (mode %d, N %d, Kd %d, "
                           "ldx %d, E %d, n %d, silu %d)", who, mode, N, Kd,
                           ldx, E, n, silu);
        return -1;
    }
    return offs != NULL && n < E ? n : E;
}


extern "C" int
moe_cuda_gemv_fp8_warps(const moe_bf16_t *X, int ldx, const int32_t *xrow,
    int xdiv, const uint8_t *W, const float *scale, int mode, int N, int Kd,
    const int32_t *offs, int E, int n, int silu, float *Y, moe_bf16_t *H,
    int ldy, int nt, int warps, cudaStream_t stream)
{
    int wide = warps == F8_WARPS_WIDE ? 1 : warps == F8_WARPS ? 0 : -1;

    const bf16 *x = reinterpret_cast<const bf16 *>(X);
    bf16       *h = reinterpret_cast<bf16 *>(H);
    int         groups = f8_groups("gemv_fp8", mode, N, Kd, ldx, xrow, xdiv,
                                   offs, E, n, silu);
    dim3        grid;

    if (groups < 0) {
        return MOE_K_EUNSUPPORTED;
    }
    if (warps != 0 && (wide < 0 || (wide > 0 && (nt != 1 || silu)))) {
        moe_cuda_set_error("gemv_fp8: %d warps per block with %d x 8 rows "
                           "and silu %d is not shipped (0, %d, and %d at 8 "
                           "rows without SiLU)", warps, nt, silu, F8_WARPS,
                           F8_WARPS_WIDE);
        return MOE_K_EUNSUPPORTED;
    }
    if (n == 0 || groups == 0) {
        return MOE_K_OK;
    }
    grid = dim3((unsigned) ((N + 15) / 16), (unsigned) groups);
    switch (nt) {
    case 1:
        f8_gv_mode<1>(mode, grid, stream, silu, wide, x, ldx, xrow, xdiv, W,
                      scale, N, Kd, offs, E, n, Y, h, ldy);
        break;
    case 2:
        f8_gv_mode<2>(mode, grid, stream, silu, wide, x, ldx, xrow, xdiv, W,
                      scale, N, Kd, offs, E, n, Y, h, ldy);
        break;
    case 4:
        f8_gv_mode<4>(mode, grid, stream, silu, wide, x, ldx, xrow, xdiv, W,
                      scale, N, Kd, offs, E, n, Y, h, ldy);
        break;
    default:
        moe_cuda_set_error("gemv_fp8: tile of %d x 8 rows is not shipped "
                           "(1, 2, 4)", nt);
        return MOE_K_EUNSUPPORTED;
    }
    MOE_CUDA_CHECK_LAUNCH("kernel_gemv_fp8");
    return MOE_K_OK;
}


extern "C" int
moe_cuda_gemv_fp8_tiled(const moe_bf16_t *X, int ldx, const int32_t *xrow,
    int xdiv, const uint8_t *W, const float *scale, int mode, int N, int Kd,
    const int32_t *offs, int E, int n, int silu, float *Y, moe_bf16_t *H,
    int ldy, int nt, cudaStream_t stream)
{
    return moe_cuda_gemv_fp8_warps(X, ldx, xrow, xdiv, W, scale, mode, N, Kd,
                                   offs, E, n, silu, Y, H, ldy, nt, 0,
                                   stream);
}


extern "C" int
moe_cuda_gemv_fp8(const moe_bf16_t *X, int ldx, const int32_t *xrow,
    int xdiv, const uint8_t *W, const float *scale, int mode, int N, int Kd,
    const int32_t *offs, int E, int n, int max_rows, int silu, float *Y,
    moe_bf16_t *H, int ldy, const moe_cuda_tuning_t *tune,
    cudaStream_t stream)
{
    static const moe_cuda_tuning_t defaults = MOE_CUDA_TUNING_DEFAULTS;
    const moe_cuda_tuning_t       *t = tune != NULL ? tune : &defaults;
    /* f16 fragments up to F8H_AUTO_ROWS rows: each block stages its
     * pass's rows itself, which at 4-8 rows costs as many instructions
     * as the weights (measured, run 14b: batch 8 586.6 tok/s with hints
     * of 4 on it against 637.4 on bf16 fragments) */
    int tp = t->fp8_gemv && max_rows <= F8H_AUTO_ROWS
             ? moe_cuda_fp8h_tp(Kd, max_rows) : 0;

    if (tp > 0) {
        /* f16 fragments, the pass's rows staged (kernel_gemv_fp8h) */
        return moe_cuda_gemv_fp8h(X, ldx, xrow, xdiv, W, scale, mode, N, Kd,
                                  offs, E, n, tp, silu, Y, H, ldy,
                                  t->dense_pre > 0 ? MOE_FP8H_PRE : 0,
                                  stream);
    }
    return moe_cuda_gemv_fp8_tiled(X, ldx, xrow, xdiv, W, scale, mode, N, Kd,
                                   offs, E, n, silu, Y, H, ldy,
                                   max_rows <= 8 ? 1 : max_rows <= 16 ? 2
                                                                      : 4,
                                   stream);
}


/* ------------------------------------------------------------------ */
/* kernel_ggemm_fp8                                                    */

#define G8_NT   128                     /* threads per block */
#define G8_BR   64                      /* weight rows per block */
#define G8_WROW 144                     /* bytes per shared weight row */
#define G8_XROW 144                     /* bf16 per shared token row */
#define G8_WL   (G8_BR * (F8_CK / 16) / G8_NT)  /* 16 B weight copies */

/* Tile constants of kernel_ggemm_fp8<BT>: ST pipeline stages, 3 at BT 32
 * so that 4 blocks fit an SM (55 KB each, as kernel_ggemm's 32/1): the
 * mixtral down projection's 512 blocks then run in one wave. */
template <int BT>
struct g8_cfg {
    static constexpr int    ST = BT == 32 ? 3 : 4;
    static constexpr int    XL = BT * (F8_CK / 8) / G8_NT; /* x copies */
    static constexpr size_t WSZ = (size_t) G8_BR * G8_WROW;
    static constexpr size_t XSZ = (size_t) BT * G8_XROW * sizeof(bf16);
    static constexpr size_t SMEM = ST * (WSZ + XSZ);
    static_assert(BT % 16 == 0 && XL * G8_NT == BT * (F8_CK / 8),
                  "token tile load split");
};


/*
 * grid (ceil(N / (SILU ? 32 : 64)), groups), G8_NT threads,
 * g8_cfg<BT>::SMEM bytes of dynamic shared memory.  Warp w owns m-tile w
 * (16 weight rows): without SiLU columns j0 + 16 w .. + 15; with SiLU the
 * gate rows of columns j0 + 8 w .. + 7 (tile rows 0-7) and their up rows
 * (tile rows 8-15), as in kernel_ggemm.
 */
template <int BT, bool SILU, int MODE, bool F16>
__global__ void __launch_bounds__(G8_NT, 2)
kernel_ggemm_fp8(const bf16 *X, int ldx, const int32_t *xrow, int xdiv,
    const float *xsinv, const uint8_t *W, const float *scale, int N,
    int Kd, const int32_t *offs, int E, int n, float *Y, bf16 *H, int ldy)
{
    moe_pdl_enter();
    typedef g8_cfg<BT> C;
    constexpr int  XL = C::XL, NP = BT / 16, ST = C::ST;
    constexpr bool BLK = MODE == MOE_K_FP8_BLOCK;

    extern __shared__ __align__(16) unsigned char g8_sm[];
    uint8_t       *w_s = g8_sm;                           /* [ST][BR][WROW] */
    bf16          *x_s = reinterpret_cast<bf16 *>(g8_sm + ST * C::WSZ);
    const int      tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    const int      g = lane >> 2, q = lane & 3;
    const int      lr = tid >> 3, ch = tid & 7;     /* weight copy row, 16 B */
    const int      xr0 = tid >> 4, xch = tid & 15;  /* token copy row, 16 B */
    const int      e = moe_block_group(offs, E, lane);
    const int      nk = (Kd + F8_CK - 1) / F8_CK;
    const int      j0 = blockIdx.x * (SILU ? 32 : 64);
    const int      R = (SILU ? 2 : 1) * N;
    int            r0, r1;
    const uint8_t *wsrc;
    size_t         wstep;
    unsigned       wval = 0;
    const float   *bs_lo = scale, *bs_hi = scale;  /* block-scale rows */

    if (e < 0) {
        return;
    }
    r0 = offs != NULL ? offs[e] : 0;
    r1 = offs != NULL ? offs[e + 1] : n;
    if (r1 <= r0) {
        return;
    }

    {
        const uint8_t *We = W + (size_t) e * R * Kd;
        int            col0 = SILU ? j0 + (lr & 7) : j0 + lr;
        int            row0 = SILU && lr >= 8 ? col0 + N : col0;

#pragma unroll
        for (int i = 0; i < G8_WL; i++) {
            if (col0 + i * (SILU ? 8 : 16) < N) {
                wval |= 1u << i;
            }
        }
        wstep = (size_t) (SILU ? 8 : 16) * Kd;
        wsrc = wval != 0 ? We + (size_t) row0 * Kd + ch * 16 : W;
    }
    if (BLK) {
        /* this warp's tile rows g (lo) and g + 8 (hi) */
        size_t base = (size_t) e * ((R + 127) / 128) * nk;
        int    rlo = SILU ? j0 + warp * 8 : j0 + warp * 16;
        int    rhi = SILU ? N + rlo : rlo;

        bs_lo = scale + base + (size_t) (rlo / 128) * nk;
        bs_hi = scale + base + (size_t) (rhi / 128) * nk;
    }

    for (int p0 = r0; p0 < r1; p0 += BT) {
        const bf16 *xsrc[XL];
        unsigned    xval = 0;
        float       acc[2 * NP][4];

#pragma unroll
        for (int i = 0; i < XL; i++) {
            int r = p0 + xr0 + 8 * i;

            xsrc[i] = X;
            if (r < r1) {
                int xr = xrow != NULL ? xrow[r] / xdiv : r;

                xsrc[i] = X + (size_t) xr * ldx + xch * 8;
                xval |= 1u << i;
            }
        }
#pragma unroll
        for (int t = 0; t < 2 * NP; t++) {
#pragma unroll
            for (int c = 0; c < 4; c++) {
                acc[t][c] = 0.0f;
            }
        }

        /* cp.async of k chunk kc into stage st (k past Kd: zeros) */
        auto load = [&](int kc, int st) {
            int      k = kc * F8_CK;
            bool     wk = k + ch * 16 < Kd;
            bool     xk = k + xch * 8 < Kd;
            uint8_t *wd = w_s + st * C::WSZ + lr * G8_WROW + ch * 16;
            bf16    *xd = x_s + ((size_t) st * BT + xr0) * G8_XROW + xch * 8;

#pragma unroll
            for (int i = 0; i < G8_WL; i++) {
                bool           ok = wk && ((wval >> i) & 1u);
                const uint8_t *src = ok ? wsrc + i * wstep + k : W;

                /* no L2 cache hint: with one (moe_cp_async16_pol)
                 * ptxas 13.0 emitted these prologue copies in an LDGSTS
                 * form (opcode 0xdae) that no working kernel has, and
                 * every launch died with "illegal instruction" on the
                 * H200; without it they are the token copies' form */
                moe_cp_async16(reinterpret_cast<bf16 *>(
                                   wd + i * 16 * G8_WROW),
                               reinterpret_cast<const bf16 *>(src),
                               ok ? 16 : 0);
            }
#pragma unroll
            for (int i = 0; i < XL; i++) {
                bool ok = xk && ((xval >> i) & 1u);

                moe_cp_async16(xd + i * 8 * G8_XROW, ok ? xsrc[i] + k : X,
                               ok ? 16 : 0);
            }
        };

#pragma unroll
        for (int s = 0; s < ST - 1; s++) {
            if (s < nk) {
                load(s, s);
            }
            moe_cp_async_commit();
        }

        int cs = 0, ls = ST - 1;

        for (int kc = 0; kc < nk; kc++) {
            moe_cp_async_wait<ST - 2>();
            __syncthreads();
            if (kc + ST - 1 < nk) {
                load(kc + ST - 1, ls);
            }
            moe_cp_async_commit();

            const uint8_t *ws = w_s + cs * C::WSZ + (warp * 16 + g) * G8_WROW
                                + 4 * q;
            const bf16    *xs = x_s + ((size_t) cs * BT + g) * G8_XROW
                                + 4 * q;
            float          part[2 * NP][4];
            float (&dst)[2 * NP][4] = BLK ? part : acc;

            if (BLK) {
#pragma unroll
                for (int t = 0; t < 2 * NP; t++) {
#pragma unroll
                    for (int c = 0; c < 4; c++) {
                        part[t][c] = 0.0f;
                    }
                }
            }
#pragma unroll
            for (int kk = 0; kk < F8_CK / 16; kk++) {
                uint32_t lo = *reinterpret_cast<const uint32_t *>(
                                  ws + kk * 16);
                uint32_t hi = *reinterpret_cast<const uint32_t *>(
                                  ws + 8 * G8_WROW + kk * 16);
                uint32_t l02, l13, h02, h13;

                if (F16) {
                    /* f16 pairs in k order: (4q, 4q+1), (4q+2, 4q+3),
                     * the tokens' 8 bytes at 4q as they are */
                    f8h_cvt(lo, l02, l13);
                    f8h_cvt(hi, h02, h13);
                } else {
                    f8_cvt4(lo, l02, l13);
                    f8_cvt4(hi, h02, h13);
                }
#pragma unroll
                for (int t = 0; t < 2 * NP; t++) {
                    uint2    xv = *reinterpret_cast<const uint2 *>(
                                      xs + t * 8 * G8_XROW + kk * 16);
                    uint32_t b0 = xv.x, b1 = xv.y;

                    if (F16) {
                        moe_mma_f16(dst[t], l02, h02, l13, h13, b0, b1);
                    } else {
                        f8_pair(xv.x, xv.y, b0, b1);
                        moe_mma_bf16(dst[t], l02, h02, l13, h13, b0, b1);
                    }
                }
            }
            if (BLK) {
                float slo = __ldg(bs_lo + kc), shi = __ldg(bs_hi + kc);

#pragma unroll
                for (int t = 0; t < 2 * NP; t++) {
                    acc[t][0] = fmaf(slo, part[t][0], acc[t][0]);
                    acc[t][1] = fmaf(slo, part[t][1], acc[t][1]);
                    acc[t][2] = fmaf(shi, part[t][2], acc[t][2]);
                    acc[t][3] = fmaf(shi, part[t][3], acc[t][3]);
                }
            }
            cs = cs == ST - 1 ? 0 : cs + 1;
            ls = ls == ST - 1 ? 0 : ls + 1;
        }

        /* epilogue: lane (g, q) holds tile rows g (c0, c1) and g + 8
         * (c2, c3), tokens 2q and 2q + 1 of each n-tile */
#pragma unroll
        for (int t = 0; t < 2 * NP; t++) {
            int   r = p0 + t * 8 + 2 * q;
            float si[2] = { 1.0f, 1.0f };       /* F16: rows' 2^-d */

            if (F16) {
#pragma unroll
                for (int h = 0; h < 2; h++) {
                    if (r + h < r1) {
                        si[h] = __ldg(xsinv + (xrow != NULL
                                               ? xrow[r + h] / xdiv
                                               : r + h));
                    }
                }
#pragma unroll
                for (int c = 0; c < 4; c++) {
                    acc[t][c] *= si[c & 1];
                }
            }
#pragma unroll
            for (int h = 0; h < 2; h++) {
                if (SILU) {
                    int col = j0 + warp * 8 + g;

                    if (col < N && r + h < r1) {
                        float gt = acc[t][h], up = acc[t][2 + h];

                        gt *= f8_row_scale(scale, MODE, 1, e, N, R, col);
                        up *= f8_row_scale(scale, MODE, 1, e, N, R, N + col);
                        H[(size_t) (r + h) * ldy + col] =
                            moe_f2bf(moe_silu_mul(gt, up));
                    }
                } else {
                    int col = j0 + warp * 16 + g + 8 * h;

#pragma unroll
                    for (int c = 0; c < 2; c++) {
                        if (col < N && r + c < r1) {
                            Y[(size_t) (r + c) * ldy + col] =
                                acc[t][2 * h + c]
                                * f8_row_scale(scale, MODE, 0, e, N, R, col);
                        }
                    }
                }
            }
        }
        __syncthreads();        /* the next tile's prologue reuses stages */
    }
}


template <int BT, bool SILU, int MODE>
static int
g8_launch(unsigned groups, cudaStream_t s, const bf16 *X, int ldx,
    const int32_t *xrow, int xdiv, const float *xsinv, const uint8_t *W,
    const float *scale, int N, int Kd, const int32_t *offs, int E, int n,
    float *Y, bf16 *H, int ldy)
{
    static int   ready[2];
    const size_t sm = g8_cfg<BT>::SMEM;
    const int    cols = SILU ? 32 : 64;
    const int    f16 = xsinv != NULL;
    dim3         grid((unsigned) ((N + cols - 1) / cols), groups);

    if (!ready[f16]) {
        if (f16) {
            MOE_CUDA_CHECK(moe_smem_max_carveout(
                kernel_ggemm_fp8<BT, SILU, MODE, true>, sm));
        } else {
            MOE_CUDA_CHECK(moe_smem_max_carveout(
                kernel_ggemm_fp8<BT, SILU, MODE, false>, sm));
        }
        ready[f16] = 1;
    }
    if (f16) {
        MOE_CUDA_CHECK(moe_launch(kernel_ggemm_fp8<BT, SILU, MODE, true>,
            grid, G8_NT, sm, s, X, ldx, xrow, xdiv, xsinv, W, scale, N, Kd,
            offs, E, n, Y, H, ldy));
    } else {
        MOE_CUDA_CHECK(moe_launch(kernel_ggemm_fp8<BT, SILU, MODE, false>,
            grid, G8_NT, sm, s, X, ldx, xrow, xdiv, xsinv, W, scale, N, Kd,
            offs, E, n, Y, H, ldy));
    }
    return MOE_K_OK;
}


template <int BT, bool SILU>
static int
g8_launch_m(int mode, unsigned groups, cudaStream_t s, const bf16 *X,
    int ldx, const int32_t *xrow, int xdiv, const float *xsinv,
    const uint8_t *W, const float *scale, int N, int Kd, const int32_t *offs,
    int E, int n, float *Y, bf16 *H, int ldy)
{
    if (mode == MOE_K_FP8_TENSOR) {
        return g8_launch<BT, SILU, MOE_K_FP8_TENSOR>(groups, s, X, ldx, xrow,
                                                     xdiv, xsinv, W, scale,
                                                     N, Kd, offs, E, n, Y, H,
                                                     ldy);
    }
    if (mode == MOE_K_FP8_CHANNEL) {
        return g8_launch<BT, SILU, MOE_K_FP8_CHANNEL>(groups, s, X, ldx,
                                                      xrow, xdiv, xsinv, W,
                                                      scale, N, Kd, offs, E,
                                                      n, Y, H, ldy);
    }
    return g8_launch<BT, SILU, MOE_K_FP8_BLOCK>(groups, s, X, ldx, xrow,
                                                xdiv, xsinv, W, scale, N, Kd,
                                                offs, E, n, Y, H, ldy);
}


template <int BT>
static int
g8_launch_s(int silu, int mode, unsigned groups, cudaStream_t s,
    const bf16 *X, int ldx, const int32_t *xrow, int xdiv,
    const float *xsinv, const uint8_t *W, const float *scale, int N, int Kd,
    const int32_t *offs, int E, int n, float *Y, bf16 *H, int ldy)
{
    if (silu) {
        return g8_launch_m<BT, true>(mode, groups, s, X, ldx, xrow, xdiv,
                                     xsinv, W, scale, N, Kd, offs, E, n, Y,
                                     H, ldy);
    }
    return g8_launch_m<BT, false>(mode, groups, s, X, ldx, xrow, xdiv, xsinv,
                                  W, scale, N, Kd, offs, E, n, Y, H, ldy);
}


/* The grouped GEMM with the token tile bt (0: about 1.5x the mean rows
 * per group, as moe_cuda_ggemm); xsinv: X holds f16 rows scaled by
 * 1 / xsinv (moe_cuda_rows_f16), NULL: bf16. */
static int
g8_run(const char *who, const bf16 *x, int ldx, const int32_t *xrow,
    int xdiv, const float *xsinv, const uint8_t *W, const float *scale,
    int mode, int N, int Kd, const int32_t *offs, int E, int n, int silu,
    float *Y, bf16 *h, int ldy, int bt, cudaStream_t stream)
{
    int groups = f8_groups(who, mode, N, Kd, ldx, xrow, xdiv, offs, E, n,
                           silu);

    if (groups < 0) {
        return MOE_K_EUNSUPPORTED;
    }
    if (bt == 0) {
        int g = groups < 1 ? 1 : groups, avg = (n + g - 1) / g;

        bt = avg <= 10 ? 16 : avg <= 22 ? 32 : 64;
    }
    if (bt != 16 && bt != 32 && bt != 64) {
        moe_cuda_set_error("%s: token tile %d is not shipped (16, 32, 64)",
                           who, bt);
        return MOE_K_EUNSUPPORTED;
    }
    if (n == 0 || groups == 0) {
        return MOE_K_OK;
    }
    switch (bt) {
    case 16:
        return g8_launch_s<16>(silu, mode, (unsigned) groups, stream, x, ldx,
                               xrow, xdiv, xsinv, W, scale, N, Kd, offs, E,
                               n, Y, h, ldy);
    case 32:
        return g8_launch_s<32>(silu, mode, (unsigned) groups, stream, x, ldx,
                               xrow, xdiv, xsinv, W, scale, N, Kd, offs, E,
                               n, Y, h, ldy);
    default:
        return g8_launch_s<64>(silu, mode, (unsigned) groups, stream, x, ldx,
                               xrow, xdiv, xsinv, W, scale, N, Kd, offs, E,
                               n, Y, h, ldy);
    }
}


extern "C" int
moe_cuda_ggemm_fp8_tiled(const moe_bf16_t *X, int ldx, const int32_t *xrow,
    int xdiv, const uint8_t *W, const float *scale, int mode, int N, int Kd,
    const int32_t *offs, int E, int n, int silu, float *Y, moe_bf16_t *H,
    int ldy, int bt, cudaStream_t stream)
{
    if (bt == 0) {
        moe_cuda_set_error("ggemm_fp8: token tile 0 is not shipped (16, "
                           "32, 64)");
        return MOE_K_EUNSUPPORTED;
    }
    return g8_run("ggemm_fp8", reinterpret_cast<const bf16 *>(X), ldx, xrow,
                  xdiv, NULL, W, scale, mode, N, Kd, offs, E, n, silu, Y,
                  reinterpret_cast<bf16 *>(H), ldy, bt, stream);
}


extern "C" int
moe_cuda_ggemm_fp8(const moe_bf16_t *X, int ldx, const int32_t *xrow,
    int xdiv, const uint8_t *W, const float *scale, int mode, int N, int Kd,
    const int32_t *offs, int E, int n, int silu, float *Y, moe_bf16_t *H,
    int ldy, cudaStream_t stream)
{
    return g8_run("ggemm_fp8", reinterpret_cast<const bf16 *>(X), ldx, xrow,
                  xdiv, NULL, W, scale, mode, N, Kd, offs, E, n, silu, Y,
                  reinterpret_cast<bf16 *>(H), ldy, 0, stream);
}


extern "C" int
moe_cuda_ggemm_fp8h(const uint16_t *Xh, int ldh, const float *sinv,
    const int32_t *xrow, int xdiv, const uint8_t *W, const float *scale,
    int mode, int N, int Kd, const int32_t *offs, int E, int n, int silu,
    float *Y, moe_bf16_t *H, int ldy, int bt, cudaStream_t stream)
{
    if (sinv == NULL) {
        moe_cuda_set_error("ggemm_fp8h: no row scales");
        return MOE_K_EUNSUPPORTED;
    }
    return g8_run("ggemm_fp8h", reinterpret_cast<const bf16 *>(Xh), ldh,
                  xrow, xdiv, sinv, W, scale, mode, N, Kd, offs, E, n, silu,
                  Y, reinterpret_cast<bf16 *>(H), ldy, bt, stream);
}


/* One block a row: its largest |x|, then the row times 2^d as f16. */
__global__ void __launch_bounds__(256)
kernel_rows_f16(const bf16 *X, int ldx, int Kd, uint16_t *Xh, int ldh,
    float *sinv)
{
    moe_pdl_enter();
    __shared__ uint32_t smax[8];
    const int    r = blockIdx.x, tid = threadIdx.x, nv = Kd / 8;
    const uint4 *src = reinterpret_cast<const uint4 *>(X + (size_t) r * ldx);
    uint4       *dst = reinterpret_cast<uint4 *>(Xh + (size_t) r * ldh);
    uint32_t     mm = f8h_warp_absmax(src, nv, tid, 256);
    int          d;
    float        s;

    if ((tid & 31) == 0) {
        smax[tid >> 5] = mm;
    }
    __syncthreads();
    mm = 0;
#pragma unroll
    for (int w = 0; w < 8; w++) {
        mm = max(mm, smax[w]);
    }
    d = f8h_exp(mm);
    s = __int_as_float((127 + d) << 23);
    if (tid == 0) {
        sinv[r] = __int_as_float((127 - d) << 23);
    }
    for (int v = tid; v < nv; v += 256) {
        dst[v] = f8h_cvt_row8(__ldg(src + v), s);
    }
}


extern "C" int
moe_cuda_rows_f16(const moe_bf16_t *X, int ldx, int n, int Kd, uint16_t *Xh,
    int ldh, float *sinv, cudaStream_t stream)
{
    if (n < 0 || Kd <= 0 || Kd % 8 != 0 || ldx < Kd || ldx % 8 != 0
        || ldh < Kd || ldh % 8 != 0 || ((uintptr_t) X & 15) != 0
        || ((uintptr_t) Xh & 15) != 0 || sinv == NULL)
    {
        moe_cuda_set_error("rows_f16: unsupported shape (n %d, Kd %d, ldx "
                           "%d, ldh %d)", n, Kd, ldx, ldh);
        return MOE_K_EUNSUPPORTED;
    }
    if (n == 0) {
        return MOE_K_OK;
    }
    (void) moe_launch(kernel_rows_f16, dim3((unsigned) n), dim3(256), 0,
                      stream, reinterpret_cast<const bf16 *>(X), ldx, Kd,
                      Xh, ldh, sinv);
    MOE_CUDA_CHECK_LAUNCH("kernel_rows_f16");
    return MOE_K_OK;
}


/* ------------------------------------------------------------------ */
/* moe_cuda_gemv_fp8h                                                  */

/* Staged f16 row length (elements) for Kd. */
static int
f8h_xsl(int Kd)
{
    return (Kd + F8_CK - 1) / F8_CK * F8_CK + F8H_PAD;
}


extern "C" int
moe_cuda_fp8h_tp(int Kd, int max_rows)
{
    int rows = max_rows < 1 ? 1 : max_rows > 8 ? 8 : max_rows;

    if (Kd <= 0) {
        return 0;
    }
    return (int64_t) rows * f8h_xsl(Kd) * 2 <= F8H_SMEM_MAX ? rows : 0;
}


/* One instantiation's launch; its shared-memory limit raised to
 * F8H_SMEM_MAX once per device. */
template <int MR, int UNR, int MODE, int NW, bool PRE = false>
static int
f8h_go(dim3 grid, size_t smem, cudaStream_t s, const bf16 *X, int ldx,
    const int32_t *xrow, int xdiv, const uint8_t *W, const float *scale,
    int N, int Kd, const int32_t *offs, int E, int n, int tp, float *Y,
    bf16 *H, int ldy)
{
    static bool ready[64];
    int         dev = 0;

    MOE_CUDA_CHECK(cudaGetDevice(&dev));
    if (dev < 0 || dev >= 64 || !ready[dev]) {
        MOE_CUDA_CHECK(cudaFuncSetAttribute(
            kernel_gemv_fp8h<MR, UNR, MODE, NW, PRE>,
            cudaFuncAttributeMaxDynamicSharedMemorySize, F8H_SMEM_MAX));
        if (dev >= 0 && dev < 64) {
            ready[dev] = true;
        }
    }
    (void) moe_launch(kernel_gemv_fp8h<MR, UNR, MODE, NW, PRE>, grid,
                      NW * 32, smem, s, X, ldx, xrow, xdiv, W, scale, N, Kd,
                      offs, E, n, tp, Y, H, ldy);
    MOE_CUDA_CHECK_LAUNCH("kernel_gemv_fp8h");
    return MOE_K_OK;
}


/* Whether `blocks` blocks of the 8-warp kernel (no SiLU) fit one wave;
 * the occupancy query cached for the last shared-memory size (eager
 * steps launch with one or two sizes). */
template <int MODE>
static bool
f8h_wide(int64_t blocks, size_t smem)
{
    static size_t last_smem = (size_t) -1;
    static int    last_nb;
    int           nb = 0;

    if (smem == last_smem) {
        nb = last_nb;
    } else {
        if (cudaOccupancyMaxActiveBlocksPerMultiprocessor(
                &nb, kernel_gemv_fp8h<1, 2, MODE, F8_WARPS_WIDE>,
                F8_WARPS_WIDE * 32, smem) != cudaSuccess)
        {
            (void) cudaGetLastError();
            nb = 0;
        }
        last_nb = nb;
        last_smem = smem;
    }
    return blocks <= (int64_t) nb * moe_sm_count();
}


/* variant: 0 the rule (SiLU: 1 chunk a stage, 4 warps; else 2 chunks,
 * 8 warps when the grid fits one wave of them), 1 twice the chunks a
 * stage, 2 8 warps, 3 4 warps; pre with variant 0, one matrix and one
 * pass: the PRE kernel (4 warps). */
template <int MODE>
static int
f8h_mode(int variant, dim3 grid, size_t smem, cudaStream_t s, int silu,
    const bf16 *X, int ldx, const int32_t *xrow, int xdiv, const uint8_t *W,
    const float *scale, int N, int Kd, const int32_t *offs, int E, int n,
    int tp, float *Y, bf16 *H, int ldy, int pre)
{
#define F8H_ARGS grid, smem, s, X, ldx, xrow, xdiv, W, scale, N, Kd, offs, \
                 E, n, tp, Y, H, ldy
    if (silu) {
        if (variant == 1) {
            return f8h_go<2, 2, MODE, F8_WARPS>(F8H_ARGS);
        }
        if (variant == 2) {
            return f8h_go<2, 1, MODE, F8_WARPS_WIDE>(F8H_ARGS);
        }
        return f8h_go<2, 1, MODE, F8_WARPS>(F8H_ARGS);
    }
    if (variant == 1) {
        return f8h_go<1, 4, MODE, F8_WARPS>(F8H_ARGS);
    }
    if (pre && variant == 0 && offs == NULL && n <= tp) {
        /* dense_pre: 4 warps a block (the PRE kernel takes ~170
         * registers a thread, so three such blocks fit an SM, where only
         * one of 8 warps would: the whole q|k|v or o grid resident while
         * the kernel before runs) */
        return f8h_go<1, 2, MODE, F8_WARPS, true>(F8H_ARGS);
    }
    if (variant == 2
        || (variant == 0
            && f8h_wide<MODE>((int64_t) grid.x * grid.y, smem)))
    {
        return f8h_go<1, 2, MODE, F8_WARPS_WIDE>(F8H_ARGS);
    }
    return f8h_go<1, 2, MODE, F8_WARPS>(F8H_ARGS);
#undef F8H_ARGS
}


extern "C" int
moe_cuda_gemv_fp8h(const moe_bf16_t *X, int ldx, const int32_t *xrow,
    int xdiv, const uint8_t *W, const float *scale, int mode, int N, int Kd,
    const int32_t *offs, int E, int n, int tp, int silu, float *Y,
    moe_bf16_t *H, int ldy, int variant, cudaStream_t stream)
{
    const bf16 *x = reinterpret_cast<const bf16 *>(X);
    bf16       *h = reinterpret_cast<bf16 *>(H);
    int         groups = f8_groups("gemv_fp8h", mode, N, Kd, ldx, xrow, xdiv,
                                   offs, E, n, silu);
    size_t      smem;
    dim3        grid;

    if (groups < 0) {
        return MOE_K_EUNSUPPORTED;
    }
    const int   pre = (variant & MOE_FP8H_PRE) != 0;

    variant &= ~MOE_FP8H_PRE;
    if (tp < 1 || tp > 8 || moe_cuda_fp8h_tp(Kd, tp) != tp || variant < 0
        || variant > 3)
    {
        moe_cuda_set_error("gemv_fp8h: %d tokens a pass of Kd %d (at most 8 "
                           "and %d bytes staged) or variant %d (0..3) not "
                           "supported", tp, Kd, F8H_SMEM_MAX, variant);
        return MOE_K_EUNSUPPORTED;
    }
    if (n == 0 || groups == 0) {
        return MOE_K_OK;
    }
    grid = dim3((unsigned) ((N + 15) / 16), (unsigned) groups);
    smem = (size_t) tp * f8h_xsl(Kd) * 2;
    if (mode == MOE_K_FP8_TENSOR) {
        return f8h_mode<MOE_K_FP8_TENSOR>(variant, grid, smem, stream, silu,
                                          x, ldx, xrow, xdiv, W, scale, N, Kd,
                                          offs, E, n, tp, Y, h, ldy, pre);
    }
    if (mode == MOE_K_FP8_CHANNEL) {
        return f8h_mode<MOE_K_FP8_CHANNEL>(variant, grid, smem, stream, silu,
                                           x, ldx, xrow, xdiv, W, scale, N,
                                           Kd, offs, E, n, tp, Y, h, ldy,
                                           pre);
    }
    return f8h_mode<MOE_K_FP8_BLOCK>(variant, grid, smem, stream, silu, x,
                                     ldx, xrow, xdiv, W, scale, N, Kd, offs,
                                     E, n, tp, Y, h, ldy, pre);
}
