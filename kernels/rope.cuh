/* Device helpers shared by the RoPE launch (rope.cu) and the decode
 * attention that folds it in (attention.cu, att_rope). */
#ifndef MOE_KERNELS_ROPE_CUH
#define MOE_KERNELS_ROPE_CUH

/* Frequency i of token t: the table, or (dynamic NTK scaling) the
 * token's own base as transformers computes it: 1 / base^(2i / hd). */
__device__ __forceinline__ float
moe_rope_inv(const float *inv_freq, const float *tok_base, int t, int i,
    int hd)
{
    if (tok_base != NULL) {
        return 1.0f / powf(tok_base[t], (float) (2 * i) / (float) hd);
    }
    return inv_freq[i];
}

#endif /* MOE_KERNELS_ROPE_CUH */
