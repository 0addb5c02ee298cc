/*
 * Checks the model loader and the fp32 CPU backend on the tiny test models
 * in t/data/models (run from the repository root):
 *  - every model loads (per-expert, fused, sharded, tied, GQA, sliding
 *    window layouts; Llama attention_bias + mlp_bias, Qwen2 q/k/v bias,
 *    Qwen2-MoE shared expert + raw top-k weights + an mlp_only layer,
 *    Qwen3-MoE q/k norm + renormalised top-k, GPT-2 LayerNorm / GELU /
 *    learned positions / Conv1D) with the hparams its config.json gives;
 *  - decoding token by token, chunked prefill (13 then chunks of 7) over a
 *    shuffled non-contiguous block table, two sequences in one step, and 2
 *    threads all give BITWISE identical logits (the server relies on it);
 *  - token_out (the backend's greedy id) equals the argmax of the same
 *    step's logits at every decode step, restricted to ids < n_valid when
 *    set (every other step n_valid is the full argmax, so the restricted
 *    answer must differ), and with logits NULL (token only) at every
 *    chunked-prefill step;
 *  - expert counts add up to tokens * top_k per layer;
 *  - with reference files from tools/ref_logits.py in t/data/ref (or
 *    $MOE_REF_DIR): logits at every position within relative error 1e-4 of
 *    transformers', and the greedy continuation equals transformers' (a
 *    model without reference files says so in a diagnostic and skips only
 *    these two checks);
 *  - GPT-2 tensor names without the "transformer." prefix give the same
 *    logits; positions past n_positions are refused;
 *  - forced routing (moe_cpu_backend_force_routing, for the GPU test) on
 *    Mixtral, Qwen2-MoE (raw top-k, a dense layer) and Qwen3-MoE: replaying
 *    a backend's own routing (moe_cpu_backend_last_routing) on a fresh
 *    backend, two sequences per chunked step, gives bitwise identical
 *    logits; another forced expert changes the logits and is what the
 *    backend reports; bad tables and a token-count mismatch are refused and
 *    a forced table applies to one step only;
 *  - load errors: unsupported architecture, rope_scaling longrope,
 *    missing tensor,
 *    bad top_k, GPT-2 activation, Qwen2-MoE without shared_expert_gate,
 *    per-layer sliding windows; forward rejects bad token ids and short
 *    block tables.
 */

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include <yajl/yajl_tree.h>

#include "backends/backend.h"
#include "tap.h"

#define N_POS      40
#define N_GREEDY   20
#define BS         4
#define N_BLOCKS   64
#define MAX_TOK    (N_POS + N_GREEDY)

static const char *models[] = {
    "llama-mha", "llama-gqa", "mixtral-gqa", "mixtral-fused", "mistral-sw",
    "llama-bias", "qwen2-bias", "qwen2moe-shared", "qwen3moe-qknorm",
    "gpt2-tiny", "llama-rope-linear", "llama-rope-llama3",
    "llama-rope-yarn", "llama-rope-dynamic"
};

typedef struct {
    int      have;
    int      tokens[N_POS];
    int      greedy[N_GREEDY];
    int      n_greedy;
    float   *logits;          /* (N_POS, vocab) */
    int      vocab;
    char     error[1024];
} ref_t;


static char *
read_all(const char *path, size_t *len)
{
    FILE  *f = fopen(path, "rb");
    char  *buf;
    long   n;

    if (f == NULL) {
        return NULL;
    }
    fseek(f, 0, SEEK_END);
    n = ftell(f);
    fseek(f, 0, SEEK_SET);
    buf = malloc((size_t) n + 1);
    if (buf && fread(buf, 1, (size_t) n, f) != (size_t) n) {
        free(buf);
        buf = NULL;
    }
    if (buf) {
        buf[n] = '\0';
        if (len) {
            *len = (size_t) n;
        }
    }
    fclose(f);
    return buf;
}


static int
write_all(const char *path, const void *p, size_t n)
{
    FILE *f = fopen(path, "wb");
    int   ok;

    if (f == NULL) {
        return -1;
    }
    ok = fwrite(p, 1, n, f) == n;
    return (fclose(f) == 0 && ok) ? 0 : -1;
}


static void
load_ref(const char *dir, const char *name, int vocab, ref_t *r)
{
    char         path[256], *text;
    yajl_val     root, v;
    size_t       i, len;
    const char  *p_tokens[] = { "tokens", NULL };
    const char  *p_greedy[] = { "greedy", NULL };
    const char  *p_error[] = { "error", NULL };

    memset(r, 0, sizeof(*r));
    snprintf(path, sizeof(path), "%s/%s.json", dir, name);
    text = read_all(path, NULL);
    if (text == NULL) {
        return;
    }
    root = yajl_tree_parse(text, NULL, 0);
    free(text);
    if (root == NULL) {
        snprintf(r->error, sizeof(r->error), "%s: bad JSON", path);
        return;
    }
    v = yajl_tree_get(root, p_error, yajl_t_string);
    if (v != NULL) {
        snprintf(r->error, sizeof(r->error), "%s", YAJL_GET_STRING(v));
        yajl_tree_free(root);
        return;
    }
    v = yajl_tree_get(root, p_tokens, yajl_t_array);
    if (v == NULL || v->u.array.len != N_POS) {
        snprintf(r->error, sizeof(r->error), "%s: needs %d tokens", path,
                 N_POS);
        yajl_tree_free(root);
        return;
    }
    for (i = 0; i < N_POS; i++) {
        r->tokens[i] = (int) YAJL_GET_INTEGER(v->u.array.values[i]);
    }
    v = yajl_tree_get(root, p_greedy, yajl_t_array);
    for (i = 0; v != NULL && i < v->u.array.len && i < N_GREEDY; i++) {
        r->greedy[i] = (int) YAJL_GET_INTEGER(v->u.array.values[i]);
        r->n_greedy++;
    }
    yajl_tree_free(root);

    snprintf(path, sizeof(path), "%s/%s.logits.bin", dir, name);
    r->logits = (float *) read_all(path, &len);
    if (r->logits == NULL || len != (size_t) N_POS * vocab * sizeof(float)) {
        snprintf(r->error, sizeof(r->error), "%s: missing or not %d x %d "
                 "floats", path, N_POS, vocab);
        free(r->logits);
        r->logits = NULL;
        return;
    }
    r->vocab = vocab;
    r->have = 1;
}


static double
rel_err(const float *a, const float *b, int n)
{
    double num = 0, den = 0;
    int    i;

    for (i = 0; i < n; i++) {
        double d = (double) a[i] - b[i];

        num += d * d;
        den += (double) b[i] * b[i];
    }
    return sqrt(num) / (den > 0 ? sqrt(den) : 1);
}


static int
argmax(const float *x, int n)
{
    int i, best = 0;

    for (i = 1; i < n; i++) {
        if (x[i] > x[best]) {
            best = i;
        }
    }
    return best;
}


/* As step(), also asking for the greedy id below n_valid in *tok;
 * logits may be NULL (token only). */
static int
step_tok(moe_backend_t *be, const int32_t *tokens, int from, int to,
    const int32_t *table, float *logits, int32_t *tok, int n_valid)
{
    moe_seq_batch_t s;

    memset(&s, 0, sizeof(s));
    s.tokens = tokens + from;
    s.n_tokens = to - from;
    s.pos = from;
    s.block_table = table;
    s.n_blocks = N_BLOCKS;
    s.logits = logits;
    s.token_out = tok;
    s.n_valid = n_valid;
    return be->forward(be, &s, 1);
}


/* One sequence over a backend: run tokens [from, to) in one call. */
static int
step(moe_backend_t *be, const int32_t *tokens, int from, int to,
    const int32_t *table, float *logits)
{
    return step_tok(be, tokens, from, to, table, logits, NULL, 0);
}


/* The optional-feature flags each test model must come out with. */
static void
check_flags(const char *name, const moe_hparams_t *hp)
{
    int ok;

    if (strcmp(name, "llama-bias") == 0) {
        ok = hp->arch == MOE_ARCH_LLAMA && hp->qkv_bias && hp->o_bias
             && hp->mlp_bias && !hp->qk_norm && !hp->norm_layer
             && hp->n_experts == 1;
    } else if (strcmp(name, "qwen2-bias") == 0) {
        ok = hp->arch == MOE_ARCH_QWEN2 && hp->qkv_bias && !hp->o_bias
             && !hp->qk_norm && hp->tie_embeddings && hp->sliding_window == 0
             && hp->n_experts == 1 && hp->rope_theta == 10000.0f;
    } else if (strcmp(name, "qwen2moe-shared") == 0) {
        ok = hp->arch == MOE_ARCH_QWEN2_MOE && hp->qkv_bias && !hp->o_bias
             && hp->n_experts == 4 && hp->top_k == 2 && hp->ffn_dim == 32
             && hp->shared_ffn_dim == 64 && hp->dense_ffn_dim == 96
             && hp->router_no_renorm && hp->n_dense_layers == 1
             && !hp->layer_dense[0] && hp->layer_dense[1]
             && !hp->layer_dense[2] && hp->sliding_window == 0;
    } else if (strcmp(name, "qwen3moe-qknorm") == 0) {
        ok = hp->arch == MOE_ARCH_QWEN3_MOE && !hp->qkv_bias && hp->qk_norm
             && hp->head_dim == 32 && hp->n_experts == 6 && hp->top_k == 3
             && hp->ffn_dim == 32 && !hp->router_no_renorm
             && hp->shared_ffn_dim == 0 && hp->n_dense_layers == 0
             && hp->rope_theta == 1e6f && hp->sliding_window == 0;
    } else if (strcmp(name, "gpt2-tiny") == 0) {
        ok = hp->arch == MOE_ARCH_GPT2 && hp->norm_layer && hp->learned_pos
             && hp->ffn_ungated && hp->act == MOE_ACT_GELU_TANH
             && hp->qkv_bias && hp->o_bias && hp->mlp_bias
             && hp->max_pos == 128 && hp->ffn_dim == 256
             && hp->tie_embeddings && hp->norm_eps == 1e-5f;
    } else {
        ok = !hp->norm_layer && !hp->act && !hp->ffn_ungated
             && !hp->learned_pos && !hp->qkv_bias && !hp->o_bias
             && !hp->mlp_bias && !hp->qk_norm && !hp->router_no_renorm
             && !hp->shared_ffn_dim && !hp->dense_ffn_dim
             && !hp->n_dense_layers;
    }
    TAP_OK(ok, "%s: optional-feature hparams as config.json says", name);
}


static void
test_model(const char *name, const char *ref_dir)
{
    char                 dir[256], err[512];
    moe_model_t         *m = NULL;
    moe_backend_t       *be = NULL, *be2 = NULL;
    const moe_hparams_t *hp;
    ref_t                ref;
    int32_t              tokens[MAX_TOK], table[N_BLOCKS], table2[N_BLOCKS];
    float               *dec, *chk, *lg, *bat;
    int                  rc, V, i, p, ok, same, from, to, n_extra;
    int                  dyn;
    double               e, worst;
    int64_t              total;
    const int64_t       *cnt;
    unsigned             seed = 12345;

    snprintf(dir, sizeof(dir), "t/data/models/%s", name);
    err[0] = '\0';
    rc = moe_model_load(dir, 0, &m, err, sizeof(err));
    TAP_OK(rc == MOE_OK, "%s: loads (%s)", name, rc ? err : "ok");
    if (rc != MOE_OK) {
        return;
    }
    hp = moe_model_hparams(m);
    V = hp->vocab_size;
    dyn = hp->rope_type == MOE_ROPE_DYNAMIC;
    TAP_DIAG("%s: %s dim %d layers %d heads %d/%d head_dim %d ffn %d "
             "experts %d top_k %d window %d tie %d vocab %d eos %d", name,
             hp->arch_name, hp->dim, hp->n_layers, hp->n_heads,
             hp->n_kv_heads, hp->head_dim, hp->ffn_dim, hp->n_experts,
             hp->top_k, hp->sliding_window, hp->tie_embeddings, V,
             hp->n_eos);
    TAP_OK(V == 512 && hp->n_eos == 2 && hp->eos_ids[0] == 506
           && hp->eos_ids[1] == 508 && hp->bos_id == 506,
           "%s: vocab 512, eos from generation_config.json", name);
    check_flags(name, hp);

    rc = moe_cpu_backend_create(m, N_BLOCKS, BS, 1, &be, err, sizeof(err));
    TAP_OK(rc == MOE_OK, "%s: cpu backend (%s)", name, rc ? err : "ok");
    if (rc != MOE_OK) {
        moe_model_free(m);
        return;
    }

    load_ref(ref_dir, name, V, &ref);
    if (ref.error[0]) {
        TAP_OK(0, "%s: reference readable: %.300s", name, ref.error);
    } else if (!ref.have) {
        TAP_DIAG("%s: SKIP reference checks: no %s/%s.json (run python3 "
                 "tools/ref_logits.py --out %s on a machine with "
                 "transformers)", name, ref_dir, name, ref_dir);
    }
    for (i = 0; i < N_POS; i++) {
        seed = seed * 1103515245u + 12345u;
        tokens[i] = ref.have ? ref.tokens[i] : (int32_t) ((seed >> 8) % 506);
    }

    dec = calloc((size_t) MAX_TOK * V, sizeof(float));
    chk = calloc((size_t) MAX_TOK * V, sizeof(float));
    bat = calloc((size_t) 2 * V, sizeof(float));
    lg = calloc((size_t) V, sizeof(float));

    /* (a) token by token, contiguous blocks; then greedy continuation */
    for (i = 0; i < N_BLOCKS; i++) {
        table[i] = i;
    }
    ok = 1;
    same = 1;
    n_extra = 0;
    for (p = 0; p < MAX_TOK && ok; p++) {
        int32_t got = -1, got2 = -1;
        int     a, want;

        if (p >= N_POS) {
            tokens[p] = argmax(dec + (size_t) (p - 1) * V, V);
        }
        ok = step_tok(be, tokens, p, p + 1, table, dec + (size_t) p * V,
                      &got, p % 3 == 0 ? 0 : V) == MOE_OK;
        a = argmax(dec + (size_t) p * V, V);
        want = -1;
        if (ok && p % 2 == 1 && a > 0) {
            /* the same step again (same K/V), token only, limited to the
             * ids below its argmax: must pick another id */
            ok = step_tok(be, tokens, p, p + 1, table, NULL, &got2, a)
                 == MOE_OK;
            want = argmax(dec + (size_t) p * V, a);
            n_extra++;
        }
        if (ok && (got != a || (want >= 0 && got2 != want))) {
            if (same) {
                TAP_DIAG("%s: pos %d: token_out %d / %d, argmax %d / %d "
                         "(< %d)", name, p, got, got2, a, want, a);
            }
            same = 0;
        }
    }
    TAP_OK(ok, "%s: %d decode steps", name, MAX_TOK);
    TAP_OK(ok && same, "%s: token_out == argmax of the step's logits "
           "(ids < n_valid) at every decode step", name);

    /* (b) chunked prefill 13 + 7 + 7 ... over a shuffled block table */
    for (i = 0; i < N_BLOCKS; i++) {
        table2[i] = i;
    }
    for (i = N_BLOCKS - 1; i > 0; i--) {
        int j, t;

        seed = seed * 1103515245u + 12345u;
        j = (int) ((seed >> 8) % (unsigned) (i + 1));
        t = table2[i];
        table2[i] = table2[j];
        table2[j] = t;
    }
    same = 1;
    ok = 1;
    for (from = 0; from < MAX_TOK && ok; from = to) {
        to = from == 0 ? 13 : (from + 7 < MAX_TOK ? from + 7 : MAX_TOK);
        ok = step(be, tokens, from, to, table2, chk) == MOE_OK;
        same = same && memcmp(chk, dec + (size_t) (to - 1) * V,
                              (size_t) V * sizeof(float)) == 0;
    }
    /* dynamic NTK RoPE follows each forward's sequence length (as in
     * transformers): a chunk's tokens take the chunk end's base, so only
     * token-by-token decoding reproduces the decode logits */
    TAP_OK(ok && (same || dyn), "%s: chunked prefill on shuffled blocks == "
           "decode, bitwise%s", name, dyn ? " # SKIP dynamic RoPE scaling "
           "is path dependent (ran, not compared)" : "");

    /* (b') the same chunks again asking only for the token (no logits) */
    same = 1;
    ok = 1;
    for (from = 0; from < MAX_TOK && ok; from = to) {
        int32_t got = -1;

        to = from == 0 ? 13 : (from + 7 < MAX_TOK ? from + 7 : MAX_TOK);
        ok = step_tok(be, tokens, from, to, table2, NULL, &got, 0)
             == MOE_OK;
        same = same && got == argmax(dec + (size_t) (to - 1) * V, V);
    }
    TAP_OK(ok && (same || dyn), "%s: token_out alone (logits NULL) == "
           "argmax of the decode logits at every chunk%s", name,
           dyn ? " # SKIP dynamic RoPE scaling is path dependent" : "");

    /* (c) two sequences in one step, 2 threads (forced to split even the
     * tiny matmuls), fresh backend */
    setenv("MOE_CPU_MIN_PAR_WORK", "1", 1);
    rc = moe_cpu_backend_create(m, N_BLOCKS, BS, 2, &be2, err, sizeof(err));
    unsetenv("MOE_CPU_MIN_PAR_WORK");
    if (rc == MOE_OK) {
        moe_seq_batch_t s[2];

        memset(s, 0, sizeof(s));
        /* seq 0: prefix 0..21 in blocks table2[15..22], seq 1: all 60
         * tokens in table2[0..14] (disjoint pages of one pool) */
        for (i = 0; i < 8; i++) {
            table[i] = table2[15 + i];
        }
        s[0].tokens = tokens;
        s[0].n_tokens = 21;
        s[0].pos = 0;
        s[0].block_table = table;
        s[0].n_blocks = 8;
        s[0].logits = bat;
        s[1].tokens = tokens;
        s[1].n_tokens = 30;
        s[1].pos = 0;
        s[1].block_table = table2;
        s[1].n_blocks = N_BLOCKS;
        s[1].logits = NULL;
        rc = be2->forward(be2, s, 2);
        /* next step: seq 0 decodes one token, seq 1 prefills the rest */
        if (rc == MOE_OK) {
            s[0].tokens = tokens + 21;
            s[0].n_tokens = 1;
            s[0].pos = 21;
            s[1].tokens = tokens + 30;
            s[1].n_tokens = MAX_TOK - 30;
            s[1].pos = 30;
            s[1].logits = bat + V;
            same = memcmp(bat, dec + (size_t) 20 * V,
                          (size_t) V * sizeof(float)) == 0;
            rc = be2->forward(be2, s, 2);
        }
        TAP_OK(rc == MOE_OK && ((same
               && memcmp(bat, dec + (size_t) 21 * V,
                         (size_t) V * sizeof(float)) == 0
               && memcmp(bat + V, dec + (size_t) (MAX_TOK - 1) * V,
                         (size_t) V * sizeof(float)) == 0) || dyn),
               "%s: batched 2 sequences, 2 threads == alone, bitwise%s",
               name, dyn ? " # SKIP dynamic RoPE scaling is path dependent"
                         : "");
        be2->destroy(be2);
    } else {
        TAP_OK(0, "%s: second backend: %s", name, err);
    }

    /* expert counts: every layer saw 3 * MAX_TOK + n_extra tokens
     * (decode, chunked, token-only chunked, repeated decode steps), top_k
     * each (none on the dense layers of an MoE model) */
    cnt = be->expert_counts(be);
    ok = cnt != NULL;
    for (i = 0; ok && i < hp->n_layers; i++) {
        int e;

        total = 0;
        for (e = 0; e < hp->n_experts; e++) {
            total += cnt[(size_t) i * hp->n_experts + e];
        }
        ok = total == (hp->layer_dense[i] ? 0
                       : (int64_t) (3 * MAX_TOK + n_extra) * hp->top_k);
    }
    TAP_OK(ok, "%s: expert counts sum to tokens * top_k per layer", name);

    if (hp->learned_pos) {
        moe_seq_batch_t s;

        memset(&s, 0, sizeof(s));
        s.tokens = tokens;
        s.n_tokens = 2;
        s.pos = hp->max_pos - 1;
        s.block_table = table;
        s.n_blocks = N_BLOCKS;
        TAP_OK(hp->max_pos < N_BLOCKS * BS
               && be->forward(be, &s, 1) == MOE_EINVAL,
               "%s: positions past n_positions %d refused", name,
               hp->max_pos);
    }

    if (ref.have) {
        worst = 0;
        for (p = 0; p < N_POS; p++) {
            e = rel_err(dec + (size_t) p * V, ref.logits + (size_t) p * V, V);
            if (e > worst) {
                worst = e;
            }
        }
        TAP_OK(worst <= 1e-4, "%s: logits at all %d positions match the "
               "reference (max rel err %.2e)", name, N_POS, worst);
        ok = ref.n_greedy == N_GREEDY;
        for (i = 0; ok && i < N_GREEDY; i++) {
            ok = tokens[N_POS + i] == ref.greedy[i];
        }
        TAP_OK(ok, "%s: greedy continuation matches the reference", name);
        if (!ok) {
            for (i = 0; i < N_GREEDY; i++) {
                printf("# pos %d: ours %d ref %d\n", N_POS + i,
                       tokens[N_POS + i], ref.greedy[i]);
            }
        }
    }

    free(ref.logits);
    free(dec);
    free(chk);
    free(bat);
    free(lg);
    be->destroy(be);
    moe_model_free(m);
}


/* A new safetensors image with every `from` in the JSON header replaced by
 * `to`; NULL when `from` does not occur. */
static char *
st_header_replace(const char *buf, size_t *len, const char *from,
    const char *to)
{
    uint64_t    hl, nhl;
    size_t      fl = strlen(from), tl = strlen(to), n = 0, cap;
    const char *p, *end, *hit;
    char       *out, *o;

    if (*len < 8) {
        return NULL;
    }
    memcpy(&hl, buf, 8);                  /* little-endian hosts only */
    if (hl > *len - 8) {
        return NULL;
    }
    cap = *len + (tl > fl ? (tl - fl) * (size_t) hl : 0) + 8;
    out = malloc(cap);
    if (out == NULL) {
        return NULL;
    }
    o = out + 8;
    p = buf + 8;
    end = buf + 8 + hl;
    while ((hit = memmem(p, (size_t) (end - p), from, fl)) != NULL) {
        memcpy(o, p, (size_t) (hit - p));
        o += hit - p;
        memcpy(o, to, tl);
        o += tl;
        p = hit + fl;
        n++;
    }
    memcpy(o, p, (size_t) (end - p));
    o += end - p;
    nhl = (uint64_t) (o - (out + 8));
    while (nhl % 8 != 0) {                /* keep the data 8-aligned */
        *o++ = ' ';
        nhl++;
    }
    memcpy(out, &nhl, 8);
    memcpy(o, buf + 8 + hl, *len - 8 - hl);
    o += *len - 8 - hl;
    *len = (size_t) (o - out);
    if (n == 0) {
        free(out);
        return NULL;
    }
    return out;
}


/* Copy t/data/models/<src> to a temp dir with config.json edited (first
 * occurrence of cfg_from) and/or every st_from in the safetensors header
 * replaced by st_to (lengths may differ: the header length is rewritten). */
static int
copy_model_from(const char *src_model, const char *tmp, const char *cfg_from,
    const char *cfg_to, const char *st_from, const char *st_to)
{
    static const char *files[] = {
        "config.json", "generation_config.json", "model.safetensors"
    };
    char    src[512], dst[512], *buf, *hit;
    size_t  len, i;

    mkdir(tmp, 0700);
    for (i = 0; i < 3; i++) {
        snprintf(src, sizeof(src), "t/data/models/%s/%s", src_model,
                 files[i]);
        snprintf(dst, sizeof(dst), "%s/%s", tmp, files[i]);
        buf = read_all(src, &len);
        if (buf == NULL) {
            return -1;
        }
        if (i == 0 && cfg_from != NULL) {
            hit = strstr(buf, cfg_from);
            if (hit == NULL) {
                free(buf);
                return -1;
            }
            /* splice, lengths may differ */
            {
                size_t pre = (size_t) (hit - buf);
                size_t nl = strlen(cfg_to), ol = strlen(cfg_from);
                char  *nb = malloc(len - ol + nl + 1);

                memcpy(nb, buf, pre);
                memcpy(nb + pre, cfg_to, nl);
                memcpy(nb + pre + nl, hit + ol, len - pre - ol + 1);
                free(buf);
                buf = nb;
                len = len - ol + nl;
            }
        }
        if (i == 2 && st_from != NULL) {
            char     *nb = st_header_replace(buf, &len, st_from, st_to);

            free(buf);
            if (nb == NULL) {
                return -1;
            }
            buf = nb;
        }
        if (write_all(dst, buf, len) != 0) {
            free(buf);
            return -1;
        }
        free(buf);
    }
    return 0;
}


static int
copy_model(const char *tmp, const char *cfg_from, const char *cfg_to,
    const char *st_from, const char *st_to)
{
    return copy_model_from("llama-mha", tmp, cfg_from, cfg_to, st_from,
                           st_to);
}


static void
rm_model(const char *tmp)
{
    char p[512];

    snprintf(p, sizeof(p), "%s/config.json", tmp);
    unlink(p);
    snprintf(p, sizeof(p), "%s/generation_config.json", tmp);
    unlink(p);
    snprintf(p, sizeof(p), "%s/model.safetensors", tmp);
    unlink(p);
    rmdir(tmp);
}


static void
test_load_errors(void)
{
    char           tmp[256], err[512];
    moe_model_t   *m;
    moe_backend_t *be;
    int            rc;

    snprintf(tmp, sizeof(tmp), "/tmp/moe-forward-%d", (int) getpid());

    TAP_OK(copy_model(tmp, "\"LlamaForCausalLM\"", "\"FalconForCausalLM\"",
                      NULL, NULL) == 0, "temp model copy");
    m = NULL;
    rc = moe_model_load(tmp, 0, &m, err, sizeof(err));
    TAP_OK(rc == MOE_EUNSUPPORTED && strstr(err, "architecture "
           "'FalconForCausalLM' is not supported") != NULL
           && strstr(err, "MixtralForCausalLM") != NULL
           && strstr(err, "GPT2LMHeadModel") != NULL,
           "unsupported architecture: %s", err);
    moe_model_free(m);
    rm_model(tmp);

    copy_model(tmp, "\"rope_scaling\": null",
               "\"rope_scaling\": {\"type\": \"longrope\", "
               "\"factor\": 4.0}", NULL, NULL);
    m = NULL;
    rc = moe_model_load(tmp, 0, &m, err, sizeof(err));
    TAP_OK(rc == MOE_EUNSUPPORTED && strstr(err, "longrope") != NULL,
           "rope_scaling longrope rejected: %s", err);
    moe_model_free(m);
    rm_model(tmp);

    copy_model(tmp, NULL, NULL, "model.layers.1.self_attn.k_proj.weight",
               "model.layers.1.self_attn.x_proj.weight");
    m = NULL;
    rc = moe_model_load(tmp, 0, &m, err, sizeof(err));
    TAP_OK(rc == MOE_EFORMAT && strstr(err, "missing tensor "
           "'model.layers.1.self_attn.k_proj.weight'") != NULL,
           "missing tensor named: %s", err);
    moe_model_free(m);
    rm_model(tmp);

    copy_model(tmp, "\"intermediate_size\": 128",
               "\"intermediate_size\": 96", NULL, NULL);
    m = NULL;
    rc = moe_model_load(tmp, 0, &m, err, sizeof(err));
    TAP_OK(rc == MOE_EFORMAT && strstr(err, "gate_proj.weight' has shape "
           "[128, 64], expected [96, 64]") != NULL,
           "shape mismatch named: %s", err);
    moe_model_free(m);
    rm_model(tmp);

    TAP_OK(copy_model_from("gpt2-tiny", tmp, "\"gelu_new\"", "\"relu\"",
                           NULL, NULL) == 0, "temp gpt2 copy");
    m = NULL;
    rc = moe_model_load(tmp, 0, &m, err, sizeof(err));
    TAP_OK(rc == MOE_EUNSUPPORTED && strstr(err, "activation_function "
           "'relu' is not supported") != NULL,
           "GPT-2 activation relu rejected: %s", err);
    moe_model_free(m);
    rm_model(tmp);

    copy_model_from("qwen2moe-shared", tmp, NULL, NULL,
                    "model.layers.2.mlp.shared_expert_gate.weight",
                    "model.layers.2.mlp.shared_expert_gatx.weight");
    m = NULL;
    rc = moe_model_load(tmp, 0, &m, err, sizeof(err));
    TAP_OK(rc == MOE_EFORMAT && strstr(err, "missing tensor "
           "'model.layers.2.mlp.shared_expert_gate.weight'") != NULL,
           "Qwen2-MoE without shared_expert_gate: %s", err);
    moe_model_free(m);
    rm_model(tmp);

    copy_model_from("qwen2moe-shared", tmp, "\"use_sliding_window\": false",
                    "\"use_sliding_window\": true", NULL, NULL);
    m = NULL;
    rc = moe_model_load(tmp, 0, &m, err, sizeof(err));
    TAP_OK(rc == MOE_EUNSUPPORTED && strstr(err, "sliding-window attention "
           "on 2 of 3 layers") != NULL,
           "Qwen2-MoE per-layer sliding window rejected: %s", err);
    moe_model_free(m);
    rm_model(tmp);

    m = NULL;
    rc = moe_model_load("t/data/models/mixtral-gqa", 5, &m, err,
                        sizeof(err));
    TAP_OK(rc == MOE_EINVAL, "top_k override 5 > 4 experts: %s", err);
    moe_model_free(m);
    m = NULL;
    rc = moe_model_load("t/data/models/mixtral-gqa", 1, &m, err,
                        sizeof(err));
    TAP_OK(rc == MOE_OK && moe_model_hparams(m)->top_k == 1,
           "top_k override 1 applied");

    if (rc == MOE_OK
        && moe_cpu_backend_create(m, 4, 4, 1, &be, err, sizeof(err)) == 0)
    {
        moe_seq_batch_t s;
        int32_t         toks[20] = { 0 }, table[4] = { 0, 1, 2, 3 };
        float          *lg = malloc(512 * sizeof(float));

        memset(&s, 0, sizeof(s));
        s.tokens = toks;
        s.n_tokens = 20;
        s.block_table = table;
        s.n_blocks = 4;
        s.logits = lg;
        TAP_OK(be->forward(be, &s, 1) == MOE_EINVAL,
               "20 tokens on a 4-block table of 4 rejected");
        s.n_tokens = 3;
        toks[1] = 512;
        TAP_OK(be->forward(be, &s, 1) == MOE_EINVAL,
               "token id 512 (vocab 512) rejected");
        toks[1] = 7;
        table[0] = 4;
        TAP_OK(be->forward(be, &s, 1) == MOE_EINVAL,
               "block id outside the pool rejected");
        table[0] = 0;
        TAP_OK(be->forward(be, &s, 1) == MOE_OK && isfinite(lg[0]),
               "valid step after rejected ones");
        free(lg);
        be->destroy(be);
    }
    moe_model_free(m);
}


/*
 * The steps of the forced-routing check: two sequences of FR_LEN0 and
 * FR_LEN1 tokens, prefill chunks of 13 then 7 for both per step, then
 * FR_DEC decode steps; logits of every sequence at every step.
 */
#define FR_LEN0   33
#define FR_LEN1   22
#define FR_DEC    3
#define FR_STEPS  16
#define FR_TOK    (FR_LEN0 + FR_LEN1 + 2 * FR_DEC)

typedef struct {
    int32_t  toks[2][FR_LEN0 + FR_DEC];
    int      n_steps;
    int      T[FR_STEPS];        /* tokens of step i */
    int      from[FR_STEPS][2];  /* seq q's first position in step i */
    int      cnt[FR_STEPS][2];   /* and its token count (0: not in it) */
} fr_plan_t;


static void
fr_make_plan(fr_plan_t *pl)
{
    int      len[2] = { FR_LEN0, FR_LEN1 }, done[2] = { 0, 0 }, q, i;
    unsigned seed = 777;

    memset(pl, 0, sizeof(*pl));
    for (q = 0; q < 2; q++) {
        for (i = 0; i < len[q] + FR_DEC; i++) {
            seed = seed * 1103515245u + 12345u;
            pl->toks[q][i] = (int32_t) ((seed >> 8) % 506);
        }
    }
    while (done[0] < len[0] + FR_DEC) {
        int chunk = pl->n_steps == 0 ? 13 : 7;

        for (q = 0; q < 2; q++) {
            int c = done[q] < len[q] ? len[q] - done[q] : 1;

            c = c < chunk ? c : chunk;
            if (done[q] >= len[q] + FR_DEC) {
                c = 0;
            }
            pl->from[pl->n_steps][q] = done[q];
            pl->cnt[pl->n_steps][q] = c;
            pl->T[pl->n_steps] += c;
            done[q] += c;
        }
        pl->n_steps++;
    }
}


/*
 * Run the plan on be.  route: (FR_TOK, L, K) in step order; force != 0:
 * force step i's part of it before step i, else record it there.  logits:
 * (n_steps, 2, V).  MOE_OK or the first failing status.
 */
static int
fr_run(moe_backend_t *be, const fr_plan_t *pl, int LK, int32_t *route,
    int force, float *logits, int V)
{
    int32_t         table[2][N_BLOCKS / 2];
    moe_seq_batch_t s[2];
    int             i, q, n, rc, off = 0;

    memset(s, 0, sizeof(s));
    for (i = 0; i < N_BLOCKS / 2; i++) {
        table[0][i] = N_BLOCKS - 1 - 2 * i;     /* odd pages, backwards */
        table[1][i] = 2 * i;
    }
    for (i = 0; i < pl->n_steps; i++) {
        n = 0;
        for (q = 0; q < 2; q++) {
            if (pl->cnt[i][q] == 0) {
                continue;
            }
            s[n].tokens = pl->toks[q] + pl->from[i][q];
            s[n].n_tokens = pl->cnt[i][q];
            s[n].pos = pl->from[i][q];
            s[n].block_table = table[q];
            s[n].n_blocks = N_BLOCKS / 2;
            s[n].logits = logits + ((size_t) i * 2 + q) * V;
            n++;
        }
        if (force) {
            rc = moe_cpu_backend_force_routing(be, route + (size_t) off * LK,
                                               pl->T[i]);
            if (rc != MOE_OK) {
                return rc;
            }
        }
        rc = be->forward(be, s, n);
        if (rc != MOE_OK) {
            return rc;
        }
        if (!force) {
            rc = moe_cpu_backend_last_routing(be, route + (size_t) off * LK,
                                              pl->T[i]);
            if (rc != MOE_OK) {
                return rc;
            }
        }
        off += pl->T[i];
    }
    return MOE_OK;
}


static void
test_force_routing(const char *name)
{
    char                 dir[256], err[512];
    moe_model_t         *m = NULL;
    moe_backend_t       *be[3] = { NULL, NULL, NULL };
    const moe_hparams_t *hp;
    fr_plan_t            pl;
    int32_t             *own = NULL, *alt = NULL, *back = NULL;
    float               *lg[3] = { NULL, NULL, NULL };
    int                  rc, V, L, K, LK, i, k, l, e, ok, nl;
    size_t               nlg;

    snprintf(dir, sizeof(dir), "t/data/models/%s", name);
    rc = moe_model_load(dir, 0, &m, err, sizeof(err));
    if (rc != MOE_OK) {
        TAP_OK(0, "%s: forced routing: load: %s", name, err);
        return;
    }
    hp = moe_model_hparams(m);
    V = hp->vocab_size;
    L = hp->n_layers;
    K = hp->top_k;
    LK = L * K;
    fr_make_plan(&pl);
    nlg = (size_t) pl.n_steps * 2 * V;
    own = calloc((size_t) FR_TOK * LK, sizeof(int32_t));
    alt = calloc((size_t) FR_TOK * LK, sizeof(int32_t));
    back = calloc((size_t) FR_TOK * LK, sizeof(int32_t));
    for (i = 0; i < 3; i++) {
        lg[i] = calloc(nlg, sizeof(float));
        if (i == 1) {
            setenv("MOE_CPU_MIN_PAR_WORK", "1", 1);     /* split all */
        }
        rc = moe_cpu_backend_create(m, N_BLOCKS, BS, 1 + (i == 1), &be[i],
                                    err, sizeof(err));
        unsetenv("MOE_CPU_MIN_PAR_WORK");
        if (rc != MOE_OK) {
            TAP_OK(0, "%s: forced routing: backend: %s", name, err);
            goto out;
        }
    }

    /* own routing, recorded; then replayed on a fresh backend */
    rc = fr_run(be[0], &pl, LK, own, 0, lg[0], V);
    TAP_OK(rc == MOE_OK, "%s: %d steps of 2 sequences, routing recorded "
           "(%d)", name, pl.n_steps, rc);
    ok = rc == MOE_OK;
    nl = 0;
    for (i = 0; ok && i < FR_TOK; i++) {
        for (l = 0; l < L; l++) {
            const int32_t *x = own + ((size_t) i * L + l) * K;

            for (k = 0; k < K; k++) {
                if (hp->layer_dense[l]) {
                    ok = ok && x[k] == -1;
                    nl += k == 0 && i == 0;
                } else {
                    ok = ok && x[k] >= 0 && x[k] < hp->n_experts;
                    for (e = 0; e < k; e++) {
                        ok = ok && x[e] != x[k];
                    }
                }
            }
        }
    }
    TAP_OK(ok, "%s: recorded experts in range, distinct, -1 on the %d "
           "dense layer(s)", name, nl);
    rc = fr_run(be[1], &pl, LK, own, 1, lg[1], V);
    TAP_OK(rc == MOE_OK && memcmp(lg[0], lg[1], nlg * sizeof(float)) == 0,
           "%s: forcing the own routing (2 threads) gives bitwise identical "
           "logits at all %d steps (%d)", name, pl.n_steps, rc);

    /* another expert for the last token of sequence 0 in step 0, at every
     * routed layer: its logits change, the rest of step 0 does not */
    memcpy(alt, own, (size_t) FR_TOK * LK * sizeof(int32_t));
    for (l = 0; l < L; l++) {
        int32_t *x = alt + ((size_t) (pl.cnt[0][0] - 1) * L + l) * K;

        for (e = 0; !hp->layer_dense[l] && e < hp->n_experts; e++) {
            int used = 0;

            for (k = 0; k < K; k++) {
                used |= x[k] == e;
            }
            if (!used) {
                x[K - 1] = e;
                break;
            }
        }
    }
    {
        moe_seq_batch_t s[2];
        int32_t         t0[N_BLOCKS / 2], t1[N_BLOCKS / 2];

        for (i = 0; i < N_BLOCKS / 2; i++) {
            t0[i] = i;
            t1[i] = N_BLOCKS / 2 + i;
        }
        memset(s, 0, sizeof(s));
        s[0].tokens = pl.toks[0];
        s[0].n_tokens = pl.cnt[0][0];
        s[0].block_table = t0;
        s[0].n_blocks = N_BLOCKS / 2;
        s[0].logits = lg[2];
        s[1].tokens = pl.toks[1];
        s[1].n_tokens = pl.cnt[0][1];
        s[1].block_table = t1;
        s[1].n_blocks = N_BLOCKS / 2;
        s[1].logits = lg[2] + V;
        rc = moe_cpu_backend_force_routing(be[2], alt, pl.T[0]);
        if (rc == MOE_OK) {
            rc = be[2]->forward(be[2], s, 2);
        }
        ok = rc == MOE_OK
             && moe_cpu_backend_last_routing(be[2], back, pl.T[0]) == MOE_OK
             && memcmp(back, alt, (size_t) pl.T[0] * LK * sizeof(int32_t))
                == 0;
        TAP_OK(ok && memcmp(lg[2], lg[0], (size_t) V * sizeof(float)) != 0
               && memcmp(lg[2] + V, lg[0] + V, (size_t) V * sizeof(float))
                  == 0,
               "%s: another forced expert changes that sequence's logits "
               "only, and is reported back (%d)", name, rc);

        /* refused: out of range, repeated, wrong token count; a forced
         * table lasts one step (a 1-token step after a 2-token table) */
        alt[K - 1] = hp->n_experts;
        ok = moe_cpu_backend_force_routing(be[2], alt, 1) == MOE_EINVAL;
        alt[K - 1] = -1;
        ok = ok && moe_cpu_backend_force_routing(be[2], alt, 1)
                   == MOE_EINVAL;
        if (K > 1) {
            alt[K - 1] = alt[0];
            ok = ok && moe_cpu_backend_force_routing(be[2], alt, 1)
                       == MOE_EINVAL;
        }
        memcpy(alt, own, (size_t) 2 * LK * sizeof(int32_t));
        s[0].tokens = pl.toks[0] + s[0].n_tokens;
        s[0].pos = s[0].n_tokens;
        s[0].n_tokens = 1;
        ok = ok && moe_cpu_backend_force_routing(be[2], alt, 2) == MOE_OK
             && be[2]->forward(be[2], s, 1) == MOE_EINVAL
             && be[2]->forward(be[2], s, 1) == MOE_OK
             && moe_cpu_backend_last_routing(be[2], back, 2) == MOE_EINVAL
             && moe_cpu_backend_last_routing(be[2], back, 1) == MOE_OK;
        TAP_OK(ok, "%s: bad forced tables refused; a table for another "
               "token count fails that step only", name);
    }

out:
    for (i = 0; i < 3; i++) {
        if (be[i] != NULL) {
            be[i]->destroy(be[i]);
        }
        free(lg[i]);
    }
    free(own);
    free(alt);
    free(back);
    moe_model_free(m);
}


/* GPT-2 names without "transformer." load to the same logits. */
static void
test_gpt2_prefix(void)
{
    char           tmp[256], err[512];
    moe_model_t   *m[2] = { NULL, NULL };
    moe_backend_t *be[2] = { NULL, NULL };
    int32_t        toks[9] = { 5, 77, 300, 12, 9, 401, 33, 250, 7 };
    int32_t        table[4] = { 0, 1, 2, 3 };
    float         *lg[2] = { NULL, NULL };
    int            rc[2], i;

    snprintf(tmp, sizeof(tmp), "/tmp/moe-forward-gpt2-%d", (int) getpid());
    TAP_OK(copy_model_from("gpt2-tiny", tmp, NULL, NULL, "transformer.", "")
           == 0, "gpt2 copy without the transformer. prefix");
    rc[0] = moe_model_load("t/data/models/gpt2-tiny", 0, &m[0], err,
                           sizeof(err));
    rc[1] = moe_model_load(tmp, 0, &m[1], err, sizeof(err));
    for (i = 0; i < 2 && rc[0] == MOE_OK && rc[1] == MOE_OK; i++) {
        moe_seq_batch_t s;

        memset(&s, 0, sizeof(s));
        lg[i] = calloc(512, sizeof(float));
        s.tokens = toks;
        s.n_tokens = 9;
        s.block_table = table;
        s.n_blocks = 4;
        s.logits = lg[i];
        rc[i] = moe_cpu_backend_create(m[i], 4, 4, 1, &be[i], err,
                                       sizeof(err));
        if (rc[i] == MOE_OK) {
            rc[i] = be[i]->forward(be[i], &s, 1);
            be[i]->destroy(be[i]);
        }
    }
    TAP_OK(rc[0] == MOE_OK && rc[1] == MOE_OK && lg[0] && lg[1]
           && memcmp(lg[0], lg[1], 512 * sizeof(float)) == 0,
           "gpt2 without prefix: same logits (%s)",
           rc[0] || rc[1] ? err : "ok");
    free(lg[0]);
    free(lg[1]);
    moe_model_free(m[0]);
    moe_model_free(m[1]);
    rm_model(tmp);
}


int
main(void)
{
    const char *ref_dir = getenv("MOE_REF_DIR");
    size_t      i;

    if (ref_dir == NULL) {
        ref_dir = "t/data/ref";
    }
    if (access("t/data/models/llama-mha/config.json", F_OK) != 0) {
        printf("1..0 # SKIP run from the repository root "
               "(t/data/models missing)\n");
        return 0;
    }
    if (access(ref_dir, F_OK) != 0) {
        TAP_DIAG("no reference logits in %s: run `python3 "
                 "tools/ref_logits.py` on a machine with transformers; "
                 "only self-consistency is checked", ref_dir);
    }
    for (i = 0; i < sizeof(models) / sizeof(models[0]); i++) {
        test_model(models[i], ref_dir);
    }
    test_force_routing("mixtral-gqa");
    test_force_routing("qwen2moe-shared");
    test_force_routing("qwen3moe-qknorm");
    test_load_errors();
    test_gpt2_prefix();
    TAP_PLAN(tap_n);
    return TAP_DONE();
}
