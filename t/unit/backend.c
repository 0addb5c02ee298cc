/*
 * Checks the backend factory (engine/backends/backend.c) on the CPU and
 * models/localmoe-tiny (run from the repository root or via MOE_SRCDIR):
 *  - moe_backend_load_model: backend "cpu" gives the CPU kind and a model
 *    with fp32 weights; where "auto" finds no usable GPU, "cuda" is
 *    refused naming the configuration file, and so is load_format dummy;
 *  - moe_backend_create, KV sizing: kv_cache_blocks is taken as given
 *    (n_kv_blocks), a pool smaller than one max_model_len sequence is
 *    refused by name, and 0 sizes the pool to max_num_seqs sequences of
 *    max_model_len (the tiny model fits in a quarter of any host);
 *  - swap space: swap_space 0 gives no slots, a large swap_space is capped
 *    at max_num_seqs sequences of max_model_len;
 *  - rank placement: tensor_parallel_size 2 runs one CPU rank unless
 *    cpu_tensor_parallel, then two ranks whose KV bytes per block add up
 *    to the unsharded backend's; a tp that does not divide the kv heads
 *    is refused (MOE_EUNSUPPORTED, "must divide");
 *  - the backend a factory made steps and gives the logits of a CPU
 *    backend made directly (same model, same tokens: bit for bit);
 *  - with CUDA built in: moe_cuda_device_runnable (what "auto" asks
 *    before it takes the GPU, and the cuda backend before it starts)
 *    refuses devices -1 and past the last one, naming them, and on device
 *    0 answers 1 where a GPU is visible (the device tests run on
 *    H100 / H200) and 0 naming "no CUDA device 0" where none is; a
 *    non-Hopper GPU (its refusal, "compute capability", and "auto"
 *    serving from the CPU) is not available to test.
 */

#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "moe.h"
#include "backends/backend.h"
#ifdef MOE_HAVE_CUDA
#include "backends/cuda_backend.h"
#endif
#include "tap.h"

#define BS  4


static void
opts_init(moe_backend_opts_t *o, const char *backend)
{
    memset(o, 0, sizeof(*o));
    o->file = "test.yaml";
    o->backend = backend;
    o->tensor_parallel_size = 1;
    o->cpu_threads = 1;
    o->gpu_memory_utilization = 0.9;
    o->block_size = BS;
    o->max_model_len = 64;           /* 16 blocks per sequence */
    o->max_num_seqs = 3;
    o->max_num_batched_tokens = 256;
}


static int
step(moe_backend_t *b, float *logits)
{
    static const int32_t toks[5] = { 11, 200, 37, 5, 499 };
    static const int32_t table[2] = { 1, 0 };
    moe_seq_batch_t      sb;

    memset(&sb, 0, sizeof(sb));
    sb.tokens = toks;
    sb.n_tokens = 5;
    sb.block_table = table;
    sb.n_blocks = 2;
    sb.logits = logits;
    return b->forward(b, &sb, 1);
}


int
main(void)
{
    char                dir[PATH_MAX], err[512];
    const char         *src = getenv("MOE_SRCDIR");
    moe_backend_opts_t  o;
    moe_backend_kind_t  kind = 0, auto_kind = 0;
    moe_model_t        *m = NULL, *m2 = NULL;
    moe_backend_t      *b = NULL, *ref = NULL;
    int64_t             one_rank_bytes;
    float              *l1, *l2;
    int                 rc, V;

#ifdef MOE_HAVE_CUDA
    TAP_PLAN(20);
#else
    TAP_PLAN(17);
#endif

    snprintf(dir, sizeof(dir), "%s/models/localmoe-tiny",
             src != NULL ? src : ".");

    /* the choice and the load */
    opts_init(&o, "cpu");
    rc = moe_backend_load_model(&o, dir, 0, &kind, &m, err, sizeof(err));
    TAP_OK(rc == MOE_OK && kind == MOE_BACKEND_CPU && m != NULL
           && moe_model_weights(m)->embed != NULL,
           "backend cpu: cpu kind, fp32 weights loaded (%s)",
           rc == MOE_OK ? "ok" : err);
    if (rc != MOE_OK) {
        return 1;
    }
    V = moe_model_hparams(m)->vocab_size;

    opts_init(&o, "auto");
    rc = moe_backend_load_model(&o, dir, 0, &auto_kind, &m2, err,
                                sizeof(err));
    TAP_OK(rc == MOE_OK && (auto_kind == MOE_BACKEND_CPU
                            || auto_kind == MOE_BACKEND_CUDA),
           "backend auto: loads (%s)",
           auto_kind == MOE_BACKEND_CUDA ? "cuda" : "cpu");
    moe_model_free(m2);
    m2 = NULL;

    if (auto_kind == MOE_BACKEND_CPU) {
        opts_init(&o, "cuda");
        rc = moe_backend_load_model(&o, dir, 0, &kind, &m2, err,
                                    sizeof(err));
        TAP_OK(rc == MOE_EUNSUPPORTED && m2 == NULL
               && strstr(err, "test.yaml: backend 'cuda' requested") != NULL,
               "backend cuda without a GPU: refused (%s)", err);
        opts_init(&o, "auto");
        o.dummy = 1;
        rc = moe_backend_load_model(&o, dir, 0, &kind, &m2, err,
                                    sizeof(err));
        TAP_OK(rc == MOE_EUNSUPPORTED && m2 == NULL
               && strstr(err, "'dummy' needs the cuda backend") != NULL,
               "load_format dummy without a GPU: refused (%s)", err);
    } else {
        TAP_OK(1, "# SKIP a GPU is visible: cuda is not refused");
        TAP_OK(1, "# SKIP a GPU is visible: dummy is not refused");
    }

#ifdef MOE_HAVE_CUDA
    {
        char why[256];
        int  n = moe_cuda_device_count(), ok;

        strcpy(why, "x");
        ok = moe_cuda_device_runnable(-1, why, sizeof(why));
        TAP_OK(ok == 0 && strstr(why, "no CUDA device -1") != NULL,
               "device -1: not runnable (%s)", why);
        ok = moe_cuda_device_runnable(n, why, sizeof(why));
        TAP_OK(ok == 0 && strstr(why, "no CUDA device") != NULL
               && moe_cuda_device_runnable(n, NULL, 0) == 0,
               "device %d (one past the last): not runnable (%s)", n, why);
        ok = moe_cuda_device_runnable(0, why, sizeof(why));
        TAP_OK(n > 0 ? ok == 1 && why[0] == '\0'
                     : ok == 0 && strstr(why, "no CUDA device 0") != NULL,
               "device 0 with %d visible: %s (%s)", n,
               ok ? "runnable" : "not runnable", why);
    }
#endif

    /* KV sizing */
    opts_init(&o, "cpu");
    o.kv_cache_blocks = 40;
    rc = moe_backend_create(&o, MOE_BACKEND_CPU, m, &b, err, sizeof(err));
    TAP_OK(rc == MOE_OK && b->n_kv_blocks == 40
           && strcmp(b->name, "cpu") == 0 && b->n_swap_slots == 0,
           "kv_cache_blocks 40: a cpu backend of 40 blocks, no swap slots "
           "(%s)", rc == MOE_OK ? "ok" : err);
    if (rc == MOE_OK) {
        one_rank_bytes = b->kv_bytes_per_block;
        TAP_OK(moe_tp_backend_rank(b, 1) == NULL,
               "tensor_parallel_size 1: one rank");
        b->destroy(b);
        b = NULL;
    } else {
        return 1;
    }

    o.kv_cache_blocks = 15;
    rc = moe_backend_create(&o, MOE_BACKEND_CPU, m, &b, err, sizeof(err));
    TAP_OK(rc == MOE_EINVAL && b == NULL
           && strstr(err, "fewer than one max_model_len (64) sequence "
                          "needs (16)") != NULL,
           "15 blocks for a 16-block sequence: refused (%s)", err);

    o.kv_cache_blocks = 0;
    rc = moe_backend_create(&o, MOE_BACKEND_CPU, m, &b, err, sizeof(err));
    TAP_OK(rc == MOE_OK && b->n_kv_blocks == 3 * 16,
           "kv_cache_blocks 0: max_num_seqs 3 sequences of 16 blocks (%d)",
           rc == MOE_OK ? b->n_kv_blocks : -1);
    if (b != NULL) {
        b->destroy(b);
        b = NULL;
    }

    /* swap space: 1 GiB is far more than 48 blocks of the tiny model */
    o.swap_space = 1.0;
    rc = moe_backend_create(&o, MOE_BACKEND_CPU, m, &b, err, sizeof(err));
    TAP_OK(rc == MOE_OK && b->n_swap_slots == 3 * 16,
           "swap_space 1 GiB: capped at 48 slots (%d)",
           rc == MOE_OK ? b->n_swap_slots : -1);
    if (b != NULL) {
        b->destroy(b);
        b = NULL;
    }
    o.swap_space = 0;

    /* rank placement */
    o.kv_cache_blocks = 40;
    o.tensor_parallel_size = 2;
    rc = moe_backend_create(&o, MOE_BACKEND_CPU, m, &b, err, sizeof(err));
    TAP_OK(rc == MOE_OK && moe_tp_backend_rank(b, 1) == NULL,
           "tensor_parallel_size 2 without cpu_tensor_parallel: one rank");
    if (b != NULL) {
        b->destroy(b);
        b = NULL;
    }
    o.cpu_tensor_parallel = 1;
    rc = moe_backend_create(&o, MOE_BACKEND_CPU, m, &b, err, sizeof(err));
    TAP_OK(rc == MOE_OK && moe_tp_backend_rank(b, 1) != NULL
           && moe_tp_backend_rank(b, 2) == NULL && b->n_kv_blocks == 40
           && b->kv_bytes_per_block == one_rank_bytes,
           "cpu_tensor_parallel: 2 ranks, 40 blocks, KV bytes per block "
           "of the ranks add up to one rank's (%lld, %lld)",
           rc == MOE_OK ? (long long) b->kv_bytes_per_block : -1LL,
           (long long) one_rank_bytes);

    /* the factory's backend computes what a directly made one does */
    l1 = malloc(sizeof(float) * (size_t) V);
    l2 = malloc(sizeof(float) * (size_t) V);
    if (b != NULL) {
        b->destroy(b);
        b = NULL;
    }
    o.tensor_parallel_size = 1;
    o.cpu_tensor_parallel = 0;
    rc = moe_backend_create(&o, MOE_BACKEND_CPU, m, &b, err, sizeof(err));
    TAP_OK(rc == MOE_OK
           && moe_cpu_backend_create(m, 40, BS, 1, &ref, err, sizeof(err))
              == MOE_OK
           && l1 != NULL && l2 != NULL,
           "factory and direct cpu backends made (%s)",
           rc == MOE_OK ? "ok" : err);
    if (b != NULL && ref != NULL && l1 != NULL && l2 != NULL) {
        TAP_OK(step(b, l1) == MOE_OK && step(ref, l2) == MOE_OK
               && memcmp(l1, l2, sizeof(float) * (size_t) V) == 0,
               "the factory's backend: the direct backend's logits, bit "
               "for bit");
    } else {
        TAP_OK(0, "no backends to compare");
    }
    if (b != NULL) {
        b->destroy(b);
        b = NULL;
    }
    if (ref != NULL) {
        ref->destroy(ref);
    }
    free(l1);
    free(l2);

    o.tensor_parallel_size = 4;
    o.cpu_tensor_parallel = 1;
    rc = moe_backend_create(&o, MOE_BACKEND_CPU, m, &b, err, sizeof(err));
    TAP_OK(rc == MOE_EUNSUPPORTED && b == NULL
           && strstr(err, "must divide") != NULL,
           "tensor_parallel_size 4 over 2 kv heads: refused (%s)", err);

    /* ranks of a kind this build or machine cannot make */
    {
        moe_ranks_t p;

        memset(&p, 0, sizeof(p));
        p.kind = (moe_backend_kind_t) 0;
        p.n_blocks = 4;
        p.block_size = BS;
        rc = moe_backend_create_ranks(m, &p, &b, err, sizeof(err));
        TAP_OK(rc == MOE_EINVAL && b == NULL,
               "ranks of no kind: refused (%s)", err);
        p.kind = MOE_BACKEND_CPU;
        p.tp = 65;
        rc = moe_backend_create_ranks(m, &p, &b, err, sizeof(err));
        TAP_OK(rc == MOE_EINVAL && b == NULL && strstr(err, "at most 64"),
               "65 ranks: refused (%s)", err);
        p.tp = 2;
        rc = moe_backend_create_ranks(m, &p, &b, err, sizeof(err));
        TAP_OK(rc == MOE_OK && b->n_kv_blocks == 4
               && moe_tp_backend_rank(b, 1) != NULL,
               "2 cpu ranks of 4 blocks (%s)", rc == MOE_OK ? "ok" : err);
        if (b != NULL) {
            b->destroy(b);
        }
    }

    moe_model_free(m);
    return TAP_DONE();
}
