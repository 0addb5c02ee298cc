/* Token sampling on the device: penalties, temperature, top-k/p, min-p. */
#ifndef MOE_KERNELS_SAMPLE_H
#define MOE_KERNELS_SAMPLE_H
#include "common.h"
#ifdef __cplusplus
extern "C" {
#endif

/* temperature below this: greedy (the engine's MOE_GREEDY_TEMPERATURE,
 * checked equal at compile time by the CUDA backend) */
#define MOE_K_GREEDY_TEMPERATURE  1e-5f

typedef struct {
    float    temperature;        /* < MOE_K_GREEDY_TEMPERATURE: greedy
                                    (after penalties) */
    float    top_p;              /* (0, 1]; 1: off */
    float    min_p;              /* 0: off */
    int32_t  top_k;              /* <= 0 or >= n: off */
    float    repetition_penalty; /* 1: off (HF: divide positive logits,
                                    multiply negative ones, tokens seen in
                                    prompt or output) */
    float    frequency_penalty;  /* OpenAI: logit -= freq * count + presence,
                                    for count > 0 (generated tokens) */
    float    presence_penalty;
    float    u;                  /* uniform in [0,1) drawn on the host
                                    (ignored when greedy) */
    int32_t  n_valid;            /* ids considered: i < n_valid when
                                    0 < n_valid < V, else all V */
    int32_t  pen_off, pen_n;     /* this row's entries [pen_off, pen_off +
                                    pen_n) of the penalty lists */
} moe_cuda_sample_param_t;

/*
 * One block per row: logits (rows, ld) fp32 are modified in place
 * (penalties applied to the listed ids < n).  out[r] = the chosen id of
 * row r, exactly moe_sample_u() (engine/sampling/sampling.c) over ids < n with the
 * row's u, counts and seen given by the lists, up to floating point at
 * boundaries (CUDA expf; weights summed as 2^-40 fixed point, the host in
 * double).  params (rows), pen_tok, pen_cnt, pen_seen, out (rows) are
 * device pointers; list entries are distinct token ids with count
 * (generated occurrences) and seen (1: in prompt or output); the lists may
 * be NULL when every pen_n is 0 (pen_cnt / pen_seen NULL: all 0).  NaN
 * logits are never chosen.  Reads everything on the device, so it can be
 * captured in a CUDA graph.  rows <= 0: nothing.  MOE_K_EINVAL on a bad
 * shape or NULL pointer, MOE_K_EBACKEND when the launch fails.
 */
int moe_cuda_sample_rows(float *logits, int64_t ld, int rows, int V,
    const moe_cuda_sample_param_t *params, const int32_t *pen_tok,
    const int32_t *pen_cnt, const uint8_t *pen_seen, int32_t *out,
    cudaStream_t stream);

#ifdef __cplusplus
}
#endif
#endif
