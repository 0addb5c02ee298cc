/*
 * Device helpers shared by the kernels: the MOE_CUDA_CHECK macro family,
 * warp/block reductions, bf16 conversions, the group of a block in a
 * grouped (per-expert) launch.  Inline PTX (mma, ldmatrix, cp.async):
 * ptx.cuh.
 */

#ifndef MOE_KERNELS_COMMON_CUH
#define MOE_KERNELS_COMMON_CUH

#include <cuda_runtime.h>
#include <cuda_bf16.h>
#include <cublas_v2.h>
#include <stdint.h>

#include "common.h"

/* Run a CUDA runtime call; on failure record it and return MOE_K_EBACKEND. */
#define MOE_CUDA_CHECK(stmt)                                                 \
    do {                                                                     \
        cudaError_t moe_e_ = (stmt);                                         \
        if (moe_e_ != cudaSuccess) {                                         \
            moe_cuda_set_error("%s at %s:%d: %s", #stmt, __FILE__, __LINE__, \
                               cudaGetErrorString(moe_e_));                  \
            return MOE_K_EBACKEND;                                           \
        }                                                                    \
    } while (0)

/* Let `kernel` take `bytes` of dynamic shared memory (past the 48 KB
 * default) with the largest shared-memory carveout: the grouped GEMMs'
 * cp.async stages.  Call once per kernel, before its first launch. */
template <typename K>
static inline cudaError_t
moe_smem_max_carveout(K kernel, size_t bytes)
{
    cudaError_t e = cudaFuncSetAttribute(
        kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, (int) bytes);

    if (e == cudaSuccess) {
        e = cudaFuncSetAttribute(
            kernel, cudaFuncAttributePreferredSharedMemoryCarveout,
            (int) cudaSharedmemCarveoutMaxShared);
    }
    return e;
}

/*
 * Programmatic dependent launch (sm_90).  Every kernel in kernels/ starts
 * with moe_pdl_enter(): griddepcontrol.wait (returns once the grid this
 * one depends on has completed and its writes are visible; a no-op for a
 * kernel launched without the attribute) and then
 * griddepcontrol.launch_dependents (the next kernel on the stream, when
 * launched with moe_launch and PDL on, may now be scheduled: its blocks
 * take free SM slots and wait in their own moe_pdl_enter).  Nothing a
 * kernel reads or writes in global memory may come before it, so the
 * stream order of every buffer stays what it was without PDL; what
 * overlaps is only the launch and block scheduling of the next kernel
 * with the tail of this one.  The exceptions read, before the wait, only
 * what no kernel of the step's chain before them writes: weights (the
 * dense fp8 GEMV's L2 prefetch; with dense_pre the dense fp8 and 4-bit
 * GEMVs' first two register stages; norm_route.cu's router rows) and,
 * in a one-token decode attention (att_early), the step's positions and
 * block table and the keys of earlier steps.
 */
__device__ __forceinline__ void
moe_pdl_enter(void)
{
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    asm volatile("griddepcontrol.wait;\n" ::: "memory");
    asm volatile("griddepcontrol.launch_dependents;\n" ::: "memory");
#endif
}


/* Bring the 128-byte line of p into L2: a hint (no register, no wait); L2
 * is coherent, so it may come before moe_pdl_enter for data that the
 * kernels before never write (weights). */
__device__ __forceinline__ void
moe_prefetch_l2(const void *p)
{
    asm volatile("prefetch.global.L2 [%0];\n" :: "l"(p));
}


/*
 * Launch `kernel` like kernel<<<grid, block, smem, s>>>(args...), with
 * programmatic stream serialization when moe_cuda_pdl_get() (the kernel
 * must begin with moe_pdl_enter()); moe_launch_cluster: in clusters of
 * `cluster` CTAs along x (1: none; grid.x a multiple of it).  Returns
 * the launch's status.
 */
template <typename... KArgs, typename... Args>
static inline cudaError_t
moe_launch_cluster(void (*kernel)(KArgs...), dim3 grid, dim3 block,
    size_t smem, cudaStream_t s, int cluster, Args &&...args)
{
    cudaLaunchConfig_t  cfg = {};
    cudaLaunchAttribute at[2] = {};
    unsigned            n = 0;

    cfg.gridDim = grid;
    cfg.blockDim = block;
    cfg.dynamicSmemBytes = smem;
    cfg.stream = s;
    if (moe_cuda_pdl_get()) {
        at[n].id = cudaLaunchAttributeProgrammaticStreamSerialization;
        at[n++].val.programmaticStreamSerializationAllowed = 1;
    }
    if (cluster > 1) {
        at[n].id = cudaLaunchAttributeClusterDimension;
        at[n].val.clusterDim.x = (unsigned) cluster;
        at[n].val.clusterDim.y = 1;
        at[n++].val.clusterDim.z = 1;
    }
    cfg.attrs = n > 0 ? at : NULL;
    cfg.numAttrs = n;
    return cudaLaunchKernelEx(&cfg, kernel, static_cast<Args &&>(args)...);
}

template <typename... KArgs, typename... Args>
static inline cudaError_t
moe_launch(void (*kernel)(KArgs...), dim3 grid, dim3 block, size_t smem,
    cudaStream_t s, Args &&...args)
{
    return moe_launch_cluster(kernel, grid, block, smem, s, 1,
                              static_cast<Args &&>(args)...);
}

/* Same for cuBLAS calls. */
#define MOE_CUBLAS_CHECK(stmt)                                               \
    do {                                                                     \
        cublasStatus_t moe_s_ = (stmt);                                      \
        if (moe_s_ != CUBLAS_STATUS_SUCCESS) {                               \
            moe_cuda_set_error("%s at %s:%d: cuBLAS %s", #stmt, __FILE__,    \
                               __LINE__, cublasGetStatusString(moe_s_));     \
            return MOE_K_EBACKEND;                                           \
        }                                                                    \
    } while (0)

/* After a <<<>>> launch: catches bad configurations (not async faults). */
#define MOE_CUDA_CHECK_LAUNCH(name)                                          \
    do {                                                                     \
        cudaError_t moe_e_ = cudaGetLastError();                             \
        if (moe_e_ != cudaSuccess) {                                         \
            moe_cuda_set_error("launch %s at %s:%d: %s", name, __FILE__,     \
                               __LINE__, cudaGetErrorString(moe_e_));        \
            return MOE_K_EBACKEND;                                           \
        }                                                                    \
    } while (0)

/* Propagate a moe status from a nested call. */
#define MOE_TRY(call)                                                        \
    do {                                                                     \
        int moe_rc_ = (call);                                                \
        if (moe_rc_ != MOE_K_OK) {                                           \
            return moe_rc_;                                                  \
        }                                                                    \
    } while (0)


/* Four bf16 values (8 bytes, as loaded) as floats. */
__device__ __forceinline__ float4
moe_bf16x4(uint2 u)
{
    __nv_bfloat162 a = *reinterpret_cast<__nv_bfloat162 *>(&u.x);
    __nv_bfloat162 b = *reinterpret_cast<__nv_bfloat162 *>(&u.y);
    float2         fa = __bfloat1622float2(a), fb = __bfloat1622float2(b);

    return make_float4(fa.x, fa.y, fb.x, fb.y);
}


/*
 * An unscaled fp8 GEMM product t with its row scale q and channel scale
 * w: t * (q * w), rounded (never fused into an add that follows).  Every
 * pass that applies the scales (the rescale kernel, and the readers that
 * fold them in: rope, FFN norm, un-permute) calls this, so they agree bit
 * for bit.
 */
__device__ __forceinline__ float
moe_fp8_unscale(float t, float q, float w)
{
    return __fmul_rn(t, q * w);
}


__device__ __forceinline__ float
moe_warp_sum(float v)
{
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) {
        v += __shfl_xor_sync(0xffffffffu, v, o);
    }
    return v;
}


__device__ __forceinline__ float
moe_warp_max(float v)
{
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) {
        v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
    }
    return v;
}


/*
 * Sum over the block (blockDim.x a multiple of 32, at most 1024); every
 * thread gets the result.  sh: 32 floats of shared memory.  Contains
 * __syncthreads(): call from all threads.
 */
__device__ __forceinline__ float
moe_block_sum(float v, float *sh)
{
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    int nw = (blockDim.x + 31) >> 5;

    v = moe_warp_sum(v);
    __syncthreads();               /* sh may be in use by a previous call */
    if (lane == 0) {
        sh[warp] = v;
    }
    __syncthreads();
    v = lane < nw ? sh[lane] : 0.0f;
    return moe_warp_sum(v);
}


/*
 * The group (expert) of block y of a grouped launch whose per-group rows
 * are [offs[e], offs[e + 1]): y itself, or, with a compact grid (offs
 * given and gridDim.y < E), the y-th non-empty group; -1 when there are
 * fewer non-empty groups than y + 1.  Called by all 32 lanes of a warp
 * (lane = threadIdx.x & 31); every warp of the block gets the same value.
 */
__device__ __forceinline__ int
moe_block_group(const int32_t *offs, int E, int lane)
{
    int y = (int) blockIdx.y;

    if (offs == NULL || (int) gridDim.y >= E) {
        return y;
    }
    for (int b0 = 0; b0 < E; b0 += 32) {
        int      ex = b0 + lane;
        unsigned m = __ballot_sync(0xffffffffu,
                                   ex < E && offs[ex + 1] > offs[ex]);
        int      c = __popc(m);

        if (y < c) {
            for (int i = 0; i < y; i++) {
                m &= m - 1u;            /* drop the lowest set bit */
            }
            return b0 + __ffs((int) m) - 1;
        }
        y -= c;
    }
    return -1;
}


__device__ __forceinline__ float
moe_bf2f(__nv_bfloat16 v)
{
    return __bfloat162float(v);
}


__device__ __forceinline__ __nv_bfloat16
moe_f2bf(float v)
{
    return __float2bfloat16_rn(v);
}


/* SwiGLU's product silu(g) u = g / (1 + e^-g) u in fp32: the one
 * formula every fused gate|up epilogue and the SwiGLU kernel use, so
 * that the GEMV, grouped-GEMM and tensor-core paths agree to the bit. */
__device__ __forceinline__ float
moe_silu_mul(float g, float u)
{
    return g / (1.0f + expf(-g)) * u;
}


/* Multiprocessors of the current device (132, the H200's, if it cannot be
 * read); read once per translation unit. */
static inline int
moe_sm_count(void)
{
    static int n = 0;

    if (n == 0) {
        int dev = 0, v = 0;

        if (cudaGetDevice(&dev) == cudaSuccess
            && cudaDeviceGetAttribute(&v, cudaDevAttrMultiProcessorCount,
                                      dev) == cudaSuccess && v > 0)
        {
            n = v;
        } else {
            n = 132;
        }
    }
    return n;
}


/* Grid size for n items of `per` each, capped for grid-stride loops. */
static inline unsigned
moe_grid(int64_t n, int per)
{
    int64_t g = (n + per - 1) / per;

    if (g < 1) {
        g = 1;
    }
    if (g > 65535LL * 32) {
        g = 65535LL * 32;
    }
    return (unsigned) g;
}

#endif /* MOE_KERNELS_COMMON_CUH */
