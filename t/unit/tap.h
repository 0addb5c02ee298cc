/*
 * Minimal TAP output for the C unit tests (prove reads it).
 */

#ifndef MOE_TAP_H
#define MOE_TAP_H

#include <stdio.h>

static int tap_n;
static int tap_failed;

#define TAP_PLAN(n)  (printf("1..%d\n", (int) (n)), fflush(stdout))

#define TAP_OK(cond, ...)                                                    \
    do {                                                                     \
        int tap_c_ = (cond) ? 1 : 0;                                         \
        tap_n++;                                                             \
        if (!tap_c_) {                                                       \
            tap_failed++;                                                    \
        }                                                                    \
        printf("%sok %d - ", tap_c_ ? "" : "not ", tap_n);                   \
        printf(__VA_ARGS__);                                                 \
        printf("\n");                                                        \
        if (!tap_c_) {                                                       \
            printf("#   failed at %s:%d\n", __FILE__, __LINE__);            \
        }                                                                    \
        fflush(stdout);                                                      \
    } while (0)

#define TAP_DIAG(...)                                                        \
    do {                                                                     \
        printf("# ");                                                        \
        printf(__VA_ARGS__);                                                 \
        printf("\n");                                                        \
        fflush(stdout);                                                      \
    } while (0)

#define TAP_DONE()  (tap_failed ? 1 : 0)

#endif /* MOE_TAP_H */
