/*
 * The CUDA backend (one GPU, bf16 weights and KV cache, fp32 accumulation)
 * behind the moe_backend_t interface of backends/backend.h.  Plain C API;
 * one backend is one rank: the whole model, or one tensor-parallel rank's
 * slice (moe_backend_create_ranks composes ranks with tp.c).  Included by
 * engine/backends/ only (and the GPU tests and benchmarks).
 *
 * Device layouts (all in device memory of `device`):
 *   weights, one allocation, bf16 unless noted:
 *     embed      (vocab, dim)
 *     lm_head    (vocab, dim)             aliases embed when tied
 *     per layer, each linear part in its plan's format (qweights.h;
 *     bf16 unless the checkpoint is quantized, or random weights asked
 *     for a format), carved layer by layer:
 *       q|k|v     (q + 2 kv, dim)  stacked when bf16
 *       o         (dim, q)
 *       gate|up   (n_experts, 2 ffn, dim)  rows: gate (w1) | up (w3) when
 *                 bf16; packed: gate and up apart, (n_experts, ffn, dim)
 *       down      (n_experts, dim, ffn)
 *     (absent in the dense layers of an MoE model)
 *     attn_norm, ffn_norm (n_layers, dim) fp32; final_norm (dim) fp32
 *     router     (n_layers, n_experts, dim) fp32 (absent when dense)
 *   optional pieces, present only when their hparams flag asks:
 *     w_gu holds only the ffn up rows per expert when ffn_ungated:
 *                (n_layers, 1, ffn, dim)
 *     pos_embed  (max_pos, dim) fp32           learned_pos
 *     attn_norm_b, ffn_norm_b (n_layers, dim), final_norm_b (dim) fp32
 *                                              norm_layer
 *     bqkv       (n_layers, q + 2 kv) fp32     qkv_bias (bq | bk | bv)
 *     bo         (n_layers, dim) fp32          o_bias
 *     q_norm, k_norm (n_layers, head_dim) fp32 qk_norm
 *     b_gu       (n_layers, 2 ffn) fp32        mlp_bias (b_gate | b_up;
 *                                              gate part 0 when absent)
 *     b_down     (n_layers, dim) fp32          mlp_bias
 *     shared expert gate|up (2 fs, dim), down (dim, fs), per MoE layer
 *                (fs = shared_ffn_dim; parts like the experts')
 *     ws_gate_inp (n_layers, dim) fp32
 *     dense MLP gate|up (2 fd, dim), down (dim, fd) in the dense layers of
 *                an MoE model (fd = dense_ffn_dim)
 *   with q = n_heads * head_dim, kv = n_kv_heads * head_dim.
 *   KV pool: (n_layers, n_blocks, 2, block_size, n_kv_heads, head_dim) bf16,
 *     or e4m3 with kv_cache_dtype fp8 (moe_cuda_backend_create_kv)
 *     (layer outermost, unlike the CPU backend's block-outermost pool; a
 *     block id means the same positions in both).
 *
 * Errors: every function returns a moe status; the CUDA/cuBLAS reason
 * (statement, file:line) goes into err, or for forward() into
 * moe_cuda_last_error() of the calling thread (also logged at
 * MOE_LOG_ERROR).
 */

#ifndef MOE_CUDA_BACKEND_H
#define MOE_CUDA_BACKEND_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#include "backends/backend.h"

/* Profiling stages (moe_cuda_backend_profile). */
enum {
    MOE_CUDA_ST_ATTENTION = 0,   /* rope + KV write + attention */
    MOE_CUDA_ST_ROUTE,           /* router, top-k, permute, un-permute */
    MOE_CUDA_ST_EXPERT,          /* expert (or dense FFN) GEMMs + SiLU */
    MOE_CUDA_ST_DENSE,           /* qkv, o, lm_head GEMMs */
    MOE_CUDA_ST_OTHER,           /* embed, norms, copies */
    MOE_CUDA_ST_COMM,            /* the all-reduces between ranks (NCCL or
                                    the local sum; waiting for the other
                                    ranks included) */
    MOE_CUDA_N_STAGES
};

/*
 * Whether the backend can run a model of these hparams (shapes and
 * architecture flags; no device is touched): 1, or 0 with the one-line
 * reason in why (may be NULL).
 */
int moe_cuda_supports(const moe_hparams_t *hp, char *why, size_t n);

/* Number of CUDA devices; 0 when there is no driver or GPU (never fails). */
int moe_cuda_device_count(void);

/* 1 if the kernels of this build run on CUDA device `device`; else 0 with
 * the one-line reason in why (n bytes; may be NULL): no such device, or
 * its compute capability is not the one the kernels were built for
 * (sm_90a).  Leaves the thread's current device as it was. */
int moe_cuda_device_runnable(int device, char *why, size_t n);

/* The last CUDA failure recorded on this thread ("" if none). */
const char *moe_cuda_last_error(void);

/*
 * Create the backend on `device` from the model's mapped safetensors
 * (moe_model_open() or moe_model_load(); the fp32 host copy is never
 * read): every piece of moe_model_for_each_tensor() goes through two
 * pinned staging buffers (64 MiB each, double-buffered) to the device and
 * is converted there (bf16 matrices, fp32 norms / biases / router, from
 * F32, F16 or BF16).  Progress (every 10%, models of 1 GiB and more) and
 * the total (GB, seconds, GB/s) are logged at MOE_LOG_INFO.  KV pool of
 * n_blocks pages of block_size tokens, workspaces for up to
 * max_batched_tokens tokens per forward() (a larger step fails with
 * MOE_EINVAL).  The model must outlive the backend only during this call
 * (the weights are copied).  Fails with MOE_EUNSUPPORTED (shape),
 * MOE_ENOMEM (device memory), MOE_EINVAL (a model without tensors:
 * moe_model_load_config()) or MOE_EBACKEND, reason in err.
 */
int moe_cuda_backend_create(const moe_model_t *m, int n_blocks,
    int block_size, int max_batched_tokens, int device, moe_backend_t **out,
    char *err, size_t errlen);

/* The KV cache's element, chosen when the backend is created. */
typedef struct {
    int          fp8;        /* 1: e4m3 (kv_cache_dtype fp8); 0: bf16 */
    const float *k_scales;   /* fp8: each layer's per-tensor K / V scale */
    const float *v_scales;   /* (n_layers, > 0; NULL: 1.0), copied */
} moe_cuda_kv_t;

/*
 * Every way of creating the backend in one (the other create functions
 * are this with kv NULL): m != NULL: rank `rank` of tp of model m
 * (moe_cuda_backend_create_rank_ep; hp, wfmt and seed unused); m NULL:
 * random weights of hp in format wfmt from seed
 * (moe_cuda_backend_create_random_fmt).  kv (NULL: bf16): with kv->fp8
 * the pool holds n_blocks blocks of e4m3 elements, half the bytes of bf16
 * ones, so the same memory holds twice the blocks (size n_blocks with
 * moe_cuda_kv_blocks_for_rank / _fmt given kv_fp8 1); K / V written as
 * e4m3(x / scale) (moe_cuda_rope_kv_fp8), read by moe_cuda_attention_ex;
 * (*out)->kv_bytes_per_block tells the block's bytes.  MOE_EINVAL also
 * for a scale that is not finite and > 0.
 */
int moe_cuda_backend_create_kv(const moe_model_t *m, const moe_hparams_t *hp,
    int wfmt, uint64_t seed, int tp, int rank, int ep, int n_blocks,
    int block_size, int max_batched_tokens, int device,
    const moe_cuda_kv_t *kv, moe_backend_t **out, char *err, size_t errlen);

/*
 * The same with synthetic bf16 weights generated on the GPU from `seed`
 * (benchmarks): uniform values scaled by 1/sqrt(fan_in), norms 1.  Only
 * the Llama/Mistral/Mixtral feature set (MOE_EUNSUPPORTED for any of the
 * optional hparams flags).
 */
int moe_cuda_backend_create_random(const moe_hparams_t *hp, uint64_t seed,
    int n_blocks, int block_size, int max_batched_tokens, int device,
    moe_backend_t **out, char *err, size_t errlen);

/*
 * Rank `rank` of a tensor-parallel split into tp ranks (tp 1, rank 0:
 * moe_cuda_backend_create): the rank's slice of the weights read straight
 * from the files (moe_model_for_each_tensor_shard; hparams as
 * moe_hparams_shard), a KV pool of n_blocks blocks of the rank's kv heads.
 * Its o_proj and FFN outputs are partial sums: give it the all-reduce
 * with moe_cuda_backend_set_reduce (moe_tp_backend_wrap does).  Steps of
 * a rank with a reduce run without CUDA graphs.  Fails as
 * moe_cuda_backend_create, or MOE_EUNSUPPORTED when tp does not divide
 * the model.
 */
int moe_cuda_backend_create_rank(const moe_model_t *m, int tp, int rank,
    int n_blocks, int block_size, int max_batched_tokens, int device,
    moe_backend_t **out, char *err, size_t errlen);

/*
 * The same with expert parallelism when ep != 0 and tp > 1
 * (moe_hparams_shard_ep): the rank holds experts [rank * E / tp, (rank +
 * 1) * E / tp) whole (read by moe_model_for_each_tensor_shard_ep), routes
 * over all E and computes only its experts' rows; the other rows of its
 * FFN output are 0 before the all-reduce.  MOE_EUNSUPPORTED when tp does
 * not divide the experts or the heads.
 */
int moe_cuda_backend_create_rank_ep(const moe_model_t *m, int tp, int rank,
    int ep, int n_blocks, int block_size, int max_batched_tokens, int device,
    moe_backend_t **out, char *err, size_t errlen);

/*
 * Random weights in a weight format (backends/qweights.h MOE_WF_BF16,
 * _FP8, _AWQ, _GPTQ; load_format dummy with `quantization`, benchmarks):
 * the linear parts packed on the device as a checkpoint of that format
 * would be (fp8: per-channel scales; awq / gptq: group 128, no g_idx;
 * parts whose shapes the kernels do not take stay bf16), generated on the
 * GPU.  tp / rank / ep as moe_cuda_backend_create_random_rank (tp 1, rank
 * 0: one GPU).  MOE_EINVAL for an unknown wfmt; else as
 * moe_cuda_backend_create_random.
 */
int moe_cuda_backend_create_random_fmt(const moe_hparams_t *hp, int wfmt,
    uint64_t seed, int tp, int rank, int ep, int n_blocks, int block_size,
    int max_batched_tokens, int device, moe_backend_t **out, char *err,
    size_t errlen);

/* Random weights (moe_cuda_backend_create_random) for rank `rank` of tp,
 * expert parallel when ep (benchmarks of the collectives: each rank's own
 * random values, so only shapes and timing mean anything). */
int moe_cuda_backend_create_random_rank(const moe_hparams_t *hp,
    uint64_t seed, int tp, int rank, int ep, int n_blocks, int block_size,
    int max_batched_tokens, int device, moe_backend_t **out, char *err,
    size_t errlen);

/*
 * NCCL (built with MOE_HAVE_NCCL: the Makefile found nccl.h and libnccl).
 *
 * moe_cuda_nccl_available: 1 when this build has NCCL.
 * moe_cuda_nccl_attach: one communicator over the n ranks' devices
 *   (distinct; single process, ncclCommInitAll) with NCCL_NVLS_ENABLE=0
 *   set unless the environment has it (other NCCL_* variables are the
 *   user's), one warm-up all-reduce, then rank r all-reduces its partial
 *   sums with ncclAllReduce (fp32, in place, on its own stream) instead
 *   of the reduce hook, which lets its decode steps run as CUDA graphs
 *   again (the collective is captured).  n == 1 is allowed (an identity
 *   all-reduce: the communicator path on one GPU).  The clique is freed
 *   with the last rank (destroy the ranks in order, as tp.c does).
 *   MOE_EUNSUPPORTED (no NCCL in the build, two ranks on one device),
 *   MOE_EINVAL, MOE_ENOMEM, MOE_EBACKEND (NCCL's reason in err); on
 *   failure no rank is changed.  Caveat: a rank whose step
 *   fails before a collective leaves its peers waiting in it (NCCL has no
 *   timeout unless the user's environment sets one).
 */
int moe_cuda_nccl_available(void);
int moe_cuda_nccl_attach(moe_backend_t **ranks, const int *devices, int n,
    char *err, size_t errlen);

/*
 * The all-reduce ops of CUDA ranks (moe_tp_backend_wrap): the op context
 * of a rank is its backend; the sum is moe_cuda_tp_sum (kernels/tp_sum.h)
 * on the rank's stream reading the other ranks' device buffers, the sum
 * buffer cudaMalloc'ed on the current device.  Static, never NULL.
 */
const moe_tp_ops_t *moe_cuda_tp_ops(void);

/*
 * Enable peer access between every two of the n devices that differ (ranks
 * on different GPUs read each other's partial sums).  MOE_EINVAL (a device
 * out of range) or MOE_EUNSUPPORTED (no peer access: NVLink or PCIe P2P
 * missing), reason in err.  The calling thread's current device changes.
 */
int moe_cuda_peer_access(const int *devices, int n, char *err,
    size_t errlen);

/* A CUDA rank calls fn(ctx, partial, T * dim) at those two points. */
void moe_cuda_backend_set_reduce(moe_backend_t *b, moe_reduce_fn fn,
    void *ctx);

/* Device bytes of the weights and of the workspaces for these shapes
 * (bf16 weights; _fmt: the linear parts in weight format wfmt as
 * moe_cuda_backend_create_random_fmt lays them out, packed bytes and
 * scales counted, the dequantization scratch in the workspaces; -1 for
 * an unknown wfmt). */
int64_t moe_cuda_weight_bytes(const moe_hparams_t *hp);
int64_t moe_cuda_workspace_bytes(const moe_hparams_t *hp,
    int max_batched_tokens);
int64_t moe_cuda_weight_bytes_fmt(const moe_hparams_t *hp, int wfmt);
int64_t moe_cuda_workspace_bytes_fmt(const moe_hparams_t *hp, int wfmt,
    int max_batched_tokens);

/*
 * KV pool size for `device`: blocks that fit in
 * total * gpu_memory_utilization - (memory in use now) - weights -
 * workspaces - 256 MiB slack.  Call before creating the backend.
 * MOE_ENOMEM (with the numbers in err) when not even one block fits.
 * The first two count bf16 blocks; _fmt and _rank count e4m3 ones (half
 * the bytes, about twice as many) when kv_fp8 is 1.
 */
int moe_cuda_kv_blocks_for(const moe_model_t *m, int block_size,
    int max_batched_tokens, double gpu_memory_utilization, int device,
    int *n_blocks, char *err, size_t errlen);
int moe_cuda_kv_blocks_for_hp(const moe_hparams_t *hp, int block_size,
    int max_batched_tokens, double gpu_memory_utilization, int device,
    int *n_blocks, char *err, size_t errlen);
/* ... with the weights in format wfmt (random weights), or as rank `rank`
 * of tp (expert parallel when ep) of model m holds them (the packed
 * layouts its checkpoint keeps on the device, qweights.h): an fp8 / 4-bit
 * model gets the KV blocks its smaller weights leave free. */
int moe_cuda_kv_blocks_for_fmt(const moe_hparams_t *hp, int wfmt,
    int block_size, int kv_fp8, int max_batched_tokens,
    double gpu_memory_utilization, int device, int *n_blocks, char *err,
    size_t errlen);
int moe_cuda_kv_blocks_for_rank(const moe_model_t *m, int tp, int rank,
    int ep, int block_size, int kv_fp8, int max_batched_tokens,
    double gpu_memory_utilization, int device, int *n_blocks, char *err,
    size_t errlen);

/*
 * A reload beside the old worker (cuda_share.h): when a live worker serves
 * the weights a one-rank backend of hp would hold (m NULL: load_format
 * dummy with seed and weight format wfmt, qweights.h), the KV pool it
 * sized, in blocks of block_size for hp (e4m3 blocks when kv_fp8)
 * (MOE_OK, *n_blocks); else MOE_EIO.  The backend created with that many
 * blocks imports the weights and grows its pool as the old one exits.
 */
int moe_cuda_share_kv_hint(const moe_hparams_t *hp, const moe_model_t *m,
    int wfmt, uint64_t seed, int device, int block_size, int kv_fp8,
    int *n_blocks);

/*
 * Stage timing for benchmarks: enable != 0 turns it on (events recorded at
 * stage boundaries of each forward, GPU time between boundaries summed per
 * stage, launch gaps included); ms (may be NULL) receives the sums since
 * the last call, which are then reset.  Not thread-safe with forward().
 */
int moe_cuda_backend_profile(moe_backend_t *b, int enable,
    double ms[MOE_CUDA_N_STAGES]);

/*
 * Tests: the router margins of the last forward's T tokens, out (L, T):
 * out[l * T + t] = k-th minus (k+1)-th router probability of token t at
 * layer l (1 for dense models).  Synchronises.  MOE_EINVAL when T is not
 * the last step's token count.
 */
int moe_cuda_backend_route_margins(moe_backend_t *b, int T, float *out);

/*
 * Tests: the experts the last forward() chose, in the layout of
 * moe_cpu_backend_force_routing (backends/backend.h): experts (n_tokens,
 * n_layers, top_k), tokens in step order, each token's experts in
 * descending router probability, -1 on layers that do not route (dense
 * models, layer_dense layers).  Synchronises.  MOE_EINVAL when n_tokens is
 * not the last step's token count; MOE_EBACKEND (reason in
 * moe_cuda_last_error()) or MOE_ENOMEM.
 */
int moe_cuda_backend_last_routing(moe_backend_t *b, int32_t *experts,
    int n_tokens);

/*
 * Tests: how many layers' routed experts ran as the fused fp8 prefill FFN
 * (unscaled gate|up GEMM, SwiGLU quantized straight for the down GEMM)
 * since b was created.
 */
int64_t moe_cuda_backend_fp8_ffn_layers(moe_backend_t *b);

/* Tests: how many of those ran their two GEMMs as the grouped GEMM
 * (kernels/fp8_grouped.h; the tuning knob fp8_grouped). */
int64_t moe_cuda_backend_fp8_grouped_layers(moe_backend_t *b);

/* Tests: 4-bit GEMV launches that read tiled weights (the tuning knob
 * q4_layout 2 or 3; kernels/quant_gemv.h "Tiled 4-bit weights") since b was
 * created (graph replays not counted: the launches are recorded once). */
int64_t moe_cuda_backend_q4_tiled_calls(moe_backend_t *b);

/* Tests: 4-bit GEMV launches by quantization group (kernels/q4_group.cu;
 * the tuning knob q4_gemv) since b was created (graph replays not
 * counted). */
int64_t moe_cuda_backend_q4g_calls(moe_backend_t *b);

/* Tests: ... of them with row hints above 16, on the warpgroup kernel
 * (kernels/q4_wgmma.cu). */
int64_t moe_cuda_backend_q4w_calls(moe_backend_t *b);

/*
 * Benchmarks: how evenly the routing spread the rows of the steps that
 * ran the experts per expert (prefill-sized steps: the per-expert GEMM
 * path, after its host sync, and the fp8 grouped GEMM, whose offsets are
 * copied behind the step only while stage profiling is on:
 * moe_cuda_backend_profile), since the last call, which resets them.
 * st[0] layer runs, st[1] rows (tokens x top_k), st[2] / st[3] the sums
 * of each run's largest / smallest expert row count, st[4 + i] experts
 * given 64 i .. 64 i + 63 rows (the last bucket: that many or more).
 */
#define MOE_CUDA_ROW_STATS 36
void moe_cuda_backend_expert_rows(moe_backend_t *b,
    int64_t st[MOE_CUDA_ROW_STATS]);

#ifdef __cplusplus
}
#endif

#endif /* MOE_CUDA_BACKEND_H */
