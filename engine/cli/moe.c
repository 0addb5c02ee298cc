/*
 * moe: the engine without nginx, to check a model by hand.
 *
 *   moe generate -m MODEL|-c YAML [-p TEXT] [--chat] [-n N] [-t TEMP]
 *                [--seed S] [--top-k K] [--top-p P] [--stop STR]...
 *                [--expert-stats]
 *   moe tokenize -m MODEL [--no-special] TEXT
 *   moe logits   -m MODEL (-p TEXT | --ids 1,2,3) [--top N] [--all]
 *
 * MODEL is a Hugging Face model directory; -c takes an engine YAML.
 */

#include <errno.h>
#include <poll.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "moe.h"
#include "backends/backend.h"

static void
usage(void)
{
    fprintf(stderr,
        "usage:\n"
        "  moe generate (-m MODEL_DIR | -c ENGINE_YAML) [-p TEXT] [--chat]\n"
        "               [-n MAX_TOKENS] [-t TEMPERATURE] [--seed N]\n"
        "               [--top-k K] [--top-p P] [--min-p P] [--stop STR]...\n"
        "               [--ignore-eos] [--expert-stats]\n"
        "  moe tokenize -m MODEL_DIR [--no-special] [--decode] TEXT\n"
        "  moe logits   -m MODEL_DIR (-p TEXT | --ids 1,2,3) [--top N]"
        " [--all]\n");
}


static int
load_config(const char *model, const char *yaml, moe_config_t *cfg)
{
    char  err[1024];

    if (yaml != NULL) {
        if (moe_config_load(yaml, cfg, err, sizeof(err)) != MOE_OK) {
            fprintf(stderr, "moe: %s\n", err);
            return -1;
        }
        return 0;
    }

    if (model == NULL) {
        fprintf(stderr, "moe: -m MODEL_DIR or -c ENGINE_YAML is required\n");
        return -1;
    }

    moe_config_defaults(cfg);
    snprintf(cfg->model_name, sizeof(cfg->model_name), "%s", model);
    if (realpath(model, cfg->model_path) == NULL) {
        fprintf(stderr, "moe: %s: %s\n", model, strerror(errno));
        return -1;
    }
    snprintf(cfg->backend, sizeof(cfg->backend), "cpu");
    cfg->max_num_seqs = 4;
    return 0;
}


static int
cmd_generate(int argc, char **argv)
{
    int                 i, rc, chat = 0, expert_stats = 0, n_stops = 0;
    int                 done = 0, stopped;
    const char         *model = NULL, *yaml = NULL, *text = "";
    const char         *stops[MOE_MAX_STOP], *piece;
    char                err[1024], *prompt_text = NULL;
    size_t              n_ids, len;
    int32_t            *ids = NULL;
    moe_config_t        cfg;
    moe_sampling_t      sp;
    moe_engine_t       *e;
    moe_textstream_t   *ts;
    moe_event_t         ev[64];
    moe_stats_t         st;
    struct pollfd       pfd;
    const moe_model_info_t *info;

    moe_sampling_defaults(&sp);
    sp.max_tokens = 32;
    sp.temperature = 0.0f;

    for (i = 0; i < argc; i++) {
        const char *a = argv[i], *v = i + 1 < argc ? argv[i + 1] : NULL;

        if (!strcmp(a, "-m") && v) { model = v; i++; }
        else if (!strcmp(a, "-c") && v) { yaml = v; i++; }
        else if (!strcmp(a, "-p") && v) { text = v; i++; }
        else if (!strcmp(a, "-n") && v) { sp.max_tokens = atoi(v); i++; }
        else if (!strcmp(a, "-t") && v) { sp.temperature = atof(v); i++; }
        else if (!strcmp(a, "--seed") && v) {
            sp.seed = strtoull(v, NULL, 10); sp.has_seed = 1; i++;
        }
        else if (!strcmp(a, "--top-k") && v) { sp.top_k = atoi(v); i++; }
        else if (!strcmp(a, "--top-p") && v) { sp.top_p = atof(v); i++; }
        else if (!strcmp(a, "--min-p") && v) { sp.min_p = atof(v); i++; }
        else if (!strcmp(a, "--stop") && v && n_stops < MOE_MAX_STOP) {
            stops[n_stops++] = v; i++;
        }
        else if (!strcmp(a, "--chat")) { chat = 1; }
        else if (!strcmp(a, "--ignore-eos")) { sp.ignore_eos = 1; }
        else if (!strcmp(a, "--expert-stats")) { expert_stats = 1; }
        else { usage(); return 2; }
    }

    if (load_config(model, yaml, &cfg) != 0) {
        return 1;
    }

    rc = moe_engine_create(&cfg, &e, err, sizeof(err));
    if (rc != MOE_OK) {
        fprintf(stderr, "moe: %s\n", err);
        return 1;
    }
    info = moe_engine_info(e);

    if (chat) {
        moe_chat_msg_t msg = { "user", text, strlen(text) };

        rc = moe_chat_render(moe_engine_tokenizer(e), info->chat_template,
                             &msg, 1, 1, &prompt_text, &len, err,
                             sizeof(err));
        if (rc != MOE_OK) {
            fprintf(stderr, "moe: %s\n", err);
            moe_engine_destroy(e);
            return 1;
        }
    } else {
        prompt_text = strdup(text);
        len = strlen(text);
    }

    rc = prompt_text == NULL ? MOE_ENOMEM
         : moe_tokenizer_encode(moe_engine_tokenizer(e), prompt_text, len,
                                !chat, &ids, &n_ids);
    free(prompt_text);
    if (rc != MOE_OK || n_ids == 0) {
        fprintf(stderr, "moe: cannot tokenize the prompt (%s)\n",
                rc != MOE_OK ? moe_strerror(rc) : "empty prompt");
        moe_engine_destroy(e);
        free(ids);
        return 1;
    }

    ts = moe_textstream_create(moe_engine_tokenizer(e), stops, n_stops, 1);
    rc = ts == NULL ? MOE_ENOMEM
                    : moe_engine_submit(e, 1, ids, (int) n_ids, &sp);
    free(ids);
    if (rc != MOE_OK) {
        fprintf(stderr, "moe: submit: %s\n", moe_strerror(rc));
        moe_textstream_free(ts);
        moe_engine_destroy(e);
        return 1;
    }

    pfd.fd = moe_engine_eventfd(e);
    pfd.events = POLLIN;

    while (!done) {
        size_t k, n;

        if (poll(&pfd, 1, 1000) < 0 && errno != EINTR) {
            break;
        }

        n = moe_engine_drain(e, ev, 64);
        for (k = 0; k < n && !done; k++) {
            if (ev[k].type == MOE_EV_TOKEN) {
                moe_textstream_push(ts, ev[k].token, &piece, &len, &stopped);
                fwrite(piece, 1, len, stdout);
                fflush(stdout);
                if (stopped) {
                    moe_engine_cancel(e, 1);
                    fprintf(stderr, "\n[finish: stop string]\n");
                    done = 1;
                }
            } else if (ev[k].type == MOE_EV_FINISH) {
                moe_textstream_finish(ts, &piece, &len);
                fwrite(piece, 1, len, stdout);
                fprintf(stderr, "\n[finish: %s, prompt %d tokens, "
                        "generated %d]\n",
                        ev[k].finish_reason == MOE_FINISH_STOP ? "stop"
                        : ev[k].finish_reason == MOE_FINISH_LENGTH ? "length"
                        : "other", ev[k].n_prompt, ev[k].n_generated);
                done = 1;
            } else {
                fprintf(stderr, "\nmoe: error: %s\n",
                        moe_strerror(ev[k].status));
                done = 1;
            }
        }
    }

    if (expert_stats) {
        int      L = info->n_layers, E = info->n_experts, l, x;
        int64_t *c = calloc((size_t) L * (size_t) E, sizeof(int64_t));

        moe_engine_stats(e, &st);
        if (c != NULL && moe_engine_expert_counts(e, c, (size_t) L * E) > 0) {
            printf("\nexpert routing (tokens per expert; share of layer):\n");
            printf("layer");
            for (x = 0; x < E; x++) {
                printf("  expert%-3d", x);
            }
            printf("\n");
            for (l = 0; l < L; l++) {
                int64_t tot = 0;

                for (x = 0; x < E; x++) {
                    tot += c[l * E + x];
                }
                printf("%5d", l);
                for (x = 0; x < E; x++) {
                    printf("  %4lld %4.1f%%", (long long) c[l * E + x],
                           tot ? 100.0 * c[l * E + x] / tot : 0.0);
                }
                printf("\n");
            }
        }
        free(c);
    }

    moe_textstream_free(ts);
    moe_engine_destroy(e);
    return 0;
}


static int
cmd_tokenize(int argc, char **argv)
{
    int               i, rc, special = 1, decode = 0;
    const char       *model = NULL, *text = NULL;
    char              path[MOE_PATH_MAX + 32], err[1024], *out;
    size_t            n, len;
    int32_t          *ids;
    moe_tokenizer_t  *t;

    for (i = 0; i < argc; i++) {
        if (!strcmp(argv[i], "-m") && i + 1 < argc) { model = argv[++i]; }
        else if (!strcmp(argv[i], "--no-special")) { special = 0; }
        else if (!strcmp(argv[i], "--decode")) { decode = 1; }
        else if (text == NULL) { text = argv[i]; }
        else { usage(); return 2; }
    }

    if (model == NULL || text == NULL) {
        usage();
        return 2;
    }

    snprintf(path, sizeof(path), "%s/tokenizer.json", model);
    if (moe_tokenizer_load(path, &t, err, sizeof(err)) != MOE_OK) {
        fprintf(stderr, "moe: %s\n", err);
        return 1;
    }

    rc = moe_tokenizer_encode(t, text, strlen(text), special, &ids, &n);
    if (rc != MOE_OK) {
        fprintf(stderr, "moe: encode: %s\n", moe_strerror(rc));
        moe_tokenizer_free(t);
        return 1;
    }

    for (i = 0; i < (int) n; i++) {
        printf("%d\t%s\n", ids[i], moe_tokenizer_id_to_token(t, ids[i]));
    }

    if (decode && moe_tokenizer_decode(t, ids, n, 0, &out, &len) == MOE_OK) {
        printf("decoded: %s\n", out);
        free(out);
    }

    free(ids);
    moe_tokenizer_free(t);
    return 0;
}


static int
cmd_logits(int argc, char **argv)
{
    int                  i, rc, top = 10, all = 0, V, n_blocks;
    const char          *model = NULL, *text = NULL, *idlist = NULL;
    char                 path[MOE_PATH_MAX + 32], err[1024];
    size_t               n = 0;
    int32_t             *ids = NULL, *table;
    float               *logits;
    moe_model_t         *m;
    moe_tokenizer_t     *t;
    moe_backend_t       *b;
    moe_seq_batch_t      sb;
    const moe_hparams_t *hp;

    for (i = 0; i < argc; i++) {
        const char *v = i + 1 < argc ? argv[i + 1] : NULL;

        if (!strcmp(argv[i], "-m") && v) { model = v; i++; }
        else if (!strcmp(argv[i], "-p") && v) { text = v; i++; }
        else if (!strcmp(argv[i], "--ids") && v) { idlist = v; i++; }
        else if (!strcmp(argv[i], "--top") && v) { top = atoi(v); i++; }
        else if (!strcmp(argv[i], "--all")) { all = 1; }
        else { usage(); return 2; }
    }

    if (model == NULL || (text == NULL) == (idlist == NULL)) {
        usage();
        return 2;
    }

    if (moe_model_load(model, 0, &m, err, sizeof(err)) != MOE_OK) {
        fprintf(stderr, "moe: %s\n", err);
        return 1;
    }
    hp = moe_model_hparams(m);
    V = hp->vocab_size;

    if (text != NULL) {
        snprintf(path, sizeof(path), "%s/tokenizer.json", model);
        if (moe_tokenizer_load(path, &t, err, sizeof(err)) != MOE_OK) {
            fprintf(stderr, "moe: %s\n", err);
            moe_model_free(m);
            return 1;
        }
        rc = moe_tokenizer_encode(t, text, strlen(text), 1, &ids, &n);
        moe_tokenizer_free(t);
        if (rc != MOE_OK) {
            fprintf(stderr, "moe: encode failed\n");
            moe_model_free(m);
            return 1;
        }
    } else {
        const char *p = idlist;

        ids = malloc(sizeof(int32_t) * (strlen(idlist) / 2 + 1));
        while (ids != NULL && *p) {
            char *end;
            long  v = strtol(p, &end, 10);

            if (end == p || v < 0 || v >= V) {
                fprintf(stderr, "moe: bad token id list at '%s'\n", p);
                free(ids);
                moe_model_free(m);
                return 1;
            }
            ids[n++] = (int32_t) v;
            p = *end == ',' ? end + 1 : end;
        }
    }

    if (n == 0) {
        fprintf(stderr, "moe: empty input\n");
        free(ids);
        moe_model_free(m);
        return 1;
    }

    n_blocks = (int) ((n + 15) / 16);
    table = malloc(sizeof(int32_t) * (size_t) n_blocks);
    logits = malloc(sizeof(float) * (size_t) V);
    rc = table && logits
         ? moe_cpu_backend_create(m, n_blocks, 16, 0, &b, err, sizeof(err))
         : MOE_ENOMEM;
    if (rc != MOE_OK) {
        fprintf(stderr, "moe: %s\n", rc == MOE_ENOMEM ? "out of memory" : err);
        free(ids); free(table); free(logits);
        moe_model_free(m);
        return 1;
    }

    for (i = 0; i < n_blocks; i++) {
        table[i] = i;
    }

    memset(&sb, 0, sizeof(sb));
    sb.tokens = ids;
    sb.n_tokens = (int) n;
    sb.pos = 0;
    sb.block_table = table;
    sb.n_blocks = n_blocks;
    sb.logits = logits;

    rc = b->forward(b, &sb, 1);
    if (rc != MOE_OK) {
        fprintf(stderr, "moe: forward failed: %s\n", moe_strerror(rc));
    } else if (all) {
        for (i = 0; i < V; i++) {
            printf("%d\t%.9g\n", i, logits[i]);
        }
    } else {
        /* top-N by selection, enough for a person to read */
        for (int k = 0; k < top && k < V; k++) {
            int best = -1;

            for (i = 0; i < V; i++) {
                if (logits[i] == logits[i]
                    && (best < 0 || logits[i] > logits[best]))
                {
                    best = i;
                }
            }
            printf("%d\t%.6f\n", best, logits[best]);
            logits[best] = 0.0f / 0.0f;  /* NaN: taken */
        }
    }

    b->destroy(b);
    free(ids); free(table); free(logits);
    moe_model_free(m);
    return rc == MOE_OK ? 0 : 1;
}


int
main(int argc, char **argv)
{
    if (argc < 2) {
        usage();
        return 2;
    }

    if (!strcmp(argv[1], "generate")) {
        return cmd_generate(argc - 2, argv + 2);
    }
    if (!strcmp(argv[1], "tokenize")) {
        return cmd_tokenize(argc - 2, argv + 2);
    }
    if (!strcmp(argv[1], "logits")) {
        return cmd_logits(argc - 2, argv + 2);
    }

    usage();
    return 2;
}
