/*
 * libFuzzer harness: quantized tensor lookup and dequantization
 * (engine/model/quant.c moe_qtensor_find / moe_qtensor_dequant) on a tiny
 * safetensors file and quantization_config that the input describes.
 *
 * Input bytes (a small program; missing bytes read as 0):
 *   0  method: fp8, compressed-tensors fp8, awq, gptq, compressed-tensors
 *      pack-quantized int4 (mod 5)
 *   1  flags: 1 fmt e5m2, 2 static activations, 4 fp8 weight_block_size,
 *      8/16 compressed-tensors strategy (tensor, channel, block, none),
 *      32 desc_act (int4: actorder group), 64 sym, 128 checkpoint_format
 *      gptq_v2
 *   2  group_size (-1, 32, 64, 128; mod 4); bit 4: the module is in the
 *      ignore list; bit 5: N and K are rounded up to a multiple of 8
 *   3, 4  block_n, block_k (1 + byte % 64)
 *   5, 6  N, K (0..255)
 *   then one descriptor per tensor of <m>: weight, weight_scale,
 *   weight_scale_inv, input_scale, qweight, qzeros, scales, g_idx,
 *   weight_packed, weight_zero_point, weight_g_idx, weight_shape:
 *      d & 3 == 0  absent
 *              1  the shape and dtype the layout expects
 *              2  the expected shape, dtype 1 + (d >> 2) % 8
 *              3  n_dims (d >> 2) % 5, dtype 1 + (d >> 5), then n_dims
 *                 bytes of dims
 *   the rest: tensor contents, repeated as needed (fp8 codes, packed
 *   nibbles, scales, g_idx values).
 * The file is written as model.safetensors (the reader must accept it:
 * the harness writes valid files) and the quantization_config as JSON
 * text (moe_qconfig_parse must accept it).  moe_qtensor_find() must then
 * return 1 with the logical shape (N, K) and a layout that
 * moe_qtensor_dequant() converts without reading outside the tensors
 * (ASan sees the mapped file only as a whole: the harness copies each
 * tensor into its own heap block first, see below), 0, or an error with a
 * message naming the file or the directory.  A compressed-tensors int4
 * tensor found must also convert to GPTQ's layout
 * (moe_qtensor_ct4_to_gptq) and dequantize there to the same values.
 */

#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "fuzz_files.h"
#include "model/quant.h"
#include "model/safetensors.h"
#include "util/json.h"

#define BASE      "model.layers.0.mlp.down_proj"
#define MAX_DATA  (256 * 1024)

enum { T_W, T_S, T_SI, T_IN, T_QW, T_QZ, T_SC, T_GI, T_WP, T_WZ, T_WG,
       T_WSH, T_N };

static const char *const  suffix[T_N] = {
    "weight", "weight_scale", "weight_scale_inv", "input_scale", "qweight",
    "qzeros", "scales", "g_idx", "weight_packed", "weight_zero_point",
    "weight_g_idx", "weight_shape"
};

typedef struct {
    const uint8_t  *p;
    size_t          n, i;
} rd_t;

typedef struct {
    int       present;
    int       dtype;
    int       n_dims;
    int64_t   shape[4];
} tdesc_t;


static unsigned
rd(rd_t *r)
{
    return r->i < r->n ? r->p[r->i++] : 0;
}


static int64_t
cdiv(int64_t a, int64_t b)
{
    return (a + b - 1) / b;
}


/* The expected shape and dtype of tensor k. */
static void
natural(int k, int method, int e5m2, int strategy, int64_t N, int64_t K,
    int64_t G, int bn, int bk, tdesc_t *t)
{
    int64_t  ng = G > 0 ? cdiv(K, G) : 1;
    int      awq = method == 2;

    t->dtype = MOE_DT_F32;
    t->n_dims = 2;
    if (method == 4 && k == T_S) {
        t->dtype = MOE_DT_BF16;
        t->shape[0] = N;
        t->shape[1] = ng;
        return;
    }
    switch (k) {
    case T_W:
        t->dtype = e5m2 ? MOE_DT_F8_E5M2 : MOE_DT_F8_E4M3;
        t->shape[0] = N;
        t->shape[1] = K;
        break;
    case T_S:
    case T_SI:
        if (strategy == MOE_QL_FP8_BLOCK) {
            t->shape[0] = cdiv(N, bn);
            t->shape[1] = cdiv(K, bk);
        } else if (strategy == MOE_QL_FP8_CHANNEL) {
            t->shape[0] = N;
            t->shape[1] = 1;
        } else {
            t->n_dims = 0;
        }
        break;
    case T_IN:
        t->n_dims = 0;
        break;
    case T_QW:
        t->dtype = MOE_DT_I32;
        t->shape[0] = awq ? K : K / 8;
        t->shape[1] = awq ? N / 8 : N;
        break;
    case T_QZ:
        t->dtype = MOE_DT_I32;
        t->shape[0] = ng;
        t->shape[1] = N / 8;
        break;
    case T_SC:
        t->dtype = MOE_DT_F16;
        t->shape[0] = ng;
        t->shape[1] = N;
        break;
    case T_GI:
    case T_WG:
        t->dtype = MOE_DT_I32;
        t->n_dims = 1;
        t->shape[0] = K;
        break;
    case T_WP:
        t->dtype = MOE_DT_I32;
        t->shape[0] = N;
        t->shape[1] = K / 8;
        break;
    case T_WZ:
        t->dtype = MOE_DT_I32;
        t->shape[0] = N / 8;
        t->shape[1] = ng;
        break;
    case T_WSH:
        t->dtype = MOE_DT_I64;
        t->n_dims = 1;
        t->shape[0] = 2;
        break;
    }
}


/*
 * A heap copy of the tensor of st whose data is p (exactly its nbytes, so
 * ASan sees a read past it), or NULL for NULL; the copy goes to *keep.
 * An empty tensor written just before another shares its data pointer:
 * the largest tensor at p is the one.
 */
static const void *
heap_copy(const moe_st_set_t *st, const void *p, void **keep)
{
    const moe_st_tensor_t  *t, *best = NULL;
    size_t                  i;

    *keep = NULL;
    if (p == NULL) {
        return NULL;
    }
    for (i = 0; i < moe_st_count(st); i++) {
        t = moe_st_at(st, i);
        if (t->data == p && (best == NULL || t->nbytes > best->nbytes)) {
            best = t;
        }
    }
    FF_CHECK(best != NULL, "pointer outside every tensor");
    *keep = malloc(best->nbytes ? best->nbytes : 1);
    FF_CHECK(*keep != NULL, "malloc");
    memcpy(*keep, p, best->nbytes);
    return *keep;
}


static int64_t
numel(const tdesc_t *t)
{
    int64_t  n = 1;
    int      i;

    for (i = 0; i < t->n_dims; i++) {
        n *= t->shape[i];
    }
    return n;
}


int
LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    static const int  groups[4] = { -1, 32, 64, 128 };
    static const char *const  strat[4] = { "tensor", "channel", "block",
                                           NULL };
    rd_t              r = { data, size, 0 };
    tdesc_t           td[T_N];
    unsigned          method, flags, gsel, d;
    int               bn, bk, group, strategy, k, i, rc;
    int64_t           N, K, G, off, nb, total;
    char              path[128], hdr[4096], conf[2048], err[512], *hp;
    unsigned char    *file, *dp;
    size_t            hl, plen, pool;
    const uint8_t    *pp;
    moe_st_set_t     *st;
    struct yajl_val_s *root;
    moe_qconfig_t     q;
    moe_qtensor_t     qt;
    float            *w;
    void             *keep[4];

    method = rd(&r) % 5;
    flags = rd(&r);
    gsel = rd(&r);
    bn = 1 + (int) (rd(&r) % 64);
    bk = 1 + (int) (rd(&r) % 64);
    N = rd(&r);
    K = rd(&r);
    if (gsel & 32) {
        N = (N + 7) / 8 * 8;
        K = (K + 7) / 8 * 8;
    }
    group = groups[gsel % 4];
    G = group > 0 ? group : K;
    strategy = 0;
    if (method == 0) {
        strategy = (flags & 4) ? MOE_QL_FP8_BLOCK : 0;
    } else if (method == 1) {
        strategy = ((flags >> 3) & 3) == 0 ? MOE_QL_FP8_TENSOR
                   : ((flags >> 3) & 3) == 1 ? MOE_QL_FP8_CHANNEL
                   : ((flags >> 3) & 3) == 2 ? MOE_QL_FP8_BLOCK : 0;
    }

    for (k = 0; k < T_N; k++) {
        memset(&td[k], 0, sizeof(td[k]));
        d = rd(&r);
        if ((d & 3) == 0) {
            continue;
        }
        td[k].present = 1;
        natural(k, (int) method, flags & 1, strategy, N, K, G, bn, bk,
                &td[k]);
        if ((d & 3) == 2) {
            td[k].dtype = 1 + (int) ((d >> 2) % 9);
        } else if ((d & 3) == 3) {
            td[k].n_dims = (int) ((d >> 2) % 5);
            td[k].dtype = 1 + (int) ((d >> 5) % 9);
            for (i = 0; i < td[k].n_dims; i++) {
                td[k].shape[i] = rd(&r);
            }
        }
    }
    pp = r.p + r.i;
    pool = r.n - r.i;

    /* the header, then the data of each tensor, filled from the pool */
    hp = hdr;
    hl = 0;
    total = 0;
    hl += (size_t) snprintf(hdr + hl, sizeof(hdr) - hl, "{");
    for (k = 0; k < T_N; k++) {
        if (!td[k].present) {
            continue;
        }
        nb = numel(&td[k]) * (int64_t) moe_dtype_size(td[k].dtype);
        if (nb > MAX_DATA || total + nb > MAX_DATA) {
            return 0;
        }
        hl += (size_t) snprintf(hdr + hl, sizeof(hdr) - hl,
                                "%s\"" BASE ".%s\":{\"dtype\":\"%s\","
                                "\"shape\":[", hl > 1 ? "," : "", suffix[k],
                                moe_dtype_name(td[k].dtype));
        for (i = 0; i < td[k].n_dims; i++) {
            hl += (size_t) snprintf(hdr + hl, sizeof(hdr) - hl, "%s%lld",
                                    i ? "," : "",
                                    (long long) td[k].shape[i]);
        }
        hl += (size_t) snprintf(hdr + hl, sizeof(hdr) - hl,
                                "],\"data_offsets\":[%lld,%lld]}",
                                (long long) total, (long long) (total + nb));
        total += nb;
    }
    hl += (size_t) snprintf(hdr + hl, sizeof(hdr) - hl, "}");
    FF_CHECK(hl < sizeof(hdr), "header too long");
    (void) hp;

    plen = 8 + hl + (size_t) total;
    file = malloc(plen);
    FF_CHECK(file != NULL, "malloc");
    for (i = 0; i < 8; i++) {
        file[i] = (unsigned char) ((uint64_t) hl >> (8 * i));
    }
    memcpy(file + 8, hdr, hl);
    dp = file + 8 + hl;
    for (off = 0; off < total; off++) {
        dp[off] = pool ? pp[off % (int64_t) pool] : 0;
    }
    ff_path(path, sizeof(path), "model.safetensors");
    ff_write(path, file, plen);
    free(file);

    err[0] = '\0';
    rc = moe_st_open_file(path, &st, err, sizeof(err));
    FF_CHECK(rc == MOE_OK, "harness file refused: %s", err);

    /* the quantization_config */
    i = 0;
    if (method == 0) {
        i = snprintf(conf, sizeof(conf), "{\"quantization_config\":{"
                     "\"quant_method\":\"fp8\",\"fmt\":\"%s\","
                     "\"activation_scheme\":\"%s\"",
                     (flags & 1) ? "e5m2" : "e4m3",
                     (flags & 2) ? "static" : "dynamic");
        if (flags & 4) {
            i += snprintf(conf + i, sizeof(conf) - i,
                          ",\"weight_block_size\":[%d,%d]", bn, bk);
        }
        if (gsel & 16) {
            i += snprintf(conf + i, sizeof(conf) - i,
                          ",\"ignored_layers\":[\"layers.0.mlp\"]");
        }
    } else if (method == 1) {
        const char *s = strat[(flags >> 3) & 3];

        i = snprintf(conf, sizeof(conf), "{\"quantization_config\":{"
                     "\"quant_method\":\"compressed-tensors\","
                     "\"format\":\"float-quantized\",\"config_groups\":{"
                     "\"group_0\":{\"weights\":{\"num_bits\":8,"
                     "\"type\":\"float\"");
        if (s != NULL) {
            i += snprintf(conf + i, sizeof(conf) - i,
                          ",\"strategy\":\"%s\"", s);
        }
        if (s != NULL && strcmp(s, "block") == 0) {
            i += snprintf(conf + i, sizeof(conf) - i,
                          ",\"block_structure\":[%d,%d]", bn, bk);
        }
        i += snprintf(conf + i, sizeof(conf) - i, "},\"input_activations\":"
                      "{\"dynamic\":%s}}}", (flags & 2) ? "false" : "true");
        if (gsel & 16) {
            i += snprintf(conf + i, sizeof(conf) - i,
                          ",\"ignore\":[\"re:.*mlp\\\\.down_proj$\"]");
        }
    } else if (method == 4) {
        i = snprintf(conf, sizeof(conf), "{\"quantization_config\":{"
                     "\"quant_method\":\"compressed-tensors\","
                     "\"format\":\"pack-quantized\",\"config_groups\":{"
                     "\"group_0\":{\"weights\":{\"num_bits\":4,"
                     "\"type\":\"int\",\"symmetric\":%s,\"actorder\":%s,",
                     (flags & 64) ? "true" : "false",
                     (flags & 32) ? "\"group\"" : "null");
        if (group > 0) {
            i += snprintf(conf + i, sizeof(conf) - i, "\"strategy\":"
                          "\"group\",\"group_size\":%d}}}", group);
        } else {
            i += snprintf(conf + i, sizeof(conf) - i, "\"strategy\":"
                          "\"channel\"}}}");
        }
        if (gsel & 16) {
            i += snprintf(conf + i, sizeof(conf) - i,
                          ",\"ignore\":[\"re:.*mlp\\\\.down_proj$\"]");
        }
    } else {
        i = snprintf(conf, sizeof(conf), "{\"quantization_config\":{"
                     "\"quant_method\":\"%s\",\"bits\":4,"
                     "\"group_size\":%d", method == 2 ? "awq" : "gptq",
                     group);
        if (method == 2) {
            i += snprintf(conf + i, sizeof(conf) - i,
                          ",\"version\":\"gemm\",\"zero_point\":true");
        } else {
            i += snprintf(conf + i, sizeof(conf) - i,
                          ",\"desc_act\":%s,\"sym\":%s,"
                          "\"checkpoint_format\":\"%s\"",
                          (flags & 32) ? "true" : "false",
                          (flags & 64) ? "true" : "false",
                          (flags & 128) ? "gptq_v2" : "gptq");
        }
        if (gsel & 16) {
            i += snprintf(conf + i, sizeof(conf) - i,
                          ",\"modules_to_not_convert\":[\"down_proj\"]");
        }
    }
    i += snprintf(conf + i, sizeof(conf) - i, "}}");
    FF_CHECK((size_t) i < sizeof(conf), "config too long");
    rc = moe_json_parse_object(conf, "config.json", "", &root, err,
                               sizeof(err));
    FF_CHECK(rc == MOE_OK, "harness config refused: %s", err);
    rc = moe_qconfig_parse(root, "config.json", &q, err, sizeof(err));
    yajl_tree_free(root);
    FF_CHECK(rc == MOE_OK, "harness quantization_config refused: %s (%s)",
             err, conf);

    err[0] = '\0';
    rc = moe_qtensor_find(st, &q, ff_dir(), BASE, N, K, &qt, err,
                          sizeof(err));
    if (rc < 0) {
        FF_CHECK(strstr(err, ff_dir()) != NULL, "no file or directory "
                 "named: %s", err);
    } else if (rc == 1) {
        FF_CHECK(qt.rows == N && qt.cols == K, "shape %lld x %lld",
                 (long long) qt.rows, (long long) qt.cols);
        qt.qweight = heap_copy(st, qt.qweight, &keep[0]);
        qt.scales = heap_copy(st, qt.scales, &keep[1]);
        qt.zeros = heap_copy(st, qt.zeros, &keep[2]);
        qt.g_idx = heap_copy(st, qt.g_idx, &keep[3]);
        w = malloc((size_t) (N * K + 1) * sizeof(float));
        FF_CHECK(w != NULL, "malloc");
        rc = moe_qtensor_dequant(&qt, w);
        FF_CHECK(rc == MOE_OK, "dequant of a found tensor failed");
        if (qt.layout == MOE_QL_CT4) {
            moe_qtensor_t  gq;
            void          *mem;
            float         *w2 = malloc((size_t) (N * K + 1) * sizeof(float));
            int64_t        e;

            FF_CHECK(w2 != NULL, "malloc");
            rc = moe_qtensor_ct4_to_gptq(&qt, &gq, &mem);
            FF_CHECK(rc == MOE_OK && gq.layout == MOE_QL_GPTQ,
                     "ct4 -> gptq failed");
            FF_CHECK(moe_qtensor_dequant(&gq, w2) == MOE_OK,
                     "dequant of the GPTQ form failed");
            for (e = 0; e < N * K; e++) {
                FF_CHECK(w[e] == w2[e] || (isnan(w[e]) && isnan(w2[e])),
                         "GPTQ form differs at %lld: %g vs %g",
                         (long long) e, w[e], w2[e]);
            }
            free(mem);
            free(w2);
        }
        free(w);
        for (i = 0; i < 4; i++) {
            free(keep[i]);
        }
    }
    moe_st_close(st);
    return 0;
}
