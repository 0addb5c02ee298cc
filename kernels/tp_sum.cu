/* Tensor-parallel all-reduce add over the ranks' device buffers. */
#include <string.h>

#include "common.cuh"
#include "tp_sum.h"


typedef struct {
    const float *p[MOE_K_TP_MAX];
} tp_srcs_t;


__global__ void
kernel_tp_sum(float *dst, tp_srcs_t s, int R, size_t lo, size_t hi)
{
    moe_pdl_enter();
    for (size_t i = lo + (size_t) blockIdx.x * blockDim.x + threadIdx.x;
         i < hi; i += (size_t) gridDim.x * blockDim.x)
    {
        float acc = 0.0f;

        for (int r = 0; r < R; r++) {
            if (s.p[r] != NULL) {
                acc += s.p[r][i];
            }
        }
        dst[i] = acc;
    }
}


extern "C" int
moe_cuda_tp_sum(float *dst, float *const *srcs, int R, size_t lo, size_t hi,
    cudaStream_t stream)
{
    tp_srcs_t sp;

    if (R < 1 || R > MOE_K_TP_MAX) {
        moe_cuda_set_error("moe_cuda_tp_sum: %d ranks (1..%d)", R,
                           MOE_K_TP_MAX);
        return MOE_K_EINVAL;
    }
    if (hi <= lo) {
        return MOE_K_OK;
    }
    memset(&sp, 0, sizeof(sp));
    for (int r = 0; r < R; r++) {
        sp.p[r] = srcs[r];
    }
    MOE_CUDA_CHECK(moe_launch(kernel_tp_sum,
        moe_grid((int64_t) (hi - lo), 256 * 4), 256, 0, stream, dst, sp, R, lo,
        hi));
    return MOE_K_OK;
}
