/*
 * Hopper (sm_90a) building blocks for the warpgroup tensor-core kernels:
 * wgmma from shared-memory descriptors, mbarriers, and TMA tile loads.
 * Device code only; include after common.cuh.
 *
 * Layout these helpers assume: an e4m3 operand tile stored K-major in
 * shared memory as 128-byte rows with the 128-byte swizzle (the 16-byte
 * chunk c of row r sits at chunk c ^ (r & 7)), 8-row groups 1024 bytes
 * apart, the tile 1024-byte aligned.  That is what a TMA load with
 * CU_TENSOR_MAP_SWIZZLE_128B and a 128-byte inner box writes.
 */
#ifndef MOE_KERNELS_WGMMA_CUH
#define MOE_KERNELS_WGMMA_CUH

#include <cuda.h>
#include <stdint.h>

/* The shared-memory matrix descriptor of such a tile at p: start address
 * (16-byte units), leading byte offset 1 (unused with a swizzle), stride
 * byte offset 1024 (8 rows), swizzle mode 1 (128 bytes).  One k step of
 * 32 e4m3 bytes further along K is + 2 (the swizzle applies to the
 * address bits, so the start moves by 32 bytes). */
__device__ __forceinline__ uint64_t
moe_wg_desc(const void *p)
{
    uint32_t a = (uint32_t) __cvta_generic_to_shared(p);

    return (uint64_t) ((a & 0x3ffff) >> 4) | ((uint64_t) 1 << 16)
           | ((uint64_t) (1024 >> 4) << 32) | ((uint64_t) 1 << 62);
}


/* D (64 x 128, fp32: the warpgroup's fragment d[64]) += A (64 x 32 e4m3,
 * descriptor da) . B (128 x 32 e4m3, descriptor db)^T, both K-major in
 * shared memory; asynchronous until moe_wg_wait.  Fragment: d[4 j + c +
 * 2 v] of lane l in warp w is row 16 w + l / 4 + 8 v, column 8 j + 2 (l %
 * 4) + c. */
__device__ __forceinline__ void
moe_wg_mma_e4m3_n128(float *d, uint64_t da, uint64_t db)
{
    asm volatile(
        "{\n"
        ".reg .pred p;\n"
        "setp.ne.b32 p, 1, 0;\n"
        "wgmma.mma_async.sync.aligned.m64n128k32.f32.e4m3.e4m3 {"
        "%0, %1, %2, %3, %4, %5, %6, %7, "
        "%8, %9, %10, %11, %12, %13, %14, %15, "
        "%16, %17, %18, %19, %20, %21, %22, %23, "
        "%24, %25, %26, %27, %28, %29, %30, %31, "
        "%32, %33, %34, %35, %36, %37, %38, %39, "
        "%40, %41, %42, %43, %44, %45, %46, %47, "
        "%48, %49, %50, %51, %52, %53, %54, %55, "
        "%56, %57, %58, %59, %60, %61, %62, %63}, "
        "%64, %65, p, 1, 1;\n"
        "}\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]),
          "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]),
          "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]),
          "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]),
          "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]),
          "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]),
          "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]),
          "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]),
          "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]),
          "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]),
          "+f"(d[40]), "+f"(d[41]), "+f"(d[42]), "+f"(d[43]),
          "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]),
          "+f"(d[48]), "+f"(d[49]), "+f"(d[50]), "+f"(d[51]),
          "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]),
          "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]),
          "+f"(d[60]), "+f"(d[61]), "+f"(d[62]), "+f"(d[63])
        : "l"(da), "l"(db));
}


/* The same with N 256: D (64 x 256, fp32: d[128]) += A (64 x 32) . B (256
 * x 32)^T.  A is read from shared memory once for all 256 columns (two
 * n128 instructions read it twice: shared-memory bandwidth is what bounds
 * a 128 x 256 tile).  Fragment: d[0..63] as moe_wg_mma_e4m3_n128's for
 * columns 0..127, d[64..127] the same for columns 128..255. */
__device__ __forceinline__ void
moe_wg_mma_e4m3_n256(float *d, uint64_t da, uint64_t db)
{
    asm volatile(
        "{\n"
        ".reg .pred p;\n"
        "setp.ne.b32 p, 1, 0;\n"
        "wgmma.mma_async.sync.aligned.m64n256k32.f32.e4m3.e4m3 {"
        "%0, %1, %2, %3, %4, %5, %6, %7, "
        "%8, %9, %10, %11, %12, %13, %14, %15, "
        "%16, %17, %18, %19, %20, %21, %22, %23, "
        "%24, %25, %26, %27, %28, %29, %30, %31, "
        "%32, %33, %34, %35, %36, %37, %38, %39, "
        "%40, %41, %42, %43, %44, %45, %46, %47, "
        "%48, %49, %50, %51, %52, %53, %54, %55, "
        "%56, %57, %58, %59, %60, %61, %62, %63, "
        "%64, %65, %66, %67, %68, %69, %70, %71, "
        "%72, %73, %74, %75, %76, %77, %78, %79, "
        "%80, %81, %82, %83, %84, %85, %86, %87, "
        "%88, %89, %90, %91, %92, %93, %94, %95, "
        "%96, %97, %98, %99, %100, %101, %102, %103, "
        "%104, %105, %106, %107, %108, %109, %110, %111, "
        "%112, %113, %114, %115, %116, %117, %118, %119, "
        "%120, %121, %122, %123, %124, %125, %126, %127}, "
        "%128, %129, p, 1, 1;\n"
        "}\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]),
          "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]),
          "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]),
          "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]),
          "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]),
          "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]),
          "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]),
          "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]),
          "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]),
          "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]),
          "+f"(d[40]), "+f"(d[41]), "+f"(d[42]), "+f"(d[43]),
          "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]),
          "+f"(d[48]), "+f"(d[49]), "+f"(d[50]), "+f"(d[51]),
          "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]),
          "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]),
          "+f"(d[60]), "+f"(d[61]), "+f"(d[62]), "+f"(d[63]),
          "+f"(d[64]), "+f"(d[65]), "+f"(d[66]), "+f"(d[67]),
          "+f"(d[68]), "+f"(d[69]), "+f"(d[70]), "+f"(d[71]),
          "+f"(d[72]), "+f"(d[73]), "+f"(d[74]), "+f"(d[75]),
          "+f"(d[76]), "+f"(d[77]), "+f"(d[78]), "+f"(d[79]),
          "+f"(d[80]), "+f"(d[81]), "+f"(d[82]), "+f"(d[83]),
          "+f"(d[84]), "+f"(d[85]), "+f"(d[86]), "+f"(d[87]),
          "+f"(d[88]), "+f"(d[89]), "+f"(d[90]), "+f"(d[91]),
          "+f"(d[92]), "+f"(d[93]), "+f"(d[94]), "+f"(d[95]),
          "+f"(d[96]), "+f"(d[97]), "+f"(d[98]), "+f"(d[99]),
          "+f"(d[100]), "+f"(d[101]), "+f"(d[102]), "+f"(d[103]),
          "+f"(d[104]), "+f"(d[105]), "+f"(d[106]), "+f"(d[107]),
          "+f"(d[108]), "+f"(d[109]), "+f"(d[110]), "+f"(d[111]),
          "+f"(d[112]), "+f"(d[113]), "+f"(d[114]), "+f"(d[115]),
          "+f"(d[116]), "+f"(d[117]), "+f"(d[118]), "+f"(d[119]),
          "+f"(d[120]), "+f"(d[121]), "+f"(d[122]), "+f"(d[123]),
          "+f"(d[124]), "+f"(d[125]), "+f"(d[126]), "+f"(d[127])
        : "l"(da), "l"(db));
}


__device__ __forceinline__ void
moe_wg_fence(void)
{
    asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory");
}


__device__ __forceinline__ void
moe_wg_commit(void)
{
    asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory");
}


/* Wait until at most N committed wgmma groups are pending. */
template <int N>
__device__ __forceinline__ void
moe_wg_wait(void)
{
    asm volatile("wgmma.wait_group.sync.aligned %0;\n" :: "n"(N) : "memory");
}


/* Keep the compiler from moving accumulator reads / writes across the
 * asynchronous wgmma. */
__device__ __forceinline__ void
moe_wg_fence_regs(float *d)
{
#pragma unroll
    for (int i = 0; i < 64; i++) {
        asm volatile("" : "+f"(d[i]) :: "memory");
    }
}


/* The same for an accumulator of any size. */
template <int N>
__device__ __forceinline__ void
moe_wg_fence_regs_n(float (&d)[N])
{
#pragma unroll
    for (int i = 0; i < N; i++) {
        asm volatile("" : "+f"(d[i]) :: "memory");
    }
}


/* The same for A fragments in registers (bf16x2 / f16x2 pairs) that an
 * in-flight wgmma reads: after the wait_group that retires it, so the
 * compiler cannot give their registers to values computed before the
 * wait (ptxas would then serialize every wgmma: warning C7513). */
template <int N>
__device__ __forceinline__ void
moe_wg_fence_frag_n(uint32_t (&a)[N][2])
{
#pragma unroll
    for (int i = 0; i < N; i++) {
        asm volatile("" : "+r"(a[i][0]), "+r"(a[i][1]) :: "memory");
    }
}


/* Generic-proxy stores to shared memory (st.shared by the threads) made
 * visible to the async proxy that wgmma reads B through; then a barrier. */
__device__ __forceinline__ void
moe_wg_fence_proxy_async(void)
{
    asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
}


/* bf16 wgmma with A from registers: D (64 x 16, fp32 d[8]) (+)= A (64 x
 * 16: this warp's 16 rows in a[0..3], the mma.m16n8k16 A layout) . B (16
 * x 16, K-major at descriptor db)^T; sd 0: D = A B (the old D ignored).
 * Fragment: d[4 j + c + 2 v] of lane l in warp w is row 16 w + l / 4 + 8
 * v, column 8 j + 2 (l % 4) + c.  A's registers stay read until
 * moe_wg_wait. */
__device__ __forceinline__ void
moe_wg_mma_bf16_rs_n16(float (&d)[8], const uint32_t (&a)[4], uint64_t db,
    int sd)
{
    asm volatile(
        "{\n"
        ".reg .pred p;\n"
        "setp.ne.b32 p, %13, 0;\n"
        "wgmma.mma_async.sync.aligned.m64n16k16.f32.bf16.bf16 "
        "{%0, %1, %2, %3, %4, %5, %6, %7}, {%8, %9, %10, %11}, %12, "
        "p, 1, 1, 0;\n"
        "}\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]),
          "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(db), "r"(sd)
        : "memory");
}


/* The same with N 32 (d[16]). */
__device__ __forceinline__ void
moe_wg_mma_bf16_rs_n32(float (&d)[16], const uint32_t (&a)[4], uint64_t db,
    int sd)
{
    asm volatile(
        "{\n"
        ".reg .pred p;\n"
        "setp.ne.b32 p, %21, 0;\n"
        "wgmma.mma_async.sync.aligned.m64n32k16.f32.bf16.bf16 "
        "{%0, %1, %2, %3, %4, %5, %6, %7, "
        "%8, %9, %10, %11, %12, %13, %14, %15}, "
        "{%16, %17, %18, %19}, %20, p, 1, 1, 0;\n"
        "}\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]),
          "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]),
          "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]),
          "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(db), "r"(sd)
        : "memory");
}


/* The descriptor of an MN-major bf16 B operand at p with the 128-byte
 * swizzle: one 128-byte row per k holding 64 consecutive N elements (16-
 * byte chunk c of row k at chunk c ^ (k & 7)), 8-row groups 1024 bytes
 * apart, 1024-byte aligned.  Both byte offsets are 1024: for an
 * instruction of N 64 only the 8-row group stride is used, whichever of
 * the two fields the hardware reads it from; N > 64 is not described. */
__device__ __forceinline__ uint64_t
moe_wg_desc_mn(const void *p)
{
    uint32_t a = (uint32_t) __cvta_generic_to_shared(p);

    return (uint64_t) ((a & 0x3ffff) >> 4) | ((uint64_t) (1024 >> 4) << 16)
           | ((uint64_t) (1024 >> 4) << 32) | ((uint64_t) 1 << 62);
}

/*
 * The bf16 and f16 wgmma products the prefill attention uses, one
 * definition per shape with the operand type a parameter (TY "bf16" or
 * "f16": the same 2-byte layouts and fragments).  The accumulator's
 * register list and its "+f" operands, of 32 and 64 floats:
 */
#define MOE_WG_L0 \
    "%0, %1, %2, %3, %4, %5, %6, %7, " \
    "%8, %9, %10, %11, %12, %13, %14, %15, " \
    "%16, %17, %18, %19, %20, %21, %22, %23, " \
    "%24, %25, %26, %27, %28, %29, %30, %31"
#define MOE_WG_L32 \
    "%32, %33, %34, %35, %36, %37, %38, %39, " \
    "%40, %41, %42, %43, %44, %45, %46, %47, " \
    "%48, %49, %50, %51, %52, %53, %54, %55, " \
    "%56, %57, %58, %59, %60, %61, %62, %63"
#define MOE_WG_R32 "{" MOE_WG_L0 "}"
#define MOE_WG_R64 "{" MOE_WG_L0 ", " MOE_WG_L32 "}"

#define MOE_WG_D32(d) \
    "+f"((d)[0]), "+f"((d)[1]), "+f"((d)[2]), "+f"((d)[3]), \
    "+f"((d)[4]), "+f"((d)[5]), "+f"((d)[6]), "+f"((d)[7]), \
    "+f"((d)[8]), "+f"((d)[9]), "+f"((d)[10]), "+f"((d)[11]), \
    "+f"((d)[12]), "+f"((d)[13]), "+f"((d)[14]), "+f"((d)[15]), \
    "+f"((d)[16]), "+f"((d)[17]), "+f"((d)[18]), "+f"((d)[19]), \
    "+f"((d)[20]), "+f"((d)[21]), "+f"((d)[22]), "+f"((d)[23]), \
    "+f"((d)[24]), "+f"((d)[25]), "+f"((d)[26]), "+f"((d)[27]), \
    "+f"((d)[28]), "+f"((d)[29]), "+f"((d)[30]), "+f"((d)[31])
#define MOE_WG_D64(d) MOE_WG_D32(d), MOE_WG_D32((d) + 32)


/* D (64 x N, fp32 d[N / 2]) (+)= A (64 x 16, K-major at descriptor da) .
 * B (N x 16, K-major at db)^T, both 128-byte swizzled rows of 64 elements
 * (moe_wg_desc); sd 0: D = A B (the old D ignored).  Fragment:
 * d[4 j + c + 2 v] of lane l in warp w is row 16 w + l / 4 + 8 v, column
 * 8 j + 2 (l % 4) + c.  N 64: NAME(float (&d)[32], ...), N 128: d[64]. */
#define MOE_WG_SS_N64(NAME, TY)                                              \
__device__ __forceinline__ void                                              \
NAME(float (&d)[32], uint64_t da, uint64_t db, int sd)                       \
{                                                                            \
    asm volatile(                                                            \
        "{\n"                                                                \
        ".reg .pred p;\n"                                                    \
        "setp.ne.b32 p, %34, 0;\n"                                           \
        "wgmma.mma_async.sync.aligned.m64n64k16.f32." TY "." TY " "          \
        MOE_WG_R32 ", %32, %33, p, 1, 1, 0, 0;\n"                            \
        "}\n"                                                                \
        : MOE_WG_D32(d)                                                      \
        : "l"(da), "l"(db), "r"(sd)                                          \
        : "memory");                                                         \
}
#define MOE_WG_SS_N128(NAME, TY)                                             \
__device__ __forceinline__ void                                              \
NAME(float (&d)[64], uint64_t da, uint64_t db, int sd)                       \
{                                                                            \
    asm volatile(                                                            \
        "{\n"                                                                \
        ".reg .pred p;\n"                                                    \
        "setp.ne.b32 p, %66, 0;\n"                                           \
        "wgmma.mma_async.sync.aligned.m64n128k16.f32." TY "." TY " "         \
        MOE_WG_R64 ", %64, %65, p, 1, 1, 0, 0;\n"                            \
        "}\n"                                                                \
        : MOE_WG_D64(d)                                                      \
        : "l"(da), "l"(db), "r"(sd)                                          \
        : "memory");                                                         \
}

/* D (64 x 64, fp32 d[32]) += A (64 x 16: this warp's 16 rows in a[0..3],
 * the mma.m16n8k16 A layout) . B (16 x 64), B MN-major at db
 * (moe_wg_desc_mn).  Fragment as the _ss_ products'.  A's registers stay
 * read until moe_wg_wait (moe_wg_fence_frag_n). */
#define MOE_WG_RS_N64_TB(NAME, TY)                                           \
__device__ __forceinline__ void                                              \
NAME(float (&d)[32], const uint32_t (&a)[4], uint64_t db)                    \
{                                                                            \
    asm volatile(                                                            \
        "{\n"                                                                \
        ".reg .pred p;\n"                                                    \
        "setp.ne.b32 p, 1, 0;\n"                                             \
        "wgmma.mma_async.sync.aligned.m64n64k16.f32." TY "." TY " "          \
        MOE_WG_R32 ", {%32, %33, %34, %35}, %36, p, 1, 1, 1;\n"              \
        "}\n"                                                                \
        : MOE_WG_D32(d)                                                      \
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(db)                \
        : "memory");                                                         \
}

MOE_WG_SS_N64(moe_wg_mma_bf16_ss_n64, "bf16")
MOE_WG_SS_N64(moe_wg_mma_f16_ss_n64, "f16")
MOE_WG_SS_N128(moe_wg_mma_bf16_ss_n128, "bf16")
MOE_WG_SS_N128(moe_wg_mma_f16_ss_n128, "f16")
MOE_WG_RS_N64_TB(moe_wg_mma_bf16_rs_n64_tb, "bf16")
MOE_WG_RS_N64_TB(moe_wg_mma_f16_rs_n64_tb, "f16")

/* ---- mbarriers (shared::cta) ---- */

__device__ __forceinline__ void
moe_mbar_init(uint64_t *b, int count)
{
    asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n"
                 :: "r"((uint32_t) __cvta_generic_to_shared(b)), "r"(count)
                 : "memory");
}


/* Make the initialised barriers visible to the async proxy (TMA). */
__device__ __forceinline__ void
moe_mbar_init_fence(void)
{
    asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
}


/* Spin until the phase of parity `parity` of b has completed:
 * moe_mbar_wait (acquire at CTA scope, the default), moe_mbar_wait_cluster
 * (acquire at cluster scope: the phase completed by another CTA's
 * arrivals, whose writes the waiter then reads). */
#define MOE_MBAR_WAIT_FN(NAME, SEM)                                          \
__device__ __forceinline__ void                                              \
NAME(uint64_t *b, int parity)                                                \
{                                                                            \
    uint32_t a = (uint32_t) __cvta_generic_to_shared(b);                     \
                                                                             \
    asm volatile(                                                            \
        "{\n"                                                                \
        ".reg .pred p;\n"                                                    \
        "MOE_MBAR_WAIT:\n"                                                   \
        "mbarrier.try_wait.parity" SEM ".shared::cta.b64 p, [%0], %1;\n"     \
        "@!p bra MOE_MBAR_WAIT;\n"                                           \
        "}\n" :: "r"(a), "r"(parity) : "memory");                            \
}

MOE_MBAR_WAIT_FN(moe_mbar_wait, "")
MOE_MBAR_WAIT_FN(moe_mbar_wait_cluster, ".acquire.cluster")


__device__ __forceinline__ void
moe_mbar_arrive(uint64_t *b)
{
    asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];\n"
                 :: "r"((uint32_t) __cvta_generic_to_shared(b)) : "memory");
}


/* Arrive and add `bytes` to the transaction count the phase waits for. */
__device__ __forceinline__ void
moe_mbar_expect(uint64_t *b, uint32_t bytes)
{
    asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;\n"
                 :: "r"((uint32_t) __cvta_generic_to_shared(b)), "r"(bytes)
                 : "memory");
}


/* ---- thread block clusters ---- */

/* This CTA's rank in its cluster. */
__device__ __forceinline__ uint32_t
moe_cluster_rank(void)
{
    uint32_t r;

    asm volatile("mov.u32 %0, %%cluster_ctarank;\n" : "=r"(r));
    return r;
}


/* The shared::cluster address of p (this CTA's shared memory) in the CTA
 * of rank `rank` of the cluster. */
__device__ __forceinline__ uint32_t
moe_cluster_map(const void *p, uint32_t rank)
{
    uint32_t r;

    asm volatile("mapa.shared::cluster.u32 %0, %1, %2;\n"
                 : "=r"(r)
                 : "r"((uint32_t) __cvta_generic_to_shared(p)), "r"(rank));
    return r;
}


/* Arrive on the mbarrier at shared::cluster address a (another CTA's),
 * releasing this thread's earlier writes at cluster scope. */
__device__ __forceinline__ void
moe_mbar_arrive_cluster(uint32_t a)
{
    asm volatile("mbarrier.arrive.release.cluster.shared::cluster.b64 _, "
                 "[%0];\n" :: "r"(a) : "memory");
}


/* A 32-bit store into another CTA's shared memory (shared::cluster
 * address a). */
__device__ __forceinline__ void
moe_st_cluster(uint32_t a, int v)
{
    asm volatile("st.shared::cluster.u32 [%0], %1;\n" :: "r"(a), "r"(v)
                 : "memory");
}


/* Every thread of every CTA of the cluster: arrive and wait (release /
 * acquire at cluster scope). */
__device__ __forceinline__ void
moe_cluster_sync(void)
{
    asm volatile("barrier.cluster.arrive.release.aligned;\n"
                 "barrier.cluster.wait.acquire.aligned;\n" ::: "memory");
}


/* ---- TMA tile loads (the map a __grid_constant__ kernel parameter) ---- */

/* The box of a 2-d map at (c0 along the inner dimension, c1) into dst,
 * completing on bar. */
__device__ __forceinline__ void
moe_tma_2d(void *dst, const CUtensorMap *map, int c0, int c1, uint64_t *bar)
{
    asm volatile(
        "cp.async.bulk.tensor.2d.shared::cluster.global.mbarrier::"
        "complete_tx::bytes [%0], [%1, {%2, %3}], [%4];\n"
        :: "r"((uint32_t) __cvta_generic_to_shared(dst)),
           "l"((uint64_t) map), "r"(c0), "r"(c1),
           "r"((uint32_t) __cvta_generic_to_shared(bar))
        : "memory");
}


/* The same for a 3-d map at (c0, c1, c2). */
__device__ __forceinline__ void
moe_tma_3d(void *dst, const CUtensorMap *map, int c0, int c1, int c2,
    uint64_t *bar)
{
    asm volatile(
        "cp.async.bulk.tensor.3d.shared::cluster.global.mbarrier::"
        "complete_tx::bytes [%0], [%1, {%2, %3, %4}], [%5];\n"
        :: "r"((uint32_t) __cvta_generic_to_shared(dst)),
           "l"((uint64_t) map), "r"(c0), "r"(c1), "r"(c2),
           "r"((uint32_t) __cvta_generic_to_shared(bar))
        : "memory");
}


/* moe_tma_3d into the same shared-memory offset of every CTA of the
 * cluster in mask (bit r: rank r), completing on the mbarrier at bar's
 * offset in each. */
__device__ __forceinline__ void
moe_tma_3d_mc(void *dst, const CUtensorMap *map, int c0, int c1, int c2,
    uint64_t *bar, uint16_t mask)
{
    asm volatile(
        "cp.async.bulk.tensor.3d.shared::cluster.global.mbarrier::"
        "complete_tx::bytes.multicast::cluster [%0], [%1, {%2, %3, %4}], "
        "[%5], %6;\n"
        :: "r"((uint32_t) __cvta_generic_to_shared(dst)),
           "l"((uint64_t) map), "r"(c0), "r"(c1), "r"(c2),
           "r"((uint32_t) __cvta_generic_to_shared(bar)), "h"(mask)
        : "memory");
}


/* Fetch a tensor map (a kernel parameter) into the descriptor cache. */
__device__ __forceinline__ void
moe_tma_prefetch_map(const CUtensorMap *map)
{
    asm volatile("prefetch.tensormap [%0];\n"
                 :: "l"((uint64_t) map) : "memory");
}

#endif /* MOE_KERNELS_WGMMA_CUH */
