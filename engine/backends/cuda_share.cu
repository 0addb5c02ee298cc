/*
 * Device memory that outlives a reload (cuda_share.h): the weight buffer
 * as a CUDA VMM allocation exported as a POSIX fd or imported from the
 * old worker's fd, and the KV pool that is backed as memory frees.
 *
 * Driver calls: the cuMem* entry points come from cudart
 * (cudaGetDriverEntryPointByVersion), which has loaded libcuda already;
 * the build links no libcuda (a module built with CUDA still loads where
 * the driver is missing, and the CPU build is untouched).  A driver
 * without VMM or POSIX-fd export makes every call here fall back to
 * cudaMalloc without sharing, logged at info.
 *
 * Lifetime: physical memory is reference counted by the driver.  The
 * exporter keeps its handle and mapping until it frees the backend; the
 * importer maps the same memory (read-only: nothing writes weights after
 * the upload) and keeps the received fd, which it serves in turn to the
 * worker after it.  When the old worker exits, its references go; the
 * importer's keep the memory.
 */

#include <errno.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include <cuda.h>
#include <cuda_runtime.h>

#include "moe.h"
#include "backends/cuda_share.h"

#define CS_FETCH_MS  2000       /* the exporter's answer */


/* ---------------------------------------------------- driver entry points */

static struct {
    int   ok;
    decltype(&cuMemGetAllocationGranularity)  gran;
    decltype(&cuMemCreate)                    create;
    decltype(&cuMemRelease)                   release;
    decltype(&cuMemAddressReserve)            reserve;
    decltype(&cuMemAddressFree)               addr_free;
    decltype(&cuMemMap)                       map;
    decltype(&cuMemUnmap)                     unmap;
    decltype(&cuMemSetAccess)                 access;
    decltype(&cuMemExportToShareableHandle)   export_fd;
    decltype(&cuMemImportFromShareableHandle) import_fd;
    decltype(&cuDeviceGet)                    dev_get;
    decltype(&cuDeviceGetAttribute)           dev_attr;
} cs;

static pthread_once_t cs_once = PTHREAD_ONCE_INIT;


static int
cs_sym(const char *name, void **fn)
{
    cudaDriverEntryPointQueryResult q;

    *fn = NULL;
    if (cudaGetDriverEntryPointByVersion(name, fn, 12000, cudaEnableDefault,
                                         &q) != cudaSuccess
        || q != cudaDriverEntryPointSuccess || *fn == NULL)
    {
        (void) cudaGetLastError();
        return 0;
    }
    return 1;
}


static void
cs_load(void)
{
    int ok = 1;

#define CS_SYM(field, name) ok &= cs_sym(name, (void **) &cs.field)
    CS_SYM(gran, "cuMemGetAllocationGranularity");
    CS_SYM(create, "cuMemCreate");
    CS_SYM(release, "cuMemRelease");
    CS_SYM(reserve, "cuMemAddressReserve");
    CS_SYM(addr_free, "cuMemAddressFree");
    CS_SYM(map, "cuMemMap");
    CS_SYM(unmap, "cuMemUnmap");
    CS_SYM(access, "cuMemSetAccess");
    CS_SYM(export_fd, "cuMemExportToShareableHandle");
    CS_SYM(import_fd, "cuMemImportFromShareableHandle");
    CS_SYM(dev_get, "cuDeviceGet");
    CS_SYM(dev_attr, "cuDeviceGetAttribute");
#undef CS_SYM
    cs.ok = ok;
    if (!ok) {
        moe_log(MOE_LOG_INFO, "cuda share: the driver lacks the VMM entry "
                "points: weights are not shared across reloads");
    }
}


static void
cs_prop(CUmemAllocationProp *p, int device, int fd_export)
{
    memset(p, 0, sizeof(*p));
    p->type = CU_MEM_ALLOCATION_TYPE_PINNED;
    p->location.type = CU_MEM_LOCATION_TYPE_DEVICE;
    p->location.id = device;
    p->requestedHandleTypes = fd_export ? CU_MEM_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR
                                        : CU_MEM_HANDLE_TYPE_NONE;
}


static int
cs_gran(int device, size_t *g)
{
    CUmemAllocationProp p;

    cs_prop(&p, device, 1);
    return cs.gran(g, &p, CU_MEM_ALLOC_GRANULARITY_MINIMUM) == CUDA_SUCCESS
           && *g > 0;
}


extern "C" int
moe_cuda_share_available(int device)
{
    CUdevice d;
    int      vmm = 0, fd = 0;

    if (cudaSetDevice(device) != cudaSuccess || cudaFree(0) != cudaSuccess) {
        (void) cudaGetLastError();
        return 0;
    }
    pthread_once(&cs_once, cs_load);
    if (!cs.ok || cs.dev_get(&d, device) != CUDA_SUCCESS
        || cs.dev_attr(&vmm,
               CU_DEVICE_ATTRIBUTE_VIRTUAL_MEMORY_MANAGEMENT_SUPPORTED, d)
           != CUDA_SUCCESS
        || cs.dev_attr(&fd,
               CU_DEVICE_ATTRIBUTE_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR_SUPPORTED,
               d) != CUDA_SUCCESS)
    {
        return 0;
    }
    return vmm && fd;
}


static const char *
cs_err(CUresult r)
{
    static __thread char buf[32];

    snprintf(buf, sizeof(buf), "CUresult %d", (int) r);
    return buf;
}


static double
cs_now_ms(void)
{
    struct timespec ts;

    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec * 1e3 + ts.tv_nsec / 1e6;
}


/* --------------------------------------------------------------- weights */

/* Map handle h of `bytes` at a fresh range with `prot` access. */
static CUresult
cs_map_new(moe_cuda_wmem_t *w, CUmemGenericAllocationHandle h, size_t bytes,
    CUmemAccess_flags prot)
{
    CUdeviceptr      va = 0;
    CUmemAccessDesc  a;
    CUresult         r;

    r = cs.reserve(&va, bytes, 0, 0, 0);
    if (r != CUDA_SUCCESS) {
        return r;
    }
    r = cs.map(va, bytes, 0, h, 0);
    if (r != CUDA_SUCCESS) {
        (void) cs.addr_free(va, bytes);
        return r;
    }
    memset(&a, 0, sizeof(a));
    a.location.type = CU_MEM_LOCATION_TYPE_DEVICE;
    a.location.id = w->device;
    a.flags = prot;
    r = cs.access(va, bytes, &a, 1);
    if (r != CUDA_SUCCESS) {
        (void) cs.unmap(va, bytes);
        (void) cs.addr_free(va, bytes);
        return r;
    }
    w->ptr = (void *) va;
    w->bytes = bytes;
    return CUDA_SUCCESS;
}


/* The old worker's weights: MOE_OK (w filled) or anything else (nothing
 * held, reason logged at info). */
static int
cs_import(moe_cuda_wmem_t *w, size_t bytes, const char *key)
{
    moe_share_hdr_t               hdr;
    CUmemGenericAllocationHandle  h;
    CUresult                      r;
    char                          err[256];
    double                        t0 = cs_now_ms();
    int                           fd, conn, rc;

    rc = moe_share_fetch(key, CS_FETCH_MS, &fd, &hdr, &conn, err,
                         sizeof(err));
    if (rc != MOE_OK) {
        if (rc != MOE_EIO) {
            moe_log(MOE_LOG_INFO, "cuda share: no import (%s)", err);
        }
        return rc;
    }
    if (hdr.bytes < bytes) {
        moe_log(MOE_LOG_INFO, "cuda share: pid %lld exports %llu bytes, %zu "
                "needed: loading instead", (long long) hdr.pid,
                (unsigned long long) hdr.bytes, bytes);
        close(fd);
        moe_share_ack(conn, 0);
        return MOE_EINVAL;
    }
    r = cs.import_fd(&h, (void *) (uintptr_t) fd,
                     CU_MEM_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR);
    if (r == CUDA_SUCCESS) {
        /* read-only: the weights are never written after the upload, and
         * a stray write would corrupt the old worker's streams too */
        r = cs_map_new(w, h, (size_t) hdr.bytes, CU_MEM_ACCESS_FLAGS_PROT_READ);
        if (r != CUDA_SUCCESS) {
            r = cs_map_new(w, h, (size_t) hdr.bytes,
                           CU_MEM_ACCESS_FLAGS_PROT_READWRITE);
        }
        if (r != CUDA_SUCCESS) {
            (void) cs.release(h);
        }
    }
    if (r != CUDA_SUCCESS) {
        moe_log(MOE_LOG_INFO, "cuda share: importing pid %lld's weights "
                "failed (%s): loading instead", (long long) hdr.pid,
                cs_err(r));
        close(fd);
        moe_share_ack(conn, 0);
        return MOE_EBACKEND;
    }
    moe_share_ack(conn, 1);
    w->handle = (unsigned long long) h;
    w->fd = fd;
    w->vmm = 1;
    w->imported = 1;
    w->from_pid = hdr.pid;
    w->import_ms = cs_now_ms() - t0;
    moe_log(MOE_LOG_INFO, "weights imported from pid %lld (%.2f GB, %.1f ms)",
            (long long) hdr.pid, hdr.bytes / 1e9, w->import_ms);
    return MOE_OK;
}


/* A fresh exportable allocation: MOE_OK or a status (nothing held). */
static int
cs_create(moe_cuda_wmem_t *w, size_t bytes)
{
    CUmemAllocationProp           p;
    CUmemGenericAllocationHandle  h;
    CUresult                      r;
    size_t                        g;
    int                           fd = -1;

    if (!cs_gran(w->device, &g)) {
        return MOE_EBACKEND;
    }
    bytes = (bytes + g - 1) / g * g;
    cs_prop(&p, w->device, 1);
    r = cs.create(&h, bytes, &p, 0);
    if (r != CUDA_SUCCESS) {
        moe_log(MOE_LOG_INFO, "cuda share: cuMemCreate of %zu MiB failed "
                "(%s)", bytes >> 20, cs_err(r));
        return r == CUDA_ERROR_OUT_OF_MEMORY ? MOE_ENOMEM : MOE_EBACKEND;
    }
    r = cs.export_fd(&fd, h, CU_MEM_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR, 0);
    if (r == CUDA_SUCCESS) {
        r = cs_map_new(w, h, bytes, CU_MEM_ACCESS_FLAGS_PROT_READWRITE);
    }
    if (r != CUDA_SUCCESS) {
        moe_log(MOE_LOG_INFO, "cuda share: exporting the weight buffer "
                "failed (%s)", cs_err(r));
        if (fd >= 0) {
            close(fd);
        }
        (void) cs.release(h);
        return MOE_EBACKEND;
    }
    w->handle = (unsigned long long) h;
    w->fd = fd;
    w->vmm = 1;
    return MOE_OK;
}


extern "C" int
moe_cuda_wmem_alloc(moe_cuda_wmem_t *w, int device, size_t bytes,
    const char *key, char *err, size_t errlen)
{
    cudaError_t ce;
    int         rc = MOE_EBACKEND;

    memset(w, 0, sizeof(*w));
    w->device = device;
    w->fd = -1;
    if (key != NULL && moe_cuda_share_available(device)) {
        if (cs_import(w, bytes, key) == MOE_OK) {
            return MOE_OK;
        }
        rc = cs_create(w, bytes);
        if (rc == MOE_OK) {
            return MOE_OK;
        }
    }
    if (rc == MOE_ENOMEM) {
        moe_errf(err, errlen, "cuda backend: weights (%zu MiB): out of "
                 "device memory", bytes >> 20);
        return MOE_ENOMEM;
    }
    ce = cudaMalloc(&w->ptr, bytes);
    if (ce != cudaSuccess) {
        w->ptr = NULL;
        (void) cudaGetLastError();
        moe_errf(err, errlen, "cuda backend: weights (%zu MiB): %s",
                 bytes >> 20, cudaGetErrorString(ce));
        return ce == cudaErrorMemoryAllocation ? MOE_ENOMEM : MOE_EBACKEND;
    }
    w->bytes = bytes;
    return MOE_OK;
}


extern "C" void
moe_cuda_wmem_serve(moe_cuda_wmem_t *w, const char *key, int64_t kv_blocks,
    int64_t kv_bytes_per_block)
{
    moe_share_hdr_t hdr;
    char            err[256];

    if (!w->vmm || w->fd < 0 || key == NULL || w->server != NULL) {
        return;
    }
    memset(&hdr, 0, sizeof(hdr));
    hdr.bytes = w->bytes;
    hdr.kv_blocks = kv_blocks;
    hdr.kv_bytes_per_block = kv_bytes_per_block;
    w->server = moe_share_serve(key, w->fd, &hdr, err, sizeof(err));
    if (w->server == NULL) {
        moe_log(MOE_LOG_INFO, "cuda share: not serving the weights (%s)",
                err);
    }
}


extern "C" int
moe_cuda_wmem_wait(moe_cuda_wmem_t *w, int timeout_ms, int64_t *pid,
    double *ms)
{
    if (w->server == NULL) {
        return -1;
    }
    return moe_share_server_wait(w->server, timeout_ms, pid, ms);
}


extern "C" void
moe_cuda_wmem_free(moe_cuda_wmem_t *w)
{
    if (w->server != NULL) {
        moe_share_server_stop(w->server);
        w->server = NULL;
    }
    if (w->vmm && w->ptr != NULL) {
        (void) cs.unmap((CUdeviceptr) w->ptr, w->bytes);
        (void) cs.addr_free((CUdeviceptr) w->ptr, w->bytes);
        (void) cs.release((CUmemGenericAllocationHandle) w->handle);
    } else if (w->ptr != NULL) {
        (void) cudaFree(w->ptr);
    }
    if (w->fd >= 0) {
        close(w->fd);
    }
    w->ptr = NULL;
    w->fd = -1;
    w->vmm = 0;
}


/* --------------------------------------------------------------- KV pool */

extern "C" int
moe_cuda_kvpool_reserve(moe_cuda_kvpool_t *p, int device, size_t bytes,
    char *err, size_t errlen)
{
    CUdeviceptr va = 0;
    CUresult    r;

    memset(p, 0, sizeof(*p));
    p->device = device;
    if (!moe_cuda_share_available(device) || !cs_gran(device, &p->gran)) {
        moe_errf(err, errlen, "cuda backend: no VMM for a growing KV pool");
        return MOE_EUNSUPPORTED;
    }
    p->bytes = (bytes + p->gran - 1) / p->gran * p->gran;
    p->n_chunks = p->bytes / p->gran;
    p->mapped = (uint8_t *) calloc(p->n_chunks, 1);
    if (p->mapped == NULL) {
        moe_errf(err, errlen, "cuda backend: out of memory");
        return MOE_ENOMEM;
    }
    r = cs.reserve(&va, p->bytes, 0, 0, 0);
    if (r != CUDA_SUCCESS) {
        free(p->mapped);
        p->mapped = NULL;
        moe_errf(err, errlen, "cuda backend: reserving %zu MiB of address "
                 "space for the KV pool: %s", p->bytes >> 20, cs_err(r));
        return MOE_EBACKEND;
    }
    p->base = (char *) va;
    return MOE_OK;
}


/* Mark (or count, when mark is 0) the chunks the ranges touch that are
 * not backed yet: their number. */
static size_t
cs_need(const moe_cuda_kvpool_t *p, const size_t *lo, const size_t *hi,
    int n, uint8_t *want)
{
    size_t c, c0, c1, cnt = 0;
    int    i;

    for (i = 0; i < n; i++) {
        if (hi[i] <= lo[i]) {
            continue;
        }
        c0 = lo[i] / p->gran;
        c1 = (hi[i] - 1) / p->gran;
        for (c = c0; c <= c1 && c < p->n_chunks; c++) {
            if (!p->mapped[c] && (want == NULL || !want[c])) {
                cnt++;
                if (want != NULL) {
                    want[c] = 1;
                }
            }
        }
    }
    return cnt;
}


extern "C" size_t
moe_cuda_kvpool_cost(const moe_cuda_kvpool_t *p, const size_t *lo,
    const size_t *hi, int n)
{
    uint8_t *want;
    size_t   cnt;

    want = (uint8_t *) calloc(p->n_chunks ? p->n_chunks : 1, 1);
    if (want == NULL) {
        return (size_t) -1;
    }
    cnt = cs_need(p, lo, hi, n, want);
    free(want);
    return cnt * p->gran;
}


/* Back chunks [c0, c1) with one physical allocation. */
static int
cs_map_run(moe_cuda_kvpool_t *p, size_t c0, size_t c1, cudaStream_t s)
{
    CUmemAllocationProp           prop;
    CUmemGenericAllocationHandle  h;
    CUmemAccessDesc               a;
    CUdeviceptr                   va = (CUdeviceptr) (p->base + c0 * p->gran);
    size_t                        len = (c1 - c0) * p->gran, c;
    CUresult                      r;

    if (p->n_h == p->cap_h) {
        size_t  cap = p->cap_h ? 2 * p->cap_h : 64;
        void   *nh = realloc(p->h, cap * sizeof(*p->h));
        void   *no, *nl;

        if (nh == NULL) {
            return MOE_ENOMEM;
        }
        p->h = (unsigned long long *) nh;
        no = realloc(p->h_off, cap * sizeof(size_t));
        if (no == NULL) {
            return MOE_ENOMEM;
        }
        p->h_off = (size_t *) no;
        nl = realloc(p->h_len, cap * sizeof(size_t));
        if (nl == NULL) {
            return MOE_ENOMEM;
        }
        p->h_len = (size_t *) nl;
        p->cap_h = cap;
    }
    cs_prop(&prop, p->device, 0);
    r = cs.create(&h, len, &prop, 0);
    if (r != CUDA_SUCCESS) {
        return r == CUDA_ERROR_OUT_OF_MEMORY ? MOE_ENOMEM : MOE_EBACKEND;
    }
    r = cs.map(va, len, 0, h, 0);
    if (r == CUDA_SUCCESS) {
        memset(&a, 0, sizeof(a));
        a.location.type = CU_MEM_LOCATION_TYPE_DEVICE;
        a.location.id = p->device;
        a.flags = CU_MEM_ACCESS_FLAGS_PROT_READWRITE;
        r = cs.access(va, len, &a, 1);
        if (r != CUDA_SUCCESS) {
            (void) cs.unmap(va, len);
        }
    }
    if (r != CUDA_SUCCESS) {
        (void) cs.release(h);
        return MOE_EBACKEND;
    }
    p->h[p->n_h] = (unsigned long long) h;
    p->h_off[p->n_h] = c0 * p->gran;
    p->h_len[p->n_h] = len;
    p->n_h++;
    for (c = c0; c < c1; c++) {
        p->mapped[c] = 1;
    }
    p->n_mapped += c1 - c0;
    if (cudaMemsetAsync((void *) va, 0, len, s) != cudaSuccess) {
        (void) cudaGetLastError();
        return MOE_EBACKEND;
    }
    return MOE_OK;
}


extern "C" int
moe_cuda_kvpool_map(moe_cuda_kvpool_t *p, const size_t *lo, const size_t *hi,
    int n, void *stream)
{
    uint8_t *want;
    size_t   c, c0;
    int      rc = MOE_OK;

    want = (uint8_t *) calloc(p->n_chunks ? p->n_chunks : 1, 1);
    if (want == NULL) {
        return MOE_ENOMEM;
    }
    (void) cs_need(p, lo, hi, n, want);
    for (c = 0; c < p->n_chunks && rc == MOE_OK; ) {
        if (!want[c]) {
            c++;
            continue;
        }
        for (c0 = c; c < p->n_chunks && want[c]; c++) {
        }
        rc = cs_map_run(p, c0, c, (cudaStream_t) stream);
    }
    free(want);
    return rc;
}


extern "C" void
moe_cuda_kvpool_free(moe_cuda_kvpool_t *p)
{
    size_t i;

    if (p->base == NULL) {
        return;
    }
    for (i = 0; i < p->n_h; i++) {
        (void) cs.unmap((CUdeviceptr) (p->base + p->h_off[i]), p->h_len[i]);
        (void) cs.release((CUmemGenericAllocationHandle) p->h[i]);
    }
    (void) cs.addr_free((CUdeviceptr) p->base, p->bytes);
    free(p->h);
    free(p->h_off);
    free(p->h_len);
    free(p->mapped);
    memset(p, 0, sizeof(*p));
}
