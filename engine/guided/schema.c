/*
 * JSON Schema -> GBNF.
 *
 * Supported: type (a name or an array of names), properties, required,
 * additionalProperties (false: no other key; true or absent: other keys
 * allowed after the listed ones, vLLM's behaviour; a schema: other keys
 * whose values match it), items, minItems, maxItems, enum, const, anyOf,
 * oneOf (as anyOf), allOf with one member, $ref into #/$defs/ or
 * #/definitions/ (recursion allowed) and "#", pattern (anchored, the
 * regex subset of regex.c), format (date, time, date-time, uuid, email,
 * ipv4; other formats are annotations and change nothing), minLength,
 * maxLength, minimum 0 on integer / number.  Annotation keywords (title,
 * description, default, examples, $schema, $id, $comment, deprecated,
 * readOnly, writeOnly) are ignored.  Any other keyword is refused by name.
 *
 * Output: compact JSON with limited optional whitespace (the generic
 * `ws` rule: nothing, or one space or newline then up to 8 spaces) between
 * tokens; listed properties come in the schema's order; a required
 * property must be present, an optional one may be skipped.
 */

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <yajl/yajl_gen.h>
#include <yajl/yajl_tree.h>

#include "guided/guided_int.h"
#include "util/json.h"


const char moe_gbnf_json_rules[] =
    "ws ::= ([ \\n] [ ]{0,8})?\n"
    "json-value ::= json-object | json-array | json-string | json-number"
    " | \"true\" | \"false\" | \"null\"\n"
    "json-object ::= \"{\" ws ( json-string ws \":\" ws json-value ws"
    " ( \",\" ws json-string ws \":\" ws json-value ws )* )? \"}\"\n"
    "json-array ::= \"[\" ws ( json-value ws ( \",\" ws json-value ws )* )?"
    " \"]\"\n"
    "json-string ::= \"\\\"\" json-char* \"\\\"\"\n"
    "json-char ::= [^\"\\\\\\x00-\\x1F] | \"\\\\\" ( [\"\\\\/bfnrt]"
    " | \"u\" [0-9a-fA-F]{4} )\n"
    "json-int ::= \"-\"? json-uint\n"
    "json-uint ::= \"0\" | [1-9] [0-9]{0,15}\n"
    "json-frac ::= ( \".\" [0-9]{1,16} )? ( [eE] [-+]? [0-9]{1,3} )?\n"
    "json-number ::= json-int json-frac\n"
    "json-unumber ::= json-uint json-frac\n"
    "json-date ::= [0-9]{4} \"-\" ( \"0\" [1-9] | \"1\" [0-2] ) \"-\""
    " ( \"0\" [1-9] | [12] [0-9] | \"3\" [01] )\n"
    "json-time ::= ( [01] [0-9] | \"2\" [0-3] ) \":\" [0-5] [0-9] \":\""
    " [0-5] [0-9] ( \".\" [0-9]{1,9} )? ( \"Z\" | [+-] ( [01] [0-9]"
    " | \"2\" [0-3] ) \":\" [0-5] [0-9] )\n"
    "json-hex ::= [0-9a-fA-F]\n"
    "json-uuid ::= json-hex{8} \"-\" json-hex{4} \"-\" json-hex{4} \"-\""
    " json-hex{4} \"-\" json-hex{12}\n"
    "json-email ::= [a-zA-Z0-9._%+-]{1,64} \"@\" [a-zA-Z0-9-]{1,63}"
    " ( \".\" [a-zA-Z0-9-]{1,63} ){1,8}\n"
    "json-octet ::= \"25\" [0-5] | \"2\" [0-4] [0-9] | \"1\" [0-9] [0-9]"
    " | [1-9]? [0-9]\n"
    "json-ipv4 ::= json-octet \".\" json-octet \".\" json-octet \".\""
    " json-octet\n";


#define SCH_MAX_DEPTH   64
#define SCH_MAX_TEXT    (1 << 20)
#define SCH_MAX_REFS    256

typedef struct {
    yajl_val   root;
    gbuf_t    *rules;           /* named rules, one a line */
    int        n_rule;
    const char *ref_name[SCH_MAX_REFS];
    int        ref_id[SCH_MAX_REFS];
    int        n_ref;
    char      *err;
    size_t     errlen;
    int        rc;
} sc_t;


static int
sc_fail(sc_t *c, int rc, const char *fmt, const char *arg)
{
    if (c->rc == MOE_OK) {
        c->rc = rc;
        snprintf(c->err, c->errlen, fmt, arg);
    }
    return c->rc;
}


static yajl_val
sc_get(yajl_val o, const char *key)
{
    return moe_json_get(o, key);
}


/* v serialized compactly as a GBNF literal */
static int
sc_json_lit(sc_t *c, yajl_val v, gbuf_t *out);


static int
sc_gen_val(yajl_gen g, yajl_val v)
{
    size_t i;

    if (YAJL_IS_STRING(v)) {
        return yajl_gen_string(g, (const unsigned char *) v->u.string,
                               strlen(v->u.string));
    }
    if (YAJL_IS_NUMBER(v)) {
        return yajl_gen_number(g, v->u.number.r, strlen(v->u.number.r));
    }
    if (YAJL_IS_TRUE(v)) {
        return yajl_gen_bool(g, 1);
    }
    if (YAJL_IS_FALSE(v)) {
        return yajl_gen_bool(g, 0);
    }
    if (YAJL_IS_NULL(v)) {
        return yajl_gen_null(g);
    }
    if (YAJL_IS_ARRAY(v)) {
        yajl_gen_array_open(g);
        for (i = 0; i < v->u.array.len; i++) {
            sc_gen_val(g, v->u.array.values[i]);
        }
        return yajl_gen_array_close(g);
    }
    yajl_gen_map_open(g);
    for (i = 0; i < v->u.object.len; i++) {
        yajl_gen_string(g, (const unsigned char *) v->u.object.keys[i],
                        strlen(v->u.object.keys[i]));
        sc_gen_val(g, v->u.object.values[i]);
    }
    return yajl_gen_map_close(g);
}


static int
sc_json_lit(sc_t *c, yajl_val v, gbuf_t *out)
{
    yajl_gen             g;
    const unsigned char *buf;
    size_t               len;

    g = yajl_gen_alloc(NULL);
    if (g == NULL) {
        return sc_fail(c, MOE_ENOMEM, "%s", "out of memory");
    }
    sc_gen_val(g, v);
    yajl_gen_get_buf(g, &buf, &len);
    gb_lit(out, (const char *) buf, len);
    yajl_gen_free(g);
    return MOE_OK;
}


/* a property name as a GBNF literal of its JSON string */
static int
sc_json_key(sc_t *c, const char *key, gbuf_t *out)
{
    yajl_gen             g;
    const unsigned char *buf;
    size_t               len;

    g = yajl_gen_alloc(NULL);
    if (g == NULL) {
        return sc_fail(c, MOE_ENOMEM, "%s", "out of memory");
    }
    yajl_gen_string(g, (const unsigned char *) key, strlen(key));
    yajl_gen_get_buf(g, &buf, &len);
    gb_lit(out, (const char *) buf, len);
    yajl_gen_free(g);
    return MOE_OK;
}


static const char *const sc_annotations[] = {
    "title", "description", "default", "examples", "$schema", "$id",
    "$comment", "deprecated", "readOnly", "writeOnly", "$defs",
    "definitions", NULL
};

static const char *const sc_supported[] = {
    "type", "properties", "required", "additionalProperties", "items",
    "minItems", "maxItems", "enum", "const", "anyOf", "oneOf", "allOf",
    "$ref", "pattern", "format", "minLength", "maxLength", "minimum", NULL
};


static int
sc_in(const char *k, const char *const *list)
{
    for (; *list != NULL; list++) {
        if (strcmp(k, *list) == 0) {
            return 1;
        }
    }
    return 0;
}


static int sc_schema(sc_t *c, yajl_val s, gbuf_t *out, int depth);


/* a non-negative integer keyword, -1 when absent, -2 when bad */
static long
sc_count(sc_t *c, yajl_val s, const char *key)
{
    yajl_val v = sc_get(s, key);

    if (v == NULL) {
        return -1;
    }
    if (!YAJL_IS_INTEGER(v) || YAJL_GET_INTEGER(v) < 0
        || YAJL_GET_INTEGER(v) > MOE_GRAM_MAX_REPEAT)
    {
        sc_fail(c, MOE_EINVAL, "JSON Schema: '%s' must be an integer in "
                "[0, 1000]", key);
        return -2;
    }
    return (long) YAJL_GET_INTEGER(v);
}


static int
sc_ref(sc_t *c, const char *ref, gbuf_t *out, int depth)
{
    const char *path;
    yajl_val    target;
    gbuf_t      body = {0};
    int         i, id;
    char        name[64];

    for (i = 0; i < c->n_ref; i++) {
        if (strcmp(c->ref_name[i], ref) == 0) {
            gb_printf(out, " ref-%d", c->ref_id[i]);
            return MOE_OK;
        }
    }
    if (strcmp(ref, "#") == 0) {
        target = c->root;
    } else if (strncmp(ref, "#/$defs/", 8) == 0
               || strncmp(ref, "#/definitions/", 14) == 0)
    {
        path = ref[2] == '$' ? ref + 8 : ref + 14;
        if (strchr(path, '/') != NULL || strchr(path, '~') != NULL) {
            return sc_fail(c, MOE_EINVAL, "JSON Schema: unsupported $ref "
                           "'%s' (only #/$defs/NAME)", ref);
        }
        target = sc_get(sc_get(c->root, ref[2] == '$' ? "$defs"
                                                      : "definitions"),
                        path);
    } else {
        return sc_fail(c, MOE_EINVAL, "JSON Schema: unsupported $ref '%s' "
                       "(only local #/$defs/NAME)", ref);
    }
    if (target == NULL) {
        return sc_fail(c, MOE_EINVAL, "JSON Schema: $ref '%s' not found",
                       ref);
    }
    if (c->n_ref == SCH_MAX_REFS) {
        return sc_fail(c, MOE_EINVAL, "JSON Schema: too many $ref targets "
                       "(schema too large)%s", "");
    }
    id = c->n_rule++;
    c->ref_name[c->n_ref] = ref;
    c->ref_id[c->n_ref++] = id;
    if (sc_schema(c, target, &body, depth + 1) == MOE_OK) {
        snprintf(name, sizeof(name), "ref-%d ::= ", id);
        gb_puts(c->rules, name);
        gb_put(c->rules, body.p ? body.p : "\"\"", body.len);
        gb_puts(c->rules, "\n");
        gb_printf(out, " ref-%d", id);
    }
    gb_free(&body);
    return c->rc;
}


static int
sc_string(sc_t *c, yajl_val s, gbuf_t *out)
{
    yajl_val    pat = sc_get(s, "pattern"), fmt = sc_get(s, "format");
    long        mn, mx;
    const char *f;

    if (pat != NULL) {
        if (!YAJL_IS_STRING(pat)) {
            return sc_fail(c, MOE_EINVAL, "JSON Schema: 'pattern' must be a "
                           "string%s", "");
        }
        gb_puts(out, " \"\\\"\" ");
        if (moe_regex_to_gbnf(pat->u.string, strlen(pat->u.string), 1, out,
                              c->err, c->errlen) != MOE_OK)
        {
            c->rc = MOE_EINVAL;
            return c->rc;
        }
        gb_puts(out, " \"\\\"\"");
        return MOE_OK;
    }
    if (fmt != NULL && YAJL_IS_STRING(fmt)) {
        f = fmt->u.string;
        if (strcmp(f, "date") == 0 || strcmp(f, "time") == 0
            || strcmp(f, "uuid") == 0 || strcmp(f, "email") == 0
            || strcmp(f, "ipv4") == 0)
        {
            gb_printf(out, " \"\\\"\" json-%s \"\\\"\"", f);
            return MOE_OK;
        }
        if (strcmp(f, "date-time") == 0) {
            gb_puts(out, " \"\\\"\" json-date \"T\" json-time \"\\\"\"");
            return MOE_OK;
        }
    }
    mn = sc_count(c, s, "minLength");
    mx = sc_count(c, s, "maxLength");
    if (mn == -2 || mx == -2) {
        return c->rc;
    }
    if (mn < 0 && mx < 0) {
        gb_puts(out, " json-string");
        return MOE_OK;
    }
    if (mn < 0) {
        mn = 0;
    }
    if (mx >= 0 && mx < mn) {
        return sc_fail(c, MOE_EINVAL, "JSON Schema: maxLength < minLength "
                       "(empty language)%s", "");
    }
    if (mx < 0) {
        gb_printf(out, " \"\\\"\" json-char{%ld,} \"\\\"\"", mn);
    } else {
        gb_printf(out, " \"\\\"\" json-char{%ld,%ld} \"\\\"\"", mn, mx);
    }
    return MOE_OK;
}


static int
sc_object(sc_t *c, yajl_val s, gbuf_t *out, int depth)
{
    yajl_val  props = sc_get(s, "properties"), req = sc_get(s, "required");
    yajl_val  addl = sc_get(s, "additionalProperties");
    size_t    n = 0, i, k;
    int       base, f, is_req = 0;
    gbuf_t    val = {0}, extra = {0};
    char      key[64];

    if (props != NULL && !YAJL_IS_OBJECT(props)) {
        return sc_fail(c, MOE_EINVAL, "JSON Schema: 'properties' must be an "
                       "object%s", "");
    }
    if (req != NULL && !YAJL_IS_ARRAY(req)) {
        return sc_fail(c, MOE_EINVAL, "JSON Schema: 'required' must be an "
                       "array%s", "");
    }
    n = props != NULL ? props->u.object.len : 0;
    /* every required name must be listed (else the language is empty
     * when additionalProperties is false, and we list keys in order) */
    for (k = 0; req != NULL && k < req->u.array.len; k++) {
        yajl_val r = req->u.array.values[k];
        if (!YAJL_IS_STRING(r)) {
            return sc_fail(c, MOE_EINVAL, "JSON Schema: 'required' holds a "
                           "non-string%s", "");
        }
        if (sc_get(props, r->u.string) == NULL) {
            return sc_fail(c, MOE_EINVAL, "JSON Schema: required property "
                           "'%s' is not in 'properties' (unsupported)",
                           r->u.string);
        }
    }
    /* extra members: none, any value, or values of a schema */
    if (addl == NULL || YAJL_IS_TRUE(addl)) {
        gb_puts(&extra, " json-value");
    } else if (YAJL_IS_OBJECT(addl)) {
        if (sc_schema(c, addl, &extra, depth + 1) != MOE_OK) {
            gb_free(&extra);
            return c->rc;
        }
    } else if (!YAJL_IS_FALSE(addl)) {
        return sc_fail(c, MOE_EINVAL, "JSON Schema: 'additionalProperties' "
                       "must be a boolean or a schema%s", "");
    }

    base = c->n_rule++;
    /* obj-B-i-f: members from property i on; f: nothing written yet */
    for (i = n + 1; i-- > 0;) {
        if (i < n) {
            is_req = 0;
            for (k = 0; req != NULL && k < req->u.array.len; k++) {
                if (strcmp(req->u.array.values[k]->u.string,
                           props->u.object.keys[i]) == 0)
                {
                    is_req = 1;
                }
            }
            val.len = 0;
            if (val.p) {
                val.p[0] = '\0';
            }
            if (sc_schema(c, props->u.object.values[i], &val, depth + 1)
                != MOE_OK)
            {
                gb_free(&val);
                gb_free(&extra);
                return c->rc;
            }
        }
        for (f = 0; f <= 1; f++) {
            snprintf(key, sizeof(key), "obj-%d-%zu-%d ::= ", base, i, f);
            gb_puts(c->rules, key);
            if (i == n) {
                if (extra.len == 0) {
                    gb_puts(c->rules, "\"\"\n");
                    continue;
                }
                gb_puts(c->rules, f ? "( " : "( \",\" ws ");
                gb_puts(c->rules, "json-string ws \":\" ws (");
                gb_puts(c->rules, extra.p);
                gb_puts(c->rules, ") ws ( \",\" ws json-string ws \":\" ws (");
                gb_puts(c->rules, extra.p);
                gb_puts(c->rules, ") ws )* )?\n");
                continue;
            }
            gb_puts(c->rules, f ? "" : "\",\" ws ");
            sc_json_key(c, props->u.object.keys[i], c->rules);
            gb_puts(c->rules, " ws \":\" ws (");
            gb_puts(c->rules, val.p ? val.p : "\"\"");
            gb_printf(c->rules, ") ws obj-%d-%zu-0", base, i + 1);
            if (!is_req) {
                gb_printf(c->rules, " | obj-%d-%zu-%d", base, i + 1, f);
            }
            gb_puts(c->rules, "\n");
        }
    }
    gb_printf(out, " \"{\" ws obj-%d-0-1 \"}\"", base);
    gb_free(&val);
    gb_free(&extra);
    return c->rc;
}


static int
sc_array(sc_t *c, yajl_val s, gbuf_t *out, int depth)
{
    yajl_val  items = sc_get(s, "items");
    long      mn, mx;
    gbuf_t    it = {0};
    int       id;

    mn = sc_count(c, s, "minItems");
    mx = sc_count(c, s, "maxItems");
    if (mn == -2 || mx == -2) {
        return c->rc;
    }
    if (mn < 0) {
        mn = 0;
    }
    if (mx >= 0 && mx < mn) {
        return sc_fail(c, MOE_EINVAL, "JSON Schema: maxItems < minItems "
                       "(empty language)%s", "");
    }
    if (items == NULL || YAJL_IS_TRUE(items)) {
        gb_puts(&it, " json-value");
    } else if (YAJL_IS_OBJECT(items)) {
        if (sc_schema(c, items, &it, depth + 1) != MOE_OK) {
            gb_free(&it);
            return c->rc;
        }
    } else {
        return sc_fail(c, MOE_EINVAL, "JSON Schema: 'items' must be a schema "
                       "(tuple 'items' / prefixItems are not supported)%s",
                       "");
    }
    if (mx == 0) {
        gb_puts(out, " \"[\" ws \"]\"");
        gb_free(&it);
        return MOE_OK;
    }
    id = c->n_rule++;
    gb_printf(c->rules, "item-%d ::= ", id);
    gb_puts(c->rules, it.p);
    gb_puts(c->rules, "\n");
    gb_printf(out, " \"[\" ws ( item-%d ws ( \",\" ws item-%d ws )", id, id);
    if (mx < 0) {
        gb_printf(out, "{%ld,}", mn > 0 ? mn - 1 : 0);
    } else {
        gb_printf(out, "{%ld,%ld}", mn > 0 ? mn - 1 : 0, mx - 1);
    }
    gb_puts(out, mn > 0 ? " )" : " )?");
    gb_puts(out, " \"]\"");
    gb_free(&it);
    return MOE_OK;
}


static int
sc_number_min(sc_t *c, yajl_val s, int *nonneg)
{
    yajl_val m = sc_get(s, "minimum");

    *nonneg = 0;
    if (m == NULL) {
        return MOE_OK;
    }
    if (!YAJL_IS_NUMBER(m) || YAJL_GET_DOUBLE(m) != 0.0) {
        return sc_fail(c, MOE_EINVAL, "JSON Schema: unsupported keyword "
                       "'minimum' (only minimum 0 is supported)%s", "");
    }
    *nonneg = 1;
    return MOE_OK;
}


static int
sc_type(sc_t *c, yajl_val s, const char *type, gbuf_t *out, int depth)
{
    int nonneg;

    if (strcmp(type, "string") == 0) {
        return sc_string(c, s, out);
    }
    if (strcmp(type, "integer") == 0 || strcmp(type, "number") == 0) {
        if (sc_number_min(c, s, &nonneg) != MOE_OK) {
            return c->rc;
        }
        gb_printf(out, " json-%s%s", nonneg ? "u" : "",
                  type[0] == 'i' ? "int" : "number");
        return MOE_OK;
    }
    if (strcmp(type, "boolean") == 0) {
        gb_puts(out, " ( \"true\" | \"false\" )");
        return MOE_OK;
    }
    if (strcmp(type, "null") == 0) {
        gb_puts(out, " \"null\"");
        return MOE_OK;
    }
    if (strcmp(type, "object") == 0) {
        return sc_object(c, s, out, depth);
    }
    if (strcmp(type, "array") == 0) {
        return sc_array(c, s, out, depth);
    }
    return sc_fail(c, MOE_EINVAL, "JSON Schema: unknown type '%s'", type);
}


static int
sc_schema(sc_t *c, yajl_val s, gbuf_t *out, int depth)
{
    yajl_val  v, type;
    size_t    i;
    int       k;

    if (c->rc != MOE_OK) {
        return c->rc;
    }
    if (depth > SCH_MAX_DEPTH) {
        return sc_fail(c, MOE_EINVAL, "JSON Schema: nested too deep (schema "
                       "too large)%s", "");
    }
    if (c->rules->len > SCH_MAX_TEXT || out->len > SCH_MAX_TEXT) {
        return sc_fail(c, MOE_EINVAL, "JSON Schema: schema too large%s", "");
    }
    if (YAJL_IS_TRUE(s)) {
        gb_puts(out, " json-value");
        return MOE_OK;
    }
    if (YAJL_IS_FALSE(s)) {
        return sc_fail(c, MOE_EINVAL, "JSON Schema: the schema false "
                       "matches nothing (empty language)%s", "");
    }
    if (!YAJL_IS_OBJECT(s)) {
        return sc_fail(c, MOE_EINVAL, "JSON Schema: a schema must be an "
                       "object or a boolean%s", "");
    }
    for (i = 0; i < s->u.object.len; i++) {
        const char *k2 = s->u.object.keys[i];
        if (!sc_in(k2, sc_annotations) && !sc_in(k2, sc_supported)) {
            return sc_fail(c, MOE_EINVAL, "JSON Schema: unsupported keyword "
                           "'%s'", k2);
        }
    }

    gb_puts(out, " (");
    if ((v = sc_get(s, "$ref")) != NULL) {
        if (!YAJL_IS_STRING(v)) {
            return sc_fail(c, MOE_EINVAL, "JSON Schema: '$ref' must be a "
                           "string%s", "");
        }
        sc_ref(c, v->u.string, out, depth);
    } else if ((v = sc_get(s, "const")) != NULL) {
        sc_json_lit(c, v, out);
    } else if ((v = sc_get(s, "enum")) != NULL) {
        if (!YAJL_IS_ARRAY(v) || v->u.array.len == 0) {
            return sc_fail(c, MOE_EINVAL, "JSON Schema: 'enum' must be a "
                           "non-empty array%s", "");
        }
        for (i = 0; i < v->u.array.len; i++) {
            gb_puts(out, i ? " | " : " ");
            sc_json_lit(c, v->u.array.values[i], out);
        }
    } else if ((v = sc_get(s, "anyOf")) != NULL
               || (v = sc_get(s, "oneOf")) != NULL
               || (v = sc_get(s, "allOf")) != NULL)
    {
        if (!YAJL_IS_ARRAY(v) || v->u.array.len == 0) {
            return sc_fail(c, MOE_EINVAL, "JSON Schema: anyOf / oneOf / "
                           "allOf must be a non-empty array%s", "");
        }
        if (v == sc_get(s, "allOf") && v->u.array.len != 1) {
            return sc_fail(c, MOE_EINVAL, "JSON Schema: unsupported keyword "
                           "'allOf' with more than one schema%s", "");
        }
        for (i = 0; i < v->u.array.len && c->rc == MOE_OK; i++) {
            gb_puts(out, i ? " |" : "");
            sc_schema(c, v->u.array.values[i], out, depth + 1);
        }
    } else if ((type = sc_get(s, "type")) != NULL) {
        if (YAJL_IS_STRING(type)) {
            sc_type(c, s, type->u.string, out, depth);
        } else if (YAJL_IS_ARRAY(type) && type->u.array.len > 0) {
            for (i = 0; i < type->u.array.len && c->rc == MOE_OK; i++) {
                yajl_val t1 = type->u.array.values[i];
                if (!YAJL_IS_STRING(t1)) {
                    return sc_fail(c, MOE_EINVAL, "JSON Schema: 'type' "
                                   "entries must be strings%s", "");
                }
                gb_puts(out, i ? " |" : "");
                sc_type(c, s, t1->u.string, out, depth);
            }
        } else {
            return sc_fail(c, MOE_EINVAL, "JSON Schema: 'type' must be a "
                           "string or an array of strings%s", "");
        }
    } else if (sc_get(s, "properties") != NULL
               || sc_get(s, "additionalProperties") != NULL
               || sc_get(s, "required") != NULL)
    {
        sc_object(c, s, out, depth);
    } else if (sc_get(s, "items") != NULL || sc_get(s, "minItems") != NULL
               || sc_get(s, "maxItems") != NULL)
    {
        sc_array(c, s, out, depth);
    } else if (sc_get(s, "pattern") != NULL || sc_get(s, "format") != NULL
               || sc_get(s, "minLength") != NULL
               || sc_get(s, "maxLength") != NULL)
    {
        sc_string(c, s, out);
    } else {
        gb_puts(out, " json-value");
    }
    gb_puts(out, " )");
    k = out->oom || c->rules->oom;
    if (k) {
        return sc_fail(c, MOE_ENOMEM, "%s", "out of memory");
    }
    return c->rc;
}


int
moe_schema_to_gbnf(const char *schema, size_t len, gbuf_t *out, char *err,
    size_t errlen)
{
    sc_t      c;
    char     *txt, perr[128];
    gbuf_t    root = {0};

    memset(&c, 0, sizeof(c));
    c.err = err;
    c.errlen = errlen;
    c.rc = MOE_OK;
    c.rules = out;
    txt = strndup(schema, len);
    if (txt == NULL) {
        return MOE_ENOMEM;
    }
    perr[0] = '\0';
    c.root = moe_json_parse(txt, perr, sizeof(perr));
    free(txt);
    if (c.root == NULL) {
        for (txt = perr; *txt; txt++) {
            if (*txt == '\n' || *txt == '\r') {
                *txt = ' ';
            }
        }
        snprintf(err, errlen, "JSON Schema: not valid JSON: %.100s", perr);
        return MOE_EINVAL;
    }
    if (sc_schema(&c, c.root, &root, 0) == MOE_OK) {
        gb_puts(out, "root ::= ");
        gb_put(out, root.p, root.len);
        gb_puts(out, "\n");
        gb_puts(out, moe_gbnf_json_rules);
        if (out->oom) {
            c.rc = MOE_ENOMEM;
        }
    }
    gb_free(&root);
    yajl_tree_free(c.root);
    return c.rc;
}
