/* Decode's FFN norm and MoE router for one token in one launch. */
#ifndef MOE_KERNELS_NORM_ROUTE_H
#define MOE_KERNELS_NORM_ROUTE_H
#include "common.h"
#ifdef __cplusplus
extern "C" {
#endif
/*
 * One token (one row of x): moe_cuda_add_rmsnorm(x, delta, NULL, 1, D, w,
 * eps, out, out_f32) followed by moe_cuda_route_permute(out_f32, 1, D,
 * router, E, K, renorm, logits, sel, selw, margin, offs, erow, slot_of,
 * tot), in one block of one launch, writing bit for bit what those calls
 * write (x, out, out_f32, logits, sel, selw, margin, offs, erow, slot_of,
 * tot): the same device code for the norm and the top-k, the router dot
 * products summed in the same order.  The router rows are read before
 * the kernel waits on the one before it (PDL): they are weights.  lean 0:
 * into registers where they fit (E <= 8, D <= 4096; a block of 64
 * registers a thread); lean 1: only asked into L2 (at most 32 registers
 * a thread, so the block fits beside another kernel's blocks).
 * margin and tot may be NULL.  Needs a delta,
 * moe_cuda_norm_route1_ok(D, E, K), x / delta / w / out_f32 /
 * router 16-byte and out 8-byte aligned: MOE_K_EUNSUPPORTED otherwise
 * (the caller runs the two calls).
 */
int moe_cuda_norm_route1(float *x, const float *delta, int D, const float *w,
    float eps, moe_bf16_t *out, float *out_f32, const float *router, int E,
    int K, int renorm, float *logits, int32_t *sel, float *selw,
    float *margin, int32_t *offs, int32_t *erow, int32_t *slot_of,
    int64_t *tot, int lean, cudaStream_t stream);

/* Whether moe_cuda_norm_route1 takes the shape: D % 4 == 0, D <= 8192,
 * 1 <= K <= min(E, 32), E <= 256 (no side effect). */
int moe_cuda_norm_route1_ok(int D, int E, int K);

/*
 * The same work for one token done in the epilogue of the GEMV that
 * writes its delta (the attention's o projection at batch 1:
 * moe_cuda_gemv_fp8_route, moe_gemv.h), so that no launch of its own
 * stands between that GEMV and the expert GEMVs.  Each of the GEMV's
 * blocks adds its columns c of the delta y into the residual (x[c] +=
 * y[c], in place: a column belongs to one block) and writes E + 1
 * partial sums of its columns into part (router[e][c] * (w[c] * x[c])
 * for each expert e, and x[c]^2); the last block to finish (a counter)
 * adds the blocks' partials in block order, so the results do not
 * depend on which block was last, and writes what moe_cuda_norm_route1
 * writes: out (and out_f32 unless NULL) from the updated residual with
 * inv = 1 / sqrt(sum x^2 / D + eps), logits[e] = inv * the expert's sum,
 * then the top-k and the permutation with the same device code.  The
 * residual is bit for bit the separate add's; the sums, hence out,
 * logits and the weights, differ from the separate launches' by fp32
 * summation order only (a choice can differ where two experts' logits
 * are that close).  count must be 0 before the launch; the last block
 * leaves it 0 again (graph replays).  part: moe_cuda_route_epi_floats(N,
 * E) floats for a GEMV of N (= D) columns.
 */
typedef struct {
    float        *x;            /* (D) residual, updated in place */
    const float  *w;            /* (D) RMSNorm weight */
    const float  *router;       /* (E, D) router rows */
    moe_bf16_t   *out;          /* (D) normalized row */
    float        *out_f32;      /* (D) or NULL */
    float        *logits;       /* (E) */
    int32_t      *sel;          /* (K) */
    float        *selw;         /* (K) */
    float        *margin;       /* (1) or NULL */
    int32_t      *offs;         /* (E + 1) */
    int32_t      *erow;         /* (K) */
    int32_t      *slot_of;      /* (K) */
    int64_t      *tot;          /* (E) running totals, or NULL */
    float        *part;         /* scratch, moe_cuda_route_epi_floats */
    unsigned int *count;        /* 0 between launches */
    float         eps;
    int           D, E, K, renorm;
} moe_route_epi_t;

/* Floats of part for a GEMV of N columns routing to E experts. */
size_t moe_cuda_route_epi_floats(int N, int E);

/* Whether an epilogue's fields are usable: moe_cuda_norm_route1_ok(D, E,
 * K), every pointer but out_f32 / margin / tot set, x / w / router /
 * out_f32 16-byte and out 8-byte aligned. */
int moe_cuda_route_epi_ok(const moe_route_epi_t *ep);

/*
 * The fp8 dense GEMV of one row (moe_cuda_gemv_fp8's f16-fragment kernel,
 * moe_gemv.h: Y (N) = X (Kd) times the e4m3 W (N, Kd) with its scales)
 * with the epilogue ep (ep->D == N) in the same launch
 * (kernels/moe_gemv_fp8.cu).  MOE_K_EUNSUPPORTED unless
 * moe_cuda_route_epi_ok(ep), the fp8 GEMV takes the shape and mode with
 * one staged row of Kd, and Y is 16-byte aligned.  late 0: the next
 * launch on the stream is let in (PDL) once the GEMV's wait returns, as
 * every kernel does; 1: only when this grid exits (its blocks then do
 * not sit on the SMs while the last block works alone).
 */
int moe_cuda_gemv_fp8_route(const moe_bf16_t *X, const uint8_t *W,
    const float *scale, int mode, int N, int Kd, float *Y,
    const moe_route_epi_t *ep, int late, cudaStream_t stream);
#ifdef __cplusplus
}
#endif
#endif
