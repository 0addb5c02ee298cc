/*
 * Device memory that outlives a reload (cuda_share.cu): the CUDA backend's
 * weight buffer as a CUDA VMM allocation exported as a file descriptor
 * (served to the next worker through share.c's socket) or imported from
 * the old worker's, and a KV pool whose virtual range is reserved whole
 * and backed piece by piece as memory frees.  Plain C API over the driver's
 * cuMem* calls, resolved at run time through cudart
 * (cudaGetDriverEntryPointByVersion), so nothing links libcuda and a build
 * or a machine without the driver behaves as before: every failure here
 * is a fallback (cudaMalloc, no sharing), logged at info.
 */

#ifndef MOE_CUDA_SHARE_H
#define MOE_CUDA_SHARE_H

#include <stddef.h>
#include <stdint.h>

#include "backends/share.h"

#ifdef __cplusplus
extern "C" {
#endif

/* The weight buffer. */
typedef struct {
    void                *ptr;        /* device address of the weights */
    size_t               bytes;      /* mapped (granularity multiple) */
    int                  device;
    int                  vmm;        /* 1: a VMM mapping, 0: cudaMalloc */
    int                  imported;   /* 1: the old worker's (read-only) */
    int64_t              from_pid;   /* its exporter, when imported */
    double               import_ms;  /* fetch + map */
    unsigned long long   handle;     /* CUmemGenericAllocationHandle */
    int                  fd;         /* shareable fd (ours or received) */
    moe_share_server_t  *server;
} moe_cuda_wmem_t;

/*
 * Weights of `bytes` on device: imported when key is not NULL and an
 * exporter of that key answers (w->imported; values already there: skip
 * the upload), else a fresh VMM allocation (exportable), else cudaMalloc.
 * MOE_OK, or MOE_ENOMEM / MOE_EBACKEND with err set (no memory at all).
 */
int moe_cuda_wmem_alloc(moe_cuda_wmem_t *w, int device, size_t bytes,
    const char *key, char *err, size_t errlen);

/* Serve the weights to the next worker under key (after they are whole),
 * with the KV pool's size as the importer's sizing hint.  A no-op for a
 * cudaMalloc buffer; failures only log. */
void moe_cuda_wmem_serve(moe_cuda_wmem_t *w, const char *key,
    int64_t kv_blocks, int64_t kv_bytes_per_block);

/* Wait at most timeout_ms for a hand-over: 1 (pid, ms), 0 none came, -1
 * nothing is served. */
int moe_cuda_wmem_wait(moe_cuda_wmem_t *w, int timeout_ms, int64_t *pid,
    double *ms);

/* Stop serving, unmap, free.  NULL-safe, idempotent. */
void moe_cuda_wmem_free(moe_cuda_wmem_t *w);

/*
 * The KV pool that grows: a reserved virtual range of `bytes` whose
 * granularity chunks are backed on demand (physical allocations per run
 * of new chunks; zeroed when mapped).  reserve: MOE_OK or a status.
 */
typedef struct {
    char          *base;
    size_t         bytes;       /* the range (granularity multiple) */
    size_t         gran;
    size_t         n_chunks;
    uint8_t       *mapped;      /* (n_chunks) 1: backed */
    size_t         n_mapped;
    int            device;
    /* physical allocations, one per mapped run */
    unsigned long long *h;
    size_t        *h_off, *h_len;
    size_t         n_h, cap_h;
} moe_cuda_kvpool_t;

int  moe_cuda_kvpool_reserve(moe_cuda_kvpool_t *p, int device, size_t bytes,
    char *err, size_t errlen);

/* Bytes of new backing that ranges [lo[i], hi[i]) would take. */
size_t moe_cuda_kvpool_cost(const moe_cuda_kvpool_t *p, const size_t *lo,
    const size_t *hi, int n);

/* Back every chunk the ranges touch (zeroed on stream `stream`, a
 * cudaStream_t).  MOE_OK, or MOE_ENOMEM / MOE_EBACKEND with what was
 * mapped before the failure kept (consistent). */
int  moe_cuda_kvpool_map(moe_cuda_kvpool_t *p, const size_t *lo,
    const size_t *hi, int n, void *stream);

void moe_cuda_kvpool_free(moe_cuda_kvpool_t *p);

/* 1 when the driver offers what both need (VMM with POSIX fds). */
int  moe_cuda_share_available(int device);

#ifdef __cplusplus
}
#endif

#endif /* MOE_CUDA_SHARE_H */
