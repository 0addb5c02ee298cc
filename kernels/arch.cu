/* Optional architecture pieces: LayerNorm, biases, q/k norm, GELU, shared
 * expert gate, learned positions (see arch.h). */
#include "common.cuh"
#include "arch.h"


__global__ void
kernel_add_layernorm(float *x, const float *delta, const int32_t *rows, int D,
    const float *w, const float *bias, float eps, __nv_bfloat16 *out,
    float *out_f32)
{
    moe_pdl_enter();
    __shared__ float sh[32];
    int              i = blockIdx.x;
    int              r = rows != NULL ? rows[i] : i;
    float           *xr = x + (size_t) r * D;
    const float     *dr = delta != NULL ? delta + (size_t) r * D : NULL;
    float            s = 0.0f, ss = 0.0f, mean, inv;

    for (int d = threadIdx.x; d < D; d += blockDim.x) {
        float v = xr[d];

        if (dr != NULL) {
            v += dr[d];
            xr[d] = v;
        }
        s += v;
    }
    s = moe_block_sum(s, sh);       /* barrier: xr writes are visible */
    mean = s / (float) D;
    for (int d = threadIdx.x; d < D; d += blockDim.x) {
        float v = xr[d] - mean;

        ss += v * v;
    }
    ss = moe_block_sum(ss, sh);
    inv = 1.0f / sqrtf(ss / (float) D + eps);
    for (int d = threadIdx.x; d < D; d += blockDim.x) {
        float o = (xr[d] - mean) * inv * w[d] + bias[d];

        if (out != NULL) {
            out[(size_t) i * D + d] = moe_f2bf(o);
        }
        if (out_f32 != NULL) {
            out_f32[(size_t) i * D + d] = o;
        }
    }
}


extern "C" int
moe_cuda_add_layernorm(float *x, const float *delta, const int32_t *rows,
    int n_rows, int D, const float *w, const float *bias, float eps,
    moe_bf16_t *out, float *out_f32, cudaStream_t stream)
{
    if (n_rows <= 0) {
        return MOE_K_OK;
    }
    MOE_CUDA_CHECK(moe_launch(kernel_add_layernorm, n_rows, 256, 0, stream, x,
        delta, rows, D, w, bias, eps, reinterpret_cast<__nv_bfloat16 *>(out),
        out_f32));
    return MOE_K_OK;
}


__global__ void
kernel_add_bias(float *y, int ldy, int64_t n, int N, const float *bias)
{
    moe_pdl_enter();
    for (int64_t i = blockIdx.x * (int64_t) blockDim.x + threadIdx.x; i < n;
         i += (int64_t) gridDim.x * blockDim.x)
    {
        int64_t t = i / N, j = i % N;

        y[t * ldy + j] += bias[j];
    }
}


extern "C" int
moe_cuda_add_bias(float *y, int ldy, int T, int N, const float *bias,
    cudaStream_t stream)
{
    int64_t n = (int64_t) T * N;

    if (n <= 0) {
        return MOE_K_OK;
    }
    MOE_CUDA_CHECK(moe_launch(kernel_add_bias, moe_grid(n, 256), 256, 0,
        stream, y, ldy, n, N, bias));
    return MOE_K_OK;
}


/* one warp per (token, head) */
__global__ void
kernel_head_rmsnorm(float *x, int ld, int T, int n_heads, int hd,
    const float *w, float eps)
{
    moe_pdl_enter();
    int   item = blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
    int   lane = threadIdx.x & 31;
    float ss = 0.0f, inv;

    if (item >= T * n_heads) {
        return;                 /* uniform over the warp */
    }
    float *v = x + (size_t) (item / n_heads) * ld
               + (size_t) (item % n_heads) * hd;

    for (int i = lane; i < hd; i += 32) {
        ss += v[i] * v[i];
    }
    ss = moe_warp_sum(ss);
    inv = 1.0f / sqrtf(ss / (float) hd + eps);
    for (int i = lane; i < hd; i += 32) {
        v[i] = w[i] * (v[i] * inv);
    }
}


extern "C" int
moe_cuda_head_rmsnorm(float *x, int ld, int T, int n_heads, int hd,
    const float *w, float eps, cudaStream_t stream)
{
    int64_t items = (int64_t) T * n_heads;

    if (items <= 0) {
        return MOE_K_OK;
    }
    MOE_CUDA_CHECK(moe_launch(kernel_head_rmsnorm,
        (unsigned) ((items + 7) / 8), 256, 0, stream, x, ld, T, n_heads, hd, w,
        eps));
    return MOE_K_OK;
}


__device__ __forceinline__ float
arch_act(float x, int act)
{
    if (act == 2) {             /* MOE_ACT_GELU */
        return 0.5f * x * (1.0f + erff(x * 0.70710678118654752f));
    }
    if (act == 1) {             /* MOE_ACT_GELU_TANH */
        return 0.5f * x * (1.0f + tanhf(0.79788456080286536f
                                        * (x + 0.044715f * x * x * x)));
    }
    return x / (1.0f + expf(-x));
}


__global__ void
kernel_act_mul(const float *g, int ldg, const float *bg, const float *u,
    int ldu, const float *bu, int64_t n, int F, int act, __nv_bfloat16 *h,
    int ldh)
{
    moe_pdl_enter();
    for (int64_t i = blockIdx.x * (int64_t) blockDim.x + threadIdx.x; i < n;
         i += (int64_t) gridDim.x * blockDim.x)
    {
        int64_t r = i / F, j = i % F;
        float   uv = u[r * ldu + j], o;

        if (bu != NULL) {
            uv += bu[j];
        }
        if (g == NULL) {
            o = arch_act(uv, act);
        } else {
            float gv = g[r * ldg + j];

            if (bg != NULL) {
                gv += bg[j];
            }
            o = arch_act(gv, act) * uv;
        }
        h[r * ldh + j] = moe_f2bf(o);
    }
}


extern "C" int
moe_cuda_act_mul(const float *g, int ldg, const float *bg, const float *u,
    int ldu, const float *bu, int R, int F, int act, moe_bf16_t *h, int ldh,
    cudaStream_t stream)
{
    int64_t n = (int64_t) R * F;

    if (n <= 0) {
        return MOE_K_OK;
    }
    if (act < 0 || act > 2) {
        moe_cuda_set_error("act_mul: unknown activation %d", act);
        return MOE_K_EUNSUPPORTED;
    }
    MOE_CUDA_CHECK(moe_launch(kernel_act_mul, moe_grid(n, 256), 256, 0, stream,
        g, ldg, bg, u, ldu, bu, n, F, act,
        reinterpret_cast<__nv_bfloat16 *>(h), ldh));
    return MOE_K_OK;
}


/* one block per token */
__global__ void
kernel_sigmoid_gate_add(float *out, const float *y, int ldy, const float *xf,
    const float *wg, int D)
{
    moe_pdl_enter();
    __shared__ float sh[32];
    int              t = blockIdx.x;
    const float     *xr = xf + (size_t) t * D;
    float            s = 0.0f, sg;

    for (int d = threadIdx.x; d < D; d += blockDim.x) {
        s += wg[d] * xr[d];
    }
    s = moe_block_sum(s, sh);
    sg = 1.0f / (1.0f + expf(-s));
    for (int d = threadIdx.x; d < D; d += blockDim.x) {
        out[(size_t) t * D + d] += sg * y[(size_t) t * ldy + d];
    }
}


extern "C" int
moe_cuda_sigmoid_gate_add(float *out, const float *y, int ldy,
    const float *xf, const float *wg, int T, int D, cudaStream_t stream)
{
    if (T <= 0) {
        return MOE_K_OK;
    }
    MOE_CUDA_CHECK(moe_launch(kernel_sigmoid_gate_add, T, 256, 0, stream, out,
        y, ldy, xf, wg, D));
    return MOE_K_OK;
}


__global__ void
kernel_add_pos(float *x, const int32_t *pos, int64_t n, int D,
    const float *pe)
{
    moe_pdl_enter();
    for (int64_t i = blockIdx.x * (int64_t) blockDim.x + threadIdx.x; i < n;
         i += (int64_t) gridDim.x * blockDim.x)
    {
        int64_t t = i / D, j = i % D;

        x[i] += pe[(size_t) pos[t] * D + j];
    }
}


extern "C" int
moe_cuda_add_pos(float *x, const int32_t *pos, int T, int D, const float *pe,
    cudaStream_t stream)
{
    int64_t n = (int64_t) T * D;

    if (n <= 0) {
        return MOE_K_OK;
    }
    MOE_CUDA_CHECK(moe_launch(kernel_add_pos, moe_grid(n, 256), 256, 0, stream,
        x, pos, n, D, pe));
    return MOE_K_OK;
}
