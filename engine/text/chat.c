/*
 * Chat prompts: the model's chat_template rendered by the Jinja-subset
 * interpreter (jinja.h), or ChatML when the model ships no template.
 * Parsed templates are cached by their text (a handful per process; they
 * stay until exit), so a request costs one render, not a parse.
 */

#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "moe.h"
#include "text/jinja.h"
#include "text/tokenizer.h"

#define MOE_CHAT_CACHE  8

typedef struct {
    char              *src;
    moe_jinja_tmpl_t  *tmpl;
} moe_chat_cache_t;

static moe_chat_cache_t  moe_chat_cache[MOE_CHAT_CACHE];
static pthread_mutex_t   moe_chat_mutex = PTHREAD_MUTEX_INITIALIZER;

typedef struct {
    char   *p;
    size_t  len;
    size_t  cap;
} moe_buf_t;


static int
moe_buf_add(moe_buf_t *b, const char *s, size_t n)
{
    if (b->len + n + 1 > b->cap) {
        size_t  cap = b->cap ? b->cap : 256;
        char   *p;

        while (cap < b->len + n + 1) {
            cap *= 2;
        }

        p = realloc(b->p, cap);
        if (p == NULL) {
            return MOE_ENOMEM;
        }
        b->p = p;
        b->cap = cap;
    }

    memcpy(b->p + b->len, s, n);
    b->len += n;
    b->p[b->len] = '\0';

    return MOE_OK;
}


/*
 * The parsed template for `src`: from the cache, or parsed now and cached
 * when a slot is free (*owned = 0), else parsed for this call only
 * (*owned = 1: the caller frees it).
 */
static int
moe_chat_template(const char *src, moe_jinja_tmpl_t **out, int *owned,
    char *err, size_t errlen)
{
    int                i, rc;
    moe_jinja_tmpl_t  *t;
    char              *copy;

    *owned = 0;
    pthread_mutex_lock(&moe_chat_mutex);

    for (i = 0; i < MOE_CHAT_CACHE && moe_chat_cache[i].src != NULL; i++) {
        if (strcmp(moe_chat_cache[i].src, src) == 0) {
            *out = moe_chat_cache[i].tmpl;
            pthread_mutex_unlock(&moe_chat_mutex);
            return MOE_OK;
        }
    }

    rc = moe_jinja_parse(src, strlen(src), &t, err, errlen);
    if (rc != MOE_OK) {
        pthread_mutex_unlock(&moe_chat_mutex);
        return rc;
    }

    copy = i < MOE_CHAT_CACHE ? strdup(src) : NULL;
    if (copy != NULL) {
        moe_chat_cache[i].src = copy;
        moe_chat_cache[i].tmpl = t;
    } else {
        *owned = 1;
    }
    pthread_mutex_unlock(&moe_chat_mutex);

    *out = t;
    return MOE_OK;
}


int
moe_chat_render(const moe_tokenizer_t *t, const char *chat_template,
    const moe_chat_msg_t *msgs, int n_msgs, int add_generation_prompt,
    char **out, size_t *out_len, char *err, size_t errlen)
{
    int        i, rc = MOE_OK;
    moe_buf_t  b = { NULL, 0, 0 };

    if (n_msgs < 1) {
        if (err != NULL && errlen > 0) {
            snprintf(err, errlen, "messages must not be empty");
        }
        return MOE_EINVAL;
    }

    if (chat_template != NULL) {
        moe_jinja_tmpl_t       *tmpl;
        moe_jinja_chat_vars_t   v;
        int                     owned;

        rc = moe_chat_template(chat_template, &tmpl, &owned, err, errlen);
        if (rc != MOE_OK) {
            return rc;
        }
        v.msgs = msgs;
        v.n_msgs = n_msgs;
        v.add_generation_prompt = add_generation_prompt;
        v.bos_token = moe_tokenizer_bos_token(t);
        v.eos_token = moe_tokenizer_eos_token(t);
        rc = moe_jinja_render_chat(tmpl, &v, out, out_len, err, errlen);
        if (owned) {
            moe_jinja_free(tmpl);
        }
        return rc;
    }

    for (i = 0; i < n_msgs && rc == MOE_OK; i++) {
        const char *role = msgs[i].role ? msgs[i].role : "user";

        rc = moe_buf_add(&b, "<|im_start|>", 12);
        if (rc == MOE_OK) rc = moe_buf_add(&b, role, strlen(role));
        if (rc == MOE_OK) rc = moe_buf_add(&b, "\n", 1);
        if (rc == MOE_OK && msgs[i].content != NULL) {
            rc = moe_buf_add(&b, msgs[i].content, msgs[i].content_len);
        }
        if (rc == MOE_OK) rc = moe_buf_add(&b, "<|im_end|>\n", 11);
    }

    if (rc == MOE_OK && add_generation_prompt) {
        rc = moe_buf_add(&b, "<|im_start|>assistant\n", 22);
    }

    if (rc == MOE_OK && b.p == NULL) {
        rc = moe_buf_add(&b, "", 0);
    }

    if (rc != MOE_OK) {
        free(b.p);
        if (err != NULL && errlen > 0) {
            snprintf(err, errlen, "out of memory rendering the chat prompt");
        }
        return rc;
    }

    *out = b.p;
    *out_len = b.len;

    return MOE_OK;
}


/* ---------------------------------------------- prompts with tools (JSON) */

/* ChatML for a model without a template, over the JSON messages */
static const char  moe_chat_chatml[] =
    "{% for m in messages %}<|im_start|>{{ m.role }}\n"
    "{% if m.content is string %}{{ m.content }}{% endif %}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n"
    "{% endif %}";


/* appends s as a JSON string ("..." with escapes), or null for NULL */
static int
moe_chat_json_str(moe_buf_t *b, const char *s)
{
    int    rc;
    char   esc[8];

    if (s == NULL) {
        return moe_buf_add(b, "null", 4);
    }

    rc = moe_buf_add(b, "\"", 1);

    for ( /* void */ ; rc == MOE_OK && *s; s++) {
        unsigned char  c = (unsigned char) *s;

        if (c == '"' || c == '\\') {
            esc[0] = '\\';
            esc[1] = (char) c;
            rc = moe_buf_add(b, esc, 2);

        } else if (c < 0x20) {
            snprintf(esc, sizeof(esc), "\\u%04x", c);
            rc = moe_buf_add(b, esc, 6);

        } else {
            rc = moe_buf_add(b, s, 1);
        }
    }

    return rc == MOE_OK ? moe_buf_add(b, "\"", 1) : rc;
}


int
moe_chat_render_json(const moe_tokenizer_t *t, const char *chat_template,
    const char *messages_json, const char *tools_json,
    int add_generation_prompt, char **out, size_t *out_len, char *err,
    size_t errlen)
{
    int                rc, owned;
    moe_buf_t          b = { NULL, 0, 0 };
    moe_jinja_tmpl_t  *tmpl;
    const char        *bos, *eos;

    if (messages_json == NULL) {
        moe_errf(err, errlen, "messages must not be empty");
        return MOE_EINVAL;
    }

    /* the variables transformers' apply_chat_template passes */
    rc = moe_buf_add(&b, "{\"messages\":", 12);
    if (rc == MOE_OK) rc = moe_buf_add(&b, messages_json,
                                       strlen(messages_json));
    if (rc == MOE_OK) rc = moe_buf_add(&b, ",\"tools\":", 9);
    if (rc == MOE_OK) rc = tools_json
                           ? moe_buf_add(&b, tools_json, strlen(tools_json))
                           : moe_buf_add(&b, "null", 4);
    if (rc == MOE_OK) rc = moe_buf_add(&b, ",\"documents\":null", 17);
    if (rc == MOE_OK) rc = add_generation_prompt
            ? moe_buf_add(&b, ",\"add_generation_prompt\":true", 29)
            : moe_buf_add(&b, ",\"add_generation_prompt\":false", 30);
    /* a missing bos/eos token stays undefined, as in moe_chat_render() */
    bos = t ? moe_tokenizer_bos_token(t) : NULL;
    eos = t ? moe_tokenizer_eos_token(t) : NULL;
    if (rc == MOE_OK && bos) rc = moe_buf_add(&b, ",\"bos_token\":", 13);
    if (rc == MOE_OK && bos) rc = moe_chat_json_str(&b, bos);
    if (rc == MOE_OK && eos) rc = moe_buf_add(&b, ",\"eos_token\":", 13);
    if (rc == MOE_OK && eos) rc = moe_chat_json_str(&b, eos);
    if (rc == MOE_OK) rc = moe_buf_add(&b, "}", 1);

    if (rc != MOE_OK) {
        free(b.p);
        moe_errf(err, errlen, "out of memory rendering the chat prompt");
        return rc;
    }

    rc = moe_chat_template(chat_template ? chat_template : moe_chat_chatml,
                           &tmpl, &owned, err, errlen);
    if (rc == MOE_OK) {
        rc = moe_jinja_render_json(tmpl, b.p, out, out_len, err, errlen);
        if (owned) {
            moe_jinja_free(tmpl);
        }
    }

    free(b.p);

    return rc;
}
