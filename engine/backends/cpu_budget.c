/*
 * An emulated device-memory budget for the CPU backend, so that what a GPU
 * does when two copies of a model do not fit (the new worker of a reload
 * beside the old one, a switch beside the old model) happens on the CPU
 * too, and can be tested without a GPU.
 *
 *   MOE_CPU_MEMORY_LIMIT  the budget in bytes (a k, m or g suffix: KiB, MiB,
 *                         GiB); unset or 0: no budget (the default)
 *   MOE_CPU_MEMORY_FILE   the accounting file the processes sharing the
 *                         budget use (default /tmp/localmoe-cpu-memory-<uid>)
 *
 * The file holds one "pid bytes" line per process that holds memory; it is
 * read and rewritten under flock(), and lines of processes that are gone
 * are dropped, so a worker that exits (or crashes) frees its share as a
 * dead process frees GPU memory.
 */

#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/file.h>
#include <unistd.h>

#include "backends/backend.h"

#define BUDGET_MAX_PIDS 64

typedef struct {
    long     pid;
    int64_t  bytes;
} budget_entry_t;


static int64_t
budget_limit(void)
{
    const char  *s;
    char        *end;
    double       v;

    s = getenv("MOE_CPU_MEMORY_LIMIT");
    if (s == NULL || *s == '\0') {
        return 0;
    }

    v = strtod(s, &end);
    switch (*end) {
    case 'k': case 'K': v *= 1024.0; break;
    case 'm': case 'M': v *= 1024.0 * 1024.0; break;
    case 'g': case 'G': v *= 1024.0 * 1024.0 * 1024.0; break;
    default: break;
    }

    return v > 0 ? (int64_t) v : 0;
}


static int
budget_open(void)
{
    const char  *f;
    char         def[64];

    f = getenv("MOE_CPU_MEMORY_FILE");
    if (f == NULL || *f == '\0') {
        snprintf(def, sizeof(def), "/tmp/localmoe-cpu-memory-%ld",
                 (long) getuid());
        f = def;
    }

    return open(f, O_RDWR | O_CREAT | O_CLOEXEC, 0600);
}


/* the live entries of the locked file fd */
static int
budget_read(int fd, budget_entry_t *e)
{
    FILE       *fp;
    int         n, dup_fd;
    long        pid;
    long long   bytes;

    n = 0;
    dup_fd = dup(fd);
    if (dup_fd < 0) {
        return 0;
    }

    lseek(dup_fd, 0, SEEK_SET);
    fp = fdopen(dup_fd, "r");
    if (fp == NULL) {
        close(dup_fd);
        return 0;
    }

    while (n < BUDGET_MAX_PIDS && fscanf(fp, "%ld %lld", &pid, &bytes) == 2)
    {
        if (pid <= 0 || bytes <= 0) {
            continue;
        }
        if (kill((pid_t) pid, 0) != 0 && errno == ESRCH) {
            continue;                       /* gone: its memory is free */
        }
        e[n].pid = pid;
        e[n].bytes = bytes;
        n++;
    }

    fclose(fp);
    return n;
}


static void
budget_write(int fd, const budget_entry_t *e, int n)
{
    char  line[64];
    int   i, len;

    if (ftruncate(fd, 0) != 0) {
        return;
    }
    lseek(fd, 0, SEEK_SET);

    for (i = 0; i < n; i++) {
        if (e[i].bytes <= 0) {
            continue;
        }
        len = snprintf(line, sizeof(line), "%ld %lld\n", e[i].pid,
                       (long long) e[i].bytes);
        if (write(fd, line, (size_t) len) != len) {
            return;
        }
    }
}


/* add delta (may be negative) to this process's entry; MOE_ENOMEM when a
 * positive delta does not fit */
static int
budget_add(int64_t delta, int64_t limit, char *err, size_t errlen)
{
    budget_entry_t  e[BUDGET_MAX_PIDS + 1];
    int64_t         used;
    long            self;
    int             fd, n, i, me;

    fd = budget_open();
    if (fd < 0) {
        moe_errf(err, errlen, "cpu memory budget: cannot open the "
                 "accounting file: %s", strerror(errno));
        return delta > 0 ? MOE_EIO : MOE_OK;
    }

    if (flock(fd, LOCK_EX) != 0) {
        close(fd);
        moe_errf(err, errlen, "cpu memory budget: cannot lock the "
                 "accounting file: %s", strerror(errno));
        return delta > 0 ? MOE_EIO : MOE_OK;
    }

    n = budget_read(fd, e);
    self = (long) getpid();
    used = 0;
    me = -1;

    for (i = 0; i < n; i++) {
        used += e[i].bytes;
        if (e[i].pid == self) {
            me = i;
        }
    }

    if (delta > 0 && used + delta > limit) {
        moe_errf(err, errlen, "out of memory: %lld MiB more do not fit in "
                 "the CPU memory budget of %lld MiB (MOE_CPU_MEMORY_LIMIT; "
                 "%lld MiB held by %d process%s)",
                 (long long) (delta >> 20), (long long) (limit >> 20),
                 (long long) (used >> 20), n, n == 1 ? "" : "es");
        budget_write(fd, e, n);             /* drops the dead */
        flock(fd, LOCK_UN);
        close(fd);
        return MOE_ENOMEM;
    }

    if (me < 0) {
        me = n < BUDGET_MAX_PIDS ? n++ : n - 1;
        e[me].pid = self;
        e[me].bytes = 0;
    }

    e[me].bytes += delta;
    budget_write(fd, e, n);

    flock(fd, LOCK_UN);
    close(fd);

    return MOE_OK;
}


int
moe_cpu_budget_reserve(int64_t bytes, char *err, size_t errlen)
{
    int64_t  limit;

    limit = budget_limit();

    if (limit == 0 || bytes <= 0) {
        return MOE_OK;
    }

    return budget_add(bytes, limit, err, errlen);
}


void
moe_cpu_budget_release(int64_t bytes)
{
    if (budget_limit() == 0 || bytes <= 0) {
        return;
    }

    (void) budget_add(-bytes, INT64_MAX, NULL, 0);
}
