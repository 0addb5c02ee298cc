/*
 * Quantized checkpoints (engine internal): the quantization_config of a
 * Hugging Face config.json, the packed tensors as the files hold them, and
 * the exact dequantization the CPU backend (and every test) uses.
 *
 * Formats (W is the (N out, K in) weight of a linear layer, as HF stores
 * unquantized weights):
 *
 *   fp8 (quant_method "fp8", transformers' FineGrainedFP8 / vLLM's fp8):
 *     <m>.weight F8_E4M3 (N, K) and either
 *       <m>.weight_scale      F32 scalar ([] or [1])      per tensor, or
 *       <m>.weight_scale_inv  F32/BF16 (ceil(N/bn), ceil(K/bk))  with
 *                             weight_block_size [bn, bk] (e.g. 128x128:
 *                             FP8 Qwen3 / Qwen3-MoE / DeepSeek)
 *     W[n][k] = fp8(q[n][k]) * s  (s the tensor's, or the block's).
 *     <m>.input_scale F32 scalar: activation_scheme "static" (kept, the
 *     CPU reference does not quantize activations).
 *   compressed-tensors, format float-quantized (or naive-quantized) with
 *     weights {num_bits 8, type float, strategy tensor | channel | block}:
 *     <m>.weight F8_E4M3 (N, K), <m>.weight_scale (1) / (N, 1) / blocks.
 *   awq (quant_method "awq", version "gemm", zero_point true, bits 4):
 *     <m>.qweight I32 (K, N/8): int32 j of row k holds columns 8j..8j+7,
 *       column 8j+c in nibble AWQ_NIB[c] (bits 4*AWQ_NIB[c]..+3), with
 *       AWQ_NIB = {0, 4, 1, 5, 2, 6, 3, 7} (AutoAWQ packs in the order
 *       0, 2, 4, 6, 1, 3, 5, 7);
 *     <m>.qzeros I32 (K/G, N/8), packed the same way;
 *     <m>.scales F16 (K/G, N);
 *     W[n][k] = (q[k][n] - z[k/G][n]) * s[k/G][n].
 *   gptq (quant_method "gptq", bits 4; checkpoint_format "gptq" (v1) or
 *     "gptq_v2"):
 *     <m>.qweight I32 (K/8, N): int32 (i, n) holds rows 8i..8i+7 of
 *       column n, row 8i+r in nibble r (bits 4r..4r+3);
 *     <m>.qzeros I32 (n_groups, N/8): column n in nibble n%8 of int32
 *       n/8 (v1 stores zero - 1: the zero is the nibble + 1);
 *     <m>.scales F16 (n_groups, N);
 *     <m>.g_idx I32 (K): the group of input row k (desc_act reorders it;
 *       absent: k / G); n_groups = ceil(K / G);
 *     W[n][k] = (q[k][n] - z[g][n]) * s[g][n], g = g_idx[k].
 *   compressed-tensors, format pack-quantized (config or group), weights
 *     {num_bits 4, type int, strategy group (group_size 32/64/128) or
 *     channel (G = K), symmetric true/false, actorder}, W4A16:
 *     <m>.weight_packed I32 (N, K/8): int32 (n, j) holds k = 8j..8j+7
 *       of row n, k = 8j+i in nibble i, as q + 8 (q in -8..7);
 *     <m>.weight_scale F32/BF16/F16 (N, K/G);
 *     <m>.weight_zero_point I32 (N/8, K/G) when not symmetric: int32
 *       (j, g) holds rows 8j..8j+7, row 8j+i in nibble i, as z + 8;
 *     <m>.weight_g_idx I32 (K) (actorder group; absent: k / G);
 *     <m>.weight_shape I32/I64 [2] = (N, K) (checked when present);
 *     W[n][k] = (q - z) * s[n][g] (z 0 when symmetric), g = g_idx[k]:
 *     GPTQ v2's arithmetic on transposed words.  The packed (GPU) load
 *     converts each tensor to the GPTQ layout (moe_qtensor_ct4_to_gptq).
 *   group_size -1 (one group per column) is taken as G = K.
 *
 * Quantized: the dense projections (q/k/v/o, gate/up/down, the shared
 * expert, the dense MLP layers of an MoE model) and the experts, unless a
 * module matches modules_to_not_convert / ignored_layers (substring) or
 * compressed-tensors' ignore (exact name, or "re:" + a PCRE2 pattern).
 * Embeddings, norms, the router and lm_head stay float (a quantized one
 * is refused: its tensor has a non-float dtype).
 *
 * YAML `quantization` (vLLM's key) must agree with the checkpoint: "awq" /
 * "gptq" need that quant_method; "fp8" needs an fp8 checkpoint (fp8 or
 * compressed-tensors float) or quantizes an unquantized one at load, per
 * output channel (MOE_QL_FP8_CHANNEL, scale = amax(row) / 448).
 */

#ifndef MOE_QUANT_H
#define MOE_QUANT_H

#include <stddef.h>
#include <stdint.h>

#include "moe.h"
#include "model/safetensors.h"

/* quantization_config quant_method */
typedef enum {
    MOE_QM_NONE = 0,
    MOE_QM_FP8,             /* "fp8" */
    MOE_QM_CT_FP8,          /* "compressed-tensors", float 8-bit */
    MOE_QM_AWQ,             /* "awq" */
    MOE_QM_GPTQ,            /* "gptq" */
    MOE_QM_CT_INT4,         /* "compressed-tensors", pack-quantized int4 */
    MOE_QM_FP8_LOAD         /* no quantization_config; YAML fp8: quantized
                               per channel at load */
} moe_qmethod_t;

/* How one quantized tensor is laid out (moe_qtensor_t.layout). */
typedef enum {
    MOE_QL_NONE = 0,
    MOE_QL_FP8_TENSOR,      /* fp8 (N, K), one scale */
    MOE_QL_FP8_CHANNEL,     /* fp8 (N, K), scales (N) */
    MOE_QL_FP8_BLOCK,       /* fp8 (N, K), scales (ceil(N/bn), ceil(K/bk)) */
    MOE_QL_AWQ,             /* 4-bit, see the top of this file */
    MOE_QL_GPTQ,
    MOE_QL_CT4              /* compressed-tensors pack-quantized int4 */
} moe_qlayout_t;

#define MOE_Q_MAX_IGNORE  64

typedef struct {
    moe_qmethod_t  method;
    char           name[32];      /* quant_method as written */
    int            bits;          /* 4 or 8 */
    int            group_size;    /* awq / gptq; -1: per column (G = K) */
    int            block_n;       /* fp8 block: weight_block_size; 0: none */
    int            block_k;
    int            strategy;      /* fp8: MOE_QL_FP8_TENSOR / _CHANNEL /
                                     _BLOCK; 0: by the scale tensor found */
    int            fp8_e5m2;      /* weights are F8_E5M2 (else E4M3) */
    int            desc_act;      /* gptq */
    int            sym;           /* gptq; awq: !zero_point */
    int            gptq_v1;       /* gptq: zeros stored minus one */
    int            static_act;    /* activation_scheme "static" /
                                     input_activations.dynamic false */
    int            n_ignore;
    int            ignore_exact;  /* compressed-tensors: exact / "re:" */
    char           ignore[MOE_Q_MAX_IGNORE][160];
} moe_qconfig_t;

/*
 * One quantized linear weight, pointing into the mapped files (or, for
 * MOE_QM_FP8_LOAD, into buffers alive during the tensor walk's callback
 * only).  rows = N (out), cols = K (in): the logical W it dequantizes to.
 * Pointers may be unaligned; read with memcpy.
 */
typedef struct moe_qtensor {
    moe_qlayout_t  layout;
    const char    *name;          /* <m>.weight or <m>.qweight */
    const char    *file;
    int64_t        rows, cols;
    const void    *qweight;       /* fp8 (N, K) bytes; awq I32 (K, N/8);
                                     gptq I32 (K/8, N); ct4 I32 (N, K/8) */
    int            qdtype;        /* moe_dtype_t of qweight */
    const void    *scales;        /* see the layout */
    int            sdtype;        /* F32, BF16 or F16 */
    int64_t        s_rows, s_cols;/* scales shape as used */
    const void    *zeros;         /* awq / gptq I32 (n_groups, N/8); ct4
                                     I32 (N/8, n_groups) or NULL (sym) */
    const void    *g_idx;         /* gptq / ct4 I32 (K), or NULL: k / G */
    int            group_size;    /* awq / gptq G (>= 1) */
    int            n_groups;
    int            block_n, block_k;
    int            zero_add;      /* gptq v1: 1 */
    float          input_scale;   /* static activations; 0: dynamic */
} moe_qtensor_t;

/*
 * The quantization_config object of config.json (root: its parsed JSON
 * object, struct yajl_val_s *) into q; none: q->method MOE_QM_NONE.  Unknown
 * quant_method, bits other than 4 (awq/gptq) or 8 (fp8), group_size not
 * -1/32/64/128, an AWQ version other than gemm or without zero points,
 * malformed weight_block_size or ignore lists, compressed-tensors other
 * than float-quantized fp8 or pack-quantized int4 W4A16: MOE_EINVAL with
 * "<file>: quantization_config: ..." in err.
 */
struct yajl_val_s;
int moe_qconfig_parse(const struct yajl_val_s *root, const char *file,
    moe_qconfig_t *q, char *err, size_t errlen);

/*
 * Apply the YAML `quantization` value (NULL or "": none) to the parsed
 * config: agreement as vLLM checks it (see the top of this file;
 * "compressed-tensors" takes both its fp8 and int4 formats); "fp8" on
 * an unquantized checkpoint sets MOE_QM_FP8_LOAD.  Disagreement:
 * MOE_EINVAL naming dir and both methods.
 */
int moe_qconfig_request(moe_qconfig_t *q, const char *quantization,
    const char *dir, char *err, size_t errlen);

/* 1 when the module (e.g. "model.layers.0.self_attn.q_proj") stays
 * unquantized by q's ignore list; else 0. */
int moe_qconfig_ignored(const moe_qconfig_t *q, const char *module);

/*
 * Find the quantized form of module `base` (no ".weight") with logical
 * shape (N, K) in st: 1 and *out filled when found and valid, 0 when the
 * module stays float by the ignore list (caller loads <base>.weight as a
 * float tensor), or MOE_EINVAL naming the file, tensor and problem
 * (a float or missing weight for a module the config quantizes, missing
 * scale / zero tensors, wrong shape or dtype, K not divisible by the
 * group, g_idx out of range, N or K below 1, ...).  dir names the model
 * in errors.
 */
int moe_qtensor_find(const moe_st_set_t *st, const moe_qconfig_t *q,
    const char *dir, const char *base, int64_t N, int64_t K,
    moe_qtensor_t *out, char *err, size_t errlen);

/* W (rows x cols, row-major fp32) of a quantized tensor, exactly (fp32
 * products of the decoded code and the scale).  MOE_EINVAL on a bad
 * layout. */
int moe_qtensor_dequant(const moe_qtensor_t *t, float *dst);

/*
 * A compressed-tensors int4 tensor (MOE_QL_CT4) in GPTQ's layout, for the
 * backends that take packed GPTQ weights: *out a MOE_QL_GPTQ tensor of
 * the same values (zeros as stored, v2: zero_add 0; symmetric: zero 8),
 * its qweight, qzeros and scales in one allocation, *mem (the caller frees
 * it after out's last use); g_idx and names as in ct.  Scales become F16
 * when every one is exactly an F16, else stay F32 (the kernels then take
 * the dequantized weights).  MOE_ENOMEM, or MOE_EINVAL for another layout.
 */
int moe_qtensor_ct4_to_gptq(const moe_qtensor_t *ct, moe_qtensor_t *out,
    void **mem);

/* moe_qtensor_ct4_to_gptq's *out without the conversion: every field but
 * the data pointers, which stay ct's (zeros, which the conversion always
 * makes: ct's qweight when ct has none); not in GPTQ's layout: for plans
 * and sizes, never to be read.  MOE_EINVAL for another layout. */
int moe_qtensor_ct4_as_gptq(const moe_qtensor_t *ct, moe_qtensor_t *out);

/* The float of a scale element i (F32, BF16 or F16). */
float moe_q_scale_at(const void *p, int dtype, int64_t i);

/* ---- packing, shared by the quantizer (tools/quantize.c) and tests ---- */

/* fp32 -> fp8 e4m3fn, round to nearest even, saturating at +-448; NaN
 * stays NaN. */
uint8_t moe_f32_to_fp8_e4m3(float f);

/* nibble c (0..7) of a packed word as AWQ orders it: column 8j+c is in
 * nibble moe_awq_nibble[c] */
extern const int moe_awq_nibble[8];

/* 4-bit code of AWQ qweight/qzeros (rows x N/8 int32) at (r, n). */
int moe_awq_get(const void *packed, int64_t N, int64_t r, int64_t n);
/* Pack codes[r * N + n] (0..15) into rows x N/8 int32, AWQ order. */
void moe_awq_pack(const uint8_t *codes, int64_t rows, int64_t N,
    int32_t *out);
/* 4-bit code of GPTQ qweight (K/8 x N int32) at logical (k, n). */
int moe_gptq_get_w(const void *qweight, int64_t N, int64_t k, int64_t n);
/* 4-bit code of compressed-tensors weight_packed (N x K/8 int32) at
 * logical (n, k), and of weight_zero_point (N/8 x n_groups) at (n, g);
 * both as stored: the signed value + 8. */
int moe_ct4_get_w(const void *packed, int64_t K, int64_t n, int64_t k);
int moe_ct4_get_z(const void *zp, int64_t n_groups, int64_t n, int64_t g);
/* out (cols x rows int32) = the transpose of in (rows x cols int32,
 * unaligned): compressed-tensors int4 words <-> GPTQ's. */
void moe_q_transpose_words(const void *in, int64_t rows, int64_t cols,
    int32_t *out);
/* 4-bit code of GPTQ qzeros (groups x N/8 int32) at (g, n). */
int moe_gptq_get_z(const void *qzeros, int64_t N, int64_t g, int64_t n);
/* Pack codes[k * N + n] (K x N) into K/8 x N int32 (GPTQ qweight). */
void moe_gptq_pack_w(const uint8_t *codes, int64_t K, int64_t N,
    int32_t *out);
/* Pack codes[g * N + n] into groups x N/8 int32, sequential nibbles
 * (GPTQ qzeros). */
void moe_gptq_pack_z(const uint8_t *codes, int64_t groups, int64_t N,
    int32_t *out);

#endif /* MOE_QUANT_H */
