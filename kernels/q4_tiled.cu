/*
 * The tiled 4-bit layout and its GEMV (contracts: quant_gemv.h, "Tiled
 * 4-bit weights").
 *
 * Why: at decode the 4-bit GEMV on the checkpoints' own layouts
 * (kernel_qgemv_q4_mma) runs at 29-41 % of the copy bandwidth on the
 * H200: AWQ gives a lane 4-8 bytes per load (8 columns of one k), GPTQ
 * 16 bytes that feed one m-tile, and both need byte_perm shuffles before
 * the tensor cores can take them; ncu showed it latency-bound (few bytes
 * in flight per SM).  Repacked once at load, every lane's 16-byte load
 * is exactly the A fragments of four m16n8k16 products, so a warp streams
 * 512 contiguous bytes per step with 4 steps in flight.
 *
 * Measured (H200, 2026-12-03; kernels/NOTES.md "4-bit layouts"): correct
 * but 1.5-2x slower than kernel_qgemv_q4_mma at every decode shape, in
 * each of three ways of feeding the input rows (q4t_load).  Both
 * kernels issue ~140 warp instructions per 512 weight bytes, so the GEMV
 * is issue-bound before it is bandwidth-bound; this layout's loads also
 * waited on shared scoreboards.  It ships only as the development setting
 * q4_layout 2 / 3 (the backend's default keeps GPTQ's layout, AWQ
 * repacked into it: moe_cuda_q4_awq_to_gptq).
 *
 * The layout, per matrix of Ntot x K (Ntot % 16 == 0, K % 64 == 0):
 * tiles of 16 output features x 64 k, 512 bytes each, feature tile
 * major: tile (nt, kt) at byte ((nt * K / 64) + kt) * 512.  Lane l = 4 g +
 * t owns bytes [16 l, 16 l + 16) of a tile: word i (0..3) holds features
 * f0 = 16 nt + g and f1 = f0 + 8 at k = 64 kt + 16 t + 4 i + j (j 0..3),
 * nibble slot p (bits 4p) = feature f0 + 8 (p & 1), j = 2 ((p >> 1) & 1)
 * + (p >> 2).  So (w >> s) & 0x000f000f for s = 0, 4, 8, 12 gives, as
 * bf16x2 after OR 0x4300 (128 + q) and one subtraction of 128 + z, the
 * fragments a0 (f0, j 0/1), a1 (f1, j 0/1), a2 (f0, j 2/3), a3 (f1, j
 * 2/3).  The mma sums over its 16 k in any order as long as A and B
 * agree: the input's k for sub-product i are 16 t + 4 i + j too, so a
 * lane reads its 16 input values of a tile as two 16-byte loads.  The
 * zeros and scales keep the checkpoint's tensors and layout; a tile
 * never straddles a quantization group (G a power of two >= 64), so
 * each group's fp32 sums are scaled once, as the mma kernel does.
 */
#include <cuda_fp16.h>

#include "common.cuh"
#include "ptx.cuh"
#include "quant_common.cuh"
#include "quant_gemv.h"

typedef __nv_bfloat16 bf16;

#define Q4T_NW   8          /* warps per block */
#define Q4T_P    4          /* k-tiles in flight per warp */
#define Q4T_MINB 2          /* blocks per SM the registers are sized for */


/*
 * Loads issued where they stand (asm volatile: the compiler may not sink
 * them toward their use, Q4T_P k-tiles later); the weights are read once
 * (no L1 allocation), the zeros and scales through the read-only path.
 */
__device__ __forceinline__ uint4
q4t_ld_stream(const uint4 *p)
{
    uint4 v;

    asm volatile("ld.global.nc.L1::no_allocate.v4.u32 {%0, %1, %2, %3}, "
                 "[%4];\n"
                 : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w) : "l"(p));
    return v;
}


__device__ __forceinline__ uint32_t
q4t_ld_u32(const int32_t *p)
{
    uint32_t v;

    asm volatile("ld.global.nc.u32 %0, [%1];\n" : "=r"(v) : "l"(p));
    return v;
}


__device__ __forceinline__ uint32_t
q4t_ld_u16(const uint16_t *p)
{
    unsigned short v;

    asm volatile("ld.global.nc.u16 %0, [%1];\n" : "=h"(v) : "l"(p));
    return v;
}


/* Bring p's line into L1 (a hint). */
__device__ __forceinline__ void
q4t_prefetch_l1(const void *p)
{
    asm volatile("prefetch.global.L1 [%0];\n" :: "l"(p));
}


/* Nibble shift of column f's zero in a qzeros word. */
__device__ __forceinline__ int
q4t_zshift(int fmt, int f)
{
    int c = f & 7;

    /* AWQ packs columns {0..7} at nibble positions {0,4,1,5,2,6,3,7} */
    return 4 * (fmt == MOE_K_Q4_AWQ ? (c >> 1) + 4 * (c & 1) : c);
}


/* One pipeline stage: a lane's weights of one tile, the zero words and
 * the two fp16 scales of its features at the tile's group. */
struct q4t_stage {
    uint4    w;
    uint32_t z0, z1;
    uint32_t s;             /* scale of f0 (low half), f1 (high) */
};


/*
 * Stage kt's loads: zp / sp point at the lane's zero word and scale in
 * group 0 (feature f0; f0 + 8's zero word is the next one), a group zs
 * words / ss scales on; gsh = log2(G / 64).  The input rows' bytes of
 * the same k-tile are prefetched into L1 and loaded when used.  (Two
 * other ways measured slower, 2026-12-03, kernels/NOTES.md "4-bit
 * layouts": the inputs in the register stages, and everything through a
 * per-lane cp.async ring.)
 */
template <int NT>
__device__ __forceinline__ void
q4t_load(q4t_stage &st, const uint4 *wp, const int32_t *zp,
    const uint16_t *sp, int zs, int ss, int gsh,
    const bf16 *const (&xp)[NT], const bool (&xv)[NT], int kt)
{
    const int       grp = kt >> gsh;
    const int32_t  *z = zp + grp * zs;
    const uint16_t *s = sp + grp * ss;

    st.w = q4t_ld_stream(wp + kt * 32);
    st.z0 = q4t_ld_u32(z);
    st.z1 = q4t_ld_u32(z + 1);
    st.s = q4t_ld_u16(s) | (q4t_ld_u16(s + 8) << 16);
#pragma unroll
    for (int nt = 0; nt < NT; nt++) {
        if (xv[nt]) {
            q4t_prefetch_l1(xp[nt] + 64 * kt);
        }
    }
}


/*
 * grid (ceil(NU / CU), groups), Q4T_NW warps; NU = Ntot / 16 / MR units
 * (MR 1: a feature tile; MR 2: gate tile u and up tile NU + u, SiLU
 * fused), each split over SK warps along K (CU = Q4T_NW / (MR SK) units
 * per block).  A warp streams its tile's k-tiles [kt0, kt1) with Q4T_P
 * loads in flight; rows of the group in passes of 8 NT; the SK partial
 * sums are added in a fixed order (deterministic).
 */
template <int FMT, int NT, int MR>
__global__ void __launch_bounds__(Q4T_NW * 32, Q4T_MINB)
kernel_qgemv_q4t(const bf16 *X, int ldx, const int32_t *xrow, int xdiv,
    const uint4 *qt, const int32_t *qzeros, const uint16_t *scales, int G,
    int zero_bias, int Ntot, int K, int SK, const int32_t *offs, int E,
    int n, float *Y, bf16 *H, int ldy)
{
    __shared__ float red[Q4T_NW][NT * 4][32];

    const int lane = (int) threadIdx.x & 31;
    const int warp = (int) threadIdx.x >> 5;
    const int g = lane >> 2, t = lane & 3;
    const int KT = K / 64, KG = (K + G - 1) / G, NTL = Ntot / 16;
    const int per = MR * SK, CU = Q4T_NW / per;
    const int NU = NTL / MR;
    const int unit = (int) blockIdx.x * CU + warp / per;
    const int wi = warp % per, half = wi / SK, ks = wi % SK;
    const bool active = unit < NU && warp / per < CU;
    const int tile = unit + half * NU;
    const int kt0 = (int) ((int64_t) KT * ks / SK);
    const int kt1 = (int) ((int64_t) KT * (ks + 1) / SK);
    const int f0 = 16 * tile + g;
    const int zs = Ntot / 8;

    if (offs == NULL && active) {
        /* one matrix: the weights of the first stages into L2 before the
         * wait (nothing before us writes them) */
        const uint4 *wp = qt + (size_t) tile * KT * 32 + lane;

        for (int kt = kt0; kt < kt1 && kt < kt0 + Q4T_P; kt++) {
            moe_prefetch_l2(wp + (size_t) kt * 32);
        }
    }
    moe_pdl_enter();

    int       r0, r1;
    const int e = q_group_rows(offs, E, n, &r0, &r1);

    if (e < 0 || r1 <= r0) {
        return;                 /* uniform over the block */
    }
    const uint4 *wp = qt + ((size_t) e * NTL + tile) * KT * 32 + lane;
    /* the lane's zero word (f0's; f0 + 8's is the next) and scale in the
     * expert's group 0 */
    const int32_t  *zp = qzeros + (size_t) e * KG * zs + f0 / 8;
    const uint16_t *sp = scales + (size_t) e * KG * Ntot + f0;
    const int       gsh = __ffs(G / 64) - 1;        /* G / 64 a power of 2 */
    const int       tgm = G / 64 - 1;
    const int       sh0 = q4t_zshift(FMT, f0), sh1 = q4t_zshift(FMT, f0 + 8);

    for (int p0 = r0; p0 < r1; p0 += 8 * NT) {
        constexpr int P = Q4T_P;
        const bf16   *xp[NT];
        bool        xv[NT];
        float       y[NT][4], c[NT][4];

#pragma unroll
        for (int nt = 0; nt < NT; nt++) {
            int r = p0 + 8 * nt + g;

            xv[nt] = r < r1;
            xp[nt] = X + (size_t) (xv[nt] ? (xrow != NULL ? xrow[r] / xdiv
                                                          : r) : 0) * ldx
                     + 16 * t;
#pragma unroll
            for (int i = 0; i < 4; i++) {
                y[nt][i] = 0.0f;
                c[nt][i] = 0.0f;
            }
        }
        if (active && kt0 < kt1) {
            q4t_stage st[P];

#pragma unroll
            for (int s = 0; s < P; s++) {
                if (kt0 + s < kt1) {
                    q4t_load<NT>(st[s], wp, zp, sp, zs, Ntot, gsh, xp, xv,
                                 kt0 + s);
                }
            }
            for (int kb = kt0; kb < kt1; kb += P) {
#pragma unroll
                for (int s = 0; s < P; s++) {
                    const int kt = kb + s;

                    if (kt >= kt1) {
                        break;
                    }
                    const q4t_stage cur = st[s];
                    uint4           xa[NT], xb[NT];

                    if (kt + P < kt1) {
                        q4t_load<NT>(st[s], wp, zp, sp, zs, Ntot, gsh, xp,
                                     xv, kt + P);
                    }
#pragma unroll
                    for (int nt = 0; nt < NT; nt++) {
                        const uint4 *x4 = reinterpret_cast<const uint4 *>(
                            xp[nt] + 64 * kt);

                        xa[nt] = xv[nt] ? __ldg(x4) : make_uint4(0, 0, 0, 0);
                        xb[nt] = xv[nt] ? __ldg(x4 + 1)
                                        : make_uint4(0, 0, 0, 0);
                    }
                    const uint32_t zz0 = q4m_zz(((cur.z0 >> sh0) & 15u)
                                                + (uint32_t) zero_bias);
                    const uint32_t zz1 = q4m_zz(((cur.z1 >> sh1) & 15u)
                                                + (uint32_t) zero_bias);
                    const uint32_t w4[4] = { cur.w.x, cur.w.y, cur.w.z,
                                             cur.w.w };

#pragma unroll
                    for (int i = 0; i < 4; i++) {
                        uint32_t a0 = q4m_sub(q4m_nib2(w4[i], 0), zz0);
                        uint32_t a1 = q4m_sub(q4m_nib2(w4[i], 4), zz1);
                        uint32_t a2 = q4m_sub(q4m_nib2(w4[i], 8), zz0);
                        uint32_t a3 = q4m_sub(q4m_nib2(w4[i], 12), zz1);

#pragma unroll
                        for (int nt = 0; nt < NT; nt++) {
                            const uint4 &xx = i < 2 ? xa[nt] : xb[nt];
                            uint32_t     b0 = (i & 1) ? xx.z : xx.x;
                            uint32_t     b1 = (i & 1) ? xx.w : xx.y;

                            moe_mma_bf16(c[nt], a0, a1, a2, a3, b0, b1);
                        }
                    }
                    if (kt + 1 == kt1 || ((kt + 1) & tgm) == 0) {
                        /* the group ends here: scale its sums */
                        float s0 = __half2float(__ushort_as_half(
                            (unsigned short) (cur.s & 0xffffu)));
                        float s1 = __half2float(__ushort_as_half(
                            (unsigned short) (cur.s >> 16)));

#pragma unroll
                        for (int nt = 0; nt < NT; nt++) {
                            y[nt][0] += s0 * c[nt][0];
                            y[nt][1] += s0 * c[nt][1];
                            y[nt][2] += s1 * c[nt][2];
                            y[nt][3] += s1 * c[nt][3];
                            c[nt][0] = c[nt][1] = c[nt][2] = c[nt][3] = 0.0f;
                        }
                    }
                }
            }
        }

        /* the SK warps' partial sums of each tile, in a fixed order */
#pragma unroll
        for (int nt = 0; nt < NT; nt++) {
#pragma unroll
            for (int i = 0; i < 4; i++) {
                red[warp][nt * 4 + i][lane] = y[nt][i];
            }
        }
        __syncthreads();
        for (int idx = (int) threadIdx.x; idx < CU * NT * 4 * 32;
             idx += Q4T_NW * 32)
        {
            const int l = idx % 32, v = (idx / 32) % (NT * 4);
            const int u = idx / (32 * NT * 4);
            const int un = (int) blockIdx.x * CU + u;
            const int nt = v / 4, i = v % 4;
            const int row = p0 + 8 * nt + 2 * (l & 3) + (i & 1);
            const int col = 16 * un + (l >> 2) + 8 * (i >> 1);
            float     s[MR];

            if (un >= NU || row >= r1) {
                continue;
            }
#pragma unroll
            for (int h = 0; h < MR; h++) {
                s[h] = 0.0f;
                for (int k = 0; k < SK; k++) {
                    s[h] += red[u * per + h * SK + k][v][l];
                }
            }
            if (MR == 1) {
                Y[(size_t) row * ldy + col] = s[0];
            } else {
                float gv = s[0];

                H[(size_t) row * ldy + col] =
                    moe_f2bf(moe_silu_mul(gv, s[MR - 1]));
            }
        }
        __syncthreads();            /* red free for the next pass */
    }
}


/* dst (one matrix, tiled) from src in fmt's qweight layout; a thread per
 * output word. */
__global__ void
kernel_q4t_pack(int fmt, const uint32_t *src, uint32_t *dst, int Ntot,
    int K)
{
    moe_pdl_enter();
    const int64_t total = (int64_t) Ntot * K / 8;
    const int     KT = K / 64;

    for (int64_t idx = (int64_t) blockIdx.x * blockDim.x + threadIdx.x;
         idx < total; idx += (int64_t) gridDim.x * blockDim.x)
    {
        const int     i = (int) (idx & 3), lane = (int) ((idx >> 2) & 31);
        const int64_t tk = idx >> 7;            /* tile * KT + kt */
        const int     kt = (int) (tk % KT), tile = (int) (tk / KT);
        const int     f0 = 16 * tile + (lane >> 2);
        const int     kb = 64 * kt + 16 * (lane & 3) + 4 * i;
        uint32_t      word = 0;

        for (int p = 0; p < 8; p++) {
            int      f = f0 + 8 * (p & 1);
            int      k = kb + 2 * ((p >> 1) & 1) + (p >> 2);
            uint32_t q;

            if (fmt == MOE_K_Q4_AWQ) {
                q = src[(size_t) k * (Ntot / 8) + f / 8]
                    >> q4t_zshift(MOE_K_Q4_AWQ, f);
            } else {
                q = src[(size_t) (k / 8) * Ntot + f] >> (4 * (k & 7));
            }
            word |= (q & 15u) << (4 * p);
        }
        dst[idx] = word;
    }
}


/*
 * bf16 (count, Ntot, K) from tiled weights: a thread per (tile word pair,
 * feature): 8 consecutive k of one feature, one 16-byte store; the
 * arithmetic of kernel_dequant_q4 (bf16(((float) q - z) * s)).
 */
__global__ void
kernel_dequant_q4t(int fmt, const uint32_t *qt, const int32_t *qzeros,
    const uint16_t *scales, int G, int zero_bias, int Ntot, int K, int count,
    bf16 *out)
{
    moe_pdl_enter();
    const int     KT = K / 64, KG = (K + G - 1) / G;
    const int64_t total = (int64_t) count * Ntot * K / 8;

    for (int64_t idx = (int64_t) blockIdx.x * blockDim.x + threadIdx.x;
         idx < total; idx += (int64_t) gridDim.x * blockDim.x)
    {
        /* idx = ((((m * NTL + tile) * KT + kt) * 32 + lane) * 2 + h) * 2
         * + rs */
        const int     rs = (int) (idx & 1), h = (int) ((idx >> 1) & 1);
        const int     lane = (int) ((idx >> 2) & 31);
        const int64_t mtk = idx >> 7;
        const int     kt = (int) (mtk % KT);
        const int64_t mt = mtk / KT;
        const int     tile = (int) (mt % (Ntot / 16));
        const int     m = (int) (mt / (Ntot / 16));
        const int     f = 16 * tile + (lane >> 2) + 8 * rs;
        const int     k0 = 64 * kt + 16 * (lane & 3) + 8 * h;
        const size_t  wbase = (size_t) mtk * 128 + (size_t) lane * 4;
        const size_t  grow = (size_t) m * KG + k0 / G;
        const uint32_t zw = (uint32_t) qzeros[grow * (Ntot / 8) + f / 8];
        const float   z = (float) ((int) ((zw >> q4t_zshift(fmt, f)) & 15u)
                                   + zero_bias);
        const float   s = __half2float(__ushort_as_half(
            scales[grow * Ntot + f]));
        uint4         o;
        bf16         *ob = reinterpret_cast<bf16 *>(&o);

#pragma unroll
        for (int ii = 0; ii < 2; ii++) {
            uint32_t w = qt[wbase + 2 * h + ii];

#pragma unroll
            for (int j = 0; j < 4; j++) {
                int p = rs + 2 * ((j >> 1) & 1) + 4 * (j & 1);

                ob[4 * ii + j] = moe_f2bf(((float) ((w >> (4 * p)) & 15u)
                                           - z) * s);
            }
        }
        *reinterpret_cast<uint4 *>(out + ((size_t) m * Ntot + f) * K + k0)
            = o;
    }
}


extern "C" int
moe_cuda_q4t_supported(int fmt, int G, int Ntot, int K)
{
    return (fmt == MOE_K_Q4_AWQ || fmt == MOE_K_Q4_GPTQ) && Ntot > 0
           && Ntot % 16 == 0 && K > 0 && K % 64 == 0 && G > 0
           && G % 64 == 0 && (G & (G - 1)) == 0;
}


static int
q4t_check(const char *who, int fmt, int G, int Ntot, int K)
{
    if (!moe_cuda_q4t_supported(fmt, G, Ntot, K)) {
        moe_cuda_set_error("%s: unsupported shape (format %d, N %d, K %d, "
                           "group %d: the tiled layout needs N %% 16, K %% "
                           "64 == 0 and a power-of-two group >= 64)", who,
                           fmt, Ntot, K, G);
        return MOE_K_EUNSUPPORTED;
    }
    return MOE_K_OK;
}


extern "C" int
moe_cuda_q4t_pack(int fmt, int32_t *qweight, int Ntot, int K, int count,
    void *scratch, size_t scratch_bytes, cudaStream_t stream)
{
    size_t bytes = (size_t) Ntot * K / 2;

    MOE_TRY(q4t_check("q4t_pack", fmt, 64, Ntot, K));
    if (scratch == NULL || scratch_bytes < bytes
        || ((uintptr_t) qweight & 15u) != 0)
    {
        moe_cuda_set_error("q4t_pack: scratch of %zu bytes for a %zu-byte "
                           "matrix (or qweight not 16-byte aligned)",
                           scratch_bytes, bytes);
        return MOE_K_EUNSUPPORTED;
    }
    for (int m = 0; m < count; m++) {
        uint32_t *w = reinterpret_cast<uint32_t *>(qweight) + m * bytes / 4;

        MOE_CUDA_CHECK(moe_launch(kernel_q4t_pack,
            moe_grid((int64_t) bytes / 4, 256), 256, 0, stream, fmt,
            (const uint32_t *) w, (uint32_t *) scratch, Ntot, K));
        MOE_CUDA_CHECK(cudaMemcpyAsync(w, scratch, bytes,
                                       cudaMemcpyDeviceToDevice, stream));
    }
    return MOE_K_OK;
}


extern "C" int
moe_cuda_dequant_q4t(int fmt, const int32_t *qt, const int32_t *qzeros,
    const uint16_t *scales, int G, int zero_bias, int Ntot, int K, int count,
    moe_bf16_t *out, cudaStream_t stream)
{
    int64_t total = (int64_t) count * Ntot * K / 8;

    MOE_TRY(q4t_check("dequant_q4t", fmt, G, Ntot, K));
    if (total <= 0) {
        return MOE_K_OK;
    }
    MOE_CUDA_CHECK(moe_launch(kernel_dequant_q4t, moe_grid(total, 256), 256,
        0, stream, fmt, (const uint32_t *) qt, qzeros, scales, G,
        fmt == MOE_K_Q4_AWQ ? 0 : zero_bias, Ntot, K, count,
        reinterpret_cast<bf16 *>(out)));
    return MOE_K_OK;
}


/*
 * K splits per tile: the smallest power of two (at most Q4T_NW / MR)
 * that gives about a full wave of warps (16 per SM), each warp keeping
 * at least 4 k-tiles.
 */
static int
q4t_split(int units, int MR, int KT)
{
    int64_t want = (int64_t) moe_sm_count() * 16;
    int     SK = 1;

    while (2 * SK * MR <= Q4T_NW && (int64_t) units * MR * SK < want
           && KT / (2 * SK) >= 4)
    {
        SK *= 2;
    }
    return SK;
}


template <int FMT, int NT>
static int
q4t_launch(int MR, dim3 grid, const bf16 *X, int ldx, const int32_t *xrow,
    int xdiv, const uint4 *qt, const int32_t *qzeros,
    const uint16_t *scales, int G, int zero_bias, int Ntot, int K, int SK,
    const int32_t *offs, int E, int n, float *Y, bf16 *H, int ldy,
    cudaStream_t stream)
{
    if (MR == 2) {
        MOE_CUDA_CHECK(moe_launch(kernel_qgemv_q4t<FMT, NT, 2>, grid,
            Q4T_NW * 32, 0, stream, X, ldx, xrow, xdiv, qt, qzeros, scales,
            G, zero_bias, Ntot, K, SK, offs, E, n, Y, H, ldy));
    } else {
        MOE_CUDA_CHECK(moe_launch(kernel_qgemv_q4t<FMT, NT, 1>, grid,
            Q4T_NW * 32, 0, stream, X, ldx, xrow, xdiv, qt, qzeros, scales,
            G, zero_bias, Ntot, K, SK, offs, E, n, Y, H, ldy));
    }
    return MOE_K_OK;
}


extern "C" int
moe_cuda_qgemv_q4t(int fmt, const moe_bf16_t *X, int ldx,
    const int32_t *xrow, int xdiv, const int32_t *qt,
    const int32_t *qzeros, const uint16_t *scales, int G, int zero_bias,
    int Ntot, int K, const int32_t *offs, int E, int n, int max_rows,
    int sk, float *Y, int ldy, moe_bf16_t *H, cudaStream_t stream)
{
    int  ng, mr, MR, NU, SK, CU, KT;
    dim3 grid;

    if (n <= 0) {
        return MOE_K_OK;
    }
    MOE_TRY(q4t_check("qgemv_q4t", fmt, G, Ntot, K));
    MR = H != NULL ? 2 : 1;
    if (ldx % 8 != 0 || E <= 0 || (offs == NULL && E != 1)
        || (H == NULL && Y == NULL) || (MR == 2 && Ntot % 32 != 0)
        || ((uintptr_t) X & 15u) != 0 || ((uintptr_t) qt & 15u) != 0)
    {
        moe_cuda_set_error("qgemv_q4t: unsupported ldx %d / E %d / N %d / "
                           "alignment", ldx, E, Ntot);
        return MOE_K_EUNSUPPORTED;
    }
    ng = q_groups(offs, E, n);
    mr = max_rows > 0 ? max_rows : (n + ng - 1) / ng;
    NU = Ntot / 16 / MR;
    KT = K / 64;
    SK = sk > 0 ? sk : q4t_split(NU * ng, MR, KT);
    if (sk < 0 || SK * MR > Q4T_NW || (Q4T_NW / MR) % SK != 0) {
        moe_cuda_set_error("qgemv_q4t: k split %d (a power of two, at most "
                           "%d)", SK, Q4T_NW / MR);
        return MOE_K_EUNSUPPORTED;
    }
    CU = Q4T_NW / (MR * SK);
    grid = dim3((unsigned) ((NU + CU - 1) / CU), (unsigned) ng);
    if (fmt == MOE_K_Q4_AWQ) {
        zero_bias = 0;
    }

#define Q4T_ARGS  MR, grid, reinterpret_cast<const bf16 *>(X), ldx, xrow,    \
                  xdiv, reinterpret_cast<const uint4 *>(qt), qzeros, scales, \
                  G, zero_bias, Ntot, K, SK, offs, E, n, Y,                  \
                  reinterpret_cast<bf16 *>(H), H != NULL ? Ntot / 2 : ldy,   \
                  stream
#define Q4T_PICK(F)                                                          \
    (mr <= 8 ? q4t_launch<F, 1>(Q4T_ARGS)                                    \
     : mr <= 16 ? q4t_launch<F, 2>(Q4T_ARGS)                                 \
                : q4t_launch<F, 4>(Q4T_ARGS))
    return fmt == MOE_K_Q4_AWQ ? Q4T_PICK(MOE_K_Q4_AWQ)
                               : Q4T_PICK(MOE_K_Q4_GPTQ);
#undef Q4T_PICK
#undef Q4T_ARGS
}
