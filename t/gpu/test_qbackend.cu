/*
 * Quantized checkpoints on the CUDA backend (weights packed on the device,
 * engine/backends/qweights.h) against the CPU backend (exact fp32
 * dequantization, engine/model/quant.c) on every tiny quantized model of
 * tools/quant_models.sh ($MOE_QUANT_DIR, default build/quant, list in
 * MODELS: fp8 per tensor / per channel / 128x128 and 32x16 blocks
 * (the latter dequantized to bf16 at upload), compressed-tensors, AWQ and
 * GPTQ with groups 32 / 64 / 128, act-order g_idx, ignored modules).
 *
 * Per model and variant, one sequence of random tokens runs on both
 * backends step by step: a 40-token prefill (above gemv_max_t and
 * dense_gemv_t: packed parts dequantized into the bf16 scratch for the
 * grouped / cuBLAS GEMMs), an 8-token chunk (dense GEMV path for the
 * quantized dense projections, expert GEMV), then 6 decode steps (the
 * quantized GEMVs, CUDA graphs), fed with the CPU's greedy tokens; each
 * step's last-token logits are compared.  MoE routing: the CUDA step's
 * experts are forced on the CPU step (as test_backend: router near-ties
 * in random tiny models would otherwise flip under bf16).  Variants:
 *   tp 1; tp 1 with MOE_CUDA_GGEMM_MAX_T=0 (the per-expert cuBLAS path
 *   after the host sync); tp 2 (two ranks on this GPU) for fp8-tensor,
 *   ct-fp8-channel, awq-g32 and gptq-g32-sym, tp 2 expert parallel for
 *   awq-g32; fp8 activations on the cuBLAS expert path with tp 1 and tp 2
 *   expert parallel for fp8-tensor and ct-fp8-channel.  With fp8
 *   activations, tp 1 and the cuBLAS expert path the prefill's routed
 *   layers must run as the fused fp8 FFN
 *   (moe_cuda_backend_fp8_ffn_layers); the expert-parallel ranks' scratch
 *   is too small for it in these tiny models (they take the per-part
 *   fp8 GEMMs).  ct-fp8-256 (experts sized for the grouped fp8 GEMM,
 *   kernels/fp8_grouped.h): the fused FFN with MOE_CUDA_FP8_GROUPED 1
 *   (every fused layer on the grouped GEMM, no host sync, the SwiGLU
 *   pass), 2 (SwiGLU in the gate|up epilogue) and 0
 *   (per-expert cuBLASLt, none), tp 1 and tp 2 expert parallel.
 *   awq-g64, awq-g128 and gptq-g128-asym (shapes the tiled 4-bit layout
 *   takes, kernels/q4_tiled.cu) with MOE_CUDA_Q4_LAYOUT 3, 2 (tiled:
 *   the backend must have launched 4-bit GEMVs on tiled weights,
 *   moe_cuda_backend_q4_tiled_calls), 1 (the default: AWQ repacked into
 *   GPTQ's layout; every other AWQ run above takes it too) and 0 (the
 *   checkpoints' layouts), GEMV and cuBLAS expert paths; with layout 1
 *   the 4-bit GEMVs of the decode steps and the 8-token chunk must run
 *   by quantization group (kernels/q4_group.cu,
 *   moe_cuda_backend_q4g_calls > 0; none on tiled weights), and once
 *   more with MOE_CUDA_Q4_GEMV 0 (the tensor-core GEMV: none by group).
 *   gptq-g128-256 (dim 256, group 128: shapes the warpgroup kernel of
 *   kernels/q4_wgmma.cu takes): its 40-token prefill must run 4-bit
 *   launches on that kernel (moe_cuda_backend_q4w_calls > 0), none with
 *   MOE_CUDA_Q4_GEMV 0.
 *   fp8-tensor-kv (per-layer KV cache scales in the checkpoint): both
 *   backends with the fp8 KV cache at the checkpoint's scales (the CPU's
 *   moe_cpu_backend_set_kv_fp8, the GPU's moe_cuda_backend_create_kv; tp
 *   2 through moe_backend_create_ranks), held to KV_FP8_TOL.
 * Checks: relative L2 error of the logits <= 2e-2 at every step (bf16
 * activations, and the dequantized scratch rounds weights to bf16: the
 * bound test_backend uses for bf16 weights); greedy equal wherever the
 * CPU's top-1 beats its top-2 by more than max(0.05, 6 sigma) (sigma:
 * the row's RMS difference).  TAP; skips without a device or models.
 * Run from the repository root: build/gpu/test_qbackend (after
 * tools/quant_models.sh build/quant).
 */

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "gpu_util.h"

extern "C" {
#include "backends/backend.h"
#include "model/model.h"
#include "tap.h"
}
#include "backends/cuda_backend.h"

#define REL_TOL   2e-2
/* fp8 prefill on the fp8 tensor cores quantizes activations per token to
 * e4m3 (3 mantissa bits: up to 2^-4 relative per element, as vLLM's
 * dynamic fp8), which the CPU reference does not: first H200 run of the
 * tiny per-channel fp8 models 5.0e-2 .. 6.5e-2; the variant checks that
 * path at 1e-1 (and its greedy tokens), every other variant runs with
 * MOE_CUDA_FP8_ACT=0 (fp8 parts dequantized for prefill) at REL_TOL */
#define ACT_TOL   1e-1
/* both KV caches e4m3 (test_backend's KV_FP8_TOL: a value the two sides
 * compute a bf16 step apart can round to neighbouring e4m3 values) */
#define KV_FP8_TOL 1e-1
#define BS        4
#define N_BLOCKS  32
#define PROMPT    40
#define CHUNK     8
#define N_DEC     6


static int
argmax_m(const float *v, int n, float *margin)
{
    int   b = 0;
    float second = -INFINITY;

    for (int i = 1; i < n; i++) {
        if (v[i] > v[b]) {
            b = i;
        }
    }
    for (int i = 0; i < n; i++) {
        if (i != b && v[i] > second) {
            second = v[i];
        }
    }
    *margin = v[b] - second;
    return b;
}


/* variant: tp ranks (1: one backend), ep, blas: force the cuBLAS path */
static void
run_variant_tol(const char *name, moe_model_t *m, int tp, int ep, int blas,
    int act, double tol);

static void
run_variant(const char *name, moe_model_t *m, int tp, int ep, int blas)
{
    run_variant_tol(name, m, tp, ep, blas, 0, REL_TOL);
}

/* MOE_CUDA_FP8_GROUPED for the next variants (-1: left unset) */
static int g_grouped = -1;
/* MOE_CUDA_Q4_LAYOUT for the next variants (-1: left unset) */
static int g_q4t = -1;
/* MOE_CUDA_Q4_GEMV for the next variants (-1: left unset) */
static int g_q4g = -1;
static int g_q4w = -1;      /* expect warpgroup launches (1) or none (0) */
/* 1: both backends with the fp8 KV cache at the checkpoint's scales */
static int g_kvfp8;

static void
run_variant_tol(const char *name, moe_model_t *m, int tp, int ep, int blas,
    int act, double tol)
{
    const moe_hparams_t *hp = moe_model_hparams(m);
    moe_backend_t       *gb = NULL, *cb = NULL, *g0;
    moe_ranks_t          gp;
    char                 err[512], what[128];
    int32_t              toks[PROMPT + CHUNK + N_DEC + 1], bt[N_BLOCKS];
    int32_t             *route = NULL;
    float               *gl, *cl;
    int                  V = hp->vocab_size, pos = 0, step = 0, ok = 1;
    int                  greedy_ok = 1, n_greedy = 0, rc;
    double               worst = 0;

    snprintf(what, sizeof(what), "%s%s%s%s", name,
             tp > 1 ? " tp 2" : "", ep ? " ep" : "",
             blas ? " (cuBLAS expert path)" : "");
    if (act) {
        strncat(what, " (fp8 activations)", sizeof(what) - strlen(what) - 1);
    }
    if (g_grouped >= 0) {
        strncat(what, g_grouped == 2 ? " grouped fp8 GEMM, SwiGLU epilogue"
                      : g_grouped ? " grouped fp8 GEMM, SwiGLU pass"
                                  : " per-expert cuBLASLt",
                sizeof(what) - strlen(what) - 1);
        setenv("MOE_CUDA_FP8_GROUPED", g_grouped ? "1" : "0", 1);
    }
    if (g_q4t >= 0) {
        char v[16];

        strncat(what, g_q4t == 3 ? " tiled 4-bit, SiLU pass"
                      : g_q4t == 2 ? " tiled 4-bit, SiLU fused"
                      : g_q4t == 1 ? " AWQ in GPTQ's layout"
                                   : " checkpoint 4-bit layout",
                sizeof(what) - strlen(what) - 1);
        snprintf(v, sizeof(v), "%d", g_q4t);
        setenv("MOE_CUDA_Q4_LAYOUT", v, 1);
    }
    if (g_q4g >= 0) {
        strncat(what, g_q4g ? ", 4-bit GEMV by group"
                            : ", 4-bit tensor-core GEMV",
                sizeof(what) - strlen(what) - 1);
        setenv("MOE_CUDA_Q4_GEMV", g_q4g ? "1" : "0", 1);
    }
    setenv("MOE_CUDA_FP8_ACT", act ? "1" : "0", 1);
    if (blas) {
        setenv("MOE_CUDA_GGEMM_MAX_T", "0", 1);
    }
    memset(&gp, 0, sizeof(gp));
    if (g_kvfp8) {
        strncat(what, ", fp8 KV cache at the checkpoint's scales",
                sizeof(what) - strlen(what) - 1);
        gp.kv_fp8 = moe_model_kv_scales(m, gp.kv_ks, gp.kv_vs, err,
                                        sizeof(err)) == 1;
        if (!gp.kv_fp8) {
            TAP_OK(0, "%s: the checkpoint has no KV cache scales", what);
            return;
        }
    }
    rc = moe_cpu_backend_create(m, N_BLOCKS, BS, 1, &cb, err, sizeof(err));
    if (rc == MOE_OK && g_kvfp8) {
        rc = moe_cpu_backend_set_kv_fp8(cb, gp.kv_ks, gp.kv_vs, err,
                                        sizeof(err));
    }
    if (rc == MOE_OK) {
        if (tp > 1) {
            gp.kind = MOE_BACKEND_CUDA;
            gp.tp = tp;
            gp.ep = ep;
            gp.n_blocks = N_BLOCKS;
            gp.block_size = BS;
            gp.max_batched_tokens = 64;
            rc = moe_backend_create_ranks(m, &gp, &gb, err, sizeof(err));
        } else {
            moe_cuda_kv_t kv = { gp.kv_fp8, gp.kv_ks, gp.kv_vs };

            rc = moe_cuda_backend_create_kv(m, NULL, 0, 0, 1, 0, 0, N_BLOCKS,
                                            BS, 64, 0, &kv, &gb, err,
                                            sizeof(err));
        }
    }
    unsetenv("MOE_CUDA_GGEMM_MAX_T");
    unsetenv("MOE_CUDA_FP8_GROUPED");
    unsetenv("MOE_CUDA_Q4_LAYOUT");
    unsetenv("MOE_CUDA_Q4_GEMV");
    TAP_OK(rc == MOE_OK, "%s: backends created (%s)", what,
           rc == MOE_OK ? "ok" : err);
    if (rc != MOE_OK) {
        if (cb != NULL) {
            cb->destroy(cb);
        }
        return;
    }
    g0 = tp > 1 ? moe_tp_backend_rank(gb, 0) : gb;
    gl = (float *) malloc(sizeof(float) * (size_t) V);
    cl = (float *) malloc(sizeof(float) * (size_t) V);
    route = (int32_t *) malloc(sizeof(int32_t) * (size_t) PROMPT
                               * hp->n_layers * hp->top_k);
    for (int i = 0; i < N_BLOCKS; i++) {
        bt[i] = (i * 7 + 3) % N_BLOCKS;
    }
    for (int i = 0; i < PROMPT + CHUNK; i++) {
        toks[i] = (int32_t) (gu_rand() % (uint32_t) V);
    }

    while (ok && step < 2 + N_DEC) {
        moe_seq_batch_t sb;
        int             T = step == 0 ? PROMPT : step == 1 ? CHUNK : 1;
        float           marg, gmarg, sig = 0;
        int             gt, ct;
        double          e;

        memset(&sb, 0, sizeof(sb));
        sb.tokens = toks + pos;
        sb.n_tokens = T;
        sb.pos = pos;
        sb.block_table = bt;
        sb.n_blocks = N_BLOCKS;
        sb.logits = gl;
        if (gb->forward(gb, &sb, 1) != MOE_OK) {
            TAP_DIAG("%s: cuda step %d: %s", what, step,
                     moe_cuda_last_error());
            ok = 0;
            break;
        }
        if (hp->n_experts > 1) {
            if (moe_cuda_backend_last_routing(g0, route, T) != MOE_OK
                || moe_cpu_backend_force_routing(cb, route, T) != MOE_OK)
            {
                TAP_DIAG("%s: step %d: routing not forced", what, step);
                ok = 0;
                break;
            }
        }
        sb.logits = cl;
        if (cb->forward(cb, &sb, 1) != MOE_OK) {
            TAP_DIAG("%s: cpu step %d", what, step);
            ok = 0;
            break;
        }
        e = gu_relerr(gl, cl, (size_t) V);
        if (!(e <= worst)) {
            worst = e;
        }
        for (int j = 0; j < V; j++) {
            sig += (gl[j] - cl[j]) * (gl[j] - cl[j]);
        }
        sig = sqrtf(sig / (float) V);
        ct = argmax_m(cl, V, &marg);
        gt = argmax_m(gl, V, &gmarg);
        if (marg > fmaxf(0.05f, 6.0f * sig)) {
            n_greedy++;
            if (gt != ct) {
                TAP_DIAG("%s: step %d: cuda greedy %d, cpu %d (margin %.3f, "
                         "sigma %.4f)", what, step, gt, ct, marg, sig);
                greedy_ok = 0;
            }
        }
        pos += T;
        if (step >= 1) {
            toks[pos] = ct;         /* teacher forcing: the cpu's token */
        }
        step++;
    }
    TAP_OK(ok && worst <= tol, "%s: %d steps (prefill %d, chunk %d, "
           "decode), logits rel err max %.2e (<= %.0e)", what, step, PROMPT,
           CHUNK, worst, tol);
    TAP_OK(ok && greedy_ok, "%s: greedy equal on the %d clear steps", what,
           n_greedy);
    if (g_q4t >= 0 && tp == 1) {
        /* the knob chose the 4-bit layout: GEMV launches on tiled
         * weights in every step's layers, or none */
        int64_t nq = moe_cuda_backend_q4_tiled_calls(g0);

        TAP_OK(g_q4t >= 2 ? nq > 0 : nq == 0, "%s: %lld 4-bit GEMV "
               "launches on tiled weights", what, (long long) nq);
    }
    if (tp == 1 && (g_q4t == 1 || g_q4t >= 2)) {
        /* GPTQ's layout: the decode GEMVs by quantization group unless
         * the knob says no; tiled weights never */
        int64_t ng = moe_cuda_backend_q4g_calls(g0);
        int     want = g_q4t == 1 && g_q4g != 0;

        TAP_OK(want ? ng > 0 : ng == 0, "%s: %lld 4-bit GEMV launches by "
               "quantization group (%s)", what, (long long) ng,
               want ? "some expected" : "none expected");
    }
    if (tp == 1 && g_q4w >= 0) {
        /* dim 256, group 128: the 40-token prefill (grouped path, row
         * hints of 40) on the warpgroup kernel unless the knob says no */
        int64_t nw = moe_cuda_backend_q4w_calls(g0);

        TAP_OK(g_q4w ? nw > 0 : nw == 0, "%s: %lld 4-bit launches on the "
               "warpgroup kernel (%s)", what, (long long) nw,
               g_q4w ? "some expected" : "none expected");
    }
    if (act && blas && tp == 1) {
        /* the fused fp8 FFN (cb_fp8_ffn) took the routed layers of the
         * 40-token prefill (the 8-token chunk and the decode steps are
         * GEMV steps, unless MOE_CUDA_GEMV_MAX_T puts them below it:
         * then, with fp8_dgrouped, they take the fused FFN too and each
         * such step, or its graph's capture, counts its layers again) */
        int64_t     n = moe_cuda_backend_fp8_ffn_layers(g0);
        int64_t     ng = moe_cuda_backend_fp8_grouped_layers(g0);
        const char *gmt = getenv("MOE_CUDA_GEMV_MAX_T");
        int         more = gmt != NULL && *gmt != '\0';

        TAP_OK(n > 0 && (more || n <= hp->n_layers), "%s: the fused fp8 "
               "FFN ran on %lld layer steps (%d layers%s)", what,
               (long long) n, hp->n_layers,
               more ? "; MOE_CUDA_GEMV_MAX_T set: decode steps may add "
                      "theirs" : ": the prefill's only");
        if (g_grouped >= 0) {
            /* the knob chose the GEMMs: all of those layers on the
             * grouped GEMM (no host sync), or none */
            TAP_OK(ng == (g_grouped ? n : 0), "%s: %lld of them on the "
                   "grouped GEMM", what, (long long) ng);
        }
    } else if (act && blas) {
        /* an expert-parallel rank of these tiny models has a scratch
         * (sized by its largest dequantized part) too small for the
         * fused FFN's buffers: it takes the per-part fp8 GEMMs, which
         * the logits check above covers */
        TAP_DIAG("%s: fused fp8 prefill FFN on %lld layers (rank 0)", what,
                 (long long) moe_cuda_backend_fp8_ffn_layers(g0));
    }
    gb->destroy(gb);
    cb->destroy(cb);
    free(gl);
    free(cl);
    free(route);
}


int
main(void)
{
    const char *qdir = getenv("MOE_QUANT_DIR");
    char        path[512], line[128], err[512];
    FILE       *f;

    if (qdir == NULL) {
        qdir = "build/quant";
    }
    if (moe_cuda_device_count() == 0) {
        printf("1..0 # SKIP no CUDA device\n");
        return 0;
    }
    snprintf(path, sizeof(path), "%s/MODELS", qdir);
    f = fopen(path, "r");
    if (f == NULL) {
        printf("1..0 # SKIP no %s (run tools/quant_models.sh %s)\n", path,
               qdir);
        return 0;
    }
    gu_seed(20261202);
    while (fgets(line, sizeof(line), f) != NULL) {
        moe_model_t *m = NULL;
        int          rc;

        line[strcspn(line, "\r\n")] = '\0';
        if (line[0] == '\0') {
            continue;
        }
        snprintf(path, sizeof(path), "%s/%s", qdir, line);
        rc = moe_model_load_quant(path, 0, NULL, 0, &m, err, sizeof(err));
        TAP_OK(rc == MOE_OK, "%s: loads (%s)", line,
               rc == MOE_OK ? "ok" : err);
        if (rc != MOE_OK) {
            continue;
        }
        run_variant(line, m, 1, 0, 0);
        run_variant(line, m, 1, 0, 1);
        if (strcmp(line, "fp8-tensor") == 0
            || strcmp(line, "ct-fp8-channel") == 0
            || strcmp(line, "awq-g32") == 0
            || strcmp(line, "gptq-g32-sym") == 0)
        {
            run_variant(line, m, 2, 0, 0);
        }
        if (strcmp(line, "awq-g32") == 0) {
            run_variant(line, m, 2, 1, 0);
        }
        if (strcmp(line, "fp8-tensor-kv") == 0) {
            g_kvfp8 = 1;
            run_variant_tol(line, m, 1, 0, 0, 0, KV_FP8_TOL);
            run_variant_tol(line, m, 2, 0, 0, 0, KV_FP8_TOL);
            g_kvfp8 = 0;
        }
        if (strcmp(line, "fp8-tensor") == 0
            || strcmp(line, "ct-fp8-channel") == 0)
        {
            /* prefill through cuBLASLt fp8 (dense, then per expert) */
            run_variant_tol(line, m, 1, 0, 0, 1, ACT_TOL);
            run_variant_tol(line, m, 1, 0, 1, 1, ACT_TOL);
            /* the fused fp8 FFN on expert-parallel ranks: rank 1's rows
             * start past rank 0's */
            run_variant_tol(line, m, 2, 1, 1, 1, ACT_TOL);
        }
        if (strcmp(line, "awq-g64") == 0 || strcmp(line, "awq-g128") == 0
            || strcmp(line, "gptq-g128-asym") == 0)
        {
            /* shapes the tiled 4-bit layout takes: tiled with SiLU fused,
             * tiled with the SiLU pass, the checkpoint's layout; GEMV
             * and cuBLAS expert paths */
            for (g_q4t = 3; g_q4t >= 0; g_q4t--) {
                run_variant(line, m, 1, 0, 0);
                run_variant(line, m, 1, 0, 1);
            }
            /* GPTQ's layout on the tensor-core GEMV (MOE_CUDA_Q4_GEMV 0) */
            g_q4t = 1;
            g_q4g = 0;
            run_variant(line, m, 1, 0, 0);
            g_q4g = -1;
            g_q4t = -1;
        }
        if (strcmp(line, "gptq-g128-256") == 0) {
            /* shapes the warpgroup kernel takes (kernels/q4_wgmma.cu):
             * on it by default, not with MOE_CUDA_Q4_GEMV 0 */
            g_q4w = 1;
            run_variant(line, m, 1, 0, 0);
            g_q4g = 0;
            g_q4w = 0;
            run_variant(line, m, 1, 0, 0);
            g_q4g = -1;
            g_q4w = -1;
        }
        if (strcmp(line, "ct-fp8-256") == 0) {
            /* experts sized for the fp8 grouped GEMM: the fused fp8 FFN
             * on it (no host sync) and on per-expert cuBLASLt, tp 1 and
             * expert parallel (rank 1's rows start past rank 0's) */
            for (g_grouped = 2; g_grouped >= 0; g_grouped--) {
                run_variant_tol(line, m, 1, 0, 1, 1, ACT_TOL);
                run_variant_tol(line, m, 2, 1, 1, 1, ACT_TOL);
            }
            g_grouped = -1;
        }
        moe_model_free(m);
    }
    fclose(f);
    TAP_PLAN(tap_n);
    return TAP_DONE();
}
