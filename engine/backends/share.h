/*
 * Weight hand-over between processes (nginx -s reload): the key that says
 * two backends would hold byte-identical weights, and the Unix-socket
 * protocol that passes a file descriptor for them (SCM_RIGHTS).  Plain C,
 * no CUDA: the CUDA backend (cuda_share.cu) exports its weight memory as
 * an fd and imports a peer's; the CPU build compiles this file too, so
 * the key and the protocol are tested without a GPU (t/unit/share.c).
 *
 * Protocol (SOCK_SEQPACKET, abstract name "localmoe-share-<uid>-<hash of
 * the key>", so only the key's owner finds it; the full key is compared,
 * never just the hash):
 *   importer -> exporter   moe_share_req_t  (magic, version, pid, key)
 *   exporter -> importer   moe_share_hdr_t  (status; on MOE_SHARE_OK the
 *                          fd rides with it as SCM_RIGHTS)
 *   importer -> exporter   moe_share_ack_t  (imported or not)
 * Anything else (short or oversized message, wrong magic, a peer that
 * dies or stays silent past 1 s) closes that connection; the server goes
 * on serving.
 */

#ifndef MOE_SHARE_H
#define MOE_SHARE_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#define MOE_SHARE_KEY_MAX   640
#define MOE_SHARE_MAGIC     0x53454f4dU     /* "MOES" */
#define MOE_SHARE_VERSION   1

enum {
    MOE_SHARE_OK = 0,
    MOE_SHARE_MISMATCH = 1,                 /* keys differ */
    MOE_SHARE_BAD = 2                       /* malformed request */
};

/* What identifies a weight buffer (moe_share_key). */
typedef struct {
    const char  *device;      /* GPU UUID / PCI id ("cpu:..." in tests) */
    const char  *model_dir;   /* resolved with realpath; NULL: dummy */
    uint64_t     seed;        /* load_format dummy: the random seed */
    uint64_t     layout_bytes;/* the weight buffer's size */
    uint64_t     layout_sum;  /* moe_share_sum of its offsets */
    const char  *quant;       /* quantization ("none") */
    const char  *dtype;       /* weight element type ("bf16") */
    int          tp, rank, ep;
} moe_share_key_in_t;

#define MOE_SHARE_PROBE     1               /* header only: no fd, no ack */

/* importer -> exporter */
typedef struct {
    uint32_t  magic, version;
    int32_t   flags;            /* MOE_SHARE_PROBE */
    int32_t   pad;
    int64_t   pid;
    char      key[MOE_SHARE_KEY_MAX];
} moe_share_req_t;

/* exporter -> importer */
typedef struct {
    uint32_t  magic, version;
    int32_t   status;           /* MOE_SHARE_* */
    int32_t   pad;
    int64_t   pid;              /* the exporter */
    uint64_t  bytes;            /* the shared allocation (granularity) */
    uint64_t  layout_sum;
    int64_t   kv_blocks;        /* the exporter's KV pool: a sizing hint */
    int64_t   kv_bytes_per_block;
    char      key[MOE_SHARE_KEY_MAX];
} moe_share_hdr_t;

/* importer -> exporter, last */
typedef struct {
    uint32_t  magic, version;
    int32_t   imported;         /* 1: mapped and in use */
    int32_t   pad;
} moe_share_ack_t;

typedef struct moe_share_server moe_share_server_t;

/* FNV-1a over n bytes, chained from h (0: start): layout checksums. */
uint64_t moe_share_sum(uint64_t h, const void *p, size_t n);

/*
 * The key text of in (uid, device, realpath of the model directory with
 * config.json's size and mtime, or "dummy" and the seed, layout bytes and
 * checksum, quantization, dtype, tp / rank / ep).  MOE_OK; MOE_EIO when
 * the model directory or its config.json cannot be resolved; MOE_EINVAL
 * when the key does not fit; reason in err.
 */
int moe_share_key(const moe_share_key_in_t *in, char *key, size_t keylen,
    char *err, size_t errlen);

/* The abstract socket name of a key: name[0] = '\0', then the text;
 * returns the address length to bind / connect with (sun_path bytes). */
size_t moe_share_sockname(const char *key, char *name, size_t namelen);

/*
 * Serve fd (dup()ed; the caller keeps its own) under key with hdr's
 * fields (bytes, layout_sum, kv_*; magic, status, pid and key are filled
 * here) on a thread of its own.  While another process holds the name
 * (the old worker, until it exits) the thread retries every 100 ms.
 * NULL on failure (memory, thread) with the reason in err.
 */
moe_share_server_t *moe_share_serve(const char *key, int fd,
    const moe_share_hdr_t *hdr, char *err, size_t errlen);

/*
 * Wait at most timeout_ms for a completed hand-over (one that already
 * happened counts).  Returns 1 with *pid and *ms (accept to ack) of the
 * last one, or 0.  NULL-safe (0).
 */
int moe_share_server_wait(moe_share_server_t *s, int timeout_ms,
    int64_t *pid, double *ms);

/* Hand-overs completed, and connections refused or broken (tests). */
void moe_share_server_counts(moe_share_server_t *s, int *done, int *failed);

/* Stop the thread, close the socket and the fd, free.  NULL-safe. */
void moe_share_server_stop(moe_share_server_t *s);

/*
 * Ask the server of key for its fd, waiting at most timeout_ms per
 * message.  MOE_OK with *fd (owned by the caller), *hdr and *conn (the
 * open connection: answer it with moe_share_ack); MOE_EIO when no server
 * listens (the usual case: nothing to import), MOE_EINVAL when its key
 * differs or its answer is malformed (nothing leaks); reason in err.
 */
int moe_share_fetch(const char *key, int timeout_ms, int *fd,
    moe_share_hdr_t *hdr, int *conn, char *err, size_t errlen);

/*
 * The header of key's exporter without its fd (what it sized, before
 * importing): MOE_OK with *hdr, MOE_EIO (none), MOE_EINVAL (another key,
 * malformed); reason in err.  Counts neither way on the server.
 */
int moe_share_probe(const char *key, int timeout_ms, moe_share_hdr_t *hdr,
    char *err, size_t errlen);

/* Tell the exporter whether the import worked, and close conn. */
void moe_share_ack(int conn, int imported);

#ifdef __cplusplus
}
#endif

#endif /* MOE_SHARE_H */
