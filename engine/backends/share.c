/*
 * Weight hand-over between processes: the key and the fd-passing protocol
 * (share.h).  A base file: calls no other backend file.
 */

#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <poll.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <time.h>
#include <unistd.h>

#include "moe.h"
#include "backends/share.h"


#define SH_IO_MS    1000        /* a request or a header */
#define SH_ACK_MS   10000       /* the importer maps before it acks */
#define SH_BIND_MS  100         /* retry while another process binds */


struct moe_share_server {
    pthread_t        thr;
    int              started;
    int              stop_fd;       /* eventfd: stop the thread */
    int              lfd;           /* listening socket, -1 until bound */
    int              fd;            /* the shared memory's fd (ours) */
    moe_share_hdr_t  hdr;
    char             name[sizeof(((struct sockaddr_un *) 0)->sun_path)];
    size_t           namelen;

    pthread_mutex_t  mu;
    pthread_cond_t   cv;
    int              done, failed;
    int64_t          last_pid;
    double           last_ms;
};


static double
sh_now_ms(void)
{
    struct timespec ts;

    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec * 1e3 + ts.tv_nsec / 1e6;
}


uint64_t
moe_share_sum(uint64_t h, const void *p, size_t n)
{
    const unsigned char *c = p;
    size_t               i;

    if (h == 0) {
        h = 0xcbf29ce484222325ULL;
    }
    for (i = 0; i < n; i++) {
        h ^= c[i];
        h *= 0x100000001b3ULL;
    }
    return h;
}


int
moe_share_key(const moe_share_key_in_t *in, char *key, size_t keylen,
    char *err, size_t errlen)
{
    char         real[PATH_MAX], cfg[PATH_MAX + 16], src[PATH_MAX + 64];
    struct stat  st;
    int          n;

    if (in == NULL || key == NULL || keylen == 0) {
        moe_errf(err, errlen, "share: no key input");
        return MOE_EINVAL;
    }
    if (in->model_dir != NULL) {
        if (realpath(in->model_dir, real) == NULL) {
            moe_errf(err, errlen, "share: model directory %s: %s",
                     in->model_dir, strerror(errno));
            return MOE_EIO;
        }
        snprintf(cfg, sizeof(cfg), "%s/config.json", real);
        if (stat(cfg, &st) != 0) {
            moe_errf(err, errlen, "share: %s: %s", cfg, strerror(errno));
            return MOE_EIO;
        }
        /* the path alone is not the model: a rewritten config.json (or a
         * directory swapped under the same name) changes size or mtime */
        snprintf(src, sizeof(src), "%s cfg=%lld:%lld.%09ld", real,
                 (long long) st.st_size, (long long) st.st_mtim.tv_sec,
                 (long) st.st_mtim.tv_nsec);
    } else {
        snprintf(src, sizeof(src), "dummy seed=%llu",
                 (unsigned long long) in->seed);
    }
    n = snprintf(key, keylen, "v%d uid=%u dev=%s model=%s bytes=%llu "
                 "layout=%016llx quant=%s dtype=%s tp=%d rank=%d ep=%d",
                 MOE_SHARE_VERSION, (unsigned) getuid(),
                 in->device != NULL ? in->device : "?", src,
                 (unsigned long long) in->layout_bytes,
                 (unsigned long long) in->layout_sum,
                 in->quant != NULL ? in->quant : "none",
                 in->dtype != NULL ? in->dtype : "?", in->tp, in->rank,
                 in->ep);
    if (n < 0 || (size_t) n >= keylen || (size_t) n >= MOE_SHARE_KEY_MAX) {
        moe_errf(err, errlen, "share: key too long (%d bytes)", n);
        key[0] = '\0';
        return MOE_EINVAL;
    }
    return MOE_OK;
}


size_t
moe_share_sockname(const char *key, char *name, size_t namelen)
{
    uint64_t  h1, h2;
    int       n;

    /* two independent 64-bit hashes: a name collision only costs a
     * refused fetch (the full key is compared), never a wrong import */
    h1 = moe_share_sum(0, key, strlen(key));
    h2 = moe_share_sum(0x9e3779b97f4a7c15ULL, key, strlen(key));
    name[0] = '\0';
    n = snprintf(name + 1, namelen - 1, "localmoe-share-%u-%016llx%016llx",
                 (unsigned) getuid(), (unsigned long long) h1,
                 (unsigned long long) h2);
    return 1 + (size_t) n;
}


static int
sh_addr(const char *name, size_t namelen, struct sockaddr_un *sa,
    socklen_t *salen)
{
    memset(sa, 0, sizeof(*sa));
    sa->sun_family = AF_UNIX;
    if (namelen > sizeof(sa->sun_path)) {
        return -1;
    }
    memcpy(sa->sun_path, name, namelen);
    *salen = (socklen_t) (offsetof(struct sockaddr_un, sun_path) + namelen);
    return 0;
}


/* Wait for fd to be readable (and stop_fd not), at most ms: 1 ready, 0
 * timed out or stopped. */
static int
sh_wait_in(int fd, int stop_fd, int ms)
{
    struct pollfd  p[2];
    int            n;

    p[0].fd = fd;
    p[0].events = POLLIN;
    p[1].fd = stop_fd;
    p[1].events = POLLIN;
    do {
        n = poll(p, stop_fd >= 0 ? 2 : 1, ms);
    } while (n < 0 && errno == EINTR);
    if (n <= 0 || (stop_fd >= 0 && (p[1].revents & POLLIN))) {
        return 0;
    }
    return (p[0].revents & (POLLIN | POLLHUP | POLLERR)) != 0;
}


/* One whole message of exactly len bytes: 0, or -1 (short, oversized,
 * closed, timed out). */
static int
sh_recv_exact(int fd, int stop_fd, int ms, void *buf, size_t len)
{
    struct msghdr  mh;
    struct iovec   iov;
    ssize_t        n;

    if (!sh_wait_in(fd, stop_fd, ms)) {
        return -1;
    }
    memset(&mh, 0, sizeof(mh));
    iov.iov_base = buf;
    iov.iov_len = len;
    mh.msg_iov = &iov;
    mh.msg_iovlen = 1;
    n = recvmsg(fd, &mh, MSG_DONTWAIT);
    if (n != (ssize_t) len || (mh.msg_flags & (MSG_TRUNC | MSG_CTRUNC))) {
        return -1;
    }
    return 0;
}


static int
sh_send(int fd, const void *buf, size_t len, int pass_fd)
{
    struct msghdr   mh;
    struct iovec    iov;
    struct cmsghdr *cm;
    union {
        char            buf[CMSG_SPACE(sizeof(int))];
        struct cmsghdr  align;
    } u;
    ssize_t         n;

    memset(&mh, 0, sizeof(mh));
    iov.iov_base = (void *) buf;
    iov.iov_len = len;
    mh.msg_iov = &iov;
    mh.msg_iovlen = 1;
    if (pass_fd >= 0) {
        memset(&u, 0, sizeof(u));
        mh.msg_control = u.buf;
        mh.msg_controllen = sizeof(u.buf);
        cm = CMSG_FIRSTHDR(&mh);
        cm->cmsg_level = SOL_SOCKET;
        cm->cmsg_type = SCM_RIGHTS;
        cm->cmsg_len = CMSG_LEN(sizeof(int));
        memcpy(CMSG_DATA(cm), &pass_fd, sizeof(int));
    }
    do {
        n = sendmsg(fd, &mh, MSG_NOSIGNAL);
    } while (n < 0 && errno == EINTR);
    return n == (ssize_t) len ? 0 : -1;
}


/* One connection, on the server thread: 1 handed over, 0 not, -1 a
 * probe answered. */
static int
sh_serve_one(moe_share_server_t *s, int c, int64_t *pid)
{
    moe_share_req_t  req;
    moe_share_hdr_t  hdr;
    moe_share_ack_t  ack;
    struct ucred     cr;
    socklen_t        crlen = sizeof(cr);
    int              ok;

    /* abstract names are visible to every user of the network namespace:
     * only our own uid gets an answer */
    if (getsockopt(c, SOL_SOCKET, SO_PEERCRED, &cr, &crlen) != 0
        || cr.uid != getuid())
    {
        return 0;
    }
    if (sh_recv_exact(c, s->stop_fd, SH_IO_MS, &req, sizeof(req)) != 0) {
        return 0;
    }
    hdr = s->hdr;
    if (req.magic != MOE_SHARE_MAGIC || req.version != MOE_SHARE_VERSION
        || memchr(req.key, '\0', sizeof(req.key)) == NULL)
    {
        hdr.status = MOE_SHARE_BAD;
        (void) sh_send(c, &hdr, sizeof(hdr), -1);
        return 0;
    }
    ok = strcmp(req.key, s->hdr.key) == 0;
    hdr.status = ok ? MOE_SHARE_OK : MOE_SHARE_MISMATCH;
    if (ok && (req.flags & MOE_SHARE_PROBE)) {
        (void) sh_send(c, &hdr, sizeof(hdr), -1);
        return -1;
    }
    if (sh_send(c, &hdr, sizeof(hdr), ok ? s->fd : -1) != 0 || !ok) {
        return 0;
    }
    if (sh_recv_exact(c, s->stop_fd, SH_ACK_MS, &ack, sizeof(ack)) != 0
        || ack.magic != MOE_SHARE_MAGIC || ack.imported != 1)
    {
        return 0;
    }
    *pid = req.pid;
    return 1;
}


static int
sh_bind(moe_share_server_t *s)
{
    struct sockaddr_un  sa;
    socklen_t           salen;
    int                 fd;

    if (sh_addr(s->name, s->namelen, &sa, &salen) != 0) {
        return -1;
    }
    fd = socket(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC, 0);
    if (fd < 0) {
        return -1;
    }
    if (bind(fd, (struct sockaddr *) &sa, salen) != 0 || listen(fd, 4) != 0)
    {
        close(fd);
        return -1;
    }
    return fd;
}


static void *
sh_thread(void *arg)
{
    moe_share_server_t *s = arg;
    struct pollfd       p[2];
    double              t0;
    int64_t             pid;
    int                 c, n, got;

    for ( ;; ) {
        if (s->lfd < 0) {
            s->lfd = sh_bind(s);
        }
        p[0].fd = s->stop_fd;
        p[0].events = POLLIN;
        p[1].fd = s->lfd;
        p[1].events = POLLIN;
        n = poll(p, s->lfd >= 0 ? 2 : 1, s->lfd >= 0 ? -1 : SH_BIND_MS);
        if (n < 0 && errno != EINTR) {
            break;
        }
        if (n > 0 && (p[0].revents & POLLIN)) {
            break;
        }
        if (s->lfd < 0 || n <= 0 || !(p[1].revents & POLLIN)) {
            continue;
        }
        c = accept4(s->lfd, NULL, NULL, SOCK_CLOEXEC);
        if (c < 0) {
            continue;
        }
        t0 = sh_now_ms();
        pid = 0;
        got = sh_serve_one(s, c, &pid);
        close(c);
        pthread_mutex_lock(&s->mu);
        if (got < 0) {
            /* a probe: neither a hand-over nor a failure */
        } else if (got) {
            s->done++;
            s->last_pid = pid;
            s->last_ms = sh_now_ms() - t0;
            pthread_cond_broadcast(&s->cv);
        } else {
            s->failed++;
        }
        pthread_mutex_unlock(&s->mu);
    }
    return NULL;
}


moe_share_server_t *
moe_share_serve(const char *key, int fd, const moe_share_hdr_t *hdr,
    char *err, size_t errlen)
{
    moe_share_server_t *s;

    if (key == NULL || strlen(key) >= MOE_SHARE_KEY_MAX || fd < 0
        || hdr == NULL)
    {
        moe_errf(err, errlen, "share: bad server arguments");
        return NULL;
    }
    s = calloc(1, sizeof(*s));
    if (s == NULL) {
        moe_errf(err, errlen, "share: out of memory");
        return NULL;
    }
    s->lfd = -1;
    s->fd = fcntl(fd, F_DUPFD_CLOEXEC, 0);
    s->stop_fd = eventfd(0, EFD_CLOEXEC);
    if (s->fd < 0 || s->stop_fd < 0) {
        moe_errf(err, errlen, "share: fd: %s", strerror(errno));
        goto fail;
    }
    s->hdr = *hdr;
    s->hdr.magic = MOE_SHARE_MAGIC;
    s->hdr.version = MOE_SHARE_VERSION;
    s->hdr.status = MOE_SHARE_OK;
    s->hdr.pid = (int64_t) getpid();
    memset(s->hdr.key, 0, sizeof(s->hdr.key));
    memcpy(s->hdr.key, key, strlen(key));
    s->namelen = moe_share_sockname(key, s->name, sizeof(s->name));
    pthread_mutex_init(&s->mu, NULL);
    pthread_cond_init(&s->cv, NULL);
    /* bind now when the name is free: a fetch right after this returns
     * finds it (the thread retries while another process holds it) */
    s->lfd = sh_bind(s);
    if (pthread_create(&s->thr, NULL, sh_thread, s) != 0) {
        moe_errf(err, errlen, "share: cannot start the server thread");
        pthread_mutex_destroy(&s->mu);
        pthread_cond_destroy(&s->cv);
        goto fail;
    }
    s->started = 1;
    return s;

fail:
    if (s->lfd >= 0) {
        close(s->lfd);
    }
    if (s->fd >= 0) {
        close(s->fd);
    }
    if (s->stop_fd >= 0) {
        close(s->stop_fd);
    }
    free(s);
    return NULL;
}


int
moe_share_server_wait(moe_share_server_t *s, int timeout_ms, int64_t *pid,
    double *ms)
{
    struct timespec  dl;
    int              got;

    if (s == NULL) {
        return 0;
    }
    clock_gettime(CLOCK_REALTIME, &dl);
    dl.tv_sec += timeout_ms / 1000;
    dl.tv_nsec += (long) (timeout_ms % 1000) * 1000000L;
    if (dl.tv_nsec >= 1000000000L) {
        dl.tv_sec++;
        dl.tv_nsec -= 1000000000L;
    }
    pthread_mutex_lock(&s->mu);
    while (s->done == 0) {
        if (pthread_cond_timedwait(&s->cv, &s->mu, &dl) != 0) {
            break;
        }
    }
    got = s->done > 0;
    if (got) {
        if (pid != NULL) {
            *pid = s->last_pid;
        }
        if (ms != NULL) {
            *ms = s->last_ms;
        }
    }
    pthread_mutex_unlock(&s->mu);
    return got;
}


void
moe_share_server_counts(moe_share_server_t *s, int *done, int *failed)
{
    pthread_mutex_lock(&s->mu);
    *done = s->done;
    *failed = s->failed;
    pthread_mutex_unlock(&s->mu);
}


void
moe_share_server_stop(moe_share_server_t *s)
{
    uint64_t one = 1;

    if (s == NULL) {
        return;
    }
    if (s->started) {
        if (write(s->stop_fd, &one, sizeof(one)) != sizeof(one)) {
            /* an eventfd write fails only on overflow: cannot happen */
        }
        pthread_join(s->thr, NULL);
        pthread_mutex_destroy(&s->mu);
        pthread_cond_destroy(&s->cv);
    }
    if (s->lfd >= 0) {
        close(s->lfd);
    }
    close(s->fd);
    close(s->stop_fd);
    free(s);
}


static int
sh_ask(const char *key, int flags, int timeout_ms, int *fd,
    moe_share_hdr_t *hdr, int *conn, char *err, size_t errlen)
{
    struct sockaddr_un  sa;
    socklen_t           salen;
    moe_share_req_t     req;
    struct msghdr       mh;
    struct iovec        iov;
    struct cmsghdr     *cm;
    union {
        char            buf[CMSG_SPACE(4 * sizeof(int))];
        struct cmsghdr  align;
    } u;
    char                name[sizeof(sa.sun_path)];
    size_t              namelen;
    ssize_t             n;
    int                 c, got[4], n_got = 0, i, k;

    *fd = -1;
    *conn = -1;
    if (key == NULL || strlen(key) >= MOE_SHARE_KEY_MAX) {
        moe_errf(err, errlen, "share: bad key");
        return MOE_EINVAL;
    }
    namelen = moe_share_sockname(key, name, sizeof(name));
    if (sh_addr(name, namelen, &sa, &salen) != 0) {
        moe_errf(err, errlen, "share: socket name too long");
        return MOE_EINVAL;
    }
    c = socket(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC, 0);
    if (c < 0) {
        moe_errf(err, errlen, "share: socket: %s", strerror(errno));
        return MOE_EIO;
    }
    if (connect(c, (struct sockaddr *) &sa, salen) != 0) {
        moe_errf(err, errlen, "share: no exporter (%s)", strerror(errno));
        close(c);
        return MOE_EIO;
    }
    memset(&req, 0, sizeof(req));
    req.magic = MOE_SHARE_MAGIC;
    req.version = MOE_SHARE_VERSION;
    req.flags = flags;
    req.pid = (int64_t) getpid();
    memcpy(req.key, key, strlen(key));
    if (sh_send(c, &req, sizeof(req), -1) != 0
        || !sh_wait_in(c, -1, timeout_ms))
    {
        moe_errf(err, errlen, "share: the exporter did not answer");
        close(c);
        return MOE_EIO;
    }
    memset(&mh, 0, sizeof(mh));
    memset(&u, 0, sizeof(u));
    iov.iov_base = hdr;
    iov.iov_len = sizeof(*hdr);
    mh.msg_iov = &iov;
    mh.msg_iovlen = 1;
    mh.msg_control = u.buf;
    mh.msg_controllen = sizeof(u.buf);
    n = recvmsg(c, &mh, MSG_DONTWAIT | MSG_CMSG_CLOEXEC);
    /* every fd that came is ours to close, whatever else is wrong */
    for (cm = CMSG_FIRSTHDR(&mh); n >= 0 && cm != NULL;
         cm = CMSG_NXTHDR(&mh, cm))
    {
        if (cm->cmsg_level != SOL_SOCKET || cm->cmsg_type != SCM_RIGHTS) {
            continue;
        }
        k = (int) ((cm->cmsg_len - CMSG_LEN(0)) / sizeof(int));
        for (i = 0; i < k && n_got < 4; i++) {
            memcpy(&got[n_got++], CMSG_DATA(cm) + i * sizeof(int),
                   sizeof(int));
        }
    }
    if (n != (ssize_t) sizeof(*hdr) || (mh.msg_flags & (MSG_TRUNC
                                                        | MSG_CTRUNC))
        || hdr->magic != MOE_SHARE_MAGIC
        || hdr->version != MOE_SHARE_VERSION
        || memchr(hdr->key, '\0', sizeof(hdr->key)) == NULL)
    {
        moe_errf(err, errlen, "share: malformed answer from the exporter");
        goto fail;
    }
    if (hdr->status != MOE_SHARE_OK || strcmp(hdr->key, key) != 0) {
        moe_errf(err, errlen, "share: pid %lld exports another key",
                 (long long) hdr->pid);
        goto fail;
    }
    if (flags & MOE_SHARE_PROBE) {
        if (n_got != 0) {
            moe_errf(err, errlen, "share: an fd came with a probe");
            goto fail;
        }
        close(c);
        return MOE_OK;
    }
    if (n_got != 1 || hdr->bytes == 0) {
        moe_errf(err, errlen, "share: pid %lld sent %d fds for %llu bytes",
                 (long long) hdr->pid, n_got,
                 (unsigned long long) hdr->bytes);
        goto fail;
    }
    *fd = got[0];
    *conn = c;
    return MOE_OK;

fail:
    for (i = 0; i < n_got; i++) {
        close(got[i]);
    }
    close(c);
    return MOE_EINVAL;
}


int
moe_share_fetch(const char *key, int timeout_ms, int *fd,
    moe_share_hdr_t *hdr, int *conn, char *err, size_t errlen)
{
    return sh_ask(key, 0, timeout_ms, fd, hdr, conn, err, errlen);
}


int
moe_share_probe(const char *key, int timeout_ms, moe_share_hdr_t *hdr,
    char *err, size_t errlen)
{
    int fd, conn;

    return sh_ask(key, MOE_SHARE_PROBE, timeout_ms, &fd, hdr, &conn, err,
                  errlen);
}


void
moe_share_ack(int conn, int imported)
{
    moe_share_ack_t ack;

    if (conn < 0) {
        return;
    }
    memset(&ack, 0, sizeof(ack));
    ack.magic = MOE_SHARE_MAGIC;
    ack.version = MOE_SHARE_VERSION;
    ack.imported = imported ? 1 : 0;
    (void) sh_send(conn, &ack, sizeof(ack), -1);
    close(conn);
}
