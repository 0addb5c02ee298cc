/*
 * Packed weights of the CUDA backend, host side: plan, layout, slicing
 * (qweights.h).  Plain C: unit-tested without a GPU (t/unit/qweights.c).
 */

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "backends/qweights.h"
#include "model/safetensors.h"


static int
qw_dense_layer(const moe_hparams_t *hp, int l)
{
    return hp->dense_ffn_dim > 0 && l >= 0 && l < MOE_MAX_LAYERS
           && hp->layer_dense[l];
}


void
moe_qw_shape(const moe_hparams_t *hp, int l, int p, moe_qshape_t *s)
{
    int64_t D = hp->dim, Q = (int64_t) hp->n_heads * hp->head_dim;
    int64_t KV = (int64_t) hp->n_kv_heads * hp->head_dim;
    int64_t F = hp->ffn_dim;
    int64_t FS = hp->shared_ffn_dim > 0 ? hp->shared_ffn_dim : 0;
    int64_t FD = hp->dense_ffn_dim > 0 ? hp->dense_ffn_dim : 0;
    int     dense = qw_dense_layer(hp, l), ug = hp->ffn_ungated != 0;
    int     EL = moe_hp_local_experts(hp);

    memset(s, 0, sizeof(*s));
    s->count = 1;
    s->present = 1;
    s->first = p;
    s->n = 1;
    switch (p) {
    case MOE_QP_Q: case MOE_QP_K: case MOE_QP_V:
        s->N = p == MOE_QP_Q ? Q : KV;
        s->K = D;
        s->first = MOE_QP_Q;
        s->n = 3;
        s->grows = Q + 2 * KV;
        s->row0 = p == MOE_QP_Q ? 0 : p == MOE_QP_K ? Q : Q + KV;
        return;
    case MOE_QP_O:
        s->N = D;
        s->K = Q;
        break;
    case MOE_QP_GATE: case MOE_QP_UP:
        s->present = !dense && (p == MOE_QP_UP || !ug);
        s->N = F;
        s->K = D;
        s->count = EL;
        s->first = ug ? MOE_QP_UP : MOE_QP_GATE;
        s->n = ug ? 1 : 2;
        s->grows = ug ? F : 2 * F;
        s->row0 = p == MOE_QP_UP && !ug ? F : 0;
        return;
    case MOE_QP_DOWN:
        s->present = !dense;
        s->N = D;
        s->K = F;
        s->count = EL;
        break;
    case MOE_QP_SGATE: case MOE_QP_SUP:
        s->present = FS > 0 && !dense;
        s->N = FS;
        s->K = D;
        s->first = MOE_QP_SGATE;
        s->n = 2;
        s->grows = 2 * FS;
        s->row0 = p == MOE_QP_SUP ? FS : 0;
        return;
    case MOE_QP_SDOWN:
        s->present = FS > 0 && !dense;
        s->N = D;
        s->K = FS;
        break;
    case MOE_QP_DGATE: case MOE_QP_DUP:
        s->present = dense;
        s->N = FD;
        s->K = D;
        s->first = MOE_QP_DGATE;
        s->n = 2;
        s->grows = 2 * FD;
        s->row0 = p == MOE_QP_DUP ? FD : 0;
        return;
    case MOE_QP_DDOWN:
        s->present = dense;
        s->N = D;
        s->K = FD;
        break;
    default:
        s->present = 0;
        return;
    }
    s->grows = s->N;
}


int
moe_qw_part_of(int kind)
{
    switch (kind) {
    case MOE_WK_WQ:      return MOE_QP_Q;
    case MOE_WK_WK:      return MOE_QP_K;
    case MOE_WK_WV:      return MOE_QP_V;
    case MOE_WK_WO:      return MOE_QP_O;
    case MOE_WK_GATE:    return MOE_QP_GATE;
    case MOE_WK_UP:      return MOE_QP_UP;
    case MOE_WK_DOWN:    return MOE_QP_DOWN;
    case MOE_WK_WS_GATE: return MOE_QP_SGATE;
    case MOE_WK_WS_UP:   return MOE_QP_SUP;
    case MOE_WK_WS_DOWN: return MOE_QP_SDOWN;
    case MOE_WK_WD_GATE: return MOE_QP_DGATE;
    case MOE_WK_WD_UP:   return MOE_QP_DUP;
    case MOE_WK_WD_DOWN: return MOE_QP_DDOWN;
    default:             return -1;
    }
}


void
moe_qw_plan_bf16(moe_qplan_t *plan)
{
    memset(plan, 0, sizeof(*plan));
}


int
moe_qw_format_by_name(const char *name)
{
    if (name == NULL || name[0] == '\0' || strcmp(name, "bf16") == 0) {
        return MOE_WF_BF16;
    }
    if (strcmp(name, "fp8") == 0) {
        return MOE_WF_FP8;
    }
    if (strcmp(name, "awq") == 0) {
        return MOE_WF_AWQ;
    }
    if (strcmp(name, "gptq") == 0) {
        return MOE_WF_GPTQ;
    }
    return -1;
}


const char *
moe_qw_format_name(int wfmt)
{
    static const char *names[MOE_WF_COUNT] = { "bf16", "fp8", "awq", "gptq" };

    return wfmt >= 0 && wfmt < MOE_WF_COUNT ? names[wfmt] : "?";
}


int
moe_qw_plan_uniform(const moe_hparams_t *hp, int wfmt, moe_qplan_t *plan)
{
    moe_qshape_t s;
    moe_qfmt_t  *f;
    int          l, p;

    moe_qw_plan_bf16(plan);
    if (wfmt < 0 || wfmt >= MOE_WF_COUNT) {
        return MOE_EINVAL;
    }
    for (l = 0; l < hp->n_layers && l < MOE_MAX_LAYERS; l++) {
        for (p = 0; p < MOE_QP_N; p++) {
            moe_qw_shape(hp, l, p, &s);
            f = &plan->f[l][p];
            if (!s.present || wfmt == MOE_WF_BF16) {
                continue;
            }
            if (wfmt == MOE_WF_FP8 && s.K % 16 == 0) {
                f->fmt = MOE_WF_FP8;
                f->mode = MOE_QW_FP8_CHANNEL;
            } else if (wfmt != MOE_WF_FP8 && s.N % 8 == 0
                       && s.K % 128 == 0)
            {
                f->fmt = (int8_t) wfmt;
                f->group = 128;
            }
        }
    }
    moe_qw_plan_settle(hp, plan);
    return MOE_OK;
}


void
moe_qw_plan_settle(const moe_hparams_t *hp, moe_qplan_t *plan)
{
    moe_qshape_t s, t;
    int          l, p, i, mixed;

    for (l = 0; l < hp->n_layers && l < MOE_MAX_LAYERS; l++) {
        for (p = 0; p < MOE_QP_N; p++) {
            moe_qw_shape(hp, l, p, &s);
            if (!s.present) {
                memset(&plan->f[l][p], 0, sizeof(moe_qfmt_t));
                continue;
            }
            if (s.first != p) {
                continue;
            }
            mixed = 0;
            for (i = p; i < p + s.n; i++) {
                moe_qw_shape(hp, l, i, &t);
                if (t.present && (plan->f[l][i].fmt == MOE_WF_BF16
                                  || plan->f[l][i].fmt != plan->f[l][p].fmt))
                {
                    mixed = 1;
                }
            }
            if (mixed) {
                for (i = p; i < p + s.n; i++) {
                    memset(&plan->f[l][i], 0, sizeof(moe_qfmt_t));
                }
            }
        }
    }
}


size_t
moe_qw_fp8_scale_count(int mode, int64_t rows, int64_t K)
{
    size_t n = (size_t) rows, k = (size_t) K;

    return mode == MOE_QW_FP8_BLOCK
           ? ((n + MOE_QW_BLOCK - 1) / MOE_QW_BLOCK)
             * ((k + MOE_QW_BLOCK - 1) / MOE_QW_BLOCK)
           : n;
}


int
moe_qw_stacked(const moe_hparams_t *hp, const moe_qplan_t *plan, int l,
    int p)
{
    moe_qshape_t      s, t;
    const moe_qfmt_t *f0, *f;
    int               i;

    if (l < 0 || l >= hp->n_layers || l >= MOE_MAX_LAYERS || p < 0
        || p >= MOE_QP_N)
    {
        return 0;
    }
    moe_qw_shape(hp, l, p, &s);
    if (!s.present || s.n < 2) {
        return 0;
    }
    f0 = &plan->f[l][s.first];
    if (f0->fmt == MOE_WF_BF16 || (f0->fmt == MOE_WF_FP8 && s.K % 16 != 0)) {
        return 0;
    }
    for (i = s.first; i < s.first + s.n; i++) {
        moe_qw_shape(hp, l, i, &t);
        f = &plan->f[l][i];
        if (!t.present || f->fmt != f0->fmt) {
            return 0;
        }
        if (f->fmt == MOE_WF_FP8
            && (f->mode != f0->mode
                || (f->mode == MOE_QW_FP8_BLOCK
                    && (t.N % MOE_QW_BLOCK != 0
                        || t.row0 % MOE_QW_BLOCK != 0))))
        {
            return 0;
        }
        if (f->fmt != MOE_WF_FP8
            && (f->group != f0->group || f->zero_bias != f0->zero_bias
                || f->g_idx || t.N % 8 != 0))
        {
            return 0;
        }
    }
    return 1;
}


void
moe_qw_part_bytes(const moe_qfmt_t *f, int64_t N, int64_t K, int count,
    size_t *w, size_t *scale, size_t *zeros, size_t *scales, size_t *g_idx)
{
    size_t c = (size_t) count, n = (size_t) N, k = (size_t) K;
    size_t G = f->group > 0 ? (size_t) f->group : k;

    *w = *scale = *zeros = *scales = *g_idx = 0;
    switch (f->fmt) {
    case MOE_WF_FP8:
        *w = c * n * k;
        *scale = c * 4 * moe_qw_fp8_scale_count(f->mode, N, K);
        break;
    case MOE_WF_AWQ: case MOE_WF_GPTQ:
        *w = c * k * n / 2;
        *zeros = c * (k / G) * (n / 8) * 4;
        *scales = c * (k / G) * n * 2;
        *g_idx = f->fmt == MOE_WF_GPTQ && f->g_idx ? c * k * 4 : 0;
        break;
    default:
        *w = c * n * k * 2;
        break;
    }
}


static size_t
qw_take(size_t *off, size_t bytes, size_t align)
{
    size_t o = *off;

    if (bytes == 0) {
        return 0;
    }
    *off += (bytes + align - 1) / align * align;
    return o;
}


size_t
moe_qw_layout(const moe_hparams_t *hp, const moe_qplan_t *plan, size_t off,
    size_t align, moe_qoff_t *o)
{
    moe_qshape_t      s;
    const moe_qfmt_t *f;
    moe_qoff_t        x, gw[MOE_QP_N];
    size_t            w, sc, z, ss, gi;
    int               l, p;

    if (align == 0) {
        align = 1;
    }
    for (l = 0; l < hp->n_layers && l < MOE_MAX_LAYERS; l++) {
        memset(gw, 0, sizeof(gw));
        for (p = 0; p < MOE_QP_N; p++) {
            moe_qw_shape(hp, l, p, &s);
            memset(&x, 0, sizeof(x));
            f = &plan->f[l][p];
            if (s.present && f->fmt == MOE_WF_BF16) {
                if (s.first == p) {
                    gw[p].w = qw_take(&off, (size_t) s.count
                                            * (size_t) s.grows
                                            * (size_t) s.K * 2, align);
                }
                x.w = gw[s.first].w + (size_t) s.row0 * (size_t) s.K * 2;
            } else if (s.present && moe_qw_stacked(hp, plan, l, p)) {
                /* the group's tensors as one part of grows outputs */
                if (s.first == p) {
                    moe_qw_part_bytes(f, s.grows, s.K, s.count, &w, &sc, &z,
                                      &ss, &gi);
                    gw[p].w = qw_take(&off, w, align);
                    gw[p].scale = qw_take(&off, sc, align);
                    gw[p].zeros = qw_take(&off, z, align);
                    gw[p].scales = qw_take(&off, ss, align);
                }
                if (f->fmt == MOE_WF_FP8) {
                    /* e4m3 rows row0.. of each expert, their scales */
                    x.w = gw[s.first].w + (size_t) s.row0 * (size_t) s.K;
                    x.scale = gw[s.first].scale + 4 * moe_qw_fp8_scale_count(
                                                  f->mode, s.row0, s.K);
                } else {
                    /* 4-bit: output columns row0.. of every row */
                    x.w = gw[s.first].w + (f->fmt == MOE_WF_AWQ
                                           ? (size_t) s.row0 / 2
                                           : (size_t) s.row0 * 4);
                    x.zeros = gw[s.first].zeros + (size_t) s.row0 / 2;
                    x.scales = gw[s.first].scales + (size_t) s.row0 * 2;
                }
            } else if (s.present) {
                moe_qw_part_bytes(f, s.N, s.K, s.count, &w, &sc, &z, &ss,
                                  &gi);
                x.w = qw_take(&off, w, align);
                x.scale = qw_take(&off, sc, align);
                x.zeros = qw_take(&off, z, align);
                x.scales = qw_take(&off, ss, align);
                x.g_idx = qw_take(&off, gi, align);
            }
            if (o != NULL) {
                o[(size_t) l * MOE_QP_N + p] = x;
            }
        }
    }
    return off;
}


size_t
moe_qw_scratch_bytes(const moe_hparams_t *hp, const moe_qplan_t *plan)
{
    moe_qshape_t s;
    size_t       best = 0, b;
    int          l, p;

    for (l = 0; l < hp->n_layers && l < MOE_MAX_LAYERS; l++) {
        for (p = 0; p < MOE_QP_N; p++) {
            moe_qw_shape(hp, l, p, &s);
            if (!s.present || plan->f[l][p].fmt == MOE_WF_BF16) {
                continue;
            }
            if (moe_qw_stacked(hp, plan, l, p)) {
                /* a stacked group: dequantized one expert at a time */
                b = (size_t) s.grows * (size_t) s.K * 2;
            } else {
                b = (size_t) s.count * (size_t) s.N * (size_t) s.K * 2;
            }
            best = b > best ? b : best;
        }
    }
    return best;
}


/* ------------------------------------------------------------ slicing */

static int32_t
qw_i32(const void *p, int64_t i)
{
    int32_t v;

    memcpy(&v, (const char *) p + 4 * i, sizeof(v));
    return v;
}


int
moe_qw_gidx_needed(const moe_qtensor_t *q)
{
    int64_t k;

    if (q->layout != MOE_QL_GPTQ || q->g_idx == NULL || q->group_size <= 0) {
        return 0;
    }
    for (k = 0; k < q->cols; k++) {
        if (qw_i32(q->g_idx, k) != k / q->group_size) {
            return 1;
        }
    }
    return 0;
}


static int
qw_fallback(moe_qslice_t *s, char *why, size_t whylen, const char *fmt,
    long long a, long long b)
{
    memset(&s->f, 0, sizeof(s->f));
    if (why != NULL && whylen > 0) {
        snprintf(why, whylen, fmt, a, b);
    }
    return MOE_OK;
}


int
moe_qw_slice(const moe_qtensor_t *q, int64_t r0, int64_t N, int64_t c0,
    int64_t K, moe_qslice_t *s, char *why, size_t whylen, char *err,
    size_t errlen)
{
    const char *cq = (const char *) q->qweight;
    int64_t     R = q->rows, C = q->cols, G, NW, g0, ng;
    int         gneed;

    memset(s, 0, sizeof(*s));
    s->q = q;
    s->r0 = r0;
    s->c0 = c0;
    s->N = N;
    s->K = K;
    if (why != NULL && whylen > 0) {
        why[0] = '\0';
    }
    if (r0 < 0 || c0 < 0 || N <= 0 || K <= 0 || r0 + N > R || c0 + K > C) {
        moe_errf(err, errlen, "'%s': slice [%lld, +%lld) x [%lld, +%lld) "
                 "outside %lld x %lld", q->name, (long long) r0,
                 (long long) N, (long long) c0, (long long) K, (long long) R,
                 (long long) C);
        return MOE_EINVAL;
    }

    switch (q->layout) {
    case MOE_QL_FP8_TENSOR: case MOE_QL_FP8_CHANNEL: case MOE_QL_FP8_BLOCK:
        if (q->qdtype != MOE_DT_F8_E4M3) {
            return qw_fallback(s, why, whylen, "fp8 e5m2 weights%.0lld%.0lld",
                               0, 0);
        }
        if (K % 16 != 0) {
            return qw_fallback(s, why, whylen, "in_features %lld not a "
                               "multiple of 16%.0lld", K, 0);
        }
        s->f.fmt = MOE_WF_FP8;
        s->f.mode = MOE_QW_FP8_CHANNEL;
        s->n_scales = N;
        if (q->layout == MOE_QL_FP8_BLOCK) {
            if (q->block_n != MOE_QW_BLOCK || q->block_k != MOE_QW_BLOCK) {
                return qw_fallback(s, why, whylen, "fp8 blocks %lldx%lld "
                                   "(the kernels take 128x128)",
                                   q->block_n, q->block_k);
            }
            if (r0 % MOE_QW_BLOCK != 0 || c0 % MOE_QW_BLOCK != 0
                || (N % MOE_QW_BLOCK != 0 && r0 + N != R)
                || (K % MOE_QW_BLOCK != 0 && c0 + K != C))
            {
                moe_errf(err, errlen, "tensor parallel: fp8 tensor '%s' "
                         "(%lld x %lld, 128x128 scale blocks) would split at "
                         "rows %lld..%lld, columns %lld..%lld: not on block "
                         "boundaries", q->name, (long long) R, (long long) C,
                         (long long) r0, (long long) (r0 + N),
                         (long long) c0, (long long) (c0 + K));
                return MOE_EUNSUPPORTED;
            }
            s->f.mode = MOE_QW_FP8_BLOCK;
            s->n_scales = ((N + MOE_QW_BLOCK - 1) / MOE_QW_BLOCK)
                          * ((K + MOE_QW_BLOCK - 1) / MOE_QW_BLOCK);
        }
        s->w.base = cq + r0 * C + c0;
        s->w.rows = N;
        s->w.bytes = K;
        s->w.pitch = C;
        return MOE_OK;

    case MOE_QL_AWQ: case MOE_QL_GPTQ:
        G = q->group_size > 0 ? q->group_size : C;
        if (q->sdtype != MOE_DT_F16 || q->zeros == NULL) {
            return qw_fallback(s, why, whylen, "4-bit scales not F16 or no "
                               "qzeros%.0lld%.0lld", 0, 0);
        }
        if (C % G != 0) {
            return qw_fallback(s, why, whylen, "in_features %lld not a "
                               "multiple of group_size %lld", C, G);
        }
        if (G != 32 && G != 64 && G != 128 && G != C) {
            return qw_fallback(s, why, whylen, "group_size %lld (the "
                               "kernels take 32, 64, 128 or in_features "
                               "%lld)", G, C);
        }
        gneed = moe_qw_gidx_needed(q);
        if (r0 % 8 != 0 || N % 8 != 0) {
            moe_errf(err, errlen, "tensor parallel: 4-bit tensor '%s' (%lld "
                     "x %lld) would split its output features at %lld..%lld:"
                     " not on 8-column words", q->name, (long long) R,
                     (long long) C, (long long) r0, (long long) (r0 + N));
            return MOE_EUNSUPPORTED;
        }
        if (gneed && (c0 != 0 || K != C)) {
            moe_errf(err, errlen, "tensor parallel: GPTQ tensor '%s' has an "
                     "act-order g_idx (desc_act): it cannot split along its "
                     "%lld input features", q->name, (long long) C);
            return MOE_EUNSUPPORTED;
        }
        if (c0 % G != 0 || K % G != 0) {
            moe_errf(err, errlen, "tensor parallel: 4-bit tensor '%s' (%lld "
                     "x %lld, group_size %lld) would split its input features "
                     "at %lld..%lld: not on group boundaries", q->name,
                     (long long) R, (long long) C, (long long) G,
                     (long long) c0, (long long) (c0 + K));
            return MOE_EUNSUPPORTED;
        }
        NW = R / 8;
        g0 = c0 / G;
        ng = K / G;
        s->f.fmt = q->layout == MOE_QL_AWQ ? MOE_WF_AWQ : MOE_WF_GPTQ;
        s->f.group = (int16_t) G;
        s->f.zero_bias = (int8_t) (q->layout == MOE_QL_GPTQ ? q->zero_add
                                                            : 0);
        s->f.g_idx = (int8_t) gneed;
        if (q->layout == MOE_QL_AWQ) {
            s->w.base = cq + (c0 * NW + r0 / 8) * 4;
            s->w.rows = K;
            s->w.bytes = N / 2;
            s->w.pitch = NW * 4;
        } else {
            s->w.base = cq + ((c0 / 8) * R + r0) * 4;
            s->w.rows = K / 8;
            s->w.bytes = N * 4;
            s->w.pitch = R * 4;
            s->g_idx = gneed ? q->g_idx : NULL;
        }
        s->zeros.base = (const char *) q->zeros + (g0 * NW + r0 / 8) * 4;
        s->zeros.rows = ng;
        s->zeros.bytes = N / 2;
        s->zeros.pitch = NW * 4;
        s->scales.base = (const char *) q->scales + (g0 * R + r0) * 2;
        s->scales.rows = ng;
        s->scales.bytes = N * 2;
        s->scales.pitch = R * 2;
        return MOE_OK;

    default:
        moe_errf(err, errlen, "'%s': unknown quantized layout %d", q->name,
                 (int) q->layout);
        return MOE_EINVAL;
    }
}


void
moe_qw_fp8_scales(const moe_qslice_t *s, float *out)
{
    const moe_qtensor_t *q = s->q;
    int64_t              i, j, nbr, nbc;

    if (q->layout == MOE_QL_FP8_BLOCK && s->f.mode == MOE_QW_FP8_BLOCK) {
        nbr = (s->N + MOE_QW_BLOCK - 1) / MOE_QW_BLOCK;
        nbc = (s->K + MOE_QW_BLOCK - 1) / MOE_QW_BLOCK;
        for (i = 0; i < nbr; i++) {
            for (j = 0; j < nbc; j++) {
                out[i * nbc + j] = moe_q_scale_at(q->scales, q->sdtype,
                    (s->r0 / MOE_QW_BLOCK + i) * q->s_cols
                    + s->c0 / MOE_QW_BLOCK + j);
            }
        }
        return;
    }
    for (i = 0; i < s->N; i++) {
        out[i] = moe_q_scale_at(q->scales, q->sdtype,
                                q->layout == MOE_QL_FP8_TENSOR ? 0
                                                               : s->r0 + i);
    }
}


/* ------------------------------------------------------ a model's plan */

typedef struct {
    const moe_hparams_t *hp;
    moe_qplan_t         *plan;
    uint8_t            (*seen)[MOE_QP_N];
    int                  n_fallback;
    char                 first[256];
    char                *err;
    size_t               errlen;
} qw_pm_t;


static int
qw_plan_piece(void *ctx, const moe_tensor_ref_t *t)
{
    qw_pm_t      *c = ctx;
    moe_qslice_t  s;
    moe_qfmt_t   *f;
    char          why[160];
    int           p = moe_qw_part_of(t->kind), l = t->layer, rc;

    if (p < 0 || l < 0 || l >= MOE_MAX_LAYERS) {
        return MOE_OK;
    }
    f = &c->plan->f[l][p];
    if (t->quant == NULL) {
        memset(f, 0, sizeof(*f));       /* a float piece: bf16 */
        c->seen[l][p] = 1;
        return MOE_OK;
    }
    rc = moe_qw_slice(t->quant, t->q_row0, t->rows, t->q_col0, t->cols, &s,
                      why, sizeof(why), c->err, c->errlen);
    if (rc != MOE_OK) {
        return rc;
    }
    if (s.f.fmt == MOE_WF_BF16) {
        if (c->n_fallback++ == 0) {
            snprintf(c->first, sizeof(c->first), "%s: %s", t->name, why);
        }
    }
    if (!c->seen[l][p]) {
        *f = s.f;
        c->seen[l][p] = 1;
    } else if (f->fmt != s.f.fmt || f->mode != s.f.mode
               || f->group != s.f.group || f->zero_bias != s.f.zero_bias)
    {
        memset(f, 0, sizeof(*f));
    } else {
        f->g_idx |= s.f.g_idx;
    }
    return MOE_OK;
}


/* Whether layer l's experts are one fused gate_up_proj tensor (the walk
 * emits them float even under YAML fp8: m_walk_experts). */
static int
qw_fused_experts(const moe_model_t *m, int l)
{
    const moe_st_set_t *st = moe_model_tensors(m);
    char                name[160];
    int                 p, w;

    for (p = 0; st != NULL && p < 2; p++) {
        for (w = 0; w < 2; w++) {
            snprintf(name, sizeof(name), "model.layers.%d.%s.experts."
                     "gate_up_proj%s", l, p ? "mlp" : "block_sparse_moe",
                     w ? ".weight" : "");
            if (moe_st_find(st, name) != NULL) {
                return 1;
            }
        }
    }
    return 0;
}


int
moe_qw_plan_model(const moe_model_t *m, int tp, int rank, int ep,
    moe_qplan_t *plan, char *err, size_t errlen)
{
    const moe_qconfig_t *q = moe_model_quant(m);
    moe_hparams_t        rhp;
    qw_pm_t              c;
    int                  rc;

    moe_qw_plan_bf16(plan);
    rc = moe_hparams_shard_ep(moe_model_hparams(m), tp > 1 ? tp : 1,
                              tp > 1 ? rank : 0, ep && tp > 1, &rhp, err,
                              errlen);
    if (rc != MOE_OK || q->method == MOE_QM_NONE) {
        return rc;
    }
    if (q->method == MOE_QM_FP8_LOAD) {
        /* quantized per channel at load: every linear weight the walk
         * loads by name (fused expert tensors stay float there, so bf16
         * here too: the CPU backend's values) */
        rc = moe_qw_plan_uniform(&rhp, MOE_WF_FP8, plan);
        for (int l = 0; rc == MOE_OK && l < rhp.n_layers
                        && l < MOE_MAX_LAYERS; l++)
        {
            if (qw_fused_experts(m, l)) {
                memset(&plan->f[l][MOE_QP_GATE], 0, sizeof(moe_qfmt_t));
                memset(&plan->f[l][MOE_QP_UP], 0, sizeof(moe_qfmt_t));
                memset(&plan->f[l][MOE_QP_DOWN], 0, sizeof(moe_qfmt_t));
            }
        }
        return rc;
    }
    memset(&c, 0, sizeof(c));
    c.hp = &rhp;
    c.plan = plan;
    c.err = err;
    c.errlen = errlen;
    c.seen = calloc(MOE_MAX_LAYERS, sizeof(*c.seen));
    if (c.seen == NULL) {
        moe_errf(err, errlen, "out of memory");
        return MOE_ENOMEM;
    }
    rc = moe_model_for_each_tensor_packed_describe(m, tp, rank, ep && tp > 1,
                                                   qw_plan_piece, &c, err,
                                                   errlen);
    free(c.seen);
    if (rc != MOE_OK) {
        moe_qw_plan_bf16(plan);
        return rc;
    }
    moe_qw_plan_settle(&rhp, plan);
    if (c.n_fallback > 0) {
        moe_log(MOE_LOG_INFO, "cuda backend: %d quantized tensor(s) "
                "dequantized to bf16 at upload (the kernels do not take "
                "them; first %s)", c.n_fallback, c.first);
    }
    return MOE_OK;
}
