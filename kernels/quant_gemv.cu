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
 * kernel_qgemv_q4: AWQ packs 8 output columns per int32 along N, GPTQ 8
 * k per int32 along K; both keep consecutive words along N, so a thread
 * owns one word column (AWQ: 8 columns; GPTQ: 1 column, 8 k per word) and
 * walks k: every warp load is 128 contiguous bytes.  A block is QN
 * threads x a k range [k0, k1) (grid.z splits K so that small groups
 * still fill the machine), the group's input rows for that range staged
 * in shared memory as fp32, scales and zeros reloaded per quantization
 * group, 8 weight words in flight per thread; the partial sums are added
 * into Y with atomics (the launcher zeroes Y first).
 *
 * Dequantize kernels: the same arithmetic, written as bf16 (N, K) rows
 * with 16-byte stores (8 consecutive k of one column per thread).
 */
#include <cuda_fp8.h>
#include <cuda_fp16.h>

#include "common.cuh"
#include "quant_gemv.h"

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

    const int tid = (int) threadIdx.x;
    const int nthr = FMT == MOE_K_Q4_AWQ ? Ntot / 8 : Ntot;
    const int c = (int) blockIdx.x * Q4_NT + tid;   /* word column */
    const int k0 = (int) blockIdx.z * KC, k1 = min(K, k0 + KC);
    const int KG = K / G;
    int       r0, r1;
    const int e = q_group_rows(offs, E, n, &r0, &r1);

    if (e < 0 || k0 >= K) {
        return;                             /* block-uniform */
    }

    const bool valid = c < nthr;

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
                        int g = g_idx != NULL ? g_idx[(size_t) e * K + k]
                                              : k / G;
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
    const int     KG = K / G;
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
        || Ntot % 8 != 0 || K <= 0 || K % 8 != 0 || G <= 0 || G % 8 != 0
        || K % G != 0)
    {
        moe_cuda_set_error("%s: unsupported shape (format %d, N %d, K %d, "
                           "group %d)", who, fmt, Ntot, K, G);
        return MOE_K_EUNSUPPORTED;
    }
    return MOE_K_OK;
}


extern "C" int
moe_cuda_qgemv_q4(int fmt, const moe_bf16_t *X, int ldx,
    const int32_t *xrow, int xdiv, const int32_t *qweight,
    const int32_t *qzeros, const uint16_t *scales, const int32_t *g_idx,
    int G, int zero_bias, int Ntot, int K, const int32_t *offs, int E, int n,
    float *Y, int ldy, cudaStream_t stream)
{
    int  nthr, gx, ng, ks, KC;
    dim3 grid;

    if (n <= 0) {
        return MOE_K_OK;
    }
    MOE_TRY(q4_check("qgemv_q4", fmt, G, Ntot, K));
    if (ldx % 8 != 0 || E <= 0 || (offs == NULL && E != 1)) {
        moe_cuda_set_error("qgemv_q4: unsupported ldx %d / E %d", ldx, E);
        return MOE_K_EUNSUPPORTED;
    }
    nthr = fmt == MOE_K_Q4_AWQ ? Ntot / 8 : Ntot;
    gx = (nthr + Q4_NT - 1) / Q4_NT;
    ng = q_groups(offs, E, n);
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
