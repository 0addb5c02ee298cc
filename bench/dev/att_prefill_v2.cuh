/*
 * Dev variant of kernel_attention_prefill_tc (kernels/attention.cu): the
 * same CTA tile (ATT_TC_BM = 128 query rows x one q head), grid, row-tile
 * order, run handling, block-table gather, masks and output rounding, but
 * FA2-style warps: 4 warps (128 threads), warp w owns rows 32 w .. 32 w +
 * 31 as two m16 tiles, so each K fragment (ldmatrix) of S = Q K^T and each
 * V fragment of O += P V feeds 4 mma.sync instead of 2.  Template knobs:
 *
 *   BN      keys per loaded tile (32, 64)
 *   STAGES  cp.async stages of (K, V) tiles (2 or 3); one __syncthreads per
 *           key tile (the stage reloaded is the one every warp finished
 *           at the previous tile)
 *   BC      keys per S sub-tile (16, 32 or BN): S = Q K^T, its softmax
 *           and O += P V per BC keys of the loaded tile
 *   MINB    __launch_bounds__(128, MINB): CTAs per SM the registers are
 *           sized for.  1 and 2 give the same cap (255 registers at 128
 *           threads); the shared memory of BN 64, 2 stages, HD 128 is
 *           102 KB, so two CTAs fit.
 *
 * ptxas (HD 128): BC 16 fits in 255 registers without spills; BC 32 and
 * 64 spill a few words (24 to 72 bytes) although their live state (O's
 * 128 floats, S's 2 BC / 2) should fit: the default instance in the
 * harness is BN 64, BC 16, 2 stages (bench/dev/attention.cu).
 *
 * Included by bench/dev/attention.cu after ../../kernels/attention.cu.
 * A drop-in for kernel_attention_prefill_tc: same arguments, same 128-row
 * tiles (the SIMT kernel's skip test stays valid), tiles of more than
 * ATT_TC_RUNS runs left alone.
 */
#ifndef MOE_BENCH_DEV_ATT_PREFILL_V2_CUH
#define MOE_BENCH_DEV_ATT_PREFILL_V2_CUH

#define ATT_FA2_NT     128          /* threads per CTA */
#define ATT_FA2_WM     32           /* rows per warp (two m16 tiles) */

static_assert((ATT_FA2_NT / 32) * ATT_FA2_WM == ATT_TC_BM, "fa2 row split");
static_assert(ATT_FA2_NT >= ATT_TC_BM, "att_tc_runs: a thread a row");


/* Dynamic shared memory of kernel_dev_prefill_fa2<HD, BN, *, STAGES, *>: Q,
 * then STAGES x (K, V). */
static constexpr size_t
att_fa2_smem(int hd, int bn, int stages)
{
    return (size_t) (ATT_TC_BM + 2 * stages * bn) * (hd + 8) * sizeof(bf16);
}


/*
 * grid (n_heads, ceil(T / ATT_TC_BM)), ATT_FA2_NT threads,
 * att_fa2_smem(HD, BN, STAGES) bytes of dynamic shared memory.  Lane
 * (gq = lane / 4, tq = lane % 4) of warp w holds, for m tile mt (0, 1),
 * rows 32 w + 16 mt + gq (fragment elements 0, 1) and + 8 (elements 2,
 * 3), columns 2 tq, 2 tq + 1 of each 8-wide tile.  Key tiles of BN keys
 * are loaded (cp.async, STAGES stages) and computed in sub-tiles of BC
 * keys (S, its softmax and P V; BC < BN keeps S's registers down while
 * the loads and barriers stay per BN).  The run's bookkeeping (key range,
 * block-table offset, per-warp key range, per-m-tile mask-free range)
 * lives in shared memory and is re-read after each barrier, which keeps
 * it out of the registers the 2 x (HD / 8) x 4 accumulators need.
 */
template <int HD, int BN, int BC, int STAGES, int MINB>
__global__ void __launch_bounds__(ATT_FA2_NT, MINB)
kernel_dev_prefill_fa2(const float *qkv, int ld, int T,
    const int32_t *tok_pos, const int32_t *tok_seq, const int32_t *bt,
    const int32_t *bt_off, const bf16 *kv_layer, int block_size, int n_heads,
    int n_kv, int window, bf16 *out)
{
    moe_pdl_enter();
    constexpr int BM = ATT_TC_BM, NT = ATT_FA2_NT, WM = ATT_FA2_WM;
    constexpr int NW = NT / 32;
    constexpr int ROW = HD + 8;             /* bf16 per smem row */
    constexpr int CPR = HD / 8;             /* 16-byte chunks per row */
    constexpr int KS = HD / 16;             /* k steps of S = Q K^T */
    constexpr int DN = HD / 8;              /* 8-wide d tiles of O */
    constexpr int NN = BC / 8;              /* 8-wide key tiles of S */
    constexpr int RPT = BN * CPR / NT;      /* K (and V) chunks per thread */
    static_assert(RPT * NT == BN * CPR, "tile load split");
    static_assert(BC % 16 == 0 && BN % BC == 0 && HD % 16 == 0, "shapes");
    static_assert(STAGES >= 2, "stages");

    extern __shared__ __align__(16) unsigned char att_fa2_sm[];
    bf16 *q_s = reinterpret_cast<bf16 *>(att_fa2_sm);    /* [BM][ROW] */
    bf16 *kv_s = q_s + BM * ROW;            /* [stage][K, V][BN][ROW] */
    __shared__ int seq_s[BM], pos_s[BM], lo_s[BM];
    __shared__ int run_s[3];                /* kmin, kmax, bt_off[seq] */
    __shared__ int wk_s[NW][2];             /* sub-tile starts a warp needs */
    __shared__ int mf_s[NW][2][2];          /* ... an m tile sees unmasked */

    const int h = blockIdx.x;
    const int tile = (int) gridDim.y - 1 - (int) blockIdx.y;
    const int r0 = tile * BM, nrows = min(BM, T - r0);
    const int grp = n_heads / n_kv, kvd = n_kv * HD;
    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    const int gq = lane >> 2, tq = lane & 3;
    const int wr0 = warp * WM;              /* this warp's first row */
    const bf16 *kvg = kv_layer + (size_t) (h / grp) * HD;

    if (tid < BM) {
        int s = -1, p = -1, lo = 0;

        if (tid < nrows) {
            s = tok_seq[r0 + tid];
            p = tok_pos[r0 + tid];
            lo = window > 0 && p - window + 1 > 0 ? p - window + 1 : 0;
        }
        seq_s[tid] = s;
        pos_s[tid] = p;
        lo_s[tid] = lo;
    }
    if (att_tc_runs(tok_seq, T, tile) > ATT_TC_RUNS) {
        return;                             /* the SIMT kernel does it */
    }

    /* cp.async of the K and V rows of key tile i of [kmin, kmax] into
     * stage st: a thread's K and V chunks share their row's page lookup */
    auto load = [&](int i, int st, int kmin, int kmax, const int32_t *table)
    {
        const int kb = kmin + i * BN;
        bf16     *dst = kv_s + st * 2 * BN * ROW;

#pragma unroll
        for (int c = 0; c < RPT; c++) {
            int  e = tid + c * NT;
            int  row = e / CPR, ch = e % CPR;
            int  j = kb + row;
            bool ok = j <= kmax;
            const bf16 *ksrc = kvg, *vsrc = kvg;

            if (ok) {
                ksrc = kvg + ((size_t) table[j / block_size] * 2 * block_size
                              + j % block_size) * kvd + ch * 8;
                vsrc = ksrc + (size_t) block_size * kvd;
            }
            moe_cp_async16(dst + row * ROW + ch * 8, ksrc, ok ? 16 : 0);
            moe_cp_async16(dst + (BN + row) * ROW + ch * 8, vsrc,
                           ok ? 16 : 0);
        }
    };

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

        const int ntl = (kmax - kmin) / BN + 1;

        /* this warp's rows in the run: the sub-tile starts kc it needs
         * (kc + BC - 1 >= min lo, kc <= max pos), and per m tile the
         * starts that need no mask (all 16 rows in the run, kc >= max lo,
         * kc + BC - 1 <= min pos) */
        {
            int wkmin = INT_MAX, wkmax = -1, mfa[2], mfb[2];

#pragma unroll
            for (int mt = 0; mt < 2; mt++) {
                const int b = wr0 + 16 * mt;
                const int mlo = max(rs, b), mhi = min(re, b + 16);
                int       lomax = -1, posmin = INT_MAX;

                for (int r = mlo; r < mhi; r++) {
                    lomax = max(lomax, lo_s[r]);
                    posmin = min(posmin, pos_s[r]);
                    wkmin = min(wkmin, lo_s[r]);
                    wkmax = max(wkmax, pos_s[r]);
                }
                mfa[mt] = mlo == b && mhi == b + 16 ? lomax : INT_MAX;
                mfb[mt] = posmin - (BC - 1);
            }
            if (lane == 0) {
                wk_s[warp][0] = wkmin == INT_MAX ? INT_MAX : wkmin - (BC - 1);
                wk_s[warp][1] = wkmax;
#pragma unroll
                for (int mt = 0; mt < 2; mt++) {
                    mf_s[warp][mt][0] = mfa[mt];
                    mf_s[warp][mt][1] = mfb[mt];
                }
            }
            if (tid == 0) {
                run_s[0] = kmin;
                run_s[1] = kmax;
                run_s[2] = bt_off[cs];
            }
            /* published by the first key tile's barrier; rewritten only
             * after the run's last barrier */
        }

        float o[2][DN][4], m[2][2], l[2][2];

#pragma unroll
        for (int mt = 0; mt < 2; mt++) {
#pragma unroll
            for (int n = 0; n < DN; n++) {
#pragma unroll
                for (int e = 0; e < 4; e++) {
                    o[mt][n][e] = 0.0f;
                }
            }
            m[mt][0] = m[mt][1] = -INFINITY;
            l[mt][0] = l[mt][1] = 0.0f;
        }

        {
            const int32_t *table = bt + bt_off[cs];

#pragma unroll
            for (int s = 0; s < STAGES - 1; s++) {
                if (s < ntl) {
                    load(s, s, kmin, kmax, table);
                }
                moe_cp_async_commit();
            }
        }

        /* Q rows, scaled by log2(e) / sqrt(hd), to bf16, while the first
         * key tiles are in flight (the first run only: later runs keep
         * them; the first key tile's barrier publishes them) */
        if (rs == 0) {
            const float qs = 1.4426950408889634f * rsqrtf((float) HD);

            for (int i = tid; i < BM * (HD / 4); i += NT) {
                int    row = i / (HD / 4), d = (i % (HD / 4)) * 4;
                float4 v = make_float4(0.0f, 0.0f, 0.0f, 0.0f);

                if (row < nrows) {
                    v = *reinterpret_cast<const float4 *>(
                            qkv + (size_t) (r0 + row) * ld + (size_t) h * HD
                            + d);
                }
                uint2 pk = make_uint2(att_pack(v.x * qs, v.y * qs),
                                      att_pack(v.z * qs, v.w * qs));

                *reinterpret_cast<uint2 *>(q_s + row * ROW + d) = pk;
            }
        }

        int stc = 0, stl = STAGES - 1;      /* stages: compute, next load */

        for (int i = 0; i < ntl; i++) {
            moe_cp_async_wait<STAGES - 2>();
            __syncthreads();                /* tile i in; stage stl free */

            const int kmin_ = run_s[0];

            if (i + STAGES - 1 < ntl) {
                load(i + STAGES - 1, stl, kmin_, run_s[1], bt + run_s[2]);
            }
            moe_cp_async_commit();
            stl = stl + 1 == STAGES ? 0 : stl + 1;

#pragma unroll 1
            for (int sc = 0; sc < BN / BC; sc++) {
                const int kc = kmin_ + i * BN + sc * BC;    /* sub-tile */

                if (kc < wk_s[warp][0] || kc > wk_s[warp][1]) {
                    continue;               /* none of the warp's rows */
                }

                const bf16 *ks = kv_s + (stc * 2 * BN + sc * BC) * ROW;
                const bf16 *vs = ks + BN * ROW;
                float       s[2][NN][4];

#pragma unroll
                for (int mt = 0; mt < 2; mt++) {
#pragma unroll
                    for (int n = 0; n < NN; n++) {
#pragma unroll
                        for (int e = 0; e < 4; e++) {
                            s[mt][n][e] = 0.0f;
                        }
                    }
                }

                /* S = Q K^T: each K fragment feeds 4 mma */
#pragma unroll
                for (int kk = 0; kk < KS; kk++) {
                    uint32_t a[2][4];

#pragma unroll
                    for (int mt = 0; mt < 2; mt++) {
                        moe_ldmatrix_x4(a[mt][0], a[mt][1], a[mt][2],
                                        a[mt][3],
                                        q_s + (wr0 + 16 * mt + (lane & 15))
                                              * ROW
                                            + kk * 16 + (lane >> 4) * 8);
                    }
#pragma unroll
                    for (int np = 0; np < BC / 16; np++) {
                        uint32_t b0, b1, b2, b3;

                        moe_ldmatrix_x4(b0, b1, b2, b3,
                                ks + (np * 16 + (lane & 7) + ((lane >> 4) << 3))
                                     * ROW + kk * 16 + ((lane >> 3) & 1) * 8);
#pragma unroll
                        for (int mt = 0; mt < 2; mt++) {
                            moe_mma_bf16(s[mt][2 * np], a[mt][0], a[mt][1],
                                         a[mt][2], a[mt][3], b0, b1);
                            moe_mma_bf16(s[mt][2 * np + 1], a[mt][0],
                                         a[mt][1], a[mt][2], a[mt][3], b2, b3);
                        }
                    }
                }

                /* mask an m tile unless each of its 16 rows is in the run
                 * and sees the whole sub-tile */
#pragma unroll
                for (int mt = 0; mt < 2; mt++) {
                    if (kc < mf_s[warp][mt][0] || kc > mf_s[warp][mt][1]) {
#pragma unroll
                        for (int hf = 0; hf < 2; hf++) {
                            const int  r = wr0 + 16 * mt + 8 * hf + gq;
                            const bool act = r >= rs && r < re;
                            const int  p = pos_s[r], lo = lo_s[r];

#pragma unroll
                            for (int n = 0; n < NN; n++) {
#pragma unroll
                                for (int e = 0; e < 2; e++) {
                                    int j = kc + n * 8 + 2 * tq + e;

                                    if (!(act && j >= lo && j <= p)) {
                                        s[mt][n][2 * hf + e] = -INFINITY;
                                    }
                                }
                            }
                        }
                    }
                }

                /* online softmax per row (m tile mt, half hf); P packed to
                 * bf16 pairs at once: p[mt][n][hf] = row hf's columns
                 * 2 tq, 2 tq + 1 of 8-key tile n (an A fragment register) */
                uint32_t p[2][NN][2];

#pragma unroll
                for (int mt = 0; mt < 2; mt++) {
#pragma unroll
                    for (int hf = 0; hf < 2; hf++) {
                        float mx = -INFINITY, sum = 0.0f, mn, mu, corr;

#pragma unroll
                        for (int n = 0; n < NN; n++) {
                            mx = fmaxf(mx, fmaxf(s[mt][n][2 * hf],
                                                 s[mt][n][2 * hf + 1]));
                        }
                        mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
                        mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
                        mn = fmaxf(m[mt][hf], mx);
                        mu = mn == -INFINITY ? 0.0f : mn;
                        corr = exp2f(m[mt][hf] - mu);
                        m[mt][hf] = mn;
#pragma unroll
                        for (int n = 0; n < NN; n++) {
                            float x = exp2f(s[mt][n][2 * hf] - mu);
                            float y = exp2f(s[mt][n][2 * hf + 1] - mu);

                            sum += x + y;
                            p[mt][n][hf] = att_pack(x, y);
                        }
                        l[mt][hf] = l[mt][hf] * corr + sum;
#pragma unroll
                        for (int n = 0; n < DN; n++) {
                            o[mt][n][2 * hf] *= corr;
                            o[mt][n][2 * hf + 1] *= corr;
                        }
                    }
                }

                /* O += P V: each V fragment (transposed) feeds 4 mma */
#pragma unroll
                for (int kk = 0; kk < BC / 16; kk++) {
#pragma unroll
                    for (int dp = 0; dp < DN / 2; dp++) {
                        uint32_t b0, b1, b2, b3;

                        moe_ldmatrix_x4_trans(b0, b1, b2, b3,
                                 vs + (kk * 16 + (lane & 7)
                                       + ((lane >> 3) & 1) * 8) * ROW
                                    + (dp * 2 + (lane >> 4)) * 8);
#pragma unroll
                        for (int mt = 0; mt < 2; mt++) {
                            moe_mma_bf16(o[mt][2 * dp], p[mt][2 * kk][0],
                                         p[mt][2 * kk][1],
                                         p[mt][2 * kk + 1][0],
                                         p[mt][2 * kk + 1][1], b0, b1);
                            moe_mma_bf16(o[mt][2 * dp + 1], p[mt][2 * kk][0],
                                         p[mt][2 * kk][1],
                                         p[mt][2 * kk + 1][0],
                                         p[mt][2 * kk + 1][1], b2, b3);
                        }
                    }
                }
            }
            stc = stc + 1 == STAGES ? 0 : stc + 1;
        }
        __syncthreads();                    /* stages and run_s, wk_s, mf_s
                                             * free for the next run */

        /* normalise and write the run's rows */
#pragma unroll
        for (int mt = 0; mt < 2; mt++) {
#pragma unroll
            for (int hf = 0; hf < 2; hf++) {
                const int r = wr0 + 16 * mt + 8 * hf + gq;
                float     sum = l[mt][hf];

                sum += __shfl_xor_sync(0xffffffffu, sum, 1);
                sum += __shfl_xor_sync(0xffffffffu, sum, 2);
                if (r >= rs && r < re) {
                    float inv = 1.0f / sum;
                    bf16 *orow = out + ((size_t) (r0 + r) * n_heads + h) * HD
                                 + 2 * tq;

#pragma unroll
                    for (int n = 0; n < DN; n++) {
                        *reinterpret_cast<uint32_t *>(orow + n * 8) =
                            att_pack(o[mt][n][2 * hf] * inv,
                                     o[mt][n][2 * hf + 1] * inv);
                    }
                }
            }
        }
        rs = re;
    }
}


/* Launch kernel_dev_prefill_fa2<HD, BN, BC, STAGES, MINB> with the arguments
 * of att_tc_launch (raising its shared-memory limit and carveout once). */
template <int HD, int BN, int BC, int STAGES, int MINB>
static int
att_fa2_launch(int T, const float *qkv, int ld, const int32_t *tok_pos,
    const int32_t *tok_seq, const int32_t *bt, const int32_t *bt_off,
    const bf16 *kv, int block_size, int n_heads, int n_kv, int window,
    bf16 *out, cudaStream_t stream)
{
    static int   ready = 0;
    const size_t sm = att_fa2_smem(HD, BN, STAGES);
    dim3         grid((unsigned) n_heads,
                      (unsigned) ((T + ATT_TC_BM - 1) / ATT_TC_BM));

    if (!ready) {
        MOE_CUDA_CHECK(moe_smem_max_carveout(
            kernel_dev_prefill_fa2<HD, BN, BC, STAGES, MINB>, sm));
        ready = 1;
    }
    MOE_CUDA_CHECK(moe_launch(kernel_dev_prefill_fa2<HD, BN, BC, STAGES, MINB>,
        grid, ATT_FA2_NT, sm, stream, qkv, ld, T, tok_pos, tok_seq, bt,
        bt_off, kv, block_size, n_heads, n_kv, window, out));
    return MOE_K_OK;
}


/* CTAs per SM of kernel_dev_prefill_fa2<HD, BN, BC, STAGES, MINB> (after its
 * first launch has raised the shared-memory limit). */
template <int HD, int BN, int BC, int STAGES, int MINB>
static int
att_fa2_occupancy(void)
{
    int n = 0;

    if (cudaOccupancyMaxActiveBlocksPerMultiprocessor(&n,
            kernel_dev_prefill_fa2<HD, BN, BC, STAGES, MINB>, ATT_FA2_NT,
            att_fa2_smem(HD, BN, STAGES)) != cudaSuccess) {
        return -1;
    }
    return n;
}

#endif /* MOE_BENCH_DEV_ATT_PREFILL_V2_CUH */
