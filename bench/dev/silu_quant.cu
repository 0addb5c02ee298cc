/*
 * The fp8 prefill's SwiGLU + quantize pass (kernels/gemm_fp8.cu,
 * moe_cuda_silu_quant_fp8) on a 2048-token Mixtral-8x7B prompt's expert
 * rows (4096 rows of F 14336, 8 experts, uneven groups), and the plain row
 * quantization (moe_cuda_quant_rows_fp8, K 4096) at 2048 and 4096 rows,
 * next to the copy bandwidth of the same run.  Variants of the SwiGLU
 * pass:
 *   - pf: each thread issues all of its row's gate and up loads before
 *     any arithmetic (IT x 2 16-byte loads in flight per thread), instead
 *     of the shipped loop that computes each 8-column group as it loads it;
 * each checked byte for byte against the shipped output.
 * Usage: build/bench/dev/silu_quant
 */
#include "../../kernels/gemm_fp8.cu"

#include "dev.cuh"

/* fg_silu8's arithmetic on loaded gate / up words g8, u8 (8 columns from
 * 8 i): the same expressions in the same order, so the bytes match */
__device__ __forceinline__ uint4
dev_silu8v(uint4 g8, uint4 u8, const float *ws, int F, int i, float q,
    float *amax)
{
    float          g[8], u[8], gw[8], uw[8];
    __nv_bfloat162 hb[4];
    const float4  *w4 = reinterpret_cast<const float4 *>(ws + 8 * i);
    const float4  *u4 = reinterpret_cast<const float4 *>(ws + F + 8 * i);

    fg_bf8(g8, g);
    fg_bf8(u8, u);
    *reinterpret_cast<float4 *>(gw) = w4[0];
    *reinterpret_cast<float4 *>(gw + 4) = w4[1];
    *reinterpret_cast<float4 *>(uw) = u4[0];
    *reinterpret_cast<float4 *>(uw + 4) = u4[1];
#pragma unroll
    for (int j = 0; j < 4; j++) {
        float  a = moe_fp8_unscale(g[2 * j], q, gw[2 * j]);
        float  b = moe_fp8_unscale(g[2 * j + 1], q, gw[2 * j + 1]);
        float  c = moe_fp8_unscale(u[2 * j], q, uw[2 * j]);
        float  d = moe_fp8_unscale(u[2 * j + 1], q, uw[2 * j + 1]);
        float2 hf;

        hb[j] = __floats2bfloat162_rn(__fdividef(a, 1.0f + __expf(-a)) * c,
                                      __fdividef(b, 1.0f + __expf(-b)) * d);
        hf = __bfloat1622float2(hb[j]);
        *amax = fmaxf(*amax, fmaxf(fabsf(hf.x), fabsf(hf.y)));
    }
    return *reinterpret_cast<const uint4 *>(hb);
}


template <int IT>
__global__ void __launch_bounds__(FG_QUANT_NT)
kernel_dev_silu_quant_pf(const __nv_bfloat16 *G, int F, const float *qs,
    const float *ws, size_t ws_stride, const int32_t *offs, int E,
    uint8_t *Q, float *s)
{
    moe_pdl_enter();
    ws += (size_t) fg_group(offs, E, (int) blockIdx.x) * ws_stride;
    const int    r = blockIdx.x, n8 = F / 8;
    const uint4 *gt = reinterpret_cast<const uint4 *>(G + (size_t) r * 2 * F);
    const uint4 *up = gt + n8;
    uint2       *qo = reinterpret_cast<uint2 *>(Q + (size_t) r * F);
    const float  q = qs[r];
    float        amax = 0.0f, d;
    uint4        gr[IT], ur[IT], hr[IT];

#pragma unroll
    for (int k = 0; k < IT; k++) {
        int i = threadIdx.x + k * FG_QUANT_NT;

        if (i < n8) {
            gr[k] = __ldcs(gt + i);
            ur[k] = __ldcs(up + i);
        }
    }
#pragma unroll
    for (int k = 0; k < IT; k++) {
        int i = threadIdx.x + k * FG_QUANT_NT;

        if (i < n8) {
            hr[k] = dev_silu8v(gr[k], ur[k], ws, F, i, q, &amax);
        }
    }
    d = fg_row_scale(amax, s, r);
#pragma unroll
    for (int k = 0; k < IT; k++) {
        int i = threadIdx.x + k * FG_QUANT_NT;

        if (i < n8) {
            __stcs(qo + i, fg_quant8(hr[k], d));
        }
    }
}


static uint16_t
dev_bf16(float x)
{
    uint32_t u;

    memcpy(&u, &x, 4);
    return (uint16_t) ((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}


int
main(void)
{
    const int M = 4096, F = 14336, E = 8;
    int32_t   h_offs[E + 1];
    size_t    gb = (size_t) M * 2 * F * 2;
    uint16_t *hG = (uint16_t *) malloc(gb);
    float    *hq = (float *) malloc((size_t) M * 4);
    float    *hw = (float *) malloc((size_t) E * 2 * F * 4);
    uint8_t  *r0 = (uint8_t *) malloc((size_t) M * F);
    uint8_t  *r1 = (uint8_t *) malloc((size_t) M * F);
    uint16_t *G;
    float    *qs, *ws, *s0, *s1;
    int32_t  *offs;
    uint8_t  *Q0, *Q1;
    /* a 2048-token prompt's uneven routing (bench_engine's means) */
    static const int rows[E] = { 1022, 700, 560, 480, 420, 380, 344, 190 };

    dev_limits();
    srand(7);
    h_offs[0] = 0;
    for (int e = 0; e < E; e++) {
        h_offs[e + 1] = h_offs[e] + rows[e];
    }
    for (size_t i = 0; i < (size_t) M * 2 * F; i++) {
        hG[i] = dev_bf16(((float) rand() / RAND_MAX - 0.5f) * 2000.0f);
    }
    for (int i = 0; i < M; i++) {
        hq[i] = 0.002f + 0.001f * (float) rand() / RAND_MAX;
    }
    for (int i = 0; i < E * 2 * F; i++) {
        hw[i] = 0.001f + 0.002f * (float) rand() / RAND_MAX;
    }
    DEV_CHECK(cudaMalloc(&G, gb));
    DEV_CHECK(cudaMalloc(&qs, (size_t) M * 4));
    DEV_CHECK(cudaMalloc(&ws, (size_t) E * 2 * F * 4));
    DEV_CHECK(cudaMalloc(&offs, sizeof(h_offs)));
    DEV_CHECK(cudaMalloc(&Q0, (size_t) M * F));
    DEV_CHECK(cudaMalloc(&Q1, (size_t) M * F));
    DEV_CHECK(cudaMalloc(&s0, (size_t) M * 4));
    DEV_CHECK(cudaMalloc(&s1, (size_t) M * 4));
    DEV_CHECK(cudaMemcpy(G, hG, gb, cudaMemcpyHostToDevice));
    DEV_CHECK(cudaMemcpy(qs, hq, (size_t) M * 4, cudaMemcpyHostToDevice));
    DEV_CHECK(cudaMemcpy(ws, hw, (size_t) E * 2 * F * 4,
                         cudaMemcpyHostToDevice));
    DEV_CHECK(cudaMemcpy(offs, h_offs, sizeof(h_offs),
                         cudaMemcpyHostToDevice));

    /* bytes: the bf16 gate|up rows read, the e4m3 rows written */
    double bytes = (double) gb + (double) M * F;
    double ms = dev_time(20, [&]() {
        return moe_cuda_silu_quant_fp8((moe_bf16_t *) G, M, F, qs, ws,
                                       (size_t) 2 * F, offs, E, Q0, s0, 0);
    });

    printf("silu_quant_fp8 M %d F %d, %d experts (rows %d .. %d)\n", M, F,
           E, rows[0], rows[E - 1]);
    dev_line("shipped (IT 7, load as computed)", ms, bytes, 0, -1, 0);
    DEV_CHECK(cudaDeviceSynchronize());
    DEV_CHECK(cudaMemcpy(r0, Q0, (size_t) M * F, cudaMemcpyDeviceToHost));

    ms = dev_time(20, [&]() {
        return (int) moe_launch(kernel_dev_silu_quant_pf<7>, M, FG_QUANT_NT,
                                0, 0, (const __nv_bfloat16 *) G, F, qs, ws,
                                (size_t) 2 * F, offs, E, Q1, s1);
    });
    DEV_CHECK(cudaDeviceSynchronize());
    DEV_CHECK(cudaMemcpy(r1, Q1, (size_t) M * F, cudaMemcpyDeviceToHost));
    {
        size_t diff = 0;

        for (size_t i = 0; i < (size_t) M * F; i++) {
            diff += r0[i] != r1[i];
        }
        dev_line("pf (IT 7, all loads first)", ms, bytes, 0,
                 (double) diff, 0.0);
    }

    /* the plain row quantization: the qkv / o GEMM inputs (2048 rows),
     * the experts' rows (4096) */
    for (int rr = 2048; rr <= 4096; rr *= 2) {
        char name[64];

        ms = dev_time(20, [&]() {
            return moe_cuda_quant_rows_fp8((const moe_bf16_t *) G, 4096,
                                           NULL, 1, rr, 4096, Q0, s0, 0);
        });
        snprintf(name, sizeof(name), "quant_rows_fp8 %d x 4096", rr);
        dev_line(name, ms, (double) rr * 4096 * 3, 0, -1, 0);
    }
    return dev_failed;
}
