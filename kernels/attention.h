/* Paged causal attention (decode and prefill, GQA, sliding window). */
#ifndef MOE_KERNELS_ATTENTION_H
#define MOE_KERNELS_ATTENTION_H
#include "common.h"
#include "tuning.h"
#ifdef __cplusplus
extern "C" {
#endif
/*
 * For every query token t (T of them, any mix of sequences) and head h:
 *   out[t, h, :] = softmax_j(q . k_j / sqrt(hd)) v_j  over positions
 *   j in [max(0, p - window + 1) (window > 0) or 0, p], p = tok_pos[t],
 * with k_j, v_j read from the pages of sequence s = tok_seq[t]: position j
 * lives in block bt[bt_off[s] + j / block_size] at offset j % block_size.
 * q: qkv[t * ld + h * hd + d] fp32 (already rotated); head h uses kv head
 * h / (n_heads / n_kv).  kv_layer: (n_blocks, 2, block_size, n_kv, hd)
 * bf16.  out: (T, n_heads * hd) bf16.  K/V of every position attended to
 * must already be in the cache (rope_kv first).
 * Limits (MOE_K_EUNSUPPORTED otherwise, checked here): hd % 8 == 0,
 * hd <= 256, n_heads % n_kv == 0, n_heads / n_kv <= 8.
 * part: fp32 workspace of moe_cuda_attention_ws_floats(n_heads, n_kv, hd)
 * elements, prepared once by moe_cuda_attention_ws_init (every call leaves
 * it ready for the next, graph replays included), or NULL (no key splits):
 * when T * n_kv is small (decode) the keys of each (token, kv head) are
 * split over several blocks whose partial softmax states go there and are
 * merged by the last of those blocks (atomic counters in the workspace).
 * The grid depends on T, n_kv, the device and tune only (never on the
 * positions), so a captured graph stays valid.  One stream at a time per
 * workspace.  tune (NULL: the defaults): att_split_bps sizes the split
 * grid; with att_early and T == 1 the decode kernel reads tok_pos,
 * tok_seq, bt, bt_off and the cache at positions before p before its PDL
 * wait, so the kernel launched right before it may write only q and
 * position p's K/V (as rope_kv does).  Kernels by shape: T * n_kv <= 1024 the decode (key-split)
 * kernels, on tensor cores for hd 64 or 128 (att_decode_tc 0: the SIMT
 * one); above, the tensor-core prefill kernel (T >= 64, hd 64 or 128)
 * and the SIMT prefill kernel for the rest.
 */
int moe_cuda_attention(const float *qkv, int ld, int T,
    const int32_t *tok_pos, const int32_t *tok_seq, const int32_t *bt,
    const int32_t *bt_off, const moe_bf16_t *kv_layer, int block_size,
    int n_heads, int n_kv, int hd, int window, moe_bf16_t *out,
    float *part, const moe_cuda_tuning_t *tune, cudaStream_t stream);

/* ------------------------------------- fp8 KV cache, long contexts */

/*
 * Options of moe_cuda_attention_ex (NULL: a bf16 cache, no context bound):
 * fp8 0: kv_layer is the bf16 cache above; 1: the same layout with e4m3
 * elements (1 byte each), element = value / scale (per-tensor: k_scale
 * for K, v_scale for V, both > 0; kernels/fp8.h rounds as the device
 * does).  max_ctx: an upper bound of the context length (tok_pos + 1) of
 * every token of the step, or 0 if unknown; with max_ctx >=
 * tune->att_long_ctx the decode kernel's grid takes att_long_bps blocks
 * per SM instead of att_split_bps (the split-K grid for long contexts;
 * any value stays correct, so a graph captured with one bound replays
 * correctly with another).  tc_whole: 1 when the caller knows that the
 * tensor-core prefill kernel takes every row tile of the step
 * (moe_cuda_attention_tc_whole on the step's tok_seq said so): the SIMT
 * pass after it, which would find no refused tile, is not launched; 0:
 * unknown (the pass runs and checks on the device).  The hint belongs to
 * one step's tok_seq: a graph replayed with other sequences must be
 * captured with 0.
 */
typedef struct {
    int   fp8;
    float k_scale, v_scale;
    int   max_ctx;
    int   tc_whole;
} moe_cuda_att_kv_t;

/*
 * Host side: 1 if moe_cuda_attention_ex's tensor-core prefill kernel takes
 * every token of a step of T tokens whose sequence ids (in step order) are
 * tok_seq (host memory), for head dim hd and a bf16 cache: T is at least
 * its minimum and no 128-row tile spans more than 4 runs of equal
 * sequence ids; else 0.  The tc_whole hint above.
 */
int moe_cuda_attention_tc_whole(const int32_t *tok_seq, int T, int hd);

/*
 * moe_cuda_attention with a bf16 or an fp8 cache (kvo above).  With an
 * fp8 cache, prefill tokens take the SIMT kernel (the tensor-core prefill
 * kernel reads bf16 only); decode the key-split kernels (tensor cores:
 * e4m3 to f16 operands in registers; SIMT: e4m3 tiles to bf16 in shared
 * memory; both exact), the K scale folded into q and the V scale into
 * the output.  Same limits and workspace.
 * MOE_K_EINVAL for scales <= 0.
 */
int moe_cuda_attention_ex(const float *qkv, int ld, int T,
    const int32_t *tok_pos, const int32_t *tok_seq, const int32_t *bt,
    const int32_t *bt_off, const void *kv_layer, int block_size,
    int n_heads, int n_kv, int hd, int window, moe_bf16_t *out, float *part,
    const moe_cuda_att_kv_t *kvo, const moe_cuda_tuning_t *tune,
    cudaStream_t stream);

/* Floats of the `part` workspace moe_cuda_attention needs (any T). */
int64_t moe_cuda_attention_ws_floats(int n_heads, int n_kv, int hd);

/*
 * Prepare a fresh `part` workspace (zero its split counters; async on
 * stream).  Call once after allocating it, before its first use.
 * Returns MOE_K_OK or MOE_K_EBACKEND (moe_cuda_last_error says why).
 */
int moe_cuda_attention_ws_init(float *part, cudaStream_t stream);

/* 1 if moe_cuda_attention supports these shapes, else 0. */
int moe_cuda_attention_supported(int n_heads, int n_kv, int hd);
#ifdef __cplusplus
}
#endif
#endif
