/*
 * Token sampling on the host (engine internal; the CPU backend's path and
 * the reference for the device sampler).
 */

#ifndef MOE_SAMPLING_H
#define MOE_SAMPLING_H

#include <stdint.h>

#include "moe.h"

/*
 * Greedy: a temperature below this picks the first maximum of the
 * (penalised) logits and draws no uniform.  The one threshold: the host
 * sampler here, the scheduler's sampling plan (sched/) and the device
 * sampler (kernels/sample.h MOE_K_GREEDY_TEMPERATURE, checked equal at
 * compile time by the CUDA backend) all decide greedy by it.
 */
#define MOE_GREEDY_TEMPERATURE  1e-5f

/* 1 when sp samples greedily (temperature below MOE_GREEDY_TEMPERATURE;
 * penalties still apply before the argmax). */
static inline int
moe_sampling_is_greedy(const moe_sampling_t *sp)
{
    return sp->temperature < MOE_GREEDY_TEMPERATURE;
}

/* xoshiro256** state, seeded with splitmix64 */
typedef struct {
    uint64_t s[4];
} moe_rng_t;

/*
 * The engine's own copy of src's logit_bias arrays into dst (one malloc,
 * ids then biases; dst's other fields untouched): MOE_OK, or MOE_ENOMEM
 * with dst's arrays NULL.  moe_sampling_bias_free() releases it and
 * clears the arrays (safe on a dst that has none).
 */
int      moe_sampling_bias_copy(moe_sampling_t *dst, const moe_sampling_t *src);
void     moe_sampling_bias_free(moe_sampling_t *sp);

void     moe_rng_seed(moe_rng_t *r, uint64_t seed);
uint64_t moe_rng_next(moe_rng_t *r);
/* uniform in [0, 1) with 24 bits */
float    moe_rng_uniform(moe_rng_t *r);

typedef struct {
    float    *probs;      /* (vocab) scratch */
    float    *raw;        /* (vocab) copy of the unpenalised logits */
    int32_t  *idx;        /* (vocab) scratch */
    int       vocab;
} moe_sampler_t;

int  moe_sampler_init(moe_sampler_t *s, int vocab);
void moe_sampler_destroy(moe_sampler_t *s);

/*
 * Apply penalties and pick the next token from logits (vocab floats,
 * modified in place).  counts: per-token occurrences in the generated
 * text (may be NULL when no penalty needs it); seen: 1 for tokens in
 * prompt or output (for repetition_penalty; may be NULL).  Returns the id;
 * when sp->logprobs, *logprob receives log p(id) under the distribution it
 * was drawn from (moe_logprobs_row() of the biased, penalised logits at
 * the temperature; 1 when greedy), else 0.  On return logits holds those
 * biased, penalised logits (the caller may ask moe_logprobs_row() for the
 * top entries).  Draws one moe_rng_uniform() from rng unless greedy
 * (moe_sampling_is_greedy), then does moe_sample_u() with it.
 */
int32_t moe_sample(moe_sampler_t *s, float *logits, const moe_sampling_t *sp,
    const int32_t *counts, const uint8_t *seen, moe_rng_t *rng,
    float *logprob);

/*
 * The same with the uniform u in [0, 1) given (unused when greedy): the
 * exact semantics are at the top of sampling.c; the draw walks the kept
 * tokens in ascending id order.  The reference of the device sampler.
 */
int32_t moe_sample_u(moe_sampler_t *s, float *logits,
    const moe_sampling_t *sp, const int32_t *counts, const uint8_t *seen,
    float u, float *logprob);

/*
 * Logprobs of one row: returns log softmax(logits / T)[chosen] (T =
 * temperature, or 1 below MOE_GREEDY_TEMPERATURE; NAN when chosen is out
 * of [0, V)) and, when k > 0, writes the min(k, V) most likely entries to
 * top (logprob descending, ties by ascending id).  The reference of the
 * device kernel (kernels/logprobs.cu).
 */
float moe_logprobs_row(const float *logits, int V, float temperature,
    int32_t chosen, int k, moe_logprob_entry_t *top);

/*
 * A logprobs record of n_rows rows of k top entries in ONE malloc() (the
 * arrays follow the struct), so free() releases it (moe_event_release()).
 * NULL when out of memory.  Contents uninitialised.
 */
moe_logprobs_t *moe_logprobs_alloc(int n_rows, int k);

#endif /* MOE_SAMPLING_H */
