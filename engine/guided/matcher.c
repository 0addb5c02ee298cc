/*
 * The per-sequence matcher: a set of pushdown stacks over the flat grammar
 * (guided_int.h), advanced byte by byte; the allowed-token mask by one
 * walk of the vocabulary trie; masks cached per guide by state.
 *
 * A stack is a list of grammar positions still to match, top last; a
 * position is a byte class or a rule reference.  "Expanding" replaces a
 * top reference by each alternative of its rule (the reference's
 * successor stays below; a reference at the end of its alternative is
 * dropped first, so right recursion does not grow the stack) until every
 * top is a byte class or the stack is empty (the text so far may end
 * there).  A state is the sorted, duplicate-free set of expanded stacks,
 * stored as [len, pos...] records in one int32 vector.
 */

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "guided/guided.h"
#include "guided/guided_int.h"
#include "text/tokenizer.h"


typedef struct {
    int32_t  *v;
    size_t    n, cap;
} sv_t;

/* a slot of the expanded-stacks set: gen == the set's gen when used */
typedef struct {
    uint32_t  gen;
    uint32_t  off;              /* into seen_pool */
} seen_slot_t;

struct moe_guided_state {
    moe_guide_t  *g;
    sv_t          cur;          /* the state: [len, pos...] records */
    int           done;         /* EOS taken */
    int32_t       eos[8];
    int           n_eos;
    sv_t          tmp;          /* expansion scratch */
    sv_t         *depth;        /* (max_depth + 1) trie walk states */
    int           n_depth;
    int           oom;
    size_t        work;         /* expand() calls of this mask walk */
    size_t        work_max;     /* their limit; 0 outside a mask walk */

    /* the stacks already expanded by the current expansion (one byte's
     * step, or the start state): one met again is skipped, its stacks
     * are already out.  Without it nullable rules nested in each other
     * ((a?){0,9}){0,9} ...) reach the same stack along exponentially
     * many paths. */
    sv_t          seen_pool;    /* [len, pos...] records */
    seen_slot_t  *seen;         /* (n_seen_slot) open addressing */
    size_t        n_seen_slot;  /* power of two */
    size_t        n_seen;
    uint32_t      seen_gen;     /* bumped to empty the set */
};


static int
sv_reserve(sv_t *s, size_t extra)
{
    int32_t *p;
    size_t   c;

    if (s->n + extra <= s->cap) {
        return 0;
    }
    c = s->cap ? s->cap : 64;
    while (c < s->n + extra) {
        c *= 2;
    }
    p = realloc(s->v, sizeof(*p) * c);
    if (p == NULL) {
        return -1;
    }
    s->v = p;
    s->cap = c;
    return 0;
}


/* ----------------------------------------------------------- expanding */

/* expand() and advance_byte() failures (0: done) */
#define EXP_NOMEM    (-1)
#define EXP_COMPLEX  (-2)       /* over a MOE_GUIDED_MAX_* limit */


static int
exp_status(int rc)
{
    return rc == EXP_COMPLEX ? MOE_EUNSUPPORTED : MOE_ENOMEM;
}


static uint64_t
stack_hash(const int32_t *v, size_t n)
{
    uint64_t h = 1469598103934665603ull ^ n;
    size_t   i;

    for (i = 0; i < n; i++) {
        h ^= (uint32_t) v[i];
        h *= 1099511628211ull;
    }
    return h ^ (h >> 29);
}


/* start a new expansion: the set of expanded stacks is emptied */
static void
seen_reset(moe_guided_state_t *st)
{
    st->seen_pool.n = 0;
    st->n_seen = 0;
    if (++st->seen_gen == 0) {          /* wrapped: really clear */
        if (st->seen != NULL) {
            memset(st->seen, 0, sizeof(*st->seen) * st->n_seen_slot);
        }
        st->seen_gen = 1;
    }
}


static int
seen_grow(moe_guided_state_t *st)
{
    size_t        ns = st->n_seen_slot ? st->n_seen_slot * 2 : 256, j, i;
    seen_slot_t  *sl = calloc(ns, sizeof(*sl));
    const int32_t *rec;

    if (sl == NULL) {
        return EXP_NOMEM;
    }
    for (i = 0; i < st->seen_pool.n; i += (size_t) st->seen_pool.v[i] + 1) {
        rec = st->seen_pool.v + i;
        j = stack_hash(rec + 1, (size_t) rec[0]) & (ns - 1);
        while (sl[j].gen != 0) {
            j = (j + 1) & (ns - 1);
        }
        sl[j].gen = 1;
        sl[j].off = (uint32_t) i;
    }
    free(st->seen);
    st->seen = sl;
    st->n_seen_slot = ns;
    st->seen_gen = 1;
    return 0;
}


/*
 * Note stack v[0 .. n) as expanded: 1 when it already was, 0 when it is
 * new, or an EXP_ failure (MOE_GUIDED_MAX_EXPAND distinct stacks).
 */
static int
seen_add(moe_guided_state_t *st, const int32_t *v, size_t n)
{
    uint64_t  h;
    size_t    j;
    int32_t  *rec;

    if ((st->n_seen + 1) * 2 > st->n_seen_slot && seen_grow(st) != 0) {
        return EXP_NOMEM;
    }
    h = stack_hash(v, n);
    for (j = h & (st->n_seen_slot - 1); st->seen[j].gen == st->seen_gen;
         j = (j + 1) & (st->n_seen_slot - 1))
    {
        rec = st->seen_pool.v + st->seen[j].off;
        if ((size_t) rec[0] == n
            && memcmp(rec + 1, v, sizeof(int32_t) * n) == 0)
        {
            return 1;
        }
    }
    if (st->n_seen >= MOE_GUIDED_MAX_EXPAND
        || st->seen_pool.n + n + 1 > (size_t) 4 * MOE_GUIDED_MAX_STATE)
    {
        return EXP_COMPLEX;             /* (long stacks: bounded memory) */
    }
    if (sv_reserve(&st->seen_pool, n + 1) != 0) {
        return EXP_NOMEM;
    }
    st->seen[j].gen = st->seen_gen;
    st->seen[j].off = (uint32_t) st->seen_pool.n;
    st->seen_pool.v[st->seen_pool.n++] = (int32_t) n;
    memcpy(st->seen_pool.v + st->seen_pool.n, v, sizeof(int32_t) * n);
    st->seen_pool.n += n;
    st->n_seen++;
    return 0;
}


/*
 * Expand the stack at tmp[off .. off + len) into out (unsorted records).
 * The stack's storage is tmp itself; new stacks are built past its end.
 * 0, or an EXP_ failure.
 */
static int
expand(moe_guided_state_t *st, size_t off, size_t len, sv_t *out, int depth)
{
    const moe_gram_t *g = &st->g->g;
    int32_t           p, e, nx;
    size_t            base, blen, mark;
    int32_t           a;
    int               rc;

    if (depth > MOE_GUIDED_MAX_DEPTH) {
        return EXP_COMPLEX;             /* a chain of rules this long */
    }
    if (st->work_max != 0 && ++st->work > st->work_max) {
        return EXP_COMPLEX;             /* this mask costs too much */
    }
    if (len == 0 || GE_IS_CLASS(g->el[st->tmp.v[off + len - 1]])) {
        if (out->n + len + 1 > (size_t) MOE_GUIDED_MAX_STATE) {
            return EXP_COMPLEX;
        }
        if (sv_reserve(out, len + 1) != 0) {
            return EXP_NOMEM;
        }
        out->v[out->n++] = (int32_t) len;
        memcpy(out->v + out->n, st->tmp.v + off, sizeof(int32_t) * len);
        out->n += len;
        return 0;
    }
    rc = seen_add(st, st->tmp.v + off, len);
    if (rc != 0) {
        return rc < 0 ? rc : 0;         /* 1: expanded before */
    }
    p = st->tmp.v[off + len - 1];
    e = g->el[p];                       /* a reference */
    nx = p + 1;
    blen = len - 1 + (g->el[nx] >= 0 ? 1 : 0);
    /* alternatives of rule e / 2 */
    a = g->rule_start[e / 2];
    for (;;) {
        mark = st->tmp.n;
        if (sv_reserve(&st->tmp, blen + 1) != 0) {
            return EXP_NOMEM;
        }
        base = st->tmp.n;
        memcpy(st->tmp.v + base, st->tmp.v + off,
               sizeof(int32_t) * (len - 1));
        if (g->el[nx] >= 0) {
            st->tmp.v[base + len - 1] = nx;
        }
        st->tmp.n = base + blen;
        if (g->el[a] >= 0) {
            st->tmp.v[st->tmp.n++] = a;
        }
        rc = expand(st, base, st->tmp.n - base, out, depth + 1);
        if (rc != 0) {
            return rc;
        }
        st->tmp.n = mark;
        while (g->el[a] >= 0) {
            a++;
        }
        if (g->el[a] == GE_END) {
            break;
        }
        a++;                            /* past GE_ALT */
    }
    return 0;
}


typedef struct {
    const int32_t *p;       /* record start (the length) */
} rec_t;


static int
rec_cmp(const void *x, const void *y)
{
    const int32_t *a = ((const rec_t *) x)->p, *b = ((const rec_t *) y)->p;

    if (a[0] != b[0]) {
        return a[0] < b[0] ? -1 : 1;
    }
    return memcmp(a + 1, b + 1, sizeof(int32_t) * (size_t) a[0]);
}


/* sort + dedupe the records of s (in place through a copy) */
static int
canon(sv_t *s)
{
    rec_t   *r, stack_r[64];
    size_t   n = 0, i, cap = 64, w = 0;
    int32_t *copy, stack_c[512];

    for (i = 0; i < s->n; i += (size_t) s->v[i] + 1) {
        n++;
    }
    if (n <= 1) {
        return 0;
    }
    r = n <= cap ? stack_r : malloc(sizeof(*r) * n);
    copy = s->n <= 512 ? stack_c : malloc(sizeof(int32_t) * s->n);
    if (r == NULL || copy == NULL) {
        if (r != stack_r) free(r);
        if (copy != stack_c) free(copy);
        return -1;
    }
    memcpy(copy, s->v, sizeof(int32_t) * s->n);
    n = 0;
    for (i = 0; i < s->n; i += (size_t) copy[i] + 1) {
        r[n++].p = copy + i;
    }
    qsort(r, n, sizeof(*r), rec_cmp);
    for (i = 0; i < n; i++) {
        if (i > 0 && rec_cmp(&r[i - 1], &r[i]) == 0) {
            continue;
        }
        memcpy(s->v + w, r[i].p, sizeof(int32_t) * (size_t) (r[i].p[0] + 1));
        w += (size_t) r[i].p[0] + 1;
    }
    s->n = w;
    if (r != stack_r) free(r);
    if (copy != stack_c) free(copy);
    return 0;
}


/* out = the stacks of `in` advanced by byte c (canonical); 0 or an EXP_
 * failure */
static int
advance_byte(moe_guided_state_t *st, const sv_t *in, unsigned c, sv_t *out)
{
    const moe_gram_t *g = &st->g->g;
    size_t            i, len, nrec = 0;
    int32_t           top, e, nx;
    int               rc;

    out->n = 0;
    seen_reset(st);
    for (i = 0; i < in->n; i += len + 1) {
        len = (size_t) in->v[i];
        if (len == 0) {
            continue;
        }
        top = in->v[i + len];
        e = g->el[top];
        if (!(g->cls[e / 2][c >> 5] & (1u << (c & 31)))) {
            continue;
        }
        /* pop the class, push its successor, expand */
        st->tmp.n = 0;
        if (sv_reserve(&st->tmp, len + 1) != 0) {
            return EXP_NOMEM;
        }
        memcpy(st->tmp.v, in->v + i + 1, sizeof(int32_t) * (len - 1));
        st->tmp.n = len - 1;
        nx = top + 1;
        if (g->el[nx] >= 0) {
            st->tmp.v[st->tmp.n++] = nx;
        }
        rc = expand(st, 0, st->tmp.n, out, 0);
        if (rc != 0) {
            return rc;
        }
        nrec++;
    }
    (void) nrec;
    return canon(out) != 0 ? EXP_NOMEM : 0;
}


/* ---------------------------------------------------------- mask cache */

typedef struct {
    uint64_t   hash;
    int32_t   *key;         /* state records */
    size_t     klen;
    uint32_t  *mask;        /* n_words, EOS not included */
    int        n_allowed;
    int        used;
} mc_slot_t;

#define MC_SLOTS      512           /* power of two */
#define MC_MAX_FILL   256           /* then it starts over: 256 masks are
                                       4 MiB at a 128k vocabulary */

struct moe_mask_cache {
    mc_slot_t  slot[MC_SLOTS];
    int        fill;
};


static uint64_t
state_hash(const sv_t *s)
{
    return stack_hash(s->v, s->n);
}


void
moe_mask_cache_free(moe_mask_cache_t *c)
{
    int i;

    if (c == NULL) {
        return;
    }
    for (i = 0; i < MC_SLOTS; i++) {
        free(c->slot[i].key);
        free(c->slot[i].mask);
    }
    free(c);
}


/* copy a cached mask of state s into words: its n_allowed, or -1
 * (g->lock held) */
static int
mc_get(moe_guide_t *g, const sv_t *s, uint64_t h, uint32_t *words)
{
    mc_slot_t *sl;
    int        i, rc = -1;

    if (g->cache != NULL) {
        for (i = 0; i < MC_SLOTS; i++) {
            sl = &g->cache->slot[(h + (uint64_t) i) & (MC_SLOTS - 1)];
            if (!sl->used) {
                break;
            }
            if (sl->hash == h && sl->klen == s->n
                && memcmp(sl->key, s->v, sizeof(int32_t) * s->n) == 0)
            {
                memcpy(words, sl->mask, sizeof(uint32_t) * g->n_words);
                rc = sl->n_allowed;
                break;
            }
        }
    }
    return rc;
}


static void
mc_put(moe_guide_t *g, const sv_t *s, uint64_t h, const uint32_t *words,
    int n_allowed)
{
    mc_slot_t *sl;
    int        i;

    if (g->cache == NULL) {
        g->cache = calloc(1, sizeof(*g->cache));
    }
    if (g->cache == NULL) {
        return;
    }
    if (g->cache->fill >= MC_MAX_FILL) {
        for (i = 0; i < MC_SLOTS; i++) {
            free(g->cache->slot[i].key);
            free(g->cache->slot[i].mask);
        }
        memset(g->cache, 0, sizeof(*g->cache));
    }
    for (i = 0; i < MC_SLOTS; i++) {
        sl = &g->cache->slot[(h + (uint64_t) i) & (MC_SLOTS - 1)];
        if (sl->used) {
            if (sl->hash == h && sl->klen == s->n
                && memcmp(sl->key, s->v, sizeof(int32_t) * s->n) == 0)
            {
                break;                  /* another thread put it */
            }
            continue;
        }
        sl->key = malloc(sizeof(int32_t) * (s->n ? s->n : 1));
        sl->mask = malloc(sizeof(uint32_t) * g->n_words);
        if (sl->key == NULL || sl->mask == NULL) {
            free(sl->key);
            free(sl->mask);
            sl->key = NULL;
            sl->mask = NULL;
            break;
        }
        memcpy(sl->key, s->v, sizeof(int32_t) * s->n);
        memcpy(sl->mask, words, sizeof(uint32_t) * g->n_words);
        sl->klen = s->n;
        sl->hash = h;
        sl->n_allowed = n_allowed;
        sl->used = 1;
        g->cache->fill++;
        break;
    }
}



/* -------------------------------------------------- the state store */

/*
 * Interned states and their byte transitions, per guide, filled lazily by
 * the mask walks: a state met again (the inside of a string after any
 * plain character, the same whitespace count, ...) costs an array lookup
 * per trie node instead of a stack expansion.  Under g->lock.  Flushed at
 * the start of a walk once it holds more than ST_MAX_STATES states (a
 * pushdown language has unboundedly many).
 */

#define ST_MAX_STATES  8192
#define ST_UNKNOWN     (-2)
#define ST_DEAD        (-1)
#define ST_NOMEM       (-3)
#define ST_COMPLEX     (-4)

struct moe_state_store {
    sv_t        pool;           /* records of every state, back to back */
    size_t     *off;            /* (cap) state id -> pool offset */
    size_t     *len;            /* (cap) its length in int32 */
    uint64_t   *hash;           /* (cap) */
    int32_t   **trans;          /* (cap) NULL or (256) next ids */
    int         n, cap;
    int32_t    *slot;           /* (nslot) open addressing: id or -1 */
    size_t      nslot;          /* power of two */
};


void
moe_state_store_free(moe_state_store_t *ss)
{
    int i;

    if (ss == NULL) {
        return;
    }
    for (i = 0; i < ss->n; i++) {
        free(ss->trans[i]);
    }
    free(ss->pool.v);
    free(ss->off);
    free(ss->len);
    free(ss->hash);
    free(ss->trans);
    free(ss->slot);
    free(ss);
}


static void
store_clear(moe_state_store_t *ss)
{
    int i;

    for (i = 0; i < ss->n; i++) {
        free(ss->trans[i]);
        ss->trans[i] = NULL;
    }
    ss->n = 0;
    ss->pool.n = 0;
    memset(ss->slot, 0xff, sizeof(int32_t) * ss->nslot);
}


static int
store_grow_slots(moe_state_store_t *ss)
{
    size_t   ns = ss->nslot ? ss->nslot * 2 : 1024;
    int32_t *sl = malloc(sizeof(int32_t) * ns);
    int      i;

    if (sl == NULL) {
        return -1;
    }
    memset(sl, 0xff, sizeof(int32_t) * ns);
    for (i = 0; i < ss->n; i++) {
        moe_gslot_put(sl, ns, ss->hash[i], i);
    }
    free(ss->slot);
    ss->slot = sl;
    ss->nslot = ns;
    return 0;
}


/* the id of state s (interned on first sight); -1: no memory */
static int32_t
store_intern(moe_state_store_t *ss, const sv_t *s)
{
    uint64_t h = state_hash(s);
    size_t   j;
    int32_t  id;

    if ((size_t) (ss->n + 1) * 2 > ss->nslot && store_grow_slots(ss) != 0) {
        return -1;
    }
    for (j = h & (ss->nslot - 1); (id = ss->slot[j]) >= 0;
         j = (j + 1) & (ss->nslot - 1))
    {
        if (ss->hash[id] == h && ss->len[id] == s->n
            && memcmp(ss->pool.v + ss->off[id], s->v,
                      sizeof(int32_t) * s->n) == 0)
        {
            return id;
        }
    }
    if (ss->n == ss->cap) {
        int      c = ss->cap ? ss->cap * 2 : 256;
        size_t  *o = realloc(ss->off, sizeof(*o) * (size_t) c);
        size_t  *l = o ? realloc(ss->len, sizeof(*l) * (size_t) c) : NULL;
        uint64_t *hh;
        int32_t **t;

        if (o != NULL) {
            ss->off = o;
        }
        if (l == NULL) {
            return -1;
        }
        ss->len = l;
        hh = realloc(ss->hash, sizeof(*hh) * (size_t) c);
        if (hh == NULL) {
            return -1;
        }
        ss->hash = hh;
        t = realloc(ss->trans, sizeof(*t) * (size_t) c);
        if (t == NULL) {
            return -1;
        }
        ss->trans = t;
        ss->cap = c;
    }
    if (sv_reserve(&ss->pool, s->n + 1) != 0) {
        return -1;
    }
    id = ss->n++;
    ss->off[id] = ss->pool.n;
    ss->len[id] = s->n;
    ss->hash[id] = h;
    ss->trans[id] = NULL;
    memcpy(ss->pool.v + ss->pool.n, s->v, sizeof(int32_t) * s->n);
    ss->pool.n += s->n;
    ss->slot[j] = id;
    return id;
}


/* the state after byte c from state id: ST_DEAD, or ST_NOMEM /
 * ST_COMPLEX (advance_byte's EXP_ failures) */
static int32_t
store_next(moe_guided_state_t *st, moe_state_store_t *ss, int32_t id,
    unsigned c, sv_t *scratch_in, sv_t *scratch_out)
{
    int32_t nx;
    int     k, rc;

    if (ss->trans[id] == NULL) {
        ss->trans[id] = malloc(sizeof(int32_t) * 256);
        if (ss->trans[id] == NULL) {
            return ST_NOMEM;
        }
        for (k = 0; k < 256; k++) {
            ss->trans[id][k] = ST_UNKNOWN;
        }
    }
    nx = ss->trans[id][c];
    if (nx != ST_UNKNOWN) {
        return nx;
    }
    /* the pool may move while interning: work on a copy */
    scratch_in->n = 0;
    if (sv_reserve(scratch_in, ss->len[id] + 1) != 0) {
        return ST_NOMEM;
    }
    memcpy(scratch_in->v, ss->pool.v + ss->off[id],
           sizeof(int32_t) * ss->len[id]);
    scratch_in->n = ss->len[id];
    rc = advance_byte(st, scratch_in, c, scratch_out);
    if (rc != 0) {
        return rc == EXP_COMPLEX ? ST_COMPLEX : ST_NOMEM;
    }
    if (scratch_out->n == 0) {
        nx = ST_DEAD;
    } else {
        nx = store_intern(ss, scratch_out);
        if (nx < 0) {
            return ST_NOMEM;
        }
    }
    ss->trans[id][c] = nx;
    return nx;
}


/* ---------------------------------------------------------------- API */

/* st->cur = the root's alternatives, expanded: 0 or an EXP_ failure */
static int
state_start(moe_guided_state_t *st)
{
    const moe_gram_t   *gr = &st->g->g;
    int32_t             a;
    int                 rc;

    seen_reset(st);
    a = gr->rule_start[gr->root];
    for (;;) {
        st->tmp.n = 0;
        if (sv_reserve(&st->tmp, 1) != 0) {
            return EXP_NOMEM;
        }
        if (gr->el[a] >= 0) {
            st->tmp.v[st->tmp.n++] = a;
        }
        rc = expand(st, 0, st->tmp.n, &st->cur, 0);
        if (rc != 0) {
            return rc;
        }
        while (gr->el[a] >= 0) {
            a++;
        }
        if (gr->el[a] == GE_END) {
            break;
        }
        a++;
    }
    return canon(&st->cur) != 0 ? EXP_NOMEM : 0;
}


/* a matcher of g at its start: 0 or an EXP_ failure (*out NULL) */
static int
state_new(moe_guide_t *g, const int32_t *eos, int n_eos,
    moe_guided_state_t **out)
{
    moe_guided_state_t *st;
    int                 rc;

    *out = NULL;
    st = calloc(1, sizeof(*st));
    if (st == NULL) {
        return EXP_NOMEM;
    }
    st->g = moe_guide_ref(g);
    for (st->n_eos = 0; st->n_eos < n_eos && st->n_eos < 8; st->n_eos++) {
        st->eos[st->n_eos] = eos[st->n_eos];
    }
    st->n_depth = 2;                    /* the walk's two scratch states */
    st->depth = calloc((size_t) st->n_depth, sizeof(sv_t));
    rc = st->depth == NULL ? EXP_NOMEM : state_start(st);
    if (rc != 0) {
        moe_guided_state_free(st);
        return rc;
    }
    *out = st;
    return 0;
}


moe_guided_state_t *
moe_guided_state_create(moe_guide_t *g, const int32_t *eos, int n_eos)
{
    moe_guided_state_t *st;

    if (g == NULL) {
        return NULL;
    }
    state_new(g, eos, n_eos, &st);
    return st;
}


int
moe_guided_check_start(moe_guide_t *g, char *err, size_t errlen)
{
    moe_guided_state_t *st;
    int                 rc;

    uint32_t           *words;
    int                 n;

    rc = state_new(g, NULL, 0, &st);
    if (rc == 0) {
        /* the first mask: cached for the first step of every sequence */
        words = malloc(sizeof(uint32_t) * (size_t) (g->n_words + 1));
        n = words == NULL ? MOE_ENOMEM
                          : moe_guided_mask(st, words, (size_t) g->n_words);
        rc = n == MOE_EUNSUPPORTED ? EXP_COMPLEX : n < 0 ? EXP_NOMEM : 0;
        free(words);
    }
    moe_guided_state_free(st);
    if (rc == EXP_COMPLEX) {
        snprintf(err, errlen, "the guide is too complex to match (limits: "
                 "%d nested rules, %d stacks a byte, %d a mask)",
                 MOE_GUIDED_MAX_DEPTH, MOE_GUIDED_MAX_EXPAND,
                 MOE_GUIDED_MAX_WALK);
        return MOE_EINVAL;
    }
    if (rc != 0) {
        snprintf(err, errlen, "out of memory compiling the guide");
        return MOE_ENOMEM;
    }
    return MOE_OK;
}


void
moe_guided_state_free(moe_guided_state_t *st)
{
    int i;

    if (st == NULL) {
        return;
    }
    for (i = 0; st->depth != NULL && i < st->n_depth; i++) {
        free(st->depth[i].v);
    }
    free(st->depth);
    free(st->cur.v);
    free(st->tmp.v);
    free(st->seen_pool.v);
    free(st->seen);
    moe_guide_release(st->g);
    free(st);
}


int
moe_guided_is_accepting(const moe_guided_state_t *st)
{
    size_t i;

    if (st->done) {
        return 1;
    }
    for (i = 0; i < st->cur.n; i += (size_t) st->cur.v[i] + 1) {
        if (st->cur.v[i] == 0) {
            return 1;
        }
    }
    return 0;
}


/*
 * Walk the trie from state st->cur through the guide's state store (one
 * state id per depth); words get the allowed tokens.  Their count, or
 * MOE_ENOMEM / MOE_EUNSUPPORTED (a state over the matcher's limits, or
 * the walk over MOE_GUIDED_MAX_WALK).  g->lock held.
 */
static int mask_walk_run(moe_guided_state_t *st, uint32_t *words);

static int
mask_walk(moe_guided_state_t *st, uint32_t *words)
{
    int n;

    st->work = 0;
    st->work_max = MOE_GUIDED_MAX_WALK;
    n = mask_walk_run(st, words);
    st->work_max = 0;
    return n;
}


static int
mask_walk_run(moe_guided_state_t *st, uint32_t *words)
{
    const moe_vocab_trie_t *t = st->g->trie;
    const moe_trie_node_t  *nd;
    moe_state_store_t      *ss;
    uint32_t                i, k, c, loop[8];
    int32_t                *sid, nx;
    int                     n_allowed = 0;

    if (st->g->store == NULL) {
        st->g->store = calloc(1, sizeof(*st->g->store));
        if (st->g->store == NULL) {
            return MOE_ENOMEM;
        }
    }
    ss = st->g->store;
    if (ss->n > ST_MAX_STATES) {
        store_clear(ss);
    }
    sid = malloc(sizeof(int32_t) * (size_t) (t->max_depth + 2));
    if (sid == NULL) {
        return MOE_ENOMEM;
    }
    sid[0] = store_intern(ss, &st->cur);
    if (sid[0] < 0) {
        free(sid);
        return MOE_ENOMEM;
    }
    /* the bytes that lead from the start state back to itself (the
     * inside of a JSON string: every plain character): a subtree reached
     * that way whose bytes are all such is allowed whole, unwalked */
    memset(loop, 0, sizeof(loop));
    for (c = 0; c < 256; c++) {
        nx = store_next(st, ss, sid[0], c, &st->depth[0], &st->depth[1]);
        if (nx <= ST_NOMEM) {
            free(sid);
            return nx == ST_COMPLEX ? MOE_EUNSUPPORTED : MOE_ENOMEM;
        }
        if (nx == sid[0]) {
            loop[c >> 5] |= 1u << (c & 31);
        }
    }
    i = 0;
    while (i < t->n_node) {
        nd = &t->node[i];
        nx = store_next(st, ss, sid[nd->depth - 1], nd->byte, &st->depth[0],
                        &st->depth[1]);
        if (nx <= ST_NOMEM) {
            free(sid);
            return nx == ST_COMPLEX ? MOE_EUNSUPPORTED : MOE_ENOMEM;
        }
        if (nx == ST_DEAD) {
            i = nd->end;
            continue;
        }
        if (nx == sid[0] && nd->end > i + 1) {
            const uint32_t *ds = t->desc[i];

            for (c = 0; c < 8; c++) {
                if (ds[c] & ~loop[c]) {
                    break;
                }
            }
            if (c == 8) {
                uint32_t last = nd->end < t->n_node
                                ? t->node[nd->end].tok_first : t->n_tok;

                for (k = nd->tok_first; k < last; k++) {
                    int32_t id = t->tok[k];
                    words[id >> 5] |= 1u << (id & 31);
                }
                n_allowed += (int) (last - nd->tok_first);
                i = nd->end;
                continue;
            }
        }
        sid[nd->depth] = nx;
        for (k = 0; k < nd->tok_n; k++) {
            int32_t id = t->tok[nd->tok_first + k];
            words[id >> 5] |= 1u << (id & 31);
        }
        n_allowed += (int) nd->tok_n;
        i++;
    }
    free(sid);
    return n_allowed;
}


int
moe_guided_mask(moe_guided_state_t *st, uint32_t *words, size_t n_words)
{
    moe_guide_t *g;
    uint64_t     h;
    int          n, k, acc;

    if (st == NULL || words == NULL
        || n_words < (size_t) st->g->n_words)
    {
        return MOE_EINVAL;
    }
    g = st->g;
    memset(words, 0, sizeof(uint32_t) * n_words);
    acc = moe_guided_is_accepting(st);
    if (!st->done) {
        h = state_hash(&st->cur);
        pthread_mutex_lock(&g->lock);
        n = mc_get(g, &st->cur, h, words);
        if (n < 0) {
            n = mask_walk(st, words);
            if (n >= 0) {
                mc_put(g, &st->cur, h, words, n);
            }
        }
        pthread_mutex_unlock(&g->lock);
        if (n < 0) {
            return n;
        }
    } else {
        n = 0;
    }
    if (acc) {
        for (k = 0; k < st->n_eos; k++) {
            int32_t id = st->eos[k];
            if (id >= 0 && (size_t) (id >> 5) < n_words
                && !(words[id >> 5] & (1u << (id & 31))))
            {
                words[id >> 5] |= 1u << (id & 31);
                n++;
            }
        }
    }
    return n;
}


int
moe_guided_feed(moe_guided_state_t *st, const char *s, size_t n)
{
    sv_t    a = {0}, b = {0}, x;
    size_t  i;
    int     rc;

    if (st->done) {
        return n == 0 ? MOE_OK : MOE_EINVAL;
    }
    if (sv_reserve(&a, st->cur.n + 1) != 0) {
        return MOE_ENOMEM;
    }
    memcpy(a.v, st->cur.v, sizeof(int32_t) * st->cur.n);
    a.n = st->cur.n;
    for (i = 0; i < n; i++) {
        rc = advance_byte(st, &a, (unsigned char) s[i], &b);
        if (rc != 0) {
            free(a.v);
            free(b.v);
            return exp_status(rc);
        }
        if (b.n == 0) {
            free(a.v);
            free(b.v);
            return MOE_EINVAL;
        }
        x = a;
        a = b;
        b = x;
    }
    free(st->cur.v);
    st->cur = a;
    free(b.v);
    return MOE_OK;
}


int
moe_guided_advance(moe_guided_state_t *st, int32_t token)
{
    const moe_vocab_trie_t *t = st->g->trie;
    int                     k;

    for (k = 0; k < st->n_eos; k++) {
        if (token == st->eos[k]) {
            if (!moe_guided_is_accepting(st)) {
                return MOE_EINVAL;
            }
            st->done = 1;
            return MOE_OK;
        }
    }
    if (st->done || token < 0 || token >= t->vocab
        || t->boff[token + 1] == t->boff[token])
    {
        return MOE_EINVAL;
    }
    return moe_guided_feed(st, t->bytes + t->boff[token],
                           t->boff[token + 1] - t->boff[token]);
}


/* ------------------------------------------------------------- the trie */

typedef struct {
    const char *s;
    uint32_t    n;
    int32_t     id;
} tokb_t;


static int
tokb_cmp(const void *x, const void *y)
{
    const tokb_t *a = x, *b = y;
    uint32_t      m = a->n < b->n ? a->n : b->n;
    int           c = memcmp(a->s, b->s, m);

    if (c != 0) {
        return c;
    }
    if (a->n != b->n) {
        return a->n < b->n ? -1 : 1;
    }
    return a->id < b->id ? -1 : a->id > b->id;
}


static void
trie_free(void *p)
{
    moe_vocab_trie_t *t = p;

    if (t == NULL
        || atomic_fetch_sub_explicit(&t->refs, 1, memory_order_acq_rel) != 1)
    {
        return;
    }
    free(t->node);
    free(t->tok);
    free(t->desc);
    free(t->bytes);
    free(t->boff);
    free(t);
}


static void *
trie_make(const moe_tokenizer_t *tk)
{
    moe_vocab_trie_t *t;
    tokb_t           *tb = NULL;
    int               vocab, id, n = 0, k, len;
    size_t            total = 0, cap = 1 << 16;
    char              buf[1024];
    uint32_t          lcp, j, *open = NULL, nn, cap_node, *parent;
    int               d;

    vocab = moe_tokenizer_vocab_size(tk);
    t = calloc(1, sizeof(*t));
    if (t == NULL) {
        return NULL;
    }
    atomic_init(&t->refs, 1);
    t->vocab = vocab;
    t->boff = calloc((size_t) vocab + 1, sizeof(uint32_t));
    t->bytes = malloc(cap);
    tb = malloc(sizeof(*tb) * (size_t) (vocab ? vocab : 1));
    if (t->boff == NULL || t->bytes == NULL || tb == NULL) {
        goto fail;
    }
    for (id = 0; id < vocab; id++) {
        t->boff[id] = (uint32_t) total;
        if (moe_tokenizer_is_special(tk, id)) {
            continue;
        }
        len = moe_tokenizer_token_bytes(tk, id, buf, sizeof(buf));
        if (len <= 0 || (size_t) len > sizeof(buf)) {
            continue;
        }
        if (total + (size_t) len > cap) {
            char *nb;
            while (total + (size_t) len > cap) {
                cap *= 2;
            }
            nb = realloc(t->bytes, cap);
            if (nb == NULL) {
                goto fail;
            }
            t->bytes = nb;
        }
        memcpy(t->bytes + total, buf, (size_t) len);
        total += (size_t) len;
    }
    t->boff[vocab] = (uint32_t) total;
    for (id = 0; id < vocab; id++) {
        if (t->boff[id + 1] > t->boff[id]) {
            tb[n].s = t->bytes + t->boff[id];
            tb[n].n = t->boff[id + 1] - t->boff[id];
            tb[n].id = id;
            n++;
        }
    }
    qsort(tb, (size_t) n, sizeof(*tb), tokb_cmp);

    cap_node = (uint32_t) n * 2 + 16;
    t->node = malloc(sizeof(*t->node) * cap_node);
    t->tok = malloc(sizeof(int32_t) * (size_t) (n ? n : 1));
    open = malloc(sizeof(uint32_t) * (sizeof(buf) + 1));
    if (t->node == NULL || t->tok == NULL || open == NULL) {
        goto fail;
    }
    nn = 0;
    d = 0;                              /* open[0 .. d) path of nodes */
    for (k = 0; k < n; k++) {
        lcp = 0;
        if (k > 0) {
            uint32_t m = tb[k - 1].n < tb[k].n ? tb[k - 1].n : tb[k].n;
            while (lcp < m && tb[k - 1].s[lcp] == tb[k].s[lcp]) {
                lcp++;
            }
        }
        /* close nodes deeper than lcp */
        while ((uint32_t) d > lcp) {
            t->node[open[--d]].end = nn;
        }
        for (j = lcp; j < tb[k].n; j++) {
            if (nn == cap_node) {
                moe_trie_node_t *x;
                cap_node *= 2;
                x = realloc(t->node, sizeof(*x) * cap_node);
                if (x == NULL) {
                    goto fail;
                }
                t->node = x;
            }
            t->node[nn].byte = (uint8_t) tb[k].s[j];
            t->node[nn].depth = (uint16_t) (j + 1);
            t->node[nn].tok_first = (uint32_t) k;
            t->node[nn].tok_n = 0;
            open[d++] = nn++;
            if ((int) (j + 1) > t->max_depth) {
                t->max_depth = (int) (j + 1);
            }
        }
        t->tok[k] = tb[k].id;
        if (t->node[open[d - 1]].tok_n == 0) {
            t->node[open[d - 1]].tok_first = (uint32_t) k;
        }
        t->node[open[d - 1]].tok_n++;
    }
    while (d > 0) {
        t->node[open[--d]].end = nn;
    }
    t->n_node = nn;
    t->n_tok = (uint32_t) n;

    /* the bytes below each node: children fold into parents, deepest
     * first (reverse preorder), parents found by a depth stack */
    t->desc = calloc(nn ? nn : 1, sizeof(*t->desc));
    parent = malloc(sizeof(uint32_t) * (nn ? nn : 1));
    if (t->desc == NULL || parent == NULL) {
        free(parent);
        goto fail;
    }
    for (j = 0; j < nn; j++) {
        d = t->node[j].depth;
        open[d] = j;
        parent[j] = d > 1 ? open[d - 1] : UINT32_MAX;
    }
    for (j = nn; j-- > 0;) {
        uint32_t p = parent[j], w;
        uint8_t  c = t->node[j].byte;

        if (p == UINT32_MAX) {
            continue;
        }
        t->desc[p][c >> 5] |= 1u << (c & 31);
        for (w = 0; w < 8; w++) {
            t->desc[p][w] |= t->desc[j][w];
        }
    }
    free(parent);
    free(open);
    free(tb);
    return t;

fail:
    free(open);
    free(tb);
    trie_free(t);
    return NULL;
}


const moe_vocab_trie_t *
moe_vocab_trie_get(const moe_tokenizer_t *t)
{
    moe_vocab_trie_t *v = moe_tokenizer_ext(t, trie_make, trie_free);

    if (v != NULL) {
        atomic_fetch_add_explicit(&v->refs, 1, memory_order_relaxed);
    }
    return v;
}


void
moe_vocab_trie_unref(const moe_vocab_trie_t *t)
{
    trie_free((void *) t);
}


const moe_vocab_trie_t *
moe_vocab_trie_peek(const moe_tokenizer_t *t)
{
    return moe_tokenizer_ext(t, NULL, NULL);
}


int
moe_guide_matches(const moe_guide_t *g, const moe_tokenizer_t *t)
{
    return g != NULL && t != NULL && g->trie == moe_vocab_trie_peek(t);
}


int
moe_guided_vocab(const moe_guide_t *g)
{
    return g->trie->vocab;
}


/* ----------------------------------------------- guide references */

moe_guide_t *
moe_guide_ref(moe_guide_t *g)
{
    if (g != NULL) {
        atomic_fetch_add_explicit(&g->refs, 1,
                                  memory_order_relaxed);
    }
    return g;
}


void
moe_guide_release(moe_guide_t *g)
{
    if (g == NULL) {
        return;
    }
    if (atomic_fetch_sub_explicit(&g->refs, 1,
                                  memory_order_acq_rel) != 1)
    {
        return;
    }
    moe_mask_cache_free(g->cache);
    moe_state_store_free(g->store);
    pthread_mutex_destroy(&g->lock);
    moe_gram_free(&g->g);
    moe_vocab_trie_unref(g->trie);
    free(g);
}
