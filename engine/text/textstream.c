/*
 * Text streams: incremental detokenization plus stop strings.
 *
 * Text that could still turn out to be the start of a stop string is held
 * back; everything before it is final and handed out.  A stop string is
 * searched for across token boundaries because the held back text is kept
 * at the front of `pending`.
 *
 * Each stop string is matched by a Knuth-Morris-Pratt automaton fed only
 * the new text of each push: its state (the longest end of the text that
 * begins the stop string) is also how much must be held back.  Searching
 * the held back text again at every push cost the stop string's length
 * per token, and a client chooses that length (a 100 KB stop string made
 * 20000 tokens take 1.1 s of the nginx worker's event loop).
 */

#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "moe.h"

struct moe_textstream {
    moe_detok_t  *detok;
    char         *stops[MOE_MAX_STOP];
    size_t        stop_len[MOE_MAX_STOP];
    size_t       *fail[MOE_MAX_STOP];    /* (stop_len) KMP failure links */
    size_t        match[MOE_MAX_STOP];   /* bytes of stop i the text ends
                                            with (< stop_len) */
    int           n_stops;
    char         *pending;     /* final text not yet handed out */
    size_t        pending_len;
    size_t        pending_cap;
    char         *out;         /* what the last call handed out */
    size_t        out_cap;
    int           stopped;
};


/* fail[k]: the longest proper border of stop[0 .. k] (KMP) */
static void
moe_textstream_kmp(const char *stop, size_t n, size_t *fail)
{
    size_t  k, b = 0;

    fail[0] = 0;
    for (k = 1; k < n; k++) {
        while (b > 0 && stop[k] != stop[b]) {
            b = fail[b - 1];
        }
        if (stop[k] == stop[b]) {
            b++;
        }
        fail[k] = b;
    }
}


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
        s->fail[s->n_stops] = malloc(sizeof(size_t)
                                     * s->stop_len[s->n_stops]);
        if (s->fail[s->n_stops] == NULL) {
            free(s->stops[s->n_stops]);
            moe_textstream_free(s);
            return NULL;
        }
        moe_textstream_kmp(s->stops[s->n_stops], s->stop_len[s->n_stops],
                           s->fail[s->n_stops]);

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
        free(s->fail[i]);
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


/*
 * Feed pending[from ..] to stop i's automaton: the offset in pending
 * where the first whole match starts, or SIZE_MAX (s->match[i] then the
 * bytes of the stop string the text ends with).
 */
static size_t
moe_textstream_scan(moe_textstream_t *s, int i, size_t from)
{
    const char  *stop = s->stops[i];
    size_t       m = s->match[i], k;

    for (k = from; k < s->pending_len; k++) {
        while (m > 0 && s->pending[k] != stop[m]) {
            m = s->fail[i][m - 1];
        }
        if (s->pending[k] == stop[m]) {
            m++;
        }
        if (m == s->stop_len[i]) {
            return k + 1 - m;
        }
    }
    s->match[i] = m;
    return SIZE_MAX;
}


int
moe_textstream_push(moe_textstream_t *s, int32_t id, const char **text,
    size_t *len, int *stopped)
{
    int     rc, i;
    size_t  old_len, at, first = SIZE_MAX, hold = 0;

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

    /* a new match ends inside the new text; the earliest one wins */
    for (i = 0; i < s->n_stops; i++) {
        at = moe_textstream_scan(s, i, old_len);
        if (at < first) {
            first = at;
        }
        if (s->match[i] > hold) {
            hold = s->match[i];
        }
    }

    if (first != SIZE_MAX) {
        s->stopped = 1;
        *stopped = 1;
        rc = moe_textstream_emit(s, first, text, len);
        s->pending_len = 0;
        return rc;
    }

    /* what may begin a stop string waits (the automata's states) */
    return moe_textstream_emit(s, s->pending_len - hold, text, len);
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
