/*
 * UTF-8 helpers: see utf8.h.
 */

#include <stdlib.h>
#include <string.h>

#include "text/utf8.h"


size_t
moe_utf8_len(unsigned char c)
{
    if (c < 0x80) {
        return 1;
    }
    if (c < 0xe0) {
        return 2;
    }
    if (c < 0xf0) {
        return 3;
    }
    return 4;
}


uint32_t
moe_utf8_decode(const char *s, size_t n, size_t *cl)
{
    const unsigned char *u = (const unsigned char *) s;
    size_t               l = moe_utf8_len(u[0]);
    uint32_t             cp;

    if (l > n) {
        l = n;
    }
    *cl = l;
    switch (l) {
    case 1:
        return u[0];
    case 2:
        return ((uint32_t) (u[0] & 0x1f) << 6) | (u[1] & 0x3f);
    case 3:
        return ((uint32_t) (u[0] & 0x0f) << 12)
               | ((uint32_t) (u[1] & 0x3f) << 6) | (u[2] & 0x3f);
    default:
        cp = ((uint32_t) (u[0] & 0x07) << 18)
             | ((uint32_t) (u[1] & 0x3f) << 12)
             | ((uint32_t) (u[2] & 0x3f) << 6) | (u[3] & 0x3f);
        return cp;
    }
}


size_t
moe_utf8_encode(uint32_t cp, char *o)
{
    if (cp < 0x80) {
        o[0] = (char) cp;
        return 1;
    }
    if (cp < 0x800) {
        o[0] = (char) (0xc0 | (cp >> 6));
        o[1] = (char) (0x80 | (cp & 0x3f));
        return 2;
    }
    if (cp < 0x10000) {
        o[0] = (char) (0xe0 | (cp >> 12));
        o[1] = (char) (0x80 | ((cp >> 6) & 0x3f));
        o[2] = (char) (0x80 | (cp & 0x3f));
        return 3;
    }
    o[0] = (char) (0xf0 | (cp >> 18));
    o[1] = (char) (0x80 | ((cp >> 12) & 0x3f));
    o[2] = (char) (0x80 | ((cp >> 6) & 0x3f));
    o[3] = (char) (0x80 | (cp & 0x3f));
    return 4;
}


int
moe_utf8_is_space(uint32_t c)
{
    return (c >= 0x09 && c <= 0x0d) || c == 0x20 || c == 0x85 || c == 0xa0
           || c == 0x1680 || (c >= 0x2000 && c <= 0x200a) || c == 0x2028
           || c == 0x2029 || c == 0x202f || c == 0x205f || c == 0x3000;
}


size_t
moe_utf8_valid_prefix(const char *s, size_t n, size_t *bad)
{
    const unsigned char *u = (const unsigned char *) s;
    size_t               i = 0, need, k;
    unsigned char        c, lo, hi;

    *bad = 0;
    while (i < n) {
        c = u[i];
        if (c < 0x80) {
            i++;
            continue;
        }
        lo = 0x80;
        hi = 0xbf;
        if (c >= 0xc2 && c <= 0xdf) {
            need = 1;
        } else if (c >= 0xe0 && c <= 0xef) {
            need = 2;
            if (c == 0xe0) {
                lo = 0xa0;
            } else if (c == 0xed) {
                hi = 0x9f;
            }
        } else if (c >= 0xf0 && c <= 0xf4) {
            need = 3;
            if (c == 0xf0) {
                lo = 0x90;
            } else if (c == 0xf4) {
                hi = 0x8f;
            }
        } else {
            need = 0;
        }
        k = 0;
        if (need) {
            /* first continuation has the special range, others 80..BF */
            if (i + 1 < n && u[i + 1] >= lo && u[i + 1] <= hi) {
                k = 1;
                while (k < need && i + 1 + k < n
                       && u[i + 1 + k] >= 0x80 && u[i + 1 + k] <= 0xbf)
                {
                    k++;
                }
            }
            if (k == need) {
                i += 1 + need;
                continue;
            }
        }
        /* invalid: lead byte plus k valid continuations is one subpart */
        *bad = 1 + k;
        return i;
    }
    return n;
}


char *
moe_utf8_sanitize(const char *s, size_t len, size_t *out_len)
{
    size_t  i, v, bad, total = 0;
    char   *o, *p;

    /* first pass: the repaired length; second pass: the copy */
    for (i = 0; i < len; i += v + bad) {
        v = moe_utf8_valid_prefix(s + i, len - i, &bad);
        total += v + (bad ? 3 : 0);
    }
    o = malloc(total + 1);
    if (o == NULL) {
        return NULL;
    }
    p = o;
    for (i = 0; i < len; i += v + bad) {
        v = moe_utf8_valid_prefix(s + i, len - i, &bad);
        memcpy(p, s + i, v);
        p += v;
        if (bad) {
            memcpy(p, MOE_UTF8_FFFD, 3);
            p += 3;
        }
    }
    *p = '\0';
    if (out_len) {
        *out_len = total;
    }
    return o;
}
