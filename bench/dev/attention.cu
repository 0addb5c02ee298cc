/*
 * Dev harness: paged attention (kernels/attention.cu) on mixtral's
 * attention shape (32 heads, 8 kv heads, head_dim 128, 16-token blocks).
 *
 * Decode (B sequences of C positions, one query each): the shipped
 * launcher (the tensor-core key-split decode kernel, record att_split_bps
 * 2), the same with att_split_bps 1 and 4, the SIMT key-split kernel
 * (record att_decode_tc 0), and the variant that does not ship: the
 * SIMT kernel with its own key splits plus a combine launch (the path
 * before the split kernel).  Rate: K/V bytes read / time.
 *
 * Prefill (one sequence of T tokens, causal): the shipped launcher (the
 * warpgroup kernel, kernel_attention_prefill_wg: key tiles of 128, two
 * stages) and the variants that do not ship: the SIMT kernel for every
 * tile, the FA2-style mma.sync kernel (4 warps of 32 rows; record
 * att_prefill_wg 0) in its template instances, the warpgroup kernel's
 * other instances, its overlapped version (att_prefill_wgp.cuh), its
 * warp-specialised version (att_prefill_ws.cuh, only with DEV_ATT_WS set;
 * DEV_ATT_WS=only: the prefill lines of the shipped kernel and of it)
 * and the 8-warp kernel shipped before (att_prefill_8w.cuh); each checked
 * against the shipped output.  Then the prefill over an e4m3 cache: the
 * SIMT kernel against the warpgroup kernel on f16 operands (record
 * att_prefill_wg8 1).  Rate: 4 * heads * head_dim * T (T + 1) / 2
 * flops.  Then the same against the shipped launcher on several sequences
 * per row tile (runs, a context before the queries) with and without a
 * window.
 *
 *   build/bench/dev/attention
 */
#include <string.h>

#include "../../kernels/attention.cu"

#include "att_prefill_8w.cuh"
#include "att_prefill_wgp.cuh"
#include "att_prefill_ws.cuh"
#include "dev.cuh"
#include "init.h"

#define DEV_NH     32
#define DEV_NKV    8
#define DEV_HD     128
#define DEV_BS     16

/* the SIMT split path: blocks wanted, most splits, most split records */
#define DEV_SIMT_TARGET  528            /* 4 per SM of 132 */
#define DEV_SIMT_SPLIT   32
#define DEV_SIMT_MAX_REC (DEV_SIMT_TARGET * 2 + 64)


/* One block per (token, kv head): merge the ns split states the SIMT
 * kernel wrote (m, l, acc per head) into out. */
__global__ void
kernel_dev_attention_combine(const float *part, int ns, int n_heads,
    int n_kv, int hd, bf16 *out)
{
    int          t = blockIdx.x / n_kv, g = blockIdx.x % n_kv;
    int          grp = n_heads / n_kv;
    size_t       rs = (size_t) grp * (hd + 2);
    const float *p0 = part + (size_t) blockIdx.x * ns * rs;

    for (int i = threadIdx.x; i < grp * hd; i += blockDim.x) {
        int   h = i / hd, d = i % hd;
        float M = -INFINITY, L = 0.0f, o = 0.0f;

        for (int s = 0; s < ns; s++) {
            M = fmaxf(M, p0[s * rs + h]);
        }
        for (int s = 0; s < ns; s++) {
            const float *r = p0 + s * rs;

            if (r[h] != -INFINITY) {
                float f = expf(r[h] - M);

                L += r[grp + h] * f;
                o += r[2 * grp + h * hd + d] * f;
            }
        }
        out[(size_t) t * n_heads * hd + (size_t) (g * grp + h) * hd + d] =
            moe_f2bf(o / L);
    }
}


/* The inputs of one attention call. */
typedef struct {
    int      T, ld, nblk;
    float   *qkv;          /* (T, ld) fp32 */
    int32_t *pos, *seq;    /* (T) */
    int32_t *bt, *bt_off;  /* (nblk), (sequences) */
    bf16    *kv;           /* (nblk, 2, BS, NKV, HD) */
    float   *part;         /* the launcher's workspace */
    bf16    *ref, *out;    /* (T, NH * HD) */
} dev_att_t;


/* ns sequences of ctx positions; the last q of each are the queries. */
static void
dev_att_make(dev_att_t *a, int ns, int ctx, int q)
{
    int       per = (ctx + DEV_BS - 1) / DEV_BS;
    int32_t  *pos, *seq, *bt, *off;
    float    *qkv;

    a->T = ns * q;
    a->ld = (DEV_NH + 2 * DEV_NKV) * DEV_HD;
    a->nblk = ns * per;
    pos = (int32_t *) malloc(sizeof(int32_t) * a->T);
    seq = (int32_t *) malloc(sizeof(int32_t) * a->T);
    bt = (int32_t *) malloc(sizeof(int32_t) * a->nblk);
    off = (int32_t *) malloc(sizeof(int32_t) * ns);
    qkv = (float *) malloc(sizeof(float) * (size_t) a->T * a->ld);
    for (int s = 0; s < ns; s++) {
        off[s] = s * per;
        for (int i = 0; i < q; i++) {
            pos[s * q + i] = ctx - q + i;
            seq[s * q + i] = s;
        }
    }
    for (int b = 0; b < a->nblk; b++) {
        bt[b] = (b * 7919) % a->nblk;   /* scattered pages */
    }
    for (size_t i = 0; i < (size_t) a->T * a->ld; i++) {
        qkv[i] = gu_uniform();
    }
    a->qkv = (float *) gu_up(qkv, sizeof(float) * (size_t) a->T * a->ld);
    a->pos = (int32_t *) gu_up(pos, sizeof(int32_t) * a->T);
    a->seq = (int32_t *) gu_up(seq, sizeof(int32_t) * a->T);
    a->bt = (int32_t *) gu_up(bt, sizeof(int32_t) * a->nblk);
    a->bt_off = (int32_t *) gu_up(off, sizeof(int32_t) * ns);
    a->kv = (bf16 *) dev_rand_bf((size_t) a->nblk * 2 * DEV_BS * DEV_NKV
                                 * DEV_HD, 1.0f);
    a->part = (float *) gu_dev(sizeof(float) * (size_t)
                               moe_cuda_attention_ws_floats(DEV_NH, DEV_NKV,
                                                            DEV_HD));
    if (moe_cuda_attention_ws_init(a->part, 0) != MOE_K_OK) {
        fprintf(stderr, "ws_init: %s\n", moe_cuda_last_error());
        exit(2);
    }
    a->ref = (bf16 *) gu_dev((size_t) a->T * DEV_NH * DEV_HD * 2);
    a->out = (bf16 *) gu_dev((size_t) a->T * DEV_NH * DEV_HD * 2);
    free(pos); free(seq); free(bt); free(off); free(qkv);
}


static void
dev_att_free(dev_att_t *a)
{
    cudaFree(a->qkv); cudaFree(a->pos); cudaFree(a->seq); cudaFree(a->bt);
    cudaFree(a->bt_off); cudaFree(a->kv); cudaFree(a->part);
    cudaFree(a->ref); cudaFree(a->out);
}


static int
dev_att_shipped(const dev_att_t *a, const moe_cuda_tuning_t *t, bf16 *out)
{
    return moe_cuda_attention(a->qkv, a->ld, a->T, a->pos, a->seq, a->bt,
                              a->bt_off, (const moe_bf16_t *) a->kv, DEV_BS,
                              DEV_NH, DEV_NKV, DEV_HD, 0, (moe_bf16_t *) out,
                              a->part, t, 0);
}


/* The SIMT kernel for every token, with its own key splits (ns > 1 only
 * for fewer than DEV_SIMT_TARGET (token, kv head) pairs) and a combine
 * launch. */
static int
dev_att_simt(const dev_att_t *a)
{
    int    pairs = a->T * DEV_NKV, ns = 1;
    float *p4 = a->part + ATT_CNT_FLOATS;

    if (pairs < DEV_SIMT_TARGET) {
        ns = (DEV_SIMT_TARGET + pairs - 1) / pairs;
        ns = ns > DEV_SIMT_SPLIT ? DEV_SIMT_SPLIT : ns;
        if (pairs * ns > DEV_SIMT_MAX_REC) {
            ns = 1;
        }
    }
    kernel_attention_prefill_simt<DEV_NH / DEV_NKV, DEV_HD, bf16>
        <<<dim3((unsigned) pairs, (unsigned) ns), ATT_WARPS * 32>>>(
            a->qkv, a->ld, a->pos, a->seq, a->bt, a->bt_off, a->kv, DEV_BS,
            DEV_NH, DEV_NKV, DEV_HD, 0, a->out, p4, 1.0f, 1.0f, 0);
    if (ns > 1) {
        kernel_dev_attention_combine<<<(unsigned) pairs, 128>>>(
            p4, ns, DEV_NH, DEV_NKV, DEV_HD, a->out);
    }
    return (int) cudaGetLastError();
}


static void
dev_decode(int B, int ctx)
{
    dev_att_t         a;
    moe_cuda_tuning_t tune = MOE_CUDA_TUNING_DEFAULTS;
    double            bytes = 2.0 * 2.0 * B * (double) ctx * DEV_NKV * DEV_HD;
    size_t            on;
    double            ms;
    char              name[64];

    dev_att_make(&a, B, ctx, 1);
    on = (size_t) a.T * DEV_NH * DEV_HD;
    printf("decode: batch %d, context %d (%.1f MB of K/V)\n", B, ctx,
           bytes / 1e6);
    ms = dev_time(50, [&]() { return dev_att_shipped(&a, NULL, a.ref); });
    dev_line("shipped (tc split kernel, bps 2)", ms, bytes, 0, -1, 0);
    for (int bps = 1; bps <= 4; bps *= 4) {
        tune.att_split_bps = bps;
        ms = dev_time(50, [&]() { return dev_att_shipped(&a, &tune, a.out); });
        snprintf(name, sizeof(name), "record att_split_bps %d", bps);
        dev_line(name, ms, bytes, 0, dev_diff(a.out, a.ref, on, 1), 2e-2);
    }
    tune.att_split_bps = 2;
    tune.att_decode_tc = 0;
    ms = dev_time(50, [&]() { return dev_att_shipped(&a, &tune, a.out); });
    dev_line("record att_decode_tc 0 (SIMT split)", ms, bytes, 0,
             dev_diff(a.out, a.ref, on, 1), 2e-2);
    ms = dev_time(50, [&]() { return dev_att_simt(&a); });
    dev_line("variant SIMT kernel + combine", ms, bytes, 0,
             dev_diff(a.out, a.ref, on, 1), 2e-2);
    dev_att_free(&a);
}


/* The tensor-core prefill kernel's instances (kernels/attention.cu: head
 * dim, keys per loaded tile, keys per S sub-tile, cp.async stages, CTAs
 * per SM in __launch_bounds__; the shipped one is 32 / 32 / 2 / 2) and the
 * previous 8-warp kernel (att_prefill_8w.cuh). */
typedef int (*dev_fa2_fn)(int, const float *, int, const int32_t *,
                          const int32_t *, const int32_t *, const int32_t *,
                          const bf16 *, int, int, int, int, bf16 *,
                          cudaStream_t);

static int
dev_occ_8w(void)
{
    return 1;
}

#define DEV_FA2(BN, BC, ST, MB)                                              \
    { "4w bn" #BN " bc" #BC " st" #ST " mb" #MB,                             \
      att_tc_launch_v<DEV_HD, BN, BC, ST, MB>,                               \
      att_tc_occupancy<DEV_HD, BN, BC, ST, MB> }

#define DEV_WG(BN, ST)                                                       \
    { "wg bn" #BN " st" #ST, att_wg_launch_v<DEV_HD, BN, ST>,                \
      att_wg_occupancy<DEV_HD, BN, ST> }

/* the overlapped version (att_prefill_wgp.cuh) */
#define DEV_WGP(BN, ST)                                                      \
    { "wgp bn" #BN " st" #ST, att_wgp_launch_v<DEV_HD, BN, ST>,              \
      att_wgp_occupancy<DEV_HD, BN, ST> }

/* the warp-specialised version (att_prefill_ws.cuh; DEV_ATT_WS=1) */
#define DEV_WS(BN, ST)                                                       \
    { "ws bn" #BN " st" #ST, att_ws_launch_v<DEV_HD, BN, ST>,                \
      att_ws_occupancy<DEV_HD, BN, ST> }

static const struct {
    const char *name;
    dev_fa2_fn  fn;
    int       (*occ)(void);
} dev_fa2[] = {
    { "8w bn64 (shipped until 12-03)", att_8w_launch<DEV_HD>, dev_occ_8w },
    DEV_FA2(64, 16, 2, 2),
    DEV_FA2(64, 64, 2, 2),
    DEV_FA2(32, 32, 3, 2),
    DEV_FA2(32, 16, 2, 2),
    DEV_FA2(32, 32, 2, 2),
    DEV_WG(128, 2),
    DEV_WG(64, 2),
    DEV_WG(64, 3),
    DEV_WGP(128, 3),
    DEV_WGP(64, 3),
    DEV_WGP(64, 4),
    DEV_WS(128, 3),
    DEV_WS(128, 2),
    DEV_WS(64, 4),
};

/* The shipped launcher with a window. */
static int
dev_att_shipped_w(const dev_att_t *a, int window, bf16 *out)
{
    return moe_cuda_attention(a->qkv, a->ld, a->T, a->pos, a->seq, a->bt,
                              a->bt_off, (const moe_bf16_t *) a->kv, DEV_BS,
                              DEV_NH, DEV_NKV, DEV_HD, window,
                              (moe_bf16_t *) out, a->part, NULL, 0);
}


/* Every FA2-style instance into a->out (filled with NaN first: a tile it
 * left alone fails the check), timed and checked against a->ref; its
 * name printed (and flushed) before it runs, so a hang names it. */
static void
dev_fa2_lines(dev_att_t *a, int window, double flops, int iters)
{
    size_t on = (size_t) a->T * DEV_NH * DEV_HD;
    char   name[64];

    for (size_t v = 0; v < sizeof(dev_fa2) / sizeof(dev_fa2[0]); v++) {
        double ms;

        const char *ws = getenv("DEV_ATT_WS");
        int         is_ws = strncmp(dev_fa2[v].name, "ws ", 3) == 0;

        if ((is_ws && ws == NULL)       /* slower (run 19a): opt-in */
            || (!is_ws && ws != NULL && strcmp(ws, "only") == 0)) {
            continue;
        }

        fprintf(stderr, "running %s\n", dev_fa2[v].name);
        DEV_CHECK(cudaMemset(a->out, 0xff, on * 2));   /* bf16 NaN */
        ms = dev_time(iters, [&]() {
            return dev_fa2[v].fn(a->T, a->qkv, a->ld, a->pos, a->seq, a->bt,
                                 a->bt_off, a->kv, DEV_BS, DEV_NH, DEV_NKV,
                                 window, a->out, 0);
        });
        snprintf(name, sizeof(name), "%s (%d/SM)", dev_fa2[v].name,
                 dev_fa2[v].occ());
        dev_line(name, ms, 0, flops, dev_diff(a->out, a->ref, on, 1), 2e-2);
    }
}


static void
dev_prefill(int T)
{
    dev_att_t a;
    double    flops = 4.0 * DEV_NH * DEV_HD * (double) T * (T + 1) / 2;
    size_t    on;
    double    ms;

    dev_att_make(&a, 1, T, T);
    on = (size_t) a.T * DEV_NH * DEV_HD;
    printf("prefill: one sequence of %d tokens (%.1f GFLOP)\n", T,
           flops / 1e9);
    ms = dev_time(10, [&]() { return dev_att_shipped(&a, NULL, a.ref); });
    dev_line("shipped (tensor-core kernel)", ms, 0, flops, -1, 0);
    ms = dev_time(10, [&]() { return dev_att_simt(&a); });
    dev_line("variant SIMT kernel only", ms, 0, flops,
             dev_diff(a.out, a.ref, on, 1), 2e-2);
    dev_fa2_lines(&a, 0, flops, 10);
    dev_att_free(&a);
}


/* One sequence of T tokens over an e4m3 cache (random codes over the whole
 * e4m3 range, K and V scales 1 / 448): the SIMT kernel (the default
 * record) against the warpgroup kernel on f16 operands (record
 * att_prefill_wg8 1, not yet run before this harness runs it), checked
 * against the SIMT output. */
static void
dev_prefill_fp8(int T)
{
    dev_att_t         a;
    double            flops = 4.0 * DEV_NH * DEV_HD * (double) T * (T + 1) / 2;
    size_t            on, cn;
    uint8_t          *c8;
    double            ms;
    moe_cuda_tuning_t wg8 = MOE_CUDA_TUNING_DEFAULTS;
    moe_cuda_att_kv_t kvo = { 1, 1.0f / 448, 1.0f / 448, 0, 0 };

    dev_att_make(&a, 1, T, T);
    on = (size_t) a.T * DEV_NH * DEV_HD;
    cn = (size_t) a.nblk * 2 * DEV_BS * DEV_NKV * DEV_HD;
    c8 = (uint8_t *) gu_dev(cn);
    if (moe_cuda_fill_random_fp8(c8, (int64_t) cn, 7, 0) != MOE_K_OK) {
        fprintf(stderr, "fill_random_fp8: %s\n", moe_cuda_last_error());
        exit(2);
    }
    wg8.att_prefill_wg8 = 1;
    printf("prefill, fp8 (e4m3) cache: one sequence of %d tokens "
           "(%.1f GFLOP)\n", T, flops / 1e9);
    ms = dev_time(5, [&]() {
        return moe_cuda_attention_ex(a.qkv, a.ld, a.T, a.pos, a.seq, a.bt,
                                     a.bt_off, c8, DEV_BS, DEV_NH, DEV_NKV,
                                     DEV_HD, 0, (moe_bf16_t *) a.ref, a.part,
                                     &kvo, NULL, 0);
    });
    dev_line("shipped (SIMT kernel)", ms, 0, flops, -1, 0);
    DEV_CHECK(cudaMemset(a.out, 0xff, on * 2));        /* bf16 NaN */
    ms = dev_time(5, [&]() {
        return moe_cuda_attention_ex(a.qkv, a.ld, a.T, a.pos, a.seq, a.bt,
                                     a.bt_off, c8, DEV_BS, DEV_NH, DEV_NKV,
                                     DEV_HD, 0, (moe_bf16_t *) a.out, a.part,
                                     &kvo, &wg8, 0);
    });
    dev_line("record att_prefill_wg8 1 (wg8)", ms, 0, flops,
             dev_diff(a.out, a.ref, on, 1), 2e-2);
    cudaFree(c8);
    dev_att_free(&a);
}


/* ns sequences of q queries after ctx - q positions of context each (row
 * tiles of up to two runs, key ranges not aligned to tiles), window w. */
static void
dev_prefill_mixed(int ns, int ctx, int q, int w)
{
    dev_att_t a;
    double    keys = 0, ms;

    dev_att_make(&a, ns, ctx, q);
    for (int p = ctx - q; p < ctx; p++) {
        keys += w > 0 && p + 1 > w ? w : p + 1;
    }

    double flops = 4.0 * DEV_NH * DEV_HD * ns * keys;

    printf("prefill: %d sequences of %d queries at %d..%d, window %d "
           "(%.1f GFLOP)\n", ns, q, ctx - q, ctx - 1, w, flops / 1e9);
    ms = dev_time(5, [&]() { return dev_att_shipped_w(&a, w, a.ref); });
    dev_line("shipped (tensor-core kernel)", ms, 0, flops, -1, 0);
    dev_fa2_lines(&a, w, flops, 5);
    dev_att_free(&a);
}


int
main(void)
{
    static const int dec[][2] = {
        { 1, 512 }, { 1, 4096 }, { 8, 1024 }, { 32, 1024 }, { 64, 700 },
        { 128, 512 }
    };

    const char *ws = getenv("DEV_ATT_WS");

    /* line-buffered: a step killed by its time limit (a hung variant)
     * keeps every line printed before */
    setvbuf(stdout, NULL, _IOLBF, 0);
    gu_seed(3);
    dev_limits();
    for (size_t i = 0; i < sizeof(dec) / sizeof(dec[0]); i++) {
        if (ws == NULL || strcmp(ws, "only") != 0) {
            dev_decode(dec[i][0], dec[i][1]);
        }
    }
    /* the fp8-cache lines first (the wg8 kernel against the SIMT one),
     * before the variants, so a variant that faults or hangs (a new one
     * not yet run) cannot cost them */
    if (ws == NULL || strcmp(ws, "only") != 0) {
        dev_prefill_fp8(2048);
        dev_prefill_fp8(8192);
    }
    dev_prefill(512);
    dev_prefill(2048);
    dev_prefill(8192);
    dev_prefill_mixed(3, 1000, 300, 0);
    dev_prefill_mixed(3, 1000, 300, 256);
    return dev_failed;
}
