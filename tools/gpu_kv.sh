#!/bin/bash
# The fp8 KV cache's checks and figures in one device call (the nineteenth
# session's open items: the pool created in e4m3 and sized in e4m3
# blocks, moe_cuda_backend_create_kv), from a tree where `make gpu`
# built build/gpu (carried as tools/gpu_pack.sh's bundle):
#
#   tools/gpu_kv.sh [tests|bench|serve|all]   (default tests; all: tests
#                                     then bench, which can take more
#                                     than one 10-minute device call)
#
# Steps, each with its own time limit, logs in $OUT (default ./gpu-out):
#   test_backend        every CPU/CUDA comparison, and the fp8 pool's
#                       sizes ("fp8 KV" lines: twice the blocks in the
#                       same memory, through moe_backend_create too)
#   test_backend_kvfp8  the comparison with both caches in fp8, the GPU
#                       pool created e4m3 (MOE_TEST_KV_FP8=1)
#   test_kvfp8          the e4m3 cache's kernels (rope writes, attention
#                       reads) against the fp32 reference
#   test_qbackend       the quantized models on both backends; fp8-tensor-kv
#                       also with the fp8 cache at the checkpoint's
#                       per-layer scales
#   decode_kv_auto/fp8  bench_engine, fp8 weights, decode at contexts
#                       8192 and 32768, batches 1 and 64, bf16 then e4m3
#                       KV (each figure next to its limit counting KV bytes)
#   prefill_wg8_1/0     bench_engine prefill 512 / 2048 over the e4m3 cache
#                       with the record's att_prefill_wg8 1 and 0
#   serve_kv_auto/fp8   (serve only) bench/gpu_serve.sh, fp8 dummy weights,
#                       16 streams of 8192-token prompts, 128 tokens out,
#                       max_model_len 32768, bf16 then e4m3 KV cache
#                       (bench/conf/mixtral-8x7b-fp8-32k-dummy.yaml and
#                       mixtral-8x7b-fp8-kvfp8-dummy.yaml):
#                       the pools' block counts (engine ready line) and
#                       TTFT / TPOT
# then a summary.  Exit status 0 when every step passed.

set -u
cd "$(dirname "$0")/.." || exit 2
. tools/gpu_env.sh

what=${1:-tests}
BENCH="build/gpu/bench_engine mixtral-8x7b --weights fp8"
if [ "$what" = serve ]; then
    for kv in auto fp8; do
        yaml=bench/conf/mixtral-8x7b-fp8-32k-dummy.yaml
        [ $kv = fp8 ] && yaml=bench/conf/mixtral-8x7b-fp8-kvfp8-dummy.yaml
        mkdir -p "$OUT/serve_$kv"
        gpu_step serve_kv_$kv 240 env OUT="$OUT/serve_$kv" BENCH_YAML=$yaml \
            INPUT_LEN=8192 OUTPUT_LEN=128 NUM_PROMPTS=32 \
            bench/gpu_serve.sh 16
    done
    for kv in auto fp8; do
        echo "--- serve_kv_$kv"
        grep -E 'engine ready|KV cache' "$OUT/serve_$kv/bench_serve_error.log" \
            | sed -E 's/.*\] //' | cut -c1-200 | tail -3
        grep -E -i 'ttft|tpot|throughput' "$OUT/serve_$kv/bench_serve.txt" \
            | head -8
    done
fi
if [ "$what" = all ] || [ "$what" = tests ]; then
gpu_step test_backend 200 build/gpu/test_backend
gpu_step test_backend_kvfp8 100 env MOE_TEST_KV_FP8=1 build/gpu/test_backend
gpu_step test_kvfp8 60 build/gpu/test_kvfp8
gpu_step test_qbackend 150 bash -c \
    'tools/quant_models.sh build/quant > /dev/null && build/gpu/test_qbackend'
fi
if [ "$what" = all ] || [ "$what" = bench ]; then
for kv in auto fp8; do
    gpu_step decode_kv_$kv 110 env BENCH_QUANT=0 BENCH_ATT=0 \
        BENCH_CTX=8192,32768 BENCH_BATCHES=1,64 BENCH_PROMPTS=0 \
        $BENCH --kv-cache-dtype $kv
done
for w in 1 0; do
    gpu_step prefill_wg8_$w 80 env MOE_CUDA_ATT_PREFILL_WG8=$w BENCH_QUANT=0 \
        BENCH_ATT=0 BENCH_CTX=0 BENCH_BATCHES=0 BENCH_PROMPTS=512,2048 \
        $BENCH --kv-cache-dtype fp8
done
fi

tapsum() {
    echo "$(grep -c '^ok' "$1") ok, $(grep -c '^not ok' "$1") not ok"
}
for f in test_backend test_backend_kvfp8 test_kvfp8 test_qbackend; do
    [ -f "$OUT/$f.log" ] || continue
    echo "--- $f: $(tapsum "$OUT/$f.log")"
    grep -E '^not ok|fp8 KV|fp8-tensor-kv' "$OUT/$f.log" | cut -c1-200 | head -20
done
for f in decode_kv_auto decode_kv_fp8 prefill_wg8_1 prefill_wg8_0; do
    [ -f "$OUT/$f.log" ] || continue
    echo "--- $f"
    grep -E 'created in|^RESULT' "$OUT/$f.log" \
        | sed -E 's/ (tp|ep|gpus|experts_hit)=[^ ]*//g' | cut -c1-200
done
fail=0
for s in "${GPU_STEPS[@]}"; do
    [ "${GPU_RC[$s]}" = 0 ] || fail=1
done
# one file back instead of up to 10 (a device call returns 8 at most);
# a call cut short leaves the logs themselves
(cd "$OUT" && tar czf gpu_kv_logs.tar.gz ./*.log $(ls -d serve_* 2>/dev/null) \
    && rm -rf ./*.log serve_*)
exit $fail
