/*
 * The CUDA tuning record reader (engine/backends/cuda_tuning.c): defaults,
 * the automatic gemv_max_t, each MOE_CUDA_* override, and the refusal of
 * malformed or out-of-range values with a message naming the variable.
 * Plain C: runs in the CPU-only build too.  With the CUDA build also the
 * 4-bit kernel choice by shape and row hint (host functions of
 * kernels/q4_group.cu and kernels/q4_wgmma.cu; no device needed): which
 * shapes the GEMV by group, the warpgroup GEMM and
 * moe_cuda_qgemv_q4g_rows' own paths take.
 */
#include <stdlib.h>
#include <string.h>

#include "moe.h"
#include "backends/cuda_tuning.h"
#include "tap.h"

static const char *vars[] = {
    "MOE_CUDA_GRAPHS", "MOE_CUDA_SAMPLE_TOKENS", "MOE_CUDA_GEMV_MAX_T",
    "MOE_CUDA_DENSE_GEMV_T", "MOE_CUDA_GGEMM_MAX_T", "MOE_CUDA_GEMV_FMA",
    "MOE_CUDA_ATT_BPS", "MOE_CUDA_ATT_LONG_CTX", "MOE_CUDA_ATT_LONG_BPS",
    "MOE_CUDA_ATT_DECODE_TC", "MOE_CUDA_PDL", "MOE_CUDA_FUSE_UNPERMUTE",
    "MOE_CUDA_FOLD_SCALES", "MOE_CUDA_FP8_GROUPED", "MOE_CUDA_Q4_LAYOUT",
    "MOE_CUDA_Q4_GEMV", "MOE_CUDA_FP8_GEMV", "MOE_CUDA_FP8_GGEMM",
    "MOE_CUDA_ATT_PREFILL_WG", "MOE_CUDA_ATT_PREFILL_WG8",
    "MOE_CUDA_FP8_GSCHED", "MOE_CUDA_FP8_DGROUPED", "MOE_CUDA_ROUTE_FUSE1",
    "MOE_CUDA_ATT_EARLY", "MOE_CUDA_DENSE_PRE"
};


#ifdef MOE_HAVE_CUDA
/* kernels/quant_gemv.h (it needs the CUDA headers, which this plain C
 * test is not built with) */
int moe_cuda_q4g_supported(int G, int Ntot, int K, int silu);
int moe_cuda_q4w_supported(int G, int Ntot, int K, int silu);
int moe_cuda_q4g_rows_ok(int G, int Ntot, int K, int silu, int max_rows);
struct CUstream_st;                     /* cudaStream_t */
int moe_cuda_qgemv_q4w(const uint16_t *X, int ldx, const int32_t *xrow,
    int xdiv, const int32_t *qweight, const int32_t *qzeros,
    const uint16_t *scales, int G, int zero_bias, int Ntot, int K,
    const int32_t *offs, int E, int n, int max_rows, int shape, float *Y,
    int ldy, uint16_t *H, struct CUstream_st *stream);
const char *moe_cuda_last_error(void);


/* One call of the warpgroup launcher that must be refused before any
 * CUDA call (MOE_K_EUNSUPPORTED -6, the error naming it). */
static int
q4w_refused(const uint16_t *X, int ldx, int G, int N, int K,
    const int32_t *offs, int E, int shape, float *Y, uint16_t *H)
{
    static const int32_t  qw[4] __attribute__((aligned(16)));
    static const uint16_t sc[4] __attribute__((aligned(16)));
    int                   rc;

    rc = moe_cuda_qgemv_q4w(X, ldx, NULL, 1, qw, qw, sc, G, 0, N, K, offs, E,
                            4, 32, shape, Y, N, H, NULL);

    return rc == -6 && strstr(moe_cuda_last_error(), "qgemv_q4w") != NULL;
}


/* The backend's 4-bit decode choice (cb_q4g_ok): row hints up to 16 on
 * the GEMV by group, above on the warpgroup GEMM only with G % 128 (its
 * 64-k chunks measured no faster than the tensor-core GEMV) and N % 128
 * (fused SiLU: F % 64). */
static void
q4_choice(void)
{
    static const int hints[] = { 1, 8, 16, 17, 32, 64, 128 };
    int              all = 1;

    /* Mixtral, group 128: stacked gate|up with SiLU, down, q|k|v, o */
    for (size_t i = 0; i < sizeof(hints) / sizeof(hints[0]); i++) {
        all &= moe_cuda_q4g_rows_ok(128, 2 * 14336, 4096, 1, hints[i])
               && moe_cuda_q4g_rows_ok(128, 4096, 14336, 0, hints[i])
               && moe_cuda_q4g_rows_ok(128, 6144, 4096, 0, hints[i])
               && moe_cuda_q4g_rows_ok(128, 4096, 4096, 0, hints[i]);
    }
    TAP_OK(all, "mixtral shapes, group 128: every row hint 1..128 on the "
           "4-bit kernels by group / warpgroup");
    TAP_OK(moe_cuda_q4g_rows_ok(64, 4096, 4096, 0, 16)
           && !moe_cuda_q4g_rows_ok(64, 4096, 4096, 0, 17)
           && moe_cuda_q4w_supported(64, 4096, 4096, 0),
           "group 64: hints up to 16 by group, above not (the warpgroup "
           "kernel takes the shape but is not chosen)");
    TAP_OK(moe_cuda_q4g_rows_ok(32, 4096, 4096, 0, 8)
           && !moe_cuda_q4g_rows_ok(32, 4096, 4096, 0, 32)
           && !moe_cuda_q4w_supported(32, 4096, 4096, 0)
           && moe_cuda_q4g_supported(32, 4096, 4096, 0),
           "group 32: by group up to 16 rows; the warpgroup kernel refuses");
    TAP_OK(moe_cuda_q4g_rows_ok(128, 192, 512, 0, 8)
           && !moe_cuda_q4g_rows_ok(128, 192, 512, 0, 32)
           && !moe_cuda_q4w_supported(128, 192, 512, 0)
           && moe_cuda_q4w_supported(128, 256, 512, 0),
           "N 192 (N %% 64, not %% 128): by group only; N 256 warpgroup");
    TAP_OK(moe_cuda_q4g_rows_ok(128, 192, 512, 1, 8)
           && !moe_cuda_q4g_rows_ok(128, 192, 512, 1, 32)
           && moe_cuda_q4g_rows_ok(128, 256, 512, 1, 32),
           "fused SiLU: F 96 by group only, F 128 on the warpgroup kernel");
    TAP_OK(!moe_cuda_q4g_rows_ok(128, 4096, 4000, 0, 1)
           && !moe_cuda_q4g_rows_ok(128, 4096, 4000, 0, 32)
           && !moe_cuda_q4g_rows_ok(0, 4096, 4096, 0, 1)
           && !moe_cuda_q4g_rows_ok(128, 0, 4096, 0, 32)
           && !moe_cuda_q4g_rows_ok(16, 4096, 4096, 0, 1)
           && !moe_cuda_q4w_supported(-128, 4096, 4096, 0),
           "refused: K %% G, G 0, N 0, G 16, G < 0");
    {
        static uint16_t X[64] __attribute__((aligned(16)));
        static float    Y[64];
        static uint16_t H[64];
        static int32_t  offs[3];

        TAP_OK(q4w_refused(X, 8, 32, 256, 512, NULL, 1, 0, Y, NULL)
               && q4w_refused(X, 8, 128, 192, 512, NULL, 1, 0, Y, NULL)
               && q4w_refused(X, 8, 128, 192, 512, NULL, 1, 0, NULL, H)
               && q4w_refused(X, 8, 128, 256, 512, NULL, 1, 9, Y, NULL)
               && q4w_refused(X, 8, 128, 128, 512, NULL, 1, 8, Y, NULL)
               && q4w_refused(X, 12, 128, 256, 512, NULL, 1, 0, Y, NULL)
               && q4w_refused(X + 1, 8, 128, 256, 512, NULL, 1, 0, Y, NULL)
               && q4w_refused(X, 8, 128, 256, 512, offs, 0, 0, Y, NULL)
               && q4w_refused(X, 8, 128, 256, 512, NULL, 2, 0, Y, NULL)
               && q4w_refused(X, 8, 128, 256, 512, NULL, 1, 0, NULL, NULL),
               "moe_cuda_qgemv_q4w refuses (before any CUDA call) group 32, "
               "N 192, F 96, shape 9, shape 8 with N 128, ldx 12, X off 16 "
               "bytes, E 0, offs NULL with E 2, no output");
        /* shape 8 runs 128-k chunks: a group of 64 (taken by shapes 1 / 3)
         * must be refused there, as its pick never chooses it */
        TAP_OK(q4w_refused(X, 8, 64, 256, 512, NULL, 1, 8, Y, NULL)
               && q4w_refused(X, 8, 64, 256, 512, NULL, 1, 8, NULL, H),
               "moe_cuda_qgemv_q4w refuses shape 8 with group 64 (128-k "
               "chunks), fp32 out and SiLU fused");
        TAP_OK(moe_cuda_qgemv_q4w(X, 8, NULL, 1, NULL, NULL, NULL, 128, 0,
                                  256, 512, NULL, 1, 0, 32, 0, Y, 256, NULL,
                                  NULL) == 0,
               "moe_cuda_qgemv_q4w with no rows: a no-op");
    }
}
#endif


static void
clear_env(void)
{
    for (size_t i = 0; i < sizeof(vars) / sizeof(vars[0]); i++) {
        unsetenv(vars[i]);
    }
}


/* One bad value of var: refused, err names it, *t back to the defaults. */
static void
refused(const char *var, const char *val)
{
    moe_cuda_tuning_t t;
    char              err[256] = "";
    int               rc;

    clear_env();
    setenv(var, val, 1);
    rc = moe_cuda_tuning_read(&t, 8, 0, err, sizeof(err));
    TAP_OK(rc == MOE_EINVAL && strstr(err, var) != NULL
           && strstr(err, val) != NULL && t.graphs == 1
           && t.att_split_bps == 2,
           "%s=\"%s\" refused (rc %d: %s)", var, val, rc, err);
    unsetenv(var);
}


int
main(void)
{
    moe_cuda_tuning_t t;
    char              err[256] = "", line[512];
    int               rc;

    clear_env();
    rc = moe_cuda_tuning_read(&t, 8, 0, err, sizeof(err));
    TAP_OK(rc == MOE_OK && t.graphs == 1 && t.sample_tokens == 1
           && t.gemv_max_t == 32 && t.dense_gemv_t == 16
           && t.ggemm_max_t == 64 && t.gemv_fma_rows == 2
           && t.att_split_bps == 2 && t.att_decode_tc == 1 && t.pdl == 1
           && t.fuse_unpermute == 1 && t.fold_scales == 1
           && t.fp8_grouped == 1 && t.q4_layout == 1 && t.q4_gemv == 1
           && t.fp8_gemv == 1 && t.fp8_ggemm == 1 && t.att_prefill_wg == 1
           && t.att_prefill_wg8 == 1 && t.fp8_gsched == 1
           && t.fp8_dgrouped == 1 && t.att_long_ctx == 4096
           && t.att_long_bps == 2 && t.route_fuse1 == 0
           && t.att_early == 1 && t.dense_pre == 0,
           "defaults with no MOE_CUDA_* set (8 experts)");
    rc = moe_cuda_tuning_read(&t, 8, MOE_CUDA_EXPERTS_4BIT, err,
                              sizeof(err));
    TAP_OK(rc == MOE_OK && t.route_fuse1 == 2 && t.gemv_max_t == 32
           && t.dense_pre == 1,
           "4-bit experts: route_fuse1 2 (the lean one-launch router), "
           "gemv_max_t 32, dense_pre 1 (%d, %d, %d)", t.route_fuse1,
           t.gemv_max_t, t.dense_pre);
    rc = moe_cuda_tuning_read(&t, 8, MOE_CUDA_EXPERTS_E4M3, err,
                              sizeof(err));
    TAP_OK(rc == MOE_OK && t.route_fuse1 == 0 && t.dense_pre == 0,
           "e4m3 experts: route_fuse1 0, dense_pre 0 (%d, %d)",
           t.route_fuse1, t.dense_pre);
    setenv("MOE_CUDA_ROUTE_FUSE1", "0", 1);
    setenv("MOE_CUDA_DENSE_PRE", "0", 1);
    rc = moe_cuda_tuning_read(&t, 8, MOE_CUDA_EXPERTS_4BIT, err,
                              sizeof(err));
    TAP_OK(rc == MOE_OK && t.route_fuse1 == 0 && t.dense_pre == 0,
           "4-bit experts: an explicit route_fuse1 0 and dense_pre 0 are "
           "kept (%d, %d)", t.route_fuse1, t.dense_pre);
    unsetenv("MOE_CUDA_ROUTE_FUSE1");
    unsetenv("MOE_CUDA_DENSE_PRE");
    rc = moe_cuda_tuning_read(&t, 1, 0, err, sizeof(err));
    TAP_OK(rc == MOE_OK && t.gemv_max_t == 128, "dense model: gemv_max_t "
           "128 (%d)", t.gemv_max_t);
    rc = moe_cuda_tuning_read(&t, 64, 0, err, sizeof(err));
    TAP_OK(rc == MOE_OK && t.gemv_max_t == 256, "64 experts: gemv_max_t 256 "
           "(%d)", t.gemv_max_t);
    rc = moe_cuda_tuning_read(&t, 16, 0, err, sizeof(err));
    TAP_OK(rc == MOE_OK && t.gemv_max_t == 32, "16 experts: gemv_max_t 32 "
           "(%d)", t.gemv_max_t);
    rc = moe_cuda_tuning_read(&t, 8, 1, err, sizeof(err));
    TAP_OK(rc == MOE_OK && t.gemv_max_t == 16, "8 e4m3 experts: gemv_max_t "
           "16 (%d)", t.gemv_max_t);
    rc = moe_cuda_tuning_read(&t, 64, 1, err, sizeof(err));
    TAP_OK(rc == MOE_OK && t.gemv_max_t == 256, "64 e4m3 experts: gemv_max_t "
           "256 (%d)", t.gemv_max_t);
    setenv("MOE_CUDA_FP8_GGEMM", "0", 1);
    rc = moe_cuda_tuning_read(&t, 8, 1, err, sizeof(err));
    TAP_OK(rc == MOE_OK && t.gemv_max_t == 32, "8 e4m3 experts with "
           "MOE_CUDA_FP8_GGEMM 0: gemv_max_t 32 (%d)", t.gemv_max_t);
    setenv("MOE_CUDA_GEMV_MAX_T", "24", 1);
    unsetenv("MOE_CUDA_FP8_GGEMM");
    rc = moe_cuda_tuning_read(&t, 8, 1, err, sizeof(err));
    TAP_OK(rc == MOE_OK && t.gemv_max_t == 24, "8 e4m3 experts: an explicit "
           "gemv_max_t is kept (%d)", t.gemv_max_t);
    unsetenv("MOE_CUDA_GEMV_MAX_T");

    setenv("MOE_CUDA_GRAPHS", "0", 1);
    setenv("MOE_CUDA_SAMPLE_TOKENS", "0", 1);
    setenv("MOE_CUDA_GEMV_MAX_T", "0", 1);
    setenv("MOE_CUDA_DENSE_GEMV_T", "7", 1);
    setenv("MOE_CUDA_GGEMM_MAX_T", "100000", 1);
    setenv("MOE_CUDA_GEMV_FMA", "4", 1);
    setenv("MOE_CUDA_ATT_BPS", " 3", 1);
    setenv("MOE_CUDA_ATT_LONG_CTX", "8192", 1);
    setenv("MOE_CUDA_ATT_LONG_BPS", "5", 1);
    setenv("MOE_CUDA_ATT_DECODE_TC", "0", 1);
    setenv("MOE_CUDA_PDL", "0", 1);
    setenv("MOE_CUDA_FUSE_UNPERMUTE", "0", 1);
    setenv("MOE_CUDA_FOLD_SCALES", "0", 1);
    setenv("MOE_CUDA_FP8_GROUPED", "0", 1);
    setenv("MOE_CUDA_Q4_LAYOUT", "3", 1);
    setenv("MOE_CUDA_Q4_GEMV", "0", 1);
    setenv("MOE_CUDA_FP8_GEMV", "0", 1);
    setenv("MOE_CUDA_FP8_GGEMM", "0", 1);
    setenv("MOE_CUDA_ATT_PREFILL_WG", "0", 1);
    setenv("MOE_CUDA_ATT_PREFILL_WG8", "0", 1);
    setenv("MOE_CUDA_FP8_GSCHED", "0", 1);
    setenv("MOE_CUDA_FP8_DGROUPED", "0", 1);
    setenv("MOE_CUDA_ROUTE_FUSE1", "2", 1);
    setenv("MOE_CUDA_ATT_EARLY", "0", 1);
    setenv("MOE_CUDA_DENSE_PRE", "1", 1);
    rc = moe_cuda_tuning_read(&t, 8, 0, err, sizeof(err));
    TAP_OK(rc == MOE_OK && t.graphs == 0 && t.sample_tokens == 0
           && t.gemv_max_t == 0 && t.dense_gemv_t == 7
           && t.ggemm_max_t == 100000 && t.gemv_fma_rows == 4
           && t.att_split_bps == 3 && t.att_long_ctx == 8192
           && t.att_long_bps == 5 && t.att_decode_tc == 0 && t.pdl == 0
           && t.fuse_unpermute == 0 && t.fold_scales == 0
           && t.fp8_grouped == 0 && t.q4_layout == 3 && t.q4_gemv == 0
           && t.fp8_gemv == 0 && t.fp8_ggemm == 0 && t.att_prefill_wg == 0
           && t.att_prefill_wg8 == 0 && t.fp8_gsched == 0
           && t.fp8_dgrouped == 0 && t.route_fuse1 == 2
           && t.att_early == 0 && t.dense_pre == 1,
           "every override applied (an explicit gemv_max_t 0 is kept)");
    moe_cuda_tuning_format(&t, line, sizeof(line));
    TAP_OK(strcmp(line, "graphs=0 sample_tokens=0 gemv_max_t=0 "
                  "dense_gemv_t=7 ggemm_max_t=100000 gemv_fma_rows=4 "
                  "att_split_bps=3 att_long_ctx=8192 att_long_bps=5 "
                  "att_decode_tc=0 pdl=0 fuse_unpermute=0 "
                  "fold_scales=0 fp8_grouped=0 q4_layout=3 "
                  "q4_gemv=0 fp8_gemv=0 fp8_ggemm=0 "
                  "att_prefill_wg=0 att_prefill_wg8=0 fp8_gsched=0 "
                  "fp8_dgrouped=0 route_fuse1=2 att_early=0 "
                  "dense_pre=1") == 0,
           "the log line: %s", line);
    clear_env();
    setenv("MOE_CUDA_GRAPHS", "", 1);
    rc = moe_cuda_tuning_read(&t, 8, 0, err, sizeof(err));
    TAP_OK(rc == MOE_OK && t.graphs == 1, "an empty variable is unset");

    refused("MOE_CUDA_GRAPHS", "yes");
    refused("MOE_CUDA_GRAPHS", "2");
    refused("MOE_CUDA_SAMPLE_TOKENS", "-1");
    refused("MOE_CUDA_GEMV_MAX_T", "32x");
    refused("MOE_CUDA_GEMV_MAX_T", "-1");
    refused("MOE_CUDA_DENSE_GEMV_T", "99999999999");
    refused("MOE_CUDA_GGEMM_MAX_T", "1e3");
    refused("MOE_CUDA_GEMV_FMA", "5");
    refused("MOE_CUDA_FUSE_UNPERMUTE", "2");
    refused("MOE_CUDA_FOLD_SCALES", "-1");
    refused("MOE_CUDA_FP8_GROUPED", "3");
    refused("MOE_CUDA_Q4_LAYOUT", "4");
    refused("MOE_CUDA_Q4_GEMV", "2");
    refused("MOE_CUDA_FP8_GEMV", "2");
    refused("MOE_CUDA_FP8_GGEMM", "-1");
    refused("MOE_CUDA_ATT_PREFILL_WG", "2");
    refused("MOE_CUDA_ATT_PREFILL_WG8", "-1");
    refused("MOE_CUDA_FP8_GSCHED", "3");
    refused("MOE_CUDA_FP8_DGROUPED", "2");
    refused("MOE_CUDA_ROUTE_FUSE1", "3");
    refused("MOE_CUDA_ATT_EARLY", "2");
    refused("MOE_CUDA_DENSE_PRE", "2");
    refused("MOE_CUDA_ATT_BPS", "0");
    refused("MOE_CUDA_ATT_BPS", "65");
    refused("MOE_CUDA_ATT_LONG_CTX", "-1");
    refused("MOE_CUDA_ATT_LONG_BPS", "0");
    refused("MOE_CUDA_ATT_DECODE_TC", "2");
    refused("MOE_CUDA_PDL", "on");
    clear_env();
#ifdef MOE_HAVE_CUDA
    q4_choice();
#endif
    TAP_PLAN(tap_n);
    return TAP_DONE();
}
