/*
 * CUDA kernels: what every launcher shares (C ABI).
 *
 * Every moe_cuda_*() launcher returns MOE_OK or MOE_EBACKEND; on failure the
 * failing statement, file, line and CUDA/cuBLAS message are recorded in a
 * per-thread buffer that moe_cuda_last_error() returns.  Launchers only
 * enqueue work on the given stream; they never synchronise, allocate or
 * exit.
 */

#ifndef MOE_KERNELS_COMMON_H
#define MOE_KERNELS_COMMON_H

#include <stdint.h>
#include <cuda_runtime_api.h>

/* bf16 values as raw bits in the C ABI (__nv_bfloat16 on the device). */
typedef uint16_t moe_bf16_t;

#ifdef __cplusplus
extern "C" {
#endif

/* The last recorded failure of this thread ("" if none).  Never NULL. */
const char *moe_cuda_last_error(void);

/* Record a failure reason (printf format) for this thread. */
void moe_cuda_set_error(const char *fmt, ...)
    __attribute__((format(printf, 1, 2)));

#ifdef __cplusplus
}
#endif

#endif /* MOE_KERNELS_COMMON_H */
