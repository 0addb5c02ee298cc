/*
 * Dev variants of kernel_attention_prefill_tc (kernels/attention.cu) that
 * do not ship, for bench/dev/attention (included after
 * ../../kernels/attention.cu):
 *
 *   - kernel_dev_prefill_8w<HD>: the tensor-core prefill kernel shipped
 *     until 2026-12-03: the same 128-row tiles, runs, gather and masks, 8
 *     warps of 16 rows (one m16 tile each, so each K / V fragment feeds 2
 *     MMAs), key tiles of 64, two cp.async stages, 245 registers, one CTA
 *     per SM.  H200, 2048-token causal prefill (32 / 8 heads, head dim
 *     128): 292 us against the FA2-style kernel's 194 us.
 *   - the FA2-style kernel's other template instances (keys per loaded
 *     tile BN, per S sub-tile BC, stages, CTAs per SM), launched through
 *     att_tc_launch_v; the shipped one is BN 32, BC 32, 2 stages, 2 CTAs.
 */
#ifndef MOE_BENCH_DEV_ATT_PREFILL_8W_CUH
#define MOE_BENCH_DEV_ATT_PREFILL_8W_CUH

#define ATT_8W_BN      64           /* keys per tile */
#define ATT_8W_NT      256          /* threads per CTA (8 warps x 16 rows) */

/* Dynamic shared memory of kernel_dev_prefill_8w<HD>: Q, then
 * 2 x (K, V). */
static constexpr size_t
att_8w_smem(int hd)
{
    return (size_t) (ATT_TC_BM + 4 * ATT_8W_BN) * (hd + 8) * sizeof(bf16);
}


/*
 * grid (n_heads, ceil(T / ATT_TC_BM)), ATT_8W_NT threads, att_8w_smem(HD)
 * bytes of dynamic shared memory.  CTA = ATT_TC_BM consecutive tokens
 * (rows) x one q head h; the last row tile goes first (the longest causal
 * ranges).  Warp w owns rows 16 w .. 16 w + 15: in mma fragments, lane
 * (gq = lane / 4, tq = lane % 4) holds rows gq and gq + 8 and columns
 * 2 tq, 2 tq + 1 of each 8-wide tile.  The rows are handled one run of
 * equal tok_seq at a time; a tile with more than ATT_TC_RUNS runs is left
 * to the SIMT kernel (launched after this one with its skip test).  Per run:
 * keys [min lo, max pos] of its rows in tiles of ATT_8W_BN, gathered
 * through the block table with cp.async (two stages), masked per row to
 * [lo, pos] (window and causal limit), online softmax in base 2.
 */
template <int HD>
__global__ void __launch_bounds__(ATT_8W_NT, 1)
kernel_dev_prefill_8w(const float *qkv, int ld, int T,
    const int32_t *tok_pos, const int32_t *tok_seq, const int32_t *bt,
    const int32_t *bt_off, const bf16 *kv_layer, int block_size, int n_heads,
    int n_kv, int window, bf16 *out)
{
    moe_pdl_enter();
    constexpr int BM = ATT_TC_BM, BN = ATT_8W_BN, NT = ATT_8W_NT;
    constexpr int ROW = HD + 8;             /* bf16 per smem row */
    constexpr int CPR = HD / 8;             /* 16-byte chunks per row */
    constexpr int KS = HD / 16;             /* k steps of S = Q K^T */
    constexpr int DN = HD / 8;              /* 8-wide d tiles of O */
    constexpr int LPT = 2 * BN * CPR / NT;  /* cp.async per thread / tile */
    static_assert(LPT * NT == 2 * BN * CPR, "tile load split");

    extern __shared__ __align__(16) unsigned char att_8w_sm[];
    bf16 *q_s = reinterpret_cast<bf16 *>(att_8w_sm);     /* [BM][ROW] */
    bf16 *kv_s = q_s + BM * ROW;            /* [stage][K, V][BN][ROW] */
    __shared__ int seq_s[BM], pos_s[BM], lo_s[BM];

    const int h = blockIdx.x;
    const int tile = (int) gridDim.y - 1 - (int) blockIdx.y;
    const int r0 = tile * BM, nrows = min(BM, T - r0);
    const int grp = n_heads / n_kv, kvd = n_kv * HD;
    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    const int gq = lane >> 2, tq = lane & 3;
    const int ra = warp * 16 + gq, rb = ra + 8;
    const bf16 *kvg = kv_layer + (size_t) (h / grp) * HD;

    if (att_tc_tile_rows(tok_seq, tok_pos, T, tile, window, seq_s, pos_s,
                         lo_s) > ATT_TC_RUNS)
    {
        return;                             /* the SIMT kernel does it */
    }

    /* Q rows, scaled by log2(e) / sqrt(hd), to bf16 */
    att_tc_load_q<HD, NT>(qkv, ld, r0, nrows, h, ROW, q_s);

    int rs = 0;

    while (rs < nrows) {                    /* one run of a sequence */
        const int cs = seq_s[rs];
        int       re = rs + 1;

        while (re < nrows && seq_s[re] == cs) {
            re++;
        }

        int kmin = INT_MAX, kmax = -1;      /* the run's key range */

        for (int r = rs; r < re; r++) {
            kmin = min(kmin, lo_s[r]);
            kmax = max(kmax, pos_s[r]);
        }

        /* this warp's rows in the run, their key range and common part */
        const int wlo = max(rs, warp * 16), whi = min(re, warp * 16 + 16);
        int       wkmin = INT_MAX, wkmax = -1, wlomax = -1, wposmin = INT_MAX;

        for (int r = wlo; r < whi; r++) {
            wkmin = min(wkmin, lo_s[r]);
            wkmax = max(wkmax, pos_s[r]);
            wlomax = max(wlomax, lo_s[r]);
            wposmin = min(wposmin, pos_s[r]);
        }

        const bool wfull = wlo == warp * 16 && whi == warp * 16 + 16;
        const bool acta = ra >= rs && ra < re, actb = rb >= rs && rb < re;
        const int  pa = pos_s[ra], la = lo_s[ra];
        const int  pb = pos_s[rb], lb = lo_s[rb];
        const int32_t *table = bt + bt_off[cs];
        const int  ntl = (kmax - kmin) / BN + 1;
        float      o[DN][4], m[2], l[2];

#pragma unroll
        for (int n = 0; n < DN; n++) {
#pragma unroll
            for (int e = 0; e < 4; e++) {
                o[n][e] = 0.0f;
            }
        }
        m[0] = m[1] = -INFINITY;
        l[0] = l[1] = 0.0f;

        /* cp.async of K and V rows of key tile i into stage st */
        auto load = [&](int i, int st) {
            int kb = kmin + i * BN;

#pragma unroll
            for (int c = 0; c < LPT; c++) {
                int  e = tid + c * NT;
                int  sel = e / (BN * CPR), rem = e % (BN * CPR);
                int  row = rem / CPR, ch = rem % CPR;
                int  j = kb + row;
                bool ok = j <= kmax;
                const bf16 *src = kvg;

                if (ok) {
                    src = kvg + (((size_t) table[j / block_size] * 2 + sel)
                                 * block_size + j % block_size) * kvd
                          + ch * 8;
                }
                moe_cp_async16(kv_s + ((st * 2 + sel) * BN + row) * ROW
                                   + ch * 8, src, ok ? 16 : 0);
            }
        };

        load(0, 0);
        moe_cp_async_commit();
        for (int i = 0; i < ntl; i++) {
            const int kb = kmin + i * BN;

            if (i + 1 < ntl) {
                load(i + 1, (i + 1) & 1);
            }
            moe_cp_async_commit();
            moe_cp_async_wait<1>();
            __syncthreads();

            if (wlo < whi && kb <= wkmax && kb + BN - 1 >= wkmin) {
                const bf16 *ks = kv_s + ((i & 1) * 2) * BN * ROW;
                const bf16 *vs = ks + BN * ROW;
                float       s[8][4];

#pragma unroll
                for (int n = 0; n < 8; n++) {
#pragma unroll
                    for (int e = 0; e < 4; e++) {
                        s[n][e] = 0.0f;
                    }
                }
#pragma unroll
                for (int kk = 0; kk < KS; kk++) {
                    uint32_t a0, a1, a2, a3;

                    moe_ldmatrix_x4(a0, a1, a2, a3,
                                    q_s + (warp * 16 + (lane & 15)) * ROW
                                        + kk * 16 + (lane >> 4) * 8);
#pragma unroll
                    for (int np = 0; np < 4; np++) {
                        uint32_t b0, b1, b2, b3;

                        moe_ldmatrix_x4(b0, b1, b2, b3,
                                ks + (np * 16 + (lane & 7) + ((lane >> 4) << 3))
                                     * ROW + kk * 16 + ((lane >> 3) & 1) * 8);
                        moe_mma_bf16(s[2 * np], a0, a1, a2, a3, b0, b1);
                        moe_mma_bf16(s[2 * np + 1], a0, a1, a2, a3, b2, b3);
                    }
                }

                /* mask unless every row of the warp sees the whole tile */
                if (!(wfull && kb >= wlomax && kb + BN - 1 <= wposmin)) {
#pragma unroll
                    for (int n = 0; n < 8; n++) {
#pragma unroll
                        for (int e = 0; e < 4; e++) {
                            int  j = kb + n * 8 + 2 * tq + (e & 1);
                            bool ok = e < 2 ? acta && j >= la && j <= pa
                                            : actb && j >= lb && j <= pb;

                            if (!ok) {
                                s[n][e] = -INFINITY;
                            }
                        }
                    }
                }

                /* online softmax, rows a (e 0, 1) and b (e 2, 3) */
#pragma unroll
                for (int hf = 0; hf < 2; hf++) {
                    float mx = -INFINITY, sum = 0.0f, mn, mu, corr;

#pragma unroll
                    for (int n = 0; n < 8; n++) {
                        mx = fmaxf(mx, fmaxf(s[n][2 * hf], s[n][2 * hf + 1]));
                    }
                    mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
                    mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
                    mn = fmaxf(m[hf], mx);
                    mu = mn == -INFINITY ? 0.0f : mn;
                    corr = exp2f(m[hf] - mu);
                    m[hf] = mn;
#pragma unroll
                    for (int n = 0; n < 8; n++) {
                        s[n][2 * hf] = exp2f(s[n][2 * hf] - mu);
                        s[n][2 * hf + 1] = exp2f(s[n][2 * hf + 1] - mu);
                        sum += s[n][2 * hf] + s[n][2 * hf + 1];
                    }
                    l[hf] = l[hf] * corr + sum;
#pragma unroll
                    for (int n = 0; n < DN; n++) {
                        o[n][2 * hf] *= corr;
                        o[n][2 * hf + 1] *= corr;
                    }
                }

                /* O += P V: P from the S fragments, V transposed */
#pragma unroll
                for (int kk = 0; kk < BN / 16; kk++) {
                    uint32_t a0 = att_pack(s[2 * kk][0], s[2 * kk][1]);
                    uint32_t a1 = att_pack(s[2 * kk][2], s[2 * kk][3]);
                    uint32_t a2 = att_pack(s[2 * kk + 1][0], s[2 * kk + 1][1]);
                    uint32_t a3 = att_pack(s[2 * kk + 1][2], s[2 * kk + 1][3]);

#pragma unroll
                    for (int dp = 0; dp < DN / 2; dp++) {
                        uint32_t b0, b1, b2, b3;

                        moe_ldmatrix_x4_trans(b0, b1, b2, b3,
                                 vs + (kk * 16 + (lane & 7)
                                       + ((lane >> 3) & 1) * 8) * ROW
                                    + (dp * 2 + (lane >> 4)) * 8);
                        moe_mma_bf16(o[2 * dp], a0, a1, a2, a3, b0, b1);
                        moe_mma_bf16(o[2 * dp + 1], a0, a1, a2, a3, b2, b3);
                    }
                }
            }
            __syncthreads();                /* stage free for the next load */
        }

        /* normalise and write the run's rows */
#pragma unroll
        for (int hf = 0; hf < 2; hf++) {
            float sum = l[hf];

            sum += __shfl_xor_sync(0xffffffffu, sum, 1);
            sum += __shfl_xor_sync(0xffffffffu, sum, 2);
            if (hf == 0 ? acta : actb) {
                float inv = 1.0f / sum;
                bf16 *orow = out + ((size_t) (r0 + (hf == 0 ? ra : rb))
                                    * n_heads + h) * HD + 2 * tq;

#pragma unroll
                for (int n = 0; n < DN; n++) {
                    *reinterpret_cast<uint32_t *>(orow + n * 8) =
                        att_pack(o[n][2 * hf] * inv, o[n][2 * hf + 1] * inv);
                }
            }
        }
        rs = re;
    }
}


/* Launch kernel_dev_prefill_8w<HD> with att_tc_launch's arguments. */
template <int HD>
static int
att_8w_launch(int T, const float *qkv, int ld, const int32_t *tok_pos,
    const int32_t *tok_seq, const int32_t *bt, const int32_t *bt_off,
    const bf16 *kv, int block_size, int n_heads, int n_kv, int window,
    bf16 *out, cudaStream_t stream)
{
    static int   ready = 0;
    const size_t sm = att_8w_smem(HD);
    dim3         grid((unsigned) n_heads,
                      (unsigned) ((T + ATT_TC_BM - 1) / ATT_TC_BM));

    if (!ready) {
        MOE_CUDA_CHECK(cudaFuncSetAttribute(
            kernel_dev_prefill_8w<HD>,
            cudaFuncAttributeMaxDynamicSharedMemorySize, (int) sm));
        ready = 1;
    }
    MOE_CUDA_CHECK(moe_launch(kernel_dev_prefill_8w<HD>, grid, ATT_8W_NT,
        sm, stream, qkv, ld, T, tok_pos, tok_seq, bt, bt_off, kv, block_size,
        n_heads, n_kv, window, out));
    return MOE_K_OK;
}


/* CTAs per SM of kernel_attention_prefill_tc<HD, BN, BC, STAGES, MINB>
 * (after its first launch has raised the shared-memory limit). */
template <int HD, int BN, int BC, int STAGES, int MINB>
static int
att_tc_occupancy(void)
{
    int n = 0;

    if (cudaOccupancyMaxActiveBlocksPerMultiprocessor(&n,
            kernel_attention_prefill_tc<HD, BN, BC, STAGES, MINB>, ATT_TC_NT,
            att_tc_smem(HD, BN, STAGES)) != cudaSuccess) {
        return -1;
    }
    return n;
}


/* CTAs per SM of a warpgroup prefill kernel k launched with nt threads
 * and sm bytes of dynamic shared memory (its limit raised first); -1 on
 * an error. */
static int
att_wg_occ_k(att_wg_kernel_t k, int nt, size_t sm)
{
    int n = 0;

    if (moe_smem_max_carveout(k, sm) != cudaSuccess
        || cudaOccupancyMaxActiveBlocksPerMultiprocessor(&n, k, nt, sm)
           != cudaSuccess) {
        return -1;
    }
    return n;
}


/* The same for the shipped kernel's instance <HD, BN, STAGES>. */
template <int HD, int BN, int STAGES>
static int
att_wg_occupancy(void)
{
    return att_wg_occ_k(kernel_attention_prefill_wg<HD, BN, STAGES>,
                        ATT_WG_NT, att_wg_smem(HD, BN, STAGES));
}

#endif /* MOE_BENCH_DEV_ATT_PREFILL_8W_CUH */
