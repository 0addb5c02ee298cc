/*
 * Paged attention, five kernels chosen by step shape and the tuning record
 * (all graph-safe: the grid depends on T, n_kv and the device, never on
 * positions):
 *
 * kernel_attention_decode_tc: the key-split path below (small T * n_kv)
 * for head_dim 64 and 128 unless the tuning record's att_decode_tc is 0:
 * the same grid, splits, workspace and merge, the work on tensor cores
 * (mma.sync; the G q heads as rows, keys per warp through a cp.async
 * pipeline, e4m3 tiles converted to f16 operands in registers).  Its own
 * comment below has the details.
 *
 * kernel_attention_decode_split: small T * n_kv (decode, and short
 * prefills: up to ATT_MAX_PAIRS (token, kv head) pairs).  One block of
 * ATT_NT threads per (token, kv head, key split) serves the G query heads
 * of that kv head, so each K/V row is read once per kv head.  The grid's
 * split count depends on T * n_kv only (graph-safe: att_split_bps blocks
 * per SM, a tuning-record knob); inside, each block derives the effective
 * split count from its token's context (at least one KT-key tile per
 * split), so short contexts do not scatter a few keys over many blocks:
 * splits past the effective count exit at once.  Per tile of KT keys the
 * block loads K and V together (16-byte loads, the next tile's loads in
 * flight while this one is computed) into shared memory, scores all
 * (head, key) pairs, does the online softmax one warp per head, and
 * accumulates P.V with HDP / 8 lanes per V row.  With one effective split
 * the block writes the output; with several each writes its unnormalised
 * state (m, l, acc) to the workspace and the last block of the (token, kv
 * head) -- an atomic counter per pair, reset by that last block so the
 * next launch (and a graph replay) finds it zero -- merges them: no second
 * launch.
 *
 * kernel_attention_prefill_wg (attention_wg.cuh): larger T (T >=
 * ATT_TC_MIN_T, more than ATT_MAX_PAIRS pairs, head_dim 64 or 128, a bf16
 * cache) unless the record's att_prefill_wg is 0: warpgroup tensor cores
 * (wgmma), one CTA of 2 warpgroups per (128-row tile, q head), keys
 * streamed with cp.async into swizzled tiles.  It refuses row tiles of
 * more than ATT_TC_RUNS sequences.
 *
 * kernel_attention_prefill_tc: the same steps with att_prefill_wg 0:
 * tensor cores (mma.sync), one CTA of 4 warps per (128-row tile, q head),
 * keys streamed with cp.async.  It refuses the same row tiles.
 *
 * kernel_attention_prefill_simt: the CUDA-core prefill kernel for the
 * rest: the tiles the tensor-core kernel refused (launched after it, with
 * a skip test), T < ATT_TC_MIN_T, other head dims.  One block of
 * ATT_WARPS warps per (query token, kv head); keys cut into chunks of 32,
 * chunk c to warp c mod ATT_WARPS; lane = key for the scores, LPR = hd / 8
 * lanes per V row.  (It can also split keys over gridDim.y blocks with a
 * combine pass; the shipped launcher never does: bench/dev measures that
 * variant against the split kernel.)
 *
 * Prefill and decode compute the same function: a token attends to the
 * positions up to its own, which rope_kv has already written.
 */
#include <limits.h>
#include <math.h>

#include "common.cuh"
#include "ptx.cuh"
#include <cuda_fp8.h>
#include <cuda_fp16.h>
#include "attention.h"

/* kernel_attention_prefill_simt */
#define ATT_WARPS      4

/* kernel_attention_decode_split */
#define ATT_NT         128          /* threads per block */
#define ATT_MAX_SPLIT  64           /* grid splits per (token, kv head) */
#define ATT_MAX_PAIRS  1024         /* T * n_kv handled by the split kernel */
#define ATT_MAX_REC    2048         /* split records in the workspace */
#define ATT_CNT_FLOATS ATT_MAX_PAIRS    /* counters at the workspace start */

/* kernel_attention_decode_tc */
#define ATT_DTC_NW     4            /* warps per block (ATT_NT threads) */
#define ATT_DTC_KT     16           /* keys per warp tile */

/* kernel_attention_prefill_tc (the shipped instance; bench/dev/attention
 * times the others) */
#define ATT_TC_BM      128          /* query rows per CTA (4 warps x 32) */
#define ATT_TC_BN      32           /* keys per loaded tile */
#define ATT_TC_BC      32           /* keys per S sub-tile */
#define ATT_TC_STAGES  2            /* cp.async stages of K, V tiles */
#define ATT_TC_MINB    2            /* CTAs per SM (__launch_bounds__) */
#define ATT_TC_RUNS    4            /* sequence runs per row tile, at most */
#define ATT_TC_MIN_T   64           /* fewest tokens sent to the kernel */

typedef __nv_bfloat16 bf16;
typedef uint8_t       fp8;          /* e4m3 cache element (fp8 KV cache) */


/* 8 cache elements (16 bytes bf16, 8 bytes e4m3) at p to fp32, exact. */
template <typename KV>
__device__ __forceinline__ void
att_ld8(const KV *p, float (&f)[8])
{
    if constexpr (sizeof(KV) == 1) {
        uint2 raw = *reinterpret_cast<const uint2 *>(p);
        const uint32_t w[2] = { raw.x, raw.y };

#pragma unroll
        for (int i = 0; i < 4; i++) {
            __half2_raw r = __nv_cvt_fp8x2_to_halfraw2(
                (__nv_fp8x2_storage_t) (w[i >> 1] >> (16 * (i & 1))),
                __NV_E4M3);
            float2 v = __half22float2(*reinterpret_cast<__half2 *>(&r));

            f[2 * i] = v.x;
            f[2 * i + 1] = v.y;
        }
    } else {
        uint4       raw = *reinterpret_cast<const uint4 *>(p);
        const bf16 *b = reinterpret_cast<const bf16 *>(&raw);

#pragma unroll
        for (int i = 0; i < 8; i++) {
            f[i] = moe_bf2f(b[i]);
        }
    }
}

static_assert(ATT_WARPS * 32 == ATT_TC_BM, "simt skip test: a thread a row");


/*
 * Runs of equal tok_seq among rows [tile * ATT_TC_BM, +ATT_TC_BM) of T.
 * Called by all threads of a block of at least ATT_TC_BM threads (it is a
 * barrier); the same value in every thread.
 */
__device__ __forceinline__ int
att_tc_runs(const int32_t *tok_seq, int T, int tile)
{
    int i = (int) threadIdx.x, r = tile * ATT_TC_BM + i;
    int chg = i > 0 && i < ATT_TC_BM && r < T && tok_seq[r] != tok_seq[r - 1];

    return 1 + __syncthreads_count(chg);
}


template <int G, int HDP, typename KV>
__global__ void __launch_bounds__(ATT_WARPS * 32)
kernel_attention_prefill_simt(const float *qkv, int ld, const int32_t *tok_pos,
    const int32_t *tok_seq, const int32_t *bt, const int32_t *bt_off,
    const KV *kv_layer, int block_size, int n_heads, int n_kv, int hd,
    int window, bf16 *out, float *part, float ksc, float vsc, int tc)
{
    moe_pdl_enter();
    constexpr int LPR = HDP / 8;          /* lanes per V row */

    /* after kernel_attention_prefill_tc: only the tokens of the tiles it
     * refused */
    if (tc && att_tc_runs(tok_seq, (int) gridDim.x / n_kv,
                          (int) blockIdx.x / n_kv / ATT_TC_BM) <= ATT_TC_RUNS)
    {
        return;
    }

    constexpr int KPS = 32 / LPR;         /* keys per V step */
    __shared__ float q_s[G][HDP];
    __shared__ float m_s[ATT_WARPS][G];
    __shared__ float l_s[ATT_WARPS][G];
    __shared__ float a_s[ATT_WARPS][G][HDP];

    int   t = blockIdx.x / n_kv, g = blockIdx.x % n_kv;
    int   split = blockIdx.y, ns = gridDim.y;
    int   grp = n_heads / n_kv;
    int   lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    int   sub = lane / LPR, d0 = (lane % LPR) * 8;
    bool  dval = d0 < hd;
    int   p = tok_pos[t], j0 = 0;
    int   kvd = n_kv * hd;
    float scale = ksc / sqrtf((float) hd);
    const int32_t *table = bt + bt_off[tok_seq[t]];

    if (window > 0 && p - window + 1 > 0) {
        j0 = p - window + 1;
    }
    for (int i = threadIdx.x; i < G * HDP; i += blockDim.x) {
        int h = i / HDP, d = i % HDP;

        q_s[h][d] = (h < grp && d < hd)
                    ? qkv[(size_t) t * ld + (size_t) (g * grp + h) * hd + d]
                      * scale
                    : 0.0f;
    }
    __syncthreads();

    float m[G], l[G], acc[G][8];

#pragma unroll
    for (int h = 0; h < G; h++) {
        m[h] = -INFINITY;
        l[h] = 0.0f;
#pragma unroll
        for (int i = 0; i < 8; i++) {
            acc[h][i] = 0.0f;
        }
    }

    int nkeys = p - j0 + 1;
    int nchunks = (nkeys + 31) / 32;

    for (int c = split * ATT_WARPS + warp; c < nchunks;
         c += ns * ATT_WARPS)
    {
        int   jb = j0 + c * 32;
        int   j = jb + lane;
        int   valid = j <= p;
        float s[G], pr[G];

#pragma unroll
        for (int h = 0; h < G; h++) {
            s[h] = 0.0f;
        }
        if (valid) {
            const KV *kp =
                kv_layer + ((size_t) table[j / block_size] * 2 * block_size
                            + j % block_size) * kvd + (size_t) g * hd;

#pragma unroll 8
            for (int d = 0; d < HDP; d += 8) {
                if (d < hd) {
                    float kf[8];

                    att_ld8<KV>(kp + d, kf);
#pragma unroll
                    for (int h = 0; h < G; h++) {
#pragma unroll
                        for (int e = 0; e < 8; e++) {
                            s[h] += q_s[h][d + e] * kf[e];
                        }
                    }
                }
            }
        }
#pragma unroll
        for (int h = 0; h < G; h++) {
            float sv = valid ? s[h] : -INFINITY;
            float mc = moe_warp_max(sv);
            float mn = fmaxf(m[h], mc);
            float corr = expf(m[h] - mn);

            pr[h] = valid ? expf(sv - mn) : 0.0f;
            l[h] = l[h] * corr + moe_warp_sum(pr[h]);
            m[h] = mn;
#pragma unroll
            for (int i = 0; i < 8; i++) {
                acc[h][i] *= corr;
            }
        }

#pragma unroll 4
        for (int jj0 = 0; jj0 < 32; jj0 += KPS) {
            int   jj = jj0 + sub, jp = jb + jj;
            float pj[G];

#pragma unroll
            for (int h = 0; h < G; h++) {
                pj[h] = __shfl_sync(0xffffffffu, pr[h], jj);
            }
            if (jp <= p && dval) {
                const KV *vp =
                    kv_layer + (((size_t) table[jp / block_size] * 2 + 1)
                                * block_size + jp % block_size) * kvd
                    + (size_t) g * hd + d0;
                float     vf[8];

                att_ld8<KV>(vp, vf);
#pragma unroll
                for (int e = 0; e < 8; e++) {
#pragma unroll
                    for (int h = 0; h < G; h++) {
                        acc[h][e] += pj[h] * vf[e];
                    }
                }
            }
        }
    }

    /* add the lanes' key subsets: lanes d0-equal differ in sub */
#pragma unroll
    for (int o = LPR; o < 32; o <<= 1) {
#pragma unroll
        for (int h = 0; h < G; h++) {
#pragma unroll
            for (int i = 0; i < 8; i++) {
                acc[h][i] += __shfl_xor_sync(0xffffffffu, acc[h][i], o);
            }
        }
    }
    /* merge the warps' states */
#pragma unroll
    for (int h = 0; h < G; h++) {
        if (lane == 0) {
            m_s[warp][h] = m[h];
            l_s[warp][h] = l[h];
        }
        if (sub == 0 && dval) {
#pragma unroll
            for (int i = 0; i < 8; i++) {
                a_s[warp][h][d0 + i] = acc[h][i];
            }
        }
    }
    __syncthreads();

    size_t rec = (size_t) blockIdx.x * ns + split;
    float *pm = part + rec * (size_t) grp * (hd + 2);

    for (int i = threadIdx.x; i < grp * hd; i += blockDim.x) {
        int   h = i / hd, d = i % hd;
        float M = -INFINITY, L = 0.0f, o = 0.0f;

        for (int w = 0; w < ATT_WARPS; w++) {
            M = fmaxf(M, m_s[w][h]);
        }
        for (int w = 0; w < ATT_WARPS; w++) {
            if (m_s[w][h] != -INFINITY) {
                float f = expf(m_s[w][h] - M);

                L += l_s[w][h] * f;
                o += a_s[w][h][d] * f;
            }
        }
        o *= vsc;                           /* the V scale (fp8 cache) */
        if (ns == 1) {
            out[(size_t) t * n_heads * hd + (size_t) (g * grp + h) * hd + d] =
                moe_f2bf(o / L);
        } else {
            if (d == 0) {
                pm[h] = M;
                pm[grp + h] = L;
            }
            pm[2 * grp + h * hd + d] = o;
        }
    }
}


/* ------------------------------------------ decode: the key-split kernel */

/* Tile shape of the split kernel for padded head dim HDP. */
template <int HDP>
struct att_shape {
    static constexpr int CPR = HDP / 8;             /* 16-byte chunks / row */
    static constexpr int KT = 4096 / HDP < 16 ? 16
                              : 4096 / HDP > 64 ? 64 : 4096 / HDP;  /* keys */
    static constexpr int LPT = 2 * KT * CPR / ATT_NT;  /* loads / thread */
    static constexpr int ROW = HDP + 8;             /* bf16 per smem row */
    static constexpr int KG = ATT_NT / CPR;         /* key groups in P.V */
};


/*
 * Issue the 16-byte loads of K and V rows [jt, jt + nv) of kv head g into
 * buf (element e = tid + r * ATT_NT: K rows first, then V rows; chunk c of
 * row `row`).  Rows past nv and chunks past hd are not loaded.
 */
template <int HDP, typename KV>
__device__ __forceinline__ void
att_load_tile(uint4 (&buf)[att_shape<HDP>::LPT], const KV *kvg,
    const int32_t *table, int block_size, int kvd, int hd, int jt, int nv)
{
    typedef att_shape<HDP> S;

#pragma unroll
    for (int r = 0; r < S::LPT; r++) {
        int e = (int) threadIdx.x + r * ATT_NT;
        int sel = e / (S::KT * S::CPR), rem = e % (S::KT * S::CPR);
        int row = rem / S::CPR, c = rem % S::CPR;

        if (row < nv && c * 8 < hd) {
            int j = jt + row;
            int blk = table[j / block_size];

            const KV *src = kvg + (((size_t) blk * 2 + sel) * block_size
                                   + j % block_size) * kvd + c * 8;

            if constexpr (sizeof(KV) == 1) {    /* 8 e4m3: 8 bytes */
                uint2 v = __ldg(reinterpret_cast<const uint2 *>(src));

                buf[r] = make_uint4(v.x, v.y, 0u, 0u);
            } else {
                buf[r] = __ldg(reinterpret_cast<const uint4 *>(src));
            }
        }
    }
}


/* Store what att_load_tile loaded into kv_s[sel][row][chunk]. */
template <int HDP, typename KV>
__device__ __forceinline__ void
att_store_tile(const uint4 (&buf)[att_shape<HDP>::LPT],
    bf16 (*kv_s)[att_shape<HDP>::KT][att_shape<HDP>::ROW], int hd, int nv)
{
    typedef att_shape<HDP> S;

#pragma unroll
    for (int r = 0; r < S::LPT; r++) {
        int e = (int) threadIdx.x + r * ATT_NT;
        int sel = e / (S::KT * S::CPR), rem = e % (S::KT * S::CPR);
        int row = rem / S::CPR, c = rem % S::CPR;

        if (row < nv && c * 8 < hd) {
            uint4 v = buf[r];

            if constexpr (sizeof(KV) == 1) {    /* e4m3 -> bf16, exact */
                float f[8];
                uint4 o;
                __nv_bfloat162 *o2 = reinterpret_cast<__nv_bfloat162 *>(&o);

                att_ld8<fp8>(reinterpret_cast<const fp8 *>(&v), f);
#pragma unroll
                for (int i = 0; i < 4; i++) {
                    o2[i] = __floats2bfloat162_rn(f[2 * i], f[2 * i + 1]);
                }
                v = o;
            }
            *reinterpret_cast<uint4 *>(&kv_s[sel][row][c * 8]) = v;
        }
    }
}


/*
 * The end of a decode block (both decode kernels), called by all ATT_NT
 * threads after a barrier: o_s[h] holds the block's unnormalised output
 * of q head g * grp + h (times the V scale), m_s[h] its maximum score
 * (natural-log units) and l_s[h] its sum of exp(score - m_s[h]) over the
 * block's keys.  One effective split (nse 1): the normalised bf16 output
 * is written.  Several: the block writes its record (m, l, acc) to `part`
 * (grid (T * n_kv, nsg): ATT_CNT_FLOATS unsigned counters, zero between
 * launches, then ATT_MAX_REC records of (m[grp], l[grp]), then ATT_MAX_REC
 * records of acc[grp][hd]; record of (pair, split) = pair * nsg + split),
 * counts itself on the pair's counter, and the last of the nse blocks
 * merges the records, writes the output and resets the counter.
 */
template <int G, int HDP>
__device__ __forceinline__ void
att_split_finish(float (*o_s)[HDP], const float *m_s, const float *l_s,
    float (*f_s)[G], float *li_s, int *last_sp, int nse, int pair, int split,
    int nsg, int t, int g, int grp, int hd, int n_heads, bf16 *out,
    float *part)
{
    constexpr int HPW = (G + 3) / 4;        /* heads per warp (merge) */
    constexpr int NW = ATT_NT / 32;
    const int     tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    const int     h8 = hd / 8, h4 = hd / 4;
    int          &last_s = *last_sp;

    if (nse == 1) {
        for (int i = tid; i < grp * h8; i += ATT_NT) {
            int            h = i / h8, d = (i % h8) * 8;
            float          inv = 1.0f / l_s[h];
            uint4          pk;
            __nv_bfloat162 *o2 = reinterpret_cast<__nv_bfloat162 *>(&pk);

#pragma unroll
            for (int e = 0; e < 4; e++) {
                o2[e] = __floats2bfloat162_rn(o_s[h][d + 2 * e] * inv,
                                              o_s[h][d + 2 * e + 1] * inv);
            }
            *reinterpret_cast<uint4 *>(
                out + ((size_t) t * n_heads + (size_t) g * grp + h) * hd + d)
                = pk;
        }
        return;
    }

    /* several splits: write this one's record, the last block merges */
    unsigned    *cnt = reinterpret_cast<unsigned *>(part);
    float       *mlb = part + ATT_CNT_FLOATS;
    float       *ob = mlb + (size_t) ATT_MAX_REC * 2 * grp;
    const size_t rec0 = (size_t) pair * nsg;
    const size_t rs = (size_t) grp * hd;

    for (int i = tid; i < grp; i += ATT_NT) {
        mlb[(rec0 + split) * 2 * grp + i] = m_s[i];
        mlb[(rec0 + split) * 2 * grp + grp + i] = l_s[i];
    }
    for (int i = tid; i < grp * h4; i += ATT_NT) {
        int h = i / h4, d = (i % h4) * 4;

        *reinterpret_cast<float4 *>(ob + (rec0 + split) * rs
                                    + (size_t) h * hd + d)
            = make_float4(o_s[h][d], o_s[h][d + 1], o_s[h][d + 2],
                          o_s[h][d + 3]);
    }
    __threadfence();                        /* record visible device-wide */
    __syncthreads();
    if (tid == 0) {
        unsigned prev = atomicAdd(&cnt[pair], 1u);
        int      last = prev == (unsigned) (nse - 1);

        if (last) {
            atomicExch(&cnt[pair], 0u);     /* ready for the next launch */
        }
        last_s = last;
    }
    __syncthreads();
    if (!last_s) {
        return;
    }
    __threadfence();

    /* merge the nse records (L2 reads: other blocks wrote them) */
#pragma unroll
    for (int hh = 0; hh < HPW; hh++) {
        int h = warp + NW * hh;

        if (h < grp) {
            float M = -INFINITY, L = 0.0f;

            for (int s = lane; s < nse; s += 32) {
                M = fmaxf(M, __ldcg(mlb + (rec0 + s) * 2 * grp + h));
            }
            M = moe_warp_max(M);
            for (int s = lane; s < nse; s += 32) {
                const float *r = mlb + (rec0 + s) * 2 * grp;
                float        f = expf(__ldcg(r + h) - M);

                f_s[s][h] = f;
                L += f * __ldcg(r + grp + h);
            }
            L = moe_warp_sum(L);
            if (lane == 0) {
                li_s[h] = 1.0f / L;
            }
        }
    }
    __syncthreads();
    for (int i = tid; i < grp * h4; i += ATT_NT) {
        int          h = i / h4, d = (i % h4) * 4;
        const float *src = ob + rec0 * rs + (size_t) h * hd + d;
        float4       a = make_float4(0.0f, 0.0f, 0.0f, 0.0f);

#pragma unroll 8
        for (int s = 0; s < nse; s++) {
            float4 v = __ldcg(reinterpret_cast<const float4 *>(src + s * rs));
            float  f = f_s[s][h];

            a.x += f * v.x;
            a.y += f * v.y;
            a.z += f * v.z;
            a.w += f * v.w;
        }

        float          inv = li_s[h];
        uint2          pk;
        __nv_bfloat162 *o2 = reinterpret_cast<__nv_bfloat162 *>(&pk);

        o2[0] = __floats2bfloat162_rn(a.x * inv, a.y * inv);
        o2[1] = __floats2bfloat162_rn(a.z * inv, a.w * inv);
        *reinterpret_cast<uint2 *>(
            out + ((size_t) t * n_heads + (size_t) g * grp + h) * hd + d) = pk;
    }
}


/*
 * grid (T * n_kv, nsg), ATT_NT threads.  Workspace `part` (when nsg > 1):
 * ATT_CNT_FLOATS unsigned counters (zero between launches), then
 * ATT_MAX_REC records of (m[grp], l[grp]), then ATT_MAX_REC records of
 * acc[grp][hd]; record of (pair, split) = pair * nsg + split.
 */
template <int G, int HDP, typename KV>
__global__ void __launch_bounds__(ATT_NT)
kernel_attention_decode_split(const float *qkv, int ld, const int32_t *tok_pos,
    const int32_t *tok_seq, const int32_t *bt, const int32_t *bt_off,
    const KV *kv_layer, int block_size, int n_heads, int n_kv, int hd,
    int window, bf16 *out, float *part, float ksc, float vsc, int tc)
{
    moe_pdl_enter();
    typedef att_shape<HDP> S;
    constexpr int KT = S::KT, CPR = S::CPR, KG = S::KG;
    constexpr int HPW = (G + 3) / 4;        /* heads per warp (softmax) */
    constexpr int NW = ATT_NT / 32;

    __shared__ __align__(16) bf16  kv_s[2][KT][S::ROW];
    __shared__ __align__(16) float q_s[G][HDP];
    __shared__ __align__(16) float o_s[G][HDP];
    __shared__ float s_s[G][KT];            /* scores, then probabilities */
    __shared__ float c_s[G];                /* this tile's rescale */
    __shared__ float m_s[G], l_s[G];        /* the block's final state */
    __shared__ float f_s[ATT_MAX_SPLIT][G]; /* merge weights */
    __shared__ float li_s[G];
    __shared__ int   last_s;

    const int pair = blockIdx.x, split = blockIdx.y, nsg = gridDim.y;
    const int t = pair / n_kv, g = pair % n_kv;
    const int grp = n_heads / n_kv, kvd = n_kv * hd;
    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    const int p = tok_pos[t];
    const int j0 = window > 0 && p - window + 1 > 0 ? p - window + 1 : 0;
    const int nkeys = p - j0 + 1;

    /* effective splits: whole tiles each, at most nsg */
    int per = (nkeys + nsg - 1) / nsg;

    per = (per + KT - 1) / KT * KT;

    const int nse = (nkeys + per - 1) / per;

    if (split >= nse) {
        return;                             /* whole block: no barrier */
    }

    const int      ks = j0 + split * per;
    const int      ke = min(ks + per, p + 1);
    const int32_t *table = bt + bt_off[tok_seq[t]];
    const KV      *kvg = kv_layer + (size_t) g * hd;
    const float    scale = ksc / sqrtf((float) hd);
    uint4          buf[S::LPT];

#pragma unroll
    for (int r = 0; r < S::LPT; r++) {
        buf[r] = make_uint4(0u, 0u, 0u, 0u);
    }
    (void) tc;
    att_load_tile<HDP, KV>(buf, kvg, table, block_size, kvd, hd, ks,
                       min(KT, ke - ks));
    {
        const float *qrow = qkv + (size_t) t * ld + (size_t) g * grp * hd;
        int          q4 = hd / 4;

        for (int i = tid; i < grp * q4; i += ATT_NT) {
            int    h = i / q4, d = (i % q4) * 4;
            float4 v = *reinterpret_cast<const float4 *>(
                           qrow + (size_t) h * hd + d);

            q_s[h][d] = v.x * scale;
            q_s[h][d + 1] = v.y * scale;
            q_s[h][d + 2] = v.z * scale;
            q_s[h][d + 3] = v.w * scale;
        }
    }

    const int  c = tid % CPR, kg = tid / CPR;
    const bool dval = c * 8 < hd;
    float      m_r[HPW], l_r[HPW], acc[G][8];

#pragma unroll
    for (int hh = 0; hh < HPW; hh++) {
        m_r[hh] = -INFINITY;
        l_r[hh] = 0.0f;
    }
#pragma unroll
    for (int h = 0; h < G; h++) {
#pragma unroll
        for (int e = 0; e < 8; e++) {
            acc[h][e] = 0.0f;
        }
    }

    for (int jt = ks; jt < ke; jt += KT) {
        int nv = min(KT, ke - jt);

        __syncthreads();                    /* last tile's readers done */
        att_store_tile<HDP, KV>(buf, kv_s, hd, nv);
        if (jt + KT < ke) {                 /* next tile in flight */
            att_load_tile<HDP, KV>(buf, kvg, table, block_size, kvd, hd,
                               jt + KT, min(KT, ke - jt - KT));
        }
        __syncthreads();

        /* scores: one (head, key) per thread and step */
        for (int i = tid; i < grp * KT; i += ATT_NT) {
            int   h = i / KT, j = i % KT;
            float s = -INFINITY;

            if (j < nv) {
                float a0 = 0.0f, a1 = 0.0f;

#pragma unroll
                for (int d = 0; d < HDP; d += 8) {
                    if (d < hd) {
                        uint4  raw = *reinterpret_cast<const uint4 *>(
                                         &kv_s[0][j][d]);
                        float4 qa = *reinterpret_cast<const float4 *>(
                                        &q_s[h][d]);
                        float4 qb = *reinterpret_cast<const float4 *>(
                                        &q_s[h][d + 4]);
                        const __nv_bfloat162 *k2 =
                            reinterpret_cast<const __nv_bfloat162 *>(&raw);
                        float2 k0 = __bfloat1622float2(k2[0]);
                        float2 k1 = __bfloat1622float2(k2[1]);
                        float2 k2f = __bfloat1622float2(k2[2]);
                        float2 k3 = __bfloat1622float2(k2[3]);

                        a0 += qa.x * k0.x + qa.y * k0.y + qa.z * k1.x
                              + qa.w * k1.y;
                        a1 += qb.x * k2f.x + qb.y * k2f.y + qb.z * k3.x
                              + qb.w * k3.y;
                    }
                }
                s = a0 + a1;
            }
            s_s[h][j] = s;
        }
        __syncthreads();

        /* online softmax, one warp per head */
#pragma unroll
        for (int hh = 0; hh < HPW; hh++) {
            int h = warp + NW * hh;

            if (h < grp) {
                float mx = -INFINITY, sum = 0.0f, mn, corr;

                for (int j = lane; j < KT; j += 32) {
                    mx = fmaxf(mx, s_s[h][j]);
                }
                mx = moe_warp_max(mx);      /* finite: nv >= 1 */
                mn = fmaxf(m_r[hh], mx);
                for (int j = lane; j < KT; j += 32) {
                    float e = expf(s_s[h][j] - mn);

                    s_s[h][j] = e;
                    sum += e;
                }
                sum = moe_warp_sum(sum);
                corr = expf(m_r[hh] - mn);
                l_r[hh] = l_r[hh] * corr + sum;
                m_r[hh] = mn;
                if (lane == 0) {
                    c_s[h] = corr;
                }
            }
        }
        __syncthreads();

        /* P.V: chunk c of the rows j = kg, kg + KG, ... */
#pragma unroll
        for (int h = 0; h < G; h++) {
            float cr = h < grp ? c_s[h] : 0.0f;

#pragma unroll
            for (int e = 0; e < 8; e++) {
                acc[h][e] *= cr;
            }
        }
        if (dval) {
#pragma unroll 2
            for (int j = kg; j < nv; j += KG) {
                uint4       raw = *reinterpret_cast<const uint4 *>(
                                      &kv_s[1][j][c * 8]);
                const bf16 *vb = reinterpret_cast<const bf16 *>(&raw);
                float       pj[G];

#pragma unroll
                for (int h = 0; h < G; h++) {
                    pj[h] = h < grp ? s_s[h][j] : 0.0f;
                }
#pragma unroll
                for (int e = 0; e < 8; e++) {
                    float vf = moe_bf2f(vb[e]);

#pragma unroll
                    for (int h = 0; h < G; h++) {
                        acc[h][e] += pj[h] * vf;
                    }
                }
            }
        }
    }

    /* the block's state: m, l per head; acc summed over the key groups
     * (times the V scale of an fp8 cache: linear, so the merge holds) */
#pragma unroll
    for (int h = 0; h < G; h++) {
#pragma unroll
        for (int e = 0; e < 8; e++) {
            acc[h][e] *= vsc;
        }
    }
#pragma unroll
    for (int hh = 0; hh < HPW; hh++) {
        int h = warp + NW * hh;

        if (h < grp && lane == 0) {
            m_s[h] = m_r[hh];
            l_s[h] = l_r[hh];
        }
    }
#pragma unroll
    for (int o = CPR; o < 32; o <<= 1) {
#pragma unroll
        for (int h = 0; h < G; h++) {
#pragma unroll
            for (int e = 0; e < 8; e++) {
                acc[h][e] += __shfl_xor_sync(0xffffffffu, acc[h][e], o);
            }
        }
    }
    for (int w = 0; w < NW; w++) {          /* fixed order: deterministic */
        if (warp == w && lane < CPR && dval) {
#pragma unroll
            for (int h = 0; h < G; h++) {
                if (h < grp) {
#pragma unroll
                    for (int e = 0; e < 8; e++) {
                        o_s[h][c * 8 + e] = (w > 0 ? o_s[h][c * 8 + e] : 0.0f)
                                            + acc[h][e];
                    }
                }
            }
        }
        __syncthreads();
    }

    att_split_finish<G, HDP>(o_s, m_s, l_s, f_s, li_s, &last_s, nse, pair,
                             split, nsg, t, g, grp, hd, n_heads, out, part);
}


/* ---------------------------------------- prefill: the tensor-core kernel */

__device__ __forceinline__ uint32_t
att_pack(float x, float y)
{
    __nv_bfloat162 v = __floats2bfloat162_rn(x, y);     /* x: low half */

    return *reinterpret_cast<uint32_t *>(&v);
}


/* A prefill row tile's per-row data, one thread per row (tid <
 * ATT_TC_BM): sequence, position and window start (-1, -1, 0 past T) into
 * shared memory; returns the tile's sequence runs (att_tc_runs, whose
 * barrier publishes the rows).  Every thread of the CTA calls it. */
__device__ __forceinline__ int
att_tc_tile_rows(const int32_t *tok_seq, const int32_t *tok_pos, int T,
    int tile, int window, int *seq_s, int *pos_s, int *lo_s)
{
    const int tid = (int) threadIdx.x, r0 = tile * ATT_TC_BM;

    if (tid < ATT_TC_BM) {
        int s = -1, p = -1, lo = 0;

        if (r0 + tid < T) {
            s = tok_seq[r0 + tid];
            p = tok_pos[r0 + tid];
            lo = window > 0 && p - window + 1 > 0 ? p - window + 1 : 0;
        }
        seq_s[tid] = s;
        pos_s[tid] = p;
        lo_s[tid] = lo;
    }
    return att_tc_runs(tok_seq, T, tile);
}


/* Q rows r0 .. r0 + ATT_TC_BM - 1 of head h (zero past nrows), scaled by
 * log2(e) / sqrt(HD), to bf16 rows of `row` elements in q_s; NT threads. */
template <int HD, int NT>
__device__ __forceinline__ void
att_tc_load_q(const float *qkv, int ld, int r0, int nrows, int h, int row,
    bf16 *q_s)
{
    const float qs = 1.4426950408889634f * rsqrtf((float) HD);

    for (int i = (int) threadIdx.x; i < ATT_TC_BM * (HD / 4); i += NT) {
        int    rw = i / (HD / 4), d = (i % (HD / 4)) * 4;
        float4 v = make_float4(0.0f, 0.0f, 0.0f, 0.0f);

        if (rw < nrows) {
            v = *reinterpret_cast<const float4 *>(
                    qkv + (size_t) (r0 + rw) * ld + (size_t) h * HD + d);
        }
        uint2 pk = make_uint2(att_pack(v.x * qs, v.y * qs),
                              att_pack(v.z * qs, v.w * qs));

        *reinterpret_cast<uint2 *>(q_s + rw * row + d) = pk;
    }
}


#define ATT_TC_NT      128          /* threads per CTA */
#define ATT_TC_WM      32           /* rows per warp (two m16 tiles) */

static_assert((ATT_TC_NT / 32) * ATT_TC_WM == ATT_TC_BM, "tc row split");
static_assert(ATT_TC_NT >= ATT_TC_BM, "att_tc_runs: a thread a row");


/* Dynamic shared memory of kernel_attention_prefill_tc<HD, BN, *, STAGES,
 * *>: Q, then STAGES x (K, V). */
static constexpr size_t
att_tc_smem(int hd, int bn, int stages)
{
    return (size_t) (ATT_TC_BM + 2 * stages * bn) * (hd + 8) * sizeof(bf16);
}


/*
 * FA2-style (H200, bench/dev/attention, 2048-token causal prefill, 32 / 8
 * heads, head dim 128: 194 us against 292 us for the previous 8-warp
 * kernel of 16 rows per warp, which now lives in the dev harness).  CTA =
 * ATT_TC_BM consecutive tokens (rows) x one q head; the last row tile
 * goes first (the longest causal ranges).  4 warps of 32 rows, so each K
 * and V fragment (ldmatrix) feeds 4 mma.sync instead of 2, and two CTAs
 * per SM.  The rows are handled one run of equal tok_seq at a time; a
 * tile with more than ATT_TC_RUNS runs is left to the SIMT kernel
 * (launched after this one with its skip test).  Per run: keys [min lo,
 * max pos] of its rows, gathered through the block table, masked per row
 * to [lo, pos] (window and causal limit), online softmax in base 2.
 *
 * grid (n_heads, ceil(T / ATT_TC_BM)), ATT_TC_NT threads,
 * att_tc_smem(HD, BN, STAGES) bytes of dynamic shared memory.  Lane
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
__global__ void __launch_bounds__(ATT_TC_NT, MINB)
kernel_attention_prefill_tc(const float *qkv, int ld, int T,
    const int32_t *tok_pos, const int32_t *tok_seq, const int32_t *bt,
    const int32_t *bt_off, const bf16 *kv_layer, int block_size, int n_heads,
    int n_kv, int window, bf16 *out)
{
    moe_pdl_enter();
    constexpr int BM = ATT_TC_BM, NT = ATT_TC_NT, WM = ATT_TC_WM;
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

    extern __shared__ __align__(16) unsigned char att_tc_sm[];
    bf16 *q_s = reinterpret_cast<bf16 *>(att_tc_sm);    /* [BM][ROW] */
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

    if (att_tc_tile_rows(tok_seq, tok_pos, T, tile, window, seq_s, pos_s,
                         lo_s) > ATT_TC_RUNS)
    {
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
            att_tc_load_q<HD, NT>(qkv, ld, r0, nrows, h, ROW, q_s);
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


#include "attention_wg.cuh"


/* ------------------------------ decode: the tensor-core key-split kernel */

/*
 * Shared-memory tile of kernel_attention_decode_tc<HD, KV>, per warp: NST
 * stages of ATT_DTC_KT keys, K rows then V rows, as the cache holds them
 * (bf16, or e4m3 bytes).  Row strides (bytes) keep each access pattern
 * free of bank conflicts: bf16 rows HD + 8 elements (ldmatrix, as in the
 * prefill kernel); e4m3 K rows at 64 mod 128 bytes (lanes 4 g + q read 16
 * bytes at row g, chunk q), e4m3 V rows at 16 mod 64 (lanes read rows 2q,
 * 2q + 1 at byte HD / 8 * g).
 */
template <int HD, typename KV>
struct att_dtc_shape {
    static constexpr bool F8 = sizeof(KV) == 1;
    static constexpr int  KROW = F8 ? (HD % 128 == 0 ? HD + 64 : HD)
                                    : 2 * HD + 16;
    static constexpr int  VROW = F8 ? HD + 16 : 2 * HD + 16;
    static constexpr int  NST = F8 ? 4 : 3;                 /* stages */
    static constexpr int  STAGE = ATT_DTC_KT * (KROW + VROW);
    static constexpr int  WARP = NST * STAGE;               /* bytes */
    static constexpr int  SMEM = ATT_DTC_NW * WARP;
    static constexpr int  CPR = HD * (F8 ? 1 : 2) / 16;     /* 16 B / row */
    static constexpr int  LPT = 2 * ATT_DTC_KT * CPR / 32;  /* per lane */
    static_assert(LPT * 32 == 2 * ATT_DTC_KT * CPR, "tile load split");
    static_assert(WARP >= (2 * 8 + 8 * HD) * 4, "warp state fits a tile");
};


/* Two e4m3 (the low 16 bits of v) to an f16 pair, exact (one cvt). */
__device__ __forceinline__ uint32_t
att_e4m3x2_f16x2(uint32_t v)
{
    __half2_raw r = __nv_cvt_fp8x2_to_halfraw2(
                        (__nv_fp8x2_storage_t) (v & 0xffffu), __NV_E4M3);

    return (uint32_t) r.x | ((uint32_t) r.y << 16);
}


/*
 * x, y as a pair of the mma operand type (f16 for an e4m3 cache, bf16
 * otherwise; x the low half) and the pair of what that rounding left
 * (x - hi, y - hi): hi + lo carries about twice the operand's mantissa.
 */
template <bool F8>
__device__ __forceinline__ void
att_hilo(float x, float y, uint32_t &hi, uint32_t &lo)
{
    if constexpr (F8) {
        __half2 h = __floats2half2_rn(x, y);
        float2  f = __half22float2(h);
        __half2 r = __floats2half2_rn(x - f.x, y - f.y);

        hi = *reinterpret_cast<uint32_t *>(&h);
        lo = *reinterpret_cast<uint32_t *>(&r);
    } else {
        __nv_bfloat162 h = __floats2bfloat162_rn(x, y);
        float2         f = __bfloat1622float2(h);
        __nv_bfloat162 r = __floats2bfloat162_rn(x - f.x, y - f.y);

        hi = *reinterpret_cast<uint32_t *>(&h);
        lo = *reinterpret_cast<uint32_t *>(&r);
    }
}


template <bool F8>
__device__ __forceinline__ void
att_mma(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1)
{
    if constexpr (F8) {
        moe_mma_f16(c, a[0], a[1], a[2], a[3], b0, b1);
    } else {
        moe_mma_bf16(c, a[0], a[1], a[2], a[3], b0, b1);
    }
}


/*
 * Decode attention on tensor cores (head_dim 64 / 128): the same grid,
 * effective-split rule, workspace and last-block merge as
 * kernel_attention_decode_split (att_split_finish), so the launcher swaps
 * one for the other.  Block (token, kv head, split) of ATT_DTC_NW warps;
 * the split's keys are cut into ATT_DTC_NW contiguous ranges of whole
 * ATT_DTC_KT-key tiles, one per warp, and each warp runs its own NST-stage
 * cp.async pipeline (16-byte copies straight from the pages; rows past the
 * range zero-filled) and its own online softmax, synchronising with
 * __syncwarp only; the warps' states are merged in shared memory at the
 * end.  mma.sync m16n8k16, fp32 accumulate: the A rows are the group's G
 * q heads (rows g < G) and, in rows g + 8, what rounding them to the
 * operand type left (hi + lo: the padding rows make the products about
 * fp32-exact at no extra mma), keys are N for S = Q K^T and K for O = P V.
 * Scores in base 2 (log2 e / sqrt(hd) and the K scale folded into q).
 *   bf16 cache: bf16 operands; K via ldmatrix, V via ldmatrix.trans.
 *   e4m3 cache: f16 operands (e4m3 -> f16 is exact, one cvt per pair);
 *   q rows scaled by a power of two into f16 range (undone on the
 *   scores).  The dot product's d order is free, so lane 4 g + q reads K
 *   row g as whole 16-byte chunks q, q + 4, .. and q takes the matching
 *   d's; for P V lane g reads HD / 8 consecutive bytes of four V rows
 *   (keys 2q, 2q + 1, 2q + 8, 2q + 9), pairs the keys with byte permutes,
 *   and owns output columns d = HD / 8 * c + n (c: the C column, n: the
 *   8-wide tile).  The V scale goes on the output.
 */
template <int HD, typename KV>
__global__ void __launch_bounds__(ATT_NT, 2)
kernel_attention_decode_tc(const float *qkv, int ld, const int32_t *tok_pos,
    const int32_t *tok_seq, const int32_t *bt, const int32_t *bt_off,
    const KV *kv_layer, int block_size, int n_heads, int n_kv, int window,
    bf16 *out, float *part, float ksc, float vsc, int early)
{
    if (!early) {
        moe_pdl_enter();
    }
    typedef att_dtc_shape<HD, KV> S;
    constexpr bool F8 = S::F8;
    constexpr int  G = 8;                   /* q heads per block, at most */
    constexpr int  KT = ATT_DTC_KT, NW = ATT_DTC_NW, NST = S::NST;
    constexpr int  KS = HD / 16;            /* k steps of S = Q K^T */
    constexpr int  DN = HD / 8;             /* 8-wide d tiles of O */
    constexpr int  DPL = HD / 8;            /* e4m3 V bytes per lane */
    static_assert(NW * 32 == ATT_NT, "one block of ATT_NT threads");

    extern __shared__ __align__(128) unsigned char att_dtc_sm[];
    __shared__ __align__(16) float o_s[G][HD];
    __shared__ float m_s[G], l_s[G];
    __shared__ float f_s[ATT_MAX_SPLIT][G];
    __shared__ float li_s[G];
    __shared__ int   last_s;

    const int pair = blockIdx.x, split = blockIdx.y, nsg = gridDim.y;
    const int t = pair / n_kv, g = pair % n_kv;
    const int grp = n_heads / n_kv, kvd = n_kv * HD;
    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    const int gq = lane >> 2, tq = lane & 3;
    const int p = tok_pos[t];
    const int j0 = window > 0 && p - window + 1 > 0 ? p - window + 1 : 0;
    const int nkeys = p - j0 + 1;

    /* effective splits: whole tiles of every warp each, at most nsg */
    int per = (nkeys + nsg - 1) / nsg;

    per = (per + NW * KT - 1) / (NW * KT) * (NW * KT);

    const int nse = (nkeys + per - 1) / per;

    if (split >= nse) {
        return;                             /* whole block: no barrier */
    }

    const int ks = j0 + split * per;
    const int ke = min(ks + per, p + 1);
    const int pw = ((ke - ks + NW - 1) / NW + KT - 1) / KT * KT;
    const int wks = min(ks + warp * pw, ke), wke = min(wks + pw, ke);
    const int ntl = (wke - wks + KT - 1) / KT;
    const int32_t *table = bt + bt_off[tok_seq[t]];
    const KV      *kvg = kv_layer + (size_t) g * HD;
    unsigned char *wsm = att_dtc_sm + warp * S::WARP;

    /* cp.async of this warp's key tile i (K and V rows) into its stage;
     * mode 1: all but key p's rows, 2: key p's rows only (early) */
    auto load = [&](int i, int mode) {
        const int      jt = wks + i * KT;
        unsigned char *st = wsm + (i % NST) * S::STAGE;
        long long      ro = 0;              /* lane r < KT: key jt + r */

        if (lane < KT && jt + lane < wke) {
            int j = jt + lane;

            ro = ((long long) table[j / block_size] * 2 * block_size
                  + j % block_size) * kvd;
        }
#pragma unroll
        for (int c = 0; c < S::LPT; c++) {
            int       e = lane + c * 32;
            int       sel = e / (KT * S::CPR), rem = e % (KT * S::CPR);
            int       row = rem / S::CPR, ch = rem % S::CPR;
            long long r = __shfl_sync(0xffffffffu, ro, row);
            bool      ok = jt + row < wke;
            const KV *src = kvg;

            if (mode != 0 && (jt + row == p) != (mode == 2)) {
                continue;
            }
            if (ok) {
                src = kvg + r + (long long) sel * block_size * kvd
                      + ch * (16 / (int) sizeof(KV));
            }
            moe_cp_async16(reinterpret_cast<bf16 *>(
                               st + (sel ? KT * S::KROW + row * S::VROW
                                         : row * S::KROW) + ch * 16),
                           reinterpret_cast<const bf16 *>(src), ok ? 16 : 0);
        }
    };

#pragma unroll
    for (int i = 0; i < NST - 1; i++) {     /* the pipeline's first stages */
        if (i < ntl) {
            load(i, early ? 1 : 0);
        }
        moe_cp_async_commit();
    }
    if (early) {
        /* everything above read what earlier steps wrote (positions,
         * tables, keys before p); now the q rows and key p, which the
         * kernel before (rope) writes */
        moe_pdl_enter();
        if (p >= wks && p < wke && (p - wks) / KT < NST - 1) {
            load((p - wks) / KT, 2);
            moe_cp_async_commit();
            moe_cp_async_wait<0>();
            __syncwarp();
        }
    }

    /* q of head gq (rows gq and gq + 8: hi and lo) as A fragments */
    uint32_t qa[KS][4];
    float    sscale = 1.0f;
    {
        const float *qrow = qkv + (size_t) t * ld
                            + (size_t) (g * grp + gq) * HD;
        const bool   qv = gq < grp;
        float        x[KS][4], amax = 0.0f, qs;

#pragma unroll
        for (int k = 0; k < KS; k++) {
            float4 v = make_float4(0.0f, 0.0f, 0.0f, 0.0f);

            if constexpr (F8) {             /* d = 16 (4 (k / 4) + q) + .. */
                if (qv) {
                    v = *reinterpret_cast<const float4 *>(
                            qrow + 16 * (4 * (k / 4) + tq) + 4 * (k % 4));
                }
            } else if (qv) {                /* d = 16 k + 2 q (+1, +8, +9) */
                float2 a = *reinterpret_cast<const float2 *>(
                               qrow + 16 * k + 2 * tq);
                float2 b = *reinterpret_cast<const float2 *>(
                               qrow + 16 * k + 2 * tq + 8);

                v = make_float4(a.x, a.y, b.x, b.y);
            }
            x[k][0] = v.x;
            x[k][1] = v.y;
            x[k][2] = v.z;
            x[k][3] = v.w;
            amax = fmaxf(amax, fmaxf(fmaxf(fabsf(v.x), fabsf(v.y)),
                                     fmaxf(fabsf(v.z), fabsf(v.w))));
        }
        qs = ksc * 1.4426950408889634f * rsqrtf((float) HD);
        if constexpr (F8) {
            /* the row's largest |q qs| to [2^13, 2^14): f16 range */
            int e;

            amax = fmaxf(amax, __shfl_xor_sync(0xffffffffu, amax, 1));
            amax = fmaxf(amax, __shfl_xor_sync(0xffffffffu, amax, 2));
            amax *= qs;
            if (amax > 0.0f && amax < INFINITY) {
                frexpf(amax, &e);
                e = min(max(14 - e, -100), 100);
                qs = ldexpf(qs, e);
                sscale = ldexpf(1.0f, -e);
            }
        }
#pragma unroll
        for (int k = 0; k < KS; k++) {
            att_hilo<F8>(x[k][0] * qs, x[k][1] * qs, qa[k][0], qa[k][1]);
            att_hilo<F8>(x[k][2] * qs, x[k][3] * qs, qa[k][2], qa[k][3]);
        }
    }

    float o[DN][4], m = -INFINITY, l = 0.0f;

#pragma unroll
    for (int n = 0; n < DN; n++) {
#pragma unroll
        for (int e = 0; e < 4; e++) {
            o[n][e] = 0.0f;
        }
    }

    for (int i = 0; i < ntl; i++) {
        if (i + NST - 1 < ntl) {
            load(i + NST - 1, 0);
        }
        moe_cp_async_commit();
        moe_cp_async_wait<NST - 1>();       /* tile i has landed */
        __syncwarp();

        const unsigned char *kst = wsm + (i % NST) * S::STAGE;
        const unsigned char *vst = kst + KT * S::KROW;
        const int            nv = min(KT, wke - (wks + i * KT));
        float                s[2][4];

#pragma unroll
        for (int n = 0; n < 2; n++) {
#pragma unroll
            for (int e = 0; e < 4; e++) {
                s[n][e] = 0.0f;
            }
        }

        /* S = Q K^T: keys n * 8 + g of the tile are the columns */
        if constexpr (F8) {
#pragma unroll
            for (int mm = 0; mm < HD / 64; mm++) {
#pragma unroll
                for (int n = 0; n < 2; n++) {
                    uint4    w = *reinterpret_cast<const uint4 *>(
                                     kst + (n * 8 + gq) * S::KROW
                                     + 16 * (4 * mm + tq));
                    uint32_t wv[4] = { w.x, w.y, w.z, w.w };

#pragma unroll
                    for (int c = 0; c < 4; c++) {
                        att_mma<F8>(s[n], qa[4 * mm + c],
                                    att_e4m3x2_f16x2(wv[c]),
                                    att_e4m3x2_f16x2(wv[c] >> 16));
                    }
                }
            }
        } else {
            const bf16 *kb = reinterpret_cast<const bf16 *>(
                                 kst + ((lane & 7) + ((lane >> 4) << 3))
                                       * S::KROW)
                             + ((lane >> 3) & 1) * 8;

#pragma unroll
            for (int k = 0; k < KS; k++) {
                uint32_t b0, b1, b2, b3;

                moe_ldmatrix_x4(b0, b1, b2, b3, kb + k * 16);
                att_mma<F8>(s[0], qa[k], b0, b1);
                att_mma<F8>(s[1], qa[k], b2, b3);
            }
        }

        /* online softmax of row gq: hi + lo rows, masked past nv; the
         * four lanes of a row hold its 16 columns */
        float sc[2][2], mx = -INFINITY, mn, corr, sum = 0.0f;

#pragma unroll
        for (int n = 0; n < 2; n++) {
#pragma unroll
            for (int e = 0; e < 2; e++) {
                float v = (s[n][e] + s[n][e + 2]) * sscale;

                sc[n][e] = n * 8 + 2 * tq + e < nv ? v : -INFINITY;
                mx = fmaxf(mx, sc[n][e]);
            }
        }
        mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
        mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
        mn = fmaxf(m, mx);                  /* finite: nv >= 1 */
        corr = exp2f(m - mn);
        m = mn;
#pragma unroll
        for (int n = 0; n < 2; n++) {
#pragma unroll
            for (int e = 0; e < 2; e++) {
                sc[n][e] = exp2f(sc[n][e] - mn);
                sum += sc[n][e];
            }
        }
        l = l * corr + sum;
#pragma unroll
        for (int n = 0; n < DN; n++) {
#pragma unroll
            for (int e = 0; e < 4; e++) {
                o[n][e] *= corr;
            }
        }

        /* O += P V: P (hi rows g, lo rows g + 8) over the tile's keys */
        uint32_t pa[4];

        att_hilo<F8>(sc[0][0], sc[0][1], pa[0], pa[1]);
        att_hilo<F8>(sc[1][0], sc[1][1], pa[2], pa[3]);
        if constexpr (F8) {
            uint32_t w[4][DPL / 4];

#pragma unroll
            for (int r = 0; r < 4; r++) {   /* keys 2q, 2q+1, 2q+8, 2q+9 */
                const unsigned char *vr = vst + (2 * tq + (r & 1)
                                                 + 8 * (r >> 1)) * S::VROW
                                          + DPL * gq;

                if constexpr (DPL == 16) {
                    uint4 v = *reinterpret_cast<const uint4 *>(vr);

                    w[r][0] = v.x;
                    w[r][1] = v.y;
                    w[r][2] = v.z;
                    w[r][3] = v.w;
                } else {
                    uint2 v = *reinterpret_cast<const uint2 *>(vr);

                    w[r][0] = v.x;
                    w[r][1] = v.y;
                }
            }
#pragma unroll
            for (int x = 0; x < DPL / 4; x++) {
                /* bytes b of keys (2q, 2q+1) and (2q+8, 2q+9) paired */
                uint32_t a01 = __byte_perm(w[0][x], w[1][x], 0x5140);
                uint32_t c01 = __byte_perm(w[0][x], w[1][x], 0x7362);
                uint32_t a23 = __byte_perm(w[2][x], w[3][x], 0x5140);
                uint32_t c23 = __byte_perm(w[2][x], w[3][x], 0x7362);

                att_mma<F8>(o[4 * x], pa, att_e4m3x2_f16x2(a01),
                            att_e4m3x2_f16x2(a23));
                att_mma<F8>(o[4 * x + 1], pa, att_e4m3x2_f16x2(a01 >> 16),
                            att_e4m3x2_f16x2(a23 >> 16));
                att_mma<F8>(o[4 * x + 2], pa, att_e4m3x2_f16x2(c01),
                            att_e4m3x2_f16x2(c23));
                att_mma<F8>(o[4 * x + 3], pa, att_e4m3x2_f16x2(c01 >> 16),
                            att_e4m3x2_f16x2(c23 >> 16));
            }
        } else {
            const bf16 *vb = reinterpret_cast<const bf16 *>(
                                 vst + ((lane & 7) + ((lane >> 3) & 1) * 8)
                                       * S::VROW)
                             + (lane >> 4) * 8;

#pragma unroll
            for (int dp = 0; dp < DN / 2; dp++) {
                uint32_t b0, b1, b2, b3;

                moe_ldmatrix_x4_trans(b0, b1, b2, b3, vb + dp * 16);
                att_mma<F8>(o[2 * dp], pa, b0, b1);
                att_mma<F8>(o[2 * dp + 1], pa, b2, b3);
            }
        }
        __syncwarp();                       /* stage free for a new load */
    }
    moe_cp_async_wait<0>();
    __syncwarp();

    /* this warp's state into its own tile memory: m[8], l[8], o[8][HD] */
    {
        float *ws = reinterpret_cast<float *>(wsm);

        l += __shfl_xor_sync(0xffffffffu, l, 1);
        l += __shfl_xor_sync(0xffffffffu, l, 2);
        if (tq == 0) {
            ws[gq] = m;
            ws[8 + gq] = l;
        }
#pragma unroll
        for (int n = 0; n < DN; n++) {
#pragma unroll
            for (int e = 0; e < 2; e++) {
                int d = F8 ? DPL * (2 * tq + e) + n : n * 8 + 2 * tq + e;

                ws[16 + gq * HD + d] = o[n][e] + o[n][e + 2];
            }
        }
    }
    __syncthreads();

    /* merge the warps (base 2), then the splits (att_split_finish) */
    for (int i = tid; i < grp * HD; i += ATT_NT) {
        int   h = i / HD, d = i % HD;
        float M = -INFINITY, L = 0.0f, acc = 0.0f;

        for (int w = 0; w < NW; w++) {
            M = fmaxf(M, reinterpret_cast<const float *>(
                             att_dtc_sm + w * S::WARP)[h]);
        }
        for (int w = 0; w < NW; w++) {
            const float *ws = reinterpret_cast<const float *>(
                                  att_dtc_sm + w * S::WARP);

            if (ws[h] != -INFINITY) {       /* a warp without keys */
                float f = exp2f(ws[h] - M);

                L += ws[8 + h] * f;
                acc += ws[16 + h * HD + d] * f;
            }
        }
        o_s[h][d] = acc * vsc;
        if (d == 0) {
            m_s[h] = M * 0.6931471805599453f;   /* natural-log units */
            l_s[h] = L;
        }
    }
    __syncthreads();
    att_split_finish<G, HD>(o_s, m_s, l_s, f_s, li_s, &last_s, nse, pair,
                            split, nsg, t, g, grp, HD, n_heads, out, part);
}


/* Raise the dynamic shared-memory limit of the four decode tensor-core
 * kernels on the current device (once per device; ws_init calls it before
 * any graph capture). */
static int
att_dtc_prepare(void)
{
    static int ready[64];
    int        dev = 0;

    MOE_CUDA_CHECK(cudaGetDevice(&dev));
    if (dev >= 0 && dev < 64 && ready[dev]) {
        return MOE_K_OK;
    }
#define ATT_DTC_ATTR(H, KV)                                                   \
    MOE_CUDA_CHECK(cudaFuncSetAttribute(kernel_attention_decode_tc<H, KV>,    \
        cudaFuncAttributeMaxDynamicSharedMemorySize,                          \
        att_dtc_shape<H, KV>::SMEM))
    ATT_DTC_ATTR(64, bf16);
    ATT_DTC_ATTR(128, bf16);
    ATT_DTC_ATTR(64, fp8);
    ATT_DTC_ATTR(128, fp8);
#undef ATT_DTC_ATTR
    if (dev >= 0 && dev < 64) {
        ready[dev] = 1;
    }
    return MOE_K_OK;
}


extern "C" int
moe_cuda_attention_supported(int n_heads, int n_kv, int hd)
{
    return n_kv > 0 && n_heads % n_kv == 0 && n_heads / n_kv <= 8
           && hd > 0 && hd % 8 == 0 && hd <= 256;
}


extern "C" int64_t
moe_cuda_attention_ws_floats(int n_heads, int n_kv, int hd)
{
    if (n_kv <= 0) {
        return 0;
    }
    /* counters, then 2 + hd floats per head per split record */
    return (int64_t) ATT_CNT_FLOATS
           + (int64_t) ATT_MAX_REC * (n_heads / n_kv) * (hd + 2);
}


extern "C" int
moe_cuda_attention_ws_init(float *part, cudaStream_t stream)
{
    MOE_CUDA_CHECK(cudaMemsetAsync(part, 0, ATT_CNT_FLOATS * sizeof(float),
                                   stream));
    return att_dtc_prepare();
}


/* Launch kernel_attention_prefill_tc<HD, BN, BC, STAGES, MINB> (raising
 * its shared-memory limit and carveout once); att_tc_launch is the shipped
 * instance, bench/dev/attention times the others. */
template <int HD, int BN, int BC, int STAGES, int MINB>
static int
att_tc_launch_v(int T, const float *qkv, int ld, const int32_t *tok_pos,
    const int32_t *tok_seq, const int32_t *bt, const int32_t *bt_off,
    const bf16 *kv, int block_size, int n_heads, int n_kv, int window,
    bf16 *out, cudaStream_t stream)
{
    static int   ready = 0;
    const size_t sm = att_tc_smem(HD, BN, STAGES);
    dim3         grid((unsigned) n_heads,
                      (unsigned) ((T + ATT_TC_BM - 1) / ATT_TC_BM));

    if (!ready) {
        MOE_CUDA_CHECK(moe_smem_max_carveout(
            kernel_attention_prefill_tc<HD, BN, BC, STAGES, MINB>, sm));
        ready = 1;
    }
    MOE_CUDA_CHECK(moe_launch(
        kernel_attention_prefill_tc<HD, BN, BC, STAGES, MINB>, grid,
        ATT_TC_NT, sm, stream, qkv, ld, T, tok_pos, tok_seq, bt, bt_off, kv,
        block_size, n_heads, n_kv, window, out));
    return MOE_K_OK;
}


template <int HD>
static int
att_tc_launch(int T, const float *qkv, int ld, const int32_t *tok_pos,
    const int32_t *tok_seq, const int32_t *bt, const int32_t *bt_off,
    const bf16 *kv, int block_size, int n_heads, int n_kv, int window,
    bf16 *out, cudaStream_t stream)
{
    return att_tc_launch_v<HD, ATT_TC_BN, ATT_TC_BC, ATT_TC_STAGES,
                           ATT_TC_MINB>(T, qkv, ld, tok_pos, tok_seq, bt,
                                        bt_off, kv, block_size, n_heads,
                                        n_kv, window, out, stream);
}


/* Launch kernel_attention_decode_tc<HD, KV> on the decode kernel's grid. */
template <int HD, typename KV>
static int
att_dtc_launch(dim3 grid, cudaStream_t stream, const float *qkv, int ld,
    const int32_t *tok_pos, const int32_t *tok_seq, const int32_t *bt,
    const int32_t *bt_off, const KV *kv, int block_size, int n_heads,
    int n_kv, int window, bf16 *out, float *part, float ksc, float vsc,
    int early)
{
    MOE_TRY(att_dtc_prepare());
    MOE_CUDA_CHECK(moe_launch(kernel_attention_decode_tc<HD, KV>, grid, ATT_NT,
        att_dtc_shape<HD, KV>::SMEM, stream, qkv, ld, tok_pos, tok_seq, bt,
        bt_off, kv, block_size, n_heads, n_kv, window, out, part, ksc, vsc,
        early));
    return MOE_K_OK;
}


/*
 * Grid splits of the decode kernel for `pairs` (token, kv head) pairs:
 * enough blocks for bps per SM (the record's att_split_bps); a function of
 * the pair count only (graph-safe).  The kernel uses fewer when a token's
 * context is short.  tc: the tensor-core kernel runs.
 */
static int
att_split_count(int pairs, int bps, int tc)
{
    int want = bps * moe_sm_count(), ns;

    if (pairs >= want) {
        /* SIMT kernel, 1-2 blocks per SM (mixtral b64: 512 pairs, 3
         * resident per SM, 1.3 waves): 3 splits gave 3.75 ms of
         * attention per step against 4.39 unsplit and 3.92 with 2 (run
         * 4); from 4 per SM (b128) one split is best again (6.65 vs 7.41
         * ms with 2).  The tensor-core kernel: one split (mixtral b64,
         * context 700: 57.8 us against 81.9 with 3; H200, bench/dev/
         * attention, 2026-12-02) */
        if (tc) {
            return 1;
        }
        return pairs <= 2 * want && 3 * pairs <= ATT_MAX_REC ? 3 : 1;
    }
    ns = (want + pairs - 1) / pairs;
    if (ns > ATT_MAX_SPLIT) {
        ns = ATT_MAX_SPLIT;
    }
    if (ns * pairs > ATT_MAX_REC) {
        ns = ATT_MAX_REC / pairs;
    }
    return ns < 1 ? 1 : ns;
}


/* Launch the decode kernel (split) or the SIMT prefill kernel for G. */
template <int G, typename KV>
static void
att_launch_g(int split, int tc, int hdp, dim3 grid, cudaStream_t stream,
    const float *qkv, int ld, const int32_t *tok_pos, const int32_t *tok_seq,
    const int32_t *bt, const int32_t *bt_off, const KV *kv,
    int block_size, int n_heads, int n_kv, int hd, int window, bf16 *out,
    float *part, float ksc, float vsc)
{
#define ATT_ARGS qkv, ld, tok_pos, tok_seq, bt, bt_off, kv, block_size,       \
                 n_heads, n_kv, hd, window, out, part, ksc, vsc, tc
#define ATT_L(H)                                                              \
    do {                                                                      \
        if (split) {                                                          \
            (void) moe_launch(kernel_attention_decode_split<G, H, KV>, grid,  \
                              ATT_NT, 0, stream, ATT_ARGS);                   \
        } else {                                                              \
            (void) moe_launch(kernel_attention_prefill_simt<G, H, KV>, grid,  \
                              ATT_WARPS * 32, 0, stream, ATT_ARGS);           \
        }                                                                     \
    } while (0)
    switch (hdp) {
    case 8:   ATT_L(8);   break;
    case 16:  ATT_L(16);  break;
    case 32:  ATT_L(32);  break;
    case 64:  ATT_L(64);  break;
    case 128: ATT_L(128); break;
    default:  ATT_L(256); break;
    }
#undef ATT_L
#undef ATT_ARGS
}


/*
 * The shared body of the launchers: kv is the bf16 or the e4m3 cache
 * (KV); the tensor-core prefill kernel reads bf16 only, so an fp8 cache
 * takes the SIMT kernel for the whole prefill.
 */
template <typename KV>
static int
att_run(const float *qkv, int ld, int T, const int32_t *tok_pos,
    const int32_t *tok_seq, const int32_t *bt, const int32_t *bt_off,
    const KV *kv, int block_size, int n_heads, int n_kv, int hd, int window,
    bf16 *o, float *part, float ksc, float vsc, int max_ctx, int tc_whole,
    const moe_cuda_tuning_t *tune, cudaStream_t stream)
{
    static const moe_cuda_tuning_t defaults = MOE_CUDA_TUNING_DEFAULTS;
    float      *p4 = part != NULL ? part + ATT_CNT_FLOATS : NULL;
    int         grp, hdp, ns = 1, split, tc = 0, bps;
    int64_t     pairs;
    dim3        grid;

    if (T <= 0) {
        return MOE_K_OK;
    }
    if (!moe_cuda_attention_supported(n_heads, n_kv, hd)) {
        moe_cuda_set_error("attention: unsupported shape (heads %d, kv heads "
                           "%d, head_dim %d)", n_heads, n_kv, hd);
        return MOE_K_EUNSUPPORTED;
    }
    if (tune == NULL) {
        tune = &defaults;
    }
    grp = n_heads / n_kv;
    for (hdp = 8; hdp < hd; hdp *= 2) {
    }
    pairs = (int64_t) T * n_kv;
    split = pairs <= ATT_MAX_PAIRS;
    if (split && part != NULL) {
        /* long contexts (the caller's bound on this step's context
         * lengths): the record's att_long_bps blocks per SM instead of
         * att_split_bps (kernels/TUNING.md) */
        bps = max_ctx > 0 && tune->att_long_ctx > 0
              && max_ctx >= tune->att_long_ctx && tune->att_long_bps > 0
              ? tune->att_long_bps : tune->att_split_bps;
        ns = att_split_count((int) pairs, bps > 0 ? bps : 1,
                             tune->att_decode_tc && (hd == 64 || hd == 128));
    }
    /* decode (the key-split path): tensor cores for head dims 64 / 128
     * unless the record says otherwise; the SIMT decode kernel for the
     * rest (same grid, workspace and result up to rounding) */
    if (split && tune->att_decode_tc && (hd == 64 || hd == 128)) {
        /* one token (att_early): the keys before its position are
         * earlier steps' (the step's only rope writes key p), so the
         * kernel reads them before its PDL wait */
        int early = tune->att_early && T == 1;

        grid = dim3((unsigned) pairs, (unsigned) ns);
        return hd == 64
               ? att_dtc_launch<64, KV>(grid, stream, qkv, ld, tok_pos,
                                        tok_seq, bt, bt_off, kv, block_size,
                                        n_heads, n_kv, window, o, part, ksc,
                                        vsc, early)
               : att_dtc_launch<128, KV>(grid, stream, qkv, ld, tok_pos,
                                         tok_seq, bt, bt_off, kv, block_size,
                                         n_heads, n_kv, window, o, part,
                                         ksc, vsc, early);
    }
    /* prefill: tensor cores for the row tiles of few sequences, then the
     * SIMT kernel for the tokens of the tiles it refused (if any) */
    if constexpr (sizeof(KV) == 1) {
        /* an e4m3 cache: the warpgroup kernel on f16 operands when the
         * record asks for it (att_prefill_wg8: not yet measured, 0 by
         * default), then the SIMT kernel for the tiles it refused */
        if (!split && T >= ATT_TC_MIN_T && (hd == 64 || hd == 128)
            && tune->att_prefill_wg8)
        {
            int rc = hd == 64
                     ? att_wg8_launch<64>(T, qkv, ld, tok_pos, tok_seq, bt,
                                          bt_off, kv, block_size, n_heads,
                                          n_kv, window, ksc, vsc, o, stream)
                     : att_wg8_launch<128>(T, qkv, ld, tok_pos, tok_seq, bt,
                                           bt_off, kv, block_size, n_heads,
                                           n_kv, window, ksc, vsc, o,
                                           stream);

            if (rc != MOE_K_OK) {
                return rc;
            }
            tc = 1;
        }
    }
    if constexpr (sizeof(KV) == 2) {
        if (!split && T >= ATT_TC_MIN_T && (hd == 64 || hd == 128)) {
            int rc = tune->att_prefill_wg
                     ? (hd == 64
                        ? att_wg_launch<64>(T, qkv, ld, tok_pos, tok_seq, bt,
                                            bt_off, kv, block_size, n_heads,
                                            n_kv, window, o, stream)
                        : att_wg_launch<128>(T, qkv, ld, tok_pos, tok_seq,
                                             bt, bt_off, kv, block_size,
                                             n_heads, n_kv, window, o,
                                             stream))
                     : hd == 64
                     ? att_tc_launch<64>(T, qkv, ld, tok_pos, tok_seq, bt,
                                         bt_off, kv, block_size, n_heads,
                                         n_kv, window, o, stream)
                     : att_tc_launch<128>(T, qkv, ld, tok_pos, tok_seq, bt,
                                          bt_off, kv, block_size, n_heads,
                                          n_kv, window, o, stream);

            if (rc != MOE_K_OK) {
                return rc;
            }
            tc = 1;
            if (tc_whole) {
                /* the caller checked the step's runs on the host: the
                 * SIMT pass would find no refused tile (its 16 blocks
                 * per token only to exit: 0.02 ms per layer at 2048
                 * tokens) */
                return MOE_K_OK;
            }
        }
    }
    grid = dim3((unsigned) pairs, (unsigned) ns);
#define ATT_G(G) att_launch_g<G, KV>(split, tc, hdp, grid, stream, qkv, ld,  \
                                     tok_pos, tok_seq, bt, bt_off, kv,        \
                                     block_size, n_heads, n_kv, hd, window,   \
                                     o, split ? part : p4, ksc, vsc)
    if (grp == 1) {
        ATT_G(1);
    } else if (grp == 2) {
        ATT_G(2);
    } else if (grp <= 4) {
        ATT_G(4);
    } else {
        ATT_G(8);
    }
#undef ATT_G
    MOE_CUDA_CHECK_LAUNCH(split ? "kernel_attention_decode_split"
                                : "kernel_attention_prefill_simt");
    return MOE_K_OK;
}


extern "C" int
moe_cuda_attention(const float *qkv, int ld, int T, const int32_t *tok_pos,
    const int32_t *tok_seq, const int32_t *bt, const int32_t *bt_off,
    const moe_bf16_t *kv_layer, int block_size, int n_heads, int n_kv,
    int hd, int window, moe_bf16_t *out, float *part,
    const moe_cuda_tuning_t *tune, cudaStream_t stream)
{
    return att_run<bf16>(qkv, ld, T, tok_pos, tok_seq, bt, bt_off,
                         reinterpret_cast<const bf16 *>(kv_layer),
                         block_size, n_heads, n_kv, hd, window,
                         reinterpret_cast<bf16 *>(out), part, 1.0f, 1.0f, 0,
                         0, tune, stream);
}


extern "C" int
moe_cuda_attention_ex(const float *qkv, int ld, int T,
    const int32_t *tok_pos, const int32_t *tok_seq, const int32_t *bt,
    const int32_t *bt_off, const void *kv_layer, int block_size,
    int n_heads, int n_kv, int hd, int window, moe_bf16_t *out, float *part,
    const moe_cuda_att_kv_t *kvo, const moe_cuda_tuning_t *tune,
    cudaStream_t stream)
{
    bf16 *o = reinterpret_cast<bf16 *>(out);
    int   max_ctx = kvo != NULL ? kvo->max_ctx : 0;
    int   whole = kvo != NULL ? kvo->tc_whole != 0 : 0;

    if (kvo != NULL && kvo->fp8) {
        if (!(kvo->k_scale > 0.0f) || !(kvo->v_scale > 0.0f)) {
            moe_cuda_set_error("attention: fp8 KV scales must be > 0 "
                               "(k %g, v %g)", (double) kvo->k_scale,
                               (double) kvo->v_scale);
            return MOE_K_EINVAL;
        }
        return att_run<fp8>(qkv, ld, T, tok_pos, tok_seq, bt, bt_off,
                            reinterpret_cast<const fp8 *>(kv_layer),
                            block_size, n_heads, n_kv, hd, window, o, part,
                            kvo->k_scale, kvo->v_scale, max_ctx, 0, tune,
                            stream);
    }
    return att_run<bf16>(qkv, ld, T, tok_pos, tok_seq, bt, bt_off,
                         reinterpret_cast<const bf16 *>(kv_layer),
                         block_size, n_heads, n_kv, hd, window, o, part,
                         1.0f, 1.0f, max_ctx, whole, tune, stream);
}


extern "C" int
moe_cuda_attention_tc_whole(const int32_t *tok_seq, int T, int hd)
{
    if (tok_seq == NULL || T < ATT_TC_MIN_T || (hd != 64 && hd != 128)) {
        return 0;
    }
    for (int r0 = 0; r0 < T; r0 += ATT_TC_BM) {
        int runs = 1, end = r0 + ATT_TC_BM < T ? r0 + ATT_TC_BM : T;

        for (int r = r0 + 1; r < end; r++) {
            runs += tok_seq[r] != tok_seq[r - 1];
        }
        if (runs > ATT_TC_RUNS) {
            return 0;
        }
    }
    return 1;
}
