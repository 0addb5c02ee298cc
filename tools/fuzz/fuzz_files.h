/*
 * Shared pieces of the file-side libFuzzer harnesses (tools/fuzz/FILES.md):
 * a private temporary directory per fuzzer process (removed at exit), the
 * files written into it from a fuzz input, and FF_CHECK, which fails a run
 * (abort, so libFuzzer keeps the input as a crash) when the engine broke
 * one of its promises without a sanitizer noticing: a failure without a
 * message naming the file, a success that violates a documented invariant.
 */

#ifndef MOE_FUZZ_FILES_H
#define MOE_FUZZ_FILES_H

#include <ftw.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "moe.h"

#define FF_CHECK(cond, ...)                                                \
    do {                                                                   \
        if (!(cond)) {                                                     \
            fprintf(stderr, "fuzz check failed at %s:%d: %s: ", __FILE__,  \
                    __LINE__, #cond);                                      \
            fprintf(stderr, __VA_ARGS__);                                  \
            fprintf(stderr, "\n");                                         \
            abort();                                                       \
        }                                                                  \
    } while (0)

static char  ff_tmp[64];


static int
ff_rm(const char *path, const struct stat *sb, int flag, struct FTW *ftw)
{
    (void) sb;
    (void) flag;
    (void) ftw;
    return remove(path);
}


static void
ff_cleanup(void)
{
    if (ff_tmp[0] != '\0') {
        nftw(ff_tmp, ff_rm, 8, FTW_DEPTH | FTW_PHYS);
    }
}


static void
ff_quiet(void *ctx, int level, const char *msg)
{
    (void) ctx;
    (void) level;
    (void) msg;
}


/* The process's temporary directory, made on the first call. */
static const char *
ff_dir(void)
{
    if (ff_tmp[0] == '\0') {
        snprintf(ff_tmp, sizeof(ff_tmp), "/tmp/moe-fuzz-XXXXXX");
        if (mkdtemp(ff_tmp) == NULL) {
            perror("mkdtemp");
            abort();
        }
        atexit(ff_cleanup);
        moe_set_log(ff_quiet, NULL);
    }
    return ff_tmp;
}


/* "<dir>/<name>" into buf. */
static void
ff_path(char *buf, size_t size, const char *name)
{
    snprintf(buf, size, "%s/%s", ff_dir(), name);
}


/* Write n bytes to path (replacing it); aborts when it cannot. */
static void
ff_write(const char *path, const void *data, size_t n)
{
    FILE  *f = fopen(path, "wb");

    if (f == NULL || (n > 0 && fwrite(data, 1, n, f) != n)
        || fclose(f) != 0)
    {
        perror(path);
        abort();
    }
}

#endif /* MOE_FUZZ_FILES_H */
