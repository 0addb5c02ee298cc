/*
 * Checks tool calling in the engine (engine/text/toolcall.c, chat.c):
 *   * the output parsers (hermes <tool_call>, mistral [TOOL_CALLS],
 *     llama3_json with and without <|python_tag|>, the "required" array and
 *     a named function's arguments) on complete output, on the same output
 *     pushed in pieces of every size (the pieces reassemble to the same
 *     content and calls, and no piece of a call leaks out as content),
 *     several calls, malformed JSON given back as content, text that only
 *     looks like a marker, call ids, call JSON nested too deep to parse
 *     safely given back as content, long waits (a body that never ends)
 *     in time linear in the output;
 *   * the parser picked from a model family (real templates, architectures)
 *     and by name;
 *   * moe_chat_render_json(): tools and structured messages (tool_calls
 *     with object arguments, role "tool" with tool_call_id) through small
 *     Hermes-, Mistral- and Llama-3.1-shaped templates (t/data/chat/tools),
 *     hand-verified byte for byte, tools undefined -> none when absent, and
 *     the real Qwen3 and Llama-3.1 templates with tools.
 */

#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "moe.h"
#include "tap.h"

#define DATA  "t/data/chat/"


static char *
slurp(const char *path)
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
    return b;
}


/* what a parser made of some output */
typedef struct {
    char   content[4096];
    int    n_calls;
    char   names[8][64];
    char   args[8][512];      /* reassembled from ARGUMENTS events */
    char   ids[8][32];
    int    bad;               /* an event out of order */
    int    leaked;            /* content event with a marker char in it */
} result_t;


static void
take(moe_toolparse_t *p, result_t *r, const char *leak)
{
    moe_toolev_t  ev;

    while (moe_toolparse_next(p, &ev)) {
        switch (ev.type) {
        case MOE_TOOLEV_CONTENT:
            strncat(r->content, ev.text, ev.len);
            if (leak && memchr(ev.text, leak[0], ev.len)) {
                r->leaked = 1;
            }
            break;
        case MOE_TOOLEV_CALL:
            if (ev.index != r->n_calls || ev.len != 0 || r->n_calls >= 8) {
                r->bad = 1;
                break;
            }
            snprintf(r->names[ev.index], 64, "%s", ev.name);
            snprintf(r->ids[ev.index], 32, "%s", ev.id);
            r->n_calls++;
            break;
        case MOE_TOOLEV_ARGUMENTS:
            if (ev.index != r->n_calls - 1) {
                r->bad = 1;
                break;
            }
            strncat(r->args[ev.index], ev.text, ev.len);
            break;
        default:
            r->bad = 1;
        }
    }
}


/* parses `out` pushed in pieces of `step` bytes (0: all at once) */
static int
run(moe_tool_format_t fmt, const char *name, const char *out, size_t step,
    result_t *r, const char *leak)
{
    size_t            i, n, len = strlen(out);
    moe_toolparse_t  *p;
    int               k;

    memset(r, 0, sizeof(*r));
    p = moe_toolparse_create(fmt, name, 42);
    if (p == NULL) {
        return -1;
    }

    for (i = 0; i < len; i += n) {
        n = step ? step : len;
        if (n > len - i) {
            n = len - i;
        }
        if (moe_toolparse_push(p, out + i, n) != MOE_OK) {
            moe_toolparse_free(p);
            return -1;
        }
        take(p, r, leak);
    }

    if (moe_toolparse_finish(p) != MOE_OK) {
        moe_toolparse_free(p);
        return -1;
    }
    take(p, r, NULL);

    /* the whole calls agree with the streamed ones */
    if (moe_toolparse_n_calls(p) != r->n_calls) {
        r->bad = 1;
    }
    for (k = 0; k < r->n_calls; k++) {
        const char  *id, *nm, *a;
        size_t       al;

        if (moe_toolparse_call(p, k, &id, &nm, &a, &al) != MOE_OK
            || strcmp(id, r->ids[k]) || strcmp(nm, r->names[k])
            || strlen(a) != al || strcmp(a, r->args[k]))
        {
            r->bad = 1;
        }
    }

    moe_toolparse_free(p);
    return 0;
}


/* one output, all piece sizes: same result each time */
static void
check(const char *what, moe_tool_format_t fmt, const char *name,
    const char *out, const char *content, int n_calls, const char *const *names,
    const char *const *args, const char *leak)
{
    size_t    step, len = strlen(out);
    int       k, ok, all_ok = 1, first_bad = -1;
    result_t  r;

    for (step = 0; step <= len; step++) {
        ok = run(fmt, name, out, step, &r, step ? leak : NULL) == 0
             && !r.bad && !r.leaked
             && strcmp(r.content, content) == 0 && r.n_calls == n_calls;
        for (k = 0; ok && k < n_calls; k++) {
            ok = strcmp(r.names[k], names[k]) == 0
                 && strcmp(r.args[k], args[k]) == 0;
        }
        if (!ok && all_ok) {
            all_ok = 0;
            first_bad = (int) step;
            printf("# %s, pieces of %zu: content \"%s\" calls %d bad %d "
                   "leaked %d", what, step, r.content, r.n_calls, r.bad,
                   r.leaked);
            for (k = 0; k < r.n_calls; k++) {
                printf(" [%s %s]", r.names[k], r.args[k]);
            }
            printf("\n");
        }
    }

    TAP_OK(all_ok, "%s: content and calls, whole and in pieces of 1..%zu "
           "bytes (first bad: %d)", what, len, first_bad);
}


static void
test_parsers(void)
{
    const char  *n1[] = { "get_weather" };
    const char  *a1[] = { "{\"city\":\"Paris\",\"days\":[1,2.5]}" };
    const char  *n2[] = { "f", "g" };
    const char  *a2[] = { "{\"s\":\"}]</tool_call>\\\"\"}", "{}" };
    result_t     r;

    check("hermes: content then a call", MOE_TOOL_HERMES, NULL,
          "Let me check. <tool_call>\n{\"name\": \"get_weather\", "
          "\"arguments\": {\"city\": \"Paris\", \"days\": [1, 2.5]}}\n"
          "</tool_call>",
          "Let me check. ", 1, n1, a1, "<");

    check("hermes: two calls, markers inside strings", MOE_TOOL_HERMES, NULL,
          "<tool_call>{\"name\":\"f\",\"arguments\":{\"s\":\"}]</tool_call>"
          "\\\"\"}}</tool_call>\n<tool_call>\n{\"name\":\"g\",\"arguments\":"
          "{}}\n</tool_call>",
          "", 2, n2, a2, NULL);

    check("hermes: malformed JSON is content", MOE_TOOL_HERMES, NULL,
          "A <tool_call>{\"name\": \"f\", \"arguments\": {oops}</tool_call> B",
          "A <tool_call>{\"name\": \"f\", \"arguments\": {oops}</tool_call> B",
          0, NULL, NULL, NULL);

    check("hermes: no name is content", MOE_TOOL_HERMES, NULL,
          "<tool_call>{\"arguments\": {}}</tool_call>",
          "<tool_call>{\"arguments\": {}}</tool_call>", 0, NULL, NULL, NULL);

    check("hermes: unterminated call whose JSON parses", MOE_TOOL_HERMES,
          NULL,
          "<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": "
          "\"Paris\", \"days\": [1, 2.5]}}",
          "", 1, n1, a1, NULL);

    check("hermes: text that looks like a marker", MOE_TOOL_HERMES, NULL,
          "a <b> <tool_cal <tool", "a <b> <tool_cal <tool", 0, NULL, NULL,
          NULL);

    check("hermes: unterminated broken call is content", MOE_TOOL_HERMES,
          NULL, "x<tool_call>{\"name\": \"f\", \"argu",
          "x<tool_call>{\"name\": \"f\", \"argu", 0, NULL, NULL, NULL);

    check("mistral: [TOOL_CALLS] array of two", MOE_TOOL_MISTRAL, NULL,
          "[TOOL_CALLS] [{\"name\": \"f\", \"arguments\": {\"s\": "
          "\"}]</tool_call>\\\"\"}}, {\"name\": \"g\", \"arguments\": {}}]",
          "", 2, n2, a2, "[");

    check("mistral: a single object", MOE_TOOL_MISTRAL, NULL,
          "[TOOL_CALLS]{\"name\": \"get_weather\", \"arguments\": {\"city\": "
          "\"Paris\", \"days\": [1, 2.5]}}",
          "", 1, n1, a1, NULL);

    check("mistral (v11): [TOOL_CALLS]name[ARGS]{...} twice",
          MOE_TOOL_MISTRAL, NULL,
          "[TOOL_CALLS]f[ARGS]{\"s\": \"}]</tool_call>\\\"\"}"
          "[TOOL_CALLS]g[ARGS]{}",
          "", 2, n2, a2, "[");

    check("mistral (v11): no [ARGS] is content", MOE_TOOL_MISTRAL, NULL,
          "[TOOL_CALLS]f oops", "[TOOL_CALLS]f oops", 0, NULL, NULL, NULL);

    check("mistral: plain text with brackets", MOE_TOOL_MISTRAL, NULL,
          "[1, 2] and [TOOL", "[1, 2] and [TOOL", 0, NULL, NULL, NULL);

    check("mistral: broken array is content", MOE_TOOL_MISTRAL, NULL,
          "[TOOL_CALLS][{\"name\": 5}]", "[TOOL_CALLS][{\"name\": 5}]", 0,
          NULL, NULL, NULL);

    check("llama3_json: the whole output is a call", MOE_TOOL_LLAMA3_JSON,
          NULL,
          "  {\"name\": \"get_weather\", \"parameters\": {\"city\": \"Paris\","
          " \"days\": [1, 2.5]}}",
          "", 1, n1, a1, "{");

    check("llama3_json: <|python_tag|> and two calls with ';'",
          MOE_TOOL_LLAMA3_JSON, NULL,
          "<|python_tag|>{\"name\": \"f\", \"parameters\": {\"s\": "
          "\"}]</tool_call>\\\"\"}}; {\"name\": \"g\", \"arguments\": {}}",
          "", 2, n2, a2, "<");

    check("llama3_json: a JSON object after text is content",
          MOE_TOOL_LLAMA3_JSON, NULL,
          "Here: {\"name\": \"f\", \"parameters\": {}}",
          "Here: {\"name\": \"f\", \"parameters\": {}}", 0, NULL, NULL, NULL);

    {
        const char  *nf[] = { "f" };
        const char  *af[] = { "{}" };

        /* text after the marker that is not JSON gives back the marker
         * alone: a later call is still found, however the output is cut
         * in pieces (the text that had arrived when the body failed went
         * back whole: in one piece the call was content, in small ones a
         * call) */
        check("llama3_json: <|python_tag|> then text, then a call",
              MOE_TOOL_LLAMA3_JSON, NULL,
              "<|python_tag|>no json <|python_tag|>{\"name\": \"f\", "
              "\"parameters\": {}}",
              "<|python_tag|>no json ", 1, nf, af, NULL);
        check("mistral: name[ARGS] then text, then a call",
              MOE_TOOL_MISTRAL, NULL,
              "[TOOL_CALLS]f[ARGS]no json [TOOL_CALLS]f[ARGS]{}",
              "[TOOL_CALLS]f[ARGS]no json ", 1, nf, af, NULL);
    }

    check("llama3_json: a JSON object that is no call is content",
          MOE_TOOL_LLAMA3_JSON, NULL, "{\"answer\": 42}", "{\"answer\": 42}",
          0, NULL, NULL, NULL);

    check("required: the guided array", MOE_TOOL_REQUIRED, NULL,
          "[{\"name\": \"f\", \"parameters\": {\"s\": \"}]</tool_call>\\\"\"}},"
          " {\"name\": \"g\", \"parameters\": {}}]",
          "", 2, n2, a2, "[");

    check("required: cut short is content", MOE_TOOL_REQUIRED, NULL,
          "[{\"name\": \"f\", \"param", "[{\"name\": \"f\", \"param", 0, NULL,
          NULL, NULL);

    {
        const char  *nn[] = { "get_weather" };
        const char  *na[] = { "{\"city\": \"Paris\"}" };

        check("named: every byte is the arguments, as written",
              MOE_TOOL_NAMED, "get_weather", "{\"city\": \"Paris\"}", "", 1,
              nn, na, "{");
    }

    /* ids */
    run(MOE_TOOL_HERMES, NULL,
        "<tool_call>{\"name\":\"f\",\"arguments\":{}}</tool_call>"
        "<tool_call>{\"name\":\"g\",\"arguments\":{}}</tool_call>", 0, &r,
        NULL);
    TAP_OK(r.n_calls == 2 && strncmp(r.ids[0], "call_", 5) == 0
           && strlen(r.ids[0]) == 29 && strcmp(r.ids[0], r.ids[1]) != 0,
           "ids are \"call_\" + 24 random characters, distinct (%s %s)",
           r.ids[0], r.ids[1]);

    run(MOE_TOOL_MISTRAL, NULL,
        "[TOOL_CALLS][{\"name\":\"f\",\"arguments\":{}}]", 0, &r, NULL);
    TAP_OK(r.n_calls == 1 && strlen(r.ids[0]) == 9,
           "mistral ids are 9 characters, as its templates check (%s)",
           r.ids[0]);

    /* arguments given as a string stay that string */
    run(MOE_TOOL_HERMES, NULL,
        "<tool_call>{\"name\":\"f\",\"arguments\":\"{\\\"a\\\": 1}\"}"
        "</tool_call>", 0, &r, NULL);
    TAP_OK(r.n_calls == 1 && strcmp(r.args[0], "{\"a\": 1}") == 0,
           "arguments written as a JSON string are taken as they are (%s)",
           r.args[0]);

    run(MOE_TOOL_NONE, NULL, "<tool_call>{\"name\":\"f\"}</tool_call>", 1,
        &r, NULL);
    TAP_OK(r.n_calls == 0
           && strcmp(r.content, "<tool_call>{\"name\":\"f\"}</tool_call>")
              == 0,
           "format none: all output is content");

    /* an empty output (EOS at once): finish with nothing pushed (no
     * buffer yet: UBSan saw memmove's pointer arithmetic on NULL) */
    {
        moe_tool_format_t  f;
        int                ok = 1;

        for (f = MOE_TOOL_NONE; f <= MOE_TOOL_NAMED; f++) {
            moe_toolparse_t *p = moe_toolparse_create(f, "f", 1);
            moe_toolev_t     ev;

            ok = ok && p != NULL && moe_toolparse_finish(p) == MOE_OK
                 && moe_toolparse_n_calls(p) == (f == MOE_TOOL_NAMED);
            while (p != NULL && moe_toolparse_next(p, &ev)) {
                ok = ok && ev.type == MOE_TOOLEV_CALL;
            }
            moe_toolparse_free(p);
        }
        TAP_OK(ok, "empty output, every format: finish gives no content "
               "and no call (named: its one call)");
    }

    TAP_OK(moe_toolparse_create(MOE_TOOL_NAMED, NULL, 1) == NULL
           && moe_toolparse_create((moe_tool_format_t) 9, NULL, 1) == NULL,
           "a named parser without a name, or an unknown format: NULL");
}


/*
 * Output whose call JSON nests `depth` arrays deep in its arguments,
 * pushed whole: the number of calls, and 1 in *all_content when every
 * byte came back as content.
 */
static int
deep_call(size_t depth, int *all_content)
{
    static const char  head[] = "<tool_call>{\"name\":\"f\",\"arguments\":"
                                "{\"a\":";
    static const char  tail[] = "}}</tool_call>";
    moe_toolparse_t   *p;
    moe_toolev_t       ev;
    size_t             len, got = 0;
    char              *out;
    int                calls = 0;

    len = sizeof(head) - 1 + 2 * depth + sizeof(tail) - 1;
    out = malloc(len);
    p = moe_toolparse_create(MOE_TOOL_HERMES, NULL, 7);
    if (out == NULL || p == NULL) {
        free(out);
        moe_toolparse_free(p);
        return -1;
    }
    memcpy(out, head, sizeof(head) - 1);
    memset(out + sizeof(head) - 1, '[', depth);
    memset(out + sizeof(head) - 1 + depth, ']', depth);
    memcpy(out + len - (sizeof(tail) - 1), tail, sizeof(tail) - 1);
    if (moe_toolparse_push(p, out, len) == MOE_OK) {
        while (moe_toolparse_next(p, &ev)) {
            calls += ev.type == MOE_TOOLEV_CALL;
            got += ev.type == MOE_TOOLEV_CONTENT ? ev.len : 0;
        }
    }
    if (moe_toolparse_finish(p) == MOE_OK) {
        while (moe_toolparse_next(p, &ev)) {
            calls += ev.type == MOE_TOOLEV_CALL;
            got += ev.type == MOE_TOOLEV_CONTENT ? ev.len : 0;
        }
    }
    *all_content = got == len;
    moe_toolparse_free(p);
    free(out);
    return calls;
}


/*
 * Call JSON nested deeper than yajl can write back (128) or than the
 * stack can free recursively (a million arrays: the model emits "[[[["
 * until max_tokens): not a call, given back as content, no crash; one
 * nested 100 deep is still a call.
 */
static void
test_deep(void)
{
    int  calls, content;

    calls = deep_call(100, &content);
    TAP_OK(calls == 1, "a call whose arguments nest 100 arrays deep is a "
           "call (%d)", calls);
    calls = deep_call(200, &content);
    TAP_OK(calls == 0 && content, "arguments nested 200 deep (past "
           "yajl_gen's 128): given back as content, not a call with "
           "truncated arguments (%d calls)", calls);
    calls = deep_call(1000000, &content);
    TAP_OK(calls == 0 && content, "arguments nested a million deep: "
           "given back as content, no stack overflow (%d calls)", calls);
}


/*
 * A long output that keeps a parser waiting (a call body that never
 * ends, only blanks before a possible llama3 call, a JSON body that is no
 * call while the closing tag is awaited), pushed in 100000
 * pieces of 4 bytes as a model streams it: each push examines only the
 * new text (every push used to rescan the whole body: 1.5 s of the nginx
 * worker's event loop for 32000 pieces, quadratic), and at the end every
 * byte is content.
 */
static void
test_long(void)
{
    static char        big[64 + 4 * 10000];
    static const struct {
        moe_tool_format_t  fmt;
        const char        *head, *piece, *what;
    } c[] = {
        { MOE_TOOL_HERMES, "<tool_call>{\"name\":\"f\",\"arguments\":\"",
          "abcd", "hermes, a string that never ends" },
        { MOE_TOOL_HERMES, "<tool_call>", "abcd",
          "hermes, a body that is not JSON, no closing tag" },
        { MOE_TOOL_MISTRAL, "[TOOL_CALLS][", "{\"a\"",
          "mistral, an array that never closes" },
        { MOE_TOOL_MISTRAL, "[TOOL_CALLS]f[ARGS]{\"a\":\"", "abcd",
          "mistral name[ARGS], arguments that never end" },
        { MOE_TOOL_LLAMA3_JSON, "{\"name\":\"f\",\"parameters\":{\"a\":\"",
          "abcd", "llama3_json, a call that never ends" },
        { MOE_TOOL_LLAMA3_JSON, "", "  \n ", "llama3_json, only blanks" },
        { MOE_TOOL_HERMES, big, "abcd", "hermes, 40 KB of JSON that is no "
          "call, then no closing tag (it was parsed again at every push)" },
    };
    moe_toolparse_t  *p;
    moe_toolev_t      ev;
    struct timespec   t0, t1;
    size_t            k, i, got, len;
    double            secs;
    int               ok;

    len = (size_t) sprintf(big, "<tool_call>{\"a\":[1");
    for (k = 1; k < 10000; k++) {
        memcpy(big + len, ",1", 2);
        len += 2;
    }
    memcpy(big + len, "]} ", 4);

    for (k = 0; k < sizeof(c) / sizeof(c[0]); k++) {
        p = moe_toolparse_create(c[k].fmt, NULL, 3);
        len = strlen(c[k].head) + 100000 * strlen(c[k].piece);
        got = 0;
        clock_gettime(CLOCK_MONOTONIC, &t0);
        ok = p != NULL
             && moe_toolparse_push(p, c[k].head, strlen(c[k].head))
                == MOE_OK;
        for (i = 0; ok && i < 100000; i++) {
            ok = moe_toolparse_push(p, c[k].piece, strlen(c[k].piece))
                 == MOE_OK;
            while (moe_toolparse_next(p, &ev)) {
                got += ev.type == MOE_TOOLEV_CONTENT ? ev.len : 0;
            }
        }
        ok = ok && moe_toolparse_finish(p) == MOE_OK;
        while (ok && moe_toolparse_next(p, &ev)) {
            got += ev.type == MOE_TOOLEV_CONTENT ? ev.len : 0;
        }
        clock_gettime(CLOCK_MONOTONIC, &t1);
        secs = (double) (t1.tv_sec - t0.tv_sec)
               + (double) (t1.tv_nsec - t0.tv_nsec) / 1e9;
        TAP_OK(ok && got == len && moe_toolparse_n_calls(p) == 0
               && secs < 2.0, "%s: 100000 pushes in %.3f s, all %zu bytes "
               "content (%zu)", c[k].what, secs, len, got);
        moe_toolparse_free(p);
    }
}


static void
test_detect(void)
{
    char  *q = slurp(DATA "templates/qwen3.jinja");
    char  *l = slurp(DATA "templates/llama-3.1-instruct.jinja");
    char  *m = slurp(DATA "templates/mistral-7b-instruct.jinja");

    TAP_OK(q && moe_tool_format_detect(NULL, q) == MOE_TOOL_HERMES,
           "qwen3's template -> hermes");
    TAP_OK(l && moe_tool_format_detect("LlamaForCausalLM", l)
                == MOE_TOOL_LLAMA3_JSON,
           "llama-3.1's template -> llama3_json");
    TAP_OK(m && moe_tool_format_detect("MixtralForCausalLM", m)
                == MOE_TOOL_MISTRAL,
           "mixtral without tool markers -> mistral by architecture");
    TAP_OK(moe_tool_format_detect("Qwen2MoeForCausalLM", NULL)
           == MOE_TOOL_HERMES
           && moe_tool_format_detect("GPT2LMHeadModel", "{{ x }}")
              == MOE_TOOL_HERMES,
           "qwen and unknown families -> hermes");
    TAP_OK(moe_tool_format_from_name("hermes") == MOE_TOOL_HERMES
           && moe_tool_format_from_name("mistral") == MOE_TOOL_MISTRAL
           && moe_tool_format_from_name("llama3_json") == MOE_TOOL_LLAMA3_JSON
           && moe_tool_format_from_name("none") == MOE_TOOL_NONE
           && moe_tool_format_from_name("pythonic") == -1
           && strcmp(moe_tool_format_name(MOE_TOOL_MISTRAL), "mistral") == 0,
           "names <-> formats (vLLM's tool_call_parser names)");

    free(q);
    free(l);
    free(m);
}


static const char  tools_json[] =
    "[{\"type\":\"function\",\"function\":{\"name\":\"get_weather\","
    "\"description\":\"Weather\",\"parameters\":{\"type\":\"object\","
    "\"properties\":{\"city\":{\"type\":\"string\"}},"
    "\"required\":[\"city\"]}}}]";

/* as the module sends them: content null -> "" (vLLM does the same) */
static const char  msgs_json[] =
    "[{\"role\":\"user\",\"content\":\"Weather in Paris?\"},"
    "{\"role\":\"assistant\",\"content\":\"\",\"tool_calls\":[{\"id\":"
    "\"abcdefghi\",\"type\":\"function\",\"function\":{\"name\":"
    "\"get_weather\",\"arguments\":{\"city\":\"Paris\"}}}]},"
    "{\"role\":\"tool\",\"tool_call_id\":\"abcdefghi\",\"name\":"
    "\"get_weather\",\"content\":\"22C\"}]";


static void
render(const char *what, const char *file, const char *tools,
    const char *msgs, const char *want)
{
    char    err[256] = "";
    char   *tmpl, *out = NULL;
    size_t  len = 0;
    int     rc;

    tmpl = slurp(file);
    rc = tmpl ? moe_chat_render_json(NULL, tmpl, msgs, tools, 1, &out, &len,
                                     err, sizeof(err))
              : MOE_EIO;

    TAP_OK(rc == MOE_OK && out && strlen(out) == len
           && strcmp(out, want) == 0, "%s (%s)", what, err);
    if (rc == MOE_OK && strcmp(out, want) != 0) {
        printf("# got:\n%s\n# want:\n%s\n", out, want);
    }

    free(out);
    free(tmpl);
}


/* the templates run with trim_blocks and lstrip_blocks, as transformers
 * sets them: the newline after a block tag goes (hence "<tools>{" and
 * "assistant<tool_call>") */

static void
test_render(void)
{
    char    err[256] = "";
    char   *tmpl, *out = NULL;
    size_t  len;
    int     rc;

    render("hermes-shaped: tools, a tool call, a tool result",
           DATA "tools/hermes.jinja", tools_json, msgs_json,
           "<|im_start|>system\n# Tools\n<tools>"
           "{\"type\": \"function\", \"function\": {\"name\": \"get_weather\", "
           "\"description\": \"Weather\", \"parameters\": {\"type\": "
           "\"object\", \"properties\": {\"city\": {\"type\": \"string\"}}, "
           "\"required\": [\"city\"]}}}</tools>\n"
           "Call a function as <tool_call>{\"name\": ..., \"arguments\": ..."
           "}</tool_call><|im_end|>\n"
           "<|im_start|>user\nWeather in Paris?<|im_end|>\n"
           "<|im_start|>assistant<tool_call>\n{\"name\": \"get_weather\", "
           "\"arguments\": {\"city\": \"Paris\"}}\n</tool_call><|im_end|>\n"
           "<|im_start|>user\n<tool_response>\n22C\n</tool_response>"
           "<|im_end|>\n<|im_start|>assistant\n");

    render("hermes-shaped: no tools (tools is none)",
           DATA "tools/hermes.jinja", NULL,
           "[{\"role\":\"user\",\"content\":\"hi\"}]",
           "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n");

    render("mistral-shaped: tools before the last user turn, 9-char ids",
           DATA "tools/mistral.jinja", tools_json,
           "[{\"role\":\"user\",\"content\":\"Weather in Paris?\"},"
           "{\"role\":\"assistant\",\"content\":null,\"tool_calls\":[{\"id\":"
           "\"abcdefghi\",\"type\":\"function\",\"function\":{\"name\":"
           "\"get_weather\",\"arguments\":{\"city\":\"Paris\"}}}]},"
           "{\"role\":\"tool\",\"tool_call_id\":\"abcdefghi\",\"content\":"
           "\"22C\"},{\"role\":\"user\",\"content\":\"And Rome?\"}]",
           "[INST]Weather in Paris?[/INST][TOOL_CALLS][{\"name\": "
           "\"get_weather\", \"arguments\": {\"city\": \"Paris\"}, \"id\": "
           "\"abcdefghi\"}]</s>[TOOL_RESULTS]{\"content\": \"22C\", \"call_id\": "
           "\"abcdefghi\"}[/TOOL_RESULTS][AVAILABLE_TOOLS][{\"type\": "
           "\"function\", \"function\": {\"name\": \"get_weather\", "
           "\"description\": \"Weather\", \"parameters\": {\"type\": "
           "\"object\", \"properties\": {\"city\": {\"type\": \"string\"}}, "
           "\"required\": [\"city\"]}}}][/AVAILABLE_TOOLS][INST]And Rome?"
           "[/INST]");

    render("llama-3.1-shaped: ipython environment and tool results",
           DATA "tools/llama31.jinja", tools_json, msgs_json,
           "<|start_header_id|>system<|end_header_id|>\n\n"
           "Environment: ipython\n"
           "Respond with a JSON {\"name\": function name, \"parameters\": "
           "arguments}.{\n    \"type\": \"function\",\n    \"function\": {\n"
           "        \"name\": \"get_weather\",\n"
           "        \"description\": \"Weather\",\n"
           "        \"parameters\": {\n"
           "            \"type\": \"object\",\n"
           "            \"properties\": {\n"
           "                \"city\": {\n"
           "                    \"type\": \"string\"\n"
           "                }\n            },\n"
           "            \"required\": [\n                \"city\"\n"
           "            ]\n        }\n    }\n}<|eot_id|>"
           "<|start_header_id|>user<|end_header_id|>\n\n"
           "Weather in Paris?<|eot_id|>"
           "<|start_header_id|>assistant<|end_header_id|>\n\n"
           "{\"name\": \"get_weather\", \"parameters\": {\"city\": "
           "\"Paris\"}}<|eot_id|>"
           "<|start_header_id|>ipython<|end_header_id|>\n\n22C<|eot_id|>"
           "<|start_header_id|>assistant<|end_header_id|>\n\n");

    /* the real templates with tools: the pieces they must show */
    tmpl = slurp(DATA "templates/qwen3.jinja");
    out = NULL;
    rc = tmpl ? moe_chat_render_json(NULL, tmpl, msgs_json, tools_json, 1,
                                     &out, &len, err, sizeof(err))
              : MOE_EIO;
    TAP_OK(rc == MOE_OK
           && strstr(out, "<tools>\n{\"type\": \"function\"")
           && strstr(out, "<tool_call>\n{\"name\": \"get_weather\", "
                          "\"arguments\": {\"city\": \"Paris\"}}\n"
                          "</tool_call>")
           && strstr(out, "<tool_response>\n22C\n</tool_response>")
           && strstr(out, "<|im_start|>assistant\n") != NULL,
           "qwen3's own template: tools, the call and its response (%s)",
           err);
    if (tap_failed && rc == MOE_OK && out) {
        printf("# qwen3 rendered %zu bytes\n", len);
    }
    free(out);
    free(tmpl);

    tmpl = slurp(DATA "templates/llama-3.1-instruct.jinja");
    out = NULL;
    rc = tmpl ? moe_chat_render_json(NULL, tmpl, msgs_json, tools_json, 1,
                                     &out, &len, err, sizeof(err))
              : MOE_EIO;
    TAP_OK(rc == MOE_OK && strstr(out, "Environment: ipython")
           && strstr(out, "\"name\": \"get_weather\"")
           && strstr(out, "<|start_header_id|>ipython<|end_header_id|>\n\n"
                          "\"22C\"<|eot_id|>"),
           "llama-3.1's own template: tools, ipython turn (%s)", err);
    if (tap_failed && rc == MOE_OK && out) {
        printf("# llama-3.1 rendered %zu bytes\n", len);
    }
    free(out);
    free(tmpl);

    out = NULL;
    rc = moe_chat_render_json(NULL, NULL,
                              "[{\"role\":\"user\",\"content\":\"hi\"}]",
                              NULL, 1, &out, &len, err, sizeof(err));
    TAP_OK(rc == MOE_OK && out
           && strcmp(out, "<|im_start|>user\nhi<|im_end|>\n"
                          "<|im_start|>assistant\n") == 0,
           "no template: ChatML");
    free(out);

    out = NULL;
    rc = moe_chat_render_json(NULL, "{{ messages[0].content }}", "[{]",
                              NULL, 1, &out, &len, err, sizeof(err));
    TAP_OK(rc == MOE_EINVAL && out == NULL && err[0] != '\0',
           "malformed messages JSON: MOE_EINVAL (%s)", err);
}


int
main(void)
{
    test_parsers();
    test_deep();
    test_long();
    test_detect();
    test_render();

    TAP_PLAN(tap_n);

    return tap_failed ? 1 : 0;
}
