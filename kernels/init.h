/* Weight conversion and synthetic weights (benchmarks, tests). */
#ifndef MOE_KERNELS_INIT_H
#define MOE_KERNELS_INIT_H
#include "common.h"
#ifdef __cplusplus
extern "C" {
#endif
/* dst[i] = bf16(src[i]) (round to nearest even), i < n. */
int moe_cuda_f32_to_bf16(const float *src, moe_bf16_t *dst, int64_t n,
    cudaStream_t stream);

/* dst[i] = bf16(scale * u(seed, i)), u uniform in [-1, 1) from a hash of
 * (seed, i): the same values whatever the launch shape. */
int moe_cuda_fill_random_bf16(moe_bf16_t *dst, int64_t n, uint64_t seed,
    float scale, cudaStream_t stream);

/* Same in fp32, plus `offset`: dst[i] = offset + scale * u(seed, i). */
int moe_cuda_fill_random_f32(float *dst, int64_t n, uint64_t seed,
    float scale, float offset, cudaStream_t stream);

/* Synthetic packed weights (benchmarks of the quantized formats):
 * moe_cuda_fill_random_fp8: dst[i] = e4m3(448 u(seed, i)) (finite codes,
 *   the whole e4m3 range; pair with scales amax / 448);
 * moe_cuda_fill_random_u32: dst[i] = 32 hash bits (4-bit codes / zeros);
 * moe_cuda_fill_random_f16: dst[i] = fp16(offset + scale u(seed, i)). */
int moe_cuda_fill_random_fp8(uint8_t *dst, int64_t n, uint64_t seed,
    cudaStream_t stream);
int moe_cuda_fill_random_u32(uint32_t *dst, int64_t n, uint64_t seed,
    cudaStream_t stream);
int moe_cuda_fill_random_f16(uint16_t *dst, int64_t n, uint64_t seed,
    float scale, float offset, cudaStream_t stream);

/* 1 if this build's kernels can run on CUDA device `device` (the driver
 * has an image of them for it); else 0 with `why` (len bytes) saying
 * which device it is, its compute capability and what the kernels were
 * built for (sm_90a: compute capability 9.0, H100 / H200 / GH200).  The
 * calling thread's current device is left as it was. */
int moe_cuda_kernels_runnable(int device, char *why, size_t len);
#ifdef __cplusplus
}
#endif
#endif
