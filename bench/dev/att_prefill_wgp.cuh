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
    constexpr int NA = HD / 64;             /* 64-column blocks */
    constexpr int NJ = BN / 8;              /* 8-key column tiles of S */
    constexpr int TB = BN * HD * 2;         /* bytes of a K (or V) tile */
    static_assert(HD == 64 || HD == 128, "head dim");
    static_assert(BN == 64 || BN == 128, "key tile");
    static_assert(STAGES >= 3, "stages: tiles i, i - 1 and the load");

    extern __shared__ unsigned char att_wg_raw[];
    unsigned char *q_s = att_wg_aligned(att_wg_raw);
    unsigned char *kv_s = q_s + BM * HD * 2;    /* [stage][K, V] */
    __shared__ int seq_s[BM], pos_s[BM], lo_s[BM];
    __shared__ int run_s[3];                /* kmin, kmax, bt_off[seq] */

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

    float s[BN / 2], o[NA][32];

#pragma unroll
    for (int i = 0; i < BN / 2; i++) {
        s[i] = 0.0f;
    }

    int rs = 0;

    while (rs < nrows) {                    /* one run of a sequence */
        int       kmin, kmax, mfa, mfb;
        const int re = att_wg_run(seq_s, pos_s, lo_s, nrows, rs, &kmin,
                                  &kmax);
        const int cs = seq_s[rs];
        const int ntl = (kmax - kmin) / BN + 1;

        att_wg_warp_unmasked<BN>(pos_s, lo_s, rs, re, wr0, &mfa, &mfb);
        if (tid == 0) {
            run_s[0] = kmin;
            run_s[1] = kmax;
            run_s[2] = bt_off[cs];
        }                                   /* published by the first
                                             * tile's barrier */

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

#pragma unroll
        for (int st = 0; st < STAGES - 2; st++) {
            if (st < ntl) {
                att_wg_load_kv<HD, BN, NT>(kv_s + st * 2 * TB, kvg,
                                           bt + bt_off[cs], kmin + st * BN,
                                           kmax, block_size, kvd, tid);
            }
            moe_cp_async_commit();
        }
        if (rs == 0) {
            att_wg_load_q<HD, NT>(q_s, qkv, ld, r0, nrows, h, tid);
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
                att_wg_load_kv<HD, BN, NT>(kv_s + stl * 2 * TB, kvg,
                                           bt + run_s[2],
                                           kmin_ + (i + STAGES - 2) * BN,
                                           run_s[1], block_size, kvd, tid);
            }
            moe_cp_async_commit();
            stl = stl + 1 == STAGES ? 0 : stl + 1;

            const int kb = kmin_ + i * BN;
            const unsigned char *ks = kv_s + stc * 2 * TB, *vs = ks + TB;

            stc = stc + 1 == STAGES ? 0 : stc + 1;

            /* S_i = Q K_i^T, then P_{i-1} V_{i-1} (the accumulators'
             * last writes, the rescale, pinned before the fence) */
            moe_wg_fence_regs_n(s);
#pragma unroll
            for (int hh = 0; hh < NA; hh++) {
                moe_wg_fence_regs_n(o[hh]);
            }
            moe_wg_fence();
            att_wg_qk<HD, BN>(s, q_s, ks, wg);
            moe_wg_commit();
            if constexpr (!FIRST) {
                att_wg_pv<NA, BN>(o, pp, vprev);
                moe_wg_commit();
                moe_wg_wait<1>();           /* S_i done */
            } else {
                moe_wg_wait<0>();
            }
            moe_wg_fence_regs_n(s);
            if (kb < mfa || kb > mfb) {
                att_wg_mask<NJ>(s, kb, wr0, gq, tq, rs, re, pos_s, lo_s);
            }

            uint32_t pc[NJ][2];             /* P_i; to pp once P_{i-1}
                                             * V_{i-1} is done with it */
            float    corr[2];

            att_wg_softmax<NJ, true>(s, m, l, corr, pc);
            if constexpr (!FIRST) {
                moe_wg_wait<0>();           /* P_{i-1} V_{i-1} done */
                /* P_{i-1}'s registers live until here: P_i may not be
                 * written into them before the wait */
                moe_wg_fence_frag_n(pp);
            }
#pragma unroll
            for (int hh = 0; hh < NA; hh++) {
                moe_wg_fence_regs_n(o[hh]);
            }
            att_wg_rescale<NA>(o, corr);
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
        att_wg_pv<NA, BN>(o, pp, vprev);
        moe_wg_commit();
        moe_wg_wait<0>();
#pragma unroll
        for (int hh = 0; hh < NA; hh++) {
            moe_wg_fence_regs_n(o[hh]);
        }
        moe_cp_async_wait<0>();
        __syncthreads();                    /* stages and run_s free for
                                             * the next run */

        att_wg_store<NA, HD>(o, l, out, r0, h, n_heads, wr0, gq, tq, rs, re);
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
    static int ready = 0;

    return att_wg_launch_k(kernel_dev_prefill_wgp<HD, BN, STAGES>, ATT_WG_NT,
                           att_wg_smem(HD, BN, STAGES), &ready, T, n_heads,
                           stream, qkv, ld, T, tok_pos, tok_seq, bt, bt_off,
                           kv, block_size, n_heads, n_kv, window, out);
}

/* CTAs per SM of kernel_dev_prefill_wgp<HD, BN, STAGES>. */
template <int HD, int BN, int STAGES>
static int
att_wgp_occupancy(void)
{
    return att_wg_occ_k(kernel_dev_prefill_wgp<HD, BN, STAGES>, ATT_WG_NT,
                        att_wg_smem(HD, BN, STAGES));
}

#endif /* MOE_BENCH_DEV_ATT_PREFILL_WGP_CUH */
