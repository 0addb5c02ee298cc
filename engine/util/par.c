/* Host work split over threads (util/par.h). */

#include <pthread.h>
#include <unistd.h>

#include "moe.h"
#include "util/par.h"

typedef struct {
    int   (*fn)(void *arg, int64_t i0, int64_t i1);
    void   *arg;
    int64_t i0, i1;
    int     rc;
} par_range_t;


static void *
par_run(void *p)
{
    par_range_t *r = p;

    r->rc = r->fn(r->arg, r->i0, r->i1);
    return NULL;
}


int
moe_par_for(int64_t n, int64_t grain, int64_t align,
    int (*fn)(void *arg, int64_t i0, int64_t i1), void *arg)
{
    par_range_t r[MOE_PAR_THREADS_MAX];
    pthread_t   th[MOE_PAR_THREADS_MAX];
    int         started[MOE_PAR_THREADS_MAX] = { 0 };
    long        cpus = sysconf(_SC_NPROCESSORS_ONLN);
    int64_t     nt, i, b;
    int         rc = MOE_OK;

    if (n <= 0) {
        return MOE_OK;
    }
    align = align < 1 ? 1 : align;
    grain = grain < 1 ? 1 : grain;
    nt = n / grain;
    nt = nt < 1 ? 1 : nt > MOE_PAR_THREADS_MAX ? MOE_PAR_THREADS_MAX : nt;
    nt = cpus > 0 && nt > cpus ? cpus : nt;
    for (i = 0, b = 0; i < nt; i++) {
        int64_t e = i == nt - 1 ? n : n * (i + 1) / nt / align * align;

        r[i].fn = fn;
        r[i].arg = arg;
        r[i].i0 = b;
        r[i].i1 = e > b ? e : b;
        r[i].rc = MOE_OK;
        b = r[i].i1;
    }
    for (i = 1; i < nt; i++) {
        started[i] = r[i].i1 > r[i].i0
                     && pthread_create(&th[i], NULL, par_run, &r[i]) == 0;
    }
    if (r[0].i1 > r[0].i0) {
        (void) par_run(&r[0]);
    }
    for (i = 1; i < nt; i++) {
        if (started[i]) {
            (void) pthread_join(th[i], NULL);
        } else if (r[i].i1 > r[i].i0) {
            (void) par_run(&r[i]);
        }
    }
    for (i = 0; i < nt && rc == MOE_OK; i++) {
        rc = r[i].rc;
    }
    return rc;
}
