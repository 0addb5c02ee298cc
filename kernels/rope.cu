/* RoPE (rotate_half) on q and k, fused with the paged K/V cache write. */
#include "common.cuh"
#include "rope.h"


__global__ void
kernel_rope_kv(float *qkv, int ld, int n_heads, int n_kv, int hd,
    const int32_t *pos, const int32_t *slot, float theta,
    __nv_bfloat16 *kv_layer, int block_size)
{
    int            t = blockIdx.x, half = hd / 2;
    int            kvd = n_kv * hd;
    int            nrot = theta > 0.0f ? (n_heads + n_kv) * half : 0;
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
        float  inv = 1.0f / powf(theta, (float) (2 * i) / (float) hd);
        float  ang = p * inv;
        float  c = cosf(ang), sn = sinf(ang);
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


extern "C" int
moe_cuda_rope_kv(float *qkv, int ld, int T, int n_heads, int n_kv, int hd,
    const int32_t *pos, const int32_t *slot, float theta,
    moe_bf16_t *kv_layer, int block_size, cudaStream_t stream)
{
    if (T <= 0) {
        return MOE_OK;
    }
    kernel_rope_kv<<<T, 128, 0, stream>>>(qkv, ld, n_heads, n_kv, hd, pos,
        slot, theta, reinterpret_cast<__nv_bfloat16 *>(kv_layer),
        block_size);
    MOE_CUDA_CHECK_LAUNCH("kernel_rope_kv");
    return MOE_OK;
}
