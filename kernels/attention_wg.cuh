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
 *
 * kernel_attention_prefill_wg8 (below) is the same for an e4m3 (fp8)
 * cache: the tiles staged as e4m3, converted to f16 in shared memory, the
 * products on f16 operands (record att_prefill_wg8; not yet run on a GPU,
 * off by default).  The pieces both kernels use (the run bookkeeping, the
 * loads, the mask, the online softmax, one tile's products, the store)
 * are the helpers before them; bench/dev's overlapped and warp-
 * specialised variants use them too.
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


/* The first ATT_WG_ALIGN-aligned byte at or after raw (the dynamic shared
 * memory; att_wg_smem counts ATT_WG_ALIGN bytes of slack for this). */
__device__ __forceinline__ unsigned char *
att_wg_aligned(unsigned char *raw)
{
    const uint32_t a = (uint32_t) __cvta_generic_to_shared(raw);

    return raw + ((ATT_WG_ALIGN - (a & (ATT_WG_ALIGN - 1)))
                  & (ATT_WG_ALIGN - 1));
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


/* S (64 x BN, d[BN / 2]) = Q (this warpgroup's 64 rows) K^T over HD;
 * bf16 operands, or f16 (F16: the fp8 cache's kernel). */
template <int HD, int BN, bool F16 = false>
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

        if constexpr (F16 && BN == 128) {
            moe_wg_mma_f16_ss_n128(s, da, db, kk > 0);
        } else if constexpr (F16) {
            moe_wg_mma_f16_ss_n64(s, da, db, kk > 0);
        } else if constexpr (BN == 128) {
            moe_wg_mma_bf16_ss_n128(s, da, db, kk > 0);
        } else {
            moe_wg_mma_bf16_ss_n64(s, da, db, kk > 0);
        }
    }
}


/* 2^x: FTZ one MUFU.EX2 (ex2.approx.ftz: subnormal results flushed to
 * zero, a weight below 2^-126 of the row's largest, zero either way in
 * bf16's P), else exp2f (the non-ftz ex2 with its subnormal fix-up). */
template <bool FTZ>
__device__ __forceinline__ float
att_wg_ex2(float x)
{
    if constexpr (FTZ) {
        float y;

        asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
        return y;
    } else {
        return exp2f(x);
    }
}


/* x, y as a pair of f16 (x in the low half), rounded to nearest. */
__device__ __forceinline__ uint32_t
att_wg_pack_f16(float x, float y)
{
    __half2 v = __floats2half2_rn(x, y);

    return *reinterpret_cast<uint32_t *>(&v);
}


/* The run [rs, return) of equal seq_s starting at row rs of the tile's
 * nrows, and its key range [*kmin, *kmax]; the same in every thread. */
__device__ __forceinline__ int
att_wg_run(const int *seq_s, const int *pos_s, const int *lo_s, int nrows,
    int rs, int *kmin, int *kmax)
{
    const int cs = seq_s[rs];
    int       re = rs + 1, a = INT_MAX, b = -1;

    while (re < nrows && seq_s[re] == cs) {
        re++;
    }
    for (int r = rs; r < re; r++) {
        a = min(a, lo_s[r]);
        b = max(b, pos_s[r]);
    }
    *kmin = a;
    *kmax = b;
    return re;
}


/* The tile starts kb that the warp's 16 rows from wr0 see unmasked in the
 * run [rs, re) (all 16 rows in it, kb >= their largest lo, kb + BN - 1 <=
 * their smallest pos): [*mfa, *mfb]. */
template <int BN>
__device__ __forceinline__ void
att_wg_warp_unmasked(const int *pos_s, const int *lo_s, int rs, int re,
    int wr0, int *mfa, int *mfb)
{
    const int mlo = max(rs, wr0), mhi = min(re, wr0 + 16);
    int       lomax = -1, posmin = INT_MAX;

    for (int r = mlo; r < mhi; r++) {
        lomax = max(lomax, lo_s[r]);
        posmin = min(posmin, pos_s[r]);
    }
    *mfa = mlo == wr0 && mhi == wr0 + 16 ? lomax : INT_MAX;
    *mfb = posmin - (BN - 1);
}


/* cp.async of the K and V rows kb .. kb + BN - 1 (rows past kmax: zeros)
 * of the kv head at kvg, through the block table, into the swizzled tiles
 * at kd (K) and kd + BN * HD * 2 (V); NT threads, this one t; the loop
 * unrolled UNR times (0: fully). */
template <int HD, int BN, int NT, int UNR = 0>
__device__ __forceinline__ void
att_wg_load_kv(unsigned char *kd, const bf16 *kvg, const int32_t *table,
    int kb, int kmax, int block_size, int kvd, int t)
{
    constexpr int CPR = HD / 8;             /* 16-byte chunks per row */
    constexpr int RPT = BN * CPR / NT;      /* K (and V) chunks a thread */
    constexpr int TB = BN * HD * 2;
    constexpr int U = UNR > 0 ? UNR : RPT;
    static_assert(RPT * NT == BN * CPR, "tile load split");

#pragma unroll U
    for (int c = 0; c < RPT; c++) {
        int  e = t + c * NT;
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
        moe_cp_async16(reinterpret_cast<bf16 *>(kd + off), ksrc, ok ? 16 : 0);
        moe_cp_async16(reinterpret_cast<bf16 *>(kd + TB + off), vsrc,
                       ok ? 16 : 0);
    }
}


/* Q rows r0 .. r0 + ATT_TC_BM - 1 of head h (zero past nrows), scaled by
 * log2(e) / sqrt(HD), to bf16 in the swizzled layout at q_s; NT threads,
 * this one t.  F16: f16, the scale times ksc (an fp8 cache's K scale). */
template <int HD, int NT, bool F16 = false>
__device__ __forceinline__ void
att_wg_load_q(unsigned char *q_s, const float *qkv, int ld, int r0,
    int nrows, int h, int t, float ksc = 1.0f)
{
    float qs = 1.4426950408889634f * rsqrtf((float) HD);

    if constexpr (F16) {
        qs *= ksc;
    }

    for (int i = t; i < ATT_TC_BM * (HD / 4); i += NT) {
        int    rw = i / (HD / 4), d = (i % (HD / 4)) * 4;
        float4 v = make_float4(0.0f, 0.0f, 0.0f, 0.0f);

        if (rw < nrows) {
            v = *reinterpret_cast<const float4 *>(
                    qkv + (size_t) (r0 + rw) * ld + (size_t) h * HD + d);
        }
        *reinterpret_cast<uint2 *>(q_s + att_wg_off(ATT_TC_BM, rw, d)) =
            F16 ? make_uint2(att_wg_pack_f16(v.x * qs, v.y * qs),
                             att_wg_pack_f16(v.z * qs, v.w * qs))
                : make_uint2(att_pack(v.x * qs, v.y * qs),
                             att_pack(v.z * qs, v.w * qs));
    }
}


/* S of the tile at key kb masked (-inf) outside each of this thread's rows
 * wr0 + 8 v + gq: rows outside the run [rs, re) entirely, others to [lo,
 * pos]. */
template <int NJ>
__device__ __forceinline__ void
att_wg_mask(float (&s)[NJ * 4], int kb, int wr0, int gq, int tq, int rs,
    int re, const int *pos_s, const int *lo_s)
{
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


/* The online softmax of the tile's S for this thread's two rows: the
 * running maxima m and sums l updated, corr[v] the factor O's row v must
 * be scaled by, p[j][v] row v's keys 8 j + 2 tq, + 1 as bf16 pairs (f16
 * with F16; the mma A layout P V takes). */
template <int NJ, bool FTZ, bool F16 = false>
__device__ __forceinline__ void
att_wg_softmax(const float (&s)[NJ * 4], float (&m)[2], float (&l)[2],
    float (&corr)[2], uint32_t (&p)[NJ][2])
{
#pragma unroll
    for (int v = 0; v < 2; v++) {
        float mx = -INFINITY, sum = 0.0f, mn, mu;

#pragma unroll
        for (int j = 0; j < NJ; j++) {
            mx = fmaxf(mx, fmaxf(s[4 * j + 2 * v], s[4 * j + 2 * v + 1]));
        }
        mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
        mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
        mn = fmaxf(m[v], mx);
        mu = mn == -INFINITY ? 0.0f : mn;
        corr[v] = att_wg_ex2<FTZ>(m[v] - mu);
        m[v] = mn;
#pragma unroll
        for (int j = 0; j < NJ; j++) {
            float x = att_wg_ex2<FTZ>(s[4 * j + 2 * v] - mu);
            float y = att_wg_ex2<FTZ>(s[4 * j + 2 * v + 1] - mu);

            sum += x + y;
            p[j][v] = F16 ? att_wg_pack_f16(x, y) : att_pack(x, y);
        }
        l[v] = l[v] * corr[v] + sum;
    }
}


/* O's row v (this thread's columns) scaled by corr[v]. */
template <int NA>
__device__ __forceinline__ void
att_wg_rescale(float (&o)[NA][32], const float (&corr)[2])
{
#pragma unroll
    for (int hh = 0; hh < NA; hh++) {
#pragma unroll
        for (int j = 0; j < 8; j++) {
#pragma unroll
            for (int v = 0; v < 2; v++) {
                o[hh][4 * j + 2 * v] *= corr[v];
                o[hh][4 * j + 2 * v + 1] *= corr[v];
            }
        }
    }
}


/* O (64 x 64 NA, o[NA][32]) += P (this warpgroup's 64 rows x BN keys,
 * bf16 pairs p[j][v]: row v's keys 8 j + 2 tq, + 1; f16 pairs with F16)
 * V (BN x 64 NA at vs, MN-major); asynchronous until moe_wg_wait, p stays
 * read until then. */
template <int NA, int BN, bool F16 = false>
__device__ __forceinline__ void
att_wg_pv(float (&o)[NA][32], const uint32_t (&p)[BN / 8][2],
    const unsigned char *vs)
{
#pragma unroll
    for (int kk = 0; kk < BN / 16; kk++) {
        const uint32_t a[4] = { p[2 * kk][0], p[2 * kk][1],
                                p[2 * kk + 1][0], p[2 * kk + 1][1] };

#pragma unroll
        for (int hh = 0; hh < NA; hh++) {
            const uint64_t db =
                moe_wg_desc_mn(vs + hh * BN * 128 + kk * 16 * 128);

            if constexpr (F16) {
                moe_wg_mma_f16_rs_n64_tb(o[hh], a, db);
            } else {
                moe_wg_mma_bf16_rs_n64_tb(o[hh], a, db);
            }
        }
    }
}


/* Normalise this thread's two rows of O by their sums (l reduced over the
 * row's 4 lanes) and write those in the run [rs, re) to out (bf16, rows
 * r0 + r of n_heads heads, head h); VSC: times vsc too (an fp8 cache's V
 * scale). */
template <int NA, int HD, bool VSC = false>
__device__ __forceinline__ void
att_wg_store(const float (&o)[NA][32], const float (&l)[2], bf16 *out,
    int r0, int h, int n_heads, int wr0, int gq, int tq, int rs, int re,
    float vsc = 1.0f)
{
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

            if constexpr (VSC) {
                inv *= vsc;
            }
#pragma unroll
            for (int hh = 0; hh < NA; hh++) {
#pragma unroll
                for (int j = 0; j < 8; j++) {
                    *reinterpret_cast<uint32_t *>(orow + hh * 64 + j * 8) =
                        att_pack(o[hh][4 * j + 2 * v] * inv,
                                 o[hh][4 * j + 2 * v + 1] * inv);
                }
            }
        }
    }
}


/* The run's shared bookkeeping, written by the threads named: per warp
 * (lane 0) the tile starts it sees unmasked (mf_s[warp]), per warpgroup
 * (its thread 0) the first and last tile start any of its rows needs
 * (wk_s[wg]: a tile kb is skipped when kb < [0] or kb > [1]), and (thread
 * 0) the run's key range and block-table offset (run_s). */
template <int BN>
__device__ __forceinline__ void
att_wg_run_book(const int *pos_s, const int *lo_s, int rs, int re, int wr0,
    int kmin, int kmax, int off, int (*mf_s)[2], int (*wk_s)[2], int *run_s)
{
    const int tid = (int) threadIdx.x, warp = tid >> 5, wg = warp >> 2;
    int       mfa, mfb;

    att_wg_warp_unmasked<BN>(pos_s, lo_s, rs, re, wr0, &mfa, &mfb);
    if ((tid & 31) == 0) {
        mf_s[warp][0] = mfa;
        mf_s[warp][1] = mfb;
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
        run_s[2] = off;
    }
}


/* O, the running maxima and sums at the start of a run. */
template <int NA>
__device__ __forceinline__ void
att_wg_zero(float (&o)[NA][32], float (&m)[2], float (&l)[2])
{
#pragma unroll
    for (int hh = 0; hh < NA; hh++) {
#pragma unroll
        for (int e = 0; e < 32; e++) {
            o[hh][e] = 0.0f;
        }
    }
    m[0] = m[1] = -INFINITY;
    l[0] = l[1] = 0.0f;
}


/* One key tile (K at ks, V at vs, swizzled) of a warpgroup, synchronously:
 * S = Q K^T, the mask unless the tile start kb is in the warp's unmasked
 * [mfa, mfb], the online softmax, O rescaled, O += P V; bf16 operands, or
 * f16 (F16). */
template <int HD, int BN, bool F16>
__device__ __forceinline__ void
att_wg_tile(float (&s)[BN / 2], float (&o)[HD / 64][32], float (&m)[2],
    float (&l)[2], const unsigned char *q_s, const unsigned char *ks,
    const unsigned char *vs, int wg, int kb, int mfa, int mfb, int wr0,
    int gq, int tq, int rs, int re, const int *pos_s, const int *lo_s)
{
    constexpr int NA = HD / 64, NJ = BN / 8;
    uint32_t      pr[NJ][2];
    float         corr[2];

    /* S = Q K^T */
    moe_wg_fence_regs_n(s);
    moe_wg_fence();
    att_wg_qk<HD, BN, F16>(s, q_s, ks, wg);
    moe_wg_commit();
    moe_wg_wait<0>();
    moe_wg_fence_regs_n(s);

    /* mask unless each of the warp's 16 rows is in the run and sees the
     * whole tile */
    if (kb < mfa || kb > mfb) {
        att_wg_mask<NJ>(s, kb, wr0, gq, tq, rs, re, pos_s, lo_s);
    }
    att_wg_softmax<NJ, false, F16>(s, m, l, corr, pr);
    att_wg_rescale<NA>(o, corr);

    /* O += P V */
#pragma unroll
    for (int hh = 0; hh < NA; hh++) {
        moe_wg_fence_regs_n(o[hh]);
    }
    moe_wg_fence();
    att_wg_pv<NA, BN, F16>(o, pr, vs);
    moe_wg_commit();
    moe_wg_wait<0>();
#pragma unroll
    for (int hh = 0; hh < NA; hh++) {
        moe_wg_fence_regs_n(o[hh]);
    }
}


/* ------------------------------------------------ an e4m3 (fp8) cache */

/* Dynamic shared memory of kernel_attention_prefill_wg8<HD, BN, STAGES>:
 * alignment slack, Q (f16), one K, V tile pair (f16, swizzled), STAGES
 * staging tile pairs (e4m3 as the cache holds them). */
static constexpr size_t
att_wg8_smem(int hd, int bn, int stages)
{
    return (size_t) ATT_WG_ALIGN + (size_t) ATT_TC_BM * hd * 2
           + (size_t) 2 * bn * hd * 2 + (size_t) stages * 2 * bn * hd;
}


/* cp.async of the e4m3 K and V rows kb .. kb + BN - 1 (rows past kmax:
 * zeros) of the kv head at kvg into the staging pair at sd: K rows of HD
 * bytes, then V rows; NT threads, this one t. */
template <int HD, int BN, int NT>
__device__ __forceinline__ void
att_wg8_load_kv(unsigned char *sd, const fp8 *kvg, const int32_t *table,
    int kb, int kmax, int block_size, int kvd, int t)
{
    constexpr int CPR = HD / 16;            /* 16-byte chunks per row */
    constexpr int RPT = BN * CPR / NT;
    static_assert(RPT * NT == BN * CPR, "tile load split");

#pragma unroll
    for (int c = 0; c < RPT; c++) {
        int  e = t + c * NT;
        int  row = e / CPR, ch = e % CPR;
        int  j = kb + row;
        bool ok = j <= kmax;
        const fp8 *ksrc = kvg, *vsrc = kvg;

        if (ok) {
            ksrc = kvg + ((size_t) table[j / block_size] * 2 * block_size
                          + j % block_size) * kvd + ch * 16;
            vsrc = ksrc + (size_t) block_size * kvd;
        }
        moe_cp_async16(reinterpret_cast<bf16 *>(sd + row * HD + ch * 16),
                       reinterpret_cast<const bf16 *>(ksrc), ok ? 16 : 0);
        moe_cp_async16(
            reinterpret_cast<bf16 *>(sd + BN * HD + row * HD + ch * 16),
            reinterpret_cast<const bf16 *>(vsrc), ok ? 16 : 0);
    }
}


/* Two e4m3 codes (the low one first) as two f16 in one word (exact). */
__device__ __forceinline__ uint32_t
att_wg8_cvt2(uint32_t two)
{
    __half2_raw r = __nv_cvt_fp8x2_to_halfraw2((__nv_fp8x2_storage_t) two,
                                               __NV_E4M3);

    return (uint32_t) r.x | ((uint32_t) r.y << 16);
}


/* The staged e4m3 pair at sd to f16 (exact) in the swizzled K, V tiles at
 * kd, kd + BN * HD * 2; NT threads, this one t. */
template <int HD, int BN, int NT>
__device__ __forceinline__ void
att_wg8_convert(unsigned char *kd, const unsigned char *sd, int t)
{
    constexpr int CPR = HD / 8;             /* 8-element chunks per row */
    constexpr int RPT = 2 * BN * CPR / NT;
    static_assert(RPT * NT == 2 * BN * CPR, "tile convert split");

#pragma unroll 4
    for (int c = 0; c < RPT; c++) {
        int   e = t + c * NT;
        int   kv = e / (BN * CPR), rem = e % (BN * CPR);
        int   row = rem / CPR, d = (rem % CPR) * 8;
        uint2 raw = *reinterpret_cast<const uint2 *>(
                        sd + kv * BN * HD + row * HD + d);
        uint4 h = make_uint4(att_wg8_cvt2(raw.x & 0xffff),
                             att_wg8_cvt2(raw.x >> 16),
                             att_wg8_cvt2(raw.y & 0xffff),
                             att_wg8_cvt2(raw.y >> 16));

        *reinterpret_cast<uint4 *>(kd + kv * BN * HD * 2
                                   + att_wg_off(BN, row, d)) = h;
    }
}


/*
 * The body of both prefill kernels: kernel_attention_prefill_wg (F8
 * false: a bf16 cache, KV bf16, ksc and vsc unused) and
 * kernel_attention_prefill_wg8 (F8: an e4m3 cache, KV fp8).
 *
 * grid (n_heads, ceil(T / ATT_TC_BM)), ATT_WG_NT threads,
 * att_wg_smem(HD, BN, STAGES) (bf16) or att_wg8_smem (e4m3) bytes of
 * dynamic shared memory.  Lane l of warp w (warpgroup wg = w / 4) holds
 * rows 64 wg + 16 (w % 4) + l / 4 and + 8 (v = 0, 1): S's d[4 j + 2 v +
 * c] is key 8 j + 2 (l % 4) + c of the tile, O's o[hh][4 j + 2 v + c] is
 * column 64 hh + 8 j + 2 (l % 4) + c.
 *
 * bf16: the K, V tiles land by cp.async in STAGES swizzled stages the
 * wgmma reads directly (one barrier a tile).  e4m3: each tile's rows land
 * in one of STAGES staging pairs as the cache holds them, are converted
 * to f16 (exact) into one swizzled K, V pair, and the products run on f16
 * operands, the K scale folded into Q, the V scale into the output (two
 * barriers a tile: the staged tile in; the converted tile written).
 */
template <int HD, int BN, int STAGES, bool F8, typename KV>
__device__ __forceinline__ void
att_wg_prefill(const float *qkv, int ld, int T, const int32_t *tok_pos,
    const int32_t *tok_seq, const int32_t *bt, const int32_t *bt_off,
    const KV *kv_layer, int block_size, int n_heads, int n_kv, int window,
    float ksc, float vsc, bf16 *out)
{
    moe_pdl_enter();
    constexpr int BM = ATT_TC_BM, NT = ATT_WG_NT;
    constexpr int NA = HD / 64;             /* 64-column blocks */
    constexpr int TB = BN * HD * 2;         /* bytes of a K (or V) tile */
    constexpr int SB = 2 * BN * HD;         /* bytes of an e4m3 pair */
    static_assert(HD == 64 || HD == 128, "head dim");
    static_assert(BN == 64 || BN == 128, "key tile");
    static_assert(STAGES >= 2, "stages");
    static_assert(sizeof(KV) == (F8 ? 1 : 2), "cache element");

    extern __shared__ unsigned char att_wg_raw[];
    unsigned char *q_s = att_wg_aligned(att_wg_raw);
    unsigned char *kv_s = q_s + BM * HD * 2;    /* bf16: [stage][K, V];
                                                 * e4m3: K, V (f16) */
    unsigned char *st_s = kv_s + 2 * TB;    /* e4m3: [stage] K, V */
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
    const KV *kvg = kv_layer + (size_t) (h / grp) * HD;

    /* cp.async of key tile i of [kmin, kmax] into stage st */
    auto load = [&](int i, int st, int kmin, int kmax, const int32_t *table)
    {
        if constexpr (F8) {
            att_wg8_load_kv<HD, BN, NT>(st_s + st * SB, kvg, table,
                                        kmin + i * BN, kmax, block_size,
                                        kvd, tid);
        } else {
            att_wg_load_kv<HD, BN, NT>(kv_s + st * 2 * TB, kvg, table,
                                       kmin + i * BN, kmax, block_size, kvd,
                                       tid);
        }
    };

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
        int       kmin, kmax;               /* the run's key range */
        const int re = att_wg_run(seq_s, pos_s, lo_s, nrows, rs, &kmin,
                                  &kmax);
        const int cs = seq_s[rs];
        const int ntl = (kmax - kmin) / BN + 1;

        /* the keys this warpgroup's rows of the run need, and per warp
         * the tile starts kb that need no mask (published by the first
         * key tile's barrier; rewritten only after the run's last) */
        att_wg_run_book<BN>(pos_s, lo_s, rs, re, wr0, kmin, kmax,
                            bt_off[cs], mf_s, wk_s, run_s);

        float m[2], l[2];

        att_wg_zero<NA>(o, m, l);

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

        /* Q (the first run only; the first tile's barrier, after the proxy
         * fence, publishes it) */
        if (rs == 0) {
            att_wg_load_q<HD, NT, F8>(q_s, qkv, ld, r0, nrows, h, tid, ksc);
        }

        int stc = 0, stl = STAGES - 1;      /* stages: compute, next load */

        for (int i = 0; i < ntl; i++) {
            moe_cp_async_wait<STAGES - 2>();
            if constexpr (!F8) {
                moe_wg_fence_proxy_async(); /* this thread's copies and Q
                                             * stores, to the async proxy */
            }
            __syncthreads();                /* tile i in; stage stl (and
                                             * the f16 pair) free */

            const int kmin_ = run_s[0];

            if (i + STAGES - 1 < ntl) {
                load(i + STAGES - 1, stl, kmin_, run_s[1], bt + run_s[2]);
            }
            moe_cp_async_commit();
            stl = stl + 1 == STAGES ? 0 : stl + 1;

            const int kb = kmin_ + i * BN;
            const unsigned char *ks = kv_s, *vs = kv_s + TB;

            if constexpr (F8) {
                att_wg8_convert<HD, BN, NT>(kv_s, st_s + stc * SB, tid);
                moe_wg_fence_proxy_async(); /* the f16 pair and Q, to the
                                             * async proxy */
                __syncthreads();            /* the f16 pair written */
            } else {
                ks = kv_s + stc * 2 * TB;
                vs = ks + TB;
            }
            stc = stc + 1 == STAGES ? 0 : stc + 1;
            if (kb < wk_s[wg][0] || kb > wk_s[wg][1]) {
                continue;                   /* none of the warpgroup's rows
                                             * (uniform in the warpgroup) */
            }

            att_wg_tile<HD, BN, F8>(s, o, m, l, q_s, ks, vs, wg, kb,
                                    mf_s[warp][0], mf_s[warp][1], wr0, gq,
                                    tq, rs, re, pos_s, lo_s);
        }
        moe_cp_async_wait<0>();
        __syncthreads();                    /* stages and run_s, wk_s, mf_s
                                             * free for the next run */

        att_wg_store<NA, HD, F8>(o, l, out, r0, h, n_heads, wr0, gq, tq, rs,
                                 re, vsc);
        rs = re;
    }
}


/* The prefill attention over a bf16 cache (att_wg_prefill has the
 * details). */
template <int HD, int BN, int STAGES>
__global__ void __launch_bounds__(ATT_WG_NT, 1)
kernel_attention_prefill_wg(const float *qkv, int ld, int T,
    const int32_t *tok_pos, const int32_t *tok_seq, const int32_t *bt,
    const int32_t *bt_off, const bf16 *kv_layer, int block_size, int n_heads,
    int n_kv, int window, bf16 *out)
{
    att_wg_prefill<HD, BN, STAGES, false>(qkv, ld, T, tok_pos, tok_seq, bt,
                                          bt_off, kv_layer, block_size,
                                          n_heads, n_kv, window, 1.0f, 1.0f,
                                          out);
}


/*
 * The prefill attention over an e4m3 (fp8) cache, K and V scales ksc and
 * vsc (att_wg_prefill has the details).  Written in the eighteenth
 * session, compiled, not yet run on a GPU: the record's att_prefill_wg8
 * is 0 by default (prefill over an fp8 cache then runs the SIMT kernel,
 * as before).
 */
template <int HD, int BN, int STAGES>
__global__ void __launch_bounds__(ATT_WG_NT, 1)
kernel_attention_prefill_wg8(const float *qkv, int ld, int T,
    const int32_t *tok_pos, const int32_t *tok_seq, const int32_t *bt,
    const int32_t *bt_off, const fp8 *kv_layer, int block_size, int n_heads,
    int n_kv, int window, float ksc, float vsc, bf16 *out)
{
    att_wg_prefill<HD, BN, STAGES, true>(qkv, ld, T, tok_pos, tok_seq, bt,
                                         bt_off, kv_layer, block_size,
                                         n_heads, n_kv, window, ksc, vsc,
                                         out);
}


/* The prefill kernels' signature over a bf16 cache (this file's, and the
 * dev harness's variants of it). */
typedef void (*att_wg_kernel_t)(const float *, int, int, const int32_t *,
                                const int32_t *, const int32_t *,
                                const int32_t *, const bf16 *, int, int, int,
                                int, bf16 *);

/* Launch kernel k with arguments args on the prefill grid (n_heads q
 * heads x 128-row tiles of T) with nt threads and sm bytes of dynamic
 * shared memory, raising k's shared-memory limit on the first call
 * (*ready 0). */
template <typename K, typename... A>
static int
att_wg_launch_k(K k, int nt, size_t sm, int *ready, int T, int n_heads,
    cudaStream_t stream, A... args)
{
    dim3 grid((unsigned) n_heads,
              (unsigned) ((T + ATT_TC_BM - 1) / ATT_TC_BM));

    if (!*ready) {
        MOE_CUDA_CHECK(moe_smem_max_carveout(k, sm));
        *ready = 1;
    }
    MOE_CUDA_CHECK(moe_launch(k, grid, nt, sm, stream, args...));
    return MOE_K_OK;
}


/* Launch kernel_attention_prefill_wg8<HD, 128, 2>. */
template <int HD>
static int
att_wg8_launch(int T, const float *qkv, int ld, const int32_t *tok_pos,
    const int32_t *tok_seq, const int32_t *bt, const int32_t *bt_off,
    const fp8 *kv, int block_size, int n_heads, int n_kv, int window,
    float ksc, float vsc, bf16 *out, cudaStream_t stream)
{
    static int ready = 0;

    return att_wg_launch_k(kernel_attention_prefill_wg8<HD, 128, 2>,
                           ATT_WG_NT, att_wg8_smem(HD, 128, 2), &ready, T,
                           n_heads, stream, qkv, ld, T, tok_pos, tok_seq, bt,
                           bt_off, kv, block_size, n_heads, n_kv, window,
                           ksc, vsc, out);
}


/* Launch kernel_attention_prefill_wg<HD, BN, STAGES>. */
template <int HD, int BN, int STAGES>
static int
att_wg_launch_v(int T, const float *qkv, int ld, const int32_t *tok_pos,
    const int32_t *tok_seq, const int32_t *bt, const int32_t *bt_off,
    const bf16 *kv, int block_size, int n_heads, int n_kv, int window,
    bf16 *out, cudaStream_t stream)
{
    static int ready = 0;

    return att_wg_launch_k(kernel_attention_prefill_wg<HD, BN, STAGES>,
                           ATT_WG_NT, att_wg_smem(HD, BN, STAGES), &ready, T,
                           n_heads, stream, qkv, ld, T, tok_pos, tok_seq, bt,
                           bt_off, kv, block_size, n_heads, n_kv, window,
                           out);
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
