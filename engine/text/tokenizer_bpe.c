/*
 * The BPE model on one pre-tokenized word: characters (or their <0xNN>
 * byte tokens, or unk) merged by rank with a heap, as the BPE model of
 * Hugging Face `tokenizers` does (ignore_merges, byte_fallback, fuse_unk,
 * continuing_subword_prefix, end_of_word_suffix).
 */

#include <stdlib.h>
#include <string.h>

#include "text/tokenizer_int.h"
#include "text/utf8.h"


int
moe_tok_ids_push(ids_t *o, int32_t id)
{
    int32_t *v;

    v = moe_tok_grow(o->v, &o->cap, o->n + 1, sizeof(*v), 64);
    if (v == NULL) {
        return -1;
    }
    o->v = v;
    o->v[o->n++] = id;
    return 0;
}

static int
mrg_less(const mrg_t *a, const mrg_t *b)
{
    return a->rank != b->rank ? a->rank < b->rank : a->pos < b->pos;
}

static int
heap_push(bpe_scratch_t *sc, uint32_t rank, uint32_t pos, int32_t nid)
{
    size_t i;
    mrg_t  m, *h;

    h = moe_tok_grow(sc->heap, &sc->heap_cap, sc->heap_n + 1, sizeof(*h), 64);
    if (h == NULL) {
        return -1;
    }
    sc->heap = h;
    m.rank = rank;
    m.pos = pos;
    m.new_id = nid;
    i = sc->heap_n++;
    while (i > 0 && mrg_less(&m, &sc->heap[(i - 1) / 2])) {
        sc->heap[i] = sc->heap[(i - 1) / 2];
        i = (i - 1) / 2;
    }
    sc->heap[i] = m;
    return 0;
}

static mrg_t
heap_pop(bpe_scratch_t *sc)
{
    mrg_t  top = sc->heap[0], last = sc->heap[--sc->heap_n];
    size_t i = 0, c;

    for (;;) {
        c = 2 * i + 1;
        if (c >= sc->heap_n) {
            break;
        }
        if (c + 1 < sc->heap_n && mrg_less(&sc->heap[c + 1], &sc->heap[c])) {
            c++;
        }
        if (!mrg_less(&sc->heap[c], &last)) {
            break;
        }
        sc->heap[i] = sc->heap[c];
        i = c;
    }
    if (sc->heap_n) {
        sc->heap[i] = last;
    }
    return top;
}

static int
sym_add(bpe_scratch_t *sc, size_t *ns, int32_t id)
{
    sym_t *s;

    s = moe_tok_grow(sc->sym, &sc->sym_cap, *ns + 1, sizeof(*s), 64);
    if (s == NULL) {
        return -1;
    }
    sc->sym = s;
    sc->sym[*ns].id = id;
    sc->sym[*ns].prev = (int32_t) *ns - 1;
    sc->sym[*ns].next = (int32_t) *ns + 1;
    sc->sym[*ns].alive = 1;
    (*ns)++;
    return 0;
}

/* BPE::tokenize_with_cache + merge_word + Word::merge_all for one word. */
int
moe_tok_bpe_word(const moe_tokenizer_t *t, const char *w, size_t n, ids_t *out,
    bpe_scratch_t *sc)
{
    size_t   i, cl, ns = 0, b;
    int32_t  id, unk = -1, nid;
    uint32_t rank;
    tbuf_t  *tmp = &sc->tmp;

    if (n == 0) {
        return 0;
    }
    if (t->ignore_merges && (id = moe_tok_vocab_get(t, w, n)) >= 0) {
        return moe_tok_ids_push(out, id);
    }
    for (i = 0; i < n; i += cl) {
        cl = moe_utf8_len((unsigned char) w[i]);
        if (cl > n - i) {
            cl = n - i;
        }
        tmp->len = 0;
        if (t->cont_prefix && i > 0
            && moe_tok_buf_put(tmp, t->cont_prefix, t->cont_prefix_len) != 0)
        {
            return -1;
        }
        if (moe_tok_buf_put(tmp, w + i, cl) != 0) {
            return -1;
        }
        if (t->eow_suffix && i + cl == n
            && moe_tok_buf_put(tmp, t->eow_suffix, t->eow_suffix_len) != 0)
        {
            return -1;
        }
        id = moe_tok_vocab_get(t, tmp->p, tmp->len);
        if (id >= 0) {
            if (unk >= 0) {
                if (sym_add(sc, &ns, unk) != 0) {
                    return -1;
                }
                unk = -1;
            }
            if (sym_add(sc, &ns, id) != 0) {
                return -1;
            }
            continue;
        }
        if (t->byte_fallback) {
            for (b = 0; b < tmp->len; b++) {
                if (t->byte_id[(unsigned char) tmp->p[b]] < 0) {
                    break;
                }
            }
            if (b == tmp->len) {
                for (b = 0; b < tmp->len; b++) {
                    if (sym_add(sc, &ns, t->byte_id[(unsigned char) tmp->p[b]])
                        != 0)
                    {
                        return -1;
                    }
                }
                continue;
            }
        }
        if (t->unk_id >= 0) {
            if (unk >= 0 && !t->fuse_unk) {
                if (sym_add(sc, &ns, unk) != 0) {
                    return -1;
                }
            }
            unk = t->unk_id;
        }
    }
    if (unk >= 0 && sym_add(sc, &ns, unk) != 0) {
        return -1;
    }
    if (ns == 0) {
        return 0;
    }
    sc->sym[ns - 1].next = -1;
    sc->heap_n = 0;
    for (i = 0; i + 1 < ns; i++) {
        if (moe_tok_pairmap_get(&t->merges, sc->sym[i].id,
                                sc->sym[i + 1].id, &rank, &nid)
            && heap_push(sc, rank, (uint32_t) i, nid) != 0)
        {
            return -1;
        }
    }
    while (sc->heap_n) {
        mrg_t   top = heap_pop(sc);
        sym_t  *cur = &sc->sym[top.pos], *right;
        int32_t np;

        if (!cur->alive || cur->next < 0) {
            continue;
        }
        right = &sc->sym[cur->next];
        if (!moe_tok_pairmap_get(&t->merges, cur->id, right->id, &rank, &nid)
            || nid != top.new_id)
        {
            continue;                   /* stale entry */
        }
        cur->id = top.new_id;
        right->alive = 0;
        cur->next = right->next;
        if (cur->next >= 0) {
            sc->sym[cur->next].prev = (int32_t) top.pos;
        }
        np = cur->prev;
        if (np >= 0
            && moe_tok_pairmap_get(&t->merges, sc->sym[np].id, cur->id, &rank,
                                   &nid)
            && heap_push(sc, rank, (uint32_t) np, nid) != 0)
        {
            return -1;
        }
        if (cur->next >= 0
            && moe_tok_pairmap_get(&t->merges, cur->id,
                                   sc->sym[cur->next].id, &rank, &nid)
            && heap_push(sc, rank, top.pos, nid) != 0)
        {
            return -1;
        }
    }
    for (i = 0; i < ns; i++) {
        if (sc->sym[i].alive && moe_tok_ids_push(out, sc->sym[i].id) != 0) {
            return -1;
        }
    }
    return 0;
}
