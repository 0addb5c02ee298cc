#!/usr/bin/env bash
# On the GPU machine: the cost of guided decoding in a decode step (issue
# 10's Speed figure).  bench/gpu_serve.sh twice at the same concurrency
# (default 64), greedy, 512 prompt / 256 output tokens: plain, then every
# request with guided_json = a JSON Schema of 10 properties (strings,
# integers, a boolean, an enum, an array, a nested object), so every step
# of every sequence computes its allowed-token mask on the host and applies
# it on the device.  The share is (TPOT guided - TPOT plain) / TPOT guided
# at the median.  Logs: $OUT/guided-plain.txt, $OUT/guided-json.txt.
#   bench/guided_serve.sh [CONCURRENCY]
set -u
cd "$(dirname "$0")/.." || exit 2
C=${1:-64}
SCHEMA='{"type":"object","properties":{"name":{"type":"string"},"age":{"type":"integer"},"email":{"type":"string"},"active":{"type":"boolean"},"role":{"enum":["admin","user","guest"]},"score":{"type":"number"},"tags":{"type":"array","items":{"type":"string"},"maxItems":4},"city":{"type":"string"},"zip":{"type":"string","pattern":"[0-9]{5}"},"address":{"type":"object","properties":{"street":{"type":"string"},"number":{"type":"integer"}},"required":["street","number"],"additionalProperties":false}},"required":["name","age","email","active","role","score","tags","city","zip","address"],"additionalProperties":false}'
rc=0
OUT_BASE=${OUT:-$PWD/gpu-out}
for mode in plain json; do
    if [ $mode = json ]; then
        export EXTRA_JSON="\"guided_json\":$SCHEMA"
    else
        unset EXTRA_JSON
    fi
    OUT=$OUT_BASE bench/gpu_serve.sh "$C" > "$OUT_BASE/guided-$mode.log" 2>&1 || rc=1
    cp "$OUT_BASE/bench_serve.txt" "$OUT_BASE/guided-$mode.txt" 2>/dev/null
    echo "=== $mode"
    grep -E "Successful|failed|Median TPOT|P99 TPOT|Median ITL|Output token" \
        "$OUT_BASE/guided-$mode.txt"
done
exit $rc
