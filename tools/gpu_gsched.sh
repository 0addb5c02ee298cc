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
#   test_qbackend      the tiny fp8 models through the backend (the
#                      record's default fp8_gsched 1: drawn tiles), and
#                      with fp8_gsched 2 (CTA pairs)
#   dev_wg_ggemm       bench/dev/wg_ggemm: one layer's gate|up and down at
#                      the uneven and the even routing, the static and
#                      the drawn tile order (+ the SwiGLU epilogue), next
#                      to cuBLASLt's e4m3 rate of the same run
#   engine_gsG_R       bench_engine fp8 prefill 512 / 2048 with the
#                      record's fp8_gsched G (0, 1, 2), rounds R
#   trace_gs1          the prefill 2048's kernel timeline with PDL off
#                      (each kernel's own time), fp8_gsched 1
#   ncu_wg             ncu on the shipped grouped GEMM in the dev harness
#                      (gate|up uneven): speed of light, memory (is it
#                      bound by L2's bandwidth? 48 KB a stage for 8.4
#                      MFLOP)
# then a summary of the lines that matter.  Exit status: 0 when every
# step passed.

set -u
cd "$(dirname "$0")/.." || exit 2
. tools/gpu_env.sh

declare -A RC
STEPS=()

T_START=$(date +%s)
step() {    # step NAME TIMEOUT CMD... (skipped past GSCHED_BUDGET s in all,
            # or when GSCHED_SKIP, a comma list, names it)
    local name=$1 limit=$2 t0
    shift 2
    t0=$(date +%s)
    case ",${GSCHED_SKIP:-}," in
    *",$name,"*) echo "=== $name: skipped (GSCHED_SKIP)"; return ;;
    esac
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
    > /dev/null && build/gpu/test_qbackend'
step test_qbackend_pair 90 env MOE_CUDA_FP8_GSCHED=2 build/gpu/test_qbackend
step dev_wg_ggemm 100 env DEV_FG_CASES=1234 \
    DEV_FG_ONLY=wgmma_tma_shipped,gsched_1,gsched_2,swiglu stdbuf -oL \
    build/bench/dev/wg_ggemm
for r in 1 2; do
    for g in 0 1 2; do
        step engine_gs${g}_$r 30 env MOE_CUDA_FP8_GSCHED=$g \
            BENCH_QUANT=0 BENCH_ATT=0 BENCH_CTX=512 BENCH_BATCHES=0 \
            BENCH_PROMPTS=512,2048 build/gpu/bench_engine mixtral-8x7b \
            --weights fp8
    done
done
step trace_gs1 60 env MOE_CUDA_FP8_GSCHED=1 MOE_CUDA_PDL=0 BENCH_QUANT=0 \
    BENCH_ATT=0 BENCH_CTX=512 BENCH_BATCHES=0 BENCH_PROMPTS=2048 \
    KTRACE_OUT="$OUT/ktrace_gs1.txt" \
    LD_PRELOAD=build/bench/dev/libktrace.so build/gpu/bench_engine \
    mixtral-8x7b --weights fp8
[ -f "$OUT/ktrace_gs1.txt" ] && tools/ktrace_gaps.py "$OUT/ktrace_gs1.txt" \
    > "$OUT/trace_gs1_gaps.log" 2>&1
# ncu of the shipped grouped GEMM in the dev harness (few other kernels:
# under bench_engine ncu took over 90 s to reach the 65th launch)
NCU=$(command -v ncu || echo /usr/local/cuda/bin/ncu)
step ncu_wg 90 env DEV_FG_CASES=1 DEV_FG_ONLY=wgmma_tma_shipped "$NCU" \
    --clock-control none --kernel-name regex:kernel_fp8_grouped \
    --launch-skip 2 --launch-count 1 --section SpeedOfLight \
    --section MemoryWorkloadAnalysis build/bench/dev/wg_ggemm

# the summary: short enough for the call's 12,000-character output tail
for t in test_fp8_grouped test_qbackend test_qbackend_pair; do
    [ -f "$OUT/$t.log" ] || continue
    echo "--- $t: $(grep -c '^ok' "$OUT/$t.log") ok"
    grep -E '^not ok|Bail|tile counters|differs' "$OUT/$t.log" \
        | cut -c1-200 | head -8
done
echo "--- dev_wg_ggemm"
grep -E 'limit|cuBLASLt per|shipped|persistent|SwiGLU|FAIL|HANG' \
    "$OUT/dev_wg_ggemm.log" | cut -c1-130 | head -40
echo "--- engine (prefill lines)"
for s in "${STEPS[@]}"; do
    case $s in engine_*) ;; *) continue ;; esac
    echo "$s: $(grep -E '^  prompt' "$OUT/$s.log" | awk '{printf "%s %s ms; ", $2, $4}')"
    grep -E 'stages' "$OUT/$s.log" | tail -1 | cut -c1-170
done
[ -f "$OUT/trace_gs1_gaps.log" ] && echo "--- trace_gs1 (PDL off)"
[ -f "$OUT/trace_gs1_gaps.log" ] && sed -n '/kernel time by kernel/,$p' \
    "$OUT/trace_gs1_gaps.log" | head -22
rm -f "$OUT/ktrace_gs1.txt"
[ -f "$OUT/ncu_wg.log" ] && echo "--- ncu_wg" && grep -E 'Duration|Throughput|Busy|Hit Rate|Bandwidth|Peak' \
    "$OUT/ncu_wg.log" | cut -c1-110 | head -24

fail=0
for s in "${STEPS[@]}"; do
    [ "${RC[$s]:-0}" = 0 ] || fail=1
done
exit $fail
