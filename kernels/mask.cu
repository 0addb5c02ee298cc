/* Row bitmask over fp32 logits (guided decoding). */
#include <math.h>

#include "common.cuh"
#include "mask.h"

#define MASK_THREADS 256


/* one thread per mask word: its 32 ids; blockIdx.y is the row */
__global__ void
kernel_mask_rows(float *logits, int64_t ld, int V, const uint32_t *mask,
    int64_t mask_ld)
{
    moe_pdl_enter();
    int64_t   w = (int64_t) blockIdx.x * blockDim.x + threadIdx.x;
    int64_t   id0 = w * 32;
    float    *row = logits + (int64_t) blockIdx.y * ld;
    uint32_t  m;
    int       k;

    if (id0 >= V) {
        return;
    }
    m = mask[(int64_t) blockIdx.y * mask_ld + w];
    if (m == 0xffffffffu) {
        return;
    }
#pragma unroll 4
    for (k = 0; k < 32 && id0 + k < V; k++) {
        if (!(m & (1u << k))) {
            row[id0 + k] = -INFINITY;
        }
    }
}


int
moe_cuda_mask_rows(float *logits, int64_t ld, int rows, int V,
    const uint32_t *mask, int64_t mask_ld, cudaStream_t stream)
{
    int64_t words;
    dim3    grid;

    if (rows <= 0) {
        return MOE_K_OK;
    }
    words = ((int64_t) V + 31) / 32;
    if (V <= 0 || ld < V || mask_ld < words || logits == NULL
        || mask == NULL)
    {
        moe_cuda_set_error("mask: bad shape (V %d, ld %lld, mask_ld %lld)",
                           V, (long long) ld, (long long) mask_ld);
        return MOE_K_EBACKEND;
    }
    grid.x = (unsigned) ((words + MASK_THREADS - 1) / MASK_THREADS);
    grid.y = (unsigned) rows;
    grid.z = 1;
    MOE_CUDA_CHECK(moe_launch(kernel_mask_rows, grid, MASK_THREADS, 0, stream,
        logits, ld, V, mask, mask_ld));
    return MOE_K_OK;
}
