/*
 * Paged attention: one block of ATT_WARPS warps per (query token, kv head),
 * serving the G query heads of that kv head so each K/V row is read once.
 * Each warp takes chunks of 32 key positions (lane = key for the scores,
 * lane = head dimension for the V accumulation) and keeps an online softmax
 * (running max m, sum l, accumulator) per head; the warps' states are merged
 * at the end.  Prefill and decode are the same kernel: a token attends to
 * the positions up to its own, which rope_kv has already written.
 */
#include <math.h>

#include "common.cuh"
#include "attention.h"

#define ATT_WARPS 4


template <int G, int DPL>
__global__ void __launch_bounds__(ATT_WARPS * 32)
kernel_attention(const float *qkv, int ld, const int32_t *tok_pos,
    const int32_t *tok_seq, const int32_t *bt, const int32_t *bt_off,
    const __nv_bfloat16 *kv_layer, int block_size, int n_heads, int n_kv,
    int hd, int window, __nv_bfloat16 *out)
{
    constexpr int HDM = DPL * 32;
    __shared__ float q_s[G][HDM];
    __shared__ float m_s[ATT_WARPS][G];
    __shared__ float l_s[ATT_WARPS][G];
    __shared__ float a_s[ATT_WARPS][G][HDM];

    int   t = blockIdx.x / n_kv, g = blockIdx.x % n_kv;
    int   grp = n_heads / n_kv;
    int   lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    int   p = tok_pos[t], j0 = 0;
    int   kvd = n_kv * hd;
    float scale = 1.0f / sqrtf((float) hd);
    const int32_t *table = bt + bt_off[tok_seq[t]];

    if (window > 0 && p - window + 1 > 0) {
        j0 = p - window + 1;
    }
    for (int i = threadIdx.x; i < G * HDM; i += blockDim.x) {
        int h = i / HDM, d = i % HDM;

        q_s[h][d] = (h < grp && d < hd)
                    ? qkv[(size_t) t * ld + (size_t) (g * grp + h) * hd + d]
                      * scale
                    : 0.0f;
    }
    __syncthreads();

    float m[G], l[G], acc[G][DPL];

#pragma unroll
    for (int h = 0; h < G; h++) {
        m[h] = -INFINITY;
        l[h] = 0.0f;
#pragma unroll
        for (int i = 0; i < DPL; i++) {
            acc[h][i] = 0.0f;
        }
    }

    int nkeys = p - j0 + 1;
    int nchunks = (nkeys + 31) / 32;

    for (int c = warp; c < nchunks; c += ATT_WARPS) {
        int   jb = j0 + c * 32;
        int   j = jb + lane;
        int   valid = j <= p;
        float s[G], pr[G];

#pragma unroll
        for (int h = 0; h < G; h++) {
            s[h] = 0.0f;
        }
        if (valid) {
            const __nv_bfloat16 *kp =
                kv_layer + ((size_t) table[j / block_size] * 2 * block_size
                            + j % block_size) * kvd + (size_t) g * hd;

            for (int d = 0; d < hd; d += 8) {
                uint4                raw = *reinterpret_cast<const uint4 *>(
                                               kp + d);
                const __nv_bfloat16 *kb =
                    reinterpret_cast<const __nv_bfloat16 *>(&raw);
                float                kf[8];

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
            for (int i = 0; i < DPL; i++) {
                acc[h][i] *= corr;
            }
        }

        int nvalid = min(32, p - jb + 1);

        for (int jj = 0; jj < nvalid; jj++) {
            int                  jp = jb + jj;
            const __nv_bfloat16 *vp =
                kv_layer + (((size_t) table[jp / block_size] * 2 + 1)
                            * block_size + jp % block_size) * kvd
                + (size_t) g * hd;
            float                vf[DPL];

#pragma unroll
            for (int i = 0; i < DPL; i++) {
                int d = lane + 32 * i;

                vf[i] = d < hd ? moe_bf2f(vp[d]) : 0.0f;
            }
#pragma unroll
            for (int h = 0; h < G; h++) {
                float pj = __shfl_sync(0xffffffffu, pr[h], jj);

#pragma unroll
                for (int i = 0; i < DPL; i++) {
                    acc[h][i] += pj * vf[i];
                }
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
#pragma unroll
        for (int i = 0; i < DPL; i++) {
            a_s[warp][h][lane + 32 * i] = acc[h][i];
        }
    }
    __syncthreads();
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


template <int G>
static void
att_launch_g(int dpl, unsigned grid, cudaStream_t stream, const float *qkv,
    int ld, const int32_t *tok_pos, const int32_t *tok_seq,
    const int32_t *bt, const int32_t *bt_off, const __nv_bfloat16 *kv,
    int block_size, int n_heads, int n_kv, int hd, int window,
    __nv_bfloat16 *out)
{
#define ATT_ARGS qkv, ld, tok_pos, tok_seq, bt, bt_off, kv, block_size,       \
                 n_heads, n_kv, hd, window, out
    switch (dpl) {
    case 1:
        kernel_attention<G, 1><<<grid, ATT_WARPS * 32, 0, stream>>>(ATT_ARGS);
        break;
    case 2:
        kernel_attention<G, 2><<<grid, ATT_WARPS * 32, 0, stream>>>(ATT_ARGS);
        break;
    case 4:
        kernel_attention<G, 4><<<grid, ATT_WARPS * 32, 0, stream>>>(ATT_ARGS);
        break;
    default:
        kernel_attention<G, 8><<<grid, ATT_WARPS * 32, 0, stream>>>(ATT_ARGS);
        break;
    }
#undef ATT_ARGS
}


extern "C" int
moe_cuda_attention(const float *qkv, int ld, int T, const int32_t *tok_pos,
    const int32_t *tok_seq, const int32_t *bt, const int32_t *bt_off,
    const moe_bf16_t *kv_layer, int block_size, int n_heads, int n_kv,
    int hd, int window, moe_bf16_t *out, cudaStream_t stream)
{
    const __nv_bfloat16 *kv = reinterpret_cast<const __nv_bfloat16 *>(
                                  kv_layer);
    __nv_bfloat16       *o = reinterpret_cast<__nv_bfloat16 *>(out);
    int                  grp, dpl;
    unsigned             grid;

    if (T <= 0) {
        return MOE_OK;
    }
    if (!moe_cuda_attention_supported(n_heads, n_kv, hd)) {
        moe_cuda_set_error("attention: unsupported shape (heads %d, kv heads "
                           "%d, head_dim %d)", n_heads, n_kv, hd);
        return MOE_EUNSUPPORTED;
    }
    grp = n_heads / n_kv;
    dpl = hd <= 32 ? 1 : hd <= 64 ? 2 : hd <= 128 ? 4 : 8;
    grid = (unsigned) T * (unsigned) n_kv;
    if (grp == 1) {
        att_launch_g<1>(dpl, grid, stream, qkv, ld, tok_pos, tok_seq, bt,
                        bt_off, kv, block_size, n_heads, n_kv, hd, window, o);
    } else if (grp == 2) {
        att_launch_g<2>(dpl, grid, stream, qkv, ld, tok_pos, tok_seq, bt,
                        bt_off, kv, block_size, n_heads, n_kv, hd, window, o);
    } else if (grp <= 4) {
        att_launch_g<4>(dpl, grid, stream, qkv, ld, tok_pos, tok_seq, bt,
                        bt_off, kv, block_size, n_heads, n_kv, hd, window, o);
    } else {
        att_launch_g<8>(dpl, grid, stream, qkv, ld, tok_pos, tok_seq, bt,
                        bt_off, kv, block_size, n_heads, n_kv, hd, window, o);
    }
    MOE_CUDA_CHECK_LAUNCH("kernel_attention");
    return MOE_OK;
}
