/*
 * Lock-free single-producer/single-consumer rings of fixed-size messages.
 *
 * One thread pushes, one (other) thread pops; no locks, no system calls.
 * The worker -> engine submit ring and the engine -> worker completion ring
 * are both of this kind.  Waking the consumer (eventfd, condvar) is the
 * caller's business.
 */

#ifndef MOE_RING_H
#define MOE_RING_H

#include <stddef.h>

#include "moe.h"

typedef struct moe_ring moe_ring_t;

/*
 * Create a ring of `slots` messages of `msg_size` bytes each.  slots must be
 * a power of two >= 2 and msg_size >= 1; all `slots` can be filled.  Returns
 * NULL on bad arguments, on size overflow or when memory runs out.  The
 * caller frees the ring with moe_ring_free().
 */
moe_ring_t *moe_ring_create(size_t slots, size_t msg_size);

/* Free a ring (no thread may use it any more).  NULL is a no-op. */
void moe_ring_free(moe_ring_t *r);

/*
 * Producer side: copy msg_size bytes from msg into the ring.  Returns MOE_OK,
 * or MOE_EFULL when every slot is taken (nothing copied).  Never blocks.
 */
int moe_ring_push(moe_ring_t *r, const void *msg);

/*
 * Consumer side: copy the oldest message into msg (msg_size bytes) and
 * release its slot.  Returns 1 when a message was popped, 0 when the ring
 * was empty (msg untouched).  Never blocks.
 */
int moe_ring_pop(moe_ring_t *r, void *msg);

/*
 * Messages waiting, as seen at some instant during the call (exact when
 * called from the producer or consumer with the other side idle).  Safe
 * from any thread.
 */
size_t moe_ring_count(const moe_ring_t *r);

/* Number of slots (the `slots` given to moe_ring_create()). */
size_t moe_ring_capacity(const moe_ring_t *r);

#endif /* MOE_RING_H */
