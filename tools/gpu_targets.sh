#!/bin/bash
# Issue 12's target figures in one device call (bench/RESULTS.md), from a
# tree where `make gpu bench-dev` built build/gpu and build/bench/dev
# (carried as tools/gpu_pack.sh's bundle):
#
#   tools/gpu_targets.sh
#
# Every figure next to the limits measured in the same call: the copy
# bandwidth and cuBLAS bf16 rate (bench_engine prints them each run) and
# cuBLASLt's e4m3 rate (bench/dev/wg_ggemm's limit line).  Steps
# (tools/gpu_env.sh's gpu_step: a time limit each, logs in $OUT, default
# ./gpu-out), skipped once TARGETS_BUDGET seconds (default 540) would be
# passed, when TARGETS_SKIP (a comma list) names them, or when
# TARGETS_ONLY (a comma list) is set and does not:
#   e4m3_peak        cuBLASLt e4m3 8192^3 (wg_ggemm, small case only)
#   test_qbackend_fp8g  the tiny quantized models against the CPU backend
#                    with every step above 0 tokens on the fused fp8 FFN
#                    (grouped e4m3 GEMM; decode steps as graphs)
#   fp8_R            fp8 weights: decode batch 1 / 32 / 64 at context 512,
#                    prefill 512 / 2048, rounds R (the defaults)
#   fp8f16_R         the same decode at batch 32 / 64 with fp8_dgrouped 0:
#                    the f16 grouped GEMM instead of the fused fp8 FFN
#   q4dev            the 4-bit GEMVs of one layer at batch 1, experts
#                    and dense (bench/dev/quant_gemv, quick lines)
#   q4rot            the shipped 4-bit GEMV of each of those matrices on
#                    one set of weights and on ~20 GB of copies in turn
#   awq, gptq        4-bit weights: decode batch 1 / 64 at context 512
#   bf16_long_lB     bf16 weights (89 GB: GPUs with more than 100 GB only)
#                    decode at context 8192 / 32768, batch 1 / 64, with
#                    att_long_bps B (3, and 2, the default since run 21c)
#   trace_fp8g       batch 64's kernel timeline (PDL off) with fp8g
#   kvfp8_long_lB    fp8 weights and an e4m3 KV cache, the same contexts
#                    and batches, att_long_bps B
#   route1_tests     the one-launch norm + router of a one-token step
#                    (moe_cuda_norm_route1) and the early reads of its
#                    decode attention (att_early): test_kernels (quick)
#                    and, with the defaults and with route_fuse1 2
#                    and att_early 1, test_backend and test_qbackend
#                    against the CPU
#   r1_W_V_R         decode batch 1 / 8 at context 512, weights W (fp8,
#                    gptq), variant V (base: route_fuse1 0, att_early 0;
#                    r1 / r2: route_fuse1 1 / 2; ae: att_early 1; r2ae
#                    both), rounds R: the A/B
#   trace_b1_V       batch 1's kernel timeline (PDL off), fp8, variants
#                    base, r2, ae
#   trace_b1_gptq    the same, GPTQ weights, the defaults
#   pre_tests        dense_pre (the dense GEMVs' weights loaded before
#                    the PDL wait): test_kernels (quick), test_fp8mma,
#                    and with dense_pre 1 test_backend and test_qbackend
#   pre_W_V_R        decode batch 1 / 8 at context 512, weights W (fp8,
#                    gptq), dense_pre V, rounds R: the A/B
#   trace_b1_{gptq_pre,fp8_pre,fp8}  batch 1's timelines (PDL off)
#   ends_W           batch 1's timeline with PDL on (the defaults), W fp8
#                    and gptq: each kernel's end past the end of the one
#                    launched before it (tools/ktrace_ends.py), in the
#                    summary
#   ends_fp8_c2      ends_fp8 with each kernel keyed by the two launched
#                    before it (KTRACE_ENDS_CTX=2)
# then a summary of the RESULT lines.  Exit status: 0 when every step that
# ran passed.

set -u
cd "$(dirname "$0")/.." || exit 2
. tools/gpu_env.sh

T_START=$(date +%s)
tstep() {   # tstep NAME LIMIT CMD...: gpu_step within TARGETS_BUDGET
    local name=$1 limit=$2
    case ",${TARGETS_SKIP:-}," in
    *",$name,"*) echo "=== $name: skipped (TARGETS_SKIP)"; return ;;
    esac
    case ",${TARGETS_ONLY:-$name}," in
    *",$name,"*) ;;
    *) echo "=== $name: skipped (TARGETS_ONLY)"; return ;;
    esac
    if [ $(( $(date +%s) - T_START + limit )) -gt "${TARGETS_BUDGET:-540}" ]
    then
        echo "=== $name: skipped (budget)"
        return
    fi
    gpu_step "$@" > /dev/null
    echo "=== $name: rc ${GPU_RC[$name]} in ${GPU_SEC[$name]} s"
}
BENCH="build/gpu/bench_engine mixtral-8x7b"
NOQ="BENCH_QUANT=0 BENCH_ATT=0"
GPU_MIB=$(nvidia-smi --query-gpu=memory.total --format=csv,noheader,nounits \
          2> /dev/null | head -1)
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm,clocks.max.mem \
    --format=csv,noheader 2> /dev/null | head -1

tstep e4m3_peak 60 env DEV_FG_CASES=0 DEV_FG_ONLY=wgmma_tma_shipped \
    build/bench/dev/wg_ggemm
# decode steps above the GEMV on the prefill's grouped e4m3 GEMM (the
# fused fp8 FFN, activations quantized per row) instead of the f16
# grouped GEMM: first against the CPU backend (every step above 0 tokens
# on it, decode steps as graphs), then the A/B at batch 32 / 64
tstep test_qbackend_fp8g 120 bash -c 'tools/quant_models.sh build/quant \
    > /dev/null && MOE_CUDA_GEMV_MAX_T=0 MOE_CUDA_FP8_DGROUPED=1 \
    build/gpu/test_qbackend'
for r in 1 2; do
    tstep fp8_$r 60 env $NOQ BENCH_CTX=512 BENCH_BATCHES=1,32,64 \
        BENCH_PROMPTS=512,2048 $BENCH --weights fp8
    tstep fp8f16_$r 60 env MOE_CUDA_FP8_DGROUPED=0 $NOQ BENCH_CTX=512 \
        BENCH_BATCHES=32,64 BENCH_PROMPTS=0 $BENCH --weights fp8
done
# the 4-bit GEMVs of one layer at batch 1, the dense projections too
tstep q4dev 90 env DEV_DENSE=1 DEV_QUICK=1 build/bench/dev/quant_gemv 1
# and the same kernel on ~20 GB of copies in turn (no L2 or TLB reuse
# between calls, as in the model)
tstep q4rot 120 env DEV_ROTATE=20 build/bench/dev/quant_gemv 1
for w in awq gptq; do
    tstep $w 60 env $NOQ BENCH_CTX=512 BENCH_BATCHES=1,64 BENCH_PROMPTS=0 \
        $BENCH --weights $w
done
# ktstep NAME BATCH TOOL SUFFIX VAR=VALUE...: decode at BATCH (context
# 512), weights $TW (default fp8), with the variables given, under
# libktrace; its timeline summed by TOOL (the variables set for it too)
# into $OUT/NAME_SUFFIX.log
ktstep() {
    local name=$1 batch=$2 tool=$3 suf=$4
    shift 4
    tstep "$name" 60 env "$@" $NOQ BENCH_CTX=512 BENCH_BATCHES="$batch" \
        BENCH_PROMPTS=0 KTRACE_OUT="$OUT/ktrace.txt" \
        LD_PRELOAD=build/bench/dev/libktrace.so $BENCH --weights "${TW:-fp8}"
    [ -f "$OUT/ktrace.txt" ] && env "$@" "$tool" "$OUT/ktrace.txt" \
        > "$OUT/${name}_$suf.log" 2>&1
    rm -f "$OUT/ktrace.txt"
}
# ttrace NAME BATCH VAR=VALUE...: the timeline with PDL off, summed by
# tools/ktrace_gaps.py into $OUT/NAME_gaps.log
ttrace() {
    local name=$1 batch=$2
    shift 2
    ktstep "$name" "$batch" tools/ktrace_gaps.py gaps "$@" MOE_CUDA_PDL=0
}
# batch 64's kernel timeline (PDL off) on the fused fp8 FFN
ttrace trace_fp8g 64 MOE_CUDA_FP8_DGROUPED=1
for b in 3 2; do
    if [ -n "$GPU_MIB" ] && [ "$GPU_MIB" -gt 100000 ]; then
        tstep bf16_long_l$b 120 env MOE_CUDA_ATT_LONG_BPS=$b $NOQ \
            BENCH_CTX=8192,32768 BENCH_BATCHES=1,64 BENCH_PROMPTS=0 $BENCH
    else
        echo "=== bf16_long_l$b: skipped (${GPU_MIB:-?} MiB: the bf16" \
             "weights are 89 GB)"
    fi
    tstep kvfp8_long_l$b 90 env MOE_CUDA_ATT_LONG_BPS=$b $NOQ \
        BENCH_CTX=8192,32768 BENCH_BATCHES=1,64 BENCH_PROMPTS=0 $BENCH \
        --weights fp8 --kv-cache-dtype fp8
done

# decode's norm + router in one launch at batch 1: the tests, then the
# A/B alternated (fp8 and GPTQ), then the two timelines
# tap NAME WORD CMD...: run a TAP test, print its counts (and the oks
# naming WORD) and its first failures; its exit status
tap() {
    "${@:3}" > /tmp/tap.$$ 2>&1; local rc=$?
    echo "$1: rc $rc, $(grep -c "^ok" /tmp/tap.$$) ok," \
         "$(grep -c "^not ok" /tmp/tap.$$) not ok," \
         "$(grep -c "^ok.*$2" /tmp/tap.$$) ok $2"
    grep -E "^not ok|Bail" /tmp/tap.$$ | head -5; return $rc
}
export -f tap
tstep route1_tests 360 bash -c 'T() { tap "$1" norm_route1 "${@:2}"; }
    tools/quant_models.sh build/quant > /dev/null || exit 1
    T test_kernels env MOE_TEST_QUICK=1 build/gpu/test_kernels || exit 1
    for v in "" \
             "MOE_CUDA_ROUTE_FUSE1=2 MOE_CUDA_ATT_EARLY=1"; do
        T "test_backend $v" env $v build/gpu/test_backend || exit 1
        T "test_qbackend $v" env $v build/gpu/test_qbackend || exit 1
    done'
R1_VARIANTS="base:MOE_CUDA_ROUTE_FUSE1=0,MOE_CUDA_ATT_EARLY=0
    r1:MOE_CUDA_ROUTE_FUSE1=1,MOE_CUDA_ATT_EARLY=0
    r2:MOE_CUDA_ROUTE_FUSE1=2,MOE_CUDA_ATT_EARLY=0
    ae:MOE_CUDA_ROUTE_FUSE1=0,MOE_CUDA_ATT_EARLY=1
    r2ae:MOE_CUDA_ROUTE_FUSE1=2,MOE_CUDA_ATT_EARLY=1"
for r in 1 2 3; do
    for w in fp8 gptq; do
        for v in $R1_VARIANTS; do
            e=${v#*:}
            tstep r1_${w}_${v%%:*}_$r 45 env ${e//,/ } $NOQ \
                BENCH_CTX=512 BENCH_BATCHES=1,8 BENCH_PROMPTS=0 $BENCH \
                --weights $w
        done
    done
done
ttrace trace_b1_base 1 MOE_CUDA_ROUTE_FUSE1=0 MOE_CUDA_ATT_EARLY=0
ttrace trace_b1_r2 1 MOE_CUDA_ROUTE_FUSE1=2 MOE_CUDA_ATT_EARLY=0
ttrace trace_b1_ae 1 MOE_CUDA_ROUTE_FUSE1=0 MOE_CUDA_ATT_EARLY=1
# GPTQ batch 1 with the defaults
TW=gptq ttrace trace_b1_gptq 1

# dense_pre: the dense GEMVs' weights before the PDL wait; the tests,
# then the A/B (fp8, GPTQ) alternated, then the GPTQ timeline with it
tstep pre_tests 300 bash -c 'T() { tap "$1" dense_pre "${@:2}"; }
    tools/quant_models.sh build/quant > /dev/null || exit 1
    T test_kernels env MOE_TEST_QUICK=1 build/gpu/test_kernels || exit 1
    T test_fp8mma env MOE_TEST_NO_TIMING=1 build/gpu/test_fp8mma || exit 1
    T "test_backend pre" env MOE_CUDA_DENSE_PRE=1 build/gpu/test_backend \
        || exit 1
    T "test_qbackend pre" env MOE_CUDA_DENSE_PRE=1 \
        build/gpu/test_qbackend || exit 1'
for r in 1 2 3; do
    for w in fp8 gptq; do
        for v in 0 1; do
            tstep pre_${w}_${v}_$r 45 env MOE_CUDA_DENSE_PRE=$v $NOQ \
                BENCH_CTX=512 BENCH_BATCHES=1,8 BENCH_PROMPTS=0 $BENCH \
                --weights $w
        done
    done
done
TW=gptq ttrace trace_b1_gptq_pre 1 MOE_CUDA_DENSE_PRE=1
TW=fp8 ttrace trace_b1_fp8_pre 1 MOE_CUDA_DENSE_PRE=1
TW=fp8 ttrace trace_b1_fp8 1

# batch 1's PDL-on timelines, summed by tools/ktrace_ends.py into
# $OUT/NAME_ends.log
TW=fp8 ktstep ends_fp8 1 tools/ktrace_ends.py ends
TW=gptq ktstep ends_gptq 1 tools/ktrace_ends.py ends

# the defaults' PDL-on timeline with each kernel keyed by the two
# launched before it (gate|up and down are told apart)
TW=fp8 ktstep ends_fp8_c2 1 tools/ktrace_ends.py ends KTRACE_ENDS_CTX=2

# the summary: short enough for the call's 12,000-character output tail
echo "--- limits"
grep -h -E '^limit: cuBLASLt' "$OUT/e4m3_peak.log" 2> /dev/null
for s in "${GPU_STEPS[@]}"; do
    case $s in e4m3_peak) continue ;;
    q4dev) echo "--- $s:"; grep -E 'N [0-9]+ K|copy|shipped|shape 0[,:( ]|shape 0$' \
        "$OUT/$s.log" | cut -c1-150 | head -40; continue ;;
    q4rot) echo "--- $s:"; grep -E '^limits|N [0-9]+ K|same weights|in turn|read only|shape 0, S 0, pa 1|variant 0' \
        "$OUT/$s.log" | sed -E 's/ +/ /g' | cut -c1-110 | head -40; continue ;;
    route1_tests|pre_tests) echo "--- $s:"; grep -v '^ok' "$OUT/$s.log" \
        | cut -c1-200 | head -20; continue ;;
    r1_*|pre_*) echo "--- $s: $(grep -h -E '^RESULT kind=copy_bw' "$OUT/$s.log" \
        | sed -E 's/.*value=([0-9.]+).*/copy \1/')" \
        "$(grep -E '^RESULT .*kind=decode' "$OUT/$s.log" \
        | sed -E 's/.* batch=([0-9]+) tok_s=([0-9.]+) .* of_limit=([0-9.]+) .*/b\1 \2 (\3)/' \
        | tr '\n' ' ')"
        continue ;;
    test_*) echo "--- $s: $(grep -c '^ok' "$OUT/$s.log") ok"
        grep -E '^not ok|Bail' "$OUT/$s.log" | cut -c1-200 | head -6
        continue ;;
    esac
    echo "--- $s: $(grep -h -E '^RESULT kind=(copy_bw|gemm)' "$OUT/$s.log" \
        | sed -E 's/.*kind=([a-z_]+) value=([0-9.]+) unit=(.*)/\1 \2 \3/' \
        | tr '\n' ' ')"
    grep -E '^RESULT .*kind=(decode|prefill)' "$OUT/$s.log" \
        | sed -E -e 's/^RESULT model=[^ ]+ //' \
                 -e 's/ (tp|ep|gpus|experts_hit)=[^ ]+//g' | cut -c1-150
    grep -E '^RESULT' "$OUT/$s.log" > /dev/null \
        || tail -3 "$OUT/$s.log" | cut -c1-200
done

[ -f "$OUT/trace_fp8g_gaps.log" ] && echo "--- trace_fp8g (PDL off)" \
    && sed -n '/kernel time by kernel/,$p' "$OUT/trace_fp8g_gaps.log" \
    | head -24

for f in base r2 ae gptq gptq_pre fp8_pre fp8; do
    [ -f "$OUT/trace_b1_${f}_gaps.log" ] && echo "--- trace_b1_$f (PDL off)" \
        && sed -n '1p;4p' "$OUT/trace_b1_${f}_gaps.log" \
        && sed -n '/after the kernel before it/,$p' \
           "$OUT/trace_b1_${f}_gaps.log" | head -12 | cut -c1-110
done

for f in fp8 gptq fp8_c2; do
    [ -f "$OUT/ends_${f}_ends.log" ] && echo "--- ends_$f (PDL on)" \
        && head -12 "$OUT/ends_${f}_ends.log" | cut -c1-110
done

fail=0
for s in "${GPU_STEPS[@]}"; do
    [ "${GPU_RC[$s]:-0}" = 0 ] || fail=1
done
exit $fail
