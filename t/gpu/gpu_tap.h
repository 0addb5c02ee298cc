/*
 * TAP helpers shared by the GPU tests: a launcher's status and the
 * device's state after it, checked together.
 */
#ifndef MOE_T_GPU_TAP_H
#define MOE_T_GPU_TAP_H

#include <cuda_runtime_api.h>

#include "common.h"
#include "tap.h"

/* 1 when the launcher returned 0 and the device synchronizes cleanly;
 * else a TAP diagnostic naming `what`, the launcher's error and CUDA's. */
static inline int
gu_sync_ok(int rc, const char *what)
{
    cudaError_t e = cudaDeviceSynchronize();

    if (rc != 0 || e != cudaSuccess) {
        TAP_DIAG("%s: rc %d, %s / %s", what, rc, moe_cuda_last_error(),
                 cudaGetErrorString(e));
        return 0;
    }
    return 1;
}

#endif
