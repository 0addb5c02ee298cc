/*
 * The CUDA backend: moe_backend_t over one GPU.
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
 * Dense GEMMs (qkv, o, lm_head, dense FFN) use the GEMV for T <= 64 and
 * cuBLAS above.
 * Finally the last token of each sequence that wants logits goes through
 * the final norm and lm_head (64 rows at a time), and the fp32 logits are
 * copied back.  The residual stream stays fp32 throughout.
 *
 * CUDA graphs: a step of T <= CB_GRAPH_MAX_T tokens with at most
 * CB_LOGIT_ROWS logits rows (decode, small prefill chunks) runs as a graph
 * captured once per (T, logits rows): everything it reads from the host
 * lives in the staging buffer, copied before the replay; kernel shapes
 * depend on T only.  Off while profiling, or with MOE_CUDA_GRAPHS=0 in the
 * environment.  MOE_CUDA_GEMV_MAX_T overrides gemv_max_t (default 32 for
 * <= 16 experts, 256 for more, 128 dense).  Steps whose experts take the
 * cuBLAS path (host sync) never run as graphs.
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

#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "common.cuh"
#include "cuda_backend.h"
#include "arch.h"
#include "attention.h"
#include "embed.h"
#include "gemm.h"
#include "init.h"
#include "moe_gemv.h"
#include "moe_permute.h"
#include "moe_route.h"
#include "rmsnorm.h"
#include "rope.h"
#include "silu_mul.h"

#define CB_ALIGN        256
#define CB_LOGIT_ROWS   64                  /* lm_head rows per pass */
#define CB_BLAS_WS      ((size_t) 32 << 20)
#define CB_UPLOAD_ELEMS ((size_t) 16 << 20) /* fp32 elements per upload */
#define CB_SLACK        ((int64_t) 256 << 20)
#define CB_DENSE_GEMV_T 64                  /* dense GEMMs: GEMV up to here */
#define CB_GRAPH_MAX_T  64
#define CB_MAX_GRAPHS   160
#define CB_NOGRAPH      (-1000)             /* internal: run eagerly */

typedef struct {
    int             T, n_out;
    cudaGraphExec_t exec;
} cb_graph_t;

typedef __nv_bfloat16 bf16;

typedef struct {
    moe_backend_t   base;          /* first: the public interface */
    moe_hparams_t   hp;
    int             device;
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
    bf16           *embed;         /* (vocab, dim) */
    bf16           *lm_head;       /* (vocab, dim) */
    bf16           *wqkv;          /* (L, Q + 2 KVD, dim) */
    bf16           *wo;            /* (L, dim, Q) */
    bf16           *w_gu;          /* (L, E, 2 ffn, dim) */
    bf16           *w_down;        /* (L, E, dim, ffn) */
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
    bf16           *ws_gu;         /* (L, 2 FS, dim) shared expert */
    bf16           *ws_down;       /* (L, dim, FS) */
    float          *ws_gate_inp;   /* (L, dim) */
    bf16           *wd_gu;         /* (n_dense, 2 FD, dim) dense layers */
    bf16           *wd_down;       /* (n_dense, dim, FD) */
    int             G;             /* rows of w_gu per expert: 2 ffn, or
                                      ffn when ungated */
    int             dense_slot[MOE_MAX_LAYERS]; /* layer -> wd_* index */

    bf16           *kv;            /* (L, n_blocks, 2, bs, n_kv, hd) */

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
    int32_t        *erow;          /* (NK) */
    int32_t        *counts;        /* (E) */
    int32_t        *offs;          /* (E + 1) */
    int64_t        *d_ecounts;     /* (L, E) running totals */
    float          *att_part;      /* attention split partials */
    float          *margin;        /* (L, N) router margins, last step */
    float          *rlogits;       /* (N, E) router logits */
    bf16           *xe;            /* (NK, dim) */
    float          *gu;            /* (NK, 2 ffn) */
    bf16           *hbuf;          /* (NK, ffn) */
    float          *ye;            /* (NK, dim) */
    bf16           *xlast;         /* (CB_LOGIT_ROWS, dim) */
    float          *logits;        /* (CB_LOGIT_ROWS, vocab) */
    int32_t        *d_stage;       /* (stage_ints) */

    /* host side */
    int32_t        *h_stage;       /* (stage_ints) pinned */
    size_t          stage_ints;
    size_t          bt_cap;        /* block-table entries per step */
    int32_t        *h_counts;      /* (E + 1) pinned: expert offsets */
    float          *h_logits;      /* (CB_LOGIT_ROWS, vocab) pinned */
    int            *out_seq;       /* (cap) sequence of each logits row */
    int64_t        *expert_counts; /* (L, E) */
    int             last_T;        /* tokens of the last step */
    int64_t         dense_tokens;  /* E == 1: tokens run (all layers) */
    int             gemv_max_t;
    int             use_graphs;
    cb_graph_t      graphs[CB_MAX_GRAPHS];
    int             n_graphs;

    /* profiling */
    int             prof;
    cudaEvent_t    *ev;
    int            *ev_stage;
    int             ev_cap;
    int             n_ev;
    double          prof_ms[MOE_CUDA_N_STAGES];
} cuda_backend_t;


static void
cb_err(char *err, size_t errlen, const char *fmt, ...)
{
    va_list ap;

    if (err == NULL || errlen == 0) {
        return;
    }
    va_start(ap, fmt);
    vsnprintf(err, errlen, fmt, ap);
    va_end(ap);
}


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
    size_t embed, lm_head, wqkv, wo, w_gu, w_down, attn_norm, ffn_norm,
           final_norm, router, pos_embed, attn_norm_b, ffn_norm_b,
           final_norm_b, bqkv, bo, q_norm, k_norm, b_gu, b_down, ws_gu,
           ws_down, ws_gate_inp, wd_gu, wd_down, total;
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


static void
cb_weight_layout(const moe_hparams_t *hp, cb_wlayout_t *l)
{
    cb_carve_t c = { 0 };
    size_t     L = (size_t) hp->n_layers, D = (size_t) hp->dim;
    size_t     V = (size_t) hp->vocab_size, E = (size_t) hp->n_experts;
    size_t     F = (size_t) hp->ffn_dim, G = hp->ffn_ungated ? F : 2 * F;
    size_t     Q = (size_t) hp->n_heads * hp->head_dim;
    size_t     KV = (size_t) hp->n_kv_heads * hp->head_dim;
    size_t     HD = (size_t) hp->head_dim;
    size_t     FS = (size_t) (hp->shared_ffn_dim > 0 ? hp->shared_ffn_dim
                                                     : 0);
    size_t     FD = (size_t) (hp->dense_ffn_dim > 0 ? hp->dense_ffn_dim : 0);
    size_t     ND = (size_t) cb_n_dense(hp);

    l->embed = cb_take(&c, V * D * 2);
    l->lm_head = hp->tie_embeddings ? l->embed : cb_take(&c, V * D * 2);
    l->wqkv = cb_take(&c, L * (Q + 2 * KV) * D * 2);
    l->wo = cb_take(&c, L * D * Q * 2);
    l->w_gu = cb_take(&c, L * E * G * D * 2);
    l->w_down = cb_take(&c, L * E * D * F * 2);
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
    l->ws_gu = cb_take_if(&c, FS > 0, L * 2 * FS * D * 2);
    l->ws_down = cb_take_if(&c, FS > 0, L * D * FS * 2);
    l->ws_gate_inp = cb_take_if(&c, FS > 0, L * D * 4);
    l->wd_gu = cb_take_if(&c, ND > 0, ND * 2 * FD * D * 2);
    l->wd_down = cb_take_if(&c, ND > 0, ND * D * FD * 2);
    l->total = c.off;
}


typedef struct {
    size_t x, tmp, xf, xb, qkv, att, sel, selw, slot_of, erow, counts, xe,
           gu, hbuf, ye, xlast, logits, stage, offs, ecounts, att_part,
           margin, rlogits, total;
    size_t stage_ints, bt_cap;
} cb_slayout_t;


static void
cb_ws_layout(const moe_hparams_t *hp, int cap, int n_blocks, cb_slayout_t *l)
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
    /* staging: tokens, pos, slot, tseq, out rows, bt_off (cap each), then
     * the block tables */
    l->bt_cap = (size_t) n_blocks + 4 * N + 65536;
    l->stage_ints = 6 * N + l->bt_cap;
    l->stage = cb_take(&c, l->stage_ints * 4);
    l->total = c.off;
}


extern "C" int64_t
moe_cuda_weight_bytes(const moe_hparams_t *hp)
{
    cb_wlayout_t l;

    cb_weight_layout(hp, &l);
    return (int64_t) l.total;
}


extern "C" int64_t
moe_cuda_workspace_bytes(const moe_hparams_t *hp, int max_batched_tokens)
{
    cb_slayout_t l;

    cb_ws_layout(hp, max_batched_tokens, 0, &l);
    return (int64_t) (l.total + CB_BLAS_WS);
}


static int64_t
cb_kv_bytes_per_block(const moe_hparams_t *hp, int block_size)
{
    return (int64_t) hp->n_layers * 2 * block_size * hp->n_kv_heads
           * hp->head_dim * 2;
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


static int
cb_check_shapes(const moe_hparams_t *hp, int block_size, int cap, char *err,
    size_t errlen)
{
    if (hp->dim <= 0 || hp->n_layers <= 0 || hp->n_heads <= 0
        || hp->n_kv_heads <= 0 || hp->head_dim <= 0 || hp->ffn_dim <= 0
        || hp->vocab_size <= 0 || hp->n_experts <= 0 || hp->top_k <= 0
        || block_size <= 0 || cap <= 0)
    {
        cb_err(err, errlen, "cuda backend: bad shape or arguments (dim %d, "
               "layers %d, block_size %d, max tokens %d)", hp->dim,
               hp->n_layers, block_size, cap);
        return MOE_EINVAL;
    }
    if (!moe_cuda_attention_supported(hp->n_heads, hp->n_kv_heads,
                                      hp->head_dim))
    {
        cb_err(err, errlen, "cuda backend: attention with %d heads, %d kv "
               "heads, head_dim %d not supported (head_dim %% 8 == 0, <= "
               "256; at most 8 query heads per kv head)", hp->n_heads,
               hp->n_kv_heads, hp->head_dim);
        return MOE_EUNSUPPORTED;
    }
    if (hp->n_experts > 256
        || (hp->n_experts > 1 && (hp->top_k > hp->n_experts
                                  || hp->top_k > 64)))
    {
        cb_err(err, errlen, "cuda backend: %d experts, top-%d not supported "
               "(at most 256 experts, top-64)", hp->n_experts, hp->top_k);
        return MOE_EUNSUPPORTED;
    }
    if ((int64_t) cap * (hp->n_experts > 1 ? hp->top_k : 1) > (1 << 24)) {
        cb_err(err, errlen, "cuda backend: max tokens %d too large", cap);
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
        cb_err(err, errlen, "cuda backend: %s not supported (%s)",
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
        cb_err(why, n, "no hparams");
        return 0;
    }
    if (cb_check_shapes(hp, 16, 1, buf, sizeof(buf)) != MOE_OK
        || cb_check_arch(hp, buf, sizeof(buf)) != MOE_OK)
    {
        cb_err(why, n, "%s", buf);
        return 0;
    }
    return 1;
}


extern "C" int
moe_cuda_kv_blocks_for_hp(const moe_hparams_t *hp, int block_size,
    int max_batched_tokens, double gpu_memory_utilization, int device,
    int *n_blocks, char *err, size_t errlen)
{
    size_t  free_b = 0, total_b = 0;
    int64_t budget, per;
    int     rc;

    *n_blocks = 0;
    rc = cb_check_shapes(hp, block_size, max_batched_tokens, err, errlen);
    if (rc != MOE_OK) {
        return rc;
    }
    if (device < 0 || device >= moe_cuda_device_count()) {
        cb_err(err, errlen, "cuda backend: no CUDA device %d", device);
        return MOE_EBACKEND;
    }
    if (cudaSetDevice(device) != cudaSuccess
        || cudaMemGetInfo(&free_b, &total_b) != cudaSuccess)
    {
        cb_err(err, errlen, "cuda backend: cannot query device %d: %s",
               device, cudaGetErrorString(cudaGetLastError()));
        return MOE_EBACKEND;
    }
    budget = (int64_t) ((double) total_b * gpu_memory_utilization)
             - (int64_t) (total_b - free_b) - moe_cuda_weight_bytes(hp)
             - moe_cuda_workspace_bytes(hp, max_batched_tokens) - CB_SLACK;
    per = cb_kv_bytes_per_block(hp, block_size);
    if (budget < per) {
        cb_err(err, errlen, "cuda backend: device %d: %lld MiB total, %lld "
               "MiB free, weights %lld MiB, workspaces %lld MiB: no room for "
               "the KV cache at gpu_memory_utilization %.2f", device,
               (long long) (total_b >> 20), (long long) (free_b >> 20),
               (long long) (moe_cuda_weight_bytes(hp) >> 20),
               (long long) (moe_cuda_workspace_bytes(hp, max_batched_tokens)
                            >> 20), gpu_memory_utilization);
        return MOE_ENOMEM;
    }
    *n_blocks = budget / per > (1 << 30) ? (1 << 30) : (int) (budget / per);
    return MOE_OK;
}


extern "C" int
moe_cuda_kv_blocks_for(const moe_model_t *m, int block_size,
    int max_batched_tokens, double gpu_memory_utilization, int device,
    int *n_blocks, char *err, size_t errlen)
{
    return moe_cuda_kv_blocks_for_hp(moe_model_hparams(m), block_size,
                                     max_batched_tokens,
                                     gpu_memory_utilization, device,
                                     n_blocks, err, errlen);
}


/* ------------------------------------------------------------ lifecycle */

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
    free(b->ev);
    free(b->ev_stage);
    if (b->blas != NULL) {
        (void) cublasDestroy(b->blas);
    }
    (void) cudaFree(b->blas_ws);
    (void) cudaFree(b->wbuf);
    (void) cudaFree(b->kv);
    (void) cudaFree(b->wsbuf);
    (void) cudaFreeHost(b->h_stage);
    (void) cudaFreeHost(b->h_counts);
    (void) cudaFreeHost(b->h_logits);
    if (b->stream != NULL) {
        (void) cudaStreamDestroy(b->stream);
    }
    (void) cudaGetLastError();
    free(b->out_seq);
    free(b->expert_counts);
    free(b);
}


/* n fp32 host values -> bf16 device dst, through tmp (CB_UPLOAD_ELEMS). */
static int
cb_upload_bf16(cuda_backend_t *b, float *tmp, bf16 *dst, const float *src,
    size_t n)
{
    size_t i, c;

    for (i = 0; i < n; i += c) {
        c = n - i < CB_UPLOAD_ELEMS ? n - i : CB_UPLOAD_ELEMS;
        MOE_CUDA_CHECK(cudaMemcpyAsync(tmp, src + i, c * sizeof(float),
                                       cudaMemcpyHostToDevice, b->stream));
        MOE_TRY(moe_cuda_f32_to_bf16(tmp, (moe_bf16_t *) (dst + i),
                                     (int64_t) c, b->stream));
        /* tmp is reused by the next chunk */
        MOE_CUDA_CHECK(cudaStreamSynchronize(b->stream));
    }
    return MOE_OK;
}


static int
cb_upload_f32(cuda_backend_t *b, float *dst, const float *src, size_t n)
{
    MOE_CUDA_CHECK(cudaMemcpyAsync(dst, src, n * sizeof(float),
                                   cudaMemcpyHostToDevice, b->stream));
    MOE_CUDA_CHECK(cudaStreamSynchronize(b->stream));
    return MOE_OK;
}


static int
cb_load_weights(cuda_backend_t *b, const moe_weights_t *w)
{
    const moe_hparams_t *hp = &b->hp;
    size_t               L = (size_t) hp->n_layers, D = (size_t) hp->dim;
    size_t               V = (size_t) hp->vocab_size;
    size_t               E = (size_t) hp->n_experts, F = (size_t) hp->ffn_dim;
    size_t               Q = (size_t) b->Q, KV = (size_t) b->KVD;
    size_t               G = (size_t) b->G, HD = (size_t) hp->head_dim;
    size_t               FS = (size_t) (hp->shared_ffn_dim > 0
                                        ? hp->shared_ffn_dim : 0);
    size_t               FD = (size_t) (hp->dense_ffn_dim > 0
                                        ? hp->dense_ffn_dim : 0);
    size_t               l, e;
    float               *tmp = NULL;
    int                  rc;

    MOE_CUDA_CHECK(cudaMalloc(&tmp, CB_UPLOAD_ELEMS * sizeof(float)));

#define UP(call) do { rc = (call); if (rc != MOE_OK) goto done; } while (0)
    UP(cb_upload_bf16(b, tmp, b->embed, w->embed, V * D));
    if (b->lm_head != b->embed) {
        UP(cb_upload_bf16(b, tmp, b->lm_head, w->lm_head, V * D));
    }
    for (l = 0; l < L; l++) {
        bf16 *qkv = b->wqkv + l * (Q + 2 * KV) * D;

        UP(cb_upload_bf16(b, tmp, qkv, w->wq + l * Q * D, Q * D));
        UP(cb_upload_bf16(b, tmp, qkv + Q * D, w->wk + l * KV * D, KV * D));
        UP(cb_upload_bf16(b, tmp, qkv + (Q + KV) * D, w->wv + l * KV * D,
                          KV * D));
        for (e = 0; e < E; e++) {
            bf16   *gu = b->w_gu + (l * E + e) * G * D;
            size_t  src = (l * E + e) * F * D;

            if (hp->ffn_ungated) {          /* up rows only */
                UP(cb_upload_bf16(b, tmp, gu, w->w_up + src, F * D));
                continue;
            }
            UP(cb_upload_bf16(b, tmp, gu, w->w_gate + src, F * D));
            UP(cb_upload_bf16(b, tmp, gu + F * D, w->w_up + src, F * D));
        }
        if (hp->qkv_bias) {
            float *bq = b->bqkv + l * (Q + 2 * KV);

            UP(cb_upload_f32(b, bq, w->bq + l * Q, Q));
            UP(cb_upload_f32(b, bq + Q, w->bk + l * KV, KV));
            UP(cb_upload_f32(b, bq + Q + KV, w->bv + l * KV, KV));
        }
        if (hp->mlp_bias) {
            float *bgu = b->b_gu + l * 2 * F;

            if (w->b_gate != NULL) {
                UP(cb_upload_f32(b, bgu, w->b_gate + l * F, F));
            } else {
                MOE_CUDA_CHECK(cudaMemsetAsync(bgu, 0, F * sizeof(float),
                                               b->stream));
            }
            UP(cb_upload_f32(b, bgu + F, w->b_up + l * F, F));
        }
        if (FS > 0) {
            bf16 *sgu = b->ws_gu + l * 2 * FS * D;

            UP(cb_upload_bf16(b, tmp, sgu, w->ws_gate + l * FS * D, FS * D));
            UP(cb_upload_bf16(b, tmp, sgu + FS * D, w->ws_up + l * FS * D,
                              FS * D));
            UP(cb_upload_bf16(b, tmp, b->ws_down + l * D * FS,
                              w->ws_down + l * D * FS, D * FS));
        }
        if (b->dense_slot[l] >= 0) {
            size_t k = (size_t) b->dense_slot[l];
            bf16  *dgu = b->wd_gu + k * 2 * FD * D;

            UP(cb_upload_bf16(b, tmp, dgu, w->wd_gate + l * FD * D, FD * D));
            UP(cb_upload_bf16(b, tmp, dgu + FD * D, w->wd_up + l * FD * D,
                              FD * D));
            UP(cb_upload_bf16(b, tmp, b->wd_down + k * D * FD,
                              w->wd_down + l * D * FD, D * FD));
        }
    }
    UP(cb_upload_bf16(b, tmp, b->wo, w->wo, L * D * Q));
    UP(cb_upload_bf16(b, tmp, b->w_down, w->w_down, L * E * D * F));
    UP(cb_upload_f32(b, b->attn_norm, w->attn_norm, L * D));
    UP(cb_upload_f32(b, b->ffn_norm, w->ffn_norm, L * D));
    UP(cb_upload_f32(b, b->final_norm, w->final_norm, D));
    if (b->router != NULL) {
        UP(cb_upload_f32(b, b->router, w->router, L * E * D));
    }
    if (hp->learned_pos) {
        UP(cb_upload_f32(b, b->pos_embed, w->pos_embed,
                         (size_t) hp->max_pos * D));
    }
    if (hp->norm_layer) {
        UP(cb_upload_f32(b, b->attn_norm_b, w->attn_norm_b, L * D));
        UP(cb_upload_f32(b, b->ffn_norm_b, w->ffn_norm_b, L * D));
        UP(cb_upload_f32(b, b->final_norm_b, w->final_norm_b, D));
    }
    if (hp->o_bias) {
        UP(cb_upload_f32(b, b->bo, w->bo, L * D));
    }
    if (hp->qk_norm) {
        UP(cb_upload_f32(b, b->q_norm, w->q_norm, L * HD));
        UP(cb_upload_f32(b, b->k_norm, w->k_norm, L * HD));
    }
    if (hp->mlp_bias) {
        UP(cb_upload_f32(b, b->b_down, w->b_down, L * D));
    }
    if (FS > 0) {
        UP(cb_upload_f32(b, b->ws_gate_inp, w->ws_gate_inp, L * D));
    }
#undef UP
    rc = MOE_OK;
done:
    (void) cudaStreamSynchronize(b->stream);
    (void) cudaFree(tmp);
    return rc;
}


static int
cb_random_weights(cuda_backend_t *b, uint64_t seed)
{
    const moe_hparams_t *hp = &b->hp;
    int64_t              L = hp->n_layers, D = hp->dim, V = hp->vocab_size;
    int64_t              E = hp->n_experts, F = hp->ffn_dim;
    int64_t              Q = b->Q, KV = b->KVD;
    cudaStream_t         s = b->stream;
    float                sd = 1.0f / sqrtf((float) D);

    MOE_TRY(moe_cuda_fill_random_bf16((moe_bf16_t *) b->embed, V * D, seed,
                                      1.0f, s));
    if (b->lm_head != b->embed) {
        MOE_TRY(moe_cuda_fill_random_bf16((moe_bf16_t *) b->lm_head, V * D,
                                          seed + 1, sd, s));
    }
    MOE_TRY(moe_cuda_fill_random_bf16((moe_bf16_t *) b->wqkv,
                                      L * (Q + 2 * KV) * D, seed + 2, sd, s));
    MOE_TRY(moe_cuda_fill_random_bf16((moe_bf16_t *) b->wo, L * D * Q,
                                      seed + 3, 1.0f / sqrtf((float) Q), s));
    MOE_TRY(moe_cuda_fill_random_bf16((moe_bf16_t *) b->w_gu,
                                      L * E * 2 * F * D, seed + 4, sd, s));
    MOE_TRY(moe_cuda_fill_random_bf16((moe_bf16_t *) b->w_down, L * E * D * F,
                                      seed + 5, 1.0f / sqrtf((float) F), s));
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


/* The host tensors the hparams flags ask for are all there. */
static int
cb_check_weights(const moe_hparams_t *hp, const moe_weights_t *w, char *err,
    size_t errlen)
{
    const char *miss = NULL;

    if (w->embed == NULL || w->wq == NULL || w->wk == NULL || w->wv == NULL
        || w->wo == NULL || w->w_up == NULL || w->w_down == NULL
        || w->attn_norm == NULL || w->ffn_norm == NULL
        || w->final_norm == NULL || w->lm_head == NULL)
    {
        miss = "core weights (load_format 'dummy'?)";
    } else if (!hp->ffn_ungated && w->w_gate == NULL) {
        miss = "w_gate";
    } else if (hp->n_experts > 1 && w->router == NULL) {
        miss = "router";
    } else if (hp->learned_pos && w->pos_embed == NULL) {
        miss = "pos_embed";
    } else if (hp->norm_layer && (w->attn_norm_b == NULL
                                  || w->ffn_norm_b == NULL
                                  || w->final_norm_b == NULL))
    {
        miss = "norm biases";
    } else if (hp->qkv_bias && (w->bq == NULL || w->bk == NULL
                                || w->bv == NULL))
    {
        miss = "q/k/v biases";
    } else if (hp->o_bias && w->bo == NULL) {
        miss = "o bias";
    } else if (hp->qk_norm && (w->q_norm == NULL || w->k_norm == NULL)) {
        miss = "q/k norms";
    } else if (hp->mlp_bias && (w->b_up == NULL || w->b_down == NULL)) {
        miss = "MLP biases";
    } else if (hp->shared_ffn_dim > 0
               && (w->ws_gate == NULL || w->ws_up == NULL
                   || w->ws_down == NULL || w->ws_gate_inp == NULL))
    {
        miss = "shared expert weights";
    } else if (cb_n_dense(hp) > 0 && (w->wd_gate == NULL || w->wd_up == NULL
                                      || w->wd_down == NULL))
    {
        miss = "dense layer weights";
    }
    if (miss != NULL) {
        cb_err(err, errlen, "cuda backend: model has no %s", miss);
        return MOE_EINVAL;
    }
    return MOE_OK;
}


static int cb_forward(moe_backend_t *base, const moe_seq_batch_t *seqs,
    int n);
static const int64_t *cb_expert_counts(moe_backend_t *base);


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
            cb_err(err, errlen, "cuda backend: %s: %s", what,                \
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
        cb_err(err, errlen, "cuda backend: cublasCreate failed");
        return MOE_EBACKEND;
    }
    CB_CUDA(cudaMalloc(&b->blas_ws, CB_BLAS_WS), "cuBLAS workspace");
    if (cublasSetStream(b->blas, b->stream) != CUBLAS_STATUS_SUCCESS
        || cublasSetWorkspace(b->blas, b->blas_ws, CB_BLAS_WS)
           != CUBLAS_STATUS_SUCCESS)
    {
        cb_err(err, errlen, "cuda backend: cuBLAS stream/workspace setup "
               "failed");
        return MOE_EBACKEND;
    }

    cb_weight_layout(hp, &wl);
    {
        char msg[96];

        snprintf(msg, sizeof(msg), "weights (%zu MiB)", wl.total >> 20);
        CB_CUDA(cudaMalloc(&b->wbuf, wl.total), msg);
    }
    w = (char *) b->wbuf;
    b->embed = (bf16 *) (w + wl.embed);
    b->lm_head = (bf16 *) (w + wl.lm_head);
    b->wqkv = (bf16 *) (w + wl.wqkv);
    b->wo = (bf16 *) (w + wl.wo);
    b->w_gu = (bf16 *) (w + wl.w_gu);
    b->w_down = (bf16 *) (w + wl.w_down);
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
    CB_OPT(ws_gu, bf16, hp->shared_ffn_dim > 0);
    CB_OPT(ws_down, bf16, hp->shared_ffn_dim > 0);
    CB_OPT(ws_gate_inp, float, hp->shared_ffn_dim > 0);
    CB_OPT(wd_gu, bf16, cb_n_dense(hp) > 0);
    CB_OPT(wd_down, bf16, cb_n_dense(hp) > 0);
#undef CB_OPT

    kv_bytes = (size_t) b->n_blocks * (size_t) b->base.kv_bytes_per_block;
    {
        char msg[96];

        snprintf(msg, sizeof(msg), "KV cache (%d blocks, %zu MiB)",
                 b->n_blocks, kv_bytes >> 20);
        CB_CUDA(cudaMalloc(&b->kv, kv_bytes), msg);
    }
    CB_CUDA(cudaMemsetAsync(b->kv, 0, kv_bytes, b->stream), "KV memset");

    cb_ws_layout(hp, b->cap, b->n_blocks, &sl);
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
    b->margin = (float *) (s + sl.margin);
    b->rlogits = (float *) (s + sl.rlogits);
    b->d_ecounts = (int64_t *) (s + sl.ecounts);
    b->att_part = (float *) (s + sl.att_part);
    CB_CUDA(cudaMemsetAsync(b->d_ecounts, 0, (size_t) hp->n_layers
                            * hp->n_experts * 8, b->stream), "counts memset");
    /* dense layers of an MoE model never route: margin 1 for good */
    for (int l = 0; l < hp->n_layers; l++) {
        if (b->dense_slot[l] >= 0
            && moe_cuda_fill_random_f32(b->margin + (size_t) l * b->cap,
                                        b->cap, 0, 0.0f, 1.0f, b->stream)
               != MOE_OK)
        {
            cb_err(err, errlen, "cuda backend: margins: %s",
                   moe_cuda_last_error());
            return MOE_EBACKEND;
        }
    }
    b->xe = (bf16 *) (s + sl.xe);
    b->gu = (float *) (s + sl.gu);
    b->hbuf = (bf16 *) (s + sl.hbuf);
    b->ye = (float *) (s + sl.ye);
    b->xlast = (bf16 *) (s + sl.xlast);
    b->logits = (float *) (s + sl.logits);
    b->d_stage = (int32_t *) (s + sl.stage);
    b->stage_ints = sl.stage_ints;
    b->bt_cap = sl.bt_cap;

    CB_CUDA(cudaMallocHost(&b->h_stage, sl.stage_ints * sizeof(int32_t)),
            "pinned staging");
    CB_CUDA(cudaMallocHost(&b->h_counts,
                           (size_t) (hp->n_experts + 1) * sizeof(int32_t)),
            "pinned counts");
    CB_CUDA(cudaMallocHost(&b->h_logits, (size_t) CB_LOGIT_ROWS
                                         * hp->vocab_size * sizeof(float)),
            "pinned logits");
#undef CB_CUDA

    b->out_seq = (int *) calloc((size_t) b->cap, sizeof(int));
    b->expert_counts = (int64_t *) calloc((size_t) hp->n_layers
                                          * hp->n_experts, sizeof(int64_t));
    if (b->out_seq == NULL || b->expert_counts == NULL) {
        cb_err(err, errlen, "cuda backend: out of host memory");
        return MOE_ENOMEM;
    }
    return MOE_OK;
}


static int
cb_create(const moe_hparams_t *hp, const moe_weights_t *w, uint64_t seed,
    int n_blocks, int block_size, int cap, int device, moe_backend_t **out,
    char *err, size_t errlen)
{
    cuda_backend_t *b;
    int             rc, ndev;

    *out = NULL;
    rc = cb_check_shapes(hp, block_size, cap, err, errlen);
    if (rc == MOE_OK) {
        rc = cb_check_arch(hp, err, errlen);
    }
    if (rc == MOE_OK && w != NULL) {
        rc = cb_check_weights(hp, w, err, errlen);
    }
    if (rc != MOE_OK) {
        return rc;
    }
    if (n_blocks <= 0 || (int64_t) n_blocks * block_size > (1 << 30)) {
        cb_err(err, errlen, "cuda backend: bad KV pool (%d blocks of %d)",
               n_blocks, block_size);
        return MOE_EINVAL;
    }
    ndev = moe_cuda_device_count();
    if (device < 0 || device >= ndev) {
        cb_err(err, errlen, "cuda backend: no CUDA device %d (%d found)",
               device, ndev);
        return MOE_EBACKEND;
    }

    b = (cuda_backend_t *) calloc(1, sizeof(*b));
    if (b == NULL) {
        cb_err(err, errlen, "cuda backend: out of memory");
        return MOE_ENOMEM;
    }
    b->hp = *hp;
    if (w != NULL && w->lm_head == w->embed) {
        b->hp.tie_embeddings = 1;
    }
    b->device = device;
    b->n_blocks = n_blocks;
    b->block_size = block_size;
    b->cap = cap;
    b->K = hp->n_experts > 1 ? hp->top_k : 1;
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
    b->base.kv_bytes_per_block = cb_kv_bytes_per_block(hp, block_size);
    b->base.forward = cb_forward;
    b->base.expert_counts = cb_expert_counts;
    b->base.destroy = cb_destroy;
    {
        const char *ev = getenv("MOE_CUDA_GRAPHS");
        const char *gv = getenv("MOE_CUDA_GEMV_MAX_T");

        b->use_graphs = ev == NULL || strcmp(ev, "0") != 0;
        /* GEMV vs per-expert cuBLAS crossover (run 2 vs run 1): mixtral
         * (E 8) b64 experts 33.8 ms GEMV vs 25.4 ms cuBLAS, b32 GEMV 27.5;
         * olmoe (E 64) b256 cuBLAS 19.0 ms (128 launches + sync per
         * layer) vs GEMV b128 5.0 ms: many experts keep the GEMV longer */
        b->gemv_max_t = gv != NULL ? atoi(gv)
                        : hp->n_experts == 1 ? 128
                        : hp->n_experts > 16 ? 256 : 32;
    }

    rc = cb_alloc(b, err, errlen);
    if (rc == MOE_OK) {
        rc = w != NULL ? cb_load_weights(b, w) : cb_random_weights(b, seed);
        if (rc != MOE_OK) {
            cb_err(err, errlen, "cuda backend: weights: %s",
                   moe_cuda_last_error());
        }
    }
    if (rc == MOE_OK && cudaStreamSynchronize(b->stream) != cudaSuccess) {
        cb_err(err, errlen, "cuda backend: %s",
               cudaGetErrorString(cudaGetLastError()));
        rc = MOE_EBACKEND;
    }
    if (rc != MOE_OK) {
        cb_destroy(&b->base);
        return rc;
    }
    *out = &b->base;
    return MOE_OK;
}


extern "C" int
moe_cuda_backend_create(const moe_model_t *m, int n_blocks, int block_size,
    int max_batched_tokens, int device, moe_backend_t **out, char *err,
    size_t errlen)
{
    const moe_weights_t *w;

    *out = NULL;
    if (m == NULL || (w = moe_model_weights(m)) == NULL) {
        cb_err(err, errlen, "cuda backend: no model weights");
        return MOE_EINVAL;
    }
    return cb_create(moe_model_hparams(m), w, 0, n_blocks, block_size,
                     max_batched_tokens, device, out, err, errlen);
}


extern "C" int
moe_cuda_backend_create_random(const moe_hparams_t *hp, uint64_t seed,
    int n_blocks, int block_size, int max_batched_tokens, int device,
    moe_backend_t **out, char *err, size_t errlen)
{
    *out = NULL;
    if (hp == NULL) {
        cb_err(err, errlen, "cuda backend: no hparams");
        return MOE_EINVAL;
    }
    if (cb_has_extras(hp)) {
        cb_err(err, errlen, "cuda backend: random weights only for the "
               "Llama/Mistral/Mixtral feature set (%s)", hp->arch_name);
        return MOE_EUNSUPPORTED;
    }
    return cb_create(hp, NULL, seed, n_blocks, block_size,
                     max_batched_tokens, device, out, err, errlen);
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
        b->ev_cap = 16 * b->hp.n_layers + 64 + 2 * (b->cap / CB_LOGIT_ROWS);
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
    if (T <= CB_DENSE_GEMV_T && moe_cuda_gemv_supported(Kd, ldx)) {
        return moe_cuda_gemv((const moe_bf16_t *) X, ldx, NULL, 1,
                             (const moe_bf16_t *) W, N, Kd, NULL, 1, T, T, 0,
                             Y, NULL, ldy, b->stream);
    }
    return moe_cuda_gemm(b->blas, T, N, Kd, (const moe_bf16_t *) X, ldx,
                         (const moe_bf16_t *) W, Kd, Y, ldy, 0, 0.0f);
}


/* Whether the MoE FFN of a T-token step runs without a host sync. */
static int
cb_ffn_gemv(const cuda_backend_t *b, int T)
{
    return T <= b->gemv_max_t && moe_cuda_gemv_supported(b->hp.dim, b->hp.dim)
           && moe_cuda_gemv_supported(b->hp.ffn_dim, b->hp.ffn_dim);
}


/* The model's norm (RMSNorm, or LayerNorm with bias when norm_layer),
 * fused with the residual add: moe_cuda_add_rmsnorm's contract. */
static int
cb_norm(cuda_backend_t *b, const float *delta, const int32_t *rows,
    int n_rows, const float *w, const float *bias, bf16 *out, float *out_f32)
{
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
 * (gated == 0, wgu holds the F up rows only): down(act(up x + bu)) + bd.
 * wgu (gated ? 2F : F, dim) rows gate | up; wd (dim, F); biases may be
 * NULL.  Plain SwiGLU keeps the fused GEMV (small T) / cuBLAS path.
 */
static int
cb_mlp(cuda_backend_t *b, int T, const bf16 *wgu, const bf16 *wd, int F,
    int gated, const float *bg, const float *bu, const float *bd,
    float *out)
{
    const moe_hparams_t *hp = &b->hp;
    int                  D = hp->dim, G = gated ? 2 * F : F;
    cudaStream_t         s = b->stream;

    if (gated && hp->act == MOE_ACT_SILU && bg == NULL && bu == NULL) {
        if (T <= CB_DENSE_GEMV_T && T <= b->gemv_max_t
            && moe_cuda_gemv_supported(D, D)
            && moe_cuda_gemv_supported(F, F))
        {
            MOE_TRY(moe_cuda_gemv((moe_bf16_t *) b->xb, D, NULL, 1,
                                  (const moe_bf16_t *) wgu, F, D, NULL, 1, T,
                                  T, 1, NULL, (moe_bf16_t *) b->hbuf, F, s));
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
    MOE_TRY(cb_linear(b, T, D, F, b->hbuf, F, wd, out, D));
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
    size_t               D = (size_t) hp->dim, FS;

    if (hp->shared_ffn_dim <= 0) {
        return MOE_OK;
    }
    FS = (size_t) hp->shared_ffn_dim;
    /* ye is free once the routed rows are summed into tmp */
    MOE_TRY(cb_mlp(b, T, b->ws_gu + (size_t) l * 2 * FS * D,
                   b->ws_down + (size_t) l * D * FS, (int) FS, 1, NULL, NULL,
                   NULL, b->ye));
    MOE_TRY(moe_cuda_sigmoid_gate_add(b->tmp, b->ye, (int) D, b->xf,
                                      b->ws_gate_inp + (size_t) l * D, T,
                                      (int) D, b->stream));
    return cb_mark(b, MOE_CUDA_ST_EXPERT);
}


static int
cb_ffn(cuda_backend_t *b, int l, int T)
{
    const moe_hparams_t *hp = &b->hp;
    int                  D = hp->dim, F = hp->ffn_dim, E = hp->n_experts;
    int                  K = b->K, e, r0;
    cudaStream_t         s = b->stream;

    if (b->dense_slot[l] >= 0) {
        /* a dense layer of an MoE model (mlp_only_layers) */
        size_t FD = (size_t) hp->dense_ffn_dim, k = (size_t) b->dense_slot[l];

        MOE_TRY(cb_mlp(b, T, b->wd_gu + k * 2 * FD * D,
                       b->wd_down + k * D * FD, (int) FD, 1, NULL, NULL,
                       NULL, b->tmp));
        return cb_mark(b, MOE_CUDA_ST_EXPERT);
    }
    if (E == 1) {
        MOE_TRY(cb_mlp(b, T, b->w_gu + (size_t) l * b->G * D,
                       b->w_down + (size_t) l * D * F, F, !hp->ffn_ungated,
                       b->b_gu != NULL && !hp->ffn_ungated
                       ? b->b_gu + (size_t) l * 2 * F : NULL,
                       b->b_gu != NULL ? b->b_gu + (size_t) l * 2 * F + F
                                       : NULL,
                       b->b_down != NULL ? b->b_down + (size_t) l * D : NULL,
                       b->tmp));
        MOE_TRY(cb_mark(b, MOE_CUDA_ST_EXPERT));
        return cb_shared(b, l, T);
    }

    int32_t *sel = b->sel + (size_t) l * b->cap * K;

    MOE_TRY(moe_cuda_route(b->xf, T, D, b->router + (size_t) l * E * D, E, K,
                           !hp->router_no_renorm, b->rlogits, sel, b->selw,
                           b->margin + (size_t) l * b->cap, s));
    MOE_TRY(moe_cuda_moe_permute(sel, T * K, E, b->offs, b->erow,
                                 b->slot_of, b->d_ecounts + (size_t) l * E,
                                 s));
    if (cb_ffn_gemv(b, T)) {
        /* tile for twice the mean rows per expert: a fuller expert takes
         * another pass over its weights (correct for any count) */
        int avg = (T * K + E - 1) / E, mr = 2 * avg < T ? 2 * avg : T;

        MOE_TRY(cb_mark(b, MOE_CUDA_ST_ROUTE));
        /* gate|up of every expert, rows gathered from xb, SiLU*up fused */
        MOE_TRY(moe_cuda_gemv((moe_bf16_t *) b->xb, D, b->erow, K,
                              (const moe_bf16_t *) (b->w_gu + (size_t) l * E
                                                    * 2 * F * D),
                              F, D, b->offs, E, T * K, mr, 1, NULL,
                              (moe_bf16_t *) b->hbuf, F, s));
        MOE_TRY(moe_cuda_gemv((moe_bf16_t *) b->hbuf, F, NULL, 1,
                              (const moe_bf16_t *) (b->w_down + (size_t) l * E
                                                    * D * F),
                              D, F, b->offs, E, T * K, mr, 0, b->ye, NULL, D,
                              s));
        MOE_TRY(cb_mark(b, MOE_CUDA_ST_EXPERT));
        MOE_TRY(moe_cuda_moe_unpermute(b->ye, D, sel, b->selw, b->slot_of,
                                       T, K, b->tmp, s));
        MOE_TRY(cb_mark(b, MOE_CUDA_ST_ROUTE));
        return cb_shared(b, l, T);
    }

    MOE_CUDA_CHECK(cudaMemcpyAsync(b->h_counts, b->offs,
                                   (size_t) (E + 1) * sizeof(int32_t),
                                   cudaMemcpyDeviceToHost, s));
    MOE_TRY(moe_cuda_moe_gather((moe_bf16_t *) b->xb, D, b->erow, K, T * K,
                                (moe_bf16_t *) b->xe, s));
    MOE_TRY(cb_mark(b, MOE_CUDA_ST_ROUTE));
    MOE_CUDA_CHECK(cudaStreamSynchronize(s));

    /* h_counts holds the offsets: expert e owns rows [h[e], h[e + 1]) */
    for (e = 0; e < E; e++) {
        int n = b->h_counts[e + 1] - b->h_counts[e];

        r0 = b->h_counts[e];
        if (n < 0 || r0 < 0 || r0 + n > T * K) {
            moe_cuda_set_error("expert offsets corrupt (layer %d expert %d: "
                               "%d)", l, e, n);
            return MOE_EBACKEND;
        }
    }
    for (e = 0; e < E; e++) {
        int    n = b->h_counts[e + 1] - b->h_counts[e];
        size_t we = (size_t) l * E + e;

        r0 = b->h_counts[e];
        if (n > 0) {
            MOE_TRY(moe_cuda_gemm(b->blas, n, 2 * F, D,
                                  (moe_bf16_t *) (b->xe + (size_t) r0 * D), D,
                                  (moe_bf16_t *) (b->w_gu + we * 2 * F * D),
                                  D, b->gu + (size_t) r0 * 2 * F, 2 * F, 0,
                                  0.0f));
        }
    }
    MOE_TRY(moe_cuda_silu_mul(b->gu, T * K, F, (moe_bf16_t *) b->hbuf, s));
    for (e = 0; e < E; e++) {
        int    n = b->h_counts[e + 1] - b->h_counts[e];
        size_t we = (size_t) l * E + e;

        r0 = b->h_counts[e];
        if (n > 0) {
            MOE_TRY(moe_cuda_gemm(b->blas, n, D, F,
                                  (moe_bf16_t *) (b->hbuf + (size_t) r0 * F),
                                  F, (moe_bf16_t *) (b->w_down + we * D * F),
                                  F, b->ye + (size_t) r0 * D, D, 0, 0.0f));
        }
    }
    MOE_TRY(cb_mark(b, MOE_CUDA_ST_EXPERT));
    MOE_TRY(moe_cuda_moe_unpermute(b->ye, D, sel, b->selw, b->slot_of, T,
                                   K, b->tmp, s));
    MOE_TRY(cb_mark(b, MOE_CUDA_ST_ROUTE));
    return cb_shared(b, l, T);
}


/*
 * The device work of a step after the staging copy: embedding, the layers,
 * and (n_out <= CB_LOGIT_ROWS only, graph) the final norm and lm_head of
 * the n_out rows into b->logits.  Host-independent given (T, n_out).
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
    int32_t             *d_bt = d_btoff + N;
    size_t               kv_layer = (size_t) b->n_blocks * 2
                                    * b->block_size * b->KVD;
    cudaStream_t         s = b->stream;
    int                  l;

    MOE_TRY(moe_cuda_embed(d_tok, T, (moe_bf16_t *) b->embed, D, b->x, s));
    if (hp->learned_pos) {
        MOE_TRY(moe_cuda_add_pos(b->x, d_pos, T, D, b->pos_embed, s));
    }
    MOE_TRY(cb_mark(b, MOE_CUDA_ST_OTHER));

    for (l = 0; l < L; l++) {
        bf16 *kvl = b->kv + (size_t) l * kv_layer;

        MOE_TRY(cb_norm(b, l == 0 ? NULL : b->tmp, NULL, T,
                        b->attn_norm + (size_t) l * D,
                        hp->norm_layer ? b->attn_norm_b + (size_t) l * D
                                       : NULL, b->xb, NULL));
        MOE_TRY(cb_mark(b, MOE_CUDA_ST_OTHER));
        MOE_TRY(cb_linear(b, T, QKV, D, b->xb, D,
                          b->wqkv + (size_t) l * QKV * D, b->qkv, QKV));
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
        MOE_TRY(moe_cuda_rope_kv(b->qkv, QKV, T, hp->n_heads, hp->n_kv_heads,
                                 hd, d_pos, d_slot,
                                 hp->learned_pos ? 0.0f : hp->rope_theta,
                                 (moe_bf16_t *) kvl, b->block_size, s));
        MOE_TRY(moe_cuda_attention(b->qkv, QKV, T, d_pos, d_seq, d_bt,
                                   d_btoff, (moe_bf16_t *) kvl,
                                   b->block_size, hp->n_heads,
                                   hp->n_kv_heads, hd, hp->sliding_window,
                                   (moe_bf16_t *) b->att, b->att_part, s));
        MOE_TRY(cb_mark(b, MOE_CUDA_ST_ATTENTION));
        MOE_TRY(cb_linear(b, T, D, b->Q, b->att, b->Q,
                          b->wo + (size_t) l * D * b->Q, b->tmp, D));
        if (hp->o_bias) {
            MOE_TRY(moe_cuda_add_bias(b->tmp, D, T, D,
                                      b->bo + (size_t) l * D, s));
        }
        MOE_TRY(cb_mark(b, MOE_CUDA_ST_DENSE));
        MOE_TRY(cb_norm(b, b->tmp, NULL, T, b->ffn_norm + (size_t) l * D,
                        hp->norm_layer ? b->ffn_norm_b + (size_t) l * D
                                       : NULL, b->xb,
                        hp->n_experts > 1 || hp->shared_ffn_dim > 0
                        ? b->xf : NULL));
        MOE_TRY(cb_mark(b, MOE_CUDA_ST_OTHER));
        MOE_TRY(cb_ffn(b, l, T));
    }
    if (n_out > 0 && n_out <= CB_LOGIT_ROWS) {
        MOE_TRY(cb_norm(b, b->tmp, d_rows, n_out, b->final_norm,
                        b->final_norm_b, b->xlast, NULL));
        MOE_TRY(cb_mark(b, MOE_CUDA_ST_OTHER));
        MOE_TRY(cb_linear(b, n_out, hp->vocab_size, D, b->xlast, D,
                          b->lm_head, b->logits, hp->vocab_size));
        MOE_TRY(cb_mark(b, MOE_CUDA_ST_DENSE));
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
        if (b->graphs[i].T == T && b->graphs[i].n_out == n_out) {
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
    b->graphs[b->n_graphs].exec = x;
    b->n_graphs++;
    MOE_CUDA_CHECK(cudaGraphLaunch(x, b->stream));
    return MOE_OK;
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
    cudaStream_t         s = b->stream;
    int                  c0, i, rc = CB_NOGRAPH, one = n_out <= CB_LOGIT_ROWS;

    MOE_CUDA_CHECK(cudaSetDevice(b->device));
    b->n_ev = 0;
    MOE_TRY(cb_mark(b, MOE_CUDA_ST_OTHER));
    MOE_CUDA_CHECK(cudaMemcpyAsync(b->d_stage, b->h_stage,
                                   n_stage * sizeof(int32_t),
                                   cudaMemcpyHostToDevice, s));
    if (b->use_graphs && !b->prof && T <= CB_GRAPH_MAX_T && one
        && (b->hp.n_experts == 1 || cb_ffn_gemv(b, T)))
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
        }
        MOE_CUDA_CHECK(cudaMemcpyAsync(b->h_logits, b->logits,
                                       (size_t) nc * hp->vocab_size
                                       * sizeof(float),
                                       cudaMemcpyDeviceToHost, s));
        MOE_TRY(cb_mark(b, MOE_CUDA_ST_OTHER));
        MOE_CUDA_CHECK(cudaStreamSynchronize(s));
        for (i = 0; i < nc; i++) {
            memcpy(seqs[b->out_seq[c0 + i]].logits,
                   b->h_logits + (size_t) i * hp->vocab_size,
                   (size_t) hp->vocab_size * sizeof(float));
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
    int32_t             *h_bt = h_btoff + N;
    int                  T, s, i, t, n_out, rc;

    if (n < 0 || (n > 0 && seqs == NULL)) {
        return MOE_EINVAL;
    }
    /* validate everything before touching the cache */
    T = 0;
    for (s = 0; s < n; s++) {
        const moe_seq_batch_t *sq = &seqs[s];
        int                    need;

        if (sq->n_tokens <= 0 || sq->tokens == NULL || sq->pos < 0
            || sq->block_table == NULL || sq->n_tokens > (1 << 24)
            || sq->pos > (1 << 30) - sq->n_tokens)
        {
            return MOE_EINVAL;
        }
        need = (sq->pos + sq->n_tokens + b->block_size - 1) / b->block_size;
        if (need > sq->n_blocks) {
            return MOE_EINVAL;
        }
        for (i = 0; i < need; i++) {
            if (sq->block_table[i] < 0 || sq->block_table[i] >= b->n_blocks)
            {
                return MOE_EINVAL;
            }
        }
        for (i = 0; i < sq->n_tokens; i++) {
            if (sq->tokens[i] < 0 || sq->tokens[i] >= hp->vocab_size) {
                return MOE_EINVAL;
            }
        }
        if (hp->learned_pos && sq->pos + sq->n_tokens > hp->max_pos) {
            return MOE_EINVAL;      /* past the position table */
        }
        if (T > b->cap - sq->n_tokens) {
            moe_cuda_set_error("cuda backend: step of more than %d tokens",
                               b->cap);
            moe_log(MOE_LOG_ERROR, "%s", moe_cuda_last_error());
            return MOE_EINVAL;
        }
        T += sq->n_tokens;
        nbt += (size_t) need;
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
        }
        if (sq->logits != NULL) {
            h_rows[n_out] = t - 1;
            b->out_seq[n_out] = s;
            n_out++;
        }
    }

    rc = cb_run(b, seqs, n, T, n_out, 6 * N + nbt);
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


extern "C" int
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
