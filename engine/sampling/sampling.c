/*
 * Host sampling: penalties, temperature, top-k, top-p, min-p, seeded RNG.
 *
 * Order (as vLLM applies them): logit_bias (added to the logits),
 * repetition penalty (HF semantics: divide positive logits, multiply
 * negative ones), frequency and presence penalties (OpenAI semantics, on generated tokens), then greedy when
 * temperature is 0, else temperature, top-k, top-p, min-p and a draw.
 *
 * Exactly (the device sampler, kernels/sample.cu, computes the same):
 *   greedy (temperature < MOE_GREEDY_TEMPERATURE, 1e-5): the first maximum (lowest id on ties);
 *   weights w_i = expf((l_i - max) / T) in float (the best one is 1);
 *   order: logit descending, ties by ascending id (a total order);
 *   top-k: the first k tokens of that order (exactly k);
 *   top-p: the shortest prefix of that order (within top-k) whose running
 *          sum of w reaches top_p * sum(w); none reaches it: all of them;
 *   min-p: keep w >= min_p;
 *   draw:  u' = u * sum of the kept weights; walking the kept tokens in
 *          ASCENDING ID order (not the logit order), the first whose
 *          running sum of weights exceeds u'; none (rounding): the largest
 *          kept id.  An id-order draw is a prefix sum on the device.
 * Sums and running sums are in double, so the host is an accurate
 * reference (a float running sum over 150k tokens drifts by up to ~1e-3).
 * Greedy consumes no random number; otherwise one uniform per token.
 */

#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "sampling/sampling.h"


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


/* the first maximum (lowest id on ties) */
static int
moe_argmax(const float *l, int V)
{
    int i, best = 0;

    for (i = 1; i < V; i++) {
        if (l[i] > l[best]) {
            best = i;
        }
    }
    return best;
}


/* ------------------------------------------------------------ logprobs */

/*
 * Log-softmax of logits / T at `chosen` and, when k > 0, the k most likely
 * entries (logprob descending, ties by ascending id) into top.  One pass
 * for the maximum, one for the sum (double), one bounded insertion pass
 * for the top k: only requests that ask for logprobs pay it.
 */
float
moe_logprobs_row(const float *logits, int V, float temperature,
    int32_t chosen, int k, moe_logprob_entry_t *top)
{
    int     i, j, n;
    float   mx, inv_t, lse;
    double  sum;

    inv_t = temperature < MOE_GREEDY_TEMPERATURE ? 1.0f : 1.0f / temperature;

    mx = logits[0];
    for (i = 1; i < V; i++) {
        if (logits[i] > mx) {
            mx = logits[i];
        }
    }
    sum = 0.0;
    for (i = 0; i < V; i++) {
        sum += exp((double) ((logits[i] - mx) * inv_t));
    }
    lse = (float) log(sum);

    if (k > V) {
        k = V;
    }
    n = 0;
    for (i = 0; k > 0 && i < V; i++) {
        if (n == k && !(logits[i] > logits[top[n - 1].id])) {
            continue;
        }
        j = n < k ? n++ : n - 1;
        while (j > 0 && logits[i] > logits[top[j - 1].id]) {
            top[j] = top[j - 1];
            j--;
        }
        top[j].id = i;
    }
    for (j = 0; j < n; j++) {
        top[j].logprob = (logits[top[j].id] - mx) * inv_t - lse;
    }

    if (chosen < 0 || chosen >= V) {
        return NAN;
    }
    return (logits[chosen] - mx) * inv_t - lse;
}


/* Keep the k largest logits' ids in ix[0..k) in descending order (ties:
 * lower id first) with a bounded insertion pass: O(V k) worst case but
 * O(V) in practice for small k, no full sort.  Larger k (the insertions
 * then cost O(k^2 log(V/k))): a full sort instead. */
#define MOE_TOP_K_INSERT  256

static int
moe_top_k(const float *l, int V, int k, int32_t *ix)
{
    int  i, j, n = 0;

    for (i = 0; i < V; i++) {
        if (n == k && !(l[i] > l[ix[n - 1]])) {
            continue;
        }
        j = n < k ? n++ : n - 1;
        while (j > 0 && l[i] > l[ix[j - 1]]) {
            ix[j] = ix[j - 1];
            j--;
        }
        ix[j] = i;
    }
    return n;
}


static int
moe_cmp_id(const void *a, const void *b)
{
    int32_t  ia = *(const int32_t *) a, ib = *(const int32_t *) b;

    return ia < ib ? -1 : (ia > ib);
}


int32_t
moe_sample_u(moe_sampler_t *s, float *logits, const moe_sampling_t *sp,
    const int32_t *counts, const uint8_t *seen, float u, float *logprob)
{
    int      V = s->vocab, i, n, best, sorted;
    float    mx;
    double   sum, cum, thr;
    float   *p = s->probs;
    int32_t *ix = s->idx;
    int      want_lp = sp->logprobs;

    *logprob = 0.0f;

    /* logit_bias first (OpenAI: added to the logits before sampling) */
    for (i = 0; i < sp->n_logit_bias; i++) {
        if (sp->logit_bias_ids[i] >= 0 && sp->logit_bias_ids[i] < V) {
            logits[sp->logit_bias_ids[i]] += sp->logit_bias[i];
        }
    }

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

    if (moe_sampling_is_greedy(sp)) {
        best = moe_argmax(logits, V);
        if (want_lp) {
            *logprob = moe_logprobs_row(logits, V, sp->temperature, best,
                                        0, NULL);
        }
        return best;
    }

    /* candidates in descending logit order: all of them only when top-p
     * needs the order; top-k alone needs k; plain temperature and min-p
     * need no order at all (ix is then in id order already) */
    sorted = 1;
    if (sp->top_k > 0 && sp->top_k < V && sp->top_k <= MOE_TOP_K_INSERT) {
        n = moe_top_k(logits, V, sp->top_k, ix);
    } else if ((sp->top_k > 0 && sp->top_k < V) || sp->top_p < 1.0f) {
        /* a full sort: top-p, or a k too large for the insertion pass
         * (the same order, then the first k) */
        for (i = 0; i < V; i++) {
            ix[i] = i;
        }
        moe_sort_keys = logits;
        qsort(ix, (size_t) V, sizeof(int32_t), moe_cmp_desc);
        n = sp->top_k > 0 && sp->top_k < V ? sp->top_k : V;
    } else {
        for (i = 0; i < V; i++) {
            ix[i] = i;
        }
        n = V;
        sorted = 0;
    }

    mx = logits[ix[0]];
    for (i = 1; i < n; i++) {
        if (logits[ix[i]] > mx) {
            mx = logits[ix[i]];
        }
    }

    sum = 0.0;
    for (i = 0; i < n; i++) {
        float e = expf((logits[ix[i]] - mx) / sp->temperature);
        p[ix[i]] = e;
        sum += e;
    }

    if (sp->top_p < 1.0f) {
        /* ix is sorted here (qsort or top-k order): the shortest prefix
         * whose mass reaches top_p of the candidates' */
        thr = (double) sp->top_p * sum;
        cum = 0.0;
        for (i = 0; i < n; i++) {
            cum += p[ix[i]];
            if (cum >= thr) {
                n = i + 1;
                break;
            }
        }
    }

    if (sp->min_p > 0.0f) {
        /* exp((max - max) / T) == 1: the best candidate's weight */
        float  thr_p = sp->min_p;
        int    m = 0;

        for (i = 0; i < n; i++) {
            if (p[ix[i]] >= thr_p) {
                ix[m++] = ix[i];
            }
        }
        n = m;
    }

    if (n == 0) {
        /* only min_p > 1 removes the best token: take it */
        best = moe_argmax(logits, V);
        if (want_lp) {
            *logprob = moe_logprobs_row(logits, V, sp->temperature, best,
                                        0, NULL);
        }
        return best;
    }

    /* the draw walks the kept ids in ascending order */
    if (sorted) {
        qsort(ix, (size_t) n, sizeof(int32_t), moe_cmp_id);
    }

    sum = 0.0;
    for (i = 0; i < n; i++) {
        sum += p[ix[i]];
    }

    thr = (double) u * sum;
    cum = 0.0;
    best = ix[n - 1];
    for (i = 0; i < n; i++) {
        cum += p[ix[i]];
        if (thr < cum) {
            best = ix[i];
            break;
        }
    }

    if (want_lp) {
        *logprob = moe_logprobs_row(logits, V, sp->temperature, best, 0,
                                    NULL);
    }
    return best;
}


int32_t
moe_sample(moe_sampler_t *s, float *logits, const moe_sampling_t *sp,
    const int32_t *counts, const uint8_t *seen, moe_rng_t *rng,
    float *logprob)
{
    float  u = 0.0f;

    /* greedy draws nothing: the stream stays where it was */
    if (!moe_sampling_is_greedy(sp)) {
        u = moe_rng_uniform(rng);
    }
    return moe_sample_u(s, logits, sp, counts, seen, u, logprob);
}


moe_logprobs_t *
moe_logprobs_alloc(int n_rows, int k)
{
    size_t           sz;
    moe_logprobs_t  *lp;

    /* struct, entries (8-byte aligned after it), tokens, logprobs */
    sz = sizeof(moe_logprobs_t)
         + (size_t) n_rows * (size_t) k * sizeof(moe_logprob_entry_t)
         + (size_t) n_rows * (sizeof(int32_t) + sizeof(float));
    lp = malloc(sz);
    if (lp == NULL) {
        return NULL;
    }
    lp->n_rows = n_rows;
    lp->k = k;
    lp->top = (moe_logprob_entry_t *) (lp + 1);
    lp->token = (int32_t *) (lp->top + (size_t) n_rows * (size_t) k);
    lp->logprob = (float *) (lp->token + n_rows);
    return lp;
}


int
moe_sampling_bias_copy(moe_sampling_t *dst, const moe_sampling_t *src)
{
    size_t   n = (size_t) src->n_logit_bias;
    int32_t *ids;
    float   *bias;

    dst->logit_bias_ids = NULL;
    dst->logit_bias = NULL;
    dst->n_logit_bias = 0;
    if (n == 0) {
        return MOE_OK;
    }
    /* one block: n ids, then n biases (4-byte aligned both) */
    ids = malloc(n * (sizeof(int32_t) + sizeof(float)));
    if (ids == NULL) {
        return MOE_ENOMEM;
    }
    bias = (float *) (ids + n);
    memcpy(ids, src->logit_bias_ids, n * sizeof(int32_t));
    memcpy(bias, src->logit_bias, n * sizeof(float));
    dst->logit_bias_ids = ids;
    dst->logit_bias = bias;
    dst->n_logit_bias = (int) n;
    return MOE_OK;
}


void
moe_sampling_bias_free(moe_sampling_t *sp)
{
    free((void *) sp->logit_bias_ids);
    sp->logit_bias_ids = NULL;
    sp->logit_bias = NULL;
    sp->n_logit_bias = 0;
}
