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
