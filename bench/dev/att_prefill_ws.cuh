/*
 * Dev harness only (bench/dev/attention.cu, lines "ws ..." when
 * DEV_ATT_WS=1 is set): the warpgroup prefill kernel with warp
 * specialisation.  A CTA is three warpgroups: the first only loads (K and
 * V tiles by cp.async, each stage's completion counted on a "full"
 * mbarrier with cp.async.mbarrier.arrive.noinc; it gives its registers to
 * the others with setmaxnreg), the other two compute 64 query rows each
 * as in att_prefill_wgp.cuh (S_i issued before P_{i-1} V_{i-1}, the
 * softmax of tile i while the tensor cores run P_{i-1} V_{i-1}) and free
 * a stage on its "empty" mbarrier once P V has read it.  No CTA-wide
 * barrier after the start: the two compute warpgroups drift apart, so one
 * can run its softmax while the other's products run.
 *
 * Written in the eighteenth session and compiled, but no GPU was lent
 * after it was written: not yet run.  Opt-in (DEV_ATT_WS=1) so that a
 * hang cannot cost the harness's other lines.
 */
#ifndef MOE_BENCH_DEV_ATT_PREFILL_WS_CUH
#define MOE_BENCH_DEV_ATT_PREFILL_WS_CUH

#include <type_traits>

#define ATT_WS_NT      384          /* threads: loader + 2 compute WGs */


/* Shared memory of kernel_dev_prefill_ws<HD, BN, STAGES>: alignment
 * slack, Q, STAGES x (K, V). */
static constexpr size_t
att_ws_smem(int hd, int bn, int stages)
{
    return att_wg_smem(hd, bn, stages);
}


__device__ __forceinline__ void
att_ws_cp_arrive(uint64_t *b)
{
    asm volatile("cp.async.mbarrier.arrive.noinc.shared::cta.b64 [%0];\n"
                 :: "r"((uint32_t) __cvta_generic_to_shared(b)) : "memory");
}


template <int HD, int BN, int STAGES>
__global__ void __launch_bounds__(ATT_WS_NT, 1)
kernel_dev_prefill_ws(const float *qkv, int ld, int T,
    const int32_t *tok_pos, const int32_t *tok_seq, const int32_t *bt,
    const int32_t *bt_off, const bf16 *kv_layer, int block_size, int n_heads,
    int n_kv, int window, bf16 *out)
{
    moe_pdl_enter();
    constexpr int BM = ATT_TC_BM;
    constexpr int NA = HD / 64;             /* 64-column blocks */
    constexpr int NJ = BN / 8;              /* 8-key column tiles of S */
    constexpr int TB = BN * HD * 2;         /* bytes of a K (or V) tile */
    static_assert(HD == 64 || HD == 128, "head dim");
    static_assert(BN == 64 || BN == 128, "key tile");
    static_assert(STAGES >= 2, "stages");

    extern __shared__ unsigned char att_wg_raw[];
    unsigned char *q_s = att_wg_aligned(att_wg_raw);
    unsigned char *kv_s = q_s + BM * HD * 2;    /* [stage][K, V] */
    __shared__ int seq_s[BM], pos_s[BM], lo_s[BM];
    __shared__ __align__(8) uint64_t full[STAGES], empty[STAGES];

    const int h = blockIdx.x;
    const int tile = (int) gridDim.y - 1 - (int) blockIdx.y;
    const int r0 = tile * BM, nrows = min(BM, T - r0);
    const int grp = n_heads / n_kv, kvd = n_kv * HD;
    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    const int wg = warp >> 2;               /* 0 loads, 1-2 compute */

    if (tid == 0) {
        for (int st = 0; st < STAGES; st++) {
            moe_mbar_init(&full[st], 128);  /* the loader's threads */
            moe_mbar_init(&empty[st], 256); /* the compute threads */
        }
        moe_mbar_init_fence();
    }
    /* its barrier also publishes the mbarriers */
    if (att_tc_tile_rows(tok_seq, tok_pos, T, tile, window, seq_s, pos_s,
                         lo_s) > ATT_TC_RUNS)
    {
        return;                             /* the SIMT kernel does it */
    }

    if (wg == 0) {
        /* ---------------- loader: K and V tiles, stage by stage ------ */
        asm volatile("setmaxnreg.dec.sync.aligned.u32 40;\n" ::: "memory");
        const bf16 *kvg = kv_layer + (size_t) (h / grp) * HD;
        int         g = 0;                  /* tiles issued, all runs */

        for (int rs = 0; rs < nrows;) {
            int kmin, kmax;
            int re = att_wg_run(seq_s, pos_s, lo_s, nrows, rs, &kmin, &kmax);
            const int      ntl = (kmax - kmin) / BN + 1;
            const int32_t *table = bt + bt_off[seq_s[rs]];

            for (int i = 0; i < ntl; i++, g++) {
                const int st = g % STAGES, use = g / STAGES;
                const int kb = kmin + i * BN;
                unsigned char *kd = kv_s + st * 2 * TB;

                if (use > 0) {
                    moe_mbar_wait(&empty[st], (use - 1) & 1);
                }
                att_wg_load_kv<HD, BN, 128, 2>(kd, kvg, table, kb, kmax,
                                               block_size, kvd, tid);
                att_ws_cp_arrive(&full[st]);
            }
            rs = re;
        }
        /* the copies were never committed as groups (the full barriers
         * track them): wait for all before the loader's threads end */
        asm volatile("cp.async.wait_all;\n" ::: "memory");
        return;
    }

    /* ---------------- compute: 64 query rows a warpgroup ------------- */
    asm volatile("setmaxnreg.inc.sync.aligned.u32 232;\n" ::: "memory");
    const int cw = wg - 1, ct = tid - 128;  /* compute warpgroup, thread */
    const int gq = lane >> 2, tq = lane & 3;
    const int wr0 = cw * 64 + (warp & 3) * 16;  /* this warp's first row */

    /* Q, once; then a barrier of the compute threads */
    {
        att_wg_load_q<HD, 256>(q_s, qkv, ld, r0, nrows, h, ct);
        moe_wg_fence_proxy_async();
        asm volatile("bar.sync 1, 256;\n" ::: "memory");
    }

    float    s[BN / 2], o[NA][32];
    uint32_t pp[NJ][2];                     /* P_{i-1} */
    int      g = 0;                         /* tiles consumed, all runs */

#pragma unroll
    for (int i = 0; i < BN / 2; i++) {
        s[i] = 0.0f;
    }

    for (int rs = 0; rs < nrows;) {
        int kmin, kmax;
        int re = att_wg_run(seq_s, pos_s, lo_s, nrows, rs, &kmin, &kmax);
        const int ntl = (kmax - kmin) / BN + 1;
        int       mfa, mfb;                 /* tile starts this warp sees
                                             * unmasked: [mfa, mfb] */

        att_wg_warp_unmasked<BN>(pos_s, lo_s, rs, re, wr0, &mfa, &mfb);

        float m[2], l[2];
        int   pst = 0;                      /* stage of tile i - 1 */

#pragma unroll
        for (int hh = 0; hh < NA; hh++) {
#pragma unroll
            for (int e = 0; e < 32; e++) {
                o[hh][e] = 0.0f;
            }
        }
        m[0] = m[1] = -INFINITY;
        l[0] = l[1] = 0.0f;

        auto step = [&](int i, auto first) {
            constexpr bool FIRST = decltype(first)::value;
            const int      st = g % STAGES;
            const int      kb = kmin + i * BN;
            const unsigned char *ks = kv_s + st * 2 * TB;

            moe_mbar_wait(&full[st], (g / STAGES) & 1);
            moe_wg_fence_proxy_async();     /* the loader's copies, to
                                             * this thread's async proxy */

            /* S_i = Q K_i^T, then P_{i-1} V_{i-1} (the accumulators'
             * last writes, the rescale, pinned before the fence) */
            moe_wg_fence_regs_n(s);
#pragma unroll
            for (int hh = 0; hh < NA; hh++) {
                moe_wg_fence_regs_n(o[hh]);
            }
            moe_wg_fence();
            att_wg_qk<HD, BN>(s, q_s, ks, cw);
            moe_wg_commit();
            if constexpr (!FIRST) {
                att_wg_pv<NA, BN>(o, pp, kv_s + pst * 2 * TB + TB);
                moe_wg_commit();
                moe_wg_wait<1>();           /* S_i done */
            } else {
                moe_wg_wait<0>();
            }
            moe_wg_fence_regs_n(s);

            if (kb < mfa || kb > mfb) {
                att_wg_mask<NJ>(s, kb, wr0, gq, tq, rs, re, pos_s, lo_s);
            }

            uint32_t pc[NJ][2];
            float    corr[2];

            att_wg_softmax<NJ, true>(s, m, l, corr, pc);
            if constexpr (!FIRST) {
                moe_wg_wait<0>();           /* P_{i-1} V_{i-1} done */
                /* P_{i-1}'s registers live until here: P_i may not be
                 * written into them before the wait */
                moe_wg_fence_frag_n(pp);
                moe_mbar_arrive(&empty[pst]);
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
            pst = st;
            g++;
        };

        step(0, std::true_type());
        for (int i = 1; i < ntl; i++) {
            step(i, std::false_type());
        }

        /* the last tile's P V, then its stage is free */
#pragma unroll
        for (int hh = 0; hh < NA; hh++) {
            moe_wg_fence_regs_n(o[hh]);
        }
        moe_wg_fence();
        att_wg_pv<NA, BN>(o, pp, kv_s + pst * 2 * TB + TB);
        moe_wg_commit();
        moe_wg_wait<0>();
#pragma unroll
        for (int hh = 0; hh < NA; hh++) {
            moe_wg_fence_regs_n(o[hh]);
        }
        moe_mbar_arrive(&empty[pst]);

        att_wg_store<NA, HD>(o, l, out, r0, h, n_heads, wr0, gq, tq, rs, re);
        rs = re;
    }
}


/* Launch kernel_dev_prefill_ws<HD, BN, STAGES>. */
template <int HD, int BN, int STAGES>
static int
att_ws_launch_v(int T, const float *qkv, int ld, const int32_t *tok_pos,
    const int32_t *tok_seq, const int32_t *bt, const int32_t *bt_off,
    const bf16 *kv, int block_size, int n_heads, int n_kv, int window,
    bf16 *out, cudaStream_t stream)
{
    static int ready = 0;

    return att_wg_launch_k(kernel_dev_prefill_ws<HD, BN, STAGES>, ATT_WS_NT,
                           att_ws_smem(HD, BN, STAGES), &ready, T, n_heads,
                           stream, qkv, ld, T, tok_pos, tok_seq, bt, bt_off,
                           kv, block_size, n_heads, n_kv, window, out);
}


/* CTAs per SM of kernel_dev_prefill_ws<HD, BN, STAGES>. */
template <int HD, int BN, int STAGES>
static int
att_ws_occupancy(void)
{
    return att_wg_occ_k(kernel_dev_prefill_ws<HD, BN, STAGES>, ATT_WS_NT,
                        att_ws_smem(HD, BN, STAGES));
}

#endif /* MOE_BENCH_DEV_ATT_PREFILL_WS_CUH */
