/*
 * The per-thread error buffer behind MOE_CUDA_CHECK.
 */

#include <stdarg.h>
#include <stdio.h>

#include "common.cuh"

static thread_local char moe_cuda_err[512];


extern "C" const char *
moe_cuda_last_error(void)
{
    return moe_cuda_err;
}


extern "C" void
moe_cuda_set_error(const char *fmt, ...)
{
    va_list ap;

    va_start(ap, fmt);
    vsnprintf(moe_cuda_err, sizeof(moe_cuda_err), fmt, ap);
    va_end(ap);
}
