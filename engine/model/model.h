/*
 * Model description, loading and the backend interface (engine internal).
 *
 * A model is a Hugging Face directory: config.json, *.safetensors (or
 * model.safetensors.index.json + shards), tokenizer.json,
 * generation_config.json.  Dense models are the special case n_experts == 1.
 */

#ifndef MOE_MODEL_H
#define MOE_MODEL_H

#include <stddef.h>
#include <stdint.h>

#include "moe.h"

typedef enum {
    MOE_ARCH_LLAMA = 1,      /* LlamaForCausalLM */
    MOE_ARCH_MISTRAL,        /* MistralForCausalLM */
    MOE_ARCH_MIXTRAL,        /* MixtralForCausalLM */
    MOE_ARCH_QWEN2,          /* Qwen2ForCausalLM */
    MOE_ARCH_QWEN2_MOE,      /* Qwen2MoeForCausalLM */
    MOE_ARCH_QWEN3_MOE,      /* Qwen3MoeForCausalLM */
    MOE_ARCH_GPT2            /* GPT2LMHeadModel */
} moe_arch_t;

/* FFN activation (moe_hparams_t.act) */
typedef enum {
    MOE_ACT_SILU = 0,        /* silu(gate) * up (SwiGLU); the default */
    MOE_ACT_GELU_TANH,       /* gelu_new / gelu_pytorch_tanh: tanh approx. */
    MOE_ACT_GELU             /* exact erf GELU */
} moe_act_t;

#define MOE_MAX_LAYERS  512

typedef struct {
    moe_arch_t arch;
    char       arch_name[64];   /* config.json architectures[0] */
    int        dim;             /* hidden_size */
    int        n_layers;        /* num_hidden_layers */
    int        n_heads;         /* num_attention_heads */
    int        n_kv_heads;      /* num_key_value_heads (GQA) */
    int        head_dim;        /* head_dim or dim / n_heads */
    int        ffn_dim;         /* intermediate_size (per expert) */
    int        n_experts;       /* num_local_experts; 1 for dense */
    int        top_k;           /* num_experts_per_tok; 1 for dense */
    int        vocab_size;
    int        max_pos;         /* max_position_embeddings */
    float      rope_theta;
    float      norm_eps;        /* rms_norm_eps */
    int        tie_embeddings;  /* tie_word_embeddings */
    int32_t    bos_id;          /* -1 if none */
    int32_t    eos_ids[8];      /* generation_config.json eos_token_id,
                                   else config.json */
    int        n_eos;
    int        sliding_window;  /* attend to the last N positions only
                                   (Mistral/Mixtral sliding_window); 0: off */

    /* Optional pieces (Qwen2, Qwen2-MoE, Qwen3-MoE, GPT-2).  All zero for
     * Llama/Mistral/Mixtral, which keeps their forward unchanged.  A
     * backend that does not implement a non-zero one must refuse the
     * model (MOE_EUNSUPPORTED). */
    int        norm_layer;      /* 1: LayerNorm with bias (x - mean) /
                                   sqrt(var + norm_eps) * w + b instead of
                                   RMSNorm, for every norm (GPT-2) */
    int        act;             /* moe_act_t */
    int        ffn_ungated;     /* 1: FFN is down(act(up x + b_up)) + b_down,
                                   no gate projection, w_gate == NULL (GPT-2;
                                   dense only) */
    int        learned_pos;     /* 1: x = embed[tok] + pos_embed[pos], no RoPE
                                   (GPT-2); positions < max_pos */
    int        qkv_bias;        /* 1: bq, bk, bv added after the projections */
    int        o_bias;          /* 1: bo added after the output projection */
    int        mlp_bias;        /* 1: b_up, b_down (and b_gate when gated);
                                   dense models only */
    int        qk_norm;         /* 1: RMSNorm(head_dim) with q_norm / k_norm
                                   on every q and k head, before RoPE
                                   (Qwen3) */
    int        router_no_renorm;/* 1: top-k weights are the raw softmax
                                   probabilities (norm_topk_prob false);
                                   0: renormalised to sum 1 (Mixtral) */
    int        shared_ffn_dim;  /* shared expert intermediate size, added
                                   as sigmoid(ws_gate_inp . x) *
                                   shared(x) on MoE layers (Qwen2-MoE);
                                   0: none */
    int        dense_ffn_dim;   /* intermediate_size of the dense MLP layers
                                   of an MoE model (wd_*); 0: none */
    int        n_dense_layers;  /* how many layers have layer_dense[l] */
    uint8_t    layer_dense[MOE_MAX_LAYERS]; /* 1: layer l of an MoE model
                                   runs the dense MLP wd_* instead of
                                   router + experts (mlp_only_layers,
                                   decoder_sparse_step) */
} moe_hparams_t;

/*
 * The fp32 host weights (CPU backend layout), row-major.  Linear weights are
 * stored as HF does, (out_features, in_features), so y = W x is one dot
 * product per output row.  Dense models have n_experts == 1 and router ==
 * NULL.
 */
typedef struct {
    float *embed;       /* (vocab_size, dim) */
    float *attn_norm;   /* (n_layers, dim) */
    float *wq;          /* (n_layers, n_heads * head_dim, dim) */
    float *wk;          /* (n_layers, n_kv_heads * head_dim, dim) */
    float *wv;          /* (n_layers, n_kv_heads * head_dim, dim) */
    float *wo;          /* (n_layers, dim, n_heads * head_dim) */
    float *ffn_norm;    /* (n_layers, dim) */
    float *router;      /* (n_layers, n_experts, dim); NULL when dense */
    float *w_gate;      /* (n_layers, n_experts, ffn_dim, dim)  w1; NULL when
                           ffn_ungated */
    float *w_up;        /* (n_layers, n_experts, ffn_dim, dim)  w3 */
    float *w_down;      /* (n_layers, n_experts, dim, ffn_dim)  w2 */
    float *final_norm;  /* (dim) */
    float *lm_head;     /* (vocab_size, dim); == embed when tied */

    /* Optional tensors, NULL unless the hparams flag named asks for them. */
    float *pos_embed;   /* (max_pos, dim)             learned_pos */
    float *attn_norm_b; /* (n_layers, dim)            norm_layer */
    float *ffn_norm_b;  /* (n_layers, dim)            norm_layer */
    float *final_norm_b;/* (dim)                      norm_layer */
    float *bq;          /* (n_layers, n_heads * head_dim)     qkv_bias */
    float *bk;          /* (n_layers, n_kv_heads * head_dim)  qkv_bias */
    float *bv;          /* (n_layers, n_kv_heads * head_dim)  qkv_bias */
    float *bo;          /* (n_layers, dim)            o_bias */
    float *q_norm;      /* (n_layers, head_dim)       qk_norm */
    float *k_norm;      /* (n_layers, head_dim)       qk_norm */
    float *b_gate;      /* (n_layers, ffn_dim)        mlp_bias && gated */
    float *b_up;        /* (n_layers, ffn_dim)        mlp_bias */
    float *b_down;      /* (n_layers, dim)            mlp_bias */
    float *ws_gate;     /* (n_layers, shared_ffn_dim, dim)   shared expert */
    float *ws_up;       /* (n_layers, shared_ffn_dim, dim) */
    float *ws_down;     /* (n_layers, dim, shared_ffn_dim) */
    float *ws_gate_inp; /* (n_layers, dim)  shared_expert_gate (1, dim) */
    float *wd_gate;     /* (n_layers, dense_ffn_dim, dim)  n_dense_layers > 0;
                           only rows of layer_dense layers are filled (the
                           others are zero), and the router / experts rows
                           of those layers are zero */
    float *wd_up;       /* (n_layers, dense_ffn_dim, dim) */
    float *wd_down;     /* (n_layers, dim, dense_ffn_dim) */
} moe_weights_t;

typedef struct moe_model moe_model_t;

/*
 * Load config.json + safetensors from `dir` into fp32 host weights (the CPU
 * backend's layout; the CUDA backend re-reads the mmapped tensors).
 * top_k_override > 0 replaces the model's num_experts_per_tok.  Errors name
 * the file and tensor.  Caller frees with moe_model_free().
 */
int moe_model_load(const char *dir, int top_k_override, moe_model_t **out,
    char *err, size_t errlen);
void moe_model_free(moe_model_t *m);

/*
 * config.json only (vLLM's load_format "dummy"): hparams are set, no
 * weights are read; only a backend that makes its own weights (the CUDA
 * backend's random init, for benchmarks) can use the result.
 */
int moe_model_load_config(const char *dir, int top_k_override,
    moe_model_t **out, char *err, size_t errlen);
const moe_hparams_t *moe_model_hparams(const moe_model_t *m);

/*
 * Rank `rank` of a tensor-parallel split of a loaded model (fp32 weights):
 * its hparams have n_heads, n_kv_heads and the intermediate sizes divided
 * by tp; q/k/v rows of its heads and gate/up rows of its slice of every
 * expert (column parallel), the matching input columns of o_proj and down
 * (row parallel: their outputs are partial sums that the ranks add, see
 * moe_tp_backend_create); o/down biases on rank 0 only; embeddings, norms,
 * router and lm_head shared with m (which must outlive the shard).
 * MOE_EUNSUPPORTED (err names the sizes) when tp does not divide them.
 */
int moe_model_shard(const moe_model_t *m, int tp, int rank,
    moe_model_t **out, char *err, size_t errlen);
/* bytes of weights as stored in the files */
int64_t moe_model_weight_bytes(const moe_model_t *m);
/* The fp32 weights (owned by the model, immutable). */
const moe_weights_t *moe_model_weights(const moe_model_t *m);
/* The mmapped safetensors set the weights came from (safetensors.h; still
 * open while the model lives, e.g. for a backend that wants bf16). */
const struct moe_st_set *moe_model_tensors(const moe_model_t *m);
/* The model directory as given to moe_model_load(). */
const char *moe_model_dir(const moe_model_t *m);

/*
 * Open without the fp32 copy (the CUDA backend's load: weights go from the
 * mapped files straight to the device): config.json as moe_model_load(),
 * the safetensors set mapped, every tensor the hparams ask for checked
 * for presence and shape (same errors as moe_model_load()), nothing
 * converted.  moe_model_weights() then has NULL arrays until
 * moe_model_load_f32().  Caller frees with moe_model_free().
 */
int moe_model_open(const char *dir, int top_k_override, moe_model_t **out,
    char *err, size_t errlen);

/*
 * Fill the fp32 host weights of an opened model (e.g. falling back to the
 * CPU backend); MOE_OK at once when they are there.  MOE_ENOMEM (nothing
 * kept) or MOE_EINVAL (no tensors: moe_model_load_config()).
 */
int moe_model_load_f32(moe_model_t *m, char *err, size_t errlen);

/* Logical weights: the moe_weights_t field of the same name. */
typedef enum {
    MOE_WK_EMBED = 0, MOE_WK_LM_HEAD, MOE_WK_POS_EMBED, MOE_WK_FINAL_NORM,
    MOE_WK_FINAL_NORM_B, MOE_WK_ATTN_NORM, MOE_WK_ATTN_NORM_B,
    MOE_WK_FFN_NORM, MOE_WK_FFN_NORM_B,
    MOE_WK_WQ, MOE_WK_WK, MOE_WK_WV,         /* consecutive */
    MOE_WK_WO,
    MOE_WK_BQ, MOE_WK_BK, MOE_WK_BV,         /* consecutive */
    MOE_WK_BO, MOE_WK_Q_NORM, MOE_WK_K_NORM, MOE_WK_ROUTER,
    MOE_WK_GATE, MOE_WK_UP, MOE_WK_DOWN,     /* w_gate, w_up, w_down */
    MOE_WK_B_GATE, MOE_WK_B_UP, MOE_WK_B_DOWN,
    MOE_WK_WS_GATE, MOE_WK_WS_UP, MOE_WK_WS_DOWN, MOE_WK_WS_GATE_INP,
    MOE_WK_WD_GATE, MOE_WK_WD_UP, MOE_WK_WD_DOWN,
    MOE_WK_COUNT
} moe_wkind_t;

/*
 * One piece of a source tensor that is one logical weight: the (rows,
 * cols) row-major matrix (a vector: rows 1) of `kind` for `layer` and
 * `expert`, i.e. the slice of the moe_weights_t array of that kind at
 * ((layer * (expert >= 0 ? n_experts : 1) + expert) * rows * cols), with
 * layer / expert read as 0 when -1.  Destination element (r, c) is source
 * element data[r * ld + c], or data[c * ld + r] when transposed (GPT-2
 * Conv1D); so the source bytes used are the span of (transposed ? cols :
 * rows) source rows of ld elements, the last one only (transposed ? rows :
 * cols) long.  Pointers point into the mapped files (alive while the model
 * is); data may be unaligned.  A tied lm_head has no piece.
 */
typedef struct {
    int          kind;        /* moe_wkind_t */
    int          layer;       /* -1: not per layer */
    int          expert;      /* -1: not per expert (0: a dense FFN) */
    const char  *name;        /* source tensor name */
    const char  *file;        /* file holding it */
    int          dtype;       /* moe_dtype_t of the source (safetensors.h) */
    const void  *data;        /* source element of destination (0, 0) */
    int64_t      rows, cols;  /* destination shape */
    int          transposed;  /* 1: source is (cols, ld), read by column */
    int64_t      ld;          /* source row stride, elements */
} moe_tensor_ref_t;

/*
 * The one naming logic (both Mixtral expert layouts, transformers 5
 * prefixes, fused gate_up halves, GPT-2 names and Conv1D transposes, tied
 * lm_head, Qwen shared experts, dense layers, biases): call fn once per
 * piece, in checkpoint order (embeddings, then layer by layer).  Missing
 * tensor / wrong shape: MOE_EFORMAT with the file and tensor in err, as
 * moe_model_load().  fn returns MOE_OK to go on; anything else stops the
 * walk and is returned (fn writes its own reason).  fn == NULL only
 * checks.  MOE_EINVAL when the model has no tensors (load_config).
 */
int moe_model_for_each_tensor(const moe_model_t *m,
    int (*fn)(void *ctx, const moe_tensor_ref_t *t), void *ctx, char *err,
    size_t errlen);

/*
 * The same walk restricted to rank `rank` of tp (moe_model_shard's split):
 * each piece's rows or columns narrowed to the rank's slice (data moved,
 * rows / cols divided, ld kept), replicated pieces unchanged, o_proj and
 * down biases given to rank 0 only (other ranks' destinations must hold
 * zeros).  tp <= 1: moe_model_for_each_tensor.
 */
int moe_model_for_each_tensor_shard(const moe_model_t *m, int tp, int rank,
    int (*fn)(void *ctx, const moe_tensor_ref_t *t), void *ctx, char *err,
    size_t errlen);

/* hp with n_heads, n_kv_heads and the intermediate sizes divided by tp;
 * MOE_EUNSUPPORTED (err names the sizes) when tp does not divide them. */
int moe_hparams_shard(const moe_hparams_t *hp, int tp, moe_hparams_t *out,
    char *err, size_t errlen);


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
     * token by these parameters, exactly moe_sample_u() (sampling.h) with
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
} moe_seq_batch_t;

/*
 * Check one step's batch before a backend touches its KV cache: every
 * entry has tokens in the vocabulary, a position range within the model's
 * limits, and a block table covering it with ids in [0, n_blocks).  On
 * MOE_OK *n_tokens is the step's token count (at most max_tokens),
 * *n_table the block-table entries the step needs and *max_ctx the largest
 * pos + n_tokens.  MOE_EINVAL otherwise.
 */
int moe_batch_check(const moe_hparams_t *hp, const moe_seq_batch_t *seqs,
    int n, int n_blocks, int block_size, int max_tokens, int *n_tokens,
    size_t *n_table, int *max_ctx);

typedef struct moe_backend moe_backend_t;

struct moe_backend {
    const char *name;             /* "cpu" | "cuda" */
    int64_t     kv_bytes_per_block;
    /* 1: forward() honours moe_seq_batch_t.sample (draws tokens itself,
     * no logits copy); 0: only greedy token_out */
    int         sample_tokens;
    /* run one step over n sequences; MOE_OK or a status */
    int  (*forward)(moe_backend_t *b, const moe_seq_batch_t *seqs, int n);
    /* per-expert token counts (n_layers * n_experts), may be NULL */
    const int64_t *(*expert_counts)(moe_backend_t *b);
    void (*destroy)(moe_backend_t *b);

    /*
     * Swap space (preemption by swapping, vLLM's swap_space): a host pool
     * of n_swap_slots slots of kv_bytes_per_block bytes each, owned by the
     * backend; a slot holds one whole block (every layer, K and V) in the
     * backend's own KV element type.  The engine does the slot
     * book-keeping (moe_slots_t, kv.h).  Any of these pointers may be NULL
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
};

/*
 * CPU backend (fp32 reference).  Allocates a KV pool of n_blocks pages of
 * block_size tokens: (n_blocks, n_layers, 2, block_size, n_kv_heads,
 * head_dim) floats.  The model must outlive the backend.
 */
int moe_cpu_backend_create(const moe_model_t *m, int n_blocks,
    int block_size, int n_threads, moe_backend_t **out, char *err,
    size_t errlen);

/* Sums a buffer of n floats over the tensor-parallel ranks, in place, as
 * an all-reduce: every rank calls it at the same point of its forward and
 * gets the same sum (ranks added in order 0..tp-1). */
typedef void (*moe_reduce_fn)(void *ctx, float *buf, size_t n);

/* A CPU backend calls fn after o_proj and after the FFN of every layer
 * (the row-parallel partial sums of a shard, moe_model_shard). */
void moe_cpu_backend_set_reduce(moe_backend_t *b, moe_reduce_fn fn,
    void *ctx);

/*
 * Tensor parallelism on the CPU: tp ranks, each a CPU backend over
 * moe_model_shard(m, tp, rank) with its own KV pool (its kv heads) of
 * n_blocks blocks and n_threads / tp threads, run one step together: rank
 * 0 on the calling thread, the others on their own threads, the partial
 * sums all-reduced between them (moe_reduce_fn).  Rank 0 writes the
 * step's logits / tokens.  The same block ids name the same positions on
 * every rank; swap slots likewise.  The model must outlive the backend.
 * tp 1 is a plain CPU backend.
 */
int moe_tp_backend_create(const moe_model_t *m, int tp, int n_blocks,
    int block_size, int n_threads, moe_backend_t **out, char *err,
    size_t errlen);

/* How the all-reduce adds and copies the ranks' buffers: host loops for
 * CPU ranks, kernels for CUDA ranks (moe_cuda_tp_ops). sum: dst[i] =
 * srcs[0][i] + ... + srcs[R-1][i] for lo <= i < hi (a NULL src adds
 * nothing); copy: n floats; both complete before returning. */
typedef struct {
    int   (*sum)(void *rank_ctx, float *dst, float *const *srcs, int R,
                 size_t lo, size_t hi);
    int   (*copy)(void *rank_ctx, float *dst, const float *src, size_t n);
    void *(*alloc)(size_t bytes);       /* the shared sum buffer */
    void  (*free)(void *p);
} moe_tp_ops_t;

/*
 * The tensor-parallel step around tp rank backends already made (each over
 * its shard; shards may be NULL when the ranks own nothing of the caller):
 * set_reduce installs the all-reduce in each.  Takes ownership of the
 * ranks (and shards) also on failure.
 */
int moe_tp_backend_wrap(moe_backend_t **ranks, moe_model_t **shards, int tp,
    const moe_tp_ops_t *ops, void **op_ctx,
    void (*set_reduce)(moe_backend_t *b, moe_reduce_fn fn, void *ctx),
    moe_backend_t **out, char *err, size_t errlen);

/* Rank `rank` of a tensor-parallel backend (tests); a plain backend is its
 * own rank 0. */
moe_backend_t *moe_tp_backend_rank(moe_backend_t *b, int rank);

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

#endif /* MOE_MODEL_H */
