/*
 * Checks the lock-free SPSC ring (engine/sched/ring.c):
 *   - create rejects bad sizes; capacity is what was asked for;
 *   - single thread: pop on empty, fill to capacity then MOE_EFULL, FIFO
 *     order, wrap-around many times with an odd message size, count;
 *   - two threads: a producer pushes N messages (sequence number, payload
 *     derived from it, checksum of the payload), a consumer pops them; order
 *     kept, nothing lost or duplicated, payloads and checksums intact.
 * N defaults to 5,000,000; argv[1] or env MOE_RING_N overrides it.  The
 * same file is built under ThreadSanitizer by `make tsan` (t/ring_tsan.t).
 */

#include <pthread.h>
#include <sched.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "moe.h"
#include "sched/ring.h"
#include "tap.h"

#define PAYLOAD  44

typedef struct {
    uint64_t  seq;
    uint32_t  sum;                 /* FNV-1a of payload */
    uint8_t   payload[PAYLOAD];    /* bytes derived from seq */
} msg_t;                           /* 56 bytes */

typedef struct {
    moe_ring_t  *ring;
    uint64_t     n;
    uint64_t     full_hits;        /* producer: pushes refused (EFULL) */
    uint64_t     empty_hits;       /* consumer: pops that found nothing */
    uint64_t     received;
    uint64_t     bad_order;        /* seq != expected */
    uint64_t     bad_sum;          /* checksum does not match payload */
    uint64_t     bad_payload;      /* payload not the one for this seq */
    uint64_t     first_bad;        /* seq of the first bad message */
    uint64_t     count_over;       /* moe_ring_count() > capacity */
} stress_t;


static uint32_t
fnv1a(const uint8_t *p, size_t n)
{
    uint32_t  h = 2166136261u;
    size_t    i;

    for (i = 0; i < n; i++) {
        h = (h ^ p[i]) * 16777619u;
    }

    return h;
}


static void
fill_payload(uint64_t seq, uint8_t *p)
{
    uint64_t  x = seq * 0x9E3779B97F4A7C15ull + 1;
    size_t    i;

    for (i = 0; i < PAYLOAD; i++) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        p[i] = (uint8_t) x;
    }
}


static void *
producer(void *arg)
{
    stress_t  *s = arg;
    msg_t      m;
    uint64_t   i;
    unsigned   spins;

    for (i = 0; i < s->n; i++) {
        memset(&m, 0, sizeof(m));
        m.seq = i;
        fill_payload(i, m.payload);
        m.sum = fnv1a(m.payload, PAYLOAD);

        spins = 0;
        while (moe_ring_push(s->ring, &m) == MOE_EFULL) {
            s->full_hits++;
            if (++spins > 64) {
                sched_yield();
            }
        }
    }

    return NULL;
}


static void *
consumer(void *arg)
{
    stress_t  *s = arg;
    msg_t      m;
    uint8_t    want[PAYLOAD];
    unsigned   spins = 0;
    int        bad;

    while (s->received < s->n) {
        if (!moe_ring_pop(s->ring, &m)) {
            s->empty_hits++;
            if (++spins > 64) {
                sched_yield();
            }
            continue;
        }
        spins = 0;

        bad = 0;
        if (m.seq != s->received) {
            s->bad_order++;
            bad = 1;
        }
        if (fnv1a(m.payload, PAYLOAD) != m.sum) {
            s->bad_sum++;
            bad = 1;
        }
        fill_payload(m.seq, want);
        if (memcmp(want, m.payload, PAYLOAD) != 0) {
            s->bad_payload++;
            bad = 1;
        }
        if (bad && s->bad_order + s->bad_sum + s->bad_payload == 1) {
            s->first_bad = s->received;
        }

        if ((s->received & 1023) == 0
            && moe_ring_count(s->ring) > moe_ring_capacity(s->ring))
        {
            s->count_over++;
        }

        s->received++;
    }

    return NULL;
}


static uint64_t
stress_n(int argc, char **argv)
{
    const char  *v = NULL;
    char        *end;
    uint64_t     n;

    if (argc > 1) {
        v = argv[1];
    } else {
        v = getenv("MOE_RING_N");
    }

    if (v == NULL || *v == '\0') {
        return 5000000;
    }

    n = strtoull(v, &end, 10);
    if (*end != '\0' || n == 0) {
        fprintf(stderr, "bad message count '%s'\n", v);
        exit(2);
    }

    return n;
}


int
main(int argc, char **argv)
{
    moe_ring_t  *r;
    stress_t     s;
    pthread_t    pt, ct;
    msg_t        m;
    uint64_t     n;
    size_t       i, k;
    int          ok, rc;
    uint8_t      b3[3];

    n = stress_n(argc, argv);

    TAP_PLAN(18);

    /* ---- create */

    TAP_OK(moe_ring_create(0, 8) == NULL
           && moe_ring_create(1, 8) == NULL
           && moe_ring_create(3, 8) == NULL
           && moe_ring_create(1000, 8) == NULL
           && moe_ring_create(16, 0) == NULL
           && moe_ring_create((size_t) 1 << 62, 64) == NULL,
           "create rejects slots 0/1/3/1000, msg_size 0, size overflow");

    r = moe_ring_create(8, sizeof(msg_t));
    TAP_OK(r != NULL && moe_ring_capacity(r) == 8,
           "create(8, %zu) gives capacity 8", sizeof(msg_t));
    if (r == NULL) {
        return 1;
    }

    /* ---- single thread */

    memset(&m, 0xAB, sizeof(m));
    TAP_OK(moe_ring_pop(r, &m) == 0 && m.seq == 0xABABABABABABABABull
           && moe_ring_count(r) == 0,
           "pop on an empty ring returns 0 and leaves msg untouched");

    ok = 1;
    for (i = 0; i < 8; i++) {
        memset(&m, 0, sizeof(m));
        m.seq = 100 + i;
        if (moe_ring_push(r, &m) != MOE_OK || moe_ring_count(r) != i + 1) {
            ok = 0;
        }
    }
    TAP_OK(ok, "8 pushes into 8 slots succeed, count follows");

    m.seq = 999;
    TAP_OK(moe_ring_push(r, &m) == MOE_EFULL && moe_ring_count(r) == 8,
           "9th push returns MOE_EFULL, count stays 8");

    ok = 1;
    for (i = 0; i < 8; i++) {
        if (moe_ring_pop(r, &m) != 1 || m.seq != 100 + i) {
            ok = 0;
        }
    }
    TAP_OK(ok, "pops come back in FIFO order 100..107");
    TAP_OK(moe_ring_pop(r, &m) == 0 && moe_ring_count(r) == 0,
           "ring empty again after draining");

    /* after a pop, exactly one push fits again */
    for (i = 0; i < 8; i++) {
        m.seq = i;
        moe_ring_push(r, &m);
    }
    moe_ring_pop(r, &m);
    m.seq = 8;
    rc = moe_ring_push(r, &m);
    m.seq = 9;
    TAP_OK(rc == MOE_OK && moe_ring_push(r, &m) == MOE_EFULL,
           "full ring: one pop frees exactly one slot");
    ok = 1;
    for (i = 1; i <= 8; i++) {
        if (moe_ring_pop(r, &m) != 1 || m.seq != i) {
            ok = 0;
        }
    }
    TAP_OK(ok && moe_ring_pop(r, &m) == 0,
           "wrapped contents pop in order 1..8");
    moe_ring_free(r);

    /* wrap-around with an odd message size and varying fill levels */
    r = moe_ring_create(4, 3);
    TAP_OK(r != NULL && moe_ring_capacity(r) == 4, "create(4, 3)");
    if (r == NULL) {
        return 1;
    }
    ok = 1;
    {
        unsigned  next_in = 0, next_out = 0;

        for (i = 0; i < 1000; i++) {
            for (k = 0; k < (i % 5); k++) {
                b3[0] = (uint8_t) next_in;
                b3[1] = (uint8_t) (next_in >> 8);
                b3[2] = (uint8_t) ~next_in;
                rc = moe_ring_push(r, b3);
                if (rc == MOE_OK) {
                    next_in++;
                } else if (rc != MOE_EFULL || next_in - next_out != 4) {
                    ok = 0;
                }
            }
            for (k = 0; k < (i % 3) + 1; k++) {
                if (moe_ring_pop(r, b3) == 1) {
                    if (b3[0] != (uint8_t) next_out
                        || b3[1] != (uint8_t) (next_out >> 8)
                        || b3[2] != (uint8_t) ~next_out)
                    {
                        ok = 0;
                    }
                    next_out++;
                } else if (next_in != next_out) {
                    ok = 0;
                }
                if (moe_ring_count(r) != next_in - next_out) {
                    ok = 0;
                }
            }
        }
        TAP_OK(ok && next_out > 1000,
               "3-byte messages through 4 slots: %u wrapped in order, "
               "EFULL only when full", next_out);
    }
    moe_ring_free(r);

    moe_ring_free(NULL);
    TAP_OK(1, "moe_ring_free(NULL) is a no-op");

    /* ---- two threads */

    r = moe_ring_create(1024, sizeof(msg_t));
    TAP_OK(r != NULL, "create(1024, %zu) for the stress run", sizeof(msg_t));
    if (r == NULL) {
        return 1;
    }

    memset(&s, 0, sizeof(s));
    s.ring = r;
    s.n = n;

    TAP_DIAG("stress: %llu messages of %zu bytes through 1024 slots",
             (unsigned long long) n, sizeof(msg_t));

    rc = pthread_create(&ct, NULL, consumer, &s);
    rc = rc ? rc : pthread_create(&pt, NULL, producer, &s);
    TAP_OK(rc == 0, "producer and consumer threads started");
    if (rc != 0) {
        return 1;
    }
    pthread_join(pt, NULL);
    pthread_join(ct, NULL);

    TAP_DIAG("producer saw EFULL %llu times, consumer saw empty %llu times",
             (unsigned long long) s.full_hits,
             (unsigned long long) s.empty_hits);
    if (s.bad_order + s.bad_sum + s.bad_payload) {
        TAP_DIAG("first bad message at position %llu",
                 (unsigned long long) s.first_bad);
    }

    TAP_OK(s.received == n, "consumer received all %llu messages",
           (unsigned long long) n);
    TAP_OK(s.bad_order == 0,
           "order kept, none lost or duplicated (%llu out of sequence)",
           (unsigned long long) s.bad_order);
    TAP_OK(s.bad_sum == 0 && s.bad_payload == 0,
           "payloads intact (%llu bad checksums, %llu bad payloads)",
           (unsigned long long) s.bad_sum,
           (unsigned long long) s.bad_payload);
    TAP_OK(s.count_over == 0 && moe_ring_pop(r, &m) == 0
           && moe_ring_count(r) == 0,
           "count never over capacity; ring empty at the end");

    moe_ring_free(r);

    return TAP_DONE();
}
