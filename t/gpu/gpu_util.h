/*
 * Host helpers shared by the GPU tests: random data, bf16 rounding as the
 * device does it, upload/download, relative error.
 */
#ifndef MOE_T_GPU_UTIL_H
#define MOE_T_GPU_UTIL_H

#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <time.h>

#include <cuda_fp16.h>
#include <cuda_runtime_api.h>

static uint64_t gu_rng = 0x2545f4914f6cdd1dULL;

static inline uint32_t
gu_rand(void)
{
    gu_rng ^= gu_rng << 13;
    gu_rng ^= gu_rng >> 7;
    gu_rng ^= gu_rng << 17;
    return (uint32_t) (gu_rng >> 16);
}

/* Restart the generator from seed (any value; mixed so that 0 works). */
static inline void
gu_seed(uint64_t seed)
{
    uint64_t z = seed + 0x9e3779b97f4a7c15ULL;

    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
    z ^= z >> 31;
    gu_rng = z != 0 ? z : 0x2545f4914f6cdd1dULL;
}

/* The run's seed: MOE_TEST_SEED when set (it repeats a run), else the
 * time; the generator restarted from it (the caller prints it). */
static inline uint64_t
gu_seed_env(void)
{
    const char *sv = getenv("MOE_TEST_SEED");
    uint64_t    seed = sv != NULL ? strtoull(sv, NULL, 10)
                                  : (uint64_t) time(NULL);

    gu_seed(seed);
    return seed;
}

/* fp16 bits -> float */
static inline float
gu_h2f(uint16_t b)
{
    __half_raw r;

    r.x = b;
    return __half2float(__half(r));
}

/* a random finite e4m3 code (no NaN) */
static inline uint8_t
gu_rand_e4m3(void)
{
    uint8_t c;

    do {
        c = (uint8_t) gu_rand();
    } while ((c & 0x7f) == 0x7f);
    return c;
}

/* uniform [-1, 1) */
static inline float
gu_uniform(void)
{
    return (float) (gu_rand() & 0xffffff) / 8388608.0f - 1.0f;
}

static inline uint16_t
gu_f2bf(float f)
{
    uint32_t u;

    memcpy(&u, &f, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) {
        return 0x7fc0;
    }
    u += 0x7fffu + ((u >> 16) & 1u);      /* round to nearest even */
    return (uint16_t) (u >> 16);
}

static inline float
gu_bf2f(uint16_t b)
{
    uint32_t u = (uint32_t) b << 16;
    float    f;

    memcpy(&f, &u, 4);
    return f;
}

static inline float
gu_round_bf(float f)
{
    return gu_bf2f(gu_f2bf(f));
}

static inline void
gu_fill(float *a, size_t n, float scale)
{
    for (size_t i = 0; i < n; i++) {
        a[i] = gu_uniform() * scale;
    }
}

/* random values already representable in bf16, plus their bf16 bits */
static inline void
gu_fill_bf(float *a, uint16_t *bits, size_t n, float scale)
{
    for (size_t i = 0; i < n; i++) {
        bits[i] = gu_f2bf(gu_uniform() * scale);
        a[i] = gu_bf2f(bits[i]);
    }
}

/* ||a - ref|| / ||ref||; NaN anywhere gives NaN (a failure). */
static inline double
gu_relerr(const float *a, const float *ref, size_t n)
{
    double num = 0, den = 0;

    for (size_t i = 0; i < n; i++) {
        double d = (double) a[i] - ref[i];

        if (isnan(a[i]) || isinf(a[i])) {
            return NAN;
        }
        num += d * d;
        den += (double) ref[i] * ref[i];
    }
    return den > 0 ? sqrt(num / den) : sqrt(num);
}

static inline void *
gu_dev(size_t bytes)
{
    void *p = NULL;

    if (cudaMalloc(&p, bytes) != cudaSuccess) {
        fprintf(stderr, "cudaMalloc %zu failed\n", bytes);
        exit(2);
    }
    cudaMemset(p, 0xff, bytes);     /* poison: NaN as fp32 and bf16 */
    return p;
}

static inline void *
gu_up(const void *h, size_t bytes)
{
    void *p = gu_dev(bytes);

    cudaMemcpy(p, h, bytes, cudaMemcpyHostToDevice);
    return p;
}

static inline void
gu_down(void *h, const void *d, size_t bytes)
{
    cudaError_t e = cudaMemcpy(h, d, bytes, cudaMemcpyDeviceToHost);

    if (e != cudaSuccess) {
        fprintf(stderr, "# cudaMemcpy D2H: %s\n", cudaGetErrorString(e));
        memset(h, 0xff, bytes);
    }
}

static inline void
gu_bf_to_f(float *out, const uint16_t *in, size_t n)
{
    for (size_t i = 0; i < n; i++) {
        out[i] = gu_bf2f(in[i]);
    }
}

#endif
