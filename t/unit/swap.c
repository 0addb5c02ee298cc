/*
 * Checks the swap-space pieces below the scheduler, on the CPU backend and
 * models/localmoe-tiny (run from the repository root or via MOE_SRCDIR):
 *  - swap_out copies blocks into host slots and swap_in copies them back
 *    bit-exactly: blocks -> slots, the blocks overwritten by another
 *    sequence, slots -> other blocks, those -> other slots gives the same
 *    bytes (and not all zero);
 *  - decoding after the swap-in, over the new block ids, gives BITWISE the
 *    logits of the same decode on a sequence that was never swapped;
 *  - bad block / slot ids are refused (MOE_EINVAL), swap_alloc(0) frees the
 *    pool;
 *  - the slot manager (moe_slots_t, kv.h) is all or nothing and gives
 *    every slot back.
 */

#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "moe.h"
#include "sched/kv.h"
#include "backends/backend.h"
#include "tap.h"

#define BS      4
#define NBLK    16
#define NSLOT   8
#define LEN     10


static int
fwd(moe_backend_t *b, const int32_t *toks, int n, int pos,
    const int32_t *table, int nb, float *logits)
{
    moe_seq_batch_t  sb;

    memset(&sb, 0, sizeof(sb));
    sb.tokens = toks;
    sb.n_tokens = n;
    sb.pos = pos;
    sb.block_table = table;
    sb.n_blocks = nb;
    sb.logits = logits;
    return b->forward(b, &sb, 1);
}


int
main(void)
{
    char            dir[PATH_MAX], err[512];
    const char     *src = getenv("MOE_SRCDIR");
    moe_model_t    *m = NULL;
    moe_backend_t  *b = NULL;
    int             i, V, ok, rc;
    int32_t         pa[LEN + 1], pb[LEN], next = 7;
    int32_t         ta[3] = { 3, 5, 7 }, tn[3] = { 10, 11, 12 };
    int32_t         tr[3] = { 0, 1, 2 };
    int32_t         s1[3] = { 0, 1, 2 }, s2[3] = { 4, 5, 6 };
    float          *lr, *lx;
    unsigned char  *x1, *x2;
    size_t          per;
    moe_slots_t     sl;
    int32_t         ids[8];

    TAP_PLAN(9);

    snprintf(dir, sizeof(dir), "%s/models/localmoe-tiny",
             src != NULL ? src : ".");
    if (moe_model_load(dir, 0, &m, err, sizeof(err)) != MOE_OK
        || moe_cpu_backend_create(m, NBLK, BS, 1, &b, err, sizeof(err))
           != MOE_OK)
    {
        TAP_OK(0, "load %s: %s", dir, err);
        return 1;
    }
    V = moe_model_hparams(m)->vocab_size;
    per = (size_t) b->kv_bytes_per_block;

    rc = b->swap_alloc != NULL ? b->swap_alloc(b, NSLOT, err, sizeof(err))
                               : MOE_EUNSUPPORTED;
    TAP_OK(rc == MOE_OK && b->n_swap_slots == NSLOT && b->swap_out
           && b->swap_in && b->swap_read,
           "cpu backend: swap pool of %d slots of %zu bytes", NSLOT, per);

    for (i = 0; i < LEN; i++) {
        pa[i] = (int32_t) ((i * 37 + 11) % V);
        pb[i] = (int32_t) ((i * 53 + 5) % V);
    }
    pa[LEN] = next;
    lr = malloc(sizeof(float) * (size_t) V);
    lx = malloc(sizeof(float) * (size_t) V);
    x1 = malloc(per);
    x2 = malloc(per);

    /* reference: prompt + one decode in blocks 0..2, never swapped */
    ok = fwd(b, pa, LEN, 0, tr, 3, NULL) == MOE_OK
         && fwd(b, pa + LEN, 1, LEN, tr, 3, lr) == MOE_OK;

    /* A: prompt in blocks 3,5,7, swapped out, blocks overwritten by B */
    ok &= fwd(b, pa, LEN, 0, ta, 3, NULL) == MOE_OK;
    ok &= b->swap_out(b, ta, s1, 3) == MOE_OK;
    ok &= fwd(b, pb, LEN, 0, ta, 3, NULL) == MOE_OK;
    ok &= b->swap_in(b, s1, tn, 3) == MOE_OK;
    ok &= b->swap_out(b, tn, s2, 3) == MOE_OK;
    TAP_OK(ok, "forward, swap_out, overwrite, swap_in, swap_out all ok");

    {
        int same = 1, nonzero = 0;
        size_t k;

        for (i = 0; i < 3; i++) {
            same &= b->swap_read(b, s1[i], x1) == MOE_OK
                    && b->swap_read(b, s2[i], x2) == MOE_OK
                    && memcmp(x1, x2, per) == 0;
            for (k = 0; k < per; k++) {
                nonzero |= x1[k] != 0;
            }
        }
        TAP_OK(same && nonzero, "round trip blocks -> slots -> other "
               "blocks -> slots is bit-exact (and not all zero)");
    }

    /* A continues from its swapped-in blocks */
    ok = fwd(b, pa + LEN, 1, LEN, tn, 3, lx) == MOE_OK;
    TAP_OK(ok && memcmp(lr, lx, sizeof(float) * (size_t) V) == 0,
           "decode after swap_in into other blocks: bitwise the logits of "
           "the never-swapped sequence");

    /* a block overwritten by B differs: the check above can fail */
    ok = b->swap_out(b, ta, s2, 1) == MOE_OK
         && b->swap_read(b, s1[0], x1) == MOE_OK
         && b->swap_read(b, s2[0], x2) == MOE_OK;
    TAP_OK(ok && memcmp(x1, x2, per) != 0,
           "the overwritten block's contents differ from the swapped copy");

    {
        int32_t bad_b[1] = { NBLK }, bad_s[1] = { NSLOT }, good[1] = { 0 };

        TAP_OK(b->swap_out(b, bad_b, good, 1) == MOE_EINVAL
               && b->swap_out(b, good, bad_s, 1) == MOE_EINVAL
               && b->swap_in(b, bad_s, good, 1) == MOE_EINVAL
               && b->swap_in(b, good, bad_b, 1) == MOE_EINVAL
               && b->swap_read(b, NSLOT, x1) == MOE_EINVAL,
               "block / slot ids out of range refused");
    }

    TAP_OK(b->swap_alloc(b, 0, err, sizeof(err)) == MOE_OK
           && b->n_swap_slots == 0
           && b->swap_out(b, ta, s1, 1) == MOE_EINVAL,
           "swap_alloc(0) frees the pool; copies then refused");

    ok = moe_slots_init(&sl, 5) == MOE_OK;
    ok &= moe_slots_alloc(&sl, 3, ids) == MOE_OK && sl.n_free == 2;
    ok &= moe_slots_alloc(&sl, 3, ids + 3) == MOE_EFULL && sl.n_free == 2;
    ok &= moe_slots_alloc(&sl, 2, ids + 3) == MOE_OK && sl.n_free == 0;
    {
        int seen = 0;

        for (i = 0; i < 5; i++) {
            if (ids[i] >= 0 && ids[i] < 5) {
                seen |= 1 << ids[i];
            }
        }
        ok &= seen == 31;
    }
    moe_slots_free(&sl, ids, 5);
    ok &= sl.n_free == 5;
    TAP_OK(ok, "slot manager: distinct ids, all or nothing, all back");
    moe_slots_destroy(&sl);
    TAP_OK(moe_slots_init(&sl, 0) == MOE_OK && sl.n_total == 0
           && moe_slots_alloc(&sl, 1, ids) == MOE_EFULL,
           "slot manager of 0 slots: swapping off");
    moe_slots_destroy(&sl);

    free(lr);
    free(lx);
    free(x1);
    free(x2);
    b->destroy(b);
    moe_model_free(m);
    return TAP_DONE();
}
