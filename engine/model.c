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
 */

#include <errno.h>
#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include <yajl/yajl_tree.h>

#include "model.h"
#include "safetensors.h"

struct moe_model {
    char            dir[MOE_PATH_MAX];
    moe_hparams_t   hp;
    moe_weights_t   w;
    moe_st_set_t   *st;
    int64_t         weight_bytes;
};

static const char *supported_archs =
    "LlamaForCausalLM, MistralForCausalLM, MixtralForCausalLM";


static void
m_err(char *err, size_t errlen, const char *fmt, ...)
{
    va_list ap;

    if (err == NULL || errlen == 0) {
        return;
    }
    va_start(ap, fmt);
    vsnprintf(err, errlen, fmt, ap);
    va_end(ap);
}


static char *
m_read_file(const char *path)
{
    FILE  *fp;
    char  *buf = NULL;
    long   n;

    fp = fopen(path, "rb");
    if (fp == NULL) {
        return NULL;
    }
    if (fseek(fp, 0, SEEK_END) == 0 && (n = ftell(fp)) >= 0
        && fseek(fp, 0, SEEK_SET) == 0)
    {
        buf = malloc((size_t) n + 1);
        if (buf != NULL) {
            if (fread(buf, 1, (size_t) n, fp) != (size_t) n) {
                free(buf);
                buf = NULL;
                errno = EIO;
            } else {
                buf[n] = '\0';
            }
        }
    }
    fclose(fp);
    return buf;
}


/* Parse a JSON file; MOE_EIO when missing, MOE_EFORMAT when malformed. */
static int
m_parse_json(const char *path, yajl_val *out, char *err, size_t errlen)
{
    char      *text, *p;
    char       jerr[256];
    yajl_val   root;

    *out = NULL;
    text = m_read_file(path);
    if (text == NULL) {
        m_err(err, errlen, "%s: %s", path, strerror(errno));
        return MOE_EIO;
    }
    jerr[0] = '\0';
    root = yajl_tree_parse(text, jerr, sizeof(jerr));
    free(text);
    if (root == NULL || !YAJL_IS_OBJECT(root)) {
        for (p = jerr; *p; p++) {
            if (*p == '\n' || *p == '\r') {
                *p = ' ';
            }
        }
        m_err(err, errlen, "%s: not a JSON object%s%s", path,
              jerr[0] ? ": " : "", jerr);
        yajl_tree_free(root);
        return MOE_EFORMAT;
    }
    *out = root;
    return MOE_OK;
}


static yajl_val
m_get(yajl_val obj, const char *key)
{
    size_t i;

    if (obj == NULL || !YAJL_IS_OBJECT(obj)) {
        return NULL;
    }
    for (i = 0; i < obj->u.object.len; i++) {
        if (strcmp(obj->u.object.keys[i], key) == 0) {
            return obj->u.object.values[i];
        }
    }
    return NULL;
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
        m_err(err, errlen, "%s: '%s' must be an integer >= %lld", file, key,
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
        m_err(err, errlen, "%s: '%s' must be a number", file, key);
        return MOE_EFORMAT;
    }
    *out = YAJL_IS_INTEGER(v) ? (double) YAJL_GET_INTEGER(v)
                              : YAJL_GET_DOUBLE(v);
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
        m_err(err, errlen, "%s: '%s' must be true or false", file, key);
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
        m_err(err, errlen, "%s: 'eos_token_id' must be an integer or a list "
              "of at most 8 integers", file);
        return MOE_EFORMAT;
    }
    for (i = 0; i < v->u.array.len; i++) {
        if (!YAJL_IS_INTEGER(v->u.array.values[i])) {
            m_err(err, errlen, "%s: 'eos_token_id' must be an integer or a "
                  "list of integers", file);
            return MOE_EFORMAT;
        }
        ids[i] = (int32_t) YAJL_GET_INTEGER(v->u.array.values[i]);
    }
    *n = (int) v->u.array.len;
    return 1;
}


/* rope_scaling / rope_parameters: only plain RoPE is supported. */
static int
m_rope(yajl_val root, const char *file, double *theta, char *err,
    size_t errlen)
{
    static const char *keys[] = { "rope_scaling", "rope_parameters" };
    yajl_val           v, t;
    size_t             k;
    int                rc;

    for (k = 0; k < 2; k++) {
        v = m_get(root, keys[k]);
        if (v == NULL || YAJL_IS_NULL(v)) {
            continue;
        }
        if (!YAJL_IS_OBJECT(v)) {
            m_err(err, errlen, "%s: '%s' must be an object or null", file,
                  keys[k]);
            return MOE_EFORMAT;
        }
        t = m_get(v, "rope_type");
        if (t == NULL) {
            t = m_get(v, "type");
        }
        if (t != NULL && !YAJL_IS_NULL(t)
            && (!YAJL_IS_STRING(t)
                || (strcmp(t->u.string, "default") != 0
                    && strcmp(t->u.string, "none") != 0)))
        {
            m_err(err, errlen, "%s: %s type '%.40s' is not supported (only "
                  "plain RoPE: type default/none)", file, keys[k],
                  YAJL_IS_STRING(t) ? t->u.string : "?");
            return MOE_EUNSUPPORTED;
        }
        /* transformers 5 keeps rope_theta inside rope_parameters */
        if (m_get(v, "rope_theta") != NULL) {
            rc = m_num(v, file, "rope_theta", *theta, theta, err, errlen);
            if (rc != MOE_OK) {
                return rc;
            }
        }
    }
    return MOE_OK;
}


static int
m_parse_config(const char *dir, moe_hparams_t *hp, char *err, size_t errlen)
{
    char        path[MOE_PATH_MAX + 64];
    yajl_val    root, v, groot;
    long long   x;
    double      d;
    int         rc, b;
    const char *arch;
    int32_t     eos[8];
    int         n_eos;

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
        m_err(err, errlen, "config.json: 'architectures' must be a list of "
              "names (supported: %s)", supported_archs);
        rc = MOE_EFORMAT;
        goto done;
    }
    arch = v->u.array.values[0]->u.string;
    if (strcmp(arch, "LlamaForCausalLM") == 0) {
        hp->arch = MOE_ARCH_LLAMA;
    } else if (strcmp(arch, "MistralForCausalLM") == 0) {
        hp->arch = MOE_ARCH_MISTRAL;
    } else if (strcmp(arch, "MixtralForCausalLM") == 0) {
        hp->arch = MOE_ARCH_MIXTRAL;
    } else {
        m_err(err, errlen, "config.json: architecture '%.64s' is not "
              "supported (supported: %s)", arch, supported_archs);
        rc = MOE_EUNSUPPORTED;
        goto done;
    }
    snprintf(hp->arch_name, sizeof(hp->arch_name), "%s", arch);

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
        m_err(err, errlen, "config.json: needs hidden_size, "
              "num_hidden_layers, num_attention_heads, intermediate_size "
              "and vocab_size");
        rc = MOE_EFORMAT;
        goto done;
    }
    CHECK(m_int(root, "config.json", "num_key_value_heads", hp->n_heads, 1,
                &x, err, errlen));
    hp->n_kv_heads = (int) x;
    if (hp->n_heads % hp->n_kv_heads != 0) {
        m_err(err, errlen, "config.json: num_attention_heads %d is not a "
              "multiple of num_key_value_heads %d", hp->n_heads,
              hp->n_kv_heads);
        rc = MOE_EFORMAT;
        goto done;
    }
    CHECK(m_int(root, "config.json", "head_dim", hp->dim / hp->n_heads, 1,
                &x, err, errlen));
    hp->head_dim = (int) x;
    if (hp->head_dim % 2 != 0 || hp->head_dim < 2) {
        m_err(err, errlen, "config.json: head_dim %d must be even",
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
            m_err(err, errlen, "config.json: num_experts_per_tok %d > "
                  "num_local_experts %d", hp->top_k, hp->n_experts);
            rc = MOE_EFORMAT;
            goto done;
        }
    } else {
        hp->n_experts = 1;
        hp->top_k = 1;
    }

    d = hp->arch == MOE_ARCH_MIXTRAL ? 1e6 : 1e4;
    CHECK(m_num(root, "config.json", "rope_theta", d, &d, err, errlen));
    CHECK(m_rope(root, "config.json", &d, err, errlen));
    if (!(d > 0)) {
        m_err(err, errlen, "config.json: rope_theta must be > 0");
        rc = MOE_EFORMAT;
        goto done;
    }
    hp->rope_theta = (float) d;
    CHECK(m_num(root, "config.json", "rms_norm_eps", 1e-6, &d, err, errlen));
    hp->norm_eps = (float) d;
    CHECK(m_bool(root, "config.json", "tie_word_embeddings", 0,
                 &hp->tie_embeddings, err, errlen));

    v = m_get(root, "hidden_act");
    if (v != NULL && !YAJL_IS_NULL(v)
        && (!YAJL_IS_STRING(v) || strcmp(v->u.string, "silu") != 0))
    {
        m_err(err, errlen, "config.json: hidden_act '%.32s' is not supported "
              "(only silu)", YAJL_IS_STRING(v) ? v->u.string : "?");
        rc = MOE_EUNSUPPORTED;
        goto done;
    }
    CHECK(m_bool(root, "config.json", "attention_bias", 0, &b, err, errlen));
    if (b) {
        m_err(err, errlen, "config.json: attention_bias is not supported");
        rc = MOE_EUNSUPPORTED;
        goto done;
    }
    CHECK(m_bool(root, "config.json", "mlp_bias", 0, &b, err, errlen));
    if (b) {
        m_err(err, errlen, "config.json: mlp_bias is not supported");
        rc = MOE_EUNSUPPORTED;
        goto done;
    }

    if (hp->arch != MOE_ARCH_LLAMA) {
        CHECK(m_int(root, "config.json", "sliding_window", 0, 0, &x, err,
                    errlen));
        hp->sliding_window = (int) x;
    }

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

typedef struct {
    const char          *dir;
    const moe_st_set_t  *st;
    char                *err;
    size_t               errlen;
} m_ctx_t;


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
        m_err(c->err, c->errlen, "%s: missing tensor '%s'", c->dir, name);
        return MOE_EFORMAT;
    }
    same = t->n_dims == nd;
    for (i = 0; same && i < nd; i++) {
        same = t->shape[i] == shape[i];
    }
    if (!same) {
        m_shape_str(a, sizeof(a), t->n_dims, t->shape);
        m_shape_str(b, sizeof(b), nd, shape);
        m_err(c->err, c->errlen, "%s: tensor '%s' has shape %s, expected %s",
              t->file, name, a, b);
        return MOE_EFORMAT;
    }
    *out = t;
    return MOE_OK;
}


/* Load 1-D or 2-D tensor `name` (shape d0[, d1]) into dst as fp32. */
static int
m_load(m_ctx_t *c, const char *name, float *dst, int64_t d0, int64_t d1)
{
    const moe_st_tensor_t *t;
    int64_t                shape[2] = { d0, d1 };
    int                    rc;

    rc = m_find(c, name, d1 > 0 ? 2 : 1, shape, &t);
    if (rc != MOE_OK) {
        return rc;
    }
    return moe_st_to_f32(t, 0, t->numel, dst);
}


static float *
m_alloc(size_t n)
{
    return malloc((n ? n : 1) * sizeof(float));
}


static int
m_load_experts(m_ctx_t *c, const moe_hparams_t *hp, moe_weights_t *w, int l)
{
    const moe_st_tensor_t *gu, *dn;
    const char            *pre, *s_gate, *s_up, *s_down;
    char                   name[256], name2[256];
    size_t                 D = (size_t) hp->dim, F = (size_t) hp->ffn_dim;
    size_t                 E = (size_t) hp->n_experts;
    float                 *wg, *wu, *wd;
    int64_t                shape[3];
    size_t                 e;
    int                    rc, p;

    wg = w->w_gate + (size_t) l * E * F * D;
    wu = w->w_up + (size_t) l * E * F * D;
    wd = w->w_down + (size_t) l * E * D * F;

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
    rc = m_load(c, name, w->router + (size_t) l * E * D, (int64_t) E,
                (int64_t) D);
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
        shape[0] = (int64_t) E;
        shape[1] = (int64_t) (2 * F);
        shape[2] = (int64_t) D;
        rc = m_find(c, name, 3, shape, &gu);
        if (rc != MOE_OK) {
            return rc;
        }
        snprintf(name2, sizeof(name2),
                 "model.layers.%d.%s.experts.down_proj%s", l, pre,
                 strstr(name, ".weight") ? ".weight" : "");
        shape[1] = (int64_t) D;
        shape[2] = (int64_t) F;
        rc = m_find(c, name2, 3, shape, &dn);
        if (rc != MOE_OK) {
            return rc;
        }
        for (e = 0; e < E; e++) {
            rc = moe_st_to_f32(gu, (int64_t) (e * 2 * F * D),
                               (int64_t) (F * D), wg + e * F * D);
            if (rc == MOE_OK) {
                rc = moe_st_to_f32(gu, (int64_t) ((e * 2 + 1) * F * D),
                                   (int64_t) (F * D), wu + e * F * D);
            }
            if (rc != MOE_OK) {
                return rc;
            }
        }
        return moe_st_to_f32(dn, 0, dn->numel, wd);
    }

    /* per-expert layout: w1/w3/w2 (Mixtral) or gate/up/down_proj */
    snprintf(name, sizeof(name), "model.layers.%d.%s.experts.0.w1.weight", l,
             pre);
    if (moe_st_find(c->st, name) != NULL) {
        s_gate = "w1";
        s_up = "w3";
        s_down = "w2";
    } else {
        snprintf(name, sizeof(name),
                 "model.layers.%d.%s.experts.0.gate_proj.weight", l, pre);
        if (moe_st_find(c->st, name) != NULL) {
            s_gate = "gate_proj";
            s_up = "up_proj";
            s_down = "down_proj";
        } else {
            m_err(c->err, c->errlen, "%s: missing tensor "
                  "'model.layers.%d.%s.experts.0.w1.weight' (nor a fused "
                  "'experts.gate_up_proj')", c->dir, l, pre);
            return MOE_EFORMAT;
        }
    }
    for (e = 0; e < E; e++) {
        snprintf(name, sizeof(name), "model.layers.%d.%s.experts.%zu.%s"
                 ".weight", l, pre, e, s_gate);
        rc = m_load(c, name, wg + e * F * D, (int64_t) F, (int64_t) D);
        if (rc != MOE_OK) {
            return rc;
        }
        snprintf(name, sizeof(name), "model.layers.%d.%s.experts.%zu.%s"
                 ".weight", l, pre, e, s_up);
        rc = m_load(c, name, wu + e * F * D, (int64_t) F, (int64_t) D);
        if (rc != MOE_OK) {
            return rc;
        }
        snprintf(name, sizeof(name), "model.layers.%d.%s.experts.%zu.%s"
                 ".weight", l, pre, e, s_down);
        rc = m_load(c, name, wd + e * D * F, (int64_t) D, (int64_t) F);
        if (rc != MOE_OK) {
            return rc;
        }
    }
    return MOE_OK;
}


static int
m_load_weights(moe_model_t *m, char *err, size_t errlen)
{
    const moe_hparams_t *hp = &m->hp;
    moe_weights_t       *w = &m->w;
    m_ctx_t              c;
    size_t               D, L, V, Q, KV, F, E;
    char                 name[256];
    int                  l, rc;

    c.dir = m->dir;
    c.st = m->st;
    c.err = err;
    c.errlen = errlen;

    D = (size_t) hp->dim;
    L = (size_t) hp->n_layers;
    V = (size_t) hp->vocab_size;
    Q = (size_t) hp->n_heads * (size_t) hp->head_dim;
    KV = (size_t) hp->n_kv_heads * (size_t) hp->head_dim;
    F = (size_t) hp->ffn_dim;
    E = (size_t) hp->n_experts;

    w->embed = m_alloc(V * D);
    w->attn_norm = m_alloc(L * D);
    w->wq = m_alloc(L * Q * D);
    w->wk = m_alloc(L * KV * D);
    w->wv = m_alloc(L * KV * D);
    w->wo = m_alloc(L * D * Q);
    w->ffn_norm = m_alloc(L * D);
    w->router = hp->arch == MOE_ARCH_MIXTRAL ? m_alloc(L * E * D) : NULL;
    w->w_gate = m_alloc(L * E * F * D);
    w->w_up = m_alloc(L * E * F * D);
    w->w_down = m_alloc(L * E * D * F);
    w->final_norm = m_alloc(D);
    w->lm_head = hp->tie_embeddings ? w->embed : m_alloc(V * D);
    if (!w->embed || !w->attn_norm || !w->wq || !w->wk || !w->wv || !w->wo
        || !w->ffn_norm || (hp->arch == MOE_ARCH_MIXTRAL && !w->router)
        || !w->w_gate || !w->w_up || !w->w_down || !w->final_norm
        || !w->lm_head)
    {
        m_err(err, errlen, "%s: out of memory for fp32 weights", m->dir);
        return MOE_ENOMEM;
    }

#define LOAD(nm, dst, d0, d1)                                                \
    do {                                                                     \
        rc = m_load(&c, nm, dst, (int64_t) (d0), (int64_t) (d1));            \
        if (rc != MOE_OK) {                                                  \
            return rc;                                                       \
        }                                                                    \
    } while (0)

    LOAD("model.embed_tokens.weight", w->embed, V, D);
    LOAD("model.norm.weight", w->final_norm, D, 0);
    if (!hp->tie_embeddings) {
        LOAD("lm_head.weight", w->lm_head, V, D);
    }

    for (l = 0; l < hp->n_layers; l++) {
        size_t lu = (size_t) l;

        snprintf(name, sizeof(name), "model.layers.%d.input_layernorm.weight",
                 l);
        LOAD(name, w->attn_norm + lu * D, D, 0);
        snprintf(name, sizeof(name),
                 "model.layers.%d.post_attention_layernorm.weight", l);
        LOAD(name, w->ffn_norm + lu * D, D, 0);
        snprintf(name, sizeof(name), "model.layers.%d.self_attn.q_proj.weight",
                 l);
        LOAD(name, w->wq + lu * Q * D, Q, D);
        snprintf(name, sizeof(name), "model.layers.%d.self_attn.k_proj.weight",
                 l);
        LOAD(name, w->wk + lu * KV * D, KV, D);
        snprintf(name, sizeof(name), "model.layers.%d.self_attn.v_proj.weight",
                 l);
        LOAD(name, w->wv + lu * KV * D, KV, D);
        snprintf(name, sizeof(name), "model.layers.%d.self_attn.o_proj.weight",
                 l);
        LOAD(name, w->wo + lu * D * Q, D, Q);

        if (hp->arch == MOE_ARCH_MIXTRAL) {
            rc = m_load_experts(&c, hp, w, l);
            if (rc != MOE_OK) {
                return rc;
            }
        } else {
            snprintf(name, sizeof(name),
                     "model.layers.%d.mlp.gate_proj.weight", l);
            LOAD(name, w->w_gate + lu * F * D, F, D);
            snprintf(name, sizeof(name),
                     "model.layers.%d.mlp.up_proj.weight", l);
            LOAD(name, w->w_up + lu * F * D, F, D);
            snprintf(name, sizeof(name),
                     "model.layers.%d.mlp.down_proj.weight", l);
            LOAD(name, w->w_down + lu * D * F, D, F);
        }
    }
#undef LOAD
    return MOE_OK;
}


int
moe_model_load(const char *dir, int top_k_override, moe_model_t **out,
    char *err, size_t errlen)
{
    moe_model_t *m;
    int          rc;

    *out = NULL;
    if (dir == NULL || strlen(dir) >= MOE_PATH_MAX) {
        m_err(err, errlen, "model directory path missing or too long");
        return MOE_EINVAL;
    }
    m = calloc(1, sizeof(*m));
    if (m == NULL) {
        m_err(err, errlen, "out of memory");
        return MOE_ENOMEM;
    }
    snprintf(m->dir, sizeof(m->dir), "%s", dir);

    rc = m_parse_config(dir, &m->hp, err, errlen);
    if (rc != MOE_OK) {
        goto fail;
    }
    if (top_k_override > 0 && m->hp.n_experts > 1) {
        if (top_k_override > m->hp.n_experts) {
            m_err(err, errlen, "top_k %d is larger than the model's %d "
                  "experts", top_k_override, m->hp.n_experts);
            rc = MOE_EINVAL;
            goto fail;
        }
        m->hp.top_k = top_k_override;
    }

    rc = moe_st_open_dir(dir, &m->st, err, errlen);
    if (rc != MOE_OK) {
        goto fail;
    }
    rc = m_load_weights(m, err, errlen);
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
    moe_weights_t *w;

    if (m == NULL) {
        return;
    }
    w = &m->w;
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
