/*
 * Packed weights of the CUDA backend, host side (engine/backends/
 * qweights.h), without a GPU:
 *  - slicing: fp8 (per tensor, per channel, 128x128 blocks), AWQ and GPTQ
 *    (with and without an act-order g_idx) tensors made here are cut to
 *    tensor-parallel slices along N and K; the slice's spans, copied out
 *    and dequantized as a tensor of their own, equal that block of the
 *    whole tensor's dequantization exactly; cuts off the format's
 *    boundaries are refused (MOE_EUNSUPPORTED), layouts the kernels do not
 *    take fall back to bf16 with a reason;
 *  - plan and layout: a uniform fp8 / awq plan of a Mixtral-shaped hparams
 *    takes the bytes the formats say (weights + scales + zeros), less than
 *    bf16; fp8 q|k|v and gate|up groups are stacked per expert (block
 *    scales only on 128-row boundaries); every expert's rows and scales
 *    of every part lie inside the layout, none overlapping; a group with
 *    one bf16 part is all bf16; the scratch is the largest part in bf16;
 *  - plans of the tiny quantized checkpoints ($MOE_QUANT_DIR, from
 *    tools/quant_models.sh; skipped without them): which parts stay packed,
 *    fallbacks (fp8 blocks 32x16, an ignored o_proj), tensor parallel 2
 *    accepted or refused on group boundaries / act-order.
 */

#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "tap.h"
#include "moe.h"
#include "backends/qweights.h"
#include "model/model.h"
#include "model/quant.h"


static uint64_t rng = 88172645463325252ULL;


static uint32_t
rnd(void)
{
    rng ^= rng << 13;
    rng ^= rng >> 7;
    rng ^= rng << 17;
    return (uint32_t) (rng >> 11);
}


static float
rndf(void)
{
    return (float) (rnd() % 20001) / 10000.0f - 1.0f;
}


/* copy a span's rows contiguously */
static void *
span_copy(const moe_qspan_t *sp)
{
    char    *out = malloc((size_t) (sp->rows * sp->bytes) + 1);
    int64_t  i;

    for (i = 0; i < sp->rows; i++) {
        memcpy(out + i * sp->bytes, (const char *) sp->base + i * sp->pitch,
               (size_t) sp->bytes);
    }
    return out;
}


/* the slice as a tensor of its own, dequantized, against the block of
 * the whole tensor's dequantization; 1 when equal */
static int
slice_matches(const moe_qtensor_t *q, const moe_qslice_t *s)
{
    moe_qtensor_t  t;
    float         *full, *part, *sc = NULL;
    void          *w, *z = NULL, *ss = NULL;
    int64_t        r, c;
    int            ok = 1;

    full = malloc((size_t) (q->rows * q->cols) * sizeof(float));
    part = malloc((size_t) (s->N * s->K) * sizeof(float));
    if (moe_qtensor_dequant(q, full) != MOE_OK) {
        free(full);
        free(part);
        return 0;
    }
    memset(&t, 0, sizeof(t));
    t.name = "slice";
    t.rows = s->N;
    t.cols = s->K;
    w = span_copy(&s->w);
    t.qweight = w;
    t.qdtype = q->qdtype;
    if (s->f.fmt == MOE_WF_FP8) {
        sc = malloc((size_t) s->n_scales * sizeof(float));
        moe_qw_fp8_scales(s, sc);
        t.scales = sc;
        t.sdtype = MOE_DT_F32;
        if (s->f.mode == MOE_QW_FP8_BLOCK) {
            t.layout = MOE_QL_FP8_BLOCK;
            t.block_n = t.block_k = MOE_QW_BLOCK;
            t.s_rows = (s->N + 127) / 128;
            t.s_cols = (s->K + 127) / 128;
        } else {
            t.layout = MOE_QL_FP8_CHANNEL;
            t.s_rows = s->N;
            t.s_cols = 1;
        }
    } else {
        t.layout = s->f.fmt == MOE_WF_AWQ ? MOE_QL_AWQ : MOE_QL_GPTQ;
        z = span_copy(&s->zeros);
        ss = span_copy(&s->scales);
        t.zeros = z;
        t.scales = ss;
        t.sdtype = MOE_DT_F16;
        t.group_size = s->f.group;
        t.n_groups = (int) s->zeros.rows;
        t.s_rows = s->zeros.rows;
        t.s_cols = s->N;
        t.g_idx = s->g_idx;
        t.zero_add = s->f.zero_bias;
    }
    if (moe_qtensor_dequant(&t, part) != MOE_OK) {
        ok = 0;
    }
    for (r = 0; ok && r < s->N; r++) {
        for (c = 0; c < s->K; c++) {
            if (part[r * s->K + c]
                != full[(s->r0 + r) * q->cols + s->c0 + c])
            {
                ok = 0;
                break;
            }
        }
    }
    free(full);
    free(part);
    free(w);
    free(sc);
    free(z);
    free(ss);
    return ok;
}


typedef struct {
    moe_qtensor_t  q;
    uint8_t       *w8;
    int32_t       *w4, *z4, *gidx;
    float         *sf;
    uint16_t      *s16;
} tensor_t;


static void
make_fp8(tensor_t *x, int layout, int64_t N, int64_t K, int bn, int bk)
{
    int64_t i, ns;

    memset(x, 0, sizeof(*x));
    x->w8 = malloc((size_t) (N * K));
    for (i = 0; i < N * K; i++) {
        x->w8[i] = moe_f32_to_fp8_e4m3(rndf() * 400.0f);
    }
    ns = layout == MOE_QL_FP8_TENSOR ? 1 : layout == MOE_QL_FP8_CHANNEL ? N
         : ((N + bn - 1) / bn) * ((K + bk - 1) / bk);
    x->sf = malloc((size_t) ns * sizeof(float));
    for (i = 0; i < ns; i++) {
        x->sf[i] = 0.001f + 0.01f * (float) (rnd() % 100) / 100.0f;
    }
    x->q.layout = layout;
    x->q.name = "fp8";
    x->q.rows = N;
    x->q.cols = K;
    x->q.qweight = x->w8;
    x->q.qdtype = MOE_DT_F8_E4M3;
    x->q.scales = x->sf;
    x->q.sdtype = MOE_DT_F32;
    x->q.block_n = bn;
    x->q.block_k = bk;
    x->q.s_rows = layout == MOE_QL_FP8_BLOCK ? (N + bn - 1) / bn : ns;
    x->q.s_cols = layout == MOE_QL_FP8_BLOCK ? (K + bk - 1) / bk : 1;
}


static void
make_q4(tensor_t *x, int layout, int64_t N, int64_t K, int G, int act)
{
    static const uint16_t f16s[4] = { 0x2000, 0x2400, 0x2800, 0x1c00 };
    int64_t ng = K / G, i, nw = K * N / 8;

    memset(x, 0, sizeof(*x));
    x->w4 = malloc((size_t) nw * 4);
    for (i = 0; i < nw; i++) {
        x->w4[i] = (int32_t) rnd();
    }
    x->z4 = malloc((size_t) (ng * N / 8) * 4);
    for (i = 0; i < ng * N / 8; i++) {
        x->z4[i] = (int32_t) rnd();
    }
    x->s16 = malloc((size_t) (ng * N) * 2);
    for (i = 0; i < ng * N; i++) {
        x->s16[i] = f16s[rnd() % 4];
    }
    x->q.layout = layout;
    x->q.name = layout == MOE_QL_AWQ ? "awq" : "gptq";
    x->q.rows = N;
    x->q.cols = K;
    x->q.qweight = x->w4;
    x->q.qdtype = MOE_DT_I32;
    x->q.zeros = x->z4;
    x->q.scales = x->s16;
    x->q.sdtype = MOE_DT_F16;
    x->q.s_rows = ng;
    x->q.s_cols = N;
    x->q.group_size = G;
    x->q.n_groups = (int) ng;
    x->q.zero_add = layout == MOE_QL_GPTQ;
    if (layout == MOE_QL_GPTQ) {
        x->gidx = malloc((size_t) K * 4);
        for (i = 0; i < K; i++) {
            x->gidx[i] = (int32_t) (act ? rnd() % ng : i / G);
        }
        x->q.g_idx = x->gidx;
    }
}


static void
free_tensor(tensor_t *x)
{
    free(x->w8);
    free(x->w4);
    free(x->z4);
    free(x->gidx);
    free(x->sf);
    free(x->s16);
}


/* slice (r0, N, c0, K): rc wanted, and the dequantization check */
static void
check_slice(const char *what, const moe_qtensor_t *q, int64_t r0,
    int64_t N, int64_t c0, int64_t K, int want_rc, int want_fmt)
{
    moe_qslice_t s;
    char         why[160], err[256];
    int          rc;

    err[0] = '\0';
    rc = moe_qw_slice(q, r0, N, c0, K, &s, why, sizeof(why), err,
                      sizeof(err));
    if (want_rc != MOE_OK) {
        TAP_OK(rc == want_rc && err[0] != '\0', "%s: refused (%s)", what,
               err);
        return;
    }
    TAP_OK(rc == MOE_OK && s.f.fmt == want_fmt, "%s: format %s%s%s", what,
           moe_qw_format_name(s.f.fmt), why[0] ? ": " : "", why);
    if (rc == MOE_OK && s.f.fmt != MOE_WF_BF16) {
        TAP_OK(slice_matches(q, &s), "%s: slice dequantizes to the block "
               "of the whole", what);
    }
}


static void
test_slices(void)
{
    tensor_t x;

    make_fp8(&x, MOE_QL_FP8_CHANNEL, 48, 64, 0, 0);
    check_slice("fp8 channel whole", &x.q, 0, 48, 0, 64, MOE_OK, MOE_WF_FP8);
    check_slice("fp8 channel rows 24..48", &x.q, 24, 24, 0, 64, MOE_OK,
                MOE_WF_FP8);
    check_slice("fp8 channel cols 32..64", &x.q, 0, 48, 32, 32, MOE_OK,
                MOE_WF_FP8);
    check_slice("fp8 channel K 24 (not % 16)", &x.q, 0, 48, 0, 24, MOE_OK,
                MOE_WF_BF16);
    free_tensor(&x);

    make_fp8(&x, MOE_QL_FP8_TENSOR, 32, 64, 0, 0);
    check_slice("fp8 per tensor -> channel, rows 16..32", &x.q, 16, 16, 0,
                64, MOE_OK, MOE_WF_FP8);
    free_tensor(&x);

    make_fp8(&x, MOE_QL_FP8_BLOCK, 384, 256, 128, 128);
    check_slice("fp8 block whole", &x.q, 0, 384, 0, 256, MOE_OK,
                MOE_WF_FP8);
    check_slice("fp8 block rows 128..384", &x.q, 128, 256, 0, 256, MOE_OK,
                MOE_WF_FP8);
    check_slice("fp8 block cols 128..256", &x.q, 0, 384, 128, 128, MOE_OK,
                MOE_WF_FP8);
    check_slice("fp8 block rows 192.. (off a block)", &x.q, 192, 192, 0,
                256, MOE_EUNSUPPORTED, 0);
    check_slice("fp8 block cols 64..128 (off a block)", &x.q, 0, 384, 64, 64,
                MOE_EUNSUPPORTED, 0);
    free_tensor(&x);

    make_fp8(&x, MOE_QL_FP8_BLOCK, 200, 96, 128, 128);
    check_slice("fp8 block ragged edge", &x.q, 0, 200, 0, 96, MOE_OK,
                MOE_WF_FP8);
    free_tensor(&x);

    make_fp8(&x, MOE_QL_FP8_BLOCK, 64, 64, 32, 16);
    check_slice("fp8 blocks 32x16 -> bf16", &x.q, 0, 64, 0, 64, MOE_OK,
                MOE_WF_BF16);
    free_tensor(&x);

    make_q4(&x, MOE_QL_AWQ, 64, 128, 32, 0);
    check_slice("awq whole", &x.q, 0, 64, 0, 128, MOE_OK, MOE_WF_AWQ);
    check_slice("awq rows 32..64", &x.q, 32, 32, 0, 128, MOE_OK, MOE_WF_AWQ);
    check_slice("awq cols 64..128", &x.q, 0, 64, 64, 64, MOE_OK,
                MOE_WF_AWQ);
    check_slice("awq rows 4.. (off a word)", &x.q, 4, 32, 0, 128,
                MOE_EUNSUPPORTED, 0);
    check_slice("awq cols 16..48 (off a group)", &x.q, 0, 64, 16, 32,
                MOE_EUNSUPPORTED, 0);
    x.q.sdtype = MOE_DT_BF16;
    check_slice("awq bf16 scales -> bf16", &x.q, 0, 64, 0, 128, MOE_OK,
                MOE_WF_BF16);
    free_tensor(&x);

    make_q4(&x, MOE_QL_GPTQ, 64, 128, 32, 0);
    TAP_OK(!moe_qw_gidx_needed(&x.q), "gptq g_idx k / G is not kept");
    check_slice("gptq rows 32..64", &x.q, 32, 32, 0, 128, MOE_OK,
                MOE_WF_GPTQ);
    check_slice("gptq cols 64..128", &x.q, 0, 64, 64, 64, MOE_OK,
                MOE_WF_GPTQ);
    free_tensor(&x);

    make_q4(&x, MOE_QL_GPTQ, 64, 128, 32, 1);
    TAP_OK(moe_qw_gidx_needed(&x.q), "gptq act-order g_idx is kept");
    check_slice("gptq act-order rows 32..64", &x.q, 32, 32, 0, 128, MOE_OK,
                MOE_WF_GPTQ);
    check_slice("gptq act-order cols 64..128", &x.q, 0, 64, 64, 64,
                MOE_EUNSUPPORTED, 0);
    free_tensor(&x);
}


static void
mixtral_hp(moe_hparams_t *hp)
{
    memset(hp, 0, sizeof(*hp));
    hp->dim = 4096;
    hp->n_layers = 4;
    hp->n_heads = 32;
    hp->n_kv_heads = 8;
    hp->head_dim = 128;
    hp->ffn_dim = 14336;
    hp->vocab_size = 32000;
    hp->n_experts = 8;
    hp->top_k = 2;
}


/* Every packed part's byte ranges lie in [lo, hi) and overlap no
 * other's: fp8 each expert's rows and scales; 4-bit each expert's first
 * and last row of qweight, qzeros and scales (a stacked part's rows are
 * its columns of the group's rows). */
typedef struct { size_t a, b; } rng_t;

static int
cmp_rng(const void *x, const void *y)
{
    const rng_t *p = x, *q = y;

    return p->a < q->a ? -1 : p->a > q->a;
}


static void
add_rows(rng_t *r, size_t *n, size_t base, size_t pitch, size_t rows,
    size_t bytes)
{
    if (*n + 2 > 16384 || bytes == 0) {
        return;
    }
    r[*n].a = base;
    r[*n].b = base + bytes;
    (*n)++;
    if (rows > 1) {
        r[*n].a = base + (rows - 1) * pitch;
        r[*n].b = r[*n].a + bytes;
        (*n)++;
    }
}


static int
check_disjoint(const moe_hparams_t *hp, const moe_qplan_t *plan,
    const moe_qoff_t *o, size_t lo, size_t hi)
{
    rng_t        *r = malloc(sizeof(*r) * 16384);
    size_t        n = 0, i, ld, N, K, KG, ns, ss;
    moe_qshape_t  sh;
    int           l, p, e, st, ok = 1;

    for (l = 0; l < hp->n_layers; l++) {
        for (p = 0; p < MOE_QP_N; p++) {
            const moe_qoff_t *x = &o[l * MOE_QP_N + p];
            const moe_qfmt_t *f = &plan->f[l][p];

            moe_qw_shape(hp, l, p, &sh);
            if (!sh.present || f->fmt == MOE_WF_BF16) {
                continue;
            }
            st = moe_qw_stacked(hp, plan, l, p);
            N = (size_t) sh.N;
            K = (size_t) sh.K;
            ld = st ? (size_t) sh.grows : N;
            for (e = 0; e < sh.count; e++) {
                if (f->fmt == MOE_WF_FP8) {
                    ns = moe_qw_fp8_scale_count(f->mode, sh.N, sh.K);
                    ss = moe_qw_fp8_scale_count(f->mode, (int64_t) ld,
                                                sh.K);
                    add_rows(r, &n, x->w + e * ld * K, K, N, K);
                    add_rows(r, &n, x->scale + e * ss * 4, 0, 1, ns * 4);
                    continue;
                }
                KG = K / (size_t) f->group;
                if (f->fmt == MOE_WF_AWQ) {
                    add_rows(r, &n, x->w + e * K * ld / 2, ld / 2, K, N / 2);
                } else {
                    add_rows(r, &n, x->w + e * K * ld / 2, ld * 4, K / 8,
                             N * 4);
                }
                add_rows(r, &n, x->zeros + e * KG * ld / 2, ld / 2, KG,
                         N / 2);
                add_rows(r, &n, x->scales + e * KG * ld * 2, ld * 2, KG,
                         N * 2);
            }
        }
    }
    qsort(r, n, sizeof(*r), cmp_rng);
    for (i = 0; i < n; i++) {
        ok = ok && r[i].a >= lo && r[i].b <= hi
             && (i == 0 || r[i].a >= r[i - 1].b);
    }
    free(r);
    return ok && n > 0;
}


static void
test_layout(void)
{
    moe_hparams_t  hp;
    moe_qplan_t   *bf = malloc(sizeof(*bf)), *f8 = malloc(sizeof(*f8));
    moe_qplan_t   *aw = malloc(sizeof(*aw));
    moe_qoff_t    *o;
    moe_qshape_t   sh;
    size_t         tb, tf, ta, w, sc, z, ss, gi, want;
    int            l, p, ok;

    mixtral_hp(&hp);
    moe_qw_plan_bf16(bf);
    TAP_OK(moe_qw_plan_uniform(&hp, MOE_WF_FP8, f8) == MOE_OK
           && moe_qw_plan_uniform(&hp, MOE_WF_AWQ, aw) == MOE_OK
           && moe_qw_plan_uniform(&hp, 9, aw) == MOE_EINVAL
           && moe_qw_plan_uniform(&hp, MOE_WF_AWQ, aw) == MOE_OK,
           "uniform plans (unknown format refused)");
    tb = moe_qw_layout(&hp, bf, 0, 256, NULL);
    tf = moe_qw_layout(&hp, f8, 0, 256, NULL);
    ta = moe_qw_layout(&hp, aw, 0, 256, NULL);
    /* per layer: q k v o 4096 x (4096 + 2 x 1024 + 4096), experts 8 x 3 x
     * 14336 x 4096 */
    want = 0;
    for (l = 0; l < 4; l++) {
        for (p = 0; p < MOE_QP_N; p++) {
            moe_qw_shape(&hp, l, p, &sh);
            if (sh.present) {
                want += (size_t) sh.count * sh.N * sh.K
                        + (size_t) sh.count * sh.N * 4;
            }
        }
    }
    TAP_OK(tf == want, "fp8 layout: 1 byte a weight + fp32 channel scales "
           "(%zu, want %zu)", tf, want);
    TAP_OK(tb > tf,
           "bf16 layout larger than fp8 (%.2f GB vs %.2f GB)", tb / 1e9,
           tf / 1e9);
    TAP_OK(tf * 100 / tb >= 50 && tf * 100 / tb <= 51,
           "fp8 is about half of bf16 (%zu%%)", tf * 100 / tb);
    TAP_OK(ta * 100 / tb >= 25 && ta * 100 / tb <= 28,
           "awq g128 is about a quarter of bf16 (%zu%%)", ta * 100 / tb);
    moe_qw_part_bytes(&aw->f[0][MOE_QP_DOWN], 4096, 14336, 8, &w, &sc, &z,
                      &ss, &gi);
    TAP_OK(w == 8u * 4096 * 14336 / 2 && z == 8u * 112 * 512 * 4
           && ss == 8u * 112 * 4096 * 2 && sc == 0 && gi == 0,
           "awq down part bytes: qweight, qzeros, scales");
    TAP_OK(moe_qw_scratch_bytes(&hp, f8) == (size_t) 8 * 14336 * 4096 * 2
           && moe_qw_scratch_bytes(&hp, bf) == 0,
           "scratch: one layer's expert projection in bf16; none for bf16");

    /* offsets: every expert's rows and scales of every part inside the
     * layout and disjoint from all others; stacked groups (q|k|v and
     * gate|up here: fp8 per channel, K % 16 == 0) at their rows */
    o = calloc((size_t) 4 * MOE_QP_N, sizeof(*o));
    tf = moe_qw_layout(&hp, f8, 1024, 256, o);
    TAP_OK(moe_qw_stacked(&hp, f8, 0, MOE_QP_Q)
           && moe_qw_stacked(&hp, f8, 0, MOE_QP_V)
           && moe_qw_stacked(&hp, f8, 0, MOE_QP_UP)
           && !moe_qw_stacked(&hp, f8, 0, MOE_QP_O)
           && !moe_qw_stacked(&hp, f8, 0, MOE_QP_DOWN)
           && moe_qw_stacked(&hp, aw, 0, MOE_QP_Q)
           && moe_qw_stacked(&hp, aw, 3, MOE_QP_UP)
           && !moe_qw_stacked(&hp, aw, 0, MOE_QP_O)
           && !moe_qw_stacked(&hp, bf, 0, MOE_QP_UP),
           "fp8 and awq q|k|v and gate|up stacked; o, down and bf16 not");
    TAP_OK(check_disjoint(&hp, f8, o, 1024, tf),
           "fp8 parts: every expert's rows and scales inside the layout, "
           "none overlapping");
    TAP_OK(o[MOE_QP_UP].w == o[MOE_QP_GATE].w + (size_t) 14336 * 4096
           && o[MOE_QP_UP].scale == o[MOE_QP_GATE].scale + (size_t) 14336 * 4
           && o[MOE_QP_K].w == o[MOE_QP_Q].w + (size_t) 4096 * 4096
           && o[MOE_QP_V].scale == o[MOE_QP_Q].scale + (size_t) 5120 * 4
           && o[MOE_QP_GATE].w % 256 == 0 && o[MOE_QP_GATE].scale % 256 == 0,
           "stacked fp8: up at row F of each expert's gate|up, v at row "
           "Q + KV of q|k|v, scales alike");
    {
        /* 128x128 blocks stack on 128-row boundaries only */
        moe_qplan_t *bk = malloc(sizeof(*bk));
        moe_hparams_t h2 = hp;

        memcpy(bk, f8, sizeof(*bk));
        for (l = 0; l < 4; l++) {
            for (p = 0; p < MOE_QP_N; p++) {
                bk->f[l][p].mode = MOE_QW_FP8_BLOCK;
            }
        }
        tf = moe_qw_layout(&hp, bk, 1024, 256, o);
        ok = moe_qw_stacked(&hp, bk, 1, MOE_QP_GATE)
             && check_disjoint(&hp, bk, o, 1024, tf)
             && o[MOE_QP_UP].scale == o[MOE_QP_GATE].scale
                                      + (size_t) (14336 / 128) * 32 * 4;
        h2.n_kv_heads = 1;          /* k, v 64 rows: off a block */
        h2.head_dim = 64;
        ok = ok && !moe_qw_stacked(&h2, bk, 0, MOE_QP_Q)
             && moe_qw_stacked(&h2, bk, 0, MOE_QP_GATE);
        bk->f[2][MOE_QP_UP].mode = MOE_QW_FP8_CHANNEL;
        ok = ok && !moe_qw_stacked(&hp, bk, 2, MOE_QP_GATE);
        TAP_OK(ok, "fp8 blocks: stacked when every part is on 128-row "
               "boundaries and the modes agree");
        free(bk);
    }
    /* 4-bit: a part's columns of the group's rows */
    ta = moe_qw_layout(&hp, aw, 1024, 256, o);
    TAP_OK(check_disjoint(&hp, aw, o, 1024, ta),
           "awq parts: every expert's rows of qweight, qzeros and scales "
           "inside the layout, none overlapping");
    TAP_OK(o[MOE_QP_UP].w == o[MOE_QP_GATE].w + 14336 / 2
           && o[MOE_QP_UP].zeros == o[MOE_QP_GATE].zeros + 14336 / 2
           && o[MOE_QP_UP].scales == o[MOE_QP_GATE].scales + 14336 * 2
           && o[MOE_QP_V].w == o[MOE_QP_Q].w + 5120 / 2,
           "stacked awq: up's columns at F of gate|up's rows, v's at Q + KV");
    {
        moe_qplan_t *gq = malloc(sizeof(*gq));

        TAP_OK(moe_qw_plan_uniform(&hp, MOE_WF_GPTQ, gq) == MOE_OK
               && moe_qw_stacked(&hp, gq, 0, MOE_QP_GATE)
               && (ta = moe_qw_layout(&hp, gq, 1024, 256, o)) > 0
               && check_disjoint(&hp, gq, o, 1024, ta)
               && o[MOE_QP_UP].w == o[MOE_QP_GATE].w + (size_t) 14336 * 4,
               "stacked gptq: qweight columns at F * 4 bytes, none "
               "overlapping");
        gq->f[1][MOE_QP_UP].g_idx = 1;
        gq->f[2][MOE_QP_K].group = 64;
        TAP_OK(!moe_qw_stacked(&hp, gq, 1, MOE_QP_GATE)
               && !moe_qw_stacked(&hp, gq, 2, MOE_QP_Q)
               && moe_qw_stacked(&hp, gq, 2, MOE_QP_GATE),
               "gptq: a part with g_idx or another group size keeps its "
               "group apart");
        free(gq);
    }

    /* settle: a bf16 k in an fp8 q|k|v group makes the group bf16 */
    f8->f[1][MOE_QP_K].fmt = MOE_WF_BF16;
    moe_qw_plan_settle(&hp, f8);
    TAP_OK(f8->f[1][MOE_QP_Q].fmt == MOE_WF_BF16
           && f8->f[1][MOE_QP_V].fmt == MOE_WF_BF16
           && f8->f[1][MOE_QP_O].fmt == MOE_WF_FP8
           && f8->f[0][MOE_QP_Q].fmt == MOE_WF_FP8,
           "a group with a bf16 part is bf16; other groups kept");
    /* bf16 group parts share the stacked rows */
    (void) moe_qw_layout(&hp, f8, 0, 256, o);
    TAP_OK(o[MOE_QP_N + MOE_QP_K].w == o[MOE_QP_N + MOE_QP_Q].w
                                       + (size_t) 4096 * 4096 * 2
           && o[MOE_QP_N + MOE_QP_V].w == o[MOE_QP_N + MOE_QP_K].w
                                          + (size_t) 1024 * 4096 * 2,
           "bf16 q|k|v stacked: k and v at their rows");
    TAP_OK(moe_qw_format_by_name("fp8") == MOE_WF_FP8
           && moe_qw_format_by_name("") == MOE_WF_BF16
           && moe_qw_format_by_name(NULL) == MOE_WF_BF16
           && moe_qw_format_by_name("gptq") == MOE_WF_GPTQ
           && moe_qw_format_by_name("int3") == -1,
           "format names");
    free(o);
    free(bf);
    free(f8);
    free(aw);
}


/* plan of build/quant/<name> for tp / ep: rc, and the plan */
static int
model_plan(const char *qdir, const char *name, int tp, int ep,
    moe_qplan_t *plan, char *err, size_t errlen)
{
    char         dir[512];
    moe_model_t *m = NULL;
    int          rc;

    snprintf(dir, sizeof(dir), "%s/%s", qdir, name);
    rc = moe_model_load_quant(dir, 0, NULL, 1, &m, err, errlen);
    if (rc == MOE_OK) {
        rc = moe_qw_plan_model(m, tp, tp > 1 ? 1 : 0, ep, plan, err,
                               errlen);
    }
    moe_model_free(m);
    return rc;
}


static void
test_models(const char *qdir)
{
    moe_qplan_t *p = malloc(sizeof(*p));
    char         err[512];
    int          rc;

    rc = model_plan(qdir, "fp8-tensor", 1, 0, p, err, sizeof(err));
    TAP_OK(rc == MOE_OK && p->f[0][MOE_QP_Q].fmt == MOE_WF_FP8
           && p->f[1][MOE_QP_DOWN].fmt == MOE_WF_FP8
           && p->f[1][MOE_QP_GATE].mode == MOE_QW_FP8_CHANNEL,
           "fp8-tensor: packed fp8, channel scales (%s)", rc ? err : "ok");
    rc = model_plan(qdir, "fp8-tensor", 2, 0, p, err, sizeof(err));
    TAP_OK(rc == MOE_OK && p->f[0][MOE_QP_O].fmt == MOE_WF_FP8,
           "fp8-tensor tp 2: packed (%s)", rc ? err : "ok");
    rc = model_plan(qdir, "fp8-block-32x16", 1, 0, p, err, sizeof(err));
    TAP_OK(rc == MOE_OK && p->f[0][MOE_QP_Q].fmt == MOE_WF_BF16
           && p->f[1][MOE_QP_UP].fmt == MOE_WF_BF16,
           "fp8-block-32x16: dequantized to bf16 at upload");
    rc = model_plan(qdir, "ct-fp8-ignore", 1, 0, p, err, sizeof(err));
    TAP_OK(rc == MOE_OK && p->f[0][MOE_QP_O].fmt == MOE_WF_BF16
           && p->f[0][MOE_QP_Q].fmt == MOE_WF_FP8,
           "ct-fp8-ignore: the ignored o_proj bf16, q fp8");
    rc = model_plan(qdir, "fp8-block-128", 1, 0, p, err, sizeof(err));
    TAP_OK(rc == MOE_OK && p->f[0][MOE_QP_DOWN].fmt == MOE_WF_FP8
           && p->f[0][MOE_QP_DOWN].mode == MOE_QW_FP8_BLOCK
           && (p->f[1][MOE_QP_DDOWN].fmt == MOE_WF_FP8
               || p->f[0][MOE_QP_DDOWN].fmt == MOE_WF_FP8),
           "fp8-block-128: 128x128 block scales kept (%s)",
           rc ? err : "ok");
    rc = model_plan(qdir, "awq-g32", 1, 0, p, err, sizeof(err));
    TAP_OK(rc == MOE_OK && p->f[0][MOE_QP_GATE].fmt == MOE_WF_AWQ
           && p->f[0][MOE_QP_GATE].group == 32,
           "awq-g32: packed, group 32");
    rc = model_plan(qdir, "awq-g32", 2, 0, p, err, sizeof(err));
    TAP_OK(rc == MOE_OK && p->f[0][MOE_QP_O].fmt == MOE_WF_AWQ,
           "awq-g32 tp 2: o_proj K 32 splits on groups (%s)",
           rc ? err : "ok");
    rc = model_plan(qdir, "awq-g64", 2, 0, p, err, sizeof(err));
    TAP_OK(rc == MOE_EUNSUPPORTED && strstr(err, "group") != NULL,
           "awq-g64 tp 2: refused off group boundaries (%s)", err);
    rc = model_plan(qdir, "awq-g64", 2, 1, p, err, sizeof(err));
    TAP_OK(rc == MOE_EUNSUPPORTED,
           "awq-g64 tp 2 ep: attention still splits o_proj: refused");
    rc = model_plan(qdir, "gptq-g32-asym-act", 2, 0, p, err, sizeof(err));
    TAP_OK(rc == MOE_EUNSUPPORTED && strstr(err, "desc_act") != NULL,
           "gptq act-order tp 2: refused (%s)", err);
    rc = model_plan(qdir, "gptq-g32-asym-act", 1, 0, p, err, sizeof(err));
    TAP_OK(rc == MOE_OK && p->f[0][MOE_QP_Q].fmt == MOE_WF_GPTQ
           && p->f[0][MOE_QP_Q].g_idx && p->f[0][MOE_QP_Q].zero_bias == 1,
           "gptq act-order: packed with g_idx, v1 zeros");
    rc = model_plan(qdir, "gptq-g32-sym", 2, 1, p, err, sizeof(err));
    TAP_OK(rc == MOE_OK && p->f[0][MOE_QP_DOWN].fmt == MOE_WF_GPTQ,
           "gptq-g32-sym tp 2 ep: packed (%s)", rc ? err : "ok");
    free(p);
}


int
main(void)
{
    const char *qdir = getenv("MOE_QUANT_DIR");
    char        probe[512];

    test_slices();
    test_layout();
    snprintf(probe, sizeof(probe), "%s/fp8-tensor/config.json",
             qdir != NULL ? qdir : "build/quant");
    if (qdir != NULL && access(probe, R_OK) == 0) {
        test_models(qdir);
    } else {
        TAP_DIAG("no $MOE_QUANT_DIR/fp8-tensor: model plans skipped");
    }
    TAP_PLAN(tap_n);
    return TAP_DONE();
}
