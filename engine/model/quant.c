/*
 * Quantized checkpoints: quantization_config, the packed tensors of the
 * fp8 / compressed-tensors / AWQ / GPTQ layouts, exact dequantization and
 * the packing the quantizer and the tests share.  Layouts: model/quant.h.
 */

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

#define PCRE2_CODE_UNIT_WIDTH 8
#include <pcre2.h>
#include <yajl/yajl_tree.h>

#include "model/quant.h"
#include "util/json.h"
#include "util/par.h"

const int moe_awq_nibble[8] = { 0, 4, 1, 5, 2, 6, 3, 7 };


/* ------------------------------------------------------------ config */

static yajl_val
q_get(const struct yajl_val_s *obj, const char *key)
{
    return moe_json_get(obj, key);
}


/* integer key (absent/null: def) */
static int
q_int(yajl_val o, const char *key, long long def, long long *out)
{
    yajl_val v = q_get(o, key);

    if (v == NULL || YAJL_IS_NULL(v)) {
        *out = def;
        return 0;
    }
    if (!YAJL_IS_INTEGER(v)) {
        return -1;
    }
    *out = YAJL_GET_INTEGER(v);
    return 0;
}


static int
q_bool(yajl_val o, const char *key, int def, int *out)
{
    yajl_val v = q_get(o, key);

    if (v == NULL || YAJL_IS_NULL(v)) {
        *out = def;
    } else if (YAJL_IS_TRUE(v)) {
        *out = 1;
    } else if (YAJL_IS_FALSE(v)) {
        *out = 0;
    } else {
        return -1;
    }
    return 0;
}


static const char *
q_str(yajl_val o, const char *key)
{
    yajl_val v = q_get(o, key);

    return v != NULL && YAJL_IS_STRING(v) ? v->u.string : NULL;
}


/* a compressed-tensors "re:" ignore pattern must compile (a bad one
 * would otherwise match nothing, silently) */
static int
q_regex_check(const char *pat, const char *file, const char *key, size_t i,
    char *err, size_t errlen)
{
    pcre2_code   *re;
    PCRE2_UCHAR   msg[128];
    PCRE2_SIZE    eo;
    int           ec;

    re = pcre2_compile((PCRE2_SPTR) pat, PCRE2_ZERO_TERMINATED,
                       PCRE2_ANCHORED, &ec, &eo, NULL);
    if (re == NULL) {
        pcre2_get_error_message(ec, msg, sizeof(msg));
        moe_errf(err, errlen, "%s: quantization_config: '%s'[%zu] is not a "
                 "valid regular expression: %s (at offset %zu)", file, key,
                 i, (const char *) msg, (size_t) eo);
        return MOE_EINVAL;
    }
    pcre2_code_free(re);
    return MOE_OK;
}


/* an ignore list: null or a list of strings, appended to q->ignore */
static int
q_ignore_list(moe_qconfig_t *q, yajl_val v, const char *file,
    const char *key, char *err, size_t errlen)
{
    size_t i;

    if (v == NULL || YAJL_IS_NULL(v)) {
        return MOE_OK;
    }
    if (!YAJL_IS_ARRAY(v)) {
        moe_errf(err, errlen, "%s: quantization_config: '%s' must be a list "
                 "of module names", file, key);
        return MOE_EINVAL;
    }
    for (i = 0; i < v->u.array.len; i++) {
        yajl_val s = v->u.array.values[i];

        if (!YAJL_IS_STRING(s) || strlen(s->u.string) == 0
            || strlen(s->u.string) >= sizeof(q->ignore[0]))
        {
            moe_errf(err, errlen, "%s: quantization_config: '%s'[%zu] must "
                     "be a module name (1 to %zu bytes)", file, key, i,
                     sizeof(q->ignore[0]) - 1);
            return MOE_EINVAL;
        }
        if (q->ignore_exact && strncmp(s->u.string, "re:", 3) == 0
            && q_regex_check(s->u.string + 3, file, key, i, err, errlen)
               != MOE_OK)
        {
            return MOE_EINVAL;
        }
        if (q->n_ignore == MOE_Q_MAX_IGNORE) {
            moe_errf(err, errlen, "%s: quantization_config: more than %d "
                     "modules in '%s'", file, MOE_Q_MAX_IGNORE, key);
            return MOE_EINVAL;
        }
        snprintf(q->ignore[q->n_ignore++], sizeof(q->ignore[0]), "%s",
                 s->u.string);
    }
    return MOE_OK;
}


/* [bn, bk] with positive integers */
static int
q_block(yajl_val v, const char *file, const char *key, moe_qconfig_t *q,
    char *err, size_t errlen)
{
    if (v == NULL || YAJL_IS_NULL(v)) {
        return MOE_OK;
    }
    if (!YAJL_IS_ARRAY(v) || v->u.array.len != 2
        || !YAJL_IS_INTEGER(v->u.array.values[0])
        || !YAJL_IS_INTEGER(v->u.array.values[1])
        || YAJL_GET_INTEGER(v->u.array.values[0]) < 1
        || YAJL_GET_INTEGER(v->u.array.values[1]) < 1
        || YAJL_GET_INTEGER(v->u.array.values[0]) > 65536
        || YAJL_GET_INTEGER(v->u.array.values[1]) > 65536)
    {
        moe_errf(err, errlen, "%s: quantization_config: '%s' must be two "
                 "positive integers [block_n, block_k]", file, key);
        return MOE_EINVAL;
    }
    q->block_n = (int) YAJL_GET_INTEGER(v->u.array.values[0]);
    q->block_k = (int) YAJL_GET_INTEGER(v->u.array.values[1]);
    q->strategy = MOE_QL_FP8_BLOCK;
    return MOE_OK;
}


static int
q_parse_fp8(const struct yajl_val_s *qc, const char *file, moe_qconfig_t *q,
    char *err, size_t errlen)
{
    const char *s;
    int         rc;

    q->method = MOE_QM_FP8;
    q->bits = 8;
    s = q_str((yajl_val) qc, "activation_scheme");
    if (s != NULL && strcmp(s, "static") == 0) {
        q->static_act = 1;
    } else if (s != NULL && strcmp(s, "dynamic") != 0) {
        moe_errf(err, errlen, "%s: quantization_config: activation_scheme "
                 "'%.32s' (static or dynamic)", file, s);
        return MOE_EINVAL;
    }
    s = q_str((yajl_val) qc, "fmt");
    if (s != NULL && strcmp(s, "e5m2") == 0) {
        q->fp8_e5m2 = 1;
    } else if (s != NULL && strcmp(s, "e4m3") != 0) {
        moe_errf(err, errlen, "%s: quantization_config: fmt '%.32s' (e4m3 "
                 "or e5m2)", file, s);
        return MOE_EINVAL;
    }
    rc = q_block(q_get(qc, "weight_block_size"), file, "weight_block_size",
                 q, err, errlen);
    if (rc == MOE_OK) {
        rc = q_ignore_list(q, q_get(qc, "modules_to_not_convert"), file,
                           "modules_to_not_convert", err, errlen);
    }
    if (rc == MOE_OK) {
        rc = q_ignore_list(q, q_get(qc, "ignored_layers"), file,
                           "ignored_layers", err, errlen);
    }
    return rc;
}


/*
 * compressed-tensors pack-quantized int4 weights (W4A16, llm-compressor's
 * GPTQ / AWQ / RTN output): weights {num_bits 4, type int, strategy group
 * (group_size 32 / 64 / 128) or channel, symmetric true / false, actorder
 * null / group / weight}, no activation quantization.
 */
static int
q_parse_ct_int4(yajl_val g, yajl_val w, const char *file, const char *gname,
    moe_qconfig_t *q, char *err, size_t errlen)
{
    yajl_val    a, ao;
    const char *s;
    long long   bits, gs;
    int         sym;

    q->method = MOE_QM_CT_INT4;
    s = q_str(w, "type");
    if (s != NULL && strcmp(s, "int") != 0) {
        moe_errf(err, errlen, "%s: quantization_config: compressed-tensors "
                 "pack-quantized weights of type '%.16s' are not supported "
                 "(int4)", file, s);
        return MOE_EINVAL;
    }
    if (q_int(w, "num_bits", 4, &bits) != 0 || bits != 4) {
        moe_errf(err, errlen, "%s: quantization_config: compressed-tensors "
                 "pack-quantized weights must be num_bits 4 (int4)", file);
        return MOE_EINVAL;
    }
    q->bits = 4;
    s = q_str(w, "strategy");
    if (s != NULL && strcmp(s, "channel") == 0) {
        q->group_size = -1;
    } else if (s != NULL && strcmp(s, "group") == 0) {
        if (q_int(w, "group_size", -2, &gs) != 0 || gs == -2) {
            moe_errf(err, errlen, "%s: quantization_config: config_groups."
                     "%s.weights: strategy group needs an integer "
                     "group_size", file, gname);
            return MOE_EINVAL;
        }
        if (gs != 32 && gs != 64 && gs != 128) {
            moe_errf(err, errlen, "%s: quantization_config: group_size %lld "
                     "is not supported (32, 64, 128 or strategy channel)",
                     file, gs);
            return MOE_EINVAL;
        }
        q->group_size = (int) gs;
    } else {
        moe_errf(err, errlen, "%s: quantization_config: int4 weights "
                 "strategy '%.32s' is not supported (group or channel)",
                 file, s != NULL ? s : "(none)");
        return MOE_EINVAL;
    }
    if (q_bool(w, "symmetric", 1, &sym) != 0) {
        moe_errf(err, errlen, "%s: quantization_config: weights.symmetric "
                 "must be true or false", file);
        return MOE_EINVAL;
    }
    q->sym = sym;
    ao = q_get(w, "actorder");
    if (ao != NULL && !YAJL_IS_NULL(ao) && !YAJL_IS_FALSE(ao)
        && !(YAJL_IS_STRING(ao) && (strcmp(ao->u.string, "group") == 0
                                    || strcmp(ao->u.string, "weight") == 0
                                    || strcmp(ao->u.string, "static") == 0)))
    {
        moe_errf(err, errlen, "%s: quantization_config: weights.actorder "
                 "must be null, \"group\", \"weight\" or \"static\"",
                 file);
        return MOE_EINVAL;
    }
    q->desc_act = ao != NULL && YAJL_IS_STRING(ao)
                  && strcmp(ao->u.string, "group") == 0;
    a = q_get(g, "input_activations");
    if (a != NULL && !YAJL_IS_NULL(a)) {
        moe_errf(err, errlen, "%s: quantization_config: config_groups.%s "
                 "quantizes input_activations: int4 weights with quantized "
                 "activations (W4A8) are not supported, only W4A16", file,
                 gname);
        return MOE_EINVAL;
    }
    return MOE_OK;
}


static int
q_parse_ct(const struct yajl_val_s *qc, const char *file, moe_qconfig_t *q,
    char *err, size_t errlen)
{
    yajl_val    groups, g, w, a;
    const char *s, *gf;
    long long   bits;
    int         dyn, rc;

    q->method = MOE_QM_CT_FP8;
    q->bits = 8;
    q->ignore_exact = 1;
    groups = q_get(qc, "config_groups");
    if (groups == NULL || !YAJL_IS_OBJECT(groups)
        || groups->u.object.len != 1)
    {
        moe_errf(err, errlen, "%s: quantization_config: compressed-tensors "
                 "needs 'config_groups' with exactly one group", file);
        return MOE_EINVAL;
    }
    g = groups->u.object.values[0];
    /* the group's format (newer files) or the config's */
    s = q_str((yajl_val) qc, "format");
    gf = YAJL_IS_OBJECT(g) ? q_str(g, "format") : NULL;
    if (gf != NULL) {
        s = gf;
    }
    if (s != NULL && strcmp(s, "float-quantized") != 0
        && strcmp(s, "naive-quantized") != 0
        && strcmp(s, "pack-quantized") != 0)
    {
        moe_errf(err, errlen, "%s: quantization_config: compressed-tensors "
                 "format '%.40s' is not supported (float-quantized fp8, "
                 "pack-quantized int4)", file, s);
        return MOE_EINVAL;
    }
    w = q_get(g, "weights");
    if (w == NULL || !YAJL_IS_OBJECT(w)) {
        moe_errf(err, errlen, "%s: quantization_config: config_groups.%s "
                 "has no 'weights'", file, groups->u.object.keys[0]);
        return MOE_EINVAL;
    }
    if (s != NULL && strcmp(s, "pack-quantized") == 0) {
        rc = q_parse_ct_int4(g, w, file, groups->u.object.keys[0], q, err,
                             errlen);
        if (rc != MOE_OK) {
            return rc;
        }
        return q_ignore_list(q, q_get(qc, "ignore"), file, "ignore", err,
                             errlen);
    }
    s = q_str(w, "type");
    if (q_int(w, "num_bits", 8, &bits) != 0 || bits != 8 || s == NULL
        || strcmp(s, "float") != 0)
    {
        moe_errf(err, errlen, "%s: quantization_config: compressed-tensors "
                 "weights must be num_bits 8, type float (fp8; int4 is "
                 "format pack-quantized)", file);
        return MOE_EINVAL;
    }
    s = q_str(w, "strategy");
    if (s == NULL || strcmp(s, "tensor") == 0) {
        q->strategy = MOE_QL_FP8_TENSOR;
    } else if (strcmp(s, "channel") == 0) {
        q->strategy = MOE_QL_FP8_CHANNEL;
    } else if (strcmp(s, "block") == 0) {
        rc = q_block(q_get(w, "block_structure"), file,
                     "weights.block_structure", q, err, errlen);
        if (rc != MOE_OK) {
            return rc;
        }
        if (q->block_n == 0) {
            moe_errf(err, errlen, "%s: quantization_config: strategy block "
                     "needs weights.block_structure", file);
            return MOE_EINVAL;
        }
    } else {
        moe_errf(err, errlen, "%s: quantization_config: weights strategy "
                 "'%.32s' is not supported (tensor, channel or block)",
                 file, s);
        return MOE_EINVAL;
    }
    a = q_get(g, "input_activations");
    if (a != NULL && YAJL_IS_OBJECT(a)) {
        if (q_bool(a, "dynamic", 0, &dyn) != 0) {
            moe_errf(err, errlen, "%s: quantization_config: "
                     "input_activations.dynamic must be true or false",
                     file);
            return MOE_EINVAL;
        }
        q->static_act = !dyn;
    }
    return q_ignore_list(q, q_get(qc, "ignore"), file, "ignore", err,
                         errlen);
}


static int
q_group(yajl_val qc, const char *file, const char *k1, const char *k2,
    moe_qconfig_t *q, char *err, size_t errlen)
{
    long long g;

    if (q_int(qc, k1, -2, &g) != 0 || (g == -2 && k2 != NULL
                                       && q_int(qc, k2, -2, &g) != 0))
    {
        moe_errf(err, errlen, "%s: quantization_config: '%s' must be an "
                 "integer", file, k1);
        return MOE_EINVAL;
    }
    if (g == -2) {
        g = 128;
    }
    if (g != -1 && g != 32 && g != 64 && g != 128) {
        moe_errf(err, errlen, "%s: quantization_config: group_size %lld is "
                 "not supported (32, 64, 128 or -1)", file, g);
        return MOE_EINVAL;
    }
    q->group_size = (int) g;
    return MOE_OK;
}


static int
q_bits4(yajl_val qc, const char *file, const char *k1, const char *k2,
    moe_qconfig_t *q, char *err, size_t errlen)
{
    long long b;

    if (q_int(qc, k1, -2, &b) != 0 || (b == -2 && k2 != NULL
                                       && q_int(qc, k2, -2, &b) != 0))
    {
        b = -3;
    }
    if (b == -2 || b == -3) {
        moe_errf(err, errlen, "%s: quantization_config: %s bits must be 4 "
                 "(got %s)", file, q->name, b == -2 ? "none"
                 : "a non-integer");
        return MOE_EINVAL;
    }
    if (b != 4) {
        moe_errf(err, errlen, "%s: quantization_config: %s bits must be 4 "
                 "(got %lld)", file, q->name, b);
        return MOE_EINVAL;
    }
    q->bits = 4;
    return MOE_OK;
}


int
moe_qconfig_parse(const struct yajl_val_s *root, const char *file,
    moe_qconfig_t *q, char *err, size_t errlen)
{
    yajl_val    qc;
    const char *m, *s;
    int         rc, zp;

    memset(q, 0, sizeof(*q));
    qc = q_get(root, "quantization_config");
    if (qc == NULL) {
        qc = q_get(root, "compression_config");
    }
    if (qc == NULL || YAJL_IS_NULL(qc)) {
        return MOE_OK;
    }
    if (!YAJL_IS_OBJECT(qc)) {
        moe_errf(err, errlen, "%s: quantization_config must be an object",
                 file);
        return MOE_EINVAL;
    }
    m = q_str(qc, "quant_method");
    if (m == NULL) {
        moe_errf(err, errlen, "%s: quantization_config has no string "
                 "'quant_method' (supported: fp8, compressed-tensors, awq, "
                 "gptq)", file);
        return MOE_EINVAL;
    }
    snprintf(q->name, sizeof(q->name), "%s", m);

    if (strcmp(m, "fp8") == 0) {
        return q_parse_fp8(qc, file, q, err, errlen);
    }
    if (strcmp(m, "compressed-tensors") == 0) {
        return q_parse_ct(qc, file, q, err, errlen);
    }
    if (strcmp(m, "awq") == 0) {
        q->method = MOE_QM_AWQ;
        rc = q_bits4(qc, file, "bits", "w_bit", q, err, errlen);
        if (rc == MOE_OK) {
            rc = q_group(qc, file, "group_size", "q_group_size", q, err,
                         errlen);
        }
        if (rc != MOE_OK) {
            return rc;
        }
        s = q_str(qc, "version");
        if (s != NULL && strcasecmp(s, "gemm") != 0) {
            moe_errf(err, errlen, "%s: quantization_config: AWQ version "
                     "'%.32s' is not supported (gemm)", file, s);
            return MOE_EINVAL;
        }
        if (q_bool(qc, "zero_point", 1, &zp) != 0 || !zp) {
            moe_errf(err, errlen, "%s: quantization_config: AWQ needs "
                     "zero_point true", file);
            return MOE_EINVAL;
        }
        return q_ignore_list(q, q_get(qc, "modules_to_not_convert"), file,
                             "modules_to_not_convert", err, errlen);
    }
    if (strcmp(m, "gptq") == 0) {
        q->method = MOE_QM_GPTQ;
        rc = q_bits4(qc, file, "bits", NULL, q, err, errlen);
        if (rc == MOE_OK) {
            rc = q_group(qc, file, "group_size", NULL, q, err, errlen);
        }
        if (rc != MOE_OK) {
            return rc;
        }
        if (q_bool(qc, "desc_act", 0, &q->desc_act) != 0
            || q_bool(qc, "sym", 1, &q->sym) != 0)
        {
            moe_errf(err, errlen, "%s: quantization_config: desc_act and "
                     "sym must be true or false", file);
            return MOE_EINVAL;
        }
        s = q_str(qc, "checkpoint_format");
        if (s == NULL || strcmp(s, "gptq") == 0) {
            q->gptq_v1 = 1;
        } else if (strcmp(s, "gptq_v2") != 0) {
            moe_errf(err, errlen, "%s: quantization_config: GPTQ "
                     "checkpoint_format '%.32s' (gptq or gptq_v2)", file, s);
            return MOE_EINVAL;
        }
        return q_ignore_list(q, q_get(qc, "modules_to_not_convert"), file,
                             "modules_to_not_convert", err, errlen);
    }
    moe_errf(err, errlen, "%s: quantization_config: quant_method '%.32s' is "
             "not supported (supported: fp8, compressed-tensors, awq, gptq)",
             file, m);
    return MOE_EINVAL;
}


int
moe_qconfig_request(moe_qconfig_t *q, const char *quantization,
    const char *dir, char *err, size_t errlen)
{
    int fp8ck;

    if (quantization == NULL || quantization[0] == '\0') {
        return MOE_OK;
    }
    fp8ck = q->method == MOE_QM_FP8 || q->method == MOE_QM_CT_FP8;
    if (strcasecmp(quantization, "fp8") == 0) {
        if (q->method == MOE_QM_NONE) {
            q->method = MOE_QM_FP8_LOAD;
            q->bits = 8;
            q->strategy = MOE_QL_FP8_CHANNEL;
            snprintf(q->name, sizeof(q->name), "fp8");
            return MOE_OK;
        }
        if (fp8ck || q->method == MOE_QM_FP8_LOAD) {
            return MOE_OK;
        }
    } else if ((strcasecmp(quantization, "awq") == 0
                && q->method == MOE_QM_AWQ)
               || (strcasecmp(quantization, "gptq") == 0
                   && q->method == MOE_QM_GPTQ)
               || (strcasecmp(quantization, "compressed-tensors") == 0
                   && (q->method == MOE_QM_CT_FP8
                       || q->method == MOE_QM_CT_INT4)))
    {
        return MOE_OK;
    }
    if (q->method == MOE_QM_NONE) {
        moe_errf(err, errlen, "%s: quantization '%s' was requested, but the "
                 "checkpoint is not quantized (config.json has no "
                 "quantization_config; only fp8 quantizes at load)", dir,
                 quantization);
    } else {
        moe_errf(err, errlen, "%s: quantization '%s' was requested, but the "
                 "checkpoint's quantization_config quant_method is '%s'",
                 dir, quantization, q->name);
    }
    return MOE_EINVAL;
}


int
moe_qconfig_ignored(const moe_qconfig_t *q, const char *module)
{
    pcre2_code       *re;
    pcre2_match_data *md;
    int               i, ec, hit;
    PCRE2_SIZE        eo;

    for (i = 0; i < q->n_ignore; i++) {
        const char *e = q->ignore[i];

        if (!q->ignore_exact) {
            if (strstr(module, e) != NULL) {
                return 1;
            }
            continue;
        }
        if (strncmp(e, "re:", 3) != 0) {
            if (strcmp(module, e) == 0) {
                return 1;
            }
            continue;
        }
        re = pcre2_compile((PCRE2_SPTR) (e + 3), PCRE2_ZERO_TERMINATED,
                           PCRE2_ANCHORED, &ec, &eo, NULL);
        if (re == NULL) {
            continue;
        }
        md = pcre2_match_data_create_from_pattern(re, NULL);
        hit = md != NULL && pcre2_match(re, (PCRE2_SPTR) module,
                                        PCRE2_ZERO_TERMINATED, 0, 0, md,
                                        NULL) >= 0;
        pcre2_match_data_free(md);
        pcre2_code_free(re);
        if (hit) {
            return 1;
        }
    }
    return 0;
}


/* ----------------------------------------------------------- tensors */

static int
q_shape_is(const moe_st_tensor_t *t, int64_t a, int64_t b)
{
    return t->n_dims == 2 && t->shape[0] == a && t->shape[1] == b;
}


static void
q_shape_str(char *buf, size_t n, const moe_st_tensor_t *t)
{
    size_t off = 0;
    int    i;

    off += (size_t) snprintf(buf, n, "[");
    for (i = 0; i < t->n_dims && off < n; i++) {
        off += (size_t) snprintf(buf + off, n - off, "%s%lld", i ? ", " : "",
                                 (long long) t->shape[i]);
    }
    if (off < n) {
        snprintf(buf + off, n - off, "]");
    }
}


/* the tensor base+suffix; missing: error when need */
static int
q_tensor(const moe_st_set_t *st, const char *dir, const char *base,
    const char *suffix, const char *why, int need,
    const moe_st_tensor_t **out, char *err, size_t errlen)
{
    char name[320];

    snprintf(name, sizeof(name), "%s.%s", base, suffix);
    *out = moe_st_find(st, name);
    if (*out == NULL && need) {
        moe_errf(err, errlen, "%s: missing tensor '%s' (%s)", dir, name,
                 why);
        return MOE_EINVAL;
    }
    return MOE_OK;
}


static int
q_bad_shape(const moe_st_tensor_t *t, const char *want, char *err,
    size_t errlen)
{
    char a[96];

    q_shape_str(a, sizeof(a), t);
    moe_errf(err, errlen, "%s: tensor '%s' has shape %s %s, expected %s",
             t->file, t->name, moe_dtype_name(t->dtype), a, want);
    return MOE_EINVAL;
}


static int
q_scale_dtype(const moe_st_tensor_t *t, char *err, size_t errlen)
{
    if (!moe_dtype_is_float(t->dtype)) {
        moe_errf(err, errlen, "%s: tensor '%s' has dtype %s (scales are F32, "
                 "BF16 or F16)", t->file, t->name, moe_dtype_name(t->dtype));
        return MOE_EINVAL;
    }
    return MOE_OK;
}


float
moe_q_scale_at(const void *p, int dtype, int64_t i)
{
    const unsigned char *b = p;
    uint16_t             h;
    float                f;

    if (dtype == MOE_DT_F32) {
        memcpy(&f, b + 4 * i, sizeof(f));
        return f;
    }
    h = (uint16_t) (b[2 * i] | (b[2 * i + 1] << 8));
    return dtype == MOE_DT_F16 ? moe_f16_to_f32(h) : moe_bf16_to_f32(h);
}


static int
q_find_fp8(const moe_st_set_t *st, const moe_qconfig_t *q, const char *dir,
    const char *base, int64_t N, int64_t K, const moe_st_tensor_t *w,
    moe_qtensor_t *o, char *err, size_t errlen)
{
    const moe_st_tensor_t *s, *in;
    char                   want[96];
    int64_t                bn, bk;
    int                    rc, want_dt;

    want_dt = q->fp8_e5m2 ? MOE_DT_F8_E5M2 : MOE_DT_F8_E4M3;
    if ((int) w->dtype != want_dt) {
        moe_errf(err, errlen, "%s: tensor '%s' has dtype %s "
                 "(quantization_config %s needs %s)", w->file, w->name,
                 moe_dtype_name(w->dtype),
                 q->name, moe_dtype_name((moe_dtype_t) want_dt));
        return MOE_EINVAL;
    }
    if (!q_shape_is(w, N, K)) {
        snprintf(want, sizeof(want), "[%lld, %lld]", (long long) N,
                 (long long) K);
        return q_bad_shape(w, want, err, errlen);
    }
    o->qweight = w->data;
    o->qdtype = want_dt;

    if (q->block_n > 0) {
        bn = q->block_n;
        bk = q->block_k;
        rc = q_tensor(st, dir, base, q->method == MOE_QM_FP8
                      ? "weight_scale_inv" : "weight_scale",
                      "fp8 block-wise weight scales", 1, &s, err, errlen);
        if (rc != MOE_OK) {
            return rc;
        }
        if (!q_shape_is(s, (N + bn - 1) / bn, (K + bk - 1) / bk)) {
            snprintf(want, sizeof(want), "[%lld, %lld] (blocks of %lld x "
                     "%lld)", (long long) ((N + bn - 1) / bn),
                     (long long) ((K + bk - 1) / bk), (long long) bn,
                     (long long) bk);
            return q_bad_shape(s, want, err, errlen);
        }
        o->layout = MOE_QL_FP8_BLOCK;
        o->block_n = (int) bn;
        o->block_k = (int) bk;
        o->s_rows = s->shape[0];
        o->s_cols = s->shape[1];
    } else {
        rc = q_tensor(st, dir, base, "weight_scale", "fp8 weight scale", 1,
                      &s, err, errlen);
        if (rc != MOE_OK) {
            return rc;
        }
        if (s->numel == 1 && q->strategy != MOE_QL_FP8_CHANNEL) {
            o->layout = MOE_QL_FP8_TENSOR;
            o->s_rows = o->s_cols = 1;
        } else if (s->numel == N && q->strategy != MOE_QL_FP8_TENSOR
                   && ((s->n_dims == 2 && s->shape[1] == 1)
                       || s->n_dims == 1))
        {
            o->layout = MOE_QL_FP8_CHANNEL;
            o->s_rows = N;
            o->s_cols = 1;
        } else {
            snprintf(want, sizeof(want), "%s", q->strategy
                     == MOE_QL_FP8_CHANNEL ? "[N, 1] per channel" : q->strategy
                     == MOE_QL_FP8_TENSOR ? "[] or [1] per tensor"
                     : "[] / [1] per tensor or [N, 1] per channel");
            return q_bad_shape(s, want, err, errlen);
        }
    }
    rc = q_scale_dtype(s, err, errlen);
    if (rc != MOE_OK) {
        return rc;
    }
    o->scales = s->data;
    o->sdtype = (int) s->dtype;

    rc = q_tensor(st, dir, base, "input_scale", "static activation scale",
                  q->static_act, &in, err, errlen);
    if (rc != MOE_OK) {
        return rc;
    }
    if (in != NULL) {
        if (in->numel != 1 || q_scale_dtype(in, err, errlen) != MOE_OK) {
            return q_bad_shape(in, "F32 [] or [1]", err, errlen);
        }
        o->input_scale = moe_q_scale_at(in->data, in->dtype, 0);
    }
    return MOE_OK;
}


/* A 4-bit tensor w of logical (N, K): N and K multiples of 8 and K of
 * the group; *G and *ng (groups) out. */
static int
q_int4_dims(const moe_qconfig_t *q, const moe_st_tensor_t *w, int64_t N,
    int64_t K, int64_t *G, int64_t *ng, char *err, size_t errlen)
{
    if (N % 8 != 0 || K % 8 != 0) {
        moe_errf(err, errlen, "%s: tensor '%s': %lld x %lld is not a multiple "
                 "of 8 (4-bit packing)", w->file, w->name, (long long) N,
                 (long long) K);
        return MOE_EINVAL;
    }
    *G = q->group_size > 0 ? q->group_size : K;
    if (K % *G != 0) {
        moe_errf(err, errlen, "%s: tensor '%s': in_features %lld is not "
                 "divisible by group_size %lld", w->file, w->name,
                 (long long) K, (long long) *G);
        return MOE_EINVAL;
    }
    *ng = K / *G;
    return MOE_OK;
}


/* o: a 4-bit tensor of `layout` from its packed words w, zeros z (may be
 * NULL), scales s (s_rows x s_cols as used), group G, ng groups */
static void
q_set_int4(moe_qtensor_t *o, moe_qlayout_t layout, const moe_st_tensor_t *w,
    const moe_st_tensor_t *z, const moe_st_tensor_t *s, int64_t s_rows,
    int64_t s_cols, int64_t G, int64_t ng)
{
    o->layout = layout;
    o->qweight = w->data;
    o->qdtype = MOE_DT_I32;
    o->zeros = z != NULL ? z->data : NULL;
    o->scales = s->data;
    o->sdtype = (int) s->dtype;
    o->s_rows = s_rows;
    o->s_cols = s_cols;
    o->group_size = (int) G;
    o->n_groups = (int) ng;
}


/* A g_idx tensor: I32 (K), every entry a group in [0, ng). */
static int
q_check_gidx(const moe_st_tensor_t *gi, int64_t K, int64_t ng, char *err,
    size_t errlen)
{
    char    want[96];
    int64_t k;
    int32_t v;

    if (gi->dtype != MOE_DT_I32 || gi->n_dims != 1 || gi->shape[0] != K) {
        snprintf(want, sizeof(want), "I32 [%lld]", (long long) K);
        return q_bad_shape(gi, want, err, errlen);
    }
    for (k = 0; k < K; k++) {
        memcpy(&v, (const char *) gi->data + 4 * k, sizeof(v));
        if (v < 0 || v >= ng) {
            moe_errf(err, errlen, "%s: tensor '%s': g_idx[%lld] = %d is out "
                     "of range [0, %lld)", gi->file, gi->name, (long long) k,
                     (int) v, (long long) ng);
            return MOE_EINVAL;
        }
    }
    return MOE_OK;
}


static int
q_find_int4(const moe_st_set_t *st, const moe_qconfig_t *q, const char *dir,
    const char *base, int64_t N, int64_t K, const moe_st_tensor_t *w,
    moe_qtensor_t *o, char *err, size_t errlen)
{
    const moe_st_tensor_t *z, *s, *gi;
    char                   want[96], why[64];
    int64_t                G, ng;
    int                    awq = q->method == MOE_QM_AWQ, rc;

    snprintf(why, sizeof(why), "quantization_config %s", q->name);
    if (w->dtype != MOE_DT_I32) {
        moe_errf(err, errlen, "%s: tensor '%s' has dtype %s (%s needs I32)",
                 w->file, w->name, moe_dtype_name(w->dtype), q->name);
        return MOE_EINVAL;
    }
    rc = q_int4_dims(q, w, N, K, &G, &ng, err, errlen);
    if (rc != MOE_OK) {
        return rc;
    }
    if (awq ? !q_shape_is(w, K, N / 8) : !q_shape_is(w, K / 8, N)) {
        snprintf(want, sizeof(want), "I32 [%lld, %lld]",
                 (long long) (awq ? K : K / 8), (long long) (awq ? N / 8 : N));
        return q_bad_shape(w, want, err, errlen);
    }
    rc = q_tensor(st, dir, base, "qzeros", why, 1, &z, err, errlen);
    if (rc == MOE_OK) {
        rc = q_tensor(st, dir, base, "scales", why, 1, &s, err, errlen);
    }
    if (rc != MOE_OK) {
        return rc;
    }
    if (z->dtype != MOE_DT_I32 || !q_shape_is(z, ng, N / 8)) {
        snprintf(want, sizeof(want), "I32 [%lld, %lld] (group_size %lld)",
                 (long long) ng, (long long) (N / 8), (long long) G);
        return q_bad_shape(z, want, err, errlen);
    }
    if (!moe_dtype_is_float(s->dtype) || !q_shape_is(s, ng, N)) {
        snprintf(want, sizeof(want), "F16 [%lld, %lld] (group_size %lld)",
                 (long long) ng, (long long) N, (long long) G);
        return q_bad_shape(s, want, err, errlen);
    }
    q_set_int4(o, awq ? MOE_QL_AWQ : MOE_QL_GPTQ, w, z, s, ng, N, G, ng);
    if (awq) {
        return MOE_OK;
    }
    o->zero_add = q->gptq_v1;
    rc = q_tensor(st, dir, base, "g_idx", "GPTQ desc_act true", q->desc_act,
                  &gi, err, errlen);
    if (rc != MOE_OK) {
        return rc;
    }
    if (gi == NULL) {
        return MOE_OK;
    }
    rc = q_check_gidx(gi, K, ng, err, errlen);
    o->g_idx = gi->data;
    return rc;
}


/* compressed-tensors pack-quantized int4 (see quant.h) */
static int
q_find_ct4(const moe_st_set_t *st, const moe_qconfig_t *q, const char *dir,
    const char *base, int64_t N, int64_t K, const moe_st_tensor_t *w,
    moe_qtensor_t *o, char *err, size_t errlen)
{
    const moe_st_tensor_t *z, *s, *gi, *sh;
    char                   want[96], why[64];
    int64_t                G, ng, k;
    float                  dims[2];
    int                    rc;

    snprintf(why, sizeof(why), "quantization_config %s int4", q->name);
    rc = q_int4_dims(q, w, N, K, &G, &ng, err, errlen);
    if (rc != MOE_OK) {
        return rc;
    }
    if (w->dtype != MOE_DT_I32 || !q_shape_is(w, N, K / 8)) {
        snprintf(want, sizeof(want), "I32 [%lld, %lld]", (long long) N,
                 (long long) (K / 8));
        return q_bad_shape(w, want, err, errlen);
    }
    rc = q_tensor(st, dir, base, "weight_scale", why, 1, &s, err, errlen);
    if (rc == MOE_OK) {
        rc = q_tensor(st, dir, base, "weight_zero_point",
                      "weights.symmetric false", !q->sym, &z, err, errlen);
    }
    if (rc == MOE_OK) {
        rc = q_tensor(st, dir, base, "weight_g_idx", "", 0, &gi, err,
                      errlen);
    }
    if (rc == MOE_OK) {
        rc = q_tensor(st, dir, base, "weight_shape", "", 0, &sh, err,
                      errlen);
    }
    if (rc != MOE_OK) {
        return rc;
    }
    if (!moe_dtype_is_float(s->dtype) || !q_shape_is(s, N, ng)) {
        snprintf(want, sizeof(want), "F32/BF16/F16 [%lld, %lld] (group_size "
                 "%lld)", (long long) N, (long long) ng, (long long) G);
        return q_bad_shape(s, want, err, errlen);
    }
    if (q->sym) {
        z = NULL;               /* symmetric: zero 0 whatever is stored */
    } else if (z->dtype != MOE_DT_I32 || !q_shape_is(z, N / 8, ng)) {
        snprintf(want, sizeof(want), "I32 [%lld, %lld] (group_size %lld)",
                 (long long) (N / 8), (long long) ng, (long long) G);
        return q_bad_shape(z, want, err, errlen);
    }
    if (sh != NULL) {
        if ((sh->dtype != MOE_DT_I32 && sh->dtype != MOE_DT_I64)
            || sh->n_dims != 1 || sh->shape[0] != 2)
        {
            return q_bad_shape(sh, "I32 [2] (out, in)", err, errlen);
        }
        (void) moe_st_to_f32(sh, 0, 2, dims);   /* exact below 2^24 */
        for (k = 0; k < 2; k++) {
            if (dims[k] != (float) (k == 0 ? N : K)) {
                moe_errf(err, errlen, "%s: tensor '%s' says the weight is "
                         "[%.0f, ...] in dimension %lld, the model needs "
                         "[%lld, %lld]", sh->file, sh->name, dims[k],
                         (long long) k, (long long) N, (long long) K);
                return MOE_EINVAL;
            }
        }
    }
    if (gi != NULL) {
        rc = q_check_gidx(gi, K, ng, err, errlen);
        if (rc != MOE_OK) {
            return rc;
        }
    } else if (q->desc_act) {
        moe_errf(err, errlen, "%s: missing tensor '%s.weight_g_idx' "
                 "(weights.actorder group)", dir, base);
        return MOE_EINVAL;
    }
    q_set_int4(o, MOE_QL_CT4, w, z, s, N, ng, G, ng);
    o->g_idx = gi != NULL ? gi->data : NULL;
    return MOE_OK;
}


int
moe_qtensor_find(const moe_st_set_t *st, const moe_qconfig_t *q,
    const char *dir, const char *base, int64_t N, int64_t K,
    moe_qtensor_t *out, char *err, size_t errlen)
{
    const moe_st_tensor_t *w, *f;
    int                    rc, ct;

    memset(out, 0, sizeof(*out));
    out->rows = N;
    out->cols = K;
    if (q->method != MOE_QM_NONE && (N < 1 || K < 1)) {
        /* group_size -1 takes G = K: K 0 would divide by zero */
        moe_errf(err, errlen, "%s: '%s': logical shape [%lld, %lld] is "
                 "empty", dir, base, (long long) N, (long long) K);
        return MOE_EINVAL;
    }
    switch (q->method) {
    case MOE_QM_FP8:
    case MOE_QM_CT_FP8:
        rc = q_tensor(st, dir, base, "weight", "", 0, &w, err, errlen);
        if (w == NULL) {
            return 0;           /* the caller names the missing .weight */
        }
        if (moe_dtype_is_float(w->dtype)) {
            if (moe_qconfig_ignored(q, base)) {
                return 0;       /* unquantized module: a float .weight */
            }
            moe_errf(err, errlen, "%s: tensor '%s' is %s, but quantization_"
                     "config %s quantizes '%s' (not in its ignore list)",
                     w->file, w->name, moe_dtype_name(w->dtype), q->name,
                     base);
            return MOE_EINVAL;
        }
        rc = q_find_fp8(st, q, dir, base, N, K, w, out, err, errlen);
        break;
    case MOE_QM_AWQ:
    case MOE_QM_GPTQ:
    case MOE_QM_CT_INT4:
        ct = q->method == MOE_QM_CT_INT4;
        rc = q_tensor(st, dir, base, ct ? "weight_packed" : "qweight", "", 0,
                      &w, err, errlen);
        (void) q_tensor(st, dir, base, "weight", "", 0, &f, err, errlen);
        if (f != NULL && moe_dtype_is_float(f->dtype)
            && moe_qconfig_ignored(q, base))
        {
            return 0;           /* the config's ignore list: float */
        }
        if (w == NULL) {
            moe_errf(err, errlen, "%s: missing tensor '%s.%s' "
                     "(quantization_config %s%s; '%s' is not in %s)", dir,
                     base, ct ? "weight_packed" : "qweight", q->name,
                     ct ? " pack-quantized" : "", base,
                     ct ? "its ignore list" : "modules_to_not_convert");
            return MOE_EINVAL;
        }
        rc = ct ? q_find_ct4(st, q, dir, base, N, K, w, out, err, errlen)
                : q_find_int4(st, q, dir, base, N, K, w, out, err, errlen);
        break;
    default:
        return 0;
    }
    if (rc != MOE_OK) {
        return rc;
    }
    out->name = w->name;
    out->file = w->file;
    return 1;
}


/* 4-bit code at element e of packed int32 words: nibble `nib` of word i */
static int
q_nib(const void *p, int64_t i, int nib)
{
    uint32_t u;

    memcpy(&u, (const char *) p + 4 * i, sizeof(u));
    return (int) ((u >> (4 * nib)) & 0xf);
}


int
moe_awq_get(const void *packed, int64_t N, int64_t r, int64_t n)
{
    return q_nib(packed, r * (N / 8) + n / 8, moe_awq_nibble[n % 8]);
}


int
moe_gptq_get_w(const void *qweight, int64_t N, int64_t k, int64_t n)
{
    return q_nib(qweight, (k / 8) * N + n, (int) (k % 8));
}


int
moe_gptq_get_z(const void *qzeros, int64_t N, int64_t g, int64_t n)
{
    return q_nib(qzeros, g * (N / 8) + n / 8, (int) (n % 8));
}


/* the quantization group of input row k: g_idx[k], or k / G */
static int64_t
q_group_of(const moe_qtensor_t *t, int64_t k)
{
    int32_t gi;

    if (t->g_idx == NULL) {
        return k / t->group_size;
    }
    memcpy(&gi, (const char *) t->g_idx + 4 * k, sizeof(gi));
    return gi;
}


int
moe_qtensor_dequant(const moe_qtensor_t *t, float *dst)
{
    const unsigned char *qb = t->qweight;
    int64_t              N = t->rows, K = t->cols, n, k, g;
    float                s, f;
    int                  z;

    switch (t->layout) {
    case MOE_QL_FP8_TENSOR:
    case MOE_QL_FP8_CHANNEL:
    case MOE_QL_FP8_BLOCK:
        for (n = 0; n < N; n++) {
            for (k = 0; k < K; k++) {
                f = t->qdtype == MOE_DT_F8_E5M2
                    ? moe_fp8_e5m2_to_f32(qb[n * K + k])
                    : moe_fp8_e4m3_to_f32(qb[n * K + k]);
                s = moe_q_scale_at(t->scales, t->sdtype,
                                   t->layout == MOE_QL_FP8_TENSOR ? 0
                                   : t->layout == MOE_QL_FP8_CHANNEL ? n
                                   : (n / t->block_n) * t->s_cols
                                     + k / t->block_k);
                dst[n * K + k] = f * s;
            }
        }
        return MOE_OK;
    case MOE_QL_AWQ:
        for (k = 0; k < K; k++) {
            g = k / t->group_size;
            for (n = 0; n < N; n++) {
                z = moe_awq_get(t->zeros, N, g, n);
                s = moe_q_scale_at(t->scales, t->sdtype, g * N + n);
                dst[n * K + k] = (float) (moe_awq_get(qb, N, k, n) - z) * s;
            }
        }
        return MOE_OK;
    case MOE_QL_GPTQ:
        for (k = 0; k < K; k++) {
            g = q_group_of(t, k);
            for (n = 0; n < N; n++) {
                z = moe_gptq_get_z(t->zeros, N, g, n) + t->zero_add;
                s = moe_q_scale_at(t->scales, t->sdtype, g * N + n);
                dst[n * K + k] = (float) (moe_gptq_get_w(qb, N, k, n) - z)
                                 * s;
            }
        }
        return MOE_OK;
    case MOE_QL_CT4:
        for (n = 0; n < N; n++) {
            for (k = 0; k < K; k++) {
                g = q_group_of(t, k);
                z = t->zeros != NULL ? moe_ct4_get_z(t->zeros, t->n_groups,
                                                     n, g)
                                     : 8;
                s = moe_q_scale_at(t->scales, t->sdtype, n * t->s_cols + g);
                dst[n * K + k] = (float) (moe_ct4_get_w(qb, K, n, k) - z)
                                 * s;
            }
        }
        return MOE_OK;
    default:
        return MOE_EINVAL;
    }
}


int
moe_ct4_get_w(const void *packed, int64_t K, int64_t n, int64_t k)
{
    return q_nib(packed, n * (K / 8) + k / 8, (int) (k % 8));
}


int
moe_ct4_get_z(const void *zp, int64_t n_groups, int64_t n, int64_t g)
{
    return q_nib(zp, (n / 8) * n_groups + g, (int) (n % 8));
}


/* f as an F16 into *h when it is exactly one (finite, in range, no bits
 * lost: a normal F16 keeps 10 mantissa bits, a subnormal one multiples of
 * 2^-24); else 0.  By the bits: not every compiler has _Float16. */
static int
q_f16_exact(float f, uint16_t *h)
{
    uint32_t u, m, full;
    uint16_t sign;
    int      e, sh;

    memcpy(&u, &f, sizeof(u));
    sign = (uint16_t) ((u >> 16) & 0x8000u);
    e = (int) ((u >> 23) & 0xffu) - 127;
    m = u & 0x7fffffu;
    if ((u & 0x7fffffffu) == 0) {
        *h = sign;
        return 1;
    }
    if (e > 15 || e < -24) {
        return 0;               /* inf, nan, too large, too small */
    }
    if (e >= -14) {
        if ((m & 0x1fffu) != 0) {
            return 0;
        }
        *h = (uint16_t) (sign | ((e + 15) << 10) | (m >> 13));
    } else {
        full = m | 0x800000u;   /* f = full 2^(e - 23) = M 2^-24 */
        sh = -(e + 1);
        if ((full & ((1u << sh) - 1u)) != 0) {
            return 0;
        }
        *h = (uint16_t) (sign | (full >> sh));
    }
    return moe_f16_to_f32(*h) == f;
}


typedef struct {
    const void *in;
    int64_t     rows, cols;
    int32_t    *out;
} q_tw_t;


/* Rows [r0, r1) of a word transposition (r0 a multiple of 16). */
static int
q_transpose_rows(void *arg, int64_t r0, int64_t r1)
{
    const q_tw_t *a = arg;
    int64_t       rows = a->rows, cols = a->cols, r, c, t0, c0;

    /* 16 x 16 tiles: the cache-blind loop wrote one word a line (0.41 ->
     * 0.70 GB/s on one core) */
    for (t0 = r0; t0 < r1; t0 += 16) {
        for (c0 = 0; c0 < cols; c0 += 16) {
            for (r = t0; r < r1 && r < t0 + 16; r++) {
                for (c = c0; c < cols && c < c0 + 16; c++) {
                    memcpy(&a->out[c * rows + r],
                           (const char *) a->in + 4 * (r * cols + c), 4);
                }
            }
        }
    }
    return MOE_OK;
}


void
moe_q_transpose_words(const void *in, int64_t rows, int64_t cols,
    int32_t *out)
{
    q_tw_t a = { in, rows, cols, out };

    /* a whole Mixtral's experts are ~23 GB of words: rows split over
     * threads in 16-row tiles, a thread per 4M words */
    (void) moe_par_for(rows, ((int64_t) 1 << 22) / (cols > 0 ? cols : 1),
                       16, q_transpose_rows, &a);
}


/* Whether every scale of ct is exactly an F16 (the converted scales'
 * type). */
static int
q_ct4_scales_f16(const moe_qtensor_t *ct)
{
    int64_t  i, n = ct->rows * (int64_t) ct->n_groups;
    uint16_t h;

    for (i = 0; i < n; i++) {
        if (!q_f16_exact(moe_q_scale_at(ct->scales, ct->sdtype, i), &h)) {
            return 0;
        }
    }
    return 1;
}


/* The fields of ct's GPTQ form (data pointers left to the caller). */
static void
q_ct4_gptq_fields(const moe_qtensor_t *ct, int f16, moe_qtensor_t *out)
{
    *out = *ct;
    out->layout = MOE_QL_GPTQ;
    out->sdtype = f16 ? MOE_DT_F16 : MOE_DT_F32;
    out->s_rows = ct->n_groups;
    out->s_cols = ct->rows;
    out->zero_add = 0;
}


int
moe_qtensor_ct4_as_gptq(const moe_qtensor_t *ct, moe_qtensor_t *out)
{
    if (ct->layout != MOE_QL_CT4) {
        return MOE_EINVAL;
    }
    q_ct4_gptq_fields(ct, q_ct4_scales_f16(ct), out);
    if (out->zeros == NULL) {
        /* symmetric: the conversion makes zero points (all 8); a non-NULL
         * stand-in of no smaller size, never read */
        out->zeros = ct->qweight;
    }
    return MOE_OK;
}


int
moe_qtensor_ct4_to_gptq(const moe_qtensor_t *ct, moe_qtensor_t *out,
    void **mem)
{
    int64_t   N = ct->rows, K = ct->cols, ng = ct->n_groups, n, g, i;
    size_t    wb = (size_t) (K / 8) * (size_t) N * 4;
    size_t    zb = (size_t) ng * (size_t) (N / 8) * 4;
    size_t    sb = (size_t) ng * (size_t) N * 4;
    char     *m;
    int32_t  *qw, *qz;
    uint16_t  h;
    int       f16;

    *mem = NULL;
    if (ct->layout != MOE_QL_CT4) {
        return MOE_EINVAL;
    }
    m = malloc(wb + zb + sb);
    if (m == NULL) {
        return MOE_ENOMEM;
    }
    qw = (int32_t *) m;
    qz = (int32_t *) (m + wb);
    /* the same words, transposed: (n, j) -> (j, n); zeros (j, g) ->
     * (g, j), symmetric: every zero 8 */
    moe_q_transpose_words(ct->qweight, N, K / 8, qw);
    if (ct->zeros != NULL) {
        moe_q_transpose_words(ct->zeros, N / 8, ng, qz);
    } else {
        for (i = 0; i < ng * (N / 8); i++) {
            qz[i] = (int32_t) 0x88888888u;
        }
    }
    /* scales (n, g) -> (g, n): F16 when all are exactly F16 */
    f16 = q_ct4_scales_f16(ct);
    for (n = 0; n < N; n++) {
        for (g = 0; g < ng; g++) {
            float f = moe_q_scale_at(ct->scales, ct->sdtype, n * ng + g);

            if (f16) {
                (void) q_f16_exact(f, &h);
                memcpy(m + wb + zb + 2 * (g * N + n), &h, 2);
            } else {
                memcpy(m + wb + zb + 4 * (g * N + n), &f, 4);
            }
        }
    }
    q_ct4_gptq_fields(ct, f16, out);
    out->qweight = qw;
    out->zeros = qz;
    out->scales = m + wb + zb;
    *mem = m;
    return MOE_OK;
}


/* ----------------------------------------------------------- packing */

uint8_t
moe_f32_to_fp8_e4m3(float f)
{
    uint32_t u, a, sign, r;
    float    x;

    /* on the bits, no libm (a YAML fp8 load converts every weight of the
     * model: frexpf / ldexpf / rintf made it 78 M values/s on one core
     * here, ~600 s for a Mixtral) */
    memcpy(&u, &f, sizeof(u));
    sign = (u >> 24) & 0x80u;
    a = u & 0x7fffffffu;
    if (a > 0x7f800000u) {
        return 0x7f;                        /* NaN */
    }
    if (a >= 0x43e00000u) {
        return (uint8_t) (sign | 0x7eu);    /* >= 448, inf: saturate */
    }
    if (a < 0x3c800000u) {
        /* below 2^-6: subnormal steps of 2^-9, x * 512 rounded to the
         * nearest integer (ties to even) by adding and taking off 2^23
         * (x * 512 < 8 is exact; 8 is the code of 2^-6 itself) */
        memcpy(&x, &a, sizeof(x));
        x = x * 512.0f + 8388608.0f;
        return (uint8_t) (sign | (uint32_t) (x - 8388608.0f));
    }
    /* 2^-6 <= |f| < 448: the top 3 of 23 mantissa bits rounded to nearest
     * even (the carry may bump the exponent), fp32's bias 127 -> e4m3's
     * 7; what rounds past 448 (the NaN code 0x7f) saturates */
    r = (a + 0x7ffffu + ((a >> 20) & 1u)) >> 20;
    r -= 120u << 3;
    return (uint8_t) (sign | (r > 0x7eu ? 0x7eu : r));
}


void
moe_awq_pack(const uint8_t *codes, int64_t rows, int64_t N, int32_t *out)
{
    int64_t  r, j;
    uint32_t u;
    int      c;

    for (r = 0; r < rows; r++) {
        for (j = 0; j < N / 8; j++) {
            u = 0;
            for (c = 0; c < 8; c++) {
                u |= (uint32_t) (codes[r * N + 8 * j + c] & 0xf)
                     << (4 * moe_awq_nibble[c]);
            }
            memcpy(&out[r * (N / 8) + j], &u, sizeof(u));
        }
    }
}


void
moe_gptq_pack_w(const uint8_t *codes, int64_t K, int64_t N, int32_t *out)
{
    int64_t  i, n;
    uint32_t u;
    int      r;

    for (i = 0; i < K / 8; i++) {
        for (n = 0; n < N; n++) {
            u = 0;
            for (r = 0; r < 8; r++) {
                u |= (uint32_t) (codes[(8 * i + r) * N + n] & 0xf) << (4 * r);
            }
            memcpy(&out[i * N + n], &u, sizeof(u));
        }
    }
}


void
moe_gptq_pack_z(const uint8_t *codes, int64_t groups, int64_t N,
    int32_t *out)
{
    int64_t  g, j;
    uint32_t u;
    int      c;

    for (g = 0; g < groups; g++) {
        for (j = 0; j < N / 8; j++) {
            u = 0;
            for (c = 0; c < 8; c++) {
                u |= (uint32_t) (codes[g * N + 8 * j + c] & 0xf) << (4 * c);
            }
            memcpy(&out[g * (N / 8) + j], &u, sizeof(u));
        }
    }
}
