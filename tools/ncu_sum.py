#!/usr/bin/env python3
"""Mean duration per kernel name from `ncu --csv --metrics
gpu__time_duration.sum` output on stdin: one line per kernel (launches,
mean microseconds, name), longest total first.

    ncu --clock-control none --metrics gpu__time_duration.sum --csv \\
        -k regex:NAME -c N CMD | tools/ncu_sum.py
"""
import csv
import sys

rows = [r for r in csv.reader(l for l in sys.stdin if l.startswith('"'))]
if not rows:
    sys.exit("ncu_sum: no CSV rows on stdin")
head = rows[0]
ki, vi, ui = head.index("Kernel Name"), head.index("Metric Value"), \
    head.index("Metric Unit")
scale = {"nsecond": 1e-3, "ns": 1e-3, "usecond": 1.0, "us": 1.0,
         "msecond": 1e3, "ms": 1e3, "second": 1e6, "s": 1e6}
tot = {}
for r in rows[1:]:
    if len(r) <= vi:
        continue
    name = r[ki].split("(")[0].replace("void ", "")
    us = float(r[vi].replace(",", "")) * scale.get(r[ui], 1.0)
    n, s = tot.get(name, (0, 0.0))
    tot[name] = (n + 1, s + us)
for name, (n, s) in sorted(tot.items(), key=lambda kv: -kv[1][1]):
    print("%4d %9.2f us  %s" % (n, s / n, name[:90]))
