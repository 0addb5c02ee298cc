/* RMSNorm (fp32 statistics) fused with the residual add. */
#include "common.cuh"
#include "rmsnorm.h"


__global__ void
kernel_add_rmsnorm(float *x, const float *delta, const int32_t *rows, int D,
    const float *w, float eps, __nv_bfloat16 *out, float *out_f32)
{
    __shared__ float sh[32];
    int              i = blockIdx.x;
    int              r = rows != NULL ? rows[i] : i;
    float           *xr = x + (size_t) r * D;
    const float     *dr = delta != NULL ? delta + (size_t) r * D : NULL;
    float            ss = 0.0f, inv;

    for (int d = threadIdx.x; d < D; d += blockDim.x) {
        float v = xr[d];

        if (dr != NULL) {
            v += dr[d];
            xr[d] = v;
        }
        ss += v * v;
    }
    ss = moe_block_sum(ss, sh);
    inv = 1.0f / sqrtf(ss / (float) D + eps);
    for (int d = threadIdx.x; d < D; d += blockDim.x) {
        float o = w[d] * (xr[d] * inv);

        if (out != NULL) {
            out[(size_t) i * D + d] = moe_f2bf(o);
        }
        if (out_f32 != NULL) {
            out_f32[(size_t) i * D + d] = o;
        }
    }
}


extern "C" int
moe_cuda_add_rmsnorm(float *x, const float *delta, const int32_t *rows,
    int n_rows, int D, const float *w, float eps, moe_bf16_t *out,
    float *out_f32, cudaStream_t stream)
{
    if (n_rows <= 0) {
        return MOE_OK;
    }
    kernel_add_rmsnorm<<<n_rows, 256, 0, stream>>>(x, delta, rows, D, w, eps,
        reinterpret_cast<__nv_bfloat16 *>(out), out_f32);
    MOE_CUDA_CHECK_LAUNCH("kernel_add_rmsnorm");
    return MOE_OK;
}
