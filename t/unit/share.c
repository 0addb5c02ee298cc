/*
 * The weight hand-over protocol without a GPU (engine/backends/share.c):
 * the key, an fd passed to another process, refusals (another key, bad
 * magic, short messages, a peer that dies or says nothing), the next
 * exporter taking the name over, and no fd leaked by any of it.
 */

#include <dirent.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "moe.h"
#include "backends/share.h"
#include "tap.h"

#define BYTES  65536


static int
count_fds(void)
{
    DIR           *d = opendir("/proc/self/fd");
    struct dirent *de;
    int            n = 0;

    if (d == NULL) {
        return -1;
    }
    while ((de = readdir(d)) != NULL) {
        n += de->d_name[0] != '.';
    }
    closedir(d);
    return n - 1;               /* the DIR's own */
}


static int
pattern_ok(int fd, uint32_t salt)
{
    uint32_t *p;
    int       i, ok = 1;

    p = mmap(NULL, BYTES, PROT_READ, MAP_SHARED, fd, 0);
    if (p == MAP_FAILED) {
        return 0;
    }
    for (i = 0; i < BYTES / 4; i++) {
        ok &= p[i] == (uint32_t) i * 2654435761U + salt;
    }
    munmap(p, BYTES);
    return ok;
}


static int
make_buffer(uint32_t salt)
{
    uint32_t *p;
    int       fd, i;

    fd = memfd_create("share-test", MFD_CLOEXEC);
    if (fd < 0 || ftruncate(fd, BYTES) != 0) {
        return -1;
    }
    p = mmap(NULL, BYTES, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    if (p == MAP_FAILED) {
        return -1;
    }
    for (i = 0; i < BYTES / 4; i++) {
        p[i] = (uint32_t) i * 2654435761U + salt;
    }
    munmap(p, BYTES);
    return fd;
}


/* A raw connection to key's name (the tests' misbehaving peers). */
static int
raw_connect(const char *key)
{
    struct sockaddr_un sa;
    char               name[sizeof(sa.sun_path)];
    size_t             n;
    int                c;

    n = moe_share_sockname(key, name, sizeof(name));
    memset(&sa, 0, sizeof(sa));
    sa.sun_family = AF_UNIX;
    memcpy(sa.sun_path, name, n);
    c = socket(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC, 0);
    if (c < 0 || connect(c, (struct sockaddr *) &sa,
                         (socklen_t) (offsetof(struct sockaddr_un, sun_path)
                                      + n)) != 0)
    {
        if (c >= 0) {
            close(c);
        }
        return -1;
    }
    return c;
}


/* Wait until the server has counted done + failed >= n. */
static void
wait_counts(moe_share_server_t *s, int n)
{
    int d, f, i;

    for (i = 0; i < 400; i++) {
        moe_share_server_counts(s, &d, &f);
        if (d + f >= n) {
            return;
        }
        usleep(10000);
    }
}


int
main(void)
{
    char                 dir[] = "/tmp/moe-share-XXXXXX", path[256];
    char                 k1[MOE_SHARE_KEY_MAX], k2[MOE_SHARE_KEY_MAX];
    char                 k3[MOE_SHARE_KEY_MAX], dev[64], err[256];
    char                 n1[108], n2[108];
    moe_share_key_in_t   in;
    moe_share_hdr_t      hdr, h;
    moe_share_req_t      req;
    moe_share_server_t  *s, *s2;
    struct timespec      ts[2];
    int64_t              pid;
    double               ms;
    int                  fd, fd2, got, conn, rc, c, d, f, fds0, st;
    pid_t                child;
    FILE                *fp;

    TAP_PLAN(33);

    /* ---- the key */
    if (mkdtemp(dir) == NULL) {
        return 1;
    }
    snprintf(path, sizeof(path), "%s/config.json", dir);
    fp = fopen(path, "w");
    fputs("{\"model_type\": \"mixtral\"}\n", fp);
    fclose(fp);
    snprintf(dev, sizeof(dev), "cpu:test-%d", (int) getpid());
    memset(&in, 0, sizeof(in));
    in.device = dev;
    in.model_dir = dir;
    in.layout_bytes = BYTES;
    in.layout_sum = moe_share_sum(0, "offsets", 7);
    in.quant = "none";
    in.dtype = "bf16";
    in.tp = 1;
    rc = moe_share_key(&in, k1, sizeof(k1), err, sizeof(err));
    TAP_OK(rc == MOE_OK && strstr(k1, "tp=1 rank=0") != NULL,
           "key: %s", k1);
    rc = moe_share_key(&in, k2, sizeof(k2), err, sizeof(err));
    TAP_OK(rc == MOE_OK && strcmp(k1, k2) == 0, "key: stable");
    /* config.json rewritten under the same path: another key */
    ts[0].tv_sec = ts[1].tv_sec = 1000000000;
    ts[0].tv_nsec = ts[1].tv_nsec = 0;
    utimensat(AT_FDCWD, path, ts, 0);
    rc = moe_share_key(&in, k2, sizeof(k2), err, sizeof(err));
    TAP_OK(rc == MOE_OK && strcmp(k1, k2) != 0,
           "key: config.json's mtime is part of it");
    rc = moe_share_key(&in, k1, sizeof(k1), err, sizeof(err));
    in.rank = 1;
    in.tp = 2;
    rc |= moe_share_key(&in, k2, sizeof(k2), err, sizeof(err));
    TAP_OK(rc == MOE_OK && strcmp(k1, k2) != 0, "key: rank is part of it");
    in.tp = 1;
    in.rank = 0;
    in.layout_sum ^= 1;
    rc = moe_share_key(&in, k2, sizeof(k2), err, sizeof(err));
    TAP_OK(rc == MOE_OK && strcmp(k1, k2) != 0,
           "key: the layout checksum is part of it");
    in.layout_sum ^= 1;
    in.model_dir = "/nonexistent/model";
    rc = moe_share_key(&in, k2, sizeof(k2), err, sizeof(err));
    TAP_OK(rc == MOE_EIO && strstr(err, "/nonexistent/model") != NULL,
           "key: a missing model directory: %s", err);
    in.model_dir = NULL;
    in.seed = 7;
    rc = moe_share_key(&in, k3, sizeof(k3), err, sizeof(err));
    TAP_OK(rc == MOE_OK && strstr(k3, "dummy seed=7") != NULL,
           "key: dummy weights by seed");
    rc = moe_share_key(&in, k2, 40, err, sizeof(err));
    TAP_OK(rc == MOE_EINVAL && k2[0] == '\0', "key: too long refused");
    moe_share_sockname(k1, n1, sizeof(n1));
    moe_share_sockname(k3, n2, sizeof(n2));
    TAP_OK(n1[0] == '\0' && strcmp(n1 + 1, n2 + 1) != 0
           && strncmp(n1 + 1, "localmoe-share-", 15) == 0,
           "socket names: abstract, one per key (%s)", n1 + 1);

    /* ---- nothing served yet */
    fds0 = count_fds();
    rc = moe_share_fetch(k1, 500, &got, &h, &conn, err, sizeof(err));
    TAP_OK(rc == MOE_EIO && got == -1 && conn == -1,
           "fetch without an exporter: %s", err);

    /* ---- serve, fetch in another process */
    fd = make_buffer(17);
    memset(&hdr, 0, sizeof(hdr));
    hdr.bytes = BYTES;
    hdr.layout_sum = in.layout_sum;
    hdr.kv_blocks = 1234;
    s = moe_share_serve(k1, fd, &hdr, err, sizeof(err));
    TAP_OK(s != NULL, "serve");
    if (s == NULL) {
        return 1;
    }
    close(fd);                      /* the server holds its own */
    child = fork();
    if (child == 0) {
        rc = moe_share_fetch(k1, 2000, &got, &h, &conn, err, sizeof(err));
        if (rc != MOE_OK || h.kv_blocks != 1234 || h.pid != getppid()
            || !pattern_ok(got, 17))
        {
            _exit(1);
        }
        moe_share_ack(conn, 1);
        close(got);
        _exit(0);
    }
    waitpid(child, &st, 0);
    TAP_OK(WIFEXITED(st) && WEXITSTATUS(st) == 0,
           "another process fetched the fd and read the pattern");
    TAP_OK(moe_share_server_wait(s, 2000, &pid, &ms) == 1 && pid == child,
           "the exporter saw the hand-over to pid %lld (%.2f ms)",
           (long long) pid, ms);

    /* ---- a probe: the header, no fd, not counted */
    memset(&h, 0, sizeof(h));
    rc = moe_share_probe(k1, 2000, &h, err, sizeof(err));
    TAP_OK(rc == MOE_OK && h.kv_blocks == 1234 && h.pid == getpid(),
           "probe: the header without an fd");
    rc = moe_share_probe(k3, 500, &h, err, sizeof(err));
    TAP_OK(rc == MOE_EIO, "probe of a key nobody serves: %s", err);

    /* ---- the same key from this process, imported = 0 */
    rc = moe_share_fetch(k1, 2000, &got, &h, &conn, err, sizeof(err));
    TAP_OK(rc == MOE_OK && h.bytes == BYTES && pattern_ok(got, 17),
           "fetch in process");
    moe_share_ack(conn, 0);
    close(got);
    wait_counts(s, 2);
    moe_share_server_counts(s, &d, &f);
    TAP_OK(d == 1 && f == 1, "a refused import counts as failed");

    /* ---- another key on the same name: refused, no fd */
    c = raw_connect(k1);
    memset(&req, 0, sizeof(req));
    req.magic = MOE_SHARE_MAGIC;
    req.version = MOE_SHARE_VERSION;
    memcpy(req.key, k1, strlen(k1));
    req.key[0] ^= 1;              /* same name, another key */
    rc = (int) send(c, &req, sizeof(req), 0);
    memset(&h, 0, sizeof(h));
    {
        struct msghdr mh;
        struct iovec  iov;
        char          cbuf[CMSG_SPACE(sizeof(int))];

        memset(&mh, 0, sizeof(mh));
        iov.iov_base = &h;
        iov.iov_len = sizeof(h);
        mh.msg_iov = &iov;
        mh.msg_iovlen = 1;
        mh.msg_control = cbuf;
        mh.msg_controllen = sizeof(cbuf);
        rc = (int) recvmsg(c, &mh, 0);
        TAP_OK(rc == (int) sizeof(h) && h.status == MOE_SHARE_MISMATCH
               && mh.msg_controllen == 0,
               "a request for another key: MISMATCH, no fd");
    }
    close(c);

    /* ---- bad magic */
    c = raw_connect(k1);
    req.magic = 0xdeadbeef;
    (void) send(c, &req, sizeof(req), 0);
    rc = (int) recv(c, &h, sizeof(h), 0);
    TAP_OK(rc == (int) sizeof(h) && h.status == MOE_SHARE_BAD,
           "a bad magic: BAD");
    close(c);

    /* ---- a short request, an oversized one */
    c = raw_connect(k1);
    (void) send(c, "hello", 5, 0);
    rc = (int) recv(c, &h, sizeof(h), 0);
    TAP_OK(rc == 0, "a short request: connection closed, no answer");
    close(c);
    c = raw_connect(k1);
    {
        char big[sizeof(req) + 64];

        memset(big, 'x', sizeof(big));
        (void) send(c, big, sizeof(big), 0);
    }
    rc = (int) recv(c, &h, sizeof(h), 0);
    TAP_OK(rc == 0, "an oversized request: connection closed");
    close(c);

    /* ---- a peer that connects and dies, one that says nothing */
    c = raw_connect(k1);
    close(c);
    c = raw_connect(k1);
    rc = moe_share_fetch(k1, 3000, &got, &h, &conn, err, sizeof(err));
    TAP_OK(rc == MOE_OK && pattern_ok(got, 17),
           "served after a dead peer and behind a silent one (1 s)");
    moe_share_ack(conn, 1);
    close(got);
    close(c);

    /* ---- a peer that takes the fd and never acks (dies) */
    rc = moe_share_fetch(k1, 2000, &got, &h, &conn, err, sizeof(err));
    close(conn);
    close(got);
    TAP_OK(rc == MOE_OK, "a peer that dies before acking");
    rc = moe_share_fetch(k1, 2000, &got, &h, &conn, err, sizeof(err));
    TAP_OK(rc == MOE_OK, "served after it");
    moe_share_ack(conn, 1);
    close(got);

    /* ---- the next exporter: waits for the name, then serves its own */
    fd2 = make_buffer(99);
    s2 = moe_share_serve(k1, fd2, &hdr, err, sizeof(err));
    close(fd2);
    TAP_OK(s2 != NULL, "a second exporter of the same key starts");
    rc = moe_share_fetch(k1, 2000, &got, &h, &conn, err, sizeof(err));
    TAP_OK(rc == MOE_OK && pattern_ok(got, 17),
           "the first exporter still answers while it lives");
    moe_share_ack(conn, 1);
    close(got);
    wait_counts(s, 12);
    moe_share_server_counts(s, &d, &f);
    TAP_DIAG("first exporter: %d done, %d failed", d, f);
    TAP_OK(d == 4 && f == 8, "counts: 4 hand-overs, 8 refused or broken");
    moe_share_server_stop(s);
    got = -1;
    for (rc = MOE_EIO, c = 0; c < 50 && rc != MOE_OK; c++) {
        usleep(50000);
        rc = moe_share_fetch(k1, 2000, &got, &h, &conn, err, sizeof(err));
    }
    TAP_OK(rc == MOE_OK && pattern_ok(got, 99),
           "after it stops the second takes the name over");
    moe_share_ack(conn, 1);
    if (got >= 0) {
        close(got);
    }
    TAP_OK(moe_share_server_wait(s2, 2000, &pid, &ms) == 1
           && pid == getpid(), "the second saw its hand-over");
    TAP_OK(moe_share_server_wait(NULL, 10, &pid, &ms) == 0,
           "wait on no server: 0");
    moe_share_server_stop(s2);
    moe_share_server_stop(NULL);
    TAP_OK(moe_share_serve(k1, -1, &hdr, err, sizeof(err)) == NULL,
           "serve without an fd refused");

    /* ---- a wait with no importer times out */
    fd = make_buffer(3);
    s = moe_share_serve(k3, fd, &hdr, err, sizeof(err));
    close(fd);
    {
        struct timespec a, b;

        clock_gettime(CLOCK_MONOTONIC, &a);
        rc = moe_share_server_wait(s, 300, &pid, &ms);
        clock_gettime(CLOCK_MONOTONIC, &b);
        ms = (b.tv_sec - a.tv_sec) * 1e3 + (b.tv_nsec - a.tv_nsec) / 1e6;
    }
    TAP_OK(rc == 0 && ms >= 250 && ms < 2000,
           "no importer: the wait ends after its bound (%.0f ms)", ms);
    moe_share_server_stop(s);

    TAP_OK(count_fds() == fds0, "no fd leaked (%d open, %d before)",
           count_fds(), fds0);
    unlink(path);
    rmdir(dir);
    return TAP_DONE();
}
