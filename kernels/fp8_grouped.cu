/*
 * The grouped e4m3 GEMM of the fp8 prefill's routed experts (fp8_grouped.h).
 *
 * Output tiles of 128 rows x 256 columns, ordered by group (expert),
 * then column tile, then row tile, so that an expert's rows (at most a
 * few MB) stay in L2 while each of its weight tiles is read once per row
 * tile from L2 and once from HBM.  The tile count is bounded from the
 * host's bound on the rows (r_max); each CTA finds its tiles (blockIdx.x,
 * then gridDim.x apart) from the offsets on the device and stops at the
 * first past the last.  The launch: one CTA per SM (persistent), so
 * that the producer loads the next tile's stages while the consumers
 * store the last one's products.
 *
 * Three warpgroups (384 threads).  Warpgroup 0's first thread is the
 * producer: per K tile of 128 bytes it waits until stage s is free
 * (empty[s]), announces the stage's bytes on full[s] and issues the TMA
 * loads into it (the 128 A rows; the 256 B rows, or with SwiGLU the 128
 * gate and the 128 up rows of the tile's columns; 128-byte swizzle, what
 * the wgmma descriptors read).  Warpgroups 1 and 2 are the consumers, 64
 * rows each: wait full[s], issue 4 k steps of wgmma m64n256k32 (FG_WIDE;
 * else 2 x m64n128k32; fp32 accumulators: 128 registers a thread),
 * commit, wait until the previous K tile's wgmma are done and release
 * its stage on empty[].  No block-wide barrier inside the K loop; 4
 * stages of 48 KB.  A rows of the tile past the group's end are other
 * rows (or TMA's zero fill past q_rows): their products are computed and
 * not stored.  The epilogue (FG_STAGED) goes through a 16 KB buffer per
 * consumer warpgroup and stores whole 256-byte rows; the SwiGLU variant
 * computes h there from the sums and the scales.
 *
 * Tile order (MOE_FG_DYN): the tiles in the same order, but each CTA's
 * producer takes the next tile from a counter in global memory (sched[0],
 * atomicAdd) when it has issued its last tile's loads, and hands the
 * index to the consumers through a two-slot ring in shared memory (its
 * own mbarriers: all 256 consumer threads arrive on a slot's "read"
 * barrier, so no warp can fall two phases behind); -1 ends them.  A CTA
 * that finished early takes the next tile sooner, so the grid ends within
 * about a tile of balanced where the static order (blockIdx.x, gridDim.x
 * apart) ends a whole wave late whenever the tiles are not a multiple of
 * the SMs (down at 2048 tokens: 560 tiles on 132 SMs, 5 waves of work
 * for 4.2).  The last CTA out (sched[1] counts them) resets both words
 * to zero for the next launch.  Measured (H100, bench/dev/wg_ggemm,
 * 1022..190 routing): gate|up 872.9 -> 831.5 us, down 427.3 -> 412.1.
 *
 * Measured against cuBLASLt's per-expert calls on one Mixtral layer
 * (bench/dev/wg_ggemm, H200; kernels/NOTES.md "FP8 prefill: our own
 * grouped expert GEMM"): 0.96-0.97 of their time on gate|up and on even
 * down, 1.01 on down at the engine's uneven routing; the SwiGLU variant
 * 1.24-1.29 of the plain one (not the default).
 */
#include <cuda.h>
#include <cudaTypedefs.h>

#include "common.cuh"
#include "fp8_grouped.h"
#include "fp8_grouped.cuh"
#include "wgmma.cuh"

#define FG_BN     256                   /* columns of a tile */
#define FG_BK     128                   /* bytes of K per stage */
#define FG_ST     4                     /* stages */
#define FG_NT     384                   /* producer + 2 consumer WGs */
#define FG_STAGE  ((FG_BM + FG_BN) * FG_BK)
#define FG_EP     (64 * 128 * 2)        /* a consumer's staged half tile */
#define FG_SMEM   (FG_ST * FG_STAGE + 1024)   /* + alignment slack */
#define FG_SMEM_EP (FG_SMEM + 2 * FG_EP)  /* with the staged epilogue */
#define FG_CTAS   (-1)                  /* the launch: one CTA per SM */
#define FG_WIDE   1                     /* m64n256k32 (else 2 x n128) */
#define FG_STAGED 1                     /* epilogue through shared memory */


/* A barrier of consumer warpgroup cw's 128 threads (named barrier 1 or
 * 2; constant ids, so the kernel reserves only those). */
__device__ __forceinline__ void
fg_bar_wg(int cw)
{
    if (cw == 0) {
        asm volatile("bar.sync 1, 128;\n" ::: "memory");
    } else {
        asm volatile("bar.sync 2, 128;\n" ::: "memory");
    }
}


/* The staged epilogue of consumer warpgroup cw (rows 64 cw .. of tile
 * t): per half of 128 columns (NH of them), its bf16 pairs pk[32 h + 2 j
 * + v] (row 16 warp + lane / 4 + 8 v, columns 8 j + 2 (lane % 4) + {0,
 * 1}) go to its 16 KB buffer ep (row rr's 16-byte chunk j at chunk j ^
 * (rr & 7): the 8 rows of a warp's store hit distinct banks), then the
 * warpgroup reads them back as 16-byte chunks and writes whole rows (256
 * bytes, full sectors) to Y (leading dimension ldy, from column c0).
 * Rows past the tile's are not stored. */
template <int NH>
__device__ __forceinline__ void
fg_store_staged(const uint32_t *pk, int cw, const fg_tile_t *t, int ldy,
    int c0, unsigned char *ep, __nv_bfloat16 *Y)
{
    const int lane = threadIdx.x & 31, w = (threadIdx.x >> 5) & 3;
    const int q = lane & 3, ti = threadIdx.x & 127;
    const int rows = t->mrows - 64 * cw;

#pragma unroll
    for (int h = 0; h < NH; h++) {
#pragma unroll
        for (int v = 0; v < 2; v++) {
            const int      rr = 16 * w + (lane >> 2) + 8 * v;
            unsigned char *er = ep + rr * 256 + 4 * q;

#pragma unroll
            for (int j = 0; j < 16; j++) {
                *reinterpret_cast<uint32_t *>(er + ((j ^ (rr & 7)) << 4))
                    = pk[32 * h + 2 * j + v];
            }
        }
        fg_bar_wg(cw);
#pragma unroll
        for (int i = 0; i < 8; i++) {
            const int c = ti + 128 * i, rr = c >> 4, ch = c & 15;

            if (rr < rows) {
                uint4 x = *reinterpret_cast<const uint4 *>(
                    ep + rr * 256 + ((ch ^ (rr & 7)) << 4));

                *reinterpret_cast<uint4 *>(
                    Y + (size_t) (t->r0 + 64 * cw + rr) * ldy + c0 + 128 * h
                    + 8 * ch) = x;
            }
        }
        fg_bar_wg(cw);
    }
}


/* bf16 pair of (a, b) as 32 bits */
__device__ __forceinline__ uint32_t
fg_pack(float a, float b)
{
    __nv_bfloat162 p = __floats2bfloat162_rn(a, b);

    return *reinterpret_cast<uint32_t *>(&p);
}


/* The SwiGLU epilogue: d[0..63] the gate products, d[64..127] the up
 * products of the same 128 columns, unscaled, first rounded to bf16
 * pairs (as the unfused path stores them, and half the registers); with
 * the row scale qs and the tile's channel scales sws (shared memory:
 * gate 0 .. 127, up 128 .. 255), pk[2 j + v] (row 16 warp + lane / 4 + 8 v,
 * columns 8 j + 2 (lane % 4) + {0, 1}) = bf16(g / (1 + exp(-g)) * u), g =
 * G * (qs[r] * ws[c]) as moe_cuda_silu_quant_fp8 computes it.  Rows past
 * the tile's read no scale. */
__device__ __forceinline__ void
fg_swiglu(const float *d, int cw, const fg_tile_t *t, const float *qs,
    const float *sws, uint32_t *pk)
{
    const int lane = threadIdx.x & 31, w = (threadIdx.x >> 5) & 3;
    const int q = lane & 3;
    uint32_t  pu[32];

#pragma unroll
    for (int i = 0; i < 32; i++) {
        /* i = 2 j + v: d[4 j + 2 v], d[.. + 1] */
        const int j = i >> 1, v = i & 1;

        pk[i] = fg_pack(d[4 * j + 2 * v], d[4 * j + 2 * v + 1]);
        pu[i] = fg_pack(d[64 + 4 * j + 2 * v], d[64 + 4 * j + 2 * v + 1]);
    }
#pragma unroll
    for (int v = 0; v < 2; v++) {
        const int   rr = 64 * cw + 16 * w + (lane >> 2) + 8 * v;
        const float sr = rr < t->mrows ? qs[t->r0 + rr] : 0.0f;

#pragma unroll
        for (int j = 0; j < 16; j++) {
            const int      c = 8 * j + 2 * q;
            const float2   wg = *reinterpret_cast<const float2 *>(sws + c);
            const float2   wu = *reinterpret_cast<const float2 *>(sws + 128
                                                                  + c);
            __nv_bfloat162 G = *reinterpret_cast<__nv_bfloat162 *>(
                                   &pk[2 * j + v]);
            __nv_bfloat162 U = *reinterpret_cast<__nv_bfloat162 *>(
                                   &pu[2 * j + v]);
            float          g0 = __low2float(G) * (sr * wg.x);
            float          g1 = __high2float(G) * (sr * wg.y);
            float          u0 = __low2float(U) * (sr * wu.x);
            float          u1 = __high2float(U) * (sr * wu.y);

            pk[2 * j + v] = fg_pack(g0 / (1.0f + __expf(-g0)) * u0,
                                    g1 / (1.0f + __expf(-g1)) * u1);
            /* keep the next columns' scale reads (shared memory, a few
             * cycles) here: hoisted, they would hold 64 registers */
            if ((j & 3) == 3) {
                asm volatile("" ::: "memory");
            }
        }
    }
}


/* A wait on one of this CTA's barriers: acquiring at cluster scope when
 * the other CTA of a pair arrives on it (PAIR), else at CTA scope. */
template <bool CLUSTER>
__device__ __forceinline__ void
fg_wait(uint64_t *b, int parity)
{
    if (CLUSTER) {
        moe_mbar_wait_cluster(b, parity);
    } else {
        moe_mbar_wait(b, parity);
    }
}


/* A consumer warpgroup's part of kernel_fp8_grouped (threads 128..383;
 * rows 64 cw .. of each tile): the tiles as the producer loads them (the
 * static order, or DYN's slots), the wgmma of each stage, the stage's
 * release (PAIR: on the peer's barrier too), the epilogue. */
template <int WIDE, int STAGED, int SWIGLU, int SCH>
__device__ __forceinline__ void
fg_consume(unsigned char *sm, uint64_t *full, uint64_t *empty,
    uint64_t *tfull, uint64_t *tempty, const int *tslot,
    const int32_t *offs, int E, int N, int nk, const float *qs,
    const float *ws, size_t ws_stride, __nv_bfloat16 *Y, int rank)
{
    constexpr bool DYN = (SCH & MOE_FG_DYN) != 0;
    constexpr bool PAIR = (SCH & MOE_FG_PAIR) != 0;
    const int tid = threadIdx.x, ntn = N / FG_BN, peer = rank ^ 1;
    const int cw = (tid >> 7) - 1;      /* consumer: rows 64 cw .. */
    float     d[128];                   /* columns 0..127, 128..255 */
    uint32_t  it = 0;
    fg_tile_t t;

    for (int j = 0;; j++) {
        int bid = blockIdx.x + j * gridDim.x;

        if (DYN) {
            fg_wait<PAIR>(&tfull[j & 1], (j >> 1) & 1);
            bid = tslot[j & 1];
            if (PAIR && rank == 1) {
                moe_mbar_arrive_cluster(moe_cluster_map(&tempty[j & 1], 0));
            } else {
                moe_mbar_arrive(&tempty[j & 1]);
            }
            if (bid < 0) {
                break;
            }
        }
        if (!fg_tile<PAIR ? 2 : 1>(offs, E, ntn, bid, &t, rank)) {
            break;
        }
#pragma unroll
        for (int i = 0; i < 128; i++) {
            d[i] = 0.0f;
        }
        if (SWIGLU) {
            /* the tile's 128 gate and 128 up channel scales into the
             * warpgroup's epilogue buffer, free until the epilogue (the
             * last tile's store ended with a warpgroup barrier) */
            const float *we = ws + (size_t) t.e * ws_stride + t.nt * 128;
            float       *sws = reinterpret_cast<float *>(
                                   sm + FG_ST * FG_STAGE + cw * FG_EP);
            const int    ti = tid & 127;

            sws[ti] = we[ti];
            sws[128 + ti] = we[N / 2 + ti];
        }
        for (int kt = 0; kt < nk; kt++, it++) {
            const int s = it % FG_ST;
            const unsigned char *sa = sm + s * FG_STAGE + cw * 64 * FG_BK;
            const unsigned char *sb = sm + s * FG_STAGE + FG_BM * FG_BK;
            const uint64_t da = moe_wg_desc(sa), db0 = moe_wg_desc(sb),
                           db1 = moe_wg_desc(sb + 128 * FG_BK);

            moe_mbar_wait(&full[s], (it / FG_ST) & 1);
            moe_wg_fence_regs(d);
            moe_wg_fence_regs(d + 64);
            moe_wg_fence();
#pragma unroll
            for (int ks = 0; ks < FG_BK / 32; ks++) {
                if (WIDE) {
                    /* A read once for the 256 columns */
                    moe_wg_mma_e4m3_n256(d, da + 2 * ks, db0 + 2 * ks);
                } else {
                    moe_wg_mma_e4m3_n128(d, da + 2 * ks, db0 + 2 * ks);
                    moe_wg_mma_e4m3_n128(d + 64, da + 2 * ks, db1 + 2 * ks);
                }
            }
            moe_wg_commit();
            moe_wg_fence_regs(d);
            moe_wg_fence_regs(d + 64);
            moe_wg_wait<1>();           /* K tile it - 1's wgmma done */
            if (kt > 0 && (tid & 127) == 0) {
                moe_mbar_arrive(&empty[(it - 1) % FG_ST]);
                if (PAIR) {
                    moe_mbar_arrive_cluster(
                        moe_cluster_map(&empty[(it - 1) % FG_ST], peer));
                }
            }
        }
        moe_wg_wait<0>();
        moe_wg_fence_regs(d);
        moe_wg_fence_regs(d + 64);
        if ((tid & 127) == 0) {
            /* the tile's last stage: free for the next tile's loads,
             * which then overlap this epilogue */
            moe_mbar_arrive(&empty[(it - 1) % FG_ST]);
            if (PAIR) {
                moe_mbar_arrive_cluster(
                    moe_cluster_map(&empty[(it - 1) % FG_ST], peer));
            }
        }
        if (SWIGLU) {
            unsigned char *ep = sm + FG_ST * FG_STAGE + cw * FG_EP;
            uint32_t       pk[32];

            fg_bar_wg(cw);              /* the scales in ep are in */
            fg_swiglu(d, cw, &t, qs, reinterpret_cast<const float *>(ep),
                      pk);
            fg_bar_wg(cw);              /* ... and read: ep is free */
            fg_store_staged<1>(pk, cw, &t, N / 2, t.nt * 128, ep, Y);
        } else if (STAGED) {
            uint32_t pk[64];            /* half the registers of d */

#pragma unroll
            for (int i = 0; i < 64; i++) {
                /* i = 32 h + 2 j + v: d[64 h + 4 j + 2 v], d[.. + 1] */
                const int h = i >> 5, jj = (i >> 1) & 15, v = i & 1;

                pk[i] = fg_pack(d[64 * h + 4 * jj + 2 * v],
                                d[64 * h + 4 * jj + 2 * v + 1]);
            }
            fg_store_staged<2>(pk, cw, &t, N, t.nt * FG_BN,
                               sm + FG_ST * FG_STAGE + cw * FG_EP, Y);
        } else {
            fg_store<2>(reinterpret_cast<float (*)[64]>(d), cw, &t, N,
                        t.nt * FG_BN, Y);
        }
    }
}


template <int WIDE, int STAGED, int SWIGLU, int SCH>
__global__ void __launch_bounds__(FG_NT, 1)
kernel_fp8_grouped(const __grid_constant__ CUtensorMap mq,
    const __grid_constant__ CUtensorMap mw, const int32_t *offs, int E,
    int N, int K, const float *qs, const float *ws, size_t ws_stride,
    __nv_bfloat16 *Y, uint32_t *sched)
{
    constexpr bool DYN = (SCH & MOE_FG_DYN) != 0;
    constexpr bool PAIR = (SCH & MOE_FG_PAIR) != 0;
    static_assert(!PAIR || DYN, "pairs draw their tiles");
    extern __shared__ unsigned char fg_sm_raw[];
    unsigned char *sm = (unsigned char *)
        (((uintptr_t) fg_sm_raw + 1023) & ~(uintptr_t) 1023);
    __shared__ __align__(8) uint64_t full[FG_ST], empty[FG_ST];
    __shared__ __align__(8) uint64_t tfull[2], tempty[2];
    __shared__ int tslot[2];
    const int tid = threadIdx.x, ntn = N / FG_BN, nk = K / FG_BK;
    const int rank = PAIR ? (int) moe_cluster_rank() : 0, peer = rank ^ 1;
    fg_tile_t t;

    if (tid == 0) {
        moe_tma_prefetch_map(&mq);
        moe_tma_prefetch_map(&mw);
    }
    moe_pdl_enter();
    if (!DYN && !fg_tile(offs, E, ntn, blockIdx.x, &t)) {
        return;                         /* past the last tile */
    }
    if (tid == 0) {
        for (int s = 0; s < FG_ST; s++) {
            moe_mbar_init(&full[s], 1);
            /* both consumers of this CTA, and with PAIR the peer's too
             * (the producers write into both CTAs' stages) */
            moe_mbar_init(&empty[s], PAIR ? 4 : 2);
        }
        if (DYN) {
            for (int s = 0; s < 2; s++) {
                moe_mbar_init(&tfull[s], 1);
                /* every consumer thread reads the slot; PAIR: rank 0's
                 * counts rank 1's consumers and producer too */
                moe_mbar_init(&tempty[s], PAIR ? 2 * (FG_NT - 128) + 1
                                               : FG_NT - 128);
            }
        }
        moe_mbar_init_fence();
    }
    __syncthreads();
    if (PAIR) {
        moe_cluster_sync();             /* the peer's barriers are set */
    }

    /* static order: the tiles blockIdx.x, + gridDim.x, ...: one per CTA
     * when the grid covers them all, a persistent loop when it is one
     * CTA per SM (the producer then fills the next tile's stages during
     * the epilogue); DYN: the counter's (PAIR: rank 0 draws the pair's
     * tile, writes it into both CTAs' slot and arrives on both tfull).
     * `it` counts K tiles over the CTA's tiles: stage it % FG_ST, phase
     * (it / FG_ST) & 1, the same sequence on both sides; j counts the
     * CTA's tiles (ring slot j & 1, phase (j / 2) & 1). */
    if (tid < 128) {
        /* the producer */
        if (tid == 0) {
            uint32_t it = 0;
            int      bid = blockIdx.x;

            for (int j = 0;; j++) {
                int have;

                if (PAIR && rank == 1) {
                    moe_mbar_wait_cluster(&tfull[j & 1], (j >> 1) & 1);
                    bid = tslot[j & 1];
                    moe_mbar_arrive_cluster(
                        moe_cluster_map(&tempty[j & 1], 0));
                    have = bid >= 0
                           && fg_tile<2>(offs, E, ntn, bid, &t, rank);
                } else if (DYN) {
                    bid = (int) atomicAdd(&sched[0], 1u);
                    have = fg_tile<PAIR ? 2 : 1>(offs, E, ntn, bid, &t,
                                                 rank);
                    if (j >= 2) {
                        /* every reader took tile j - 2's index */
                        fg_wait<PAIR>(&tempty[j & 1], ((j >> 1) - 1) & 1);
                    }
                    tslot[j & 1] = have ? bid : -1;
                    if (PAIR) {
                        moe_st_cluster(moe_cluster_map(&tslot[j & 1], peer),
                                       have ? bid : -1);
                        moe_mbar_arrive_cluster(
                            moe_cluster_map(&tfull[j & 1], peer));
                    }
                    moe_mbar_arrive(&tfull[j & 1]);
                } else {
                    have = fg_tile(offs, E, ntn, bid, &t);
                }
                if (!have) {
                    break;
                }
                for (int kt = 0; kt < nk; kt++, it++) {
                    const int s = it % FG_ST;

                    if (it >= FG_ST) {
                        /* every consumer released K tile it - FG_ST */
                        fg_wait<PAIR>(&empty[s], ((it / FG_ST) - 1) & 1);
                    }
                    moe_mbar_expect(&full[s], (uint32_t) FG_STAGE);
                    moe_tma_2d(sm + s * FG_STAGE, &mq, kt * FG_BK, t.r0,
                               &full[s]);
                    /* B: 256 rows from nt * 256, or (SwiGLU) 128 gate
                     * rows from nt * 128 and the up rows F further;
                     * PAIR: this rank's 128 of them, into both CTAs */
                    unsigned char *sb = sm + s * FG_STAGE + FG_BM * FG_BK;

                    if (PAIR) {
                        int row = SWIGLU ? rank * (N / 2) + t.nt * 128
                                         : t.nt * FG_BN + rank * 128;

                        moe_tma_3d_mc(sb + rank * 128 * FG_BK, &mw,
                                      kt * FG_BK, row, t.e, &full[s], 3);
                    } else if (SWIGLU) {
                        moe_tma_3d(sb, &mw, kt * FG_BK, t.nt * 128, t.e,
                                   &full[s]);
                        moe_tma_3d(sb + 128 * FG_BK, &mw, kt * FG_BK,
                                   N / 2 + t.nt * 128, t.e, &full[s]);
                    } else {
                        moe_tma_3d(sb, &mw, kt * FG_BK, t.nt * FG_BN, t.e,
                                   &full[s]);
                    }
                }
                bid += gridDim.x;
            }
            if (DYN && rank == 0) {
                /* this CTA's (pair's) last draw is in: the last one out
                 * zeroes the counters (every draw came before) */
                const uint32_t n = PAIR ? gridDim.x / 2 : gridDim.x;

                __threadfence();
                if (atomicAdd(&sched[1], 1u) == n - 1) {
                    __threadfence();
                    atomicExch(&sched[0], 0u);
                    atomicExch(&sched[1], 0u);
                }
            }
        }
    } else {
        fg_consume<WIDE, STAGED, SWIGLU, SCH>(sm, full, empty, tfull,
                                               tempty, tslot, offs, E, N,
                                               nk, qs, ws, ws_stride, Y,
                                               rank);
    }
    if (PAIR) {
        /* no CTA leaves while its peer may still arrive on its barriers */
        moe_cluster_sync();
    }
}


/* cuTensorMapEncodeTiled through the runtime's driver entry point (no
 * link against libcuda); NULL when the driver lacks it.  Races are
 * benign: every caller stores the same pointer. */
static PFN_cuTensorMapEncodeTiled_v12000
fg_encoder(void)
{
    static PFN_cuTensorMapEncodeTiled_v12000 enc;
    PFN_cuTensorMapEncodeTiled_v12000        e;
    cudaDriverEntryPointQueryResult          q;

    e = __atomic_load_n(&enc, __ATOMIC_ACQUIRE);
    if (e != NULL) {
        return e;
    }
    if (cudaGetDriverEntryPointByVersion("cuTensorMapEncodeTiled",
                                         (void **) &e, 12000,
                                         cudaEnableDefault, &q)
            != cudaSuccess
        || q != cudaDriverEntryPointSuccess)
    {
        (void) cudaGetLastError();
        return NULL;
    }
    __atomic_store_n(&enc, e, __ATOMIC_RELEASE);
    return e;
}


/* A map of `rank` dims (dim[0] bytes innermost, then rows, then groups;
 * strides in bytes of dims 1..), boxes of 128 bytes x box_rows (x 1),
 * 128-byte swizzle, zeros read past the end. */
static int
fg_map(CUtensorMap *m, const void *base, int rank, const cuuint64_t *dim,
    const cuuint64_t *stride, int box_rows)
{
    PFN_cuTensorMapEncodeTiled_v12000 enc = fg_encoder();
    cuuint32_t box[3] = { FG_BK, (cuuint32_t) box_rows, 1 };
    cuuint32_t es[3] = { 1, 1, 1 };
    CUresult   r;

    if (enc == NULL) {
        moe_cuda_set_error("fp8 grouped GEMM: the driver has no "
                           "cuTensorMapEncodeTiled");
        return MOE_K_EUNSUPPORTED;
    }
    r = enc(m, CU_TENSOR_MAP_DATA_TYPE_UINT8, (cuuint32_t) rank,
            (void *) base, dim, stride, box, es,
            CU_TENSOR_MAP_INTERLEAVE_NONE, CU_TENSOR_MAP_SWIZZLE_128B,
            CU_TENSOR_MAP_L2_PROMOTION_L2_256B,
            CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE);
    if (r != CUDA_SUCCESS) {
        moe_cuda_set_error("fp8 grouped GEMM: cuTensorMapEncodeTiled: "
                           "error %d", (int) r);
        return MOE_K_EBACKEND;
    }
    return MOE_K_OK;
}


extern "C" int
moe_cuda_fp8_grouped_supported(int N, int K, size_t wstride)
{
    return N > 0 && K > 0 && N % FG_BN == 0 && K % FG_BK == 0
           && wstride % 16 == 0 && wstride >= (size_t) N * (size_t) K;
}


#define FG_SWIGLU 32                    /* fg_launch: the SwiGLU epilogue */

typedef void (*fg_kf_t)(const CUtensorMap, const CUtensorMap,
                        const int32_t *, int, int, int, const float *,
                        const float *, size_t, __nv_bfloat16 *, uint32_t *);

/* The instance of variant bits v (MOE_FG_*, FG_SWIGLU): every tile order
 * for the shipped shapes (wide, staged; with and without SwiGLU), the
 * static order for the other epilogue and wgmma choices; NULL for a
 * combination not built. */
static fg_kf_t
fg_kernel(int v)
{
    enum { D = MOE_FG_DYN, P = MOE_FG_DYN | MOE_FG_PAIR };
    static const fg_kf_t ship[2][3] = {
        { kernel_fp8_grouped<1, 1, 0, 0>, kernel_fp8_grouped<1, 1, 0, D>,
          kernel_fp8_grouped<1, 1, 0, P> },
        { kernel_fp8_grouped<1, 1, 1, 0>, kernel_fp8_grouped<1, 1, 1, D>,
          kernel_fp8_grouped<1, 1, 1, P> }
    };
    static const fg_kf_t other[3] = {
        kernel_fp8_grouped<0, 0, 0, 0>, kernel_fp8_grouped<1, 0, 0, 0>,
        kernel_fp8_grouped<0, 1, 0, 0>
    };
    int sch = v & (MOE_FG_DYN | MOE_FG_PAIR);
    int o = sch == 0 ? 0 : sch == D ? 1 : sch == P ? 2 : -1;

    if (o < 0) {
        return NULL;                    /* pairs without drawn tiles */
    }
    if ((v & FG_SWIGLU) || (v & 3) == 3) {
        return ship[(v & FG_SWIGLU) != 0][o];
    }
    return o == 0 ? other[v & 3] : NULL;
}


/* Both entry points: the variant bits (MOE_FG_*, FG_SWIGLU), the grid
 * (ctas as moe_cuda_fp8_grouped_gemm_ctas; PAIR: CTAs in clusters of 2,
 * an even count), the counters (MOE_FG_DYN), the maps, the launch.  N:
 * the weight rows per group (2 F with SwiGLU). */
static int
fg_launch(const uint8_t *Q, int q_rows, const uint8_t *W, size_t wstride,
    const int32_t *offs, int E, int r_max, int N, int K, const float *qs,
    const float *ws, size_t ws_stride, moe_bf16_t *Y, int ctas, int variant,
    uint32_t *sched, cudaStream_t stream)
{
    fg_kf_t     kf = fg_kernel(variant);
    int         swiglu = (variant & FG_SWIGLU) != 0;
    int         pair = (variant & MOE_FG_PAIR) != 0;
    size_t      smem = swiglu || (variant & MOE_FG_STAGED) ? FG_SMEM_EP
                                                          : FG_SMEM;
    CUtensorMap mq, mw;
    cuuint64_t  qdim[2] = { (cuuint64_t) K, (cuuint64_t) q_rows };
    cuuint64_t  qstr[1] = { (cuuint64_t) K };
    cuuint64_t  wdim[3] = { (cuuint64_t) K, (cuuint64_t) N,
                            (cuuint64_t) E };
    cuuint64_t  wstr[2] = { (cuuint64_t) K, (cuuint64_t) wstride };
    size_t      tiles;
    int         rc;

    if (kf == NULL || ((variant & MOE_FG_DYN) && sched == NULL)) {
        moe_cuda_set_error("fp8 grouped GEMM: variant %d not built%s",
                           variant, kf != NULL ? " (no counters)" : "");
        return MOE_K_EINVAL;
    }
    if (!moe_cuda_fp8_grouped_supported(N, K, wstride) || E < 1
        || q_rows < 1 || r_max < 0 || (uintptr_t) Q % 16 != 0
        || (uintptr_t) W % 16 != 0 || offs == NULL || Y == NULL)
    {
        return MOE_K_EUNSUPPORTED;
    }
    if (r_max == 0) {
        return MOE_K_OK;
    }
    /* every group's row tiles: at most ceil(r_max / 128) + E, one
     * partial tile per group; N / 256 column tiles (SwiGLU: F / 128);
     * PAIR: CTAs for as many (a pair's rank past its group's row tiles
     * multiplies rows it does not store) */
    tiles = ((size_t) (r_max + FG_BM - 1) / FG_BM + (size_t) E)
            * (size_t) (N / FG_BN);
    if (pair) {
        tiles += tiles & 1;
    }
    if (tiles > 0x7fffffff) {
        return MOE_K_EUNSUPPORTED;
    }
    if ((rc = fg_map(&mq, Q, 2, qdim, qstr, FG_BM)) != MOE_K_OK
        || (rc = fg_map(&mw, W, 3, wdim, wstr,
                        swiglu || pair ? 128 : FG_BN)) != MOE_K_OK)
    {
        return rc;
    }
    /* each call: the attribute belongs to the current device's context
     * (tensor-parallel ranks run on several), and costs no sync */
    MOE_CUDA_CHECK(cudaFuncSetAttribute(
        kf, cudaFuncAttributeMaxDynamicSharedMemorySize, (int) smem));
    if (ctas < 0) {
        int dev, sms;

        MOE_CUDA_CHECK(cudaGetDevice(&dev));
        MOE_CUDA_CHECK(cudaDeviceGetAttribute(
            &sms, cudaDevAttrMultiProcessorCount, dev));
        ctas = sms * -ctas;
    }
    if (ctas > 0 && (size_t) ctas < tiles) {
        tiles = (size_t) ctas;
    }
    if (pair) {
        tiles &= ~(size_t) 1;           /* whole clusters */
        if (tiles < 2) {
            tiles = 2;
        }
    }
    MOE_CUDA_CHECK(moe_launch_cluster(kf, dim3((unsigned) tiles),
                                      dim3(FG_NT), smem, stream,
                                      pair ? 2 : 1, mq, mw, offs, E, N, K,
                                      qs, ws, ws_stride,
                                      (__nv_bfloat16 *) Y, sched));
    return MOE_K_OK;
}


extern "C" int
moe_cuda_fp8_grouped_gemm_ctas(const uint8_t *Q, int q_rows,
    const uint8_t *W, size_t wstride, const int32_t *offs, int E, int r_max,
    int N, int K, moe_bf16_t *Y, int ctas, int variant, uint32_t *sched,
    cudaStream_t stream)
{
    return fg_launch(Q, q_rows, W, wstride, offs, E, r_max, N, K, NULL,
                     NULL, 0, Y, ctas,
                     variant & (3 | MOE_FG_DYN | MOE_FG_PAIR), sched,
                     stream);
}


extern "C" int
moe_cuda_fp8_grouped_gemm(const uint8_t *Q, int q_rows, const uint8_t *W,
    size_t wstride, const int32_t *offs, int E, int r_max, int N, int K,
    moe_bf16_t *Y, uint32_t *sched, int sch, cudaStream_t stream)
{
    return fg_launch(Q, q_rows, W, wstride, offs, E, r_max, N, K, NULL,
                     NULL, 0, Y, FG_CTAS,
                     FG_WIDE * MOE_FG_WIDE | FG_STAGED * MOE_FG_STAGED
                     | (sch & (MOE_FG_DYN | MOE_FG_PAIR)), sched, stream);
}


extern "C" int
moe_cuda_fp8_grouped_swiglu(const uint8_t *Q, int q_rows, const uint8_t *W,
    size_t wstride, const int32_t *offs, int E, int r_max, int F, int K,
    const float *qs, const float *ws, size_t ws_stride, moe_bf16_t *H,
    uint32_t *sched, int sch, cudaStream_t stream)
{
    if (F <= 0 || F % 128 != 0 || qs == NULL || ws == NULL
        || (uintptr_t) ws % 8 != 0 || ws_stride % 2 != 0)
    {
        return MOE_K_EUNSUPPORTED;
    }
    return fg_launch(Q, q_rows, W, wstride, offs, E, r_max, 2 * F, K, qs,
                     ws, ws_stride, H, FG_CTAS,
                     FG_SWIGLU | (sch & (MOE_FG_DYN | MOE_FG_PAIR)), sched,
                     stream);
}
