/*
 * Inline PTX shared by the tensor-core kernels (attention.cu, moe_gemv.cu,
 * moe_ggemm.cu): the bf16 and f16 mma.sync, ldmatrix, cp.async with its
 * group commit / wait, and the L2 evict-first policy.  sm_80 and newer.
 *
 * Fragment layouts are PTX's (m16n8k16, .row.col): lane l = 4 g + q holds
 * A rows g and g + 8, B column g, C rows g / g + 8 at columns 2q, 2q + 1.
 */
#ifndef MOE_KERNELS_PTX_CUH
#define MOE_KERNELS_PTX_CUH

#include <cuda_bf16.h>
#include <stdint.h>


/* c += A (16x16 bf16, a0..a3) . B (16x8 bf16, b0 b1), fp32 accumulate. */
__device__ __forceinline__ void
moe_mma_bf16(float (&c)[4], uint32_t a0, uint32_t a1, uint32_t a2,
    uint32_t a3, uint32_t b0, uint32_t b1)
{
    asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 "
                 "{%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
                 "{%0, %1, %2, %3};\n"
                 : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
                 : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
}


/* The same with f16 operands (a0..a3, b0 b1 hold f16 pairs). */
__device__ __forceinline__ void
moe_mma_f16(float (&c)[4], uint32_t a0, uint32_t a1, uint32_t a2,
    uint32_t a3, uint32_t b0, uint32_t b1)
{
    asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 "
                 "{%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
                 "{%0, %1, %2, %3};\n"
                 : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
                 : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
}


/* Four 8x8 bf16 matrices from shared memory (lane l gives row l's address). */
__device__ __forceinline__ void
moe_ldmatrix_x4(uint32_t &r0, uint32_t &r1, uint32_t &r2, uint32_t &r3,
    const __nv_bfloat16 *p)
{
    unsigned a = (unsigned) __cvta_generic_to_shared(p);

    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 "
                 "{%0, %1, %2, %3}, [%4];\n"
                 : "=r"(r0), "=r"(r1), "=r"(r2), "=r"(r3) : "r"(a));
}


/* The same, each matrix transposed. */
__device__ __forceinline__ void
moe_ldmatrix_x4_trans(uint32_t &r0, uint32_t &r1, uint32_t &r2,
    uint32_t &r3, const __nv_bfloat16 *p)
{
    unsigned a = (unsigned) __cvta_generic_to_shared(p);

    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 "
                 "{%0, %1, %2, %3}, [%4];\n"
                 : "=r"(r0), "=r"(r1), "=r"(r2), "=r"(r3) : "r"(a));
}


/* 16-byte global -> shared copy (L2 default policy); n = 0: 16 zero bytes
 * (no global access). */
__device__ __forceinline__ void
moe_cp_async16(__nv_bfloat16 *dst, const __nv_bfloat16 *src, int n)
{
    unsigned a = (unsigned) __cvta_generic_to_shared(dst);

    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n"
                 :: "r"(a), "l"(src), "r"(n) : "memory");
}


/* The same with an L2 cache policy (moe_l2_evict_first). */
__device__ __forceinline__ void
moe_cp_async16_pol(__nv_bfloat16 *dst, const __nv_bfloat16 *src, int n,
    uint64_t pol)
{
    unsigned a = (unsigned) __cvta_generic_to_shared(dst);

    asm volatile("cp.async.cg.shared.global.L2::cache_hint "
                 "[%0], [%1], 16, %2, %3;\n"
                 :: "r"(a), "l"(src), "r"(n), "l"(pol) : "memory");
}


/* The same, also prefetching the 256-byte L2 block around src. */
__device__ __forceinline__ void
moe_cp_async16_pol_pf(__nv_bfloat16 *dst, const __nv_bfloat16 *src, int n,
    uint64_t pol)
{
    unsigned a = (unsigned) __cvta_generic_to_shared(dst);

    asm volatile("cp.async.cg.shared.global.L2::cache_hint.L2::256B "
                 "[%0], [%1], 16, %2, %3;\n"
                 :: "r"(a), "l"(src), "r"(n), "l"(pol) : "memory");
}


/* Close the cp.async group of this thread's copies issued so far. */
__device__ __forceinline__ void
moe_cp_async_commit(void)
{
    asm volatile("cp.async.commit_group;\n" ::: "memory");
}


/* Wait until at most N of this thread's committed groups are pending. */
template <int N>
__device__ __forceinline__ void
moe_cp_async_wait(void)
{
    asm volatile("cp.async.wait_group %0;\n" :: "n"(N) : "memory");
}


/* An L2 policy that evicts first (data streamed once: weights). */
__device__ __forceinline__ uint64_t
moe_l2_evict_first(void)
{
    uint64_t pol;

    asm volatile("createpolicy.fractional.L2::evict_first.b64 %0, 1.0;\n"
                 : "=l"(pol));
    return pol;
}

#endif /* MOE_KERNELS_PTX_CUH */
