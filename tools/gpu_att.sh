#!/bin/bash
# The prefill-attention checks and timings of one device call (the
# eighteenth session's open items, kernels/NOTES.md "Prefill attention on
# warpgroup tensor cores"), from a tree where `make gpu bench-dev` built
# build/gpu and build/bench/dev (carried as tools/gpu_pack.sh's bundle):
#
#   tools/gpu_att.sh
#
# Steps, each with its own time limit, logs in $OUT (default ./gpu-out):
#   test_kernels       every attention kernel against the fp32 reference,
#                      the e4m3-cache warpgroup kernel included ("wg8")
#   dev_attention      bench/dev/attention: the shipped kernels, the
#                      overlapped variant (wgp), the fp8-cache prefill
#   dev_attention_ws   the warp-specialised variant alone (DEV_ATT_WS=only)
#   engine_wg1/0       bench_engine fp8 prefill 512 / 2048 with the record's
#                      att_prefill_wg 1 and 0, twice each
# then a summary of the lines that matter.  Exit status: 0 when every
# step passed.

set -u
cd "$(dirname "$0")/.." || exit 2
. tools/gpu_env.sh

declare -A RC
STEPS=()

step() {    # step NAME TIMEOUT CMD...
    local name=$1 limit=$2 t0
    shift 2
    STEPS+=("$name")
    t0=$(date +%s)
    timeout -k 10 "$limit" "$@" > "$OUT/$name.log" 2>&1
    RC[$name]=$?
    echo "=== $name: rc ${RC[$name]} in $(( $(date +%s) - t0 )) s"
}

# limits: 510 s in all, under the 600 s of a device call (expected:
# about 3 minutes; only a hang reaches a limit)
step test_kernels 150 env MOE_TEST_QUICK=1 build/gpu/test_kernels
step dev_attention 120 build/bench/dev/attention
step dev_attention_ws 60 env DEV_ATT_WS=only build/bench/dev/attention
for r in 1 2; do
    for w in 1 0; do
        step engine_wg${w}_$r 45 env MOE_CUDA_ATT_PREFILL_WG=$w \
            BENCH_QUANT=0 BENCH_ATT=0 BENCH_CTX=512 BENCH_BATCHES=0 \
            BENCH_PROMPTS=512,2048 build/gpu/bench_engine mixtral-8x7b \
            --weights fp8
    done
done

# the summary: short enough for the call's 12,000-character output tail
echo "--- test_kernels: $(grep -c '^ok' "$OUT/test_kernels.log") ok"
grep -E '^not ok' "$OUT/test_kernels.log" | cut -c1-160 | head -8
grep -E 'wg8' "$OUT/test_kernels.log" | cut -c1-160 | head -6
echo "--- dev_attention (prefill lines)"
grep -E '^prefill|shipped|wg|ws |SIMT|FAIL' "$OUT/dev_attention.log" \
    | grep -v -E '^decode' | cut -c1-120 | head -60
echo "--- dev_attention_ws"
grep -E '^prefill|ws |FAIL' "$OUT/dev_attention_ws.log" | cut -c1-120 \
    | head -20
echo "--- engine"
for f in "$OUT"/engine_wg*.log; do
    echo "$(basename "$f" .log): $(grep -E 'kind=prefill' "$f" \
        | sed -E 's/.*prompt=([0-9]+).* ms=([0-9.]+).*/\1: \2 ms/' \
        | tr '\n' ' ')"
done
fail=0
for s in "${STEPS[@]}"; do
    echo "=== $s: rc ${RC[$s]}"
    if [ "${RC[$s]}" != 0 ]; then
        fail=1
        tail -n 2 "$OUT/$s.log" | cut -c1-160
    fi
done
exit $fail
