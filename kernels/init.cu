/* fp32 -> bf16 conversion and hash-based random fills. */
#include "common.cuh"
#include "init.h"
#include <cuda_fp8.h>
#include <cuda_fp16.h>
#include <stdio.h>

/* The kernels use Hopper-only instructions (wgmma, setmaxnreg, TMA) and
 * are compiled for sm_90a alone (Makefile's NVCCFLAGS);
 * moe_cuda_kernels_runnable's message says so. */
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ != 900
#error "kernels/ are built for sm_90a only (see moe_cuda_kernels_runnable)"
#endif
#define MOE_KERNELS_TARGET "sm_90a (compute capability 9.0: H100, H200, GH200)"


__device__ __forceinline__ float
moe_hash_u(uint64_t seed, uint64_t i)
{
    /* splitmix64 of (seed, i) -> uniform [-1, 1) */
    uint64_t z = seed * 0x9e3779b97f4a7c15ULL + i + 0x632be59bd9b4e019ULL;

    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
    z ^= z >> 31;
    return (float) (z >> 40) * (2.0f / 16777216.0f) - 1.0f;
}


__global__ void
kernel_f32_to_bf16(const float *src, __nv_bfloat16 *dst, int64_t n)
{
    moe_pdl_enter();
    for (int64_t i = blockIdx.x * (int64_t) blockDim.x + threadIdx.x; i < n;
         i += (int64_t) gridDim.x * blockDim.x)
    {
        dst[i] = moe_f2bf(src[i]);
    }
}


__global__ void
kernel_fill_random_bf16(__nv_bfloat16 *dst, int64_t n, uint64_t seed,
    float scale)
{
    moe_pdl_enter();
    for (int64_t i = blockIdx.x * (int64_t) blockDim.x + threadIdx.x; i < n;
         i += (int64_t) gridDim.x * blockDim.x)
    {
        dst[i] = moe_f2bf(scale * moe_hash_u(seed, (uint64_t) i));
    }
}


__global__ void
kernel_fill_random_f32(float *dst, int64_t n, uint64_t seed, float scale,
    float offset)
{
    moe_pdl_enter();
    for (int64_t i = blockIdx.x * (int64_t) blockDim.x + threadIdx.x; i < n;
         i += (int64_t) gridDim.x * blockDim.x)
    {
        dst[i] = offset + scale * moe_hash_u(seed, (uint64_t) i);
    }
}


extern "C" int
moe_cuda_f32_to_bf16(const float *src, moe_bf16_t *dst, int64_t n,
    cudaStream_t stream)
{
    if (n <= 0) {
        return MOE_K_OK;
    }
    MOE_CUDA_CHECK(moe_launch(kernel_f32_to_bf16, moe_grid(n, 256), 256, 0,
        stream, src, reinterpret_cast<__nv_bfloat16 *>(dst), n));
    return MOE_K_OK;
}


extern "C" int
moe_cuda_fill_random_bf16(moe_bf16_t *dst, int64_t n, uint64_t seed,
    float scale, cudaStream_t stream)
{
    if (n <= 0) {
        return MOE_K_OK;
    }
    MOE_CUDA_CHECK(moe_launch(kernel_fill_random_bf16, moe_grid(n, 256 * 8),
        256, 0, stream, reinterpret_cast<__nv_bfloat16 *>(dst), n, seed,
        scale));
    return MOE_K_OK;
}


extern "C" int
moe_cuda_fill_random_f32(float *dst, int64_t n, uint64_t seed, float scale,
    float offset, cudaStream_t stream)
{
    if (n <= 0) {
        return MOE_K_OK;
    }
    MOE_CUDA_CHECK(moe_launch(kernel_fill_random_f32, moe_grid(n, 256 * 8),
        256, 0, stream, dst, n, seed, scale, offset));
    return MOE_K_OK;
}


__global__ void
kernel_fill_random_q(void *dst, int64_t n, uint64_t seed, int kind,
    float scale, float offset)
{
    moe_pdl_enter();
    for (int64_t i = blockIdx.x * (int64_t) blockDim.x + threadIdx.x; i < n;
         i += (int64_t) gridDim.x * blockDim.x)
    {
        float u = moe_hash_u(seed, (uint64_t) i);

        if (kind == 0) {
            __nv_fp8_e4m3 q(448.0f * u);

            ((__nv_fp8_e4m3 *) dst)[i] = q;
        } else if (kind == 1) {
            /* two hashes' high bits: every nibble uniform */
            uint32_t a = (uint32_t) ((u + 1.0f) * 65535.0f);
            uint32_t c = (uint32_t) ((moe_hash_u(seed ^ 0x5bd1e995ULL,
                                                 (uint64_t) i) + 1.0f)
                                     * 65535.0f);

            ((uint32_t *) dst)[i] = (a & 0xffffu) | (c << 16);
        } else {
            ((__half *) dst)[i] = __float2half(offset + scale * u);
        }
    }
}


static int
moe_fill_q(void *dst, int64_t n, uint64_t seed, int kind, float scale,
    float offset, cudaStream_t stream)
{
    if (n <= 0) {
        return MOE_K_OK;
    }
    MOE_CUDA_CHECK(moe_launch(kernel_fill_random_q, moe_grid(n, 256 * 8), 256,
        0, stream, dst, n, seed, kind, scale, offset));
    return MOE_K_OK;
}


extern "C" int
moe_cuda_fill_random_fp8(uint8_t *dst, int64_t n, uint64_t seed,
    cudaStream_t stream)
{
    return moe_fill_q(dst, n, seed, 0, 1.0f, 0.0f, stream);
}


extern "C" int
moe_cuda_fill_random_u32(uint32_t *dst, int64_t n, uint64_t seed,
    cudaStream_t stream)
{
    return moe_fill_q(dst, n, seed, 1, 1.0f, 0.0f, stream);
}


extern "C" int
moe_cuda_fill_random_f16(uint16_t *dst, int64_t n, uint64_t seed,
    float scale, float offset, cudaStream_t stream)
{
    return moe_fill_q(dst, n, seed, 2, scale, offset, stream);
}


/* The kernel the driver is asked about (never launched). */
__global__ void
kernel_runnable_probe(int *x)
{
    if (x != NULL) {
        *x = 1;
    }
}


extern "C" int
moe_cuda_kernels_runnable(int device, char *why, size_t len)
{
    cudaDeviceProp      p;
    cudaFuncAttributes  fa;
    cudaError_t         e;
    int                 n = 0, cur = -1;

    if (why != NULL && len > 0) {
        why[0] = '\0';
    }
    e = cudaGetDeviceCount(&n);
    if (e != cudaSuccess || device < 0 || device >= n) {
        (void) cudaGetLastError();
        if (why != NULL && len > 0) {
            snprintf(why, len, "no CUDA device %d (%d visible%s%s)", device,
                     e == cudaSuccess ? n : 0, e == cudaSuccess ? "" : ": ",
                     e == cudaSuccess ? "" : cudaGetErrorString(e));
        }
        return 0;
    }
    e = cudaGetDeviceProperties(&p, device);
    if (e != cudaSuccess) {
        (void) cudaGetLastError();
        if (why != NULL && len > 0) {
            snprintf(why, len, "cannot query CUDA device %d: %s", device,
                     cudaGetErrorString(e));
        }
        return 0;
    }
    if (cudaGetDevice(&cur) != cudaSuccess) {
        cur = -1;
    }
    e = cudaSetDevice(device);
    if (e == cudaSuccess) {
        e = cudaFuncGetAttributes(&fa, kernel_runnable_probe);
    }
    (void) cudaGetLastError();
    if (cur >= 0 && cur != device) {
        (void) cudaSetDevice(cur);
    }
    if (e != cudaSuccess) {
        if (why != NULL && len > 0) {
            snprintf(why, len, "CUDA device %d (%s) has compute capability "
                     "%d.%d; this build's kernels are for "
                     MOE_KERNELS_TARGET " (%s)", device, p.name, p.major,
                     p.minor, cudaGetErrorString(e));
        }
        return 0;
    }
    return 1;
}
