/* logit_bias over fp32 logits: a short id list per row. */
#include "common.cuh"
#include "logit_bias.h"


/* one thread per row: at most MOE_MAX_LOGIT_BIAS (300) entries, added in
 * list order so duplicate ids sum exactly as on the host; a few
 * microseconds, not worth a race-free parallel scheme */
__global__ void
kernel_logit_bias_rows(float *logits, int64_t ld, int rows, int V,
    const int32_t *off, const int32_t *cnt, const int32_t *ids,
    const float *bias)
{
    moe_pdl_enter();
    int       r = blockIdx.x * blockDim.x + threadIdx.x;
    int       j, o, n;
    float    *row;

    if (r >= rows) {
        return;
    }
    o = off[r];
    n = cnt[r];
    row = logits + (int64_t) r * ld;
    for (j = 0; j < n; j++) {
        int32_t id = ids[o + j];

        if (id >= 0 && id < V) {
            row[id] += bias[o + j];
        }
    }
}


int
moe_cuda_logit_bias_rows(float *logits, int64_t ld, int rows, int V,
    const int32_t *off, const int32_t *cnt, const int32_t *ids,
    const float *bias, cudaStream_t stream)
{
    if (rows <= 0) {
        return MOE_K_OK;
    }
    if (V <= 0 || ld < V || logits == NULL || off == NULL || cnt == NULL
        || ids == NULL || bias == NULL)
    {
        moe_cuda_set_error("logit_bias: bad shape (V %d, ld %lld)", V,
                           (long long) ld);
        return MOE_K_EBACKEND;
    }
    MOE_CUDA_CHECK(moe_launch(kernel_logit_bias_rows, (rows + 63) / 64, 64, 0,
        stream, logits, ld, rows, V, off, cnt, ids, bias));
    return MOE_K_OK;
}
