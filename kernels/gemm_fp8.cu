/*
 * FP8 GEMMs through cuBLASLt (gemm_fp8.h).  Layout: as in gemm.cu, row-major
 * Y (M, N) is column-major Y^T (N, M) = W (N, K) . Q^T; W row-major (N, K) is
 * column-major (K, N) and goes in transposed, Q row-major (M, K) is
 * column-major (K, M) and goes in as is: the "TN" form cuBLASLt requires
 * for fp8 operands.  In cuBLASLt's terms the A scale vector (outer-vector
 * mode) has one value per row of op(A) = per output feature (ws), the B
 * scale vector one per column of B = per token (qs).
 */
#include <stdlib.h>
#include <string.h>

#include <cublasLt.h>
#include <cuda_fp8.h>

#include "common.cuh"
#include "gemm_fp8.h"

#define FG_PLANS       64          /* cached shapes */
#define FG_QUANT_NT    256         /* threads of the quantize kernel */
#define FG_E4M3_MAX    448.0f

typedef struct {
    int                      used;
    int                      refused;     /* no algorithm: remembered */
    int                      M, N, K, y_bf16, acc, outer;
    unsigned                 stamp;
    cublasLtMatmulDesc_t     desc;
    cublasLtMatrixLayout_t   a, b, c;
    cublasLtMatmulAlgo_t     algo;
} fg_plan_t;

struct moe_fp8_gemm_s {
    cublasLtHandle_t  lt;
    void             *ws;
    size_t            ws_bytes;
    int               force_rescale;
    int               last_outer;
    unsigned          clock;
    fg_plan_t         plans[FG_PLANS];
};


#define FG_LT(stmt)                                                          \
    do {                                                                     \
        cublasStatus_t fg_s_ = (stmt);                                       \
        if (fg_s_ != CUBLAS_STATUS_SUCCESS) {                                \
            moe_cuda_set_error("%s at %s:%d: cuBLASLt %s", #stmt, __FILE__,  \
                               __LINE__, cublasGetStatusString(fg_s_));      \
            return MOE_K_EBACKEND;                                           \
        }                                                                    \
    } while (0)


static void
fg_plan_free(fg_plan_t *p)
{
    if (!p->used) {
        return;
    }
    if (p->desc != NULL) {
        (void) cublasLtMatmulDescDestroy(p->desc);
    }
    if (p->a != NULL) {
        (void) cublasLtMatrixLayoutDestroy(p->a);
    }
    if (p->b != NULL) {
        (void) cublasLtMatrixLayoutDestroy(p->b);
    }
    if (p->c != NULL) {
        (void) cublasLtMatrixLayoutDestroy(p->c);
    }
    memset(p, 0, sizeof(*p));
}


extern "C" int
moe_cuda_fp8_gemm_create(void *workspace, size_t ws_bytes,
    moe_fp8_gemm_t **out)
{
    moe_fp8_gemm_t *g;
    cublasStatus_t  st;

    *out = NULL;
    g = (moe_fp8_gemm_t *) calloc(1, sizeof(*g));
    if (g == NULL) {
        moe_cuda_set_error("fp8 gemm: out of host memory");
        return MOE_K_EBACKEND;
    }
    st = cublasLtCreate(&g->lt);
    if (st != CUBLAS_STATUS_SUCCESS) {
        moe_cuda_set_error("fp8 gemm: cublasLtCreate: %s",
                           cublasGetStatusString(st));
        free(g);
        return MOE_K_EBACKEND;
    }
    g->ws = workspace;
    g->ws_bytes = workspace != NULL ? ws_bytes : 0;
    g->last_outer = -1;
    *out = g;
    return MOE_K_OK;
}


extern "C" void
moe_cuda_fp8_gemm_destroy(moe_fp8_gemm_t *g)
{
    if (g == NULL) {
        return;
    }
    for (int i = 0; i < FG_PLANS; i++) {
        fg_plan_free(&g->plans[i]);
    }
    (void) cublasLtDestroy(g->lt);
    free(g);
}


extern "C" void
moe_cuda_fp8_gemm_force_rescale(moe_fp8_gemm_t *g, int on)
{
    g->force_rescale = on != 0;
}


extern "C" int
moe_cuda_fp8_gemm_outer_vec(const moe_fp8_gemm_t *g)
{
    return g->last_outer == 1;
}


/*
 * Build the plan for a shape: descriptors and the heuristic's first
 * algorithm.  outer: outer-vector scales (else unit scales, fp32 D into
 * the caller's tmp).  Returns MOE_K_EUNSUPPORTED when the heuristic finds
 * no algorithm (the caller may retry without outer-vector scaling).
 */
static int
fg_plan_make(moe_fp8_gemm_t *g, fg_plan_t *p, int M, int N, int K,
    int y_bf16, int acc, int outer)
{
    cublasLtMatmulPreference_t      pref = NULL;
    cublasLtMatmulHeuristicResult_t res;
    cublasOperation_t               ta = CUBLAS_OP_T, tb = CUBLAS_OP_N;
    cudaDataType_t                  dt;
    int32_t                         mode;
    int8_t                          fast = 0;
    int                             nres = 0;
    cublasStatus_t                  st;

    memset(p, 0, sizeof(*p));
    p->used = 1;
    p->M = M;
    p->N = N;
    p->K = K;
    p->y_bf16 = y_bf16;
    p->acc = acc;
    p->outer = outer;
    /* the rescale path writes fp32 into tmp (N x M column-major) */
    dt = outer && y_bf16 ? CUDA_R_16BF : CUDA_R_32F;

    FG_LT(cublasLtMatmulDescCreate(&p->desc, CUBLAS_COMPUTE_32F,
                                   CUDA_R_32F));
    FG_LT(cublasLtMatmulDescSetAttribute(p->desc, CUBLASLT_MATMUL_DESC_TRANSA,
                                         &ta, sizeof(ta)));
    FG_LT(cublasLtMatmulDescSetAttribute(p->desc, CUBLASLT_MATMUL_DESC_TRANSB,
                                         &tb, sizeof(tb)));
    FG_LT(cublasLtMatmulDescSetAttribute(p->desc,
                                         CUBLASLT_MATMUL_DESC_FAST_ACCUM,
                                         &fast, sizeof(fast)));
    if (outer) {
        mode = CUBLASLT_MATMUL_MATRIX_SCALE_OUTER_VEC_32F;
        FG_LT(cublasLtMatmulDescSetAttribute(p->desc,
                  CUBLASLT_MATMUL_DESC_A_SCALE_MODE, &mode, sizeof(mode)));
        FG_LT(cublasLtMatmulDescSetAttribute(p->desc,
                  CUBLASLT_MATMUL_DESC_B_SCALE_MODE, &mode, sizeof(mode)));
    }
    FG_LT(cublasLtMatrixLayoutCreate(&p->a, CUDA_R_8F_E4M3, K, N, K));
    FG_LT(cublasLtMatrixLayoutCreate(&p->b, CUDA_R_8F_E4M3, K, M, K));
    /* ld set per call would need a new layout: plans are keyed without
     * ldy, so D's ld is fixed to N here and the caller's ldy handled in
     * moe_cuda_gemm_fp8 (ldy != N goes through the tmp + rescale copy) */
    FG_LT(cublasLtMatrixLayoutCreate(&p->c, dt, N, M, N));

    FG_LT(cublasLtMatmulPreferenceCreate(&pref));
    st = cublasLtMatmulPreferenceSetAttribute(pref,
             CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES, &g->ws_bytes,
             sizeof(g->ws_bytes));
    if (st == CUBLAS_STATUS_SUCCESS) {
        st = cublasLtMatmulAlgoGetHeuristic(g->lt, p->desc, p->a, p->b, p->c,
                                            p->c, pref, 1, &res, &nres);
    }
    (void) cublasLtMatmulPreferenceDestroy(pref);
    if (st != CUBLAS_STATUS_SUCCESS || nres < 1) {
        moe_cuda_set_error("fp8 gemm: no cuBLASLt algorithm for M %d N %d "
                           "K %d (%s scales): %s", M, N, K,
                           outer ? "outer-vector" : "unit",
                           cublasGetStatusString(st));
        fg_plan_free(p);
        return MOE_K_EUNSUPPORTED;
    }
    p->algo = res.algo;
    return MOE_K_OK;
}


static int
fg_plan_get(moe_fp8_gemm_t *g, int M, int N, int K, int y_bf16, int acc,
    int outer, fg_plan_t **out)
{
    fg_plan_t *victim = &g->plans[0];
    int        rc;

    g->clock++;
    for (int i = 0; i < FG_PLANS; i++) {
        fg_plan_t *p = &g->plans[i];

        if (p->used && p->M == M && p->N == N && p->K == K
            && p->y_bf16 == y_bf16 && p->acc == acc && p->outer == outer)
        {
            p->stamp = g->clock;
            *out = p;
            return p->refused ? MOE_K_EUNSUPPORTED : MOE_K_OK;
        }
        if (!p->used || (victim->used && p->stamp < victim->stamp)) {
            victim = p;
        }
    }
    fg_plan_free(victim);
    rc = fg_plan_make(g, victim, M, N, K, y_bf16, acc, outer);
    victim->stamp = g->clock;
    if (rc == MOE_K_EUNSUPPORTED) {
        /* remember the refusal (descriptors freed by fg_plan_make) */
        victim->used = 1;
        victim->refused = 1;
        victim->M = M;
        victim->N = N;
        victim->K = K;
        victim->y_bf16 = y_bf16;
        victim->acc = acc;
        victim->outer = outer;
    }
    if (rc != MOE_K_OK) {
        return rc;
    }
    *out = victim;
    return MOE_K_OK;
}


/* ---- dynamic per-row quantization ---- */

__global__ void __launch_bounds__(FG_QUANT_NT)
kernel_quant_rows_fp8(const __nv_bfloat16 *X, int ldx, const int32_t *xrow,
    int xdiv, int K, uint8_t *Q, float *s)
{
    moe_pdl_enter();
    __shared__ float red[FG_QUANT_NT / 32];
    __shared__ float sc;
    const int        r = blockIdx.x;
    const int        src = xrow != NULL ? xrow[r] / xdiv : r;
    const uint4     *x = reinterpret_cast<const uint4 *>(X + (size_t) src
                                                          * ldx);
    const int        n8 = K / 8;
    float            amax = 0.0f;

    for (int i = threadIdx.x; i < n8; i += FG_QUANT_NT) {
        uint4                 v = x[i];
        const __nv_bfloat162 *h = reinterpret_cast<const __nv_bfloat162 *>(
                                      &v);

#pragma unroll
        for (int j = 0; j < 4; j++) {
            float2 f = __bfloat1622float2(h[j]);

            amax = fmaxf(amax, fmaxf(fabsf(f.x), fabsf(f.y)));
        }
    }
    amax = moe_warp_max(amax);
    if ((threadIdx.x & 31) == 0) {
        red[threadIdx.x >> 5] = amax;
    }
    __syncthreads();
    if (threadIdx.x == 0) {
        float m = red[0];

        for (int w = 1; w < FG_QUANT_NT / 32; w++) {
            m = fmaxf(m, red[w]);
        }
        sc = fmaxf(m, 1e-12f) / FG_E4M3_MAX;
        s[r] = sc;
    }
    __syncthreads();

    const float d = sc;
    uint2      *q = reinterpret_cast<uint2 *>(Q + (size_t) r * K);

    for (int i = threadIdx.x; i < n8; i += FG_QUANT_NT) {
        uint4                 v = x[i];
        const __nv_bfloat162 *h = reinterpret_cast<const __nv_bfloat162 *>(
                                      &v);
        uint32_t              w[2];

#pragma unroll
        for (int j = 0; j < 2; j++) {
            float2 a = __bfloat1622float2(h[2 * j]);
            float2 b = __bfloat1622float2(h[2 * j + 1]);
            __nv_fp8x2_storage_t lo, hi;

            a.x /= d;
            a.y /= d;
            b.x /= d;
            b.y /= d;
            lo = __nv_cvt_float2_to_fp8x2(a, __NV_SATFINITE, __NV_E4M3);
            hi = __nv_cvt_float2_to_fp8x2(b, __NV_SATFINITE, __NV_E4M3);
            w[j] = (uint32_t) lo | ((uint32_t) hi << 16);
        }
        q[i] = make_uint2(w[0], w[1]);
    }
}


extern "C" int
moe_cuda_quant_rows_fp8(const moe_bf16_t *X, int ldx, const int32_t *xrow,
    int xdiv, int M, int K, uint8_t *Q, float *s, cudaStream_t stream)
{
    if (M <= 0) {
        return MOE_K_OK;
    }
    if (K <= 0 || K % 16 != 0 || ldx % 8 != 0 || ldx < K || xdiv <= 0) {
        moe_cuda_set_error("quant_rows_fp8: K %d ldx %d xdiv %d unsupported "
                           "(K %% 16, ldx %% 8)", K, ldx, xdiv);
        return MOE_K_EUNSUPPORTED;
    }
    MOE_CUDA_CHECK(moe_launch(kernel_quant_rows_fp8, M, FG_QUANT_NT, 0, stream,
        reinterpret_cast<const __nv_bfloat16 *>(X), ldx, xrow, xdiv, K, Q, s));
    return MOE_K_OK;
}


/* ---- the rescale path ---- */

/* Y[r * ldy + j] (+)= tmp[r * N + j] * qs[r] * ws[j] (outer: tmp already
 * scaled, qs / ws NULL: a plain strided copy). */
__global__ void
kernel_fp8_rescale(const float *tmp, int M, int N, const float *qs,
    const float *ws, void *Y, int ldy, int y_bf16, int acc)
{
    moe_pdl_enter();
    size_t i = (size_t) blockIdx.x * blockDim.x + threadIdx.x;

    if (i >= (size_t) M * N) {
        return;
    }

    int   r = (int) (i / N), j = (int) (i % N);
    float v = tmp[i];

    if (qs != NULL) {
        v *= qs[r] * ws[j];
    }
    if (y_bf16) {
        reinterpret_cast<__nv_bfloat16 *>(Y)[(size_t) r * ldy + j] =
            __float2bfloat16_rn(v);
    } else {
        float *y = reinterpret_cast<float *>(Y) + (size_t) r * ldy + j;

        *y = acc ? *y + v : v;
    }
}


extern "C" int
moe_cuda_gemm_fp8(moe_fp8_gemm_t *g, int M, int N, int K, const uint8_t *Q,
    const float *qs, const uint8_t *W, const float *ws, void *Y, int ldy,
    int y_bf16, int accumulate, float *tmp, cudaStream_t stream)
{
    fg_plan_t *p = NULL;
    float      alpha = 1.0f, beta;
    int        outer, rc, direct;

    if (M <= 0 || N <= 0) {
        return MOE_K_OK;
    }
    if (K % 16 != 0 || N % 16 != 0 || ldy < N || (accumulate && y_bf16)) {
        moe_cuda_set_error("gemm_fp8: M %d N %d K %d ldy %d%s unsupported "
                           "(K, N multiples of 16)", M, N, K, ldy,
                           accumulate && y_bf16 ? " (accumulate into bf16)"
                                                : "");
        return MOE_K_EUNSUPPORTED;
    }

    /* outer-vector scales straight into Y when its leading dimension is
     * N, else into tmp (fp32) and a copy; a shape the library refuses
     * them for (the plan remembers) takes unit scales + the rescale */
    direct = ldy == N;
    rc = MOE_K_EUNSUPPORTED;
    if (!g->force_rescale && (direct || tmp != NULL)) {
        rc = fg_plan_get(g, M, N, K, direct ? y_bf16 : 0,
                         direct ? accumulate : 0, 1, &p);
        if (rc != MOE_K_OK && rc != MOE_K_EUNSUPPORTED) {
            return rc;
        }
    }
    outer = rc == MOE_K_OK;
    direct = direct && outer;
    if (!outer) {
        if (tmp == NULL) {
            moe_cuda_set_error("gemm_fp8: the rescale path needs the "
                               "scratch (outer-vector scaling refused or "
                               "ldy %d != N %d)", ldy, N);
            return MOE_K_EUNSUPPORTED;
        }
        /* the unit-scale GEMM runs on M rounded up to 64 rows (Q holds
         * them: gemm_fp8.h), so the many per-expert row counts of a
         * prefill share a few plans; the rescale writes the M real rows */
        MOE_TRY(fg_plan_get(g, (M + 63) / 64 * 64, N, K, 0, 0, 0, &p));
    } else {
        FG_LT(cublasLtMatmulDescSetAttribute(p->desc,
                  CUBLASLT_MATMUL_DESC_A_SCALE_POINTER, &ws, sizeof(ws)));
        FG_LT(cublasLtMatmulDescSetAttribute(p->desc,
                  CUBLASLT_MATMUL_DESC_B_SCALE_POINTER, &qs, sizeof(qs)));
    }
    beta = direct && accumulate ? 1.0f : 0.0f;
    {
        void *d = direct ? Y : (void *) tmp;

        FG_LT(cublasLtMatmul(g->lt, p->desc, &alpha, W, p->a, Q, p->b, &beta,
                             d, p->c, d, p->c, &p->algo, g->ws, g->ws_bytes,
                             stream));
    }
    g->last_outer = outer;
    if (!direct) {
        size_t n = (size_t) M * N;
        int    nb = (int) ((n + 255) / 256);

        MOE_CUDA_CHECK(moe_launch(kernel_fp8_rescale, nb, 256, 0, stream, tmp,
            M, N, outer ? NULL : qs, outer ? NULL : ws, Y, ldy, y_bf16,
            accumulate));
    }
    return MOE_K_OK;
}
