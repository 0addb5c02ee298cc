/*
 * Checks the embedded default model (models/localmoe-kjv, trained by
 * tools/train_default.py) against the float32 reference that transformers
 * wrote next to it (reference.json): the tokenizer gives the same ids, the
 * CPU backend's last-position logits are within 1e-4 relative error, and
 * 20 greedy steps give the same tokens.
 */

#include <limits.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <yajl/yajl_tree.h>

#include "moe.h"
#include "backends/backend.h"
#include "tap.h"


static char *
slurp(const char *path)
{
    FILE  *f = fopen(path, "rb");
    long   n;
    char  *s;

    if (f == NULL) {
        return NULL;
    }
    fseek(f, 0, SEEK_END);
    n = ftell(f);
    fseek(f, 0, SEEK_SET);
    s = malloc((size_t) n + 1);
    if (s != NULL && fread(s, 1, (size_t) n, f) == (size_t) n) {
        s[n] = '\0';
    } else {
        free(s);
        s = NULL;
    }
    fclose(f);
    return s;
}


static yajl_val
get(yajl_val obj, const char *key)
{
    const char  *path[] = { key, NULL };

    return yajl_tree_get(obj, path, yajl_t_any);
}


int
main(int argc, char **argv)
{
    char                  root[PATH_MAX], dir[PATH_MAX + 64],
                          path[PATH_MAX + 128], err[512], *slash, *json;
    int                   i, c, rc, n_cases, V, n_blocks = 16;
    yajl_val              ref, cases;
    moe_model_t          *m;
    moe_tokenizer_t      *tok;
    moe_backend_t        *b;
    const moe_hparams_t  *hp;

    (void) argc;
    if (getenv("MOE_SRCDIR")) {
        snprintf(root, sizeof(root), "%s", getenv("MOE_SRCDIR"));
    } else if (realpath(argv[0], root) != NULL) {
        for (i = 0; i < 3 && (slash = strrchr(root, '/')); i++) {
            *slash = '\0';
        }
    }
    snprintf(dir, sizeof(dir), "%s/models/localmoe-kjv", root);
    snprintf(path, sizeof(path), "%s/reference.json", dir);

    json = slurp(path);
    ref = json ? yajl_tree_parse(json, err, sizeof(err)) : NULL;
    cases = ref ? get(ref, "cases") : NULL;
    if (cases == NULL || !YAJL_IS_ARRAY(cases)) {
        printf("1..1\nnot ok 1 - %s readable\n", path);
        return 1;
    }
    n_cases = (int) YAJL_GET_ARRAY(cases)->len;

    TAP_PLAN(2 + 3 * n_cases);

    rc = moe_model_load(dir, 0, &m, err, sizeof(err));
    TAP_OK(rc == MOE_OK, "model loads (%s)", rc == MOE_OK ? "ok" : err);
    snprintf(path, sizeof(path), "%s/tokenizer.json", dir);
    rc |= moe_tokenizer_load(path, &tok, err, sizeof(err));
    TAP_OK(rc == MOE_OK, "tokenizer loads");
    if (rc != MOE_OK) {
        return 1;
    }
    hp = moe_model_hparams(m);
    V = hp->vocab_size;

    for (c = 0; c < n_cases; c++) {
        yajl_val   cs = YAJL_GET_ARRAY(cases)->values[c];
        yajl_val   jt = get(cs, "tokens"), jl = get(cs, "last_logits"),
                   jg = get(cs, "greedy"), jn = get(cs, "name"),
                   jx = get(cs, "text");
        const char *name = YAJL_IS_STRING(jn) ? jn->u.string : "?";
        int        nt = (int) YAJL_GET_ARRAY(jt)->len;
        int        ng = (int) YAJL_GET_ARRAY(jg)->len, same = 1;
        int32_t   *ids, *enc, table[16];
        size_t     n_enc;
        float     *logits = malloc(sizeof(float) * (size_t) V);
        double     num = 0, den = 0;
        moe_seq_batch_t  sb;

        ids = malloc(sizeof(int32_t) * (size_t) (nt + ng + 1));
        for (i = 0; i < nt; i++) {
            ids[i] = (int32_t) YAJL_GET_INTEGER(YAJL_GET_ARRAY(jt)->values[i]);
        }

        rc = moe_tokenizer_encode(tok, jx->u.string, strlen(jx->u.string), 0,
                                  &enc, &n_enc);
        TAP_OK(rc == MOE_OK && (int) n_enc == nt
               && memcmp(enc, ids, sizeof(int32_t) * (size_t) nt) == 0,
               "%s: tokenizer ids equal the reference's", name);
        free(enc);

        for (i = 0; i < n_blocks; i++) {
            table[i] = i;
        }
        moe_cpu_backend_create(m, n_blocks, 16, 1, &b, err, sizeof(err));

        memset(&sb, 0, sizeof(sb));
        sb.tokens = ids;
        sb.n_tokens = nt;
        sb.pos = 0;
        sb.block_table = table;
        sb.n_blocks = n_blocks;
        sb.logits = logits;
        b->forward(b, &sb, 1);

        for (i = 0; i < V; i++) {
            double r = YAJL_GET_DOUBLE(YAJL_GET_ARRAY(jl)->values[i]);

            num += (logits[i] - r) * (logits[i] - r);
            den += r * r;
        }
        TAP_OK(sqrt(num / den) <= 1e-4, "%s: last-position logits within "
               "1e-4 of transformers (rel err %.2e)", name, sqrt(num / den));

        /* greedy continuation, one decode step at a time */
        for (int g = 0; g < ng; g++) {
            int best = 0;

            for (i = 1; i < V; i++) {
                if (logits[i] > logits[best]) best = i;
            }
            if (best != (int) YAJL_GET_INTEGER(YAJL_GET_ARRAY(jg)->values[g]))
            {
                same = 0;
                TAP_DIAG("%s: step %d: %d, reference %lld", name, g, best,
                         YAJL_GET_INTEGER(YAJL_GET_ARRAY(jg)->values[g]));
                break;
            }
            ids[nt + g] = best;
            sb.tokens = &ids[nt + g];
            sb.n_tokens = 1;
            sb.pos = nt + g;
            b->forward(b, &sb, 1);
        }
        TAP_OK(same, "%s: %d greedy tokens equal the reference's", name, ng);

        b->destroy(b);
        free(ids);
        free(logits);
    }

    moe_tokenizer_free(tok);
    moe_model_free(m);
    yajl_tree_free(ref);
    free(json);
    return TAP_DONE();
}
