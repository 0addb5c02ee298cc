/*
 * CUDA kernels: what every launcher shares (C ABI).
 *
 * Every moe_cuda_*() launcher returns MOE_K_OK or MOE_K_EBACKEND; on failure the
 * failing statement, file, line and CUDA/cuBLAS message are recorded in a
 * per-thread buffer that moe_cuda_last_error() returns.  Launchers only
 * enqueue work on the given stream; they never synchronise, allocate or
 * exit.
 */

#ifndef MOE_KERNELS_COMMON_H
#define MOE_KERNELS_COMMON_H

#include <stdint.h>
#include <cuda_runtime_api.h>

/*
 * Launcher status codes.  kernels/ includes nothing from the engine: these
 * carry the same values as the engine's MOE_OK, MOE_EINVAL,
 * MOE_EUNSUPPORTED and MOE_EBACKEND (the CUDA backend checks that at
 * compile time), so a launcher's status passes up unchanged.
 */
enum {
    MOE_K_OK           =  0,
    MOE_K_EINVAL       = -1,   /* bad argument */
    MOE_K_EUNSUPPORTED = -6,   /* shape or feature the kernel lacks */
    MOE_K_EBACKEND     = -9    /* CUDA / cuBLAS failure (see last_error) */
};

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

/* Programmatic dependent launch for every launcher (default on; the CUDA
 * backend sets it from its tuning record).  Process-wide. */
void moe_cuda_pdl_set(int on);
int moe_cuda_pdl_get(void);

#ifdef __cplusplus
}
#endif

#endif /* MOE_KERNELS_COMMON_H */
