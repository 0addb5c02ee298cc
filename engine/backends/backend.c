/*
 * The backend factory.
 *
 * The engine asks for a backend in two calls: moe_backend_load_model
 * (which backend, and the model loaded the way that backend reads it),
 * then moe_backend_create (the CUDA-cannot-run-this fallback, where the
 * tensor-parallel ranks go, how many KV blocks and swap slots).  Ranks of
 * either kind are made here and composed by tp.c.  This is the only file
 * outside the CUDA backend itself that knows whether the build has CUDA
 * (MOE_HAVE_CUDA).
 */

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "backends/backend.h"
#ifdef MOE_HAVE_CUDA
#include "backends/cuda_backend.h"
#include "backends/qweights.h"
#endif


/* ------------------------------------------------------------- choice */

static int
be_is(const moe_backend_opts_t *o, const char *name)
{
    return o->backend != NULL && strcmp(o->backend, name) == 0;
}


static const char *
be_file(const moe_backend_opts_t *o)
{
    return o->file != NULL && o->file[0] != '\0' ? o->file : "config";
}


static double
be_now(void)
{
    struct timespec ts;

    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double) ts.tv_sec + (double) ts.tv_nsec * 1e-9;
}


int
moe_backend_load_model(const moe_backend_opts_t *o, const char *dir,
    int top_k_override, moe_backend_kind_t *kind, moe_model_t **out,
    char *err, size_t errlen)
{
    moe_backend_kind_t  k = MOE_BACKEND_CPU;
    double              t0;
    int                 rc;

    *out = NULL;
#ifdef MOE_HAVE_CUDA
    if (!be_is(o, "cpu") && moe_cuda_device_count() > 0) {
        char why[256];

        if (moe_cuda_device_runnable(0, why, sizeof(why))) {
            k = MOE_BACKEND_CUDA;
        } else if (be_is(o, "cuda")) {
            moe_errf(err, errlen, "%s: backend 'cuda' requested, but %s",
                     be_file(o), why);
            return MOE_EUNSUPPORTED;
        } else {
            moe_log(MOE_LOG_WARN, "%s; serving from the cpu backend", why);
        }
    }
#endif
    if (be_is(o, "cuda") && k != MOE_BACKEND_CUDA) {
#ifdef MOE_HAVE_CUDA
        moe_errf(err, errlen, "%s: backend 'cuda' requested, but no CUDA "
                 "device is visible", be_file(o));
#else
        moe_errf(err, errlen, "%s: backend 'cuda' requested, but this "
                 "build has no CUDA support (built with MOE_CUDA=0 or "
                 "without nvcc)", be_file(o));
#endif
        return MOE_EUNSUPPORTED;
    }

    /* load_format "dummy" (vLLM's): config.json only, random weights made
     * on the GPU; for benchmarks of real shapes without the files */
    if (o->dummy && k != MOE_BACKEND_CUDA) {
        moe_errf(err, errlen, "%s: load_format 'dummy' needs the cuda "
                 "backend (random weights are made on the GPU)", be_file(o));
        return MOE_EUNSUPPORTED;
    }

    moe_log(MOE_LOG_INFO, "loading model from %s", dir);
    t0 = be_now();
    /* the cuda backend reads the mapped files itself: no fp32 host copy
     * (a real model's fp32 copy does not fit in host memory) */
    if (o->dummy) {
        rc = moe_model_load_config(dir, top_k_override > 0
                                   ? top_k_override : 0, out, err, errlen);
    } else {
        /* quantized checkpoints and vLLM's `quantization` (model/quant.h) */
        rc = moe_model_load_quant(dir, top_k_override > 0
                                  ? top_k_override : 0, o->quantization,
                                  k == MOE_BACKEND_CUDA, out, err, errlen);
    }
    if (rc != MOE_OK) {
        return rc;
    }
    if (!o->dummy && moe_model_quant(*out)->method != MOE_QM_NONE) {
        /* quantized checkpoints (model/quant.h) */
        moe_log(MOE_LOG_INFO, "model %s: quantization %s%s (%d-bit "
                "weights)", dir, moe_model_quant(*out)->name,
                moe_model_quant(*out)->method == MOE_QM_FP8_LOAD
                ? " at load, per channel" : "", moe_model_quant(*out)->bits);
    }
    if (!o->dummy) {
        moe_log(MOE_LOG_INFO, "model %s: %.2f GB of weights in the files, "
                "%s in %.2f s", dir,
                (double) moe_model_weight_bytes(*out) / 1e9,
                k == MOE_BACKEND_CUDA ? "mapped and checked"
                                      : "converted to fp32 host memory",
                be_now() - t0);
    }
    *kind = k;
    return MOE_OK;
}


/* ------------------------------------------------------------- ranks */

static void
be_free_ranks(moe_backend_t **ranks, moe_model_t **shards, int tp)
{
    int r;

    for (r = 0; r < tp; r++) {
        if (ranks[r] != NULL) {
            ranks[r]->destroy(ranks[r]);
        }
        if (shards != NULL) {
            moe_model_free(shards[r]);
        }
    }
}


#ifdef MOE_HAVE_CUDA
/*
 * NCCL or the local (peer-access) sum for CUDA ranks on devs: NCCL cannot
 * place two ranks on one GPU, so the emulated placement keeps the local
 * sum; distinct devices use NCCL when this build has it (auto) or must
 * (on).
 */
static int
be_nccl_choice(int mode, const int *devs, int tp, int *use, char *err,
    size_t errlen)
{
    int i, j, distinct = 1;

    for (i = 0; i < tp; i++) {
        for (j = 0; j < i; j++) {
            distinct &= devs[i] != devs[j];
        }
    }
    *use = 0;
    if (mode == MOE_NCCL_OFF) {
        return MOE_OK;
    }
    if (mode == MOE_NCCL_ON && !moe_cuda_nccl_available()) {
        moe_errf(err, errlen, "%s", "nccl: on, but this build has no NCCL "
                 "(nccl.h and libnccl were not found; README, NCCL)");
        return MOE_EUNSUPPORTED;
    }
    if (mode == MOE_NCCL_ON && !distinct) {
        moe_errf(err, errlen, "%s", "nccl: on, but several ranks share a "
                 "GPU (NCCL cannot place two ranks on one device; "
                 "nccl: auto sums them locally)");
        return MOE_EUNSUPPORTED;
    }
    *use = distinct && moe_cuda_nccl_available();
    return MOE_OK;
}
#endif


/* ------------------------------------------------- KV cache dtype */

/*
 * The fp8 KV cache's scales of every layer into p (kv_cache_dtype fp8):
 * the YAML's kv_cache_scale_k / _v where set, else the checkpoint's
 * (moe_model_kv_scales), else 1.0 (vLLM's order).  The checkpoint's
 * malformed scales fail (their status, reason in err naming o->file)
 * only when an fp8 cache would use them.
 */
static int
be_kv_scales(const moe_backend_opts_t *o, const moe_model_t *m,
    moe_ranks_t *p, char *err, size_t errlen)
{
    const moe_hparams_t *hp = moe_model_hparams(m);
    float                ck[MOE_MAX_LAYERS], cv[MOE_MAX_LAYERS];
    char                 why[384];
    int                  l, has;

    has = moe_model_kv_scales(m, ck, cv, why, sizeof(why));
    p->kv_fp8 = o->kv_fp8;
    if (has < 0) {
        if (o->kv_fp8 && !(o->kv_k_scale > 0.0f && o->kv_v_scale > 0.0f)) {
            moe_errf(err, errlen, "%s: kv_cache_dtype fp8: the checkpoint's "
                     "KV cache scales: %s", be_file(o), why);
            return has;
        }
        has = 0;
    }
    for (l = 0; l < hp->n_layers; l++) {
        p->kv_ks[l] = o->kv_k_scale > 0.0f ? o->kv_k_scale
                                           : has ? ck[l] : 1.0f;
        p->kv_vs[l] = o->kv_v_scale > 0.0f ? o->kv_v_scale
                                           : has ? cv[l] : 1.0f;
    }
    if (!o->kv_fp8) {
        return MOE_OK;
    }
    moe_log(MOE_LOG_INFO, "fp8 KV cache: K scale %s, V scale %s (layer 0: "
            "k %g, v %g)", o->kv_k_scale > 0.0f ? "from the configuration"
                           : has ? "from the checkpoint, per layer"
                                 : "1.0 (the checkpoint has none)",
            o->kv_v_scale > 0.0f ? "from the configuration"
            : has ? "from the checkpoint, per layer"
                  : "1.0 (the checkpoint has none)",
            (double) p->kv_ks[0], (double) p->kv_vs[0]);
    return MOE_OK;
}


/*
 * After creating one CPU backend (rank) *b with status rc: the fp8 KV
 * cache when p asks for it (kv_cache_dtype fp8), the backend destroyed
 * on failure.  Returns the status.  (A CUDA backend is created with its
 * KV element, be_cuda_kv: its pool's bytes depend on it.)
 */
static int
be_cpu_kv_fp8(const moe_ranks_t *p, moe_backend_t **b, int rc, char *err,
    size_t errlen)
{
    if (rc != MOE_OK || !p->kv_fp8 || *b == NULL) {
        return rc;
    }
    rc = moe_cpu_backend_set_kv_fp8(*b, p->kv_ks, p->kv_vs, err, errlen);
    if (rc != MOE_OK) {
        (*b)->destroy(*b);
        *b = NULL;
    }
    return rc;
}


#ifdef MOE_HAVE_CUDA
/* The CUDA backend's KV element as p asks for it. */
static moe_cuda_kv_t
be_cuda_kv(const moe_ranks_t *p)
{
    moe_cuda_kv_t kv;

    kv.fp8 = p->kv_fp8;
    kv.k_scales = p->kv_ks;
    kv.v_scales = p->kv_vs;
    return kv;
}
#endif


int
moe_backend_create_ranks(const moe_model_t *m, const moe_ranks_t *p,
    moe_backend_t **out, char *err, size_t errlen)
{
    moe_backend_t      **ranks;
    moe_model_t        **shards = NULL;
    void               **ctx;
    const moe_tp_ops_t  *ops = &moe_tp_host_ops;
    void               (*set_reduce)(moe_backend_t *, moe_reduce_fn,
                                     void *) = moe_cpu_backend_set_reduce;
    int                  r, rc = MOE_OK, tp = p->tp > 1 ? p->tp : 1, per;

    *out = NULL;
    if (m == NULL || (p->kind != MOE_BACKEND_CPU
                      && p->kind != MOE_BACKEND_CUDA))
    {
        moe_errf(err, errlen, "%s", "backend: no model or no backend kind");
        return MOE_EINVAL;
    }
#ifndef MOE_HAVE_CUDA
    if (p->kind == MOE_BACKEND_CUDA) {
        moe_errf(err, errlen, "%s", "backend: this build has no CUDA "
                 "support");
        return MOE_EUNSUPPORTED;
    }
#endif
    if (tp == 1) {
#ifdef MOE_HAVE_CUDA
        if (p->kind == MOE_BACKEND_CUDA) {
            int           dev0 = p->devices != NULL ? p->devices[0] : 0;
            moe_cuda_kv_t kv = be_cuda_kv(p);

            rc = moe_cuda_backend_create_kv(m, NULL, 0, 0, 1, 0, 0,
                                            p->n_blocks, p->block_size,
                                            p->max_batched_tokens, dev0, &kv,
                                            out, err, errlen);
            if (rc == MOE_OK && p->nccl == MOE_NCCL_ON) {
                /* nccl: on with one rank: the communicator path, an
                 * all-reduce over one rank (the identity) */
                rc = moe_cuda_nccl_attach(out, &dev0, 1, err, errlen);
                if (rc != MOE_OK) {
                    (*out)->destroy(*out);
                    *out = NULL;
                }
            }
            return rc;
        }
#endif
        rc = moe_cpu_backend_create(m, p->n_blocks, p->block_size,
                                    p->n_threads, out, err, errlen);
        return be_cpu_kv_fp8(p, out, rc, err, errlen);
    }
    if (tp > 64) {
        moe_errf(err, errlen, "tensor_parallel_size %d: at most 64", tp);
        return MOE_EINVAL;
    }

    ranks = calloc((size_t) tp, sizeof(*ranks));
    ctx = calloc((size_t) tp, sizeof(*ctx));
    if (p->kind == MOE_BACKEND_CPU) {
        shards = calloc((size_t) tp, sizeof(*shards));
    }
    if (ranks == NULL || ctx == NULL
        || (p->kind == MOE_BACKEND_CPU && shards == NULL))
    {
        free(ranks);
        free(ctx);
        free(shards);
        moe_errf(err, errlen, "%s", "tensor parallel: out of memory");
        return MOE_ENOMEM;
    }

#ifdef MOE_HAVE_CUDA
    if (p->kind == MOE_BACKEND_CUDA) {
        int           ndev = moe_cuda_device_count(), dev[64], use_nccl;
        moe_cuda_kv_t kv = be_cuda_kv(p);

        for (r = 0; r < tp; r++) {
            dev[r] = p->devices != NULL ? p->devices[r]
                                        : r % (ndev > 0 ? ndev : 1);
        }
        rc = be_nccl_choice(p->nccl, dev, tp, &use_nccl, err, errlen);
        if (rc == MOE_OK && !use_nccl) {
            rc = moe_cuda_peer_access(dev, tp, err, errlen);
        }
        for (r = 0; r < tp && rc == MOE_OK; r++) {
            rc = moe_cuda_backend_create_kv(m, NULL, 0, 0, tp, r, p->ep,
                                            p->n_blocks, p->block_size,
                                            p->max_batched_tokens, dev[r],
                                            &kv, &ranks[r], err, errlen);
            ctx[r] = ranks[r];
        }
        if (rc == MOE_OK && use_nccl) {
            rc = moe_cuda_nccl_attach(ranks, dev, tp, err, errlen);
        }
        ops = moe_cuda_tp_ops();
        set_reduce = moe_cuda_backend_set_reduce;
        if (rc == MOE_OK) {
            const moe_hparams_t *hp = moe_model_hparams(m);

            moe_log(MOE_LOG_INFO, "cuda backend: %d tensor-parallel ranks "
                    "(%d heads, %d kv heads, %s each), devices %d..%d, "
                    "all-reduce by %s", tp, hp->n_heads / tp,
                    hp->n_kv_heads / tp, p->ep ? "whole experts"
                                               : "a slice of every expert",
                    dev[0], dev[tp - 1],
                    use_nccl ? "NCCL" : "peer-access sums");
        }
    }
#endif
    if (p->kind == MOE_BACKEND_CPU) {
        /* each rank a CPU backend over its fp32 shard, its share of the
         * threads */
        per = p->n_threads > 0 ? (p->n_threads + tp - 1) / tp : 0;
        for (r = 0; r < tp && rc == MOE_OK; r++) {
            rc = moe_model_shard_ep(m, tp, r, p->ep, &shards[r], err,
                                    errlen);
            if (rc == MOE_OK) {
                rc = moe_cpu_backend_create(shards[r], p->n_blocks,
                                            p->block_size, per, &ranks[r],
                                            err, errlen);
                rc = be_cpu_kv_fp8(p, &ranks[r], rc, err, errlen);
            }
        }
    }

    if (rc != MOE_OK) {
        be_free_ranks(ranks, shards, tp);
    } else {
        rc = moe_tp_backend_wrap(ranks, shards, tp, ops, ctx, set_reduce,
                                 out, err, errlen);
        if (rc == MOE_OK && p->ep) {
            moe_tp_backend_set_ep(*out);
        }
    }
    free(ranks);
    free(shards);
    free(ctx);
    return rc;
}


/* ---------------------------------------------------------- KV sizing */

/* blocks one max_model_len sequence needs */
static int
be_blocks_per_seq(const moe_backend_opts_t *o)
{
    return (o->max_model_len + o->block_size - 1) / o->block_size;
}


/* The CPU pool: kv_cache_blocks, or enough for max_num_seqs sequences of
 * max_model_len within a quarter of the host's memory (the whole model's
 * K and V, however many ranks split them). */
static int
be_cpu_blocks(const moe_backend_opts_t *o, const moe_hparams_t *hp)
{
    int64_t  cap_bytes, per;
    long     pages, page_size;
    int64_t  n = o->kv_cache_blocks;

    if (n <= 0) {
        pages = sysconf(_SC_PHYS_PAGES);
        page_size = sysconf(_SC_PAGESIZE);
        cap_bytes = pages > 0 && page_size > 0
                    ? (int64_t) pages * page_size / 4 : ((int64_t) 1 << 30);
        /* K and V, fp32, every layer */
        per = (int64_t) 2 * hp->n_layers * o->block_size * hp->n_kv_heads
              * hp->head_dim * (int64_t) sizeof(float);
        n = (int64_t) be_blocks_per_seq(o) * o->max_num_seqs;
        if (n * per > cap_bytes) {
            n = cap_bytes / per;
        }
    }
    return n > 0 ? (n < (1 << 30) ? (int) n : 1 << 30) : 1;
}


/*
 * The backend's host swap pool from swap_space (GiB; 0 off): at most what
 * max_num_seqs sequences of max_model_len can hold and 40% of the host's
 * memory.  Swapping is an optimisation: any failure is logged and
 * preemption falls back to recompute.
 */
static void
be_swap_space(const moe_backend_opts_t *o, moe_backend_t *b)
{
    int64_t  per = b->kv_bytes_per_block, n, cap;
    long     pages, page_size;
    char     err[256];

    if (o->swap_space <= 0 || b->swap_alloc == NULL || b->swap_out == NULL
        || b->swap_in == NULL || per <= 0)
    {
        return;
    }

    n = (int64_t) (o->swap_space * 1073741824.0 / (double) per);
    cap = (int64_t) be_blocks_per_seq(o) * o->max_num_seqs;
    if (n > cap) {
        n = cap;
    }
    pages = sysconf(_SC_PHYS_PAGES);
    page_size = sysconf(_SC_PAGESIZE);
    if (pages > 0 && page_size > 0
        && n * per > (int64_t) pages * page_size / 10 * 4)
    {
        n = (int64_t) pages * page_size / 10 * 4 / per;
        moe_log(MOE_LOG_WARN, "%s: swap_space %.2f GiB is more than 40%% of "
                "the host's memory; using %.2f GiB", be_file(o),
                o->swap_space, (double) (n * per) / 1073741824.0);
    }
    if (n > (1 << 30)) {
        n = 1 << 30;
    }
    if (n < 1) {
        moe_log(MOE_LOG_WARN, "%s: swap_space %g GiB holds no KV block of "
                "%lld bytes; preemption recomputes", be_file(o),
                o->swap_space, (long long) per);
        return;
    }

    if (b->swap_alloc(b, (int) n, err, sizeof(err)) != MOE_OK) {
        moe_log(MOE_LOG_WARN, "swap space: %s; preemption recomputes", err);
        return;
    }
    moe_log(MOE_LOG_INFO, "swap space: %d blocks (%.1f MiB of host memory)",
            b->n_swap_slots, (double) b->n_swap_slots * (double) per
                             / 1048576.0);
}


/* ------------------------------------------------------------ factory */

static int
be_create_cpu(const moe_backend_opts_t *o, const moe_model_t *m,
    moe_backend_t **out, char *err, size_t errlen)
{
    moe_ranks_t  p;
    int          tp = o->tensor_parallel_size, rc;

    memset(&p, 0, sizeof(p));
    p.kind = MOE_BACKEND_CPU;
    /* cpu_tensor_parallel with tensor_parallel_size > 1: the ranks'
     * shards, one thread each, their partial sums all-reduced (tp.c);
     * else one CPU backend (sharding threads buys nothing on one host: run
     * 16 of an earlier session measured 200 tokens in 0.54 s on 4 ranks,
     * 0.37 on 1) */
    p.tp = o->cpu_tensor_parallel && tp > 1 ? tp : 1;
    p.ep = o->expert_parallel && p.tp > 1;
    p.n_threads = o->cpu_threads;
    p.n_blocks = be_cpu_blocks(o, moe_model_hparams(m));
    p.block_size = o->block_size;
    rc = be_kv_scales(o, m, &p, err, errlen);
    if (rc != MOE_OK) {
        return rc;
    }

    if (tp > 1 && o->cpu_tensor_parallel) {
        moe_log(MOE_LOG_INFO, "tensor_parallel_size %d: the cpu backend "
                "runs the %d ranks' shards in one process, all-reducing "
                "their partial sums", tp, tp);
    } else if (tp > 1) {
        moe_log(MOE_LOG_INFO, "tensor_parallel_size %d: the cpu backend "
                "runs one rank (engine.cpu_tensor_parallel: true shards it)",
                tp);
    }
    return moe_backend_create_ranks(m, &p, out, err, errlen);
}


/* load_format dummy: the random weights' seed (the same in every worker,
 * so a reload can take the old worker's) */
#define BE_DUMMY_SEED  1234


#ifdef MOE_HAVE_CUDA
static int
be_is_nccl(const moe_backend_opts_t *o, const char *mode)
{
    return o->nccl != NULL && strcmp(o->nccl, mode) == 0;
}


static int
be_nccl_mode(const moe_backend_opts_t *o)
{
    return be_is_nccl(o, "on") ? MOE_NCCL_ON
                               : be_is_nccl(o, "off") ? MOE_NCCL_OFF
                                                      : MOE_NCCL_AUTO;
}


static int
be_create_cuda(const moe_backend_opts_t *o, const moe_model_t *m,
    moe_backend_t **out, char *err, size_t errlen)
{
    const moe_hparams_t *hp = moe_model_hparams(m);
    moe_hparams_t        rhp;
    moe_ranks_t          p;
    int                  tp, ndev, r, on_dev0 = 0, devs[64], rc;
    int                  dev = o->n_gpu_devices > 0 ? o->gpu_devices[0] : 0;
    int                  n_blocks = o->kv_cache_blocks;
    /* load_format dummy: random weights in the `quantization` format */
    int                  wfmt = moe_qw_format_by_name(o->quantization);

    if (o->dummy && wfmt < 0) {
        moe_errf(err, errlen, "%s: quantization '%s' with load_format "
                 "dummy: random weights come as fp8, awq, gptq or bf16",
                 be_file(o), o->quantization);
        return MOE_EINVAL;
    }
    tp = o->tensor_parallel_size > 1 ? o->tensor_parallel_size : 1;
    ndev = moe_cuda_device_count();
    if (tp > 1 && o->dummy) {
        moe_log(MOE_LOG_WARN, "tensor_parallel_size %d with load_format "
                "dummy: random weights run as one rank", tp);
        tp = 1;
    }
    if (tp > 1 && tp > ndev && o->n_gpu_devices < tp) {
        /* ranks share a GPU only when gpu_devices says so (the test setup);
         * the seed's tensor_parallel_size 4 on a smaller machine runs one
         * rank with CUDA graphs */
        moe_log(MOE_LOG_WARN, "tensor_parallel_size %d but %d GPU(s) "
                "visible: running one rank (list gpu_devices to place "
                "several ranks on one GPU)", tp, ndev);
        tp = 1;
    }
    if (tp > 64) {
        moe_errf(err, errlen, "%s: tensor_parallel_size %d: at most 64",
                 be_file(o), tp);
        return MOE_EINVAL;
    }
    for (r = 0; r < tp; r++) {
        /* the instance's gpu_devices, else rank modulo the devices */
        devs[r] = o->n_gpu_devices > r ? o->gpu_devices[r]
                                       : (dev + r) % (ndev > 0 ? ndev : 1);
        on_dev0 += devs[r] == devs[0];
    }
    rc = moe_hparams_shard_ep(hp, tp, 0, o->expert_parallel && tp > 1,
                              &rhp, err, errlen);
    if (rc != MOE_OK) {
        return rc;
    }
    if (n_blocks <= 0) {
        /* each rank holds its kv heads; ranks sharing a device share its
         * memory budget */
        /* an old worker (nginx -s reload) that serves these weights: its
         * pool's size (it was sized on a GPU without us); the backend
         * imports the weights and backs the pool as that memory frees */
        if (tp == 1
            && moe_cuda_share_kv_hint(hp, o->dummy ? NULL : m, wfmt,
                                      o->dummy ? BE_DUMMY_SEED : 0, devs[0],
                                      o->block_size, o->kv_fp8, &n_blocks)
               == MOE_OK)
        {
            moe_log(MOE_LOG_INFO, "a live worker serves these weights: "
                    "importing them, KV pool of %d blocks backed as its "
                    "memory frees", n_blocks);
        } else {
            /* the weights as the device holds them (packed formats
             * count their own bytes) */
            if (o->dummy) {
                rc = moe_cuda_kv_blocks_for_fmt(&rhp, wfmt, o->block_size,
                                                o->kv_fp8,
                                                o->max_num_batched_tokens,
                                                o->gpu_memory_utilization
                                                / on_dev0, devs[0],
                                                &n_blocks, err, errlen);
            } else {
                rc = moe_cuda_kv_blocks_for_rank(m, tp, 0,
                                                 o->expert_parallel
                                                 && tp > 1, o->block_size,
                                                 o->kv_fp8,
                                                 o->max_num_batched_tokens,
                                                 o->gpu_memory_utilization
                                                 / on_dev0, devs[0],
                                                 &n_blocks, err, errlen);
            }
            if (rc != MOE_OK) {
                return rc;
            }
        }
        if (n_blocks > be_blocks_per_seq(o) * o->max_num_seqs) {
            n_blocks = be_blocks_per_seq(o) * o->max_num_seqs;
        }
    }

    memset(&p, 0, sizeof(p));
    rc = be_kv_scales(o, m, &p, err, errlen);
    if (rc != MOE_OK) {
        return rc;
    }
    p.kind = MOE_BACKEND_CUDA;
    if (o->dummy) {
        moe_cuda_kv_t kv = be_cuda_kv(&p);

        if (wfmt != MOE_WF_BF16) {
            moe_log(MOE_LOG_INFO, "load_format dummy: random %s weights",
                    moe_qw_format_name(wfmt));
        }
        return moe_cuda_backend_create_kv(NULL, hp, wfmt, BE_DUMMY_SEED, 1,
                                          0, 0, n_blocks, o->block_size,
                                          o->max_num_batched_tokens, dev,
                                          &kv, out, err, errlen);
    }
    p.tp = tp;
    p.devices = devs;
    p.n_blocks = n_blocks;
    p.block_size = o->block_size;
    p.max_batched_tokens = o->max_num_batched_tokens;
    p.ep = o->expert_parallel && tp > 1;
    p.nccl = be_nccl_mode(o);
    return moe_backend_create_ranks(m, &p, out, err, errlen);
}
#endif


int
moe_backend_create(const moe_backend_opts_t *o, moe_backend_kind_t kind,
    moe_model_t *m, moe_backend_t **out, char *err, size_t errlen)
{
    moe_backend_t       *b = NULL;
    int                  rc, need;

    *out = NULL;
    if (o == NULL || m == NULL || o->block_size <= 0
        || o->max_model_len <= 0 || o->max_num_seqs <= 0)
    {
        moe_errf(err, errlen, "%s", "backend: bad arguments");
        return MOE_EINVAL;
    }

#ifdef MOE_HAVE_CUDA
    if (kind == MOE_BACKEND_CUDA) {
        const moe_hparams_t *hp = moe_model_hparams(m);
        char                 why[256];

        if (!moe_cuda_supports(hp, why, sizeof(why))) {
            if (be_is(o, "cuda") || o->dummy) {
                moe_errf(err, errlen, "%s: backend 'cuda' cannot run %s (%s)",
                         be_file(o), hp->arch_name, why);
                return MOE_EUNSUPPORTED;
            }
            moe_log(MOE_LOG_WARN, "the cuda backend cannot run %s (%s); "
                    "serving from the cpu backend", hp->arch_name, why);
            kind = MOE_BACKEND_CPU;
            rc = moe_model_load_f32(m, err, errlen);
            if (rc != MOE_OK) {
                return rc;
            }
        }
    }
    rc = kind == MOE_BACKEND_CUDA ? be_create_cuda(o, m, &b, err, errlen)
                                  : be_create_cpu(o, m, &b, err, errlen);
#else
    if (kind == MOE_BACKEND_CUDA) {
        moe_errf(err, errlen, "%s: backend 'cuda' requested, but this build "
                 "has no CUDA support", be_file(o));
        return MOE_EUNSUPPORTED;
    }
    rc = be_create_cpu(o, m, &b, err, errlen);
#endif
    if (rc != MOE_OK) {
        return rc;
    }

    need = be_blocks_per_seq(o);
    if (b->kv_grow != NULL && b->n_kv_usable > 0 && b->n_kv_usable < need
        && b->n_kv_blocks >= need)
    {
        /* a pool that grows but cannot hold one sequence yet: wait for
         * memory (the module retries MOE_ENOMEM) */
        moe_errf(err, errlen, "%s: the KV cache starts with %d blocks of "
                 "%d tokens, fewer than one max_model_len (%d) sequence "
                 "needs (%d); waiting for memory", be_file(o),
                 b->n_kv_usable, o->block_size, o->max_model_len, need);
        b->destroy(b);
        return MOE_ENOMEM;
    }
    if (b->n_kv_blocks < need) {
        moe_errf(err, errlen, "%s: the KV cache holds %d blocks of %d "
                 "tokens, fewer than one max_model_len (%d) sequence needs "
                 "(%d)", be_file(o), b->n_kv_blocks, o->block_size,
                 o->max_model_len, need);
        b->destroy(b);
        return MOE_EINVAL;
    }
    be_swap_space(o, b);
    *out = b;
    return MOE_OK;
}
