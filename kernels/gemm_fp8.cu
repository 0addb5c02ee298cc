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
    int               rows;           /* M rounding (gemm_fp8.h) */
    int               outer_refused;  /* outer-vector scaling refused once */
    int               plans_made;     /* heuristic queries (tests) */
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
    g->rows = 64;
    *out = g;
    return MOE_K_OK;
}


/* M rounded up to the handle's row unit: the rows a unit-scale GEMM
 * multiplies and its plan's key (gemm_fp8.h) */
static int
fg_round_rows(const moe_fp8_gemm_t *g, int M)
{
    return (M + g->rows - 1) / g->rows * g->rows;
}


extern "C" int
moe_cuda_fp8_gemm_rows(const moe_fp8_gemm_t *g)
{
    return g != NULL ? g->rows : MOE_FP8_GEMM_ROWS;
}


extern "C" int
moe_cuda_fp8_gemm_set_rows(moe_fp8_gemm_t *g, int rows)
{
    if (g == NULL || (rows != 64 && rows != 128)) {
        moe_cuda_set_error("fp8 gemm: row rounding %d (64 or 128)", rows);
        return MOE_K_EINVAL;
    }
    g->rows = rows;
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
moe_cuda_fp8_gemm_plans_made(const moe_fp8_gemm_t *g)
{
    return g->plans_made;
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
    /* outer-vector plans write Y as asked; unit-scale plans write fp32
     * into tmp (the rescale path) or bf16 (moe_cuda_gemm_fp8_unscaled) */
    dt = y_bf16 ? CUDA_R_16BF : CUDA_R_32F;

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
    g->plans_made++;
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

/* bf16 pairs of a uint4 (8 values) as floats */
__device__ __forceinline__ void
fg_bf8(uint4 v, float f[8])
{
    const __nv_bfloat162 *h = reinterpret_cast<const __nv_bfloat162 *>(&v);

#pragma unroll
    for (int j = 0; j < 4; j++) {
        float2 x = __bfloat1622float2(h[j]);

        f[2 * j] = x.x;
        f[2 * j + 1] = x.y;
    }
}


/* The block's amax (every thread's) -> the row's scale: s[r] and the
 * return value (a barrier inside: every thread calls it). */
__device__ __forceinline__ float
fg_row_scale(float amax, float *s, int r)
{
    __shared__ float red[FG_QUANT_NT / 32];
    __shared__ float sc;

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
    return sc;
}


/* amax updated with the magnitudes of 8 bf16 values */
__device__ __forceinline__ float
fg_amax8(uint4 v, float amax)
{
    float f[8];

    fg_bf8(v, f);
#pragma unroll
    for (int j = 0; j < 8; j++) {
        amax = fmaxf(amax, fabsf(f[j]));
    }
    return amax;
}


/* e4m3 codes of 8 bf16 values h / d (kernel_quant_rows_fp8's rounding) */
__device__ __forceinline__ uint2
fg_quant8(uint4 hv, float d)
{
    float    h[8];
    uint32_t w[2];

    fg_bf8(hv, h);
#pragma unroll
    for (int j = 0; j < 2; j++) {
        float2 a = make_float2(h[4 * j] / d, h[4 * j + 1] / d);
        float2 b = make_float2(h[4 * j + 2] / d, h[4 * j + 3] / d);
        __nv_fp8x2_storage_t lo, hi;

        lo = __nv_cvt_float2_to_fp8x2(a, __NV_SATFINITE, __NV_E4M3);
        hi = __nv_cvt_float2_to_fp8x2(b, __NV_SATFINITE, __NV_E4M3);
        w[j] = (uint32_t) lo | ((uint32_t) hi << 16);
    }
    return make_uint2(w[0], w[1]);
}


/*
 * One block per row.  IT > 0: a thread's IT groups of 8 values (columns
 * 8 (threadIdx.x + k FG_QUANT_NT)) stay in its registers between the amax
 * and the quantization (one read of the row, no second round trip); IT
 * 0: the row is read twice (rows wider than the registers hold).
 */
template <int IT>
__global__ void __launch_bounds__(FG_QUANT_NT)
kernel_quant_rows_fp8(const __nv_bfloat16 *X, int ldx, const int32_t *xrow,
    int xdiv, int K, uint8_t *Q, float *s)
{
    moe_pdl_enter();
    const int    r = blockIdx.x;
    const int    src = xrow != NULL ? xrow[r] / xdiv : r;
    const uint4 *x = reinterpret_cast<const uint4 *>(X + (size_t) src * ldx);
    const int    n8 = K / 8;
    uint2       *q = reinterpret_cast<uint2 *>(Q + (size_t) r * K);
    float        amax = 0.0f, d;

    if constexpr (IT > 0) {
        uint4 xr[IT];

#pragma unroll
        for (int k = 0; k < IT; k++) {
            int i = threadIdx.x + k * FG_QUANT_NT;

            xr[k] = i < n8 ? x[i] : make_uint4(0u, 0u, 0u, 0u);
        }
#pragma unroll
        for (int k = 0; k < IT; k++) {
            amax = fg_amax8(xr[k], amax);
        }
        d = fg_row_scale(amax, s, r);
#pragma unroll
        for (int k = 0; k < IT; k++) {
            int i = threadIdx.x + k * FG_QUANT_NT;

            if (i < n8) {
                q[i] = fg_quant8(xr[k], d);
            }
        }
    } else {
        for (int i = threadIdx.x; i < n8; i += FG_QUANT_NT) {
            amax = fg_amax8(x[i], amax);
        }
        d = fg_row_scale(amax, s, r);
        for (int i = threadIdx.x; i < n8; i += FG_QUANT_NT) {
            q[i] = fg_quant8(x[i], d);
        }
    }
}


extern "C" int
moe_cuda_quant_rows_fp8(const moe_bf16_t *X, int ldx, const int32_t *xrow,
    int xdiv, int M, int K, uint8_t *Q, float *s, cudaStream_t stream)
{
    const __nv_bfloat16 *x = reinterpret_cast<const __nv_bfloat16 *>(X);
    int                  it;

    if (M <= 0) {
        return MOE_K_OK;
    }
    if (K <= 0 || K % 16 != 0 || ldx % 8 != 0 || ldx < K || xdiv <= 0) {
        moe_cuda_set_error("quant_rows_fp8: K %d ldx %d xdiv %d unsupported "
                           "(K %% 16, ldx %% 8)", K, ldx, xdiv);
        return MOE_K_EUNSUPPORTED;
    }
    it = (K / 8 + FG_QUANT_NT - 1) / FG_QUANT_NT;
#define FG_QR(IT)                                                          \
    moe_launch(kernel_quant_rows_fp8<IT>, M, FG_QUANT_NT, 0, stream, x,    \
               ldx, xrow, xdiv, K, Q, s)
    MOE_CUDA_CHECK(it <= 2 ? FG_QR(2) : it <= 4 ? FG_QR(4)
                   : it <= 8 ? FG_QR(8) : it <= 12 ? FG_QR(12) : FG_QR(0));
#undef FG_QR
    return MOE_K_OK;
}


/* ---- the rescale path ---- */

/* The group of row r (offs NULL: 0): the e < E with offs[e] <= offs[0] + r
 * < offs[e + 1] (rows of empty groups never ask). */
__device__ __forceinline__ int
fg_group(const int32_t *offs, int E, int r)
{
    int lo = 0, hi = E - 1, rr;

    if (offs == NULL) {
        return 0;
    }
    rr = offs[0] + r;
    while (lo < hi) {
        int mid = (lo + hi + 1) / 2;

        if (offs[mid] <= rr) {
            lo = mid;
        } else {
            hi = mid - 1;
        }
    }
    return lo;
}


/* Four consecutive values of an fp32 / bf16 row (16 / 8 bytes). */
__device__ __forceinline__ float4
fg_load4(const float *t, int j4)
{
    return reinterpret_cast<const float4 *>(t)[j4];
}

__device__ __forceinline__ float4
fg_load4(const __nv_bfloat16 *t, int j4)
{
    return moe_bf16x4(reinterpret_cast<const uint2 *>(t)[j4]);
}


/* Y[r * ldy + j] (+)= tmp[r * N + j] * qs[r] * ws[e * ws_stride + j], e
 * the row's group (fg_group; outer: tmp already scaled, qs / ws NULL: a
 * plain strided copy).  tmp fp32 or bf16 (TI).  One block per row r, four
 * columns per thread and step (N % 16 == 0); vec: Y's rows allow the
 * 16-byte (fp32) / 8-byte (bf16) stores of four columns. */
#define FG_RESCALE_NT 256

template <typename TI>
__global__ void __launch_bounds__(FG_RESCALE_NT)
kernel_fp8_rescale(const TI *tmp, int N, const float *qs,
    const float *ws, size_t ws_stride, const int32_t *offs, int E, void *Y,
    int ldy, int y_bf16, int acc, int vec)
{
    moe_pdl_enter();
    const int     r = blockIdx.x;
    const TI     *t = tmp + (size_t) r * N;
    const float   q = qs != NULL ? qs[r] : 1.0f;

    if (ws != NULL) {
        ws += (size_t) fg_group(offs, E, r) * ws_stride;
    }

    for (int j4 = threadIdx.x; j4 < N / 4; j4 += FG_RESCALE_NT) {
        float4 v = fg_load4(t, j4);
        float  o[4] = { v.x, v.y, v.z, v.w };
        size_t y0 = (size_t) r * ldy + 4 * (size_t) j4;

        if (qs != NULL) {
            float4 w = reinterpret_cast<const float4 *>(ws)[j4];

            o[0] = moe_fp8_unscale(o[0], q, w.x);
            o[1] = moe_fp8_unscale(o[1], q, w.y);
            o[2] = moe_fp8_unscale(o[2], q, w.z);
            o[3] = moe_fp8_unscale(o[3], q, w.w);
        }
        if (y_bf16) {
            __nv_bfloat16 *y = reinterpret_cast<__nv_bfloat16 *>(Y) + y0;

            if (vec) {
                __nv_bfloat162 p[2] = { __floats2bfloat162_rn(o[0], o[1]),
                                        __floats2bfloat162_rn(o[2], o[3]) };

                *reinterpret_cast<uint2 *>(y) =
                    *reinterpret_cast<const uint2 *>(p);
            } else {
#pragma unroll
                for (int c = 0; c < 4; c++) {
                    y[c] = __float2bfloat16_rn(o[c]);
                }
            }
        } else {
            float *y = reinterpret_cast<float *>(Y) + y0;

            if (vec) {
                float4 *y4 = reinterpret_cast<float4 *>(y);

                if (acc) {
                    float4 a = *y4;

                    o[0] += a.x;
                    o[1] += a.y;
                    o[2] += a.z;
                    o[3] += a.w;
                }
                *y4 = make_float4(o[0], o[1], o[2], o[3]);
            } else {
#pragma unroll
                for (int c = 0; c < 4; c++) {
                    y[c] = acc ? y[c] + o[c] : o[c];
                }
            }
        }
    }
}


/* ---- SwiGLU of an unscaled gate|up product, quantized for fp8 ---- */

/* rows of up to FG_SQ_REG_IT x 8 x FG_QUANT_NT (24576) columns keep h in
 * registers; longer ones write it over G's gate half */
#define FG_SQ_REG_IT 12

/* h = bf16(silu(g) * u) of the 8 columns 8 i .. 8 i + 7 of a row (g, u:
 * the raw products times q * ws[col], the rescale kernel's arithmetic;
 * SiLU with the fast exponential and division: a few ulp of fp32, far
 * below h's bf16 rounding), amax |h| updated. */
__device__ __forceinline__ uint4
fg_silu8(const uint4 *gt, const uint4 *up, const float *ws, int F, int i,
    float q, float *amax)
{
    float          g[8], u[8], gw[8], uw[8];
    __nv_bfloat162 hb[4];
    const float4  *w4 = reinterpret_cast<const float4 *>(ws + 8 * i);
    const float4  *u4 = reinterpret_cast<const float4 *>(ws + F + 8 * i);

    /* G streams through once (evict-first loads): the L1 keeps the
     * channel scales, which every row of the expert reads again */
    fg_bf8(__ldcs(gt + i), g);
    fg_bf8(__ldcs(up + i), u);
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


/*
 * One block per row r: pass 1 computes h (fg_silu8) and reduces amax |h|;
 * pass 2 quantizes h as kernel_quant_rows_fp8 does.  IT > 0: a thread's
 * IT groups of 8 columns (columns 8 (threadIdx.x + k FG_QUANT_NT)) stay in
 * its registers between the passes (no shared memory: the L1 keeps the
 * channel scales every row of an expert reads); IT 0: h goes over the
 * gate half of G's row (rows too long for the registers).  Each thread
 * rereads only the columns it wrote, so the passes need no barrier
 * between them but the reduction's.
 */
template <int IT>
__global__ void __launch_bounds__(FG_QUANT_NT)
kernel_silu_quant_fp8(__nv_bfloat16 *G, int F, const float *qs,
    const float *ws, size_t ws_stride, const int32_t *offs, int E,
    uint8_t *Q, float *s)
{
    moe_pdl_enter();
    ws += (size_t) fg_group(offs, E, (int) blockIdx.x) * ws_stride;
    const int    r = blockIdx.x, n8 = F / 8;
    uint4       *gh = reinterpret_cast<uint4 *>(G + (size_t) r * 2 * F);
    const uint4 *gt = reinterpret_cast<const uint4 *>(G + (size_t) r * 2 * F);
    const uint4 *up = reinterpret_cast<const uint4 *>(G + (size_t) r * 2 * F
                                                      + F);
    uint2       *qo = reinterpret_cast<uint2 *>(Q + (size_t) r * F);
    const float  q = qs[r];
    float        amax = 0.0f, d;

    if constexpr (IT > 0) {
        uint4 hr[IT > 0 ? IT : 1];

#pragma unroll
        for (int k = 0; k < IT; k++) {
            int i = threadIdx.x + k * FG_QUANT_NT;

            if (i < n8) {
                hr[k] = fg_silu8(gt, up, ws, F, i, q, &amax);
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
    } else {
        for (int i = threadIdx.x; i < n8; i += FG_QUANT_NT) {
            gh[i] = fg_silu8(gt, up, ws, F, i, q, &amax);
        }
        d = fg_row_scale(amax, s, r);
        for (int i = threadIdx.x; i < n8; i += FG_QUANT_NT) {
            qo[i] = fg_quant8(gh[i], d);
        }
    }
}


extern "C" int
moe_cuda_silu_quant_fp8(moe_bf16_t *G, int M, int F, const float *qs,
    const float *ws, size_t ws_stride, const int32_t *offs, int E,
    uint8_t *Q, float *s, cudaStream_t stream)
{
    if (M <= 0) {
        return MOE_K_OK;
    }
    if (F <= 0 || F % 8 != 0 || (uintptr_t) G % 16 != 0
        || (uintptr_t) ws % 16 != 0 || (uintptr_t) Q % 8 != 0
        || (offs != NULL && (E < 1 || ws_stride % 4 != 0)))
    {
        moe_cuda_set_error("silu_quant_fp8: F %d unsupported (F %% 8, G and "
                           "ws 16-byte, Q 8-byte aligned, ws_stride %% 4)",
                           F);
        return MOE_K_EUNSUPPORTED;
    }
    {
        /* groups of 8 columns per thread: h in registers up to 12 */
        int it = (F / 8 + FG_QUANT_NT - 1) / FG_QUANT_NT;
        __nv_bfloat16 *g16 = reinterpret_cast<__nv_bfloat16 *>(G);
        int            e = offs != NULL ? E : 1;

#define FG_SQ(IT)                                                            \
        MOE_CUDA_CHECK(moe_launch(kernel_silu_quant_fp8<IT>, M, FG_QUANT_NT,  \
            0, stream, g16, F, qs, ws, ws_stride, offs, e, Q, s))
        if (it <= 2) {
            FG_SQ(2);
        } else if (it <= 4) {
            FG_SQ(4);
        } else if (it <= 7) {
            FG_SQ(7);
        } else if (it <= FG_SQ_REG_IT) {
            FG_SQ(FG_SQ_REG_IT);
        } else {
            FG_SQ(0);
        }
#undef FG_SQ
    }
    return MOE_K_OK;
}


extern "C" int
moe_cuda_gemm_fp8_unscaled(moe_fp8_gemm_t *g, int M, int N, int K,
    const uint8_t *Q, const uint8_t *W, void *Y, int y_bf16,
    cudaStream_t stream)
{
    fg_plan_t *p;
    float      alpha = 1.0f, beta = 0.0f;

    if (M <= 0 || N <= 0) {
        return MOE_K_OK;
    }
    if (K % 16 != 0 || N % 16 != 0) {
        moe_cuda_set_error("gemm_fp8_unscaled: M %d N %d K %d unsupported "
                           "(K, N multiples of 16)", M, N, K);
        return MOE_K_EUNSUPPORTED;
    }
    /* M rounded up (moe_cuda_fp8_gemm_rows), as the rescale path */
    MOE_TRY(fg_plan_get(g, fg_round_rows(g, M), N, K, y_bf16 != 0, 0, 0,
                        &p));
    FG_LT(cublasLtMatmul(g->lt, p->desc, &alpha, W, p->a, Q, p->b, &beta, Y,
                         p->c, Y, p->c, &p->algo, g->ws, g->ws_bytes,
                         stream));
    return MOE_K_OK;
}


/* moe_cuda_fp8_rescale_rows(_bf16) from fp32 / bf16 products (TI). */
template <typename TI>
static int
fg_rescale_rows(const char *name, const TI *tmp, int M, int N,
    const float *qs, const float *ws, size_t ws_stride, const int32_t *offs,
    int E, float *Y, int ldy, cudaStream_t stream)
{
    if (M <= 0) {
        return MOE_K_OK;
    }
    if (N % 16 != 0 || ldy < N || (uintptr_t) ws % 16 != 0
        || (uintptr_t) tmp % 16 != 0 || ws_stride % 4 != 0
        || (offs != NULL && E < 1))
    {
        moe_cuda_set_error("%s: N %d ldy %d unsupported (N %% 16, tmp and ws "
                           "16-byte aligned, ws_stride %% 4)", name, N, ldy);
        return MOE_K_EUNSUPPORTED;
    }
    MOE_CUDA_CHECK(moe_launch(kernel_fp8_rescale<TI>, M, FG_RESCALE_NT, 0,
        stream, tmp, N, qs, ws, ws_stride, offs, offs != NULL ? E : 1,
        (void *) Y, ldy, 0, 0,
        (int) (ldy % 4 == 0 && (uintptr_t) Y % 16 == 0)));
    return MOE_K_OK;
}


extern "C" int
moe_cuda_fp8_rescale_rows_bf16(const moe_bf16_t *tmp, int M, int N,
    const float *qs, const float *ws, size_t ws_stride, const int32_t *offs,
    int E, float *Y, int ldy, cudaStream_t stream)
{
    return fg_rescale_rows("fp8_rescale_rows_bf16",
                           reinterpret_cast<const __nv_bfloat16 *>(tmp), M, N,
                           qs, ws, ws_stride, offs, E, Y, ldy, stream);
}


extern "C" int
moe_cuda_fp8_rescale_rows(const float *tmp, int M, int N, const float *qs,
    const float *ws, size_t ws_stride, const int32_t *offs, int E, float *Y,
    int ldy, cudaStream_t stream)
{
    return fg_rescale_rows("fp8_rescale_rows", tmp, M, N, qs, ws, ws_stride,
                           offs, E, Y, ldy, stream);
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
    if (K % 16 != 0 || N % 16 != 0 || ldy < N || (accumulate && y_bf16)
        || (uintptr_t) ws % 16 != 0)
    {
        moe_cuda_set_error("gemm_fp8: M %d N %d K %d ldy %d%s unsupported "
                           "(K, N multiples of 16, ws 16-byte aligned)", M,
                           N, K, ldy,
                           accumulate && y_bf16 ? " (accumulate into bf16)"
                                                : "");
        return MOE_K_EUNSUPPORTED;
    }

    /* outer-vector scales straight into Y when its leading dimension is
     * N, else into tmp (fp32) and a copy; a shape the library refuses
     * them for (the plan remembers) takes unit scales + the rescale */
    direct = ldy == N;
    rc = MOE_K_EUNSUPPORTED;
    if (!g->force_rescale && !g->outer_refused && (direct || tmp != NULL)) {
        rc = fg_plan_get(g, M, N, K, direct ? y_bf16 : 0,
                         direct ? accumulate : 0, 1, &p);
        if (rc != MOE_K_OK && rc != MOE_K_EUNSUPPORTED) {
            return rc;
        }
        /* the library takes or refuses the mode by architecture, not by
         * shape (cuBLASLt 13.1 on sm_90: every shape refused); asking
         * again for each new M (a prefill's per-expert row counts) cost
         * a heuristic query per GEMM and evicted the useful plans */
        g->outer_refused = rc == MOE_K_EUNSUPPORTED;
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
        MOE_TRY(fg_plan_get(g, fg_round_rows(g, M), N, K, 0, 0, 0, &p));
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
        int vec = ldy % 4 == 0
                  && (uintptr_t) Y % (y_bf16 ? 8 : 16) == 0;

        MOE_CUDA_CHECK(moe_launch(kernel_fp8_rescale<float>, M,
            FG_RESCALE_NT, 0,
            stream, tmp, N, outer ? NULL : qs, outer ? NULL : ws, (size_t) 0,
            (const int32_t *) NULL, 1, Y, ldy, y_bf16, accumulate, vec));
    }
    return MOE_K_OK;
}
