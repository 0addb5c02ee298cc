/*
 * The engine's YAML configuration (see moe.h and conf/localmoe.yaml).
 *
 * The file is loaded with libyaml's document API; every check then walks the
 * node tree, so each error can name the line of the node it is about (libyaml
 * marks are 0-based, messages are 1-based).  Keys are described by tables:
 * one row per key with its type, destination field and range.
 */

#include <ctype.h>
#include <errno.h>
#include <limits.h>
#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/stat.h>
#include <unistd.h>

#include <yaml.h>

#include "moe.h"

#define MOE_CFG_SHOW  64            /* bytes of a bad value quoted back */

/*
 * Keys one mapping may have: more than any section knows (the largest,
 * vllm, about 40), so a longer mapping must hold an unknown or duplicate
 * key.  Refused before the duplicate check, which compares every pair
 * (100000 keys took most of a minute).
 */
#define MOE_CFG_MAX_KEYS  256

typedef enum {
    CFG_INT,
    CFG_DOUBLE,
    CFG_BOOL,
    CFG_STR,
    CFG_ENUM,
    CFG_QUANT
} cfg_type_t;

#define CFG_POW2      0x1           /* CFG_INT: must be a power of two */
#define CFG_OPEN_MIN  0x2           /* CFG_DOUBLE: min itself excluded */

typedef struct {
    const char         *name;
    cfg_type_t          type;
    size_t              off;        /* into moe_config_t */
    size_t              size;       /* CFG_STR / CFG_ENUM: buffer bytes */
    double              min;
    double              max;
    unsigned            flags;
    const char *const  *values;     /* CFG_ENUM: NULL terminated */
} cfg_key_t;

typedef struct {
    const char       *file;
    char             *err;
    size_t            errlen;
    yaml_document_t  *doc;
    moe_config_t     *c;

    int               model_name_line;
    int               tp_line;              /* 0: vllm tp not given */
    int               top_k_line;
    int               template_line;        /* 0: chat_template not given */
    int               served_line;          /* 0: not given */
    int               dev_line[MOE_MAX_INSTANCES][MOE_MAX_GPUS];
    int               name_line[MOE_MAX_INSTANCES];
} cfg_ctx_t;

#define OFF(f)  offsetof(moe_config_t, f)
#define SZ(f)   sizeof(((moe_config_t *) 0)->f)

static const char *const cfg_qtypes[] = { "fp16", "bf16", "fp32", NULL };
static const char *const cfg_formats[] = { "auto", "safetensors", "dummy",
                                           NULL };
static const char *const cfg_backends[] = { "auto", "cpu", "cuda", NULL };
static const char *const cfg_nccl_modes[] = { "auto", "on", "off", NULL };
static const char *const cfg_kv_dtypes[] = { "auto", "fp8", "fp8_e4m3",
                                             NULL };

/* tool calling: vLLM's --tool-call-parser names; "auto": from the model */
static const char *const cfg_tool_parsers[] = {
    "auto", "hermes", "mistral", "llama3_json", "none", NULL
};
/* 1 when s is one of the NULL-terminated list */
static int
cfg_in(const char *const *list, const char *s)
{
    for (; *list != NULL; list++) {
        if (strcmp(*list, s) == 0) {
            return 1;
        }
    }
    return 0;
}


/* vLLM's `quantization` values: the methods this build loads, vLLM's
 * Marlin-kernel names for them (awq_marlin, gptq_marlin: the same
 * checkpoints, kept as awq / gptq), then, from CFG_QUANTS_LOADABLE on,
 * methods known to vLLM whose checkpoints this build cannot load
 * (refused by name) */
static const char *const cfg_quants[] = {
    "awq", "gptq", "fp8", "compressed-tensors", "awq_marlin", "gptq_marlin",
    "squeezellm", "marlin", "bitsandbytes", "gguf", NULL
};
#define CFG_QUANTS_LOADABLE 6

static const cfg_key_t cfg_model_keys[] = {
    { "num_experts", CFG_INT, OFF(num_experts), 0, 1, INT_MAX, 0, NULL },
    { "top_k_experts", CFG_INT, OFF(top_k_experts), 0, 1, INT_MAX, 0,
      NULL },
    { "hidden_size", CFG_INT, OFF(hidden_size), 0, 1, INT_MAX, 0, NULL },
    { "intermediate_size", CFG_INT, OFF(intermediate_size), 0, 1, INT_MAX,
      0, NULL },
    { "max_sequence_length", CFG_INT, OFF(max_sequence_length), 0, 1,
      INT_MAX, 0, NULL },
    { "quantization_type", CFG_ENUM, OFF(quantization_type),
      SZ(quantization_type), 0, 0, 0, cfg_qtypes },
    { "enable_compilation", CFG_BOOL, OFF(enable_compilation), 0, 0, 1, 0,
      NULL },
    { NULL, 0, 0, 0, 0, 0, 0, NULL }
};

static const cfg_key_t cfg_vllm_keys[] = {
    { "model_name", CFG_STR, OFF(model_name), SZ(model_name), 0, 0, 0,
      NULL },
    { "served_model_name", CFG_STR, OFF(served_model_name),
      SZ(served_model_name), 0, 0, 0, NULL },
    { "tensor_parallel_size", CFG_INT, OFF(tensor_parallel_size), 0, 1,
      MOE_MAX_GPUS, 0, NULL },
    { "gpu_memory_utilization", CFG_DOUBLE, OFF(gpu_memory_utilization), 0,
      0, 1, CFG_OPEN_MIN, NULL },
    { "max_model_len", CFG_INT, OFF(max_model_len), 0, 0, INT_MAX, 0,
      NULL },
    { "block_size", CFG_INT, OFF(block_size), 0, 1, 256, CFG_POW2, NULL },
    { "swap_space", CFG_DOUBLE, OFF(swap_space), 0, 0, HUGE_VAL, 0, NULL },
    { "max_num_batched_tokens", CFG_INT, OFF(max_num_batched_tokens), 0, 1,
      INT_MAX, 0, NULL },
    { "max_num_seqs", CFG_INT, OFF(max_num_seqs), 0, 1, INT_MAX, 0, NULL },
    { "enable_prefix_caching", CFG_BOOL, OFF(enable_prefix_caching), 0, 0,
      1, 0, NULL },
    { "enable_chunked_prefill", CFG_BOOL, OFF(enable_chunked_prefill), 0, 0,
      1, 0, NULL },
    { "use_v2_block_manager", CFG_BOOL, OFF(use_v2_block_manager), 0, 0, 1,
      0, NULL },
    { "max_chunked_prefill_tokens", CFG_INT, OFF(max_chunked_prefill_tokens),
      0, 0, INT_MAX, 0, NULL },
    { "quantization", CFG_QUANT, OFF(quantization), SZ(quantization), 0, 0,
      0, cfg_quants },
    { "trust_remote_code", CFG_BOOL, OFF(trust_remote_code), 0, 0, 1, 0,
      NULL },
    { "load_format", CFG_ENUM, OFF(load_format), SZ(load_format), 0, 0, 0,
      cfg_formats },
    { "chat_template", CFG_STR, OFF(chat_template), SZ(chat_template), 0, 0,
      0, NULL },
    /* scale-out: whole experts per rank */
    { "expert_parallel", CFG_BOOL, OFF(expert_parallel), 0, 0, 1, 0, NULL },
    /* fp8 KV cache (vLLM's key; the scales are LocalMoE's) */
    { "kv_cache_dtype", CFG_ENUM, OFF(kv_cache_dtype), SZ(kv_cache_dtype),
      0, 0, 0, cfg_kv_dtypes },
    { "kv_cache_scale_k", CFG_DOUBLE, OFF(kv_cache_scale_k), 0, 0, 448.0,
      CFG_OPEN_MIN, NULL },
    { "kv_cache_scale_v", CFG_DOUBLE, OFF(kv_cache_scale_v), 0, 0, 448.0,
      CFG_OPEN_MIN, NULL },
    /* tool calling (vLLM's --tool-call-parser, --enable-auto-tool-choice) */
    { "tool_call_parser", CFG_ENUM, OFF(tool_call_parser),
      SZ(tool_call_parser), 0, 0, 0, cfg_tool_parsers },
    { "enable_auto_tool_choice", CFG_BOOL, OFF(enable_auto_tool_choice), 0,
      0, 1, 0, NULL },
    { NULL, 0, 0, 0, 0, 0, 0, NULL }
};

static const cfg_key_t cfg_engine_keys[] = {
    { "backend", CFG_ENUM, OFF(backend), SZ(backend), 0, 0, 0,
      cfg_backends },
    { "cpu_threads", CFG_INT, OFF(cpu_threads), 0, 0, 4096, 0, NULL },
    { "cpu_tensor_parallel", CFG_BOOL, OFF(cpu_tensor_parallel), 0, 0, 1, 0,
      NULL },
    { "kv_cache_blocks", CFG_INT, OFF(kv_cache_blocks), 0, 0, INT_MAX, 0,
      NULL },
    { "ring_size", CFG_INT, OFF(ring_size), 0, 16, 1048576, CFG_POW2, NULL },
    { "prefill_step_ratio", CFG_DOUBLE, OFF(prefill_step_ratio), 0, 0, 1000,
      0, NULL },
    { "served_model_name", CFG_STR, OFF(served_model_name),
      SZ(served_model_name), 0, 0, 0, NULL },
    { "max_waiting_requests", CFG_INT, OFF(max_waiting_requests), 0, 1,
      INT_MAX, 0, NULL },
    { "max_waiting_tokens", CFG_INT, OFF(max_waiting_tokens), 0, 0,
      INT_MAX, 0, NULL },
    /* scale-out: collectives between GPU ranks */
    { "nccl", CFG_ENUM, OFF(nccl), SZ(nccl), 0, 0, 0, cfg_nccl_modes },
    { NULL, 0, 0, 0, 0, 0, 0, NULL }
};


/* 1-based line of a node */
static int
cfg_line(const yaml_node_t *n)
{
    return (int) n->start_mark.line + 1;
}


/* Bounded copy; returns -1 (dst untouched) when src does not fit. */
static int
cfg_copy(char *dst, size_t size, const char *src)
{
    size_t  len = strlen(src);

    if (len >= size) {
        return -1;
    }

    memcpy(dst, src, len + 1);

    return 0;
}


/* Writes "<file>:<line>: <reason>" into ctx->err and returns status. */
static int
cfg_err(cfg_ctx_t *ctx, int status, int line, const char *fmt, ...)
{
    va_list  ap;
    int      n;

    if (ctx->err == NULL || ctx->errlen == 0) {
        return status;
    }

    if (line > 0) {
        n = snprintf(ctx->err, ctx->errlen, "%s:%d: ", ctx->file, line);
    } else {
        n = snprintf(ctx->err, ctx->errlen, "%s: ", ctx->file);
    }

    if (n < 0 || (size_t) n >= ctx->errlen) {
        return status;
    }

    va_start(ap, fmt);
    vsnprintf(ctx->err + n, ctx->errlen - n, fmt, ap);
    va_end(ap);

    return status;
}


/* The scalar's text, cut to MOE_CFG_SHOW bytes; quoted ones keep "". */
static const char *
cfg_show(const yaml_node_t *n, char *buf, size_t size)
{
    const char  *q;
    size_t       len;

    if (n->type != YAML_SCALAR_NODE) {
        snprintf(buf, size, "a %s",
                 n->type == YAML_MAPPING_NODE ? "mapping" : "list");
        return buf;
    }

    len = n->data.scalar.length;
    q = n->data.scalar.style == YAML_PLAIN_SCALAR_STYLE ? "" : "\"";

    if (len == 0 && *q == '\0') {
        snprintf(buf, size, "null");
        return buf;
    }

    snprintf(buf, size, "'%s%.*s%s%s'", q,
             (int) (len > MOE_CFG_SHOW ? MOE_CFG_SHOW : len),
             (const char *) n->data.scalar.value,
             len > MOE_CFG_SHOW ? "..." : "", q);

    return buf;
}


static int
cfg_is_plain(const yaml_node_t *n)
{
    return n->type == YAML_SCALAR_NODE
           && n->data.scalar.style == YAML_PLAIN_SCALAR_STYLE;
}


/* A plain scalar that YAML reads as null: "", ~, null, Null, NULL. */
static int
cfg_is_null(const yaml_node_t *n)
{
    const char  *v;

    if (!cfg_is_plain(n)) {
        return 0;
    }

    v = (const char *) n->data.scalar.value;

    return *v == '\0' || strcmp(v, "~") == 0 || strcmp(v, "null") == 0
           || strcmp(v, "Null") == 0 || strcmp(v, "NULL") == 0;
}


/*
 * The text of a plain scalar that may hold a number: not empty and not
 * starting with a space (strtoll / strtod would skip it); NULL otherwise.
 */
static const char *
cfg_number_text(const yaml_node_t *n)
{
    const char  *v;

    if (!cfg_is_plain(n)) {
        return NULL;
    }

    v = (const char *) n->data.scalar.value;
    if (*v == '\0' || isspace((unsigned char) *v)) {
        return NULL;
    }

    return v;
}


/* Plain decimal integer scalar into *out; -1 if not one or out of int. */
static int
cfg_parse_int(const yaml_node_t *n, long long *out)
{
    const char  *v;
    char        *end;
    long long    x;

    v = cfg_number_text(n);
    if (v == NULL) {
        return -1;
    }

    errno = 0;
    x = strtoll(v, &end, 10);
    if (errno != 0 || *end != '\0' || x < INT_MIN || x > INT_MAX) {
        return -1;
    }

    *out = x;

    return 0;
}


static int
cfg_parse_double(const yaml_node_t *n, double *out)
{
    const char  *v;
    char        *end;
    double       x;

    v = cfg_number_text(n);
    if (v == NULL) {
        return -1;
    }

    errno = 0;
    x = strtod(v, &end);
    if (errno != 0 || *end != '\0' || !isfinite(x)) {
        return -1;
    }

    *out = x;

    return 0;
}


static int
cfg_parse_bool(const yaml_node_t *n, int *out)
{
    static const char *const  yes[] = { "true", "yes", "on", NULL };
    static const char *const  no[] = { "false", "no", "off", NULL };
    const char               *v;
    int                       i;

    if (!cfg_is_plain(n)) {
        return -1;
    }

    v = (const char *) n->data.scalar.value;

    for (i = 0; yes[i] != NULL; i++) {
        if (strcasecmp(v, yes[i]) == 0) {
            *out = 1;
            return 0;
        }
        if (strcasecmp(v, no[i]) == 0) {
            *out = 0;
            return 0;
        }
    }

    return -1;
}


static void
cfg_join(char *buf, size_t size, const char *const *values)
{
    size_t  len = 0;
    int     i;

    buf[0] = '\0';

    for (i = 0; values[i] != NULL; i++) {
        len += snprintf(buf + len, len < size ? size - len : 0, "%s%s",
                        i ? ", " : "", values[i]);
        if (len >= size) {
            return;
        }
    }
}


static int
cfg_is_pow2(long long x)
{
    return x > 0 && (x & (x - 1)) == 0;
}


/* Store one key's value (node v) into ctx->c as the table row k says. */
static int
cfg_set(cfg_ctx_t *ctx, const cfg_key_t *k, const yaml_node_t *v)
{
    char        *dst = (char *) ctx->c + k->off;
    char         show[MOE_CFG_SHOW + 16], list[128];
    long long    ix;
    double       dx;
    int          bx, i, line;
    const char  *s;

    line = cfg_line(v);

    switch (k->type) {

    case CFG_INT:
        if (cfg_parse_int(v, &ix) != 0) {
            return cfg_err(ctx, MOE_EINVAL, line,
                           "%s: expected an integer, got %s", k->name,
                           cfg_show(v, show, sizeof(show)));
        }
        if ((k->flags & CFG_POW2) && (!cfg_is_pow2(ix) || ix < k->min
                                      || ix > k->max))
        {
            return cfg_err(ctx, MOE_EINVAL, line,
                           "%s must be a power of two in %.0f..%.0f, got %lld",
                           k->name, k->min, k->max, ix);
        }
        if (ix < k->min || ix > k->max) {
            if (k->max == INT_MAX) {
                return cfg_err(ctx, MOE_EINVAL, line,
                               "%s must be >= %.0f, got %lld", k->name,
                               k->min, ix);
            }
            return cfg_err(ctx, MOE_EINVAL, line,
                           "%s must be in %.0f..%.0f, got %lld", k->name,
                           k->min, k->max, ix);
        }
        *(int *) dst = (int) ix;
        return MOE_OK;

    case CFG_DOUBLE:
        if (cfg_parse_double(v, &dx) != 0) {
            return cfg_err(ctx, MOE_EINVAL, line,
                           "%s: expected a number, got %s", k->name,
                           cfg_show(v, show, sizeof(show)));
        }
        if (k->max == HUGE_VAL && dx < k->min) {
            return cfg_err(ctx, MOE_EINVAL, line, "%s must be >= %g, got %s",
                           k->name, k->min,
                           (const char *) v->data.scalar.value);
        }
        if ((k->flags & CFG_OPEN_MIN) ? (dx <= k->min || dx > k->max)
                                      : (dx < k->min || dx > k->max))
        {
            return cfg_err(ctx, MOE_EINVAL, line,
                           "%s must be in %c%g, %g], got %s", k->name,
                           (k->flags & CFG_OPEN_MIN) ? '(' : '[', k->min,
                           k->max, (const char *) v->data.scalar.value);
        }
        *(double *) dst = dx;
        return MOE_OK;

    case CFG_BOOL:
        if (cfg_parse_bool(v, &bx) != 0) {
            return cfg_err(ctx, MOE_EINVAL, line,
                           "%s: expected a boolean (true/false), got %s",
                           k->name, cfg_show(v, show, sizeof(show)));
        }
        *(int *) dst = bx;
        return MOE_OK;

    case CFG_STR:
        if (v->type != YAML_SCALAR_NODE) {
            return cfg_err(ctx, MOE_EINVAL, line,
                           "%s: expected a string, got %s", k->name,
                           cfg_show(v, show, sizeof(show)));
        }
        if (cfg_is_null(v)) {
            /* null keeps the default */
            dst[0] = '\0';
            return MOE_OK;
        }
        if (cfg_copy(dst, k->size, (const char *) v->data.scalar.value)
            != 0)
        {
            return cfg_err(ctx, MOE_EINVAL, line,
                           "%s: too long (at most %zu bytes)", k->name,
                           k->size - 1);
        }
        return MOE_OK;

    case CFG_ENUM:
    case CFG_QUANT:
        if (k->type == CFG_QUANT && cfg_is_null(v)) {
            dst[0] = '\0';
            return MOE_OK;
        }
        if (v->type == YAML_SCALAR_NODE) {
            s = (const char *) v->data.scalar.value;
            for (i = 0; k->values[i] != NULL; i++) {
                if (strcasecmp(s, k->values[i]) != 0) {
                    continue;
                }
                if (k->type == CFG_QUANT
                    && cfg_in(cfg_quants + CFG_QUANTS_LOADABLE, k->values[i]))
                {
                    /* a known method, but this engine has no kernels */
                    return cfg_err(ctx, MOE_EUNSUPPORTED, line,
                                   "quantization '%s' is not supported by "
                                   "this build (awq, gptq, fp8, "
                                   "compressed-tensors, awq_marlin, "
                                   "gptq_marlin or null)", k->values[i]);
                }
                if (k->type == CFG_QUANT
                    && strstr(k->values[i], "_marlin") != NULL)
                {
                    /* vLLM's Marlin kernels for AWQ / GPTQ checkpoints:
                     * here the same checkpoints on this build's kernels */
                    snprintf(dst, k->size, "%.*s",
                             (int) (strstr(k->values[i], "_marlin")
                                    - k->values[i]), k->values[i]);
                    return MOE_OK;
                }
                cfg_copy(dst, k->size, k->values[i]);
                return MOE_OK;
            }
        }
        cfg_join(list, sizeof(list), k->values);
        return cfg_err(ctx, MOE_EINVAL, line, "%s must be %s%s, got %s",
                       k->name, k->type == CFG_QUANT ? "null or " : "",
                       list, cfg_show(v, show, sizeof(show)));
    }

    return cfg_err(ctx, MOE_EINVAL, line, "%s: internal error", k->name);
}


/*
 * Check that mapping node m has no duplicate or non-scalar keys; `where`
 * names it in messages.
 */
static int
cfg_check_keys(cfg_ctx_t *ctx, const yaml_node_t *m, const char *where)
{
    yaml_node_pair_t  *p, *q;
    yaml_node_t       *k, *k2;
    size_t             n;

    n = (size_t) (m->data.mapping.pairs.top - m->data.mapping.pairs.start);
    if (n > MOE_CFG_MAX_KEYS) {
        return cfg_err(ctx, MOE_EINVAL, cfg_line(m),
                       "%s has %zu keys (at most %d)", where, n,
                       MOE_CFG_MAX_KEYS);
    }

    for (p = m->data.mapping.pairs.start; p < m->data.mapping.pairs.top;
         p++)
    {
        k = yaml_document_get_node(ctx->doc, p->key);

        if (k->type != YAML_SCALAR_NODE) {
            return cfg_err(ctx, MOE_EINVAL, cfg_line(k),
                           "keys in %s must be plain names", where);
        }

        for (q = m->data.mapping.pairs.start; q < p; q++) {
            k2 = yaml_document_get_node(ctx->doc, q->key);
            if (k2->type == YAML_SCALAR_NODE
                && strcmp((const char *) k->data.scalar.value,
                          (const char *) k2->data.scalar.value) == 0)
            {
                return cfg_err(ctx, MOE_EINVAL, cfg_line(k),
                               "duplicate key '%s' in %s (first at line %d)",
                               (const char *) k->data.scalar.value, where,
                               cfg_line(k2));
            }
        }
    }

    return MOE_OK;
}


/* One of the plain-key sections: model, vllm, engine. */
static int
cfg_section(cfg_ctx_t *ctx, const char *name, const yaml_node_t *sec,
    const cfg_key_t *keys)
{
    yaml_node_pair_t  *p;
    yaml_node_t       *k, *v;
    const cfg_key_t   *row;
    const char        *key;
    char               where[64];
    int                rc;

    if (cfg_is_null(sec)) {
        return MOE_OK;                     /* an empty section */
    }

    if (sec->type != YAML_MAPPING_NODE) {
        return cfg_err(ctx, MOE_EINVAL, cfg_line(sec),
                       "section '%s' must be a mapping of keys", name);
    }

    snprintf(where, sizeof(where), "section '%s'", name);

    rc = cfg_check_keys(ctx, sec, where);
    if (rc != MOE_OK) {
        return rc;
    }

    for (p = sec->data.mapping.pairs.start; p < sec->data.mapping.pairs.top;
         p++)
    {
        k = yaml_document_get_node(ctx->doc, p->key);
        v = yaml_document_get_node(ctx->doc, p->value);
        key = (const char *) k->data.scalar.value;

        for (row = keys; row->name != NULL; row++) {
            if (strcmp(row->name, key) == 0) {
                break;
            }
        }

        if (row->name == NULL) {
            return cfg_err(ctx, MOE_EINVAL, cfg_line(k),
                           "unknown key '%s' in section '%s'", key, name);
        }

        if (strcmp(key, "served_model_name") == 0) {
            if (ctx->served_line) {
                return cfg_err(ctx, MOE_EINVAL, cfg_line(k),
                               "served_model_name given twice (first at "
                               "line %d)", ctx->served_line);
            }
            ctx->served_line = cfg_line(k);
        }

        rc = cfg_set(ctx, row, v);
        if (rc != MOE_OK) {
            return rc;
        }

        if (strcmp(key, "model_name") == 0) {
            ctx->model_name_line = cfg_line(v);
        } else if (strcmp(key, "tensor_parallel_size") == 0) {
            ctx->tp_line = cfg_line(v);
        } else if (strcmp(key, "top_k_experts") == 0) {
            ctx->top_k_line = cfg_line(v);
        } else if (strcmp(key, "chat_template") == 0) {
            ctx->template_line = cfg_line(v);
        }
    }

    return MOE_OK;
}


/* One key of server.api_key / server.admin_api_key, appended to keys. */
static int
cfg_key_one(cfg_ctx_t *ctx, const char *name, const yaml_node_t *e,
    char (*keys)[MOE_API_KEY_MAX], int *n)
{
    size_t  len;

    if (e->type != YAML_SCALAR_NODE || cfg_is_null(e)) {
        return cfg_err(ctx, MOE_EINVAL, cfg_line(e),
                       "%s: each key must be a string", name);
    }

    len = e->data.scalar.length;

    if (len == 0 || len >= MOE_API_KEY_MAX
        || memchr(e->data.scalar.value, '\0', len) != NULL)
    {
        return cfg_err(ctx, MOE_EINVAL, cfg_line(e),
                       "%s: a key must be 1 to %d bytes (value not shown)",
                       name, MOE_API_KEY_MAX - 1);
    }

    if (*n == MOE_MAX_API_KEYS) {
        return cfg_err(ctx, MOE_EINVAL, cfg_line(e),
                       "%s: at most %d keys (use a key file for more)",
                       name, MOE_MAX_API_KEYS);
    }

    memcpy(keys[*n], e->data.scalar.value, len);
    keys[*n][len] = '\0';
    (*n)++;

    return MOE_OK;
}


/*
 * One key or a list of keys.  Keys are secrets: errors name the setting
 * and its line, never the value.
 */
static int
cfg_keys(cfg_ctx_t *ctx, const char *name, const yaml_node_t *v,
    char (*keys)[MOE_API_KEY_MAX], int *n)
{
    yaml_node_item_t  *it;
    int                rc;

    if (v->type == YAML_SCALAR_NODE) {
        return cfg_is_null(v) ? MOE_OK : cfg_key_one(ctx, name, v, keys, n);
    }

    if (v->type != YAML_SEQUENCE_NODE) {
        return cfg_err(ctx, MOE_EINVAL, cfg_line(v),
                       "%s: expected a key or a list of keys", name);
    }

    for (it = v->data.sequence.items.start; it < v->data.sequence.items.top;
         it++)
    {
        rc = cfg_key_one(ctx, name, yaml_document_get_node(ctx->doc, *it),
                         keys, n);
        if (rc != MOE_OK) {
            return rc;
        }
    }

    return MOE_OK;
}


/* a key file's path, relative ones against the YAML file's directory */
static int
cfg_key_file(cfg_ctx_t *ctx, const char *name, const yaml_node_t *v,
    char *out)
{
    const char  *val, *slash;
    int          n;

    if (v->type != YAML_SCALAR_NODE || cfg_is_null(v)
        || v->data.scalar.length == 0)
    {
        return cfg_err(ctx, MOE_EINVAL, cfg_line(v),
                       "%s: expected a file name", name);
    }

    val = (const char *) v->data.scalar.value;
    slash = strrchr(ctx->file, '/');

    if (val[0] == '/' || slash == NULL) {
        n = snprintf(out, MOE_PATH_MAX, "%s", val);
    } else {
        n = snprintf(out, MOE_PATH_MAX, "%.*s/%s",
                     (int) (slash - ctx->file), ctx->file, val);
    }

    if (n < 0 || n >= MOE_PATH_MAX) {
        out[0] = '\0';
        return cfg_err(ctx, MOE_EINVAL, cfg_line(v), "%s: path too long",
                       name);
    }

    return MOE_OK;
}


/* server: the HTTP front's keys (api_key, api_key_file, admin_...) */
static int
cfg_server(cfg_ctx_t *ctx, const yaml_node_t *sec)
{
    moe_config_t      *c = ctx->c;
    yaml_node_pair_t  *p;
    yaml_node_t       *k, *v;
    const char        *key;
    int                rc;

    if (cfg_is_null(sec)) {
        return MOE_OK;
    }

    if (sec->type != YAML_MAPPING_NODE) {
        return cfg_err(ctx, MOE_EINVAL, cfg_line(sec),
                       "section 'server' must be a mapping of keys");
    }

    rc = cfg_check_keys(ctx, sec, "section 'server'");
    if (rc != MOE_OK) {
        return rc;
    }

    for (p = sec->data.mapping.pairs.start; p < sec->data.mapping.pairs.top;
         p++)
    {
        k = yaml_document_get_node(ctx->doc, p->key);
        v = yaml_document_get_node(ctx->doc, p->value);
        key = (const char *) k->data.scalar.value;

        if (strcmp(key, "api_key") == 0) {
            rc = cfg_keys(ctx, key, v, c->api_keys, &c->n_api_keys);
        } else if (strcmp(key, "admin_api_key") == 0) {
            rc = cfg_keys(ctx, key, v, c->admin_api_keys,
                          &c->n_admin_api_keys);
        } else if (strcmp(key, "api_key_file") == 0) {
            rc = cfg_key_file(ctx, key, v, c->api_key_file);
        } else if (strcmp(key, "admin_api_key_file") == 0) {
            rc = cfg_key_file(ctx, key, v, c->admin_api_key_file);
        } else {
            rc = cfg_err(ctx, MOE_EINVAL, cfg_line(k),
                         "unknown key '%s' in section 'server' (expected "
                         "api_key, api_key_file, admin_api_key or "
                         "admin_api_key_file)", key);
        }

        if (rc != MOE_OK) {
            return rc;
        }
    }

    return MOE_OK;
}


/* gpu_devices: [ints] of instance i */
static int
cfg_devices(cfg_ctx_t *ctx, int i, const yaml_node_t *v)
{
    moe_instance_conf_t  *in = &ctx->c->instances[i];
    yaml_node_item_t     *it;
    yaml_node_t          *d;
    long long             x;
    char                  show[MOE_CFG_SHOW + 16];
    int                   j;

    if (v->type != YAML_SEQUENCE_NODE) {
        return cfg_err(ctx, MOE_EINVAL, cfg_line(v),
                       "gpu_devices: expected a list of GPU numbers, got %s",
                       cfg_show(v, show, sizeof(show)));
    }

    in->n_gpu_devices = 0;

    for (it = v->data.sequence.items.start; it < v->data.sequence.items.top;
         it++)
    {
        d = yaml_document_get_node(ctx->doc, *it);

        if (cfg_parse_int(d, &x) != 0) {
            return cfg_err(ctx, MOE_EINVAL, cfg_line(d),
                           "gpu_devices: expected an integer, got %s",
                           cfg_show(d, show, sizeof(show)));
        }
        if (x < 0 || x >= MOE_MAX_GPUS) {
            return cfg_err(ctx, MOE_EINVAL, cfg_line(d),
                           "gpu_devices: GPU %lld out of range 0..%d", x,
                           MOE_MAX_GPUS - 1);
        }
        if (in->n_gpu_devices == MOE_MAX_GPUS) {
            return cfg_err(ctx, MOE_EINVAL, cfg_line(d),
                           "gpu_devices: more than %d GPUs", MOE_MAX_GPUS);
        }
        for (j = 0; j < in->n_gpu_devices; j++) {
            if (in->gpu_devices[j] == (int) x) {
                return cfg_err(ctx, MOE_EINVAL, cfg_line(d),
                               "gpu_devices: GPU %lld listed twice", x);
            }
        }

        ctx->dev_line[i][in->n_gpu_devices] = cfg_line(d);
        in->gpu_devices[in->n_gpu_devices++] = (int) x;
    }

    if (in->n_gpu_devices == 0) {
        return cfg_err(ctx, MOE_EINVAL, cfg_line(v),
                       "gpu_devices: empty list (leave it out to use GPUs "
                       "0..tensor_parallel_size-1)");
    }

    return MOE_OK;
}


/* vllm_instances: a list of {model_name, tensor_parallel_size,
 * gpu_devices} */
static int
cfg_instances(cfg_ctx_t *ctx, const yaml_node_t *sec)
{
    moe_instance_conf_t  *in;
    yaml_node_item_t     *it;
    yaml_node_pair_t     *p;
    yaml_node_t          *e, *k, *v, *dev_node, *tp_node;
    const char           *key;
    long long             x;
    char                  show[MOE_CFG_SHOW + 16];
    int                   i, j, a, b, rc;

    if (cfg_is_null(sec)) {
        return MOE_OK;
    }

    if (sec->type != YAML_SEQUENCE_NODE) {
        return cfg_err(ctx, MOE_EINVAL, cfg_line(sec),
                       "vllm_instances must be a list of instances");
    }

    for (it = sec->data.sequence.items.start;
         it < sec->data.sequence.items.top; it++)
    {
        e = yaml_document_get_node(ctx->doc, *it);
        i = ctx->c->n_instances;

        if (i == MOE_MAX_INSTANCES) {
            return cfg_err(ctx, MOE_EINVAL, cfg_line(e),
                           "vllm_instances: more than %d instances",
                           MOE_MAX_INSTANCES);
        }
        if (e->type != YAML_MAPPING_NODE) {
            return cfg_err(ctx, MOE_EINVAL, cfg_line(e),
                           "vllm_instances: each entry must be a mapping "
                           "(model_name, tensor_parallel_size, "
                           "gpu_devices)");
        }

        rc = cfg_check_keys(ctx, e, "a vllm_instances entry");
        if (rc != MOE_OK) {
            return rc;
        }

        in = &ctx->c->instances[i];
        memset(in, 0, sizeof(*in));
        in->tensor_parallel_size = 1;
        in->line = cfg_line(e);
        ctx->c->n_instances++;
        dev_node = NULL;
        tp_node = NULL;

        for (p = e->data.mapping.pairs.start; p < e->data.mapping.pairs.top;
             p++)
        {
            k = yaml_document_get_node(ctx->doc, p->key);
            v = yaml_document_get_node(ctx->doc, p->value);
            key = (const char *) k->data.scalar.value;

            if (strcmp(key, "model_name") == 0) {
                if (v->type != YAML_SCALAR_NODE || cfg_is_null(v)) {
                    return cfg_err(ctx, MOE_EINVAL, cfg_line(v),
                                   "model_name: expected a string, got %s",
                                   cfg_show(v, show, sizeof(show)));
                }
                if (cfg_copy(in->model_name, sizeof(in->model_name),
                             (const char *) v->data.scalar.value) != 0)
                {
                    return cfg_err(ctx, MOE_EINVAL, cfg_line(v),
                                   "model_name: too long (at most %zu "
                                   "bytes)", sizeof(in->model_name) - 1);
                }
                ctx->name_line[i] = cfg_line(v);

            } else if (strcmp(key, "tensor_parallel_size") == 0) {
                if (cfg_parse_int(v, &x) != 0) {
                    return cfg_err(ctx, MOE_EINVAL, cfg_line(v),
                                   "tensor_parallel_size: expected an "
                                   "integer, got %s",
                                   cfg_show(v, show, sizeof(show)));
                }
                if (x < 1 || x > MOE_MAX_GPUS) {
                    return cfg_err(ctx, MOE_EINVAL, cfg_line(v),
                                   "tensor_parallel_size must be in 1..%d, "
                                   "got %lld", MOE_MAX_GPUS, x);
                }
                in->tensor_parallel_size = (int) x;
                tp_node = v;

            } else if (strcmp(key, "gpu_devices") == 0) {
                rc = cfg_devices(ctx, i, v);
                if (rc != MOE_OK) {
                    return rc;
                }
                dev_node = v;

            } else {
                return cfg_err(ctx, MOE_EINVAL, cfg_line(k),
                               "unknown key '%s' in section "
                               "'vllm_instances'", key);
            }
        }

        if (in->model_name[0] == '\0') {
            return cfg_err(ctx, MOE_EINVAL, in->line,
                           "vllm_instances entry %d has no model_name",
                           i + 1);
        }

        if (dev_node != NULL) {
            if (tp_node == NULL) {
                in->tensor_parallel_size = in->n_gpu_devices;
            } else if (in->n_gpu_devices != in->tensor_parallel_size) {
                return cfg_err(ctx, MOE_EINVAL, cfg_line(dev_node),
                               "gpu_devices has %d entries but "
                               "tensor_parallel_size is %d",
                               in->n_gpu_devices, in->tensor_parallel_size);
            }
        }
    }

    /* no GPU may serve two instances */
    for (i = 1; i < ctx->c->n_instances; i++) {
        for (a = 0; a < ctx->c->instances[i].n_gpu_devices; a++) {
            for (j = 0; j < i; j++) {
                for (b = 0; b < ctx->c->instances[j].n_gpu_devices; b++) {
                    if (ctx->c->instances[i].gpu_devices[a]
                        == ctx->c->instances[j].gpu_devices[b])
                    {
                        return cfg_err(ctx, MOE_EINVAL, ctx->dev_line[i][a],
                                       "gpu_devices: GPU %d is already used "
                                       "by vllm_instances entry %d (line "
                                       "%d)",
                                       ctx->c->instances[i].gpu_devices[a],
                                       j + 1, ctx->dev_line[j][b]);
                    }
                }
            }
        }
    }

    return MOE_OK;
}


/* A directory holding config.json. */
static int
cfg_is_model_dir(const char *dir)
{
    struct stat  st;
    char         p[MOE_PATH_MAX + 16];

    if (stat(dir, &st) != 0 || !S_ISDIR(st.st_mode)) {
        return 0;
    }

    if ((size_t) snprintf(p, sizeof(p), "%s/config.json", dir) >= sizeof(p))
    {
        return 0;
    }

    return stat(p, &st) == 0 && S_ISREG(st.st_mode);
}


/* "org/name": relative, one '/', neither side empty nor a dot path. */
static int
cfg_is_hub_id(const char *name)
{
    const char  *slash = strchr(name, '/');

    return name[0] != '/' && name[0] != '.' && slash != NULL
           && slash != name && slash[1] != '\0'
           && strchr(slash + 1, '/') == NULL;
}


/*
 * Resolve model_name (written at `line`) into out (MOE_PATH_MAX bytes): see
 * moe_config_load() in moe.h for the search order.
 */
static int
cfg_resolve(cfg_ctx_t *ctx, const char *name, int line, char *out)
{
    char         dir[MOE_PATH_MAX], cand[9][MOE_PATH_MAX * 2 + 16];
    char         looked[1024], *real, *slash;
    int          n = 0, i;
    size_t       len;

    if (cfg_copy(dir, sizeof(dir), ctx->file) != 0) {
        return cfg_err(ctx, MOE_EINVAL, line, "file name too long");
    }
    slash = strrchr(dir, '/');
    if (slash == NULL) {
        strcpy(dir, ".");
    } else if (slash == dir) {
        dir[1] = '\0';
    } else {
        *slash = '\0';
    }

    if (name[0] == '/') {
        snprintf(cand[n++], sizeof(cand[0]), "%s", name);
    } else {
        snprintf(cand[n++], sizeof(cand[0]), "%s/%s", dir, name);
        snprintf(cand[n++], sizeof(cand[0]), "%s/../%s", dir, name);
        snprintf(cand[n++], sizeof(cand[0]), "./%s", name);
        if (cfg_is_hub_id(name)) {
            snprintf(cand[n++], sizeof(cand[0]), "%s/models/%s", dir, name);
            snprintf(cand[n++], sizeof(cand[0]), "%s/../models/%s", dir,
                     name);
            snprintf(cand[n++], sizeof(cand[0]), "./models/%s", name);
        }
    }

    for (i = 0; i < n; i++) {
        if (!cfg_is_model_dir(cand[i])) {
            continue;
        }

        real = realpath(cand[i], NULL);
        if (real == NULL) {
            continue;
        }
        if (cfg_copy(out, MOE_PATH_MAX, real) != 0) {
            free(real);
            return cfg_err(ctx, MOE_EINVAL, line,
                           "model path of '%s' too long", name);
        }
        free(real);
        return MOE_OK;
    }

    looked[0] = '\0';
    len = 0;
    for (i = 0; i < n && len < sizeof(looked); i++) {
        len += snprintf(looked + len, sizeof(looked) - len, "%s%s",
                        i ? ", " : "", cand[i]);
    }

    return cfg_err(ctx, MOE_EIO, line,
                   "model '%s' not found: no directory with config.json "
                   "(looked in %s)", name, looked);
}


/*
 * vllm.chat_template, as vLLM's --chat-template takes it: Jinja text when
 * it holds "{{" or "{%", else a file name relative to the YAML's directory
 * (then the current directory), which must be a readable file.
 */
static int
cfg_chat_template(cfg_ctx_t *ctx)
{
    moe_config_t  *c = ctx->c;
    char           dir[MOE_PATH_MAX], cand[MOE_PATH_MAX * 2 + 2];
    char          *slash, *real;
    struct stat    st;
    int            i, n;

    c->chat_template_file[0] = '\0';

    if (c->chat_template[0] == '\0') {
        if (ctx->template_line) {
            return cfg_err(ctx, MOE_EINVAL, ctx->template_line,
                           "chat_template is empty (give a Jinja template "
                           "or a file name)");
        }
        return MOE_OK;
    }

    if (strstr(c->chat_template, "{{") || strstr(c->chat_template, "{%")) {
        return MOE_OK;
    }

    if (cfg_copy(dir, sizeof(dir), ctx->file) != 0) {
        return cfg_err(ctx, MOE_EINVAL, ctx->template_line,
                       "file name too long");
    }
    slash = strrchr(dir, '/');
    if (slash == NULL) {
        strcpy(dir, ".");
    } else if (slash == dir) {
        dir[1] = '\0';
    } else {
        *slash = '\0';
    }

    if (strlen(c->chat_template) >= MOE_PATH_MAX) {
        return cfg_err(ctx, MOE_EINVAL, ctx->template_line,
                       "chat_template is neither a Jinja template (no "
                       "\"{{\" or \"{%%\") nor a file name (too long)");
    }

    n = (c->chat_template[0] == '/') ? 1 : 2;

    for (i = 0; i < n; i++) {
        if (c->chat_template[0] == '/' || i == 1) {
            snprintf(cand, sizeof(cand), "%.1023s", c->chat_template);
        } else {
            snprintf(cand, sizeof(cand), "%s/%.1023s", dir,
                     c->chat_template);
        }

        if (stat(cand, &st) != 0 || !S_ISREG(st.st_mode)) {
            continue;
        }

        if (access(cand, R_OK) != 0) {
            return cfg_err(ctx, MOE_EIO, ctx->template_line,
                           "chat_template file '%s' is not readable: %s",
                           cand, strerror(errno));
        }

        real = realpath(cand, NULL);
        if (real == NULL || cfg_copy(c->chat_template_file,
                                     sizeof(c->chat_template_file), real)
                            != 0)
        {
            free(real);
            return cfg_err(ctx, MOE_EINVAL, ctx->template_line,
                           "chat_template file name too long");
        }
        free(real);
        return MOE_OK;
    }

    return cfg_err(ctx, MOE_EIO, ctx->template_line,
                   "chat_template '%s' is neither a Jinja template (no "
                   "\"{{\" or \"{%%\") nor a file (looked in %s and the "
                   "current directory)", c->chat_template, dir);
}


void
moe_config_defaults(moe_config_t *c)
{
    memset(c, 0, sizeof(*c));

    c->num_experts = -1;
    c->top_k_experts = -1;
    c->hidden_size = -1;
    c->intermediate_size = -1;
    c->max_sequence_length = -1;
    c->enable_compilation = 1;

    c->tensor_parallel_size = 1;
    c->gpu_memory_utilization = 0.9;
    c->max_model_len = 0;
    c->block_size = 16;
    c->swap_space = 4;
    c->max_num_batched_tokens = 8192;
    c->max_num_seqs = 256;
    c->enable_prefix_caching = 1;
    c->enable_chunked_prefill = 1;
    c->use_v2_block_manager = 0;
    c->max_chunked_prefill_tokens = 0;
    c->prefill_step_ratio = 5.0;
    c->trust_remote_code = 0;
    strcpy(c->load_format, "auto");
    strcpy(c->kv_cache_dtype, "auto");
    /* 0: unset, the checkpoint's per-layer scales, else 1.0 */
    c->kv_cache_scale_k = 0.0;
    c->kv_cache_scale_v = 0.0;

    /* tool calling */
    strcpy(c->tool_call_parser, "auto");
    c->enable_auto_tool_choice = 1;

    strcpy(c->backend, "auto");
    strcpy(c->nccl, "auto");
    c->expert_parallel = 0;
    c->cpu_threads = 0;
    c->kv_cache_blocks = 0;
    c->ring_size = 4096;
}


/* The tree walk once the document is loaded. */
static int
cfg_document(cfg_ctx_t *ctx)
{
    moe_config_t      *c = ctx->c;
    yaml_node_t       *root, *k, *v;
    yaml_node_pair_t  *p;
    const char        *name;
    int                rc, i;

    root = yaml_document_get_root_node(ctx->doc);

    if (root != NULL && !cfg_is_null(root)) {
        if (root->type != YAML_MAPPING_NODE) {
            return cfg_err(ctx, MOE_EINVAL, cfg_line(root),
                           "the top level must be a mapping of sections "
                           "(model, vllm, vllm_instances, engine)");
        }

        rc = cfg_check_keys(ctx, root, "the top level");
        if (rc != MOE_OK) {
            return rc;
        }

        for (p = root->data.mapping.pairs.start;
             p < root->data.mapping.pairs.top; p++)
        {
            k = yaml_document_get_node(ctx->doc, p->key);
            v = yaml_document_get_node(ctx->doc, p->value);
            name = (const char *) k->data.scalar.value;

            if (strcmp(name, "model") == 0) {
                rc = cfg_section(ctx, name, v, cfg_model_keys);
            } else if (strcmp(name, "vllm") == 0) {
                rc = cfg_section(ctx, name, v, cfg_vllm_keys);
            } else if (strcmp(name, "engine") == 0) {
                rc = cfg_section(ctx, name, v, cfg_engine_keys);
            } else if (strcmp(name, "vllm_instances") == 0) {
                rc = cfg_instances(ctx, v);
            } else if (strcmp(name, "server") == 0) {
                rc = cfg_server(ctx, v);
            } else {
                rc = cfg_err(ctx, MOE_EINVAL, cfg_line(k),
                             "unknown section '%s' (expected model, vllm, "
                             "vllm_instances, engine or server)", name);
            }

            if (rc != MOE_OK) {
                return rc;
            }
        }
    }

    /* cross-field checks */

    if (c->top_k_experts > 0 && c->num_experts > 0
        && c->top_k_experts > c->num_experts)
    {
        return cfg_err(ctx, MOE_EINVAL, ctx->top_k_line,
                       "top_k_experts (%d) is larger than num_experts (%d)",
                       c->top_k_experts, c->num_experts);
    }

    if (c->model_name[0] == '\0') {
        if (c->n_instances == 0) {
            return cfg_err(ctx, MOE_EINVAL, root ? cfg_line(root) : 1,
                           "no model: set vllm.model_name");
        }

        /* only vllm_instances: the first one is the default model */
        memcpy(c->model_name, c->instances[0].model_name,
               sizeof(c->model_name));
        ctx->model_name_line = ctx->name_line[0];
        if (ctx->tp_line == 0) {
            c->tensor_parallel_size = c->instances[0].tensor_parallel_size;
        }
    }

    /* expert parallelism: whole experts on each rank */
    if (c->expert_parallel && c->num_experts > 0
        && c->num_experts % c->tensor_parallel_size != 0)
    {
        return cfg_err(ctx, MOE_EINVAL, ctx->tp_line > 0 ? ctx->tp_line : 1,
                       "expert_parallel: tensor_parallel_size %d does not "
                       "divide num_experts %d (each rank holds num_experts "
                       "/ tensor_parallel_size whole experts)",
                       c->tensor_parallel_size, c->num_experts);
    }

    /* admission: room for a few scheduler batches of waiting requests */

    if (c->max_waiting_requests == 0) {
        c->max_waiting_requests = c->max_num_seqs > INT_MAX / 4
                                  ? INT_MAX : 4 * c->max_num_seqs;
    }

    rc = cfg_chat_template(ctx);
    if (rc != MOE_OK) {
        return rc;
    }

    /* model paths */

    c->model_line = ctx->model_name_line;

    rc = cfg_resolve(ctx, c->model_name, ctx->model_name_line,
                     c->model_path);
    if (rc != MOE_OK) {
        return rc;
    }

    for (i = 0; i < c->n_instances; i++) {
        rc = cfg_resolve(ctx, c->instances[i].model_name, ctx->name_line[i],
                         c->instances[i].model_path);
        if (rc != MOE_OK) {
            return rc;
        }
    }

    if (c->served_model_name[0] == '\0') {
        /* bounded: model_name may be longer than a served name */
        for (i = 0; i < MOE_NAME_MAX - 1 && c->model_name[i] != '\0'; i++) {
            c->served_model_name[i] = c->model_name[i];
        }
        c->served_model_name[i] = '\0';
    }

    return MOE_OK;
}


int
moe_config_load(const char *path, moe_config_t *c, char *err, size_t errlen)
{
    cfg_ctx_t        ctx;
    yaml_parser_t    parser;
    yaml_document_t  doc, extra;
    struct stat      st;
    FILE            *f;
    int              rc, line;

    if (err != NULL && errlen > 0) {
        err[0] = '\0';
    }

    if (path == NULL || c == NULL) {
        if (err != NULL && errlen > 0) {
            snprintf(err, errlen, "moe_config_load: no file or config");
        }
        return MOE_EINVAL;
    }

    moe_config_defaults(c);

    memset(&ctx, 0, sizeof(ctx));
    ctx.file = path;
    ctx.err = err;
    ctx.errlen = errlen;
    ctx.c = c;

    if (cfg_copy(c->file, sizeof(c->file), path) != 0) {
        return cfg_err(&ctx, MOE_EINVAL, 0, "file name too long");
    }

    f = fopen(path, "rb");
    if (f == NULL) {
        return cfg_err(&ctx, MOE_EIO, 0, "cannot open: %s", strerror(errno));
    }

    if (fstat(fileno(f), &st) != 0 || !S_ISREG(st.st_mode)) {
        fclose(f);
        return cfg_err(&ctx, MOE_EIO, 0, "not a regular file");
    }

    if (!yaml_parser_initialize(&parser)) {
        fclose(f);
        return cfg_err(&ctx, MOE_ENOMEM, 0, "cannot initialize libyaml");
    }

    yaml_parser_set_input_file(&parser, f);

    if (!yaml_parser_load(&parser, &doc)) {
        if (parser.error == YAML_MEMORY_ERROR) {
            rc = cfg_err(&ctx, MOE_ENOMEM, 0, "out of memory reading YAML");
        } else if (parser.error == YAML_READER_ERROR) {
            rc = cfg_err(&ctx, MOE_EFORMAT, 0,
                         "YAML error: %s at byte %zu",
                         parser.problem ? parser.problem : "unreadable",
                         parser.problem_offset);
        } else {
            line = (int) parser.problem_mark.line + 1;
            if (parser.context != NULL) {
                rc = cfg_err(&ctx, MOE_EFORMAT, line,
                             "YAML syntax error: %s (%s at line %d)",
                             parser.problem ? parser.problem : "?",
                             parser.context,
                             (int) parser.context_mark.line + 1);
            } else {
                rc = cfg_err(&ctx, MOE_EFORMAT, line,
                             "YAML syntax error: %s",
                             parser.problem ? parser.problem : "?");
            }
        }
        yaml_parser_delete(&parser);
        fclose(f);
        return rc;
    }

    ctx.doc = &doc;
    rc = cfg_document(&ctx);

    /* a second document (after ---) would be silently ignored: refuse */
    if (rc == MOE_OK) {
        if (!yaml_parser_load(&parser, &extra)) {
            rc = cfg_err(&ctx, MOE_EFORMAT,
                         (int) parser.problem_mark.line + 1,
                         "YAML syntax error: %s",
                         parser.problem ? parser.problem : "?");
        } else {
            if (yaml_document_get_root_node(&extra) != NULL) {
                rc = cfg_err(&ctx, MOE_EINVAL,
                             (int) extra.start_mark.line + 1,
                             "more than one YAML document in the file");
            }
            yaml_document_delete(&extra);
        }
    }

    yaml_document_delete(&doc);
    yaml_parser_delete(&parser);
    fclose(f);

    return rc;
}
