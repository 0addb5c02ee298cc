/*
 * Paged attention: one block of ATT_WARPS warps per (query token, kv head,
 * key split), serving the G query heads of that kv head so each K/V row is
 * read once.  The keys are cut into chunks of 32; chunk c goes to warp
 * c mod (splits * ATT_WARPS).  A warp scores its chunk with lane = key,
 * keeps an online softmax (running max m, sum l) per head, and accumulates
 * V with LPR = hd / 8 lanes per V row (16-byte loads, 32 / LPR keys per
 * step); the sub-sums are added across lanes at the end, the warps' states
 * merged in shared memory.  With one split the block writes the output;
 * with several it writes its unnormalised state (m, l, acc) and
 * kernel_attention_combine merges the splits.  Prefill and decode are the
 * same kernel: a token attends to the positions up to its own, which
 * rope_kv has already written.
 */
#include <math.h>

#include "common.cuh"
#include "attention.h"

#define ATT_WARPS      4
#define ATT_MAX_SPLIT  32
#define ATT_TARGET     528          /* blocks wanted: 4 per SM of 132 */
#define ATT_MAX_REC    (ATT_TARGET * 2 + 64)

typedef __nv_bfloat16 bf16;


/* Splits for T * n_kv (token, kv head) pairs: depends on the count only. */
static int
att_splits(int pairs)
{
    int ns;

    if (pairs >= ATT_TARGET) {
        return 1;
    }
    ns = (ATT_TARGET + pairs - 1) / pairs;
    return ns > ATT_MAX_SPLIT ? ATT_MAX_SPLIT : ns;
}


template <int G, int HDP>
__global__ void __launch_bounds__(ATT_WARPS * 32)
kernel_attention(const float *qkv, int ld, const int32_t *tok_pos,
    const int32_t *tok_seq, const int32_t *bt, const int32_t *bt_off,
    const bf16 *kv_layer, int block_size, int n_heads, int n_kv, int hd,
    int window, bf16 *out, float *part)
{
    constexpr int LPR = HDP / 8;          /* lanes per V row */
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
    float scale = 1.0f / sqrtf((float) hd);
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
            const bf16 *kp =
                kv_layer + ((size_t) table[j / block_size] * 2 * block_size
                            + j % block_size) * kvd + (size_t) g * hd;

#pragma unroll 8
            for (int d = 0; d < HDP; d += 8) {
                if (d < hd) {
                    uint4       raw = *reinterpret_cast<const uint4 *>(
                                          kp + d);
                    const bf16 *kb = reinterpret_cast<const bf16 *>(&raw);
                    float       kf[8];

#pragma unroll
                    for (int e = 0; e < 8; e++) {
                        kf[e] = moe_bf2f(kb[e]);
                    }
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
                const bf16 *vp =
                    kv_layer + (((size_t) table[jp / block_size] * 2 + 1)
                                * block_size + jp % block_size) * kvd
                    + (size_t) g * hd + d0;
                uint4       raw = *reinterpret_cast<const uint4 *>(vp);
                const bf16 *vb = reinterpret_cast<const bf16 *>(&raw);

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


/* One block per (token, kv head): merge the ns split states. */
__global__ void
kernel_attention_combine(const float *part, int ns, int n_heads, int n_kv,
    int hd, bf16 *out)
{
    int          t = blockIdx.x / n_kv, g = blockIdx.x % n_kv;
    int          grp = n_heads / n_kv;
    size_t       rs = (size_t) grp * (hd + 2);
    const float *p0 = part + (size_t) blockIdx.x * ns * rs;

    for (int i = threadIdx.x; i < grp * hd; i += blockDim.x) {
        int   h = i / hd, d = i % hd;
        float M = -INFINITY, L = 0.0f, o = 0.0f;

        for (int s = 0; s < ns; s++) {
            M = fmaxf(M, p0[s * rs + h]);
        }
        for (int s = 0; s < ns; s++) {
            const float *r = p0 + s * rs;

            if (r[h] != -INFINITY) {
                float f = expf(r[h] - M);

                L += r[grp + h] * f;
                o += r[2 * grp + h * hd + d] * f;
            }
        }
        out[(size_t) t * n_heads * hd + (size_t) (g * grp + h) * hd + d] =
            moe_f2bf(o / L);
    }
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
    return (int64_t) ATT_MAX_REC * (n_heads / n_kv) * (hd + 2);
}


template <int G>
static void
att_launch_g(int hdp, dim3 grid, cudaStream_t stream, const float *qkv,
    int ld, const int32_t *tok_pos, const int32_t *tok_seq,
    const int32_t *bt, const int32_t *bt_off, const bf16 *kv,
    int block_size, int n_heads, int n_kv, int hd, int window, bf16 *out,
    float *part)
{
#define ATT_ARGS qkv, ld, tok_pos, tok_seq, bt, bt_off, kv, block_size,       \
                 n_heads, n_kv, hd, window, out, part
#define ATT_L(H) kernel_attention<G, H><<<grid, ATT_WARPS * 32, 0, stream>>>( \
                     ATT_ARGS)
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


extern "C" int
moe_cuda_attention(const float *qkv, int ld, int T, const int32_t *tok_pos,
    const int32_t *tok_seq, const int32_t *bt, const int32_t *bt_off,
    const moe_bf16_t *kv_layer, int block_size, int n_heads, int n_kv,
    int hd, int window, moe_bf16_t *out, float *part, cudaStream_t stream)
{
    const bf16 *kv = reinterpret_cast<const bf16 *>(kv_layer);
    bf16       *o = reinterpret_cast<bf16 *>(out);
    int         grp, hdp, ns;
    dim3        grid;

    if (T <= 0) {
        return MOE_OK;
    }
    if (!moe_cuda_attention_supported(n_heads, n_kv, hd)) {
        moe_cuda_set_error("attention: unsupported shape (heads %d, kv heads "
                           "%d, head_dim %d)", n_heads, n_kv, hd);
        return MOE_EUNSUPPORTED;
    }
    grp = n_heads / n_kv;
    for (hdp = 8; hdp < hd; hdp *= 2) {
    }
    ns = att_splits(T * n_kv);
    if (ns > 1 && (part == NULL || (int64_t) T * n_kv * ns > ATT_MAX_REC)) {
        ns = 1;
    }
    grid = dim3((unsigned) T * (unsigned) n_kv, (unsigned) ns);
    if (grp == 1) {
        att_launch_g<1>(hdp, grid, stream, qkv, ld, tok_pos, tok_seq, bt,
                        bt_off, kv, block_size, n_heads, n_kv, hd, window, o,
                        part);
    } else if (grp == 2) {
        att_launch_g<2>(hdp, grid, stream, qkv, ld, tok_pos, tok_seq, bt,
                        bt_off, kv, block_size, n_heads, n_kv, hd, window, o,
                        part);
    } else if (grp <= 4) {
        att_launch_g<4>(hdp, grid, stream, qkv, ld, tok_pos, tok_seq, bt,
                        bt_off, kv, block_size, n_heads, n_kv, hd, window, o,
                        part);
    } else {
        att_launch_g<8>(hdp, grid, stream, qkv, ld, tok_pos, tok_seq, bt,
                        bt_off, kv, block_size, n_heads, n_kv, hd, window, o,
                        part);
    }
    MOE_CUDA_CHECK_LAUNCH("kernel_attention");
    if (ns > 1) {
        kernel_attention_combine<<<(unsigned) T * (unsigned) n_kv, 128, 0,
                                   stream>>>(part, ns, n_heads, n_kv, hd, o);
        MOE_CUDA_CHECK_LAUNCH("kernel_attention_combine");
    }
    return MOE_OK;
}
