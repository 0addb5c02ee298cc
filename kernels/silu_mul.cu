/* SwiGLU activation over the concatenated gate|up GEMM output. */
#include "common.cuh"
#include "silu_mul.h"


__global__ void
kernel_silu_mul(const float *gu, int64_t n, int F, __nv_bfloat16 *h)
{
    moe_pdl_enter();
    for (int64_t i = blockIdx.x * (int64_t) blockDim.x + threadIdx.x; i < n;
         i += (int64_t) gridDim.x * blockDim.x)
    {
        int64_t r = i / F, j = i % F;
        float   g = gu[r * 2 * F + j], u = gu[r * 2 * F + F + j];

        h[i] = moe_f2bf(g / (1.0f + expf(-g)) * u);
    }
}


extern "C" int
moe_cuda_silu_mul(const float *gu, int R, int F, moe_bf16_t *h,
    cudaStream_t stream)
{
    int64_t n = (int64_t) R * F;

    if (n <= 0) {
        return MOE_K_OK;
    }
    MOE_CUDA_CHECK(moe_launch(kernel_silu_mul, moe_grid(n, 256), 256, 0,
        stream, gu, n, F, reinterpret_cast<__nv_bfloat16 *>(h)));
    return MOE_K_OK;
}
