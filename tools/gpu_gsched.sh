#!/bin/bash
# The grouped fp8 expert GEMM's tile schedules in one device call (the
# twentieth session: kernels/NOTES.md "FP8 prefill: tiles drawn from a
# counter, half tiles"), from a tree where `make gpu bench-dev` built
# build/gpu and build/bench/dev (carried as tools/gpu_pack.sh's bundle):
#
#   tools/gpu_gsched.sh
#
# Steps, each with its own time limit, logs in $OUT (default ./gpu-out):
#   test_fp8_grouped   the grouped GEMM against the host, every schedule
#                      bit for bit equal to the static one, the counters
#                      left at zero, graph replays
#   test_qbackend      the tiny fp8 models through the backend with the
#                      record's fp8_gsched 3 (grouped GEMMs drawn + half)
#   dev_wg_ggemm       bench/dev/wg_ggemm: one layer's gate|up and down at
#                      the uneven and the even routing, every schedule,
#                      next to cuBLASLt's e4m3 rate of the same run
#   engine_gsG_R       bench_engine fp8 prefill 512 / 2048 with the
#                      record's fp8_gsched G (0, 3, 1), rounds R
#   trace_gs3          the prefill 2048's kernel timeline with PDL off
#                      (each kernel's own time), fp8_gsched 3
#   ncu_gsG            ncu on the second forward's first gate|up and down
#                      GEMMs, fp8_gsched 0 and 3 (speed of light, memory)
# then a summary of the lines that matter.  Exit status: 0 when every
# step passed.

set -u
cd "$(dirname "$0")/.." || exit 2
. tools/gpu_env.sh

declare -A RC
STEPS=()

T_START=$(date +%s)
step() {    # step NAME TIMEOUT CMD... (skipped past GSCHED_BUDGET s in all)
    local name=$1 limit=$2 t0
    shift 2
    t0=$(date +%s)
    if [ $(( t0 - T_START + limit )) -gt "${GSCHED_BUDGET:-560}" ]; then
        echo "=== $name: skipped (budget)"
        return
    fi
    STEPS+=("$name")
    timeout -k 10 "$limit" "$@" > "$OUT/$name.log" 2>&1
    RC[$name]=$?
    echo "=== $name: rc ${RC[$name]} in $(( $(date +%s) - t0 )) s"
}

# limits: 540 s in all, under the 600 s of a device call (only a hang
# reaches one)
step test_fp8_grouped 60 build/gpu/test_fp8_grouped
step test_qbackend 120 bash -c 'tools/quant_models.sh build/quant \
    > /dev/null && MOE_CUDA_FP8_GSCHED=3 build/gpu/test_qbackend'
step dev_wg_ggemm 100 build/bench/dev/wg_ggemm
for r in 1 2; do
    for g in 0 3 1; do
        step engine_gs${g}_$r 40 env MOE_CUDA_FP8_GSCHED=$g \
            BENCH_QUANT=0 BENCH_ATT=0 BENCH_CTX=512 BENCH_BATCHES=0 \
            BENCH_PROMPTS=512,2048 build/gpu/bench_engine mixtral-8x7b \
            --weights fp8
    done
done
step trace_gs3 60 env MOE_CUDA_FP8_GSCHED=3 MOE_CUDA_PDL=0 BENCH_QUANT=0 \
    BENCH_ATT=0 BENCH_CTX=512 BENCH_BATCHES=0 BENCH_PROMPTS=2048 \
    KTRACE_OUT="$OUT/ktrace_gs3.txt" \
    LD_PRELOAD=build/bench/dev/libktrace.so build/gpu/bench_engine \
    mixtral-8x7b --weights fp8
tools/ktrace_gaps.py "$OUT/ktrace_gs3.txt" > "$OUT/trace_gs3_gaps.log" 2>&1
# ncu of the second forward's first gate|up and down (is the kernel bound
# by L2's bandwidth? 48 KB a stage for 8.4 MFLOP)
NCU=$(command -v ncu || echo /usr/local/cuda/bin/ncu)
for g in 0 3; do
    step ncu_gs$g 90 env MOE_CUDA_FP8_GSCHED=$g BENCH_QUANT=0 BENCH_ATT=0 \
        BENCH_CTX=512 BENCH_BATCHES=0 BENCH_PROMPTS=2048 "$NCU" \
        --clock-control none --kernel-name regex:kernel_fp8_grouped \
        --launch-skip 64 --launch-count 2 --section SpeedOfLight \
        --section MemoryWorkloadAnalysis --section Occupancy \
        build/gpu/bench_engine mixtral-8x7b --weights fp8
done

# the summary: short enough for the call's 12,000-character output tail
for t in test_fp8_grouped test_qbackend; do
    echo "--- $t: $(grep -c '^ok' "$OUT/$t.log") ok"
    grep -E '^not ok|Bail|tile counters|differs' "$OUT/$t.log" \
        | cut -c1-200 | head -8
done
echo "--- dev_wg_ggemm"
grep -E 'limit|cuBLASLt per|shipped|persistent|SwiGLU|FAIL' \
    "$OUT/dev_wg_ggemm.log" | grep -v 'CTA per tile' | cut -c1-130 | head -50
echo "--- engine (prefill lines)"
for s in "${STEPS[@]}"; do
    case $s in engine_*) ;; *) continue ;; esac
    echo "$s: $(grep -E '^  prompt' "$OUT/$s.log" | awk '{printf "%s %s ms; ", $2, $4}')"
    grep -E 'stages' "$OUT/$s.log" | tail -1 | cut -c1-170
done
echo "--- trace_gs3 (PDL off)"
sed -n '/kernel time by kernel/,$p' "$OUT/trace_gs3_gaps.log" | head -22
head -8 "$OUT/trace_gs3_gaps.log"
rm -f "$OUT/ktrace_gs3.txt"
for g in 0 3; do
    echo "--- ncu_gs$g"
    grep -E 'kernel_fp8_grouped|Duration|Throughput|Busy|Hit Rate|Bandwidth' \
        "$OUT/ncu_gs$g.log" | grep -v -E '^ *-' | cut -c1-110 | head -30
done

fail=0
for s in "${STEPS[@]}"; do
    [ "${RC[$s]}" = 0 ] || fail=1
done
exit $fail
