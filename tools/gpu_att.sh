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

step test_kernels 300 env MOE_TEST_QUICK=1 build/gpu/test_kernels
step dev_attention 240 build/bench/dev/attention
step dev_attention_ws 120 env DEV_ATT_WS=only build/bench/dev/attention
for r in 1 2; do
    for w in 1 0; do
        step engine_wg${w}_$r 150 env MOE_CUDA_ATT_PREFILL_WG=$w \
            BENCH_QUANT=0 BENCH_ATT=0 BENCH_CTX=512 BENCH_BATCHES=0 \
            BENCH_PROMPTS=512,2048 build/gpu/bench_engine mixtral-8x7b \
            --weights fp8
    done
done

echo "--- test_kernels: $(grep -c '^ok' "$OUT/test_kernels.log") ok"
grep -E '^not ok' "$OUT/test_kernels.log" | cut -c1-200 | head -20
grep -E 'wg8' "$OUT/test_kernels.log" | cut -c1-200 | head -12
echo "--- dev_attention (prefill lines)"
grep -E -A16 '^prefill' "$OUT/dev_attention.log" | cut -c1-150
echo "--- dev_attention_ws"
grep -E -A8 '^prefill' "$OUT/dev_attention_ws.log" | cut -c1-150
echo "--- engine"
for f in "$OUT"/engine_wg*.log; do
    echo "$(basename "$f" .log): $(grep -E 'kind=prefill' "$f" \
        | sed -E 's/.*prompt=([0-9]+).* ms=([0-9.]+).*/\1: \2 ms/' \
        | tr '\n' ' ')"
done
fail=0
for s in "${STEPS[@]}"; do
    [ "${RC[$s]}" = 0 ] || fail=1
done
tar czf "$OUT/gpu_att_logs.tar.gz" -C "$OUT" $(cd "$OUT" && ls ./*.log)
exit $fail
