/*
 * Whole-backend check: the CUDA backend (bf16 weights and KV, fp32
 * accumulation) against the fp32 CPU backend on the tiny models in
 * t/data/models (and models/localmoe-tiny), run from the repository root:
 * Llama, Mistral (sliding window), Mixtral, and the optional pieces
 * (qwen2-bias: q/k/v bias; qwen2moe-shared: raw top-k, shared expert, a
 * dense layer, q/k/v bias; qwen3moe-qknorm: q/k norm; gpt2-tiny:
 * LayerNorm, learned positions, GELU, ungated biased MLP, o bias, tied
 * lm_head; llama-bias: attention and MLP biases).
 *
 * Per model, two sequences A and B (different random prompts of 40 and 29
 * tokens) run together in every CUDA step: chunked prefill (13 tokens, then
 * chunks of 7) over shuffled, interleaved block tables of 4-token blocks,
 * then 20 decode steps fed with the CPU's greedy tokens (teacher forcing,
 * so both backends always see the same sequence).  The CPU backend runs
 * each sequence alone, prompt in one step.  Checks:
 *  - logits after the prompt and after every decode step: relative L2
 *    error ||cuda - cpu|| / ||cpu|| <= 2e-2, except from the first
 *    near-tie of the sequence on: where the CUDA router's k-th minus
 *    (k+1)-th probability (moe_cuda_backend_route_margins) is below
 *    FLIP_MARGIN in some layer, the bf16 hidden state (~1e-2 relative
 *    error, which moves a router probability by a few 1e-3) may
 *    legitimately pick another expert than the CPU.  A flip at position p
 *    changes p's hidden state and so its K/V in every later layer, which
 *    every later position of the sequence attends to: a position is held
 *    to FLIP_TOL only if it or any EARLIER position of its sequence had
 *    such a near-tie (run 2: pos 48 of mixtral-gqa, margin 0.08 itself,
 *    failed at 5.2e-2 after an earlier near-tie).  Positions before the
 *    first near-tie route the same way on both backends and are held to
 *    2e-2, so a larger error there is a bug.  Both counts are printed;
 *  - greedy agreement: at every such position where the CPU's top-1 logit
 *    beats its top-2 by more than 0.05, the CUDA argmax is the CPU's;
 *  - expert counts: per layer they add up to tokens * top_k;
 *  - forward rejects a short block table and an out-of-vocab token
 *    (MOE_EINVAL) without breaking later steps.
 * TAP; skips when there is no CUDA device.
 */

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "gpu_util.h"

extern "C" {
#include "model.h"
#include "tap.h"
}
#include "cuda_backend.h"

#define BS        4
#define N_BLOCKS  64
#define N_DEC     20
#define LEN_A     40
#define LEN_B     29
#define REL_TOL   2e-2
#define MARGIN    0.05f
#define FLIP_MARGIN 0.02f
#define FLIP_TOL  2.5e-1

static const char *model_dirs[] = {
    "t/data/models/llama-mha", "t/data/models/llama-gqa",
    "t/data/models/mixtral-gqa", "t/data/models/mixtral-fused",
    "t/data/models/mistral-sw", "t/data/models/qwen2-bias",
    "t/data/models/qwen2moe-shared", "t/data/models/qwen3moe-qknorm",
    "t/data/models/gpt2-tiny", "t/data/models/llama-bias",
    "models/localmoe-tiny"
};


static int
argmax(const float *v, int n, float *margin)
{
    int   b = 0;
    float second = -INFINITY;

    for (int i = 1; i < n; i++) {
        if (v[i] > v[b]) {
            b = i;
        }
    }
    for (int i = 0; i < n; i++) {
        if (i != b && v[i] > second) {
            second = v[i];
        }
    }
    if (margin != NULL) {
        *margin = v[b] - second;
    }
    return b;
}


/* CPU reference: prompt in one step, then N_DEC greedy steps.  logits:
 * (1 + N_DEC, V); toks: prompt followed by the N_DEC greedy tokens. */
static int
run_cpu(const moe_model_t *m, int32_t *toks, int len, float *logits)
{
    const moe_hparams_t *hp = moe_model_hparams(m);
    moe_backend_t       *cb;
    char                 err[256];
    int32_t              bt[N_BLOCKS];
    moe_seq_batch_t      sb;
    int                  V = hp->vocab_size, rc;

    rc = moe_cpu_backend_create(m, N_BLOCKS, BS, 1, &cb, err, sizeof(err));
    if (rc != MOE_OK) {
        TAP_DIAG("cpu backend: %s", err);
        return rc;
    }
    for (int i = 0; i < N_BLOCKS; i++) {
        bt[i] = i;
    }
    memset(&sb, 0, sizeof(sb));
    sb.tokens = toks;
    sb.n_tokens = len;
    sb.pos = 0;
    sb.block_table = bt;
    sb.n_blocks = N_BLOCKS;
    sb.logits = logits;
    rc = cb->forward(cb, &sb, 1);
    for (int s = 0; rc == MOE_OK && s < N_DEC; s++) {
        toks[len + s] = argmax(logits + (size_t) s * V, V, NULL);
        sb.tokens = toks + len + s;
        sb.n_tokens = 1;
        sb.pos = len + s;
        sb.logits = logits + (size_t) (s + 1) * V;
        rc = cb->forward(cb, &sb, 1);
    }
    cb->destroy(cb);
    return rc;
}


/*
 * After a step: the smallest router margin over the layers of each of its
 * tokens goes to tokm[seq][position] (seq found by its token pointer).
 */
static void
record_margins(moe_backend_t *gb, int L, const moe_seq_batch_t *sb, int n,
    int32_t toks[2][LEN_A + N_DEC], float *mg,
    float tokm[2][LEN_A + N_DEC + 1])
{
    int T = 0, t0 = 0;

    for (int i = 0; i < n; i++) {
        T += sb[i].n_tokens;
    }
    if (moe_cuda_backend_route_margins(gb, T, mg) != MOE_OK) {
        TAP_DIAG("route margins: %s", moe_cuda_last_error());
        return;
    }
    for (int i = 0; i < n; i++) {
        int q = sb[i].tokens >= toks[1] ? 1 : 0;

        for (int j = 0; j < sb[i].n_tokens; j++) {
            float m = 1.0f;

            for (int l = 0; l < L; l++) {
                m = fminf(m, mg[(size_t) l * T + t0 + j]);
            }
            tokm[q][sb[i].pos + j] = m;
        }
        t0 += sb[i].n_tokens;
    }
}


static void
test_model(const char *dir)
{
    moe_model_t         *m;
    moe_backend_t       *gb;
    const moe_hparams_t *hp;
    char                 err[512];
    int                  rc, V, len[2] = { LEN_A, LEN_B };
    int32_t              toks[2][LEN_A + N_DEC], bt[2][N_BLOCKS / 2];
    float               *cpu[2], *gpu[2], *mg = NULL;
    float                tokm[2][LEN_A + N_DEC + 1];
    const char          *name = strrchr(dir, '/') + 1;

    if (access(dir, R_OK) != 0) {
        TAP_DIAG("%s: missing, skipped", dir);
        return;
    }
    rc = moe_model_load(dir, 0, &m, err, sizeof(err));
    if (rc != MOE_OK) {
        TAP_OK(0, "%s: load: %s", name, err);
        return;
    }
    hp = moe_model_hparams(m);
    V = hp->vocab_size;
    for (int q = 0; q < 2; q++) {
        cpu[q] = (float *) malloc(sizeof(float) * V * (1 + N_DEC));
        gpu[q] = (float *) malloc(sizeof(float) * V * (1 + N_DEC));
        for (int i = 0; i < len[q]; i++) {
            toks[q][i] = (int32_t) (gu_rand() % (uint32_t) V);
        }
        rc = run_cpu(m, toks[q], len[q], cpu[q]);
        if (rc != MOE_OK) {
            TAP_OK(0, "%s: cpu reference failed (%d)", name, rc);
            goto out_free;
        }
    }
    /* interleaved shuffled tables: A gets the even ids, B the odd */
    for (int i = 0; i < N_BLOCKS / 2; i++) {
        bt[0][i] = 2 * ((i * 7 + 3) % (N_BLOCKS / 2));
        bt[1][i] = 2 * ((i * 11 + 5) % (N_BLOCKS / 2)) + 1;
    }

    for (int q = 0; q < 2; q++) {
        for (int i = 0; i < LEN_A + N_DEC + 1; i++) {
            tokm[q][i] = 1.0f;
        }
    }
    mg = (float *) malloc(sizeof(float) * hp->n_layers * 64);
    rc = moe_cuda_backend_create(m, N_BLOCKS, BS, 64, 0, &gb, err,
                                 sizeof(err));
    TAP_OK(rc == MOE_OK, "%s: cuda backend created (%s)", name,
           rc == MOE_OK ? "ok" : err);
    if (rc != MOE_OK) {
        goto out_free;
    }

    {
        int             done[2] = { 0, 0 }, step = 0, total = 0, ok_fw = 1;
        moe_seq_batch_t sb[2];

        /* chunked prefill: 13, then chunks of 7, both sequences per step */
        while (ok_fw && (done[0] < len[0] || done[1] < len[1])) {
            int n = 0, chunk = step == 0 ? 13 : 7;

            for (int q = 0; q < 2; q++) {
                int c = len[q] - done[q] < chunk ? len[q] - done[q] : chunk;

                if (c <= 0) {
                    continue;
                }
                memset(&sb[n], 0, sizeof(sb[n]));
                sb[n].tokens = toks[q] + done[q];
                sb[n].n_tokens = c;
                sb[n].pos = done[q];
                sb[n].block_table = bt[q];
                sb[n].n_blocks = N_BLOCKS / 2;
                sb[n].logits = done[q] + c == len[q] ? gpu[q] : NULL;
                done[q] += c;
                total += c;
                n++;
            }
            rc = gb->forward(gb, sb, n);
            if (rc != MOE_OK) {
                TAP_DIAG("prefill step %d: %s", step, moe_cuda_last_error());
                ok_fw = 0;
            } else {
                record_margins(gb, hp->n_layers, sb, n, toks, mg, tokm);
            }
            step++;
        }
        for (int s = 0; ok_fw && s < N_DEC; s++) {
            for (int q = 0; q < 2; q++) {
                memset(&sb[q], 0, sizeof(sb[q]));
                sb[q].tokens = toks[q] + len[q] + s;
                sb[q].n_tokens = 1;
                sb[q].pos = len[q] + s;
                sb[q].block_table = bt[q];
                sb[q].n_blocks = N_BLOCKS / 2;
                sb[q].logits = gpu[q] + (size_t) (s + 1) * V;
                total++;
            }
            rc = gb->forward(gb, sb, 2);
            if (rc != MOE_OK) {
                TAP_DIAG("decode step %d: %s", s, moe_cuda_last_error());
                ok_fw = 0;
            } else {
                record_margins(gb, hp->n_layers, sb, 2, toks, mg, tokm);
            }
        }
        TAP_OK(ok_fw, "%s: chunked prefill + %d decode steps ran", name,
               N_DEC);

        double worst = 0, worst_near = 0;
        int    checked = 0, disagree = 0, near = 0;

        for (int q = 0; q < 2 && ok_fw; q++) {
            /* pmin[p]: smallest margin at positions 0..p of sequence q */
            float pmin[LEN_A + N_DEC + 1];
            int   first = -1;

            for (int p = 0; p < len[q] + N_DEC; p++) {
                pmin[p] = p == 0 ? tokm[q][0]
                                 : fminf(pmin[p - 1], tokm[q][p]);
                if (first < 0 && pmin[p] < FLIP_MARGIN) {
                    first = p;
                }
            }
            TAP_DIAG("%s seq %d: first router near-tie at position %d "
                     "(of %d)", name, q, first, len[q] + N_DEC);
            for (int s = 0; s <= N_DEC; s++) {
                const float *c = cpu[q] + (size_t) s * V;
                const float *g = gpu[q] + (size_t) s * V;
                double       e = gu_relerr(g, c, (size_t) V);
                float        margin, rm = pmin[len[q] - 1 + s];
                int          top = argmax(c, V, &margin);

                if (rm < FLIP_MARGIN) {
                    near++;
                    if (!(e <= worst_near)) {
                        worst_near = e;
                    }
                    if (e > REL_TOL) {
                        TAP_DIAG("seq %d pos %d: rel err %.2e, smallest "
                                 "router margin up to here %.4f (after a "
                                 "near-tie)", q, len[q] - 1 + s, e, rm);
                    }
                } else {
                    if (!(e <= worst)) {
                        worst = e;
                    }
                    if (e > REL_TOL) {
                        TAP_DIAG("seq %d pos %d: rel err %.2e, smallest "
                                 "router margin up to here %.4f", q,
                                 len[q] - 1 + s, e, rm);
                    }
                }
                if (margin > MARGIN) {
                    checked++;
                    if (argmax(g, V, NULL) != top) {
                        disagree++;
                        TAP_DIAG("seq %d pos %d: cpu top %d (margin %.3f), "
                                 "cuda top %d", q, s, top, margin,
                                 argmax(g, V, NULL));
                    }
                }
            }
        }
        TAP_OK(ok_fw && worst <= REL_TOL && worst_near <= FLIP_TOL,
               "%s: logits rel err max %.2e (<= %.0e) over %d positions "
               "before any router near-tie; %d at or after a near-tie "
               "(margin < %.2f at this or an earlier position): max %.2e "
               "(<= %.0e)",
               name, worst, REL_TOL, 2 * (N_DEC + 1) - near, near,
               FLIP_MARGIN, worst_near, FLIP_TOL);
        TAP_OK(ok_fw && disagree == 0, "%s: greedy agrees where cpu margin "
               "> %.2f (%d positions checked, %d disagree)", name, MARGIN,
               checked, disagree);

        const int64_t *cnt = gb->expert_counts(gb);
        int            cnt_ok = cnt != NULL;
        int            K = hp->n_experts > 1 ? hp->top_k : 1;

        for (int l = 0; cnt_ok && l < hp->n_layers; l++) {
            int64_t sum = 0, want = (int64_t) total * K;

            if (hp->n_dense_layers > 0 && hp->layer_dense[l]) {
                want = 0;       /* a dense layer routes nothing (as cpu) */
            }
            for (int e = 0; e < hp->n_experts; e++) {
                sum += cnt[(size_t) l * hp->n_experts + e];
            }
            if (sum != want) {
                TAP_DIAG("layer %d: %lld expert slots, want %lld", l,
                         (long long) sum, (long long) want);
                cnt_ok = 0;
            }
        }
        TAP_OK(cnt_ok, "%s: expert counts add up to tokens * top_k (0 on "
               "dense layers)", name);

        char why[256];
        int  sup = moe_cuda_supports(hp, why, sizeof(why));
        TAP_OK(sup == 1, "%s: moe_cuda_supports says yes (%s)", name,
               sup ? "ok" : why);

        /* bad input is rejected, and the backend still works afterwards */
        int32_t bad_tok = V;
        memset(&sb[0], 0, sizeof(sb[0]));
        sb[0].tokens = &bad_tok;
        sb[0].n_tokens = 1;
        sb[0].pos = 0;
        sb[0].block_table = bt[0];
        sb[0].n_blocks = 1;
        int r1 = gb->forward(gb, sb, 1);
        bad_tok = 1;
        sb[0].pos = 4 * BS;            /* needs 5 blocks, table has 1 */
        int r2 = gb->forward(gb, sb, 1);
        sb[0].pos = 0;
        sb[0].logits = gpu[0];
        int r3 = gb->forward(gb, sb, 1);
        TAP_OK(r1 == MOE_EINVAL && r2 == MOE_EINVAL && r3 == MOE_OK,
               "%s: bad token / short table rejected, next step ok "
               "(%d %d %d)", name, r1, r2, r3);
    }
    gb->destroy(gb);
out_free:
    free(mg);
    for (int q = 0; q < 2; q++) {
        free(cpu[q]);
        free(gpu[q]);
    }
    moe_model_free(m);
}


int
main(void)
{
    if (moe_cuda_device_count() == 0) {
        printf("1..0 # SKIP no CUDA device\n");
        return 0;
    }
    for (size_t i = 0; i < sizeof(model_dirs) / sizeof(model_dirs[0]); i++) {
        test_model(model_dirs[i]);
    }
    if (tap_n == 0) {
        TAP_OK(0, "no test model found (run from the repository root)");
    }
    TAP_PLAN(tap_n);
    return TAP_DONE();
}
