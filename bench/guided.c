/*
 * Guided decoding on the CPU (engine/guided/), on Llama-3's 128k
 * vocabulary (tools/fetch_tokenizers.sh puts it in build/tok/llama3/):
 *
 *   - the vocabulary trie, built once per tokenizer (first compile);
 *   - compile time of a JSON Schema with 10 properties (fresh compiles,
 *     the module's cache not involved);
 *   - the allowed-token mask per decode step per sequence along a JSON
 *     document of that schema tokenized by the tokenizer, median and p99:
 *     first pass (cold: each new matcher state walks the trie) and second
 *     pass (warm: the guide's per-state mask cache);
 *   - applying a mask to a row of 128k logits on the host (-inf the
 *     masked ids), and advancing the matcher by the sampled token.
 *
 *   make bench && build/bench/guided [tokenizer.json] [repeats]
 *
 * Prints one line per figure; never run as a test.
 */

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "moe.h"
#include "guided/guided.h"


static const char *schema =
    "{\"type\":\"object\",\"properties\":{"
    "\"id\":{\"type\":\"integer\"},"
    "\"name\":{\"type\":\"string\",\"maxLength\":40},"
    "\"email\":{\"type\":\"string\",\"format\":\"email\"},"
    "\"age\":{\"type\":\"integer\",\"minimum\":0},"
    "\"score\":{\"type\":\"number\"},"
    "\"active\":{\"type\":\"boolean\"},"
    "\"role\":{\"enum\":[\"admin\",\"editor\",\"viewer\"]},"
    "\"tags\":{\"type\":\"array\",\"items\":{\"type\":\"string\"},"
    "\"maxItems\":5},"
    "\"created\":{\"type\":\"string\",\"format\":\"date-time\"},"
    "\"address\":{\"type\":\"object\",\"properties\":{"
    "\"city\":{\"type\":\"string\"},\"zip\":{\"type\":\"string\","
    "\"pattern\":\"^[0-9]{5}$\"}},\"required\":[\"city\",\"zip\"],"
    "\"additionalProperties\":false}"
    "},\"required\":[\"id\",\"name\",\"email\",\"age\",\"score\",\"active\","
    "\"role\",\"tags\",\"created\",\"address\"],"
    "\"additionalProperties\":false}";

static const char *document =
    "{\"id\": 4217, \"name\": \"Ada Lovelace\", \"email\": "
    "\"ada.lovelace@example.org\", \"age\": 36, \"score\": 98.25, "
    "\"active\": true, \"role\": \"editor\", \"tags\": [\"math\", "
    "\"engines\", \"poetry\"], \"created\": \"2024-03-01T09:30:00Z\", "
    "\"address\": {\"city\": \"London\", \"zip\": \"12345\"}}";


static double
now_us(void)
{
    struct timespec ts;

    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double) ts.tv_sec * 1e6 + (double) ts.tv_nsec / 1e3;
}


static int
dcmp(const void *a, const void *b)
{
    double x = *(const double *) a, y = *(const double *) b;

    return x < y ? -1 : x > y;
}


static void
report(const char *what, double *v, int n)
{
    qsort(v, (size_t) n, sizeof(double), dcmp);
    printf("%-44s median %9.1f us   p99 %9.1f us   max %9.1f us   (n %d)\n",
           what, v[n / 2], v[(n * 99) / 100 < n ? (n * 99) / 100 : n - 1],
           v[n - 1], n);
}


int
main(int argc, char **argv)
{
    const char         *path = argc > 1 ? argv[1]
                                : "build/tok/llama3/tokenizer.json";
    int                 reps = argc > 2 ? atoi(argv[2]) : 20;
    moe_tokenizer_t    *t;
    moe_guide_t        *g;
    moe_guided_state_t *st;
    char                err[256];
    int32_t            *ids = NULL, eos;
    size_t              n_ids = 0, W, k;
    int                 V, pass, i, n, bad = 0;
    double              t0, *v, *adv;
    uint32_t           *mask;
    float              *logits;

    if (moe_tokenizer_load(path, &t, err, sizeof(err)) != MOE_OK) {
        fprintf(stderr, "%s: %s (run tools/fetch_tokenizers.sh)\n", path,
                err);
        return 1;
    }
    V = moe_tokenizer_vocab_size(t);
    eos = moe_tokenizer_token_to_id(t, "<|eot_id|>");
    W = (size_t) (V + 31) / 32;
    printf("tokenizer %s: vocab %d\n", path, V);

    /* the first compile builds the tokenizer's trie */
    t0 = now_us();
    if (moe_guide_compile(t, MOE_GUIDED_JSON_OBJECT, "", 0, &g, err,
                          sizeof(err)) != MOE_OK)
    {
        fprintf(stderr, "compile: %s\n", err);
        return 1;
    }
    printf("%-44s %9.1f ms (once per tokenizer)\n",
           "vocabulary trie + first compile", (now_us() - t0) / 1e3);
    moe_guide_release(g);

    v = calloc((size_t) (reps > 4096 ? reps : 4096), sizeof(double));
    adv = calloc(4096, sizeof(double));
    for (i = 0; i < reps; i++) {
        t0 = now_us();
        if (moe_guide_compile(t, MOE_GUIDED_JSON, schema, strlen(schema), &g,
                              err, sizeof(err)) != MOE_OK)
        {
            fprintf(stderr, "compile: %s\n", err);
            return 1;
        }
        v[i] = now_us() - t0;
        if (i + 1 < reps) {
            moe_guide_release(g);
        }
    }
    report("compile: JSON Schema, 10 properties", v, reps);

    if (moe_tokenizer_encode(t, document, strlen(document), 0, &ids, &n_ids)
        != MOE_OK)
    {
        fprintf(stderr, "encode failed\n");
        return 1;
    }
    mask = malloc(W * sizeof(uint32_t));
    logits = malloc((size_t) V * sizeof(float));
    for (pass = 0; pass < 2; pass++) {
        st = moe_guided_state_create(g, &eos, 1);
        for (k = 0; k <= n_ids; k++) {
            t0 = now_us();
            n = moe_guided_mask(st, mask, W);
            v[k] = now_us() - t0;
            if (k == n_ids) {
                bad += !(n > 0 && (mask[eos >> 5] >> (eos & 31) & 1));
                break;
            }
            bad += !(mask[ids[k] >> 5] >> (ids[k] & 31) & 1);
            t0 = now_us();
            bad += moe_guided_advance(st, ids[k]) != MOE_OK;
            adv[k] = now_us() - t0;
        }
        report(pass == 0 ? "mask per step, cold (first pass)"
                         : "mask per step, warm (state cache)", v,
               (int) n_ids + 1);
        if (pass == 0) {
            report("advance by the sampled token", adv, (int) n_ids);
        }
        moe_guided_state_free(st);
    }
    printf("document: %zu tokens, %s\n", n_ids,
           bad ? "MISMATCH (a document token was masked out)"
               : "every token allowed, EOS allowed at the end");

    for (i = 0; i < 200; i++) {
        for (k = 0; k < (size_t) V; k++) {
            logits[k] = (float) k;
        }
        t0 = now_us();
        for (k = 0; k < W; k++) {       /* the scheduler's loop */
            uint32_t m = mask[k];
            size_t   b;

            if (m == 0xffffffffu) {
                continue;
            }
            if (m == 0 && k * 32 + 32 <= (size_t) V) {
                for (b = 0; b < 32; b++) {
                    logits[k * 32 + b] = -INFINITY;
                }
                continue;
            }
            for (b = 0; b < 32 && k * 32 + b < (size_t) V; b++) {
                if (!(m & (1u << b))) {
                    logits[k * 32 + b] = -INFINITY;
                }
            }
        }
        v[i] = now_us() - t0;
    }
    report("apply the EOS-only mask to 128k logits", v, 200);

    moe_guide_release(g);
    free(ids);
    free(mask);
    free(logits);
    free(v);
    free(adv);
    moe_tokenizer_free(t);
    return bad ? 1 : 0;
}
