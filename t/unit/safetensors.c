/*
 * Checks the safetensors reader (engine/model/safetensors.c):
 *  - a valid file with F32/F16/BF16 tensors and __metadata__ parses, shapes
 *    and bytes are right, lookups work, conversions are exact (all 65536
 *    f16 values against an independent formula; bf16 incl. inf/nan);
 *    empty tensors open whatever their other dims;
 *  - sharded directories (index.json) and the test model shards load;
 *  - malformed files fail with the right status and a message naming the
 *    file and tensor: truncated header, header length past EOF, bad JSON,
 *    offsets out of range, unknown dtype, shape/size mismatch, too many
 *    dims, negative dims, a header nested deeper than MOE_JSON_MAX_DEPTH
 *    (util/json.h), tensors sharing bytes (adjacent ones and empty ones
 *    still open), a tensor in two shards, an index naming a tensor its
 *    shard lacks, no weights at all.
 * The bad files are generated into a temp dir by the test itself.
 */

#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "model/safetensors.h"
#include "tap.h"

static char tmpdir[256];


static void
put_le64(unsigned char *p, uint64_t v)
{
    int i;

    for (i = 0; i < 8; i++) {
        p[i] = (unsigned char) (v >> (8 * i));
    }
}


/* Write an 8-byte length (hlen_override if not ~0), header, data. */
static void
write_st(const char *path, const char *header, uint64_t hlen_override,
    const void *data, size_t n)
{
    FILE          *f = fopen(path, "wb");
    unsigned char  len[8];
    size_t         hl = strlen(header);

    put_le64(len, hlen_override != ~(uint64_t) 0 ? hlen_override : hl);
    fwrite(len, 1, 8, f);
    fwrite(header, 1, hl, f);
    if (n) {
        fwrite(data, 1, n, f);
    }
    fclose(f);
}


static void
write_text(const char *path, const char *text)
{
    FILE *f = fopen(path, "wb");

    fputs(text, f);
    fclose(f);
}


static char *
tpath(const char *name)
{
    static char buf[4][512];
    static int  k;

    k = (k + 1) % 4;
    snprintf(buf[k], sizeof(buf[k]), "%s/%s", tmpdir, name);
    return buf[k];
}


/* Expect opening `name` (written with header/data) to fail with status
 * `want`, the message containing both `needle` and the file name. */
static void
expect_bad(const char *what, const char *name, const char *header,
    uint64_t hlen, const void *data, size_t n, int want, const char *needle)
{
    moe_st_set_t *s = NULL;
    char          err[512] = "";
    char         *p = tpath(name);
    int           rc;

    write_st(p, header, hlen, data, n);
    rc = moe_st_open_file(p, &s, err, sizeof(err));
    TAP_OK(rc == want && s == NULL && strstr(err, p) != NULL
           && strstr(err, needle) != NULL,
           "%s: status %d (want %d): %s", what, rc, want, err);
    moe_st_close(s);
}


/* f16 bits -> value, written independently of the engine's bit tricks. */
static double
f16_ref(unsigned h)
{
    int    sign = (h >> 15) & 1, e = (h >> 10) & 31, m = h & 1023;
    double v;

    if (e == 31) {
        v = m ? NAN : INFINITY;
    } else if (e == 0) {
        v = ldexp((double) m, -24);
    } else {
        v = ldexp((double) (1024 + m), e - 25);
    }
    return sign ? -v : v;
}


static void
test_valid(void)
{
    /* a: F32 [2,3] at 0..24, b: F16 [4] at 24..32, c: BF16 [2,2] 32..40 */
    const char *hdr =
        "{\"__metadata__\":{\"format\":\"pt\"},"
        "\"a\":{\"dtype\":\"F32\",\"shape\":[2,3],\"data_offsets\":[0,24]},"
        "\"b\":{\"dtype\":\"F16\",\"shape\":[4],\"data_offsets\":[24,32]},"
        "\"c\":{\"dtype\":\"BF16\",\"shape\":[2,2],\"data_offsets\":[32,40]}"
        "}";
    unsigned char          data[40];
    float                  fa[6] = { 1, -2, 3.5f, 0, 1e-30f, -7 }, out[6];
    uint16_t               fb[4] = { 0x3c00, 0x0001, 0x7c00, 0xfe00 };
    uint16_t               fc[4] = { 0x3f80, 0xc000, 0xff80, 0x7fc1 };
    moe_st_set_t          *s = NULL;
    const moe_st_tensor_t *t;
    char                   err[512] = "";
    int                    rc, i, ok;

    memcpy(data, fa, 24);
    for (i = 0; i < 4; i++) {
        data[24 + 2 * i] = (unsigned char) (fb[i] & 0xff);
        data[25 + 2 * i] = (unsigned char) (fb[i] >> 8);
        data[32 + 2 * i] = (unsigned char) (fc[i] & 0xff);
        data[33 + 2 * i] = (unsigned char) (fc[i] >> 8);
    }
    write_st(tpath("ok.safetensors"), hdr, ~(uint64_t) 0, data, 40);
    rc = moe_st_open_file(tpath("ok.safetensors"), &s, err, sizeof(err));
    TAP_OK(rc == MOE_OK && moe_st_count(s) == 3, "valid file: 3 tensors, "
           "__metadata__ skipped (%s)", rc ? err : "ok");
    if (rc != MOE_OK) {
        return;
    }
    t = moe_st_find(s, "a");
    TAP_OK(t && t->dtype == MOE_DT_F32 && t->n_dims == 2 && t->shape[0] == 2
           && t->shape[1] == 3 && t->numel == 6 && t->nbytes == 24,
           "F32 tensor a: shape [2, 3], 24 bytes");
    TAP_OK(t && moe_st_to_f32(t, 0, 6, out) == MOE_OK
           && memcmp(out, fa, sizeof(fa)) == 0, "F32 values unchanged");
    TAP_OK(t && moe_st_to_f32(t, 4, 3, out) == MOE_EINVAL,
           "conversion range past the tensor rejected");
    TAP_OK(t && moe_st_to_f32(t, 4, 2, out) == MOE_OK && out[1] == -7,
           "conversion of a sub-range");

    t = moe_st_find(s, "b");
    ok = t && t->dtype == MOE_DT_F16 && moe_st_to_f32(t, 0, 4, out) == 0;
    TAP_OK(ok && out[0] == 1.0f && out[1] == ldexpf(1, -24)
           && isinf(out[2]) && out[2] > 0 && isnan(out[3]),
           "F16: 1, smallest subnormal, +inf, nan");

    t = moe_st_find(s, "c");
    ok = t && t->dtype == MOE_DT_BF16 && moe_st_to_f32(t, 0, 4, out) == 0;
    TAP_OK(ok && out[0] == 1.0f && out[1] == -2.0f && isinf(out[2])
           && out[2] < 0 && isnan(out[3]), "BF16: 1, -2, -inf, nan");

    TAP_OK(moe_st_find(s, "nope") == NULL && moe_st_find(s, "__metadata__")
           == NULL, "unknown names are not found");
    TAP_OK(moe_st_total_bytes(s) == 40, "total bytes 40");
    moe_st_close(s);

    /* I64 (compressed-tensors' weight_shape is torch's default int64;
     * position_ids buffers): refused before, so such a file did not
     * open at all */
    {
        int64_t iv[2] = { 14336, -4096 };

        write_st(tpath("i64.safetensors"), "{\"shape\":{\"dtype\":\"I64\","
                 "\"shape\":[2],\"data_offsets\":[0,16]}}", ~(uint64_t) 0,
                 iv, 16);
        s = NULL;
        rc = moe_st_open_file(tpath("i64.safetensors"), &s, err,
                              sizeof(err));
        t = rc == MOE_OK ? moe_st_find(s, "shape") : NULL;
        ok = t && t->dtype == MOE_DT_I64 && t->nbytes == 16
             && moe_st_to_f32(t, 0, 2, out) == MOE_OK && out[0] == 14336.0f
             && out[1] == -4096.0f
             && strcmp(moe_dtype_name(t->dtype), "I64") == 0;
        TAP_OK(ok, "I64 tensor: 8 bytes an element, values as floats (%s)",
               rc == MOE_OK ? "ok" : err);
        moe_st_close(s);
    }
}


static void
test_conversions(void)
{
    unsigned h;
    int      bad = 0;
    float    f;
    double   r;

    for (h = 0; h < 65536; h++) {
        f = moe_f16_to_f32((uint16_t) h);
        r = f16_ref(h);
        if (isnan(r) ? !isnan(f) : ((double) f != r
                                    || !signbit(f) != !signbit(r)))
        {
            if (bad++ < 3) {
                TAP_DIAG("f16 0x%04x: got %g want %g", h, f, r);
            }
        }
    }
    TAP_OK(bad == 0, "all 65536 f16 values convert exactly (%d wrong)", bad);

    bad = 0;
    for (h = 0; h < 65536; h++) {
        uint32_t u = (uint32_t) h << 16, v;

        f = moe_bf16_to_f32((uint16_t) h);
        memcpy(&v, &f, 4);
        bad += v != u;
    }
    TAP_OK(bad == 0, "all 65536 bf16 values convert exactly (%d wrong)", bad);
}


/* "{\"a\":" + depth '[' + depth ']' + "}" (malloc'ed) */
static char *
deep_json(size_t depth)
{
    char   *j = malloc(2 * depth + 16);
    size_t  i, n = 0;

    if (j == NULL) {
        return NULL;
    }
    n += (size_t) sprintf(j, "{\"a\":");
    for (i = 0; i < depth; i++) {
        j[n++] = '[';
    }
    for (i = 0; i < depth; i++) {
        j[n++] = ']';
    }
    strcpy(j + n, "}");
    return j;
}


/*
 * A header nested a million levels deep (2 MB, under the 100 MB header
 * limit): yajl parses it, but yajl_tree_free() recursed once per level
 * and overflowed the stack (fuzz_safetensors).  Refused before parsing,
 * naming the file; nesting up to MOE_JSON_MAX_DEPTH (128) still parses.
 */
static void
test_deep_header(void)
{
    char  *deep = deep_json(1u << 20), *ok = deep_json(127);

    expect_bad("header nested 2^20 levels deep", "deep.safetensors",
               deep ? deep : "", ~(uint64_t) 0, NULL, 0, MOE_EFORMAT,
               "nested deeper than 128 levels");
    expect_bad("header nested 128 levels deep still parses",
               "deep.safetensors", ok ? ok : "", ~(uint64_t) 0, NULL, 0,
               MOE_EFORMAT, "tensor 'a': entry is not an object");
    free(deep);
    free(ok);
}


static void
test_malformed(void)
{
    unsigned char  zeros[64];
    moe_st_set_t  *s = NULL;
    char           err[512] = "";
    int            rc;
    FILE          *f;

    memset(zeros, 0, sizeof(zeros));

    f = fopen(tpath("short.safetensors"), "wb");
    fwrite("\x10\x00\x00", 1, 3, f);
    fclose(f);
    rc = moe_st_open_file(tpath("short.safetensors"), &s, err, sizeof(err));
    TAP_OK(rc == MOE_EFORMAT && strstr(err, "short.safetensors")
           && strstr(err, "truncated header"), "truncated file: %s", err);

    expect_bad("header length past EOF", "hlen.safetensors", "{}", 4096,
               NULL, 0, MOE_EFORMAT, "header length 4096");
    expect_bad("header cut short", "cut.safetensors",
               "{\"w\":{\"dtype\":\"F32\",\"shape\":[1],", ~(uint64_t) 0,
               NULL, 0, MOE_EFORMAT, "not a JSON object");
    expect_bad("bad JSON", "json.safetensors", "{\"w\": [1, 2,, ]}",
               ~(uint64_t) 0, NULL, 0, MOE_EFORMAT, "not a JSON object");
    expect_bad("offsets past the data", "offs.safetensors",
               "{\"w\":{\"dtype\":\"F32\",\"shape\":[4],"
               "\"data_offsets\":[0,16]}}", ~(uint64_t) 0, zeros, 8,
               MOE_EFORMAT, "tensor 'w': data_offsets [0, 16] outside");
    expect_bad("offsets reversed", "rev.safetensors",
               "{\"w\":{\"dtype\":\"F32\",\"shape\":[0],"
               "\"data_offsets\":[8,4]}}", ~(uint64_t) 0, zeros, 8,
               MOE_EFORMAT, "tensor 'w'");
    expect_bad("unknown dtype", "dtype.safetensors",
               "{\"w\":{\"dtype\":\"F64\",\"shape\":[1],"
               "\"data_offsets\":[0,8]}}", ~(uint64_t) 0, zeros, 8,
               MOE_EUNSUPPORTED, "tensor 'w': dtype 'F64' is not supported");
    expect_bad("size != shape", "size.safetensors",
               "{\"w\":{\"dtype\":\"BF16\",\"shape\":[2,3],"
               "\"data_offsets\":[0,16]}}", ~(uint64_t) 0, zeros, 16,
               MOE_EFORMAT, "tensor 'w': 16 bytes for BF16 shape of 6 "
               "elements (expected 12)");
    expect_bad("5 dims", "dims.safetensors",
               "{\"w\":{\"dtype\":\"F32\",\"shape\":[1,1,1,1,1],"
               "\"data_offsets\":[0,4]}}", ~(uint64_t) 0, zeros, 4,
               MOE_EUNSUPPORTED, "tensor 'w': 5 dims");
    expect_bad("negative dim", "neg.safetensors",
               "{\"w\":{\"dtype\":\"F32\",\"shape\":[-1],"
               "\"data_offsets\":[0,4]}}", ~(uint64_t) 0, zeros, 4,
               MOE_EFORMAT, "tensor 'w': shape[0]");
    expect_bad("huge dims overflow", "huge.safetensors",
               "{\"w\":{\"dtype\":\"F32\",\"shape\":[4294967296,4294967296,"
               "4294967296],\"data_offsets\":[0,4]}}", ~(uint64_t) 0, zeros,
               4, MOE_EFORMAT, "tensor 'w'");
    /* an empty tensor whose other dim exceeds the file's data (it was
     * refused as "more elements than the file has bytes"; fuzz_quant) */
    write_st(tpath("empty.safetensors"), "{\"e\":{\"dtype\":\"I32\","
             "\"shape\":[4096,0],\"data_offsets\":[0,0]},\"f\":{\"dtype\":"
             "\"F32\",\"shape\":[0,1099511627776,1099511627776],"
             "\"data_offsets\":[0,0]}}", ~(uint64_t) 0, NULL, 0);
    s = NULL;
    rc = moe_st_open_file(tpath("empty.safetensors"), &s, err, sizeof(err));
    TAP_OK(rc == MOE_OK && moe_st_find(s, "e") != NULL
           && moe_st_find(s, "e")->numel == 0
           && moe_st_find(s, "e")->shape[0] == 4096
           && moe_st_find(s, "f") != NULL && moe_st_find(s, "f")->numel == 0,
           "empty tensors [4096, 0] and [0, 2^40, 2^40] in a file without "
           "data open (%s)", rc ? err : "ok");
    moe_st_close(s);
    expect_bad("entry not an object", "entry.safetensors",
               "{\"w\":[1,2]}", ~(uint64_t) 0, NULL, 0, MOE_EFORMAT,
               "tensor 'w': entry is not an object");
    /* two tensors on the same bytes (Hugging Face's reader refuses them;
     * ours took them), also across an empty tensor between the two */
    expect_bad("overlapping tensors", "overlap.safetensors",
               "{\"a\":{\"dtype\":\"F32\",\"shape\":[2],"
               "\"data_offsets\":[0,8]},\"b\":{\"dtype\":\"F32\","
               "\"shape\":[2],\"data_offsets\":[4,12]}}", ~(uint64_t) 0,
               zeros, 12, MOE_EFORMAT,
               "tensors 'a' [0, 8] and 'b' [4, 12] overlap");
    expect_bad("overlap past an empty tensor", "overlap2.safetensors",
               "{\"a\":{\"dtype\":\"F32\",\"shape\":[4],"
               "\"data_offsets\":[0,16]},\"e\":{\"dtype\":\"F32\","
               "\"shape\":[0],\"data_offsets\":[4,4]},\"b\":{\"dtype\":"
               "\"F32\",\"shape\":[1],\"data_offsets\":[8,12]}}",
               ~(uint64_t) 0, zeros, 16, MOE_EFORMAT,
               "tensors 'a' [0, 16] and 'b' [8, 12] overlap");
    write_st(tpath("adjacent.safetensors"), "{\"a\":{\"dtype\":\"F32\","
             "\"shape\":[2],\"data_offsets\":[0,8]},\"e\":{\"dtype\":"
             "\"F32\",\"shape\":[0],\"data_offsets\":[4,4]},\"b\":"
             "{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[8,16]}}",
             ~(uint64_t) 0, zeros, 16);
    s = NULL;
    rc = moe_st_open_file(tpath("adjacent.safetensors"), &s, err,
                          sizeof(err));
    TAP_OK(rc == MOE_OK && moe_st_count(s) == 3,
           "adjacent tensors and an empty one inside another's bytes open "
           "(%s)", rc ? err : "ok");
    moe_st_close(s);

    test_deep_header();

    s = NULL;
    rc = moe_st_open_file(tpath("does-not-exist.safetensors"), &s, err,
                          sizeof(err));
    TAP_OK(rc == MOE_EIO && strstr(err, "does-not-exist"),
           "missing file: MOE_EIO: %s", err);
}


static void
test_dirs(void)
{
    char           d[512], err[512] = "";
    moe_st_set_t  *s = NULL;
    unsigned char  data[16], two[4] = { 0, 0, 0, 0x40 };   /* 2.0f */
    int            rc;
    float          out[2];

    memset(data, 0, sizeof(data));
    data[2] = 0x80;
    data[3] = 0x3f;           /* 1.0f */

    snprintf(d, sizeof(d), "%s/sharded", tmpdir);
    mkdir(d, 0700);
    write_st(tpath("sharded/model-00001-of-00002.safetensors"),
             "{\"x\":{\"dtype\":\"F32\",\"shape\":[1],"
             "\"data_offsets\":[0,4]}}", ~(uint64_t) 0, two, 4);
    write_st(tpath("sharded/model-00002-of-00002.safetensors"),
             "{\"y\":{\"dtype\":\"F32\",\"shape\":[2],"
             "\"data_offsets\":[0,8]},\"z\":{\"dtype\":\"F16\",\"shape\":"
             "[0],\"data_offsets\":[8,8]}}", ~(uint64_t) 0, data, 8);
    write_text(tpath("sharded/model.safetensors.index.json"),
               "{\"metadata\":{\"total_size\":12},\"weight_map\":{"
               "\"x\":\"model-00001-of-00002.safetensors\","
               "\"y\":\"model-00002-of-00002.safetensors\","
               "\"z\":\"model-00002-of-00002.safetensors\"}}");
    rc = moe_st_open_dir(d, &s, err, sizeof(err));
    TAP_OK(rc == MOE_OK && moe_st_count(s) == 3 && moe_st_find(s, "x")
           && moe_st_find(s, "z") && moe_st_find(s, "z")->numel == 0,
           "sharded dir: 3 tensors from 2 shards (%s)", rc ? err : "ok");
    TAP_OK(rc == MOE_OK && moe_st_to_f32(moe_st_find(s, "y"), 0, 2, out) == 0
           && out[0] == 1.0f && out[1] == 0.0f
           && moe_st_to_f32(moe_st_find(s, "x"), 0, 1, out) == 0
           && out[0] == 2.0f, "shard data read from the right file");
    moe_st_close(s);

    /* index names a tensor its shard does not hold */
    write_text(tpath("sharded/model.safetensors.index.json"),
               "{\"weight_map\":{"
               "\"x\":\"model-00002-of-00002.safetensors\","
               "\"y\":\"model-00002-of-00002.safetensors\"}}");
    s = NULL;
    rc = moe_st_open_dir(d, &s, err, sizeof(err));
    TAP_OK(rc == MOE_EFORMAT && strstr(err, "tensor 'x'"),
           "index naming a tensor missing from its shard: %s", err);

    /* a tensor in two shards */
    write_st(tpath("sharded/model-00001-of-00002.safetensors"),
             "{\"y\":{\"dtype\":\"F32\",\"shape\":[1],"
             "\"data_offsets\":[0,4]}}", ~(uint64_t) 0, data, 4);
    write_text(tpath("sharded/model.safetensors.index.json"),
               "{\"weight_map\":{"
               "\"y\":\"model-00001-of-00002.safetensors\","
               "\"z\":\"model-00002-of-00002.safetensors\"}}");
    s = NULL;
    rc = moe_st_open_dir(d, &s, err, sizeof(err));
    TAP_OK(rc == MOE_EFORMAT && strstr(err, "tensor 'y'")
           && strstr(err, "also in"), "tensor in two shards: %s", err);
    unlink(tpath("sharded/model.safetensors.index.json"));
    unlink(tpath("sharded/model-00001-of-00002.safetensors"));
    unlink(tpath("sharded/model-00002-of-00002.safetensors"));

    s = NULL;
    rc = moe_st_open_dir(d, &s, err, sizeof(err));
    TAP_OK(rc == MOE_EIO && strstr(err, "no *.safetensors"),
           "directory without weights: %s", err);
    rmdir(d);

    s = NULL;
    rc = moe_st_open_dir("t/data/models/mixtral-gqa", &s, err, sizeof(err));
    TAP_OK(rc == MOE_OK && moe_st_find(s, "model.embed_tokens.weight")
           && moe_st_find(s, "model.layers.1.block_sparse_moe.experts.3."
                          "w2.weight")
           && moe_st_find(s, "lm_head.weight")
           && moe_st_find(s, "lm_head.weight")->dtype == MOE_DT_BF16,
           "sharded test model mixtral-gqa opens (%s)", rc ? err : "ok");
    moe_st_close(s);
}


static void
cleanup(void)
{
    static const char *names[] = {
        "ok", "short", "hlen", "cut", "json", "offs", "rev", "dtype", "size",
        "dims", "neg", "huge", "entry", "deep", "empty"
    };
    size_t i;
    char   n[64];

    for (i = 0; i < sizeof(names) / sizeof(names[0]); i++) {
        snprintf(n, sizeof(n), "%s.safetensors", names[i]);
        unlink(tpath(n));
    }
    rmdir(tmpdir);
}


int
main(void)
{
    snprintf(tmpdir, sizeof(tmpdir), "/tmp/moe-st-test-XXXXXX");
    if (mkdtemp(tmpdir) == NULL) {
        printf("1..1\nnot ok 1 - mkdtemp\n");
        return 1;
    }
    test_valid();
    test_conversions();
    test_malformed();
    if (access("t/data/models/mixtral-gqa", F_OK) == 0) {
        test_dirs();
    } else {
        TAP_DIAG("t/data/models missing: run from the repository root");
        TAP_OK(0, "test models present");
    }
    cleanup();
    TAP_PLAN(tap_n);
    return TAP_DONE();
}
