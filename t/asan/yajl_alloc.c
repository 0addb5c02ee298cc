/*
 * Allocation functions for the ASan build's copy of yajl (make asan).
 *
 * yajl_tree grows every JSON array and object by one element per realloc.
 * glibc grows a large block in place, but ASan's realloc always allocates,
 * copies and quarantines, so loading a 128k-token tokenizer.json turns
 * quadratic (hours).  The Makefile renames malloc/calloc/realloc/free in
 * yajl's objects (libyajl_s.a, objcopy --redefine-sym) to these, which keep
 * a capacity header and double it: yajl's blocks still come from ASan's
 * allocator (leaks and use-after-free are still seen), only the slack up
 * to the capacity is not poisoned.  Only yajl calls these; libmoe's own
 * allocations are untouched.
 */

#include <stddef.h>
#include <stdlib.h>
#include <string.h>

typedef union {
    size_t       cap;
    max_align_t  align;
} moe_asan_hdr_t;


void *
moe_asan_yajl_malloc(size_t n)
{
    moe_asan_hdr_t  *h;

    h = malloc(sizeof(*h) + n);
    if (h == NULL) {
        return NULL;
    }
    h->cap = n;
    return h + 1;
}


void *
moe_asan_yajl_calloc(size_t n, size_t size)
{
    void  *p;

    if (size != 0 && n > (size_t) -1 / size) {
        return NULL;
    }
    p = moe_asan_yajl_malloc(n * size);
    if (p != NULL) {
        memset(p, 0, n * size);
    }
    return p;
}


void
moe_asan_yajl_free(void *p)
{
    if (p != NULL) {
        free((moe_asan_hdr_t *) p - 1);
    }
}


void *
moe_asan_yajl_realloc(void *p, size_t n)
{
    moe_asan_hdr_t  *h;
    size_t           cap;
    void            *q;

    if (p == NULL) {
        return moe_asan_yajl_malloc(n);
    }
    h = (moe_asan_hdr_t *) p - 1;
    if (n <= h->cap) {
        return p;
    }
    cap = h->cap * 2 > n ? h->cap * 2 : n;
    q = moe_asan_yajl_malloc(cap);
    if (q == NULL) {
        return NULL;
    }
    memcpy(q, p, h->cap);
    moe_asan_yajl_free(p);
    return q;
}
