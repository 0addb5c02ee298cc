/*
 * The CUDA tuning record: defaults + MOE_CUDA_* overrides, read once per
 * backend (see cuda_tuning.h and kernels/TUNING.md).
 */

#include <errno.h>
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>

#include "moe.h"
#include "backends/cuda_tuning.h"

/* One knob: its variable, where it goes, its accepted range. */
typedef struct {
    const char *env;
    size_t      off;
    int         lo, hi;
} cuda_knob_t;

#define CT_FIELD(f)  offsetof(moe_cuda_tuning_t, f)
#define CT_T_MAX     (1 << 20)          /* token thresholds: "any T" */

static const cuda_knob_t ct_knobs[] = {
    { "MOE_CUDA_GRAPHS",        CT_FIELD(graphs),        0, 1 },
    { "MOE_CUDA_SAMPLE_TOKENS", CT_FIELD(sample_tokens), 0, 1 },
    { "MOE_CUDA_GEMV_MAX_T",    CT_FIELD(gemv_max_t),    0, CT_T_MAX },
    { "MOE_CUDA_DENSE_GEMV_T",  CT_FIELD(dense_gemv_t),  0, CT_T_MAX },
    { "MOE_CUDA_GGEMM_MAX_T",   CT_FIELD(ggemm_max_t),   0, CT_T_MAX },
    { "MOE_CUDA_GEMV_FMA",      CT_FIELD(gemv_fma_rows), 0, 4 },
    { "MOE_CUDA_ATT_BPS",       CT_FIELD(att_split_bps), 1, 64 },
    { "MOE_CUDA_ATT_LONG_CTX",  CT_FIELD(att_long_ctx),  0, CT_T_MAX },
    { "MOE_CUDA_ATT_LONG_BPS",  CT_FIELD(att_long_bps),  1, 64 },
    { "MOE_CUDA_ATT_DECODE_TC", CT_FIELD(att_decode_tc), 0, 1 },
    { "MOE_CUDA_PDL",           CT_FIELD(pdl),           0, 1 },
    { "MOE_CUDA_FUSE_UNPERMUTE", CT_FIELD(fuse_unpermute), 0, 1 },
    { "MOE_CUDA_FOLD_SCALES",   CT_FIELD(fold_scales),   0, 1 },
    { "MOE_CUDA_FP8_GROUPED",   CT_FIELD(fp8_grouped),   0, 2 },
    { "MOE_CUDA_Q4_LAYOUT",     CT_FIELD(q4_layout),     0, 3 },
    { "MOE_CUDA_Q4_GEMV",       CT_FIELD(q4_gemv),       0, 1 },
    { "MOE_CUDA_FP8_GEMV",      CT_FIELD(fp8_gemv),      0, 1 },
    { "MOE_CUDA_FP8_GGEMM",     CT_FIELD(fp8_ggemm),     0, 1 },
    { "MOE_CUDA_ATT_PREFILL_WG", CT_FIELD(att_prefill_wg), 0, 1 },
    { "MOE_CUDA_ATT_PREFILL_WG8", CT_FIELD(att_prefill_wg8), 0, 1 },
    { "MOE_CUDA_FP8_GSCHED",    CT_FIELD(fp8_gsched),    0, 2 },
    { "MOE_CUDA_FP8_DGROUPED",  CT_FIELD(fp8_dgrouped),  0, 1 },
    { "MOE_CUDA_ROUTE_FUSE1",   CT_FIELD(route_fuse1),   0, 2 },
    { "MOE_CUDA_ATT_EARLY",     CT_FIELD(att_early),     0, 1 },
    { "MOE_CUDA_DENSE_PRE",     CT_FIELD(dense_pre),     0, 1 },
};


/* v as a whole number in [lo, hi] into *out; 0 if it is not one. */
static int
ct_parse(const char *v, int lo, int hi, int *out)
{
    char *end;
    long  x;

    errno = 0;
    x = strtol(v, &end, 10);
    while (*end == ' ' || *end == '\t') {
        end++;
    }
    if (errno != 0 || end == v || *end != '\0' || x < lo || x > hi) {
        return 0;
    }
    *out = (int) x;
    return 1;
}


int
moe_cuda_tuning_read(moe_cuda_tuning_t *t, int n_experts, int expert_fmt,
    char *err, size_t errlen)
{
    static const moe_cuda_tuning_t defaults = MOE_CUDA_TUNING_DEFAULTS;
    moe_cuda_tuning_t              r = defaults;
    size_t                         i;

    *t = defaults;
    for (i = 0; i < sizeof(ct_knobs) / sizeof(ct_knobs[0]); i++) {
        const cuda_knob_t *k = &ct_knobs[i];
        const char        *v = getenv(k->env);

        if (v == NULL || *v == '\0') {
            continue;
        }
        if (!ct_parse(v, k->lo, k->hi, (int *) ((char *) &r + k->off))) {
            moe_errf(err, errlen, "cuda backend: %s=\"%s\": expected a "
                     "whole number in [%d, %d] (see kernels/TUNING.md)",
                     k->env, v, k->lo, k->hi);
            return MOE_EINVAL;
        }
    }
    if (r.gemv_max_t == MOE_CUDA_TUNING_AUTO) {
        /* GEMV vs per-expert cuBLAS crossover (run 2 vs run 1): mixtral
         * (E 8) b64 experts 33.8 ms GEMV vs 25.4 ms cuBLAS, b32 GEMV 27.5;
         * olmoe (E 64) b256 cuBLAS 19.0 ms (128 launches + sync per
         * layer) vs GEMV b128 5.0 ms: many experts keep the GEMV longer */
        r.gemv_max_t = n_experts <= 1 ? 128 : n_experts > 16 ? 256 : 32;
        if (expert_fmt == MOE_CUDA_EXPERTS_E4M3 && r.fp8_ggemm
            && n_experts > 1 && n_experts <= 16)
        {
            /* e4m3 experts: the grouped GEMM on f16 fragments beats the
             * GEMV's 16-row passes from 16 tokens on (H200, 2026-12-04
             * run 14d, mixtral fp8 batch 32: 1602.5 tok/s at 32, 2067.8
             * at 16) */
            r.gemv_max_t = 16;
        }
    }
    if (r.route_fuse1 == MOE_CUDA_TUNING_AUTO) {
        /* a one-token step's norm + router in one launch: the lean kernel
         * where the 4-bit GEMV before it leaves room on the SMs (H100,
         * runs 22c / 22d, GPTQ batch 1 +1.4 %); fp8's o projection does
         * not, and the launch lost there (-1.7 %) */
        r.route_fuse1 = expert_fmt == MOE_CUDA_EXPERTS_4BIT ? 2 : 0;
    }
    if (r.dense_pre == MOE_CUDA_TUNING_AUTO) {
        /* the dense GEMVs' first weights before the PDL wait: the 4-bit
         * ones gain (H100, run 23b, batch 1: GPTQ +1.2 %, AWQ +1.6 %),
         * the fp8 ones lose (-0.8 %: their PRE blocks of 4 warps are
         * slower alone than the 8-warp ones, and twice the bytes) */
        r.dense_pre = expert_fmt == MOE_CUDA_EXPERTS_4BIT;
    }
    *t = r;
    return MOE_OK;
}


int
moe_cuda_tuning_format(const moe_cuda_tuning_t *t, char *buf, size_t len)
{
    return snprintf(buf, len, "graphs=%d sample_tokens=%d gemv_max_t=%d "
                    "dense_gemv_t=%d ggemm_max_t=%d gemv_fma_rows=%d "
                    "att_split_bps=%d att_long_ctx=%d att_long_bps=%d "
                    "att_decode_tc=%d pdl=%d fuse_unpermute=%d "
                    "fold_scales=%d fp8_grouped=%d q4_layout=%d "
                    "q4_gemv=%d fp8_gemv=%d fp8_ggemm=%d att_prefill_wg=%d "
                    "att_prefill_wg8=%d fp8_gsched=%d fp8_dgrouped=%d "
                    "route_fuse1=%d att_early=%d dense_pre=%d",
                    t->graphs, t->sample_tokens, t->gemv_max_t,
                    t->dense_gemv_t, t->ggemm_max_t, t->gemv_fma_rows,
                    t->att_split_bps, t->att_long_ctx, t->att_long_bps,
                    t->att_decode_tc, t->pdl, t->fuse_unpermute,
                    t->fold_scales, t->fp8_grouped, t->q4_layout,
                    t->q4_gemv, t->fp8_gemv, t->fp8_ggemm,
                    t->att_prefill_wg, t->att_prefill_wg8, t->fp8_gsched,
                    t->fp8_dgrouped, t->route_fuse1, t->att_early,
                    t->dense_pre);
}
