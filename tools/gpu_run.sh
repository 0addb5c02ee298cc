#!/bin/bash
# Runs the CUDA backend's GPU tests and the engine benchmark on the GPU
# machine, from a tree where `make gpu` already built build/gpu/* (carry
# build/gpu and .dev: README, GPUs).  Run from the repository root:
#
#   tools/gpu_run.sh [MODELS]      MODELS: comma list for bench_engine
#                                  (default: all four shapes)
#
# Logs go to $OUT (default ./gpu-out): nvidia-smi.log, test_kernels.log
# (both GEMV kernels through the tuning record's argument), test_sample.log,
# test_backend.log, test_backend_eager.log (graphs off, cuBLAS experts for
# steps > 4 tokens), test_backend_ggemm.log (grouped GEMM for every MoE
# step), test_ggemm.log, bench_engine.log, bench_nograph.log (mixtral decode,
# graphs off), bench_gptq.log / bench_fp8.log (mixtral decode with packed
# weights, batches 1-64), bench_fp8_bf16frag.log (fp8 on the bf16-
# fragment kernels, for the A/B), bench_fma0.log (mixtral batch 1,
# tensor-core GEMV only),
# dev_attention.log / dev_moe_gemv.log / dev_moe_ggemm.log (the kernel dev
# harness: shipped kernels against the variants that lost, when `make
# bench-dev` built it), sanitizer.log / sanitizer_sample.log /
# sanitizer_ggemm.log (memcheck), racecheck_sample.log (with Q4SAN=1 also
# sanitizer_q4group.log / racecheck_q4group.log), packed at the end
# into $OUT/gpu_run_logs.tar.gz (bench_engine.log also left as is);
# a summary table
# is printed last.  Each step has its own time limit so the whole run stays
# under ~8 minutes (typically ~2).  Exit status: 0 when every step passed.

set -u
cd "$(dirname "$0")/.." || exit 2
MODELS=${1:-}
# OUT, and .dev/lib (make gpu-bundle) on the library path
. tools/gpu_env.sh

declare -A RC
STEPS=()

step() {    # step NAME TIMEOUT CMD...
    local name=$1 limit=$2 t0 t1
    shift 2
    STEPS+=("$name")
    t0=$(date +%s)
    echo "=== $name: $*"
    timeout -k 10 "$limit" "$@" > "$OUT/$name.log" 2>&1
    RC[$name]=$?
    t1=$(date +%s)
    echo "=== $name: rc ${RC[$name]} in $((t1 - t0)) s (log $OUT/$name.log)"
    tail -n 5 "$OUT/$name.log"
}

nvidia-smi > "$OUT/nvidia-smi.log" 2>&1
for b in test_kernels test_sample test_ggemm test_backend bench_engine; do
    [ -x build/gpu/$b ] || { echo "build/gpu/$b missing: run make gpu"; exit 2; }
done

step test_kernels 300 build/gpu/test_kernels
step test_sample 120 build/gpu/test_sample
step test_backend 120 build/gpu/test_backend
# MOE_CUDA_* below: the CUDA backend's tuning record (kernels/TUNING.md),
# read once when the backend is created.
# eager, and MoE steps of > 4 tokens (the prefill chunks) on the per-expert
# cuBLAS path with its host sync; then every MoE step on the grouped
# tensor-core GEMM: all three expert paths are checked
step test_backend_eager 120 env MOE_CUDA_GRAPHS=0 MOE_CUDA_GEMV_MAX_T=4 \
    MOE_CUDA_GGEMM_MAX_T=0 build/gpu/test_backend
step test_backend_ggemm 120 env MOE_CUDA_GEMV_MAX_T=0 \
    MOE_CUDA_GGEMM_MAX_T=100000 build/gpu/test_backend
step test_ggemm 150 build/gpu/test_ggemm
# the e4m3-weight tensor-core GEMV / grouped GEMM (kernels/moe_gemv_fp8.cu)
step test_fp8mma 150 build/gpu/test_fp8mma
# the fp8 prefill GEMMs (cuBLASLt), rescale and fused SwiGLU quantization
step test_gemm_fp8 60 build/gpu/test_gemm_fp8
# the grouped e4m3 GEMM of the fp8 prefill's experts (wgmma + TMA)
step test_fp8_grouped 60 build/gpu/test_fp8_grouped
# the weight-upload conversion and the tensor-parallel add (bit-exact)
step test_convert 60 build/gpu/test_convert
step test_quant   60 build/gpu/test_quant
step test_q4tiled 60 build/gpu/test_q4tiled
step test_q4group 60 build/gpu/test_q4group
step test_kvfp8   90 build/gpu/test_kvfp8
step test_backend_kvfp8 120 env MOE_TEST_KV_FP8=1 build/gpu/test_backend
# device logprobs (log-softmax + top-k) against the host computation
step test_logprobs 60 build/gpu/test_logprobs
# device logit_bias (kernels/logit_bias.cu) against the host loop
step test_logit_bias 60 build/gpu/test_logit_bias
step bench_engine 240 build/gpu/bench_engine $MODELS
# the same decode without CUDA graphs (graph gain = difference)
step bench_nograph 120 env MOE_CUDA_GRAPHS=0 BENCH_PROMPTS=0 \
    build/gpu/bench_engine mixtral-8x7b
# packed weights, decode at batch 1 / 8 / 32 / 64 (4-bit: the GEMV by
# group up to 16 rows per expert, the warpgroup GEMM above; fp8: the e4m3
# GEMV and grouped GEMM), each next to its limit
for w in gptq fp8; do
    step bench_$w 180 env BENCH_QUANT=0 BENCH_ATT=0 BENCH_CTX=512 \
        BENCH_BATCHES=1,8,32,64 BENCH_PROMPTS=0 \
        build/gpu/bench_engine mixtral-8x7b --weights $w
done
# the same fp8 decode on bf16 fragments (fp8_gemv / fp8_ggemm 0, which
# also restores gemv_max_t 32): the f16 fragments' gain, same run
step bench_fp8_bf16frag 180 env MOE_CUDA_FP8_GEMV=0 MOE_CUDA_FP8_GGEMM=0 \
    BENCH_QUANT=0 BENCH_ATT=0 BENCH_CTX=512 BENCH_BATCHES=1,32,64 \
    BENCH_PROMPTS=0 build/gpu/bench_engine mixtral-8x7b --weights fp8
# A/B of the CUDA-core GEMV for 1-2 rows per expert (pass 7): tensor cores
step bench_fma0 120 env MOE_CUDA_GEMV_FMA=0 BENCH_BATCHES=1 BENCH_PROMPTS=0 \
    build/gpu/bench_engine mixtral-8x7b
# the kernel dev harness (make bench-dev): each variant's time and share of
# the copy bandwidth / cuBLAS rate next to the shipped kernel's
for d in attention moe_gemv moe_ggemm; do
    if [ -x build/bench/dev/$d ]; then
        step dev_$d 240 build/bench/dev/$d     # 3 timed rounds a line
    else
        echo "=== dev_$d: build/bench/dev/$d not built (make bench-dev): skipped"
    fi
done
# the warp-specialised prefill attention (not yet run: a step of its own,
# so a hang costs only this step)
if [ -x build/bench/dev/attention ]; then
    step dev_attention_ws 120 env DEV_ATT_WS=only build/bench/dev/attention
fi
SAN=$(command -v compute-sanitizer || ls /usr/local/cuda/bin/compute-sanitizer 2>/dev/null)
if [ -n "$SAN" ]; then
    step sanitizer 150 env MOE_TEST_QUICK=1 "$SAN" --error-exitcode 1 \
        build/gpu/test_kernels
    step sanitizer_sample 240 env MOE_TEST_NO_TIMING=1 "$SAN" \
        --error-exitcode 1 build/gpu/test_sample
    step racecheck_sample 100 env MOE_TEST_NO_TIMING=1 MOE_TEST_QUICK=1 "$SAN" \
        --tool racecheck --error-exitcode 1 build/gpu/test_sample
    step sanitizer_ggemm 100 env MOE_TEST_NO_TIMING=1 "$SAN" \
        --error-exitcode 1 build/gpu/test_ggemm
    if [ "${Q4SAN:-0}" = 1 ]; then
        # the 4-bit kernels by group and on warpgroup tensor cores (shared
        # memory, clusters, wgmma); opt-in: their time under the tools is
        # not yet known to fit the run's budget
        step sanitizer_q4group 240 "$SAN" --error-exitcode 1 \
            build/gpu/test_q4group
        step racecheck_q4group 240 "$SAN" --tool racecheck \
            --error-exitcode 1 build/gpu/test_q4group
    fi
fi

tap_summary() {     # ok / not ok counts of a TAP log
    local f=$OUT/$1.log
    printf "%d ok, %d not ok" "$(grep -c '^ok ' "$f")" "$(grep -c '^not ok ' "$f")"
}

echo
echo "==================== summary ===================="
for s in "${STEPS[@]}"; do
    case $s in
    test_*|sanitizer*|racecheck*) printf "%-14s rc %-4s %s\n" "$s" "${RC[$s]}" "$(tap_summary "$s")" ;;
    *)                printf "%-14s rc %-4s\n" "$s" "${RC[$s]}" ;;
    esac
done
grep -h '^not ok' "$OUT"/test_*.log "$OUT"/sanitizer*.log 2>/dev/null | head -20
grep -h 'ERROR SUMMARY\|RACECHECK SUMMARY\|FAIL' "$OUT"/sanitizer*.log \
    "$OUT"/racecheck*.log "$OUT"/bench_engine.log "$OUT"/dev_*.log \
    2>/dev/null | head -10
echo
grep -h '^RESULT' "$OUT/bench_engine.log" | awk '
{
    delete kv; for (i = 2; i <= NF; i++) { split($i, a, "="); kv[a[1]] = a[2] }
    if (kv["kind"] == "copy_bw") printf "copy bandwidth %s GB/s\n", kv["value"];
    else if (kv["kind"] == "gemm") printf "bf16 GEMM      %s TFLOP/s\n", kv["value"];
    else if (kv["kind"] == "decode")
        printf "%-18s decode  batch %-4s %9s tok/s  %7s ms  %5.0f%% of limit\n",
               kv["model"], kv["batch"], kv["tok_s"], kv["ms_step"], 100 * kv["of_limit"];
    else if (kv["kind"] == "prefill")
        printf "%-18s prefill %-10s %9s tok/s  %7s ms  %5.0f%% of limit\n",
               kv["model"], kv["prompt"], kv["tok_s"], kv["ms"], 100 * kv["of_limit"];
}'
if [ -f "$OUT/bench_nograph.log" ]; then
    echo "without CUDA graphs (MOE_CUDA_GRAPHS=0):"
    grep '^RESULT.*kind=decode' "$OUT/bench_nograph.log" | \
        sed 's/.*model=\([^ ]*\).*batch=\([0-9]*\).*ms_step=\([0-9.]*\).*of_limit=\([0-9.]*\).*/  \1 decode batch \2: \3 ms (of limit \4)/'
fi
if [ -f "$OUT/bench_fma0.log" ]; then
    echo "tensor-core GEMV for 1-2 rows too (MOE_CUDA_GEMV_FMA=0):"
    grep '^RESULT.*kind=decode' "$OUT/bench_fma0.log" | \
        sed 's/.*model=\([^ ]*\).*batch=\([0-9]*\).*ms_step=\([0-9.]*\).*of_limit=\([0-9.]*\).*/  \1 decode batch \2: \3 ms (of limit \4)/'
    grep stages "$OUT/bench_fma0.log" | head -1
fi
# The device tool brings back at most 8 files from $OUT: every log goes
# into $OUT/gpu_run_logs.tar.gz; bench_engine.log also stays beside it.
(cd "$OUT" && ls *.log > /dev/null 2>&1 && \
    tar czf gpu_run_logs.tar.gz *.log && \
    find . -maxdepth 1 -name '*.log' ! -name bench_engine.log -delete)
fail=0
for s in "${STEPS[@]}"; do [ "${RC[$s]}" = 0 ] || fail=1; done
exit $fail
