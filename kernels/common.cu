/*
 * The per-thread error buffer behind MOE_CUDA_CHECK; the process-wide
 * programmatic-dependent-launch switch behind moe_launch.
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


static int moe_cuda_pdl = 1;


extern "C" int
moe_cuda_pdl_get(void)
{
    return __atomic_load_n(&moe_cuda_pdl, __ATOMIC_RELAXED);
}


extern "C" void
moe_cuda_pdl_set(int on)
{
    __atomic_store_n(&moe_cuda_pdl, on ? 1 : 0, __ATOMIC_RELAXED);
}
