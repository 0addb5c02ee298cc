/*
 * The fp8 KV cache option (kv_cache_dtype: fp8) without a GPU:
 *   - the YAML key: vllm.kv_cache_dtype fp8 with kv_cache_scale_k loads
 *     (defaults auto / 1.0 otherwise); a dtype outside auto, fp8,
 *     fp8_e4m3 and a scale of 0 are refused with the file's line;
 *   - the CPU backend (models/localmoe-tiny) created with kv_fp8 and
 *     scales 0.5 / 0.25 through the factory: after a 5-token step every K
 *     value of the pool is e4m3(x / 0.5) * 0.5 exactly and every V value
 *     e4m3(x / 0.25) * 0.25 (read back through the swap pool), while the
 *     default (fp32) backend's cache holds values that are not; the
 *     logits differ from the default backend's but stay close (relative
 *     L2 < 0.3 on this tiny model: 3 mantissa bits, not garbage); a scale
 *     of 0 is refused by
 *     moe_cpu_backend_set_kv_fp8 (per layer: layer 1's).
 *   - the checkpoint's per-layer scales ($MOE_KV_MODELS, t/kv_fp8.t: copies
 *     of the tiny model with scales K (1 + 0.3 l), V (1 + 0.3 l)):
 *     moe_model_kv_scales reads them in vLLM's naming (self_attn.k_scale /
 *     v_scale), compressed-tensors' (k_proj / v_proj.output_scale) and
 *     AutoFP8's (kv_scale, both); with kv_cache_dtype fp8 and no YAML
 *     scales each layer's K / V values lie on the e4m3 grid of that
 *     layer's scales and layer 1's not on layer 0's (the scales are used
 *     per layer); a YAML kv_cache_scale_k replaces the checkpoint's K
 *     scales only; a model without scale tensors has none; scales for
 *     some layers only, per-head scales and a negative scale still load
 *     (a bf16 cache never reads them) and serve with the default cache
 *     and with both YAML scales, but an fp8 cache that would use them is
 *     refused with the YAML file, the tensor or layer named.
 * Run from the repository root or with MOE_SRCDIR.
 */

#include <limits.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "moe.h"
#include "backends/backend.h"
#include "fp8.h"
#include "tap.h"

#define BS  4


static void
opts_init(moe_backend_opts_t *o)
{
    memset(o, 0, sizeof(*o));
    o->file = "test.yaml";
    o->backend = "cpu";
    o->tensor_parallel_size = 1;
    o->cpu_threads = 1;
    o->block_size = BS;
    o->max_model_len = 64;
    o->max_num_seqs = 3;
    o->max_num_batched_tokens = 256;
    o->kv_cache_blocks = 32;
    o->swap_space = 0;
}


static int
step(moe_backend_t *b, float *logits)
{
    static const int32_t toks[5] = { 11, 200, 37, 5, 499 };
    static const int32_t table[2] = { 1, 0 };
    moe_seq_batch_t      sb;

    memset(&sb, 0, sizeof(sb));
    sb.tokens = toks;
    sb.n_tokens = 5;
    sb.pos = 0;
    sb.block_table = table;
    sb.n_blocks = 2;
    sb.logits = logits;
    return b->forward(b, &sb, 1);
}


/* Values of block `blk` (swapped out to slot 0): how many K / V values
 * are not on the e4m3 grid of their layer's scale (ks[l], vs[l]), and
 * how many are nonzero. */
static int
grid_check(moe_backend_t *b, const moe_hparams_t *hp, int blk,
    const float *ks, const float *vs, int *off_grid, int *nonzero)
{
    int32_t blocks[1] = { blk }, slots[1] = { 0 };
    size_t  n = (size_t) b->kv_bytes_per_block / sizeof(float);
    size_t  row = (size_t) BS * hp->n_kv_heads * hp->head_dim;
    float  *buf = malloc((size_t) b->kv_bytes_per_block);
    char    err[256];
    int     rc;

    *off_grid = *nonzero = 0;
    if (buf == NULL) {
        return -1;
    }
    rc = b->swap_alloc(b, 1, err, sizeof(err));
    if (rc == MOE_OK) {
        rc = b->swap_out(b, blocks, slots, 1);
    }
    if (rc == MOE_OK) {
        rc = b->swap_read(b, 0, buf);
    }
    for (size_t i = 0; rc == MOE_OK && i < n; i++) {
        /* (n_layers, 2, block_size, n_kv, hd): K rows then V rows */
        size_t l = i / (2 * row);
        float  sc = (i / row) % 2 == 0 ? ks[l] : vs[l];

        *off_grid += moe_fp8_round(buf[i], sc) != buf[i];
        *nonzero += buf[i] != 0.0f;
    }
    free(buf);
    (void) b->swap_alloc(b, 0, err, sizeof(err));
    return rc;
}


/* Load dir/name on the CPU (fp32) into *m; the status. */
static int
load(const char *dir, const char *name, moe_model_t **m, char *err,
    size_t errlen)
{
    moe_backend_opts_t o;
    moe_backend_kind_t kind = 0;
    char               path[PATH_MAX];

    opts_init(&o);
    snprintf(path, sizeof(path), "%s/%s", dir, name);
    *m = NULL;
    return moe_backend_load_model(&o, path, 0, &kind, m, err, errlen);
}


/* Create a CPU backend for m with o and destroy it; the status (err
 * cleared first, the reason on failure). */
static int
create_only(const moe_backend_opts_t *o, moe_model_t *m, char *err,
    size_t errlen)
{
    moe_backend_t *b = NULL;
    int            rc;

    err[0] = '\0';
    rc = moe_backend_create(o, MOE_BACKEND_CPU, m, &b, err, errlen);
    if (b != NULL) {
        b->destroy(b);
    }
    return rc;
}


/* Whether moe_model_kv_scales(m) gives K k0 (1 + 0.3 l), V v0 (...). */
static int
scales_are(const moe_model_t *m, double k0, double v0)
{
    float k[MOE_MAX_LAYERS], v[MOE_MAX_LAYERS];
    char  err[384];
    int   l, ok = moe_model_kv_scales(m, k, v, err, sizeof(err)) == 1;

    for (l = 0; ok && l < moe_model_hparams(m)->n_layers; l++) {
        ok = k[l] == (float) (k0 * (1.0 + 0.3 * l))
             && v[l] == (float) (v0 * (1.0 + 0.3 * l));
        if (!ok) {
            TAP_DIAG("layer %d: k %g v %g", l, (double) k[l], (double) v[l]);
        }
    }
    return ok;
}


/* The checkpoint's per-layer scales (models in dir, t/kv_fp8.t). */
static void
test_ckpt_scales(const char *dir)
{
    static const struct {
        const char *name;
        int         rc;
        const char *says;
    } bad[] = {
        { "bad-kv-missing", MOE_EFORMAT, "layer 1 has no V cache scale" },
        { "bad-kv-perhead", MOE_EUNSUPPORTED,
          "model.layers.0.self_attn.k_scale: 2 values" },
        { "bad-kv-neg", MOE_EFORMAT,
          "model.layers.0.self_attn.k_scale: the KV cache scale -0.6" },
    };
    moe_backend_opts_t  o;
    moe_backend_t      *b = NULL;
    moe_model_t        *m;
    float               k[MOE_MAX_LAYERS], v[MOE_MAX_LAYERS];
    float               k0[MOE_MAX_LAYERS], v0[MOE_MAX_LAYERS];
    float               l8[512];
    char                err[512];
    int                 rc, off = -1, nz = 0, off0 = -1, nz0;
    size_t              i;

    rc = load(dir, "fp8-kv", &m, err, sizeof(err));
    if (rc != MOE_OK) {
        TAP_OK(0, "fp8-kv loads: %s", err);
        return;
    }
    TAP_OK(scales_are(m, 0.6, 0.35), "fp8-kv: self_attn.k_scale / v_scale "
           "read per layer");
    (void) moe_model_kv_scales(m, k, v, err, sizeof(err));
    for (int l = 0; l < MOE_MAX_LAYERS; l++) {
        k0[l] = k[0];
        v0[l] = v[0];
    }

    /* no YAML scales: each layer's from the checkpoint */
    opts_init(&o);
    o.kv_fp8 = 1;
    rc = moe_backend_create(&o, MOE_BACKEND_CPU, m, &b, err, sizeof(err));
    if (rc == MOE_OK && moe_model_hparams(m)->vocab_size > 512) {
        snprintf(err, sizeof(err), "vocab %d > 512",
                 moe_model_hparams(m)->vocab_size);
        rc = MOE_EINVAL;
    }
    if (rc == MOE_OK) {
        rc = step(b, l8);
    }
    if (rc == MOE_OK) {
        rc = grid_check(b, moe_model_hparams(m), 1, k, v, &off, &nz);
    }
    if (rc == MOE_OK) {
        rc = grid_check(b, moe_model_hparams(m), 1, k0, v0, &off0, &nz0);
    }
    TAP_OK(rc == MOE_OK && off == 0 && nz > 0 && off0 > 0, "fp8 cache with "
           "the checkpoint's scales: every K/V value on its layer's e4m3 "
           "grid (%d off, %d nonzero); on layer 0's grid everywhere %d are "
           "off (the check can fail) (%s)", off, nz, off0,
           rc == MOE_OK ? "ok" : err);
    if (b != NULL) {
        b->destroy(b);
        b = NULL;
    }

    /* a YAML K scale replaces the checkpoint's K scales only */
    o.kv_k_scale = 0.9f;
    for (int l = 0; l < MOE_MAX_LAYERS; l++) {
        k0[l] = 0.9f;
    }
    off = -1;
    rc = moe_backend_create(&o, MOE_BACKEND_CPU, m, &b, err, sizeof(err));
    if (rc == MOE_OK) {
        rc = step(b, l8);
    }
    if (rc == MOE_OK) {
        rc = grid_check(b, moe_model_hparams(m), 1, k0, v, &off, &nz);
    }
    TAP_OK(rc == MOE_OK && off == 0 && nz > 0, "kv_cache_scale_k 0.9: K on "
           "its grid, V on the checkpoint's per-layer grids (%d off) (%s)",
           off, rc == MOE_OK ? "ok" : err);
    if (b != NULL) {
        b->destroy(b);
    }
    moe_model_free(m);

    rc = load(dir, "ct-fp8-kv-output", &m, err, sizeof(err));
    TAP_OK(rc == MOE_OK && scales_are(m, 0.6, 0.35), "compressed-tensors' "
           "k_proj / v_proj.output_scale read per layer (%s)",
           rc == MOE_OK ? "ok" : err);
    moe_model_free(m);
    rc = load(dir, "awq-kv-one", &m, err, sizeof(err));
    TAP_OK(rc == MOE_OK && scales_are(m, 0.75, 0.75), "AutoFP8's kv_scale "
           "read per layer for K and V (%s)", rc == MOE_OK ? "ok" : err);
    moe_model_free(m);

    for (i = 0; i < sizeof(bad) / sizeof(bad[0]); i++) {
        int rc_def, rc_yaml, rc_ck;

        err[0] = '\0';
        rc = load(dir, bad[i].name, &m, err, sizeof(err));
        if (rc != MOE_OK) {
            TAP_OK(0, "%s loads (a bf16 cache never reads the scales): %s",
                   bad[i].name, err);
            continue;
        }
        /* the default cache; fp8 with both scales from the YAML; fp8
         * with the checkpoint's V scales (refused) */
        opts_init(&o);
        rc_def = create_only(&o, m, err, sizeof(err));
        o.kv_fp8 = 1;
        o.kv_k_scale = 0.5f;
        o.kv_v_scale = 0.5f;
        rc_yaml = create_only(&o, m, err, sizeof(err));
        o.kv_v_scale = 0.0f;
        rc_ck = create_only(&o, m, err, sizeof(err));
        TAP_OK(rc_def == MOE_OK && rc_yaml == MOE_OK && rc_ck == bad[i].rc
               && strstr(err, bad[i].says) != NULL
               && strstr(err, "test.yaml") != NULL,
               "%s: loads, serves with the default cache (rc %d) and with "
               "both YAML scales (rc %d); an fp8 cache reading its scales "
               "refused (rc %d): %s", bad[i].name, rc_def, rc_yaml, rc_ck,
               err);
        moe_model_free(m);
    }
}


int
main(void)
{
    char                dir[PATH_MAX], err[512], path[PATH_MAX];
    const char         *src = getenv("MOE_SRCDIR");
    moe_config_t       *c = calloc(1, sizeof(*c));
    moe_backend_opts_t  o;
    moe_backend_kind_t  kind = 0;
    moe_model_t        *m = NULL;
    moe_backend_t      *b8 = NULL, *bd = NULL;
    float              *l8, *ld;
    int                 rc, V, off8 = -1, nz8 = 0, offd = -1, nzd = 0;
    int                 ran8 = 0, rand = 0;
    double              num = 0, den = 0;
    float               ks05[MOE_MAX_LAYERS], vs025[MOE_MAX_LAYERS];

    if (c == NULL) {
        return 1;
    }
    for (int l = 0; l < MOE_MAX_LAYERS; l++) {
        ks05[l] = 0.5f;
        vs025[l] = 0.25f;
    }
    src = src != NULL ? src : ".";

    /* the YAML key */
    snprintf(path, sizeof(path), "%s/t/data/conf/kvfp8_ok.yaml", src);
    rc = moe_config_load(path, c, err, sizeof(err));
    TAP_OK(rc == MOE_OK && strcmp(c->kv_cache_dtype, "fp8") == 0
           && c->kv_cache_scale_k == 0.5 && c->kv_cache_scale_v == 0.0,
           "kv_cache_dtype fp8, kv_cache_scale_k 0.5 loads, scale_v "
           "unset (0: the checkpoint's, else 1.0) (%s)",
           rc == MOE_OK ? "ok" : err);
    snprintf(path, sizeof(path), "%s/t/data/conf/bad_kv_dtype.yaml", src);
    rc = moe_config_load(path, c, err, sizeof(err));
    TAP_OK(rc == MOE_EINVAL && strstr(err, ":3:") != NULL
           && strstr(err, "kv_cache_dtype must be auto, fp8, fp8_e4m3")
              != NULL, "kv_cache_dtype int8 refused: %s", err);
    snprintf(path, sizeof(path), "%s/t/data/conf/bad_kv_scale.yaml", src);
    rc = moe_config_load(path, c, err, sizeof(err));
    TAP_OK(rc == MOE_EINVAL && strstr(err, ":4:") != NULL
           && strstr(err, "kv_cache_scale_v") != NULL,
           "kv_cache_scale_v 0 refused: %s", err);

    /* the CPU backend */
    snprintf(dir, sizeof(dir), "%s/models/localmoe-tiny", src);
    opts_init(&o);
    rc = moe_backend_load_model(&o, dir, 0, &kind, &m, err, sizeof(err));
    if (rc != MOE_OK) {
        TAP_DIAG("load %s: %s", dir, err);
        return 1;
    }
    V = moe_model_hparams(m)->vocab_size;
    l8 = malloc(sizeof(float) * (size_t) V);
    ld = malloc(sizeof(float) * (size_t) V);

    o.kv_fp8 = 1;
    o.kv_k_scale = 0.5f;
    o.kv_v_scale = 0.25f;
    rc = moe_backend_create(&o, MOE_BACKEND_CPU, m, &b8, err, sizeof(err));
    if (rc == MOE_OK) {
        rc = step(b8, l8);
        ran8 = rc == MOE_OK;
    }
    if (rc == MOE_OK) {
        rc = grid_check(b8, moe_model_hparams(m), 1, ks05, vs025, &off8,
                        &nz8);
    }
    TAP_OK(rc == MOE_OK && off8 == 0 && nz8 > 0, "fp8 cache: every K/V "
           "value of the written block on the e4m3 grid of its scale (%d "
           "off, %d nonzero) (%s)", off8, nz8, rc == MOE_OK ? "ok" : err);

    opts_init(&o);
    rc = moe_backend_create(&o, MOE_BACKEND_CPU, m, &bd, err, sizeof(err));
    if (rc == MOE_OK) {
        rc = step(bd, ld);
        rand = rc == MOE_OK;
    }
    if (rc == MOE_OK) {
        rc = grid_check(bd, moe_model_hparams(m), 1, ks05, vs025, &offd,
                        &nzd);
    }
    TAP_OK(rc == MOE_OK && offd > 0, "default cache: fp32 values, %d of "
           "%d nonzero off the e4m3 grid (the check can fail)", offd, nzd);

    for (int i = 0; i < V; i++) {
        num += ((double) l8[i] - ld[i]) * ((double) l8[i] - ld[i]);
        den += (double) ld[i] * ld[i];
    }
    TAP_OK(ran8 && rand && num > 0 && sqrt(num / den) < 0.3, "fp8 logits differ from the "
           "default's by relative L2 %.3g (> 0, < 0.3)", sqrt(num / den));

    {
        float one[MOE_MAX_LAYERS], bad[MOE_MAX_LAYERS];

        for (int l = 0; l < MOE_MAX_LAYERS; l++) {
            one[l] = 1.0f;
            bad[l] = l == 1 ? 0.0f : 1.0f;      /* the second layer's */
        }
        TAP_OK(moe_cpu_backend_set_kv_fp8(bd, bad, one, err, sizeof(err))
               == MOE_EINVAL && strstr(err, "scales") != NULL
               && strstr(err, "layer 1") != NULL,
               "set_kv_fp8 scale 0 (layer 1's K) refused: %s", err);
        bad[1] = NAN;
        TAP_OK(moe_cpu_backend_set_kv_fp8(bd, one, bad, err, sizeof(err))
               == MOE_EINVAL, "set_kv_fp8 scale NaN (layer 1's V) "
               "refused: %s", err);
    }

    if (b8 != NULL) {
        b8->destroy(b8);
    }
    if (bd != NULL) {
        bd->destroy(bd);
    }
    {
        float k[MOE_MAX_LAYERS], v[MOE_MAX_LAYERS];

        TAP_OK(moe_model_kv_scales(m, k, v, err, sizeof(err)) == 0,
               "localmoe-tiny has no "
               "KV cache scales");
    }
    moe_model_free(m);
    free(l8);
    free(ld);
    free(c);
    if (getenv("MOE_KV_MODELS") != NULL) {
        test_ckpt_scales(getenv("MOE_KV_MODELS"));
    } else {
        TAP_DIAG("MOE_KV_MODELS unset: the checkpoint scale tests skipped "
                 "(t/kv_fp8.t sets it)");
    }
    TAP_PLAN(tap_n);
    return TAP_DONE();
}
