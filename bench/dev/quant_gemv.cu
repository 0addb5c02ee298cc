/*
 * Dev harness: the 4-bit GEMV (kernels/quant_gemv.cu) on one mixtral-8x7b
 * MoE layer's expert shapes (8 experts, group 128; gate|up N 28672 K 4096,
 * down N 4096 K 14336), AWQ and GPTQ, r rows per expert hit (r = 1: two
 * experts hit, the batch-1 decode step; else all 8).  Lines: the shipped
 * launcher (the tensor-core kernel); at rows <= Q4S_MAXR the CUDA-core
 * kernel_qgemv_q4_fma (q4_fma.cuh: measured slower, not shipped) with
 * its cluster size S forced (1, 2, 4, 8; raised to the
 * inputs' minimum: K / 4096) and the tensor-core kernel at its 8-row
 * tile next to it (q4m_try, shipped S and prefetch); the
 * tensor-core tiles forced through max_rows (8 / 16 / 32
 * rows per pass); the tensor-core kernel with the cluster size S (0: the
 * launcher's q4m_split, 1, 2, 4, 8) x the L2 prefetch distance (0, 1, 2,
 * 4, 8, 32 iterations; QM_PF ships with S 0); for GPTQ the
 * CUDA-core atomic kernel (a trivial g_idx sends it there); for gate|up
 * the shipped GEMV + moe_cuda_silu_mul against moe_cuda_qgemv_q4_silu
 * (one launch; bf16 H compared within 1e-2 relative RMS), and at rows
 * <= Q4S_MAXR the fused launch on tensor cores too; the tensor-core
 * kernel with other warps per block x blocks per SM (registers).  Each is
 * checked against the shipped output (relative RMS, fp32 order only).
 * Rate: bytes of the experts hit (weights, fp16 scales, zeros) / time.
 * Right after the shipped line: the GEMV by quantization group
 * (kernels/q4_group.cu, GPTQ's layout; AWQ through a repacked copy) at
 * block shapes 0 (its launcher's pick) .. 9 and the warpgroup kernel
 * (kernels/q4_wgmma.cu) as shapes 10..13, shape 0 with the cluster
 * size forced (1, 2, 4, 8) and with the L2 prefetch (pa 0, 2, 3, 4, 6),
 * and for gate|up with SiLU fused (H against moe_cuda_silu_mul of the
 * shipped output); then the tiled layout (kernels/q4_tiled.cu,
 * the weights repacked by moe_cuda_q4t_pack) with its K split picked
 * (sk 0) and forced (1, 2, 4, 8), and for gate|up with SiLU fused.
 *
 *   build/bench/dev/quant_gemv [rows ...]      (default 1 2 16)
 *   DEV_DENSE=1: also the dense q|k|v and o projections (one matrix)
 *   DEV_QUICK=1: only the shipped, by-group and tiled lines
 *   DEV_ROTATE=GB: only the by-group kernel (GPTQ, the first rows given)
 *                  on the same weights and on copies of GB in turn, every
 *                  shape cold, the same bytes only read; then the e4m3
 *                  layer's matrices only read, cold, and its expert
 *                  GEMVs' variants (kernel_gemv_fp8h) cold
 *                  (DEV_ROTATE_E4M3=1: only the e4m3 lines)
 */
#include "../../kernels/quant_gemv.cu"
#include "../../kernels/q4_group.cu"
#include "q4_fma.cuh"
#include "../../kernels/moe_gemv.h"     /* the e4m3 GEMV, from the library */
#include "../../kernels/init.h"         /* moe_cuda_fill_random_f32 */

#include "dev.cuh"


/* n hash-random 32-bit words */
__global__ void
dev_q4_words(uint32_t *p, size_t n, uint32_t seed)
{
    for (size_t i = (size_t) blockIdx.x * blockDim.x + threadIdx.x; i < n;
         i += (size_t) gridDim.x * blockDim.x)
    {
        uint32_t h = (uint32_t) i * 2654435761u ^ seed;

        h ^= h >> 15;
        h *= 2246822519u;
        h ^= h >> 13;
        p[i] = h;
    }
}


/* n fp16 scales 0.01 (raw 0x211f); g_idx k / G of `count` matrices */
__global__ void
dev_q4_fill(uint16_t *sc, size_t n, int32_t *gidx, int count, int K, int G)
{
    for (size_t i = (size_t) blockIdx.x * blockDim.x + threadIdx.x; i < n;
         i += (size_t) gridDim.x * blockDim.x)
    {
        sc[i] = 0x211f;
    }
    for (size_t i = (size_t) blockIdx.x * blockDim.x + threadIdx.x;
         i < (size_t) count * K; i += (size_t) gridDim.x * blockDim.x)
    {
        gidx[i] = (int32_t) (i % (size_t) K) / G;
    }
}


/*
 * One Mixtral layer's matrix w13 (as dev_shape's) at `rows` rows per
 * expert hit, GPTQ's layout, group 128: its shape, the experts' offsets,
 * the bytes of the experts hit, and (dev_q4_layer_alloc) random weights,
 * zeros, scales 0.01 and a trivial g_idx on the device.
 */
typedef struct {
    int     dense, G, E, N, K, KG, hit, n;
    size_t  nw, nz, ns, on;             /* words, zero words, scales, out */
    double  bytes;
    int32_t offs[9];
} dev_q4_layer_t;


static void
dev_q4_layer(dev_q4_layer_t *L, int w13, int rows)
{
    L->dense = w13 >= 2;
    L->G = 128;
    L->E = L->dense ? 1 : 8;
    L->N = w13 == 1 ? 28672 : w13 == 2 ? 6144 : 4096;
    L->K = w13 == 0 ? 14336 : 4096;
    L->KG = L->K / L->G;
    L->hit = L->dense ? 1 : rows == 1 ? 2 : L->E;
    L->n = L->hit * rows;
    L->nw = (size_t) L->E * L->K * L->N / 8;
    L->nz = (size_t) L->E * L->KG * L->N / 8;
    L->ns = (size_t) L->E * L->KG * L->N;
    L->on = (size_t) L->n * L->N;
    L->bytes = (double) L->hit * ((double) L->K * L->N / 2
                                  + (double) L->KG * L->N * 2.5);
    for (int e = 0; e <= L->E; e++) {
        L->offs[e] = (e < L->hit ? e : L->hit) * rows;
    }
}


static void
dev_q4_layer_alloc(const dev_q4_layer_t *L, uint32_t **qw, uint32_t **qz,
    uint16_t **sc, int32_t **gi)
{
    *qw = (uint32_t *) gu_dev(L->nw * 4);
    *qz = (uint32_t *) gu_dev(L->nz * 4);
    *sc = (uint16_t *) gu_dev(L->ns * 2);
    *gi = (int32_t *) gu_dev((size_t) L->E * L->K * 4);
    dev_q4_words<<<4096, 256>>>(*qw, L->nw, 7u);
    dev_q4_words<<<1024, 256>>>(*qz, L->nz, 9u);
    dev_q4_fill<<<1024, 256>>>(*sc, L->ns, *gi, L->E, L->K, L->G);
    DEV_CHECK(cudaDeviceSynchronize());
}


/* gate|up: the SwiGLU of the fp32 reference ref (n rows of N), the
 * reference of the fused launches, into *href; *h2 their output */
static void
dev_silu_ref(const float *ref, int n, int N, bf16 **href, bf16 **h2)
{
    *href = (bf16 *) gu_dev((size_t) n * N);
    *h2 = (bf16 *) gu_dev((size_t) n * N);
    DEV_CHECK(moe_cuda_silu_mul(ref, n, N / 2, (moe_bf16_t *) *href, 0)
              == 0 ? cudaSuccess : cudaErrorUnknown);
}


/*
 * w13 1: the experts' gate|up, 0: their down projection; 2: the dense
 * q|k|v projection (N 6144 K 4096), 3: the dense o projection (N 4096 K
 * 4096), one matrix (offs NULL).
 */
static void
dev_shape(int fmt, int w13, int rows)
{
    dev_q4_layer_t L;

    dev_q4_layer(&L, w13, rows);

    const int   dense = L.dense, G = L.G, iters = 50, E = L.E, N = L.N;
    const int   K = L.K, hit = L.hit, n = L.n;
    const char *fn = fmt == MOE_K_Q4_AWQ ? "awq" : "gptq";
    size_t      nw = L.nw, nz = L.nz, on = L.on;
    double      bytes = L.bytes;
    char        name[64];
    double      ms;
    uint32_t   *qw, *qz;
    uint16_t   *sc;
    int32_t    *gi;

    dev_q4_layer_alloc(&L, &qw, &qz, &sc, &gi);

    const bf16 *X = (const bf16 *) dev_rand_bf((size_t) n * K, 1.0f);
    int32_t    *d_offs = dense ? NULL : (int32_t *) gu_up(L.offs,
                                                          sizeof(L.offs));
    float      *ref = (float *) gu_dev(on * 4), *out = (float *) gu_dev(on * 4);

    auto run = [&](int mr, int S, int pf, const int32_t *g, float *y) {
        if (S == 0 && pf == QM_PF) {
            return moe_cuda_qgemv_q4_rows(fmt, (const moe_bf16_t *) X, K,
                                          NULL, 1, (const int32_t *) qw,
                                          (const int32_t *) qz, sc, g, G, 1,
                                          N, K, d_offs, E, n, mr, y, N, 0);
        }
        return q4m_try(fmt, X, K, NULL, 1, (const int32_t *) qw,
                       (const int32_t *) qz, sc, NULL, G,
                       fmt == MOE_K_Q4_AWQ ? 0 : 1, N, K, d_offs, E, n,
                       mr > 0 ? mr : rows, S, pf, y, NULL, N, 0);
    };

    printf("%s %s N %d K %d, %d rows x %d experts (%.0f MB)\n", fn,
           w13 == 1 ? "gate|up" : w13 == 2 ? "dense q|k|v"
           : w13 == 3 ? "dense o" : "down", N, K, rows, hit, bytes / 1e6);
    ms = dev_time(iters, [&]() { return run(0, 0, QM_PF, NULL, ref); });
    dev_line("shipped", ms, bytes, 0, -1, 0);
    /* gate|up: the shipped output's SwiGLU, the reference of every fused
     * launch below (h2: their output) */
    bf16 *href = NULL, *h2 = NULL;

    if (w13 == 1) {
        dev_silu_ref(ref, n, N, &href, &h2);
    }
    {
        /* the GEMV by quantization group (kernels/q4_group.cu) on GPTQ's
         * layout (AWQ: a repacked copy, zero bias 0), block shapes 0
         * (shipped) .. 6, the cluster size picked; shape 0 with S forced, and
         * with the L2 prefetch (chunks past the register stages, pa);
         * for gate|up with SiLU fused too */
        uint32_t *qg = (uint32_t *) qw, *zg = (uint32_t *) qz;
        int       zb = fmt == MOE_K_Q4_AWQ ? 0 : 1;

        if (fmt == MOE_K_Q4_AWQ) {
            void *scr = gu_dev((size_t) K * N / 2);

            qg = (uint32_t *) gu_dev(nw * 4);
            zg = (uint32_t *) gu_dev(nz * 4);
            DEV_CHECK(cudaMemcpy(qg, qw, nw * 4, cudaMemcpyDeviceToDevice));
            DEV_CHECK(cudaMemcpy(zg, qz, nz * 4, cudaMemcpyDeviceToDevice));
            if (moe_cuda_q4_awq_to_gptq((int32_t *) qg, (int32_t *) zg, N, K,
                                        G, E, scr, (size_t) K * N / 2, 0)
                != 0)
            {
                printf("  q4g: repack refused: %s\n", moe_cuda_last_error());
                dev_failed = 1;
            }
            cudaFree(scr);
        }
        for (int sh = 0; sh <= 13; sh++) {
            ms = dev_time(iters, [&]() {
                return moe_cuda_qgemv_q4g((const moe_bf16_t *) X, K, NULL, 1,
                                          (const int32_t *) qg,
                                          (const int32_t *) zg, sc, G, zb,
                                          N, K, d_offs, E, n, sh, out, N,
                                          NULL, 0);
            });
            snprintf(name, sizeof(name), "by group, shape %d%s", sh,
                     sh == 0 ? " (shipped)" : "");
            dev_line(name, ms, bytes, 0, dev_diff(out, ref, on, 0), 1e-4);
        }
        /* the warpgroup kernel's dev variants (kernels/q4_wgmma.cu shapes
         * 5..7: shape 4 (32 rows, 128 k) with the L2 prefetch pa 0, 2
         * and 6 of q4_wgmma.cu's Q4W_PA; 3 ships; 8: two warpgroups a
         * block sharing the staged rows, written 2026-12-04 and not yet
         * run) */
        for (int sh = 5; sh <= 8; sh++) {
            ms = dev_time(iters, [&]() {
                return moe_cuda_qgemv_q4w((const moe_bf16_t *) X, K, NULL, 1,
                                          (const int32_t *) qg,
                                          (const int32_t *) zg, sc, G, zb,
                                          N, K, d_offs, E, n, rows, sh, out,
                                          N, NULL, 0);
            });
            snprintf(name, sizeof(name), "wgmma dev variant %d", sh);
            dev_line(name, ms, bytes, 0, dev_diff(out, ref, on, 0), 1e-4);
        }
        /* shape 0 with the cluster size forced (pf 0), then with the L2
         * prefetch distance (chunks ahead; S picked) */
        for (int v = 1; v <= 9; v++) {
            static const int pas[5] = { 0, 2, 3, 4, 6 };
            int S = v <= 4 ? 1 << (v - 1) : 0, pf = v <= 4 ? 1 : pas[v - 5];

            ms = dev_time(iters, [&]() {
                return q4g_run(0, S, pf, (const moe_bf16_t *) X, K, NULL, 1,
                               (const int32_t *) qg, (const int32_t *) zg,
                               sc, G, zb, N, K, d_offs, E, n, 0, out, N,
                               NULL, 0);
            });
            snprintf(name, sizeof(name), "by group, shape 0, S %d, pa %d",
                     S, pf);
            dev_line(name, ms, bytes, 0, dev_diff(out, ref, on, 0), 1e-4);
        }
        if (w13 == 1) {
            for (int sh = 0; sh <= 13; sh++) {
                ms = dev_time(iters, [&]() {
                    return moe_cuda_qgemv_q4g((const moe_bf16_t *) X, K,
                                              NULL, 1, (const int32_t *) qg,
                                              (const int32_t *) zg, sc, G,
                                              zb, N, K, d_offs, E, n, sh,
                                              NULL, 0, (moe_bf16_t *) h2, 0);
                });
                snprintf(name, sizeof(name), "by group + SiLU fused, shape "
                         "%d", sh);
                dev_line(name, ms, bytes, 0, dev_diff(h2, href, on / 2, 1),
                         1e-2);
            }
        }
        if (qg != qw) {
            cudaFree(qg);
            cudaFree(zg);
        }
    }
    {
        /* the tiled layout: a repacked copy of the same weights */
        uint32_t *qt = (uint32_t *) gu_dev(nw * 4);
        void     *scr = gu_dev((size_t) K * N / 2);
        int       zb = fmt == MOE_K_Q4_AWQ ? 0 : 1;

        DEV_CHECK(cudaMemcpy(qt, qw, nw * 4, cudaMemcpyDeviceToDevice));
        if (moe_cuda_q4t_pack(fmt, (int32_t *) qt, N, K, E, scr,
                              (size_t) K * N / 2, 0) != 0)
        {
            printf("  tiled: pack refused: %s\n", moe_cuda_last_error());
            dev_failed = 1;
        }
        /* the K split picked (0) and forced */
        for (int sk = 0; sk <= 8; sk = sk == 0 ? 1 : 2 * sk) {
            ms = dev_time(iters, [&]() {
                return moe_cuda_qgemv_q4t(fmt, (const moe_bf16_t *) X, K,
                                          NULL, 1, (const int32_t *) qt,
                                          (const int32_t *) qz, sc, G, zb, N,
                                          K, d_offs, E, n, 0, sk, out, N,
                                          NULL, 0);
            });
            snprintf(name, sizeof(name), "tiled, sk %d%s", sk,
                     sk == 0 ? " (picked)" : "");
            dev_line(name, ms, bytes, 0, dev_diff(out, ref, on, 0), 1e-4);
        }
        if (w13 == 1) {
            for (int sk = 0; sk <= 4; sk = sk == 0 ? 1 : 2 * sk) {
                ms = dev_time(iters, [&]() {
                    return moe_cuda_qgemv_q4t(fmt, (const moe_bf16_t *) X, K,
                                              NULL, 1, (const int32_t *) qt,
                                              (const int32_t *) qz, sc, G,
                                              zb, N, K, d_offs, E, n, 0, sk,
                                              NULL, 0, (moe_bf16_t *) h2, 0);
                });
                snprintf(name, sizeof(name), "tiled + SiLU fused, sk %d%s",
                         sk, sk == 0 ? " (picked)" : "");
                dev_line(name, ms, bytes, 0, dev_diff(h2, href, on / 2, 1),
                         1e-2);
            }
        }
        cudaFree(qt);
        cudaFree(scr);
    }
    if (getenv("DEV_QUICK") != NULL) {
        cudaFree(qw); cudaFree(qz); cudaFree(sc); cudaFree(gi);
        cudaFree((void *) X); cudaFree(d_offs); cudaFree(ref);
        cudaFree(out);
        cudaFree(href); cudaFree(h2);
        return;
    }
    if (w13 == 1) {
        /* SwiGLU: the GEMV + moe_cuda_silu_mul against the fused launch */
        bf16 *h = (bf16 *) gu_dev((size_t) n * N * 2), *h2 = h + on / 2;

        ms = dev_time(iters, [&]() {
            return run(0, 0, QM_PF, NULL, ref) != 0
                   ? -1 : moe_cuda_silu_mul(ref, n, N / 2, (moe_bf16_t *) h,
                                            0);
        });
        dev_line("shipped + silu_mul (2 launches)", ms, bytes, 0, -1, 0);
        ms = dev_time(iters, [&]() {
            return moe_cuda_qgemv_q4_silu(fmt, (const moe_bf16_t *) X, K,
                                          NULL, 1, (const int32_t *) qw,
                                          (const int32_t *) qz, sc, NULL, G,
                                          1, N, K, d_offs, E, n, 0, NULL,
                                          (moe_bf16_t *) h2, 0);
        });
        dev_line("SiLU fused (qgemv_q4_silu)", ms, bytes, 0,
                 dev_diff(h2, h, on / 2, 1), 1e-2);
        if (rows <= Q4S_MAXR) {
            ms = dev_time(iters, [&]() {
                return q4m_try(fmt, X, K, NULL, 1, (const int32_t *) qw,
                               (const int32_t *) qz, sc, NULL, G,
                               fmt == MOE_K_Q4_AWQ ? 0 : 1, N, K, d_offs, E,
                               n, 8, 0, QM_PF, NULL, h2, N / 2, 0);
            });
            dev_line("SiLU fused, tensor cores (mma 8)", ms, bytes, 0,
                     dev_diff(h2, h, on / 2, 1), 1e-2);
        }
        cudaFree(h);
    }
    if (rows <= Q4S_MAXR) {
        /* the CUDA-core kernel's K splits, and the tensor cores at the
         * same rows */
        for (int S = 1; S <= Q4S_SMAX; S *= 2) {
            ms = dev_time(iters, [&]() {
                return q4s_try(fmt, X, K, NULL, 1, (const int32_t *) qw,
                               (const int32_t *) qz, sc, NULL, G,
                               fmt == MOE_K_Q4_AWQ ? 0 : 1, N, K, d_offs, E,
                               n, rows, S, out, NULL, N, 0);
            });
            snprintf(name, sizeof(name), "CUDA cores (fma), cluster S %d", S);
            dev_line(name, ms, bytes, 0, dev_diff(out, ref, on, 0), 1e-5);
        }
        ms = dev_time(iters, [&]() {
            return q4m_try(fmt, X, K, NULL, 1, (const int32_t *) qw,
                           (const int32_t *) qz, sc, NULL, G,
                           fmt == MOE_K_Q4_AWQ ? 0 : 1, N, K, d_offs, E, n,
                           8, 0, QM_PF, out, NULL, N, 0);
        });
        dev_line("tensor cores (mma 8), shipped S / pf", ms, bytes, 0,
                 dev_diff(out, ref, on, 0), 1e-5);
    }
    /* warps per block x blocks per SM compiled for (registers: 64 K /
     * (32 NW MINB)); the shipped line picks one by grid (q4m_auto), 8 x 2
     * (QM_WARPS x QM_MINB) was the only one before */
#define DEV_NW(NW, MINB)                                                     \
    do {                                                                     \
        ms = dev_time(iters, [&]() {                                         \
            return q4m_try<NW, MINB>(fmt, X, K, NULL, 1,                     \
                                     (const int32_t *) qw,                   \
                                     (const int32_t *) qz, sc, NULL, G,      \
                                     fmt == MOE_K_Q4_AWQ ? 0 : 1, N, K,      \
                                     d_offs, E, n, rows, 0, QM_PF, out,      \
                                     NULL, N, 0);                            \
        });                                                                  \
        snprintf(name, sizeof(name), "%d warps, %d blocks per SM", NW,       \
                 MINB);                                                      \
        dev_line(name, ms, bytes, 0, dev_diff(out, ref, on, 0), 1e-5);       \
    } while (0)
    DEV_NW(8, 2);
    DEV_NW(8, 1);
    DEV_NW(8, 3);
    DEV_NW(4, 2);
    DEV_NW(4, 3);
    DEV_NW(4, 4);
    DEV_NW(4, 6);
    DEV_NW(16, 1);
#undef DEV_NW
    for (int mr = 1; mr <= 32; mr *= (mr == 1 ? 16 : 2)) {
        ms = dev_time(iters, [&]() { return run(mr, 0, QM_PF, NULL, out); });
        snprintf(name, sizeof(name), "max_rows %d", mr);
        dev_line(name, ms, bytes, 0, dev_diff(out, ref, on, 0), 1e-5);
    }
    /* cluster size x L2 prefetch distance (S 0: q4m_split's choice;
     * pf 32: every warp's whole K range at its start, even at S 1) */
    for (int S = 0; S <= QM_SMAX; S = S == 0 ? 1 : 2 * S) {
        static const int pfs[6] = { 0, 1, 2, 4, 8, 32 };

        for (int i = 0; i < 6; i++) {
            int pf = pfs[i];

            if (S == 0 && pf == QM_PF) {
                continue;                       /* the shipped line */
            }
            ms = dev_time(iters, [&]() { return run(0, S, pf, NULL, out); });
            snprintf(name, sizeof(name), "cluster S %d, L2 prefetch %d",
                     S, pf);
            dev_line(name, ms, bytes, 0, dev_diff(out, ref, on, 0), 1e-5);
        }
    }
    if (fmt == MOE_K_Q4_GPTQ) {
        ms = dev_time(iters, [&]() { return run(0, 0, QM_PF, gi, out); });
        dev_line("CUDA cores + atomics (g_idx)", ms, bytes, 0,
                 dev_diff(out, ref, on, 0), 1e-5);
    }
    cudaFree(qw); cudaFree(qz); cudaFree(sc); cudaFree(gi);
    cudaFree((void *) X); cudaFree(d_offs); cudaFree(ref); cudaFree(out);
    cudaFree(href); cudaFree(h2);
}


/* The floor under a GEMV of these bytes: every 16-byte word of the three
 * arrays read once (non-coherent loads, four in flight a thread), XORed
 * into one word a block so the reads cannot be dropped. */
__global__ void __launch_bounds__(512)
dev_read3(const uint4 *a, size_t na, const uint4 *b, size_t nb,
    const uint4 *c, size_t nc, unsigned *sink)
{
    const size_t stride = (size_t) gridDim.x * blockDim.x;
    const size_t t = (size_t) blockIdx.x * blockDim.x + threadIdx.x;
    unsigned     x = 0;
    const uint4 *p[3] = { a, b, c };
    size_t       n[3] = { na, nb, nc };

    for (int k = 0; k < 3; k++) {
        size_t i = t;

        for (; i + 3 * stride < n[k]; i += 4 * stride) {
            uint4 v0 = __ldg(p[k] + i), v1 = __ldg(p[k] + i + stride);
            uint4 v2 = __ldg(p[k] + i + 2 * stride);
            uint4 v3 = __ldg(p[k] + i + 3 * stride);

            x ^= v0.x ^ v0.y ^ v0.z ^ v0.w ^ v1.x ^ v1.y ^ v1.z ^ v1.w
                 ^ v2.x ^ v2.y ^ v2.z ^ v2.w ^ v3.x ^ v3.y ^ v3.z ^ v3.w;
        }
        for (; i < n[k]; i += stride) {
            uint4 v = __ldg(p[k] + i);

            x ^= v.x ^ v.y ^ v.z ^ v.w;
        }
    }
    if (x == 0x9e3779b9u) {
        sink[blockIdx.x] = x;           /* never, in practice */
    }
}


/*
 * DEV_ROTATE=n: the shipped GEMV by quantization group (GPTQ's layout,
 * shape 0) on one Mixtral layer's matrix (w13 as dev_shape's), timed
 * on one set of weights called again and again (every other line of this
 * harness), then on copies of it in turn, each call on the next copy:
 * 3 copies (no line left in L2 from the call before, the pages few) and
 * n (no page's translation cached either, as in the model, where a
 * step's 32 layers read ~24 GB).  Shows whether the harness's
 * figures are the model's (run 23a: a layer's four matrices 86.7 us
 * here against 98.7 in the model's timeline).
 */
static void
dev_rotate(int w13, int rows, int gb)
{
    dev_q4_layer_t L;

    dev_q4_layer(&L, w13, rows);

    const int    G = L.G, E = L.E, N = L.N, K = L.K, n = L.n, iters = 50;
    const size_t nw = L.nw, nz = L.nz, ns = L.ns, on = L.on;
    const double copy_gb = (double) (nw * 4 + nz * 4 + ns * 2) / 1e9;
    /* about gb of copies: at least 3, at most 256 */
    const int    copies = gb / copy_gb < 3 ? 3
                          : gb / copy_gb > 256 ? 256 : (int) (gb / copy_gb);
    char         name[96];
    double       ms;
    int          c = 0;
    uint32_t    *qw[256], *qz[256];
    uint16_t    *sc[256];
    int32_t     *gi;
    /* the copy the next call takes, of the first m in turn */
    auto         next = [&](int m) {
        int i = c;

        c = (c + 1) % m;
        return i;
    };
    dev_q4_layer_alloc(&L, &qw[0], &qz[0], &sc[0], &gi);

    const bf16 *X = (const bf16 *) dev_rand_bf((size_t) n * K, 1.0f);
    int32_t    *d_offs = L.dense ? NULL : (int32_t *) gu_up(L.offs,
                                                          sizeof(L.offs));
    float      *ref = (float *) gu_dev(on * 4);
    float      *out = (float *) gu_dev(on * 4);

    for (int i = 1; i < copies; i++) {
        qw[i] = (uint32_t *) gu_dev(nw * 4);
        qz[i] = (uint32_t *) gu_dev(nz * 4);
        sc[i] = (uint16_t *) gu_dev(ns * 2);
        DEV_CHECK(cudaMemcpy(qw[i], qw[0], nw * 4, cudaMemcpyDeviceToDevice));
        DEV_CHECK(cudaMemcpy(qz[i], qz[0], nz * 4, cudaMemcpyDeviceToDevice));
        DEV_CHECK(cudaMemcpy(sc[i], sc[0], ns * 2, cudaMemcpyDeviceToDevice));
    }
    DEV_CHECK(cudaDeviceSynchronize());

    auto run = [&](int i, float *y) {
        return moe_cuda_qgemv_q4g((const moe_bf16_t *) X, K, NULL, 1,
                                  (const int32_t *) qw[i],
                                  (const int32_t *) qz[i], sc[i], G, 1, N, K,
                                  d_offs, E, n, 0, y, N, NULL, 0);
    };

    printf("gptq %s N %d K %d, %d rows x %d experts (%.0f MB), %d copies "
           "(%.1f GB)\n", w13 == 1 ? "gate|up" : w13 == 2 ? "dense q|k|v"
           : w13 == 3 ? "dense o" : "down", N, K, rows, L.hit, L.bytes / 1e6,
           copies, copies * copy_gb);
    ms = dev_time(iters, [&]() { return run(0, ref); });
    dev_line("by group, shape 0, the same weights", ms, L.bytes, 0, -1, 0);
    /* 3 copies (beyond L2, within any TLB's reach), then all of them */
    for (int j = 0; j < 2 && (j == 0 || copies > 3); j++) {
        const int m = j == 0 ? 3 : copies;

        c = 0;
        ms = dev_time(iters, [&]() { return run(next(m), out); });
        snprintf(name, sizeof(name), "by group, shape 0, %d copies in turn "
                 "(%.1f GB)", m, m * copy_gb);
        dev_line(name, ms, L.bytes, 0, dev_diff(out, ref, on, 0), 1e-6);
    }
    /* the floor: the same bytes (the experts hit: their words, zeros and
     * scales) only read, cold, in one launch of 4 blocks of 512 an SM */
    {
        unsigned *sink = (unsigned *) gu_dev(4096 * sizeof(unsigned));
        size_t    ew = nw / E, ez = nz / E, es = ns / E;

        c = 0;
        ms = dev_time(iters, [&]() {
            int i = next(copies);

            dev_read3<<<4 * moe_sm_count(), 512>>>(
                (const uint4 *) qw[i], ew * L.hit / 4,
                (const uint4 *) qz[i], ez * L.hit / 4,
                (const uint4 *) sc[i], es * L.hit / 8, sink);
            return (int) cudaGetLastError();
        });
        dev_line("read only, the same bytes, copies in turn", ms, L.bytes, 0,
                 -2, 0);
        cudaFree(sink);
    }
    /* every block shape (0: the launcher's pick, as above), shape 0 with
     * the cluster size S and the L2 prefetch distance pa forced, and for
     * gate|up the SiLU-fused launch the model runs: all on the copies in
     * turn, so a choice made on warm weights can be checked cold */
    bf16 *href = NULL, *h2 = NULL;

    if (w13 == 1) {
        dev_silu_ref(ref, n, N, &href, &h2);
    }
    for (int silu = 0; silu <= (w13 == 1); silu++) {
        for (int v = 0; v <= 18; v++) {
            static const int pas[5] = { 0, 2, 3, 4, 6 };
            int sh = v <= 9 ? v : 0;
            int S = v >= 10 && v <= 13 ? 1 << (v - 10) : 0;
            int pf = v >= 14 ? pas[v - 14] : Q4G_PA;

            c = 0;
            ms = dev_time(iters, [&]() {
                int i = next(copies);

                return q4g_run(sh, S, pf, (const moe_bf16_t *) X, K, NULL, 1,
                               (const int32_t *) qw[i],
                               (const int32_t *) qz[i], sc[i], G, 1, N, K,
                               d_offs, E, n, 8, silu ? NULL : out, N,
                               silu ? (moe_bf16_t *) h2 : NULL, 0);
            });
            snprintf(name, sizeof(name), "cold%s: shape %d, S %d, pa %d",
                     silu ? ", SiLU fused" : "", sh, S, pf);
            dev_line(name, ms, L.bytes, 0,
                     silu ? dev_diff(h2, href, on / 2, 1)
                          : dev_diff(out, ref, on, 0), silu ? 1e-2 : 1e-4);
        }
    }
    for (int i = 0; i < copies; i++) {
        cudaFree(qw[i]);
        cudaFree(qz[i]);
        cudaFree(sc[i]);
    }
    cudaFree(gi); cudaFree((void *) X); cudaFree(d_offs); cudaFree(ref);
    cudaFree(out); cudaFree(href); cudaFree(h2);
}



/*
 * DEV_ROTATE's e4m3 lines: the read-only floor of the e4m3 checkpoint's
 * matrices of a batch-1 layer, and its expert GEMVs' variants, on bytes
 * taken in turn from a pool of gb GB (cold).
 */
static void
dev_e4m3_cold(int gb)
{
    static const double mb[4] = { 234.881, 117.441, 25.166, 16.777 };
    static const char  *nm[4] = { "gate|up", "down", "q|k|v", "o" };
    size_t    pool = (size_t) gb << 30;
    uint4    *buf = (uint4 *) gu_dev(pool);
    unsigned *sink = (unsigned *) gu_dev(4096 * sizeof(unsigned));

    DEV_CHECK(cudaMemset(buf, 0x5a, pool));
    /* the read-only floor of each matrix (two experts' gate|up and down,
     * q|k|v, o) */
    for (int w = 0; w < 4; w++) {
        size_t nb = (size_t) (mb[w] * 1e6) / 16;
        size_t slots = pool / 16 / nb, c = 0;
        char   name[96];
        double ms = dev_time(50, [&]() {
            const uint4 *p = buf + (c % slots) * nb;

            c++;
            dev_read3<<<4 * moe_sm_count(), 512>>>(p, nb, p, 0, p, 0,
                                                   sink);
            return (int) cudaGetLastError();
        });

        snprintf(name, sizeof(name), "e4m3 %s read only (%.0f MB), "
                 "cold", nm[w], mb[w]);
        dev_line(name, ms, mb[w] * 1e6, 0, -2, 0);
    }
    /* the e4m3 expert GEMVs (kernel_gemv_fp8h, per-channel
     * scales) at batch 1 on the same pool, two experts' weights
     * taken in turn: the launcher's pick (variant 0) and its
     * variants 1 (twice the chunks a stage), 2 (8 warps), 3 (4
     * warps); gate|up stacked with SiLU fused, as the model runs */
    for (int w = 0; w < 2; w++) {
        const int N = w == 0 ? 14336 : 4096;
        const int Kd = w == 0 ? 4096 : 14336;
        const int rowsN = w == 0 ? 2 * N : N;  /* stacked gate|up */
        size_t    wb = (size_t) 2 * rowsN * Kd; /* two experts */
        size_t    slots = pool / wb, c = 0;
        int32_t   offs[3] = { 0, 1, 2 };
        int32_t  *d_offs = (int32_t *) gu_up(offs, sizeof(offs));
        float    *scale = (float *) gu_dev(sizeof(float) * 2 * rowsN);
        const bf16 *X = (const bf16 *) dev_rand_bf((size_t) 2 * Kd,
                                                   1.0f);
        float    *Y = (float *) gu_dev(sizeof(float) * 2 * N);
        bf16     *H = (bf16 *) gu_dev(sizeof(bf16) * 2 * N);
        char      name[96];

        DEV_CHECK(moe_cuda_fill_random_f32(scale, 2 * rowsN, 3,
                                           5e-4f, 1e-3f, 0) == 0
                  ? cudaSuccess : cudaErrorUnknown);
        for (int v = 0; v <= 3; v++) {
            double ms = dev_time(50, [&]() {
                const uint8_t *W = (const uint8_t *) buf
                                   + (c % slots) * wb;

                c++;
                return moe_cuda_gemv_fp8h(
                    (const moe_bf16_t *) X, Kd, NULL, 1, W, scale,
                    MOE_K_FP8_CHANNEL, N, Kd, d_offs, 2, 2, 1, w == 0,
                    w == 0 ? NULL : Y, (moe_bf16_t *) H, N, v, 0);
            });

            snprintf(name, sizeof(name), "e4m3 %s GEMV, variant %d, "
                     "cold", w == 0 ? "gate|up + SiLU" : "down", v);
            dev_line(name, ms, (double) wb, 0, -2, 0);
        }
        cudaFree(d_offs); cudaFree(scale); cudaFree((void *) X);
        cudaFree(Y); cudaFree(H);
    }
    cudaFree(buf);
    cudaFree(sink);
}


int
main(int argc, char **argv)
{
    int rows[16], nr = 0;

    for (int i = 1; i < argc && nr < 16; i++) {
        rows[nr++] = atoi(argv[i]);
    }
    if (nr == 0) {
        rows[nr++] = 1;
        rows[nr++] = 2;
        rows[nr++] = 16;
    }
    gu_seed(1);
    dev_limits();
    if (getenv("DEV_ROTATE") != NULL) {
        /* weights of about 20 GB in turn */
        int gb = atoi(getenv("DEV_ROTATE"));

        gb = gb > 0 ? gb : 20;
        for (int w = 0; w <= 3 && getenv("DEV_ROTATE_E4M3") == NULL; w++) {
            dev_rotate(w, rows[0], gb);
        }
        dev_e4m3_cold(gb);
        return dev_failed;
    }
    for (int i = 0; i < nr; i++) {
        if (rows[i] < 1 || rows[i] > 64) {
            fprintf(stderr, "rows per expert: 1..64\n");
            return 2;
        }
        for (int f = 0; f < 2; f++) {
            for (int w = 1; w >= 0; w--) {
                dev_shape(f == 0 ? MOE_K_Q4_AWQ : MOE_K_Q4_GPTQ, w, rows[i]);
            }
            if (getenv("DEV_DENSE") != NULL) {
                dev_shape(f == 0 ? MOE_K_Q4_AWQ : MOE_K_Q4_GPTQ, 2, rows[i]);
                dev_shape(f == 0 ? MOE_K_Q4_AWQ : MOE_K_Q4_GPTQ, 3, rows[i]);
            }
        }
    }
    return dev_failed;
}
