/*
 * The step cost model behind stall-free batching.
 *
 * Every scheduler step's time is measured and fitted online to
 *
 *     t = c0 + c1 * tokens + c2 * attn
 *
 * where tokens is the number of new tokens the step computes (decodes and
 * prefill chunks together) and attn the attention work in units of 1024
 * (query token, cached token) pairs: a decode at context L adds L, a
 * prefill chunk of p tokens starting at position P adds p * (P + p / 2).
 * The fit is least squares with exponential forgetting (recent steps
 * weigh most; the machine's load and the batch shape drift), so the model
 * is the machine's own measured costs, not constants.
 *
 * The scheduler asks, before building a step that has decodes in it, how
 * many prefill tokens fit: the step may take at most `ratio` times what
 * the decodes alone would take (moe_stepcost_prefill_tokens).  Until the
 * model has seen enough steps to price a token it answers "no limit", so
 * a cold engine behaves as before.
 */

#ifndef MOE_SCHED_STEPCOST_H
#define MOE_SCHED_STEPCOST_H

#include <stdint.h>

#define MOE_STEPCOST_WARM   8      /* steps seen before the model is used */

typedef struct {
    double  s[3][3];               /* forgetting sums of x x^T */
    double  b[3];                  /* of x t */
    double  tt;                    /* of t^2 */
    double  c[3];                  /* the fitted coefficients (ns) */
    int64_t n;                     /* steps observed */
    int     ok;                    /* c prices a token (c1 > 0) */
    int     pinned;                /* c set by moe_stepcost_pin: fixed */
} moe_stepcost_t;

/* Attention work of a chunk of `tokens` new tokens starting at pos. */
double moe_stepcost_attn(int pos, int tokens);

/* Zero state: no observations, model not usable. */
void moe_stepcost_init(moe_stepcost_t *m);

/* One measured step: tokens, attn (moe_stepcost_attn summed), ns taken.
 * Refits the coefficients (3x3 solve; a feature the data cannot price is
 * dropped rather than fitted negative). */
void moe_stepcost_observe(moe_stepcost_t *m, int tokens, double attn,
    double ns);

/* Predicted ns of a step of that shape (valid when m->ok). */
double moe_stepcost_predict(const moe_stepcost_t *m, int tokens,
    double attn);

/*
 * Fix the coefficients (tests, and operators who want a fixed cost): the
 * model then ignores observations.  c1 <= 0 unpins (back to fitting).
 */
void moe_stepcost_pin(moe_stepcost_t *m, double c0, double c1, double c2);

/*
 * The largest p in [0, want] such that a prefill chunk of p tokens at
 * position pos costs at most budget_ns by the model (the cost of p tokens
 * beyond the step's fixed part: c1 p + c2 attn(pos, p)).
 */
int moe_stepcost_fit_tokens(const moe_stepcost_t *m, double budget_ns,
    int pos, int want);

#endif /* MOE_SCHED_STEPCOST_H */
