/*
 * A Jinja2 subset for chat templates (internal to libmoe).
 *
 * Renders the `chat_template` of a model's tokenizer_config.json the way
 * transformers' apply_chat_template() does: Jinja2 with trim_blocks and
 * lstrip_blocks, the loopcontrols extension, the {% generation %} tag,
 * raise_exception(), strftime_now() and a json.dumps() based tojson.
 * Undefined values follow Jinja's default Undefined (falsy, render as "",
 * an error when used in arithmetic or when an attribute is taken).
 *
 * A construct outside the subset fails the parse or the render with
 * MOE_EINVAL and an err naming it ("unsupported filter 'xyz' at line 3");
 * malformed templates fail the same way and never crash.  Rendering is
 * bounded in steps, memory and output size.
 */

#ifndef MOE_JINJA_H
#define MOE_JINJA_H

#include <stddef.h>

#include "moe.h"

typedef struct moe_jinja_tmpl moe_jinja_tmpl_t;

/*
 * Parse `len` bytes of template source into *out (free with
 * moe_jinja_free).  MOE_EINVAL with err set ("... at line N") on a syntax
 * error or an unsupported statement; MOE_ENOMEM when out of memory.
 */
int moe_jinja_parse(const char *src, size_t len, moe_jinja_tmpl_t **out,
    char *err, size_t errlen);

/* Frees a parsed template; NULL is fine. */
void moe_jinja_free(moe_jinja_tmpl_t *t);

/* The variables a chat template sees. */
typedef struct {
    const moe_chat_msg_t  *msgs;       /* -> messages (list of dicts) */
    int                    n_msgs;
    int                    add_generation_prompt;
    const char            *bos_token;  /* NULL: left undefined */
    const char            *eos_token;  /* NULL: left undefined */
} moe_jinja_chat_vars_t;

/*
 * Render a template with the chat variables (messages, add_generation_prompt,
 * bos_token, eos_token, and tools = documents = none, as transformers passes
 * them).  *out is malloc()ed and NUL terminated, *out_len bytes.  Fails with
 * MOE_EINVAL and err set (a raise_exception() message, an undefined value
 * used, an unsupported filter/test/method, a limit hit) or MOE_ENOMEM.
 * The template is not modified: renders may run concurrently.
 */
int moe_jinja_render_chat(const moe_jinja_tmpl_t *t,
    const moe_jinja_chat_vars_t *v, char **out, size_t *out_len, char *err,
    size_t errlen);

/*
 * Render with the variables of a JSON object (`json`, NUL terminated):
 * strings, numbers, true/false, null, arrays and objects map onto the
 * Jinja values of Python's json.loads().  Same results as above; a `json`
 * that is not an object fails with MOE_EINVAL.
 */
int moe_jinja_render_json(const moe_jinja_tmpl_t *t, const char *json,
    char **out, size_t *out_len, char *err, size_t errlen);

#endif /* MOE_JINJA_H */
