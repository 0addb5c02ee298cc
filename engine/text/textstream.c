/*
 * Text streams: incremental detokenization plus stop strings.
 *
 * Text that could still turn out to be the start of a stop string is held
 * back; everything before it is final and handed out.  A stop string is
 * searched for across token boundaries because the held back text is kept
 * at the front of `pending`.
 */

#include <stdlib.h>
#include <string.h>

#include "moe.h"

struct moe_textstream {
    moe_detok_t  *detok;
    char         *stops[MOE_MAX_STOP];
    size_t        stop_len[MOE_MAX_STOP];
    int           n_stops;
    size_t        max_stop;
    char         *pending;     /* final text not yet handed out */
    size_t        pending_len;
    size_t        pending_cap;
    char         *out;         /* what the last call handed out */
    size_t        out_cap;
    int           stopped;
};


moe_textstream_t *
moe_textstream_create(const moe_tokenizer_t *t, const char *const *stops,
    int n_stops, int skip_special_tokens)
{
    int                i;
    moe_textstream_t  *s;

    if (n_stops < 0 || n_stops > MOE_MAX_STOP) {
        return NULL;
    }

    s = calloc(1, sizeof(*s));
    if (s == NULL) {
        return NULL;
    }

    s->detok = moe_detok_create(t, skip_special_tokens);
    if (s->detok == NULL) {
        free(s);
        return NULL;
    }

    for (i = 0; i < n_stops; i++) {
        if (stops[i] == NULL || stops[i][0] == '\0') {
            continue;
        }

        s->stops[s->n_stops] = strdup(stops[i]);
        if (s->stops[s->n_stops] == NULL) {
            moe_textstream_free(s);
            return NULL;
        }

        s->stop_len[s->n_stops] = strlen(stops[i]);
        if (s->stop_len[s->n_stops] > s->max_stop) {
            s->max_stop = s->stop_len[s->n_stops];
        }

        s->n_stops++;
    }

    return s;
}


void
moe_textstream_free(moe_textstream_t *s)
{
    int  i;

    if (s == NULL) {
        return;
    }

    moe_detok_free(s->detok);
    for (i = 0; i < s->n_stops; i++) {
        free(s->stops[i]);
    }
    free(s->pending);
    free(s->out);
    free(s);
}


/* Move the first n bytes of pending to out. */
static int
moe_textstream_emit(moe_textstream_t *s, size_t n, const char **text,
    size_t *len)
{
    if (n + 1 > s->out_cap) {
        char *p = realloc(s->out, n + 1);

        if (p == NULL) {
            return MOE_ENOMEM;
        }
        s->out = p;
        s->out_cap = n + 1;
    }

    if (n > 0) {
        memcpy(s->out, s->pending, n);
        memmove(s->pending, s->pending + n, s->pending_len - n);
        s->pending_len -= n;
    }

    s->out[n] = '\0';
    *text = s->out;
    *len = n;

    return MOE_OK;
}


/* Length of the longest suffix of pending that is a proper prefix of a
 * stop string: that much must wait for more text. */
static size_t
moe_textstream_holdback(const moe_textstream_t *s)
{
    int     i;
    size_t  k, best = 0;

    for (i = 0; i < s->n_stops; i++) {
        for (k = s->stop_len[i] - 1; k > best; k--) {
            if (k <= s->pending_len
                && memcmp(s->pending + s->pending_len - k, s->stops[i], k)
                   == 0)
            {
                best = k;
                break;
            }
        }
    }

    return best;
}


int
moe_textstream_push(moe_textstream_t *s, int32_t id, const char **text,
    size_t *len, int *stopped)
{
    int     rc, i;
    size_t  old_len, from, first = (size_t) -1;
    char   *hit;

    *stopped = s->stopped;
    if (s->stopped) {
        return moe_textstream_emit(s, 0, text, len);
    }

    old_len = s->pending_len;
    rc = moe_detok_push(s->detok, id, &s->pending, &s->pending_len,
                        &s->pending_cap);
    if (rc != MOE_OK) {
        return rc;
    }

    if (s->n_stops == 0) {
        return moe_textstream_emit(s, s->pending_len, text, len);
    }

    /* a new match must end inside the new text */
    from = old_len >= s->max_stop ? old_len - s->max_stop + 1 : 0;

    for (i = 0; i < s->n_stops; i++) {
        hit = memmem(s->pending + from, s->pending_len - from, s->stops[i],
                     s->stop_len[i]);
        if (hit != NULL && (size_t) (hit - s->pending) < first) {
            first = (size_t) (hit - s->pending);
        }
    }

    if (first != (size_t) -1) {
        s->stopped = 1;
        *stopped = 1;
        rc = moe_textstream_emit(s, first, text, len);
        s->pending_len = 0;
        return rc;
    }

    return moe_textstream_emit(s, s->pending_len - moe_textstream_holdback(s),
                               text, len);
}


int
moe_textstream_finish(moe_textstream_t *s, const char **text, size_t *len)
{
    int  rc;

    if (s->stopped) {
        return moe_textstream_emit(s, 0, text, len);
    }

    rc = moe_detok_flush(s->detok, &s->pending, &s->pending_len,
                         &s->pending_cap);
    if (rc != MOE_OK) {
        return rc;
    }

    return moe_textstream_emit(s, s->pending_len, text, len);
}
