/*
 * Rotary embedding frequencies with the scaling types long-context models
 * use, as transformers defines them (modeling_rope_utils): default,
 * linear (positions / factor), dynamic NTK (the base grows with the
 * sequence past the original context), YaRN (a ramp between interpolated
 * and extrapolated frequencies by wavelength, plus an attention scale on
 * cos/sin) and Llama 3 (low frequencies / factor, high ones kept, a smooth
 * blend between).  fp32 where transformers works in fp32 (the frequency
 * tensors), double where it works in Python floats (the scalars).
 */

#include <math.h>

#include "model/model.h"


void
moe_rope_inv_freq_base(const moe_hparams_t *hp, double base, float *inv)
{
    int  i, half = hp->head_dim / 2;

    for (i = 0; i < half; i++) {
        /* torch: 1.0 / (base ** (arange(0, dim, 2).float() / dim)) */
        inv[i] = 1.0f / powf((float) base,
                             (float) (2 * i) / (float) hp->head_dim);
    }
}


/* yarn's get_mscale */
static double
rope_mscale(double scale, double m)
{
    return scale <= 1.0 ? 1.0 : 0.1 * m * log(scale) + 1.0;
}


/* yarn's find_correction_dim */
static double
rope_corr_dim(double rot, int dim, double base, int max_pos)
{
    return (dim * log((double) max_pos / (rot * 2.0 * M_PI)))
           / (2.0 * log(base));
}


void
moe_rope_inv_freq(const moe_hparams_t *hp, float *inv, float *attn_scale)
{
    int     i, half = hp->head_dim / 2, dim = hp->head_dim;
    double  base = hp->rope_theta, factor = hp->rope_factor;

    *attn_scale = 1.0f;
    moe_rope_inv_freq_base(hp, base, inv);

    switch (hp->rope_type) {

    case MOE_ROPE_LINEAR:
        for (i = 0; i < half; i++) {
            inv[i] /= (float) factor;
        }
        break;

    case MOE_ROPE_LLAMA3: {
        double  orig = hp->rope_orig_max;
        double  lo = hp->rope_low_freq, hi = hp->rope_high_freq;
        double  lo_wl = orig / lo, hi_wl = orig / hi;

        for (i = 0; i < half; i++) {
            float  f = inv[i];
            float  wl = 2.0f * (float) M_PI / f;
            float  scaled = wl > (float) lo_wl ? f / (float) factor : f;

            if (!(wl < (float) hi_wl) && !(wl > (float) lo_wl)) {
                float sm = ((float) orig / wl - (float) lo)
                           / ((float) hi - (float) lo);

                scaled = (1.0f - sm) * scaled / (float) factor
                         + sm * scaled;
            }
            inv[i] = scaled;
        }
        break;
    }

    case MOE_ROPE_YARN: {
        double  att, lo, hi;
        int     orig = hp->rope_orig_max;

        if (hp->rope_factor_from_len) {
            factor = (double) hp->max_pos / (double) orig;
        }
        if (hp->rope_attn_factor > 0) {
            att = hp->rope_attn_factor;
        } else if (hp->rope_mscale > 0 && hp->rope_mscale_all > 0) {
            att = rope_mscale(factor, hp->rope_mscale)
                  / rope_mscale(factor, hp->rope_mscale_all);
        } else {
            att = rope_mscale(factor, 1.0);
        }

        lo = rope_corr_dim(hp->rope_beta_fast, dim, base, orig);
        hi = rope_corr_dim(hp->rope_beta_slow, dim, base, orig);
        if (hp->rope_truncate) {
            lo = floor(lo);
            hi = ceil(hi);
        }
        if (lo < 0) {
            lo = 0;
        }
        if (hi > dim - 1) {
            hi = dim - 1;
        }
        if (lo == hi) {
            hi += 0.001;
        }

        for (i = 0; i < half; i++) {
            /* torch: pos_freqs = base ** (arange(0, dim, 2) / dim);
             * extrapolation 1 / pos_freqs, interpolation 1 / (factor *
             * pos_freqs); ramp (i - low) / (high - low) clamped to
             * [0, 1]; extrapolation weight 1 - ramp */
            float  pf = powf((float) base, (float) (2 * i) / (float) dim);
            float  ex = 1.0f / pf;
            float  in = 1.0f / ((float) factor * pf);
            float  ramp = ((float) i - (float) lo) / (float) (hi - lo);
            float  w;

            ramp = ramp < 0 ? 0 : ramp > 1 ? 1 : ramp;
            w = 1.0f - ramp;
            inv[i] = in * (1.0f - w) + ex * w;
        }
        *attn_scale = (float) att;
        break;
    }

    default:
        break;
    }
}


double
moe_rope_dynamic_base(const moe_hparams_t *hp, int seq_len)
{
    double  orig, factor, d;

    if (hp->rope_type != MOE_ROPE_DYNAMIC) {
        return hp->rope_theta;
    }
    orig = hp->rope_orig_max > 0 ? hp->rope_orig_max : hp->max_pos;
    if (seq_len <= orig) {
        return hp->rope_theta;
    }
    factor = hp->rope_factor;
    d = hp->head_dim;
    return hp->rope_theta
           * pow(factor * seq_len / orig - (factor - 1.0), d / (d - 2.0));
}
