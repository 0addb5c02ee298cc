/*
 * Model loading: config.json (+ generation_config.json) into moe_hparams_t,
 * safetensors weights into fp32 host arrays (moe_weights_t).
 *
 * Accepted weight names (HF checkpoints as published and as transformers 5
 * saves them):
 *   model.embed_tokens.weight, model.norm.weight, lm_head.weight (absent
 *   when tied), model.layers.L.{input,post_attention}_layernorm.weight,
 *   model.layers.L.self_attn.{q,k,v,o}_proj.weight,
 *   dense:   model.layers.L.mlp.{gate,up,down}_proj.weight
 *   Mixtral: router  model.layers.L.{block_sparse_moe,mlp}.gate.weight
 *            experts per expert  ...experts.E.{w1,w3,w2}.weight
 *                    (or ...experts.E.{gate,up,down}_proj.weight)
 *            or fused ...experts.gate_up_proj[.weight] (E, 2*ffn, dim),
 *                     ...experts.down_proj[.weight]    (E, dim, ffn)
 *   Llama attention_bias / mlp_bias: ...{q,k,v,o}_proj.bias,
 *            mlp.{gate,up,down}_proj.bias
 *   Qwen2:   self_attn.{q,k,v}_proj.bias
 *   Qwen2-MoE / Qwen3-MoE: router mlp.gate.weight, experts as above under
 *            mlp.experts (per-expert gate/up/down_proj or fused); dense
 *            (mlp_only_layers / decoder_sparse_step) layers
 *            mlp.{gate,up,down}_proj.weight of intermediate_size;
 *            Qwen2-MoE shared expert mlp.shared_expert.{gate,up,down}_proj
 *            .weight + mlp.shared_expert_gate.weight (1, dim), q/k/v bias
 *            when qkv_bias; Qwen3-MoE self_attn.{q,k}_norm.weight (head_dim)
 *   GPT-2:   [transformer.]{wte,wpe}.weight, [transformer.]ln_f.{weight,bias},
 *            [transformer.]h.L.{ln_1,ln_2}.{weight,bias},
 *            h.L.attn.c_attn.{weight (dim, 3*dim),bias}, h.L.attn.c_proj.*,
 *            h.L.mlp.c_fc.{weight (dim, ffn),bias}, h.L.mlp.c_proj.*; Conv1D
 *            weights are stored (in, out) and transposed here; the
 *            attn.bias / attn.masked_bias buffers are ignored; lm_head is
 *            wte unless tie_word_embeddings is false.
 *
 * Config fields the engine cannot honour (unknown architecture, RoPE
 * scaling, activations other than silu (GPT-2: gelu_new / gelu), a sliding
 * window on only some layers, ...) fail the load with MOE_EUNSUPPORTED and
 * a one-line reason.
 */

#include <errno.h>
#include <float.h>
#include <limits.h>
#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include <yajl/yajl_tree.h>

#include "model/model.h"
#include "model/quant.h"
#include "model/safetensors.h"
#include "util/json.h"
#include "util/par.h"

struct moe_model {
    char            dir[MOE_PATH_MAX];
    moe_hparams_t   hp;
    moe_weights_t   w;
    moe_st_set_t   *st;
    int64_t         weight_bytes;
    /* a tensor-parallel shard (moe_model_shard): the arrays it allocated
     * (the sliced ones); the others alias the parent's, which outlives it */
    int             shard;
    float          *owned[32];
    int             n_owned;
    /* quantized checkpoints (model/quant.h): quantization_config, and the
     * YAML `quantization` applied (MOE_QM_NONE: plain float weights) */
    moe_qconfig_t   q;
    /* the checkpoint's per-layer KV cache scales (m_kv_scales): kv_scales
     * 1 when every layer has them, [0] K, [1] V; < 0 (a moe status) when
     * they are malformed, why in kv_scale_err (refused only where an fp8
     * KV cache would use them) */
    int             kv_scales;
    float           kv_scale[2][MOE_MAX_LAYERS];
    char            kv_scale_err[320];
};

static const char *supported_archs =
    "LlamaForCausalLM, MistralForCausalLM, MixtralForCausalLM, "
    "Qwen2ForCausalLM, Qwen2MoeForCausalLM, Qwen3MoeForCausalLM, "
    "GPT2LMHeadModel";




/* Parse a JSON file; MOE_EIO when missing, MOE_EFORMAT when malformed. */
static int
m_parse_json(const char *path, yajl_val *out, char *err, size_t errlen)
{
    char  *text;
    int    rc;

    *out = NULL;
    text = moe_read_file(path, NULL);
    if (text == NULL) {
        moe_errf(err, errlen, "%s: %s", path, strerror(errno));
        return MOE_EIO;
    }
    rc = moe_json_parse_object(text, path, "", out, err, errlen);
    free(text);
    return rc;
}


static yajl_val
m_get(yajl_val obj, const char *key)
{
    return moe_json_get(obj, key);
}


/* Integer field: absent or null -> def; other types fail. */
static int
m_int(yajl_val obj, const char *file, const char *key, long long def,
    long long min, long long *out, char *err, size_t errlen)
{
    yajl_val v = m_get(obj, key);

    if (v == NULL || YAJL_IS_NULL(v)) {
        *out = def;
        return MOE_OK;
    }
    if (!YAJL_IS_INTEGER(v) || YAJL_GET_INTEGER(v) < min
        || YAJL_GET_INTEGER(v) > (1ll << 31) - 1)
    {
        moe_errf(err, errlen, "%s: '%s' must be an integer >= %lld", file, key,
              min);
        return MOE_EFORMAT;
    }
    *out = YAJL_GET_INTEGER(v);
    return MOE_OK;
}


static int
m_num(yajl_val obj, const char *file, const char *key, double def,
    double *out, char *err, size_t errlen)
{
    yajl_val v = m_get(obj, key);

    if (v == NULL || YAJL_IS_NULL(v)) {
        *out = def;
        return MOE_OK;
    }
    if (!YAJL_IS_NUMBER(v)) {
        moe_errf(err, errlen, "%s: '%s' must be a number", file, key);
        return MOE_EFORMAT;
    }
    *out = YAJL_IS_INTEGER(v) ? (double) YAJL_GET_INTEGER(v)
                              : YAJL_GET_DOUBLE(v);
    return MOE_OK;
}


/*
 * A number field kept as a float (an epsilon): absent or null -> def; it
 * must be >= 0 and finite as a float (1e39 would be inf).
 */
static int
m_eps(yajl_val obj, const char *file, const char *key, double def,
    float *out, char *err, size_t errlen)
{
    double  d;
    int     rc;

    rc = m_num(obj, file, key, def, &d, err, errlen);
    if (rc != MOE_OK) {
        return rc;
    }
    if (!(d >= 0 && d <= FLT_MAX)) {
        moe_errf(err, errlen, "%s: '%s' must be a number >= 0 and at most "
                 "%g, got %g", file, key, (double) FLT_MAX, d);
        return MOE_EFORMAT;
    }
    *out = (float) d;
    return MOE_OK;
}


static int
m_bool(yajl_val obj, const char *file, const char *key, int def, int *out,
    char *err, size_t errlen)
{
    yajl_val v = m_get(obj, key);

    if (v == NULL || YAJL_IS_NULL(v)) {
        *out = def;
    } else if (YAJL_IS_TRUE(v)) {
        *out = 1;
    } else if (YAJL_IS_FALSE(v)) {
        *out = 0;
    } else {
        moe_errf(err, errlen, "%s: '%s' must be true or false", file, key);
        return MOE_EFORMAT;
    }
    return MOE_OK;
}


/* eos_token_id: int or list of ints.  Absent/null leaves ids untouched and
 * returns 0; else 1. */
static int
m_eos(yajl_val obj, const char *file, int32_t *ids, int *n, char *err,
    size_t errlen)
{
    yajl_val v = m_get(obj, "eos_token_id");
    size_t   i;

    if (v == NULL || YAJL_IS_NULL(v)) {
        return 0;
    }
    if (YAJL_IS_INTEGER(v)) {
        ids[0] = (int32_t) YAJL_GET_INTEGER(v);
        *n = 1;
        return 1;
    }
    if (!YAJL_IS_ARRAY(v) || v->u.array.len > 8) {
        moe_errf(err, errlen, "%s: 'eos_token_id' must be an integer or a list "
              "of at most 8 integers", file);
        return MOE_EFORMAT;
    }
    for (i = 0; i < v->u.array.len; i++) {
        if (!YAJL_IS_INTEGER(v->u.array.values[i])) {
            moe_errf(err, errlen, "%s: 'eos_token_id' must be an integer or a "
                  "list of integers", file);
            return MOE_EFORMAT;
        }
        ids[i] = (int32_t) YAJL_GET_INTEGER(v->u.array.values[i]);
    }
    *n = (int) v->u.array.len;
    return 1;
}


/* A positive number field of a rope_scaling object: *out keeps def when
 * absent (def < 0: required). */
static int
m_rope_num(yajl_val v, const char *file, const char *obj, const char *key,
    double def, double *out, char *err, size_t errlen)
{
    yajl_val  x = m_get(v, key);

    if (x == NULL || YAJL_IS_NULL(x)) {
        if (def < 0) {
            moe_errf(err, errlen, "%s: %s needs '%s'", file, obj, key);
            return MOE_EFORMAT;
        }
        *out = def;
        return MOE_OK;
    }
    /* kept as floats: positive and finite once rounded to one */
    if (!YAJL_IS_NUMBER(x) || !(YAJL_GET_DOUBLE(x) >= FLT_MIN)
        || !(YAJL_GET_DOUBLE(x) <= FLT_MAX))
    {
        moe_errf(err, errlen, "%s: %s.%s must be a number > 0 (%g to %g)",
                 file, obj, key, (double) FLT_MIN, (double) FLT_MAX);
        return MOE_EFORMAT;
    }
    *out = YAJL_GET_DOUBLE(x);
    return MOE_OK;
}


/*
 * rope_scaling / rope_parameters (transformers 5 keeps rope_theta there):
 * default, linear, dynamic, yarn, llama3 (model/rope.c); other types are
 * refused by name.  hp->max_pos must be set.
 */
static int
m_rope(yajl_val root, const char *file, double *theta, moe_hparams_t *hp,
    char *err, size_t errlen)
{
    static const char *keys[] = { "rope_scaling", "rope_parameters" };
    yajl_val           v, t;
    size_t             k;
    int                rc;
    double             x;
    const char        *ty;

    hp->rope_type = MOE_ROPE_DEFAULT;
    hp->rope_factor = 1.0f;
    hp->rope_orig_max = hp->max_pos;
    hp->rope_truncate = 1;

    for (k = 0; k < 2; k++) {
        const char *o = keys[k];

        v = m_get(root, o);
        if (v == NULL || YAJL_IS_NULL(v)) {
            continue;
        }
        if (!YAJL_IS_OBJECT(v)) {
            moe_errf(err, errlen, "%s: '%s' must be an object or null", file,
                  o);
            return MOE_EFORMAT;
        }
        /* transformers 5 keeps rope_theta inside rope_parameters */
        if (m_get(v, "rope_theta") != NULL) {
            rc = m_num(v, file, "rope_theta", *theta, theta, err, errlen);
            if (rc != MOE_OK) {
                return rc;
            }
        }
        t = m_get(v, "rope_type");
        if (t == NULL) {
            t = m_get(v, "type");
        }
        if (t == NULL || YAJL_IS_NULL(t)) {
            continue;
        }
        if (!YAJL_IS_STRING(t)) {
            moe_errf(err, errlen, "%s: %s.rope_type must be a string", file,
                     o);
            return MOE_EFORMAT;
        }
        ty = t->u.string;
        if (strcmp(ty, "default") == 0 || strcmp(ty, "none") == 0) {
            continue;
        }
        if (strcmp(ty, "linear") == 0) {
            hp->rope_type = MOE_ROPE_LINEAR;
        } else if (strcmp(ty, "dynamic") == 0) {
            hp->rope_type = MOE_ROPE_DYNAMIC;
        } else if (strcmp(ty, "yarn") == 0) {
            hp->rope_type = MOE_ROPE_YARN;
        } else if (strcmp(ty, "llama3") == 0) {
            hp->rope_type = MOE_ROPE_LLAMA3;
        } else {
            moe_errf(err, errlen, "%s: %s type '%.40s' is not supported "
                     "(default, linear, dynamic, yarn, llama3 are)", file, o,
                     ty);
            return MOE_EUNSUPPORTED;
        }

        rc = m_rope_num(v, file, o, "factor", -1, &x, err, errlen);
        if (rc != MOE_OK) {
            return rc;
        }
        hp->rope_factor = (float) x;

        if (m_get(v, "original_max_position_embeddings") != NULL
            || hp->rope_type == MOE_ROPE_LLAMA3)
        {
            rc = m_rope_num(v, file, o, "original_max_position_embeddings",
                            -1, &x, err, errlen);
            if (rc == MOE_OK && !(x >= 1 && x <= INT_MAX)) {
                moe_errf(err, errlen, "%s: %s.original_max_position_"
                         "embeddings must be a length (1 to %d), got %g",
                         file, o, INT_MAX, x);
                rc = MOE_EFORMAT;
            }
            if (rc != MOE_OK) {
                return rc;
            }
            hp->rope_orig_max = (int) x;
            hp->rope_factor_from_len = hp->rope_type == MOE_ROPE_YARN;
        }

        if (hp->rope_type == MOE_ROPE_LLAMA3) {
            rc = m_rope_num(v, file, o, "low_freq_factor", -1, &x, err,
                            errlen);
            if (rc != MOE_OK) {
                return rc;
            }
            hp->rope_low_freq = (float) x;
            rc = m_rope_num(v, file, o, "high_freq_factor", -1, &x, err,
                            errlen);
            if (rc != MOE_OK) {
                return rc;
            }
            hp->rope_high_freq = (float) x;
            if (!(hp->rope_high_freq > hp->rope_low_freq)) {
                moe_errf(err, errlen, "%s: %s.high_freq_factor must be "
                         "larger than low_freq_factor", file, o);
                return MOE_EFORMAT;
            }
        }

        if (hp->rope_type == MOE_ROPE_YARN) {
            yajl_val tr = m_get(v, "truncate");

            rc = m_rope_num(v, file, o, "beta_fast", 32, &x, err, errlen);
            if (rc != MOE_OK) {
                return rc;
            }
            hp->rope_beta_fast = (float) x;
            rc = m_rope_num(v, file, o, "beta_slow", 1, &x, err, errlen);
            if (rc != MOE_OK) {
                return rc;
            }
            hp->rope_beta_slow = (float) x;
            rc = m_rope_num(v, file, o, "mscale", 0, &x, err, errlen);
            if (rc != MOE_OK) {
                return rc;
            }
            hp->rope_mscale = (float) x;
            rc = m_rope_num(v, file, o, "mscale_all_dim", 0, &x, err,
                            errlen);
            if (rc != MOE_OK) {
                return rc;
            }
            hp->rope_mscale_all = (float) x;
            rc = m_rope_num(v, file, o, "attention_factor", 0, &x, err,
                            errlen);
            if (rc != MOE_OK) {
                return rc;
            }
            hp->rope_attn_factor = (float) x;
            if (tr != NULL && !YAJL_IS_NULL(tr)) {
                hp->rope_truncate = !YAJL_IS_FALSE(tr);
            }
        }
    }
    return MOE_OK;
}


/* First present key of a NULL-terminated list (GPT-2 has its own names for
 * the common fields), else NULL. */
static const char *
m_key(yajl_val obj, const char *const *keys)
{
    for (; *keys != NULL; keys++) {
        if (m_get(obj, *keys) != NULL && !YAJL_IS_NULL(m_get(obj, *keys))) {
            return *keys;
        }
    }
    return NULL;
}


/* Required integer under one of `keys`. */
static int
m_req_int(yajl_val root, const char *const *keys, long long min, int *out,
    char *err, size_t errlen)
{
    const char *k = m_key(root, keys);
    long long   x;
    int         rc;

    if (k == NULL) {
        moe_errf(err, errlen, "config.json: needs '%s'", keys[0]);
        return MOE_EFORMAT;
    }
    rc = m_int(root, "config.json", k, 0, min, &x, err, errlen);
    if (rc == MOE_OK) {
        *out = (int) x;
    }
    return rc;
}


/* String field: absent/null -> def. */
static int
m_str(yajl_val obj, const char *key, const char *def, const char **out,
    char *err, size_t errlen)
{
    yajl_val v = m_get(obj, key);

    if (v == NULL || YAJL_IS_NULL(v)) {
        *out = def;
        return MOE_OK;
    }
    if (!YAJL_IS_STRING(v)) {
        moe_errf(err, errlen, "config.json: '%s' must be a string", key);
        return MOE_EFORMAT;
    }
    *out = v->u.string;
    return MOE_OK;
}


/*
 * Which layers use sliding-window attention, as transformers derives it
 * (explicit "layer_types", else per architecture from use_sliding_window /
 * max_window_layers).  The engine honours a window only when every layer
 * has it (or none does): a per-layer mix is refused.
 */
static int
m_qwen_window(yajl_val root, moe_hparams_t *hp, char *err, size_t errlen)
{
    yajl_val   lt;
    long long  win, mwl;
    int        use, l, n_slide = 0, rc;

    rc = m_bool(root, "config.json", "use_sliding_window", 0, &use, err,
                errlen);
    if (rc != MOE_OK) {
        return rc;
    }
    rc = m_int(root, "config.json", "sliding_window", 4096, 0, &win, err,
               errlen);
    if (rc != MOE_OK) {
        return rc;
    }
    rc = m_int(root, "config.json", "max_window_layers", 28, 0, &mwl, err,
               errlen);
    if (rc != MOE_OK) {
        return rc;
    }
    lt = m_get(root, "layer_types");
    if (lt != NULL && !YAJL_IS_NULL(lt) && hp->arch != MOE_ARCH_QWEN3_MOE) {
        if (!YAJL_IS_ARRAY(lt) || (int) lt->u.array.len != hp->n_layers) {
            moe_errf(err, errlen, "config.json: 'layer_types' must be a list of "
                  "%d strings", hp->n_layers);
            return MOE_EFORMAT;
        }
        for (l = 0; l < hp->n_layers; l++) {
            yajl_val s = lt->u.array.values[l];

            if (!YAJL_IS_STRING(s)
                || (strcmp(s->u.string, "full_attention") != 0
                    && strcmp(s->u.string, "sliding_attention") != 0))
            {
                moe_errf(err, errlen, "config.json: layer_types[%d] must be "
                      "full_attention or sliding_attention", l);
                return MOE_EUNSUPPORTED;
            }
            n_slide += strcmp(s->u.string, "sliding_attention") == 0;
        }
    } else if (use) {
        for (l = 0; l < hp->n_layers; l++) {
            if (hp->arch == MOE_ARCH_QWEN2) {
                n_slide += l >= mwl;
            } else if (hp->arch == MOE_ARCH_QWEN2_MOE) {
                n_slide += (l + 1) % 2 != 0 && l < mwl;
            } else {
                n_slide++;          /* Qwen3-MoE: every layer */
            }
        }
    }
    if (n_slide == 0 || win == 0) {
        hp->sliding_window = 0;
        return MOE_OK;
    }
    if (n_slide != hp->n_layers) {
        moe_errf(err, errlen, "config.json: sliding-window attention on %d of "
              "%d layers is not supported (only all or none)", n_slide,
              hp->n_layers);
        return MOE_EUNSUPPORTED;
    }
    hp->sliding_window = (int) win;
    return MOE_OK;
}


/* Qwen2-MoE / Qwen3-MoE: experts, routing and the dense-layer plan. */
static int
m_qwen_moe(yajl_val root, moe_hparams_t *hp, char *err, size_t errlen)
{
    int        qwen2 = hp->arch == MOE_ARCH_QWEN2_MOE;
    long long  x, step;
    int        b, l, rc;
    yajl_val   v;
    size_t     i;

#define CHECK(expr) do { rc = (expr); if (rc != MOE_OK) return rc; } while (0)

    CHECK(m_int(root, "config.json", "num_experts", qwen2 ? 60 : 128, 1, &x,
                err, errlen));
    hp->n_experts = (int) x;
    CHECK(m_int(root, "config.json", "num_experts_per_tok", qwen2 ? 4 : 8, 1,
                &x, err, errlen));
    hp->top_k = (int) x;
    if (hp->top_k > hp->n_experts) {
        moe_errf(err, errlen, "config.json: num_experts_per_tok %d > "
              "num_experts %d", hp->top_k, hp->n_experts);
        return MOE_EFORMAT;
    }
    CHECK(m_int(root, "config.json", "moe_intermediate_size",
                qwen2 ? 1408 : 768, 1, &x, err, errlen));
    hp->dense_ffn_dim = hp->ffn_dim;          /* intermediate_size */
    hp->ffn_dim = (int) x;
    CHECK(m_bool(root, "config.json", "norm_topk_prob", 0, &b, err, errlen));
    hp->router_no_renorm = !b;
    if (qwen2) {
        CHECK(m_int(root, "config.json", "shared_expert_intermediate_size",
                    5632, 1, &x, err, errlen));
        hp->shared_ffn_dim = (int) x;
    }
    CHECK(m_int(root, "config.json", "decoder_sparse_step", 1, 1, &step, err,
                errlen));
    for (l = 0; l < hp->n_layers; l++) {
        hp->layer_dense[l] = (l + 1) % step != 0;
    }
    v = m_get(root, "mlp_only_layers");
    if (v != NULL && !YAJL_IS_NULL(v)) {
        if (!YAJL_IS_ARRAY(v)) {
            moe_errf(err, errlen, "config.json: 'mlp_only_layers' must be a "
                  "list of layer indices");
            return MOE_EFORMAT;
        }
        for (i = 0; i < v->u.array.len; i++) {
            yajl_val e = v->u.array.values[i];

            if (!YAJL_IS_INTEGER(e) || YAJL_GET_INTEGER(e) < 0
                || YAJL_GET_INTEGER(e) >= hp->n_layers)
            {
                moe_errf(err, errlen, "config.json: mlp_only_layers[%zu] must "
                      "be a layer index below %d", i, hp->n_layers);
                return MOE_EFORMAT;
            }
            hp->layer_dense[YAJL_GET_INTEGER(e)] = 1;
        }
    }
    hp->n_dense_layers = 0;
    for (l = 0; l < hp->n_layers; l++) {
        hp->n_dense_layers += hp->layer_dense[l];
    }
    if (hp->n_dense_layers == 0) {
        hp->dense_ffn_dim = 0;
    }
#undef CHECK
    return MOE_OK;
}


/* GPT2LMHeadModel: GPT2Config's own names (n_embd, n_layer, ...). */
static int
m_parse_gpt2(yajl_val root, moe_hparams_t *hp, char *err, size_t errlen)
{
    static const char *const k_dim[] = { "n_embd", "hidden_size", NULL };
    static const char *const k_lay[] = { "n_layer", "num_hidden_layers",
                                         NULL };
    static const char *const k_head[] = { "n_head", "num_attention_heads",
                                          NULL };
    static const char *const k_pos[] = { "n_positions",
                                         "max_position_embeddings", "n_ctx",
                                         NULL };
    static const char *const k_voc[] = { "vocab_size", NULL };
    const char *act;
    long long   x;
    int         b, rc;

#define CHECK(expr) do { rc = (expr); if (rc != MOE_OK) return rc; } while (0)

    CHECK(m_req_int(root, k_dim, 1, &hp->dim, err, errlen));
    CHECK(m_req_int(root, k_lay, 1, &hp->n_layers, err, errlen));
    CHECK(m_req_int(root, k_head, 1, &hp->n_heads, err, errlen));
    CHECK(m_req_int(root, k_voc, 1, &hp->vocab_size, err, errlen));
    if (m_key(root, k_pos) == NULL) {
        hp->max_pos = 1024;
    } else {
        CHECK(m_req_int(root, k_pos, 1, &hp->max_pos, err, errlen));
    }
    if (hp->dim % hp->n_heads != 0) {
        moe_errf(err, errlen, "config.json: n_embd %d is not a multiple of "
              "n_head %d", hp->dim, hp->n_heads);
        return MOE_EFORMAT;
    }
    hp->n_kv_heads = hp->n_heads;
    hp->head_dim = hp->dim / hp->n_heads;
    CHECK(m_int(root, "config.json", "n_inner", 4ll * hp->dim, 1, &x, err,
                errlen));
    hp->ffn_dim = (int) x;
    hp->n_experts = 1;
    hp->top_k = 1;
    hp->rope_theta = 10000.0f;                /* unused: no RoPE */
    CHECK(m_eps(root, "config.json", "layer_norm_epsilon", 1e-5,
                &hp->norm_eps, err, errlen));
    CHECK(m_bool(root, "config.json", "tie_word_embeddings", 1,
                 &hp->tie_embeddings, err, errlen));

    CHECK(m_str(root, "activation_function", "gelu_new", &act, err,
                errlen));
    if (strcmp(act, "gelu_new") == 0
        || strcmp(act, "gelu_pytorch_tanh") == 0)
    {
        hp->act = MOE_ACT_GELU_TANH;
    } else if (strcmp(act, "gelu") == 0) {
        hp->act = MOE_ACT_GELU;
    } else {
        moe_errf(err, errlen, "config.json: activation_function '%.32s' is not "
              "supported (gelu_new, gelu_pytorch_tanh, gelu)", act);
        return MOE_EUNSUPPORTED;
    }
    CHECK(m_bool(root, "config.json", "scale_attn_weights", 1, &b, err,
                 errlen));
    if (!b) {
        moe_errf(err, errlen, "config.json: scale_attn_weights false is not "
              "supported");
        return MOE_EUNSUPPORTED;
    }
    CHECK(m_bool(root, "config.json", "scale_attn_by_inverse_layer_idx", 0,
                 &b, err, errlen));
    if (b) {
        moe_errf(err, errlen, "config.json: scale_attn_by_inverse_layer_idx is "
              "not supported");
        return MOE_EUNSUPPORTED;
    }
    CHECK(m_bool(root, "config.json", "add_cross_attention", 0, &b, err,
                 errlen));
    if (b) {
        moe_errf(err, errlen, "config.json: add_cross_attention is not "
              "supported");
        return MOE_EUNSUPPORTED;
    }
    hp->norm_layer = 1;
    hp->ffn_ungated = 1;
    hp->learned_pos = 1;
    hp->qkv_bias = 1;
    hp->o_bias = 1;
    hp->mlp_bias = 1;
#undef CHECK
    return MOE_OK;
}


static int
m_parse_config(const char *dir, moe_hparams_t *hp, char *err, size_t errlen)
{
    static const struct {
        const char  *name;
        moe_arch_t   arch;
    } archs[] = {
        { "LlamaForCausalLM", MOE_ARCH_LLAMA },
        { "MistralForCausalLM", MOE_ARCH_MISTRAL },
        { "MixtralForCausalLM", MOE_ARCH_MIXTRAL },
        { "Qwen2ForCausalLM", MOE_ARCH_QWEN2 },
        { "Qwen2MoeForCausalLM", MOE_ARCH_QWEN2_MOE },
        { "Qwen3MoeForCausalLM", MOE_ARCH_QWEN3_MOE },
        { "GPT2LMHeadModel", MOE_ARCH_GPT2 },
    };
    char        path[MOE_PATH_MAX + 64];
    yajl_val    root, v, groot;
    long long   x;
    double      d;
    int         rc, b;
    size_t      i;
    const char *arch, *act;
    int32_t     eos[8];
    int         n_eos, qwen_moe;

    memset(hp, 0, sizeof(*hp));
    snprintf(path, sizeof(path), "%s/config.json", dir);
    rc = m_parse_json(path, &root, err, errlen);
    if (rc != MOE_OK) {
        return rc;
    }

#define CHECK(expr) do { rc = (expr); if (rc != MOE_OK) goto done; } while (0)

    v = m_get(root, "architectures");
    if (v == NULL || !YAJL_IS_ARRAY(v) || v->u.array.len == 0
        || !YAJL_IS_STRING(v->u.array.values[0]))
    {
        moe_errf(err, errlen, "config.json: 'architectures' must be a list of "
              "names (supported: %s)", supported_archs);
        rc = MOE_EFORMAT;
        goto done;
    }
    arch = v->u.array.values[0]->u.string;
    for (i = 0; i < sizeof(archs) / sizeof(archs[0]); i++) {
        if (strcmp(arch, archs[i].name) == 0) {
            hp->arch = archs[i].arch;
            break;
        }
    }
    if (hp->arch == 0) {
        moe_errf(err, errlen, "config.json: architecture '%.64s' is not "
              "supported (supported: %s)", arch, supported_archs);
        rc = MOE_EUNSUPPORTED;
        goto done;
    }
    snprintf(hp->arch_name, sizeof(hp->arch_name), "%s", arch);
    qwen_moe = hp->arch == MOE_ARCH_QWEN2_MOE
               || hp->arch == MOE_ARCH_QWEN3_MOE;

    if (hp->arch == MOE_ARCH_GPT2) {
        CHECK(m_parse_gpt2(root, hp, err, errlen));
        if (hp->n_layers > MOE_MAX_LAYERS) {
            moe_errf(err, errlen, "config.json: %d layers (at most %d)",
                  hp->n_layers, MOE_MAX_LAYERS);
            rc = MOE_EUNSUPPORTED;
            goto done;
        }
        goto ids;
    }

    CHECK(m_int(root, "config.json", "hidden_size", -1, 1, &x, err, errlen));
    hp->dim = (int) x;
    CHECK(m_int(root, "config.json", "num_hidden_layers", -1, 1, &x, err,
                errlen));
    hp->n_layers = (int) x;
    CHECK(m_int(root, "config.json", "num_attention_heads", -1, 1, &x, err,
                errlen));
    hp->n_heads = (int) x;
    CHECK(m_int(root, "config.json", "intermediate_size", -1, 1, &x, err,
                errlen));
    hp->ffn_dim = (int) x;
    CHECK(m_int(root, "config.json", "vocab_size", -1, 1, &x, err, errlen));
    hp->vocab_size = (int) x;
    if (hp->dim < 0 || hp->n_layers < 0 || hp->n_heads < 0
        || hp->ffn_dim < 0 || hp->vocab_size < 0)
    {
        moe_errf(err, errlen, "config.json: needs hidden_size, "
              "num_hidden_layers, num_attention_heads, intermediate_size "
              "and vocab_size");
        rc = MOE_EFORMAT;
        goto done;
    }
    if (hp->n_layers > MOE_MAX_LAYERS) {
        moe_errf(err, errlen, "config.json: %d layers (at most %d)",
              hp->n_layers, MOE_MAX_LAYERS);
        rc = MOE_EUNSUPPORTED;
        goto done;
    }
    CHECK(m_int(root, "config.json", "num_key_value_heads", hp->n_heads, 1,
                &x, err, errlen));
    hp->n_kv_heads = (int) x;
    if (hp->n_heads % hp->n_kv_heads != 0) {
        moe_errf(err, errlen, "config.json: num_attention_heads %d is not a "
              "multiple of num_key_value_heads %d", hp->n_heads,
              hp->n_kv_heads);
        rc = MOE_EFORMAT;
        goto done;
    }
    CHECK(m_int(root, "config.json", "head_dim", hp->dim / hp->n_heads, 1,
                &x, err, errlen));
    hp->head_dim = (int) x;
    if (hp->head_dim % 2 != 0 || hp->head_dim < 2) {
        moe_errf(err, errlen, "config.json: head_dim %d must be even",
              hp->head_dim);
        rc = MOE_EFORMAT;
        goto done;
    }
    CHECK(m_int(root, "config.json", "max_position_embeddings", 2048, 1, &x,
                err, errlen));
    hp->max_pos = (int) x;

    if (hp->arch == MOE_ARCH_MIXTRAL) {
        CHECK(m_int(root, "config.json", "num_local_experts", 8, 1, &x, err,
                    errlen));
        hp->n_experts = (int) x;
        CHECK(m_int(root, "config.json", "num_experts_per_tok", 2, 1, &x,
                    err, errlen));
        hp->top_k = (int) x;
        if (hp->top_k > hp->n_experts) {
            moe_errf(err, errlen, "config.json: num_experts_per_tok %d > "
                  "num_local_experts %d", hp->top_k, hp->n_experts);
            rc = MOE_EFORMAT;
            goto done;
        }
    } else if (qwen_moe) {
        CHECK(m_qwen_moe(root, hp, err, errlen));
    } else {
        hp->n_experts = 1;
        hp->top_k = 1;
    }

    d = hp->arch == MOE_ARCH_MIXTRAL ? 1e6 : 1e4;
    CHECK(m_num(root, "config.json", "rope_theta", d, &d, err, errlen));
    CHECK(m_rope(root, "config.json", &d, hp, err, errlen));
    if (!(d >= FLT_MIN && d <= FLT_MAX)) {
        moe_errf(err, errlen, "config.json: rope_theta must be > 0 (%g to "
                 "%g), got %g", (double) FLT_MIN, (double) FLT_MAX, d);
        rc = MOE_EFORMAT;
        goto done;
    }
    hp->rope_theta = (float) d;
    CHECK(m_eps(root, "config.json", "rms_norm_eps", 1e-6, &hp->norm_eps,
                err, errlen));
    CHECK(m_bool(root, "config.json", "tie_word_embeddings", 0,
                 &hp->tie_embeddings, err, errlen));

    CHECK(m_str(root, "hidden_act", "silu", &act, err, errlen));
    if (strcmp(act, "silu") != 0) {
        moe_errf(err, errlen, "config.json: hidden_act '%.32s' is not supported "
              "(only silu)", act);
        rc = MOE_EUNSUPPORTED;
        goto done;
    }

    /* attention biases: Qwen2 always has q/k/v bias; Qwen2-MoE by
     * qkv_bias; Llama / Qwen3-MoE by attention_bias (q, k, v and o) */
    CHECK(m_bool(root, "config.json", "attention_bias", 0, &b, err, errlen));
    if (hp->arch == MOE_ARCH_QWEN2) {
        hp->qkv_bias = 1;
    } else if (hp->arch == MOE_ARCH_QWEN2_MOE) {
        CHECK(m_bool(root, "config.json", "qkv_bias", 1, &hp->qkv_bias, err,
                     errlen));
    } else if (hp->arch == MOE_ARCH_LLAMA
               || hp->arch == MOE_ARCH_QWEN3_MOE)
    {
        hp->qkv_bias = b;
        hp->o_bias = b;
    } else if (b) {
        moe_errf(err, errlen, "config.json: attention_bias is not supported "
              "for %s", arch);
        rc = MOE_EUNSUPPORTED;
        goto done;
    }
    hp->qk_norm = hp->arch == MOE_ARCH_QWEN3_MOE;
    CHECK(m_bool(root, "config.json", "mlp_bias", 0, &b, err, errlen));
    if (b && hp->arch != MOE_ARCH_LLAMA) {
        moe_errf(err, errlen, "config.json: mlp_bias is not supported for %s",
              arch);
        rc = MOE_EUNSUPPORTED;
        goto done;
    }
    hp->mlp_bias = b;

    if (hp->arch == MOE_ARCH_MISTRAL || hp->arch == MOE_ARCH_MIXTRAL) {
        CHECK(m_int(root, "config.json", "sliding_window", 0, 0, &x, err,
                    errlen));
        hp->sliding_window = (int) x;
    } else if (hp->arch != MOE_ARCH_LLAMA) {
        CHECK(m_qwen_window(root, hp, err, errlen));
    }

ids:
    CHECK(m_int(root, "config.json", "bos_token_id", -1, -1, &x, err,
                errlen));
    hp->bos_id = (int32_t) x;
    n_eos = 0;
    rc = m_eos(root, "config.json", hp->eos_ids, &hp->n_eos, err, errlen);
    if (rc < 0) {
        goto done;
    }

    /* generation_config.json (optional) overrides eos_token_id */
    snprintf(path, sizeof(path), "%s/generation_config.json", dir);
    if (access(path, F_OK) == 0) {
        rc = m_parse_json(path, &groot, err, errlen);
        if (rc != MOE_OK) {
            goto done;
        }
        rc = m_eos(groot, "generation_config.json", eos, &n_eos, err,
                   errlen);
        yajl_tree_free(groot);
        if (rc < 0) {
            goto done;
        }
        if (rc == 1) {
            memcpy(hp->eos_ids, eos, sizeof(eos));
            hp->n_eos = n_eos;
        }
    }
    rc = MOE_OK;

#undef CHECK

done:
    yajl_tree_free(root);
    return rc;
}


/* ------------------------------------------------------------ weights */

/*
 * The tensor walk: one naming logic for every consumer.  It finds each
 * tensor the hparams ask for, checks its shape, and hands the callback one
 * moe_tensor_ref_t per logical piece (a fused gate_up tensor gives a gate
 * and an up piece per expert, a GPT-2 c_attn gives q, k and v columns).
 * fn == NULL only validates.
 */
typedef int (*m_fn_t)(void *ctx, const moe_tensor_ref_t *t);

typedef struct {
    const char          *dir;
    const moe_st_set_t  *st;
    char                *err;
    size_t               errlen;
    m_fn_t               fn;
    void                *ctx;
    const moe_qconfig_t *q;         /* NULL or method NONE: float only */
    int                  packed;    /* quantized pieces not dequantized
                                       (moe_model_for_each_tensor_packed);
                                       M_DESCRIBE: described only
                                       (..._packed_describe) */
} m_ctx_t;

#define M_DESCRIBE 2


static void
m_shape_str(char *buf, size_t n, int nd, const int64_t *shape)
{
    size_t off = 0;
    int    i;

    off += (size_t) snprintf(buf + off, n - off, "[");
    for (i = 0; i < nd && off < n; i++) {
        off += (size_t) snprintf(buf + off, n - off, "%s%lld", i ? ", " : "",
                                 (long long) shape[i]);
    }
    if (off < n) {
        snprintf(buf + off, n - off, "]");
    }
}


/* Find `name` and check it has exactly the shape (nd dims). */
static int
m_find(m_ctx_t *c, const char *name, int nd, const int64_t *shape,
    const moe_st_tensor_t **out)
{
    const moe_st_tensor_t *t;
    char                   a[96], b[96];
    int                    i, same;

    t = moe_st_find(c->st, name);
    if (t == NULL) {
        moe_errf(c->err, c->errlen, "%s: missing tensor '%s'", c->dir, name);
        return MOE_EFORMAT;
    }
    same = t->n_dims == nd;
    for (i = 0; same && i < nd; i++) {
        same = t->shape[i] == shape[i];
    }
    if (!same) {
        m_shape_str(a, sizeof(a), t->n_dims, t->shape);
        m_shape_str(b, sizeof(b), nd, shape);
        moe_errf(c->err, c->errlen, "%s: tensor '%s' has shape %s, expected %s",
              t->file, name, a, b);
        return MOE_EFORMAT;
    }
    if (!moe_dtype_is_float(t->dtype)) {
        moe_errf(c->err, c->errlen, "%s: tensor '%s' has dtype %s, but this "
              "weight must be F32, F16 or BF16 (%s)", t->file, name,
              moe_dtype_name(t->dtype), c->q == NULL
              || c->q->method == MOE_QM_NONE
              ? "config.json has no quantization_config"
              : "it is not one the quantization_config quantizes");
        return MOE_EFORMAT;
    }
    *out = t;
    return MOE_OK;
}


/* Hand the callback one piece of t: destination (rows, cols) read from
 * element `first` on with source row stride ld (transposed: Conv1D). */
static int
m_emit(m_ctx_t *c, const moe_st_tensor_t *t, int kind, int layer,
    int expert, int64_t first, int64_t rows, int64_t cols, int transposed,
    int64_t ld)
{
    moe_tensor_ref_t r;

    if (c->fn == NULL) {
        return MOE_OK;
    }
    r.kind = kind;
    r.layer = layer;
    r.expert = expert;
    r.name = t->name;
    r.file = t->file;
    r.dtype = (int) t->dtype;
    r.data = (const unsigned char *) t->data
             + first * (int64_t) moe_dtype_size(t->dtype);
    r.rows = rows;
    r.cols = cols;
    r.transposed = transposed;
    r.ld = ld;
    r.quant = NULL;
    r.q_row0 = 0;
    r.q_col0 = 0;
    return c->fn(c->ctx, &r);
}


static int m_qload(m_ctx_t *c, const char *name, int kind, int layer,
    int expert, int64_t N, int64_t K, int *done);


/* The whole 1-D or 2-D tensor `name` (shape d0[, d1]) as one piece
 * (a quantized linear weight: m_qload). */
static int
m_load(m_ctx_t *c, const char *name, int kind, int layer, int expert,
    int64_t d0, int64_t d1)
{
    const moe_st_tensor_t *t;
    int64_t                shape[2] = { d0, d1 };
    int                    rc, done;

    if (c->q != NULL && c->q->method != MOE_QM_NONE && d1 > 0) {
        rc = m_qload(c, name, kind, layer, expert, d0, d1, &done);
        if (rc != MOE_OK || done) {
            return rc;
        }
    }
    rc = m_find(c, name, d1 > 0 ? 2 : 1, shape, &t);
    if (rc != MOE_OK) {
        return rc;
    }
    return d1 > 0 ? m_emit(c, t, kind, layer, expert, 0, d0, d1, 0, d1)
                  : m_emit(c, t, kind, layer, expert, 0, 1, d0, 0, d0);
}


/* Zeroed: rows a layer does not use (the experts of a dense layer of an
 * MoE model) stay 0. */
static float *
m_alloc(size_t n)
{
    return calloc(n ? n : 1, sizeof(float));
}


static int
m_is_moe(const moe_hparams_t *hp)
{
    return hp->arch == MOE_ARCH_MIXTRAL || hp->arch == MOE_ARCH_QWEN2_MOE
           || hp->arch == MOE_ARCH_QWEN3_MOE;
}


/* <base>.qweight (AWQ / GPTQ) or <base>.weight_packed (compressed-tensors
 * int4) exists for name "<base>.weight" (quantized experts) */
static int
m_has_qweight(const moe_st_set_t *st, const char *name)
{
    char   q[300];
    size_t n = strlen(name);

    if (n < 7 || n + 8 > sizeof(q)) {
        return 0;
    }
    snprintf(q, sizeof(q), "%.*sqweight", (int) (n - 6), name);
    if (moe_st_find(st, q) != NULL) {
        return 1;
    }
    snprintf(q, sizeof(q), "%.*sweight_packed", (int) (n - 6), name);
    return moe_st_find(st, q) != NULL;
}


static int
m_walk_experts(m_ctx_t *c, const moe_hparams_t *hp, int l)
{
    const moe_st_tensor_t *gu, *dn;
    const char            *pre, *s_gate, *s_up, *s_down;
    char                   name[256], name2[256];
    int64_t                D = hp->dim, F = hp->ffn_dim, E = hp->n_experts;
    int64_t                shape[3];
    int64_t                e;
    int                    rc, p;

    /* which prefix: Mixtral's block_sparse_moe or transformers 5's mlp */
    pre = "block_sparse_moe";
    for (p = 0; p < 2; p++) {
        const char *cand = p == 0 ? "block_sparse_moe" : "mlp";

        snprintf(name, sizeof(name), "model.layers.%d.%s.gate.weight", l,
                 cand);
        if (moe_st_find(c->st, name) != NULL) {
            pre = cand;
            break;
        }
    }

    snprintf(name, sizeof(name), "model.layers.%d.%s.gate.weight", l, pre);
    rc = m_load(c, name, MOE_WK_ROUTER, l, -1, E, D);
    if (rc != MOE_OK) {
        return rc;
    }

    /* fused layout */
    snprintf(name, sizeof(name), "model.layers.%d.%s.experts.gate_up_proj",
             l, pre);
    if (moe_st_find(c->st, name) == NULL) {
        strcat(name, ".weight");
    }
    if (moe_st_find(c->st, name) != NULL) {
        shape[0] = E;
        shape[1] = 2 * F;
        shape[2] = D;
        rc = m_find(c, name, 3, shape, &gu);
        if (rc != MOE_OK) {
            return rc;
        }
        snprintf(name2, sizeof(name2),
                 "model.layers.%d.%s.experts.down_proj%s", l, pre,
                 strstr(name, ".weight") ? ".weight" : "");
        shape[1] = D;
        shape[2] = F;
        rc = m_find(c, name2, 3, shape, &dn);
        if (rc != MOE_OK) {
            return rc;
        }
        for (e = 0; e < E; e++) {
            rc = m_emit(c, gu, MOE_WK_GATE, l, (int) e, e * 2 * F * D, F, D,
                        0, D);
            if (rc == MOE_OK) {
                rc = m_emit(c, gu, MOE_WK_UP, l, (int) e,
                            (e * 2 + 1) * F * D, F, D, 0, D);
            }
            if (rc != MOE_OK) {
                return rc;
            }
        }
        for (e = 0; e < E; e++) {
            rc = m_emit(c, dn, MOE_WK_DOWN, l, (int) e, e * D * F, D, F, 0,
                        F);
            if (rc != MOE_OK) {
                return rc;
            }
        }
        return MOE_OK;
    }

    /* per-expert layout: w1/w3/w2 (Mixtral) or gate/up/down_proj */
    snprintf(name, sizeof(name), "model.layers.%d.%s.experts.0.w1.weight", l,
             pre);
    if (moe_st_find(c->st, name) != NULL || m_has_qweight(c->st, name)) {
        s_gate = "w1";
        s_up = "w3";
        s_down = "w2";
    } else {
        snprintf(name, sizeof(name),
                 "model.layers.%d.%s.experts.0.gate_proj.weight", l, pre);
        if (moe_st_find(c->st, name) != NULL || m_has_qweight(c->st, name)) {
            s_gate = "gate_proj";
            s_up = "up_proj";
            s_down = "down_proj";
        } else {
            moe_errf(c->err, c->errlen, "%s: missing tensor "
                  "'model.layers.%d.%s.experts.0.w1.weight' (nor a fused "
                  "'experts.gate_up_proj')", c->dir, l, pre);
            return MOE_EFORMAT;
        }
    }
    for (e = 0; e < E; e++) {
        snprintf(name, sizeof(name), "model.layers.%d.%s.experts.%lld.%s"
                 ".weight", l, pre, (long long) e, s_gate);
        rc = m_load(c, name, MOE_WK_GATE, l, (int) e, F, D);
        if (rc != MOE_OK) {
            return rc;
        }
        snprintf(name, sizeof(name), "model.layers.%d.%s.experts.%lld.%s"
                 ".weight", l, pre, (long long) e, s_up);
        rc = m_load(c, name, MOE_WK_UP, l, (int) e, F, D);
        if (rc != MOE_OK) {
            return rc;
        }
        snprintf(name, sizeof(name), "model.layers.%d.%s.experts.%lld.%s"
                 ".weight", l, pre, (long long) e, s_down);
        rc = m_load(c, name, MOE_WK_DOWN, l, (int) e, D, F);
        if (rc != MOE_OK) {
            return rc;
        }
    }
    return MOE_OK;
}


/* GPT2LMHeadModel: names with or without the "transformer." prefix; the
 * attn.bias / attn.masked_bias buffers some checkpoints hold are ignored.
 * Conv1D weights are stored (in, out): their pieces are transposed, c_attn
 * (D, 3D) gives the q | k | v column blocks. */
static int
m_walk_gpt2(m_ctx_t *c, const moe_hparams_t *hp)
{
    const moe_st_tensor_t *t;
    int64_t                D = hp->dim, F = hp->ffn_dim, V = hp->vocab_size;
    int64_t                shape[2];
    const char            *pre;
    char                   name[256];
    int                    l, p, rc;

    pre = moe_st_find(c->st, "transformer.wte.weight") != NULL
          ? "transformer." : "";

#define NAME(...) snprintf(name, sizeof(name), __VA_ARGS__)
#define TRY(call) do { rc = (call); if (rc != MOE_OK) return rc; } while (0)

    NAME("%swte.weight", pre);
    TRY(m_load(c, name, MOE_WK_EMBED, -1, -1, V, D));
    NAME("%swpe.weight", pre);
    TRY(m_load(c, name, MOE_WK_POS_EMBED, -1, -1, hp->max_pos, D));
    NAME("%sln_f.weight", pre);
    TRY(m_load(c, name, MOE_WK_FINAL_NORM, -1, -1, D, 0));
    NAME("%sln_f.bias", pre);
    TRY(m_load(c, name, MOE_WK_FINAL_NORM_B, -1, -1, D, 0));
    if (!hp->tie_embeddings) {
        NAME("lm_head.weight");
        TRY(m_load(c, name, MOE_WK_LM_HEAD, -1, -1, V, D));
    }
    for (l = 0; l < hp->n_layers; l++) {
        NAME("%sh.%d.ln_1.weight", pre, l);
        TRY(m_load(c, name, MOE_WK_ATTN_NORM, l, -1, D, 0));
        NAME("%sh.%d.ln_1.bias", pre, l);
        TRY(m_load(c, name, MOE_WK_ATTN_NORM_B, l, -1, D, 0));
        NAME("%sh.%d.ln_2.weight", pre, l);
        TRY(m_load(c, name, MOE_WK_FFN_NORM, l, -1, D, 0));
        NAME("%sh.%d.ln_2.bias", pre, l);
        TRY(m_load(c, name, MOE_WK_FFN_NORM_B, l, -1, D, 0));

        NAME("%sh.%d.attn.c_attn.weight", pre, l);
        shape[0] = D;
        shape[1] = 3 * D;
        TRY(m_find(c, name, 2, shape, &t));
        for (p = 0; p < 3; p++) {
            TRY(m_emit(c, t, MOE_WK_WQ + p, l, -1, p * D, D, D, 1, 3 * D));
        }
        NAME("%sh.%d.attn.c_attn.bias", pre, l);
        shape[0] = 3 * D;
        TRY(m_find(c, name, 1, shape, &t));
        for (p = 0; p < 3; p++) {
            TRY(m_emit(c, t, MOE_WK_BQ + p, l, -1, p * D, 1, D, 0, D));
        }

        NAME("%sh.%d.attn.c_proj.weight", pre, l);
        shape[0] = D;
        shape[1] = D;
        TRY(m_find(c, name, 2, shape, &t));
        TRY(m_emit(c, t, MOE_WK_WO, l, -1, 0, D, D, 1, D));
        NAME("%sh.%d.attn.c_proj.bias", pre, l);
        TRY(m_load(c, name, MOE_WK_BO, l, -1, D, 0));

        NAME("%sh.%d.mlp.c_fc.weight", pre, l);
        shape[0] = D;
        shape[1] = F;
        TRY(m_find(c, name, 2, shape, &t));
        TRY(m_emit(c, t, MOE_WK_UP, l, 0, 0, F, D, 1, F));
        NAME("%sh.%d.mlp.c_fc.bias", pre, l);
        TRY(m_load(c, name, MOE_WK_B_UP, l, -1, F, 0));
        NAME("%sh.%d.mlp.c_proj.weight", pre, l);
        shape[0] = F;
        shape[1] = D;
        TRY(m_find(c, name, 2, shape, &t));
        TRY(m_emit(c, t, MOE_WK_DOWN, l, 0, 0, D, F, 1, D));
        NAME("%sh.%d.mlp.c_proj.bias", pre, l);
        TRY(m_load(c, name, MOE_WK_B_DOWN, l, -1, D, 0));
    }
#undef TRY
#undef NAME
    return MOE_OK;
}


/* the walk; packed: quantized pieces as they are in the files
 * (moe_model_for_each_tensor_packed) */
static int
m_walk(const moe_model_t *m, int (*fn)(void *ctx, const moe_tensor_ref_t *t),
    void *ctx, int packed, char *err, size_t errlen)
{
    const moe_hparams_t *hp = &m->hp;
    m_ctx_t              c;
    int64_t              D, V, Q, KV, F, HD, FS, FD;
    char                 name[256];
    int                  l, rc;

    if (m->st == NULL) {
        moe_errf(err, errlen, "%s: no weights were opened (load_format "
              "'dummy')", m->dir);
        return MOE_EINVAL;
    }
    c.dir = m->dir;
    c.st = m->st;
    c.err = err;
    c.errlen = errlen;
    c.fn = fn;
    c.ctx = ctx;
    c.q = &m->q;
    c.packed = packed;

    if (hp->arch == MOE_ARCH_GPT2) {
        return m_walk_gpt2(&c, hp);
    }

    D = hp->dim;
    V = hp->vocab_size;
    Q = (int64_t) hp->n_heads * hp->head_dim;
    KV = (int64_t) hp->n_kv_heads * hp->head_dim;
    F = hp->ffn_dim;
    HD = hp->head_dim;
    FS = hp->shared_ffn_dim;
    FD = hp->dense_ffn_dim;

#define LOAD(nm, kind, l_, e_, d0, d1)                                       \
    do {                                                                     \
        rc = m_load(&c, nm, kind, l_, e_, (int64_t) (d0), (int64_t) (d1));   \
        if (rc != MOE_OK) {                                                  \
            return rc;                                                       \
        }                                                                    \
    } while (0)
#define NAME(...) snprintf(name, sizeof(name), __VA_ARGS__)

    LOAD("model.embed_tokens.weight", MOE_WK_EMBED, -1, -1, V, D);
    LOAD("model.norm.weight", MOE_WK_FINAL_NORM, -1, -1, D, 0);
    if (!hp->tie_embeddings) {
        LOAD("lm_head.weight", MOE_WK_LM_HEAD, -1, -1, V, D);
    }

    for (l = 0; l < hp->n_layers; l++) {
        NAME("model.layers.%d.input_layernorm.weight", l);
        LOAD(name, MOE_WK_ATTN_NORM, l, -1, D, 0);
        NAME("model.layers.%d.post_attention_layernorm.weight", l);
        LOAD(name, MOE_WK_FFN_NORM, l, -1, D, 0);
        NAME("model.layers.%d.self_attn.q_proj.weight", l);
        LOAD(name, MOE_WK_WQ, l, -1, Q, D);
        NAME("model.layers.%d.self_attn.k_proj.weight", l);
        LOAD(name, MOE_WK_WK, l, -1, KV, D);
        NAME("model.layers.%d.self_attn.v_proj.weight", l);
        LOAD(name, MOE_WK_WV, l, -1, KV, D);
        NAME("model.layers.%d.self_attn.o_proj.weight", l);
        LOAD(name, MOE_WK_WO, l, -1, D, Q);
        if (hp->qkv_bias) {
            NAME("model.layers.%d.self_attn.q_proj.bias", l);
            LOAD(name, MOE_WK_BQ, l, -1, Q, 0);
            NAME("model.layers.%d.self_attn.k_proj.bias", l);
            LOAD(name, MOE_WK_BK, l, -1, KV, 0);
            NAME("model.layers.%d.self_attn.v_proj.bias", l);
            LOAD(name, MOE_WK_BV, l, -1, KV, 0);
        }
        if (hp->o_bias) {
            NAME("model.layers.%d.self_attn.o_proj.bias", l);
            LOAD(name, MOE_WK_BO, l, -1, D, 0);
        }
        if (hp->qk_norm) {
            NAME("model.layers.%d.self_attn.q_norm.weight", l);
            LOAD(name, MOE_WK_Q_NORM, l, -1, HD, 0);
            NAME("model.layers.%d.self_attn.k_norm.weight", l);
            LOAD(name, MOE_WK_K_NORM, l, -1, HD, 0);
        }

        if (m_is_moe(hp) && hp->layer_dense[l]) {
            /* a dense MLP layer of an MoE model (mlp_only_layers) */
            NAME("model.layers.%d.mlp.gate_proj.weight", l);
            LOAD(name, MOE_WK_WD_GATE, l, -1, FD, D);
            NAME("model.layers.%d.mlp.up_proj.weight", l);
            LOAD(name, MOE_WK_WD_UP, l, -1, FD, D);
            NAME("model.layers.%d.mlp.down_proj.weight", l);
            LOAD(name, MOE_WK_WD_DOWN, l, -1, D, FD);
        } else if (m_is_moe(hp)) {
            rc = m_walk_experts(&c, hp, l);
            if (rc != MOE_OK) {
                return rc;
            }
            if (FS > 0) {
                NAME("model.layers.%d.mlp.shared_expert.gate_proj.weight", l);
                LOAD(name, MOE_WK_WS_GATE, l, -1, FS, D);
                NAME("model.layers.%d.mlp.shared_expert.up_proj.weight", l);
                LOAD(name, MOE_WK_WS_UP, l, -1, FS, D);
                NAME("model.layers.%d.mlp.shared_expert.down_proj.weight", l);
                LOAD(name, MOE_WK_WS_DOWN, l, -1, D, FS);
                NAME("model.layers.%d.mlp.shared_expert_gate.weight", l);
                LOAD(name, MOE_WK_WS_GATE_INP, l, -1, 1, D);
            }
        } else {
            NAME("model.layers.%d.mlp.gate_proj.weight", l);
            LOAD(name, MOE_WK_GATE, l, 0, F, D);
            NAME("model.layers.%d.mlp.up_proj.weight", l);
            LOAD(name, MOE_WK_UP, l, 0, F, D);
            NAME("model.layers.%d.mlp.down_proj.weight", l);
            LOAD(name, MOE_WK_DOWN, l, 0, D, F);
            if (hp->mlp_bias) {
                NAME("model.layers.%d.mlp.gate_proj.bias", l);
                LOAD(name, MOE_WK_B_GATE, l, -1, F, 0);
                NAME("model.layers.%d.mlp.up_proj.bias", l);
                LOAD(name, MOE_WK_B_UP, l, -1, F, 0);
                NAME("model.layers.%d.mlp.down_proj.bias", l);
                LOAD(name, MOE_WK_B_DOWN, l, -1, D, 0);
            }
        }
    }
#undef LOAD
#undef NAME
    return MOE_OK;
}


int
moe_model_for_each_tensor(const moe_model_t *m,
    int (*fn)(void *ctx, const moe_tensor_ref_t *t), void *ctx, char *err,
    size_t errlen)
{
    return m_walk(m, fn, ctx, 0, err, errlen);
}


/* ------------------------------------------------- fp32 host weights */

/* Allocate every array the hparams ask for (zeroed); MOE_ENOMEM. */
static int
m_alloc_weights(moe_model_t *m, char *err, size_t errlen)
{
    const moe_hparams_t *hp = &m->hp;
    moe_weights_t       *w = &m->w;
    size_t               D, L, V, Q, KV, F, E, HD, FS, FD;
    int                  moe, bad;

    D = (size_t) hp->dim;
    L = (size_t) hp->n_layers;
    V = (size_t) hp->vocab_size;
    Q = (size_t) hp->n_heads * (size_t) hp->head_dim;
    KV = (size_t) hp->n_kv_heads * (size_t) hp->head_dim;
    F = (size_t) hp->ffn_dim;
    E = (size_t) hp->n_experts;
    HD = (size_t) hp->head_dim;
    FS = (size_t) hp->shared_ffn_dim;
    FD = (size_t) hp->dense_ffn_dim;
    moe = m_is_moe(hp);

    w->embed = m_alloc(V * D);
    w->attn_norm = m_alloc(L * D);
    w->wq = m_alloc(L * Q * D);
    w->wk = m_alloc(L * KV * D);
    w->wv = m_alloc(L * KV * D);
    w->wo = m_alloc(L * D * Q);
    w->ffn_norm = m_alloc(L * D);
    w->router = moe ? m_alloc(L * E * D) : NULL;
    w->w_gate = hp->ffn_ungated ? NULL : m_alloc(L * E * F * D);
    w->w_up = m_alloc(L * E * F * D);
    w->w_down = m_alloc(L * E * D * F);
    w->final_norm = m_alloc(D);
    w->lm_head = hp->tie_embeddings ? w->embed : m_alloc(V * D);
    bad = !w->embed || !w->attn_norm || !w->wq || !w->wk || !w->wv || !w->wo
          || !w->ffn_norm || (moe && !w->router)
          || (!hp->ffn_ungated && !w->w_gate) || !w->w_up || !w->w_down
          || !w->final_norm || !w->lm_head;

#define OPT(cond, field, n)                                                  \
    do {                                                                     \
        if (cond) {                                                          \
            w->field = m_alloc(n);                                           \
            bad |= w->field == NULL;                                         \
        }                                                                    \
    } while (0)

    OPT(hp->learned_pos, pos_embed, (size_t) hp->max_pos * D);
    OPT(hp->norm_layer, attn_norm_b, L * D);
    OPT(hp->norm_layer, ffn_norm_b, L * D);
    OPT(hp->norm_layer, final_norm_b, D);
    OPT(hp->qkv_bias, bq, L * Q);
    OPT(hp->qkv_bias, bk, L * KV);
    OPT(hp->qkv_bias, bv, L * KV);
    OPT(hp->o_bias, bo, L * D);
    OPT(hp->qk_norm, q_norm, L * HD);
    OPT(hp->qk_norm, k_norm, L * HD);
    OPT(hp->mlp_bias && !hp->ffn_ungated, b_gate, L * F);
    OPT(hp->mlp_bias, b_up, L * F);
    OPT(hp->mlp_bias, b_down, L * D);
    OPT(FS > 0, ws_gate, L * FS * D);
    OPT(FS > 0, ws_up, L * FS * D);
    OPT(FS > 0, ws_down, L * D * FS);
    OPT(FS > 0, ws_gate_inp, L * D);
    OPT(hp->n_dense_layers > 0, wd_gate, L * FD * D);
    OPT(hp->n_dense_layers > 0, wd_up, L * FD * D);
    OPT(hp->n_dense_layers > 0, wd_down, L * D * FD);
#undef OPT

    if (bad) {
        moe_errf(err, errlen, "%s: out of memory for fp32 weights", m->dir);
        return MOE_ENOMEM;
    }
    return MOE_OK;
}


static void
m_free_weights(moe_weights_t *w)
{
    if (w->lm_head != w->embed) {
        free(w->lm_head);
    }
    free(w->embed);
    free(w->attn_norm);
    free(w->wq);
    free(w->wk);
    free(w->wv);
    free(w->wo);
    free(w->ffn_norm);
    free(w->router);
    free(w->w_gate);
    free(w->w_up);
    free(w->w_down);
    free(w->final_norm);
    free(w->pos_embed);
    free(w->attn_norm_b);
    free(w->ffn_norm_b);
    free(w->final_norm_b);
    free(w->bq);
    free(w->bk);
    free(w->bv);
    free(w->bo);
    free(w->q_norm);
    free(w->k_norm);
    free(w->b_gate);
    free(w->b_up);
    free(w->b_down);
    free(w->ws_gate);
    free(w->ws_up);
    free(w->ws_down);
    free(w->ws_gate_inp);
    free(w->wd_gate);
    free(w->wd_up);
    free(w->wd_down);
    memset(w, 0, sizeof(*w));
}


/* The fp32 array of a weight kind (NULL when the model has none). */
static float *
m_f32_array(moe_weights_t *w, int kind)
{
    switch (kind) {
    case MOE_WK_EMBED:        return w->embed;
    case MOE_WK_LM_HEAD:      return w->lm_head;
    case MOE_WK_POS_EMBED:    return w->pos_embed;
    case MOE_WK_FINAL_NORM:   return w->final_norm;
    case MOE_WK_FINAL_NORM_B: return w->final_norm_b;
    case MOE_WK_ATTN_NORM:    return w->attn_norm;
    case MOE_WK_ATTN_NORM_B:  return w->attn_norm_b;
    case MOE_WK_FFN_NORM:     return w->ffn_norm;
    case MOE_WK_FFN_NORM_B:   return w->ffn_norm_b;
    case MOE_WK_WQ:           return w->wq;
    case MOE_WK_WK:           return w->wk;
    case MOE_WK_WV:           return w->wv;
    case MOE_WK_WO:           return w->wo;
    case MOE_WK_BQ:           return w->bq;
    case MOE_WK_BK:           return w->bk;
    case MOE_WK_BV:           return w->bv;
    case MOE_WK_BO:           return w->bo;
    case MOE_WK_Q_NORM:       return w->q_norm;
    case MOE_WK_K_NORM:       return w->k_norm;
    case MOE_WK_ROUTER:       return w->router;
    case MOE_WK_GATE:         return w->w_gate;
    case MOE_WK_UP:           return w->w_up;
    case MOE_WK_DOWN:         return w->w_down;
    case MOE_WK_B_GATE:       return w->b_gate;
    case MOE_WK_B_UP:         return w->b_up;
    case MOE_WK_B_DOWN:       return w->b_down;
    case MOE_WK_WS_GATE:      return w->ws_gate;
    case MOE_WK_WS_UP:        return w->ws_up;
    case MOE_WK_WS_DOWN:      return w->ws_down;
    case MOE_WK_WS_GATE_INP:  return w->ws_gate_inp;
    case MOE_WK_WD_GATE:      return w->wd_gate;
    case MOE_WK_WD_UP:        return w->wd_up;
    case MOE_WK_WD_DOWN:      return w->wd_down;
    default:                  return NULL;
    }
}


/* Element i of a source tensor of dtype dt, exactly as fp32. */
static float
m_elem_f32(int dt, const unsigned char *p, int64_t i)
{
    uint16_t h;
    float    f;

    if (dt == MOE_DT_F32) {
        memcpy(&f, p + 4 * i, sizeof(f));
        return f;
    }
    h = (uint16_t) (p[2 * i] | (p[2 * i + 1] << 8));
    return dt == MOE_DT_F16 ? moe_f16_to_f32(h) : moe_bf16_to_f32(h);
}


/* moe_model_for_each_tensor callback: one piece into the fp32 arrays
 * (each array is (layers, [experts,] rows, cols) of its kind). */
static int
m_store_f32(void *ctx, const moe_tensor_ref_t *t)
{
    moe_model_t         *m = ctx;
    const unsigned char *p = t->data;
    float               *dst;
    moe_st_tensor_t      src;
    int64_t              n = t->rows * t->cols, r, k, per;

    dst = m_f32_array(&m->w, t->kind);
    if (dst == NULL) {
        return MOE_EINVAL;          /* walk and allocation disagree */
    }
    per = t->expert >= 0 ? m->hp.n_experts : 1;
    dst += ((t->layer > 0 ? t->layer : 0) * per
            + (t->expert > 0 ? t->expert : 0)) * n;
    if (!t->transposed && (t->ld == t->cols || t->rows == 1)) {
        memset(&src, 0, sizeof(src));
        src.dtype = (moe_dtype_t) t->dtype;
        src.numel = n;
        src.data = t->data;
        return moe_st_to_f32(&src, 0, n, dst);
    }
    /* source row k: a destination row, or a column when transposed */
    for (k = 0; k < (t->transposed ? t->cols : t->rows); k++) {
        for (r = 0; r < (t->transposed ? t->rows : t->cols); r++) {
            float v = m_elem_f32(t->dtype, p, k * t->ld + r);

            if (t->transposed) {
                dst[r * t->cols + k] = v;
            } else {
                dst[k * t->cols + r] = v;
            }
        }
    }
    return MOE_OK;
}


int
moe_model_load_f32(moe_model_t *m, char *err, size_t errlen)
{
    int rc;

    if (m->w.embed != NULL) {
        return MOE_OK;
    }
    if (m->st == NULL) {
        moe_errf(err, errlen, "%s: no weights were opened (load_format "
              "'dummy')", m->dir);
        return MOE_EINVAL;
    }
    rc = m_alloc_weights(m, err, errlen);
    if (rc == MOE_OK) {
        rc = moe_model_for_each_tensor(m, m_store_f32, m, err, errlen);
        if (rc == MOE_EINVAL) {
            moe_errf(err, errlen, "%s: internal error storing fp32 weights",
                  m->dir);
        }
    }
    if (rc != MOE_OK) {
        m_free_weights(&m->w);
    }
    return rc;
}


/* what: 0 config only, 1 + tensors opened and checked, 2 + fp32 weights */
static int m_load_model(const char *dir, int top_k_override, int what,
    const char *quantization, moe_model_t **out, char *err, size_t errlen);


int
moe_model_load(const char *dir, int top_k_override, moe_model_t **out,
    char *err, size_t errlen)
{
    return m_load_model(dir, top_k_override, 2, NULL, out, err, errlen);
}


int
moe_model_open(const char *dir, int top_k_override, moe_model_t **out,
    char *err, size_t errlen)
{
    return m_load_model(dir, top_k_override, 1, NULL, out, err, errlen);
}


int
moe_model_load_config(const char *dir, int top_k_override,
    moe_model_t **out, char *err, size_t errlen)
{
    return m_load_model(dir, top_k_override, 0, NULL, out, err, errlen);
}


static int m_quant_config(moe_model_t *m, const char *quantization,
    char *err, size_t errlen);
static void m_kv_scales(moe_model_t *m);


static int
m_load_model(const char *dir, int top_k_override, int what,
    const char *quantization, moe_model_t **out, char *err, size_t errlen)
{
    moe_model_t *m;
    int          rc;

    *out = NULL;
    if (dir == NULL || strlen(dir) >= MOE_PATH_MAX) {
        moe_errf(err, errlen, "model directory path missing or too long");
        return MOE_EINVAL;
    }
    m = calloc(1, sizeof(*m));
    if (m == NULL) {
        moe_errf(err, errlen, "out of memory");
        return MOE_ENOMEM;
    }
    snprintf(m->dir, sizeof(m->dir), "%s", dir);

    rc = m_parse_config(dir, &m->hp, err, errlen);
    if (rc != MOE_OK) {
        goto fail;
    }
    if (top_k_override > 0 && m->hp.n_experts > 1) {
        if (top_k_override > m->hp.n_experts) {
            moe_errf(err, errlen, "top_k %d is larger than the model's %d "
                  "experts", top_k_override, m->hp.n_experts);
            rc = MOE_EINVAL;
            goto fail;
        }
        m->hp.top_k = top_k_override;
    }
    rc = m_quant_config(m, quantization, err, errlen);
    if (rc != MOE_OK) {
        goto fail;
    }

    if (what == 0) {
        *out = m;
        return MOE_OK;
    }

    rc = moe_st_open_dir(dir, &m->st, err, errlen);
    if (rc != MOE_OK) {
        goto fail;
    }
    /* every tensor present with its shape before anything is allocated */
    rc = moe_model_for_each_tensor(m, NULL, NULL, err, errlen);
    if (rc == MOE_OK) {
        m_kv_scales(m);
    }
    if (rc == MOE_OK && what == 2) {
        rc = moe_model_load_f32(m, err, errlen);
    }
    if (rc != MOE_OK) {
        goto fail;
    }
    m->weight_bytes = moe_st_total_bytes(m->st);
    *out = m;
    return MOE_OK;

fail:
    moe_model_free(m);
    return rc;
}


void
moe_model_free(moe_model_t *m)
{
    if (m == NULL) {
        return;
    }
    if (m->shard) {
        for (int i = 0; i < m->n_owned; i++) {
            free(m->owned[i]);
        }
        free(m);
        return;
    }
    m_free_weights(&m->w);
    moe_st_close(m->st);
    free(m);
}


const moe_hparams_t *
moe_model_hparams(const moe_model_t *m)
{
    return &m->hp;
}


int64_t
moe_model_weight_bytes(const moe_model_t *m)
{
    return m->weight_bytes;
}


const moe_weights_t *
moe_model_weights(const moe_model_t *m)
{
    return &m->w;
}


const struct moe_st_set *
moe_model_tensors(const moe_model_t *m)
{
    return m->st;
}


const char *
moe_model_dir(const moe_model_t *m)
{
    return m->dir;
}


/* ------------------------------------------------------- tensor parallel */

/* (outer, rows, cols) -> the block rows [r0, r0 + nr) x columns [c0,
 * c0 + nc) of each outer matrix, owned by the shard; NULL src: NULL. */
static float *
m_slice(moe_model_t *sh, const float *src, size_t outer, size_t rows,
    size_t cols, size_t r0, size_t nr, size_t c0, size_t nc)
{
    float  *d;
    size_t  o, r;

    if (src == NULL) {
        return NULL;
    }
    d = malloc(sizeof(float) * outer * nr * nc);
    if (d == NULL) {
        return NULL;
    }
    sh->owned[sh->n_owned++] = d;
    for (o = 0; o < outer; o++) {
        for (r = 0; r < nr; r++) {
            memcpy(d + (o * nr + r) * nc, src + (o * rows + r0 + r) * cols + c0,
                   sizeof(float) * nc);
        }
    }
    return d;
}


/* rows [r0, r0 + nr) of each outer block (column parallel) */
static float *
m_slice_rows(moe_model_t *sh, const float *src, size_t outer, size_t rows,
    size_t cols, size_t r0, size_t nr)
{
    return m_slice(sh, src, outer, rows, cols, r0, nr, 0, cols);
}


/* columns [c0, c0 + nc) of every row (row parallel) */
static float *
m_slice_cols(moe_model_t *sh, const float *src, size_t outer, size_t rows,
    size_t cols, size_t c0, size_t nc)
{
    return m_slice(sh, src, outer, rows, cols, 0, rows, c0, nc);
}


/* A bias added after a row-parallel projection: rank 0 keeps it, the
 * others get zeros (the all-reduce adds it once). */
static float *
m_rank0_bias(moe_model_t *sh, const float *src, size_t n, int rank)
{
    float *d;

    if (src == NULL || rank == 0) {
        return (float *) src;
    }
    d = calloc(n, sizeof(float));
    if (d != NULL) {
        sh->owned[sh->n_owned++] = d;
    }
    return d;
}


int
moe_model_shard(const moe_model_t *m, int tp, int rank, moe_model_t **out,
    char *err, size_t errlen)
{
    return moe_model_shard_ep(m, tp, rank, 0, out, err, errlen);
}


int
moe_model_shard_ep(const moe_model_t *m, int tp, int rank, int ep,
    moe_model_t **out, char *err, size_t errlen)
{
    const moe_hparams_t *hp = &m->hp;
    const moe_weights_t *w = &m->w;
    moe_model_t         *sh;
    moe_weights_t       *o;
    size_t               L, D, hd, H, KV, E, F, FS, FD, r;
    int                  ok;

    *out = NULL;
    if (tp < 1 || rank < 0 || rank >= tp) {
        moe_errf(err, errlen, "tensor parallel: rank %d of %d", rank, tp);
        return MOE_EINVAL;
    }
    if (w->embed == NULL) {
        moe_errf(err, errlen, "tensor parallel: the model has no fp32 "
                 "weights to shard");
        return MOE_EINVAL;
    }
    sh = calloc(1, sizeof(*sh));
    if (sh == NULL) {
        return MOE_ENOMEM;
    }
    if (moe_hparams_shard_ep(hp, tp, rank, ep, &sh->hp, err, errlen)
        != MOE_OK)
    {
        free(sh);
        return MOE_EUNSUPPORTED;
    }
    memcpy(sh->dir, m->dir, sizeof(sh->dir));
    /* per-tensor KV scales: the same on every rank */
    sh->kv_scales = m->kv_scales;
    memcpy(sh->kv_scale, m->kv_scale, sizeof(sh->kv_scale));
    memcpy(sh->kv_scale_err, m->kv_scale_err, sizeof(sh->kv_scale_err));
    sh->w = *w;                     /* replicated tensors alias the parent */
    sh->st = m->st;
    sh->weight_bytes = m->weight_bytes / tp;
    sh->shard = 1;

    L = (size_t) hp->n_layers;
    D = (size_t) hp->dim;
    hd = (size_t) hp->head_dim;
    H = (size_t) hp->n_heads / tp;
    KV = (size_t) hp->n_kv_heads / tp;
    E = (size_t) hp->n_experts;
    F = (size_t) hp->ffn_dim / tp;
    FS = (size_t) hp->shared_ffn_dim / tp;
    FD = (size_t) hp->dense_ffn_dim / tp;
    r = (size_t) rank;

    o = &sh->w;
    /* column-parallel (output rows split): q/k/v heads, gate/up rows */
    o->wq = m_slice_rows(sh, w->wq, L, H * tp * hd, D, r * H * hd, H * hd);
    o->wk = m_slice_rows(sh, w->wk, L, KV * tp * hd, D, r * KV * hd,
                         KV * hd);
    o->wv = m_slice_rows(sh, w->wv, L, KV * tp * hd, D, r * KV * hd,
                         KV * hd);
    o->bq = m_slice_rows(sh, w->bq, L, H * tp * hd, 1, r * H * hd, H * hd);
    o->bk = m_slice_rows(sh, w->bk, L, KV * tp * hd, 1, r * KV * hd,
                         KV * hd);
    o->bv = m_slice_rows(sh, w->bv, L, KV * tp * hd, 1, r * KV * hd,
                         KV * hd);
    if (ep) {
        /* expert parallel: whole experts [e0, e0 + El) of every layer */
        size_t El = (size_t) sh->hp.n_local_experts;
        size_t e0 = (size_t) sh->hp.expert_first;

        F = (size_t) hp->ffn_dim;
        o->w_gate = m_slice_rows(sh, w->w_gate, L, E * F, D, e0 * F,
                                 El * F);
        o->w_up = m_slice_rows(sh, w->w_up, L, E * F, D, e0 * F, El * F);
        o->w_down = m_slice_rows(sh, w->w_down, L, E * D, F, e0 * D,
                                 El * D);
    } else {
        o->w_gate = m_slice_rows(sh, w->w_gate, L * E, F * tp, D, r * F, F);
        o->w_up = m_slice_rows(sh, w->w_up, L * E, F * tp, D, r * F, F);
        o->w_down = m_slice_cols(sh, w->w_down, L * E, D, F * tp, r * F, F);
    }
    o->b_gate = m_slice_rows(sh, w->b_gate, L, F * tp, 1, r * F, F);
    o->b_up = m_slice_rows(sh, w->b_up, L, F * tp, 1, r * F, F);
    o->ws_gate = m_slice_rows(sh, w->ws_gate, L, FS * tp, D, r * FS, FS);
    o->ws_up = m_slice_rows(sh, w->ws_up, L, FS * tp, D, r * FS, FS);
    o->wd_gate = m_slice_rows(sh, w->wd_gate, L, FD * tp, D, r * FD, FD);
    o->wd_up = m_slice_rows(sh, w->wd_up, L, FD * tp, D, r * FD, FD);
    /* row-parallel (input columns split): partial sums, all-reduced */
    o->wo = m_slice_cols(sh, w->wo, L, D, H * tp * hd, r * H * hd, H * hd);
    o->ws_down = m_slice_cols(sh, w->ws_down, L, D, FS * tp, r * FS, FS);
    o->wd_down = m_slice_cols(sh, w->wd_down, L, D, FD * tp, r * FD, FD);
    o->bo = m_rank0_bias(sh, w->bo, L * D, rank);
    o->b_down = m_rank0_bias(sh, w->b_down, L * D, rank);

    ok = (w->wq == NULL || o->wq) && (w->wk == NULL || o->wk)
         && (w->wv == NULL || o->wv) && (w->bq == NULL || o->bq)
         && (w->bk == NULL || o->bk) && (w->bv == NULL || o->bv)
         && (w->w_gate == NULL || o->w_gate) && (w->w_up == NULL || o->w_up)
         && (w->b_gate == NULL || o->b_gate) && (w->b_up == NULL || o->b_up)
         && (w->ws_gate == NULL || o->ws_gate)
         && (w->ws_up == NULL || o->ws_up)
         && (w->wd_gate == NULL || o->wd_gate)
         && (w->wd_up == NULL || o->wd_up) && (w->wo == NULL || o->wo)
         && (w->w_down == NULL || o->w_down)
         && (w->ws_down == NULL || o->ws_down)
         && (w->wd_down == NULL || o->wd_down) && (w->bo == NULL || o->bo)
         && (w->b_down == NULL || o->b_down);
    if (!ok) {
        moe_model_free(sh);
        moe_errf(err, errlen, "tensor parallel: out of memory for rank %d's "
                 "shard", rank);
        return MOE_ENOMEM;
    }
    *out = sh;
    return MOE_OK;
}


/* hparams of rank shards: n_heads, n_kv_heads and intermediate sizes / tp */
int
moe_hparams_shard(const moe_hparams_t *hp, int tp, moe_hparams_t *out,
    char *err, size_t errlen)
{
    return moe_hparams_shard_ep(hp, tp, 0, 0, out, err, errlen);
}


int
moe_hparams_shard_ep(const moe_hparams_t *hp, int tp, int rank, int ep,
    moe_hparams_t *out, char *err, size_t errlen)
{
    if (ep) {
        /* whole experts per rank: the routed FFN is not split */
        if (hp->n_experts <= 1 || hp->n_local_experts > 0) {
            moe_errf(err, errlen, "expert_parallel: the model has no routed "
                     "experts to place on ranks (n_experts %d)",
                     hp->n_experts);
            return MOE_EUNSUPPORTED;
        }
        if (tp < 1 || rank < 0 || rank >= tp || hp->n_experts % tp) {
            moe_errf(err, errlen, "expert_parallel: tensor_parallel_size "
                     "%d must divide the number of experts (%d)", tp,
                     hp->n_experts);
            return MOE_EUNSUPPORTED;
        }
        if (hp->n_heads % tp || hp->n_kv_heads % tp
            || hp->shared_ffn_dim % tp || hp->dense_ffn_dim % tp)
        {
            moe_errf(err, errlen, "expert_parallel: tensor_parallel_size "
                     "%d must divide the attention heads (%d), kv heads "
                     "(%d) and the shared / dense intermediate sizes (%d, "
                     "%d)", tp, hp->n_heads, hp->n_kv_heads,
                     hp->shared_ffn_dim, hp->dense_ffn_dim);
            return MOE_EUNSUPPORTED;
        }
        *out = *hp;
        out->n_heads /= tp;
        out->n_kv_heads /= tp;
        out->shared_ffn_dim /= tp;
        out->dense_ffn_dim /= tp;
        out->n_local_experts = hp->n_experts / tp;
        out->expert_first = rank * out->n_local_experts;
        return MOE_OK;
    }

    if (tp < 1 || hp->n_heads % tp || hp->n_kv_heads % tp
        || hp->ffn_dim % tp || hp->shared_ffn_dim % tp
        || hp->dense_ffn_dim % tp)
    {
        moe_errf(err, errlen, "tensor_parallel_size %d must divide the "
                 "attention heads (%d), kv heads (%d) and intermediate sizes "
                 "(%d, shared %d, dense %d)", tp, hp->n_heads,
                 hp->n_kv_heads, hp->ffn_dim, hp->shared_ffn_dim,
                 hp->dense_ffn_dim);
        return MOE_EUNSUPPORTED;
    }
    *out = *hp;
    out->n_heads /= tp;
    out->n_kv_heads /= tp;
    out->ffn_dim /= tp;
    out->shared_ffn_dim /= tp;
    out->dense_ffn_dim /= tp;
    return MOE_OK;
}


typedef struct {
    int    tp, rank;
    int    ep, e0, el;          /* expert parallel: experts [e0, e0 + el) */
    int  (*fn)(void *ctx, const moe_tensor_ref_t *t);
    void  *ctx;
    char  *err;
    size_t errlen;
} m_shard_ctx_t;


/* The rank's slice of one piece: rows (slice 0) or columns (slice 1) */
static int
m_shard_piece(void *vctx, const moe_tensor_ref_t *t0)
{
    m_shard_ctx_t    *c = vctx;
    moe_tensor_ref_t  t = *t0;
    size_t            esz = t.dtype == MOE_DT_F32 ? 4 : 2;
    int64_t           n, start;
    int               slice;

    if (c->ep && (t.kind == MOE_WK_GATE || t.kind == MOE_WK_UP
                  || t.kind == MOE_WK_DOWN))
    {
        /* expert parallel: a routed expert goes whole to its rank */
        if (t.expert < 0) {
            moe_errf(c->err, c->errlen, "expert_parallel: %s is not one "
                     "expert's weight", t.name);
            return MOE_EUNSUPPORTED;
        }
        if (t.expert < c->e0 || t.expert >= c->e0 + c->el) {
            return MOE_OK;
        }
        t.expert -= c->e0;
        return c->fn(c->ctx, &t);
    }

    switch (t.kind) {
    case MOE_WK_WQ: case MOE_WK_WK: case MOE_WK_WV:
    case MOE_WK_GATE: case MOE_WK_UP:
    case MOE_WK_WS_GATE: case MOE_WK_WS_UP:
    case MOE_WK_WD_GATE: case MOE_WK_WD_UP:
        slice = 0;
        break;
    case MOE_WK_BQ: case MOE_WK_BK: case MOE_WK_BV:
    case MOE_WK_B_GATE: case MOE_WK_B_UP:
    case MOE_WK_WO: case MOE_WK_DOWN: case MOE_WK_WS_DOWN:
    case MOE_WK_WD_DOWN:
        slice = 1;
        break;
    case MOE_WK_BO: case MOE_WK_B_DOWN:
        /* after a row-parallel projection: added once, by rank 0 */
        return c->rank == 0 ? c->fn(c->ctx, &t) : MOE_OK;
    default:
        return c->fn(c->ctx, &t);       /* replicated */
    }
    n = slice == 0 ? t.rows : t.cols;
    if (n % c->tp != 0) {
        moe_errf(c->err, c->errlen, "tensor parallel: %s (%lld x %lld) does "
                 "not split in %d", t.name, (long long) t.rows,
                 (long long) t.cols, c->tp);
        return MOE_EUNSUPPORTED;
    }
    n /= c->tp;
    start = n * c->rank;
    if (t.quant != NULL) {
        /* packed: the slice is named, the bytes stay whole */
        if (slice == 0) {
            t.q_row0 += start;
            t.rows = n;
        } else {
            t.q_col0 += start;
            t.cols = n;
        }
        return c->fn(c->ctx, &t);
    }
    /* a destination row is a source row, or a source column when
     * transposed; likewise columns */
    if ((slice == 0) != (t.transposed != 0)) {
        t.data = (const char *) t.data + (size_t) (start * t.ld) * esz;
    } else {
        t.data = (const char *) t.data + (size_t) start * esz;
    }
    if (slice == 0) {
        t.rows = n;
    } else {
        t.cols = n;
    }
    return c->fn(c->ctx, &t);
}


int
moe_model_for_each_tensor_shard(const moe_model_t *m, int tp, int rank,
    int (*fn)(void *ctx, const moe_tensor_ref_t *t), void *ctx, char *err,
    size_t errlen)
{
    return moe_model_for_each_tensor_shard_ep(m, tp, rank, 0, fn, ctx, err,
                                              errlen);
}


static int m_shard_walk(const moe_model_t *m, int tp, int rank, int ep,
    int packed, int (*fn)(void *ctx, const moe_tensor_ref_t *t), void *ctx,
    char *err, size_t errlen);


int
moe_model_for_each_tensor_shard_ep(const moe_model_t *m, int tp, int rank,
    int ep, int (*fn)(void *ctx, const moe_tensor_ref_t *t), void *ctx,
    char *err, size_t errlen)
{
    return m_shard_walk(m, tp, rank, ep, 0, fn, ctx, err, errlen);
}


int
moe_model_for_each_tensor_packed_shard_ep(const moe_model_t *m, int tp,
    int rank, int ep, int (*fn)(void *ctx, const moe_tensor_ref_t *t),
    void *ctx, char *err, size_t errlen)
{
    if (fn == NULL) {
        moe_errf(err, errlen, "moe_model_for_each_tensor_packed_shard_ep: "
                 "no callback");
        return MOE_EINVAL;
    }
    return m_shard_walk(m, tp, rank, ep, 1, fn, ctx, err, errlen);
}


int
moe_model_for_each_tensor_packed_describe(const moe_model_t *m, int tp,
    int rank, int ep, int (*fn)(void *ctx, const moe_tensor_ref_t *t),
    void *ctx, char *err, size_t errlen)
{
    if (fn == NULL) {
        moe_errf(err, errlen, "moe_model_for_each_tensor_packed_describe: "
                 "no callback");
        return MOE_EINVAL;
    }
    return m_shard_walk(m, tp, rank, ep, M_DESCRIBE, fn, ctx, err, errlen);
}


static int
m_shard_walk(const moe_model_t *m, int tp, int rank, int ep, int packed,
    int (*fn)(void *ctx, const moe_tensor_ref_t *t), void *ctx, char *err,
    size_t errlen)
{
    m_shard_ctx_t  c;
    moe_hparams_t  rhp;

    memset(&c, 0, sizeof(c));
    if (ep && tp > 1) {
        if (moe_hparams_shard_ep(&m->hp, tp, rank, 1, &rhp, err, errlen)
            != MOE_OK)
        {
            return MOE_EUNSUPPORTED;
        }
        c.ep = 1;
        c.e0 = rhp.expert_first;
        c.el = rhp.n_local_experts;
    }
    if (tp <= 1) {
        return m_walk(m, fn, ctx, packed, err, errlen);
    }
    if (rank < 0 || rank >= tp || fn == NULL) {
        moe_errf(err, errlen, "tensor parallel: rank %d of %d", rank, tp);
        return MOE_EINVAL;
    }
    c.tp = tp;
    c.rank = rank;
    c.fn = fn;
    c.ctx = ctx;
    c.err = err;
    c.errlen = errlen;
    return m_walk(m, m_shard_piece, &c, packed, err, errlen);
}


/* ------------------------------------------------ quantized weights */

int
moe_model_for_each_tensor_packed(const moe_model_t *m,
    int (*fn)(void *ctx, const moe_tensor_ref_t *t), void *ctx, char *err,
    size_t errlen)
{
    if (fn == NULL) {
        moe_errf(err, errlen, "moe_model_for_each_tensor_packed: no "
                 "callback");
        return MOE_EINVAL;
    }
    return m_walk(m, fn, ctx, 1, err, errlen);
}

/*
 * Quantized checkpoints (model/quant.h): config.json's quantization_config
 * and the YAML `quantization` checked against each other at load; the
 * walk hands each quantized linear weight over dequantized to fp32 (data,
 * alive during the callback only) with its packed form in t->quant.
 */

int
moe_model_load_quant(const char *dir, int top_k_override,
    const char *quantization, int open_only, moe_model_t **out, char *err,
    size_t errlen)
{
    return m_load_model(dir, top_k_override, open_only ? 1 : 2,
                        quantization, out, err, errlen);
}


const moe_qconfig_t *
moe_model_quant(const moe_model_t *m)
{
    return &m->q;
}


/*
 * The KV cache scale `which` (0 K, 1 V) of layer l in the checkpoint's
 * namings, first found wins: self_attn.k_scale / v_scale (vLLM's, what
 * llm-compressor's kv_cache_scheme writes), self_attn.k_proj.output_scale
 * / v_proj.output_scale (older compressed-tensors), self_attn.kv_scale
 * (AutoFP8: one for both).  *v 0 when the layer has none; a scale that is
 * not one finite value > 0 is refused (per-head scales by name).
 */
static int
m_kv_scale(const moe_model_t *m, int l, int which, float *v, char *err,
    size_t errlen)
{
    static const char *const fmt[2][3] = {
        { "model.layers.%d.self_attn.k_scale",
          "model.layers.%d.self_attn.k_proj.output_scale",
          "model.layers.%d.self_attn.kv_scale" },
        { "model.layers.%d.self_attn.v_scale",
          "model.layers.%d.self_attn.v_proj.output_scale",
          "model.layers.%d.self_attn.kv_scale" }
    };
    const moe_st_tensor_t *t = NULL;
    char                   name[128];
    float                  x;
    int                    i;

    *v = 0.0f;
    for (i = 0; i < 3 && t == NULL; i++) {
        snprintf(name, sizeof(name), fmt[which][i], l);
        t = moe_st_find(m->st, name);
    }
    if (t == NULL) {
        return MOE_OK;
    }
    if (t->numel != 1) {
        moe_errf(err, errlen, "%s: %s: %lld values; one per-tensor KV "
                 "cache scale is supported (per-head scales are not: set "
                 "kv_cache_scale_k / kv_cache_scale_v instead)", t->file,
                 t->name, (long long) t->numel);
        return MOE_EUNSUPPORTED;
    }
    if (t->dtype != MOE_DT_F32 && t->dtype != MOE_DT_F16
        && t->dtype != MOE_DT_BF16)
    {
        moe_errf(err, errlen, "%s: %s: a KV cache scale must be F32, F16 or "
                 "BF16", t->file, t->name);
        return MOE_EFORMAT;
    }
    if (moe_st_to_f32(t, 0, 1, &x) != MOE_OK || !isfinite(x) || !(x > 0.0f))
    {
        moe_errf(err, errlen, "%s: %s: the KV cache scale %g is not finite "
                 "and > 0", t->file, t->name, (double) x);
        return MOE_EFORMAT;
    }
    *v = x;
    return MOE_OK;
}


/* The checkpoint's KV cache scales: every layer's K and V, none, or
 * malformed (kv_scales < 0, why in kv_scale_err; a bf16 cache never reads
 * them, so the model still loads). */
static void
m_kv_scales(moe_model_t *m)
{
    char *err = m->kv_scale_err;
    int   l, w, n = 0, rc;

    m->kv_scales = 0;
    err[0] = '\0';
    if (m->hp.arch == MOE_ARCH_GPT2) {
        return;
    }
    for (l = 0; l < m->hp.n_layers; l++) {
        for (w = 0; w < 2; w++) {
            rc = m_kv_scale(m, l, w, &m->kv_scale[w][l], err,
                            sizeof(m->kv_scale_err));
            if (rc != MOE_OK) {
                m->kv_scales = rc;
                return;
            }
            n += m->kv_scale[w][l] > 0.0f;
        }
    }
    if (n == 0) {
        return;
    }
    for (l = 0; l < m->hp.n_layers; l++) {
        for (w = 0; w < 2; w++) {
            if (m->kv_scale[w][l] == 0.0f) {
                moe_errf(err, sizeof(m->kv_scale_err), "%s: layer %d has no "
                         "%s cache scale (model.layers.%d.self_attn.%s_scale)"
                         " while other layers have them", m->dir, l,
                         w ? "V" : "K", l, w ? "v" : "k");
                m->kv_scales = MOE_EFORMAT;
                return;
            }
        }
    }
    m->kv_scales = 1;
}


int
moe_model_kv_scales(const moe_model_t *m, float *k, float *v, char *err,
    size_t errlen)
{
    if (m == NULL || m->kv_scales == 0) {
        return 0;
    }
    if (m->kv_scales < 0) {
        moe_errf(err, errlen, "%s", m->kv_scale_err);
        return m->kv_scales;
    }
    memcpy(k, m->kv_scale[0], sizeof(float) * (size_t) m->hp.n_layers);
    memcpy(v, m->kv_scale[1], sizeof(float) * (size_t) m->hp.n_layers);
    return 1;
}


static int
m_quant_config(moe_model_t *m, const char *quantization, char *err,
    size_t errlen)
{
    char      path[MOE_PATH_MAX + 64];
    yajl_val  root;
    int       rc;

    snprintf(path, sizeof(path), "%s/config.json", m->dir);
    rc = m_parse_json(path, &root, err, errlen);
    if (rc != MOE_OK) {
        return rc;
    }
    rc = moe_qconfig_parse(root, path, &m->q, err, errlen);
    yajl_tree_free(root);
    if (rc == MOE_OK) {
        rc = moe_qconfig_request(&m->q, quantization, m->dir, err, errlen);
    }
    if (rc == MOE_OK && m->q.method != MOE_QM_NONE
        && m->hp.arch == MOE_ARCH_GPT2)
    {
        moe_errf(err, errlen, "%s: quantization_config: quantized GPT-2 "
                 "checkpoints are not supported", path);
        rc = MOE_EUNSUPPORTED;
    }
    return rc;
}


static int
m_is_linear(int kind)
{
    switch (kind) {
    case MOE_WK_WQ: case MOE_WK_WK: case MOE_WK_WV: case MOE_WK_WO:
    case MOE_WK_GATE: case MOE_WK_UP: case MOE_WK_DOWN:
    case MOE_WK_WS_GATE: case MOE_WK_WS_UP: case MOE_WK_WS_DOWN:
    case MOE_WK_WD_GATE: case MOE_WK_WD_UP: case MOE_WK_WD_DOWN:
        return 1;
    default:
        return 0;
    }
}


/* A YAML fp8 quantization's rows: the source rows to fp32, then per row
 * scale amax / 448 and the e4m3 codes of w / scale. */
typedef struct {
    const moe_st_tensor_t *t;
    int64_t                K;
    float                 *w, *s;
    uint8_t               *q;
} m_fp8_rows_t;


static int
m_fp8_rows(void *arg, int64_t r0, int64_t r1)
{
    m_fp8_rows_t *a = arg;
    int64_t       n, k, K = a->K;
    float         amax, s, *w;
    int           rc;

    rc = moe_st_to_f32(a->t, r0 * K, (r1 - r0) * K, a->w + r0 * K);
    for (n = r0; rc == MOE_OK && n < r1; n++) {
        w = a->w + n * K;
        amax = 0.0f;
        for (k = 0; k < K; k++) {
            amax = fmaxf(amax, fabsf(w[k]));
        }
        s = amax > 0.0f ? amax / 448.0f : 1.0f;
        a->s[n] = s;
        for (k = 0; k < K; k++) {
            a->q[n * K + k] = moe_f32_to_fp8_e4m3(w[k] / s);
        }
    }
    return rc;
}


/* qt as YAML fp8 makes it from source tensor t: e4m3 codes q (N, K),
 * F32 scales s (N, 1). */
static void
m_fp8_fields(moe_qtensor_t *qt, const moe_st_tensor_t *t, const void *q,
    const void *s)
{
    qt->layout = MOE_QL_FP8_CHANNEL;
    qt->name = t->name;
    qt->file = t->file;
    qt->qweight = q;
    qt->qdtype = MOE_DT_F8_E4M3;
    qt->scales = s;
    qt->sdtype = MOE_DT_F32;
    qt->s_rows = qt->rows;
    qt->s_cols = 1;
}


/* YAML fp8 on a float checkpoint: per output channel, scale amax / 448.
 * Every weight of the model goes through here once (the upload walk), so
 * the rows are split over threads (moe_par_for: a thread per 1M weights;
 * the same values, rows are independent). */
static int
m_fp8_load(m_ctx_t *c, const char *name, moe_qtensor_t *qt, float *w,
    uint8_t **qbuf, float **sbuf)
{
    const moe_st_tensor_t *t;
    int64_t                N = qt->rows, K = qt->cols, shape[2] = { N, K };
    m_fp8_rows_t           a;
    int                    rc;

    rc = m_find(c, name, 2, shape, &t);
    if (rc != MOE_OK) {
        return rc;
    }
    *qbuf = malloc((size_t) (N * K));
    *sbuf = malloc((size_t) N * sizeof(float));
    if (*qbuf == NULL || *sbuf == NULL) {
        moe_errf(c->err, c->errlen, "out of memory quantizing '%s'", name);
        return MOE_ENOMEM;
    }
    a.t = t;
    a.K = K;
    a.w = w;
    a.s = *sbuf;
    a.q = *qbuf;
    rc = moe_par_for(N, ((int64_t) 1 << 20) / (K > 0 ? K : 1), 1,
                     m_fp8_rows, &a);
    if (rc != MOE_OK) {
        moe_errf(c->err, c->errlen, "'%s': cannot read it as floats", name);
        return rc;
    }
    m_fp8_fields(qt, t, *qbuf, *sbuf);
    return MOE_OK;
}


/* The walk's piece of quantized weight qt (its whole logical shape):
 * data of dtype (packed bytes, or the fp32 dequantization). */
static void
m_qref(moe_tensor_ref_t *r, int kind, int layer, int expert,
    const moe_qtensor_t *qt, int dtype, const void *data)
{
    memset(r, 0, sizeof(*r));
    r->kind = kind;
    r->layer = layer;
    r->expert = expert;
    r->name = qt->name;
    r->file = qt->file;
    r->dtype = dtype;
    r->data = data;
    r->rows = qt->rows;
    r->cols = qt->cols;
    r->ld = qt->cols;
    r->quant = qt;
}


/*
 * A linear weight `name` ("<module>.weight", logical (N, K)) that may be
 * quantized: *done 1 when handled here (quantized piece emitted, or only
 * checked when c->fn is NULL), 0 when it is a plain float tensor.
 */
static int
m_qload(m_ctx_t *c, const char *name, int kind, int layer, int expert,
    int64_t N, int64_t K, int *done)
{
    moe_qtensor_t     qt;
    moe_tensor_ref_t  r;
    char              base[300];
    size_t            n = strlen(name);
    float            *w = NULL, *sbuf = NULL;
    uint8_t          *qbuf = NULL;
    int               rc;

    *done = 0;
    if (!m_is_linear(kind) || n < 8 || strcmp(name + n - 7, ".weight") != 0
        || n - 7 >= sizeof(base))
    {
        return MOE_OK;
    }
    snprintf(base, sizeof(base), "%.*s", (int) (n - 7), name);

    if (c->q->method == MOE_QM_FP8_LOAD) {
        if (c->fn == NULL) {
            return MOE_OK;          /* the float tensor is checked as is */
        }
        memset(&qt, 0, sizeof(qt));
        qt.rows = N;
        qt.cols = K;
    } else {
        rc = moe_qtensor_find(c->st, c->q, c->dir, base, N, K, &qt, c->err,
                              c->errlen);
        if (rc <= 0) {
            return rc;              /* 0: a float tensor; or the error */
        }
        if (c->fn == NULL) {
            *done = 1;
            return MOE_OK;
        }
    }
    *done = 1;
    if (c->packed == M_DESCRIBE && c->q->method == MOE_QM_FP8_LOAD) {
        /* what m_fp8_load makes, not made: the data pointers the source
         * tensor's (a plan or a size only reads the fields) */
        const moe_st_tensor_t *t;
        int64_t                shape[2] = { N, K };

        rc = m_find(c, name, 2, shape, &t);
        if (rc != MOE_OK) {
            return rc;
        }
        m_fp8_fields(&qt, t, t->data, t->data);
        m_qref(&r, kind, layer, expert, &qt, qt.qdtype, qt.qweight);
        return c->fn(c->ctx, &r);
    }
    if (c->packed && c->q->method != MOE_QM_FP8_LOAD) {
        /* as the files hold it; compressed-tensors int4 in GPTQ's layout,
         * which the backends take (described only: not converted) */
        moe_qtensor_t        gq;
        const moe_qtensor_t *p = &qt;
        void                *mem = NULL;

        if (qt.layout == MOE_QL_CT4) {
            rc = c->packed == M_DESCRIBE ? moe_qtensor_ct4_as_gptq(&qt, &gq)
                                         : moe_qtensor_ct4_to_gptq(&qt, &gq,
                                                                   &mem);
            if (rc != MOE_OK) {
                moe_errf(c->err, c->errlen, "out of memory converting '%s' "
                         "to the GPTQ layout", qt.name);
                return rc;
            }
            p = &gq;
        }
        m_qref(&r, kind, layer, expert, p, p->qdtype, p->qweight);
        rc = c->fn(c->ctx, &r);
        free(mem);
        return rc;
    }
    w = malloc((size_t) (N * K) * sizeof(float));
    if (w == NULL) {
        moe_errf(c->err, c->errlen, "out of memory dequantizing '%s'", name);
        return MOE_ENOMEM;
    }
    if (c->q->method == MOE_QM_FP8_LOAD) {
        rc = m_fp8_load(c, name, &qt, w, &qbuf, &sbuf);
    } else {
        rc = MOE_OK;
    }
    if (rc == MOE_OK && !c->packed) {
        rc = moe_qtensor_dequant(&qt, w);
    }
    if (rc == MOE_OK) {
        m_qref(&r, kind, layer, expert, &qt,
               c->packed ? qt.qdtype : MOE_DT_F32,
               c->packed ? qt.qweight : (const void *) w);
        rc = c->fn(c->ctx, &r);
    }
    free(w);
    free(qbuf);
    free(sbuf);
    return rc;
}
