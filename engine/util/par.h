/*
 * Host work split over threads: the load-time loops that touch every
 * weight of a model (YAML fp8 quantization, the compressed-tensors int4
 * word transposition) run on the engine's loader thread, off the nginx
 * event loop; a Mixtral's 47 G weights take minutes on one core.
 */
#ifndef MOE_UTIL_PAR_H
#define MOE_UTIL_PAR_H

#include <stdint.h>

#define MOE_PAR_THREADS_MAX 8

/*
 * fn(arg, i0, i1) over [0, n) cut into contiguous ranges, one per thread:
 * at most MOE_PAR_THREADS_MAX and the online CPUs, at least `grain` items
 * each, boundaries multiples of `align` (>= 1) but the last.  The caller
 * runs the first range itself; a thread that cannot be started leaves its
 * range to the caller, so the result never depends on threads.  fn must
 * touch only its range's outputs.  Returns MOE_OK or the first range's
 * (lowest i0) non-OK status.
 */
int moe_par_for(int64_t n, int64_t grain, int64_t align,
    int (*fn)(void *arg, int64_t i0, int64_t i1), void *arg);

#endif /* MOE_UTIL_PAR_H */
