/*
 * Dev harness only (bench/dev/attention.cu): the warpgroup prefill kernel
 * with the softmax of tile i overlapped with P_{i-1} V_{i-1} on the tensor
 * cores (FlashAttention-3's intra-warpgroup overlap: S_i is issued before
 * P_{i-1} V_{i-1}, O rescaled once that is done; three or more stages, no
 * tile skipped so every iteration issues the same wgmma sequence) and the
 * exponentials as one MUFU op each.  Written in the eighteenth session
 * and compiled, but no GPU was lent after it was written: not yet run.
 * It is timed and checked against the shipped output (kernels/
 * attention_wg.cuh's kernel) like the other variants.
 */
#ifndef MOE_BENCH_DEV_ATT_PREFILL_WGP_CUH
#define MOE_BENCH_DEV_ATT_PREFILL_WGP_CUH

#include <type_traits>

/* 2^x, one MUFU.EX2 (subnormal results flushed to zero: a weight below
 * 2^-126 of the row's largest is zero either way in bf16's P). */
__device__ __forceinline__ float
att_wgp_ex2(float x)
{
    float y;

    asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
    return y;
}


/* O (64 x 64 NA, o[NA][32]) += P (this warpgroup's 64 rows x BN keys,
 * bf16 pairs p[j][v]: row v's keys 8 j + 2 tq, + 1) V (BN x 64 NA at vs,
 * MN-major); asynchronous until moe_wg_wait, p stays read until then. */
template <int NA, int BN>
__device__ __forceinline__ void
att_wgp_pv(float (&o)[NA][32], const uint32_t (&p)[BN / 8][2],
    const unsigned char *vs)
{
#pragma unroll
    for (int kk = 0; kk < BN / 16; kk++) {
        const uint32_t a[4] = { p[2 * kk][0], p[2 * kk][1],
                                p[2 * kk + 1][0], p[2 * kk + 1][1] };

#pragma unroll
        for (int hh = 0; hh < NA; hh++) {
            moe_wg_mma_bf16_rs_n64_tb(
                o[hh], a, moe_wg_desc_mn(vs + hh * BN * 128 + kk * 16 * 128));
        }
    }
}


/*
 * grid (n_heads, ceil(T / ATT_TC_BM)), ATT_WG_NT threads,
 * att_wg_smem(HD, BN, STAGES) bytes of dynamic shared memory.  Lane l of
 * warp w (warpgroup wg = w / 4) holds rows 64 wg + 16 (w % 4) + l / 4 and
 * + 8 (v = 0, 1): S's d[4 j + 2 v + c] is key 8 j + 2 (l % 4) + c of the
 * tile, O's o[hh][4 j + 2 v + c] is column 64 hh + 8 j + 2 (l % 4) + c.
 */
template <int HD, int BN, int STAGES>
__global__ void __launch_bounds__(ATT_WG_NT, 1)
kernel_dev_prefill_wgp(const float *qkv, int ld, int T,
    const int32_t *tok_pos, const int32_t *tok_seq, const int32_t *bt,
    const int32_t *bt_off, const bf16 *kv_layer, int block_size, int n_heads,
    int n_kv, int window, bf16 *out)
{
    moe_pdl_enter();
    constexpr int BM = ATT_TC_BM, NT = ATT_WG_NT;
    constexpr int CPR = HD / 8;             /* 16-byte chunks per row */
    constexpr int NA = HD / 64;             /* 64-column blocks */
    constexpr int NJ = BN / 8;              /* 8-key column tiles of S */
    constexpr int RPT = BN * CPR / NT;      /* K (and V) chunks per thread */
    constexpr int TB = BN * HD * 2;         /* bytes of a K (or V) tile */
    static_assert(RPT * NT == BN * CPR, "tile load split");
    static_assert(HD == 64 || HD == 128, "head dim");
    static_assert(BN == 64 || BN == 128, "key tile");
    static_assert(STAGES >= 3, "stages: tiles i, i - 1 and the load");

    extern __shared__ unsigned char att_wg_raw[];
    unsigned char *q_s = att_wg_raw
        + ((ATT_WG_ALIGN - ((uint32_t) __cvta_generic_to_shared(att_wg_raw)
                            & (ATT_WG_ALIGN - 1))) & (ATT_WG_ALIGN - 1));
    unsigned char *kv_s = q_s + BM * HD * 2;    /* [stage][K, V] */
    __shared__ int seq_s[BM], pos_s[BM], lo_s[BM];
    __shared__ int run_s[3];                /* kmin, kmax, bt_off[seq] */
    __shared__ int mf_s[8][2];              /* tile starts a warp sees
                                             * unmasked */

    const int h = blockIdx.x;
    const int tile = (int) gridDim.y - 1 - (int) blockIdx.y;
    const int r0 = tile * BM, nrows = min(BM, T - r0);
    const int grp = n_heads / n_kv, kvd = n_kv * HD;
    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    const int wg = warp >> 2, gq = lane >> 2, tq = lane & 3;
    const int wr0 = wg * 64 + (warp & 3) * 16;  /* this warp's first row */
    const bf16 *kvg = kv_layer + (size_t) (h / grp) * HD;

    if (att_tc_tile_rows(tok_seq, tok_pos, T, tile, window, seq_s, pos_s,
                         lo_s) > ATT_TC_RUNS)
    {
        return;                             /* the SIMT kernel does it */
    }

    /* cp.async of the K and V rows of key tile i of [kmin, kmax] into
     * stage st (rows past kmax: zeros) */
    auto load = [&](int i, int st, int kmin, int kmax, const int32_t *table)
    {
        const int      kb = kmin + i * BN;
        unsigned char *kd = kv_s + st * 2 * TB;

#pragma unroll
        for (int c = 0; c < RPT; c++) {
            int  e = tid + c * NT;
            int  row = e / CPR, ch = e % CPR;
            int  j = kb + row;
            bool ok = j <= kmax;
            const bf16 *ksrc = kvg, *vsrc = kvg;
            uint32_t    off = att_wg_off(BN, row, ch * 8);

            if (ok) {
                ksrc = kvg + ((size_t) table[j / block_size] * 2 * block_size
                              + j % block_size) * kvd + ch * 8;
                vsrc = ksrc + (size_t) block_size * kvd;
            }
            moe_cp_async16(reinterpret_cast<bf16 *>(kd + off), ksrc,
                           ok ? 16 : 0);
            moe_cp_async16(reinterpret_cast<bf16 *>(kd + TB + off), vsrc,
                           ok ? 16 : 0);
        }
    };

    float s[BN / 2], o[NA][32];

#pragma unroll
    for (int i = 0; i < BN / 2; i++) {
        s[i] = 0.0f;
    }

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

        /* per warp the tile starts kb that need no mask (all 16 rows in the run,
         * kb >= max lo, kb + BN - 1 <= min pos) */
        {
            const int b = wr0, mlo = max(rs, b), mhi = min(re, b + 16);
            int       lomax = -1, posmin = INT_MAX;

            for (int r = mlo; r < mhi; r++) {
                lomax = max(lomax, lo_s[r]);
                posmin = min(posmin, pos_s[r]);
            }
            if (lane == 0) {
                mf_s[warp][0] = mlo == b && mhi == b + 16 ? lomax : INT_MAX;
                mf_s[warp][1] = posmin - (BN - 1);
            }
            if (tid == 0) {
                run_s[0] = kmin;
                run_s[1] = kmax;
                run_s[2] = bt_off[cs];
            }
            /* published by the first key tile's barrier; rewritten only
             * after the run's last barrier */
        }

        float m[2], l[2];

#pragma unroll
        for (int hh = 0; hh < NA; hh++) {
#pragma unroll
            for (int e = 0; e < 32; e++) {
                o[hh][e] = 0.0f;
            }
        }
        m[0] = m[1] = -INFINITY;
        l[0] = l[1] = 0.0f;

        {
            const int32_t *table = bt + bt_off[cs];

#pragma unroll
            for (int st = 0; st < STAGES - 2; st++) {
                if (st < ntl) {
                    load(st, st, kmin, kmax, table);
                }
                moe_cp_async_commit();
            }
        }

        /* Q rows, scaled by log2(e) / sqrt(hd), to bf16 in the swizzled
         * layout (the first run only; the first tile's barrier, after the
         * proxy fence, publishes them) */
        if (rs == 0) {
            const float qs = 1.4426950408889634f * rsqrtf((float) HD);

            for (int i = tid; i < BM * (HD / 4); i += NT) {
                int    rw = i / (HD / 4), d = (i % (HD / 4)) * 4;
                float4 v = make_float4(0.0f, 0.0f, 0.0f, 0.0f);

                if (rw < nrows) {
                    v = *reinterpret_cast<const float4 *>(
                            qkv + (size_t) (r0 + rw) * ld + (size_t) h * HD
                            + d);
                }
                *reinterpret_cast<uint2 *>(q_s + att_wg_off(BM, rw, d)) =
                    make_uint2(att_pack(v.x * qs, v.y * qs),
                               att_pack(v.z * qs, v.w * qs));
            }
        }

        /* Tile i's stage is i % STAGES.  A warpgroup issues S_i = Q K_i^T
         * and then O += P_{i-1} V_{i-1} (the tile before), takes S_i as
         * soon as it is done and computes its softmax while the tensor
         * cores still run P_{i-1} V_{i-1}; O is rescaled after that.  So
         * at iteration i stages i and i - 1 are in use, and the load of
         * tile i + STAGES - 2 goes to the stage of tile i - 2, whose last
         * reader (P_{i-2} V_{i-2}) every warpgroup waited for in
         * iteration i - 1, before this iteration's barrier.  Every
         * iteration issues the same wgmma sequence in both warpgroups (no
         * tile skipped: a row outside the run or past its keys is masked),
         * so the compiler keeps the wgmma asynchronous; the first tile,
         * with no P V due, is peeled. */
        int      stc = 0, stl = STAGES - 2; /* stages: tile i, next load */
        uint32_t pp[NJ][2];                 /* P_{i-1} */
        const unsigned char *vprev = kv_s;

        auto step = [&](int i, auto first) {
            constexpr bool FIRST = decltype(first)::value;

            moe_cp_async_wait<STAGES - 3>();
            moe_wg_fence_proxy_async();     /* this thread's copies and Q
                                             * stores, to the async proxy */
            __syncthreads();                /* tile i in; stage stl free */

            const int kmin_ = run_s[0];

            if (i + STAGES - 2 < ntl) {
                load(i + STAGES - 2, stl, kmin_, run_s[1], bt + run_s[2]);
            }
            moe_cp_async_commit();
            stl = stl + 1 == STAGES ? 0 : stl + 1;

            const int kb = kmin_ + i * BN;
            const unsigned char *ks = kv_s + stc * 2 * TB, *vs = ks + TB;

            stc = stc + 1 == STAGES ? 0 : stc + 1;

            /* S_i = Q K_i^T, then P_{i-1} V_{i-1} */
            moe_wg_fence_regs_n(s);
            moe_wg_fence();
            att_wg_qk<HD, BN>(s, q_s, ks, wg);
            moe_wg_commit();
            if constexpr (!FIRST) {
                att_wgp_pv<NA, BN>(o, pp, vprev);
                moe_wg_commit();
                moe_wg_wait<1>();           /* S_i done */
            } else {
                moe_wg_wait<0>();
            }
            moe_wg_fence_regs_n(s);

            /* mask unless each of the warp's 16 rows is in the run and sees
             * the whole tile */
            if (kb < mf_s[warp][0] || kb > mf_s[warp][1]) {
#pragma unroll
                for (int v = 0; v < 2; v++) {
                    const int  r = wr0 + 8 * v + gq;
                    const bool act = r >= rs && r < re;
                    const int  p = pos_s[r], lo = lo_s[r];

#pragma unroll
                    for (int j = 0; j < NJ; j++) {
#pragma unroll
                        for (int c = 0; c < 2; c++) {
                            int key = kb + j * 8 + 2 * tq + c;

                            if (!(act && key >= lo && key <= p)) {
                                s[4 * j + 2 * v + c] = -INFINITY;
                            }
                        }
                    }
                }
            }

            /* online softmax per row; P_i to bf16 pairs: pc[j][v] = row
             * v's keys 8 j + 2 tq, + 1 (copied to pp once P_{i-1} V_{i-1}
             * is done reading it) */
            uint32_t pc[NJ][2];
            float    corr[2];

#pragma unroll
            for (int v = 0; v < 2; v++) {
                float mx = -INFINITY, sum = 0.0f, mn, mu;

#pragma unroll
                for (int j = 0; j < NJ; j++) {
                    mx = fmaxf(mx, fmaxf(s[4 * j + 2 * v],
                                         s[4 * j + 2 * v + 1]));
                }
                mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
                mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
                mn = fmaxf(m[v], mx);
                mu = mn == -INFINITY ? 0.0f : mn;
                corr[v] = att_wgp_ex2(m[v] - mu);
                m[v] = mn;
#pragma unroll
                for (int j = 0; j < NJ; j++) {
                    float x = att_wgp_ex2(s[4 * j + 2 * v] - mu);
                    float y = att_wgp_ex2(s[4 * j + 2 * v + 1] - mu);

                    sum += x + y;
                    pc[j][v] = att_pack(x, y);
                }
                l[v] = l[v] * corr[v] + sum;
            }

            /* P_{i-1} V_{i-1} done: O rescaled to tile i's maxima */
            if constexpr (!FIRST) {
                moe_wg_wait<0>();
            }
#pragma unroll
            for (int hh = 0; hh < NA; hh++) {
                moe_wg_fence_regs_n(o[hh]);
#pragma unroll
                for (int j = 0; j < 8; j++) {
#pragma unroll
                    for (int v = 0; v < 2; v++) {
                        o[hh][4 * j + 2 * v] *= corr[v];
                        o[hh][4 * j + 2 * v + 1] *= corr[v];
                    }
                }
            }
#pragma unroll
            for (int j = 0; j < NJ; j++) {
                pp[j][0] = pc[j][0];
                pp[j][1] = pc[j][1];
            }
            vprev = vs;
        };

        step(0, std::true_type());
        for (int i = 1; i < ntl; i++) {
            step(i, std::false_type());
        }

        /* the last tile's P V (its stage is not reloaded in this run) */
#pragma unroll
        for (int hh = 0; hh < NA; hh++) {
            moe_wg_fence_regs_n(o[hh]);
        }
        moe_wg_fence();
        att_wgp_pv<NA, BN>(o, pp, vprev);
        moe_wg_commit();
        moe_wg_wait<0>();
#pragma unroll
        for (int hh = 0; hh < NA; hh++) {
            moe_wg_fence_regs_n(o[hh]);
        }
        moe_cp_async_wait<0>();
        __syncthreads();                    /* stages and run_s, mf_s
                                             * free for the next run */

        /* normalise and write the run's rows */
#pragma unroll
        for (int v = 0; v < 2; v++) {
            const int r = wr0 + 8 * v + gq;
            float     sum = l[v];

            sum += __shfl_xor_sync(0xffffffffu, sum, 1);
            sum += __shfl_xor_sync(0xffffffffu, sum, 2);
            if (r >= rs && r < re) {
                float inv = 1.0f / sum;
                bf16 *orow = out + ((size_t) (r0 + r) * n_heads + h) * HD
                             + 2 * tq;

#pragma unroll
                for (int hh = 0; hh < NA; hh++) {
#pragma unroll
                    for (int j = 0; j < 8; j++) {
                        *reinterpret_cast<uint32_t *>(orow + hh * 64 + j * 8)
                            = att_pack(o[hh][4 * j + 2 * v] * inv,
                                       o[hh][4 * j + 2 * v + 1] * inv);
                    }
                }
            }
        }
        rs = re;
    }
}


/* Launch kernel_dev_prefill_wgp<HD, BN, STAGES> (raising its
 * shared-memory limit once). */
template <int HD, int BN, int STAGES>
static int
att_wgp_launch_v(int T, const float *qkv, int ld, const int32_t *tok_pos,
    const int32_t *tok_seq, const int32_t *bt, const int32_t *bt_off,
    const bf16 *kv, int block_size, int n_heads, int n_kv, int window,
    bf16 *out, cudaStream_t stream)
{
    static int   ready = 0;
    const size_t sm = att_wg_smem(HD, BN, STAGES);
    dim3         grid((unsigned) n_heads,
                      (unsigned) ((T + ATT_TC_BM - 1) / ATT_TC_BM));

    if (!ready) {
        MOE_CUDA_CHECK(moe_smem_max_carveout(
            kernel_dev_prefill_wgp<HD, BN, STAGES>, sm));
        ready = 1;
    }
    MOE_CUDA_CHECK(moe_launch(
        kernel_dev_prefill_wgp<HD, BN, STAGES>, grid, ATT_WG_NT, sm,
        stream, qkv, ld, T, tok_pos, tok_seq, bt, bt_off, kv, block_size,
        n_heads, n_kv, window, out));
    return MOE_K_OK;
}

/* CTAs per SM of kernel_dev_prefill_wgp<HD, BN, STAGES>. */
template <int HD, int BN, int STAGES>
static int
att_wgp_occupancy(void)
{
    int n = 0;

    if (moe_smem_max_carveout(kernel_dev_prefill_wgp<HD, BN, STAGES>,
                              att_wg_smem(HD, BN, STAGES)) != cudaSuccess
        || cudaOccupancyMaxActiveBlocksPerMultiprocessor(&n,
            kernel_dev_prefill_wgp<HD, BN, STAGES>, ATT_WG_NT,
            att_wg_smem(HD, BN, STAGES)) != cudaSuccess) {
        return -1;
    }
    return n;
}

#endif /* MOE_BENCH_DEV_ATT_PREFILL_WGP_CUH */
