/*
 * SwiGLU activation over the concatenated gate|up GEMM output.  Grid:
 * rows x column chunks of 4 * SM_NT (a prefill's 4096 x 14336 no longer
 * pays a 64-bit division per element: 312 us -> the bytes' time on the
 * H200); four columns per thread when F % 4 == 0, one otherwise.
 */
#include "common.cuh"
#include "silu_mul.h"

#define SM_NT 256


__global__ void __launch_bounds__(SM_NT)
kernel_silu_mul(const float *gu, int F, __nv_bfloat16 *h)
{
    moe_pdl_enter();
    const int64_t r = blockIdx.x;
    const float  *g = gu + r * 2 * F, *u = g + F;
    __nv_bfloat16 *o = h + r * F;
    int           j = (blockIdx.y * SM_NT + threadIdx.x) * 4;

    if (j >= F) {
        return;
    }
    if (F % 4 == 0) {
        float4         a = *reinterpret_cast<const float4 *>(g + j);
        float4         b = *reinterpret_cast<const float4 *>(u + j);
        __nv_bfloat162 p[2] = {
            __floats2bfloat162_rn(moe_silu_mul(a.x, b.x),
                                  moe_silu_mul(a.y, b.y)),
            __floats2bfloat162_rn(moe_silu_mul(a.z, b.z),
                                  moe_silu_mul(a.w, b.w))
        };

        *reinterpret_cast<uint2 *>(o + j) = *reinterpret_cast<uint2 *>(p);
        return;
    }
    for (int c = j; c < j + 4 && c < F; c++) {
        o[c] = moe_f2bf(moe_silu_mul(g[c], u[c]));
    }
}


extern "C" int
moe_cuda_silu_mul(const float *gu, int R, int F, moe_bf16_t *h,
    cudaStream_t stream)
{
    if (R <= 0 || F <= 0) {
        return MOE_K_OK;
    }
    MOE_CUDA_CHECK(moe_launch(kernel_silu_mul,
        dim3((unsigned) R, (unsigned) ((F + 4 * SM_NT - 1) / (4 * SM_NT))),
        SM_NT, 0, stream, gu, F, reinterpret_cast<__nv_bfloat16 *>(h)));
    return MOE_K_OK;
}
