/*
 * safetensors reader: mmap, yajl header parse, name index, fp32 conversion.
 *
 * File layout: u64 little-endian header length N, N bytes of JSON
 * {"name": {"dtype": "BF16", "shape": [..], "data_offsets": [b, e]}, ...,
 *  "__metadata__": {...}}, then the byte buffer; offsets are relative to the
 * start of that buffer.
 */

#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <yajl/yajl_tree.h>

#include "model/safetensors.h"
#include "util/json.h"

#define ST_MAX_HEADER  (100u * 1024 * 1024)   /* as the reference reader */

typedef struct {
    char     *path;
    void     *map;       /* whole file, PROT_READ */
    size_t    size;
} st_file_t;

struct moe_st_set {
    st_file_t        *files;
    size_t            n_files;
    moe_st_tensor_t  *tensors;
    size_t            n_tensors;
    size_t            cap_tensors;
    size_t           *slots;      /* hash table of tensor index + 1; 0 empty */
    size_t            n_slots;    /* power of two */
};


size_t
moe_dtype_size(moe_dtype_t dt)
{
    switch (dt) {
    case MOE_DT_I64:
        return 8;
    case MOE_DT_F32: case MOE_DT_I32:
        return 4;
    case MOE_DT_F16: case MOE_DT_BF16:
        return 2;
    default:
        return 1;
    }
}


int
moe_dtype_is_float(moe_dtype_t dt)
{
    return dt == MOE_DT_F32 || dt == MOE_DT_F16 || dt == MOE_DT_BF16;
}


const char *
moe_dtype_name(moe_dtype_t dt)
{
    switch (dt) {
    case MOE_DT_F32:  return "F32";
    case MOE_DT_F16:  return "F16";
    case MOE_DT_BF16: return "BF16";
    case MOE_DT_F8_E4M3: return "F8_E4M3";
    case MOE_DT_F8_E5M2: return "F8_E5M2";
    case MOE_DT_I32:  return "I32";
    case MOE_DT_U8:   return "U8";
    case MOE_DT_I8:   return "I8";
    case MOE_DT_I64:  return "I64";
    }
    return "?";
}


static uint64_t
st_hash(const char *s)
{
    uint64_t h = 1469598103934665603ull;   /* FNV-1a */

    while (*s) {
        h ^= (unsigned char) *s++;
        h *= 1099511628211ull;
    }
    return h;
}


static int
st_push_tensor(moe_st_set_t *s, const moe_st_tensor_t *t)
{
    moe_st_tensor_t *nt;
    size_t           cap;

    if (s->n_tensors == s->cap_tensors) {
        cap = s->cap_tensors ? s->cap_tensors * 2 : 64;
        nt = realloc(s->tensors, cap * sizeof(*nt));
        if (nt == NULL) {
            return MOE_ENOMEM;
        }
        s->tensors = nt;
        s->cap_tensors = cap;
    }
    s->tensors[s->n_tensors++] = *t;
    return MOE_OK;
}


int
moe_json_parse_object(const char *text, const char *path, const char *what,
    yajl_val *out, char *err, size_t errlen)
{
    char      jerr[256];
    yajl_val  root;

    *out = NULL;
    root = moe_json_parse(text, jerr, sizeof(jerr));
    if (root == NULL || !YAJL_IS_OBJECT(root)) {
        moe_errf(err, errlen, "%s: %snot a JSON object%s%s", path, what,
               jerr[0] ? ": " : "", jerr);
        yajl_tree_free(root);
        return MOE_EFORMAT;
    }
    *out = root;
    return MOE_OK;
}


/* Parse one tensor entry `v` of file f (data buffer of data_len bytes). */
static int
st_parse_entry(moe_st_set_t *s, st_file_t *f, const char *name, yajl_val v,
    const unsigned char *data, uint64_t data_len, char *err, size_t errlen)
{
    moe_st_tensor_t  t;
    yajl_val         dt, shape, offs;
    const char      *dts;
    uint64_t         b, e, numel;
    size_t           i;
    int              rc;

    memset(&t, 0, sizeof(t));
    if (!YAJL_IS_OBJECT(v)) {
        moe_errf(err, errlen, "%s: tensor '%s': entry is not an object",
               f->path, name);
        return MOE_EFORMAT;
    }
    dt = NULL;
    shape = NULL;
    offs = NULL;
    for (i = 0; i < v->u.object.len; i++) {
        const char *k = v->u.object.keys[i];

        if (strcmp(k, "dtype") == 0) {
            dt = v->u.object.values[i];
        } else if (strcmp(k, "shape") == 0) {
            shape = v->u.object.values[i];
        } else if (strcmp(k, "data_offsets") == 0) {
            offs = v->u.object.values[i];
        }
    }
    if (dt == NULL || !YAJL_IS_STRING(dt) || shape == NULL
        || !YAJL_IS_ARRAY(shape) || offs == NULL || !YAJL_IS_ARRAY(offs))
    {
        moe_errf(err, errlen, "%s: tensor '%s': needs string \"dtype\", array "
               "\"shape\" and array \"data_offsets\"", f->path, name);
        return MOE_EFORMAT;
    }

    dts = dt->u.string;
    if (strcmp(dts, "F32") == 0) {
        t.dtype = MOE_DT_F32;
    } else if (strcmp(dts, "F16") == 0) {
        t.dtype = MOE_DT_F16;
    } else if (strcmp(dts, "BF16") == 0) {
        t.dtype = MOE_DT_BF16;
    } else if (strcmp(dts, "F8_E4M3") == 0) {
        t.dtype = MOE_DT_F8_E4M3;
    } else if (strcmp(dts, "F8_E5M2") == 0) {
        t.dtype = MOE_DT_F8_E5M2;
    } else if (strcmp(dts, "I32") == 0) {
        t.dtype = MOE_DT_I32;
    } else if (strcmp(dts, "U8") == 0) {
        t.dtype = MOE_DT_U8;
    } else if (strcmp(dts, "I8") == 0) {
        t.dtype = MOE_DT_I8;
    } else if (strcmp(dts, "I64") == 0) {
        t.dtype = MOE_DT_I64;
    } else {
        moe_errf(err, errlen, "%s: tensor '%s': dtype '%.32s' is not supported "
               "(supported: F32, F16, BF16, F8_E4M3, F8_E5M2, I64, I32, U8, "
               "I8)",
               f->path, name, dts);
        return MOE_EUNSUPPORTED;
    }

    if (shape->u.array.len > MOE_ST_MAX_DIMS) {
        moe_errf(err, errlen, "%s: tensor '%s': %zu dims (at most %d "
               "supported)", f->path, name, shape->u.array.len,
               MOE_ST_MAX_DIMS);
        return MOE_EUNSUPPORTED;
    }
    t.n_dims = (int) shape->u.array.len;
    numel = 1;
    for (i = 0; i < shape->u.array.len; i++) {
        yajl_val d = shape->u.array.values[i];
        long long x;

        if (!YAJL_IS_INTEGER(d) || (x = YAJL_GET_INTEGER(d)) < 0) {
            moe_errf(err, errlen, "%s: tensor '%s': shape[%zu] is not a "
                   "non-negative integer", f->path, name, i);
            return MOE_EFORMAT;
        }
        t.shape[i] = x;
        if (x == 0) {
            numel = 0;              /* empty, whatever the other dims */
        }
    }
    for (i = 0; numel != 0 && i < shape->u.array.len; i++) {
        uint64_t x = (uint64_t) t.shape[i];

        if (numel > data_len / x) {
            /* more elements than bytes in the file: cannot be right */
            numel = UINT64_MAX;
            break;
        }
        numel *= x;
    }

    if (offs->u.array.len != 2
        || !YAJL_IS_INTEGER(offs->u.array.values[0])
        || !YAJL_IS_INTEGER(offs->u.array.values[1])
        || YAJL_GET_INTEGER(offs->u.array.values[0]) < 0
        || YAJL_GET_INTEGER(offs->u.array.values[1]) < 0)
    {
        moe_errf(err, errlen, "%s: tensor '%s': data_offsets must be two "
               "non-negative integers", f->path, name);
        return MOE_EFORMAT;
    }
    b = (uint64_t) YAJL_GET_INTEGER(offs->u.array.values[0]);
    e = (uint64_t) YAJL_GET_INTEGER(offs->u.array.values[1]);
    if (b > e || e > data_len) {
        moe_errf(err, errlen, "%s: tensor '%s': data_offsets [%llu, %llu] "
               "outside the data (%llu bytes)", f->path, name,
               (unsigned long long) b, (unsigned long long) e,
               (unsigned long long) data_len);
        return MOE_EFORMAT;
    }
    if (numel == UINT64_MAX) {
        moe_errf(err, errlen, "%s: tensor '%s': shape has more elements than "
               "the file has bytes", f->path, name);
        return MOE_EFORMAT;
    }
    if (numel * moe_dtype_size(t.dtype) != e - b) {
        moe_errf(err, errlen, "%s: tensor '%s': %llu bytes for %s shape of "
               "%llu elements (expected %llu)", f->path, name,
               (unsigned long long) (e - b), dts,
               (unsigned long long) numel,
               (unsigned long long) (numel * moe_dtype_size(t.dtype)));
        return MOE_EFORMAT;
    }

    t.name = strdup(name);
    if (t.name == NULL) {
        moe_errf(err, errlen, "out of memory");
        return MOE_ENOMEM;
    }
    t.file = f->path;
    t.numel = (int64_t) numel;
    t.data = data + b;
    t.nbytes = (size_t) (e - b);
    rc = st_push_tensor(s, &t);
    if (rc != MOE_OK) {
        free((char *) t.name);
        moe_errf(err, errlen, "out of memory");
    }
    return rc;
}


/* qsort order of tensor pointers by their data's start */
static int
st_cmp_data(const void *a, const void *b)
{
    const unsigned char *x = (*(const moe_st_tensor_t *const *) a)->data;
    const unsigned char *y = (*(const moe_st_tensor_t *const *) b)->data;

    return x < y ? -1 : x > y;
}


/*
 * The tensors [first, n_tensors) of file f (data buffer at data) must not
 * share bytes, as the safetensors format requires (Hugging Face's reader
 * refuses overlapping data_offsets): two weights on the same bytes are a
 * broken or hostile file, not a model.  Empty tensors take no bytes.
 */
static int
st_check_overlap(const moe_st_set_t *s, size_t first, const st_file_t *f,
    const unsigned char *data, char *err, size_t errlen)
{
    size_t                  n = s->n_tensors - first, i, end = 0;
    const moe_st_tensor_t **v, *a = NULL;
    int                     rc = MOE_OK;

    if (n < 2) {
        return MOE_OK;
    }
    v = malloc(n * sizeof(*v));
    if (v == NULL) {
        moe_errf(err, errlen, "out of memory");
        return MOE_ENOMEM;
    }
    for (i = 0; i < n; i++) {
        v[i] = &s->tensors[first + i];
    }
    qsort(v, n, sizeof(*v), st_cmp_data);
    /* a: the non-empty tensor reaching furthest so far, to byte end */
    for (i = 0; i < n && rc == MOE_OK; i++) {
        const moe_st_tensor_t *b = v[i];
        size_t                 b0, b1;

        if (b->nbytes == 0) {
            continue;
        }
        b0 = (size_t) ((const unsigned char *) b->data - data);
        b1 = b0 + b->nbytes;
        if (a != NULL && end > b0) {
            moe_errf(err, errlen, "%s: tensors '%s' [%zu, %zu] and '%s' "
                     "[%zu, %zu] overlap in data_offsets", f->path,
                     a->name, end - a->nbytes, end, b->name, b0, b1);
            rc = MOE_EFORMAT;
        } else if (b1 > end) {
            a = b;
            end = b1;
        }
    }
    free(v);
    return rc;
}


/* Map `path` and append its tensors to s. */
static int
st_add_file(moe_st_set_t *s, const char *path, char *err, size_t errlen)
{
    st_file_t      *nf, *f;
    struct stat     st;
    int             fd, rc;
    uint64_t        hlen;
    const unsigned char *p;
    char           *json;
    yajl_val        root;
    size_t          i, first;

    nf = realloc(s->files, (s->n_files + 1) * sizeof(*nf));
    if (nf == NULL) {
        moe_errf(err, errlen, "out of memory");
        return MOE_ENOMEM;
    }
    s->files = nf;
    f = &s->files[s->n_files];
    memset(f, 0, sizeof(*f));
    f->path = strdup(path);
    if (f->path == NULL) {
        moe_errf(err, errlen, "out of memory");
        return MOE_ENOMEM;
    }
    s->n_files++;   /* from here on moe_st_close() cleans up */

    fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0) {
        moe_errf(err, errlen, "%s: %s", path, strerror(errno));
        return MOE_EIO;
    }
    if (fstat(fd, &st) != 0) {
        moe_errf(err, errlen, "%s: %s", path, strerror(errno));
        close(fd);
        return MOE_EIO;
    }
    if (st.st_size < 8) {
        close(fd);
        moe_errf(err, errlen, "%s: truncated header (file is %lld bytes)",
               path, (long long) st.st_size);
        return MOE_EFORMAT;
    }
    f->size = (size_t) st.st_size;
    f->map = mmap(NULL, f->size, PROT_READ, MAP_PRIVATE, fd, 0);
    close(fd);
    if (f->map == MAP_FAILED) {
        f->map = NULL;
        moe_errf(err, errlen, "%s: mmap: %s", path, strerror(errno));
        return MOE_EIO;
    }

    p = f->map;
    hlen = 0;
    for (i = 0; i < 8; i++) {
        hlen |= (uint64_t) p[i] << (8 * i);
    }
    if (hlen < 2 || hlen > ST_MAX_HEADER || hlen > f->size - 8) {
        moe_errf(err, errlen, "%s: header length %llu does not fit the file "
               "(%zu bytes)", path, (unsigned long long) hlen, f->size);
        return MOE_EFORMAT;
    }

    json = malloc(hlen + 1);
    if (json == NULL) {
        moe_errf(err, errlen, "out of memory");
        return MOE_ENOMEM;
    }
    memcpy(json, p + 8, hlen);
    json[hlen] = '\0';
    rc = moe_json_parse_object(json, path, "header is ", &root, err, errlen);
    free(json);
    if (rc != MOE_OK) {
        return rc;
    }

    first = s->n_tensors;
    for (i = 0; i < root->u.object.len; i++) {
        const char *name = root->u.object.keys[i];

        if (strcmp(name, "__metadata__") == 0) {
            continue;
        }
        rc = st_parse_entry(s, f, name, root->u.object.values[i],
                            p + 8 + hlen, f->size - 8 - hlen, err, errlen);
        if (rc != MOE_OK) {
            break;
        }
    }
    yajl_tree_free(root);
    if (rc == MOE_OK) {
        rc = st_check_overlap(s, first, f, p + 8 + hlen, err, errlen);
    }
    return rc;
}


static int
st_build_index(moe_st_set_t *s, char *err, size_t errlen)
{
    size_t n, i, j;

    n = 16;
    while (n < s->n_tensors * 2) {
        n *= 2;
    }
    free(s->slots);
    s->slots = calloc(n, sizeof(*s->slots));
    if (s->slots == NULL) {
        moe_errf(err, errlen, "out of memory");
        return MOE_ENOMEM;
    }
    s->n_slots = n;
    for (i = 0; i < s->n_tensors; i++) {
        j = (size_t) st_hash(s->tensors[i].name) & (n - 1);
        while (s->slots[j] != 0) {
            const moe_st_tensor_t *o = &s->tensors[s->slots[j] - 1];

            if (strcmp(o->name, s->tensors[i].name) == 0) {
                moe_errf(err, errlen, "%s: tensor '%s': also in %s",
                       s->tensors[i].file, s->tensors[i].name, o->file);
                return MOE_EFORMAT;
            }
            j = (j + 1) & (n - 1);
        }
        s->slots[j] = i + 1;
    }
    return MOE_OK;
}


int
moe_st_open_file(const char *path, moe_st_set_t **out, char *err,
    size_t errlen)
{
    moe_st_set_t *s;
    int           rc;

    *out = NULL;
    s = calloc(1, sizeof(*s));
    if (s == NULL) {
        moe_errf(err, errlen, "out of memory");
        return MOE_ENOMEM;
    }
    rc = st_add_file(s, path, err, errlen);
    if (rc == MOE_OK) {
        rc = st_build_index(s, err, errlen);
    }
    if (rc != MOE_OK) {
        moe_st_close(s);
        return rc;
    }
    *out = s;
    return MOE_OK;
}


static char *
st_join(const char *dir, const char *name)
{
    size_t  a = strlen(dir), b = strlen(name);
    char   *p = malloc(a + b + 2);

    if (p != NULL) {
        memcpy(p, dir, a);
        p[a] = '/';
        memcpy(p + a + 1, name, b + 1);
    }
    return p;
}


/* st_add_file() of dir/name. */
static int
st_add_dir_file(moe_st_set_t *s, const char *dir, const char *name,
    char *err, size_t errlen)
{
    char  *path;
    int    rc;

    path = st_join(dir, name);
    if (path == NULL) {
        moe_errf(err, errlen, "out of memory");
        return MOE_ENOMEM;
    }
    rc = st_add_file(s, path, err, errlen);
    free(path);
    return rc;
}


/* Sharded checkpoint: open each shard named in weight_map once. */
static int
st_open_index(moe_st_set_t *s, const char *dir, const char *ipath,
    char *err, size_t errlen)
{
    char        *text;
    char         jerr[256];
    yajl_val     root, wm;
    const char  *wm_path[] = { "weight_map", NULL };
    size_t       i, j;
    int          rc, seen;

    text = moe_read_file(ipath, NULL);
    if (text == NULL) {
        moe_errf(err, errlen, "%s: %s", ipath, strerror(errno));
        return MOE_EIO;
    }
    root = moe_json_parse(text, jerr, sizeof(jerr));
    free(text);
    wm = root ? yajl_tree_get(root, wm_path, yajl_t_object) : NULL;
    if (wm == NULL) {
        moe_errf(err, errlen, "%s: no \"weight_map\" object%s%s", ipath,
                 root == NULL ? ": " : "", root == NULL ? jerr : "");
        yajl_tree_free(root);
        return MOE_EFORMAT;
    }

    rc = MOE_OK;
    for (i = 0; i < wm->u.object.len && rc == MOE_OK; i++) {
        yajl_val v = wm->u.object.values[i];
        const char *shard;

        if (!YAJL_IS_STRING(v)) {
            moe_errf(err, errlen, "%s: weight_map['%s'] is not a string",
                   ipath, wm->u.object.keys[i]);
            rc = MOE_EFORMAT;
            break;
        }
        shard = v->u.string;
        if (strstr(shard, "..") != NULL || shard[0] == '/') {
            moe_errf(err, errlen, "%s: shard name '%s' leaves the model "
                   "directory", ipath, shard);
            rc = MOE_EFORMAT;
            break;
        }
        /* first time this shard is named? */
        seen = 0;
        for (j = 0; j < i; j++) {
            yajl_val w = wm->u.object.values[j];

            if (YAJL_IS_STRING(w) && strcmp(w->u.string, shard) == 0) {
                seen = 1;
                break;
            }
        }
        if (seen) {
            continue;
        }
        rc = st_add_dir_file(s, dir, shard, err, errlen);
    }
    if (rc == MOE_OK) {
        rc = st_build_index(s, err, errlen);
    }
    for (i = 0; rc == MOE_OK && i < wm->u.object.len; i++) {
        const char            *name = wm->u.object.keys[i];
        const moe_st_tensor_t *t = moe_st_find(s, name);
        const char            *shard = wm->u.object.values[i]->u.string;
        const char            *base;

        if (t == NULL) {
            moe_errf(err, errlen, "%s: tensor '%s' is not in shard %s", ipath,
                   name, shard);
            rc = MOE_EFORMAT;
            break;
        }
        base = t->file + strlen(dir) + 1;
        if (strcmp(base, shard) != 0) {
            moe_errf(err, errlen, "%s: tensor '%s' is in %s, not in %s", ipath,
                   name, base, shard);
            rc = MOE_EFORMAT;
        }
    }
    yajl_tree_free(root);
    return rc;
}


static int
st_name_cmp(const void *a, const void *b)
{
    return strcmp(*(char *const *) a, *(char *const *) b);
}


int
moe_st_open_dir(const char *dir, moe_st_set_t **out, char *err,
    size_t errlen)
{
    moe_st_set_t   *s;
    char           *path, **names;
    struct dirent  *de;
    DIR            *d;
    size_t          n, cap, i, l;
    int             rc;

    *out = NULL;
    s = calloc(1, sizeof(*s));
    if (s == NULL) {
        moe_errf(err, errlen, "out of memory");
        return MOE_ENOMEM;
    }

    path = st_join(dir, "model.safetensors.index.json");
    if (path == NULL) {
        moe_errf(err, errlen, "out of memory");
        rc = MOE_ENOMEM;
        goto done;
    }
    if (access(path, F_OK) == 0) {
        rc = st_open_index(s, dir, path, err, errlen);
        free(path);
        goto done;
    }
    free(path);

    path = st_join(dir, "model.safetensors");
    if (path == NULL) {
        moe_errf(err, errlen, "out of memory");
        rc = MOE_ENOMEM;
        goto done;
    }
    if (access(path, F_OK) == 0) {
        rc = st_add_file(s, path, err, errlen);
        free(path);
        if (rc == MOE_OK) {
            rc = st_build_index(s, err, errlen);
        }
        goto done;
    }
    free(path);

    d = opendir(dir);
    if (d == NULL) {
        moe_errf(err, errlen, "%s: %s", dir, strerror(errno));
        rc = MOE_EIO;
        goto done;
    }
    names = NULL;
    n = cap = 0;
    rc = MOE_OK;
    while ((de = readdir(d)) != NULL) {
        l = strlen(de->d_name);
        if (l <= 12 || strcmp(de->d_name + l - 12, ".safetensors") != 0) {
            continue;
        }
        if (n == cap) {
            char **nn;

            cap = cap ? cap * 2 : 8;
            nn = realloc(names, cap * sizeof(*nn));
            if (nn == NULL) {
                rc = MOE_ENOMEM;
                break;
            }
            names = nn;
        }
        if ((names[n] = strdup(de->d_name)) == NULL) {
            rc = MOE_ENOMEM;
            break;
        }
        n++;
    }
    closedir(d);
    if (rc == MOE_ENOMEM) {
        moe_errf(err, errlen, "out of memory");
    } else if (n == 0) {
        moe_errf(err, errlen, "%s: no *.safetensors weights", dir);
        rc = MOE_EIO;
    } else {
        qsort(names, n, sizeof(*names), st_name_cmp);
        for (i = 0; i < n && rc == MOE_OK; i++) {
            rc = st_add_dir_file(s, dir, names[i], err, errlen);
        }
        if (rc == MOE_OK) {
            rc = st_build_index(s, err, errlen);
        }
    }
    for (i = 0; i < n; i++) {
        free(names[i]);
    }
    free(names);

done:
    if (rc != MOE_OK) {
        moe_st_close(s);
        return rc;
    }
    *out = s;
    return MOE_OK;
}


void
moe_st_close(moe_st_set_t *s)
{
    size_t i;

    if (s == NULL) {
        return;
    }
    for (i = 0; i < s->n_tensors; i++) {
        free((char *) s->tensors[i].name);
    }
    for (i = 0; i < s->n_files; i++) {
        if (s->files[i].map != NULL) {
            munmap(s->files[i].map, s->files[i].size);
        }
        free(s->files[i].path);
    }
    free(s->files);
    free(s->tensors);
    free(s->slots);
    free(s);
}


const moe_st_tensor_t *
moe_st_find(const moe_st_set_t *s, const char *name)
{
    size_t j;

    if (s == NULL || s->n_slots == 0) {
        return NULL;
    }
    j = (size_t) st_hash(name) & (s->n_slots - 1);
    while (s->slots[j] != 0) {
        const moe_st_tensor_t *t = &s->tensors[s->slots[j] - 1];

        if (strcmp(t->name, name) == 0) {
            return t;
        }
        j = (j + 1) & (s->n_slots - 1);
    }
    return NULL;
}


size_t
moe_st_count(const moe_st_set_t *s)
{
    return s ? s->n_tensors : 0;
}


const moe_st_tensor_t *
moe_st_at(const moe_st_set_t *s, size_t i)
{
    return (s && i < s->n_tensors) ? &s->tensors[i] : NULL;
}


int64_t
moe_st_total_bytes(const moe_st_set_t *s)
{
    int64_t total = 0;
    size_t  i;

    for (i = 0; s && i < s->n_tensors; i++) {
        total += (int64_t) s->tensors[i].nbytes;
    }
    return total;
}


float
moe_bf16_to_f32(uint16_t h)
{
    uint32_t u = (uint32_t) h << 16;
    float    f;

    memcpy(&f, &u, sizeof(f));
    return f;
}


float
moe_f16_to_f32(uint16_t h)
{
    uint32_t sign = (uint32_t) (h >> 15) << 31;
    uint32_t exp = (h >> 10) & 0x1f;
    uint32_t man = h & 0x3ff;
    uint32_t u;
    float    f;

    if (exp == 0x1f) {
        u = sign | 0x7f800000u | (man << 13);      /* inf / nan */
    } else if (exp != 0) {
        u = sign | ((exp + 112) << 23) | (man << 13);
    } else if (man == 0) {
        u = sign;                                   /* +-0 */
    } else {
        /* subnormal: man * 2^-24, exact in fp32 */
        f = ldexpf((float) man, -24);
        memcpy(&u, &f, sizeof(u));
        u |= sign;
    }
    memcpy(&f, &u, sizeof(f));
    return f;
}


/* e4m3fn: bias 7, subnormals man * 2^-9, S.1111.111 NaN, no inf */
float
moe_fp8_e4m3_to_f32(uint8_t b)
{
    int    e = (b >> 3) & 0xf, man = b & 7;
    float  f;

    if (e == 0xf && man == 7) {
        f = NAN;
    } else if (e == 0) {
        f = ldexpf((float) man, -9);
    } else {
        f = ldexpf((float) (8 + man), e - 10);
    }
    return (b & 0x80) ? -f : f;
}


/* e5m2: the top byte of an IEEE half */
float
moe_fp8_e5m2_to_f32(uint8_t b)
{
    return moe_f16_to_f32((uint16_t) (b << 8));
}


int
moe_st_to_f32(const moe_st_tensor_t *t, int64_t first, int64_t n,
    float *dst)
{
    const unsigned char *p;
    int64_t              i;
    uint16_t             h;

    if (t == NULL || first < 0 || n < 0 || first > t->numel
        || n > t->numel - first)
    {
        return MOE_EINVAL;
    }
    p = (const unsigned char *) t->data + first * (int64_t)
        moe_dtype_size(t->dtype);
    switch (t->dtype) {
    case MOE_DT_F32:
        memcpy(dst, p, (size_t) n * sizeof(float));
        break;
    case MOE_DT_F16:
        for (i = 0; i < n; i++) {
            h = (uint16_t) (p[2 * i] | (p[2 * i + 1] << 8));
            dst[i] = moe_f16_to_f32(h);
        }
        break;
    case MOE_DT_BF16:
        for (i = 0; i < n; i++) {
            h = (uint16_t) (p[2 * i] | (p[2 * i + 1] << 8));
            dst[i] = moe_bf16_to_f32(h);
        }
        break;
    case MOE_DT_F8_E4M3:
        for (i = 0; i < n; i++) {
            dst[i] = moe_fp8_e4m3_to_f32(p[i]);
        }
        break;
    case MOE_DT_F8_E5M2:
        for (i = 0; i < n; i++) {
            dst[i] = moe_fp8_e5m2_to_f32(p[i]);
        }
        break;
    case MOE_DT_I32:
        for (i = 0; i < n; i++) {
            int32_t v;

            memcpy(&v, p + 4 * i, sizeof(v));
            dst[i] = (float) v;
        }
        break;
    case MOE_DT_U8:
        for (i = 0; i < n; i++) {
            dst[i] = (float) p[i];
        }
        break;
    case MOE_DT_I8:
        for (i = 0; i < n; i++) {
            dst[i] = (float) (int8_t) p[i];
        }
        break;
    case MOE_DT_I64:
        for (i = 0; i < n; i++) {
            int64_t v;

            memcpy(&v, p + 8 * i, sizeof(v));
            dst[i] = (float) v;
        }
        break;
    default:
        return MOE_EINVAL;
    }
    return MOE_OK;
}
