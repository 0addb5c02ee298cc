/*
 * The model (engine internal): hyperparameters, fp32 host weights, loading,
 * the tensor walk the backends load from, and tensor-parallel sharding.
 * What a backend is and how one is made: backends/backend.h.
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
#include "model/quant.h"

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

    /* RoPE scaling (config.json rope_scaling / rope_parameters; the
     * frequencies: model/rope.c) */
    int        rope_type;       /* moe_rope_type_t */
    float      rope_factor;     /* linear, dynamic, yarn, llama3 */
    int        rope_orig_max;   /* original_max_position_embeddings (yarn,
                                   llama3, dynamic: else max_pos) */
    float      rope_low_freq;   /* llama3 low_freq_factor */
    float      rope_high_freq;  /* llama3 high_freq_factor */
    float      rope_beta_fast;  /* yarn, default 32 */
    float      rope_beta_slow;  /* yarn, default 1 */
    float      rope_mscale;     /* yarn mscale (0: absent) */
    float      rope_mscale_all; /* yarn mscale_all_dim (0: absent) */
    float      rope_attn_factor;/* yarn attention_factor (0: derived) */
    int        rope_truncate;   /* yarn truncate (default 1) */
    int        rope_factor_from_len; /* yarn: factor = max_pos / orig_max
                                   (original_max_position_embeddings given) */

    /* Expert parallelism (a rank's shard, moe_hparams_shard_ep): this
     * rank holds the whole experts [expert_first, expert_first +
     * n_local_experts) of the n_experts its router scores; its expert
     * weight arrays have n_local_experts entries per layer, and its FFN
     * output holds only those experts' weighted rows (a partial sum the
     * ranks add).  n_local_experts 0: every expert (no expert
     * parallelism); use moe_hp_local_experts(). */
    int        expert_first;
    int        n_local_experts;
} moe_hparams_t;

/* Experts whose weights this model (or shard) holds, per layer. */
static inline int
moe_hp_local_experts(const moe_hparams_t *hp)
{
    return hp->n_local_experts > 0 ? hp->n_local_experts : hp->n_experts;
}

typedef enum {
    MOE_ROPE_DEFAULT = 0,
    MOE_ROPE_LINEAR  = 1,
    MOE_ROPE_DYNAMIC = 2,
    MOE_ROPE_YARN    = 3,
    MOE_ROPE_LLAMA3  = 4
} moe_rope_type_t;

/*
 * The rotary frequencies transformers computes for hp (rope_theta,
 * head_dim, the scaling type): inv_freq[i] for i < head_dim / 2, and the
 * factor cos and sin are multiplied by (yarn's attention scaling; 1 for
 * the others).  For dynamic scaling these are the frequencies up to the
 * original context; moe_rope_dynamic_base() gives the base for a longer
 * sequence.
 */
void moe_rope_inv_freq(const moe_hparams_t *hp, float *inv_freq,
    float *attn_scale);

/*
 * Dynamic NTK scaling: the rope base for a sequence of seq_len positions
 * (transformers: base * (factor * L / orig - (factor - 1))^(d / (d - 2))
 * once L > orig; rope_theta otherwise), and the per-dimension frequencies
 * of that base.  Other types: rope_theta.
 */
double moe_rope_dynamic_base(const moe_hparams_t *hp, int seq_len);
void moe_rope_inv_freq_base(const moe_hparams_t *hp, double base,
    float *inv_freq);

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
/* Free a model (and its mapped files); a shard frees only the arrays it
 * sliced.  NULL is ignored. */
void moe_model_free(moe_model_t *m);

/*
 * config.json only (vLLM's load_format "dummy"): hparams are set, no
 * weights are read; only a backend that makes its own weights (the CUDA
 * backend's random init, for benchmarks) can use the result.
 */
int moe_model_load_config(const char *dir, int top_k_override,
    moe_model_t **out, char *err, size_t errlen);
/* The model's hyperparameters (owned by the model; a shard's are
 * divided by tp, moe_hparams_shard). */
const moe_hparams_t *moe_model_hparams(const moe_model_t *m);

/*
 * Rank `rank` of a tensor-parallel split of a loaded model (fp32 weights):
 * its hparams have n_heads, n_kv_heads and the intermediate sizes divided
 * by tp; q/k/v rows of its heads and gate/up rows of its slice of every
 * expert (column parallel), the matching input columns of o_proj and down
 * (row parallel: their outputs are partial sums that the ranks add, see
 * moe_tp_backend_wrap, backends/backend.h); o/down biases on rank 0 only; embeddings, norms,
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
 * The checkpoint's per-layer KV cache scales (fp8 KV cache, vLLM's
 * self_attn.k_scale / v_scale, also k_proj/v_proj.output_scale and
 * AutoFP8's kv_scale), read when the tensors are opened: 1 with
 * hparams.n_layers values in k and v each, or 0 (the checkpoint has
 * none, or load_format dummy).  Scales for some layers only, or a scale
 * not one finite value > 0: MOE_EFORMAT (per-head scales:
 * MOE_EUNSUPPORTED), the tensor or layer named in err.  Such a model
 * still loads (a bf16 cache never reads them); the backend factory
 * refuses it only for an fp8 cache without YAML scales.  A shard has its
 * parent's.
 */
int moe_model_kv_scales(const moe_model_t *m, float *k, float *v, char *err,
    size_t errlen);

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
    /* quantized checkpoints (model/quant.h): non-NULL for a quantized
     * linear weight, its packed form (the whole tensor, rows x cols
     * before any tensor-parallel narrowing); then dtype is F32 and data
     * the exact fp32 dequantization, both alive during the callback
     * only (copy what you keep) */
    const struct moe_qtensor *quant;
    /* moe_model_for_each_tensor_packed_shard_ep: a quantized piece is the
     * slice [q_row0, q_row0 + rows) x [q_col0, q_col0 + cols) of the whole
     * quant tensor (data / ld unchanged); 0 elsewhere */
    int64_t      q_row0, q_col0;
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

/* ---------------------------------------------- expert parallelism */

/*
 * The expert-parallel split (expert_parallel: true): attention, the
 * shared expert and dense layers split over tp as moe_model_shard does;
 * the routed experts are NOT split but placed whole, n_experts / tp
 * contiguous experts per rank (rank r: experts [r * E / tp, (r + 1) * E /
 * tp)), every rank keeping the whole router.  ep 0: exactly the
 * tensor-parallel functions above.
 *
 * moe_hparams_shard_ep: as moe_hparams_shard, ffn_dim kept, expert_first
 *   and n_local_experts set; MOE_EUNSUPPORTED (err says why) when the
 *   model has no routed experts or tp does not divide n_experts.
 * moe_model_shard_ep: the fp32 shard (expert arrays (n_layers,
 *   n_local_experts, ...), sliced copies owned by the shard).
 * moe_model_for_each_tensor_shard_ep: the walk; routed expert pieces of
 *   other ranks are skipped, the rank's own passed whole with expert
 *   renumbered from 0 (expert - expert_first).
 */
int moe_hparams_shard_ep(const moe_hparams_t *hp, int tp, int rank, int ep,
    moe_hparams_t *out, char *err, size_t errlen);
int moe_model_shard_ep(const moe_model_t *m, int tp, int rank, int ep,
    moe_model_t **out, char *err, size_t errlen);
int moe_model_for_each_tensor_shard_ep(const moe_model_t *m, int tp,
    int rank, int ep, int (*fn)(void *ctx, const moe_tensor_ref_t *t),
    void *ctx, char *err, size_t errlen);
/* ---- quantized checkpoints (model/quant.h) ---- */

/*
 * moe_model_load (open_only 0) or moe_model_open (1) with vLLM's
 * `quantization` value (NULL or "": none) checked against config.json's
 * quantization_config; "fp8" on an unquantized checkpoint quantizes every
 * linear weight per output channel at load.  Quantized weights reach the
 * fp32 arrays dequantized, and the tensor walk's pieces carry their packed
 * form (moe_tensor_ref_t.quant).  A malformed quantization_config or
 * quantized tensor, or a disagreeing `quantization`: MOE_EINVAL naming the
 * file, tensor and problem.
 */
int moe_model_load_quant(const char *dir, int top_k_override,
    const char *quantization, int open_only, moe_model_t **out, char *err,
    size_t errlen);

/*
 * moe_model_for_each_tensor (one rank, no tensor parallelism) for a
 * backend that reads quantized weights as they are: a quantized piece has
 * quant set, data == quant->qweight and dtype == quant->qdtype, and
 * nothing is dequantized (YAML fp8 at load still quantizes each weight,
 * into buffers alive during the callback).  Other pieces as
 * moe_model_for_each_tensor.  fn must not be NULL (MOE_EINVAL).
 */
int moe_model_for_each_tensor_packed(const moe_model_t *m,
    int (*fn)(void *ctx, const moe_tensor_ref_t *t), void *ctx, char *err,
    size_t errlen);

/*
 * moe_model_for_each_tensor_packed restricted to rank `rank` of tp,
 * expert parallel when ep (moe_model_for_each_tensor_shard_ep's split):
 * float pieces narrowed as there; a quantized piece keeps quant, data
 * and ld whole, with rows / cols the rank's and q_row0 / q_col0 where its
 * slice starts (the backend cuts the packed form on the boundaries the
 * format allows).  Errors as moe_model_for_each_tensor_shard_ep.
 */
int moe_model_for_each_tensor_packed_shard_ep(const moe_model_t *m, int tp,
    int rank, int ep, int (*fn)(void *ctx, const moe_tensor_ref_t *t),
    void *ctx, char *err, size_t errlen);

/*
 * moe_model_for_each_tensor_packed_shard_ep's pieces described, not made:
 * the same calls with the same names, kinds, shapes, slices and quant
 * fields (layout, dtypes, scale shape, groups), but a piece that the
 * packed walk builds on the host (YAML fp8 quantized at load,
 * compressed-tensors int4 converted to GPTQ's layout) is neither
 * quantized nor converted: its data pointers point at the source tensors
 * and must not be read.  For plans and sizes before the one walk that
 * uploads (a Mixtral under YAML fp8: ~600 s of quantizing on one core
 * per walk).
 */
int moe_model_for_each_tensor_packed_describe(const moe_model_t *m, int tp,
    int rank, int ep, int (*fn)(void *ctx, const moe_tensor_ref_t *t),
    void *ctx, char *err, size_t errlen);

/* The model's quantization (method MOE_QM_NONE: float weights). */
const moe_qconfig_t *moe_model_quant(const moe_model_t *m);

#endif /* MOE_MODEL_H */
