/*
 * Chat prompts.  Until the Jinja-subset interpreter lands, every model is
 * prompted in ChatML; a model that ships its own chat_template is logged
 * once at load time (engine.c) so the difference is visible.
 */

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "moe.h"

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


int
moe_chat_render(const moe_tokenizer_t *t, const char *chat_template,
    const moe_chat_msg_t *msgs, int n_msgs, int add_generation_prompt,
    char **out, size_t *out_len, char *err, size_t errlen)
{
    int        i, rc = MOE_OK;
    moe_buf_t  b = { NULL, 0, 0 };

    (void) t;
    (void) chat_template;

    if (n_msgs < 1) {
        if (err != NULL && errlen > 0) {
            snprintf(err, errlen, "messages must not be empty");
        }
        return MOE_EINVAL;
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
