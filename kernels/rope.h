/* RoPE on q and k, and the K/V write into the paged cache. */
#ifndef MOE_KERNELS_ROPE_H
#define MOE_KERNELS_ROPE_H
#include "common.h"
#ifdef __cplusplus
extern "C" {
#endif
/*
 * qkv: (T, ld) fp32, row t = [q (n_heads*hd) | k (n_kv*hd) | v (n_kv*hd)].
 * Rotates q and k in place, HF rotate_half layout: for i < hd/2,
 * (x[i], x[i+hd/2]) rotated by the angle pos[t] * inv_freq[i], cos and
 * sin scaled by attn (yarn's attention scaling; 1 otherwise).  Then writes
 * bf16 k and v of token t into the layer's cache at slot[t] =
 * block*bs + offset: kv_layer is (n_blocks, 2, block_size, n_kv, hd) bf16
 * (K then V).  pos, slot: (T) int32 device; inv_freq: (hd/2) fp32 device,
 * NULL: no rotation (learned positions, GPT-2), the K/V write only;
 * tok_base: NULL, or (T) fp32 device rope bases per token (dynamic NTK
 * scaling: inv_freq[i] = 1 / tok_base[t]^(2i/hd) instead of the table).
 */
int moe_cuda_rope_kv(float *qkv, int ld, int T, int n_heads, int n_kv,
    int hd, const int32_t *pos, const int32_t *slot, const float *inv_freq,
    const float *tok_base, float attn, moe_bf16_t *kv_layer, int block_size,
    cudaStream_t stream);

/*
 * moe_cuda_rope_kv for an fp8 (e4m3) cache: the same rotation, then K and
 * V written as e4m3(k / k_scale), e4m3(v / v_scale) (round to nearest
 * even, saturating at +-448: kernels/fp8.h moe_fp8_from_f32) into
 * kv_layer (n_blocks, 2, block_size, n_kv, hd) bytes.  Needs hd even and
 * hd / 2 <= 1024 (MOE_K_EUNSUPPORTED) and scales > 0 (MOE_K_EINVAL).
 */
int moe_cuda_rope_kv_fp8(float *qkv, int ld, int T, int n_heads, int n_kv,
    int hd, const int32_t *pos, const int32_t *slot, const float *inv_freq,
    const float *tok_base, float attn, uint8_t *kv_layer, int block_size,
    float k_scale, float v_scale, cudaStream_t stream);

/* An fp8 projection's unscaled q|k|v (moe_cuda_rope_kv_q). */
typedef struct {
    const moe_bf16_t *yq;   /* (T, ld) bf16 unscaled products */
    const float      *qs;   /* (T) row scales */
    const float      *ws;   /* (ld) channel scales */
} moe_cuda_rope_src_t;

/*
 * moe_cuda_rope_kv (kv_fp8 0) / moe_cuda_rope_kv_fp8 (kv_fp8 1) with the
 * q|k|v rows still unscaled: value (t, j) = yq[t * ld + j] * (qs[t] *
 * ws[j]) in fp32, exactly what moe_cuda_fp8_rescale_rows_bf16 writes, so
 * the rows left in qkv (every column, v too) and the cache are bit for bit
 * that rescale followed by the rope launch; one pass over half the bytes.
 * Needs hd even, hd / 2 <= 1024 (MOE_K_EUNSUPPORTED).
 */
int moe_cuda_rope_kv_q(float *qkv, int ld, const moe_cuda_rope_src_t *src,
    int T, int n_heads, int n_kv, int hd, const int32_t *pos,
    const int32_t *slot, const float *inv_freq, const float *tok_base,
    float attn, void *kv_layer, int kv_fp8, int block_size, float k_scale,
    float v_scale, cudaStream_t stream);
#ifdef __cplusplus
}
#endif
#endif
