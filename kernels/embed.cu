/* Embedding gather, bf16 table -> fp32 residual stream. */
#include "common.cuh"
#include "embed.h"


__global__ void
kernel_embed(const int32_t *tokens, const __nv_bfloat16 *table, int D,
    float *x)
{
    moe_pdl_enter();
    int                  t = blockIdx.x;
    const __nv_bfloat16 *row = table + (size_t) tokens[t] * D;
    float               *o = x + (size_t) t * D;

    for (int d = threadIdx.x; d < D; d += blockDim.x) {
        o[d] = moe_bf2f(row[d]);
    }
}


extern "C" int
moe_cuda_embed(const int32_t *tokens, int T, const moe_bf16_t *table, int D,
    float *x, cudaStream_t stream)
{
    if (T <= 0) {
        return MOE_K_OK;
    }
    MOE_CUDA_CHECK(moe_launch(kernel_embed, T, 256, 0, stream, tokens,
        reinterpret_cast<const __nv_bfloat16 *>(table), D, x));
    return MOE_K_OK;
}
