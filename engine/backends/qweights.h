/*
 * Packed (quantized) weights on the CUDA backend, the host-side half:
 * which format each projection of each layer keeps on the device (the
 * plan), the bytes and offsets that takes (the layout the memory budget
 * counts), and how a quantized checkpoint tensor is cut to a
 * tensor-parallel rank's slice on the boundaries its format allows.  No
 * CUDA here: the plan, layout and slicing are unit-tested without a GPU
 * (t/unit/qweights.c); cuda_backend.cu uploads and runs what they say.
 *
 * Formats on the device (the kernels' layouts, kernels/quant_gemv.h):
 *   MOE_WF_BF16  the backend's bf16 layout: a projection group (q|k|v,
 *                gate|up, or one matrix) stacked per expert (count, rows
 *                of the group, K) as before; quantized checkpoint tensors
 *                the kernels cannot take are dequantized into it at upload
 *   MOE_WF_FP8   e4m3 (count, N, K) + fp32 scales: mode MOE_QW_FP8_CHANNEL
 *                (count, N) (per-tensor scales are expanded per row at
 *                upload) or MOE_QW_FP8_BLOCK (count, ceil(N/128),
 *                ceil(K/128)) of 128x128 blocks (bf16 weight_scale_inv
 *                converted to fp32)
 *   MOE_WF_AWQ   qweight (count, K, N/8) i32, qzeros (count, K/G, N/8) i32,
 *                scales (count, K/G, N) f16, as the checkpoint holds them
 *   MOE_WF_GPTQ  qweight (count, K/8, N), qzeros, scales as AWQ's shapes,
 *                g_idx (count, K) i32 when any expert's g_idx is not k / G
 * A packed projection group (q|k|v, gate|up) is stacked like bf16's
 * (moe_qw_stacked) when its parts agree: one matrix of grows outputs per
 * expert, so one launch runs q|k|v, or gate|up with SiLU fused.  fp8:
 * one scale mode (block scales: every part's rows on 128-row boundaries)
 * and K % 16 == 0; per expert the grows rows of e4m3, the scales per
 * channel (grows) or per block row (grows / 128).  4-bit: one group size
 * and zero_bias, no g_idx, every part N % 8 == 0; qweight, qzeros and
 * scales hold the group's grows output columns (a part's columns from
 * its row0 on).  Other groups keep their parts apart, each run by its own
 * GEMV / GEMM into its columns of the fp32 output.  Every part of a group
 * has one format: mixed groups (a module in an ignore list) become bf16.
 */
#ifndef MOE_QWEIGHTS_H
#define MOE_QWEIGHTS_H

#include <stddef.h>
#include <stdint.h>

#include "moe.h"
#include "model/model.h"
#include "model/quant.h"

/* device weight formats (also the dummy loader's / benchmark's choice) */
enum {
    MOE_WF_BF16 = 0,
    MOE_WF_FP8,
    MOE_WF_AWQ,
    MOE_WF_GPTQ,
    MOE_WF_COUNT
};

/* fp8 scale modes: the kernels' MOE_K_FP8_CHANNEL / _BLOCK values */
#define MOE_QW_FP8_CHANNEL  1
#define MOE_QW_FP8_BLOCK    2
#define MOE_QW_BLOCK        128     /* the fp8 block the kernels take */

/* The linear parts of a layer. */
enum {
    MOE_QP_Q = 0, MOE_QP_K, MOE_QP_V, MOE_QP_O,
    MOE_QP_GATE, MOE_QP_UP, MOE_QP_DOWN,         /* routed experts (or the
                                                    MLP of a dense model) */
    MOE_QP_SGATE, MOE_QP_SUP, MOE_QP_SDOWN,      /* shared expert */
    MOE_QP_DGATE, MOE_QP_DUP, MOE_QP_DDOWN,      /* dense layer of an MoE */
    MOE_QP_N
};

typedef struct {
    int8_t   fmt;        /* MOE_WF_* */
    int8_t   mode;       /* fp8: MOE_QW_FP8_CHANNEL / _BLOCK */
    int8_t   zero_bias;  /* gptq: 1 for v1 checkpoints (zero - 1 stored) */
    int8_t   g_idx;      /* gptq: a g_idx per expert is stored */
    int16_t  group;      /* awq / gptq: G */
} moe_qfmt_t;

typedef struct {
    moe_qfmt_t  f[MOE_MAX_LAYERS][MOE_QP_N];
} moe_qplan_t;

/* One part's shape in a layer of (rank-local) hp: present 0 when the
 * layer has no such part; count matrices of (N, K); the group it belongs
 * to is parts [first, first + n) with grows rows stacked when bf16, this
 * part at row offset row0 within the group. */
typedef struct {
    int      present;
    int64_t  N, K;
    int      count;
    int      first, n;
    int64_t  grows, row0;
} moe_qshape_t;

void moe_qw_shape(const moe_hparams_t *hp, int layer, int part,
    moe_qshape_t *s);

/* The part of a moe_wkind_t linear kind, or -1. */
int moe_qw_part_of(int wkind);

/* A plan with every part bf16. */
void moe_qw_plan_bf16(moe_qplan_t *plan);

/*
 * Synthetic weights (load_format dummy, benchmarks): every part of hp in
 * format wfmt (fp8 per-channel scales; awq / gptq group 128, no g_idx)
 * where the kernels take its shape (fp8: K % 16 == 0; 4-bit: N % 8 == 0,
 * K % 128 == 0), else bf16.  MOE_EINVAL for an unknown wfmt.
 */
int moe_qw_plan_uniform(const moe_hparams_t *hp, int wfmt,
    moe_qplan_t *plan);

/* wfmt of a YAML `quantization` value (NULL / "": bf16); -1 unknown. */
int moe_qw_format_by_name(const char *name);
const char *moe_qw_format_name(int wfmt);

/*
 * The plan of a real model for rank `rank` of tp (expert parallel when
 * ep): the packed tensor walk's pieces, each as moe_qw_slice decides
 * (pieces of one part that disagree, and groups whose parts disagree,
 * become bf16; one INFO line per reason).  MOE_EUNSUPPORTED when a
 * quantized tensor does not split on its format's boundaries, or the
 * walk's error; reason in err.
 */
int moe_qw_plan_model(const moe_model_t *m, int tp, int rank, int ep,
    moe_qplan_t *plan, char *err, size_t errlen);

/* Make the groups consistent: a group with a bf16 part is all bf16. */
void moe_qw_plan_settle(const moe_hparams_t *hp, moe_qplan_t *plan);

/* 1 when part p of layer l lies in a stacked group (above): fp8: its
 * expert e at w + e * grows * K bytes (w is at row0), scales at scale +
 * e * moe_qw_fp8_scale_count(mode, grows, K); 4-bit: the tensors of
 * grows columns (w, zeros, scales point at column row0). */
int moe_qw_stacked(const moe_hparams_t *hp, const moe_qplan_t *plan, int l,
    int p);

/* fp32 scales of one fp8 matrix of `rows` rows and K columns in mode
 * (per channel: rows; blocks: ceil(rows / 128) * ceil(K / 128)). */
size_t moe_qw_fp8_scale_count(int mode, int64_t rows, int64_t K);

/* offsets of one part in the weight allocation (0: none) */
typedef struct {
    size_t  w;          /* bf16 group / fp8 bytes / q4 qweight */
    size_t  scale;      /* fp8 fp32 scales */
    size_t  zeros;      /* q4 qzeros */
    size_t  scales;     /* q4 f16 scales */
    size_t  g_idx;      /* gptq */
} moe_qoff_t;

/*
 * Carve every layer's parts from byte offset `off` on (each piece
 * aligned to `align`): o[l * MOE_QP_N + p] (the parts of a bf16 group
 * share its w, each at its row0 rows in).  Returns the end offset.  o may
 * be NULL (sizes only).
 */
size_t moe_qw_layout(const moe_hparams_t *hp, const moe_qplan_t *plan,
    size_t off, size_t align, moe_qoff_t *o);

/* Bytes of the bf16 scratch the tensor-core path dequantizes into: one
 * part's experts (all of them), or one stacked group (a dense one whole;
 * an expert group one expert at a time); the largest; 0 if none. */
size_t moe_qw_scratch_bytes(const moe_hparams_t *hp,
    const moe_qplan_t *plan);

/* Bytes of one part's pieces (count matrices) in format f. */
void moe_qw_part_bytes(const moe_qfmt_t *f, int64_t N, int64_t K,
    int count, size_t *w, size_t *scale, size_t *zeros, size_t *scales,
    size_t *g_idx);

/* ------------------------------------------------------------ slicing */

/* rows of bytes to copy: rows x bytes from base, pitch apart */
typedef struct {
    const void *base;
    int64_t     rows, bytes, pitch;
} moe_qspan_t;

typedef struct {
    moe_qfmt_t            f;        /* fmt MOE_WF_BF16: dequantize */
    const moe_qtensor_t  *q;
    int64_t               r0, c0, N, K;   /* the slice of q's (N, K) */
    moe_qspan_t           w, zeros, scales;   /* raw copies (fp8: w) */
    const void           *g_idx;    /* gptq: K i32 from c0, or NULL (k / G) */
    int64_t               n_scales; /* fp8: fp32 scales (moe_qw_fp8_scales) */
} moe_qslice_t;

/*
 * The slice [r0, r0 + N) x [c0, c0 + K) of quantized tensor q as the
 * kernels take it: MOE_OK with s->f.fmt the device format, or
 * MOE_WF_BF16 with the reason in why (the kernels do not take this
 * layout: fp8 blocks other than 128x128, e5m2, 4-bit scales not f16,
 * shapes the kernels refuse); MOE_EUNSUPPORTED with err when the slice
 * does not fall on the format's boundaries (fp8 blocks of 128, 4-bit
 * groups, 8-column words; GPTQ act-order g_idx along K).
 */
int moe_qw_slice(const moe_qtensor_t *q, int64_t r0, int64_t N, int64_t c0,
    int64_t K, moe_qslice_t *s, char *why, size_t whylen, char *err,
    size_t errlen);

/* fp8 slice: its s->n_scales fp32 scales in the kernels' layout. */
void moe_qw_fp8_scales(const moe_qslice_t *s, float *out);

/* 1 when q (gptq) has a g_idx that is not k / G. */
int moe_qw_gidx_needed(const moe_qtensor_t *q);

#endif /* MOE_QWEIGHTS_H */
