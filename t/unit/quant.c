/*
 * Checks quantized checkpoints (engine/model/quant.{h,c} and the loader):
 *  - fp8 e4m3 / e5m2 decoding of hand-picked codes, e4m3 encoding (round
 *    to nearest even, saturation at 448) and the round trip of every code;
 *  - AWQ and GPTQ packing against hand-computed int32 words, unpacking
 *    back, and the dequantization of hand-built fp8-block, AWQ and GPTQ
 *    (g_idx, v1 zero + 1) tensors against the formula; an empty logical
 *    shape refused by moe_qtensor_find;
 *  - every model in $MOE_QUANT_DIR (build/quant, tools/quant_models.sh)
 *    loads on the CPU backend with its fp32 weights bitwise equal to its
 *    dequantized reference (<name>.ref, written by the quantizer from its
 *    own codes), logits at 12 prompt positions within 1e-4 (relative to
 *    the largest logit) and 8 greedy tokens equal; the tensor walk hands
 *    its linear weights with their packed form (quant != NULL, layout of
 *    the format) except the modules the ignore list keeps in float, and
 *    the packed walk (moe_model_for_each_tensor_packed) hands the files'
 *    own bytes;
 *  - YAML quantization: fp8 quantizes the float tiny model at load (per
 *    channel, every weight within half an fp8 step of the original),
 *    agreeing values load, disagreeing ones are refused with the message;
 *  - malformed checkpoints and configs are refused with MOE_EINVAL and a
 *    message naming the tensor / key and the problem.
 */

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include <sys/stat.h>

#include "backends/backend.h"
#include "model/model.h"
#include "model/quant.h"
#include "util/par.h"
#include "model/safetensors.h"
#include "tap.h"

#define N_PROMPT  12
#define N_GREEDY  8
#define BS        4
#define N_BLOCKS  16

static char qdir[256];


static void
test_fp8(void)
{
    int c, bad = 0, rt = 0;

    TAP_OK(moe_fp8_e4m3_to_f32(0x38) == 1.0f
           && moe_fp8_e4m3_to_f32(0x3c) == 1.5f
           && moe_fp8_e4m3_to_f32(0x7e) == 448.0f
           && moe_fp8_e4m3_to_f32(0x08) == ldexpf(1.0f, -6)
           && moe_fp8_e4m3_to_f32(0x01) == ldexpf(1.0f, -9)
           && moe_fp8_e4m3_to_f32(0xb8) == -1.0f
           && moe_fp8_e4m3_to_f32(0x00) == 0.0f
           && isnan(moe_fp8_e4m3_to_f32(0x7f)),
           "e4m3 decode: 1, 1.5, 448, 2^-6, 2^-9, -1, 0, NaN");
    TAP_OK(moe_fp8_e5m2_to_f32(0x3c) == 1.0f
           && moe_fp8_e5m2_to_f32(0x7b) == 57344.0f
           && isinf(moe_fp8_e5m2_to_f32(0x7c)),
           "e5m2 decode: 1, 57344, inf");
    TAP_OK(moe_f32_to_fp8_e4m3(1.0f) == 0x38
           && moe_f32_to_fp8_e4m3(448.0f) == 0x7e
           && moe_f32_to_fp8_e4m3(1e6f) == 0x7e
           && moe_f32_to_fp8_e4m3(-1e6f) == 0xfe
           && moe_f32_to_fp8_e4m3(1.0625f) == 0x38     /* tie to even */
           && moe_f32_to_fp8_e4m3(1.1875f) == 0x3a     /* tie to even */
           && moe_f32_to_fp8_e4m3(ldexpf(1.0f, -10)) == 0x00
           && moe_f32_to_fp8_e4m3(ldexpf(3.0f, -10)) == 0x02
           && moe_f32_to_fp8_e4m3(ldexpf(15.5f, -10)) == 0x08,
           "e4m3 encode: exact, saturating, ties to even, subnormals");
    for (c = 0; c < 256; c++) {
        float f = moe_fp8_e4m3_to_f32((uint8_t) c);

        if (isnan(f)) {
            continue;
        }
        rt++;
        bad += moe_f32_to_fp8_e4m3(f) != c;
    }
    TAP_OK(bad == 0 && rt == 254, "every finite e4m3 code round-trips "
           "(%d codes, %d bad)", rt, bad);

    /* the encoder against a nearest-code search (ties to the even code,
     * saturating at 448, NaN 0x7f) over 2^24 floats spread over every
     * exponent, with low mantissa bits varied */
    {
        float    pos[127];
        uint32_t u, i;
        int64_t  wrong = 0, n = 0;

        for (c = 0; c < 127; c++) {
            pos[c] = moe_fp8_e4m3_to_f32((uint8_t) c);  /* increasing */
        }
        for (i = 0; i < (1u << 24); i++) {
            float   x, a;
            int     lo = 0, hi = 126, want;
            uint8_t got;

            u = (i << 8) | ((i * 2654435761u) >> 24);
            memcpy(&x, &u, sizeof(x));
            got = moe_f32_to_fp8_e4m3(x);
            n++;
            if (isnan(x)) {
                wrong += got != 0x7f;
                continue;
            }
            a = fabsf(x);
            if (a >= 448.0f) {
                want = 0x7e;
            } else {
                while (hi - lo > 1) {           /* pos[lo] <= a < pos[hi] */
                    int mid = (lo + hi) / 2;

                    if (pos[mid] <= a) {
                        lo = mid;
                    } else {
                        hi = mid;
                    }
                }
                if (a - pos[lo] < pos[hi] - a) {
                    want = lo;
                } else if (a - pos[lo] > pos[hi] - a) {
                    want = hi;
                } else {
                    want = (lo & 1) == 0 ? lo : hi;
                }
            }
            wrong += got != (uint8_t) ((u >> 24 & 0x80) | (uint32_t) want);
        }
        /* every tie between neighbouring codes (exact in fp32), and one
         * ulp either side of it, both signs */
        for (c = 0; c < 126; c++) {
            float mid = (pos[c] + pos[c + 1]) / 2.0f;
            int   even = (c & 1) == 0 ? c : c + 1;

            for (int sg = 0; sg < 2; sg++) {
                uint8_t s8 = sg ? 0x80 : 0;
                float   m = sg ? -mid : mid;

                n += 3;
                wrong += moe_f32_to_fp8_e4m3(m) != (uint8_t) (s8 | even);
                wrong += moe_f32_to_fp8_e4m3(nextafterf(m, 0.0f))
                         != (uint8_t) (s8 | c);
                wrong += moe_f32_to_fp8_e4m3(nextafterf(m, sg ? -1e9f
                                                               : 1e9f))
                         != (uint8_t) (s8 | (c + 1));
            }
        }
        TAP_OK(wrong == 0, "e4m3 encode equals a nearest-code search (ties "
               "to even) on %lld floats over every exponent and at every "
               "tie (%lld wrong)", (long long) n, (long long) wrong);
    }
}


/* moe_par_for: ranges cover [0, n) once, start on `align`, carry fn's
 * status; and the threaded word transposition against a plain loop. */
typedef struct {
    unsigned char *hit;                 /* [n]: times item i was done */
    unsigned char *start;               /* [n]: 1 where a range began */
    int64_t        align, fail_at;
} parx_t;


static int
parx_fn(void *arg, int64_t i0, int64_t i1)
{
    parx_t *p = arg;

    p->start[i0] = 1;           /* each range its own bytes: no race */
    for (int64_t i = i0; i < i1; i++) {
        p->hit[i]++;
    }
    return p->fail_at >= i0 && p->fail_at < i1 ? MOE_EIO : MOE_OK;
}


static void
test_par(void)
{
    static const int64_t ns[] = { 1, 15, 16, 17, 1000, 4101 };
    static const int64_t grains[] = { 1, 100, (int64_t) 1 << 30 };
    int                  ok = 1, rcok = 1;
    int64_t              rows = 4101, cols = 2051, r, c, bad = 0;
    int32_t             *in, *out;

    for (size_t a = 0; a < sizeof(ns) / sizeof(ns[0]); a++) {
        for (size_t g = 0; g < 3; g++) {
            for (int64_t al = 1; al <= 16; al += 15) {
                parx_t p = { calloc((size_t) ns[a], 1),
                             calloc((size_t) ns[a], 1), al, -1 };

                if (p.hit == NULL || p.start == NULL) {
                    free(p.hit);
                    free(p.start);
                    ok = 0;
                    continue;
                }
                ok &= moe_par_for(ns[a], grains[g], al, parx_fn, &p)
                      == MOE_OK;
                for (int64_t i = 0; i < ns[a]; i++) {
                    ok &= p.hit[i] == 1 && (!p.start[i] || i % al == 0);
                }
                memset(p.hit, 0, (size_t) ns[a]);
                p.fail_at = ns[a] - 1;
                rcok &= moe_par_for(ns[a], grains[g], al, parx_fn, &p)
                        == MOE_EIO;
                free(p.hit);
                free(p.start);
            }
        }
    }
    TAP_OK(ok && rcok, "moe_par_for: ranges cover [0, n) once, aligned, "
           "for n 1..4101, grains 1 / 100 / 2^30, align 1 / 16; a range's "
           "error comes back");

    in = malloc((size_t) (rows * cols) * 4);
    out = malloc((size_t) (rows * cols) * 4);
    if (in == NULL || out == NULL) {
        TAP_OK(0, "transpose: out of memory");
        free(in);
        free(out);
        return;
    }
    for (r = 0; r < rows * cols; r++) {
        in[r] = (int32_t) (r * 2654435761u);
    }
    moe_q_transpose_words(in, rows, cols, out);
    for (r = 0; r < rows; r++) {
        for (c = 0; c < cols; c++) {
            bad += out[c * rows + r] != in[r * cols + c];
        }
    }
    TAP_OK(bad == 0, "moe_q_transpose_words: %lld x %lld words (8.4M: "
           "split over threads in 16-row tiles, partial last tiles) equal "
           "to the plain transpose (%lld bad)", (long long) rows,
           (long long) cols, (long long) bad);
    free(in);
    free(out);
}


static void
test_pack(void)
{
    uint8_t  codes[16], back[16];
    int32_t  w[2];
    uint32_t u;
    int      i, ok;

    for (i = 0; i < 8; i++) {
        codes[i] = (uint8_t) i;
    }
    moe_awq_pack(codes, 1, 8, w);
    memcpy(&u, &w[0], 4);
    TAP_OK(u == 0x75316420u, "AWQ packs columns 0..7 as nibbles "
           "0,2,4,6,1,3,5,7 -> 0x75316420 (got 0x%08x)", u);
    ok = 1;
    for (i = 0; i < 8; i++) {
        ok &= moe_awq_get(w, 8, 0, i) == i;
    }
    TAP_OK(ok, "AWQ unpack gives the columns back");

    /* GPTQ qweight: rows 0..7 of one column, codes 1..8 -> 0x87654321 */
    for (i = 0; i < 8; i++) {
        codes[i] = (uint8_t) (i + 1);
    }
    moe_gptq_pack_w(codes, 8, 1, w);
    memcpy(&u, &w[0], 4);
    TAP_OK(u == 0x87654321u, "GPTQ qweight packs rows in nibble order "
           "-> 0x87654321 (got 0x%08x)", u);
    ok = 1;
    for (i = 0; i < 8; i++) {
        ok &= moe_gptq_get_w(w, 1, i, 0) == i + 1;
    }
    TAP_OK(ok, "GPTQ qweight unpack");

    for (i = 0; i < 16; i++) {
        codes[i] = (uint8_t) (15 - i);
    }
    moe_gptq_pack_z(codes, 1, 16, w);
    memcpy(&u, &w[1], 4);
    for (i = 0; i < 16; i++) {
        back[i] = (uint8_t) moe_gptq_get_z(w, 16, 0, i);
    }
    TAP_OK(u == 0x01234567u && memcmp(codes, back, 16) == 0,
           "GPTQ qzeros: columns 8..15 sequential in the second word "
           "(0x%08x) and back", u);
}


static uint16_t
f16_of(float f)
{
    _Float16 h = (_Float16) f;
    uint16_t u;

    memcpy(&u, &h, 2);
    return u;
}


/*
 * compressed-tensors int4 by hand: N 8, K 16, G 8.  Row n's words hold
 * codes u(n, k) = (k + n) % 16 (k = 8j + i in nibble i of word (n, j)),
 * the zero points of row n are n + g (word (0, g), nibble n), scales
 * (n, g) = 0.5 / 0.25; dequantized (u - z) * s, g_idx reversed.  Then its
 * GPTQ form: the same values, zeros and qweight words transposed, scales
 * F16; with a scale no F16 holds (1e-30) the scales stay F32; and a
 * symmetric one (no zero points) dequantizes as (u - 8) * s.
 */
static void
test_ct4(void)
{
    moe_qtensor_t t, gq;
    int32_t       wp[8 * 2], zp[2], gidx[16];
    uint16_t      sb[8 * 2];
    float         sf[8 * 2], out[8 * 16], out2[8 * 16];
    void         *mem = NULL;
    uint32_t      u;
    int           n, k, g, i, ok;

    for (n = 0; n < 8; n++) {
        for (int j = 0; j < 2; j++) {
            u = 0;
            for (i = 0; i < 8; i++) {
                u |= (uint32_t) ((8 * j + i + n) % 16) << (4 * i);
            }
            memcpy(&wp[n * 2 + j], &u, 4);
        }
        for (g = 0; g < 2; g++) {
            sb[n * 2 + g] = (uint16_t) (g ? 0x3e80 : 0x3f00);  /* bf16 */
            sf[n * 2 + g] = g ? 0.25f : 0.5f;
        }
    }
    for (g = 0; g < 2; g++) {
        u = 0;
        for (n = 0; n < 8; n++) {
            u |= (uint32_t) (n + g) << (4 * n);
        }
        memcpy(&zp[g], &u, 4);
    }
    for (k = 0; k < 16; k++) {
        gidx[k] = 1 - k / 8;
    }
    memset(&t, 0, sizeof(t));
    t.layout = MOE_QL_CT4;
    t.name = "m.weight_packed";
    t.rows = 8;
    t.cols = 16;
    t.qweight = wp;
    t.qdtype = MOE_DT_I32;
    t.zeros = zp;
    t.g_idx = gidx;
    t.scales = sb;
    t.sdtype = MOE_DT_BF16;
    t.s_rows = 8;
    t.s_cols = 2;
    t.group_size = 8;
    t.n_groups = 2;
    ok = moe_qtensor_dequant(&t, out) == MOE_OK;
    for (n = 0; n < 8; n++) {
        for (k = 0; k < 16; k++) {
            g = 1 - k / 8;
            ok &= out[n * 16 + k] == (float) ((k + n) % 16 - (n + g))
                                     * (g ? 0.25f : 0.5f);
        }
    }
    TAP_OK(ok, "compressed-tensors int4 dequant: (u - z) * s, rows' words "
           "along k, zero points packed along n, g_idx picks the group");

    ok = moe_qtensor_ct4_to_gptq(&t, &gq, &mem) == MOE_OK
         && gq.layout == MOE_QL_GPTQ && gq.zero_add == 0
         && gq.sdtype == MOE_DT_F16 && gq.g_idx == (const void *) gidx
         && moe_qtensor_dequant(&gq, out2) == MOE_OK
         && memcmp(out, out2, sizeof(out)) == 0
         && moe_gptq_get_w(gq.qweight, 8, 9, 3) == (9 + 3) % 16
         && moe_gptq_get_z(gq.zeros, 8, 1, 5) == 6;
    free(mem);
    TAP_OK(ok, "... its GPTQ form (v2 zeros, F16 scales) dequantizes to the "
           "same values bit for bit");

    sf[5] = 1e-30f;
    t.scales = sf;
    t.sdtype = MOE_DT_F32;
    ok = moe_qtensor_dequant(&t, out) == MOE_OK
         && moe_qtensor_ct4_to_gptq(&t, &gq, &mem) == MOE_OK
         && gq.sdtype == MOE_DT_F32
         && moe_qtensor_dequant(&gq, out2) == MOE_OK
         && memcmp(out, out2, sizeof(out)) == 0 && out[2 * 16 + 8] != 0.0f;
    free(mem);
    TAP_OK(ok, "... a scale no F16 holds (1e-30): the GPTQ form keeps F32 "
           "scales, the same values");

    /* F16 subnormals: 3 * 2^-24 is one (F16 scales), 2^-25 is not */
    for (i = 0; i < 16; i++) {
        sf[i] = ldexpf(3.0f, -24);
    }
    ok = moe_qtensor_ct4_to_gptq(&t, &gq, &mem) == MOE_OK
         && gq.sdtype == MOE_DT_F16
         && moe_q_scale_at(gq.scales, gq.sdtype, 0) == ldexpf(3.0f, -24);
    free(mem);
    sf[7] = ldexpf(1.0f, -25);
    ok = ok && moe_qtensor_ct4_to_gptq(&t, &gq, &mem) == MOE_OK
         && gq.sdtype == MOE_DT_F32;
    free(mem);
    TAP_OK(ok, "... F16 subnormal scales: 3 * 2^-24 converts to F16, "
           "2^-25 keeps the scales F32");
    for (i = 0; i < 16; i++) {
        sf[i] = (i & 1) ? 0.25f : 0.5f;
    }

    t.zeros = NULL;             /* symmetric */
    t.g_idx = NULL;
    ok = moe_qtensor_dequant(&t, out) == MOE_OK
         && moe_qtensor_ct4_to_gptq(&t, &gq, &mem) == MOE_OK
         && moe_qtensor_dequant(&gq, out2) == MOE_OK
         && memcmp(out, out2, sizeof(out)) == 0
         && out[3 * 16 + 10] == (float) ((10 + 3) % 16 - 8) * sf[3 * 2 + 1];
    free(mem);
    TAP_OK(ok, "... symmetric (no zero points): (u - 8) * s, and so its "
           "GPTQ form");
    t.layout = MOE_QL_GPTQ;
    TAP_OK(moe_qtensor_ct4_to_gptq(&t, &gq, &mem) == MOE_EINVAL
           && mem == NULL, "... a tensor of another layout is refused");
}


static void
test_dequant(void)
{
    moe_qtensor_t t;
    uint8_t       q8[9], codes[16 * 8], zc[2 * 8];
    float         s4[4] = { 0.5f, 2.0f, 0.25f, 4.0f }, out[16 * 8];
    uint16_t      sc[2 * 8];
    int32_t       qw[16 * 8 / 8 * 2], qz[4], gidx[16];
    int           n, k, ok, g;

    /* fp8 block 2x2 over a 3x3 weight: scales (2, 2) */
    for (k = 0; k < 9; k++) {
        q8[k] = 0x38;               /* 1.0 */
    }
    q8[4] = 0xc0;                   /* -2.0 */
    memset(&t, 0, sizeof(t));
    t.layout = MOE_QL_FP8_BLOCK;
    t.rows = 3;
    t.cols = 3;
    t.qweight = q8;
    t.qdtype = MOE_DT_F8_E4M3;
    t.scales = s4;
    t.sdtype = MOE_DT_F32;
    t.s_rows = 2;
    t.s_cols = 2;
    t.block_n = 2;
    t.block_k = 2;
    ok = moe_qtensor_dequant(&t, out) == MOE_OK
         && out[0] == 0.5f && out[1] == 0.5f && out[2] == 2.0f
         && out[4] == -1.0f && out[5] == 2.0f && out[6] == 0.25f
         && out[8] == 4.0f;
    TAP_OK(ok, "fp8 block dequant: each element times its block's scale");

    /* AWQ K 16, N 8, G 8: q = (k + n) % 16, zero = n, scale by group */
    for (k = 0; k < 16; k++) {
        for (n = 0; n < 8; n++) {
            codes[k * 8 + n] = (uint8_t) ((k + n) % 16);
        }
    }
    for (g = 0; g < 2; g++) {
        for (n = 0; n < 8; n++) {
            zc[g * 8 + n] = (uint8_t) n;
            sc[g * 8 + n] = f16_of(g ? 0.25f : 0.5f);
        }
    }
    moe_awq_pack(codes, 16, 8, qw);
    moe_awq_pack(zc, 2, 8, qz);
    memset(&t, 0, sizeof(t));
    t.layout = MOE_QL_AWQ;
    t.rows = 8;
    t.cols = 16;
    t.qweight = qw;
    t.qdtype = MOE_DT_I32;
    t.zeros = qz;
    t.scales = sc;
    t.sdtype = MOE_DT_F16;
    t.group_size = 8;
    t.n_groups = 2;
    ok = moe_qtensor_dequant(&t, out) == MOE_OK;
    for (n = 0; n < 8; n++) {
        for (k = 0; k < 16; k++) {
            ok &= out[n * 16 + k]
                  == (float) ((k + n) % 16 - n) * (k < 8 ? 0.5f : 0.25f);
        }
    }
    TAP_OK(ok, "AWQ dequant: (q - z) * s per group of 8 rows");

    /* GPTQ, same codes as (K, N), g_idx reversed (row k in group
     * 1 - k / 8), v1 zeros stored minus one */
    for (k = 0; k < 16; k++) {
        gidx[k] = 1 - k / 8;
    }
    for (g = 0; g < 2; g++) {
        for (n = 0; n < 8; n++) {
            zc[g * 8 + n] = (uint8_t) (n + g);          /* stored */
        }
    }
    moe_gptq_pack_w(codes, 16, 8, qw);
    moe_gptq_pack_z(zc, 2, 8, qz);
    t.layout = MOE_QL_GPTQ;
    t.zeros = qz;
    t.g_idx = gidx;
    t.zero_add = 1;
    ok = moe_qtensor_dequant(&t, out) == MOE_OK;
    for (n = 0; n < 8; n++) {
        for (k = 0; k < 16; k++) {
            g = 1 - k / 8;
            ok &= out[n * 16 + k] == (float) ((k + n) % 16 - (n + g + 1))
                                     * (g ? 0.25f : 0.5f);
        }
    }
    TAP_OK(ok, "GPTQ dequant: g_idx picks the group, zero is stored + 1");

    test_ct4();
}


/*
 * moe_qtensor_find with K 0 under GPTQ group_size -1 (G = K): it divided
 * by zero (fuzz_quant); refused as an empty logical shape.
 */
static void
test_find_empty(void)
{
    static const char  hdr[] = "{\"m.qweight\":{\"dtype\":\"I32\","
                               "\"shape\":[0,8],\"data_offsets\":[0,0]}}";
    char               dir[] = "/tmp/moe-quant-XXXXXX", path[64];
    char               err[512] = "";
    unsigned char      len[8] = { sizeof(hdr) - 1 };
    moe_st_set_t      *st = NULL;
    moe_qconfig_t      q;
    moe_qtensor_t      t;
    FILE              *f;
    int                rc = -100;

    if (mkdtemp(dir) == NULL) {
        TAP_OK(0, "mkdtemp");
        return;
    }
    snprintf(path, sizeof(path), "%s/model.safetensors", dir);
    f = fopen(path, "wb");
    if (f != NULL) {
        fwrite(len, 1, 8, f);
        fwrite(hdr, 1, sizeof(hdr) - 1, f);
        fclose(f);
    }
    memset(&q, 0, sizeof(q));
    q.method = MOE_QM_GPTQ;
    q.bits = 4;
    q.group_size = -1;
    if (moe_st_open_file(path, &st, err, sizeof(err)) == MOE_OK) {
        rc = moe_qtensor_find(st, &q, dir, "m", 8, 0, &t, err, sizeof(err));
    }
    TAP_OK(rc == MOE_EINVAL && strstr(err, "logical shape [8, 0] is empty"),
           "GPTQ group_size -1 with K 0: refused (got %d: %s)", rc, err);
    moe_st_close(st);
    unlink(path);
    rmdir(dir);
}


/* ------------------------------------------------------------ models */

typedef struct {
    int n_lin, n_quant, n_ignored_float, layout_ok, expect;
    const char *ignore;     /* substring of names expected in float */
} walk_t;


static int
walk_fn(void *ctx, const moe_tensor_ref_t *t)
{
    walk_t *w = ctx;
    int     lin;

    lin = t->kind == MOE_WK_WQ || t->kind == MOE_WK_WK
          || t->kind == MOE_WK_WV || t->kind == MOE_WK_WO
          || t->kind == MOE_WK_GATE || t->kind == MOE_WK_UP
          || t->kind == MOE_WK_DOWN || t->kind == MOE_WK_WD_GATE
          || t->kind == MOE_WK_WD_UP || t->kind == MOE_WK_WD_DOWN;
    if (!lin) {
        if (t->quant != NULL) {
            w->layout_ok = 0;
        }
        return MOE_OK;
    }
    w->n_lin++;
    if (t->quant == NULL) {
        if (w->ignore != NULL && strstr(t->name, w->ignore) != NULL) {
            w->n_ignored_float++;
        }
        return MOE_OK;
    }
    w->n_quant++;
    if ((int) t->quant->layout != w->expect || t->dtype != MOE_DT_F32
        || t->quant->rows != t->rows || t->quant->cols != t->cols)
    {
        w->layout_ok = 0;
    }
    return MOE_OK;
}


typedef struct {
    int                 n_q, ok;
    const moe_model_t  *ref;    /* compressed-tensors int4: its reference */
    int                 n_f16;  /* converted tensors with F16 scales */
} packed_t;


/* A compressed-tensors int4 piece of the packed walk: converted to the
 * GPTQ layout (v2 zeros), whose dequantization is bit for bit the
 * reference's <module>.weight. */
static int
packed_ct4_ok(packed_t *p, const moe_tensor_ref_t *t)
{
    const moe_qtensor_t   *q = t->quant;
    const moe_st_tensor_t *rt;
    char                   nm[320];
    size_t                 n = strlen(q->name);
    float                 *a, *b;
    int                    ok;

    if (q->layout != MOE_QL_GPTQ || q->zero_add != 0 || q->zeros == NULL
        || n < 14 || strcmp(q->name + n - 14, ".weight_packed") != 0)
    {
        return 0;
    }
    snprintf(nm, sizeof(nm), "%.*s.weight", (int) (n - 14), q->name);
    rt = moe_st_find(moe_model_tensors(p->ref), nm);
    if (rt == NULL || rt->numel != q->rows * q->cols) {
        return 0;
    }
    a = malloc((size_t) rt->numel * sizeof(float));
    b = malloc((size_t) rt->numel * sizeof(float));
    ok = a != NULL && b != NULL && moe_qtensor_dequant(q, a) == MOE_OK
         && moe_st_to_f32(rt, 0, rt->numel, b) == MOE_OK
         && memcmp(a, b, (size_t) rt->numel * sizeof(float)) == 0;
    p->n_f16 += q->sdtype == MOE_DT_F16;
    free(a);
    free(b);
    return ok;
}


static int
packed_fn(void *ctx, const moe_tensor_ref_t *t)
{
    packed_t *p = ctx;

    if (t->quant != NULL) {
        p->n_q++;
        if (t->data != t->quant->qweight || t->dtype != t->quant->qdtype
            || t->dtype == MOE_DT_F32
            || (p->ref != NULL && !packed_ct4_ok(p, t)))
        {
            p->ok = 0;
        }
    }
    return MOE_OK;
}


static int
run(const moe_model_t *m, const int32_t *prompt, float *logits,
    int32_t *greedy)
{
    moe_backend_t   *be;
    moe_seq_batch_t  s;
    int32_t          table[N_BLOCKS], toks[N_PROMPT + N_GREEDY];
    char             err[512];
    int              i, rc, V = moe_model_hparams(m)->vocab_size;
    float           *last = malloc((size_t) V * sizeof(float));

    for (i = 0; i < N_BLOCKS; i++) {
        table[i] = i;
    }
    rc = moe_cpu_backend_create(m, N_BLOCKS, BS, 1, &be, err, sizeof(err));
    if (rc != MOE_OK) {
        TAP_DIAG("backend: %s", err);
        free(last);
        return rc;
    }
    memcpy(toks, prompt, N_PROMPT * sizeof(int32_t));
    /* token by token: logits of every prompt position */
    for (i = 0; i < N_PROMPT + N_GREEDY - 1 && rc == MOE_OK; i++) {
        memset(&s, 0, sizeof(s));
        s.tokens = toks + i;
        s.n_tokens = 1;
        s.pos = i;
        s.block_table = table;
        s.n_blocks = N_BLOCKS;
        s.logits = i < N_PROMPT ? logits + (size_t) i * V : last;
        rc = be->forward(be, &s, 1);
        if (i >= N_PROMPT - 1) {
            const float *x = i < N_PROMPT ? logits + (size_t) i * V : last;
            int          j, best = 0;

            for (j = 1; j < V; j++) {
                best = x[j] > x[best] ? j : best;
            }
            greedy[i - (N_PROMPT - 1)] = best;
            toks[i + 1] = best;
        }
    }
    be->destroy(be);
    free(last);
    return rc;
}


static int
arrays_equal(const moe_model_t *a, const moe_model_t *b, const char **what)
{
    const moe_hparams_t *hp = moe_model_hparams(a);
    const moe_weights_t *x = moe_model_weights(a), *y = moe_model_weights(b);
    size_t D = hp->dim, L = hp->n_layers, E = hp->n_experts;
    size_t Q = (size_t) hp->n_heads * hp->head_dim;
    size_t KV = (size_t) hp->n_kv_heads * hp->head_dim, F = hp->ffn_dim;
    size_t FD = hp->dense_ffn_dim;

#define SAME(f, n)                                                           \
    if ((x->f == NULL) != (y->f == NULL)                                     \
        || (x->f != NULL && memcmp(x->f, y->f, (n) * sizeof(float)) != 0)) { \
        *what = #f;                                                          \
        return 0;                                                            \
    }
    SAME(wq, L * Q * D);
    SAME(wk, L * KV * D);
    SAME(wv, L * KV * D);
    SAME(wo, L * D * Q);
    SAME(w_gate, L * E * F * D);
    SAME(w_up, L * E * F * D);
    SAME(w_down, L * E * D * F);
    SAME(wd_gate, L * FD * D);
    SAME(wd_down, L * D * FD);
    SAME(embed, (size_t) hp->vocab_size * D);
    SAME(lm_head, (size_t) hp->vocab_size * D);
#undef SAME
    return 1;
}


static int
expect_layout(const char *name)
{
    if (strncmp(name, "fp8-tensor", 10) == 0) {
        return MOE_QL_FP8_TENSOR;
    }
    if (strncmp(name, "fp8-block", 9) == 0) {
        return MOE_QL_FP8_BLOCK;
    }
    if (strncmp(name, "ct-fp8-tensor", 13) == 0) {
        return MOE_QL_FP8_TENSOR;
    }
    if (strncmp(name, "ct-fp8-block", 12) == 0) {
        return MOE_QL_FP8_BLOCK;
    }
    if (strncmp(name, "ct-fp8", 6) == 0) {
        return MOE_QL_FP8_CHANNEL;
    }
    if (strncmp(name, "ct4", 3) == 0) {
        return MOE_QL_CT4;
    }
    return strncmp(name, "awq", 3) == 0 ? MOE_QL_AWQ : MOE_QL_GPTQ;
}


static void test_describe(const char *what, const moe_model_t *m);


static void
test_model(const char *name)
{
    char                 dir[700], ref[720], err[1024];
    moe_model_t         *m = NULL, *r = NULL;
    const char          *what = "";
    walk_t               w;
    int32_t              prompt[N_PROMPT], g1[N_GREEDY], g2[N_GREEDY];
    float               *l1, *l2, diff = 0.0f, mx = 0.0f;
    int                  i, V, rc;

    snprintf(dir, sizeof(dir), "%s/%s", qdir, name);
    snprintf(ref, sizeof(ref), "%s/%s.ref", qdir, name);
    rc = moe_model_load_quant(dir, 0, NULL, 0, &m, err, sizeof(err));
    TAP_OK(rc == MOE_OK, "%s: loads on the CPU path%s%s", name,
           rc ? ": " : "", rc ? err : "");
    if (rc != MOE_OK || moe_model_load(ref, 0, &r, err, sizeof(err))
        != MOE_OK)
    {
        TAP_DIAG("%s", err);
        TAP_OK(0, "%s: reference loads", name);
        moe_model_free(m);
        return;
    }
    TAP_OK(arrays_equal(m, r, &what), "%s: fp32 weights bitwise equal to "
           "the dequantized reference (%s)", name, what);

    memset(&w, 0, sizeof(w));
    w.layout_ok = 1;
    w.expect = expect_layout(name);
    w.ignore = strstr(name, "ignore") ? "o_proj" : NULL;
    rc = moe_model_for_each_tensor(m, walk_fn, &w, err, sizeof(err));
    TAP_OK(rc == MOE_OK && w.layout_ok && w.n_quant > 0
           && w.n_quant + w.n_ignored_float == w.n_lin
           && (w.ignore == NULL) == (w.n_ignored_float == 0),
           "%s: the walk gives %d of %d linear pieces quantized (layout %d),"
           " %d kept float by the ignore list", name, w.n_quant, w.n_lin,
           w.expect, w.n_ignored_float);

    {
        packed_t p = { 0, 1, NULL, 0 };

        p.ref = w.expect == MOE_QL_CT4 ? r : NULL;
        rc = moe_model_for_each_tensor_packed(m, packed_fn, &p, err,
                                              sizeof(err));
        TAP_OK(rc == MOE_OK && p.ok && p.n_q == w.n_quant
               && (p.ref == NULL || p.n_f16 == p.n_q),
               "%s: the packed walk hands the %d quantized pieces %s "
               "(data == quant->qweight, dtype %s)", name, p.n_q,
               p.ref != NULL ? "in GPTQ's layout, F16 scales, dequantizing "
               "bit for bit to the reference" : "as the files hold them",
               w.expect <= MOE_QL_FP8_BLOCK ? "F8_E4M3" : "I32");
    }

    test_describe(name, m);

    V = moe_model_hparams(m)->vocab_size;
    for (i = 0; i < N_PROMPT; i++) {
        prompt[i] = (int32_t) ((i * 37 + 11) % V);
    }
    l1 = calloc((size_t) N_PROMPT * V, sizeof(float));
    l2 = calloc((size_t) N_PROMPT * V, sizeof(float));
    rc = run(m, prompt, l1, g1);
    if (rc == MOE_OK) {
        rc = run(r, prompt, l2, g2);
    }
    for (i = 0; i < N_PROMPT * V; i++) {
        diff = fmaxf(diff, fabsf(l1[i] - l2[i]));
        mx = fmaxf(mx, fabsf(l2[i]));
    }
    TAP_OK(rc == MOE_OK && mx > 0 && diff <= 1e-4f * mx,
           "%s: logits at %d positions within 1e-4 of the reference's "
           "(max diff %.3g, max |logit| %.3g)", name, N_PROMPT, diff, mx);
    TAP_OK(rc == MOE_OK && memcmp(g1, g2, sizeof(g1)) == 0,
           "%s: %d greedy tokens equal", name, N_GREEDY);
    free(l1);
    free(l2);
    moe_model_free(m);
    moe_model_free(r);
}


/* ------------------------------------------ the describe-only walk */

/* One piece of a walk, as far as a plan or a size reads it. */
typedef struct {
    const char *name;
    int         kind, layer, expert, dtype, transposed, quant;
    int64_t     rows, cols, ld, q_row0, q_col0;
    const void *data;                   /* float pieces only */
    int         layout, qdtype, sdtype, group_size, n_groups, zero_add;
    int         has_zeros, has_gidx, block_n, block_k;
    int64_t     qrows, qcols, s_rows, s_cols;
} piece_t;

typedef struct {
    piece_t *p;
    int      n, cap;
} pieces_t;


static int
piece_fn(void *ctx, const moe_tensor_ref_t *t)
{
    pieces_t *ps = ctx;
    piece_t  *p;

    if (ps->n == ps->cap) {
        piece_t *np = realloc(ps->p, (size_t) (ps->cap * 2 + 16)
                                     * sizeof(*np));

        if (np == NULL) {
            return MOE_ENOMEM;
        }
        ps->p = np;
        ps->cap = ps->cap * 2 + 16;
    }
    p = &ps->p[ps->n++];
    memset(p, 0, sizeof(*p));
    p->name = t->name;
    p->kind = t->kind;
    p->layer = t->layer;
    p->expert = t->expert;
    p->dtype = t->dtype;
    p->transposed = t->transposed;
    p->rows = t->rows;
    p->cols = t->cols;
    p->ld = t->ld;
    p->q_row0 = t->q_row0;
    p->q_col0 = t->q_col0;
    p->quant = t->quant != NULL;
    if (t->quant == NULL) {
        p->data = t->data;
        return MOE_OK;
    }
    p->layout = t->quant->layout;
    p->qdtype = t->quant->qdtype;
    p->sdtype = t->quant->sdtype;
    p->group_size = t->quant->group_size;
    p->n_groups = t->quant->n_groups;
    p->zero_add = t->quant->zero_add;
    p->has_zeros = t->quant->zeros != NULL;
    p->has_gidx = t->quant->g_idx != NULL;
    p->block_n = t->quant->block_n;
    p->block_k = t->quant->block_k;
    p->qrows = t->quant->rows;
    p->qcols = t->quant->cols;
    p->s_rows = t->quant->s_rows;
    p->s_cols = t->quant->s_cols;
    return MOE_OK;
}


/* The describe-only walk gives the packed walk's pieces, field for field
 * (names by content), one rank and two ranks, expert parallel or not. */
static void
test_describe(const char *what, const moe_model_t *m)
{
    static const int cfg[5][3] = { { 1, 0, 0 }, { 2, 0, 0 }, { 2, 1, 0 },
                                   { 2, 0, 1 }, { 2, 1, 1 } };
    char err[1024] = "";
    int  ok = 1, nq = 0, np = 0, c, i;

    for (c = 0; c < 5 && ok; c++) {
        pieces_t a = { NULL, 0, 0 }, b = { NULL, 0, 0 };
        int      tp = cfg[c][0], rank = cfg[c][1], ep = cfg[c][2];
        int      ra, rb;

        ra = moe_model_for_each_tensor_packed_shard_ep(m, tp, rank, ep,
                                                       piece_fn, &a, err,
                                                       sizeof(err));
        rb = moe_model_for_each_tensor_packed_describe(m, tp, rank, ep,
                                                       piece_fn, &b, err,
                                                       sizeof(err));
        if (ra != rb) {
            TAP_DIAG("%s: tp %d rank %d ep %d: rc %d / %d (%s)", what, tp,
                     rank, ep, ra, rb, err);
            ok = 0;
        }
        ok &= a.n == b.n;
        for (i = 0; ok && ra == MOE_OK && i < a.n; i++) {
            piece_t *x = &a.p[i], *y = &b.p[i];
            int      same = strcmp(x->name, y->name) == 0;
            const void *xd = x->data, *yd = y->data;

            x->name = y->name = NULL;
            x->data = y->data = NULL;
            same &= memcmp(x, y, sizeof(*x)) == 0 && xd == yd;
            if (!same) {
                TAP_DIAG("%s: tp %d rank %d ep %d: piece %d differs (kind "
                         "%d layer %d layout %d / %d sdtype %d / %d)", what,
                         tp, rank, ep, i, x->kind, x->layer, x->layout,
                         y->layout, x->sdtype, y->sdtype);
                ok = 0;
            }
            nq += x->quant;
            np++;
        }
        free(a.p);
        free(b.p);
    }
    TAP_OK(ok && nq > 0, "%s: the describe-only walk gives the packed "
           "walk's pieces field for field (%d pieces, %d quantized, 1 and 2 "
           "ranks, expert parallel or not)", what, np, nq);
}


/* ------------------------------------------------- refusals, YAML key */

static void
expect_fail(const char *dir, const char *quant, const char *what,
    const char *msg, const char *msg2)
{
    moe_model_t *m = NULL;
    char         err[1024] = "";
    int          rc;

    rc = moe_model_load_quant(dir, 0, quant, 1, &m, err, sizeof(err));
    TAP_OK(rc == MOE_EINVAL && strstr(err, msg) != NULL
           && (msg2 == NULL || strstr(err, msg2) != NULL),
           "%s: refused with \"%s\"%s%s (got %d: %s)", what, msg,
           msg2 ? " ... " : "", msg2 ? msg2 : "", rc, err);
    moe_model_free(m);
}


/* dir/config.json: models/localmoe-tiny's with quantization_config qc;
 * the weights of `from` linked in */
static void
make_cfg(const char *dir, const char *from, const char *qc)
{
    char  path[1024], src[1024], *text, *end;
    FILE *f;

    mkdir(dir, 0755);
    text = moe_read_file("models/localmoe-tiny/config.json", NULL);
    end = text != NULL ? strrchr(text, '}') : NULL;
    if (end == NULL) {
        return;
    }
    *end = '\0';
    snprintf(path, sizeof(path), "%s/config.json", dir);
    f = fopen(path, "w");
    if (f != NULL) {
        fprintf(f, "%s, \"quantization_config\": %s }\n", text, qc);
        fclose(f);
    }
    free(text);
    snprintf(path, sizeof(path), "%s/model.safetensors", dir);
    if (realpath(from, src) != NULL) {
        strcat(src, "/model.safetensors");
        unlink(path);
        if (symlink(src, path) != 0) {
            TAP_DIAG("symlink %s: failed", path);
        }
    }
}


static void
test_refusals(void)
{
    char d[700], tmp[600];

    snprintf(d, sizeof(d), "%s/bad-fp8-noscale", qdir);
    expect_fail(d, NULL, "fp8 without weight_scale", "missing tensor '",
                ".weight_scale' (fp8 weight scale)");
    snprintf(d, sizeof(d), "%s/bad-awq-noscale", qdir);
    expect_fail(d, NULL, "AWQ without scales", "missing tensor '",
                ".scales' (quantization_config awq)");
    snprintf(d, sizeof(d), "%s/bad-gptq-gidx", qdir);
    expect_fail(d, NULL, "GPTQ g_idx out of range", ".g_idx': g_idx[0] = ",
                "is out of range [0, ");
    snprintf(d, sizeof(d), "%s/bad-ct4-noscale", qdir);
    expect_fail(d, NULL, "compressed-tensors int4 without weight_scale",
                "missing tensor '", ".weight_scale' (quantization_config "
                "compressed-tensors int4)");
    snprintf(d, sizeof(d), "%s/bad-ct4-gidx", qdir);
    expect_fail(d, NULL, "compressed-tensors int4 g_idx out of range",
                ".weight_g_idx': g_idx[0] = ", "is out of range [0, ");
    snprintf(d, sizeof(d), "%s/bad-ct4-shape", qdir);
    expect_fail(d, NULL, "compressed-tensors int4 weight_shape disagrees",
                ".weight_shape' says the weight is [", "the model needs [");
    snprintf(d, sizeof(d), "%s/bad-awq-scaleshape", qdir);
    expect_fail(d, NULL, "AWQ scales one group short", ".scales' has shape "
                "F16 [", "expected F16 [");

    snprintf(tmp, sizeof(tmp), "%s/tmp-cfg", qdir);
    snprintf(d, sizeof(d), "%s/awq-g32", qdir);
#define CFG(qc, what, m1, m2)                                                \
    do {                                                                     \
        char from_[700];                                                     \
        snprintf(from_, sizeof(from_), "%s", d);                             \
        make_cfg(tmp, from_, qc);                                            \
        expect_fail(tmp, NULL, what, m1, m2);                                \
    } while (0)
    CFG("{\"quant_method\": \"int3\"}", "unknown quant_method",
        "quantization_config: quant_method 'int3' is not supported",
        "config.json");
    CFG("{\"quant_method\": \"awq\", \"bits\": 3, \"group_size\": 32}",
        "AWQ bits 3", "quantization_config: awq bits must be 4 (got 3)",
        NULL);
    CFG("{\"quant_method\": \"gptq\", \"bits\": 8, \"group_size\": 32}",
        "GPTQ bits 8", "quantization_config: gptq bits must be 4 (got 8)",
        NULL);
    CFG("{\"quant_method\": \"awq\", \"bits\": 4, \"group_size\": 48}",
        "group_size 48", "group_size 48 is not supported", NULL);
    CFG("{\"quant_method\": \"awq\", \"bits\": 4, \"group_size\": 128}",
        "K not divisible by the group", "in_features 64 is not divisible "
        "by group_size 128", ".qweight'");
    CFG("{\"quant_method\": \"awq\", \"bits\": 4, \"group_size\": 32, "
        "\"version\": \"gemv\"}", "AWQ gemv", "AWQ version 'gemv' is not "
        "supported", NULL);
    CFG("{\"quant_method\": \"gptq\", \"bits\": 4, \"group_size\": 32}",
        "AWQ tensors under a GPTQ config", "qweight' has shape "
        "I32 [", "expected I32 [");
    snprintf(d, sizeof(d), "%s/gptq-g32-sym", qdir);
    CFG("{\"quant_method\": \"gptq\", \"bits\": 4, \"group_size\": 32, "
        "\"desc_act\": true}", "GPTQ desc_act without g_idx",
        "g_idx' (GPTQ desc_act true)", "missing tensor '");
    CFG("{\"quant_method\": \"fp8\", \"weight_block_size\": [128]}",
        "weight_block_size of one number", "'weight_block_size' must be two "
        "positive integers", NULL);
    CFG("{\"quant_method\": \"compressed-tensors\", \"format\": "
        "\"float-quantized\", \"config_groups\": {\"g\": {\"weights\": "
        "{\"num_bits\": 8, \"type\": \"float\", \"strategy\": \"group\"}}}}",
        "compressed-tensors strategy group", "weights strategy 'group' is "
        "not supported", NULL);
    CFG("{\"quant_method\": \"compressed-tensors\", \"format\": "
        "\"marlin-24\", \"config_groups\": {\"g\": {\"weights\": "
        "{\"num_bits\": 4, \"type\": \"int\"}}}}",
        "compressed-tensors marlin-24", "format 'marlin-24' is not "
        "supported (float-quantized fp8, pack-quantized int4)", NULL);
#define CT4(w, more) "{\"quant_method\": \"compressed-tensors\", "       \
        "\"format\": \"pack-quantized\", \"config_groups\": {\"group_0\": " \
        "{\"targets\": [\"Linear\"], \"weights\": {" w "}" more "}}}"
    CFG(CT4("\"num_bits\": 8, \"type\": \"int\", \"strategy\": "
            "\"channel\"", ""), "pack-quantized int8",
        "pack-quantized weights must be num_bits 4 (int4)", NULL);
    /* 4-bit floats packed the same way (fp4) were taken for int4 */
    CFG(CT4("\"num_bits\": 4, \"type\": \"float\", \"strategy\": "
            "\"group\", \"group_size\": 32", ""), "pack-quantized fp4",
        "pack-quantized weights of type 'float' are not supported (int4)",
        NULL);
    CFG(CT4("\"num_bits\": 4, \"type\": \"int\", \"strategy\": "
            "\"tensor\"", ""), "pack-quantized strategy tensor",
        "int4 weights strategy 'tensor' is not supported (group or "
        "channel)", NULL);
    CFG(CT4("\"num_bits\": 4, \"type\": \"int\", \"strategy\": "
            "\"group\", \"group_size\": 16", ""),
        "pack-quantized group_size 16", "group_size 16 is not supported "
        "(32, 64, 128 or strategy channel)", NULL);
    CFG(CT4("\"num_bits\": 4, \"type\": \"int\", \"strategy\": "
            "\"group\"", ""), "pack-quantized group without a size",
        "strategy group needs an integer group_size", NULL);
    CFG(CT4("\"num_bits\": 4, \"type\": \"int\", \"strategy\": "
            "\"group\", \"group_size\": 32, \"actorder\": \"random\"",
            ""), "pack-quantized actorder random",
        "weights.actorder must be null", NULL);
    CFG(CT4("\"num_bits\": 4, \"type\": \"int\", \"strategy\": "
            "\"group\", \"group_size\": 32",
            ", \"input_activations\": {\"num_bits\": 8, \"type\": "
            "\"int\"}"), "pack-quantized W4A8",
        "(W4A8) are not supported, only W4A16", NULL);
    /* GPTQ tensors under a compressed-tensors int4 config */
    CFG(CT4("\"num_bits\": 4, \"type\": \"int\", \"strategy\": "
            "\"group\", \"group_size\": 32", ""),
        "GPTQ tensors under a pack-quantized config",
        ".weight_packed' (quantization_config compressed-tensors "
        "pack-quantized;", "missing tensor '");
    snprintf(d, sizeof(d), "%s/ct4-g32-sym", qdir);
    CFG(CT4("\"num_bits\": 4, \"type\": \"int\", \"strategy\": "
            "\"group\", \"group_size\": 32, \"symmetric\": false", ""),
        "pack-quantized asymmetric without zero points",
        ".weight_zero_point' (weights.symmetric false)", "missing tensor");
    CFG(CT4("\"num_bits\": 4, \"type\": \"int\", \"strategy\": "
            "\"group\", \"group_size\": 32, \"actorder\": \"group\"", ""),
        "pack-quantized actorder group without g_idx",
        ".weight_g_idx' (weights.actorder group)", "missing tensor");
    CFG(CT4("\"num_bits\": 4, \"type\": \"int\", \"strategy\": "
            "\"group\", \"group_size\": 64", ""),
        "pack-quantized scales of another group size",
        ".weight_scale' has shape BF16 [", "expected F32/BF16/F16 [");
#undef CT4
    CFG("{\"quant_method\": \"compressed-tensors\", \"config_groups\": "
        "{\"g\": {\"weights\": {\"num_bits\": 8, \"type\": \"float\"}}}, "
        "\"ignore\": [\"lm_head\", \"re:.*(o_proj\"]}",
        "compressed-tensors ignore pattern that does not compile",
        "'ignore'[1] is not a valid regular expression: ", "config.json");
    snprintf(d, sizeof(d), "models/localmoe-tiny");
    CFG("{\"quant_method\": \"fp8\"}", "fp8 config over bf16 weights",
        "is BF16, but quantization_config fp8 quantizes '",
        "(not in its ignore list)");
    CFG("{\"quant_method\": \"awq\", \"bits\": 4, \"group_size\": 32}",
        "AWQ config without qweight", "missing tensor '",
        ".qweight' (quantization_config awq;");
#undef CFG

    /* a quantized GPT-2: the message names config.json (it named only
     * the directory; tools/fuzz/fuzz_config.c) */
    {
        moe_model_t *m = NULL;
        char         err[1024] = "", path[700];
        FILE        *f;
        int          rc;

        mkdir(tmp, 0755);
        snprintf(path, sizeof(path), "%s/config.json", tmp);
        f = fopen(path, "w");
        if (f != NULL) {
            fputs("{\"architectures\": [\"GPT2LMHeadModel\"], \"n_embd\": "
                  "64, \"n_layer\": 2, \"n_head\": 4, \"vocab_size\": 512, "
                  "\"quantization_config\": {\"quant_method\": \"fp8\"}}",
                  f);
            fclose(f);
        }
        rc = moe_model_load_config(tmp, 0, &m, err, sizeof(err));
        TAP_OK(rc == MOE_EUNSUPPORTED && strstr(err, path) != NULL
               && strstr(err, "quantized GPT-2 checkpoints are not "
                         "supported") != NULL,
               "quantized GPT-2 refused naming %s (got %d: %s)", path, rc,
               err);
        moe_model_free(m);
        unlink(path);
    }

    /* the YAML key against the checkpoint */
    snprintf(d, sizeof(d), "%s/fp8-tensor", qdir);
    expect_fail(d, "awq", "YAML awq on an fp8 checkpoint",
                "quantization 'awq' was requested, but the checkpoint's "
                "quantization_config quant_method is 'fp8'", NULL);
    snprintf(d, sizeof(d), "%s/ct4-g32-sym", qdir);
    expect_fail(d, "gptq", "YAML gptq on a compressed-tensors int4 "
                "checkpoint", "quant_method is 'compressed-tensors'", NULL);
    snprintf(d, sizeof(d), "%s/awq-g32", qdir);
    expect_fail(d, "gptq", "YAML gptq on an AWQ checkpoint",
                "quant_method is 'awq'", NULL);
    expect_fail(d, "fp8", "YAML fp8 on an AWQ checkpoint",
                "quant_method is 'awq'", NULL);
    expect_fail("models/localmoe-tiny", "awq", "YAML awq on a bf16 "
                "checkpoint", "quantization 'awq' was requested, but the "
                "checkpoint is not quantized", NULL);
}


/* YAML fp8 at load, bit for bit: each quantized piece's scales are
 * amax / 448 of its source row and its codes moe_f32_to_fp8_e4m3(w / s),
 * computed here row by row; big counts the pieces of 2M+ weights (the
 * loader splits those over threads). */
typedef struct {
    const moe_model_t *m;
    int                n, bad, big;
} fp8x_t;


static int
fp8x_fn(void *ctx, const moe_tensor_ref_t *t)
{
    fp8x_t                *x = ctx;
    const moe_qtensor_t   *q = t->quant;
    const moe_st_tensor_t *st;
    int64_t                N, K, n, k;
    float                 *w;
    const uint8_t         *codes;
    const float           *sc;

    if (q == NULL) {
        return MOE_OK;
    }
    N = q->rows;
    K = q->cols;
    st = moe_st_find(moe_model_tensors(x->m), q->name);
    w = malloc((size_t) K * sizeof(float));
    if (st == NULL || w == NULL || q->layout != MOE_QL_FP8_CHANNEL
        || q->sdtype != MOE_DT_F32)
    {
        free(w);
        x->bad++;
        return MOE_OK;
    }
    codes = q->qweight;
    sc = q->scales;
    x->n++;
    x->big += N * K >= (1 << 21);
    for (n = 0; n < N; n++) {
        float amax = 0.0f, s;

        if (moe_st_to_f32(st, n * K, K, w) != MOE_OK) {
            x->bad++;
            break;
        }
        for (k = 0; k < K; k++) {
            amax = fmaxf(amax, fabsf(w[k]));
        }
        s = amax > 0.0f ? amax / 448.0f : 1.0f;
        if (memcmp(&s, &sc[n], sizeof(s)) != 0) {
            x->bad++;
            break;
        }
        for (k = 0; k < K; k++) {
            if (codes[n * K + k] != moe_f32_to_fp8_e4m3(w[k] / s)) {
                x->bad++;
                break;
            }
        }
    }
    free(w);
    return MOE_OK;
}


static void
test_yaml_fp8_exact(void)
{
    moe_model_t *m = NULL;
    char         d[400], err[1024] = "";
    fp8x_t       x = { NULL, 0, 0, 0 };
    int          rc;

    snprintf(d, sizeof(d), "%s/base1024", qdir);
    rc = moe_model_load_quant(d, 0, "fp8", 1, &m, err, sizeof(err));
    if (rc == MOE_OK) {
        x.m = m;
        rc = moe_model_for_each_tensor_packed(m, fp8x_fn, &x, err,
                                              sizeof(err));
    }
    TAP_OK(rc == MOE_OK && x.bad == 0 && x.n >= 10 && x.big >= 6,
           "YAML fp8 at load, dim-1024 layer: every scale and code of %d "
           "pieces (%d of 2M+ weights, split over threads on a machine of "
           "2+ CPUs: %ld online) equal to a row-by-row quantization (%d "
           "bad) %s", x.n, x.big, sysconf(_SC_NPROCESSORS_ONLN), x.bad,
           err);
    moe_model_free(m);
}


static void
test_yaml_ok(void)
{
    moe_model_t         *m = NULL, *f = NULL;
    char                 err[1024] = "", d[700];
    const moe_weights_t *a, *b;
    const moe_hparams_t *hp;
    walk_t               w;
    size_t               n, i, r, K;
    int                  rc, ok = 1, changed = 0;

    snprintf(d, sizeof(d), "%s/awq-g32", qdir);
    rc = moe_model_load_quant(d, 0, "awq", 1, &m, err, sizeof(err));
    TAP_OK(rc == MOE_OK, "YAML awq on an AWQ checkpoint loads %s", err);
    moe_model_free(m);
    snprintf(d, sizeof(d), "%s/ct4-g64-asym-ignore", qdir);
    rc = moe_model_load_quant(d, 0, "compressed-tensors", 1, &m, err,
                              sizeof(err));
    TAP_OK(rc == MOE_OK && moe_model_quant(m)->method == MOE_QM_CT_INT4,
           "YAML compressed-tensors on a pack-quantized int4 checkpoint "
           "loads %s", err);
    moe_model_free(m);
    snprintf(d, sizeof(d), "%s/ct-fp8-channel", qdir);
    rc = moe_model_load_quant(d, 0, "fp8", 1, &m, err, sizeof(err));
    TAP_OK(rc == MOE_OK, "YAML fp8 on a compressed-tensors fp8 checkpoint "
           "loads %s", err);
    moe_model_free(m);

    rc = moe_model_load_quant("models/localmoe-tiny", 0, "fp8", 0, &m, err,
                              sizeof(err));
    TAP_OK(rc == MOE_OK && moe_model_quant(m)->method == MOE_QM_FP8_LOAD,
           "YAML fp8 on the bf16 tiny model quantizes at load %s", err);
    if (rc == MOE_OK) {
        test_describe("YAML fp8 on the bf16 tiny model", m);
    }
    if (rc != MOE_OK
        || moe_model_load("models/localmoe-tiny", 0, &f, err, sizeof(err))
           != MOE_OK)
    {
        moe_model_free(m);
        return;
    }
    hp = moe_model_hparams(m);
    a = moe_model_weights(m);
    b = moe_model_weights(f);
    K = (size_t) hp->dim;
    n = (size_t) hp->n_layers * hp->n_experts * hp->ffn_dim;    /* rows */
    for (r = 0; r < n; r++) {
        float amax = 0.0f;

        for (i = 0; i < K; i++) {
            amax = fmaxf(amax, fabsf(b->w_gate[r * K + i]));
        }
        for (i = 0; i < K; i++) {
            float x = b->w_gate[r * K + i], y = a->w_gate[r * K + i];

            changed += x != y;
            /* e4m3 has 3 mantissa bits: half a step is 2^-4 relative,
             * and values under 2^-6 * scale are spaced 2^-9 * scale */
            ok &= fabsf(x - y) <= fabsf(x) / 16.0f
                                  + amax / 448.0f * ldexpf(1.0f, -10);
        }
    }
    TAP_OK(ok && changed > 0, "YAML fp8: every expert gate weight within "
           "half an fp8 step of the bf16 one (%d of %zu changed)", changed,
           n * K);
    memset(&w, 0, sizeof(w));
    w.layout_ok = 1;
    w.expect = MOE_QL_FP8_CHANNEL;
    rc = moe_model_for_each_tensor(m, walk_fn, &w, err, sizeof(err));
    TAP_OK(rc == MOE_OK && w.layout_ok && w.n_quant == w.n_lin
           && w.n_lin > 0, "YAML fp8: the walk gives all %d linear pieces "
           "fp8 per channel", w.n_lin);
    moe_model_free(m);
    moe_model_free(f);
}


int
main(void)
{
    const char *env = getenv("MOE_QUANT_DIR");
    char        list[300], line[200];
    FILE       *f;

    snprintf(qdir, sizeof(qdir), "%s", env && *env ? env : "build/quant");
    test_fp8();
    test_par();
    test_pack();
    test_dequant();
    test_find_empty();

    snprintf(list, sizeof(list), "%s/MODELS", qdir);
    f = fopen(list, "r");
    if (f == NULL) {
        TAP_OK(0, "%s: no list of quantized test models (run "
               "tools/quant_models.sh %s)", list, qdir);
        TAP_PLAN(tap_n);
    return TAP_DONE();
    }
    while (fgets(line, sizeof(line), f) != NULL) {
        line[strcspn(line, "\n")] = '\0';
        if (line[0] != '\0') {
            test_model(line);
        }
    }
    fclose(f);
    test_refusals();
    test_yaml_ok();
    test_yaml_fp8_exact();
    TAP_PLAN(tap_n);
    return TAP_DONE();
}
