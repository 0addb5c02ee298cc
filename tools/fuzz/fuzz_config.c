/*
 * libFuzzer harness: config.json of a model directory (engine/model/model.c
 * m_parse_config, engine/model/quant.c moe_qconfig_parse, model/rope.c).
 *
 * The input is the text of config.json.  It is parsed with
 * moe_json_parse_object() and its quantization_config with
 * moe_qconfig_parse() (then moe_qconfig_request() with every YAML
 * `quantization` value and moe_qconfig_ignored() on a few module names),
 * and loaded as a model directory with moe_model_load_config().  When that
 * succeeds the hyperparameters must be usable: positive sizes, heads that
 * divide, at most MOE_MAX_LAYERS layers, top_k within the experts, a
 * finite non-negative norm_eps and, with RoPE (all but GPT-2), an even
 * head_dim, finite positive rope_theta / rope factor;
 * the RoPE frequencies and a 2-way shard are computed, and the directory
 * is loaded again with the weights of models/localmoe-tiny
 * (moe_model_load_quant(), fp32 load), which must load or fail with a
 * message.  A failure must name config.json (out of memory aside).
 */

#include <limits.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "fuzz_files.h"
#include "model/model.h"
#include "model/quant.h"
#include "model/safetensors.h"
#include "util/json.h"

static char  weights[PATH_MAX];


/* <repo>/models/localmoe-tiny/model.safetensors, from build/fuzz/<exe> */
static void
find_weights(void)
{
    char     exe[PATH_MAX], link[PATH_MAX + 32];
    char    *slash;
    ssize_t  n;
    int      i;

    n = readlink("/proc/self/exe", exe, sizeof(exe) - 1);
    FF_CHECK(n > 0, "readlink /proc/self/exe");
    exe[n] = '\0';
    for (i = 0; i < 3; i++) {
        slash = strrchr(exe, '/');
        FF_CHECK(slash != NULL, "exe path %s", exe);
        *slash = '\0';
    }
    snprintf(weights, sizeof(weights), "%s/models/localmoe-tiny/"
             "model.safetensors", exe);
    FF_CHECK(access(weights, R_OK) == 0, "no %s", weights);
    ff_path(link, sizeof(link), "model.safetensors");
    FF_CHECK(symlink(weights, link) == 0, "symlink %s", link);
}


static void
check_qconfig(const char *text, const char *path)
{
    static const char *const  req[] = { "", "fp8", "awq", "gptq",
                                        "compressed-tensors", "FP8" };
    static const char *const  mods[] = {
        "model.layers.0.self_attn.q_proj", "model.layers.1.mlp.down_proj",
        "lm_head", ""
    };
    struct yajl_val_s        *root;
    moe_qconfig_t             q, r;
    char                      err[512];
    size_t                    i;
    int                       rc;

    err[0] = '\0';
    rc = moe_json_parse_object(text, path, "", &root, err, sizeof(err));
    if (rc != MOE_OK) {
        FF_CHECK(root == NULL, "root on failure");
        FF_CHECK(strstr(err, path) != NULL, "no file name: %s", err);
        return;
    }
    err[0] = '\0';
    rc = moe_qconfig_parse(root, path, &q, err, sizeof(err));
    yajl_tree_free(root);
    if (rc != MOE_OK) {
        FF_CHECK(strstr(err, path) != NULL, "no file name: %s", err);
        return;
    }
    FF_CHECK(q.n_ignore >= 0 && q.n_ignore <= MOE_Q_MAX_IGNORE, "n_ignore");
    FF_CHECK(q.method == MOE_QM_NONE || q.bits == 4 || q.bits == 8,
             "bits %d", q.bits);
    FF_CHECK(q.group_size == 0 || q.group_size == -1 || q.group_size >= 1,
             "group_size %d", q.group_size);
    FF_CHECK((q.block_n == 0) == (q.block_k == 0), "block %d x %d",
             q.block_n, q.block_k);
    for (i = 0; i < sizeof(req) / sizeof(req[0]); i++) {
        r = q;
        err[0] = '\0';
        rc = moe_qconfig_request(&r, req[i], "dir", err, sizeof(err));
        FF_CHECK(rc == MOE_OK || strstr(err, "dir") != NULL,
                 "request %s: %s", req[i], err);
    }
    for (i = 0; i < sizeof(mods) / sizeof(mods[0]); i++) {
        (void) moe_qconfig_ignored(&q, mods[i]);
    }
}


static void
check_hparams(const moe_hparams_t *hp)
{
    moe_hparams_t  sh;
    float         *inv, scale;
    double         base;
    char           err[512];

    FF_CHECK(hp->dim >= 1 && hp->n_heads >= 1 && hp->n_kv_heads >= 1
             && hp->ffn_dim >= 1 && hp->vocab_size >= 1 && hp->max_pos >= 1,
             "sizes %d %d %d %d %d %d", hp->dim, hp->n_heads, hp->n_kv_heads,
             hp->ffn_dim, hp->vocab_size, hp->max_pos);
    FF_CHECK(hp->n_layers >= 1 && hp->n_layers <= MOE_MAX_LAYERS,
             "n_layers %d", hp->n_layers);
    FF_CHECK(hp->n_heads % hp->n_kv_heads == 0, "heads %d kv %d",
             hp->n_heads, hp->n_kv_heads);
    FF_CHECK(hp->head_dim >= 1, "head_dim %d", hp->head_dim);
    FF_CHECK(hp->n_experts >= 1 && hp->top_k >= 1
             && hp->top_k <= hp->n_experts, "experts %d top_k %d",
             hp->n_experts, hp->top_k);
    FF_CHECK(hp->n_eos >= 0 && hp->n_eos <= 8, "n_eos %d", hp->n_eos);
    FF_CHECK(hp->sliding_window >= 0, "sliding_window %d",
             hp->sliding_window);
    FF_CHECK(isfinite(hp->norm_eps) && hp->norm_eps >= 0, "norm_eps %g",
             hp->norm_eps);
    if (hp->learned_pos) {
        goto shard;                 /* GPT-2: no RoPE */
    }
    FF_CHECK(isfinite(hp->rope_theta) && hp->rope_theta > 0,
             "rope_theta %g", hp->rope_theta);
    FF_CHECK(isfinite(hp->rope_factor) && hp->rope_factor > 0,
             "rope factor %g", hp->rope_factor);
    FF_CHECK(hp->rope_orig_max >= 1, "original_max_position_embeddings %d",
             hp->rope_orig_max);
    FF_CHECK(hp->head_dim % 2 == 0, "RoPE head_dim %d", hp->head_dim);

    if (hp->head_dim <= 65536) {
        inv = malloc((size_t) hp->head_dim / 2 * sizeof(float));
        FF_CHECK(inv != NULL, "malloc");
        moe_rope_inv_freq(hp, inv, &scale);
        base = moe_rope_dynamic_base(hp, hp->max_pos < INT_MAX / 2
                                         ? 2 * hp->max_pos : INT_MAX);
        moe_rope_inv_freq_base(hp, base, inv);
        free(inv);
    }
shard:
    err[0] = '\0';
    if (moe_hparams_shard(hp, 2, &sh, err, sizeof(err)) != MOE_OK) {
        FF_CHECK(err[0] != '\0', "shard failed without a message");
    }
}


int
LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    char          path[128], err[512], *text;
    const char   *dir;
    moe_model_t  *m;
    int           rc;

    dir = ff_dir();
    if (weights[0] == '\0') {
        find_weights();
    }
    text = malloc(size + 1);
    FF_CHECK(text != NULL, "malloc");
    memcpy(text, data, size);
    text[size] = '\0';

    ff_path(path, sizeof(path), "config.json");
    check_qconfig(text, path);

    ff_write(path, data, size);
    free(text);
    err[0] = '\0';
    rc = moe_model_load_config(dir, 0, &m, err, sizeof(err));
    if (rc != MOE_OK) {
        FF_CHECK(m == NULL, "model on failure");
        FF_CHECK(rc == MOE_ENOMEM || strstr(err, "config.json") != NULL,
                 "no file name: %s", err);
        return 0;
    }
    check_hparams(moe_model_hparams(m));
    moe_model_free(m);

    err[0] = '\0';
    rc = moe_model_load_quant(dir, 0, NULL, 0, &m, err, sizeof(err));
    if (rc != MOE_OK) {
        FF_CHECK(m == NULL, "model on failure");
        FF_CHECK(err[0] != '\0', "load failed without a message");
        return 0;
    }
    check_hparams(moe_model_hparams(m));
    moe_model_free(m);
    return 0;
}
