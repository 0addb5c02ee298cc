/*
 * bench/serve: an OpenAI-streaming load generator for LocalMoE (or any
 * OpenAI-compatible server), measuring the way vLLM's benchmark_serving does:
 * synthetic random prompts of set lengths, Poisson arrivals (or all at once)
 * under an optional concurrency cap, streamed responses timed per event,
 * then TTFT, TPOT, ITL, E2E latency and throughput.
 *
 * Multi-turn conversations (--turns T): --num-prompts conversations, each a
 * system message of --random-input-len words and T user turns; turn t+1
 * is sent when turn t has ended, with turn t's streamed reply as the
 * assistant message, so later turns share their conversation's prefix.
 * The report adds the prefix cache's hits (usage.prompt_tokens_details.
 * cached_tokens over prompt tokens) and TTFT of first vs later turns: run
 * against a router (bench/router.sh) with and without prefix affinity.
 *
 * One thread, non-blocking sockets, epoll; one connection per request
 * (Connection: close), as vLLM's client does, so connect time is inside
 * TTFT.  Every run ends by itself: the request count bounds it, and
 * --timeout seconds end it regardless (requests still open then fail).
 *
 * Exit status: 0 every request succeeded, 2 some failed (the report is still
 * printed and written), 1 usage error or the server could not be reached.
 *
 * Usage: build/bench/serve --help
 */

#include <ctype.h>
#include <errno.h>
#include <fcntl.h>
#include <math.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <signal.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#include <yajl/yajl_tree.h>


#define ERR_LEN       256
#define HDR_MAX       65536
#define ERRBODY_MAX   4096
#define SSE_MAX       (8 << 20)


/* ------------------------------------------------------------- options */

typedef struct {
    char         host[256];
    char         port[16];
    char         prefix[256];      /* path before the endpoint, no '/' end */
    const char  *endpoint;
    const char  *model;
    const char  *json_out;
    const char  *api_key;
    int          num_prompts;
    double       rate;             /* requests/s; INFINITY: all at once */
    int          max_conc;         /* 0: no cap */
    int          in_len;
    int          out_len;
    double       range_ratio;
    uint64_t     seed;
    int          ignore_eos;
    const char  *extra;            /* --extra-json: members added to every
                                      request body, or NULL */
    int          token_ids;
    int          vocab_min;
    int          vocab_max;        /* 0: ask the server */
    int          warmup;
    double       temperature;
    double       timeout;          /* whole run, seconds */
    int          chat;
    int          quiet;
    int          turns;            /* per conversation; 1: single requests */
    int          turn_len;         /* words of each later user message */
} opts_t;


/* ------------------------------------------------------------- requests */

typedef struct req_s {
    int        in_len;             /* requested prompt tokens */
    int        out_len;            /* requested max_tokens */
    char      *http;               /* the whole HTTP request */
    size_t     http_len;

    int        started, finished, ok;
    double     arrival;            /* scheduled, s after the phase start */
    double     t_start;            /* absolute monotonic s */
    double     t_first;            /* first content event; 0: none */
    double     t_last;
    double     t_end;
    double    *itl;                /* (n_itl) s between content events */
    int        n_itl, cap_itl;
    int        n_events;           /* content-bearing events */
    long       usage_out;          /* usage.completion_tokens; -1: none */
    long       usage_in;           /* usage.prompt_tokens; -1: none */
    char       err[ERR_LEN];

    /* multi-turn (--turns): built when the previous turn has ended */
    int        conv, turn;         /* conversation, turn (0-based) */
    struct req_s *prev;            /* the previous turn; NULL: the first */
    char      *user;               /* this turn's user message, JSON-escaped */
    char      *sys;                /* first turn: the system message, same */
    char      *reply;              /* streamed assistant text, raw */
    size_t     reply_len, reply_cap;
    long       usage_cached;       /* cached_tokens; -1: none */
} req_t;


/* ---------------------------------------------------------- connections */

enum { ST_CONNECT, ST_HEAD, ST_BODY, ST_DONE };
enum { CS_SIZE, CS_DATA, CS_DATA_END, CS_TRAILER, CS_END };

typedef struct {
    int        fd;
    req_t     *r;
    int        sse;                /* 1: SSE stream; 0: collect the body */
    int        state;
    size_t     woff;

    char      *hbuf;               /* response head until CRLFCRLF */
    size_t     hlen, hcap;
    int        status;
    int        chunked;
    long long  clen;               /* -1: until EOF */
    long long  got;

    int        cstate;             /* chunk decoder */
    long long  crem;
    char       cline[128];
    size_t     cline_len;

    char      *sbuf;               /* SSE bytes not yet split in lines */
    size_t     slen, scap;
    char      *data;               /* data: lines of the pending event */
    size_t     dlen, dcap;
    int        have_data;
    int        done_seen;
    int        sse_error;

    char      *body;               /* collected body (non-SSE, errors) */
    size_t     blen, bcap, bmax;
} conn_t;


static opts_t               o;
static struct sockaddr_storage  peer;
static socklen_t            peer_len;
static int                  ep = -1;


static double
now_s(void)
{
    struct timespec  ts;

    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double) ts.tv_sec + (double) ts.tv_nsec * 1e-9;
}


_Noreturn static void
die(const char *fmt, ...)
{
    va_list  ap;

    fputs("bench/serve: error: ", stderr);
    va_start(ap, fmt);
    vfprintf(stderr, fmt, ap);
    va_end(ap);
    fputc('\n', stderr);
    exit(1);
}


static void *
xrealloc(void *p, size_t n)
{
    p = realloc(p, n ? n : 1);
    if (p == NULL) {
        die("out of memory (%zu bytes)", n);
    }
    return p;
}


/* appends n bytes to a growable buffer */

static void
buf_add(char **b, size_t *len, size_t *cap, const char *s, size_t n)
{
    if (*len + n + 1 > *cap) {
        size_t  c = *cap ? *cap : 256;

        while (c < *len + n + 1) {
            c *= 2;
        }
        *b = xrealloc(*b, c);
        *cap = c;
    }
    memcpy(*b + *len, s, n);
    *len += n;
    (*b)[*len] = '\0';
}


static void
buf_printf(char **b, size_t *len, size_t *cap, const char *fmt, ...)
{
    char     tmp[512];
    int      n;
    va_list  ap;

    va_start(ap, fmt);
    n = vsnprintf(tmp, sizeof(tmp), fmt, ap);
    va_end(ap);
    if (n < 0 || (size_t) n >= sizeof(tmp)) {
        die("internal: formatted piece too long");
    }
    buf_add(b, len, cap, tmp, (size_t) n);
}


/* a JSON string literal of s (quotes included) */

static void
buf_json_str(char **b, size_t *len, size_t *cap, const char *s)
{
    char  esc[8];

    buf_add(b, len, cap, "\"", 1);
    for (; *s; s++) {
        unsigned char  c = (unsigned char) *s;

        if (c == '"' || c == '\\') {
            esc[0] = '\\';
            esc[1] = (char) c;
            buf_add(b, len, cap, esc, 2);
        } else if (c < 0x20) {
            snprintf(esc, sizeof(esc), "\\u%04x", c);
            buf_add(b, len, cap, esc, 6);
        } else {
            buf_add(b, len, cap, (const char *) &c, 1);
        }
    }
    buf_add(b, len, cap, "\"", 1);
}


/* ------------------------------------------------------------------ rng */

/* splitmix64: the same stream for a seed on every machine */

static uint64_t  rng_s;

static uint64_t
rng_next(void)
{
    uint64_t  z = (rng_s += 0x9e3779b97f4a7c15ULL);

    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
    return z ^ (z >> 31);
}


/* uniform in [0, 1) */

static double
rng_unif(void)
{
    return (double) (rng_next() >> 11) * (1.0 / 9007199254740992.0);
}


/* uniform integer in [lo, hi] */

static long
rng_int(long lo, long hi)
{
    return lo + (long) (rng_next() % (uint64_t) (hi - lo + 1));
}


/* ----------------------------------------------------- the prompt set */

static const char *words[] = {
    "the", "of", "and", "to", "in", "a", "is", "that", "for", "it", "as",
    "was", "with", "be", "by", "on", "not", "he", "this", "are", "or", "his",
    "from", "at", "which", "but", "have", "an", "had", "they", "you", "were",
    "their", "one", "all", "we", "can", "her", "has", "there", "been", "if",
    "more", "when", "will", "would", "who", "so", "no", "light", "water",
    "river", "stone", "house", "king", "city", "field", "voice", "hand",
};


/* builds the HTTP request of r (lengths already drawn) */

static void http_wrap(req_t *r, char *b, size_t bl);


static void
build_request(req_t *r, int i)
{
    char    *b = NULL;
    size_t   bl = 0, bc = 0;
    int      k;

    buf_add(&b, &bl, &bc, "{\"model\":", 9);
    buf_json_str(&b, &bl, &bc, o.model);

    if (o.chat) {
        buf_add(&b, &bl, &bc, ",\"messages\":[{\"role\":\"user\",\"content\":\"",
                strlen(",\"messages\":[{\"role\":\"user\",\"content\":\""));
    } else if (o.token_ids) {
        buf_add(&b, &bl, &bc, ",\"prompt\":[", 11);
    } else {
        buf_add(&b, &bl, &bc, ",\"prompt\":\"", 11);
    }

    /* a distinct head per request so prefix caching cannot share prompts */
    for (k = 0; k < r->in_len; k++) {
        if (!o.chat && o.token_ids) {
            buf_printf(&b, &bl, &bc, "%s%ld", k ? "," : "",
                       rng_int(o.vocab_min, o.vocab_max - 1));
        } else if (k == 0) {
            buf_printf(&b, &bl, &bc, "%d", i);
        } else {
            buf_printf(&b, &bl, &bc, " %s",
                       words[rng_next() % (sizeof(words) / sizeof(words[0]))]);
        }
    }

    if (o.chat) {
        buf_add(&b, &bl, &bc, "\"}]", 3);
    } else {
        buf_add(&b, &bl, &bc, o.token_ids ? "]" : "\"", 1);
    }

    buf_printf(&b, &bl, &bc, ",\"max_tokens\":%d,\"temperature\":%g"
               ",\"stream\":true,\"ignore_eos\":%s"
               ",\"stream_options\":{\"include_usage\":true}",
               r->out_len, o.temperature, o.ignore_eos ? "true" : "false");
    if (o.extra != NULL) {      /* any length: not through the printf */
        buf_add(&b, &bl, &bc, ",", 1);
        buf_add(&b, &bl, &bc, o.extra, strlen(o.extra));
    }
    buf_add(&b, &bl, &bc, "}", 1);

    http_wrap(r, b, bl);
}


/* r->http: the request head and the JSON body b (bl bytes, freed here) */

static void
http_wrap(req_t *r, char *b, size_t bl)
{
    char    *h = NULL;
    size_t   hl = 0, hc = 0;

    buf_printf(&h, &hl, &hc, "POST %s%s HTTP/1.1\r\nHost: %s:%s\r\n",
               o.prefix, o.endpoint, o.host, o.port);
    buf_printf(&h, &hl, &hc, "User-Agent: localmoe-bench-serve/1\r\n"
               "Accept: text/event-stream\r\n"
               "Content-Type: application/json\r\n"
               "Content-Length: %zu\r\nConnection: close\r\n", bl);
    if (o.api_key) {
        buf_add(&h, &hl, &hc, "Authorization: Bearer ", 22);
        buf_add(&h, &hl, &hc, o.api_key, strlen(o.api_key));
        buf_add(&h, &hl, &hc, "\r\n", 2);
    }
    buf_add(&h, &hl, &hc, "\r\n", 2);
    buf_add(&h, &hl, &hc, b, bl);
    free(b);

    r->http = h;
    r->http_len = hl;
}


/* lengths uniform in [L*(1-r), L*(1+r)] as vLLM's random dataset */

static req_t *
make_requests(int n, int first_index)
{
    int     i;
    long    ilo, ihi, olo, ohi;
    req_t  *rs;

    rs = calloc((size_t) (n ? n : 1), sizeof(req_t));
    if (rs == NULL) {
        die("out of memory");
    }

    ilo = (long) floor(o.in_len * (1.0 - o.range_ratio));
    ihi = (long) floor(o.in_len * (1.0 + o.range_ratio));
    olo = (long) floor(o.out_len * (1.0 - o.range_ratio));
    ohi = (long) floor(o.out_len * (1.0 + o.range_ratio));
    if (ilo < 1) ilo = 1;
    if (olo < 1) olo = 1;
    if (ihi < ilo) ihi = ilo;
    if (ohi < olo) ohi = olo;

    for (i = 0; i < n; i++) {
        rs[i].in_len = (int) rng_int(ilo, ihi);
        rs[i].out_len = (int) rng_int(olo, ohi);
        rs[i].usage_in = -1;
        rs[i].usage_out = -1;
        rs[i].usage_cached = -1;
        build_request(&rs[i], first_index + i);
    }
    return rs;
}


/* ------------------------------------------------- multi-turn (--turns) */

/* n random words after a head word (JSON-safe text), malloc()ed */

static char *
turn_words(const char *head, int n)
{
    char    *s = NULL;
    size_t   l = 0, c = 0;
    int      k;

    buf_add(&s, &l, &c, head, strlen(head));
    for (k = 0; k < n; k++) {
        buf_printf(&s, &l, &c, " %s",
                   words[rng_next() % (sizeof(words) / sizeof(words[0]))]);
    }
    return s;
}


/*
 * n conversations of o.turns turns each, conversation-major
 * (rs[c * turns + t]).  A conversation: a system message of --random-
 * input-len words headed by its number (distinct across conversations, so
 * only a conversation's own turns share a prefix), then a user message of
 * --turn-len words per turn.  The HTTP request of a later turn is built
 * when the turn before it has ended (build_turn).
 */

static req_t *
make_conversations(int n, int first_conv)
{
    int     c, t, T = o.turns;
    long    olo, ohi;
    char    head[64];
    req_t  *rs, *r;

    rs = calloc((size_t) n * (size_t) T, sizeof(req_t));
    if (rs == NULL) {
        die("out of memory");
    }

    olo = (long) floor(o.out_len * (1.0 - o.range_ratio));
    ohi = (long) floor(o.out_len * (1.0 + o.range_ratio));
    if (olo < 1) olo = 1;
    if (ohi < olo) ohi = olo;

    for (c = 0; c < n; c++) {
        for (t = 0; t < T; t++) {
            r = &rs[c * T + t];
            r->conv = first_conv + c;
            r->turn = t;
            r->prev = t ? r - 1 : NULL;
            r->in_len = o.in_len;
            r->out_len = (int) rng_int(olo, ohi);
            r->usage_in = -1;
            r->usage_out = -1;
            r->usage_cached = -1;
            if (t == 0) {
                snprintf(head, sizeof(head), "Conversation %d.", r->conv);
                r->sys = turn_words(head, o.in_len);
            }
            snprintf(head, sizeof(head), "Turn %d:", t + 1);
            r->user = turn_words(head, o.turn_len);
        }
    }
    return rs;
}


/* the request of turn r: every earlier turn with its reply, then r's */

static void
build_turn(req_t *r)
{
    char          *b = NULL;
    size_t         bl = 0, bc = 0;
    const req_t   *p, *first;
    int            t;

    for (first = r; first->prev; first = first->prev) { /* void */ }

    buf_add(&b, &bl, &bc, "{\"model\":", 9);
    buf_json_str(&b, &bl, &bc, o.model);
    buf_add(&b, &bl, &bc, ",\"messages\":[{\"role\":\"system\",\"content\":",
            strlen(",\"messages\":[{\"role\":\"system\",\"content\":"));
    buf_json_str(&b, &bl, &bc, first->sys);
    buf_add(&b, &bl, &bc, "}", 1);

    for (t = 0; t <= r->turn; t++) {
        p = first + t;
        buf_add(&b, &bl, &bc, ",{\"role\":\"user\",\"content\":",
                strlen(",{\"role\":\"user\",\"content\":"));
        buf_json_str(&b, &bl, &bc, p->user);
        buf_add(&b, &bl, &bc, "}", 1);
        if (t < r->turn) {
            buf_add(&b, &bl, &bc, ",{\"role\":\"assistant\",\"content\":",
                    strlen(",{\"role\":\"assistant\",\"content\":"));
            buf_json_str(&b, &bl, &bc, p->reply ? p->reply : "");
            buf_add(&b, &bl, &bc, "}", 1);
        }
    }

    buf_printf(&b, &bl, &bc, "],\"max_tokens\":%d,\"temperature\":%g"
               ",\"stream\":true,\"ignore_eos\":%s"
               ",\"stream_options\":{\"include_usage\":true}",
               r->out_len, o.temperature, o.ignore_eos ? "true" : "false");
    if (o.extra != NULL) {      /* any length: not through the printf */
        buf_add(&b, &bl, &bc, ",", 1);
        buf_add(&b, &bl, &bc, o.extra, strlen(o.extra));
    }
    buf_add(&b, &bl, &bc, "}", 1);

    http_wrap(r, b, bl);
}


/* 1: r may start now (rel s after the phase start); 0: not yet; -1:
 * never (an earlier turn of its conversation failed) */

static int
turn_ready(const req_t *r, double rel)
{
    if (r->prev == NULL) {
        return r->arrival <= rel;
    }
    if (!r->prev->finished) {
        return 0;
    }
    return r->prev->ok ? 1 : -1;
}


static void
req_free(req_t *r)
{
    free(r->http);
    free(r->itl);
    free(r->user);
    free(r->sys);
    free(r->reply);
}


/* ------------------------------------------------------ response parsing */

static void
req_fail(req_t *r, const char *fmt, ...)
{
    va_list  ap;

    if (r->err[0]) {
        return;                 /* the first reason is the one that counts */
    }
    va_start(ap, fmt);
    vsnprintf(r->err, sizeof(r->err), fmt, ap);
    va_end(ap);
}


/* the message of an OpenAI error object, or the JSON text itself */

static void
error_text(const char *json, char *out, size_t n)
{
    yajl_val     root, v;
    const char  *p1[] = { "error", "message", NULL };
    const char  *p2[] = { "message", NULL };

    root = yajl_tree_parse(json, NULL, 0);
    v = root ? yajl_tree_get(root, p1, yajl_t_string) : NULL;
    if (v == NULL && root) {
        v = yajl_tree_get(root, p2, yajl_t_string);
    }
    snprintf(out, n, "%s", v ? YAJL_GET_STRING(v) : json);
    yajl_tree_free(root);
    for (; *out; out++) {
        if (*out == '\n' || *out == '\r') {
            *out = ' ';
        }
    }
}


/* one complete SSE event's data, seen at time t */

static void
sse_event(conn_t *c, const char *d, double t)
{
    req_t       *r = c->r;
    yajl_val     root, v, ch, txt;
    char         ebuf[200];
    const char  *p_err[] = { "error", NULL };
    const char  *p_ch[] = { "choices", NULL };
    const char  *p_us[] = { "usage", NULL };
    const char  *p_ct[] = { "completion_tokens", NULL };
    const char  *p_pt[] = { "prompt_tokens", NULL };
    const char  *p_cached[] = { "prompt_tokens_details", "cached_tokens",
                                NULL };
    const char  *p_text[] = { "text", NULL };
    const char  *p_delta[] = { "delta", "content", NULL };

    if (strcmp(d, "[DONE]") == 0) {
        c->done_seen = 1;
        return;
    }
    if (c->done_seen) {
        req_fail(r, "event after [DONE]");
        return;
    }

    root = yajl_tree_parse(d, ebuf, sizeof(ebuf));
    if (root == NULL) {
        req_fail(r, "event is not JSON: %.80s", d);
        c->sse_error = 1;
        return;
    }

    v = yajl_tree_get(root, p_err, yajl_t_any);
    if (v && !YAJL_IS_NULL(v)) {
        char  msg[200];

        error_text(d, msg, sizeof(msg));
        req_fail(r, "error event: %s", msg);
        c->sse_error = 1;
    }

    v = yajl_tree_get(root, p_ch, yajl_t_array);
    if (v && YAJL_GET_ARRAY(v)->len > 0) {
        ch = YAJL_GET_ARRAY(v)->values[0];
        txt = yajl_tree_get(ch, p_text, yajl_t_string);
        if (txt == NULL) {
            txt = yajl_tree_get(ch, p_delta, yajl_t_string);
        }

        /* a token event carries text; role-only and finish chunks do not */
        if (txt && YAJL_GET_STRING(txt)[0] != '\0') {
            if (r->t_first == 0) {
                r->t_first = t;
            } else {
                if (r->n_itl == r->cap_itl) {
                    r->cap_itl = r->cap_itl ? r->cap_itl * 2 : 64;
                    r->itl = xrealloc(r->itl,
                                      (size_t) r->cap_itl * sizeof(double));
                }
                r->itl[r->n_itl++] = t - r->t_last;
            }
            r->t_last = t;
            r->n_events++;
            if (o.turns > 1) {
                const char  *piece = YAJL_GET_STRING(txt);

                buf_add(&r->reply, &r->reply_len, &r->reply_cap, piece,
                        piece ? strlen(piece) : 0);
            }
        }
    }

    v = yajl_tree_get(root, p_us, yajl_t_object);
    if (v) {
        yajl_val  n;

        n = yajl_tree_get(v, p_ct, yajl_t_number);
        if (n && YAJL_IS_INTEGER(n)) {
            r->usage_out = (long) YAJL_GET_INTEGER(n);
        }
        n = yajl_tree_get(v, p_pt, yajl_t_number);
        if (n && YAJL_IS_INTEGER(n)) {
            r->usage_in = (long) YAJL_GET_INTEGER(n);
        }
        n = yajl_tree_get(v, p_cached, yajl_t_number);
        if (n && YAJL_IS_INTEGER(n)) {
            r->usage_cached = (long) YAJL_GET_INTEGER(n);
        }
    }

    yajl_tree_free(root);
}


/* SSE: lines end in LF (CR before it dropped); a blank line ends an event */

static void
sse_feed(conn_t *c, const char *p, size_t n, double t)
{
    size_t  start = 0, i;

    buf_add(&c->sbuf, &c->slen, &c->scap, p, n);
    if (c->slen > SSE_MAX) {
        req_fail(c->r, "SSE line longer than %d bytes", SSE_MAX);
        c->sse_error = 1;
        c->slen = 0;
        return;
    }

    for (i = 0; i < c->slen; i++) {
        char    *line;
        size_t   len;

        if (c->sbuf[i] != '\n') {
            continue;
        }
        line = c->sbuf + start;
        len = i - start;
        start = i + 1;
        if (len && line[len - 1] == '\r') {
            len--;
        }

        if (len == 0) {
            if (c->have_data) {
                sse_event(c, c->data, t);
            }
            c->have_data = 0;
            c->dlen = 0;
            continue;
        }
        if (len >= 5 && memcmp(line, "data:", 5) == 0) {
            line += 5;
            len -= 5;
            if (len && *line == ' ') {
                line++;
                len--;
            }
            if (c->have_data) {
                buf_add(&c->data, &c->dlen, &c->dcap, "\n", 1);
            }
            buf_add(&c->data, &c->dlen, &c->dcap, line, len);
            c->have_data = 1;
        }
        /* comments (":...") and other fields carry nothing we time */
    }

    memmove(c->sbuf, c->sbuf + start, c->slen - start);
    c->slen -= start;
}


static void
body_feed(conn_t *c, const char *p, size_t n, double t)
{
    c->got += (long long) n;
    if (c->sse && c->status == 200) {
        sse_feed(c, p, n, t);
        return;
    }
    if (c->blen < c->bmax) {
        size_t  k = n < c->bmax - c->blen ? n : c->bmax - c->blen;

        buf_add(&c->body, &c->blen, &c->bcap, p, k);
    }
}


/* chunked transfer decoding, any split of the input; -1 on bad framing */

static int
chunked_feed(conn_t *c, const char *p, size_t n, double t)
{
    while (n > 0 && c->cstate != CS_END) {
        switch (c->cstate) {

        case CS_SIZE:
        case CS_TRAILER:
            if (*p != '\n') {
                if (c->cline_len + 1 >= sizeof(c->cline)) {
                    return -1;
                }
                c->cline[c->cline_len++] = *p;
                p++;
                n--;
                break;
            }
            p++;
            n--;
            if (c->cline_len && c->cline[c->cline_len - 1] == '\r') {
                c->cline_len--;
            }
            c->cline[c->cline_len] = '\0';

            if (c->cstate == CS_TRAILER) {
                if (c->cline_len == 0) {
                    c->cstate = CS_END;
                }
                c->cline_len = 0;
                break;
            }

            {
                char       *end;
                long long   sz;

                errno = 0;
                sz = strtoll(c->cline, &end, 16);
                if (end == c->cline || errno || sz < 0
                    || (*end != '\0' && *end != ';' && *end != ' '))
                {
                    return -1;
                }
                c->cline_len = 0;
                c->crem = sz;
                c->cstate = sz ? CS_DATA : CS_TRAILER;
            }
            break;

        case CS_DATA:
            {
                size_t  k = (size_t) c->crem < n ? (size_t) c->crem : n;

                body_feed(c, p, k, t);
                p += k;
                n -= k;
                c->crem -= (long long) k;
                if (c->crem == 0) {
                    c->cstate = CS_DATA_END;
                }
            }
            break;

        case CS_DATA_END:
            /* CRLF after the chunk data */
            if (*p == '\r') {
                p++;
                n--;
                break;
            }
            if (*p != '\n') {
                return -1;
            }
            p++;
            n--;
            c->cstate = CS_SIZE;
            break;
        }
    }
    return 0;
}


/* status line and headers (c->hbuf, NUL-terminated); 0 ok, -1 bad */

static int
head_parse(conn_t *c)
{
    char  *line, *next;

    if (sscanf(c->hbuf, "HTTP/1.%*d %d", &c->status) != 1) {
        return -1;
    }
    c->clen = -1;

    for (line = strstr(c->hbuf, "\r\n"); line; line = next) {
        char  *v;

        line += 2;
        next = strstr(line, "\r\n");
        if (next) {
            *next = '\0';
        }
        v = strchr(line, ':');
        if (v == NULL) {
            continue;
        }
        *v++ = '\0';
        while (*v == ' ' || *v == '\t') {
            v++;
        }
        if (strcasecmp(line, "transfer-encoding") == 0
            && strcasestr(v, "chunked"))
        {
            c->chunked = 1;
        } else if (strcasecmp(line, "content-length") == 0) {
            c->clen = strtoll(v, NULL, 10);
        }
        if (next) {
            *next = '\r';
        }
    }
    if (c->chunked) {
        c->clen = -1;
    }
    return 0;
}


/* body bytes after the head; 1 once the response is complete, -1 bad */

static int
conn_body(conn_t *c, const char *p, size_t n, double t)
{
    if (c->chunked) {
        if (chunked_feed(c, p, n, t) < 0) {
            req_fail(c->r, "bad chunked transfer encoding");
            return -1;
        }
        return c->cstate == CS_END;
    }
    if (c->clen >= 0) {
        long long  left = c->clen - c->got;

        if ((long long) n > left) {
            n = (size_t) left;
        }
        body_feed(c, p, n, t);
        return c->got >= c->clen;
    }
    body_feed(c, p, n, t);              /* until EOF */
    return 0;
}


/* bytes from the socket; 1 once the response is complete, -1 bad */

static int
conn_feed(conn_t *c, const char *p, size_t n, double t)
{
    char    *e;
    size_t   from, hend, rest;

    if (c->state == ST_BODY) {
        return conn_body(c, p, n, t);
    }

    from = c->hlen > 3 ? c->hlen - 3 : 0;
    buf_add(&c->hbuf, &c->hlen, &c->hcap, p, n);
    e = memmem(c->hbuf + from, c->hlen - from, "\r\n\r\n", 4);
    if (e == NULL) {
        if (c->hlen > HDR_MAX) {
            req_fail(c->r, "response head longer than %d bytes", HDR_MAX);
            return -1;
        }
        return 0;
    }

    hend = (size_t) (e - c->hbuf) + 4;
    rest = c->hlen - hend;
    *e = '\0';
    if (head_parse(c) < 0) {
        req_fail(c->r, "bad HTTP response: %.60s", c->hbuf);
        return -1;
    }
    c->state = ST_BODY;

    if (c->clen == 0 && !c->chunked) {
        return 1;
    }
    return rest ? conn_body(c, p + (n - rest), rest, t) : 0;
}


/* the response ended at t: judge it */

static void
conn_complete(conn_t *c, double t)
{
    req_t  *r = c->r;
    char    msg[200];

    r->t_end = t;

    if (c->status != 200) {
        error_text(c->body ? c->body : "", msg, sizeof(msg));
        req_fail(r, "HTTP %d: %s", c->status, msg);
        return;
    }
    if (!c->sse) {
        return;
    }
    if (c->have_data) {                 /* an event without its blank line */
        sse_event(c, c->data, t);
        c->have_data = 0;
    }
    if (!c->done_seen) {
        req_fail(r, "stream ended without data: [DONE]");
    }
}


static void
conn_free(conn_t *c)
{
    if (c->fd >= 0) {
        close(c->fd);                   /* also leaves the epoll set */
    }
    free(c->hbuf);
    free(c->sbuf);
    free(c->data);
    free(c->body);
    free(c);
}


static conn_t *
conn_new(req_t *r, int sse, size_t bmax)
{
    conn_t  *c;

    c = calloc(1, sizeof(conn_t));
    if (c == NULL) {
        die("out of memory");
    }
    c->fd = -1;
    c->r = r;
    c->sse = sse;
    c->bmax = bmax;
    c->state = ST_CONNECT;
    c->clen = -1;
    return c;
}


/* socket + non-blocking connect; -1 (reason in r->err) when it fails now */

static int
conn_connect(conn_t *c)
{
    int  fd, one = 1;

    fd = socket(peer.ss_family, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC,
                0);
    if (fd < 0) {
        req_fail(c->r, "socket: %s", strerror(errno));
        return -1;
    }
    c->fd = fd;
    (void) setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));

    if (connect(fd, (struct sockaddr *) &peer, peer_len) < 0
        && errno != EINPROGRESS)
    {
        req_fail(c->r, "connect to %s:%s: %s", o.host, o.port,
                 strerror(errno));
        return -1;
    }
    return 0;
}


/*
 * Progress on a connection after a readiness event.  Returns 1 when the
 * request is over (complete or failed: r->finished, r->err), else 0.
 */

static int
conn_io(conn_t *c, uint32_t events)
{
    char     buf[65536];
    req_t   *r = c->r;
    ssize_t  k;
    double   t;
    int      err, rc;

    if (c->state == ST_CONNECT) {
        socklen_t  len = sizeof(err);

        err = 0;
        if (getsockopt(c->fd, SOL_SOCKET, SO_ERROR, &err, &len) < 0) {
            err = errno;
        }
        if (err) {
            req_fail(r, "connect to %s:%s: %s", o.host, o.port,
                     strerror(err));
            goto over;
        }
        if (!(events & (EPOLLOUT | EPOLLERR | EPOLLHUP))) {
            return 0;
        }

        while (c->woff < r->http_len) {
            k = send(c->fd, r->http + c->woff, r->http_len - c->woff,
                     MSG_NOSIGNAL);
            if (k < 0) {
                if (errno == EINTR) {
                    continue;
                }
                if (errno == EAGAIN || errno == EWOULDBLOCK) {
                    return 0;
                }
                /* the server may have answered early (413...): read it */
                req_fail(r, "send: %s", strerror(errno));
                break;
            }
            c->woff += (size_t) k;
        }

        c->state = ST_HEAD;
        if (ep >= 0) {
            struct epoll_event  ev = { .events = EPOLLIN, .data.ptr = c };

            (void) epoll_ctl(ep, EPOLL_CTL_MOD, c->fd, &ev);
        }
        if (!(events & (EPOLLIN | EPOLLHUP | EPOLLERR)) && !r->err[0]) {
            return 0;
        }
    }

    for ( ;; ) {
        k = recv(c->fd, buf, sizeof(buf), 0);
        t = now_s();

        if (k > 0) {
            rc = conn_feed(c, buf, (size_t) k, t);
            if (rc < 0) {
                goto over;
            }
            if (rc == 1) {
                conn_complete(c, t);
                goto over;
            }
            continue;
        }
        if (k == 0) {
            if (c->state == ST_BODY && !c->chunked && c->clen < 0) {
                conn_complete(c, t);
            } else {
                req_fail(r, "connection closed before the response ended"
                         " (%s)", c->state == ST_BODY ? "in the body"
                                                      : "no response head");
            }
            goto over;
        }
        if (errno == EINTR) {
            continue;
        }
        if (errno == EAGAIN || errno == EWOULDBLOCK) {
            return 0;
        }
        req_fail(r, "recv: %s", strerror(errno));
        goto over;
    }

over:

    if (r->t_end == 0) {
        r->t_end = now_s();
    }
    r->finished = 1;
    r->ok = r->err[0] == '\0';
    return 1;
}


/* ------------------------------------------------------ one plain request */

/*
 * A blocking request (the model list, the vocabulary probe) with a timeout.
 * Returns the HTTP status, the body in *out (caller frees); 0 and the reason
 * in err when there was no HTTP answer.
 */

static int
http_simple(const char *method, const char *path, const char *json,
    char **out, char *err, size_t errlen, double timeout)
{
    req_t    r;
    conn_t  *c;
    char    *h = NULL;
    size_t   hl = 0, hc = 0;
    double   deadline = now_s() + timeout;
    int      status;

    memset(&r, 0, sizeof(r));
    buf_printf(&h, &hl, &hc, "%s %s%s HTTP/1.1\r\nHost: %s:%s\r\n"
               "User-Agent: localmoe-bench-serve/1\r\nConnection: close\r\n",
               method, o.prefix, path, o.host, o.port);
    if (o.api_key) {
        buf_add(&h, &hl, &hc, "Authorization: Bearer ", 22);
        buf_add(&h, &hl, &hc, o.api_key, strlen(o.api_key));
        buf_add(&h, &hl, &hc, "\r\n", 2);
    }
    if (json) {
        buf_printf(&h, &hl, &hc, "Content-Type: application/json\r\n"
                   "Content-Length: %zu\r\n", strlen(json));
    }
    buf_add(&h, &hl, &hc, "\r\n", 2);
    if (json) {
        buf_add(&h, &hl, &hc, json, strlen(json));
    }
    r.http = h;
    r.http_len = hl;

    c = conn_new(&r, 0, 1 << 20);
    if (conn_connect(c) == 0) {
        while (!r.finished) {
            struct pollfd  pfd = { .fd = c->fd };
            double         left = deadline - now_s();
            int            n;

            if (left <= 0) {
                req_fail(&r, "no answer within %.0f s", timeout);
                break;
            }
            pfd.events = c->state == ST_CONNECT ? POLLOUT : POLLIN;
            n = poll(&pfd, 1, (int) ceil(left * 1000));
            if (n < 0 && errno != EINTR) {
                req_fail(&r, "poll: %s", strerror(errno));
                break;
            }
            if (n > 0) {
                uint32_t  ev = 0;

                ev |= (pfd.revents & POLLIN) ? EPOLLIN : 0;
                ev |= (pfd.revents & POLLOUT) ? EPOLLOUT : 0;
                ev |= (pfd.revents & POLLERR) ? EPOLLERR : 0;
                ev |= (pfd.revents & POLLHUP) ? EPOLLHUP : 0;
                (void) conn_io(c, ev);
            }
        }
    }

    /* an HTTP error status is an answer, not a transport failure */
    status = c->state == ST_BODY && r.finished ? c->status : 0;
    snprintf(err, errlen, "%s", r.err);
    *out = c->body ? c->body : strdup("");
    c->body = NULL;
    conn_free(c);
    free(h);
    return status;
}


/* the first model id of GET /v1/models, or o.model when given */

static void
fetch_model(void)
{
    char         err[ERR_LEN], *body;
    int          status;
    yajl_val     root, data, id = NULL;
    const char  *p_data[] = { "data", NULL };
    const char  *p_id[] = { "id", NULL };

    status = http_simple("GET", "/v1/models", NULL, &body, err, sizeof(err),
                         10);
    if (status == 0) {
        die("cannot reach the server at http://%s:%s%s: %s", o.host, o.port,
            o.prefix, err);
    }
    if (o.model) {
        free(body);
        return;
    }
    if (status != 200) {
        die("GET %s/v1/models: HTTP %d: %.200s (pass --model)", o.prefix,
            status, body);
    }
    root = yajl_tree_parse(body, NULL, 0);
    data = root ? yajl_tree_get(root, p_data, yajl_t_array) : NULL;
    if (data == NULL || YAJL_GET_ARRAY(data)->len == 0
        || (id = yajl_tree_get(YAJL_GET_ARRAY(data)->values[0], p_id,
                               yajl_t_string)) == NULL)
    {
        die("GET %s/v1/models: no data[0].id in %.200s (pass --model)",
            o.prefix, body);
    }
    o.model = strdup(id->u.string);
    yajl_tree_free(root);
    free(body);
}


/*
 * --vocab-max not given: LocalMoE answers an out-of-range token id with
 * "prompt token ids must be integers in [0, V)"; read V from that.  Other
 * servers: fall back to 1000 (valid for any real vocabulary) with a note.
 */

static void
probe_vocab(void)
{
    char        *j = NULL, *body, *p, err[ERR_LEN];
    size_t       jl = 0, jc = 0;
    int          status;
    long         v = 0;

    buf_add(&j, &jl, &jc, "{\"model\":", 9);
    buf_json_str(&j, &jl, &jc, o.model);
    buf_printf(&j, &jl, &jc, ",\"prompt\":[2147483647],\"max_tokens\":1}");

    status = http_simple("POST", o.endpoint, j, &body, err, sizeof(err), 30);
    p = status == 400 ? strstr(body, "in [0, ") : NULL;
    if (p) {
        v = strtol(p + 7, NULL, 10);
    }
    if (v > 0) {
        o.vocab_max = (int) v;
    } else {
        o.vocab_max = 1000;
        fprintf(stderr, "bench/serve: note: could not learn the vocabulary "
                "size (HTTP %d); token ids drawn from [%d, 1000): pass "
                "--vocab-max\n", status, o.vocab_min);
    }
    free(body);
    free(j);
}


/* ------------------------------------------------------------ the runs */

/*
 * Runs n requests: request i becomes due at rs[i].arrival seconds after
 * the start and is sent as soon as it is due and fewer than max_conc are
 * open (0: no cap).  Ends when all are over or at the deadline, where open
 * requests fail.  Returns the phase's duration; *peak the most open at once.
 */

static double
run_phase(req_t *rs, int n, int max_conc, double deadline, int *peak)
{
    struct epoll_event   evs[512];
    conn_t             **cs;
    double               t0, t, due;
    int                  next = 0, open = 0, over = 0, i, k, rd;

    cs = calloc((size_t) (n ? n : 1), sizeof(conn_t *));
    if (cs == NULL) {
        die("out of memory");
    }
    *peak = 0;
    t0 = now_s();

    while (over < n) {
        double  wait;
        int     ms;

        t = now_s();
        if (t >= deadline) {
            break;
        }

        /*
         * start what is due, in order; `next` is the first request not
         * started.  Single requests are due by arrival time, in index
         * order; a later turn is due when its previous turn has ended, so
         * with --turns every request not started is looked at.
         */
        for (i = next; i < n && (max_conc == 0 || open < max_conc); i++) {
            req_t   *r = &rs[i];
            conn_t  *c;

            if (r->started) {
                continue;
            }
            rd = turn_ready(r, t - t0);
            if (rd == 0) {
                if (o.turns > 1) {
                    continue;
                }
                break;
            }
            if (rd < 0) {
                r->started = 1;
                r->finished = 1;
                req_fail(r, "an earlier turn of conversation %d failed",
                         r->conv);
                over++;
                continue;
            }
            if (r->http == NULL) {
                build_turn(r);
            }

            c = conn_new(r, 1, ERRBODY_MAX);
            r->started = 1;
            r->t_start = now_s();
            if (conn_connect(c) < 0) {
                r->t_end = now_s();
                r->finished = 1;
                conn_free(c);
                over++;
            } else {
                struct epoll_event  ev = {
                    .events = EPOLLIN | EPOLLOUT, .data.ptr = c
                };

                if (epoll_ctl(ep, EPOLL_CTL_ADD, c->fd, &ev) < 0) {
                    die("epoll_ctl: %s", strerror(errno));
                }
                cs[i] = c;
                open++;
                if (open > *peak) {
                    *peak = open;
                }
            }
        }
        while (next < n && rs[next].started) {
            next++;
        }

        /* the next first turn's arrival (later turns wake on an end) */
        wait = deadline - t;
        for (i = next; i < n && (max_conc == 0 || open < max_conc); i++) {
            if (!rs[i].started && rs[i].prev == NULL) {
                due = rs[i].arrival - (t - t0);
                if (due < wait) {
                    wait = due;
                }
                break;
            }
        }
        ms = wait > 0 ? (int) ceil(wait * 1000) : 0;
        if (open == 0 && over == n) {
            break;
        }

        k = epoll_wait(ep, evs, 512, ms);
        if (k < 0) {
            if (errno == EINTR) {
                continue;
            }
            die("epoll_wait: %s", strerror(errno));
        }
        for (i = 0; i < k; i++) {
            conn_t  *c = evs[i].data.ptr;

            if (conn_io(c, evs[i].events)) {
                cs[c->r - rs] = NULL;
                conn_free(c);
                open--;
                over++;
            }
        }
    }

    t = now_s();
    for (i = 0; i < n; i++) {
        if (cs[i]) {
            req_fail(&rs[i], "timeout: still open after --timeout %.0f s",
                     o.timeout);
            rs[i].t_end = t;
            rs[i].finished = 1;
            conn_free(cs[i]);
        } else if (!rs[i].started) {
            req_fail(&rs[i], "not started before --timeout %.0f s",
                     o.timeout);
            rs[i].finished = 1;
        }
    }
    free(cs);
    return t - t0;
}


/* ------------------------------------------------------------- metrics */

typedef struct {
    double  mean, median, std, p90, p99, min, max;
    int     n;
} stat_t;


static int
cmp_double(const void *a, const void *b)
{
    double  x = *(const double *) a, y = *(const double *) b;

    return x < y ? -1 : x > y;
}


/* numpy's default (linear) percentile of sorted v */

static double
pct(const double *v, int n, double p)
{
    double  rank = p / 100.0 * (n - 1);
    int     lo = (int) floor(rank);

    if (lo >= n - 1) {
        return v[n - 1];
    }
    return v[lo] + (v[lo + 1] - v[lo]) * (rank - lo);
}


/* stats of v (seconds) in milliseconds; sorts v */

static stat_t
stats_ms(double *v, int n)
{
    stat_t  s;
    double  sum = 0, sq = 0;
    int     i;

    s.n = n;
    if (n == 0) {
        s.mean = s.median = s.std = s.p90 = s.p99 = s.min = s.max = NAN;
        return s;
    }
    qsort(v, (size_t) n, sizeof(double), cmp_double);
    for (i = 0; i < n; i++) {
        sum += v[i];
    }
    s.mean = sum / n;
    for (i = 0; i < n; i++) {
        sq += (v[i] - s.mean) * (v[i] - s.mean);
    }
    s.std = sqrt(sq / n) * 1000;
    s.mean *= 1000;
    s.median = pct(v, n, 50) * 1000;
    s.p90 = pct(v, n, 90) * 1000;
    s.p99 = pct(v, n, 99) * 1000;
    s.min = v[0] * 1000;
    s.max = v[n - 1] * 1000;
    return s;
}


static long
out_tokens(const req_t *r)
{
    return r->usage_out >= 0 ? r->usage_out : r->n_events;
}


static long
in_tokens(const req_t *r)
{
    return r->usage_in >= 0 ? r->usage_in : r->in_len;
}


static double
ttft_of(const req_t *r)
{
    return (r->t_first ? r->t_first : r->t_end) - r->t_start;
}


static void
json_num(FILE *f, double x)
{
    if (isfinite(x)) {
        fprintf(f, "%.9g", x);
    } else {
        fputs("null", f);
    }
}


static void
json_stat(FILE *f, const char *name, const stat_t *s)
{
    fprintf(f, ",\n  \"mean_%s_ms\": ", name);
    json_num(f, s->mean);
    fprintf(f, ",\n  \"median_%s_ms\": ", name);
    json_num(f, s->median);
    fprintf(f, ",\n  \"std_%s_ms\": ", name);
    json_num(f, s->std);
    fprintf(f, ",\n  \"p90_%s_ms\": ", name);
    json_num(f, s->p90);
    fprintf(f, ",\n  \"p99_%s_ms\": ", name);
    json_num(f, s->p99);
    fprintf(f, ",\n  \"min_%s_ms\": ", name);
    json_num(f, s->min);
    fprintf(f, ",\n  \"max_%s_ms\": ", name);
    json_num(f, s->max);
}


static void
json_fstr(FILE *f, const char *s)
{
    char    *b = NULL;
    size_t   l = 0, c = 0;

    buf_json_str(&b, &l, &c, s);
    fputs(b, f);
    free(b);
}


/* prints the vLLM-style table and writes --json; returns failed count */

static int
report(req_t *rs, int n, double dur, int peak)
{
    double      *ttft, *tpot, *itl, *e2e;
    int          n_ttft = 0, n_tpot = 0, n_itl = 0, n_e2e = 0, i, j;
    int          ok = 0, failed = 0, mismatch = 0;
    long long    tin = 0, tout = 0;
    const char  *first_err = NULL;
    stat_t       s_ttft, s_tpot, s_itl, s_e2e;
    FILE        *f;
    size_t       total_itl = 0;
    long long    c_in = 0, c_hit = 0;        /* prompt / cached tokens */
    double       t_first = 0, t_later = 0;   /* TTFT sums by turn */
    int          n_first = 0, n_later = 0;

    for (i = 0; i < n; i++) {
        total_itl += (size_t) rs[i].n_itl;
    }
    ttft = calloc((size_t) n + 1, sizeof(double));
    tpot = calloc((size_t) n + 1, sizeof(double));
    e2e = calloc((size_t) n + 1, sizeof(double));
    itl = calloc(total_itl + 1, sizeof(double));
    if (!ttft || !tpot || !e2e || !itl) {
        die("out of memory");
    }

    for (i = 0; i < n; i++) {
        req_t  *r = &rs[i];
        long    out;
        double  e, t1;

        if (!r->ok) {
            failed++;
            if (first_err == NULL) {
                first_err = r->err;
            }
            continue;
        }
        ok++;
        out = out_tokens(r);
        tin += in_tokens(r);
        tout += out;
        if (o.ignore_eos && out != r->out_len) {
            mismatch++;
        }
        e = r->t_end - r->t_start;
        t1 = ttft_of(r);
        e2e[n_e2e++] = e;
        ttft[n_ttft++] = t1;
        if (r->usage_cached >= 0 && r->usage_in >= 0) {
            c_in += r->usage_in;
            c_hit += r->usage_cached;
        }
        if (r->turn == 0) {
            t_first += t1;
            n_first++;
        } else {
            t_later += t1;
            n_later++;
        }
        if (out > 1) {
            tpot[n_tpot++] = (e - t1) / (double) (out - 1);
        }
        for (j = 0; j < r->n_itl; j++) {
            itl[n_itl++] = r->itl[j];
        }
    }

    s_ttft = stats_ms(ttft, n_ttft);
    s_tpot = stats_ms(tpot, n_tpot);
    s_itl = stats_ms(itl, n_itl);
    s_e2e = stats_ms(e2e, n_e2e);

    printf("============ Serving Benchmark Result ============\n");
    printf("%-40s %-10d\n", "Successful requests:", ok);
    printf("%-40s %-10d\n", "Failed requests:", failed);
    if (first_err) {
        printf("%-40s %s\n", "First error:", first_err);
    }
    if (o.max_conc) {
        printf("%-40s %-10d\n", "Maximum request concurrency:", o.max_conc);
    }
    printf("%-40s %-10d\n", "Peak concurrent requests:", peak);
    if (isinf(o.rate)) {
        printf("%-40s %-10s\n", "Request rate (req/s, target):", "inf");
    } else {
        printf("%-40s %-10.2f\n", "Request rate (req/s, target):", o.rate);
    }
    printf("%-40s %-10.2f\n", "Benchmark duration (s):", dur);
    printf("%-40s %-10lld\n", "Total input tokens:", tin);
    printf("%-40s %-10lld\n", "Total generated tokens:", tout);
    if (o.ignore_eos) {
        printf("%-40s %-10d\n", "Output length != max_tokens:", mismatch);
    }
    printf("%-40s %-10.2f\n", "Request throughput (req/s):", ok / dur);
    printf("%-40s %-10.2f\n", "Output token throughput (tok/s):",
           tout / dur);
    printf("%-40s %-10.2f\n", "Total Token throughput (tok/s):",
           (tin + tout) / dur);
    printf("%s\n", "---------------Time to First Token----------------");
    printf("%-40s %-10.2f\n", "Mean TTFT (ms):", s_ttft.mean);
    printf("%-40s %-10.2f\n", "Median TTFT (ms):", s_ttft.median);
    printf("%-40s %-10.2f\n", "P99 TTFT (ms):", s_ttft.p99);
    printf("%s\n", "-----Time per Output Token (excl. 1st token)------");
    printf("%-40s %-10.2f\n", "Mean TPOT (ms):", s_tpot.mean);
    printf("%-40s %-10.2f\n", "Median TPOT (ms):", s_tpot.median);
    printf("%-40s %-10.2f\n", "P99 TPOT (ms):", s_tpot.p99);
    printf("%s\n", "---------------Inter-token Latency----------------");
    printf("%-40s %-10.2f\n", "Mean ITL (ms):", s_itl.mean);
    printf("%-40s %-10.2f\n", "Median ITL (ms):", s_itl.median);
    printf("%-40s %-10.2f\n", "P99 ITL (ms):", s_itl.p99);
    printf("%s\n", "----------------End-to-end Latency----------------");
    printf("%-40s %-10.2f\n", "Mean E2EL (ms):", s_e2e.mean);
    printf("%-40s %-10.2f\n", "Median E2EL (ms):", s_e2e.median);
    printf("%-40s %-10.2f\n", "P99 E2EL (ms):", s_e2e.p99);
    if (o.turns > 1 || c_hit > 0) {
        printf("%s\n", "--------Prefix cache (usage.cached_tokens)--------");
        if (o.turns > 1) {
            printf("%-40s %-10d\n", "Conversations:",
                   n / o.turns);
            printf("%-40s %-10d\n", "Turns per conversation:", o.turns);
        }
        printf("%-40s %-10lld\n", "Prompt tokens (with usage):", c_in);
        printf("%-40s %-10lld\n", "Cached prompt tokens:", c_hit);
        printf("%-40s %-10.2f\n", "Prefix cache hit rate (%):",
               c_in ? 100.0 * (double) c_hit / (double) c_in : 0.0);
        printf("%-40s %-10.2f\n", "Mean TTFT, first turns (ms):",
               n_first ? 1000.0 * t_first / n_first : 0.0);
        printf("%-40s %-10.2f\n", "Mean TTFT, later turns (ms):",
               n_later ? 1000.0 * t_later / n_later : 0.0);
    }
    printf("%s\n", "==================================================");
    fflush(stdout);

    if (o.json_out) {
        f = strcmp(o.json_out, "-") ? fopen(o.json_out, "w") : stdout;
        if (f == NULL) {
            die("cannot write %s: %s", o.json_out, strerror(errno));
        }
        fprintf(f, "{\n  \"backend\": \"openai\",\n  \"base_url\": ");
        {
            char  u[600];

            snprintf(u, sizeof(u), "http://%s:%s%s", o.host, o.port,
                     o.prefix);
            json_fstr(f, u);
        }
        fprintf(f, ",\n  \"endpoint\": ");
        json_fstr(f, o.endpoint);
        fprintf(f, ",\n  \"model_id\": ");
        json_fstr(f, o.model);
        fprintf(f, ",\n  \"num_prompts\": %d,\n  \"request_rate\": ", n);
        if (isinf(o.rate)) {
            fputs("\"inf\"", f);
        } else {
            json_num(f, o.rate);
        }
        fprintf(f, ",\n  \"max_concurrency\": ");
        if (o.max_conc) {
            fprintf(f, "%d", o.max_conc);
        } else {
            fputs("null", f);
        }
        fprintf(f, ",\n  \"random_input_len\": %d,\n  \"random_output_len\":"
                " %d,\n  \"random_range_ratio\": %g,\n  \"seed\": %llu,\n"
                "  \"ignore_eos\": %s,\n  \"prompt_token_ids\": %s,\n"
                "  \"vocab_min\": %d,\n  \"vocab_max\": %d,\n"
                "  \"temperature\": %g,\n  \"warmup\": %d",
                o.in_len, o.out_len, o.range_ratio,
                (unsigned long long) o.seed, o.ignore_eos ? "true" : "false",
                o.token_ids && !o.chat ? "true" : "false", o.vocab_min,
                o.vocab_max, o.temperature, o.warmup);
        fprintf(f, ",\n  \"duration\": ");
        json_num(f, dur);
        fprintf(f, ",\n  \"completed\": %d,\n  \"failed\": %d,\n"
                "  \"max_concurrent_requests\": %d,\n"
                "  \"total_input_tokens\": %lld,\n"
                "  \"total_output_tokens\": %lld,\n"
                "  \"output_len_mismatches\": %d,\n"
                "  \"request_throughput\": ", ok, failed, peak, tin, tout,
                mismatch);
        json_num(f, ok / dur);
        fprintf(f, ",\n  \"output_throughput\": ");
        json_num(f, tout / dur);
        fprintf(f, ",\n  \"total_token_throughput\": ");
        json_num(f, (tin + tout) / dur);
        json_stat(f, "ttft", &s_ttft);
        json_stat(f, "tpot", &s_tpot);
        json_stat(f, "itl", &s_itl);
        json_stat(f, "e2el", &s_e2e);
        fprintf(f, ",\n  \"turns\": %d,\n  \"prompt_tokens_with_usage\": "
                "%lld,\n  \"cached_tokens\": %lld,\n"
                "  \"prefix_cache_hit_rate\": ", o.turns, c_in, c_hit);
        json_num(f, c_in ? (double) c_hit / (double) c_in : 0.0);
        fprintf(f, ",\n  \"mean_ttft_first_turns_ms\": ");
        json_num(f, n_first ? 1000.0 * t_first / n_first : NAN);
        fprintf(f, ",\n  \"mean_ttft_later_turns_ms\": ");
        json_num(f, n_later ? 1000.0 * t_later / n_later : NAN);
        fprintf(f, ",\n  \"first_error\": ");
        if (first_err) {
            json_fstr(f, first_err);
        } else {
            fputs("null", f);
        }

        /* per request, in order; seconds like vLLM's arrays */
        fprintf(f, ",\n  \"input_lens\": [");
        for (i = 0; i < n; i++) {
            fprintf(f, "%s%ld", i ? ", " : "", in_tokens(&rs[i]));
        }
        fprintf(f, "],\n  \"requested_output_lens\": [");
        for (i = 0; i < n; i++) {
            fprintf(f, "%s%d", i ? ", " : "", rs[i].out_len);
        }
        fprintf(f, "],\n  \"output_lens\": [");
        for (i = 0; i < n; i++) {
            fprintf(f, "%s%ld", i ? ", " : "",
                    rs[i].ok ? out_tokens(&rs[i]) : 0);
        }
        fprintf(f, "],\n  \"ttfts\": [");
        for (i = 0; i < n; i++) {
            fputs(i ? ", " : "", f);
            json_num(f, rs[i].ok ? ttft_of(&rs[i]) : NAN);
        }
        fprintf(f, "],\n  \"e2els\": [");
        for (i = 0; i < n; i++) {
            fputs(i ? ", " : "", f);
            json_num(f, rs[i].ok ? rs[i].t_end - rs[i].t_start : NAN);
        }
        fprintf(f, "],\n  \"itls\": [");
        for (i = 0; i < n; i++) {
            fprintf(f, "%s[", i ? ", " : "");
            for (j = 0; j < rs[i].n_itl; j++) {
                fputs(j ? ", " : "", f);
                json_num(f, rs[i].itl[j]);
            }
            fputs("]", f);
        }
        fprintf(f, "],\n  \"errors\": [");
        for (i = 0; i < n; i++) {
            fputs(i ? ", " : "", f);
            json_fstr(f, rs[i].err);
        }
        fprintf(f, "]\n}\n");
        if (f != stdout && fclose(f) != 0) {
            die("cannot write %s: %s", o.json_out, strerror(errno));
        }
    }

    free(ttft);
    free(tpot);
    free(e2e);
    free(itl);
    return failed;
}


/* ---------------------------------------------------------------- main */

static void
usage(FILE *f)
{
    fprintf(f,
"Usage: serve [options]   OpenAI streaming load generator (vLLM's method)\n"
"  --base-url URL          http://HOST:PORT[/PREFIX] (default\n"
"                          http://127.0.0.1:8000); or --host H --port P\n"
"  --endpoint PATH         /v1/completions (default) | /v1/chat/completions\n"
"  --model ID              default: first id of GET /v1/models\n"
"  --num-prompts N         requests in the timed run (default 64)\n"
"  --request-rate R        Poisson arrivals, R req/s; inf (default): all\n"
"                          due at once\n"
"  --max-concurrency C     at most C requests open at once (default: none)\n"
"  --random-input-len I    prompt tokens (default 1024)\n"
"  --random-output-len O   max_tokens (default 128)\n"
"  --random-range-ratio r  lengths uniform in [L(1-r), L(1+r)] (default 0)\n"
"  --seed S                prompts, lengths and arrivals (default 0)\n"
"  --temperature T         (default 0)\n"
"  --ignore-eos | --no-ignore-eos     send ignore_eos (default on)\n"
"  --prompt-token-ids | --prompt-text prompts as random token ids (default;\n"
"                          exact input length) or as text (chat always)\n"
"  --vocab-min A --vocab-max B   token ids in [A, B) (default 0 and the\n"
"                          server's vocabulary size, probed)\n"
"  --warmup K              K untimed requests first (default 0)\n"
"  --timeout S             the whole run ends after S s (default 600)\n"
"  --api-key KEY           Authorization: Bearer (default $OPENAI_API_KEY)\n"
"  --extra-json MEMBERS    JSON members added to every request body, e.g.\n"
"                          '\"response_format\":{\"type\":\"json_object\"}'\n"
"  --turns T               multi-turn: --num-prompts conversations of T\n"
"                          turns (chat only); turn t+1 is sent when turn t\n"
"                          ended, with its reply; the system message has\n"
"                          --random-input-len words (default 1: single\n"
"                          requests)\n"
"  --turn-len W            words per later user message (default 16)\n"
"  --json FILE             machine-readable results (- for stdout)\n"
"  --quiet                 no progress lines on stderr\n"
"Exit: 0 all succeeded, 2 some failed, 1 usage or server unreachable.\n");
}


static void
parse_base_url(const char *u)
{
    const char  *p, *slash, *colon;
    size_t       hl;

    if (strncmp(u, "http://", 7) != 0) {
        die("--base-url must start with http:// (got %s)", u);
    }
    p = u + 7;
    slash = strchr(p, '/');
    if (slash == NULL) {
        slash = p + strlen(p);
    }
    colon = memchr(p, ':', (size_t) (slash - p));
    hl = (size_t) ((colon ? colon : slash) - p);
    if (hl == 0 || hl >= sizeof(o.host)) {
        die("bad host in --base-url %s", u);
    }
    memcpy(o.host, p, hl);
    o.host[hl] = '\0';
    if (colon) {
        size_t  pl = (size_t) (slash - colon - 1);

        if (pl == 0 || pl >= sizeof(o.port)) {
            die("bad port in --base-url %s", u);
        }
        memcpy(o.port, colon + 1, pl);
        o.port[pl] = '\0';
    } else {
        strcpy(o.port, "80");
    }
    snprintf(o.prefix, sizeof(o.prefix), "%s", slash);
    hl = strlen(o.prefix);
    while (hl && o.prefix[hl - 1] == '/') {
        o.prefix[--hl] = '\0';
    }
}


static long
num_arg(const char *name, const char *v, long lo, long hi)
{
    char  *e;
    long   x;

    errno = 0;
    x = strtol(v, &e, 10);
    if (errno || e == v || *e || x < lo || x > hi) {
        die("%s: want an integer in [%ld, %ld], got '%s'", name, lo, hi, v);
    }
    return x;
}


static double
real_arg(const char *name, const char *v)
{
    char    *e;
    double   x;

    if (strcasecmp(v, "inf") == 0) {
        return INFINITY;
    }
    x = strtod(v, &e);
    if (e == v || *e || isnan(x)) {
        die("%s: want a number, got '%s'", name, v);
    }
    return x;
}


static int
known_option(const char *name)
{
    static const char  *names[] = {
        "--base-url", "--host", "--port", "--endpoint", "--model",
        "--num-prompts", "--request-rate", "--max-concurrency",
        "--random-input-len", "--random-output-len", "--random-range-ratio",
        "--seed", "--temperature", "--vocab-min", "--vocab-max", "--warmup",
        "--timeout", "--json", "--api-key", "--turns", "--turn-len",
        "--extra-json", NULL
    };
    int  i;

    for (i = 0; names[i]; i++) {
        if (strcmp(names[i], name) == 0) {
            return 1;
        }
    }
    return 0;
}


static void
parse_args(int argc, char **argv)
{
    int  i;

    strcpy(o.host, "127.0.0.1");
    strcpy(o.port, "8000");
    o.endpoint = "/v1/completions";
    o.num_prompts = 64;
    o.rate = INFINITY;
    o.in_len = 1024;
    o.out_len = 128;
    o.ignore_eos = 1;
    o.token_ids = 1;
    o.timeout = 600;
    o.turns = 1;
    o.turn_len = 16;
    o.api_key = getenv("OPENAI_API_KEY");
    if (o.api_key && *o.api_key == '\0') {
        o.api_key = NULL;
    }

    for (i = 1; i < argc; i++) {
        const char  *a = argv[i], *v;
        char         name[64];
        const char  *eq;

        if (strcmp(a, "--help") == 0 || strcmp(a, "-h") == 0) {
            usage(stdout);
            exit(0);
        }
        if (strcmp(a, "--ignore-eos") == 0) { o.ignore_eos = 1; continue; }
        if (strcmp(a, "--no-ignore-eos") == 0) { o.ignore_eos = 0; continue; }
        if (strcmp(a, "--prompt-token-ids") == 0) { o.token_ids = 1; continue; }
        if (strcmp(a, "--prompt-text") == 0) { o.token_ids = 0; continue; }
        if (strcmp(a, "--quiet") == 0) { o.quiet = 1; continue; }

        /* --name VALUE or --name=VALUE */
        eq = strchr(a, '=');
        if (strncmp(a, "--", 2) != 0) {
            usage(stderr);
            die("unexpected argument '%s'", a);
        }
        snprintf(name, sizeof(name), "%.*s",
                 (int) (eq ? (size_t) (eq - a) : strlen(a)), a);
        if (!known_option(name)) {
            usage(stderr);
            die("unknown option %s", name);
        }
        if (eq) {
            v = eq + 1;
        } else {
            if (i + 1 >= argc) {
                die("%s needs a value", a);
            }
            v = argv[++i];
        }

        if (strcmp(name, "--base-url") == 0) {
            parse_base_url(v);
        } else if (strcmp(name, "--host") == 0) {
            snprintf(o.host, sizeof(o.host), "%s", v);
        } else if (strcmp(name, "--port") == 0) {
            snprintf(o.port, sizeof(o.port), "%ld",
                     num_arg(name, v, 1, 65535));
        } else if (strcmp(name, "--endpoint") == 0) {
            o.endpoint = v;
        } else if (strcmp(name, "--model") == 0) {
            o.model = v;
        } else if (strcmp(name, "--num-prompts") == 0) {
            o.num_prompts = (int) num_arg(name, v, 1, 10000000);
        } else if (strcmp(name, "--request-rate") == 0) {
            o.rate = real_arg(name, v);
            if (!(o.rate > 0)) {
                die("--request-rate must be > 0 or inf");
            }
        } else if (strcmp(name, "--max-concurrency") == 0) {
            o.max_conc = (int) num_arg(name, v, 1, 1000000);
        } else if (strcmp(name, "--random-input-len") == 0) {
            o.in_len = (int) num_arg(name, v, 1, 10000000);
        } else if (strcmp(name, "--random-output-len") == 0) {
            o.out_len = (int) num_arg(name, v, 1, 10000000);
        } else if (strcmp(name, "--random-range-ratio") == 0) {
            o.range_ratio = real_arg(name, v);
            if (o.range_ratio < 0 || o.range_ratio >= 1) {
                die("--random-range-ratio must be in [0, 1)");
            }
        } else if (strcmp(name, "--seed") == 0) {
            o.seed = (uint64_t) num_arg(name, v, 0, 0x7fffffffffffffffL);
        } else if (strcmp(name, "--temperature") == 0) {
            o.temperature = real_arg(name, v);
            if (!(o.temperature >= 0) || isinf(o.temperature)) {
                die("--temperature must be >= 0");
            }
        } else if (strcmp(name, "--vocab-min") == 0) {
            o.vocab_min = (int) num_arg(name, v, 0, 0x7fffffff);
        } else if (strcmp(name, "--vocab-max") == 0) {
            o.vocab_max = (int) num_arg(name, v, 1, 0x7fffffff);
        } else if (strcmp(name, "--warmup") == 0) {
            o.warmup = (int) num_arg(name, v, 0, 1000000);
        } else if (strcmp(name, "--timeout") == 0) {
            o.timeout = real_arg(name, v);
            if (!(o.timeout > 0) || isinf(o.timeout)) {
                die("--timeout must be a positive number of seconds");
            }
        } else if (strcmp(name, "--json") == 0) {
            o.json_out = v;
        } else if (strcmp(name, "--api-key") == 0) {
            o.api_key = v;
        } else if (strcmp(name, "--extra-json") == 0) {
            o.extra = v;        /* members, e.g. "guided_json":{...} */
        } else if (strcmp(name, "--turns") == 0) {
            o.turns = (int) num_arg(name, v, 1, 1000);
        } else if (strcmp(name, "--turn-len") == 0) {
            o.turn_len = (int) num_arg(name, v, 1, 1000000);
        } else {
            usage(stderr);
            die("unknown option %s", name);
        }
    }

    if (o.endpoint[0] != '/') {
        die("--endpoint must start with / (got %s)", o.endpoint);
    }
    o.chat = strstr(o.endpoint, "chat") != NULL;
    if (o.turns > 1 && !o.chat) {
        die("--turns needs --endpoint /v1/chat/completions (conversations "
            "are chat messages)");
    }
}


int
main(int argc, char **argv)
{
    struct addrinfo   hints, *ai;
    struct rlimit     rl;
    req_t            *ws = NULL, *rs;
    double            t_begin, deadline, dur, t;
    int               rc, peak, i, failed, n_req, n_warm;

    parse_args(argc, argv);
    signal(SIGPIPE, SIG_IGN);
    setvbuf(stdout, NULL, _IOLBF, 0);

    /* thousands of streams need thousands of descriptors */
    if (getrlimit(RLIMIT_NOFILE, &rl) == 0 && rl.rlim_cur < rl.rlim_max) {
        rl.rlim_cur = rl.rlim_max;
        (void) setrlimit(RLIMIT_NOFILE, &rl);
    }

    memset(&hints, 0, sizeof(hints));
    hints.ai_family = AF_UNSPEC;
    hints.ai_socktype = SOCK_STREAM;
    rc = getaddrinfo(o.host, o.port, &hints, &ai);
    if (rc != 0) {
        die("cannot resolve %s:%s: %s", o.host, o.port, gai_strerror(rc));
    }
    memcpy(&peer, ai->ai_addr, ai->ai_addrlen);
    peer_len = ai->ai_addrlen;
    freeaddrinfo(ai);

    t_begin = now_s();
    deadline = t_begin + o.timeout;

    fetch_model();
    if (o.token_ids && !o.chat && o.vocab_max == 0) {
        probe_vocab();
    }
    if (o.vocab_max == 0) {
        o.vocab_max = 1000;
    }
    if (o.vocab_max <= o.vocab_min) {
        die("--vocab-max (%d) must be above --vocab-min (%d)", o.vocab_max,
            o.vocab_min);
    }

    ep = epoll_create1(EPOLL_CLOEXEC);
    if (ep < 0) {
        die("epoll_create1: %s", strerror(errno));
    }

    rng_s = o.seed;
    n_req = o.num_prompts * o.turns;
    n_warm = o.warmup * o.turns;
    rs = o.turns > 1 ? make_conversations(o.num_prompts, 0)
                     : make_requests(o.num_prompts, 0);
    t = 0;
    for (i = 0; i < n_req; i++) {
        /* arrivals are the conversations' (their first turns') */
        if (i > 0 && !isinf(o.rate) && rs[i].prev == NULL) {
            t += -log(1.0 - rng_unif()) / o.rate;
        }
        rs[i].arrival = t;
    }
    if (o.warmup) {
        ws = o.turns > 1 ? make_conversations(o.warmup, o.num_prompts)
                         : make_requests(o.warmup, o.num_prompts);
    }

    if (!o.quiet) {
        fprintf(stderr, "bench/serve: http://%s:%s%s%s model %s: %d "
                "requests, input %d, output %d, rate %g req/s, max "
                "concurrency %d (0: none), token ids in [%d, %d)\n",
                o.host, o.port, o.prefix, o.endpoint, o.model,
                o.num_prompts, o.in_len, o.out_len, o.rate, o.max_conc,
                o.vocab_min, o.vocab_max);
    }

    if (o.warmup) {
        const char  *werr = NULL;
        int          wok = 0;

        (void) run_phase(ws, n_warm, o.max_conc, deadline, &peak);
        for (i = 0; i < n_warm; i++) {
            wok += ws[i].ok;
            if (!ws[i].ok && werr == NULL) {
                werr = ws[i].err;
            }
        }
        if (!o.quiet || werr) {
            fprintf(stderr, "bench/serve: warmup: %d/%d succeeded%s%s\n",
                    wok, n_warm, werr ? "; first error: " : "",
                    werr ? werr : "");
        }
    }

    dur = run_phase(rs, n_req, o.max_conc, deadline, &peak);
    failed = report(rs, n_req, dur, peak);

    for (i = 0; i < n_req; i++) {
        req_free(&rs[i]);
    }
    for (i = 0; ws && i < n_warm; i++) {
        req_free(&ws[i]);
    }
    free(rs);
    free(ws);
    close(ep);
    return failed ? 2 : 0;
}
