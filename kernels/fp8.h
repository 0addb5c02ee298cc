/*
 * FP8 e4m3 ("e4m3fn", the OCP / Hugging Face F8_E4M3 format) on the host:
 * plain C, header only, so that the CPU backend (engine/backends), the
 * loaders and the GPU tests round values exactly as the device does.
 *
 * Format: 1 sign bit, 4 exponent bits (bias 7), 3 mantissa bits; no
 * infinities; 0x7f / 0xff are NaN; the largest finite value is 448,
 * the smallest normal 2^-6, the smallest subnormal 2^-9.
 *
 * moe_fp8_from_f32 rounds to nearest, ties to even, and saturates
 * finite values beyond +-448 to +-448 (the device's cvt with .satfinite,
 * __nv_cvt_float_to_fp8(x, __NV_SATFINITE, __NV_E4M3)); NaN stays NaN.
 * moe_fp8_to_f32 is exact.
 */
#ifndef MOE_KERNELS_FP8_H
#define MOE_KERNELS_FP8_H

#include <math.h>
#include <stdint.h>
#include <string.h>

#define MOE_FP8_E4M3_MAX  448.0f

/* The fp32 value of e4m3 code c (exact). */
static inline float
moe_fp8_to_f32(uint8_t c)
{
    int   e = (c >> 3) & 15, m = c & 7;
    float v;

    if (e == 15 && m == 7) {
        return NAN;
    }
    v = e == 0 ? ldexpf((float) m, -9) : ldexpf((float) (8 + m), e - 10);
    return (c & 0x80) ? -v : v;
}

/* The e4m3 code nearest to f (ties to even; saturating; NaN -> 0x7f). */
static inline uint8_t
moe_fp8_from_f32(float f)
{
    uint32_t u, s;
    int      e, m;
    float    a;

    memcpy(&u, &f, 4);
    s = (u >> 24) & 0x80u;
    u &= 0x7fffffffu;
    if (u > 0x7f800000u) {
        return 0x7f;
    }
    memcpy(&a, &u, 4);
    if (a >= MOE_FP8_E4M3_MAX) {
        return (uint8_t) (s | 0x7e);
    }
    if (a < 0.015625f) {                 /* below 2^-6: subnormal steps */
        /* a / 2^-9 is exact; rintf rounds ties to even (default mode);
         * 8 steps is the smallest normal, code 0x08 */
        return (uint8_t) (s | (uint32_t) rintf(a * 512.0f));
    }
    u += 0x7ffffu + ((u >> 20) & 1u);   /* round to 3 mantissa bits */
    e = (int) (u >> 23) - 127;
    m = (int) ((u >> 20) & 7u);
    if (e > 8 || (e == 8 && m == 7)) {
        return (uint8_t) (s | 0x7e);    /* rounded past 448: saturate */
    }
    return (uint8_t) (s | (uint32_t) ((e + 7) << 3) | (uint32_t) m);
}

/* f rounded through e4m3 after dividing by scale: what an fp8 cache
 * holding f with per-tensor scale `scale` gives back. */
static inline float
moe_fp8_round(float f, float scale)
{
    return moe_fp8_to_f32(moe_fp8_from_f32(f / scale)) * scale;
}

#endif /* MOE_KERNELS_FP8_H */
