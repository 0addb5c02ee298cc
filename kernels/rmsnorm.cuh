/*
 * The row RMSNorm with the residual add as a device function (rmsnorm.cu's
 * row kernels and norm_route.cu's decode router run it): the same loads,
 * the same fp32 operations in the same order, so every fused launch writes
 * the bits the separate launches write.
 */
#ifndef MOE_KERNELS_RMSNORM_CUH
#define MOE_KERNELS_RMSNORM_CUH

#include <type_traits>

#include "common.cuh"

#define MOE_RMS_THREADS 1024    /* threads of the vector row norm */


/* The residual delta: none (x only normalized). */
struct moe_rms_no_delta {
    static constexpr bool present = false;
    __device__ float4 operator()(int) const
    {
        return make_float4(0.0f, 0.0f, 0.0f, 0.0f);
    }
};


/* The residual delta: a row of a (*, D) fp32 tensor. */
struct moe_rms_row_delta {
    static constexpr bool present = true;
    const float4 *row;
    __device__ float4 operator()(int d4) const
    {
        return row[d4];
    }
};


/*
 * One row by the whole block (MOE_RMS_THREADS threads, NV float4 each,
 * D % 4 == 0, D <= 4096 NV): v = x + delta (stored back into x when there
 * is a delta), out = bf16(w * v / sqrt(mean(v^2) + eps)), out_f32 the same
 * in fp32 (either may be NULL).  sh: 32 floats (moe_block_sum).  Every
 * thread calls it; it syncs.
 */
template <int NV, class Delta>
__device__ __forceinline__ void
moe_rms_row(float *x, const Delta &delta, int D, const float *w, float eps,
    __nv_bfloat16 *out, float *out_f32, float *sh)
{
    int           D4 = D >> 2;
    float4       *xr = reinterpret_cast<float4 *>(x);
    const float4 *w4 = reinterpret_cast<const float4 *>(w);
    float4        v[NV], wv[NV];
    float         ss = 0.0f, inv;

#pragma unroll
    for (int j = 0; j < NV; j++) {
        int d = threadIdx.x + j * MOE_RMS_THREADS;

        if (d < D4) {
            v[j] = xr[d];
            wv[j] = w4[d];
            if (Delta::present) {
                float4 a = delta(d);

                v[j].x += a.x; v[j].y += a.y; v[j].z += a.z; v[j].w += a.w;
            }
        } else {
            v[j] = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
            wv[j] = v[j];
        }
    }
#pragma unroll
    for (int j = 0; j < NV; j++) {
        int d = threadIdx.x + j * MOE_RMS_THREADS;

        if (d < D4) {
            if (Delta::present) {
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
        int    d = threadIdx.x + j * MOE_RMS_THREADS;
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
            *reinterpret_cast<uint2 *>(out + 4 * d) =
                *reinterpret_cast<uint2 *>(p);
        }
        if (out_f32 != NULL) {
            reinterpret_cast<float4 *>(out_f32)[d] = o;
        }
    }
}


/* float4s per thread of moe_rms_row for D (0: D % 4 != 0 or too wide) */
static inline int
moe_rms_nv(int D)
{
    int nv = (D / 4 + MOE_RMS_THREADS - 1) / MOE_RMS_THREADS;

    if (D % 4 != 0 || nv > 8) {
        return 0;
    }
    return nv <= 1 ? 1 : nv <= 2 ? 2 : nv <= 4 ? 4 : 8;
}


/* launch(std::integral_constant<int, NV>()) for NV = moe_rms_nv(D)'s
 * value nv (1, 2, 4 or 8): each row-norm launcher's one dispatch */
template <class Launch>
static cudaError_t
moe_rms_dispatch(int nv, Launch launch)
{
    return nv == 1 ? launch(std::integral_constant<int, 1>())
           : nv == 2 ? launch(std::integral_constant<int, 2>())
           : nv == 4 ? launch(std::integral_constant<int, 4>())
           : launch(std::integral_constant<int, 8>());
}

#endif
