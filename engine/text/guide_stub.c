/*
 * Placeholder for the guided-decoding contract of moe.h (moe_guide_*),
 * until the grammar engine lands: weak definitions, so the real ones win
 * wherever they are linked.  Compiling any guide fails with
 * MOE_EUNSUPPORTED, which the module answers with a 400 naming the field.
 * DELETE this file when the grammar branch is merged.
 */

#include <stddef.h>

#include "moe.h"


__attribute__((weak)) int
moe_guide_compile(const moe_tokenizer_t *t, moe_guided_kind_t kind,
    const char *spec, size_t len, moe_guide_t **out, char *err,
    size_t errlen)
{
    (void) t;
    (void) kind;
    (void) spec;
    (void) len;

    *out = NULL;
    moe_errf(err, errlen, "guided decoding is not built into this server");

    return MOE_EUNSUPPORTED;
}


__attribute__((weak)) moe_guide_t *
moe_guide_ref(moe_guide_t *g)
{
    return g;
}


__attribute__((weak)) void
moe_guide_release(moe_guide_t *g)
{
    (void) g;
}
