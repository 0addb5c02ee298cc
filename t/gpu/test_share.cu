/*
 * Weights that survive a reload, on the GPU (engine/backends/cuda_share.cu
 * and the CUDA backend's import path).  One binary in several roles: run
 * without arguments it is the coordinator that prints TAP and starts the
 * others (itself, exec()ed with a role) as separate processes, as nginx's
 * old and new workers are:
 *
 *   A  export   a VMM weight buffer filled with a pattern, served under a
 *               key; waits for the hand-over, reports it, exits
 *   B  import   imports A's buffer (read-only), checks the pattern; after
 *               A has exited checks it again, then serves it on
 *   C  import   imports from B (A long gone): the third generation
 *   D  other    another key: not imported, a fresh allocation
 *   E  backend  a random-weight CUDA backend (the exporter) runs a prompt
 *               on high block ids, writes its logits
 *   F  backend  the same backend in another process with
 *               MOE_CUDA_KV_START_BLOCKS=8: weights imported, the KV pool
 *               starts with 8 of 64 blocks; the same prompt on blocks
 *               0..2 gives E's logits; kv_grow backs the whole pool; the
 *               prompt on the high ids again gives E's logits
 *   E, F again with AWQ-packed random weights (repacked into GPTQ's
 *               layout by E after filling them): F imports the repacked
 *               bytes, reads them as GPTQ without repacking again, and
 *               gives E's logits
 *
 * Roles report "R <0|1> <what>" lines and "READY" on stdout; the
 * coordinator answers "go" on their stdin.  Run: build/gpu/test_share
 * (GPU 0; skips when the driver lacks VMM with POSIX fds).
 */

#include <math.h>
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cuda_runtime.h>

#include "moe.h"
#include "backends/backend.h"
#include "backends/cuda_backend.h"
#include "backends/cuda_share.h"
#include "backends/qweights.h"
#include "tap.h"

#define BYTES   ((size_t) 96 << 20 | 12345)
#define NBLK    64
#define BS      16
#define PLEN    40
#define VOCAB   1000

static const char *self;


/* ------------------------------------------------------------- roles */

static void
report(int ok, const char *fmt, ...)
{
    va_list ap;

    printf("R %d ", ok ? 1 : 0);
    va_start(ap, fmt);
    vprintf(fmt, ap);
    va_end(ap);
    printf("\n");
    fflush(stdout);
}


static void
ready(void)
{
    printf("READY\n");
    fflush(stdout);
}


/* Block until the coordinator says go (or closes stdin). */
static void
await_go(void)
{
    char line[64];

    if (fgets(line, sizeof(line), stdin) == NULL) {
        return;
    }
}


static uint32_t *
pattern(uint32_t salt)
{
    uint32_t *h = (uint32_t *) malloc(BYTES);
    size_t    i;

    for (i = 0; h != NULL && i < BYTES / 4; i++) {
        h[i] = (uint32_t) i * 2654435761U + salt;
    }
    return h;
}


static int
check(const void *dev, uint32_t salt)
{
    uint32_t *want = pattern(salt), *got = (uint32_t *) malloc(BYTES);
    int       ok;

    ok = want != NULL && got != NULL
         && cudaMemcpy(got, dev, BYTES / 4 * 4, cudaMemcpyDeviceToHost)
            == cudaSuccess
         && memcmp(want, got, BYTES / 4 * 4) == 0;
    free(want);
    free(got);
    return ok;
}


static int
role_export(const char *key)
{
    moe_cuda_wmem_t  w;
    uint32_t        *h = pattern(17);
    char             err[256];
    int64_t          pid = 0;
    double           ms = 0;
    int              rc;

    rc = moe_cuda_wmem_alloc(&w, 0, BYTES, key, err, sizeof(err));
    report(rc == MOE_OK && w.vmm && !w.imported && w.bytes >= BYTES,
           "exporter: a fresh VMM allocation of %zu bytes", w.bytes);
    report(h != NULL && cudaMemcpy(w.ptr, h, BYTES / 4 * 4,
                                   cudaMemcpyHostToDevice) == cudaSuccess
           && cudaDeviceSynchronize() == cudaSuccess,
           "exporter: pattern written");
    free(h);
    moe_cuda_wmem_serve(&w, key, 777, 4096);
    ready();
    rc = moe_cuda_wmem_wait(&w, 30000, &pid, &ms);
    report(rc == 1 && pid > 0, "exporter: weights handed over to pid %lld "
           "in %.1f ms", (long long) pid, ms);
    moe_cuda_wmem_free(&w);
    return 0;
}


static int
role_import(const char *key, long from, int serve_on)
{
    moe_cuda_wmem_t  w;
    char             err[256];
    int              rc;

    rc = moe_cuda_wmem_alloc(&w, 0, BYTES, key, err, sizeof(err));
    report(rc == MOE_OK && w.imported && w.from_pid == from,
           "importer %d: weights imported from pid %lld (want %ld) in %.1f "
           "ms", (int) getpid(), (long long) w.from_pid, from, w.import_ms);
    report(rc == MOE_OK && check(w.ptr, 17),
           "importer %d: the pattern is there", (int) getpid());
    if (serve_on) {
        ready();
        await_go();                 /* the exporter has exited */
        report(check(w.ptr, 17), "importer: the pattern is still there "
               "after the exporter exited");
        moe_cuda_wmem_serve(&w, key, 777, 4096);
        ready();
        await_go();
    }
    moe_cuda_wmem_free(&w);
    return 0;
}


static int
role_other(const char *key)
{
    moe_cuda_wmem_t  w;
    char             other[MOE_SHARE_KEY_MAX + 8], err[256];
    int              rc;

    snprintf(other, sizeof(other), "%s-other", key);
    rc = moe_cuda_wmem_alloc(&w, 0, BYTES, other, err, sizeof(err));
    report(rc == MOE_OK && !w.imported && w.vmm,
           "another key: not imported, a fresh allocation");
    moe_cuda_wmem_free(&w);
    return 0;
}


static void
tiny_hp(moe_hparams_t *hp)
{
    memset(hp, 0, sizeof(*hp));
    hp->arch = MOE_ARCH_MIXTRAL;
    snprintf(hp->arch_name, sizeof(hp->arch_name), "share-test");
    hp->dim = 256;
    hp->n_layers = 3;
    hp->n_heads = 4;
    hp->n_kv_heads = 2;
    hp->head_dim = 64;
    hp->ffn_dim = 512;
    hp->n_experts = 4;
    hp->top_k = 2;
    hp->vocab_size = VOCAB;
    hp->max_pos = 4096;
    hp->rope_theta = 1e6f;
    hp->norm_eps = 1e-5f;
    hp->bos_id = -1;
}


static int
prompt_logits(moe_backend_t *b, const int32_t *bt, float *logits)
{
    moe_seq_batch_t  sb;
    int32_t          tok[PLEN];
    int              i;

    for (i = 0; i < PLEN; i++) {
        tok[i] = (i * 37 + 11) % VOCAB;
    }
    memset(&sb, 0, sizeof(sb));
    sb.tokens = tok;
    sb.n_tokens = PLEN;
    sb.pos = 0;
    sb.block_table = bt;
    sb.n_blocks = (PLEN + BS - 1) / BS;
    sb.logits = logits;
    return b->forward(b, &sb, 1);
}


static double
max_rel(const float *a, const float *b, int n)
{
    double m = 0, rms = 0;
    int    i;

    for (i = 0; i < n; i++) {
        rms += (double) a[i] * a[i];
    }
    rms = sqrt(rms / n) + 1e-30;
    for (i = 0; i < n; i++) {
        m = fmax(m, fabs((double) a[i] - b[i]) / rms);
    }
    return m;
}


/* role_backend with wfmt "awq": the same backend with AWQ-packed random
 * weights, which the exporter repacks into GPTQ's layout after filling
 * them (q4_layout 1): the importer must read them as they are (no second
 * repack) and as GPTQ, or its logits differ. */
static int
role_backend(int second, const char *file, const char *wfmt)
{
    moe_hparams_t   hp;
    moe_backend_t  *b = NULL;
    char            err[512];
    float           mine[VOCAB], theirs[VOCAB];
    int32_t         hi[3] = { NBLK - 3, NBLK - 2, NBLK - 1 };
    int32_t         lo[3] = { 0, 1, 2 };
    FILE           *f;
    int             rc, n;
    double          d;

    const int awq = wfmt != NULL && strcmp(wfmt, "awq") == 0;
    const char *tag = awq ? " (AWQ weights in GPTQ's layout)" : "";

    tiny_hp(&hp);
    rc = awq ? moe_cuda_backend_create_random_fmt(&hp, MOE_WF_AWQ, 42, 1, 0,
                                                  0, NBLK, BS, 256, 0, &b,
                                                  err, sizeof(err))
             : moe_cuda_backend_create_random(&hp, 42, NBLK, BS, 256, 0, &b,
                                              err, sizeof(err));
    if (!second) {
        report(rc == MOE_OK && b->kv_grow == NULL,
               "backend 1%s: created (%s)", tag, rc == MOE_OK ? "ok" : err);
        rc = rc == MOE_OK ? prompt_logits(b, hi, mine) : rc;
        f = fopen(file, "wb");
        report(rc == MOE_OK && f != NULL
               && fwrite(mine, sizeof(float), VOCAB, f) == VOCAB,
               "backend 1: prompt on blocks %d..%d", hi[0], hi[2]);
        if (f != NULL) {
            fclose(f);
        }
        ready();
        await_go();
        if (b != NULL) {
            b->destroy(b);
        }
        return 0;
    }
    f = fopen(file, "rb");
    n = f != NULL ? (int) fread(theirs, sizeof(float), VOCAB, f) : 0;
    if (f != NULL) {
        fclose(f);
    }
    report(rc == MOE_OK && b->kv_grow != NULL && b->n_kv_usable == 8
           && b->n_kv_blocks == NBLK,
           "backend 2%s: weights imported, KV pool starts with %d of %d "
           "blocks (%s)", tag, rc == MOE_OK ? b->n_kv_usable : -1,
           rc == MOE_OK ? b->n_kv_blocks : -1, rc == MOE_OK ? "ok" : err);
    if (rc != MOE_OK || b->kv_grow == NULL) {
        if (b != NULL) {
            b->destroy(b);
        }
        return 0;
    }
    rc = prompt_logits(b, lo, mine);
    d = max_rel(theirs, mine, VOCAB);
    report(rc == MOE_OK && n == VOCAB && d <= 1e-3,
           "backend 2%s: the prompt on blocks 0..2 gives backend 1's logits "
           "(max diff %.2e of rms)", tag, d);
    n = b->kv_grow(b);
    report(n == NBLK && b->n_kv_usable == NBLK,
           "backend 2: kv_grow backs the whole pool (%d blocks)", n);
    rc = prompt_logits(b, hi, mine);
    d = max_rel(theirs, mine, VOCAB);
    report(rc == MOE_OK && d <= 1e-3,
           "backend 2: on the grown blocks %d..%d too (max diff %.2e)",
           hi[0], hi[2], d);
    b->destroy(b);
    return 0;
}


/* ------------------------------------------------------- coordinator */

typedef struct {
    pid_t  pid;
    FILE  *out;        /* its stdout */
    int    in;         /* its stdin */
} child_t;


static int
spawn(child_t *c, const char *const *argv, const char *env)
{
    int to[2], from[2];

    if (pipe(to) != 0 || pipe(from) != 0) {
        return -1;
    }
    fflush(stdout);
    c->pid = fork();
    if (c->pid == 0) {
        dup2(to[0], 0);
        dup2(from[1], 1);
        close(to[0]);
        close(to[1]);
        close(from[0]);
        close(from[1]);
        if (env != NULL) {
            putenv((char *) env);
        }
        execv(self, (char *const *) argv);
        _exit(127);
    }
    close(to[0]);
    close(from[1]);
    c->in = to[1];
    c->out = fdopen(from[0], "r");
    return c->pid > 0 && c->out != NULL ? 0 : -1;
}


/* Relay a child's reports as TAP until READY (1) or its end (0). */
static int
relay(child_t *c)
{
    char line[1024];
    int  len;

    while (fgets(line, sizeof(line), c->out) != NULL) {
        len = (int) strlen(line);
        if (len > 0 && line[len - 1] == '\n') {
            line[len - 1] = '\0';
        }
        if (strcmp(line, "READY") == 0) {
            return 1;
        }
        if (strncmp(line, "R ", 2) == 0) {
            TAP_OK(line[2] == '1', "%s", line + 4);
        } else {
            TAP_DIAG("%s", line);
        }
    }
    return 0;
}


static void
go(child_t *c)
{
    if (write(c->in, "go\n", 3) != 3) {
        TAP_DIAG("a child is gone");
    }
}


static int
finish(child_t *c)
{
    int st = 0;

    close(c->in);
    while (relay(c) == 1) {
    }
    fclose(c->out);
    waitpid(c->pid, &st, 0);
    return WIFEXITED(st) && WEXITSTATUS(st) == 0;
}


int
main(int argc, char **argv)
{
    child_t  a, bb, c, d, e, f;
    char     key[128], file[128], pid_a[32], pid_b[32];
    int      ok;

    self = argv[0];
    if (argc >= 3 && strcmp(argv[1], "export") == 0) {
        return role_export(argv[2]);
    }
    if (argc >= 5 && strcmp(argv[1], "import") == 0) {
        return role_import(argv[2], atol(argv[3]), atoi(argv[4]));
    }
    if (argc >= 3 && strcmp(argv[1], "other") == 0) {
        return role_other(argv[2]);
    }
    if (argc >= 4 && strcmp(argv[1], "backend") == 0) {
        return role_backend(atoi(argv[2]), argv[3],
                            argc >= 5 ? argv[4] : NULL);
    }

    if (!moe_cuda_share_available(0)) {
        printf("1..0 # SKIP GPU 0 has no VMM with POSIX fd export\n");
        return 0;
    }
    /* test keys of our own: never a worker's */
    snprintf(key, sizeof(key), "test_share pid=%d", (int) getpid());
    snprintf(file, sizeof(file), "/tmp/moe_test_share_%d.bin",
             (int) getpid());
    TAP_PLAN(25);

    {
        const char *av[] = { self, "export", key, NULL };

        ok = spawn(&a, av, NULL) == 0 && relay(&a) == 1;
    }
    snprintf(pid_a, sizeof(pid_a), "%d", (int) a.pid);
    {
        const char *av[] = { self, "import", key, pid_a, "1", NULL };

        ok &= spawn(&bb, av, NULL) == 0 && relay(&bb) == 1;
    }
    ok &= finish(&a);               /* reports the hand-over, exits */
    TAP_OK(ok, "exporter exited after the hand-over");
    go(&bb);
    ok = relay(&bb) == 1;
    snprintf(pid_b, sizeof(pid_b), "%d", (int) bb.pid);
    {
        const char *av[] = { self, "import", key, pid_b, "0", NULL };

        ok &= spawn(&c, av, NULL) == 0 && finish(&c);
    }
    {
        const char *av[] = { self, "other", key, NULL };

        ok &= spawn(&d, av, NULL) == 0 && finish(&d);
    }
    ok &= finish(&bb);
    TAP_OK(ok, "every process of the chain ended cleanly");

    {
        const char *av1[] = { self, "backend", "0", file, NULL };
        const char *av2[] = { self, "backend", "1", file, NULL };

        ok = spawn(&e, av1, NULL) == 0 && relay(&e) == 1;
        ok &= spawn(&f, av2, "MOE_CUDA_KV_START_BLOCKS=8") == 0
              && finish(&f);
        ok &= finish(&e);
    }
    TAP_OK(ok, "both backends ended cleanly");
    {
        const char *av1[] = { self, "backend", "0", file, "awq", NULL };
        const char *av2[] = { self, "backend", "1", file, "awq", NULL };

        ok = spawn(&e, av1, NULL) == 0 && relay(&e) == 1;
        ok &= spawn(&f, av2, "MOE_CUDA_KV_START_BLOCKS=8") == 0
              && finish(&f);
        ok &= finish(&e);
    }
    TAP_OK(ok, "both AWQ backends ended cleanly");
    unlink(file);
    return TAP_DONE();
}
