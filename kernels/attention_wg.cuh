/*
 * kernel_attention_prefill_wg: the prefill attention on warpgroup tensor
 * cores (wgmma), for head dims 64 and 128 with a bf16 cache.  Included by
 * attention.cu after kernel_attention_prefill_tc, whose row tiles, runs
 * and SIMT fallback it shares: the same grid (q head, 128-row tile, the
 * last tile first), the same runs of equal tok_seq (more than ATT_TC_RUNS
 * in a tile: the tile is left to the SIMT kernel), the same masks, the
 * same online softmax in base 2.
 *
 * What differs: a CTA is two warpgroups (256 threads), each owning 64
 * query rows.  Q (scaled by log2(e) / sqrt(hd), bf16) and each key tile's
 * K and V rows sit in shared memory as 128-byte rows of 64 elements with
 * the 128-byte swizzle (16-byte chunk c of row r at chunk c ^ (r & 7)),
 * one such block per 64 columns of the head.  Per key tile of BN keys a
 * warpgroup computes S = Q K^T with hd / 16 wgmma m64nBNk16 (both
 * operands from shared memory, K-major), the softmax on S's fragment in
 * registers, and O += P V with P from registers (bf16, the mma A layout)
 * and V as an MN-major operand (its rows are keys, d contiguous: exactly
 * the cache's layout, no transposition), hd / 64 wgmma m64n64k16 per 16
 * keys.  K and V tiles arrive by cp.async (all 256 threads, STAGES
 * stages), made visible to the tensor cores' async proxy by a proxy fence
 * before the tile's barrier.
 */
#include "wgmma.cuh"

#define ATT_WG_NT      256          /* threads per CTA: 2 warpgroups */
#define ATT_WG_ALIGN   1024         /* swizzled tiles: 1024-byte aligned */

static_assert(ATT_WG_NT / 128 * 64 == ATT_TC_BM, "wg row split");


/* Dynamic shared memory of kernel_attention_prefill_wg<HD, BN, STAGES>:
 * alignment slack, Q, then STAGES x (K, V). */
static constexpr size_t
att_wg_smem(int hd, int bn, int stages)
{
    return (size_t) ATT_WG_ALIGN
           + (size_t) (ATT_TC_BM + 2 * stages * bn) * hd * sizeof(bf16);
}


/* The byte offset of element d of row r in a swizzled tile of `rows` rows
 * (blocks of 64 columns, each rows x 128 bytes); d a multiple of 4. */
__device__ __forceinline__ uint32_t
att_wg_off(int rows, int r, int d)
{
    const int blk = d >> 6, b = (d & 63) * 2;

    return (uint32_t) (blk * rows * 128 + r * 128
                       + ((((b >> 4) ^ (r & 7)) << 4) | (b & 15)));
}


/* S (64 x BN, d[BN / 2]) = Q (this warpgroup's 64 rows) K^T over HD. */
template <int HD, int BN>
__device__ __forceinline__ void
att_wg_qk(float (&s)[BN / 2], const unsigned char *q_s,
    const unsigned char *k_s, int wg)
{
#pragma unroll
    for (int kk = 0; kk < HD / 16; kk++) {
        const uint64_t da = moe_wg_desc(q_s + (kk >> 2) * ATT_TC_BM * 128
                                        + wg * 64 * 128 + (kk & 3) * 32);
        const uint64_t db = moe_wg_desc(k_s + (kk >> 2) * BN * 128
                                        + (kk & 3) * 32);

        if constexpr (BN == 128) {
            moe_wg_mma_bf16_ss_n128(s, da, db, kk > 0);
        } else {
            moe_wg_mma_bf16_ss_n64(s, da, db, kk > 0);
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
kernel_attention_prefill_wg(const float *qkv, int ld, int T,
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
    static_assert(STAGES >= 2, "stages");

    extern __shared__ unsigned char att_wg_raw[];
    unsigned char *q_s = att_wg_raw
        + ((ATT_WG_ALIGN - ((uint32_t) __cvta_generic_to_shared(att_wg_raw)
                            & (ATT_WG_ALIGN - 1))) & (ATT_WG_ALIGN - 1));
    unsigned char *kv_s = q_s + BM * HD * 2;    /* [stage][K, V] */
    __shared__ int seq_s[BM], pos_s[BM], lo_s[BM];
    __shared__ int run_s[3];                /* kmin, kmax, bt_off[seq] */
    __shared__ int wk_s[2][2];              /* keys a warpgroup needs */
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

        /* the keys this warpgroup's rows of the run need, and per warp
         * the tile starts kb that need no mask (all 16 rows in the run,
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
            if ((tid & 127) == 0) {
                const int glo = max(rs, wg * 64), ghi = min(re, wg * 64 + 64);
                int       wkmin = INT_MAX, wkmax = -1;

                for (int r = glo; r < ghi; r++) {
                    wkmin = min(wkmin, lo_s[r]);
                    wkmax = max(wkmax, pos_s[r]);
                }
                wk_s[wg][0] = wkmin == INT_MAX ? INT_MAX : wkmin - (BN - 1);
                wk_s[wg][1] = wkmax;
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
            for (int st = 0; st < STAGES - 1; st++) {
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

        int stc = 0, stl = STAGES - 1;      /* stages: compute, next load */

        for (int i = 0; i < ntl; i++) {
            moe_cp_async_wait<STAGES - 2>();
            moe_wg_fence_proxy_async();     /* this thread's copies and Q
                                             * stores, to the async proxy */
            __syncthreads();                /* tile i in; stage stl free */

            const int kmin_ = run_s[0];

            if (i + STAGES - 1 < ntl) {
                load(i + STAGES - 1, stl, kmin_, run_s[1], bt + run_s[2]);
            }
            moe_cp_async_commit();
            stl = stl + 1 == STAGES ? 0 : stl + 1;

            const int kb = kmin_ + i * BN;
            const unsigned char *ks = kv_s + stc * 2 * TB, *vs = ks + TB;

            stc = stc + 1 == STAGES ? 0 : stc + 1;
            if (kb < wk_s[wg][0] || kb > wk_s[wg][1]) {
                continue;                   /* none of the warpgroup's rows
                                             * (uniform in the warpgroup) */
            }

            /* S = Q K^T */
            moe_wg_fence_regs_n(s);
            moe_wg_fence();
            att_wg_qk<HD, BN>(s, q_s, ks, wg);
            moe_wg_commit();
            moe_wg_wait<0>();
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

            /* online softmax per row; P to bf16 pairs: pr[j][v] = row v's
             * keys 8 j + 2 tq, + 1 */
            uint32_t pr[NJ][2];

#pragma unroll
            for (int v = 0; v < 2; v++) {
                float mx = -INFINITY, sum = 0.0f, mn, mu, corr;

#pragma unroll
                for (int j = 0; j < NJ; j++) {
                    mx = fmaxf(mx, fmaxf(s[4 * j + 2 * v],
                                         s[4 * j + 2 * v + 1]));
                }
                mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
                mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
                mn = fmaxf(m[v], mx);
                mu = mn == -INFINITY ? 0.0f : mn;
                corr = exp2f(m[v] - mu);
                m[v] = mn;
#pragma unroll
                for (int j = 0; j < NJ; j++) {
                    float x = exp2f(s[4 * j + 2 * v] - mu);
                    float y = exp2f(s[4 * j + 2 * v + 1] - mu);

                    sum += x + y;
                    pr[j][v] = att_pack(x, y);
                }
                l[v] = l[v] * corr + sum;
#pragma unroll
                for (int hh = 0; hh < NA; hh++) {
#pragma unroll
                    for (int j = 0; j < 8; j++) {
                        o[hh][4 * j + 2 * v] *= corr;
                        o[hh][4 * j + 2 * v + 1] *= corr;
                    }
                }
            }

            /* O += P V: per 16 keys, one m64n64k16 per 64 columns */
#pragma unroll
            for (int hh = 0; hh < NA; hh++) {
                moe_wg_fence_regs_n(o[hh]);
            }
            moe_wg_fence();
#pragma unroll
            for (int kk = 0; kk < BN / 16; kk++) {
                const uint32_t a[4] = { pr[2 * kk][0], pr[2 * kk][1],
                                        pr[2 * kk + 1][0], pr[2 * kk + 1][1] };

#pragma unroll
                for (int hh = 0; hh < NA; hh++) {
                    moe_wg_mma_bf16_rs_n64_tb(
                        o[hh], a,
                        moe_wg_desc_mn(vs + hh * BN * 128 + kk * 16 * 128));
                }
            }
            moe_wg_commit();
            moe_wg_wait<0>();
#pragma unroll
            for (int hh = 0; hh < NA; hh++) {
                moe_wg_fence_regs_n(o[hh]);
            }
        }
        moe_cp_async_wait<0>();
        __syncthreads();                    /* stages and run_s, wk_s, mf_s
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


/* Launch kernel_attention_prefill_wg<HD, BN, STAGES> (raising its
 * shared-memory limit once). */
template <int HD, int BN, int STAGES>
static int
att_wg_launch_v(int T, const float *qkv, int ld, const int32_t *tok_pos,
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
            kernel_attention_prefill_wg<HD, BN, STAGES>, sm));
        ready = 1;
    }
    MOE_CUDA_CHECK(moe_launch(
        kernel_attention_prefill_wg<HD, BN, STAGES>, grid, ATT_WG_NT, sm,
        stream, qkv, ld, T, tok_pos, tok_seq, bt, bt_off, kv, block_size,
        n_heads, n_kv, window, out));
    return MOE_K_OK;
}


/* The shipped instance: key tiles of 128, two cp.async stages. */
#define ATT_WG_BN      128
#define ATT_WG_STAGES  2

template <int HD>
static int
att_wg_launch(int T, const float *qkv, int ld, const int32_t *tok_pos,
    const int32_t *tok_seq, const int32_t *bt, const int32_t *bt_off,
    const bf16 *kv, int block_size, int n_heads, int n_kv, int window,
    bf16 *out, cudaStream_t stream)
{
    return att_wg_launch_v<HD, ATT_WG_BN, ATT_WG_STAGES>(
        T, qkv, ld, tok_pos, tok_seq, bt, bt_off, kv, block_size, n_heads,
        n_kv, window, out, stream);
}
