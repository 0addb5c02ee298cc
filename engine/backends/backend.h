/*
 * The backend contract (engine internal): what the scheduler hands a
 * backend each step, what a backend is, and how one is made.
 *
 *   moe_seq_batch_t, moe_batch_check   one step's work and its validation
 *                                      (batch.c)
 *   moe_backend_t                      the vtable every backend fills
 *   moe_backend_load_model,            the factory (backend.c): backend
 *   moe_backend_create                 choice, rank placement, KV sizing
 *   moe_backend_create_ranks           tp ranks of one kind, composed
 *   moe_cpu_backend_*                  the fp32 reference (cpu_backend.c)
 *   moe_tp_*                           tensor parallelism over ranks of
 *                                      any kind (tp.c)
 *
 * The CUDA backend's own calls are in backends/cuda_backend.h; only files
 * of this folder include it (the engine reaches CUDA through the factory).
 */

#ifndef MOE_BACKEND_H
#define MOE_BACKEND_H

#include <stddef.h>
#include <stdint.h>

#include "moe.h"
#include "model/model.h"


/* ------------------------------------------------------ one step's work */

/*
 * One sequence's share of a forward step.  The backend processes
 * tokens[0..n_tokens) at positions pos..pos+n_tokens-1, writing their K/V
 * into the pages named by block_table (block b holds positions
 * [b*block_size, (b+1)*block_size)), attending causally over positions
 * 0..pos+i.  If logits != NULL the logits (vocab_size floats) of the LAST
 * token are written there.  If token_out != NULL the greedy token of the
 * last token's logits is written to *token_out: the id i < n of the
 * largest logit (fp32 compare; ties: the lowest id, as moe_sample()'s
 * greedy path), n = n_valid when 0 < n_valid < vocab_size, else
 * vocab_size (ids >= n_valid are padding the tokenizer never produces).
 * Either, both or neither may be requested; a backend computes a row's
 * lm_head only when one of them is.  Entries must be zeroed (or set)
 * by callers that do not know these fields.
 */
typedef struct {
    const int32_t *tokens;
    int            n_tokens;
    int            pos;
    const int32_t *block_table;
    int            n_blocks;      /* entries in block_table */
    float         *logits;        /* (vocab_size) or NULL */
    int32_t       *token_out;     /* (1) greedy id of the last token, or
                                     NULL */
    int            n_valid;       /* token_out considers ids < n_valid;
                                     <= 0: all vocab_size */
    /* With token_out and a backend that has sample_tokens: draw the
     * token by these parameters, exactly moe_sample_u() (sampling/sampling.h) with
     * this u over ids < n_valid, instead of the argmax.  The penalty
     * lists give, for n_pen distinct ids, the generated count (pen_cnt,
     * frequency/presence penalties) and whether the id is in the prompt
     * or output (pen_seen, repetition penalty); ids not listed have
     * neither.  sample NULL: greedy (the argmax above). */
    const moe_sampling_t *sample;
    float          u;
    const int32_t *pen_tok;
    const int32_t *pen_cnt;
    const uint8_t *pen_seen;
    int            n_pen;
    /* guided decoding: ((vocab_size + 31) / 32) words, bit (id & 31) of
     * mask[id >> 5] set for the ids the next token may be, or NULL (all).
     * Honoured by the greedy argmax and the draw (token_out) and applied
     * to logits (their masked ids read -inf) by backends that set
     * guided_mask; the scheduler applies it on the host otherwise. */
    const uint32_t *mask;
    /* Logprobs (a backend with logprobs_tokens, with token_out): the
     * chosen token's logprob under the row's distribution (the logits
     * after the penalties, divided by sample's temperature, 1 when greedy
     * or sample NULL; ids < n_valid) into *lp_out, and its lp_k (<=
     * MOE_MAX_TOP_LOGPROBS) most likely entries into lp_top, exactly
     * moe_logprobs_row() (sampling/sampling.h) up to float rounding; only
     * these leave the device.  lp_out NULL: none. */
    float               *lp_out;
    moe_logprob_entry_t *lp_top;
    int                  lp_k;
    /* logit_bias on the backend (a backend with logit_bias_device, with
     * token_out): bias[j] is added to the logit of id bias_ids[j] (in
     * [0, vocab_size); an id listed twice gets both), j < n_bias (<=
     * MOE_MAX_LOGIT_BIAS), before the penalties, the temperature, the
     * mask, the argmax and the draw, exactly as moe_sample_u() applies
     * sampling_t's logit_bias (which backends ignore: these fields are the
     * only bias they apply), so lp_out sees the biased distribution.
     * n_bias 0: none. */
    const int32_t *bias_ids;
    const float   *bias;
    int            n_bias;
} moe_seq_batch_t;

/*
 * Check one step's batch before a backend touches its KV cache: every
 * entry has tokens in the vocabulary, a position range within the model's
 * limits, a block table covering it with ids in [0, n_blocks), and a
 * logit_bias list of at most MOE_MAX_LOGIT_BIAS entries (both arrays
 * given when n_bias > 0).  On
 * MOE_OK *n_tokens is the step's token count (at most max_tokens),
 * *n_table the block-table entries the step needs and *max_ctx the largest
 * pos + n_tokens (either may be NULL).  MOE_EINVAL otherwise, nothing
 * written.
 */
int moe_batch_check(const moe_hparams_t *hp, const moe_seq_batch_t *seqs,
    int n, int n_blocks, int block_size, int max_tokens, int *n_tokens,
    size_t *n_table, int *max_ctx);


/* ----------------------------------------------------------- the vtable */

typedef struct moe_backend moe_backend_t;

struct moe_backend {
    const char *name;             /* "cpu" | "cuda" */
    int         n_kv_blocks;      /* KV pool blocks (block ids are
                                     0..n_kv_blocks-1; on every rank) */
    int64_t     kv_bytes_per_block; /* one block, every layer, K and V
                                     (all ranks together) */
    const char *kv_dtype;         /* the values the KV cache holds:
                                     "float32" | "bfloat16" | "fp8_e4m3"
                                     (the CPU keeps e4m3 values in fp32) */
    /* 1: forward() honours moe_seq_batch_t.sample (draws tokens itself,
     * no logits copy); 0: only greedy token_out */
    int         sample_tokens;
    /* 1: forward() honours moe_seq_batch_t.mask (on the device) */
    int         guided_mask;
    /* 1: forward() honours moe_seq_batch_t.lp_out (logprobs computed
     * where the logits are, only the entries copied); 0: the engine
     * takes logits to the host for them */
    int         logprobs_tokens;
    /* 1: forward() honours moe_seq_batch_t.bias_ids / bias (logit_bias
     * added where the logits are); 0: a sequence with a logit_bias takes
     * its logits to the host sampler */
    int         logit_bias_device;
    /* run one step over n sequences (each entry checked with
     * moe_batch_check first); MOE_OK or a status, the KV cache of the
     * step's blocks undefined after a failure */
    int  (*forward)(moe_backend_t *b, const moe_seq_batch_t *seqs, int n);
    /* per-expert token counts since create (n_layers * n_experts),
     * owned by the backend; the function pointer may be NULL */
    const int64_t *(*expert_counts)(moe_backend_t *b);
    /* free everything the backend holds (NULL-safe for the wrapper) */
    void (*destroy)(moe_backend_t *b);

    /*
     * Swap space (preemption by swapping, vLLM's swap_space): a host pool
     * of n_swap_slots slots of kv_bytes_per_block bytes each, owned by the
     * backend; a slot holds one whole block (every layer, K and V) in the
     * backend's own KV element type.  The engine does the slot
     * book-keeping (moe_slots_t, sched/kv.h).  Any of these pointers may be NULL
     * (then swapping is unavailable and the engine recomputes).
     *
     * swap_alloc: (re)allocate the pool with n_slots slots (0 frees it);
     *   CPU: malloc, CUDA: pinned host memory.  MOE_OK, MOE_EINVAL or
     *   MOE_ENOMEM (pool then empty, n_swap_slots 0) with the reason in err.
     * swap_out: copy device/pool blocks[i] into host slot slots[i], i < n.
     * swap_in:  copy host slot slots[i] into blocks[i], i < n.
     *   Both are queued in order with forward() (CUDA: async copies on the
     *   backend's stream), so a block freed right after swap_out may be
     *   written by the next forward, and a block filled by swap_in is read
     *   correctly by it; a slot may be reused for a later swap_out as soon
     *   as swap_in returns.  MOE_EINVAL (id out of range) or MOE_EBACKEND.
     * swap_read (tests): wait for queued copies, then copy slot's
     *   kv_bytes_per_block bytes to dst.
     */
    int  n_swap_slots;
    int  (*swap_alloc)(moe_backend_t *b, int n_slots, char *err,
                       size_t errlen);
    int  (*swap_out)(moe_backend_t *b, const int32_t *blocks,
                     const int32_t *slots, int n);
    int  (*swap_in)(moe_backend_t *b, const int32_t *slots,
                    const int32_t *blocks, int n);
    int  (*swap_read)(moe_backend_t *b, int32_t slot, void *dst);

    /*
     * A KV pool that grows: a backend whose pool memory is not all there
     * at create (the CUDA backend that imported its weights from an old
     * worker still holding the GPU) sets n_kv_usable below n_kv_blocks
     * (0 reads as n_kv_blocks: a whole pool).  The engine hands out only
     * ids below n_kv_usable and, between steps while the pool is short
     * (every MOE_KV_GROW_MS), calls kv_grow, which makes more blocks
     * usable if it can and returns the usable count (never below the
     * last one; a failure is logged there and the last count returned:
     * the engine goes on with the pool it has).  Engine thread only.
     * NULL for a whole pool.
     */
    int  n_kv_usable;
    int  (*kv_grow)(moe_backend_t *b);

    /*
     * Weights shared across a reload (CUDA, cuda_share.h): wait at most
     * timeout_ms for the next worker to take them.  1 taken (*pid, *ms:
     * the hand-over's duration), 0 nobody came, -1 nothing is shared.
     * Any thread.  NULL: nothing is shared.
     */
    int  (*handover_wait)(moe_backend_t *b, int timeout_ms, int64_t *pid,
                          double *ms);
};

#define MOE_KV_GROW_MS  250



/* ------------------------------------------------ tensor parallelism */

/* Sums a buffer of n floats over the tensor-parallel ranks, in place, as
 * an all-reduce: every rank calls it at the same point of its forward and
 * gets the same sum (ranks added in order 0..tp-1). */
typedef void (*moe_reduce_fn)(void *ctx, float *buf, size_t n);

/* How the all-reduce adds and copies the ranks' buffers: host loops for
 * CPU ranks, a kernel for CUDA ranks (moe_cuda_tp_ops,
 * cuda_backend.h). sum: dst[i] =
 * srcs[0][i] + ... + srcs[R-1][i] for lo <= i < hi (a NULL src adds
 * nothing); copy: n floats; both complete before returning; MOE_OK or a
 * status (the step then fails).  rank_ctx: the op_ctx entry of the rank
 * (moe_tp_backend_wrap). */
typedef struct {
    int   (*sum)(void *rank_ctx, float *dst, float *const *srcs, int R,
                 size_t lo, size_t hi);
    int   (*copy)(void *rank_ctx, float *dst, const float *src, size_t n);
    void *(*alloc)(size_t bytes);       /* the shared sum buffer */
    void  (*free)(void *p);
} moe_tp_ops_t;

/* The ops over host memory (CPU ranks); the op contexts are unused. */
extern const moe_tp_ops_t moe_tp_host_ops;

/*
 * One backend over tp (2..64) rank backends already made, each over its
 * shard of the model (CPU: moe_model_shard; CUDA: the rank's slice read
 * from the files): a step runs rank 0 on the calling thread and the
 * others on their own threads, each rank's o_proj and FFN partial sums
 * all-reduced through ops (op_ctx[r] given to rank r's ops calls; op_ctx
 * may be NULL), ranks added in order 0..tp-1 so every rank gets the same
 * bits.  set_reduce installs the all-reduce in each rank.  Only rank 0
 * writes the step's logits / tokens.  The same block ids name the same
 * positions on every rank, swap slots likewise; kv_bytes_per_block is
 * the ranks' sum.  shards (may be NULL) are freed with the backend.
 * Takes ownership of the ranks (and shards) also on failure: MOE_EINVAL
 * (tp out of range), MOE_ENOMEM (memory, threads), reason in err.
 */
int moe_tp_backend_wrap(moe_backend_t **ranks, moe_model_t **shards, int tp,
    const moe_tp_ops_t *ops, void **op_ctx,
    void (*set_reduce)(moe_backend_t *b, moe_reduce_fn fn, void *ctx),
    moe_backend_t **out, char *err, size_t errlen);

/* Rank `rank` of a tensor-parallel backend (tests); a plain backend is its
 * own rank 0; NULL for a rank out of range. */
moe_backend_t *moe_tp_backend_rank(moe_backend_t *b, int rank);

/* Expert parallelism: mark a tensor-parallel backend's ranks as holding
 * whole experts (E / tp each, contiguous; moe_model_shard_ep), and ask
 * it: the number of ranks when marked, else 0 (any backend). */
void moe_tp_backend_set_ep(moe_backend_t *b);
int  moe_tp_backend_ep_ranks(moe_backend_t *b);

/* How CUDA ranks add their partial sums (moe_ranks_t.nccl). */
enum {
    MOE_NCCL_AUTO = 0,          /* NCCL when built with it and the ranks
                                   are on distinct GPUs, else local sums */
    MOE_NCCL_ON,                /* NCCL or fail; with one rank as well */
    MOE_NCCL_OFF                /* peer-access sums (kernels/tp_sum.cu) */
};



/* ---------------------------------------------- the CPU backend (fp32) */

/*
 * The CPU backend's emulated device-memory budget (cpu_budget.c): with
 * MOE_CPU_MEMORY_LIMIT set, every process sharing MOE_CPU_MEMORY_FILE
 * draws from one budget, as processes on one GPU share its memory.
 * reserve: MOE_OK, or MOE_ENOMEM with err naming the budget and what holds
 * it (MOE_EIO when the accounting file cannot be used); a no-op without a
 * limit.  release: gives back what this process reserved.  Memory of a
 * process that exited is free again (its entry is dropped).
 */
int moe_cpu_budget_reserve(int64_t bytes, char *err, size_t errlen);
void moe_cpu_budget_release(int64_t bytes);

/*
 * CPU backend (fp32 reference) over a model loaded with its fp32 weights
 * (moe_model_load, moe_model_load_f32 or a shard).  Allocates a KV pool of
 * n_blocks pages of block_size tokens: (n_blocks, n_layers, 2, block_size,
 * n_kv_heads, head_dim) floats, and n_threads worker threads (0: the
 * online cores, at most 64).  The model must outlive the backend.
 * MOE_EINVAL (bad sizes, no weights), MOE_EUNSUPPORTED (more than 256
 * experts), MOE_ENOMEM; reason in err.
 */
int moe_cpu_backend_create(const moe_model_t *m, int n_blocks,
    int block_size, int n_threads, moe_backend_t **out, char *err,
    size_t errlen);

/*
 * fp8 KV cache (kv_cache_dtype fp8): from now on the CPU backend stores
 * every K / V value it writes rounded through e4m3 with the per-tensor
 * scales of its layer, k_scales[l] / v_scales[l] for the model's n_layers
 * (value = e4m3(x / scale) * scale, kernels/fp8.h), the values the CUDA
 * backend's fp8 cache holds, so that both backends compute the same
 * function.  Call before the first forward().  MOE_EINVAL for a scale
 * that is not finite and > 0; reason in err.
 */
int moe_cpu_backend_set_kv_fp8(moe_backend_t *b, const float *k_scales,
    const float *v_scales, char *err, size_t errlen);

/* A CPU backend calls fn(ctx, partial, T * dim) after o_proj and after
 * the FFN of every layer (the row-parallel partial sums of a shard,
 * moe_model_shard); fn NULL: no reduce (a whole model). */
void moe_cpu_backend_set_reduce(moe_backend_t *b, moe_reduce_fn fn,
    void *ctx);

/*
 * Tests only (comparing backends with the routing decisions taken out):
 * routing tables are (n_tokens, n_layers, top_k) int32, tokens in step
 * order (sequences in batch order, each one's tokens in order), each
 * token's experts in the order they were chosen (descending probability);
 * -1 on layers that do not route (dense models, layer_dense layers).
 *
 * moe_cpu_backend_force_routing: the NEXT forward() of the CPU backend b
 * uses exactly these experts for each (token, layer) instead of its own
 * top-k; the gate weights still come from b's own fp32 router (softmax
 * over all experts, the forced experts' probabilities, renormalised unless
 * router_no_renorm), summed in the given order.  The table is copied; it
 * applies to that one forward() only, which fails with MOE_EINVAL if its
 * token count is not n_tokens.  Entries of non-routing layers are ignored
 * (on a dense model the call does nothing).  MOE_EINVAL: not a CPU
 * backend, an expert out of range or repeated within a (token, layer);
 * MOE_ENOMEM.
 *
 * moe_cpu_backend_last_routing: the experts the last successful forward()
 * used (chosen or forced) into experts; MOE_EINVAL when n_tokens is not
 * that step's token count (or the last forward failed).
 */
int moe_cpu_backend_force_routing(moe_backend_t *b, const int32_t *experts,
    int n_tokens);
int moe_cpu_backend_last_routing(moe_backend_t *b, int32_t *experts,
    int n_tokens);



/* ------------------------------------------------------------ factory */

typedef enum {
    MOE_BACKEND_CPU = 1,         /* cpu_backend.c, fp32 host weights */
    MOE_BACKEND_CUDA             /* cuda_backend.cu, weights read from the
                                    mapped files to the GPU */
} moe_backend_kind_t;

/*
 * What the factory needs from the configuration (the engine fills it from
 * moe_config_t; pointers are borrowed for the call only).
 */
typedef struct {
    const char  *file;           /* configuration file, named in messages */
    const char  *backend;        /* "auto" | "cpu" | "cuda"; NULL: auto */
    int          dummy;          /* load_format "dummy": config.json only,
                                    random weights made on the GPU */
    const char  *quantization;   /* vLLM's key (model/quant.h); NULL or
                                    "": as the checkpoint is */

    /* rank placement */
    int          tensor_parallel_size;   /* <= 1: one rank */
    const int   *gpu_devices;    /* (n_gpu_devices) device of rank r (the
                                    first: of a single rank); NULL: rank r
                                    on GPU r modulo the devices */
    int          n_gpu_devices;
    int          cpu_tensor_parallel;    /* 1: the CPU backend shards too */
    int          cpu_threads;    /* CPU threads of all ranks; 0: all */

    /* KV sizing */
    int          kv_cache_blocks;        /* > 0: exactly this many blocks */
    double       gpu_memory_utilization; /* share of each GPU's memory */
    double       swap_space;     /* GiB of host memory for swapped-out
                                    blocks; 0: preemption recomputes */
    int          block_size;     /* tokens per KV block */
    int          max_model_len;  /* the longest sequence; the pool must
                                    hold one */
    int          max_num_seqs;   /* the pool need not hold more than
                                    this many max_model_len sequences */
    int          max_num_batched_tokens; /* tokens per forward() */

    /* scale-out (issue 11) */
    int          expert_parallel; /* 1: whole experts per rank
                                    (moe_model_shard_ep) */
    const char  *nccl;           /* "auto" | "on" | "off"; NULL: auto */
    /* KV cache element (kv_cache_dtype): 0 the model's dtype (auto);
     * 1 fp8 e4m3 with per-tensor scales kv_k_scale / kv_v_scale; 0:
     * each layer's from the checkpoint (moe_model_kv_scales), else 1.0 */
    int          kv_fp8;
    float        kv_k_scale, kv_v_scale;
} moe_backend_opts_t;

/*
 * Choose the backend kind for o (cpu; cuda; auto: cuda when this build has
 * CUDA and a device is visible, else cpu) and load the model from dir in
 * the form that backend reads: cpu: fp32 host weights (moe_model_load);
 * cuda: files mapped and checked, nothing converted (moe_model_open);
 * dummy: config.json only (moe_model_load_config).  top_k_override > 0
 * replaces the model's top-k.  *kind and *out (caller frees with
 * moe_model_free) on MOE_OK.  Fails, reason in err (naming o->file), with
 * MOE_EUNSUPPORTED when 'cuda' is asked for without CUDA support or a
 * device, or dummy without the cuda backend; or the model loader's status.
 */
int moe_backend_load_model(const moe_backend_opts_t *o, const char *dir,
    int top_k_override, moe_backend_kind_t *kind, moe_model_t **out,
    char *err, size_t errlen);

/*
 * The backend for a model loaded by moe_backend_load_model with that
 * kind: when the CUDA backend cannot run the model (moe_cuda_supports)
 * and o->backend is not "cuda", a warning and the CPU backend (the fp32
 * weights are then loaded into m, which is why m is not const); rank
 * placement (tensor_parallel_size ranks on gpu_devices, several ranks per
 * GPU only when gpu_devices lists them; one rank, with a warning, when
 * there are fewer GPUs; the CPU backend shards only with
 * cpu_tensor_parallel); the KV pool (kv_cache_blocks, else what
 * gpu_memory_utilization leaves after weights and workspaces on the GPU,
 * or a quarter of host memory on the CPU, never more than max_num_seqs
 * sequences of max_model_len) and the host swap pool (swap_space, at most
 * 40% of host memory; any failure there only logs: preemption then
 * recomputes).  (*out)->n_kv_blocks and ->n_swap_slots tell the sizes.
 * m must outlive the backend.  Fails with MOE_EUNSUPPORTED (the model
 * does not run on the backend asked for, or does not split), MOE_EINVAL
 * (the pool holds no max_model_len sequence), MOE_ENOMEM, MOE_EBACKEND;
 * reason in err.
 */
int moe_backend_create(const moe_backend_opts_t *o, moe_backend_kind_t kind,
    moe_model_t *m, moe_backend_t **out, char *err, size_t errlen);

/* Where the ranks of one backend go (moe_backend_create_ranks). */
typedef struct {
    moe_backend_kind_t  kind;
    int                 tp;          /* ranks; <= 1: one, whole model */
    const int          *devices;     /* CUDA: (tp) device of rank r; NULL:
                                        r modulo the device count */
    int                 n_threads;   /* CPU: threads of all ranks
                                        together; 0: all cores */
    int                 n_blocks;    /* KV pool blocks of each rank */
    int                 block_size;
    int                 max_batched_tokens; /* CUDA: tokens per forward
                                        (workspaces) */
    /* scale-out (issue 11) */
    int                 ep;          /* 1: expert parallel shards */
    int                 nccl;        /* CUDA: MOE_NCCL_* */
    int                 kv_fp8;      /* fp8 KV cache on every rank
                                        (moe_backend_opts_t) */
    float               kv_ks[MOE_MAX_LAYERS];  /* its K / V scales by */
    float               kv_vs[MOE_MAX_LAYERS];  /* layer (> 0) */
} moe_ranks_t;

/*
 * The backend of r->tp ranks of r->kind over m: one backend over the
 * whole model when tp <= 1, else each rank over its shard (CPU:
 * moe_model_shard, n_threads / tp threads each; CUDA: its slice read
 * from the mapped files onto devices[r], peer access enabled between
 * ranks on different devices) composed by moe_tp_backend_wrap with the
 * kind's all-reduce ops.  m must outlive the backend.  MOE_EUNSUPPORTED
 * (a CUDA kind in a build without CUDA; a split tp does not divide; no
 * peer access), MOE_EINVAL, MOE_ENOMEM, MOE_EBACKEND; reason in err.
 */
int moe_backend_create_ranks(const moe_model_t *m, const moe_ranks_t *r,
    moe_backend_t **out, char *err, size_t errlen);

#endif /* MOE_BACKEND_H */
