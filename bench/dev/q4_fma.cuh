/*
 * Dev harness only: kernel_qgemv_q4_fma, a CUDA-core 4-bit GEMV (AWQ,
 * GPTQ) for 1-2 rows per group, moved out of kernels/quant_gemv.cu after
 * its first H200 run (2026-12-02, bench/RESULTS.md): it lost to the
 * tensor-core kernel_qgemv_q4_mma at every Mixtral shape at 1 and 2 rows
 * per expert (AWQ gate|up 108.9 vs 82.1-84.5 us, down 96.1 vs 52.2,
 * GPTQ gate|up 91.2 vs 78.8, down 57.1 vs 34.8; bench/dev/quant_gemv).
 * Included by bench/dev/quant_gemv.cu after kernels/quant_gemv.cu (it
 * uses that file's helpers); q4s_try is its launcher.
 */

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
    moe_pdl_enter();
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
            moe_cp_async_commit();
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
            moe_cp_async_wait<P - 1>();
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
        moe_cp_async_wait<0>();
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
    cudaLaunchAttribute at[2] = {};

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
    q_cluster_cfg(&cfg, at, tiles, ng, S, Q4S_WARPS * 32,
                  q4s_smem(FMT, NR, MR, kmax), stream);
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
        int    slots = bps * moe_sm_count(), best = smin;
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


