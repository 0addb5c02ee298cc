/*
 * Host sampling: penalties, temperature, top-k, top-p, min-p, seeded RNG.
 *
 * Order (as vLLM applies them): repetition penalty (HF semantics: divide
 * positive logits, multiply negative ones), frequency and presence
 * penalties (OpenAI semantics, on generated tokens), then greedy when
 * temperature is 0, else temperature, top-k, top-p, min-p and a draw.
 */

#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "sampling.h"


static uint64_t
moe_splitmix64(uint64_t *x)
{
    uint64_t  z;

    z = (*x += 0x9e3779b97f4a7c15ULL);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
    return z ^ (z >> 31);
}


void
moe_rng_seed(moe_rng_t *r, uint64_t seed)
{
    int  i;

    for (i = 0; i < 4; i++) {
        r->s[i] = moe_splitmix64(&seed);
    }
}


static inline uint64_t
moe_rotl(uint64_t x, int k)
{
    return (x << k) | (x >> (64 - k));
}


uint64_t
moe_rng_next(moe_rng_t *r)
{
    uint64_t  *s = r->s;
    uint64_t   result, t;

    result = moe_rotl(s[1] * 5, 7) * 9;
    t = s[1] << 17;
    s[2] ^= s[0];
    s[3] ^= s[1];
    s[1] ^= s[2];
    s[0] ^= s[3];
    s[2] ^= t;
    s[3] = moe_rotl(s[3], 45);

    return result;
}


float
moe_rng_uniform(moe_rng_t *r)
{
    return (float) (moe_rng_next(r) >> 40) * (1.0f / 16777216.0f);
}


int
moe_sampler_init(moe_sampler_t *s, int vocab)
{
    s->vocab = vocab;
    s->probs = malloc(sizeof(float) * (size_t) vocab);
    s->raw = malloc(sizeof(float) * (size_t) vocab);
    s->idx = malloc(sizeof(int32_t) * (size_t) vocab);

    if (s->probs == NULL || s->raw == NULL || s->idx == NULL) {
        moe_sampler_destroy(s);
        return MOE_ENOMEM;
    }

    return MOE_OK;
}


void
moe_sampler_destroy(moe_sampler_t *s)
{
    free(s->probs);
    free(s->idx);
    free(s->raw);
    s->raw = NULL;
    s->probs = NULL;
    s->idx = NULL;
}


static const float  *moe_sort_keys;

static int
moe_cmp_desc(const void *a, const void *b)
{
    float    fa = moe_sort_keys[*(const int32_t *) a];
    float    fb = moe_sort_keys[*(const int32_t *) b];
    int32_t  ia = *(const int32_t *) a, ib = *(const int32_t *) b;

    if (fa != fb) {
        return fa > fb ? -1 : 1;
    }

    /* ties: lower id first, so the order is total and reproducible */
    return ia < ib ? -1 : (ia > ib);
}


int32_t
moe_sample(moe_sampler_t *s, float *logits, const moe_sampling_t *sp,
    const int32_t *counts, const uint8_t *seen, moe_rng_t *rng,
    float *logprob)
{
    int      V = s->vocab, i, n, best;
    float    mx, sum, cum, u, lse;
    float   *p = s->probs;
    int32_t *ix = s->idx;

    /* log-probability reference: the raw distribution */
    mx = logits[0];
    for (i = 1; i < V; i++) {
        if (logits[i] > mx) {
            mx = logits[i];
        }
    }
    sum = 0.0f;
    for (i = 0; i < V; i++) {
        sum += expf(logits[i] - mx);
    }
    lse = mx + logf(sum);

    /* keep the raw logits for the logprob of the chosen token */
    memcpy(s->raw, logits, sizeof(float) * (size_t) V);

    if (seen != NULL && sp->repetition_penalty != 1.0f) {
        for (i = 0; i < V; i++) {
            if (seen[i]) {
                logits[i] = logits[i] > 0 ? logits[i] / sp->repetition_penalty
                                          : logits[i] * sp->repetition_penalty;
            }
        }
    }

    if (counts != NULL
        && (sp->frequency_penalty != 0.0f || sp->presence_penalty != 0.0f))
    {
        for (i = 0; i < V; i++) {
            if (counts[i] > 0) {
                logits[i] -= sp->frequency_penalty * (float) counts[i]
                             + sp->presence_penalty;
            }
        }
    }

    if (sp->temperature < 1e-5f) {
        best = 0;
        for (i = 1; i < V; i++) {
            if (logits[i] > logits[best]) {
                best = i;
            }
        }
        *logprob = s->raw[best] - lse;
        return best;
    }

    for (i = 0; i < V; i++) {
        ix[i] = i;
    }

    /* sort candidates by logit, descending (only as many as top-k needs) */
    moe_sort_keys = logits;
    qsort(ix, (size_t) V, sizeof(int32_t), moe_cmp_desc);

    n = V;
    if (sp->top_k > 0 && sp->top_k < n) {
        n = sp->top_k;
    }

    /* softmax over the candidates with temperature */
    mx = logits[ix[0]];
    sum = 0.0f;
    for (i = 0; i < n; i++) {
        float e = expf((logits[ix[i]] - mx) / sp->temperature);
        p[ix[i]] = e;
        sum += e;
    }

    if (sp->top_p < 1.0f) {
        cum = 0.0f;
        for (i = 0; i < n; i++) {
            cum += p[ix[i]] / sum;
            if (cum >= sp->top_p) {
                n = i + 1;
                break;
            }
        }
    }

    if (sp->min_p > 0.0f) {
        float  thr = sp->min_p * p[ix[0]];

        for (i = 1; i < n; i++) {
            if (p[ix[i]] < thr) {
                n = i;
                break;
            }
        }
    }

    sum = 0.0f;
    for (i = 0; i < n; i++) {
        sum += p[ix[i]];
    }

    u = moe_rng_uniform(rng) * sum;
    cum = 0.0f;
    best = ix[n - 1];
    for (i = 0; i < n; i++) {
        cum += p[ix[i]];
        if (u < cum) {
            best = ix[i];
            break;
        }
    }

    *logprob = s->raw[best] - lse;
    return best;
}
