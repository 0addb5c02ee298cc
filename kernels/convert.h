/* Weight conversion: staged safetensors bytes -> the backend's layout. */
#ifndef MOE_KERNELS_CONVERT_H
#define MOE_KERNELS_CONVERT_H
#include "common.h"
#ifdef __cplusplus
extern "C" {
#endif

/* Source element types (the same values as the engine's moe_dtype_t,
 * checked at compile time by the CUDA backend). */
enum {
    MOE_K_DT_F32  = 1,
    MOE_K_DT_F16  = 2,
    MOE_K_DT_BF16 = 3
};

/*
 * A chunk of a weight piece already on the device: ns source rows from
 * row s0 of the piece on, `used` elements each, row stride ld elements, at
 * src (dtype MOE_K_DT_*); written into dst, whose rows are cols elements
 * long, as bf16 (out_bf16) or fp32.  Source element (s, j) goes to
 * destination element (s0 + s, j), or (j, s0 + s) when transposed (GPT-2
 * Conv1D).  bf16 -> bf16 copies the bits; otherwise the value is widened
 * exactly to fp32, then rounded to nearest even for bf16.  Enqueued on
 * stream.  MOE_K_OK, MOE_K_EINVAL (unknown dtype, negative sizes) or
 * MOE_K_EBACKEND.
 */
int moe_cuda_convert(const void *src, int dtype, int64_t s0, int64_t ns,
    int64_t used, int64_t ld, int transposed, int64_t cols, void *dst,
    int out_bf16, cudaStream_t stream);

#ifdef __cplusplus
}
#endif
#endif
