/*
 * The CUDA backend: moe_backend_t over one GPU, one rank (the whole model
 * or one tensor-parallel rank's slice; backend.c composes ranks through
 * tp.c, with moe_cuda_tp_ops for the all-reduce).
 *
 * A step: the host packs token ids, positions, cache slots, sequence ids,
 * block tables and the rows whose logits are wanted into one pinned
 * buffer, copies it once, then per layer:
 *   add+RMSNorm -> xb (bf16) -> one QKV GEMM (fp32 out) -> RoPE + K/V write
 *   -> paged attention (bf16 out) -> O GEMM (fp32 delta) -> add+RMSNorm ->
 *   router/top-k (fp32) -> permute (one block: counts, offsets, rows) ->
 *   experts -> weighted un-permute (fp32 delta).
 * Experts, small steps (T <= gemv_max_t): one grouped tensor-core GEMV
 *   launch for gate|up of all experts (inputs gathered through the row
 *   map, SiLU*up fused, bf16 out) and one for down: no host sync.
 * Experts, larger steps: the expert offsets are copied to the host (the
 *   only sync inside the step), gather, per-expert cuBLAS GEMMs, SiLU*up.
 * Dense GEMMs (qkv, o, lm_head, dense FFN) use the GEMV for T <=
 * dense_gemv_t (16) and cuBLAS above.
 * Finally the last token of each sequence that wants logits or a greedy
 * token goes through the final norm and lm_head (64 rows at a time); an
 * argmax kernel picks each row's greedy id (below its n_valid), and only
 * the ids plus the fp32 logits of rows that asked for logits are copied
 * back.  The residual stream stays fp32 throughout.
 * Quantized checkpoints (backends/qweights.h): the linear parts stay
 *   packed (fp8 / AWQ / GPTQ, kernels/quant_gemv.h); cb_dense_proj and
 *   cb_expert_proj choose between the quantized GEMV (decode-sized steps)
 *   and dequantizing one part into b->qscratch for the bf16 GEMMs.
 *
 * CUDA graphs: a step of T <= CB_GRAPH_MAX_T tokens with at most
 * CB_LOGIT_ROWS logits rows (decode, small prefill chunks) runs as a graph
 * captured once per (T, logits rows): everything it reads from the host
 * lives in the staging buffer, copied before the replay; kernel shapes
 * depend on T only.  Off while profiling, or with the tuning record's
 * graphs = 0.  Steps whose experts take the cuBLAS path (host sync) never
 * run as graphs; steps above gemv_max_t up to ggemm_max_t take the grouped
 * tensor-core GEMM with device-side offsets instead.
 *
 * Tuning: one moe_cuda_tuning_t per backend (kernels/tuning.h), read once
 * in cb_create by moe_cuda_tuning_read (defaults + MOE_CUDA_* overrides,
 * cuda_tuning.c), logged, and handed to the launchers that use a knob.
 * Every knob, its default and its measurement: kernels/TUNING.md.
 *
 * Optional architecture pieces (moe_hparams_t flags; Qwen2, Qwen2-MoE,
 * Qwen3-MoE, GPT-2) follow cpu_backend.c step by step: q/k/v and o biases
 * added after their GEMMs, per-head q/k RMSNorm before RoPE, LayerNorm
 * with bias, learned positions (no RoPE), GELU, ungated and biased MLPs
 * (a generic GEMM -> activation -> GEMM path; the fused SiLU GEMV stays
 * the fast path for plain SwiGLU), raw top-k weights, the sigmoid-gated
 * shared expert added after the routed sum, and dense layers of an MoE
 * model.  All of it is graph-safe (no host sync).
 */

#include <limits.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "common.cuh"
#include "backends/cuda_backend.h"
#include "backends/cuda_tuning.h"
#include "backends/cuda_share.h"
#include "arch.h"
#include "argmax.h"
#include "convert.h"
#include "sample.h"
#include "mask.h"
#include "logit_bias.h"
#include "logprobs.h"
#include "attention.h"
#include "embed.h"
#include "gemm.h"
#include "init.h"
#include "moe_gemv.h"
#include "moe_ggemm.h"
#include "gemm_fp8.h"
#include "fp8_grouped.h"
#include "moe_permute.h"
#include "moe_route.h"
#include "norm_route.h"
#include "rmsnorm.h"
#include "rope.h"
#include "silu_mul.h"
#include "tp_sum.h"
#include "quant_gemv.h"
#ifdef MOE_HAVE_NCCL
#include <nccl.h>

/* An NCCL call: on failure the statement, file:line and NCCL's reason go
 * to moe_cuda_last_error() and the caller returns MOE_EBACKEND. */
#define MOE_NCCL_CHECK(stmt)                                                 \
    do {                                                                     \
        ncclResult_t moe_n_ = (stmt);                                        \
        if (moe_n_ != ncclSuccess) {                                         \
            moe_cuda_set_error("%s at %s:%d: %s (%s)", #stmt, __FILE__,      \
                               __LINE__, ncclGetErrorString(moe_n_),         \
                               ncclGetLastError(NULL));                      \
            return MOE_K_EBACKEND;                                           \
        }                                                                    \
    } while (0)
#endif

extern "C" {
#include "model/safetensors.h"
#include "backends/qweights.h"
#include "sampling/sampling.h"

static_assert((int) MOE_K_OK == (int) MOE_OK
              && (int) MOE_K_EINVAL == (int) MOE_EINVAL
              && (int) MOE_K_EUNSUPPORTED == (int) MOE_EUNSUPPORTED
              && (int) MOE_K_EBACKEND == (int) MOE_EBACKEND,
              "kernel launcher status codes match the engine's");
static_assert((int) MOE_K_DT_F32 == (int) MOE_DT_F32
              && (int) MOE_K_DT_F16 == (int) MOE_DT_F16
              && (int) MOE_K_DT_BF16 == (int) MOE_DT_BF16,
              "moe_cuda_convert's dtypes are the safetensors reader's");
static_assert(MOE_QW_FP8_CHANNEL == MOE_K_FP8_CHANNEL
              && MOE_QW_FP8_BLOCK == MOE_K_FP8_BLOCK
              && MOE_QW_BLOCK == 128,
              "qweights.h's fp8 modes are kernels/quant_gemv.h's");
static_assert(MOE_K_LOGPROBS_MAX_K == MOE_MAX_TOP_LOGPROBS,
              "kernels/logprobs.h and moe.h disagree on the top limit");
static_assert(MOE_K_GREEDY_TEMPERATURE == MOE_GREEDY_TEMPERATURE,
              "the device sampler's greedy threshold is the host's");
}

#define CB_ALIGN        256
#define CB_LOGIT_ROWS   64                  /* lm_head rows per pass */
/* the logprobs results buffer (cb_logprobs): values, top ids, top lps */
#define CB_LP_K         MOE_K_LOGPROBS_MAX_K
#define CB_LP_FLOATS    ((size_t) CB_LOGIT_ROWS * (1 + 2 * CB_LP_K))
/* the logit_bias buffers (cb_bias): every row's whole list fits */
#define CB_BIAS_N       ((size_t) CB_LOGIT_ROWS * MOE_MAX_LOGIT_BIAS)
#define CB_BIAS_BYTES   ((2 * (size_t) CB_LOGIT_ROWS + 2 * CB_BIAS_N) \
                         * sizeof(int32_t))
#define CB_LP_VAL(p)    (p)
#define CB_LP_ID(p)     ((int32_t *) ((p) + CB_LOGIT_ROWS))
#define CB_LP_TOP(p)    ((p) + CB_LOGIT_ROWS                               \
                         + (size_t) CB_LOGIT_ROWS * CB_LP_K)
#define CB_STAGE_FIXED  8                   /* staging arrays of cap ints */
#define CB_BLAS_WS      ((size_t) 32 << 20)
#define CB_SLACK        ((int64_t) 256 << 20)
#define CB_GRAPH_MAX_T  64
#define CB_MAX_GRAPHS   160
#define CB_NOGRAPH      (-1000)             /* internal: run eagerly */

typedef struct {
    int             T, n_out, long_ctx;
    cudaGraphExec_t exec;
} cb_graph_t;

typedef __nv_bfloat16 bf16;

/*
 * One linear part of a layer on the device (qweights.h): count matrices
 * (N, K) in format fmt.  bf16: w is the part's first row inside its
 * stacked group, expert e at w + e * grows * K elements; packed formats:
 * the kernels' layouts (kernels/quant_gemv.h), expert e at e times one
 * matrix's size, except in a stacked group (stacked 1, qweights.h: fp8
 * expert e at w + e * grows * K bytes, scales at scale + e *
 * cb_fp8_sstride; 4-bit tensors of ld = grows columns; such a part runs only as its group,
 * cb_group).  w NULL: the layer has no such part.
 */
typedef struct {
    int             fmt, mode, G, zero_bias;
    int             N, K, count, grows;
    int             stacked;       /* in a stacked group */
    int             view;          /* a whole stacked group (cb_group) */
    int             tiled;         /* 4-bit: qweight in the tiled layout
                                      (kernels/quant_gemv.h; a stacked
                                      group's parts all alike) */
    int             awq_gptq;      /* AWQ repacked into GPTQ's layout at
                                      load (q4_layout 1): fmt reads
                                      MOE_WF_GPTQ, zero_bias 0, once the
                                      bytes are (cb_q4_settle) */
    int             ld;            /* rows (fp8) / columns (4-bit) stored
                                      per expert: N, or the group's grows
                                      when stacked */
    void           *w;             /* bf16 / e4m3 / qweight i32 */
    float          *scale;         /* fp8 (count, n_scales) */
    int32_t        *zeros;         /* 4-bit (count, K / G, N / 8) */
    uint16_t       *scales;        /* 4-bit (count, K / G, N) f16 */
    int32_t        *g_idx;         /* gptq (count, K) or NULL */
} cb_qw_t;


/* fp8: e4m3 bytes / fp32 scales from one expert's matrix to the next */
static size_t
cb_fp8_wstride(const cb_qw_t *w)
{
    return (size_t) w->ld * (size_t) w->K;
}


static size_t
cb_fp8_sstride(const cb_qw_t *w)
{
    return moe_qw_fp8_scale_count(w->mode, w->ld, w->K);
}

typedef struct {
    moe_backend_t   base;          /* first: the public interface */
    moe_hparams_t   hp;
    int             device;
    int             tp, rank;       /* tensor-parallel rank (1, 0: all) */
    moe_reduce_fn   reduce;         /* all-reduce of the partial sums */
    void           *reduce_ctx;
    /* NCCL (moe_cuda_nccl_attach): this rank's communicator, used instead
     * of reduce; the owner (rank 0) also holds the clique to free */
    void           *nccl;           /* ncclComm_t */
    void          **nccl_all;       /* (nccl_n) on the owner, else NULL */
    int             nccl_n;
    int             El;             /* experts held (moe_hp_local_experts) */
    int             n_blocks;
    int             block_size;
    int             cap;           /* max tokens per forward */
    int             K;             /* top_k (1 when dense) */
    int             Q, KVD;        /* n_heads * hd, n_kv_heads * hd */
    cudaStream_t    stream;
    cublasHandle_t  blas;
    void           *blas_ws;

    /* weights: one allocation, layout in cuda_backend.h */
    void           *wbuf;
    moe_cuda_wmem_t wmem;          /* wbuf's memory: shared across reloads
                                      (cuda_share.h; "Reload" below) */
    char            share_key[MOE_SHARE_KEY_MAX]; /* "": not shared */
    bf16           *embed;         /* (vocab, dim) */
    bf16           *lm_head;       /* (vocab, dim) */
    /* the linear parts (q, k, v, o, experts, shared expert, dense
     * layers), each in its plan's format: qw[l * MOE_QP_N + part] */
    moe_qplan_t    *plan;
    int             fp8_act;       /* cb_fp8_gemm allowed (fp8 activations) */
    int             step_fp8g;     /* cb_fp8g_layers(b, T) of the step
                                      cb_run is running (set once there,
                                      0 for GEMV steps, which never ask:
                                      cb_ffn asks per layer) */
    cb_qw_t        *qw;
    float          *attn_norm;     /* (L, dim) */
    float          *ffn_norm;      /* (L, dim) */
    float          *final_norm;    /* (dim) */
    float          *router;        /* (L, E, dim) or NULL */
    /* optional pieces (NULL unless the hparams flag asks for them) */
    float          *pos_embed;     /* (max_pos, dim) learned_pos */
    float          *attn_norm_b;   /* (L, dim) norm_layer */
    float          *ffn_norm_b;    /* (L, dim) norm_layer */
    float          *final_norm_b;  /* (dim) norm_layer */
    float          *bqkv;          /* (L, Q + 2 KVD) qkv_bias */
    float          *bo;            /* (L, dim) o_bias */
    float          *q_norm;        /* (L, hd) qk_norm */
    float          *k_norm;        /* (L, hd) qk_norm */
    float          *b_gu;          /* (L, 2 ffn) mlp_bias: gate | up */
    float          *b_down;        /* (L, dim) mlp_bias */
    float          *ws_gate_inp;   /* (L, dim) shared expert gate */
    int             G;             /* rows of w_gu per expert: 2 ffn, or
                                      ffn when ungated */
    int             dense_slot[MOE_MAX_LAYERS]; /* layer -> wd_* index */

    bf16           *kv;            /* (L, n_blocks, 2, bs, n_kv, hd);
                                      e4m3 bytes when kv_fp8 */
    moe_cuda_kvpool_t kvpool;      /* kv's memory when it grows (base set:
                                      weights imported, "Reload" below) */
    /* fp8 KV cache and long contexts (moe_cuda_backend_create_kv) */
    int             kv_fp8;        /* 1: the cache holds e4m3 */
    float           kv_ks[MOE_MAX_LAYERS];  /* its per-tensor K / V */
    float           kv_vs[MOE_MAX_LAYERS];  /* scales, by layer */
    int             long_ctx;      /* this step's longest context reaches
                                      tune.att_long_ctx (a graph key) */
    int             att_tc_whole;  /* this step's prefill attention is
                                      all tensor-core tiles (never a
                                      graph: T > CB_GRAPH_MAX_T) */

    /* workspaces: one allocation, N = cap, NK = cap * K */
    void           *wsbuf;
    float          *x;             /* (N, dim) residual stream */
    float          *tmp;           /* (N, dim) sublayer output */
    float          *xf;            /* (N, dim) normed, fp32 (router) */
    bf16           *xb;            /* (N, dim) normed, bf16 */
    float          *qkv;           /* (N, Q + 2 KVD) */
    bf16           *att;           /* (N, Q) */
    int32_t        *sel;           /* (L, NK) chosen experts, per layer so
                                      the last step's routing stays
                                      readable (moe_cuda_backend_last_
                                      routing); layer l at l * NK */
    float          *selw;          /* (NK) */
    int32_t        *slot_of;       /* (NK) */
    const int32_t  *unperm_sel;    /* non-NULL: the last routed layer's
                                      un-permute is left to the next norm
                                      (cb_norm; this layer's sel) */
    const bf16     *unperm_yq;     /* non-NULL with unperm_sel: the expert
                                      rows are cb_fp8_ffn's unscaled down
                                      products (bf16, in qscratch), scales
                                      unperm_qh (rows) and unperm_ws
                                      (unperm_ws_stride per expert), not
                                      ye (moe_cuda_unpermute_rmsnorm_q) */
    const float    *unperm_qh;
    const float    *unperm_ws;
    size_t          unperm_ws_stride;
    const float    *dq_allow;      /* cb_fp8_gemm may leave a dense
                                      projection into this Y (tmp: the
                                      next cb_norm, qkv: the rope)
                                      unscaled for its reader to scale */
    const float    *dq_y;          /* the Y so left (with dq_yq) */
    const bf16     *dq_yq;         /* non-NULL: dq_y's rows are these bf16
                                      unscaled products (qscratch) times
                                      dq_qs[row] * dq_ws[col] */
    const float    *dq_qs;
    const float    *dq_ws;
    int32_t        *erow;          /* (NK) */
    int32_t        *counts;        /* (E) */
    int32_t        *offs;          /* (E + 1) */
    uint32_t       *fgsched;       /* 2: the grouped fp8 GEMMs' tile
                                      counters (MOE_FG_DYN), kept zero */
    int64_t        *d_ecounts;     /* (L, E) running totals */
    float          *att_part;      /* attention split partials */
    float          *margin;        /* (L, N) router margins, last step */
    float          *rlogits;       /* (N, E) router logits */
    bf16           *xe;            /* (NK, dim) */
    float          *gu;            /* (NK, 2 ffn) */
    size_t          gu_bytes;      /* its size (also the fp8 grouped
                                      GEMM's f16 rows: cb_fp8_ggemm) */
    bf16           *hbuf;          /* (NK, ffn) */
    float          *ye;            /* (NK, dim) */
    size_t          qscratch_bytes;
    int64_t         fp8_ffn_layers; /* cb_fp8_ffn runs (tests) */
    int64_t         fp8_grouped_layers; /* ... of them on the grouped
                                      GEMM (kernels/fp8_grouped.h) */
    int64_t         q4_tiled_calls; /* 4-bit GEMVs on tiled weights
                                      (tests) */
    int64_t         q4g_calls;      /* 4-bit GEMVs by quantization group
                                      (kernels/q4_group.cu; tests) */
    int64_t         q4w_calls;      /* ... of them with row hints above
                                      CB_Q4G_MAX_ROWS: the warpgroup
                                      kernel (kernels/q4_wgmma.cu) */
    int64_t         row_stats[MOE_CUDA_ROW_STATS]; /* expert_rows */
    /* expert offsets of the layers that ran without a host sync, copied
     * asynchronously for the row statistics (cb_row_log): (L, E + 1)
     * pinned, a flag per layer, the event of the last copy */
    int32_t        *h_offs_log;
    uint8_t        *offs_log_set;
    cudaEvent_t     offs_log_ev;
    moe_fp8_gemm_t *fp8g;          /* cuBLASLt fp8 GEMMs (prefill of fp8
                                      per-channel parts; cb_fp8_gemm) */
    bf16           *qscratch;      /* one packed part dequantized (the
                                      tensor-core path), or NULL */
    bf16           *xlast;         /* (CB_LOGIT_ROWS, dim) */
    float          *logits;        /* (CB_LOGIT_ROWS, vocab) */
    int32_t        *d_tokout;      /* (CB_LOGIT_ROWS) greedy ids */
    int32_t        *d_stage;       /* (stage_ints) */
    float          *d_rope_inv;    /* (head_dim / 2) RoPE frequencies
                                      (model/rope.c); NULL: learned
                                      positions */
    float           rope_att;      /* cos/sin scale (yarn; else 1) */

    /* host side */
    int32_t        *h_stage;       /* (stage_ints) pinned */
    size_t          stage_ints;
    size_t          bt_cap;        /* block-table entries per step */
    int32_t        *h_counts;      /* (E + 1) pinned: expert offsets */
    float          *h_logits;      /* (CB_LOGIT_ROWS, vocab) pinned */
    int32_t        *h_tokout;      /* (CB_LOGIT_ROWS) pinned greedy ids */
    /* device sampling (moe_seq_batch_t.sample): per-row parameters and
     * the rows' penalty lists, pinned host + device, grown on demand */
    moe_cuda_sample_param_t *h_sp, *d_sp;   /* (CB_LOGIT_ROWS) */
    int32_t        *h_pen, *d_pen; /* ids (pen_cap) | counts (pen_cap) |
                                      seen bytes (pen_cap) */
    size_t          pen_cap;
    /* guided decoding (moe_seq_batch_t.mask): the rows' allowed-token
     * bits, pinned host + device, (CB_LOGIT_ROWS, mask_words) */
    uint32_t       *h_mask, *d_mask;
    size_t          mask_words;
    /* logprobs on the device (moe_seq_batch_t.lp_out): per-row parameters
     * and results, pinned host + device; the results are the rows'
     * logprobs (CB_LOGIT_ROWS) floats, then their top ids and top
     * logprobs (CB_LOGIT_ROWS, MOE_K_LOGPROBS_MAX_K) each: 10 KB, not the
     * logits */
    moe_cuda_logprobs_param_t *h_lpp, *d_lpp;
    float          *h_lpo, *d_lpo;
    /* logit_bias on the device (moe_seq_batch_t.bias_ids / bias): pinned
     * host + device, CB_BIAS_BYTES each: per-row offsets (CB_LOGIT_ROWS)
     * and counts (CB_LOGIT_ROWS) int32, then the rows' ids (CB_BIAS_N)
     * int32, then their biases (CB_BIAS_N) fp32 */
    int32_t        *h_bias, *d_bias;
    int            *out_seq;       /* (cap) sequence of each logits row */
    int64_t        *expert_counts; /* (L, E) */
    int             last_T;        /* tokens of the last step */
    int64_t         dense_tokens;  /* E == 1: tokens run (all layers) */
    moe_cuda_tuning_t tune;         /* read once in cb_create */
    int             use_graphs;     /* tune.graphs, 0 after a failed
                                       capture */
    cb_graph_t      graphs[CB_MAX_GRAPHS];
    int             n_graphs;

    /* profiling */
    int             prof;
    cudaEvent_t    *ev;
    int            *ev_stage;
    int             ev_cap;
    int             n_ev;
    double          prof_ms[MOE_CUDA_N_STAGES];

    /* swap space (cb_swap_*): pinned host pool, (n_swap_slots, L, 2, bs,
     * n_kv, hd) bf16, a slot is one block of every layer */
    bf16           *swap_host;
} cuda_backend_t;


/* ------------------------------------------------------------- layouts */

typedef struct {
    size_t off;
} cb_carve_t;


/* Reserve `bytes` (aligned) and return its offset. */
static size_t
cb_take(cb_carve_t *c, size_t bytes)
{
    size_t o = c->off;

    c->off += (bytes + CB_ALIGN - 1) / CB_ALIGN * CB_ALIGN;
    return o;
}


typedef struct {
    size_t embed, lm_head, attn_norm, ffn_norm,
           final_norm, router, pos_embed, attn_norm_b, ffn_norm_b,
           final_norm_b, bqkv, bo, q_norm, k_norm, b_gu, b_down,
           ws_gate_inp, total;
    moe_qoff_t *qoff;              /* (L, MOE_QP_N) or NULL: sizes only */
} cb_wlayout_t;


/* Layers of the model that run the dense MLP wd_* (layer_dense). */
static int
cb_n_dense(const moe_hparams_t *hp)
{
    int l, n = 0;

    if (hp->dense_ffn_dim <= 0) {
        return 0;
    }
    for (l = 0; l < hp->n_layers && l < MOE_MAX_LAYERS; l++) {
        n += hp->layer_dense[l] != 0;
    }
    return n;
}


/* Offset of an optional piece: 0 (unused) unless `on`. */
static size_t
cb_take_if(cb_carve_t *c, int on, size_t bytes)
{
    return on ? cb_take(c, bytes) : 0;
}


/* The weight allocation for hp with its linear parts in plan's formats
 * (qweights.h); l->qoff (set by the caller, or NULL) receives the parts'
 * offsets. */
static void
cb_weight_layout(const moe_hparams_t *hp, const moe_qplan_t *plan,
    cb_wlayout_t *l)
{
    cb_carve_t c = { 0 };
    size_t     L = (size_t) hp->n_layers, D = (size_t) hp->dim;
    size_t     V = (size_t) hp->vocab_size, E = (size_t) hp->n_experts;
    size_t     F = (size_t) hp->ffn_dim;
    size_t     Q = (size_t) hp->n_heads * hp->head_dim;
    size_t     KV = (size_t) hp->n_kv_heads * hp->head_dim;
    size_t     HD = (size_t) hp->head_dim;
    size_t     FS = (size_t) (hp->shared_ffn_dim > 0 ? hp->shared_ffn_dim
                                                     : 0);

    l->embed = cb_take(&c, V * D * 2);
    l->lm_head = hp->tie_embeddings ? l->embed : cb_take(&c, V * D * 2);
    /* q/k/v, o, the rank's routed experts (expert parallel) or all, the
     * shared expert and dense layers, per layer in the plan's formats */
    c.off = moe_qw_layout(hp, plan, c.off, CB_ALIGN, l->qoff);
    l->attn_norm = cb_take(&c, L * D * 4);
    l->ffn_norm = cb_take(&c, L * D * 4);
    l->final_norm = cb_take(&c, D * 4);
    l->router = E > 1 ? cb_take(&c, L * E * D * 4) : 0;
    l->pos_embed = cb_take_if(&c, hp->learned_pos,
                              (size_t) (hp->max_pos > 0 ? hp->max_pos : 1)
                              * D * 4);
    l->attn_norm_b = cb_take_if(&c, hp->norm_layer, L * D * 4);
    l->ffn_norm_b = cb_take_if(&c, hp->norm_layer, L * D * 4);
    l->final_norm_b = cb_take_if(&c, hp->norm_layer, D * 4);
    l->bqkv = cb_take_if(&c, hp->qkv_bias, L * (Q + 2 * KV) * 4);
    l->bo = cb_take_if(&c, hp->o_bias, L * D * 4);
    l->q_norm = cb_take_if(&c, hp->qk_norm, L * HD * 4);
    l->k_norm = cb_take_if(&c, hp->qk_norm, L * HD * 4);
    l->b_gu = cb_take_if(&c, hp->mlp_bias, L * 2 * F * 4);
    l->b_down = cb_take_if(&c, hp->mlp_bias, L * D * 4);
    l->ws_gate_inp = cb_take_if(&c, FS > 0, L * D * 4);
    l->total = c.off;
}


typedef struct {
    size_t x, tmp, xf, xb, qkv, att, sel, selw, slot_of, erow, counts, xe,
           gu, hbuf, ye, xlast, logits, tokout, stage, offs, ecounts,
           att_part, margin, rlogits, fgsched, qscratch, total;
    size_t stage_ints, bt_cap;
} cb_slayout_t;


/* The workspaces; qscratch: bytes of the dequantization scratch
 * (moe_qw_scratch_bytes, 0 without packed parts). */
static void
cb_ws_layout(const moe_hparams_t *hp, int cap, int n_blocks,
    size_t qscratch, cb_slayout_t *l)
{
    cb_carve_t c = { 0 };
    size_t     N = (size_t) cap, D = (size_t) hp->dim;
    size_t     K = (size_t) (hp->n_experts > 1 ? hp->top_k : 1);
    size_t     NK = N * K, F = (size_t) hp->ffn_dim;
    size_t     E = (size_t) hp->n_experts, V = (size_t) hp->vocab_size;
    size_t     H = K * F;          /* hidden width per token, widest MLP */
    size_t     Q = (size_t) hp->n_heads * hp->head_dim;
    size_t     KV = (size_t) hp->n_kv_heads * hp->head_dim;

    if ((size_t) hp->shared_ffn_dim > H) {
        H = (size_t) hp->shared_ffn_dim;
    }
    if ((size_t) hp->dense_ffn_dim > H) {
        H = (size_t) hp->dense_ffn_dim;
    }
    l->x = cb_take(&c, N * D * 4);
    l->tmp = cb_take(&c, N * D * 4);
    l->xf = cb_take(&c, N * D * 4);
    l->xb = cb_take(&c, N * D * 2);
    l->qkv = cb_take(&c, N * (Q + 2 * KV) * 4);
    l->att = cb_take(&c, N * Q * 2);
    l->sel = cb_take(&c, (size_t) hp->n_layers * NK * 4);
    l->selw = cb_take(&c, NK * 4);
    l->slot_of = cb_take(&c, NK * 4);
    l->erow = cb_take(&c, NK * 4);
    l->counts = cb_take(&c, E * 4);
    l->offs = cb_take(&c, (E + 1) * 4);
    l->fgsched = cb_take(&c, 2 * 4);
    l->margin = cb_take(&c, (size_t) hp->n_layers * N * 4);
    l->ecounts = cb_take(&c, (size_t) hp->n_layers * E * 8);
    l->rlogits = cb_take(&c, N * E * 4);
    l->att_part = cb_take(&c, (size_t) moe_cuda_attention_ws_floats(
                                  hp->n_heads, hp->n_kv_heads,
                                  hp->head_dim) * 4);
    l->xe = cb_take(&c, NK * D * 2);
    l->gu = cb_take(&c, N * 2 * H * 4);
    l->hbuf = cb_take(&c, N * H * 2);
    l->ye = cb_take(&c, NK * D * 4);
    l->xlast = cb_take(&c, (size_t) CB_LOGIT_ROWS * D * 2);
    l->logits = cb_take(&c, (size_t) CB_LOGIT_ROWS * V * 4);
    l->tokout = cb_take(&c, (size_t) CB_LOGIT_ROWS * 4);
    /* staging: tokens, pos, slot, tseq, out rows, bt_off, out rows'
     * n_valid (cap each), then the block tables */
    l->bt_cap = (size_t) n_blocks + 4 * N + 65536;
    l->stage_ints = CB_STAGE_FIXED * N + l->bt_cap;
    l->stage = cb_take(&c, l->stage_ints * 4);
    l->qscratch = qscratch > 0 ? cb_take(&c, qscratch) : 0;
    l->total = c.off;
}


static int64_t
cb_weight_bytes_plan(const moe_hparams_t *hp, const moe_qplan_t *plan)
{
    cb_wlayout_t l;

    l.qoff = NULL;
    cb_weight_layout(hp, plan, &l);
    return (int64_t) l.total;
}


static int64_t
cb_workspace_bytes_plan(const moe_hparams_t *hp, const moe_qplan_t *plan,
    int max_batched_tokens)
{
    cb_slayout_t l;

    cb_ws_layout(hp, max_batched_tokens, 0,
                 moe_qw_scratch_bytes(hp, plan), &l);
    return (int64_t) (l.total + CB_BLAS_WS);
}


/* A plan's routed experts' format, MOE_CUDA_EXPERTS_* (the tuning
 * record's automatic gemv_max_t and route_fuse1 depend on it). */
static int
cb_expert_fmt(const moe_qplan_t *plan)
{
    int f = plan != NULL ? (int) plan->f[0][MOE_QP_GATE].fmt
                         : (int) MOE_WF_BF16;

    return f == MOE_WF_FP8 ? MOE_CUDA_EXPERTS_E4M3
           : f == MOE_WF_AWQ || f == MOE_WF_GPTQ ? MOE_CUDA_EXPERTS_4BIT
           : MOE_CUDA_EXPERTS_OTHER;
}


/* A plan on the heap (moe_qplan_t is 50 KB): uniform wfmt (qweights.h);
 * NULL when out of memory or wfmt is unknown. */
static moe_qplan_t *
cb_plan_new(const moe_hparams_t *hp, int wfmt)
{
    moe_qplan_t *p = (moe_qplan_t *) malloc(sizeof(*p));

    if (p != NULL && moe_qw_plan_uniform(hp, wfmt, p) != MOE_OK) {
        free(p);
        p = NULL;
    }
    return p;
}


extern "C" int64_t
moe_cuda_weight_bytes_fmt(const moe_hparams_t *hp, int wfmt)
{
    moe_qplan_t *p = cb_plan_new(hp, wfmt);
    int64_t      n = p != NULL ? cb_weight_bytes_plan(hp, p) : -1;

    free(p);
    return n;
}


extern "C" int64_t
moe_cuda_workspace_bytes_fmt(const moe_hparams_t *hp, int wfmt,
    int max_batched_tokens)
{
    moe_qplan_t *p = cb_plan_new(hp, wfmt);
    int64_t      n = p != NULL
                     ? cb_workspace_bytes_plan(hp, p, max_batched_tokens)
                     : -1;

    free(p);
    return n;
}


extern "C" int64_t
moe_cuda_weight_bytes(const moe_hparams_t *hp)
{
    return moe_cuda_weight_bytes_fmt(hp, MOE_WF_BF16);
}


extern "C" int64_t
moe_cuda_workspace_bytes(const moe_hparams_t *hp, int max_batched_tokens)
{
    return moe_cuda_workspace_bytes_fmt(hp, MOE_WF_BF16, max_batched_tokens);
}


static int64_t
cb_kv_bytes_per_block(const moe_hparams_t *hp, int block_size, int kv_fp8)
{
    /* bf16 elements, or e4m3 (one byte) with kv_cache_dtype fp8 */
    return (int64_t) hp->n_layers * 2 * block_size * hp->n_kv_heads
           * hp->head_dim * (kv_fp8 ? 1 : 2);
}


/* ---------------------------------------------------------- device info */

extern "C" int
moe_cuda_device_count(void)
{
    int         n = 0;
    cudaError_t e = cudaGetDeviceCount(&n);

    if (e != cudaSuccess) {
        (void) cudaGetLastError();
        return 0;
    }
    return n;
}


extern "C" int
moe_cuda_device_runnable(int device, char *why, size_t n)
{
    return moe_cuda_kernels_runnable(device, why, n);
}


static int
cb_check_shapes(const moe_hparams_t *hp, int block_size, int cap, char *err,
    size_t errlen)
{
    if (hp->dim <= 0 || hp->n_layers <= 0 || hp->n_heads <= 0
        || hp->n_kv_heads <= 0 || hp->head_dim <= 0 || hp->ffn_dim <= 0
        || hp->vocab_size <= 0 || hp->n_experts <= 0 || hp->top_k <= 0
        || block_size <= 0 || cap <= 0)
    {
        moe_errf(err, errlen, "cuda backend: bad shape or arguments (dim %d, "
               "layers %d, block_size %d, max tokens %d)", hp->dim,
               hp->n_layers, block_size, cap);
        return MOE_EINVAL;
    }
    if (!moe_cuda_attention_supported(hp->n_heads, hp->n_kv_heads,
                                      hp->head_dim))
    {
        moe_errf(err, errlen, "cuda backend: attention with %d heads, %d kv "
               "heads, head_dim %d not supported (head_dim %% 8 == 0, <= "
               "256; at most 8 query heads per kv head)", hp->n_heads,
               hp->n_kv_heads, hp->head_dim);
        return MOE_EUNSUPPORTED;
    }
    if (hp->n_experts > 256
        || (hp->n_experts > 1 && (hp->top_k > hp->n_experts
                                  || hp->top_k > 64)))
    {
        moe_errf(err, errlen, "cuda backend: %d experts, top-%d not supported "
               "(at most 256 experts, top-64)", hp->n_experts, hp->top_k);
        return MOE_EUNSUPPORTED;
    }
    if ((int64_t) cap * (hp->n_experts > 1 ? hp->top_k : 1) > (1 << 24)) {
        moe_errf(err, errlen, "cuda backend: max tokens %d too large", cap);
        return MOE_EINVAL;
    }
    return MOE_OK;
}


/* The architecture flags: MOE_OK, or MOE_EUNSUPPORTED with the reason. */
static int
cb_check_arch(const moe_hparams_t *hp, char *err, size_t errlen)
{
    const char *why = NULL;

    if (hp->act < MOE_ACT_SILU || hp->act > MOE_ACT_GELU) {
        why = "unknown FFN activation";
    } else if (hp->ffn_ungated && hp->n_experts > 1) {
        why = "ungated FFN in an MoE model";
    } else if (hp->mlp_bias && hp->n_experts > 1) {
        why = "MLP biases in an MoE model";
    } else if (hp->learned_pos && hp->max_pos <= 0) {
        why = "learned positions without max_position_embeddings";
    } else if (hp->n_dense_layers > 0 && hp->dense_ffn_dim <= 0) {
        why = "dense layers without their intermediate size";
    } else if (hp->n_layers > MOE_MAX_LAYERS) {
        why = "too many layers";
    } else if (!hp->learned_pos && hp->head_dim % 2 != 0) {
        why = "odd head_dim with RoPE";
    }
    if (why != NULL) {
        moe_errf(err, errlen, "cuda backend: %s not supported (%s)",
               why, hp->arch_name);
        return MOE_EUNSUPPORTED;
    }
    return MOE_OK;
}


/* Whether hparams use any piece beyond Llama/Mistral/Mixtral. */
static int
cb_has_extras(const moe_hparams_t *hp)
{
    return hp->norm_layer || hp->act != MOE_ACT_SILU || hp->ffn_ungated
           || hp->learned_pos || hp->qkv_bias || hp->o_bias || hp->mlp_bias
           || hp->qk_norm || hp->router_no_renorm || hp->shared_ffn_dim > 0
           || hp->n_dense_layers > 0;
}


extern "C" int
moe_cuda_supports(const moe_hparams_t *hp, char *why, size_t n)
{
    char buf[256];

    if (why != NULL && n > 0) {
        why[0] = '\0';
    }
    if (hp == NULL) {
        moe_errf(why, n, "no hparams");
        return 0;
    }
    if (cb_check_shapes(hp, 16, 1, buf, sizeof(buf)) != MOE_OK
        || cb_check_arch(hp, buf, sizeof(buf)) != MOE_OK)
    {
        moe_errf(why, n, "%s", buf);
        return 0;
    }
    return 1;
}


/* KV blocks that fit beside the weights of hp in plan's formats. */
static int
cb_kv_blocks(const moe_hparams_t *hp, const moe_qplan_t *plan,
    int block_size, int kv_fp8, int max_batched_tokens,
    double gpu_memory_utilization, int device, int *n_blocks, char *err,
    size_t errlen)
{
    size_t  free_b = 0, total_b = 0;
    int64_t budget, per, wb, sb;
    int     rc;

    *n_blocks = 0;
    rc = cb_check_shapes(hp, block_size, max_batched_tokens, err, errlen);
    if (rc != MOE_OK) {
        return rc;
    }
    if (device < 0 || device >= moe_cuda_device_count()) {
        moe_errf(err, errlen, "cuda backend: no CUDA device %d", device);
        return MOE_EBACKEND;
    }
    if (cudaSetDevice(device) != cudaSuccess
        || cudaMemGetInfo(&free_b, &total_b) != cudaSuccess)
    {
        moe_errf(err, errlen, "cuda backend: cannot query device %d: %s",
               device, cudaGetErrorString(cudaGetLastError()));
        return MOE_EBACKEND;
    }
    wb = cb_weight_bytes_plan(hp, plan);
    sb = cb_workspace_bytes_plan(hp, plan, max_batched_tokens);
    budget = (int64_t) ((double) total_b * gpu_memory_utilization)
             - (int64_t) (total_b - free_b) - wb - sb - CB_SLACK;
    per = cb_kv_bytes_per_block(hp, block_size, kv_fp8);
    if (budget < per) {
        moe_errf(err, errlen, "cuda backend: device %d: %lld MiB total, %lld "
               "MiB free, weights %lld MiB, workspaces %lld MiB: no room for "
               "the KV cache at gpu_memory_utilization %.2f", device,
               (long long) (total_b >> 20), (long long) (free_b >> 20),
               (long long) (wb >> 20), (long long) (sb >> 20),
               gpu_memory_utilization);
        return MOE_ENOMEM;
    }
    *n_blocks = budget / per > (1 << 30) ? (1 << 30) : (int) (budget / per);
    return MOE_OK;
}


extern "C" int
moe_cuda_kv_blocks_for_hp(const moe_hparams_t *hp, int block_size,
    int max_batched_tokens, double gpu_memory_utilization, int device,
    int *n_blocks, char *err, size_t errlen)
{
    return moe_cuda_kv_blocks_for_fmt(hp, MOE_WF_BF16, block_size, 0,
                                      max_batched_tokens,
                                      gpu_memory_utilization, device,
                                      n_blocks, err, errlen);
}


extern "C" int
moe_cuda_kv_blocks_for_fmt(const moe_hparams_t *hp, int wfmt,
    int block_size, int kv_fp8, int max_batched_tokens,
    double gpu_memory_utilization, int device, int *n_blocks, char *err,
    size_t errlen)
{
    moe_qplan_t *p;
    int          rc;

    *n_blocks = 0;
    p = cb_plan_new(hp, wfmt);
    if (p == NULL) {
        moe_errf(err, errlen, "cuda backend: weight format %d unknown (or "
                 "out of memory)", wfmt);
        return MOE_EINVAL;
    }
    rc = cb_kv_blocks(hp, p, block_size, kv_fp8, max_batched_tokens,
                      gpu_memory_utilization, device, n_blocks, err, errlen);
    free(p);
    return rc;
}


/*
 * Rank `rank` of tp (expert parallel when ep): its hparams slice in *rhp
 * and, on the heap (free() it), the plan of which parts stay packed (the
 * checkpoint's layouts the kernels take, on this rank's slice).
 */
static int
cb_rank_plan(const moe_model_t *m, int tp, int rank, int ep,
    moe_hparams_t *rhp, moe_qplan_t **plan, char *err, size_t errlen)
{
    moe_qplan_t *p;
    int          rc;

    *plan = NULL;
    rc = moe_hparams_shard_ep(moe_model_hparams(m), tp, rank, ep && tp > 1,
                              rhp, err, errlen);
    if (rc != MOE_OK) {
        return rc;
    }
    p = (moe_qplan_t *) calloc(1, sizeof(*p));
    if (p == NULL) {
        moe_errf(err, errlen, "cuda backend: out of memory");
        return MOE_ENOMEM;
    }
    rc = moe_qw_plan_model(m, tp, rank, ep, p, err, errlen);
    if (rc != MOE_OK) {
        free(p);
        return rc;
    }
    *plan = p;
    return MOE_OK;
}


extern "C" int
moe_cuda_kv_blocks_for_rank(const moe_model_t *m, int tp, int rank, int ep,
    int block_size, int kv_fp8, int max_batched_tokens,
    double gpu_memory_utilization, int device, int *n_blocks, char *err,
    size_t errlen)
{
    moe_hparams_t rhp;
    moe_qplan_t  *p;
    int           rc;

    *n_blocks = 0;
    rc = cb_rank_plan(m, tp, rank, ep, &rhp, &p, err, errlen);
    if (rc == MOE_OK) {
        rc = cb_kv_blocks(&rhp, p, block_size, kv_fp8, max_batched_tokens,
                          gpu_memory_utilization, device, n_blocks, err,
                          errlen);
    }
    free(p);
    return rc;
}


extern "C" int
moe_cuda_kv_blocks_for(const moe_model_t *m, int block_size,
    int max_batched_tokens, double gpu_memory_utilization, int device,
    int *n_blocks, char *err, size_t errlen)
{
    return moe_cuda_kv_blocks_for_rank(m, 1, 0, 0, block_size, 0,
                                       max_batched_tokens,
                                       gpu_memory_utilization, device,
                                       n_blocks, err, errlen);
}


/* ------------------------------------------------------------ lifecycle */

/* The NCCL clique goes with its owner, the last rank (tp.c destroys the
 * ranks in order, so every other rank and its captured graphs are gone by
 * then): finalized as a group (one thread, several communicators), then
 * destroyed. */
static void
cb_nccl_release(cuda_backend_t *b)
{
#ifdef MOE_HAVE_NCCL
    int i;

    if (b->nccl_all != NULL) {
        (void) ncclGroupStart();
        for (i = 0; i < b->nccl_n; i++) {
            (void) ncclCommFinalize((ncclComm_t) b->nccl_all[i]);
        }
        (void) ncclGroupEnd();
        for (i = 0; i < b->nccl_n; i++) {
            (void) ncclCommDestroy((ncclComm_t) b->nccl_all[i]);
        }
        free(b->nccl_all);
    }
#endif
    b->nccl_all = NULL;
    b->nccl = NULL;
}


static void
cb_destroy(moe_backend_t *base)
{
    cuda_backend_t *b = (cuda_backend_t *) base;
    int             i;

    if (b == NULL) {
        return;
    }
    (void) cudaSetDevice(b->device);
    if (b->stream != NULL) {
        (void) cudaStreamSynchronize(b->stream);
    }
    if (b->ev != NULL) {
        for (i = 0; i < b->ev_cap; i++) {
            if (b->ev[i] != NULL) {
                (void) cudaEventDestroy(b->ev[i]);
            }
        }
    }
    for (i = 0; i < b->n_graphs; i++) {
        (void) cudaGraphExecDestroy(b->graphs[i].exec);
    }
    cb_nccl_release(b);             /* after this rank's captured graphs */
    free(b->ev);
    free(b->ev_stage);
    moe_cuda_fp8_gemm_destroy(b->fp8g);
    if (b->blas != NULL) {
        (void) cublasDestroy(b->blas);
    }
    (void) cudaFree(b->blas_ws);
    moe_cuda_wmem_free(&b->wmem);
    if (b->kvpool.base != NULL) {
        moe_cuda_kvpool_free(&b->kvpool);
    } else {
        (void) cudaFree(b->kv);
    }
    (void) cudaFree(b->wsbuf);
    (void) cudaFree(b->d_rope_inv);
    (void) cudaFreeHost(b->h_stage);
    (void) cudaFreeHost(b->h_counts);
    (void) cudaFreeHost(b->h_offs_log);
    free(b->offs_log_set);
    if (b->offs_log_ev != NULL) {
        (void) cudaEventDestroy(b->offs_log_ev);
    }
    (void) cudaFreeHost(b->h_logits);
    (void) cudaFreeHost(b->h_tokout);
    (void) cudaFreeHost(b->h_sp);
    (void) cudaFree(b->d_sp);
    (void) cudaFreeHost(b->h_mask);
    (void) cudaFree(b->d_mask);
    (void) cudaFreeHost(b->h_pen);
    (void) cudaFree(b->d_pen);
    (void) cudaFreeHost(b->h_bias);
    (void) cudaFree(b->d_bias);
    (void) cudaFreeHost(b->h_lpp);
    (void) cudaFree(b->d_lpp);
    (void) cudaFreeHost(b->h_lpo);
    (void) cudaFree(b->d_lpo);
    if (b->stream != NULL) {
        (void) cudaStreamDestroy(b->stream);
    }
    (void) cudaGetLastError();
    free(b->out_seq);
    free(b->expert_counts);
    free(b->plan);
    free(b->qw);
    free(b);
}


/*
 * Weights from the mapped safetensors straight to the device: the model's
 * tensor walk (moe_model_for_each_tensor) gives each piece; its source
 * bytes are copied into one of two pinned buffers, sent to one of two
 * device staging buffers (cudaMemcpyAsync; the host fills the other
 * buffer meanwhile) and converted there into the backend layout (bf16
 * matrices, fp32 norms / biases / router; Conv1D pieces transposed).
 * No fp32 host copy is ever made.
 */
#define CB_STAGE_BYTES  ((size_t) 64 << 20)   /* each of 2 pinned + 2 dev */
#define CB_LOG_MIN      ((int64_t) 1 << 30)   /* progress lines from 1 GiB */


typedef struct {
    cuda_backend_t *b;
    unsigned char  *h_buf[2];     /* (CB_STAGE_BYTES) pinned */
    void           *d_buf[2];     /* (CB_STAGE_BYTES) device */
    cudaEvent_t     sent[2];      /* the copy out of h_buf[k] is done */
    int             k;            /* buffer of the next chunk */
    size_t          wbytes;       /* size of b->wbuf */
    int64_t         total;        /* source bytes of all pieces */
    int64_t         done;
    int64_t         n_pieces;
    int             next_pct;
    double          t0;
    char           *err;
    size_t          errlen;
} cb_loader_t;


static double
cb_now(void)
{
    struct timespec ts;

    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double) ts.tv_sec + ts.tv_nsec * 1e-9;
}


static size_t
cb_dtype_size(int dtype)
{
    return dtype == MOE_DT_F32 ? 4 : 2;
}


/* Source bytes of a piece (the span its rows cover). */
static int64_t
cb_piece_bytes(const moe_tensor_ref_t *t)
{
    int64_t nsrc = t->transposed ? t->cols : t->rows;
    int64_t used = t->transposed ? t->rows : t->cols;

    return ((nsrc - 1) * t->ld + used) * (int64_t) cb_dtype_size(t->dtype);
}


static int
cb_count(void *ctx, const moe_tensor_ref_t *t)
{
    cb_loader_t *ld = (cb_loader_t *) ctx;

    if (t->quant != NULL) {
        /* packed: about a byte (fp8) or half a byte (4-bit) a weight */
        ld->total += t->rows * t->cols
                     / (t->quant->layout == MOE_QL_AWQ
                        || t->quant->layout == MOE_QL_GPTQ ? 2 : 1);
        ld->n_pieces++;
        return MOE_OK;
    }
    ld->total += cb_piece_bytes(t);
    ld->n_pieces++;
    return MOE_OK;
}


/* Where piece t goes: *dst (NULL: the backend keeps none, e.g. the
 * router of a one-expert model) and whether it is stored bf16. */
static int
cb_dest(cuda_backend_t *b, const moe_tensor_ref_t *t, char **dst,
    int *bf)
{
    const moe_hparams_t *hp = &b->hp;
    size_t               l = (size_t) (t->layer > 0 ? t->layer : 0);
    size_t               e = (size_t) (t->expert > 0 ? t->expert : 0);
    size_t               D = (size_t) hp->dim, E = (size_t) hp->n_experts;
    size_t               F = (size_t) hp->ffn_dim;
    size_t               Q = (size_t) b->Q, KV = (size_t) b->KVD;
    size_t               HD = (size_t) hp->head_dim;
    bf16                *h = NULL;
    float               *f = NULL;
    const cb_qw_t       *w;
    int                  p = moe_qw_part_of(t->kind);

    if (p >= 0) {
        /* a linear part kept bf16: its rows in the stacked group */
        if (t->layer < 0 || t->layer >= hp->n_layers) {
            return MOE_EINVAL;
        }
        w = &b->qw[(size_t) t->layer * MOE_QP_N + p];
        if (w->w == NULL || w->fmt != MOE_WF_BF16 || e >= (size_t) w->count) {
            return MOE_EINVAL;
        }
        *dst = (char *) ((bf16 *) w->w + e * (size_t) w->grows * w->K);
        *bf = 1;
        return MOE_OK;
    }
#define CB_F(p, off)  f = (p) != NULL ? (p) + (off) : NULL
#define CB_H(p, off)  h = (p) != NULL ? (p) + (off) : NULL
    switch (t->kind) {
    case MOE_WK_EMBED:        CB_H(b->embed, 0); break;
    case MOE_WK_LM_HEAD:
        if (b->lm_head == b->embed) {
            return MOE_EINVAL;
        }
        CB_H(b->lm_head, 0);
        break;
    case MOE_WK_POS_EMBED:    CB_F(b->pos_embed, 0); break;
    case MOE_WK_FINAL_NORM:   CB_F(b->final_norm, 0); break;
    case MOE_WK_FINAL_NORM_B: CB_F(b->final_norm_b, 0); break;
    case MOE_WK_ATTN_NORM:    CB_F(b->attn_norm, l * D); break;
    case MOE_WK_ATTN_NORM_B:  CB_F(b->attn_norm_b, l * D); break;
    case MOE_WK_FFN_NORM:     CB_F(b->ffn_norm, l * D); break;
    case MOE_WK_FFN_NORM_B:   CB_F(b->ffn_norm_b, l * D); break;
    case MOE_WK_BQ:           CB_F(b->bqkv, l * (Q + 2 * KV)); break;
    case MOE_WK_BK:           CB_F(b->bqkv, l * (Q + 2 * KV) + Q); break;
    case MOE_WK_BV:           CB_F(b->bqkv, l * (Q + 2 * KV) + Q + KV); break;
    case MOE_WK_BO:           CB_F(b->bo, l * D); break;
    case MOE_WK_Q_NORM:       CB_F(b->q_norm, l * HD); break;
    case MOE_WK_K_NORM:       CB_F(b->k_norm, l * HD); break;
    case MOE_WK_ROUTER:
        *dst = b->router != NULL ? (char *) (b->router + l * E * D) : NULL;
        *bf = 0;
        return MOE_OK;
    case MOE_WK_B_GATE:       CB_F(b->b_gu, l * 2 * F); break;
    case MOE_WK_B_UP:         CB_F(b->b_gu, l * 2 * F + F); break;
    case MOE_WK_B_DOWN:       CB_F(b->b_down, l * D); break;
    case MOE_WK_WS_GATE_INP:  CB_F(b->ws_gate_inp, l * D); break;
    default:
        return MOE_EINVAL;
    }
#undef CB_F
#undef CB_H
    if (h == NULL && f == NULL) {
        return MOE_EINVAL;
    }
    *dst = h != NULL ? (char *) h : (char *) f;
    *bf = h != NULL;
    return MOE_OK;
}


/* One chunk: `bytes` source bytes at src through the next staging pair,
 * then moe_cuda_convert (kernels/convert.h: the other arguments). */
static int
cb_chunk(cb_loader_t *ld, const moe_tensor_ref_t *t, const void *src,
    size_t bytes, int64_t s0, int64_t ns, int64_t used, int64_t ldim,
    int64_t cols, char *dst, int bf)
{
    cudaStream_t s = ld->b->stream;
    int          k = ld->k;
    double       dt;
    int          pct;

    ld->k ^= 1;
    MOE_CUDA_CHECK(cudaEventSynchronize(ld->sent[k]));
    memcpy(ld->h_buf[k], src, bytes);
    MOE_CUDA_CHECK(cudaMemcpyAsync(ld->d_buf[k], ld->h_buf[k], bytes,
                                   cudaMemcpyHostToDevice, s));
    MOE_CUDA_CHECK(cudaEventRecord(ld->sent[k], s));
    MOE_TRY(moe_cuda_convert(ld->d_buf[k], t->dtype, s0, ns, used, ldim,
                             t->transposed, cols, dst, bf, s));

    ld->done += (int64_t) bytes;
    pct = ld->total > 0 ? (int) (ld->done * 100 / ld->total) : 100;
    if (ld->total >= CB_LOG_MIN && pct >= ld->next_pct && pct < 100) {
        dt = cb_now() - ld->t0;
        moe_log(MOE_LOG_INFO, "cuda backend: loading weights %d%% (%.1f of "
                "%.1f GB, %.2f GB/s)", pct, ld->done / 1e9, ld->total / 1e9,
                dt > 0 ? ld->done / 1e9 / dt : 0.0);
        ld->next_pct = pct / 10 * 10 + 10;
    }
    return MOE_OK;
}


/* Copy a span's rows (qweights.h) to dst, dpitch bytes apart there
 * (>= sp->bytes; a stacked 4-bit part's rows are its columns of the
 * group's), through the pinned staging pair, no conversion. */
static int
cb_span_to(cb_loader_t *ld, const moe_qspan_t *sp, char *dst, size_t dpitch)
{
    cudaStream_t s = ld->b->stream;
    int64_t      per, r0, nr, i;
    int          k;

    if (sp->rows <= 0 || sp->bytes <= 0) {
        return MOE_OK;
    }
    per = (int64_t) CB_STAGE_BYTES / sp->bytes;
    if (per < 1) {
        moe_cuda_set_error("a packed row of %lld bytes exceeds the staging "
                           "buffer", (long long) sp->bytes);
        return MOE_EUNSUPPORTED;
    }
    for (r0 = 0; r0 < sp->rows; r0 += nr) {
        nr = sp->rows - r0 < per ? sp->rows - r0 : per;
        k = ld->k;
        ld->k ^= 1;
        MOE_CUDA_CHECK(cudaEventSynchronize(ld->sent[k]));
        for (i = 0; i < nr; i++) {
            memcpy(ld->h_buf[k] + i * sp->bytes,
                   (const char *) sp->base + (r0 + i) * sp->pitch,
                   (size_t) sp->bytes);
        }
        if (dpitch == (size_t) sp->bytes) {
            MOE_CUDA_CHECK(cudaMemcpyAsync(dst + r0 * sp->bytes, ld->h_buf[k],
                                           (size_t) (nr * sp->bytes),
                                           cudaMemcpyHostToDevice, s));
        } else {
            MOE_CUDA_CHECK(cudaMemcpy2DAsync(dst + (size_t) r0 * dpitch,
                                             dpitch, ld->h_buf[k],
                                             (size_t) sp->bytes,
                                             (size_t) sp->bytes, (size_t) nr,
                                             cudaMemcpyHostToDevice, s));
        }
        MOE_CUDA_CHECK(cudaEventRecord(ld->sent[k], s));
        ld->done += nr * sp->bytes;
    }
    return MOE_OK;
}


static int
cb_span(cb_loader_t *ld, const moe_qspan_t *sp, char *dst)
{
    return cb_span_to(ld, sp, dst, (size_t) sp->bytes);
}


/* `bytes` of host memory p (made at load) to dst, one row: the copy
 * out of the pinned buffer is queued, p may be freed on return. */
static int
cb_put_host(cb_loader_t *ld, const void *p, size_t bytes, char *dst)
{
    moe_qspan_t sp;

    sp.base = p;
    sp.rows = 1;
    sp.bytes = (int64_t) bytes;
    sp.pitch = sp.bytes;
    return cb_span(ld, &sp, dst);
}


static int cb_put(void *ctx, const moe_tensor_ref_t *t);


/* In cb_put / cb_put_packed (loader ld, tensor t): a device copy that
 * failed names the tensor and its file. */
#define CB_PUT(call)                                                         \
    do {                                                                     \
        if ((call) != MOE_OK) {                                              \
            moe_errf(ld->err, ld->errlen, "cuda backend: loading '%s' from "   \
                   "%s: %s", t->name, t->file, moe_cuda_last_error());       \
            return MOE_EBACKEND;                                             \
        }                                                                    \
    } while (0)


/*
 * A quantized piece (t->quant): packed into its part when the plan keeps
 * the part packed (moe_qw_slice's spans; fp8 scales converted to fp32 on
 * the host; a gptq g_idx written where the plan stores one), else
 * dequantized on the host (moe_qtensor_dequant, the CPU backend's values)
 * and sent through the float path.
 */
static int
cb_put_packed(cb_loader_t *ld, const moe_tensor_ref_t *t)
{
    cuda_backend_t      *b = ld->b;
    const moe_qtensor_t *q = t->quant;
    const cb_qw_t       *w = NULL;
    int                  p = moe_qw_part_of(t->kind), rc;
    size_t               e = (size_t) (t->expert > 0 ? t->expert : 0);
    size_t               K, G, C, n;
    moe_qslice_t         sl;
    moe_tensor_ref_t     r;
    char                 why[160];
    float               *f;
    int32_t             *gi;

    if (p >= 0 && t->layer >= 0 && t->layer < b->hp.n_layers) {
        w = &b->qw[(size_t) t->layer * MOE_QP_N + p];
    }
    if (w == NULL || w->w == NULL || e >= (size_t) w->count
        || t->rows != w->N || t->cols != w->K)
    {
        moe_errf(ld->err, ld->errlen, "cuda backend: no place for quantized "
               "tensor '%s' (piece %d of layer %d, expert %d)", t->name,
               t->kind, t->layer, t->expert);
        return MOE_EINVAL;
    }
    if (w->fmt == MOE_WF_BF16) {
        f = (float *) malloc((size_t) (q->rows * q->cols) * sizeof(float));
        if (f == NULL) {
            moe_errf(ld->err, ld->errlen, "cuda backend: out of host memory "
                   "dequantizing '%s'", t->name);
            return MOE_ENOMEM;
        }
        rc = moe_qtensor_dequant(q, f);
        if (rc == MOE_OK) {
            r = *t;
            r.quant = NULL;
            r.dtype = MOE_DT_F32;
            r.data = f + t->q_row0 * q->cols + t->q_col0;
            r.ld = q->cols;
            r.transposed = 0;
            r.q_row0 = r.q_col0 = 0;
            rc = cb_put(ld, &r);
        } else {
            moe_errf(ld->err, ld->errlen, "cuda backend: cannot dequantize "
                   "'%s'", t->name);
        }
        free(f);
        return rc;
    }

    rc = moe_qw_slice(q, t->q_row0, t->rows, t->q_col0, t->cols, &sl, why,
                      sizeof(why), ld->err, ld->errlen);
    if (rc != MOE_OK) {
        return rc;
    }
    if (sl.f.fmt != w->fmt || sl.f.mode != w->mode
        || (w->fmt != MOE_WF_FP8 && (sl.f.group != w->G
                                     || sl.f.zero_bias != w->zero_bias)))
    {
        moe_errf(ld->err, ld->errlen, "cuda backend: tensor '%s': packed "
               "layout differs from its part's (%s%s)", t->name,
               moe_qw_format_name(sl.f.fmt), why);
        return MOE_EINVAL;
    }
    K = (size_t) w->K;

    if (w->fmt == MOE_WF_FP8) {
        CB_PUT(cb_span(ld, &sl.w, (char *) w->w + e * cb_fp8_wstride(w)));
        n = (size_t) sl.n_scales;
        f = (float *) malloc(n * sizeof(float));
        if (f == NULL) {
            moe_errf(ld->err, ld->errlen, "cuda backend: out of host memory");
            return MOE_ENOMEM;
        }
        moe_qw_fp8_scales(&sl, f);
        rc = cb_put_host(ld, f, n * sizeof(float),
                         (char *) (w->scale + e * cb_fp8_sstride(w)));
        free(f);
        CB_PUT(rc);
        return MOE_OK;
    }
    G = (size_t) w->G;
    C = (size_t) w->ld;         /* the stored columns: N, or the group's */
    CB_PUT(cb_span_to(ld, &sl.w, (char *) w->w + e * K * C / 2,
                     w->fmt == MOE_WF_AWQ ? C / 2 : C * 4));
    CB_PUT(cb_span_to(ld, &sl.zeros,
                     (char *) (w->zeros + e * (K / G) * (C / 8)), C / 2));
    CB_PUT(cb_span_to(ld, &sl.scales,
                      (char *) (w->scales + e * (K / G) * C), C * 2));
    if (w->g_idx != NULL) {
        /* this expert's own g_idx, or k / G where it has none */
        gi = (int32_t *) malloc(K * sizeof(int32_t));
        if (gi == NULL) {
            moe_errf(ld->err, ld->errlen, "cuda backend: out of host memory");
            return MOE_ENOMEM;
        }
        for (n = 0; n < K; n++) {
            gi[n] = (int32_t) (n / G);
        }
        if (sl.g_idx != NULL) {
            memcpy(gi, sl.g_idx, K * sizeof(int32_t));
        }
        rc = cb_put_host(ld, gi, K * sizeof(int32_t),
                         (char *) (w->g_idx + e * K));
        /* the copy out of the pinned buffer is queued; gi was copied in */
        free(gi);
        CB_PUT(rc);
    }
    return MOE_OK;
}


/* moe_model_for_each_tensor callback: one piece onto the device. */
static int
cb_put(void *ctx, const moe_tensor_ref_t *t)
{
    cb_loader_t         *ld = (cb_loader_t *) ctx;
    const unsigned char *p = (const unsigned char *) t->data;
    size_t               esz = cb_dtype_size(t->dtype), osz;
    int64_t              n = t->rows * t->cols, nsrc, used, s0, ns, per;
    char                *dst;
    int                  bf, rc;

    if (t->quant != NULL) {
        return cb_put_packed(ld, t);
    }
    rc = cb_dest(ld->b, t, &dst, &bf);
    if (rc != MOE_OK) {
        moe_errf(ld->err, ld->errlen, "cuda backend: no place for tensor "
               "'%s' (piece %d of layer %d, expert %d)", t->name, t->kind,
               t->layer, t->expert);
        return MOE_EINVAL;
    }
    if (dst == NULL) {
        ld->done += cb_piece_bytes(t);      /* not kept */
        return MOE_OK;
    }
    osz = bf ? 2 : 4;
    if (dst < (char *) ld->b->wbuf
        || dst + (size_t) n * osz > (char *) ld->b->wbuf + ld->wbytes)
    {
        moe_errf(ld->err, ld->errlen, "cuda backend: tensor '%s' does not fit "
               "its place in the weights", t->name);
        return MOE_EINVAL;
    }

    if (!t->transposed && (t->ld == t->cols || t->rows == 1)) {
        /* contiguous: flat chunks of elements */
        per = (int64_t) (CB_STAGE_BYTES / esz);
        for (s0 = 0; s0 < n; s0 += ns) {
            ns = n - s0 < per ? n - s0 : per;
            CB_PUT(cb_chunk(ld, t, p + s0 * (int64_t) esz,
                            (size_t) ns * esz, 0, 1, ns, ns, ns,
                            dst + (size_t) s0 * osz, bf));
        }
        return MOE_OK;
    }

    /* strided or transposed: whole source rows per chunk */
    nsrc = t->transposed ? t->cols : t->rows;
    used = t->transposed ? t->rows : t->cols;
    per = (int64_t) (CB_STAGE_BYTES / ((size_t) t->ld * esz));
    if (per < 1) {
        moe_errf(ld->err, ld->errlen, "cuda backend: tensor '%s': a row of "
               "%lld elements exceeds the %zu MiB staging buffer", t->name,
               (long long) t->ld, CB_STAGE_BYTES >> 20);
        return MOE_EUNSUPPORTED;
    }
    for (s0 = 0; s0 < nsrc; s0 += ns) {
        ns = nsrc - s0 < per ? nsrc - s0 : per;
        CB_PUT(cb_chunk(ld, t, p + s0 * t->ld * (int64_t) esz,
                        (size_t) ((ns - 1) * t->ld + used) * esz, s0, ns,
                        used, t->ld, t->cols, dst, bf));
    }
#undef CB_PUT
    return MOE_OK;
}


static int
cb_load_weights(cuda_backend_t *b, const moe_model_t *m, char *err,
    size_t errlen)
{
    cb_loader_t   ld;
    cb_wlayout_t  wl;
    double        dt;
    int           rc, i;
    cudaError_t   ce = cudaSuccess;

    memset(&ld, 0, sizeof(ld));
    ld.b = b;
    ld.err = err;
    ld.errlen = errlen;
    ld.next_pct = 10;
    wl.qoff = NULL;
    cb_weight_layout(&b->hp, b->plan, &wl);
    ld.wbytes = wl.total;
    ld.t0 = cb_now();

    /* sizes only: described, not quantized / converted */
    rc = moe_model_for_each_tensor_packed_describe(m, b->tp, b->rank,
                                                   b->hp.n_local_experts > 0,
                                                   cb_count, &ld, err,
                                                   errlen);
    if (rc != MOE_OK) {
        return rc;
    }
    /* pieces the model lacks (no b_gate, the experts of dense layers)
     * read as zeros */
    for (i = 0; i < 2 && ce == cudaSuccess; i++) {
        ce = cudaMallocHost(&ld.h_buf[i], CB_STAGE_BYTES);
        if (ce == cudaSuccess) {
            ce = cudaMalloc(&ld.d_buf[i], CB_STAGE_BYTES);
        }
        if (ce == cudaSuccess) {
            ce = cudaEventCreateWithFlags(&ld.sent[i],
                                          cudaEventDisableTiming);
        }
    }
    if (ce == cudaSuccess) {
        ce = cudaMemsetAsync(b->wbuf, 0, wl.total, b->stream);
    }
    if (ce != cudaSuccess) {
        moe_errf(err, errlen, "cuda backend: weight staging buffers (2 x %zu "
               "MiB pinned + device): %s", CB_STAGE_BYTES >> 20,
               cudaGetErrorString(ce));
        (void) cudaGetLastError();
        rc = ce == cudaErrorMemoryAllocation ? MOE_ENOMEM : MOE_EBACKEND;
    } else {
        rc = moe_model_for_each_tensor_packed_shard_ep(m, b->tp, b->rank,
                                                       b->hp.n_local_experts
                                                       > 0, cb_put, &ld, err,
                                                       errlen);
    }
    ce = cudaStreamSynchronize(b->stream);
    if (rc == MOE_OK && ce != cudaSuccess) {
        moe_errf(err, errlen, "cuda backend: loading weights: %s",
               cudaGetErrorString(ce));
        rc = MOE_EBACKEND;
    }
    for (i = 0; i < 2; i++) {
        if (ld.sent[i] != NULL) {
            (void) cudaEventDestroy(ld.sent[i]);
        }
        (void) cudaFreeHost(ld.h_buf[i]);
        (void) cudaFree(ld.d_buf[i]);
    }
    (void) cudaGetLastError();
    if (rc != MOE_OK) {
        return rc;
    }
    dt = cb_now() - ld.t0;
    moe_log(MOE_LOG_INFO, "cuda backend: weights loaded to device %d: "
            "%.2f GB read from %s (%lld pieces), %.2f GB on the device, "
            "%.2f s (%.2f GB/s)", b->device, ld.total / 1e9,
            moe_model_dir(m), (long long) ld.n_pieces, wl.total / 1e9, dt,
            dt > 0 ? ld.total / 1e9 / dt : 0.0);
    return MOE_OK;
}


/* A stacked group (its first part: q, gate, shared / dense gate;
 * first->stacked) as one part: count matrices (grows, K); the kernels
 * take it like any per-expert (N, K) packed weight (q|k|v in one launch,
 * gate|up with SiLU fused). */
static void
cb_group(const cb_qw_t *first, cb_qw_t *g)
{
    *g = *first;
    g->N = g->grows;
    g->ld = g->grows;
    g->stacked = 0;
    g->view = 1;
}


/* Random values for one linear part (values like bf16's uniform
 * 1/sqrt(K) ones: fp8 codes over the whole e4m3 range with per-row
 * scales 1 / (sqrt(K) 448); 4-bit random codes and zeros with scales
 * 1 / (10 sqrt(K)), about the same spread). */
static int
cb_random_part(cuda_backend_t *b, const cb_qw_t *w, uint64_t seed)
{
    cudaStream_t s = b->stream;
    int64_t      n = (int64_t) w->count * w->N * w->K;
    float        sd = 1.0f / sqrtf((float) w->K);

    switch (w->fmt) {
    case MOE_WF_FP8:
        MOE_TRY(moe_cuda_fill_random_fp8((uint8_t *) w->w, n, seed, s));
        return moe_cuda_fill_random_f32(w->scale, (int64_t) w->count * w->N,
                                        seed + 1, 0.0f, sd / 448.0f, s);
    case MOE_WF_AWQ: case MOE_WF_GPTQ:
        MOE_TRY(moe_cuda_fill_random_u32((uint32_t *) w->w, n / 8, seed, s));
        MOE_TRY(moe_cuda_fill_random_u32((uint32_t *) w->zeros,
                                         n / w->G / 8, seed + 1, s));
        return moe_cuda_fill_random_f16(w->scales, n / w->G, seed + 2,
                                        0.0f, sd / 10.0f, s);
    default:
        /* a bf16 part is filled with its group (cb_random_weights) */
        return MOE_OK;
    }
}


static int
cb_random_weights(cuda_backend_t *b, uint64_t seed)
{
    const moe_hparams_t *hp = &b->hp;
    int64_t              L = hp->n_layers, D = hp->dim, V = hp->vocab_size;
    int64_t              E = hp->n_experts;
    cudaStream_t         s = b->stream;
    float                sd = 1.0f / sqrtf((float) D);
    const cb_qw_t       *w;
    int64_t              l;
    int                  p;

    MOE_TRY(moe_cuda_fill_random_bf16((moe_bf16_t *) b->embed, V * D, seed,
                                      1.0f, s));
    if (b->lm_head != b->embed) {
        MOE_TRY(moe_cuda_fill_random_bf16((moe_bf16_t *) b->lm_head, V * D,
                                          seed + 1, sd, s));
    }
    for (l = 0; l < L; l++) {
        for (p = 0; p < MOE_QP_N; p++) {
            moe_qshape_t sh;

            w = &b->qw[l * MOE_QP_N + p];
            moe_qw_shape(hp, (int) l, p, &sh);
            if (w->w == NULL) {
                continue;
            }
            if (w->stacked && sh.first == p) {
                cb_qw_t g;

                /* a stacked group: all its rows at once */
                cb_group(w, &g);
                MOE_TRY(cb_random_part(b, &g, seed + 1000 + 16 * (uint64_t) l
                                       * MOE_QP_N + 16 * (uint64_t) p));
            } else if (w->fmt != MOE_WF_BF16 && !w->stacked) {
                MOE_TRY(cb_random_part(b, w, seed + 1000 + 16 * (uint64_t) l
                                       * MOE_QP_N + 16 * (uint64_t) p));
            } else if (w->fmt == MOE_WF_BF16 && sh.first == p) {
                MOE_TRY(moe_cuda_fill_random_bf16(
                    (moe_bf16_t *) w->w, (int64_t) w->count * w->grows * w->K,
                    seed + 1000 + 16 * (uint64_t) l * MOE_QP_N
                    + 16 * (uint64_t) p, 1.0f / sqrtf((float) w->K), s));
            }
        }
    }
    MOE_TRY(moe_cuda_fill_random_f32(b->attn_norm, L * D, seed + 6, 0.0f,
                                     1.0f, s));
    MOE_TRY(moe_cuda_fill_random_f32(b->ffn_norm, L * D, seed + 7, 0.0f,
                                     1.0f, s));
    MOE_TRY(moe_cuda_fill_random_f32(b->final_norm, D, seed + 8, 0.0f, 1.0f,
                                     s));
    if (b->router != NULL) {
        MOE_TRY(moe_cuda_fill_random_f32(b->router, L * E * D, seed + 9, sd,
                                         0.0f, s));
    }
    MOE_CUDA_CHECK(cudaStreamSynchronize(s));
    return MOE_OK;
}


static int cb_forward(moe_backend_t *base, const moe_seq_batch_t *seqs,
    int n);
static const int64_t *cb_expert_counts(moe_backend_t *base);
static void cb_swap_destroy(moe_backend_t *base);
static int cb_swap_alloc(moe_backend_t *base, int n_slots, char *err,
    size_t errlen);
/* ------------------------------------------------------------- reload */

/*
 * The weights survive `nginx -s reload` (cuda_share.h): the buffer is a
 * VMM allocation served under a key to the next worker, which imports it
 * instead of loading, and starts with the KV blocks that fit beside the
 * old worker; the rest are backed as the old worker's memory frees
 * (cb_kv_grow, polled by the engine).  The block layout and the pool's
 * base address never change, so captured graphs stay valid.
 */

/* The key of the weights a backend of hp would hold on device (m NULL:
 * load_format dummy with that seed; q4_layout: the tuning record's, how
 * 4-bit bytes are stored); "" when sharing is off (MOE_CUDA_SHARE=0) or
 * the model cannot be resolved. */
static void
cb_share_key_for(const moe_hparams_t *hp, const moe_qplan_t *plan,
    const moe_model_t *m, uint64_t seed, int device, int tp, int rank,
    int q4_layout, char *key, size_t keylen)
{
    const char         *env = getenv("MOE_CUDA_SHARE");
    cudaDeviceProp      prop;
    moe_share_key_in_t  in;
    cb_wlayout_t        wl;
    char                dev[96], err[256];
    int                 i, n;

    key[0] = '\0';
    if ((env != NULL && atoi(env) == 0)
        || cudaGetDeviceProperties(&prop, device) != cudaSuccess)
    {
        (void) cudaGetLastError();
        return;
    }
    n = snprintf(dev, sizeof(dev), "%04x:%02x:%02x-", prop.pciDomainID,
                 prop.pciBusID, prop.pciDeviceID);
    for (i = 0; i < 16 && n + 2 < (int) sizeof(dev); i++, n += 2) {
        snprintf(dev + n, sizeof(dev) - n, "%02x",
                 (unsigned char) prop.uuid.bytes[i]);
    }
    memset(&wl, 0, sizeof(wl));
    wl.qoff = NULL;
    cb_weight_layout(hp, plan, &wl);
    memset(&in, 0, sizeof(in));
    in.device = dev;
    in.model_dir = m != NULL ? moe_model_dir(m) : NULL;
    in.seed = seed;
    in.layout_bytes = wl.total;
    /* the parts' formats (the plan is zeroed before it is filled, so its
     * bytes are the same in every process) and the total size */
    in.layout_sum = moe_share_sum(moe_share_sum(0, &wl.total,
                                                sizeof(wl.total)),
                                  plan, sizeof(*plan));
    {
        /* the 4-bit bytes' layout: the checkpoint's, AWQ as GPTQ, or
         * tiled (q4_layout 2 and 3 store alike) */
        int stored = q4_layout == 3 ? 2 : q4_layout;

        in.layout_sum = moe_share_sum(in.layout_sum, &stored,
                                      sizeof(stored));
    }
    in.quant = NULL;                /* the formats: in layout_sum */
    in.dtype = "bf16";
    in.tp = tp;
    in.rank = rank;
    in.ep = hp->n_local_experts > 0;
    if (moe_share_key(&in, key, keylen, err, sizeof(err)) != MOE_OK) {
        moe_log(MOE_LOG_INFO, "cuda share: weights not shared (%s)", err);
        key[0] = '\0';
    }
}


static void
cb_share_key(cuda_backend_t *b, const moe_model_t *m, uint64_t seed)
{
    cb_share_key_for(&b->hp, b->plan, m, seed, b->device, b->tp, b->rank,
                     b->tune.q4_layout,
                     b->share_key, sizeof(b->share_key));
}


extern "C" int
moe_cuda_share_kv_hint(const moe_hparams_t *hp, const moe_model_t *m,
    int wfmt, uint64_t seed, int device, int block_size, int kv_fp8,
    int *n_blocks)
{
    moe_share_hdr_t hdr;
    moe_qplan_t    *plan;
    char            key[MOE_SHARE_KEY_MAX], err[256];
    int64_t         per = cb_kv_bytes_per_block(hp, block_size, kv_fp8);
    int64_t         n;
    int             rc;

    *n_blocks = 0;
    /* the plan the backend would make: the model's, or uniform wfmt */
    plan = (moe_qplan_t *) calloc(1, sizeof(*plan));
    if (plan == NULL) {
        return MOE_ENOMEM;
    }
    rc = m != NULL ? moe_qw_plan_model(m, 1, 0, 0, plan, err, sizeof(err))
                   : moe_qw_plan_uniform(hp, wfmt, plan);
    if (rc == MOE_OK) {
        /* the tuning record the backend will read (the defaults when a
         * variable is malformed: the backend then refuses to start) */
        moe_cuda_tuning_t tu;

        if (moe_cuda_tuning_read(&tu, hp->n_experts, cb_expert_fmt(plan),
                                 err, sizeof(err)) != MOE_OK)
        {
            moe_cuda_tuning_t d = MOE_CUDA_TUNING_DEFAULTS;

            tu = d;
        }
        cb_share_key_for(hp, plan, m, seed, device, 1, 0, tu.q4_layout, key,
                         sizeof(key));
    }
    free(plan);
    if (rc != MOE_OK) {
        return MOE_EIO;
    }
    if (key[0] == '\0' || per <= 0
        || moe_share_probe(key, 2000, &hdr, err, sizeof(err)) != MOE_OK
        || hdr.kv_blocks <= 0 || hdr.kv_bytes_per_block <= 0)
    {
        return MOE_EIO;
    }
    /* the old worker's pool in bytes, in our blocks */
    n = hdr.kv_blocks * hdr.kv_bytes_per_block / per;
    *n_blocks = n > (1 << 30) ? (1 << 30) : (int) n;
    return *n_blocks > 0 ? MOE_OK : MOE_EIO;
}


static int
cb_kv_usable(const cuda_backend_t *b)
{
    return b->base.n_kv_usable > 0 ? b->base.n_kv_usable : b->n_blocks;
}


/* The byte ranges blocks 0..u-1 cover: one per layer. */
static int
cb_kv_ranges(const cuda_backend_t *b, int u, size_t *lo, size_t *hi)
{
    size_t plb = (size_t) 2 * b->block_size * b->KVD
                 * (b->kv_fp8 ? 1 : sizeof(bf16));
    size_t S = plb * (size_t) b->n_blocks;
    int    l;

    for (l = 0; l < b->hp.n_layers; l++) {
        lo[l] = (size_t) l * S;
        hi[l] = lo[l] + plb * (size_t) u;
    }
    return b->hp.n_layers;
}


/* The most blocks (at least `from`) whose new backing fits in budget. */
static int
cb_kv_fit(const cuda_backend_t *b, int from, int64_t budget)
{
    size_t lo[MOE_MAX_LAYERS], hi[MOE_MAX_LAYERS];
    int    a = from, z = b->n_blocks, mid, n;

    while (a < z) {
        mid = a + (z - a + 1) / 2;
        n = cb_kv_ranges(b, mid, lo, hi);
        if ((int64_t) moe_cuda_kvpool_cost(&b->kvpool, lo, hi, n) <= budget)
        {
            a = mid;
        } else {
            z = mid - 1;
        }
    }
    return a;
}


static int64_t
cb_free_bytes(const cuda_backend_t *b)
{
    size_t free_b = 0, total_b = 0;

    if (cudaSetDevice(b->device) != cudaSuccess
        || cudaMemGetInfo(&free_b, &total_b) != cudaSuccess)
    {
        (void) cudaGetLastError();
        return 0;
    }
    return (int64_t) free_b - CB_SLACK;
}


/* Back blocks up to u; the usable count moves only when all is mapped. */
static int
cb_kv_map(cuda_backend_t *b, int u)
{
    size_t lo[MOE_MAX_LAYERS], hi[MOE_MAX_LAYERS];
    int    n = cb_kv_ranges(b, u, lo, hi), rc;

    rc = moe_cuda_kvpool_map(&b->kvpool, lo, hi, n, b->stream);
    if (rc == MOE_OK) {
        b->base.n_kv_usable = u;
    }
    return rc;
}


/* kv_grow (backend.h): what the old worker freed, up to the pool. */
static int
cb_kv_grow(moe_backend_t *base)
{
    cuda_backend_t *b = (cuda_backend_t *) base;
    int             cur = cb_kv_usable(b), u, rc;

    if (cur >= b->n_blocks) {
        return cur;
    }
    u = cb_kv_fit(b, cur, cb_free_bytes(b));
    if (u <= cur) {
        return cur;
    }
    rc = cb_kv_map(b, u);
    if (rc != MOE_OK) {
        moe_log(MOE_LOG_WARN, "cuda backend: growing the KV pool to %d "
                "blocks failed (%s); %d usable", u, moe_strerror(rc), cur);
        return cur;
    }
    moe_log(u == b->n_blocks ? MOE_LOG_INFO : MOE_LOG_DEBUG,
            "cuda backend: KV pool backed for %d of %d blocks (%zu MiB)", u,
            b->n_blocks, (b->kvpool.n_mapped * b->kvpool.gran) >> 20);
    return u;
}


/* After create: back what fits now (at least one block). */
static int
cb_kv_start(cuda_backend_t *b, char *err, size_t errlen)
{
    const char *cap = getenv("MOE_CUDA_KV_START_BLOCKS");
    int         u = cb_kv_fit(b, 0, cb_free_bytes(b)), rc;

    /* a test switch: start smaller than memory allows, so that the
     * growth runs on a GPU with room to spare (t/gpu/test_share.cu) */
    if (cap != NULL && atoi(cap) > 0 && atoi(cap) < u) {
        u = atoi(cap);
    }
    if (u < 1) {
        moe_errf(err, errlen, "cuda backend: weights imported, but no "
                 "device memory for a KV block yet");
        return MOE_ENOMEM;
    }
    rc = cb_kv_map(b, u);
    if (rc != MOE_OK) {
        moe_errf(err, errlen, "cuda backend: backing %d KV blocks: %s", u,
                 moe_strerror(rc));
        return rc;
    }
    b->base.kv_grow = cb_kv_grow;
    moe_log(MOE_LOG_INFO, "cuda backend: KV pool starts with %d of %d "
            "blocks; the rest as the old worker's memory frees", u,
            b->n_blocks);
    return MOE_OK;
}


static int
cb_handover_wait(moe_backend_t *base, int timeout_ms, int64_t *pid,
    double *ms)
{
    return moe_cuda_wmem_wait(&((cuda_backend_t *) base)->wmem, timeout_ms,
                              pid, ms);
}


static int cb_swap_out(moe_backend_t *base, const int32_t *blocks,
    const int32_t *slots, int n);
static int cb_swap_in(moe_backend_t *base, const int32_t *slots,
    const int32_t *blocks, int n);
static int cb_swap_read(moe_backend_t *base, int32_t slot, void *dst);


/* The kernels' 4-bit packing of a part (AWQ or GPTQ). */
static int
cb_q4_kfmt(const cb_qw_t *w)
{
    return w->fmt == MOE_WF_AWQ ? MOE_K_Q4_AWQ : MOE_K_Q4_GPTQ;
}


/* 1 when 4-bit part q keeps its qweight tiled (kernels/quant_gemv.h
 * "Tiled 4-bit weights"): the knob q4_layout 2 or 3, no g_idx, whole
 * groups along K (the layout counts K / G of them, the kernels ceil(K /
 * G)), and the stored matrix (its group's, when stacked) on the layout's
 * boundaries. */
static int
cb_q4_tiles(const cuda_backend_t *b, const cb_qw_t *q)
{
    return b->tune.q4_layout >= 2
           && (q->fmt == MOE_WF_AWQ || q->fmt == MOE_WF_GPTQ)
           && q->g_idx == NULL && q->G > 0 && q->K % q->G == 0
           && moe_cuda_q4t_supported(cb_q4_kfmt(q), q->G, q->ld, q->K);
}


/* 1 when AWQ part q is kept in GPTQ's layout (q4_layout 1): groups of
 * a multiple of 32 (the GPTQ tensor-core GEMV's round) dividing K. */
static int
cb_q4_as_gptq(const cuda_backend_t *b, const cb_qw_t *q)
{
    return b->tune.q4_layout == 1 && q->fmt == MOE_WF_AWQ && q->G > 0
           && q->G % 32 == 0 && q->K % q->G == 0 && q->K % 8 == 0
           && q->ld % 8 == 0;
}


/* The repacked AWQ parts read as GPTQ from now on (their bytes are: just
 * repacked, or imported from the worker before, which repacked them). */
static void
cb_q4_settle(cuda_backend_t *b)
{
    for (size_t i = 0; i < (size_t) b->hp.n_layers * MOE_QP_N; i++) {
        cb_qw_t *q = &b->qw[i];

        if (q->w != NULL && q->awq_gptq && q->fmt == MOE_WF_AWQ) {
            q->fmt = MOE_WF_GPTQ;
            q->zero_bias = 0;
        }
    }
}


/* Repack every tiled or AWQ-as-GPTQ 4-bit matrix in place, once its
 * checkpoint bytes are on the device (a stacked group once, from its
 * first part, whose w is the group's first column), through the
 * dequantization scratch. */
static int
cb_q4_tile_all(cuda_backend_t *b)
{
    int64_t n[2] = { 0, 0 };        /* AWQ as GPTQ, tiled */

    for (int l = 0; l < b->hp.n_layers; l++) {
        for (int p = 0; p < MOE_QP_N; p++) {
            const cb_qw_t *q = &b->qw[(size_t) l * MOE_QP_N + p];
            moe_qshape_t   sh;

            moe_qw_shape(&b->hp, l, p, &sh);
            if (q->w == NULL || (q->stacked && sh.first != p)) {
                continue;
            }
            if (q->awq_gptq && q->fmt == MOE_WF_AWQ) {
                MOE_TRY(moe_cuda_q4_awq_to_gptq((int32_t *) q->w, q->zeros,
                                                q->ld, q->K, q->G, q->count,
                                                b->qscratch,
                                                b->qscratch_bytes,
                                                b->stream));
                n[0]++;
            } else if (q->tiled) {
                MOE_TRY(moe_cuda_q4t_pack(cb_q4_kfmt(q), (int32_t *) q->w,
                                          q->ld, q->K, q->count, b->qscratch,
                                          b->qscratch_bytes, b->stream));
                n[1]++;
            }
        }
    }
    if (n[0] + n[1] > 0) {
        moe_log(MOE_LOG_INFO, "cuda backend: 4-bit weight groups repacked: "
                "%lld AWQ into GPTQ's layout, %lld into the tiled layout",
                (long long) n[0], (long long) n[1]);
    }
    return MOE_OK;
}


/* Everything but the weights' values; MOE_* with err set. */
static int
cb_alloc(cuda_backend_t *b, char *err, size_t errlen)
{
    const moe_hparams_t *hp = &b->hp;
    cb_wlayout_t         wl;
    cb_slayout_t         sl;
    char                *w, *s;
    size_t               kv_bytes;
    cudaError_t          ce;

#define CB_CUDA(stmt, what)                                                  \
    do {                                                                     \
        ce = (stmt);                                                         \
        if (ce != cudaSuccess) {                                             \
            moe_errf(err, errlen, "cuda backend: %s: %s", what,                \
                   cudaGetErrorString(ce));                                  \
            (void) cudaGetLastError();                                       \
            return ce == cudaErrorMemoryAllocation ? MOE_ENOMEM              \
                                                   : MOE_EBACKEND;           \
        }                                                                    \
    } while (0)

    CB_CUDA(cudaSetDevice(b->device), "cudaSetDevice");
    CB_CUDA(cudaStreamCreateWithFlags(&b->stream, cudaStreamNonBlocking),
            "stream");
    if (cublasCreate(&b->blas) != CUBLAS_STATUS_SUCCESS) {
        b->blas = NULL;
        moe_errf(err, errlen, "cuda backend: cublasCreate failed");
        return MOE_EBACKEND;
    }
    CB_CUDA(cudaMalloc(&b->blas_ws, CB_BLAS_WS), "cuBLAS workspace");
    if (cublasSetStream(b->blas, b->stream) != CUBLAS_STATUS_SUCCESS
        || cublasSetWorkspace(b->blas, b->blas_ws, CB_BLAS_WS)
           != CUBLAS_STATUS_SUCCESS)
    {
        moe_errf(err, errlen, "cuda backend: cuBLAS stream/workspace setup "
               "failed");
        return MOE_EBACKEND;
    }
    /* fp8 prefill GEMMs share the cuBLAS workspace (one stream) */
    if (moe_cuda_fp8_gemm_create(b->blas_ws, CB_BLAS_WS, &b->fp8g)
        != MOE_K_OK)
    {
        moe_log(MOE_LOG_INFO, "cuda backend: no fp8 GEMMs (%s): fp8 "
                "prefill dequantizes", moe_cuda_last_error());
        b->fp8g = NULL;
    }

    wl.qoff = NULL;
    cb_weight_layout(hp, b->plan, &wl);
    {
        /* imported from the old worker when it serves the same weights,
         * else exportable to the next one ("reload" above) */
        int rc = moe_cuda_wmem_alloc(&b->wmem, b->device, wl.total,
                                     b->share_key[0] ? b->share_key : NULL,
                                     err, errlen);

        if (rc != MOE_OK) {
            return rc;
        }
        b->wbuf = b->wmem.ptr;
    }
    w = (char *) b->wbuf;
    b->embed = (bf16 *) (w + wl.embed);
    b->lm_head = (bf16 *) (w + wl.lm_head);
    /* the linear parts: offsets from the layout, shapes from the plan */
    wl.qoff = (moe_qoff_t *) calloc((size_t) hp->n_layers * MOE_QP_N,
                                    sizeof(moe_qoff_t));
    b->qw = (cb_qw_t *) calloc((size_t) hp->n_layers * MOE_QP_N,
                               sizeof(cb_qw_t));
    if (wl.qoff == NULL || b->qw == NULL) {
        free(wl.qoff);
        moe_errf(err, errlen, "cuda backend: out of host memory");
        return MOE_ENOMEM;
    }
    cb_weight_layout(hp, b->plan, &wl);
    for (int l = 0; l < hp->n_layers; l++) {
        for (int p = 0; p < MOE_QP_N; p++) {
            const moe_qfmt_t *f = &b->plan->f[l][p];
            const moe_qoff_t *o = &wl.qoff[(size_t) l * MOE_QP_N + p];
            cb_qw_t          *q = &b->qw[(size_t) l * MOE_QP_N + p];
            moe_qshape_t      sh;

            moe_qw_shape(hp, l, p, &sh);
            if (!sh.present) {
                continue;
            }
            q->fmt = f->fmt;
            q->mode = f->mode;
            q->G = f->group;
            q->zero_bias = f->zero_bias;
            q->N = (int) sh.N;
            q->K = (int) sh.K;
            q->count = sh.count;
            q->grows = (int) sh.grows;
            q->w = w + o->w;
            q->scale = o->scale ? (float *) (w + o->scale) : NULL;
            q->zeros = o->zeros ? (int32_t *) (w + o->zeros) : NULL;
            q->scales = o->scales ? (uint16_t *) (w + o->scales) : NULL;
            q->g_idx = o->g_idx ? (int32_t *) (w + o->g_idx) : NULL;
            q->stacked = moe_qw_stacked(hp, b->plan, l, p);
            q->ld = (int) (q->stacked ? sh.grows : sh.N);
            q->tiled = cb_q4_tiles(b, q);
            q->awq_gptq = !q->tiled && cb_q4_as_gptq(b, q);
        }
    }
    free(wl.qoff);
    wl.qoff = NULL;
    b->attn_norm = (float *) (w + wl.attn_norm);
    b->ffn_norm = (float *) (w + wl.ffn_norm);
    b->final_norm = (float *) (w + wl.final_norm);
    b->router = hp->n_experts > 1 ? (float *) (w + wl.router) : NULL;
#define CB_OPT(field, type, on) \
    b->field = (on) ? (type *) (w + wl.field) : NULL
    CB_OPT(pos_embed, float, hp->learned_pos);
    CB_OPT(attn_norm_b, float, hp->norm_layer);
    CB_OPT(ffn_norm_b, float, hp->norm_layer);
    CB_OPT(final_norm_b, float, hp->norm_layer);
    CB_OPT(bqkv, float, hp->qkv_bias);
    CB_OPT(bo, float, hp->o_bias);
    CB_OPT(q_norm, float, hp->qk_norm);
    CB_OPT(k_norm, float, hp->qk_norm);
    CB_OPT(b_gu, float, hp->mlp_bias);
    CB_OPT(b_down, float, hp->mlp_bias);
    CB_OPT(ws_gate_inp, float, hp->shared_ffn_dim > 0);
#undef CB_OPT

    kv_bytes = (size_t) b->n_blocks * (size_t) b->base.kv_bytes_per_block;
    {
        char msg[96];

        snprintf(msg, sizeof(msg), "KV cache (%d blocks, %zu MiB, %s)",
                 b->n_blocks, kv_bytes >> 20, b->kv_fp8 ? "e4m3" : "bf16");
        /* imported weights: the old worker still holds its pool, so ours
         * is backed later, as memory frees (cb_kv_start, cb_kv_grow) */
        if (!b->wmem.imported
            || moe_cuda_kvpool_reserve(&b->kvpool, b->device, kv_bytes,
                                       msg, sizeof(msg)) != MOE_OK)
        {
            CB_CUDA(cudaMalloc(&b->kv, kv_bytes), msg);
            CB_CUDA(cudaMemsetAsync(b->kv, 0, kv_bytes, b->stream),
                    "KV memset");
        } else {
            b->kv = (bf16 *) b->kvpool.base;
        }
    }

    b->qscratch_bytes = moe_qw_scratch_bytes(hp, b->plan);
    cb_ws_layout(hp, b->cap, b->n_blocks, b->qscratch_bytes, &sl);
    {
        char msg[96];

        snprintf(msg, sizeof(msg), "workspaces (%zu MiB for %d tokens)",
                 sl.total >> 20, b->cap);
        CB_CUDA(cudaMalloc(&b->wsbuf, sl.total), msg);
    }
    s = (char *) b->wsbuf;
    b->x = (float *) (s + sl.x);
    b->tmp = (float *) (s + sl.tmp);
    b->xf = (float *) (s + sl.xf);
    b->xb = (bf16 *) (s + sl.xb);
    b->qkv = (float *) (s + sl.qkv);
    b->att = (bf16 *) (s + sl.att);
    b->sel = (int32_t *) (s + sl.sel);
    b->selw = (float *) (s + sl.selw);
    b->slot_of = (int32_t *) (s + sl.slot_of);
    b->erow = (int32_t *) (s + sl.erow);
    b->counts = (int32_t *) (s + sl.counts);
    b->offs = (int32_t *) (s + sl.offs);
    b->fgsched = (uint32_t *) (s + sl.fgsched);
    b->margin = (float *) (s + sl.margin);
    b->rlogits = (float *) (s + sl.rlogits);
    b->d_ecounts = (int64_t *) (s + sl.ecounts);
    b->att_part = (float *) (s + sl.att_part);
    /* the split kernel's counters must start at zero (it keeps them so) */
    if (moe_cuda_attention_ws_init(b->att_part, b->stream) != MOE_OK) {
        moe_errf(err, errlen, "cuda backend: attention workspace: %s",
               moe_cuda_last_error());
        return MOE_EBACKEND;
    }
    CB_CUDA(cudaMemsetAsync(b->d_ecounts, 0, (size_t) hp->n_layers
                            * hp->n_experts * 8, b->stream), "counts memset");
    /* the grouped GEMMs' tile counters start at zero (each launch leaves
     * them so) */
    CB_CUDA(cudaMemsetAsync(b->fgsched, 0, 2 * 4, b->stream),
            "tile counters memset");
    /* dense layers of an MoE model never route: margin 1 for good */
    for (int l = 0; l < hp->n_layers; l++) {
        if (b->dense_slot[l] >= 0
            && moe_cuda_fill_random_f32(b->margin + (size_t) l * b->cap,
                                        b->cap, 0, 0.0f, 1.0f, b->stream)
               != MOE_OK)
        {
            moe_errf(err, errlen, "cuda backend: margins: %s",
                   moe_cuda_last_error());
            return MOE_EBACKEND;
        }
    }
    b->xe = (bf16 *) (s + sl.xe);
    b->gu = (float *) (s + sl.gu);
    b->gu_bytes = sl.hbuf - sl.gu;
    b->hbuf = (bf16 *) (s + sl.hbuf);
    b->ye = (float *) (s + sl.ye);
    b->qscratch = sl.qscratch > 0 ? (bf16 *) (s + sl.qscratch) : NULL;
    b->xlast = (bf16 *) (s + sl.xlast);
    b->logits = (float *) (s + sl.logits);
    b->d_tokout = (int32_t *) (s + sl.tokout);
    b->d_stage = (int32_t *) (s + sl.stage);
    b->stage_ints = sl.stage_ints;
    b->bt_cap = sl.bt_cap;

    CB_CUDA(cudaMallocHost(&b->h_stage, sl.stage_ints * sizeof(int32_t)),
            "pinned staging");
    if (!hp->learned_pos) {
        float  inv[512];

        if (hp->head_dim / 2 > 512) {
            moe_cuda_set_error("cuda backend: head_dim %d > 1024",
                               hp->head_dim);
            return MOE_EUNSUPPORTED;
        }
        moe_rope_inv_freq(hp, inv, &b->rope_att);
        CB_CUDA(cudaMalloc(&b->d_rope_inv,
                           (size_t) (hp->head_dim / 2) * sizeof(float)),
                "RoPE frequencies");
        CB_CUDA(cudaMemcpy(b->d_rope_inv, inv,
                           (size_t) (hp->head_dim / 2) * sizeof(float),
                           cudaMemcpyHostToDevice), "RoPE frequencies");
    }
    CB_CUDA(cudaMallocHost(&b->h_counts,
                           (size_t) (hp->n_experts + 1) * sizeof(int32_t)),
            "pinned counts");
    CB_CUDA(cudaMallocHost(&b->h_offs_log, (size_t) hp->n_layers
                                           * (hp->n_experts + 1)
                                           * sizeof(int32_t)),
            "pinned offsets log");
    b->offs_log_set = (uint8_t *) calloc((size_t) hp->n_layers, 1);
    if (b->offs_log_set == NULL) {
        moe_errf(err, errlen, "cuda backend: out of memory (offsets log)");
        return MOE_ENOMEM;
    }
    CB_CUDA(cudaEventCreateWithFlags(&b->offs_log_ev,
                                     cudaEventDisableTiming),
            "offsets log event");
    CB_CUDA(cudaMallocHost(&b->h_logits, (size_t) CB_LOGIT_ROWS
                                         * hp->vocab_size * sizeof(float)),
            "pinned logits");
    CB_CUDA(cudaMallocHost(&b->h_sp, (size_t) CB_LOGIT_ROWS
                           * sizeof(moe_cuda_sample_param_t)),
            "pinned sampling parameters");
    CB_CUDA(cudaMalloc(&b->d_sp, (size_t) CB_LOGIT_ROWS
                       * sizeof(moe_cuda_sample_param_t)),
            "sampling parameters");
    CB_CUDA(cudaMallocHost(&b->h_tokout, (size_t) CB_LOGIT_ROWS
                                         * sizeof(int32_t)),
            "pinned greedy ids");
    b->mask_words = ((size_t) hp->vocab_size + 31) / 32;
    CB_CUDA(cudaMallocHost(&b->h_mask, (size_t) CB_LOGIT_ROWS
                                       * b->mask_words * sizeof(uint32_t)),
            "pinned guided masks");
    CB_CUDA(cudaMalloc(&b->d_mask, (size_t) CB_LOGIT_ROWS * b->mask_words
                                   * sizeof(uint32_t)),
            "guided masks");
    CB_CUDA(cudaMallocHost(&b->h_lpp, (size_t) CB_LOGIT_ROWS
                           * sizeof(moe_cuda_logprobs_param_t)),
            "pinned logprobs parameters");
    CB_CUDA(cudaMalloc(&b->d_lpp, (size_t) CB_LOGIT_ROWS
                       * sizeof(moe_cuda_logprobs_param_t)),
            "logprobs parameters");
    CB_CUDA(cudaMallocHost(&b->h_lpo, CB_LP_FLOATS * sizeof(float)),
            "pinned logprobs");
    CB_CUDA(cudaMalloc(&b->d_lpo, CB_LP_FLOATS * sizeof(float)),
            "logprobs");
    CB_CUDA(cudaMallocHost(&b->h_bias, CB_BIAS_BYTES), "pinned logit_bias");
    CB_CUDA(cudaMalloc(&b->d_bias, CB_BIAS_BYTES), "logit_bias");
#undef CB_CUDA

    b->out_seq = (int *) calloc((size_t) b->cap, sizeof(int));
    b->expert_counts = (int64_t *) calloc((size_t) hp->n_layers
                                          * hp->n_experts, sizeof(int64_t));
    if (b->out_seq == NULL || b->expert_counts == NULL) {
        moe_errf(err, errlen, "cuda backend: out of host memory");
        return MOE_ENOMEM;
    }
    return MOE_OK;
}


static int
cb_create(const moe_hparams_t *hp, const moe_model_t *m,
    const moe_qplan_t *plan, uint64_t seed, int n_blocks, int block_size,
    int cap, int device, int tp, int rank, const moe_cuda_kv_t *kv,
    moe_backend_t **out, char *err, size_t errlen)
{
    cuda_backend_t *b;
    int             rc, ndev;

    *out = NULL;
    rc = cb_check_shapes(hp, block_size, cap, err, errlen);
    if (rc == MOE_OK) {
        rc = cb_check_arch(hp, err, errlen);
    }
    if (rc == MOE_OK && m != NULL && moe_model_tensors(m) == NULL) {
        moe_errf(err, errlen, "cuda backend: the model has no weights "
               "(load_format 'dummy'?)");
        rc = MOE_EINVAL;
    }
    if (rc != MOE_OK) {
        return rc;
    }
    if (n_blocks <= 0 || (int64_t) n_blocks * block_size > (1 << 30)) {
        moe_errf(err, errlen, "cuda backend: bad KV pool (%d blocks of %d)",
               n_blocks, block_size);
        return MOE_EINVAL;
    }
    for (int l = 0; kv != NULL && kv->fp8 && l < hp->n_layers; l++) {
        float ks = kv->k_scales != NULL ? kv->k_scales[l] : 1.0f;
        float vs = kv->v_scales != NULL ? kv->v_scales[l] : 1.0f;

        if (!(ks > 0.0f) || !(vs > 0.0f) || !isfinite(ks) || !isfinite(vs))
        {
            moe_errf(err, errlen, "cuda backend: fp8 KV scales must be "
                     "finite and > 0 (layer %d: k %g, v %g)", l, (double) ks,
                     (double) vs);
            return MOE_EINVAL;
        }
    }
    ndev = moe_cuda_device_count();
    if (device < 0 || device >= ndev) {
        moe_errf(err, errlen, "cuda backend: no CUDA device %d (%d found)",
               device, ndev);
        return MOE_EBACKEND;
    }
    {
        char why[256];

        if (!moe_cuda_device_runnable(device, why, sizeof(why))) {
            moe_errf(err, errlen, "cuda backend: %s", why);
            return MOE_EUNSUPPORTED;
        }
    }

    b = (cuda_backend_t *) calloc(1, sizeof(*b));
    if (b == NULL) {
        moe_errf(err, errlen, "cuda backend: out of memory");
        return MOE_ENOMEM;
    }
    b->hp = *hp;
    b->plan = (moe_qplan_t *) calloc(1, sizeof(moe_qplan_t));
    if (b->plan == NULL) {
        free(b);
        moe_errf(err, errlen, "cuda backend: out of memory");
        return MOE_ENOMEM;
    }
    if (plan != NULL) {
        *b->plan = *plan;
    } else {
        moe_qw_plan_bf16(b->plan);
    }
    b->device = device;
    b->tp = tp;
    b->rank = rank;
    b->n_blocks = n_blocks;
    b->block_size = block_size;
    b->cap = cap;
    b->K = hp->n_experts > 1 ? hp->top_k : 1;
    b->El = moe_hp_local_experts(hp);
    b->Q = hp->n_heads * hp->head_dim;
    b->KVD = hp->n_kv_heads * hp->head_dim;
    b->G = hp->ffn_ungated ? hp->ffn_dim : 2 * hp->ffn_dim;
    {
        int l, nd = 0, on = cb_n_dense(hp) > 0;

        for (l = 0; l < MOE_MAX_LAYERS; l++) {
            b->dense_slot[l] = on && l < hp->n_layers && hp->layer_dense[l]
                               ? nd++ : -1;
        }
    }
    b->base.name = "cuda";
    b->base.n_kv_blocks = n_blocks;
    /* the KV element (kv_cache_dtype): fp8 pools hold e4m3(x / scale),
     * scales 0 meaning 1.0 */
    b->kv_fp8 = kv != NULL && kv->fp8;
    for (int l = 0; l < hp->n_layers; l++) {
        b->kv_ks[l] = b->kv_fp8 && kv->k_scales != NULL ? kv->k_scales[l]
                                                        : 1.0f;
        b->kv_vs[l] = b->kv_fp8 && kv->v_scales != NULL ? kv->v_scales[l]
                                                        : 1.0f;
    }
    b->base.kv_bytes_per_block = cb_kv_bytes_per_block(hp, block_size,
                                                       b->kv_fp8);
    b->base.kv_dtype = b->kv_fp8 ? "fp8_e4m3" : "bfloat16";
    b->base.forward = cb_forward;
    b->base.expert_counts = cb_expert_counts;
    b->base.destroy = cb_destroy;
    rc = moe_cuda_tuning_read(&b->tune, hp->n_experts,
                              cb_expert_fmt(b->plan), err, errlen);
    if (rc != MOE_OK) {
        free(b->plan);
        free(b);
        return rc;
    }
    {
        /* which formats the linear parts keep (qweights.h) */
        int  l, p, n[MOE_WF_COUNT] = { 0 };
        char line[160];

        for (l = 0; l < hp->n_layers; l++) {
            for (p = 0; p < MOE_QP_N; p++) {
                moe_qshape_t sh;

                moe_qw_shape(hp, l, p, &sh);
                n[b->plan->f[l][p].fmt] += sh.present;
            }
        }
        if (n[MOE_WF_FP8] + n[MOE_WF_AWQ] + n[MOE_WF_GPTQ] > 0) {
            snprintf(line, sizeof(line), "%d fp8, %d awq, %d gptq, %d bf16",
                     n[MOE_WF_FP8], n[MOE_WF_AWQ], n[MOE_WF_GPTQ],
                     n[MOE_WF_BF16]);
            moe_log(MOE_LOG_INFO, "cuda backend: device %d: linear weights "
                    "packed on the device (parts: %s), %.2f GB of weights",
                    device, line, cb_weight_bytes_plan(hp, b->plan) / 1e9);
        }
    }
    {
        char line[512];

        moe_cuda_tuning_format(&b->tune, line, sizeof(line));
        moe_log(MOE_LOG_INFO, "cuda backend: device %d tuning: %s", device,
                line);
    }
    if (b->kv_fp8) {
        moe_log(MOE_LOG_INFO, "cuda backend: device %d: fp8 (e4m3) KV "
                "cache, %d blocks of %lld bytes, layer 0 scales k %g v %g",
                device, n_blocks, (long long) b->base.kv_bytes_per_block,
                (double) b->kv_ks[0], (double) b->kv_vs[0]);
    }
    /* sample_tokens 0 leaves non-greedy rows to the engine's host sampler
     * (the test of both paths) */
    b->base.sample_tokens = b->tune.sample_tokens;
    /* guided rows keep the device path: their masks are applied here */
    b->base.guided_mask = 1;
    b->base.logprobs_tokens = 1;
    /* logit_bias added on the device (cb_bias): no logits leave it.
     * MOE_CUDA_LOGIT_BIAS=0 leaves it to the engine's host sampler (a
     * test switch, as MOE_CPU_LOGIT_BIAS: the two paths' equality) */
    {
        const char *lb = getenv("MOE_CUDA_LOGIT_BIAS");

        b->base.logit_bias_device = lb == NULL || atoi(lb) != 0;
    }
    b->use_graphs = b->tune.graphs;
    /* process-wide (every backend of a process reads the same
     * environment, so they agree) */
    moe_cuda_pdl_set(b->tune.pdl);
    {
        /* MOE_CUDA_FP8_ACT=0: fp8 prefill dequantizes instead of
         * quantizing activations (the exact path; test_qbackend) */
        const char *fa = getenv("MOE_CUDA_FP8_ACT");

        b->fp8_act = fa == NULL || atoi(fa) != 0;
    }

    cb_share_key(b, m, seed);
    rc = cb_alloc(b, err, errlen);
    if (rc == MOE_OK && !b->wmem.imported) {
        if (m != NULL) {
            rc = cb_load_weights(b, m, err, errlen);
        } else {
            rc = cb_random_weights(b, seed);
            if (rc != MOE_OK) {
                moe_errf(err, errlen, "cuda backend: weights: %s",
                       moe_cuda_last_error());
            }
        }
        if (rc == MOE_OK && cb_q4_tile_all(b) != MOE_OK) {
            moe_errf(err, errlen, "cuda backend: 4-bit repack: %s",
                     moe_cuda_last_error());
            rc = MOE_EBACKEND;
        }
    }
    if (rc == MOE_OK) {
        cb_q4_settle(b);
    }
    if (rc == MOE_OK && cudaStreamSynchronize(b->stream) != cudaSuccess) {
        moe_errf(err, errlen, "cuda backend: %s",
               cudaGetErrorString(cudaGetLastError()));
        rc = MOE_EBACKEND;
    }
    if (rc == MOE_OK && b->kvpool.base != NULL) {
        rc = cb_kv_start(b, err, errlen);
    }
    if (rc != MOE_OK) {
        cb_destroy(&b->base);
        return rc;
    }
    /* the weights are whole: the next worker may take them */
    moe_cuda_wmem_serve(&b->wmem, b->share_key, b->n_blocks,
                        b->base.kv_bytes_per_block);
    b->base.handover_wait = cb_handover_wait;
    /* swap space: allocated later by the engine (cb_swap_alloc) */
    b->base.destroy = cb_swap_destroy;
    b->base.swap_alloc = cb_swap_alloc;
    b->base.swap_out = cb_swap_out;
    b->base.swap_in = cb_swap_in;
    b->base.swap_read = cb_swap_read;
    *out = &b->base;
    return MOE_OK;
}


extern "C" int
moe_cuda_backend_create(const moe_model_t *m, int n_blocks, int block_size,
    int max_batched_tokens, int device, moe_backend_t **out, char *err,
    size_t errlen)
{
    return moe_cuda_backend_create_rank(m, 1, 0, n_blocks, block_size,
                                        max_batched_tokens, device, out, err,
                                        errlen);
}


extern "C" int
moe_cuda_backend_create_rank(const moe_model_t *m, int tp, int rank,
    int n_blocks, int block_size, int max_batched_tokens, int device,
    moe_backend_t **out, char *err, size_t errlen)
{
    return moe_cuda_backend_create_rank_ep(m, tp, rank, 0, n_blocks,
                                           block_size, max_batched_tokens,
                                           device, out, err, errlen);
}


extern "C" int
moe_cuda_backend_create_rank_ep(const moe_model_t *m, int tp, int rank,
    int ep, int n_blocks, int block_size, int max_batched_tokens, int device,
    moe_backend_t **out, char *err, size_t errlen)
{
    return moe_cuda_backend_create_kv(m, NULL, MOE_WF_BF16, 0, tp, rank, ep,
                                      n_blocks, block_size,
                                      max_batched_tokens, device, NULL, out,
                                      err, errlen);
}


extern "C" int
moe_cuda_backend_create_random(const moe_hparams_t *hp, uint64_t seed,
    int n_blocks, int block_size, int max_batched_tokens, int device,
    moe_backend_t **out, char *err, size_t errlen)
{
    return moe_cuda_backend_create_random_fmt(hp, MOE_WF_BF16, seed, 1, 0, 0,
                                              n_blocks, block_size,
                                              max_batched_tokens, device,
                                              out, err, errlen);
}


extern "C" int
moe_cuda_backend_create_random_rank(const moe_hparams_t *hp, uint64_t seed,
    int tp, int rank, int ep, int n_blocks, int block_size,
    int max_batched_tokens, int device, moe_backend_t **out, char *err,
    size_t errlen)
{
    return moe_cuda_backend_create_random_fmt(hp, MOE_WF_BF16, seed, tp,
                                              rank, ep, n_blocks, block_size,
                                              max_batched_tokens, device,
                                              out, err, errlen);
}


extern "C" int
moe_cuda_backend_create_random_fmt(const moe_hparams_t *hp, int wfmt,
    uint64_t seed, int tp, int rank, int ep, int n_blocks, int block_size,
    int max_batched_tokens, int device, moe_backend_t **out, char *err,
    size_t errlen)
{
    return moe_cuda_backend_create_kv(NULL, hp, wfmt, seed, tp, rank, ep,
                                      n_blocks, block_size,
                                      max_batched_tokens, device, NULL, out,
                                      err, errlen);
}


extern "C" int
moe_cuda_backend_create_kv(const moe_model_t *m, const moe_hparams_t *hp,
    int wfmt, uint64_t seed, int tp, int rank, int ep, int n_blocks,
    int block_size, int max_batched_tokens, int device,
    const moe_cuda_kv_t *kv, moe_backend_t **out, char *err, size_t errlen)
{
    moe_hparams_t  rhp;
    moe_qplan_t   *plan = NULL;
    int            rc;

    *out = NULL;
    if ((m == NULL && hp == NULL) || tp < 1 || rank < 0 || rank >= tp) {
        moe_errf(err, errlen, "cuda backend: no model, or rank %d of %d",
                 rank, tp);
        return MOE_EINVAL;
    }
    if (m != NULL) {
        /* the checkpoint's weights, this rank's slice */
        rc = cb_rank_plan(m, tp, rank, ep, &rhp, &plan, err, errlen);
        if (rc == MOE_OK) {
            rc = cb_create(&rhp, m, plan, 0, n_blocks, block_size,
                           max_batched_tokens, device, tp, rank, kv, out,
                           err, errlen);
        }
        free(plan);
        return rc;
    }
    if (wfmt < 0 || wfmt >= MOE_WF_COUNT) {
        moe_errf(err, errlen, "cuda backend: unknown weight format %d", wfmt);
        return MOE_EINVAL;
    }
    if (cb_has_extras(hp)) {
        moe_errf(err, errlen, "cuda backend: random weights only for the "
               "Llama/Mistral/Mixtral feature set (%s)", hp->arch_name);
        return MOE_EUNSUPPORTED;
    }
    rc = moe_hparams_shard_ep(hp, tp, rank, ep && tp > 1, &rhp, err, errlen);
    if (rc != MOE_OK) {
        return rc;
    }
    plan = cb_plan_new(&rhp, wfmt);
    if (plan == NULL) {
        moe_errf(err, errlen, "cuda backend: out of memory");
        return MOE_ENOMEM;
    }
    /* each rank its own random values: shapes and timing, not outputs */
    rc = cb_create(&rhp, NULL, plan, seed + 7919 * (uint64_t) rank,
                   n_blocks, block_size, max_batched_tokens, device, tp,
                   rank, kv, out, err, errlen);
    free(plan);
    return rc;
}


/* ------------------------------------------------------------ profiling */

extern "C" int
moe_cuda_backend_profile(moe_backend_t *base, int enable,
    double ms[MOE_CUDA_N_STAGES])
{
    cuda_backend_t *b = (cuda_backend_t *) base;
    int             i;

    if (ms != NULL) {
        for (i = 0; i < MOE_CUDA_N_STAGES; i++) {
            ms[i] = b->prof_ms[i];
        }
    }
    for (i = 0; i < MOE_CUDA_N_STAGES; i++) {
        b->prof_ms[i] = 0;
    }
    if (enable && b->ev == NULL) {
        MOE_CUDA_CHECK(cudaSetDevice(b->device));
        b->ev_cap = 20 * b->hp.n_layers + 64 + 2 * (b->cap / CB_LOGIT_ROWS);
        b->ev = (cudaEvent_t *) calloc((size_t) b->ev_cap,
                                       sizeof(cudaEvent_t));
        b->ev_stage = (int *) calloc((size_t) b->ev_cap, sizeof(int));
        if (b->ev == NULL || b->ev_stage == NULL) {
            return MOE_ENOMEM;
        }
        for (i = 0; i < b->ev_cap; i++) {
            MOE_CUDA_CHECK(cudaEventCreate(&b->ev[i]));
        }
    }
    b->prof = enable != 0;
    return MOE_OK;
}


/* The GPU work enqueued since the previous mark belongs to `stage`. */
static int
cb_mark(cuda_backend_t *b, int stage)
{
    if (!b->prof || b->n_ev >= b->ev_cap) {
        return MOE_OK;
    }
    MOE_CUDA_CHECK(cudaEventRecord(b->ev[b->n_ev], b->stream));
    b->ev_stage[b->n_ev++] = stage;
    return MOE_OK;
}


static int
cb_prof_collect(cuda_backend_t *b)
{
    int   i;
    float t;

    for (i = 1; i < b->n_ev; i++) {
        MOE_CUDA_CHECK(cudaEventElapsedTime(&t, b->ev[i - 1], b->ev[i]));
        b->prof_ms[b->ev_stage[i]] += t;
    }
    b->n_ev = 0;
    return MOE_OK;
}


/* -------------------------------------------------------------- forward */

/* Y (T, N) fp32 = X (T, Kd) . W^T: GEMV for small T, else cuBLAS. */
static int
cb_linear(cuda_backend_t *b, int T, int N, int Kd, const bf16 *X, int ldx,
    const bf16 *W, float *Y, int ldy)
{
    if (T <= b->tune.dense_gemv_t && moe_cuda_gemv_supported(Kd, ldx)) {
        return moe_cuda_gemv((const moe_bf16_t *) X, ldx, NULL, 1,
                             (const moe_bf16_t *) W, N, Kd, NULL, 1, T, T, 0,
                             Y, NULL, ldy, &b->tune, b->stream);
    }
    return moe_cuda_gemm(b->blas, T, N, Kd, (const moe_bf16_t *) X, ldx,
                         (const moe_bf16_t *) W, Kd, Y, ldy, 0, 0.0f);
}


/* ------------------------------------------------ packed linear parts */

/* paths of cb_expert_proj */
enum {
    CB_PATH_GEMV = 0,   /* few rows per expert: GEMV over the weights */
    CB_PATH_GGEMM,      /* grouped tensor-core GEMM, offsets on device */
    CB_PATH_BLAS        /* per-expert cuBLAS, offsets in b->h_counts */
};


static const cb_qw_t *
cb_part(const cuda_backend_t *b, int l, int p)
{
    return &b->qw[(size_t) l * MOE_QP_N + p];
}


/*
 * 1 when part w takes the 4-bit GEMV by quantization group
 * (kernels/q4_group.cu, moe_cuda_qgemv_q4g_rows): the knob q4_gemv,
 * GPTQ's layout (GPTQ, AWQ repacked by q4_layout 1) without g_idx, and
 * shapes it takes (silu: stacked gate|up with SiLU fused).  Row hints
 * (mr) up to CB_Q4G_MAX_ROWS run on mma.sync (passes of 8, above 8 of
 * 16 rows); above, the warpgroup kernel (kernels/q4_wgmma.cu, passes of
 * 32 rows) where moe_cuda_q4g_rows_ok, else the tensor-core GEMV
 * (passes of 32: the by-group kernel would read the weights once per 16).
 */
#define CB_Q4G_MAX_ROWS  16

static int
cb_q4g_ok(const cuda_backend_t *b, const cb_qw_t *w, int mr, int silu)
{
    return b->tune.q4_gemv && w->fmt == MOE_WF_GPTQ && w->g_idx == NULL
           && !w->tiled && mr >= 1
           && moe_cuda_q4g_rows_ok(w->G, w->N, w->K, silu, mr);
}


/* The quantized GEMV of a packed part (kernels/quant_gemv.h), grouped
 * over E experts by offs (NULL: one matrix, n rows). */
static int
cb_qgemv(cuda_backend_t *b, const cb_qw_t *w, const bf16 *X, int ldx,
    const int32_t *xrow, int xdiv, const int32_t *offs, int E, int n,
    int mr, float *Y, int ldy)
{
    if (w->fmt == MOE_WF_FP8
        && moe_cuda_fp8_supported(w->mode, w->N, w->K, ldx, 0))
    {
        /* e4m3 on the tensor cores (kernels/moe_gemv_fp8.cu) */
        return moe_cuda_gemv_fp8((const moe_bf16_t *) X, ldx, xrow, xdiv,
                                 (const uint8_t *) w->w, w->scale, w->mode,
                                 w->N, w->K, offs, E, n, mr, 0, Y, NULL, ldy,
                                 &b->tune, b->stream);
    }
    if (w->fmt == MOE_WF_FP8) {
        return moe_cuda_qgemv_fp8((const moe_bf16_t *) X, ldx, xrow, xdiv,
                                  (const uint8_t *) w->w, w->scale, w->mode,
                                  0, w->N, w->K, offs, E, n, Y, ldy,
                                  b->stream);
    }
    if (w->tiled) {
        b->q4_tiled_calls++;
        return moe_cuda_qgemv_q4t(cb_q4_kfmt(w), (const moe_bf16_t *) X, ldx,
                                  xrow, xdiv, (const int32_t *) w->w,
                                  w->zeros, w->scales, w->G, w->zero_bias,
                                  w->N, w->K, offs, E, n, mr, 0, Y, ldy,
                                  NULL, b->stream);
    }
    if (cb_q4g_ok(b, w, mr, 0)) {
        b->q4g_calls++;
        b->q4w_calls += mr > CB_Q4G_MAX_ROWS;
        /* dense_pre: a dense matrix's first weights load before the
         * kernel's PDL wait (the kernel applies it to one pass of one
         * matrix only) */
        return moe_cuda_qgemv_q4g_pre((const moe_bf16_t *) X, ldx, xrow,
                                      xdiv, (const int32_t *) w->w,
                                      w->zeros, w->scales, w->G,
                                      w->zero_bias, w->N, w->K, offs, E, n,
                                      mr, Y, ldy, NULL,
                                      b->tune.dense_pre > 0 && offs == NULL,
                                      b->stream);
    }
    return moe_cuda_qgemv_q4(w->fmt == MOE_WF_AWQ ? MOE_K_Q4_AWQ
                                                  : MOE_K_Q4_GPTQ,
                             (const moe_bf16_t *) X, ldx, xrow, xdiv,
                             (const int32_t *) w->w, w->zeros, w->scales,
                             w->g_idx, w->G, w->zero_bias, w->N, w->K, offs,
                             E, n, Y, ldy, b->stream);
}


/* A packed part's `count` matrices dequantized into b->qscratch (bf16
 * (count, N, K), the layout the bf16 GEMMs take). */
static int
cb_dequant(cuda_backend_t *b, const cb_qw_t *w)
{
    if (b->qscratch == NULL) {
        moe_cuda_set_error("cuda backend: no dequantization scratch");
        return MOE_EBACKEND;
    }
    if (w->fmt == MOE_WF_FP8) {
        return moe_cuda_dequant_fp8((const uint8_t *) w->w, w->scale,
                                    w->mode, 0, w->N, w->K, w->count,
                                    (moe_bf16_t *) b->qscratch, b->stream);
    }
    if (w->tiled) {
        return moe_cuda_dequant_q4t(cb_q4_kfmt(w), (const int32_t *) w->w,
                                    w->zeros, w->scales, w->G, w->zero_bias,
                                    w->N, w->K, w->count,
                                    (moe_bf16_t *) b->qscratch, b->stream);
    }
    return moe_cuda_dequant_q4(w->fmt == MOE_WF_AWQ ? MOE_K_Q4_AWQ
                                                    : MOE_K_Q4_GPTQ,
                               (const int32_t *) w->w, w->zeros, w->scales,
                               w->g_idx, w->G, w->zero_bias, w->N, w->K,
                               w->count, (moe_bf16_t *) b->qscratch,
                               b->stream);
}


/* Local expert el of a packed group view (cb_group) dequantized into
 * b->qscratch (bf16 (N, K)). */
static int
cb_dequant_expert(cuda_backend_t *b, const cb_qw_t *w, int el)
{
    size_t K = (size_t) w->K, C = (size_t) w->ld, KG;

    if (b->qscratch == NULL || !w->view) {
        moe_cuda_set_error("cuda backend: no dequantization scratch");
        return MOE_EBACKEND;
    }
    if (w->fmt == MOE_WF_FP8) {
        return moe_cuda_dequant_fp8((const uint8_t *) w->w + (size_t) el
                                    * cb_fp8_wstride(w),
                                    w->scale + (size_t) el * cb_fp8_sstride(w),
                                    w->mode, 0, w->N, w->K, 1,
                                    (moe_bf16_t *) b->qscratch, b->stream);
    }
    KG = K / (size_t) w->G;
    if (w->tiled) {
        return moe_cuda_dequant_q4t(cb_q4_kfmt(w), (const int32_t *) w->w
                                    + (size_t) el * K * C / 8,
                                    w->zeros + (size_t) el * KG * C / 8,
                                    w->scales + (size_t) el * KG * C, w->G,
                                    w->zero_bias, w->N, w->K, 1,
                                    (moe_bf16_t *) b->qscratch, b->stream);
    }
    return moe_cuda_dequant_q4(w->fmt == MOE_WF_AWQ ? MOE_K_Q4_AWQ
                                                    : MOE_K_Q4_GPTQ,
                               (const int32_t *) w->w + (size_t) el * K * C
                                                        / 8,
                               w->zeros + (size_t) el * KG * C / 8,
                               w->scales + (size_t) el * KG * C, NULL, w->G,
                               w->zero_bias, w->N, w->K, 1,
                               (moe_bf16_t *) b->qscratch, b->stream);
}


static int cb_fuse_unperm(const cuda_backend_t *b);


/*
 * Prefill-sized rows of an fp8 per-channel part on the fp8 tensor cores
 * (kernels/gemm_fp8.h): the n rows of X (ldx) quantized per row into the
 * dequantization scratch, then one cuBLASLt GEMM per matrix: count 1 (a
 * dense part), or per expert e of the part with rows [h_counts[e],
 * h_counts[e + 1]) of X (the gathered rows, CB_PATH_BLAS).  MOE_EUNSUPPORTED
 * (nothing enqueued) when the part or the scratch does not allow it: the
 * caller then dequantizes.  The scratch holds Q (rows + the GEMMs' row
 * rounding, moe_cuda_fp8_gemm_rows) * K
 * bytes, the row scales, and the GEMM's fp32 output of the largest
 * matrix (rows rounded up to 64) * N.
 */
static int
cb_fp8_gemm(cuda_backend_t *b, const cb_qw_t *w, int n, const bf16 *X,
    int ldx, int experts, float *Y, int ldy)
{
    size_t   K = (size_t) w->K, N = (size_t) w->N, rows = (size_t) n
                   + (size_t) moe_cuda_fp8_gemm_rows(b->fp8g);
    size_t   qb = (rows * K + 255) / 256 * 256, sb = (rows * 4 + 255) / 256
                                                    * 256;
    uint8_t *Q = (uint8_t *) b->qscratch;
    float   *qs, *tmp;
    int      e, e0 = b->hp.expert_first, r0, ne;

    if (b->fp8g == NULL || !b->fp8_act || w->fmt != MOE_WF_FP8
        || w->mode != MOE_K_FP8_CHANNEL || n <= 0 || K % 16 != 0
        || N % 16 != 0 || ldx % 8 != 0 || Q == NULL
        || qb + sb + rows * N * 4 > b->qscratch_bytes)
    {
        return MOE_EUNSUPPORTED;
    }
    qs = (float *) (Q + qb);
    tmp = (float *) (Q + qb + sb);
    MOE_TRY(moe_cuda_quant_rows_fp8((const moe_bf16_t *) X, ldx, NULL, 1, n,
                                    (int) K, Q, qs, b->stream));
    if (!experts) {
        /* the unscaled product in bf16 (half the bytes of fp32 written and
         * read back), then the scales into Y */
        MOE_TRY(moe_cuda_gemm_fp8_unscaled(b->fp8g, n, (int) N, (int) K, Q,
                                           (const uint8_t *) w->w, tmp, 1,
                                           b->stream));
        if (b->tune.fold_scales && Y == b->dq_allow && ldy == (int) N
            && N % 4 == 0 && N <= 32768 && (uintptr_t) w->scale % 16 == 0)
        {
            /* its reader scales it (cb_norm: moe_cuda_add_rmsnorm_q;
             * the rope: moe_cuda_rope_kv_q): no fp32 copy written and
             * read back */
            b->dq_y = Y;
            b->dq_yq = (const bf16 *) tmp;
            b->dq_qs = qs;
            b->dq_ws = w->scale;
            return MOE_OK;
        }
        return moe_cuda_fp8_rescale_rows_bf16((const moe_bf16_t *) tmp, n,
                                              (int) N, qs, w->scale, 0, NULL,
                                              1, Y, ldy, b->stream);
    }
    for (e = e0; e < e0 + w->count; e++) {
        ne = b->h_counts[e + 1] - b->h_counts[e];
        r0 = b->h_counts[e];
        if (ne > 0) {
            MOE_TRY(moe_cuda_gemm_fp8(b->fp8g, ne, (int) N, (int) K,
                                      Q + (size_t) r0 * K, qs + r0,
                                      (const uint8_t *) w->w
                                      + (size_t) (e - e0) * cb_fp8_wstride(w),
                                      w->scale + (size_t) (e - e0) * cb_fp8_sstride(w),
                                      Y + (size_t) r0 * ldy, ldy, 0, 0, tmp,
                                      b->stream));
        }
    }
    return MOE_OK;
}


/* The scratch and shape conditions of cb_fp8_ffn for n rows (below). */
static int
cb_fp8_ffn_fits(const cuda_backend_t *b, const cb_qw_t *g, const cb_qw_t *wd,
    int n)
{
    size_t D = (size_t) g->K, F = (size_t) wd->K, rows = (size_t) n
               + (size_t) moe_cuda_fp8_gemm_rows(b->fp8g);
    size_t qb = (rows * D + 255) / 256 * 256;
    size_t hb = (rows * F + 255) / 256 * 256;
    size_t sb = (rows * 4 + 255) / 256 * 256;
    size_t tb = rows * 2 * F * 2 > rows * D * 2 ? rows * 2 * F * 2
                                                : rows * D * 2;

    return b->fp8g != NULL && b->fp8_act && g->fmt == MOE_WF_FP8
           && wd->fmt == MOE_WF_FP8 && g->mode == MOE_K_FP8_CHANNEL
           && wd->mode == MOE_K_FP8_CHANNEL && (size_t) g->N == 2 * F
           && (size_t) wd->N == D && wd->count == g->count && D % 16 == 0
           && F % 16 == 0 && n > 0 && b->qscratch != NULL
           && qb + hb + 2 * sb + tb <= b->qscratch_bytes;
}


/* 1 when cb_fp8_ffn's two GEMMs may run as the grouped GEMM (the knob,
 * the shapes, the alignment: every launch of that path takes them, since
 * without the host sync nothing could fall back). */
static int
cb_fp8_grouped_fits(const cuda_backend_t *b, const cb_qw_t *g,
    const cb_qw_t *wd)
{
    return b->tune.fp8_grouped
           && moe_cuda_fp8_grouped_supported(g->N, g->K, cb_fp8_wstride(g))
           && moe_cuda_fp8_grouped_supported(wd->N, wd->K,
                                             cb_fp8_wstride(wd))
           && (uintptr_t) g->w % 16 == 0 && (uintptr_t) wd->w % 16 == 0
           && (uintptr_t) g->scale % 16 == 0 && cb_fp8_sstride(g) % 4 == 0
           && wd->K % 128 == 0;
}


/* The grouped GEMMs' tile order from the fp8_gsched knob. */
static int
cb_fg_sch(const cuda_backend_t *b)
{
    return b->tune.fp8_gsched == 2 ? MOE_FG_DYN | MOE_FG_PAIR
           : b->tune.fp8_gsched ? MOE_FG_DYN : 0;
}


/* One of cb_fp8_ffn's grouped GEMMs: every expert of the rank in one
 * launch, offsets read on the device; qs non-NULL: gate|up with SwiGLU
 * (moe_cuda_fp8_grouped_swiglu).  Its shapes were checked
 * (cb_fp8_grouped_fits), so a refusal is a backend error here: the
 * quantized rows are already enqueued. */
static int
cb_fp8_grouped(cuda_backend_t *b, const uint8_t *Q, const float *qs,
    const cb_qw_t *w, int EL, int R, bf16 *Y)
{
    /* swiglu: the gate|up group w with SwiGLU in the epilogue (qs the
     * rows' scales), Y then (R, F) */
    int rc = qs != NULL
             ? moe_cuda_fp8_grouped_swiglu(Q, R, (const uint8_t *) w->w,
                                           cb_fp8_wstride(w),
                                           b->offs + b->hp.expert_first, EL,
                                           R, w->N / 2, w->K, qs, w->scale,
                                           cb_fp8_sstride(w),
                                           (moe_bf16_t *) Y, b->fgsched,
                                           cb_fg_sch(b), b->stream)
             : moe_cuda_fp8_grouped_gemm(Q, R, (const uint8_t *) w->w,
                                         cb_fp8_wstride(w),
                                         b->offs + b->hp.expert_first, EL, R,
                                         w->N, w->K, (moe_bf16_t *) Y,
                                         b->fgsched, cb_fg_sch(b),
                                         b->stream);

    if (rc == MOE_K_EUNSUPPORTED) {
        moe_cuda_set_error("fp8 grouped GEMM refused N %d K %d", w->N, w->K);
        return MOE_EBACKEND;
    }
    return rc;
}


/*
 * The routed experts of a prefill-sized step on the fp8 tensor cores when
 * gate|up is a stacked fp8 per-channel group g (2F rows per expert) and
 * down (wd) fp8 per channel, the rank's experts owning rows [R0, R0 + R)
 * of the step's n (offsets on the device in b->offs; on the host in
 * b->h_counts only where the per-expert GEMMs run): the rank's rows
 * quantized once; the unscaled gate|up product in bf16, the experts'
 * rows stacked in one buffer: one grouped launch
 * (moe_cuda_fp8_grouped_gemm, the offsets read on the device) where its
 * shapes allow (cb_fp8_grouped_fits), else per expert
 * (moe_cuda_gemm_fp8_unscaled); one moe_cuda_silu_quant_fp8 over all
 * rows (scales, SwiGLU and the down input's e4m3 quantization); the
 * unscaled down product in bf16 the same way; one
 * moe_cuda_fp8_rescale_rows_bf16 into b->ye.  That replaces the gate
 * |up rescale pass over fp32, the SwiGLU pass and the down input's
 * quantization (cb_fp8_gemm twice: bench_engine fp8 prefill 2048 spent
 * 0.75 ms per layer rescaling and 0.30 ms in SwiGLU, ncu, H200) and
 * needs 19 launches per layer instead of 33.  MOE_EUNSUPPORTED (nothing
 * enqueued) when the parts or the scratch do not allow it.  Scratch: Q
 * (n + moe_cuda_fp8_gemm_rows rows of D bytes), qs, Qh (as many rows of F),
 * qh, then the larger of the bf16 gate|up products and the bf16 down
 * products (as many rows each).
 */
static int
cb_fp8_ffn(cuda_backend_t *b, const cb_qw_t *g, const cb_qw_t *wd, int n,
    int R0, int R)
{
    size_t   D = (size_t) g->K, F = (size_t) wd->K, rows = (size_t) n
                   + (size_t) moe_cuda_fp8_gemm_rows(b->fp8g);
    size_t   qb = (rows * D + 255) / 256 * 256;
    size_t   hb = (rows * F + 255) / 256 * 256;
    size_t   sb = (rows * 4 + 255) / 256 * 256;
    uint8_t *Q = (uint8_t *) b->qscratch, *Qh;
    float   *qs, *qh, *tmp;
    int      e, e0 = b->hp.expert_first, EL = g->count, r0, ne;
    int      grouped = cb_fp8_grouped_fits(b, g, wd);

    if (!cb_fp8_ffn_fits(b, g, wd, n)) {
        return MOE_EUNSUPPORTED;
    }
    b->fp8_ffn_layers++;
    b->fp8_grouped_layers += grouped;
    if (R <= 0) {
        return MOE_OK;
    }
    qs = (float *) (Q + qb);
    Qh = Q + qb + sb;
    qh = (float *) (Qh + hb);
    tmp = (float *) (Qh + hb + sb);
    /* the rows quantized straight from the normed tokens (row r is
     * token erow[r] / K of xb): no gathered bf16 copy */
    MOE_TRY(moe_cuda_quant_rows_fp8((const moe_bf16_t *) b->xb, (int) D,
                                    b->erow + R0, b->K, R, (int) D, Q, qs,
                                    b->stream));
    /* row order: each expert's GEMM writes 64-row-rounded tiles, the
     * next expert's then overwrites the spill (gemm_fp8.h) */
    for (e = e0; !grouped && e < e0 + EL; e++) {
        ne = b->h_counts[e + 1] - b->h_counts[e];
        r0 = b->h_counts[e] - R0;
        if (ne > 0) {
            MOE_TRY(moe_cuda_gemm_fp8_unscaled(b->fp8g, ne, (int) (2 * F),
                                               (int) D, Q + (size_t) r0 * D,
                                               (const uint8_t *) g->w
                                               + (size_t) (e - e0)
                                                 * cb_fp8_wstride(g),
                                               (moe_bf16_t *) tmp
                                               + (size_t) r0 * 2 * F, 1,
                                               b->stream));
        }
    }
    if (grouped && b->tune.fp8_grouped == 2) {
        /* SwiGLU in the gate|up GEMM's epilogue: h (R, F) bf16, then its
         * per-row quantization for the down GEMM */
        MOE_TRY(cb_fp8_grouped(b, Q, qs, g, EL, R, (bf16 *) tmp));
        MOE_TRY(moe_cuda_quant_rows_fp8((const moe_bf16_t *) tmp, (int) F,
                                        NULL, 1, R, (int) F, Qh, qh,
                                        b->stream));
    } else {
        if (grouped) {
            MOE_TRY(cb_fp8_grouped(b, Q, NULL, g, EL, R, (bf16 *) tmp));
        }
        MOE_TRY(moe_cuda_silu_quant_fp8((moe_bf16_t *) tmp, R, (int) F, qs,
                                        g->scale, cb_fp8_sstride(g),
                                        b->offs + e0, EL, Qh, qh,
                                        b->stream));
    }
    if (grouped) {
        MOE_TRY(cb_fp8_grouped(b, Qh, NULL, wd, EL, R, (bf16 *) tmp));
    }
    for (e = e0; !grouped && e < e0 + EL; e++) {
        ne = b->h_counts[e + 1] - b->h_counts[e];
        r0 = b->h_counts[e] - R0;
        if (ne > 0) {
            MOE_TRY(moe_cuda_gemm_fp8_unscaled(b->fp8g, ne, (int) D, (int) F,
                                               Qh + (size_t) r0 * F,
                                               (const uint8_t *) wd->w
                                               + (size_t) (e - e0)
                                                 * cb_fp8_wstride(wd),
                                               (moe_bf16_t *) tmp
                                               + (size_t) r0 * D, 1,
                                               b->stream));
        }
    }
    if (b->tune.fold_scales && cb_fuse_unperm(b) && e0 == 0
        && EL == b->hp.n_experts && cb_fp8_sstride(wd) % 4 == 0
        && (uintptr_t) wd->scale % 16 == 0)
    {
        /* the next norm's un-permute applies the scales as it sums
         * (cb_unpermute leaves it pending, cb_norm runs
         * moe_cuda_unpermute_rmsnorm_q): no rescaled fp32 copy in ye */
        b->unperm_yq = (const bf16 *) tmp;
        b->unperm_qh = qh;
        b->unperm_ws = wd->scale;
        b->unperm_ws_stride = cb_fp8_sstride(wd);
        return MOE_OK;
    }
    return moe_cuda_fp8_rescale_rows_bf16((const moe_bf16_t *) tmp, R,
                                          (int) D, qh, wd->scale,
                                          cb_fp8_sstride(wd), b->offs + e0,
                                          EL, b->ye + (size_t) R0 * D,
                                          (int) D, b->stream);
}


/*
 * One dense projection, any format: Y (T, N) fp32 (ldy) = X (T, K) . W^T.
 * bf16: cb_linear (W's rows: the part's N; a stacked group calls
 * cb_linear itself).  Packed: the quantized GEMV for T <= dense_gemv_t
 * (4-bit: up to ggemm_max_t); above, fp8 per channel on the fp8 tensor
 * cores (cb_fp8_gemm), else dequantize into the scratch and the bf16
 * GEMM.  The one place to swap
 * in new packed kernels for the dense layers.
 */
static int
cb_dense_proj(cuda_backend_t *b, const cb_qw_t *w, int T, const bf16 *X,
    int ldx, float *Y, int ldy)
{
    if (w->fmt == MOE_WF_BF16) {
        return cb_linear(b, T, w->N, w->K, X, ldx, (const bf16 *) w->w, Y,
                         ldy);
    }
    if (T <= b->tune.dense_gemv_t && ldx % 8 == 0) {
        return cb_qgemv(b, w, X, ldx, NULL, 1, NULL, 1, T, T, Y, ldy);
    }
    if (T <= b->tune.ggemm_max_t && ldx % 8 == 0
        && (w->fmt == MOE_WF_AWQ || w->fmt == MOE_WF_GPTQ))
    {
        /* 4-bit decode batches: the packed bytes read once or twice
         * rather than dequantized every step (AWQ batch 64: dense 5.3 ms
         * of the step instead of 6.8; H200 2026-12-02).  fp8 keeps the
         * cuBLASLt path here: the e4m3 grouped GEMM with one group took
         * 2.13 ms of the batch-64 step against 1.39 */
        return cb_qgemv(b, w, X, ldx, NULL, 1, NULL, 1, T, T, Y, ldy);
    }
    {
        int rc = cb_fp8_gemm(b, w, T, X, ldx, 0, Y, ldy);

        if (rc != MOE_EUNSUPPORTED) {
            return rc;
        }
    }
    MOE_TRY(cb_dequant(b, w));
    return moe_cuda_gemm(b->blas, T, w->N, w->K, (const moe_bf16_t *) X, ldx,
                         (const moe_bf16_t *) b->qscratch, w->K, Y, ldy, 0,
                         0.0f);
}


/*
 * The decode steps' e4m3 grouped GEMM (kernels/moe_ggemm.h) over xrows
 * token rows X (gathered by xrow / xdiv).  With the knob fp8_ggemm the
 * rows are first made f16 with per-row scales (moe_cuda_rows_f16) in the
 * gu scratch, which the two callers leave free (gate|up with SiLU writes
 * hbuf; the down projection reads hbuf), then moe_cuda_ggemm_fp8h; else,
 * or when the rows do not fit gu, the bf16-fragment kernel.
 */
static int
cb_fp8_ggemm(cuda_backend_t *b, const cb_qw_t *w, int N, const bf16 *X,
    int ldx, int xrows, const int32_t *xrow, int xdiv, const int32_t *offs,
    int E, int n, int silu, float *Y, bf16 *H, int ldy, cudaStream_t s)
{
    size_t hb = ((size_t) xrows * w->K * 2 + 255) / 256 * 256;

    if (b->tune.fp8_ggemm && xrows > 0
        && hb + (size_t) xrows * 4 <= b->gu_bytes)
    {
        uint16_t *xh = (uint16_t *) b->gu;
        float    *sinv = (float *) ((char *) b->gu + hb);

        MOE_TRY(moe_cuda_rows_f16((const moe_bf16_t *) X, ldx, xrows, w->K,
                                  xh, w->K, sinv, s));
        return moe_cuda_ggemm_fp8h(xh, w->K, sinv, xrow, xdiv,
                                   (const uint8_t *) w->w, w->scale, w->mode,
                                   N, w->K, offs, E, n, silu, Y,
                                   (moe_bf16_t *) H, ldy, 0, s);
    }
    return moe_cuda_ggemm_fp8((const moe_bf16_t *) X, ldx, xrow, xdiv,
                              (const uint8_t *) w->w, w->scale, w->mode, N,
                              w->K, offs, E, n, silu, Y, (moe_bf16_t *) H,
                              ldy, s);
}


/*
 * One expert projection (not fused), any format, over the rank's EL
 * experts: rows [offs[e], offs[e + 1]) of the step (offs on the device;
 * CB_PATH_BLAS reads b->h_counts, copied after the routing, with
 * b->hp.expert_first) take input row xrow[r] / xdiv of X (xrow NULL:
 * r), Y[r * ldy + j] fp32, j < N.  path: CB_PATH_GEMV (packed: the
 * quantized GEMV; bf16: moe_cuda_gemv with tile mr), CB_PATH_GGEMM and
 * CB_PATH_BLAS (packed: dequantize all EL experts into the scratch first).
 * A bf16 part must not be a row slice of a stacked group (its expert
 * stride is N K).  The one place to swap in new packed expert kernels.
 */
static int
cb_expert_proj(cuda_backend_t *b, const cb_qw_t *w, int path, const bf16 *X,
    int ldx, const int32_t *xrow, int xdiv, const int32_t *offs, int n,
    int mr, float *Y, int ldy)
{
    const bf16 *W = (const bf16 *) w->w;
    int         EL = w->count, e0 = b->hp.expert_first, e, r0, ne;

    if (path == CB_PATH_GEMV) {
        if (w->fmt != MOE_WF_BF16) {
            return cb_qgemv(b, w, X, ldx, xrow, xdiv, offs, EL, n, mr, Y,
                            ldy);
        }
        return moe_cuda_gemv((const moe_bf16_t *) X, ldx, xrow, xdiv,
                             (const moe_bf16_t *) W, w->N, w->K, offs, EL, n,
                             mr, 0, Y, NULL, ldy, &b->tune, b->stream);
    }
    if (path == CB_PATH_GGEMM
        && (w->fmt == MOE_WF_AWQ || w->fmt == MOE_WF_GPTQ))
    {
        /* the 4-bit GEMV takes any rows per expert (passes of up to 32)
         * and reads the packed bytes: far cheaper than dequantizing every
         * expert each step (first H200 run: AWQ batch 64 at 2 % of its
         * limit through the scratch) */
        return cb_qgemv(b, w, X, ldx, xrow, xdiv, offs, EL, n, mr, Y, ldy);
    }
    if (path == CB_PATH_BLAS && w->fmt == MOE_WF_FP8) {
        /* prefill: the fp8 tensor cores, rows gathered per expert */
        int rc = cb_fp8_gemm(b, w, n, X, ldx, 1, Y, ldy);

        if (rc != MOE_EUNSUPPORTED) {
            return rc;
        }
    }
    if (path == CB_PATH_GGEMM && w->fmt == MOE_WF_FP8
        && moe_cuda_fp8_supported(w->mode, w->N, w->K, ldx, 0))
    {
        /* the e4m3 grouped GEMM reads the packed bytes; the f16 rows
         * (cb_fp8_ggemm) only for the down projection: gu is free then */
        if (X == b->hbuf) {
            return cb_fp8_ggemm(b, w, w->N, X, ldx, n, xrow, xdiv, offs, EL,
                                n, 0, Y, NULL, ldy, b->stream);
        }
        return moe_cuda_ggemm_fp8((const moe_bf16_t *) X, ldx, xrow, xdiv,
                                  (const uint8_t *) w->w, w->scale, w->mode,
                                  w->N, w->K, offs, EL, n, 0, Y, NULL, ldy,
                                  b->stream);
    }
    if (w->view && w->count > 1) {
        /* a stacked group's experts: the scratch holds one at a time */
        if (path != CB_PATH_BLAS) {
            moe_cuda_set_error("cuda backend: a stacked group the "
                               "grouped kernels refuse");
            return MOE_EBACKEND;
        }
        for (e = e0; e < e0 + EL; e++) {
            ne = b->h_counts[e + 1] - b->h_counts[e];
            r0 = b->h_counts[e];
            if (ne > 0) {
                MOE_TRY(cb_dequant_expert(b, w, e - e0));
                MOE_TRY(moe_cuda_gemm(b->blas, ne, w->N, w->K,
                                      (const moe_bf16_t *) (X + (size_t) r0
                                                            * ldx), ldx,
                                      (const moe_bf16_t *) b->qscratch,
                                      w->K, Y + (size_t) r0 * ldy, ldy, 0,
                                      0.0f));
            }
        }
        return MOE_OK;
    }
    if (w->fmt != MOE_WF_BF16) {
        MOE_TRY(cb_dequant(b, w));
        W = b->qscratch;
    }
    if (path == CB_PATH_GGEMM) {
        return moe_cuda_ggemm((const moe_bf16_t *) X, ldx, xrow, xdiv,
                              (const moe_bf16_t *) W, w->N, w->K, offs, EL,
                              n, 0, Y, NULL, ldy, b->stream);
    }
    for (e = e0; e < e0 + EL; e++) {
        ne = b->h_counts[e + 1] - b->h_counts[e];
        r0 = b->h_counts[e];
        if (ne > 0) {
            MOE_TRY(moe_cuda_gemm(b->blas, ne, w->N, w->K,
                                  (const moe_bf16_t *) (X + (size_t) r0
                                                        * ldx), ldx,
                                  (const moe_bf16_t *) (W + (size_t) (e - e0)
                                                        * w->N * w->K),
                                  w->K, Y + (size_t) r0 * ldy, ldy, 0,
                                  0.0f));
        }
    }
    return MOE_OK;
}


/* Whether the MoE FFN of a T-token step takes the grouped GEMV. */
static int
cb_ffn_gemv(const cuda_backend_t *b, int T)
{
    return T <= b->tune.gemv_max_t
           && moe_cuda_gemv_supported(b->hp.dim, b->hp.dim)
           && moe_cuda_gemv_supported(b->hp.ffn_dim, b->hp.ffn_dim);
}


/*
 * Whether routed layer l's FFN of n rows takes the fused fp8 FFN on the
 * grouped e4m3 GEMM (cb_ffn's third branch): all experts on this rank, a
 * stacked fp8 gate|up group, the scratch and the shapes fit.  Its offsets
 * are read on the device: no host sync.  g: the gate|up group, *wd: the
 * down part.
 */
static int
cb_fp8g_layer(const cuda_backend_t *b, int l, int n, cb_qw_t *g,
    const cb_qw_t **wd)
{
    const cb_qw_t *wg = cb_part(b, l, MOE_QP_GATE);

    *wd = cb_part(b, l, MOE_QP_DOWN);
    if (b->El != b->hp.n_experts || !wg->stacked) {
        return 0;
    }
    cb_group(wg, g);
    return cb_fp8_ffn_fits(b, g, *wd, n) && cb_fp8_grouped_fits(b, g, *wd);
}


/* Whether every routed layer of a T-token step takes it (and there is
 * one). */
static int
cb_fp8g_layers(const cuda_backend_t *b, int T)
{
    const cb_qw_t *wd;
    cb_qw_t        g;
    int            any = 0;

    if (b->hp.n_experts <= 1) {
        return 0;
    }
    for (int l = 0; l < b->hp.n_layers; l++) {
        if (b->dense_slot[l] >= 0) {
            continue;           /* a dense layer: no routing, no sync */
        }
        if (!cb_fp8g_layer(b, l, T * b->K, &g, &wd)) {
            return 0;
        }
        any = 1;
    }
    return any;
}


/* Whether the running T-token step takes the grouped tensor-core GEMM
 * (above the GEMV): up to ggemm_max_t tokens, unless fp8_dgrouped hands
 * such steps to the fused fp8 FFN (every routed layer must take it:
 * b->step_fp8g). */
static int
cb_ffn_ggemm(const cuda_backend_t *b, int T)
{
    return !cb_ffn_gemv(b, T) && T <= b->tune.ggemm_max_t
           && moe_cuda_ggemm_supported(b->hp.ffn_dim, b->hp.dim, b->hp.dim)
           && moe_cuda_ggemm_supported(b->hp.dim, b->hp.ffn_dim,
                                       b->hp.ffn_dim)
           && !(b->tune.fp8_dgrouped && b->step_fp8g);
}


/* Whether the MoE FFN of the running T-token step runs without a host
 * sync: the GEMV, the grouped GEMM, else the fused fp8 FFN in every
 * routed layer. */
static int
cb_ffn_nosync(const cuda_backend_t *b, int T)
{
    return cb_ffn_gemv(b, T) || cb_ffn_ggemm(b, T) || b->step_fp8g;
}


/*
 * Whether a routed layer's weighted un-permute may run inside the next
 * norm's launch: nothing reads the sum in between (no rank sum, no shared
 * expert), the norm is RMSNorm, and the fused kernel takes the shapes.
 */
static int
cb_fuse_unperm(const cuda_backend_t *b)
{
    return b->tune.fuse_unpermute && b->reduce == NULL && b->nccl == NULL
           && b->hp.shared_ffn_dim <= 0 && !b->hp.norm_layer
           && b->hp.dim % 4 == 0 && b->hp.dim <= 32768 && b->K <= 64;
}


/* The model's norm (RMSNorm, or LayerNorm with bias when norm_layer),
 * fused with the residual add: moe_cuda_add_rmsnorm's contract.
 * With an un-permute pending (cb_fuse_unperm) and delta == b->tmp, the
 * delta is that un-permute's sum (moe_cuda_unpermute_rmsnorm). */
static int
cb_norm(cuda_backend_t *b, const float *delta, const int32_t *rows,
    int n_rows, const float *w, const float *bias, bf16 *out, float *out_f32)
{
    if (delta == b->tmp && b->unperm_sel != NULL && b->unperm_yq != NULL) {
        /* ... from the fp8 FFN's unscaled products (cb_fp8_ffn) */
        return moe_cuda_unpermute_rmsnorm_q(b->x,
                                            (const moe_bf16_t *) b->unperm_yq,
                                            b->unperm_qh, b->unperm_ws,
                                            b->unperm_ws_stride,
                                            b->unperm_sel, b->selw,
                                            b->slot_of, b->K, rows, n_rows,
                                            b->hp.dim, w, b->hp.norm_eps,
                                            (moe_bf16_t *) out, out_f32,
                                            b->stream);
    }
    if (delta == b->tmp && b->unperm_sel != NULL) {
        /* the routed layer's sum is not in tmp: cb_ffn left its
         * un-permute to this launch (cb_fuse_unperm) */
        return moe_cuda_unpermute_rmsnorm(b->x, b->ye, b->unperm_sel,
                                          b->selw, b->slot_of, b->K, rows,
                                          n_rows, b->hp.dim, w,
                                          b->hp.norm_eps, (moe_bf16_t *) out,
                                          out_f32, b->stream);
    }
    if (delta == b->tmp && b->dq_yq != NULL && b->dq_y == b->tmp) {
        /* tmp was left unscaled by cb_fp8_gemm (dq_allow; it checked
         * the shape this launch takes) */
        const bf16 *yq = b->dq_yq;

        b->dq_yq = NULL;
        return moe_cuda_add_rmsnorm_q(b->x, (const moe_bf16_t *) yq,
                                      b->dq_qs, b->dq_ws, rows, n_rows,
                                      b->hp.dim, w, b->hp.norm_eps,
                                      (moe_bf16_t *) out, out_f32,
                                      b->stream);
    }
    if (b->hp.norm_layer) {
        return moe_cuda_add_layernorm(b->x, delta, rows, n_rows, b->hp.dim,
                                      w, bias, b->hp.norm_eps,
                                      (moe_bf16_t *) out, out_f32,
                                      b->stream);
    }
    return moe_cuda_add_rmsnorm(b->x, delta, rows, n_rows, b->hp.dim, w,
                                b->hp.norm_eps, (moe_bf16_t *) out, out_f32,
                                b->stream);
}


/*
 * One dense MLP over the T rows of b->xb into out (T, dim) fp32, as
 * cpu_mlp: gated: down(act(gate x + bg) * (up x + bu)) + bd; ungated
 * (gated == 0, gate NULL): down(act(up x + bu)) + bd.  gate / up / down:
 * the parts (one matrix each, count 1); biases may be NULL.  A bf16
 * gate|up group runs stacked (plain SwiGLU keeps the fused GEMV (small
 * T) / cuBLAS path); packed parts run one by one (cb_dense_proj) into
 * their halves of b->gu.
 */
static int
cb_mlp(cuda_backend_t *b, int T, const cb_qw_t *gate, const cb_qw_t *up,
    const cb_qw_t *down, int gated, const float *bg, const float *bu,
    const float *bd, float *out)
{
    const moe_hparams_t *hp = &b->hp;
    int                  D = hp->dim, F = up->N, G = gated ? 2 * F : F;
    cudaStream_t         s = b->stream;
    const bf16          *wgu = (const bf16 *) (gated ? gate->w : up->w);

    if (up->fmt != MOE_WF_BF16 && gated && gate->stacked) {
        cb_qw_t g;

        /* gate|up stacked: one projection */
        cb_group(gate, &g);
        MOE_TRY(cb_dense_proj(b, &g, T, b->xb, D, b->gu, G));
        MOE_TRY(moe_cuda_act_mul(b->gu, G, bg, b->gu + F, G, bu, T, F,
                                 hp->act, (moe_bf16_t *) b->hbuf, F, s));
    } else if (up->fmt != MOE_WF_BF16) {
        if (gated) {
            MOE_TRY(cb_dense_proj(b, gate, T, b->xb, D, b->gu, G));
        }
        MOE_TRY(cb_dense_proj(b, up, T, b->xb, D, gated ? b->gu + F : b->gu,
                              G));
        MOE_TRY(moe_cuda_act_mul(gated ? b->gu : NULL, G, bg,
                                 gated ? b->gu + F : b->gu, G, bu, T, F,
                                 hp->act, (moe_bf16_t *) b->hbuf, F, s));
    } else if (gated && hp->act == MOE_ACT_SILU && bg == NULL && bu == NULL) {
        if (T <= b->tune.dense_gemv_t && T <= b->tune.gemv_max_t
            && moe_cuda_gemv_supported(D, D)
            && moe_cuda_gemv_supported(F, F))
        {
            MOE_TRY(moe_cuda_gemv((moe_bf16_t *) b->xb, D, NULL, 1,
                                  (const moe_bf16_t *) wgu, F, D, NULL, 1, T,
                                  T, 1, NULL, (moe_bf16_t *) b->hbuf, F,
                                  &b->tune, s));
        } else {
            MOE_TRY(moe_cuda_gemm(b->blas, T, 2 * F, D, (moe_bf16_t *) b->xb,
                                  D, (const moe_bf16_t *) wgu, D, b->gu,
                                  2 * F, 0, 0.0f));
            MOE_TRY(moe_cuda_silu_mul(b->gu, T, F, (moe_bf16_t *) b->hbuf,
                                      s));
        }
    } else {
        MOE_TRY(cb_linear(b, T, G, D, b->xb, D, wgu, b->gu, G));
        MOE_TRY(moe_cuda_act_mul(gated ? b->gu : NULL, G, bg,
                                 gated ? b->gu + F : b->gu, G, bu, T, F,
                                 hp->act, (moe_bf16_t *) b->hbuf, F, s));
    }
    MOE_TRY(cb_dense_proj(b, down, T, b->hbuf, F, out, D));
    if (bd != NULL) {
        MOE_TRY(moe_cuda_add_bias(out, D, T, D, bd, s));
    }
    return MOE_OK;
}


/* Qwen2-MoE shared expert of layer l after the routed sum in b->tmp:
 * tmp += sigmoid(ws_gate_inp . xf) * shared(xb); no-op without one. */
static int
cb_shared(cuda_backend_t *b, int l, int T)
{
    const moe_hparams_t *hp = &b->hp;
    size_t               D = (size_t) hp->dim;

    if (hp->shared_ffn_dim <= 0) {
        return MOE_OK;
    }
    /* ye is free once the routed rows are summed into tmp */
    MOE_TRY(cb_mlp(b, T, cb_part(b, l, MOE_QP_SGATE),
                   cb_part(b, l, MOE_QP_SUP), cb_part(b, l, MOE_QP_SDOWN), 1,
                   NULL, NULL, NULL, b->ye));
    MOE_TRY(moe_cuda_sigmoid_gate_add(b->tmp, b->ye, (int) D, b->xf,
                                      b->ws_gate_inp + (size_t) l * D, T,
                                      (int) D, b->stream));
    return cb_mark(b, MOE_CUDA_ST_EXPERT);
}


/*
 * The routed experts' gate|up into b->hbuf (bf16 hidden rows) and down
 * into b->ye, by path (CB_PATH_*; BLAS: inputs gathered into b->xe, but
 * cb_fp8_ffn reads xb):
 * a bf16 gate|up group keeps its fused launch (GEMV / grouped GEMM with
 * SiLU, or cuBLAS on the stacked rows); packed gate and up run apart into
 * b->gu's halves, then SiLU*up; down through cb_expert_proj.
 */
static int
cb_experts(cuda_backend_t *b, int l, int T, int path, int mr,
    const int32_t *loffs)
{
    const cb_qw_t *wg = cb_part(b, l, MOE_QP_GATE);
    const cb_qw_t *wu = cb_part(b, l, MOE_QP_UP);
    const cb_qw_t *wd = cb_part(b, l, MOE_QP_DOWN);
    int            D = b->hp.dim, F = b->hp.ffn_dim, K = b->K, EL = b->El;
    int            e0 = b->hp.expert_first, e, n, r0;
    cudaStream_t   s = b->stream;
    const bf16    *X = path == CB_PATH_BLAS ? b->xe : b->xb;
    const int32_t *xrow = path == CB_PATH_BLAS ? NULL : b->erow;
    int            xdiv = path == CB_PATH_BLAS ? 1 : K;

    if (path == CB_PATH_BLAS && wg->stacked) {
        cb_qw_t g;
        int     rc;

        /* prefill, fp8 gate|up stacked: cb_fp8_ffn quantizes the rows
         * from xb itself */
        cb_group(wg, &g);
        if ((rc = cb_fp8_ffn(b, &g, wd, T * K, b->h_counts[e0],
                             b->h_counts[e0 + EL] - b->h_counts[e0]))
            != MOE_EUNSUPPORTED)
        {
            return rc;
        }
    }
    if (path == CB_PATH_BLAS) {
        /* the per-expert GEMMs read their rows contiguous */
        MOE_TRY(moe_cuda_moe_gather((moe_bf16_t *) b->xb, D, b->erow, K,
                                    T * K, (moe_bf16_t *) b->xe, s));
    }
    if (wg->stacked) {
        cb_qw_t g;

        /* gate|up stacked: fp8 one launch with SiLU fused (prefill:
         * cb_fp8_ffn above, the down projection too); else one
         * projection into gu (GEMV, or a GEMM per expert) and SiLU*up */
        cb_group(wg, &g);
        if (path == CB_PATH_GEMV && g.fmt == MOE_WF_FP8
            && moe_cuda_fp8_supported(g.mode, F, D, D, 1))
        {
            MOE_TRY(moe_cuda_gemv_fp8((const moe_bf16_t *) b->xb, D, b->erow,
                                      K, (const uint8_t *) g.w, g.scale,
                                      g.mode, F, D, loffs, EL, T * K, mr, 1,
                                      NULL, (moe_bf16_t *) b->hbuf, F,
                                      &b->tune, s));
        } else if (path == CB_PATH_GGEMM && g.fmt == MOE_WF_FP8
                   && moe_cuda_fp8_supported(g.mode, F, D, D, 1))
        {
            MOE_TRY(cb_fp8_ggemm(b, &g, F, b->xb, D, T, b->erow, K, loffs,
                                 EL, T * K, 1, NULL, b->hbuf, F, s));
        } else if (g.tiled && b->tune.q4_layout == 2 && (2 * F) % 32 == 0
                   && (path == CB_PATH_GEMV || path == CB_PATH_GGEMM))
        {
            /* 4-bit tiled: gate|up with SiLU fused (a block's warps do
             * a gate tile and its up tile; kernels/q4_tiled.cu) */
            b->q4_tiled_calls++;
            MOE_TRY(moe_cuda_qgemv_q4t(cb_q4_kfmt(&g),
                                       (const moe_bf16_t *) X, D, xrow, xdiv,
                                       (const int32_t *) g.w, g.zeros,
                                       g.scales, g.G, g.zero_bias, 2 * F, D,
                                       loffs, EL, T * K, mr, 0, NULL, 0,
                                       (moe_bf16_t *) b->hbuf, s));
        } else if ((path == CB_PATH_GEMV || path == CB_PATH_GGEMM)
                   && cb_q4g_ok(b, &g, mr, 1) && g.N == 2 * F)
        {
            /* 4-bit by quantization group, SiLU fused (a warp holds a
             * tile's gate and up sums; kernels/q4_group.cu) */
            b->q4g_calls++;
            b->q4w_calls += mr > CB_Q4G_MAX_ROWS;
            MOE_TRY(moe_cuda_qgemv_q4g_rows((const moe_bf16_t *) X, D, xrow,
                                            xdiv, (const int32_t *) g.w,
                                            g.zeros, g.scales, g.G,
                                            g.zero_bias, 2 * F, D, loffs, EL,
                                            T * K, mr, NULL, 0,
                                            (moe_bf16_t *) b->hbuf, s));
        } else {
            /* 4-bit: one GEMV over the 2 F stacked columns, then SiLU*up
             * (the fused moe_cuda_qgemv_q4_silu has half the column
             * tiles, each twice the work: 150 us against 85 + 3 for
             * AWQ gate|up at batch 1, bench/dev/quant_gemv, H200) */
            MOE_TRY(cb_expert_proj(b, &g, path, X, D, xrow, xdiv, loffs,
                                   T * K, mr, b->gu, 2 * F));
            MOE_TRY(moe_cuda_silu_mul(b->gu, T * K, F,
                                      (moe_bf16_t *) b->hbuf, s));
        }
    } else if (wg->fmt != MOE_WF_BF16) {
        MOE_TRY(cb_expert_proj(b, wg, path, X, D, xrow, xdiv, loffs, T * K,
                               mr, b->gu, 2 * F));
        MOE_TRY(cb_expert_proj(b, wu, path, X, D, xrow, xdiv, loffs, T * K,
                               mr, b->gu + F, 2 * F));
        MOE_TRY(moe_cuda_silu_mul(b->gu, T * K, F, (moe_bf16_t *) b->hbuf,
                                  s));
    } else if (path == CB_PATH_GEMV) {
        /* gate|up of every expert, rows gathered from xb, SiLU*up fused */
        MOE_TRY(moe_cuda_gemv((moe_bf16_t *) b->xb, D, b->erow, K,
                              (const moe_bf16_t *) wg->w, F, D, loffs, EL,
                              T * K, mr, 1, NULL, (moe_bf16_t *) b->hbuf, F,
                              &b->tune, s));
    } else if (path == CB_PATH_GGEMM) {
        MOE_TRY(moe_cuda_ggemm((moe_bf16_t *) b->xb, D, b->erow, K,
                               (const moe_bf16_t *) wg->w, F, D, loffs, EL,
                               T * K, 1, NULL, (moe_bf16_t *) b->hbuf, F, s));
    } else {
        for (e = e0; e < e0 + EL; e++) {
            n = b->h_counts[e + 1] - b->h_counts[e];
            r0 = b->h_counts[e];
            if (n > 0) {
                MOE_TRY(moe_cuda_gemm(b->blas, n, 2 * F, D,
                                      (moe_bf16_t *) (b->xe + (size_t) r0
                                                      * D), D,
                                      (moe_bf16_t *) ((const bf16 *) wg->w
                                                      + (size_t) (e - e0)
                                                        * 2 * F * D),
                                      D, b->gu + (size_t) r0 * 2 * F, 2 * F,
                                      0, 0.0f));
            }
        }
        MOE_TRY(moe_cuda_silu_mul(b->gu, T * K, F, (moe_bf16_t *) b->hbuf,
                                  s));
    }
    return cb_expert_proj(b, wd, path, b->hbuf, F, NULL, 1, loffs, T * K, mr,
                          b->ye, D);
}


/* The routed rows' weighted sum into b->tmp, then the shared expert; or,
 * when the next norm may do it (cb_fuse_unperm), left pending there. */
static int
cb_unpermute(cuda_backend_t *b, const int32_t *sel, int l, int T)
{
    if (cb_fuse_unperm(b)) {
        b->unperm_sel = sel;
        return MOE_OK;
    }
    MOE_TRY(moe_cuda_moe_unpermute(b->ye, b->hp.dim, sel, b->selw,
                                   b->slot_of, T, b->K, b->tmp, b->stream));
    MOE_TRY(cb_mark(b, MOE_CUDA_ST_ROUTE));
    return cb_shared(b, l, T);
}


/* The row statistics (moe_cuda_backend_expert_rows) of one layer's
 * offsets h (E + 1, on the host) over n rows; 0 (nothing counted) when
 * they are not ascending from 0 to n. */
static int
cb_row_stats_add(cuda_backend_t *b, const int32_t *h, int n)
{
    int64_t *st = b->row_stats;
    int      E = b->hp.n_experts, e, lo = n, hi = 0;

    if (h[0] != 0 || h[E] != n) {
        return 0;
    }
    for (e = 0; e < E; e++) {
        int c = h[e + 1] - h[e];

        if (c < 0) {
            return 0;
        }
        lo = c < lo ? c : lo;
        hi = c > hi ? c : hi;
    }
    for (e = 0; e < E; e++) {
        int c = h[e + 1] - h[e];

        st[4 + (c / 64 < MOE_CUDA_ROW_STATS - 5 ? c / 64
                                                : MOE_CUDA_ROW_STATS - 5)]++;
    }
    st[0]++;
    st[1] += n;
    st[2] += hi;
    st[3] += lo;
    return 1;
}


/* The logged offsets (cb_row_log) into the row statistics, once their
 * copies are done (the event of the last one). */
static int
cb_row_fold(cuda_backend_t *b)
{
    int l, E = b->hp.n_experts, any = 0;

    for (l = 0; l < b->hp.n_layers; l++) {
        any |= b->offs_log_set[l];
    }
    if (!any) {
        return MOE_OK;
    }
    MOE_CUDA_CHECK(cudaEventSynchronize(b->offs_log_ev));
    for (l = 0; l < b->hp.n_layers; l++) {
        if (b->offs_log_set[l]) {
            const int32_t *h = b->h_offs_log + (size_t) l * (E + 1);

            (void) cb_row_stats_add(b, h, h[E]);
            b->offs_log_set[l] = 0;
        }
    }
    return MOE_OK;
}


/* Layer l's expert offsets copied to the host behind the step's work (no
 * sync), for the row statistics; a slot still pending from an earlier
 * step (long done: every step ends in a sync) is folded first. */
static int
cb_row_log(cuda_backend_t *b, int l)
{
    int E = b->hp.n_experts;

    if (b->offs_log_set[l]) {
        MOE_TRY(cb_row_fold(b));
    }
    MOE_CUDA_CHECK(cudaMemcpyAsync(b->h_offs_log + (size_t) l * (E + 1),
                                   b->offs, (size_t) (E + 1)
                                            * sizeof(int32_t),
                                   cudaMemcpyDeviceToHost, b->stream));
    MOE_CUDA_CHECK(cudaEventRecord(b->offs_log_ev, b->stream));
    b->offs_log_set[l] = 1;
    return MOE_OK;
}


/* Whether a T-token step's FFN norm and router run as one launch
 * (moe_cuda_norm_route1, tuning route_fuse1): one token, an RMSNorm whose
 * delta is the plain fp32 sum in tmp (cb_norm's last case: no un-permute
 * or unscaled fp8 product pending), and a shape and alignment the kernel
 * takes (D % 4 == 0 keeps every layer's rows at the bases' alignment). */
static int
cb_route1(const cuda_backend_t *b, int T)
{
    return T == 1 && b->tune.route_fuse1 > 0 && !b->hp.norm_layer
           && b->unperm_sel == NULL
           && !(b->dq_yq != NULL && b->dq_y == b->tmp)
           && moe_cuda_norm_route1_ok(b->hp.dim, b->hp.n_experts, b->K)
           && ((uintptr_t) b->x | (uintptr_t) b->tmp | (uintptr_t) b->xf
               | (uintptr_t) b->ffn_norm | (uintptr_t) b->router) % 16 == 0
           && (uintptr_t) b->xb % 8 == 0;
}


/* The FFN sublayer of layer l: its norm, then the dense MLP or the
 * router and the routed experts. */
static int
cb_ffn(cuda_backend_t *b, int l, int T)
{
    const moe_hparams_t *hp = &b->hp;
    int                  D = hp->dim, F = hp->ffn_dim, E = hp->n_experts;
    int                  K = b->K, path;
    cudaStream_t         s = b->stream;
    /* expert parallel: this rank computes experts [e0, e0 + EL) only;
     * their row groups are offs[e0 .. e0 + EL] of the routing over all E
     * experts, their weights stored from 0 */
    int                  EL = b->El, e0 = hp->expert_first;
    int32_t             *loffs = b->offs + e0;
    int32_t             *sel = b->sel + (size_t) l * b->cap * K;
    const float         *nw = b->ffn_norm + (size_t) l * D;
    int                  routed = b->dense_slot[l] < 0 && E > 1;
    /* decided before cb_norm (which consumes a pending fp8 product) */
    int                  r1 = routed && cb_route1(b, T);

    if (r1) {
        /* one token: the norm, router, top-k and permutation in one
         * launch, what the three below write */
        MOE_TRY(moe_cuda_norm_route1(b->x, b->tmp, D, nw, hp->norm_eps,
                                     (moe_bf16_t *) b->xb, b->xf,
                                     b->router + (size_t) l * E * D, E, K,
                                     !hp->router_no_renorm, b->rlogits, sel,
                                     b->selw, b->margin + (size_t) l * b->cap,
                                     b->offs, b->erow, b->slot_of,
                                     b->d_ecounts + (size_t) l * E,
                                     b->tune.route_fuse1 == 2, s));
    } else {
        MOE_TRY(cb_norm(b, b->tmp, NULL, T, nw,
                        hp->norm_layer ? b->ffn_norm_b + (size_t) l * D
                                       : NULL,
                        b->xb, E > 1 || hp->shared_ffn_dim > 0 ? b->xf
                                                               : NULL));
    }
    MOE_TRY(cb_mark(b, MOE_CUDA_ST_OTHER));
    if (routed && !r1) {
        /* router, top-k and the permutation by expert (two launches up
         * to 32 tokens, three above) */
        MOE_TRY(moe_cuda_route_permute(b->xf, T, D,
                                       b->router + (size_t) l * E * D, E, K,
                                       !hp->router_no_renorm, b->rlogits, sel,
                                       b->selw,
                                       b->margin + (size_t) l * b->cap,
                                       b->offs, b->erow, b->slot_of,
                                       b->d_ecounts + (size_t) l * E, s));
    }

    if (b->dense_slot[l] >= 0) {
        /* a dense layer of an MoE model (mlp_only_layers) */
        MOE_TRY(cb_mlp(b, T, cb_part(b, l, MOE_QP_DGATE),
                       cb_part(b, l, MOE_QP_DUP), cb_part(b, l, MOE_QP_DDOWN),
                       1, NULL, NULL, NULL, b->tmp));
        return cb_mark(b, MOE_CUDA_ST_EXPERT);
    }
    if (E == 1) {
        MOE_TRY(cb_mlp(b, T, hp->ffn_ungated ? NULL
                                             : cb_part(b, l, MOE_QP_GATE),
                       cb_part(b, l, MOE_QP_UP), cb_part(b, l, MOE_QP_DOWN),
                       !hp->ffn_ungated,
                       b->b_gu != NULL && !hp->ffn_ungated
                       ? b->b_gu + (size_t) l * 2 * F : NULL,
                       b->b_gu != NULL ? b->b_gu + (size_t) l * 2 * F + F
                                       : NULL,
                       b->b_down != NULL ? b->b_down + (size_t) l * D : NULL,
                       b->tmp));
        MOE_TRY(cb_mark(b, MOE_CUDA_ST_EXPERT));
        return cb_shared(b, l, T);
    }

    if (EL < E) {
        /* rows of other ranks' experts stay 0: the weighted un-permute
         * then adds only this rank's experts (the ranks' sum is whole) */
        MOE_CUDA_CHECK(cudaMemsetAsync(b->ye, 0, (size_t) T * K * D
                                       * sizeof(float), s));
    }
    if (cb_ffn_gemv(b, T) || cb_ffn_ggemm(b, T)) {
        /* GEMV: tile for twice the mean rows per expert (a fuller expert
         * takes another pass over its weights; correct for any count);
         * grouped GEMM: every expert in one launch per matrix.  Offsets
         * read on the device: no host sync, so the step can be a graph */
        int avg = (T * K + E - 1) / E, mr = 2 * avg < T ? 2 * avg : T;

        path = cb_ffn_gemv(b, T) ? CB_PATH_GEMV : CB_PATH_GGEMM;
        MOE_TRY(cb_mark(b, MOE_CUDA_ST_ROUTE));
        if (b->prof) {
            MOE_TRY(cb_row_log(b, l));  /* rows per expert, profiling */
        }
        MOE_TRY(cb_experts(b, l, T, path, mr, loffs));
        MOE_TRY(cb_mark(b, MOE_CUDA_ST_EXPERT));
        return cb_unpermute(b, sel, l, T);
    }
    {
        const cb_qw_t *wd;
        cb_qw_t        g;

        if (cb_fp8g_layer(b, l, T * K, &g, &wd)) {
            /* the fused fp8 FFN on the grouped GEMM: every row is this
             * rank's, the offsets are read on the device, so no host
             * sync (while profiling, the offsets go to the row
             * statistics asynchronously: the copy between two kernels
             * costs an unprofiled step a gap per layer) */
            MOE_TRY(cb_mark(b, MOE_CUDA_ST_ROUTE));
            if (b->prof) {
                MOE_TRY(cb_row_log(b, l));
            }
            MOE_TRY(cb_fp8_ffn(b, &g, wd, T * K, 0, T * K));
            MOE_TRY(cb_mark(b, MOE_CUDA_ST_EXPERT));
            return cb_unpermute(b, sel, l, T);
        }
    }
    MOE_CUDA_CHECK(cudaMemcpyAsync(b->h_counts, b->offs,
                                   (size_t) (E + 1) * sizeof(int32_t),
                                   cudaMemcpyDeviceToHost, s));
    MOE_TRY(cb_mark(b, MOE_CUDA_ST_ROUTE));
    MOE_CUDA_CHECK(cudaStreamSynchronize(s));

    /* h_counts holds the offsets: expert e owns rows [h[e], h[e + 1]) */
    if (!cb_row_stats_add(b, b->h_counts, T * K)) {
        moe_cuda_set_error("expert offsets corrupt (layer %d)", l);
        return MOE_EBACKEND;
    }
    MOE_TRY(cb_experts(b, l, T, CB_PATH_BLAS, T, loffs));
    MOE_TRY(cb_mark(b, MOE_CUDA_ST_EXPERT));
    return cb_unpermute(b, sel, l, T);
}


/* Tensor parallel: the (T, dim) partial sums in b->tmp added over the
 * ranks (the rank threads meet in b->reduce; this rank's queued work
 * first completes). */
static int
cb_reduce(cuda_backend_t *b, int T)
{
    if (b->reduce == NULL && b->nccl == NULL) {
        return MOE_OK;
    }
    /* the work before belongs to its stage, the collective to COMM */
    MOE_TRY(cb_mark(b, MOE_CUDA_ST_DENSE));
#ifdef MOE_HAVE_NCCL
    if (b->nccl != NULL) {
        /* on the rank's compute stream: ordered after the partial sum
         * and before its readers, and captured with a graph */
        MOE_NCCL_CHECK(ncclAllReduce(b->tmp, b->tmp, (size_t) T * b->hp.dim,
                                     ncclFloat, ncclSum,
                                     (ncclComm_t) b->nccl, b->stream));
        return cb_mark(b, MOE_CUDA_ST_COMM);
    }
#endif
    MOE_CUDA_CHECK(cudaStreamSynchronize(b->stream));
    b->reduce(b->reduce_ctx, b->tmp, (size_t) T * b->hp.dim);
    return cb_mark(b, MOE_CUDA_ST_COMM);
}


/*
 * The device work of a step after the staging copy: embedding, the layers,
 * and (n_out <= CB_LOGIT_ROWS only, graph) the final norm, lm_head and
 * greedy argmax of the n_out rows into b->logits and b->d_tokout.
 * Host-independent given (T, n_out).
 */
static int
cb_body(cuda_backend_t *b, int T, int n_out)
{
    const moe_hparams_t *hp = &b->hp;
    int                  D = hp->dim, hd = hp->head_dim, L = hp->n_layers;
    int                  QKV = b->Q + 2 * b->KVD;
    size_t               N = (size_t) b->cap;
    int32_t             *d_tok = b->d_stage, *d_pos = d_tok + N;
    int32_t             *d_slot = d_pos + N, *d_seq = d_slot + N;
    int32_t             *d_rows = d_seq + N, *d_btoff = d_rows + N;
    int32_t             *d_nvalid = d_btoff + N, *d_rbase = d_nvalid + N;
    int32_t             *d_bt = d_rbase + N;
    size_t               kv_layer = (size_t) b->n_blocks * 2
                                    * b->block_size * b->KVD;
    cudaStream_t         s = b->stream;
    int                  l, rc;

    b->unperm_sel = NULL;
    b->unperm_yq = NULL;
    b->dq_yq = NULL;
    MOE_TRY(moe_cuda_embed(d_tok, T, (moe_bf16_t *) b->embed, D, b->x, s));
    if (hp->learned_pos) {
        MOE_TRY(moe_cuda_add_pos(b->x, d_pos, T, D, b->pos_embed, s));
    }
    MOE_TRY(cb_mark(b, MOE_CUDA_ST_OTHER));

    for (l = 0; l < L; l++) {
        char *kvl = (char *) b->kv
                    + (size_t) l * kv_layer * (b->kv_fp8 ? 1 : sizeof(bf16));
        moe_cuda_att_kv_t kvo = { b->kv_fp8, b->kv_ks[l], b->kv_vs[l],
                                  b->long_ctx ? b->tune.att_long_ctx : 0,
                                  b->att_tc_whole };

        MOE_TRY(cb_norm(b, l == 0 ? NULL : b->tmp, NULL, T,
                        b->attn_norm + (size_t) l * D,
                        hp->norm_layer ? b->attn_norm_b + (size_t) l * D
                                       : NULL, b->xb, NULL));
        b->unperm_sel = NULL;           /* consumed, if it was pending */
        b->unperm_yq = NULL;
        MOE_TRY(cb_mark(b, MOE_CUDA_ST_OTHER));
        if (cb_part(b, l, MOE_QP_Q)->fmt == MOE_WF_BF16) {
            /* the stacked q|k|v rows in one GEMM */
            MOE_TRY(cb_linear(b, T, QKV, D, b->xb, D,
                              (const bf16 *) cb_part(b, l, MOE_QP_Q)->w,
                              b->qkv, QKV));
        } else if (cb_part(b, l, MOE_QP_Q)->stacked) {
            cb_qw_t g;

            /* q|k|v stacked: one projection; with fp8 tensor cores
             * left unscaled for the rope to scale as it reads */
            cb_group(cb_part(b, l, MOE_QP_Q), &g);
            b->dq_allow = !hp->qkv_bias && !hp->qk_norm && hd % 2 == 0
                          && hd <= 2048 ? b->qkv : NULL;
            rc = cb_dense_proj(b, &g, T, b->xb, D, b->qkv, QKV);
            b->dq_allow = NULL;
            MOE_TRY(rc);
        } else {
            MOE_TRY(cb_dense_proj(b, cb_part(b, l, MOE_QP_Q), T, b->xb, D,
                                  b->qkv, QKV));
            MOE_TRY(cb_dense_proj(b, cb_part(b, l, MOE_QP_K), T, b->xb, D,
                                  b->qkv + b->Q, QKV));
            MOE_TRY(cb_dense_proj(b, cb_part(b, l, MOE_QP_V), T, b->xb, D,
                                  b->qkv + b->Q + b->KVD, QKV));
        }
        if (hp->qkv_bias) {
            MOE_TRY(moe_cuda_add_bias(b->qkv, QKV, T, QKV,
                                      b->bqkv + (size_t) l * QKV, s));
        }
        MOE_TRY(cb_mark(b, MOE_CUDA_ST_DENSE));
        if (hp->qk_norm) {
            /* Qwen3: RMSNorm over each q and k head, before RoPE */
            MOE_TRY(moe_cuda_head_rmsnorm(b->qkv, QKV, T, hp->n_heads, hd,
                                          b->q_norm + (size_t) l * hd,
                                          hp->norm_eps, s));
            MOE_TRY(moe_cuda_head_rmsnorm(b->qkv + b->Q, QKV, T,
                                          hp->n_kv_heads, hd,
                                          b->k_norm + (size_t) l * hd,
                                          hp->norm_eps, s));
        }
        if (b->dq_yq != NULL && b->dq_y == b->qkv) {
            moe_cuda_rope_src_t src = { (const moe_bf16_t *) b->dq_yq,
                                        b->dq_qs, b->dq_ws };

            b->dq_yq = NULL;
            MOE_TRY(moe_cuda_rope_kv_q(b->qkv, QKV, &src, T, hp->n_heads,
                                       hp->n_kv_heads, hd, d_pos, d_slot,
                                       b->d_rope_inv,
                                       hp->rope_type == MOE_ROPE_DYNAMIC
                                       ? (const float *) d_rbase : NULL,
                                       b->rope_att, kvl, b->kv_fp8,
                                       b->block_size, b->kv_ks[l],
                                       b->kv_vs[l],
                                       s));
        } else if (b->kv_fp8) {
            MOE_TRY(moe_cuda_rope_kv_fp8(b->qkv, QKV, T, hp->n_heads,
                                         hp->n_kv_heads, hd, d_pos, d_slot,
                                         b->d_rope_inv,
                                         hp->rope_type == MOE_ROPE_DYNAMIC
                                         ? (const float *) d_rbase : NULL,
                                         b->rope_att, (uint8_t *) kvl,
                                         b->block_size, b->kv_ks[l],
                                         b->kv_vs[l],
                                         s));
        } else {
            MOE_TRY(moe_cuda_rope_kv(b->qkv, QKV, T, hp->n_heads,
                                     hp->n_kv_heads, hd, d_pos, d_slot,
                                     b->d_rope_inv,
                                     hp->rope_type == MOE_ROPE_DYNAMIC
                                     ? (const float *) d_rbase : NULL,
                                     b->rope_att, (moe_bf16_t *) kvl,
                                     b->block_size, s));
        }
        MOE_TRY(moe_cuda_attention_ex(b->qkv, QKV, T, d_pos, d_seq, d_bt,
                                      d_btoff, kvl, b->block_size,
                                      hp->n_heads, hp->n_kv_heads, hd,
                                      hp->sliding_window,
                                      (moe_bf16_t *) b->att, b->att_part,
                                      &kvo, &b->tune, s));
        MOE_TRY(cb_mark(b, MOE_CUDA_ST_ATTENTION));
        /* nothing but the FFN's norm reads tmp before it is scaled */
        b->dq_allow = !hp->o_bias && b->reduce == NULL && b->nccl == NULL
                      && !hp->norm_layer ? b->tmp : NULL;
        rc = cb_dense_proj(b, cb_part(b, l, MOE_QP_O), T, b->att, b->Q,
                           b->tmp, D);
        b->dq_allow = NULL;
        MOE_TRY(rc);
        if (hp->o_bias) {
            MOE_TRY(moe_cuda_add_bias(b->tmp, D, T, D,
                                      b->bo + (size_t) l * D, s));
        }
        MOE_TRY(cb_reduce(b, T));
        MOE_TRY(cb_mark(b, MOE_CUDA_ST_DENSE));
        MOE_TRY(cb_ffn(b, l, T));       /* its norm first */
        MOE_TRY(cb_reduce(b, T));
    }
    if (n_out > 0 && n_out <= CB_LOGIT_ROWS) {
        MOE_TRY(cb_norm(b, b->tmp, d_rows, n_out, b->final_norm,
                        b->final_norm_b, b->xlast, NULL));
        MOE_TRY(cb_mark(b, MOE_CUDA_ST_OTHER));
        MOE_TRY(cb_linear(b, n_out, hp->vocab_size, D, b->xlast, D,
                          b->lm_head, b->logits, hp->vocab_size));
        MOE_TRY(cb_mark(b, MOE_CUDA_ST_DENSE));
        /* a few microseconds: always, so the graph key stays (T, n_out) */
        MOE_TRY(moe_cuda_argmax_rows(b->logits, hp->vocab_size, n_out,
                                     hp->vocab_size, d_nvalid, b->d_tokout,
                                     s));
        MOE_TRY(cb_mark(b, MOE_CUDA_ST_OTHER));
    }
    return MOE_OK;
}


/* Launch the step's body as a graph (captured on first use); CB_NOGRAPH
 * when graphs cannot be used (the caller runs it eagerly). */
static int
cb_body_graph(cuda_backend_t *b, int T, int n_out)
{
    cudaGraph_t     g = NULL;
    cudaGraphExec_t x = NULL;
    cudaError_t     e1, e2;
    int             i, rc;

    for (i = 0; i < b->n_graphs; i++) {
        if (b->graphs[i].T == T && b->graphs[i].n_out == n_out
            && b->graphs[i].long_ctx == b->long_ctx)
        {
            MOE_CUDA_CHECK(cudaGraphLaunch(b->graphs[i].exec, b->stream));
            return MOE_OK;
        }
    }
    if (b->n_graphs >= CB_MAX_GRAPHS) {
        return CB_NOGRAPH;
    }
    MOE_CUDA_CHECK(cudaStreamBeginCapture(b->stream,
                                          cudaStreamCaptureModeThreadLocal));
    rc = cb_body(b, T, n_out);
    e1 = cudaStreamEndCapture(b->stream, &g);
    e2 = (rc == MOE_OK && e1 == cudaSuccess)
         ? cudaGraphInstantiate(&x, g, 0) : cudaErrorUnknown;
    if (g != NULL) {
        (void) cudaGraphDestroy(g);
    }
    if (rc != MOE_OK || e1 != cudaSuccess || e2 != cudaSuccess) {
        (void) cudaGetLastError();
        moe_log(MOE_LOG_WARN, "cuda backend: graph capture failed (T %d: "
                "%s / %s / %s): running without graphs", T,
                rc != MOE_OK ? moe_cuda_last_error() : "ok",
                cudaGetErrorString(e1), cudaGetErrorString(e2));
        b->use_graphs = 0;
        return CB_NOGRAPH;
    }
    b->graphs[b->n_graphs].T = T;
    b->graphs[b->n_graphs].n_out = n_out;
    b->graphs[b->n_graphs].long_ctx = b->long_ctx;
    b->graphs[b->n_graphs].exec = x;
    b->n_graphs++;
    MOE_CUDA_CHECK(cudaGraphLaunch(x, b->stream));
    return MOE_OK;
}


/* Room for n penalty-list entries (pinned + device); only between steps
 * (nothing queued uses the buffers then). */
static int
cb_pen_reserve(cuda_backend_t *b, size_t n)
{
    size_t cap = b->pen_cap ? b->pen_cap : 4096;
    size_t bytes;

    if (n <= b->pen_cap) {
        return MOE_OK;
    }
    while (cap < n) {
        cap *= 2;
    }
    bytes = cap * (2 * sizeof(int32_t) + 1);
    (void) cudaFreeHost(b->h_pen);
    (void) cudaFree(b->d_pen);
    b->h_pen = NULL;
    b->d_pen = NULL;
    b->pen_cap = 0;
    MOE_CUDA_CHECK(cudaMallocHost(&b->h_pen, bytes));
    MOE_CUDA_CHECK(cudaMalloc(&b->d_pen, bytes));
    b->pen_cap = cap;
    return MOE_OK;
}


/*
 * logit_bias for rows c0 .. c0 + nc (logits in b->logits): when any
 * token_out row has a list, upload the rows' offsets, counts, ids and
 * biases (one copy of the used ints, one of the used floats), add them on
 * the device and redo the greedy argmax; queued before cb_mask (which
 * only sets ids to -inf, so either order gives the same logits) and
 * cb_sample's penalties, as moe_sample_u() orders them.  No logits leave
 * the device.
 */
static int
cb_bias(cuda_backend_t *b, const moe_seq_batch_t *seqs, int c0, int nc,
    const int32_t *d_nvalid)
{
    size_t    R = CB_LOGIT_ROWS, o = 0;
    int32_t  *off = b->h_bias, *cnt = off + R, *ids = cnt + R;
    float    *bias = (float *) (ids + CB_BIAS_N);
    int       i, any = 0, V = b->hp.vocab_size;

    for (i = 0; i < nc; i++) {
        const moe_seq_batch_t *sq = &seqs[b->out_seq[c0 + i]];
        int                    k = sq->token_out != NULL ? sq->n_bias : 0;

        /* moe_batch_check bounded k: the row's list fits */
        off[i] = (int32_t) o;
        cnt[i] = k > 0 ? k : 0;
        if (k > 0) {
            memcpy(ids + o, sq->bias_ids, sizeof(int32_t) * (size_t) k);
            memcpy(bias + o, sq->bias, sizeof(float) * (size_t) k);
            o += (size_t) k;
            any = 1;
        }
    }
    if (!any) {
        return MOE_OK;
    }
    /* offsets, counts and the used ids are contiguous; then the floats */
    MOE_CUDA_CHECK(cudaMemcpyAsync(b->d_bias, b->h_bias,
                                   (2 * R + o) * sizeof(int32_t),
                                   cudaMemcpyHostToDevice, b->stream));
    MOE_CUDA_CHECK(cudaMemcpyAsync(b->d_bias + 2 * R + CB_BIAS_N,
                                   bias, o * sizeof(float),
                                   cudaMemcpyHostToDevice, b->stream));
    MOE_TRY(moe_cuda_logit_bias_rows(b->logits, V, nc, V, b->d_bias,
                                     b->d_bias + R, b->d_bias + 2 * R,
                                     (const float *) (b->d_bias + 2 * R
                                                      + CB_BIAS_N),
                                     b->stream));
    return moe_cuda_argmax_rows(b->logits, V, nc, V, d_nvalid, b->d_tokout,
                                b->stream);
}


/*
 * Guided decoding for rows c0 .. c0 + nc (logits in b->logits): when any
 * row has a mask, upload the rows' bitmasks (all ones for the others),
 * set the masked logits to -inf on the device and redo the greedy argmax
 * (cb_sample then draws from the masked logits; the logits copied to the
 * host for host sampling are masked too).  No logits leave the device.
 */
static int
cb_mask(cuda_backend_t *b, const moe_seq_batch_t *seqs, int c0, int nc,
    const int32_t *d_nvalid)
{
    size_t  W = b->mask_words;
    int     i, any = 0, V = b->hp.vocab_size;

    for (i = 0; i < nc; i++) {
        if (seqs[b->out_seq[c0 + i]].mask != NULL) {
            any = 1;
        }
    }
    if (!any) {
        return MOE_OK;
    }
    for (i = 0; i < nc; i++) {
        const moe_seq_batch_t *sq = &seqs[b->out_seq[c0 + i]];

        if (sq->mask != NULL) {
            memcpy(b->h_mask + (size_t) i * W, sq->mask,
                   W * sizeof(uint32_t));
        } else {
            memset(b->h_mask + (size_t) i * W, 0xff, W * sizeof(uint32_t));
        }
    }
    MOE_CUDA_CHECK(cudaMemcpyAsync(b->d_mask, b->h_mask,
                                   (size_t) nc * W * sizeof(uint32_t),
                                   cudaMemcpyHostToDevice, b->stream));
    MOE_TRY(moe_cuda_mask_rows(b->logits, V, nc, V, b->d_mask, (int64_t) W,
                               b->stream));
    return moe_cuda_argmax_rows(b->logits, V, nc, V, d_nvalid, b->d_tokout,
                                b->stream);
}


/*
 * Rows c0 .. c0 + nc of the step's outputs (logits in b->logits): when
 * any asks for a drawn token (sample), upload every row's parameters
 * (greedy rows: temperature 0, no penalty: the argmax again) and penalty
 * lists and overwrite d_tokout with moe_cuda_sample_rows.  Queued on the
 * stream before the ids' copy back.
 */
static int
cb_sample(cuda_backend_t *b, const moe_seq_batch_t *seqs, int c0, int nc)
{
    size_t  npen = 0, o = 0;
    int     i, any = 0, V = b->hp.vocab_size;

    for (i = 0; i < nc; i++) {
        const moe_seq_batch_t *sq = &seqs[b->out_seq[c0 + i]];

        if (sq->token_out != NULL && sq->sample != NULL) {
            any = 1;
            npen += (size_t) (sq->n_pen > 0 ? sq->n_pen : 0);
        }
    }
    if (!any) {
        return MOE_OK;
    }
    if (npen > 0) {
        MOE_TRY(cb_pen_reserve(b, npen));
    }
    for (i = 0; i < nc; i++) {
        const moe_seq_batch_t   *sq = &seqs[b->out_seq[c0 + i]];
        moe_cuda_sample_param_t *p = &b->h_sp[i];
        const moe_sampling_t    *sp = sq->token_out != NULL ? sq->sample
                                                            : NULL;

        memset(p, 0, sizeof(*p));
        p->top_p = 1.0f;
        p->repetition_penalty = 1.0f;
        p->n_valid = sq->n_valid;
        if (sp == NULL) {
            continue;                   /* greedy: temperature 0 */
        }
        p->temperature = sp->temperature;
        p->top_p = sp->top_p;
        p->min_p = sp->min_p;
        p->top_k = sp->top_k;
        p->repetition_penalty = sp->repetition_penalty;
        p->frequency_penalty = sp->frequency_penalty;
        p->presence_penalty = sp->presence_penalty;
        p->u = sq->u;
        p->pen_off = (int32_t) o;
        p->pen_n = sq->n_pen > 0 ? sq->n_pen : 0;
        if (p->pen_n > 0) {
            memcpy(b->h_pen + o, sq->pen_tok, sizeof(int32_t) * p->pen_n);
            memcpy(b->h_pen + b->pen_cap + o, sq->pen_cnt,
                   sizeof(int32_t) * p->pen_n);
            memcpy((uint8_t *) (b->h_pen + 2 * b->pen_cap) + o, sq->pen_seen,
                   (size_t) p->pen_n);
            o += (size_t) p->pen_n;
        }
    }
    MOE_CUDA_CHECK(cudaMemcpyAsync(b->d_sp, b->h_sp, sizeof(*b->h_sp)
                                   * (size_t) nc, cudaMemcpyHostToDevice,
                                   b->stream));
    for (i = 0; o > 0 && i < 3; i++) {
        /* ids, counts, seen bytes: the used part of each region */
        size_t off = (size_t) i * b->pen_cap * sizeof(int32_t);

        MOE_CUDA_CHECK(cudaMemcpyAsync((char *) b->d_pen + off,
                                       (char *) b->h_pen + off,
                                       o * (i < 2 ? sizeof(int32_t) : 1),
                                       cudaMemcpyHostToDevice, b->stream));
    }
    return moe_cuda_sample_rows(b->logits, V, nc, V, b->d_sp,
                                o > 0 ? b->d_pen : NULL,
                                o > 0 ? b->d_pen + b->pen_cap : NULL,
                                o > 0 ? (const uint8_t *) (b->d_pen
                                                           + 2 * b->pen_cap)
                                      : NULL,
                                b->d_tokout, b->stream);
}


/*
 * Rows c0 .. c0 + nc that ask for logprobs (lp_out): moe_cuda_logprobs_rows
 * over b->logits as cb_sample left them (penalties applied in place; the
 * row's temperature, 1 when greedy) at the ids in d_tokout, and the
 * results' copy back (*any = 1), queued before the stream's sync.
 */
static int
cb_logprobs(cuda_backend_t *b, const moe_seq_batch_t *seqs, int c0, int nc,
    int *any)
{
    int    i, V = b->hp.vocab_size;
    float  t;

    *any = 0;
    for (i = 0; i < nc; i++) {
        const moe_seq_batch_t     *sq = &seqs[b->out_seq[c0 + i]];
        moe_cuda_logprobs_param_t *p = &b->h_lpp[i];

        memset(p, 0, sizeof(*p));
        if (sq->token_out == NULL || sq->lp_out == NULL) {
            continue;
        }
        t = sq->sample != NULL ? sq->sample->temperature : 0.0f;
        p->enabled = 1;
        p->k = sq->lp_k;
        p->n_valid = sq->n_valid;
        p->inv_temperature = t < MOE_K_GREEDY_TEMPERATURE ? 1.0f : 1.0f / t;
        *any = 1;
    }
    if (!*any) {
        return MOE_OK;
    }
    MOE_CUDA_CHECK(cudaMemcpyAsync(b->d_lpp, b->h_lpp, sizeof(*b->h_lpp)
                                   * (size_t) nc, cudaMemcpyHostToDevice,
                                   b->stream));
    MOE_TRY(moe_cuda_logprobs_rows(b->logits, V, nc, V, b->d_lpp,
                                   b->d_tokout, CB_LP_VAL(b->d_lpo),
                                   CB_LP_ID(b->d_lpo), CB_LP_TOP(b->d_lpo),
                                   b->stream));
    MOE_CUDA_CHECK(cudaMemcpyAsync(b->h_lpo, b->d_lpo,
                                   CB_LP_FLOATS * sizeof(float),
                                   cudaMemcpyDeviceToHost, b->stream));
    return MOE_OK;
}


/* row i's results into its lp_out / lp_top (after the stream's sync) */
static void
cb_logprobs_take(cuda_backend_t *b, const moe_seq_batch_t *sq, int i)
{
    int            j, k = sq->lp_k;
    const int32_t *id = CB_LP_ID(b->h_lpo) + (size_t) i * CB_LP_K;
    const float   *lp = CB_LP_TOP(b->h_lpo) + (size_t) i * CB_LP_K;

    *sq->lp_out = CB_LP_VAL(b->h_lpo)[i];
    for (j = 0; j < k && j < CB_LP_K; j++) {
        sq->lp_top[j].id = id[j];
        sq->lp_top[j].logprob = lp[j];
    }
}


/* The step after validation and staging; T tokens, n_out logits rows. */
static int
cb_run(cuda_backend_t *b, const moe_seq_batch_t *seqs, int n, int T,
    int n_out, size_t n_stage)
{
    const moe_hparams_t *hp = &b->hp;
    int                  D = hp->dim;
    size_t               N = (size_t) b->cap;
    int32_t             *d_rows = b->d_stage + 4 * N;
    int32_t             *d_nvalid = b->d_stage + 6 * N;
    cudaStream_t         s = b->stream;
    int                  c0, i, j, rc = CB_NOGRAPH, any_lp;
    int                  one = n_out <= CB_LOGIT_ROWS;

    MOE_CUDA_CHECK(cudaSetDevice(b->device));
    b->n_ev = 0;
    b->step_fp8g = !cb_ffn_gemv(b, T) && cb_fp8g_layers(b, T);
    MOE_TRY(cb_mark(b, MOE_CUDA_ST_OTHER));
    MOE_CUDA_CHECK(cudaMemcpyAsync(b->d_stage, b->h_stage,
                                   n_stage * sizeof(int32_t),
                                   cudaMemcpyHostToDevice, s));
    /* NCCL's all-reduce is captured with the step; the host-side sum of
     * the emulated placement is not capturable */
    if (b->use_graphs && !b->prof && (b->reduce == NULL || b->nccl != NULL)
        && T <= CB_GRAPH_MAX_T && one
        && (b->hp.n_experts == 1 || cb_ffn_nosync(b, T)))
    {
        /* the cuBLAS expert path syncs with the host: never in a graph */
        rc = cb_body_graph(b, T, n_out);
        if (rc != MOE_OK && rc != CB_NOGRAPH) {
            return rc;
        }
    }
    if (rc == CB_NOGRAPH) {
        MOE_TRY(cb_body(b, T, one ? n_out : 0));
    }
    if (hp->n_experts == 1) {
        b->dense_tokens += T;
    }
    b->last_T = T;

    for (c0 = 0; c0 < n_out; c0 += CB_LOGIT_ROWS) {
        int nc = n_out - c0 < CB_LOGIT_ROWS ? n_out - c0 : CB_LOGIT_ROWS;

        if (!one) {
            MOE_TRY(cb_norm(b, b->tmp, d_rows + c0, nc, b->final_norm,
                            b->final_norm_b, b->xlast, NULL));
            MOE_TRY(cb_mark(b, MOE_CUDA_ST_OTHER));
            MOE_TRY(cb_linear(b, nc, hp->vocab_size, D, b->xlast, D,
                              b->lm_head, b->logits, hp->vocab_size));
            MOE_TRY(cb_mark(b, MOE_CUDA_ST_DENSE));
            MOE_TRY(moe_cuda_argmax_rows(b->logits, hp->vocab_size, nc,
                                         hp->vocab_size, d_nvalid + c0,
                                         b->d_tokout, s));
        }
        MOE_TRY(cb_bias(b, seqs, c0, nc, d_nvalid + c0));
        MOE_TRY(cb_mask(b, seqs, c0, nc, d_nvalid + c0));
        MOE_TRY(cb_sample(b, seqs, c0, nc));
        MOE_TRY(cb_logprobs(b, seqs, c0, nc, &any_lp));
        /* the ids (one small copy), then the logits of runs of rows that
         * asked for them; token-only rows cost no vocab-wide copy */
        MOE_CUDA_CHECK(cudaMemcpyAsync(b->h_tokout, b->d_tokout,
                                       (size_t) nc * sizeof(int32_t),
                                       cudaMemcpyDeviceToHost, s));
        for (i = 0; i < nc; i = j) {
            if (seqs[b->out_seq[c0 + i]].logits == NULL) {
                j = i + 1;
                continue;
            }
            j = i + 1;
            while (j < nc && seqs[b->out_seq[c0 + j]].logits != NULL) {
                j++;
            }
            MOE_CUDA_CHECK(cudaMemcpyAsync(
                b->h_logits + (size_t) i * hp->vocab_size,
                b->logits + (size_t) i * hp->vocab_size,
                (size_t) (j - i) * hp->vocab_size * sizeof(float),
                cudaMemcpyDeviceToHost, s));
        }
        MOE_TRY(cb_mark(b, MOE_CUDA_ST_OTHER));
        MOE_CUDA_CHECK(cudaStreamSynchronize(s));
        for (i = 0; i < nc; i++) {
            const moe_seq_batch_t *sq = &seqs[b->out_seq[c0 + i]];

            if (sq->token_out != NULL) {
                *sq->token_out = b->h_tokout[i];
            }
            if (any_lp && sq->token_out != NULL && sq->lp_out != NULL) {
                cb_logprobs_take(b, sq, i);
            }
            if (sq->logits != NULL) {
                memcpy(sq->logits, b->h_logits + (size_t) i * hp->vocab_size,
                       (size_t) hp->vocab_size * sizeof(float));
            }
        }
    }
    (void) n;
    MOE_CUDA_CHECK(cudaStreamSynchronize(s));
    MOE_CUDA_CHECK(cudaGetLastError());
    if (b->prof) {
        MOE_TRY(cb_prof_collect(b));
    }
    return MOE_OK;
}


static int
cb_forward(moe_backend_t *base, const moe_seq_batch_t *seqs, int n)
{
    cuda_backend_t      *b = (cuda_backend_t *) base;
    const moe_hparams_t *hp = &b->hp;
    size_t               N = (size_t) b->cap, nbt = 0;
    int32_t             *h_tok = b->h_stage, *h_pos = h_tok + N;
    int32_t             *h_slot = h_pos + N, *h_seq = h_slot + N;
    int32_t             *h_rows = h_seq + N, *h_btoff = h_rows + N;
    int32_t             *h_nvalid = h_btoff + N, *h_rbase = h_nvalid + N;
    int32_t             *h_bt = h_rbase + N;
    int                  T, s, i, t, n_out, rc, max_ctx = 0;

    if (n < 0 || (n > 0 && seqs == NULL)) {
        return MOE_EINVAL;
    }
    /* validate everything before touching the cache */
    if (moe_batch_check(hp, seqs, n, b->n_blocks, b->block_size, INT_MAX,
                        &T, &nbt, &max_ctx) != MOE_OK)
    {
        return MOE_EINVAL;
    }
    /* the split-K attention grid for long contexts (a graph key) */
    b->long_ctx = b->tune.att_long_ctx > 0
                  && max_ctx >= b->tune.att_long_ctx;
    if (T > b->cap) {
        moe_cuda_set_error("cuda backend: step of more than %d tokens",
                           b->cap);
        moe_log(MOE_LOG_ERROR, "%s", moe_cuda_last_error());
        return MOE_EINVAL;
    }
    if (nbt > b->bt_cap) {
        moe_cuda_set_error("cuda backend: %zu block-table entries in one "
                           "step (at most %zu)", nbt, b->bt_cap);
        moe_log(MOE_LOG_ERROR, "%s", moe_cuda_last_error());
        return MOE_EINVAL;
    }
    if (T == 0) {
        return MOE_OK;
    }

    /* stage the step (the previous step has synchronised: free to reuse) */
    t = 0;
    n_out = 0;
    nbt = 0;
    for (s = 0; s < n; s++) {
        const moe_seq_batch_t *sq = &seqs[s];
        int need = (sq->pos + sq->n_tokens + b->block_size - 1)
                   / b->block_size;

        float rbase = hp->rope_type == MOE_ROPE_DYNAMIC
                      ? (float) moe_rope_dynamic_base(hp, sq->pos
                                                      + sq->n_tokens)
                      : 0.0f;

        h_btoff[s] = (int32_t) nbt;
        memcpy(h_bt + nbt, sq->block_table, (size_t) need * sizeof(int32_t));
        nbt += (size_t) need;
        for (i = 0; i < sq->n_tokens; i++, t++) {
            int p = sq->pos + i;

            h_tok[t] = sq->tokens[i];
            h_pos[t] = p;
            h_slot[t] = sq->block_table[p / b->block_size] * b->block_size
                        + p % b->block_size;
            h_seq[t] = s;
            memcpy(&h_rbase[t], &rbase, sizeof(float));
        }
        if (sq->logits != NULL || sq->token_out != NULL) {
            h_rows[n_out] = t - 1;
            h_nvalid[n_out] = sq->n_valid;
            b->out_seq[n_out] = s;
            n_out++;
        }
    }

    /* steps graphs never capture: the host knows whether the tensor-core
     * prefill attention covers every row tile (no SIMT pass then) */
    b->att_tc_whole = T > CB_GRAPH_MAX_T
                      && moe_cuda_attention_tc_whole(h_seq, T, hp->head_dim);
    rc = cb_run(b, seqs, n, T, n_out, CB_STAGE_FIXED * N + nbt);
    if (rc != MOE_OK) {
        moe_log(MOE_LOG_ERROR, "cuda backend: forward: %s",
                moe_cuda_last_error());
        (void) cudaStreamSynchronize(b->stream);
        (void) cudaGetLastError();
        b->n_ev = 0;
        return rc == MOE_EINVAL ? MOE_EBACKEND : rc;
    }
    return MOE_OK;
}


extern "C" int
moe_cuda_backend_route_margins(moe_backend_t *base, int T, float *out)
{
    cuda_backend_t *b = (cuda_backend_t *) base;
    int             l, t;

    if (b == NULL || out == NULL || T != b->last_T || T <= 0) {
        return MOE_EINVAL;
    }
    if (b->hp.n_experts == 1) {
        for (t = 0; t < b->hp.n_layers * T; t++) {
            out[t] = 1.0f;
        }
        return MOE_OK;
    }
    MOE_CUDA_CHECK(cudaSetDevice(b->device));
    MOE_CUDA_CHECK(cudaStreamSynchronize(b->stream));
    for (l = 0; l < b->hp.n_layers; l++) {
        MOE_CUDA_CHECK(cudaMemcpy(out + (size_t) l * T,
                                  b->margin + (size_t) l * b->cap,
                                  (size_t) T * sizeof(float),
                                  cudaMemcpyDeviceToHost));
    }
    return MOE_OK;
}


extern "C" void
moe_cuda_backend_expert_rows(moe_backend_t *base,
    int64_t st[MOE_CUDA_ROW_STATS])
{
    cuda_backend_t *b = (cuda_backend_t *) base;

    (void) cudaSetDevice(b->device);
    if (cb_row_fold(b) != MOE_OK) {
        (void) cudaGetLastError();      /* statistics only */
    }
    memcpy(st, b->row_stats, sizeof(b->row_stats));
    memset(b->row_stats, 0, sizeof(b->row_stats));
}


int64_t
moe_cuda_backend_fp8_ffn_layers(moe_backend_t *base)
{
    return base != NULL ? ((cuda_backend_t *) base)->fp8_ffn_layers : 0;
}


int64_t
moe_cuda_backend_fp8_grouped_layers(moe_backend_t *base)
{
    return base != NULL ? ((cuda_backend_t *) base)->fp8_grouped_layers : 0;
}


int64_t
moe_cuda_backend_q4_tiled_calls(moe_backend_t *base)
{
    return base != NULL ? ((cuda_backend_t *) base)->q4_tiled_calls : 0;
}


int64_t
moe_cuda_backend_q4g_calls(moe_backend_t *base)
{
    return base != NULL ? ((cuda_backend_t *) base)->q4g_calls : 0;
}


int64_t
moe_cuda_backend_q4w_calls(moe_backend_t *base)
{
    return base != NULL ? ((cuda_backend_t *) base)->q4w_calls : 0;
}


int
moe_cuda_backend_last_routing(moe_backend_t *base, int32_t *experts,
    int n_tokens)
{
    cuda_backend_t *b = (cuda_backend_t *) base;
    int             L, K, T = n_tokens, l, t, k;
    int32_t        *h;

    if (b == NULL || experts == NULL || T != b->last_T || T <= 0) {
        return MOE_EINVAL;
    }
    L = b->hp.n_layers;
    K = b->hp.top_k;            /* the table's width, even when dense */
    for (t = 0; t < L * T * K; t++) {
        experts[t] = -1;
    }
    if (b->hp.n_experts == 1) {
        return MOE_OK;
    }
    /* b->K == top_k here; the device holds (L, cap * K), token-major
     * within a layer */
    h = (int32_t *) malloc((size_t) T * K * sizeof(int32_t));
    if (h == NULL) {
        return MOE_ENOMEM;
    }
    if (cudaSetDevice(b->device) != cudaSuccess
        || cudaStreamSynchronize(b->stream) != cudaSuccess)
    {
        free(h);
        moe_cuda_set_error("last routing: %s",
                           cudaGetErrorString(cudaGetLastError()));
        return MOE_EBACKEND;
    }
    for (l = 0; l < L; l++) {
        if (b->dense_slot[l] >= 0) {
            continue;           /* a dense layer routes nothing: -1 */
        }
        if (cudaMemcpy(h, b->sel + (size_t) l * b->cap * K,
                       (size_t) T * K * sizeof(int32_t),
                       cudaMemcpyDeviceToHost) != cudaSuccess)
        {
            free(h);
            moe_cuda_set_error("last routing: %s",
                               cudaGetErrorString(cudaGetLastError()));
            return MOE_EBACKEND;
        }
        for (t = 0; t < T; t++) {
            for (k = 0; k < K; k++) {
                experts[((size_t) t * L + l) * K + k] = h[(size_t) t * K + k];
            }
        }
    }
    free(h);
    return MOE_OK;
}


static const int64_t *
cb_expert_counts(moe_backend_t *base)
{
    cuda_backend_t *b = (cuda_backend_t *) base;
    size_t          n = (size_t) b->hp.n_layers * b->hp.n_experts;
    size_t          i;

    /* MoE: running totals kept on the device by the permute kernel */
    if (b->hp.n_experts == 1) {
        for (i = 0; i < n; i++) {
            b->expert_counts[i] = b->dense_tokens;
        }
    } else if (cudaSetDevice(b->device) != cudaSuccess
               || cudaStreamSynchronize(b->stream) != cudaSuccess
               || cudaMemcpy(b->expert_counts, b->d_ecounts,
                             n * sizeof(int64_t), cudaMemcpyDeviceToHost)
                  != cudaSuccess)
    {
        (void) cudaGetLastError();      /* keep the last good values */
    }
    return b->expert_counts;
}


/* ---------------------------------------------------------- swap space */

/*
 * Preemption by swapping: whole blocks between the device KV pool and a
 * pinned host pool.  A block is L strided pieces on the device (layer
 * outermost: piece l at kv + (l * n_blocks + block) * piece) and one
 * contiguous slot on the host, so each copy is one cudaMemcpy2DAsync (L
 * rows of `piece` bytes).  Copies go on the backend's stream, in order
 * with forward(): a block freed after swap_out is overwritten only after
 * the copy, a block filled by swap_in is read only after it; the engine
 * never touches the host pool itself, so nothing synchronises here except
 * swap_read (tests) and the pool's reallocation.
 */

static void
cb_swap_destroy(moe_backend_t *base)
{
    cuda_backend_t *b = (cuda_backend_t *) base;

    if (b == NULL) {
        return;
    }
    if (b->swap_host != NULL) {
        (void) cudaSetDevice(b->device);
        (void) cudaStreamSynchronize(b->stream);
        (void) cudaFreeHost(b->swap_host);
        b->swap_host = NULL;
    }
    cb_destroy(base);
}


static int
cb_swap_alloc(moe_backend_t *base, int n_slots, char *err, size_t errlen)
{
    cuda_backend_t *b = (cuda_backend_t *) base;
    size_t          bytes;
    cudaError_t     ce;

    if (n_slots < 0) {
        moe_errf(err, errlen, "cuda backend: bad swap slot count %d", n_slots);
        return MOE_EINVAL;
    }
    if (cudaSetDevice(b->device) != cudaSuccess
        || cudaStreamSynchronize(b->stream) != cudaSuccess)
    {
        moe_errf(err, errlen, "cuda backend: swap space: %s",
               cudaGetErrorString(cudaGetLastError()));
        return MOE_EBACKEND;
    }
    if (b->swap_host != NULL) {
        (void) cudaFreeHost(b->swap_host);
        b->swap_host = NULL;
    }
    b->base.n_swap_slots = 0;
    if (n_slots == 0) {
        return MOE_OK;
    }

    bytes = (size_t) n_slots * (size_t) b->base.kv_bytes_per_block;
    ce = cudaHostAlloc((void **) &b->swap_host, bytes, cudaHostAllocDefault);
    if (ce != cudaSuccess) {
        b->swap_host = NULL;
        (void) cudaGetLastError();
        moe_errf(err, errlen, "cuda backend: pinned swap space of %d blocks "
               "(%zu MiB): %s", n_slots, bytes >> 20,
               cudaGetErrorString(ce));
        return ce == cudaErrorMemoryAllocation ? MOE_ENOMEM : MOE_EBACKEND;
    }
    b->base.n_swap_slots = n_slots;
    return MOE_OK;
}


/* dir 0: device blocks -> host slots, 1: host slots -> device blocks */
static int
cb_swap_copy(cuda_backend_t *b, const int32_t *blocks, const int32_t *slots,
    int n, int dir)
{
    size_t  piece = (size_t) 2 * b->block_size * b->KVD
                    * (b->kv_fp8 ? 1 : sizeof(bf16));
    size_t  dpitch = piece * (size_t) b->n_blocks;
    char   *dev, *host;
    int     i;

    for (i = 0; i < n; i++) {
        if (blocks[i] < 0 || blocks[i] >= b->n_blocks || slots[i] < 0
            || slots[i] >= b->base.n_swap_slots)
        {
            moe_cuda_set_error("swap: block %d / slot %d out of range",
                               blocks[i], slots[i]);
            return MOE_EINVAL;
        }
    }
    MOE_CUDA_CHECK(cudaSetDevice(b->device));
    for (i = 0; i < n; i++) {
        dev = (char *) b->kv + (size_t) blocks[i] * piece;
        host = (char *) b->swap_host
               + (size_t) slots[i] * (size_t) b->base.kv_bytes_per_block;
        if (dir == 0) {
            MOE_CUDA_CHECK(cudaMemcpy2DAsync(host, piece, dev, dpitch, piece,
                                             (size_t) b->hp.n_layers,
                                             cudaMemcpyDeviceToHost,
                                             b->stream));
        } else {
            MOE_CUDA_CHECK(cudaMemcpy2DAsync(dev, dpitch, host, piece, piece,
                                             (size_t) b->hp.n_layers,
                                             cudaMemcpyHostToDevice,
                                             b->stream));
        }
    }
    return MOE_OK;
}


static int
cb_swap_out(moe_backend_t *base, const int32_t *blocks,
    const int32_t *slots, int n)
{
    return cb_swap_copy((cuda_backend_t *) base, blocks, slots, n, 0);
}


static int
cb_swap_in(moe_backend_t *base, const int32_t *slots,
    const int32_t *blocks, int n)
{
    return cb_swap_copy((cuda_backend_t *) base, blocks, slots, n, 1);
}


static int
cb_swap_read(moe_backend_t *base, int32_t slot, void *dst)
{
    cuda_backend_t *b = (cuda_backend_t *) base;

    if (slot < 0 || slot >= b->base.n_swap_slots) {
        return MOE_EINVAL;
    }
    MOE_CUDA_CHECK(cudaSetDevice(b->device));
    MOE_CUDA_CHECK(cudaStreamSynchronize(b->stream));
    memcpy(dst, (char *) b->swap_host
                + (size_t) slot * (size_t) b->base.kv_bytes_per_block,
           (size_t) b->base.kv_bytes_per_block);
    return MOE_OK;
}


/* ------------------------------------------------- tensor parallelism */

/* moe_tp_ops_t for CUDA ranks: device buffers, the rank's stream; the op
 * context of a rank is its backend */
static int
cb_tp_sum(void *rank_ctx, float *dst, float *const *srcs, int R, size_t lo,
    size_t hi)
{
    cuda_backend_t *b = (cuda_backend_t *) rank_ctx;

    MOE_TRY(moe_cuda_tp_sum(dst, srcs, R, lo, hi, b->stream));
    MOE_CUDA_CHECK(cudaStreamSynchronize(b->stream));
    return MOE_OK;
}


static int
cb_tp_copy(void *rank_ctx, float *dst, const float *src, size_t n)
{
    cuda_backend_t *b = (cuda_backend_t *) rank_ctx;

    MOE_CUDA_CHECK(cudaMemcpyAsync(dst, src, n * sizeof(float),
                                   cudaMemcpyDefault, b->stream));
    MOE_CUDA_CHECK(cudaStreamSynchronize(b->stream));
    return MOE_OK;
}


static void *
cb_tp_alloc(size_t bytes)
{
    void *p = NULL;

    return cudaMalloc(&p, bytes) == cudaSuccess ? p : NULL;
}


static void
cb_tp_free(void *p)
{
    if (p != NULL) {
        (void) cudaFree(p);
    }
}


static const moe_tp_ops_t cb_tp_ops = {
    cb_tp_sum, cb_tp_copy, cb_tp_alloc, cb_tp_free
};


extern "C" const moe_tp_ops_t *
moe_cuda_tp_ops(void)
{
    return &cb_tp_ops;
}


extern "C" void
moe_cuda_backend_set_reduce(moe_backend_t *base, moe_reduce_fn fn, void *ctx)
{
    cuda_backend_t *b = (cuda_backend_t *) base;

    b->reduce = fn;
    b->reduce_ctx = ctx;
}


extern "C" int
moe_cuda_peer_access(const int *devices, int n, char *err, size_t errlen)
{
    int r, q, ndev = moe_cuda_device_count();

    for (r = 0; r < n; r++) {
        if (devices[r] < 0 || devices[r] >= ndev) {
            moe_errf(err, errlen, "cuda backend: rank %d: no CUDA device %d "
                   "(%d found)", r, devices[r], ndev);
            return MOE_EINVAL;
        }
    }
    for (r = 0; r < n; r++) {
        for (q = 0; q < n; q++) {
            int ok = 0;

            if (devices[r] == devices[q]) {
                continue;
            }
            if (cudaDeviceCanAccessPeer(&ok, devices[r], devices[q])
                != cudaSuccess || !ok)
            {
                (void) cudaGetLastError();
                moe_errf(err, errlen, "cuda backend: tensor parallel ranks on "
                       "devices %d and %d need peer access (NVLink or PCIe "
                       "P2P), which this system does not give", devices[r],
                       devices[q]);
                return MOE_EUNSUPPORTED;
            }
            (void) cudaSetDevice(devices[r]);
            if (cudaDeviceEnablePeerAccess(devices[q], 0) != cudaSuccess) {
                (void) cudaGetLastError();  /* already enabled */
            }
        }
    }
    return MOE_OK;
}


/* ------------------------------------------------------------- NCCL */

extern "C" int
moe_cuda_nccl_available(void)
{
#ifdef MOE_HAVE_NCCL
    return 1;
#else
    return 0;
#endif
}


extern "C" int
moe_cuda_nccl_attach(moe_backend_t **ranks, const int *devices, int n,
    char *err, size_t errlen)
{
#ifdef MOE_HAVE_NCCL
    ncclComm_t     *comms;
    ncclResult_t    nr;
    cuda_backend_t *b;
    int             i, j, version = 0;

    if (n < 1 || n > 64 || ranks == NULL || devices == NULL) {
        moe_errf(err, errlen, "nccl: %d ranks (1..64)", n);
        return MOE_EINVAL;
    }
    for (i = 0; i < n; i++) {
        for (j = 0; j < i; j++) {
            if (devices[i] == devices[j]) {
                moe_errf(err, errlen, "nccl: ranks %d and %d are both on "
                         "GPU %d (NCCL places one rank per device)", j, i,
                         devices[i]);
                return MOE_EUNSUPPORTED;
            }
        }
        b = (cuda_backend_t *) ranks[i];
        if (b == NULL || b->base.forward != cb_forward || b->nccl != NULL) {
            moe_errf(err, errlen, "nccl: rank %d is not a cuda backend "
                     "without a communicator", i);
            return MOE_EINVAL;
        }
    }
    /* NVLink multicast (NVLS) stays off unless the user asks for it; every
     * other NCCL_* variable is the user's */
    (void) setenv("NCCL_NVLS_ENABLE", "0", 0);
    comms = (ncclComm_t *) calloc((size_t) n, sizeof(*comms));
    if (comms == NULL) {
        moe_errf(err, errlen, "nccl: out of memory");
        return MOE_ENOMEM;
    }
    nr = ncclCommInitAll(comms, n, devices);
    if (nr != ncclSuccess) {
        moe_errf(err, errlen, "nccl: ncclCommInitAll over %d device(s): %s "
                 "(%s)", n, ncclGetErrorString(nr), ncclGetLastError(NULL));
        free(comms);
        return MOE_EBACKEND;
    }
    /* one all-reduce outside any graph: NCCL connects its peers lazily,
     * and the first decode step may be captured */
    (void) ncclGroupStart();
    for (i = 0; i < n; i++) {
        b = (cuda_backend_t *) ranks[i];
        nr = ncclAllReduce(b->tmp, b->tmp, (size_t) b->hp.dim, ncclFloat,
                           ncclSum, comms[i], b->stream);
        if (nr != ncclSuccess) {
            break;
        }
    }
    if (ncclGroupEnd() != ncclSuccess || nr != ncclSuccess) {
        moe_errf(err, errlen, "nccl: first all-reduce over %d device(s): "
                 "%s", n, ncclGetLastError(NULL));
        for (i = 0; i < n; i++) {
            (void) ncclCommAbort(comms[i]);
        }
        free(comms);
        return MOE_EBACKEND;
    }
    for (i = 0; i < n; i++) {
        b = (cuda_backend_t *) ranks[i];
        (void) cudaSetDevice(b->device);
        if (cudaStreamSynchronize(b->stream) != cudaSuccess) {
            moe_errf(err, errlen, "nccl: first all-reduce on device %d: %s",
                     b->device, cudaGetErrorString(cudaGetLastError()));
            for (j = 0; j < n; j++) {
                (void) ncclCommAbort(comms[j]);
            }
            free(comms);
            return MOE_EBACKEND;
        }
        b->nccl = (void *) comms[i];
    }
    b = (cuda_backend_t *) ranks[n - 1];
    b->nccl_all = (void **) comms;
    b->nccl_n = n;
    (void) ncclGetVersion(&version);
    moe_log(MOE_LOG_INFO, "nccl %d.%d.%d: one communicator over %d device(s) "
            "(%d..%d), all-reduce of the partial sums on the ranks' "
            "streams, NCCL_NVLS_ENABLE=%s", version / 10000,
            version / 100 % 100, version % 100, n, devices[0],
            devices[n - 1], getenv("NCCL_NVLS_ENABLE"));
    return MOE_OK;
#else
    (void) ranks;
    (void) devices;
    (void) n;
    moe_errf(err, errlen, "nccl: this build has no NCCL (nccl.h and libnccl "
             "were not found at build time; README, NCCL)");
    return MOE_EUNSUPPORTED;
#endif
}
