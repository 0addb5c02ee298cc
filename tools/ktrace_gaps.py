#!/usr/bin/env python3
"""Idle time between kernels from a bench/dev/ktrace.c timeline.

    LD_PRELOAD=build/bench/dev/libktrace.so KTRACE_OUT=t.txt CMD
    tools/ktrace_gaps.py t.txt [START_KERNEL]

Splits the timeline into steps at each launch of START_KERNEL (default
kernel_embed, the first kernel of a forward), and for each step prints its
span, the sum of kernel times, the idle time (the GPU running no kernel)
and memcpy time; then, for the median step of the most common kernel
count, the idle time grouped by the kernel pair around each gap (largest
first), the ten largest gaps and the kernel time by kernel name.
"""
import re
import sys
from collections import defaultdict


def short(name):
    # CUPTI gives mangled names: _Z<len><identifier>... -> the identifier
    m = re.match(r"_Z(?:N\d*)?(\d+)", name)
    if m:
        n = int(m.group(1))
        return name[m.end():m.end() + n]
    name = re.sub(r"^void ", "", name)
    name = name.split("(")[0]
    return name[:60]


def read_steps(path, start_k):
    """The timeline's events (start ns, end ns, "K" or "M", name) in
    start order, cut into steps at each kernel named start_k (events
    before the first are left out); also used by tools/ktrace_ends.py."""
    ev = []
    for line in open(path):
        p = line.split(" ", 4)
        if p[0] == "K":
            ev.append((int(p[1]), int(p[2]), "K", short(p[4].strip())))
        elif p[0] == "M":
            ev.append((int(p[1]), int(p[2]), "M", "memcpy %s B kind %s"
                       % (p[4].split()[0], p[4].split()[1])))
    ev.sort()
    steps, cur = [], None
    for e in ev:
        if e[2] == "K" and e[3].startswith(start_k):
            cur = []
            steps.append(cur)
        if cur is not None:
            cur.append(e)
    return steps


def main():
    path = sys.argv[1]
    start_k = sys.argv[2] if len(sys.argv) > 2 else "kernel_embed"
    steps = read_steps(path, start_k)
    if not steps:
        sys.exit("ktrace_gaps: no %s in %s" % (start_k, path))
    print("%5s %6s %10s %10s %10s %10s" % ("step", "kern", "span us",
                                           "kernel us", "idle us",
                                           "memcpy us"))
    stats = []
    for i, s in enumerate(steps):
        ks = [e for e in s if e[2] == "K"]
        t0, t1 = s[0][0], max(e[1] for e in s)
        busy, idle, end = 0, 0, t0
        for e in sorted(s):
            if e[0] > end:
                idle += e[0] - end
            busy += e[1] - e[0] if e[2] == "K" else 0
            end = max(end, e[1])
        mc = sum(e[1] - e[0] for e in s if e[2] == "M")
        stats.append((len(ks), t1 - t0, i))
        print("%5d %6d %10.1f %10.1f %10.1f %10.1f" % (
            i, len(ks), (t1 - t0) / 1e3, busy / 1e3, idle / 1e3, mc / 1e3))
    counts = defaultdict(int)
    for n, _, _ in stats:
        counts[n] += 1
    common = max(counts, key=lambda n: (counts[n], n))
    # the median step of that count (the first is a warm-up: plans,
    # heuristic queries)
    same = sorted((x for x in stats if x[0] == common), key=lambda x: x[1])
    pick = same[len(same) // 2][2]
    s = sorted(steps[pick])
    gaps = []
    end, prev = s[0][1], s[0][3]
    for e in s[1:]:
        if e[0] > end:
            gaps.append((e[0] - end, prev, e[3]))
        if e[1] >= end:
            end, prev = e[1], e[3]
    by = defaultdict(lambda: [0, 0])
    for g, a, b in gaps:
        by[(a, b)][0] += g
        by[(a, b)][1] += 1
    print("\nstep %d (%d kernels): idle by the kernels around the gap" %
          (pick, common))
    for (a, b), (g, n) in sorted(by.items(), key=lambda kv: -kv[1][0])[:25]:
        print("%10.1f us %5d x  %s -> %s" % (g / 1e3, n, a, b))
    print("\nlargest gaps")
    for g, a, b in sorted(gaps, reverse=True)[:10]:
        print("%10.1f us  %s -> %s" % (g / 1e3, a, b))
    # kernel time by name in that step (cuBLAS's nvjet kernels together)
    by_k = defaultdict(lambda: [0, 0])
    for e in s:
        if e[2] == "K":
            k = "nvjet (cuBLASLt GEMMs)" if e[3].startswith("nvjet") \
                else e[3]
            by_k[k][0] += e[1] - e[0]
            by_k[k][1] += 1
    print("\nstep %d: kernel time by kernel" % pick)
    for k, (t, n) in sorted(by_k.items(), key=lambda kv: -kv[1][0])[:20]:
        print("%10.1f us %5d x  %s" % (t / 1e3, n, k))
    # the same split by the kernel launched before (a layer's GEMVs share
    # one name: q|k|v after the norm, o after attention, gate|up after the
    # router, down after gate|up)
    by_p = defaultdict(lambda: [0, 0])
    ks = [e for e in s if e[2] == "K"]
    for a, b in zip(ks, ks[1:]):
        by_p[(b[3], a[3])][0] += b[1] - b[0]
        by_p[(b[3], a[3])][1] += 1
    print("\nstep %d: kernel time by kernel, after the kernel before it" %
          pick)
    for (k, a), (t, n) in sorted(by_p.items(),
                                 key=lambda kv: -kv[1][0])[:16]:
        print("%10.1f us %5d x  %s (after %s): %.2f us each" %
              (t / 1e3, n, k, a, t / 1e3 / n))


if __name__ == "__main__":
    main()
