/* RoPE (rotate_half) on q and k, fused with the paged K/V cache write. */
#include "common.cuh"
#include "rope.h"
#include <cuda_fp8.h>


/* Frequency i of token t: the table, or (dynamic NTK scaling) the
 * token's own base as transformers computes it: 1 / base^(2i / hd). */
__device__ __forceinline__ float
rope_inv(const float *inv_freq, const float *tok_base, int t, int i, int hd)
{
    if (tok_base != NULL) {
        return 1.0f / powf(tok_base[t], (float) (2 * i) / (float) hd);
    }
    return inv_freq[i];
}


__global__ void
kernel_rope_kv(float *qkv, int ld, int n_heads, int n_kv, int hd,
    const int32_t *pos, const int32_t *slot, const float *inv_freq,
    const float *tok_base, float attn, __nv_bfloat16 *kv_layer,
    int block_size)
{
    moe_pdl_enter();
    int            t = blockIdx.x, half = hd / 2;
    int            kvd = n_kv * hd;
    int            nrot = inv_freq != NULL ? (n_heads + n_kv) * half : 0;
    float         *row = qkv + (size_t) t * ld;
    float          p = (float) pos[t];
    int            s = slot[t];
    int            blk = s / block_size, off = s % block_size;
    __nv_bfloat16 *kd = kv_layer + ((size_t) blk * 2 * block_size + off)
                                   * kvd;
    __nv_bfloat16 *vd = kd + (size_t) block_size * kvd;

    /* q heads then k heads: they are adjacent in the row */
    for (int idx = threadIdx.x; idx < nrot; idx += blockDim.x) {
        int    h = idx / half, i = idx % half;
        float *v = row + (size_t) h * hd;
        float  inv = rope_inv(inv_freq, tok_base, t, i, hd);
        float  ang = p * inv;
        float  c = cosf(ang) * attn, sn = sinf(ang) * attn;
        float  x1 = v[i], x2 = v[i + half];

        v[i] = x1 * c - x2 * sn;
        v[i + half] = x2 * c + x1 * sn;
    }
    __syncthreads();
    for (int d = threadIdx.x; d < kvd; d += blockDim.x) {
        kd[d] = moe_f2bf(row[(size_t) n_heads * hd + d]);
        vd[d] = moe_f2bf(row[(size_t) (n_heads + n_kv) * hd + d]);
    }
}


/*
 * The same with blockDim.y heads of one token per block (grid: tokens x
 * head groups): q heads are rotated in place, k heads rotated and written
 * to the cache (and the row), v heads copied to the cache; thread (i, y)
 * owns the pair (i, i + hd / 2) of its head, so a decode step waits for
 * one memory round trip instead of 20.  Decode steps take one head per
 * block (the most blocks); prefills rope_hpb heads (rope_hpb).
 */
template <typename KV, bool QS>
__global__ void
kernel_rope_kv_heads(float *qkv, int ld, int n_heads, int n_kv, int hd,
    const int32_t *pos, const int32_t *slot, const float *inv_freq,
    const float *tok_base, float attn, KV *kv_layer, int block_size,
    float ksc, float vsc, moe_cuda_rope_src_t src)
{
    moe_pdl_enter();
    int            t = blockIdx.x, half = hd / 2;
    int            h = blockIdx.y * blockDim.y + threadIdx.y;
    int            kvd = n_kv * hd, i = threadIdx.x;
    float         *v = qkv + (size_t) t * ld + (size_t) h * hd;
    float          x1, x2;

    if (i >= half || h >= n_heads + 2 * n_kv) {
        return;
    }
    if constexpr (QS) {
        /* the unscaled fp8 product times its scales, as
         * moe_cuda_fp8_rescale_rows_bf16 stores it; the row gets it */
        const __nv_bfloat16 *yq = reinterpret_cast<const __nv_bfloat16 *>(
                                      src.yq) + (size_t) t * ld
                                  + (size_t) h * hd;
        const float         *ws = src.ws + (size_t) h * hd;
        float                q = src.qs[t];

        x1 = moe_fp8_unscale(__bfloat162float(yq[i]), q, ws[i]);
        x2 = moe_fp8_unscale(__bfloat162float(yq[i + half]), q,
                             ws[i + half]);
    } else {
        (void) src;
        x1 = v[i];
        x2 = v[i + half];
    }
    if (inv_freq != NULL && h < n_heads + n_kv) {
        float inv = rope_inv(inv_freq, tok_base, t, i, hd);
        float ang = (float) pos[t] * inv;
        float c = cosf(ang) * attn, sn = sinf(ang) * attn;
        float y1 = x1 * c - x2 * sn, y2 = x2 * c + x1 * sn;

        x1 = y1;
        x2 = y2;
        v[i] = x1;
        v[i + half] = x2;
    } else if constexpr (QS) {
        v[i] = x1;                      /* v heads: the scaled values */
        v[i + half] = x2;
    }
    if (h >= n_heads) {
        int            s = slot[t], blk = s / block_size, off = s % block_size;
        int            kh = h - n_heads;
        KV            *d = kv_layer + ((size_t) blk * 2 * block_size + off)
                                      * kvd;
        float          sc = ksc;

        if (kh >= n_kv) {
            kh -= n_kv;
            d += (size_t) block_size * kvd;     /* the V half of the block */
            sc = vsc;
        }
        d += (size_t) kh * hd;
        if constexpr (sizeof(KV) == 1) {        /* e4m3, saturating */
            d[i] = (KV) __nv_cvt_float_to_fp8(x1 / sc, __NV_SATFINITE,
                                              __NV_E4M3);
            d[i + half] = (KV) __nv_cvt_float_to_fp8(x2 / sc,
                                                     __NV_SATFINITE,
                                                     __NV_E4M3);
        } else {
            (void) sc;
            d[i] = moe_f2bf(x1);
            d[i + half] = moe_f2bf(x2);
        }
    }
}


/*
 * kernel_rope_kv_heads's launch shape for T tokens: one head per block
 * below 64 tokens; above, up to 8 heads per block (at most 1024 threads),
 * so that a 2048-token prefill runs 2048 x 6 blocks of 512 threads, not
 * 2048 x 48 of 64 (block scheduling held that launch at 120 us on the
 * H200, bench_engine fp8 prefill 2048 under ncu).
 */
static void
rope_shape(int T, int hd, int heads, dim3 *grid, dim3 *block)
{
    int threads = (hd / 2 + 31) / 32 * 32;
    int hpb = T >= 64 ? 1024 / threads : 1;

    hpb = hpb > 8 ? 8 : hpb < 1 ? 1 : hpb;
    *block = dim3((unsigned) threads, (unsigned) hpb);
    *grid = dim3((unsigned) T, (unsigned) ((heads + hpb - 1) / hpb));
}


extern "C" int
moe_cuda_rope_kv(float *qkv, int ld, int T, int n_heads, int n_kv, int hd,
    const int32_t *pos, const int32_t *slot, const float *inv_freq,
    const float *tok_base, float attn, moe_bf16_t *kv_layer, int block_size,
    cudaStream_t stream)
{
    if (T <= 0) {
        return MOE_K_OK;
    }
    if (hd % 2 == 0 && hd / 2 <= 1024) {
        dim3 grid, block;

        rope_shape(T, hd, n_heads + 2 * n_kv, &grid, &block);
        MOE_CUDA_CHECK(moe_launch(kernel_rope_kv_heads<__nv_bfloat16, false>,
            grid, block, 0, stream, qkv, ld, n_heads, n_kv, hd, pos, slot,
            inv_freq, tok_base, attn,
            reinterpret_cast<__nv_bfloat16 *>(kv_layer), block_size, 1.0f,
            1.0f, moe_cuda_rope_src_t()));
        return MOE_K_OK;
    }
    MOE_CUDA_CHECK(moe_launch(kernel_rope_kv, T, 128, 0, stream, qkv, ld,
        n_heads, n_kv, hd, pos, slot, inv_freq, tok_base, attn,
        reinterpret_cast<__nv_bfloat16 *>(kv_layer), block_size));
    return MOE_K_OK;
}


extern "C" int
moe_cuda_rope_kv_fp8(float *qkv, int ld, int T, int n_heads, int n_kv,
    int hd, const int32_t *pos, const int32_t *slot, const float *inv_freq,
    const float *tok_base, float attn, uint8_t *kv_layer, int block_size,
    float k_scale, float v_scale, cudaStream_t stream)
{
    dim3 grid, block;

    if (T <= 0) {
        return MOE_K_OK;
    }
    if (hd <= 0 || hd % 2 != 0 || hd / 2 > 1024) {
        moe_cuda_set_error("rope_kv_fp8: unsupported head_dim %d", hd);
        return MOE_K_EUNSUPPORTED;
    }
    if (!(k_scale > 0.0f) || !(v_scale > 0.0f)) {
        moe_cuda_set_error("rope_kv_fp8: scales must be > 0 (k %g, v %g)",
                           (double) k_scale, (double) v_scale);
        return MOE_K_EINVAL;
    }
    rope_shape(T, hd, n_heads + 2 * n_kv, &grid, &block);
    MOE_CUDA_CHECK(moe_launch(kernel_rope_kv_heads<uint8_t, false>, grid,
        block, 0, stream, qkv, ld, n_heads, n_kv, hd, pos, slot, inv_freq,
        tok_base, attn, kv_layer, block_size, k_scale, v_scale,
        moe_cuda_rope_src_t()));
    return MOE_K_OK;
}


extern "C" int
moe_cuda_rope_kv_q(float *qkv, int ld, const moe_cuda_rope_src_t *src,
    int T, int n_heads, int n_kv, int hd, const int32_t *pos,
    const int32_t *slot, const float *inv_freq, const float *tok_base,
    float attn, void *kv_layer, int kv_fp8, int block_size, float k_scale,
    float v_scale, cudaStream_t stream)
{
    dim3 grid, block;

    if (T <= 0) {
        return MOE_K_OK;
    }
    if (src == NULL || src->yq == NULL || src->qs == NULL || src->ws == NULL
        || hd <= 0 || hd % 2 != 0 || hd / 2 > 1024)
    {
        moe_cuda_set_error("rope_kv_q: unsupported head_dim %d or no "
                           "source", hd);
        return MOE_K_EUNSUPPORTED;
    }
    if (kv_fp8 && (!(k_scale > 0.0f) || !(v_scale > 0.0f))) {
        moe_cuda_set_error("rope_kv_q: scales must be > 0 (k %g, v %g)",
                           (double) k_scale, (double) v_scale);
        return MOE_K_EINVAL;
    }
    rope_shape(T, hd, n_heads + 2 * n_kv, &grid, &block);
    if (kv_fp8) {
        MOE_CUDA_CHECK(moe_launch(kernel_rope_kv_heads<uint8_t, true>, grid,
            block, 0, stream, qkv, ld, n_heads, n_kv, hd, pos, slot,
            inv_freq, tok_base, attn, (uint8_t *) kv_layer, block_size,
            k_scale, v_scale, *src));
    } else {
        MOE_CUDA_CHECK(moe_launch(kernel_rope_kv_heads<__nv_bfloat16, true>,
            grid, block, 0, stream, qkv, ld, n_heads, n_kv, hd, pos, slot,
            inv_freq, tok_base, attn, (__nv_bfloat16 *) kv_layer,
            block_size, 1.0f, 1.0f, *src));
    }
    return MOE_K_OK;
}
