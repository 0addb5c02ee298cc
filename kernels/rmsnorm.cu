/* RMSNorm (fp32 statistics) fused with the residual add. */
#include <type_traits>

#include "common.cuh"
#include "moe_permute.cuh"
#include "rmsnorm.cuh"
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
 * The same with the row held in registers: moe_rms_row (rmsnorm.cuh), NV
 * float4 per thread of a 1024-thread block, so every load of a row is in
 * flight at once (decode runs one block: the loop above waits for one
 * memory round trip per 256 elements, twice).
 */
template <int NV>
__global__ void __launch_bounds__(MOE_RMS_THREADS)
kernel_add_rmsnorm_v(float *__restrict__ x, const float *__restrict__ delta,
    const int32_t *rows, int D, const float *__restrict__ w, float eps,
    __nv_bfloat16 *__restrict__ out, float *__restrict__ out_f32)
{
    moe_pdl_enter();
    __shared__ float sh[32];
    int              i = blockIdx.x;
    int              r = rows != NULL ? rows[i] : i;
    __nv_bfloat16   *o = out != NULL ? out + (size_t) i * D : NULL;
    float           *of = out_f32 != NULL ? out_f32 + (size_t) i * D : NULL;

    if (delta != NULL) {
        moe_rms_row_delta dl = {
            reinterpret_cast<const float4 *>(delta + (size_t) r * D) };

        moe_rms_row<NV>(x + (size_t) r * D, dl, D, w, eps, o, of, sh);
    } else {
        moe_rms_row<NV>(x + (size_t) r * D, moe_rms_no_delta(), D, w, eps, o,
                        of, sh);
    }
}


/* The residual delta: a row of unscaled fp8 products in bf16 times its
 * row scale and the channel scales, as moe_cuda_fp8_rescale_rows_bf16
 * computes it (kernels/gemm_fp8.cu). */
struct moe_rms_q_delta {
    static constexpr bool present = true;
    const uint2  *row;
    const float4 *ws;
    float         q;
    __device__ float4 operator()(int d4) const
    {
        float4 t = moe_bf16x4(row[d4]), w = ws[d4];

        /* rounded (no fma with the residual add that follows): the
         * rescale pass's values */
        return make_float4(moe_fp8_unscale(t.x, q, w.x),
                           moe_fp8_unscale(t.y, q, w.y),
                           moe_fp8_unscale(t.z, q, w.z),
                           moe_fp8_unscale(t.w, q, w.w));
    }
};


/* grid n_rows, MOE_RMS_THREADS: moe_cuda_add_rmsnorm_q */
template <int NV>
__global__ void __launch_bounds__(MOE_RMS_THREADS)
kernel_add_rmsnorm_q(float *__restrict__ x,
    const __nv_bfloat16 *__restrict__ dq, const float *__restrict__ qs,
    const float *__restrict__ ws, const int32_t *rows, int D,
    const float *__restrict__ w, float eps, __nv_bfloat16 *__restrict__ out,
    float *__restrict__ out_f32)
{
    moe_pdl_enter();
    __shared__ float sh[32];
    int              i = blockIdx.x;
    int              r = rows != NULL ? rows[i] : i;
    moe_rms_q_delta  dl = {
        reinterpret_cast<const uint2 *>(dq + (size_t) r * D),
        reinterpret_cast<const float4 *>(ws), qs[r] };

    moe_rms_row<NV>(x + (size_t) r * D, dl, D, w, eps,
                    out != NULL ? out + (size_t) i * D : NULL,
                    out_f32 != NULL ? out_f32 + (size_t) i * D : NULL, sh);
}


/* The delta of token r: the un-permute's weighted sum (moe_permute.cuh). */
struct moe_rms_unperm_delta {
    static constexpr bool present = true;
    const float *ye;
    const int   *ord_row;
    const float *ord_w;
    int          D, K;
    __device__ float4 operator()(int d4) const
    {
        return moe_unperm_sum4(ye, D, ord_row, ord_w, K, d4);
    }
};


/* grid n_rows, MOE_RMS_THREADS: moe_cuda_unpermute_rmsnorm */
template <int NV>
__global__ void __launch_bounds__(MOE_RMS_THREADS)
kernel_unpermute_rmsnorm(float *__restrict__ x, const float *__restrict__ ye,
    const int32_t *sel, const float *selw, const int32_t *slot_of, int K,
    const int32_t *rows, int D, const float *__restrict__ w, float eps,
    __nv_bfloat16 *__restrict__ out, float *__restrict__ out_f32)
{
    moe_pdl_enter();
    __shared__ float sh[32];
    __shared__ int   ord_row[MOE_UNPERM_MAX_K];
    __shared__ float ord_w[MOE_UNPERM_MAX_K];
    int              i = blockIdx.x;
    int              r = rows != NULL ? rows[i] : i;

    moe_unperm_order(sel, selw, slot_of, r, K, ord_row, ord_w);
    __syncthreads();

    moe_rms_unperm_delta dl = { ye, ord_row, ord_w, D, K };

    moe_rms_row<NV>(x + (size_t) r * D, dl, D, w, eps,
                    out != NULL ? out + (size_t) i * D : NULL,
                    out_f32 != NULL ? out_f32 + (size_t) i * D : NULL, sh);
}


/* The delta of token r from unscaled fp8 products (moe_unperm_sum4_q). */
struct moe_rms_unperm_q_delta {
    static constexpr bool present = true;
    const __nv_bfloat16 *yq;
    const float         *qh, *ws;
    size_t               ws_stride;
    const int           *ord_row, *ord_e;
    const float         *ord_w;
    int                  D, K;
    __device__ float4 operator()(int d4) const
    {
        return moe_unperm_sum4_q(yq, qh, ws, ws_stride, D, ord_row, ord_e,
                                 ord_w, K, d4);
    }
};


/* grid n_rows, MOE_RMS_THREADS: moe_cuda_unpermute_rmsnorm_q */
template <int NV>
__global__ void __launch_bounds__(MOE_RMS_THREADS)
kernel_unpermute_rmsnorm_q(float *__restrict__ x,
    const __nv_bfloat16 *__restrict__ yq, const float *__restrict__ qh,
    const float *__restrict__ ws, size_t ws_stride, const int32_t *sel,
    const float *selw, const int32_t *slot_of, int K, const int32_t *rows,
    int D, const float *__restrict__ w, float eps,
    __nv_bfloat16 *__restrict__ out, float *__restrict__ out_f32)
{
    moe_pdl_enter();
    __shared__ float sh[32];
    __shared__ int   ord_row[MOE_UNPERM_MAX_K];
    __shared__ int   ord_e[MOE_UNPERM_MAX_K];
    __shared__ float ord_w[MOE_UNPERM_MAX_K];
    int              i = blockIdx.x;
    int              r = rows != NULL ? rows[i] : i;

    moe_unperm_order(sel, selw, slot_of, r, K, ord_row, ord_w, ord_e);
    __syncthreads();

    moe_rms_unperm_q_delta dl = { yq, qh, ws, ws_stride, ord_row, ord_e,
                                  ord_w, D, K };

    moe_rms_row<NV>(x + (size_t) r * D, dl, D, w, eps,
                    out != NULL ? out + (size_t) i * D : NULL,
                    out_f32 != NULL ? out_f32 + (size_t) i * D : NULL, sh);
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
    int            nv = moe_rms_nv(D);

    /* the vector kernel needs 16-byte aligned rows */
    if (nv == 0
        || ((uintptr_t) x | (uintptr_t) delta | (uintptr_t) w
            | (uintptr_t) out_f32) % 16 != 0
        || (uintptr_t) out % 8 != 0)
    {
        MOE_CUDA_CHECK(moe_launch(kernel_add_rmsnorm, n_rows, 256, 0, stream,
            x, delta, rows, D, w, eps, o, out_f32));
        return MOE_K_OK;
    }
    MOE_CUDA_CHECK(moe_rms_dispatch(nv, [&](auto NV) {
        return moe_launch(kernel_add_rmsnorm_v<decltype(NV)::value>, n_rows,
                          MOE_RMS_THREADS, 0, stream, x, delta, rows, D, w,
                          eps, o, out_f32);
    }));
    return MOE_K_OK;
}


extern "C" int
moe_cuda_unpermute_rmsnorm(float *x, const float *ye, const int32_t *sel,
    const float *selw, const int32_t *slot_of, int K, const int32_t *rows,
    int n_rows, int D, const float *w, float eps, moe_bf16_t *out,
    float *out_f32, cudaStream_t stream)
{
    __nv_bfloat16 *o = reinterpret_cast<__nv_bfloat16 *>(out);
    int            nv = moe_rms_nv(D);

    if (nv == 0 || K < 1 || K > MOE_UNPERM_MAX_K
        || ((uintptr_t) x | (uintptr_t) ye | (uintptr_t) w
            | (uintptr_t) out_f32) % 16 != 0
        || (uintptr_t) out % 8 != 0)
    {
        moe_cuda_set_error("unpermute_rmsnorm: D %d, top-%d or the "
                           "alignment not supported", D, K);
        return MOE_K_EUNSUPPORTED;
    }
    if (n_rows <= 0) {
        return MOE_K_OK;
    }
    MOE_CUDA_CHECK(moe_rms_dispatch(nv, [&](auto NV) {
        return moe_launch(kernel_unpermute_rmsnorm<decltype(NV)::value>, n_rows,
                          MOE_RMS_THREADS, 0, stream, x, ye, sel, selw,
                          slot_of, K, rows, D, w, eps, o, out_f32);
    }));
    return MOE_K_OK;
}


extern "C" int
moe_cuda_unpermute_rmsnorm_q(float *x, const moe_bf16_t *yq, const float *qh,
    const float *ws, size_t ws_stride, const int32_t *sel, const float *selw,
    const int32_t *slot_of, int K, const int32_t *rows, int n_rows, int D,
    const float *w, float eps, moe_bf16_t *out, float *out_f32,
    cudaStream_t stream)
{
    __nv_bfloat16 *o = reinterpret_cast<__nv_bfloat16 *>(out);
    int            nv = moe_rms_nv(D);

    if (nv == 0 || K < 1 || K > MOE_UNPERM_MAX_K || ws_stride % 4 != 0
        || ((uintptr_t) x | (uintptr_t) ws | (uintptr_t) w
            | (uintptr_t) out_f32) % 16 != 0
        || ((uintptr_t) yq | (uintptr_t) out) % 8 != 0)
    {
        moe_cuda_set_error("unpermute_rmsnorm_q: D %d, top-%d, the scale "
                           "stride %zu or the alignment not supported", D, K,
                           ws_stride);
        return MOE_K_EUNSUPPORTED;
    }
    if (n_rows <= 0) {
        return MOE_K_OK;
    }
    const __nv_bfloat16 *y = reinterpret_cast<const __nv_bfloat16 *>(yq);

    MOE_CUDA_CHECK(moe_rms_dispatch(nv, [&](auto NV) {
        return moe_launch(kernel_unpermute_rmsnorm_q<decltype(NV)::value>, n_rows,
                          MOE_RMS_THREADS, 0, stream, x, y, qh, ws,
                          ws_stride, sel, selw, slot_of, K, rows, D, w, eps,
                          o, out_f32);
    }));
    return MOE_K_OK;
}


extern "C" int
moe_cuda_add_rmsnorm_q(float *x, const moe_bf16_t *dq, const float *qs,
    const float *ws, const int32_t *rows, int n_rows, int D, const float *w,
    float eps, moe_bf16_t *out, float *out_f32, cudaStream_t stream)
{
    __nv_bfloat16 *o = reinterpret_cast<__nv_bfloat16 *>(out);
    int            nv = moe_rms_nv(D);

    if (nv == 0
        || ((uintptr_t) x | (uintptr_t) ws | (uintptr_t) w
            | (uintptr_t) out_f32) % 16 != 0
        || ((uintptr_t) dq | (uintptr_t) out) % 8 != 0)
    {
        moe_cuda_set_error("add_rmsnorm_q: D %d or the alignment not "
                           "supported", D);
        return MOE_K_EUNSUPPORTED;
    }
    if (n_rows <= 0) {
        return MOE_K_OK;
    }
    const __nv_bfloat16 *d = reinterpret_cast<const __nv_bfloat16 *>(dq);

    MOE_CUDA_CHECK(moe_rms_dispatch(nv, [&](auto NV) {
        return moe_launch(kernel_add_rmsnorm_q<decltype(NV)::value>, n_rows,
                          MOE_RMS_THREADS, 0, stream, x, d, qs, ws, rows, D,
                          w, eps, o, out_f32);
    }));
    return MOE_K_OK;
}
