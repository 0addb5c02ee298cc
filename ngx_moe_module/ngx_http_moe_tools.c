
/*
 * Copyright (C) LocalMoE contributors
 */


#include <ngx_config.h>
#include <ngx_core.h>
#include <ngx_http.h>

#include "ngx_http_moe_module.h"


/*
 * Tools on the request side: `tools` and `tool_choice` (and the deprecated
 * `functions` and `function_call`, mapped onto them) are checked field by
 * field; the parser of the output is chosen (vllm.tool_call_parser, else
 * from the model's template and architecture); tool_choice "required" and
 * a named function become a JSON Schema for the guided decoder, as vLLM
 * builds them; and a conversation with tools or tool calls is handed to
 * the template as JSON, so it sees `tools` and the messages' structure.
 */


static ngx_int_t ngx_http_moe_tools_list(yajl_val v, ngx_uint_t legacy,
    ngx_http_moe_err_t *err);
static ngx_int_t ngx_http_moe_tools_fn(yajl_val fn, const char *field,
    size_t i, ngx_http_moe_err_t *err);
static ngx_int_t ngx_http_moe_tools_choice(ngx_http_request_t *r,
    yajl_val root, ngx_http_moe_tools_t *tl, ngx_http_moe_err_t *err);
static yajl_val ngx_http_moe_tools_find(ngx_http_moe_tools_t *tl,
    const char *name);
static yajl_val ngx_http_moe_tools_function(ngx_http_moe_tools_t *tl,
    size_t i);
static ngx_int_t ngx_http_moe_tools_schema(ngx_http_request_t *r,
    ngx_http_moe_tools_t *tl);
static void ngx_http_moe_tools_gen_params(yajl_gen g, yajl_val fn);
static void ngx_http_moe_tools_gen_value(yajl_gen g, yajl_val v);
static u_char *ngx_http_moe_tools_gen_done(ngx_http_request_t *r,
    yajl_gen g, size_t *len);
static ngx_int_t ngx_http_moe_tools_message(yajl_gen g, yajl_val m,
    moe_chat_msg_t *msg, size_t i, ngx_http_moe_err_t *err);


/*
 * The request's tools into *tl: NGX_OK, or NGX_DECLINED with a 400 naming
 * the field.  On /v1/completions the fields are refused (chat only).
 */

ngx_int_t
ngx_http_moe_tools_parse(ngx_http_request_t *r, yajl_val root,
    ngx_uint_t chat, ngx_http_moe_tools_t *tl, ngx_http_moe_err_t *err)
{
    yajl_val     tools, functions;
    ngx_uint_t   i;
    const char  *chat_only[] = { "tools", "tool_choice", "functions",
                                 "function_call", "parallel_tool_calls",
                                 NULL };

    ngx_memzero(tl, sizeof(ngx_http_moe_tools_t));

    if (!chat) {
        for (i = 0; chat_only[i]; i++) {
            if (ngx_http_moe_json_get(root, chat_only[i])) {
                return ngx_http_moe_fail(err, NGX_HTTP_BAD_REQUEST,
                                         chat_only[i],
                                         "%s is only supported by "
                                         "/v1/chat/completions",
                                         chat_only[i]);
            }
        }

        return NGX_OK;
    }

    tools = ngx_http_moe_json_get(root, "tools");
    functions = ngx_http_moe_json_get(root, "functions");

    if (tools && functions) {
        return ngx_http_moe_fail(err, NGX_HTTP_BAD_REQUEST, "functions",
                                 "give either tools or the deprecated "
                                 "functions, not both");
    }

    if (tools && ngx_http_moe_tools_list(tools, 0, err) != NGX_OK) {
        return NGX_DECLINED;
    }

    if (functions && ngx_http_moe_tools_list(functions, 1, err) != NGX_OK) {
        return NGX_DECLINED;
    }

    if (tools && tools->u.array.len) {
        tl->tools = tools;

    } else if (functions && functions->u.array.len) {
        tl->tools = functions;
        tl->legacy = 1;
    }

    if (ngx_http_moe_tools_choice(r, root, tl, err) != NGX_OK) {
        return NGX_DECLINED;
    }

    /* parallel_tool_calls: false caps "required" at one call */
    tl->single = YAJL_IS_FALSE(ngx_http_moe_json_get(root,
                                                     "parallel_tool_calls"));

    if (tl->choice == NGX_HTTP_MOE_TOOL_REQUIRED
        || tl->choice == NGX_HTTP_MOE_TOOL_NAMED)
    {
        if (ngx_http_moe_tools_schema(r, tl) != NGX_OK) {
            return ngx_http_moe_fail(err, NGX_HTTP_INTERNAL_SERVER_ERROR,
                                     NULL, "out of memory");
        }
    }

    return NGX_OK;
}


/* tools: [{type: "function", function: {name, ...}}]; functions: [{name}] */

static ngx_int_t
ngx_http_moe_tools_list(yajl_val v, ngx_uint_t legacy,
    ngx_http_moe_err_t *err)
{
    size_t       i;
    yajl_val     t, type, fn;
    const char  *field;

    field = legacy ? "functions" : "tools";

    if (!YAJL_IS_ARRAY(v)) {
        return ngx_http_moe_fail(err, NGX_HTTP_BAD_REQUEST, field,
                                 "%s must be an array of %s", field,
                                 legacy ? "functions" : "tools");
    }

    if (v->u.array.len > 128) {
        return ngx_http_moe_fail(err, NGX_HTTP_BAD_REQUEST, field,
                                 "%s takes at most 128 entries", field);
    }

    for (i = 0; i < v->u.array.len; i++) {
        t = v->u.array.values[i];

        if (!YAJL_IS_OBJECT(t)) {
            return ngx_http_moe_fail(err, NGX_HTTP_BAD_REQUEST, field,
                                     "%s[%uz] must be an object", field, i);
        }

        if (legacy) {
            fn = t;

        } else {
            type = ngx_http_moe_json_get(t, "type");

            if (!YAJL_IS_STRING(type)
                || ngx_strcmp(type->u.string, "function") != 0)
            {
                return ngx_http_moe_fail(err, NGX_HTTP_BAD_REQUEST, field,
                                         "tools[%uz].type must be "
                                         "\"function\"", i);
            }

            fn = ngx_http_moe_json_get(t, "function");

            if (!YAJL_IS_OBJECT(fn)) {
                return ngx_http_moe_fail(err, NGX_HTTP_BAD_REQUEST, field,
                                         "tools[%uz].function must be an "
                                         "object", i);
            }
        }

        if (ngx_http_moe_tools_fn(fn, field, i, err) != NGX_OK) {
            return NGX_DECLINED;
        }
    }

    return NGX_OK;
}


/* a function definition: name (OpenAI's ^[a-zA-Z0-9_-]{1,64}$), ... */

static ngx_int_t
ngx_http_moe_tools_fn(yajl_val fn, const char *field, size_t i,
    ngx_http_moe_err_t *err)
{
    u_char    *p;
    u_char     where[64];
    yajl_val   name, v;

    /* "tools[i].function" or "functions[i]": the messages name it */
    p = (field[0] == 't') ? ngx_snprintf(where, sizeof(where) - 1,
                                         "tools[%uz].function", i)
                          : ngx_snprintf(where, sizeof(where) - 1,
                                         "functions[%uz]", i);
    *p = '\0';

    name = ngx_http_moe_json_get(fn, "name");

    if (!YAJL_IS_STRING(name) || name->u.string[0] == '\0'
        || ngx_strlen(name->u.string) > 64)
    {
        return ngx_http_moe_fail(err, NGX_HTTP_BAD_REQUEST, field,
                                 "%s.name must be a string of 1 to 64 "
                                 "characters", where);
    }

    for (p = (u_char *) name->u.string; *p; p++) {
        if (!((*p >= 'a' && *p <= 'z') || (*p >= 'A' && *p <= 'Z')
              || (*p >= '0' && *p <= '9') || *p == '_' || *p == '-'))
        {
            return ngx_http_moe_fail(err, NGX_HTTP_BAD_REQUEST, field,
                                     "%s.name \"%s\" may hold only a-z, "
                                     "A-Z, 0-9, _ and -", where,
                                     name->u.string);
        }
    }

    v = ngx_http_moe_json_get(fn, "description");

    if (v && !YAJL_IS_STRING(v)) {
        return ngx_http_moe_fail(err, NGX_HTTP_BAD_REQUEST, field,
                                 "%s.description must be a string",
                                 where);
    }

    v = ngx_http_moe_json_get(fn, "parameters");

    if (v && !YAJL_IS_OBJECT(v)) {
        return ngx_http_moe_fail(err, NGX_HTTP_BAD_REQUEST, field,
                                 "%s.parameters must be an object (a JSON "
                                 "Schema)", where);
    }

    v = ngx_http_moe_json_get(fn, "strict");

    if (v && !YAJL_IS_TRUE(v) && !YAJL_IS_FALSE(v)) {
        return ngx_http_moe_fail(err, NGX_HTTP_BAD_REQUEST, field,
                                 "%s.strict must be a boolean", where);
    }

    return NGX_OK;
}


/*
 * tool_choice: "none", "auto", "required" or {type: "function", function:
 * {name}}; function_call: "none", "auto" or {name}.  The default is "auto"
 * with tools, else "none".  "auto" parses the output with the configured
 * parser; it is refused when enable_auto_tool_choice is off (as vLLM).
 */

static ngx_int_t
ngx_http_moe_tools_choice(ngx_http_request_t *r, yajl_val root,
    ngx_http_moe_tools_t *tl, ngx_http_moe_err_t *err)
{
    int                        fmt;
    yajl_val                   c, fn, name, type;
    ngx_uint_t                 legacy;
    const char                *field;
    moe_config_t              *conf;
    ngx_http_moe_ctx_t        *ctx;
    ngx_http_moe_eng_t        *eng;
    ngx_http_moe_main_conf_t  *mcf;

    field = "tool_choice";
    c = ngx_http_moe_json_get(root, field);
    legacy = 0;

    if (ngx_http_moe_json_get(root, "function_call")) {
        if (c) {
            return ngx_http_moe_fail(err, NGX_HTTP_BAD_REQUEST,
                                     "function_call",
                                     "give either tool_choice or the "
                                     "deprecated function_call, not both");
        }

        field = "function_call";
        c = ngx_http_moe_json_get(root, field);
        legacy = 1;
    }

    tl->choice = tl->tools ? NGX_HTTP_MOE_TOOL_AUTO : NGX_HTTP_MOE_TOOL_NONE;

    if (YAJL_IS_STRING(c)) {
        if (ngx_strcmp(c->u.string, "none") == 0) {
            tl->choice = NGX_HTTP_MOE_TOOL_NONE;

        } else if (ngx_strcmp(c->u.string, "auto") == 0) {
            /* the default */

        } else if (!legacy && ngx_strcmp(c->u.string, "required") == 0) {
            tl->choice = NGX_HTTP_MOE_TOOL_REQUIRED;

        } else {
            return ngx_http_moe_fail(err, NGX_HTTP_BAD_REQUEST, field,
                                     legacy ? "function_call must be "
                                              "\"none\", \"auto\" or "
                                              "{\"name\": ...}"
                                            : "tool_choice must be "
                                              "\"none\", \"auto\", "
                                              "\"required\" or {\"type\": "
                                              "\"function\", \"function\": "
                                              "{\"name\": ...}}");
        }

    } else if (YAJL_IS_OBJECT(c)) {
        fn = c;

        if (!legacy) {
            type = ngx_http_moe_json_get(c, "type");
            fn = ngx_http_moe_json_get(c, "function");

            if (!YAJL_IS_STRING(type)
                || ngx_strcmp(type->u.string, "function") != 0
                || !YAJL_IS_OBJECT(fn))
            {
                return ngx_http_moe_fail(err, NGX_HTTP_BAD_REQUEST, field,
                                         "tool_choice naming a function must "
                                         "be {\"type\": \"function\", "
                                         "\"function\": {\"name\": ...}}");
            }
        }

        name = ngx_http_moe_json_get(fn, "name");

        if (!YAJL_IS_STRING(name)) {
            return ngx_http_moe_fail(err, NGX_HTTP_BAD_REQUEST, field,
                                     "%s.%sname must be a string", field,
                                     legacy ? "" : "function.");
        }

        if (ngx_http_moe_tools_find(tl, name->u.string) == NULL) {
            return ngx_http_moe_fail(err, NGX_HTTP_BAD_REQUEST, field,
                                     "%s names the function \"%s\", which "
                                     "is not in %s", field, name->u.string,
                                     legacy ? "functions" : "tools");
        }

        tl->choice = NGX_HTTP_MOE_TOOL_NAMED;
        tl->name = name->u.string;

    } else if (c) {
        return ngx_http_moe_fail(err, NGX_HTTP_BAD_REQUEST, field,
                                 "%s must be a string or an object", field);
    }

    if (tl->choice == NGX_HTTP_MOE_TOOL_REQUIRED && tl->tools == NULL) {
        return ngx_http_moe_fail(err, NGX_HTTP_BAD_REQUEST, field,
                                 "tool_choice \"required\" needs a "
                                 "non-empty tools array");
    }

    switch (tl->choice) {

    case NGX_HTTP_MOE_TOOL_AUTO:
        /* the instance the request was routed to: its keys and model */
        mcf = ngx_http_moe_main_conf(r);
        ctx = ngx_http_moe_get_ctx(r);
        eng = ctx != NULL ? ctx->eng : NULL;
        conf = (eng != NULL && eng->inst != NULL && eng->inst->config)
               ? eng->inst->config : mcf->config;

        if (!conf->enable_auto_tool_choice) {
            return ngx_http_moe_fail(err, NGX_HTTP_BAD_REQUEST, field,
                                     "\"auto\" tool choice is off on this "
                                     "server (enable_auto_tool_choice: "
                                     "false); use \"none\", \"required\" "
                                     "or a named function");
        }

        fmt = moe_tool_format_from_name(conf->tool_call_parser);

        if (fmt < 0) {
            /* "auto": by the model's template and architecture */
            fmt = eng != NULL
                  ? moe_tool_format_detect(eng->info->architecture,
                                           eng->info->chat_template)
                  : MOE_TOOL_NONE;
        }

        tl->format = (ngx_uint_t) fmt;
        break;

    case NGX_HTTP_MOE_TOOL_REQUIRED:
        tl->format = MOE_TOOL_REQUIRED;
        break;

    case NGX_HTTP_MOE_TOOL_NAMED:
        tl->format = MOE_TOOL_NAMED;
        break;

    default:
        tl->format = MOE_TOOL_NONE;
    }

    return NGX_OK;
}


/* the function object of tools[i] (or functions[i]) */

static yajl_val
ngx_http_moe_tools_function(ngx_http_moe_tools_t *tl, size_t i)
{
    yajl_val  t;

    t = tl->tools->u.array.values[i];

    return tl->legacy ? t : ngx_http_moe_json_get(t, "function");
}


static yajl_val
ngx_http_moe_tools_find(ngx_http_moe_tools_t *tl, const char *name)
{
    size_t    i;
    yajl_val  fn, n;

    if (tl->tools == NULL) {
        return NULL;
    }

    for (i = 0; i < tl->tools->u.array.len; i++) {
        fn = ngx_http_moe_tools_function(tl, i);
        n = ngx_http_moe_json_get(fn, "name");

        if (YAJL_IS_STRING(n) && ngx_strcmp(n->u.string, name) == 0) {
            return fn;
        }
    }

    return NULL;
}


/*
 * The schema the guided decoder forces, as vLLM builds it: "required" is
 * an array (minItems 1) of {"name": one of the tools, "parameters": its
 * schema} (anyOf over the tools), at most one with parallel_tool_calls
 * false; a named function is its parameters.
 */

static ngx_int_t
ngx_http_moe_tools_schema(ngx_http_request_t *r, ngx_http_moe_tools_t *tl)
{
    size_t    i;
    yajl_gen  g;
    yajl_val  fn, name;

    g = ngx_http_moe_gen_create(r);
    if (g == NULL) {
        return NGX_ERROR;
    }

    if (tl->choice == NGX_HTTP_MOE_TOOL_NAMED) {
        ngx_http_moe_tools_gen_params(g, ngx_http_moe_tools_find(tl,
                                                                 tl->name));
        tl->guide_spec = ngx_http_moe_tools_gen_done(r, g, &tl->guide_len);

        return tl->guide_spec ? NGX_OK : NGX_ERROR;
    }

    yajl_gen_map_open(g);
    ngx_http_moe_gen_lit(g, "type");
    ngx_http_moe_gen_lit(g, "array");
    ngx_http_moe_gen_lit(g, "minItems");
    yajl_gen_integer(g, 1);

    if (tl->single) {
        ngx_http_moe_gen_lit(g, "maxItems");
        yajl_gen_integer(g, 1);
    }

    ngx_http_moe_gen_lit(g, "items");
    yajl_gen_map_open(g);
    ngx_http_moe_gen_lit(g, "type");
    ngx_http_moe_gen_lit(g, "object");
    ngx_http_moe_gen_lit(g, "anyOf");
    yajl_gen_array_open(g);

    for (i = 0; i < tl->tools->u.array.len; i++) {
        fn = ngx_http_moe_tools_function(tl, i);
        name = ngx_http_moe_json_get(fn, "name");

        yajl_gen_map_open(g);
        ngx_http_moe_gen_lit(g, "type");
        ngx_http_moe_gen_lit(g, "object");
        ngx_http_moe_gen_lit(g, "properties");
        yajl_gen_map_open(g);
        ngx_http_moe_gen_lit(g, "name");
        yajl_gen_map_open(g);
        ngx_http_moe_gen_lit(g, "type");
        ngx_http_moe_gen_lit(g, "string");
        ngx_http_moe_gen_lit(g, "enum");
        yajl_gen_array_open(g);
        ngx_http_moe_gen_cstr(g, name->u.string);
        yajl_gen_array_close(g);
        yajl_gen_map_close(g);
        ngx_http_moe_gen_lit(g, "parameters");
        ngx_http_moe_tools_gen_params(g, fn);
        yajl_gen_map_close(g);
        ngx_http_moe_gen_lit(g, "required");
        yajl_gen_array_open(g);
        ngx_http_moe_gen_lit(g, "name");
        ngx_http_moe_gen_lit(g, "parameters");
        yajl_gen_array_close(g);
        /* xgrammar's strict mode, vLLM's default: no other keys */
        ngx_http_moe_gen_lit(g, "additionalProperties");
        yajl_gen_bool(g, 0);
        yajl_gen_map_close(g);
    }

    yajl_gen_array_close(g);
    yajl_gen_map_close(g);
    yajl_gen_map_close(g);

    tl->guide_spec = ngx_http_moe_tools_gen_done(r, g, &tl->guide_len);

    return tl->guide_spec ? NGX_OK : NGX_ERROR;
}


/* a function's parameters schema; none given: any object */

static void
ngx_http_moe_tools_gen_params(yajl_gen g, yajl_val fn)
{
    yajl_val  params;

    params = ngx_http_moe_json_get(fn, "parameters");

    if (params) {
        ngx_http_moe_tools_gen_value(g, params);
        return;
    }

    yajl_gen_map_open(g);
    ngx_http_moe_gen_lit(g, "type");
    ngx_http_moe_gen_lit(g, "object");
    yajl_gen_map_close(g);
}


static void
ngx_http_moe_tools_gen_value(yajl_gen g, yajl_val v)
{
    size_t  i;

    if (YAJL_IS_STRING(v)) {
        ngx_http_moe_gen_cstr(g, v->u.string);

    } else if (YAJL_IS_NUMBER(v)) {
        yajl_gen_number(g, v->u.number.r, ngx_strlen(v->u.number.r));

    } else if (YAJL_IS_OBJECT(v)) {
        yajl_gen_map_open(g);

        for (i = 0; i < v->u.object.len; i++) {
            ngx_http_moe_gen_cstr(g, v->u.object.keys[i]);
            ngx_http_moe_tools_gen_value(g, v->u.object.values[i]);
        }

        yajl_gen_map_close(g);

    } else if (YAJL_IS_ARRAY(v)) {
        yajl_gen_array_open(g);

        for (i = 0; i < v->u.array.len; i++) {
            ngx_http_moe_tools_gen_value(g, v->u.array.values[i]);
        }

        yajl_gen_array_close(g);

    } else if (YAJL_IS_TRUE(v)) {
        yajl_gen_bool(g, 1);

    } else if (YAJL_IS_FALSE(v)) {
        yajl_gen_bool(g, 0);

    } else {
        yajl_gen_null(g);
    }
}


/* the generated text, NUL terminated, in r->pool; NULL on failure */

static u_char *
ngx_http_moe_tools_gen_done(ngx_http_request_t *r, yajl_gen g, size_t *len)
{
    u_char               *p;
    size_t                n;
    const unsigned char  *buf;

    if (yajl_gen_get_buf(g, &buf, &n) != yajl_gen_status_ok) {
        return NULL;
    }

    p = ngx_pnalloc(r->pool, n + 1);
    if (p == NULL) {
        return NULL;
    }

    ngx_memcpy(p, buf, n);
    p[n] = '\0';

    if (len) {
        *len = n;
    }

    /* g may make another document */
    yajl_gen_reset(g, NULL);
    yajl_gen_clear(g);

    return p;
}


/*
 * A conversation with tools, or with tool calls and tool results, goes to
 * the template as JSON (t->chat_json, t->tools_json): content as
 * ngx_http_moe_messages() made it (text parts joined; null is ""), name,
 * tool_call_id, and tool_calls whose arguments (a JSON string in the API)
 * are objects again, as vLLM hands them to templates.  Others keep the
 * plain messages.  (The guide's schema goes through the handler's
 * guide_* fields, as response_format's does.)
 */

ngx_int_t
ngx_http_moe_tools_prompt(ngx_http_request_t *r, yajl_val messages,
    moe_chat_msg_t *msgs, ngx_http_moe_tools_t *tl, ngx_http_moe_text_t *t,
    ngx_http_moe_err_t *err)
{
    size_t      i, n;
    yajl_val    m;
    yajl_gen    g;
    ngx_uint_t  need;

    need = (tl->tools != NULL);

    for (i = 0; !need && i < messages->u.array.len; i++) {
        m = messages->u.array.values[i];

        need = ngx_http_moe_json_get(m, "tool_calls") != NULL
               || ngx_http_moe_json_get(m, "tool_call_id") != NULL;
    }

    if (!need) {
        return NGX_OK;
    }

    g = ngx_http_moe_gen_create(r);
    if (g == NULL) {
        return NGX_ERROR;
    }

    yajl_gen_array_open(g);

    for (i = 0; i < messages->u.array.len; i++) {
        if (ngx_http_moe_tools_message(g, messages->u.array.values[i],
                                       &msgs[i], i, err)
            != NGX_OK)
        {
            return NGX_DECLINED;
        }
    }

    yajl_gen_array_close(g);

    t->chat_json = (const char *) ngx_http_moe_tools_gen_done(r, g, &n);
    if (t->chat_json == NULL) {
        return NGX_ERROR;
    }

    if (tl->tools) {
        /* transformers' shape: [{type: "function", function: {...}}] */
        yajl_gen_array_open(g);

        for (i = 0; i < tl->tools->u.array.len; i++) {
            if (tl->legacy) {
                yajl_gen_map_open(g);
                ngx_http_moe_gen_lit(g, "type");
                ngx_http_moe_gen_lit(g, "function");
                ngx_http_moe_gen_lit(g, "function");
                ngx_http_moe_tools_gen_value(g, tl->tools->u.array.values[i]);
                yajl_gen_map_close(g);

            } else {
                ngx_http_moe_tools_gen_value(g, tl->tools->u.array.values[i]);
            }
        }

        yajl_gen_array_close(g);

        t->tools_json = (const char *) ngx_http_moe_tools_gen_done(r, g, &n);
        if (t->tools_json == NULL) {
            return NGX_ERROR;
        }
    }

    return NGX_OK;
}


static ngx_int_t
ngx_http_moe_tools_message(yajl_gen g, yajl_val m, moe_chat_msg_t *msg,
    size_t i, ngx_http_moe_err_t *err)
{
    size_t      k;
    yajl_val    v, calls, tc, fn, name, args, parsed, id;
    const char  *keys[] = { "name", "tool_call_id", NULL };

    yajl_gen_map_open(g);
    ngx_http_moe_gen_lit(g, "role");
    ngx_http_moe_gen_cstr(g, msg->role);
    ngx_http_moe_gen_lit(g, "content");
    ngx_http_moe_gen_str(g, msg->content, msg->content_len);

    for (k = 0; keys[k]; k++) {
        v = ngx_http_moe_json_get(m, keys[k]);

        if (v == NULL) {
            continue;
        }

        if (!YAJL_IS_STRING(v)) {
            return ngx_http_moe_fail(err, NGX_HTTP_BAD_REQUEST, "messages",
                                     "messages[%uz].%s must be a string", i,
                                     keys[k]);
        }

        ngx_http_moe_gen_cstr(g, keys[k]);
        ngx_http_moe_gen_cstr(g, v->u.string);
    }

    calls = ngx_http_moe_json_get(m, "tool_calls");

    if (calls) {
        if (!YAJL_IS_ARRAY(calls)) {
            return ngx_http_moe_fail(err, NGX_HTTP_BAD_REQUEST, "messages",
                                     "messages[%uz].tool_calls must be an "
                                     "array", i);
        }

        ngx_http_moe_gen_lit(g, "tool_calls");
        yajl_gen_array_open(g);

        for (k = 0; k < calls->u.array.len; k++) {
            tc = calls->u.array.values[k];
            id = ngx_http_moe_json_get(tc, "id");
            fn = ngx_http_moe_json_get(tc, "function");
            name = ngx_http_moe_json_get(fn, "name");
            args = ngx_http_moe_json_get(fn, "arguments");

            if (!YAJL_IS_OBJECT(tc) || (id && !YAJL_IS_STRING(id))
                || !YAJL_IS_STRING(name)
                || (args && !YAJL_IS_STRING(args) && !YAJL_IS_OBJECT(args)))
            {
                return ngx_http_moe_fail(err, NGX_HTTP_BAD_REQUEST,
                                         "messages",
                                         "messages[%uz].tool_calls[%uz] must "
                                         "be {\"id\": string, \"type\": "
                                         "\"function\", \"function\": "
                                         "{\"name\": string, \"arguments\": "
                                         "string}}", i, k);
            }

            yajl_gen_map_open(g);

            if (id) {
                ngx_http_moe_gen_lit(g, "id");
                ngx_http_moe_gen_cstr(g, id->u.string);
            }

            ngx_http_moe_gen_lit(g, "type");
            ngx_http_moe_gen_lit(g, "function");
            ngx_http_moe_gen_lit(g, "function");
            yajl_gen_map_open(g);
            ngx_http_moe_gen_lit(g, "name");
            ngx_http_moe_gen_cstr(g, name->u.string);
            ngx_http_moe_gen_lit(g, "arguments");

            /* arguments that are no JSON object, or nested too deep,
             * reach the template as the string they are */
            parsed = YAJL_IS_STRING(args)
                     ? ngx_http_moe_json_parse_text(args->u.string) : NULL;

            if (YAJL_IS_OBJECT(parsed)) {
                ngx_http_moe_tools_gen_value(g, parsed);

            } else if (args) {
                ngx_http_moe_tools_gen_value(g, args);

            } else {
                yajl_gen_map_open(g);
                yajl_gen_map_close(g);
            }

            yajl_tree_free(parsed);

            yajl_gen_map_close(g);
            yajl_gen_map_close(g);
        }

        yajl_gen_array_close(g);
    }

    yajl_gen_map_close(g);

    return NGX_OK;
}
