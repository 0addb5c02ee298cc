/* Weight conversion on the device (the CUDA backend's weight upload). */
#include <cuda_fp16.h>

#include "common.cuh"
#include "convert.h"


__global__ void
kernel_convert(const void *src, int dtype, int64_t s0, int64_t ns,
    int64_t used, int64_t ld, int transposed, int64_t cols, void *dst,
    int out_bf16)
{
    moe_pdl_enter();
    int64_t n = ns * used;

    for (int64_t i = blockIdx.x * (int64_t) blockDim.x + threadIdx.x; i < n;
         i += (int64_t) gridDim.x * blockDim.x)
    {
        int64_t s = i / used, j = i - s * used;
        int64_t si = s * ld + j;
        int64_t di = transposed ? j * cols + (s0 + s) : (s0 + s) * cols + j;
        float   v;

        if (out_bf16 && dtype == MOE_K_DT_BF16) {
            ((uint16_t *) dst)[di] = ((const uint16_t *) src)[si];
            continue;
        }
        if (dtype == MOE_K_DT_F32) {
            v = ((const float *) src)[si];
        } else if (dtype == MOE_K_DT_F16) {
            v = __half2float(((const __half *) src)[si]);
        } else {
            v = moe_bf2f(((const __nv_bfloat16 *) src)[si]);
        }
        if (out_bf16) {
            ((__nv_bfloat16 *) dst)[di] = moe_f2bf(v);
        } else {
            ((float *) dst)[di] = v;
        }
    }
}


extern "C" int
moe_cuda_convert(const void *src, int dtype, int64_t s0, int64_t ns,
    int64_t used, int64_t ld, int transposed, int64_t cols, void *dst,
    int out_bf16, cudaStream_t stream)
{
    if ((dtype != MOE_K_DT_F32 && dtype != MOE_K_DT_F16
         && dtype != MOE_K_DT_BF16)
        || s0 < 0 || ns < 0 || used < 0 || ld < used || cols < 0)
    {
        moe_cuda_set_error("moe_cuda_convert: bad arguments (dtype %d, ns "
                           "%lld, used %lld, ld %lld)", dtype,
                           (long long) ns, (long long) used, (long long) ld);
        return MOE_K_EINVAL;
    }
    if (ns == 0 || used == 0) {
        return MOE_K_OK;
    }
    MOE_CUDA_CHECK(moe_launch(kernel_convert, moe_grid(ns * used, 256 * 4),
        256, 0, stream, src, dtype, s0, ns, used, ld, transposed, cols, dst,
        out_bf16));
    return MOE_K_OK;
}
