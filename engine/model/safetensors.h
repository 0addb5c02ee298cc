/*
 * safetensors reader (engine internal).
 *
 * A tensor set is one or more .safetensors files, each mmapped read-only
 * once.  The JSON header is parsed with yajl and every tensor is indexed by
 * name; lookups are O(1).  F32, F16 and BF16 tensors are accepted (the
 * dtypes Llama/Mistral/Mixtral checkpoints use), and F8_E4M3, F8_E5M2, I32,
 * U8, I8 for quantized checkpoints (model/quant.h); any other dtype fails
 * the open with MOE_EUNSUPPORTED naming the tensor.  Every offset is checked
 * against the file, so a malformed file fails with MOE_EFORMAT and never
 * makes a later read go out of bounds.
 */

#ifndef MOE_SAFETENSORS_H
#define MOE_SAFETENSORS_H

#include <stddef.h>
#include <stdint.h>

#include "moe.h"

#define MOE_ST_MAX_DIMS  4

typedef enum {
    MOE_DT_F32  = 1,
    MOE_DT_F16  = 2,
    MOE_DT_BF16 = 3,
    /* quantized checkpoints (model/quant.h): never a plain float weight */
    MOE_DT_F8_E4M3 = 4,     /* fp8 e4m3fn (bias 7, max 448, no inf) */
    MOE_DT_F8_E5M2 = 5,     /* fp8 e5m2 (bias 15, IEEE-like) */
    MOE_DT_I32 = 6,         /* packed 4-bit weights, zeros, g_idx */
    MOE_DT_U8 = 7,
    MOE_DT_I8 = 8,
    MOE_DT_I64 = 9          /* e.g. compressed-tensors' weight_shape,
                               position_ids buffers */
} moe_dtype_t;

typedef struct {
    const char   *name;       /* tensor name (owned by the set) */
    const char   *file;       /* path of the file holding it (owned) */
    moe_dtype_t   dtype;
    int           n_dims;     /* 0..MOE_ST_MAX_DIMS (0: scalar) */
    int64_t       shape[MOE_ST_MAX_DIMS];
    int64_t       numel;      /* product of shape */
    const void   *data;       /* numel elements inside the mapping; may be
                                 unaligned */
    size_t        nbytes;     /* numel * dtype size */
} moe_st_tensor_t;

typedef struct moe_st_set moe_st_set_t;

/* Bytes per element of a dtype (F32/I32 4, F16/BF16 2, fp8/U8/I8 1). */
size_t moe_dtype_size(moe_dtype_t dt);
/* "F32" "F16" "BF16" "F8_E4M3" "F8_E5M2" "I32" "U8" "I8". */
const char *moe_dtype_name(moe_dtype_t dt);
/* 1 for F32, F16, BF16 (what a plain weight may be). */
int moe_dtype_is_float(moe_dtype_t dt);

/*
 * Open one .safetensors file as a set.  Fails with MOE_EIO (cannot open or
 * map), MOE_EFORMAT ("<file>: ..." or "<file>: tensor 'x': ...": truncated
 * header, bad JSON, offsets outside the file, size not matching the shape,
 * duplicate name) or MOE_EUNSUPPORTED (dtype other than F32/F16/BF16, more
 * than 4 dims).  The `__metadata__` entry is skipped.  Caller closes with
 * moe_st_close().
 */
int moe_st_open_file(const char *path, moe_st_set_t **out, char *err,
    size_t errlen);

/*
 * Open the weights of a Hugging Face model directory: the shards named by
 * model.safetensors.index.json (each opened once; every weight_map entry
 * must be found in its shard), else model.safetensors, else every
 * *.safetensors file in the directory (sorted by name).  A tensor name
 * present in two files is MOE_EFORMAT.  No safetensors at all: MOE_EIO.
 */
int moe_st_open_dir(const char *dir, moe_st_set_t **out, char *err,
    size_t errlen);

/* Unmap and free everything.  NULL is a no-op.  Tensor pointers die. */
void moe_st_close(moe_st_set_t *s);

/* The tensor called `name`, or NULL. */
const moe_st_tensor_t *moe_st_find(const moe_st_set_t *s, const char *name);

/* Number of tensors, and the i-th (0 <= i < count) in file order. */
size_t moe_st_count(const moe_st_set_t *s);
const moe_st_tensor_t *moe_st_at(const moe_st_set_t *s, size_t i);

/* Sum of nbytes of all tensors. */
int64_t moe_st_total_bytes(const moe_st_set_t *s);

/*
 * Convert elements [first, first + n) of t (flattened, row-major) to fp32
 * into dst.  Conversions are exact (subnormals, inf and NaN kept; fp8 as
 * the raw codes' values, unscaled; I32/U8/I8 as integers).  Fails
 * with MOE_EINVAL when the range is outside the tensor.
 */
int moe_st_to_f32(const moe_st_tensor_t *t, int64_t first, int64_t n,
    float *dst);

/*
 * Parse '\0'-terminated JSON text that must be an object (shared with the
 * config.json reader).  Otherwise MOE_EFORMAT with
 * "<path>: <what>not a JSON object[: <yajl message on one line>]".  The
 * caller frees *out with yajl_tree_free().
 */
struct yajl_val_s;
int moe_json_parse_object(const char *text, const char *path,
    const char *what, struct yajl_val_s **out, char *err, size_t errlen);

/* Exact scalar conversions. */
float moe_bf16_to_f32(uint16_t h);
float moe_f16_to_f32(uint16_t h);
/* fp8 e4m3fn / e5m2 codes, exactly (e4m3fn: S.1111.111 is NaN, no inf). */
float moe_fp8_e4m3_to_f32(uint8_t b);
float moe_fp8_e5m2_to_f32(uint8_t b);

#endif /* MOE_SAFETENSORS_H */
