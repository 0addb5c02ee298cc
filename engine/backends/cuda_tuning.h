/*
 * Reading the CUDA tuning record (kernels/tuning.h) once, when a CUDA
 * backend is created: defaults, then the MOE_CUDA_* environment
 * overrides, each parsed and range-checked here and nowhere else.  Plain
 * C, no CUDA: the CPU-only build compiles and tests it too.  The knobs are
 * documented in kernels/TUNING.md.
 */
#ifndef MOE_BACKENDS_CUDA_TUNING_H
#define MOE_BACKENDS_CUDA_TUNING_H

#include <stddef.h>

#include "tuning.h"                 /* kernels/: the record itself */

#ifdef __cplusplus
extern "C" {
#endif

/* The routed experts' weight format, for the automatic defaults. */
enum {
    MOE_CUDA_EXPERTS_OTHER = 0,     /* bf16 (or no routed experts) */
    MOE_CUDA_EXPERTS_E4M3 = 1,      /* fp8 */
    MOE_CUDA_EXPERTS_4BIT = 2       /* AWQ / GPTQ */
};

/*
 * Fill *t with the defaults, then apply every MOE_CUDA_* variable that is
 * set (and not empty) in the environment; resolve the automatic defaults
 * (gemv_max_t, route_fuse1) for a model of n_experts experts per layer
 * (1: dense) whose routed experts are in format expert_fmt
 * (MOE_CUDA_EXPERTS_*).
 * Returns MOE_OK, or MOE_EINVAL with err naming the variable, its value
 * and the accepted range when a value is not a whole number in range (the
 * backend then fails to start; *t holds the defaults).
 */
int moe_cuda_tuning_read(moe_cuda_tuning_t *t, int n_experts,
    int expert_fmt, char *err, size_t errlen);

/*
 * The record as one line of "name=value" pairs (for the start-up log)
 * into buf of len bytes (truncated, always terminated when len > 0).
 * Returns the length snprintf would have written.
 */
int moe_cuda_tuning_format(const moe_cuda_tuning_t *t, char *buf,
    size_t len);

#ifdef __cplusplus
}
#endif

#endif /* MOE_BACKENDS_CUDA_TUNING_H */
