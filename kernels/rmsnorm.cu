/* RMSNorm (fp32 statistics) fused with the residual add. */
#include "common.cuh"
#include "rmsnorm.h"


__global__ void
kernel_add_rmsnorm(float *x, const float *delta, const int32_t *rows, int D,
    const float *w, float eps, __nv_bfloat16 *out, float *out_f32)
{
    moe_pdl_enter();
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


/*
 * The same with the row held in registers: NV float4 per thread of a
 * 1024-thread block (D % 4 == 0, D <= 4096 NV), so every load of a row is
 * in flight at once (decode runs one block: the loop above waits for one
 * memory round trip per 256 elements, twice).
 */
#define RMS_THREADS 1024

template <int NV>
__global__ void __launch_bounds__(RMS_THREADS)
kernel_add_rmsnorm_v(float *__restrict__ x, const float *__restrict__ delta,
    const int32_t *rows, int D, const float *__restrict__ w, float eps,
    __nv_bfloat16 *__restrict__ out, float *__restrict__ out_f32)
{
    moe_pdl_enter();
    __shared__ float sh[32];
    int              i = blockIdx.x;
    int              r = rows != NULL ? rows[i] : i;
    int              D4 = D >> 2;
    float4          *xr = reinterpret_cast<float4 *>(x + (size_t) r * D);
    const float4    *dr = delta != NULL
                          ? reinterpret_cast<const float4 *>(
                                delta + (size_t) r * D)
                          : NULL;
    const float4    *w4 = reinterpret_cast<const float4 *>(w);
    float4           v[NV], wv[NV];
    float            ss = 0.0f, inv;

#pragma unroll
    for (int j = 0; j < NV; j++) {
        int d = threadIdx.x + j * RMS_THREADS;

        if (d < D4) {
            v[j] = xr[d];
            wv[j] = w4[d];
            if (dr != NULL) {
                float4 a = dr[d];

                v[j].x += a.x; v[j].y += a.y; v[j].z += a.z; v[j].w += a.w;
            }
        } else {
            v[j] = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
            wv[j] = v[j];
        }
    }
#pragma unroll
    for (int j = 0; j < NV; j++) {
        int d = threadIdx.x + j * RMS_THREADS;

        if (d < D4) {
            if (dr != NULL) {
                xr[d] = v[j];
            }
            ss += v[j].x * v[j].x + v[j].y * v[j].y + v[j].z * v[j].z
                  + v[j].w * v[j].w;
        }
    }
    ss = moe_block_sum(ss, sh);
    inv = 1.0f / sqrtf(ss / (float) D + eps);
#pragma unroll
    for (int j = 0; j < NV; j++) {
        int    d = threadIdx.x + j * RMS_THREADS;
        float4 o;

        if (d >= D4) {
            continue;
        }
        o.x = wv[j].x * (v[j].x * inv);
        o.y = wv[j].y * (v[j].y * inv);
        o.z = wv[j].z * (v[j].z * inv);
        o.w = wv[j].w * (v[j].w * inv);
        if (out != NULL) {
            __nv_bfloat162 p[2];

            p[0] = __floats2bfloat162_rn(o.x, o.y);
            p[1] = __floats2bfloat162_rn(o.z, o.w);
            *reinterpret_cast<uint2 *>(out + (size_t) i * D + 4 * d) =
                *reinterpret_cast<uint2 *>(p);
        }
        if (out_f32 != NULL) {
            reinterpret_cast<float4 *>(out_f32 + (size_t) i * D)[d] = o;
        }
    }
}


extern "C" int
moe_cuda_add_rmsnorm(float *x, const float *delta, const int32_t *rows,
    int n_rows, int D, const float *w, float eps, moe_bf16_t *out,
    float *out_f32, cudaStream_t stream)
{
    if (n_rows <= 0) {
        return MOE_K_OK;
    }
    __nv_bfloat16 *o = reinterpret_cast<__nv_bfloat16 *>(out);
    int            nv = (D / 4 + RMS_THREADS - 1) / RMS_THREADS;

    /* the vector kernel needs 16-byte aligned rows */
    if (D % 4 != 0 || nv > 8
        || ((uintptr_t) x | (uintptr_t) delta | (uintptr_t) w
            | (uintptr_t) out_f32) % 16 != 0
        || (uintptr_t) out % 8 != 0)
    {
        MOE_CUDA_CHECK(moe_launch(kernel_add_rmsnorm, n_rows, 256, 0, stream,
            x, delta, rows, D, w, eps, o, out_f32));
    } else if (nv <= 1) {
        MOE_CUDA_CHECK(moe_launch(kernel_add_rmsnorm_v<1>, n_rows, RMS_THREADS,
            0, stream, x, delta, rows, D, w, eps, o, out_f32));
    } else if (nv <= 2) {
        MOE_CUDA_CHECK(moe_launch(kernel_add_rmsnorm_v<2>, n_rows, RMS_THREADS,
            0, stream, x, delta, rows, D, w, eps, o, out_f32));
    } else if (nv <= 4) {
        MOE_CUDA_CHECK(moe_launch(kernel_add_rmsnorm_v<4>, n_rows, RMS_THREADS,
            0, stream, x, delta, rows, D, w, eps, o, out_f32));
    } else {
        MOE_CUDA_CHECK(moe_launch(kernel_add_rmsnorm_v<8>, n_rows, RMS_THREADS,
            0, stream, x, delta, rows, D, w, eps, o, out_f32));
    }
    return MOE_K_OK;
}
