/*
 * RoPE scaling frequencies (engine/model/rope.c) against the formulas
 * written out independently here, for a head_dim 16, base 10000 model:
 * default 1 / base^(2i/d); linear = default / factor; llama3: wavelengths
 * below orig / high_freq_factor kept, above orig / low_freq_factor divided
 * by factor, a smooth blend between (each region hit); yarn: attention
 * factor 0.1 ln(factor) + 1, the lowest dimensions extrapolated (= default),
 * the highest interpolated (= default / factor), factor taken as
 * max_position_embeddings / original when original is given; dynamic NTK:
 * rope_theta up to the original context, then theta * (f L / orig - (f -
 * 1))^(d / (d - 2)).  (The end-to-end comparison with transformers' own
 * frequencies is t/forward.t's reference logits for the llama-rope-*
 * models.)  Also: config.json errors (a missing llama3 field, an unknown
 * type; rope_theta, rope factors, original_max_position_embeddings and
 * rms_norm_eps out of range for the float or int they are kept in) are
 * refused by name.
 */

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "moe.h"
#include "model/model.h"
#include "tap.h"


static void
base_hp(moe_hparams_t *hp)
{
    memset(hp, 0, sizeof(*hp));
    hp->head_dim = 16;
    hp->rope_theta = 10000.0f;
    hp->max_pos = 1024;
    hp->rope_factor = 1.0f;
    hp->rope_orig_max = 1024;
    hp->rope_truncate = 1;
}


static int
rel(double a, double b, double tol)
{
    return fabs(a - b) <= tol * fabs(b);
}


int
main(void)
{
    moe_hparams_t  hp;
    float          def[8], inv[8], att;
    int            i, ok, hi = 0, lo = 0, mid = 0;

    base_hp(&hp);
    moe_rope_inv_freq(&hp, def, &att);
    ok = att == 1.0f;
    for (i = 0; i < 8; i++) {
        ok &= rel(def[i], pow(10000.0, -(double) i / 8.0), 1e-6);
    }
    TAP_OK(ok, "default: 1 / base^(2i/d), attention factor 1");

    hp.rope_type = MOE_ROPE_LINEAR;
    hp.rope_factor = 2.5f;
    moe_rope_inv_freq(&hp, inv, &att);
    ok = att == 1.0f;
    for (i = 0; i < 8; i++) {
        ok &= rel(inv[i], def[i] / 2.5, 1e-6);
    }
    TAP_OK(ok, "linear: default / factor");

    base_hp(&hp);
    hp.rope_type = MOE_ROPE_LLAMA3;
    hp.rope_factor = 8.0f;
    hp.rope_low_freq = 1.0f;
    hp.rope_high_freq = 4.0f;
    hp.rope_orig_max = 64;
    moe_rope_inv_freq(&hp, inv, &att);
    ok = att == 1.0f;
    for (i = 0; i < 8; i++) {
        double wl = 2 * M_PI / def[i];

        if (wl < 64.0 / 4.0) {
            ok &= inv[i] == def[i];
            hi++;
        } else if (wl > 64.0 / 1.0) {
            ok &= rel(inv[i], def[i] / 8.0, 1e-6);
            lo++;
        } else {
            double sm = (64.0 / wl - 1.0) / (4.0 - 1.0);

            ok &= rel(inv[i], (1 - sm) * def[i] / 8.0 + sm * def[i], 1e-5);
            mid++;
        }
    }
    TAP_OK(ok && hi > 0 && lo > 0 && mid > 0, "llama3: %d kept, %d blended, "
           "%d divided by factor", hi, mid, lo);

    base_hp(&hp);
    hp.rope_type = MOE_ROPE_YARN;
    hp.rope_factor = 4.0f;
    hp.rope_orig_max = 256;
    hp.rope_factor_from_len = 1;
    hp.rope_beta_fast = 32;
    hp.rope_beta_slow = 1;
    moe_rope_inv_freq(&hp, inv, &att);
    TAP_OK(rel(att, 0.1 * log(4.0) + 1.0, 1e-6),
           "yarn: attention factor 0.1 ln(4) + 1 = %.5f", att);
    TAP_OK(rel(inv[0], def[0], 1e-6) && rel(inv[7], def[7] / 4.0, 1e-6)
           && inv[3] < def[3] && inv[3] > def[3] / 4.0,
           "yarn: dim 0 extrapolated, dim 7 interpolated, dim 3 between");
    hp.rope_attn_factor = 0.5f;
    moe_rope_inv_freq(&hp, inv, &att);
    TAP_OK(att == 0.5f, "yarn: attention_factor given is used");
    hp.rope_attn_factor = 0;
    hp.max_pos = 512;          /* factor from lengths: 512 / 256 = 2 */
    moe_rope_inv_freq(&hp, inv, &att);
    TAP_OK(rel(inv[7], def[7] / 2.0, 1e-6)
           && rel(att, 0.1 * log(2.0) + 1.0, 1e-6),
           "yarn: factor = max_position_embeddings / original");

    base_hp(&hp);
    hp.rope_type = MOE_ROPE_DYNAMIC;
    hp.rope_factor = 2.0f;
    hp.max_pos = 24;
    hp.rope_orig_max = 24;
    TAP_OK(moe_rope_dynamic_base(&hp, 24) == 10000.0
           && rel(moe_rope_dynamic_base(&hp, 48),
                  10000.0 * pow(2.0 * 48 / 24 - 1.0, 16.0 / 14.0), 1e-12),
           "dynamic: theta up to the original context, NTK base past it");
    moe_rope_inv_freq_base(&hp, moe_rope_dynamic_base(&hp, 48), inv);
    TAP_OK(inv[0] == 1.0f && inv[7] < def[7],
           "dynamic: longer sequences get lower frequencies");

    {
        /* keys added to a valid Llama config.json; the last ones were
         * accepted before and reached the model as inf, 0 or a negative
         * epsilon (tools/fuzz/fuzz_config.c) */
        static const struct { const char *keys, *want; } bad[] = {
            { "\"rope_scaling\":{\"rope_type\":\"llama3\",\"factor\":8,"
              "\"high_freq_factor\":4,"
              "\"original_max_position_embeddings\":64}",
              "needs 'low_freq_factor'" },
            { "\"rope_scaling\":{\"rope_type\":\"longrope\","
              "\"factor\":8}", "type 'longrope' is not supported" },
            { "\"rope_scaling\":{\"rope_type\":\"linear\"}",
              "needs 'factor'" },
            { "\"rope_scaling\":{\"rope_type\":\"yarn\",\"factor\":-1}",
              "factor must be a number > 0" },
            { "\"rms_norm_eps\":-1e-5",
              "'rms_norm_eps' must be a number >= 0" },
            { "\"rms_norm_eps\":1e39",
              "'rms_norm_eps' must be a number >= 0" },
            { "\"rope_theta\":1e39", "rope_theta must be > 0" },
            { "\"rope_theta\":1e-300", "rope_theta must be > 0" },
            { "\"rope_scaling\":{\"rope_type\":\"linear\","
              "\"factor\":1e39}", "factor must be a number > 0" },
            { "\"rope_scaling\":{\"rope_type\":\"dynamic\","
              "\"factor\":1e-50}", "factor must be a number > 0" },
            { "\"rope_scaling\":{\"rope_type\":\"yarn\",\"factor\":4,"
              "\"original_max_position_embeddings\":1e12}",
              "original_max_position_embeddings must be a length" },
            { "\"rope_scaling\":{\"rope_type\":\"yarn\",\"factor\":4,"
              "\"original_max_position_embeddings\":0.5}",
              "original_max_position_embeddings must be a length" },
        };
        char  dir[] = "/tmp/moe-rope-XXXXXX", path[512], err[512];
        FILE *f;

        for (i = 0; i < (int) (sizeof(bad) / sizeof(bad[0])); i++) {
            moe_model_t *m = NULL;
            int          rc;

            if (i == 0 && mkdtemp(dir) == NULL) {
                break;
            }
            snprintf(path, sizeof(path), "%s/config.json", dir);
            f = fopen(path, "w");
            if (f == NULL) {
                break;
            }
            fprintf(f, "{\"architectures\":[\"LlamaForCausalLM\"],"
                    "\"hidden_size\":64,\"intermediate_size\":64,"
                    "\"num_hidden_layers\":1,\"num_attention_heads\":4,"
                    "\"num_key_value_heads\":2,\"vocab_size\":512,"
                    "%s}", bad[i].keys);
            fclose(f);
            err[0] = '\0';
            rc = moe_model_load(dir, 0, &m, err, sizeof(err));
            TAP_OK(rc != MOE_OK && strstr(err, bad[i].want) != NULL,
                   "refused: %s (%s)", bad[i].want, err);
            moe_model_free(m);
        }
        unlink(path);
        rmdir(dir);
    }

    TAP_PLAN(tap_n);
    return TAP_DONE();
}
