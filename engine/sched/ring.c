/*
 * Lock-free SPSC ring (see ring.h).
 *
 * head and tail are free-running counters (never masked when stored), so
 * head - tail is the number of messages waiting even when the ring is full.
 * The producer owns head, the consumer owns tail; each lives on its own
 * cache line together with the owner's cached copy of the other index, so
 * that in the common case a push or pop touches no line the other side
 * writes.
 *
 * Ordering: the producer writes the slot, then stores head with release;
 * the consumer loads head with acquire before reading the slot.  Likewise
 * the consumer reads the slot, then stores tail with release; the producer
 * loads tail with acquire before overwriting that slot.
 *
 * Compiles with only moe.h (the tsan build links it alone).
 */

#include <stdatomic.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "sched/ring.h"

#define MOE_RING_LINE  64

struct moe_ring {
    /* read-only after create */
    _Alignas(MOE_RING_LINE)
    size_t          mask;         /* slots - 1 */
    size_t          msg_size;     /* bytes per message */
    unsigned char  *buf;          /* (slots, msg_size) bytes */

    /* producer's line */
    _Alignas(MOE_RING_LINE)
    _Atomic size_t  head;         /* next slot to write */
    size_t          tail_cache;   /* producer's last view of tail */

    /* consumer's line */
    _Alignas(MOE_RING_LINE)
    _Atomic size_t  tail;         /* next slot to read */
    size_t          head_cache;   /* consumer's last view of head */
};


moe_ring_t *
moe_ring_create(size_t slots, size_t msg_size)
{
    moe_ring_t  *r;
    size_t       bytes;

    if (slots < 2 || (slots & (slots - 1)) != 0 || msg_size == 0) {
        return NULL;
    }

    if (msg_size > SIZE_MAX / slots) {
        return NULL;
    }

    bytes = slots * msg_size;

    /* aligned_alloc wants a size that is a multiple of the alignment */
    r = aligned_alloc(MOE_RING_LINE,
                      (sizeof(*r) + MOE_RING_LINE - 1)
                      & ~(size_t) (MOE_RING_LINE - 1));
    if (r == NULL) {
        return NULL;
    }

    memset(r, 0, sizeof(*r));

    if (bytes > SIZE_MAX - MOE_RING_LINE) {
        free(r);
        return NULL;
    }

    r->buf = aligned_alloc(MOE_RING_LINE,
                           (bytes + MOE_RING_LINE - 1)
                           & ~(size_t) (MOE_RING_LINE - 1));
    if (r->buf == NULL) {
        free(r);
        return NULL;
    }

    r->mask = slots - 1;
    r->msg_size = msg_size;
    atomic_init(&r->head, 0);
    atomic_init(&r->tail, 0);
    r->tail_cache = 0;
    r->head_cache = 0;

    return r;
}


void
moe_ring_free(moe_ring_t *r)
{
    if (r == NULL) {
        return;
    }

    free(r->buf);
    free(r);
}


int
moe_ring_push(moe_ring_t *r, const void *msg)
{
    size_t  head;

    head = atomic_load_explicit(&r->head, memory_order_relaxed);

    if (head - r->tail_cache > r->mask) {
        /* looks full: refresh our view of the consumer */
        r->tail_cache = atomic_load_explicit(&r->tail, memory_order_acquire);

        if (head - r->tail_cache > r->mask) {
            return MOE_EFULL;
        }
    }

    memcpy(r->buf + (head & r->mask) * r->msg_size, msg, r->msg_size);

    atomic_store_explicit(&r->head, head + 1, memory_order_release);

    return MOE_OK;
}


int
moe_ring_pop(moe_ring_t *r, void *msg)
{
    size_t  tail;

    tail = atomic_load_explicit(&r->tail, memory_order_relaxed);

    if (tail == r->head_cache) {
        /* looks empty: refresh our view of the producer */
        r->head_cache = atomic_load_explicit(&r->head, memory_order_acquire);

        if (tail == r->head_cache) {
            return 0;
        }
    }

    memcpy(msg, r->buf + (tail & r->mask) * r->msg_size, r->msg_size);

    atomic_store_explicit(&r->tail, tail + 1, memory_order_release);

    return 1;
}


size_t
moe_ring_count(const moe_ring_t *r)
{
    size_t  tail, head, n;

    /*
     * Load tail first: both only grow and head never passes below tail, so
     * head read later is >= the tail read earlier.  The consumer may have
     * moved on meanwhile, so clamp to the capacity.
     */
    tail = atomic_load_explicit(&r->tail, memory_order_acquire);
    head = atomic_load_explicit(&r->head, memory_order_acquire);

    n = head - tail;

    return n > r->mask + 1 ? r->mask + 1 : n;
}


size_t
moe_ring_capacity(const moe_ring_t *r)
{
    return r->mask + 1;
}
