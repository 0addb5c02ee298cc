#!/usr/bin/env python3
"""Where a step's time goes with PDL on, from a bench/dev/ktrace.c timeline.

    LD_PRELOAD=build/bench/dev/libktrace.so KTRACE_OUT=t.txt CMD
    tools/ktrace_ends.py t.txt [START_KERNEL]

With programmatic dependent launch a kernel's blocks start while the one
before it runs, so kernel durations overlap and do not add up to the
step (tools/ktrace_gaps.py reads PDL-off timelines).  What does add up
is the advance of each kernel's end past the end of the kernel launched
before it: this prints, for the steps of the most common kernel count
(the first and last left out), the mean advance and the mean duration
(first block start to end) of each kernel, grouped by the kernel and
the one launched before it (KTRACE_ENDS_CTX=2: and the one before
that), largest total first, and the step's span.
"""
import os
import sys
from collections import defaultdict

from ktrace_gaps import read_steps  # the script's folder is on sys.path


def main():
    path = sys.argv[1]
    start_k = sys.argv[2] if len(sys.argv) > 2 else "kernel_embed"
    ctx = int(os.environ.get("KTRACE_ENDS_CTX", "1"))
    steps = [[(e[0], e[1], e[3]) for e in s if e[2] == "K"]
             for s in read_steps(path, start_k)]
    if len(steps) < 3:
        sys.exit("ktrace_ends: fewer than 3 steps in %s" % path)
    counts = defaultdict(int)
    for s in steps[1:-1]:
        counts[len(s)] += 1
    n = max(counts, key=counts.get)
    use = [s for s in steps[1:-1] if len(s) == n]
    adv = defaultdict(float)
    dur = defaultdict(float)
    cnt = defaultdict(int)
    span = 0.0
    for s in use:
        span += (max(k[1] for k in s) - s[0][0]) / 1e3
        for i in range(1, len(s)):
            key = (s[i][2], s[i - 1][2]) if ctx < 2 or i < 2 \
                else (s[i][2], s[i - 1][2] + " after " + s[i - 2][2])
            adv[key] += (s[i][1] - s[i - 1][1]) / 1e3
            dur[key] += (s[i][1] - s[i][0]) / 1e3
            cnt[key] += 1
    m = len(use)
    print("%d steps of %d kernels: span %.1f us a step" % (m, n, span / m))
    print("%10s %6s %10s %10s  kernel (after the kernel launched before)"
          % ("advance", "count", "adv each", "dur each"))
    for key in sorted(adv, key=lambda k: -adv[k]):
        c = cnt[key]
        print("%10.1f %6d %10.2f %10.2f  %s (after %s)"
              % (adv[key] / m, c // m, adv[key] / c, dur[key] / c, key[0],
                 key[1]))


if __name__ == "__main__":
    main()
