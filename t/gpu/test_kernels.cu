/*
 * Checks every CUDA kernel launcher against a straightforward fp32 CPU
 * reference on fresh random inputs, outputs poisoned (NaN) before each run:
 * embedding gather, add+RMSNorm (with and without the residual, gathered
 * rows), RoPE + paged K/V write, paged attention (decode and prefill, MHA
 * and GQA, several head dims, sliding window, shuffled block tables,
 * garbage in positions past each query), SiLU*up, routing (softmax/top-k/
 * renormalise), permute/count/gather/un-permute, the one-launch permute,
 * the router + top-k + permutation of moe_cuda_route_permute bit for bit
 * those of moe_cuda_route then moe_cuda_moe_permute (the fused top-k +
 * permute launch up to 32 tokens, the separate ones above), decode's norm
 * + router of one token in one launch (moe_cuda_norm_route1) bit for bit
 * the add + norm launch followed by moe_cuda_route_permute, the top-k
 * with one expert a lane (E <= 32) bit for bit the rounds of warp
 * argmax (planted ties), the dense GEMVs with dense_pre (fp8 and 4-bit
 * weights loaded before the PDL wait) equal to dense_pre 0 while the
 * kernel before writes their input late, the grouped tensor-core GEMV
 * (gathered rows, empty groups, several passes, fused SiLU), cuBLAS
 * GEMM (fp32 and bf16 out, beta), fp32->bf16 conversion and the random
 * fill; the architecture pieces of arch.h
 * (LayerNorm, bias add, per-head RMSNorm, SiLU/GELU with biases, gated
 * and ungated, the sigmoid-gated shared-expert add, learned positions),
 * raw top-k routing and RoPE-less K/V write; the row argmax (greedy
 * sampling: vocabularies 512, 32000, 128256 and an odd 50257 with a row
 * stride, planted ties within a thread, a warp and across warps, coarse
 * values with ties everywhere, all-equal rows, n_valid limits that cut
 * off the maximum) against the host's first-maximum scan.  Attention covers all
 * kernels: the key-split decode kernels (decode and short prefills:
 * contexts 1 to 2100 around the tile and split edges, one sequence (most
 * splits) and batches, windows, groups 1/2/4/6/8, head dims 8-256; each
 * case runs twice on one workspace so a split counter left non-zero
 * fails), where head dims 64 / 128 reach the tensor-core decode kernel by
 * default; then both decode kernels side by side (tuning att_decode_tc
 * 1 / 0) on bf16 and e4m3 caches, contexts 1 to 33000, 1 and 64
 * sequences, 1 to 64 splits; the tensor-core decode kernel with
 * att_early 1 (one token: its positions, table and earlier keys read
 * before the PDL wait) at contexts around the tile, warp-range and split
 * edges, both caches; and the prefill kernels (more than 1024
 * token x kv-head pairs): the warpgroup kernel (the default) and the
 * mma.sync kernel (record att_prefill_wg 0) on the same cases, the SIMT
 * kernel, and the e4m3-cache warpgroup kernel (record att_prefill_wg8 1)
 * on an e4m3 cache.
 * Thresholds: relative L2 error 1e-5 for fp32-exact paths, 1e-2 where the
 * output is bf16.  TAP; skips when there is no CUDA device.
 */

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cublas_v2.h>

#include "gpu_tap.h"
#include "gpu_util.h"

extern "C" {
#include "tap.h"
}
#include "arch.h"
#include "argmax.h"
#include "attention.h"
#include "embed.h"
#include "fp8.h"
#include "gemm.h"
#include "init.h"
#include "moe_gemv.h"
#include "moe_permute.h"
#include "moe_route.h"
#include "moe_route.cuh"            /* the two top-k device paths */
#include "norm_route.h"
#include "quant_gemv.h"
#include "rmsnorm.h"
#include "tuning.h"
#include "rope.h"
#include "silu_mul.h"

#define F32_TOL 1e-5
#define BF_TOL  1e-2


static void
test_embed(void)
{
    int       V = 97, D = 72, T = 23;
    float    *tab = (float *) malloc(sizeof(float) * V * D);
    uint16_t *bits = (uint16_t *) malloc(2 * V * D);
    int32_t   tok[23];
    float    *ref = (float *) malloc(sizeof(float) * T * D);
    float    *out = (float *) malloc(sizeof(float) * T * D);

    gu_fill_bf(tab, bits, (size_t) V * D, 2.0f);
    for (int t = 0; t < T; t++) {
        tok[t] = (int32_t) (gu_rand() % V);
        memcpy(ref + t * D, tab + tok[t] * D, sizeof(float) * D);
    }
    void *d_tab = gu_up(bits, 2 * V * D), *d_tok = gu_up(tok, sizeof(tok));
    float *d_x = (float *) gu_dev(sizeof(float) * T * D);
    int rc = moe_cuda_embed((int32_t *) d_tok, T, (moe_bf16_t *) d_tab, D,
                            d_x, 0);
    int ok = gu_sync_ok(rc, "embed");

    gu_down(out, d_x, sizeof(float) * T * D);
    double e = gu_relerr(out, ref, (size_t) T * D);
    TAP_OK(ok && e <= 1e-7, "embed gather exact (err %.2e)", e);
    cudaFree(d_tab); cudaFree(d_tok); cudaFree(d_x);
    free(tab); free(bits); free(ref); free(out);
}


static void
ref_rmsnorm(float *o, const float *x, const float *w, int D, float eps)
{
    double ss = 0;

    for (int d = 0; d < D; d++) {
        ss += (double) x[d] * x[d];
    }
    float inv = 1.0f / sqrtf((float) (ss / D) + eps);
    for (int d = 0; d < D; d++) {
        o[d] = w[d] * (x[d] * inv);
    }
}


static void
test_rmsnorm_d(int with_delta, int with_rows, int D)
{
    int    N = 37, n = with_rows ? 11 : N;
    float  eps = 1e-5f;
    float *x = (float *) malloc(sizeof(float) * N * D);
    float *dl = (float *) malloc(sizeof(float) * N * D);
    float *w = (float *) malloc(sizeof(float) * D);
    float *xr = (float *) malloc(sizeof(float) * N * D);
    float *ref = (float *) malloc(sizeof(float) * n * D);
    float *outf = (float *) malloc(sizeof(float) * n * D);
    float *outb = (float *) malloc(sizeof(float) * n * D);
    float *xo = (float *) malloc(sizeof(float) * N * D);
    uint16_t *ob = (uint16_t *) malloc(2 * n * D);
    int32_t rows[11];

    gu_fill(x, (size_t) N * D, 3.0f);
    gu_fill(dl, (size_t) N * D, 1.0f);
    gu_fill(w, D, 1.0f);
    for (int i = 0; i < 11; i++) {
        rows[i] = (i * 7 + 3) % N;        /* distinct */
    }
    memcpy(xr, x, sizeof(float) * N * D);
    for (int i = 0; i < n; i++) {
        int r = with_rows ? rows[i] : i;

        if (with_delta) {
            for (int d = 0; d < D; d++) {
                xr[r * D + d] = x[r * D + d] + dl[r * D + d];
            }
        }
        ref_rmsnorm(ref + i * D, xr + r * D, w, D, eps);
    }
    float *d_x = (float *) gu_up(x, sizeof(float) * N * D);
    float *d_dl = (float *) gu_up(dl, sizeof(float) * N * D);
    float *d_w = (float *) gu_up(w, sizeof(float) * D);
    int32_t *d_rows = (int32_t *) gu_up(rows, sizeof(rows));
    void *d_ob = gu_dev(2 * n * D);
    float *d_of = (float *) gu_dev(sizeof(float) * n * D);
    int rc = moe_cuda_add_rmsnorm(d_x, with_delta ? d_dl : NULL,
                                  with_rows ? d_rows : NULL, n, D, d_w, eps,
                                  (moe_bf16_t *) d_ob, d_of, 0);
    int ok = gu_sync_ok(rc, "rmsnorm");

    gu_down(outf, d_of, sizeof(float) * n * D);
    gu_down(ob, d_ob, 2 * n * D);
    gu_down(xo, d_x, sizeof(float) * N * D);
    gu_bf_to_f(outb, ob, (size_t) n * D);
    double ef = gu_relerr(outf, ref, (size_t) n * D);
    double eb = gu_relerr(outb, ref, (size_t) n * D);
    double ex = gu_relerr(xo, xr, (size_t) N * D);
    TAP_OK(ok && ef <= F32_TOL && eb <= BF_TOL && ex <= 1e-7,
           "add_rmsnorm D %d delta=%d rows=%d (fp32 %.2e, bf16 %.2e, "
           "x %.2e)", D, with_delta, with_rows, ef, eb, ex);
    cudaFree(d_x); cudaFree(d_dl); cudaFree(d_w); cudaFree(d_rows);
    cudaFree(d_ob); cudaFree(d_of);
    free(x); free(dl); free(w); free(xr); free(ref); free(outf); free(outb);
    free(xo); free(ob);
}


/* D 200: the register kernel with 1 float4 per thread; 4096 (mixtral) and
 * 14000 (4 per thread, a partial last one); 130: D % 4 != 0, the loop
 * kernel */
static void
test_rmsnorm(int with_delta, int with_rows)
{
    test_rmsnorm_d(with_delta, with_rows, 200);
}


static void
ref_rope(float *v, int hd, int pos, float theta, float attn)
{
    int half = hd / 2;

    for (int i = 0; i < half; i++) {
        float inv = 1.0f / powf(theta, (float) (2 * i) / (float) hd);
        float ang = (float) pos * inv;
        float c = cosf(ang) * attn, s = sinf(ang) * attn;
        float x1 = v[i], x2 = v[i + half];

        v[i] = x1 * c - x2 * s;
        v[i + half] = x2 * c + x1 * s;
    }
}


/* theta <= 0: no rotation; per_token: the bases go per token (dynamic
 * NTK scaling: token t's base theta + 1000 t) instead of the table.  T
 * tokens: from 64 the launcher puts several heads in one block
 * (rope_shape), below one per block. */
static void
test_rope_t(int T, int nh, int nkv, int hd, float theta, int per_token,
    float attn)
{
    /* slots (t * 5 + 2) mod nblk * bs: distinct while 5 does not divide
     * nblk * bs */
    int    bs = 4, nblk = T < 60 ? 16 : (T + 3) / 4 + 2, kvd = nkv * hd;

    nblk += nblk * bs % 5 == 0;
    int    ld = (nh + 2 * nkv) * hd;
    float *qkv = (float *) malloc(sizeof(float) * T * ld);
    float *ref = (float *) malloc(sizeof(float) * T * ld);
    float *out = (float *) malloc(sizeof(float) * T * ld);
    size_t cache_n = (size_t) nblk * 2 * bs * kvd;
    uint16_t *cache = (uint16_t *) malloc(2 * cache_n);
    int32_t *pos = (int32_t *) malloc(sizeof(int32_t) * T);
    int32_t *slot = (int32_t *) malloc(sizeof(int32_t) * T);
    float   *base = (float *) malloc(sizeof(float) * T);
    float   inv[512];
    double  ek = 0, ev = 0, nk = 0, nv = 0;

    for (int i = 0; i < hd / 2; i++) {
        inv[i] = 1.0f / powf(theta, (float) (2 * i) / (float) hd);
    }

    gu_fill(qkv, (size_t) T * ld, 1.0f);
    memcpy(ref, qkv, sizeof(float) * T * ld);
    for (int t = 0; t < T; t++) {
        pos[t] = (int32_t) (gu_rand() % 4000);
        slot[t] = (int32_t) ((t * 5 + 2) % (nblk * bs));   /* distinct */
        base[t] = per_token ? theta + 1000.0f * (float) t : theta;
        for (int h = 0; theta > 0 && h < nh + nkv; h++) {
            ref_rope(ref + t * ld + h * hd, hd, pos[t], base[t], attn);
        }
    }
    float *d_qkv = (float *) gu_up(qkv, sizeof(float) * T * ld);
    int32_t *d_pos = (int32_t *) gu_up(pos, sizeof(int32_t) * T);
    int32_t *d_slot = (int32_t *) gu_up(slot, sizeof(int32_t) * T);
    void *d_cache = gu_dev(2 * cache_n);
    float *d_inv = (float *) gu_up(inv, sizeof(float) * (hd / 2));
    float *d_base = (float *) gu_up(base, sizeof(float) * T);
    int rc = moe_cuda_rope_kv(d_qkv, ld, T, nh, nkv, hd, d_pos, d_slot,
                              theta > 0 ? d_inv : NULL,
                              per_token ? d_base : NULL, attn,
                              (moe_bf16_t *) d_cache, bs, 0);
    int ok = gu_sync_ok(rc, "rope_kv");

    gu_down(out, d_qkv, sizeof(float) * T * ld);
    gu_down(cache, d_cache, 2 * cache_n);
    double eq = gu_relerr(out, ref, (size_t) T * ld);
    for (int t = 0; t < T; t++) {
        int b = slot[t] / bs, o = slot[t] % bs;

        for (int d = 0; d < kvd; d++) {
            float kr = ref[t * ld + nh * hd + d];
            float vr = ref[t * ld + (nh + nkv) * hd + d];
            float kg = gu_bf2f(cache[((size_t) (b * 2) * bs + o) * kvd + d]);
            float vg = gu_bf2f(cache[((size_t) (b * 2 + 1) * bs + o) * kvd
                                     + d]);

            ek += (double) (kg - kr) * (kg - kr);
            nk += (double) kr * kr;
            ev += (double) (vg - vr) * (vg - vr);
            nv += (double) vr * vr;
            if (isnan(kg) || isnan(vg)) {
                ek = NAN;
            }
        }
    }
    ek = sqrt(ek / nk);
    ev = sqrt(ev / nv);
    /* positions up to 4000 rad: device and host sinf/cosf differ by ulps */
    TAP_OK(ok && eq <= 1e-4 && ek <= BF_TOL && ev <= BF_TOL,
           "rope_kv %d tokens heads %d/%d hd %d%s attn %.2f (q+k %.2e, "
           "cache k %.2e v %.2e)", T, nh, nkv, hd,
           per_token ? " per-token bases" : "", attn, eq, ek, ev);
    cudaFree(d_inv); cudaFree(d_base);
    cudaFree(d_qkv); cudaFree(d_pos); cudaFree(d_slot); cudaFree(d_cache);
    free(qkv); free(ref); free(out); free(cache);
    free(pos); free(slot); free(base);
}


static void
test_rope(int nh, int nkv, int hd, float theta, int per_token, float attn)
{
    test_rope_t(19, nh, nkv, hd, theta, per_token, attn);
}


/*
 * How test_attention_v calls the launcher: att_tune NULL and att_fp8 0:
 * moe_cuda_attention with the default record (decode with head_dim 64 /
 * 128: the tensor-core decode kernel); otherwise moe_cuda_attention_ex
 * with that record (att_decode_tc 0: the SIMT decode kernel; att_split_bps:
 * the split grid) and, att_fp8 1, an e4m3 cache holding e4m3(x / 0.5) for
 * K and e4m3(x / 0.25) for V (the reference then uses those values).
 */
static const moe_cuda_tuning_t *att_tune = NULL;
static int                      att_fp8 = 0;
static const char              *att_tc_name = "wg";   /* labels */

#define ATT_KSC 0.5f
#define ATT_VSC 0.25f


/*
 * Attention over ns sequences; seq s has len[s] cached positions and its
 * last nq[s] positions are the queries (decode: prefill 0, 1 query;
 * prefill 1: up to 70; prefill > 1: up to that many, so a chunk with
 * pos > 0 when len[s] > prefill, the whole prompt otherwise).
 * The workspace is poisoned except for its counters (ws_init); the call
 * runs twice on it, the output poisoned before each, and both results
 * must match the reference: the second run fails if the first left a
 * split counter non-zero.
 */
static void
test_attention_v(int nh, int nkv, int hd, int window, int prefill, int ns,
    const int *len, const char *what)
{
    int     bs = 16, nq[64], bt_off[64];
    int     kvd = nkv * hd, ld = (nh + 2 * nkv) * hd, grp = nh / nkv;
    int     nblk = 0, T = 0, maxlen = 0;

    for (int s = 0; s < ns; s++) {
        int cap = prefill > 1 ? prefill : 70;

        nq[s] = prefill ? (len[s] < cap ? len[s] : cap) : 1;
        bt_off[s] = nblk;
        nblk += (len[s] + bs - 1) / bs + 1;     /* one spare: garbage */
        T += nq[s];
        maxlen = len[s] > maxlen ? len[s] : maxlen;
    }
    int32_t *bt = (int32_t *) malloc(sizeof(int32_t) * nblk);
    for (int i = 0; i < nblk; i++) {
        bt[i] = i;
    }
    for (int i = nblk - 1; i > 0; i--) {          /* shuffle */
        int j = (int) (gu_rand() % (uint32_t) (i + 1)), x = bt[i];

        bt[i] = bt[j];
        bt[j] = x;
    }
    size_t    cache_n = (size_t) nblk * 2 * bs * kvd;
    float    *cache = (float *) malloc(sizeof(float) * cache_n);
    uint16_t *cbits = (uint16_t *) malloc(2 * cache_n);
    float    *qkv = (float *) malloc(sizeof(float) * T * ld);
    float    *ref = (float *) malloc(sizeof(float) * T * nh * hd);
    float    *out = (float *) malloc(sizeof(float) * T * nh * hd);
    uint16_t *obits = (uint16_t *) malloc(2 * T * nh * hd);
    int32_t  *tpos = (int32_t *) malloc(sizeof(int32_t) * T);
    int32_t  *tseq = (int32_t *) malloc(sizeof(int32_t) * T);
    float    *sc = (float *) malloc(sizeof(float) * (maxlen + 64));

    /* everything random, including the positions past each query */
    gu_fill_bf(cache, cbits, cache_n, 2.0f);
    if (att_fp8) {                  /* the e4m3 cache, in cbits' bytes */
        uint8_t *c8 = (uint8_t *) cbits;

        for (size_t i = 0; i < cache_n; i++) {
            float sc = (i / ((size_t) bs * kvd)) % 2 ? ATT_VSC : ATT_KSC;

            c8[i] = moe_fp8_from_f32(cache[i] / sc);
            cache[i] = moe_fp8_to_f32(c8[i]) * sc;
        }
    }
    gu_fill(qkv, (size_t) T * ld, 1.0f);
    int t = 0;
    for (int s = 0; s < ns; s++) {
        for (int i = 0; i < nq[s]; i++, t++) {
            tpos[t] = len[s] - nq[s] + i;
            tseq[t] = s;
        }
    }
    float scale = 1.0f / sqrtf((float) hd);
    for (t = 0; t < T; t++) {
        int s = tseq[t], p = tpos[t];
        int j0 = window > 0 && p - window + 1 > 0 ? p - window + 1 : 0;

        for (int h = 0; h < nh; h++) {
            const float *q = qkv + (size_t) t * ld + h * hd;
            int          g = h / grp;
            float        mx = -INFINITY, sum = 0;

            for (int j = j0; j <= p; j++) {
                int    blk = bt[bt_off[s] + j / bs];
                float *k = cache + ((size_t) (blk * 2) * bs + j % bs) * kvd
                           + g * hd;
                float  d = 0;

                for (int e = 0; e < hd; e++) {
                    d += q[e] * k[e];
                }
                sc[j - j0] = d * scale;
                mx = fmaxf(mx, sc[j - j0]);
            }
            for (int j = j0; j <= p; j++) {
                sc[j - j0] = expf(sc[j - j0] - mx);
                sum += sc[j - j0];
            }
            float *o = ref + (size_t) t * nh * hd + h * hd;
            for (int e = 0; e < hd; e++) {
                o[e] = 0;
            }
            for (int j = j0; j <= p; j++) {
                int    blk = bt[bt_off[s] + j / bs];
                float *v = cache + ((size_t) (blk * 2 + 1) * bs + j % bs)
                                   * kvd + g * hd;

                for (int e = 0; e < hd; e++) {
                    o[e] += sc[j - j0] / sum * v[e];
                }
            }
        }
    }
    void *d_cache = gu_up(cbits, 2 * cache_n);
    float *d_qkv = (float *) gu_up(qkv, sizeof(float) * T * ld);
    int32_t *d_bt = (int32_t *) gu_up(bt, sizeof(int32_t) * nblk);
    int32_t *d_off = (int32_t *) gu_up(bt_off, sizeof(int) * ns);
    int32_t *d_pos = (int32_t *) gu_up(tpos, sizeof(int32_t) * T);
    int32_t *d_seq = (int32_t *) gu_up(tseq, sizeof(int32_t) * T);
    void *d_out = gu_dev(2 * T * nh * hd);
    float *d_part = (float *) gu_dev(
        4 * (size_t) moe_cuda_attention_ws_floats(nh, nkv, hd));
    int ok = gu_sync_ok(moe_cuda_attention_ws_init(d_part, 0), "ws_init");
    double e[2] = { NAN, NAN };

    /* the second run passes the host's tc_whole hint (a bf16 cache): no
     * SIMT pass when the tensor-core kernel takes every tile */
    int whole = !att_fp8 && moe_cuda_attention_tc_whole(tseq, T, hd);

    for (int run = 0; run < 2 && ok; run++) {
        cudaMemset(d_out, 0xff, 2 * T * nh * hd);       /* poison */
        moe_cuda_att_kv_t kvo = { att_fp8, ATT_KSC, ATT_VSC, 0,
                                  run == 1 ? whole : 0 };
        int rc = att_tune == NULL && !att_fp8 && run == 0
                 ? moe_cuda_attention(d_qkv, ld, T, d_pos, d_seq, d_bt,
                                      d_off, (moe_bf16_t *) d_cache, bs, nh,
                                      nkv, hd, window, (moe_bf16_t *) d_out,
                                      d_part, NULL, 0)
                 : moe_cuda_attention_ex(d_qkv, ld, T, d_pos, d_seq, d_bt,
                                         d_off, d_cache, bs, nh, nkv, hd,
                                         window, (moe_bf16_t *) d_out,
                                         d_part, &kvo, att_tune, 0);
        ok = gu_sync_ok(rc, "attention");
        gu_down(obits, d_out, 2 * T * nh * hd);
        gu_bf_to_f(out, obits, (size_t) T * nh * hd);
        e[run] = gu_relerr(out, ref, (size_t) T * nh * hd);
    }
    TAP_OK(ok && e[0] <= BF_TOL && e[1] <= BF_TOL, "attention %s heads "
           "%d/%d hd %d window %d %s (%d queries, err %.2e / rerun %.2e%s)",
           prefill ? "prefill" : "decode", nh, nkv, hd, window, what, T,
           e[0], e[1], whole ? ", no SIMT pass" : "");
    cudaFree(d_part);
    cudaFree(d_cache); cudaFree(d_qkv); cudaFree(d_bt); cudaFree(d_off);
    cudaFree(d_pos); cudaFree(d_seq); cudaFree(d_out);
    free(bt); free(cache); free(cbits); free(qkv); free(ref); free(out);
    free(obits); free(tpos); free(tseq); free(sc);
}


/* Three sequences of 37, mid and 5 positions. */
static void
test_attention(int nh, int nkv, int hd, int window, int prefill, int mid)
{
    int  len[3] = { 37, mid, 5 };
    char what[32];

    snprintf(what, sizeof(what), "ctx 37/%d/5", mid);
    test_attention_v(nh, nkv, hd, window, prefill, 3, len, what);
}


/* One sequence (T = 1 decode: the most key splits) of ctx positions. */
static void
test_attention_1(int nh, int nkv, int hd, int window, int ctx)
{
    char what[32];

    snprintf(what, sizeof(what), "one seq ctx %d", ctx);
    test_attention_v(nh, nkv, hd, window, 0, 1, &ctx, what);
}


/*
 * Prefill shapes: one sequence of len positions whose last nq are the
 * queries (nq < len: a later chunk, the earlier keys already in the
 * cache).  tc: the kernel the shape reaches (a label: the launcher picks
 * by shape), 1 the tensor-core prefill kernel (T >= 64, T * n_kv > 1024,
 * hd 64 or 128), 0 the SIMT prefill kernel.
 */
static void
test_attention_tc(int tc, int nh, int nkv, int hd, int window, int len,
    int nq)
{
    char what[64];

    snprintf(what, sizeof(what), "%s one seq ctx %d, %d queries",
             tc ? att_tc_name : "simt", len, nq);
    test_attention_v(nh, nkv, hd, window, nq, 1, &len, what);
}


/* The same over several sequences (row tiles holding several of them). */
static void
test_attention_tc_v(int tc, int nh, int nkv, int hd, int window, int ns,
    const int *len, int nq, const char *what)
{
    char w[96];

    snprintf(w, sizeof(w), "%s %s", tc ? att_tc_name : "simt", what);
    test_attention_v(nh, nkv, hd, window, nq, ns, len, w);
}


/*
 * The tc_whole hint (moe_cuda_attention_ex): the host's run count per
 * 128-row tile decides it (3 prompts of 300/5/200: 1; 7 prompts of 10..40
 * in one tile: 0; fewer than 64 tokens or head dim 96: 0), and a hint of 1
 * really skips the SIMT pass: on the 7-prompt step, whose tile the
 * tensor-core kernel refuses, the rows stay as poisoned.
 */
static void
test_attention_whole(void)
{
    int32_t  s3[505], s7[175];
    int      T7 = 0, nh = 32, nkv = 8, hd = 128, ld = (nh + 2 * nkv) * hd;
    int      l7[7] = { 20, 30, 10, 25, 40, 15, 35 };
    int32_t  pos[175], bt[16], off[7];
    int      nb = 0, untouched = 1;
    size_t   written = 0;

    for (int i = 0; i < 505; i++) {
        s3[i] = i < 300 ? 0 : i < 305 ? 1 : 2;
    }
    for (int s = 0; s < 7; s++) {
        off[s] = nb;
        for (int i = 0; i < l7[s]; i++, T7++) {
            s7[T7] = s;
            pos[T7] = i;
        }
        nb += (l7[s] + 15) / 16;
    }
    for (int i = 0; i < nb; i++) {
        bt[i] = i;
    }
    TAP_OK(moe_cuda_attention_tc_whole(s3, 505, 128) == 1
           && moe_cuda_attention_tc_whole(s3, 505, 64) == 1
           && moe_cuda_attention_tc_whole(s3, 505, 96) == 0
           && moe_cuda_attention_tc_whole(s3, 63, 128) == 0
           && moe_cuda_attention_tc_whole(s7, T7, 128) == 0
           && moe_cuda_attention_tc_whole(NULL, 505, 128) == 0,
           "attention tc_whole: 3 runs per tile 1, 7 runs 0, T < 64 0, "
           "hd 96 0");

    float    *qkv = (float *) malloc(sizeof(float) * T7 * ld);
    uint16_t *kvb = (uint16_t *) malloc(2 * (size_t) nb * 2 * 16 * nkv * hd);
    uint16_t *o = (uint16_t *) malloc(2 * (size_t) T7 * nh * hd);

    for (int i = 0; i < T7 * ld; i++) {
        qkv[i] = gu_uniform();
    }
    for (size_t i = 0; i < (size_t) nb * 2 * 16 * nkv * hd; i++) {
        kvb[i] = 0x3c00;                        /* bf16 0.0078 */
    }
    float   *d_qkv = (float *) gu_up(qkv, sizeof(float) * T7 * ld);
    void    *d_kv = gu_up(kvb, 2 * (size_t) nb * 2 * 16 * nkv * hd);
    int32_t *d_pos = (int32_t *) gu_up(pos, sizeof(int32_t) * T7);
    int32_t *d_seq = (int32_t *) gu_up(s7, sizeof(int32_t) * T7);
    int32_t *d_bt = (int32_t *) gu_up(bt, sizeof(int32_t) * nb);
    int32_t *d_off = (int32_t *) gu_up(off, sizeof(int32_t) * 7);
    void    *d_out = gu_dev(2 * (size_t) T7 * nh * hd);
    float   *d_part = (float *) gu_dev(
        4 * (size_t) moe_cuda_attention_ws_floats(nh, nkv, hd));
    int      ok = gu_sync_ok(moe_cuda_attention_ws_init(d_part, 0),
                             "ws_init");
    moe_cuda_att_kv_t kvo = { 0, 1.0f, 1.0f, 0, 1 };

    cudaMemset(d_out, 0xff, 2 * (size_t) T7 * nh * hd);
    ok = ok && gu_sync_ok(moe_cuda_attention_ex(d_qkv, ld, T7, d_pos, d_seq,
                                                d_bt, d_off, d_kv, 16, nh,
                                                nkv, hd, 0,
                                                (moe_bf16_t *) d_out, d_part,
                                                &kvo, NULL, 0),
                          "attention tc_whole 1");
    gu_down(o, d_out, 2 * (size_t) T7 * nh * hd);
    /* rows 0..127 (6 runs: refused) keep the poison; rows 128.. (2 runs)
     * the tensor-core kernel wrote */
    for (size_t i = 0; i < (size_t) T7 * nh * hd; i++) {
        if (i < (size_t) 128 * nh * hd) {
            untouched &= o[i] == 0xffff;
        } else {
            written += o[i] != 0xffff;
        }
    }
    TAP_OK(ok && untouched && written == (size_t) (T7 - 128) * nh * hd,
           "attention tc_whole 1 on a refused tile: the SIMT pass skipped "
           "(its 128 rows left as poisoned, the other %d written)",
           T7 - 128);
    cudaFree(d_qkv); cudaFree(d_kv); cudaFree(d_pos); cudaFree(d_seq);
    cudaFree(d_bt); cudaFree(d_off); cudaFree(d_out); cudaFree(d_part);
    free(qkv); free(kvb); free(o);
}


/*
 * A decode case (ns sequences, one query each) on one decode kernel:
 * tc 1 the tensor-core kernel, 0 the SIMT one (record att_decode_tc);
 * bps > 0 sets att_split_bps (1 at 64 sequences: one split per pair;
 * 64 at one sequence: the most splits); fp8 1: an e4m3 cache; early:
 * the record's att_early (the tensor-core kernel takes it at one token).
 */
static void
test_attention_dke(int tc, int early, int fp8, int bps, int nh, int nkv,
    int hd, int window, int ns, const int *len, const char *what)
{
    moe_cuda_tuning_t r = MOE_CUDA_TUNING_DEFAULTS;
    char              w[128];

    r.att_decode_tc = tc;
    r.att_early = early;
    if (bps > 0) {
        r.att_split_bps = bps;
    }
    att_tune = &r;
    att_fp8 = fp8;
    snprintf(w, sizeof(w), "%s: %s kernel, att_early %d, %s cache, bps %d",
             what, tc ? "tc" : "simt", early, fp8 ? "fp8" : "bf16",
             r.att_split_bps);
    test_attention_v(nh, nkv, hd, window, 0, ns, len, w);
    att_tune = NULL;
    att_fp8 = 0;
}


/* The same with att_early 0. */
static void
test_attention_dk(int tc, int fp8, int bps, int nh, int nkv, int hd,
    int window, int ns, const int *len, const char *what)
{
    test_attention_dke(tc, 0, fp8, bps, nh, nkv, hd, window, ns, len, what);
}


/* The same on both kernels and both cache types (4 TAP lines). */
static void
test_attention_dk4(int bps, int nh, int nkv, int hd, int window, int ns,
    const int *len, const char *what)
{
    for (int fp8 = 0; fp8 < 2; fp8++) {
        for (int tc = 1; tc >= 0; tc--) {
            test_attention_dk(tc, fp8, bps, nh, nkv, hd, window, ns, len,
                              what);
        }
    }
}


/*
 * A kernel before the dense_pre GEMVs: it lets the next kernel start at
 * once (griddepcontrol.launch_dependents), spins for ns nanoseconds and
 * only then writes the GEMV's input rows (X = src), so a GEMV that read
 * its inputs before its PDL wait would see the poison X held before.
 */
__global__ void
k_late_rows(uint16_t *X, const uint16_t *src, int n, unsigned long long ns)
{
    unsigned long long t0, t;

    asm volatile("griddepcontrol.launch_dependents;\n" ::: "memory");
    asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t0));
    do {
        asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
    } while (t - t0 < ns);
    for (int i = threadIdx.x; i < n; i += blockDim.x) {
        X[i] = src[i];
    }
}


/*
 * The dense GEMVs with dense_pre (weights of both register stages loaded
 * before the PDL wait): fmt 0 e4m3 per channel (moe_cuda_gemv_fp8 with
 * the record's dense_pre, f16 fragments), fmt 1 4-bit GPTQ layout
 * (moe_cuda_qgemv_q4g_pre), n rows of X.  Run A: dense_pre 0, PDL off,
 * after X is written.  Run B: dense_pre 1, PDL on, launched right after
 * k_late_rows, which writes X 50 us after letting the GEMV start (X is
 * NaN until then).  Y of B must equal A's (the same sums in the same
 * order; relative L2 <= 1e-6 allowed for the compiler's freedom): a
 * read of X before the wait would give NaN, a lost weight stage zeros.
 */
static void
test_dense_pre(int fmt, int N, int K, int G, int n)
{
    size_t    nx = (size_t) n * K, ny = (size_t) n * N;
    uint16_t *xb = (uint16_t *) malloc(2 * nx);
    float    *xf = (float *) malloc(sizeof(float) * nx);
    float    *y[2] = { (float *) malloc(sizeof(float) * ny),
                       (float *) malloc(sizeof(float) * ny) };
    void     *d_w = NULL, *d_z = NULL, *d_s = NULL;
    uint16_t *d_src, *d_x;
    float    *d_y[2];
    int       pdl0 = moe_cuda_pdl_get(), ok = 1;
    double    err;
    cudaStream_t st = NULL;
    moe_cuda_tuning_t tu = MOE_CUDA_TUNING_DEFAULTS;

    gu_fill_bf(xf, xb, nx, 1.0f);
    d_src = (uint16_t *) gu_up(xb, 2 * nx);
    d_x = (uint16_t *) gu_dev(2 * nx);
    for (int v = 0; v < 2; v++) {
        d_y[v] = (float *) gu_dev(sizeof(float) * ny);
    }
    if (fmt == 0) {
        uint8_t *w = (uint8_t *) malloc((size_t) N * K);
        float   *sc = (float *) malloc(sizeof(float) * N);

        for (size_t i = 0; i < (size_t) N * K; i++) {
            w[i] = gu_rand_e4m3();
        }
        for (int i = 0; i < N; i++) {
            sc[i] = 5e-4f + 1.5e-3f * gu_uniform();
        }
        d_w = gu_up(w, (size_t) N * K);
        d_s = gu_up(sc, sizeof(float) * N);
        free(w);
        free(sc);
    } else {
        size_t    nw = (size_t) K / 8 * N, nz = (size_t) K / G * N / 8;
        size_t    ns = (size_t) K / G * N;
        uint32_t *w = (uint32_t *) malloc(4 * nw);
        uint32_t *z = (uint32_t *) malloc(4 * nz);
        uint16_t *sc = (uint16_t *) malloc(2 * ns);

        for (size_t i = 0; i < nw; i++) {
            w[i] = gu_rand();
        }
        for (size_t i = 0; i < nz; i++) {
            z[i] = gu_rand();
        }
        for (size_t i = 0; i < ns; i++) {
            sc[i] = (uint16_t) (0x1c00u + gu_rand() % 0x800u); /* ~2^-8 */
        }
        d_w = gu_up(w, 4 * nw);
        d_z = gu_up(z, 4 * nz);
        d_s = gu_up(sc, 2 * ns);
        free(w);
        free(z);
        free(sc);
    }
    ok = cudaStreamCreateWithFlags(&st, cudaStreamNonBlocking)
         == cudaSuccess;
    for (int v = 0; v < 2 && ok; v++) {
        int rc;

        tu.dense_pre = v;
        cudaMemsetAsync(d_x, 0xff, 2 * nx, st);        /* NaN rows */
        if (v == 0) {
            moe_cuda_pdl_set(0);
            cudaMemcpyAsync(d_x, d_src, 2 * nx, cudaMemcpyDeviceToDevice,
                            st);
        } else {
            moe_cuda_pdl_set(1);
            k_late_rows<<<1, 256, 0, st>>>(d_x, d_src, (int) nx, 50000ull);
        }
        rc = fmt == 0
             ? moe_cuda_gemv_fp8((const moe_bf16_t *) d_x, K, NULL, 1,
                                 (const uint8_t *) d_w, (const float *) d_s,
                                 MOE_K_FP8_CHANNEL, N, K, NULL, 1, n, n, 0,
                                 d_y[v], NULL, N, &tu, st)
             : moe_cuda_qgemv_q4g_pre((const moe_bf16_t *) d_x, K, NULL, 1,
                                      (const int32_t *) d_w,
                                      (const int32_t *) d_z,
                                      (const uint16_t *) d_s, G, 1, N, K,
                                      NULL, 1, n, n, d_y[v], N, NULL, v, st);
        ok = rc == MOE_K_OK && gu_sync_ok(rc, "dense_pre");
        moe_cuda_pdl_set(pdl0);
        gu_down(y[v], d_y[v], sizeof(float) * ny);
    }
    err = ok ? gu_relerr(y[1], y[0], ny) : NAN;
    TAP_OK(ok && err <= 1e-6, "dense_pre %s N %d K %d%s%.0d, %d row%s: "
           "weights before the PDL wait, X written 50 us after the GEMV "
           "may start; Y equal to dense_pre 0 (rel %.2e)",
           fmt == 0 ? "e4m3 per channel" : "4-bit GPTQ", N, K,
           fmt == 0 ? "" : " G ", fmt == 0 ? 0 : G, n, n > 1 ? "s" : "",
           err);
    if (st != NULL) {
        cudaStreamDestroy(st);
    }
    cudaFree(d_w);
    cudaFree(d_z);
    cudaFree(d_s);
    cudaFree(d_src);
    cudaFree(d_x);
    cudaFree(d_y[0]);
    cudaFree(d_y[1]);
    free(xb);
    free(xf);
    free(y[0]);
    free(y[1]);
}


/*
 * One sequence of ctx positions on the tensor-core decode kernel with
 * att_early 1 (one token: positions, table and the keys before the last
 * read before the PDL wait, the last key and q after it; the last key's
 * rows loaded again on their own when they sit in the first stages).
 */
static void
test_attention_early(int fp8, int bps, int nh, int nkv, int hd, int window,
    int ctx)
{
    char what[48];

    snprintf(what, sizeof(what), "one seq ctx %d", ctx);
    test_attention_dke(1, 1, fp8, bps, nh, nkv, hd, window, 1, &ctx, what);
}


/* One sequence of ctx positions through test_attention_dk4. */
static void
test_attention_dk1(int bps, int nh, int nkv, int hd, int window, int ctx)
{
    char what[48];

    snprintf(what, sizeof(what), "one seq ctx %d", ctx);
    test_attention_dk4(bps, nh, nkv, hd, window, 1, &ctx, what);
}


/* n sequences of random lengths 1..maxlen (a decode batch). */
static void
test_attention_batch(int nh, int nkv, int hd, int window, int prefill, int n,
    int maxlen)
{
    int  len[64];
    char what[48];

    for (int s = 0; s < n; s++) {
        len[s] = 1 + (int) (gu_rand() % (uint32_t) maxlen);
    }
    snprintf(what, sizeof(what), "%d seqs ctx 1..%d", n, maxlen);
    test_attention_v(nh, nkv, hd, window, prefill, n, len, what);
}


/* the host greedy scan (moe_sample): first maximum of x[0..n) */
static int
ref_argmax(const float *x, int n)
{
    int best = 0;

    for (int i = 1; i < n; i++) {
        if (x[i] > x[best]) {
            best = i;
        }
    }
    return best;
}


/*
 * rows of V logits at stride ld: mode 0 random, 1 random with the maximum
 * planted several times (same thread, same warp, other warps, near the
 * end), 2 coarse values (ties everywhere); row 0 is all equal (answer 0).
 * with_nv: every row gets an n_valid (some cut off the maximum, some <= 0
 * or >= V meaning all).
 */
static void
test_argmax(int rows, int V, int ld, int mode, int with_nv)
{
    float   *x = (float *) malloc(sizeof(float) * (size_t) rows * ld);
    int32_t *nv = (int32_t *) malloc(sizeof(int32_t) * rows);
    int32_t *out = (int32_t *) malloc(sizeof(int32_t) * rows);
    int      bad = -1, ok, r;

    for (size_t i = 0; i < (size_t) rows * ld; i++) {
        float v = gu_uniform() * 8.0f;

        x[i] = mode == 2 ? floorf(v) : v;   /* 16 levels */
    }
    for (r = 0; r < rows; r++) {
        float *row = x + (size_t) r * ld;

        if (r == 0) {
            for (int i = 0; i < V; i++) {
                row[i] = -3.5f;
            }
        } else if (mode == 1) {
            /* a new maximum at p and copies at p + 512 (same thread),
             * p + 1 (same warp), p + 37, p + 1000 (other warps), V - 1 */
            int p = (int) (gu_rand() % (unsigned) (V / 2));
            int at[6] = { p + 512, p, p + 1, p + 37, p + 1000, V - 1 };

            for (int k = 0; k < 6; k++) {
                if (at[k] < V) {
                    row[at[k]] = 9.0f;
                }
            }
        }
        if (!with_nv) {
            nv[r] = 0;
        } else if (r % 4 == 1) {
            nv[r] = ref_argmax(row, V);       /* cuts the maximum off */
        } else if (r % 4 == 2) {
            nv[r] = 1 + (int) (gu_rand() % (unsigned) V);
        } else {
            nv[r] = r % 4 == 0 ? 0 : V + 5;   /* all */
        }
    }

    float   *d_x = (float *) gu_up(x, sizeof(float) * (size_t) rows * ld);
    int32_t *d_nv = (int32_t *) gu_up(nv, sizeof(int32_t) * rows);
    int32_t *d_out = (int32_t *) gu_dev(sizeof(int32_t) * rows);

    ok = gu_sync_ok(moe_cuda_argmax_rows(d_x, ld, rows, V,
                                      with_nv ? d_nv : NULL, d_out, 0),
                 "argmax");
    gu_down(out, d_out, sizeof(int32_t) * rows);
    for (r = 0; ok && r < rows; r++) {
        int n = nv[r] > 0 && nv[r] < V ? nv[r] : V;
        int want = ref_argmax(x + (size_t) r * ld, n);

        if (out[r] != want) {
            TAP_DIAG("argmax row %d (n_valid %d): got %d want %d", r, nv[r],
                     out[r], want);
            bad = r;
            ok = 0;
        }
    }
    TAP_OK(ok && bad < 0, "argmax %d rows x %d (ld %d, %s%s) == host "
           "first-maximum scan", rows, V, ld,
           mode == 0 ? "random" : mode == 1 ? "planted ties" : "coarse ties",
           with_nv ? ", n_valid" : "");
    cudaFree(d_x); cudaFree(d_nv); cudaFree(d_out);
    free(x); free(nv); free(out);
}


/* F % 4 == 0 takes four columns per thread, else one; F > 1024: more
 * than one column chunk per row */
static void
test_silu(int R, int F)
{
    float    *gu = (float *) malloc(sizeof(float) * R * 2 * F);
    float    *ref = (float *) malloc(sizeof(float) * R * F);
    float    *out = (float *) malloc(sizeof(float) * R * F);
    uint16_t *ob = (uint16_t *) malloc(2 * R * F);

    gu_fill(gu, (size_t) R * 2 * F, 4.0f);
    for (int r = 0; r < R; r++) {
        for (int j = 0; j < F; j++) {
            float g = gu[r * 2 * F + j], u = gu[r * 2 * F + F + j];

            ref[r * F + j] = g / (1.0f + expf(-g)) * u;
        }
    }
    float *d_gu = (float *) gu_up(gu, sizeof(float) * R * 2 * F);
    void *d_h = gu_dev(2 * R * F);
    int ok = gu_sync_ok(moe_cuda_silu_mul(d_gu, R, F, (moe_bf16_t *) d_h, 0),
                     "silu_mul");
    gu_down(ob, d_h, 2 * R * F);
    gu_bf_to_f(out, ob, (size_t) R * F);
    double e = gu_relerr(out, ref, (size_t) R * F);
    TAP_OK(ok && e <= BF_TOL, "silu_mul %d x %d (err %.2e)", R, F, e);
    cudaFree(d_gu); cudaFree(d_h);
    free(gu); free(ref); free(out); free(ob);
}


static void
ref_route(const float *x, const float *W, int D, int E, int K, int renorm,
    int *sel, float *selw, float *margin)
{
    float lg[256], mx = -INFINITY, sum = 0, ksum = 0;

    for (int e = 0; e < E; e++) {
        double s = 0;

        for (int d = 0; d < D; d++) {
            s += (double) W[e * D + d] * x[d];
        }
        lg[e] = (float) s;
        mx = fmaxf(mx, lg[e]);
    }
    for (int e = 0; e < E; e++) {
        lg[e] = expf(lg[e] - mx);
        sum += lg[e];
    }
    for (int e = 0; e < E; e++) {
        lg[e] /= sum;
    }
    for (int k = 0; k < K; k++) {
        int best = -1;

        for (int e = 0; e < E; e++) {
            int taken = 0;

            for (int j = 0; j < k; j++) {
                taken |= sel[j] == e;
            }
            if (!taken && (best < 0 || lg[e] > lg[best])) {
                best = e;
            }
        }
        sel[k] = best;
        selw[k] = lg[best];
        ksum += lg[best];
    }
    *margin = 1.0f;
    if (K < E) {
        float nb = -1.0f;

        for (int e = 0; e < E; e++) {
            int taken = 0;

            for (int j = 0; j < K; j++) {
                taken |= sel[j] == e;
            }
            if (!taken && lg[e] > nb) {
                nb = lg[e];
            }
        }
        *margin = selw[K - 1] - nb;
    }
    for (int k = 0; renorm && k < K; k++) {
        selw[k] /= ksum;
    }
}


static void
test_route(int T, int D, int E, int K, int renorm)
{
    float   *x = (float *) malloc(sizeof(float) * T * D);
    float   *W = (float *) malloc(sizeof(float) * E * D);
    int     *sel = (int *) malloc(sizeof(int) * T * K);
    float   *selw = (float *) malloc(sizeof(float) * T * K);
    int32_t *gsel = (int32_t *) malloc(sizeof(int32_t) * T * K);
    float   *gw = (float *) malloc(sizeof(float) * T * K);
    float   *mg = (float *) malloc(sizeof(float) * T);
    float   *gmg = (float *) malloc(sizeof(float) * T);
    int      mism = 0;

    gu_fill(x, (size_t) T * D, 1.0f);
    gu_fill(W, (size_t) E * D, 1.0f);
    for (int t = 0; t < T; t++) {
        ref_route(x + t * D, W, D, E, K, renorm, sel + t * K, selw + t * K,
                  mg + t);
    }
    float *d_x = (float *) gu_up(x, sizeof(float) * T * D);
    float *d_W = (float *) gu_up(W, sizeof(float) * E * D);
    int32_t *d_sel = (int32_t *) gu_dev(sizeof(int32_t) * T * K);
    float *d_w = (float *) gu_dev(sizeof(float) * T * K);
    float *d_mg = (float *) gu_dev(sizeof(float) * T);
    float *d_lg = (float *) gu_dev(sizeof(float) * T * E);
    int ok = gu_sync_ok(moe_cuda_route(d_x, T, D, d_W, E, K, renorm, d_lg, d_sel,
                                    d_w, d_mg, 0), "route");
    gu_down(gmg, d_mg, sizeof(float) * T);
    double em = gu_relerr(gmg, mg, (size_t) T);
    gu_down(gsel, d_sel, sizeof(int32_t) * T * K);
    gu_down(gw, d_w, sizeof(float) * T * K);
    for (int i = 0; i < T * K; i++) {
        mism += gsel[i] != sel[i];
    }
    double e = gu_relerr(gw, selw, (size_t) T * K);
    /* from 256 tokens (E <= 16) the all-experts logits kernel runs: its
     * logits bit for bit those of the per-expert grid, which steps of
     * fewer tokens take (the same rows in chunks of 100) */
    int lbad = -1;

    if (T >= 256) {
        float *l1 = (float *) malloc(sizeof(float) * T * E);
        float *l2 = (float *) malloc(sizeof(float) * T * E);
        float *d_l2 = (float *) gu_dev(sizeof(float) * T * E);

        gu_down(l1, d_lg, sizeof(float) * T * E);
        for (int t0 = 0; t0 < T && ok; t0 += 100) {
            int n = T - t0 < 100 ? T - t0 : 100;

            ok = gu_sync_ok(moe_cuda_route(d_x + (size_t) t0 * D, n, D, d_W,
                                           E, K, renorm, d_l2 + t0 * E,
                                           d_sel, d_w, d_mg, 0),
                            "route chunks");
        }
        gu_down(l2, d_l2, sizeof(float) * T * E);
        lbad = 0;
        for (int i = 0; i < T * E; i++) {
            lbad += memcmp(&l1[i], &l2[i], sizeof(float)) != 0;
        }
        cudaFree(d_l2);
        free(l1);
        free(l2);
    }
    /* random logits are far apart: the same experts must be chosen */
    TAP_OK(ok && mism == 0 && e <= 1e-4 && em <= 1e-3 && lbad <= 0,
           "route T %d E %d top-%d renorm %d (%d of %d choices differ, "
           "weights err %.2e, margins err %.2e%s%d)", T, E, K, renorm, mism,
           T * K, e, em, lbad < 0 ? "" : ", logits differing from the "
           "per-expert grid's: ", lbad < 0 ? 0 : lbad);
    cudaFree(d_mg); cudaFree(d_lg); free(mg); free(gmg);
    cudaFree(d_x); cudaFree(d_W); cudaFree(d_sel); cudaFree(d_w);
    free(x); free(W); free(sel); free(selw); free(gsel); free(gw);
}


/* Token blockIdx.x's top-k by both device paths: warp 0 the rounds
 * (moe_route_topk_rounds) into the outputs of set 0, warp 1 one expert a
 * lane (moe_route_topk_lanes) into set 1; sel_sh copied out after. */
__global__ void
k_topk_both(const float *logits, int E, int K, int renorm, int32_t *sel,
    float *selw, float *margin, int32_t *selsh, int T)
{
    __shared__ float lg[2][ROUTE_MAX_E];
    __shared__ int   ss[2][32];
    int              lane = threadIdx.x & 31, w = threadIdx.x >> 5;
    int              t = blockIdx.x;
    size_t           o = (size_t) w * T;

    if (w == 0) {
        moe_route_topk_rounds(logits, t, E, K, renorm, sel + o * K,
                              selw + o * K, margin + o, lg[0], lane, ss[0]);
    } else {
        moe_route_topk_lanes(logits, t, E, K, renorm, sel + o * K,
                             selw + o * K, margin + o, lg[1], lane, ss[1]);
    }
    __syncwarp();
    if (lane < K) {
        selsh[(o + t) * K + lane] = ss[w][lane];
    }
}


/*
 * The two top-k paths of moe_route.cuh on the same logits, T tokens of E
 * <= 32 experts: sel, selw, margin and the shared choices bit for bit.
 * mode 0: random logits; 1: ties planted (each token's logits drawn from
 * a few values, so probabilities tie within and across lanes); 2: coarse
 * logits far apart (many probabilities underflow to 0 and tie).
 */
static void
test_topk_paths(int T, int E, int K, int renorm, int mode)
{
    size_t   nl = (size_t) T * E, nk = (size_t) 2 * T * K;
    float   *lg = (float *) malloc(sizeof(float) * nl);
    int32_t *sel = (int32_t *) malloc(sizeof(int32_t) * nk);
    int32_t *ssh = (int32_t *) malloc(sizeof(int32_t) * nk);
    float   *sw = (float *) malloc(sizeof(float) * nk);
    float   *mg = (float *) malloc(sizeof(float) * 2 * T);
    int      bad = 0, ok;

    for (size_t i = 0; i < nl; i++) {
        lg[i] = mode == 0 ? 4.0f * (gu_uniform() - 0.5f)
                : mode == 1 ? (float) (gu_rand() % 3u) * 0.75f
                            : 60.0f * (float) (gu_rand() % 7u) - 200.0f;
    }
    float   *d_lg = (float *) gu_up(lg, sizeof(float) * nl);
    int32_t *d_sel = (int32_t *) gu_dev(sizeof(int32_t) * nk);
    int32_t *d_ssh = (int32_t *) gu_dev(sizeof(int32_t) * nk);
    float   *d_sw = (float *) gu_dev(sizeof(float) * nk);
    float   *d_mg = (float *) gu_dev(sizeof(float) * 2 * T);

    cudaMemset(d_sel, 0xff, sizeof(int32_t) * nk);
    cudaMemset(d_sw, 0xff, sizeof(float) * nk);
    cudaMemset(d_mg, 0xff, sizeof(float) * 2 * T);
    k_topk_both<<<T, 64>>>(d_lg, E, K, renorm, d_sel, d_sw, d_mg, d_ssh, T);
    ok = gu_sync_ok(MOE_K_OK, "topk paths");
    gu_down(sel, d_sel, sizeof(int32_t) * nk);
    gu_down(ssh, d_ssh, sizeof(int32_t) * nk);
    gu_down(sw, d_sw, sizeof(float) * nk);
    gu_down(mg, d_mg, sizeof(float) * 2 * T);
    for (size_t i = 0; i < (size_t) T * K; i++) {
        bad += sel[i] != sel[T * K + i] || ssh[i] != ssh[T * K + i]
               || memcmp(&sw[i], &sw[T * K + i], sizeof(float)) != 0;
    }
    for (int t = 0; t < T; t++) {
        bad += memcmp(&mg[t], &mg[T + t], sizeof(float)) != 0;
    }
    /* and the choices real (equal poison would pass the comparison):
     * distinct experts below E, the shared ones the same */
    int invalid = 0;

    for (int t = 0; t < T; t++) {
        for (int k = 0; k < K; k++) {
            size_t  i = (size_t) T * K + (size_t) t * K;  /* set 1 */
            int32_t e = sel[i + k];

            invalid += e < 0 || e >= E || ssh[i + k] != e;
            for (int j = 0; j < k; j++) {
                invalid += sel[i + j] == e;
            }
        }
    }
    TAP_OK(ok && bad == 0 && invalid == 0, "top-k, one expert a lane "
           "against the rounds: T %d E %d top-%d renorm %d (%s): sel, selw, "
           "margin, shared choices bit for bit (%d differ), the choices "
           "distinct experts (%d not)", T, E, K, renorm,
           mode == 0 ? "random" : mode == 1 ? "planted ties"
                                            : "underflowed ties", bad,
           invalid);
    cudaFree(d_lg); cudaFree(d_sel); cudaFree(d_ssh); cudaFree(d_sw);
    cudaFree(d_mg);
    free(lg); free(sel); free(ssh); free(sw); free(mg);
}


/*
 * moe_cuda_norm_route1 (decode's FFN norm, router, top-k and permutation
 * of one token in one launch) against moe_cuda_add_rmsnorm then
 * moe_cuda_route_permute on the same fresh inputs: the residual row, the
 * bf16 and fp32 normalized rows, the logits, sel, selw, margin, offs,
 * erow, slot_of and the running totals bit for bit, outputs poisoned
 * first (pdl: launched with PDL after the separate path's kernels, the
 * router rows read before the wait).
 */
static void
test_norm_route1(int D, int E, int K, int renorm, int pdl, int lean)
{
    enum { NB = 11 };
    float   *x = (float *) malloc(sizeof(float) * D);
    float   *dl = (float *) malloc(sizeof(float) * D);
    float   *w = (float *) malloc(sizeof(float) * D);
    float   *W = (float *) malloc(sizeof(float) * E * D);
    int64_t  tot0[256];
    size_t   isz = sizeof(int32_t) * (size_t) K;
    size_t   sz[NB] = { sizeof(float) * D, sizeof(uint16_t) * D,
                        sizeof(float) * D, sizeof(float) * E, isz,
                        sizeof(float) * K, sizeof(float),
                        sizeof(int32_t) * (E + 1), isz, isz,
                        sizeof(int64_t) * E };
    const char *nm[NB] = { "x", "out", "out_f32", "logits", "sel", "selw",
                           "margin", "offs", "erow", "slot_of", "tot" };
    void    *d[2][NB], *h[2][NB];
    char     diff[256] = "";
    int      ok, bad = 0, pdl0 = moe_cuda_pdl_get();

    gu_fill(x, (size_t) D, 2.0f);
    gu_fill(dl, (size_t) D, 1.0f);
    gu_fill(w, (size_t) D, 1.0f);
    gu_fill(W, (size_t) E * D, 0.5f);
    for (int e = 0; e < E; e++) {
        tot0[e] = (int64_t) (gu_rand() % 1000u);
    }
    float *d_dl = (float *) gu_up(dl, sizeof(float) * D);
    float *d_w = (float *) gu_up(w, sizeof(float) * D);
    float *d_W = (float *) gu_up(W, sizeof(float) * E * D);

    for (int v = 0; v < 2; v++) {
        for (int i = 0; i < NB; i++) {
            d[v][i] = gu_dev(sz[i]);
            h[v][i] = malloc(sz[i]);
            cudaMemset(d[v][i], 0xff, sz[i]);           /* poison */
        }
        cudaMemcpy(d[v][0], x, sz[0], cudaMemcpyHostToDevice);
        cudaMemcpy(d[v][10], tot0, sz[10], cudaMemcpyHostToDevice);
    }
    moe_cuda_pdl_set(pdl);
#define NR_ARGS(v) (float *) d[v][3], (int32_t *) d[v][4], (float *) d[v][5], \
                   (float *) d[v][6], (int32_t *) d[v][7],                    \
                   (int32_t *) d[v][8], (int32_t *) d[v][9],                  \
                   (int64_t *) d[v][10]
    ok = moe_cuda_add_rmsnorm((float *) d[0][0], d_dl, NULL, 1, D, d_w, 1e-5f,
                              (moe_bf16_t *) d[0][1], (float *) d[0][2], 0)
         == MOE_K_OK
         && moe_cuda_route_permute((float *) d[0][2], 1, D, d_W, E, K,
                                   renorm, NR_ARGS(0), 0) == MOE_K_OK
         && gu_sync_ok(moe_cuda_norm_route1((float *) d[1][0], d_dl, D, d_w,
                                            1e-5f, (moe_bf16_t *) d[1][1],
                                            (float *) d[1][2], d_W, E, K,
                                            renorm, NR_ARGS(1), lean, 0),
                       "norm_route1");
#undef NR_ARGS
    moe_cuda_pdl_set(pdl0);
    for (int i = 0; ok && i < NB; i++) {
        gu_down(h[0][i], d[0][i], sz[i]);
        gu_down(h[1][i], d[1][i], sz[i]);
        if (memcmp(h[0][i], h[1][i], sz[i]) != 0) {
            bad++;
            snprintf(diff + strlen(diff), sizeof(diff) - strlen(diff),
                     " %s", nm[i]);
        }
    }
    TAP_OK(ok && bad == 0, "norm_route1 D %d E %d top-%d renorm %d pdl %d "
           "(%s): residual, normalized rows, logits, choices, "
           "weights, margin, offsets, rows, slots and totals equal to "
           "add_rmsnorm + route_permute (%d of %d differ:%s)", D, E, K,
           renorm, pdl, lean ? "lean kernel, router via L2"
                            : E <= 8 && D <= 4096 ? "router in registers"
                                                  : "router via L2",
           bad, NB, diff);
    for (int v = 0; v < 2; v++) {
        for (int i = 0; i < NB; i++) {
            cudaFree(d[v][i]);
            free(h[v][i]);
        }
    }
    cudaFree(d_dl); cudaFree(d_w); cudaFree(d_W);
    free(x); free(dl); free(w); free(W);
}


/* moe_cuda_norm_route1's refusals: shapes it does not take, and no delta */
static void
test_norm_route1_refuse(void)
{
    float *d_b = (float *) gu_dev(sizeof(float) * 8192);
    int    rc;

    TAP_OK(moe_cuda_norm_route1_ok(4096, 8, 2)
           && moe_cuda_norm_route1_ok(8192, 256, 32)
           && !moe_cuda_norm_route1_ok(4098, 8, 2)
           && !moe_cuda_norm_route1_ok(8196, 8, 2)
           && !moe_cuda_norm_route1_ok(4096, 8, 33)
           && !moe_cuda_norm_route1_ok(4096, 8, 9)
           && !moe_cuda_norm_route1_ok(4096, 257, 2)
           && !moe_cuda_norm_route1_ok(4096, 8, 0),
           "norm_route1: shapes taken and refused (D %% 4, D > 8192, top-k "
           "> 32 or > E, E > 256, top-0)");
    rc = moe_cuda_norm_route1(d_b, d_b, 4098, d_b, 1e-5f, NULL, NULL, d_b, 8,
                              2, 1, NULL, NULL, NULL, NULL, NULL, NULL, NULL,
                              NULL, 0, 0);
    TAP_OK(rc == MOE_K_EUNSUPPORTED, "norm_route1 D 4098: refused (%d)",
           rc);
    rc = moe_cuda_norm_route1(d_b, NULL, 4096, d_b, 1e-5f, NULL, NULL, d_b, 8,
                              2, 1, NULL, NULL, NULL, NULL, NULL, NULL, NULL,
                              NULL, 1, 0);
    TAP_OK(rc == MOE_K_EUNSUPPORTED, "norm_route1 without a delta: refused "
           "(%d)", rc);
    cudaFree(d_b);
}


/*
 * moe_cuda_route_permute against moe_cuda_route + moe_cuda_moe_permute on
 * the same fresh inputs: sel, selw, margin, offs, erow, slot_of and the
 * running totals bit for bit (T <= 32 runs the fused top-k + permute
 * launch, above it the separate ones), outputs poisoned first.
 */
static void
test_route_permute(int T, int D, int E, int K, int renorm)
{
    int      n = T * K, bad = 0, ok;
    float   *x = (float *) malloc(sizeof(float) * T * D);
    float   *W = (float *) malloc(sizeof(float) * E * D);
    int64_t  tot0[256];
    size_t   isz = sizeof(int32_t) * (size_t) n;
    void    *h[2][7];
    size_t   sz[7] = { isz, sizeof(float) * (size_t) n,
                       sizeof(float) * (size_t) T,
                       sizeof(int32_t) * (size_t) (E + 1), isz, isz,
                       sizeof(int64_t) * (size_t) E };
    void    *d[2][7];

    gu_fill(x, (size_t) T * D, 1.0f);
    gu_fill(W, (size_t) E * D, 1.0f);
    for (int e = 0; e < E; e++) {
        tot0[e] = (int64_t) (gu_rand() % 1000u);
    }
    float *d_x = (float *) gu_up(x, sizeof(float) * T * D);
    float *d_W = (float *) gu_up(W, sizeof(float) * E * D);
    float *d_lg = (float *) gu_dev(sizeof(float) * T * E);

    for (int v = 0; v < 2; v++) {
        for (int i = 0; i < 7; i++) {
            d[v][i] = gu_dev(sz[i]);
            h[v][i] = malloc(sz[i]);
            cudaMemset(d[v][i], 0xff, sz[i]);           /* poison */
        }
        cudaMemcpy(d[v][6], tot0, sz[6], cudaMemcpyHostToDevice);
    }
    ok = gu_sync_ok(moe_cuda_route(d_x, T, D, d_W, E, K, renorm, d_lg,
                                   (int32_t *) d[0][0], (float *) d[0][1],
                                   (float *) d[0][2], 0), "route")
         && gu_sync_ok(moe_cuda_moe_permute((int32_t *) d[0][0], n, E,
                                            (int32_t *) d[0][3],
                                            (int32_t *) d[0][4],
                                            (int32_t *) d[0][5],
                                            (int64_t *) d[0][6], 0),
                       "permute")
         && gu_sync_ok(moe_cuda_route_permute(d_x, T, D, d_W, E, K, renorm,
                                              d_lg, (int32_t *) d[1][0],
                                              (float *) d[1][1],
                                              (float *) d[1][2],
                                              (int32_t *) d[1][3],
                                              (int32_t *) d[1][4],
                                              (int32_t *) d[1][5],
                                              (int64_t *) d[1][6], 0),
                       "route_permute");
    for (int i = 0; ok && i < 7; i++) {
        gu_down(h[0][i], d[0][i], sz[i]);
        gu_down(h[1][i], d[1][i], sz[i]);
        bad += memcmp(h[0][i], h[1][i], sz[i]) != 0;
    }
    TAP_OK(ok && bad == 0, "route_permute T %d E %d top-%d renorm %d (%s "
           "launch): sel, weights, margins, offsets, rows, slots and totals "
           "equal to route + permute (%d of 7 differ)", T, E, K, renorm,
           T <= 32 ? "fused top-k + permute" : "separate", bad);
    for (int v = 0; v < 2; v++) {
        for (int i = 0; i < 7; i++) {
            cudaFree(d[v][i]);
            free(h[v][i]);
        }
    }
    cudaFree(d_x); cudaFree(d_W); cudaFree(d_lg); free(x); free(W);
}


/*
 * moe_cuda_unpermute_rmsnorm against moe_cuda_moe_unpermute +
 * moe_cuda_add_rmsnorm on fresh inputs: x, bf16 and fp32 outputs bit for
 * bit, with and without an output row list (the final norm's rows).
 */
static void
test_unpermute_rmsnorm(int T, int D, int K, int with_rows)
{
    int      n = T * K, nr = with_rows ? (T + 1) / 2 : T, bad = 0;
    size_t   nx = (size_t) T * D;
    float   *x = (float *) malloc(4 * nx);
    float   *ye = (float *) malloc(4 * (size_t) n * D);
    float   *w = (float *) malloc(4 * (size_t) D);
    float   *selw = (float *) malloc(4 * (size_t) n);
    int32_t *sel = (int32_t *) malloc(4 * (size_t) n);
    int32_t *slot = (int32_t *) malloc(4 * (size_t) n);
    int32_t *rows = (int32_t *) malloc(4 * (size_t) T);
    void    *hv[2][3];
    size_t   osz[3] = { 4 * nx, 2 * (size_t) nr * D, 4 * (size_t) nr * D };

    gu_fill(x, nx, 1.0f);
    gu_fill(ye, (size_t) n * D, 1.0f);
    gu_fill(w, (size_t) D, 1.0f);
    for (int i = 0; i < n; i++) {
        sel[i] = (int32_t) ((i % K) * 7 + (int) (gu_rand() % 3u));
        selw[i] = gu_uniform();
        slot[i] = (int32_t) ((i * 5 + 3) % n);  /* repeats when 5 | n */
    }
    for (int i = 0; i < nr; i++) {
        rows[i] = with_rows ? T - 1 - 2 * i : i;
    }
    float *d_ye = (float *) gu_up(ye, 4 * (size_t) n * D);
    float *d_w = (float *) gu_up(w, 4 * (size_t) D);
    float *d_selw = (float *) gu_up(selw, 4 * (size_t) n);
    int32_t *d_sel = (int32_t *) gu_up(sel, 4 * (size_t) n);
    int32_t *d_slot = (int32_t *) gu_up(slot, 4 * (size_t) n);
    int32_t *d_rows = (int32_t *) gu_up(rows, 4 * (size_t) T);
    float *d_tmp = (float *) gu_dev(4 * nx);
    const int32_t *rl = with_rows ? d_rows : NULL;
    void *dv[2][3];
    int rc = 0;

    for (int v = 0; v < 2; v++) {
        dv[v][0] = gu_up(x, 4 * nx);
        dv[v][1] = gu_dev(osz[1]);
        dv[v][2] = gu_dev(osz[2]);
    }
    rc |= moe_cuda_moe_unpermute(d_ye, D, d_sel, d_selw, d_slot, T, K, d_tmp,
                                 0);
    rc |= moe_cuda_add_rmsnorm((float *) dv[0][0], d_tmp, rl, nr, D, d_w,
                               1e-6f, (moe_bf16_t *) dv[0][1],
                               (float *) dv[0][2], 0);
    rc |= moe_cuda_unpermute_rmsnorm((float *) dv[1][0], d_ye, d_sel, d_selw,
                                     d_slot, K, rl, nr, D, d_w, 1e-6f,
                                     (moe_bf16_t *) dv[1][1],
                                     (float *) dv[1][2], 0);
    int ok = gu_sync_ok(rc, "unpermute_rmsnorm");

    for (int v = 0; v < 2; v++) {
        for (int i = 0; i < 3; i++) {
            hv[v][i] = malloc(osz[i]);
            gu_down(hv[v][i], dv[v][i], osz[i]);
        }
    }
    for (int i = 0; i < 3; i++) {
        bad += memcmp(hv[0][i], hv[1][i], osz[i]) != 0;
    }
    /* the fused launch changed x at the listed rows only */
    {
        const float *xo = (const float *) hv[1][0];
        int          moved = 0, listed = 0;

        for (int t = 0; t < T; t++) {
            int in = 0;

            for (int i = 0; i < nr; i++) {
                in |= rows[i] == t;
            }
            listed += in;
            moved += memcmp(xo + (size_t) t * D, x + (size_t) t * D,
                            4 * (size_t) D) != 0;
        }
        bad += moved != listed;
    }
    TAP_OK(ok && bad == 0, "unpermute_rmsnorm T %d D %d top-%d rows %d: "
           "the fused launch equals un-permute + add_rmsnorm (%d "
           "differences)", T, D, K, with_rows, bad);
    for (int v = 0; v < 2; v++) {
        for (int i = 0; i < 3; i++) {
            cudaFree(dv[v][i]);
            free(hv[v][i]);
        }
    }
    cudaFree(d_ye); cudaFree(d_w); cudaFree(d_selw); cudaFree(d_sel);
    cudaFree(d_slot); cudaFree(d_rows); cudaFree(d_tmp);
    free(x); free(ye); free(w); free(selw); free(sel); free(slot);
    free(rows);
}


/* Shapes moe_cuda_unpermute_rmsnorm refuses: MOE_K_EUNSUPPORTED, nothing
 * run. */
static void
test_unpermute_rmsnorm_refusals(void)
{
    float   *d_f = (float *) gu_dev(4 * 4096 * 16);
    int32_t *d_i = (int32_t *) gu_dev(4 * 4096);
    int      r1, r2, r3;

    r1 = moe_cuda_unpermute_rmsnorm(d_f, d_f, d_i, d_f, d_i, 65, NULL, 1, 64,
                                    d_f, 1e-5f, (moe_bf16_t *) d_f, NULL, 0);
    r2 = moe_cuda_unpermute_rmsnorm(d_f + 1, d_f, d_i, d_f, d_i, 2, NULL, 1,
                                    64, d_f, 1e-5f, (moe_bf16_t *) d_f, NULL,
                                    0);
    r3 = moe_cuda_unpermute_rmsnorm(d_f, d_f, d_i, d_f, d_i, 2, NULL, 1, 66,
                                    d_f, 1e-5f, (moe_bf16_t *) d_f, NULL, 0);
    TAP_OK(r1 == MOE_K_EUNSUPPORTED && r2 == MOE_K_EUNSUPPORTED
           && r3 == MOE_K_EUNSUPPORTED
           && cudaDeviceSynchronize() == cudaSuccess,
           "unpermute_rmsnorm refuses top-65, a misaligned x and D %% 4 != "
           "0 (%d %d %d)", r1, r2, r3);
    cudaFree(d_f); cudaFree(d_i);
}


/*
 * moe_permute (one launch): offsets, the stable row order and its inverse
 * against the CPU, and the running totals after two calls.
 */
static void
test_permute_one(int T, int E, int K)
{
    int      n = T * K, bad = 0;
    int32_t *sel = (int32_t *) malloc(sizeof(int32_t) * n);
    int32_t *offs = (int32_t *) calloc(E + 1, sizeof(int32_t));
    int32_t *goffs = (int32_t *) malloc(sizeof(int32_t) * (E + 1));
    int32_t *erow = (int32_t *) malloc(sizeof(int32_t) * n);
    int32_t *gerow = (int32_t *) malloc(sizeof(int32_t) * n);
    int32_t *gslot = (int32_t *) malloc(sizeof(int32_t) * n);
    int64_t *gtot = (int64_t *) malloc(sizeof(int64_t) * E);

    for (int t = 0; t < T; t++) {           /* K distinct, last unused */
        for (int k = 0; k < K; k++) {
            int e, dup;

            do {
                e = (int) (gu_rand() % (uint32_t) (E - 1));
                dup = 0;
                for (int j = 0; j < k; j++) {
                    dup |= sel[t * K + j] == e;
                }
            } while (dup);
            sel[t * K + k] = e;
        }
    }
    for (int i = 0; i < n; i++) {
        offs[sel[i] + 1]++;
    }
    for (int e = 0; e < E; e++) {
        offs[e + 1] += offs[e];
    }
    {
        int32_t *fill = (int32_t *) malloc(sizeof(int32_t) * E);

        memcpy(fill, offs, sizeof(int32_t) * E);
        for (int i = 0; i < n; i++) {
            erow[fill[sel[i]]++] = i;
        }
        free(fill);
    }
    int32_t *d_sel = (int32_t *) gu_up(sel, sizeof(int32_t) * n);
    int32_t *d_offs = (int32_t *) gu_dev(sizeof(int32_t) * (E + 1));
    int32_t *d_erow = (int32_t *) gu_dev(sizeof(int32_t) * n);
    int32_t *d_slot = (int32_t *) gu_dev(sizeof(int32_t) * n);
    int64_t *d_tot = (int64_t *) gu_dev(sizeof(int64_t) * E);
    cudaMemset(d_tot, 0, sizeof(int64_t) * E);
    int rc = moe_cuda_moe_permute(d_sel, n, E, d_offs, d_erow, d_slot, d_tot,
                                  0);
    rc |= moe_cuda_moe_permute(d_sel, n, E, d_offs, d_erow, d_slot, d_tot, 0);
    int ok = gu_sync_ok(rc, "moe_permute");

    gu_down(goffs, d_offs, sizeof(int32_t) * (E + 1));
    gu_down(gerow, d_erow, sizeof(int32_t) * n);
    gu_down(gslot, d_slot, sizeof(int32_t) * n);
    gu_down(gtot, d_tot, sizeof(int64_t) * E);
    for (int e = 0; e <= E; e++) {
        bad += goffs[e] != offs[e];
    }
    for (int e = 0; e < E; e++) {
        bad += gtot[e] != 2 * (int64_t) (offs[e + 1] - offs[e]);
    }
    for (int i = 0; i < n; i++) {
        bad += gerow[i] != erow[i];
        bad += gslot[i] < 0 || gslot[i] >= n || erow[gslot[i]] != i;
    }
    TAP_OK(ok && bad == 0, "moe_permute T %d E %d top-%d: offsets, stable "
           "rows, inverse, totals (%d bad)", T, E, K, bad);
    cudaFree(d_sel); cudaFree(d_offs); cudaFree(d_erow); cudaFree(d_slot);
    cudaFree(d_tot);
    free(sel); free(offs); free(goffs); free(erow); free(gerow); free(gslot);
    free(gtot);
}


/*
 * Grouped GEMV against an fp32 CPU reference on the bf16-rounded inputs:
 * E groups of random sizes up to maxr (some empty), N output columns, Kd
 * reduction, input rows gathered (xrow / xdiv) or direct; fp32 out or the
 * fused SiLU*up (bf16 out); outputs poisoned, every row checked.  fma: the
 * tuning record's gemv_fma_rows (hint <= fma and <= 4: the CUDA-core
 * kernel, else the tensor-core one).
 */
static void
test_gemv_t(int E, int N, int Kd, int maxr, int hint, int fma, int silu,
    int grouped, int xdiv)
{
    moe_cuda_tuning_t tune = MOE_CUDA_TUNING_DEFAULTS;
    int       ldx = Kd + 8, ldy = N + 4, n = 0;
    int32_t  *offs = (int32_t *) malloc(sizeof(int32_t) * (E + 1));
    int       WR = silu ? 2 * N : N;

    tune.gemv_fma_rows = fma;

    offs[0] = 0;
    for (int e = 0; e < E; e++) {
        int c = grouped ? (int) (gu_rand() % (uint32_t) (maxr + 1)) : maxr;

        if (grouped && e % 3 == 1) {
            c = 0;
        }
        if (grouped && e == 0) {
            c = maxr;                   /* the largest group occurs */
        }
        offs[e + 1] = offs[e] + c;
    }
    n = offs[E];
    int       nx = n * xdiv + 3;        /* rows of X */
    float    *x = (float *) malloc(sizeof(float) * (size_t) nx * ldx);
    uint16_t *xbits = (uint16_t *) malloc(2 * (size_t) nx * ldx);
    float    *w = (float *) malloc(sizeof(float) * (size_t) E * WR * Kd);
    uint16_t *wbits = (uint16_t *) malloc(2 * (size_t) E * WR * Kd);
    int32_t  *xrow = (int32_t *) malloc(sizeof(int32_t) * (n + 1));
    float    *ref = (float *) malloc(sizeof(float) * (size_t) (n + 1) * ldy);
    float    *out = (float *) malloc(sizeof(float) * (size_t) (n + 1) * ldy);
    uint16_t *obits = (uint16_t *) malloc(2 * (size_t) (n + 1) * ldy);

    gu_fill_bf(x, xbits, (size_t) nx * ldx, 1.0f);
    gu_fill_bf(w, wbits, (size_t) E * WR * Kd, 0.1f);
    for (int r = 0; r < n; r++) {
        xrow[r] = (int32_t) (gu_rand() % (uint32_t) (nx - 3)) / xdiv * xdiv
                  + (int32_t) (gu_rand() % (uint32_t) xdiv);
    }
    for (int e = 0; e < E; e++) {
        for (int r = offs[e]; r < offs[e + 1]; r++) {
            const float *xr = x + (size_t) (grouped ? xrow[r] / xdiv : r)
                                  * ldx;

            for (int j = 0; j < N; j++) {
                double a = 0, u = 0;
                const float *wg = w + ((size_t) e * WR + j) * Kd;

                for (int k = 0; k < Kd; k++) {
                    a += (double) xr[k] * wg[k];
                }
                if (silu) {
                    const float *wu = w + ((size_t) e * WR + N + j) * Kd;

                    for (int k = 0; k < Kd; k++) {
                        u += (double) xr[k] * wu[k];
                    }
                    a = a / (1.0 + exp(-a)) * u;
                }
                ref[(size_t) r * ldy + j] = (float) a;
            }
        }
    }
    void    *d_x = gu_up(xbits, 2 * (size_t) nx * ldx);
    void    *d_w = gu_up(wbits, 2 * (size_t) E * WR * Kd);
    int32_t *d_offs = (int32_t *) gu_up(offs, sizeof(int32_t) * (E + 1));
    int32_t *d_xrow = (int32_t *) gu_up(xrow, sizeof(int32_t) * (n + 1));
    void    *d_y = gu_dev(4 * (size_t) (n + 1) * ldy);
    int rc = moe_cuda_gemv((moe_bf16_t *) d_x, ldx,
                           grouped ? d_xrow : NULL, xdiv,
                           (moe_bf16_t *) d_w, N, Kd,
                           grouped ? d_offs : NULL, E, n, hint, silu,
                           (float *) d_y, (moe_bf16_t *) d_y, ldy, &tune, 0);
    int ok = gu_sync_ok(rc, "gemv");
    double err = 0, num = 0, den = 0;

    if (silu) {
        gu_down(obits, d_y, 2 * (size_t) n * ldy);
        gu_bf_to_f(out, obits, (size_t) n * ldy);
    } else {
        gu_down(out, d_y, 4 * (size_t) n * ldy);
    }
    for (int r = 0; r < n; r++) {
        for (int j = 0; j < N; j++) {
            double d = (double) out[(size_t) r * ldy + j]
                       - ref[(size_t) r * ldy + j];

            num += d * d;
            den += (double) ref[(size_t) r * ldy + j]
                   * ref[(size_t) r * ldy + j];
        }
    }
    err = den > 0 ? sqrt(num / den) : (num > 0 ? 1 : 0);
    if (!(err == err)) {
        err = INFINITY;
    }
    TAP_OK(ok && n > 0 && err <= (silu ? BF_TOL : F32_TOL), "gemv E %d N %d "
           "Kd %d rows %d (max %d, hint %d) %s%s, %s kernel (err %.2e)", E,
           N, Kd, n, maxr, hint,
           silu ? "SiLU bf16" : "fp32", grouped ? " gathered" : " dense",
           hint <= fma && hint <= 4 ? "CUDA-core" : "tensor-core", err);
    cudaFree(d_x); cudaFree(d_w); cudaFree(d_offs); cudaFree(d_xrow);
    cudaFree(d_y);
    free(offs); free(x); free(xbits); free(w); free(wbits); free(xrow);
    free(ref); free(out); free(obits);
}


/* Every shipped path for this hint: the CUDA-core kernel (a record that
 * sends up to 4 rows there) when the hint allows it, and the tensor-core
 * kernel (gemv_fma_rows 0). */
static void
test_gemv_h(int E, int N, int Kd, int maxr, int hint, int silu, int grouped,
    int xdiv)
{
    if (hint <= 4) {
        test_gemv_t(E, N, Kd, maxr, hint, 4, silu, grouped, xdiv);
    }
    test_gemv_t(E, N, Kd, maxr, hint, 0, silu, grouped, xdiv);
}


/* The default record's path for a hint of maxr rows. */
static void
test_gemv(int E, int N, int Kd, int maxr, int silu, int grouped, int xdiv)
{
    moe_cuda_tuning_t dflt = MOE_CUDA_TUNING_DEFAULTS;

    test_gemv_t(E, N, Kd, maxr, maxr, dflt.gemv_fma_rows, silu, grouped,
                xdiv);
}


static void
test_permute(int T, int E, int K, int D)
{
    int       n = T * K;
    int32_t  *sel = (int32_t *) malloc(sizeof(int32_t) * n);
    float    *selw = (float *) malloc(sizeof(float) * n);
    int32_t  *cnt = (int32_t *) calloc(E, sizeof(int32_t));
    int32_t  *gcnt = (int32_t *) malloc(sizeof(int32_t) * E);
    int32_t  *erow = (int32_t *) malloc(sizeof(int32_t) * n);
    int32_t  *slot = (int32_t *) malloc(sizeof(int32_t) * n);
    int32_t  *gerow = (int32_t *) malloc(sizeof(int32_t) * n);
    int32_t  *gslot = (int32_t *) malloc(sizeof(int32_t) * n);
    float    *xb = (float *) malloc(sizeof(float) * T * D);
    uint16_t *xbits = (uint16_t *) malloc(2 * T * D);
    uint16_t *xe = (uint16_t *) malloc(2 * n * D);
    float    *ye = (float *) malloc(sizeof(float) * n * D);
    float    *ref = (float *) malloc(sizeof(float) * T * D);
    float    *out = (float *) malloc(sizeof(float) * T * D);
    int       bad_rows = 0, bad_gather = 0;

    /* distinct experts per token, expert E-1 never used */
    for (int t = 0; t < T; t++) {
        for (int k = 0; k < K; k++) {
            int e, dup;

            do {
                e = (int) (gu_rand() % (uint32_t) (E - 1));
                dup = 0;
                for (int j = 0; j < k; j++) {
                    dup |= sel[t * K + j] == e;
                }
            } while (dup);
            sel[t * K + k] = e;
            selw[t * K + k] = gu_uniform();
            cnt[e]++;
        }
    }
    for (int e = 0, r = 0; e < E; e++) {
        for (int i = 0; i < n; i++) {
            if (sel[i] == e) {
                erow[r] = i;
                slot[i] = r++;
            }
        }
    }
    gu_fill_bf(xb, xbits, (size_t) T * D, 1.0f);
    gu_fill(ye, (size_t) n * D, 1.0f);
    for (int t = 0; t < T; t++) {
        for (int d = 0; d < D; d++) {
            float acc = 0;

            for (int e = 0; e < E; e++) {
                for (int k = 0; k < K; k++) {
                    if (sel[t * K + k] == e) {
                        acc += ye[(size_t) slot[t * K + k] * D + d]
                               * selw[t * K + k];
                    }
                }
            }
            ref[t * D + d] = acc;
        }
    }
    int32_t *d_sel = (int32_t *) gu_up(sel, sizeof(int32_t) * n);
    float *d_selw = (float *) gu_up(selw, sizeof(float) * n);
    int32_t *d_cnt = (int32_t *) gu_dev(sizeof(int32_t) * E);
    int32_t *d_erow = (int32_t *) gu_dev(sizeof(int32_t) * n);
    int32_t *d_slot = (int32_t *) gu_dev(sizeof(int32_t) * n);
    void *d_xb = gu_up(xbits, 2 * T * D);
    void *d_xe = gu_dev(2 * n * D);
    float *d_ye = (float *) gu_up(ye, sizeof(float) * n * D);
    float *d_out = (float *) gu_dev(sizeof(float) * T * D);
    int rc = moe_cuda_moe_count(d_sel, n, E, d_cnt, 0);
    if (rc == 0) {
        rc = moe_cuda_moe_scatter(d_sel, n, E, d_cnt, d_erow, d_slot, 0);
    }
    if (rc == 0) {
        rc = moe_cuda_moe_gather((moe_bf16_t *) d_xb, D, d_erow, K, n,
                                 (moe_bf16_t *) d_xe, 0);
    }
    if (rc == 0) {
        rc = moe_cuda_moe_unpermute(d_ye, D, d_sel, d_selw, d_slot, T, K,
                                    d_out, 0);
    }
    int ok = gu_sync_ok(rc, "permute");
    gu_down(gcnt, d_cnt, sizeof(int32_t) * E);
    gu_down(gerow, d_erow, sizeof(int32_t) * n);
    gu_down(gslot, d_slot, sizeof(int32_t) * n);
    gu_down(xe, d_xe, 2 * n * D);
    gu_down(out, d_out, sizeof(float) * T * D);
    TAP_OK(ok && memcmp(gcnt, cnt, sizeof(int32_t) * E) == 0,
           "moe_count T %d E %d top-%d (last expert empty)", T, E, K);
    for (int i = 0; i < n; i++) {
        bad_rows += gerow[i] != erow[i] || gslot[i] != slot[i];
    }
    TAP_OK(ok && bad_rows == 0, "moe_scatter stable order and inverse (%d "
           "bad)", bad_rows);
    for (int r = 0; r < n; r++) {
        bad_gather += memcmp(xe + (size_t) r * D,
                             xbits + (size_t) (erow[r] / K) * D, 2 * D) != 0;
    }
    TAP_OK(ok && bad_gather == 0, "moe_gather rows (%d bad)", bad_gather);
    double e = gu_relerr(out, ref, (size_t) T * D);
    TAP_OK(ok && e <= 1e-6, "moe_unpermute weighted sum (err %.2e)", e);
    cudaFree(d_sel); cudaFree(d_selw); cudaFree(d_cnt); cudaFree(d_erow);
    cudaFree(d_slot); cudaFree(d_xb); cudaFree(d_xe); cudaFree(d_ye);
    cudaFree(d_out);
    free(sel); free(selw); free(cnt); free(gcnt); free(erow); free(slot);
    free(gerow); free(gslot); free(xb); free(xbits); free(xe); free(ye);
    free(ref); free(out);
}


static void
test_gemm(cublasHandle_t h, int M, int N, int K, int ldx, int y_bf16,
    float beta)
{
    float    *X = (float *) malloc(sizeof(float) * M * ldx);
    uint16_t *Xb = (uint16_t *) malloc(2 * M * ldx);
    float    *W = (float *) malloc(sizeof(float) * N * K);
    uint16_t *Wb = (uint16_t *) malloc(2 * N * K);
    float    *Y0 = (float *) malloc(sizeof(float) * M * N);
    float    *ref = (float *) malloc(sizeof(float) * M * N);
    float    *out = (float *) malloc(sizeof(float) * M * N);
    uint16_t *ob = (uint16_t *) malloc(2 * M * N);

    gu_fill_bf(X, Xb, (size_t) M * ldx, 1.0f);
    gu_fill_bf(W, Wb, (size_t) N * K, 1.0f);
    gu_fill(Y0, (size_t) M * N, 1.0f);
    for (int m = 0; m < M; m++) {
        for (int n = 0; n < N; n++) {
            double s = 0;

            for (int k = 0; k < K; k++) {
                s += (double) X[m * ldx + k] * W[n * K + k];
            }
            ref[m * N + n] = (float) s + beta * Y0[m * N + n];
        }
    }
    void *d_X = gu_up(Xb, 2 * M * ldx), *d_W = gu_up(Wb, 2 * N * K);
    void *d_Y = y_bf16 ? gu_dev(2 * M * N)
                       : gu_up(Y0, sizeof(float) * M * N);
    int rc = moe_cuda_gemm(h, M, N, K, (moe_bf16_t *) d_X, ldx,
                           (moe_bf16_t *) d_W, K, d_Y, N, y_bf16, beta);
    int ok = gu_sync_ok(rc, "gemm");
    if (y_bf16) {
        gu_down(ob, d_Y, 2 * M * N);
        gu_bf_to_f(out, ob, (size_t) M * N);
    } else {
        gu_down(out, d_Y, sizeof(float) * M * N);
    }
    double e = gu_relerr(out, ref, (size_t) M * N);
    TAP_OK(ok && e <= (y_bf16 ? BF_TOL : 1e-5), "gemm %dx%dx%d ldx %d %s "
           "beta %g (err %.2e)", M, N, K, ldx, y_bf16 ? "bf16" : "fp32",
           beta, e);
    cudaFree(d_X); cudaFree(d_W); cudaFree(d_Y);
    free(X); free(Xb); free(W); free(Wb); free(Y0); free(ref); free(out);
    free(ob);
}


static void
test_init(void)
{
    int64_t   n = 100003;
    float    *src = (float *) malloc(sizeof(float) * n);
    uint16_t *ref = (uint16_t *) malloc(2 * n);
    uint16_t *out = (uint16_t *) malloc(2 * n);
    float    *rf = (float *) malloc(sizeof(float) * n);
    int       bad = 0;

    gu_fill(src, (size_t) n, 100.0f);
    for (int64_t i = 0; i < n; i++) {
        ref[i] = gu_f2bf(src[i]);
    }
    float *d_src = (float *) gu_up(src, sizeof(float) * n);
    void *d_dst = gu_dev(2 * n);
    int ok = gu_sync_ok(moe_cuda_f32_to_bf16(d_src, (moe_bf16_t *) d_dst, n, 0),
                     "f32_to_bf16");
    gu_down(out, d_dst, 2 * n);
    for (int64_t i = 0; i < n; i++) {
        bad += out[i] != ref[i];
    }
    TAP_OK(ok && bad == 0, "f32_to_bf16 rounds like the host (%d differ)",
           bad);

    double mean = 0, m2 = 0, mx = 0;
    ok = gu_sync_ok(moe_cuda_fill_random_bf16((moe_bf16_t *) d_dst, n, 7, 0.5f,
                                           0), "fill_random_bf16");
    gu_down(out, d_dst, 2 * n);
    gu_bf_to_f(rf, out, (size_t) n);
    for (int64_t i = 0; i < n; i++) {
        mean += rf[i];
        m2 += (double) rf[i] * rf[i];
        mx = fmax(mx, fabs(rf[i]));
    }
    mean /= n;
    m2 /= n;
    /* uniform on [-0.5, 0.5): mean 0, E[x^2] = 1/12 */
    TAP_OK(ok && fabs(mean) < 0.01 && fabs(m2 - 1.0 / 12) < 0.005
           && mx <= 0.5, "fill_random_bf16 (mean %.4f, E[x^2] %.4f, max "
           "%.3f)", mean, m2, mx);
    cudaFree(d_src); cudaFree(d_dst);
    free(src); free(ref); free(out); free(rf);
}

/* ------------------------------------------------ architecture pieces */

static void
ref_layernorm(float *o, const float *x, const float *w, const float *bias,
    int D, float eps)
{
    double s = 0, ss = 0;

    for (int d = 0; d < D; d++) {
        s += x[d];
    }
    float mean = (float) (s / D);
    for (int d = 0; d < D; d++) {
        double v = (double) x[d] - mean;

        ss += v * v;
    }
    float inv = 1.0f / sqrtf((float) (ss / D) + eps);
    for (int d = 0; d < D; d++) {
        o[d] = (x[d] - mean) * inv * w[d] + bias[d];
    }
}


static void
test_layernorm(int with_delta, int with_rows)
{
    int    N = 29, D = 264, n = with_rows ? 9 : N;
    float  eps = 1e-5f;
    float *x = (float *) malloc(sizeof(float) * N * D);
    float *dl = (float *) malloc(sizeof(float) * N * D);
    float *w = (float *) malloc(sizeof(float) * D);
    float *bs = (float *) malloc(sizeof(float) * D);
    float *xr = (float *) malloc(sizeof(float) * N * D);
    float *ref = (float *) malloc(sizeof(float) * n * D);
    float *outf = (float *) malloc(sizeof(float) * n * D);
    float *outb = (float *) malloc(sizeof(float) * n * D);
    float *xo = (float *) malloc(sizeof(float) * N * D);
    uint16_t *ob = (uint16_t *) malloc(2 * n * D);
    int32_t rows[9];

    gu_fill(x, (size_t) N * D, 3.0f);
    for (int i = 0; i < N * D; i++) {
        x[i] += 1.5f;                   /* a non-zero mean */
    }
    gu_fill(dl, (size_t) N * D, 1.0f);
    gu_fill(w, D, 1.0f);
    gu_fill(bs, D, 0.5f);
    for (int i = 0; i < 9; i++) {
        rows[i] = (i * 5 + 2) % N;        /* distinct */
    }
    memcpy(xr, x, sizeof(float) * N * D);
    for (int i = 0; i < n; i++) {
        int r = with_rows ? rows[i] : i;

        if (with_delta) {
            for (int d = 0; d < D; d++) {
                xr[r * D + d] = x[r * D + d] + dl[r * D + d];
            }
        }
        ref_layernorm(ref + i * D, xr + r * D, w, bs, D, eps);
    }
    float *d_x = (float *) gu_up(x, sizeof(float) * N * D);
    float *d_dl = (float *) gu_up(dl, sizeof(float) * N * D);
    float *d_w = (float *) gu_up(w, sizeof(float) * D);
    float *d_b = (float *) gu_up(bs, sizeof(float) * D);
    int32_t *d_rows = (int32_t *) gu_up(rows, sizeof(rows));
    void *d_ob = gu_dev(2 * n * D);
    float *d_of = (float *) gu_dev(sizeof(float) * n * D);
    int rc = moe_cuda_add_layernorm(d_x, with_delta ? d_dl : NULL,
                                    with_rows ? d_rows : NULL, n, D, d_w,
                                    d_b, eps, (moe_bf16_t *) d_ob, d_of, 0);
    int ok = gu_sync_ok(rc, "layernorm");

    gu_down(outf, d_of, sizeof(float) * n * D);
    gu_down(ob, d_ob, 2 * n * D);
    gu_down(xo, d_x, sizeof(float) * N * D);
    gu_bf_to_f(outb, ob, (size_t) n * D);
    double ef = gu_relerr(outf, ref, (size_t) n * D);
    double eb = gu_relerr(outb, ref, (size_t) n * D);
    double ex = gu_relerr(xo, xr, (size_t) N * D);
    TAP_OK(ok && ef <= F32_TOL && eb <= BF_TOL && ex <= 1e-7,
           "add_layernorm delta=%d rows=%d (fp32 %.2e, bf16 %.2e, x %.2e)",
           with_delta, with_rows, ef, eb, ex);
    cudaFree(d_x); cudaFree(d_dl); cudaFree(d_w); cudaFree(d_b);
    cudaFree(d_rows); cudaFree(d_ob); cudaFree(d_of);
    free(x); free(dl); free(w); free(bs); free(xr); free(ref); free(outf);
    free(outb); free(xo); free(ob);
}


static void
test_add_bias(void)
{
    int    T = 23, N = 100, ld = 112;
    float *y = (float *) malloc(sizeof(float) * T * ld);
    float *bs = (float *) malloc(sizeof(float) * N);
    float *ref = (float *) malloc(sizeof(float) * T * ld);
    float *out = (float *) malloc(sizeof(float) * T * ld);

    gu_fill(y, (size_t) T * ld, 2.0f);
    gu_fill(bs, N, 1.0f);
    memcpy(ref, y, sizeof(float) * T * ld);
    for (int t = 0; t < T; t++) {
        for (int j = 0; j < N; j++) {
            ref[t * ld + j] += bs[j];      /* columns >= N stay as they were */
        }
    }
    float *d_y = (float *) gu_up(y, sizeof(float) * T * ld);
    float *d_b = (float *) gu_up(bs, sizeof(float) * N);
    int ok = gu_sync_ok(moe_cuda_add_bias(d_y, ld, T, N, d_b, 0), "add_bias");

    gu_down(out, d_y, sizeof(float) * T * ld);
    double e = gu_relerr(out, ref, (size_t) T * ld);
    TAP_OK(ok && e <= 1e-7, "add_bias ld %d > N %d (err %.2e)", ld, N, e);
    cudaFree(d_y); cudaFree(d_b);
    free(y); free(bs); free(ref); free(out);
}


static void
test_head_rmsnorm(int nh, int hd)
{
    int    T = 17, ld = nh * hd + 40;      /* heads inside a wider row */
    float  eps = 1e-6f;
    float *x = (float *) malloc(sizeof(float) * T * ld);
    float *w = (float *) malloc(sizeof(float) * hd);
    float *ref = (float *) malloc(sizeof(float) * T * ld);
    float *out = (float *) malloc(sizeof(float) * T * ld);

    gu_fill(x, (size_t) T * ld, 2.0f);
    gu_fill(w, hd, 1.0f);
    memcpy(ref, x, sizeof(float) * T * ld);
    for (int t = 0; t < T; t++) {
        for (int h = 0; h < nh; h++) {
            float *v = ref + t * ld + h * hd;

            ref_rmsnorm(v, v, w, hd, eps);
        }
    }
    float *d_x = (float *) gu_up(x, sizeof(float) * T * ld);
    float *d_w = (float *) gu_up(w, sizeof(float) * hd);
    int ok = gu_sync_ok(moe_cuda_head_rmsnorm(d_x, ld, T, nh, hd, d_w, eps, 0),
                     "head_rmsnorm");

    gu_down(out, d_x, sizeof(float) * T * ld);
    double e = gu_relerr(out, ref, (size_t) T * ld);
    TAP_OK(ok && e <= F32_TOL, "head_rmsnorm %d heads hd %d (err %.2e)", nh,
           hd, e);
    cudaFree(d_x); cudaFree(d_w);
    free(x); free(w); free(ref); free(out);
}


static float
ref_act(float x, int act)
{
    if (act == 2) {
        return 0.5f * x * (1.0f + erff(x * 0.70710678118654752f));
    }
    if (act == 1) {
        return 0.5f * x * (1.0f + tanhf(0.79788456080286536f
                                        * (x + 0.044715f * x * x * x)));
    }
    return x / (1.0f + expf(-x));
}


static void
test_act_mul(int act, int gated, int bias)
{
    int    R = 21, F = 150, ld = 2 * F, ldh = F + 8;
    float *gu = (float *) malloc(sizeof(float) * R * ld);
    float *bg = (float *) malloc(sizeof(float) * F);
    float *bu = (float *) malloc(sizeof(float) * F);
    float *ref = (float *) malloc(sizeof(float) * R * F);
    float *out = (float *) malloc(sizeof(float) * R * F);
    uint16_t *ob = (uint16_t *) malloc(2 * R * ldh);

    gu_fill(gu, (size_t) R * ld, 4.0f);
    gu_fill(bg, F, 1.0f);
    gu_fill(bu, F, 1.0f);
    for (int r = 0; r < R; r++) {
        for (int j = 0; j < F; j++) {
            float g = gu[r * ld + j] + (bias ? bg[j] : 0.0f);
            float u = gu[r * ld + F + j] + (bias ? bu[j] : 0.0f);

            ref[r * F + j] = gated ? ref_act(g, act) * u : ref_act(u, act);
        }
    }
    float *d_gu = (float *) gu_up(gu, sizeof(float) * R * ld);
    float *d_bg = (float *) gu_up(bg, sizeof(float) * F);
    float *d_bu = (float *) gu_up(bu, sizeof(float) * F);
    void *d_h = gu_dev(2 * R * ldh);
    int ok = gu_sync_ok(moe_cuda_act_mul(gated ? d_gu : NULL, ld,
                                      bias ? d_bg : NULL, d_gu + F, ld,
                                      bias ? d_bu : NULL, R, F, act,
                                      (moe_bf16_t *) d_h, ldh, 0),
                     "act_mul");

    gu_down(ob, d_h, 2 * R * ldh);
    for (int r = 0; r < R; r++) {
        gu_bf_to_f(out + r * F, ob + r * ldh, F);
    }
    double e = gu_relerr(out, ref, (size_t) R * F);
    TAP_OK(ok && e <= BF_TOL, "act_mul act %d gated %d bias %d (err %.2e)",
           act, gated, bias, e);
    cudaFree(d_gu); cudaFree(d_bg); cudaFree(d_bu); cudaFree(d_h);
    free(gu); free(bg); free(bu); free(ref); free(out); free(ob);
}


static void
test_sigmoid_gate_add(void)
{
    int    T = 13, D = 200, ldy = 2 * D;
    float *out = (float *) malloc(sizeof(float) * T * D);
    float *y = (float *) malloc(sizeof(float) * T * ldy);
    float *xf = (float *) malloc(sizeof(float) * T * D);
    float *wg = (float *) malloc(sizeof(float) * D);
    float *ref = (float *) malloc(sizeof(float) * T * D);
    float *got = (float *) malloc(sizeof(float) * T * D);

    gu_fill(out, (size_t) T * D, 1.0f);
    gu_fill(y, (size_t) T * ldy, 1.0f);
    gu_fill(xf, (size_t) T * D, 1.0f);
    gu_fill(wg, D, 0.2f);
    for (int t = 0; t < T; t++) {
        double s = 0;

        for (int d = 0; d < D; d++) {
            s += (double) wg[d] * xf[t * D + d];
        }
        float sg = 1.0f / (1.0f + expf(-(float) s));
        for (int d = 0; d < D; d++) {
            ref[t * D + d] = out[t * D + d] + sg * y[t * ldy + d];
        }
    }
    float *d_out = (float *) gu_up(out, sizeof(float) * T * D);
    float *d_y = (float *) gu_up(y, sizeof(float) * T * ldy);
    float *d_xf = (float *) gu_up(xf, sizeof(float) * T * D);
    float *d_wg = (float *) gu_up(wg, sizeof(float) * D);
    int ok = gu_sync_ok(moe_cuda_sigmoid_gate_add(d_out, d_y, ldy, d_xf, d_wg,
                                               T, D, 0), "sigmoid_gate_add");

    gu_down(got, d_out, sizeof(float) * T * D);
    double e = gu_relerr(got, ref, (size_t) T * D);
    TAP_OK(ok && e <= F32_TOL, "sigmoid_gate_add (err %.2e)", e);
    cudaFree(d_out); cudaFree(d_y); cudaFree(d_xf); cudaFree(d_wg);
    free(out); free(y); free(xf); free(wg); free(ref); free(got);
}


static void
test_add_pos(void)
{
    int     T = 19, D = 72, P = 128;
    float  *x = (float *) malloc(sizeof(float) * T * D);
    float  *pe = (float *) malloc(sizeof(float) * P * D);
    float  *ref = (float *) malloc(sizeof(float) * T * D);
    float  *got = (float *) malloc(sizeof(float) * T * D);
    int32_t pos[19];

    gu_fill(x, (size_t) T * D, 1.0f);
    gu_fill(pe, (size_t) P * D, 1.0f);
    for (int t = 0; t < T; t++) {
        pos[t] = (int32_t) (gu_rand() % P);
        for (int d = 0; d < D; d++) {
            ref[t * D + d] = x[t * D + d] + pe[pos[t] * D + d];
        }
    }
    float *d_x = (float *) gu_up(x, sizeof(float) * T * D);
    float *d_pe = (float *) gu_up(pe, sizeof(float) * P * D);
    int32_t *d_pos = (int32_t *) gu_up(pos, sizeof(pos));
    int ok = gu_sync_ok(moe_cuda_add_pos(d_x, d_pos, T, D, d_pe, 0), "add_pos");

    gu_down(got, d_x, sizeof(float) * T * D);
    double e = gu_relerr(got, ref, (size_t) T * D);
    TAP_OK(ok && e <= 1e-7, "add_pos (err %.2e)", e);
    cudaFree(d_x); cudaFree(d_pe); cudaFree(d_pos);
    free(x); free(pe); free(ref); free(got);
}


/*
 * The prefill cases: the tensor-core kernels (T >= 64 and T * n_kv >
 * 1024, hd 64 / 128; wg 1: the warpgroup kernel, the default; wg 0: the
 * mma.sync kernel through the record's att_prefill_wg), and the SIMT
 * kernel (other head dims, short T, tiles of more than 4 runs).
 */
static void
test_attention_prefill_kernels(int wg)
{
    moe_cuda_tuning_t r = MOE_CUDA_TUNING_DEFAULTS;

    r.att_prefill_wg = wg;
    att_tune = wg ? NULL : &r;
    att_tc_name = wg ? "wg" : "mma";
    test_attention_tc(1, 32, 32, 64, 0, 64, 64);        /* group 1 */
    test_attention_tc(1, 32, 32, 128, 0, 64, 64);
    test_attention_tc(1, 64, 16, 64, 0, 100, 100);      /* group 4 */
    test_attention_tc(1, 64, 16, 128, 0, 100, 100);
    test_attention_tc(1, 64, 8, 128, 0, 257, 257);      /* group 8 */
    test_attention_tc(1, 32, 8, 128, 0, 257, 257);      /* mixtral */
    test_attention_tc(1, 16, 4, 64, 0, 257, 257);
    test_attention_tc(1, 8, 2, 128, 0, 2048, 2048);     /* long prompt */
    test_attention_tc(1, 8, 8, 64, 0, 2048, 2048);
    test_attention_tc(1, 8, 2, 128, 0, 2048, 512);      /* chunk pos 1536 */
    test_attention_tc(1, 32, 8, 128, 0, 700, 300);      /* chunk pos 400 */
    test_attention_tc(1, 16, 16, 64, 0, 333, 129);      /* chunk, 2 tiles */
    test_attention_tc(1, 32, 8, 128, 100, 400, 400);    /* window */
    test_attention_tc(1, 16, 16, 64, 300, 1000, 1000);
    test_attention_tc(1, 32, 8, 128, 1, 300, 300);      /* window 1 */
    test_attention_tc(1, 32, 8, 128, 64, 900, 200);     /* window, chunk */
    /* the SIMT prefill kernel: head dims the tensor-core kernel lacks,
     * and T < 64 with more than 1024 (token, kv head) pairs */
    test_attention_tc(0, 32, 8, 96, 0, 257, 257);
    test_attention_tc(0, 16, 8, 256, 0, 700, 300);
    test_attention_tc(0, 32, 32, 64, 0, 100, 40);
    test_attention_tc(0, 32, 32, 128, 0, 40, 40);
    {
        int l3[3] = { 300, 5, 200 }, l2[2] = { 70, 90 };
        int l7[7] = { 20, 30, 10, 25, 40, 15, 35 };

        /* tiles holding 2-3 runs; the 7 short prompts: > 4 runs per tile
         * (the SIMT kernel via its skip test) */
        test_attention_tc_v(1, 32, 8, 128, 0, 3, l3, 100000, "300/5/200");
        test_attention_tc_v(1, 16, 16, 64, 50, 3, l3, 100000,
                            "300/5/200 window 50");
        test_attention_tc_v(1, 32, 8, 128, 0, 2, l2, 100000, "70/90");
        test_attention_tc_v(1, 32, 8, 128, 0, 7, l7, 100000,
                            "7 prompts of 10..40");
        test_attention_tc_v(1, 16, 8, 64, 0, 3, l3, 120,
                            "300/5/200 chunks of 120");
    }
    att_tune = NULL;
    att_tc_name = "wg";
}


/*
 * The prefill over an e4m3 cache on the warpgroup kernel (record
 * att_prefill_wg8 1; f16 operands, K and V scales 0.5 / 0.25 folded in)
 * against the fp32 reference on the same e4m3-rounded values: head dims
 * 64 / 128, groups 1-8, a 2048-token prompt, chunks after cached
 * positions, windows, tiles of 2-3 sequences and the 7-prompt tile it
 * refuses (the SIMT kernel then takes it).
 */
static void
test_attention_prefill_fp8(void)
{
    moe_cuda_tuning_t r = MOE_CUDA_TUNING_DEFAULTS;
    int               l3[3] = { 300, 5, 200 };
    int               l7[7] = { 20, 30, 10, 25, 40, 15, 35 };

    r.att_prefill_wg8 = 1;
    att_tune = &r;
    att_fp8 = 1;
    att_tc_name = "wg8 (fp8 cache)";
    test_attention_tc(1, 32, 32, 64, 0, 64, 64);
    test_attention_tc(1, 64, 16, 128, 0, 100, 100);
    test_attention_tc(1, 32, 8, 128, 0, 257, 257);
    test_attention_tc(1, 8, 2, 128, 0, 2048, 2048);
    test_attention_tc(1, 8, 8, 64, 0, 2048, 2048);
    test_attention_tc(1, 32, 8, 128, 0, 700, 300);
    test_attention_tc(1, 32, 8, 128, 100, 400, 400);
    test_attention_tc(1, 32, 8, 128, 64, 900, 200);
    test_attention_tc_v(1, 32, 8, 128, 0, 3, l3, 100000, "300/5/200");
    test_attention_tc_v(1, 32, 8, 128, 0, 7, l7, 100000,
                        "7 prompts of 10..40");
    att_tune = NULL;
    att_fp8 = 0;
    att_tc_name = "wg";
}


int
main(void)
{
    int            ndev = 0;
    cublasHandle_t h;

    if (cudaGetDeviceCount(&ndev) != cudaSuccess || ndev == 0) {
        printf("1..0 # SKIP no CUDA device\n");
        return 0;
    }
    test_embed();
    test_rmsnorm(0, 0);
    test_rmsnorm(1, 0);
    test_rmsnorm(1, 1);
    test_rmsnorm_d(1, 1, 4096);
    test_rmsnorm_d(1, 0, 14000);
    test_rmsnorm_d(1, 1, 130);
    test_rope(4, 2, 16, 10000.0f, 0, 1.0f);
    test_rope(32, 8, 128, 1000000.0f, 0, 1.0f);
    test_rope(32, 8, 128, 500000.0f, 0, 1.1386f);   /* yarn's cos/sin scale */
    test_rope(8, 2, 64, 10000.0f, 1, 1.0f);         /* dynamic NTK bases */
    test_rope(4, 4, 16, 0.0f, 0, 1.0f); /* learned positions: write only */
    /* prefill-sized: several heads per block, a partial last group */
    test_rope_t(70, 32, 8, 128, 1000000.0f, 0, 1.0f);
    test_rope_t(70, 5, 1, 16, 10000.0f, 0, 1.0f);
    test_rope_t(130, 8, 2, 64, 10000.0f, 1, 1.0f);
    test_attention(4, 4, 16, 0, 0, 200);
    test_attention(8, 2, 8, 0, 1, 200);
    test_attention(32, 8, 128, 0, 0, 200);
    test_attention(32, 8, 128, 0, 1, 200);
    test_attention(16, 16, 128, 0, 1, 200);
    test_attention(4, 2, 32, 8, 1, 200);
    test_attention(4, 2, 32, 8, 0, 200);
    test_attention(12, 2, 64, 0, 1, 200);      /* group 6: padded template */
    test_attention(8, 1, 256, 0, 1, 200);
    test_attention(32, 8, 128, 0, 0, 2100);     /* decode: many splits */
    test_attention(16, 16, 128, 0, 0, 1000);
    test_attention(4, 2, 32, 100, 0, 1000);     /* window inside splits */
    test_attention(8, 2, 96, 0, 1, 300);        /* hd not a power of 2 */
    /* decode (split) kernel: contexts around the tile and split edges */
    {
        static const int c1[] = { 1, 15, 16, 17, 31, 32, 33, 512, 1000,
                                  1537, 2100 };

        for (size_t i = 0; i < sizeof(c1) / sizeof(c1[0]); i++) {
            test_attention_1(32, 8, 128, 0, c1[i]);     /* mixtral */
        }
    }
    test_attention_1(16, 16, 128, 0, 512);              /* group 1 */
    test_attention_1(16, 16, 128, 0, 2100);
    test_attention_1(12, 2, 64, 0, 1000);               /* group 6 */
    test_attention_1(12, 2, 64, 0, 17);
    test_attention_1(8, 2, 96, 0, 1999);                /* hd 96 */
    test_attention_1(16, 4, 64, 0, 2048);               /* hd 64, group 4 */
    test_attention_1(8, 1, 256, 0, 2100);               /* 64 grid splits */
    test_attention_1(4, 2, 32, 0, 1200);
    test_attention_1(8, 2, 8, 0, 1300);                 /* KT 64, 1 load */
    test_attention_1(32, 8, 128, 100, 2100);            /* window */
    test_attention_1(32, 8, 128, 16, 17);
    test_attention_1(32, 8, 128, 1, 512);               /* window 1 */
    test_attention_1(12, 2, 64, 4096, 1000);            /* window > ctx */
    {
        int l3[3] = { 15, 16, 17 }, l4[4] = { 1, 512, 1000, 2100 };

        test_attention_v(32, 8, 128, 0, 0, 3, l3, "ctx 15/16/17");
        test_attention_v(32, 8, 128, 0, 0, 4, l4, "ctx 1/512/1000/2100");
        test_attention_v(12, 2, 96, 0, 0, 4, l4, "ctx 1/512/1000/2100");
        test_attention_v(8, 2, 64, 300, 0, 4, l4, "ctx 1/512/1000/2100");
    }
    test_attention_batch(32, 8, 128, 0, 0, 8, 1100);    /* b8 */
    test_attention_batch(32, 8, 128, 0, 0, 64, 700);    /* b64: 1 split */
    test_attention_batch(16, 16, 64, 0, 0, 64, 300);    /* 1024 pairs */
    test_attention_batch(12, 2, 128, 0, 1, 6, 150);     /* short prefill */
    test_attention(64, 16, 64, 0, 1, 200);      /* 1792 pairs: tc, 3 runs */
    /* the tensor-core prefill kernels: the default (warpgroup, wgmma)
     * and the FA2-style mma.sync kernel (record att_prefill_wg 0) */
    test_attention_prefill_kernels(1);
    test_attention_prefill_kernels(0);
    test_attention_prefill_fp8();
    test_attention_whole();
    test_attention_batch(32, 8, 128, 0, 1, 40, 60);     /* mixed runs */
    /* the decode kernels side by side (tensor-core / SIMT, bf16 / fp8
     * cache): contexts around the 16-key warp tile and the 64-key split
     * unit, long contexts, groups 1 / 4 / 8, head dims 64 / 128, windows,
     * one split per pair (64 sequences at bps 1, or short contexts) and
     * many (one sequence: default grid, bps 64) */
    {
        /* MOE_TEST_QUICK=1 (under compute-sanitizer): no long contexts */
        static const int c2[] = { 1, 15, 16, 17, 63, 64, 65, 1000, 8192,
                                  33000 };
        int              quick = getenv("MOE_TEST_QUICK") != NULL;
        int              lb[64];

        for (size_t i = 0; i < sizeof(c2) / sizeof(c2[0]); i++) {
            if (!quick || c2[i] <= 1000) {
                test_attention_dk1(0, 32, 8, 128, 0, c2[i]);    /* mixtral */
            }
        }
        {
            /* att_early: the last key at the start, middle and end of a
             * tile (16 keys), of a warp's range and of a split */
            static const int ce[] = { 1, 2, 16, 17, 31, 64, 65, 200, 512,
                                      1000, 2100 };

            for (int i = 0; i < (int) (sizeof(ce) / sizeof(ce[0])); i++) {
                test_attention_early(0, 0, 32, 8, 128, 0, ce[i]);
                test_attention_early(1, 0, 32, 8, 128, 0, ce[i]);
            }
            if (!quick) {
                test_attention_early(0, 64, 32, 8, 128, 0, 8192);
                test_attention_early(1, 1, 32, 8, 128, 0, 9000);
            }
            test_attention_early(0, 64, 32, 8, 128, 0, 1000); /* 64 splits */
            test_attention_early(0, 0, 16, 4, 64, 0, 777);     /* hd 64 */
            test_attention_early(1, 0, 16, 4, 64, 0, 33);
            test_attention_early(0, 0, 32, 8, 128, 100, 2100); /* window */
            test_attention_early(1, 0, 32, 8, 128, 16, 17);
        }
        if (!quick) {
            test_attention_dk1(64, 32, 8, 128, 0, 8192);    /* 64 splits */
            test_attention_dk1(1, 32, 8, 128, 0, 33000);    /* 17 splits */
            test_attention_dk1(0, 32, 8, 128, 1000, 33000); /* window */
        }
        test_attention_dk1(0, 16, 16, 128, 0, 1000);        /* group 1 */
        test_attention_dk1(0, 16, 16, 64, 0, 2100);
        test_attention_dk1(0, 16, 4, 64, 0, quick ? 2000 : 8192); /* hd 64 */
        test_attention_dk1(0, 16, 4, 64, 0, 17);
        test_attention_dk1(0, 8, 1, 128, 0, 3000);          /* group 8 */
        test_attention_dk1(0, 64, 8, 64, 0, 777);
        test_attention_dk1(0, 12, 2, 64, 0, 1000);          /* group 6 */
        test_attention_dk1(0, 32, 8, 128, 100, 2100);       /* windows */
        test_attention_dk1(0, 32, 8, 128, 1, 512);
        test_attention_dk1(0, 32, 8, 128, 16, 17);
        test_attention_dk1(0, 16, 4, 64, 4096, 1000);       /* > ctx */
        for (int s = 0; s < 64; s++) {
            lb[s] = 1 + (int) (gu_rand() % (quick ? 200u : 1200u));
        }
        lb[0] = 1;
        lb[1] = 16;
        lb[2] = 17;
        lb[3] = quick ? 200 : 1200;
        test_attention_dk4(0, 32, 8, 128, 0, 64, lb, "64 mixed seqs");
        test_attention_dk4(1, 32, 8, 128, 0, 64, lb, "64 mixed seqs");
        test_attention_dk4(0, 32, 8, 128, 200, 64, lb,
                           "64 mixed seqs window 200");
        test_attention_dk4(0, 16, 16, 64, 0, 64, lb, "64 mixed seqs");
        test_attention_dk4(0, 8, 1, 128, 0, 8, lb + 56, "8 seqs group 8");
    }
    test_silu(33, 100);
    test_silu(5, 2050);
    test_silu(3, 4104);
    test_route(50, 64, 8, 2, 1);
    test_route(40, 2048, 64, 8, 1);
    test_route(30, 128, 60, 4, 1);
    test_route(1, 4096, 8, 2, 1);       /* decode shape: one token */
    test_route(19, 66, 8, 2, 1);        /* D % 4 != 0: scalar path */
    test_route(40, 128, 60, 4, 0);      /* raw top-k weights (Qwen2-MoE) */
    test_route(7, 64, 4, 2, 0);
    test_route(300, 4096, 8, 2, 1);     /* prefill: all-experts kernel */
    test_route(260, 256, 16, 4, 1);     /* the same for 9..16 experts */
    test_route_permute(1, 4096, 8, 2, 1);       /* decode, one token */
    test_route_permute(7, 256, 8, 2, 1);
    test_route_permute(32, 128, 60, 4, 1);      /* the most one launch takes */
    test_route_permute(32, 128, 60, 4, 0);
    test_route_permute(33, 128, 60, 4, 1);      /* separate launches */
    test_route_permute(5, 64, 128, 8, 1);
    test_route_permute(16, 64, 256, 8, 1);      /* E at the limit */
    test_route_permute(24, 66, 8, 2, 1);        /* D % 4: scalar logits */
    for (int lean = 0; lean < 2; lean++) {
        test_norm_route1(4096, 8, 2, 1, 0, lean);   /* Mixtral */
        test_norm_route1(4096, 8, 2, 1, 1, lean);
        test_norm_route1(1000, 8, 2, 1, 1, lean);   /* a partial tile */
        test_norm_route1(2048, 60, 4, 1, 1, lean);  /* Qwen-MoE */
        test_norm_route1(2048, 64, 8, 0, 1, lean);  /* raw top-k weights */
        test_norm_route1(7168, 256, 8, 1, 1, lean); /* two float4 a thread */
        test_norm_route1(4100, 8, 2, 1, 0, lean);
        test_norm_route1(64, 4, 4, 1, 1, lean);     /* K == E: margin 1 */
        test_norm_route1(8192, 128, 32, 1, 1, lean); /* the largest taken */
    }
    /* dense_pre: mixtral's q|k|v and o at 1 and 2 rows, odd small
     * shapes (a partial last chunk; fewer chunks than warps), 4-bit
     * groups of 32 / 64 / 128 and a pass of 16 rows */
    for (int n = 1; n <= 2; n++) {
        test_dense_pre(0, 6144, 4096, 0, n);
        test_dense_pre(0, 4096, 4096, 0, n);
        test_dense_pre(1, 6144, 4096, 128, n);
        test_dense_pre(1, 4096, 4096, 128, n);
    }
    test_dense_pre(0, 40, 208, 0, 1);
    test_dense_pre(0, 136, 4096 + 48, 0, 2);
    test_dense_pre(1, 128, 512, 32, 1);
    test_dense_pre(1, 192, 1024, 64, 2);
    test_dense_pre(1, 256, 4096, 128, 9);
    test_norm_route1_refuse();
    for (int mode = 0; mode < 3; mode++) {
        test_topk_paths(200, 8, 2, 1, mode);        /* Mixtral */
        test_topk_paths(200, 8, 2, 0, mode);
        test_topk_paths(100, 32, 8, 1, mode);       /* E at the lane limit */
        test_topk_paths(100, 17, 1, 1, mode);
        test_topk_paths(50, 4, 4, 1, mode);         /* K == E: margin 1 */
        test_topk_paths(50, 1, 1, 0, mode);
    }
    test_route(300, 256, 60, 4, 1);     /* more experts: per-expert grid */
    test_permute(100, 8, 2, 64);
    test_permute(300, 64, 8, 40);
    test_permute(1, 8, 2, 4096);        /* decode: 4 column blocks */
    test_permute(50, 8, 2, 42);         /* D % 4 != 0: the loop kernel */
    test_permute_one(100, 8, 2);
    test_permute_one(3000, 8, 2);       /* several 1024-slot windows */
    test_permute_one(300, 64, 8);
    test_permute_one(1, 60, 4);
    test_unpermute_rmsnorm(1, 4096, 2, 0);
    test_unpermute_rmsnorm(7, 2048, 8, 0);
    test_unpermute_rmsnorm(9, 200, 4, 1);
    test_unpermute_rmsnorm(5, 14000, 2, 1);
    test_unpermute_rmsnorm_refusals();
    test_gemv(8, 100, 264, 20, 0, 1, 2);        /* k tail, gathered rows */
    test_gemv(8, 72, 512, 70, 1, 1, 8);         /* SiLU, 2 passes */
    test_gemv(1, 1000, 256, 5, 0, 0, 1);        /* dense, no offsets */
    test_gemv(64, 64, 128, 8, 1, 1, 8);         /* many empty experts */
    test_gemv(4, 48, 4096, 33, 0, 1, 2);        /* long k, NT 8 tile */
    test_gemv(1, 40, 96, 3, 1, 0, 1);           /* dense SiLU */
    test_gemv(64, 64, 256, 1, 1, 1, 8);         /* rows < groups: compact grid */
    test_gemv(8, 96, 512, 1, 0, 1, 2);          /* decode-like, compact grid */
    /* two-stage (NT <= 2) main loop: odd / even numbers of chunk sets,
     * both loop exits, partial last chunk, fewer chunks than warps */
    test_gemv(1, 200, 4136, 8, 0, 0, 1);        /* 130 chunks, k tail */
    test_gemv(8, 48, 2056, 16, 1, 1, 4);        /* SiLU NT 2, 65 chunks */
    test_gemv(3, 64, 1000, 12, 0, 1, 1);        /* NT 2, 32 chunks */
    test_gemv(1, 80, 1536, 2, 0, 0, 1);         /* 3 chunk sets */
    test_gemv(2, 24, 40, 1, 1, 1, 2);           /* 2 chunks < 4 warps */
    /* CUDA-core path (hint <= 4 rows, record gemv_fma_rows 4) and the
     * tensor-core kernel on the same shapes (gemv_fma_rows 0): whole
     * 512-byte row segments, NTF 1/2/4, groups fuller than the hint take
     * several passes, k tails, N not a multiple of the 8 columns of a
     * block, decode shapes */
    test_gemv_h(8, 100, 264, 9, 1, 0, 1, 2);    /* passes of 1 row */
    test_gemv_h(8, 72, 520, 7, 2, 1, 1, 8);     /* SiLU, passes of 2 */
    test_gemv_h(5, 30, 4104, 11, 4, 0, 1, 1);   /* passes of 4, k tail */
    test_gemv_h(1, 1003, 2056, 3, 3, 0, 0, 1);  /* dense, N % 8 != 0 */
    test_gemv_h(1, 37, 96, 4, 4, 1, 0, 1);      /* dense SiLU, short k */
    test_gemv_h(8, 512, 4096, 1, 1, 1, 1, 2);   /* mixtral-like decode */
    test_gemv_h(64, 64, 1024, 1, 1, 1, 1, 8);   /* compact grid, 64 groups */
    if (cublasCreate(&h) != CUBLAS_STATUS_SUCCESS) {
        TAP_OK(0, "cublasCreate");
    } else {
        test_gemm(h, 37, 96, 64, 64, 0, 0.0f);
        test_gemm(h, 1, 1000, 256, 256, 0, 0.0f);
        test_gemm(h, 64, 128, 512, 520, 1, 0.0f);
        test_gemm(h, 17, 64, 64, 64, 0, 1.0f);
        cublasDestroy(h);
    }
    test_init();
    test_layernorm(0, 0);
    test_layernorm(1, 0);
    test_layernorm(1, 1);
    test_add_bias();
    test_head_rmsnorm(4, 32);
    test_head_rmsnorm(2, 128);
    for (int act = 0; act < 3; act++) {
        test_act_mul(act, 1, 0);
        test_act_mul(act, 1, 1);
        test_act_mul(act, 0, 1);
    }
    test_sigmoid_gate_add();
    test_add_pos();
    test_argmax(7, 512, 512, 0, 0);
    test_argmax(64, 32000, 32000, 0, 0);
    test_argmax(64, 32000, 32000, 1, 0);
    test_argmax(64, 32000, 32000, 2, 1);
    test_argmax(17, 128256, 128256, 1, 1);
    test_argmax(9, 128256, 128256, 2, 0);
    test_argmax(13, 50257, 50260, 1, 1);
    TAP_PLAN(tap_n);
    return TAP_DONE();
}
