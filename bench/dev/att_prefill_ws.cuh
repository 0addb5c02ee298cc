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


/* The run [rs, re) of equal tok_seq starting at rs of the tile's rows,
 * and its key range; the same in every thread (shared row data). */
__device__ __forceinline__ int
att_ws_run(const int *seq_s, const int *pos_s, const int *lo_s, int nrows,
    int rs, int *kmin, int *kmax)
{
    const int cs = seq_s[rs];
    int       re = rs + 1, a = lo_s[rs], b = pos_s[rs];

    while (re < nrows && seq_s[re] == cs) {
        a = min(a, lo_s[re]);
        b = max(b, pos_s[re]);
        re++;
    }
    *kmin = a;
    *kmax = b;
    return re;
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
    constexpr int CPR = HD / 8;             /* 16-byte chunks per row */
    constexpr int NA = HD / 64;             /* 64-column blocks */
    constexpr int NJ = BN / 8;              /* 8-key column tiles of S */
    constexpr int RPT = BN * CPR / 128;     /* K (and V) chunks a loader
                                             * thread copies per tile */
    constexpr int TB = BN * HD * 2;         /* bytes of a K (or V) tile */
    static_assert(RPT * 128 == BN * CPR, "tile load split");
    static_assert(HD == 64 || HD == 128, "head dim");
    static_assert(BN == 64 || BN == 128, "key tile");
    static_assert(STAGES >= 2, "stages");

    extern __shared__ unsigned char att_wg_raw[];
    unsigned char *q_s = att_wg_raw
        + ((ATT_WG_ALIGN - ((uint32_t) __cvta_generic_to_shared(att_wg_raw)
                            & (ATT_WG_ALIGN - 1))) & (ATT_WG_ALIGN - 1));
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
            int re = att_ws_run(seq_s, pos_s, lo_s, nrows, rs, &kmin, &kmax);
            const int      ntl = (kmax - kmin) / BN + 1;
            const int32_t *table = bt + bt_off[seq_s[rs]];

            for (int i = 0; i < ntl; i++, g++) {
                const int st = g % STAGES, use = g / STAGES;
                const int kb = kmin + i * BN;
                unsigned char *kd = kv_s + st * 2 * TB;

                if (use > 0) {
                    moe_mbar_wait(&empty[st], (use - 1) & 1);
                }
#pragma unroll 4
                for (int c = 0; c < RPT; c++) {
                    int  e = tid + c * 128;
                    int  row = e / CPR, ch = e % CPR;
                    int  j = kb + row;
                    bool ok = j <= kmax;
                    const bf16 *ksrc = kvg, *vsrc = kvg;
                    uint32_t    off = att_wg_off(BN, row, ch * 8);

                    if (ok) {
                        ksrc = kvg + ((size_t) table[j / block_size] * 2
                                          * block_size
                                      + j % block_size) * kvd + ch * 8;
                        vsrc = ksrc + (size_t) block_size * kvd;
                    }
                    moe_cp_async16(reinterpret_cast<bf16 *>(kd + off), ksrc,
                                   ok ? 16 : 0);
                    moe_cp_async16(reinterpret_cast<bf16 *>(kd + TB + off),
                                   vsrc, ok ? 16 : 0);
                }
                att_ws_cp_arrive(&full[st]);
            }
            rs = re;
        }
        moe_cp_async_wait<0>();
        return;
    }

    /* ---------------- compute: 64 query rows a warpgroup ------------- */
    asm volatile("setmaxnreg.inc.sync.aligned.u32 232;\n" ::: "memory");
    const int cw = wg - 1, ct = tid - 128;  /* compute warpgroup, thread */
    const int gq = lane >> 2, tq = lane & 3;
    const int wr0 = cw * 64 + (warp & 3) * 16;  /* this warp's first row */

    /* Q rows, scaled by log2(e) / sqrt(hd), to bf16 (swizzled), once */
    {
        const float qs = 1.4426950408889634f * rsqrtf((float) HD);

        for (int i = ct; i < BM * (HD / 4); i += 256) {
            int    rw = i / (HD / 4), d = (i % (HD / 4)) * 4;
            float4 v = make_float4(0.0f, 0.0f, 0.0f, 0.0f);

            if (rw < nrows) {
                v = *reinterpret_cast<const float4 *>(
                        qkv + (size_t) (r0 + rw) * ld + (size_t) h * HD + d);
            }
            *reinterpret_cast<uint2 *>(q_s + att_wg_off(BM, rw, d)) =
                make_uint2(att_pack(v.x * qs, v.y * qs),
                           att_pack(v.z * qs, v.w * qs));
        }
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
        int re = att_ws_run(seq_s, pos_s, lo_s, nrows, rs, &kmin, &kmax);
        const int ntl = (kmax - kmin) / BN + 1;
        int       mfa, mfb;                 /* tile starts this warp sees
                                             * unmasked: [mfa, mfb] */
        {
            const int mlo = max(rs, wr0), mhi = min(re, wr0 + 16);
            int       lomax = -1, posmin = INT_MAX;

            for (int r = mlo; r < mhi; r++) {
                lomax = max(lomax, lo_s[r]);
                posmin = min(posmin, pos_s[r]);
            }
            mfa = mlo == wr0 && mhi == wr0 + 16 ? lomax : INT_MAX;
            mfb = posmin - (BN - 1);
        }

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

            /* S_i = Q K_i^T, then P_{i-1} V_{i-1} */
            moe_wg_fence_regs_n(s);
            moe_wg_fence();
            att_wg_qk<HD, BN>(s, q_s, ks, cw);
            moe_wg_commit();
            if constexpr (!FIRST) {
                att_wgp_pv<NA, BN>(o, pp, kv_s + pst * 2 * TB + TB);
                moe_wg_commit();
                moe_wg_wait<1>();           /* S_i done */
            } else {
                moe_wg_wait<0>();
            }
            moe_wg_fence_regs_n(s);

            if (kb < mfa || kb > mfb) {
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

            if constexpr (!FIRST) {
                moe_wg_wait<0>();           /* P_{i-1} V_{i-1} done */
                moe_mbar_arrive(&empty[pst]);
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
        att_wgp_pv<NA, BN>(o, pp, kv_s + pst * 2 * TB + TB);
        moe_wg_commit();
        moe_wg_wait<0>();
#pragma unroll
        for (int hh = 0; hh < NA; hh++) {
            moe_wg_fence_regs_n(o[hh]);
        }
        moe_mbar_arrive(&empty[pst]);

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


template <int HD, int BN, int STAGES>
static int
att_ws_launch_v(int T, const float *qkv, int ld, const int32_t *tok_pos,
    const int32_t *tok_seq, const int32_t *bt, const int32_t *bt_off,
    const bf16 *kv, int block_size, int n_heads, int n_kv, int window,
    bf16 *out, cudaStream_t stream)
{
    static int   ready = 0;
    const size_t sm = att_ws_smem(HD, BN, STAGES);
    dim3         grid((unsigned) n_heads,
                      (unsigned) ((T + ATT_TC_BM - 1) / ATT_TC_BM));

    if (!ready) {
        MOE_CUDA_CHECK(moe_smem_max_carveout(
            kernel_dev_prefill_ws<HD, BN, STAGES>, sm));
        ready = 1;
    }
    MOE_CUDA_CHECK(moe_launch(
        kernel_dev_prefill_ws<HD, BN, STAGES>, grid, ATT_WS_NT, sm, stream,
        qkv, ld, T, tok_pos, tok_seq, bt, bt_off, kv, block_size, n_heads,
        n_kv, window, out));
    return MOE_K_OK;
}


template <int HD, int BN, int STAGES>
static int
att_ws_occupancy(void)
{
    int n = 0;

    if (moe_smem_max_carveout(kernel_dev_prefill_ws<HD, BN, STAGES>,
                              att_ws_smem(HD, BN, STAGES)) != cudaSuccess
        || cudaOccupancyMaxActiveBlocksPerMultiprocessor(&n,
            kernel_dev_prefill_ws<HD, BN, STAGES>, ATT_WS_NT,
            att_ws_smem(HD, BN, STAGES)) != cudaSuccess) {
        return -1;
    }
    return n;
}

#endif /* MOE_BENCH_DEV_ATT_PREFILL_WS_CUH */
