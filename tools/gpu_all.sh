#!/usr/bin/env bash
# One device call: the GPU tests, the engine benchmark and the serving
# benchmark, each step with its own time limit inside one budget (default
# 560 s, so the whole run fits a 600 s call), every log under $OUT, and a
# summary table (step, status, seconds) plus the key figures at the end.
#
# Needs (build machine: make all gpu gpu-bundle; then carry .dev build/gpu
# build/bench build/nginx/objs/ngx_http_moe_module.so; README, GPUs):
#   tools/gpu_all.sh
# Environment:
#   GPU_ALL_BUDGET=560      seconds for all steps together
#   GPU_SKIP=a,b            skip the named steps (names in the table)
#   SKIP_TESTS=1 SKIP_BENCH=1 SKIP_SERVE=1   skip a whole group
#   GPU_SANITIZE=1          also test_kernels under compute-sanitizer memcheck
#   BENCH_MODELS=mixtral-8x7b   bench_engine's model list
#   SERVE_C=64 (+ INPUT_LEN, OUTPUT_LEN, NUM_PROMPTS, TEMPERATURE: see
#   bench/gpu_serve.sh)
# The longer run with every A/B and sanitizer step: tools/gpu_run.sh.
# Exit status: 0 when every step that ran passed.
set -u
cd "$(dirname "$0")/.." || exit 2
# The device tool brings back at most 8 files from $OUT: the steps log into
# $OUT/logs, packed at the end into $OUT/gpu_logs.tar.gz beside
# $OUT/summary.txt, $OUT/bench_engine.log and $OUT/bench_serve.json.
FINAL_OUT=${OUT:-$PWD/gpu-out}
export OUT=$FINAL_OUT/logs
rm -rf "$OUT"
. tools/gpu_env.sh

BUDGET=${GPU_ALL_BUDGET:-560}
T_START=$(date +%s)
declare -A STATUS

skipped() {     # skipped NAME GROUP: true when the step is to be left out
    case ",${GPU_SKIP:-}," in *",$1,"*) return 0 ;; esac
    case $2 in
    tests) [ "${SKIP_TESTS:-0}" = 1 ] ;;
    bench) [ "${SKIP_BENCH:-0}" = 1 ] ;;
    serve) [ "${SKIP_SERVE:-0}" = 1 ] ;;
    *) return 1 ;;
    esac
}

# run NAME GROUP LIMIT NEEDS CMD...: a step limited to LIMIT seconds and to
# what is left of the budget (less 5 s); NEEDS: a file that must exist
run() {
    local name=$1 group=$2 limit=$3 needs=$4 left
    shift 4
    if skipped "$name" "$group"; then
        GPU_STEPS+=("$name"); STATUS[$name]=skipped; GPU_SEC[$name]=0
        return
    fi
    if [ ! -e "$needs" ]; then
        GPU_STEPS+=("$name"); STATUS[$name]="missing $needs"; GPU_SEC[$name]=0
        echo "=== $name: $needs missing (make all gpu gpu-bundle; carry it)"
        return
    fi
    left=$((BUDGET - ($(date +%s) - T_START) - 5))
    if [ $left -lt 15 ]; then
        GPU_STEPS+=("$name"); STATUS[$name]="no time left"; GPU_SEC[$name]=0
        return
    fi
    [ $limit -gt $left ] && limit=$left
    gpu_step "$name" "$limit" "$@"
    case ${GPU_RC[$name]} in
    0) STATUS[$name]=ok ;;
    124|137) STATUS[$name]="TIMEOUT ($limit s)" ;;
    *) STATUS[$name]="FAIL rc ${GPU_RC[$name]}" ;;
    esac
}

nvidia-smi > "$OUT/nvidia-smi.log" 2>&1 || echo "nvidia-smi failed (no GPU?)"
# The bf16 Mixtral-8x7B dummy (89 GB of weights) fits an H200, not an
# H100's 80 GB: on a smaller GPU the steps serving it are skipped with
# that reason instead of failing on "no room for the KV cache" (run 19e)
GPU_MIB=$(nvidia-smi --query-gpu=memory.total --format=csv,noheader,nounits \
          2> /dev/null | head -1)
if [ -n "$GPU_MIB" ] && [ "$GPU_MIB" -lt 100000 ]; then
    echo "GPU 0 has $GPU_MIB MiB: the bf16 Mixtral steps (serve_bench," \
         "reload, reload_noswap) are skipped (89 GB of weights)"
    GPU_SKIP="${GPU_SKIP:+$GPU_SKIP,}serve_bench,reload,reload_noswap"
fi
head -1 .dev/MANIFEST 2>/dev/null || echo "no .dev/MANIFEST: make gpu-bundle and carry .dev"

run test_kernels tests 150 build/gpu/test_kernels build/gpu/test_kernels
run test_sample  tests 60  build/gpu/test_sample  build/gpu/test_sample
run test_backend tests 90  build/gpu/test_backend build/gpu/test_backend
run test_ggemm   tests 60  build/gpu/test_ggemm   build/gpu/test_ggemm
run test_fp8mma  tests 90  build/gpu/test_fp8mma  build/gpu/test_fp8mma
run test_gemm_fp8 tests 60 build/gpu/test_gemm_fp8 build/gpu/test_gemm_fp8
run test_fp8_grouped tests 60 build/gpu/test_fp8_grouped build/gpu/test_fp8_grouped
run test_convert tests 60  build/gpu/test_convert build/gpu/test_convert
run test_tp      tests 90  build/gpu/test_tp      build/gpu/test_tp
run test_quant   tests 120 build/gpu/test_quant   build/gpu/test_quant
run test_q4tiled tests 60 build/gpu/test_q4tiled build/gpu/test_q4tiled
run test_q4group tests 60 build/gpu/test_q4group build/gpu/test_q4group
run test_kvfp8   tests 90  build/gpu/test_kvfp8   build/gpu/test_kvfp8
run test_backend_kvfp8 tests 90 build/gpu/test_backend env MOE_TEST_KV_FP8=1 \
    build/gpu/test_backend
# the un-permute fusion off (kernels/TUNING.md): the separate un-permute
# and norm launches against the CPU backend
run test_backend_unfused tests 90 build/gpu/test_backend env \
    MOE_CUDA_FUSE_UNPERMUTE=0 build/gpu/test_backend
run test_mask    tests 60  build/gpu/test_mask    build/gpu/test_mask
run test_logprobs tests 60 build/gpu/test_logprobs build/gpu/test_logprobs
run test_logit_bias tests 60 build/gpu/test_logit_bias build/gpu/test_logit_bias
if [ "${GPU_SANITIZE:-0}" = 1 ]; then
    SAN=$(command -v compute-sanitizer || ls /usr/local/cuda/bin/compute-sanitizer 2>/dev/null)
    run sanitizer tests 90 "${SAN:-compute-sanitizer}" "${SAN:-compute-sanitizer}" \
        --error-exitcode 1 build/gpu/test_kernels
fi
# quantized checkpoints (engine/model/quant.h): the C engine's CPU path
# (build/moe) on every tiny quantized layout against transformers on its
# dequantized reference, and transformers' own fp8 loading (information);
# tools/ref_quant.py prints SKIP without torch.  Carry build/moe and
# build/quantize.
run quant_ref    tests 120 build/quantize bash -c \
    'tools/quant_models.sh build/quant && python3 tools/ref_quant.py build/quant'
# quantized checkpoints on the CUDA backend (weights packed on the device)
# against the CPU backend, every tiny quantized model, prefill / chunk /
# decode, tp 1 and 2 ranks on one GPU (t/gpu/test_qbackend.cu); needs
# build/quantize for the models
run test_qbackend tests 120 build/gpu/test_qbackend bash -c \
    'tools/quant_models.sh build/quant > /dev/null && build/gpu/test_qbackend'
run bench_engine bench 180 build/gpu/bench_engine build/gpu/bench_engine \
    "${BENCH_MODELS:-mixtral-8x7b}"
run serve_smoke  serve 90  build/nginx/objs/ngx_http_moe_module.so \
    tools/gpu_serve_smoke.sh
run serve_bench  serve 200 build/bench/serve bench/gpu_serve.sh "${SERVE_C:-64}"
# the weight hand-over across processes (engine/backends/cuda_share.h)
run test_share   tests 60  build/gpu/test_share   build/gpu/test_share
# the whole model with its weights as quantized checkpoints hold them
# (random packed weights on the device): fp8 e4m3 per-channel, AWQ 4-bit
# group 128 (and GPTQ, the same bytes); decode at batch 1 and 64 (context
# 512), fp8 prefill 512 and 2048
run bench_fp8    bench 90  build/gpu/bench_engine env BENCH_QUANT=0 \
    BENCH_ATT=0 BENCH_CTX=512 BENCH_BATCHES=1,64 BENCH_PROMPTS=512,2048 \
    build/gpu/bench_engine mixtral-8x7b --weights fp8
# A/B of the un-permute fusion (kernels/TUNING.md, fuse_unpermute) on the
# fp8 model at batch 1, off / on twice
run bench_fuse   bench 60  build/gpu/bench_engine bash -c 'for f in 0 1 0 1; do \
    echo "=== fuse_unpermute $f"; MOE_CUDA_FUSE_UNPERMUTE=$f BENCH_QUANT=0 \
    BENCH_ATT=0 BENCH_CTX=512 BENCH_BATCHES=1 BENCH_PROMPTS=0 \
    build/gpu/bench_engine mixtral-8x7b --weights fp8 2>&1 \
    | grep "RESULT.*decode" || exit 1; done'
# long contexts on the fp8 model with the KV cache in e4m3 (the pool sized
# in e4m3 blocks, the limit counting one byte per KV element; RESULT
# kv=fp8 with kv_share): decode at 8k and 32k, batch 1 and 64, and the
# prefill over the e4m3 cache
run bench_kvfp8  bench 120 build/gpu/bench_engine env BENCH_QUANT=0 \
    BENCH_ATT=0 BENCH_CTX=8192,32768 BENCH_BATCHES=1,64 BENCH_PROMPTS=2048 \
    build/gpu/bench_engine mixtral-8x7b --weights fp8 --kv-cache-dtype fp8
run bench_awq    bench 90  build/gpu/bench_engine env BENCH_QUANT=0 \
    BENCH_ATT=0 BENCH_CTX=512 BENCH_BATCHES=1,64 BENCH_PROMPTS=0 \
    build/gpu/bench_engine mixtral-8x7b --weights awq
run bench_gptq   bench 90  build/gpu/bench_engine env BENCH_QUANT=0 \
    BENCH_ATT=0 BENCH_CTX=512 BENCH_BATCHES=1,64 BENCH_PROMPTS=0 \
    build/gpu/bench_engine mixtral-8x7b --weights gptq
# serving the fp8 model through nginx (bench/conf/mixtral-8x7b-fp8-dummy
# .yaml), the same load as serve_bench; json under $OUT/fp8
run serve_fp8    serve 200 build/bench/serve bash -c 'mkdir -p "$OUT/fp8" \
    && OUT="$OUT/fp8" BENCH_YAML=bench/conf/mixtral-8x7b-fp8-dummy.yaml \
    bench/gpu_serve.sh "${SERVE_C:-64}"'
# the fp8 prefill 2048's kernel timeline (CUPTI, bench/dev/ktrace.c):
# kernel time, the GPU's idle time and the kernel pairs around the gaps
# (tools/ktrace_gaps.py); the timeline itself in $OUT/ktrace_fp8.txt
run trace_fp8    bench 90  build/bench/dev/libktrace.so bash -c \
    'BENCH_QUANT=0 BENCH_ATT=0 BENCH_CTX=512 BENCH_BATCHES=0 \
    BENCH_PROMPTS=2048 KTRACE_OUT="$OUT/ktrace_fp8.txt" \
    LD_PRELOAD=build/bench/dev/libktrace.so build/gpu/bench_engine \
    mixtral-8x7b --weights fp8 && tools/ktrace_gaps.py "$OUT/ktrace_fp8.txt"'
# serving against bench/engine on the same work (decode steps at the
# serving batch + the prompts at the engine's prefill rate, same run)
run serve_vs_engine serve 20 "$OUT/fp8/bench_serve.json" \
    tools/serve_vs_engine.py "$OUT/bench_fp8.log" "$OUT/fp8/bench_serve.json"
# nginx -s reload under streams with the model filling the GPU: the new
# worker imports the old one's weights (t/http_reload.t).  With the default
# 4 GiB host swap pool the new worker spends ~2.8 s pinning it: first
# request 3.24-3.48 s after the reload on 2026-12-02 (12.17 s loading from
# disk), so `reload` holds the line at 4 s; without a swap pool
# (`reload_noswap`, swap_space 0) 0.67 s, held at the issue's 1 s
reload_step() {  # reload_step NAME YAML TARGET_S
    run "$1" serve 150 build/nginx/objs/ngx_http_moe_module.so bash -c \
        '. tools/gpu_env.sh && gpu_bench_tokenizer && LOCALMOE_NGINX=$NGINX \
        LOCALMOE_RELOAD_MODEL=mixtral-8x7b LOCALMOE_RELOAD_EXPECT_HANDOVER=1 \
        LOCALMOE_RELOAD_YAML="$0" LOCALMOE_RELOAD_TARGET_S="$1" \
        prove -v t/http_reload.t' "$2" "$3"
}
reload_step reload bench/conf/mixtral-8x7b-dummy.yaml "${RELOAD_TARGET_S:-4}"
reload_step reload_noswap bench/conf/mixtral-8x7b-dummy-noswap.yaml 1

tap() {         # "N ok, M not ok" of a TAP log, or its skip reason
    if grep -q '^1\.\.0' "$OUT/$1.log" 2>/dev/null; then
        sed -n 's/^1\.\.0 *# *//p' "$OUT/$1.log" | head -1
        return
    fi
    printf "%d ok, %d not ok" "$(grep -c '^ok ' "$OUT/$1.log" 2>/dev/null)" \
        "$(grep -c '^not ok ' "$OUT/$1.log" 2>/dev/null)"
}

fail=0
for s in "${GPU_STEPS[@]}"; do
    case ${STATUS[$s]} in ok|skipped) ;; *) fail=1 ;; esac
done

summary() {
echo
echo "======================== summary ========================"
printf "%-14s %-30s %6s  %s\n" step status seconds detail
for s in "${GPU_STEPS[@]}"; do
    detail=
    case $s in
    test_*|sanitizer) [ -f "$OUT/$s.log" ] && detail=$(tap "$s") ;;
    bench_engine) detail=$(grep -m1 '^SKIP' "$OUT/$s.log" 2>/dev/null) ;;
    esac
    printf "%-14s %-30s %6s  %s\n" "$s" "${STATUS[$s]}" "${GPU_SEC[$s]}" "$detail"
done
printf "%-14s %-30s %6s\n" total "" "$(($(date +%s) - T_START))"
grep -h '^not ok' "$OUT"/test_*.log 2>/dev/null | head -10

echo
echo "key figures:"
if [ -f "$OUT/bench_engine.log" ]; then
    grep -h '^RESULT' "$OUT/bench_engine.log" | awk '
    {
        delete kv; for (i = 2; i <= NF; i++) { split($i, a, "="); kv[a[1]] = a[2] }
        if (kv["kind"] == "copy_bw") printf "  copy bandwidth %s GB/s\n", kv["value"];
        else if (kv["kind"] == "gemm") printf "  bf16 GEMM      %s TFLOP/s\n", kv["value"];
        else if (kv["kind"] == "decode" && (kv["batch"] == 1 || kv["batch"] == 64))
            printf "  %-14s decode  batch %-4s %9s tok/s %8s ms  %3.0f%% of limit (ctx %s)\n",
                   kv["model"], kv["batch"], kv["tok_s"], kv["ms_step"], 100 * kv["of_limit"], kv["ctx"];
        else if (kv["kind"] == "quant_experts")
            printf "  experts %-6s batch %-4s %8s ms/layer  %3.0f%% of limit\n",
                   kv["format"], kv["batch"], kv["ms_layer"], 100 * kv["of_limit"];
        else if (kv["kind"] == "attention" && kv["ctx"] > 512)
            printf "  attention ctx %-6s batch %-3s %-4s %-7s %8s ms  %3.0f%% of limit\n",
                   kv["ctx"], kv["batch"], kv["kv"], kv["grid"], kv["ms"], 100 * kv["of_limit"];
        else if (kv["kind"] == "prefill" && kv["prompt"] == 2048)
            printf "  %-14s prefill %-10s %9s tok/s %8s ms  %3.0f%% of limit\n",
                   kv["model"], kv["prompt"], kv["tok_s"], kv["ms"], 100 * kv["of_limit"];
        else if (kv["kind"] == "collective" && kv["phase"] == "decode" &&
                 (kv["size"] == 1 || kv["size"] == 64))
            printf "  %-14s tp %s ep %s batch %-4s all-reduces %s ms/layer, %.1f%% of the step\n",
                   kv["model"], kv["tp"], kv["ep"], kv["size"], kv["ms_layer"], 100 * kv["share"];
    }'
fi
if [ -f "$OUT/bench_serve.json" ] && [ "${STATUS[serve_bench]:-}" = ok ]; then
    python3 - "$OUT/bench_serve.json" <<'PY'
import json, sys
j = json.load(open(sys.argv[1]))
print("  serving: %s streams, %d ok / %d failed, output %.1f tok/s" % (
    j.get("max_concurrency", "?"), j.get("completed", 0), j.get("failed", 0),
    j.get("output_throughput", 0.0)))
PY
fi
echo "logs: $FINAL_OUT/gpu_logs.tar.gz (every step's log), summary.txt"
}

summary | tee "$FINAL_OUT/summary.txt"
for f in bench_engine.log bench_serve.json; do
    [ -f "$OUT/$f" ] && cp "$OUT/$f" "$FINAL_OUT/"
done
tar czf "$FINAL_OUT/gpu_logs.tar.gz" -C "$FINAL_OUT" logs && rm -rf "$OUT"
exit $fail
