/*
 * The step cost model (stepcost.h): forgetting least squares over three
 * features, solved by Gaussian elimination with partial pivoting on the
 * 3x3 normal equations, a small ridge keeping it defined when the steps
 * seen so far do not vary a feature.
 */

#include <math.h>
#include <string.h>

#include "sched/stepcost.h"

#define LAMBDA  0.97               /* forgetting: ~30 steps of memory */
#define RIDGE   1e-9


double
moe_stepcost_attn(int pos, int tokens)
{
    return (double) tokens * ((double) pos + (double) tokens * 0.5)
           / 1024.0;
}


void
moe_stepcost_init(moe_stepcost_t *m)
{
    memset(m, 0, sizeof(*m));
}


/* Solve the normal equations restricted to the features in use[]; the
 * others get 0.  Returns 0 when singular. */
static int
sc_solve(const moe_stepcost_t *m, const int use[3], double out[3])
{
    double  a[3][4];
    int     idx[3], k = 0, i, j, r, p;

    for (i = 0; i < 3; i++) {
        out[i] = 0;
        if (use[i]) {
            idx[k++] = i;
        }
    }

    for (i = 0; i < k; i++) {
        for (j = 0; j < k; j++) {
            a[i][j] = m->s[idx[i]][idx[j]];
        }
        a[i][i] += RIDGE * (1.0 + m->s[idx[i]][idx[i]]);
        a[i][k] = m->b[idx[i]];
    }

    for (i = 0; i < k; i++) {
        p = i;
        for (r = i + 1; r < k; r++) {
            if (fabs(a[r][i]) > fabs(a[p][i])) {
                p = r;
            }
        }
        if (fabs(a[p][i]) < 1e-300) {
            return 0;
        }
        if (p != i) {
            for (j = 0; j <= k; j++) {
                double t = a[i][j];
                a[i][j] = a[p][j];
                a[p][j] = t;
            }
        }
        for (r = 0; r < k; r++) {
            double f;

            if (r == i) {
                continue;
            }
            f = a[r][i] / a[i][i];
            for (j = i; j <= k; j++) {
                a[r][j] -= f * a[i][j];
            }
        }
    }

    for (i = 0; i < k; i++) {
        out[idx[i]] = a[i][k] / a[i][i];
    }
    return 1;
}


/* Weighted residual sum of squares of coefficients c over the steps
 * seen: sum t^2 - 2 c.b + c.S.c */
static double
sc_rss(const moe_stepcost_t *m, const double c[3])
{
    double  r = m->tt;
    int     i, j;

    for (i = 0; i < 3; i++) {
        r -= 2.0 * c[i] * m->b[i];
        for (j = 0; j < 3; j++) {
            r += c[i] * m->s[i][j] * c[j];
        }
    }
    return r;
}


void
moe_stepcost_observe(moe_stepcost_t *m, int tokens, double attn, double ns)
{
    double  x[3], c[3];
    int     use[3] = { 1, 1, 1 }, i, j;

    if (m->pinned || tokens <= 0 || !(ns > 0)) {
        return;
    }

    x[0] = 1.0;
    x[1] = tokens;
    x[2] = attn;

    for (i = 0; i < 3; i++) {
        for (j = 0; j < 3; j++) {
            m->s[i][j] = LAMBDA * m->s[i][j] + x[i] * x[j];
        }
        m->b[i] = LAMBDA * m->b[i] + x[i] * ns;
    }
    m->tt = LAMBDA * m->tt + ns * ns;
    m->n++;

    /* attention is priced only when the steps seen tell it apart from
     * tokens: the full fit must come out non-negative and explain at
     * least 5% of what the tokens-only fit leaves unexplained.  Steps of
     * two shapes (decodes, and decodes + whole prompts at position 0)
     * make the two collinear: then a token carries its attention's share.
     * Then the fixed part is dropped when negative, so what remains is
     * >= 0. */
    {
        double  cr[3];
        int     ur[3] = { 1, 1, 0 };

        if (!sc_solve(m, ur, cr)) {
            m->ok = 0;
            return;
        }
        if (!sc_solve(m, use, c) || c[2] < 0 || c[1] <= 0
            || sc_rss(m, c) > 0.95 * sc_rss(m, cr))
        {
            memcpy(c, cr, sizeof(c));
            use[2] = 0;
        }
    }
    if (c[0] < 0) {
        use[0] = 0;
        if (!sc_solve(m, use, c)) {
            m->ok = 0;
            return;
        }
    }

    memcpy(m->c, c, sizeof(c));
    m->ok = m->n >= MOE_STEPCOST_WARM && c[1] > 0;
}


double
moe_stepcost_predict(const moe_stepcost_t *m, int tokens, double attn)
{
    return m->c[0] + m->c[1] * tokens + m->c[2] * attn;
}


void
moe_stepcost_pin(moe_stepcost_t *m, double c0, double c1, double c2)
{
    if (!(c1 > 0)) {
        moe_stepcost_init(m);
        return;
    }
    m->c[0] = c0 > 0 ? c0 : 0;
    m->c[1] = c1;
    m->c[2] = c2 > 0 ? c2 : 0;
    m->pinned = 1;
    m->ok = 1;
}


int
moe_stepcost_fit_tokens(const moe_stepcost_t *m, double budget_ns, int pos,
    int want)
{
    double  a, b, p;

    if (want <= 0 || !(budget_ns > 0)) {
        return 0;
    }

    /* cost(p) = c1 p + c2 p (pos + p/2) / 1024
     *         = (c2 / 2048) p^2 + (c1 + c2 pos / 1024) p  <= budget */
    a = m->c[2] / 2048.0;
    b = m->c[1] + m->c[2] * (double) pos / 1024.0;

    if (a > 0) {
        p = (-b + sqrt(b * b + 4.0 * a * budget_ns)) / (2.0 * a);
    } else if (b > 0) {
        p = budget_ns / b;
    } else {
        return want;
    }

    if (!(p < (double) want)) {
        return want;
    }
    return p < 0 ? 0 : (int) p;
}
