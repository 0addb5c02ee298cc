/*
 * The prefix affinity key (engine/text/prefix_key.c, moe.h): the key the
 * front nginx hashes upstreams on.  Checks that a conversation's later
 * turns key like its first, that different conversations differ, that the
 * key ignores JSON spelling (escapes, key order, content as parts), that
 * it follows the budget, that feeding the body in pieces gives the same
 * key as feeding it whole, and that bodies that are not JSON or have no
 * messages/prompt give no key without failing.
 */

#include <stdio.h>
#include <string.h>

#include "moe.h"
#include "tap.h"


/* the key of a body fed in pieces of `step` bytes (0: whole); 0 when none */

static int
key_of(const char *body, size_t budget, size_t step, uint64_t *out)
{
    int                rc = 0;
    size_t             len = strlen(body), off = 0, n;
    moe_prefix_key_t  *k;

    k = moe_prefix_key_create(budget);
    if (k == NULL) {
        return 0;
    }

    while (off < len) {
        n = step ? step : len;
        if (n > len - off) {
            n = len - off;
        }

        rc = moe_prefix_key_feed(k, body + off, n);
        off += n;

        if (rc != 0) {
            break;
        }
    }

    rc = moe_prefix_key_finish(k, out) == MOE_OK;
    moe_prefix_key_destroy(k);

    return rc;
}


static uint64_t
key(const char *body, size_t budget)
{
    uint64_t  h = 0;

    if (!key_of(body, budget, 0, &h)) {
        return 0;
    }

    return h;
}


#define SYS  "{\"role\":\"system\",\"content\":\"You are terse.\"}"
#define U1   "{\"role\":\"user\",\"content\":\"Tell me about foxes.\"}"
#define A1   "{\"role\":\"assistant\",\"content\":\"Foxes are small canids.\"}"
#define U2   "{\"role\":\"user\",\"content\":\"And wolves?\"}"
#define U1B  "{\"role\":\"user\",\"content\":\"Tell me about owls.\"}"


int
main(void)
{
    int         i, ok, none;
    size_t      steps[] = { 1, 2, 3, 7, 64 };
    uint64_t    t1, t2, t3, other, h;
    const char *turn1, *turn2, *bad[] = {
        "", "not json at all", "<html>", "{\"messages\":",
        "{\"model\":\"m\"}", "[1,2,3]", "{\"messages\":[]}",
        "{\"messages\":\"hello\"}", "{\"prompt\":{}}", "{\"prompt\":[]}",
        "\xff\xfe{}", "{\"messages\":[{\"role\":\"user\",\"content\":\"x\"",
        "null", "42"
    };

    TAP_PLAN(22);

    turn1 = "{\"model\":\"m\",\"messages\":[" SYS "," U1 "],\"max_tokens\":8}";
    turn2 = "{\"model\":\"m\",\"messages\":[" SYS "," U1 "," A1 "," U2
            "],\"max_tokens\":8,\"stream\":true}";

    t1 = key(turn1, 0);
    t2 = key(turn2, 0);
    TAP_OK(t1 != 0, "a chat body has a key (%016llx)", (unsigned long long) t1);
    TAP_OK(t1 == t2, "turn 2 (same first messages + more) keys like turn 1");

    t3 = key("{\"messages\":[" SYS "," U1 "," A1 "," U2 "," A1 "," U2
             "],\"model\":\"other\",\"temperature\":0.5}", 0);
    TAP_OK(t1 == t3, "turn 3, other fields in another order: same key");

    other = key("{\"model\":\"m\",\"messages\":[" SYS "," U1B "]}", 0);
    TAP_OK(other != 0 && other != t1,
           "another first user message: another key");

    h = key("{\"messages\":[{\"role\":\"system\",\"content\":\"You are "
            "verbose.\"}," U1 "]}", 0);
    TAP_OK(h != 0 && h != t1, "another system message: another key");

    h = key("{\"messages\":[{\"role\":\"user\",\"content\":\"You are terse.\"},"
            U1 "]}", 0);
    TAP_OK(h != t1, "the role counts, not only the text");

    /* spelling: escapes, key order inside a message, content parts */
    h = key("{\"messages\":[{\"content\":\"You are terse\\u002e\","
            "\"role\":\"system\"},{\"content\":[{\"type\":\"text\","
            "\"text\":\"Tell me \"},{\"text\":\"about foxes.\","
            "\"type\":\"text\"}],\"role\":\"user\",\"name\":\"x\"}]}", 0);
    TAP_OK(h == t1, "escapes, key order and text parts: the same key");

    /* budget: 16 bytes of "system\x1fYou are terse..." */
    h = key("{\"messages\":[{\"role\":\"system\",\"content\":\"You are terse. "
            "And more.\"}," U1B "]}", 16);
    TAP_OK(h == key(turn1, 16),
           "budget 16: only the first 16 canonical bytes count");
    TAP_OK(key(turn1, 16) != t1, "budget 16 and budget 1024 differ");

    /* completions */
    h = key("{\"model\":\"m\",\"prompt\":\"Once upon a time, there was a "
            "fox\",\"max_tokens\":4}", 16);
    TAP_OK(h != 0 && h == key("{\"prompt\":\"Once upon a time, a wolf\"}",
                              16),
           "prompt: the first 16 bytes key it");
    TAP_OK(h != key("{\"prompt\":\"Twice upon a time, a wolf\"}", 16),
           "prompt: another start, another key");
    TAP_OK(h == key("{\"prompt\":[\"Once upon a time, more\",\"x\"]}", 16),
           "prompt array: the first prompt keys it");
    h = key("{\"prompt\":[1,2,3,4,5,6,7,8,9,10,11,12]}", 12);
    TAP_OK(h != 0 && h == key("{\"prompt\":[[1,2,3,4,5,6,7,8,9],[5]]}", 12)
           && h != key("{\"prompt\":[1,2,3,4,5,7,7,8,9]}", 12),
           "token ids: the first ids key them");
    TAP_OK(key("{\"prompt\":\"abc\"}", 0)
           != key("{\"messages\":[{\"role\":\"abc\",\"content\":\"\"}]}", 0),
           "a prompt and messages never share a key by accident (tags)");

    /* no user message: all messages count */
    h = key("{\"messages\":[" SYS "]}", 0);
    TAP_OK(h != 0 && h != t1, "system only: a key of its own");

    /* in pieces */
    ok = 1;
    for (i = 0; i < (int) (sizeof(steps) / sizeof(steps[0])); i++) {
        if (!key_of(turn2, 0, steps[i], &h) || h != t1) {
            ok = 0;
            TAP_DIAG("step %zu: %016llx", steps[i], (unsigned long long) h);
        }
    }
    TAP_OK(ok, "fed 1, 2, 3, 7, 64 bytes at a time: the same key");

    ok = key_of("{\"prompt\":\"Once upon a time, there was a fox\"}", 16, 5,
                &h) && h == key("{\"prompt\":\"Once upon a time\"}", 16);
    TAP_OK(ok, "a prompt fed in pieces: the same key");

    /* the key is complete before the body ends: feed says so */
    {
        moe_prefix_key_t  *k = moe_prefix_key_create(0);
        const char        *p = "{\"messages\":[" SYS "," U1 ",";
        int                rc = k ? moe_prefix_key_feed(k, p, strlen(p)) : -1;

        TAP_OK(rc == 1, "feed returns 1 once the first user message ended");
        TAP_OK(k && moe_prefix_key_feed(k, "garbage", 7) == 1
               && moe_prefix_key_finish(k, &h) == MOE_OK && h == t1,
               "bytes after completion change nothing");
        moe_prefix_key_destroy(k);
    }

    /* bodies without a key: no key, no failure */
    none = 0;
    for (i = 0; i < (int) (sizeof(bad) / sizeof(bad[0])); i++) {
        if (key_of(bad[i], 0, 0, &h)) {
            TAP_DIAG("body %d has a key", i);
        } else {
            none++;
        }
    }
    TAP_OK(none == (int) (sizeof(bad) / sizeof(bad[0])),
           "non-JSON, cut, empty or key-less bodies: no key (%d of %zu)",
           none, sizeof(bad) / sizeof(bad[0]));

    {
        moe_prefix_key_t  *k = moe_prefix_key_create(0);
        int                rc = k ? moe_prefix_key_feed(k, "}{", 2) : 0;

        TAP_OK(rc == MOE_EINVAL && moe_prefix_key_feed(k, "{}", 2)
               == MOE_EINVAL, "not JSON: feed says MOE_EINVAL, and keeps "
               "saying it");
        moe_prefix_key_destroy(k);
    }

    /* deep nesting is not followed past the limit and fails cleanly */
    {
        char    deep[400];
        size_t  j;

        for (j = 0; j < 200; j++) {
            deep[j] = '[';
        }
        deep[200] = '\0';
        TAP_OK(!key_of(deep, 0, 0, &h), "200 nested arrays: no key");
    }

    return TAP_DONE();
}
