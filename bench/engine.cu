/*
 * Engine benchmark on one GPU with synthetic bf16 weights of real model
 * shapes, generated on the device (no files):
 *   1. device-to-device copy bandwidth (2 GiB buffers, bytes read+written)
 *      and cuBLAS bf16 GEMM rate (8192^3, fp32 accumulate): the ceilings;
 *   2. per model: decode tokens/s at batch 1..256 with context 512 (and
 *      at batches 1 and 64 with contexts 8192 and 32768: long contexts),
 *      prefill tokens/s for 512- and 2048-token prompts, per-stage time,
 *      and each figure's ratio to its limit: decode = bytes the step must
 *      read (attention weights + the experts actually hit + router +
 *      lm_head + KV) / copy bandwidth; prefill = FLOPs / GEMM rate;
 *   3. the weight formats (mixtral-8x7b expert shape, one MoE layer's
 *      experts, synthetic weights): the expert GEMVs of a decode step at
 *      batch 1 and 64 in bf16, fp8 (e4m3, per-channel scales; CUDA-core
 *      GEMV, and the tensor-core kernels with per-channel and block
 *      scales: fp8-mma-*), AWQ and
 *      GPTQ (4-bit, group 128), each next to its limit (the bytes of the
 *      experts hit, scales included, / copy bandwidth);
 *   4. decode attention alone (mixtral heads, one layer) at contexts 512,
 *      8192 and 32768, batch 1 and 64, bf16 and fp8 KV cache, with the
 *      default split grid and the long-context one, each on the
 *      tensor-core decode kernel and the SIMT one (tuning record
 *      att_decode_tc 1 / 0), against KV bytes / copy bandwidth.
 * Usage: bench_engine [model,...] [--tp N] [--ep] [--nccl auto|on|off]
 *   [--weights bf16|fp8|awq|gptq] [--kv-cache-dtype auto|fp8]
 *   (models: default all four; names below)
 * --weights (BENCH_WEIGHTS): part 2's whole-model figures with the linear
 * weights packed in that format (moe_cuda_backend_create_random_fmt: fp8
 * per-channel scales, 4-bit group 128), the decode limit from the
 * format's bytes (weights with scales and zeros, plus KV), the KV pool
 * sized by them; RESULT lines carry weights=<format>.
 * --kv-cache-dtype fp8 (BENCH_KV_DTYPE): part 2's KV cache in e4m3 (unit
 * scales; moe_cuda_backend_create_kv), the pool sized in e4m3 blocks and
 * the decode limit counting one byte per KV element; RESULT lines carry
 * kv=fp8 (else kv=bf16), decode lines kv_share= (the KV bytes' share of
 * the bytes the step must read).
 * Environment: BENCH_BATCHES=1,64 / BENCH_PROMPTS=2048 / BENCH_CTX=8192
 * run only those decode batches / prefill prompts / decode contexts ("0":
 * none), e.g. under ncu; BENCH_QUANT=0 / BENCH_ATT=0 skip parts 3 / 4;
 * BENCH_TP=N, BENCH_EP=1, BENCH_NCCL=on as the options.
 * Tensor / expert parallelism (--tp N, --ep): N ranks (tp.c), rank r on
 * GPU r modulo the visible GPUs, so with fewer GPUs than N several ranks
 * share one (the emulated placement: local sums, no graphs); on distinct
 * GPUs the ranks all-reduce with NCCL (graphs kept) when the build has it.
 * Each rank has its own random weights of its shard's shapes.  The
 * collectives are timed with CUDA events recorded around each all-reduce
 * (stage "collectives", moe_cuda_backend_profile; the wait for the other
 * ranks included) and reported per layer (two all-reduces: after the
 * attention output and after the FFN) and as a share of the step.
 * Output: a human table plus one "RESULT key=value ..." line per figure.
 */

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include <cublas_v2.h>
#include <cuda_runtime_api.h>

extern "C" {
#include "backends/backend.h"
#include "backends/qweights.h"
}
#include "backends/cuda_backend.h"
#include "attention.h"
#include "gemm.h"
#include "init.h"
#include "moe_gemv.h"
#include "moe_ggemm.h"
#include "quant_gemv.h"
#include "silu_mul.h"

#define CTX_MAX 32768
#define BS      16
#define CAP     2048

typedef struct {
    const char *name;
    int dim, layers, heads, kv_heads, head_dim, ffn, experts, top_k, vocab;
    const char *note;
} shape_t;

static const shape_t shapes[] = {
    { "mixtral-8x7b", 4096, 32, 32, 8, 128, 14336, 8, 2, 32000, "" },
    { "llama-3-8b", 4096, 32, 32, 8, 128, 14336, 1, 1, 128256, "dense" },
    { "olmoe-1b-7b", 2048, 16, 16, 16, 128, 1024, 64, 8, 50304,
      "no q/k norm" },
    { "qwen1.5-moe-a2.7b", 2048, 24, 16, 16, 128, 1408, 60, 4, 151936,
      "shared expert (5632) skipped" },
};

static double copy_gbs, gemm_tfs;

/* parallelism of the run (--tp, --ep, --nccl) */
static int         opt_tp = 1, opt_ep;
static const char *opt_nccl = "auto";
/* part 2's weight format (--weights, BENCH_WEIGHTS): MOE_WF_* */
static int         opt_wfmt = MOE_WF_BF16;
/* part 2's KV element (--kv-cache-dtype, BENCH_KV_DTYPE): 1 e4m3 */
static int         opt_kvfp8;


/* Device bytes of one (N, K) weight in part 2's format, scales and zeros
 * included (as moe_cuda_backend_create_random_fmt lays it out: fp8 per
 * channel, 4-bit group 128; shapes the kernels do not take stay bf16). */
static double
bench_wbytes(double N, double K)
{
    switch (opt_wfmt) {
    case MOE_WF_FP8:
        return fmod(K, 16) == 0 ? N * K + 4 * N : 2 * N * K;
    case MOE_WF_AWQ: case MOE_WF_GPTQ:
        return fmod(K, 128) == 0 && fmod(N, 8) == 0
               ? N * K / 2 + (K / 128) * N * 2 + (K / 128) * (N / 8) * 4
               : 2 * N * K;
    default:
        return 2 * N * K;
    }
}


/* Whether v is in the comma list of environment variable var (unset: all
 * of them; "0" or "": none), e.g. BENCH_BATCHES=1,64 BENCH_PROMPTS=0 to
 * profile one decode shape. */
static int
bench_wanted(const char *var, int v)
{
    const char *s = getenv(var);

    if (s == NULL) {
        return 1;
    }
    while (*s != '\0') {
        char *end;
        long  x = strtol(s, &end, 10);

        if (end == s) {
            break;
        }
        if (x == v) {
            return 1;
        }
        s = *end == ',' ? end + 1 : end;
    }
    return 0;
}


static double
now_s(void)
{
    struct timespec ts;

    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec * 1e-9;
}


#define CK(x)                                                                \
    do {                                                                     \
        cudaError_t e_ = (x);                                                \
        if (e_ != cudaSuccess) {                                             \
            printf("FAIL %s: %s\n", #x, cudaGetErrorString(e_));             \
            return -1;                                                       \
        }                                                                    \
    } while (0)


static int
bench_ceilings(void)
{
    size_t         n = (size_t) 2 << 30;
    void          *a, *b;
    cudaEvent_t    e0, e1;
    float          ms;
    int            it = 20;
    cublasHandle_t h;

    CK(cudaMalloc(&a, n));
    CK(cudaMalloc(&b, n));
    CK(cudaMemset(a, 1, n));
    CK(cudaEventCreate(&e0));
    CK(cudaEventCreate(&e1));
    CK(cudaMemcpy(b, a, n, cudaMemcpyDeviceToDevice));
    CK(cudaEventRecord(e0));
    for (int i = 0; i < it; i++) {
        CK(cudaMemcpyAsync(b, a, n, cudaMemcpyDeviceToDevice));
    }
    CK(cudaEventRecord(e1));
    CK(cudaEventSynchronize(e1));
    CK(cudaEventElapsedTime(&ms, e0, e1));
    copy_gbs = 2.0 * n * it / (ms * 1e-3) / 1e9;
    printf("copy bandwidth (D2D, read+write, 2 GiB x %d): %.0f GB/s\n", it,
           copy_gbs);
    printf("RESULT kind=copy_bw value=%.1f unit=GB/s\n", copy_gbs);

    /* GEMM 8192^3 on the same buffers (3 x 128 MiB bf16 fits in 2 GiB) */
    int M = 8192;
    char *A = (char *) a, *B = A + (size_t) M * M * 2;
    char *C = (char *) b;

    if (cublasCreate(&h) != CUBLAS_STATUS_SUCCESS) {
        printf("FAIL cublasCreate\n");
        return -1;
    }
    if (moe_cuda_fill_random_bf16((moe_bf16_t *) A, (int64_t) M * M, 1, 1.0f,
                                  0) != 0
        || moe_cuda_fill_random_bf16((moe_bf16_t *) B, (int64_t) M * M, 2,
                                     1.0f, 0) != 0
        || moe_cuda_gemm(h, M, M, M, (moe_bf16_t *) A, M, (moe_bf16_t *) B,
                         M, C, M, 1, 0.0f) != 0)
    {
        printf("FAIL gemm warmup: %s\n", moe_cuda_last_error());
        return -1;
    }
    CK(cudaDeviceSynchronize());
    it = 10;
    CK(cudaEventRecord(e0));
    for (int i = 0; i < it; i++) {
        if (moe_cuda_gemm(h, M, M, M, (moe_bf16_t *) A, M, (moe_bf16_t *) B,
                          M, C, M, 1, 0.0f) != 0)
        {
            printf("FAIL gemm: %s\n", moe_cuda_last_error());
            return -1;
        }
    }
    CK(cudaEventRecord(e1));
    CK(cudaEventSynchronize(e1));
    CK(cudaEventElapsedTime(&ms, e0, e1));
    gemm_tfs = 2.0 * M * (double) M * M * it / (ms * 1e-3) / 1e12;
    printf("cuBLAS bf16 GEMM 8192^3 (fp32 accumulate): %.0f TFLOP/s\n",
           gemm_tfs);
    printf("RESULT kind=gemm value=%.1f unit=TFLOP/s\n", gemm_tfs);
    cublasDestroy(h);
    cudaEventDestroy(e0);
    cudaEventDestroy(e1);
    cudaFree(a);
    cudaFree(b);
    return 0;
}


static void
print_stages(const char *what, const double *ms, int steps)
{
    static const char *nm[MOE_CUDA_N_STAGES] = {
        "attention", "router+permute", "expert GEMMs", "dense GEMMs", "other",
        "collectives"
    };
    double tot = 0;

    for (int i = 0; i < MOE_CUDA_N_STAGES; i++) {
        tot += ms[i];
    }
    printf("    stages %-14s", what);
    for (int i = 0; i < MOE_CUDA_N_STAGES; i++) {
        printf(" %s %.2f ms (%.0f%%)%s", nm[i], ms[i] / steps,
               tot > 0 ? 100 * ms[i] / tot : 0,
               i + 1 < MOE_CUDA_N_STAGES ? "," : "\n");
    }
}


/* Stage timing on every rank (the figures: rank 0's). */
static int
bench_profile(moe_backend_t *b, int enable, double *ms)
{
    moe_backend_t *r;
    int            i, rc = MOE_OK;

    for (i = 0; (r = moe_tp_backend_rank(b, i)) != NULL; i++) {
        int x = moe_cuda_backend_profile(r, enable, i == 0 ? ms : NULL);

        rc = rc == MOE_OK ? x : rc;
    }
    return rc;
}


/* How evenly the last forward spread the experts' rows (rank 0; resets
 * the counts: call once before the forward to start from zero). */
static void
print_routing(moe_backend_t *b, int show)
{
    moe_backend_t *r = moe_tp_backend_rank(b, 0);
    int64_t        st[MOE_CUDA_ROW_STATS];

    moe_cuda_backend_expert_rows(r != NULL ? r : b, st);
    if (!show || st[0] == 0) {
        return;
    }
    printf("    expert rows per layer: %.0f in all, largest expert %.0f, "
           "smallest %.0f (means over %lld layers); experts by 64-row "
           "bucket:", (double) st[1] / st[0], (double) st[2] / st[0],
           (double) st[3] / st[0], (long long) st[0]);
    for (int i = 0; i < MOE_CUDA_ROW_STATS - 4; i++) {
        if (st[4 + i] > 0) {
            printf(" %d%s:%lld", 64 * i,
                   i == MOE_CUDA_ROW_STATS - 5 ? "+" : "",
                   (long long) st[4 + i]);
        }
    }
    printf("\n");
}


/* The all-reduces' share: two per layer, event-timed on rank 0. */
static void
print_comm(const char *model, const char *kind, int size, const double *ms,
    int steps, int layers)
{
    double tot = 0, c = ms[MOE_CUDA_ST_COMM] / steps;

    if (opt_tp <= 1) {
        return;
    }
    for (int i = 0; i < MOE_CUDA_N_STAGES; i++) {
        tot += ms[i] / steps;
    }
    printf("    collectives: %.3f ms per layer (2 all-reduces), %.1f%% of "
           "the step\n", c / layers, tot > 0 ? 100 * c / tot : 0);
    printf("RESULT model=%s kind=collective phase=%s size=%d tp=%d ep=%d "
           "ms_layer=%.4f share=%.4f\n", model, kind, size, opt_tp, opt_ep,
           c / layers, tot > 0 ? c / tot : 0);
}


/*
 * opt_tp ranks of random weights, rank r on GPU r % (visible GPUs),
 * composed by tp.c; NCCL between distinct GPUs (opt_nccl), else the local
 * sum.  *n_blocks: the pool of each rank (sized per GPU share);
 * *n_gpus: distinct GPUs used.
 */
static int
bench_create_ranks(const moe_hparams_t *hp, int *n_blocks,
    moe_backend_t **out, int *n_gpus, char *err, size_t errlen)
{
    moe_backend_t *ranks[64] = { 0 };
    void          *ctx[64];
    moe_hparams_t  rhp;
    int            ndev = moe_cuda_device_count(), dev[64], r, rc, per_dev;
    int            distinct, nb = *n_blocks, avail;

    rc = moe_hparams_shard_ep(hp, opt_tp, 0, opt_ep, &rhp, err, errlen);
    if (rc != MOE_OK) {
        return rc;
    }
    for (r = 0; r < opt_tp; r++) {
        dev[r] = r % ndev;
    }
    distinct = opt_tp <= ndev;
    *n_gpus = distinct ? opt_tp : ndev;
    per_dev = (opt_tp + ndev - 1) / ndev;
    rc = moe_cuda_kv_blocks_for_fmt(&rhp, opt_wfmt, BS, opt_kvfp8, CAP,
                                    0.92 / per_dev, 0, &avail, err, errlen);
    if (rc != MOE_OK) {
        return rc;
    }
    nb = avail < nb ? avail : nb;
    if (!distinct || strcmp(opt_nccl, "off") == 0
        || !moe_cuda_nccl_available())
    {
        rc = moe_cuda_peer_access(dev, opt_tp, err, errlen);
        if (rc != MOE_OK) {
            return rc;
        }
    }
    for (r = 0; r < opt_tp; r++) {
        moe_cuda_kv_t kv = { opt_kvfp8, NULL, NULL };

        rc = moe_cuda_backend_create_kv(NULL, hp, opt_wfmt, 42, opt_tp, r,
                                        opt_ep, nb, BS, CAP, dev[r], &kv,
                                        &ranks[r], err, errlen);
        if (rc != MOE_OK) {
            break;
        }
        ctx[r] = ranks[r];
    }
    if (rc == MOE_OK && distinct && strcmp(opt_nccl, "off") != 0
        && (moe_cuda_nccl_available() || strcmp(opt_nccl, "on") == 0))
    {
        rc = moe_cuda_nccl_attach(ranks, dev, opt_tp, err, errlen);
    }
    if (rc != MOE_OK) {
        for (r = 0; r < opt_tp; r++) {
            if (ranks[r] != NULL) {
                ranks[r]->destroy(ranks[r]);
            }
        }
        return rc == MOE_EUNSUPPORTED ? MOE_EBACKEND : rc;
    }
    printf("  %d ranks on GPUs %d..%d, all-reduce by %s\n", opt_tp, dev[0],
           dev[opt_tp - 1], distinct && strcmp(opt_nccl, "off") != 0
           && moe_cuda_nccl_available() ? "NCCL (graphs)"
                                        : "local sums (no graphs)");
    *n_blocks = nb;
    return moe_tp_backend_wrap(ranks, NULL, opt_tp, moe_cuda_tp_ops(), ctx,
                               moe_cuda_backend_set_reduce, out, err,
                               errlen);
}


static int
bench_model(const shape_t *sh)
{
    moe_hparams_t   hp;
    moe_backend_t  *b = NULL;
    char            err[512];
    int             rc, n_blocks, avail, per_seq, n_gpus = 1;
    static const int batches[] = { 1, 8, 32, 64, 128, 256 };
    static const int ctxs[] = { 512, 8192, 32768 };
    static const int prompts[] = { 512, 2048 };
    double          t_create;

    memset(&hp, 0, sizeof(hp));
    hp.arch = sh->experts > 1 ? MOE_ARCH_MIXTRAL : MOE_ARCH_LLAMA;
    snprintf(hp.arch_name, sizeof(hp.arch_name), "%s", sh->name);
    hp.dim = sh->dim;
    hp.n_layers = sh->layers;
    hp.n_heads = sh->heads;
    hp.n_kv_heads = sh->kv_heads;
    hp.head_dim = sh->head_dim;
    hp.ffn_dim = sh->ffn;
    hp.n_experts = sh->experts;
    hp.top_k = sh->top_k;
    hp.vocab_size = sh->vocab;
    hp.max_pos = CTX_MAX + 64;
    hp.rope_theta = 1e6f;
    hp.norm_eps = 1e-5f;
    hp.bos_id = -1;

    double D = hp.dim, L = hp.n_layers, F = hp.ffn_dim, E = hp.n_experts;
    double Q = (double) hp.n_heads * hp.head_dim;
    double KVD = (double) hp.n_kv_heads * hp.head_dim;
    double V = hp.vocab_size, K = hp.top_k;
    double wbytes = (double) moe_cuda_weight_bytes_fmt(&hp, opt_wfmt);
    const char *wname = moe_qw_format_name(opt_wfmt);
    const char *kvname = opt_kvfp8 ? "fp8" : "bf16";
    double      kvb = opt_kvfp8 ? 1.0 : 2.0;   /* bytes a KV element */

    printf("\n== %s: dim %d, %d layers, %d/%d heads, ffn %d, %d experts "
           "top-%d, vocab %d %s%s%s; weights %.1f GB %s\n", sh->name,
           sh->dim, sh->layers, sh->heads, sh->kv_heads, sh->ffn,
           sh->experts, sh->top_k, sh->vocab, sh->note[0] ? "(" : "",
           sh->note, sh->note[0] ? ")" : "", wbytes / 1e9, wname);

    per_seq = (CTX_MAX + 16 + BS - 1) / BS + 1;
    /* enough for 256 sequences at 512 or 64 at 8192 (the pool caps it
     * below: then sequences share pages, still read from memory) */
    n_blocks = 64 * ((8192 + 16 + BS - 1) / BS + 1) + CAP / BS + 8;
    rc = moe_cuda_kv_blocks_for_fmt(&hp, opt_wfmt, BS, opt_kvfp8, CAP, 0.92,
                                    0, &avail, err, sizeof(err));
    if (rc != MOE_OK) {
        printf("SKIP %s: %s\n", sh->name, err);
        printf("RESULT model=%s kind=skip\n", sh->name);
        return 0;
    }
    if (opt_tp > 1) {
        avail = n_blocks;       /* the ranks size their own pools */
    }
    if (avail < n_blocks) {
        printf("  (KV pool %d blocks < %d wanted: sequences share pages)\n",
               avail, n_blocks);
        n_blocks = avail;
    }
    t_create = now_s();
    if (opt_tp > 1) {
        rc = bench_create_ranks(&hp, &n_blocks, &b, &n_gpus, err,
                                sizeof(err));
        if (rc == MOE_EUNSUPPORTED) {
            printf("SKIP %s: %s\n", sh->name, err);
            printf("RESULT model=%s kind=skip tp=%d ep=%d\n", sh->name,
                   opt_tp, opt_ep);
            return 0;
        }
    } else {
        moe_cuda_kv_t kv = { opt_kvfp8, NULL, NULL };

        rc = moe_cuda_backend_create_kv(NULL, &hp, opt_wfmt, 42, 1, 0, 0,
                                        n_blocks, BS, CAP, 0, &kv, &b, err,
                                        sizeof(err));
    }
    if (rc != MOE_OK) {
        printf("FAIL %s: create: %s\n", sh->name, err);
        return -1;
    }
    printf("  created in %.2f s (KV pool %d %s blocks of %d; tp %d%s on %d "
           "GPU(s))\n", now_s() - t_create, n_blocks, kvname, BS, opt_tp,
           opt_ep ? " expert parallel" : "", n_gpus);

    float   *logits = (float *) malloc(sizeof(float) * 256 * (size_t) V);
    int32_t *bt = (int32_t *) malloc(sizeof(int32_t) * 256 * per_seq);
    int32_t *tok = (int32_t *) malloc(sizeof(int32_t) * CAP);
    int64_t *cnt0 = (int64_t *) malloc(sizeof(int64_t) * (size_t) (L * E));
    moe_seq_batch_t sb[256];

    for (int i = 0; i < 256 * per_seq; i++) {
        bt[i] = i % n_blocks;
    }
    for (int i = 0; i < CAP; i++) {
        tok[i] = (int32_t) ((i * 2654435761u) % (unsigned) sh->vocab);
    }

    for (size_t ci = 0; ci < sizeof(ctxs) / sizeof(ctxs[0]); ci++) {
    int CTX = ctxs[ci];

    if (!bench_wanted("BENCH_CTX", CTX)) {
        continue;
    }
    printf("  decode (ctx %-5d)      %10s %10s %10s %8s\n", CTX, "tok/s",
           "ms/step", "limit ms", "of limit");
    for (size_t bi = 0; bi < sizeof(batches) / sizeof(batches[0]); bi++) {
        int    B = batches[bi], steps = 6;
        double t0, dt, ms[MOE_CUDA_N_STAGES];

        if (!bench_wanted("BENCH_BATCHES", B)
            || (CTX > 512 && B != 1 && B != 64))
        {
            continue;
        }
        if ((double) B * CTX * 2.0 * L * KVD * kvb > 2.0 * wbytes
            && B > 1)
        {
            /* 64 x 32k tokens of KV (268 GB for Mixtral) fit no GPU: the
             * engine would never build that step (its KV pool and the
             * backend's block-table staging refuse it) */
            printf("  batch %-3d               skipped: %.0f GB of KV at "
                   "ctx %d does not fit one GPU beside the weights\n", B,
                   (double) B * CTX * 2.0 * L * KVD * kvb / 1e9, CTX);
            continue;
        }

        for (int i = 0; i < B; i++) {
            memset(&sb[i], 0, sizeof(sb[i]));
            sb[i].tokens = tok + i;
            sb[i].n_tokens = 1;
            sb[i].pos = CTX;
            sb[i].block_table = bt + (size_t) i * per_seq;
            sb[i].n_blocks = per_seq;
            sb[i].logits = logits + (size_t) i * (size_t) V;
        }
        for (int w = 0; w < 2; w++) {
            if ((rc = b->forward(b, sb, B)) != MOE_OK) {
                goto fwd_fail;
            }
        }
        t0 = now_s();
        for (int s = 0; s < steps; s++) {
            if ((rc = b->forward(b, sb, B)) != MOE_OK) {
                goto fwd_fail;
            }
        }
        dt = (now_s() - t0) / steps;

        /* experts hit in one step, and the stage split of 3 steps */
        memcpy(cnt0, b->expert_counts(b), sizeof(int64_t) * (size_t) (L * E));
        print_routing(b, 0);
        bench_profile(b, 1, NULL);
        for (int s = 0; s < 3; s++) {
            if ((rc = b->forward(b, sb, B)) != MOE_OK) {
                goto fwd_fail;
            }
        }
        bench_profile(b, 0, ms);
        {
            const int64_t *c1 = b->expert_counts(b);
            double         hit = 0;

            for (int i = 0; i < (int) (L * E); i++) {
                hit += c1[i] > cnt0[i];
            }
            /* over 3 steps the set can only grow: an upper bound on one
             * step's, so the limit is conservative (never too small) */
            /* weights in the run's format, scales and zeros included */
            double kvbytes = (double) B * (CTX + 1) * L * 2 * KVD * kvb;
            double bytes = L * (bench_wbytes(Q, D) + 2 * bench_wbytes(KVD, D)
                                + bench_wbytes(D, Q))
                           + hit * (2 * bench_wbytes(F, D)
                                    + bench_wbytes(D, F))
                           + (E > 1 ? L * E * D * 4 : 0) + V * D * 2
                           + kvbytes;
            /* the ranks on n_gpus GPUs read these bytes in parallel */
            double lim = bytes / (copy_gbs * 1e9 * n_gpus);

            printf("  batch %-16d %10.1f %10.2f %10.2f %7.0f%%\n", B, B / dt,
                   dt * 1e3, lim * 1e3, 100 * lim / dt);
            printf("RESULT model=%s kind=decode batch=%d tok_s=%.1f "
                   "ms_step=%.3f limit_ms=%.3f of_limit=%.3f "
                   "experts_hit=%.0f ctx=%d tp=%d ep=%d gpus=%d "
                   "weights=%s kv=%s kv_share=%.3f\n", sh->name, B, B / dt,
                   dt * 1e3, lim * 1e3, lim / dt, hit, CTX, opt_tp, opt_ep,
                   n_gpus, wname, kvname, kvbytes / bytes);
            print_stages("", ms, 3);
            print_routing(b, 1);
            print_comm(sh->name, "decode", B, ms, 3, sh->layers);
        }
    }
    }

    printf("  %-22s %10s %10s %10s %8s\n", "prefill (1 sequence)", "tok/s",
           "ms", "limit ms", "of limit");
    for (size_t pi = 0; pi < sizeof(prompts) / sizeof(prompts[0]); pi++) {
        int    P = prompts[pi], runs = 3;
        double t0, dt, ms[MOE_CUDA_N_STAGES];

        if (!bench_wanted("BENCH_PROMPTS", P)) {
            continue;
        }

        memset(&sb[0], 0, sizeof(sb[0]));
        sb[0].tokens = tok;
        sb[0].n_tokens = P;
        sb[0].pos = 0;
        sb[0].block_table = bt;
        sb[0].n_blocks = (P + BS - 1) / BS;
        sb[0].logits = logits;
        if (sb[0].n_blocks > 256 * per_seq) {
            continue;
        }
        if ((rc = b->forward(b, sb, 1)) != MOE_OK) {
            goto fwd_fail;
        }
        t0 = now_s();
        for (int r = 0; r < runs; r++) {
            if ((rc = b->forward(b, sb, 1)) != MOE_OK) {
                goto fwd_fail;
            }
        }
        dt = (now_s() - t0) / runs;
        bench_profile(b, 1, NULL);
        print_routing(b, 0);
        if ((rc = b->forward(b, sb, 1)) != MOE_OK) {
            goto fwd_fail;
        }
        bench_profile(b, 0, ms);

        double flops = 2.0 * P * L * ((Q + 2 * KVD) * D + D * Q
                                      + K * 3 * F * D)
                       + 2.0 * 2.0 * L * Q * (double) P * (P + 1) / 2
                       + 2.0 * D * V;
        double lim = flops / (gemm_tfs * 1e12);

        printf("  prompt %-15d %10.0f %10.2f %10.2f %7.0f%%\n", P, P / dt,
               dt * 1e3, lim * 1e3, 100 * lim / dt);
        printf("RESULT model=%s kind=prefill prompt=%d tok_s=%.1f ms=%.3f "
               "limit_ms=%.3f of_limit=%.3f tp=%d ep=%d gpus=%d "
               "weights=%s kv=%s\n", sh->name, P, P / dt, dt * 1e3,
               lim * 1e3, lim / dt, opt_tp, opt_ep, n_gpus, wname, kvname);
        print_stages("", ms, 1);
        print_routing(b, 1);
        print_comm(sh->name, "prefill", P, ms, 1, sh->layers);
    }
    rc = 0;
    goto done;

fwd_fail:
    printf("FAIL %s: forward: %d %s\n", sh->name, rc, moe_cuda_last_error());
    rc = -1;
done:
    b->destroy(b);
    free(logits);
    free(bt);
    free(tok);
    free(cnt0);
    return rc;
}


/* ------------------------------ weight formats and long-context attention */

/* Hash-random bytes (and mask): e4m3 with mask 0xf7 has no NaN code. */
__global__ void
k_bench_bytes(uint8_t *p, size_t n, uint32_t seed, uint8_t mask)
{
    for (size_t i = (size_t) blockIdx.x * blockDim.x + threadIdx.x; i < n;
         i += (size_t) gridDim.x * blockDim.x)
    {
        uint32_t h = (uint32_t) i * 2654435761u ^ seed;

        h ^= h >> 15;
        h *= 2246822519u;
        h ^= h >> 13;
        p[i] = (uint8_t) h & mask;
    }
}

/* g_idx of `rows` matrices of K columns each, trivial order: k / G */
__global__ void
k_bench_gidx(int32_t *p, int rows, int K, int G)
{
    for (size_t i = (size_t) blockIdx.x * blockDim.x + threadIdx.x;
         i < (size_t) rows * K; i += (size_t) gridDim.x * blockDim.x)
    {
        p[i] = (int32_t) (i % (size_t) K) / G;
    }
}

/* n fp16 values v (raw bits) */
__global__ void
k_bench_u16(uint16_t *p, size_t n, uint16_t v)
{
    for (size_t i = (size_t) blockIdx.x * blockDim.x + threadIdx.x; i < n;
         i += (size_t) gridDim.x * blockDim.x)
    {
        p[i] = v;
    }
}


/* ms per call of fn (after 2 warm-up calls), events on the null stream */
template <typename Fn>
static double
bench_time(Fn fn, int iters)
{
    cudaEvent_t e0, e1;
    float       ms = -1.0f;

    for (int i = 0; i < 2; i++) {
        if (fn() != 0) {
            return -1.0;
        }
    }
    cudaEventCreate(&e0);
    cudaEventCreate(&e1);
    cudaEventRecord(e0);
    for (int i = 0; i < iters; i++) {
        if (fn() != 0) {
            return -1.0;
        }
    }
    cudaEventRecord(e1);
    if (cudaEventSynchronize(e1) != cudaSuccess) {
        return -1.0;
    }
    cudaEventElapsedTime(&ms, e0, e1);
    cudaEventDestroy(e0);
    cudaEventDestroy(e1);
    return (double) ms / iters;
}


/*
 * Part 3: one MoE layer's expert GEMVs (mixtral-8x7b: D 4096, F 14336,
 * 8 experts) per weight format at batch 1 (2 rows: experts 0 and 1) and
 * 64 (128 rows, 16 per expert): gate|up (N 2F, K D), SwiGLU, down (N D,
 * K F).  bf16: moe_cuda_gemv (SwiGLU fused); fp8: the quantized GEMV,
 * moe_cuda_silu_mul, the quantized GEMV; awq / gptq: the 4-bit gate|up
 * with SwiGLU fused (moe_cuda_qgemv_q4_silu), the 4-bit down.  gptq_gidx:
 * GPTQ with a g_idx (desc_act checkpoints; trivial order here), which
 * takes the CUDA-core kernel with atomics (then moe_cuda_silu_mul)
 * instead of the tensor-core one.  fp8-mma-channel and fp8-mma-block
 * (per-channel / 128x128 block scales): the e4m3 tensor-core kernels,
 * moe_cuda_gemv_fp8 at batch 1 and moe_cuda_ggemm_fp8 at batch 64
 * (SwiGLU fused in both).
 */
static int
bench_quant(void)
{
    const int    D = 4096, F = 14336, E = 8, G = 128;
    const size_t w13 = (size_t) 2 * F * D, w2 = (size_t) D * F;
    const size_t nw = (size_t) E * (w13 + w2);  /* weights per layer */
    static const char *fmts[7] = { "bf16", "fp8", "awq", "gptq",
                                   "gptq_gidx", "fp8-mma-channel",
                                   "fp8-mma-block" };
    static const int   batches[2] = { 1, 64 };
    uint8_t  *wbuf, *sbuf, *zbuf;
    int32_t  *offs, *xrow, *gidx, hoffs[9], hxrow[128];
    moe_bf16_t *x, *h;
    float    *y, *gu;
    int       rc = 0;

    if (cudaMalloc(&wbuf, nw * 2) != cudaSuccess          /* bf16 size */
        || cudaMalloc(&sbuf, (size_t) E * (2 * F + D) * (D / G + F / G) * 2
                             + (size_t) E * (2 * F + D) * 4) != cudaSuccess
        || cudaMalloc(&zbuf, (size_t) E * (2 * F + D) * (D / G + F / G) / 2)
           != cudaSuccess
        || cudaMalloc(&x, (size_t) 128 * F * 2) != cudaSuccess
        || cudaMalloc(&h, (size_t) 128 * F * 2) != cudaSuccess
        || cudaMalloc(&y, (size_t) 128 * 2 * F * 4) != cudaSuccess
        || cudaMalloc(&gu, (size_t) 128 * 2 * F * 4) != cudaSuccess
        || cudaMalloc(&offs, 9 * 4) != cudaSuccess
        || cudaMalloc(&xrow, 128 * 4) != cudaSuccess
        || cudaMalloc(&gidx, (size_t) E * (D + F) * 4) != cudaSuccess)
    {
        printf("FAIL quant bench: cudaMalloc\n");
        return -1;
    }
    moe_cuda_fill_random_bf16(x, (int64_t) 128 * F, 5, 1.0f, 0);
    moe_cuda_fill_random_bf16(h, (int64_t) 128 * F, 6, 1.0f, 0);
    k_bench_gidx<<<1024, 256>>>(gidx, E, D, G);             /* gate|up */
    k_bench_gidx<<<1024, 256>>>(gidx + E * D, E, F, G);     /* down */
    printf("\n== weight formats: one mixtral-8x7b MoE layer's expert GEMVs "
           "(gate|up, SwiGLU, down)\n");
    printf("  %-26s %9s %10s %8s %10s\n", "format / batch", "ms/layer",
           "limit ms", "of limit", "GB read");
    for (int f = 0; f < 7; f++) {
        int    f8 = f == 1 || f >= 5;               /* e4m3 weights */
        size_t bpw2 = f == 0 ? 4 : f8 ? 2 : 1;      /* bytes per weight x2 */

        /* weights: bf16 random; fp8 NaN-free bytes; 4-bit any bits */
        if (f == 0) {
            moe_cuda_fill_random_bf16((moe_bf16_t *) wbuf, (int64_t) nw, 7,
                                      0.02f, 0);
        } else {
            k_bench_bytes<<<4096, 256>>>(wbuf, nw * bpw2 / 2, 7u,
                                         f8 ? 0xf7 : 0xff);
        }
        /* scales: fp8 per-channel (or 128x128 block: fewer) fp32
         * 1/448-ish; 4-bit fp16 0.01; zeros: any nibbles */
        if (f8) {
            moe_cuda_fill_random_f32((float *) sbuf, (int64_t) E * 2 * F, 8,
                                     1e-4f, 2e-3f, 0);
        } else {
            k_bench_u16<<<1024, 256>>>((uint16_t *) sbuf,
                                       (size_t) E * 2 * F * (F / G),
                                       0x211f);
            k_bench_bytes<<<1024, 256>>>(zbuf, (size_t) E * 2 * F * (F / G)
                                               / 2, 9u, 0xff);
        }
        for (int bi = 0; bi < 2; bi++) {
            int    B = batches[bi], n = 2 * B, hit = B == 1 ? 2 : E;
            double ms, bytes, lim;

            for (int e = 0; e <= E; e++) {
                hoffs[e] = B == 1 ? (e == 0 ? 0 : e == 1 ? 1 : 2)
                                  : e * n / E;
            }
            for (int r = 0; r < n; r++) {
                hxrow[r] = r;                   /* xdiv 2: token r / 2 */
            }
            cudaMemcpy(offs, hoffs, sizeof(hoffs), cudaMemcpyHostToDevice);
            cudaMemcpy(xrow, hxrow, sizeof(hxrow), cudaMemcpyHostToDevice);

            auto run = [&]() -> int {
                if (f == 0) {
                    const moe_bf16_t *W = (const moe_bf16_t *) wbuf;

                    if (moe_cuda_gemv(x, D, xrow, 2, W, F, D, offs, E, n,
                                      B == 1 ? 1 : 16, 1, NULL, h, F, NULL,
                                      0) != 0)
                    {
                        return -1;
                    }
                    return moe_cuda_gemv(h, F, NULL, 1, W + E * w13, D, F,
                                         offs, E, n, B == 1 ? 1 : 16, 0, y,
                                         NULL, D, NULL, 0);
                }
                if (f == 1) {
                    const float *sc = (const float *) sbuf;

                    if (moe_cuda_qgemv_fp8(x, D, xrow, 2, wbuf, sc,
                                           MOE_K_FP8_CHANNEL, 0, 2 * F, D,
                                           offs, E, n, gu, 2 * F, 0) != 0
                        || moe_cuda_silu_mul(gu, n, F, h, 0) != 0)
                    {
                        return -1;
                    }
                    return moe_cuda_qgemv_fp8(h, F, NULL, 1,
                                              wbuf + E * w13, sc,
                                              MOE_K_FP8_CHANNEL, 0, D, F,
                                              offs, E, n, y, D, 0);
                }
                if (f >= 5) {
                    /* the tensor-core fp8 kernels: GEMV with SwiGLU fused
                     * at batch 1, grouped GEMM at batch 64 (16 rows per
                     * expert: the backend's ggemm range) */
                    const float *sc = (const float *) sbuf;
                    int          md = f == 5 ? MOE_K_FP8_CHANNEL
                                             : MOE_K_FP8_BLOCK;

                    if (B == 1) {
                        if (moe_cuda_gemv_fp8(x, D, xrow, 2, wbuf, sc, md, F,
                                              D, offs, E, n, 1, 1, NULL, h,
                                              F, NULL, 0) != 0)
                        {
                            return -1;
                        }
                        return moe_cuda_gemv_fp8(h, F, NULL, 1,
                                                 wbuf + E * w13, sc, md, D,
                                                 F, offs, E, n, 1, 0, y,
                                                 NULL, D, NULL, 0);
                    }
                    if (moe_cuda_ggemm_fp8(x, D, xrow, 2, wbuf, sc, md, F, D,
                                           offs, E, n, 1, NULL, h, F, 0)
                        != 0)
                    {
                        return -1;
                    }
                    return moe_cuda_ggemm_fp8(h, F, NULL, 1, wbuf + E * w13,
                                              sc, md, D, F, offs, E, n, 0, y,
                                              NULL, D, 0);
                }
                int             fmt = f == 2 ? MOE_K_Q4_AWQ : MOE_K_Q4_GPTQ;
                const int32_t  *gi = f == 4 ? gidx : NULL;
                const int32_t  *qw = (const int32_t *) wbuf;
                const int32_t  *qz = (const int32_t *) zbuf;
                const uint16_t *sc = (const uint16_t *) sbuf;

                /* SwiGLU fused where the tensor-core kernel applies
                 * (gu: the fallback's fp32 scratch) */
                if (moe_cuda_qgemv_q4_silu(fmt, x, D, xrow, 2, qw, qz, sc,
                                           gi, G, 1, 2 * F, D, offs, E, n,
                                           0, gu, h, 0) != 0)
                {
                    return -1;
                }
                return moe_cuda_qgemv_q4(fmt, h, F, NULL, 1,
                                         qw + E * w13 / 8, qz, sc,
                                         gi != NULL ? gi + E * D : NULL, G,
                                         1, D, F, offs, E, n, y, D, 0);
            };
            ms = bench_time(run, 20);
            if (ms < 0) {
                printf("FAIL quant bench %s batch %d: %s\n", fmts[f], B,
                       moe_cuda_last_error());
                rc = -1;
                continue;
            }
            /* weights of the experts hit + their scales (+ zeros) */
            bytes = (double) hit * (w13 + w2) * bpw2 / 2;
            if (f == 1 || f == 5) {
                bytes += (double) hit * (2 * F + D) * 4;
            } else if (f == 6) {
                bytes += (double) hit * ((2 * F / 128) * (D / 128)
                                         + (D / 128) * (F / 128)) * 4;
            } else if (f > 1) {
                bytes += (double) hit * (w13 + w2) / G * (2 + 0.5);
            }
            lim = bytes / (copy_gbs * 1e9) * 1e3;
            printf("  %-15s batch %-4d %9.3f %10.3f %7.0f%% %10.3f\n",
                   fmts[f], B, ms, lim, 100 * lim / ms, bytes / 1e9);
            printf("RESULT kind=quant_experts format=%s batch=%d "
                   "ms_layer=%.4f limit_ms=%.4f of_limit=%.3f\n", fmts[f], B,
                   ms, lim, lim / ms);
        }
    }
    cudaFree(wbuf);
    cudaFree(sbuf);
    cudaFree(zbuf);
    cudaFree(x);
    cudaFree(h);
    cudaFree(y);
    cudaFree(gu);
    cudaFree(offs);
    cudaFree(xrow);
    cudaFree(gidx);
    return rc;
}


/*
 * Part 4: decode attention of one layer (32 q heads, 8 kv heads, head_dim
 * 128), every sequence its own pages (16 tokens each).
 */
static int
bench_attention(void)
{
    const int    NH = 32, NKV = 8, HD = 128, LDQ = (NH + 2 * NKV) * HD;
    static const int ctxs[3] = { 512, 8192, 32768 };
    static const int batches[2] = { 1, 64 };
    const size_t tok_bytes = (size_t) 2 * NKV * HD * 2;      /* bf16 K+V */
    size_t       kv_bytes = (size_t) 64 * 32768 * tok_bytes;
    uint8_t     *kv;
    float       *q, *part;
    moe_bf16_t  *out;
    int32_t     *pos, *seq, *bt, *off;
    int          rc = 0;
    int64_t      wsf = moe_cuda_attention_ws_floats(NH, NKV, HD);

    if (cudaMalloc(&kv, kv_bytes) != cudaSuccess
        || cudaMalloc(&q, (size_t) 64 * LDQ * 4) != cudaSuccess
        || cudaMalloc(&out, (size_t) 64 * NH * HD * 2) != cudaSuccess
        || cudaMalloc(&part, (size_t) wsf * 4) != cudaSuccess
        || cudaMalloc(&pos, 64 * 4) != cudaSuccess
        || cudaMalloc(&seq, 64 * 4) != cudaSuccess
        || cudaMalloc(&off, 64 * 4) != cudaSuccess
        || cudaMalloc(&bt, (size_t) 64 * (32768 / BS) * 4) != cudaSuccess)
    {
        printf("SKIP attention bench: cudaMalloc of %.1f GB\n",
               kv_bytes / 1e9);
        return 0;
    }
    moe_cuda_fill_random_f32(q, (int64_t) 64 * LDQ, 11, 1.0f, 0.0f, 0);
    moe_cuda_attention_ws_init(part, 0);
    printf("\n== decode attention, one layer (32/8 heads, head_dim 128)\n");
    printf("  %-39s %10s %10s %8s\n", "ctx / batch / cache / grid / kernel",
           "ms", "limit ms", "of limit");
    for (int kvf = 0; kvf < 2; kvf++) {
        if (kvf == 0) {
            moe_cuda_fill_random_bf16((moe_bf16_t *) kv,
                                      (int64_t) (kv_bytes / 2), 12, 1.0f, 0);
        } else {
            k_bench_bytes<<<4096, 256>>>(kv, kv_bytes / 2, 13u, 0xb7);
        }
        for (int ci = 0; ci < 3; ci++) {
            for (int bi = 0; bi < 2; bi++) {
                int     ctx = ctxs[ci], B = batches[bi];
                int     per = (ctx + BS - 1) / BS;
                int32_t hp[64], hs[64], ho[64];
                int32_t *hbt = (int32_t *) malloc((size_t) B * per * 4);

                if (!bench_wanted("BENCH_CTX", ctx)) {
                    free(hbt);
                    continue;
                }
                for (int i = 0; i < B; i++) {
                    hp[i] = ctx - 1;
                    hs[i] = i;
                    ho[i] = i * per;
                }
                for (int i = 0; i < B * per; i++) {
                    hbt[i] = i;                 /* distinct pages */
                }
                cudaMemcpy(pos, hp, (size_t) B * 4, cudaMemcpyHostToDevice);
                cudaMemcpy(seq, hs, (size_t) B * 4, cudaMemcpyHostToDevice);
                cudaMemcpy(off, ho, (size_t) B * 4, cudaMemcpyHostToDevice);
                cudaMemcpy(bt, hbt, (size_t) B * per * 4,
                           cudaMemcpyHostToDevice);
                free(hbt);
                for (int gk = 0; gk < 4; gk++) {
                    int               grid = gk >> 1, tc = !(gk & 1);
                    moe_cuda_att_kv_t o = { kvf, 1.0f, 1.0f,
                                            grid ? ctx : 0, 0 };
                    moe_cuda_tuning_t tr = MOE_CUDA_TUNING_DEFAULTS;
                    double            ms, lim;

                    tr.att_decode_tc = tc;
                    ms = bench_time([&]() -> int {
                        return moe_cuda_attention_ex(q, LDQ, B, pos, seq, bt,
                                                     off, kv, BS, NH, NKV,
                                                     HD, 0, out, part, &o,
                                                     &tr, 0);
                    }, 20);
                    if (ms < 0) {
                        printf("FAIL attention bench: %s\n",
                               moe_cuda_last_error());
                        rc = -1;
                        continue;
                    }
                    lim = (double) B * ctx * tok_bytes / (kvf ? 2 : 1)
                          / (copy_gbs * 1e9) * 1e3;
                    printf("  ctx %-6d batch %-3d %-4s %-7s %-4s %10.4f "
                           "%10.4f %7.0f%%\n", ctx, B, kvf ? "fp8" : "bf16",
                           grid ? "long" : "default", tc ? "tc" : "simt",
                           ms, lim, 100 * lim / ms);
                    printf("RESULT kind=attention ctx=%d batch=%d kv=%s "
                           "grid=%s kernel=%s ms=%.4f limit_ms=%.4f "
                           "of_limit=%.3f\n", ctx, B, kvf ? "fp8" : "bf16",
                           grid ? "long" : "default", tc ? "tc" : "simt",
                           ms, lim, lim / ms);
                }
            }
        }
    }
    cudaFree(kv);
    cudaFree(q);
    cudaFree(out);
    cudaFree(part);
    cudaFree(pos);
    cudaFree(seq);
    cudaFree(off);
    cudaFree(bt);
    return rc;
}


int
main(int argc, char **argv)
{
    const char *want = NULL, *kvdt = "auto";
    int         fails = 0, ndev = moe_cuda_device_count();
    double      t0 = now_s();

    /* line-buffered: a run killed by its time limit keeps its lines */
    setvbuf(stdout, NULL, _IOLBF, 0);
    if (getenv("BENCH_TP") != NULL) {
        opt_tp = atoi(getenv("BENCH_TP"));
    }
    if (getenv("BENCH_EP") != NULL) {
        opt_ep = atoi(getenv("BENCH_EP")) != 0;
    }
    if (getenv("BENCH_NCCL") != NULL) {
        opt_nccl = getenv("BENCH_NCCL");
    }
    if (getenv("BENCH_WEIGHTS") != NULL) {
        opt_wfmt = moe_qw_format_by_name(getenv("BENCH_WEIGHTS"));
    }
    if (getenv("BENCH_KV_DTYPE") != NULL) {
        kvdt = getenv("BENCH_KV_DTYPE");
    }
    for (int i = 1; i < argc; i++) {
        if (strcmp(argv[i], "--tp") == 0 && i + 1 < argc) {
            opt_tp = atoi(argv[++i]);
        } else if (strcmp(argv[i], "--ep") == 0) {
            opt_ep = 1;
        } else if (strcmp(argv[i], "--nccl") == 0 && i + 1 < argc) {
            opt_nccl = argv[++i];
        } else if (strcmp(argv[i], "--weights") == 0 && i + 1 < argc) {
            opt_wfmt = moe_qw_format_by_name(argv[++i]);
        } else if (strcmp(argv[i], "--kv-cache-dtype") == 0 && i + 1 < argc) {
            kvdt = argv[++i];
        } else {
            want = argv[i];
        }
    }
    if (opt_tp < 1 || opt_tp > 64) {
        printf("FAIL --tp %d: 1..64\n", opt_tp);
        return 2;
    }
    if (opt_wfmt < 0) {
        printf("FAIL --weights / BENCH_WEIGHTS: bf16, fp8, awq or gptq\n");
        return 2;
    }
    if (strcmp(kvdt, "fp8") == 0 || strcmp(kvdt, "fp8_e4m3") == 0) {
        opt_kvfp8 = 1;
    } else if (strcmp(kvdt, "auto") != 0 && strcmp(kvdt, "bf16") != 0) {
        printf("FAIL --kv-cache-dtype / BENCH_KV_DTYPE '%s': auto or fp8\n",
               kvdt);
        return 2;
    }
    printf("tensor parallel %d%s, nccl %s (this build: %s), weights %s, KV "
           "cache %s\n", opt_tp, opt_ep ? ", expert parallel" : "",
           opt_nccl, moe_cuda_nccl_available() ? "with NCCL"
                                               : "without NCCL",
           moe_qw_format_name(opt_wfmt), opt_kvfp8 ? "fp8 (e4m3)" : "bf16");

    if (ndev == 0) {
        printf("SKIP no CUDA device\n");
        return 0;
    }
    {
        cudaDeviceProp p;

        if (cudaGetDeviceProperties(&p, 0) == cudaSuccess) {
            printf("device 0: %s, %d SMs, %.1f GiB\n", p.name,
                   p.multiProcessorCount, p.totalGlobalMem / 1073741824.0);
        }
    }
    if (bench_ceilings() != 0) {
        return 1;
    }
    for (size_t i = 0; i < sizeof(shapes) / sizeof(shapes[0]); i++) {
        if (want != NULL && strstr(want, shapes[i].name) == NULL) {
            continue;
        }
        fails += bench_model(&shapes[i]) != 0;
    }
    if (bench_wanted("BENCH_QUANT", 1)) {
        fails += bench_quant() != 0;
    }
    if (bench_wanted("BENCH_ATT", 1)) {
        fails += bench_attention() != 0;
    }
    printf("\nbench total %.1f s, %d failure(s)\n", now_s() - t0, fails);
    return fails ? 1 : 0;
}
