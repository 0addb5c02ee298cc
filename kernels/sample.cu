/*
 * Token sampling on the device, one block of 1024 threads per row, with the
 * host sampler's semantics (moe_sample_u, engine/sampling/sampling.c):
 *
 *   1. penalties on the listed ids (the host's float operations, rounded
 *      the same way: no contraction into FMAs);
 *   2. block argmax (greedy: done; else the max for the weights);
 *   3. top-k: radix select over order-preserving 32-bit keys of the logits
 *      (3 levels of 11/11/10 bits, bucket counts in shared memory), then
 *      the ties at the threshold cut by id (the first r ids);
 *   4. top-p: the same select with bucket weights (inside top-k), then the
 *      tie count at the threshold from the tie weight;
 *   5. min-p per element, then the draw in id order: the kept weights
 *      summed per warp over contiguous id segments, a block prefix sum
 *      finds the segment holding u * total, a second one over that
 *      segment (a few ids per thread) the thread, which walks its ids.
 *      The tie cuts of 3 and 4 (the r-th tie in id order) work the same.
 *
 * Weights w = expf((l - max) / T) (fp32, as the host) enter every sum as
 * fixed point round(w * 2^40) in 64-bit integers: exact, associative, so
 * the result does not depend on the order of the atomics or the scan
 * (deterministic), and within ~1e-7 of the host's double sums.  The row is
 * read again from global memory (L1/L2) by every pass, SM_UNROLL loads in
 * flight per thread; ~10 passes for top-k + top-p + min-p.
 */
#include <limits.h>
#include <math.h>

#include "common.cuh"
#include "sample.h"

#define SM_THREADS  1024
#define SM_WARPS    (SM_THREADS / 32)
#define SM_BINS     2048
#define SM_FULL     0xffffffffu
#define SM_NONE     0xffffffffu         /* no bucket */
#define SM_QSCALE   1099511627776.0f    /* 2^40 */
#define SM_UNROLL   8                   /* loads in flight per thread */

typedef unsigned long long sm_u64;

typedef struct {
    sm_u64    mass[SM_BINS];    /* bucket weights (fixed point) */
    uint32_t  cnt[SM_BINS];     /* bucket counts */
    sm_u64    scan[SM_WARPS];
    float     bv[SM_WARPS];
    int       bi[SM_WARPS];
    sm_u64    sel_lo;
    int       sel_bin;
    int       pick;
    int       maxid;
} sm_smem_t;

/* a prefix of the (key desc, id asc) order: keys above key, and key
 * itself for ids <= id */
typedef struct {
    uint32_t  key;
    int       id;
    int       on;
} sm_cut_t;

typedef struct {
    const float  *row;
    int           n;        /* ids considered */
    float         mx;       /* largest logit */
    float         t;        /* temperature */
} sm_row_t;


/* larger float -> larger key; -0 and +0 are one key (they compare equal) */
__device__ __forceinline__ uint32_t
sm_key(float v)
{
    uint32_t  b = __float_as_uint(v);

    if ((b << 1) == 0) {
        b = 0;
    }
    return (b & 0x80000000u) ? ~b : (b | 0x80000000u);
}


/* the host's expf((l - mx) / T), each operation rounded as on the host */
__device__ __forceinline__ float
sm_weight(float v, float mx, float t)
{
    return expf(__fdiv_rn(__fsub_rn(v, mx), t));
}


__device__ __forceinline__ sm_u64
sm_fix(float w)
{
    /* w in [0, 1]; NaN (inf logits) counts as 0 */
    return w > 0.0f ? __float2ull_rn(__fmul_rn(w, SM_QSCALE)) : 0;
}


__device__ __forceinline__ bool
sm_in(sm_cut_t c, uint32_t key, int i)
{
    return !c.on || key > c.key || (key == c.key && i <= c.id);
}


/* (va, ia) beats (vb, ib): larger value, or equal value and lower id */
__device__ __forceinline__ bool
sm_better(float va, int ia, float vb, int ib)
{
    return va > vb || (va == vb && ia < ib);
}


/*
 * Exclusive prefix sum over the block in thread order; *total gets the
 * sum of all.  Contains __syncthreads(): call from all threads.
 */
__device__ __forceinline__ sm_u64
sm_scan(sm_smem_t *sh, sm_u64 v, sm_u64 *total)
{
    int     lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    sm_u64  x = v, y;

#pragma unroll
    for (int o = 1; o < 32; o <<= 1) {
        y = __shfl_up_sync(SM_FULL, x, o);
        if (lane >= o) {
            x += y;
        }
    }
    __syncthreads();                /* sh->scan read by a previous call */
    if (lane == 31) {
        sh->scan[warp] = x;
    }
    __syncthreads();
    if (warp == 0) {
        sm_u64  w = sh->scan[lane];

#pragma unroll
        for (int o = 1; o < 32; o <<= 1) {
            y = __shfl_up_sync(SM_FULL, w, o);
            if (lane >= o) {
                w += y;
            }
        }
        sh->scan[lane] = w;
    }
    __syncthreads();
    *total = sh->scan[SM_WARPS - 1];
    return (warp > 0 ? sh->scan[warp - 1] : 0) + x - v;
}


/* first maximum of row[0..n), NaN never taken; *bi = INT_MAX when none */
__device__ void
sm_argmax(sm_smem_t *sh, const float *row, int n, float *bv_out, int *bi_out)
{
    int    lane = threadIdx.x & 31, warp = threadIdx.x >> 5, bi = INT_MAX;
    float  bv = -INFINITY;

    for (int base = 0; base < n; base += SM_THREADS * SM_UNROLL) {
        float  v[SM_UNROLL];

#pragma unroll
        for (int k = 0; k < SM_UNROLL; k++) {
            int  i = base + k * SM_THREADS + (int) threadIdx.x;

            v[k] = i < n ? row[i] : NAN;
        }
        /* ids ascending per thread: a later equal value never wins */
#pragma unroll
        for (int k = 0; k < SM_UNROLL; k++) {
            int  i = base + k * SM_THREADS + (int) threadIdx.x;

            if (sm_better(v[k], i, bv, bi)) {
                bv = v[k];
                bi = i;
            }
        }
    }
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) {
        float  ov = __shfl_xor_sync(SM_FULL, bv, o);
        int    oi = __shfl_xor_sync(SM_FULL, bi, o);

        if (sm_better(ov, oi, bv, bi)) {
            bv = ov;
            bi = oi;
        }
    }
    if (lane == 0) {
        sh->bv[warp] = bv;
        sh->bi[warp] = bi;
    }
    __syncthreads();
    bv = sh->bv[lane];
    bi = sh->bi[lane];
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) {
        float  ov = __shfl_xor_sync(SM_FULL, bv, o);
        int    oi = __shfl_xor_sync(SM_FULL, bi, o);

        if (sm_better(ov, oi, bv, bi)) {
            bv = ov;
            bi = oi;
        }
    }
    __syncthreads();                /* sh->bv / bi free again */
    *bv_out = bv;
    *bi_out = bi;
}


/*
 * Radix select in the (key desc, id asc) order of the valid ids inside
 * cut c.  by_mass 0: the need-th element (need >= 1).  by_mass 1: the
 * first element at which the running weight reaches need * (the total
 * weight inside c), at least half a fixed-point unit (so the best element
 * when need <= 0).  Returns 0 when that is never reached (nothing is cut).
 * Out: the threshold key, the count (by_mass 0) or weight (1) of the
 * elements strictly above it, the count and weight of those equal to it,
 * and the absolute target (by_mass 1).  Call from all threads.
 */
__device__ __forceinline__ int
sm_select(sm_smem_t *sh, const sm_row_t *rw, sm_cut_t c, int by_mass,
    double need, uint32_t *key_out, sm_u64 *above_out, sm_u64 *cnt_out,
    sm_u64 *mass_out, double *need_out)
{
    int       lane = threadIdx.x & 31, n = rw->n;
    uint32_t  pfx = 0, pmask = 0;
    sm_u64    above = 0, tc = 0, tm = 0;

    for (int lv = 0; lv < 3; lv++) {
        int       shift = lv == 0 ? 21 : (lv == 1 ? 10 : 0);
        int       nb = lv == 2 ? 1024 : 2048, b;
        uint32_t  dmask = (uint32_t) nb - 1;

        for (b = threadIdx.x; b < SM_BINS; b += SM_THREADS) {
            sh->cnt[b] = 0;
            sh->mass[b] = 0;
        }
        if (threadIdx.x == 0) {
            sh->sel_bin = -1;
        }
        __syncthreads();

        /* base is uniform: whole warps run each iteration together; ids
         * past n read as NaN (invalid) */
        for (int base = 0; base < n; base += SM_THREADS * SM_UNROLL) {
            float  v[SM_UNROLL];

#pragma unroll
            for (int k = 0; k < SM_UNROLL; k++) {
                int  i = base + k * SM_THREADS + (int) threadIdx.x;

                v[k] = i < n ? rw->row[i] : NAN;
            }
#pragma unroll
            for (int k = 0; k < SM_UNROLL; k++) {
                int       i = base + k * SM_THREADS + (int) threadIdx.x;
                uint32_t  d = SM_NONE, key, m;
                sm_u64    q = 0;

                if (!isnan(v[k])) {
                    key = sm_key(v[k]);
                    if ((key & pmask) == pfx && sm_in(c, key, i)) {
                        d = (key >> shift) & dmask;
                        if (by_mass) {
                            q = sm_fix(sm_weight(v[k], rw->mx, rw->t));
                        }
                    }
                }
                if (!__any_sync(SM_FULL, d != SM_NONE)) {
                    continue;
                }
                /* one atomic per distinct bucket of the warp: the lanes of
                 * a bucket (mask m) add their weights, split in 20-bit
                 * halves so that 32 of them fit 32 bits */
                m = __match_any_sync(SM_FULL, d);
                if (by_mass) {
                    uint32_t  hs = __reduce_add_sync(m, (uint32_t) (q >> 20));
                    uint32_t  ls = __reduce_add_sync(m,
                                                     (uint32_t) q & 0xfffffu);

                    q = ((sm_u64) hs << 20) + ls;
                }
                if (d != SM_NONE && lane == __ffs(m) - 1) {
                    atomicAdd(&sh->cnt[d], (uint32_t) __popc(m));
                    if (by_mass) {
                        atomicAdd(&sh->mass[d], q);
                    }
                }
            }
        }
        __syncthreads();

        /* buckets in descending order, two per thread: the one where the
         * running count / weight crosses need (exactly one, or none) */
        {
            int     b0 = nb - 1 - 2 * (int) threadIdx.x, b1 = b0 - 1;
            sm_u64  v0 = 0, v1 = 0, ex, tot, lo;

            if (b0 >= 0) {
                v0 = by_mass ? sh->mass[b0] : sh->cnt[b0];
            }
            if (b1 >= 0) {
                v1 = by_mass ? sh->mass[b1] : sh->cnt[b1];
            }
            ex = sm_scan(sh, v0 + v1, &tot);
            if (lv == 0 && by_mass) {
                need = fmax(need * (double) tot, 0.5);
            }
            lo = above + ex;
            if (b0 >= 0 && (double) lo < need && need <= (double) (lo + v0)) {
                sh->sel_bin = b0;
                sh->sel_lo = lo;
            } else if (b1 >= 0 && (double) (lo + v0) < need
                       && need <= (double) (lo + v0 + v1))
            {
                sh->sel_bin = b1;
                sh->sel_lo = lo + v0;
            }
        }
        __syncthreads();
        b = sh->sel_bin;
        if (b < 0) {
            __syncthreads();
            return 0;
        }
        above = sh->sel_lo;
        tc = sh->cnt[b];
        tm = sh->mass[b];
        pfx |= (uint32_t) b << shift;
        pmask |= dmask << shift;
        __syncthreads();            /* before the bins are cleared again */
    }

    *key_out = pfx;
    *above_out = above;
    *cnt_out = tc;
    *mass_out = tm;
    *need_out = need;
    return 1;
}


/* what sm_find sums per id */
#define SM_TIES  0      /* 1 for the key t inside cut ck */
#define SM_KEPT  1      /* the fixed-point weight when kept */

typedef struct {
    int       kind;
    sm_cut_t  ck, cp;
    uint32_t  t;
    float     min_p;
} sm_val_t;


/* the value of id i (logit v; NaN: out of range or invalid, 0) */
__device__ __forceinline__ sm_u64
sm_val(const sm_row_t *rw, const sm_val_t *f, float v, int i)
{
    uint32_t  key;
    float     w;

    if (isnan(v)) {
        return 0;
    }
    key = sm_key(v);
    if (f->kind == SM_TIES) {
        return key == f->t && sm_in(f->ck, key, i);
    }
    if (!sm_in(f->ck, key, i) || !sm_in(f->cp, key, i)) {
        return 0;
    }
    w = sm_weight(v, rw->mx, rw->t);
    if (f->min_p > 0.0f && !(w >= f->min_p)) {
        return 0;
    }
    return sm_fix(w);
}


/*
 * The first id (ascending) at which the running sum of the values exceeds
 * target = a * total + b (total: the sum over all ids < n): the r-th tie
 * with a = 0, b = r - 1; the draw with a = u, b = 0.  Two levels: each
 * warp sums a contiguous segment of ids (lanes interleaved, loads
 * batched), a block scan finds the segment holding the target; then every
 * thread sums a few contiguous ids of that segment, a second scan finds
 * the thread, which walks its ids.  Sums are exact integers, so the walk
 * always finds the id.  Returns -1 when target >= total; *last gets the
 * largest id with a value (-1: none).  Call from all threads.
 */
__device__ __forceinline__ int
sm_find(sm_smem_t *sh, const sm_row_t *rw, const sm_val_t *f, double a,
    double b, int *last_out)
{
    int      lane = threadIdx.x & 31, warp = threadIdx.x >> 5, n = rw->n;
    int      seg = ((n + SM_WARPS - 1) / SM_WARPS + 31) & ~31;
    int      start = warp * seg, end = min(start + seg, n), last = -1, w, id;
    int      per = (seg + SM_THREADS - 1) / SM_THREADS, lo, hi;
    sm_u64   s = 0, ex, tot, wlo, whi, run;
    double   target;

    for (int base = start; base < end; base += 32 * SM_UNROLL) {
        float  v[SM_UNROLL];

#pragma unroll
        for (int k = 0; k < SM_UNROLL; k++) {
            int  i = base + 32 * k + lane;

            v[k] = i < end ? rw->row[i] : NAN;
        }
#pragma unroll
        for (int k = 0; k < SM_UNROLL; k++) {
            int     i = base + 32 * k + lane;
            sm_u64  q = sm_val(rw, f, v[k], i);

            if (q > 0) {
                s += q;
                last = i;
            }
        }
    }
    last = __reduce_max_sync(SM_FULL, last);
    if (threadIdx.x == 0) {
        sh->pick = INT_MAX;
        sh->maxid = -1;
        sh->sel_bin = -1;
    }
    ex = sm_scan(sh, s, &tot);      /* barriers: the writes above done */
    if (lane == 0 && last >= 0) {
        atomicMax(&sh->maxid, last);
    }
    target = a * (double) tot + b;
    wlo = __shfl_sync(SM_FULL, ex, 0);
    whi = __shfl_sync(SM_FULL, ex + s, 31);
    if (lane == 0 && (double) wlo <= target && target < (double) whi) {
        sh->sel_bin = warp;         /* exactly one warp, or none */
        sh->sel_lo = wlo;
    }
    __syncthreads();
    w = sh->sel_bin;
    run = sh->sel_lo;
    *last_out = sh->maxid;
    if (w < 0) {
        __syncthreads();
        return -1;
    }

    /* that segment, a few contiguous ids per thread */
    lo = min(w * seg + (int) threadIdx.x * per, n);
    hi = min(lo + per, min(w * seg + seg, n));
    s = 0;
    for (int i = lo; i < hi; i++) {
        s += sm_val(rw, f, rw->row[i], i);
    }
    ex = sm_scan(sh, s, &tot);
    run += ex;
    if ((double) run <= target && target < (double) (run + s)) {
        for (int i = lo; i < hi; i++) {
            run += sm_val(rw, f, rw->row[i], i);
            if ((double) run > target) {
                sh->pick = i;
                break;
            }
        }
    }
    __syncthreads();
    id = sh->pick;
    __syncthreads();
    return id != INT_MAX ? id : -1;
}


/* the r-th (r >= 1) valid id in id order whose key is t, inside cut c;
 * INT_MAX when fewer */
__device__ __forceinline__ int
sm_nth(sm_smem_t *sh, const sm_row_t *rw, sm_cut_t c, uint32_t t, sm_u64 r)
{
    sm_val_t  f = { SM_TIES, c, { 0, INT_MAX, 0 }, t, 0.0f };
    int       last, id;

    id = sm_find(sh, rw, &f, 0.0, (double) (r - 1), &last);
    return id >= 0 ? id : INT_MAX;
}


__global__ void __launch_bounds__(SM_THREADS, 1)
kernel_sample_rows(float *logits, int64_t ld, int V,
    const moe_cuda_sample_param_t *params, const int32_t *pen_tok,
    const int32_t *pen_cnt, const uint8_t *pen_seen, int32_t *out)
{
    moe_pdl_enter();
    __shared__ sm_smem_t     sh;
    moe_cuda_sample_param_t  p = params[blockIdx.x];
    float                   *row = logits + (int64_t) blockIdx.x * ld;
    sm_row_t                 rw;
    sm_cut_t                 ck = { 0, INT_MAX, 0 }, cp = { 0, INT_MAX, 0 };
    uint32_t                 key;
    sm_u64                   above, cnt, mass, r;
    double                   need;
    float                    bv;
    int                      bi, id;

    rw.row = row;
    rw.n = p.n_valid > 0 && p.n_valid < V ? p.n_valid : V;

    /* penalties (repetition, then frequency / presence) exactly as the
     * host rounds them; list ids are distinct: no two threads share one */
    if (p.pen_n > 0 && pen_tok != NULL) {
        for (int j = threadIdx.x; j < p.pen_n; j += SM_THREADS) {
            int    e = p.pen_off + j, tok = pen_tok[e];
            float  v;

            if (tok < 0 || tok >= rw.n) {
                continue;
            }
            v = row[tok];
            if (pen_seen != NULL && pen_seen[e]
                && p.repetition_penalty != 1.0f)
            {
                v = v > 0 ? __fdiv_rn(v, p.repetition_penalty)
                          : __fmul_rn(v, p.repetition_penalty);
            }
            if (pen_cnt != NULL && pen_cnt[e] > 0
                && (p.frequency_penalty != 0.0f
                    || p.presence_penalty != 0.0f))
            {
                v = __fsub_rn(v, __fadd_rn(__fmul_rn(p.frequency_penalty,
                                                     (float) pen_cnt[e]),
                                           p.presence_penalty));
            }
            row[tok] = v;
        }
        __syncthreads();            /* the writes, visible to the block */
    }

    sm_argmax(&sh, row, rw.n, &bv, &bi);
    if (bi == INT_MAX) {
        bi = 0;                     /* nothing but NaN */
    }
    if (p.temperature < MOE_K_GREEDY_TEMPERATURE) {
        if (threadIdx.x == 0) {
            out[blockIdx.x] = bi;
        }
        return;
    }
    rw.mx = bv;
    rw.t = p.temperature;

    if (p.top_k > 0 && p.top_k < rw.n
        && sm_select(&sh, &rw, ck, 0, (double) p.top_k, &key, &above, &cnt,
                     &mass, &need))
    {
        /* exactly k: the first r ids of the ties at the threshold */
        r = (sm_u64) p.top_k - above;
        ck.id = r < cnt ? sm_nth(&sh, &rw, ck, key, r) : INT_MAX;
        ck.key = key;
        ck.on = 1;
    }

    if (p.top_p < 1.0f
        && sm_select(&sh, &rw, ck, 1, (double) p.top_p, &key, &above, &cnt,
                     &mass, &need))
    {
        /* ties share one weight: as many as reach the target */
        sm_u64  qt = mass / cnt;
        double  c = qt > 0 ? ceil((need - (double) above) / (double) qt)
                           : (double) cnt;

        r = c < 1.0 ? 1 : (c >= (double) cnt ? cnt : (sm_u64) c);
        cp.id = r < cnt ? sm_nth(&sh, &rw, ck, key, r) : INT_MAX;
        cp.key = key;
        cp.on = 1;
    }

    /* the draw; u * total rounding up to the total: the largest kept id */
    {
        sm_val_t  f = { SM_KEPT, ck, cp, 0, p.min_p };
        int       last;

        id = sm_find(&sh, &rw, &f, (double) p.u, 0.0, &last);
        if (id < 0) {
            id = last >= 0 ? last : bi;
        }
    }
    if (threadIdx.x == 0) {
        out[blockIdx.x] = id;
    }
}


extern "C" int
moe_cuda_sample_rows(float *logits, int64_t ld, int rows, int V,
    const moe_cuda_sample_param_t *params, const int32_t *pen_tok,
    const int32_t *pen_cnt, const uint8_t *pen_seen, int32_t *out,
    cudaStream_t stream)
{
    if (rows <= 0) {
        return MOE_K_OK;
    }
    if (V <= 0 || ld < V || logits == NULL || params == NULL || out == NULL) {
        moe_cuda_set_error("sample: bad arguments (V %d, ld %lld, logits %p, "
                           "params %p, out %p)", V, (long long) ld,
                           (void *) logits, (const void *) params,
                           (void *) out);
        return MOE_K_EINVAL;
    }
    MOE_CUDA_CHECK(moe_launch(kernel_sample_rows, rows, SM_THREADS, 0, stream,
        logits, ld, V, params, pen_tok, pen_cnt, pen_seen, out));
    return MOE_K_OK;
}
