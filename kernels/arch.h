/*
 * Kernels for the optional architecture pieces (Qwen2, Qwen2-MoE,
 * Qwen3-MoE, GPT-2): LayerNorm, bias add, per-head RMSNorm, GELU/SiLU
 * activations with biases, the sigmoid-gated shared-expert add and learned
 * position embeddings.  Same formulas and order of operations as
 * engine/backends/cpu_backend.c.
 */
#ifndef MOE_KERNELS_ARCH_H
#define MOE_KERNELS_ARCH_H
#include "common.h"
#ifdef __cplusplus
extern "C" {
#endif
/*
 * LayerNorm fused with the residual add, moe_cuda_add_rmsnorm's contract
 * with: out[i, :] = (v - mean(v)) * (1 / sqrt(var(v) + eps)) * w + bias,
 * var the biased variance (fp32 statistics, two passes).  bias: (D) fp32.
 */
int moe_cuda_add_layernorm(float *x, const float *delta, const int32_t *rows,
    int n_rows, int D, const float *w, const float *bias, float eps,
    moe_bf16_t *out, float *out_f32, cudaStream_t stream);

/* y[t * ldy + j] += bias[j] for t < T, j < N.  y fp32, bias (N) fp32. */
int moe_cuda_add_bias(float *y, int ldy, int T, int N, const float *bias,
    cudaStream_t stream);

/*
 * Per-head RMSNorm in place: for t < T, h < n_heads, v = x + t * ld +
 * h * hd: v[i] = w[i] * (v[i] / sqrt(mean(v^2) + eps)).  w: (hd) fp32.
 */
int moe_cuda_head_rmsnorm(float *x, int ld, int T, int n_heads, int hd,
    const float *w, float eps, cudaStream_t stream);

/*
 * MLP activation into bf16, for r < R, j < F (bg, bu may be NULL = 0):
 *   gated (g != NULL): h = act(g[r*ldg+j] + bg[j]) * (u[r*ldu+j] + bu[j])
 *   ungated (g == NULL): h = act(u[r*ldu+j] + bu[j])
 * act: moe_act_t (0 SiLU x/(1+exp(-x)), 1 GELU tanh approx., 2 GELU erf).
 * h[r * ldh + j] bf16.
 */
int moe_cuda_act_mul(const float *g, int ldg, const float *bg,
    const float *u, int ldu, const float *bu, int R, int F, int act,
    moe_bf16_t *h, int ldh, cudaStream_t stream);

/*
 * Shared expert (Qwen2-MoE): for t < T, s = 1 / (1 + exp(-(wg . xf[t, :]))),
 * out[t, j] += s * y[t * ldy + j], j < D.  xf (T, D) fp32, wg (D) fp32,
 * out (T, D) fp32.
 */
int moe_cuda_sigmoid_gate_add(float *out, const float *y, int ldy,
    const float *xf, const float *wg, int T, int D, cudaStream_t stream);

/* Learned positions: x[t, :] += pe[pos[t], :].  pe (*, D) fp32, pos (T)
 * int32 device (each within pe, not checked here). */
int moe_cuda_add_pos(float *x, const int32_t *pos, int T, int D,
    const float *pe, cudaStream_t stream);
#ifdef __cplusplus
}
#endif
#endif
