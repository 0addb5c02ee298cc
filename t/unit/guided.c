/*
 * Guided decoding (engine/guided/): each compiler accepts and rejects
 * strings as its language says (JSON Schema: nested objects, enum, anyOf,
 * $ref, min/maxItems, additionalProperties false, pattern, formats;
 * json_object; regex; GBNF; choice); bad guides fail with MOE_EINVAL and
 * an error naming the problem; the allowed-token mask equals a brute-force
 * check over the vocabulary (a token is allowed iff its bytes can
 * continue the text; EOS iff the text may end there) at every step of a
 * few documents, on models/localmoe-tiny's and localmoe-kjv's tokenizers;
 * and greedy and sampled generation through the engine (CPU backend) with
 * a guide always yields text the guide accepts.
 */

#include <poll.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include <yajl/yajl_tree.h>

#include "moe.h"
#include "guided/guided.h"
#include "guided/guided_int.h"
#include "text/tokenizer.h"
#include "tap.h"

static char srcdir[1024] = ".";


/* 1 when text is a complete string of the guide's language */
static int
accepts(const moe_tokenizer_t *t, moe_guided_kind_t kind, const char *spec,
    const char *text)
{
    moe_guide_t        *g;
    moe_guided_state_t *st;
    char                err[256];
    int                 ok;

    if (moe_guide_compile(t, kind, spec, spec ? strlen(spec) : 0, &g, err,
                          sizeof(err)) != MOE_OK)
    {
        TAP_DIAG("compile failed: %s", err);
        return -1;
    }
    st = moe_guided_state_create(g, NULL, 0);
    moe_guide_release(g);
    if (st == NULL) {
        return -1;
    }
    ok = moe_guided_feed(st, text, strlen(text)) == MOE_OK
         && moe_guided_is_accepting(st);
    moe_guided_state_free(st);
    return ok;
}


typedef struct {
    const char *text;
    int         ok;
} case_t;


static void
check_cases(const moe_tokenizer_t *t, moe_guided_kind_t kind,
    const char *name, const char *spec, const case_t *c)
{
    for (; c->text != NULL; c++) {
        int r = accepts(t, kind, spec, c->text);
        TAP_OK(r == c->ok, "%s: %s '%s'", name,
               c->ok ? "accepts" : "rejects", c->text);
    }
}


/* compile must fail with MOE_EINVAL and err containing `want` */
static void
check_error(const moe_tokenizer_t *t, moe_guided_kind_t kind,
    const char *spec, const char *want)
{
    moe_guide_t *g = NULL;
    char         err[256] = "";
    int          rc;

    rc = moe_guide_compile(t, kind, spec, strlen(spec), &g, err, sizeof(err));
    TAP_OK(rc == MOE_EINVAL && g == NULL && strstr(err, want) != NULL,
           "refused: %.60s -> '%s' (want '%s')", spec, err, want);
    moe_guide_release(g);
}


/*
 * Walk `text` token by token (its greedy longest-token split is not
 * needed: feed it byte-wise between mask checks) and at each of a few
 * byte positions compare the mask with a brute-force scan.
 */
static int
mask_matches_brute(const moe_tokenizer_t *t, moe_guided_kind_t kind,
    const char *spec, const char *text, const int32_t *eos, int n_eos)
{
    moe_guide_t        *g;
    moe_guided_state_t *st, *probe;
    char                err[256], buf[1024];
    int                 vocab = moe_tokenizer_vocab_size(t), id, n, bad = 0;
    size_t              nw = (size_t) (vocab + 31) / 32, pos, len;
    uint32_t           *w;
    int                 want, got, k;

    if (moe_guide_compile(t, kind, spec, strlen(spec), &g, err, sizeof(err))
        != MOE_OK)
    {
        TAP_DIAG("compile: %s", err);
        return 0;
    }
    w = calloc(nw, sizeof(uint32_t));
    len = strlen(text);
    for (pos = 0; pos <= len && !bad; pos++) {
        st = moe_guided_state_create(g, eos, n_eos);
        if (moe_guided_feed(st, text, pos) != MOE_OK) {
            TAP_DIAG("prefix %zu of the document rejected", pos);
            bad = 1;
            moe_guided_state_free(st);
            break;
        }
        n = moe_guided_mask(st, w, nw);
        got = 0;
        for (id = 0; id < vocab; id++) {
            got += (w[id >> 5] >> (id & 31)) & 1;
            want = 0;
            for (k = 0; k < n_eos; k++) {
                if (id == eos[k]) {
                    want = moe_guided_is_accepting(st) ? 1 : 0;
                    goto cmp;
                }
            }
            if (!moe_tokenizer_is_special(t, id)) {
                int bl = moe_tokenizer_token_bytes(t, id, buf, sizeof(buf));
                if (bl > 0) {
                    probe = moe_guided_state_create(g, eos, n_eos);
                    moe_guided_feed(probe, text, pos);
                    want = moe_guided_feed(probe, buf, (size_t) bl)
                           == MOE_OK;
                    moe_guided_state_free(probe);
                }
            }
cmp:
            if (want != (int) ((w[id >> 5] >> (id & 31)) & 1)) {
                TAP_DIAG("pos %zu token %d: mask %d, brute force %d", pos,
                         id, !want, want);
                bad = 1;
                break;
            }
        }
        if (!bad && got != n) {
            TAP_DIAG("pos %zu: mask count %d, bits %d", pos, n, got);
            bad = 1;
        }
        moe_guided_state_free(st);
    }
    free(w);
    moe_guide_release(g);
    return !bad;
}


static const char *schema_person =
    "{\"type\":\"object\",\"properties\":{"
    "\"name\":{\"type\":\"string\",\"minLength\":1,\"maxLength\":8},"
    "\"age\":{\"type\":\"integer\",\"minimum\":0},"
    "\"tags\":{\"type\":\"array\",\"items\":{\"enum\":[\"a\",\"b\",1]},"
    "\"minItems\":1,\"maxItems\":2},"
    "\"pet\":{\"anyOf\":[{\"$ref\":\"#/$defs/pet\"},{\"type\":\"null\"}]},"
    "\"code\":{\"type\":\"string\",\"pattern\":\"^[A-Z]{2}-\\\\d{1,4}$\"}"
    "},\"required\":[\"name\",\"age\"],\"additionalProperties\":false,"
    "\"$defs\":{\"pet\":{\"type\":\"object\",\"properties\":{"
    "\"kind\":{\"const\":\"cat\"},\"born\":{\"type\":\"string\","
    "\"format\":\"date\"}},\"required\":[\"kind\"],"
    "\"additionalProperties\":false}}}";

static const case_t person_cases[] = {
    { "{\"name\":\"Al\",\"age\":3}", 1 },
    { "{ \"name\": \"Al\", \"age\": 30 }", 1 },
    { "{\n  \"name\": \"Al\",\n  \"age\": 0\n}", 1 },
    { "{\"name\":\"Al\",\"age\":3,\"tags\":[\"a\",1]}", 1 },
    { "{\"name\":\"Al\",\"age\":3,\"tags\":[]}", 0 },
    { "{\"name\":\"Al\",\"age\":3,\"tags\":[\"a\",\"b\",1]}", 0 },
    { "{\"name\":\"Al\",\"age\":3,\"tags\":[\"c\"]}", 0 },
    { "{\"name\":\"Al\",\"age\":3,\"pet\":null}", 1 },
    { "{\"name\":\"Al\",\"age\":3,\"pet\":{\"kind\":\"cat\"}}", 1 },
    { "{\"name\":\"Al\",\"age\":3,\"pet\":{\"kind\":\"cat\","
      "\"born\":\"2020-02-29\"}}", 1 },
    { "{\"name\":\"Al\",\"age\":3,\"pet\":{\"kind\":\"cat\","
      "\"born\":\"2020-13-01\"}}", 0 },
    { "{\"name\":\"Al\",\"age\":3,\"pet\":{\"kind\":\"dog\"}}", 0 },
    { "{\"name\":\"Al\",\"age\":3,\"code\":\"AB-12\"}", 1 },
    { "{\"name\":\"Al\",\"age\":3,\"code\":\"Ab-12\"}", 0 },
    { "{\"name\":\"Al\",\"age\":3,\"x\":1}", 0 },
    { "{\"name\":\"Al\"}", 0 },
    { "{\"age\":3,\"name\":\"Al\"}", 0 },
    { "{\"name\":\"\",\"age\":3}", 0 },
    { "{\"name\":\"123456789\",\"age\":3}", 0 },
    { "{\"name\":\"Al\",\"age\":-3}", 0 },
    { "{\"name\":\"Al\",\"age\":3.5}", 0 },
    { "{\"name\":\"A\\\"l\",\"age\":3}", 1 },
    { "{\"name\":\"Al\",\"age\":3}x", 0 },
    { NULL, 0 }
};

static const case_t open_cases[] = {      /* additionalProperties absent */
    { "{\"id\":1}", 1 },
    { "{\"id\":1,\"extra\":[1,{\"a\":null}]}", 1 },
    { "{\"extra\":true}", 0 },              /* id is required */
    { "{\"id\":\"x\"}", 0 },
    { NULL, 0 }
};

static const case_t types_cases[] = {      /* type arrays, number, bool */
    { "[1,\"a\",null,true,-2.5e3]", 1 },
    { "[]", 1 },
    { "[{}]", 0 },
    { "[1,]", 0 },
    { NULL, 0 }
};

static const case_t obj_cases[] = {
    { "{}", 1 },
    { "{\"a\":[1,2,{\"b\":\"\\u00e9\"}],\"c\":false}", 1 },
    { "[1]", 0 },
    { "{\"a\"}", 0 },
    { "\"s\"", 0 },
    { NULL, 0 }
};

static const case_t recursive_cases[] = {
    { "{\"v\":1,\"next\":{\"v\":2,\"next\":null}}", 1 },
    { "{\"v\":1,\"next\":{\"v\":\"x\",\"next\":null}}", 0 },
    { NULL, 0 }
};

static const case_t formats_cases[] = {
    { "[\"2024-01-31T12:00:00Z\",\"123e4567-e89b-12d3-a456-426614174000\","
      "\"a.b@example.com\",\"10.0.0.255\"]", 1 },
    { "[\"2024-01-31 12:00:00Z\",\"123e4567-e89b-12d3-a456-426614174000\","
      "\"a.b@example.com\",\"10.0.0.255\"]", 0 },
    { "[\"2024-01-31T12:00:00Z\",\"123e4567e89b-12d3-a456-426614174000\","
      "\"a.b@example.com\",\"10.0.0.255\"]", 0 },
    { "[\"2024-01-31T12:00:00Z\",\"123e4567-e89b-12d3-a456-426614174000\","
      "\"a.b.example.com\",\"10.0.0.255\"]", 0 },
    { "[\"2024-01-31T12:00:00Z\",\"123e4567-e89b-12d3-a456-426614174000\","
      "\"a.b@example.com\",\"10.0.0.256\"]", 0 },
    { NULL, 0 }
};

static const case_t regex_cases[] = {
    { "abc-123", 1 },
    { "xy-1", 1 },
    { "ab-", 0 },
    { "abcd-1", 0 },
    { "ab-12345", 0 },
    { "ab_1", 1 },
    { "ab 1", 1 },
    { "AB-1", 0 },
    { NULL, 0 }
};

static const case_t regex2_cases[] = {
    { "cat", 1 }, { "dog", 1 }, { "dogs", 1 }, { "do", 0 },
    { "(x)", 1 }, { "(x", 0 }, { "\xc3\xa9t\xc3\xa9", 1 }, { "\xc3\xa9t", 0 },
    { "a.b", 1 }, { "a\nb", 0 }, { "a\xe2\x82\xac" "b", 1 },
    { NULL, 0 }
};

static const char *gbnf_arith =
    "# arithmetic\n"
    "root ::= expr\n"
    "expr ::= term ( [+-] term )*\n"
    "term ::= factor ( \"*\" factor )*\n"
    "factor ::= num | \"(\" expr \")\"\n"
    "num ::= [0-9]+ ( \".\" [0-9]{1,2} )?\n";

static const case_t gbnf_cases[] = {
    { "1+2*3", 1 }, { "(1+2)*3.25", 1 }, { "((4))", 1 }, { "1+", 0 },
    { "(1", 0 }, { "1.234", 0 }, { "", 0 },
    { NULL, 0 }
};

static const char *gbnf_unicode =
    "root ::= greet \" \" name\n"
    "greet ::= \"hi\" | \"\\u00e9l\\u00e8ve\"\n"
    "name ::= [^ \\n]{1,5}\n";

static const case_t gbnf_u_cases[] = {
    { "hi bob", 1 }, { "\xc3\xa9l\xc3\xa8ve \xe2\x82\xac\xe2\x82\xac", 1 },
    { "hi \xf0\x9f\x98\x80", 1 }, { "hi ", 0 }, { "hi abcdef", 0 },
    { "hi a b", 0 }, { "hi \xc3", 0 },
    { NULL, 0 }
};

static const case_t nested_opt_cases[] = {
    { "", 1 }, { "a", 1 }, { "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa", 1 },
    { "b", 0 },
    { NULL, 0 }
};

static const case_t nested_null_cases[] = {
    { "", 1 }, { "abcab", 1 }, { "cccc", 1 }, { "abbbbc", 1 }, { "d", 0 },
    { NULL, 0 }
};

static const case_t choice_cases[] = {
    { "yes", 1 }, { "no", 1 }, { "maybe \"so\"", 1 }, { "ye", 0 },
    { "yesno", 0 }, { "\"yes\"", 0 },
    { NULL, 0 }
};


static double
now_s(void)
{
    struct timespec ts;

    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double) ts.tv_sec + (double) ts.tv_nsec / 1e9;
}


/* compile spec as GBNF: its status and, in *secs, how long it took */
static int
compile_timed(const moe_tokenizer_t *t, const char *spec, double *secs)
{
    moe_guide_t *g = NULL;
    char         err[256];
    double       t0 = now_s();
    int          rc;

    rc = moe_guide_compile(t, MOE_GUIDED_GRAMMAR, spec, strlen(spec), &g,
                           err, sizeof(err));
    *secs = now_s() - t0;
    if (rc != MOE_OK) {
        TAP_DIAG("compile: %s", err);
    }
    moe_guide_release(g);
    return rc;
}


/* n '[' then n ']' (a document nested n deep), malloc()ed */
static char *
nested(size_t n)
{
    char *s = malloc(2 * n + 1);

    if (s != NULL) {
        memset(s, '[', n);
        memset(s + n, ']', n);
        s[2 * n] = '\0';
    }
    return s;
}


/*
 * An OpenAI-style schema: `depth` levels of objects with `width`
 * properties each (strings, integers, enums, arrays of strings), all
 * required, the last property of each level the next level; and a
 * document it accepts.  Both malloc()ed.
 */
static void
wide_deep_schema(int depth, int width, char **schema, char **doc)
{
    gbuf_t  s = {0}, d = {0};
    int     lv, k;

    for (lv = 0; lv < depth; lv++) {
        gb_puts(&s, "{\"type\":\"object\",\"properties\":{");
        gb_puts(&d, "{");
        for (k = 0; k < width; k++) {
            gb_printf(&s, "%s\"p%d_%d\":", k ? "," : "", lv, k);
            gb_printf(&d, "%s\"p%d_%d\":", k ? "," : "", lv, k);
            if (k == width - 1 && lv < depth - 1) {
                continue;               /* the next level follows */
            }
            switch (k % 4) {
            case 0:
                gb_puts(&s, "{\"type\":\"string\",\"description\":\"x\"}");
                gb_puts(&d, "\"v\"");
                break;
            case 1:
                gb_puts(&s, "{\"type\":\"integer\"}");
                gb_puts(&d, "42");
                break;
            case 2:
                gb_puts(&s, "{\"enum\":[\"a\",\"b\",\"c\"]}");
                gb_puts(&d, "\"b\"");
                break;
            default:
                gb_puts(&s, "{\"type\":\"array\",\"items\":{\"type\":"
                        "\"string\"}}");
                gb_puts(&d, "[\"x\",\"y\"]");
                break;
            }
        }
    }
    for (lv = depth; lv-- > 0;) {
        gb_puts(&s, "},\"required\":[");
        for (k = 0; k < width; k++) {
            gb_printf(&s, "%s\"p%d_%d\"", k ? "," : "", lv, k);
        }
        gb_puts(&s, "],\"additionalProperties\":false}");
        gb_puts(&d, "}");
    }
    *schema = s.p;
    *doc = d.p;
}


/* ------------------------------------------------------- generation */

typedef struct {
    char    text[4096];
    size_t  len;
    int     finish;
    int     error;
    int     n_tokens;
} gen_t;


static int
generate(moe_engine_t *e, uint64_t id, moe_guide_t *g, float temperature,
    uint64_t seed, int max_tokens, gen_t *out)
{
    const moe_tokenizer_t *t = moe_engine_tokenizer(e);
    moe_sampling_t         sp;
    int32_t                prompt[64], toks[1024];
    size_t                 np = 0;
    int32_t               *ids = NULL;
    moe_event_t            ev[64];
    struct pollfd          pfd;
    size_t                 n, i;
    int                    done = 0, nt = 0, loops = 0;
    char                  *txt = NULL;
    size_t                 tl = 0;

    memset(out, 0, sizeof(*out));
    if (moe_tokenizer_encode(t, "The answer is", 13, 0, &ids, &np) != MOE_OK
        || np == 0 || np > 64)
    {
        free(ids);
        return -1;
    }
    memcpy(prompt, ids, np * sizeof(int32_t));
    free(ids);
    moe_sampling_defaults(&sp);
    sp.temperature = temperature;
    sp.seed = seed;
    sp.has_seed = 1;
    sp.max_tokens = max_tokens;
    sp.guide = g;
    if (moe_engine_submit(e, id, prompt, (int) np, &sp) != MOE_OK) {
        return -1;
    }
    pfd.fd = moe_engine_eventfd(e);
    pfd.events = POLLIN;
    while (!done && loops++ < 100000) {
        poll(&pfd, 1, 1000);
        n = moe_engine_drain(e, ev, 64);
        for (i = 0; i < n; i++) {
            if (ev[i].req_id != id) {
                continue;
            }
            if (ev[i].type == MOE_EV_TOKEN && nt < 1024) {
                toks[nt++] = ev[i].token;
            } else if (ev[i].type == MOE_EV_FINISH) {
                out->finish = ev[i].finish_reason;
                done = 1;
            } else if (ev[i].type == MOE_EV_ERROR) {
                out->error = ev[i].status ? ev[i].status : -1;
                done = 1;
            }
        }
    }
    out->n_tokens = nt;
    if (moe_tokenizer_decode(t, toks, (size_t) nt, 1, &txt, &tl) == MOE_OK) {
        if (tl >= sizeof(out->text)) {
            tl = sizeof(out->text) - 1;
        }
        memcpy(out->text, txt, tl);
        out->text[tl] = '\0';
        out->len = tl;
    }
    free(txt);
    return done ? 0 : -1;
}


/* code points of a UTF-8 string (maxLength counts characters) */
static size_t
u8len(const char *s)
{
    size_t n = 0;

    for (; *s; s++) {
        n += ((unsigned char) *s & 0xc0) != 0x80;
    }
    return n;
}


/* the person schema's own checks on a parsed document */
static int
valid_person(const char *text)
{
    char      err[128];
    yajl_val  v, name, age, extra;
    size_t    i;
    int       ok;

    v = yajl_tree_parse(text, err, sizeof(err));
    if (v == NULL || !YAJL_IS_OBJECT(v)) {
        yajl_tree_free(v);
        return 0;
    }
    const char *pn[] = { "name", NULL }, *pa[] = { "age", NULL };
    name = yajl_tree_get(v, pn, yajl_t_string);
    age = yajl_tree_get(v, pa, yajl_t_number);
    ok = name != NULL && age != NULL && YAJL_IS_INTEGER(age)
         && YAJL_GET_INTEGER(age) >= 0 && u8len(name->u.string) >= 1
         && u8len(name->u.string) <= 8;
    for (i = 0; i < v->u.object.len; i++) {
        const char *k = v->u.object.keys[i];
        if (strcmp(k, "name") && strcmp(k, "age") && strcmp(k, "tags")
            && strcmp(k, "pet") && strcmp(k, "code"))
        {
            ok = 0;
        }
    }
    extra = NULL;
    (void) extra;
    yajl_tree_free(v);
    return ok;
}


static moe_engine_t *
make_engine(const char *model)
{
    char           err[1024];
    moe_config_t   cfg;
    moe_engine_t  *e;

    moe_config_defaults(&cfg);
    snprintf(cfg.model_name, sizeof(cfg.model_name), "%s", model);
    snprintf(cfg.model_path, sizeof(cfg.model_path), "%.900s/models/%s",
             srcdir, model);
    snprintf(cfg.backend, sizeof(cfg.backend), "cpu");
    cfg.max_model_len = 512;
    cfg.max_num_seqs = 4;
    cfg.cpu_threads = 1;
    if (moe_engine_create(&cfg, &e, err, sizeof(err)) != MOE_OK) {
        TAP_DIAG("engine: %s", err);
        return NULL;
    }
    return e;
}


static void
generation_tests(const char *model)
{
    moe_engine_t           *e = make_engine(model);
    const moe_tokenizer_t  *t;
    moe_guide_t            *gp = NULL, *gc = NULL, *gr = NULL, *go = NULL;
    char                    err[256];
    gen_t                   r;
    int                     k, ok;
    static const char      *choice = "[\"red\",\"green\",\"blue\"]";
    static const char      *re = "[a-z]{3,6} [0-9]{2}";

    TAP_OK(e != NULL, "%s: engine starts", model);
    if (e == NULL) {
        return;
    }
    t = moe_engine_tokenizer(e);
    moe_guide_compile(t, MOE_GUIDED_JSON, schema_person,
                      strlen(schema_person), &gp, err, sizeof(err));
    moe_guide_compile(t, MOE_GUIDED_CHOICE, choice, strlen(choice), &gc,
                      err, sizeof(err));
    moe_guide_compile(t, MOE_GUIDED_REGEX, re, strlen(re), &gr, err,
                      sizeof(err));
    moe_guide_compile(t, MOE_GUIDED_JSON_OBJECT, "", 0, &go, err,
                      sizeof(err));
    TAP_OK(gp && gc && gr && go, "%s: guides compile", model);
    if (!(gp && gc && gr && go)) {
        goto out;
    }
    for (k = 0; k < 4; k++) {
        float temp = k == 0 ? 0.0f : 1.0f;

        ok = generate(e, 100 + (uint64_t) k, gp, temp, (uint64_t) k, 400,
                      &r) == 0;
        TAP_OK(ok && r.finish == MOE_FINISH_STOP && valid_person(r.text)
               && accepts(t, MOE_GUIDED_JSON, schema_person, r.text) == 1,
               "%s: %s json_schema: finishes with a valid document "
               "(%d tokens): %s", model, k ? "sampled" : "greedy",
               r.n_tokens, r.text);
        ok = generate(e, 200 + (uint64_t) k, gc, temp, (uint64_t) k, 20,
                      &r) == 0;
        TAP_OK(ok && r.finish == MOE_FINISH_STOP
               && (!strcmp(r.text, "red") || !strcmp(r.text, "green")
                   || !strcmp(r.text, "blue")),
               "%s: %s choice gives one of the choices: '%s'", model,
               k ? "sampled" : "greedy", r.text);
        ok = generate(e, 300 + (uint64_t) k, gr, temp, (uint64_t) k, 20,
                      &r) == 0;
        TAP_OK(ok && r.finish == MOE_FINISH_STOP
               && accepts(t, MOE_GUIDED_REGEX, re, r.text) == 1,
               "%s: %s regex output matches: '%s'", model,
               k ? "sampled" : "greedy", r.text);
        ok = generate(e, 400 + (uint64_t) k, go, temp, (uint64_t) k, 64,
                      &r) == 0;
        /* a length cut leaves a prefix: it must still be a viable one */
        TAP_OK(ok && !r.error && r.text[0] == '{'
               && (r.finish != MOE_FINISH_STOP
                   || accepts(t, MOE_GUIDED_JSON_OBJECT, "", r.text) == 1),
               "%s: %s json_object output is an object (or its prefix at "
               "the length limit): %s", model, k ? "sampled" : "greedy",
               r.text);
    }
out:
    moe_guide_release(gp);
    moe_guide_release(gc);
    moe_guide_release(gr);
    moe_guide_release(go);
    moe_engine_destroy(e);
}


int
main(void)
{
    moe_tokenizer_t *t = NULL, *tk = NULL;
    char             path[1200], err[256];
    int32_t          eos_tiny[1], eos_kjv[1];

    if (getenv("MOE_SRCDIR")) {
        snprintf(srcdir, sizeof(srcdir), "%s", getenv("MOE_SRCDIR"));
    }
    snprintf(path, sizeof(path), "%s/models/localmoe-tiny/tokenizer.json",
             srcdir);
    if (moe_tokenizer_load(path, &t, err, sizeof(err)) != MOE_OK) {
        TAP_PLAN(1);
        TAP_OK(0, "tokenizer %s: %s", path, err);
        return 1;
    }
    snprintf(path, sizeof(path), "%s/models/localmoe-kjv/tokenizer.json",
             srcdir);
    if (moe_tokenizer_load(path, &tk, err, sizeof(err)) != MOE_OK) {
        TAP_PLAN(1);
        TAP_OK(0, "tokenizer %s: %s", path, err);
        return 1;
    }

    /* JSON Schema */
    check_cases(t, MOE_GUIDED_JSON, "schema", schema_person, person_cases);
    check_cases(t, MOE_GUIDED_JSON, "open object",
                "{\"properties\":{\"id\":{\"type\":\"integer\"}},"
                "\"required\":[\"id\"]}", open_cases);
    check_cases(t, MOE_GUIDED_JSON, "type arrays",
                "{\"type\":\"array\",\"items\":{\"type\":[\"integer\","
                "\"string\",\"null\",\"boolean\",\"number\"]}}", types_cases);
    check_cases(t, MOE_GUIDED_JSON_OBJECT, "json_object", NULL, obj_cases);
    check_cases(t, MOE_GUIDED_JSON, "recursive $ref",
                "{\"$ref\":\"#/$defs/node\",\"$defs\":{\"node\":{"
                "\"type\":\"object\",\"properties\":{\"v\":{\"type\":"
                "\"integer\"},\"next\":{\"anyOf\":[{\"$ref\":"
                "\"#/$defs/node\"},{\"type\":\"null\"}]}},\"required\":"
                "[\"v\",\"next\"],\"additionalProperties\":false}}}",
                recursive_cases);
    check_cases(t, MOE_GUIDED_JSON, "formats",
                "{\"type\":\"array\",\"items\":{\"anyOf\":["
                "{\"type\":\"string\",\"format\":\"date-time\"},"
                "{\"type\":\"string\",\"format\":\"uuid\"},"
                "{\"type\":\"string\",\"format\":\"email\"},"
                "{\"type\":\"string\",\"format\":\"ipv4\"}]},"
                "\"minItems\":4,\"maxItems\":4}", formats_cases);
    /* formats' order does not matter above: each item may be any of them,
     * so only wholly malformed items are rejected */

    /* regex, GBNF, choice */
    check_cases(t, MOE_GUIDED_REGEX, "regex", "^[a-z]{2,3}[-_ ]\\d{1,4}$",
                regex_cases);
    check_cases(t, MOE_GUIDED_REGEX, "regex2",
                "(cat|dogs?)|\\(x\\)|\xc3\xa9t\xc3\xa9|a.b", regex2_cases);
    check_cases(t, MOE_GUIDED_GRAMMAR, "gbnf", gbnf_arith, gbnf_cases);
    check_cases(t, MOE_GUIDED_GRAMMAR, "gbnf unicode", gbnf_unicode,
                gbnf_u_cases);
    check_cases(t, MOE_GUIDED_CHOICE, "choice",
                "[\"yes\",\"no\",\"maybe \\\"so\\\"\"]", choice_cases);

    /* errors */
    check_error(t, MOE_GUIDED_JSON, "{\"type\":\"string\",\"foo\":1}",
                "unsupported keyword 'foo'");
    check_error(t, MOE_GUIDED_JSON, "{\"type\":\"object\",\"properties\":{"
                "\"a\":{\"not\":{}}}}", "unsupported keyword 'not'");
    check_error(t, MOE_GUIDED_JSON, "{\"type\":", "not valid JSON");
    check_error(t, MOE_GUIDED_JSON, "{\"$ref\":\"#/$defs/x\"}", "not found");
    check_error(t, MOE_GUIDED_JSON, "{\"type\":\"array\",\"minItems\":3,"
                "\"maxItems\":2}", "empty language");
    check_error(t, MOE_GUIDED_JSON, "{\"type\":\"integer\",\"minimum\":5}",
                "minimum");
    check_error(t, MOE_GUIDED_REGEX, "ab(c", "regex: missing ')' at offset 2");
    check_error(t, MOE_GUIDED_REGEX, "a(?=b)", "lookaround");
    check_error(t, MOE_GUIDED_REGEX, "(a)\\1", "backreferences");
    check_error(t, MOE_GUIDED_REGEX, "a{3,1}", "bad {m,n}");
    check_error(t, MOE_GUIDED_GRAMMAR, "root ::= \"a", "unterminated string "
                "literal at offset 9");
    check_error(t, MOE_GUIDED_GRAMMAR, "root ::= foo", "undefined rule 'foo'");
    check_error(t, MOE_GUIDED_GRAMMAR, "start ::= \"a\"", "no 'root' rule");
    check_error(t, MOE_GUIDED_GRAMMAR, "root ::= root \"a\" | \"b\"",
                "left recursion");
    check_error(t, MOE_GUIDED_GRAMMAR, "root ::= a\na ::= \"x\" a",
                "empty");
    check_error(t, MOE_GUIDED_GRAMMAR, "root ::= [a-z]{1,5000}",
                "repetition bound");
    {
        static char big[8192];
        int         k;

        strcpy(big, "root ::=");
        for (k = 0; k < 401; k++) {
            strcat(big, " [a-z]{1000}");
        }
        check_error(t, MOE_GUIDED_GRAMMAR, big, "too large");
    }
    /* a class of surrogates only has no UTF-8 character: it used to
     * become an empty rule, matching "ab" here */
    check_error(t, MOE_GUIDED_GRAMMAR,
                "root ::= \"a\" [\\uD800-\\uDFFF] \"b\"",
                "matches no character");
    check_error(t, MOE_GUIDED_REGEX, "a[\\uD800-\\uDFFF]b",
                "matches no character");
    check_error(t, MOE_GUIDED_CHOICE, "[]", "non-empty JSON array");
    check_error(t, MOE_GUIDED_CHOICE, "[\"a\",1]", "entry 1");

    /* nullable repetitions nested in each other reach the same stack
     * along exponentially many paths: the matcher expands each stack
     * once (the start state used to fail as if out of memory), and one
     * whose expansion is still over the limits is refused by name */
    check_cases(t, MOE_GUIDED_REGEX, "nested optional repeats",
                "((a?){0,20}){0,20}", nested_opt_cases);
    check_cases(t, MOE_GUIDED_REGEX, "nested nullable repeats",
                "((a|b?){0,30}c?){0,30}", nested_null_cases);
    check_error(t, MOE_GUIDED_REGEX, "((a?){0,200}){0,200}",
                "too complex to match");
    /* one whose masks cost millions of stack expansions (0.4 s each on
     * the kjv vocabulary, 3 s on Llama-3's, every step on the engine
     * thread) is refused by its first mask, made at compile time */
    check_error(tk, MOE_GUIDED_REGEX, "(.?.?.?.?.?.?.?.?.?.?){0,100}",
                "too complex to match");

    /* a JSON Schema or choice list nested a million deep (a 2 MB
     * guided_json string) is refused before yajl builds a tree it would
     * free recursively (a stack overflow) */
    {
        char *deep = nested(1000000);

        check_error(t, MOE_GUIDED_JSON, deep, "nested deeper than 128");
        check_error(t, MOE_GUIDED_CHOICE, deep, "nested deeper than 128");
        free(deep);
    }

    /* GBNF's checks are linear in the grammar: a chain of 19000 rules
     * (each rule found by name, productive only once the next one is:
     * 5.6 s at -O2 with a name scan and one fixpoint pass per rule), and
     * 399 repeats of a nullable rule in one alternative (46 s: the left
     * recursion check scanned back over the nullable prefix from every
     * element; refused as too complex to match) take well under 2 s */
    {
        gbuf_t  src = {0};
        double  secs;
        int     k, rc;

        gb_puts(&src, "root ::= r0\n");
        for (k = 0; k < 18999; k++) {
            gb_printf(&src, "r%d ::= \"x\"{18} r%d\n", k, k + 1);
        }
        gb_puts(&src, "r18999 ::= \"y\"\n");
        rc = src.p ? compile_timed(t, src.p, &secs) : MOE_ENOMEM;
        TAP_OK(rc == MOE_OK && secs < 2.0, "a chain of 19000 GBNF rules "
               "compiles in %.3f s", secs);
        gb_free(&src);
        gb_puts(&src, "root ::=");
        for (k = 0; k < 399; k++) {
            gb_puts(&src, " a{1000}");
        }
        gb_puts(&src, "\na ::= \"x\"?\n");
        rc = src.p ? compile_timed(t, src.p, &secs) : MOE_ENOMEM;
        TAP_OK(rc == MOE_EINVAL && secs < 2.0, "399000 nullable references "
               "in one alternative: refused in %.3f s", secs);
        gb_free(&src);
    }

    /* the limits leave real schemas alone: 10 levels of 40 properties */
    {
        char *schema, *doc;

        wide_deep_schema(10, 40, &schema, &doc);
        TAP_OK(schema && doc
               && accepts(tk, MOE_GUIDED_JSON, schema, doc) == 1,
               "a schema of 10 nested levels of 40 properties compiles and "
               "accepts its document (%zu bytes)", doc ? strlen(doc) : 0);
        free(schema);
        free(doc);
    }

    /* masks = brute force (tiny: EOS 0 stands in; kjv: its own vocab) */
    eos_tiny[0] = moe_tokenizer_token_to_id(t, moe_tokenizer_eos_token(t));
    eos_kjv[0] = moe_tokenizer_token_to_id(tk, moe_tokenizer_eos_token(tk));
    TAP_OK(eos_tiny[0] >= 0 && eos_kjv[0] >= 0
           && moe_tokenizer_is_special(t, eos_tiny[0])
           && moe_tokenizer_is_special(tk, eos_kjv[0]),
           "the tokenizers' EOS tokens are special (%d, %d)", eos_tiny[0],
           eos_kjv[0]);
    TAP_OK(mask_matches_brute(t, MOE_GUIDED_JSON, schema_person,
                              "{\"name\": \"Al\", \"age\": 30, \"tags\": "
                              "[\"a\"], \"pet\": {\"kind\": \"cat\"}}",
                              eos_tiny, 1),
           "tiny vocab: json schema masks equal brute force at every byte");
    TAP_OK(mask_matches_brute(tk, MOE_GUIDED_JSON_OBJECT, "",
                              "{\"a b\": [1, -2.5, true, null, \"x\\n\"]}",
                              eos_kjv, 1),
           "kjv vocab: json_object masks equal brute force at every byte");
    TAP_OK(mask_matches_brute(tk, MOE_GUIDED_REGEX, "(the|and) [a-z]+ \\d+",
                              "the lord 12", eos_kjv, 1),
           "kjv vocab: regex masks equal brute force at every byte");
    TAP_OK(mask_matches_brute(tk, MOE_GUIDED_CHOICE,
                              "[\"In the beginning\",\"And God said\"]",
                              "And God said", eos_kjv, 1),
           "kjv vocab: choice masks equal brute force at every byte");
    TAP_OK(mask_matches_brute(tk, MOE_GUIDED_GRAMMAR, gbnf_arith,
                              "(12+3)*4.5", eos_kjv, 1),
           "kjv vocab: gbnf masks equal brute force at every byte");

    /* more states than the mask cache holds (256): it starts over and
     * the masks stay those of a fresh guide's (cache empty) */
    {
        const char         *re = "[ab]{0,400}c";
        moe_guide_t        *ga = NULL, *gb = NULL;
        moe_guided_state_t *sa, *sb;
        int                 nv = moe_tokenizer_vocab_size(t), pos, same = 1;
        size_t              nw = (size_t) (nv + 31) / 32;
        uint32_t           *wa = calloc(nw, 4), *wb = calloc(nw, 4);

        moe_guide_compile(t, MOE_GUIDED_REGEX, re, strlen(re), &ga, err,
                          sizeof(err));
        sa = moe_guided_state_create(ga, eos_tiny, 1);
        for (pos = 0; pos < 400 && same; pos++) {
            moe_guided_mask(sa, wa, nw);
            moe_guide_compile(t, MOE_GUIDED_REGEX, re, strlen(re), &gb, err,
                              sizeof(err));
            sb = moe_guided_state_create(gb, eos_tiny, 1);
            moe_guided_feed(sb, "abababababababababababababababababababab"
                            "abababababababababababababababababababab"
                            "abababababababababababababababababababab"
                            "abababababababababababababababababababab"
                            "abababababababababababababababababababab"
                            "abababababababababababababababababababab"
                            "abababababababababababababababababababab"
                            "abababababababababababababababababababab"
                            "abababababababababababababababababababab"
                            "abababababababababababababababababababab",
                            (size_t) pos);
            moe_guided_mask(sb, wb, nw);
            same = memcmp(wa, wb, nw * 4) == 0;
            moe_guided_state_free(sb);
            moe_guide_release(gb);
            moe_guided_feed(sa, pos % 2 ? "b" : "a", 1);
        }
        TAP_OK(same && pos == 400, "400 states through one guide (its mask "
               "cache starts over at 256): masks equal a fresh guide's at "
               "every step (stopped at %d)", pos);
        moe_guided_state_free(sa);
        moe_guide_release(ga);
        free(wa);
        free(wb);
    }

    /* a complete language: only EOS */
    {
        moe_guide_t        *g = NULL;
        moe_guided_state_t *st;
        int                 nv = moe_tokenizer_vocab_size(tk);
        size_t              nw = (size_t) (nv + 31) / 32;
        uint32_t           *w = calloc(nw, sizeof(uint32_t));
        int                 n, id, cnt = 0;

        moe_guide_compile(tk, MOE_GUIDED_CHOICE, "[\"In\"]", 6, &g, err,
                          sizeof(err));
        st = moe_guided_state_create(g, eos_kjv, 1);
        moe_guided_feed(st, "In", 2);
        n = moe_guided_mask(st, w, nw);
        for (id = 0; id < nv; id++) {
            cnt += (w[id >> 5] >> (id & 31)) & 1;
        }
        TAP_OK(n == 1 && cnt == 1
               && (w[eos_kjv[0] >> 5] >> (eos_kjv[0] & 31) & 1),
               "complete and nothing can follow: only EOS is allowed");
        TAP_OK(moe_guided_advance(st, 5) == MOE_EINVAL
               && moe_guided_advance(st, eos_kjv[0]) == MOE_OK,
               "advance: another token is rejected, EOS is taken");
        moe_guided_state_free(st);
        moe_guide_release(g);
        free(w);
    }

    generation_tests("localmoe-tiny");
    generation_tests("localmoe-kjv");

    moe_tokenizer_free(t);
    moe_tokenizer_free(tk);
    printf("1..%d\n", tap_n);
    return TAP_DONE();
}
