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
    MOE_ARCH_MIXTRAL         /* MixtralForCausalLM */
} moe_arch_t;

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
    float *w_gate;      /* (n_layers, n_experts, ffn_dim, dim)  w1 */
    float *w_up;        /* (n_layers, n_experts, ffn_dim, dim)  w3 */
    float *w_down;      /* (n_layers, n_experts, dim, ffn_dim)  w2 */
    float *final_norm;  /* (dim) */
    float *lm_head;     /* (vocab_size, dim); == embed when tied */
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
const moe_hparams_t *moe_model_hparams(const moe_model_t *m);
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
 * One sequence's share of a forward step.  The backend processes
 * tokens[0..n_tokens) at positions pos..pos+n_tokens-1, writing their K/V
 * into the pages named by block_table (block b holds positions
 * [b*block_size, (b+1)*block_size)), attending causally over positions
 * 0..pos+i.  If logits != NULL the logits (vocab_size floats) of the LAST
 * token are written there.
 */
typedef struct {
    const int32_t *tokens;
    int            n_tokens;
    int            pos;
    const int32_t *block_table;
    int            n_blocks;      /* entries in block_table */
    float         *logits;        /* (vocab_size) or NULL */
} moe_seq_batch_t;

typedef struct moe_backend moe_backend_t;

struct moe_backend {
    const char *name;             /* "cpu" | "cuda" */
    int64_t     kv_bytes_per_block;
    /* run one step over n sequences; MOE_OK or a status */
    int  (*forward)(moe_backend_t *b, const moe_seq_batch_t *seqs, int n);
    /* per-expert token counts (n_layers * n_experts), may be NULL */
    const int64_t *(*expert_counts)(moe_backend_t *b);
    void (*destroy)(moe_backend_t *b);
};

/*
 * CPU backend (fp32 reference).  Allocates a KV pool of n_blocks pages of
 * block_size tokens: (n_blocks, n_layers, 2, block_size, n_kv_heads,
 * head_dim) floats.  The model must outlive the backend.
 */
int moe_cpu_backend_create(const moe_model_t *m, int n_blocks,
    int block_size, int n_threads, moe_backend_t **out, char *err,
    size_t errlen);

#endif /* MOE_MODEL_H */
