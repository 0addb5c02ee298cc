/*
 * libFuzzer harness: the safetensors reader (engine/model/safetensors.c).
 *
 * The input is written as model.safetensors and opened with
 * moe_st_open_file(); an input starting with '{' is instead the
 * model.safetensors.index.json of a directory holding two small shards,
 * a.safetensors (tensors x, y) and b.safetensors (z), opened with
 * moe_st_open_dir().  Checks, beyond the sanitizers (out-of-bounds reads
 * of the mapping, leaks, UB, allocations over -malloc_limit_mb):
 *   - a failure names the file (or the directory) in its message (out of
 *     memory aside);
 *   - an open set is consistent: every tensor is found by its name, its
 *     dtype is known, nbytes == numel * dtype size, numel is the product
 *     of the shape, and the data lies inside the file;
 *   - moe_st_to_f32() converts every tensor whole and in two pieces, and
 *     refuses ranges outside the tensor.
 */

#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#include "fuzz_files.h"
#include "model/safetensors.h"


static void
check_tensor(const moe_st_set_t *s, const moe_st_tensor_t *t,
    size_t file_size)
{
    int64_t  numel = 1, half;
    float   *dst;
    int      i;

    FF_CHECK(moe_st_find(s, t->name) == t, "tensor '%s' not found by name",
             t->name);
    FF_CHECK(moe_dtype_name(t->dtype)[0] != '?', "tensor '%s': dtype %d",
             t->name, (int) t->dtype);
    FF_CHECK(t->n_dims >= 0 && t->n_dims <= MOE_ST_MAX_DIMS, "n_dims %d",
             t->n_dims);
    for (i = 0; i < t->n_dims; i++) {
        FF_CHECK(t->shape[i] >= 0, "shape[%d] %lld", i,
                 (long long) t->shape[i]);
        if (t->shape[i] == 0) {
            numel = 0;
        }
    }
    for (i = 0; numel != 0 && i < t->n_dims; i++) {
        FF_CHECK(!__builtin_mul_overflow(numel, t->shape[i], &numel),
                 "shape product overflows");
    }
    FF_CHECK(numel == t->numel, "numel %lld, shape gives %lld",
             (long long) t->numel, (long long) numel);
    FF_CHECK(t->nbytes == (size_t) numel * moe_dtype_size(t->dtype),
             "nbytes %zu for %lld elements", t->nbytes, (long long) numel);
    FF_CHECK(t->nbytes <= file_size || file_size == 0, "nbytes %zu > file "
             "%zu", t->nbytes, file_size);

    dst = malloc(((size_t) numel + 1) * sizeof(float));
    FF_CHECK(dst != NULL, "malloc");
    FF_CHECK(moe_st_to_f32(t, 0, numel, dst) == MOE_OK, "whole tensor");
    half = numel / 2;
    FF_CHECK(moe_st_to_f32(t, 0, half, dst) == MOE_OK, "first half");
    FF_CHECK(moe_st_to_f32(t, half, numel - half, dst) == MOE_OK,
             "second half");
    FF_CHECK(moe_st_to_f32(t, numel, 0, dst) == MOE_OK, "empty at end");
    FF_CHECK(moe_st_to_f32(t, 0, numel + 1, dst) == MOE_EINVAL,
             "one past the end");
    FF_CHECK(moe_st_to_f32(t, numel + 1, 0, dst) == MOE_EINVAL,
             "start past the end");
    FF_CHECK(moe_st_to_f32(t, -1, 1, dst) == MOE_EINVAL, "negative start");
    FF_CHECK(moe_st_to_f32(t, 0, INT64_MAX, dst) == MOE_EINVAL,
             "huge count");
    free(dst);
}


/* the sharded directory "idx" with its two shards */
static void
make_shards(char *dir, size_t size)
{
    static const char  a[] = "{\"x\":{\"dtype\":\"F32\",\"shape\":[2],"
                             "\"data_offsets\":[0,8]},\"y\":{\"dtype\":"
                             "\"BF16\",\"shape\":[1,2],\"data_offsets\":"
                             "[8,12]}}";
    static const char  b[] = "{\"z\":{\"dtype\":\"I8\",\"shape\":[3],"
                             "\"data_offsets\":[0,3]}}";
    unsigned char      buf[256];
    char               p[160];

    ff_path(dir, size, "idx");
    FF_CHECK(mkdir(dir, 0700) == 0, "mkdir %s", dir);
    memset(buf, 0, sizeof(buf));
    buf[0] = sizeof(a) - 1;
    memcpy(buf + 8, a, sizeof(a) - 1);
    snprintf(p, sizeof(p), "%s/a.safetensors", dir);
    ff_write(p, buf, 8 + sizeof(a) - 1 + 12);
    memset(buf, 0, sizeof(buf));
    buf[0] = sizeof(b) - 1;
    memcpy(buf + 8, b, sizeof(b) - 1);
    snprintf(p, sizeof(p), "%s/b.safetensors", dir);
    ff_write(p, buf, 8 + sizeof(b) - 1 + 3);
}


int
LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    static char    dir[128];
    char           path[160], err[512];
    moe_st_set_t  *s;
    size_t         i;
    int            rc, idx = size > 0 && data[0] == '{';

    if (idx) {
        if (dir[0] == '\0') {
            make_shards(dir, sizeof(dir));
        }
        snprintf(path, sizeof(path), "%s/model.safetensors.index.json",
                 dir);
        ff_write(path, data, size);
        err[0] = '\0';
        rc = moe_st_open_dir(dir, &s, err, sizeof(err));
    } else {
        ff_path(path, sizeof(path), "model.safetensors");
        ff_write(path, data, size);
        err[0] = '\0';
        rc = moe_st_open_file(path, &s, err, sizeof(err));
    }
    if (rc != MOE_OK) {
        FF_CHECK(s == NULL, "set returned on failure");
        FF_CHECK(rc == MOE_ENOMEM || strstr(err, path) != NULL
                 || (dir[0] != '\0' && strstr(err, dir) != NULL),
                 "error does not name the file: %s", err);
        return 0;
    }
    for (i = 0; i < moe_st_count(s); i++) {
        check_tensor(s, moe_st_at(s, i), idx ? 0 : size);
    }
    FF_CHECK(moe_st_at(s, moe_st_count(s)) == NULL, "moe_st_at past end");
    FF_CHECK(moe_st_total_bytes(s) >= 0, "total bytes");
    moe_st_close(s);
    return 0;
}
