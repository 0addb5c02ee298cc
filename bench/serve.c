/*
 * bench/serve: an OpenAI-streaming load generator for LocalMoE (or any
 * OpenAI-compatible server), measuring the way vLLM's benchmark_serving does:
 * synthetic random prompts of set lengths, Poisson arrivals (or all at once)
 * under an optional concurrency cap, streamed responses timed per event,
 * then TTFT, TPOT, ITL, E2E latency and throughput.
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
    int          token_ids;
    int          vocab_min;
    int          vocab_max;        /* 0: ask the server */
    int          warmup;
    double       temperature;
    double       timeout;          /* whole run, seconds */
    int          chat;
    int          quiet;
} opts_t;


/* ------------------------------------------------------------- requests */

typedef struct {
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
    size_t     hlen;
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


static void
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

static void
build_request(req_t *r, int i)
{
    char    *b = NULL, *h = NULL;
    size_t   bl = 0, bc = 0, hl = 0, hc = 0;
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
               ",\"stream_options\":{\"include_usage\":true}}",
               r->out_len, o.temperature, o.ignore_eos ? "true" : "false");

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
        build_request(&rs[i], first_index + i);
    }
    return rs;
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


/* status line and headers; 0 incomplete, 1 parsed, -1 bad */

static int
head_parse(conn_t *c)
{
    char  *e, *line, *next;

    e = strstr(c->hbuf, "\r\n\r\n");
    if (e == NULL) {
        return c->hlen > HDR_MAX ? -1 : 0;
    }
    *e = '\0';

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
    return 1;
}


/* bytes from the socket; returns 1 once the response is complete */

static int
conn_feed(conn_t *c, const char *p, size_t n, double t)
{
    if (c->state == ST_HEAD) {
        size_t  before = c->hlen, used;
        char   *e;
        int     rc;

        buf_add(&c->hbuf, &c->hlen, &c->hlen == &c->hlen ? &c->hlen : NULL,
                "", 0);
        (void) before;
        (void) e;
        (void) used;
        (void) rc;
    }
    return 0;
}
