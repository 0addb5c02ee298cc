/*
 * quantize: write a quantized copy of a float Hugging Face model directory
 * in one of the layouts libmoe loads (engine/model/quant.h), and optionally
 * its "dequantized reference": the same weights dequantized, plain F32
 * safetensors, no quantization_config.  Built by `make` (build/quantize);
 * t/quant.t makes its test models with it.
 *
 *   build/quantize --in DIR --out DIR --format F [options] [--ref DIR]
 *
 *   F: fp8-tensor    quant_method fp8, per-tensor weight_scale (F32 [])
 *      fp8-block     quant_method fp8, weight_block_size --block BN,BK
 *                    (default 128,128), weight_scale_inv
 *      ct-fp8        compressed-tensors float-quantized, per-channel
 *                    weight_scale (BF16 [N, 1]); ct-fp8-tensor (F32 []),
 *                    ct-fp8-block (--block, F32 blocks)
 *      awq           AWQ gemm, 4 bit, --group G (32/64/128), zero points
 *      gptq          GPTQ v1, 4 bit, --group G, --sym, --desc-act (a
 *                    permuted g_idx), --g-idx (g_idx k / G written)
 *      ct-int4       compressed-tensors pack-quantized int4 (W4A16),
 *                    --group G (-1: strategy channel), --sym, --desc-act
 *                    (actorder group: weight_g_idx), BF16 weight_scale,
 *                    I64 weight_shape
 *   --static         fp8: activation_scheme static, input_scale written
 *   --ignore S       keep modules whose name contains S in float and list
 *                    S in modules_to_not_convert (ct-fp8: ignore, exact
 *                    name "re:.*S.*")
 *   --kv-scales K,V[,N]  per-layer fp8 KV cache scales, K * (1 + 0.3 l)
 *                    and V * (1 + 0.3 l) for layer l (F32 scalars; their
 *                    ratios are not powers of two, so the e4m3 grids of
 *                    two layers differ and a test can tell which scale a
 *                    layer used),
 *                    named as N says: attn (default: self_attn.k_scale /
 *                    v_scale), output (self_attn.k_proj.output_scale /
 *                    v_proj.output_scale), kv (self_attn.kv_scale, K's)
 *   --corrupt C      a malformed copy for the refusal tests:
 *                    drop-scale (no scale tensor of the first quantized
 *                    module), gidx-range (g_idx[0] = groups), scale-shape
 *                    (the first scales tensor one row short), wshape
 *                    (ct-int4: the first weight_shape 8 rows too many),
 *                    kv-missing (layer 1 without its V scale), kv-perhead
 *                    (layer 0's K scale two values), kv-neg (layer 0's
 *                    K scale negative)
 *
 * Quantized: 2-D tensors named *_proj.weight or experts.E.w{1,2,3}.weight
 * (the dense projections and the experts); everything else is copied.
 * Quantization is round to nearest with the scales rounded to their stored
 * dtype first, so the reference is exactly what a loader dequantizes.
 */

#include <errno.h>
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#include "model/quant.h"
#include "model/safetensors.h"

#define MAX_OUT  4096

typedef struct {
    char     name[400];
    int      dtype;           /* moe_dtype_t */
    int      n_dims;
    int64_t  shape[4];
    void    *data;
    size_t   nbytes;
} out_t;

typedef struct {
    out_t    t[MAX_OUT];
    int      n;
} outset_t;

static const char *fmt;
static int         group = 128, sym, desc_act, write_gidx, static_act;
static int         bn = 128, bk = 128;
static const char *ignore_s;
static const char *corrupt;
static int         corrupted;
static double      kv_k, kv_v;          /* --kv-scales; 0: none */
static char        kv_naming[16] = "attn";


static void
die(const char *what)
{
    fprintf(stderr, "quantize: %s\n", what);
    exit(1);
}


static void *
xmalloc(size_t n)
{
    void *p = calloc(1, n ? n : 1);

    if (p == NULL) {
        die("out of memory");
    }
    return p;
}


static out_t *
add(outset_t *o, const char *name, int dtype, int nd, int64_t d0,
    int64_t d1)
{
    out_t  *t;
    int64_t n;

    if (o->n == MAX_OUT) {
        die("too many tensors");
    }
    t = &o->t[o->n++];
    snprintf(t->name, sizeof(t->name), "%s", name);
    t->dtype = dtype;
    t->n_dims = nd;
    t->shape[0] = d0;
    t->shape[1] = d1;
    n = nd == 0 ? 1 : nd == 1 ? d0 : d0 * d1;
    t->nbytes = (size_t) n * moe_dtype_size((moe_dtype_t) dtype);
    t->data = xmalloc(t->nbytes);
    return t;
}


static uint16_t
f32_to_bf16(float f)
{
    uint32_t u;

    memcpy(&u, &f, sizeof(u));
    u += 0x7fff + ((u >> 16) & 1);
    return (uint16_t) (u >> 16);
}


static uint16_t
f32_to_f16(float f)
{
    _Float16 h = (_Float16) f;
    uint16_t u;

    memcpy(&u, &h, sizeof(u));
    return u;
}


static int
is_linear(const moe_st_tensor_t *t)
{
    size_t      n = strlen(t->name);
    const char *e = ".weight";

    if (t->n_dims != 2 || n < 8 || strcmp(t->name + n - 7, e) != 0) {
        return 0;
    }
    return (n > 12 && strcmp(t->name + n - 12, "_proj.weight") == 0)
           || (strstr(t->name, ".experts.") != NULL
               && (strcmp(t->name + n - 10, ".w1.weight") == 0
                   || strcmp(t->name + n - 10, ".w2.weight") == 0
                   || strcmp(t->name + n - 10, ".w3.weight") == 0));
}


static void
put_f32(out_t *t, int64_t i, float v)
{
    memcpy((char *) t->data + 4 * i, &v, 4);
}


/* fp8 codes of w / s into q */
static void
fp8_codes(const float *w, int64_t n, float s, uint8_t *q)
{
    int64_t i;

    for (i = 0; i < n; i++) {
        q[i] = moe_f32_to_fp8_e4m3(w[i] / s);
    }
}


static float
amax(const float *w, int64_t n)
{
    float   a = 0.0f;
    int64_t i;

    for (i = 0; i < n; i++) {
        a = fmaxf(a, fabsf(w[i]));
    }
    return a;
}


/* --corrupt gidx-range: g_idx[0] = groups, one past the last */
static void
corrupt_gidx(out_t *gi, int64_t ng)
{
    int32_t bad = (int32_t) ng;

    if (strcmp(corrupt, "gidx-range") == 0) {
        memcpy(gi->data, &bad, 4);
        corrupted = 1;
    }
}


/* a 4-bit scale as stored: F16, or BF16 (compressed-tensors) */
static float
scale_round(float sc, int bf16)
{
    return bf16 ? moe_bf16_to_f32(f32_to_bf16(sc))
                : moe_f16_to_f32(f32_to_f16(sc));
}


/* quantize one (N, K) weight `w` of module base into o; deq (N, K): the
 * values the codes and scales stand for, computed here from them */
static void
quantize(outset_t *o, const char *base, const float *w, int64_t N,
    int64_t K, float *deq)
{
    char     nm[320];
    out_t   *q, *s, *z, *gi;
    uint8_t *codes, *zc;
    int64_t  n, k, g, ng, G, r, c, i;
    int32_t *gidx;
    float    sc, lo, hi, x;
    int      first = !corrupted && corrupt != NULL, ct;

    if (strncmp(fmt, "fp8", 3) == 0 || strncmp(fmt, "ct-fp8", 6) == 0) {
        snprintf(nm, sizeof(nm), "%s.weight", base);
        q = add(o, nm, MOE_DT_F8_E4M3, 2, N, K);
        codes = q->data;
        if (strcmp(fmt, "fp8-tensor") == 0
            || strcmp(fmt, "ct-fp8-tensor") == 0)
        {
            snprintf(nm, sizeof(nm), "%s.weight_scale", base);
            s = add(o, nm, MOE_DT_F32, 0, 0, 0);
            sc = amax(w, N * K) / 448.0f;
            sc = sc > 0 ? sc : 1.0f;
            put_f32(s, 0, sc);
            fp8_codes(w, N * K, sc, codes);
            for (i = 0; i < N * K; i++) {
                deq[i] = moe_fp8_e4m3_to_f32(codes[i]) * sc;
            }
        } else if (strcmp(fmt, "fp8-block") == 0
                   || strcmp(fmt, "ct-fp8-block") == 0)
        {
            snprintf(nm, sizeof(nm), "%s.weight_scale%s", base,
                     fmt[0] == 'f' ? "_inv" : "");
            s = add(o, nm, MOE_DT_F32, 2, (N + bn - 1) / bn, (K + bk - 1) / bk);
            for (r = 0; r < s->shape[0]; r++) {
                for (c = 0; c < s->shape[1]; c++) {
                    float a = 0.0f;

                    for (n = r * bn; n < N && n < (r + 1) * bn; n++) {
                        for (k = c * bk; k < K && k < (c + 1) * bk; k++) {
                            a = fmaxf(a, fabsf(w[n * K + k]));
                        }
                    }
                    sc = a > 0 ? a / 448.0f : 1.0f;
                    put_f32(s, r * s->shape[1] + c, sc);
                    for (n = r * bn; n < N && n < (r + 1) * bn; n++) {
                        for (k = c * bk; k < K && k < (c + 1) * bk; k++) {
                            codes[n * K + k] =
                                moe_f32_to_fp8_e4m3(w[n * K + k] / sc);
                            deq[n * K + k] =
                                moe_fp8_e4m3_to_f32(codes[n * K + k]) * sc;
                        }
                    }
                }
            }
        } else {
            snprintf(nm, sizeof(nm), "%s.weight_scale", base);
            s = add(o, nm, MOE_DT_BF16, 2, N, 1);
            for (n = 0; n < N; n++) {
                uint16_t b;

                sc = amax(w + n * K, K) / 448.0f;
                b = f32_to_bf16(sc > 0 ? sc : 1.0f);
                memcpy((char *) s->data + 2 * n, &b, 2);
                sc = moe_bf16_to_f32(b);
                fp8_codes(w + n * K, K, sc, codes + n * K);
                for (k = 0; k < K; k++) {
                    deq[n * K + k] = moe_fp8_e4m3_to_f32(codes[n * K + k])
                                     * sc;
                }
            }
        }
        if (static_act) {
            snprintf(nm, sizeof(nm), "%s.input_scale", base);
            put_f32(add(o, nm, MOE_DT_F32, 1, 1, 0), 0, 0.02f);
        }
        if (first && strcmp(corrupt, "drop-scale") == 0) {
            snprintf(s->name, sizeof(s->name), "%s.scale_dropped", base);
            corrupted = 1;
        }
        return;
    }

    /* 4-bit: codes (K, N), zero and scale per (group, column) */
    ct = strcmp(fmt, "ct-int4") == 0;
    G = group > 0 ? group : K;
    ng = K / G;
    codes = xmalloc((size_t) (K * N));
    zc = xmalloc((size_t) (ng * N));
    gidx = xmalloc((size_t) K * sizeof(int32_t));
    for (k = 0; k < K; k++) {
        gidx[k] = (int32_t) (k / G);
    }
    if (desc_act) {
        /* act-order: input rows visited in a permuted order, groups of G
         * consecutive visited rows; perm(i) = (i * 5 + 3) mod K, a
         * permutation when K is odd or 5 is coprime with K */
        for (i = 0; i < K; i++) {
            gidx[(i * 5 + 3) % K] = (int32_t) (i / G);
        }
    }
    snprintf(nm, sizeof(nm), "%s.%s", base, ct ? "weight_scale" : "scales");
    s = ct ? add(o, nm, MOE_DT_BF16, 2, N, ng) : add(o, nm, MOE_DT_F16, 2, ng, N);
    for (g = 0; g < ng; g++) {
        for (n = 0; n < N; n++) {
            int zero;

            lo = 0.0f;
            hi = 0.0f;
            for (k = 0; k < K; k++) {
                if (gidx[k] == g) {
                    lo = fminf(lo, w[n * K + k]);
                    hi = fmaxf(hi, w[n * K + k]);
                }
            }
            if ((strcmp(fmt, "gptq") == 0 || ct) && sym) {
                sc = fmaxf(fabsf(lo), fabsf(hi)) * 2.0f / 15.0f;
                sc = scale_round(sc > 0 ? sc : 1.0f, ct);
                zero = 8;
            } else {
                sc = (hi - lo) / 15.0f;
                sc = scale_round(sc > 0 ? sc : 1.0f, ct);
                zero = (int) rintf(-lo / sc);
                /* GPTQ v1 stores zero - 1: keep zero >= 1 */
                if (zero < (strcmp(fmt, "gptq") == 0 ? 1 : 0)) {
                    zero = strcmp(fmt, "gptq") == 0 ? 1 : 0;
                }
                zero = zero > 15 ? 15 : zero;
            }
            {
                uint16_t h = ct ? f32_to_bf16(sc) : f32_to_f16(sc);

                memcpy((char *) s->data + 2 * (ct ? n * ng + g : g * N + n),
                       &h, 2);
            }
            zc[g * N + n] = (uint8_t) zero;
            for (k = 0; k < K; k++) {
                if (gidx[k] == g) {
                    x = rintf(w[n * K + k] / sc) + (float) zero;
                    x = x < 0 ? 0 : x > 15 ? 15 : x;
                    codes[k * N + n] = (uint8_t) x;
                    deq[n * K + k] = (x - (float) zero) * sc;
                }
            }
        }
    }
    snprintf(nm, sizeof(nm), "%s.qweight", base);
    if (ct) {
        /* weight_packed (N, K/8) and weight_zero_point (N/8, groups):
         * GPTQ's words transposed (k = 8j + i in nibble i of word (n, j),
         * as q + 8 = the unsigned code; zeros the same way along n) */
        int32_t *tmp = xmalloc((size_t) (K / 8) * (size_t) N * 4);

        snprintf(nm, sizeof(nm), "%s.weight_packed", base);
        q = add(o, nm, MOE_DT_I32, 2, N, K / 8);
        moe_gptq_pack_w(codes, K, N, tmp);
        moe_q_transpose_words(tmp, K / 8, N, q->data);
        if (!sym) {
            snprintf(nm, sizeof(nm), "%s.weight_zero_point", base);
            z = add(o, nm, MOE_DT_I32, 2, N / 8, ng);
            moe_gptq_pack_z(zc, ng, N, tmp);
            moe_q_transpose_words(tmp, ng, N / 8, z->data);
        }
        free(tmp);
        if (desc_act) {
            snprintf(nm, sizeof(nm), "%s.weight_g_idx", base);
            gi = add(o, nm, MOE_DT_I32, 1, K, 0);
            memcpy(gi->data, gidx, (size_t) K * 4);
            if (first) {
                corrupt_gidx(gi, ng);
            }
        }
        snprintf(nm, sizeof(nm), "%s.weight_shape", base);
        gi = add(o, nm, MOE_DT_I64, 1, 2, 0);
        memcpy(gi->data, &N, 8);
        memcpy((char *) gi->data + 8, &K, 8);
        if (first && strcmp(corrupt, "wshape") == 0) {
            int64_t bad = N + 8;

            memcpy(gi->data, &bad, 8);
            corrupted = 1;
        }
    } else if (strcmp(fmt, "awq") == 0) {
        q = add(o, nm, MOE_DT_I32, 2, K, N / 8);
        moe_awq_pack(codes, K, N, q->data);
        snprintf(nm, sizeof(nm), "%s.qzeros", base);
        z = add(o, nm, MOE_DT_I32, 2, ng, N / 8);
        moe_awq_pack(zc, ng, N, z->data);
    } else {
        q = add(o, nm, MOE_DT_I32, 2, K / 8, N);
        moe_gptq_pack_w(codes, K, N, q->data);
        for (i = 0; i < ng * N; i++) {
            zc[i] = (uint8_t) (zc[i] - 1);      /* v1 */
        }
        snprintf(nm, sizeof(nm), "%s.qzeros", base);
        z = add(o, nm, MOE_DT_I32, 2, ng, N / 8);
        moe_gptq_pack_z(zc, ng, N, z->data);
        if (desc_act || write_gidx) {
            snprintf(nm, sizeof(nm), "%s.g_idx", base);
            gi = add(o, nm, MOE_DT_I32, 1, K, 0);
            memcpy(gi->data, gidx, (size_t) K * 4);
            if (first) {
                corrupt_gidx(gi, ng);
            }
        }
    }
    if (first && strcmp(corrupt, "scale-shape") == 0) {
        s->shape[0] -= 1;
        s->nbytes -= (size_t) s->shape[1] * 2;
        corrupted = 1;
    }
    if (first && strcmp(corrupt, "drop-scale") == 0) {
        /* remove the scales tensor (s) by swapping in a dummy name */
        snprintf(s->name, sizeof(s->name), "%s.%s_dropped", base,
                 ct ? "weight_scale" : "scales");
        corrupted = 1;
    }
    free(codes);
    free(zc);
    free(gidx);
}


static void
write_st(const outset_t *o, const char *path)
{
    FILE    *f;
    char    *hdr;
    size_t   cap = 256 + (size_t) o->n * 400, len = 0, off = 0;
    uint64_t hl;
    int      i;

    hdr = xmalloc(cap);
    len += (size_t) snprintf(hdr + len, cap - len, "{");
    for (i = 0; i < o->n; i++) {
        const out_t *t = &o->t[i];

        len += (size_t) snprintf(hdr + len, cap - len,
                                 "%s\"%s\":{\"dtype\":\"%s\",\"shape\":[",
                                 i ? "," : "", t->name,
                                 moe_dtype_name((moe_dtype_t) t->dtype));
        if (t->n_dims >= 1) {
            len += (size_t) snprintf(hdr + len, cap - len, "%lld",
                                     (long long) t->shape[0]);
        }
        if (t->n_dims == 2) {
            len += (size_t) snprintf(hdr + len, cap - len, ",%lld",
                                     (long long) t->shape[1]);
        }
        len += (size_t) snprintf(hdr + len, cap - len,
                                 "],\"data_offsets\":[%zu,%zu]}", off,
                                 off + t->nbytes);
        off += t->nbytes;
    }
    len += (size_t) snprintf(hdr + len, cap - len, "}");
    while (len % 8 != 0) {
        hdr[len++] = ' ';
    }
    f = fopen(path, "wb");
    if (f == NULL) {
        die(path);
    }
    hl = len;
    fwrite(&hl, 8, 1, f);
    fwrite(hdr, 1, len, f);
    for (i = 0; i < o->n; i++) {
        fwrite(o->t[i].data, 1, o->t[i].nbytes, f);
    }
    if (fclose(f) != 0) {
        die(path);
    }
    free(hdr);
}


/* --kv-scales: each layer's K and V cache scales (the layers: those with
 * a self_attn.k_proj.weight in the source) */
static void
add_kv_scales(outset_t *o, const moe_st_set_t *st)
{
    char   name[300];
    out_t *r;
    float  x;
    int    l, w;

    for (l = 0;; l++) {
        snprintf(name, sizeof(name), "model.layers.%d.self_attn.k_proj.weight",
                 l);
        if (moe_st_find(st, name) == NULL) {
            break;
        }
        for (w = 0; w < 2; w++) {
            if (strcmp(kv_naming, "kv") == 0 && w == 1) {
                break;
            }
            if (corrupt != NULL && strcmp(corrupt, "kv-missing") == 0
                && l == 1 && w == 1)
            {
                corrupted = 1;
                continue;
            }
            if (strcmp(kv_naming, "output") == 0) {
                snprintf(name, sizeof(name), "model.layers.%d.self_attn."
                         "%c_proj.output_scale", l, w ? 'v' : 'k');
            } else if (strcmp(kv_naming, "kv") == 0) {
                snprintf(name, sizeof(name), "model.layers.%d.self_attn."
                         "kv_scale", l);
            } else {
                snprintf(name, sizeof(name), "model.layers.%d.self_attn."
                         "%c_scale", l, w ? 'v' : 'k');
            }
            x = (float) ((w ? kv_v : kv_k) * (1.0 + 0.3 * l));
            if (corrupt != NULL && l == 0 && w == 0
                && strcmp(corrupt, "kv-perhead") == 0)
            {
                r = add(o, name, MOE_DT_F32, 1, 2, 0);
                memcpy(r->data, &x, 4);
                memcpy((char *) r->data + 4, &x, 4);
                corrupted = 1;
                continue;
            }
            if (corrupt != NULL && l == 0 && w == 0
                && strcmp(corrupt, "kv-neg") == 0)
            {
                x = -x;
                corrupted = 1;
            }
            r = add(o, name, MOE_DT_F32, 0, 0, 0);
            memcpy(r->data, &x, 4);
        }
    }
}


static void
copy_file(const char *from, const char *to)
{
    FILE  *a = fopen(from, "rb"), *b;
    char   buf[65536];
    size_t n;

    if (a == NULL) {
        return;
    }
    b = fopen(to, "wb");
    if (b == NULL) {
        die(to);
    }
    while ((n = fread(buf, 1, sizeof(buf), a)) > 0) {
        fwrite(buf, 1, n, b);
    }
    fclose(a);
    fclose(b);
}


/* config.json with `qc` ("" none) as quantization_config: the source's
 * text with its last '}' replaced */
static void
write_config(const char *in, const char *out, const char *qc)
{
    char   path[1024], *text, *end;
    FILE  *f;

    snprintf(path, sizeof(path), "%s/config.json", in);
    text = moe_read_file(path, NULL);
    if (text == NULL || (end = strrchr(text, '}')) == NULL) {
        die("cannot read config.json");
    }
    *end = '\0';
    snprintf(path, sizeof(path), "%s/config.json", out);
    f = fopen(path, "w");
    if (f == NULL) {
        die(path);
    }
    while (end > text && (end[-1] == '\n' || end[-1] == ' ')) {
        *--end = '\0';
    }
    fprintf(f, "%s%s%s\n}\n", text, qc[0] ? ",\n  \"quantization_config\": "
            : "", qc);
    fclose(f);
    free(text);
}


static void
copy_side_files(const char *in, const char *out)
{
    static const char *files[] = { "tokenizer.json", "tokenizer_config.json",
                                   "generation_config.json" };
    char a[1024], b[1024];
    int  i;

    for (i = 0; i < 3; i++) {
        snprintf(a, sizeof(a), "%s/%s", in, files[i]);
        snprintf(b, sizeof(b), "%s/%s", out, files[i]);
        copy_file(a, b);
    }
}


int
main(int argc, char **argv)
{
    const char            *in = NULL, *out = NULL, *ref = NULL;
    char                   err[1024], qc[1024], ign[256], path[1024];
    moe_st_set_t          *st;
    const moe_st_tensor_t *t;
    static outset_t        oq, orf;
    out_t                  *r;
    float                  *w;
    size_t                 i;
    int                    a, j, quant;

    for (a = 1; a < argc; a++) {
        if (strcmp(argv[a], "--in") == 0 && a + 1 < argc) {
            in = argv[++a];
        } else if (strcmp(argv[a], "--out") == 0 && a + 1 < argc) {
            out = argv[++a];
        } else if (strcmp(argv[a], "--ref") == 0 && a + 1 < argc) {
            ref = argv[++a];
        } else if (strcmp(argv[a], "--format") == 0 && a + 1 < argc) {
            fmt = argv[++a];
        } else if (strcmp(argv[a], "--group") == 0 && a + 1 < argc) {
            group = atoi(argv[++a]);
        } else if (strcmp(argv[a], "--block") == 0 && a + 1 < argc) {
            if (sscanf(argv[++a], "%d,%d", &bn, &bk) != 2 || bn < 1
                || bk < 1)
            {
                die("--block BN,BK");
            }
        } else if (strcmp(argv[a], "--sym") == 0) {
            sym = 1;
        } else if (strcmp(argv[a], "--desc-act") == 0) {
            desc_act = 1;
        } else if (strcmp(argv[a], "--g-idx") == 0) {
            write_gidx = 1;
        } else if (strcmp(argv[a], "--static") == 0) {
            static_act = 1;
        } else if (strcmp(argv[a], "--ignore") == 0 && a + 1 < argc) {
            ignore_s = argv[++a];
        } else if (strcmp(argv[a], "--corrupt") == 0 && a + 1 < argc) {
            corrupt = argv[++a];
        } else if (strcmp(argv[a], "--kv-scales") == 0 && a + 1 < argc) {
            if (sscanf(argv[++a], "%lf,%lf,%15s", &kv_k, &kv_v, kv_naming)
                < 2 || !(kv_k > 0) || !(kv_v > 0)
                || (strcmp(kv_naming, "attn") != 0
                    && strcmp(kv_naming, "output") != 0
                    && strcmp(kv_naming, "kv") != 0))
            {
                die("--kv-scales K,V[,attn|output|kv], K and V > 0");
            }
        } else {
            fprintf(stderr, "usage: quantize --in DIR --out DIR --format "
                    "fp8-tensor|fp8-block|ct-fp8[-tensor|-block]|awq|gptq|"
                    "ct-int4 "
                    "[--group G] "
                    "[--block BN,BK] [--sym] [--desc-act] [--g-idx] "
                    "[--static] [--ignore S] [--kv-scales K,V[,N]] "
                    "[--corrupt C] [--ref DIR]\n");
            return 2;
        }
    }
    if (in == NULL || out == NULL || fmt == NULL) {
        die("--in, --out and --format are required");
    }
    if (strcmp(fmt, "fp8-tensor") != 0 && strcmp(fmt, "fp8-block") != 0
        && strcmp(fmt, "ct-fp8") != 0 && strcmp(fmt, "ct-fp8-tensor") != 0
        && strcmp(fmt, "ct-fp8-block") != 0 && strcmp(fmt, "awq") != 0
        && strcmp(fmt, "gptq") != 0 && strcmp(fmt, "ct-int4") != 0)
    {
        die("unknown --format");
    }

    if (moe_st_open_dir(in, &st, err, sizeof(err)) != MOE_OK) {
        die(err);
    }
    ign[0] = '\0';
    if (ignore_s != NULL) {
        snprintf(ign, sizeof(ign), strncmp(fmt, "ct-", 3) == 0
                 ? "\"re:.*%s.*\"" : "\"%s\"", ignore_s);
    }
    if (strcmp(fmt, "fp8-tensor") == 0) {
        snprintf(qc, sizeof(qc), "{\"quant_method\": \"fp8\", "
                 "\"activation_scheme\": \"%s\", \"modules_to_not_convert\""
                 ": [%s]}", static_act ? "static" : "dynamic", ign);
    } else if (strcmp(fmt, "fp8-block") == 0) {
        snprintf(qc, sizeof(qc), "{\"quant_method\": \"fp8\", "
                 "\"activation_scheme\": \"%s\", \"weight_block_size\": "
                 "[%d, %d], \"modules_to_not_convert\": [%s]}", static_act
                 ? "static" : "dynamic", bn, bk, ign);
    } else if (strncmp(fmt, "ct-fp8", 6) == 0) {
        char strat[96];

        snprintf(strat, sizeof(strat), fmt[6] == '\0' ? "\"channel\""
                 : fmt[7] == 't' ? "\"tensor\"" : "\"block\", "
                 "\"block_structure\": [%d, %d]", bn, bk);
        snprintf(qc, sizeof(qc), "{\"quant_method\": \"compressed-tensors\","
                 " \"format\": \"float-quantized\", \"config_groups\": "
                 "{\"group_0\": {\"targets\": [\"Linear\"], \"weights\": "
                 "{\"num_bits\": 8, \"type\": \"float\", \"strategy\": "
                 "%s, \"symmetric\": true, \"dynamic\": false}, "
                 "\"input_activations\": {\"num_bits\": 8, \"type\": "
                 "\"float\", \"strategy\": \"tensor\", \"dynamic\": %s}}}, "
                 "\"ignore\": [\"lm_head\"%s%s]}", strat, static_act
                 ? "false" : "true", ign[0] ? ", " : "", ign);
    } else if (strcmp(fmt, "ct-int4") == 0) {
        char strat[64];

        if (group > 0) {
            snprintf(strat, sizeof(strat), "\"group\", \"group_size\": %d",
                     group);
        } else {
            snprintf(strat, sizeof(strat), "\"channel\"");
        }
        snprintf(qc, sizeof(qc), "{\"quant_method\": \"compressed-tensors\","
                 " \"format\": \"pack-quantized\", \"config_groups\": "
                 "{\"group_0\": {\"targets\": [\"Linear\"], \"weights\": "
                 "{\"num_bits\": 4, \"type\": \"int\", \"strategy\": %s, "
                 "\"symmetric\": %s, \"dynamic\": false, \"actorder\": %s}, "
                 "\"input_activations\": null}}, \"ignore\": [\"lm_head\""
                 "%s%s]}", strat, sym ? "true" : "false",
                 desc_act ? "\"group\"" : "null", ign[0] ? ", " : "", ign);
    } else if (strcmp(fmt, "awq") == 0) {
        snprintf(qc, sizeof(qc), "{\"quant_method\": \"awq\", \"bits\": 4, "
                 "\"group_size\": %d, \"zero_point\": true, \"version\": "
                 "\"gemm\", \"modules_to_not_convert\": [%s]}", group, ign);
    } else {
        snprintf(qc, sizeof(qc), "{\"quant_method\": \"gptq\", \"bits\": 4, "
                 "\"group_size\": %d, \"desc_act\": %s, \"sym\": %s, "
                 "\"checkpoint_format\": \"gptq\", \"modules_to_not_convert\""
                 ": [%s]}", group, desc_act ? "true" : "false",
                 sym ? "true" : "false", ign);
    }
    (void) mkdir(out, 0755);
    if (ref != NULL) {
        (void) mkdir(ref, 0755);
    }

    for (i = 0; i < moe_st_count(st); i++) {
        int64_t N, K, n;
        char    base[300];

        t = moe_st_at(st, i);
        n = t->numel;
        w = xmalloc((size_t) n * sizeof(float));
        if (moe_st_to_f32(t, 0, n, w) != MOE_OK) {
            die("cannot convert a tensor");
        }
        quant = is_linear(t) && (ignore_s == NULL
                                 || strstr(t->name, ignore_s) == NULL);
        if (!quant) {
            r = add(&oq, t->name, t->dtype, t->n_dims, t->shape[0],
                    t->shape[1]);
            memcpy(r->data, t->data, t->nbytes);
            r->n_dims = t->n_dims;
            for (j = 0; j < t->n_dims; j++) {
                r->shape[j] = t->shape[j];
            }
            r = add(&orf, t->name, MOE_DT_F32, t->n_dims, t->shape[0],
                    t->shape[1]);
            memcpy(r->data, w, (size_t) n * 4);
            for (j = 0; j < t->n_dims; j++) {
                r->shape[j] = t->shape[j];
            }
            free(w);
            continue;
        }
        N = t->shape[0];
        K = t->shape[1];
        snprintf(base, sizeof(base), "%.*s", (int) (strlen(t->name) - 7),
                 t->name);
        r = add(&orf, t->name, MOE_DT_F32, 2, N, K);
        quantize(&oq, base, w, N, K, r->data);
        free(w);
    }

    if (kv_k > 0) {
        add_kv_scales(&oq, st);
    }
    snprintf(path, sizeof(path), "%s/model.safetensors", out);
    write_st(&oq, path);
    write_config(in, out, qc);
    copy_side_files(in, out);

    if (ref != NULL) {
        snprintf(path, sizeof(path), "%s/model.safetensors", ref);
        write_st(&orf, path);
        write_config(in, ref, "");
        copy_side_files(in, ref);
    }
    moe_st_close(st);
    return 0;
}
