/*
 * Checks the Jinja-subset chat-template interpreter (engine/jinja*.c):
 * expressions, filters, tests, methods, loops, scoping and whitespace
 * control against jinja2's own output (t/data/chat/cases.json); refusal of
 * unsupported or broken constructs with a message naming them; the real
 * chat templates (t/data/chat/templates) byte for byte against the
 * goldens of tools/chat_goldens.py; hand-verified ChatML, Llama-2 and
 * Mistral prompts through moe_chat_render(); and that random truncations
 * and mutations of the real templates return a result or an error.
 */

#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include <yajl/yajl_tree.h>

#include "moe.h"
#include "text/jinja.h"
#include "tap.h"

#define DATA  "t/data/chat/"

#ifndef JJ_FUZZ_N
#define JJ_FUZZ_N  400        /* variants per template (-D for more) */
#endif


static char *
slurp(const char *path, size_t *len)
{
    FILE  *f = fopen(path, "rb");
    char  *b;
    long   n;

    if (f == NULL) {
        return NULL;
    }
    fseek(f, 0, SEEK_END);
    n = ftell(f);
    rewind(f);
    b = malloc((size_t) n + 1);
    if (b == NULL || fread(b, 1, (size_t) n, f) != (size_t) n) {
        free(b);
        fclose(f);
        return NULL;
    }
    b[n] = '\0';
    fclose(f);
    if (len != NULL) {
        *len = (size_t) n;
    }
    return b;
}


static yajl_val
load_json(const char *path)
{
    char      *s = slurp(path, NULL), ebuf[256];
    yajl_val   v;

    if (s == NULL) {
        return NULL;
    }
    v = yajl_tree_parse(s, ebuf, sizeof(ebuf));
    free(s);
    return v;
}


static const char *
jstr(yajl_val obj, const char *key)
{
    const char  *path[] = { key, NULL };
    yajl_val     v = yajl_tree_get(obj, path, yajl_t_any);

    return v && YAJL_IS_STRING(v) ? YAJL_GET_STRING(v) : NULL;
}


static yajl_val
jget(yajl_val obj, const char *key)
{
    const char  *path[] = { key, NULL };

    return yajl_tree_get(obj, path, yajl_t_any);
}


/* parse + render with JSON variables; *out NULL on failure */
static int
render(const char *src, const char *vars, char **out, char *err, size_t el)
{
    moe_jinja_tmpl_t  *t;
    size_t             n;
    int                rc;

    *out = NULL;
    rc = moe_jinja_parse(src, strlen(src), &t, err, el);
    if (rc != MOE_OK) {
        return rc;
    }
    rc = moe_jinja_render_json(t, vars, out, &n, err, el);
    moe_jinja_free(t);
    return rc;
}


static void
diag_str(const char *what, const char *s)
{
    printf("# %s: \"", what);
    for ( ; s && *s; s++) {
        if (*s == '\n') printf("\\n");
        else if (*s == '\t') printf("\\t");
        else putchar(*s);
    }
    printf("\"\n");
}


static void
check_cases(void)
{
    yajl_val     doc = load_json(DATA "cases.json"), arr;
    const char  *vars;
    size_t       i;
    char        *out, err[512];

    TAP_OK(doc != NULL, "cases.json loads");
    if (doc == NULL) {
        return;
    }
    vars = jstr(doc, "vars_json");

    arr = jget(doc, "render");
    for (i = 0; arr && i < arr->u.array.len; i++) {
        yajl_val     c = arr->u.array.values[i];
        const char  *src = jstr(c, "template"), *exp = jstr(c, "expected");
        int          rc = render(src, vars, &out, err, sizeof(err));
        int          ok = rc == MOE_OK && strcmp(out, exp) == 0;

        TAP_OK(ok, "render case %zu", i);
        if (!ok) {
            diag_str("template", src);
            diag_str("expected", exp);
            diag_str(rc == MOE_OK ? "got" : "error", rc == MOE_OK ? out : err);
        }
        free(out);
    }

    arr = jget(doc, "errors");
    for (i = 0; arr && i < arr->u.array.len; i++) {
        yajl_val     c = arr->u.array.values[i];
        const char  *src = jstr(c, "template"), *msg = jstr(c, "error");
        int          rc = render(src, vars, &out, err, sizeof(err));
        int          ok = rc == MOE_EINVAL && strstr(err, msg) != NULL;

        TAP_OK(ok, "error case %zu: %s", i, msg);
        if (!ok) {
            printf("# rc %d err \"%s\"\n", rc, rc ? err : "");
        }
        free(out);
    }
    yajl_tree_free(doc);
}


/* conversation `name` of conversations.json as moe_chat_msg_t[] */
static int
conversation(yajl_val convs, const char *name, moe_chat_msg_t *msgs, int max,
    int *agp)
{
    size_t  i, k;

    for (i = 0; i < convs->u.array.len; i++) {
        yajl_val  c = convs->u.array.values[i], m;

        if (strcmp(jstr(c, "name"), name) != 0) {
            continue;
        }
        m = jget(c, "messages");
        *agp = YAJL_IS_TRUE(jget(c, "add_generation_prompt"));
        for (k = 0; k < m->u.array.len && (int) k < max; k++) {
            msgs[k].role = jstr(m->u.array.values[k], "role");
            msgs[k].content = jstr(m->u.array.values[k], "content");
            msgs[k].content_len = strlen(msgs[k].content);
        }
        return (int) k;
    }
    return -1;
}


static void
check_goldens(void)
{
    yajl_val     doc = load_json(DATA "goldens.json");
    yajl_val     convs = load_json(DATA "conversations.json"), cases;
    const char  *last = "";
    size_t       i;
    int          pass = 0, total = 0, shown = 0;

    if (doc == NULL || convs == NULL) {
        TAP_DIAG("SKIP goldens: %sgoldens.json missing (run python3 "
                 "tools/chat_goldens.py --out %sgoldens.json)", DATA, DATA);
        yajl_tree_free(doc);
        yajl_tree_free(convs);
        return;
    }
    TAP_DIAG("goldens by %s (transformers %s)", jstr(doc, "method"),
             jstr(doc, "transformers") ? jstr(doc, "transformers") : "none");

    cases = jget(doc, "cases");
    for (i = 0; i <= cases->u.array.len; i++) {
        yajl_val               c = i < cases->u.array.len
                                   ? cases->u.array.values[i] : NULL;
        const char            *name = c ? jstr(c, "template") : "";
        char                   path[256], *src, *out = NULL, err[512];
        moe_jinja_tmpl_t      *t = NULL;
        moe_jinja_chat_vars_t  v;
        moe_chat_msg_t         msgs[32];
        const char            *tp[] = { "tokens", name, NULL, NULL };
        size_t                 n;
        int                    rc, ok;

        if (strcmp(name, last) != 0 && last[0] != '\0') {
            TAP_OK(pass == total && total > 0, "template %s: %d/%d goldens "
                   "byte-identical", last, pass, total);
            pass = total = shown = 0;
        }
        last = name;
        if (c == NULL) {
            break;
        }
        total++;
        snprintf(path, sizeof(path), DATA "templates/%s.jinja", name);
        src = slurp(path, &n);
        if (src == NULL || moe_jinja_parse(src, n, &t, err, sizeof(err))) {
            TAP_DIAG("%s: cannot load/parse: %s", name, src ? err : path);
            free(src);
            continue;
        }
        memset(&v, 0, sizeof(v));
        v.msgs = msgs;
        v.n_msgs = conversation(convs, jstr(c, "conversation"), msgs, 32,
                                &v.add_generation_prompt);
        tp[2] = "bos_token";
        v.bos_token = YAJL_GET_STRING(yajl_tree_get(doc, tp, yajl_t_any));
        tp[2] = "eos_token";
        v.eos_token = YAJL_GET_STRING(yajl_tree_get(doc, tp, yajl_t_any));

        rc = moe_jinja_render_chat(t, &v, &out, &n, err, sizeof(err));
        if (YAJL_IS_TRUE(jget(c, "error"))) {
            ok = rc == MOE_EINVAL;
        } else {
            ok = rc == MOE_OK && n == strlen(jstr(c, "expected"))
                 && memcmp(out, jstr(c, "expected"), n) == 0;
        }
        pass += ok;
        if (!ok && shown++ < 2) {
            TAP_DIAG("%s x %s: rc %d", name, jstr(c, "conversation"), rc);
            diag_str("expected", YAJL_IS_TRUE(jget(c, "error"))
                                 ? "(an error)" : jstr(c, "expected"));
            diag_str(rc == MOE_OK ? "got" : "error", rc == MOE_OK ? out : err);
        }
        free(out);
        moe_jinja_free(t);
        free(src);
    }
    yajl_tree_free(doc);
    yajl_tree_free(convs);
}


static int
chat(const char *tmpl_path, const moe_chat_msg_t *m, int n, const char *exp)
{
    char   *src = tmpl_path ? slurp(tmpl_path, NULL) : NULL, *out = NULL;
    char    err[512];
    size_t  len;
    int     rc, ok;

    if (tmpl_path != NULL && src == NULL) {
        return 0;
    }
    rc = moe_chat_render(NULL, src, m, n, 1, &out, &len, err, sizeof(err));
    ok = exp ? rc == MOE_OK && strcmp(out, exp) == 0 : rc == MOE_EINVAL;
    if (!ok) {
        diag_str("expected", exp ? exp : "(an error)");
        diag_str(rc == MOE_OK ? "got" : "error", rc == MOE_OK ? out : err);
    }
    free(out);
    free(src);
    return ok;
}


/* render_chat with <s> and </s> */
static int
chat_vars(const char *tmpl_path, moe_chat_msg_t *m, int n, const char *exp)
{
    char                   *src = slurp(tmpl_path, NULL), *out = NULL;
    char                    err[512];
    size_t                  len;
    moe_jinja_tmpl_t       *t = NULL;
    moe_jinja_chat_vars_t   v = { m, n, 1, "<s>", "</s>" };
    int                     ok;

    ok = src != NULL
         && moe_jinja_parse(src, strlen(src), &t, err, sizeof(err)) == 0
         && moe_jinja_render_chat(t, &v, &out, &len, err, sizeof(err)) == 0
         && strcmp(out, exp) == 0;
    if (!ok) {
        diag_str("expected", exp);
        diag_str("got", out ? out : err);
    }
    free(out);
    moe_jinja_free(t);
    free(src);
    return ok;
}


static void
check_hand(void)
{
    moe_chat_msg_t  su[] = { { "system", "S", 1 }, { "user", "Hi", 2 } };
    moe_chat_msg_t  uau[] = { { "user", "Hi", 2 }, { "assistant", "Yo", 2 },
                              { "user", "More", 4 } };
    moe_chat_msg_t  uu[] = { { "user", "a", 1 }, { "user", "b", 1 } };
    char           *out, err[256];

    TAP_OK(chat(NULL, su, 2, "<|im_start|>system\nS<|im_end|>\n<|im_start|>"
                "user\nHi<|im_end|>\n<|im_start|>assistant\n"),
           "no template: ChatML");
    TAP_OK(chat(DATA "templates/qwen2-instruct.jinja", uau + 2, 1,
                "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
                "<|im_start|>user\nMore<|im_end|>\n<|im_start|>assistant\n"),
           "qwen2 template adds its default system prompt");
    /* no tokenizer: bos_token is undefined, and Jinja refuses str + it */
    TAP_OK(chat(DATA "templates/llama-2-chat.jinja", su, 2, NULL),
           "llama-2 without a tokenizer: undefined bos_token is an error");
    TAP_OK(chat_vars(DATA "templates/llama-2-chat.jinja", su, 2,
                     "<s>[INST] <<SYS>>\nS\n<</SYS>>\n\nHi [/INST]"),
           "llama-2 folds the system prompt into the first [INST]");
    TAP_OK(chat_vars(DATA "templates/mistral-7b-instruct.jinja", uau, 3,
                     "<s>[INST] Hi [/INST]Yo</s> [INST] More [/INST]"),
           "mistral v0.1 turns");
    TAP_OK(chat_vars(DATA "templates/mixtral-8x7b-instruct.jinja", su, 2,
                     "<s> [INST] S\n\nHi [/INST]"),
           "mixtral folds the system prompt into the first [INST]");
    TAP_OK(chat_vars(DATA "templates/zephyr.jinja", uau, 1,
                     "<|user|>\nHi</s>\n<|assistant|>\n"),
           "zephyr turn");
    TAP_OK(chat(DATA "templates/mistral-7b-instruct.jinja", uu, 2, NULL),
           "mistral refuses non-alternating roles (raise_exception)");
    TAP_OK(render("{% generation %}gen {{ n }}{% endgeneration %}",
                  "{\"n\": 7}", &out, err, sizeof(err)) == MOE_OK
           && strcmp(out, "gen 7") == 0, "{%% generation %%} renders its body");
    free(out);
    TAP_OK(render("{{ x }}", "[1]", &out, err, sizeof(err)) == MOE_EINVAL,
           "render_json refuses a non-object");
}


static uint64_t  rng = 0x9e3779b97f4a7c15ULL;

static uint64_t
next_rand(void)
{
    rng ^= rng << 13;
    rng ^= rng >> 7;
    rng ^= rng << 17;
    return rng;
}


static void
check_fuzz(void)
{
    static const char  *names[] = { "llama-2-chat", "llama-3-instruct",
        "llama-3.1-instruct", "mistral-7b-instruct", "mixtral-8x7b-instruct",
        "qwen2-instruct", "qwen3", "zephyr", NULL };
    static const char   alpha[] = "{}%#-+()[]'\"|.~:,= \nifendforsetnot0";
    moe_chat_msg_t      m[] = { { "system", "S", 1 }, { "user", "Hi", 2 },
                                { "assistant", "Yo", 2 }, { "user", "x", 1 } };
    moe_jinja_chat_vars_t  v = { m, 4, 1, "<s>", "</s>" };
    int                 k, i;

    for (k = 0; names[k] != NULL; k++) {
        char     path[256], *src, *buf, *out, err[512];
        size_t   n, len;
        int      bad = 0, oks = 0, errs = 0;
        clock_t  t0;

        snprintf(path, sizeof(path), DATA "templates/%s.jinja", names[k]);
        src = slurp(path, &n);
        if (src == NULL) {
            TAP_OK(0, "fuzz %s: template missing", names[k]);
            continue;
        }
        buf = malloc(n + 1);
        t0 = clock();
        for (i = 0; i < JJ_FUZZ_N; i++) {
            moe_jinja_tmpl_t  *t;
            size_t             j, cut = n;
            int                rc;

            memcpy(buf, src, n);
            if (i % 2 == 0) {
                cut = (size_t) (next_rand() % (n + 1));
            } else {
                for (j = 0; j < 1 + next_rand() % 4; j++) {
                    buf[next_rand() % n] = alpha[next_rand()
                                                 % (sizeof(alpha) - 1)];
                }
            }
            rc = moe_jinja_parse(buf, cut, &t, err, sizeof(err));
            if (rc == MOE_OK) {
                out = NULL;
                rc = moe_jinja_render_chat(t, &v, &out, &len, err,
                                           sizeof(err));
                if (rc == MOE_OK && (out == NULL || out[len] != '\0')) {
                    bad++;
                }
                free(out);
                moe_jinja_free(t);
            }
            if (rc == MOE_OK) {
                oks++;
            } else if (rc == MOE_EINVAL) {
                errs++;
            } else {
                bad++;
                TAP_DIAG("rc %d: %s", rc, err);
            }
        }
        TAP_OK(bad == 0, "fuzz %s: %d variants, %d rendered, %d refused "
               "with a message (%.1f ms)", names[k], JJ_FUZZ_N, oks, errs,
               (double) (clock() - t0) * 1000.0 / CLOCKS_PER_SEC);
        free(buf);
        free(src);
    }
}


static void
check_speed(void)
{
    char                  *src, *out, err[256];
    size_t                 n, len;
    moe_jinja_tmpl_t      *t = NULL;
    moe_chat_msg_t         m[] = { { "system", "S", 1 }, { "user", "Hi", 2 } };
    moe_jinja_chat_vars_t  v = { m, 2, 1, NULL, "<|im_end|>" };
    clock_t                t0;
    int                    i, ok = 1;

    src = slurp(DATA "templates/qwen3.jinja", &n);
    t0 = clock();
    for (i = 0; src && i < 200; i++) {
        moe_jinja_free(t);
        ok &= moe_jinja_parse(src, n, &t, err, sizeof(err)) == MOE_OK;
    }
    TAP_DIAG("qwen3 template: parse %.1f us", (double) (clock() - t0)
             * 1e6 / CLOCKS_PER_SEC / 200);
    t0 = clock();
    for (i = 0; t && i < 200; i++) {
        ok &= moe_jinja_render_chat(t, &v, &out, &len, err, sizeof(err))
              == MOE_OK;
        free(out);
    }
    TAP_DIAG("qwen3 template: render %.1f us", (double) (clock() - t0)
             * 1e6 / CLOCKS_PER_SEC / 200);
    TAP_OK(ok && t != NULL, "qwen3 parses and renders repeatedly");
    moe_jinja_free(t);
    free(src);
}


int
main(void)
{
    check_cases();
    check_hand();
    check_goldens();
    check_fuzz();
    check_speed();
    printf("1..%d\n", tap_n);
    return TAP_DONE();
}
