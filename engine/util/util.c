/*
 * Status strings, logging, file reading and parameter defaults shared by the
 * engine.
 */

#include <errno.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "moe.h"
#include "util/json.h"

static moe_log_fn  moe_log_sink;
static void       *moe_log_ctx;


const char *
moe_strerror(int status)
{
    switch (status) {
    case MOE_OK:           return "ok";
    case MOE_EINVAL:       return "invalid argument";
    case MOE_ENOMEM:       return "out of memory";
    case MOE_EFULL:        return "queue full";
    case MOE_EIO:          return "i/o error";
    case MOE_EFORMAT:      return "malformed file";
    case MOE_EUNSUPPORTED: return "not supported";
    case MOE_ETOOLONG:     return "input too long";
    case MOE_ESTATE:       return "invalid state";
    case MOE_EBACKEND:     return "backend failure";
    default:               return "unknown error";
    }
}


void
moe_set_log(moe_log_fn fn, void *ctx)
{
    moe_log_ctx = ctx;
    moe_log_sink = fn;
}


void
moe_log(int level, const char *fmt, ...)
{
    char     buf[1024];
    va_list  ap;

    va_start(ap, fmt);
    vsnprintf(buf, sizeof(buf), fmt, ap);
    va_end(ap);

    if (moe_log_sink != NULL) {
        moe_log_sink(moe_log_ctx, level, buf);
        return;
    }

    static const char *names[] = { "error", "warn", "info", "debug" };
    fprintf(stderr, "moe [%s] %s\n",
            names[level < 0 ? 0 : level > 3 ? 3 : level], buf);
}


void
moe_errf(char *err, size_t errlen, const char *fmt, ...)
{
    va_list  ap;

    if (err == NULL || errlen == 0) {
        return;
    }

    va_start(ap, fmt);
    vsnprintf(err, errlen, fmt, ap);
    va_end(ap);
}


char *
moe_read_file(const char *path, size_t *len)
{
    FILE  *fp;
    char  *buf;
    long   n;

    fp = fopen(path, "rb");
    if (fp == NULL) {
        return NULL;
    }
    buf = NULL;
    if (fseek(fp, 0, SEEK_END) == 0 && (n = ftell(fp)) >= 0
        && fseek(fp, 0, SEEK_SET) == 0)
    {
        buf = malloc((size_t) n + 1);
        if (buf != NULL) {
            if (fread(buf, 1, (size_t) n, fp) != (size_t) n) {
                free(buf);
                buf = NULL;
                errno = EIO;
            } else {
                buf[n] = '\0';
                if (len != NULL) {
                    *len = (size_t) n;
                }
            }
        }
    }
    fclose(fp);
    return buf;
}


void
moe_sampling_defaults(moe_sampling_t *sp)
{
    memset(sp, 0, sizeof(*sp));
    sp->temperature = 1.0f;
    sp->top_p = 1.0f;
    sp->top_k = 0;
    sp->min_p = 0.0f;
    sp->repetition_penalty = 1.0f;
    sp->max_tokens = 16;
}


/* 1 when text nests arrays / objects deeper than max outside strings */
static int
moe_json_too_deep(const char *text, int max)
{
    const char  *p;
    int          depth = 0, in_str = 0;

    for (p = text; *p != '\0'; p++) {
        if (in_str) {
            if (*p == '\\' && p[1] != '\0') {
                p++;
            } else if (*p == '"') {
                in_str = 0;
            }
        } else if (*p == '"') {
            in_str = 1;
        } else if (*p == '[' || *p == '{') {
            if (++depth > max) {
                return 1;
            }
        } else if ((*p == ']' || *p == '}') && depth > 0) {
            depth--;
        }
    }
    return 0;
}


yajl_val
moe_json_parse(const char *text, char *msg, size_t msglen)
{
    yajl_val  v;
    char     *nl;

    if (msg != NULL && msglen > 0) {
        msg[0] = '\0';
    }
    if (moe_json_too_deep(text, MOE_JSON_MAX_DEPTH)) {
        moe_errf(msg, msglen, "nested deeper than %d levels",
                 MOE_JSON_MAX_DEPTH);
        return NULL;
    }
    v = yajl_tree_parse(text, msg, msglen);
    if (v == NULL && msg != NULL && msglen > 0) {
        for (nl = msg; *nl; nl++) {      /* yajl adds a context dump */
            if (*nl == '\n' || *nl == '\r') {
                *nl = ' ';
            }
        }
    }
    return v;
}


yajl_val
moe_json_get(const struct yajl_val_s *obj, const char *key)
{
    size_t i;

    if (obj == NULL || !YAJL_IS_OBJECT(obj)) {
        return NULL;
    }
    for (i = 0; i < obj->u.object.len; i++) {
        if (strcmp(obj->u.object.keys[i], key) == 0) {
            return obj->u.object.values[i];
        }
    }
    return NULL;
}
